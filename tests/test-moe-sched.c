/*
 * test-moe-sched.c - the CPU schedules of a MoE layer (src/moe_sched.c) against a float64
 * reference written here from the formula (doc/model.md section 6): for each row,
 *     y = FFN_shared(x) + sum over its chosen experts e of wt_e * FFN_e(x),
 *     FFN(x) = W_down (silu(W_gate x) * (W_up x)),
 * with the weights read row by row through ops_row_f32. The routing (moe_route_rows) is the
 * one under test in test-moe; here it only supplies which experts and weights.
 *
 * Checked: moe_forward (the resident CPU layer), and the split the layer dispatcher makes
 * with a device: moe_sched_cpu skipping a set of "hot" experts and the shared expert, then
 * moe_sched_add computing exactly those (a device that failed), for several sets; each for
 * a few rows (the grouped schedule) and for many (one product per expert). The split sums
 * in another order, so it is compared with the reference within 1e-5 relative L2, and with
 * moe_forward within the same.
 * Data: $KLI_TESTDATA/tiny-kimi-linear.
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "moe_sched.h"
#include "ops.h"
#include "session.h"
#include "tap.h"
#include "testlib.h"

static double
rel_l2(const float *a, const double *b, int64_t n)
{
    double num = 0, den = 0;

    for (int64_t i = 0; i < n; i++) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* y += s * FFN(x) in float64. */
static void
ref_ffn(const struct ffn_w *f, const float *x, int64_t D, double s, double *y)
{
    int64_t F = f->gate.shape[0];
    float *row = malloc((size_t)(D > F ? D : F) * sizeof(float));
    double *h = malloc((size_t)F * sizeof(double));

    for (int64_t j = 0; j < F; j++) {
        double g = 0, u = 0;
        ops_row_f32(&f->gate, j, row);
        for (int64_t i = 0; i < D; i++)
            g += (double)row[i] * x[i];
        ops_row_f32(&f->up, j, row);
        for (int64_t i = 0; i < D; i++)
            u += (double)row[i] * x[i];
        h[j] = g / (1.0 + exp(-g)) * u;
    }
    for (int64_t i = 0; i < D; i++) {
        double d = 0;
        ops_row_f32(&f->down, i, row);
        for (int64_t j = 0; j < F; j++)
            d += (double)row[j] * h[j];
        y[i] += s * d;
    }
    free(row);
    free(h);
}

static void
one_layer(const struct kli_model *m, struct moe_scratch *sc, int layer, int64_t T)
{
    const struct config_moe *c = &m->cfg.moe;
    const struct moe_w *w = &m->layers[layer].moe;
    int64_t D = m->cfg.d_model, K = c->top_k;
    int32_t E = c->n_experts;
    float *x = calloc((size_t)(T * D), sizeof(float));
    float *y = malloc((size_t)(T * D) * sizeof(float));
    float *yf = malloc((size_t)(T * D) * sizeof(float));
    double *ref = calloc((size_t)(T * D), sizeof(double));
    uint8_t hot[KLI_MAX_EXPERTS];
    uint32_t r = 12345u + (uint32_t)(layer * 7 + T);

    for (int64_t i = 0; i < T * D; i++) {
        r = r * 1664525u + 1013904223u;
        x[i] = (float)((r >> 8) * (1.0 / 16777216.0) * 2.0 - 1.0);
    }
    moe_forward(m, w, sc, x, T, yf);
    /* the reference, with moe_forward's routing */
    for (int64_t t = 0; t < T; t++) {
        if (c->n_shared > 0)
            ref_ffn(&w->shared, x + t * D, D, 1.0, ref + t * D);
        for (int64_t k = 0; k < K; k++)
            ref_ffn(&w->experts[sc->idx[t * K + k]], x + t * D, D, sc->wt[t * K + k],
                    ref + t * D);
    }
    ok(rel_l2(yf, ref, T * D) < 1e-5, "layer %d, %lld rows: moe_forward vs float64: %.2e",
       layer, (long long)T, rel_l2(yf, ref, T * D));

    /* the device's share: none, every other expert, all of them */
    for (int set = 0; set < 3; set++) {
        for (int32_t e = 0; e < E; e++)
            hot[e] = set == 2 || (set == 1 && e % 2 == 1);
        moe_route_rows(m, w, sc, x, T);
        moe_sched_cpu(m, w, sc, x, T, y, hot);
        moe_sched_add(m, w, sc, x, T, y, hot);
        double d = rel_l2(y, ref, T * D);
        double dd = 0, nn = 0;
        for (int64_t i = 0; i < T * D; i++) {
            dd += ((double)y[i] - yf[i]) * ((double)y[i] - yf[i]);
            nn += (double)yf[i] * yf[i];
        }
        ok(d < 1e-5 && sqrt(dd / nn) < 1e-5, "layer %d, %lld rows, %s hot: skipped then "
           "added vs float64 %.2e, vs moe_forward %.2e", layer, (long long)T,
           set == 0 ? "no expert" : set == 1 ? "odd experts" : "every expert", d,
           sqrt(dd / nn));
    }
    free(x);
    free(y);
    free(yf);
    free(ref);
}

int
main(int argc, char **argv)
{
    struct kli_model_options mo;
    struct kli_session_options so;
    struct kli_model *m = NULL;
    struct kli_session *s = NULL;
    struct kli_err err = {0};
    char dir[4096];

    tap_init_whole(argc, argv);
    tl_path(dir, sizeof(dir), "tiny-kimi-linear");
    kli_model_options_init(&mo);
    mo.gpu = KLI_GPU_OFF;
    mo.n_threads = 2;
    kli_session_options_init(&so);
    so.batch_max = 40;
    if (kli_model_open(&m, dir, &mo, &err) != KLI_OK ||
        kli_session_create(&s, m, &so, &err) != KLI_OK) {
        printf("Bail out! cannot open %s: %s\n", dir, err.msg);
        return 1;
    }
    for (int i = 0; i < m->cfg.n_layers; i++) {
        if (m->layers[i].ffn_kind != KLI_FFN_MOE)
            continue;
        one_layer(m, &s->moe_sc, i, 3);    /* the grouped schedule */
        one_layer(m, &s->moe_sc, i, 40);   /* one product per expert */
    }
    kli_session_free(s);
    kli_model_close(m);
    plan_done();
    return tap_exit();
}
