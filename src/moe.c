/*
 * moe.c - router and expert dispatch (doc/model.md section 6).
 *
 * The router is DeepSeek-V3's "noaux_tc" selection: sigmoid scores plus a learned
 * correction bias pick the experts, but the bias never enters the weights (decision 1 of
 * doc/model.md: the official remote code adds it through an aliasing slip; vLLM,
 * llama.cpp and DeepSeek-V3 do not).
 */
#include "config.h"

#include <math.h>
#include <string.h>

#include "backend.h"
#include "internal.h"
#include "ffn.h"
#include "moe.h"
#include "ops.h"
#include "simd.h"
#include "threads.h"
#include "xcache.h"

/* Index of the largest value among the n with keep[i] set; ties to the lowest index. */
static int32_t
moe_argmax(const float *v, const uint8_t *keep, int32_t n)
{
    int32_t best = -1;

    for (int32_t i = 0; i < n; i++) {
        if (keep[i] && (best < 0 || v[i] > v[best]))
            best = i;
    }
    return best;
}

void
moe_route(const struct kli_config_moe *c, const float *logits, const float *bias, int32_t *idx,
          float *wt, float *tmp)
{
    int32_t E = c->n_experts, K = c->top_k, G = c->n_group, per = E / G;
    float *s = tmp, *sb = tmp + E;
    uint8_t keep[KLI_MAX_EXPERTS];

    if (c->sigmoid) {
        for (int32_t e = 0; e < E; e++)
            s[e] = ops_sigmoid(logits[e]);
    } else {
        memcpy(s, logits, (size_t)E * sizeof(float));
        ops_softmax(s, E);
    }
    for (int32_t e = 0; e < E; e++) {
        sb[e] = s[e] + bias[e];
        keep[e] = 1;
    }

    /* Group-limited selection: keep only the topk_group best groups. */
    if (G > 1 && c->topk_group < G) {
        float gscore[KLI_MAX_EXPERTS];
        uint8_t gkeep[KLI_MAX_EXPERTS], gsel[KLI_MAX_EXPERTS];
        for (int32_t g = 0; g < G; g++) {
            const float *p = sb + g * per;
            int32_t b1 = 0, b2 = -1;
            for (int32_t i = 1; i < per; i++) {
                if (p[i] > p[b1]) {
                    b2 = b1;
                    b1 = i;
                } else if (b2 < 0 || p[i] > p[b2]) {
                    b2 = i;
                }
            }
            gscore[g] = p[b1] + (b2 >= 0 ? p[b2] : 0.0f);
            gkeep[g] = 1;
            gsel[g] = 0;
        }
        for (int32_t n = 0; n < c->topk_group; n++) {
            int32_t g = moe_argmax(gscore, gkeep, G);
            gkeep[g] = 0;
            gsel[g] = 1;
        }
        for (int32_t e = 0; e < E; e++)
            keep[e] = gsel[e / per];
    }

    float sum = 0.0f;
    for (int32_t k = 0; k < K; k++) {
        int32_t e = moe_argmax(sb, keep, E);
        keep[e] = 0;
        idx[k] = e;
        wt[k] = s[e];
        sum += s[e];
    }
    if (c->renormalize && K > 1) {
        for (int32_t k = 0; k < K; k++)
            wt[k] /= sum + 1e-20f;
    }
    for (int32_t k = 0; k < K; k++)
        wt[k] *= c->scaling;
}

/* Edge mode: the next MoE layer's router applied to this layer's input guesses the experts
 * it will want; their reads start now (xcache_prefetch). Only for a few tokens at a time:
 * a long prefill asks for most experts anyway. */
static void
moe_prefetch_next(const struct kli_model *m, struct moe_scratch *sc, const float *x, int64_t T)
{
    const struct kli_config *cfg = &m->cfg;
    const struct kli_config_moe *c = &cfg->moe;
    int32_t E = c->n_experts, K = c->top_k, l2 = sc->layer + 1;
    float tmp[2 * KLI_MAX_EXPERTS], wt[KLI_MAX_EXPERTS];
    int32_t idx[KLI_MAX_EXPERTS], ids[KLI_MAX_EXPERTS], n = 0;
    uint8_t want[KLI_MAX_EXPERTS] = {0};

    while (l2 < cfg->n_layers && m->layers[l2].ffn_kind != KLI_FFN_MOE)
        l2++;
    if (l2 >= cfg->n_layers || T > 8)
        return;
    const struct kli_moe_w *w2 = &m->layers[l2].moe;
    ops_matmul(&w2->router, x, cfg->d_model, sc->logits, E, T);
    for (int64_t t = 0; t < T; t++) {
        moe_route(c, sc->logits + t * E, w2->bias, idx, wt, tmp);
        for (int32_t k = 0; k < K; k++)
            want[idx[k]] = 1;
    }
    for (int32_t e = 0; e < E; e++) {
        if (want[e])
            ids[n++] = e;
    }
    xcache_prefetch(m->xc, l2, ids, n);
}

