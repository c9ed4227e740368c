/*
 * backend_sess.c - a session's device state: its queue, its mirrors of the MLA layers'
 * latent caches, its KDA states in whole-model mode, and the per-layer calls of a forward
 * pass (backend_forward_begin, backend_kda_layer, backend_mla_*, backend_lm_head) that
 * layer.c makes.
 *
 * The host cache stays the truth. A mirror row is trusted only while the token history that
 * produced it is unchanged: backend_forward_begin compares the session's history with the ids
 * the mirror was built from, so snapshots, copies and rewinds need no hooks of their own.
 * A mirror holds the rows as the host stores them (the session's cache type: f32, bf16 or
 * q8_0), so a narrow cache is narrow on the device too; the device's whole-layer path writes
 * f32 rows only, so a narrow session's projections stay on the CPU and only its attention
 * goes to the device.
 */
#include "config.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "backend_int.h"
#include "forward.h"
#include "internal.h"
#include "model.h"
#include "session.h"

/* ==== Session: queue and cache mirrors ======================================================= */

void
backend_sess_free(struct kli_session *s)
{
    struct backend_sess *g = s->gpu;

    if (g == NULL)
        return;
    struct backend_model *bm = g->bm;
    if (g->q != NULL)
        bm->ops->queue_sync(g->q, NULL);
    if (g->dc != NULL) {
        for (int i = 0; i < s->m->cfg.n_layers; i++) {
            if (g->dc[i] != NULL)
                bm->ops->release(bm->g, g->dc[i], (uint64_t)g->dcap[i] * g->rb);
        }
    }
    if (g->dS != NULL) {
        uint64_t bs, bc;
        bk_kda_state_bytes(&s->m->cfg, &bs, &bc);
        for (int i = 0; i < s->m->cfg.n_layers; i++) {
            if (g->dS[i] != NULL)
                bm->ops->release(bm->g, g->dS[i], bs);
            if (g->dconv[i] != NULL)
                bm->ops->release(bm->g, g->dconv[i], bc);
        }
    }
    free(g->dS);
    free(g->dconv);
    if (g->q != NULL)
        bm->ops->queue_free(g->q);
    free(g->toks);
    free(g->mem);
    free(g);
    s->gpu = NULL;
}

/* The per-layer and job-scratch arrays, all sized at create (k_carve's two passes); zeroed.
 * toks grows later and dS, dconv come only in whole-model mode: they are not carved. */
static void
bk_sess_carve(struct backend_sess *g, struct k_carve *cv)
{
    const struct k_config *cfg = &g->s->m->cfg;
    size_t nl = (size_t)cfg->n_layers, B = (size_t)g->s->batch_max;
    size_t E = (size_t)(cfg->moe.n_experts > 0 ? cfg->moe.n_experts : 1);
    size_t P = B * (size_t)(cfg->moe.top_k + 1);

    g->dc = k_carve(cv, nl, sizeof(*g->dc));
    g->dcap = k_carve(cv, nl, sizeof(*g->dcap));
    g->synced = k_carve(cv, nl, sizeof(*g->synced));
    g->cptr = k_carve(cv, B, sizeof(*g->cptr));
    g->newrows = k_carve(cv, B * (size_t)mla_row_floats(cfg), sizeof(float));
    g->nrow = k_carve(cv, B, sizeof(*g->nrow));
    g->items = k_carve(cv, E + 1, sizeof(*g->items));
    g->start = k_carve(cv, E + 2, sizeof(*g->start));
    g->row = k_carve(cv, P, sizeof(*g->row));
    g->wt = k_carve(cv, P, sizeof(*g->wt));
}

