/*
 * neon.c - kernels for AArch64 (Advanced SIMD is part of the base architecture).
 *
 * Compiled only for aarch64 hosts; kernels_neon() hands the table out there. The dot
 * product instructions (SDOT, Armv8.2 "dotprod": Neoverse N1 and later, Cortex-A55/A76 and
 * later, Apple M1) are used where the CPU has them: the quantized matmuls come in two
 * versions, and the CPU's HWCAP bits (cpu.c) say whether the second is usable. Both give the
 * same integers, so the same floats: the two tables are "neon" and "neondot".
 *
 * Layout of the work, as in avx2.c with 128-bit registers:
 *  - float weights (F32, F16, BF16): rows four at a time, widened in registers eight
 *    elements per step, each group of rows dotted with every token while it is in L1;
 *  - Q8_0 and Q4: the tokens' activations are quantized per 32-block to int8 (scale
 *    amax/127, round to nearest even) into a stack buffer, at most eight tokens and a slice
 *    of k at a time; each block's integer sum (SDOT, or SMULL/SMLAL pairs summed with SADALP)
 *    is scaled by the two block scales in float. A pair of int8 products is at most
 *    128 * 127 * 2 = 32512, so the 16-bit pairs of the SMULL path cannot overflow.
 *  - Q2_K .. Q6_K: the same by super-blocks of 256 (one activation scale per super-block,
 *    with the sums of its runs of 16 for the minimums), sixteen-weight integer sums each
 *    multiplied by its run's integer scale (NEON_KROWS).
 *  - exp (for silu and the decay kernels): the Cephes polynomial of avx2.c, four lanes.
 */
#include "config.h"

#include <arm_neon.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define NEON_INLINE static inline __attribute__((always_inline))

/* SDOT is Armv8.2 (an optional part of it; no CPU without 8.2 has it), and GCC's arm_neon.h
 * offers vdotq_s32 only to code compiled for arch=armv8.2-a+dotprod. */
#if defined(__clang__)
#define NEON_DOTPROD __attribute__((target("dotprod")))
#else
#define NEON_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

/* ==== vector basics ====================================================================== */

static float
neon_dot(const float *a, const float *b, int64_t n)
{
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    float s;

    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4)
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static void
neon_axpy(float *y, float a, const float *x, int64_t n)
{
    int64_t i = 0;

    for (; i + 4 <= n; i += 4)
        vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++)
        y[i] += a * x[i];
}

static void
neon_scale(float *y, float a, int64_t n)
{
    int64_t i = 0;

    for (; i + 4 <= n; i += 4)
        vst1q_f32(y + i, vmulq_n_f32(vld1q_f32(y + i), a));
    for (; i < n; i++)
        y[i] *= a;
}

/* ==== exp, silu and the decay kernels ===================================================== */

/* exp(x) for x <= 0, four lanes: x = n ln2 + r (ln2 in two parts), e^r by the degree-6
 * Cephes polynomial, 2^n through the exponent bits; inputs below -87 are clamped so 2^n stays
 * normal. About 2 ulp (avx2.c has the same). */
NEON_INLINE float32x4_t
neon_exp_neg(float32x4_t x)
{
    x = vmaxq_f32(x, vdupq_n_f32(-87.0f));
    float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

/* Up to four floats of p (n < 4) into a zero-padded vector, and back. */
NEON_INLINE float32x4_t
neon_load_tail(const float *p, int64_t n)
{
    float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};

    memcpy(t, p, (size_t)n * sizeof(float));
    return vld1q_f32(t);
}

NEON_INLINE void
neon_store_tail(float *p, float32x4_t v, int64_t n)
{
    float t[4];

    vst1q_f32(t, v);
    memcpy(p, t, (size_t)n * sizeof(float));
}

static float
neon_dot_decay(const float *a, const float *b, const float *ga, const float *gb, int64_t n)
{
    float32x4_t acc = vdupq_n_f32(0.0f);
    int64_t i = 0;

    for (; i + 4 <= n; i += 4) {
        float32x4_t e = neon_exp_neg(vsubq_f32(vld1q_f32(ga + i), vld1q_f32(gb + i)));
        acc = vfmaq_f32(acc, vmulq_f32(vld1q_f32(a + i), vld1q_f32(b + i)), e);
    }
    if (i < n) {
        float32x4_t e = neon_exp_neg(vsubq_f32(neon_load_tail(ga + i, n - i),
                                               neon_load_tail(gb + i, n - i)));
        acc = vfmaq_f32(acc, vmulq_f32(neon_load_tail(a + i, n - i),
                                       neon_load_tail(b + i, n - i)), e);
    }
    return vaddvq_f32(acc);
}

