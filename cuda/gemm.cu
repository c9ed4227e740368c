/*
 * gemm.cu - the prefill products on tensor cores through cuBLAS (issue #22). The plain twin
 * is cu_mm's warp-per-row kernel (mla.cu), which decode keeps (a matrix-vector product is
 * bound by reading the weights), and behind it the CPU's kernels.
 *
 * cu_mm hands a product of T >= cu_gemm_min() rows here (KLI_CUDA_GEMM_MIN, default
 * GEMM_MIN_DEFAULT; the routed experts of moe.cu likewise, expert by expert). The product
 * y_b[t] = W_b x_b[t] of a row-major [R][K] matrix is, in cuBLAS's column-major terms,
 * Y_b (R x T, ld ldy) = W_b^T X_b with W_b read as K x R (ld K) and X_b as K x T (ld ldx).
 *
 *   F32 weights    cublasSgemmStridedBatched in float32 with the default math mode, which
 *                  never rounds to TF32: the CPU twin's products, summed in another order
 *                  (the 1e-5 of the float32 tests holds).
 *   the others     cublasGemmEx, bf16 x bf16 with float32 sums (CUBLAS_COMPUTE_32F), on
 *                  operands split in two: v = hi + lo, hi = bf16(v), lo = bf16(v - hi).
 *                  The activations always; BF16 weights are their own hi (lo = 0); F16,
 *                  Q8_0, Q4 and the K types are decoded a tile of rows at a time as cu_w8
 *                  decodes them (the CPU's float values bit for bit), then split. Then
 *                      W x = Wh xh + Wh xl [+ Wl xh]
 *                  in two GEMMs (three for split weights), the later ones adding into y;
 *                  Wl xl, below 2^-18 of the product, is left out. KLI_CUDA_GEMM_SPLIT=0
 *                  rounds each operand to bf16 once and multiplies once instead (~1e-3),
 *                  to measure what the split costs.
 *
 * Why split, at two or three times the tensor-core work of one bf16 product: bf16 keeps 8
 * significant bits, and rounding the activations once moves each by up to 2^-9 of itself;
 * a product is then off from the float32 one by ~1e-3 relative, and on the tiny test model
 * (random weights, top-2 of 8 experts whose near-ties flip) that became 0.12 relative L2 on
 * the logits and 7% of the argmaxes changed (contrib/reference/bf16_emul.py, kimi_ref.py's
 * forward pass with the operands rounded; 1.3e-5 and none changed with the split). hi +
 * lo holds 16 significant bits: an operand is off by at most 2^-18 of itself, a product by
 * ~1e-5 of its L2 norm. test-cuda holds a product to float64 sums over the split operands
 * within 1e-4 and to the CPU's float32 twin within 1e-4 (products, layers and whole-model
 * logits alike). The prefill products are bound by the tensor cores for the dense
 * projections only; the routed experts' (a few rows each) by reading their weights, which the
 * passes share (the second reads them from L2).
 *
 * Memory: one scratch per queue (q->gws, counted against the GPU budget, grown on demand):
 * the activations split (T * K * 4 bytes, as much as the caller's float32 copy) and one tile
 * of split weights of at most GEMM_TILE bytes: the rows of a larger matrix (the lm_head: 1.5 GB
 * split) are decoded and multiplied a tile at a time. If the scratch does not fit the
 * budget, cu_mm's kernels do the product (cu_gemm_fits).
 */
#include "config.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"

#ifdef HAVE_CUBLAS
#include <cublas_v2.h>
#include <cuda_bf16.h>

enum {
    GEMM_MIN_DEFAULT = 0,         /* rows from which cu_mm multiplies through cuBLAS; 0 (off)
                                     until the path has been run and measured on a GPU */
    GEMM_TILE = 64 << 20,         /* bytes of decoded weights at a time */
    GEMM_NT = 256,                /* threads per block of the conversion kernels */
};

int
cu_gemm_min(void)
{
    const char *s = getenv("KLI_CUDA_GEMM_MIN");
    char *end;

    if (s == NULL || *s == '\0')
        return GEMM_MIN_DEFAULT;
    long v = strtol(s, &end, 10);
    if (*end != '\0' || v < 0)   /* an invalid value is ignored (kli(1), ENVIRONMENT) */
        return GEMM_MIN_DEFAULT;
    return v > INT_MAX ? INT_MAX : (int)v;
}

/* Whether operands are split into hi + lo (KLI_CUDA_GEMM_SPLIT, default 1); 0: one bf16
 * rounding each and one product, for measuring what the split costs. */
static int
gemm_split_on(void)
{
    const char *s = getenv("KLI_CUDA_GEMM_SPLIT");

    return s == NULL || strcmp(s, "0") != 0;
}

