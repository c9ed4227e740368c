/*
 * avx512.c - kernels for x86-64 CPUs with AVX-512 F, BW, VL and DQ (Skylake-SP, Ice Lake,
 * Sapphire Rapids, Zen 4 and later).
 *
 * Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c; kernels_avx512()
 * hands the table out only when the CPU and OS support F, BW, VL and DQ.
 *
 * The structure follows avx2.c, with 512-bit registers where they pay:
 *
 *  - m < avx512_mpack[dt] (decode, batched decode): W is streamed once, a few rows at a time,
 *    with the next rows prefetched, and each group of rows is dotted with every x row while it
 *    is in L1 (register tiles of up to 4 tokens). Float weights are widened in registers, 16
 *    per step, and k tails are masked loads. Q8_0 and Q4 keep W in int8/nibbles: x is
 *    quantized per 32-block to int8 (scale amax/127) into a stack buffer, block sums are
 *    integer (vpmaddubsw + vpmaddwd) and are scaled in float. Blocks go eight at a time: the
 *    eight f16 scales of a row are converted together and multiplied by the eight x scales
 *    once, and each 512-bit step takes its per-lane scales from that vector with one vpermps.
 *      Q8_0: two blocks per step, maddubs(|w|, x negated where w < 0) (a mask subtract).
 *      Q4:   four blocks per step, x stored as [lo16(b0..b3)] [hi16(b0..b3)] so one shift and
 *            two masks unpack the nibbles; the -8 offset goes in as -8 sum(q_x) d_x per block,
 *            one FMA per eight blocks. Fewer than eight trailing blocks take 256-bit steps.
 *  - m >= avx512_mpack[dt] (prefill): the blocked GEMM of avx2.c with panels of 48 rows and
 *    an 8-token x 48-row register tile (24 accumulators of the 32 registers).
 *
 * The loops around these kernels (streaming, slicing k, packing, driving the tiles) are
 * gemm.h's, shared with avx2.c, as are avx2.h's 256-bit helpers and packer.
 *
 * The file is compiled twice: as "avx512", and with KLI_VNNI and -mavx512vnni as "avx512vnni"
 * (Ice Lake, Sapphire Rapids, Zen 4), where one vpdpbusd replaces each vpmaddubsw + vpmaddwd
 * pair of the integer dot products (avx512_dot_u8). Both give the same integers (no int16
 * pair can saturate, see there), so the two tables' results are bit-identical. AVX512_BF16's
 * vdpbf16ps is not used: it needs the activations rounded to bf16, and kli keeps them float32.
 */
#include "config.h"

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define AVX512_INLINE static inline __attribute__((always_inline))

#ifdef KLI_VNNI
#define AVX512_NAME "avx512vnni"
#define kernels_avx512 kernels_avx512vnni
#else
#define AVX512_NAME "avx512"
#endif

#define X86(name) avx512_##name
#define X86_KC 256          /* GEMM: columns of W per packed chunk */
#define X86_NR 48           /* GEMM: rows per panel (three vectors) */
#define X86_NC 96           /* GEMM: rows per packed chunk */
#define X86_TM 8            /* GEMM: tokens per tile */
#define X86_DTM 8           /* decode: tokens per tile (then 4, then fewer) */
#define X86_QBUF 65536      /* decode: bytes of quantized activations (see avx512_q8_bytes) */
#define X86_ALIGN 64

#include "avx2.h"

/* m from which matmul packs W and runs the GEMM tile instead of streaming W through the
 * multi-token decode tiles: measured crossovers (k = n = 2304, one Sapphire Rapids core). The
 * quantized limits must keep m * 320 bytes <= X86_QBUF. The K types': one Zen 5 core
 * (contrib/bench/bench-kernels.c), where their tiles ran 166-170 GFLOP/s at m = 32 against
 * the GEMM's 145-150, and the two were even at m = 48. */
static const int64_t avx512_mpack[KLI_DT_COUNT] = {
    [KLI_DT_F32] = 8, [KLI_DT_F16] = 16, [KLI_DT_BF16] = 16, [KLI_DT_Q8_0] = 16,
    [KLI_DT_Q4] = 32, [KLI_DT_Q2_K] = 48, [KLI_DT_Q3_K] = 48, [KLI_DT_Q4_K] = 48,
    [KLI_DT_Q5_K] = 48, [KLI_DT_Q6_K] = 48,
};

/* ---- small helpers -------------------------------------------------------------------- */

AVX512_INLINE float
avx512_hsum(__m512 v)
{
    return avx2_hsum(_mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm512_extractf32x8_ps(v, 1)));
}

/* The first r (0..16) lanes. */
AVX512_INLINE __mmask16
avx512_mask(int64_t r)
{
    return (__mmask16)((1u << r) - 1u);
}

/* Sixteen weights from element j of a float-type row (F32, F16 or BF16), widened. */
X86_DEFINE_LOAD_ROW(avx512_load16, 512, __m256i, _mm256_loadu_si256)

/* The same for the first lanes of mk only; the others are zero and their memory untouched. */
AVX512_INLINE __m512
avx512_load16_mask(enum k_dtype dt, const uint8_t *row, int64_t j, __mmask16 mk)
{
    if (dt == KLI_DT_F32)
        return _mm512_maskz_loadu_ps(mk, (const float *)row + j);
    __m256i h = _mm256_maskz_loadu_epi16(mk, row + 2 * j);
    return X86_WIDEN_U16(512, dt, h);
}

/* The first r (< 16) floats of p into a vector, the other lanes zero, and back (masked: the
 * memory past them is not touched). */
AVX512_INLINE __m512
avx512_load_tail(const float *p, int64_t r)
{
    return _mm512_maskz_loadu_ps(avx512_mask(r), p);
}

AVX512_INLINE void
avx512_store_tail(float *p, __m512 v, int64_t r)
{
    _mm512_mask_storeu_ps(p, avx512_mask(r), v);
}

/* The accumulators of the quantized kernels: a 512-bit and a 256-bit one (for the blocks
 * past the last group of eight) per row or token. acc[i] = acc8[i] = 0 for i < n (a
 * constant after inlining). */
AVX512_INLINE void
avx512_acc_zero(int n, __m512 *acc, __m256 *acc8)
{
#pragma GCC unroll 8
    for (int i = 0; i < n; i++) {
        acc[i] = _mm512_setzero_ps();
        acc8[i] = _mm256_setzero_ps();
    }
}

/* out[i] = the sum of acc[i]'s and acc8[i]'s lanes, i < n */
AVX512_INLINE void
avx512_acc_sum(int n, const __m512 *acc, const __m256 *acc8, float *out)
{
#pragma GCC unroll 8
    for (int i = 0; i < n; i++)
        out[i] = avx512_hsum(acc[i]) + avx2_hsum(acc8[i]);
}

/* ---- vector primitives ------------------------------------------------------------------ */

