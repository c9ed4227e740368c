/*
 * layer.h - the one place that decides where each layer of a forward pass runs: on the
 * device (backend.h), through edge mode's expert cache (xcache.h) or on the CPU. The math
 * files (kda.c, mla.c, moe.c, moe_sched.c) never ask; forward.c drives the layers through
 * these calls and never asks either.
 */
#ifndef KLI_LAYER_H
#define KLI_LAYER_H

#include <stdint.h>

#include "forward.h"

struct backend_sess;

/* One forward pass over ss[0..n_seq) with T_seq new tokens each. */
struct layer_pass {
    struct kli_session *const *ss;
    struct kli_session *s;           /* ss[0]: its scratch serves every row */
    const struct kli_model *m;
    int64_t n_seq, T_seq;
    int64_t pos[FORWARD_MAX_SEQ];    /* each sequence's position before the pass */
    int64_t longest;                 /* the longest context of the pass, in tokens */
    struct backend_sess *gs[FORWARD_MAX_SEQ];   /* the device's sessions, when gpu */
    int gpu;                         /* the device takes part in this pass */
};

/* Starts a pass: checks its size against ss[0]'s batch_max, grows the attention workspace
 * for the longest context, asks the device whether it takes part (backend_forward_begin)
 * and takes the expert cache's lock. @return KLI_OK (then layer_pass_end must follow), or
 * a negative status with nothing held. */
int layer_pass_begin(struct layer_pass *p, struct kli_session *const *ss, int64_t n_seq,
                     int64_t T_seq, struct kli_err *err);
void layer_pass_end(struct layer_pass *p);

/* Layer i's token mixer (KDA or MLA) and its FFN (dense or MoE) over x [T][d_model] of
 * ss[0]'s scratch -> y. @return KLI_OK, or a negative status (err set) after which the
 * sessions' state holds part of the pass: the caller marks them broken. */
int layer_mixer(struct layer_pass *p, int i, const float *x, float *y, struct kli_err *err);
int layer_ffn(struct layer_pass *p, int i, const float *x, float *y, struct kli_err *err);

/* y [T][n_vocab] = lm_head x [T][d_model], on the device when it holds lm_head. */
void layer_lm_head(struct layer_pass *p, const float *x, int64_t T, float *y);

#endif
