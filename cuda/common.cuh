/*
 * common.cuh - what the CUDA files share: the device and queue structures behind the opaque
 * handles of src/backend.h, the mapping of CUDA errors onto kli's (struct kli_err set by
 * err_set, KLI_E_CUDA with cudaGetErrorString's text), and the weight-row loops of the
 * warp-per-row kernels (cu_w8, cu_rows). Nothing here aborts: every runtime call's status
 * goes through cu_check, and every launch through cu_launched.
 */
#ifndef KLI_CUDA_COMMON_CUH
#define KLI_CUDA_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>

#include <type_traits>

#include "kli_cuda.h"
#include "weights.h"

/* err_set: the library's one way of setting a struct kli_err (the first error wins) */
extern "C" {
#include "internal.h"
}

struct k_gpu {
    struct gpu_info info;
    uint64_t budget;          /* bytes alloc may hand out in all */
    uint64_t used;            /* bytes handed out now (weights, mirrors, workspaces) */
    pthread_mutex_t lock;     /* guards used: sessions of one model run on many threads */
};

/* One stream and the memory its operations stage through. Operations on one queue run in
 * order; each synchronous one (mla_attend, moe_wait) ends with the stream idle, so the
 * workspace and the pinned buffer are free again between calls. */
struct gpu_queue {
    struct k_gpu *g;
    cudaStream_t st;
    void *ws;                 /* device workspace, grown on demand */
    uint64_t ws_bytes;
    void *pin;                /* pinned host staging, grown on demand */
    uint64_t pin_bytes;
    /* cuBLAS (gemm.cu): the handle, made on first use, and the scratch of the bf16
     * products (activations and one tile of expanded weights), grown on demand */
    void *blas;
    void *gws;
    uint64_t gws_bytes;
    /* the MoE job between moe_launch and moe_wait */
    int64_t moe_n;            /* floats of its result, 0 when none is pending */
    const float *moe_res;     /* its result in pin */
};

/* @return KLI_OK, or KLI_E_CUDA naming `what` and the runtime's message. */
static inline int
cu_check(cudaError_t e, struct kli_err *err, const char *what)
{
    if (e == cudaSuccess)
        return KLI_OK;
    return err_set(err, KLI_E_CUDA, "CUDA: %s: %s", what, cudaGetErrorString(e));
}

/* The status of the kernel launch just made (bad configuration, no image for this GPU). */
static inline int
cu_launched(struct kli_err *err, const char *kernel)
{
    return cu_check(cudaGetLastError(), err, kernel);
}

/* ==== Weight rows as the kernels read them (moe.cu, mla.cu) ==== */

/*
 * f(std::integral_constant<int, DT>()) for the dtype dt that gpu_dtype_ok (backend.h)
 * accepts, so that one kernel template serves every dtype without a switch of its own
 * (moe.cu, mla.cu). @return 0, or -1 (nothing called) for a dtype the kernels do not know.
 * (The pragma: f may be a host-only lambda, a kernel launch, as in cu_mm.)
 */
#pragma nv_exec_check_disable
template <class F>
static __host__ __device__ __forceinline__ int
cu_dtype_switch(int dt, F f)
{
    switch (dt) {
    case KLI_DT_F32: f(std::integral_constant<int, KLI_DT_F32>()); return 0;
    case KLI_DT_F16: f(std::integral_constant<int, KLI_DT_F16>()); return 0;
    case KLI_DT_BF16: f(std::integral_constant<int, KLI_DT_BF16>()); return 0;
    case KLI_DT_Q8_0: f(std::integral_constant<int, KLI_DT_Q8_0>()); return 0;
    case KLI_DT_Q4: f(std::integral_constant<int, KLI_DT_Q4>()); return 0;
    case KLI_DT_Q2_K: f(std::integral_constant<int, KLI_DT_Q2_K>()); return 0;
    case KLI_DT_Q3_K: f(std::integral_constant<int, KLI_DT_Q3_K>()); return 0;
    case KLI_DT_Q4_K: f(std::integral_constant<int, KLI_DT_Q4_K>()); return 0;
    case KLI_DT_Q5_K: f(std::integral_constant<int, KLI_DT_Q5_K>()); return 0;
    case KLI_DT_Q6_K: f(std::integral_constant<int, KLI_DT_Q6_K>()); return 0;
    default: return -1;
    }
}

