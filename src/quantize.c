/*
 * quantize.c - kli_quantize: a checkpoint with its weight matrices in another dtype.
 *
 * Streaming: one tensor at a time, a bounded number of rows at a time, so peak memory is
 * a few megabytes whatever the model size. The output is written to a temporary file and
 * renamed at the end (stwrite.c).
 */
#include "config.h"

#include <errno.h>
#include <fnmatch.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "imatrix.h"
#include "internal.h"
#include "quantize.h"
#include "threads.h"
#include "wbuf.h"
#include "weights.h"

void
kli_quantize_options_init(struct kli_convert_options *opt)
{
    *opt = (struct kli_convert_options){.size = sizeof(*opt), .type = "q8_0"};
}

/* ==== classes and recipes ================================================================= */

enum quant_class
quantize_class(const struct wfile *wf, const struct tensor_desc *d)
{
    const char *name = d->name, *sa;

    if (strstr(name, "embed_tokens") != NULL)
        return QC_EMBED;
    if (strstr(name, "lm_head") != NULL)
        return QC_LM_HEAD;
    if (strstr(name, ".shared_experts.") != NULL)
        return QC_SHARED;
    if (strstr(name, ".experts.") != NULL)
        return QC_EXPERTS;
    if (strstr(name, "block_sparse_moe.gate.weight") != NULL)
        return QC_ROUTER;
    if (strstr(name, ".mlp.") != NULL)
        return QC_DENSE;
    if ((sa = strstr(name, ".self_attn.")) == NULL || strstr(sa, "proj") == NULL)
        return QC_OTHER;
    /* An MLA layer is the one with a kv_a_proj_with_mqa (doc/model.md 2). */
    char mla[512];
    int pl = (int)(sa - name);
    if (pl > 400)
        return QC_KDA;
    snprintf(mla, sizeof(mla), "%.*s.self_attn.kv_a_proj_with_mqa.weight", pl, name);
    return wfile_find(wf, mla) != NULL ? QC_MLA : QC_KDA;
}

const char *
quantize_class_name(enum quant_class c)
{
    static const char *const names[QC_N] = {
        "experts", "shared expert", "KDA attention", "MLA attention", "dense ffn", "router",
        "embeddings", "lm_head", "norms etc.",
    };
    return c < QC_N ? names[c] : "?";
}

/*
 * The recipes of --type: the routed experts at the named width, each other class at the
 * narrowest type that the measurement of doc/quality.md ("Recipes") warrants. On the nano
 * model each class alone was quantized to each candidate type (the rest f32) for its mean
 * KLD; a recipe is the assignment with the fewest bits per weight on Kimi-Linear-48B-A3B
 * whose summed KLDs stay within twice the experts' own (the rest adds no more than the
 * experts do). q6_k cannot meet that (the rest at q8_0 adds 1.5 times what q6_k experts
 * do): the rest is q8_0, the widest candidate; q8_0 is q8_0 throughout. The router stays as
 * stored: it picks the experts, and it is 0.03% of the 48B model. Rows that are not whole
 * super-blocks take KLI_DT_K_FALLBACK (dtype_fit): on the 48B model only KDA's f_b_proj and
 * g_b_proj (128 columns); on the nano model also the experts' and the shared expert's down
 * projections (64) and MLA's kv_b_proj (128).
 */
#define S_ KLI_DT_COUNT     /* as stored */
#define Q2 KLI_DT_Q2_K
#define Q3 KLI_DT_Q3_K
#define Q4 KLI_DT_Q4_K
#define Q5 KLI_DT_Q5_K
#define Q6 KLI_DT_Q6_K
#define Q8 KLI_DT_Q8_0
static const struct {
    const char *name;
    enum k_dtype type[QC_N];
} quant_recipes[] = {
    /*           experts shared KDA  MLA  dense router embed lm_head other */
    {"q2_k",   {Q2,     Q3,    Q4,  Q2,  Q4,   S_,    Q4,   Q3,     S_}},
    {"q3_k_m", {Q3,     Q4,    Q5,  Q3,  Q5,   S_,    Q5,   Q4,     S_}},
    {"q4_k_m", {Q4,     Q5,    Q6,  Q4,  Q8,   S_,    Q6,   Q5,     S_}},
    {"q5_k_m", {Q5,     Q6,    Q8,  Q6,  Q8,   S_,    Q8,   Q6,     S_}},
    {"q6_k",   {Q6,     Q8,    Q8,  Q8,  Q8,   S_,    Q8,   Q8,     S_}},
    {"q8_0",   {Q8,     Q8,    Q8,  Q8,  Q8,   S_,    Q8,   Q8,     S_}},
};
#undef S_
#undef Q2
#undef Q3
#undef Q4
#undef Q5
#undef Q6
#undef Q8

