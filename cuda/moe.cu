/*
 * moe.cu - SwiGLU experts on the device (doc/model.md 6.1): the GPU share of a MoE layer;
 * the CPU twins are ffn_forward (src/ffn.c) and the expert loops of src/moe_sched.c.
 *
 * One job holds several FFNs ("items": the shared expert over every row, and each resident
 * routed expert over the rows routed to it). Three launches do the whole job:
 *   ffn_gate_up  h_p = silu(W_gate x_p) * (W_up x_p)   grid (d_ff rows / 8, items)
 *   ffn_down     y_p = W_down h_p                       grid (d_model rows / 8, items)
 *   ffn_combine  out[t] = sum_{p: row p = t} wt_p y_p   grid (T)
 * A warp computes one weight row against up to 4 input rows at once: decode is a matrix-vector
 * product bound by reading the weights, and each weight is read once per 4 rows. The weights
 * stay in their stored dtype (F32, F16, BF16, Q8_0, Q4, the K types Q2_K .. Q6_K; down may
 * differ from gate and up, as GGUF's mixes and kli's q8_0 fallback for short rows make it)
 * and are expanded 8 at a time in registers, as the CPU's generic kernels expand them
 * (simd/generic.c, weights/kquant.c); the products are float32.
 * Summing in ffn_combine in a fixed order keeps the result deterministic (no atomics).
 * An item of at least cu_gemm_min() rows (prefill: the shared expert, the busier routed
 * ones) multiplies through cuBLAS instead (gemm.cu): its rows gathered, gate and up as two
 * products, silu(g) * u, down; the kernels skip it (ffn_gemm).
 */
#include <math.h>
#include <string.h>

#include "common.cuh"

enum {
    FFN_ROWS = 8,    /* weight rows per block: one per warp */
    FFN_TOK = 4,     /* input rows per pass over a weight row */
};

/* One item as the kernels see it: its pairs are [start, start + n). */
struct ffn_item {
    const void *gate, *up, *down;
    int dtype, ddown, F, start, n;     /* dtype: gate's and up's; ddown: down's */
};

/* Row f of gate and up against the item's input rows: hb[p][f] = silu(g) * u. */
template <int DT>
__device__ void
ffn_gate_up_row(const struct ffn_item &it, int f, const float *x, const int *row, int D,
                float *hb, int ldh, int lane)
{
    const void *gu[2] = {it.gate, it.up};

    cu_rows<DT, 2, FFN_TOK>(gu, f, D, it.n, lane,
                            [&](int p) { return x + (size_t)row[it.start + p] * D; },
                            [&](int p, const float *s) {
                                hb[(size_t)(it.start + p) * ldh + f] = s[0] / (1.0f + expf(-s[0]))
                                                                       * s[1];
                            });
}

/* Row d of down against the item's hidden rows: y[p][d]. */
template <int DT>
__device__ void
ffn_down_row(const struct ffn_item &it, int d, const float *hb, int ldh, int D, float *y,
             int lane)
{
    cu_rows<DT, 1, FFN_TOK>(&it.down, d, it.F, it.n, lane,
                            [&](int p) { return hb + (size_t)(it.start + p) * ldh; },
                            [&](int p, const float *s) {
                                y[(size_t)(it.start + p) * D + d] = s[0];
                            });
}

__global__ void __launch_bounds__(32 * FFN_ROWS)
ffn_gate_up(const struct ffn_item *items, const float *x, const int *row, int D, float *hb,
            int ldh)
{
    const struct ffn_item it = items[blockIdx.y];
    const int f = blockIdx.x * FFN_ROWS + threadIdx.x / 32, lane = threadIdx.x % 32;

    if (f >= it.F || it.n <= 0)   /* none, or through cuBLAS */
        return;
    cu_dtype_switch(it.dtype, [&](auto dt) {
        ffn_gate_up_row<decltype(dt)::value>(it, f, x, row, D, hb, ldh, lane);
    });
}