static float
avx512_dot(const float *a, const float *b, int64_t n)
{
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;

    for (; i + 64 <= n; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16)
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) {
        __mmask16 mk = avx512_mask(n - i);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + i), _mm512_maskz_loadu_ps(mk, b + i),
                             s1);
    }
    return avx512_hsum(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

static void
avx512_axpy(float *y, float a, const float *x, int64_t n)
{
    __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;

    for (; i + 32 <= n; i += 32) {
        __m512 y0 = _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i));
        __m512 y1 = _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(y + i + 16));
        _mm512_storeu_ps(y + i, y0);
        _mm512_storeu_ps(y + i + 16, y1);
    }
    for (; i < n; i += 16) {
        __mmask16 mk = avx512_mask(n - i < 16 ? n - i : 16);
        __m512 v = _mm512_maskz_loadu_ps(mk, y + i);
        v = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(mk, x + i), v);
        _mm512_mask_storeu_ps(y + i, mk, v);
    }
}

static void
avx512_scale(float *y, float a, int64_t n)
{
    __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;

    for (; i + 32 <= n; i += 32) {
        _mm512_storeu_ps(y + i, _mm512_mul_ps(va, _mm512_loadu_ps(y + i)));
        _mm512_storeu_ps(y + i + 16, _mm512_mul_ps(va, _mm512_loadu_ps(y + i + 16)));
    }
    for (; i < n; i += 16) {
        __mmask16 mk = avx512_mask(n - i < 16 ? n - i : 16);
        _mm512_mask_storeu_ps(y + i, mk, _mm512_mul_ps(va, _mm512_maskz_loadu_ps(mk, y + i)));
    }
}

static void
avx512_to_f32(enum k_dtype dt, const void *src, float *dst, int64_t n)
{
    const uint8_t *p = src;
    int64_t i = 0;

    switch (dt) {
    case KLI_DT_F32:
        memcpy(dst, src, (size_t)n * 4);
        return;
    case KLI_DT_F16:
    case KLI_DT_BF16:
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(dst + i, avx512_load16(dt, p, i));
        if (i < n) {
            __mmask16 mk = avx512_mask(n - i);
            _mm512_mask_storeu_ps(dst + i, mk, avx512_load16_mask(dt, p, i, mk));
        }
        return;
    case KLI_DT_Q8_0:
        for (; i < n; i += 32, p += 34) {
            __m512 d = _mm512_set1_ps(avx2_f16(p));
            __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 2)));
            __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 18)));
            _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtepi32_ps(q0), d));
            _mm512_storeu_ps(dst + i + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d));
        }
        return;
    case KLI_DT_Q4: {
        const __m128i m4 = _mm_set1_epi8(0x0f);
        const __m512i e8 = _mm512_set1_epi32(8);
        for (; i < n; i += 32, p += 18) {
            __m512 d = _mm512_set1_ps(avx2_f16(p));
            __m128i q = _mm_loadu_si128((const __m128i *)(p + 2));
            __m512i lo = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(q, m4)), e8);
            __m512i hi = _mm512_sub_epi32(
                _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), m4)), e8);
            _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d));
            _mm512_storeu_ps(dst + i + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d));
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
AVX512_INLINE void
avx512_dot_rows(enum k_dtype dt, int nr, const float *x, const uint8_t *w, size_t rb,
                size_t pf, int64_t k, float *out)
{
    int es = dt == KLI_DT_F32 ? 4 : 2;
    __m512 a0[4], a1[4];
    int64_t j = 0;

#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
        a0[r] = a1[r] = _mm512_setzero_ps();
    for (; j + 32 <= k; j += 32) {
        __m512 x0 = _mm512_loadu_ps(x + j), x1 = _mm512_loadu_ps(x + j + 16);
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            _mm_prefetch((const char *)(w + pf + r * rb + j * es), _MM_HINT_T0);
            a0[r] = _mm512_fmadd_ps(avx512_load16(dt, w + r * rb, j), x0, a0[r]);
            a1[r] = _mm512_fmadd_ps(avx512_load16(dt, w + r * rb, j + 16), x1, a1[r]);
        }
    }
    for (; j < k; j += 16) {
        __mmask16 mk = avx512_mask(k - j < 16 ? k - j : 16);
        __m512 x0 = _mm512_maskz_loadu_ps(mk, x + j);
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++)
            a0[r] = _mm512_fmadd_ps(avx512_load16_mask(dt, w + r * rb, j, mk), x0, a0[r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < nr; r++)
        out[r] = avx512_hsum(_mm512_add_ps(a0[r], a1[r]));
}

/* y[t][r] = dot(x[t], row r) for nt tokens (a constant 4 or 8 after inlining) x 3 rows: each
 * widened weight vector serves every token (up to 24 accumulators), so in batched decode the
 * rows are read and widened once for eight sequences. */
AVX512_INLINE void
avx512_dot_tile(enum k_dtype dt, int nt, const float *x, int64_t ldx, const uint8_t *w,
                size_t rb, size_t pf, int64_t k, float *y, int64_t ldy)
{
    int es = dt == KLI_DT_F32 ? 4 : 2;
    __m512 acc[8][3];

#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        acc[t][0] = acc[t][1] = acc[t][2] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += 16) {
        __mmask16 mk = avx512_mask(k - j < 16 ? k - j : 16);
        __m512 wv[3];
#pragma GCC unroll 3
        for (int r = 0; r < 3; r++) {
            _mm_prefetch((const char *)(w + pf + r * rb + j * es), _MM_HINT_T0);
            wv[r] = k - j >= 16 ? avx512_load16(dt, w + r * rb, j)
                                : avx512_load16_mask(dt, w + r * rb, j, mk);
        }
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            __m512 xv = _mm512_maskz_loadu_ps(mk, x + t * ldx + j);
#pragma GCC unroll 3
            for (int r = 0; r < 3; r++)
                acc[t][r] = _mm512_fmadd_ps(wv[r], xv, acc[t][r]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) {
#pragma GCC unroll 3
        for (int r = 0; r < 3; r++)
            y[t * ldy + r] = avx512_hsum(acc[t][r]);
    }
}

/* ---- decode path, quantized weights ---------------------------------------------------- */

/* acc + the sums of four adjacent products u[i] * s[i] (u unsigned, s signed bytes) per
 * 32-bit lane. Without VNNI through 16-bit pairs (vpmaddubsw), which saturate only past
 * 32767: here u is |w| <= 128 of a Q8_0 weight or a nibble <= 15 against |s| <= 127, so a
 * pair is at most 32512 and both forms give the same integers. One macro for both widths W
 * (512, and 256 for the blocks past the last group of eight). */
#ifdef KLI_VNNI
#define AVX512_DOT_U8(W, acc, u, s) _mm##W##_dpbusd_epi32(acc, u, s)
#else
#define AVX512_DOT_U8(W, acc, u, s)                                                           \
    _mm##W##_add_epi32(acc, _mm##W##_madd_epi16(_mm##W##_maddubs_epi16(u, s),                 \
                                                _mm##W##_set1_epi16(1)))
#endif

AVX512_INLINE __m512i
avx512_dot_u8(__m512i acc, __m512i u, __m512i s)
{
    return AVX512_DOT_U8(512, acc, u, s);
}

AVX512_INLINE __m256i
avx512_dot_u8_256(__m256i acc, __m256i u, __m256i s)
{
    return AVX512_DOT_U8(256, acc, u, s);
}

/* Quantizes 32 floats to int8 with scale amax/127 (round to nearest); *d gets the scale. */
AVX512_INLINE __m256i
avx512_quant_block(const float *x, float *d)
{
    __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    __m512 id = _mm512_set1_ps(amax >= 1e-30f ? 127.0f / amax : 0.0f);
    __m128i q0 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, id)));
    __m128i q1 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, id)));

    *d = amax / 127.0f;
    return _mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1);
}

