/*
 * test-amx.c - the amx table's prefill GEMM (simd/amx.h): its algorithm on an emulation of
 * the tiles, on any machine, and the AMX build itself where the CPU has it.
 *
 * The emulation defines amx.h's seven tile operations in plain C after the Intel SDM
 * (tileloadd, tdpbf16ps, tdpbssd, ...) and counts what the hardware would fault on or
 * compute differently: an operation before the configuration is loaded or after it is
 * released, a tile used past its configured rows or bytes, operand shapes that do not agree
 * (rows of A and C, K of A and rows of B, bytes of B and C). So the tile configuration, the
 * packing, the loads' addresses and strides and the order of the tile operations are checked
 * here; simd/amx.c is their transcription into intrinsics.
 *
 * Tolerances (sum|xw| = sum_j |x_j w_j|, per output element):
 *   bf16 vs a float64 reference on x split as the kernel splits it (hi = bf16(x), lo =
 *                bf16(x - hi)): the products are then the same, summation only (twice the
 *                terms): |y - ref| <= (k/2 + 64) 2^-24 sum|xw|, rel L2 < 1e-5.
 *   bf16 vs float64 on x itself: hi + lo is within 2^-16 |x| of x, so |y - ref| <=
 *                2^-16 sum|xw| + the summation bound, and the relative L2 error < 5e-5.
 *   Q8_0 and Q4 vs an independent reference of the avx512vnni arithmetic (x quantized per block
 *                with scale amax/127, integer block sums, scaled by d_w d_x, in double):
 *                |y - ref| <= (k/32 + 16) 2^-23 sum_b |isum_b d_w d_x| (float summation of
 *                the block terms in another order), rel L2 < 1e-6.
 *   AMX hardware: bf16 against the emulation within the summation bound (the products are
 *                exact either way; the order of tdpbf16ps's float adds is the hardware's), Q8_0
 *                against the reference as above and against avx512vnni's decode kernels
 *                (the same integer sums) within the same bound.
 */
#include "config.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"
#include "tap.h"
#include "testlib.h"

/* ---- the emulated tiles ------------------------------------------------------------------ */

static struct {
    int on;                       /* a configuration is loaded */
    uint8_t rows[8];
    uint16_t colsb[8];
    uint8_t t[8][1024];
    long bad;                     /* operations the hardware would fault on */
    long ops;
} emu;

static int
emu_ok(int t)
{
    return emu.on && t >= 0 && t < 8 && emu.rows[t] >= 1 && emu.rows[t] <= 16 &&
           emu.colsb[t] >= 4 && emu.colsb[t] <= 64;
}

static void
emu_config(const void *p)
{
    uint8_t c[64];

    memcpy(c, p, 64);
    emu.on = c[0] == 1;
    emu.bad += c[0] != 1 || c[1] != 0;
    for (int i = 0; i < 8; i++) {
        emu.rows[i] = c[48 + i];
        emu.colsb[i] = (uint16_t)(c[16 + 2 * i] | c[17 + 2 * i] << 8);
    }
    memset(emu.t, 0xa5, sizeof(emu.t));   /* tiles hold garbage until zeroed or loaded */
}

static void
emu_zero(int t)
{
    emu.ops++;
    if (!emu_ok(t)) {
        emu.bad++;
        return;
    }
    memset(emu.t[t], 0, sizeof(emu.t[t]));
}

static void
emu_load(int t, const void *p, long stride)
{
    emu.ops++;
    if (!emu_ok(t)) {
        emu.bad++;
        return;
    }
    for (int r = 0; r < emu.rows[t]; r++)
        memcpy(emu.t[t] + 64 * r, (const uint8_t *)p + r * stride, emu.colsb[t]);
}

static void
emu_store(int t, void *p, long stride)
{
    emu.ops++;
    if (!emu_ok(t)) {
        emu.bad++;
        return;
    }
    for (int r = 0; r < emu.rows[t]; r++)
        memcpy((uint8_t *)p + r * stride, emu.t[t] + 64 * r, emu.colsb[t]);
}

