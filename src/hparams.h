/*
 * hparams.h - the hyperparameters of a Kimi Linear checkpoint, read from its config.json.
 * (Named hparams, not config.h, so that it never shadows the autoconf config.h.)
 *
 * Every dimension kli uses comes from here: nothing is hard-wired to one model size.
 * Sub-structs per block; only the block's own file reads its sub-struct.
 */
#ifndef KLI_HPARAMS_H
#define KLI_HPARAMS_H

#include <stdint.h>

#include "kli.h"

enum {
    KLI_MAX_LAYERS = 1024,
    KLI_MAX_EXPERTS = 4096,
    KLI_MAX_TOPK = 64,
};

enum k_mixer { KLI_MIXER_KDA = 1, KLI_MIXER_MLA = 2 };
enum k_ffn { KLI_FFN_DENSE = 1, KLI_FFN_MOE = 2 };

struct config_kda {
    int32_t n_heads;      /* linear_attn_config.num_heads */
    int32_t head_dim;     /* linear_attn_config.head_dim: key and value width per head */
    int32_t conv_size;    /* linear_attn_config.short_conv_kernel_size */
};

struct config_mla {
    int32_t n_heads;      /* num_attention_heads */
    int32_t kv_lora_rank; /* latent width cached per token */
    int32_t qk_nope_dim;  /* per-head q/k dims that go through kv_b_proj */
    int32_t qk_rope_dim;  /* per-head q dims against the shared k_pe part (never rotated) */
    int32_t v_head_dim;
};

struct config_moe {
    int32_t n_experts;         /* num_experts; 0 = no MoE layers */
    int32_t top_k;             /* num_experts_per_token */
    int32_t n_shared;          /* num_shared_experts */
    int32_t d_ff;              /* moe_intermediate_size */
    int32_t first_dense;       /* first_k_dense_replace */
    int32_t layer_freq;        /* moe_layer_freq */
    int32_t n_group;           /* num_expert_group */
    int32_t topk_group;
    int32_t sigmoid;           /* 1: sigmoid router scores; 0: softmax */
    int32_t renormalize;       /* moe_renormalize */
    float scaling;             /* routed_scaling_factor */
};

struct k_config {
    int32_t d_model;      /* hidden_size */
    int32_t n_layers;     /* num_hidden_layers */
    int32_t n_vocab;      /* vocab_size */
    int32_t d_ff;         /* intermediate_size (dense MLP layers) */
    int32_t ctx_max;      /* model_max_length */
    float norm_eps;       /* rms_norm_eps */
    int32_t tie_embeddings;
    int32_t bos, eos, pad;   /* -1 when absent */
    struct config_kda kda;
    struct config_mla mla;
    struct config_moe moe;
    enum k_mixer layer_mixer[KLI_MAX_LAYERS];
    enum k_ffn layer_ffn[KLI_MAX_LAYERS];
};

/* Parses config.json text (`len` bytes). `fname` names it in messages.
 * @return KLI_OK or KLI_E_FORMAT / KLI_E_UNSUPPORTED / KLI_E_RANGE with a message naming
 *         the key at fault. */
int hparams_parse(struct k_config *cfg, const char *text, size_t len, const char *fname,
                 struct kli_err *err);

/* Reads and parses `dir`/config.json. */
int hparams_load(struct k_config *cfg, const char *dir, struct kli_err *err);

#endif
