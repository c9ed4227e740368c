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

#include <cjson/cJSON.h>

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
    int oom;                      /* building the JSON texts ran out of memory */
    const struct gguf_tensor **by_name;   /* [g->n_t], sorted for gk_tensor */
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
                   "requantize with kli quantize or use Q2_K .. Q6_K, Q8_0, Q4_0 (or Q4_1, "
                   "Q5_0, Q5_1, IQ4_NL, repacked at load) or a float type", c->fname, t->name,
                   gguf_type_name(t->type));
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

/* IQ4_NL's 16 levels (ggml's table): whole numbers, so a block is a Q8_0 block exactly. */
static const int8_t gk_iq4nl[16] = {
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
};

/* One block of 32 of the fallback types llama-quantize writes where rows are not whole
 * super-blocks (Q5_0, IQ4_NL: into a Q8_0 block, exactly; Q4_1, Q5_1: into 32 floats, as
 * ggml dequantizes them). */
static void
gk_repack_block(uint32_t type, const uint8_t *p, uint8_t *q8, float *y)
{
    uint16_t h = util_rd16(p);
    int v[32];

    if (type == GGML_IQ4_NL) {
        for (int j = 0; j < 16; j++) {
            v[j] = gk_iq4nl[p[2 + j] & 15];
            v[j + 16] = gk_iq4nl[p[2 + j] >> 4];
        }
    } else {
        int q5 = type == GGML_Q5_0 || type == GGML_Q5_1;
        int off = type == GGML_Q5_1 || type == GGML_Q4_1 ? 4 : 2;   /* past d (and m) */
        uint32_t qh = q5 ? util_rd32(p + off) : 0;
        const uint8_t *qs = p + off + (q5 ? 4 : 0);
        for (int j = 0; j < 16; j++) {
            v[j] = (qs[j] & 15) | (int)(((qh >> j) << 4) & 0x10);
            v[j + 16] = (qs[j] >> 4) | (int)((qh >> (j + 12)) & 0x10);
        }
        if (type == GGML_Q5_0) {
            for (int j = 0; j < 32; j++)
                v[j] -= 16;
        }
    }
    if (q8 != NULL) {
        util_wr16(q8, h);
        for (int j = 0; j < 32; j++)
            q8[2 + j] = (uint8_t)(int8_t)v[j];
        return;
    }
    float d = f16_to_f32(h), m = f16_to_f32(util_rd16(p + 2));
    for (int j = 0; j < 32; j++)
        y[j] = (float)v[j] * d + m;
}

/* Where tensor t's data is read from, as dtype *dt: in place where kli has the block
 * layout, else repacked once into memory the view owns (Q5_0 and IQ4_NL into Q8_0, Q4_1
 * and Q5_1 into F32); any other type is refused, named with the tensor. */
static int
gk_source(struct gk_ctx *c, const struct gguf_tensor *t, enum k_dtype *dt,
          const uint8_t **data, uint64_t *nbytes)
{
    uint32_t block, bytes;

    if (gk_dtype(t->type, dt) == 0) {
        *data = t->data;
        *nbytes = t->nbytes;
        return KLI_OK;
    }
    if (t->type != GGML_Q5_0 && t->type != GGML_IQ4_NL && t->type != GGML_Q4_1 &&
        t->type != GGML_Q5_1)
        return gk_type_ok(c, t, dt);
    gguf_type_block(t->type, &block, &bytes);
    int to_q8 = t->type == GGML_Q5_0 || t->type == GGML_IQ4_NL;
    uint64_t nb = (uint64_t)t->numel / 32;
    *dt = to_q8 ? KLI_DT_Q8_0 : KLI_DT_F32;
    *nbytes = to_q8 ? nb * 34 : nb * 32 * 4;
    uint8_t *out = (uint8_t *)gk_own(c, (*nbytes + 3) / 4);
    if (out == NULL)
        return KLI_E_NOMEM;
    for (uint64_t b = 0; b < nb; b++)
        gk_repack_block(t->type, t->data + b * bytes, to_q8 ? out + b * 34 : NULL,
                        (float *)(void *)out + b * 32);
    *data = out;
    return KLI_OK;
}

