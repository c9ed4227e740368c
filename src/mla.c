/*
 * mla.c - NoPE multi-head latent attention (doc/model.md section 5).
 *
 * Per token: q = W_q x (per head a "nope" part and a "rope" part; no rotary is applied
 * anywhere in this model), and a compressed kv = W_kva x split into the latent c (L values,
 * RMS-normalised with eps 1e-6) and one key part k_pe shared by all heads. The cache keeps
 * (c^, k_pe) per token: L + rope values instead of H * (nope + rope + v).
 *
 * The expanded form rebuilds k_nope[h] = W_UK[h] c^ and v[h] = W_UV[h] c^ for every cached
 * token. The absorbed form moves W_UK onto the query instead,
 *     q_nope . (W_UK c^) = (W_UK^T q_nope) . c^,
 * attends over the latents directly, and applies W_UV once to the weighted latent sum:
 *     o[h] = W_UV[h] (sum_s p_s c^_s).
 * The two are the same function; tests/test-mla.c compares them.
 */
#include "config.h"

#include <math.h>
#include <string.h>

#include "imatrix.h"
#include "mla.h"
#include "ops.h"
#include "simd.h"
#include "threads.h"

int64_t
mla_row_floats(const struct k_config *cfg)
{
    return (int64_t)cfg->mla.kv_lora_rank + cfg->mla.qk_rope_dim;
}

int64_t
mla_row_bytes(const struct k_config *cfg, enum k_dtype dt)
{
    int64_t row = mla_row_floats(cfg);

    switch (dt) {
    case KLI_DT_F32:
        return 4 * row;
    case KLI_DT_BF16:   /* rows of whole words: an odd row takes a padding half */
        return row % 2 == 0 ? 2 * row : 0;
    case KLI_DT_Q8_0:
        if (cfg->mla.kv_lora_rank % 32 != 0 || row % 64 != 0)
            return 0;
        return (int64_t)dtype_nbytes(dt, (uint64_t)row);
    default:
        return 0;
    }
}

int64_t
mla_work_floats(const struct k_config *cfg, int64_t n)
{
    int64_t Lr = cfg->mla.kv_lora_rank, nope = cfg->mla.qk_nope_dim, dv = cfg->mla.v_head_dim;

    /* One head's attention (the reference forms): scores [n], q_lat [L], lat [L], expanded
     * k/v rows [nope + v]; the batched forward's scores [H][n] of all heads. */
    int64_t one = n + 2 * Lr + nope + dv + 16;
    int64_t all = (int64_t)cfg->mla.n_heads * n;
    return one > all ? one : all;
}

void
mla_attend_absorbed(const struct kli_model *m, const struct k_mla_w *w, const float *cache,
                    int64_t n, int64_t h, const float *q, float *o, float *work)
{
    const struct k_kernels *kk = k_kernels();
    const struct config_mla *c = &m->cfg.mla;
    int64_t Lr = c->kv_lora_rank, nope = c->qk_nope_dim, rope = c->qk_rope_dim;
    int64_t dv = c->v_head_dim, stride = mla_row_floats(&m->cfg);
    float scale = 1.0f / sqrtf((float)(nope + rope));
    float *sc = work, *qlat = sc + n, *lat = qlat + Lr;

    /* q_lat = W_UK^T q_nope */
    const float *wuk = w->w_uk_t + h * Lr * nope;
    for (int64_t l = 0; l < Lr; l++)
        qlat[l] = kk->dot(wuk + l * nope, q, nope);
    for (int64_t s = 0; s < n; s++) {
        const float *cs = cache + s * stride;
        sc[s] = (kk->dot(qlat, cs, Lr) + kk->dot(q + nope, cs + Lr, rope)) * scale;
    }
    ops_softmax(sc, n);
    memset(lat, 0, (size_t)Lr * sizeof(float));
    for (int64_t s = 0; s < n; s++)
        kk->axpy(lat, sc[s], cache + s * stride, Lr);
    const float *wuv = w->w_uv + h * dv * Lr;
    for (int64_t j = 0; j < dv; j++)
        o[j] = kk->dot(wuv + j * Lr, lat, Lr);
}

