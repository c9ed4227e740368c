/*
 * test-cuda.c - every CUDA block against its CPU twin on random inputs, and the golden
 * fixture end to end with the GPU forced on (white-box: it drives the backend vtable of
 * src/backend.h directly).
 *
 *   1. latent attention (cuda/mla.cu) vs the attention step of mla_forward (mla_attend)
 *      and a float64 reference: decode rows, prefill rows with causal
 *      lengths, several sequences in one job, the released model's shape, cache rows of
 *      f32, bf16 and q8_0 (the CPU twin of a narrow cache is mla_attend's one-pass form, the
 *      reference reads the rows widened); 1e-5 relative L2;
 *   2. SwiGLU experts (cuda/moe.cu) vs ffn_forward and moe_forward's weighted sum, for each
 *      weight dtype, the K types included, and down of another dtype than gate and up; 1e-5
 *      (the CPU twins run the generic C kernels: KLI_SIMD=generic);
 *  2b. the K types' products (cu_mm) on random blocks vs the generic kernel and float64;
 *   3. a whole MLA layer (cuda/mla.cu: projections, new cache rows, attention) vs
 *      mla_forward, for each dtype of the projections, decode and prefill rows of several
 *      sequences, and the released shape; 1e-5 on the output, the new rows on both sides;
 *      the K types accepted in rows of whole super-blocks, declined otherwise; then a whole
 *      KDA layer likewise; then the memory budget refuses with a message;
 *   4. the tiny model with --gpu on: prefill + decode within 1e-4 of the golden logits, all
 *      experts resident, 3 per layer (the CPU computing the rest at the same time, with the
 *      hot set re-chosen as it runs, the copies made by the mover thread; kli_model_gpu_stats
 *      counts them), MLA only; the same against the CPU path; a batched step
 *      over two sessions; a session whose history is replaced (copy) must not reuse stale
 *      device rows;
 *  4b. the nano model converted to K types with --gpu on, the whole model and 2 hot experts
 *      of 6, against the CPU path; 1e-4.
 *
 * Without CUDA or without a GPU it prints "1..0 # SKIP" with the reason.
 *
 * `test-cuda --bench` instead times the attention step, CPU against GPU, at the released
 * model's shape for contexts of 4K, 32K, 128K and 1M tokens; `test-cuda --bench-mm` the
 * decode product of each block type at the shape of the released lm_head (neither is part
 * of make check).
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "ffn.h"
#include "kda.h"
#include "kli.h"
#include "mla.h"
#include "model.h"
#include "ops.h"
#include "simd.h"
#include "tap.h"
#include "testlib.h"
#include "threads.h"
#include "util.h"

static const struct backend_ops *ops;
static struct k_gpu *gpu;
static struct gpu_queue *queue;
static uint64_t rng = 0x9e3779b97f4a7c15ull;

/*
 * The tensor-core products of cuda/gemm.cu, which the gemm cases run with KLI_CUDA_GEMM_MIN
 * forced (gemm_force; the other cases with it 0: the exact kernels). Their operands are split
 * into two bf16 values each, hi + lo, 16 significant bits: an operand is off by at most 2^-18
 * of itself, and a product from the float32 one by about 1e-5 of its L2 norm (one bf16
 * rounding would be 1e-3; gemm.cu). Beside the float32 CPU twins the bounds (1e-6 to 1e-5
 * for products, layers, states and cache rows; 1e-5 between the GPU's and the CPU's logits)
 * become gemm_tol, 1e-4; the whole model's logits keep 1e-4 against the golden ones (emulated
 * on the tiny model: 1.3e-5). F32 weights stay float32 (no TF32) and keep the exact bounds.
 * test_gemm checks the products themselves against float64 sums over the split operands; a
 * wrong product (a transposed or shifted matrix, a stale tile, a missing lo) is off by 1e-3
 * to O(1).
 */
static double gemm_tol;
static int gemm_one;   /* KLI_CUDA_GEMM_SPLIT=0: one bf16 rounding, no lo */

/* KLI_CUDA_GEMM_MIN=min (0: off) and the bound of the float32 tests widened to tol. */
static void
gemm_force(int min, double tol)
{
    char v[16];

    snprintf(v, sizeof(v), "%d", min);
    setenv("KLI_CUDA_GEMM_MIN", v, 1);
    gemm_tol = min > 0 ? tol : 0.0;
}

/* The bound `exact` of a float32 test, or the bf16 one when products of dtype dt (-1: a
 * model's mix) run on the tensor cores. */
static double
tol_for(int dt, double exact)
{
    return dt == KLI_DT_F32 || exact > gemm_tol ? exact : gemm_tol;
}

/* Device -> host. @return 0 on success. */
static int
dev_read(void *dst, const void *src, uint64_t bytes)
{
    struct kli_err err = {0};

    if (ops->download(gpu, dst, src, bytes, &err) != KLI_OK) {
        diag("download: %s", err.msg);
        return -1;
    }
    return 0;
}

static float
frand(void)
{
    return (float)tl_unit(tl_xorshift(&rng)) * 2.0f - 1.0f;
}

static void *
dev_copy(const void *src, uint64_t bytes)
{
    struct kli_err err = {0};
    void *p = NULL;

    if (ops->alloc(gpu, &p, bytes, &err) != KLI_OK ||
        ops->upload(gpu, p, src, bytes, &err) != KLI_OK) {
        printf("Bail out! device copy of %llu bytes: %s\n", (unsigned long long)bytes,
               err.msg);
        exit(1);
    }
    return p;
}

/* ==== 1. Latent attention ==================================================================== */

/* The CPU twin: mla_forward's attention step (mla_attend) for one query row, on a model that
 * is only the shape: H heads, latent L, cache rows of C = L + rope stored as dt, q.k over
 * dqk = nope + rope dimensions (the scale 1/sqrt(dqk)). It reads cache and q only. S: [H][n]
 * scratch. */
static void
cpu_attend(void *cache, enum k_dtype dt, int64_t n, float *q, int H, int L, int C, int dqk,
           float *lat, float *S)
{
    static struct kli_model m;
    struct mla_scratch sc = {.qfull = q, .lat = lat, .work = S, .cache_dt = dt};
    float *c = cache;
    int64_t pos = n - 1;

    m.cfg.mla.n_heads = H;
    m.cfg.mla.kv_lora_rank = L;
    m.cfg.mla.qk_rope_dim = C - L;
    m.cfg.mla.qk_nope_dim = dqk - (C - L);
    sc.part = tl_malloc((size_t)(kli_threads() * mla_part_floats(&m.cfg)) * sizeof(float));
    mla_attend(&m, &c, &pos, 1, &sc, 1);
    free(sc.part);
}

/* float64 reference for one query row. */
static void
ref_attend(const float *cache, int64_t n, const float *q, int H, int L, int C, float scale,
           float *lat)
{
    double *s = tl_malloc((size_t)n * sizeof(double)), *acc = tl_malloc((size_t)L * sizeof(double));

    for (int h = 0; h < H; h++) {
        double mx = -INFINITY, den = 0.0;
        for (int64_t i = 0; i < n; i++) {
            double d = 0.0;
            for (int c = 0; c < C; c++)
                d += (double)q[h * C + c] * cache[i * C + c];
            s[i] = d * scale;
            mx = s[i] > mx ? s[i] : mx;
        }
        for (int l = 0; l < L; l++)
            acc[l] = 0.0;
        for (int64_t i = 0; i < n; i++) {
            double w = exp(s[i] - mx);
            den += w;
            for (int l = 0; l < L; l++)
                acc[l] += w * cache[i * C + l];
        }
        for (int l = 0; l < L; l++)
            lat[h * L + l] = (float)(acc[l] / den);
    }
    free(s);
    free(acc);
}

/* n_seq sequences with cache lengths len[q], T_seq query rows each (row t of sequence q
 * attends to len[q] - T_seq + t + 1 rows, as in prefill), the rows stored as dt (F32, BF16,
 * Q8_0); the float64 reference reads them widened. */
static void
test_attention(const char *what, enum k_dtype dt, int H, int L, int C, int n_seq,
               const int64_t *len, int T_seq)
{
    int dqk = C / 2;
    float scale = 1.0f / sqrtf((float)dqk);
    int64_t T = (int64_t)n_seq * T_seq, nmax = 0, rb = (int64_t)dtype_nbytes(dt, (uint64_t)C);
    float *caches[8], *dcache[8];
    uint8_t *stored[8];
    const float *cptr[64];
    int64_t nrow[64];

    for (int q = 0; q < n_seq; q++) {
        caches[q] = tl_malloc((size_t)len[q] * C * sizeof(float));
        stored[q] = tl_malloc((size_t)(len[q] * rb));
        for (int64_t i = 0; i < len[q] * C; i++)
            caches[q][i] = frand() * 2.0f;
        dtype_from_f32(dt, caches[q], stored[q], len[q] * C);
        dtype_to_f32(dt, stored[q], caches[q], len[q] * C);
        dcache[q] = dev_copy(stored[q], (uint64_t)(len[q] * rb));
        nmax = len[q] > nmax ? len[q] : nmax;
    }

    float *qv = tl_malloc((size_t)T * H * C * sizeof(float));
    float *lat = tl_malloc((size_t)T * H * L * sizeof(float));
    float *cpu = tl_malloc((size_t)T * H * L * sizeof(float));
    float *ref = tl_malloc((size_t)T * H * L * sizeof(float));
    float *S = tl_malloc((size_t)H * nmax * sizeof(float));
    for (int64_t i = 0; i < T * H * C; i++)
        qv[i] = frand();
    for (int64_t i = 0; i < T * H * L; i++)
        lat[i] = NAN;   /* poison: every element must be written */
    for (int64_t t = 0; t < T; t++) {
        int q = (int)(t / T_seq);
        cptr[t] = dcache[q];
        nrow[t] = len[q] - T_seq + t % T_seq + 1;
        cpu_attend(dt == KLI_DT_F32 ? (void *)caches[q] : stored[q], dt, nrow[t],
                   qv + t * H * C, H, L, C, dqk, cpu + t * H * L, S);
        ref_attend(caches[q], nrow[t], qv + t * H * C, H, L, C, scale, ref + t * H * L);
    }
    struct gpu_mla_job j = {T, H, L, C, scale, cptr, nrow, qv, lat, (int32_t)dt};
    struct kli_err err = {0};
    int rc = ops->mla_attend(queue, &j, &err);
    if (rc != KLI_OK)
        diag("%s: %s", what, err.msg);
    double eg = tl_rel_l2(lat, ref, T * H * L), ec = tl_rel_l2(cpu, ref, T * H * L);
    double egc = tl_rel_l2(lat, cpu, T * H * L);
    ok(rc == KLI_OK && eg < 1e-5 && egc < 1e-5, "attention %s, %s rows: GPU vs float64 %.2g, "
       "vs CPU twin %.2g (CPU vs float64 %.2g)", what, k_dtype_name(dt), eg, egc, ec);
    for (int q = 0; q < n_seq; q++) {
        ops->release(gpu, dcache[q], (uint64_t)(len[q] * rb));
        free(caches[q]);
        free(stored[q]);
    }
    free(qv);
    free(lat);
    free(cpu);
    free(ref);
    free(S);
}

