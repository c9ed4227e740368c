/*
 * backend_hot.c - the hot set: which routed experts of each MoE layer stay resident on the
 * device, how that set follows the routing as kli runs, the mover that copies experts in
 * and out, and the device's share of one MoE layer (launch, wait).
 *
 * The hot set is chosen from routing counts as kli runs (optionally seeded from a routing
 * trace): every n_experts routed slots of a layer (32 tokens of the released model), the
 * experts whose count exceeds twice the coldest resident one's plus 4 replace them, up to 8
 * at a time, and the counts halve (contrib/tools/hotset-sim.py chose these on the real
 * router trace: 51% of routed slots on 32 of 256 experts, where a fixed first set gives
 * 11% and a profile from the trace's first half 52%). The copies run on a thread of their
 * own (the mover) while decode goes on; a new expert is switched in, and the old one freed,
 * under the model's lock for writing. Jobs in flight hold it for reading, so a session
 * never computes with an expert that is being replaced.
 *
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "backend_int.h"
#include "internal.h"
#include "model.h"
#include "moe.h"

/* Routed slots between two choices of a layer's hot set, per expert of the layer (and at
 * most BK_MAX_SWAPS experts per choice, backend_int.h): every replacement is a synchronous
 * upload (14 MB per expert of the released model), so the hot set moves slowly and only on
 * clear evidence. */
#define BK_REBALANCE_PER_EXPERT 1

/* Whether cuda/moe.cu computes this FFN: gate and up of one dtype, down of one (each
 * gpu_dtype_ok for its rows), widths multiples of 32. */
int
bk_ffn_ok(const struct ffn_w *f)
{
    return f->up.dtype == f->gate.dtype && gpu_dtype_ok(f->gate.dtype, f->gate.shape[1]) &&
           gpu_dtype_ok(f->down.dtype, f->down.shape[1]) && f->gate.shape[0] % 32 == 0 &&
           f->gate.shape[1] % 32 == 0;
}

void
bk_ffn_release(struct backend_model *bm, struct gpu_ffn *d, void **buf, uint64_t bytes)
{
    if (*buf != NULL)
        bm->ops->release(bm->g, *buf, bytes);
    *buf = NULL;
    memset(d, 0, sizeof(*d));
}

/* Copies one FFN's three matrices into one device allocation. */
int
bk_ffn_upload(struct backend_model *bm, const struct ffn_w *f, struct gpu_ffn *d,
              void **buf, struct kli_err *err)
{
    uint64_t bg = bk_tensor_bytes(&f->gate), bu = bk_tensor_bytes(&f->up);
    uint64_t bd = bk_tensor_bytes(&f->down);
    uint64_t og = 0, ou = (bg + 255) & ~(uint64_t)255, od = ou + ((bu + 255) & ~(uint64_t)255);
    uint64_t total = od + bd;
    void *p = NULL;
    int rc;

    if ((rc = bm->ops->alloc(bm->g, &p, total, err)) != KLI_OK)
        return rc;
    char *c = p;
    if ((rc = bm->ops->upload(bm->g, c + og, f->gate.data, bg, err)) != KLI_OK ||
        (rc = bm->ops->upload(bm->g, c + ou, f->up.data, bu, err)) != KLI_OK ||
        (rc = bm->ops->upload(bm->g, c + od, f->down.data, bd, err)) != KLI_OK) {
        bm->ops->release(bm->g, p, total);
        return rc;
    }
    *buf = p;
    d->gate = c + og;
    d->up = c + ou;
    d->down = c + od;
    d->dtype = (int32_t)f->gate.dtype;
    d->d_ff = (int32_t)f->gate.shape[0];
    d->dtype_down = (int32_t)f->down.dtype;
    return KLI_OK;
}

