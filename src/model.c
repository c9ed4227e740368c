/*
 * model.c - kli_model_open/close: reads config.json, maps the checkpoint, and binds every
 * tensor to a named field of its layer with its dtype and shape checked.
 *
 * Names are the Hugging Face checkpoint's own (doc/model.md section 2); this file is the
 * only place they live. A tensor the configuration does not use but that belongs to a layer
 * ("model.layers.*") means config.json and the checkpoint disagree, and is refused.
 */
#include "config.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "backend.h"
#include "internal.h"
#include "model.h"
#include "numa.h"
#include "xcache.h"
#include "threads.h"
#include "simd.h"
#include "tokenizer.h"
#include "util.h"

struct bind {
    struct kli_model *m;
    struct kli_err *err;
    uint8_t *used;    /* [n_tensors] */
};

static const struct tensor_desc *
bind_find(struct bind *b, const char *name)
{
    const struct tensor_desc *d = wfile_find(b->m->wf, name);

    if (d != NULL)
        b->used[wfile_index(b->m->wf, d)] = 1;
    return d;
}

static void
fmt_shape(char *buf, size_t cap, const int64_t *shape, int ndim)
{
    size_t o = 0;

    o += (size_t)snprintf(buf + o, cap - o, "[");
    for (int i = 0; i < ndim && o < cap; i++)
        o += (size_t)snprintf(buf + o, cap - o, "%s%lld", i ? "," : "", (long long)shape[i]);
    if (o < cap)
        snprintf(buf + o, cap - o, "]");
}

static int
shape_error(struct bind *b, const struct tensor_desc *d, const int64_t *want, int nwant)
{
    char has[96], exp[96];

    fmt_shape(has, sizeof(has), d->shape, d->ndim);
    fmt_shape(exp, sizeof(exp), want, nwant);
    return err_set(b->err, KLI_E_FORMAT, "weights: tensor %s has shape %s, expected %s",
                       d->name, has, exp);
}

static const struct tensor_desc *
bind_lookup(struct bind *b, const char *fmt, va_list ap, char *name, size_t cap)
{
    const struct tensor_desc *d;

    vsnprintf(name, cap, fmt, ap);
    d = bind_find(b, name);
    if (d == NULL && wfile_n_tensors(b->m->wf) == 0)
        err_set(b->err, KLI_E_FORMAT, "weights: the file holds no tensors (a vocabulary "
                "only?): missing %s", name);
    else if (d == NULL)
        err_set(b->err, KLI_E_FORMAT, "weights: missing tensor %s", name);
    return d;
}

struct convert_job {
    const struct tensor *src;
    enum k_dtype to;
    uint8_t *dst;
};

static void
convert_rows(void *ctx, int64_t r0, int64_t r1, int ith)
{
    struct convert_job *j = ctx;
    int64_t cols = j->src->shape[1];
    uint64_t rb_in = model_row_bytes(j->src), rb_out = dtype_nbytes(j->to, (uint64_t)cols);
    float row[16384];

    (void)ith;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t c = 0; c < cols; c += 16384) {
            int64_t n = cols - c < 16384 ? cols - c : 16384;
            dtype_to_f32(j->src->dtype, (const uint8_t *)j->src->data + (uint64_t)r * rb_in +
                             dtype_nbytes(j->src->dtype, (uint64_t)c), row, n);
            dtype_from_f32(j->to, row, j->dst + (uint64_t)r * rb_out +
                               dtype_nbytes(j->to, (uint64_t)c), n);
        }
    }
}

/* Converts a bound matrix to the model's load-time weight type (kli_model_options
 * .weight_type), into memory the model owns. Rows that are not whole blocks stay, or take
 * KLI_DT_K_FALLBACK when a K type was asked for (dtype_fit). */
