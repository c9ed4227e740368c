/*
 * mla.cu - latent attention in the absorbed form (doc/model.md 5.2) over the device mirror
 * of an MLA layer's cache; the CPU twin is the attention loop of src/mla.c.
 *
 * For one query row, every head h attends to the same n cached rows c_s = (c^_s, k_pe_s) of
 * C = L + rope floats:
 *     S[h][s] = scale * q[h] . c_s,     P[h] = softmax(S[h]),     lat[h] = sum_s P[h][s] c^_s
 * Reading the cache is the cost (n * C * 4 bytes per row and layer; 302 MB at 128K tokens of
 * the released model), and all H heads share each cached row, so one block takes one query
 * row and one chunk of the context for all heads: the chunk's rows are read from memory once
 * and used H times from shared memory.
 *
 * Long contexts are split over many blocks (split-K, "flash decoding"): block (s, t) keeps
 * the running maximum m[h], the running sum l[h] and the unnormalised accumulator acc[h][L]
 * of its chunk (the online softmax of Milakov and Gimelshein, 2018), and a second kernel
 * merges the chunks: with M = max_s m_s,
 *     lat[h] = sum_s exp(m_s - M) acc_s[h] / sum_s exp(m_s - M) l_s.
 * Everything is float32, as on the CPU; exp is the accurate expf.
 *
 * The mirror holds rows of the session's cache type (F32, BF16 or Q8_0: 4, 2 or 1 + 1/16
 * bytes a value), and the tile is widened to float as it is loaded into shared memory, so a
 * narrow cache halves or quarters what the attention reads; the arithmetic after the load is
 * the same. The CPU twin of a narrow cache is mla_attend's one-pass form (src/mla.c).
 *
 * cu_mla_layer runs the whole layer around that attention (the CPU twin is mla_forward):
 * the projections q_proj, kv_a, o_proj in the stored dtype and the per-head absorbed
 * products W_UK^T, W_UV in float32, one warp per weight row (mla_mm); the new latent rows are
 * normalised straight into the device caches, so only x goes in and out and the new rows
 * come back.
 */
#include <math.h>
#include <string.h>

#include "common.cuh"

enum {
    ATT_PT = 32,      /* cached rows per tile; = warp size (the softmax step relies on it) */
    ATT_NT = 256,     /* threads per block */
    ATT_MAXJ = 16,    /* float4 accumulators per thread: H * L <= 16384 at L/4 <= 256 */
    ATT_PAD = 4,      /* floats added to each shared row: rows start 4 banks apart */
};

/* One query row: the device cache of its sequence (rows of the job's dtype) and how many
 * rows it attends to. */
struct att_row {
    const void *cache;
    long long n;
};

static uint64_t
att_smem(int H, int C)
{
    uint64_t cp = (uint64_t)C + ATT_PAD;

    return sizeof(float) * ((uint64_t)H * cp + ATT_PT * cp + (uint64_t)H * ATT_PT + 3u * H);
}

/*
 * Block (s, t): query row t against cached rows [s*chunk, min((s+1)*chunk, n_t)), all heads.
 * Shared memory: q [H][C+4], the tile [32][C+4], scores/probabilities [H][32], and per head
 * the running max, running sum and this tile's rescale factor.
 *
 * Work split inside a tile:
 *   scores   thread (hp, pp) computes heads {hp, hp+HP} x rows {pp, pp+16}, HP = ceil(H/2):
 *            four dot products over C sharing their loads;
 *   softmax  one warp per head, one lane per row of the tile;
 *   P . V    thread (trow, col) owns columns [4col, 4col+4) of heads trow + rowsT*j,
 *            rowsT = 256 / (L/4): each tile value it loads serves up to 16 heads.
 * Partial result per (t, s, h): m, l, two unused floats, acc[L] (so acc is 16-byte aligned).
 */