/* The little-endian f16 at p (the scales of the block types), as a float. */
static __device__ __forceinline__ float
cu_f16(const unsigned char *p)
{
    return __half2float(__ushort_as_half((unsigned short)(__ldg(p) | (__ldg(p + 1) << 8))));
}

/* (float)q for |q| < 2^22, exactly, without the int-to-float conversion (an eighth of the
 * rate of an add on sm_80 and sm_90, and one per weight would bound decode): the float with
 * the bits of 1.5 * 2^23 + q, less 1.5 * 2^23. */
static __device__ __forceinline__ float
cu_i2f(int q)
{
    return __fsub_rn(__int_as_float(0x4b400000 + q), 12582912.0f);
}

/* Bytes of one 256-weight super-block of the K type DT (weights/dtype.c's table). */
static __host__ __device__ constexpr int
cu_kbytes(int dt)
{
    return dt == KLI_DT_Q2_K ? 84 : dt == KLI_DT_Q3_K ? 110 : dt == KLI_DT_Q4_K ? 144 :
           dt == KLI_DT_Q5_K ? 176 : 210;
}

/*
 * Weights [e, e+8) of the super-block b of the K type DT (e a multiple of 8, so that the
 * eight share one sub-block), decoded as weights/kquant.c's kq_to_f32 does: the same fields
 * and the same products, w = (d * sc) * q - dmin * mn, rounded as there (no contraction into
 * an FMA; the types without minimums have no subtraction, as 0 * 0 subtracted is exact).
 * Layouts: kquant.c and kli-weights(5); each lane unpacks its sub-block's scale once.
 */