static int
bind_convert(struct bind *b, struct tensor *t)
{
    struct kli_model *m = b->m;
    enum k_dtype to = m->convert_dt;
    /* A K type on rows that are not whole super-blocks falls back (dtype_fit). */
    to = dtype_fit(to, t->shape[1]);
    if (to == KLI_DT_COUNT || t->dtype == to)
        return KLI_OK;
    uint64_t bytes = dtype_nbytes(to, (uint64_t)t->shape[1]) * (uint64_t)t->shape[0];
    uint8_t *dst = bytes <= SIZE_MAX ? arena_alloc(&m->owned, (size_t)bytes) : NULL;
    if (dst == NULL)
        return err_set(b->err, KLI_E_NOMEM, "out of memory converting %s (%llu bytes)",
                           t->name, (unsigned long long)bytes);
    struct convert_job j = {t, to, dst};
    threads_parallel_for(t->shape[0], 64, convert_rows, &j);
    t->data = dst;
    t->dtype = to;
    return KLI_OK;
}

/* A matrix [rows][cols] in a dtype the kernels multiply with. rows or cols of -1 accept any
 * positive size (the caller reads it back from out->shape). */
static int
bind_mat(struct bind *b, struct tensor *out, int64_t rows, int64_t cols,
         const char *fmt, ...) KLI_PRINTF(5, 6);

static int
bind_mat(struct bind *b, struct tensor *out, int64_t rows, int64_t cols, const char *fmt,
         ...)
{
    char name[256];
    const struct tensor_desc *d;
    va_list ap;

    va_start(ap, fmt);
    d = bind_lookup(b, fmt, ap, name, sizeof(name));
    va_end(ap);
    if (d == NULL)
        return KLI_E_FORMAT;
    int64_t want[2] = {rows, cols};
    if (d->ndim != 2 || (rows >= 0 && d->shape[0] != rows) || (cols >= 0 && d->shape[1] != cols)
        || d->shape[0] <= 0 || d->shape[1] <= 0)
        return shape_error(b, d, want, 2);
    if (d->dtype != KLI_DT_F32 && d->dtype != KLI_DT_F16 && d->dtype != KLI_DT_BF16 &&
        d->dtype != KLI_DT_Q8_0 && d->dtype != KLI_DT_Q4 && !dtype_is_k(d->dtype))
        return err_set(b->err, KLI_E_UNSUPPORTED,
                           "weights: tensor %s has dtype %s; kli reads F32, F16, BF16, KLI_Q8_0, "
                           "KLI_Q4 and KLI_Q2_K .. KLI_Q6_K", d->name, d->dtype_name);
    if (dtype_nbytes(d->dtype, (uint64_t)d->shape[1]) == UINT64_MAX)
        return err_set(b->err, KLI_E_FORMAT,
                           "weights: tensor %s: rows of %lld are not whole %s blocks",
                           d->name, (long long)d->shape[1], d->dtype_name);
    memset(out, 0, sizeof(*out));
    out->dtype = d->dtype;
    out->ndim = 2;
    out->shape[0] = d->shape[0];
    out->shape[1] = d->shape[1];
    out->data = d->data;
    out->name = d->name;
    if (b->m->convert && strstr(d->name, "block_sparse_moe.gate.weight") == NULL)
        return bind_convert(b, out);
    return KLI_OK;
}

/* A small parameter of n elements converted to float and owned by the model. The stored
 * shape may carry unit dimensions ([1,1,32,1] for A_log); `shape`/`nshape` is the one
 * expected once they are dropped. */
static int
bind_vec(struct bind *b, float **out, const int64_t *shape, int nshape, const char *fmt, ...)
    KLI_PRINTF(5, 6);