int
quantize_plan(const char *type, struct quant_plan *p, struct kli_err *err)
{
    enum k_dtype dt = KLI_DT_COUNT;

    p->recipe = 0;
    for (size_t r = 0; type != NULL && r < KLI_ARRAY_LEN(quant_recipes); r++) {
        if (strcasecmp(type, quant_recipes[r].name) == 0) {
            memcpy(p->type, quant_recipes[r].type, sizeof(p->type));
            p->recipe = 1;
            return KLI_OK;
        }
    }
    if (type != NULL && dtype_parse(type, &dt) != 0)
        return err_set(err, KLI_E_RANGE, "unknown weight type \"%s\": a recipe (%s) or a "
                           "type (%s)", type, KLI_RECIPE_NAMES, KLI_DTYPE_NAMES);
    for (int c = 0; c < QC_N; c++)
        p->type[c] = c == QC_ROUTER || c == QC_OTHER ? KLI_DT_COUNT : dt;
    return KLI_OK;
}

/* Tensors that stay as stored whatever the plan: what the math reads element by element
 * (the router's staying is the plan's: quant_recipes). */
static int
quant_keep_default(const struct tensor_desc *d)
{
    static const char *const keep[] = {
        "norm.weight", "layernorm.weight", "conv1d.weight", "A_log", "dt_bias",
        "e_score_correction_bias",
    };
    size_t nl = strlen(d->name);

    if (d->ndim != 2 || d->shape[1] % 32 != 0 || d->dtype == KLI_DT_OTHER)
        return 1;
    for (size_t i = 0; i < KLI_ARRAY_LEN(keep); i++) {
        size_t kl = strlen(keep[i]);
        if (nl >= kl && strcmp(d->name + nl - kl, keep[i]) == 0)
            return 1;
    }
    return 0;
}

int
quantize_check_rules(const char *const *keep, int32_t n_keep, struct kli_err *err)
{
    for (int32_t i = 0; i < n_keep; i++) {
        const char *eq = strrchr(keep[i], '=');
        enum k_dtype dt;
        if (eq == NULL || eq == keep[i] ||
            (strcmp(eq + 1, "keep") != 0 && dtype_parse(eq + 1, &dt) != 0))
            return err_set(err, KLI_E_RANGE, "--keep \"%s\": expected GLOB=TYPE with TYPE "
                               "keep or one of %s", keep[i], KLI_DTYPE_NAMES);
    }
    return KLI_OK;
}

enum k_dtype
quantize_target(const struct wfile *wf, const struct tensor_desc *d,
                const struct quant_plan *p, const char *const *keep, int32_t n_keep)
{
    enum k_dtype want = p->type[quantize_class(wf, d)];
    enum k_dtype dt = want == KLI_DT_COUNT || quant_keep_default(d) ? d->dtype : want;

    for (int32_t k = 0; k < n_keep; k++) {
        const char *eq = strrchr(keep[k], '=');
        char glob[512];
        size_t gl = (size_t)(eq - keep[k]);
        if (gl >= sizeof(glob))
            gl = sizeof(glob) - 1;
        memcpy(glob, keep[k], gl);
        glob[gl] = '\0';
        if (fnmatch(glob, d->name, 0) == 0) {
            if (strcmp(eq + 1, "keep") == 0)
                dt = d->dtype;
            else
                dtype_parse(eq + 1, &dt);
            break;
        }
    }
    /* A block type needs whole blocks per row (a K type falls back to KLI_DT_K_FALLBACK
     * where that fits, dtype_fit); a float source type needs a float input. */
    int64_t cols = d->ndim > 0 ? d->shape[d->ndim - 1] : 1;
    if (d->dtype == KLI_DT_OTHER)
        return KLI_DT_OTHER;
    if (dt == d->dtype)
        return dt;
    dt = dtype_fit(dt, cols);
    return dt == KLI_DT_COUNT ? d->dtype : dt;
}