__global__ void __launch_bounds__(32 * FFN_ROWS)
ffn_down(const struct ffn_item *items, const float *hb, int ldh, int D, float *y)
{
    const struct ffn_item it = items[blockIdx.y];
    const int d = blockIdx.x * FFN_ROWS + threadIdx.x / 32, lane = threadIdx.x % 32;

    if (d >= D || it.n <= 0)
        return;
    cu_dtype_switch(it.ddown, [&](auto dt) {
        ffn_down_row<decltype(dt)::value>(it, d, hb, ldh, D, y, lane);
    });
}

/* The items multiplied through cuBLAS (gemm.cu): block p gathers xg[p] = x[row[p]]; block
 * p of ffn_swiglu makes h[p][f] = silu(g) * u of the products g = h[p][f], u = u[p][f], as
 * ffn_gate_up_row does. */
__global__ void
ffn_gather(const float *x, const int *row, int D, float *xg)
{
    const int p = blockIdx.x;

    for (int d = threadIdx.x; d < D; d += blockDim.x)
        xg[(size_t)p * D + d] = x[(size_t)row[p] * D + d];
}

__global__ void
ffn_swiglu(float *h, const float *u, int ldh, int F)
{
    const size_t p = blockIdx.x;

    for (int f = threadIdx.x; f < F; f += blockDim.x) {
        const float g = h[p * ldh + f];
        h[p * ldh + f] = g / (1.0f + expf(-g)) * u[p * ldh + f];
    }
}

/* out[t] = sum of wt[p] * y[p] over the pairs of row t, in pair order. */
__global__ void
ffn_combine(const float *y, const float *wt, const int *tokptr, const int *tpair, int D,
            float *out)
{
    const int t = blockIdx.x;

    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float a = 0.0f;
        for (int k = tokptr[t]; k < tokptr[t + 1]; k++) {
            const int p = tpair[k];
            a += wt[p] * y[(size_t)p * D + d];
        }
        out[(size_t)t * D + d] = a;
    }
}

/*
 * The items marked for cuBLAS (n < 0: -n rows), step 0 (h = silu(gate x) * (up x), the P
 * pairs' rows gathered into xg first) or step 1 (y = down h), on q's stream beside the
 * kernels' items.
 */
static int
ffn_gemm(struct gpu_queue *q, const struct ffn_item *it, int n_items, int P, int step,
         const float *x, const int *row, int D, float *h, float *u, int ldh, float *xg,
         float *y, struct kli_err *err)
{
    int rc, gathered = 0;

    for (int i = 0; i < n_items; i++) {
        const int n = -it[i].n, s = it[i].start;
        if (n <= 0)
            continue;
        if (step == 1) {
            if ((rc = cu_gemm(q, it[i].down, it[i].ddown, 0, D, it[i].F, 1, h + (size_t)s * ldh,
                              ldh, 0, n, y + (size_t)s * D, D, 0, err, "expert down")) != KLI_OK)
                return rc;
            continue;
        }
        if (!gathered) {   /* every pair's row: one launch, the kernels' items' too */
            ffn_gather<<<(unsigned)P, 256, 0, q->st>>>(x, row, D, xg);
            if ((rc = cu_launched(err, "ffn_gather")) != KLI_OK)
                return rc;
            gathered = 1;
        }
        const float *xi = xg + (size_t)s * D;
        if ((rc = cu_gemm(q, it[i].gate, it[i].dtype, 0, it[i].F, D, 1, xi, D, 0, n,
                          h + (size_t)s * ldh, ldh, 0, err, "expert gate")) != KLI_OK ||
            (rc = cu_gemm(q, it[i].up, it[i].dtype, 0, it[i].F, D, 1, xi, D, 0, n,
                          u + (size_t)s * ldh, ldh, 0, err, "expert up")) != KLI_OK)
            return rc;
        ffn_swiglu<<<(unsigned)n, 256, 0, q->st>>>(h + (size_t)s * ldh, u + (size_t)s * ldh,
                                                   ldh, it[i].F);
        if ((rc = cu_launched(err, "ffn_swiglu")) != KLI_OK)
            return rc;
    }
    return KLI_OK;
}