int
backend_sess_create(struct kli_session *s, struct kli_err *err)
{
    struct backend_model *bm = s->m->gpu;
    const struct k_config *cfg = &s->m->cfg;
    struct backend_sess *g;

    s->gpu = NULL;
    if (bm == NULL || bm->g == NULL)
        return KLI_OK;
    const char *narrow = getenv("KLI_CUDA_NARROW_CACHE");
    if (s->mla_sc.cache_dt != KLI_DT_F32 &&
        (narrow == NULL || strcmp(narrow, "1") != 0 || mla_row_floats(cfg) % 8 != 0)) {
        /* The device widens narrow rows 8 values at a time (q8_0 rows hold whole blocks).
         * Experimental, KLI_CUDA_NARROW_CACHE=1: not yet run on a GPU. */
        bk_note_cpu(bm, kli_cache_type_name(s->cache_type));
        return KLI_OK;
    }
    if ((g = k_calloc(1, sizeof(*g))) == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    s->gpu = g;
    g->bm = bm;
    g->s = s;
    g->dt = s->mla_sc.cache_dt;
    g->rb = mla_row_bytes(cfg, g->dt);
    size_t nl = (size_t)cfg->n_layers;
    struct k_carve cv = {0};
    bk_sess_carve(g, &cv);
    if ((g->mem = k_carve_block(&cv)) == NULL) {
        backend_sess_free(s);
        return err_set(err, KLI_E_NOMEM, "out of memory");
    }
    bk_sess_carve(g, &cv);
    struct kli_err e2 = {0};
    if (bm->ops->queue_create(bm->g, &g->q, &e2) != KLI_OK) {
        /* not fatal: this session computes on the CPU */
        bk_note_failure(bm, e2.msg);
        backend_sess_free(s);
        return KLI_OK;
    }
    if (bm->all) {
        /* the KDA states on the device; without room this session's KDA stays on the CPU */
        uint64_t bs, bc;
        bk_kda_state_bytes(cfg, &bs, &bc);
        g->dS = k_calloc(nl, sizeof(*g->dS));
        g->dconv = k_calloc(nl, sizeof(*g->dconv));
        int okay = g->dS != NULL && g->dconv != NULL;
        for (int i = 0; okay && i < cfg->n_layers; i++) {
            if (cfg->layer_mixer[i] != KLI_MIXER_KDA)
                continue;
            okay = bm->ops->alloc(bm->g, (void **)&g->dS[i], bs, NULL) == KLI_OK &&
                   bm->ops->alloc(bm->g, (void **)&g->dconv[i], bc, NULL) == KLI_OK;
        }
        g->kda_dev = okay;
    }
    return KLI_OK;
}

/* Marks a session's device state unusable after a failed step. */
void
bk_dead(struct backend_sess *g, const struct kli_err *e)
{
    if (g->moe_locked) {
        pthread_rwlock_unlock(&g->bm->lock);
        g->moe_locked = 0;
    }
    g->dead = 1;
    bk_note_failure(g->bm, e->msg);
}

/* Drops the mirror rows whose history changed and records the ids of this pass. */
static int
bk_sync_tokens(struct backend_sess *g, const struct kli_session *s, int64_t T_seq)
{
    int64_t upto = g->toks_n < s->pos ? g->toks_n : s->pos, k = 0;
    int64_t need = (int64_t)s->pos + T_seq;

    while (k < upto && g->toks[k] == s->hist[k])
        k++;
    for (int i = 0; i < s->m->cfg.n_layers; i++) {
        if (g->synced[i] > k)
            g->synced[i] = k;
    }
    if (need > g->toks_cap) {
        int64_t cap = g->toks_cap > 0 ? g->toks_cap : 1024;
        while (cap < need)
            cap *= 2;
        kli_token *t = k_reallocarray(g->toks, (size_t)cap, sizeof(*t));
        if (t == NULL)
            return -1;
        g->toks = t;
        g->toks_cap = cap;
    }
    memcpy(g->toks + k, s->hist + k, (size_t)(need - k) * sizeof(kli_token));
    g->toks_n = need;
    return 0;
}

/* Brings the host's KDA states of g's session up to date with the device's. On failure the
 * states are lost (the device led): the caller must not go on from them. */
static int
bk_pull(struct backend_sess *g, struct kli_err *err)
{
    const struct k_config *cfg = &g->s->m->cfg;
    uint64_t bs, bc;
    int rc;

    bk_kda_state_bytes(cfg, &bs, &bc);

    if (!g->kda_dirty)
        return KLI_OK;
    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_mixer[i] != KLI_MIXER_KDA)
            continue;
        if ((rc = g->bm->ops->download(g->bm->g, g->s->kda[i].S, g->dS[i], bs, err)) !=
            KLI_OK ||
            (rc = g->bm->ops->download(g->bm->g, g->s->kda[i].conv, g->dconv[i], bc, err)) !=
            KLI_OK) {
            bk_dead(g, err);
            return rc;
        }
    }
    g->kda_dirty = 0;
    return KLI_OK;
}