template <int DT>
__global__ void __launch_bounds__(ATT_NT, 1)
mla_att_part(const struct att_row *rows, const float *q, int H, int L, int C, float scale,
             long long chunk, int S, float *part)
{
    extern __shared__ float4 smem4[];
    float *sm = (float *)smem4;
    const int CP = C + ATT_PAD, C4 = C / 4;
    float *qs = sm, *ts = qs + H * CP, *ps = ts + ATT_PT * CP;
    float *ms = ps + H * ATT_PT, *ls = ms + H, *as = ls + H;
    const int tid = threadIdx.x, t = blockIdx.y, s = blockIdx.x;
    const struct att_row r = rows[t];
    const long long p0 = (long long)s * chunk;
    const long long p1 = p0 + chunk < r.n ? p0 + chunk : r.n;

    const float4 *qg = (const float4 *)(q + (size_t)t * H * C);
    for (int i = tid; i < H * C4; i += ATT_NT)
        *(float4 *)(qs + (i / C4) * CP + (i % C4) * 4) = qg[i];
    for (int h = tid; h < H; h += ATT_NT) {
        ms[h] = -INFINITY;
        ls[h] = 0.0f;
    }
    const int LQ = L / 4, rowsT = ATT_NT / LQ, col = tid % LQ, trow = tid / LQ;
    float4 acc[ATT_MAXJ];
#pragma unroll
    for (int j = 0; j < ATT_MAXJ; j++)
        acc[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    __syncthreads();

    for (long long base = p0; base < p1; base += ATT_PT) {
        const int np = (int)(p1 - base < ATT_PT ? p1 - base : ATT_PT);
        if (DT == KLI_DT_F32) {
            const float4 *cg = (const float4 *)((const float *)r.cache + base * C);
            for (int i = tid; i < np * C4; i += ATT_NT)
                *(float4 *)(ts + (i / C4) * CP + (i % C4) * 4) = cg[i];
        } else {
            /* eight values at a time, widened (C is a multiple of 8, of 32 for Q8_0) */
            const int C8 = C / 8;
            for (int i = tid; i < np * C8; i += ATT_NT) {
                float v[8];
                cu_w8<DT>(r.cache, base + i / C8, C, i % C8, v);
                float *d = ts + (i / C8) * CP + (i % C8) * 8;
                *(float4 *)d = make_float4(v[0], v[1], v[2], v[3]);
                *(float4 *)(d + 4) = make_float4(v[4], v[5], v[6], v[7]);
            }
        }
        __syncthreads();

        /* scores; rows past np read row np-1 (written) and are masked to -inf */
        const int HP = (H + 1) / 2, pp = tid % 16;
        const float *k0 = ts + (pp < np ? pp : np - 1) * CP;
        const float *k1 = ts + (pp + 16 < np ? pp + 16 : np - 1) * CP;
        for (int hp = tid / 16; hp < HP; hp += ATT_NT / 16) {
            const int h1 = hp + HP;
            const float *q0 = qs + hp * CP, *q1 = qs + (h1 < H ? h1 : hp) * CP;
            float d00 = 0.0f, d01 = 0.0f, d10 = 0.0f, d11 = 0.0f;
            for (int c = 0; c < C; c += 4) {
                const float4 a = *(const float4 *)(q0 + c), b = *(const float4 *)(q1 + c);
                const float4 x = *(const float4 *)(k0 + c), y = *(const float4 *)(k1 + c);
                d00 += a.x * x.x + a.y * x.y + a.z * x.z + a.w * x.w;
                d01 += a.x * y.x + a.y * y.y + a.z * y.z + a.w * y.w;
                d10 += b.x * x.x + b.y * x.y + b.z * x.z + b.w * x.w;
                d11 += b.x * y.x + b.y * y.y + b.z * y.z + b.w * y.w;
            }
            ps[hp * ATT_PT + pp] = pp < np ? d00 * scale : -INFINITY;
            ps[hp * ATT_PT + pp + 16] = pp + 16 < np ? d01 * scale : -INFINITY;
            if (h1 < H) {
                ps[h1 * ATT_PT + pp] = pp < np ? d10 * scale : -INFINITY;
                ps[h1 * ATT_PT + pp + 16] = pp + 16 < np ? d11 * scale : -INFINITY;
            }
        }
        __syncthreads();

        /* online softmax: new max, rescale factor of what came before, probabilities */
        const int warp = tid / 32, lane = tid % 32;
        for (int h = warp; h < H; h += ATT_NT / 32) {
            const float v = ps[h * ATT_PT + lane];
            float mx = v;
            for (int o = 16; o > 0; o /= 2)
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            const float mold = ms[h], mnew = fmaxf(mold, mx);
            const float e = expf(v - mnew);
            float sum = e;
            for (int o = 16; o > 0; o /= 2)
                sum += __shfl_xor_sync(0xffffffffu, sum, o);
            ps[h * ATT_PT + lane] = e;
            __syncwarp();   /* every lane has read ms[h] before lane 0 replaces it */
            if (lane == 0) {
                const float a = expf(mold - mnew);
                as[h] = a;
                ls[h] = ls[h] * a + sum;
                ms[h] = mnew;
            }
        }
        __syncthreads();

        /* acc[h] = acc[h] * alpha[h] + sum_p P[h][p] c^_p */
        if (trow < rowsT) {
#pragma unroll
            for (int j = 0; j < ATT_MAXJ; j++) {
                const int h = trow + rowsT * j;
                if (h < H) {
                    const float a = as[h];
                    acc[j].x *= a;
                    acc[j].y *= a;
                    acc[j].z *= a;
                    acc[j].w *= a;
                }
            }
            for (int p = 0; p < np; p++) {
                const float4 v = *(const float4 *)(ts + p * CP + col * 4);
#pragma unroll
                for (int j = 0; j < ATT_MAXJ; j++) {
                    const int h = trow + rowsT * j;
                    if (h < H) {
                        const float w = ps[h * ATT_PT + p];
                        acc[j].x += w * v.x;
                        acc[j].y += w * v.y;
                        acc[j].z += w * v.z;
                        acc[j].w += w * v.w;
                    }
                }
            }
        }
        __syncthreads();
    }

    float *out = part + ((size_t)t * S + s) * H * (L + 4);
    for (int h = tid; h < H; h += ATT_NT) {
        out[h * (L + 4)] = ms[h];
        out[h * (L + 4) + 1] = ls[h];
        out[h * (L + 4) + 2] = 0.0f;
        out[h * (L + 4) + 3] = 0.0f;
    }
    if (trow < rowsT) {
#pragma unroll
        for (int j = 0; j < ATT_MAXJ; j++) {
            const int h = trow + rowsT * j;
            if (h < H)
                *(float4 *)(out + h * (L + 4) + 4 + col * 4) = acc[j];
        }
    }
}

/* Block (h, t) merges the S partial results of head h of row t into lat[t][h]. Chunks past
 * the row's length hold m = -inf, l = 0 and weigh nothing. The weights live in shared memory
 * padded to whole float4s (zeros), so vectorised reads of the last few stay inside it. */
__global__ void
mla_att_merge(const float *part, int S, int H, int L, float *lat)
{
    extern __shared__ float4 smem4[];
    float *wgt = (float *)smem4;      /* [S rounded up to 4] */
    const int h = blockIdx.x, t = blockIdx.y, tid = threadIdx.x;
    const size_t stride = (size_t)H * (L + 4);
    const float *base = part + (size_t)t * S * stride + (size_t)h * (L + 4);
    __shared__ float den_sh;

    if (tid == 0) {
        float mx = -INFINITY, den = 0.0f;
        for (int s = 0; s < S; s++)
            mx = fmaxf(mx, base[s * stride]);
        for (int s = 0; s < S; s++) {
            const float w = expf(base[s * stride] - mx);
            wgt[s] = w;
            den += w * base[s * stride + 1];
        }
        for (int s = S; s % 4 != 0; s++)
            wgt[s] = 0.0f;
        den_sh = den;
    }
    __syncthreads();
    const float inv = 1.0f / den_sh;
    for (int l = tid; l < L; l += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < S; s++)
            a += wgt[s] * base[s * stride + 4 + l];
        lat[((size_t)t * H + h) * L + l] = a * inv;
    }
}

