/*
 * gguf_kimi.c - a Kimi Linear GGUF (llama.cpp's "kimi-linear" architecture) seen as the
 * checkpoint it was converted from: tensor_descs under the Hugging Face names, config.json
 * rebuilt from the metadata, tiktoken.model and tokenizer_config.json rebuilt from the
 * vocabulary. The rest of kli then reads it as it reads a .kli file (wfile_meta).
 *
 * What llama.cpp's converter changed and how it is undone (doc/formats.md section 5.2):
 *  - names: "blk.N.attn_q.weight" for "model.layers.N.self_attn.q_proj.weight", ...
 *    (gk_names); shapes are ggml's ne reversed, which is the PyTorch shape;
 *  - routed experts are stacked, one 3-D tensor per matrix with the expert outermost:
 *    each expert's slice is contiguous and becomes its own descriptor, in place;
 *  - kv_b_proj is split per head into k_b (transposed) and v_b: rebuilt as one matrix, in
 *    their type when both are F16 or both BF16, else in F32;
 *  - A_log is stored as -exp(A_log): its log(-a) is given back, in F32 (the model takes
 *    -exp of it again; the round trip is within an ulp or two);
 *  - dt_bias is "ssm_dt.bias", the router bias "exp_probs_b.bias";
 *  - conv1d weights are [1, d_inner, 1, d_conv]: the same bytes as [d_inner, 1, d_conv].
 * Tensor data stays in the mapping wherever the block layouts agree bit for bit: F32, F16,
 * BF16, Q8_0 (= kli's Q8_0), Q4_0 (= kli's Q4) and Q2_K .. Q6_K (kquant.c); any other type
 * is refused, naming it and the tensor.
 */
#include "config.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "internal.h"
#include "util.h"
#include "weights.h"

struct gguf_view {
    struct gguf *g;
    void **owned;                 /* derived tensors' bytes */
    int64_t n_owned;
    struct pack_meta meta;
    char *config, *ranks, *tcfg;
};

/* llama.cpp's per-layer names and the checkpoint's, after "blk.N." / "model.layers.N.". */
static const char *const gk_names[][2] = {
    {"attn_norm.weight", "input_layernorm.weight"},
    {"ffn_norm.weight", "post_attention_layernorm.weight"},
    {"attn_q.weight", "self_attn.q_proj.weight"},
    {"attn_k.weight", "self_attn.k_proj.weight"},
    {"attn_v.weight", "self_attn.v_proj.weight"},
    {"attn_output.weight", "self_attn.o_proj.weight"},
    {"ssm_conv1d_q.weight", "self_attn.q_conv1d.weight"},
    {"ssm_conv1d_k.weight", "self_attn.k_conv1d.weight"},
    {"ssm_conv1d_v.weight", "self_attn.v_conv1d.weight"},
    {"ssm_f_a.weight", "self_attn.f_a_proj.weight"},
    {"ssm_f_b.weight", "self_attn.f_b_proj.weight"},
    {"ssm_beta.weight", "self_attn.b_proj.weight"},
    {"ssm_g_a.weight", "self_attn.g_a_proj.weight"},
    {"ssm_g_b.weight", "self_attn.g_b_proj.weight"},
    {"ssm_dt.bias", "self_attn.dt_bias"},
    {"ssm_norm.weight", "self_attn.o_norm.weight"},
    {"attn_kv_a_mqa.weight", "self_attn.kv_a_proj_with_mqa.weight"},
    {"attn_kv_a_norm.weight", "self_attn.kv_a_layernorm.weight"},
    {"attn_kv_b.weight", "self_attn.kv_b_proj.weight"},
    {"ffn_gate.weight", "mlp.gate_proj.weight"},
    {"ffn_up.weight", "mlp.up_proj.weight"},
    {"ffn_down.weight", "mlp.down_proj.weight"},
    {"ffn_gate_inp.weight", "block_sparse_moe.gate.weight"},
    {"exp_probs_b.bias", "block_sparse_moe.gate.e_score_correction_bias"},
    {"ffn_gate_shexp.weight", "block_sparse_moe.shared_experts.gate_proj.weight"},
    {"ffn_up_shexp.weight", "block_sparse_moe.shared_experts.up_proj.weight"},
    {"ffn_down_shexp.weight", "block_sparse_moe.shared_experts.down_proj.weight"},
};

static const char *const gk_global[][2] = {
    {"token_embd.weight", "model.embed_tokens.weight"},
    {"output_norm.weight", "model.norm.weight"},
    {"output.weight", "lm_head.weight"},
};