/* ==== 2. Experts ============================================================================= */

/* A random FFN, gate and up of dtype dt, down of ddown: host views in w (data in bufs) and a
 * device copy in d. */
static void
make_ffn(enum k_dtype dt, enum k_dtype ddown, int64_t D, int64_t F, struct ffn_w *w,
         void **bufs, struct gpu_ffn *d)
{
    struct tensor *t[3] = {&w->gate, &w->up, &w->down};
    int64_t rows[3] = {F, F, D}, cols[3] = {D, D, F};
    enum k_dtype kt[3] = {dt, dt, ddown};
    const void *dp[3];

    for (int k = 0; k < 3; k++) {
        int64_t n = rows[k] * cols[k];
        float *f = tl_malloc((size_t)n * sizeof(float));
        for (int64_t i = 0; i < n; i++)
            f[i] = frand() / sqrtf((float)cols[k]);
        uint64_t bytes = dtype_nbytes(kt[k], (uint64_t)n);
        bufs[k] = tl_malloc(bytes);
        dtype_from_f32(kt[k], f, bufs[k], n);
        free(f);
        memset(t[k], 0, sizeof(*t[k]));
        t[k]->dtype = kt[k];
        t[k]->ndim = 2;
        t[k]->shape[0] = rows[k];
        t[k]->shape[1] = cols[k];
        t[k]->data = bufs[k];
        t[k]->name = "test";
        dp[k] = dev_copy(bufs[k], bytes);
    }
    d->gate = dp[0];
    d->up = dp[1];
    d->down = dp[2];
    d->dtype = (int32_t)dt;
    d->d_ff = (int32_t)F;
    d->dtype_down = (int32_t)ddown;
}

/* Experts with gate and up of dtype dt, down of ddown, F wide (the shared one 2F). */
static void
test_experts(enum k_dtype dt, enum k_dtype ddown, int F)
{
    enum { D = 256, NE = 3, T = 6 };
    struct ffn_w w[NE + 1];
    struct gpu_ffn d[NE + 1];
    void *bufs[NE + 1][3];
    float *x = tl_malloc(T * D * sizeof(float)), *out = tl_malloc(T * D * sizeof(float));
    float *ref = tl_malloc(T * D * sizeof(float)), *y = tl_malloc(T * D * sizeof(float));
    float *h1 = tl_malloc(T * F * 2 * sizeof(float)), *h3 = tl_malloc(T * F * 2 * sizeof(float));
    float *xe = tl_malloc(T * D * sizeof(float));
    int32_t start[NE + 2], row[T * (NE + 1)];
    float wt[T * (NE + 1)];

    for (int e = 0; e <= NE; e++)   /* item 0: a shared expert twice as wide */
        make_ffn(dt, ddown, D, e == 0 ? 2 * F : F, &w[e], bufs[e], &d[e]);
    for (int i = 0; i < T * D; i++)
        x[i] = frand();
    /* item 0 over every row; expert e over rows t with (t + e) % 2 == 0, e = 3 over none */
    int32_t p = 0;
    for (int e = 0; e <= NE; e++) {
        start[e] = p;
        for (int t = 0; t < T && e < NE; t++) {
            if (e == 0 || (t + e) % 2 == 0) {
                row[p] = t;
                wt[p++] = e == 0 ? 1.0f : 0.25f + 0.5f * frand() * frand();
            }
        }
    }
    start[NE + 1] = p;
    /* the CPU twin: ffn_forward per item over its gathered rows, weighted sum */
    memset(ref, 0, T * D * sizeof(float));
    for (int e = 0; e <= NE; e++) {
        int32_t n = start[e + 1] - start[e];
        for (int32_t i = 0; i < n; i++)
            memcpy(xe + i * D, x + row[start[e] + i] * D, D * sizeof(float));
        if (n > 0)
            ffn_forward(&w[e], xe, n, y, h1, h3);
        for (int32_t i = 0; i < n; i++)
            for (int k = 0; k < D; k++)
                ref[row[start[e] + i] * D + k] += wt[start[e] + i] * y[i * D + k];
    }
    for (int i = 0; i < T * D; i++)
        out[i] = 0.5f;   /* moe_wait adds into out */
    struct gpu_moe_job j = {T, D, x, NE + 1, d, start, row, wt};
    struct kli_err err = {0};
    int rc = ops->moe_launch(queue, &j, &err);
    if (rc == KLI_OK)
        rc = ops->moe_wait(queue, out, &err);
    if (rc != KLI_OK)
        diag("experts %s/%s: %s", k_dtype_name(dt), k_dtype_name(ddown), err.msg);
    for (int i = 0; i < T * D; i++)
        out[i] -= 0.5f;
    double e = tl_rel_l2(out, ref, T * D);
    ok(rc == KLI_OK && e < tol_for(dt, 1e-5), "experts %s, down %s, %d wide (shared + %d "
       "routed, one idle): GPU vs CPU twin %.2g", k_dtype_name(dt), k_dtype_name(ddown), F,
       NE - 1, e);
    for (int e2 = 0; e2 <= NE; e2++) {
        uint64_t b[3] = {dtype_nbytes(dt, (uint64_t)d[e2].d_ff * D),
                         dtype_nbytes(dt, (uint64_t)d[e2].d_ff * D),
                         dtype_nbytes(ddown, (uint64_t)d[e2].d_ff * D)};
        ops->release(gpu, (void *)d[e2].gate, b[0]);
        ops->release(gpu, (void *)d[e2].up, b[1]);
        ops->release(gpu, (void *)d[e2].down, b[2]);
        for (int k = 0; k < 3; k++)
            free(bufs[e2][k]);
    }
    free(x);
    free(out);
    free(ref);
    free(y);
    free(h1);
    free(h3);
    free(xe);
}

/* A random [rows][cols] matrix of dtype dt: host view in t (data in *buf). */
static void
make_mat(enum k_dtype dt, int64_t rows, int64_t cols, struct tensor *t, void **buf)
{
    int64_t n = rows * cols;
    float *f = tl_malloc((size_t)n * sizeof(float));

    for (int64_t i = 0; i < n; i++)
        f[i] = frand() / sqrtf((float)cols) * 2.0f;
    *buf = tl_malloc(dtype_nbytes(dt, (uint64_t)n));
    dtype_from_f32(dt, f, *buf, n);
    free(f);
    memset(t, 0, sizeof(*t));
    t->dtype = dt;
    t->ndim = 2;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->data = *buf;
    t->name = "test";
}

static float *
rand_floats(int64_t n, float scale, float bias)
{
    float *f = tl_malloc((size_t)n * sizeof(float));

    for (int64_t i = 0; i < n; i++)
        f[i] = bias + scale * frand();
    return f;
}

/* ==== 2b. The K types' products ============================================================== */

/*
 * y [T][R] = x W^T for a [R][K] matrix of the K type dt, through the device's matmul (cu_mm:
 * the kernels every block uses), against the CPU's generic kernel (dequantize, float dot) and
 * a float64 sum over dtype_to_f32's weights. The blocks are random bytes, so that every bit
 * of every field is exercised (the quantizer leaves some patterns out), but for the f16
 * scales d (and dmin), set to finite values of either sign (kli-weights(5) gives their
 * offsets). The decoded weights are the CPU's bit for bit (cu_k8 rounds as kq_to_f32 does);
 * only the order of the float32 sums differs: 1e-5, as for Q8_0 and Q4.
 */
/* nb random blocks of the block type dt (Q8_0, Q4 or a K type) in a new buffer: random bytes
 * but for the f16 scales d (and dmin), finite of either sign, at the offsets kli-weights(5)
 * gives. */
static uint8_t *
rand_blocks(enum k_dtype dt, int64_t nb)
{
    /* d and dmin (-1: none) of Q2_K .. Q6_K, then Q8_0 and Q4 */
    static const int off[7][2] = {{80, 82}, {108, -1}, {0, 2}, {0, 2}, {208, -1}, {0, -1},
                                  {0, -1}};
    const int bb = dtype_info(dt)->block_bytes;
    const int *o = off[dt == KLI_DT_Q8_0 ? 5 : dt == KLI_DT_Q4 ? 6 : dt - KLI_DT_Q2_K];
    uint8_t *w = tl_malloc((size_t)(nb * bb));

    for (int64_t i = 0; i < nb * bb; i++)
        w[i] = (uint8_t)tl_xorshift(&rng);
    for (int64_t b = 0; b < nb; b++) {
        for (int k = 0; k < 2 && o[k] >= 0; k++) {
            /* exponent 5..12 (magnitudes 2^-10 .. 2^-3), random mantissa and sign */
            uint64_t r = tl_xorshift(&rng);
            unsigned h = (unsigned)((r & 0x83ffu) | ((5 + (r >> 16) % 8) << 10));
            w[b * bb + o[k]] = (uint8_t)(h & 0xff);
            w[b * bb + o[k] + 1] = (uint8_t)(h >> 8);
        }
    }
    return w;
}

