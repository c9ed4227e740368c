/*
 * describe.c - kli_model_describe: the architecture summary behind `kli info`.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "kda.h"
#include "mla.h"
#include "model.h"
#include "quantize.h"
#include "session.h"
#include "xcache.h"

void
text_printf(struct text_buf *t, const char *fmt, ...)
{
    va_list ap;
    char *dst = t->len < t->cap ? t->buf + t->len : NULL;
    size_t room = t->len < t->cap ? t->cap - t->len : 0;

    va_start(ap, fmt);
    int n = vsnprintf(dst, room, fmt, ap);
    va_end(ap);
    if (n > 0)
        t->len += (size_t)n;
}

static int64_t
numel(const struct tensor_desc *d)
{
    return d->numel;
}

/*
 * "bits/weight:" stored bits per weight of each tensor class and of the whole file, each
 * with the dtypes it holds: a K type's class also lists KLI_DT_K_FALLBACK where some of its
 * rows were not whole super-blocks (kli(1), QUANTIZATION).
 */
/* " f32 X, bf16 Y, q8_0 Z" bytes per token of MLA cache (tokens 0), or the GiB a context
 * of `tokens` takes at each cache type (kli_model_cache_bytes); a type the model's rows
 * cannot take is left out. */
static void
describe_cache(struct text_buf *t, const struct kli_model *m, int n_mla, int64_t tokens)
{
    for (int32_t ty = KLI_CACHE_F32, first = 1; ty <= KLI_CACHE_Q8_0; ty++) {
        int64_t row = mla_row_bytes(&m->cfg, session_cache_dt(ty));
        if (row == 0)
            continue;
        if (tokens == 0)
            text_printf(t, "%s %s %lld bytes", first ? "" : ",", kli_cache_type_name(ty),
                        (long long)(n_mla * row));
        else
            text_printf(t, "%s %s %.2f GiB", first ? "" : ",", kli_cache_type_name(ty),
                        (double)kli_model_cache_bytes(m, ty, tokens) / 1073741824.0);
        first = 0;
    }
}

static void
describe_bpw(struct text_buf *t, const struct kli_model *m)
{
    uint64_t bytes[QC_N] = {0}, total_b = 0;
    int64_t n[QC_N] = {0}, total_n = 0;
    unsigned has[QC_N] = {0};
    int64_t nt = wfile_n_tensors(m->wf);

    for (int64_t i = 0; i < nt; i++) {
        const struct tensor_desc *d = wfile_tensor(m->wf, i);
        enum quant_class k = quantize_class(m->wf, d);
        bytes[k] += d->nbytes;
        n[k] += d->numel;
        has[k] |= 1u << d->dtype;
        total_b += d->nbytes;
        total_n += d->numel;
    }
    text_printf(t, "bits/weight: ");
    for (int k = 0; k < QC_N; k++) {
        if (n[k] == 0)
            continue;
        text_printf(t, " %s %.2f (", quantize_class_name((enum quant_class)k),
                    8.0 * (double)bytes[k] / (double)n[k]);
        for (int d = 0, first = 1; d < KLI_DT_COUNT; d++) {
            if (has[k] & (1u << d)) {
                text_printf(t, "%s%s", first ? "" : "+", k_dtype_name(d));
                first = 0;
            }
        }
        text_printf(t, "),");
    }
    text_printf(t, " total %.2f\n", total_n > 0 ? 8.0 * (double)total_b / (double)total_n : 0.0);
}