/* Whether the attention reads a mirror of rows of C values of dtype dt. */
static int
att_dtype_ok(int dt, int C)
{
    return dt == KLI_DT_F32 || (dt == KLI_DT_BF16 && C % 8 == 0) ||
           (dt == KLI_DT_Q8_0 && C % 32 == 0);
}

int
cu_mla_check(struct k_gpu *g, int32_t H, int32_t L, int32_t C, struct kli_err *err)
{
    if (H < 1 || L < 4 || L % 4 != 0 || C % 4 != 0 || C < L)
        return err_set(err, KLI_E_UNSUPPORTED, "GPU attention needs the latent width (%d) "
                       "and the cache row (%d) in multiples of 4", L, C);
    if (L / 4 > ATT_NT || (H + ATT_NT / (L / 4) - 1) / (ATT_NT / (L / 4)) > ATT_MAXJ)
        return err_set(err, KLI_E_UNSUPPORTED, "GPU attention holds at most %d heads x "
                       "latent values per block, not %d x %d", ATT_MAXJ * ATT_NT * 4, H, L);
    if (att_smem(H, C) > g->info.smem_block)
        return err_set(err, KLI_E_UNSUPPORTED, "GPU attention needs %llu bytes of shared "
                       "memory per block; the device allows %llu",
                       (unsigned long long)att_smem(H, C),
                       (unsigned long long)g->info.smem_block);
    return KLI_OK;
}