static int
bind_vec(struct bind *b, float **out, const int64_t *shape, int nshape, const char *fmt, ...)
{
    char name[256];
    const struct tensor_desc *d;
    va_list ap;
    int64_t got[KLI_MAX_DIMS], n = 1;
    int ng = 0, ok;

    va_start(ap, fmt);
    d = bind_lookup(b, fmt, ap, name, sizeof(name));
    va_end(ap);
    if (d == NULL)
        return KLI_E_FORMAT;
    for (int i = 0; i < d->ndim; i++) {
        if (d->shape[i] != 1)
            got[ng++] = d->shape[i];
    }
    for (int i = 0; i < nshape; i++)
        n *= shape[i];
    /* Compare with unit dims dropped on both sides. */
    int64_t want[KLI_MAX_DIMS];
    int nw = 0;
    for (int i = 0; i < nshape; i++) {
        if (shape[i] != 1)
            want[nw++] = shape[i];
    }
    ok = ng == nw && d->numel == n;
    for (int i = 0; ok && i < ng; i++)
        ok = got[i] == want[i];
    if (!ok)
        return shape_error(b, d, shape, nshape);
    if (d->dtype != KLI_DT_F32 && d->dtype != KLI_DT_F16 && d->dtype != KLI_DT_BF16)
        return err_set(b->err, KLI_E_UNSUPPORTED,
                           "weights: tensor %s has dtype %s; kli reads F32, F16 and BF16",
                           d->name, d->dtype_name);
    *out = k_mallocarray((size_t)n, sizeof(float));
    if (*out == NULL)
        return err_set(b->err, KLI_E_NOMEM, "out of memory for %s", d->name);
    dtype_to_f32(d->dtype, d->data, *out, n);
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite((*out)[i]))
            return err_set(b->err, KLI_E_FORMAT,
                               "weights: tensor %s holds a non-finite value at index %lld",
                               d->name, (long long)i);
    }
    return KLI_OK;
}

#define L "model.layers.%d."

/* A SwiGLU MLP whose tensors are `prefix` + the three suffixes. */
static int
bind_ffn(struct bind *b, struct ffn_w *f, int64_t d_ff, const char *prefix,
         const char *gate, const char *up, const char *down)
{
    int64_t d = b->m->cfg.d_model;
    int rc;

    if ((rc = bind_mat(b, &f->gate, d_ff, d, "%s%s", prefix, gate)) ||
        (rc = bind_mat(b, &f->up, d_ff, d, "%s%s", prefix, up)) ||
        (rc = bind_mat(b, &f->down, d, d_ff, "%s%s", prefix, down)))
        return rc;
    return KLI_OK;
}

static int
bind_kda(struct bind *b, struct k_kda_w *w, int i)
{
    const struct k_config *c = &b->m->cfg;
    int64_t d = c->d_model, H = c->kda.n_heads, K = c->kda.head_dim, HK = H * K;
    int64_t conv_shape[3] = {HK, 1, c->kda.conv_size};
    int64_t sh_h[1] = {H}, sh_hk[1] = {HK}, sh_k[1] = {K};
    float *a_log = NULL;
    int rc;

    if ((rc = bind_mat(b, &w->q_proj, HK, d, L "self_attn.q_proj.weight", i)) ||
        (rc = bind_mat(b, &w->k_proj, HK, d, L "self_attn.k_proj.weight", i)) ||
        (rc = bind_mat(b, &w->v_proj, HK, d, L "self_attn.v_proj.weight", i)) ||
        (rc = bind_vec(b, &w->conv[0], conv_shape, 3, L "self_attn.q_conv1d.weight", i)) ||
        (rc = bind_vec(b, &w->conv[1], conv_shape, 3, L "self_attn.k_conv1d.weight", i)) ||
        (rc = bind_vec(b, &w->conv[2], conv_shape, 3, L "self_attn.v_conv1d.weight", i)) ||
        (rc = bind_vec(b, &a_log, sh_h, 1, L "self_attn.A_log", i)) ||
        (rc = bind_mat(b, &w->f_a, -1, d, L "self_attn.f_a_proj.weight", i)) ||
        (rc = bind_mat(b, &w->f_b, HK, w->f_a.shape[0], L "self_attn.f_b_proj.weight", i)) ||
        (rc = bind_vec(b, &w->dt_bias, sh_hk, 1, L "self_attn.dt_bias", i)) ||
        (rc = bind_mat(b, &w->b_proj, H, d, L "self_attn.b_proj.weight", i)) ||
        (rc = bind_mat(b, &w->g_a, -1, d, L "self_attn.g_a_proj.weight", i)) ||
        (rc = bind_mat(b, &w->g_b, HK, w->g_a.shape[0], L "self_attn.g_b_proj.weight", i)) ||
        (rc = bind_vec(b, &w->o_norm, sh_k, 1, L "self_attn.o_norm.weight", i)) ||
        (rc = bind_mat(b, &w->o_proj, d, HK, L "self_attn.o_proj.weight", i))) {
        free(a_log);
        return rc;
    }
    /* The decay scale enters only as -exp(A_log) (doc/model.md 4.3). */
    for (int64_t h = 0; h < H; h++)
        a_log[h] = -expf(a_log[h]);
    w->a_neg = a_log;
    return KLI_OK;
}

