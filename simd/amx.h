/*
 * amx.h - the prefill GEMM of the amx table, written once over seven tile operations.
 *
 * No intrinsics here: simd/amx.c includes this file after defining the operations as the
 * AMX instructions, tests/test-amx.c after defining them as a scalar emulation of the same
 * instructions (with checks of the tile shapes that the hardware would fault on), so the
 * algorithm below (the tile configuration, the packing, the order of the tile operations)
 * is tested on any machine and the AMX build is its direct transcription. The operations
 * (tile numbers are literal digits: the instructions encode them):
 *   AMX_CONFIG(cfg)          ldtilecfg of a struct amx_tilecfg
 *   AMX_ZERO(t)              tilezero
 *   AMX_LOAD(t, p, stride)   tileloadd: rows(t) rows of colsb(t) bytes, `stride` bytes apart
 *   AMX_STORE(t, p, stride)  tilestored, the same layout
 *   AMX_DP_BF16(c, a, b)     tdpbf16ps: c[i][j] += sum_l a[i][2l] b[l][2j] + a[i][2l+1] b[l][2j+1]
 *                            (bf16 pairs, float32 sums)
 *   AMX_DP_S8(c, a, b)       tdpbssd: c[i][j] += sum_l sum_e a[i][4l+e] b[l][4j+e] (int8,
 *                            int32 sums)
 *   AMX_RELEASE()            tilerelease
 * and AMX_F16(p), the f16 at p as a float.
 *
 * The product y[t][r] = sum_j x[t][j] W[r][j] runs with W as the A operand: a tile row is
 * 32 consecutive elements (bf16) or one block's 32 int8 values (Q8_0) of a weight row, loaded
 * straight from W with the row stride, so the weights are never repacked. The activations
 * are the B operand, packed per block of 32 tokens and a slice of k (amx_kc) into the pair
 * (bf16) or quad (int8) layout. Tiles: C 0..3 = (rows 0..15, 16..31) x (tokens 0..15,
 * 16..31), A 4..5 = the two halves of 32 weight rows, B 6..7 the packed tokens.
 *
 *  - BF16: each activation is split into two bf16, hi = bf16(x) and lo = bf16(x - hi) (round
 *    to nearest even), and both go through the tiles: hi + lo differs from x by at most
 *    2^-16 |x|. (bf16 alone, 2^-8 |x|, moved tests/test-model's prompt logits 9e-2 from the
 *    golden ones, its tolerance being 1e-4; hi + lo left them at float32's 1.3e-5: both
 *    measured with the rounding applied to x ahead of the avx2 kernels. doc/model.md,
 *    decision 2.) The products with the bf16 weights are exact in float32 and summed in
 *    float32. B 6..7 hold hi and lo of one half of the tokens at a time; C stays in the
 *    tiles for a whole slice.
 *  - Q8_0: the activations are quantized per block of 32 exactly as the avx512vnni decode
 *    kernels do (scale amax/127, round to nearest, see avx512_quant_block), so the integer
 *    block sums are theirs: one tdpbssd per block into zeroed C tiles, stored, and scaled by
 *    d_w d_x into a float accumulator (the blocks have different scales, so the integer sums
 *    of two blocks never meet). Only the float summation order differs from avx512vnni.
 *  - Q4: as Q8_0, its blocks widened to Q8_0's (nibble - 8 as int8, the same scale) in a
 *    copy of 32 rows: the integer block sums of avx512vnni's Q4 kernels again.
 * Rows past the last full 32 go through a zero-padded copy; tokens past the last full 32 are
 * zeros in the packed activations and their results are not stored.
 */
#ifndef KLI_SIMD_AMX_H
#define KLI_SIMD_AMX_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define AMX_TB 32       /* tokens (and weight rows) per block: two tiles of 16 */
#define AMX_KC 1024     /* columns of k per slice of packed activations (bf16: half) */
#define AMX_MPACK 16    /* m from which the tiles run (below: the base table's kernels) */

/* ldtilecfg's 64-byte operand (palette 1). */
struct amx_tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
_Static_assert(sizeof(struct amx_tilecfg) == 64, "ldtilecfg reads 64 bytes");

/* Whether the tiles take this product (else the base table does): k whole steps of 32. */
static inline int
amx_takes(enum k_dtype dt, int64_t k, int64_t m)
{
    return (dt == KLI_DT_BF16 || dt == KLI_DT_Q8_0 || dt == KLI_DT_Q4) && m >= AMX_MPACK &&
           k > 0 && k % 32 == 0;
}

