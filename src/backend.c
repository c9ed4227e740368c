/*
 * backend.c - what of the model runs on an accelerator: opening the device, the budget, the
 * resident weights, the status line. The glue is three files over one private header
 * (backend_int.h): this one (the plan, at model open), backend_hot.c (the hot set of each MoE
 * layer, its mover, and the device's share of a MoE layer) and backend_sess.c (each session's
 * queue, its mirrors of the MLA caches and the KDA states, and the per-layer calls).
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
 * Every failure is the CPU's cue: an open that fails leaves "CPU only: <why>" in the status
 * (or is an error with KLI_GPU_ON), a memory budget that runs out keeps that layer's
 * attention on the CPU, and a CUDA error in a step sends the session to the CPU for good.
 */
#include "config.h"
#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "backend_int.h"
#include "internal.h"
#include "model.h"
#include "moe.h"
#include "session.h"
#ifdef HAVE_CUDA
#include "kli_cuda.h"
#endif

/* Bytes kept free for queues' workspaces when sizing the hot set. */
#define BK_WORKSPACE_RESERVE ((uint64_t)512 << 20)
/* Context the MLA mirrors are budgeted for when sizing the hot set. */
#define BK_MLA_RESERVE_CTX 131072

const struct backend_ops *
backend_cuda(void)
{
#ifdef HAVE_CUDA
    return cuda_backend();
#else
    return NULL;
#endif
}

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
void
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

void
bk_note_cpu(struct backend_model *bm, const char *type)
{
    unsigned bit = type[0] == 'b' ? 1u : 2u;

    pthread_mutex_lock(&bm->status_lock);
    if (!(bm->cpu_caches & bit)) {
        size_t n = strlen(bm->status);
        bm->cpu_caches |= bit;
        snprintf(bm->status + n, sizeof(bm->status) - n, "; sessions with a %s latent cache "
                 "compute on the CPU (KLI_CUDA_NARROW_CACHE=1 moves their attention to the GPU, "
                 "experimental)", type);
    }
    pthread_mutex_unlock(&bm->status_lock);
}

uint64_t
bk_tensor_bytes(const struct tensor *t)
{
    return model_row_bytes(t) * (uint64_t)t->shape[0];
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
                    bk_ffn_release(bm, &bl->exp[e], &bl->buf[e],
                                   bk_alloc_bytes(&m->layers[i].moe.experts[e]));
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
        return err_set(err, code == KLI_E_NOMEM ? KLI_E_NOMEM : KLI_E_CUDA,
                           "a GPU was required: %s", why);
    snprintf(bm->status, sizeof(bm->status), "CPU only: %s", why);
    if (bm->layer != NULL || bm->g != NULL) {
        /* keep only the status: release whatever the device holds */
        char keep[sizeof(bm->status)];
        memcpy(keep, bm->status, sizeof(keep));
        backend_model_close(m);
        bm = k_calloc(1, sizeof(*bm));
        if (bm == NULL)
            return err_set(err, KLI_E_NOMEM, "out of memory");
        memcpy(bm->status, keep, sizeof(keep));
        m->gpu = bm;
    }
    return KLI_OK;
}

/* One device allocation of `total` bytes for a layer's weights (*buf, *bytes), with the
 * pieces src[k] (len[k] bytes; NULL: the caller fills that piece) copied to off[k]. */
static int
bk_upload_layout(struct backend_model *bm, void **buf, uint64_t *bytes, uint64_t total, int n,
                 const uint64_t *off, const uint64_t *len, const void *const *src,
                 struct kli_err *err)
{
    int rc;

    if ((rc = bm->ops->alloc(bm->g, buf, total, err)) != KLI_OK)
        return rc;
    *bytes = total;
    for (int k = 0; k < n; k++) {
        if (src[k] != NULL &&
            (rc = bm->ops->upload(bm->g, (char *)*buf + off[k], src[k], len[k], err)) != KLI_OK)
            return rc;
    }
    return KLI_OK;
}

/* The device layout of one MLA layer's weights: what cu_mla_layer reads. Pieces start on
 * 256-byte boundaries of one allocation; off[] are their offsets, the return the total. */
