/*
 * avx2.h - the 256-bit primitives that avx2.c and avx512.c share (AVX2, FMA and F16C; every
 * AVX-512 CPU has them): widening loads, the 8x8 transpose and the prefill packer.
 *
 * Included only by simd/avx2.c and simd/avx512.c, after <immintrin.h> and after they define
 * X86_NR (rows per GEMM panel, the packer's destination stride). Everything here is static
 * and inlined into the including file, so each ISA compiles it with its own flags.
 */
#ifndef KLI_SIMD_AVX2_H
#define KLI_SIMD_AVX2_H

#include <stdint.h>
#include <string.h>

#include "simd.h"

#define AVX2_INLINE static inline __attribute__((always_inline))

AVX2_INLINE float
avx2_hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));

    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* the largest of v's lanes */
AVX2_INLINE float
avx2_hmax(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));

    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* acc[i] = 0 for i < n (a constant after inlining) */
AVX2_INLINE void
avx2_zeros(int n, __m256 *acc)
{
#pragma GCC unroll 8
    for (int i = 0; i < n; i++)
        acc[i] = _mm256_setzero_ps();
}

/* out[i] = the sum of acc[i]'s lanes, i < n (a constant after inlining) */
AVX2_INLINE void
avx2_hsums(int n, const __m256 *acc, float *out)
{
#pragma GCC unroll 8
    for (int i = 0; i < n; i++)
        out[i] = avx2_hsum(acc[i]);
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

/* The F16 or BF16 elements of h widened to floats, for both widths W (256, and 512 in
 * avx512.c): vcvtph2ps, or the 16-bit shift that makes a BF16 a float. */
#define X86_WIDEN_U16(W, dt, h)                                                               \
    ((dt) == KLI_DT_F16                                                                       \
         ? _mm##W##_cvtph_ps(h)                                                               \
         : _mm##W##_castsi##W##_ps(_mm##W##_slli_epi32(_mm##W##_cvtepu16_epi32(h), 16)))

/* Defines `name`, which loads W / 32 weights from element j of a float-type row (F32, F16 or
 * BF16), widened, for both widths W: F32 as it is, F16 and BF16 as W / 2 bits (HLOAD, an
 * unaligned load of the integer vector HT) then widened. */
#define X86_DEFINE_LOAD_ROW(name, W, HT, HLOAD)                                               \
    AVX2_INLINE __m##W                                                                        \
    name(enum k_dtype dt, const uint8_t *row, int64_t j)                                      \
    {                                                                                         \
        if (dt == KLI_DT_F32)                                                                 \
            return _mm##W##_loadu_ps((const float *)row + j);                                 \
        HT h = HLOAD((const HT *)(row + 2 * j));                                              \
        return X86_WIDEN_U16(W, dt, h);                                                       \
    }

/* Eight weights from element j of a float-type row (F32, F16 or BF16), widened. */
X86_DEFINE_LOAD_ROW(avx2_load8, 256, __m128i, _mm_loadu_si128)

AVX2_INLINE float
avx2_load1(enum k_dtype dt, const uint8_t *row, int64_t j)
{
    return simd_load1(dt, row, j, avx2_f16);
}

/* Eight f16 block scales as floats: lane i < 4 from p + i * a, lane 4 + i from p + b + i * a
 * (a, b constants after inlining: avx512.c's eight consecutive blocks, a stride s and
 * b = 4 s; avx2.c's Q4 group order b0 b2 b4 b6 b1 b3 b5 b7, a = 36 and b = 18). */
AVX2_INLINE __m256
avx2_scales8(const uint8_t *p, int a, int b)
{
    __m128i h = _mm_cvtsi32_si128(avx2_u16(p));

    h = _mm_insert_epi16(h, avx2_u16(p + a), 1);
    h = _mm_insert_epi16(h, avx2_u16(p + 2 * a), 2);
    h = _mm_insert_epi16(h, avx2_u16(p + 3 * a), 3);
    h = _mm_insert_epi16(h, avx2_u16(p + b), 4);
    h = _mm_insert_epi16(h, avx2_u16(p + b + a), 5);
    h = _mm_insert_epi16(h, avx2_u16(p + b + 2 * a), 6);
    h = _mm_insert_epi16(h, avx2_u16(p + b + 3 * a), 7);
    return _mm256_cvtph_ps(h);
}

/* sum of the 32 int8 in q */
AVX2_INLINE int32_t
avx2_sum_i8(__m256i q)
{
    __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q),
                                  _mm256_set1_epi16(1));
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));

    h = _mm_add_epi32(h, _mm_unpackhi_epi64(h, h));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 1));
    return _mm_cvtsi128_si32(h);
}

