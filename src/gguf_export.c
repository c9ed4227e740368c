/*
 * gguf_export.c - kli_convert with format "gguf": a model written as llama.cpp's converter
 * writes Kimi Linear (architecture "kimi-linear"), so that llama.cpp-family tools run a
 * model kli converted or quantized. The inverse of weights/gguf_kimi.c (doc/formats.md
 * section 5.2): llama.cpp's names, the routed experts stacked per matrix, kv_b_proj split
 * per head into k_b (transposed) and v_b, A_log stored as -exp(A_log), vectors, convolution
 * taps and the router in F32, the hyper-parameters as kimi-linear.* keys and the vocabulary
 * as GPT-2 byte strings with token types and merges.
 *
 * Matrices stream through quantize.c as for a .kli (--type and --keep apply); the small
 * derived tensors are computed whole. Every tensor type kli has is a ggml type with the same
 * block layout, so matrices are written as kli holds them.
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "gguf_export.h"
#include "internal.h"
#include "model.h"
#include "quantize.h"
#include "tokenizer_impl.h"
#include "weights.h"

enum gx_kind { GX_MATRIX, GX_F32, GX_ALOG, GX_KB, GX_VB, GX_STACK };

struct gx_item {
    char name[GGUF_MAX_NAME + 1];
    enum gx_kind kind;
    const struct tensor_desc *d;   /* the source (GX_STACK: expert 0's) */
    enum k_dtype to;
    int32_t layer, role;           /* GX_STACK: 0 w1, 1 w3, 2 w2 */
};

struct gx {
    const struct kli_model *m;
    const struct wfile *wf;
    const struct kli_convert_options *opt;
    struct quant_plan plan;
    struct gx_item *it;
    struct gguf_wtensor *t;
    int64_t n, cap;
    const char *out;
    struct kli_err *err;
};

static const char *const gx_exp[3][2] = {
    {"w1", "ffn_gate_exps"}, {"w3", "ffn_up_exps"}, {"w2", "ffn_down_exps"},
};

/* Appends an item; its tensor info from the kind. */
static int
gx_add(struct gx *x, enum gx_kind kind, const struct tensor_desc *d, const char *name,
       int32_t layer, int32_t role)
{
    const struct k_config *c = &x->m->cfg;

    if (x->n == x->cap) {
        int64_t nc = x->cap ? 2 * x->cap : 256;
        struct gx_item *ni = k_reallocarray(x->it, (size_t)nc, sizeof(*ni));
        if (ni != NULL)
            x->it = ni;
        struct gguf_wtensor *nt = k_reallocarray(x->t, (size_t)nc, sizeof(*nt));
        if (nt != NULL)
            x->t = nt;
        if (ni == NULL || nt == NULL)
            return err_set(x->err, KLI_E_NOMEM, "out of memory");
        x->cap = nc;
    }
    struct gx_item *it = &x->it[x->n];
    struct gguf_wtensor *t = &x->t[x->n];
    memset(it, 0, sizeof(*it));
    memset(t, 0, sizeof(*t));
    snprintf(it->name, sizeof(it->name), "%s", name);
    it->kind = kind;
    it->d = d;
    it->layer = layer;
    it->role = role;
    t->name = it->name;
    t->type = GGML_F32;
    int64_t H = c->mla.n_heads, nope = c->mla.qk_nope_dim, dv = c->mla.v_head_dim;
    int64_t lr = c->mla.kv_lora_rank;
    switch (kind) {
    case GX_MATRIX:
    case GX_STACK:
        it->to = quantize_target(x->wf, d, &x->plan, x->opt->keep, x->opt->n_keep);
        if (gguf_type_of(it->to, &t->type) != 0)
            return err_set(x->err, KLI_E_UNSUPPORTED, "tensor %s has dtype %s, which GGUF "
                           "cannot hold", d->name, d->dtype_name);
        t->ndim = kind == GX_STACK ? 3 : 2;
        t->ne[0] = d->shape[1];
        t->ne[1] = d->shape[0];
        t->ne[2] = kind == GX_STACK ? c->moe.n_experts : 1;
        t->nbytes = dtype_nbytes(it->to, (uint64_t)d->numel) * (uint64_t)t->ne[2];
        return x->n++, KLI_OK;
    case GX_F32:
        /* conv taps [d_inner, 1, d_conv] as [1, d_inner, 1, d_conv]; the rest reversed */
        if (d->ndim == 3) {
            t->ndim = 4;
            t->ne[0] = d->shape[2];
            t->ne[1] = 1;
            t->ne[2] = d->shape[0];
            t->ne[3] = 1;
        } else {
            t->ndim = d->ndim > 0 ? d->ndim : 1;
            t->ne[0] = 1;
            for (int i = 0; i < d->ndim; i++)
                t->ne[i] = d->shape[d->ndim - 1 - i];
        }
        t->nbytes = (uint64_t)d->numel * 4;
        return x->n++, KLI_OK;
    case GX_ALOG:
        t->ndim = 4;
        t->ne[0] = 1;
        t->ne[1] = d->numel;
        t->ne[2] = t->ne[3] = 1;
        t->nbytes = (uint64_t)d->numel * 4;
        return x->n++, KLI_OK;
    case GX_KB:
    case GX_VB:
        /* a float kv_b keeps its dtype (the split only moves values); else F32 */
        it->to = quantize_target(x->wf, d, &x->plan, x->opt->keep, x->opt->n_keep);
        if (it->to != KLI_DT_F16 && it->to != KLI_DT_BF16)
            it->to = KLI_DT_F32;
        gguf_type_of(it->to, &t->type);
        t->ndim = 3;
        t->ne[0] = kind == GX_KB ? nope : lr;
        t->ne[1] = kind == GX_KB ? lr : dv;
        t->ne[2] = H;
        t->nbytes = dtype_nbytes(it->to, (uint64_t)(H * lr * (kind == GX_KB ? nope : dv)));
        return x->n++, KLI_OK;
    }
    return KLI_OK;
}