/* Writes `len` bytes of `text` to out/name; nothing when text is NULL. */
static int
quant_write(const char *out, const char *name, const char *text, uint64_t len,
            struct kli_err *err)
{
    char dst[4096];

    if (text == NULL)
        return KLI_OK;
    if (len > SIZE_MAX)
        return err_set(err, KLI_E_NOMEM, "%s/%s: too large", out, name);
    snprintf(dst, sizeof(dst), "%s/%s", out, name);
    return k_write_file(dst, text, (size_t)len, err);
}

/* Copies a small file if it exists: read whole, then written as a new file, so that even
 * a destination that is the source would keep its contents. */
static int
quant_copy(const char *in, const char *out, const char *name, int required, struct kli_err *err)
{
    char src[4096];
    char *text = NULL;
    size_t len = 0;
    struct stat st;
    int rc;

    snprintf(src, sizeof(src), "%s/%s", in, name);
    if (!required && stat(src, &st) != 0 && errno == ENOENT)
        return KLI_OK;
    /* A regular file, read whole under a cap (src/file.c): a FIFO in the model directory
     * would block open(), /dev/zero would never end. */
    if ((rc = file_read(src, (uint64_t)1 << 30, &text, &len, err)) != KLI_OK)
        return rc;
    rc = quant_write(out, name, text, len, err);
    free(text);
    return rc;
}

/* Refuses an output directory that is the input or holds the input's files. */
static int
quant_check_output(const char *in, const char *out, struct kli_err *err)
{
    static const char *const names[] = {
        "config.json", "tiktoken.model", "tokenizer_config.json", "model.safetensors",
        "model.safetensors.index.json",
    };
    char path[4096];
    int rc;

    if ((rc = kli_output_check(out, in, err)) != KLI_OK)
        return rc;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", out, names[i]);
        if ((rc = kli_output_check(path, in, err)) != KLI_OK)
            return rc;
    }
    return KLI_OK;
}

/* ==== streaming one tensor ================================================================ */

#define QUANT_COPY_CHUNK (8u << 20)   /* bytes copied between ticks */

int
quantize_stream_init(struct quantize_stream *qs, int64_t max_cols, struct kli_err *err)
{
    if (max_cols < 1)
        max_cols = 1;
    qs->rows = (1 << 20) / max_cols > 0 ? (1 << 20) / max_cols : 1;
    qs->fbuf = k_mallocarray((size_t)(qs->rows * max_cols), sizeof(float));
    qs->qbuf = k_mallocarray((size_t)(qs->rows * max_cols), 4);
    if (qs->fbuf == NULL || qs->qbuf == NULL) {
        quantize_stream_free(qs);
        return err_set(err, KLI_E_NOMEM, "out of memory for conversion buffers");
    }
    return KLI_OK;
}

void
quantize_stream_free(struct quantize_stream *qs)
{
    free(qs->fbuf);
    free(qs->qbuf);
    qs->fbuf = NULL;
    qs->qbuf = NULL;
}

static void
quant_drop(const struct wfile *wf, const struct tensor_desc *d, uint64_t off, uint64_t n)
{
    struct tensor_desc part = *d;

    part.data = (const uint8_t *)d->data + off;
    part.nbytes = n;
    wfile_dontneed(wf, &part);
}

/* The progress of the run: `bytes` more of the input done (quantize.h). */
static int
quant_progress(struct quantize_stream *qs, uint64_t bytes, const char *name,
               struct kli_err *err)
{
    const struct kli_convert_options *opt = qs->opt;