/* Stores the transpose of the 8x8 block v[i][j]: dst[j * ds + i] (dst 32-byte aligned). */
AVX2_INLINE void
avx2_transpose8(const __m256 *v, float *dst, int64_t ds)
{
    __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
    __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
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

/* ==== the K types (Q2_K .. Q6_K), for avx2.c and avx512.c alike ========================= */

/*
 * One form for the weights of all five: a super-block (p) is eight vectors u_c of 32 unsigned
 * levels (elements 32c..32c+31, c < 8), sixteen int16 sub-block scales sc (one per 16 weights:
 * the types with sub-blocks of 32 repeat theirs), sixteen int16 mn and two floats d, dm:
 *     w_i = d sc[i/16] u_i - dm mn[i/16].
 * Q2_K, Q4_K, Q5_K: u = q, mn their minimums, dm = dmin. Q3_K and Q6_K have signed levels
 * and no minimum: u = q + o (o = 4, 32), mn = sc and dm = o d.
 *
 * The activations of one token, per super-block of 256, are AVX2_KSB bytes (kept a multiple
 * of 64 for avx512.c's regions):
 *   bytes 0..255    int8 x, element order, one scale d_x = amax / 127 for the 256
 *   bytes 256..287  int16 sums of x over the sixteen runs of 16
 *   bytes 288..291  float d_x
 * so that a super-block's dot product is
 *     d_x (d sum_c madd(maddubs(u_c, x_c), sc_c) - dm madd(mn, sums))
 * with integer sums throughout (sc_c: sc[2c] for the first 16 lanes of x_c's pair sums,
 * sc[2c + 1] for the others). vpmaddubsw cannot saturate: u <= 63 and |x| <= 127 make a pair
 * at most 16002. (VNNI's vpdpbusd would add groups of four before the scales are applied, so
 * the vpmaddwd that applies them stays; avx512vnni fuses it with its add as vpdpwssd, which
 * does not saturate either: the same integers.)
 */
#define AVX2_KSB 320

/* Bytes per super-block of a K type (a constant after inlining). */
AVX2_INLINE size_t
avx2_k_bytes(enum k_dtype dt)
{
    switch (dt) {
    case KLI_DT_Q2_K: return 84;
    case KLI_DT_Q3_K: return 110;
    case KLI_DT_Q4_K: return 144;
    case KLI_DT_Q5_K: return 176;
    default: return 210;
    }
}

/* The bits of v's bytes at mask << from, moved to mask << to (per byte; from, to and mask
 * constants after inlining). The 16-bit shifts carry bits across bytes, which the mask drops. */
AVX2_INLINE __m256i
avx2_k_field(__m256i v, int from, int to, int mask)
{
    if (from > to)
        v = _mm256_srli_epi16(v, from - to);
    else if (to > from)
        v = _mm256_slli_epi16(v, to - from);
    return _mm256_and_si256(v, _mm256_set1_epi8((char)(mask << to)));
}

/* The scales, minimums and d, dm of the super-block at p (see above). */
AVX2_INLINE void
avx2_k_head(enum k_dtype dt, const uint8_t *p, __m256i *sc, __m256i *mn, float *d, float *dm)
{
    switch (dt) {
    case KLI_DT_Q2_K: {
        /* a byte per sub-block: scale in the low nibble, minimum in the high one */
        __m128i s = _mm_loadu_si128((const __m128i *)p), k4 = _mm_set1_epi8(0x0f);
        *sc = _mm256_cvtepu8_epi16(_mm_and_si128(s, k4));
        *mn = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s, 4), k4));
        *d = avx2_f16(p + 80);
        *dm = avx2_f16(p + 82);
        return;
    }
    case KLI_DT_Q3_K: {
        /* sixteen 6-bit values u, scale u - 32 (kli-weights(5)): with a0, a1, a2 the words at
         * p + 96, 100, 104, the 32-bit lanes of v are, per byte, a0 & 0xf, a1 & 0xf,
         * a0 >> 4 & 0xf and a1 >> 4 & 0xf with a2's bit pairs 0, 1, 2 and 3 above them
         * (loaded from p + 92, whose lanes 1..3 are a0..a2, not to read past the block) */
        __m128i h = _mm_loadu_si128((const __m128i *)(p + 92));
        __m128i a = _mm_shuffle_epi32(h, _MM_SHUFFLE(2, 1, 2, 1));
        __m128i b = _mm_shuffle_epi32(h, _MM_SHUFFLE(3, 3, 3, 3));
        b = _mm_srlv_epi32(_mm_sllv_epi32(b, _mm_setr_epi32(4, 2, 0, 0)),
                           _mm_setr_epi32(0, 0, 0, 2));
        __m128i u = _mm_or_si128(
            _mm_and_si128(_mm_srlv_epi32(a, _mm_setr_epi32(0, 0, 4, 4)), _mm_set1_epi8(0x0f)),
            _mm_and_si128(b, _mm_set1_epi8(0x30)));
        *sc = *mn = _mm256_sub_epi16(_mm256_cvtepu8_epi16(u), _mm256_set1_epi16(32));
        *d = avx2_f16(p + 108);
        *dm = 4.0f * *d;
        return;
    }
    case KLI_DT_Q4_K:
    case KLI_DT_Q5_K: {
        /* eight 6-bit scales and minimums, each repeated for the two halves of its 32. With
         * a0, a1, a2 the words at p + 4, 8, 12, the 32-bit lanes of v are sc0..3 = a0 & 0x3f,
         * sc4..7 = a2 & 0xf | (a0 >> 6 & 3) << 4, mn0..3 = a1 & 0x3f and mn4..7 = a2 >> 4 &
         * 0xf | (a1 >> 6 & 3) << 4 per byte (kli-weights(5)), in one register: the two top
         * bits of a byte, shifted right by 2 within its 32-bit word, land at bits 4..5 */
        __m128i h = _mm_loadu_si128((const __m128i *)p);
        __m128i a = _mm_shuffle_epi32(h, _MM_SHUFFLE(3, 2, 3, 1));
        __m128i b = _mm_shuffle_epi32(h, _MM_SHUFFLE(2, 2, 1, 1));
        __m128i v = _mm_or_si128(
            _mm_and_si128(_mm_srlv_epi32(a, _mm_setr_epi32(0, 0, 0, 4)),
                          _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f)),
            _mm_and_si128(_mm_srli_epi32(b, 2), _mm_setr_epi32(0, 0x30303030, 0, 0x30303030)));
        __m128 f = _mm_cvtph_ps(h);
        *sc = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, v));
        *mn = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(v, v));
        *d = _mm_cvtss_f32(f);
        *dm = _mm_cvtss_f32(_mm_movehdup_ps(f));
        return;
    }
    default:
        *sc = *mn = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 192)));
        *d = avx2_f16(p + 208);
        *dm = 32.0f * *d;
        return;
    }
}