int
cu_moe_launch(struct gpu_queue *q, const struct gpu_moe_job *j, struct kli_err *err)
{
    const int64_t T = j->T, D = j->D, P = j->start[j->n_items];
    int32_t fmax = 8;
    int rc;

    if (j->n_items < 1 || P < 1 || D % 32 != 0)
        return err_set(err, KLI_E_INVALID, "moe job: no work, or d_model %lld is not a "
                       "multiple of 32", (long long)D);
    for (int32_t i = 0; i < j->n_items; i++) {
        const struct gpu_ffn *f = &j->item[i];
        if (!gpu_dtype_ok(f->dtype, D) || !gpu_dtype_ok(f->dtype_down, f->d_ff) ||
            f->d_ff % 32 != 0)
            return err_set(err, KLI_E_UNSUPPORTED, "moe job: d_model %lld, d_ff %d, dtypes "
                           "%d (gate, up) and %d (down)", (long long)D, f->d_ff, f->dtype,
                           f->dtype_down);
        fmax = f->d_ff > fmax ? f->d_ff : fmax;
    }

    if ((rc = cu_check(cudaSetDevice(q->g->info.device), err, "cudaSetDevice")) != KLI_OK)
        return rc;
    /* Items of at least gmin rows multiply through cuBLAS (gemm.cu) where their scratch
     * fits: their gathered rows in xg, up's products in ub; the kernels skip them. */
    const int gmin = cu_gemm_min();
    const int any_gemm = gmin > 0 && P >= gmin;
    /* One staging area, one copy: items, row, wt, tpair, tokptr, x. */
    uint64_t b_it = cu_align((uint64_t)j->n_items * sizeof(struct ffn_item));
    uint64_t b_row = cu_align((uint64_t)P * 4), b_tp = cu_align((uint64_t)(T + 1) * 4);
    uint64_t b_x = cu_align((uint64_t)T * D * 4), b_out = cu_align((uint64_t)T * D * 4);
    uint64_t b_in = b_it + 3 * b_row + b_tp + b_x;
    uint64_t b_h = cu_align((uint64_t)P * fmax * 4), b_y = cu_align((uint64_t)P * D * 4);
    uint64_t b_g = any_gemm ? b_y + b_h : 0;
    if ((rc = cu_queue_reserve(q, b_in + b_h + b_y + b_out + b_g, b_in + b_out, err)) !=
        KLI_OK)
        return rc;
    char *pin = (char *)q->pin, *ws = (char *)q->ws;
    struct ffn_item *it = (struct ffn_item *)pin;
    int *row = (int *)(pin + b_it), *tpair = (int *)(pin + b_it + 2 * b_row);
    float *wt = (float *)(pin + b_it + b_row);
    int *tokptr = (int *)(pin + b_it + 3 * b_row);
    for (int32_t i = 0; i < j->n_items; i++) {
        it[i].gate = j->item[i].gate;
        it[i].up = j->item[i].up;
        it[i].down = j->item[i].down;
        it[i].dtype = j->item[i].dtype;
        it[i].ddown = j->item[i].dtype_down;
        it[i].F = j->item[i].d_ff;
        it[i].start = j->start[i];
        it[i].n = j->start[i + 1] - j->start[i];
        if (any_gemm && it[i].n >= gmin &&
            cu_gemm_fits(q, it[i].dtype, it[i].F, (int)D, it[i].n) &&
            cu_gemm_fits(q, it[i].ddown, (int)D, it[i].F, it[i].n))
            it[i].n = -it[i].n;   /* through cuBLAS: the kernels see none (below) */
    }
    memcpy(row, j->row, (size_t)P * 4);
    memcpy(wt, j->wt, (size_t)P * 4);
    /* The pairs of each row, in pair order (counting sort by row). */
    memset(tokptr, 0, (size_t)(T + 1) * 4);
    for (int64_t p = 0; p < P; p++) {
        if (row[p] < 0 || row[p] >= T)
            return err_set(err, KLI_E_INVALID, "moe job: pair %lld names row %d of %lld",
                           (long long)p, row[p], (long long)T);
        tokptr[row[p] + 1]++;
    }
    for (int64_t t = 0; t < T; t++)
        tokptr[t + 1] += tokptr[t];
    for (int64_t p = 0, k; p < P; p++) {
        /* tokptr[row] is advanced as the row's pairs are placed, then restored below */
        k = tokptr[row[p]]++;
        tpair[k] = (int)p;
    }
    for (int64_t t = T; t > 0; t--)
        tokptr[t] = tokptr[t - 1];
    tokptr[0] = 0;
    memcpy(pin + b_it + 3 * b_row + b_tp, j->x, (size_t)T * D * 4);

    const struct ffn_item *it_d = (const struct ffn_item *)ws;
    const int *row_d = (const int *)(ws + b_it), *tpair_d = (const int *)(ws + b_it + 2 * b_row);
    const float *wt_d = (const float *)(ws + b_it + b_row);
    const int *tokptr_d = (const int *)(ws + b_it + 3 * b_row);
    const float *x_d = (const float *)(ws + b_it + 3 * b_row + b_tp);
    float *h_d = (float *)(ws + b_in), *y_d = (float *)(ws + b_in + b_h);
    float *out_d = (float *)(ws + b_in + b_h + b_y);
    float *xg_d = (float *)(ws + b_in + b_h + b_y + b_out), *u_d = xg_d + b_y / 4;

    if ((rc = cu_check(cudaMemcpyAsync(ws, pin, b_in, cudaMemcpyHostToDevice, q->st), err,
                       "cudaMemcpyAsync (moe inputs)")) != KLI_OK)
        return rc;
    ffn_gate_up<<<dim3((unsigned)((fmax + FFN_ROWS - 1) / FFN_ROWS), (unsigned)j->n_items),
                  32 * FFN_ROWS, 0, q->st>>>(it_d, x_d, row_d, (int)D, h_d, fmax);
    if ((rc = cu_launched(err, "ffn_gate_up")) != KLI_OK ||
        (rc = ffn_gemm(q, it, j->n_items, (int)P, 0, x_d, row_d, (int)D, h_d, u_d, fmax,
                       xg_d, y_d, err)) != KLI_OK)
        return rc;
    ffn_down<<<dim3((unsigned)((D + FFN_ROWS - 1) / FFN_ROWS), (unsigned)j->n_items),
               32 * FFN_ROWS, 0, q->st>>>(it_d, h_d, fmax, (int)D, y_d);
    if ((rc = cu_launched(err, "ffn_down")) != KLI_OK ||
        (rc = ffn_gemm(q, it, j->n_items, (int)P, 1, x_d, row_d, (int)D, h_d, u_d, fmax,
                       xg_d, y_d, err)) != KLI_OK)
        return rc;
    ffn_combine<<<(unsigned)T, 256, 0, q->st>>>(y_d, wt_d, tokptr_d, tpair_d, (int)D, out_d);
    if ((rc = cu_launched(err, "ffn_combine")) != KLI_OK)
        return rc;
    float *res = (float *)(pin + b_in);
    if ((rc = cu_check(cudaMemcpyAsync(res, out_d, (size_t)T * D * 4, cudaMemcpyDeviceToHost,
                                       q->st), err, "cudaMemcpyAsync (moe result)")) != KLI_OK)
        return rc;
    q->moe_res = res;
    q->moe_n = T * D;
    return KLI_OK;
}

int
cu_moe_wait(struct gpu_queue *q, float *out, struct kli_err *err)
{
    int64_t n = q->moe_n;
    int rc;

    q->moe_n = 0;
    if (n == 0)
        return err_set(err, KLI_E_INVALID, "moe_wait without a launched job");
    if ((rc = cu_check(cudaStreamSynchronize(q->st), err, "moe experts")) != KLI_OK)
        return rc;
    for (int64_t i = 0; i < n; i++)
        out[i] += q->moe_res[i];
    return KLI_OK;
}