/*
 * The quantized activations of m tokens live in one stack buffer of X86_QBUF bytes, one
 * region per token (64-byte aligned). k is cut into slices when m tokens of it do not fit
 * (k > 16384 for one token); the first slice writes y, later ones add to it.
 *
 * Q8_0 region for nb blocks: int8 q[32 nb], then float d[nb].
 */
AVX512_INLINE size_t
avx512_q8_bytes(int64_t nb)
{
    return ((size_t)nb * 36 + 63) & ~(size_t)63;
}

static void
avx512_quant_q8(const float *x, int64_t nb, uint8_t *buf)
{
    float *d = (float *)(buf + 32 * nb);

    for (int64_t b = 0; b < nb; b++)
        _mm256_storeu_si256((__m256i *)(buf + 32 * b), avx512_quant_block(x + 32 * b, d + b));
}

/* One Q8_0 block of one row against x block (xq, scale dx) into a 256-bit accumulator. */
AVX512_INLINE __m256
avx512_q8_block(const uint8_t *p, __m256i xq, __m256 dx, __m256 acc)
{
    __m256i wq = _mm256_loadu_si256((const __m256i *)(p + 2));
    __m256 f = _mm256_cvtepi32_ps(avx512_dot_u8_256(_mm256_setzero_si256(), _mm256_abs_epi8(wq),
                                                    _mm256_sign_epi8(xq, wq)));
    __m256 dw = _mm256_set1_ps(avx2_f16(p));

    return _mm256_fmadd_ps(f, _mm256_mul_ps(dw, dx), acc);
}

/* Two Q8_0 blocks of a row (pb: the first) side by side. */
AVX512_INLINE __m512i
avx512_q8_pair(const uint8_t *pb)
{
    return _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(pb + 2))),
        _mm256_loadu_si256((const __m256i *)(pb + 36)), 1);
}

/* vpermps indices that give lanes 0..7 scale 2i and lanes 8..15 scale 2i + 1 */
AVX512_INLINE __m512i
avx512_q8_idx(int i)
{
    return _mm512_inserti64x4(_mm512_set1_epi32(2 * i), _mm256_set1_epi32(2 * i + 1), 1);
}

/* out[r] = sum over nb blocks of row r (Q8_0) . x (one token's Q8_0 region), r < nr. */
AVX512_INLINE void
avx512_q8_rows(int nr, const uint8_t *act, int64_t nb, const uint8_t *w, size_t rb, size_t pf,
               float *out)
{
    const float *d = (const float *)(act + 32 * nb);
    __m512 acc[4];
    __m256 acc8[4];
    int64_t b = 0;

    avx512_acc_zero(nr, acc, acc8);
    for (; b + 8 <= nb; b += 8) {
        __m256 dx = _mm256_loadu_ps(d + b);
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            const uint8_t *p = w + r * rb + 34 * b;
            for (int l = 0; l < 5; l++)
                _mm_prefetch((const char *)(p + pf + 64 * l), _MM_HINT_T0);
            /* only lanes 0..7 of s are ever selected */
            __m512 s = _mm512_castps256_ps512(_mm256_mul_ps(avx2_scales8(p, 34, 136), dx));
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                __m512i wq = avx512_q8_pair(p + 68 * i);
                __m512i xq = _mm512_loadu_si512(act + 32 * (b + 2 * i));
                __m512i xs = _mm512_mask_sub_epi8(xq, _mm512_movepi8_mask(wq),
                                                  _mm512_setzero_si512(), xq);
                __m512 f = _mm512_cvtepi32_ps(avx512_dot_u8(_mm512_setzero_si512(),
                                                            _mm512_abs_epi8(wq), xs));
                acc[r] = _mm512_fmadd_ps(f, _mm512_permutexvar_ps(avx512_q8_idx(i), s), acc[r]);
            }
        }
    }
    for (; b < nb; b++) {
        __m256i xq = _mm256_loadu_si256((const __m256i *)(act + 32 * b));
        __m256 dx = _mm256_broadcast_ss(d + b);
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++)
            acc8[r] = avx512_q8_block(w + r * rb + 34 * b, xq, dx, acc8[r]);
    }
    avx512_acc_sum(nr, acc, acc8, out);
}

/* out[t] = row p (Q8_0) . x of token t (regions `stride` bytes apart), t < nt (constant, at
 * most 8): each pair of weight blocks is loaded, made unsigned and sign-masked once for all
 * the tokens. */
AVX512_INLINE void
avx512_q8_tile(int nt, const uint8_t *act, size_t stride, int64_t nb, const uint8_t *p,
               size_t pf, float *out)
{
    __m512 acc[8];
    __m256 acc8[8];
    int64_t b = 0;

    avx512_acc_zero(nt, acc, acc8);
    for (; b + 8 <= nb; b += 8) {
        const uint8_t *pg = p + 34 * b;
        __m512 s[8];
        for (int l = 0; l < 5; l++)
            _mm_prefetch((const char *)(pg + pf + 64 * l), _MM_HINT_T0);
        __m256 dw = avx2_scales8(pg, 34, 136);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            const float *d = (const float *)(act + t * stride + 32 * nb);
            s[t] = _mm512_castps256_ps512(_mm256_mul_ps(dw, _mm256_loadu_ps(d + b)));
        }
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            __m512i wq = avx512_q8_pair(pg + 68 * i);
            __m512i wa = _mm512_abs_epi8(wq);
            __mmask64 neg = _mm512_movepi8_mask(wq);
            __m512i idx = avx512_q8_idx(i);
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                __m512i xq = _mm512_loadu_si512(act + t * stride + 32 * (b + 2 * i));
                __m512i xs = _mm512_mask_sub_epi8(xq, neg, _mm512_setzero_si512(), xq);
                __m512 f = _mm512_cvtepi32_ps(avx512_dot_u8(_mm512_setzero_si512(), wa, xs));
                acc[t] = _mm512_fmadd_ps(f, _mm512_permutexvar_ps(idx, s[t]), acc[t]);
            }
        }
    }
    for (; b < nb; b++) {
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            const uint8_t *xt = act + t * stride;
            __m256i xq = _mm256_loadu_si256((const __m256i *)(xt + 32 * b));
            __m256 dx = _mm256_broadcast_ss((const float *)(xt + 32 * nb) + b);
            acc8[t] = avx512_q8_block(p + 34 * b, xq, dx, acc8[t]);
        }
    }
    avx512_acc_sum(nt, acc, acc8, out);
}

/*
 * Q4 region. Whole groups of eight blocks first, 320 bytes each:
 *   bytes 0..255    int8 x, per quad j (blocks 4j..4j+3 of the group): [b 0..15] for the four
 *                   blocks, then [b 16..31] for the four
 *   bytes 256..287  float x scales d_b, b = 0..7
 *   bytes 288..319  float offsets -8 * sum(q_b) * d_b (the nibbles' -8, moved to the x side)
 * then each remaining block as a 96-byte record: 32 int8 x, the offset -8 * sum(q) as int32
 * lane 0 of eight, and d broadcast to eight floats.
 */