/* The rows of a job as the kernels read them: row t's device cache and length. */
static void
att_fill_rows(struct att_row *rows, const float *const *cache, const int64_t *n, int64_t T)
{
    for (int64_t t = 0; t < T; t++) {
        rows[t].cache = cache[t];
        rows[t].n = n[t];
    }
}

/* Attention of T query rows whose device inputs are staged: rows_d [T], q_d [T][H][C] ->
 * lat_d [T][H][L], with part_d for the chunks' partial results ([T][S][H][L + 4] floats,
 * sized by the callers). */
static int64_t
att_chunks(const struct k_gpu *g, int64_t T, int64_t nmax, int64_t *chunk)
{
    /* Enough blocks to fill the device twice over, in chunks of whole tiles. */
    int64_t tiles = (nmax + ATT_PT - 1) / ATT_PT;
    int64_t S = (2 * (int64_t)g->info.n_sm + T - 1) / T;
    S = S < 1 ? 1 : S > tiles ? tiles : S;
    *chunk = (tiles + S - 1) / S * ATT_PT;
    return (nmax + *chunk - 1) / *chunk;
}

template <int DT>
static int
att_part(struct gpu_queue *q, const struct att_row *rows_d, const float *q_d, int64_t T,
         int H, int L, int C, float scale, int64_t S, int64_t chunk, float *part_d,
         struct kli_err *err)
{
    size_t smem = (size_t)att_smem(H, C);
    int rc;

    if ((rc = cu_check(cudaFuncSetAttribute(mla_att_part<DT>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)smem), err, "cudaFuncSetAttribute")) != KLI_OK)
        return rc;
    mla_att_part<DT><<<dim3((unsigned)S, (unsigned)T), ATT_NT, smem, q->st>>>(
        rows_d, q_d, H, L, C, scale, (long long)chunk, (int)S, part_d);
    return cu_launched(err, "mla_att_part");
}

/* The attention of T staged query rows over mirrors of dtype dt (att_dtype_ok). */
static int
att_run(struct gpu_queue *q, int dt, const struct att_row *rows_d, const float *q_d,
        int64_t T, int H, int L, int C, float scale, int64_t S, int64_t chunk, float *part_d,
        float *lat_d, struct kli_err *err)
{
    int rc;

    if (dt == KLI_DT_BF16)
        rc = att_part<KLI_DT_BF16>(q, rows_d, q_d, T, H, L, C, scale, S, chunk, part_d, err);
    else if (dt == KLI_DT_Q8_0)
        rc = att_part<KLI_DT_Q8_0>(q, rows_d, q_d, T, H, L, C, scale, S, chunk, part_d, err);
    else
        rc = att_part<KLI_DT_F32>(q, rows_d, q_d, T, H, L, C, scale, S, chunk, part_d, err);
    if (rc != KLI_OK)
        return rc;
    mla_att_merge<<<dim3((unsigned)H, (unsigned)T), 128, (size_t)(S + 3) / 4 * sizeof(float4),
                    q->st>>>(
        part_d, (int)S, H, L, lat_d);
    return cu_launched(err, "mla_att_merge");
}