SIMD_MUL_DECAY(neon_mul_decay, float32x4_t, 4, neon_exp_neg, vld1q_f32, vst1q_f32, vmulq_f32,
               vsubq_f32, neon_load_tail, neon_store_tail)

/* silu(x) = x sigmoid(x), sigmoid from e = exp(-|x|): 1 / (1 + e) for x >= 0, e / (1 + e)
 * below; zero below x = -80 (|silu| < 1e-33), so no denormal enters the arithmetic. */
NEON_INLINE float32x4_t
neon_silu4(float32x4_t x)
{
    float32x4_t e = neon_exp_neg(vmaxq_f32(vnegq_f32(vabsq_f32(x)), vdupq_n_f32(-80.0f)));
    float32x4_t r = vdivq_f32(vdupq_n_f32(1.0f), vaddq_f32(vdupq_n_f32(1.0f), e));

    r = vbslq_f32(vcltq_f32(x, vdupq_n_f32(0.0f)), vmulq_f32(r, e), r);
    r = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(r),
                                        vcgeq_f32(x, vdupq_n_f32(-80.0f))));
    return vmulq_f32(x, r);
}

SIMD_SILU(neon_silu, float32x4_t, 4, neon_silu4, vld1q_f32, vst1q_f32, vmulq_f32, neon_load_tail,
          neon_store_tail)

/* gemm_nn: register tiles of 4 rows x 8 columns; rows past m repeat the last row and are not
 * stored; the columns past the last multiple of 8 take the scalar loop. */
static void
neon_gemm_nn(float *y, int64_t ldy, const float *x, int64_t ldx, const float *B, int64_t ldb,
             int64_t m, int64_t n, int64_t k, float alpha, int acc)
{
    int64_t n8 = n / 8 * 8;

    for (int64_t j0 = 0; j0 < n8; j0 += 8) {
        for (int64_t i0 = 0; i0 < m; i0 += 4) {
            const float *xr[4];
            float32x4_t c[4][2];

            for (int i = 0; i < 4; i++) {
                xr[i] = x + (i0 + i < m ? i0 + i : m - 1) * ldx;
                c[i][0] = c[i][1] = vdupq_n_f32(0.0f);
            }
            for (int64_t l = 0; l < k; l++) {
                float32x4_t b0 = vld1q_f32(B + l * ldb + j0), b1 = vld1q_f32(B + l * ldb + j0 + 4);
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    c[i][0] = vfmaq_n_f32(c[i][0], b0, xr[i][l]);
                    c[i][1] = vfmaq_n_f32(c[i][1], b1, xr[i][l]);
                }
            }
            for (int i = 0; i < 4 && i0 + i < m; i++) {
                float *yr = y + (i0 + i) * ldy + j0;
                float32x4_t s0 = vmulq_n_f32(c[i][0], alpha), s1 = vmulq_n_f32(c[i][1], alpha);
                if (acc) {
                    s0 = vaddq_f32(s0, vld1q_f32(yr));
                    s1 = vaddq_f32(s1, vld1q_f32(yr + 4));
                }
                vst1q_f32(yr, s0);
                vst1q_f32(yr + 4, s1);
            }
        }
    }
    for (int64_t i = 0; i < m && n8 < n; i++) {
        for (int64_t j = n8; j < n; j++) {
            float s = 0.0f;
            for (int64_t l = 0; l < k; l++)
                s += x[i * ldx + l] * B[l * ldb + j];
            y[i * ldy + j] = (acc ? y[i * ldy + j] : 0.0f) + alpha * s;
        }
    }
}

/* ==== conversions ======================================================================== */

NEON_INLINE float
neon_f16(const uint8_t *p)
{
    float16_t h;

    memcpy(&h, p, 2);
    return (float)h;
}