#define AVX512_Q4GRP 320
#define AVX512_Q4REC 96

AVX512_INLINE size_t
avx512_q4_bytes(int64_t nb)
{
    size_t n = (size_t)(nb / 8) * AVX512_Q4GRP + (size_t)(nb % 8) * AVX512_Q4REC;

    return (n + 63) & ~(size_t)63;
}

static void
avx512_quant_q4(const float *x, int64_t nb, uint8_t *buf)
{
    int64_t b = 0;

    for (; b + 8 <= nb; b += 8, buf += AVX512_Q4GRP) {
        float *dv = (float *)(buf + 256), *cv = (float *)(buf + 288);
        for (int i = 0; i < 8; i++) {
            __m256i q = avx512_quant_block(x + 32 * (b + i), dv + i);
            uint8_t *xr = buf + 128 * (i / 4) + 16 * (i % 4);
            _mm_storeu_si128((__m128i *)xr, _mm256_castsi256_si128(q));
            _mm_storeu_si128((__m128i *)(xr + 64), _mm256_extracti128_si256(q, 1));
            cv[i] = -8.0f * (float)avx2_sum_i8(q) * dv[i];
        }
    }
    for (; b < nb; b++, buf += AVX512_Q4REC) {
        float d;
        __m256i q = avx512_quant_block(x + 32 * b, &d);
        _mm256_store_si256((__m256i *)buf, q);
        _mm256_store_si256((__m256i *)(buf + 32),
                           _mm256_setr_epi32(-8 * avx2_sum_i8(q), 0, 0, 0, 0, 0, 0, 0));
        _mm256_store_ps((float *)(buf + 64), _mm256_set1_ps(d));
    }
}

/* Word indices into the first 128 (and, for blocks 4..7, the next 128) bytes of a group of
 * eight Q4 blocks (144 bytes, 72 words; block i starts at word 9i): the scales, then each
 * block's 16 nibble bytes into its own 128-bit lane. */
static const uint16_t avx512_q4_ix[3][32] __attribute__((aligned(64))) = {
    {0, 9, 18, 27, 36, 45, 54, 63},
    {1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17,
     19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30, 31, 32, 33, 34, 35},
    {5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21,
     23, 24, 25, 26, 27, 28, 29, 30, 32, 33, 34, 35, 36, 37, 38, 39},
};

/* One group of eight Q4 blocks of a row (p: its first block): the eight scales as floats, and
 * the nibbles of blocks 0..3 and 4..7: lo = elements 0..15 of each block, hi = elements
 * 16..31, block i of the four in 128-bit lane i. Three loads, the last masked to the group's final 16 bytes so that nothing past the
 * row is read, and three word permutes: assembling the 18-byte blocks lane by lane took six
 * inserts and the scales seven more, all on the one port that shuffles. */
AVX512_INLINE __m256
avx512_q4_group(const uint8_t *p, __m512i *lo03, __m512i *hi03, __m512i *lo47, __m512i *hi47)
{
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    __m512i g0 = _mm512_loadu_si512(p), g1 = _mm512_loadu_si512(p + 64);
    __m512i g2 = _mm512_maskz_loadu_epi8(0xffff, p + 128);
    __m512i sc = _mm512_permutex2var_epi16(g0, _mm512_load_si512(avx512_q4_ix[0]), g1);
    __m512i q03 = _mm512_permutex2var_epi16(g0, _mm512_load_si512(avx512_q4_ix[1]), g1);
    __m512i q47 = _mm512_permutex2var_epi16(g1, _mm512_load_si512(avx512_q4_ix[2]), g2);

    *lo03 = _mm512_and_si512(q03, m4);
    *hi03 = _mm512_and_si512(_mm512_srli_epi16(q03, 4), m4);
    *lo47 = _mm512_and_si512(q47, m4);
    *hi47 = _mm512_and_si512(_mm512_srli_epi16(q47, 4), m4);
    return _mm256_cvtph_ps(_mm512_castsi512_si128(sc));
}

/* Integer dot products of four blocks' nibbles with a 128-byte x quad; lanes 4i..4i+3 hold
 * parts of block i's sum. */
AVX512_INLINE __m512i
avx512_q4_dot(__m512i lo, __m512i hi, const uint8_t *xq)
{
    __m512i x0 = _mm512_load_si512(xq), x1 = _mm512_load_si512(xq + 64);
#ifdef KLI_VNNI
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x0), hi, x1);
#else
    /* the two 16-bit products add without saturating (15 * 127 * 4 < 32767) */
    __m512i pr = _mm512_add_epi16(_mm512_maddubs_epi16(lo, x0), _mm512_maddubs_epi16(hi, x1));

    return _mm512_madd_epi16(pr, _mm512_set1_epi16(1));
#endif
}

/* vpermps indices that give lanes 4i..4i+3 scale 4j + i */
AVX512_INLINE __m512i
avx512_q4_idx(int j)
{
    return _mm512_add_epi32(_mm512_set1_epi32(4 * j),
                            _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
}

/* One single Q4 block of one row against a 96-byte tail record into a 256-bit accumulator. */
AVX512_INLINE __m256
avx512_q4_block(const uint8_t *p, const uint8_t *xr, __m256 acc)
{
    const __m256i sh = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    __m256i wq = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p + 2)));
    __m256i nib = _mm256_and_si256(_mm256_srlv_epi32(wq, sh), _mm256_set1_epi8(0x0f));
    __m256i xq = _mm256_load_si256((const __m256i *)xr);
    __m256i di = avx512_dot_u8_256(_mm256_setzero_si256(), nib, xq);
    __m256 f = _mm256_cvtepi32_ps(
        _mm256_add_epi32(di, _mm256_load_si256((const __m256i *)(xr + 32))));
    __m256 dw = _mm256_set1_ps(avx2_f16(p));

    return _mm256_fmadd_ps(f, _mm256_mul_ps(dw, _mm256_load_ps((const float *)(xr + 64))), acc);
}

/* out[r] = row r (Q4) . x (one token's Q4 region) for r < nr. */
AVX512_INLINE void
avx512_q4_rows(int nr, const uint8_t *act, int64_t nb, const uint8_t *w, size_t rb, size_t pf,
               float *out)
{
    __m512 acc[4];
    __m256 acc8[4];
    int64_t b = 0;

    avx512_acc_zero(nr, acc, acc8);
    for (; b + 8 <= nb; b += 8, act += AVX512_Q4GRP) {
        __m256 dx = _mm256_load_ps((const float *)(act + 256));
        __m256 cx = _mm256_load_ps((const float *)(act + 288));
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            const uint8_t *p = w + r * rb + 18 * b;
            _mm_prefetch((const char *)(p + pf), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + pf + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + pf + 128), _MM_HINT_T0);
            __m512i lo[2], hi[2];
            __m256 dw = avx512_q4_group(p, &lo[0], &hi[0], &lo[1], &hi[1]);
            /* only lanes 0..7 of s are ever selected */
            __m512 s = _mm512_castps256_ps512(_mm256_mul_ps(dw, dx));
            /* the offsets: sum_b d_w(b) * (-8 sum(q_b) d_x(b)) */
            acc8[r] = _mm256_fmadd_ps(dw, cx, acc8[r]);
#pragma GCC unroll 2
            for (int j = 0; j < 2; j++) {
                __m512 f = _mm512_cvtepi32_ps(avx512_q4_dot(lo[j], hi[j], act + 128 * j));
                acc[r] = _mm512_fmadd_ps(f, _mm512_permutexvar_ps(avx512_q4_idx(j), s), acc[r]);
            }
        }
    }
    for (; b < nb; b++, act += AVX512_Q4REC) {
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++)
            acc8[r] = avx512_q4_block(w + r * rb + 18 * b, act, acc8[r]);
    }
    avx512_acc_sum(nr, acc, acc8, out);
}