int
cu_mla_attend(struct gpu_queue *q, const struct gpu_mla_job *j, struct kli_err *err)
{
    const int H = j->H, L = j->L, C = j->C;
    const int64_t T = j->T;
    int64_t nmax = 1, chunk;
    int rc;

    if (!att_dtype_ok(j->dtype, C))
        return err_set(err, KLI_E_UNSUPPORTED, "GPU attention: no kernel for cache rows of "
                       "%d values of dtype %d", C, j->dtype);
    if ((rc = cu_check(cudaSetDevice(q->g->info.device), err, "cudaSetDevice")) != KLI_OK)
        return rc;
    for (int64_t t = 0; t < T; t++)
        nmax = j->n[t] > nmax ? j->n[t] : nmax;
    int64_t S = att_chunks(q->g, T, nmax, &chunk);

    uint64_t b_rows = cu_align((uint64_t)T * sizeof(struct att_row));
    uint64_t b_q = cu_align((uint64_t)T * H * C * sizeof(float));
    uint64_t b_lat = cu_align((uint64_t)T * H * L * sizeof(float));
    uint64_t b_part = cu_align((uint64_t)T * S * H * (L + 4) * sizeof(float));
    if ((rc = cu_queue_reserve(q, b_rows + b_q + b_lat + b_part,
                               b_rows + b_q > b_lat ? b_rows + b_q : b_lat, err)) != KLI_OK)
        return rc;
    char *ws = (char *)q->ws, *pin = (char *)q->pin;
    att_fill_rows((struct att_row *)pin, j->cache, j->n, T);
    memcpy(pin + b_rows, j->q, (size_t)T * H * C * sizeof(float));
    struct att_row *rows_d = (struct att_row *)ws;
    float *q_d = (float *)(ws + b_rows), *lat_d = (float *)(ws + b_rows + b_q);
    float *part_d = (float *)(ws + b_rows + b_q + b_lat);

    if ((rc = cu_check(cudaMemcpyAsync(ws, pin, b_rows + b_q, cudaMemcpyHostToDevice, q->st),
                       err, "cudaMemcpyAsync (queries)")) != KLI_OK)
        return rc;
    if ((rc = att_run(q, j->dtype, rows_d, q_d, T, H, L, C, j->scale, S, chunk, part_d, lat_d,
                      err)) != KLI_OK)
        return rc;
    if ((rc = cu_check(cudaMemcpyAsync(pin, lat_d, (size_t)T * H * L * sizeof(float),
                                       cudaMemcpyDeviceToHost, q->st), err,
                       "cudaMemcpyAsync (latents)")) != KLI_OK ||
        (rc = cu_check(cudaStreamSynchronize(q->st), err, "mla attention")) != KLI_OK)
        return rc;
    memcpy(j->lat, pin, (size_t)T * H * L * sizeof(float));
    return KLI_OK;
}

/* ==== The projections: the rest of the layer ================================================ */

enum {
    MM_ROWS = 8,     /* weight rows per block: one per warp */
    MM_TOK = 4,      /* input rows per pass over a weight row */
    MM_TG = 32,      /* input rows per block (grid z splits longer batches) */
};

/*
 * Batch b of grid y: y_b[t][r] = W_b[r] . x_b[t] for r < R, t < T, where
 *     W_b = W + b * wbs bytes ([R][K] of dtype DT),  x_b[t] = x + b * xbs + t * ldx,
 *     y_b[t] = y + b * ybs + t * ldy.
 * One warp per weight row, as the expert kernels of moe.cu: decode reads each weight once.
 * The batches are the heads of the absorbed products (W_UK^T, W_UV); the dense projections
 * are one batch.
 */
template <int DT>
__global__ void __launch_bounds__(32 * MM_ROWS)
mla_mm(const void *W, long long wbs, int R, int K, const float *x, int ldx, int xbs, int T,
       float *y, int ldy, int ybs)
{
    const int r = blockIdx.x * MM_ROWS + threadIdx.x / 32, lane = threadIdx.x % 32;
    const int b = blockIdx.y, t0 = blockIdx.z * MM_TG;
    const int t1 = t0 + MM_TG < T ? t0 + MM_TG : T;

    if (r >= R)
        return;
    const void *w = (const char *)W + b * wbs;
    x += (size_t)b * xbs;
    y += (size_t)b * ybs;
    cu_rows<DT, 1, MM_TOK>(&w, r, K, t1 - t0, lane,
                           [&](int p) { return x + (size_t)(t0 + p) * ldx; },
                           [&](int p, const float *s) { y[(size_t)(t0 + p) * ldy + r] = s[0]; });
}