static void
amx_config(enum k_dtype dt, struct amx_tilecfg *c)
{
    int q8 = dt != KLI_DT_BF16;   /* int8 tiles: Q8_0, and Q4 widened to it */

    memset(c, 0, sizeof(*c));
    c->palette = 1;
    for (int i = 0; i < 8; i++) {
        c->rows[i] = i >= 6 && q8 ? 8 : 16;     /* B of int8: 32 k in quads */
        c->colsb[i] = i >= 4 && i < 6 && q8 ? 32 : 64;   /* A of int8: one block */
    }
}

/* Columns of k per slice: the packed bf16 activations take twice the bytes (hi and lo). */
static inline int64_t
amx_kc(enum k_dtype dt)
{
    return dt == KLI_DT_BF16 ? AMX_KC / 2 : AMX_KC;
}

/* The bf16 (round to nearest even) of the float with bits u, as the upper half of a word. */
static inline uint32_t
amx_bf16_hi(uint32_t u)
{
    return (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
}

/* x[t][j] (t < nt, j < kc; tokens nt..31 zero) as hi = bf16(x) and lo = bf16(x - hi) into B
 * tiles of pairs: step s (32 columns), half h (16 tokens), part p (hi, lo) at xp + 4096 s +
 * 2048 h + 1024 p, row l (columns 2l, 2l + 1), token t at 64 l + 4 t. A token's row is split
 * first (hi | lo << 16 per column, a loop the compiler vectorizes), then its pairs go to
 * their tile rows. (NaN is not kept: activations are finite.) */
static void
amx_pack_bf16(const float *x, int64_t ldx, int nt, int64_t kc, uint8_t *xp)
{
    uint32_t sp[AMX_KC / 2];

    for (int t = 0; t < AMX_TB; t++) {
        if (t < nt) {
            for (int64_t j0 = 0; j0 < kc; j0 += 32) {
                for (int j = 0; j < 32; j++) {
                    uint32_t u, h, v;
                    float f = x[t * ldx + j0 + j], r;
                    memcpy(&u, &f, 4);
                    h = amx_bf16_hi(u);
                    memcpy(&r, &h, 4);
                    r = f - r;
                    memcpy(&v, &r, 4);
                    sp[j0 + j] = h >> 16 | amx_bf16_hi(v);
                }
            }
        } else {
            memset(sp, 0, sizeof(sp));
        }
        uint8_t *d = xp + 2048 * (t / 16) + 4 * (t % 16);
        for (int64_t s = 0; s < kc / 32; s++) {
            for (int l = 0; l < 16; l++) {
                uint32_t a = sp[32 * s + 2 * l], b = sp[32 * s + 2 * l + 1];
                uint32_t hi = (a & 0xffffu) | b << 16, lo = a >> 16 | (b & 0xffff0000u);
                memcpy(d + 4096 * s + 64 * l, &hi, 4);
                memcpy(d + 4096 * s + 1024 + 64 * l, &lo, 4);
            }
        }
    }
}

/* One block of 32 floats to int8 with scale amax/127, as avx512_quant_block. */
static void
amx_quant32(const float *x, int8_t *q, float *d)
{
    float amax = 0.0f;

    for (int j = 0; j < 32; j++)
        amax = fmaxf(amax, fabsf(x[j]));
    float id = amax >= 1e-30f ? 127.0f / amax : 0.0f;
    for (int j = 0; j < 32; j++) {
        float v = rintf(x[j] * id);
        q[j] = (int8_t)(v > 127.0f ? 127 : v < -128.0f ? -128 : (int)v);
    }
    *d = amax / 127.0f;
}

/* x[t][j] quantized per block into B tiles of int8 quads: block b, half h at xp + 1024 b +
 * 512 h, row l, token t at 64 l + 4 t; the scales at xd[32 b + t] (zero past nt). */
static void
amx_pack_q8(const float *x, int64_t ldx, int nt, int64_t kc, uint8_t *xp, float *xd)
{
    int8_t q[32];

    for (int t = 0; t < AMX_TB; t++) {
        for (int64_t b = 0; b < kc / 32; b++) {
            uint8_t *d = xp + 1024 * b + 512 * (t / 16) + 4 * (t % 16);
            if (t < nt) {
                amx_quant32(x + t * ldx + 32 * b, q, &xd[32 * b + t]);
            } else {
                memset(q, 0, sizeof(q));
                xd[32 * b + t] = 0.0f;
            }
            for (int l = 0; l < 8; l++)
                memcpy(d + 64 * l, q + 4 * l, 4);
        }
    }
}

/* Zeroes the C tiles. */
static inline void
amx_zero_c(void)
{
    AMX_ZERO(0);
    AMX_ZERO(1);
    AMX_ZERO(2);
    AMX_ZERO(3);
}

/* Stores the C tiles to p[4][16][16] (4-byte elements). */
static inline void
amx_store_c(void *p)
{
    uint8_t *c = p;

    AMX_STORE(0, c, 64);
    AMX_STORE(1, c + 1024, 64);
    AMX_STORE(2, c + 2048, 64);
    AMX_STORE(3, c + 3072, 64);
}

/* acc[4][16][16] = the 32 rows at w (stride rb bytes) . the packed tokens, over `steps` steps
 * of 32 columns: C tile i holds row half i / 2, token half i % 2. */
static void
amx_block_bf16(const uint8_t *w, size_t rb, const uint8_t *xp, int64_t steps, float *acc)
{
    amx_zero_c();
    for (int64_t s = 0; s < steps; s++) {
        const uint8_t *xs = xp + 4096 * s;
        AMX_LOAD(4, w + 64 * s, rb);
        AMX_LOAD(5, w + 16 * rb + 64 * s, rb);
        AMX_LOAD(6, xs, 64);            /* tokens 0..15, hi */
        AMX_LOAD(7, xs + 1024, 64);     /* tokens 0..15, lo */
        AMX_DP_BF16(0, 4, 6);
        AMX_DP_BF16(2, 5, 6);
        AMX_DP_BF16(0, 4, 7);
        AMX_DP_BF16(2, 5, 7);
        AMX_LOAD(6, xs + 2048, 64);     /* tokens 16..31, hi */
        AMX_LOAD(7, xs + 3072, 64);     /* tokens 16..31, lo */
        AMX_DP_BF16(1, 4, 6);
        AMX_DP_BF16(3, 5, 6);
        AMX_DP_BF16(1, 4, 7);
        AMX_DP_BF16(3, 5, 7);
    }
    amx_store_c(acc);
}

/* The same for 32 Q8_0 rows over nb blocks: each block's integer sums scaled by d_w d_x. */
static void
amx_block_q8(const uint8_t *w, size_t rb, const uint8_t *xp, const float *xd, int64_t nb,
             float *acc)
{
    int32_t ci[4 * 256] __attribute__((aligned(64)));
    float dw[AMX_TB];

    memset(acc, 0, 4 * 256 * sizeof(float));
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + 34 * b;
        for (int r = 0; r < AMX_TB; r++)   /* each row's scale, once for both token halves */
            dw[r] = AMX_F16(wb + (size_t)r * rb);
        amx_zero_c();
        AMX_LOAD(4, wb + 2, rb);
        AMX_LOAD(5, wb + 16 * rb + 2, rb);
        AMX_LOAD(6, xp + 1024 * b, 64);
        AMX_LOAD(7, xp + 1024 * b + 512, 64);
        AMX_DP_S8(0, 4, 6);
        AMX_DP_S8(1, 4, 7);
        AMX_DP_S8(2, 5, 6);
        AMX_DP_S8(3, 5, 7);
        amx_store_c(ci);
        for (int i = 0; i < 4; i++) {
            const float *dx = xd + 32 * b + 16 * (i % 2);
            for (int r = 0; r < 16; r++) {
                float dr = dw[16 * (i / 2) + r], *a = acc + 256 * i + 16 * r;
                const int32_t *c = ci + 256 * i + 16 * r;
                for (int t = 0; t < 16; t++)
                    a[t] += (float)c[t] * (dr * dx[t]);
            }
        }
    }
}

