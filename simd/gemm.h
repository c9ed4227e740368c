/*
 * gemm.h - the matmul driver of the x86 kernels, written once over a few per-ISA primitives.
 *
 * No intrinsics here: avx2.c and avx512.c include this file at their end, after defining their
 * primitives as static inline functions, so each compiles its own copy of the driver with its
 * primitives inlined (the same loops, the same accumulation order as a hand-written copy).
 * matmul takes one of two paths, chosen by the number of token rows m (see avx2.c):
 *
 *  - m < X86(mpack)[dt], decode: W is streamed once, a few rows at a time, with the next rows
 *    prefetched, and each group of rows is dotted with every token while it is in L1.
 *    Float weights go through x86_stream_float; Q8_0, Q4 and the K types through x86_stream_q,
 *    which
 *    quantizes the activations into a stack buffer first, in slices of k when m tokens of
 *    it do not fit (the first slice writes y, later ones add to it).
 *  - m >= X86(mpack)[dt], prefill: x86_gemm, a blocked GEMM. Chunks of X86_NC rows x X86_KC
 *    columns of W are converted to float and packed into panels of X86_NR rows (x86_pack), then
 *    a register tile of up to X86_TM tokens x X86_NR rows runs over each panel.
 *
 * The including file defines X86(name) (its prefix, e.g. avx2_##name) and:
 *   X86_KC, X86_NR, X86_NC, X86_TM   the GEMM blocking (NR a multiple of 8)
 *   X86_DTM                          tokens per decode tile: 4, or 8 (then 4 for the rest);
 *                                    8 for the K types whatever it is
 *   X86_QBUF, X86_ALIGN              the activation buffer's bytes and alignment
 *   X86(mpack)[KLI_DT_COUNT]         the m from which the GEMM path is taken
 *   X86(dot_rows)(dt, nr, x, w, rb, pf, k, out)         float rows . one token, nr <= 4
 *   X86(dot_tile)(dt, nt, x, ldx, w, rb, pf, k, y, ldy) 3 float rows . nt tokens
 *   X86(quant_q8|q4)(x, nb, buf), X86(q8|q4_bytes)(nb)  one token's activation region
 *   X86(q8|q4_rows)(nr, act, nb, w, rb, pf, out)        nr rows . one token
 *   X86(q8|q4_tile)(nt, act, stride, nb, p, pf, out)    one row . nt tokens, nt <= X86_DTM
 *   X86(quant_qk)(x, nb, buf), X86(qk_bytes)(nb)   the same for the K types (Q2_K .. Q6_K),
 *                                    whose regions go by super-blocks of 256 (avx2.h has them)
 *   X86(qk_dot)(dt, nr, nt, act, stride, nsb, w, rb, pf, out)
 *                                    nr K rows . nt tokens over nsb super-blocks, one of nr
 *                                    (<= 4) and nt (<= 8) 1
 *   X86(pack8)(dt, row, kc, dst)     eight rows of W into a panel (avx2.h has the 256-bit one)
 *   X86(tile)(pk, xt, kc, y, ldy, nr, nt, add)          the GEMM register tile
 * and, for X86_TABLE, the table's other kernels: X86(dot), X86(axpy), ... (see simd.h).
 * A new weight type adds a dot product and a tile (and a case in pack8), not a driver.
 */
#ifndef KLI_SIMD_GEMM_H
#define KLI_SIMD_GEMM_H

#include <stdint.h>
#include <string.h>

#include "simd.h"

#define X86_INLINE static inline __attribute__((always_inline))

/* Writes zeros to y[i][r], i < m, r < n (the k == 0 product). */
static void
x86_zero_y(float *y, int64_t ldy, int64_t n, int64_t m)
{
    for (int64_t i = 0; i < m; i++)
        memset(y + i * ldy, 0, (size_t)n * sizeof(float));
}

/* Stores a slice's partial products: the first slice writes, later ones add. */
X86_INLINE void
x86_put(float *y, const float *v, int nr, int add)
{
    for (int i = 0; i < nr; i++)
        y[i] = add ? y[i] + v[i] : v[i];
}

/* The same for one value per token, tokens ldy apart. */
X86_INLINE void
x86_put_col(float *y, int64_t ldy, const float *v, int nt, int add)
{
    for (int t = 0; t < nt; t++)
        y[t * ldy] = add ? y[t * ldy] + v[t] : v[t];
}

/* Prefetch distance in bytes for a group of `g` rows at r: the next group while there is one
 * (prefetches past the rows the caller owns can cost page walks), else 0 (the data being
 * read: a no-op). */
X86_INLINE size_t
x86_ahead(int64_t r, int64_t g, int64_t n, size_t rb)
{
    return r + 2 * g <= n ? (size_t)g * rb : 0;
}