/* Eight weights of row p (dtype dt: F32, F16 or BF16) from element j as two vectors. */
NEON_INLINE void
neon_widen8(enum k_dtype dt, const uint8_t *p, int64_t j, float32x4_t *lo, float32x4_t *hi)
{
    if (dt == KLI_DT_F32) {
        *lo = vld1q_f32((const float *)(const void *)p + j);
        *hi = vld1q_f32((const float *)(const void *)p + j + 4);
    } else if (dt == KLI_DT_F16) {
        float16x8_t h = vld1q_f16((const float16_t *)(const void *)p + j);
        *lo = vcvt_f32_f16(vget_low_f16(h));
        *hi = vcvt_high_f32_f16(h);
    } else {
        uint16x8_t h = vld1q_u16((const uint16_t *)(const void *)p + j);
        *lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16));
        *hi = vreinterpretq_f32_u32(vshll_high_n_u16(h, 16));
    }
}

NEON_INLINE float
neon_widen1(enum k_dtype dt, const uint8_t *p, int64_t j)
{
    return simd_load1(dt, p, j, neon_f16);
}

static void
neon_to_f32(enum k_dtype dt, const void *src, float *dst, int64_t n)
{
    const uint8_t *p = src;
    int64_t i = 0;

    if (dt != KLI_DT_F16 && dt != KLI_DT_BF16) {
        dtype_to_f32(dt, src, dst, n);
        return;
    }
    for (; i + 8 <= n; i += 8) {
        float32x4_t lo, hi;
        neon_widen8(dt, p, i, &lo, &hi);
        vst1q_f32(dst + i, lo);
        vst1q_f32(dst + i + 4, hi);
    }
    for (; i < n; i++)
        dst[i] = neon_widen1(dt, p, i);
}

/* ==== matmul, float weights ============================================================== */

/* out[r] = row r . x for nr (<= 4) rows rb bytes apart. */
NEON_INLINE void
neon_dot_rows(enum k_dtype dt, int nr, const float *x, const uint8_t *w, size_t rb, int64_t k,
              float *out)
{
    float32x4_t a0[4], a1[4];
    int64_t j = 0;

#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
        a0[r] = a1[r] = vdupq_n_f32(0.0f);
    for (; j + 8 <= k; j += 8) {
        float32x4_t x0 = vld1q_f32(x + j), x1 = vld1q_f32(x + j + 4);
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            float32x4_t lo, hi;
            neon_widen8(dt, w + r * rb, j, &lo, &hi);
            a0[r] = vfmaq_f32(a0[r], lo, x0);
            a1[r] = vfmaq_f32(a1[r], hi, x1);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
        out[r] = simd_dot_tail(vaddvq_f32(vaddq_f32(a0[r], a1[r])), dt, x, w + r * rb, j, k,
                               neon_f16);
}

static void
neon_matmul_float(enum k_dtype dt, float *y, int64_t ldy, const float *x, int64_t ldx,
                  const void *w, int64_t n, int64_t k, int64_t m)
{
    size_t rb = (size_t)dtype_nbytes(dt, (uint64_t)k);
    const uint8_t *wb = w;
    float out[4];
    int64_t r = 0;

    for (; r + 4 <= n; r += 4) {
        for (int64_t t = 0; t < m; t++) {
            neon_dot_rows(dt, 4, x + t * ldx, wb + r * rb, rb, k, out);
            memcpy(y + t * ldy + r, out, sizeof(out));
        }
    }
    for (; r < n; r++) {
        for (int64_t t = 0; t < m; t++) {
            neon_dot_rows(dt, 1, x + t * ldx, wb + r * rb, rb, k, out);
            y[t * ldy + r] = out[0];
        }
    }
}

KLI_MATMUL_ENTRY(neon_matmul_f32, neon_matmul_float, KLI_DT_F32)
KLI_MATMUL_ENTRY(neon_matmul_f16, neon_matmul_float, KLI_DT_F16)
KLI_MATMUL_ENTRY(neon_matmul_bf16, neon_matmul_float, KLI_DT_BF16)

/* ==== matmul, quantized weights ========================================================== */

/*
 * The activations of up to NEON_QT tokens for a slice of nb blocks live in one stack buffer of
 * NEON_QBUF bytes, a region per token: int8 q[32 nb], then float d[nb] (16-byte aligned).
 */
#define NEON_QBUF 65536
#define NEON_QT 8

/* The largest |x[i]|, i < n (a multiple of 32). */
NEON_INLINE float
neon_amax(const float *x, int64_t n)
{
    float32x4_t m = vdupq_n_f32(0.0f);

    for (int64_t i = 0; i < n; i += 4)
        m = vmaxq_f32(m, vabsq_f32(vld1q_f32(x + i)));
    return vmaxvq_f32(m);
}

/* q[i] = x[i] id rounded to nearest even (|x id| <= 127), i < 32. */
NEON_INLINE void
neon_quant32(const float *x, float id, int8_t *q)
{
    int16x8_t h[4];

    for (int i = 0; i < 4; i++)
        h[i] = vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + 8 * i), id))),
                            vqmovn_s32(vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + 8 * i + 4),
                                                                  id))));
    vst1q_s8(q, vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1])));
    vst1q_s8(q + 16, vcombine_s8(vqmovn_s16(h[2]), vqmovn_s16(h[3])));
}