/* out[t] = row p (Q4) . x of token t (regions `stride` bytes apart), t < nt (constant, at most
 * 8): the nibbles and scales of each block are unpacked once for all the tokens. */
AVX512_INLINE void
avx512_q4_tile(int nt, const uint8_t *act, size_t stride, int64_t nb, const uint8_t *p,
               size_t pf, float *out)
{
    __m512 acc[8];
    __m256 acc8[8];
    int64_t b = 0;

    avx512_acc_zero(nt, acc, acc8);
    for (; b + 8 <= nb; b += 8, act += AVX512_Q4GRP) {
        const uint8_t *pg = p + 18 * b;
        __m512 s[8];
        _mm_prefetch((const char *)(pg + pf), _MM_HINT_T0);
        _mm_prefetch((const char *)(pg + pf + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(pg + pf + 128), _MM_HINT_T0);
        __m512i lo[2], hi[2];
        __m256 dw = avx512_q4_group(pg, &lo[0], &hi[0], &lo[1], &hi[1]);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            const uint8_t *xg = act + t * stride;
            __m256 dx = _mm256_load_ps((const float *)(xg + 256));
            s[t] = _mm512_castps256_ps512(_mm256_mul_ps(dw, dx));
            acc8[t] = _mm256_fmadd_ps(dw, _mm256_load_ps((const float *)(xg + 288)), acc8[t]);
        }
#pragma GCC unroll 2
        for (int j = 0; j < 2; j++) {
            __m512i idx = avx512_q4_idx(j);
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                const uint8_t *xq = act + t * stride + 128 * j;
                __m512 f = _mm512_cvtepi32_ps(avx512_q4_dot(lo[j], hi[j], xq));
                acc[t] = _mm512_fmadd_ps(f, _mm512_permutexvar_ps(idx, s[t]), acc[t]);
            }
        }
    }
    for (; b < nb; b++, act += AVX512_Q4REC) {
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++)
            acc8[t] = avx512_q4_block(p + 18 * b, act + t * stride, acc8[t]);
    }
    avx512_acc_sum(nt, acc, acc8, out);
}

/*
 * The register tile: y[t][i] (+)= sum_j x[t][j] * panel[j][i] for t < tm (8 or 4, a constant
 * after inlining), i < 48. Only t < nt and i < nr are stored; xt[t] for t >= nt must still be
 * readable (callers repeat the last row).
 */
