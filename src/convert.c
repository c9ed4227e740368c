/*
 * convert.c - kli_convert: a model directory (or a .kli file) into one self-contained .kli
 * file (weights/packed.c writes it, kli-pack(5) specifies it); kli_model_verify.
 *
 * The input is opened as a model first, so a checkpoint kli cannot run is refused before
 * anything is written, with the message model.c gives. Then the tensors stream through the
 * writer one at a time, converted in slabs of rows as kli_quantize does (same rules for which
 * tensors change dtype, shared through quantize.h), and each source tensor's pages are
 * dropped once written: resident memory stays a few MB plus the metadata whatever the model
 * size. File order: every tensor that is not a routed expert's, in the checkpoint's order,
 * then the routed experts by layer and expert, each as the run w1, w3, w2 that the writer
 * puts in one page-aligned range (an expert is then one range to prefetch or evict).
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "gguf_export.h"
#include "imatrix.h"
#include "internal.h"
#include "model.h"
#include "quantize.h"
#include "weights.h"

enum {
    CV_MAX_TEXT = 1 << 28,           /* the largest config or tokenizer file accepted */
};

void
kli_convert_options_init(struct kli_convert_options *opt)
{
    *opt = (struct kli_convert_options){.size = sizeof(*opt)};
}

/* One tensor in file order. */
struct cv_item {
    int64_t src;            /* index in the input wfile */
    int32_t layer, expert;  /* for routed experts */
    int32_t role;           /* 0: not a routed expert; 1, 2, 3: w1, w3, w2 */
    int64_t group;          /* -1, or the expert's group number */
};

/* "model.layers.L.block_sparse_moe.experts.E.wK.weight" in its canonical spelling.
 * @return the role (1 w1, 2 w3, 3 w2) or 0. */
static int
cv_expert_role(const char *name, int32_t *layer, int32_t *expert)
{
    static const char *const suffix[] = {"w1.weight", "w3.weight", "w2.weight"};
    char canon[128];
    int L, E, n = -1;

    if (sscanf(name, "model.layers.%d.block_sparse_moe.experts.%d.%n", &L, &E, &n) != 2 ||
        n < 0 || L < 0 || E < 0)
        return 0;
    snprintf(canon, sizeof(canon), "model.layers.%d.block_sparse_moe.experts.%d.", L, E);
    if (strncmp(name, canon, (size_t)n) != 0 || strlen(canon) != (size_t)n)
        return 0;
    for (int k = 0; k < 3; k++) {
        if (strcmp(name + n, suffix[k]) == 0) {
            *layer = L;
            *expert = E;
            return k + 1;
        }
    }
    return 0;
}

static int
cv_item_cmp(const void *a, const void *b)
{
    const struct cv_item *x = a, *y = b;

    if ((x->role > 0) != (y->role > 0))
        return x->role > 0 ? 1 : -1;
    if (x->role > 0) {
        if (x->layer != y->layer)
            return x->layer < y->layer ? -1 : 1;
        if (x->expert != y->expert)
            return x->expert < y->expert ? -1 : 1;
        if (x->role != y->role)
            return x->role < y->role ? -1 : 1;
    }
    return x->src < y->src ? -1 : x->src > y->src;
}

/* Puts the tensors in file order and numbers the complete experts' groups. */
static struct cv_item *
cv_order(const struct wfile *wf, int64_t n)
{
    struct cv_item *it = k_calloc((size_t)n + 1, sizeof(*it));
    int64_t g = 0;

    if (it == NULL)
        return NULL;
    for (int64_t i = 0; i < n; i++) {
        it[i].src = i;
        it[i].role = cv_expert_role(wfile_tensor(wf, i)->name, &it[i].layer,
                                    &it[i].expert);
        it[i].group = -1;
    }
    qsort(it, (size_t)n, sizeof(*it), cv_item_cmp);
    for (int64_t i = 0; i + 2 < n; i++) {
        if (it[i].role == 1 && it[i + 1].role == 2 && it[i + 2].role == 3 &&
            it[i].layer == it[i + 2].layer && it[i].expert == it[i + 2].expert &&
            it[i].layer == it[i + 1].layer && it[i].expert == it[i + 1].expert) {
            it[i].group = it[i + 1].group = it[i + 2].group = g++;
            i += 2;
        }
    }
    return it;
}

/* Reads a whole small file. @return KLI_OK, 1 when it is absent and optional, or an error. */
static int
cv_read(const char *dir, const char *name, int optional, char **buf, uint64_t *len,
        struct kli_err *err)
{
    char path[4096];
    struct stat st;
    size_t n;
    int rc;

    *buf = NULL;
    *len = 0;
    if (snprintf(path, sizeof(path), "%s/%s", dir, name) >= (int)sizeof(path))
        return err_set(err, KLI_E_RANGE, "%s: path too long", dir);
    if (optional && stat(path, &st) != 0 && errno == ENOENT)
        return 1;
    /* A regular file (src/file.c): a FIFO or device in the model directory is refused. */
    if ((rc = file_read(path, CV_MAX_TEXT, buf, &n, err)) != KLI_OK)
        return rc;
    *len = (uint64_t)n;
    return KLI_OK;
}

