/*
 * moe.c - the router, and the grouping of a batch's rows by expert (doc/model.md section 6).
 * The schedules that compute the experts are moe_sched.c's; where a layer runs, layer.c's.
 *
 * The router is DeepSeek-V3's "noaux_tc" selection: sigmoid scores plus a learned
 * correction bias pick the experts, but the bias never enters the weights (decision 1 of
 * doc/model.md: the official remote code adds it through an aliasing slip; vLLM,
 * llama.cpp and DeepSeek-V3 do not).
 */
#include "config.h"

#include <math.h>
#include <string.h>

#include "internal.h"
#include "moe.h"
#include "moe_sched.h"
#include "ops.h"
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
moe_route(const struct config_moe *c, const float *logits, const float *bias, int32_t *idx,
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
void
moe_prefetch(const struct kli_model *m, int layer, struct moe_scratch *sc, const float *x,
             int64_t T)
{
    const struct k_config *cfg = &m->cfg;
    const struct config_moe *c = &cfg->moe;
    int32_t E = c->n_experts, K = c->top_k, l2 = layer + 1;
    float tmp[2 * KLI_MAX_EXPERTS], wt[KLI_MAX_EXPERTS];
    int32_t idx[KLI_MAX_EXPERTS], ids[KLI_MAX_EXPERTS], n = 0;
    uint8_t want[KLI_MAX_EXPERTS] = {0};

    while (l2 < cfg->n_layers && m->layers[l2].ffn_kind != KLI_FFN_MOE)
        l2++;
    if (l2 >= cfg->n_layers || T > 8)
        return;
    const struct moe_w *w2 = &m->layers[l2].moe;
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

void
moe_route_rows(const struct kli_model *m, const struct moe_w *w, struct moe_scratch *sc,
               const float *x, int64_t T)
{
    const struct config_moe *c = &m->cfg.moe;
    int64_t D = m->cfg.d_model, E = c->n_experts, K = c->top_k;
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
}

void
moe_forward(const struct kli_model *m, const struct moe_w *w, struct moe_scratch *sc,
            const float *x, int64_t T, float *out)
{
    moe_route_rows(m, w, sc, x, T);
    moe_sched_cpu(m, w, sc, x, T, out, NULL);
}
