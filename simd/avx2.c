/*
 * avx2.c - kernels for x86-64 CPUs with AVX2, FMA and F16C (Haswell, Zen and later).
 *
 * Compiled with -mavx2 -mfma -mf16c only; kernels_avx2() hands the table out only when the
 * CPU and OS support all three.
 *
 * matmul takes one of two paths, chosen by the number of token rows m:
 *
 *  - m < avx2_mpack[dt] (decode, batched decode): W is streamed once, a few rows at a time,
 *    and each group of rows is dotted with every x row while it is in L1 (register tiles of up
 *    to 4 tokens, so each weight vector is widened or unpacked once for 4 tokens); the next
 *    rows are prefetched (without that, the integer kernels wait on memory instead of
 *    overlapping with it). Float weights
 *    are widened in registers (F16 by vcvtph2ps, BF16 by a 16-bit shift). Q8_0 and Q4
 *    weights are never widened: x is quantized per 32-block to int8 (scale amax/127) into a
 *    stack buffer and the block dot products are integer (vpmaddubsw + vpmaddwd), then scaled
 *    by d_w * d_x in float.
 *      Q8_0: maddubs(|w|, sign(x, w)); |w| may be 128 (w = -128 is valid), x never is -128.
 *      Q4:   maddubs(nibble, x) on the unsigned nibbles, and the -8 offset is added back as
 *            -8 * sum(q_x) per block. Two blocks share one 256-bit step: x is stored
 *            pre-shuffled as [lo16(b) lo16(b+1) hi16(b) hi16(b+1)] so the nibbles of two
 *            blocks, loaded side by side, need one shift and two masks. Eight blocks are
 *            reduced together by two rounds of vphaddd, so their scales are converted and
 *            applied once per eight blocks.
 *  - m >= avx2_mpack[dt] (prefill): a blocked GEMM. A chunk of X86_NC rows x
 *    X86_KC columns of W is converted to float once and packed into panels of 24 rows
 *    (column-major within a panel, converted and transposed in registers), then a 4-token x
 *    24-row register tile (12 accumulators) runs over it with broadcast activations; W is read
 *    from memory once per call and the conversion cost is shared by all m tokens.
 *
 * The loops around the kernels (streaming, slicing k, packing, driving the tiles) are gemm.h's,
 * shared with avx512.c; this file defines the primitives they call (see gemm.h for the list).
 * The 256-bit helpers and the packer both files use are in avx2.h.
 */
#include "config.h"

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define X86(name) avx2_##name
#define X86_KC 256          /* GEMM: columns of W per packed chunk */
#define X86_NR 24           /* GEMM: rows per panel (three vectors) */
#define X86_NC 96           /* GEMM: rows per packed chunk */
#define X86_TM 4            /* GEMM: tokens per tile */
#define X86_DTM 4           /* decode: tokens per tile */
#define X86_QBUF 65536      /* decode: bytes of quantized activations (see avx2_q8_bytes) */
#define X86_ALIGN 32

#include "avx2.h"

/* m from which matmul packs W and runs the GEMM tile instead of streaming W through the
 * multi-token decode tiles: crossovers measured on Skylake-SP and Sapphire Rapids cores (k = n
 * = 2304, one thread). The Q4 integer tiles stay ahead of the float GEMM up to m = 50..120;
 * Q8_0's need a sign step per token and fall behind early. The quantized limits must keep
 * m * 320 bytes <= X86_QBUF. The K types' integer tiles, like Q4's, beat the GEMM (with its
 * dequantizing packer) up to m = 64 at least: measured on a shared 2-core EPYC (Zen) only,
 * n = 1024, k = 2304. */
static const int64_t avx2_mpack[KLI_DT_COUNT] = {
    [KLI_DT_F32] = 24, [KLI_DT_F16] = 32, [KLI_DT_BF16] = 32, [KLI_DT_Q8_0] = 12,
    [KLI_DT_Q4] = 64, [KLI_DT_Q2_K] = 64, [KLI_DT_Q3_K] = 64, [KLI_DT_Q4_K] = 64,
    [KLI_DT_Q5_K] = 64, [KLI_DT_Q6_K] = 64,
};

/* ---- small helpers -------------------------------------------------------------------- */