/* The levels u of elements 32c..32c+31 of the super-block at p (c a constant after
 * inlining; loads of the same bytes for several c are one load). */
AVX2_INLINE __m256i
avx2_k_levels(enum k_dtype dt, const uint8_t *p, int c)
{
    switch (dt) {
    case KLI_DT_Q2_K:
        return avx2_k_field(_mm256_loadu_si256((const __m256i *)(p + 16 + 32 * (c / 4))),
                            2 * (c % 4), 0, 3);
    case KLI_DT_Q3_K:
        return _mm256_or_si256(
            avx2_k_field(_mm256_loadu_si256((const __m256i *)(p + 32 + 32 * (c / 4))),
                         2 * (c % 4), 0, 3),
            avx2_k_field(_mm256_loadu_si256((const __m256i *)p), c, 2, 1));
    case KLI_DT_Q4_K:
        return avx2_k_field(_mm256_loadu_si256((const __m256i *)(p + 16 + 32 * (c / 2))),
                            4 * (c % 2), 0, 15);
    case KLI_DT_Q5_K:
        return _mm256_or_si256(
            avx2_k_field(_mm256_loadu_si256((const __m256i *)(p + 48 + 32 * (c / 2))),
                         4 * (c % 2), 0, 15),
            avx2_k_field(_mm256_loadu_si256((const __m256i *)(p + 16)), c, 4, 1));
    default: {
        const uint8_t *ql = p + 64 * (c / 4) + 32 * (c % 2), *qh = p + 128 + 32 * (c / 4);
        return _mm256_or_si256(
            avx2_k_field(_mm256_loadu_si256((const __m256i *)ql), 4 * (c % 4 / 2), 0, 15),
            avx2_k_field(_mm256_loadu_si256((const __m256i *)qh), 2 * (c % 4), 4, 3));
    }
    }
}