template <int DT>
static __device__ __forceinline__ void
cu_k8(const unsigned char *b, int e, float *o)
{
    if (DT == KLI_DT_Q2_K) {
        /* scales[16] at 0 (low nibble scale, high nibble min), qs[64] at 16, d at 80, dmin at
         * 82; weight 128 h + 32 j + l is bits 2j..2j+1 of qs[32 h + l] */
        const int s = __ldg(b + e / 16), sh = 2 * (e % 128 / 32);
        const float a = __fmul_rn(cu_f16(b + 80), (float)(s & 15));
        const float m = __fmul_rn(cu_f16(b + 82), (float)(s >> 4));
        const unsigned char *qs = b + 16 + 32 * (e / 128) + e % 32;
#pragma unroll
        for (int i = 0; i < 8; i++)
            o[i] = __fsub_rn(__fmul_rn(a, cu_i2f((__ldg(qs + i) >> sh) & 3)), m);
    } else if (DT == KLI_DT_Q3_K) {
        /* hmask[32] at 0, qs[64] at 32, scales[12] at 96, d at 108; sub-block j = 4 g + k has
         * the low nibble (g < 2) or high nibble (g >= 2) of byte k (g even) or 4 + k (g odd)
         * as its low four bits and bits 2g..2g+1 of byte 8 + k above them, minus 32; weight
         * 128 h + 32 jj + l: bits 2jj..2jj+1 of qs[32 h + l], less 4 unless bit jj + 4h of
         * hmask[l] is set */
        const int j = e / 16, k = j % 4, g = j / 4;
        const int u = ((__ldg(b + 96 + k + 4 * (g % 2)) >> (4 * (g / 2))) & 15) |
                      (((__ldg(b + 104 + k) >> (2 * g)) & 3) << 4);
        const float a = __fmul_rn(cu_f16(b + 108), (float)(u - 32));
        const int h = e / 128, jj = e % 128 / 32, l = e % 32;
        const unsigned char *qs = b + 32 + 32 * h + l, *hm = b + l;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int q = ((__ldg(qs + i) >> (2 * jj)) & 3) -
                          (((__ldg(hm + i) >> (jj + 4 * h)) & 1) ? 0 : 4);
            o[i] = __fmul_rn(a, cu_i2f(q));
        }
    } else if (DT == KLI_DT_Q4_K || DT == KLI_DT_Q5_K) {
        /* d at 0, dmin at 2, scales at 4 (kq_unpack_sm: for j < 4 scale j is the low six bits
         * of byte j and min j those of byte 4 + j; for j >= 4 the nibbles of byte 4 + j with
         * the top two bits of byte j - 4 (scale) or j (min) above them), qs[128] at 16 (Q5_K:
         * qh[32] at 16, qs at 48); weight 64 g + 32 t + l is nibble t of qs[32 g + l], Q5_K's
         * fifth bit bit 2g + t of qh[l] */
        const int j = e / 32;
        const unsigned char *s = b + 4;
        int sc, mn;
        if (j < 4) {
            sc = __ldg(s + j) & 63;
            mn = __ldg(s + j + 4) & 63;
        } else {
            sc = (__ldg(s + j + 4) & 15) | ((__ldg(s + j - 4) >> 6) << 4);
            mn = (__ldg(s + j + 4) >> 4) | ((__ldg(s + j) >> 6) << 4);
        }
        const float a = __fmul_rn(cu_f16(b), (float)sc);
        const float m = __fmul_rn(cu_f16(b + 2), (float)mn);
        const int g = e / 64, t = e % 64 / 32, l = e % 32;
        const unsigned char *qs = b + (DT == KLI_DT_Q5_K ? 48 : 16) + 32 * g + l;
        const unsigned char *qh = b + 16 + l;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int q = (__ldg(qs + i) >> (4 * t)) & 15;
            if (DT == KLI_DT_Q5_K)
                q |= ((__ldg(qh + i) >> (2 * g + t)) & 1) << 4;
            o[i] = __fsub_rn(__fmul_rn(a, cu_i2f(q)), m);
        }
    } else {
        /* Q6_K: ql[128] at 0, qh[64] at 128, int8 scales[16] at 192, d at 208; weight
         * 128 h + 32 c + l: low nibble (c < 2) or high nibble of ql[64 h + 32 (c % 2) + l],
         * with bits 2c..2c+1 of qh[32 h + l] above it, minus 32 */
        const float a = __fmul_rn(cu_f16(b + 208), (float)(signed char)__ldg(b + 192 + e / 16));
        const int h = e / 128, c = e % 128 / 32, l = e % 32;
        const unsigned char *lo = b + 64 * h + 32 * (c % 2) + l, *hi = b + 128 + 32 * h + l;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int q = (((__ldg(lo + i) >> (4 * (c / 2))) & 15) |
                           (((__ldg(hi + i) >> (2 * c)) & 3) << 4)) - 32;
            o[i] = __fmul_rn(a, cu_i2f(q));
        }
    }
}

/* Elements [8c, 8c+8) of row r of a [.][K] matrix of dtype DT, as floats. */
template <int DT>
static __device__ __forceinline__ void
cu_w8(const void *w, long long r, int K, int c, float *o)
{
    if (DT == KLI_DT_BF16 || DT == KLI_DT_F16) {
        const uint4 v = __ldg((const uint4 *)((const uint16_t *)w + r * K) + c);
        const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (DT == KLI_DT_BF16) {
                o[2 * i] = __uint_as_float(u[i] << 16);
                o[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
            } else {
                o[2 * i] = __half2float(__ushort_as_half((unsigned short)(u[i] & 0xffffu)));
                o[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(u[i] >> 16)));
            }
        }
    } else if (DT == KLI_DT_F32) {
        const float4 *p = (const float4 *)((const float *)w + r * K) + 2 * c;
        const float4 a = __ldg(p), b = __ldg(p + 1);
        o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
        o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
    } else if (DT == KLI_DT_Q8_0) {
        /* block of 32: f16 d, int8 q[32]; chunk c is quarter c % 4 of block c / 4 */
        const unsigned char *blk = (const unsigned char *)w + r * (K / 32) * 34 + (c / 4) * 34;
        const float d = cu_f16(blk);
        const signed char *qs = (const signed char *)blk + 2 + (c % 4) * 8;
#pragma unroll
        for (int i = 0; i < 8; i++)
            o[i] = cu_i2f(__ldg(qs + i)) * d;
    } else if (DT == KLI_DT_Q4) {
        /* Q4, block of 32: f16 d, u8 q[16]; element j < 16 is the low nibble of q[j], element
         * j + 16 the high one; value (nibble - 8) * d */
        const unsigned char *blk = (const unsigned char *)w + r * (K / 32) * 18 + (c / 4) * 18;
        const float d = cu_f16(blk);
        const int quarter = c % 4, shift = quarter >= 2 ? 4 : 0;
        const unsigned char *qs = blk + 2 + (quarter % 2) * 8;
#pragma unroll
        for (int i = 0; i < 8; i++)
            o[i] = cu_i2f(((__ldg(qs + i) >> shift) & 15) - 8) * d;
    } else {
        /* the K types: chunk c is the 8 weights at 8 (c % 32) of super-block c / 32 */
        const long long bb = cu_kbytes(DT);
        cu_k8<DT>((const unsigned char *)w + r * (K / KLI_QK_K) * bb + (c / 32) * bb,
                  8 * (c % 32), o);
    }
}

