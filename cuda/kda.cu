/*
 * kda.cu - a whole Kimi Delta Attention layer on the device (doc/model.md 4); the CPU twin
 * is kda_forward (src/kda.c). Used when the whole model fits the GPU (backend.c), so that
 * the recurrent states live there between tokens.
 *
 * The steps, in the stream's order:
 *   projections    q, k, v, f_a, b, g_a from x, then f_b and g_b from the low-rank rows
 *                  (cu_mm, one warp per weight row, stored dtype)
 *   kda_conv       short causal convolution + SiLU, reaching into the conv state for the
 *                  first W-1 tokens; kda_conv_state then keeps the last W-1 raw inputs
 *   kda_prep       g = a * softplus(g + dt_bias), beta = sigmoid(beta), q and k
 *                  L2-normalised (q also scaled by 1/sqrt(K)); sums in double, as on the CPU
 *   kda_rec        the delta rule, token by token, one block per (sequence, head): the
 *                  state [K][K] in shared memory, thread j owns column j
 *   kda_outnorm    rmsnorm(o) * o_norm * sigmoid(gate) per head
 *   o_proj         cu_mm
 * Prefill runs the recurrence too (the CPU uses the chunked form there; tests/test-kda.c
 * shows the two agree to rounding).
 */
#include <math.h>
#include <string.h>

#include "common.cuh"

/* Block (c-chunk, t, p): y[t][c] = silu(sum_i w[c][i] in(t - (W-1) + i)) for projection p,
 * where in(tt) is the raw row tt of the token's sequence, or the conv state before it. */
__global__ void
kda_conv(const float *raw, const float *wts, float *const *state, int T_seq, int HK, int W,
         float *y)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y, p = blockIdx.z;
    const int sq = t / T_seq, tl = t % T_seq;
    const size_t plane = (size_t)gridDim.y * HK;   /* one projection's rows */

    if (c >= HK)
        return;
    const float *r = raw + p * plane + (size_t)sq * T_seq * HK;
    const float *st = state[sq] + ((size_t)p * HK + c) * (W - 1);
    const float *wc = wts + ((size_t)p * HK + c) * W;
    float a = 0.0f;
    for (int i = 0; i < W; i++) {
        const int tt = tl - (W - 1) + i;
        a += wc[i] * (tt >= 0 ? r[(size_t)tt * HK + c] : st[(W - 1) + tt]);
    }
    y[p * plane + (size_t)t * HK + c] = a / (1.0f + expf(-a));
}

/* Block (c-chunk, sq, p): the state keeps the last W-1 raw inputs of (old state ++ raw). */
__global__ void
kda_conv_state(const float *raw, float *const *state, int T_seq, int n_rows, int HK, int W)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x, sq = blockIdx.y, p = blockIdx.z;

    if (c >= HK)
        return;
    const float *r = raw + (size_t)p * n_rows * HK + (size_t)sq * T_seq * HK;
    float *st = state[sq] + ((size_t)p * HK + c) * (W - 1);
    for (int i = 0; i < W - 1; i++) {
        const int tt = T_seq - (W - 1) + i;
        st[i] = tt >= 0 ? r[(size_t)tt * HK + c] : st[(W - 1) + tt];
    }
}

/* Block (h, t), K threads (rounded up to a power of two): gates and normalisation. */
__global__ void
kda_prep(float *g, float *beta, float *q, float *k, const float *a_neg, const float *dt_bias,
         int H, int K, float qscale)
{
    __shared__ double sh[1024];
    const int h = blockIdx.x, t = blockIdx.y, d = threadIdx.x;
    const size_t off = ((size_t)t * H + h) * K + d;
    const int in = d < K;

    if (in) {
        const float z = g[off] + dt_bias[h * K + d];
        g[off] = a_neg[h] * (z > 20.0f ? z : logf(1.0f + expf(z)));
    }
    if (d == 0)
        beta[(size_t)t * H + h] = 1.0f / (1.0f + expf(-beta[(size_t)t * H + h]));
    const float qv = in ? q[off] : 0.0f, kv = in ? k[off] : 0.0f;
    const double sq = cu_block_sum((double)qv * qv, sh);
    const double sk = cu_block_sum((double)kv * kv, sh);
    if (in) {
        q[off] = qv * ((float)(1.0 / sqrt(sq + 1e-6)) * qscale);
        k[off] = kv * ((float)(1.0 / sqrt(sk + 1e-6)) * 1.0f);
    }
}

