/*
 * session.c - kli_session: the state of one sequence (KDA recurrent and conv states, the MLA
 * latent cache) and the scratch memory its evaluation needs, allocated at creation so that
 * decoding allocates nothing. Only the MLA cache grows, geometrically, as the context does.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "forward.h"
#include "internal.h"
#include "session.h"
#include "threads.h"

void
kli_session_options_init(struct kli_session_options *opt)
{
    memset(opt, 0, sizeof(*opt));
}

/* A zeroed, aligned float buffer of n elements, or NULL. */
static float *
sess_floats(int64_t n)
{
    if (n < 0 || (uint64_t)n > SIZE_MAX / sizeof(float) / 2)
        return NULL;
    float *p = kli_malloc_aligned((size_t)n * sizeof(float));
    if (p != NULL)
        memset(p, 0, (size_t)n * sizeof(float));
    return p;
}

void
kli_session_free(struct kli_session *s)
{
    if (s == NULL)
        return;
    backend_sess_free(s);
    if (s->kda != NULL) {
        for (int i = 0; i < s->m->cfg.n_layers; i++) {
            kli_free_aligned(s->kda[i].S);
            kli_free_aligned(s->kda[i].conv);
        }
    }
    if (s->cache != NULL) {
        for (int i = 0; i < s->m->cfg.n_layers; i++)
            kli_free_aligned(s->cache[i]);
    }
    free(s->kda);
    free(s->cache);
    free(s->hist);
    float *bufs[] = {s->batch_logits, s->h, s->x, s->y, s->ffn_h1, s->ffn_h3, s->logits,
                     s->kda_sc.raw[0], s->kda_sc.raw[1], s->kda_sc.raw[2],
                     s->kda_sc.qkv[0], s->kda_sc.qkv[1], s->kda_sc.qkv[2],
                     s->kda_sc.g, s->kda_sc.beta, s->kda_sc.low, s->kda_sc.gate, s->kda_sc.o,
                     s->kda_sc.chunk, s->mla_sc.q, s->mla_sc.ckv, s->mla_sc.o, s->mla_sc.work,
                     s->mla_sc.qfull, s->mla_sc.lat,
                     s->moe_sc.logits, s->moe_sc.wt, s->moe_sc.xe, s->moe_sc.ye,
                     s->moe_sc.h1, s->moe_sc.h3};
    for (size_t i = 0; i < KLI_ARRAY_LEN(bufs); i++)
        kli_free_aligned(bufs[i]);
    kli_free_aligned(s->moe_sc.gbuf);
    free(s->moe_sc.idx);
    free(s->moe_sc.order);
    free(s->moe_sc.count);
    free(s);
}

int
session_reserve(struct kli_session *s, int64_t n, struct kli_err *err)
{
    const struct kli_config *cfg = &s->m->cfg;
    int64_t stride = (int64_t)cfg->mla.kv_lora_rank + cfg->mla.qk_rope_dim;
    int64_t cap = s->cache_cap;

    if (n <= cap)
        return KLI_OK;
    if (cap == 0)
        cap = 256;
    while (cap < n)
        cap *= 2;
    if (cap > s->ctx_max)
        cap = s->ctx_max;
    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_mixer[i] != KLI_MIXER_MLA)
            continue;
        float *p = sess_floats(cap * stride);
        if (p == NULL)
            return kli_err_set(err, KLI_E_NOMEM, "out of memory growing the MLA cache to %lld "
                               "tokens", (long long)cap);
        if (s->cache[i] != NULL)
            memcpy(p, s->cache[i], (size_t)(s->pos * stride) * sizeof(float));
        kli_free_aligned(s->cache[i]);
        s->cache[i] = p;
    }
    kli_token *hist = kli_reallocarray(s->hist, (size_t)cap, sizeof(kli_token));
    if (hist == NULL)
        return kli_err_set(err, KLI_E_NOMEM, "out of memory growing the token history to %lld "
                           "tokens", (long long)cap);
    s->hist = hist;
    int64_t ws = mla_work_floats(cfg, cap);
    float *w = sess_floats(ws * s->n_threads);
    if (w == NULL)
        return kli_err_set(err, KLI_E_NOMEM, "out of memory for attention workspace");
    kli_free_aligned(s->mla_sc.work);
    s->mla_sc.work = w;
    s->mla_sc.work_stride = ws;
    s->cache_cap = cap;
    return KLI_OK;
}

