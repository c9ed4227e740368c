/*
 * test-kda.c - the two forms of the KDA delta rule for one head (src/kda.c) against each
 * other and against a float64 recurrence written here (doc/model.md 4.6):
 *
 *     S <- Diag(exp(g)) S;  u = beta (v - S^T k);  S <- S + k u^T;  o = S^T q
 *
 * Random inputs from a fixed seed, a non-zero carried state, head shapes with V != K, prompt
 * lengths around the chunk boundary, interleaved heads (strides larger than the head), and
 * decay strong enough that exp(-G) would overflow float32.
 */
#include "config.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kda.h"
#include "kli.h"
#include "tap.h"
#include "testlib.h"

#define TOL 1e-5

#define SEED 0x9e3779b97f4a7c15ull

static uint64_t rng_state = SEED;

static double
softplus(double z)
{
    return z > 20.0 ? z : log1p(exp(z));
}

static int
all_finite(const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(x[i]))
            return 0;
    }
    return 1;
}

/* x / sqrt(sum x^2 + 1e-6) * scale over n values. */
static void
l2norm(float *x, int64_t n, double scale)
{
    double ss = 0.0;

    for (int64_t i = 0; i < n; i++)
        ss += (double)x[i] * x[i];
    double r = scale / sqrt(ss + 1e-6);
    for (int64_t i = 0; i < n; i++)
        x[i] = (float)(x[i] * r);
}

/* Inputs of H interleaved heads over T tokens, laid out as the layer holds them:
 * q, k, g [T][H*K]; v [T][H*V]; beta [T][H]; plus S0 [H][K][V]. */
struct kda_case {
    int64_t T, K, V, H;
    float *q, *k, *g, *v, *beta, *S0;
};

/* One log-decay value: mostly -exp(a) * softplus(z) with a, z ~ N(0,1) (the model's
 * -exp(A_log) * softplus(f + dt_bias)), with some channels near 0 and some very strong. */
static float
draw_g(int64_t d)
{
    if (d % 17 == 3)
        return -30.0f;
    if (d % 13 == 5)
        return (float)(-1e-4 * tl_unif(&rng_state));
    if (d % 11 == 7)
        return 0.0f;
    return (float)(-exp(tl_normal(&rng_state)) * softplus(tl_normal(&rng_state)));
}

static void
case_init(struct kda_case *c, int64_t T, int64_t K, int64_t V, int64_t H)
{
    int64_t HK = H * K, HV = H * V;

    c->T = T;
    c->K = K;
    c->V = V;
    c->H = H;
    c->q = tl_calloc((size_t)(T * HK), sizeof(float));
    c->k = tl_calloc((size_t)(T * HK), sizeof(float));
    c->g = tl_calloc((size_t)(T * HK), sizeof(float));
    c->v = tl_calloc((size_t)(T * HV), sizeof(float));
    c->beta = tl_calloc((size_t)(T * H), sizeof(float));
    c->S0 = tl_calloc((size_t)(H * K * V), sizeof(float));
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < H; h++) {
            float *q = c->q + t * HK + h * K, *k = c->k + t * HK + h * K;
            float *g = c->g + t * HK + h * K, *v = c->v + t * HV + h * V;
            for (int64_t d = 0; d < K; d++) {
                q[d] = (float)tl_normal(&rng_state);
                k[d] = (float)tl_normal(&rng_state);
                g[d] = draw_g(d);
            }
            l2norm(q, K, 1.0 / sqrt((double)K));
            l2norm(k, K, 1.0);
            for (int64_t j = 0; j < V; j++)
                v[j] = (float)tl_normal(&rng_state);
            c->beta[t * H + h] = (float)(1.0 / (1.0 + exp(-1.5 * tl_normal(&rng_state))));
        }
    }
    for (int64_t i = 0; i < H * K * V; i++)
        c->S0[i] = (float)(0.5 * tl_normal(&rng_state));
}

static void
case_free(struct kda_case *c)
{
    free(c->q);
    free(c->k);
    free(c->g);
    free(c->v);
    free(c->beta);
    free(c->S0);
}

