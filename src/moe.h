/*
 * moe.h - the mixture of experts: router, expert dispatch, shared experts.
 */
#ifndef KLI_MOE_H
#define KLI_MOE_H

#include <stdint.h>

#include "model.h"

struct moe_scratch {
    float *logits;    /* [T][E] router logits */
    int32_t *idx;     /* [T][top_k] chosen experts */
    float *wt;        /* [T][top_k] their weights */
    int32_t *order;   /* [T*top_k] (token, slot) pairs grouped by expert */
    int32_t *count;   /* [E+1] */
    float *xe;        /* [T][d_model] the tokens of one expert, gathered */
    float *ye;        /* [T][d_model] */
    float *h1, *h3;   /* [T][max d_ff] */
    float *gbuf;      /* grouped path (moe.c): x, hidden (2) and output rows of every
                         (expert, token) pair, allocated on first use; NULL: none yet */
    int64_t gcap;     /* pairs gbuf holds */
    struct backend_sess *gpu;   /* device state for this pass, or NULL */
    int layer;                  /* the layer being run, for gpu */
};

/* Chooses the experts of one token and their weights (doc/model.md 6.2, decision 1):
 * scores s = sigmoid(logits) (or softmax); selection on s + bias, group-limited when
 * n_group > 1 (group score = sum of its two best biased scores; the topk_group best groups
 * stay); the weights are the unbiased s of the chosen experts, renormalised to sum 1 when
 * `renormalize` (with +1e-20), times routed_scaling_factor. Ties go to the lower index.
 * idx, wt: [top_k], in descending order of biased score. `tmp` holds 2*E floats. */
void moe_route(const struct kli_config_moe *c, const float *logits, const float *bias,
               int32_t *idx, float *wt, float *tmp);

/* Runs one MoE layer over T tokens: x [T][d_model] -> out [T][d_model]. Tokens are grouped
 * by expert so each chosen expert runs one matrix product over its tokens. In edge mode
 * (m->xc) the routed experts come from the expert cache, whose reads can fail.
 * @return KLI_OK, or the cache's error (KLI_E_IO, with `err` set). */
int moe_forward(const struct kli_model *m, const struct kli_moe_w *w, struct moe_scratch *sc,
                const float *x, int64_t T, float *out, struct kli_err *err);

#endif