/* The shape rules of tdpbf16ps and tdpbssd: C is M x N dwords, A M x K dwords, B K x N. */
static int
emu_shapes(int c, int a, int b)
{
    return emu_ok(c) && emu_ok(a) && emu_ok(b) && c != a && c != b && a != b &&
           emu.rows[a] == emu.rows[c] && emu.colsb[a] / 4 == emu.rows[b] &&
           emu.colsb[b] == emu.colsb[c] && emu.colsb[a] % 4 == 0;
}

/* The dword (i, j) of tile a . tile b: bf16 pairs with float32 sums, or int8 quads with
 * int32 sums (each as the SDM's pseudo-code). */
static float
emu_dot_bf16(int a, int b, int i, int j)
{
    float s = 0.0f;

    for (int l = 0; l < emu.colsb[a] / 4; l++) {
        for (int e = 0; e < 2; e++) {
            uint16_t x, y;
            memcpy(&x, emu.t[a] + 64 * i + 4 * l + 2 * e, 2);
            memcpy(&y, emu.t[b] + 64 * l + 4 * j + 2 * e, 2);
            s += bf16_to_f32(x) * bf16_to_f32(y);
        }
    }
    return s;
}

static int32_t
emu_dot_s8(int a, int b, int i, int j)
{
    int32_t s = 0;

    for (int l = 0; l < emu.colsb[a] / 4; l++) {
        for (int e = 0; e < 4; e++)
            s += (int8_t)emu.t[a][64 * i + 4 * l + e] * (int8_t)emu.t[b][64 * l + 4 * j + e];
    }
    return s;
}

/* tdpbf16ps (bf16 set) or tdpbssd: c += a . b. */
static void
emu_dp(int c, int a, int b, int bf16)
{
    emu.ops++;
    if (!emu_shapes(c, a, b)) {
        emu.bad++;
        return;
    }
    for (int i = 0; i < emu.rows[c]; i++) {
        for (int j = 0; j < emu.colsb[c] / 4; j++) {
            uint8_t *d = emu.t[c] + 64 * i + 4 * j;
            if (bf16) {
                float s;
                memcpy(&s, d, 4);
                s += emu_dot_bf16(a, b, i, j);
                memcpy(d, &s, 4);
            } else {
                int32_t s;
                memcpy(&s, d, 4);
                s += emu_dot_s8(a, b, i, j);
                memcpy(d, &s, 4);
            }
        }
    }
}

static void
emu_release(void)
{
    emu.bad += !emu.on;
    emu.on = 0;
}

static float
emu_f16(const uint8_t *p)
{
    return f16_to_f32((uint16_t)(p[0] | p[1] << 8));
}

#define AMX_CONFIG(cfg) emu_config(cfg)
#define AMX_ZERO(t) emu_zero(t)
#define AMX_LOAD(t, p, stride) emu_load(t, p, (long)(stride))
#define AMX_STORE(t, p, stride) emu_store(t, p, (long)(stride))
#define AMX_DP_BF16(c, a, b) emu_dp(c, a, b, 1)
#define AMX_DP_S8(c, a, b) emu_dp(c, a, b, 0)
#define AMX_RELEASE() emu_release()
#define AMX_F16(p) emu_f16(p)

#include "amx.h"

/* ---- data and references ----------------------------------------------------------------- */

#define SEED 0x243f6a8885a308d3ull

static uint64_t rng;

static int64_t
rnd(int64_t lo, int64_t hi)
{
    return lo + (int64_t)(tl_splitmix(&rng) % (uint64_t)(hi - lo + 1));
}

static float
rndf(void)
{
    return (float)(tl_unit(tl_splitmix(&rng)) * 2.0 - 1.0);
}

/* One product's data: W (n x k in dt), x (m x ldx, NaN past k), y (m x ldy, a sentinel past
 * n and around it), and per element the reference and its bound. */
struct prob {
    enum k_dtype dt;
    int64_t n, k, m, ldx, ldy;
    uint8_t *w;
    float *x, *ybuf, *y;
    double *ref, *bound;
};

#define SENTINEL -777.0f