static int
bind_mla(struct bind *b, struct k_mla_w *w, int i)
{
    const struct k_config *c = &b->m->cfg;
    int64_t d = c->d_model, H = c->mla.n_heads, Lr = c->mla.kv_lora_rank;
    int64_t nope = c->mla.qk_nope_dim, rope = c->mla.qk_rope_dim, dv = c->mla.v_head_dim;
    int64_t sh_l[1] = {Lr};
    int rc;

    if ((rc = bind_mat(b, &w->q_proj, H * (nope + rope), d, L "self_attn.q_proj.weight", i)) ||
        (rc = bind_mat(b, &w->kv_a, Lr + rope, d, L "self_attn.kv_a_proj_with_mqa.weight",
                       i)) ||
        (rc = bind_vec(b, &w->kv_a_norm, sh_l, 1, L "self_attn.kv_a_layernorm.weight", i)) ||
        (rc = bind_mat(b, &w->kv_b, H * (nope + dv), Lr, L "self_attn.kv_b_proj.weight", i)) ||
        (rc = bind_mat(b, &w->o_proj, d, H * dv, L "self_attn.o_proj.weight", i)))
        return rc;

    /* The absorbed form needs W_UK transposed and W_UV per head, in float. */
    float *row = k_mallocarray((size_t)Lr, sizeof(float));
    w->w_uk_t = k_mallocarray((size_t)(H * Lr * nope), sizeof(float));
    w->w_uv = k_mallocarray((size_t)(H * dv * Lr), sizeof(float));
    if (row == NULL || w->w_uk_t == NULL || w->w_uv == NULL) {
        free(row);
        return err_set(b->err, KLI_E_NOMEM, "out of memory for MLA layer %d", i);
    }
    const uint8_t *base = w->kv_b.data;
    uint64_t rb = model_row_bytes(&w->kv_b);
    for (int64_t h = 0; h < H; h++) {
        for (int64_t r = 0; r < nope + dv; r++) {
            dtype_to_f32(w->kv_b.dtype, base + (uint64_t)(h * (nope + dv) + r) * rb, row,
                             Lr);
            if (r < nope) {
                for (int64_t l = 0; l < Lr; l++)
                    w->w_uk_t[(h * Lr + l) * nope + r] = row[l];
            } else {
                memcpy(w->w_uv + (h * dv + (r - nope)) * Lr, row, (size_t)Lr * sizeof(float));
            }
        }
    }
    free(row);
    return KLI_OK;
}

static int
bind_moe(struct bind *b, struct moe_w *w, int i)
{
    const struct k_config *c = &b->m->cfg;
    int64_t E = c->moe.n_experts, sh_e[1] = {E};
    int rc;

    if ((rc = bind_mat(b, &w->router, E, c->d_model, L "block_sparse_moe.gate.weight", i)) ||
        (rc = bind_vec(b, &w->bias, sh_e, 1, L "block_sparse_moe.gate.e_score_correction_bias",
                       i)))
        return rc;
    w->experts = k_calloc((size_t)E, sizeof(*w->experts));
    if (w->experts == NULL)
        return err_set(b->err, KLI_E_NOMEM, "out of memory for layer %d experts", i);
    char prefix[128];
    for (int e = 0; e < E; e++) {
        snprintf(prefix, sizeof(prefix), L "block_sparse_moe.experts.%d.", i, e);
        rc = bind_ffn(b, &w->experts[e], c->moe.d_ff, prefix, "w1.weight", "w3.weight",
                      "w2.weight");
        if (rc)
            return rc;
    }
    if (c->moe.n_shared > 0) {
        snprintf(prefix, sizeof(prefix), L "block_sparse_moe.shared_experts.", i);
        rc = bind_ffn(b, &w->shared, (int64_t)c->moe.d_ff * c->moe.n_shared, prefix,
                      "gate_proj.weight", "up_proj.weight", "down_proj.weight");
        if (rc)
            return rc;
    }
    return KLI_OK;
}