/* The int16 scales of chunk c for its 16 pair sums, from sc4: the eight scales of chunks
 * 4 (c / 4) .. 4 (c / 4) + 3 in both 128-bit lanes. */
AVX2_INLINE __m256i
avx2_k_scale(__m256i sc4, int c)
{
    const __m256i ctl = _mm256_add_epi8(_mm256_set1_epi16((short)(0x0100 + 0x0404 * (c % 4))),
                                        _mm256_setr_epi64x(0, 0, 0x0202020202020202ll,
                                                           0x0202020202020202ll));

    return _mm256_shuffle_epi8(sc4, ctl);
}

AVX2_INLINE size_t
avx2_qk_bytes(int64_t nb)
{
    return (size_t)(nb / 8) * AVX2_KSB;
}

/* 32 floats times id, rounded to int8 (|x id| <= 127), in element order. */
AVX2_INLINE __m256i
avx2_quant32(const float *x, __m256 id)
{
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), id));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), id));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16), id));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 24), id));
    __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));

    return _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* Where chunk c of a super-block's int8 x is stored in a K region: at 32 c (avx2), or at
 * avx512.c's pair positions, chunks c and c + 2 side by side (0 2 1 3 4 6 5 7). */
AVX2_INLINE int
avx2_k_slot(int c, int pairs)
{
    return pairs ? (c & 4) | (c & 1) << 1 | (c & 2) >> 1 : c;
}

/* One token's K region for nb 32-blocks (whole super-blocks) of x, its chunks where
 * avx2_k_slot puts them (pairs a constant after inlining). */
AVX2_INLINE void
avx2_quant_qk_at(const float *x, int64_t nb, uint8_t *buf, int pairs)
{
    const __m256 sgn = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);

    for (int64_t s = 0; s < nb / 8; s++, x += KLI_QK_K, buf += AVX2_KSB) {
        __m256 mx = _mm256_setzero_ps();
        __m256i sum[8], h[2];
        for (int j = 0; j < KLI_QK_K; j += 8)
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sgn, _mm256_loadu_ps(x + j)));
        float amax = avx2_hmax(mx);
        __m256 id = _mm256_set1_ps(amax >= 1e-30f ? 127.0f / amax : 0.0f);
        float d = amax / 127.0f;
        for (int c = 0; c < 8; c++) {
            __m256i q = avx2_quant32(x + 32 * c, id);
            _mm256_store_si256((__m256i *)(buf + 32 * avx2_k_slot(c, pairs)), q);
            /* sums of four: elements 0..15 in lanes 0..3, 16..31 in lanes 4..7 */
            sum[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q),
                                       _mm256_set1_epi16(1));
        }
        /* two rounds of vphaddd leave [c0 c1 c2 c3 | c0' c1' c2' c3'] (c: elements 0..15 of
         * chunk c, c': 16..31); the permute puts them in run order */
        for (int i = 0; i < 2; i++)
            h[i] = _mm256_permutevar8x32_epi32(
                _mm256_hadd_epi32(_mm256_hadd_epi32(sum[4 * i], sum[4 * i + 1]),
                                  _mm256_hadd_epi32(sum[4 * i + 2], sum[4 * i + 3])), order);
        _mm256_store_si256((__m256i *)(buf + 256),
                           _mm256_permute4x64_epi64(_mm256_packs_epi32(h[0], h[1]), 0xd8));
        memcpy(buf + 288, &d, 4);
    }
}

static inline void
avx2_quant_qk(const float *x, int64_t nb, uint8_t *buf)
{
    avx2_quant_qk_at(x, nb, buf, 0);
}

/* acc + madd(a, b): one vpdpwssd where the including file is built with VNNI (avx512vnni) */
#ifdef KLI_VNNI
#define AVX2_K_MADD(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)
#else
#define AVX2_K_MADD(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#endif

/* Prefetches the bb bytes of a super-block at p (its lines and its last byte). */
AVX2_INLINE void
avx2_k_fetch(const uint8_t *p, size_t bb)
{
    for (size_t l = 0; l < bb; l += 64)
        _mm_prefetch((const char *)(p + l), _MM_HINT_T0);
    _mm_prefetch((const char *)(p + bb - 1), _MM_HINT_T0);
}