/* A mask of the first r (0..8) int32 lanes, for maskload/maskstore tails. */
AVX2_INLINE __m256i
avx2_tailmask(int64_t r)
{
    static const int32_t bits[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

    return _mm256_loadu_si256((const __m256i *)(bits + 8 - r));
}

/* The first r (< 8) floats of p into a vector, the other lanes zero, and back (masked: the
 * memory past them is not touched). */
AVX2_INLINE __m256
avx2_load_tail(const float *p, int64_t r)
{
    return _mm256_maskload_ps(p, avx2_tailmask(r));
}

AVX2_INLINE void
avx2_store_tail(float *p, __m256 v, int64_t r)
{
    _mm256_maskstore_ps(p, avx2_tailmask(r), v);
}

/* ---- vector primitives ------------------------------------------------------------------ */

static float
avx2_dot(const float *a, const float *b, int64_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;

    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    if (i < n) {
        __m256i mk = avx2_tailmask(n - i);
        s1 = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, mk), _mm256_maskload_ps(b + i, mk), s1);
    }
    return avx2_hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

static void
avx2_axpy(float *y, float a, const float *x, int64_t n)
{
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;

    for (; i + 16 <= n; i += 16) {
        __m256 y0 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i));
        __m256 y1 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8));
        _mm256_storeu_ps(y + i, y0);
        _mm256_storeu_ps(y + i + 8, y1);
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i),
                                                _mm256_loadu_ps(y + i)));
    if (i < n) {
        __m256i mk = avx2_tailmask(n - i);
        __m256 v = _mm256_maskload_ps(y + i, mk);
        v = _mm256_fmadd_ps(va, _mm256_maskload_ps(x + i, mk), v);
        _mm256_maskstore_ps(y + i, mk, v);
    }
}

static void
avx2_scale(float *y, float a, int64_t n)
{
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;

    for (; i + 16 <= n; i += 16) {
        _mm256_storeu_ps(y + i, _mm256_mul_ps(va, _mm256_loadu_ps(y + i)));
        _mm256_storeu_ps(y + i + 8, _mm256_mul_ps(va, _mm256_loadu_ps(y + i + 8)));
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(va, _mm256_loadu_ps(y + i)));
    if (i < n) {
        __m256i mk = avx2_tailmask(n - i);
        _mm256_maskstore_ps(y + i, mk, _mm256_mul_ps(va, _mm256_maskload_ps(y + i, mk)));
    }
}

static void
avx2_to_f32(enum k_dtype dt, const void *src, float *dst, int64_t n)
{
    const uint8_t *p = src;
    int64_t i = 0;

    switch (dt) {
    case KLI_DT_F32:
        memcpy(dst, src, (size_t)n * 4);
        return;
    case KLI_DT_F16:
    case KLI_DT_BF16:
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, avx2_load8(dt, p, i));
        for (; i < n; i++)
            dst[i] = avx2_load1(dt, p, i);
        return;
    case KLI_DT_Q8_0:
        for (; i < n; i += 32, p += 34) {
            __m256 d = _mm256_set1_ps(avx2_f16(p));
            for (int j = 0; j < 32; j += 8) {
                __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 2 + j)));
                _mm256_storeu_ps(dst + i + j, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
            }
        }
        return;
    case KLI_DT_Q4: {
        const __m128i m4 = _mm_set1_epi8(0x0f), e8 = _mm_set1_epi8(8);
        for (; i < n; i += 32, p += 18) {
            __m256 d = _mm256_set1_ps(avx2_f16(p));
            __m128i q = _mm_loadu_si128((const __m128i *)(p + 2));
            __m128i lo = _mm_sub_epi8(_mm_and_si128(q, m4), e8);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), e8);
            __m256 v0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
            __m256 v1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
            __m256 v2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
            __m256 v3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
            _mm256_storeu_ps(dst + i, _mm256_mul_ps(v0, d));
            _mm256_storeu_ps(dst + i + 8, _mm256_mul_ps(v1, d));
            _mm256_storeu_ps(dst + i + 16, _mm256_mul_ps(v2, d));
            _mm256_storeu_ps(dst + i + 24, _mm256_mul_ps(v3, d));
        }
        return;
    }
    default:
        dtype_to_f32(dt, src, dst, n);
        return;
    }
}

/* ---- decode path, float weights ------------------------------------------------------- */

/* out[r] = dot(x, row r), r < nr (a constant 1, 3 or 4 after inlining); rows rb bytes apart;
 * the rows pf bytes further are prefetched. */