/* The recurrence in float64, head h of the case: S [K][V] starts from S0, o [T][V]. */
static void
ref_recurrent(const struct kda_case *c, int64_t h, double *S, double *o)
{
    int64_t K = c->K, V = c->V, HK = c->H * K, HV = c->H * V;
    double *u = tl_calloc((size_t)V, sizeof(double));

    for (int64_t i = 0; i < K * V; i++)
        S[i] = c->S0[h * K * V + i];
    for (int64_t t = 0; t < c->T; t++) {
        const float *q = c->q + t * HK + h * K, *k = c->k + t * HK + h * K;
        const float *g = c->g + t * HK + h * K, *v = c->v + t * HV + h * V;
        double b = c->beta[t * c->H + h];
        for (int64_t d = 0; d < K; d++) {
            double a = exp((double)g[d]);
            for (int64_t j = 0; j < V; j++)
                S[d * V + j] *= a;
        }
        for (int64_t j = 0; j < V; j++) {
            double p = 0.0;
            for (int64_t d = 0; d < K; d++)
                p += S[d * V + j] * k[d];
            u[j] = b * (v[j] - p);
        }
        for (int64_t d = 0; d < K; d++) {
            for (int64_t j = 0; j < V; j++)
                S[d * V + j] += (double)k[d] * u[j];
        }
        for (int64_t j = 0; j < V; j++) {
            double s = 0.0;
            for (int64_t d = 0; d < K; d++)
                s += S[d * V + j] * q[d];
            o[t * V + j] = s;
        }
    }
    free(u);
}

/* One head of a case through both forms and the float64 reference, each from S0. */
struct one_head {
    float *S_r, *o_r;    /* kda_recurrent */
    float *S_c, *o_c;    /* kda_chunked */
    double *S_d, *o_d;   /* ref_recurrent */
};

static void
one_head_run(const struct kda_case *c, struct one_head *r)
{
    int64_t T = c->T, K = c->K, V = c->V;
    float *work = tl_calloc((size_t)kda_chunk_floats(K, V), sizeof(float));

    r->S_r = tl_calloc((size_t)(K * V), sizeof(float));
    r->S_c = tl_calloc((size_t)(K * V), sizeof(float));
    r->o_r = tl_calloc((size_t)(T * V), sizeof(float));
    r->o_c = tl_calloc((size_t)(T * V), sizeof(float));
    r->S_d = tl_calloc((size_t)(K * V), sizeof(double));
    r->o_d = tl_calloc((size_t)(T * V), sizeof(double));
    memcpy(r->S_r, c->S0, (size_t)(K * V) * sizeof(float));
    memcpy(r->S_c, c->S0, (size_t)(K * V) * sizeof(float));
    kda_recurrent(T, K, V, c->q, c->k, c->v, c->g, c->beta, K, V, 1, r->S_r, r->o_r, V);
    kda_chunked(T, K, V, c->q, c->k, c->v, c->g, c->beta, K, V, 1, r->S_c, r->o_c, V, work);
    ref_recurrent(c, 0, r->S_d, r->o_d);
    free(work);
}

static void
one_head_free(struct one_head *r)
{
    free(r->S_r);
    free(r->S_c);
    free(r->o_r);
    free(r->o_c);
    free(r->S_d);
    free(r->o_d);
}

