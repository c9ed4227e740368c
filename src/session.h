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

/* One buffer a session owns. Every buffer is in the session's table (kli_session.buf), which
 * drives create, free, reset, copy, snapshot and kli_session_nbytes: a buffer added to the
 * session is added to the table (session.c, sess_table), and every one of those follows.
 * Buffers hold 4-byte words: floats (f) or int32 (i); exactly one of f and i is set. */
struct sess_buf {
    float **f;          /* where the session keeps the buffer */
    int32_t **i;
    int64_t words;      /* allocated; 0 while not (yet) allocated */
    int64_t fixed;      /* state: words that do not depend on the context */
    int64_t per_tok;    /* state: words per token; rows [0,pos) are valid (the capacity is
                           cache_cap rows) */
    unsigned flags;     /* SESS_STATE, SESS_LOGITS */
};

enum {
    SESS_STATE = 1,     /* the sequence's state: saved, copied, restored; the fixed part is
                           zeroed by reset. State entries come first, in snapshot order. */
    SESS_LOGITS = 2,    /* state kept only while has_logits */
    SESS_LATER = 4,     /* allocated when first needed, not at creation: what grows with the
                           context (session_reserve, session_work_reserve) and the batched
                           logits (kli_session_eval_batch) */
};

struct kli_session {
    const struct kli_model *m;
    int32_t ctx_max, batch_max;
    int32_t pos;                  /* tokens seen */
    int n_threads;                /* per-thread scratch is sized for this many */
    int32_t cache_type;           /* enum kli_cache_type; mla_sc.cache_dt its dtype */

    /* state */
    struct kda_state *kda;        /* [n_layers]; empty for MLA layers */
    float **cache;                /* [n_layers] MLA latent cache [cache_cap][L+rope], rows of
                                     mla_row_bytes as mla_sc.cache_dt */
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

    struct sess_buf *buf;         /* [n_buf] every buffer above, state entries first */
    int n_buf, n_state;
    int64_t work_ctx;             /* tokens of context the attention workspace serves */
    struct kli_imatrix *imat;     /* NULL, or the collector each step adds to (imatrix.h) */
};

/* The dtype of a cache type (enum kli_cache_type), KLI_DT_COUNT for another value. */
enum k_dtype session_cache_dt(int32_t type);

/* Grows the MLA cache, the token history (and attention workspace) to hold `n` tokens. */
int session_reserve(struct kli_session *s, int64_t n, struct kli_err *err);

/* Grows s's attention workspace (mla_scratch.work) to serve a context of at least `n` tokens,
 * geometrically; a batched step whose scratch is s's calls it for its longest sequence.
 * @return KLI_OK or KLI_E_NOMEM (s unchanged). */
int session_work_reserve(struct kli_session *s, int64_t n, struct kli_err *err);

/* Words of state entry e with `pos` tokens in the session. */
int64_t session_state_words(const struct sess_buf *e, int64_t pos);

/* The address of e's buffer. */
void *session_buf_ptr(const struct sess_buf *e);

#endif