AVX512_INLINE void
avx512_tile_tm(int tm, const float *pk, const float *const *xt, int64_t kc, float *y,
               int64_t ldy, int nr, int nt, int add)
{
    __m512 c[X86_TM][3];

#pragma GCC unroll 8
    for (int t = 0; t < tm; t++)
        c[t][0] = c[t][1] = c[t][2] = _mm512_setzero_ps();
    for (int64_t j = 0; j < kc; j++) {
        const float *p = pk + j * X86_NR;
        __m512 w0 = _mm512_load_ps(p), w1 = _mm512_load_ps(p + 16), w2 = _mm512_load_ps(p + 32);
#pragma GCC unroll 8
        for (int t = 0; t < tm; t++) {
            __m512 b = _mm512_set1_ps(xt[t][j]);
            c[t][0] = _mm512_fmadd_ps(w0, b, c[t][0]);
            c[t][1] = _mm512_fmadd_ps(w1, b, c[t][1]);
            c[t][2] = _mm512_fmadd_ps(w2, b, c[t][2]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < tm; t++) {
        if (t >= nt)
            break;
        float *yt = y + t * ldy;
        for (int v = 0; v < 3; v++) {
            int cnt = nr - 16 * v;
            __mmask16 mk = avx512_mask(cnt <= 0 ? 0 : cnt >= 16 ? 16 : cnt);
            __m512 s = c[t][v];
            if (add)
                s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(mk, yt + 16 * v));
            _mm512_mask_storeu_ps(yt + 16 * v, mk, s);
        }
    }
}

/* The packer is avx2.h's: panels are packed 8 rows x 8 columns at a time with 256-bit
 * transposes, which 512-bit registers would not speed up. */
#define avx512_pack8 avx2_pack8

/*
 * The K types (avx2.h has their layouts and the dot product's form). Here a token's region
 * keeps chunks c and c + 2 side by side (avx2_k_slot), so that one 512-bit register holds the
 * pair: the levels of both come from one load (Q4_K, Q5_K's low bits, the 32 bytes two
 * chunks share) or one broadcast of 32 bytes shifted by a different count in each half, and
 * one vpshufb picks both chunks' scales. The integer sums are avx2_qk_dot's, folded to 256
 * bits before the same float steps: the products are the avx2 table's, bit for bit.
 */
static void
avx512_quant_qk(const float *x, int64_t nb, uint8_t *buf)
{
    avx2_quant_qk_at(x, nb, buf, 1);
}

#define avx512_qk_bytes avx2_qk_bytes

/* The bits of each byte of v at mask << from0 (first half) or from1 (second half), at
 * mask << to (from0, from1, to and mask constants after inlining). The 16-bit shifts carry
 * bits across bytes, which the mask drops. */
AVX512_INLINE __m512i
avx512_k_field2(__m512i v, int from0, int from1, int to, int mask)
{
    if (from0 != 0 || from1 != 0) {
        const __m512i n = _mm512_inserti64x4(_mm512_set1_epi16((short)from0),
                                             _mm256_set1_epi16((short)from1), 1);
        v = _mm512_srlv_epi16(v, n);
    }
    if (mask != 0)      /* 0: the shift alone (avx512_k_merge masks it) */
        v = _mm512_and_si512(v, _mm512_set1_epi8((char)mask));
    return to > 0 ? _mm512_slli_epi16(v, to) : v;
}

/* The bit pairs (mask 3) or bits (mask 1) at from0 of each byte of v (first half) and from1
 * (second half) at bit `to`, every other bit zero: one rotation of the 32-bit lanes moves
 * them (left by to - from, a count modulo 32), and as from and to lie in the same byte, no
 * bit of the field crosses into another. */
AVX512_INLINE __m512i
avx512_k_bits2(__m512i v, int from0, int from1, int to, int mask)
{
    const __m512i n = _mm512_inserti64x4(_mm512_set1_epi32((to - from0 + 32) % 32),
                                         _mm256_set1_epi32((to - from1 + 32) % 32), 1);

    return _mm512_and_si512(_mm512_rolv_epi32(v, n), _mm512_set1_epi8((char)(mask << to)));
}

AVX512_INLINE __m512i
avx512_k_bit2(__m512i v, int from0, int from1, int to)
{
    return avx512_k_bits2(v, from0, from1, to, 1);
}

/* hi | (lo & ((1 << lobits) - 1)) per byte, in one step (hi has no bit below lobits): the
 * levels of a K type whose low bits and high bits come from different bytes */
AVX512_INLINE __m512i
avx512_k_merge(__m512i lo, __m512i hi, int lobits)
{
    /* imm 0xf8: A | (B & C) for A = hi, B = lo, C = the mask */
    return _mm512_ternarylogic_epi32(hi, lo, _mm512_set1_epi8((char)((1 << lobits) - 1)), 0xf8);
}

/* 32 bytes at p in both halves of a register */
AVX512_INLINE __m512i
avx512_bcast32(const uint8_t *p)
{
    return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
}

/* The levels u of chunks a and a + 2 (a = 0, 1, 4 or 5, a constant after inlining) of the
 * super-block at p: avx2_k_levels(dt, p, a) in the first half, (a + 2) in the second. */
AVX512_INLINE __m512i
avx512_k_levels2(enum k_dtype dt, const uint8_t *p, int a)
{
    int g = a / 4, s = 2 * (a % 4);

    switch (dt) {
    case KLI_DT_Q2_K:
        return avx512_k_field2(avx512_bcast32(p + 16 + 32 * g), s, s + 4, 0, 3);
    case KLI_DT_Q3_K:
        return avx512_k_merge(avx512_k_field2(avx512_bcast32(p + 32 + 32 * g), s, s + 4, 0, 0),
                              avx512_k_bit2(avx512_bcast32(p), a, a + 2, 2), 2);
    case KLI_DT_Q4_K:
        return avx512_k_field2(_mm512_loadu_si512((const void *)(p + 16 + 64 * g)),
                               4 * (a % 2), 4 * (a % 2), 0, 15);
    case KLI_DT_Q5_K:
        return avx512_k_merge(
            avx512_k_field2(_mm512_loadu_si512((const void *)(p + 48 + 64 * g)), 4 * (a % 2),
                            4 * (a % 2), 0, 0),
            avx512_k_bit2(avx512_bcast32(p + 16), a, a + 2, 4), 4);
    default:
        /* ql: chunks c % 4 < 2 in the low nibbles, the others in the high ones */
        return avx512_k_merge(avx512_k_field2(avx512_bcast32(p + 64 * g + 32 * (a % 2)), 0, 4,
                                              0, 0),
                              avx512_k_bits2(avx512_bcast32(p + 128 + 32 * g), s, s + 4, 4, 3),
                              4);
    }
}

/* The int16 scales of chunks a and a + 2 for their pair sums (avx2_k_scale's in each half),
 * from sc4, the eight scales of chunks 4 (a / 4) .. 4 (a / 4) + 3 in every 128-bit lane. */
AVX512_INLINE __m512i
avx512_k_scale2(__m512i sc4, int a)
{
    const __m256i c0 = _mm256_add_epi8(
        _mm256_set1_epi16((short)(0x0100 + 0x0404 * (a % 4))),
        _mm256_setr_epi64x(0, 0, 0x0202020202020202ll, 0x0202020202020202ll));
    const __m256i c1 = _mm256_add_epi8(
        _mm256_set1_epi16((short)(0x0100 + 0x0404 * ((a + 2) % 4))),
        _mm256_setr_epi64x(0, 0, 0x0202020202020202ll, 0x0202020202020202ll));

    return _mm512_shuffle_epi8(sc4, _mm512_inserti64x4(_mm512_castsi256_si512(c0), c1, 1));
}

/* The integer sums of row p's super-block against nt token regions (`stride` bytes apart),
 * isum[t], t < nt, a chunk pair a step; sv[q]: the int16 scales of pair q in the order of
 * its pair sums. */
AVX512_INLINE void
avx512_k_isums(enum k_dtype dt, int nt, const uint8_t *p, const uint8_t *act, size_t stride,
               const __m512i *sv, __m512i *isum)
{
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        int a = (q & 2) << 1 | (q & 1);   /* pairs (0, 2), (1, 3), (4, 6), (5, 7) */
        __m512i u = avx512_k_levels2(dt, p, a);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            __m512i xq = _mm512_loadu_si512((const void *)(act + t * stride + 64 * q));
            __m512i pr = _mm512_maddubs_epi16(u, xq);
            /* (q = 0 sets the sum: no zero to add to) */
#ifdef KLI_VNNI
            isum[t] = q ? _mm512_dpwssd_epi32(isum[t], pr, sv[q]) : _mm512_madd_epi16(pr, sv[q]);
#else
            isum[t] = q ? _mm512_add_epi32(isum[t], _mm512_madd_epi16(pr, sv[q]))
                        : _mm512_madd_epi16(pr, sv[q]);
#endif
        }
    }
}

/* The two halves of each 256-bit run of integer sums added: avx2's 256-bit isum */
AVX512_INLINE __m256i
avx512_k_fold(__m512i isum)
{
    return _mm256_add_epi32(_mm512_castsi512_si256(isum), _mm512_extracti64x4_epi64(isum, 1));
}

/* vpshufb indices: bytes 8..11 (128-bit lanes 0, 2) and 12..15 (lanes 1, 3) of a lane,
 * each zero-extended to a word and repeated for the two runs of 16 of its sub-block */
static const uint16_t avx512_k_mn_ix[32] __attribute__((aligned(64))) = {
    0x8008, 0x8008, 0x8009, 0x8009, 0x800a, 0x800a, 0x800b, 0x800b,
    0x800c, 0x800c, 0x800d, 0x800d, 0x800e, 0x800e, 0x800f, 0x800f,
    0x8008, 0x8008, 0x8009, 0x8009, 0x800a, 0x800a, 0x800b, 0x800b,
    0x800c, 0x800c, 0x800d, 0x800d, 0x800e, 0x800e, 0x800f, 0x800f,
};

/*
 * Four Q4_K or Q5_K rows . one token (decode), out[r], r < 4: avx512_qk_dot's integers and
 * float steps lane for lane, with less work around them. The four rows' 16-byte heads go
 * into one register (row r in 128-bit lane r), so the bit fiddling that makes the 6-bit
 * scales and minimums runs once for four rows; a row's scales for a chunk pair come straight
 * from its bytes (one vpshufb of the row's lane broadcast, zero-extending to int16: no
 * unpack, widen or per-half broadcast); and rows 0, 1 (2, 3) share one 512-bit register for
 * the fold of the chunk pairs and every float step, with d and dm broadcast per half, so that
 * each half holds what avx2_k_finish computes for its row, and is summed as avx2_hsum does.
 */
AVX512_INLINE void
avx512_qk_rows4(enum k_dtype dt, const uint8_t *act, int64_t nsb, const uint8_t *w,
                size_t rb, size_t pf, float *out)
{
    const size_t bb = avx2_k_bytes(dt);
    /* the scale of chunk c is byte c of a row's lane (mins: byte 8 + c); a word of ctl picks
     * byte b as b | 0x8000, the high byte zero */
    __m512i ctl[4], ctlm;
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};