/* One head, contiguous (H = 1): recurrent vs float64, chunked vs recurrent. */
static void
check_single(int64_t K, int64_t V, int64_t T)
{
    struct kda_case c;
    struct one_head r;

    case_init(&c, T, K, V, 1);
    one_head_run(&c, &r);
    float *S_r = r.S_r, *S_c = r.S_c, *o_r = r.o_r, *o_c = r.o_c;
    double *S_d = r.S_d, *o_d = r.o_d;

    double e_ro = tl_rel_l2_d(o_r, o_d, T * V), e_rs = tl_rel_l2_d(S_r, S_d, K * V);
    double e_co = tl_rel_l2(o_c, o_r, T * V), e_cs = tl_rel_l2(S_c, S_r, K * V);
    double e_cdo = tl_rel_l2_d(o_c, o_d, T * V), e_cds = tl_rel_l2_d(S_c, S_d, K * V);
    ok(e_ro < TOL, "K=%lld V=%lld T=%lld: recurrent o vs float64 reference: %.3g",
       (long long)K, (long long)V, (long long)T, e_ro);
    ok(e_rs < TOL, "K=%lld V=%lld T=%lld: recurrent final state vs float64 reference: %.3g",
       (long long)K, (long long)V, (long long)T, e_rs);
    ok(e_co < TOL, "K=%lld V=%lld T=%lld: chunked o vs recurrent: %.3g",
       (long long)K, (long long)V, (long long)T, e_co);
    ok(e_cs < TOL, "K=%lld V=%lld T=%lld: chunked final state vs recurrent: %.3g",
       (long long)K, (long long)V, (long long)T, e_cs);
    ok(e_cdo < TOL && e_cds < TOL,
       "K=%lld V=%lld T=%lld: chunked vs float64 reference: o %.3g, state %.3g",
       (long long)K, (long long)V, (long long)T, e_cdo, e_cds);

    one_head_free(&r);
    case_free(&c);
}

/* H interleaved heads called one at a time with the layer's strides (ld_qk = H*K,
 * ld_v = ld_o = H*V, ld_b = H), against the float64 reference per head, and chunked vs
 * recurrent over the whole output. */