void
mla_attend_expanded(const struct kli_model *m, const struct k_mla_w *w, const float *cache,
                    int64_t n, int64_t h, const float *q, float *o, float *work)
{
    const struct config_mla *c = &m->cfg.mla;
    int64_t Lr = c->kv_lora_rank, nope = c->qk_nope_dim, rope = c->qk_rope_dim;
    int64_t dv = c->v_head_dim, stride = mla_row_floats(&m->cfg);
    float scale = 1.0f / sqrtf((float)(nope + rope));
    float *sc = work, *kv = sc + n;   /* kv: [nope + v] for one cached token */
    const float *wuk = w->w_uk_t + h * Lr * nope, *wuv = w->w_uv + h * dv * Lr;

    for (int64_t s = 0; s < n; s++) {
        const float *cs = cache + s * stride;
        double dot = 0.0;
        for (int64_t i = 0; i < nope; i++) {
            double ki = 0.0;   /* k_nope[i] = sum_l W_UK[i][l] c^[l] */
            for (int64_t l = 0; l < Lr; l++)
                ki += (double)wuk[l * nope + i] * cs[l];
            dot += ki * q[i];
        }
        for (int64_t i = 0; i < rope; i++)
            dot += (double)q[nope + i] * cs[Lr + i];
        sc[s] = (float)dot * scale;
    }
    ops_softmax(sc, n);
    for (int64_t j = 0; j < dv; j++)
        o[j] = 0.0f;
    for (int64_t s = 0; s < n; s++) {
        const float *cs = cache + s * stride;
        for (int64_t j = 0; j < dv; j++) {
            double vj = 0.0;   /* v[j] = sum_l W_UV[j][l] c^[l] */
            for (int64_t l = 0; l < Lr; l++)
                vj += (double)wuv[j * Lr + l] * cs[l];
            kv[j] = (float)vj;
        }
        for (int64_t j = 0; j < dv; j++)
            o[j] += sc[s] * kv[j];
    }
}

struct mla_job {
    const struct kli_model *m;
    const struct k_mla_w *w;
    struct mla_scratch *sc;
    int64_t T;
};

/* Per head h: the absorbed queries q_lat = W_UK[h]^T q_nope of all T tokens in one product
 * (W_UK is read once per batch, not once per token), then q_pe copied behind them. */
static void
mla_absorb_range(void *ctx, int64_t h0, int64_t h1, int ith)
{
    struct mla_job *j = ctx;
    const struct config_mla *c = &j->m->cfg.mla;
    int64_t H = c->n_heads, Lr = c->kv_lora_rank, nope = c->qk_nope_dim, rope = c->qk_rope_dim;
    int64_t dqk = nope + rope, stride = mla_row_floats(&j->m->cfg);

    (void)ith;
    for (int64_t h = h0; h < h1; h++) {
        struct tensor wuk = ops_view_f32(j->w->w_uk_t + h * Lr * nope, Lr, nope);
        ops_matmul_rows(&wuk, 0, Lr, j->sc->q + h * dqk, H * dqk, j->sc->qfull + h * stride,
                        H * stride, j->T);
        for (int64_t t = 0; t < j->T; t++)
            memcpy(j->sc->qfull + (t * H + h) * stride + Lr, j->sc->q + t * H * dqk + h * dqk +
                   nope, (size_t)rope * sizeof(float));
    }
}

/* Per head h: o[h] = W_UV[h] lat[h] for all T tokens in one product. */
static void
mla_expand_range(void *ctx, int64_t h0, int64_t h1, int ith)
{
    struct mla_job *j = ctx;
    const struct config_mla *c = &j->m->cfg.mla;
    int64_t H = c->n_heads, Lr = c->kv_lora_rank, dv = c->v_head_dim;

    (void)ith;
    for (int64_t h = h0; h < h1; h++) {
        struct tensor wuv = ops_view_f32(j->w->w_uv + h * dv * Lr, dv, Lr);
        ops_matmul_rows(&wuv, 0, dv, j->sc->lat + h * Lr, H * Lr, j->sc->o + h * dv, H * dv,
                        j->T);
    }
}

