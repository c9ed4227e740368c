/*
 * mla.h - NoPE multi-head latent attention: the token mixer of the full-attention layers.
 */
#ifndef KLI_MLA_H
#define KLI_MLA_H

#include <stdint.h>

#include "model.h"

/* Scratch for T <= batch_max tokens. */
struct mla_scratch {
    float *q;      /* [T][H*(nope+rope)] */
    float *ckv;    /* [T][L+rope] */
    float *o;      /* [T][H*v] */
    float *qfull;  /* [T][H][L+rope]: absorbed query (W_UK^T q_nope) followed by q_pe */
    float *lat;    /* [T][H][L]: attention-weighted latent per head */
    float *work;   /* [work_stride]: the scores [H][n] of the matrix form */
    int64_t work_stride;               /* mla_work_floats(work_n) */
    int64_t work_n;                    /* the longest context `work` serves, in tokens */
    enum k_dtype cache_dt;             /* how the caches store rows: F32, BF16 or Q8_0 */
    float *part;                       /* [n_threads][mla_part_floats]: narrow caches' sums */
};

/* Floats of one token's row of the latent cache: the normalised latent c^ and k_pe. The one
 * place this size is computed. */
int64_t mla_row_floats(const struct k_config *cfg);

/* Bytes of one token's row of the latent cache stored as dt (F32, BF16 or Q8_0), or 0 when
 * the model's rows cannot be: Q8_0 needs the latent and k_pe in whole blocks of 32 and rows
 * of whole 4-byte words (an even number of blocks), as the session's buffers are words. */
int64_t mla_row_bytes(const struct k_config *cfg, enum k_dtype dt);

/* Floats of sc->part per thread: a narrow cache's one-pass attention state (running max,
 * sum and weighted latents of every head), its widened tile of rows and their scores. */
int64_t mla_part_floats(const struct k_config *cfg);

/* Floats of attention workspace for a context of n tokens. */
int64_t mla_work_floats(const struct k_config *cfg, int64_t n);

/* Runs one MLA layer on the CPU over n_seq sequences of T_seq tokens (row s * T_seq + t of
 * x is token t of sequence s). caches[s] [pos[s]+T_seq][L+rope] holds, per token, the
 * normalised latent c^ (L values) and the raw k_pe (rope values), each row stored as
 * sc->cache_dt (mla_row_bytes); the new entries are written at rows pos[s].. of each,
 * converted once there. x [n_seq*T_seq][d_model] -> out. The workspace must
 * serve the longest sequence (mla_work_ok; forward_run grows it through
 * session_work_reserve before the step). It is the three steps below in order; the layer
 * dispatcher (layer.c) runs the same steps and may hand the attention, or the whole layer,
 * to a device instead.
 * @return 0, or -1 (nothing done) when the workspace is too small. */
int mla_forward(const struct kli_model *m, const struct k_mla_w *w, float *const *caches,
                const int64_t *pos, int64_t n_seq, struct mla_scratch *sc, const float *x,
                int64_t T_seq, float *out);

/* @return 1 when sc's workspace serves pos[s] + T_seq tokens for every s, else 0. */
int mla_work_ok(const struct mla_scratch *sc, const int64_t *pos, int64_t n_seq,
                int64_t T_seq);

/* Step 1: q and the compressed kv of every row; the new cache rows written; the absorbed
 * queries (W_UK^T q_nope, then q_pe) in sc->qfull [T][H][L+rope]. */
void mla_project(const struct kli_model *m, const struct k_mla_w *w, float *const *caches,
                 const int64_t *pos, int64_t n_seq, struct mla_scratch *sc, const float *x,
                 int64_t T_seq);
/* Step 2: latent attention, sc->qfull -> sc->lat [T][H][L] (each row over its causal
 * prefix of its sequence's cache). */
void mla_attend(const struct kli_model *m, float *const *caches, const int64_t *pos,
                int64_t n_seq, struct mla_scratch *sc, int64_t T_seq);
/* Step 3: o[h] = W_UV[h] lat[h], then out [T][d_model] = o_proj o. */
void mla_output(const struct kli_model *m, const struct k_mla_w *w, struct mla_scratch *sc,
                int64_t T, float *out);

/* Attention for one query row and head, two ways (exposed for tests).
 *   absorbed: scores against the latent cache directly (doc/model.md 5.2)
 *   expanded: K and V rebuilt per cached token through kv_b (doc/model.md 5.1), the
 *             reference form; `work` needs mla_work_floats as well.
 * q: [nope+rope] this head's query; attends to cache rows [0, n); o: [v]. */
void mla_attend_absorbed(const struct kli_model *m, const struct k_mla_w *w,
                         const float *cache, int64_t n, int64_t h, const float *q, float *o,
                         float *work);
void mla_attend_expanded(const struct kli_model *m, const struct k_mla_w *w,
                         const float *cache, int64_t n, int64_t h, const float *q, float *o,
                         float *work);

#endif
