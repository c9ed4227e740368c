/*
 * xcache.c - the bounded routed-expert cache of edge mode (see xcache.h).
 *
 * Slots move EMPTY -> QUEUED -> LOADING -> READY (or FAILED) under the cache mutex; an I/O
 * thread owns a slot's buffer while it is LOADING. A slot can be evicted only when it is
 * READY, FAILED or EMPTY and nobody pins it. Two FIFO queues feed the I/O threads: demand
 * loads (experts a layer is about to compute) before speculative ones.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "xcache.h"
#include "util.h"

#define XC_IO_THREADS 2
#define XC_MERGE_GAP (64u << 10)   /* ranges closer than this are read as one */
#define XC_READ_CHUNK (8u << 20)   /* bytes per pread call */

enum { XS_EMPTY, XS_QUEUED, XS_LOADING, XS_READY, XS_FAILED };

/* Where one routed expert lives in the files: up to three ranges (one when contiguous). */
struct xsrc {
    int32_t n_ranges;
    int32_t file[3];
    uint64_t off[3], len[3], at[3];   /* at: where the range goes in the slot buffer */
    uint64_t toff[3];                 /* gate, up, down: offset in the slot buffer */
    uint64_t tlen[3];
    uint64_t sum[3];                  /* .kli checksums of gate, up, down */
    int has_sum;
};

struct xslot {
    int32_t key;              /* layer * E + expert, -1 when empty */
    int state;
    int pins;
    int held;                 /* pinned by xcache_begin, not yet taken by xcache_get */
    int prefetch;             /* loaded speculatively and not used yet */
    int spec;                 /* a speculative read is queued or running */
    uint64_t demand_call;     /* the xcache_begin call whose miss loaded it */
    uint64_t need_call;       /* the last xcache_begin call that asked for it */
    uint64_t last_use, last_step;
    int32_t next;             /* queue link */
    uint8_t *buf;
    struct ffn_w w;
    char msg[320];
};

struct xcache {
    const struct kli_model *m;
    int32_t n_layers, E;
    struct xsrc *src;         /* [n_layers * E]; n_ranges 0 for non-MoE layers */
    int32_t *where;           /* [n_layers * E] slot or -1 */
    struct xslot *slots;
    int32_t n_slots;
    int32_t *lo, *hi;         /* [n_layers]: the slots a layer's experts may use */
    uint64_t slot_bytes;
    int *fds;
    int32_t n_files;
    void *mem;                /* the block the arrays of this struct are carved from */

    pthread_mutex_t mu;
    pthread_mutex_t pass;     /* held by the forward pass using the cache */
    pthread_cond_t work, done;
    int32_t dq_head, dq_tail, pq_head, pq_tail;   /* demand and prefetch FIFOs, -1 empty */
    int32_t n_prefetching;
    pthread_t io[XC_IO_THREADS];
    int n_io;
    int stop;

    uint64_t tick, step, call;
    uint8_t *guess;           /* [n_layers * E]: the last prefetch guess per layer */
    uint8_t *guessed;         /* [n_layers]: a guess waits for its layer */
    double accuracy;          /* running average of the guesses' hit ratio */
    struct kli_cache_stats st;
};

static uint64_t
xc_tensor_bytes(const struct tensor *t)
{
    return model_row_bytes(t) * (uint64_t)t->shape[0];
}

/* ---- sizes ------------------------------------------------------------------------------- */

static uint64_t
xc_expert_bytes(const struct ffn_w *w)
{
    return xc_tensor_bytes(&w->gate) + xc_tensor_bytes(&w->up) + xc_tensor_bytes(&w->down);
}

/* Bytes of the trunk: every stored tensor but the routed experts, plus what the model keeps
 * converted in memory (the MLA up-projections in float for the absorbed form). */
static void
xc_sizes(const struct kli_model *m, uint64_t *trunk, uint64_t *slot, int32_t *n_experts)
{
    const struct k_config *c = &m->cfg;
    uint64_t experts = 0, owned = 0, big = 0;
    int32_t n = 0;

    for (int32_t l = 0; l < c->n_layers; l++) {
        const struct k_layer *ly = &m->layers[l];
        if (ly->mixer == KLI_MIXER_MLA)
            owned += (uint64_t)c->mla.n_heads * (uint64_t)c->mla.kv_lora_rank *
                     (uint64_t)(c->mla.qk_nope_dim + c->mla.v_head_dim) * sizeof(float);
        if (ly->ffn_kind != KLI_FFN_MOE)
            continue;
        for (int32_t e = 0; e < c->moe.n_experts; e++) {
            uint64_t b = xc_expert_bytes(&ly->moe.experts[e]);
            experts += b;
            big = b > big ? b : big;
            n++;
        }
    }
    uint64_t all = wfile_data_bytes(m->wf);
    *trunk = (all > experts ? all - experts : 0) + owned;
    *slot = (big + 4095) & ~(uint64_t)4095;
    *n_experts = n;
}