struct mla_softmax_job {
    float *s;
    int64_t n, ld;
    float scale;
};

static void
mla_softmax_range(void *ctx, int64_t h0, int64_t h1, int ith)
{
    struct mla_softmax_job *j = ctx;

    (void)ith;
    for (int64_t h = h0; h < h1; h++) {
        float *row = j->s + h * j->ld;
        for (int64_t i = 0; i < j->n; i++)
            row[i] *= j->scale;
        ops_softmax(row, j->n);
    }
}

int
mla_work_ok(const struct mla_scratch *sc, const int64_t *pos, int64_t n_seq, int64_t T_seq)
{
    /* The workspace holds the scores [H][n] of the longest sequence: H * n <=
     * mla_work_floats(n). */
    for (int64_t q = 0; q < n_seq; q++) {
        if (pos[q] + T_seq > sc->work_n)
            return 0;
    }
    return 1;
}

void
mla_project(const struct kli_model *m, const struct k_mla_w *w, float *const *caches,
            const int64_t *pos, int64_t n_seq, struct mla_scratch *sc, const float *x,
            int64_t T_seq)
{
    const struct k_config *cfg = &m->cfg;
    const struct config_mla *c = &cfg->mla;
    int64_t D = cfg->d_model, H = c->n_heads, Lr = c->kv_lora_rank, rope = c->qk_rope_dim;
    int64_t dqk = c->qk_nope_dim + rope, stride = mla_row_floats(cfg);
    int64_t T = n_seq * T_seq;
    struct mla_job j = {m, w, sc, T};

    ops_matmul(&w->q_proj, x, D, sc->q, H * dqk, T);
    ops_matmul(&w->kv_a, x, D, sc->ckv, stride, T);
    int64_t rb = mla_row_bytes(cfg, sc->cache_dt);
    for (int64_t t = 0; t < T; t++) {
        int64_t sq = t / T_seq;
        uint8_t *dst = (uint8_t *)caches[sq] + (pos[sq] + t % T_seq) * rb;
        float *src = sc->ckv + t * stride;
        int narrow = sc->cache_dt != KLI_DT_F32;
        float *row = narrow ? src : (float *)dst;
        /* kv_a_layernorm uses eps 1e-6 (doc/model.md decision 3); k_pe is not normalised. */
        ops_rmsnorm(row, src, w->kv_a_norm, Lr, 1e-6f);
        if (narrow)   /* the row converted once, here */
            dtype_from_f32(sc->cache_dt, row, dst, stride);
        else
            memcpy(row + Lr, src + Lr, (size_t)rope * sizeof(float));
        imat_hook(&w->kv_b, row, Lr, 1);   /* the latent W_UK and W_UV multiply, absorbed */
    }
    threads_parallel_for(H, 1, mla_absorb_range, &j);
}

/*
 * Attention of one query row over a narrow (bf16 or q8_0) cache in one pass (split-K, "flash
 * decoding", as cuda/mla.cu): the context is split into one contiguous range of rows per
 * worker, and each worker walks its range MLA_TILE rows at a time. A tile is widened once
 * into floats (the ISA's to_f32) and, while it is in cache, serves every head twice:
 *     S [H][k]  = scale * Q [H][C] . tile[0:k]^T          (the ISA's float matmul)
 *     online softmax per head: m' = max(m, max_r S), a = exp(m - m'), P = exp(S - m'),
 *                              l = a l + sum_r P,  acc = a acc
 *     acc [H][L] += P [H][k] . tile[0:k][0:L]             (the ISA's gemm_nn)
 * so each cached row is read from memory once per token and layer, by one worker. The
 * workers' (m, l, acc) are merged after, per head: with M = max_w m_w,
 *     lat[h] = sum_w exp(m_w - M) acc_w[h] / sum_w exp(m_w - M) l_w.
 * Per worker, sc->part holds m [H], l [H], acc [H][L], the tile [MLA_TILE][C] and the scores
 * [H][MLA_TILE] (mla_part_floats).
 */