size_t
kli_model_describe(const struct kli_model *m, int tensors, char *buf, size_t cap)
{
    const struct k_config *c = &m->cfg;
    struct text_buf t = {buf, cap, 0};
    int n_kda = 0, n_mla = 0, n_dense = 0, n_moe = 0;
    uint64_t by_dtype[KLI_DT_COUNT] = {0};
    int64_t params = 0, routed = 0;

    if (cap > 0)
        buf[0] = '\0';
    for (int i = 0; i < c->n_layers; i++) {
        n_kda += c->layer_mixer[i] == KLI_MIXER_KDA;
        n_mla += c->layer_mixer[i] == KLI_MIXER_MLA;
        n_dense += c->layer_ffn[i] == KLI_FFN_DENSE;
        n_moe += c->layer_ffn[i] == KLI_FFN_MOE;
    }
    int64_t nt = wfile_n_tensors(m->wf);
    for (int64_t i = 0; i < nt; i++) {
        const struct tensor_desc *d = wfile_tensor(m->wf, i);
        params += numel(d);
        by_dtype[d->dtype] += d->nbytes;
        if (strstr(d->name, ".experts.") != NULL)
            routed += numel(d);
    }

    text_printf(&t, "model:        %s\n", m->path);
    text_printf(&t, "architecture: kimi_linear, %d layers (%d KDA, %d MLA; %d dense, %d MoE)\n",
                c->n_layers, n_kda, n_mla, n_dense, n_moe);
    text_printf(&t, "layer kinds:  ");
    for (int i = 0; i < c->n_layers; i++)
        text_printf(&t, "%s%c", i ? " " : "", c->layer_mixer[i] == KLI_MIXER_KDA ? 'K' : 'M');
    text_printf(&t, "  (K = KDA, M = MLA)\n");
    text_printf(&t, "hidden:       %d, vocab %d, rms_norm_eps %g, dense d_ff %d\n", c->d_model,
                c->n_vocab, (double)c->norm_eps, c->d_ff);
    text_printf(&t, "KDA:          %d heads x %d, short conv %d, gate ranks %d/%d\n",
                c->kda.n_heads, c->kda.head_dim, c->kda.conv_size, m->kda_rank_f,
                m->kda_rank_g);
    text_printf(&t, "MLA:          %d heads, latent %d, q/k nope %d + rope-part %d (no rotary), "
                "v %d\n", c->mla.n_heads, c->mla.kv_lora_rank, c->mla.qk_nope_dim,
                c->mla.qk_rope_dim, c->mla.v_head_dim);
    if (c->moe.n_experts > 0)
        text_printf(&t, "MoE:          %d experts, top-%d, %d shared, d_ff %d, %d group(s) "
                    "keeping %d, %s router, %srenormalised, scale %g, first %d layer(s) dense\n",
                    c->moe.n_experts, c->moe.top_k, c->moe.n_shared, c->moe.d_ff,
                    c->moe.n_group, c->moe.topk_group, c->moe.sigmoid ? "sigmoid" : "softmax",
                    c->moe.renormalize ? "" : "not ", (double)c->moe.scaling,
                    c->moe.first_dense);
    int64_t active = params;
    if (c->moe.n_experts > 0)
        active = params - routed + routed / c->moe.n_experts * c->moe.top_k;
    text_printf(&t, "parameters:   %lld (%.2f B), active per token %lld (%.2f B)\n",
                (long long)params, (double)params / 1e9, (long long)active,
                (double)active / 1e9);
    text_printf(&t, "bytes:       ");
    for (int d = 0; d < KLI_DT_COUNT; d++) {
        if (by_dtype[d] > 0)
            text_printf(&t, " %s %llu", k_dtype_name(d), (unsigned long long)by_dtype[d]);
    }
    text_printf(&t, "\n");
    describe_bpw(&t, m);
    int64_t kda_bytes = (int64_t)n_kda * 4 * kda_state_floats(c, NULL, NULL);
    text_printf(&t, "state:        KDA %lld bytes per sequence (fp32 recurrent + conv), "
                "MLA cache per token (latent + k_pe):", (long long)kda_bytes);
    describe_cache(&t, m, n_mla, 0);
    uint64_t wbytes = 0;
    for (int d = 0; d < KLI_DT_COUNT; d++)
        wbytes += by_dtype[d];
    text_printf(&t, "\ncontext:      up to %d tokens; a full context takes", c->ctx_max);
    describe_cache(&t, m, n_mla, c->ctx_max);
    text_printf(&t, " (cache, history, scores), next to %.2f GiB of weights as stored\n",
                (double)wbytes / 1073741824.0);
    if (c->moe.n_experts > 0) {
        struct kli_cache_stats cs;
        uint64_t least = xcache_min_budget(m, c->moe.top_k);
        text_printf(&t, "edge mode:    least --mem-budget %llu bytes (%.1f MiB)",
                    (unsigned long long)least, (double)least / 1048576.0);
        if (kli_model_cache_stats(m, &cs) == 0)
            text_printf(&t, "; on: budget %.1f MiB, trunk %.1f MiB, cache %d of %d experts",
                        (double)cs.budget / 1048576.0, (double)cs.trunk_bytes / 1048576.0,
                        cs.n_slots, cs.n_experts);
        text_printf(&t, "\n");
    }
    if (tensors) {
        text_printf(&t, "tensors:      %lld\n", (long long)nt);
        for (int64_t i = 0; i < nt; i++) {
            const struct tensor_desc *d = wfile_tensor(m->wf, i);
            text_printf(&t, "  %-64s %-5s [", d->name, d->dtype_name);
            for (int k = 0; k < d->ndim; k++)
                text_printf(&t, "%s%lld", k ? ", " : "", (long long)d->shape[k]);
            text_printf(&t, "]\n");
        }
    }
    return t.len;
}