AVX2_INLINE void
avx2_dot_rows(enum k_dtype dt, int nr, const float *x, const uint8_t *w, size_t rb,
              size_t pf, int64_t k, float *out)
{
    __m256 a0[4], a1[4];
    int64_t j = 0;

#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
        a0[r] = a1[r] = _mm256_setzero_ps();
    for (; j + 16 <= k; j += 16) {
        __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            const uint8_t *ahead = w + pf + r * rb + j * (dt == KLI_DT_F32 ? 4 : 2);
            _mm_prefetch((const char *)ahead, _MM_HINT_T0);
            a0[r] = _mm256_fmadd_ps(avx2_load8(dt, w + r * rb, j), x0, a0[r]);
            a1[r] = _mm256_fmadd_ps(avx2_load8(dt, w + r * rb, j + 8), x1, a1[r]);
        }
    }
    if (j + 8 <= k) {
        __m256 x0 = _mm256_loadu_ps(x + j);
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++)
            a0[r] = _mm256_fmadd_ps(avx2_load8(dt, w + r * rb, j), x0, a0[r]);
        j += 8;
    }
#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
        out[r] = simd_dot_tail(avx2_hsum(_mm256_add_ps(a0[r], a1[r])), dt, x, w + r * rb, j, k,
                               avx2_f16);
}

/* y[t][r] = dot(x[t], row r) for nt (4) tokens x 3 rows: each widened weight vector serves
 * four tokens (12 accumulators). */
AVX2_INLINE void
avx2_dot_tile(enum k_dtype dt, int nt, const float *x, int64_t ldx, const uint8_t *w,
              size_t rb, size_t pf, int64_t k, float *y, int64_t ldy)
{
    __m256 acc[4][3];
    int64_t j = 0;

#pragma GCC unroll 4
    for (int t = 0; t < nt; t++)
        acc[t][0] = acc[t][1] = acc[t][2] = _mm256_setzero_ps();
    for (; j + 8 <= k; j += 8) {
        __m256 wv[3];
#pragma GCC unroll 3
        for (int r = 0; r < 3; r++) {
            _mm_prefetch((const char *)(w + pf + r * rb + j * (dt == KLI_DT_F32 ? 4 : 2)),
                         _MM_HINT_T0);
            wv[r] = avx2_load8(dt, w + r * rb, j);
        }
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) {
            __m256 xv = _mm256_loadu_ps(x + t * ldx + j);
#pragma GCC unroll 3
            for (int r = 0; r < 3; r++)
                acc[t][r] = _mm256_fmadd_ps(wv[r], xv, acc[t][r]);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < nt; t++) {
#pragma GCC unroll 3
        for (int r = 0; r < 3; r++) {
            float s = avx2_hsum(acc[t][r]);
            for (int64_t jj = j; jj < k; jj++)
                s += x[t * ldx + jj] * avx2_load1(dt, w + r * rb, jj);
            y[t * ldy + r] = s;
        }
    }
}

/* ---- decode path, quantized weights ---------------------------------------------------- */

/* Quantizes 32 floats to int8 with scale amax/127 (round to nearest); *d gets the scale. */
AVX2_INLINE __m256i
avx2_quant_block(const float *x, float *d)
{
    const __m256 sgn = _mm256_set1_ps(-0.0f);
    __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
    __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sgn, v0), _mm256_andnot_ps(sgn, v1)),
                              _mm256_max_ps(_mm256_andnot_ps(sgn, v2), _mm256_andnot_ps(sgn, v3)));
    float amax = avx2_hmax(mx);

    *d = amax / 127.0f;
    return avx2_quant32(x, _mm256_set1_ps(amax >= 1e-30f ? 127.0f / amax : 0.0f));
}

/*
 * The quantized activations of m tokens live in one stack buffer of X86_QBUF bytes, one
 * region per token. k is cut into slices when m tokens of it do not fit (k > 16384 for one
 * token); the first slice writes y, later ones add to it.
 *
 * Q8_0 region for nb blocks: int8 q[32 nb], then float d[nb].
 */
AVX2_INLINE size_t
avx2_q8_bytes(int64_t nb)
{
    return (size_t)nb * 36;
}