static __device__ __forceinline__ float
cu_warp_sum(float v)
{
    for (int o = 16; o > 0; o /= 2)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/*
 * Row r of each w[m] (a [.][K] matrix of dtype DT), m < NW, against the n input rows
 * xrow(p) (K floats, 16-byte aligned), p < n: put(p, s) gets s[m] = row r of w[m] . xrow(p),
 * in lane 0. One warp per weight row, NT input rows at a time, so that each weight is read
 * once per NT rows (the expert kernels of moe.cu, mla_mm): each lane sums the chunks
 * c = lane, lane + 32, ... of 8 elements, each chunk in one fixed order, and cu_warp_sum adds
 * the lanes.
 */
template <int DT, int NW, int NT, class Xrow, class Put>
static __device__ __forceinline__ void
cu_rows(const void *const *w, long long r, int K, int n, int lane, Xrow xrow, Put put)
{
    for (int p0 = 0; p0 < n; p0 += NT) {
        const int np = n - p0 < NT ? n - p0 : NT;
        const float *xr[NT];
        float a[NT][NW];
#pragma unroll
        for (int i = 0; i < NT; i++) {
            xr[i] = xrow(p0 + (i < np ? i : np - 1));
#pragma unroll
            for (int m = 0; m < NW; m++)
                a[i][m] = 0.0f;
        }
        for (int c = lane; c < K / 8; c += 32) {
            float wv[NW][8];
#pragma unroll
            for (int m = 0; m < NW; m++)
                cu_w8<DT>(w[m], r, K, c, wv[m]);
#pragma unroll
            for (int i = 0; i < NT; i++) {
                if (i >= np)   /* the same for the whole warp: decode skips NT - 1 rows */
                    break;
                const float4 p = *(const float4 *)(xr[i] + 8 * c);
                const float4 u = *(const float4 *)(xr[i] + 8 * c + 4);
#pragma unroll
                for (int m = 0; m < NW; m++)
                    a[i][m] += wv[m][0] * p.x + wv[m][1] * p.y + wv[m][2] * p.z +
                               wv[m][3] * p.w + wv[m][4] * u.x + wv[m][5] * u.y +
                               wv[m][6] * u.z + wv[m][7] * u.w;
            }
        }
#pragma unroll
        for (int i = 0; i < NT; i++) {
#pragma unroll
            for (int m = 0; m < NW; m++)
                a[i][m] = cu_warp_sum(a[i][m]);
            if (lane == 0 && i < np)
                put(p0 + i, a[i]);
        }
    }
}

/* The sum over the block of v (blockDim.x a power of two <= 1024), in double, through sh
 * (blockDim.x entries); every thread gets it. */
static __device__ double
cu_block_sum(double v, double *sh)
{
    const int tid = threadIdx.x;

    sh[tid] = v;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k /= 2) {
        if (tid < k)
            sh[tid] += sh[tid + k];
        __syncthreads();
    }
    const double s = sh[0];
    __syncthreads();
    return s;
}