/* Block (h, sq), K threads: the delta rule over the sequence's T_seq tokens (kda_recurrent):
 *     S <- Diag(exp(g)) S;  u = beta (v - S^T k);  S <- S + k u^T;  o = S^T q
 * Thread j owns column j of S; the rows of q, k and exp(g) of the token are shared. */
__global__ void
kda_rec(const float *q, const float *k, const float *v, const float *g, const float *beta,
        float *const *Sp, int T_seq, int H, int K, float *o)
{
    extern __shared__ float4 smem4[];
    float *S = (float *)smem4;               /* [K][K] */
    float *qs = S + (size_t)K * K, *ks = qs + K, *es = ks + K;
    const int h = blockIdx.x, sq = blockIdx.y, j = threadIdx.x, HK = H * K;
    float *Sg = Sp[sq] + (size_t)h * K * K;

    for (int i = j; i < K * K; i += blockDim.x)
        S[i] = Sg[i];
    __syncthreads();
    for (int tl = 0; tl < T_seq; tl++) {
        const size_t row = (size_t)sq * T_seq + tl, off = row * HK + (size_t)h * K;
        for (int d = j; d < K; d += blockDim.x) {
            qs[d] = q[off + d];
            ks[d] = k[off + d];
            es[d] = expf(g[off + d]);
        }
        __syncthreads();
        if (j < K) {
            const float b = beta[row * H + h];
            float u = 0.0f;
            for (int d = 0; d < K; d++) {
                const float s = S[d * K + j] * es[d];
                S[d * K + j] = s;
                u += ks[d] * s;
            }
            u = b * (v[off + j] - u);
            float a = 0.0f;
            for (int d = 0; d < K; d++) {
                const float s = S[d * K + j] + ks[d] * u;
                S[d * K + j] = s;
                a += qs[d] * s;
            }
            o[off + j] = a;
        }
        __syncthreads();
    }
    for (int i = j; i < K * K; i += blockDim.x)
        Sg[i] = S[i];
}

/* Block (h, t): o = rmsnorm(o) * w * sigmoid(gate) over the head's K values. */
__global__ void
kda_outnorm(float *o, const float *gate, const float *w, int H, int K, float eps)
{
    __shared__ double sh[1024];
    __shared__ float rs;
    const int h = blockIdx.x, t = blockIdx.y, d = threadIdx.x;
    const size_t off = ((size_t)t * H + h) * K + d;
    const float x = d < K ? o[off] : 0.0f;
    const double ss = cu_block_sum((double)x * x, sh);

    if (d == 0)
        rs = (float)(1.0 / sqrt(ss / (double)K + (double)eps));
    __syncthreads();
    if (d < K)
        o[off] = __fmul_rn(__fmul_rn(x, rs), w[d]) * (1.0f / (1.0f + expf(-gate[off])));
}

static int
kda_pow2(int n)
{
    int p = 32;

    while (p < n)
        p *= 2;
    return p;
}