/* One routed expert on the CPU over its n (token, slot) pairs `ord`: gathers the tokens,
 * runs the FFN and adds each output, weighted, to its token's row of out. */
static void
moe_expert_cpu(const struct kli_ffn_w *ew, struct moe_scratch *sc, const float *x,
               const int32_t *ord, int32_t n, int64_t D, int64_t K, float *out)
{
    const struct kli_kernels *kk = kli_kernels();

    for (int32_t j = 0; j < n; j++)
        memcpy(sc->xe + j * D, x + (ord[j] / K) * D, (size_t)D * sizeof(float));
    ffn_forward(ew, sc->xe, n, sc->ye, sc->h1, sc->h3);
    for (int32_t j = 0; j < n; j++)
        kk->axpy(out + (ord[j] / K) * D, sc->wt[ord[j]], sc->ye + j * D, D);
}

/* Edge mode: the routed experts come from the bounded cache, in the same order as below. */
static int
moe_experts_cached(const struct kli_model *m, const struct kli_moe_w *w,
                   struct moe_scratch *sc, const float *x, int64_t T, float *out,
                   struct kli_err *err)
{
    const struct kli_config_moe *c = &m->cfg.moe;
    int64_t D = m->cfg.d_model, E = c->n_experts, K = c->top_k;
    int32_t ids[KLI_MAX_EXPERTS], n = 0;

    for (int64_t e = 0; e < E; e++) {
        if (sc->count[e + 1] > sc->count[e])
            ids[n++] = (int32_t)e;
    }
    xcache_begin(m->xc, sc->layer, ids, n);
    moe_prefetch_next(m, sc, x, T);
    if (c->n_shared > 0)
        ffn_forward(&w->shared, x, T, out, sc->h1, sc->h3);
    else
        memset(out, 0, (size_t)(T * D) * sizeof(float));
    for (int32_t i = 0; i < n; i++) {
        int32_t e = ids[i];
        int32_t ne = sc->count[e + 1] - sc->count[e];
        const int32_t *ord = sc->order + sc->count[e];
        const struct kli_ffn_w *ew = xcache_get(m->xc, sc->layer, e, err);
        if (ew == NULL)
            return err != NULL && err->code != 0 ? err->code : KLI_E_IO;
        moe_expert_cpu(ew, sc, x, ord, ne, D, K, out);
        xcache_put(m->xc, sc->layer, e);
    }
    return KLI_OK;
}

/* ---- the grouped path: every expert of a layer in two parallel regions -------------------
 *
 * Decode and batched decode give each chosen expert one or a few tokens, so the per-expert
 * path below meets the workers at two barriers per expert (gate+up+SwiGLU, then down): 18
 * per layer for one token, ~84 for eight sequences. Here the rows of all experts are one
 * index space: region 1 computes gate, up and SwiGLU for every (expert, hidden row range),
 * region 2 the down projection for every (expert, output row range), each pair's rows
 * gathered once. The outputs are then added in the per-expert path's order (shared expert,
 * then routed experts ascending), and each row is computed by the same kernel over the same
 * data, so the result matches it. */
#define MOE_GROUP_MAX_T 32       /* tokens up to which a layer takes the grouped path */
#define MOE_ROUTE_MAX 256        /* workers up to which --numa partition routes experts */