    qs->done += bytes;
    if (opt->progress != NULL)
        opt->progress(opt->ud, qs->done, qs->total, name);
    if (opt->interrupt != NULL && opt->interrupt(opt->ud) != 0)
        return err_set(err, KLI_E_INTERRUPTED, "conversion interrupted");
    return KLI_OK;
}

/* A block type's scales come from the values of the block: a NaN or an infinity would
 * spoil (or, in the K types, be dropped from) a whole block, so it is refused, naming where. */
static int
quant_finite(const float *x, int64_t n, int64_t row0, int64_t cols, const char *name,
             struct kli_err *err)
{
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(x[i]))
            return err_set(err, KLI_E_FORMAT, "tensor %s: a non-finite value (%g) at row %lld, "
                               "column %lld cannot be quantized", name, (double)x[i],
                               (long long)(row0 + i / cols), (long long)(i % cols));
    }
    return KLI_OK;
}

/* One slab's rows quantized on the worker pool: rows are independent, so the bytes do not
 * depend on the split, and each share runs with denormals flushed as load-time conversion's
 * does (model.c), which keeps the two bit-identical. */
struct quant_job {
    const float *src;
    uint8_t *dst;
    enum k_dtype to;
    int64_t cols;
    uint64_t out_rb;
    const float *imp;     /* NULL, or the column weights each row is quantized with */
    const float *u;       /* NULL, or the error-feedback factor (cols x cols, K types) */
    float *tmp;           /* with u: cols floats of scratch per worker */
};

static void
quant_rows(void *ctx, int64_t r0, int64_t r1, int ith)
{
    const struct quant_job *j = ctx;

    if (j->u != NULL) {
        for (int64_t r = r0; r < r1; r++)
            kq_from_f32_h(j->to, j->src + r * j->cols, j->dst + (uint64_t)r * j->out_rb,
                          j->cols / KLI_QK_K, j->imp, j->u, j->tmp + (int64_t)ith * j->cols);
        return;
    }
    if (j->imp == NULL)
        dtype_from_f32(j->to, j->src + r0 * j->cols, j->dst + (uint64_t)r0 * j->out_rb,
                       (r1 - r0) * j->cols);
    for (int64_t r = r0; j->imp != NULL && r < r1; r++)
        dtype_from_f32_w(j->to, j->src + r * j->cols, j->dst + (uint64_t)r * j->out_rb, j->cols,
                         j->imp);
}

/* The damping of the second moments before they are inverted, as a fraction of their mean
 * diagonal: 0.2 was best of 0.01 to 1 on the nano model (doc/quality.md, "Importance"). */
#define QUANT_DAMP 0.2

/* With qs->cov, a K type and whole super-blocks: the error-feedback factor of the tensor's
 * inputs into *u, and scratch for every worker into *tmp (both NULL otherwise, and where
 * the moments cannot be inverted: the weights alone then apply). */
static int
quant_feedback(const struct quantize_stream *qs, enum k_dtype to, int64_t cols, float **u,
               float **tmp, struct kli_err *err)
{
    double *h = NULL;

    *u = NULL;
    *tmp = NULL;
    if (qs->cov == NULL || !dtype_is_k(to) || cols % KLI_QK_K != 0)
        return KLI_OK;
    h = k_mallocarray((size_t)(cols * cols), sizeof(double));
    *u = k_mallocarray((size_t)(cols * cols), sizeof(float));
    *tmp = k_mallocarray((size_t)(cols * (threads_count() + 1)), sizeof(float));
    if (h == NULL || *u == NULL || *tmp == NULL) {
        free(h);
        free(*u);
        free(*tmp);
        *u = NULL;
        *tmp = NULL;
        return err_set(err, KLI_E_NOMEM, "out of memory for the error feedback of %lld "
                           "columns", (long long)cols);
    }
    for (int64_t i = 0; i < cols * cols; i++)
        h[i] = qs->cov[i];
    if (kq_hinv_factor(h, cols, QUANT_DAMP, *u) != 0) {
        free(*u);
        free(*tmp);
        *u = NULL;
        *tmp = NULL;
    }
    free(h);
    return KLI_OK;
}