/* The stacked experts: suffix and the checkpoint's matrix name. */
static const char *const gk_exp_names[][2] = {
    {"ffn_gate_exps.weight", "w1.weight"},
    {"ffn_up_exps.weight", "w3.weight"},
    {"ffn_down_exps.weight", "w2.weight"},
};

static int gk_dtype(uint32_t type, enum k_dtype *dt);

int
gguf_kimi_name(const char *hf, char *out, size_t cap)
{
    int layer, n = -1;

    for (size_t i = 0; i < KLI_ARRAY_LEN(gk_global); i++) {
        if (strcmp(hf, gk_global[i][1]) == 0)
            return snprintf(out, cap, "%s", gk_global[i][0]) < (int)cap ? 0 : -1;
    }
    if (sscanf(hf, "model.layers.%d.%n", &layer, &n) != 1 || n < 0 || layer < 0)
        return -1;
    for (size_t i = 0; i < KLI_ARRAY_LEN(gk_names); i++) {
        if (strcmp(hf + n, gk_names[i][1]) == 0)
            return snprintf(out, cap, "blk.%d.%s", layer, gk_names[i][0]) < (int)cap ? 0 : -1;
    }
    return -1;
}

int
gguf_type_of(enum k_dtype dt, uint32_t *type)
{
    for (uint32_t t = 0; t <= GGML_BF16; t++) {
        enum k_dtype k;
        if (gk_dtype(t, &k) == 0 && k == dt) {
            *type = t;
            return 0;
        }
    }
    return -1;
}

/* ==== descriptors ==== */

struct gk_ctx {
    const struct gguf *g;
    const char *fname;
    int32_t file;
    struct gguf_view *v;
    struct tensor_desc *d;        /* the view's descriptors */
    int64_t n, cap;
    struct kli_err *err;
};

/* The kli dtype of a ggml type that kli reads in place. @return 0, or -1. */
static int
gk_dtype(uint32_t type, enum k_dtype *dt)
{
    switch (type) {
    case GGML_F32: *dt = KLI_DT_F32; return 0;
    case GGML_F16: *dt = KLI_DT_F16; return 0;
    case GGML_BF16: *dt = KLI_DT_BF16; return 0;
    case GGML_Q8_0: *dt = KLI_DT_Q8_0; return 0;
    case GGML_Q4_0: *dt = KLI_DT_Q4; return 0;
    case GGML_Q2_K: *dt = KLI_DT_Q2_K; return 0;
    case GGML_Q3_K: *dt = KLI_DT_Q3_K; return 0;
    case GGML_Q4_K: *dt = KLI_DT_Q4_K; return 0;
    case GGML_Q5_K: *dt = KLI_DT_Q5_K; return 0;
    case GGML_Q6_K: *dt = KLI_DT_Q6_K; return 0;
    default: return -1;
    }
}

static int
gk_type_ok(struct gk_ctx *c, const struct gguf_tensor *t, enum k_dtype *dt)
{
    if (gk_dtype(t->type, dt) == 0)
        return KLI_OK;
    return err_set(c->err, KLI_E_UNSUPPORTED, "%s: tensor %s is %s, which is not supported; "
                   "requantize with kli quantize or use Q2_K .. Q6_K, Q8_0, Q4_0 or a float "
                   "type", c->fname, t->name, gguf_type_name(t->type));
}

/* Appends a descriptor named by fmt; its shape is `shape` (outermost first). */
static int
gk_add(struct gk_ctx *c, enum k_dtype dt, const void *data, uint64_t nbytes, int ndim,
       const int64_t *shape, const char *fmt, ...) KLI_PRINTF(7, 8);

static int
gk_add(struct gk_ctx *c, enum k_dtype dt, const void *data, uint64_t nbytes, int ndim,
       const int64_t *shape, const char *fmt, ...)
{
    char name[256];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    if (c->n == c->cap) {
        int64_t nc = c->cap ? c->cap * 2 : 64;
        struct tensor_desc *nd = k_reallocarray(c->d, (size_t)nc, sizeof(*nd));
        if (nd == NULL)
            return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
        c->d = nd;
        c->cap = nc;
    }
    struct tensor_desc *d = &c->d[c->n];
    memset(d, 0, sizeof(*d));
    if ((d->name = k_strdup(name)) == NULL)
        return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
    c->n++;
    d->dtype = dt;
    snprintf(d->dtype_name, sizeof(d->dtype_name), "%s", dtype_st_name(dt));
    d->ndim = ndim;
    d->numel = 1;
    for (int i = 0; i < ndim; i++) {
        d->shape[i] = shape[i];
        d->numel *= shape[i];
    }
    d->data = data;
    d->nbytes = nbytes;
    d->file = c->file;
    return KLI_OK;
}