static void
check_strided(int64_t K, int64_t V, int64_t T, int64_t H)
{
    struct kda_case c;
    int64_t HK = H * K, HV = H * V, KV = K * V;
    float *S_r, *S_c, *o_r, *o_c, *work;
    double *S_d, *o_d;
    double worst_ro = 0.0, worst_rs = 0.0;

    case_init(&c, T, K, V, H);
    S_r = tl_calloc((size_t)(H * KV), sizeof(float));
    S_c = tl_calloc((size_t)(H * KV), sizeof(float));
    o_r = tl_calloc((size_t)(T * HV), sizeof(float));
    o_c = tl_calloc((size_t)(T * HV), sizeof(float));
    work = tl_calloc((size_t)kda_chunk_floats(K, V), sizeof(float));
    S_d = tl_calloc((size_t)KV, sizeof(double));
    o_d = tl_calloc((size_t)(T * V), sizeof(double));
    memcpy(S_r, c.S0, (size_t)(H * KV) * sizeof(float));
    memcpy(S_c, c.S0, (size_t)(H * KV) * sizeof(float));

    /* Poison the work area so that a read before write shows. */
    for (int64_t i = 0; i < kda_chunk_floats(K, V); i++)
        work[i] = NAN;

    for (int64_t h = 0; h < H; h++) {
        kda_recurrent(T, K, V, c.q + h * K, c.k + h * K, c.v + h * V, c.g + h * K,
                      c.beta + h, HK, HV, H, S_r + h * KV, o_r + h * V, HV);
        kda_chunked(T, K, V, c.q + h * K, c.k + h * K, c.v + h * V, c.g + h * K, c.beta + h,
                    HK, HV, H, S_c + h * KV, o_c + h * V, HV, work);
        ref_recurrent(&c, h, S_d, o_d);
        /* this head's output column block */
        double num = 0.0, den = 0.0;
        for (int64_t t = 0; t < T; t++) {
            for (int64_t j = 0; j < V; j++) {
                double d = (double)o_r[t * HV + h * V + j] - o_d[t * V + j];
                num += d * d;
                den += o_d[t * V + j] * o_d[t * V + j];
            }
        }
        double e_o = den > 0.0 ? sqrt(num / den) : sqrt(num);
        if (!all_finite(o_r, T * HV))
            e_o = INFINITY;
        double e_s = tl_rel_l2_d(S_r + h * KV, S_d, KV);
        worst_ro = e_o > worst_ro ? e_o : worst_ro;
        worst_rs = e_s > worst_rs ? e_s : worst_rs;
    }
    double e_co = tl_rel_l2(o_c, o_r, T * HV), e_cs = tl_rel_l2(S_c, S_r, H * KV);
    ok(worst_ro < TOL && worst_rs < TOL,
       "%lld interleaved heads K=%lld V=%lld T=%lld: recurrent vs float64: o %.3g, state %.3g",
       (long long)H, (long long)K, (long long)V, (long long)T, worst_ro, worst_rs);
    ok(e_co < TOL && e_cs < TOL,
       "%lld interleaved heads K=%lld V=%lld T=%lld: chunked vs recurrent: o %.3g, state %.3g",
       (long long)H, (long long)K, (long long)V, (long long)T, e_co, e_cs);

    /* The same heads run contiguously must give the same numbers as the strided calls. */
    {
        float *q1 = tl_calloc((size_t)(T * K), sizeof(float));
        float *k1 = tl_calloc((size_t)(T * K), sizeof(float));
        float *g1 = tl_calloc((size_t)(T * K), sizeof(float));
        float *v1 = tl_calloc((size_t)(T * V), sizeof(float));
        float *b1 = tl_calloc((size_t)T, sizeof(float));
        float *S1 = tl_calloc((size_t)KV, sizeof(float));
        float *o1 = tl_calloc((size_t)(T * V), sizeof(float));
        double worst = 0.0;
        int64_t h = H - 1;
        for (int64_t t = 0; t < T; t++) {
            memcpy(q1 + t * K, c.q + t * HK + h * K, (size_t)K * sizeof(float));
            memcpy(k1 + t * K, c.k + t * HK + h * K, (size_t)K * sizeof(float));
            memcpy(g1 + t * K, c.g + t * HK + h * K, (size_t)K * sizeof(float));
            memcpy(v1 + t * V, c.v + t * HV + h * V, (size_t)V * sizeof(float));
            b1[t] = c.beta[t * H + h];
        }
        memcpy(S1, c.S0 + h * KV, (size_t)KV * sizeof(float));
        kda_chunked(T, K, V, q1, k1, v1, g1, b1, K, V, 1, S1, o1, V, work);
        for (int64_t t = 0; t < T; t++) {
            double e = tl_rel_l2(o1 + t * V, o_c + t * HV + h * V, V);
            worst = e > worst ? e : worst;
        }
        double es = tl_rel_l2(S1, S_c + h * KV, KV);
        ok(worst < 1e-6 && es < 1e-6,
           "K=%lld V=%lld T=%lld: chunked contiguous == strided (head %lld): o %.3g, "
           "state %.3g", (long long)K, (long long)V, (long long)T, (long long)h, worst, es);
        free(q1);
        free(k1);
        free(g1);
        free(v1);
        free(b1);
        free(S1);
        free(o1);
    }

    free(S_r);
    free(S_c);
    free(o_r);
    free(o_c);
    free(work);
    free(S_d);
    free(o_d);
    case_free(&c);
}

/* g = -80 on every channel: exp(-G) would be exp(80 * 64), far beyond float32. The chunked
 * form must stay finite and agree with the recurrence. */
static void
check_strong_decay(int64_t K, int64_t V, int64_t T)
{
    struct kda_case c;
    struct one_head r;

    case_init(&c, T, K, V, 1);
    for (int64_t i = 0; i < T * K; i++)
        c.g[i] = -80.0f;
    one_head_run(&c, &r);
    float *S_r = r.S_r, *S_c = r.S_c, *o_r = r.o_r, *o_c = r.o_c;
    double *S_d = r.S_d, *o_d = r.o_d;

    ok(all_finite(o_c, T * V) && all_finite(S_c, K * V),
       "g = -80 everywhere, K=%lld V=%lld T=%lld: chunked output and state finite",
       (long long)K, (long long)V, (long long)T);
    double e_o = tl_rel_l2_d(o_c, o_d, T * V), e_s = tl_rel_l2_d(S_c, S_d, K * V);
    ok(e_o < TOL && e_s < TOL,
       "g = -80 everywhere, K=%lld V=%lld T=%lld: chunked vs float64: o %.3g, state %.3g",
       (long long)K, (long long)V, (long long)T, e_o, e_s);
    double r_o = tl_rel_l2_d(o_r, o_d, T * V), r_s = tl_rel_l2_d(S_r, S_d, K * V);
    ok(r_o < TOL && r_s < TOL,
       "g = -80 everywhere, K=%lld V=%lld T=%lld: recurrent vs float64: o %.3g, state %.3g",
       (long long)K, (long long)V, (long long)T, r_o, r_s);

    one_head_free(&r);
    case_free(&c);
}