/* Quantizes n floats (32 or 256) to int8 with one scale amax/127 (round to nearest even);
 * @return the scale. */
NEON_INLINE float
neon_quant_run(const float *x, int64_t n, int8_t *q)
{
    float amax = neon_amax(x, n), id = amax >= 1e-30f ? 127.0f / amax : 0.0f;

    for (int64_t i = 0; i < n; i += 32)
        neon_quant32(x + i, id, q + i);
    return amax / 127.0f;
}

/*
 * The K types (Q2_K .. Q6_K) go by super-blocks of 256: a token's region holds, per
 * super-block, its 256 int8 x under one scale (amax/127 of the 256), the sixteen int16 sums of
 * its runs of 16 and that scale as a float (NEON_KSB bytes).
 */
#define NEON_KSB 304

/* The bytes of a region of nb units: blocks of 32, or super-blocks for the K types. */
NEON_INLINE size_t
neon_qregion(enum k_dtype dt, int64_t nb)
{
    if (dtype_is_k(dt))
        return (size_t)nb * NEON_KSB;
    return ((size_t)nb * 36 + 15) & ~(size_t)15;
}

static void
neon_quant_slice(enum k_dtype dt, const float *x, int64_t nb, uint8_t *region)
{
    if (dtype_is_k(dt)) {
        for (int64_t s = 0; s < nb; s++, x += KLI_QK_K, region += NEON_KSB) {
            int8_t *q = (int8_t *)region;
            int16_t *sums = (int16_t *)(void *)(region + KLI_QK_K);
            float d = neon_quant_run(x, KLI_QK_K, q);
            for (int g = 0; g < 16; g++)
                sums[g] = vaddlvq_s8(vld1q_s8(q + 16 * g));
            memcpy(region + KLI_QK_K + 32, &d, 4);
        }
        return;
    }
    float *d = (float *)(void *)(region + 32 * nb);

    for (int64_t b = 0; b < nb; b++)
        d[b] = neon_quant_run(x + 32 * b, 32, (int8_t *)region + 32 * b);
}

/* The 32 int8 weights of a block, as elements 0..15 and 16..31. */
NEON_INLINE void
neon_q8_w(const uint8_t *p, int8x16_t *w0, int8x16_t *w1)
{
    *w0 = vld1q_s8((const int8_t *)p + 2);
    *w1 = vld1q_s8((const int8_t *)p + 18);
}

NEON_INLINE void
neon_q4_w(const uint8_t *p, int8x16_t *w0, int8x16_t *w1)
{
    uint8x16_t v = vld1q_u8(p + 2);

    *w0 = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f))), vdupq_n_s8(8));
    *w1 = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), vdupq_n_s8(8));
}

/* Integer sums of 16 products, four lanes: without and with SDOT (the same totals). */
NEON_INLINE int32x4_t
neon_isum16(int8x16_t w, int8x16_t x)
{
    return vpaddlq_s16(vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(x)), w, x));
}

NEON_DOTPROD NEON_INLINE int32x4_t
neon_isum16_dot(int8x16_t w, int8x16_t x)
{
    return vdotq_s32(vdupq_n_s32(0), w, x);
}