/* The tensors in llama.cpp's order: the globals, then layer by layer. */
static int
gx_plan(struct gx *x)
{
    const struct k_config *c = &x->m->cfg;
    static const char *const glob[] = {"model.embed_tokens.weight", "model.norm.weight",
                                       "lm_head.weight"};
    char hf[160], gg[96];
    int rc;

    for (size_t i = 0; i < KLI_ARRAY_LEN(glob); i++) {
        const struct tensor_desc *d = wfile_find(x->wf, glob[i]);
        if (d == NULL)
            continue;
        gguf_kimi_name(glob[i], gg, sizeof(gg));
        if ((rc = gx_add(x, d->ndim == 2 ? GX_MATRIX : GX_F32, d, gg, -1, 0)) != KLI_OK)
            return rc;
    }
    for (int l = 0; l < c->n_layers; l++) {
        for (int64_t i = 0; i < wfile_n_tensors(x->wf); i++) {
            const struct tensor_desc *d = wfile_tensor(x->wf, i);
            int n = -1, L;
            if (sscanf(d->name, "model.layers.%d.%n", &L, &n) != 1 || n < 0 || L != l)
                continue;
            const char *rest = d->name + n;
            if (strcmp(rest, "self_attn.kv_b_proj.weight") == 0) {
                /* split, as llama.cpp's converter does (its attn_kv_b is the legacy form) */
                snprintf(gg, sizeof(gg), "blk.%d.attn_k_b.weight", l);
                rc = gx_add(x, GX_KB, d, gg, l, 0);
                snprintf(gg, sizeof(gg), "blk.%d.attn_v_b.weight", l);
                rc = rc ? rc : gx_add(x, GX_VB, d, gg, l, 0);
            } else if (gguf_kimi_name(d->name, gg, sizeof(gg)) == 0) {
                int vec = d->ndim != 2 || strcmp(rest, "block_sparse_moe.gate.weight") == 0;
                rc = gx_add(x, vec ? GX_F32 : GX_MATRIX, d, gg, l, 0);
            } else if (strcmp(rest, "self_attn.A_log") == 0) {
                snprintf(gg, sizeof(gg), "blk.%d.ssm_a", l);
                rc = gx_add(x, GX_ALOG, d, gg, l, 0);
            } else {
                rc = KLI_OK;    /* routed experts: below */
            }
            if (rc != KLI_OK)
                return rc;
        }
        if (c->layer_ffn[l] != KLI_FFN_MOE)
            continue;
        for (int r = 0; r < 3; r++) {
            snprintf(hf, sizeof(hf), "model.layers.%d.block_sparse_moe.experts.0.%s.weight", l,
                     gx_exp[r][0]);
            snprintf(gg, sizeof(gg), "blk.%d.%s.weight", l, gx_exp[r][1]);
            const struct tensor_desc *d = wfile_find(x->wf, hf);
            if (d == NULL)
                return err_set(x->err, KLI_E_FORMAT, "missing tensor %s", hf);
            if ((rc = gx_add(x, GX_STACK, d, gg, l, r)) != KLI_OK)
                return rc;
        }
    }
    return KLI_OK;
}

