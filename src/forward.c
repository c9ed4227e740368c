/*
 * forward.c - the forward pass of Kimi Linear for one batch of tokens (doc/model.md 3):
 *
 *     h = embed[t]
 *     for each layer:  h += mixer(rmsnorm(h))     (KDA or MLA)
 *                      h += ffn(rmsnorm(h))       (dense SwiGLU or MoE)
 *     logits = lm_head(rmsnorm(h))
 *
 * There are no position ids anywhere: KDA carries order in its state and MLA uses no
 * rotary embedding. Activations are float32 throughout (decision 2 of doc/model.md).
 */
#include "config.h"

#include <string.h>
#include <time.h>

#include "backend.h"
#include "ffn.h"
#include "forward.h"
#include "internal.h"
#include "kda.h"
#include "mla.h"
#include "moe.h"
#include "ops.h"
#include "xcache.h"

static double
fwd_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void
rmsnorm_rows(float *y, const float *x, const float *w, int64_t T, int64_t D, float eps)
{
    for (int64_t t = 0; t < T; t++)
        ops_rmsnorm(y + t * D, x + t * D, w, D, eps);
}

static void
add_rows(float *h, const float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        h[i] += y[i];
}

int
forward_run(struct kli_session *const *ss, int64_t n_seq, const kli_token *tok, int64_t T_seq,
            float *logits_all, struct kli_err *err)
{
    struct kli_session *s = ss[0];   /* its scratch serves every row */
    const struct kli_model *m = s->m;
    const struct kli_config *cfg = &m->cfg;
    int64_t D = cfg->d_model, V = cfg->n_vocab, T = n_seq * T_seq;
    struct kda_state *kst[FORWARD_MAX_SEQ];
    float *caches[FORWARD_MAX_SEQ];
    int64_t pos[FORWARD_MAX_SEQ];

    double t0 = fwd_now(), t1;

    /* s's scratch serves every sequence: its row count was checked by the callers
     * (n_seq * T_seq <= batch_max), and the attention workspace must serve the longest
     * context of the batch, which may be another session's. */
    int64_t longest = 0;
    if (n_seq > FORWARD_MAX_SEQ || T > s->batch_max)
        return kli_err_set(err, KLI_E_RANGE, "a step of %lld rows exceeds the first "
                           "session's batch_max %d", (long long)T, s->batch_max);
    for (int64_t q = 0; q < n_seq; q++) {
        pos[q] = ss[q]->pos;
        longest = pos[q] + T_seq > longest ? pos[q] + T_seq : longest;
    }
    if (session_work_reserve(s, longest, err) != KLI_OK)
        return KLI_E_NOMEM;

    for (int64_t t = 0; t < T; t++)
        ops_row_f32(&m->embed, tok[t], s->h + t * D);
    /* With a GPU, the MLA and MoE blocks hand it part of their work (backend.c). */
    struct backend_sess *gs[FORWARD_MAX_SEQ];
    int gpu = backend_forward_begin(ss, n_seq, T_seq, gs, err);
    if (gpu < 0)
        return gpu;   /* the sessions' KDA states were lost on the device (now broken) */
    s->mla_sc.gpu = gpu ? gs : NULL;
    s->moe_sc.gpu = gpu ? gs[0] : NULL;
    if (m->xc != NULL) {
        xcache_lock(m->xc);   /* sessions of one model take turns with the expert cache */
        xcache_step(m->xc);
    }

    for (int i = 0; i < cfg->n_layers; i++) {
        const struct kli_layer *ly = &m->layers[i];

        rmsnorm_rows(s->x, s->h, ly->attn_norm, T, D, cfg->norm_eps);
        s->mla_sc.layer = s->moe_sc.layer = i;
        t1 = fwd_now();
        s->phase[KLI_PHASE_OTHER] += t1 - t0;
        if (ly->mixer == KLI_MIXER_KDA) {
            int rc = gpu ? backend_kda_layer(gs, i, n_seq, T_seq, s->x, s->y, err) : 1;
            if (rc < 0) {
                /* the device held the states and failed part-way: nothing to go on from */
                for (int64_t q = 0; q < n_seq; q++)
                    ss[q]->broken = 1;
                if (m->xc != NULL)
                    xcache_unlock(m->xc);
                return rc;
            }
            for (int64_t q = 0; rc > 0 && q < n_seq; q++)
                kst[q] = &ss[q]->kda[i];
            if (rc > 0)
                kda_forward(m, &ly->kda, kst, n_seq, &s->kda_sc, s->x, T_seq, s->y);
        } else {
            for (int64_t q = 0; q < n_seq; q++)
                caches[q] = ss[q]->cache[i];
            if (mla_forward(m, &ly->mla, caches, pos, n_seq, &s->mla_sc, s->x, T_seq,
                            s->y) != 0) {
                /* not after session_work_reserve above; but never past the workspace */
                for (int64_t q = 0; q < n_seq; q++)
                    ss[q]->broken = 1;
                if (m->xc != NULL)
                    xcache_unlock(m->xc);
                return kli_err_set(err, KLI_E_INVALID, "MLA layer %d: the attention "
                                   "workspace serves %lld tokens, the step needs %lld", i,
                                   (long long)s->mla_sc.work_n, (long long)longest);
            }
        }
        t0 = fwd_now();
        s->phase[ly->mixer == KLI_MIXER_KDA ? KLI_PHASE_KDA : KLI_PHASE_MLA] += t0 - t1;
        add_rows(s->h, s->y, T * D);

        rmsnorm_rows(s->x, s->h, ly->ffn_norm, T, D, cfg->norm_eps);
        t1 = fwd_now();
        s->phase[KLI_PHASE_OTHER] += t1 - t0;
        if (ly->ffn_kind == KLI_FFN_DENSE)
            ffn_forward(&ly->ffn, s->x, T, s->y, s->ffn_h1, s->ffn_h3);
        else if (moe_forward(m, &ly->moe, &s->moe_sc, s->x, T, s->y, err) != KLI_OK) {
            /* layers before this one have advanced: the state is no longer whole */
            for (int64_t q = 0; q < n_seq; q++)
                ss[q]->broken = 1;
            if (m->xc != NULL)
                xcache_unlock(m->xc);   /* only the cache's reads fail here */
            return err != NULL && err->code != 0 ? err->code : KLI_E_IO;
        }
        t0 = fwd_now();
        s->phase[ly->ffn_kind == KLI_FFN_DENSE ? KLI_PHASE_DENSE : KLI_PHASE_MOE] += t0 - t1;
        add_rows(s->h, s->y, T * D);
    }

    if (logits_all != NULL) {
        /* every row (prefill asked for all positions, or one row per sequence) */
        rmsnorm_rows(s->x, s->h, m->final_norm, T, D, cfg->norm_eps);
        if (!gpu || backend_lm_head(gs, s->x, T, logits_all) != 0)
            ops_matmul(&m->lm_head, s->x, D, logits_all, V, T);
        for (int64_t q = 0; q < n_seq; q++)
            memcpy(ss[q]->logits, logits_all + ((q + 1) * T_seq - 1) * V,
                   (size_t)V * sizeof(float));
    } else {
        ops_rmsnorm(s->x, s->h + (T - 1) * D, m->final_norm, D, cfg->norm_eps);
        if (!gpu || backend_lm_head(gs, s->x, 1, s->logits) != 0)
            ops_matmul(&m->lm_head, s->x, D, s->logits, V, 1);
    }
    s->phase[KLI_PHASE_LM_HEAD] += fwd_now() - t0;
    for (int64_t q = 0; q < n_seq; q++) {
        ss[q]->has_logits = 1;
        ss[q]->pos += (int32_t)T_seq;
    }
    if (m->xc != NULL)
        xcache_unlock(m->xc);
    return KLI_OK;
}

int
forward_batch(struct kli_session *s, const kli_token *tok, int64_t T, float *logits_all,
              struct kli_err *err)
{
    return forward_run(&s, 1, tok, T, logits_all, err);
}
