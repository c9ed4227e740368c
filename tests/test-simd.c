/*
 * test-simd.c - every SIMD kernel table against a float64 reference (and generic beside it).
 *
 * For each table from kernels_all() other than generic, each entry runs on random data and
 * random shapes with odd tails and unaligned pointers: k from one block to a few thousand,
 * n = 1..70, m = 1..9 (and a few shapes with m = 10..130 and k > 16384, past the kernels'
 * internal thresholds), ldx > k and ldy > n. Variants compiled in but not usable on
 * this CPU (and variants not compiled in) are reported as SKIP. avx512vnni, the same source
 * as avx512 with vpdpbusd, must also match avx512 bit for bit, and neondot (SDOT) neon.
 *
 * Tolerances, per kernel:
 *   to_f32        bit-exact against dtype_to_f32 (NaN matches any NaN).
 *   scale         bit-exact (one rounding either way).
 *   axpy          |y - ref| <= 2^-23 (|y0| + |a x|) per element (FMA or not: one rounding
 *                 more or less).
 *   dot           |s - ref| <= (n/4 + 16) 2^-24 sum|a b|, the float32 summation bound for
 *                 sums split over lanes.
 *   matmul F32/F16/BF16: the reference uses the dequantized weights, so only summation error
 *                 is left: per element |y - ref| <= (k/4 + 64) 2^-24 sum_j |x_j w_j|, and over
 *                 the whole output the relative L2 error must stay below 1e-5.
 *   matmul Q8_0/Q4/K types: a kernel may quantize x per 32-block (per super-block of 256
 *                 for the K types) to int8 with scale d = amax/127 (round to nearest), which
 *                 moves each x_j by at most d/2 = amax_b/254. So per element
 *                 |y - ref| <= 1.01 sum_b (amax_b / 254) sum_{j in b} |w_j|
 *                 + (k/4 + 64) 2^-24 sum_j |x_j w_j| (the 1% covers the rounding of d and
 *                 1/d), and the relative L2 error of the output must stay below 2e-2
 *                 (for random x the expected value is about amax / (127 sqrt(12) rms(x)), a
 *                 few 1e-3; the blocks of x mix scales 0, 1e-3, 1 and 30, so over 40 random
 *                 shapes it has been seen from 0.3% to 1.2% depending on the draws; the
 *                 per-element bound is the strict check). The K types' weights include
 *                 super-blocks at the edges of their ranges (k_extreme).
 *   matmul BF16 of amx: from AMX_MPACK tokens its tiles take x as the sum of two bf16
 *                 (simd/amx.h), which moves each term by at most 2^-16 of itself:
 *                 2^-16 sum_j |x_j w_j| more per element, relative L2 below 5e-5.
 * The amx table (AMX tiles: Sapphire Rapids and later; its algorithm is tested on any machine
 * by tests/test-amx.c) runs every kernel here where the CPU has it and is skipped elsewhere.
 * Entries of y outside [m][n] (the ldy padding) must be left untouched.
 */
#include "config.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"
#include "tap.h"
#include "testlib.h"

#define SEED 0x9e3779b97f4a7c15ull

static uint64_t rng_state = SEED;

static uint64_t
rng_next(void)
{
    return tl_splitmix(&rng_state);
}

/* Uniform in [lo, hi]. */
static int64_t
rng_int(int64_t lo, int64_t hi)
{
    return lo + (int64_t)(rng_next() % (uint64_t)(hi - lo + 1));
}

/* Uniform in [-1, 1). */
static float
rng_float(void)
{
    return (float)(tl_unit(rng_next()) * 2.0 - 1.0);
}

/* Random x: mostly uniform, with some blocks scaled up or zeroed to exercise the scales. */
static void
fill_x(float *x, int64_t n)
{
    for (int64_t j = 0; j < n; j += 32) {
        int kind = (int)rng_int(0, 9);
        float s = kind == 0 ? 0.0f : kind == 1 ? 30.0f : kind == 2 ? 1e-3f : 1.0f;
        for (int64_t i = j; i < j + 32 && i < n; i++)
            x[i] = s * rng_float();
    }
}

/* About one K-type super-block in three made extreme: all zero; every byte 0xff (the
 * largest levels, scales and minimums; Q6_K's scales -128) under d = 0.05; or random bytes
 * under a huge (6e4) or a tiny (subnormal) d and dmin. */