/* Integer block sums, four lanes: without and with SDOT. */
NEON_INLINE int32x4_t
neon_isum(int8x16_t w0, int8x16_t w1, int8x16_t x0, int8x16_t x1)
{
    int16x8_t p0 = vmlal_s8(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)), vget_high_s8(w0),
                            vget_high_s8(x0));
    int16x8_t p1 = vmlal_s8(vmull_s8(vget_low_s8(w1), vget_low_s8(x1)), vget_high_s8(w1),
                            vget_high_s8(x1));

    return vpadalq_s16(vpaddlq_s16(p0), p1);
}

NEON_DOTPROD NEON_INLINE int32x4_t
neon_isum_dot(int8x16_t w0, int8x16_t w1, int8x16_t x0, int8x16_t x1)
{
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0, x0), w1, x1);
}

/*
 * y[t][r] (+)= row r . token t over the slice, for every row and the mt tokens whose regions
 * start at q (stride apart). Blocks go four at a time: their integer sums are reduced to one
 * total per block (pairwise adds, exact), one block per lane, and scaled in float. The SMULL
 * and SDOT paths spread a block over the lanes differently, but the totals are the same
 * integers, so both give the same floats. One body for both weight types and both integer
 * sums, as a macro so that each copy is compiled with its own target.
 */
#define NEON_QROWS(NAME, ATTR, WLOAD, ISUM, BB)                                                \
    ATTR static void                                                                           \
    NAME(float *y, int64_t ldy, const uint8_t *w, size_t rb, int64_t n, int64_t nb,            \
         const uint8_t *q, size_t stride, int64_t mt, int add)                                \
    {                                                                                          \
        for (int64_t r = 0; r < n; r++) {                                                      \
            const uint8_t *row = w + (size_t)r * rb;                                          \
            for (int64_t t = 0; t < mt; t++) {                                                 \
                const int8_t *xq = (const int8_t *)(q + (size_t)t * stride);                  \
                const float *dx = (const float *)(const void *)(q + (size_t)t * stride +      \
                                                                32 * (size_t)nb);             \
                float32x4_t acc = vdupq_n_f32(0.0f);                                           \
                for (int64_t b0 = 0; b0 < nb; b0 += 4) {                                       \
                    int32x4_t s[4];                                                            \
                    float sc[4];                                                               \
                    for (int i = 0; i < 4; i++) {                                              \
                        int64_t b = b0 + i;                                                    \
                        int8x16_t w0, w1;                                                      \
                        if (b >= nb) {                                                         \
                            s[i] = vdupq_n_s32(0);                                             \
                            sc[i] = 0.0f;                                                      \
                            continue;                                                          \
                        }                                                                      \
                        WLOAD(row + (BB) * b, &w0, &w1);                                       \
                        s[i] = ISUM(w0, w1, vld1q_s8(xq + 32 * b), vld1q_s8(xq + 32 * b + 16));\
                        sc[i] = neon_f16(row + (BB) * b) * dx[b];                              \
                    }                                                                          \
                    int32x4_t tot = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3])); \
                    acc = vfmaq_f32(acc, vcvtq_f32_s32(tot), vld1q_f32(sc));                   \
                }                                                                              \
                float v = vaddvq_f32(acc);                                                     \
                y[t * ldy + r] = add ? y[t * ldy + r] + v : v;                                 \
            }                                                                                  \
        }                                                                                      \
    }

NEON_QROWS(neon_q8_rows, , neon_q8_w, neon_isum, 34)
NEON_QROWS(neon_q4_rows, , neon_q4_w, neon_isum, 18)
NEON_QROWS(neon_q8_rows_dot, NEON_DOTPROD, neon_q8_w, neon_isum_dot, 34)
NEON_QROWS(neon_q4_rows_dot, NEON_DOTPROD, neon_q4_w, neon_isum_dot, 18)

/* The sixteen integer scales sc[g] and minimums mn[g] of the runs of 16 (g < 16) and d, dmin
 * of the K super-block at p (kli-weights(5)); Q3_K and Q6_K have no minimums (dmin 0). */