static int
bind_all(struct bind *b)
{
    struct kli_model *m = b->m;
    const struct k_config *c = &m->cfg;
    int64_t d = c->d_model, sh_d[1] = {d};
    int rc;

    if ((rc = bind_mat(b, &m->embed, c->n_vocab, d, "model.embed_tokens.weight")) ||
        (rc = bind_vec(b, &m->final_norm, sh_d, 1, "model.norm.weight")))
        return rc;
    if (wfile_find(m->wf, "lm_head.weight") != NULL || !c->tie_embeddings) {
        if ((rc = bind_mat(b, &m->lm_head, c->n_vocab, d, "lm_head.weight")))
            return rc;
    } else {
        m->lm_head = m->embed;
    }
    m->layers = k_calloc((size_t)c->n_layers, sizeof(*m->layers));
    if (m->layers == NULL)
        return err_set(b->err, KLI_E_NOMEM, "out of memory for layers");
    for (int i = 0; i < c->n_layers; i++) {
        struct k_layer *ly = &m->layers[i];
        ly->mixer = c->layer_mixer[i];
        ly->ffn_kind = c->layer_ffn[i];
        if ((rc = bind_vec(b, &ly->attn_norm, sh_d, 1, L "input_layernorm.weight", i)) ||
            (rc = bind_vec(b, &ly->ffn_norm, sh_d, 1, L "post_attention_layernorm.weight", i)))
            return rc;
        rc = ly->mixer == KLI_MIXER_KDA ? bind_kda(b, &ly->kda, i) : bind_mla(b, &ly->mla, i);
        if (rc)
            return rc;
        if (ly->mixer == KLI_MIXER_KDA) {
            /* One low rank per model for the gate projections keeps scratch sizing simple. */
            if (i > 0 && m->kda_rank_f != 0 &&
                (ly->kda.f_a.shape[0] != m->kda_rank_f || ly->kda.g_a.shape[0] != m->kda_rank_g))
                return err_set(b->err, KLI_E_FORMAT,
                                   "weights: layer %d (0-based) gate ranks differ from earlier "
                                   "layers", i);
            m->kda_rank_f = (int32_t)ly->kda.f_a.shape[0];
            m->kda_rank_g = (int32_t)ly->kda.g_a.shape[0];
        }
        if (ly->ffn_kind == KLI_FFN_DENSE) {
            char prefix[64];
            snprintf(prefix, sizeof(prefix), L "mlp.", i);
            rc = bind_ffn(b, &ly->ffn, c->d_ff, prefix, "gate_proj.weight", "up_proj.weight",
                          "down_proj.weight");
        }
        else
            rc = bind_moe(b, &ly->moe, i);
        if (rc)
            return rc;
    }
    /* A layer tensor nothing bound: config.json and the checkpoint disagree. */
    int64_t n = wfile_n_tensors(m->wf);
    for (int64_t t = 0; t < n; t++) {
        const struct tensor_desc *d2 = wfile_tensor(m->wf, t);
        if (!b->used[t] && strncmp(d2->name, "model.layers.", 13) == 0)
            return err_set(b->err, KLI_E_FORMAT,
                               "weights: tensor %s is not used by the configuration in "
                               "config.json (layer count, layer kinds or expert count disagree "
                               "with the checkpoint)", d2->name);
    }
    return KLI_OK;
}

#undef L

/* ==== Fingerprint ===========================================================================
 * A 64-bit FNV-1a hash that names a model for session snapshots (snapshot.c): a state is only
 * valid for the exact computation that produced it. It covers the configuration values, every
 * stored tensor's name, dtype and shape (summed per tensor, so the order of the checkpoint's
 * directory does not matter), and the effective dtype of every bound matrix, so that opening
 * the same checkpoint with another weight_type gives another fingerprint. Weight values are
 * not hashed: that would read the whole checkpoint at open. If you add a config field that
 * changes the computation, add it to model_fp_config. */

