/*
 * test-mla.c - the absorbed MLA attention (scores against the latent cache, W_UK moved onto
 * the query, W_UV applied once to the weighted latent sum) against the expanded form (K and
 * V rebuilt per cached token through kv_b), with the real MLA weights of the tiny model, and
 * both against a float64 reference built here straight from the checkpoint's kv_b_proj
 * (doc/model.md 5.1 / 5.2).
 */
#include "config.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "mla.h"
#include "model.h"
#include "tap.h"
#include "testlib.h"
#include "weights.h"

#define TOL 1e-5

#define SEED 0x2545f4914f6cdd1dull

static uint64_t rng_state = SEED;

/* kv_b_proj of the layer in double: [H*(nope+v)][L], decoded from the checkpoint bytes. */
static double *
load_kv_b(const struct k_mla_w *w)
{
    int64_t rows = w->kv_b.shape[0], cols = w->kv_b.shape[1];
    uint64_t rb = model_row_bytes(&w->kv_b);
    double *out = tl_calloc((size_t)(rows * cols), sizeof(double));
    float *row = tl_calloc((size_t)cols, sizeof(float));

    for (int64_t r = 0; r < rows; r++) {
        dtype_to_f32(w->kv_b.dtype, (const uint8_t *)w->kv_b.data + (uint64_t)r * rb, row,
                         cols);
        for (int64_t l = 0; l < cols; l++)
            out[r * cols + l] = row[l];
    }
    free(row);
    return out;
}

/* The float64 score of a query against one cached row cs: (W_UK c) . q_nope + k_rope . q_rope,
 * over sqrt(nope + rope); wuk is the head's W_UK [nope][L]. */
static double
ref_score(const struct config_mla *c, const double *wuk, const float *cs, const float *q)
{
    int64_t Lr = c->kv_lora_rank, nope = c->qk_nope_dim, rope = c->qk_rope_dim;
    double dot = 0.0;

    for (int64_t i = 0; i < nope; i++) {
        double k = 0.0;
        for (int64_t l = 0; l < Lr; l++)
            k += wuk[i * Lr + l] * cs[l];
        dot += k * q[i];
    }
    for (int64_t i = 0; i < rope; i++)
        dot += (double)q[nope + i] * cs[Lr + i];
    return dot / sqrt((double)(nope + rope));
}

/* The expanded form in float64 for head h: k_nope = W_UK c, v = W_UV c per cached row. */
static void
ref_attend(const struct config_mla *c, const double *kvb, const float *cache, int64_t n,
           int64_t h, const float *q, double *o)
{
    int64_t Lr = c->kv_lora_rank, nope = c->qk_nope_dim, rope = c->qk_rope_dim;
    int64_t dv = c->v_head_dim, stride = Lr + rope;
    const double *wuk = kvb + h * (nope + dv) * Lr, *wuv = wuk + nope * Lr;
    double *sc = tl_calloc((size_t)n, sizeof(double)), mx = -INFINITY, sum = 0.0;

    for (int64_t s = 0; s < n; s++) {
        sc[s] = ref_score(c, wuk, cache + s * stride, q);
        mx = sc[s] > mx ? sc[s] : mx;
    }
    for (int64_t s = 0; s < n; s++) {
        sc[s] = exp(sc[s] - mx);
        sum += sc[s];
    }
    for (int64_t j = 0; j < dv; j++)
        o[j] = 0.0;
    for (int64_t s = 0; s < n; s++) {
        const float *cs = cache + s * stride;
        for (int64_t j = 0; j < dv; j++) {
            double v = 0.0;
            for (int64_t l = 0; l < Lr; l++)
                v += wuv[j * Lr + l] * cs[l];
            o[j] += sc[s] / sum * v;
        }
    }
    free(sc);
}

/* Spread (max - min) of the float64 scores, to show how peaked the softmax is. */
static double
score_spread(const struct config_mla *c, const double *kvb, const float *cache, int64_t n,
             int64_t h, const float *q)
{
    int64_t Lr = c->kv_lora_rank, nope = c->qk_nope_dim, rope = c->qk_rope_dim;
    int64_t dv = c->v_head_dim, stride = Lr + rope;
    const double *wuk = kvb + h * (nope + dv) * Lr;
    double lo = INFINITY, hi = -INFINITY;

    for (int64_t s = 0; s < n; s++) {
        double dot = ref_score(c, wuk, cache + s * stride, q);
        lo = dot < lo ? dot : lo;
        hi = dot > hi ? dot : hi;
    }
    return hi - lo;
}