/* The PyTorch shape of t: ne reversed. */
static void
gk_shape(const struct gguf_tensor *t, int64_t *shape)
{
    for (int i = 0; i < t->ndim; i++)
        shape[i] = t->ne[t->ndim - 1 - i];
}

/* Memory the view owns (freed with it). */
static float *
gk_own(struct gk_ctx *c, uint64_t n)
{
    void **o = k_reallocarray(c->v->owned, (size_t)c->v->n_owned + 1, sizeof(*o));
    float *p = n <= SIZE_MAX / sizeof(float) ? k_mallocarray((size_t)n, sizeof(float)) : NULL;

    if (o != NULL)
        c->v->owned = o;
    if (o == NULL || p == NULL) {
        free(p);
        err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
        return NULL;
    }
    o[c->v->n_owned++] = p;
    return p;
}

/* A whole tensor in float, into memory the view owns. */
static float *
gk_floats(struct gk_ctx *c, const struct gguf_tensor *t)
{
    enum k_dtype dt;
    float *p;

    if (gk_type_ok(c, t, &dt) != KLI_OK || (p = gk_own(c, (uint64_t)t->numel)) == NULL)
        return NULL;
    dtype_to_f32(dt, t->data, p, t->numel);
    return p;
}

/* "blk.<layer>.<rest>": the layer and the rest. @return 0, or -1 for another form. */
static int
gk_split(const char *name, int *layer, const char **rest)
{
    char *end;
    long l;

    if (strncmp(name, "blk.", 4) != 0 || name[4] < '0' || name[4] > '9')
        return -1;
    l = strtol(name + 4, &end, 10);
    if (*end != '.' || l < 0 || l > 100000)
        return -1;
    *layer = (int)l;
    *rest = end + 1;
    return 0;
}

static const struct gguf_tensor *
gk_tensor(const struct gguf *g, const char *name)
{
    for (int64_t i = 0; i < g->n_t; i++) {
        if (strcmp(g->t[i].name, name) == 0)
            return &g->t[i];
    }
    return NULL;
}

/* One routed-expert matrix per expert from the stacked tensor, in place. */
static int
gk_experts(struct gk_ctx *c, const struct gguf_tensor *t, int layer, const char *w)
{
    enum k_dtype dt;
    int rc;

    if ((rc = gk_type_ok(c, t, &dt)) != KLI_OK)
        return rc;
    if (t->ndim != 3 || t->ne[2] <= 0)
        return err_set(c->err, KLI_E_FORMAT, "%s: tensor %s has %d dimensions; stacked "
                       "experts have 3", c->fname, t->name, t->ndim);
    int64_t shape[2] = {t->ne[1], t->ne[0]};
    uint64_t slice = t->nbytes / (uint64_t)t->ne[2];
    for (int64_t e = 0; e < t->ne[2]; e++) {
        rc = gk_add(c, dt, t->data + (uint64_t)e * slice, slice, 2, shape,
                    "model.layers.%d.block_sparse_moe.experts.%lld.%s", layer, (long long)e, w);
        if (rc != KLI_OK)
            return rc;
    }
    return KLI_OK;
}

/* kv_b_proj [H*(nope+dv), Lr] from k_b (ne [nope, Lr, H]: per head W_UK transposed) and
 * v_b (ne [Lr, dv, H]), in F32. */