static uint64_t
model_fnv_i64(uint64_t h, int64_t v)
{
    uint8_t b[8];

    util_wr64(b, (uint64_t)v);
    return util_fnv1a(h, b, 8);
}

static uint64_t
model_fnv_f32(uint64_t h, float f)
{
    uint32_t u;

    memcpy(&u, &f, 4);
    return model_fnv_i64(h, u);
}

static uint64_t
model_fp_config(uint64_t h, const struct k_config *c)
{
    const int32_t ints[] = {
        c->d_model, c->n_layers, c->n_vocab, c->d_ff, c->ctx_max, c->tie_embeddings,
        c->bos, c->eos, c->pad, c->kda.n_heads, c->kda.head_dim, c->kda.conv_size,
        c->mla.n_heads, c->mla.kv_lora_rank, c->mla.qk_nope_dim, c->mla.qk_rope_dim,
        c->mla.v_head_dim, c->moe.n_experts, c->moe.top_k, c->moe.n_shared, c->moe.d_ff,
        c->moe.first_dense, c->moe.layer_freq, c->moe.n_group, c->moe.topk_group,
        c->moe.sigmoid, c->moe.renormalize,
    };

    for (size_t i = 0; i < KLI_ARRAY_LEN(ints); i++)
        h = model_fnv_i64(h, ints[i]);
    h = model_fnv_f32(h, c->norm_eps);
    h = model_fnv_f32(h, c->moe.scaling);
    for (int i = 0; i < c->n_layers; i++) {
        h = model_fnv_i64(h, c->layer_mixer[i]);
        h = model_fnv_i64(h, c->layer_ffn[i]);
    }
    return h;
}

/* A bound matrix as the kernels see it: name, effective dtype, shape. */
static uint64_t
model_fp_mat(uint64_t h, const struct tensor *t)
{
    if (t->name != NULL)
        h = util_fnv1a(h, t->name, strlen(t->name) + 1);
    h = model_fnv_i64(h, t->dtype);
    h = model_fnv_i64(h, t->shape[0]);
    return model_fnv_i64(h, t->shape[1]);
}

static uint64_t
model_fp_ffn(uint64_t h, const struct ffn_w *f)
{
    h = model_fp_mat(h, &f->gate);
    h = model_fp_mat(h, &f->up);
    return model_fp_mat(h, &f->down);
}

static uint64_t
model_fingerprint(const struct kli_model *m)
{
    const struct k_config *c = &m->cfg;
    uint64_t h = util_fnv1a(UTIL_FNV_BASIS, "kli-model-1", 12), dir = 0;
    int64_t n = wfile_n_tensors(m->wf);

    h = model_fp_config(h, c);
    for (int64_t i = 0; i < n; i++) {
        const struct tensor_desc *d = wfile_tensor(m->wf, i);
        uint64_t t = util_fnv1a(UTIL_FNV_BASIS, d->name, strlen(d->name) + 1);
        t = util_fnv1a(t, d->dtype_name, strlen(d->dtype_name) + 1);
        t = model_fnv_i64(t, d->ndim);
        for (int k = 0; k < d->ndim && k < KLI_MAX_DIMS; k++)
            t = model_fnv_i64(t, d->shape[k]);
        dir += t;
    }
    h = model_fnv_i64(h, (int64_t)dir);
    h = model_fp_mat(h, &m->embed);
    h = model_fp_mat(h, &m->lm_head);
    for (int i = 0; i < c->n_layers; i++) {
        const struct k_layer *ly = &m->layers[i];
        if (ly->mixer == KLI_MIXER_KDA) {
            const struct tensor *kt[] = {
                &ly->kda.q_proj, &ly->kda.k_proj, &ly->kda.v_proj, &ly->kda.f_a, &ly->kda.f_b,
                &ly->kda.b_proj, &ly->kda.g_a, &ly->kda.g_b, &ly->kda.o_proj,
            };
            for (size_t k = 0; k < KLI_ARRAY_LEN(kt); k++)
                h = model_fp_mat(h, kt[k]);
        } else {
            h = model_fp_mat(h, &ly->mla.q_proj);
            h = model_fp_mat(h, &ly->mla.kv_a);
            h = model_fp_mat(h, &ly->mla.kv_b);
            h = model_fp_mat(h, &ly->mla.o_proj);
        }
        if (ly->ffn_kind == KLI_FFN_DENSE) {
            h = model_fp_ffn(h, &ly->ffn);
            continue;
        }
        h = model_fp_mat(h, &ly->moe.router);
        for (int e = 0; e < c->moe.n_experts; e++)
            h = model_fp_ffn(h, &ly->moe.experts[e]);
        if (c->moe.n_shared > 0)
            h = model_fp_ffn(h, &ly->moe.shared);
    }
    return h;
}