int
quantize_tensor(struct quantize_stream *qs, const struct wfile *wf,
                const struct tensor_desc *d, enum k_dtype to, struct kli_err *err)
{
    const uint8_t *src = d->data;
    float *u = NULL, *tmp = NULL;
    int rc = KLI_OK;

    if (to == d->dtype || to == KLI_DT_OTHER) {
        for (uint64_t o = 0; o < d->nbytes && rc == KLI_OK; o += QUANT_COPY_CHUNK) {
            uint64_t k = d->nbytes - o < QUANT_COPY_CHUNK ? d->nbytes - o : QUANT_COPY_CHUNK;
            rc = qs->write(qs->ctx, src + o, k, err);
            quant_drop(wf, d, o, k);
            if (rc == KLI_OK)
                rc = quant_progress(qs, k, d->name, err);
        }
        return d->nbytes == 0 ? quant_progress(qs, 0, d->name, err) : rc;
    }
    int64_t cols = d->ndim > 0 ? d->shape[d->ndim - 1] : 1;
    int64_t rows = cols > 0 ? d->numel / cols : 0;
    uint64_t in_rb = dtype_nbytes(d->dtype, (uint64_t)cols);
    uint64_t out_rb = dtype_nbytes(to, (uint64_t)cols);

    if ((rc = quant_feedback(qs, to, cols, &u, &tmp, err)) != KLI_OK)
        return rc;
    for (int64_t r = 0; r < rows && rc == KLI_OK; r += qs->rows) {
        int64_t k = rows - r < qs->rows ? rows - r : qs->rows;
        dtype_to_f32(d->dtype, src + (uint64_t)r * in_rb, qs->fbuf, k * cols);
        if (dtype_info(to)->block > 1 && (rc = quant_finite(qs->fbuf, k * cols, r, cols, d->name,
                                                            err)) != KLI_OK)
            break;
        struct quant_job job = {qs->fbuf, qs->qbuf, to, cols, out_rb, qs->imp, u, tmp};
        threads_parallel_for(k, 1, quant_rows, &job);
        rc = qs->write(qs->ctx, qs->qbuf, (uint64_t)k * out_rb, err);
        quant_drop(wf, d, (uint64_t)r * in_rb, (uint64_t)k * in_rb);
        if (rc == KLI_OK)
            rc = quant_progress(qs, (uint64_t)k * in_rb, d->name, err);
    }
    free(u);
    free(tmp);
    return rc;
}

void
quantize_imp(struct quantize_stream *qs, float *const *imp, int64_t n, int64_t i,
             enum k_dtype from, enum k_dtype to, int64_t used[2])
{
    qs->imp = NULL;
    qs->cov = NULL;
    if (imp == NULL || to == from || dtype_info(to)->block == 1)
        return;
    used[imp[i] == NULL]++;
    qs->imp = imp[i];
    qs->cov = imp[i] != NULL ? imp[n + i] : NULL;
}

int
kli_quantize(const char *in, const char *out, const struct kli_convert_options *opt,
             struct kli_err *err)
{
    struct kli_convert_options dflt;
    struct wfile *wf = NULL;
    struct st_entry *ent = NULL;
    enum k_dtype *to = NULL;
    struct quant_plan plan;
    float **imp = NULL;
    struct st_writer *w = NULL;
    char path[4096];
    struct stat st;
    int rc;