/* A whole tensor in float, into memory the view owns. */
static float *
gk_floats(struct gk_ctx *c, const struct gguf_tensor *t)
{
    enum k_dtype dt;
    const uint8_t *data;
    uint64_t nbytes;
    float *p;

    if (gk_source(c, t, &dt, &data, &nbytes) != KLI_OK ||
        (p = gk_own(c, (uint64_t)t->numel)) == NULL)
        return NULL;
    dtype_to_f32(dt, data, p, t->numel);
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

static int
gk_name_cmp(const void *a, const void *b)
{
    const struct gguf_tensor *x = *(const struct gguf_tensor *const *)a;
    const struct gguf_tensor *y = *(const struct gguf_tensor *const *)b;

    return strcmp(x->name, y->name);
}

/* The tensor called `name`, by binary search (a forged file may hold millions). */
static const struct gguf_tensor *
gk_tensor(const struct gk_ctx *c, const char *name)
{
    struct gguf_tensor key = {.name = (char *)name};
    const struct gguf_tensor *kp = &key, **hit;

    if (c->g->n_t == 0)
        return NULL;
    hit = bsearch(&kp, c->by_name, (size_t)c->g->n_t, sizeof(*c->by_name), gk_name_cmp);
    return hit != NULL ? *hit : NULL;
}

/* One routed-expert matrix per expert from the stacked tensor, in place. */
static int
gk_experts(struct gk_ctx *c, const struct gguf_tensor *t, int layer, const char *w)
{
    enum k_dtype dt;
    const uint8_t *data;
    uint64_t nbytes;
    int rc;

    if ((rc = gk_source(c, t, &dt, &data, &nbytes)) != KLI_OK)
        return rc;
    if (t->ndim != 3 || t->ne[2] <= 0 || t->ne[2] > 65536 || t->numel == 0)
        return err_set(c->err, KLI_E_FORMAT, "%s: tensor %s (%d dimensions, %lld elements) "
                       "is not a stack of 1 to 65536 experts' matrices", c->fname, t->name,
                       t->ndim, (long long)t->numel);
    int64_t shape[2] = {t->ne[1], t->ne[0]};
    uint64_t slice = nbytes / (uint64_t)t->ne[2];
    for (int64_t e = 0; e < t->ne[2]; e++) {
        rc = gk_add(c, dt, data + (uint64_t)e * slice, slice, 2, shape,
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
    const struct gguf_tensor *vb = gk_tensor(c, vname);

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
    const uint8_t *data;
    uint64_t nbytes;
    const char *rest;
    int layer, rc;

    gk_shape(t, shape);
    for (size_t i = 0; i < KLI_ARRAY_LEN(gk_global); i++) {
        if (strcmp(t->name, gk_global[i][0]) == 0) {
            if ((rc = gk_source(c, t, &dt, &data, &nbytes)) != KLI_OK)
                return rc;
            return gk_add(c, dt, data, nbytes, t->ndim, shape, "%s", gk_global[i][1]);
        }
    }
    if (gk_split(t->name, &layer, &rest) != 0)
        goto unknown;
    for (size_t i = 0; i < KLI_ARRAY_LEN(gk_names); i++) {
        if (strcmp(rest, gk_names[i][0]) == 0) {
            if ((rc = gk_source(c, t, &dt, &data, &nbytes)) != KLI_OK)
                return rc;
            return gk_add(c, dt, data, nbytes, t->ndim, shape, "model.layers.%d.%s",
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

/* A number into the JSON object; a failed allocation marks the context. */
static void
gk_put(struct gk_ctx *c, cJSON *obj, const char *json, double v)
{
    if (cJSON_AddNumberToObject(obj, json, v) == NULL)
        c->oom = 1;
}

/* An integer hyper-parameter kimi-linear.KEY into `json` of obj (omitted when absent and not
 * required; NULL json: only read into *out). */
static int
gk_int(struct gk_ctx *c, cJSON *obj, const char *key, const char *json, int required,
       int64_t *out)
{
    char full[160];
    int64_t v;

    snprintf(full, sizeof(full), "kimi-linear.%s", key);
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
        gk_put(c, obj, json, (double)v);
    if (out != NULL)
        *out = v;
    return KLI_OK;
}

static int
gk_float(struct gk_ctx *c, cJSON *obj, const char *key, const char *json)
{
    char full[160];
    double v;

    snprintf(full, sizeof(full), "kimi-linear.%s", key);
    if (gguf_get_num(c->g, full, &v) != 0)
        return gguf_find(c->g, full) == NULL ? KLI_OK :
            err_set(c->err, KLI_E_FORMAT, "%s: metadata %s is not a number", c->fname, full);
    if (!isfinite(v))
        return err_set(c->err, KLI_E_RANGE, "%s: metadata %s is %g", c->fname, full, v);
    gk_put(c, obj, json, v);
    return KLI_OK;
}

/* Layer kinds from the per-layer head_count_kv: 0 marks KDA, more MLA. */
static int
gk_layers(struct gk_ctx *c, cJSON *lac, int64_t n_layers)
{
    const char *key = "kimi-linear.attention.head_count_kv";
    const struct gguf_kv *kv = gguf_find(c->g, key);
    cJSON *kda = cJSON_AddArrayToObject(lac, "kda_layers");
    cJSON *mla = cJSON_AddArrayToObject(lac, "full_attn_layers");
    int64_t h;

    if (kv == NULL || kv->type != GGUF_T_ARRAY || kv->n != (uint64_t)n_layers)
        return err_set(c->err, KLI_E_FORMAT, "%s: metadata %s must be an array of %lld "
                       "integers (0 for a KDA layer)", c->fname, key, (long long)n_layers);
    if (kda == NULL || mla == NULL)
        return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
    for (int64_t i = 0; i < n_layers; i++) {
        if (gguf_arr_int(kv, (uint64_t)i, &h) != 0 || h < 0)
            return err_set(c->err, KLI_E_FORMAT, "%s: metadata %s[%lld] is not a count",
                           c->fname, key, (long long)i);
        cJSON *n = cJSON_CreateNumber((double)(i + 1));
        if (n == NULL || !cJSON_AddItemToArray(h == 0 ? kda : mla, n)) {
            cJSON_Delete(n);
            return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
        }
    }
    return KLI_OK;
}

static int
gk_config_obj(struct gk_ctx *c, cJSON *r)
{
    const char *arch;
    uint64_t alen;
    int64_t n_layers = 0, heads = 0, klen = 0, rope = 0, v = 0;
    double x;
    int rc;

    if (gguf_get_str(c->g, "general.architecture", &arch, &alen) != 0)
        return err_set(c->err, KLI_E_FORMAT, "%s: metadata general.architecture is missing",
                       c->fname);
    if (alen != 11 || memcmp(arch, "kimi-linear", 11) != 0)
        return err_set(c->err, KLI_E_UNSUPPORTED, "%s: architecture \"%.*s\"; kli runs "
                       "\"kimi-linear\"", c->fname, (int)(alen > 40 ? 40 : alen), arch);
    if (cJSON_AddStringToObject(r, "model_type", "kimi_linear") == NULL ||
        cJSON_AddTrueToObject(r, "mla_use_nope") == NULL)
        c->oom = 1;
    if ((rc = gk_int(c, r, "block_count", "num_hidden_layers", 1, &n_layers)) ||
        (rc = gk_int(c, r, "embedding_length", "hidden_size", 1, NULL)) ||
        (rc = gk_int(c, r, "feed_forward_length", "intermediate_size", 0, NULL)) ||
        (rc = gk_int(c, r, "context_length", "model_max_length", 0, NULL)) ||
        (rc = gk_int(c, r, "attention.head_count", "num_attention_heads", 1, &heads)) ||
        (rc = gk_int(c, r, "attention.kv_lora_rank", "kv_lora_rank", 0, NULL)) ||
        (rc = gk_int(c, r, "attention.key_length_mla", NULL, 0, &klen)) ||
        (rc = gk_int(c, r, "rope.dimension_count", "qk_rope_head_dim", 0, &rope)) ||
        (rc = gk_int(c, r, "attention.value_length_mla", "v_head_dim", 0, NULL)) ||
        (rc = gk_int(c, r, "expert_count", "num_experts", 0, NULL)) ||
        (rc = gk_int(c, r, "expert_used_count", "num_experts_per_token", 0, NULL)) ||
        (rc = gk_int(c, r, "expert_feed_forward_length", "moe_intermediate_size", 0, NULL)) ||
        (rc = gk_int(c, r, "expert_shared_count", "num_shared_experts", 0, NULL)) ||
        (rc = gk_int(c, r, "leading_dense_block_count", "first_k_dense_replace", 0, NULL)) ||
        (rc = gk_int(c, r, "expert_group_count", "num_expert_group", 0, NULL)) ||
        (rc = gk_int(c, r, "expert_group_used_count", "topk_group", 0, NULL)) ||
        (rc = gk_float(c, r, "attention.layer_norm_rms_epsilon", "rms_norm_eps")) ||
        (rc = gk_float(c, r, "expert_weights_scale", "routed_scaling_factor")))
        return rc;
    if (klen > 0)
        gk_put(c, r, "qk_nope_head_dim", (double)(klen - rope));
    if ((rc = gk_int(c, r, "attention.q_lora_rank", NULL, 0, &v)) != KLI_OK)
        return rc;
    if (v > 0)
        gk_put(c, r, "q_lora_rank", (double)v);   /* refused by hparams.c, with its reason */
    /* llama.cpp: 1 softmax, 2 sigmoid */
    v = 2;
    if ((rc = gk_int(c, r, "expert_gating_func", NULL, 0, &v)) != KLI_OK)
        return rc;
    if (v != 1 && v != 2)
        return err_set(c->err, KLI_E_UNSUPPORTED, "%s: kimi-linear.expert_gating_func is "
                       "%lld (kli knows 1, softmax, and 2, sigmoid)", c->fname, (long long)v);
    if (cJSON_AddStringToObject(r, "moe_router_activation_func",
                                v == 1 ? "softmax" : "sigmoid") == NULL)
        c->oom = 1;
    if (gguf_get_int(c->g, "kimi-linear.expert_weights_norm", &v) == 0 &&
        cJSON_AddBoolToObject(r, "moe_renormalize", v != 0) == NULL)
        c->oom = 1;
    /* the vocabulary: its own key, else the embedding's rows */
    if ((rc = gk_int(c, r, "vocab_size", "vocab_size", 0, NULL)) != KLI_OK)
        return rc;
    if (gguf_find(c->g, "kimi-linear.vocab_size") == NULL) {
        const struct gguf_tensor *e = gk_tensor(c, "token_embd.weight");
        if (e == NULL || e->ndim != 2)
            return err_set(c->err, KLI_E_FORMAT, "%s: no vocab_size and no 2-D "
                           "token_embd.weight", c->fname);
        gk_put(c, r, "vocab_size", (double)e->ne[1]);
    }
    if (cJSON_AddBoolToObject(r, "tie_word_embeddings",
                              gk_tensor(c, "output.weight") == NULL) == NULL)
        c->oom = 1;
    static const char *const ids[][2] = {
        {"tokenizer.ggml.bos_token_id", "bos_token_id"},
        {"tokenizer.ggml.eos_token_id", "eos_token_id"},
        {"tokenizer.ggml.padding_token_id", "pad_token_id"},
    };
    for (size_t i = 0; i < KLI_ARRAY_LEN(ids); i++) {
        if (gguf_get_num(c->g, ids[i][0], &x) == 0 && x >= 0 && x < 1e9)
            gk_put(c, r, ids[i][1], floor(x));
    }
    cJSON *lac = cJSON_AddObjectToObject(r, "linear_attn_config");
    if (lac == NULL)
        return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
    gk_put(c, lac, "num_heads", (double)heads);
    if ((rc = gk_int(c, lac, "kda.head_dim", "head_dim", 1, NULL)) ||
        (rc = gk_int(c, lac, "ssm.conv_kernel", "short_conv_kernel_size", 0, NULL)) ||
        (rc = gk_layers(c, lac, n_layers)))
        return rc;
    return c->oom ? err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname) : KLI_OK;
}

/* The object, printed: *out is the view's (freed with it). */
static int
gk_print(struct gk_ctx *c, cJSON *obj, int rc, char **out)
{
    if (rc == KLI_OK && (*out = cJSON_PrintUnformatted(obj)) == NULL)
        rc = err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
    cJSON_Delete(obj);
    return rc;
}

static int
gk_config(struct gk_ctx *c, char **out)
{
    cJSON *r = cJSON_CreateObject();

    if (r == NULL)
        return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
    return gk_print(c, r, gk_config_obj(c, r), out);
}

/* ==== the tokenizer from the vocabulary ==== */

static const char gk_b64[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* tiktoken.model's text as it is built */
struct gk_ranks {
    char *buf;
    size_t n, cap;
    int oom;
};

static void
gk_add_text(struct gk_ranks *t, const char *p, size_t n)
{
    if (!t->oom && util_text_add(&t->buf, &t->n, &t->cap, p, n) != 0)
        t->oom = 1;
}

static void
gk_base64(struct gk_ranks *t, const uint8_t *p, size_t n)
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
        gk_add_text(t, out, 4);
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

/* The special slots' names as tokenizer_config.json's added_tokens_decoder. */
static int
gk_specials(struct gk_ctx *c, const struct gguf_kv *tok, int64_t n_base, cJSON *root)
{
    cJSON *dec = cJSON_AddObjectToObject(root, "added_tokens_decoder");
    char id_s[24], name[256];

    if (dec == NULL)
        return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
    for (uint64_t id = (uint64_t)n_base; id < tok->n; id++) {
        const char *s;
        uint64_t len;
        gguf_arr_str(tok, id, &s, &len);
        if (len == 0 || len >= sizeof(name))
            return err_set(c->err, KLI_E_FORMAT, "%s: special token %llu is %llu bytes long",
                           c->fname, (unsigned long long)id, (unsigned long long)len);
        memcpy(name, s, (size_t)len);
        name[len] = '\0';
        snprintf(id_s, sizeof(id_s), "%llu", (unsigned long long)id);
        cJSON *e = cJSON_AddObjectToObject(dec, id_s);
        if (e == NULL || cJSON_AddStringToObject(e, "content", name) == NULL ||
            cJSON_AddTrueToObject(e, "special") == NULL)
            return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
    }
    return KLI_OK;
}

static int
gk_tokenizer(struct gk_ctx *c, struct gk_ranks *ranks, char **tcfg)
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
        char num[32];
        gguf_arr_str(tok, (uint64_t)id, &s, &len);
        int64_t nb = gk_token_bytes(s, len, bytes, sizeof(bytes));
        if (nb <= 0)
            return err_set(c->err, KLI_E_FORMAT, "%s: tokenizer.ggml.tokens[%lld] is not a "
                           "byte-level BPE token", c->fname, (long long)id);
        gk_base64(ranks, bytes, (size_t)nb);
        gk_add_text(ranks, num, (size_t)snprintf(num, sizeof(num), " %lld\n", (long long)id));
    }
    if (ranks->oom)
        return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
    cJSON *root = cJSON_CreateObject();
    if (root == NULL)
        return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
    return gk_print(c, root, gk_specials(c, tok, n_base, root), tcfg);
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
    cJSON_free(v->config);
    free(v->ranks);
    cJSON_free(v->tcfg);
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
    struct gk_ranks ranks = {0};
    char *cfg = NULL, *tcfg = NULL;
    int rc;

    *out = NULL;
    c.v = k_calloc(1, sizeof(*c.v));
    if (c.v == NULL)
        return err_set(err, KLI_E_NOMEM, "%s: out of memory", fname);
    if ((rc = gguf_parse(base, size, fname, &c.v->g, err)) != KLI_OK)
        goto fail;
    c.g = c.v->g;
    c.by_name = k_mallocarray((size_t)c.g->n_t + 1, sizeof(*c.by_name));
    if (c.by_name == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "%s: out of memory", fname);
        goto fail;
    }
    for (int64_t i = 0; i < c.g->n_t; i++)
        c.by_name[i] = &c.g->t[i];
    qsort(c.by_name, (size_t)c.g->n_t, sizeof(*c.by_name), gk_name_cmp);
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
    if (c.n > 0)
        memcpy(nd + *n, c.d, (size_t)c.n * sizeof(*nd));
    *n += c.n;
    *cap = *n + 1;
    free(c.d);
    free(c.by_name);
    c.v->config = cfg;
    c.v->meta.config = cfg;
    c.v->meta.config_len = strlen(cfg);
    c.v->ranks = ranks.buf;
    c.v->tcfg = tcfg;
    if (ranks.buf != NULL) {
        c.v->meta.tok_ranks = ranks.buf;
        c.v->meta.tok_ranks_len = ranks.n;
        c.v->meta.tok_config = tcfg;
        c.v->meta.tok_config_len = strlen(tcfg);
    }
    *out = c.v;
    return KLI_OK;
fail:
    for (int64_t i = 0; i < c.n; i++)
        free((char *)c.d[i].name);
    free(c.d);
    free(c.by_name);
    cJSON_free(cfg);
    free(ranks.buf);
    cJSON_free(tcfg);
    gguf_view_free(c.v);
    return rc;
}