void
kli_model_options_init(struct kli_model_options *opt)
{
    *opt = (struct kli_model_options){.size = sizeof(*opt), .gpu_experts = -1};
}

static void
model_free_layers(struct kli_model *m)
{
    if (m->layers == NULL)
        return;
    for (int i = 0; i < m->cfg.n_layers; i++) {
        struct k_layer *ly = &m->layers[i];
        free(ly->attn_norm);
        free(ly->ffn_norm);
        for (int j = 0; j < 3; j++)
            free(ly->kda.conv[j]);
        free(ly->kda.a_neg);
        free(ly->kda.dt_bias);
        free(ly->kda.o_norm);
        free(ly->mla.kv_a_norm);
        free(ly->mla.w_uk_t);
        free(ly->mla.w_uv);
        free(ly->moe.bias);
        free(ly->moe.experts);
    }
    free(m->layers);
}

void
kli_model_close(struct kli_model *m)
{
    if (m == NULL)
        return;
    backend_model_close(m);
    xcache_close(m->xc);
    model_free_layers(m);
    numa_close(m->numa);
    arena_free(&m->owned);
    free(m->final_norm);
    kli_tokenizer_close(m->tok);
    wfile_close(m->wf);
    free(m->path);
    free(m);
}

int
kli_model_open(struct kli_model **out, const char *path, const struct kli_model_options *opt,
               struct kli_err *err)
{
    struct kli_model_options dflt;
    struct kli_model *m;
    struct bind b = {0};
    struct stat st;
    int rc;

    if (out == NULL || path == NULL)
        return err_set(err, KLI_E_INVALID, "kli_model_open: NULL argument");
    *out = NULL;
    if ((opt = OPTS_TAKE(kli_model_options_init, dflt, opt, "kli_model_open", err)) == NULL)
        return KLI_E_INVALID;
    if (stat(path, &st) != 0)
        return err_set(err, KLI_E_IO, "%s: %s", path, strerror(errno));
    if (!S_ISDIR(st.st_mode) && !S_ISREG(st.st_mode))
        return err_set(err, KLI_E_IO, "%s: not a regular file (%s) or a directory", path,
                       file_kind(st.st_mode));
    if (!S_ISDIR(st.st_mode) && !wfile_probe(path))
        return err_set(err, KLI_E_IO, "%s: not a model directory (config.json and "
                           "safetensors expected), .kli file or GGUF file", path);
    int is_dir = S_ISDIR(st.st_mode);
    m = k_calloc(1, sizeof(*m));
    if (m == NULL || (m->path = k_strdup(path)) == NULL) {
        free(m);
        return err_set(err, KLI_E_NOMEM, "out of memory");
    }
    if (opt->weight_type != NULL) {
        if (dtype_parse(opt->weight_type, &m->convert_dt) != 0) {
            rc = err_set(err, KLI_E_RANGE, "unknown weight type \"%s\" (%s)",
                             opt->weight_type, KLI_DTYPE_NAMES);
            goto fail;
        }
        m->convert = 1;
    }
    if (opt->mem_budget > 0 && opt->numa != KLI_NUMA_NONE) {
        rc = err_set(err, KLI_E_UNSUPPORTED, "a memory budget does not combine with "
                         "--numa placement (binding reads every page in): use --numa none");
        goto fail;
    }
    /* Workers: one per physical core, pinned per the plan (numa.c, topology.c). */
    if ((rc = numa_open(&m->numa, opt, err)) != KLI_OK)
        goto fail;
    if (is_dir && (rc = hparams_load(&m->cfg, path, err)) != KLI_OK)
        goto fail;
    if ((rc = wfile_open(&m->wf, path, err)) != KLI_OK)
        goto fail;
    /* A .kli file carries config.json and the tokenizer (packed.c); a GGUF file its
     * metadata, from which gguf_kimi.c rebuilds them. */
    const struct pack_meta *pk = wfile_meta(m->wf);
    if (!is_dir && pk == NULL) {
        rc = err_set(err, KLI_E_FORMAT, "%s: not a .kli or GGUF file", path);
        goto fail;
    }
    if (!is_dir && (rc = hparams_parse(&m->cfg, pk->config, (size_t)pk->config_len, path,
                                       err)) != KLI_OK)
        goto fail;
    b.m = m;
    b.err = err;
    b.used = k_calloc((size_t)wfile_n_tensors(m->wf) + 1, 1);
    if (b.used == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory");
        goto fail;
    }
    rc = bind_all(&b);
    free(b.used);
    if (rc != KLI_OK || (rc = numa_place(m->numa, m, err)) != KLI_OK)
        goto fail;