/* acc + d_x (d isum - dm madd(mn, sums)) for the token region xs of a super-block, d and dm
 * broadcast in vd, vm. */
AVX2_INLINE __m256
avx2_k_finish(__m256 acc, __m256i isum, __m256i mn, __m256 vd, __m256 vm, const uint8_t *xs)
{
    __m256i sums = _mm256_load_si256((const __m256i *)(xs + 256));
    __m256 ms = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(mn, sums)), vm);
    __m256 v = _mm256_fmsub_ps(_mm256_cvtepi32_ps(isum), vd, ms);

    return _mm256_fmadd_ps(v, _mm256_broadcast_ss((const float *)(xs + 288)), acc);
}

/*
 * out[r nt + t] = row r . token t over nsb super-blocks, r < nr, t < nt (constants, one of
 * them 1, nr nt <= 8): rows rb bytes apart, token regions `stride` bytes apart; the rows pf
 * bytes further are prefetched. Each super-block's levels and scales are unpacked once for
 * all the tokens; rows go one after the other (all four at once would not fit the registers).
 */
AVX2_INLINE void
avx2_qk_dot(enum k_dtype dt, int nr, int nt, const uint8_t *act, size_t stride, int64_t nsb,
            const uint8_t *w, size_t rb, size_t pf, float *out)
{
    const size_t bb = avx2_k_bytes(dt);
    __m256 acc[8];

    avx2_zeros(nr * nt, acc);
    for (int64_t s = 0; s < nsb; s++, w += bb, act += AVX2_KSB) {
#pragma GCC unroll 4
        for (int r = 0; r < nr; r++) {
            const uint8_t *p = w + r * rb;
            __m256i s16, mn, sc[2], isum[8];
            float d, dm;
            avx2_k_fetch(p + pf, bb);
            avx2_k_head(dt, p, &s16, &mn, &d, &dm);
            const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(dm);
            sc[0] = _mm256_permute2x128_si256(s16, s16, 0x00);
            sc[1] = _mm256_permute2x128_si256(s16, s16, 0x11);
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++)
                isum[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                __m256i u = avx2_k_levels(dt, p, c), sv = avx2_k_scale(sc[c / 4], c);
#pragma GCC unroll 8
                for (int t = 0; t < nt; t++) {
                    __m256i xq = _mm256_load_si256((const __m256i *)(act + t * stride + 32 * c));
                    isum[t] = AVX2_K_MADD(isum[t], _mm256_maddubs_epi16(u, xq), sv);
                }
            }
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++)
                acc[r * nt + t] = avx2_k_finish(acc[r * nt + t], isum[t], mn, vd, vm,
                                                act + t * stride);
        }
    }
    avx2_hsums(nr * nt, acc, out);
}

/* The 256 weights of the super-block at p as floats (out 32-byte aligned). */
AVX2_INLINE void
avx2_k_dequant(enum k_dtype dt, const uint8_t *p, float *out)
{
    __m256 a[2], b[2];
    __m256i sc, mn;
    float d, dm;

    avx2_k_head(dt, p, &sc, &mn, &d, &dm);
    /* d sc[j] and dm mn[j], runs 0..7 and 8..15 */
    for (int h = 0; h < 2; h++) {
        __m128i s = h ? _mm256_extracti128_si256(sc, 1) : _mm256_castsi256_si128(sc);
        __m128i m = h ? _mm256_extracti128_si256(mn, 1) : _mm256_castsi256_si128(mn);
        a[h] = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(s)));
        b[h] = _mm256_mul_ps(_mm256_set1_ps(dm), _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(m)));
    }
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) {
        __m256i u = avx2_k_levels(dt, p, c);
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            int j = 2 * c + h;
            __m256i ix = _mm256_set1_epi32(j % 8);
            __m256 sa = _mm256_permutevar8x32_ps(a[j / 8], ix);
            __m256 sb = _mm256_permutevar8x32_ps(b[j / 8], ix);
            __m128i q16 = h ? _mm256_extracti128_si256(u, 1) : _mm256_castsi256_si128(u);
            __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q16));
            __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q16, 8)));
            _mm256_store_ps(out + 16 * j, _mm256_fmsub_ps(f0, sa, sb));
            _mm256_store_ps(out + 16 * j + 8, _mm256_fmsub_ps(f1, sa, sb));
        }
    }
}