int
backend_sess_pull(struct kli_session *s, struct kli_err *err)
{
    if (s == NULL || s->gpu == NULL || !s->gpu->kda_dirty)
        return KLI_OK;
    int rc = bk_pull(s->gpu, err);
    if (rc != KLI_OK)
        s->broken = 1;
    return rc;
}

void
backend_sess_written(struct kli_session *s)
{
    if (s == NULL || s->gpu == NULL)
        return;
    s->gpu->kda_valid = 0;
    s->gpu->kda_dirty = 0;
}

/* Uploads the host's KDA states of g's session through queue q. */
static int
bk_push(struct backend_sess *g, struct gpu_queue *q, struct kli_err *err)
{
    const struct k_config *cfg = &g->s->m->cfg;
    uint64_t bs, bc;
    int rc;

    bk_kda_state_bytes(cfg, &bs, &bc);

    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_mixer[i] != KLI_MIXER_KDA)
            continue;
        if ((rc = g->bm->ops->queue_upload(q, g->dS[i], g->s->kda[i].S, bs, err)) != KLI_OK ||
            (rc = g->bm->ops->queue_upload(q, g->dconv[i], g->s->kda[i].conv, bc, err)) !=
            KLI_OK)
            return rc;
    }
    g->kda_valid = 1;
    return KLI_OK;
}

/* A pass on the CPU: every session's host KDA state must be the truth, and will advance. */
static int
bk_cpu_pass(struct kli_session *const *ss, int64_t n_seq, struct kli_err *err)
{
    for (int64_t q = 0; q < n_seq; q++) {
        int rc = backend_sess_pull(ss[q], err);
        if (rc != KLI_OK)
            return rc;
        backend_sess_written(ss[q]);
    }
    return BACKEND_CPU;
}

int
backend_forward_begin(struct kli_session *const *ss, int64_t n_seq, int64_t T_seq,
                      struct backend_sess **gs, struct kli_err *err)
{
    for (int64_t q = 0; q < n_seq; q++) {
        if (ss[q]->gpu == NULL || ss[q]->gpu->dead)
            return bk_cpu_pass(ss, n_seq, err);
    }
    for (int64_t q = 0; q < n_seq; q++) {
        if (bk_sync_tokens(ss[q]->gpu, ss[q], T_seq) != 0) {
            struct kli_err e = {KLI_E_NOMEM, "out of memory for the mirrored token ids"};
            bk_dead(ss[q]->gpu, &e);
            return bk_cpu_pass(ss, n_seq, err);
        }
        gs[q] = ss[q]->gpu;
    }
    /* the KDA layers too when every session has its states there */
    int kda = gs[0]->bm->all;
    for (int64_t q = 0; q < n_seq; q++)
        kda &= gs[q]->kda_dev;
    for (int64_t q = 0; kda && q < n_seq; q++) {
        struct kli_err e = {0};
        if (!gs[q]->kda_valid && bk_push(gs[q], gs[0]->q, &e) != KLI_OK) {
            bk_dead(gs[q], &e);
            return bk_cpu_pass(ss, n_seq, err);
        }
    }
    if (!kda) {
        int rc = bk_cpu_pass(ss, n_seq, err);
        if (rc < 0)
            return rc;
    }
    for (int64_t q = 0; q < n_seq; q++) {
        gs[q]->kda_pass = kda;
        if (kda)
            gs[q]->kda_dirty = 1;   /* the device leads from this pass on */
    }
    return KLI_OK;
}