static void
avx2_quant_q8(const float *x, int64_t nb, uint8_t *buf)
{
    float *d = (float *)(buf + 32 * nb);

    for (int64_t b = 0; b < nb; b++)
        _mm256_storeu_si256((__m256i *)(buf + 32 * b), avx2_quant_block(x + 32 * b, d + b));
}

/* out[r] = sum over nb blocks of row r (Q8_0) . x (a Q8_0 region), r < nr: one token. */
AVX2_INLINE void
avx2_q8_rows(int nr, const uint8_t *act, int64_t nb, const uint8_t *w, size_t rb, size_t pf,
             float *out)
{
    const __m256i ones = _mm256_set1_epi16(1);
    const float *d = (const float *)(act + 32 * nb);
    __m256 acc[4];

    avx2_zeros(nr, acc);
    for (int64_t b = 0; b < nb; b++) {
        __m256i xq = _mm256_loadu_si256((const __m256i *)(act + 32 * b));
        __m256 dx = _mm256_broadcast_ss(d + b);
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            const uint8_t *p = w + r * rb + 34 * b;
            _mm_prefetch((const char *)(p + pf), _MM_HINT_T0);
            __m256i wq = _mm256_loadu_si256((const __m256i *)(p + 2));
            __m256i pr = _mm256_maddubs_epi16(_mm256_abs_epi8(wq), _mm256_sign_epi8(xq, wq));
            __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(pr, ones));
            __m256 dw = _mm256_cvtph_ps(_mm_set1_epi16((short)avx2_u16(p)));
            acc[r] = _mm256_fmadd_ps(f, _mm256_mul_ps(dw, dx), acc[r]);
        }
    }
    avx2_hsums(nr, acc, out);
}

/* out[t] = row p (Q8_0) . x of token t (regions `stride` bytes apart), t < nt (constant, at
 * most 4): each weight block is loaded and made unsigned once for all the tokens. */
AVX2_INLINE void
avx2_q8_tile(int nt, const uint8_t *act, size_t stride, int64_t nb, const uint8_t *p, size_t pf,
             float *out)
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4];

    avx2_zeros(nt, acc);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *pb = p + 34 * b;
        _mm_prefetch((const char *)(pb + pf), _MM_HINT_T0);
        __m256i wq = _mm256_loadu_si256((const __m256i *)(pb + 2));
        __m256i wa = _mm256_abs_epi8(wq);
        __m256 dw = _mm256_cvtph_ps(_mm_set1_epi16((short)avx2_u16(pb)));
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) {
            const uint8_t *xt = act + t * stride;
            __m256i xq = _mm256_loadu_si256((const __m256i *)(xt + 32 * b));
            __m256i pr = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xq, wq));
            __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(pr, ones));
            __m256 dx = _mm256_broadcast_ss((const float *)(xt + 32 * nb) + b);
            acc[t] = _mm256_fmadd_ps(f, _mm256_mul_ps(dw, dx), acc[t]);
        }
    }
    avx2_hsums(nt, acc, out);
}

/*
 * Q4 region. Whole groups of eight blocks b0..b7 come first, 320 bytes each:
 *   bytes 0..255    int8 x, per pair (b2i, b2i+1): [b2i 0..15] [b2i+1 0..15] [b2i 16..31]
 *                   [b2i+1 16..31]
 *   bytes 256..287  float scales in the order b0 b2 b4 b6 b1 b3 b5 b7 (the order that two
 *                   rounds of vphaddd leave the eight block sums in)
 *   bytes 288..319  int32 offsets -8 * sum(q), same order
 * then the remaining blocks as 128-byte pair records:
 *   bytes 0..63    int8 x: [b 0..15] [c 0..15] [b 16..31] [c 16..31]
 *   bytes 64..95   float scales: d_b x4, d_c x4
 *   bytes 96..127  int32 offsets: -8 * sum(q_b), 0, 0, 0, -8 * sum(q_c), 0, 0, 0
 * An odd last block gets a zero partner.
 */
#define AVX2_Q4GRP 320
#define AVX2_Q4REC 128

AVX2_INLINE size_t
avx2_q4_bytes(int64_t nb)
{
    return (size_t)(nb / 8) * AVX2_Q4GRP + (size_t)((nb % 8 + 1) / 2) * AVX2_Q4REC;
}