static void
test_kmatmul(enum k_dtype dt, int R, int K, int T)
{
    const int bb = dtype_info(dt)->block_bytes, nb = R * K / KLI_QK_K;
    uint8_t *w = rand_blocks(dt, nb);
    float *x = rand_floats((int64_t)T * K, 1.0f, 0.0f), *wf = tl_malloc((size_t)K * 4);
    float *yc = tl_malloc((size_t)T * R * 4), *yg = tl_malloc((size_t)T * R * 4);
    double *yd = tl_malloc((size_t)T * R * sizeof(double));

    for (int r = 0; r < R; r++) {
        dtype_to_f32(dt, w + (size_t)r * (K / KLI_QK_K) * bb, wf, K);
        for (int t = 0; t < T; t++) {
            double a = 0.0;
            for (int k = 0; k < K; k++)
                a += (double)wf[k] * x[(size_t)t * K + k];
            yd[(size_t)t * R + r] = a;
        }
    }
    kernels_generic()->matmul[dt](yc, R, x, K, w, R, K, T);
    struct gpu_mat m = {dev_copy(w, (uint64_t)nb * bb), (int32_t)dt, R, K};
    struct kli_err err = {0};
    int rc = ops->matmul(queue, &m, x, T, yg, &err);
    if (rc != KLI_OK)
        diag("%s matmul: %s", k_dtype_name(dt), err.msg);
    double eg = tl_rel_l2(yg, yc, (int64_t)T * R), ed = tl_rel_l2_d(yg, yd, (int64_t)T * R);
    ok(rc == KLI_OK && eg < 1e-5 && ed < 1e-5, "%s, %d x %d, %d rows, random blocks: GPU vs "
       "the generic kernel %.2g, vs float64 %.2g", k_dtype_name(dt), R, K, T, eg, ed);
    ops->release(gpu, (void *)m.w, (uint64_t)nb * bb);
    free(w);
    free(x);
    free(wf);
    free(yc);
    free(yg);
    free(yd);
}

/* ==== 2c. The tensor-core products (cuda/gemm.cu) ============================================ */

/* v[i] = hi[i] + lo[i], i < n, as gemm.cu splits the operands of products of dtype dt:
 * hi = bf16(v), lo = bf16(v - hi) (0 with gemm_one); F32 is not split. */
static void
split16(enum k_dtype dt, const float *v, int64_t n, double *hi, double *lo)
{
    for (int64_t i = 0; i < n; i++) {
        float h = dt == KLI_DT_F32 ? v[i] : bf16_to_f32(f32_to_bf16(v[i]));
        hi[i] = h;
        lo[i] = dt == KLI_DT_F32 || gemm_one ? 0.0 : bf16_to_f32(f32_to_bf16(v[i] - h));
    }
}

/*
 * y [T][R] = x W^T for a random [R][K] matrix of dtype dt through the device's matmul with
 * KLI_CUDA_GEMM_MIN forced (gemm_force), against
 *   - float64 sums of wh xh + wh xl + wl xh over the operands as gemm.cu splits them (x; the
 *     weights decoded as the CPU decodes them, dtype_to_f32; F32: no split): 1e-4, as a
 *     float32 sum of 2304 terms is off by about 1e-6, more where the tensor cores add with
 *     truncation (Fasi et al., 2021: a bias that grows with K); one bf16 rounding in place
 *     of the split, or a lost lo term, shows as 1e-3;
 *   - the CPU's generic kernel in float32: gemm_tol (F32: 1e-5).
 */
static void
test_gemm(enum k_dtype dt, int R, int K, int T)
{
    struct tensor t;
    void *w;
    float *x = rand_floats((int64_t)T * K, 1.0f, 0.0f), *wf = tl_malloc((size_t)K * 4);
    double *xh = tl_malloc((size_t)T * K * sizeof(double));
    double *xl = tl_malloc((size_t)T * K * sizeof(double)), *wh = tl_malloc((size_t)K * 8);
    double *wl = tl_malloc((size_t)K * 8);
    float *yc = tl_malloc((size_t)T * R * 4), *yg = tl_malloc((size_t)T * R * 4);
    double *yd = tl_malloc((size_t)T * R * sizeof(double));
    const uint64_t bytes = dtype_nbytes(dt, (uint64_t)R * K);

    make_mat(dt, R, K, &t, &w);
    split16(dt, x, (int64_t)T * K, xh, xl);
    for (int r = 0; r < R; r++) {
        dtype_to_f32(dt, (const uint8_t *)w + dtype_nbytes(dt, (uint64_t)r * K), wf, K);
        split16(dt, wf, K, wh, wl);
        for (int i = 0; i < T; i++) {
            const double *ph = xh + (size_t)i * K, *pl = xl + (size_t)i * K;
            double a = 0.0;
            for (int k = 0; k < K; k++)
                a += wh[k] * ph[k] + wh[k] * pl[k] + wl[k] * ph[k];
            yd[(size_t)i * R + r] = a;
        }
    }
    kernels_generic()->matmul[dt](yc, R, x, K, w, R, K, T);
    struct gpu_mat m = {dev_copy(w, bytes), (int32_t)dt, R, K};
    struct kli_err err = {0};
    int rc = ops->matmul(queue, &m, x, T, yg, &err);
    if (rc != KLI_OK)
        diag("%s gemm: %s", k_dtype_name(dt), err.msg);
    double ed = tl_rel_l2_d(yg, yd, (int64_t)T * R), ec = tl_rel_l2(yg, yc, (int64_t)T * R);
    ok(rc == KLI_OK && ed < 1e-4 && ec < tol_for(dt, 1e-5), "tensor cores, %s, %d x %d, %d "
       "rows: vs float64 over the split operands %.2g, vs the CPU's float32 %.2g",
       k_dtype_name(dt), R, K, T, ed, ec);
    ops->release(gpu, (void *)m.w, bytes);
    free(w);
    free(x);
    free(xh);
    free(xl);
    free(wh);
    free(wl);
    free(wf);
    free(yc);
    free(yg);
    free(yd);
}

/* ==== 3. A whole MLA layer =================================================================== */

/* n_seq sequences of len[q] rows after this pass, T_seq new rows each. */
static void
test_mla_layer(const char *what, enum k_dtype dt, int D, int H, int L, int nope, int rope,
               int dv, int n_seq, const int64_t *len, int T_seq)
{
    const int C = L + rope, dqk = nope + rope;
    const int64_t T = (int64_t)n_seq * T_seq;
    struct kli_model m;
    struct k_mla_w w;
    void *bq, *bkv, *bo;
    int64_t nmax = 1, pos[8];

    memset(&m, 0, sizeof(m));
    m.cfg.d_model = D;
    m.cfg.mla.n_heads = H;
    m.cfg.mla.kv_lora_rank = L;
    m.cfg.mla.qk_nope_dim = nope;
    m.cfg.mla.qk_rope_dim = rope;
    m.cfg.mla.v_head_dim = dv;
    memset(&w, 0, sizeof(w));
    make_mat(dt, (int64_t)H * dqk, D, &w.q_proj, &bq);
    make_mat(dt, C, D, &w.kv_a, &bkv);
    make_mat(dt, D, (int64_t)H * dv, &w.o_proj, &bo);
    w.kv_a_norm = rand_floats(L, 0.5f, 1.0f);
    w.w_uk_t = rand_floats((int64_t)H * L * nope, 1.0f / sqrtf((float)nope), 0.0f);
    w.w_uv = rand_floats((int64_t)H * dv * L, 1.0f / sqrtf((float)L), 0.0f);

    /* the device copy of the weights */
    struct gpu_mla_w dw = {
        {dev_copy(bq, dtype_nbytes(dt, (uint64_t)H * dqk * D)), dt, H * dqk, D},
        {dev_copy(bkv, dtype_nbytes(dt, (uint64_t)C * D)), dt, C, D},
        {dev_copy(bo, dtype_nbytes(dt, (uint64_t)D * H * dv)), dt, D, H * dv},
        dev_copy(w.kv_a_norm, (uint64_t)L * 4),
        dev_copy(w.w_uk_t, (uint64_t)H * L * nope * 4),
        dev_copy(w.w_uv, (uint64_t)H * dv * L * 4),
    };
    struct kli_err err = {0};
    ok(ops->mla_layer_check(gpu, &dw, D, H, nope, rope, dv, &err) == KLI_OK,
       "%s: shape accepted %s", what, err.msg);

    /* caches: the rows before this pass random, on the host and the device */
    float *hc[8], *dc[8];
    for (int q = 0; q < n_seq; q++) {
        pos[q] = len[q] - T_seq;
        hc[q] = rand_floats(len[q] * C, 1.0f, 0.0f);
        for (int64_t i = pos[q] * C; i < len[q] * C; i++)
            hc[q][i] = NAN;   /* poison: the layer writes these */
        dc[q] = dev_copy(hc[q], (uint64_t)len[q] * C * 4);
        nmax = len[q] > nmax ? len[q] : nmax;
    }
    float *x = rand_floats(T * D, 1.0f, 0.0f);
    float *out_c = tl_malloc((size_t)T * D * 4), *out_g = tl_malloc((size_t)T * D * 4);
    float *rows = tl_malloc((size_t)T * C * 4);

    /* the CPU twin */
    struct mla_scratch sc;
    memset(&sc, 0, sizeof(sc));
    sc.q = tl_malloc((size_t)T * H * dqk * 4);
    sc.ckv = tl_malloc((size_t)T * C * 4);
    sc.o = tl_malloc((size_t)T * H * dv * 4);
    sc.qfull = tl_malloc((size_t)T * H * C * 4);
    sc.lat = tl_malloc((size_t)T * H * L * 4);
    sc.work_stride = mla_work_floats(&m.cfg, nmax);
    sc.work_n = nmax;
    sc.work = tl_malloc((size_t)(sc.work_stride * 2 + (int64_t)H * nmax) * 4);
    mla_forward(&m, &w, hc, pos, n_seq, &sc, x, T_seq, out_c);

    const float *cptr[64];
    int64_t nrow[64];
    for (int64_t t = 0; t < T; t++) {
        cptr[t] = dc[t / T_seq];
        nrow[t] = pos[t / T_seq] + t % T_seq + 1;
    }
    struct gpu_mla_layer_job j = {
        T, D, H, L, rope, nope, dv, 1.0f / sqrtf((float)dqk), 1e-6f, &dw,
        (float *const *)cptr, nrow, x, out_g, rows,
    };
    int rc = ops->mla_layer(queue, &j, &err);
    if (rc != KLI_OK)
        diag("%s: %s", what, err.msg);
    /* the new rows: returned, and in the device caches, equal to the CPU's */
    double er = 0.0, ed = 0.0;
    for (int64_t t = 0; rc == KLI_OK && t < T; t++) {
        int q = (int)(t / T_seq);
        const float *ref = hc[q] + (pos[q] + t % T_seq) * C;
        float *back = tl_malloc((size_t)C * 4);
        er = fmax(er, tl_rel_l2(rows + t * C, ref, C));
        if (dev_read(back, dc[q] + (pos[q] + t % T_seq) * C, (uint64_t)C * 4) == 0)
            ed = fmax(ed, tl_rel_l2(back, rows + t * C, C));
        else
            ed = INFINITY;
        free(back);
    }
    double eo = tl_rel_l2(out_g, out_c, T * D);
    ok(rc == KLI_OK && eo < tol_for(dt, 1e-5) && er < tol_for(dt, 1e-6) && ed == 0.0,
       "%s: GPU layer vs CPU twin %.2g, new rows %.2g, device rows = returned rows (%.2g)",
       what, eo, er, ed);

    for (int q = 0; q < n_seq; q++) {
        ops->release(gpu, dc[q], (uint64_t)len[q] * C * 4);
        free(hc[q]);
    }
    ops->release(gpu, (void *)dw.q_proj.w, dtype_nbytes(dt, (uint64_t)H * dqk * D));
    ops->release(gpu, (void *)dw.kv_a.w, dtype_nbytes(dt, (uint64_t)C * D));
    ops->release(gpu, (void *)dw.o_proj.w, dtype_nbytes(dt, (uint64_t)D * H * dv));
    ops->release(gpu, (void *)dw.kv_norm, (uint64_t)L * 4);
    ops->release(gpu, (void *)dw.w_uk_t, (uint64_t)H * L * nope * 4);
    ops->release(gpu, (void *)dw.w_uv, (uint64_t)H * dv * L * 4);
    free(bq);
    free(bkv);
    free(bo);
    free(w.kv_a_norm);
    free(w.w_uk_t);
    free(w.w_uv);
    free(x);
    free(out_c);
    free(out_g);
    free(rows);
    free(sc.q);
    free(sc.ckv);
    free(sc.o);
    free(sc.qfull);
    free(sc.lat);
    free(sc.work);
}