#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        int a = (q & 2) << 1 | (q & 1);
        ctl[q] = _mm512_inserti64x4(_mm512_set1_epi16((short)(0x8000 | a)),
                                    _mm256_set1_epi16((short)(0x8000 | (a + 2))), 1);
    }
    /* on [lane r | lane r | lane r + 1 | lane r + 1] of the heads: the minimums 0..3, 4..7 of
     * rows r, r + 1 in the order of avx2_k_head's mn */
    ctlm = _mm512_load_si512(avx512_k_mn_ix);
    for (int64_t s = 0; s < nsb; s++, w += bb, act += AVX2_KSB) {
        const uint8_t *p[4] = {w, w + rb, w + 2 * rb, w + 3 * rb};
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++)
            avx2_k_fetch(p[r] + pf, bb);
        /* avx2_k_head's Q4_K step, four rows at once */
        __m512i h = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p[0]));
        h = _mm512_mask_broadcast_i32x4(h, 0x00f0, _mm_loadu_si128((const __m128i *)p[1]));
        h = _mm512_mask_broadcast_i32x4(h, 0x0f00, _mm_loadu_si128((const __m128i *)p[2]));
        h = _mm512_mask_broadcast_i32x4(h, 0xf000, _mm_loadu_si128((const __m128i *)p[3]));
        __m512i a = _mm512_shuffle_epi32(h, (_MM_PERM_ENUM)_MM_SHUFFLE(3, 2, 3, 1));
        __m512i b = _mm512_shuffle_epi32(h, (_MM_PERM_ENUM)_MM_SHUFFLE(2, 2, 1, 1));
        __m512i v = _mm512_ternarylogic_epi32(
            _mm512_and_si512(_mm512_srlv_epi32(a, _mm512_set4_epi32(4, 0, 0, 0)),
                             _mm512_set4_epi32(0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f,
                                               0x3f3f3f3f)),
            _mm512_srli_epi32(b, 2), _mm512_set4_epi32(0x30303030, 0, 0x30303030, 0), 0xf8);
        /* d0 dm0 d1 dm1 .. d3 dm3 */
        __m256 f = _mm256_cvtph_ps(_mm512_castsi512_si128(
            _mm512_permutexvar_epi32(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                      12, 8, 4, 0), h)));
        __m512 f2 = _mm512_castps256_ps512(f);
        const __m512 dx = _mm512_set1_ps(*(const float *)(act + 288));
        const __m512i sums = _mm512_broadcast_i64x4(
            _mm256_load_si256((const __m256i *)(act + 256)));
        __m512i isum[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const __m512i bc = _mm512_shuffle_i32x4(v, v, 0x55 * r);
            __m512i sv[4];
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++)
                sv[q] = _mm512_shuffle_epi8(bc, ctl[q]);
            avx512_k_isums(dt, 1, p[r], act, 0, sv, isum + r);
        }
#pragma GCC unroll 2
        for (int i = 0; i < 2; i++) {
            const __m512i sel = _mm512_inserti64x4(_mm512_set1_epi32(4 * i),
                                                   _mm256_set1_epi32(4 * i + 2), 1);
            __m512 vd = _mm512_permutexvar_ps(sel, f2);
            __m512 vm = _mm512_permutexvar_ps(_mm512_add_epi32(sel, _mm512_set1_epi32(1)), f2);
            __m512i mn = _mm512_shuffle_epi8(
                _mm512_shuffle_i32x4(v, v, i ? _MM_SHUFFLE(3, 3, 2, 2) : _MM_SHUFFLE(1, 1, 0, 0)),
                ctlm);
            __m512i is = _mm512_add_epi32(
                _mm512_shuffle_i64x2(isum[2 * i], isum[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                _mm512_shuffle_i64x2(isum[2 * i], isum[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
            __m512 ms = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(mn, sums)), vm);
            __m512 fv = _mm512_fmsub_ps(_mm512_cvtepi32_ps(is), vd, ms);
            acc[i] = _mm512_fmadd_ps(fv, dx, acc[i]);
        }
    }
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++) {
        out[2 * i] = avx2_hsum(_mm512_castps512_ps256(acc[i]));
        out[2 * i + 1] = avx2_hsum(_mm512_extractf32x8_ps(acc[i], 1));
    }
}

/* Row p's super-block against nt tokens: prefetches pf bytes ahead, reads the head (mn, d,
 * dm as avx2_k_head gives them) and makes the integer sums isum[t]. */
AVX512_INLINE void
avx512_k_row(enum k_dtype dt, int nt, const uint8_t *p, size_t pf, const uint8_t *act,
             size_t stride, __m512i *isum, __m256i *mn, float *d, float *dm)
{
    __m256i s16;
    __m512i sc[2], sv[4];

    avx2_k_fetch(p + pf, avx2_k_bytes(dt));
    avx2_k_head(dt, p, &s16, mn, d, dm);
    sc[0] = _mm512_broadcast_i32x4(_mm256_castsi256_si128(s16));
    sc[1] = _mm512_broadcast_i32x4(_mm256_extracti128_si256(s16, 1));
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        int a = (q & 2) << 1 | (q & 1);
        sv[q] = avx512_k_scale2(sc[a / 4], a);
    }
    avx512_k_isums(dt, nt, p, act, stride, sv, isum);
}

/*
 * One K-type row . nt tokens (2 <= nt <= 8, a constant), out[t]: the multi-token tile. Tokens
 * go in pairs through the folds and float steps, token t in the low half of a 512-bit
 * register and t + 1 in the high one, each half doing what avx2_k_finish does for its token
 * (and summed as avx2_hsum does), so that the products stay avx2's, bit for bit, with half
 * the instructions around the integer sums; an odd last token takes avx2_k_finish itself.
 */
AVX512_INLINE void
avx512_qk_tile(enum k_dtype dt, int nt, const uint8_t *act, size_t stride, int64_t nsb,
               const uint8_t *w, size_t pf, float *out)
{
    const size_t bb = avx2_k_bytes(dt);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    __m256 last = _mm256_setzero_ps();

    for (int64_t s = 0; s < nsb; s++, w += bb, act += AVX2_KSB) {
        __m512i isum[8];
        __m256i mn;
        float d, dm;
        avx512_k_row(dt, nt, w, pf, act, stride, isum, &mn, &d, &dm);
        const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(dm);
        const __m512i mn2 = _mm512_broadcast_i64x4(mn);
#pragma GCC unroll 4
        for (int t = 0; t + 1 < nt; t += 2) {
            const uint8_t *x0 = act + t * stride, *x1 = x0 + stride;
            __m512i is = _mm512_add_epi32(
                _mm512_shuffle_i64x2(isum[t], isum[t + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                _mm512_shuffle_i64x2(isum[t], isum[t + 1], _MM_SHUFFLE(3, 2, 3, 2)));
            __m512i sums = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_load_si256((const __m256i *)(x0 + 256))),
                _mm256_load_si256((const __m256i *)(x1 + 256)), 1);
            __m512 dx = _mm512_insertf32x8(_mm512_set1_ps(*(const float *)(x0 + 288)),
                                           _mm256_set1_ps(*(const float *)(x1 + 288)), 1);
            __m512 ms = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(mn2, sums)), vm);
            __m512 v = _mm512_fmsub_ps(_mm512_cvtepi32_ps(is), vd, ms);
            acc[t / 2] = _mm512_fmadd_ps(v, dx, acc[t / 2]);
        }
        if (nt % 2) {
            last = avx2_k_finish(last, avx512_k_fold(isum[nt - 1]), mn, _mm256_set1_ps(d),
                                 _mm256_set1_ps(dm), act + (nt - 1) * stride);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t + 1 < nt; t += 2) {
        out[t] = avx2_hsum(_mm512_castps512_ps256(acc[t / 2]));
        out[t + 1] = avx2_hsum(_mm512_extractf32x8_ps(acc[t / 2], 1));
    }
    if (nt % 2)
        out[nt - 1] = avx2_hsum(last);
}

