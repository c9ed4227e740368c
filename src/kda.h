/*
 * kda.h - Kimi Delta Attention: the token mixer of the linear-attention layers.
 */
#ifndef KLI_KDA_H
#define KLI_KDA_H

#include <stdint.h>

#include "model.h"

/* Chunk length of the chunked (prefill) form. */
#define KDA_CHUNK 64

/* Per-sequence state of one KDA layer. */
struct kda_state {
    float *S;      /* [H][K][V] recurrent state, row = key channel */
    float *conv;   /* [3][H*K][W-1] the last W-1 raw inputs of q, k, v, oldest first */
};

/* Floats of one sequence's state of one KDA layer: the recurrent state S (*n_S) and the conv
 * state (*n_conv) that struct kda_state points to. @return their sum. The one place these
 * sizes are computed: sessions, snapshots, the GPU mirrors and `kli describe` ask here. */
int64_t kda_state_floats(const struct k_config *cfg, int64_t *n_S, int64_t *n_conv);

/* Scratch for T <= batch_max tokens, allocated with the session (session.c's buffer table);
 * `chunk` holds kda_chunk_floats per thread. */
struct kda_scratch {
    float *raw[3];   /* [T][HK] projections before the convolution */
    float *qkv[3];   /* [T][HK] after conv + SiLU; q and k then L2-normalised */
    float *g;        /* [T][HK] log decay (<= 0) */
    float *beta;     /* [T][H] */
    float *low;      /* [T][max(r_f, r_g)] */
    float *gate;     /* [T][HK] output gate pre-activation */
    float *o;        /* [T][HK] attention output, then the gated norm's output */
    float *chunk;    /* [n_threads][kda_chunk_floats] chunked-form workspace */
};

/* Floats of chunk workspace one thread needs for head dims K, V. */
int64_t kda_chunk_floats(int64_t K, int64_t V);

/* Runs one KDA layer over n_seq sequences of T_seq tokens each (row s * T_seq + t of x and
 * out is token t of sequence s, whose state is st[s]): x [n_seq*T_seq][d_model] (normed
 * input) -> out, advancing every st[s]. Uses the recurrence for T_seq == 1 and the chunked
 * form otherwise. */
void kda_forward(const struct kli_model *m, const struct k_kda_w *w,
                 struct kda_state *const *st, int64_t n_seq, struct kda_scratch *sc,
                 const float *x, int64_t T_seq, float *out);

/* ==== the two forms of the delta rule, one head (exposed for tests) ====================== */

/* Exact recurrence (doc/model.md 4.6) over T tokens for one head.
 *   q, k, g: [T] rows of K values at stride ld_qk; q already scaled, q and k normalised
 *   v: [T] rows of V values at stride ld_v; beta: [T] at stride ld_b
 *   S: [K][V] state, updated in place; o: [T] rows of V at stride ld_o */
void kda_recurrent(int64_t T, int64_t K, int64_t V, const float *q, const float *k,
                   const float *v, const float *g, const float *beta, int64_t ld_qk,
                   int64_t ld_v, int64_t ld_b, float *S, float *o, int64_t ld_o);

/* The chunked form (doc/model.md 4.7): same contract, `work` holds kda_chunk_floats(K, V). */
void kda_chunked(int64_t T, int64_t K, int64_t V, const float *q, const float *k,
                 const float *v, const float *g, const float *beta, int64_t ld_qk,
                 int64_t ld_v, int64_t ld_b, float *S, float *o, int64_t ld_o, float *work);

#endif
