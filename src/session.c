/*
 * session.c - kli_session: the state of one sequence (KDA recurrent and conv states, the MLA
 * latent cache) and the scratch memory its evaluation needs, allocated at creation so that
 * decoding allocates nothing. Only what depends on the context grows, geometrically, as the
 * context does: the MLA cache, the token history and the attention workspace (the last also
 * when a batched step this session leads holds a longer sequence than its own).
 *
 * Every buffer is an entry of one table (session.h, struct sess_buf), built by sess_table;
 * create, free, reset, reserve, copy (reuse.c), snapshot and restore (snapshot.c) and
 * kli_session_nbytes walk it rather than naming the buffers.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "forward.h"
#include "internal.h"
#include "kda.h"
#include "mla.h"
#include "session.h"
#include "threads.h"

void
kli_session_options_init(struct kli_session_options *opt)
{
    *opt = (struct kli_session_options){.size = sizeof(*opt)};
}

enum k_dtype
session_cache_dt(int32_t type)
{
    switch (type) {
    case KLI_CACHE_F32:
        return KLI_DT_F32;
    case KLI_CACHE_BF16:
        return KLI_DT_BF16;
    case KLI_CACHE_Q8_0:
        return KLI_DT_Q8_0;
    default:
        return KLI_DT_COUNT;
    }
}

const char *
kli_cache_type_name(int32_t type)
{
    static const char *const names[] = {"f32", "bf16", "q8_0"};

    return type >= 0 && type < 3 ? names[type] : NULL;
}

uint64_t
kli_model_cache_bytes(const struct kli_model *m, int32_t type, int64_t tokens)
{
    enum k_dtype dt = session_cache_dt(type);
    uint64_t n_mla = 0;

    if (m == NULL || dt == KLI_DT_COUNT || tokens < 0)
        return 0;
    for (int i = 0; i < m->cfg.n_layers; i++)
        n_mla += m->cfg.layer_mixer[i] == KLI_MIXER_MLA;
    if (mla_row_bytes(&m->cfg, dt) == 0)
        return 0;
    /* the caches, the token history and the attention workspace (session_work_reserve) */
    return n_mla * (uint64_t)mla_row_bytes(&m->cfg, dt) * (uint64_t)tokens +
           4 * (uint64_t)tokens + 4 * (uint64_t)mla_work_floats(&m->cfg, tokens);
}

int32_t
kli_session_cache_type(const struct kli_session *s)
{
    return s->cache_type;
}

/* ==== The table of buffers ================================================================ */

void *
session_buf_ptr(const struct sess_buf *e)
{
    return e->f != NULL ? (void *)*e->f : (void *)*e->i;
}

static void
sess_buf_set(struct sess_buf *e, void *p)
{
    if (e->f != NULL)
        *e->f = p;
    else
        *e->i = p;
}

int64_t
session_state_words(const struct sess_buf *e, int64_t pos)
{
    return e->fixed + e->per_tok * pos;
}

/* A zeroed, aligned buffer of n 4-byte words (at least one), or NULL. */
static void *
sess_words(int64_t n)
{
    if (n < 0 || (uint64_t)n > SIZE_MAX / 4 / 2)
        return NULL;
    if (n == 0)
        n = 1;
    void *p = k_malloc_aligned((size_t)n * 4);
    if (p != NULL)
        memset(p, 0, (size_t)n * 4);
    return p;
}

/* Gives entry e a new zeroed buffer of `words`, keeping the first `keep` words. On failure e
 * is unchanged. */
static int
sess_buf_grow(struct sess_buf *e, int64_t words, int64_t keep)
{
    void *p = sess_words(words), *old = session_buf_ptr(e);

    if (p == NULL)
        return -1;
    if (old != NULL && keep > 0)
        memcpy(p, old, (size_t)keep * 4);
    k_free_aligned(old);
    sess_buf_set(e, p);
    e->words = words;
    return 0;
}

/* The entry whose buffer the session keeps at `where`. */
static struct sess_buf *
sess_find(struct kli_session *s, const void *where)
{
    for (int k = 0; k < s->n_buf; k++) {
        if ((const void *)s->buf[k].f == where || (const void *)s->buf[k].i == where)
            return &s->buf[k];
    }
    panic(__FILE__, __LINE__, "a session buffer outside its table");
}

/* Adds an entry to the table and allocates its `words`, unless it is SESS_LATER.
 * @return 0, or -1 when out of memory (the entry is in the table, unallocated). */