/* ==== 3b. A whole KDA layer ================================================================= */

/* n_seq sequences of T_seq rows from random states: GPU (the recurrence) against kda_forward
 * (the recurrence for one row, the chunked form for more): output and advanced states. */
static void
test_kda_layer(const char *what, enum k_dtype dt, int D, int H, int K, int rf, int rg,
               int n_seq, int T_seq)
{
    const int HK = H * K, W = 4;
    const int64_t T = (int64_t)n_seq * T_seq;
    struct kli_model m;
    struct k_kda_w w;
    void *buf[9];
    struct tensor *mt[9] = {&w.q_proj, &w.k_proj, &w.v_proj, &w.f_a, &w.b_proj, &w.g_a,
                                &w.f_b, &w.g_b, &w.o_proj};
    const int64_t rows[9] = {HK, HK, HK, rf, H, rg, HK, HK, D};
    const int64_t cols[9] = {D, D, D, D, D, D, rf, rg, HK};

    memset(&m, 0, sizeof(m));
    m.cfg.d_model = D;
    m.cfg.norm_eps = 1e-5f;
    m.cfg.kda.n_heads = H;
    m.cfg.kda.head_dim = K;
    m.cfg.kda.conv_size = W;
    memset(&w, 0, sizeof(w));
    for (int k = 0; k < 9; k++)
        make_mat(dt, rows[k], cols[k], mt[k], &buf[k]);
    for (int p = 0; p < 3; p++)
        w.conv[p] = rand_floats((int64_t)HK * W, 0.5f, 0.0f);
    w.a_neg = rand_floats(H, 0.5f, -1.0f);
    w.dt_bias = rand_floats(HK, 1.0f, 0.0f);
    w.o_norm = rand_floats(K, 0.3f, 1.0f);

    struct gpu_kda_w dw;
    struct gpu_mat *dm[9] = {&dw.q, &dw.k, &dw.v, &dw.f_a, &dw.b, &dw.g_a, &dw.f_b, &dw.g_b,
                                 &dw.o};
    for (int k = 0; k < 9; k++) {
        dm[k]->w = dev_copy(buf[k], dtype_nbytes(dt, (uint64_t)rows[k] * cols[k]));
        dm[k]->dtype = dt;
        dm[k]->rows = (int32_t)rows[k];
        dm[k]->cols = (int32_t)cols[k];
    }
    float *conv_all = tl_malloc((size_t)3 * HK * W * 4);
    for (int p = 0; p < 3; p++)
        memcpy(conv_all + (size_t)p * HK * W, w.conv[p], (size_t)HK * W * 4);
    dw.conv = dev_copy(conv_all, (uint64_t)3 * HK * W * 4);
    dw.a_neg = dev_copy(w.a_neg, (uint64_t)H * 4);
    dw.dt_bias = dev_copy(w.dt_bias, (uint64_t)HK * 4);
    dw.o_norm = dev_copy(w.o_norm, (uint64_t)K * 4);
    struct kli_err err = {0};
    ok(ops->kda_check(gpu, &dw, D, H, K, W, &err) == KLI_OK, "%s: shape accepted %s", what,
       err.msg);

    /* states: random, on both sides */
    struct kda_state st[4], *stp[4];
    float *dS[4], *dC[4];
    const int64_t ns = (int64_t)H * K * K, nc = 3 * (int64_t)HK * (W - 1);
    for (int q = 0; q < n_seq; q++) {
        st[q].S = rand_floats(ns, 0.2f, 0.0f);
        st[q].conv = rand_floats(nc, 1.0f, 0.0f);
        stp[q] = &st[q];
        dS[q] = dev_copy(st[q].S, (uint64_t)ns * 4);
        dC[q] = dev_copy(st[q].conv, (uint64_t)nc * 4);
    }
    float *x = rand_floats(T * D, 1.0f, 0.0f);
    float *out_c = tl_malloc((size_t)T * D * 4), *out_g = tl_malloc((size_t)T * D * 4);
    struct kda_scratch sc;
    for (int p = 0; p < 3; p++) {
        sc.raw[p] = tl_malloc((size_t)T * HK * 4);
        sc.qkv[p] = tl_malloc((size_t)T * HK * 4);
    }
    sc.g = tl_malloc((size_t)T * HK * 4);
    sc.beta = tl_malloc((size_t)T * H * 4);
    sc.low = tl_malloc((size_t)T * (rf + rg) * 4);
    sc.gate = tl_malloc((size_t)T * HK * 4);
    sc.o = tl_malloc((size_t)T * HK * 4);
    sc.chunk = tl_malloc((size_t)threads_count() * kda_chunk_floats(K, K) * 4);

    kda_forward(&m, &w, stp, n_seq, &sc, x, T_seq, out_c);
    struct gpu_kda_job j = {n_seq, T_seq, D, H, K, W, 1e-5f, &dw, dS, dC, x, out_g};
    int rc = ops->kda_layer(queue, &j, &err);
    if (rc != KLI_OK)
        diag("%s: %s", what, err.msg);
    double es = 0.0, ec = 0.0;
    float *bs = tl_malloc((size_t)ns * 4), *bc = tl_malloc((size_t)nc * 4);
    for (int q = 0; rc == KLI_OK && q < n_seq; q++) {
        if (dev_read(bs, dS[q], (uint64_t)ns * 4) != 0 ||
            dev_read(bc, dC[q], (uint64_t)nc * 4) != 0) {
            es = INFINITY;
            break;
        }
        es = fmax(es, tl_rel_l2(bs, st[q].S, ns));
        ec = fmax(ec, tl_rel_l2(bc, st[q].conv, nc));
    }
    double eo = tl_rel_l2(out_g, out_c, T * D);
    ok(rc == KLI_OK && eo < tol_for(dt, 1e-5) && es < tol_for(dt, 1e-5) &&
       ec < tol_for(dt, 1e-6), "%s: GPU layer vs CPU twin %.2g, states %.2g, conv states (raw "
       "projections) %.2g", what, eo, es, ec);

    for (int k = 0; k < 9; k++) {
        ops->release(gpu, (void *)dm[k]->w, dtype_nbytes(dt, (uint64_t)rows[k] * cols[k]));
        free(buf[k]);
    }
    ops->release(gpu, (void *)dw.conv, (uint64_t)3 * HK * W * 4);
    ops->release(gpu, (void *)dw.a_neg, (uint64_t)H * 4);
    ops->release(gpu, (void *)dw.dt_bias, (uint64_t)HK * 4);
    ops->release(gpu, (void *)dw.o_norm, (uint64_t)K * 4);
    for (int q = 0; q < n_seq; q++) {
        ops->release(gpu, dS[q], (uint64_t)ns * 4);
        ops->release(gpu, dC[q], (uint64_t)nc * 4);
        free(st[q].S);
        free(st[q].conv);
    }
    for (int p = 0; p < 3; p++) {
        free(w.conv[p]);
        free(sc.raw[p]);
        free(sc.qkv[p]);
    }
    free(w.a_neg);
    free(w.dt_bias);
    free(w.o_norm);
    free(conv_all);
    free(x);
    free(out_c);
    free(out_g);
    free(sc.g);
    free(sc.beta);
    free(sc.low);
    free(sc.gate);
    free(sc.o);
    free(sc.chunk);
    free(bs);
    free(bc);
}

/* ==== 4. The golden fixture end to end ======================================================= */

static char dir[4096];
static int32_t V, n_prompt, n_decode;
static kli_token tokens[512];
static float *ref_prefill, *ref_decode;