/*
 * out[r nt + t] = row r . token t over nsb super-blocks, r < nr, t < nt (constants, one of
 * them 1, nr nt <= 8): avx2_qk_dot on this file's regions, two chunks a step.
 */
AVX512_INLINE void
avx512_qk_dot(enum k_dtype dt, int nr, int nt, const uint8_t *act, size_t stride,
              int64_t nsb, const uint8_t *w, size_t rb, size_t pf, float *out)
{
    const size_t bb = avx2_k_bytes(dt);
    __m256 acc[8];

    if (nr == 4 && nt == 1 && (dt == KLI_DT_Q4_K || dt == KLI_DT_Q5_K)) {
        avx512_qk_rows4(dt, act, nsb, w, rb, pf, out);
        return;
    }
    if (nr == 1 && nt >= 2) {
        avx512_qk_tile(dt, nt, act, stride, nsb, w, pf, out);
        return;
    }
    avx2_zeros(nr * nt, acc);
    for (int64_t s = 0; s < nsb; s++, w += bb, act += AVX2_KSB) {
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            __m512i isum[8];
            __m256i mn;
            float d, dm;
            avx512_k_row(dt, nt, w + r * rb, pf, act, stride, isum, &mn, &d, &dm);
            const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(dm);
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                acc[r * nt + t] = avx2_k_finish(acc[r * nt + t], avx512_k_fold(isum[t]), mn, vd,
                                                vm, act + t * stride);
            }
        }
    }
    avx2_hsums(nr * nt, acc, out);
}

AVX512_INLINE void
avx512_tile(const float *pk, const float *const *xt, int64_t kc, float *y, int64_t ldy, int nr,
            int nt, int add)
{
    if (nt > 4)
        avx512_tile_tm(8, pk, xt, kc, y, ldy, nr, nt, add);
    else
        avx512_tile_tm(4, pk, xt, kc, y, ldy, nr, nt, add);
}

#include "gemm.h"

/* ==== exp and the decay-weighted dot product ============================================= */

/* exp(x) for x <= 0, 16 lanes; the same reduction and polynomial as avx2.c's, with
 * vscalefps doing the 2^n. */
static inline __m512
avx512_exp_neg(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static float
avx512_dot_decay(const float *a, const float *b, const float *ga, const float *gb, int64_t n)
{
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;

    for (; i + 16 <= n; i += 16) {
        __m512 e = avx512_exp_neg(_mm512_sub_ps(_mm512_loadu_ps(ga + i),
                                                _mm512_loadu_ps(gb + i)));
        acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)), e,
                              acc);
    }
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
        __m512 e = avx512_exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, ga + i),
                                                _mm512_maskz_loadu_ps(k, gb + i)));
        acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, a + i),
                                            _mm512_maskz_loadu_ps(k, b + i)), e, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

SIMD_MUL_DECAY(avx512_mul_decay, __m512, 16, avx512_exp_neg, _mm512_loadu_ps, _mm512_storeu_ps,
               _mm512_mul_ps, _mm512_sub_ps, avx512_load_tail, avx512_store_tail)

/* gemm_nn: register tiles of 4 rows x 64 columns (16 accumulators); rows past m repeat the
 * last row and are not stored, columns past n are masked. */
static void
avx512_gemm_nn(float *y, int64_t ldy, const float *x, int64_t ldx, const float *B, int64_t ldb,
               int64_t m, int64_t n, int64_t k, float alpha, int acc)
{
    const __m512 va = _mm512_set1_ps(alpha);

    for (int64_t j0 = 0; j0 < n; j0 += 64) {
        __mmask16 mk[4];
        for (int v = 0; v < 4; v++) {
            int64_t c = n - j0 - 16 * v;
            mk[v] = avx512_mask(c <= 0 ? 0 : c >= 16 ? 16 : c);
        }
        for (int64_t i0 = 0; i0 < m; i0 += 4) {
            const float *xr[4];
            __m512 c[4][4];
            for (int i = 0; i < 4; i++)
                xr[i] = x + (i0 + i < m ? i0 + i : m - 1) * ldx;
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
                c[i][0] = c[i][1] = c[i][2] = c[i][3] = _mm512_setzero_ps();
            for (int64_t l = 0; l < k; l++) {
                const float *b = B + l * ldb + j0;
                __m512 b0 = _mm512_maskz_loadu_ps(mk[0], b);
                __m512 b1 = _mm512_maskz_loadu_ps(mk[1], b + 16);
                __m512 b2 = _mm512_maskz_loadu_ps(mk[2], b + 32);
                __m512 b3 = _mm512_maskz_loadu_ps(mk[3], b + 48);
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    __m512 a = _mm512_set1_ps(xr[i][l]);
                    c[i][0] = _mm512_fmadd_ps(a, b0, c[i][0]);
                    c[i][1] = _mm512_fmadd_ps(a, b1, c[i][1]);
                    c[i][2] = _mm512_fmadd_ps(a, b2, c[i][2]);
                    c[i][3] = _mm512_fmadd_ps(a, b3, c[i][3]);
                }
            }
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                if (i0 + i >= m)
                    break;
                float *yr = y + (i0 + i) * ldy + j0;
#pragma GCC unroll 4
                for (int v = 0; v < 4; v++) {
                    __m512 s = _mm512_mul_ps(va, c[i][v]);
                    if (acc)
                        s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(mk[v], yr + 16 * v));
                    _mm512_mask_storeu_ps(yr + 16 * v, mk[v], s);
                }
            }
        }
    }
}

/* silu(x) = x sigmoid(x); with e = exp(-|x|) in (0, 1], sigmoid is 1/(1+e) for x >= 0 and
 * e/(1+e) below, so only exp of a non-positive argument is needed. */
AVX512_INLINE __m512
avx512_silu16(__m512 x)
{
    /* past -80 the result is below 1e-33: zero, and no denormal ever enters the arithmetic */
    __m512 e = avx512_exp_neg(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)),
                                            _mm512_set1_ps(-80.0f)));
    __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    r = _mm512_mask_mul_ps(r, neg, r, e);
    r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-80.0f), _CMP_GE_OQ), r);
    return _mm512_mul_ps(x, r);
}

SIMD_SILU(avx512_silu, __m512, 16, avx512_silu16, _mm512_loadu_ps, _mm512_storeu_ps,
          _mm512_mul_ps, avx512_load_tail, avx512_store_tail)

static const struct k_kernels avx512_table = X86_TABLE(AVX512_NAME);

const struct k_kernels *
kernels_avx512(void)
{
    const struct k_cpu_features *f = k_cpu_features();

    if (!f->avx512f || !f->avx512bw || !f->avx512vl || !f->avx512dq || !f->fma || !f->f16c)
        return NULL;
#ifdef KLI_VNNI
    if (!f->avx512vnni)
        return NULL;
#endif
    return &avx512_table;
}