static int
gk_kv_b(struct gk_ctx *c, const struct gguf_tensor *kb, int layer)
{
    char vname[64];
    snprintf(vname, sizeof(vname), "blk.%d.attn_v_b.weight", layer);
    const struct gguf_tensor *vb = gk_tensor(c->g, vname);

    if (vb == NULL)
        return err_set(c->err, KLI_E_FORMAT, "%s: tensor %s has no blk.%d.attn_v_b.weight",
                       c->fname, kb->name, layer);
    int64_t nope = kb->ne[0], lr = kb->ne[1], h = kb->ne[2], dv = vb->ne[1];
    if (kb->ndim != 3 || vb->ndim != 3 || vb->ne[0] != lr || vb->ne[2] != h)
        return err_set(c->err, KLI_E_FORMAT, "%s: blk.%d: attn_k_b [%lld, %lld, %lld] and "
                       "attn_v_b [%lld, %lld, %lld] (ne) do not share kv_lora_rank and heads",
                       c->fname, layer, (long long)kb->ne[0], (long long)kb->ne[1],
                       (long long)kb->ne[2], (long long)vb->ne[0], (long long)vb->ne[1],
                       (long long)vb->ne[2]);
    float *k = gk_floats(c, kb), *v = k != NULL ? gk_floats(c, vb) : NULL;
    float *kv = v != NULL ? gk_own(c, (uint64_t)(h * (nope + dv) * lr)) : NULL;
    if (kv == NULL)
        return KLI_E_NOMEM;
    for (int64_t hh = 0; hh < h; hh++) {
        float *head = kv + hh * (nope + dv) * lr;
        for (int64_t l = 0; l < lr; l++) {
            for (int64_t r = 0; r < nope; r++)
                head[r * lr + l] = k[(hh * lr + l) * nope + r];
        }
        memcpy(head + nope * lr, v + hh * dv * lr, (size_t)(dv * lr) * sizeof(float));
    }
    int64_t shape[2] = {h * (nope + dv), lr}, n = h * (nope + dv) * lr;
    /* F16 and BF16 halves stay so (their values were only moved); the rest is F32 */
    enum k_dtype dt = KLI_DT_F32;
    void *data = kv;
    if (kb->type == vb->type && (kb->type == GGML_F16 || kb->type == GGML_BF16)) {
        dt = kb->type == GGML_F16 ? KLI_DT_F16 : KLI_DT_BF16;
        if ((data = gk_own(c, (uint64_t)(n + 1) / 2)) == NULL)
            return KLI_E_NOMEM;
        dtype_from_f32(dt, kv, data, n);
    }
    return gk_add(c, dt, data, dtype_nbytes(dt, (uint64_t)n), 2, shape,
                  "model.layers.%d.self_attn.kv_b_proj.weight", layer);
}

/* A_log from the stored -exp(A_log). */
static int
gk_a_log(struct gk_ctx *c, const struct gguf_tensor *t, int layer)
{
    float *a = gk_floats(c, t);

    if (a == NULL)
        return KLI_E_NOMEM;
    for (int64_t i = 0; i < t->numel; i++) {
        if (!(a[i] < 0))
            return err_set(c->err, KLI_E_FORMAT, "%s: tensor %s holds %g at %lld; it stores "
                           "-exp(A_log), which is negative", c->fname, t->name, a[i],
                           (long long)i);
        a[i] = logf(-a[i]);
    }
    int64_t shape[1] = {t->numel};
    return gk_add(c, KLI_DT_F32, a, (uint64_t)t->numel * 4, 1, shape,
                  "model.layers.%d.self_attn.A_log", layer);
}

static int
gk_tensor_view(struct gk_ctx *c, const struct gguf_tensor *t)
{
    int64_t shape[GGUF_MAX_DIMS];
    enum k_dtype dt;
    const char *rest;
    int layer, rc;

    gk_shape(t, shape);
    for (size_t i = 0; i < KLI_ARRAY_LEN(gk_global); i++) {
        if (strcmp(t->name, gk_global[i][0]) == 0) {
            if ((rc = gk_type_ok(c, t, &dt)) != KLI_OK)
                return rc;
            return gk_add(c, dt, t->data, t->nbytes, t->ndim, shape, "%s", gk_global[i][1]);
        }
    }
    if (gk_split(t->name, &layer, &rest) != 0)
        goto unknown;
    for (size_t i = 0; i < KLI_ARRAY_LEN(gk_names); i++) {
        if (strcmp(rest, gk_names[i][0]) == 0) {
            if ((rc = gk_type_ok(c, t, &dt)) != KLI_OK)
                return rc;
            return gk_add(c, dt, t->data, t->nbytes, t->ndim, shape, "model.layers.%d.%s",
                          layer, gk_names[i][1]);
        }
    }
    for (size_t i = 0; i < KLI_ARRAY_LEN(gk_exp_names); i++) {
        if (strcmp(rest, gk_exp_names[i][0]) == 0)
            return gk_experts(c, t, layer, gk_exp_names[i][1]);
    }
    if (strcmp(rest, "ssm_a") == 0)
        return gk_a_log(c, t, layer);
    if (strcmp(rest, "attn_k_b.weight") == 0)
        return gk_kv_b(c, t, layer);
    if (strcmp(rest, "attn_v_b.weight") == 0)
        return KLI_OK;    /* read with attn_k_b */
unknown:
    return err_set(c->err, KLI_E_FORMAT, "%s: tensor %s is not part of a Kimi Linear model",
                   c->fname, t->name);
}

/* ==== config.json from the metadata ==== */

struct gk_text {
    char *buf;
    size_t n, cap;
    int oom;
};