    if ((opt = OPTS_TAKE(kli_quantize_options_init, dflt, opt, "kli_quantize", err)) == NULL)
        return KLI_E_INVALID;
    if (opt->type == NULL)   /* as kli_convert_options_init leaves it: convert's "as stored" */
        return err_set(err, KLI_E_RANGE, "kli_quantize: no weight type (%s)",
                           KLI_DTYPE_NAMES);
    if ((rc = quantize_plan(opt->type, &plan, err)) != KLI_OK)
        return rc;
    if ((rc = quantize_check_rules(opt->keep, opt->n_keep, err)) != KLI_OK)
        return rc;
    if ((rc = quant_check_output(in, out, err)) != KLI_OK)
        return rc;
    if (mkdir(out, 0777) != 0 && errno != EEXIST)
        return err_set(err, KLI_E_IO, "%s: %s", out, strerror(errno));
    snprintf(path, sizeof(path), "%s/model.safetensors", out);
    if (!opt->force && stat(path, &st) == 0)
        return err_set(err, KLI_E_IO, "%s exists (use --force to overwrite)", path);
    /* A stale shard index in the output would win over the new file. */
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", out);
    if (stat(path, &st) == 0) {
        if (!opt->force)
            return err_set(err, KLI_E_IO, "%s exists (use --force to replace)", path);
        unlink(path);
    }
    snprintf(path, sizeof(path), "%s/model.safetensors", out);
    if ((rc = wfile_open(&wf, in, err)) != KLI_OK)
        return rc;

    int64_t n = wfile_n_tensors(wf), used[2] = {0, 0};
    if (opt->imatrix != NULL && (rc = imat_load(opt->imatrix, wf, &imp, err)) != KLI_OK)
        goto out;
    ent = k_calloc((size_t)n, sizeof(*ent));
    to = k_calloc((size_t)n, sizeof(*to));
    if (ent == NULL || to == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory");
        goto out;
    }
    uint64_t total = 0;
    int64_t maxcols = 1;
    for (int64_t i = 0; i < n; i++) {
        const struct tensor_desc *d = wfile_tensor(wf, i);
        enum k_dtype dt = quantize_target(wf, d, &plan, opt->keep, opt->n_keep);
        int64_t cols = d->ndim > 0 ? d->shape[d->ndim - 1] : 1;
        to[i] = dt;
        ent[i].name = d->name;
        ent[i].dtype = dt == KLI_DT_OTHER ? d->dtype_name : dtype_st_name(dt);
        ent[i].ndim = d->ndim;
        memcpy(ent[i].shape, d->shape, sizeof(d->shape));
        ent[i].nbytes = dt == d->dtype ? d->nbytes : dtype_nbytes(dt, (uint64_t)d->numel);
        total += d->nbytes;
        maxcols = cols > maxcols ? cols : maxcols;
    }
    /* the weights' writer first: it locks model.safetensors against a second run */
    if ((rc = st_writer_open(&w, path, ent, n, err)) != KLI_OK)
        goto out;
    const struct pack_meta *pk = wfile_meta(wf);
    if (pk != NULL) {
        /* A .kli input carries the three files in its sections, a GGUF in its metadata. */
        if ((rc = quant_write(out, "config.json", pk->config, pk->config_len, err)) != KLI_OK ||
            (rc = quant_write(out, "tiktoken.model", pk->tok_ranks, pk->tok_ranks_len,
                              err)) != KLI_OK ||
            (rc = quant_write(out, "tokenizer_config.json", pk->tok_config,
                              pk->tok_config_len, err)) != KLI_OK)
            goto out;
    } else if ((rc = quant_copy(in, out, "config.json", 1, err)) != KLI_OK ||
               (rc = quant_copy(in, out, "tiktoken.model", 0, err)) != KLI_OK ||
               (rc = quant_copy(in, out, "tokenizer_config.json", 0, err)) != KLI_OK) {
        goto out;
    }

    /* kli_quantize's side of the stream: a safetensors writer */
    struct quantize_stream qs = {.write = st_writer_sink, .ctx = w, .opt = opt, .total = total};
    if ((rc = quantize_stream_init(&qs, maxcols, err)) != KLI_OK)
        goto out;
    for (int64_t i = 0; i < n && rc == KLI_OK; i++) {
        const struct tensor_desc *d = wfile_tensor(wf, i);
        quantize_imp(&qs, imp, n, i, d->dtype, to[i], used);
        rc = quantize_tensor(&qs, wf, d, to[i], err);
    }
    if (opt->imatrix_used != NULL)
        memcpy(opt->imatrix_used, used, sizeof(used));
    quantize_stream_free(&qs);
out:
    rc = st_writer_finish(w, rc, err);
    free(ent);
    free(to);
    imat_imp_free(imp, n);
    wfile_close(wf);
    return rc;
}