enum { MLA_TILE = 64 };   /* rows per tile: the float tile (144 KiB at C = 576) stays in L2 */

int64_t
mla_part_floats(const struct k_config *cfg)
{
    int64_t H = cfg->mla.n_heads, L = cfg->mla.kv_lora_rank;

    return 2 * H + H * L + MLA_TILE * mla_row_floats(cfg) + H * MLA_TILE;
}

struct mla_split_job {
    const uint8_t *cache;
    const float *q;          /* [H][C] */
    float *part;
    int64_t H, L, C, rb, pf;
    enum k_dtype dt;
    float scale;
    float *lat;              /* [H][L], the merge's output */
    int nw;                  /* workers whose parts are merged */
};

static void
mla_split_range(void *ctx, int64_t s0, int64_t s1, int ith)
{
    struct mla_split_job *j = ctx;
    const struct k_kernels *kk = k_kernels();
    int64_t H = j->H, L = j->L, C = j->C;
    float *mx = j->part + (int64_t)ith * j->pf, *l = mx + H, *acc = l + H;
    float *tile = acc + H * L, *S = tile + MLA_TILE * C;

    /* l was zeroed by the caller (a worker without a range keeps l = 0: the merge skips it) */
    for (int64_t h = 0; h < H; h++)
        mx[h] = -INFINITY;
    memset(acc, 0, (size_t)(H * L) * sizeof(float));
    for (int64_t s = s0; s < s1; s += MLA_TILE) {
        int64_t k = s1 - s < MLA_TILE ? s1 - s : MLA_TILE;
        kk->to_f32(j->dt, j->cache + s * j->rb, tile, k * C);
        kk->matmul[KLI_DT_F32](S, MLA_TILE, j->q, C, tile, k, C, H);
        for (int64_t h = 0; h < H; h++) {
            float *p = S + h * MLA_TILE, m1 = mx[h], sum = 0.0f;
            for (int64_t r = 0; r < k; r++) {
                p[r] *= j->scale;
                m1 = p[r] > m1 ? p[r] : m1;
            }
            for (int64_t r = 0; r < k; r++) {
                p[r] = expf(p[r] - m1);
                sum += p[r];
            }
            if (m1 > mx[h]) {   /* a new maximum: what came before weighs exp(m - m') */
                float a = expf(mx[h] - m1);
                l[h] *= a;
                kk->scale(acc + h * L, a, L);
                mx[h] = m1;
            }
            l[h] += sum;
        }
        kk->gemm_nn(acc, L, S, MLA_TILE, tile, C, H, L, k, 1.0f, 1);
    }
}

static void
mla_merge_range(void *ctx, int64_t h0, int64_t h1, int ith)
{
    struct mla_split_job *j = ctx;
    const struct k_kernels *kk = k_kernels();
    int64_t H = j->H, L = j->L;

    (void)ith;
    for (int64_t h = h0; h < h1; h++) {
        float M = -INFINITY, den = 0.0f, *o = j->lat + h * L;
        for (int w = 0; w < j->nw; w++) {   /* a worker without rows has l = 0: skipped */
            const float *mw = j->part + w * j->pf;
            M = mw[H + h] > 0.0f && mw[h] > M ? mw[h] : M;
        }
        memset(o, 0, (size_t)L * sizeof(float));
        for (int w = 0; w < j->nw; w++) {
            const float *mw = j->part + w * j->pf;
            if (mw[H + h] == 0.0f)
                continue;
            float a = expf(mw[h] - M);
            den += a * mw[H + h];
            kk->axpy(o, a, mw + 2 * H + h * L, L);
        }
        kk->scale(o, 1.0f / den, L);
    }
}