/* y[t][r] (+)= the block's result, t < nt, r < nr. */
static void
amx_put(float *y, int64_t ldy, const float *acc, int nr, int nt, int add)
{
    for (int t = 0; t < nt; t++) {
        float *yt = y + t * ldy;
        for (int r = 0; r < nr; r++) {
            float v = acc[256 * (2 * (r / 16) + t / 16) + 16 * (r % 16) + t % 16];
            yt[r] = add ? yt[r] + v : v;
        }
    }
}

/* nb Q4 blocks (18 bytes: f16 d, nibbles of elements i and 16 + i in byte i) as Q8_0 blocks
 * (34 bytes: the same d, 32 int8 values nibble - 8): the same products, as int8. */
static void
amx_widen_q4(uint8_t *dst, const uint8_t *src, int64_t nb)
{
    for (int64_t b = 0; b < nb; b++, dst += 34, src += 18) {
        memcpy(dst, src, 2);
        for (int i = 0; i < 16; i++) {
            dst[2 + i] = (uint8_t)((src[2 + i] & 15) - 8);
            dst[18 + i] = (uint8_t)((src[2 + i] >> 4) - 8);
        }
    }
}

/* The product on tiles, for amx_takes(dt, k, m). Q4 runs as Q8_0: 32 rows of a slice are
 * widened into wt, once per block of 32 tokens. */