static int
gx_write_cb(void *ctx, const void *data, uint64_t n, struct kli_err *err)
{
    return gguf_writer_write(ctx, data, n, err);
}

/* The derived F32 tensors, computed whole. */
static int
gx_derived(struct gx *x, struct gguf_writer *w, const struct gx_item *it)
{
    const struct k_config *c = &x->m->cfg;
    const struct tensor_desc *d = it->d;
    int64_t H = c->mla.n_heads, nope = c->mla.qk_nope_dim, dv = c->mla.v_head_dim;
    int64_t lr = c->mla.kv_lora_rank;
    float *src = k_mallocarray((size_t)d->numel, sizeof(float));
    float *dst = k_mallocarray((size_t)d->numel, sizeof(float));
    uint8_t *enc = k_mallocarray((size_t)d->numel, 2);
    int64_t n = d->numel;
    int rc;

    if (src == NULL || dst == NULL || enc == NULL) {
        free(src);
        free(dst);
        free(enc);
        return err_set(x->err, KLI_E_NOMEM, "out of memory for %s", d->name);
    }
    dtype_to_f32(d->dtype, d->data, src, n);
    switch (it->kind) {
    case GX_ALOG:
        for (int64_t i = 0; i < n; i++)
            dst[i] = -expf(src[i]);
        break;
    case GX_KB:
        /* per head [latent][nope]: W_UK transposed */
        n = H * lr * nope;
        for (int64_t h = 0; h < H; h++)
            for (int64_t l = 0; l < lr; l++)
                for (int64_t r = 0; r < nope; r++)
                    dst[(h * lr + l) * nope + r] = src[(h * (nope + dv) + r) * lr + l];
        break;
    case GX_VB:
        n = H * dv * lr;
        for (int64_t h = 0; h < H; h++)
            memcpy(dst + h * dv * lr, src + (h * (nope + dv) + nope) * lr,
                   (size_t)(dv * lr) * sizeof(float));
        break;
    default:
        memcpy(dst, src, (size_t)n * sizeof(float));
        break;
    }
    if ((it->kind == GX_KB || it->kind == GX_VB) && it->to != KLI_DT_F32) {
        dtype_from_f32(it->to, dst, enc, n);
        rc = gguf_writer_write(w, enc, (uint64_t)n * 2, x->err);
    } else {
        rc = gguf_writer_write(w, dst, (uint64_t)n * 4, x->err);
    }
    free(src);
    free(dst);
    free(enc);
    return rc;
}

/* ==== metadata ==== */

/* GPT-2's byte-to-character mapping: printable bytes stand for themselves, the other 68
 * for U+0100.. in byte order. Appends the UTF-8 of byte b's character. */
static size_t
gx_byte_char(uint8_t b, char *out)
{
    uint32_t cp = b;

    if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)) {
        uint32_t k = 0;
        for (int i = 0; i < b; i++)
            k += !((i >= 33 && i <= 126) || (i >= 161 && i <= 172) || i >= 174);
        cp = 256 + k;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    out[0] = (char)(0xc0 | cp >> 6);
    out[1] = (char)(0x80 | (cp & 0x3f));
    return 2;
}

static void
gx_token_string(struct gguf_kvbuf *b, const uint8_t *p, size_t n, char *tmp)
{
    size_t o = 0;

    for (size_t i = 0; i < n; i++)
        o += gx_byte_char(p[i], tmp + o);
    gguf_kv_string(b, tmp, o);
}

/* The last merge of token id (tiktoken's BPE with ranks below id): the two parts' lengths,
 * or 0 when it does not end in two parts. */
static size_t
gx_merge_split(const struct kli_tokenizer *t, kli_token id, const uint8_t *p, size_t n,
               size_t *cut, size_t *parts)
{
    size_t np = n;

    for (size_t i = 0; i < n; i++)
        cut[i] = i;    /* part i starts at cut[i] */
    while (np > 1) {
        kli_token best = -1;
        size_t at = 0;
        for (size_t i = 0; i + 1 < np; i++) {
            size_t end = i + 2 < np ? cut[i + 2] : n;
            kli_token r = tok_map_find(t, &t->ranks, p + cut[i], end - cut[i]);
            if (r >= 0 && r < id && (best < 0 || r < best)) {
                best = r;
                at = i;
            }
        }
        if (best < 0)
            break;
        memmove(cut + at + 1, cut + at + 2, (np - at - 2) * sizeof(*cut));
        np--;
    }
    *parts = np;
    return np == 2 ? cut[1] : 0;
}