static uint64_t
tensor_bytes(const struct tensor *t)
{
    return t->data != NULL ? model_row_bytes(t) * (uint64_t)t->shape[0] : 0;
}

static uint64_t
ffn_bytes(const struct ffn_w *f)
{
    return tensor_bytes(&f->gate) + tensor_bytes(&f->up) + tensor_bytes(&f->down);
}

int
kli_model_weight_pages(const struct kli_model *m, uint64_t *resident, uint64_t *huge)
{
    uint64_t r = 0, h = 0;
    int rc = m != NULL ? wfile_pages(m->wf, &r, &h) : -1;

    if (resident != NULL)
        *resident = r;
    if (huge != NULL)
        *huge = h;
    return rc;
}

uint64_t
kli_model_decode_bytes(const struct kli_model *m)
{
    const struct k_config *c = &m->cfg;
    uint64_t b = model_row_bytes(&m->embed) + tensor_bytes(&m->lm_head);

    for (int i = 0; i < c->n_layers; i++) {
        const struct k_layer *ly = &m->layers[i];
        if (ly->mixer == KLI_MIXER_KDA) {
            const struct k_kda_w *w = &ly->kda;
            b += tensor_bytes(&w->q_proj) + tensor_bytes(&w->k_proj) + tensor_bytes(&w->v_proj) +
                 tensor_bytes(&w->f_a) + tensor_bytes(&w->f_b) + tensor_bytes(&w->b_proj) +
                 tensor_bytes(&w->g_a) + tensor_bytes(&w->g_b) + tensor_bytes(&w->o_proj);
        } else {
            const struct k_mla_w *w = &ly->mla;
            /* kv_b is read through its float copies (W_UK^T and W_UV) */
            b += tensor_bytes(&w->q_proj) + tensor_bytes(&w->kv_a) + tensor_bytes(&w->o_proj) +
                 (uint64_t)w->kv_b.shape[0] * (uint64_t)w->kv_b.shape[1] * sizeof(float);
        }
        if (ly->ffn_kind == KLI_FFN_DENSE) {
            b += ffn_bytes(&ly->ffn);
        } else {
            uint64_t experts = 0;
            for (int e = 0; e < c->moe.n_experts; e++)
                experts += ffn_bytes(&ly->moe.experts[e]);
            b += tensor_bytes(&ly->moe.router) + ffn_bytes(&ly->moe.shared) +
                 experts / (uint64_t)c->moe.n_experts * (uint64_t)c->moe.top_k;
        }
    }
    return b;
}