static void
avx2_quant_q4(const float *x, int64_t nb, uint8_t *buf)
{
    static const int ord[8] = {0, 4, 1, 5, 2, 6, 3, 7};   /* slot of block i */
    int64_t b = 0;

    for (; b + 8 <= nb; b += 8, buf += AVX2_Q4GRP) {
        float *dv = (float *)(buf + 256);
        int32_t *cv = (int32_t *)(buf + 288);
        for (int i = 0; i < 8; i += 2) {
            __m256i qb = avx2_quant_block(x + 32 * (b + i), dv + ord[i]);
            __m256i qc = avx2_quant_block(x + 32 * (b + i + 1), dv + ord[i + 1]);
            _mm256_store_si256((__m256i *)(buf + 32 * i), _mm256_permute2x128_si256(qb, qc, 0x20));
            _mm256_store_si256((__m256i *)(buf + 32 * i + 32),
                               _mm256_permute2x128_si256(qb, qc, 0x31));
            cv[ord[i]] = -8 * avx2_sum_i8(qb);
            cv[ord[i + 1]] = -8 * avx2_sum_i8(qc);
        }
    }
    for (; b < nb; b += 2, buf += AVX2_Q4REC) {
        float db, dc = 0.0f;
        __m256i qb = avx2_quant_block(x + 32 * b, &db);
        __m256i qc = _mm256_setzero_si256();
        if (b + 1 < nb)
            qc = avx2_quant_block(x + 32 * (b + 1), &dc);
        _mm256_store_si256((__m256i *)buf, _mm256_permute2x128_si256(qb, qc, 0x20));
        _mm256_store_si256((__m256i *)(buf + 32), _mm256_permute2x128_si256(qb, qc, 0x31));
        _mm256_store_ps((float *)(buf + 64), _mm256_setr_ps(db, db, db, db, dc, dc, dc, dc));
        _mm256_store_si256((__m256i *)(buf + 96),
                           _mm256_setr_epi32(-8 * avx2_sum_i8(qb), 0, 0, 0,
                                             -8 * avx2_sum_i8(qc), 0, 0, 0));
    }
}

/* The nibbles of the Q4 blocks at p and p + 18 (just p when `pair` is 0): lo = elements 0..15
 * of each block side by side, hi = elements 16..31. */
AVX2_INLINE void
avx2_q4_nibbles(int pair, const uint8_t *p, __m256i *lo, __m256i *hi)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256i wq;

    if (pair)
        wq = _mm256_loadu2_m128i((const __m128i *)(p + 20), (const __m128i *)(p + 2));
    else
        wq = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(p + 2)));
    *lo = _mm256_and_si256(wq, m4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(wq, 4), m4);
}

/* Integer dot products of a block pair's nibbles with a 64-byte x record; lanes 0..3 hold
 * parts of the first block's sum, lanes 4..7 of the second's. */
AVX2_INLINE __m256i
avx2_q4_dot(__m256i lo, __m256i hi, const uint8_t *xr)
{
    __m256i x0 = _mm256_load_si256((const __m256i *)xr);
    __m256i x1 = _mm256_load_si256((const __m256i *)(xr + 32));
    __m256i pr = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));

    return _mm256_madd_epi16(pr, _mm256_set1_epi16(1));
}

/* The scales of the pair at p as [d_b x4, d_c x4] (d_c = 0 when `pair` is 0). */
AVX2_INLINE __m256
avx2_q4_scales2(int pair, const uint8_t *p)
{
    const __m128i dup = _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3);
    uint32_t h = avx2_u16(p);

    if (pair)
        h |= (uint32_t)avx2_u16(p + 18) << 16;
    return _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_cvtsi32_si128((int)h), dup));
}

/* One group of eight Q4 blocks of one row (p: block b0) against one token's group record. */
AVX2_INLINE __m256
avx2_q4_group(const uint8_t *p, const uint8_t *xg, __m256 acc)
{
    __m256i l0, h0, l1, h1, l2, h2, l3, h3;

    avx2_q4_nibbles(1, p, &l0, &h0);
    avx2_q4_nibbles(1, p + 36, &l1, &h1);
    avx2_q4_nibbles(1, p + 72, &l2, &h2);
    avx2_q4_nibbles(1, p + 108, &l3, &h3);
    __m256i s01 = _mm256_hadd_epi32(avx2_q4_dot(l0, h0, xg), avx2_q4_dot(l1, h1, xg + 64));
    __m256i s23 = _mm256_hadd_epi32(avx2_q4_dot(l2, h2, xg + 128),
                                    avx2_q4_dot(l3, h3, xg + 192));
    __m256i s = _mm256_add_epi32(_mm256_hadd_epi32(s01, s23),
                                 _mm256_load_si256((const __m256i *)(xg + 288)));
    __m256 sc = _mm256_mul_ps(avx2_scales8(p, 36, 18), _mm256_load_ps((const float *)(xg + 256)));

    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc);
}

