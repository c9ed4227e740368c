/*
 * session.h - per-sequence state and the scratch memory of one session.
 */
#ifndef KLI_SESSION_H
#define KLI_SESSION_H

#include <stdint.h>

#include "kda.h"
#include "mla.h"
#include "model.h"
#include "moe.h"

struct kli_session {
    const struct kli_model *m;
    int32_t ctx_max, batch_max;
    int32_t pos;                  /* tokens seen */
    int n_threads;                /* per-thread scratch is sized for this many */

    /* state */
    struct kda_state *kda;        /* [n_layers]; empty for MLA layers */
    float **cache;                /* [n_layers] MLA latent cache [cache_cap][L+rope] */
    int64_t cache_cap;
    kli_token *hist;              /* [cache_cap] the ids seen, rows [0,pos) valid */
    float *batch_logits;          /* [batch_max][n_vocab], allocated by the first batched
                                     step this session leads (kli_session_eval_batch) */

    /* scratch for batch_max tokens */
    float *h;                     /* [B][d_model] residual stream */
    float *x;                     /* [B][d_model] normed input of a block */
    float *y;                     /* [B][d_model] block output */
    float *ffn_h1, *ffn_h3;       /* [B][d_ff] dense MLP hidden */
    struct kda_scratch kda_sc;
    struct mla_scratch mla_sc;
    struct moe_scratch moe_sc;
    float *logits;                /* [n_vocab] of the last position */
    int has_logits;
    int broken;                   /* a forward step failed part-way (edge mode's reads): the
                                     state is incomplete until reset or restored */
    double phase[KLI_PHASE_COUNT];   /* seconds per part of the forward pass */
    struct backend_sess *gpu;     /* device queue and cache mirrors; NULL: CPU only */
};

/* Grows the MLA cache, the token history (and attention workspace) to hold `n` tokens. */
int session_reserve(struct kli_session *s, int64_t n, struct kli_err *err);

#endif
