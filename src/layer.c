/*
 * layer.c - where each layer runs (layer.h). Per layer the choice is:
 *
 *   KDA    the device when this pass keeps the KDA states there (whole-model mode), else
 *          kda_forward on the CPU;
 *   MLA    the whole layer on the device when its weights are resident; else the CPU's
 *          projections, the attention on the device when it mirrors the caches, and the
 *          CPU's output projections (mla_project, mla_attend, mla_output);
 *   MoE    edge mode's expert cache when the model has one; else the device takes the shared
 *          and its resident (hot) experts while the CPU computes the others, and on the
 *          device's failure the CPU computes its share afterwards; else the CPU alone.
 *
 * Every backend_* call answers the same way (backend.h): KLI_OK, done there; BACKEND_CPU,
 * the CPU does it and nothing is lost; negative, the device lost state only it held.
 */
#include "config.h"

#include "backend.h"
#include "ffn.h"
#include "internal.h"
#include "kda.h"
#include "layer.h"
#include "mla.h"
#include "moe.h"
#include "moe_sched.h"
#include "ops.h"
#include "xcache.h"

int
layer_pass_begin(struct layer_pass *p, struct kli_session *const *ss, int64_t n_seq,
                 int64_t T_seq, struct kli_err *err)
{
    struct kli_session *s = ss[0];
    int64_t T = n_seq * T_seq;

    p->ss = ss;
    p->s = s;
    p->m = s->m;
    p->n_seq = n_seq;
    p->T_seq = T_seq;
    /* s's scratch serves every sequence: its row count was checked by the callers
     * (n_seq * T_seq <= batch_max), and the attention workspace must serve the longest
     * context of the batch, which may be another session's. */
    p->longest = 0;
    if (n_seq > FORWARD_MAX_SEQ || T > s->batch_max)
        return err_set(err, KLI_E_RANGE, "a step of %lld rows exceeds the first "
                           "session's batch_max %d", (long long)T, s->batch_max);
    for (int64_t q = 0; q < n_seq; q++) {
        p->pos[q] = ss[q]->pos;
        p->longest = p->pos[q] + T_seq > p->longest ? p->pos[q] + T_seq : p->longest;
    }
    if (session_work_reserve(s, p->longest, err) != KLI_OK)
        return KLI_E_NOMEM;
    /* With a GPU, the layers hand it part of their work (backend.c). */
    int rc = backend_forward_begin(ss, n_seq, T_seq, p->gs, err);
    if (rc < 0)
        return rc;   /* the sessions' KDA states were lost on the device (now broken) */
    p->gpu = rc == KLI_OK;
    if (s->m->xc != NULL) {
        xcache_lock(s->m->xc);   /* sessions of one model take turns with the expert cache */
        xcache_step(s->m->xc);
    }
    return KLI_OK;
}

void
layer_pass_end(struct layer_pass *p)
{
    if (p->m->xc != NULL)
        xcache_unlock(p->m->xc);
}

static int
layer_kda(struct layer_pass *p, int i, const float *x, float *y, struct kli_err *err)
{
    struct kda_state *kst[FORWARD_MAX_SEQ];

    if (p->gpu) {
        int rc = backend_kda_layer(p->gs, i, p->n_seq, p->T_seq, x, y, err);
        if (rc != BACKEND_CPU)
            return rc;   /* done, or the device held the states and failed part-way */
    }
    for (int64_t q = 0; q < p->n_seq; q++)
        kst[q] = &p->ss[q]->kda[i];
    kda_forward(p->m, &p->m->layers[i].kda, kst, p->n_seq, &p->s->kda_sc, x, p->T_seq, y);
    return KLI_OK;
}

