/*
 * backend.c - what of the model runs on an accelerator, and the fallback when it cannot.
 *
 * The device takes the parts of a decode step that the CPU does worst (doc/measuring.md
 * section 1), and everything when it can hold everything:
 *
 *   MLA layers      attention cost grows with the context (the whole latent cache is read
 *                   per token and layer). Each session keeps a mirror of every MLA layer's
 *                   cache on the device. When the layers' weights fit the budget (they are
 *                   taken before the experts), the whole layer runs there (cuda/mla.cu
 *                   cu_mla_layer): x goes in, the output and the new cache rows come back.
 *                   Otherwise only the attention does: layer.c sends the absorbed queries
 *                   and gets the weighted latents [T][H][L] back, and the host rows are
 *                   appended to the mirror.
 *   whole model     when everything fits (every expert too), the KDA layers and lm_head as
 *                   well (cuda/kda.cu). The sessions' KDA states then live on the device and
 *                   lead the host's between passes: backend_sess_pull catches the host up
 *                   before anything reads them, backend_sess_written marks the device's stale
 *                   when the host's are overwritten.
 *   hot experts     per MoE layer the routed experts chosen most often stay resident in device
 *                   memory (the hot set), with the shared expert; the device computes them
 *                   while the CPU computes the cold ones (cuda/moe.cu, layer.c).
 *
 * The host cache stays the truth. A mirror row is trusted only while the token history that
 * produced it is unchanged: backend_forward_begin compares the session's history with the ids
 * the mirror was built from, so snapshots, copies and rewinds need no hooks of their own.
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
 * Every failure is the CPU's cue: an open that fails leaves "CPU only: <why>" in the status
 * (or is an error with KLI_GPU_ON), a memory budget that runs out keeps that layer's
 * attention on the CPU, and a CUDA error in a step sends the session to the CPU for good.
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "internal.h"
#include "model.h"
#include "moe.h"
#include "session.h"
#ifdef HAVE_CUDA
#include "kli_cuda.h"
#endif

/* Routed slots between two choices of a layer's hot set, per expert of the layer, and the
 * most experts one choice replaces: every replacement is a synchronous upload (14 MB per
 * expert of the released model), so the hot set moves slowly and only on clear evidence. */
#define BK_REBALANCE_PER_EXPERT 1
#define BK_MAX_SWAPS 8
/* Bytes kept free for queues' workspaces when sizing the hot set. */
#define BK_WORKSPACE_RESERVE ((uint64_t)512 << 20)
/* Context the MLA mirrors are budgeted for when sizing the hot set. */
#define BK_MLA_RESERVE_CTX 131072
/* Sequences one batched pass may hold (forward.h FORWARD_MAX_SEQ). */
#define FORWARD_MAX_SEQ_BK 512

const struct kli_backend_ops *
backend_cuda(void)
{
#ifdef HAVE_CUDA
    return kli_cuda_backend();
#else
    return NULL;
#endif
}

/* One MoE layer's device experts. */
struct bk_layer {
    struct kli_gpu_ffn shared;    /* gate NULL: none */
    void *shared_buf;
    struct kli_gpu_ffn *exp;      /* [E]; gate NULL: not resident */
    void **buf;                   /* [E] the allocation holding gate, up, down */
    uint32_t *count;              /* [E] routing counts (halved at each choice) */
    uint64_t since;               /* slots routed since the last choice */
};

/* One KDA layer's resident weights (whole-model mode only). */
struct bk_kda {
    struct kli_gpu_kda_w w;
    void *buf;
    uint64_t bytes;
};

/* One MLA layer's resident weights (NULL buf: its projections run on the CPU). */
struct bk_mla {
    struct kli_gpu_mla_w w;
    void *buf;
    uint64_t bytes;
};

struct backend_model {
    const struct kli_model *m;
    const struct kli_backend_ops *ops;
    struct kli_gpu *g;            /* NULL: CPU only, status says why */
    struct kli_gpu_info info;
    char status[512];
    pthread_mutex_t status_lock;
    int failed;                   /* a session's step failed (status says so) */
    int mla;                      /* MLA attention on the device */
    int mla_proj;                 /* and the projections of every MLA layer (mla_w) */
    struct bk_mla *mla_w;         /* [n_layers], used for MLA layers */
    int all;                      /* the whole model fits: KDA layers and lm_head too */
    struct bk_kda *kda_w;         /* [n_layers], used for KDA layers when all */
    struct kli_gpu_mat lm;        /* lm_head when all */
    void *lm_buf;
    uint64_t lm_bytes;
    int experts;                  /* shared and hot routed experts on the device */
    int32_t n_hot;                /* routed experts per MoE layer kept resident */
    uint64_t exp_bytes;           /* device bytes of one routed expert */
    struct bk_layer *layer;       /* [n_layers], used for MoE layers */
    pthread_rwlock_t lock;        /* read: a job in flight; write: changing a hot set */
    uint64_t st_routed, st_on_gpu, st_swaps;   /* kli_model_gpu_stats (atomic) */
    /* the mover: one re-choice at a time, copied in the background */
    pthread_t mover;
    int have_mover;
    pthread_mutex_t mv_lock;
    pthread_cond_t mv_cond;
    int mv_busy, mv_stop;         /* under mv_lock; mv_busy also read atomically */
    int mv_layer, mv_n;
    int32_t mv_in[BK_MAX_SWAPS], mv_out[BK_MAX_SWAPS];
    int have_locks;
};