/* ---- decode path, float weights ------------------------------------------------------- */

X86_INLINE void
x86_stream_float(enum k_dtype dt, float *y, int64_t ldy, const float *x, int64_t ldx,
                 const uint8_t *w, int64_t n, int64_t k, int64_t m)
{
    size_t rb = (size_t)k * (dt == KLI_DT_F32 ? 4 : 2);
    float out[4];
    int64_t r = 0;

    if (m == 1) {
        for (; r + 4 <= n; r += 4) {
            X86(dot_rows)(dt, 4, x, w + r * rb, rb, x86_ahead(r, 4, n, rb), k, out);
            memcpy(y + r, out, sizeof(out));
        }
    }
    /* several tokens: rows three at a time, every token against them while they are in L1 */
    for (; r + 3 <= n; r += 3) {
        const uint8_t *wr = w + r * rb;
        size_t pf = x86_ahead(r, 3, n, rb);
        int64_t t = 0;
#if X86_DTM == 8
        for (; t + 8 <= m; t += 8)
            X86(dot_tile)(dt, 8, x + t * ldx, ldx, wr, rb, pf, k, y + t * ldy + r, ldy);
#endif
        for (; t + 4 <= m; t += 4)
            X86(dot_tile)(dt, 4, x + t * ldx, ldx, wr, rb, pf, k, y + t * ldy + r, ldy);
        for (; t < m; t++) {
            X86(dot_rows)(dt, 3, x + t * ldx, wr, rb, pf, k, out);
            memcpy(y + t * ldy + r, out, 3 * sizeof(float));
        }
    }
    for (; r < n; r++) {
        for (int64_t t = 0; t < m; t++) {
            X86(dot_rows)(dt, 1, x + t * ldx, w + r * rb, rb, 0, k, out);
            y[t * ldy + r] = out[0];
        }
    }
}

/* ---- decode path, quantized weights ---------------------------------------------------- */

/* The per-dtype primitives of x86_stream_q; dt is a constant after inlining. */
X86_INLINE size_t
x86_qbytes(enum k_dtype dt, int64_t nb)
{
    if (dtype_is_k(dt))
        return X86(qk_bytes)(nb);
    return dt == KLI_DT_Q8_0 ? X86(q8_bytes)(nb) : X86(q4_bytes)(nb);
}

X86_INLINE void
x86_qrows(enum k_dtype dt, int nr, const uint8_t *act, int64_t nb, const uint8_t *w,
          size_t rb, size_t pf, float *out)
{
    if (dtype_is_k(dt))
        X86(qk_dot)(dt, nr, 1, act, 0, nb / 8, w, rb, pf, out);
    else if (dt == KLI_DT_Q8_0)
        X86(q8_rows)(nr, act, nb, w, rb, pf, out);
    else
        X86(q4_rows)(nr, act, nb, w, rb, pf, out);
}

X86_INLINE void
x86_qtile(enum k_dtype dt, int nt, const uint8_t *act, size_t stride, int64_t nb,
          const uint8_t *p, size_t pf, float *out)
{
    if (dtype_is_k(dt))
        X86(qk_dot)(dt, 1, nt, act, stride, nb / 8, p, 0, pf, out);
    else if (dt == KLI_DT_Q8_0)
        X86(q8_tile)(nt, act, stride, nb, p, pf, out);
    else
        X86(q4_tile)(nt, act, stride, nb, p, pf, out);
}

/* Elements of k (from `left`) per activation slice: all of it when m tokens fit the buffer,
 * else whole groups of 256. */
X86_INLINE int64_t
x86_qslice(enum k_dtype dt, int64_t left, int64_t m)
{
    if ((size_t)m * x86_qbytes(dt, left / 32) <= X86_QBUF)
        return left;
    return (int64_t)(X86_QBUF / ((size_t)m * x86_qbytes(dt, 8))) * 256;
}

/* Q8_0 (34-byte blocks of 32), Q4 (18-byte blocks of 32) or K-type (super-blocks of 256)
 * weights against m tokens. */