static int
gx_vocab(struct gx *x, struct gguf_kvbuf *b)
{
    const struct kli_tokenizer *t = x->m->tok;
    int32_t nv = x->m->cfg.n_vocab, nb = kli_tokenizer_n_base(t);
    char *tmp = k_malloc(64 * 1024);
    size_t *cut = k_mallocarray(4096, sizeof(size_t));
    int64_t n_merges = 0;
    int rc = KLI_OK;

    if (tmp == NULL || cut == NULL) {
        rc = err_set(x->err, KLI_E_NOMEM, "out of memory");
        goto out;
    }
    gguf_kv_str(b, "tokenizer.ggml.model", "gpt2");
    gguf_kv_str(b, "tokenizer.ggml.pre", "kimi-k2");
    gguf_kv_array(b, "tokenizer.ggml.tokens", GGUF_T_STRING, (uint64_t)nv);
    for (kli_token id = 0; id < nv; id++) {
        size_t len = 0;
        const char *s = id < kli_tokenizer_n_vocab(t) ? kli_token_bytes(t, id, &len) : NULL;
        if (s == NULL) {
            int k = snprintf(tmp, 64, "[PAD%d]", id);
            gguf_kv_string(b, tmp, (size_t)k);
        } else if (id < nb) {
            if (len > 16 * 1024) {
                rc = err_set(x->err, KLI_E_RANGE, "token %d is %zu bytes long", id, len);
                goto out;
            }
            gx_token_string(b, (const uint8_t *)s, len, tmp);
        } else {
            gguf_kv_string(b, s, len);
        }
    }
    gguf_kv_array(b, "tokenizer.ggml.token_type", GGUF_T_I32, (uint64_t)nv);
    for (kli_token id = 0; id < nv; id++)
        gguf_kv_elem(b, id < nb ? 1 : id < kli_tokenizer_n_vocab(t) ? 3 : 5, 4);
    /* merges: counted, then written */
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1)
            gguf_kv_array(b, "tokenizer.ggml.merges", GGUF_T_STRING, (uint64_t)n_merges);
        for (kli_token id = 256; id < nb; id++) {
            size_t len, parts;
            const uint8_t *p = (const uint8_t *)kli_token_bytes(t, id, &len);
            if (len < 2 || len > 4096)
                continue;
            size_t c = gx_merge_split(t, id, p, len, cut, &parts);
            if (c == 0)
                continue;
            if (pass == 0) {
                n_merges++;
                continue;
            }
            size_t o = 0;
            for (size_t i = 0; i < len; i++) {
                if (i == c)
                    tmp[o++] = ' ';
                o += gx_byte_char(p[i], tmp + o);
            }
            gguf_kv_string(b, tmp, o);
        }
    }
out:
    free(tmp);
    free(cut);
    return rc;
}

