/*
 * simd.h - the table of CPU kernels, chosen once per process at run time.
 *
 * Every entry has a plain C version in generic.c (the test oracle) and optionally faster
 * ones in avx2.c / avx512.c / neon.c. Kernels are model-neutral: they know matrices and
 * vectors, not layers. They never allocate, never fail and never spawn threads; callers split
 * work across threads by rows.
 *
 * Checklist: a new entry needs a generic version, a line in each ISA's table (NULL is not
 * allowed: copy the generic pointer), and a case in tests/test-simd.c.
 *
 * On x86 the matmul entries come from one driver, gemm.h (no intrinsics), that avx2.c and
 * avx512.c include after defining its primitives: a decode dot product over rows and a
 * multi-token tile per weight type, the activation quantizer for the integer types, an
 * eight-row packer (avx2.h's, shared) and the GEMM register tile. A new weight type adds
 * those primitives (and a branch in gemm.h's per-dtype helpers), not a driver; gemm.h lists
 * them with their contracts.
 */
#ifndef KLI_SIMD_H
#define KLI_SIMD_H

#include <stdint.h>
#include <string.h>

#include "dtype.h"

/* y[i][r] = sum_j x[i][j] * W[r][j] for i < m, r < n.
 *   y  [m][ldy] floats, x [m][ldx] floats,
 *   w  [n][k] in the kernel's dtype, rows contiguous (row r at byte r * row_bytes(k)).
 * k is a multiple of the dtype's block size. */
typedef void (*matmul_fn)(float *y, int64_t ldy, const float *x, int64_t ldx,
                          const void *w, int64_t n, int64_t k, int64_t m);

/* Element j of a row of float-type weights (F32, F16 or BF16) as a float, for the scalar
 * tails of the SIMD kernels; f16 converts the half at p (with the ISA's own instruction: it is
 * a constant, inlined). */
static inline __attribute__((always_inline)) float
simd_load1(enum k_dtype dt, const uint8_t *row, int64_t j, float (*f16)(const uint8_t *))
{
    uint16_t h;

    if (dt == KLI_DT_F32) {
        float f;
        memcpy(&f, row + 4 * j, 4);
        return f;
    }
    if (dt == KLI_DT_F16)
        return f16(row + 2 * j);
    memcpy(&h, row + 2 * j, 2);
    return bf16_to_f32(h);
}

/* s + sum x[i] * row[i] for j <= i < k: the scalar tail of a SIMD kernel's dot product with a
 * float-type row (s its vector part), f16 as simd_load1's. */
static inline __attribute__((always_inline)) float
simd_dot_tail(float s, enum k_dtype dt, const float *x, const uint8_t *row, int64_t j,
              int64_t k, float (*f16)(const uint8_t *))
{
    for (; j < k; j++)
        s += x[j] * simd_load1(dt, row, j, f16);
    return s;
}

/*
 * The element loops of an ISA's silu and mul_decay (see struct k_kernels), written once over
 * its vectors: V, a vector of W floats; silu_v and exp_neg, its vector silu and exp of a
 * non-positive argument; load, store, mul and sub, its unaligned loads and stores and lane
 * arithmetic; load_tail(p, r) and store_tail(p, v, r) for the first r < W floats (the load
 * zeroes the other lanes, the store leaves the memory past them alone). Function
 * definitions: no semicolon after them.
 */
#define SIMD_SILU(name, V, W, silu_v, load, store, mul, load_tail, store_tail)                 \
    static void                                                                               \
    name(float *y, const float *x, const float *m, int64_t n)                                 \
    {                                                                                         \
        int64_t i = 0;                                                                        \
                                                                                              \
        for (; i + (W) <= n; i += (W)) {                                                      \
            V s = silu_v(load(x + i));                                                        \
            if (m != NULL)                                                                    \
                s = mul(s, load(m + i));                                                      \
            store(y + i, s);                                                                  \
        }                                                                                     \
        if (i < n) {                                                                          \
            V s = silu_v(load_tail(x + i, n - i));                                            \
            if (m != NULL)                                                                    \
                s = mul(s, load_tail(m + i, n - i));                                          \
            store_tail(y + i, s, n - i);                                                      \
        }                                                                                     \
    }

#define SIMD_MUL_DECAY(name, V, W, exp_neg, load, store, mul, sub, load_tail, store_tail)      \
    static void                                                                               \
    name(float *y, const float *a, const float *ga, const float *gb, int64_t n)               \
    {                                                                                         \
        int64_t i = 0;                                                                        \
                                                                                              \
        for (; i + (W) <= n; i += (W)) {                                                      \
            V e = exp_neg(sub(load(ga + i), load(gb + i)));                                   \
            store(y + i, mul(load(a + i), e));                                                \
        }                                                                                     \
        if (i < n) {                                                                          \
            V e = exp_neg(sub(load_tail(ga + i, n - i), load_tail(gb + i, n - i)));           \
            store_tail(y + i, mul(load_tail(a + i, n - i), e), n - i);                        \
        }                                                                                     \
    }

/* Defines the matmul_fn `name` as impl(args, y, ldy, x, ldx, w, n, k, m): a table entry of
 * a matmul written once for several dtypes or variants, whose leading arguments (a dtype, a
 * kernel) are constants there, so the inlined impl is specialised for them. No semicolon after
 * it: it is a function definition. */
#define KLI_MATMUL_ENTRY(name, impl, ...)                                                     \
    static void                                                                               \
    name(float *y, int64_t ldy, const float *x, int64_t ldx, const void *w, int64_t n,        \
         int64_t k, int64_t m)                                                                \
    {                                                                                         \
        impl(__VA_ARGS__, y, ldy, x, ldx, w, n, k, m);                                        \
    }