static void
load_golden(void)
{
    cJSON *root = tl_load_json(dir, "golden.json");
    const cJSON *a, *it;

    n_prompt = n_decode = 0;
    a = cJSON_GetObjectItemCaseSensitive(root, "prompt");
    cJSON_ArrayForEach(it, a) {
        if (n_prompt < 400)
            tokens[n_prompt++] = (kli_token)it->valueint;
    }
    a = cJSON_GetObjectItemCaseSensitive(root, "decode_tokens");
    cJSON_ArrayForEach(it, a) {
        if (n_prompt + n_decode < 512)
            tokens[n_prompt + n_decode++] = (kli_token)it->valueint;
    }
    cJSON_Delete(root);
    if (n_prompt == 0 || n_decode == 0) {
        printf("Bail out! %s/golden.json: no prompt or decode tokens\n", dir);
        exit(1);
    }
}

static struct kli_model *
open_tiny(int mode, int32_t experts, uint64_t mem)
{
    struct kli_model_options o;
    struct kli_model *m = NULL;
    struct kli_err err = {0};

    kli_model_options_init(&o);
    o.n_threads = 2;
    o.gpu = mode;
    o.gpu_experts = experts;
    o.gpu_mem = mem;
    if (kli_model_open(&m, dir, &o, &err) != KLI_OK) {
        printf("Bail out! %s: %s\n", dir, err.msg);
        exit(1);
    }
    return m;
}

/* Prompt in calls of batch_max tokens, then the decode tokens one at a time: all logits. */
static int
run_all(struct kli_model *m, int32_t batch_max, float *all)
{
    struct kli_session_options so;
    struct kli_session *s = NULL;
    struct kli_err err = {0};
    int good;

    kli_session_options_init(&so);
    so.batch_max = batch_max;
    good = kli_session_create(&s, m, &so, &err) == KLI_OK &&
           kli_session_eval(s, tokens, n_prompt, all, &err) == KLI_OK;
    for (int32_t i = 0; good && i < n_decode; i++)
        good = kli_session_eval(s, tokens + n_prompt + i, 1,
                                all + (int64_t)(n_prompt + i) * V, &err) == KLI_OK;
    if (!good)
        diag("eval: %s", err.msg);
    kli_session_free(s);
    return good;
}

static void
check_golden(const char *what, struct kli_model *m, int32_t batch_max, const float *cpu)
{
    int64_t N = n_prompt + n_decode;
    float *all = tl_malloc((size_t)N * V * sizeof(float));
    int good = run_all(m, batch_max, all);
    double ep = tl_rel_l2(all, ref_prefill, (int64_t)n_prompt * V);
    double ed = tl_rel_l2(all + (int64_t)n_prompt * V, ref_decode, (int64_t)n_decode * V);
    double ec = cpu != NULL ? tl_rel_l2(all, cpu, N * V) : 0.0;

    ok(good && ep < tol_for(-1, 1e-4) && ed < tol_for(-1, 1e-4) && ec < tol_for(-1, 1e-5),
       "%s: prefill %.2g, decode %.2g from the golden logits; %.2g from the CPU path", what,
       ep, ed, ec);
    free(all);
}

/* The CPU-only tiny model (*mc), the golden tokens and logits; @return the CPU path's
 * logits of them all. */
static float *
golden_setup(struct kli_model **mc)
{
    *mc = open_tiny(KLI_GPU_OFF, 0, 0);
    V = kli_model_n_vocab(*mc);
    load_golden();
    ref_prefill = tl_load_f32(dir, "ref64_prefill.f32", (size_t)n_prompt * (size_t)V);
    ref_decode = tl_load_f32(dir, "ref64_decode.f32", (size_t)n_decode * (size_t)V);
    float *cpu = tl_malloc((size_t)(n_prompt + n_decode) * V * sizeof(float));
    ok(run_all(*mc, 0, cpu), "the CPU path runs");
    return cpu;
}

static void
test_golden(void)
{
    struct kli_model *mc;
    float *cpu = golden_setup(&mc);
    struct kli_model *m = open_tiny(KLI_GPU_ON, -1, 0);
    const char *st = kli_model_gpu_status(m);
    diag("%s", st);
    ok(strncmp(st, "GPU", 3) == 0 && strstr(st, "MLA layers") != NULL &&
       strstr(st, "8 of 8") != NULL, "--gpu on: MLA layers and all 8 experts on the GPU");
    check_golden("gpu on, all experts", m, 0, cpu);
    check_golden("gpu on, all experts, batch_max 7", m, 7, cpu);

    /* Two sessions in one batched step: each row against its own mirror. */
    {
        struct kli_session *a = NULL, *b = NULL, *c = NULL;
        struct kli_err err = {0};
        float *la = tl_malloc((size_t)V * sizeof(float));
        float *lb = tl_malloc((size_t)V * sizeof(float));
        int good = kli_session_create(&a, m, NULL, &err) == KLI_OK &&
                   kli_session_create(&b, m, NULL, &err) == KLI_OK &&
                   kli_session_create(&c, mc, NULL, &err) == KLI_OK &&
                   kli_session_eval(a, tokens, n_prompt, NULL, &err) == KLI_OK &&
                   kli_session_eval(b, tokens, 40, NULL, &err) == KLI_OK;
        struct kli_session *ab[2] = {a, b};
        kli_token next[2] = {tokens[n_prompt], tokens[40]};
        for (int i = 0; good && i < 4; i++) {
            good = kli_session_eval_batch(ab, next, 2, &err) == KLI_OK;
            next[0] = (kli_token)((next[0] + 7) % V);
            next[1] = (kli_token)((next[1] + 3) % V);
        }
        /* the same history on the CPU for b */
        good = good && kli_session_eval(c, tokens, 40, NULL, &err) == KLI_OK;
        kli_token nb = tokens[40];
        for (int i = 0; good && i < 4; i++) {
            good = kli_session_eval(c, &nb, 1, NULL, &err) == KLI_OK;
            nb = (kli_token)((nb + 3) % V);
        }
        if (good) {
            memcpy(lb, kli_session_logits(b), (size_t)V * sizeof(float));
            memcpy(la, kli_session_logits(c), (size_t)V * sizeof(float));
        }
        double e = good ? tl_rel_l2(lb, la, V) : INFINITY;
        ok(good && e < 1e-5, "batched step over two GPU sessions: %.2g from the CPU", e);

        /* a's history replaced by c's (CPU session of the other model: copy through b) */
        good = good && kli_session_copy(b, a, &err) == KLI_OK;
        kli_session_reset(a);
        good = good && kli_session_eval(a, tokens + 10, 60, NULL, &err) == KLI_OK;
        good = good && kli_session_copy(a, b, &err) == KLI_OK;   /* back to the long one */
        kli_token t1 = tokens[3];
        good = good && kli_session_eval(a, &t1, 1, NULL, &err) == KLI_OK &&
               kli_session_eval(b, &t1, 1, NULL, &err) == KLI_OK;
        e = good ? tl_rel_l2(kli_session_logits(a), kli_session_logits(b), V) : INFINITY;
        ok(good && e < 1e-5, "after kli_session_copy the device rows follow the new history: "
           "%.2g", e);
        if (!good)
            diag("%s", err.msg);
        kli_session_free(a);
        kli_session_free(b);
        kli_session_free(c);
        free(la);
        free(lb);
    }
    /* A bf16 latent cache: the device mirrors it as bf16 and attends over it; the session
     * follows a bf16 session of the CPU-only model (whose attention is the CPU twin) within
     * 1e-4, and the status does not send it to the CPU. */
    {
        setenv("KLI_CUDA_NARROW_CACHE", "1", 1);   /* experimental, off by default */
        struct kli_session *g = tl_session(m, 0, 0, KLI_CACHE_BF16);
        struct kli_session *c = tl_session(mc, 0, 0, KLI_CACHE_BF16);
        struct kli_err err = {0};
        int good = kli_session_eval(g, tokens, n_prompt, NULL, &err) == KLI_OK &&
                   kli_session_eval(c, tokens, n_prompt, NULL, &err) == KLI_OK;
        double e = good ? tl_rel_l2(kli_session_logits(g), kli_session_logits(c), V) : INFINITY;
        ok(good && e < 1e-4 &&
           strstr(kli_model_gpu_status(m), "bf16 latent cache compute on the CPU") == NULL,
           "a bf16 cache attends on the GPU, within %.2g of the CPU: %s", e,
           kli_model_gpu_status(m));
        kli_session_free(g);
        kli_session_free(c);
    }
    /* The whole model fits: KDA states lead on the device between passes; a snapshot pulls
     * them, a restore pushes them back. */
    ok(strstr(st, "whole model") != NULL, "the tiny model fits: the whole model on the GPU");
    {
        struct kli_session *a = NULL, *b = NULL, *c = NULL;
        struct kli_err err = {0};
        kli_token more[3] = {tokens[1], tokens[2], tokens[5]};
        float *la = tl_malloc((size_t)V * sizeof(float));
        float *lb = tl_malloc((size_t)V * sizeof(float));
        float *lc = tl_malloc((size_t)V * sizeof(float));
        void *snap = NULL;
        int64_t n = -1;
        int good = kli_session_create(&a, m, NULL, &err) == KLI_OK &&
                   kli_session_create(&b, m, NULL, &err) == KLI_OK &&
                   kli_session_create(&c, mc, NULL, &err) == KLI_OK &&
                   kli_session_eval(a, tokens, n_prompt, NULL, &err) == KLI_OK &&
                   (n = kli_session_snapshot(a, NULL, NULL, 0, &err)) > 0;
        if (good) {
            snap = tl_malloc((size_t)n);
            good = kli_session_snapshot(a, NULL, snap, n, &err) == n;
        }
        for (int i = 0; good && i < 3; i++)
            good = kli_session_eval(a, more + i, 1, la, &err) == KLI_OK;
        good = good && kli_session_restore(b, NULL, snap, (size_t)n, &err) == KLI_OK &&
               kli_session_restore(c, NULL, snap, (size_t)n, &err) == KLI_OK;
        for (int i = 0; good && i < 3; i++)
            good = kli_session_eval(b, more + i, 1, lb, &err) == KLI_OK &&
                   kli_session_eval(c, more + i, 1, lc, &err) == KLI_OK;
        if (!good)
            diag("%s", err.msg);
        ok(good && memcmp(la, lb, (size_t)V * sizeof(float)) == 0,
           "whole model: a snapshot taken while the states are on the GPU, restored into "
           "another GPU session, continues bit for bit");
        double e = good ? tl_rel_l2(lc, la, V) : INFINITY;
        ok(good && e < 1e-5, "whole model: the same snapshot continued on the CPU: %.2g", e);
        kli_session_free(a);
        kli_session_free(b);
        kli_session_free(c);
        free(la);
        free(lb);
        free(lc);
        free(snap);
    }
    kli_model_close(m);

    m = open_tiny(KLI_GPU_ON, 3, 0);
    diag("%s", kli_model_gpu_status(m));
    ok(strstr(kli_model_gpu_status(m), "3 of 8") != NULL, "--gpu-experts 3: 3 of 8 resident");
    check_golden("gpu on, 3 hot experts per layer", m, 0, cpu);
    check_golden("gpu on, 3 hot experts per layer, batch_max 7", m, 7, cpu);
    {
        /* the counters, and the mover: with 3 of 8 resident and a re-choice every 8 routed
         * slots, the fixture's routing moves experts in the background */
        struct kli_gpu_stats gs;
        int have = kli_model_gpu_stats(m, &gs) == 0;
        diag("routed %llu, on the GPU %llu, swaps %llu, %llu bytes used",
             (unsigned long long)gs.routed, (unsigned long long)gs.on_gpu,
             (unsigned long long)gs.swaps, (unsigned long long)gs.bytes_used);
        ok(have && gs.n_hot == 3 && gs.n_experts == 8 && gs.mla_layers == 1 &&
           gs.routed == (uint64_t)2 * 4 * 2 * (n_prompt + n_decode) && gs.on_gpu > 0 &&
           gs.on_gpu < gs.routed && gs.swaps > 0 && gs.bytes_used > 0,
           "gpu stats: %llu of %llu routed pairs on the GPU, %llu experts moved",
           (unsigned long long)gs.on_gpu, (unsigned long long)gs.routed,
           (unsigned long long)gs.swaps);
        kli_model_gpu_reset(m);
        ok(kli_model_gpu_stats(m, &gs) == 0 && gs.routed == 0 && gs.on_gpu == 0 &&
           gs.swaps == 0, "kli_model_gpu_reset zeroes the counters");
        ok(kli_model_gpu_stats(mc, &gs) == -1 && gs.routed == 0,
           "a model on the CPU has no GPU stats");
    }
    kli_model_close(m);

    m = open_tiny(KLI_GPU_ON, 0, 0);
    diag("%s", kli_model_gpu_status(m));
    check_golden("gpu on, MLA only", m, 0, cpu);
    kli_model_close(m);

    /* A budget too small for anything: CPU only with the reason, or an error with "on". */
    {
        struct kli_model_options o;
        struct kli_model *m2 = NULL;
        struct kli_err err = {0};
        kli_model_options_init(&o);
        o.gpu = KLI_GPU_ON;
        o.gpu_mem = 1 << 20;
        int rc = kli_model_open(&m2, dir, &o, &err);
        ok(rc != KLI_OK && strstr(err.msg, "memory") != NULL, "--gpu on with 1 MiB fails: %s",
           err.msg);
        m2 = open_tiny(KLI_GPU_AUTO, -1, 1 << 20);
        ok(strncmp(kli_model_gpu_status(m2), "CPU only: not enough GPU memory", 31) == 0,
           "--gpu auto with 1 MiB: %s", kli_model_gpu_status(m2));
        kli_model_close(m2);
    }
    free(cpu);
    kli_model_close(mc);
    free(ref_prefill);
    free(ref_decode);
}

