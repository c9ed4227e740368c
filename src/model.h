/*
 * model.h - a loaded Kimi Linear model: configuration, the layer schedule, and every weight
 * bound to a named field with its shape checked.
 *
 * Large matrices are views into the memory-mapped checkpoint (struct tensor, borrowed).
 * Small parameters the math reads element by element (norm weights, conv taps, gate
 * parameters, the router bias) and the MLA up-projections used by the absorbed form are
 * converted to float once at open and owned by the model.
 */
#ifndef KLI_MODEL_H
#define KLI_MODEL_H

#include <stdint.h>

#include "kli.h"
#include "hparams.h"
#include "internal.h"
#include "weights.h"

/* A matrix view: shape[0] rows of shape[1] elements (row-major), data borrowed. */
struct tensor {
    enum k_dtype dtype;
    int32_t ndim;
    int64_t shape[4];
    const void *data;
    const char *name;   /* the checkpoint's name, for messages */
    const void *const *node_data;   /* NULL, or [THREADS_NODES]: the copy each NUMA node's
                                       workers read (numa.c, --numa replicate) */
};

struct k_kda_w {
    struct tensor q_proj, k_proj, v_proj;   /* [H*K][d_model] */
    float *conv[3];            /* q, k, v taps: [H*K][W]; tap W-1 multiplies the current token */
    float *a_neg;              /* [H]: -exp(A_log), the per-head decay scale */
    struct tensor f_a;     /* [r_f][d_model] forget-gate down */
    struct tensor f_b;     /* [H*K][r_f] forget-gate up */
    float *dt_bias;            /* [H*K] */
    struct tensor b_proj;  /* [H][d_model] beta */
    struct tensor g_a;     /* [r_g][d_model] output-gate down */
    struct tensor g_b;     /* [H*K][r_g] output-gate up */
    float *o_norm;             /* [K] gated RMSNorm weight shared by the heads */
    struct tensor o_proj;  /* [d_model][H*K] */
};

struct k_mla_w {
    struct tensor q_proj;  /* [H*(nope+rope)][d_model] */
    struct tensor kv_a;    /* [L+rope][d_model]: latent c, then the shared k_pe */
    float *kv_a_norm;          /* [L] */
    struct tensor kv_b;    /* [H*(nope+v)][L]: per head W_UK (nope rows) then W_UV (v rows) */
    float *w_uk_t;             /* [H][L][nope]: W_UK transposed, for q absorption */
    float *w_uv;               /* [H][v][L] */
    struct tensor o_proj;  /* [d_model][H*v] */
};

struct ffn_w {
    struct tensor gate, up;   /* [d_ff][d_model] */
    struct tensor down;       /* [d_model][d_ff] */
};

struct moe_w {
    struct tensor router;     /* [E][d_model] */
    float *bias;                  /* [E] e_score_correction_bias (selection only) */
    struct ffn_w *experts;    /* [E]: w1 = gate, w3 = up, w2 = down */
    struct ffn_w shared;      /* d_ff = moe d_ff * n_shared; absent if n_shared = 0 */
    const int8_t *node;           /* [E] under --numa partition: the node (logical index)
                                     holding each routed expert, whose workers compute it in
                                     decode steps (moe.c); NULL: any worker (numa.c) */
};

struct k_layer {
    float *attn_norm;             /* [d_model] input_layernorm */
    float *ffn_norm;              /* [d_model] post_attention_layernorm */
    enum k_mixer mixer;
    enum k_ffn ffn_kind;
    struct k_kda_w kda;
    struct k_mla_w mla;
    struct ffn_w ffn;         /* dense layers */
    struct moe_w moe;         /* MoE layers */
};

struct kli_model {
    struct k_config cfg;
    struct wfile *wf;
    struct tensor embed;      /* [n_vocab][d_model] */
    float *final_norm;            /* [d_model] */
    struct tensor lm_head;    /* [n_vocab][d_model] */
    struct k_layer *layers;     /* [n_layers] */
    int32_t kda_rank_f, kda_rank_g;
    char *path;
    int convert;                  /* weight matrices converted to convert_dt at open */
    enum k_dtype convert_dt;
    struct arena owned;       /* converted matrices, freed at close */
    struct kli_tokenizer *tok;    /* NULL when the directory has no tokenizer */
    int n_threads;
    uint64_t fingerprint;         /* identity for session snapshots (model_fingerprint) */
    struct backend_model *gpu;    /* device state (backend.c); NULL: GPU use off */
    struct numa_state *numa;      /* topology, placement plan, node copies (numa.c) */
    uint64_t numa_away;           /* expert rows computed by a worker of another node than
                                     the expert's (atomic; only counted with moe.node) */
    int numa_route;               /* moe.node decides which workers compute an expert;
                                     set with moe.node by numa.c (tests turn it off) */
    struct xcache *xc;            /* edge mode's expert cache (xcache.c); NULL: resident */
};

/* Bytes of one row of a tensor. */
uint64_t model_row_bytes(const struct tensor *t);

#endif