static void
gk_printf(struct gk_text *t, const char *fmt, ...) KLI_PRINTF(2, 3);

static void
gk_printf(struct gk_text *t, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    int len;

    va_start(ap, fmt);
    len = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (len < 0 || (size_t)len >= sizeof(tmp) ||
        util_text_add(&t->buf, &t->n, &t->cap, tmp, (size_t)len) != 0)
        t->oom = 1;
}

/* An integer hyper-parameter ARCH.key into `json` (omitted when absent and not required). */
static int
gk_int(struct gk_ctx *c, struct gk_text *t, const char *arch, const char *key,
       const char *json, int required, int64_t *out)
{
    char full[160];
    int64_t v;

    snprintf(full, sizeof(full), "%s.%s", arch, key);
    if (gguf_get_int(c->g, full, &v) != 0) {
        if (gguf_find(c->g, full) != NULL)
            return err_set(c->err, KLI_E_FORMAT, "%s: metadata %s is not an integer",
                           c->fname, full);
        if (required)
            return err_set(c->err, KLI_E_FORMAT, "%s: metadata %s is missing", c->fname,
                           full);
        return KLI_OK;
    }
    if (v < -1 || v > INT32_MAX)
        return err_set(c->err, KLI_E_RANGE, "%s: metadata %s is %lld", c->fname, full,
                       (long long)v);
    if (json != NULL)
        gk_printf(t, ",\"%s\":%lld", json, (long long)v);
    if (out != NULL)
        *out = v;
    return KLI_OK;
}

static int
gk_float(struct gk_ctx *c, struct gk_text *t, const char *arch, const char *key,
         const char *json)
{
    char full[160];
    double v;

    snprintf(full, sizeof(full), "%s.%s", arch, key);
    if (gguf_get_num(c->g, full, &v) != 0)
        return gguf_find(c->g, full) == NULL ? KLI_OK :
            err_set(c->err, KLI_E_FORMAT, "%s: metadata %s is not a number", c->fname, full);
    if (!isfinite(v))
        return err_set(c->err, KLI_E_RANGE, "%s: metadata %s is %g", c->fname, full, v);
    gk_printf(t, ",\"%s\":%.9g", json, v);
    return KLI_OK;
}

/* Layer kinds from the per-layer head_count_kv: 0 marks KDA, more MLA. */
static int
gk_layers(struct gk_ctx *c, struct gk_text *t, const char *arch, int64_t n_layers)
{
    char full[160];
    const struct gguf_kv *kv;
    int64_t h;

    snprintf(full, sizeof(full), "%s.attention.head_count_kv", arch);
    kv = gguf_find(c->g, full);
    if (kv == NULL || kv->type != GGUF_T_ARRAY || kv->n != (uint64_t)n_layers)
        return err_set(c->err, KLI_E_FORMAT, "%s: metadata %s must be an array of %lld "
                       "integers (0 for a KDA layer)", c->fname, full, (long long)n_layers);
    for (int pass = 0; pass < 2; pass++) {
        int first = 1;
        gk_printf(t, ",\"%s\":[", pass == 0 ? "kda_layers" : "full_attn_layers");
        for (int64_t i = 0; i < n_layers; i++) {
            if (gguf_arr_int(kv, (uint64_t)i, &h) != 0 || h < 0)
                return err_set(c->err, KLI_E_FORMAT, "%s: metadata %s[%lld] is not a count",
                               c->fname, full, (long long)i);
            if ((h == 0) == (pass == 0)) {
                gk_printf(t, "%s%lld", first ? "" : ",", (long long)i + 1);
                first = 0;
            }
        }
        gk_printf(t, "]");
    }
    return KLI_OK;
}