static uint64_t
bk_mla_layout(const struct kli_model *m, const struct k_mla_w *w, uint64_t off[7],
              uint64_t len[7])
{
    const struct config_mla *c = &m->cfg.mla;
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

static struct gpu_mat
bk_mat(const struct tensor *t, const void *dev)
{
    struct gpu_mat g = {dev, (int32_t)t->dtype, (int32_t)t->shape[0],
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
    const struct k_config *cfg = &m->cfg;
    const struct config_mla *c = &cfg->mla;
    uint64_t off[7], len[7], need = 0;
    int rc;

    if (bm->ops->mla_layer == NULL || bm->ops->mla_layer_check == NULL)
        return KLI_OK;
    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_mixer[i] != KLI_MIXER_MLA)
            continue;
        const struct k_mla_w *w = &m->layers[i].mla;
        struct gpu_mla_w hw = {bk_mat(&w->q_proj, w->q_proj.data),
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
    if ((bm->mla_w = k_calloc((size_t)cfg->n_layers, sizeof(*bm->mla_w))) == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_mixer[i] != KLI_MIXER_MLA)
            continue;
        const struct k_mla_w *w = &m->layers[i].mla;
        struct bk_mla *d = &bm->mla_w[i];
        const void *src[6] = {w->q_proj.data, w->kv_a.data, w->o_proj.data, w->kv_a_norm,
                              w->w_uk_t, w->w_uv};
        if ((rc = bk_upload_layout(bm, &d->buf, &d->bytes, bk_mla_layout(m, w, off, len), 6,
                                   off, len, src, err)) != KLI_OK)
            return rc;
        char *b = d->buf;
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

/* A KDA layer's nine matrices, in the order of struct gpu_kda_w's members. */
static void
bk_kda_mats(const struct k_kda_w *w, const struct tensor *t[9])
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
bk_kda_layout(const struct kli_model *m, const struct k_kda_w *w, uint64_t off[13],
              uint64_t len[13], const void *src[13])
{
    const struct config_kda *c = &m->cfg.kda;
    uint64_t H = (uint64_t)c->n_heads, K = (uint64_t)c->head_dim, W = (uint64_t)c->conv_size;
    const struct tensor *t[9];
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
static struct gpu_kda_w
bk_kda_view(const struct k_kda_w *w, const char *base, const uint64_t off[13])
{
    const struct tensor *t[9];
    struct gpu_kda_w d;
    struct gpu_mat *dm[9] = {&d.q, &d.k, &d.v, &d.f_a, &d.g_a, &d.b, &d.f_b, &d.g_b, &d.o};

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
uint64_t
bk_kda_state_bytes(const struct k_config *cfg, uint64_t *bs, uint64_t *bc)
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
    const struct k_config *cfg = &m->cfg;
    uint64_t total = 0;

    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_ffn[i] != KLI_FFN_MOE)
            continue;
        const struct moe_w *w = &m->layers[i].moe;
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
    const struct k_config *cfg = &m->cfg;
    uint64_t off[13], len[13], need = 0;
    const void *src[13];
    int rc;

    if (bm->ops->kda_layer == NULL || bm->ops->matmul == NULL || !bm->mla_proj)
        return KLI_OK;
    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_mixer[i] != KLI_MIXER_KDA)
            continue;
        const struct k_kda_w *w = &m->layers[i].kda;
        struct gpu_kda_w hw = bk_kda_view(w, NULL, NULL);
        struct kli_err e = {0};
        if (bm->ops->kda_check(bm->g, &hw, (int32_t)cfg->d_model, cfg->kda.n_heads,
                               cfg->kda.head_dim, cfg->kda.conv_size, &e) != KLI_OK) {
            snprintf(note, note_cap, "KDA layers on the CPU (%.120s)", e.msg);
            return KLI_OK;
        }
        need += bk_kda_layout(m, w, off, len, src);
    }
    struct gpu_mat lm = bk_mat(&m->lm_head, m->lm_head.data);
    uint64_t lm_bytes = bk_tensor_bytes(&m->lm_head);
    if (!gpu_dtype_ok(lm.dtype, lm.cols))
        return KLI_OK;
    need += lm_bytes;
    if (need + experts > *avail) {
        snprintf(note, note_cap, "KDA layers and lm_head on the CPU (the whole model needs "
                 "%.0f MiB of GPU memory)", (double)(need + experts) / 1048576.0);
        return KLI_OK;
    }
    if ((bm->kda_w = k_calloc((size_t)cfg->n_layers, sizeof(*bm->kda_w))) == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_mixer[i] != KLI_MIXER_KDA)
            continue;
        const struct k_kda_w *w = &m->layers[i].kda;
        struct bk_kda *d = &bm->kda_w[i];
        if ((rc = bk_upload_layout(bm, &d->buf, &d->bytes, bk_kda_layout(m, w, off, len, src),
                                   13, off, len, src, err)) != KLI_OK)
            return rc;
        char *b = d->buf;
        uint64_t one = len[9] / 3;   /* piece 9: the q, k and v conv taps, three tensors */
        for (int p = 0; p < 3; p++) {
            if ((rc = bm->ops->upload(bm->g, b + off[9] + p * one, w->conv[p], one, err)) !=
                KLI_OK)
                return rc;
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
    const struct k_config *cfg = &m->cfg;
    int32_t E = cfg->moe.n_experts, n_moe = 0;
    uint64_t shared = 0;
    int rc;

    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_ffn[i] != KLI_FFN_MOE)
            continue;
        const struct moe_w *w = &m->layers[i].moe;
        for (int32_t e = 0; e < E; e++) {
            if (!bk_ffn_ok(&w->experts[e])) {
                snprintf(note, note_cap, "experts on the CPU (%s and %s weights, widths %lld "
                         "and %lld)", k_dtype_name(w->experts[e].gate.dtype),
                         k_dtype_name(w->experts[e].down.dtype),
                         (long long)w->experts[e].gate.shape[1],
                         (long long)w->experts[e].gate.shape[0]);
                return KLI_OK;
            }
        }
        if (cfg->moe.n_shared > 0) {
            if (!bk_ffn_ok(&w->shared)) {
                snprintf(note, note_cap, "experts on the CPU (shared expert in %s)",
                         k_dtype_name(w->shared.gate.dtype));
                return KLI_OK;
            }
            shared += bk_alloc_bytes(&w->shared);
        }
        /* the widest layer's (a GGUF mix may give layers different types) */
        uint64_t eb = bk_alloc_bytes(&w->experts[0]);
        bm->exp_bytes = eb > bm->exp_bytes ? eb : bm->exp_bytes;
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
        bl->exp = k_calloc((size_t)E, sizeof(*bl->exp));
        bl->buf = k_calloc((size_t)E, sizeof(*bl->buf));
        bl->count = k_calloc((size_t)E, sizeof(*bl->count));
        if (bl->exp == NULL || bl->buf == NULL || bl->count == NULL)
            return err_set(err, KLI_E_NOMEM, "out of memory");
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
    const struct k_config *cfg = &m->cfg;
    struct backend_model *bm;
    struct kli_err e2 = {0};
    char why[300], note[160] = "";
    int rc, dev = 0;

    m->gpu = NULL;
    if (opt->gpu == KLI_GPU_OFF)
        return KLI_OK;
    if (opt->gpu != KLI_GPU_AUTO && opt->gpu != KLI_GPU_ON)
        return err_set(err, KLI_E_RANGE, "gpu mode %d is not KLI_GPU_AUTO, _OFF or _ON",
                           opt->gpu);
    if (opt->gpu_experts < -1)
        return err_set(err, KLI_E_RANGE, "gpu_experts %d: -1 (as many as fit) or a count",
                           opt->gpu_experts);
    if ((bm = k_calloc(1, sizeof(*bm))) == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    m->gpu = bm;
    bm->m = m;
    if ((bm->ops = backend_cuda()) == NULL)
        return bk_cpu_only(m, opt, KLI_E_UNSUPPORTED, "this kli was built without CUDA", err);
    const char *env = getenv("KLI_CUDA_DEVICE");
    if (env != NULL && *env != '\0') {
        char *end;
        long v = strtol(env, &end, 10);
        if (*end != '\0' || v < 0 || v > 1024)
            return err_set(err, KLI_E_RANGE, "KLI_CUDA_DEVICE=%s is not a device index",
                               env);
        dev = (int)v;
    }
    if (bm->ops->open(&bm->g, dev, opt->gpu_mem, &bm->info, &e2) != KLI_OK)
        return bk_cpu_only(m, opt, e2.code, e2.msg, err);
    pthread_rwlock_init(&bm->lock, NULL);
    pthread_mutex_init(&bm->status_lock, NULL);
    bm->have_locks = 1;
    bm->layer = k_calloc((size_t)cfg->n_layers, sizeof(*bm->layer));
    if (bm->layer == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");

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