    /* The tokenizer is optional: logits need only ids. */
    char tpath[4096];
    snprintf(tpath, sizeof(tpath), "%s/tiktoken.model", path);
    if (is_dir ? stat(tpath, &st) == 0 : pk->tok_ranks != NULL) {
        if (is_dir)
            rc = kli_tokenizer_open(&m->tok, path, err);
        else
            rc = tokenizer_open_mem(&m->tok, pk->tok_ranks, (size_t)pk->tok_ranks_len,
                                    pk->tok_config, (size_t)pk->tok_config_len, path, err);
        if (rc != KLI_OK)
            goto fail;
        if (kli_tokenizer_n_vocab(m->tok) > m->cfg.n_vocab &&
            kli_tokenizer_n_vocab(m->tok) - 2 > m->cfg.n_vocab) {
            rc = err_set(err, KLI_E_FORMAT,
                             "%s: the tokenizer has %d ids but vocab_size is %d", path,
                             kli_tokenizer_n_vocab(m->tok), m->cfg.n_vocab);
            goto fail;
        }
    }
    m->n_threads = threads_count();
    m->fingerprint = model_fingerprint(m);
    struct kli_model_options eopt = *opt;
    if (opt->mem_budget > 0) {
        if (m->convert) {
            rc = err_set(err, KLI_E_UNSUPPORTED, "a memory budget reads the experts from "
                             "the file as stored: convert the model first (kli convert -m %s "
                             "-o MODEL.kli --type %s) instead of converting at open", path,
                             opt->weight_type);
            goto fail;
        }
        if ((rc = xcache_open(&m->xc, m, opt->mem_budget, err)) != KLI_OK)
            goto fail;
        eopt.gpu_experts = 0;   /* the cache, not the GPU, holds the routed experts */
    }
    if ((rc = backend_model_open(m, &eopt, err)) != KLI_OK)
        goto fail;
    *out = m;
    return KLI_OK;
fail:
    kli_model_close(m);
    return rc;
}

int32_t kli_model_n_vocab(const struct kli_model *m) { return m->cfg.n_vocab; }
int32_t kli_model_n_layers(const struct kli_model *m) { return m->cfg.n_layers; }
int32_t kli_model_d_model(const struct kli_model *m) { return m->cfg.d_model; }
kli_token kli_model_bos(const struct kli_model *m) { return m->cfg.bos; }
kli_token kli_model_eos(const struct kli_model *m) { return m->cfg.eos; }

const struct kli_tokenizer *
kli_model_tokenizer(const struct kli_model *m)
{
    return m->tok;
}

int
kli_model_cache_stats(const struct kli_model *m, struct kli_cache_stats *st)
{
    memset(st, 0, sizeof(*st));
    if (m == NULL || m->xc == NULL)
        return -1;
    xcache_get_stats(m->xc, st);
    return 0;
}

void
kli_model_cache_reset(struct kli_model *m)
{
    if (m != NULL && m->xc != NULL)
        xcache_reset_stats(m->xc);
}

const char *
kli_simd_variant(void)
{
    return k_kernels()->name;
}