/* A grid of GEMM_NT-thread blocks for n items, grid-striding beyond 65535 blocks. */
static unsigned
gemm_blocks(long long n)
{
    long long b = (n + GEMM_NT - 1) / GEMM_NT;

    return (unsigned)(b < 1 ? 1 : b > 65535 ? 65535 : b);
}

/* v as hi + lo, both bf16 rounded to nearest: hi = bf16(v), lo = bf16(v - hi) (the
 * difference is exact in float32). */
static __device__ __forceinline__ void
gemm_split(float v, __nv_bfloat16 *hi, __nv_bfloat16 *lo)
{
    *hi = __float2bfloat16_rn(v);
    *lo = __float2bfloat16_rn(v - __bfloat162float(*hi));
}

/* x[t * ldx + k] = xh[t][k] + xl[t][k] for t < T, k < K (xl = xh + T * K; not written
 * without lo). */
__global__ void
gemm_x16(const float *x, int ldx, int K, long long T, int lo, __nv_bfloat16 *xh)
{
    const long long n = T * K;

    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        __nv_bfloat16 l;
        gemm_split(x[i / K * ldx + i % K], xh + i, &l);
        if (lo)
            xh[n + i] = l;
    }
}

/* Weight (r0 + r, k) of W ([.][K] of dtype DT) = wh[r][k] + wl[r][k] for r < rows
 * (wl = wh + rows * K; not written without lo), decoded 8 at a time as cu_w8 does. */
template <int DT>
__global__ void
gemm_w16(const void *W, long long r0, long long rows, int K, int lo, __nv_bfloat16 *wh)
{
    const int C = K / 8;
    const long long n = rows * C;

    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / C;
        const int c = (int)(i % C);
        float o[8];
        __nv_bfloat16 h[8], l[8];
        cu_w8<DT>(W, r0 + r, K, c, o);
#pragma unroll
        for (int k = 0; k < 8; k++)
            gemm_split(o[k], h + k, l + k);
        *(uint4 *)(wh + r * K + 8 * c) = *(const uint4 *)h;
        if (lo)
            *(uint4 *)(wh + rows * K + r * K + 8 * c) = *(const uint4 *)l;
    }
}

static int
gemm_check(cublasStatus_t s, struct kli_err *err, const char *what, const char *call)
{
    if (s == CUBLAS_STATUS_SUCCESS)
        return KLI_OK;
    return err_set(err, s == CUBLAS_STATUS_ALLOC_FAILED ? KLI_E_NOMEM : KLI_E_CUDA,
                   "cuBLAS: %s: %s: %s", what, call, cublasGetStatusString(s));
}

/* The queue's handle, made on first use, working on its stream. */
static int
gemm_handle(struct gpu_queue *q, cublasHandle_t *h, struct kli_err *err, const char *what)
{
    int rc;

    if (q->blas == NULL) {
        cublasHandle_t nh = NULL;
        if ((rc = gemm_check(cublasCreate(&nh), err, what, "cublasCreate")) != KLI_OK)
            return rc;
        q->blas = nh;
        /* float32 products stay float32: no TF32, whatever the default becomes */
        if ((rc = gemm_check(cublasSetMathMode(nh, CUBLAS_DEFAULT_MATH), err, what,
                             "cublasSetMathMode")) != KLI_OK)
            return rc;
    }
    *h = (cublasHandle_t)q->blas;
    return gemm_check(cublasSetStream(*h, q->st), err, what, "cublasSetStream");
}

void
cu_gemm_free(struct gpu_queue *q)
{
    if (q->blas != NULL)
        (void)cublasDestroy((cublasHandle_t)q->blas);
    q->blas = NULL;
}

/* The scratch bytes of a product (0 for F32 weights), and in *rt the rows per tile of
 * decoded weights: a multiple of 64 (aligned output columns), all of them for BF16. */
static uint64_t
gemm_scratch(int dtype, int R, int K, int64_t T, long long *rt)
{
    *rt = R;
    if (dtype == KLI_DT_F32)
        return 0;
    if (dtype != KLI_DT_BF16) {
        long long n = (long long)GEMM_TILE / (4LL * K) / 64 * 64;
        *rt = n < 64 ? 64 : n > R ? R : n;
    }
    return cu_align((uint64_t)T * K * 4) +
           (dtype == KLI_DT_BF16 ? 0 : cu_align((uint64_t)*rt * K * 4));
}

int
cu_gemm_fits(struct gpu_queue *q, int dtype, int R, int K, int64_t T)
{
    long long rt;
    uint64_t need = gemm_scratch(dtype, R, K, T, &rt);

    return need == 0 || cu_queue_grow(q, &q->gws, &q->gws_bytes, need, NULL) == KLI_OK;
}