struct moe_group {
    const struct kli_ffn_w *w[KLI_MAX_EXPERTS + 1];
    int64_t n[KLI_MAX_EXPERTS + 1];     /* tokens of item i */
    int64_t row[KLI_MAX_EXPERTS + 1];   /* first pair row of item i */
    const int32_t *ord[KLI_MAX_EXPERTS + 1];   /* its (token, slot) pairs; NULL: every token
                                                  with weight 1 (the shared expert) */
    int64_t h0[KLI_MAX_EXPERTS + 2];    /* item i's hidden rows: [h0[i], h0[i+1]) */
    int64_t n_items, D, P, Fmax;
    int tn;                             /* workers: one range each */
    float *xg, *h1, *h3, *yg;           /* [P][D], [P][Fmax] x2, [P][D] */
    /* --numa partition (kli_moe_w.node): item i's node, -1 for any worker; and per worker
     * its node, its index among that node's workers and their number */
    int route;
    int8_t node[KLI_MAX_EXPERTS + 1];
    int8_t wnode[MOE_ROUTE_MAX];
    int16_t wrank[MOE_ROUTE_MAX], wsize[MOE_ROUTE_MAX];
    uint64_t *away;                     /* the model's count of rows computed off-node */
};

/* Worker wk's share of `rows` of item i: under --numa partition a routed expert's rows go
 * to the workers of its node only (ops_share among them), everything else to all. */
static void
moe_group_share(const struct moe_group *g, int64_t i, int64_t rows, int64_t wk, int64_t *r0,
                int64_t *r1)
{
    if (g->route && g->node[i] >= 0) {
        *r0 = *r1 = 0;
        if (g->wnode[wk] == g->node[i])
            ops_share(rows, 16, g->wrank[wk], g->wsize[wk], r0, r1);
        return;
    }
    ops_share(rows, 16, (int)wk, g->tn, r0, r1);
}

/* Counts rows of routed experts that worker wk computed away from their node. */
static void
moe_group_away(const struct moe_group *g, int64_t i, int64_t wk, int64_t rows)
{
    if (g->away != NULL && g->node[i] >= 0 && rows > 0 &&
        threads_slot_node((int)wk) != g->node[i])
        __atomic_add_fetch(g->away, (uint64_t)rows, __ATOMIC_RELAXED);
}

/* Worker ith of tn takes, of every item, the rows that threads_parallel_for(rows, 16, ...)
 * would give it (ffn_forward and ops_matmul split that way, see ops_share): the float
 * kernels' results depend on how rows are grouped, and edge mode (and the GPU fallback)
 * computes experts one at a time, so the same split keeps every path bit-identical. */
static void
moe_group_up_range(void *ctx, int64_t t0, int64_t t1, int ith)
{
    const struct moe_group *g = ctx;
    const struct kli_kernels *kk = kli_kernels();

    (void)ith;
    for (int64_t wk = t0; wk < t1; wk++) {   /* one worker each, or all when run serially */
        for (int64_t i = 0; i < g->n_items; i++) {
            int64_t r0, r1;
            moe_group_share(g, i, g->h0[i + 1] - g->h0[i], wk, &r0, &r1);
            if (r1 <= r0)
                continue;
            moe_group_away(g, i, wk, r1 - r0);
            const float *xi = g->xg + g->row[i] * g->D;
            float *h1 = g->h1 + g->row[i] * g->Fmax, *h3 = g->h3 + g->row[i] * g->Fmax;
            ops_matmul_rows(&g->w[i]->gate, r0, r1, xi, g->D, h1, g->Fmax, g->n[i]);
            ops_matmul_rows(&g->w[i]->up, r0, r1, xi, g->D, h3, g->Fmax, g->n[i]);
            for (int64_t t = 0; t < g->n[i]; t++)
                kk->silu(h1 + t * g->Fmax + r0, h1 + t * g->Fmax + r0, h3 + t * g->Fmax + r0,
                         r1 - r0);
        }
    }
}

static void
moe_group_down_range(void *ctx, int64_t t0, int64_t t1, int ith)
{
    const struct moe_group *g = ctx;
    int64_t r0, r1;

    (void)ith;
    for (int64_t wk = t0; wk < t1; wk++) {   /* one worker each, or all when run serially */
        for (int64_t i = 0; i < g->n_items; i++) {
            moe_group_share(g, i, g->D, wk, &r0, &r1);
            if (r1 <= r0)
                continue;
            moe_group_away(g, i, wk, r1 - r0);
            ops_matmul_rows(&g->w[i]->down, r0, r1, g->h1 + g->row[i] * g->Fmax, g->Fmax,
                            g->yg + g->row[i] * g->D, g->D, g->n[i]);
        }
    }
}

/* @return 0 when the layer was computed here, -1 to take the per-expert path (too many
 * tokens, or no memory for the pair rows). */