NEON_INLINE void
neon_k_head(enum k_dtype dt, const uint8_t *p, int32_t *sc, int32_t *mn, float *d, float *dm)
{
    const uint8_t *s;

    memset(mn, 0, 16 * sizeof(*mn));
    *dm = 0.0f;
    switch (dt) {
    case KLI_DT_Q2_K:
        for (int g = 0; g < 16; g++) {
            sc[g] = p[g] & 15;
            mn[g] = p[g] >> 4;
        }
        *d = neon_f16(p + 80);
        *dm = neon_f16(p + 82);
        return;
    case KLI_DT_Q3_K:
        s = p + 96;
        for (int k = 0; k < 4; k++) {
            int hb = s[8 + k];
            sc[k] = ((s[k] & 15) | (hb & 3) << 4) - 32;
            sc[4 + k] = ((s[4 + k] & 15) | (hb >> 2 & 3) << 4) - 32;
            sc[8 + k] = ((s[k] >> 4) | (hb >> 4 & 3) << 4) - 32;
            sc[12 + k] = ((s[4 + k] >> 4) | (hb >> 6) << 4) - 32;
        }
        *d = neon_f16(p + 108);
        return;
    case KLI_DT_Q4_K:
    case KLI_DT_Q5_K:
        /* eight 6-bit scales and minimums of 32 weights, each for two runs */
        s = p + 4;
        for (int j = 0; j < 4; j++) {
            sc[2 * j] = sc[2 * j + 1] = s[j] & 63;
            mn[2 * j] = mn[2 * j + 1] = s[j + 4] & 63;
            sc[2 * j + 8] = sc[2 * j + 9] = (s[j + 8] & 15) | (s[j] >> 6) << 4;
            mn[2 * j + 8] = mn[2 * j + 9] = (s[j + 8] >> 4) | (s[j + 4] >> 6) << 4;
        }
        *d = neon_f16(p);
        *dm = neon_f16(p + 2);
        return;
    default:
        for (int g = 0; g < 16; g++)
            sc[g] = (int8_t)p[192 + g];
        *d = neon_f16(p + 208);
        return;
    }
}

/* (v >> shift) & mask per byte (shift a variable: vshlq by its negation). */
NEON_INLINE uint8x16_t
neon_bits(uint8x16_t v, int shift, int mask)
{
    return vandq_u8(vshlq_u8(v, vdupq_n_s8((int8_t)-shift)), vdupq_n_u8((uint8_t)mask));
}

/* The signed levels of weights 16g..16g+15 of the K super-block at p (g a constant after
 * unrolling). */
NEON_INLINE int8x16_t
neon_k_levels(enum k_dtype dt, const uint8_t *p, int g)
{
    int l0 = 16 * (g % 2), h = g / 8, c = g % 8 / 2;
    uint8x16_t u;

    switch (dt) {
    case KLI_DT_Q2_K:
        return vreinterpretq_s8_u8(neon_bits(vld1q_u8(p + 16 + 32 * h + l0), 2 * c, 3));
    case KLI_DT_Q3_K:
        u = vorrq_u8(neon_bits(vld1q_u8(p + 32 + 32 * h + l0), 2 * c, 3),
                     vshlq_n_u8(neon_bits(vld1q_u8(p + l0), 4 * h + c, 1), 2));
        return vsubq_s8(vreinterpretq_s8_u8(u), vdupq_n_s8(4));
    case KLI_DT_Q4_K:
        return vreinterpretq_s8_u8(neon_bits(vld1q_u8(p + 16 + 32 * (g / 4) + l0),
                                             4 * (g % 4 / 2), 15));
    case KLI_DT_Q5_K:
        u = vorrq_u8(neon_bits(vld1q_u8(p + 48 + 32 * (g / 4) + l0), 4 * (g % 4 / 2), 15),
                     vshlq_n_u8(neon_bits(vld1q_u8(p + 16 + l0), g / 2, 1), 4));
        return vreinterpretq_s8_u8(u);
    default:
        u = vorrq_u8(neon_bits(vld1q_u8(p + 64 * h + 32 * (c % 2) + l0), 4 * (c / 2), 15),
                     vshlq_n_u8(neon_bits(vld1q_u8(p + 128 + 32 * h + l0), 2 * c, 3), 4));
        return vsubq_s8(vreinterpretq_s8_u8(u), vdupq_n_s8(32));
    }
}

/*
 * The K types' rows (the same contract as NEON_QROWS, nb super-blocks): per row, token and
 * super-block the levels and scales are unpacked once (no per-element scalar work) and
 *     row . x = d_x (d sum_g sc[g] (q_g . x_g) - dmin sum_g mn[g] sums[g]),
 * integer up to the two float scales. |q| <= 32 and |x| <= 127 keep SMULL's pairs in 16 bits.
 */