static void
mla_attend_split(const struct kli_model *m, float *const *caches, const int64_t *pos,
                 int64_t n_seq, struct mla_scratch *sc, int64_t T_seq, float scale)
{
    const struct config_mla *c = &m->cfg.mla;
    int64_t H = c->n_heads, L = c->kv_lora_rank, C = mla_row_floats(&m->cfg);
    struct mla_split_job j = {NULL, NULL, sc->part, H, L, C, mla_row_bytes(&m->cfg,
                              sc->cache_dt), mla_part_floats(&m->cfg), sc->cache_dt, scale,
                              NULL, threads_count()};

    for (int64_t t = 0; t < n_seq * T_seq; t++) {
        int64_t sq = t / T_seq, n = pos[sq] + t % T_seq + 1;
        j.cache = (const uint8_t *)caches[sq];
        j.q = sc->qfull + t * H * C;
        j.lat = sc->lat + t * H * L;
        for (int w = 0; w < j.nw; w++)   /* each worker clears the rest of its part */
            memset(sc->part + w * j.pf + H, 0, (size_t)H * sizeof(float));
        threads_parallel_for(n, MLA_TILE, mla_split_range, &j);
        threads_parallel_for(H, 1, mla_merge_range, &j);
    }
}

void
mla_attend(const struct kli_model *m, float *const *caches, const int64_t *pos, int64_t n_seq,
           struct mla_scratch *sc, int64_t T_seq)
{
    const struct config_mla *c = &m->cfg.mla;
    int64_t H = c->n_heads, Lr = c->kv_lora_rank, stride = mla_row_floats(&m->cfg);
    float scale = 1.0f / sqrtf((float)(c->qk_nope_dim + c->qk_rope_dim));

    if (sc->cache_dt != KLI_DT_F32) {
        mla_attend_split(m, caches, pos, n_seq, sc, T_seq, scale);
        return;
    }

    /* Attention in matrix form, token by token (each sees its own causal prefix):
     *   S [H][n]  = Q_full [H][L+rope] . cache[0:n]^T      every head against every latent
     *   P         = softmax(S * scale) per head
     *   lat [H][L] = P . cache[0:n][0:L]
     * The cache is read once per token for all heads. */
    for (int64_t t = 0; t < n_seq * T_seq; t++) {
        int64_t sq = t / T_seq, n = pos[sq] + t % T_seq + 1;
        const float *cache = caches[sq];
        float *S = sc->work;   /* [H][n], n <= work_n: mla_work_ok */
        struct tensor keys = ops_view_f32(cache, n, stride);
        ops_matmul(&keys, sc->qfull + t * H * stride, stride, S, n, H);
        struct mla_softmax_job sj = {S, n, n, scale};
        threads_parallel_for(H, 1, mla_softmax_range, &sj);
        ops_gemm_nn(S, n, cache, stride, sc->lat + t * H * Lr, Lr, H, Lr, n);
    }
}

void
mla_output(const struct kli_model *m, const struct k_mla_w *w, struct mla_scratch *sc,
           int64_t T, float *out)
{
    const struct config_mla *c = &m->cfg.mla;
    struct mla_job j = {m, w, sc, T};

    threads_parallel_for(c->n_heads, 1, mla_expand_range, &j);
    ops_matmul(&w->o_proj, sc->o, (int64_t)c->n_heads * c->v_head_dim, out, m->cfg.d_model,
               T);
}

int
mla_forward(const struct kli_model *m, const struct k_mla_w *w, float *const *caches,
            const int64_t *pos, int64_t n_seq, struct mla_scratch *sc, const float *x,
            int64_t T_seq, float *out)
{
    if (!mla_work_ok(sc, pos, n_seq, T_seq))
        return -1;
    mla_project(m, w, caches, pos, n_seq, sc, x, T_seq);
    mla_attend(m, caches, pos, n_seq, sc, T_seq);
    mla_output(m, w, sc, n_seq * T_seq, out);
    return 0;
}