static int
gk_config(struct gk_ctx *c, struct gk_text *t)
{
    const char *arch;
    uint64_t alen;
    char a[64];
    int64_t n_layers = 0, heads = 0, klen = 0, rope = 0, v = 0;
    double x;
    int rc;

    if (gguf_get_str(c->g, "general.architecture", &arch, &alen) != 0)
        return err_set(c->err, KLI_E_FORMAT, "%s: metadata general.architecture is missing",
                       c->fname);
    if (alen != 11 || memcmp(arch, "kimi-linear", 11) != 0)
        return err_set(c->err, KLI_E_UNSUPPORTED, "%s: architecture \"%.*s\"; kli runs "
                       "\"kimi-linear\"", c->fname, (int)(alen > 40 ? 40 : alen), arch);
    snprintf(a, sizeof(a), "kimi-linear");
    gk_printf(t, "{\"model_type\":\"kimi_linear\",\"mla_use_nope\":true");
    if ((rc = gk_int(c, t, a, "block_count", "num_hidden_layers", 1, &n_layers)) ||
        (rc = gk_int(c, t, a, "embedding_length", "hidden_size", 1, NULL)) ||
        (rc = gk_int(c, t, a, "feed_forward_length", "intermediate_size", 0, NULL)) ||
        (rc = gk_int(c, t, a, "context_length", "model_max_length", 0, NULL)) ||
        (rc = gk_int(c, t, a, "attention.head_count", "num_attention_heads", 1, &heads)) ||
        (rc = gk_int(c, t, a, "attention.kv_lora_rank", "kv_lora_rank", 0, NULL)) ||
        (rc = gk_int(c, t, a, "attention.key_length_mla", NULL, 0, &klen)) ||
        (rc = gk_int(c, t, a, "rope.dimension_count", "qk_rope_head_dim", 0, &rope)) ||
        (rc = gk_int(c, t, a, "attention.value_length_mla", "v_head_dim", 0, NULL)) ||
        (rc = gk_int(c, t, a, "expert_count", "num_experts", 0, NULL)) ||
        (rc = gk_int(c, t, a, "expert_used_count", "num_experts_per_token", 0, NULL)) ||
        (rc = gk_int(c, t, a, "expert_feed_forward_length", "moe_intermediate_size", 0,
                     NULL)) ||
        (rc = gk_int(c, t, a, "expert_shared_count", "num_shared_experts", 0, NULL)) ||
        (rc = gk_int(c, t, a, "leading_dense_block_count", "first_k_dense_replace", 0,
                     NULL)) ||
        (rc = gk_int(c, t, a, "expert_group_count", "num_expert_group", 0, NULL)) ||
        (rc = gk_int(c, t, a, "expert_group_used_count", "topk_group", 0, NULL)) ||
        (rc = gk_float(c, t, a, "attention.layer_norm_rms_epsilon", "rms_norm_eps")) ||
        (rc = gk_float(c, t, a, "expert_weights_scale", "routed_scaling_factor")))
        return rc;
    if (klen > 0)
        gk_printf(t, ",\"qk_nope_head_dim\":%lld", (long long)(klen - rope));
    if ((rc = gk_int(c, t, a, "attention.q_lora_rank", NULL, 0, &v)) != KLI_OK)
        return rc;
    if (v > 0)
        gk_printf(t, ",\"q_lora_rank\":%lld", (long long)v);
    /* llama.cpp: 1 softmax, 2 sigmoid */
    v = 2;
    if ((rc = gk_int(c, t, a, "expert_gating_func", NULL, 0, &v)) != KLI_OK)
        return rc;
    gk_printf(t, ",\"moe_router_activation_func\":\"%s\"", v == 1 ? "softmax" : "sigmoid");
    if (v != 1 && v != 2)
        return err_set(c->err, KLI_E_UNSUPPORTED, "%s: %s.expert_gating_func is %lld (kli "
                       "knows 1, softmax, and 2, sigmoid)", c->fname, a, (long long)v);
    v = 1;
    if (gguf_get_int(c->g, "kimi-linear.expert_weights_norm", &v) == 0)
        gk_printf(t, ",\"moe_renormalize\":%s", v ? "true" : "false");
    /* the vocabulary: its own key, else the embedding's rows */
    if ((rc = gk_int(c, t, a, "vocab_size", "vocab_size", 0, &v)) != KLI_OK)
        return rc;
    if (gguf_find(c->g, "kimi-linear.vocab_size") == NULL) {
        const struct gguf_tensor *e = gk_tensor(c->g, "token_embd.weight");
        if (e == NULL || e->ndim != 2)
            return err_set(c->err, KLI_E_FORMAT, "%s: no vocab_size and no 2-D "
                           "token_embd.weight", c->fname);
        gk_printf(t, ",\"vocab_size\":%lld", (long long)e->ne[1]);
    }
    gk_printf(t, ",\"tie_word_embeddings\":%s",
              gk_tensor(c->g, "output.weight") == NULL ? "true" : "false");
    static const char *const ids[][2] = {
        {"tokenizer.ggml.bos_token_id", "bos_token_id"},
        {"tokenizer.ggml.eos_token_id", "eos_token_id"},
        {"tokenizer.ggml.padding_token_id", "pad_token_id"},
    };
    for (size_t i = 0; i < KLI_ARRAY_LEN(ids); i++) {
        if (gguf_get_num(c->g, ids[i][0], &x) == 0 && x >= 0 && x < 1e9)
            gk_printf(t, ",\"%s\":%lld", ids[i][1], (long long)x);
    }
    gk_printf(t, ",\"linear_attn_config\":{\"num_heads\":%lld", (long long)heads);
    if ((rc = gk_int(c, t, a, "kda.head_dim", "head_dim", 1, NULL)) ||
        (rc = gk_int(c, t, a, "ssm.conv_kernel", "short_conv_kernel_size", 0, NULL)) ||
        (rc = gk_layers(c, t, a, n_layers)))
        return rc;
    gk_printf(t, "}}\n");
    return t->oom ? err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname) : KLI_OK;
}