struct backend_sess {
    struct backend_model *bm;
    struct kli_session *s;
    struct kli_gpu_queue *q;
    int dead;                     /* a step failed: the CPU from now on */
    int mla_off;                  /* the mirrors no longer fit the budget */
    float **dc;                   /* [n_layers] device mirrors [dcap][L+rope] */
    int64_t *dcap, *synced;       /* [n_layers] rows allocated, rows equal to the host's */
    kli_token *toks;              /* [toks_cap] the ids the mirrors were built from */
    int64_t toks_n, toks_cap;
    /* job scratch, sized for batch_max rows */
    const float **cptr;           /* [B] */
    float *newrows;               /* [B][L+rope]: cache rows made on the device */
    /* whole-model mode: the KDA states of every layer on the device. While dirty they are
     * ahead of the host's (which backend_sess_pull brings up to date); valid says they
     * equal or lead the host's, so a pass may start from them. */
    float **dS, **dconv;          /* [n_layers] */
    int kda_dev, kda_valid, kda_dirty;
    int kda_pass;                 /* this pass runs the KDA layers on the device */
    int64_t *nrow;                /* [B] */
    struct kli_gpu_ffn *items;    /* [E+1] */
    int32_t *start;               /* [E+2] */
    int32_t *row;                 /* [B*(top_k+1)] */
    float *wt;                    /* [B*(top_k+1)] */
    int moe_locked;               /* holds bm->lock for reading (launch..wait) */
};

/* ==== Model: device, budget, resident weights ================================================ */

const char *
kli_model_gpu_status(const struct kli_model *m)
{
    if (m == NULL || m->gpu == NULL)
        return "CPU only: GPU use off";
    return m->gpu->status;
}

int
kli_model_gpu_stats(const struct kli_model *m, struct kli_gpu_stats *st)
{
    if (st == NULL)
        return -1;
    memset(st, 0, sizeof(*st));
    if (m == NULL || m->gpu == NULL || m->gpu->g == NULL)
        return -1;
    struct backend_model *bm = m->gpu;
    st->mla_layers = bm->mla_proj;
    st->whole_model = bm->all;
    st->n_hot = bm->experts ? bm->n_hot : 0;
    st->n_experts = m->cfg.moe.n_experts;
    st->bytes_used = bm->ops->used(bm->g, &st->budget);
    st->routed = __atomic_load_n(&bm->st_routed, __ATOMIC_RELAXED);
    st->on_gpu = __atomic_load_n(&bm->st_on_gpu, __ATOMIC_RELAXED);
    st->swaps = __atomic_load_n(&bm->st_swaps, __ATOMIC_RELAXED);
    return 0;
}

void
kli_model_gpu_reset(struct kli_model *m)
{
    if (m == NULL || m->gpu == NULL)
        return;
    __atomic_store_n(&m->gpu->st_routed, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&m->gpu->st_on_gpu, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&m->gpu->st_swaps, 0, __ATOMIC_RELAXED);
}

/* Records a step's failure once in the model's status line. */
static void
bk_note_failure(struct backend_model *bm, const char *msg)
{
    pthread_mutex_lock(&bm->status_lock);
    if (!bm->failed) {
        size_t n = strlen(bm->status);
        bm->failed = 1;
        snprintf(bm->status + n, sizeof(bm->status) - n, "; a step failed (%s), its session "
                 "went on on the CPU", msg);
    }
    pthread_mutex_unlock(&bm->status_lock);
}

static uint64_t
bk_tensor_bytes(const struct kli_tensor *t)
{
    return model_row_bytes(t) * (uint64_t)t->shape[0];
}

/* Whether cuda/moe.cu computes this FFN: one dtype it knows, widths multiples of 32. */
static int
bk_ffn_ok(const struct kli_ffn_w *f)
{
    enum kli_dtype dt = f->gate.dtype;

    return (dt == KLI_DT_F32 || dt == KLI_DT_F16 || dt == KLI_DT_BF16 || dt == KLI_DT_Q8_0 ||
            dt == KLI_DT_Q4) && f->up.dtype == dt && f->down.dtype == dt &&
           f->gate.shape[0] % 32 == 0 && f->gate.shape[1] % 32 == 0;
}

static void
bk_ffn_release(struct backend_model *bm, struct kli_gpu_ffn *d, void **buf, uint64_t bytes)
{
    if (*buf != NULL)
        bm->ops->release(bm->g, *buf, bytes);
    *buf = NULL;
    memset(d, 0, sizeof(*d));
}

/* Copies one FFN's three matrices into one device allocation. */
static int
bk_ffn_upload(struct backend_model *bm, const struct kli_ffn_w *f, struct kli_gpu_ffn *d,
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
    return KLI_OK;
}

/* Upload size of one routed expert: the same allocation bk_ffn_upload makes. */
static uint64_t
bk_alloc_bytes(const struct kli_ffn_w *f)
{
    uint64_t bg = bk_tensor_bytes(&f->gate), bu = bk_tensor_bytes(&f->up);

    return ((bg + 255) & ~(uint64_t)255) + ((bu + 255) & ~(uint64_t)255) +
           bk_tensor_bytes(&f->down);
}

/* Adds a routing trace's choices to the counts: one JSON object per line whose "layers"
 * holds, per MoE layer in order, the ids chosen for one token. */