int
cu_kda_check(struct k_gpu *g, const struct gpu_kda_w *w, int32_t D, int32_t H,
             int32_t K, int32_t W, struct kli_err *err)
{
    const int32_t HK = H * K, rf = w->f_a.rows, rg = w->g_a.rows;

    if (K < 1 || K > 1024 || W < 2 || W > 16)
        return err_set(err, KLI_E_UNSUPPORTED, "GPU KDA: head_dim %d, conv size %d", K, W);
    if ((uint64_t)(K * K + 3 * K) * 4 > g->info.smem_block)
        return err_set(err, KLI_E_UNSUPPORTED, "GPU KDA: a %d x %d state needs more shared "
                       "memory than the device allows (%llu bytes)", K, K,
                       (unsigned long long)g->info.smem_block);
    if (!cu_mat_ok(&w->q, HK, D) || !cu_mat_ok(&w->k, HK, D) || !cu_mat_ok(&w->v, HK, D) ||
        !cu_mat_ok(&w->f_a, rf, D) || !cu_mat_ok(&w->g_a, rg, D) || !cu_mat_ok(&w->b, H, D) ||
        !cu_mat_ok(&w->f_b, HK, rf) || !cu_mat_ok(&w->g_b, HK, rg) ||
        !cu_mat_ok(&w->o, D, HK) || w->conv == NULL || w->a_neg == NULL ||
        w->dt_bias == NULL || w->o_norm == NULL)
        return err_set(err, KLI_E_UNSUPPORTED, "GPU KDA needs matrices in " CU_MAT_NEED
                       ": ranks %d and %d, head width %d", rf, rg, HK);
    return KLI_OK;
}

