/*
 * avx2.c - kernels for x86-64 CPUs with AVX2, FMA and F16C (Haswell, Zen and later).
 *
 * Compiled with -mavx2 -mfma -mf16c only; kli_kernels_avx2() hands the table out only when the
 * CPU and OS support all three.
 *
 * matmul takes one of two paths, chosen by the number of token rows m:
 *
 *  - m < AVX2_MPACK (decode): W is streamed once, four rows at a time, and each group of rows
 *    is dotted with every x row while it is in L1/L2. Float weights are widened in registers
 *    (F16 by vcvtph2ps, BF16 by a 16-bit shift). Q8_0 and Q4 weights are never widened: x is
 *    quantized per 32-block to int8 (scale amax/127) into a stack buffer and the block dot
 *    products are integer (vpmaddubsw + vpmaddwd), then scaled by d_w * d_x in float.
 *      Q8_0: maddubs(|x|, sign(w, x)) keeps the unsigned operand on the activation side.
 *      Q4:   maddubs(nibble, x) on the unsigned nibbles, and the -8 offset is added back as
 *            -8 * sum(x_q) per block. Two blocks share one 256-bit step: x is stored
 *            pre-shuffled as [lo16(b) lo16(b+1) hi16(b) hi16(b+1)] so the nibbles of two
 *            blocks, loaded side by side, need one shift and two masks.
 *  - m >= AVX2_MPACK (prefill, batched decode): a blocked GEMM. A chunk of AVX2_NC rows x
 *    AVX2_KC columns of W is converted to float once and packed into panels of 24 rows
 *    (column-major within a panel), then a 4-token x 24-row register tile (12 accumulators)
 *    runs over it with broadcast activations; W is read from memory once per call and the
 *    conversion cost is shared by all m tokens.
 */
#include "config.h"

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define AVX2_INLINE static inline __attribute__((always_inline))

#define AVX2_MPACK 4        /* m from which matmul packs W and runs the GEMM tile */
#define AVX2_MT (AVX2_MPACK - 1)
#define AVX2_KQ 8192        /* activations quantized per slice of k (int paths) */
#define AVX2_KC 256         /* GEMM: columns of W per packed chunk */
#define AVX2_NR 24          /* GEMM: rows per panel (three vectors) */
#define AVX2_NC 96          /* GEMM: rows per packed chunk */
#define AVX2_TM 4           /* GEMM: tokens per tile */

/* ---- small helpers -------------------------------------------------------------------- */

AVX2_INLINE float
avx2_hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));

    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* A mask of the first r (0..8) int32 lanes, for maskload/maskstore tails. */
AVX2_INLINE __m256i
avx2_tailmask(int64_t r)
{
    static const int32_t bits[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

    return _mm256_loadu_si256((const __m256i *)(bits + 8 - r));
}

AVX2_INLINE uint16_t
avx2_u16(const uint8_t *p)
{
    uint16_t h;

    memcpy(&h, p, 2);
    return h;
}

AVX2_INLINE float
avx2_f16(const uint8_t *p)
{
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(avx2_u16(p))));
}

/* Eight weights from element j of a float-type row (F32, F16 or BF16), widened. */
AVX2_INLINE __m256
avx2_load8(enum kli_dtype dt, const uint8_t *row, int64_t j)
{
    if (dt == KLI_DT_F32)
        return _mm256_loadu_ps((const float *)row + j);
    __m128i h = _mm_loadu_si128((const __m128i *)(row + 2 * j));
    if (dt == KLI_DT_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AVX2_INLINE float
avx2_load1(enum kli_dtype dt, const uint8_t *row, int64_t j)
{
    if (dt == KLI_DT_F32) {
        float f;
        memcpy(&f, row + 4 * j, 4);
        return f;
    }
    if (dt == KLI_DT_F16)
        return avx2_f16(row + 2 * j);
    return kli_bf16_to_f32(avx2_u16(row + 2 * j));
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
        __m256 v = _mm256_fmadd_ps(va, _mm256_maskload_ps(x + i, mk), _mm256_maskload_ps(y + i, mk));
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
avx2_to_f32(enum kli_dtype dt, const void *src, float *dst, int64_t n)
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
        kli_dtype_to_f32(dt, src, dst, n);
        return;
    }
}

/* Writes zeros to y[i][r], i < m, r < n (the k == 0 product). */
static void
avx2_zero_y(float *y, int64_t ldy, int64_t n, int64_t m)
{
    for (int64_t i = 0; i < m; i++)
        memset(y + i * ldy, 0, (size_t)n * sizeof(float));
}

/* ---- decode path, float weights ------------------------------------------------------- */

/* out[r] = dot(x, row r), r < nr (a constant 4 or 1 after inlining); rows rb bytes apart. */
AVX2_INLINE void
avx2_dot_rows(enum kli_dtype dt, int nr, const float *x, const uint8_t *w, size_t rb,
              int64_t k, float *out)
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
    for (int r = 0; r < nr; r++) {
        float s = avx2_hsum(_mm256_add_ps(a0[r], a1[r]));
        for (int64_t jj = j; jj < k; jj++)
            s += x[jj] * avx2_load1(dt, w + r * rb, jj);
        out[r] = s;
    }
}