static int
bk_read_profile(struct backend_model *bm, const char *path, struct kli_err *err)
{
    const struct kli_config *cfg = &bm->m->cfg;
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
        return kli_err_set(err, KLI_E_IO, "%s: cannot open the routing profile", path);
    }
    while (rc == KLI_OK && (len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (strspn(line, " \t\r\n") == (size_t)len)
            continue;
        cJSON *o = cJSON_ParseWithLength(line, (size_t)len);
        const cJSON *ls = o ? cJSON_GetObjectItemCaseSensitive(o, "layers") : NULL, *l;
        if (!cJSON_IsArray(ls)) {
            rc = kli_err_set(err, KLI_E_FORMAT, "%s:%lld: not an object with \"layers\"",
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
                rc = kli_err_set(err, KLI_E_FORMAT, "%s:%lld: %d MoE layers, the model has "
                                 "more", path, (long long)lineno, cJSON_GetArraySize(ls));
                break;
            }
            cJSON_ArrayForEach(id, l) {
                if (!cJSON_IsNumber(id) || id->valueint < 0 ||
                    id->valueint >= cfg->moe.n_experts) {
                    rc = kli_err_set(err, KLI_E_FORMAT, "%s:%lld: an expert id outside [0, "
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
static void
bk_fill(struct backend_model *bm, int i)
{
    const struct kli_moe_w *w = &bm->m->layers[i].moe;
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
static void *
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
        const struct kli_moe_w *w = &bm->m->layers[layer].moe;
        for (int k = 0; k < n; k++) {
            int32_t in = bm->mv_in[k], out = bm->mv_out[k];
            struct kli_gpu_ffn d;
            void *buf = NULL;
            int early = bk_ffn_upload(bm, &w->experts[in], &d, &buf, NULL) == KLI_OK;
            pthread_rwlock_wrlock(&bm->lock);
            bk_ffn_release(bm, &bl->exp[out], &bl->buf[out], bm->exp_bytes);
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

void
backend_model_close(struct kli_model *m)
{
    struct backend_model *bm = m->gpu;

    if (bm == NULL)
        return;
    if (bm->have_mover) {
        pthread_mutex_lock(&bm->mv_lock);
        bm->mv_stop = 1;
        pthread_cond_signal(&bm->mv_cond);
        pthread_mutex_unlock(&bm->mv_lock);
        pthread_join(bm->mover, NULL);
        pthread_mutex_destroy(&bm->mv_lock);
        pthread_cond_destroy(&bm->mv_cond);
        bm->have_mover = 0;
    }
    if (bm->layer != NULL) {
        for (int i = 0; i < m->cfg.n_layers; i++) {
            struct bk_layer *bl = &bm->layer[i];
            if (bl->exp != NULL) {
                for (int32_t e = 0; e < m->cfg.moe.n_experts; e++)
                    bk_ffn_release(bm, &bl->exp[e], &bl->buf[e], bm->exp_bytes);
            }
            if (bl->shared_buf != NULL)
                bk_ffn_release(bm, &bl->shared, &bl->shared_buf,
                               bk_alloc_bytes(&m->layers[i].moe.shared));
            free(bl->exp);
            free(bl->buf);
            free(bl->count);
        }
        free(bm->layer);
    }
    if (bm->kda_w != NULL) {
        for (int i = 0; i < m->cfg.n_layers; i++) {
            if (bm->kda_w[i].buf != NULL)
                bm->ops->release(bm->g, bm->kda_w[i].buf, bm->kda_w[i].bytes);
        }
        free(bm->kda_w);
    }
    if (bm->lm_buf != NULL)
        bm->ops->release(bm->g, bm->lm_buf, bm->lm_bytes);
    if (bm->mla_w != NULL) {
        for (int i = 0; i < m->cfg.n_layers; i++) {
            if (bm->mla_w[i].buf != NULL)
                bm->ops->release(bm->g, bm->mla_w[i].buf, bm->mla_w[i].bytes);
        }
        free(bm->mla_w);
    }
    if (bm->g != NULL)
        bm->ops->close(bm->g);
    if (bm->have_locks) {
        pthread_rwlock_destroy(&bm->lock);
        pthread_mutex_destroy(&bm->status_lock);
    }
    free(bm);
    m->gpu = NULL;
}

/* Leaves the model on the CPU with the reason in its status; an error with KLI_GPU_ON. */
static int
bk_cpu_only(struct kli_model *m, const struct kli_model_options *opt, int code,
            const char *why, struct kli_err *err)
{
    struct backend_model *bm = m->gpu;

    if (opt->gpu == KLI_GPU_ON)
        return kli_err_set(err, code == KLI_E_NOMEM ? KLI_E_NOMEM : KLI_E_CUDA,
                           "a GPU was required: %s", why);
    snprintf(bm->status, sizeof(bm->status), "CPU only: %s", why);
    if (bm->layer != NULL || bm->g != NULL) {
        /* keep only the status: release whatever the device holds */
        char keep[sizeof(bm->status)];
        memcpy(keep, bm->status, sizeof(keep));
        backend_model_close(m);
        bm = kli_calloc(1, sizeof(*bm));
        if (bm == NULL)
            return kli_err_set(err, KLI_E_NOMEM, "out of memory");
        memcpy(bm->status, keep, sizeof(keep));
        m->gpu = bm;
    }
    return KLI_OK;
}

/* The device layout of one MLA layer's weights: what cu_mla_layer reads. Pieces start on
 * 256-byte boundaries of one allocation; off[] are their offsets, the return the total. */
static uint64_t
bk_mla_layout(const struct kli_model *m, const struct kli_mla_w *w, uint64_t off[7],
              uint64_t len[7])
{
    const struct kli_config_mla *c = &m->cfg.mla;
    uint64_t H = (uint64_t)c->n_heads, L = (uint64_t)c->kv_lora_rank;
    uint64_t o = 0;

    len[0] = bk_tensor_bytes(&w->q_proj);
    len[1] = bk_tensor_bytes(&w->kv_a);
    len[2] = bk_tensor_bytes(&w->o_proj);
    len[3] = L * 4;
    len[4] = H * L * (uint64_t)c->qk_nope_dim * 4;
    len[5] = H * (uint64_t)c->v_head_dim * L * 4;
    len[6] = 0;
    for (int k = 0; k < 6; k++) {
        off[k] = o;
        o += (len[k] + 255) & ~(uint64_t)255;
    }
    return o;
}

static struct kli_gpu_mat
bk_mat(const struct kli_tensor *t, const void *dev)
{
    struct kli_gpu_mat g = {dev, (int32_t)t->dtype, (int32_t)t->shape[0],
                            (int32_t)t->shape[1]};

    return g;
}

/* Makes the projections of every MLA layer resident when all of them fit in `*avail` (taken
 * from it) and suit cu_mla_layer; otherwise they stay on the CPU and note says why. */
static int
bk_open_mla_proj(struct kli_model *m, uint64_t *avail, char *note, size_t note_cap,
                 struct kli_err *err)
{
    struct backend_model *bm = m->gpu;
    const struct kli_config *cfg = &m->cfg;
    const struct kli_config_mla *c = &cfg->mla;
    uint64_t off[7], len[7], need = 0;
    int rc;

    if (bm->ops->mla_layer == NULL || bm->ops->mla_layer_check == NULL)
        return KLI_OK;
    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_mixer[i] != KLI_MIXER_MLA)
            continue;
        const struct kli_mla_w *w = &m->layers[i].mla;
        struct kli_gpu_mla_w hw = {bk_mat(&w->q_proj, w->q_proj.data),
                                   bk_mat(&w->kv_a, w->kv_a.data),
                                   bk_mat(&w->o_proj, w->o_proj.data), w->kv_a_norm,
                                   w->w_uk_t, w->w_uv};
        struct kli_err e = {0};
        if (bm->ops->mla_layer_check(bm->g, &hw, (int32_t)cfg->d_model, c->n_heads,
                                     c->qk_nope_dim, c->qk_rope_dim, c->v_head_dim, &e) !=
            KLI_OK) {
            snprintf(note, note_cap, "MLA projections on the CPU (%.120s)", e.msg);
            return KLI_OK;
        }
        need += bk_mla_layout(m, w, off, len);
    }
    if (need == 0)
        return KLI_OK;
    if (need > *avail) {
        snprintf(note, note_cap, "MLA projections on the CPU (they need %.0f MiB)",
                 (double)need / 1048576.0);
        return KLI_OK;
    }
    if ((bm->mla_w = kli_calloc((size_t)cfg->n_layers, sizeof(*bm->mla_w))) == NULL)
        return kli_err_set(err, KLI_E_NOMEM, "out of memory");
    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_mixer[i] != KLI_MIXER_MLA)
            continue;
        const struct kli_mla_w *w = &m->layers[i].mla;
        struct bk_mla *d = &bm->mla_w[i];
        const void *src[6] = {w->q_proj.data, w->kv_a.data, w->o_proj.data, w->kv_a_norm,
                              w->w_uk_t, w->w_uv};
        uint64_t total = bk_mla_layout(m, w, off, len);
        if ((rc = bm->ops->alloc(bm->g, &d->buf, total, err)) != KLI_OK)
            return rc;
        d->bytes = total;
        char *b = d->buf;
        for (int k = 0; k < 6; k++) {
            if ((rc = bm->ops->upload(bm->g, b + off[k], src[k], len[k], err)) != KLI_OK)
                return rc;
        }
        d->w.q_proj = bk_mat(&w->q_proj, b + off[0]);
        d->w.kv_a = bk_mat(&w->kv_a, b + off[1]);
        d->w.o_proj = bk_mat(&w->o_proj, b + off[2]);
        d->w.kv_norm = (const float *)(b + off[3]);
        d->w.w_uk_t = (const float *)(b + off[4]);
        d->w.w_uv = (const float *)(b + off[5]);
    }
    *avail -= need;
    bm->mla_proj = 1;
    return KLI_OK;
}

/* A KDA layer's nine matrices, in the order of struct kli_gpu_kda_w's members. */
static void
bk_kda_mats(const struct kli_kda_w *w, const struct kli_tensor *t[9])
{
    t[0] = &w->q_proj;
    t[1] = &w->k_proj;
    t[2] = &w->v_proj;
    t[3] = &w->f_a;
    t[4] = &w->g_a;
    t[5] = &w->b_proj;
    t[6] = &w->f_b;
    t[7] = &w->g_b;
    t[8] = &w->o_proj;
}

/* The device layout of one KDA layer's weights: 9 matrices, conv, a_neg, dt_bias, o_norm. */
static uint64_t
bk_kda_layout(const struct kli_model *m, const struct kli_kda_w *w, uint64_t off[13],
              uint64_t len[13], const void *src[13])
{
    const struct kli_config_kda *c = &m->cfg.kda;
    uint64_t H = (uint64_t)c->n_heads, K = (uint64_t)c->head_dim, W = (uint64_t)c->conv_size;
    const struct kli_tensor *t[9];
    uint64_t o = 0;

    bk_kda_mats(w, t);

    for (int k = 0; k < 9; k++) {
        len[k] = bk_tensor_bytes(t[k]);
        src[k] = t[k]->data;
    }
    len[9] = 3 * H * K * W * 4;   /* the three tap arrays, uploaded one after the other */
    src[9] = NULL;
    len[10] = H * 4;
    src[10] = w->a_neg;
    len[11] = H * K * 4;
    src[11] = w->dt_bias;
    len[12] = K * 4;
    src[12] = w->o_norm;
    for (int k = 0; k < 13; k++) {
        off[k] = o;
        o += (len[k] + 255) & ~(uint64_t)255;
    }
    return o;
}

/* The layer as the kernels see it: with base NULL the host's own arrays (for kda_check's
 * look at shapes and dtypes), else the pieces at `off` in the device allocation base. */
static struct kli_gpu_kda_w
bk_kda_view(const struct kli_kda_w *w, const char *base, const uint64_t off[13])
{
    const struct kli_tensor *t[9];
    struct kli_gpu_kda_w d;
    struct kli_gpu_mat *dm[9] = {&d.q, &d.k, &d.v, &d.f_a, &d.g_a, &d.b, &d.f_b, &d.g_b, &d.o};

    bk_kda_mats(w, t);
    for (int k = 0; k < 9; k++)
        *dm[k] = bk_mat(t[k], base != NULL ? base + off[k] : t[k]->data);
    d.conv = base != NULL ? (const float *)(base + off[9]) : w->conv[0];
    d.a_neg = base != NULL ? (const float *)(base + off[10]) : w->a_neg;
    d.dt_bias = base != NULL ? (const float *)(base + off[11]) : w->dt_bias;
    d.o_norm = base != NULL ? (const float *)(base + off[12]) : w->o_norm;
    return d;
}

/* Device bytes of one sequence's states of one KDA layer: the recurrent state S (*bs) and
 * the conv state (*bc). @return their sum. */
static uint64_t
bk_kda_state_bytes(const struct kli_config *cfg, uint64_t *bs, uint64_t *bc)
{
    int64_t ns, nc;

    kda_state_floats(cfg, &ns, &nc);
    *bs = (uint64_t)ns * 4;
    *bc = (uint64_t)nc * 4;
    return *bs + *bc;
}

/* Device bytes of every MoE layer's shared and routed experts; UINT64_MAX when some FFN
 * does not suit cuda/moe.cu. */
static uint64_t
bk_experts_bytes(const struct kli_model *m)
{
    const struct kli_config *cfg = &m->cfg;
    uint64_t total = 0;

    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_ffn[i] != KLI_FFN_MOE)
            continue;
        const struct kli_moe_w *w = &m->layers[i].moe;
        for (int32_t e = 0; e < cfg->moe.n_experts; e++) {
            if (!bk_ffn_ok(&w->experts[e]))
                return UINT64_MAX;
            total += bk_alloc_bytes(&w->experts[e]);
        }
        if (cfg->moe.n_shared > 0) {
            if (!bk_ffn_ok(&w->shared))
                return UINT64_MAX;
            total += bk_alloc_bytes(&w->shared);
        }
    }
    return total;
}

/* Whole-model mode: every KDA layer's weights and lm_head, when they fit `*avail` together
 * with what the MoE layers need for all their experts (`experts`), and suit the kernels. */
static int
bk_open_all(struct kli_model *m, uint64_t *avail, uint64_t experts, char *note,
            size_t note_cap, struct kli_err *err)
{
    struct backend_model *bm = m->gpu;
    const struct kli_config *cfg = &m->cfg;
    uint64_t off[13], len[13], need = 0;
    const void *src[13];
    int rc;

    if (bm->ops->kda_layer == NULL || bm->ops->matmul == NULL || !bm->mla_proj)
        return KLI_OK;
    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_mixer[i] != KLI_MIXER_KDA)
            continue;
        const struct kli_kda_w *w = &m->layers[i].kda;
        struct kli_gpu_kda_w hw = bk_kda_view(w, NULL, NULL);
        struct kli_err e = {0};
        if (bm->ops->kda_check(bm->g, &hw, (int32_t)cfg->d_model, cfg->kda.n_heads,
                               cfg->kda.head_dim, cfg->kda.conv_size, &e) != KLI_OK) {
            snprintf(note, note_cap, "KDA layers on the CPU (%.120s)", e.msg);
            return KLI_OK;
        }
        need += bk_kda_layout(m, w, off, len, src);
    }
    struct kli_gpu_mat lm = bk_mat(&m->lm_head, m->lm_head.data);
    uint64_t lm_bytes = bk_tensor_bytes(&m->lm_head);
    if (lm.cols % 8 != 0 || ((lm.dtype == KLI_DT_Q8_0 || lm.dtype == KLI_DT_Q4) &&
                             lm.cols % 32 != 0) || lm.dtype < KLI_DT_F32 ||
        lm.dtype > KLI_DT_Q4)
        return KLI_OK;
    need += lm_bytes;
    if (need + experts > *avail) {
        snprintf(note, note_cap, "KDA layers and lm_head on the CPU (the whole model needs "
                 "%.0f MiB of GPU memory)", (double)(need + experts) / 1048576.0);
        return KLI_OK;
    }
    if ((bm->kda_w = kli_calloc((size_t)cfg->n_layers, sizeof(*bm->kda_w))) == NULL)
        return kli_err_set(err, KLI_E_NOMEM, "out of memory");
    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_mixer[i] != KLI_MIXER_KDA)
            continue;
        const struct kli_kda_w *w = &m->layers[i].kda;
        struct bk_kda *d = &bm->kda_w[i];
        uint64_t total = bk_kda_layout(m, w, off, len, src);
        if ((rc = bm->ops->alloc(bm->g, &d->buf, total, err)) != KLI_OK)
            return rc;
        d->bytes = total;
        char *b = d->buf;
        for (int k = 0; k < 13; k++) {
            if (k == 9) {
                uint64_t one = len[9] / 3;
                for (int p = 0; p < 3; p++) {
                    if ((rc = bm->ops->upload(bm->g, b + off[9] + p * one, w->conv[p], one,
                                              err)) != KLI_OK)
                        return rc;
                }
            } else if ((rc = bm->ops->upload(bm->g, b + off[k], src[k], len[k], err)) !=
                       KLI_OK) {
                return rc;
            }
        }
        d->w = bk_kda_view(w, b, off);
    }
    if ((rc = bm->ops->alloc(bm->g, &bm->lm_buf, lm_bytes, err)) != KLI_OK ||
        (rc = bm->ops->upload(bm->g, bm->lm_buf, m->lm_head.data, lm_bytes, err)) != KLI_OK)
        return rc;
    bm->lm_bytes = lm_bytes;
    bm->lm = bk_mat(&m->lm_head, bm->lm_buf);
    *avail -= need;
    bm->all = 1;
    return KLI_OK;
}