static int
moe_grouped(const struct kli_model *m, const struct kli_moe_w *w, struct moe_scratch *sc,
            const float *x, int64_t T, float *out, int gpu)
{
    const struct kli_config_moe *c = &m->cfg.moe;
    const struct kli_kernels *kk = kli_kernels();
    int64_t D = m->cfg.d_model, E = c->n_experts, K = c->top_k;
    struct moe_group g;

    /* Under --numa partition every batch takes this path, so that each routed expert is
     * computed on its node in prefill too (the pair rows then need T * top_k rows of
     * scratch); otherwise only small batches. */
    g.tn = threads_count();
    g.route = w->node != NULL && m->numa_route && g.tn <= MOE_ROUTE_MAX;
    if (T > MOE_GROUP_MAX_T && !g.route)
        return -1;
    g.D = D;
    g.n_items = 0;
    g.P = 0;
    g.Fmax = 0;
    g.h0[0] = 0;
    /* with the GPU working on the shared and the hot experts, only the cold ones are ours */
    int shared = c->n_shared > 0 && !gpu;
    if (shared && w->shared.gate.dtype == KLI_DT_F32 && T >= OPS_GEMM_MIN_ROWS)
        return -1;
    if (shared) {
        g.w[0] = &w->shared;
        g.node[0] = -1;
        g.ord[0] = NULL;
        g.n[0] = T;
        g.row[0] = 0;
        g.P = T;
        g.h0[1] = w->shared.gate.shape[0];
        g.Fmax = w->shared.gate.shape[0];
        g.n_items = 1;
    }
    for (int64_t e = 0; e < E; e++) {
        int32_t n = sc->count[e + 1] - sc->count[e];
        if (n == 0 || (gpu && backend_moe_hot(sc->gpu, sc->layer, (int32_t)e)))
            continue;
        if (w->experts[e].gate.dtype == KLI_DT_F32 && n >= OPS_GEMM_MIN_ROWS)
            return -1;   /* the per-expert path multiplies these with SGEMM */
        int64_t i = g.n_items++;
        g.w[i] = &w->experts[e];
        g.node[i] = w->node != NULL ? w->node[e] : -1;
        g.ord[i] = sc->order + sc->count[e];
        g.n[i] = n;
        g.row[i] = g.P;
        g.P += n;
        int64_t F = w->experts[e].gate.shape[0];
        g.h0[i + 1] = g.h0[i] + F;
        g.Fmax = F > g.Fmax ? F : g.Fmax;
    }
    if (g.n_items == 0) {
        memset(out, 0, (size_t)(T * D) * sizeof(float));
        return 0;
    }
    /* rows: x and y [P][D], h1 and h3 [P][Fmax] */
    int64_t need = g.P * (2 * D + 2 * g.Fmax);
    if (sc->gcap < need) {
        int64_t cap = MOE_GROUP_MAX_T * (K + c->n_shared + 1) * (2 * D + 2 * g.Fmax);
        float *p = kli_malloc_aligned((size_t)(cap > need ? cap : need) * sizeof(float));
        if (p == NULL)
            return -1;
        kli_free_aligned(sc->gbuf);
        sc->gbuf = p;
        sc->gcap = cap > need ? cap : need;
    }
    g.xg = sc->gbuf;
    g.yg = g.xg + g.P * D;
    g.h1 = g.yg + g.P * D;
    g.h3 = g.h1 + g.P * g.Fmax;
    for (int64_t i = 0; i < g.n_items; i++) {
        for (int64_t j = 0; j < g.n[i]; j++) {
            int64_t t = g.ord[i] != NULL ? g.ord[i][j] / K : j;
            memcpy(g.xg + (g.row[i] + j) * D, x + t * D, (size_t)D * sizeof(float));
        }
    }
    g.away = w->node != NULL ? (uint64_t *)&m->numa_away : NULL;
    if (g.route) {
        /* every item's node must have a worker, else the plain split */
        int16_t per[THREADS_NODES] = {0};
        for (int k = 0; k < g.tn; k++) {
            int nd = threads_slot_node(k);
            g.wnode[k] = (int8_t)nd;
            g.wrank[k] = per[nd]++;
        }
        for (int k = 0; k < g.tn; k++)
            g.wsize[k] = per[g.wnode[k]];
        for (int64_t i = 0; i < g.n_items; i++)
            g.route &= g.node[i] < 0 || per[g.node[i]] > 0;
    }
    threads_parallel_for(g.tn, 1, moe_group_up_range, &g);
    threads_parallel_for(g.tn, 1, moe_group_down_range, &g);

    /* the shared expert's rows are the first T (or zeros), then each routed expert adds its
     * weighted rows, ascending */
    if (shared)
        memcpy(out, g.yg, (size_t)(T * D) * sizeof(float));
    else
        memset(out, 0, (size_t)(T * D) * sizeof(float));
    for (int64_t i = shared; i < g.n_items; i++) {
        for (int64_t j = 0; j < g.n[i]; j++) {
            int32_t p = g.ord[i][j];
            kk->axpy(out + (p / K) * D, sc->wt[p], g.yg + (g.row[i] + j) * D, D);
        }
    }
    return 0;
}