static void
amx_gemm(enum k_dtype dt, float *y, int64_t ldy, const float *x, int64_t ldx,
         const uint8_t *w, int64_t n, int64_t k, int64_t m)
{
    uint8_t xp[AMX_TB * AMX_KC * 2] __attribute__((aligned(64)));   /* packed tokens */
    uint8_t wt[AMX_TB * AMX_KC / 32 * 34] __attribute__((aligned(64)));   /* the last rows */
    float xd[AMX_KC] __attribute__((aligned(64)));                  /* Q8_0 x scales */
    float acc[4 * 256] __attribute__((aligned(64)));
    size_t rb = (size_t)dtype_nbytes(dt, (uint64_t)k);
    struct amx_tilecfg cfg;

    amx_config(dt, &cfg);
    AMX_CONFIG(&cfg);
    for (int64_t t0 = 0; t0 < m; t0 += AMX_TB) {
        int nt = m - t0 < AMX_TB ? (int)(m - t0) : AMX_TB;
        for (int64_t k0 = 0; k0 < k; k0 += amx_kc(dt)) {
            int64_t kc = k - k0 < amx_kc(dt) ? k - k0 : amx_kc(dt);
            size_t off = (size_t)dtype_nbytes(dt, (uint64_t)k0);
            size_t sb = (size_t)dtype_nbytes(dt, (uint64_t)kc);
            if (dt != KLI_DT_BF16)
                amx_pack_q8(x + t0 * ldx + k0, ldx, nt, kc, xp, xd);
            else
                amx_pack_bf16(x + t0 * ldx + k0, ldx, nt, kc, xp);
            for (int64_t r0 = 0; r0 < n; r0 += AMX_TB) {
                int nr = n - r0 < AMX_TB ? (int)(n - r0) : AMX_TB;
                const uint8_t *wb = w + r0 * rb + off;
                size_t stride = rb;
                if (nr < AMX_TB || dt == KLI_DT_Q4) {
                    size_t wsb = dt == KLI_DT_Q4 ? (size_t)kc / 32 * 34 : sb;
                    if (nr < AMX_TB)
                        memset(wt, 0, AMX_TB * wsb);
                    for (int r = 0; r < nr; r++) {
                        if (dt == KLI_DT_Q4)
                            amx_widen_q4(wt + r * wsb, wb + r * rb, kc / 32);
                        else
                            memcpy(wt + r * wsb, wb + r * rb, sb);
                    }
                    wb = wt;
                    stride = wsb;
                }
                if (dt != KLI_DT_BF16)
                    amx_block_q8(wb, stride, xp, xd, kc / 32, acc);
                else
                    amx_block_bf16(wb, stride, xp, kc / 32, acc);
                amx_put(y + t0 * ldy + r0, ldy, acc, nr, nt, k0 > 0);
            }
        }
    }
    AMX_RELEASE();
}

/* A matmul entry of the amx table: the tiles where they take the product, else `base`'s
 * kernel (the avx512vnni table's; the emulation's tests pass generic's). */
static inline void
amx_matmul(const struct k_kernels *base, enum k_dtype dt, float *y, int64_t ldy,
           const float *x, int64_t ldx, const void *w, int64_t n, int64_t k, int64_t m)
{
    if (n > 0 && amx_takes(dt, k, m))
        amx_gemm(dt, y, ldy, x, ldx, w, n, k, m);
    else
        base->matmul[dt](y, ldy, x, ldx, w, n, k, m);
}

#endif