AVX2_INLINE void
avx2_stream_float(enum kli_dtype dt, float *y, int64_t ldy, const float *x, int64_t ldx,
                  const uint8_t *w, int64_t n, int64_t k, int64_t m)
{
    size_t rb = (size_t)k * (dt == KLI_DT_F32 ? 4 : 2);
    float out[4];
    int64_t r = 0;

    for (; r + 4 <= n; r += 4) {
        for (int64_t t = 0; t < m; t++) {
            avx2_dot_rows(dt, 4, x + t * ldx, w + r * rb, rb, k, out);
            memcpy(y + t * ldy + r, out, sizeof(out));
        }
    }
    for (; r < n; r++) {
        for (int64_t t = 0; t < m; t++) {
            avx2_dot_rows(dt, 1, x + t * ldx, w + r * rb, rb, k, out);
            y[t * ldy + r] = out[0];
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
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));

    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float amax = _mm_cvtss_f32(m4);
    __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    *d = amax / 127.0f;
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
    __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    return _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* Q8_0 activations: q[32 * b + j] and d[b] for nb blocks. */
static void
avx2_quant_q8(const float *x, int64_t nb, int8_t *q, float *d)
{
    for (int64_t b = 0; b < nb; b++)
        _mm256_storeu_si256((__m256i *)(q + 32 * b), avx2_quant_block(x + 32 * b, d + b));
}

/* out[r] = sum over nb blocks of row r (Q8_0) . (q, d), r < nr. */
AVX2_INLINE void
avx2_q8_rows(int nr, const int8_t *q, const float *d, int64_t nb, const uint8_t *w, size_t rb,
             float *out)
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4];

#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
        acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i xq = _mm256_loadu_si256((const __m256i *)(q + 32 * b));
        __m256i xa = _mm256_abs_epi8(xq);
        __m256 dx = _mm256_broadcast_ss(d + b);
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            const uint8_t *p = w + r * rb + 34 * b;
            __m256i wq = _mm256_loadu_si256((const __m256i *)(p + 2));
            __m256i pr = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(wq, xq));
            __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(pr, ones));
            __m256 dw = _mm256_cvtph_ps(_mm_set1_epi16((short)avx2_u16(p)));
            acc[r] = _mm256_fmadd_ps(f, _mm256_mul_ps(dw, dx), acc[r]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
        out[r] = avx2_hsum(acc[r]);
}

/*
 * Q4 activations, two blocks (b, c = b + 1) per 128-byte record:
 *   bytes 0..63    int8 x: [b 0..15] [c 0..15] [b 16..31] [c 16..31]
 *   bytes 64..95   float scales: d_b x4, d_c x4
 *   bytes 96..127  int32 offsets: -8 * sum(q_b), 0, 0, 0, -8 * sum(q_c), 0, 0, 0
 * An odd last block gets a zero partner.
 */
#define AVX2_Q4REC 128

