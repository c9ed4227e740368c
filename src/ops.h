/*
 * ops.h - small scalar operators and the threaded matrix product every block uses.
 */
#ifndef KLI_OPS_H
#define KLI_OPS_H

#include <math.h>
#include <stdint.h>

#include "model.h"

/* From this many rows of x on, ops_matmul multiplies float32 weights with OpenBLAS SGEMM (when
 * built with it); other types always take the kernels of simd/. */
#define OPS_GEMM_MIN_ROWS 8

/* y[i][r] = sum_j x[i][j] * W[r][j] for the m rows of x and every row r of W, with the rows
 * of W split across the worker threads. x [m][ldx], y [m][ldy]. */
void ops_matmul(const struct tensor *w, const float *x, int64_t ldx, float *y, int64_t ldy,
                int64_t m);

/* Several products in one parallel region (one barrier instead of n): y[i] = x[i] W[i]^T
 * for i < n (n <= OPS_MULTI_MAX), each with m rows of x; every worker takes its share of
 * every matrix's rows. For small products (decode), where the barriers cost more than the
 * arithmetic, and in prefill one barrier is simply fewer. Uses the kernels for every type
 * (no SGEMM). */
#define OPS_MULTI_MAX 8
struct ops_mm {
    const struct tensor *w;
    const float *x;
    int64_t ldx;
    float *y;
    int64_t ldy;
};
void ops_matmul_multi(const struct ops_mm *mm, int n, int64_t m);

/* Worker ith of tn's share [*r0, *r1) of `rows` rows, as threads_parallel_for(rows, grain)
 * would split them among tn workers (empty when the split uses fewer). */
void ops_share(int64_t rows, int64_t grain, int ith, int tn, int64_t *r0, int64_t *r1);

/* The same for rows [r0, r1) of W only, on the calling thread. */
void ops_matmul_rows(const struct tensor *w, int64_t r0, int64_t r1, const float *x,
                     int64_t ldx, float *y, int64_t ldy, int64_t m);

/* y[i][j] = sum_l x[i][l] * B[l][j] for i < m, j < n, l < k: the product with a row-major
 * B [k][ldb] (not transposed, unlike ops_matmul). Rows of y split across the workers. */
void ops_gemm_nn(const float *x, int64_t ldx, const float *B, int64_t ldb, float *y,
                 int64_t ldy, int64_t m, int64_t n, int64_t k);

/* A float tensor view over memory the caller owns: rows [rows][cols], row stride = cols. */
struct tensor ops_view_f32(const float *data, int64_t rows, int64_t cols);

/* y = x / sqrt(mean(x^2) + eps) * w over n values (y may alias x). */
void ops_rmsnorm(float *y, const float *x, const float *w, int64_t n, float eps);

/* In-place softmax over n values. */
void ops_softmax(float *x, int64_t n);

/* Reads row `id` of an embedding-like tensor into float. */
void ops_row_f32(const struct tensor *t, int64_t id, float *out);

static inline float
ops_sigmoid(float x)
{
    return 1.0f / (1.0f + expf(-x));
}

static inline float
ops_silu(float x)
{
    return x / (1.0f + expf(-x));
}

/* PyTorch softplus with beta 1 and threshold 20: z for z > 20, else log(1 + exp(z)). */
static inline float
ops_softplus(float z)
{
    return z > 20.0f ? z : logf(1.0f + expf(z));
}

#endif
