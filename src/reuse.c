/*
 * reuse.c - what callers need to reuse evaluated state between sessions cheaply: copying one
 * session's state into another that already exists (kli_session_copy), the memory a session
 * holds (kli_session_nbytes, for caches bounded in bytes), and the model identity that keys
 * saved states (kli_model_fingerprint).
 *
 * kli_session_fork makes a new session with the options of its source; kli_session_copy
 * keeps the destination's options instead. That is what a batch scheduler wants: a prompt is
 * prefilled in a session with a large batch_max (prefill runs as matrix products over up to
 * batch_max rows), and its state then moves into a small decode session, or into a cache
 * entry created with batch_max 1, without a second large scratch arena per sequence.
 */
#include "config.h"

#include <string.h>

#include "backend.h"
#include "internal.h"
#include "kda.h"
#include "mla.h"
#include "session.h"

uint64_t
kli_model_fingerprint(const struct kli_model *m)
{
    return m->fingerprint;
}

int
kli_session_copy(struct kli_session *dst, const struct kli_session *src, struct kli_err *err)
{
    int rc;

    if (dst == NULL || src == NULL || dst == src)
        return kli_err_set(err, KLI_E_INVALID, "kli_session_copy: NULL or identical sessions");
    if (dst->m != src->m)
        return kli_err_set(err, KLI_E_INVALID, "kli_session_copy: sessions of two models");
    if (src->pos > dst->ctx_max)
        return kli_err_set(err, KLI_E_RANGE, "kli_session_copy: %d tokens exceed the "
                           "destination's ctx_max %d", src->pos, dst->ctx_max);
    /* Grow first: on failure dst is untouched. */
    if ((rc = session_reserve(dst, src->pos > 0 ? src->pos : 1, err)) != KLI_OK)
        return rc;
    if ((rc = backend_sess_pull((struct kli_session *)src, err)) != KLI_OK)
        return rc;
    backend_sess_written(dst);

    const struct kli_config *c = &src->m->cfg;
    int64_t H = c->kda.n_heads, K = c->kda.head_dim;
    int64_t stride = (int64_t)c->mla.kv_lora_rank + c->mla.qk_rope_dim;
    for (int i = 0; i < c->n_layers; i++) {
        if (c->layer_mixer[i] == KLI_MIXER_KDA) {
            memcpy(dst->kda[i].S, src->kda[i].S, (size_t)(H * K * K) * sizeof(float));
            memcpy(dst->kda[i].conv, src->kda[i].conv,
                   (size_t)(3 * H * K * (c->kda.conv_size - 1)) * sizeof(float));
        } else if (src->pos > 0) {
            memcpy(dst->cache[i], src->cache[i], (size_t)(src->pos * stride) * sizeof(float));
        }
    }
    if (src->pos > 0)
        memcpy(dst->hist, src->hist, (size_t)src->pos * sizeof(kli_token));
    memcpy(dst->logits, src->logits, (size_t)c->n_vocab * sizeof(float));
    dst->has_logits = src->has_logits;
    dst->pos = src->pos;
    dst->broken = src->broken;
    return KLI_OK;
}

/* Checklist: this mirrors the allocations of kli_session_create and session_reserve in
 * session.c (and the batched logits of kli_session_eval_batch); a buffer added there is
 * counted here too. */
uint64_t
kli_session_nbytes(const struct kli_session *s)
{
    const struct kli_model *m = s->m;
    const struct kli_config *cfg = &m->cfg;
    uint64_t B = (uint64_t)s->batch_max, D = (uint64_t)cfg->d_model;
    uint64_t H = (uint64_t)cfg->kda.n_heads, K = (uint64_t)cfg->kda.head_dim, HK = H * K;
    uint64_t low = (uint64_t)m->kda_rank_f + (uint64_t)m->kda_rank_g;
    uint64_t Hm = (uint64_t)cfg->mla.n_heads;
    uint64_t dqk = (uint64_t)(cfg->mla.qk_nope_dim + cfg->mla.qk_rope_dim);
    uint64_t stride = (uint64_t)cfg->mla.kv_lora_rank + (uint64_t)cfg->mla.qk_rope_dim;
    uint64_t E = (uint64_t)cfg->moe.n_experts, top = (uint64_t)cfg->moe.top_k;
    uint64_t dff = cfg->d_ff > 0 ? (uint64_t)cfg->d_ff : 1, mff = (uint64_t)cfg->moe.d_ff;
    uint64_t V = (uint64_t)cfg->n_vocab, cap = (uint64_t)s->cache_cap, fl = 0, other = 0;

    if ((uint64_t)cfg->moe.d_ff * (uint64_t)cfg->moe.n_shared > mff)
        mff = (uint64_t)cfg->moe.d_ff * (uint64_t)cfg->moe.n_shared;
    /* state */
    for (int i = 0; i < cfg->n_layers; i++) {
        if (cfg->layer_mixer[i] == KLI_MIXER_KDA)
            fl += H * K * K + 3 * HK * (uint64_t)(cfg->kda.conv_size - 1) + 1;
        else
            fl += cap * stride;
    }
    other += cap * sizeof(kli_token) + (uint64_t)cfg->n_layers * (sizeof(*s->kda) +
                                                                    sizeof(*s->cache));
    fl += V;                                             /* logits */
    if (s->batch_logits != NULL)
        fl += B * V;
    /* scratch */
    fl += 3 * B * D + 2 * B * dff;                       /* h, x, y, dense MLP */
    fl += 6 * B * HK + B * HK * 3 + B * H + B * (low > 0 ? low : 1);
    fl += (uint64_t)s->n_threads * (uint64_t)kda_chunk_floats((int64_t)K, (int64_t)K);
    fl += B * Hm * dqk + B * stride + B * Hm * (uint64_t)cfg->mla.v_head_dim +
          B * Hm * stride + B * Hm * (uint64_t)cfg->mla.kv_lora_rank;
    fl += (uint64_t)s->mla_sc.work_stride * (uint64_t)s->n_threads;
    if (E > 0) {
        fl += B * E + B * top + 2 * B * D + 2 * B * mff;
        other += (2 * B * top + E + 1) * sizeof(int32_t);
    }
    return fl * sizeof(float) + other + sizeof(*s);
}

int32_t
kli_session_ctx_max(const struct kli_session *s)
{
    return s->ctx_max;
}