int
backend_kda_layer(struct backend_sess *const *gs, int layer, int64_t n_seq, int64_t T_seq,
                  const float *x, float *out, struct kli_err *err)
{
    struct backend_sess *g0 = gs[0];
    struct backend_model *bm = g0->bm;
    const struct k_config *cfg = &bm->m->cfg;
    float *S[FORWARD_MAX_SEQ], *C[FORWARD_MAX_SEQ];

    if (!g0->kda_pass)
        return BACKEND_CPU;
    if (n_seq > FORWARD_MAX_SEQ)
        return err_set(err, KLI_E_RANGE, "kda layer: %lld sequences", (long long)n_seq);
    for (int64_t q = 0; q < n_seq; q++) {
        S[q] = gs[q]->dS[layer];
        C[q] = gs[q]->dconv[layer];
    }
    struct gpu_kda_job j = {
        (int32_t)n_seq, (int32_t)T_seq, (int32_t)cfg->d_model, cfg->kda.n_heads,
        cfg->kda.head_dim, cfg->kda.conv_size, cfg->norm_eps, &bm->kda_w[layer].w, S, C, x,
        out,
    };
    int rc = bm->ops->kda_layer(g0->q, &j, err);
    if (rc != KLI_OK) {
        /* the states on the device are part-way through this pass: they are lost */
        for (int64_t q = 0; q < n_seq; q++) {
            bk_dead(gs[q], err);
            gs[q]->kda_dirty = 0;
            gs[q]->kda_valid = 0;
        }
        return rc < 0 ? rc : KLI_E_CUDA;
    }
    return KLI_OK;
}

int
backend_lm_head(struct backend_sess *const *gs, const float *x, int64_t T, float *y)
{
    struct backend_sess *g0 = gs[0];
    struct backend_model *bm = g0->bm;
    struct kli_err e = {0};

    if (!bm->all || g0->dead)
        return BACKEND_CPU;
    if (bm->ops->matmul(g0->q, &bm->lm, x, T, y, &e) != KLI_OK) {
        bk_dead(g0, &e);
        return BACKEND_CPU;
    }
    return KLI_OK;
}

/* Makes layer i's mirror of session g hold room for `room` rows (grown keeping the rows
 * already there, copied through queue q) and uploads the rows [synced, need) from the host
 * cache. */
static int
bk_mirror(struct backend_sess *g, struct gpu_queue *q, int i, const float *cache,
          int64_t need, int64_t room, struct kli_err *err)
{
    struct backend_model *bm = g->bm;
    const struct backend_ops *ops = bm->ops;
    int64_t rb = g->rb;
    const uint8_t *host = (const uint8_t *)cache;
    int rc;

    if (room > g->dcap[i]) {
        int64_t cap = g->dcap[i] > 0 ? 2 * g->dcap[i] : 1024;
        void *p = NULL;
        while (cap < room)
            cap *= 2;
        if (cap > g->s->ctx_max)
            cap = g->s->ctx_max > room ? g->s->ctx_max : room;
        if (ops->alloc(bm->g, &p, (uint64_t)cap * rb, NULL) != KLI_OK &&
            (cap = room, rc = ops->alloc(bm->g, &p, (uint64_t)cap * rb, err)) != KLI_OK)
            return rc;
        if (g->synced[i] > 0 &&
            (rc = ops->queue_copy(q, p, g->dc[i], (uint64_t)g->synced[i] * rb, err)) !=
            KLI_OK) {
            ops->release(bm->g, p, (uint64_t)cap * rb);
            return rc;
        }
        if (g->dc[i] != NULL) {
            if ((rc = ops->queue_sync(q, err)) != KLI_OK)
                return rc;
            ops->release(bm->g, g->dc[i], (uint64_t)g->dcap[i] * rb);
        }
        g->dc[i] = p;
        g->dcap[i] = cap;
    }
    if (need > g->synced[i]) {
        if ((rc = ops->queue_upload(q, g->dc[i] + g->synced[i] * rb, host + g->synced[i] * rb,
                                    (uint64_t)(need - g->synced[i]) * rb, err)) != KLI_OK)
            return rc;
        g->synced[i] = need;
    }
    return KLI_OK;
}

/* Brings every sequence's mirror of MLA layer `layer` up to rows [0, pos[q] + have) of its
 * host cache, with room for pos[q] + T_seq, and fills g0's cptr and nrow for the job's T rows.
 * @return KLI_OK, or BACKEND_CPU: a session's mirrors no longer fit the budget (its
 * attention stays on the CPU from now on), or the device failed. */