/* Feeding a sequence in pieces (state carried between calls) equals one call. */
static void
check_pieces(int64_t K, int64_t V)
{
    const int64_t T = 200, cut[] = {0, 1, 64, 100, 165, 200};
    struct kda_case c;
    float *S1, *S2, *o1, *o2, *work;

    case_init(&c, T, K, V, 1);
    S1 = tl_calloc((size_t)(K * V), sizeof(float));
    S2 = tl_calloc((size_t)(K * V), sizeof(float));
    o1 = tl_calloc((size_t)(T * V), sizeof(float));
    o2 = tl_calloc((size_t)(T * V), sizeof(float));
    work = tl_calloc((size_t)kda_chunk_floats(K, V), sizeof(float));
    memcpy(S1, c.S0, (size_t)(K * V) * sizeof(float));
    memcpy(S2, c.S0, (size_t)(K * V) * sizeof(float));
    kda_chunked(T, K, V, c.q, c.k, c.v, c.g, c.beta, K, V, 1, S1, o1, V, work);
    for (size_t i = 0; i + 1 < sizeof(cut) / sizeof(cut[0]); i++) {
        int64_t t0 = cut[i], n = cut[i + 1] - cut[i];
        if (n == 1)
            kda_recurrent(n, K, V, c.q + t0 * K, c.k + t0 * K, c.v + t0 * V, c.g + t0 * K,
                          c.beta + t0, K, V, 1, S2, o2 + t0 * V, V);
        else
            kda_chunked(n, K, V, c.q + t0 * K, c.k + t0 * K, c.v + t0 * V, c.g + t0 * K,
                        c.beta + t0, K, V, 1, S2, o2 + t0 * V, V, work);
    }
    double e_o = tl_rel_l2(o2, o1, T * V), e_s = tl_rel_l2(S2, S1, K * V);
    ok(e_o < TOL && e_s < TOL,
       "K=%lld V=%lld: pieces 1+63+36+65+35 with carried state vs one call: o %.3g, "
       "state %.3g", (long long)K, (long long)V, e_o, e_s);
    free(S1);
    free(S2);
    free(o1);
    free(o2);
    free(work);
    case_free(&c);
}

int
main(int argc, char **argv)
{
    static const int64_t dims[][2] = {{32, 32}, {128, 128}, {16, 48}};
    static const int64_t lens[] = {1, 63, 64, 65, 130, 300};

    (void)plan;       /* tap.h: the plan is printed at the end instead */
    (void)skip_all;   /* no test data needed */
    tap_init(argc, argv);
    diag("kernels: %s", kli_simd_variant());
    if (tap_case_seeded("chunked_vs_recurrent", &rng_state, SEED)) {
        for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++) {
            for (size_t j = 0; j < sizeof(lens) / sizeof(lens[0]); j++)
                check_single(dims[i][0], dims[i][1], lens[j]);
        }
    }
    if (tap_case_seeded("strided", &rng_state, SEED)) {
        check_strided(32, 32, 130, 3);
        check_strided(16, 48, 65, 4);
        check_strided(128, 128, 70, 2);
        check_strided(48, 16, 1, 3);
    }
    if (tap_case_seeded("strong_decay", &rng_state, SEED)) {
        check_strong_decay(32, 32, 64);
        check_strong_decay(128, 128, 64);
        check_strong_decay(16, 48, 130);
    }
    if (tap_case_seeded("pieces", &rng_state, SEED)) {
        check_pieces(32, 32);
        check_pieces(16, 48);
    }
    plan_done();
    return tap_exit();
}