/* 4c. The tiny model (bf16 weights) with every product on the tensor cores: the whole model,
 * then 3 hot experts per layer (the CPU computing the rest); 1e-4 of the golden logits and
 * gemm_tol of the CPU path's. */
static void
test_golden_gemm(void)
{
    struct kli_model *mc;
    float *cpu = golden_setup(&mc);
    const int32_t hot[2] = {-1, 3};

    for (int h = 0; h < 2; h++) {
        struct kli_model *m = open_tiny(KLI_GPU_ON, hot[h], 0);
        diag("%s", kli_model_gpu_status(m));
        check_golden(h == 0 ? "tensor cores, all experts" : "tensor cores, 3 hot experts", m,
                     0, cpu);
        check_golden(h == 0 ? "tensor cores, all experts, batch_max 7" :
                     "tensor cores, 3 hot experts, batch_max 7", m, 7, cpu);
        kli_model_close(m);
    }
    free(cpu);
    kli_model_close(mc);
    free(ref_prefill);
    free(ref_decode);
}

/* ==== 4b. The nano model at the K types ====================================================== */

/*
 * The trained nano model (hidden size 256: whole super-blocks) converted at open to the K
 * type `type`; rows that are not whole super-blocks take q8_0 (dtype_fit), so the experts'
 * down projections and KDA's f_b/g_b are q8_0 beside K-type gate, up and projections: mixed
 * dtypes in one FFN and one layer. Logits with --gpu on, first every expert resident (the
 * whole model on the device), then 2 of 6 hot (the CPU computing the rest at the same time,
 * the mover moving them), against the CPU path: prefill in one call, then decode a token at a
 * time. The weights decode bit for bit as on the CPU; the float32 sums differ in order only,
 * compounded over four layers: 1e-4 (a wrong decode is off by O(1)).
 */
static void
test_kmodel(const char *type)
{
    enum { N = 40 };
    char nano[4096];
    struct kli_model_options o;
    struct kli_model *mc = NULL;
    struct kli_err err = {0};
    kli_token ids[N];

    snprintf(nano, sizeof(nano), "%s/../../contrib/models/kimi-linear-nano", tl_data());
    kli_model_options_init(&o);
    o.n_threads = 2;
    o.weight_type = type;
    o.gpu = KLI_GPU_OFF;
    if (kli_model_open(&mc, nano, &o, &err) != KLI_OK) {
        ok(0, "nano at %s opens: %s", type, err.msg);
        return;
    }
    int32_t nv = kli_model_n_vocab(mc);
    for (int i = 0; i < N; i++)
        ids[i] = (kli_token)((i * 97 + 13) % nv);
    float *cp = tl_logits(mc, ids, N, 0, &err), *cd = tl_logits(mc, ids, N, 1, &err);
    const int32_t hot[2] = {-1, 2};
    const char *want[2] = {"6 of 6", "2 of 6"};
    for (int h = 0; h < 2; h++) {
        struct kli_model *m = NULL;
        o.gpu = KLI_GPU_ON;
        o.gpu_experts = hot[h];
        if (kli_model_open(&m, nano, &o, &err) != KLI_OK) {
            ok(0, "nano at %s, --gpu on: %s", type, err.msg);
            continue;
        }
        const char *st = kli_model_gpu_status(m);
        diag("%s", st);
        float *gp = tl_logits(m, ids, N, 0, &err), *gd = tl_logits(m, ids, N, 1, &err);
        if (gp == NULL || gd == NULL)
            diag("nano at %s: %s", type, err.msg);
        double ep = gp && cp ? tl_rel_l2(gp, cp, (int64_t)N * nv) : INFINITY;
        double ed = gd && cd ? tl_rel_l2(gd, cd, (int64_t)N * nv) : INFINITY;
        /* the K-type experts ran on the device: all of them, or some of them */
        struct kli_gpu_stats gs;
        memset(&gs, 0, sizeof(gs));
        int placed = strstr(st, want[h]) != NULL && strstr(st, "MLA layers") != NULL &&
                     (h == 1 || strstr(st, "whole model") != NULL) &&
                     kli_model_gpu_stats(m, &gs) == 0 && gs.on_gpu > 0 &&
                     (h == 0 ? gs.on_gpu == gs.routed : gs.on_gpu < gs.routed);
        ok(placed && ep < tol_for(-1, 1e-4) && ed < tol_for(-1, 1e-4), "nano at %s, %s: "
           "prefill %.2g, decode %.2g from the CPU path", type,
           h == 0 ? "the whole model on the GPU" : "2 of 6 experts hot", ep, ed);
        if (!placed)
            diag("routed %llu, on the GPU %llu", (unsigned long long)gs.routed,
                 (unsigned long long)gs.on_gpu);
        free(gp);
        free(gd);
        kli_model_close(m);
    }
    free(cp);
    free(cd);
    kli_model_close(mc);
}

/* ==== --bench-mm: the products at the released model's lm_head ============================== */

/* One decode row through the device's matmul, per block type, on random blocks of the
 * released model's lm_head shape (163840 x 2304): the best of 7 calls, each including the
 * copy of x in and of y (640 KiB) out, and the weight bytes over that time. */
static int
bench_mm(void)
{
    const int R = 163840, K = 2304;
    const enum k_dtype dts[] = {KLI_DT_Q8_0, KLI_DT_Q4, KLI_DT_Q2_K, KLI_DT_Q3_K, KLI_DT_Q4_K,
                                KLI_DT_Q5_K, KLI_DT_Q6_K};
    float *x = rand_floats(K, 1.0f, 0.0f), *y = tl_malloc((size_t)R * 4);

    printf("decode product y = W x, W %d x %d, through the backend's matmul (x in, y out)\n",
           R, K);
    printf("%-6s %10s %10s %10s\n", "type", "MiB", "best us", "GB/s");
    for (size_t i = 0; i < sizeof(dts) / sizeof(dts[0]); i++) {
        const int64_t nb = (int64_t)R * K / dtype_info(dts[i])->block;
        const uint64_t bytes = (uint64_t)nb * (uint64_t)dtype_info(dts[i])->block_bytes;
        uint8_t *w = rand_blocks(dts[i], nb);
        struct gpu_mat m = {dev_copy(w, bytes), (int32_t)dts[i], R, K};
        struct kli_err err = {0};
        double best = INFINITY;
        free(w);
        for (int r = 0; r < 8; r++) {   /* the first call warms up */
            double t0 = util_now_s();
            if (ops->matmul(queue, &m, x, 1, y, &err) != KLI_OK) {
                printf("%s: %s\n", k_dtype_name(dts[i]), err.msg);
                return 1;
            }
            double t = util_now_s() - t0;
            best = r > 0 && t < best ? t : best;
        }
        printf("%-6s %10.1f %10.1f %10.0f\n", k_dtype_name(dts[i]), (double)bytes / 1048576.0,
               best * 1e6, (double)bytes / best / 1e9);
        ops->release(gpu, (void *)m.w, bytes);
    }
    free(x);
    free(y);
    return 0;
}