X86_INLINE void
x86_stream_q(enum k_dtype dt, float *y, int64_t ldy, const float *x, int64_t ldx,
             const uint8_t *w, int64_t n, int64_t k, int64_t m)
{
    uint8_t act[X86_QBUF] __attribute__((aligned(X86_ALIGN)));
    size_t rb = (size_t)dtype_nbytes(dt, (uint64_t)k);
    float out[8];

    for (int64_t k0 = 0, kq; k0 < k; k0 += kq) {
        kq = x86_qslice(dt, k - k0, m);
        int64_t nb = kq / 32;
        size_t stride = x86_qbytes(dt, nb);
        const uint8_t *wk = w + dtype_nbytes(dt, (uint64_t)k0);
        int64_t r = 0;
        for (int64_t t = 0; t < m; t++) {
            if (dtype_is_k(dt))
                X86(quant_qk)(x + t * ldx + k0, nb, act + t * stride);
            else if (dt == KLI_DT_Q8_0)
                X86(quant_q8)(x + t * ldx + k0, nb, act + t * stride);
            else
                X86(quant_q4)(x + t * ldx + k0, nb, act + t * stride);
        }
        if (m == 1) {
            /* groups of four rows to prefetch ahead: one, or for K-type rows short next to the
             * memory's latency (k = 1024: 576 bytes) as many as make 8 KiB: 7-16% faster there
             * on one Zen 5 core (Q4_K, avx512vnni, m = 1, n = 2304); k = 2304 keeps one */
            int64_t ga = dtype_is_k(dt) && 8192 / (4 * rb) > 1 ? (int64_t)(8192 / (4 * rb)) : 1;
            for (; r + 4 <= n; r += 4) {
                size_t pf = r + 4 * (ga + 1) <= n ? (size_t)ga * 4 * rb : x86_ahead(r, 4, n, rb);
                x86_qrows(dt, 4, act, nb, wk + r * rb, rb, pf, out);
                x86_put(y + r, out, 4, k0 > 0);
            }
            for (; r < n; r++) {
                x86_qrows(dt, 1, act, nb, wk + r * rb, rb, 0, out);
                x86_put(y + r, out, 1, k0 > 0);
            }
            continue;
        }
        for (; r < n; r++) {
            const uint8_t *p = wk + r * rb;
            size_t pf = x86_ahead(r, 1, n, rb);
            int64_t t = 0;
            /* eight tokens a tile where the ISA has the registers for it, and for the K types
             * everywhere: their tile holds only its integer sums in registers while it runs
             * through a super-block, and unpacking a super-block is most of its work */
            for (; (X86_DTM == 8 || dtype_is_k(dt)) && t + 8 <= m; t += 8) {
                x86_qtile(dt, 8, act + t * stride, stride, nb, p, pf, out);
                x86_put_col(y + t * ldy + r, ldy, out, 8, k0 > 0);
            }
            for (; t + 4 <= m; t += 4) {
                x86_qtile(dt, 4, act + t * stride, stride, nb, p, pf, out);
                x86_put_col(y + t * ldy + r, ldy, out, 4, k0 > 0);
            }
            switch (m - t) {
            case 3:
                x86_qtile(dt, 3, act + t * stride, stride, nb, p, pf, out);
                break;
            case 2:
                x86_qtile(dt, 2, act + t * stride, stride, nb, p, pf, out);
                break;
            case 1:
                x86_qtile(dt, 1, act + t * stride, stride, nb, p, pf, out);
                break;
            default:
                break;
            }
            x86_put_col(y + t * ldy + r, ldy, out, (int)(m - t), k0 > 0);
        }
    }
}

/* ---- prefill path: packed GEMM ----------------------------------------------------------- */

/* The K types are packed by whole super-blocks. */
_Static_assert(X86_KC % KLI_QK_K == 0, "X86_KC must be a multiple of 256");

/* Zero bytes that stand in for the rows of a panel past n (zero in every dtype). */
static const uint8_t x86_zero_row[X86_KC * 4] __attribute__((aligned(X86_ALIGN)));

/*
 * Converts rows [0, nc) x columns [0, kc) of W (w points at row 0, column k0) into panels of
 * X86_NR rows: element (row p * NR + i, column j) at pk[p * NR * kcp + j * NR + i], with kcp
 * = kc rounded up to 8. Rows past nc, up to the panel's end, and columns past kc are zero.
 */
static void
x86_pack(enum k_dtype dt, float *pk, const uint8_t *w, size_t rb, int64_t nc, int64_t kc)
{
    int64_t kcp = (kc + 7) & ~(int64_t)7;
    int64_t ncp = (nc + X86_NR - 1) / X86_NR * X86_NR;

    for (int64_t g = 0; g < ncp; g += 8) {
        const uint8_t *row[8];
        for (int64_t i = 0; i < 8; i++)
            row[i] = g + i < nc ? w + (size_t)(g + i) * rb : x86_zero_row;
        X86(pack8)(dt, row, kc, pk + (g / X86_NR) * X86_NR * kcp + g % X86_NR);
    }
}