/* ==== the tokenizer from the vocabulary ==== */

static const char gk_b64[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static void
gk_base64(struct gk_text *t, const uint8_t *p, size_t n)
{
    char out[4];

    for (size_t i = 0; i < n; i += 3) {
        uint32_t w = (uint32_t)p[i] << 16;
        size_t k = n - i < 3 ? n - i : 3;
        if (k > 1)
            w |= (uint32_t)p[i + 1] << 8;
        if (k > 2)
            w |= p[i + 2];
        for (int j = 0; j < 4; j++)
            out[j] = (size_t)j <= k ? gk_b64[(w >> (18 - 6 * j)) & 63] : '=';
        if (util_text_add(&t->buf, &t->n, &t->cap, out, 4) != 0)
            t->oom = 1;
    }
}

/* GPT-2's byte-to-character map, inverted: the byte a code point stands for, or -1.
 * Printable bytes (33..126, 161..172, 174..255) stand for themselves; the other 68, in
 * increasing order, are the code points 256, 257, ... */
static int
gk_unbyte(uint32_t cp)
{
    if ((cp >= 33 && cp <= 126) || (cp >= 161 && cp <= 172) || (cp >= 174 && cp <= 255))
        return (int)cp;
    if (cp < 256 || cp >= 256 + 68)
        return -1;
    uint32_t k = cp - 256;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
        if (!printable && k-- == 0)
            return b;
    }
    return -1;
}

/* A GPT-2-mapped token string back to its bytes. @return the length, or -1. */
static int64_t
gk_token_bytes(const char *s, uint64_t len, uint8_t *out, uint64_t cap)
{
    uint64_t o = 0;

    for (uint64_t i = 0; i < len;) {
        uint8_t b0 = (uint8_t)s[i];
        uint32_t cp;
        int n;
        if (b0 < 0x80) { cp = b0; n = 1; }
        else if ((b0 & 0xe0) == 0xc0 && i + 1 < len) {
            cp = (uint32_t)(b0 & 0x1f) << 6 | ((uint8_t)s[i + 1] & 0x3f);
            n = 2;
        } else {
            return -1;
        }
        int b = gk_unbyte(cp);
        if (b < 0 || o == cap)
            return -1;
        out[o++] = (uint8_t)b;
        i += (uint64_t)n;
    }
    return (int64_t)o;
}