static uint64_t
xc_reserve(uint64_t budget)
{
    return (32ull << 20) + budget / 16;
}

uint64_t
xcache_min_budget(const struct kli_model *m, int32_t min_slots)
{
    uint64_t trunk, slot;
    int32_t n;

    xc_sizes(m, &trunk, &slot, &n);
    /* budget - 32 MiB - budget/16 >= trunk + slots: budget >= 16/15 (trunk + slots + 32 MiB) */
    uint64_t need = trunk + slot * (uint64_t)min_slots + (32ull << 20);
    return need + need / 15 + 1;
}

/* ---- where each expert lives ------------------------------------------------------------- */

static int
xc_locate(struct xcache *c, int32_t l, int32_t e, struct kli_err *err)
{
    const struct ffn_w *w = &c->m->layers[l].moe.experts[e];
    const struct tensor *t[3] = {&w->gate, &w->up, &w->down};
    const struct pack_info *pk = wfile_pack(c->m->wf);
    struct xsrc *s = &c->src[(int64_t)l * c->E + e];
    int32_t file[3], ord[3] = {0, 1, 2};
    uint64_t off[3];

    s->has_sum = pk != NULL;
    for (int j = 0; j < 3; j++) {
        if (wfile_locate(c->m->wf, t[j]->data, &file[j], &off[j]) != 0)
            return err_set(err, KLI_E_UNSUPPORTED, "tensor %s is not in the weight "
                               "files (converted at open?): --mem-budget reads experts from "
                               "the files as stored", t[j]->name);
        s->tlen[j] = xc_tensor_bytes(t[j]);
        if (pk != NULL) {
            const struct tensor_desc *d = wfile_find(c->m->wf, t[j]->name);
            if (d == NULL)
                return err_set(err, KLI_E_FORMAT, "tensor %s: no directory entry",
                                   t[j]->name);
            s->sum[j] = pk->checksums[wfile_index(c->m->wf, d)];
        }
    }
    /* file order, then merge neighbours into one read */
    for (int a = 1; a < 3; a++) {
        for (int b = a; b > 0; b--) {
            int x = ord[b - 1], y = ord[b];
            if (file[x] < file[y] || (file[x] == file[y] && off[x] <= off[y]))
                break;
            ord[b - 1] = y;
            ord[b] = x;
        }
    }
    uint64_t at = 0;
    s->n_ranges = 0;
    for (int i = 0; i < 3; i++) {
        int j = ord[i];
        int r = s->n_ranges - 1;
        /* a gap read along must still fit the slot (a GGUF's stacked experts lie apart) */
        if (r >= 0 && s->file[r] == file[j] && off[j] >= s->off[r] + s->len[r] &&
            off[j] - (s->off[r] + s->len[r]) <= XC_MERGE_GAP &&
            at + (off[j] - (s->off[r] + s->len[r])) + s->tlen[j] <= c->slot_bytes) {
            uint64_t gap = off[j] - (s->off[r] + s->len[r]);
            at += gap;
            s->len[r] += gap + s->tlen[j];
        } else {
            r = s->n_ranges++;
            s->file[r] = file[j];
            s->off[r] = off[j];
            s->len[r] = s->tlen[j];
            s->at[r] = at;
        }
        s->toff[j] = at;
        at += s->tlen[j];
    }
    return KLI_OK;
}

/* ---- queues (under mu) ------------------------------------------------------------------- */

static void
xc_push(struct xcache *c, int32_t *head, int32_t *tail, int32_t s)
{
    c->slots[s].next = -1;
    if (*tail < 0)
        *head = s;
    else
        c->slots[*tail].next = s;
    *tail = s;
}

static int32_t
xc_pop(struct xcache *c, int32_t *head, int32_t *tail)
{
    int32_t s = *head;

    if (s >= 0) {
        *head = c->slots[s].next;
        if (*head < 0)
            *tail = -1;
    }
    return s;
}

/* ---- the I/O threads --------------------------------------------------------------------- */