static void
prob_new(struct prob *p, enum k_dtype dt, int64_t n, int64_t k, int64_t m)
{
    size_t rb = (size_t)dtype_nbytes(dt, (uint64_t)k);

    p->dt = dt;
    p->n = n;
    p->k = k;
    p->m = m;
    p->ldx = k + rnd(0, 1) * rnd(1, 9);
    p->ldy = n + rnd(0, 1) * rnd(1, 9);
    p->w = tl_malloc(rb * (size_t)n);
    p->x = tl_malloc((size_t)(m * p->ldx) * 4);
    p->ybuf = tl_malloc((size_t)(m * p->ldy + 16) * 4);
    p->y = p->ybuf + 8;
    p->ref = tl_calloc((size_t)(m * n), 8);
    p->bound = tl_calloc((size_t)(m * n), 8);
    for (int64_t r = 0; r < n; r++) {
        uint8_t *row = p->w + r * rb;
        for (int64_t j = 0; j < k; j += dt == KLI_DT_BF16 ? 1 : 32) {
            if (dt != KLI_DT_BF16) {
                int bb = dt == KLI_DT_Q8_0 ? 34 : 18;
                uint8_t *blk = row + j / 32 * bb;
                uint16_t h = f32_to_f16(rndf() * 0.05f);
                memcpy(blk, &h, 2);
                for (int i = 2; i < bb; i++)
                    blk[i] = (uint8_t)rnd(0, 255);
            } else {
                uint16_t h = f32_to_bf16(rndf());
                memcpy(row + 2 * j, &h, 2);
            }
        }
    }
    for (int64_t t = 0; t < m; t++) {
        for (int64_t j = 0; j < p->ldx; j++) {
            /* blocks of mixed scales, zero blocks among them; NaN past k is never read */
            float s = (j / 32) % 5 == 3 ? 0.0f : (j / 32) % 5 == 1 ? 30.0f : 1.0f;
            p->x[t * p->ldx + j] = j < k ? s * rndf() : NAN;
        }
    }
    for (int64_t i = 0; i < m * p->ldy + 16; i++)
        p->ybuf[i] = SENTINEL;
}

static void
prob_free(struct prob *p)
{
    free(p->w);
    free(p->x);
    free(p->ybuf);
    free(p->ref);
    free(p->bound);
}

/* Whether y outside [m][n] still holds the sentinel. */
static int
prob_intact(const struct prob *p)
{
    for (int64_t i = 0; i < p->m * p->ldy + 16; i++) {
        int64_t q = i - 8;
        int inside = q >= 0 && q / p->ldy < p->m && q % p->ldy < p->n;
        if (!inside && p->ybuf[i] != SENTINEL)
            return 0;
    }
    return 1;
}

/* BF16 reference in double: x as it is, or split into hi + lo bf16 (rnd_x). The bound:
 * summation, plus 2^-16 sum|xw| when x was not split. */
static void
ref_bf16(struct prob *p, int rnd_x)
{
    size_t rb = (size_t)p->k * 2;

    for (int64_t t = 0; t < p->m; t++) {
        for (int64_t r = 0; r < p->n; r++) {
            double s = 0.0, mag = 0.0;
            for (int64_t j = 0; j < p->k; j++) {
                uint16_t h;
                float xv = p->x[t * p->ldx + j];
                memcpy(&h, p->w + r * rb + 2 * j, 2);
                double xd = xv;
                if (rnd_x) {
                    float hi = bf16_to_f32(f32_to_bf16(xv));
                    xd = (double)hi + bf16_to_f32(f32_to_bf16(xv - hi));
                }
                s += xd * bf16_to_f32(h);
                mag += fabs(xd * bf16_to_f32(h));
            }
            p->ref[t * p->n + r] = s;
            p->bound[t * p->n + r] = ((double)p->k / 2 + 64) * ldexp(1.0, -24) * mag +
                                     (rnd_x ? 0.0 : ldexp(mag, -16)) + 1e-30;
        }
    }
}

/* Weight j of a Q8_0 or Q4 block as an integer (Q4: nibble - 8, elements 16.. in the high
 * nibbles). */
static int
q_weight(enum k_dtype dt, const uint8_t *blk, int j)
{
    if (dt == KLI_DT_Q8_0)
        return (int8_t)blk[2 + j];
    return (j < 16 ? blk[2 + j] & 15 : blk[2 + j - 16] >> 4) - 8;
}

