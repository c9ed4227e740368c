/*
 * moe.h - the mixture of experts: the router and the grouping of rows by expert (the
 * schedules that compute the experts are moe_sched.h's).
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
};

/* Chooses the experts of one token and their weights (doc/model.md 6.2, decision 1):
 * scores s = sigmoid(logits) (or softmax); selection on s + bias, group-limited when
 * n_group > 1 (group score = sum of its two best biased scores; the topk_group best groups
 * stay); the weights are the unbiased s of the chosen experts, renormalised to sum 1 when
 * `renormalize` (with +1e-20), times routed_scaling_factor. Ties go to the lower index.
 * idx, wt: [top_k], in descending order of biased score. `tmp` holds 2*E floats. */
void moe_route(const struct config_moe *c, const float *logits, const float *bias,
               int32_t *idx, float *wt, float *tmp);

/* Routes T rows of x: router logits, then moe_route per row into sc->idx and sc->wt, then a
 * counting sort of the (row, slot) pairs by expert into sc->order, with expert e's pairs at
 * [sc->count[e], sc->count[e+1]). */
void moe_route_rows(const struct kli_model *m, const struct moe_w *w,
                    struct moe_scratch *sc, const float *x, int64_t T);

/* Edge mode: applies the router of the next MoE layer after `layer` to x (a guess at what it
 * will choose) and starts the expert cache's reads of those experts (xcache_prefetch). Only
 * for a few rows (T <= 8): a long prefill asks for most experts anyway. */
void moe_prefetch(const struct kli_model *m, int layer, struct moe_scratch *sc, const float *x,
                  int64_t T);

/* One MoE layer over T rows on the CPU with resident weights: x [T][d_model] -> out.
 * moe_route_rows, then moe_sched_cpu over every expert. (The layer dispatcher, layer.c, runs
 * the same steps, or hands part of them to a device or the expert cache.) */
void moe_forward(const struct kli_model *m, const struct moe_w *w, struct moe_scratch *sc,
                 const float *x, int64_t T, float *out);

#endif