static int
gx_meta(struct gx *x, struct gguf_kvbuf *b)
{
    const struct k_config *c = &x->m->cfg;
    const char *a = "kimi-linear.";
    char key[96];

#define GX_KEY(k) (snprintf(key, sizeof(key), "%s%s", a, k), key)
    if (c->kda.n_heads != c->mla.n_heads)
        return err_set(x->err, KLI_E_UNSUPPORTED, "KDA has %d heads and MLA %d: llama.cpp's "
                       "kimi-linear has one head count", c->kda.n_heads, c->mla.n_heads);
    if (c->moe.n_experts > 0 && c->moe.layer_freq != 1)
        return err_set(x->err, KLI_E_UNSUPPORTED, "moe_layer_freq %d: llama.cpp's "
                       "kimi-linear has experts in every layer after the dense ones",
                       c->moe.layer_freq);
    gguf_kv_str(b, "general.architecture", "kimi-linear");
    gguf_kv_str(b, "general.type", "model");
    gguf_kv_str(b, "general.name", "kli convert");
    gguf_kv_u32(b, "general.quantization_version", 2);
    gguf_kv_u32(b, GX_KEY("block_count"), (uint32_t)c->n_layers);
    gguf_kv_u32(b, GX_KEY("context_length"), (uint32_t)c->ctx_max);
    gguf_kv_u32(b, GX_KEY("embedding_length"), (uint32_t)c->d_model);
    if (c->d_ff > 0)
        gguf_kv_u32(b, GX_KEY("feed_forward_length"), (uint32_t)c->d_ff);
    gguf_kv_u32(b, GX_KEY("attention.head_count"), (uint32_t)c->mla.n_heads);
    /* INT32, as llama.cpp's converter writes this array (its loader takes either) */
    gguf_kv_array(b, GX_KEY("attention.head_count_kv"), GGUF_T_I32, (uint64_t)c->n_layers);
    for (int l = 0; l < c->n_layers; l++)
        gguf_kv_elem(b, c->layer_mixer[l] == KLI_MIXER_MLA, 4);
    gguf_kv_f32(b, GX_KEY("attention.layer_norm_rms_epsilon"), c->norm_eps);
    gguf_kv_u32(b, GX_KEY("vocab_size"), (uint32_t)c->n_vocab);
    gguf_kv_u32(b, GX_KEY("ssm.conv_kernel"), (uint32_t)c->kda.conv_size);
    gguf_kv_u32(b, GX_KEY("kda.head_dim"), (uint32_t)c->kda.head_dim);
    gguf_kv_u32(b, GX_KEY("attention.kv_lora_rank"), (uint32_t)c->mla.kv_lora_rank);
    gguf_kv_u32(b, GX_KEY("rope.dimension_count"), (uint32_t)c->mla.qk_rope_dim);
    gguf_kv_u32(b, GX_KEY("attention.key_length"),
                (uint32_t)(c->mla.kv_lora_rank + c->mla.qk_rope_dim));
    gguf_kv_u32(b, GX_KEY("attention.key_length_mla"),
                (uint32_t)(c->mla.qk_nope_dim + c->mla.qk_rope_dim));
    gguf_kv_u32(b, GX_KEY("attention.value_length_mla"), (uint32_t)c->mla.v_head_dim);
    /* the converter's value_length is config.json's head_dim, hidden / heads in Kimi's
     * configs; llama.cpp's loader takes that as its default too */
    gguf_kv_u32(b, GX_KEY("attention.value_length"), (uint32_t)(c->d_model / c->mla.n_heads));
    if (c->moe.n_experts > 0) {
        gguf_kv_u32(b, GX_KEY("expert_count"), (uint32_t)c->moe.n_experts);
        gguf_kv_u32(b, GX_KEY("expert_used_count"), (uint32_t)c->moe.top_k);
        gguf_kv_u32(b, GX_KEY("expert_feed_forward_length"), (uint32_t)c->moe.d_ff);
        gguf_kv_u32(b, GX_KEY("expert_shared_count"), (uint32_t)c->moe.n_shared);
        gguf_kv_u32(b, GX_KEY("leading_dense_block_count"), (uint32_t)c->moe.first_dense);
        gguf_kv_f32(b, GX_KEY("expert_weights_scale"), c->moe.scaling);
        gguf_kv_bool(b, GX_KEY("expert_weights_norm"), c->moe.renormalize);
        gguf_kv_u32(b, GX_KEY("expert_gating_func"), c->moe.sigmoid ? 2 : 1);
        if (c->moe.n_group > 1)
            gguf_kv_u32(b, GX_KEY("expert_group_count"), (uint32_t)c->moe.n_group);
        gguf_kv_u32(b, GX_KEY("expert_group_used_count"), (uint32_t)c->moe.topk_group);
    }
#undef GX_KEY
    if (c->bos >= 0)
        gguf_kv_u32(b, "tokenizer.ggml.bos_token_id", (uint32_t)c->bos);
    if (c->eos >= 0)
        gguf_kv_u32(b, "tokenizer.ggml.eos_token_id", (uint32_t)c->eos);
    if (c->pad >= 0)
        gguf_kv_u32(b, "tokenizer.ggml.padding_token_id", (uint32_t)c->pad);
    return x->m->tok != NULL ? gx_vocab(x, b) : KLI_OK;
}

/* general.file_type: llama.cpp's name (enum llama_ftype) for the --type recipe of that
 * name, else for the ggml type that holds most of the matrices' elements. */