static int
bk_mirrors(struct backend_sess *const *gs, int layer, float *const *caches, const int64_t *pos,
           int64_t n_seq, int64_t T_seq, int64_t have)
{
    struct backend_sess *g0 = gs[0];
    struct kli_err e = {0};

    for (int64_t q = 0; q < n_seq; q++) {
        if (gs[q]->mla_off || gs[q]->dt != g0->dt)
            return BACKEND_CPU;
        int rc = bk_mirror(gs[q], g0->q, layer, caches[q], pos[q] + have, pos[q] + T_seq, &e);
        if (rc == KLI_E_NOMEM) {
            gs[q]->mla_off = 1;   /* over the budget: this session's attention stays here */
            return BACKEND_CPU;
        }
        if (rc != KLI_OK) {
            bk_dead(g0, &e);
            return BACKEND_CPU;
        }
    }
    for (int64_t t = 0; t < n_seq * T_seq; t++) {
        int64_t q = t / T_seq;
        g0->cptr[t] = (const float *)(const void *)gs[q]->dc[layer];
        g0->nrow[t] = pos[q] + t % T_seq + 1;
    }
    return KLI_OK;
}

int
backend_mla_attend(struct backend_sess *const *gs, int layer, float *const *caches,
                   const int64_t *pos, int64_t n_seq, int64_t T_seq, const float *qfull,
                   float *lat)
{
    struct backend_sess *g0 = gs[0];
    struct backend_model *bm = g0->bm;
    const struct config_mla *c = &bm->m->cfg.mla;
    struct kli_err e = {0};
    int64_t T = n_seq * T_seq;

    /* the device needs every row, this pass's too (the CPU wrote them) */
    if (!bm->mla || g0->dead || bk_mirrors(gs, layer, caches, pos, n_seq, T_seq, T_seq) != KLI_OK)
        return BACKEND_CPU;
    struct gpu_mla_job j = {
        T, c->n_heads, c->kv_lora_rank, (int32_t)mla_row_floats(&bm->m->cfg),
        1.0f / sqrtf((float)(c->qk_nope_dim + c->qk_rope_dim)),
        g0->cptr, g0->nrow, qfull, lat, g0->dt,
    };
    if (bm->ops->mla_attend(g0->q, &j, &e) != KLI_OK) {
        bk_dead(g0, &e);
        return BACKEND_CPU;
    }
    return KLI_OK;
}

int
backend_mla_layer(struct backend_sess *const *gs, int layer, float *const *caches,
                  const int64_t *pos, int64_t n_seq, int64_t T_seq, const float *x, float *out)
{
    struct backend_sess *g0 = gs[0];
    struct backend_model *bm = g0->bm;
    const struct k_config *cfg = &bm->m->cfg;
    const struct config_mla *c = &cfg->mla;
    int64_t C = mla_row_floats(cfg), T = n_seq * T_seq;
    struct kli_err e = {0};

    /* the device needs every earlier row, and room for this pass's */
    if (!bm->mla_proj || bm->mla_w[layer].buf == NULL || g0->dead || g0->dt != KLI_DT_F32 ||
        bk_mirrors(gs, layer, caches, pos, n_seq, T_seq, 0) != KLI_OK)
        return BACKEND_CPU;
    struct gpu_mla_layer_job j = {
        T, (int32_t)cfg->d_model, c->n_heads, c->kv_lora_rank, c->qk_rope_dim, c->qk_nope_dim,
        c->v_head_dim, 1.0f / sqrtf((float)(c->qk_nope_dim + c->qk_rope_dim)),
        1e-6f,   /* kv_a_layernorm's eps (doc/model.md decision 3), as mla_project */
        &bm->mla_w[layer].w, (float *const *)g0->cptr, g0->nrow, x, out, g0->newrows,
    };
    if (bm->ops->mla_layer(g0->q, &j, &e) != KLI_OK) {
        bk_dead(g0, &e);
        return BACKEND_CPU;
    }
    /* the host cache stays the truth: the new rows go there too */
    for (int64_t t = 0; t < T; t++) {
        int64_t q = t / T_seq;
        memcpy(caches[q] + (pos[q] + t % T_seq) * C, g0->newrows + t * C,
               (size_t)C * sizeof(float));
    }
    for (int64_t q = 0; q < n_seq; q++)
        gs[q]->synced[layer] = pos[q] + T_seq;
    return KLI_OK;
}