static void
k_extreme(enum k_dtype dt, uint8_t *p)
{
    /* where d and dmin are (-1: none) */
    static const int dpos[5][2] = {{80, 82}, {108, -1}, {0, 2}, {0, 2}, {208, -1}};
    int bb = dtype_info(dt)->block_bytes, kind = (int)rng_int(0, 11);
    const int *dp = dpos[dt - KLI_DT_Q2_K];

    if (kind > 3)
        return;
    if (kind == 0) {
        memset(p, 0, (size_t)bb);
        return;
    }
    for (int i = 0; i < bb; i++)
        p[i] = kind == 1 ? 0xff : (uint8_t)rng_next();
    if (kind == 1 && dt == KLI_DT_Q6_K)
        memset(p + 192, 0x80, 16);
    for (int i = 0; i < 2 && dp[i] >= 0; i++) {
        float d = kind == 1 ? 0.05f : kind == 2 ? 6e4f : 1e-7f;
        uint16_t h = f32_to_f16(rng_int(0, 1) ? d : -d);
        memcpy(p + dp[i], &h, 2);
    }
}

static void
fill_w(enum k_dtype dt, uint8_t *w, int64_t nelem)
{
    int64_t nb = nelem / dtype_info(dt)->block;

    switch (dt) {
    case KLI_DT_F32:
        for (int64_t i = 0; i < nelem; i++) {
            float f = rng_float();
            memcpy(w + 4 * i, &f, 4);
        }
        break;
    case KLI_DT_F16:
    case KLI_DT_BF16:
        for (int64_t i = 0; i < nelem; i++) {
            float f = rng_float();
            uint16_t h = dt == KLI_DT_F16 ? f32_to_f16(f) : f32_to_bf16(f);
            memcpy(w + 2 * i, &h, 2);
        }
        break;
    case KLI_DT_Q8_0:
    case KLI_DT_Q4: {
        int bb = dtype_info(dt)->block_bytes;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *p = w + b * bb;
            uint16_t h = f32_to_f16(rng_float() * 0.05f);
            memcpy(p, &h, 2);
            for (int i = 2; i < bb; i++)
                p[i] = (uint8_t)rng_next();
        }
        break;
    }
    default:
        if (dtype_is_k(dt)) {
            /* The K types through their quantizer: random bytes would make random f16
             * scales, infinities among them. */
            float *f = tl_malloc((size_t)nelem * 4 + 4);
            for (int64_t i = 0; i < nelem; i++)
                f[i] = rng_float() * 0.05f;
            dtype_from_f32(dt, f, w, nelem);
            for (int64_t b = 0; b < nb; b++)
                k_extreme(dt, w + b * dtype_info(dt)->block_bytes);
            free(f);
            break;
        }
        for (int64_t i = 0; i < nelem; i++)
            w[i] = (uint8_t)rng_next();
        break;
    }
}

static int
same_float(float a, float b)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b);
    return memcmp(&a, &b, 4) == 0;
}