/* The avx512vnni arithmetic of Q8_0 and Q4 written out (exact): per block, x to int8 with
 * scale amax/127 (round half to even, as vcvtps2dq), the integer sum with the weights' int8, times
 * d_w d_x. Else the product with x itself, for a kernel that may or may not quantize x: the
 * bound adds the quantization's 1.01 sum_b (amax_b / 254) sum_{j in b} |w_j| (as in
 * tests/test-simd.c). */
static void
ref_q8(struct prob *p, int exact)
{
    int bb = p->dt == KLI_DT_Q8_0 ? 34 : 18;
    size_t rb = (size_t)p->k / 32 * (size_t)bb;

    for (int64_t t = 0; t < p->m; t++) {
        for (int64_t r = 0; r < p->n; r++) {
            double s = 0.0, mag = 0.0, qerr = 0.0;
            for (int64_t b = 0; b < p->k / 32; b++) {
                const float *xb = p->x + t * p->ldx + 32 * b;
                const uint8_t *wb = p->w + r * rb + bb * b;
                float amax = 0.0f;
                for (int j = 0; j < 32; j++)
                    amax = fabsf(xb[j]) > amax ? fabsf(xb[j]) : amax;
                float inv = amax >= 1e-30f ? 127.0f / amax : 0.0f, dx = amax / 127.0f;
                float dw = f16_to_f32((uint16_t)(wb[0] | wb[1] << 8));
                double isum = 0.0, fsum = 0.0, wsum = 0.0;
                for (int j = 0; j < 32; j++) {
                    int q = q_weight(p->dt, wb, j);
                    isum += nearbyint((double)(xb[j] * inv)) * q;
                    fsum += (double)xb[j] * q;
                    wsum += fabs((double)q * dw);
                }
                double term = exact ? isum * (double)(dw * dx) : fsum * dw;
                s += term;
                mag += fabs(term);
                qerr += exact ? 0.0 : 1.01 * amax / 254 * wsum;
            }
            p->ref[t * p->n + r] = s;
            p->bound[t * p->n + r] = ((double)p->k / 32 + 16) * ldexp(1.0, -23) * mag + qerr +
                                     1e-30;
        }
    }
}

/* Accumulates y's errors against the reference: the worst |err| / bound and the L2 sums. */
struct err {
    double worst, num, den;
};

static void
err_add(struct err *e, const struct prob *p)
{
    for (int64_t t = 0; t < p->m; t++) {
        for (int64_t r = 0; r < p->n; r++) {
            double ref = p->ref[t * p->n + r], d = p->y[t * p->ldy + r] - ref;
            double q = isnan(d) ? INFINITY : fabs(d) / p->bound[t * p->n + r];
            e->worst = q > e->worst ? q : e->worst;
            e->num += d * d;
            e->den += ref * ref;
        }
    }
}

static double
err_rel(const struct err *e)
{
    return e->den > 0 ? sqrt(e->num / e->den) : sqrt(e->num);
}

/* The shapes: tails of rows and tokens, k over several slices, the boundaries of the tile
 * path (m = AMX_MPACK - 1 and AMX_MPACK, k not a multiple of 32 for bf16). */
static void
shape(int trial, enum k_dtype dt, int64_t *n, int64_t *k, int64_t *m)
{
    static const int64_t fixed[][3] = {
        {32, 32, 32}, {1, 32, 16}, {33, 64, 17}, {64, 1056, 40}, {31, 2080, 15}, {70, 96, 95},
    };

    if (trial < 6) {
        *n = fixed[trial][0];
        *k = fixed[trial][1];
        *m = fixed[trial][2];
    } else {
        *n = rnd(1, 70);
        *k = 32 * rnd(1, 24);
        *m = rnd(10, 50);
    }
    if (dt == KLI_DT_BF16 && trial == 7)
        *k = 32 * rnd(1, 20) + rnd(1, 31);   /* the base table's product */
}

/* ---- the cases ----------------------------------------------------------------------------- */

typedef void (*mm_fn)(enum k_dtype dt, float *y, int64_t ldy, const float *x, int64_t ldx,
                      const void *w, int64_t n, int64_t k, int64_t m);