/* Sets up the experts of every MoE layer: the shared ones, then the first hot sets. */
static int
bk_open_experts(struct kli_model *m, const struct kli_model_options *opt, uint64_t avail,
                char *note, size_t note_cap, struct kli_err *err)
{
    struct backend_model *bm = m->gpu;
    const struct kli_config *cfg = &m->cfg;
    int32_t E = cfg->moe.n_experts, n_moe = 0;
    uint64_t shared = 0;
    int rc;

    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_ffn[i] != KLI_FFN_MOE)
            continue;
        const struct kli_moe_w *w = &m->layers[i].moe;
        for (int32_t e = 0; e < E; e++) {
            if (!bk_ffn_ok(&w->experts[e])) {
                snprintf(note, note_cap, "experts on the CPU (%s weights, or widths not "
                         "multiples of 32)", kli_dtype_name(w->experts[e].gate.dtype));
                return KLI_OK;
            }
        }
        if (cfg->moe.n_shared > 0) {
            if (!bk_ffn_ok(&w->shared)) {
                snprintf(note, note_cap, "experts on the CPU (shared expert in %s)",
                         kli_dtype_name(w->shared.gate.dtype));
                return KLI_OK;
            }
            shared += bk_alloc_bytes(&w->shared);
        }
        bm->exp_bytes = bk_alloc_bytes(&w->experts[0]);
        n_moe++;
    }
    if (n_moe == 0)
        return KLI_OK;
    if (shared > avail) {
        snprintf(note, note_cap, "experts on the CPU (the shared experts need %.0f MiB)",
                 (double)shared / 1048576.0);
        return KLI_OK;
    }
    avail -= shared;
    int64_t fit = (int64_t)(avail / ((uint64_t)n_moe * bm->exp_bytes));
    int64_t want = opt->gpu_experts < 0 ? E : opt->gpu_experts;
    bm->n_hot = (int32_t)(want < fit ? want : fit);
    if (bm->n_hot > E)
        bm->n_hot = E;
    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_ffn[i] != KLI_FFN_MOE)
            continue;
        struct bk_layer *bl = &bm->layer[i];
        bl->exp = kli_calloc((size_t)E, sizeof(*bl->exp));
        bl->buf = kli_calloc((size_t)E, sizeof(*bl->buf));
        bl->count = kli_calloc((size_t)E, sizeof(*bl->count));
        if (bl->exp == NULL || bl->buf == NULL || bl->count == NULL)
            return kli_err_set(err, KLI_E_NOMEM, "out of memory");
        if (cfg->moe.n_shared > 0 &&
            (rc = bk_ffn_upload(bm, &m->layers[i].moe.shared, &bl->shared, &bl->shared_buf,
                                err)) != KLI_OK)
            return rc;
    }
    if (opt->gpu_profile != NULL && bm->n_hot < E &&
        (rc = bk_read_profile(bm, opt->gpu_profile, err)) != KLI_OK)
        return rc;
    int32_t least = E;
    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_ffn[i] != KLI_FFN_MOE)
            continue;
        bk_fill(bm, i);
        int32_t n = 0;
        for (int32_t e = 0; e < E; e++)
            n += bm->layer[i].exp[e].gate != NULL;
        least = n < least ? n : least;
    }
    bm->n_hot = least;
    bm->experts = 1;
    if (want > least && opt->gpu_experts >= 0)
        snprintf(note, note_cap, "shared expert + %d of %d routed experts per MoE layer (%lld "
                 "asked; the budget holds %d)", least, E, (long long)want, least);
    else if (want > least)
        snprintf(note, note_cap, "shared expert + %d of %d routed experts per MoE layer (as "
                 "many as the budget holds)", least, E);
    else
        snprintf(note, note_cap, "shared expert + %d of %d routed experts per MoE layer",
                 least, E);
    return KLI_OK;
}