int
kli_convert(const char *in, const char *out, const struct kli_convert_options *opt,
            struct kli_err *err)
{
    struct kli_convert_options dflt;
    struct kli_model_options mo;
    struct kli_model *m = NULL;
    struct pack_meta meta = {0};
    struct pack_entry *ent = NULL;
    struct cv_item *order = NULL;
    struct pack_writer *w = NULL;
    struct quantize_stream qs = {0};
    float **imp = NULL;
    int64_t used[2] = {0, 0};
    char *cfg = NULL, *ranks = NULL, *tcfg = NULL;
    struct quant_plan plan;
    struct stat st;
    int rc;

    if (in == NULL || out == NULL)
        return err_set(err, KLI_E_INVALID, "kli_convert: NULL argument");
    if ((opt = OPTS_TAKE(kli_convert_options_init, dflt, opt, "kli_convert", err)) == NULL)
        return KLI_E_INVALID;
    if ((rc = quantize_plan(opt->type, &plan, err)) != KLI_OK)
        return rc;
    if ((rc = quantize_check_rules(opt->keep, opt->n_keep, err)) != KLI_OK)
        return rc;
    if (!opt->force && stat(out, &st) == 0)
        return err_set(err, KLI_E_IO, "%s exists (use --force to overwrite)", out);

    /* The input must run: every tensor checked against its configuration. */
    kli_model_options_init(&mo);
    if ((rc = kli_model_open(&m, in, &mo, err)) != KLI_OK)
        return rc;
    /* and must not be what is written */
    if ((rc = kli_output_check(out, in, err)) != KLI_OK)
        goto out;
    if (opt->format != NULL && strcmp(opt->format, "kli") != 0) {
        if (strcmp(opt->format, "gguf") != 0)
            rc = err_set(err, KLI_E_RANGE, "kli_convert: format \"%s\" (kli or gguf)",
                         opt->format);
        else
            rc = gguf_export(m, out, opt, err);
        goto out;
    }
    const struct wfile *wf = m->wf;
    const struct pack_meta *pk = wfile_meta(wf);
    if (pk != NULL) {
        meta = *pk;
    } else {
        if ((rc = cv_read(in, "config.json", 0, &cfg, &meta.config_len, err)) != KLI_OK)
            goto out;
        meta.config = cfg;
        rc = cv_read(in, "tiktoken.model", 1, &ranks, &meta.tok_ranks_len, err);
        if (rc < 0)
            goto out;
        meta.tok_ranks = ranks;
        if (ranks != NULL) {
            rc = cv_read(in, "tokenizer_config.json", 1, &tcfg, &meta.tok_config_len, err);
            if (rc < 0)
                goto out;
            meta.tok_config = tcfg;
        }
    }

    int64_t n = wfile_n_tensors(wf), maxcols = 1;
    ent = k_calloc((size_t)n + 1, sizeof(*ent));
    order = cv_order(wf, n);
    if (ent == NULL || order == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory");
        goto out;
    }
    for (int64_t i = 0; i < n; i++) {
        const struct tensor_desc *d = wfile_tensor(wf, order[i].src);
        enum k_dtype to = quantize_target(wf, d, &plan, opt->keep, opt->n_keep);
        struct pack_entry *e = &ent[i];

        e->name = d->name;
        e->dtype = to;
        e->dtype_name = to == d->dtype ? d->dtype_name : NULL;
        e->ndim = d->ndim;
        memcpy(e->shape, d->shape, sizeof(e->shape));
        e->nbytes = to == d->dtype ? d->nbytes : dtype_nbytes(to, (uint64_t)d->numel);
        e->group = order[i].group;
        e->layer = order[i].layer;
        e->expert = order[i].expert;
        qs.total += d->nbytes;
        int64_t cols = d->ndim > 0 ? d->shape[d->ndim - 1] : 1;
        if (to != d->dtype && cols > maxcols)
            maxcols = cols;
    }
    if (opt->imatrix != NULL && (rc = imat_load(opt->imatrix, wf, &imp, err)) != KLI_OK)
        goto out;
    qs.opt = opt;
    qs.write = pack_writer_sink;   /* kli_convert's side of the stream: a .kli writer */
    if ((rc = quantize_stream_init(&qs, maxcols, err)) != KLI_OK)
        goto out;
    if ((rc = pack_writer_open(&w, out, &meta, ent, n, err)) != KLI_OK)
        goto out;
    qs.ctx = w;
    for (int64_t i = 0; i < n; i++) {
        const struct tensor_desc *d = wfile_tensor(wf, order[i].src);

        quantize_imp(&qs, imp, wfile_n_tensors(m->wf), order[i].src, d->dtype, ent[i].dtype,
                     used);
        if ((rc = quantize_tensor(&qs, wf, d, ent[i].dtype, err)) != KLI_OK)
            goto out;
    }
    if (opt->imatrix_used != NULL)
        memcpy(opt->imatrix_used, used, sizeof(used));
    rc = pack_writer_close(w, err);
    w = NULL;
out:
    pack_writer_abort(w);
    quantize_stream_free(&qs);
    if (imp != NULL)
        imat_imp_free(imp, wfile_n_tensors(m->wf));
    free(order);
    free(ent);
    free(cfg);
    free(ranks);
    free(tcfg);
    kli_model_close(m);
    return rc;
}

int
kli_model_verify(const struct kli_model *model, kli_progress_fn progress, void *ud,
                 struct kli_err *err)
{
    if (model == NULL)
        return err_set(err, KLI_E_INVALID, "kli_model_verify: NULL model");
    return wfile_verify(model->wf, progress, ud, err);
}