int
cu_mm(struct gpu_queue *q, const void *W, int dtype, long long wbs, int R, int K,
          int nb, const float *x, int ldx, int xbs, int64_t T, float *y, int ldy, int ybs,
          struct kli_err *err, const char *what)
{
    dim3 grid((unsigned)((R + MM_ROWS - 1) / MM_ROWS), (unsigned)nb,
              (unsigned)((T + MM_TG - 1) / MM_TG));
    const int gmin = cu_gemm_min();

    /* prefill: tensor cores (gemm.cu); where its scratch does not fit, these kernels */
    if (gmin > 0 && T >= gmin && cu_gemm_fits(q, dtype, R, K, T))
        return cu_gemm(q, W, dtype, wbs, R, K, nb, x, ldx, xbs, T, y, ldy, ybs, err, what);
    if (cu_dtype_switch(dtype, [&](auto dt) {
            mla_mm<decltype(dt)::value><<<grid, 32 * MM_ROWS, 0, q->st>>>(
                W, wbs, R, K, x, ldx, xbs, (int)T, y, ldy, ybs);
        }) != 0)
        /* callers check cu_mat_ok first: a block must never be read as another type's */
        return err_set(err, KLI_E_UNSUPPORTED, "%s: no GPU matmul for dtype %d", what, dtype);
    return cu_launched(err, what);
}

/* Block t: the new cache row of query row t, (rmsnorm(c) * norm, k_pe), into its device
 * cache at row n - 1 and into out[t]. The sum of squares is taken in double, as ops_rmsnorm
 * does, so the rows match the CPU's to the last bit but for that sum's order. */
__global__ void
mla_kv_store(const float *ckv, const float *norm, const struct att_row *rows, int L, int C,
             float eps, float *out)
{
    __shared__ double part[256];
    const int t = blockIdx.x, tid = threadIdx.x;
    const float *src = ckv + (size_t)t * C;
    float *dst = (float *)rows[t].cache + (size_t)(rows[t].n - 1) * C;
    double ss = 0.0;

    for (int i = tid; i < L; i += blockDim.x)
        ss += (double)src[i] * src[i];
    const float r = (float)(1.0 / sqrt(cu_block_sum(ss, part) / (double)L + (double)eps));
    for (int i = tid; i < C; i += blockDim.x) {
        const float v = i < L ? __fmul_rn(__fmul_rn(src[i], r), norm[i]) : src[i];
        dst[i] = v;
        out[(size_t)t * C + i] = v;
    }
}

/* Block t: q_pe of every head behind its absorbed query: qfull[t][h][L + k] = q[t][h][nope + k]. */
__global__ void
mla_qpe(const float *q, int H, int nope, int rope, int L, int C, float *qfull)
{
    const int t = blockIdx.x, dqk = nope + rope;

    for (int i = threadIdx.x; i < H * rope; i += blockDim.x) {
        const int h = i / rope, k = i % rope;
        qfull[((size_t)t * H + h) * C + L + k] = q[(size_t)t * H * dqk + h * dqk + nope + k];
    }
}

int
cu_mat_ok(const struct gpu_mat *m, int32_t rows, int32_t cols)
{
    return m->w != NULL && m->rows == rows && m->cols == cols && gpu_dtype_ok(m->dtype, cols);
}

int
cu_mla_layer_check(struct k_gpu *g, const struct gpu_mla_w *w, int32_t D, int32_t H,
                   int32_t nope, int32_t rope, int32_t dv, struct kli_err *err)
{
    (void)g;
    if (w == NULL)
        return err_set(err, KLI_E_INVALID, "mla layer: no weights");
    int32_t L = w->kv_a.rows - rope, dqk = nope + rope;
    if (!cu_mat_ok(&w->q_proj, H * dqk, D) || !cu_mat_ok(&w->kv_a, L + rope, D) ||
        !cu_mat_ok(&w->o_proj, D, H * dv) || w->kv_norm == NULL || w->w_uk_t == NULL ||
        w->w_uv == NULL)
        return err_set(err, KLI_E_UNSUPPORTED, "GPU projections need matrices in "
                       CU_MAT_NEED ": q_proj %d x %d of dtype %d, kv_a %d x %d of dtype %d, "
                       "o_proj %d x %d of dtype %d", w->q_proj.rows, w->q_proj.cols,
                       w->q_proj.dtype, w->kv_a.rows, w->kv_a.cols, w->kv_a.dtype,
                       w->o_proj.rows, w->o_proj.cols, w->o_proj.dtype);
    if (L < 8 || nope % 8 != 0 || L % 8 != 0 || dqk % 4 != 0)
        return err_set(err, KLI_E_UNSUPPORTED, "GPU projections need the latent (%d) and nope "
                       "(%d) widths in multiples of 8 and nope + rope in multiples of 4", L,
                       nope);
    return KLI_OK;
}