#define NEON_KROWS(NAME, ATTR, ISUM16, DT)                                                     \
    ATTR static void                                                                           \
    NAME(float *y, int64_t ldy, const uint8_t *w, size_t rb, int64_t n, int64_t nb,            \
         const uint8_t *q, size_t stride, int64_t mt, int add)                                \
    {                                                                                          \
        const size_t bb = (size_t)dtype_info(DT)->block_bytes;                                 \
        for (int64_t r = 0; r < n; r++) {                                                      \
            for (int64_t t = 0; t < mt; t++) {                                                 \
                const uint8_t *p = w + (size_t)r * rb, *xs = q + (size_t)t * stride;           \
                float v = 0.0f;                                                                \
                for (int64_t s = 0; s < nb; s++, p += bb, xs += NEON_KSB) {                    \
                    int32_t sc[16], mn[16];                                                    \
                    float d, dm, dx;                                                           \
                    int32x4_t is = vdupq_n_s32(0), ms = vdupq_n_s32(0);                        \
                    neon_k_head(DT, p, sc, mn, &d, &dm);                                       \
                    _Pragma("GCC unroll 16")                                                   \
                    for (int g = 0; g < 16; g++)                                               \
                        is = vmlaq_n_s32(is, ISUM16(neon_k_levels(DT, p, g),                   \
                                                    vld1q_s8((const int8_t *)xs + 16 * g)),    \
                                         sc[g]);                                               \
                    for (int i = 0; i < 4; i++)                                                \
                        ms = vmlaq_s32(ms, vld1q_s32(mn + 4 * i),                              \
                                       vmovl_s16(vld1_s16((const int16_t *)(const void *)     \
                                                          (xs + KLI_QK_K) + 4 * i)));          \
                    memcpy(&dx, xs + KLI_QK_K + 32, 4);                                        \
                    v += dx * (d * (float)vaddvq_s32(is) - dm * (float)vaddvq_s32(ms));        \
                }                                                                              \
                y[t * ldy + r] = add ? y[t * ldy + r] + v : v;                                 \
            }                                                                                  \
        }                                                                                      \
    }

