/*
 * mla.c - NoPE multi-head latent attention (docs/model.md section 5).
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

#include "mla.h"
#include "ops.h"
#include "simd.h"
#include "threads.h"

int64_t
mla_work_floats(const struct kli_config *cfg, int64_t n)
{
    int64_t Lr = cfg->mla.kv_lora_rank, nope = cfg->mla.qk_nope_dim, dv = cfg->mla.v_head_dim;

    /* scores [n], q_lat [L], lat [L], expanded-form k/v rows [nope + v] */
    return n + 2 * Lr + nope + dv + 16;
}

void
mla_attend_absorbed(const struct kli_model *m, const struct kli_mla_w *w, const float *cache,
                    int64_t n, int64_t h, const float *q, float *o, float *work)
{
    const struct kli_kernels *kk = kli_kernels();
    const struct kli_config_mla *c = &m->cfg.mla;
    int64_t Lr = c->kv_lora_rank, nope = c->qk_nope_dim, rope = c->qk_rope_dim;
    int64_t dv = c->v_head_dim, stride = Lr + rope;
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
mla_attend_expanded(const struct kli_model *m, const struct kli_mla_w *w, const float *cache,
                    int64_t n, int64_t h, const float *q, float *o, float *work)
{
    const struct kli_config_mla *c = &m->cfg.mla;
    int64_t Lr = c->kv_lora_rank, nope = c->qk_nope_dim, rope = c->qk_rope_dim;
    int64_t dv = c->v_head_dim, stride = Lr + rope;
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
    const struct kli_mla_w *w;
    const float *cache;
    int64_t pos;
    struct mla_scratch *sc;
};

/* Items are (token, head) pairs; token t attends to cache rows [0, pos + t]. */
static void
mla_attn_range(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct mla_job *j = ctx;
    const struct kli_config_mla *c = &j->m->cfg.mla;
    int64_t H = c->n_heads, dqk = c->qk_nope_dim + c->qk_rope_dim, dv = c->v_head_dim;
    float *work = j->sc->work + ith * j->sc->work_stride;

    for (int64_t i = i0; i < i1; i++) {
        int64_t t = i / H, h = i % H;
        mla_attend_absorbed(j->m, j->w, j->cache, j->pos + t + 1, h,
                            j->sc->q + t * H * dqk + h * dqk, j->sc->o + t * H * dv + h * dv,
                            work);
    }
}

void
mla_forward(const struct kli_model *m, const struct kli_mla_w *w, float *cache, int64_t pos,
            struct mla_scratch *sc, const float *x, int64_t T, float *out)
{
    const struct kli_config *cfg = &m->cfg;
    const struct kli_config_mla *c = &cfg->mla;
    int64_t D = cfg->d_model, H = c->n_heads, Lr = c->kv_lora_rank, rope = c->qk_rope_dim;
    int64_t dqk = c->qk_nope_dim + rope, dv = c->v_head_dim, stride = Lr + rope;
    struct mla_job j = {m, w, cache, pos, sc};

    ops_matmul(&w->q_proj, x, D, sc->q, H * dqk, T);
    ops_matmul(&w->kv_a, x, D, sc->ckv, stride, T);
    for (int64_t t = 0; t < T; t++) {
        float *row = cache + (pos + t) * stride;
        const float *src = sc->ckv + t * stride;
        /* kv_a_layernorm uses eps 1e-6 (docs/model.md decision 3); k_pe is not normalised. */
        ops_rmsnorm(row, src, w->kv_a_norm, Lr, 1e-6f);
        memcpy(row + Lr, src + Lr, (size_t)rope * sizeof(float));
    }
    threads_parallel_for(T * H, 1, mla_attn_range, &j);
    ops_matmul(&w->o_proj, sc->o, H * dv, out, D, T);
}