int
kli_session_create(struct kli_session **out, const struct kli_model *m,
                   const struct kli_session_options *opt, struct kli_err *err)
{
    struct kli_session_options dflt;
    const struct kli_config *cfg;
    struct kli_session *s;

    if (out == NULL || m == NULL)
        return kli_err_set(err, KLI_E_INVALID, "kli_session_create: NULL argument");
    *out = NULL;
    if (opt == NULL) {
        kli_session_options_init(&dflt);
        opt = &dflt;
    }
    cfg = &m->cfg;
    if (opt->ctx_max < 0 || opt->batch_max < 0)
        return kli_err_set(err, KLI_E_RANGE, "session: negative ctx_max or batch_max");
    if (cfg->kda.head_dim > 1024)
        return kli_err_set(err, KLI_E_UNSUPPORTED, "session: KDA head_dim %d exceeds 1024",
                           cfg->kda.head_dim);
    s = kli_calloc(1, sizeof(*s));
    if (s == NULL)
        return kli_err_set(err, KLI_E_NOMEM, "out of memory");
    s->m = m;
    s->ctx_max = opt->ctx_max > 0 ? opt->ctx_max : cfg->ctx_max;
    s->batch_max = opt->batch_max > 0 ? opt->batch_max : 256;
    s->n_threads = threads_count();

    int64_t B = s->batch_max, D = cfg->d_model, nl = cfg->n_layers;
    int64_t H = cfg->kda.n_heads, K = cfg->kda.head_dim, HK = H * K;
    /* the low-rank gate inputs: f and g side by side (kda.c fuses them for short batches) */
    int64_t low = m->kda_rank_f + m->kda_rank_g;
    int64_t Hm = cfg->mla.n_heads, dqk = cfg->mla.qk_nope_dim + cfg->mla.qk_rope_dim;
    int64_t stride = (int64_t)cfg->mla.kv_lora_rank + cfg->mla.qk_rope_dim;
    int64_t E = cfg->moe.n_experts, top = cfg->moe.top_k;
    int64_t dff = cfg->d_ff, mff = (int64_t)cfg->moe.d_ff;
    if ((int64_t)cfg->moe.d_ff * cfg->moe.n_shared > mff)
        mff = (int64_t)cfg->moe.d_ff * cfg->moe.n_shared;

    s->kda = kli_calloc((size_t)nl, sizeof(*s->kda));
    s->cache = kli_calloc((size_t)nl, sizeof(*s->cache));
    if (s->kda == NULL || s->cache == NULL)
        goto nomem;
    for (int i = 0; i < nl; i++) {
        if (cfg->layer_mixer[i] != KLI_MIXER_KDA)
            continue;
        s->kda[i].S = sess_floats(H * K * K);
        s->kda[i].conv = sess_floats(3 * HK * (cfg->kda.conv_size - 1) + 1);
        if (s->kda[i].S == NULL || s->kda[i].conv == NULL)
            goto nomem;
    }
    s->h = sess_floats(B * D);
    s->x = sess_floats(B * D);
    s->y = sess_floats(B * D);
    s->ffn_h1 = sess_floats(B * (dff > 0 ? dff : 1));
    s->ffn_h3 = sess_floats(B * (dff > 0 ? dff : 1));
    s->logits = sess_floats(cfg->n_vocab);
    if (!s->h || !s->x || !s->y || !s->ffn_h1 || !s->ffn_h3 || !s->logits)
        goto nomem;
    for (int p = 0; p < 3; p++) {
        s->kda_sc.raw[p] = sess_floats(B * HK);
        s->kda_sc.qkv[p] = sess_floats(B * HK);
        if (!s->kda_sc.raw[p] || !s->kda_sc.qkv[p])
            goto nomem;
    }
    s->kda_sc.g = sess_floats(B * HK);
    s->kda_sc.beta = sess_floats(B * H);
    s->kda_sc.low = sess_floats(B * (low > 0 ? low : 1));
    s->kda_sc.gate = sess_floats(B * HK);
    s->kda_sc.o = sess_floats(B * HK);
    s->kda_sc.chunk = sess_floats(s->n_threads * kda_chunk_floats(K, K));
    s->mla_sc.q = sess_floats(B * Hm * dqk);
    s->mla_sc.ckv = sess_floats(B * stride);
    s->mla_sc.o = sess_floats(B * Hm * cfg->mla.v_head_dim);
    s->mla_sc.qfull = sess_floats(B * Hm * stride);
    s->mla_sc.lat = sess_floats(B * Hm * cfg->mla.kv_lora_rank);
    if (!s->kda_sc.g || !s->kda_sc.beta || !s->kda_sc.low || !s->kda_sc.gate || !s->kda_sc.o ||
        !s->kda_sc.chunk || !s->mla_sc.q || !s->mla_sc.ckv || !s->mla_sc.o ||
        !s->mla_sc.qfull || !s->mla_sc.lat)
        goto nomem;
    if (E > 0) {
        s->moe_sc.logits = sess_floats(B * E);
        s->moe_sc.wt = sess_floats(B * top);
        s->moe_sc.xe = sess_floats(B * D);
        s->moe_sc.ye = sess_floats(B * D);
        s->moe_sc.h1 = sess_floats(B * mff);
        s->moe_sc.h3 = sess_floats(B * mff);
        s->moe_sc.idx = kli_mallocarray((size_t)(B * top), sizeof(int32_t));
        s->moe_sc.order = kli_mallocarray((size_t)(B * top), sizeof(int32_t));
        s->moe_sc.count = kli_mallocarray((size_t)(E + 1), sizeof(int32_t));
        if (!s->moe_sc.logits || !s->moe_sc.wt || !s->moe_sc.xe || !s->moe_sc.ye ||
            !s->moe_sc.h1 || !s->moe_sc.h3 || !s->moe_sc.idx || !s->moe_sc.order ||
            !s->moe_sc.count)
            goto nomem;
    }
    if (session_reserve(s, 1, err) != KLI_OK || backend_sess_create(s, err) != KLI_OK) {
        kli_session_free(s);
        return KLI_E_NOMEM;
    }
    *out = s;
    return KLI_OK;
nomem:
    kli_session_free(s);
    return kli_err_set(err, KLI_E_NOMEM, "out of memory creating a session");
}