/* The five K types' rows, with and without SDOT. */
#define NEON_KROWS5(SUF, ATTR, ISUM16)                                                         \
    NEON_KROWS(neon_q2_k_rows##SUF, ATTR, ISUM16, KLI_DT_Q2_K)                                 \
    NEON_KROWS(neon_q3_k_rows##SUF, ATTR, ISUM16, KLI_DT_Q3_K)                                 \
    NEON_KROWS(neon_q4_k_rows##SUF, ATTR, ISUM16, KLI_DT_Q4_K)                                 \
    NEON_KROWS(neon_q5_k_rows##SUF, ATTR, ISUM16, KLI_DT_Q5_K)                                 \
    NEON_KROWS(neon_q6_k_rows##SUF, ATTR, ISUM16, KLI_DT_Q6_K)

NEON_KROWS5(, , neon_isum16)
NEON_KROWS5(_dot, NEON_DOTPROD, neon_isum16_dot)

typedef void (*neon_qrows_fn)(float *y, int64_t ldy, const uint8_t *w, size_t rb, int64_t n,
                              int64_t nb, const uint8_t *q, size_t stride, int64_t mt, int add);

/* Tokens in groups of up to NEON_QT, k in slices whose quantized activations fit the buffer:
 * each slice of W is read once per group of tokens. */
static void
neon_matmul_quant(enum k_dtype dt, neon_qrows_fn rows, float *y, int64_t ldy, const float *x,
                  int64_t ldx, const void *w, int64_t n, int64_t k, int64_t m)
{
    _Alignas(16) uint8_t buf[NEON_QBUF];
    /* units of blocks of 32, or of super-blocks for the K types */
    int64_t unit = dtype_is_k(dt) ? KLI_QK_K : 32, nbt = k / unit;
    size_t bb = (size_t)dtype_info(dt)->block_bytes, rb = (size_t)nbt * bb;

    for (int64_t t0 = 0; t0 < m; t0 += NEON_QT) {
        int64_t mt = m - t0 < NEON_QT ? m - t0 : NEON_QT;
        int64_t kq = NEON_QBUF / ((int64_t)neon_qregion(dt, 1) * mt);

        for (int64_t b0 = 0; b0 < nbt; b0 += kq) {
            int64_t nb = nbt - b0 < kq ? nbt - b0 : kq;
            size_t stride = neon_qregion(dt, nb);

            for (int64_t t = 0; t < mt; t++)
                neon_quant_slice(dt, x + (t0 + t) * ldx + unit * b0, nb,
                                 buf + (size_t)t * stride);
            rows(y + t0 * ldy, ldy, (const uint8_t *)w + (size_t)b0 * bb, rb, n, nb, buf,
                 stride, mt, b0 > 0);
        }
    }
}

/* The quantized entries of one table (SUF: "" for neon, _dot for neondot). */
#define NEON_QENTRIES(SUF)                                                                     \
    KLI_MATMUL_ENTRY(neon_matmul_q8_0##SUF, neon_matmul_quant, KLI_DT_Q8_0, neon_q8_rows##SUF) \
    KLI_MATMUL_ENTRY(neon_matmul_q4##SUF, neon_matmul_quant, KLI_DT_Q4, neon_q4_rows##SUF)     \
    KLI_MATMUL_ENTRY(neon_matmul_q2_k##SUF, neon_matmul_quant, KLI_DT_Q2_K,                    \
                     neon_q2_k_rows##SUF)                                                      \
    KLI_MATMUL_ENTRY(neon_matmul_q3_k##SUF, neon_matmul_quant, KLI_DT_Q3_K,                    \
                     neon_q3_k_rows##SUF)                                                      \
    KLI_MATMUL_ENTRY(neon_matmul_q4_k##SUF, neon_matmul_quant, KLI_DT_Q4_K,                    \
                     neon_q4_k_rows##SUF)                                                      \
    KLI_MATMUL_ENTRY(neon_matmul_q5_k##SUF, neon_matmul_quant, KLI_DT_Q5_K,                    \
                     neon_q5_k_rows##SUF)                                                      \
    KLI_MATMUL_ENTRY(neon_matmul_q6_k##SUF, neon_matmul_quant, KLI_DT_Q6_K,                    \
                     neon_q6_k_rows##SUF)

NEON_QENTRIES()
NEON_QENTRIES(_dot)

/* ==== the tables ========================================================================= */

#define NEON_TABLE(NAME, SUF)                                                                  \
    {                                                                                          \
        .name = NAME,                                                                          \
        .matmul = {                                                                            \
            [KLI_DT_F32] = neon_matmul_f32,                                                    \
            [KLI_DT_F16] = neon_matmul_f16,                                                    \
            [KLI_DT_BF16] = neon_matmul_bf16,                                                  \
            [KLI_DT_Q8_0] = neon_matmul_q8_0##SUF,                                             \
            [KLI_DT_Q4] = neon_matmul_q4##SUF,                                                 \
            [KLI_DT_Q2_K] = neon_matmul_q2_k##SUF,                                             \
            [KLI_DT_Q3_K] = neon_matmul_q3_k##SUF,                                             \
            [KLI_DT_Q4_K] = neon_matmul_q4_k##SUF,                                             \
            [KLI_DT_Q5_K] = neon_matmul_q5_k##SUF,                                             \
            [KLI_DT_Q6_K] = neon_matmul_q6_k##SUF,                                             \
        },                                                                                     \
        .dot = neon_dot,                                                                       \
        .dot_decay = neon_dot_decay,                                                           \
        .mul_decay = neon_mul_decay,                                                           \
        .gemm_nn = neon_gemm_nn,                                                               \
        .silu = neon_silu,                                                                     \
        .axpy = neon_axpy,                                                                     \
        .scale = neon_scale,                                                                   \
        .to_f32 = neon_to_f32,                                                                 \
    }

static const struct k_kernels neon_table = NEON_TABLE("neon", );
static const struct k_kernels neondot_table = NEON_TABLE("neondot", _dot);

const struct k_kernels *
kernels_neon(void)
{
    return k_cpu_features()->neon ? &neon_table : NULL;
}

/* The same kernels with SDOT for the quantized matmuls, on CPUs that have it. */
const struct k_kernels *
kernels_neondot(void)
{
    const struct k_cpu_features *f = k_cpu_features();

    return f->neon && f->dotprod ? &neondot_table : NULL;
}