int
cu_mla_layer(struct gpu_queue *q, const struct gpu_mla_layer_job *j,
             struct kli_err *err)
{
    const struct gpu_mla_w *w = j->w;
    const int H = j->H, L = j->L, C = j->L + j->rope, D = j->D;
    const int dqk = j->nope + j->rope, dv = j->dv;
    const int64_t T = j->T;
    int64_t nmax = 1, chunk;
    int rc;

    if (T < 1)
        return err_set(err, KLI_E_INVALID, "mla layer: no rows");
    if ((rc = cu_check(cudaSetDevice(q->g->info.device), err, "cudaSetDevice")) != KLI_OK)
        return rc;
    for (int64_t t = 0; t < T; t++) {
        if (j->n[t] < 1)
            return err_set(err, KLI_E_INVALID, "mla layer: row %lld attends to %lld rows",
                           (long long)t, (long long)j->n[t]);
        nmax = j->n[t] > nmax ? j->n[t] : nmax;
    }
    int64_t S = att_chunks(q->g, T, nmax, &chunk);

    /* workspace: rows, x | q, ckv, qfull, lat, part, o | out, new rows */
    uint64_t b_rows = cu_align((uint64_t)T * sizeof(struct att_row));
    uint64_t b_x = cu_align((uint64_t)T * D * 4), b_qp = cu_align((uint64_t)T * H * dqk * 4);
    uint64_t b_ckv = cu_align((uint64_t)T * C * 4), b_qf = cu_align((uint64_t)T * H * C * 4);
    uint64_t b_lat = cu_align((uint64_t)T * H * L * 4);
    uint64_t b_part = cu_align((uint64_t)T * S * H * (L + 4) * 4);
    uint64_t b_o = cu_align((uint64_t)T * H * dv * 4), b_out = cu_align((uint64_t)T * D * 4);
    uint64_t b_in = b_rows + b_x, b_res = b_out + b_ckv;
    uint64_t total = b_in + b_qp + b_ckv + b_qf + b_lat + b_part + b_o + b_res;
    if ((rc = cu_queue_reserve(q, total, b_in > b_res ? b_in : b_res, err)) != KLI_OK)
        return rc;
    char *ws = (char *)q->ws, *pin = (char *)q->pin;
    att_fill_rows((struct att_row *)pin, j->cache, j->n, T);
    memcpy(pin + b_rows, j->x, (size_t)T * D * 4);
    char *p = ws;
    const struct att_row *rows_d = (const struct att_row *)p;
    const float *x_d = (const float *)(p += b_rows);
    float *qp_d = (float *)(p += b_x), *ckv_d = (float *)(p += b_qp);
    float *qf_d = (float *)(p += b_ckv), *lat_d = (float *)(p += b_qf);
    float *part_d = (float *)(p += b_lat), *o_d = (float *)(p += b_part);
    float *out_d = (float *)(p += b_o), *new_d = (float *)(p += b_out);