/* One pair record (two blocks, or one when `pair` is 0) of one Q4 row into acc. */
AVX2_INLINE __m256
avx2_q4_pairstep(int pair, const uint8_t *p, const uint8_t *xr, __m256 acc)
{
    __m256i lo, hi;

    avx2_q4_nibbles(pair, p, &lo, &hi);
    __m256i di = _mm256_add_epi32(avx2_q4_dot(lo, hi, xr),
                                  _mm256_load_si256((const __m256i *)(xr + 96)));
    __m256 sc = _mm256_mul_ps(avx2_q4_scales2(pair, p), _mm256_load_ps((const float *)(xr + 64)));

    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(di), sc, acc);
}

/* out[r] = row r (Q4) . x (one token's Q4 region) for r < nr. */
AVX2_INLINE void
avx2_q4_rows(int nr, const uint8_t *act, int64_t nb, const uint8_t *w, size_t rb, size_t pf,
             float *out)
{
    __m256 acc[4];
    int64_t b = 0;

    avx2_zeros(nr, acc);
    for (; b + 8 <= nb; b += 8, act += AVX2_Q4GRP) {
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            const uint8_t *p = w + r * rb + 18 * b;
            _mm_prefetch((const char *)(p + pf), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + pf + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + pf + 128), _MM_HINT_T0);
            acc[r] = avx2_q4_group(p, act, acc[r]);
        }
    }
    for (; b < nb; b += 2, act += AVX2_Q4REC) {
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            const uint8_t *p = w + r * rb + 18 * b;
            _mm_prefetch((const char *)(p + pf), _MM_HINT_T0);
            acc[r] = b + 1 < nb ? avx2_q4_pairstep(1, p, act, acc[r])
                                : avx2_q4_pairstep(0, p, act, acc[r]);
        }
    }
    avx2_hsums(nr, acc, out);
}

/* out[t] = row p (Q4) . x of token t (regions `stride` bytes apart), t < nt (constant, at most
 * 4): the nibbles and scales of each block are unpacked once for all the tokens. */
AVX2_INLINE void
avx2_q4_tile(int nt, const uint8_t *act, size_t stride, int64_t nb, const uint8_t *p, size_t pf,
             float *out)
{
    __m256 acc[4];
    int64_t b = 0;

    avx2_zeros(nt, acc);
    for (; b + 8 <= nb; b += 8, act += AVX2_Q4GRP) {
        const uint8_t *pg = p + 18 * b;
        __m256i l0, h0, l1, h1, s01[4];
        _mm_prefetch((const char *)(pg + pf), _MM_HINT_T0);
        _mm_prefetch((const char *)(pg + pf + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(pg + pf + 128), _MM_HINT_T0);
        __m256 dw = avx2_scales8(pg, 36, 18);
        avx2_q4_nibbles(1, pg, &l0, &h0);
        avx2_q4_nibbles(1, pg + 36, &l1, &h1);
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) {
            const uint8_t *xg = act + t * stride;
            s01[t] = _mm256_hadd_epi32(avx2_q4_dot(l0, h0, xg), avx2_q4_dot(l1, h1, xg + 64));
        }
        avx2_q4_nibbles(1, pg + 72, &l0, &h0);
        avx2_q4_nibbles(1, pg + 108, &l1, &h1);
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) {
            const uint8_t *xg = act + t * stride;
            __m256i s23 = _mm256_hadd_epi32(avx2_q4_dot(l0, h0, xg + 128),
                                            avx2_q4_dot(l1, h1, xg + 192));
            __m256i s = _mm256_add_epi32(_mm256_hadd_epi32(s01[t], s23),
                                         _mm256_load_si256((const __m256i *)(xg + 288)));
            __m256 sc = _mm256_mul_ps(dw, _mm256_load_ps((const float *)(xg + 256)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[t]);
        }
    }
    for (; b < nb; b += 2, act += AVX2_Q4REC) {
        int pair = b + 1 < nb;
        const uint8_t *pb = p + 18 * b;
        __m256i lo, hi;
        _mm_prefetch((const char *)(pb + pf), _MM_HINT_T0);
        avx2_q4_nibbles(pair, pb, &lo, &hi);
        __m256 dw = avx2_q4_scales2(pair, pb);
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) {
            const uint8_t *xr = act + t * stride;
            __m256i di = _mm256_add_epi32(avx2_q4_dot(lo, hi, xr),
                                          _mm256_load_si256((const __m256i *)(xr + 96)));
            __m256 sc = _mm256_mul_ps(dw, _mm256_load_ps((const float *)(xr + 64)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(di), sc, acc[t]);
        }
    }
    avx2_hsums(nt, acc, out);
}

