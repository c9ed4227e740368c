/*
 * generic.c - portable C for every kernel. Always compiled; the oracle that tests compare
 * every SIMD variant with. Written for clarity first, but kept cache-friendly enough to be a
 * usable fallback.
 */
#include "config.h"

#include <math.h>
#include <string.h>

#include "simd.h"

static float
gen_dot(const float *a, const float *b, int64_t n)
{
    float s = 0.0f;

    for (int64_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static float
gen_dot_decay(const float *a, const float *b, const float *ga, const float *gb, int64_t n)
{
    float s = 0.0f;

    for (int64_t i = 0; i < n; i++)
        s += a[i] * b[i] * expf(ga[i] - gb[i]);
    return s;
}

static void
gen_mul_decay(float *y, const float *a, const float *ga, const float *gb, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = a[i] * expf(ga[i] - gb[i]);
}

static void
gen_gemm_nn(float *y, int64_t ldy, const float *x, int64_t ldx, const float *B, int64_t ldb,
            int64_t m, int64_t n, int64_t k, float alpha, int acc)
{
    for (int64_t i = 0; i < m; i++) {
        float *yi = y + i * ldy;
        for (int64_t j = 0; j < n; j++) {
            float s = 0.0f;
            for (int64_t l = 0; l < k; l++)
                s += x[i * ldx + l] * B[l * ldb + j];
            yi[j] = (acc ? yi[j] : 0.0f) + alpha * s;
        }
    }
}

static void
gen_silu(float *y, const float *x, const float *mul, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        float s = x[i] / (1.0f + expf(-x[i]));
        y[i] = mul != NULL ? s * mul[i] : s;
    }
}

static void
gen_axpy(float *y, float a, const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] += a * x[i];
}

static void
gen_scale(float *y, float a, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] *= a;
}

/* Four accumulators per dot product keep the dependency chain short. */
static float
gen_dot4(const float *a, const float *b, int64_t n)
{
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;

    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++)
        s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

#define GEN_ROWBUF 16384

static void
gen_matmul_any(enum k_dtype dt, float *y, int64_t ldy, const float *x, int64_t ldx,
               const void *w, int64_t n, int64_t k, int64_t m)
{
    float buf[GEN_ROWBUF];

    for (int64_t r = 0; r < n; r++) {
        if (dt == KLI_DT_F32) {
            const float *row = (const float *)w + r * k;
            for (int64_t i = 0; i < m; i++)
                y[i * ldy + r] = gen_dot4(x + i * ldx, row, k);
            continue;
        }
        /* Dequantize in slices so any k fits the stack buffer. */
        for (int64_t i = 0; i < m; i++)
            y[i * ldy + r] = 0.0f;
        int32_t blk = dtype_info(dt)->block;
        int64_t step = (GEN_ROWBUF / blk) * blk;
        uint64_t rb = dtype_nbytes(dt, (uint64_t)k);
        for (int64_t j0 = 0; j0 < k; j0 += step) {
            int64_t len = k - j0 < step ? k - j0 : step;
            const uint8_t *src = (const uint8_t *)w + (uint64_t)r * rb +
                                 dtype_nbytes(dt, (uint64_t)j0);
            dtype_to_f32(dt, src, buf, len);
            for (int64_t i = 0; i < m; i++)
                y[i * ldy + r] += gen_dot4(x + i * ldx + j0, buf, len);
        }
    }
}

KLI_MATMUL_ENTRY(gen_matmul_f32, gen_matmul_any, KLI_DT_F32)
KLI_MATMUL_ENTRY(gen_matmul_f16, gen_matmul_any, KLI_DT_F16)
KLI_MATMUL_ENTRY(gen_matmul_bf16, gen_matmul_any, KLI_DT_BF16)
KLI_MATMUL_ENTRY(gen_matmul_q8_0, gen_matmul_any, KLI_DT_Q8_0)
KLI_MATMUL_ENTRY(gen_matmul_q4, gen_matmul_any, KLI_DT_Q4)

/* The K types: dequantize and dot, the oracle; external, so that a table without its own
 * kernel for a K type can hold these (simd.h). */
#define GEN_MATMUL_K(name, dt)                                                                \
    void                                                                                      \
    name(float *y, int64_t ldy, const float *x, int64_t ldx, const void *w, int64_t n,        \
         int64_t k, int64_t m)                                                                \
    {                                                                                         \
        gen_matmul_any(dt, y, ldy, x, ldx, w, n, k, m);                                       \
    }

GEN_MATMUL_K(gen_matmul_q2_k, KLI_DT_Q2_K)
GEN_MATMUL_K(gen_matmul_q3_k, KLI_DT_Q3_K)
GEN_MATMUL_K(gen_matmul_q4_k, KLI_DT_Q4_K)
GEN_MATMUL_K(gen_matmul_q5_k, KLI_DT_Q5_K)
GEN_MATMUL_K(gen_matmul_q6_k, KLI_DT_Q6_K)

static const struct k_kernels gen_table = {
    .name = "generic",
    .matmul = {
        [KLI_DT_F32] = gen_matmul_f32,
        [KLI_DT_F16] = gen_matmul_f16,
        [KLI_DT_BF16] = gen_matmul_bf16,
        [KLI_DT_Q8_0] = gen_matmul_q8_0,
        [KLI_DT_Q4] = gen_matmul_q4,
        KLI_MATMUL_K_GENERIC,
    },
    .dot = gen_dot,
    .dot_decay = gen_dot_decay,
    .mul_decay = gen_mul_decay,
    .gemm_nn = gen_gemm_nn,
    .silu = gen_silu,
    .axpy = gen_axpy,
    .scale = gen_scale,
    .to_f32 = dtype_to_f32,
};

const struct k_kernels *
kernels_generic(void)
{
    return &gen_table;
}