static int
layer_mla(struct layer_pass *p, int i, const float *x, float *y, struct kli_err *err)
{
    const struct kli_model *m = p->m;
    const struct k_mla_w *w = &m->layers[i].mla;
    struct mla_scratch *sc = &p->s->mla_sc;
    float *caches[FORWARD_MAX_SEQ];
    int64_t n_seq = p->n_seq, T_seq = p->T_seq;

    for (int64_t q = 0; q < n_seq; q++)
        caches[q] = p->ss[q]->cache[i];
    if (!mla_work_ok(sc, p->pos, n_seq, T_seq)) {
        /* not after session_work_reserve in layer_pass_begin; but never past the workspace */
        return err_set(err, KLI_E_INVALID, "MLA layer %d: the attention workspace serves "
                           "%lld tokens, the step needs %lld", i, (long long)sc->work_n,
                           (long long)p->longest);
    }
    /* With a GPU that holds this layer's weights, the whole layer runs there. */
    if (p->gpu && backend_mla_layer(p->gs, i, caches, p->pos, n_seq, T_seq, x, y) == KLI_OK)
        return KLI_OK;
    mla_project(m, w, caches, p->pos, n_seq, sc, x, T_seq);
    /* The attention runs on the device over its mirror of the cache; on any failure the CPU
     * does it. */
    if (!p->gpu || backend_mla_attend(p->gs, i, caches, p->pos, n_seq, T_seq, sc->qfull,
                                      sc->lat) != KLI_OK)
        mla_attend(m, caches, p->pos, n_seq, sc, T_seq);
    mla_output(m, w, sc, n_seq * T_seq, y);
    return KLI_OK;
}

int
layer_mixer(struct layer_pass *p, int i, const float *x, float *y, struct kli_err *err)
{
    if (p->m->layers[i].mixer == KLI_MIXER_KDA)
        return layer_kda(p, i, x, y, err);
    return layer_mla(p, i, x, y, err);
}

static int
layer_moe(struct layer_pass *p, int i, const float *x, float *y, struct kli_err *err)
{
    const struct kli_model *m = p->m;
    const struct moe_w *w = &m->layers[i].moe;
    struct moe_scratch *sc = &p->s->moe_sc;
    int64_t T = p->n_seq * p->T_seq;
    uint8_t hot[KLI_MAX_EXPERTS] = {0};

    if (m->xc != NULL) {   /* edge mode: the routed experts come through the cache */
        moe_route_rows(m, w, sc, x, T);
        return moe_sched_cached(m, i, w, sc, x, T, y, err);
    }
    if (!p->gpu) {
        moe_forward(m, w, sc, x, T, y);
        return KLI_OK;
    }
    /* The device takes the shared expert and its resident (hot) routed experts while the
     * CPU computes the others; if it fails, the CPU computes its share afterwards. The hot
     * set holds still from launch to wait (backend.h). */
    moe_route_rows(m, w, sc, x, T);
    if (backend_moe_launch(p->gs[0], i, sc, x, T) != KLI_OK) {
        moe_sched_cpu(m, w, sc, x, T, y, NULL);
        return KLI_OK;
    }
    for (int32_t e = 0; e < m->cfg.moe.n_experts; e++)
        hot[e] = (uint8_t)backend_moe_hot(p->gs[0], i, e);
    moe_sched_cpu(m, w, sc, x, T, y, hot);
    if (backend_moe_wait(p->gs[0], i, y) != KLI_OK)
        moe_sched_add(m, w, sc, x, T, y, hot);
    return KLI_OK;
}

int
layer_ffn(struct layer_pass *p, int i, const float *x, float *y, struct kli_err *err)
{
    const struct k_layer *ly = &p->m->layers[i];

    if (ly->ffn_kind != KLI_FFN_DENSE)
        return layer_moe(p, i, x, y, err);
    ffn_forward(&ly->ffn, x, p->n_seq * p->T_seq, y, p->s->ffn_h1, p->s->ffn_h3);
    return KLI_OK;
}

void
layer_lm_head(struct layer_pass *p, const float *x, int64_t T, float *y)
{
    const struct kli_model *m = p->m;

    if (!p->gpu || backend_lm_head(p->gs, x, T, y) != KLI_OK)
        ops_matmul(&m->lm_head, x, m->cfg.d_model, y, m->cfg.n_vocab, T);
}
