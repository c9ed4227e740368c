/*
 * moe_sched.c - how the experts of one routed MoE layer are computed on the CPU (the routing
 * itself is moe.c's): the per-expert schedule, the grouped schedule for small batches and
 * --numa partition, and edge mode's schedule over the expert cache. Each adds the shared
 * expert first and then the routed experts in ascending order, every row by the same kernel
 * over the same rows, so all of them give the same bits (tests/test-moe, test-xcache).
 */
#include "config.h"

#include <string.h>

#include "ffn.h"
#include "imatrix.h"
#include "internal.h"
#include "moe.h"
#include "moe_sched.h"
#include "ops.h"
#include "simd.h"
#include "threads.h"
#include "xcache.h"

/* One routed expert on the CPU over its n (token, slot) pairs `ord`: gathers the tokens,
 * runs the FFN and adds each output, weighted, to its token's row of out. */
static void
moe_expert_cpu(const struct ffn_w *ew, struct moe_scratch *sc, const float *x,
               const int32_t *ord, int32_t n, int64_t D, int64_t K, float *out)
{
    const struct k_kernels *kk = k_kernels();

    for (int32_t j = 0; j < n; j++)
        memcpy(sc->xe + j * D, x + (ord[j] / K) * D, (size_t)D * sizeof(float));
    ffn_forward(ew, sc->xe, n, sc->ye, sc->h1, sc->h3);
    for (int32_t j = 0; j < n; j++)
        kk->axpy(out + (ord[j] / K) * D, sc->wt[ord[j]], sc->ye + j * D, D);
}

/* Edge mode: the routed experts come from the bounded cache, in moe_sched_cpu's order. */
int
moe_sched_cached(const struct kli_model *m, int layer, const struct moe_w *w,
                 struct moe_scratch *sc, const float *x, int64_t T, float *out,
                 struct kli_err *err)
{
    const struct config_moe *c = &m->cfg.moe;
    int64_t D = m->cfg.d_model, E = c->n_experts, K = c->top_k;
    int32_t ids[KLI_MAX_EXPERTS], n = 0;

    for (int64_t e = 0; e < E; e++) {
        if (sc->count[e + 1] > sc->count[e])
            ids[n++] = (int32_t)e;
    }
    xcache_begin(m->xc, layer, ids, n);
    moe_prefetch(m, layer, sc, x, T);
    if (c->n_shared > 0)
        ffn_forward(&w->shared, x, T, out, sc->h1, sc->h3);
    else
        memset(out, 0, (size_t)(T * D) * sizeof(float));
    for (int32_t i = 0; i < n; i++) {
        int32_t e = ids[i];
        int32_t ne = sc->count[e + 1] - sc->count[e];
        const int32_t *ord = sc->order + sc->count[e];
        const struct ffn_w *ew = xcache_get(m->xc, layer, e, err);
        if (ew == NULL)
            return err != NULL && err->code != 0 ? err->code : KLI_E_IO;
        moe_expert_cpu(ew, sc, x, ord, ne, D, K, out);
        xcache_put(m->xc, layer, e);
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
    const struct ffn_w *w[KLI_MAX_EXPERTS + 1];
    int64_t n[KLI_MAX_EXPERTS + 1];     /* tokens of item i */
    int64_t row[KLI_MAX_EXPERTS + 1];   /* first pair row of item i */
    const int32_t *ord[KLI_MAX_EXPERTS + 1];   /* its (token, slot) pairs; NULL: every token
                                                  with weight 1 (the shared expert) */
    int64_t h0[KLI_MAX_EXPERTS + 2];    /* item i's hidden rows: [h0[i], h0[i+1]) */
    int64_t n_items, D, P, Fmax;
    int tn;                             /* workers: one range each */
    float *xg, *h1, *h3, *yg;           /* [P][D], [P][Fmax] x2, [P][D] */
    /* --numa partition (moe_w.node): item i's node, -1 for any worker; and per worker
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
    const struct k_kernels *kk = k_kernels();

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
moe_grouped(const struct kli_model *m, const struct moe_w *w, struct moe_scratch *sc,
            const float *x, int64_t T, float *out, const uint8_t *skip)
{
    const struct config_moe *c = &m->cfg.moe;
    const struct k_kernels *kk = k_kernels();
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
    /* with a device working on the shared and the hot experts, only the cold ones are ours */
    int shared = c->n_shared > 0 && skip == NULL;
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
        if (n == 0 || (skip != NULL && skip[e]))
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
        float *p = k_malloc_aligned((size_t)(cap > need ? cap : need) * sizeof(float));
        if (p == NULL)
            return -1;
        k_free_aligned(sc->gbuf);
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
    for (int64_t i = 0; imat_current != NULL && i < g.n_items; i++) {
        imat_add(imat_current, &g.w[i]->gate, g.xg + g.row[i] * D, D, g.n[i]);
        imat_add(imat_current, &g.w[i]->up, g.xg + g.row[i] * D, D, g.n[i]);
    }
    threads_parallel_for(g.tn, 1, moe_group_up_range, &g);
    for (int64_t i = 0; imat_current != NULL && i < g.n_items; i++)
        imat_add(imat_current, &g.w[i]->down, g.h1 + g.row[i] * g.Fmax, g.Fmax, g.n[i]);
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

void
moe_sched_cpu(const struct kli_model *m, const struct moe_w *w, struct moe_scratch *sc,
              const float *x, int64_t T, float *out, const uint8_t *skip)
{
    const struct config_moe *c = &m->cfg.moe;
    int64_t D = m->cfg.d_model, E = c->n_experts, K = c->top_k;

    if (moe_grouped(m, w, sc, x, T, out, skip) == 0)
        return;
    /* The shared experts first, then each routed expert adds its weighted output. */
    if (c->n_shared > 0 && skip == NULL)
        ffn_forward(&w->shared, x, T, out, sc->h1, sc->h3);
    else
        memset(out, 0, (size_t)(T * D) * sizeof(float));
    for (int64_t e = 0; e < E; e++) {
        int32_t n = sc->count[e + 1] - sc->count[e];
        if (n == 0 || (skip != NULL && skip[e]))
            continue;
        moe_expert_cpu(&w->experts[e], sc, x, sc->order + sc->count[e], n, D, K, out);
    }
}

void
moe_sched_add(const struct kli_model *m, const struct moe_w *w, struct moe_scratch *sc,
              const float *x, int64_t T, float *out, const uint8_t *only)
{
    const struct config_moe *c = &m->cfg.moe;
    const struct k_kernels *kk = k_kernels();
    int64_t D = m->cfg.d_model, E = c->n_experts, K = c->top_k;

    if (c->n_shared > 0) {
        ffn_forward(&w->shared, x, T, sc->ye, sc->h1, sc->h3);
        kk->axpy(out, 1.0f, sc->ye, T * D);
    }
    for (int64_t e = 0; e < E; e++) {
        int32_t n = sc->count[e + 1] - sc->count[e];
        if (n == 0 || !only[e])
            continue;
        moe_expert_cpu(&w->experts[e], sc, x, sc->order + sc->count[e], n, D, K, out);
    }
}