static void
gx_file_type(const struct gx *x, struct gguf_kvbuf *b)
{
    static const struct { const char *recipe; uint32_t type, ftype; } ft[] = {
        {"f32", GGML_F32, 0}, {"f16", GGML_F16, 1}, {"q4", GGML_Q4_0, 2},
        {NULL, GGML_Q4_1, 3}, {"q8_0", GGML_Q8_0, 7}, {NULL, GGML_Q5_0, 8},
        {NULL, GGML_Q5_1, 9}, {"q2_k", GGML_Q2_K, 10}, {"q3_k", GGML_Q3_K, 11},
        {"q3_k_m", UINT32_MAX, 12}, {"q4_k", GGML_Q4_K, 14}, {"q4_k_m", UINT32_MAX, 15},
        {"q5_k", GGML_Q5_K, 16}, {"q5_k_m", UINT32_MAX, 17}, {"q6_k", GGML_Q6_K, 18},
        {NULL, GGML_IQ4_NL, 25}, {"bf16", GGML_BF16, 32},
    };
    const size_t n_ft = sizeof(ft) / sizeof(ft[0]);
    uint64_t held[sizeof(ft) / sizeof(ft[0])] = {0};
    size_t best = 0;

    for (int64_t i = 0; i < x->n; i++) {
        for (size_t k = 0; k < n_ft; k++) {
            if ((x->it[i].kind == GX_MATRIX || x->it[i].kind == GX_STACK) &&
                x->t[i].type == ft[k].type)
                held[k] += (uint64_t)(x->t[i].ne[0] * x->t[i].ne[1] * x->t[i].ne[2]);
        }
    }
    for (size_t k = 0; k < n_ft; k++)
        best = held[k] > held[best] ? k : best;
    for (size_t k = 0; x->opt->type != NULL && k < n_ft; k++)
        best = ft[k].recipe != NULL && strcmp(ft[k].recipe, x->opt->type) == 0 ? k : best;
    gguf_kv_u32(b, "general.file_type", ft[best].ftype);
}

int
gguf_export(const struct kli_model *m, const char *out, const struct kli_convert_options *opt,
            struct kli_err *err)
{
    struct gx x = {.m = m, .wf = m->wf, .opt = opt, .out = out, .err = err};
    struct gguf_kvbuf kv = {0};
    struct gguf_writer *w = NULL;
    struct quantize_stream qs = {0};
    int64_t maxcols = 1;
    int rc;

    if ((rc = quantize_plan(opt->type, &x.plan, err)) != KLI_OK ||
        (rc = gx_meta(&x, &kv)) != KLI_OK || (rc = gx_plan(&x)) != KLI_OK)
        goto out;
    gx_file_type(&x, &kv);
    for (int64_t i = 0; i < x.n; i++) {
        if (x.it[i].kind == GX_MATRIX || x.it[i].kind == GX_STACK) {
            qs.total += x.it[i].d->nbytes * (uint64_t)x.t[i].ne[2];
            if (x.it[i].d->shape[1] > maxcols)
                maxcols = x.it[i].d->shape[1];
        }
    }
    qs.opt = opt;
    qs.write = gx_write_cb;
    if ((rc = quantize_stream_init(&qs, maxcols, err)) != KLI_OK ||
        (rc = gguf_writer_open(&w, out, &kv, x.t, x.n, err)) != KLI_OK)
        goto out;
    qs.ctx = w;
    for (int64_t i = 0; i < x.n && rc == KLI_OK; i++) {
        const struct gx_item *it = &x.it[i];
        char hf[160];
        if (it->kind == GX_MATRIX) {
            rc = quantize_tensor(&qs, x.wf, it->d, it->to, err);
        } else if (it->kind == GX_STACK) {
            for (int e = 0; e < m->cfg.moe.n_experts && rc == KLI_OK; e++) {
                snprintf(hf, sizeof(hf), "model.layers.%d.block_sparse_moe.experts.%d.%s.weight",
                         it->layer, e, gx_exp[it->role][0]);
                const struct tensor_desc *d = wfile_find(x.wf, hf);
                enum k_dtype to = d == NULL ? KLI_DT_COUNT :
                    quantize_target(x.wf, d, &x.plan, opt->keep, opt->n_keep);
                if (d == NULL || to != it->to || d->numel != it->d->numel)
                    rc = err_set(err, KLI_E_UNSUPPORTED, "%s: the experts of layer %d are "
                                 "not all of one type and shape, which a GGUF stack needs",
                                 hf, it->layer);
                else
                    rc = quantize_tensor(&qs, x.wf, d, to, err);
            }
        } else {
            rc = gx_derived(&x, w, it);
        }
    }
    if (rc == KLI_OK) {
        rc = gguf_writer_close(w, err);
        w = NULL;
    }
out:
    gguf_writer_abort(w);
    quantize_stream_free(&qs);
    free(kv.p);
    free(x.it);
    free(x.t);
    return rc;
}