/* Upload size of one routed expert: the same allocation bk_ffn_upload makes. */
uint64_t
bk_alloc_bytes(const struct ffn_w *f)
{
    uint64_t bg = bk_tensor_bytes(&f->gate), bu = bk_tensor_bytes(&f->up);

    return ((bg + 255) & ~(uint64_t)255) + ((bu + 255) & ~(uint64_t)255) +
           bk_tensor_bytes(&f->down);
}

/* Adds a routing trace's choices to the counts: one JSON object per line whose "layers"
 * holds, per MoE layer in order, the ids chosen for one token. */
int
bk_read_profile(struct backend_model *bm, const char *path, struct kli_err *err)
{
    const struct k_config *cfg = &bm->m->cfg;
    int fd = kli_file_open(path, NULL, err);   /* a regular file: src/file.c */
    FILE *f = fd >= 0 ? fdopen(fd, "r") : NULL;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int64_t lineno = 0;
    int rc = KLI_OK;

    if (f == NULL) {
        if (fd >= 0)
            close(fd);
        return err_set(err, KLI_E_IO, "%s: cannot open the routing profile", path);
    }
    while (rc == KLI_OK && (len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (strspn(line, " \t\r\n") == (size_t)len)
            continue;
        cJSON *o = cJSON_ParseWithLength(line, (size_t)len);
        const cJSON *ls = o ? cJSON_GetObjectItemCaseSensitive(o, "layers") : NULL, *l;
        if (!cJSON_IsArray(ls)) {
            rc = err_set(err, KLI_E_FORMAT, "%s:%lld: not an object with \"layers\"",
                             path, (long long)lineno);
            cJSON_Delete(o);
            break;
        }
        int k = 0;
        for (int i = 0; i < cfg->n_layers && rc == KLI_OK; i++) {
            if (cfg->layer_ffn[i] != KLI_FFN_MOE)
                continue;
            l = cJSON_GetArrayItem(ls, k++);
            const cJSON *id;
            if (!cJSON_IsArray(l)) {
                rc = err_set(err, KLI_E_FORMAT, "%s:%lld: %d MoE layers, the model has "
                                 "more", path, (long long)lineno, cJSON_GetArraySize(ls));
                break;
            }
            cJSON_ArrayForEach(id, l) {
                if (!cJSON_IsNumber(id) || id->valueint < 0 ||
                    id->valueint >= cfg->moe.n_experts) {
                    rc = err_set(err, KLI_E_FORMAT, "%s:%lld: an expert id outside [0, "
                                     "%d)", path, (long long)lineno, cfg->moe.n_experts);
                    break;
                }
                bm->layer[i].count[id->valueint]++;
            }
        }
        cJSON_Delete(o);
    }
    free(line);
    fclose(f);
    return rc;
}

/* Sorts expert ids by count, highest first, ties to the lower id (insertion sort, stable:
 * E is a few hundred, and this runs once per 32 * E routed slots). */
static void
bk_sort_by_count(int32_t *order, const uint32_t *count, int32_t E)
{
    for (int32_t i = 0; i < E; i++)
        order[i] = i;
    for (int32_t i = 1; i < E; i++) {
        int32_t v = order[i], k = i;
        while (k > 0 && count[order[k - 1]] < count[v]) {
            order[k] = order[k - 1];
            k--;
        }
        order[k] = v;
    }
}

/* The first hot set of MoE layer i: its most-counted experts (the profile's, or the lowest
 * ids), as many as n_hot, uploaded now. */
void
bk_fill(struct backend_model *bm, int i)
{
    const struct moe_w *w = &bm->m->layers[i].moe;
    struct bk_layer *bl = &bm->layer[i];
    int32_t E = bm->m->cfg.moe.n_experts, order[KLI_MAX_EXPERTS];

    bk_sort_by_count(order, bl->count, E);
    for (int32_t r = 0; r < bm->n_hot && r < E; r++) {
        if (bk_ffn_upload(bm, &w->experts[order[r]], &bl->exp[order[r]], &bl->buf[order[r]],
                          NULL) != KLI_OK)
            break;
    }
    for (int32_t e = 0; e < E; e++)
        bl->count[e] /= 2;
}

/* A re-choice of MoE layer i's hot set from its counts (halved afterwards): up to
 * BK_MAX_SWAPS pairs, in[k] to become resident in place of out[k], each in chosen more than
 * twice as often as its out plus 4. Reads which experts are resident: call with the lock
 * held (for reading is enough: only the mover changes the set, and it is idle). */
static int
bk_plan(struct backend_model *bm, int i, int32_t *in, int32_t *out)
{
    struct bk_layer *bl = &bm->layer[i];
    int32_t E = bm->m->cfg.moe.n_experts, order[KLI_MAX_EXPERTS], n = 0;
    uint32_t snap[KLI_MAX_EXPERTS] = {0};

    for (int32_t e = 0; e < E; e++)
        snap[e] = __atomic_load_n(&bl->count[e], __ATOMIC_RELAXED);
    bk_sort_by_count(order, snap, E);
    /* the hottest cold ones against the coldest resident ones, pairwise */
    int32_t k = E - 1;
    for (int32_t r = 0; r < bm->n_hot && r < E && n < BK_MAX_SWAPS; r++) {
        int32_t c = order[r];
        if (bl->exp[c].gate != NULL)
            continue;
        while (k >= bm->n_hot && bl->exp[order[k]].gate == NULL)
            k--;
        if (k < bm->n_hot || snap[c] <= 2 * snap[order[k]] + 4)
            break;
        in[n] = c;
        out[n++] = order[k--];
    }
    for (int32_t e = 0; e < E; e++)
        __atomic_store_n(&bl->count[e], snap[e] / 2, __ATOMIC_RELAXED);
    __atomic_store_n(&bl->since, 0, __ATOMIC_RELAXED);
    return n;
}

/* The mover: copies each planned expert into fresh device memory while decode goes on, then
 * switches it in and frees the one it replaces under the lock for writing. When the budget
 * has no room for the copy beside the old expert, the old one goes first (both under the
 * lock). A failed copy leaves the set as it was. */
void *
bk_mover(void *arg)
{
    struct backend_model *bm = arg;

    pthread_mutex_lock(&bm->mv_lock);
    for (;;) {
        while (!bm->mv_busy && !bm->mv_stop)
            pthread_cond_wait(&bm->mv_cond, &bm->mv_lock);
        if (bm->mv_stop)
            break;
        int layer = bm->mv_layer, n = bm->mv_n;
        pthread_mutex_unlock(&bm->mv_lock);
        struct bk_layer *bl = &bm->layer[layer];
        const struct moe_w *w = &bm->m->layers[layer].moe;
        for (int k = 0; k < n; k++) {
            int32_t in = bm->mv_in[k], out = bm->mv_out[k];
            struct gpu_ffn d;
            void *buf = NULL;
            int early = bk_ffn_upload(bm, &w->experts[in], &d, &buf, NULL) == KLI_OK;
            pthread_rwlock_wrlock(&bm->lock);
            bk_ffn_release(bm, &bl->exp[out], &bl->buf[out],
                           bk_alloc_bytes(&w->experts[out]));
            if (early) {
                bl->exp[in] = d;
                bl->buf[in] = buf;
            } else {
                bk_ffn_upload(bm, &w->experts[in], &bl->exp[in], &bl->buf[in], NULL);
            }
            pthread_rwlock_unlock(&bm->lock);
            __atomic_add_fetch(&bm->st_swaps, 1, __ATOMIC_RELAXED);
        }
        pthread_mutex_lock(&bm->mv_lock);
        __atomic_store_n(&bm->mv_busy, 0, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&bm->mv_lock);
    return NULL;
}

/* ==== MoE: counting, the hot set, and the device's share of a layer ========================= */

int
backend_moe_launch(struct backend_sess *g, int layer, const struct moe_scratch *sc,
                   const float *x, int64_t T)
{
    struct backend_model *bm = g->bm;
    const struct config_moe *c = &bm->m->cfg.moe;
    struct bk_layer *bl = &bm->layer[layer];
    int32_t E = c->n_experts, K = c->top_k;
    struct kli_err e = {0};

    if (!bm->experts || g->dead)
        return BACKEND_CPU;
    if (bm->n_hot < E) {
        for (int64_t i = 0; i < T * K; i++)
            __atomic_fetch_add(&bl->count[sc->idx[i]], 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&bl->since, (uint64_t)(T * K), __ATOMIC_RELAXED);
    }
    pthread_rwlock_rdlock(&bm->lock);
    g->moe_locked = 1;
    /* a re-choice for the mover, when it is idle */
    if (bm->have_mover && bm->n_hot < E &&
        __atomic_load_n(&bl->since, __ATOMIC_RELAXED) >=
            (uint64_t)BK_REBALANCE_PER_EXPERT * (uint64_t)E &&
        !__atomic_load_n(&bm->mv_busy, __ATOMIC_ACQUIRE) &&
        pthread_mutex_trylock(&bm->mv_lock) == 0) {
        if (!bm->mv_busy && (bm->mv_n = bk_plan(bm, layer, bm->mv_in, bm->mv_out)) > 0) {
            bm->mv_layer = layer;
            bm->mv_busy = 1;
            pthread_cond_signal(&bm->mv_cond);
        }
        pthread_mutex_unlock(&bm->mv_lock);
    }

    /* items: the shared expert over every row, then each resident expert over its rows */
    int32_t n = 0, p = 0, hits = 0;
    if (bl->shared.gate != NULL) {
        g->items[n] = bl->shared;
        g->start[n++] = p;
        for (int64_t t = 0; t < T; t++) {
            g->row[p] = (int32_t)t;
            g->wt[p++] = 1.0f;
        }
    }
    for (int32_t ex = 0; ex < E; ex++) {
        int32_t cnt = sc->count[ex + 1] - sc->count[ex];
        const int32_t *ord = sc->order + sc->count[ex];
        if (cnt == 0 || bl->exp[ex].gate == NULL)
            continue;
        g->items[n] = bl->exp[ex];
        g->start[n++] = p;
        hits += cnt;
        for (int32_t i = 0; i < cnt; i++) {
            g->row[p] = ord[i] / K;
            g->wt[p++] = sc->wt[ord[i]];
        }
    }
    g->start[n] = p;
    __atomic_add_fetch(&bm->st_routed, (uint64_t)(T * K), __ATOMIC_RELAXED);
    __atomic_add_fetch(&bm->st_on_gpu, (uint64_t)hits, __ATOMIC_RELAXED);
    if (n == 0) {
        pthread_rwlock_unlock(&bm->lock);
        g->moe_locked = 0;
        return BACKEND_CPU;
    }
    struct gpu_moe_job j = {T, bm->m->cfg.d_model, x, n, g->items, g->start, g->row,
                                g->wt};
    if (bm->ops->moe_launch(g->q, &j, &e) != KLI_OK) {
        bk_dead(g, &e);
        return BACKEND_CPU;
    }
    return KLI_OK;
}

int
backend_moe_hot(const struct backend_sess *g, int layer, int32_t e)
{
    return g->bm->layer[layer].exp[e].gate != NULL;
}

int
backend_moe_wait(struct backend_sess *g, int layer, float *out)
{
    struct kli_err e = {0};

    (void)layer;
    int rc = g->bm->ops->moe_wait(g->q, out, &e);
    pthread_rwlock_unlock(&g->bm->lock);
    g->moe_locked = 0;
    if (rc != KLI_OK) {
        bk_dead(g, &e);
        return BACKEND_CPU;
    }
    return KLI_OK;
}