static const char *const dt_names[KLI_DT_COUNT] = {"F32", "F16", "BF16", "Q8_0", "Q4", "OTHER",
                                                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"};

/* ---- to_f32 ------------------------------------------------------------------------------ */

static void
test_to_f32(const struct k_kernels *kt)
{
    for (int dt = 0; dt < KLI_DT_COUNT; dt++) {
        int blk = dtype_info(dt)->block;
        int bad = 0;
        for (int trial = 0; trial < 20 && !bad; trial++) {
            int64_t n = blk * rng_int(0, 3000 / blk + 3);
            size_t nbytes = (size_t)dtype_nbytes(dt, (uint64_t)n);
            int off = (int)rng_int(0, 7);
            uint8_t *src = tl_malloc(nbytes + 8);
            float *want = tl_malloc((size_t)n * 4 + 4), *got = tl_malloc((size_t)n * 4 + 8);
            /* Raw random bits: every F16/BF16 pattern (subnormals, Inf, NaN) shows up. */
            for (size_t i = 0; i < nbytes + 8; i++)
                src[i] = (uint8_t)rng_next();
            dtype_to_f32(dt, src + off, want, n);
            float guard = 1234.5f;
            memcpy(got + n + 1, &guard, 4);
            kt->to_f32(dt, src + off, got + 1, n);
            for (int64_t i = 0; i < n && !bad; i++) {
                if (!same_float(want[i], got[1 + i])) {
                    diag("%s to_f32 %s n=%lld: [%lld] want %a got %a", kt->name, dt_names[dt],
                         (long long)n, (long long)i, want[i], got[1 + i]);
                    bad = 1;
                }
            }
            if (got[n + 1] != guard)
                bad = 1;
            free(src);
            free(want);
            free(got);
        }
        ok(!bad, "%s to_f32 %s: bit-exact vs dtype_to_f32", kt->name, dt_names[dt]);
    }
}

/* ---- dot, axpy, scale ---------------------------------------------------------------------- */

static void
test_vector(const struct k_kernels *kt)
{
    int bad_dot = 0, bad_axpy = 0, bad_scale = 0;
    double worst_dot = 0.0;

    for (int trial = 0; trial < 200; trial++) {
        int64_t n = trial < 40 ? trial : rng_int(0, 3000);
        int oa = (int)rng_int(0, 7), ob = (int)rng_int(0, 7);
        float *a = tl_malloc((size_t)(n + 16) * 4), *b = tl_malloc((size_t)(n + 16) * 4);
        float *y = tl_malloc((size_t)(n + 16) * 4), *y0 = tl_malloc((size_t)(n + 16) * 4);
        float s = rng_float() * 3.0f;

        for (int64_t i = 0; i < n + 16; i++) {
            a[i] = rng_float();
            b[i] = rng_float() * 10.0f;
            y[i] = y0[i] = rng_float();
        }

        double ref = 0.0, mag = 0.0;
        for (int64_t i = 0; i < n; i++) {
            ref += (double)a[oa + i] * b[ob + i];
            mag += fabs((double)a[oa + i] * b[ob + i]);
        }
        double got = kt->dot(a + oa, b + ob, n);
        double tol = ((double)n / 4 + 16) * ldexp(1.0, -24) * mag;
        if (fabs(got - ref) > tol) {
            if (!bad_dot)
                diag("%s dot n=%lld: got %.9g want %.9g", kt->name, (long long)n, got, ref);
            bad_dot = 1;
        }
        if (mag > 0 && fabs(got - ref) / mag > worst_dot)
            worst_dot = fabs(got - ref) / mag;

        kt->axpy(y + ob, s, a + oa, n);
        for (int64_t i = 0; i < n + 16 - ob; i++) {
            int in = i < n;
            double want = in ? (double)y0[ob + i] + (double)s * a[oa + i] : y0[ob + i];
            double t = in ? ldexp(1.0, -23) * (fabs(y0[ob + i]) + fabs(s * a[oa + i])) : 0.0;
            if (fabs(y[ob + i] - want) > t)
                bad_axpy = 1;
        }
        for (int i = 0; i < ob; i++)
            bad_axpy |= y[i] != y0[i];

        memcpy(y, y0, (size_t)(n + 16) * 4);
        kt->scale(y + oa, s, n);
        for (int64_t i = 0; i < n + 16 - oa; i++) {
            float want = i < n ? y0[oa + i] * s : y0[oa + i];
            bad_scale |= !same_float(y[oa + i], want);
        }
        for (int i = 0; i < oa; i++)
            bad_scale |= y[i] != y0[i];
        free(a);
        free(b);
        free(y);
        free(y0);
    }
    ok(!bad_dot, "%s dot: within (n/4+16) 2^-24 sum|ab| (worst %.2g of sum|ab|)", kt->name,
       worst_dot);
    ok(!bad_axpy, "%s axpy: within 2^-23 (|y|+|ax|), tail untouched", kt->name);
    ok(!bad_scale, "%s scale: bit-exact, tail untouched", kt->name);
}

/* ---- the elementwise kernels: dot_decay, mul_decay, silu ---------------------------------- */

/* What the trials of an elementwise kernel found: whether one failed (the first failure is
 * told) and the worst relative error where the value means much. */
struct verdict {
    int bad;
    double worst;
};

#define FAIL(v, ...)               \
    do {                           \
        if (!(v)->bad)             \
            diag(__VA_ARGS__);     \
        (v)->bad = 1;              \
    } while (0)

/* err / mag into v->worst where mag > 1e-30 (relative where it means much). */
static void
note_rel(struct verdict *v, double err, double mag)
{
    if (mag > 1e-30 && err / mag > v->worst)
        v->worst = err / mag;
}

/* y[n] was 12345 before the kernel ran and must still be: nothing past n is written. */
static void
check_end(struct verdict *v, const struct k_kernels *kt, const char *kernel, const float *y,
          int64_t n)
{
    if (y[n] != 12345.0f)
        FAIL(v, "%s %s n=%lld wrote past the end", kt->name, kernel, (long long)n);
}

/* The gates of one position: gb up to 20 in size, ga = gb + d with a decay d <= 0 from none
 * to far below float range, as a 64-token chunk produces (every third trial the far ones). */
static void
gate_pair(int trial, float *ga, float *gb)
{
    *gb = rng_float() * 20.0f;
    float d = trial % 3 == 0 ? -fabsf(rng_float()) * 120.0f : -fabsf(rng_float()) * 8.0f;
    *ga = *gb + d;
}

/* One trial of an elementwise kernel: length n, four arrays of n + 1 floats. */
typedef void (*ew_trial)(const struct k_kernels *kt, int trial, int64_t n, float *const *p,
                         struct verdict *v);

/* 300 trials of an elementwise kernel: every length below 40, then random ones up to 600; each
 * trial's arrays are n + 1 floats (room for the guard past the end), each its own allocation
 * so that ASan sees an overrun. `summary` follows the table's name on the ok line. */
static void
run_elementwise(const struct k_kernels *kt, ew_trial trial, const char *summary)
{
    struct verdict v = {0, 0.0};

    for (int t = 0; t < 300; t++) {
        int64_t n = t < 40 ? t : rng_int(0, 600);
        float *p[4];

        for (int i = 0; i < 4; i++)
            p[i] = tl_malloc((size_t)(n + 1) * 4);
        trial(kt, t, n, p, &v);
        for (int i = 0; i < 4; i++)
            free(p[i]);
    }
    ok(!v.bad, "%s %s (worst %.2g)", kt->name, summary, v.worst);
}

/* dot_decay: sum a b exp(ga - gb) with ga - gb <= 0. */
static void
dot_decay_trial(const struct k_kernels *kt, int trial, int64_t n, float *const *p,
                struct verdict *v)
{
    float *a = p[0], *b = p[1], *ga = p[2], *gb = p[3];
    double ref = 0.0, mag = 0.0;

    for (int64_t i = 0; i < n; i++) {
        a[i] = rng_float();
        b[i] = rng_float();
        gate_pair(trial, &ga[i], &gb[i]);
    }
    for (int64_t i = 0; i < n; i++) {
        double t = (double)a[i] * b[i] * exp((double)ga[i] - (double)gb[i]);
        ref += t;
        mag += fabs(t);
    }
    double got = kt->dot_decay(a, b, ga, gb, n);
    /* the float product, the exp (a few ulp) and the float sum */
    double tol = ((double)n / 4 + 24) * ldexp(1.0, -22) * mag + 1e-37;
    if (fabs(got - ref) > tol)
        FAIL(v, "%s dot_decay n=%lld: got %.9g want %.9g", kt->name, (long long)n, got, ref);
    note_rel(v, fabs(got - ref), mag);
}

/* mul_decay: a exp(ga - gb) with ga - gb <= 0, in place or not. */
static void
mul_decay_trial(const struct k_kernels *kt, int trial, int64_t n, float *const *p,
                struct verdict *v)
{
    float *a = p[0], *y = p[1], *ga = p[2], *gb = p[3];

    for (int64_t i = 0; i <= n; i++) {
        a[i] = rng_float();
        gate_pair(trial, &ga[i], &gb[i]);
        y[i] = 12345.0f;   /* y[n] must stay: nothing past n is written */
    }
    int inplace = trial % 2;
    if (inplace)
        memcpy(y, a, (size_t)n * 4);
    kt->mul_decay(y, inplace ? y : a, ga, gb, n);
    for (int64_t i = 0; i < n; i++) {
        double want = (double)a[i] * exp((double)ga[i] - (double)gb[i]);
        double err = fabs((double)y[i] - want);
        /* a few ulp of the exp and of the product, and the rounding of ga - gb in float
         * (half an ulp of the operands, which the exp turns into that much relative error) */
        double tol = fabs(want) * (8 * ldexp(1.0, -23) +
                                   (fabs(ga[i]) + fabs(gb[i])) * ldexp(1.0, -24)) + 1e-37;
        if (err > tol)
            FAIL(v, "%s mul_decay n=%lld i=%lld: got %.9g want %.9g", kt->name, (long long)n,
                 (long long)i, y[i], want);
        note_rel(v, err, fabs(want));
    }
    check_end(v, kt, "mul_decay", y, n);
}

/* silu: x / (1 + e^-x), times mul or not, in place or not. */
static void
silu_trial(const struct k_kernels *kt, int trial, int64_t n, float *const *p,
           struct verdict *v)
{
    float *x = p[0], *m = p[1], *y = p[2];
    /* from tiny to past exp's range both ways */
    float scale = trial % 4 == 0 ? 200.0f : trial % 4 == 1 ? 1e-3f : 8.0f;

    for (int64_t i = 0; i <= n; i++) {
        x[i] = rng_float() * scale;
        m[i] = rng_float();
        y[i] = 12345.0f;
    }
    int withmul = trial % 2, inplace = trial % 3 == 0;
    if (inplace)
        memcpy(y, x, (size_t)n * 4);
    kt->silu(y, inplace ? y : x, withmul ? m : NULL, n);
    for (int64_t i = 0; i < n; i++) {
        double xv = x[i], want = xv / (1.0 + exp(-xv)) * (withmul ? m[i] : 1.0);
        double err = fabs(y[i] - want);
        /* below x = -80 (|silu| < 1e-33) a kernel may return zero */
        if (err > 8 * ldexp(1.0, -23) * fabs(want) + (xv < -80.0 ? fabs(want) : 0.0) + 1e-38)
            FAIL(v, "%s silu x=%.9g: got %.9g want %.9g", kt->name, x[i], y[i], want);
        note_rel(v, err, fabs(want));
    }
    check_end(v, kt, "silu", y, n);
}

/* ---- gemm_nn: small row-major products, odd shapes, strides, alpha, accumulate --------------- */

static void
test_gemm_nn(const struct k_kernels *kt)
{
    int bad = 0;
    double worst = 0.0;

    for (int trial = 0; trial < 200; trial++) {
        int64_t m = rng_int(1, 70), n = rng_int(1, 150), k = rng_int(0, 140);
        int64_t ldx = k + rng_int(0, 5), ldb = n + rng_int(0, 5), ldy = n + rng_int(0, 5);
        float alpha = trial % 3 == 0 ? -1.0f : rng_float() * 2.0f;
        int acc = trial % 2;
        float *x = tl_malloc((size_t)(m * ldx + 1) * 4), *B = tl_malloc((size_t)(k * ldb + 1) * 4);
        float *y = tl_malloc((size_t)(m * ldy + 1) * 4), *y0 = tl_malloc((size_t)(m * ldy + 1) * 4);

        for (int64_t i = 0; i < m * ldx; i++)
            x[i] = rng_float();
        for (int64_t i = 0; i < k * ldb; i++)
            B[i] = rng_float();
        for (int64_t i = 0; i <= m * ldy; i++)
            y[i] = y0[i] = rng_float();
        kt->gemm_nn(y, ldy, x, ldx, B, ldb, m, n, k, alpha, acc);
        for (int64_t i = 0; i < m; i++) {
            for (int64_t j = 0; j < ldy; j++) {
                int64_t at = i * ldy + j;
                if (j >= n) {
                    /* the padding between rows is never written */
                    if (y[at] != y0[at] && !bad) {
                        diag("%s gemm_nn wrote y[%lld][%lld] past n=%lld", kt->name, (long long)i,
                             (long long)j, (long long)n);
                        bad = 1;
                    }
                    continue;
                }
                double s = 0.0, mag = 0.0;
                for (int64_t l = 0; l < k; l++) {
                    s += (double)x[i * ldx + l] * B[l * ldb + j];
                    mag += fabs((double)x[i * ldx + l] * B[l * ldb + j]);
                }
                double want = (acc ? y0[at] : 0.0) + alpha * s;
                double tol = ((double)k / 8 + 4) * ldexp(1.0, -22) *
                             (fabs(alpha) * mag + (acc ? fabs(y0[at]) : 0.0)) + 1e-30;
                double err = fabs(y[at] - want);
                if (err > tol && !bad) {
                    diag("%s gemm_nn m=%lld n=%lld k=%lld: y[%lld][%lld] = %.9g, want %.9g",
                         kt->name, (long long)m, (long long)n, (long long)k, (long long)i,
                         (long long)j, y[at], want);
                    bad = 1;
                }
                if (mag > 0 && err / (fabs(alpha) * mag + 1e-30) > worst)
                    worst = err / (fabs(alpha) * mag + 1e-30);
            }
        }
        if (y[m * ldy] != y0[m * ldy] && !bad) {
            diag("%s gemm_nn wrote past the last row", kt->name);
            bad = 1;
        }
        free(x);
        free(B);
        free(y);
        free(y0);
    }
    ok(!bad, "%s gemm_nn: 200 shapes up to 70x150x140 with strides, alpha, accumulate: within "
       "(k/8+4) 2^-22 sum|xB| (worst %.2g)", kt->name, worst);
}

/* ---- matmul --------------------------------------------------------------------------------- */

struct mm_case {
    int64_t n, k, m, ldx, ldy;
};

/* Error of y against ref: per-element bound check and relative L2. */
struct mm_err {
    double l2_num, l2_den, worst;   /* worst = max |err| / bound */
};

static void
mm_check(struct mm_err *e, const float *y, const double *ref, const double *bound,
         int64_t n, int64_t m, int64_t ldy)
{
    for (int64_t t = 0; t < m; t++) {
        for (int64_t r = 0; r < n; r++) {
            double d = (double)y[t * ldy + r] - ref[t * n + r];
            e->l2_num += d * d;
            e->l2_den += ref[t * n + r] * ref[t * n + r];
            double q = isnan(d) ? INFINITY : fabs(d) / bound[t * n + r];
            if (q > e->worst)
                e->worst = q;
        }
    }
}

static double
mm_rel(const struct mm_err *e)
{
    return e->l2_den > 0 ? sqrt(e->l2_num / e->l2_den) : sqrt(e->l2_num);
}

/* Whether kt takes x as two bf16 in products with weights of type dt: amx's bf16 tiles. */
static int
amx_bf16(const struct k_kernels *kt, enum k_dtype dt)
{
    return strcmp(kt->name, "amx") == 0 && dt == KLI_DT_BF16;
}

/* Runs one shape on kt and generic; accumulates both errors. @return 0 if y's padding changed */
static int
mm_run(const struct k_kernels *kt, const struct k_kernels *gen, enum k_dtype dt,
       const struct mm_case *c, struct mm_err *e, struct mm_err *eg)
{
    int64_t n = c->n, k = c->k, m = c->m;
    size_t rb = (size_t)dtype_nbytes(dt, (uint64_t)k);
    int woff = (int)rng_int(0, 3) * (dt == KLI_DT_F32 ? 4 : dt <= KLI_DT_BF16 ? 2 : 1);
    /* exact sizes, so that a memory checker sees any read past the end */
    uint8_t *wbuf = tl_malloc(rb * (size_t)n + (size_t)woff);
    uint8_t *w = wbuf + woff;
    float *wf = tl_malloc((size_t)(n * k) * 4 + 4);
    int xoff = (int)rng_int(0, 7);
    float *xbuf = tl_malloc((size_t)(m * c->ldx + xoff) * 4), *x = xbuf + xoff;
    size_t ysz = (size_t)(m * c->ldy + 8);
    float *y = tl_malloc(ysz * 4), *yg = tl_malloc(ysz * 4);
    double *ref = tl_malloc((size_t)(m * n) * 8 + 8), *bound = tl_malloc((size_t)(m * n) * 8 + 8);
    int yoff = (int)rng_int(0, 7);
    int quant = dt == KLI_DT_Q8_0 || dt == KLI_DT_Q4 || dtype_is_k(dt);
    int xbf16 = amx_bf16(kt, dt);
    int intact = 1;

    fill_w(dt, w, n * k);
    for (int64_t t = 0; t < m; t++) {
        fill_x(x + t * c->ldx, k);
        for (int64_t j = k; j < c->ldx; j++)
            x[t * c->ldx + j] = NAN;   /* padding must never be read */
    }
    for (int64_t r = 0; r < n; r++)
        dtype_to_f32(dt, w + (size_t)r * rb, wf + r * k, k);
    for (int64_t t = 0; t < m; t++) {
        const float *xt = x + t * c->ldx;
        for (int64_t r = 0; r < n; r++) {
            const float *wr = wf + r * k;
            double s = 0.0, mag = 0.0, qerr = 0.0;
            for (int64_t j = 0; j < k; j++) {
                s += (double)xt[j] * wr[j];
                mag += fabs((double)xt[j] * wr[j]);
            }
            if (quant) {
                int64_t qb = dtype_is_k(dt) ? KLI_QK_K : 32;
                for (int64_t b = 0; b < k; b += qb) {
                    double amax = 0.0, wsum = 0.0;
                    for (int64_t j = b; j < b + qb; j++) {
                        amax = fmax(amax, fabs(xt[j]));
                        wsum += fabs(wr[j]);
                    }
                    qerr += amax / 254.0 * wsum;
                }
            }
            ref[t * n + r] = s;
            bound[t * n + r] = 1.01 * qerr + ((double)k / 4 + 64) * ldexp(1.0, -24) * mag
                               + (xbf16 ? ldexp(mag, -16) : 0.0) + 1e-30;
        }
    }

    for (size_t i = 0; i < ysz; i++)
        y[i] = yg[i] = -777.0f;
    kt->matmul[dt](y + yoff, c->ldy, x, c->ldx, w, n, k, m);
    gen->matmul[dt](yg + yoff, c->ldy, x, c->ldx, w, n, k, m);
    mm_check(e, y + yoff, ref, bound, n, m, c->ldy);
    mm_check(eg, yg + yoff, ref, bound, n, m, c->ldy);
    for (size_t i = 0; i < ysz; i++) {
        int64_t p = (int64_t)i - yoff;
        int inside = p >= 0 && p / c->ldy < m && p % c->ldy < n;
        if (!inside && y[i] != -777.0f)
            intact = 0;
    }
    free(wbuf);
    free(wf);
    free(xbuf);
    free(y);
    free(yg);
    free(ref);
    free(bound);
    return intact;
}

static void
test_matmul(const struct k_kernels *kt, const struct k_kernels *gen)
{
    for (int dt = 0; dt < KLI_DT_COUNT; dt++) {
        if (dt == KLI_DT_OTHER)
            continue;
        int blk = dtype_info(dt)->block;
        int quant = dt == KLI_DT_Q8_0 || dt == KLI_DT_Q4 || dtype_is_k(dt);
        double l2tol = quant ? 2e-2 : amx_bf16(kt, dt) ? 5e-5 : 1e-5;
        struct mm_err e = {0, 0, 0}, eg = {0, 0, 0};
        int intact = 1, ncases = 0;

        if (kt->matmul[dt] == NULL) {
            ok(0, "%s matmul %s: entry is NULL", kt->name, dt_names[dt]);
            continue;
        }
        for (int trial = 0; trial < 40; trial++) {
            struct mm_case c;
            if (trial < 4) {
                /* Edge shapes first: one block, one row, one token. */
                c.k = blk * (trial + 1) + (blk == 1 ? trial : 0);
                c.n = trial + 1;
                c.m = 1 + trial * 2;
            } else if (trial < 32) {
                c.k = blk == 1 ? rng_int(1, 3000) : blk * rng_int(1, 3000 / blk);
                c.n = rng_int(1, 70);
                c.m = rng_int(1, 9);
            } else if (trial < 36) {
                /* More tokens: the kernels switch to their prefill paths somewhere here. */
                c.k = blk == 1 ? rng_int(1, 1000) : blk * rng_int(1, 1000 / blk);
                c.n = rng_int(1, 70);
                c.m = trial < 34 ? rng_int(10, 40) : trial == 34 ? rng_int(41, 95)
                                                                  : rng_int(96, 130);
            } else {
                /* Past the kernels' per-slice limits (activation buffers, k blocking). */
                c.k = blk == 1 ? rng_int(16385, 17000) : blk * rng_int(16385 / blk, 17000 / blk);
                c.n = rng_int(1, 6);
                c.m = trial == 36 ? 1 : trial == 37 ? 15 : rng_int(1, 6);
            }
            c.ldx = c.k + (rng_int(0, 1) ? rng_int(1, 9) : 0);
            c.ldy = c.n + (rng_int(0, 1) ? rng_int(1, 9) : 0);
            intact &= mm_run(kt, gen, dt, &c, &e, &eg);
            ncases++;
        }
        /* Degenerate sizes must not write anything. */
        {
            float y[4] = {5, 5, 5, 5}, x[3 * 256] = {0};
            uint8_t w[4 * 256] = {0};
            int64_t kk = blk > 32 ? blk : 32;
            kt->matmul[dt](y, 1, x, kk, w, 0, kk, 3);
            kt->matmul[dt](y, 4, x, kk, w, 4, kk, 0);
            intact &= y[0] == 5 && y[1] == 5 && y[2] == 5 && y[3] == 5;
        }
        double rel = mm_rel(&e), relg = mm_rel(&eg);
        diag("%s matmul %s: %d shapes, rel L2 %.3g (generic %.3g), worst err/bound %.3g "
             "(generic %.3g)", kt->name, dt_names[dt], ncases, rel, relg, e.worst, eg.worst);
        ok(e.worst <= 1.0 && rel < l2tol && intact,
           "%s matmul %s: per-element bound, rel L2 %.2g < %g, padding untouched", kt->name,
           dt_names[dt], rel, l2tol);
    }
}

/* Whether kt's and base's matmul of one random m x k by n x k shape differ in any bit. */
static int
twin_differ(const struct k_kernels *kt, const struct k_kernels *base, int dt, int64_t k,
            int64_t n, int64_t m)
{
    size_t rb = (size_t)dtype_nbytes(dt, (uint64_t)k);
    uint8_t *w = tl_malloc(rb * (size_t)n);
    float *x = tl_malloc((size_t)(m * k) * 4), *y = tl_malloc((size_t)(m * n) * 4);
    float *yb = tl_malloc((size_t)(m * n) * 4);

    fill_w(dt, w, n * k);
    for (int64_t t = 0; t < m; t++)
        fill_x(x + t * k, k);
    kt->matmul[dt](y, n, x, k, w, n, k, m);
    base->matmul[dt](yb, n, x, k, w, n, k, m);
    int differ = memcmp(y, yb, (size_t)(m * n) * 4) != 0;
    free(w);
    free(x);
    free(y);
    free(yb);
    return differ;
}

/* avx512's K-type rows and tiles work on chunk pairs in 512-bit registers where avx2's take
 * one chunk at a time, but sum the same integers and finish with the same 256-bit float
 * steps: below both tables' GEMM thresholds (m < 48) the products are avx2's, bit for bit. */
static void
test_twin_k(const struct k_kernels *kt, const struct k_kernels *base)
{
    int bad = 0, cases = 0;

    for (int dt = KLI_DT_Q2_K; dt <= KLI_DT_Q6_K; dt++) {
        for (int trial = 0; trial < 16; trial++) {
            int64_t k = KLI_QK_K * rng_int(1, 9), n = rng_int(1, 24), m = rng_int(1, 47);
            bad += twin_differ(kt, base, dt, k, n, m);
            cases++;
        }
    }
    ok(!bad, "%s K-type products: bit-identical to %s's (%d shapes, m 1..47, %d differ)",
       kt->name, base->name, cases, bad);
}

/* A twin built from the same source with other instructions (avx512vnni from avx512.c, neondot from neon.c) must
 * give bit-identical products: the integer dot products are the same integers. */
static void
test_twin(const struct k_kernels *kt, const struct k_kernels *base)
{
    int bad = 0, cases = 0;

    for (int dt = 0; dt < KLI_DT_COUNT; dt++) {
        if (dt == KLI_DT_OTHER)
            continue;
        int blk = dtype_info(dt)->block;
        for (int trial = 0; trial < 30; trial++) {
            int64_t k = blk * (trial < 3 ? trial + 1 : rng_int(1, 3000 / blk));
            int64_t n = rng_int(1, 40), m = trial < 20 ? rng_int(1, 9) : rng_int(10, 40);
            bad += twin_differ(kt, base, dt, k, n, m);
            cases++;
        }
    }
    ok(!bad, "%s matmul: bit-identical to %s in every dtype (%d shapes, %d differ)", kt->name,
       base->name, cases, bad);
}

/* The kernels of a table, each a case "<table>/<kernel>" (e.g. avx2/matmul). */
static const char *const kernel_names[] = {"to_f32", "vector", "dot_decay", "mul_decay",
                                           "gemm_nn", "silu", "matmul"};

static void
run_kernel(size_t k, const struct k_kernels *kt)
{
    switch (k) {
    case 0: test_to_f32(kt); break;
    case 1: test_vector(kt); break;
    case 2:
        run_elementwise(kt, dot_decay_trial, "dot_decay: within (n/4+24) 2^-22 sum|ab e^g|");
        break;
    case 3:
        run_elementwise(kt, mul_decay_trial, "mul_decay: within 8 ulp of a e^g (+ the rounding "
                        "of g), in place and not, odd tails");
        break;
    case 4: test_gemm_nn(kt); break;
    case 5:
        run_elementwise(kt, silu_trial, "silu: within 8 ulp for |x| up to 200, with and without "
                        "mul, in place");
        break;
    default: test_matmul(kt, kernels_generic()); break;
    }
}

/* Whether the case "<table>/<what>" runs (from the seed afresh: tap_case_seeded). */
static int
simd_case(const char *table, const char *what)
{
    char name[64];

    snprintf(name, sizeof(name), "%s/%s", table, what);
    return tap_case_seeded(name, &rng_state, SEED);
}

int
main(int argc, char **argv)
{
    enum { NV = 6 };
    const struct k_kernels *all[8], *use[NV];
    int n = kernels_all(all, 8), count = 0;
    const char *variants[NV] = {"avx2", "avx512", "avx512vnni", "neon", "neondot", "amx"};

    (void)skip_all;   /* each variant is skipped on its own line instead */
    tap_init(argc, argv);
    for (int v = 0; v < NV; v++) {
        use[v] = NULL;
        for (int i = 0; i < n; i++) {
            if (strcmp(all[i]->name, variants[v]) == 0)
                use[v] = all[i];
        }
        /* to_f32 per dtype, dot/axpy/scale, dot_decay, mul_decay, gemm_nn, silu, matmul per
         * computable dtype */
        count += use[v] ? KLI_DT_COUNT + 7 + KLI_DT_COUNT - 1 : 1;
    }
    count += use[1] != NULL && use[2] != NULL;
    count += use[0] != NULL && use[1] != NULL;
    count += use[3] != NULL && use[4] != NULL;
    plan(count);   /* (a selection of cases prints its plan at the end instead) */
    for (int v = 0; v < NV; v++) {
        int skipped = 0;

        for (size_t k = 0; k < sizeof(kernel_names) / sizeof(kernel_names[0]); k++) {
            if (!simd_case(variants[v], kernel_names[k]))
                continue;
            if (use[v] != NULL)
                run_kernel(k, use[v]);
            else if (!skipped++)
                ok(1, "%s # SKIP not compiled in or not usable on this CPU", variants[v]);
        }
    }
    /* avx512vnni against avx512, neondot against neon: bit for bit */
    if (simd_case("avx512vnni", "twin") && use[1] != NULL && use[2] != NULL)
        test_twin(use[2], use[1]);
    if (simd_case("avx512", "twin_k") && use[0] != NULL && use[1] != NULL)
        test_twin_k(use[1], use[0]);
    if (simd_case("neondot", "twin") && use[3] != NULL && use[4] != NULL)
        test_twin(use[4], use[3]);
    if (tap_listing || tap_n_names > 0)
        plan_done();
    return tap_exit();
}