/* ==== --bench: the attention step at the released model's shape ============================= */

static int
bench(void)
{
    const int H = 32, L = 512, C = 576, dqk = 192;
    const int64_t ns[] = {4096, 32768, 131072, 1048576};
    float scale = 1.0f / sqrtf((float)dqk);

    threads_set_count(0);
    printf("attention step, %d heads, latent %d + rope %d, %d CPU threads, %s\n", H, L,
           C - L, threads_count(), kli_simd_variant());
    printf("%5s %8s %12s %12s %9s %12s\n", "rows", "context", "CPU ms", "GPU ms", "speedup",
           "GPU GB/s");
    for (size_t k = 0; k < 3 * sizeof(ns) / sizeof(ns[0]); k++) {
        const enum k_dtype dts[3] = {KLI_DT_F32, KLI_DT_BF16, KLI_DT_Q8_0};
        enum k_dtype dt = dts[k % 3];
        int64_t n = ns[k / 3], rb = (int64_t)dtype_nbytes(dt, (uint64_t)C);
        float *cache = tl_malloc((size_t)n * C * sizeof(float));
        float *q = tl_malloc((size_t)H * C * sizeof(float)), *S = tl_malloc((size_t)H * n * 4);
        float *lc = tl_malloc((size_t)H * L * 4), *lg = tl_malloc((size_t)H * L * 4);
        for (int64_t i = 0; i < n * C; i++)
            cache[i] = frand();
        for (int64_t i = 0; i < H * C; i++)
            q[i] = frand();
        void *rows = cache;
        if (dt != KLI_DT_F32) {
            rows = tl_malloc((size_t)(n * rb));
            dtype_from_f32(dt, cache, rows, n * C);
            free(cache);
        }
        float *dc = dev_copy(rows, (uint64_t)(n * rb));
        const float *cp[1] = {dc};
        int64_t nr[1] = {n};
        struct gpu_mla_job j = {1, H, L, C, scale, cp, nr, q, lg, (int32_t)dt};
        struct kli_err err = {0};
        double tc = 1e30, tg = 1e30;
        for (int r = 0; r < 5; r++) {
            double t0 = util_now_s();
            cpu_attend(rows, dt, n, q, H, L, C, dqk, lc, S);
            double t1 = util_now_s();
            tc = t1 - t0 < tc ? t1 - t0 : tc;
        }
        for (int r = 0; r < 20; r++) {
            double t0 = util_now_s();
            if (ops->mla_attend(queue, &j, &err) != KLI_OK) {
                printf("GPU attention: %s\n", err.msg);
                return 1;
            }
            double t1 = util_now_s();
            tg = t1 - t0 < tg ? t1 - t0 : tg;
        }
        printf("%5s %8lld %12.3f %12.3f %8.1fx %12.0f   (rel L2 GPU vs CPU %.2g)\n",
               k_dtype_name(dt), (long long)n, tc * 1e3, tg * 1e3, tc / tg,
               (double)n * rb / tg / 1e9, tl_rel_l2(lg, lc, H * L));
        ops->release(gpu, dc, (uint64_t)(n * rb));
        free(rows);
        free(q);
        free(S);
        free(lc);
        free(lg);
    }
    return 0;
}