int
cu_gemm(struct gpu_queue *q, const void *W, int dtype, long long wbs, int R, int K,
        int nb, const float *x, int ldx, int xbs, int64_t T, float *y, int ldy, int ybs,
        struct kli_err *err, const char *what)
{
    const float one = 1.0f, zero = 0.0f;
    cublasHandle_t h;
    int rc;

    if (!gpu_dtype_ok(dtype, K) || R < 1 || T < 1 || T > INT_MAX || nb < 1)
        return err_set(err, KLI_E_UNSUPPORTED, "%s: no GEMM for %d x %d of dtype %d, %lld "
                       "rows", what, R, K, dtype, (long long)T);
    if ((rc = gemm_handle(q, &h, err, what)) != KLI_OK)
        return rc;
    if (dtype == KLI_DT_F32)
        return gemm_check(cublasSgemmStridedBatched(h, CUBLAS_OP_T, CUBLAS_OP_N, R, (int)T, K,
                                                    &one, (const float *)W, K, wbs / 4, x,
                                                    ldx, xbs, &zero, y, ldy, ybs, nb),
                          err, what, "cublasSgemmStridedBatched");

    long long rt;
    const uint64_t b_x = cu_align((uint64_t)T * K * 4);
    if ((rc = cu_queue_grow(q, &q->gws, &q->gws_bytes, gemm_scratch(dtype, R, K, T, &rt),
                            err)) != KLI_OK)
        return rc;
    const int lo = gemm_split_on();
    __nv_bfloat16 *xh = (__nv_bfloat16 *)q->gws, *xl = xh + T * K;
    __nv_bfloat16 *wb = (__nv_bfloat16 *)((char *)q->gws + b_x);
    for (int b = 0; b < nb; b++) {
        const char *Wb = (const char *)W + b * wbs;
        gemm_x16<<<gemm_blocks(T * K), GEMM_NT, 0, q->st>>>(x + (size_t)b * xbs, ldx, K, T,
                                                             lo, xh);
        if ((rc = cu_launched(err, "gemm_x16")) != KLI_OK)
            return rc;
        for (long long r0 = 0; r0 < R; r0 += rt) {
            const long long rows = R - r0 < rt ? R - r0 : rt;
            const void *A = Wb, *Al = NULL;
            if (dtype != KLI_DT_BF16) {
                if (cu_dtype_switch(dtype, [&](auto dt) {
                        gemm_w16<decltype(dt)::value><<<gemm_blocks(rows * (K / 8)), GEMM_NT, 0,
                                                        q->st>>>(Wb, r0, rows, K, lo, wb);
                    }) != 0)
                    return err_set(err, KLI_E_UNSUPPORTED, "%s: dtype %d", what, dtype);
                if ((rc = cu_launched(err, "gemm_w16")) != KLI_OK)
                    return rc;
                A = wb;
                Al = wb + rows * K;
            }
            /* W x = Wh xh + Wh xl + Wl xh (+ Wl xl, below 2^-18 of it, left out) */
            const void *pa[3] = {A, A, Al};
            const __nv_bfloat16 *pb[3] = {xh, xl, xh};
            for (int k = 0; k < (!lo ? 1 : Al != NULL ? 3 : 2); k++) {
                if ((rc = gemm_check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)T,
                                                  K, &one, pa[k], CUDA_R_16BF, K, pb[k],
                                                  CUDA_R_16BF, K, k == 0 ? &zero : &one,
                                                  y + (size_t)b * ybs + r0, CUDA_R_32F, ldy,
                                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                                     err, what, "cublasGemmEx")) != KLI_OK)
                    return rc;
            }
        }
    }
    return KLI_OK;
}

#else   /* without cuBLAS: the warp-per-row kernels do every product */

int
cu_gemm_min(void)
{
    return 0;
}

void
cu_gemm_free(struct gpu_queue *q)
{
    (void)q;
}

int
cu_gemm_fits(struct gpu_queue *q, int dtype, int R, int K, int64_t T)
{
    (void)q; (void)dtype; (void)R; (void)K; (void)T;
    return 0;
}

int
cu_gemm(struct gpu_queue *q, const void *W, int dtype, long long wbs, int R, int K,
        int nb, const float *x, int ldx, int xbs, int64_t T, float *y, int ldy, int ybs,
        struct kli_err *err, const char *what)
{
    (void)q; (void)W; (void)wbs; (void)nb; (void)x; (void)ldx; (void)xbs; (void)y;
    (void)ldy; (void)ybs;
    return err_set(err, KLI_E_UNSUPPORTED, "%s: built without cuBLAS (%d x %d of dtype %d, "
                   "%lld rows)", what, R, K, dtype, (long long)T);
}

#endif