static int
xc_pread(int fd, uint8_t *dst, uint64_t len, uint64_t off)
{
    while (len > 0) {
        size_t n = len > XC_READ_CHUNK ? XC_READ_CHUNK : (size_t)len;
        ssize_t r = pread(fd, dst, n, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno;
        if (r == 0)
            return EIO;   /* the file shrank under us */
        dst += r;
        off += (uint64_t)r;
        len -= (uint64_t)r;
    }
    return 0;
}

static void
xc_load(struct xcache *c, struct xslot *sl, int32_t key)
{
    const struct xsrc *s = &c->src[key];
    int32_t l = key / c->E, e = key % c->E;
    const struct ffn_w *w = &c->m->layers[l].moe.experts[e];
    const struct tensor *t[3] = {&w->gate, &w->up, &w->down};

    sl->msg[0] = '\0';
    if (sl->buf == NULL && (sl->buf = k_malloc_aligned(c->slot_bytes)) == NULL) {
        snprintf(sl->msg, sizeof(sl->msg), "out of memory for an expert cache slot "
                 "(%llu bytes)", (unsigned long long)c->slot_bytes);
        return;
    }
    for (int r = 0; r < s->n_ranges; r++) {
        int rc = xc_pread(c->fds[s->file[r]], sl->buf + s->at[r], s->len[r], s->off[r]);
        if (rc != 0) {
            snprintf(sl->msg, sizeof(sl->msg), "reading expert %d of layer %d from %.80s: %s",
                     e, l, wfile_file_path(c->m->wf, s->file[r]), strerror(rc));
            return;
        }
    }
    for (int j = 0; j < 3; j++) {
        if (s->has_sum && xxh64(sl->buf + s->toff[j], (size_t)s->tlen[j], 0) != s->sum[j]) {
            snprintf(sl->msg, sizeof(sl->msg), "%.80s: section \"data\" is damaged: tensor "
                     "\"%.64s\" does not match its checksum",
                     wfile_file_path(c->m->wf, s->file[0]), t[j]->name);
            return;
        }
    }
    sl->w = *w;
    sl->w.gate.data = sl->buf + s->toff[0];
    sl->w.up.data = sl->buf + s->toff[1];
    sl->w.down.data = sl->buf + s->toff[2];
    sl->w.gate.node_data = sl->w.up.node_data = sl->w.down.node_data = NULL;
}

static void *
xc_io_main(void *arg)
{
    struct xcache *c = arg;

    pthread_mutex_lock(&c->mu);
    while (!c->stop) {
        int32_t s = xc_pop(c, &c->dq_head, &c->dq_tail);
        if (s < 0)
            s = xc_pop(c, &c->pq_head, &c->pq_tail);
        if (s < 0) {
            pthread_cond_wait(&c->work, &c->mu);
            continue;
        }
        struct xslot *sl = &c->slots[s];
        int32_t key = sl->key;
        sl->state = XS_LOADING;
        pthread_mutex_unlock(&c->mu);
        xc_load(c, sl, key);
        pthread_mutex_lock(&c->mu);
        sl->state = sl->msg[0] == '\0' ? XS_READY : XS_FAILED;
        if (sl->state == XS_READY) {
            for (int r = 0; r < c->src[key].n_ranges; r++)
                c->st.bytes_read += c->src[key].len[r];
        }
        if (sl->spec) {
            sl->spec = 0;
            c->n_prefetching--;
        }
        pthread_cond_broadcast(&c->done);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* ---- open / close ------------------------------------------------------------------------ */

/* The arrays, all sized at open (k_carve's two passes); zeroed. */
static void
xc_carve(struct xcache *c, struct k_carve *cv)
{
    size_t nk = (size_t)c->n_layers * (size_t)c->E;

    c->src = k_carve(cv, nk, sizeof(*c->src));
    c->where = k_carve(cv, nk, sizeof(*c->where));
    c->slots = k_carve(cv, (size_t)c->n_slots, sizeof(*c->slots));
    c->fds = k_carve(cv, (size_t)c->n_files, sizeof(*c->fds));
    c->guess = k_carve(cv, nk, 1);
    c->guessed = k_carve(cv, (size_t)c->n_layers, 1);
    c->lo = k_carve(cv, (size_t)c->n_layers, sizeof(*c->lo));
    c->hi = k_carve(cv, (size_t)c->n_layers, sizeof(*c->hi));
}

int
xcache_open(struct xcache **out, const struct kli_model *m, uint64_t budget,
            struct kli_err *err)
{
    const struct k_config *cfg = &m->cfg;
    struct xcache *c;
    struct k_carve cv = {0};
    uint64_t trunk, slot;
    int32_t n_exp;
    int rc;

    *out = NULL;
    xc_sizes(m, &trunk, &slot, &n_exp);
    if (n_exp == 0)
        return err_set(err, KLI_E_UNSUPPORTED, "--mem-budget: the model has no routed "
                           "experts to load on demand");
    uint64_t reserve = xc_reserve(budget);
    int32_t min_slots = cfg->moe.top_k;
    uint64_t room = budget > trunk + reserve ? budget - trunk - reserve : 0;
    if (room / slot < (uint64_t)min_slots) {
        uint64_t need = xcache_min_budget(m, min_slots);
        return err_set(err, KLI_E_RANGE, "memory budget %.1f MiB is too small: the trunk "
                           "takes %.1f MiB and %d experts of %.2f MiB must fit besides a "
                           "reserve of %.1f MiB; the least budget is %.1f MiB",
                           (double)budget / 1048576.0, (double)trunk / 1048576.0, min_slots,
                           (double)slot / 1048576.0, (double)reserve / 1048576.0,
                           (double)need / 1048576.0);
    }
    c = k_calloc(1, sizeof(*c));
    if (c == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    c->m = m;
    c->n_layers = cfg->n_layers;
    c->E = cfg->moe.n_experts;
    c->slot_bytes = slot;
    c->n_slots = (int32_t)(room / slot < (uint64_t)n_exp ? room / slot : (uint64_t)n_exp);
    c->dq_head = c->dq_tail = c->pq_head = c->pq_tail = -1;
    c->st.budget = budget;
    c->st.trunk_bytes = trunk;
    c->st.reserve = reserve;
    c->st.slot_bytes = slot;
    c->st.n_slots = c->n_slots;
    c->st.n_experts = n_exp;
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->pass, NULL);
    pthread_cond_init(&c->work, NULL);
    pthread_cond_init(&c->done, NULL);
    size_t nk = (size_t)c->n_layers * (size_t)c->E;
    c->n_files = wfile_n_files(m->wf);
    c->accuracy = 1.0;
    xc_carve(c, &cv);
    if ((c->mem = k_carve_block(&cv)) == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory");
        goto fail;
    }
    xc_carve(c, &cv);
    for (size_t i = 0; i < nk; i++)
        c->where[i] = -1;
    for (int32_t s = 0; s < c->n_slots; s++)
        c->slots[s].key = -1;
    /* Decode sweeps every layer before a layer's experts come back, so one global LRU list
     * evicts everything when the cache holds less than a token's experts; slots split per
     * MoE layer keep hitting (contrib/tools/xcache-sim.py on the real router trace). */
    int32_t n_moe = 0, k = 0;
    for (int32_t l = 0; l < c->n_layers; l++)
        n_moe += m->layers[l].ffn_kind == KLI_FFN_MOE;
    for (int32_t l = 0; l < c->n_layers; l++) {
        if (c->n_slots < n_moe) {
            c->lo[l] = 0;
            c->hi[l] = c->n_slots;
        } else if (m->layers[l].ffn_kind == KLI_FFN_MOE) {
            c->lo[l] = (int32_t)((int64_t)c->n_slots * k / n_moe);
            c->hi[l] = (int32_t)((int64_t)c->n_slots * (k + 1) / n_moe);
            k++;
        }
    }
    for (int32_t i = 0; i < c->n_files; i++)
        c->fds[i] = -1;
    for (int32_t i = 0; i < c->n_files; i++) {
        const char *p = wfile_file_path(m->wf, i);
        if ((c->fds[i] = kli_file_open(p, NULL, err)) < 0) {
            rc = c->fds[i];
            c->fds[i] = -1;
            goto fail;
        }
    }
    for (int32_t l = 0; l < c->n_layers; l++) {
        if (m->layers[l].ffn_kind != KLI_FFN_MOE)
            continue;
        for (int32_t e = 0; e < c->E; e++) {
            if ((rc = xc_locate(c, l, e, err)) != KLI_OK)
                goto fail;
        }
    }
    for (int i = 0; i < XC_IO_THREADS; i++) {
        if (pthread_create(&c->io[i], NULL, xc_io_main, c) != 0)
            break;
        c->n_io++;
    }
    if (c->n_io == 0) {
        rc = err_set(err, KLI_E_NOMEM, "cannot start the expert cache's I/O threads");
        goto fail;
    }
    *out = c;
    return KLI_OK;
fail:
    xcache_close(c);
    return rc;
}

void
xcache_close(struct xcache *c)
{
    if (c == NULL)
        return;
    pthread_mutex_lock(&c->mu);
    c->stop = 1;
    pthread_cond_broadcast(&c->work);
    pthread_mutex_unlock(&c->mu);
    for (int i = 0; i < c->n_io; i++)
        pthread_join(c->io[i], NULL);
    for (int32_t s = 0; c->slots != NULL && s < c->n_slots; s++)
        k_free_aligned(c->slots[s].buf);
    for (int32_t i = 0; c->fds != NULL && i < c->n_files; i++) {
        if (c->fds[i] >= 0)
            close(c->fds[i]);
    }
    pthread_cond_destroy(&c->work);
    pthread_cond_destroy(&c->done);
    pthread_mutex_destroy(&c->mu);
    pthread_mutex_destroy(&c->pass);
    free(c->mem);
    free(c);
}

/* ---- the cache --------------------------------------------------------------------------- */

/* A slot to refill (under mu), or -1. Empty slots first, then the least recently used that
 * nobody pins and no read is filling. `spec`: for a prefetch, which must not evict what
 * this step used. `spare_needed`: skip experts the current layer asked for (when any other
 * slot will do). */
static int32_t
xc_victim(const struct xcache *c, int32_t layer, int spec, int spare_needed)
{
    int32_t best = -1;

    for (int32_t s = c->lo[layer]; s < c->hi[layer]; s++) {
        const struct xslot *sl = &c->slots[s];
        if (sl->state == XS_EMPTY)
            return s;
        if (sl->pins > 0 || sl->state == XS_QUEUED || sl->state == XS_LOADING)
            continue;
        if (spec && sl->last_step == c->step && sl->state == XS_READY)
            continue;
        if (spare_needed && sl->need_call == c->call)
            continue;
        if (best < 0 || sl->last_use < c->slots[best].last_use)
            best = s;
    }
    return best;
}

static void
xc_assign(struct xcache *c, int32_t s, int32_t key)
{
    struct xslot *sl = &c->slots[s];

    if (sl->key >= 0)
        c->where[sl->key] = -1;
    sl->key = key;
    sl->state = XS_QUEUED;
    sl->prefetch = 0;
    sl->held = 0;
    sl->demand_call = 0;
    c->where[key] = s;
}

void
xcache_step(struct xcache *c)
{
    pthread_mutex_lock(&c->mu);
    c->step++;
    pthread_mutex_unlock(&c->mu);
}

void
xcache_begin(struct xcache *c, int32_t layer, const int32_t *ids, int32_t n)
{
    pthread_mutex_lock(&c->mu);
    c->call++;
    /* release what an earlier call held and did not take (a failed pass) */
    for (int32_t s = 0; s < c->n_slots; s++) {
        if (c->slots[s].held) {
            c->slots[s].held = 0;
            c->slots[s].pins--;
        }
    }
    for (int32_t i = 0; i < n; i++) {
        int32_t s = c->where[(int64_t)layer * c->E + ids[i]];
        if (s >= 0)
            c->slots[s].need_call = c->call;
    }
    /* score the guess made for this layer, whether or not it was read */
    if (c->guessed[layer]) {
        uint8_t *g = c->guess + (int64_t)layer * c->E;
        uint64_t right = 0, total = 0;
        for (int32_t e = 0; e < c->E; e++)
            total += g[e];
        for (int32_t i = 0; i < n; i++)
            right += g[ids[i]];
        if (total > 0) {
            c->st.predicted += total;
            c->st.predicted_right += right;
            c->accuracy = 0.9 * c->accuracy + 0.1 * (double)right / (double)total;
        }
        for (int32_t e = 0; e < c->E; e++)
            g[e] = 0;
        c->guessed[layer] = 0;
    }
    for (int32_t i = 0; i < n; i++) {
        int32_t key = layer * c->E + ids[i];
        if (c->where[key] >= 0)
            continue;
        int32_t s = xc_victim(c, layer, 0, 1);
        if (s < 0)
            break;   /* the rest load one by one in xcache_get */
        xc_assign(c, s, key);
        c->slots[s].demand_call = c->slots[s].need_call = c->call;
        c->slots[s].pins = 1;
        c->slots[s].held = 1;
        xc_push(c, &c->dq_head, &c->dq_tail, s);
    }
    pthread_cond_broadcast(&c->work);
    pthread_mutex_unlock(&c->mu);
}

const struct ffn_w *
xcache_get(struct xcache *c, int32_t layer, int32_t e, struct kli_err *err)
{
    int32_t key = layer * c->E + e;
    double t0 = 0.0;
    int32_t s;

    pthread_mutex_lock(&c->mu);
    c->st.requests++;
    while ((s = c->where[key]) < 0) {
        int32_t v = xc_victim(c, layer, 0, 1);
        if (v < 0)
            v = xc_victim(c, layer, 0, 0);
        if (v >= 0) {
            xc_assign(c, v, key);
            c->slots[v].demand_call = c->call;
            xc_push(c, &c->dq_head, &c->dq_tail, v);
            pthread_cond_broadcast(&c->work);
            break;
        }
        if (t0 == 0.0)
            t0 = util_now_s();
        pthread_cond_wait(&c->done, &c->mu);   /* every slot busy: wait for a read */
    }
    s = c->where[key];
    struct xslot *sl = &c->slots[s];
    if (sl->demand_call != c->call)
        c->st.hits++;
    if (sl->prefetch) {
        sl->prefetch = 0;
        c->st.prefetch_used++;
    }
    if (sl->held)
        sl->held = 0;
    else
        sl->pins++;
    if (sl->state == XS_QUEUED || sl->state == XS_LOADING) {
        if (t0 == 0.0)
            t0 = util_now_s();
        while (sl->state == XS_QUEUED || sl->state == XS_LOADING)
            pthread_cond_wait(&c->done, &c->mu);
    }
    if (t0 != 0.0)
        c->st.wait_seconds += util_now_s() - t0;
    if (sl->state == XS_FAILED) {
        err_set(err, KLI_E_IO, "%s", sl->msg);
        sl->pins--;
        sl->state = XS_EMPTY;
        c->where[key] = -1;
        sl->key = -1;
        pthread_mutex_unlock(&c->mu);
        return NULL;
    }
    sl->last_use = ++c->tick;
    sl->last_step = c->step;
    pthread_mutex_unlock(&c->mu);
    return &sl->w;
}

void
xcache_put(struct xcache *c, int32_t layer, int32_t e)
{
    pthread_mutex_lock(&c->mu);
    int32_t s = c->where[layer * c->E + e];
    if (s >= 0 && c->slots[s].pins > 0)
        c->slots[s].pins--;
    pthread_mutex_unlock(&c->mu);
}

void
xcache_prefetch(struct xcache *c, int32_t layer, const int32_t *ids, int32_t n)
{
    pthread_mutex_lock(&c->mu);
    uint8_t *g = c->guess + (int64_t)layer * c->E;
    for (int32_t e = 0; e < c->E; e++)
        g[e] = 0;
    for (int32_t i = 0; i < n; i++)
        g[ids[i]] = 1;
    c->guessed[layer] = 1;
    /* Wrong guesses cost reads and evict what might have hit: read only while the guesses
     * are mostly right (they are still made and scored, so reading resumes if they improve). */
    if (c->accuracy < 0.5)
        n = 0;
    for (int32_t i = 0; i < n && c->n_prefetching < (c->n_slots + 3) / 4; i++) {
        int32_t key = layer * c->E + ids[i];
        if (c->where[key] >= 0)
            continue;
        int32_t s = xc_victim(c, layer, 1, 1);
        if (s < 0)
            break;
        xc_assign(c, s, key);
        c->slots[s].prefetch = 1;
        c->slots[s].spec = 1;
        c->n_prefetching++;
        c->st.prefetches++;
        xc_push(c, &c->pq_head, &c->pq_tail, s);
    }
    pthread_cond_broadcast(&c->work);
    pthread_mutex_unlock(&c->mu);
}

void
xcache_get_stats(const struct xcache *c, struct kli_cache_stats *st)
{
    pthread_mutex_lock((pthread_mutex_t *)&c->mu);
    *st = c->st;
    pthread_mutex_unlock((pthread_mutex_t *)&c->mu);
}

void
xcache_reset_stats(struct xcache *c)
{
    pthread_mutex_lock(&c->mu);
    c->st.requests = c->st.hits = c->st.prefetches = c->st.prefetch_used = 0;
    c->st.predicted = c->st.predicted_right = 0;
    c->st.bytes_read = 0;
    c->st.wait_seconds = 0.0;
    pthread_mutex_unlock(&c->mu);
}

void
xcache_lock(struct xcache *c)
{
    pthread_mutex_lock(&c->pass);
}

void
xcache_unlock(struct xcache *c)
{
    pthread_mutex_unlock(&c->pass);
}
