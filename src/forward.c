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

#include "forward.h"
#include "imatrix.h"
#include "internal.h"
#include "layer.h"
#include "ops.h"
#include "util.h"

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

/* One residual block of layer i, timed: h += block(rmsnorm(h) * norm). The time of the norm
 * and what came before since *t0 counts as KLI_PHASE_OTHER, the block's as `phase`; *t0
 * becomes the block's end. */
static int
fwd_residual(struct layer_pass *p, int i, const float *norm,
             int (*block)(struct layer_pass *, int, const float *, float *, struct kli_err *),
             int phase, double *t0, struct kli_err *err)
{
    struct kli_session *s = p->s;
    const struct k_config *cfg = &s->m->cfg;
    int64_t D = cfg->d_model, T = p->n_seq * p->T_seq;
    int rc;

    rmsnorm_rows(s->x, s->h, norm, T, D, cfg->norm_eps);
    double t1 = util_now_s();
    s->phase[KLI_PHASE_OTHER] += t1 - *t0;
    if ((rc = block(p, i, s->x, s->y, err)) != KLI_OK)
        return rc;
    *t0 = util_now_s();
    s->phase[phase] += *t0 - t1;
    add_rows(s->h, s->y, T * D);
    return KLI_OK;
}

int
forward_run(struct kli_session *const *ss, int64_t n_seq, const kli_token *tok, int64_t T_seq,
            float *logits_all, struct kli_err *err)
{
    struct kli_session *s = ss[0];   /* its scratch serves every row */
    const struct kli_model *m = s->m;
    const struct k_config *cfg = &m->cfg;
    int64_t D = cfg->d_model, V = cfg->n_vocab, T = n_seq * T_seq;
    struct layer_pass p;   /* where each layer runs: layer.c */
    int rc;

    double t0 = util_now_s();

    if ((rc = layer_pass_begin(&p, ss, n_seq, T_seq, err)) != KLI_OK)
        return rc;
    imat_enter(s->imat);
    for (int64_t t = 0; t < T; t++)
        ops_row_f32(&m->embed, tok[t], s->h + t * D);

    for (int i = 0; i < cfg->n_layers; i++) {
        const struct k_layer *ly = &m->layers[i];
        int mix = ly->mixer == KLI_MIXER_KDA ? KLI_PHASE_KDA : KLI_PHASE_MLA;
        int ffn = ly->ffn_kind == KLI_FFN_DENSE ? KLI_PHASE_DENSE : KLI_PHASE_MOE;

        if ((rc = fwd_residual(&p, i, ly->attn_norm, layer_mixer, mix, &t0, err)) != KLI_OK ||
            (rc = fwd_residual(&p, i, ly->ffn_norm, layer_ffn, ffn, &t0, err)) != KLI_OK)
            goto broken;
    }

    if (logits_all != NULL) {
        /* every row (prefill asked for all positions, or one row per sequence) */
        rmsnorm_rows(s->x, s->h, m->final_norm, T, D, cfg->norm_eps);
        layer_lm_head(&p, s->x, T, logits_all);
        for (int64_t q = 0; q < n_seq; q++)
            memcpy(ss[q]->logits, logits_all + ((q + 1) * T_seq - 1) * V,
                   (size_t)V * sizeof(float));
    } else {
        ops_rmsnorm(s->x, s->h + (T - 1) * D, m->final_norm, D, cfg->norm_eps);
        layer_lm_head(&p, s->x, 1, s->logits);
    }
    s->phase[KLI_PHASE_LM_HEAD] += util_now_s() - t0;
    for (int64_t q = 0; q < n_seq; q++) {
        ss[q]->has_logits = 1;
        ss[q]->pos += (int32_t)T_seq;
    }
    imat_enter(NULL);
    layer_pass_end(&p);
    return KLI_OK;

broken:
    /* layers before this one have advanced (or the device lost the states it held): the
     * sessions' state is no longer whole */
    for (int64_t q = 0; q < n_seq; q++)
        ss[q]->broken = 1;
    imat_enter(NULL);
    layer_pass_end(&p);
    return rc;
}

int
forward_batch(struct kli_session *s, const kli_token *tok, int64_t T, float *logits_all,
              struct kli_err *err)
{
    return forward_run(&s, 1, tok, T, logits_all, err);
}