static void
avx2_quant_q4(const float *x, int64_t nb, uint8_t *buf)
{
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);

    for (int64_t b = 0; b < nb; b += 2, buf += AVX2_Q4REC) {
        float db, dc = 0.0f;
        __m256i qb = avx2_quant_block(x + 32 * b, &db);
        __m256i qc = _mm256_setzero_si256();
        if (b + 1 < nb)
            qc = avx2_quant_block(x + 32 * (b + 1), &dc);
        _mm256_store_si256((__m256i *)buf, _mm256_permute2x128_si256(qb, qc, 0x20));
        _mm256_store_si256((__m256i *)(buf + 32), _mm256_permute2x128_si256(qb, qc, 0x31));
        __m256 dv = _mm256_setr_ps(db, db, db, db, dc, dc, dc, dc);
        _mm256_store_ps((float *)(buf + 64), dv);
        /* per-128-bit-half sums of q_b and q_c */
        __m256i sb = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, qb), ones16);
        __m256i sc = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, qc), ones16);
        __m128i s = _mm_hadd_epi32(_mm_add_epi32(_mm256_castsi256_si128(sb),
                                                 _mm256_extracti128_si256(sb, 1)),
                                   _mm_add_epi32(_mm256_castsi256_si128(sc),
                                                 _mm256_extracti128_si256(sc, 1)));
        s = _mm_hadd_epi32(s, s);   /* sum(q_b), sum(q_c), ... */
        int32_t tb = -8 * _mm_cvtsi128_si32(s), tc = -8 * _mm_extract_epi32(s, 1);
        _mm256_store_si256((__m256i *)(buf + 96), _mm256_setr_epi32(tb, 0, 0, 0, tc, 0, 0, 0));
    }
}

/* One record (two blocks, or one when `pair` is 0) of one Q4 row into acc. */
AVX2_INLINE __m256
avx2_q4_step(int pair, const uint8_t *p, __m256i x0, __m256i x1, __m256 dx, __m256i corr,
             __m256 acc)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m128i dup = _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3);
    __m256i wq;
    uint32_t h = avx2_u16(p);

    if (pair) {
        wq = _mm256_loadu2_m128i((const __m128i *)(p + 20), (const __m128i *)(p + 2));
        h |= (uint32_t)avx2_u16(p + 18) << 16;
    } else {
        wq = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(p + 2)));
    }
    __m256i lo = _mm256_and_si256(wq, m4);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wq, 4), m4);
    __m256i pr = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));
    __m256i di = _mm256_add_epi32(_mm256_madd_epi16(pr, ones), corr);
    __m256 dw = _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_cvtsi32_si128((int)h), dup));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(di), _mm256_mul_ps(dw, dx), acc);
}