static int
sess_add(struct kli_session *s, float **f, int32_t **i, int64_t words, int64_t fixed,
         int64_t per_tok, unsigned flags)
{
    struct sess_buf *e = &s->buf[s->n_buf++];

    e->f = f;
    e->i = i;
    e->fixed = fixed;
    e->per_tok = per_tok;
    e->flags = flags;
    if (flags & SESS_STATE)
        s->n_state = s->n_buf;
    return (flags & SESS_LATER) ? 0 : sess_buf_grow(e, words, 0);
}

#define SESS_F(p, n) (bad |= sess_add(s, (p), NULL, (n), 0, 0, 0))
#define SESS_I(p, n) (bad |= sess_add(s, NULL, (p), (n), 0, 0, 0))

/* Fills s->buf and allocates what it can at creation: first the state, in snapshot order
 * (the token history, each layer's state, the logits), then the scratch. Entries with
 * SESS_LATER are allocated by session_reserve, session_work_reserve and
 * kli_session_eval_batch. @return 0, or -1 when out of memory. */
static int
sess_table(struct kli_session *s)
{
    const struct kli_model *m = s->m;
    const struct k_config *cfg = &m->cfg;
    int64_t B = s->batch_max, D = cfg->d_model, nl = cfg->n_layers;
    int64_t H = cfg->kda.n_heads, K = cfg->kda.head_dim, HK = H * K;
    /* the low-rank gate inputs: f and g side by side (kda.c fuses them for short batches) */
    int64_t low = m->kda_rank_f + m->kda_rank_g;
    int64_t Hm = cfg->mla.n_heads, dqk = cfg->mla.qk_nope_dim + cfg->mla.qk_rope_dim;
    int64_t row = mla_row_floats(cfg), row_words = mla_row_bytes(cfg, s->mla_sc.cache_dt) / 4;
    int64_t E = cfg->moe.n_experts, top = cfg->moe.top_k;
    int64_t dff = cfg->d_ff, mff = (int64_t)cfg->moe.d_ff;
    int64_t n_S, n_conv;
    int bad = 0;

    if ((int64_t)cfg->moe.d_ff * cfg->moe.n_shared > mff)
        mff = (int64_t)cfg->moe.d_ff * cfg->moe.n_shared;
    kda_state_floats(cfg, &n_S, &n_conv);
    s->buf = k_calloc((size_t)(2 * nl + 48), sizeof(*s->buf));
    if (s->buf == NULL)
        return -1;

    /* state */
    bad |= sess_add(s, NULL, &s->hist, 0, 0, 1, SESS_STATE | SESS_LATER);
    for (int i = 0; i < nl; i++) {
        if (cfg->layer_mixer[i] == KLI_MIXER_KDA) {
            bad |= sess_add(s, &s->kda[i].S, NULL, n_S, n_S, 0, SESS_STATE);
            bad |= sess_add(s, &s->kda[i].conv, NULL, n_conv, n_conv, 0, SESS_STATE);
        } else {
            bad |= sess_add(s, &s->cache[i], NULL, 0, 0, row_words,
                            SESS_STATE | SESS_LATER);
        }
    }
    bad |= sess_add(s, &s->logits, NULL, cfg->n_vocab, cfg->n_vocab, 0,
                    SESS_STATE | SESS_LOGITS);

    /* scratch for batch_max tokens */
    bad |= sess_add(s, &s->batch_logits, NULL, 0, 0, 0, SESS_LATER);   /* [B][n_vocab] */
    bad |= sess_add(s, &s->mla_sc.work, NULL, 0, 0, 0, SESS_LATER);
    SESS_F(&s->h, B * D);
    SESS_F(&s->x, B * D);
    SESS_F(&s->y, B * D);
    SESS_F(&s->ffn_h1, B * (dff > 0 ? dff : 1));
    SESS_F(&s->ffn_h3, B * (dff > 0 ? dff : 1));
    for (int p = 0; p < 3; p++) {
        SESS_F(&s->kda_sc.raw[p], B * HK);
        SESS_F(&s->kda_sc.qkv[p], B * HK);
    }
    SESS_F(&s->kda_sc.g, B * HK);
    SESS_F(&s->kda_sc.beta, B * H);
    SESS_F(&s->kda_sc.low, B * (low > 0 ? low : 1));
    SESS_F(&s->kda_sc.gate, B * HK);
    SESS_F(&s->kda_sc.o, B * HK);
    SESS_F(&s->kda_sc.chunk, s->n_threads * kda_chunk_floats(K, K));
    SESS_F(&s->mla_sc.q, B * Hm * dqk);
    SESS_F(&s->mla_sc.ckv, B * row);
    SESS_F(&s->mla_sc.o, B * Hm * cfg->mla.v_head_dim);
    SESS_F(&s->mla_sc.qfull, B * Hm * row);
    SESS_F(&s->mla_sc.lat, B * Hm * cfg->mla.kv_lora_rank);
    if (s->mla_sc.cache_dt != KLI_DT_F32)
        SESS_F(&s->mla_sc.part, s->n_threads * mla_part_floats(cfg));
    if (E > 0) {
        SESS_F(&s->moe_sc.logits, B * E);
        SESS_F(&s->moe_sc.wt, B * top);
        SESS_F(&s->moe_sc.xe, B * D);
        SESS_F(&s->moe_sc.ye, B * D);
        SESS_F(&s->moe_sc.h1, B * mff);
        SESS_F(&s->moe_sc.h3, B * mff);
        SESS_I(&s->moe_sc.idx, B * top);
        SESS_I(&s->moe_sc.order, B * top);
        SESS_I(&s->moe_sc.count, E + 1);
    }
    KLI_ASSERT(s->n_buf <= 2 * nl + 48);
    return bad ? -1 : 0;
}