int
main(int argc, char **argv)
{
    struct gpu_info info;
    struct kli_err err = {0};
    int do_bench = argc > 1 && strcmp(argv[1], "--bench") == 0;
    int do_bench_mm = argc > 1 && strcmp(argv[1], "--bench-mm") == 0;

    /* The CPU twins in plain C: the SIMD kernels quantize the activations of Q8_0 and Q4
     * products to int8, an approximation of their own (about 1e-2 relative). */
    if (!do_bench && !do_bench_mm) {
        tap_init(argc, argv);
        setenv("KLI_SIMD", "generic", 1);
        gemm_force(0, 0.0);   /* the exact kernels, but in the gemm cases */
    }
    /* (-l lists the cases without a GPU: no case runs) */
    if (!tap_listing && (ops = backend_cuda()) == NULL)
        skip_all("built without CUDA");
    if (!tap_listing && ops->open(&gpu, 0, 0, &info, &err) != KLI_OK)
        skip_all(err.msg);
    if (!tap_listing && ops->queue_create(gpu, &queue, &err) != KLI_OK) {
        printf("Bail out! queue: %s\n", err.msg);
        return 1;
    }
    if (!do_bench && !do_bench_mm && !tap_listing)
        diag("%s, %d SMs, compute %d.%d, %.1f GiB free", info.name, info.n_sm, info.cc_major,
             info.cc_minor, (double)info.mem_free / 1073741824.0);
    if (do_bench || do_bench_mm) {
        int rc = do_bench ? bench() : bench_mm();
        ops->queue_free(queue);
        ops->close(gpu);
        return rc;
    }
    threads_set_count(2);

    /* 1. attention: tiny shape, decode and prefill rows, several sequences, real shape */
    if (tap_case("attention")) {
        int64_t l1[] = {1}, l2[] = {37}, l3[] = {1000}, l4[] = {5, 300, 77};
        int64_t l5[] = {4097}, l6[] = {513};
        ok(ops->mla_check(gpu, 2, 64, 80, &err) == KLI_OK, "tiny shape supported");
        const enum k_dtype f = KLI_DT_F32, b = KLI_DT_BF16, q8 = KLI_DT_Q8_0;
        test_attention("one cached row", f, 2, 64, 80, 1, l1, 1);
        test_attention("decode, 37 rows", f, 2, 64, 80, 1, l2, 1);
        test_attention("decode, 1000 rows", f, 2, 64, 80, 1, l3, 1);
        test_attention("prefill, 3 sequences x 5 rows", f, 2, 64, 80, 3, l4, 5);
        test_attention("odd heads (3)", f, 3, 64, 80, 1, l2, 1);
        /* the narrow mirrors (bf16: rows of 8-value groups; q8_0: of 32-value blocks) */
        test_attention("one cached row", b, 2, 64, 80, 1, l1, 1);
        test_attention("decode, 1000 rows", b, 2, 64, 80, 1, l3, 1);
        test_attention("prefill, 3 sequences x 5 rows", b, 3, 64, 80, 3, l4, 5);
        test_attention("decode, 1000 rows", q8, 2, 64, 128, 1, l3, 1);
        test_attention("prefill, 3 sequences x 5 rows", q8, 3, 64, 128, 3, l4, 5);
        ok(ops->mla_check(gpu, 32, 512, 576, &err) == KLI_OK, "released shape supported");
        test_attention("released shape, decode, 4097 rows", f, 32, 512, 576, 1, l5, 1);
        test_attention("released shape, prefill 9 rows at 513", f, 32, 512, 576, 1, l6, 9);
        test_attention("released shape, decode, 4097 rows", b, 32, 512, 576, 1, l5, 1);
        test_attention("released shape, decode, 4097 rows", q8, 32, 512, 576, 1, l5, 1);
        struct kli_err e3 = {0};
        const float *c1[1] = {NULL};
        int64_t n1[1] = {1};
        float q1[2 * 88], lat1[2 * 64];
        struct gpu_mla_job jq = {1, 2, 64, 88, 0.1f, c1, n1, q1, lat1, (int32_t)q8};
        ok(ops->mla_attend(queue, &jq, &e3) == KLI_E_UNSUPPORTED && e3.msg[0] != '\0',
           "q8_0 rows of 88 values (no whole blocks) are refused: %s", e3.msg);
        struct kli_err e2 = {0};
        ok(ops->mla_check(gpu, 64, 1024, 1088, &e2) != KLI_OK && e2.msg[0] != '\0',
           "an unsupported shape is refused with a reason: %s", e2.msg);
    }

    /* 2. experts in every dtype (the K types' rows whole super-blocks; down may differ) */
    const enum k_dtype dts[] = {KLI_DT_F32, KLI_DT_F16, KLI_DT_BF16, KLI_DT_Q8_0, KLI_DT_Q4};
    const enum k_dtype kts[] = {KLI_DT_Q2_K, KLI_DT_Q3_K, KLI_DT_Q4_K, KLI_DT_Q5_K,
                                KLI_DT_Q6_K};
    if (tap_case("experts")) {
        for (size_t i = 0; i < sizeof(dts) / sizeof(dts[0]); i++)
            test_experts(dts[i], dts[i], 96);
        for (size_t i = 0; i < sizeof(kts) / sizeof(kts[0]); i++)
            test_experts(kts[i], kts[i], 256);
        test_experts(KLI_DT_Q4_K, KLI_DT_Q8_0, 96);
        test_experts(KLI_DT_Q4_K, KLI_DT_Q6_K, 512);
    }
    /* 2b. the K types' products: decode, a partial pass of 4 rows, more than one block of
     * 32 rows; the released model's width (9 super-blocks) */
    if (tap_case("kmatmul")) {
        for (size_t i = 0; i < sizeof(kts) / sizeof(kts[0]); i++) {
            test_kmatmul(kts[i], 37, 2304, 1);
            test_kmatmul(kts[i], 37, 2304, 6);
            test_kmatmul(kts[i], 19, 512, 40);
        }
    }

    /* 2c. the tensor-core products (cuda/gemm.cu), forced at any row count: every dtype at
     * the released width, a decode row, the bf16 widths of the MLA heads; a q8_0 matrix of
     * two tiles of decoded weights (64 MiB each: 14528 rows of 2304) */
#ifdef HAVE_CUBLAS
    const int gemm_in = 1;
#else
    const int gemm_in = 0;
#endif
    if (tap_case("gemm") && gemm_in) {
        gemm_force(1, 1e-4);
        for (size_t i = 0; i < sizeof(dts) / sizeof(dts[0]); i++)
            test_gemm(dts[i], 300, 2304, 33);
        for (size_t i = 0; i < sizeof(kts) / sizeof(kts[0]); i++)
            test_gemm(kts[i], 300, 2304, 33);
        test_gemm(KLI_DT_BF16, 37, 512, 1);
        test_gemm(KLI_DT_Q8_0, 14600, 2304, 3);
        /* KLI_CUDA_GEMM_SPLIT=0: one rounding each, 1e-3 from float32 (1e-2 allowed) */
        setenv("KLI_CUDA_GEMM_SPLIT", "0", 1);
        gemm_one = 1;
        gemm_force(1, 1e-2);
        test_gemm(KLI_DT_BF16, 300, 2304, 33);
        test_gemm(KLI_DT_Q4_K, 300, 2304, 33);
        test_gemm(KLI_DT_F32, 300, 2304, 33);
        unsetenv("KLI_CUDA_GEMM_SPLIT");
        gemm_one = 0;
        gemm_force(0, 0.0);
    }
    /* the experts through it: every item (KLI_CUDA_GEMM_MIN=1), then the shared expert's 6
     * rows through it beside the routed experts' 3 on the kernels (4) */
    if (tap_case("gemm_experts") && gemm_in) {
        gemm_force(1, 1e-4);
        for (size_t i = 0; i < sizeof(dts) / sizeof(dts[0]); i++)
            test_experts(dts[i], dts[i], 96);
        for (size_t i = 0; i < sizeof(kts) / sizeof(kts[0]); i++)
            test_experts(kts[i], kts[i], 256);
        test_experts(KLI_DT_Q4_K, KLI_DT_Q8_0, 96);
        gemm_force(4, 1e-4);
        test_experts(KLI_DT_BF16, KLI_DT_BF16, 96);
        test_experts(KLI_DT_F32, KLI_DT_F32, 96);
        test_experts(KLI_DT_Q4_K, KLI_DT_Q6_K, 512);
        gemm_force(0, 0.0);
    }

    /* 3. a whole MLA layer, then the budget */
    if (tap_case("mla_layer")) {
        int64_t one[] = {1}, dec[] = {300}, pre[] = {7, 40}, big[] = {1000};
        for (size_t i = 0; i < sizeof(dts) / sizeof(dts[0]); i++) {
            char what[96];
            snprintf(what, sizeof(what), "MLA layer %s, decode at 300", k_dtype_name(dts[i]));
            test_mla_layer(what, dts[i], 256, 4, 64, 32, 16, 32, 1, dec, 1);
        }
        for (size_t i = 0; i < sizeof(kts) / sizeof(kts[0]); i++) {   /* o_proj 256 wide */
            char what[96];
            snprintf(what, sizeof(what), "MLA layer %s, decode at 300", k_dtype_name(kts[i]));
            test_mla_layer(what, kts[i], 256, 8, 64, 32, 16, 32, 1, dec, 1);
        }
        test_mla_layer("MLA layer q4_k, prefill 2 sequences x 7 rows", KLI_DT_Q4_K, 256, 8, 64,
                       32, 16, 32, 2, pre, 7);
        test_mla_layer("MLA layer bf16, first token", KLI_DT_BF16, 128, 2, 64, 32, 16, 32, 1, one,
                       1);
        test_mla_layer("MLA layer q8_0, prefill 2 sequences x 7 rows", KLI_DT_Q8_0, 256, 3, 64,
                       32, 16, 32, 2, pre, 7);
        test_mla_layer("MLA layer bf16, released shape, decode at 1000", KLI_DT_BF16, 2304, 32,
                       512, 128, 64, 128, 1, big, 1);
        test_mla_layer("MLA layer q8_0, released shape, prefill 40 rows", KLI_DT_Q8_0, 2304, 32,
                       512, 128, 64, 128, 1, big, 40);
        struct gpu_mla_w bad = {{(void *)1, KLI_DT_Q8_0, 96, 100}, {(void *)1, KLI_DT_Q8_0,
                                    80, 128}, {(void *)1, KLI_DT_Q8_0, 128, 64}, (float *)1,
                                    (float *)1, (float *)1};
        struct kli_err e4 = {0};
        ok(ops->mla_layer_check(gpu, &bad, 128, 2, 32, 16, 32, &e4) == KLI_E_UNSUPPORTED &&
           e4.msg[0] != '\0', "a projection of the wrong shape is refused: %s", e4.msg);
        /* the super-block types: accepted in rows of whole super-blocks, declined with a
         * reason in rows of 64 (o_proj), so that such a layer stays on the CPU */
        struct gpu_mla_w kq = {{(void *)1, KLI_DT_Q4_K, 96, 256}, {(void *)1, KLI_DT_Q4_K,
                                   80, 256}, {(void *)1, KLI_DT_Q6_K, 256, 256}, (float *)1,
                                   (float *)1, (float *)1};
        struct kli_err e5 = {0};
        ok(ops->mla_layer_check(gpu, &kq, 256, 2, 32, 16, 128, &e5) == KLI_OK,
           "Q4_K and Q6_K projections of 256-wide rows are accepted %s", e5.msg);
        kq.o_proj.cols = 64;
        ok(ops->mla_layer_check(gpu, &kq, 256, 2, 32, 16, 32, &e5) == KLI_E_UNSUPPORTED &&
           strstr(e5.msg, "256 for the K types") != NULL,
           "a Q6_K o_proj of 64-wide rows is declined: %s", e5.msg);
    }
    /* 3b. a whole KDA layer */
    if (tap_case("kda_layer")) {
        test_kda_layer("KDA layer bf16, decode, 2 sequences", KLI_DT_BF16, 128, 2, 32, 32, 32,
                       2, 1);
        test_kda_layer("KDA layer q8_0, decode", KLI_DT_Q8_0, 256, 4, 64, 64, 32, 1, 1);
        test_kda_layer("KDA layer f32, prefill 3 rows (within the conv reach)", KLI_DT_F32,
                       128, 2, 32, 32, 32, 1, 3);
        test_kda_layer("KDA layer bf16, prefill 2 sequences x 70 rows", KLI_DT_BF16, 128, 2,
                       32, 32, 32, 2, 70);
        test_kda_layer("KDA layer q4, released head shape, prefill 9 rows", KLI_DT_Q4, 256, 4,
                       128, 64, 64, 1, 9);
        for (size_t i = 0; i < sizeof(kts) / sizeof(kts[0]); i++) {   /* ranks 256 */
            char what[96];
            snprintf(what, sizeof(what), "KDA layer %s, decode", k_dtype_name(kts[i]));
            test_kda_layer(what, kts[i], 256, 4, 64, 256, 256, 1, 1);
        }
        test_kda_layer("KDA layer q3_k, prefill 2 sequences x 9 rows", KLI_DT_Q3_K, 256, 2, 128,
                       256, 256, 2, 9);
    }
    /* 3c. whole layers with the projections on the tensor cores (F32: the absorbed products,
     * batched over the heads, in float32) */
    if (tap_case("gemm_layers") && gemm_in) {
        int64_t pre[] = {7, 40}, big[] = {1000};
        gemm_force(1, 1e-4);
        test_mla_layer("tensor cores: MLA layer f32, prefill 2 sequences x 7 rows", KLI_DT_F32,
                       256, 4, 64, 32, 16, 32, 2, pre, 7);
        test_mla_layer("tensor cores: MLA layer bf16, prefill 2 sequences x 7 rows",
                       KLI_DT_BF16, 256, 4, 64, 32, 16, 32, 2, pre, 7);
        test_mla_layer("tensor cores: MLA layer q4_k, prefill 2 sequences x 7 rows",
                       KLI_DT_Q4_K, 256, 8, 64, 32, 16, 32, 2, pre, 7);
        test_mla_layer("tensor cores: MLA layer q8_0, released shape, prefill 40 rows",
                       KLI_DT_Q8_0, 2304, 32, 512, 128, 64, 128, 1, big, 40);
        test_kda_layer("tensor cores: KDA layer f32, prefill 3 rows", KLI_DT_F32, 128, 2, 32,
                       32, 32, 1, 3);
        test_kda_layer("tensor cores: KDA layer bf16, prefill 2 sequences x 70 rows",
                       KLI_DT_BF16, 128, 2, 32, 32, 32, 2, 70);
        test_kda_layer("tensor cores: KDA layer q4, released head shape, prefill 9 rows",
                       KLI_DT_Q4, 256, 4, 128, 64, 64, 1, 9);
        test_kda_layer("tensor cores: KDA layer q3_k, prefill 2 sequences x 9 rows",
                       KLI_DT_Q3_K, 256, 2, 128, 256, 256, 2, 9);
        gemm_force(0, 0.0);
    }
    /* the budget */
    if (tap_case("budget")) {
        struct k_gpu *g2 = NULL;
        struct gpu_info i2;
        struct kli_err e3 = {0};
        void *p = NULL;
        int rc = ops->open(&g2, 0, 1 << 20, &i2, &e3);
        ok(rc == KLI_OK && ops->alloc(g2, &p, 2 << 20, &e3) == KLI_E_NOMEM &&
           strstr(e3.msg, "budget") != NULL, "2 MiB from a 1 MiB budget: %s", e3.msg);
        if (rc == KLI_OK)
            ops->close(g2);
    }

    /* 4. the golden fixture */
    if (tap_case("golden")) {
        tl_path(dir, sizeof(dir), "tiny-kimi-linear");
        test_golden();
    }
    /* 4b. the nano model at K types, whole and with hot experts */
    if (tap_case("kmodel")) {
        test_kmodel("q4_k");
        test_kmodel("q2_k");
        test_kmodel("q6_k");
    }
    /* 4c. the tiny model and the nano model at q4_k with the products on the tensor cores */
    if (tap_case("gemm_model") && gemm_in) {
        gemm_force(1, 1e-4);
        tl_path(dir, sizeof(dir), "tiny-kimi-linear");
        test_golden_gemm();
        test_kmodel("q4_k");
        gemm_force(0, 0.0);
    }
    if (!gemm_in && !tap_listing)
        diag("built without cuBLAS: the gemm cases do not run");
    if (gpu != NULL) {
        ops->queue_free(queue);
        ops->close(gpu);
    }
    plan_done();
    return tap_exit();
}