/* What cu_mat_ok asks of a matrix, for the messages that decline one (gpu_dtype_ok). */
#define CU_MAT_NEED "F32, F16, BF16, Q8_0, Q4 or a K type with widths in multiples of 8 (32 " \
                    "for Q8_0 and Q4, 256 for the K types)"

/* Rounds n up to a multiple of 256 (the alignment cudaMalloc gives), for carving one
 * workspace into several arrays. */
static inline uint64_t
cu_align(uint64_t n)
{
    return (n + 255) & ~(uint64_t)255;
}

/* Makes q->ws hold at least `bytes` (and q->pin at least `pin_bytes`): both grow
 * geometrically, counted against the budget. */
int cu_queue_reserve(struct gpu_queue *q, uint64_t bytes, uint64_t pin_bytes,
                     struct kli_err *err);
/* Makes the device buffer *p of *have bytes, on q's stream, hold at least `bytes`: it grows
 * geometrically (exactly near the budget's end), counted against the budget; the stream is
 * drained before the old one is freed. */
int cu_queue_grow(struct gpu_queue *q, void **p, uint64_t *have, uint64_t bytes,
                  struct kli_err *err);

/* The blocks (mla.cu, moe.cu), behind the vtable entries of the same names. */
int cu_mla_check(struct k_gpu *g, int32_t H, int32_t L, int32_t C, struct kli_err *err);
int cu_mla_attend(struct gpu_queue *q, const struct gpu_mla_job *j,
                  struct kli_err *err);
int cu_mla_layer_check(struct k_gpu *g, const struct gpu_mla_w *w, int32_t D, int32_t H,
                       int32_t nope, int32_t rope, int32_t dv, struct kli_err *err);
int cu_mla_layer(struct gpu_queue *q, const struct gpu_mla_layer_job *j,
                 struct kli_err *err);
int cu_matmul(struct gpu_queue *q, const struct gpu_mat *w, const float *x, int64_t T,
              float *y, struct kli_err *err);
int cu_kda_check(struct k_gpu *g, const struct gpu_kda_w *w, int32_t D, int32_t H,
                 int32_t K, int32_t W, struct kli_err *err);
int cu_kda_layer(struct gpu_queue *q, const struct gpu_kda_job *j, struct kli_err *err);
/* Shared by the blocks (mla.cu): y_b[t] = W_b x_b[t] for nb batches of a [R][K] matrix of
 * dtype (see mla_mm), and whether a matrix suits it. */
int cu_mm(struct gpu_queue *q, const void *W, int dtype, long long wbs, int R, int K,
          int nb, const float *x, int ldx, int xbs, int64_t T, float *y, int ldy, int ybs,
          struct kli_err *err, const char *what);
int cu_mat_ok(const struct gpu_mat *m, int32_t rows, int32_t cols);
/* The prefill products through cuBLAS (gemm.cu). cu_gemm_min: the fewest rows for which
 * cu_mm takes cu_gemm (KLI_CUDA_GEMM_MIN; 0: never, as without cuBLAS). cu_gemm_fits:
 * whether the scratch of a product is there (grown now if need be; 0: the budget is spent,
 * the kernels do it). cu_gemm: cu_mm's contract on tensor cores (bf16 products, float32 sums)
 * or, for F32 weights, in float32. cu_gemm_free: the queue's cuBLAS handle (cu_queue_free,
 * which frees q->gws). */
int cu_gemm_min(void);
int cu_gemm_fits(struct gpu_queue *q, int dtype, int R, int K, int64_t T);
int cu_gemm(struct gpu_queue *q, const void *W, int dtype, long long wbs, int R, int K,
            int nb, const float *x, int ldx, int xbs, int64_t T, float *y, int ldy, int ybs,
            struct kli_err *err, const char *what);
void cu_gemm_free(struct gpu_queue *q);
int cu_moe_launch(struct gpu_queue *q, const struct gpu_moe_job *j,
                  struct kli_err *err);
int cu_moe_wait(struct gpu_queue *q, float *out, struct kli_err *err);

#endif