#undef SESS_F
#undef SESS_I

void
kli_session_free(struct kli_session *s)
{
    if (s == NULL)
        return;
    backend_sess_free(s);
    for (int k = 0; k < s->n_buf; k++)
        k_free_aligned(session_buf_ptr(&s->buf[k]));
    k_free_aligned(s->moe_sc.gbuf);   /* grown by moe.c */
    free(s->buf);
    free(s->kda);
    free(s->cache);
    free(s);
}

int
session_work_reserve(struct kli_session *s, int64_t n, struct kli_err *err)
{
    int64_t have = s->mla_sc.work_n, want = n;

    if (n <= have)
        return KLI_OK;
    /* geometric, so that a batch whose longest sequence grows a token a step seldom grows it,
     * but no further than the session's own context where that is enough */
    if (2 * have > want)
        want = 2 * have;
    if (n <= s->ctx_max && want > s->ctx_max)
        want = s->ctx_max;
    int64_t ws = mla_work_floats(&s->m->cfg, want);
    if (ws > INT64_MAX / 8 || sess_buf_grow(sess_find(s, &s->mla_sc.work), ws, 0) != 0)
        return err_set(err, KLI_E_NOMEM, "out of memory for the attention workspace of "
                           "%lld tokens", (long long)want);
    s->mla_sc.work_stride = ws;
    s->mla_sc.work_n = want;
    return KLI_OK;
}

int
session_reserve(struct kli_session *s, int64_t n, struct kli_err *err)
{
    int64_t cap = s->cache_cap;

    if (n <= cap)
        return KLI_OK;
    if (cap == 0)
        cap = 256;
    while (cap < n)
        cap *= 2;
    if (cap > s->ctx_max)
        cap = s->ctx_max;
    /* the MLA caches and the token history: rows [0,pos) move to the larger buffer */
    for (int k = 0; k < s->n_state; k++) {
        struct sess_buf *e = &s->buf[k];
        if (e->per_tok == 0)
            continue;
        if (sess_buf_grow(e, e->per_tok * cap, e->per_tok * s->pos) != 0)
            return err_set(err, KLI_E_NOMEM, "out of memory growing the %s to %lld "
                               "tokens", e->i != NULL ? "token history" : "MLA cache",
                               (long long)cap);
    }
    int rc = session_work_reserve(s, cap, err);
    if (rc != KLI_OK)
        return rc;
    s->cache_cap = cap;
    return KLI_OK;
}

