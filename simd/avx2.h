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

/* Eight weights from element j of a float-type row (F32, F16 or BF16), widened. */
AVX2_INLINE __m256
avx2_load8(enum k_dtype dt, const uint8_t *row, int64_t j)
{
    if (dt == KLI_DT_F32)
        return _mm256_loadu_ps((const float *)row + j);
    __m128i h = _mm_loadu_si128((const __m128i *)(row + 2 * j));
    return X86_WIDEN_U16(256, dt, h);
}

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
    default:
        return;
    }
}

#endif