static void
mm_emu(enum k_dtype dt, float *y, int64_t ldy, const float *x, int64_t ldx, const void *w,
       int64_t n, int64_t k, int64_t m)
{
    amx_matmul(kernels_generic(), dt, y, ldy, x, ldx, w, n, k, m);
}

/* Runs 30 shapes of dt through mm against the reference: bf16 with x split where the tiles
 * take the shape and `split` is set; Q8_0 exact where the tiles take it or `split` is set
 * (the kernels quantize x everywhere), else with x itself (then outside the L2 sum). */
static void
run_shapes(const char *what, mm_fn mm, enum k_dtype dt, int split, double l2tol)
{
    struct err e = {0, 0, 0}, eq = {0, 0, 0};
    int intact = 1, tiled = 0;
    long bad0 = emu.bad;

    for (int trial = 0; trial < 30; trial++) {
        struct prob p;
        int64_t n, k, m;
        shape(trial, dt, &n, &k, &m);
        prob_new(&p, dt, n, k, m);
        int takes = amx_takes(dt, k, m), exact = split || takes;
        if (dt != KLI_DT_BF16)
            ref_q8(&p, exact);
        else
            ref_bf16(&p, split && takes);
        tiled += takes;
        mm(dt, p.y, p.ldy, p.x, p.ldx, p.w, n, k, m);
        err_add(dt != KLI_DT_BF16 && !exact ? &eq : &e, &p);
        intact &= prob_intact(&p);
        prob_free(&p);
    }
    diag("%s: %d of 30 shapes on tiles, worst err/bound %.3g, rel L2 %.3g", what, tiled,
         e.worst > eq.worst ? e.worst : eq.worst, err_rel(&e));
    ok(e.worst <= 1.0 && eq.worst <= 1.0 && err_rel(&e) < l2tol && intact && emu.bad == bad0 &&
       !emu.on,
       "%s: within the bound, rel L2 %.2g < %g, y's padding untouched, tiles used as "
       "configured and released", what, err_rel(&e), l2tol);
}

static void
case_emu_bf16(void)
{
    rng = SEED;
    run_shapes("emulated bf16 vs x split into two bf16", mm_emu, KLI_DT_BF16, 1, 1e-5);
    rng = SEED;
    run_shapes("emulated bf16 vs float x", mm_emu, KLI_DT_BF16, 0, 5e-5);
}

static void
case_emu_q8_0(void)
{
    rng = SEED + 1;
    run_shapes("emulated q8_0 vs the integer-sum reference", mm_emu, KLI_DT_Q8_0, 0, 1e-6);
}

static void
case_emu_q4(void)
{
    rng = SEED + 4;
    run_shapes("emulated q4 vs the integer-sum reference", mm_emu, KLI_DT_Q4, 0, 1e-6);
}

/* The emulation's own checks catch a wrong configuration: tiles 4/5 configured for bf16
 * while the Q8_0 block runs on them (K of A 16 dwords, B 8 rows). */
static void
case_emu_checks(void)
{
    struct amx_tilecfg cfg;
    uint8_t w[32 * 34 + 64] = {0}, xp[1024] = {0};   /* the wrong shapes read further */
    float xd[32] = {0}, acc[1024];
    long bad0 = emu.bad;

    amx_config(KLI_DT_BF16, &cfg);
    cfg.rows[6] = cfg.rows[7] = 8;
    emu_config(&cfg);
    amx_block_q8(w, 34, xp, xd, 1, acc);
    emu_release();
    ok(emu.bad > bad0, "the emulation flags tile shapes that tdpbssd would fault on "
       "(%ld flagged)", emu.bad - bad0);
}

/* ---- the hardware -------------------------------------------------------------------------- */

static const struct k_kernels *hw;

static void
mm_hw(enum k_dtype dt, float *y, int64_t ldy, const float *x, int64_t ldx, const void *w,
      int64_t n, int64_t k, int64_t m)
{
    hw->matmul[dt](y, ldy, x, ldx, w, n, k, m);
}

/* avx512vnni's decode kernels, a few tokens at a time: the same integer sums. */
static void
mm_vnni(enum k_dtype dt, float *y, int64_t ldy, const float *x, int64_t ldx, const void *w,
        int64_t n, int64_t k, int64_t m)
{
    const struct k_kernels *v = kernels_avx512vnni();

    for (int64_t t = 0; t < m; t += 8)
        v->matmul[dt](y + t * ldy, ldy, x + t * ldx, ldx, w, n, k, m - t < 8 ? m - t : 8);
}