static void
check(const struct kli_model *m, const struct k_mla_w *w, const double *kvb, int64_t n,
      double qscale)
{
    const struct config_mla *c = &m->cfg.mla;
    int64_t Lr = c->kv_lora_rank, rope = c->qk_rope_dim, stride = Lr + rope;
    int64_t dqk = c->qk_nope_dim + rope, dv = c->v_head_dim, H = c->n_heads;
    int64_t nw = mla_work_floats(&m->cfg, n);
    float *cache = tl_calloc((size_t)(n * stride), sizeof(float));
    float *q = tl_calloc((size_t)dqk, sizeof(float));
    float *oa = tl_calloc((size_t)dv, sizeof(float)), *oe = tl_calloc((size_t)dv, sizeof(float));
    double *od = tl_calloc((size_t)dv, sizeof(double));
    /* one float past the workspace as a guard */
    float *work = tl_calloc((size_t)(nw + 1), sizeof(float));

    for (int64_t i = 0; i < n * stride; i++)
        cache[i] = (float)tl_normal(&rng_state);
    for (int64_t h = 0; h < H; h++) {
        for (int64_t i = 0; i < dqk; i++)
            q[i] = (float)(qscale * tl_normal(&rng_state));
        work[nw] = 12345.0f;
        mla_attend_absorbed(m, w, cache, n, h, q, oa, work);
        int guard_a = work[nw] == 12345.0f;
        mla_attend_expanded(m, w, cache, n, h, q, oe, work);
        int guard_e = work[nw] == 12345.0f;
        ref_attend(c, kvb, cache, n, h, q, od);

        double e_ae = tl_rel_l2(oa, oe, dv), e_ad = tl_rel_l2_d(oa, od, dv);
        double e_ed = tl_rel_l2_d(oe, od, dv);
        diag("n=%lld head %lld q scale %g: score spread %.3g", (long long)n, (long long)h,
             qscale, score_spread(c, kvb, cache, n, h, q));
        ok(e_ae < TOL, "n=%lld head %lld q scale %g: absorbed vs expanded: %.3g",
           (long long)n, (long long)h, qscale, e_ae);
        ok(e_ad < TOL && e_ed < TOL,
           "n=%lld head %lld q scale %g: vs float64 from kv_b_proj: absorbed %.3g, "
           "expanded %.3g", (long long)n, (long long)h, qscale, e_ad, e_ed);
        ok(guard_a && guard_e, "n=%lld head %lld: workspace of mla_work_floats is enough",
           (long long)n, (long long)h);
    }
    free(cache);
    free(q);
    free(oa);
    free(oe);
    free(od);
    free(work);
}

int
main(int argc, char **argv)
{
    static const char *names[] = {"n1", "n7", "n300"};
    static const int64_t ns[] = {1, 7, 300};
    struct kli_model *m;
    int mla = -1;

    (void)plan;   /* tap.h: the plan is printed at the end instead */
    (void)skip_all;
    tap_init(argc, argv);
    m = tl_open_model("tiny-kimi-linear", 1);
    for (int i = 0; i < m->cfg.n_layers; i++) {
        if (m->cfg.layer_mixer[i] == KLI_MIXER_MLA) {
            mla = i;
            break;
        }
    }
    ok(mla == 3, "the tiny model's first MLA layer is layer 3 (got %d)", mla);
    if (mla < 0) {
        kli_model_close(m);
        plan_done();
        return tap_exit();
    }
    const struct k_mla_w *w = &m->layers[mla].mla;
    const struct config_mla *c = &m->cfg.mla;
    diag("MLA: %d heads, latent %d, nope %d, rope %d, v %d", c->n_heads, c->kv_lora_rank,
         c->qk_nope_dim, c->qk_rope_dim, c->v_head_dim);
    double *kvb = load_kv_b(w);

    /* one case per cache length; each draws its inputs from the seed afresh */
    for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++) {
        if (!tap_case_seeded(names[i], &rng_state, SEED))
            continue;
        check(m, w, kvb, ns[i], 1.0);
        check(m, w, kvb, ns[i], 30.0);
    }

    free(kvb);
    kli_model_close(m);
    plan_done();
    return tap_exit();
}