AVX2_INLINE void
avx2_q4_rows(int nr, const uint8_t *act, int64_t nb, const uint8_t *w, size_t rb, float *out)
{
    __m256 acc[4];
    int64_t b = 0;

#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
        acc[r] = _mm256_setzero_ps();
    for (; b + 2 <= nb; b += 2, act += AVX2_Q4REC) {
        __m256i x0 = _mm256_load_si256((const __m256i *)act);
        __m256i x1 = _mm256_load_si256((const __m256i *)(act + 32));
        __m256 dx = _mm256_load_ps((const float *)(act + 64));
        __m256i corr = _mm256_load_si256((const __m256i *)(act + 96));
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++)
            acc[r] = avx2_q4_step(1, w + r * rb + 18 * b, x0, x1, dx, corr, acc[r]);
    }
    if (b < nb) {
        __m256i x0 = _mm256_load_si256((const __m256i *)act);
        __m256i x1 = _mm256_load_si256((const __m256i *)(act + 32));
        __m256 dx = _mm256_load_ps((const float *)(act + 64));
        __m256i corr = _mm256_load_si256((const __m256i *)(act + 96));
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++)
            acc[r] = avx2_q4_step(0, w + r * rb + 18 * b, x0, x1, dx, corr, acc[r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
        out[r] = avx2_hsum(acc[r]);
}

/* Stores a slice's partial products: the first slice writes, later ones add. */
AVX2_INLINE void
avx2_put(float *y, const float *v, int nr, int add)
{
    for (int i = 0; i < nr; i++)
        y[i] = add ? y[i] + v[i] : v[i];
}

static void
avx2_stream_q8(float *y, int64_t ldy, const float *x, int64_t ldx, const uint8_t *w,
               int64_t n, int64_t k, int64_t m)
{
    int8_t q[AVX2_MT][AVX2_KQ] __attribute__((aligned(32)));
    float d[AVX2_MT][AVX2_KQ / 32];
    size_t rb = (size_t)(k / 32) * 34;
    float out[4];

    for (int64_t k0 = 0; k0 < k; k0 += AVX2_KQ) {
        int64_t nb = (k - k0 < AVX2_KQ ? k - k0 : AVX2_KQ) / 32;
        const uint8_t *wk = w + (k0 / 32) * 34;
        int64_t r = 0;
        for (int64_t t = 0; t < m; t++)
            avx2_quant_q8(x + t * ldx + k0, nb, q[t], d[t]);
        for (; r + 4 <= n; r += 4) {
            for (int64_t t = 0; t < m; t++) {
                avx2_q8_rows(4, q[t], d[t], nb, wk + r * rb, rb, out);
                avx2_put(y + t * ldy + r, out, 4, k0 > 0);
            }
        }
        for (; r < n; r++) {
            for (int64_t t = 0; t < m; t++) {
                avx2_q8_rows(1, q[t], d[t], nb, wk + r * rb, rb, out);
                avx2_put(y + t * ldy + r, out, 1, k0 > 0);
            }
        }
    }
}

static void
avx2_stream_q4(float *y, int64_t ldy, const float *x, int64_t ldx, const uint8_t *w,
               int64_t n, int64_t k, int64_t m)
{
    uint8_t act[AVX2_MT][AVX2_KQ / 64 * AVX2_Q4REC] __attribute__((aligned(32)));
    size_t rb = (size_t)(k / 32) * 18;
    float out[4];

    for (int64_t k0 = 0; k0 < k; k0 += AVX2_KQ) {
        int64_t nb = (k - k0 < AVX2_KQ ? k - k0 : AVX2_KQ) / 32;
        const uint8_t *wk = w + (k0 / 32) * 18;
        int64_t r = 0;
        for (int64_t t = 0; t < m; t++)
            avx2_quant_q4(x + t * ldx + k0, nb, act[t]);
        for (; r + 4 <= n; r += 4) {
            for (int64_t t = 0; t < m; t++) {
                avx2_q4_rows(4, act[t], nb, wk + r * rb, rb, out);
                avx2_put(y + t * ldy + r, out, 4, k0 > 0);
            }
        }
        for (; r < n; r++) {
            for (int64_t t = 0; t < m; t++) {
                avx2_q4_rows(1, act[t], nb, wk + r * rb, rb, out);
                avx2_put(y + t * ldy + r, out, 1, k0 > 0);
            }
        }
    }
}

/* ---- prefill path: packed GEMM ----------------------------------------------------------- */

/* Transposes the 8x8 block src[i * ss + j] into dst[j * ds + i]. */
AVX2_INLINE void
avx2_transpose8(const float *src, int64_t ss, float *dst, int64_t ds)
{
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ss);
    __m256 r2 = _mm256_loadu_ps(src + 2 * ss), r3 = _mm256_loadu_ps(src + 3 * ss);
    __m256 r4 = _mm256_loadu_ps(src + 4 * ss), r5 = _mm256_loadu_ps(src + 5 * ss);
    __m256 r6 = _mm256_loadu_ps(src + 6 * ss), r7 = _mm256_loadu_ps(src + 7 * ss);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);

    _mm256_store_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_store_ps(dst + ds, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_store_ps(dst + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_store_ps(dst + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_store_ps(dst + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_store_ps(dst + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_store_ps(dst + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_store_ps(dst + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
}

/*
 * Converts rows [0, nc) x columns [0, kc) of W (w points at row 0, column k0) into panels of
 * AVX2_NR rows: element (row p * NR + i, column j) at pk[p * NR * kcp + j * NR + i], with kcp
 * = kc rounded up to 8. Rows past nc, up to the panel's end, and columns past kc are zero.
 */
static void
avx2_pack(enum kli_dtype dt, float *pk, const uint8_t *w, size_t rb, int64_t nc, int64_t kc)
{
    float tmp[8 * AVX2_KC] __attribute__((aligned(32)));
    int64_t kcp = (kc + 7) & ~(int64_t)7;
    int64_t ncp = (nc + AVX2_NR - 1) / AVX2_NR * AVX2_NR;

    for (int64_t g = 0; g < ncp; g += 8) {
        for (int64_t i = 0; i < 8; i++) {
            float *t = tmp + i * AVX2_KC;
            if (g + i < nc) {
                avx2_to_f32(dt, w + (g + i) * rb, t, kc);
                memset(t + kc, 0, (size_t)(kcp - kc) * sizeof(float));
            } else {
                memset(t, 0, (size_t)kcp * sizeof(float));
            }
        }
        float *dst = pk + (g / AVX2_NR) * AVX2_NR * kcp + g % AVX2_NR;
        for (int64_t j = 0; j < kcp; j += 8)
            avx2_transpose8(tmp + j, AVX2_KC, dst + j * AVX2_NR, AVX2_NR);
    }
}

/*
 * The register tile: y[t][i] (+)= sum_j x[t][j] * panel[j][i] for t < 4, i < 24. Only t < nt
 * and i < nr are stored; rows of x past nt must still be readable (callers repeat the last).
 */
static void
avx2_tile(const float *pk, const float *x0, const float *x1, const float *x2, const float *x3,
          int64_t kc, float *y, int64_t ldy, int nr, int nt, int add)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
    __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;

#pragma GCC unroll 2
    for (int64_t j = 0; j < kc; j++) {
        const float *p = pk + j * AVX2_NR;
        __m256 w0 = _mm256_load_ps(p), w1 = _mm256_load_ps(p + 8), w2 = _mm256_load_ps(p + 16);
        __m256 b = _mm256_broadcast_ss(x0 + j);
        c00 = _mm256_fmadd_ps(w0, b, c00);
        c01 = _mm256_fmadd_ps(w1, b, c01);
        c02 = _mm256_fmadd_ps(w2, b, c02);
        b = _mm256_broadcast_ss(x1 + j);
        c10 = _mm256_fmadd_ps(w0, b, c10);
        c11 = _mm256_fmadd_ps(w1, b, c11);
        c12 = _mm256_fmadd_ps(w2, b, c12);
        b = _mm256_broadcast_ss(x2 + j);
        c20 = _mm256_fmadd_ps(w0, b, c20);
        c21 = _mm256_fmadd_ps(w1, b, c21);
        c22 = _mm256_fmadd_ps(w2, b, c22);
        b = _mm256_broadcast_ss(x3 + j);
        c30 = _mm256_fmadd_ps(w0, b, c30);
        c31 = _mm256_fmadd_ps(w1, b, c31);
        c32 = _mm256_fmadd_ps(w2, b, c32);
    }

    __m256 c[AVX2_TM][3] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
    for (int t = 0; t < nt; t++) {
        float *yt = y + t * ldy;
        if (nr == AVX2_NR) {
            for (int v = 0; v < 3; v++) {
                __m256 s = c[t][v];
                if (add)
                    s = _mm256_add_ps(s, _mm256_loadu_ps(yt + 8 * v));
                _mm256_storeu_ps(yt + 8 * v, s);
            }
        } else {
            float tmp[AVX2_NR];
            for (int v = 0; v < 3; v++)
                _mm256_storeu_ps(tmp + 8 * v, c[t][v]);
            avx2_put(yt, tmp, nr, add);
        }
    }
}

static void
avx2_gemm(enum kli_dtype dt, float *y, int64_t ldy, const float *x, int64_t ldx,
          const uint8_t *w, int64_t n, int64_t k, int64_t m)
{
    float pk[AVX2_NC * AVX2_KC] __attribute__((aligned(32)));
    size_t rb = (size_t)kli_dtype_nbytes(dt, (uint64_t)k);

    for (int64_t r0 = 0; r0 < n; r0 += AVX2_NC) {
        int64_t nc = n - r0 < AVX2_NC ? n - r0 : AVX2_NC;
        for (int64_t k0 = 0; k0 < k; k0 += AVX2_KC) {
            int64_t kc = k - k0 < AVX2_KC ? k - k0 : AVX2_KC;
            int64_t kcp = (kc + 7) & ~(int64_t)7;
            avx2_pack(dt, pk, w + r0 * rb + kli_dtype_nbytes(dt, (uint64_t)k0), rb, nc, kc);
            for (int64_t t0 = 0; t0 < m; t0 += AVX2_TM) {
                int nt = m - t0 < AVX2_TM ? (int)(m - t0) : AVX2_TM;
                const float *xt[AVX2_TM];
                for (int t = 0; t < AVX2_TM; t++)
                    xt[t] = x + (t0 + (t < nt ? t : nt - 1)) * ldx + k0;
                for (int64_t p0 = 0; p0 < nc; p0 += AVX2_NR) {
                    int nr = nc - p0 < AVX2_NR ? (int)(nc - p0) : AVX2_NR;
                    avx2_tile(pk + p0 * kcp, xt[0], xt[1], xt[2], xt[3], kc,
                              y + t0 * ldy + r0 + p0, ldy, nr, nt, k0 > 0);
                }
            }
        }
    }
}

/* ---- the table ----------------------------------------------------------------------------- */

static void
avx2_matmul_f32(float *y, int64_t ldy, const float *x, int64_t ldx, const void *w, int64_t n,
                int64_t k, int64_t m)
{
    if (k == 0)
        avx2_zero_y(y, ldy, n, m);
    else if (m >= AVX2_MPACK)
        avx2_gemm(KLI_DT_F32, y, ldy, x, ldx, w, n, k, m);
    else
        avx2_stream_float(KLI_DT_F32, y, ldy, x, ldx, w, n, k, m);
}

static void
avx2_matmul_f16(float *y, int64_t ldy, const float *x, int64_t ldx, const void *w, int64_t n,
                int64_t k, int64_t m)
{
    if (k == 0)
        avx2_zero_y(y, ldy, n, m);
    else if (m >= AVX2_MPACK)
        avx2_gemm(KLI_DT_F16, y, ldy, x, ldx, w, n, k, m);
    else
        avx2_stream_float(KLI_DT_F16, y, ldy, x, ldx, w, n, k, m);
}

static void
avx2_matmul_bf16(float *y, int64_t ldy, const float *x, int64_t ldx, const void *w, int64_t n,
                 int64_t k, int64_t m)
{
    if (k == 0)
        avx2_zero_y(y, ldy, n, m);
    else if (m >= AVX2_MPACK)
        avx2_gemm(KLI_DT_BF16, y, ldy, x, ldx, w, n, k, m);
    else
        avx2_stream_float(KLI_DT_BF16, y, ldy, x, ldx, w, n, k, m);
}

static void
avx2_matmul_q8_0(float *y, int64_t ldy, const float *x, int64_t ldx, const void *w, int64_t n,
                 int64_t k, int64_t m)
{
    if (k == 0)
        avx2_zero_y(y, ldy, n, m);
    else if (m >= AVX2_MPACK)
        avx2_gemm(KLI_DT_Q8_0, y, ldy, x, ldx, w, n, k, m);
    else
        avx2_stream_q8(y, ldy, x, ldx, w, n, k, m);
}

static void
avx2_matmul_q4(float *y, int64_t ldy, const float *x, int64_t ldx, const void *w, int64_t n,
               int64_t k, int64_t m)
{
    if (k == 0)
        avx2_zero_y(y, ldy, n, m);
    else if (m >= AVX2_MPACK)
        avx2_gemm(KLI_DT_Q4, y, ldy, x, ldx, w, n, k, m);
    else
        avx2_stream_q4(y, ldy, x, ldx, w, n, k, m);
}

static const struct kli_kernels avx2_table = {
    .name = "avx2",
    .matmul = {
        [KLI_DT_F32] = avx2_matmul_f32,
        [KLI_DT_F16] = avx2_matmul_f16,
        [KLI_DT_BF16] = avx2_matmul_bf16,
        [KLI_DT_Q8_0] = avx2_matmul_q8_0,
        [KLI_DT_Q4] = avx2_matmul_q4,
    },
    .dot = avx2_dot,
    .axpy = avx2_axpy,
    .scale = avx2_scale,
    .to_f32 = avx2_to_f32,
};

const struct kli_kernels *
kli_kernels_avx2(void)
{
    const struct kli_cpu_features *f = kli_cpu_features();

    if (!f->avx2 || !f->fma || !f->f16c)
        return NULL;
    return &avx2_table;
}