static int
gk_tokenizer(struct gk_ctx *c, struct gk_text *ranks, struct gk_text *tcfg)
{
    const struct gguf_kv *tok = gguf_find(c->g, "tokenizer.ggml.tokens");
    const struct gguf_kv *typ = gguf_find(c->g, "tokenizer.ggml.token_type");
    const char *model = NULL;
    uint64_t mlen = 0;
    uint8_t bytes[1024];
    int64_t n_base = 0, tt;

    if (tok == NULL)
        return KLI_OK;   /* no vocabulary: logits only */
    if (gguf_get_str(c->g, "tokenizer.ggml.model", &model, &mlen) != 0 || mlen != 4 ||
        memcmp(model, "gpt2", 4) != 0 || tok->elem != GGUF_T_STRING || typ == NULL ||
        typ->type != GGUF_T_ARRAY || typ->n != tok->n)
        return err_set(c->err, KLI_E_UNSUPPORTED, "%s: the vocabulary is not a \"gpt2\" "
                       "(byte-level BPE) tokenizer.ggml.tokens with a token_type per token",
                       c->fname);
    /* the ranks: the leading run of normal tokens (rank = id); then the special slots */
    while ((uint64_t)n_base < tok->n && gguf_arr_int(typ, (uint64_t)n_base, &tt) == 0 &&
           tt == 1)
        n_base++;
    for (int64_t id = 0; id < n_base; id++) {
        const char *s;
        uint64_t len;
        int64_t nb;
        char num[32];
        gguf_arr_str(tok, (uint64_t)id, &s, &len);
        nb = gk_token_bytes(s, len, bytes, sizeof(bytes));
        if (nb <= 0)
            return err_set(c->err, KLI_E_FORMAT, "%s: tokenizer.ggml.tokens[%lld] is not a "
                           "byte-level BPE token", c->fname, (long long)id);
        gk_base64(ranks, bytes, (size_t)nb);
        int len2 = snprintf(num, sizeof(num), " %lld\n", (long long)id);
        if (util_text_add(&ranks->buf, &ranks->n, &ranks->cap, num, (size_t)len2) != 0)
            ranks->oom = 1;
    }
    gk_printf(tcfg, "{\"added_tokens_decoder\":{");
    for (uint64_t id = (uint64_t)n_base; id < tok->n; id++) {
        const char *s;
        uint64_t len;
        gguf_arr_str(tok, id, &s, &len);
        if (len == 0 || len > 200)
            return err_set(c->err, KLI_E_FORMAT, "%s: special token %llu is %llu bytes long",
                           c->fname, (unsigned long long)id, (unsigned long long)len);
        gk_printf(tcfg, "%s\"%llu\":{\"content\":\"", id > (uint64_t)n_base ? "," : "",
                  (unsigned long long)id);
        for (uint64_t i = 0; i < len; i++) {
            uint8_t ch = (uint8_t)s[i];
            if (ch == '"' || ch == '\\')
                gk_printf(tcfg, "\\%c", ch);
            else if (ch < 0x20)
                gk_printf(tcfg, "\\u%04x", ch);
            else
                gk_printf(tcfg, "%c", ch);
        }
        gk_printf(tcfg, "\",\"special\":true}");
    }
    gk_printf(tcfg, "}}\n");
    if (ranks->oom || tcfg->oom)
        return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
    return KLI_OK;
}

/* ==== the view ==== */

void
gguf_view_free(struct gguf_view *v)
{
    if (v == NULL)
        return;
    for (int64_t i = 0; i < v->n_owned; i++)
        free(v->owned[i]);
    free(v->owned);
    free(v->config);
    free(v->ranks);
    free(v->tcfg);
    gguf_free(v->g);
    free(v);
}

const struct pack_meta *
gguf_view_meta(const struct gguf_view *v)
{
    return v == NULL ? NULL : &v->meta;
}

int
gguf_kimi_open(const uint8_t *base, uint64_t size, const char *fname, int32_t file,
               struct tensor_desc **descs, int64_t *n, int64_t *cap, struct gguf_view **out,
               struct kli_err *err)
{
    struct gk_ctx c = {.fname = fname, .file = file, .err = err};
    struct gk_text cfg = {0}, ranks = {0}, tcfg = {0};
    int rc;

    *out = NULL;
    c.v = k_calloc(1, sizeof(*c.v));
    if (c.v == NULL)
        return err_set(err, KLI_E_NOMEM, "%s: out of memory", fname);
    if ((rc = gguf_parse(base, size, fname, &c.v->g, err)) != KLI_OK)
        goto fail;
    c.g = c.v->g;
    if ((rc = gk_config(&c, &cfg)) != KLI_OK || (rc = gk_tokenizer(&c, &ranks, &tcfg)) != KLI_OK)
        goto fail;
    for (int64_t i = 0; i < c.g->n_t; i++) {
        if ((rc = gk_tensor_view(&c, &c.g->t[i])) != KLI_OK)
            goto fail;
    }
    /* hand the descriptors over: appended to the caller's array */
    struct tensor_desc *nd = k_reallocarray(*descs, (size_t)(*n + c.n + 1), sizeof(*nd));
    if (nd == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "%s: out of memory", fname);
        goto fail;
    }
    *descs = nd;
    memcpy(nd + *n, c.d, (size_t)c.n * sizeof(*nd));
    *n += c.n;
    *cap = *n + 1;
    free(c.d);
    c.v->config = cfg.buf;
    c.v->meta.config = cfg.buf;
    c.v->meta.config_len = cfg.n;
    c.v->ranks = ranks.buf;
    c.v->tcfg = tcfg.buf;
    if (ranks.buf != NULL) {
        c.v->meta.tok_ranks = ranks.buf;
        c.v->meta.tok_ranks_len = ranks.n;
        c.v->meta.tok_config = tcfg.buf;
        c.v->meta.tok_config_len = tcfg.n;
    }
    *out = c.v;
    return KLI_OK;
fail:
    for (int64_t i = 0; i < c.n; i++)
        free((char *)c.d[i].name);
    free(c.d);
    free(cfg.buf);
    free(ranks.buf);
    free(tcfg.buf);
    gguf_view_free(c.v);
    return rc;
}