int
kli_session_create(struct kli_session **out, const struct kli_model *m,
                   const struct kli_session_options *opt, struct kli_err *err)
{
    struct kli_session_options dflt;
    const struct k_config *cfg;
    struct kli_session *s;

    if (out == NULL || m == NULL)
        return err_set(err, KLI_E_INVALID, "kli_session_create: NULL argument");
    *out = NULL;
    if ((opt = OPTS_TAKE(kli_session_options_init, dflt, opt, "kli_session_create", err)) == NULL)
        return KLI_E_INVALID;
    cfg = &m->cfg;
    if (opt->ctx_max < 0 || opt->batch_max < 0)
        return err_set(err, KLI_E_RANGE, "session: negative ctx_max or batch_max");
    if (cfg->kda.head_dim > 1024)
        return err_set(err, KLI_E_UNSUPPORTED, "session: KDA head_dim %d exceeds 1024",
                           cfg->kda.head_dim);
    enum k_dtype cdt = session_cache_dt(opt->cache_type);
    if (cdt == KLI_DT_COUNT)
        return err_set(err, KLI_E_INVALID, "session: cache type %d is none of f32 (%d), bf16 "
                           "(%d), q8_0 (%d)", opt->cache_type, KLI_CACHE_F32, KLI_CACHE_BF16,
                           KLI_CACHE_Q8_0);
    if (mla_row_bytes(cfg, cdt) == 0)
        return err_set(err, KLI_E_UNSUPPORTED, "session: a %s latent cache cannot hold this "
                           "model's rows of %d latent + %d rope values (bf16 needs an even "
                           "row; q8_0 both parts in blocks of 32, an even number of them)",
                           kli_cache_type_name(opt->cache_type), cfg->mla.kv_lora_rank,
                           cfg->mla.qk_rope_dim);
    s = k_calloc(1, sizeof(*s));
    if (s == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    s->m = m;
    s->ctx_max = opt->ctx_max > 0 ? opt->ctx_max : cfg->ctx_max;
    s->batch_max = opt->batch_max > 0 ? opt->batch_max : 256;
    s->n_threads = threads_count();
    s->cache_type = opt->cache_type;
    s->mla_sc.cache_dt = session_cache_dt(opt->cache_type);

    s->kda = k_calloc((size_t)cfg->n_layers, sizeof(*s->kda));
    s->cache = k_calloc((size_t)cfg->n_layers, sizeof(*s->cache));
    if (s->kda == NULL || s->cache == NULL || sess_table(s) != 0)
        goto nomem;
    if (session_reserve(s, 1, err) != KLI_OK || backend_sess_create(s, err) != KLI_OK) {
        kli_session_free(s);
        return KLI_E_NOMEM;
    }
    *out = s;
    return KLI_OK;
nomem:
    kli_session_free(s);
    return err_set(err, KLI_E_NOMEM, "out of memory creating a session");
}

void
kli_session_reset(struct kli_session *s)
{
    for (int k = 0; k < s->n_state; k++) {
        const struct sess_buf *e = &s->buf[k];
        if (e->fixed > 0)
            memset(session_buf_ptr(e), 0, (size_t)e->fixed * 4);
    }
    s->pos = 0;
    s->has_logits = 0;
    s->broken = 0;
    backend_sess_written(s);
}

int
kli_session_eval(struct kli_session *s, const kli_token *tokens, int32_t n, float *logits,
                 struct kli_err *err)
{
    int rc;

    if (s == NULL || (tokens == NULL && n > 0) || n < 0)
        return err_set(err, KLI_E_INVALID, "kli_session_eval: invalid arguments");
    if (n == 0)
        return KLI_OK;
    for (int32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= s->m->cfg.n_vocab)
            return err_set(err, KLI_E_RANGE,
                               "token id %d at position %d is outside the vocabulary [0, %d)",
                               tokens[i], i, s->m->cfg.n_vocab);
    }
    if (s->broken)
        return err_set(err, KLI_E_INVALID, "the session's state is incomplete after a "
                           "failed step: reset it or restore a snapshot");
    if ((int64_t)s->pos + n > s->ctx_max)
        return err_set(err, KLI_E_RANGE,
                           "context full: %d tokens seen + %d new exceed the limit of %d",
                           s->pos, n, s->ctx_max);
    if (threads_count() > s->n_threads)
        return err_set(err, KLI_E_INVALID,
                           "the thread count grew to %d after this session was created for %d",
                           threads_count(), s->n_threads);
    if ((rc = session_reserve(s, (int64_t)s->pos + n, err)) != KLI_OK)
        return rc;
    int64_t V = s->m->cfg.n_vocab;
    for (int32_t i = 0; i < n; i += s->batch_max) {
        int32_t T = n - i < s->batch_max ? n - i : s->batch_max;
        memcpy(s->hist + s->pos, tokens + i, (size_t)T * sizeof(kli_token));
        if ((rc = forward_batch(s, tokens + i, T, logits != NULL ? logits + (int64_t)i * V :
                                NULL, err)) != KLI_OK)
            return rc;
    }
    return KLI_OK;
}

int
kli_session_eval_batch(struct kli_session *const *ss, const kli_token *tokens, int32_t n,
                       struct kli_err *err)
{
    int rc;