    if ((rc = cu_check(cudaMemcpyAsync(ws, pin, b_in, cudaMemcpyHostToDevice, q->st), err,
                       "cudaMemcpyAsync (mla inputs)")) != KLI_OK)
        return rc;
    if ((rc = cu_mm(q, w->q_proj.w, w->q_proj.dtype, 0, H * dqk, D, 1, x_d, D, 0, T, qp_d,
                        H * dqk, 0, err, "mla q_proj")) != KLI_OK ||
        (rc = cu_mm(q, w->kv_a.w, w->kv_a.dtype, 0, C, D, 1, x_d, D, 0, T, ckv_d, C, 0,
                        err, "mla kv_a")) != KLI_OK)
        return rc;
    mla_kv_store<<<(unsigned)T, 256, 0, q->st>>>(ckv_d, w->kv_norm, rows_d, L, C, j->eps,
                                                 new_d);
    if ((rc = cu_launched(err, "mla_kv_store")) != KLI_OK)
        return rc;
    /* qfull[t][h][0:L] = W_UK[h]^T q_nope[t][h]: head h is batch h */
    if ((rc = cu_mm(q, w->w_uk_t, KLI_DT_F32, (long long)L * j->nope * 4, L, j->nope, H,
                        qp_d, H * dqk, dqk, T, qf_d, H * C, C, err, "mla absorb")) != KLI_OK)
        return rc;
    mla_qpe<<<(unsigned)T, 128, 0, q->st>>>(qp_d, H, j->nope, j->rope, L, C, qf_d);
    if ((rc = cu_launched(err, "mla_qpe")) != KLI_OK)
        return rc;
    if ((rc = att_run(q, KLI_DT_F32, rows_d, qf_d, T, H, L, C, j->scale, S, chunk, part_d,
                      lat_d, err)) != KLI_OK)
        return rc;
    /* o[t][h] = W_UV[h] lat[t][h], then out = o_proj o */
    if ((rc = cu_mm(q, w->w_uv, KLI_DT_F32, (long long)dv * L * 4, dv, L, H, lat_d, H * L,
                        L, T, o_d, H * dv, dv, err, "mla expand")) != KLI_OK ||
        (rc = cu_mm(q, w->o_proj.w, w->o_proj.dtype, 0, D, H * dv, 1, o_d, H * dv, 0, T,
                        out_d, D, 0, err, "mla o_proj")) != KLI_OK)
        return rc;
    /* two exact copies: the alignment padding between the arrays is never written */
    if ((rc = cu_check(cudaMemcpyAsync(pin, out_d, (size_t)T * D * 4, cudaMemcpyDeviceToHost,
                                       q->st), err, "cudaMemcpyAsync (mla result)")) !=
        KLI_OK ||
        (rc = cu_check(cudaMemcpyAsync(pin + b_out, new_d, (size_t)T * C * 4,
                                       cudaMemcpyDeviceToHost, q->st), err,
                       "cudaMemcpyAsync (mla rows)")) != KLI_OK ||
        (rc = cu_check(cudaStreamSynchronize(q->st), err, "mla layer")) != KLI_OK)
        return rc;
    memcpy(j->out, pin, (size_t)T * D * 4);
    memcpy(j->rows, pin + b_out, (size_t)T * C * 4);
    return KLI_OK;
}

int
cu_matmul(struct gpu_queue *q, const struct gpu_mat *w, const float *x, int64_t T,
          float *y, struct kli_err *err)
{
    const int R = w->rows, K = w->cols;
    int rc;

    if (T < 1 || !cu_mat_ok(w, R, K))
        return err_set(err, KLI_E_UNSUPPORTED, "GPU matmul: %d x %d of dtype %d", R, K,
                       w->dtype);
    if ((rc = cu_check(cudaSetDevice(q->g->info.device), err, "cudaSetDevice")) != KLI_OK)
        return rc;
    uint64_t b_x = cu_align((uint64_t)T * K * 4), b_y = cu_align((uint64_t)T * R * 4);
    if ((rc = cu_queue_reserve(q, b_x + b_y, b_x > b_y ? b_x : b_y, err)) != KLI_OK)
        return rc;
    char *ws = (char *)q->ws;
    memcpy(q->pin, x, (size_t)T * K * 4);
    if ((rc = cu_check(cudaMemcpyAsync(ws, q->pin, (size_t)T * K * 4, cudaMemcpyHostToDevice,
                                       q->st), err, "cudaMemcpyAsync (matmul input)")) !=
        KLI_OK ||
        (rc = cu_mm(q, w->w, w->dtype, 0, R, K, 1, (const float *)ws, K, 0, T,
                    (float *)(ws + b_x), R, 0, err, "matmul")) != KLI_OK ||
        (rc = cu_check(cudaMemcpyAsync(q->pin, ws + b_x, (size_t)T * R * 4,
                                       cudaMemcpyDeviceToHost, q->st), err,
                       "cudaMemcpyAsync (matmul result)")) != KLI_OK ||
        (rc = cu_check(cudaStreamSynchronize(q->st), err, "matmul")) != KLI_OK)
        return rc;
    memcpy(y, q->pin, (size_t)T * R * 4);
    return KLI_OK;
}