static void
x86_gemm(enum k_dtype dt, float *y, int64_t ldy, const float *x, int64_t ldx,
         const uint8_t *w, int64_t n, int64_t k, int64_t m)
{
    float pk[X86_NC * X86_KC] __attribute__((aligned(X86_ALIGN)));
    size_t rb = (size_t)dtype_nbytes(dt, (uint64_t)k);

    for (int64_t r0 = 0; r0 < n; r0 += X86_NC) {
        int64_t nc = n - r0 < X86_NC ? n - r0 : X86_NC;
        for (int64_t k0 = 0; k0 < k; k0 += X86_KC) {
            int64_t kc = k - k0 < X86_KC ? k - k0 : X86_KC;
            int64_t kcp = (kc + 7) & ~(int64_t)7;
            x86_pack(dt, pk, w + r0 * rb + dtype_nbytes(dt, (uint64_t)k0), rb, nc, kc);
            for (int64_t t0 = 0; t0 < m; t0 += X86_TM) {
                int nt = m - t0 < X86_TM ? (int)(m - t0) : X86_TM;
                const float *xt[X86_TM];
                for (int t = 0; t < X86_TM; t++)
                    xt[t] = x + (t0 + (t < nt ? t : nt - 1)) * ldx + k0;
                for (int64_t p0 = 0; p0 < nc; p0 += X86_NR) {
                    int nr = nc - p0 < X86_NR ? (int)(nc - p0) : X86_NR;
                    X86(tile)(pk + p0 * kcp, xt, kc, y + t0 * ldy + r0 + p0, ldy, nr, nt,
                              k0 > 0);
                }
            }
        }
    }
}

/* ---- the entry points ------------------------------------------------------------------- */

X86_INLINE void
x86_matmul(enum k_dtype dt, float *y, int64_t ldy, const float *x, int64_t ldx,
           const void *w, int64_t n, int64_t k, int64_t m)
{
    if (n <= 0 || m <= 0)
        return;
    if (k == 0)
        x86_zero_y(y, ldy, n, m);
    else if (m >= X86(mpack)[dt])
        x86_gemm(dt, y, ldy, x, ldx, w, n, k, m);
    else if (dt == KLI_DT_Q8_0 || dt == KLI_DT_Q4 || dtype_is_k(dt))
        x86_stream_q(dt, y, ldy, x, ldx, w, n, k, m);
    else
        x86_stream_float(dt, y, ldy, x, ldx, w, n, k, m);
}

KLI_MATMUL_ENTRY(x86_matmul_f32, x86_matmul, KLI_DT_F32)
KLI_MATMUL_ENTRY(x86_matmul_f16, x86_matmul, KLI_DT_F16)
KLI_MATMUL_ENTRY(x86_matmul_bf16, x86_matmul, KLI_DT_BF16)
KLI_MATMUL_ENTRY(x86_matmul_q8_0, x86_matmul, KLI_DT_Q8_0)
KLI_MATMUL_ENTRY(x86_matmul_q4, x86_matmul, KLI_DT_Q4)
KLI_MATMUL_ENTRY(x86_matmul_q2_k, x86_matmul, KLI_DT_Q2_K)
KLI_MATMUL_ENTRY(x86_matmul_q3_k, x86_matmul, KLI_DT_Q3_K)
KLI_MATMUL_ENTRY(x86_matmul_q4_k, x86_matmul, KLI_DT_Q4_K)
KLI_MATMUL_ENTRY(x86_matmul_q5_k, x86_matmul, KLI_DT_Q5_K)
KLI_MATMUL_ENTRY(x86_matmul_q6_k, x86_matmul, KLI_DT_Q6_K)

/* An x86 ISA's table: the driver's matmuls and the including file's other kernels, X86(dot)
 * and so on (the file defines every one). */
#define X86_TABLE(variant) {                                                                  \
        .name = variant,                                                                      \
        .matmul = {                                                                           \
            [KLI_DT_F32] = x86_matmul_f32, [KLI_DT_F16] = x86_matmul_f16,                     \
            [KLI_DT_BF16] = x86_matmul_bf16, [KLI_DT_Q8_0] = x86_matmul_q8_0,                 \
            [KLI_DT_Q4] = x86_matmul_q4, [KLI_DT_Q2_K] = x86_matmul_q2_k,                    \
            [KLI_DT_Q3_K] = x86_matmul_q3_k, [KLI_DT_Q4_K] = x86_matmul_q4_k,                 \
            [KLI_DT_Q5_K] = x86_matmul_q5_k, [KLI_DT_Q6_K] = x86_matmul_q6_k,                 \
        },                                                                                    \
        .dot = X86(dot), .dot_decay = X86(dot_decay), .mul_decay = X86(mul_decay),            \
        .gemm_nn = X86(gemm_nn), .silu = X86(silu), .axpy = X86(axpy), .scale = X86(scale),   \
        .to_f32 = X86(to_f32),                                                                \
    }

#endif