int
moe_forward(const struct kli_model *m, const struct kli_moe_w *w, struct moe_scratch *sc,
            const float *x, int64_t T, float *out, struct kli_err *err)
{
    const struct kli_config *cfg = &m->cfg;
    const struct kli_config_moe *c = &cfg->moe;
    const struct kli_kernels *kk = kli_kernels();
    int64_t D = cfg->d_model, E = c->n_experts, K = c->top_k;
    float tmp[2 * KLI_MAX_EXPERTS];

    ops_matmul(&w->router, x, D, sc->logits, E, T);
    for (int64_t t = 0; t < T; t++)
        moe_route(c, sc->logits + t * E, w->bias, sc->idx + t * K, sc->wt + t * K, tmp);

    /* Counting sort of the (token, slot) pairs by expert. */
    memset(sc->count, 0, (size_t)(E + 1) * sizeof(int32_t));
    for (int64_t i = 0; i < T * K; i++)
        sc->count[sc->idx[i] + 1]++;
    for (int64_t e = 0; e < E; e++)
        sc->count[e + 1] += sc->count[e];
    int32_t fill[KLI_MAX_EXPERTS];
    memcpy(fill, sc->count, (size_t)E * sizeof(int32_t));
    for (int64_t i = 0; i < T * K; i++)
        sc->order[fill[sc->idx[i]]++] = (int32_t)i;

    if (m->xc != NULL)
        return moe_experts_cached(m, w, sc, x, T, out, err);

    /* The shared experts first, then each routed expert adds its weighted output. With a
     * GPU (backend.c) it takes the shared expert and the resident (hot) routed experts while
     * the CPU computes the others; if it fails, the CPU computes its share afterwards. */
    int gpu = sc->gpu != NULL && backend_moe_launch(sc->gpu, sc->layer, sc, x, T) == 0;
    int first = 0;
    if (moe_grouped(m, w, sc, x, T, out, gpu) == 0) {
        /* the CPU's share is done: wait for the GPU's, or on its failure compute that too */
        if (!gpu || backend_moe_wait(sc->gpu, sc->layer, out) == 0)
            return KLI_OK;
        if (c->n_shared > 0) {
            ffn_forward(&w->shared, x, T, sc->ye, sc->h1, sc->h3);
            kk->axpy(out, 1.0f, sc->ye, T * D);
        }
        first = 1;
    } else if (c->n_shared > 0 && !gpu) {
        ffn_forward(&w->shared, x, T, out, sc->h1, sc->h3);
    } else {
        memset(out, 0, (size_t)(T * D) * sizeof(float));
    }
    for (int pass = first; pass < 2; pass++) {
        for (int64_t e = 0; e < E; e++) {
            int32_t n = sc->count[e + 1] - sc->count[e];
            const int32_t *ord = sc->order + sc->count[e];
            if (n == 0 || (gpu && backend_moe_hot(sc->gpu, sc->layer, (int32_t)e) != pass))
                continue;
            moe_expert_cpu(&w->experts[e], sc, x, ord, n, D, K, out);
        }
        /* pass 1 only when the GPU failed: its shared expert, then its routed ones */
        if (pass == 1 || !gpu || backend_moe_wait(sc->gpu, sc->layer, out) == 0)
            break;
        if (c->n_shared > 0) {
            ffn_forward(&w->shared, x, T, sc->ye, sc->h1, sc->h3);
            kk->axpy(out, 1.0f, sc->ye, T * D);
        }
    }
    return KLI_OK;
}