void
kli_session_reset(struct kli_session *s)
{
    const struct kli_config *cfg = &s->m->cfg;
    int64_t H = cfg->kda.n_heads, K = cfg->kda.head_dim;

    for (int i = 0; i < cfg->n_layers; i++) {
        if (s->kda[i].S == NULL)
            continue;
        memset(s->kda[i].S, 0, (size_t)(H * K * K) * sizeof(float));
        memset(s->kda[i].conv, 0,
               (size_t)(3 * H * K * (cfg->kda.conv_size - 1)) * sizeof(float));
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
        return kli_err_set(err, KLI_E_INVALID, "kli_session_eval: invalid arguments");
    if (n == 0)
        return KLI_OK;
    for (int32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= s->m->cfg.n_vocab)
            return kli_err_set(err, KLI_E_RANGE,
                               "token id %d at position %d is outside the vocabulary [0, %d)",
                               tokens[i], i, s->m->cfg.n_vocab);
    }
    if (s->broken)
        return kli_err_set(err, KLI_E_INVALID, "the session's state is incomplete after a "
                           "failed step: reset it or restore a snapshot");
    if ((int64_t)s->pos + n > s->ctx_max)
        return kli_err_set(err, KLI_E_RANGE,
                           "context full: %d tokens seen + %d new exceed the limit of %d",
                           s->pos, n, s->ctx_max);
    if (threads_count() > s->n_threads)
        return kli_err_set(err, KLI_E_INVALID,
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
        return kli_err_set(err, KLI_E_INVALID, "kli_session_eval_batch: invalid arguments");
    struct kli_session *s0 = ss[0];
    if (n > s0->batch_max || n > FORWARD_MAX_SEQ)
        return kli_err_set(err, KLI_E_RANGE, "a batched step of %d sequences exceeds the "
                           "first session's batch_max %d (or %d)", n, s0->batch_max,
                           FORWARD_MAX_SEQ);
    for (int32_t i = 0; i < n; i++) {
        const struct kli_session *s = ss[i];
        if (s == NULL || s->m != s0->m)
            return kli_err_set(err, KLI_E_INVALID, "batched step: session %d is NULL or of "
                               "another model", i);
        for (int32_t k = 0; k < i; k++) {
            if (ss[k] == s)
                return kli_err_set(err, KLI_E_INVALID, "batched step: session %d appears "
                                   "twice", i);
        }
        if (tokens[i] < 0 || tokens[i] >= s->m->cfg.n_vocab)
            return kli_err_set(err, KLI_E_RANGE, "batched step: token id %d of sequence %d is "
                               "outside the vocabulary [0, %d)", tokens[i], i,
                               s->m->cfg.n_vocab);
        if (s->pos + 1 > s->ctx_max)
            return kli_err_set(err, KLI_E_RANGE, "batched step: sequence %d is full (%d "
                               "tokens)", i, s->pos);
        if (s->broken)
            return kli_err_set(err, KLI_E_INVALID, "batched step: sequence %d's state is "
                               "incomplete after a failed step: reset it or restore a "
                               "snapshot", i);
    }
    if (threads_count() > s0->n_threads)
        return kli_err_set(err, KLI_E_INVALID,
                           "the thread count grew to %d after this session was created for %d",
                           threads_count(), s0->n_threads);
    if (s0->batch_logits == NULL) {
        s0->batch_logits = sess_floats((int64_t)s0->batch_max * s0->m->cfg.n_vocab);
        if (s0->batch_logits == NULL)
            return kli_err_set(err, KLI_E_NOMEM, "out of memory for batched logits");
    }
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