int
backend_model_open(struct kli_model *m, const struct kli_model_options *opt,
                   struct kli_err *err)
{
    const struct kli_config *cfg = &m->cfg;
    struct backend_model *bm;
    struct kli_err e2 = {0};
    char why[300], note[160] = "";
    int rc, dev = 0;

    m->gpu = NULL;
    if (opt->gpu == KLI_GPU_OFF)
        return KLI_OK;
    if (opt->gpu != KLI_GPU_AUTO && opt->gpu != KLI_GPU_ON)
        return kli_err_set(err, KLI_E_RANGE, "gpu mode %d is not KLI_GPU_AUTO, _OFF or _ON",
                           opt->gpu);
    if (opt->gpu_experts < -1)
        return kli_err_set(err, KLI_E_RANGE, "gpu_experts %d: -1 (as many as fit) or a count",
                           opt->gpu_experts);
    if ((bm = kli_calloc(1, sizeof(*bm))) == NULL)
        return kli_err_set(err, KLI_E_NOMEM, "out of memory");
    m->gpu = bm;
    bm->m = m;
    if ((bm->ops = backend_cuda()) == NULL)
        return bk_cpu_only(m, opt, KLI_E_UNSUPPORTED, "this kli was built without CUDA", err);
    const char *env = getenv("KLI_CUDA_DEVICE");
    if (env != NULL && *env != '\0') {
        char *end;
        long v = strtol(env, &end, 10);
        if (*end != '\0' || v < 0 || v > 1024)
            return kli_err_set(err, KLI_E_RANGE, "KLI_CUDA_DEVICE=%s is not a device index",
                               env);
        dev = (int)v;
    }
    if (bm->ops->open(&bm->g, dev, opt->gpu_mem, &bm->info, &e2) != KLI_OK)
        return bk_cpu_only(m, opt, e2.code, e2.msg, err);
    pthread_rwlock_init(&bm->lock, NULL);
    pthread_mutex_init(&bm->status_lock, NULL);
    bm->have_locks = 1;
    bm->layer = kli_calloc((size_t)cfg->n_layers, sizeof(*bm->layer));
    if (bm->layer == NULL)
        return kli_err_set(err, KLI_E_NOMEM, "out of memory");