/* generic.c's matmuls of the K types (dequantize and dot). An ISA table without a kernel of
 * its own for a K type holds these: KLI_MATMUL_K_GENERIC is the five entries; a table that
 * gains a kernel lists the others by hand. */
void gen_matmul_q2_k(float *y, int64_t ldy, const float *x, int64_t ldx, const void *w,
                     int64_t n, int64_t k, int64_t m);
void gen_matmul_q3_k(float *y, int64_t ldy, const float *x, int64_t ldx, const void *w,
                     int64_t n, int64_t k, int64_t m);
void gen_matmul_q4_k(float *y, int64_t ldy, const float *x, int64_t ldx, const void *w,
                     int64_t n, int64_t k, int64_t m);
void gen_matmul_q5_k(float *y, int64_t ldy, const float *x, int64_t ldx, const void *w,
                     int64_t n, int64_t k, int64_t m);
void gen_matmul_q6_k(float *y, int64_t ldy, const float *x, int64_t ldx, const void *w,
                     int64_t n, int64_t k, int64_t m);

#define KLI_MATMUL_K_GENERIC                                                                  \
    [KLI_DT_Q2_K] = gen_matmul_q2_k, [KLI_DT_Q3_K] = gen_matmul_q3_k,                         \
    [KLI_DT_Q4_K] = gen_matmul_q4_k, [KLI_DT_Q5_K] = gen_matmul_q5_k,                         \
    [KLI_DT_Q6_K] = gen_matmul_q6_k

struct k_kernels {
    const char *name;                        /* "generic", "avx2", "avx512", "neon", ... */
    matmul_fn matmul[KLI_DT_COUNT];          /* NULL for KLI_DT_OTHER */
    /* @return sum a[i]*b[i], i < n */
    float (*dot)(const float *a, const float *b, int64_t n);
    /* y[i] += a * x[i] */
    void (*axpy)(float *y, float a, const float *x, int64_t n);
    /* y[i] *= a */
    void (*scale)(float *y, float a, int64_t n);
    /* @return sum a[i] * b[i] * exp(ga[i] - gb[i]), i < n: the decay-weighted inner product of
     * the chunked delta rule (callers guarantee ga[i] - gb[i] <= 0) */
    float (*dot_decay)(const float *a, const float *b, const float *ga, const float *gb,
                       int64_t n);
    /* y[i] = a[i] * exp(ga[i] - gb[i]), i < n: the decay-scaled rows of the chunked delta rule
     * (callers guarantee ga[i] - gb[i] <= 0; y may alias a) */
    void (*mul_decay)(float *y, const float *a, const float *ga, const float *gb, int64_t n);
    /* y[i][j] = (acc ? y[i][j] : 0) + alpha sum_l x[i][l] B[l][j], i < m, j < n, l < k: the
     * small row-major products of the chunked delta rule (no packing; B rows in cache) */
    void (*gemm_nn)(float *y, int64_t ldy, const float *x, int64_t ldx, const float *B,
                    int64_t ldb, int64_t m, int64_t n, int64_t k, float alpha, int acc);
    /* y[i] = silu(x[i]) * (mul ? mul[i] : 1), silu(x) = x / (1 + exp(-x)), i < n (y may alias
     * x or mul): the SwiGLU gate and the KDA short convolution's activation. Below x = -80
     * (|silu| < 1e-33) the result may be zero. */
    void (*silu)(float *y, const float *x, const float *mul, int64_t n);
    /* dst[i] = float(src[i]) for n elements of dtype dt (whole blocks) */
    void (*to_f32)(enum k_dtype dt, const void *src, float *dst, int64_t n);
};

/* The selected table (KLI_SIMD=generic|avx2|avx512|avx512vnni|amx|neon|neondot forces one; an
 * unavailable forced variant falls back to the best available, see dispatch.c; the table's
 * name is what kli_simd_variant() reports). */
const struct k_kernels *k_kernels(void);

/* Every compiled-in variant usable on this CPU, best last; for tests and benchmarks.
 * @return the count written into `out` (at most `cap`). */
int kernels_all(const struct k_kernels **out, int cap);

/* Per-ISA tables; NULL-returning when not compiled in or not supported by this CPU. */
const struct k_kernels *kernels_generic(void);
const struct k_kernels *kernels_avx2(void);
const struct k_kernels *kernels_avx512(void);
const struct k_kernels *kernels_avx512vnni(void);
/* avx512vnni with the bf16, Q8_0 and Q4 prefill GEMM on AMX tiles (amx.c; also needs the OS's
 * permission for the tile data, asked on the first call) */
const struct k_kernels *kernels_amx(void);
const struct k_kernels *kernels_neon(void);
const struct k_kernels *kernels_neondot(void);   /* neon with SDOT (Armv8.2 dotprod) */

/* Flush-to-zero for the calling thread until fp_flush_end: results and operands below
 * float's normal range become zero instead of taking a slow microcode path (x86 MXCSR FTZ
 * and DAZ, AArch64 FPCR.FZ; elsewhere nothing changes). src/threads.c wraps every parallel
 * range in it. @return the mode to restore. */
unsigned long fp_flush_begin(void);
void fp_flush_end(unsigned long mode);

/* CPU features (cpu.c), with the OS support check for the vector state. */
struct k_cpu_features {
    int avx2, fma, f16c;
    int avx512f, avx512bw, avx512vl, avx512dq, avx512bf16, avx512vnni;
    int amx_tile, amx_bf16, amx_int8;   /* CPUID and XCR0 (the tile state); see kernels_amx */
    int neon, dotprod;
};
const struct k_cpu_features *k_cpu_features(void);

#endif