/* One token's step of the tile: c0..c2 += w0..w2 * x[0] (inlined, the accumulators stay in
 * registers). */
AVX2_INLINE void
avx2_fma3(const float *x, __m256 w0, __m256 w1, __m256 w2, __m256 *c0, __m256 *c1, __m256 *c2)
{
    __m256 b = _mm256_broadcast_ss(x);

    *c0 = _mm256_fmadd_ps(w0, b, *c0);
    *c1 = _mm256_fmadd_ps(w1, b, *c1);
    *c2 = _mm256_fmadd_ps(w2, b, *c2);
}

/*
 * The register tile: y[t][i] (+)= sum_j x[t][j] * panel[j][i] for t < 4, i < 24. Only t < nt
 * and i < nr are stored; rows of x past nt must still be readable (callers repeat the last).
 * The twelve accumulators are named, not an array c[4][3] run by loops as in avx512.c: GCC
 * keeps such an array on the stack here (it is indexed by the variable t when stored), and
 * the hot loop then spills every accumulator.
 */
static void
avx2_tile4(const float *pk, const float *x0, const float *x1, const float *x2, const float *x3,
           int64_t kc, float *y, int64_t ldy, int nr, int nt, int add)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
    __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;

#pragma GCC unroll 2
    for (int64_t j = 0; j < kc; j++) {
        const float *p = pk + j * X86_NR;
        __m256 w0 = _mm256_load_ps(p), w1 = _mm256_load_ps(p + 8), w2 = _mm256_load_ps(p + 16);
        avx2_fma3(x0 + j, w0, w1, w2, &c00, &c01, &c02);
        avx2_fma3(x1 + j, w0, w1, w2, &c10, &c11, &c12);
        avx2_fma3(x2 + j, w0, w1, w2, &c20, &c21, &c22);
        avx2_fma3(x3 + j, w0, w1, w2, &c30, &c31, &c32);
    }

    __m256 c[X86_TM][3] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
    for (int t = 0; t < nt; t++) {
        float *yt = y + t * ldy;
        if (nr == X86_NR) {
            for (int v = 0; v < 3; v++) {
                __m256 s = c[t][v];
                if (add)
                    s = _mm256_add_ps(s, _mm256_loadu_ps(yt + 8 * v));
                _mm256_storeu_ps(yt + 8 * v, s);
            }
        } else {
            float tmp[X86_NR];
            for (int v = 0; v < 3; v++)
                _mm256_storeu_ps(tmp + 8 * v, c[t][v]);
            for (int i = 0; i < nr; i++)
                yt[i] = add ? yt[i] + tmp[i] : tmp[i];
        }
    }
}

AVX2_INLINE void
avx2_tile(const float *pk, const float *const *xt, int64_t kc, float *y, int64_t ldy, int nr,
          int nt, int add)
{
    avx2_tile4(pk, xt[0], xt[1], xt[2], xt[3], kc, y, ldy, nr, nt, add);
}

#include "gemm.h"

/* ==== exp and the decay-weighted dot product ============================================= */

/* exp(x) for x <= 0, 8 lanes: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two parts for
 * accuracy), e^r by a degree-6 polynomial (the classic Cephes expf coefficients), 2^n
 * through the exponent bits. Inputs below -87 are clamped so 2^n stays a normal number;
 * e^-87 is 1.6e-38, far below anything that matters next to the terms it is added to.
 * About 2 ulp. */