    uint64_t budget = 0;
    bm->ops->used(bm->g, &budget);
    if (budget < ((uint64_t)64 << 20)) {
        snprintf(why, sizeof(why), "not enough GPU memory (a budget of %.0f MiB of %.0f MiB "
                 "free on %s)", (double)budget / 1048576.0,
                 (double)bm->info.mem_free / 1048576.0, bm->info.name);
        return bk_cpu_only(m, opt, KLI_E_NOMEM, why, err);
    }

    /* MLA attention: the shape must suit the kernel; the mirrors grow as sessions do. */
    int64_t n_mla = 0, C = mla_row_floats(cfg);
    for (int i = 0; i < cfg->n_layers; i++)
        n_mla += cfg->layer_mixer[i] == KLI_MIXER_MLA;
    char mla_note[200] = "";
    if (n_mla > 0) {
        struct kli_err e3 = {0};
        if (bm->ops->mla_check(bm->g, cfg->mla.n_heads, cfg->mla.kv_lora_rank, (int32_t)C,
                               &e3) == KLI_OK)
            bm->mla = 1;
        else
            snprintf(mla_note, sizeof(mla_note), "MLA attention on the CPU (%.160s)", e3.msg);
    }

    /* Experts get what the mirrors (budgeted for 128K tokens) and the workspaces leave. */
    int64_t ctx = cfg->ctx_max < BK_MLA_RESERVE_CTX ? cfg->ctx_max : BK_MLA_RESERVE_CTX;
    uint64_t reserve = BK_WORKSPACE_RESERVE +
                       (bm->mla ? (uint64_t)n_mla * (uint64_t)C * 4 * (uint64_t)ctx : 0);
    uint64_t avail = budget > reserve ? budget - reserve : 0;
    if (bm->mla && (rc = bk_open_mla_proj(m, &avail, mla_note, sizeof(mla_note), err)) !=
        KLI_OK) {
        backend_model_close(m);
        return rc;
    }
    /* The whole model, when it fits with every expert and room for two sessions' KDA
     * states: KDA layers and lm_head first, then the experts take their share. */
    char all_note[200] = "";
    if (bm->mla_proj && (opt->gpu_experts < 0 || opt->gpu_experts >= cfg->moe.n_experts)) {
        uint64_t ex = bk_experts_bytes(m);
        int64_t n_kda = 0;
        for (int i = 0; i < cfg->n_layers; i++)
            n_kda += cfg->layer_mixer[i] == KLI_MIXER_KDA;
        uint64_t bs, bc;
        uint64_t states = 2 * (uint64_t)n_kda * bk_kda_state_bytes(cfg, &bs, &bc);
        if (ex != UINT64_MAX && ex + states <= avail) {
            uint64_t a2 = avail - states;
            if ((rc = bk_open_all(m, &a2, ex, all_note, sizeof(all_note), err)) != KLI_OK) {
                backend_model_close(m);
                return rc;
            }
            if (bm->all)
                avail = a2 + states;
        }
    }
    if (cfg->moe.n_experts > 0 && opt->gpu_experts != 0 &&
        (rc = bk_open_experts(m, opt, avail, note, sizeof(note), err)) != KLI_OK) {
        backend_model_close(m);
        return rc;
    }
    if (bm->all && bm->n_hot < cfg->moe.n_experts && cfg->moe.n_experts > 0)
        bm->all = 0;   /* not every expert found room after all: KDA stays on the CPU */
    if (bm->experts && bm->n_hot > 0 && bm->n_hot < cfg->moe.n_experts) {
        /* without the mover the first hot set simply stays */
        pthread_mutex_init(&bm->mv_lock, NULL);
        pthread_cond_init(&bm->mv_cond, NULL);
        if (pthread_create(&bm->mover, NULL, bk_mover, bm) == 0) {
            bm->have_mover = 1;
        } else {
            pthread_mutex_destroy(&bm->mv_lock);
            pthread_cond_destroy(&bm->mv_cond);
        }
    }
    if (!bm->mla && !bm->experts) {
        snprintf(why, sizeof(why), "nothing for the GPU (%s)",
                 mla_note[0] ? mla_note : note[0] ? note : "no MLA layers, experts off");
        return bk_cpu_only(m, opt, KLI_E_UNSUPPORTED, why, err);
    }
    char what[400];
    if (bm->all)
        snprintf(what, sizeof(what), "the whole model (KDA and MLA layers, lm_head)");
    else if (bm->mla_proj && all_note[0])
        snprintf(what, sizeof(what), "MLA layers; %s", all_note);
    else if (bm->mla_proj)
        snprintf(what, sizeof(what), "MLA layers");
    else if (bm->mla)
        snprintf(what, sizeof(what), "MLA attention%s%s", mla_note[0] ? "; " : "", mla_note);
    else
        snprintf(what, sizeof(what), "%s", mla_note);
    snprintf(bm->status, sizeof(bm->status), "GPU %d: %s, %.1f GiB budget: %s%s%s", dev,
             bm->info.name, (double)budget / 1073741824.0, what, what[0] ? "; " : "",
             note[0] ? note : "experts on the CPU");
    return KLI_OK;
}