    if (ss == NULL || tokens == NULL || n < 1)
        return err_set(err, KLI_E_INVALID, "kli_session_eval_batch: invalid arguments");
    struct kli_session *s0 = ss[0];
    if (n > s0->batch_max || n > FORWARD_MAX_SEQ)
        return err_set(err, KLI_E_RANGE, "a batched step of %d sequences exceeds the "
                           "first session's batch_max %d (or %d)", n, s0->batch_max,
                           FORWARD_MAX_SEQ);
    for (int32_t i = 0; i < n; i++) {
        const struct kli_session *s = ss[i];
        if (s == NULL || s->m != s0->m)
            return err_set(err, KLI_E_INVALID, "batched step: session %d is NULL or of "
                               "another model", i);
        for (int32_t k = 0; k < i; k++) {
            if (ss[k] == s)
                return err_set(err, KLI_E_INVALID, "batched step: session %d appears "
                                   "twice", i);
        }
        if (tokens[i] < 0 || tokens[i] >= s->m->cfg.n_vocab)
            return err_set(err, KLI_E_RANGE, "batched step: token id %d of sequence %d is "
                               "outside the vocabulary [0, %d)", tokens[i], i,
                               s->m->cfg.n_vocab);
        if (s->pos + 1 > s->ctx_max)
            return err_set(err, KLI_E_RANGE, "batched step: sequence %d is full (%d "
                               "tokens)", i, s->pos);
        if (s->cache_type != s0->cache_type)
            return err_set(err, KLI_E_INVALID, "batched step: sequence %d has a %s cache, "
                               "sequence 0 a %s one", i, kli_cache_type_name(s->cache_type),
                               kli_cache_type_name(s0->cache_type));
        if (s->broken)
            return err_set(err, KLI_E_INVALID, "batched step: sequence %d's state is "
                               "incomplete after a failed step: reset it or restore a "
                               "snapshot", i);
    }
    if (threads_count() > s0->n_threads)
        return err_set(err, KLI_E_INVALID,
                           "the thread count grew to %d after this session was created for %d",
                           threads_count(), s0->n_threads);
    if (s0->batch_logits == NULL &&
        sess_buf_grow(sess_find(s0, &s0->batch_logits),
                      (int64_t)s0->batch_max * s0->m->cfg.n_vocab, 0) != 0)
        return err_set(err, KLI_E_NOMEM, "out of memory for batched logits");
    for (int32_t i = 0; i < n; i++) {
        if ((rc = session_reserve(ss[i], (int64_t)ss[i]->pos + 1, err)) != KLI_OK)
            return rc;
    }
    for (int32_t i = 0; i < n; i++)
        ss[i]->hist[ss[i]->pos] = tokens[i];
    return forward_run(ss, n, tokens, 1, s0->batch_logits, err);
}

const float *
kli_session_logits(const struct kli_session *s)
{
    return s->has_logits ? s->logits : NULL;
}

int32_t
kli_session_pos(const struct kli_session *s)
{
    return s->pos;
}

int32_t
kli_session_tokens(const struct kli_session *s, const kli_token **out)
{
    if (out != NULL)
        *out = s->hist;
    return s->pos;
}

void
kli_session_phase_seconds(const struct kli_session *s, double out[KLI_PHASE_COUNT])
{
    memcpy(out, s->phase, sizeof(s->phase));
}

void
kli_session_reset_timers(struct kli_session *s)
{
    memset(s->phase, 0, sizeof(s->phase));
}

const struct kli_model *
kli_session_model(const struct kli_session *s)
{
    return s->m;
}

int
kli_session_pad(struct kli_session *s, int32_t n, struct kli_err *err)
{
    int rc;

    if (s == NULL || n < 0 || s->pos < 1 || s->broken)
        return err_set(err, KLI_E_INVALID, "kli_session_pad: a session with tokens and "
                           "n >= 0 needed");
    if ((int64_t)s->pos + n > s->ctx_max)
        return err_set(err, KLI_E_RANGE, "kli_session_pad: %d tokens + %d exceed the "
                           "context of %d", s->pos, n, s->ctx_max);
    if ((rc = session_reserve(s, (int64_t)s->pos + n, err)) != KLI_OK)
        return rc;
    if ((rc = backend_sess_pull(s, err)) != KLI_OK)
        return rc;
    /* the rows per token of every growing entry (history, MLA caches), repeated from 0 */
    for (int k = 0; k < s->n_state; k++) {
        const struct sess_buf *e = &s->buf[k];
        uint8_t *p = session_buf_ptr(e);
        size_t row = (size_t)e->per_tok * 4;
        for (int64_t t = s->pos; row > 0 && t < (int64_t)s->pos + n; t++)
            memcpy(p + (size_t)t * row, p + (size_t)(t % s->pos) * row, row);
    }
    s->pos += n;
    backend_sess_written(s);
    return KLI_OK;
}