/* The hardware's bf16 against the emulation's: only the order of float adds differs. */
static void
hw_vs_emu_bf16(void)
{
    struct err e = {0, 0, 0};

    rng = SEED + 2;
    for (int trial = 0; trial < 30; trial++) {
        struct prob p;
        int64_t n, k, m;
        shape(trial, KLI_DT_BF16, &n, &k, &m);
        prob_new(&p, KLI_DT_BF16, n, k, m);
        ref_bf16(&p, 1);   /* for the bound; the reference is the emulation's result */
        float *ye = tl_malloc((size_t)(m * p.ldy) * 4);
        mm_emu(KLI_DT_BF16, ye, p.ldy, p.x, p.ldx, p.w, n, k, m);
        for (int64_t t = 0; t < m; t++) {
            for (int64_t r = 0; r < n; r++)
                p.ref[t * n + r] = ye[t * p.ldy + r];
        }
        mm_hw(KLI_DT_BF16, p.y, p.ldy, p.x, p.ldx, p.w, n, k, m);
        err_add(&e, &p);
        free(ye);
        prob_free(&p);
    }
    ok(e.worst <= 1.0, "amx bf16 vs the emulation: worst err/bound %.3g", e.worst);
}

struct thr_arg {
    int passed;
};

/* A thread of its own (its own tile configuration) runs the Q8_0 shapes. */
static void *
thr_run(void *p)
{
    struct thr_arg *a = p;
    struct prob q;

    prob_new(&q, KLI_DT_Q8_0, 45, 256, 33);
    ref_q8(&q, 1);
    mm_hw(KLI_DT_Q8_0, q.y, q.ldy, q.x, q.ldx, q.w, q.n, q.k, q.m);
    struct err e = {0, 0, 0};
    err_add(&e, &q);
    a->passed = e.worst <= 1.0 && prob_intact(&q);
    prob_free(&q);
    return NULL;
}

static void
case_hw(void)
{
    hw = kernels_amx();
    if (hw == NULL) {
        ok(1, "amx # SKIP not compiled in, no AMX on this CPU, or the OS refused the tile "
           "data");
        return;
    }
    rng = SEED;
    run_shapes("amx bf16 vs float x", mm_hw, KLI_DT_BF16, 0, 5e-5);
    rng = SEED + 1;
    run_shapes("amx q8_0 vs the integer-sum reference", mm_hw, KLI_DT_Q8_0, 0, 1e-6);
    rng = SEED + 4;
    run_shapes("amx q4 vs the integer-sum reference", mm_hw, KLI_DT_Q4, 0, 1e-6);
    if (kernels_avx512vnni() != NULL) {
        rng = SEED + 1;
        run_shapes("avx512vnni decode q8_0 vs the same reference", mm_vnni, KLI_DT_Q8_0, 1,
                   1e-6);
        rng = SEED + 4;
        run_shapes("avx512vnni decode q4 vs the same reference", mm_vnni, KLI_DT_Q4, 1, 1e-6);
    }
    hw_vs_emu_bf16();
    struct thr_arg a = {0};
    pthread_t th;
    rng = SEED + 3;
    ok(pthread_create(&th, NULL, thr_run, &a) == 0 && pthread_join(th, NULL) == 0 && a.passed,
       "amx q8_0 on a second thread (its own tile configuration)");
    ok(strcmp(hw->name, "amx") == 0 && hw->matmul[KLI_DT_F32] ==
       kernels_avx512vnni()->matmul[KLI_DT_F32] && hw->silu == kernels_avx512vnni()->silu,
       "the amx table is avx512vnni's but for the bf16, q8_0 and q4 matmuls");
}

static const struct tap_fn cases[] = {
    {"emu_bf16", case_emu_bf16},
    {"emu_q8_0", case_emu_q8_0},
    {"emu_q4", case_emu_q4},
    {"emu_checks", case_emu_checks},
    {"hw", case_hw},
};

TAP_MAIN(cases)