/* The packer's K case: eight rows of whole super-blocks (kc a multiple of 256). */
AVX2_INLINE void
avx2_pack8_k(enum k_dtype dt, const uint8_t *const *row, int64_t kc, float *dst)
{
    float t[8][KLI_QK_K] __attribute__((aligned(32)));
    const size_t bb = avx2_k_bytes(dt);
    __m256 v[8];

    for (int64_t s = 0; s * KLI_QK_K < kc; s++) {
        for (int i = 0; i < 8; i++)
            avx2_k_dequant(dt, row[i] + s * bb, t[i]);
        for (int j = 0; j < KLI_QK_K; j += 8) {
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                v[i] = _mm256_load_ps(t[i] + j);
            avx2_transpose8(v, dst + (s * KLI_QK_K + j) * X86_NR, X86_NR);
        }
    }
}

/*
 * The packer's primitive: eight rows x kc columns of W, converted to float, into
 * dst[j * X86_NR + i]. Columns past kc, up to the next multiple of 8, are zero. (The driver,
 * x86_pack in gemm.h, picks the rows and the panel.)
 */
static void
avx2_pack8(enum k_dtype dt, const uint8_t *const *row, int64_t kc, float *dst)
{
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m256i e8 = _mm256_set1_epi32(8);
    __m256 v[8];
    float d[8];
    int64_t j = 0;

    switch (dt) {
    case KLI_DT_F32:
    case KLI_DT_F16:
    case KLI_DT_BF16:
        for (; j + 8 <= kc; j += 8) {
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                v[i] = avx2_load8(dt, row[i], j);
            avx2_transpose8(v, dst + j * X86_NR, X86_NR);
        }
        if (j < kc) {
            float t[8][8] __attribute__((aligned(32)));
            memset(t, 0, sizeof(t));
            for (int i = 0; i < 8; i++) {
                for (int64_t jj = j; jj < kc; jj++)
                    t[i][jj - j] = avx2_load1(dt, row[i], jj);
                v[i] = _mm256_load_ps(t[i]);
            }
            avx2_transpose8(v, dst + j * X86_NR, X86_NR);
        }
        return;
    case KLI_DT_Q8_0:
        for (int64_t b = 0; j < kc; b++) {
            for (int i = 0; i < 8; i++)
                d[i] = avx2_f16(row[i] + b * 34);
            for (int s = 0; s < 4; s++, j += 8) {
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++) {
                    const uint8_t *p = row[i] + b * 34 + 2 + 8 * s;
                    __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
                    v[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_broadcast_ss(d + i));
                }
                avx2_transpose8(v, dst + j * X86_NR, X86_NR);
            }
        }
        return;
    case KLI_DT_Q4:
        for (int64_t b = 0; j < kc; b++, j += 32) {
            for (int i = 0; i < 8; i++)
                d[i] = avx2_f16(row[i] + b * 18);
            for (int s = 0; s < 2; s++) {
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++) {
                    const uint8_t *p = row[i] + b * 18 + 2 + 8 * s;
                    __m128i h = _mm_and_si128(_mm_loadl_epi64((const __m128i *)p), m4);
                    __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(h), e8);
                    v[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_broadcast_ss(d + i));
                }
                avx2_transpose8(v, dst + (j + 8 * s) * X86_NR, X86_NR);
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++) {
                    const uint8_t *p = row[i] + b * 18 + 2 + 8 * s;
                    __m128i h = _mm_loadl_epi64((const __m128i *)p);
                    h = _mm_and_si128(_mm_srli_epi16(h, 4), m4);
                    __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(h), e8);
                    v[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_broadcast_ss(d + i));
                }
                avx2_transpose8(v, dst + (j + 16 + 8 * s) * X86_NR, X86_NR);
            }
        }
        return;
    case KLI_DT_Q2_K: avx2_pack8_k(KLI_DT_Q2_K, row, kc, dst); return;
    case KLI_DT_Q3_K: avx2_pack8_k(KLI_DT_Q3_K, row, kc, dst); return;
    case KLI_DT_Q4_K: avx2_pack8_k(KLI_DT_Q4_K, row, kc, dst); return;
    case KLI_DT_Q5_K: avx2_pack8_k(KLI_DT_Q5_K, row, kc, dst); return;
    case KLI_DT_Q6_K: avx2_pack8_k(KLI_DT_Q6_K, row, kc, dst); return;
    default:
        return;
    }
}

#endif