static inline __m256
avx2_exp_neg(__m256 x)
{
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                   _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static float
avx2_dot_decay(const float *a, const float *b, const float *ga, const float *gb, int64_t n)
{
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    float s;

    for (; i + 8 <= n; i += 8) {
        __m256 e = avx2_exp_neg(_mm256_sub_ps(_mm256_loadu_ps(ga + i), _mm256_loadu_ps(gb + i)));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)), e,
                              acc);
    }
    s = avx2_hsum(acc);
    if (i < n) {
        __m256 e = avx2_exp_neg(_mm256_sub_ps(avx2_load_tail(ga + i, n - i),
                                              avx2_load_tail(gb + i, n - i)));
        s += avx2_hsum(_mm256_mul_ps(_mm256_mul_ps(avx2_load_tail(a + i, n - i),
                                                   avx2_load_tail(b + i, n - i)), e));
    }
    return s;
}

SIMD_MUL_DECAY(avx2_mul_decay, __m256, 8, avx2_exp_neg, _mm256_loadu_ps, _mm256_storeu_ps,
               _mm256_mul_ps, _mm256_sub_ps, avx2_load_tail, avx2_store_tail)

/* gemm_nn: register tiles of 4 rows x 16 columns (8 accumulators); rows past m repeat the last
 * row and are not stored, columns past n are masked. */
static void
avx2_gemm_nn(float *y, int64_t ldy, const float *x, int64_t ldx, const float *B, int64_t ldb,
             int64_t m, int64_t n, int64_t k, float alpha, int acc)
{
    const __m256 va = _mm256_set1_ps(alpha);

    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        int64_t c0 = n - j0, c1 = n - j0 - 8;
        __m256i mk0 = avx2_tailmask(c0 >= 8 ? 8 : c0), mk1 = avx2_tailmask(c1 <= 0 ? 0 : c1 >= 8 ? 8 : c1);
        for (int64_t i0 = 0; i0 < m; i0 += 4) {
            const float *xr[4];
            __m256 c[4][2];
            for (int i = 0; i < 4; i++)
                xr[i] = x + (i0 + i < m ? i0 + i : m - 1) * ldx;
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
                c[i][0] = c[i][1] = _mm256_setzero_ps();
            for (int64_t l = 0; l < k; l++) {
                const float *b = B + l * ldb + j0;
                __m256 b0 = _mm256_maskload_ps(b, mk0), b1 = _mm256_maskload_ps(b + 8, mk1);
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    __m256 a = _mm256_broadcast_ss(xr[i] + l);
                    c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
                    c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
                }
            }
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                if (i0 + i >= m)
                    break;
                float *yr = y + (i0 + i) * ldy + j0;
                __m256 s0 = _mm256_mul_ps(va, c[i][0]), s1 = _mm256_mul_ps(va, c[i][1]);
                if (acc) {
                    s0 = _mm256_add_ps(s0, _mm256_maskload_ps(yr, mk0));
                    s1 = _mm256_add_ps(s1, _mm256_maskload_ps(yr + 8, mk1));
                }
                _mm256_maskstore_ps(yr, mk0, s0);
                _mm256_maskstore_ps(yr + 8, mk1, s1);
            }
        }
    }
}

/* silu(x) = x sigmoid(x), sigmoid from e = exp(-|x|) as in avx512.c. */
AVX2_INLINE __m256
avx2_silu8(__m256 x)
{
    __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    /* past -80 the result is below 1e-33: zero, and no denormal ever enters the arithmetic */
    __m256 e = avx2_exp_neg(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), ax),
                                          _mm256_set1_ps(-80.0f)));
    __m256 r = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    r = _mm256_blendv_ps(r, _mm256_mul_ps(r, e), neg);
    r = _mm256_and_ps(r, _mm256_cmp_ps(x, _mm256_set1_ps(-80.0f), _CMP_GE_OQ));
    return _mm256_mul_ps(x, r);
}

SIMD_SILU(avx2_silu, __m256, 8, avx2_silu8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_mul_ps,
          avx2_load_tail, avx2_store_tail)

static const struct k_kernels avx2_table = X86_TABLE("avx2");

const struct k_kernels *
kernels_avx2(void)
{
    const struct k_cpu_features *f = k_cpu_features();

    if (!f->avx2 || !f->fma || !f->f16c)
        return NULL;
    return &avx2_table;
}