/* ==== Session: queue and cache mirrors ======================================================= */

void
backend_sess_free(struct kli_session *s)
{
    struct backend_sess *g = s->gpu;

    if (g == NULL)
        return;
    struct backend_model *bm = g->bm;
    int64_t C = mla_row_floats(&s->m->cfg);
    if (g->q != NULL)
        bm->ops->queue_sync(g->q, NULL);
    if (g->dc != NULL) {
        for (int i = 0; i < s->m->cfg.n_layers; i++) {
            if (g->dc[i] != NULL)
                bm->ops->release(bm->g, g->dc[i], (uint64_t)g->dcap[i] * C * 4);
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
    free(g->dc);
    free(g->dcap);
    free(g->synced);
    free(g->toks);
    free(g->cptr);
    free(g->newrows);
    free(g->nrow);
    free(g->items);
    free(g->start);
    free(g->row);
    free(g->wt);
    free(g);
    s->gpu = NULL;
}

int
backend_sess_create(struct kli_session *s, struct kli_err *err)
{
    struct backend_model *bm = s->m->gpu;
    const struct kli_config *cfg = &s->m->cfg;
    struct backend_sess *g;

    s->gpu = NULL;
    if (bm == NULL || bm->g == NULL)
        return KLI_OK;
    if ((g = kli_calloc(1, sizeof(*g))) == NULL)
        return kli_err_set(err, KLI_E_NOMEM, "out of memory");
    s->gpu = g;
    g->bm = bm;
    g->s = s;
    size_t nl = (size_t)cfg->n_layers, B = (size_t)s->batch_max;
    size_t E = (size_t)(cfg->moe.n_experts > 0 ? cfg->moe.n_experts : 1);
    size_t P = B * (size_t)(cfg->moe.top_k + 1);
    g->dc = kli_calloc(nl, sizeof(*g->dc));
    g->dcap = kli_calloc(nl, sizeof(*g->dcap));
    g->synced = kli_calloc(nl, sizeof(*g->synced));
    g->cptr = kli_calloc(B, sizeof(*g->cptr));
    g->newrows = kli_calloc(B * (size_t)mla_row_floats(cfg), sizeof(float));
    g->nrow = kli_calloc(B, sizeof(*g->nrow));
    g->items = kli_calloc(E + 1, sizeof(*g->items));
    g->start = kli_calloc(E + 2, sizeof(*g->start));
    g->row = kli_calloc(P, sizeof(*g->row));
    g->wt = kli_calloc(P, sizeof(*g->wt));
    if (!g->dc || !g->dcap || !g->synced || !g->cptr || !g->newrows || !g->nrow ||
        !g->items || !g->start || !g->row || !g->wt) {
        backend_sess_free(s);
        return kli_err_set(err, KLI_E_NOMEM, "out of memory");
    }
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
        g->dS = kli_calloc(nl, sizeof(*g->dS));
        g->dconv = kli_calloc(nl, sizeof(*g->dconv));
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
static void
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
        kli_token *t = kli_reallocarray(g->toks, (size_t)cap, sizeof(*t));
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
    const struct kli_config *cfg = &g->s->m->cfg;
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
bk_push(struct backend_sess *g, struct kli_gpu_queue *q, struct kli_err *err)
{
    const struct kli_config *cfg = &g->s->m->cfg;
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
    const struct kli_config *cfg = &bm->m->cfg;
    float *S[FORWARD_MAX_SEQ_BK], *C[FORWARD_MAX_SEQ_BK];

    if (!g0->kda_pass)
        return BACKEND_CPU;
    if (n_seq > FORWARD_MAX_SEQ_BK)
        return kli_err_set(err, KLI_E_RANGE, "kda layer: %lld sequences", (long long)n_seq);
    for (int64_t q = 0; q < n_seq; q++) {
        S[q] = gs[q]->dS[layer];
        C[q] = gs[q]->dconv[layer];
    }
    struct kli_gpu_kda_job j = {
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
bk_mirror(struct backend_sess *g, struct kli_gpu_queue *q, int i, const float *cache,
          int64_t need, int64_t room, struct kli_err *err)
{
    struct backend_model *bm = g->bm;
    const struct kli_backend_ops *ops = bm->ops;
    int64_t C = mla_row_floats(&bm->m->cfg);
    int rc;

    if (room > g->dcap[i]) {
        int64_t cap = g->dcap[i] > 0 ? 2 * g->dcap[i] : 1024;
        void *p = NULL;
        while (cap < room)
            cap *= 2;
        if (cap > g->s->ctx_max)
            cap = g->s->ctx_max > room ? g->s->ctx_max : room;
        if (ops->alloc(bm->g, &p, (uint64_t)cap * C * 4, NULL) != KLI_OK &&
            (cap = room, rc = ops->alloc(bm->g, &p, (uint64_t)cap * C * 4, err)) != KLI_OK)
            return rc;
        if (g->synced[i] > 0 &&
            (rc = ops->queue_copy(q, p, g->dc[i], (uint64_t)g->synced[i] * C * 4, err)) !=
            KLI_OK) {
            ops->release(bm->g, p, (uint64_t)cap * C * 4);
            return rc;
        }
        if (g->dc[i] != NULL) {
            if ((rc = ops->queue_sync(q, err)) != KLI_OK)
                return rc;
            ops->release(bm->g, g->dc[i], (uint64_t)g->dcap[i] * C * 4);
        }
        g->dc[i] = p;
        g->dcap[i] = cap;
    }
    if (need > g->synced[i]) {
        if ((rc = ops->queue_upload(q, g->dc[i] + g->synced[i] * C, cache + g->synced[i] * C,
                                    (uint64_t)(need - g->synced[i]) * C * 4, err)) != KLI_OK)
            return rc;
        g->synced[i] = need;
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
    const struct kli_config_mla *c = &bm->m->cfg.mla;
    struct kli_err e = {0};

    if (!bm->mla || g0->dead)
        return BACKEND_CPU;
    for (int64_t q = 0; q < n_seq; q++) {
        if (gs[q]->mla_off)
            return BACKEND_CPU;
        int rc = bk_mirror(gs[q], g0->q, layer, caches[q], pos[q] + T_seq, pos[q] + T_seq,
                           &e);
        if (rc == KLI_E_NOMEM) {
            gs[q]->mla_off = 1;   /* over the budget: this session's attention stays here */
            return BACKEND_CPU;
        }
        if (rc != KLI_OK) {
            bk_dead(g0, &e);
            return BACKEND_CPU;
        }
    }
    int64_t T = n_seq * T_seq;
    for (int64_t t = 0; t < T; t++) {
        int64_t q = t / T_seq;
        g0->cptr[t] = gs[q]->dc[layer];
        g0->nrow[t] = pos[q] + t % T_seq + 1;
    }
    struct kli_gpu_mla_job j = {
        T, c->n_heads, c->kv_lora_rank, (int32_t)mla_row_floats(&bm->m->cfg),
        1.0f / sqrtf((float)(c->qk_nope_dim + c->qk_rope_dim)),
        g0->cptr, g0->nrow, qfull, lat,
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
    const struct kli_config *cfg = &bm->m->cfg;
    const struct kli_config_mla *c = &cfg->mla;
    int64_t C = mla_row_floats(cfg), T = n_seq * T_seq;
    struct kli_err e = {0};

    if (!bm->mla_proj || bm->mla_w[layer].buf == NULL || g0->dead)
        return BACKEND_CPU;
    /* the device needs every earlier row, and room for this pass's */
    for (int64_t q = 0; q < n_seq; q++) {
        if (gs[q]->mla_off)
            return BACKEND_CPU;
        int rc = bk_mirror(gs[q], g0->q, layer, caches[q], pos[q], pos[q] + T_seq, &e);
        if (rc == KLI_E_NOMEM) {
            gs[q]->mla_off = 1;
            return BACKEND_CPU;
        }
        if (rc != KLI_OK) {
            bk_dead(g0, &e);
            return BACKEND_CPU;
        }
    }
    for (int64_t t = 0; t < T; t++) {
        int64_t q = t / T_seq;
        g0->cptr[t] = gs[q]->dc[layer];
        g0->nrow[t] = pos[q] + t % T_seq + 1;
    }
    struct kli_gpu_mla_layer_job j = {
        T, (int32_t)cfg->d_model, c->n_heads, c->kv_lora_rank, c->qk_rope_dim, c->qk_nope_dim,
        c->v_head_dim, 1.0f / sqrtf((float)(c->qk_nope_dim + c->qk_rope_dim)),
        1e-6f,   /* kv_a_layernorm's eps (doc/model.md decision 3), as mla_forward */
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

/* ==== MoE: counting, the hot set, and the device's share of a layer ========================= */

int
backend_moe_launch(struct backend_sess *g, int layer, const struct moe_scratch *sc,
                   const float *x, int64_t T)
{
    struct backend_model *bm = g->bm;
    const struct kli_config_moe *c = &bm->m->cfg.moe;
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
    struct kli_gpu_moe_job j = {T, bm->m->cfg.d_model, x, n, g->items, g->start, g->row,
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