int
cu_kda_layer(struct gpu_queue *q, const struct gpu_kda_job *j, struct kli_err *err)
{
    const struct gpu_kda_w *w = j->w;
    const int H = j->H, K = j->K, HK = H * K, D = j->D, W = j->W;
    const int rf = w->f_a.rows, rg = w->g_a.rows;
    const int64_t T = (int64_t)j->n_seq * j->T_seq;
    int rc;

    if (T < 1 || j->n_seq < 1)
        return err_set(err, KLI_E_INVALID, "kda layer: no rows");
    if ((rc = cu_check(cudaSetDevice(q->g->info.device), err, "cudaSetDevice")) != KLI_OK)
        return rc;
    /* workspace: state pointers, x | raw[3], qkv[3], low_f, low_g, beta, g, gate, o, out */
    uint64_t b_p = cu_align((uint64_t)2 * j->n_seq * sizeof(float *));
    uint64_t b_x = cu_align((uint64_t)T * D * 4), b_hk = cu_align((uint64_t)T * HK * 4);
    uint64_t b_lf = cu_align((uint64_t)T * rf * 4), b_lg = cu_align((uint64_t)T * rg * 4);
    uint64_t b_b = cu_align((uint64_t)T * H * 4), b_out = b_x;
    uint64_t b_in = b_p + b_x;
    uint64_t total = b_in + 3 * b_hk + 3 * b_hk + b_lf + b_lg + b_b + 3 * b_hk + b_out;
    if ((rc = cu_queue_reserve(q, total, b_in > b_out ? b_in : b_out, err)) != KLI_OK)
        return rc;
    char *pin = (char *)q->pin, *ws = (char *)q->ws;
    float **ptr = (float **)pin;
    for (int s = 0; s < j->n_seq; s++) {
        ptr[s] = j->S[s];
        ptr[j->n_seq + s] = j->conv[s];
    }
    memcpy(pin + b_p, j->x, (size_t)T * D * 4);
    char *p = ws;
    float *const *S_d = (float *const *)p, *const *C_d = (float *const *)p + j->n_seq;
    const float *x_d = (const float *)(p += b_p);
    float *raw = (float *)(p += b_x), *qkv = (float *)(p += 3 * b_hk);
    float *lf = (float *)(p += 3 * b_hk), *lg = (float *)(p += b_lf);
    float *beta = (float *)(p += b_lg), *g = (float *)(p += b_b);
    float *gate = (float *)(p += b_hk), *o = (float *)(p += b_hk);
    float *out = (float *)(p += b_hk);
    /* the three raw (and qkv) planes are contiguous, T * HK floats apart; the kernels
     * find a plane by gridDim.y * HK (kda_conv) or the row count (kda_conv_state) */
    const size_t plane = (size_t)T * HK;
    float *raw_p[3] = {raw, raw + plane, raw + 2 * plane};
    float *qkv_p[3] = {qkv, qkv + plane, qkv + 2 * plane};

    if ((rc = cu_check(cudaMemcpyAsync(ws, pin, b_in, cudaMemcpyHostToDevice, q->st), err,
                       "cudaMemcpyAsync (kda inputs)")) != KLI_OK)
        return rc;
    const struct gpu_mat *first[6] = {&w->q, &w->k, &w->v, &w->f_a, &w->b, &w->g_a};
    float *dst[6] = {raw_p[0], raw_p[1], raw_p[2], lf, beta, lg};
    const int ld[6] = {HK, HK, HK, rf, H, rg};
    for (int i = 0; i < 6; i++) {
        if ((rc = cu_mm(q, first[i]->w, first[i]->dtype, 0, first[i]->rows, D, 1, x_d, D, 0,
                        T, dst[i], ld[i], 0, err, "kda projection")) != KLI_OK)
            return rc;
    }
    if ((rc = cu_mm(q, w->f_b.w, w->f_b.dtype, 0, HK, rf, 1, lf, rf, 0, T, g, HK, 0, err,
                    "kda f_b")) != KLI_OK ||
        (rc = cu_mm(q, w->g_b.w, w->g_b.dtype, 0, HK, rg, 1, lg, rg, 0, T, gate, HK, 0, err,
                    "kda g_b")) != KLI_OK)
        return rc;
    const unsigned cb = (unsigned)((HK + 255) / 256);
    kda_conv<<<dim3(cb, (unsigned)T, 3), 256, 0, q->st>>>(raw, w->conv, C_d, j->T_seq, HK, W,
                                                          qkv);
    if ((rc = cu_launched(err, "kda_conv")) != KLI_OK)
        return rc;
    kda_conv_state<<<dim3(cb, (unsigned)j->n_seq, 3), 256, 0, q->st>>>(raw, C_d, j->T_seq,
                                                                       (int)T, HK, W);
    if ((rc = cu_launched(err, "kda_conv_state")) != KLI_OK)
        return rc;
    const int kt = kda_pow2(K);
    kda_prep<<<dim3((unsigned)H, (unsigned)T), kt, 0, q->st>>>(
        g, beta, qkv_p[0], qkv_p[1], w->a_neg, w->dt_bias, H, K, 1.0f / sqrtf((float)K));
    if ((rc = cu_launched(err, "kda_prep")) != KLI_OK)
        return rc;
    size_t smem = ((size_t)K * K + 3 * (size_t)K) * sizeof(float);
    if ((rc = cu_check(cudaFuncSetAttribute(kda_rec, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)smem), err, "cudaFuncSetAttribute")) != KLI_OK)
        return rc;
    kda_rec<<<dim3((unsigned)H, (unsigned)j->n_seq), K, smem, q->st>>>(
        qkv_p[0], qkv_p[1], qkv_p[2], g, beta, S_d, j->T_seq, H, K, o);
    if ((rc = cu_launched(err, "kda_rec")) != KLI_OK)
        return rc;
    kda_outnorm<<<dim3((unsigned)H, (unsigned)T), kt, 0, q->st>>>(o, gate, w->o_norm, H, K,
                                                                  j->eps);
    if ((rc = cu_launched(err, "kda_outnorm")) != KLI_OK)
        return rc;
    if ((rc = cu_mm(q, w->o.w, w->o.dtype, 0, D, HK, 1, o, HK, 0, T, out, D, 0, err,
                    "kda o_proj")) != KLI_OK)
        return rc;
    if ((rc = cu_check(cudaMemcpyAsync(pin, out, (size_t)T * D * 4, cudaMemcpyDeviceToHost,
                                       q->st), err, "cudaMemcpyAsync (kda result)")) !=
        KLI_OK ||
        (rc = cu_check(cudaStreamSynchronize(q->st), err, "kda layer")) != KLI_OK)
        return rc;
    memcpy(j->out, pin, (size_t)T * D * 4);
    return KLI_OK;
}
