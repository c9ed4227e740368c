/*
 * imatrix.c - the importance-matrix collector (imatrix.h) and its file (kli-imatrix(5)).
 */
#include "config.h"

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imatrix.h"
#include "internal.h"
#include "session.h"
#include "util.h"
#include "weights.h"

_Thread_local struct kli_imatrix *imat_current;

struct imat_ent {
    const char *name;     /* the model's tensor name */
    int64_t width;        /* input values per row: the matrix's shape[1] */
    double *sum;          /* [width] sum of x[j]^2 */
    double *cov;          /* NULL, or [width * width] sum of x[a] x[b], lower triangle */
    uint64_t count;       /* rows added */
};

struct kli_imatrix {
    uint64_t fingerprint;
    struct imat_ent *ent;
    int64_t n, cap;
    int32_t *slot;        /* [n_slot] open addressing on the name: index + 1, 0 empty */
    int64_t n_slot;
    pthread_mutex_t lock;
};

void
imat_enter(struct kli_imatrix *im)
{
    imat_current = im;
}

static uint64_t
imat_hash(const char *name)
{
    return util_fnv1a(UTIL_FNV_BASIS, name, strlen(name));
}

/* The slot holding `name`, or the empty one where it would go. */
static int64_t
imat_slot(const struct kli_imatrix *im, const char *name)
{
    int64_t i = (int64_t)(imat_hash(name) & (uint64_t)(im->n_slot - 1));

    while (im->slot[i] != 0 && strcmp(im->ent[im->slot[i] - 1].name, name) != 0)
        i = (i + 1) & (im->n_slot - 1);
    return i;
}

static struct imat_ent *
imat_find(const struct kli_imatrix *im, const char *name)
{
    int64_t i = imat_slot(im, name);

    return im->slot[i] != 0 ? &im->ent[im->slot[i] - 1] : NULL;
}

/* Registers matrix t (once per name; tied weights share one entry). */
static void
imat_reg(struct kli_imatrix *im, const struct tensor *t)
{
    if (t->name == NULL || t->ndim != 2 || im->n == im->cap)
        return;
    int64_t s = imat_slot(im, t->name);
    if (im->slot[s] != 0)
        return;
    im->ent[im->n] = (struct imat_ent){t->name, t->shape[1], NULL, NULL, 0};
    im->slot[s] = (int32_t)++im->n;
}

static void
imat_reg_ffn(struct kli_imatrix *im, const struct ffn_w *f)
{
    imat_reg(im, &f->gate);
    imat_reg(im, &f->up);
    imat_reg(im, &f->down);
}

/* Every matrix the forward pass multiplies, in the model's order. */
static void
imat_walk(struct kli_imatrix *im, const struct kli_model *m)
{
    const struct k_config *c = &m->cfg;

    for (int i = 0; i < c->n_layers; i++) {
        const struct k_layer *ly = &m->layers[i];
        const struct k_kda_w *k = &ly->kda;
        const struct k_mla_w *a = &ly->mla;
        const struct tensor *mix[] = {&k->q_proj, &k->k_proj, &k->v_proj, &k->f_a, &k->f_b,
                                      &k->b_proj, &k->g_a, &k->g_b, &k->o_proj};
        const struct tensor *att[] = {&a->q_proj, &a->kv_a, &a->kv_b, &a->o_proj};
        int kda = ly->mixer == KLI_MIXER_KDA;
        for (size_t j = 0; j < (kda ? KLI_ARRAY_LEN(mix) : KLI_ARRAY_LEN(att)); j++)
            imat_reg(im, kda ? mix[j] : att[j]);
        if (ly->ffn_kind == KLI_FFN_DENSE) {
            imat_reg_ffn(im, &ly->ffn);
            continue;
        }
        imat_reg(im, &ly->moe.router);
        if (c->moe.n_shared > 0)
            imat_reg_ffn(im, &ly->moe.shared);
        for (int e = 0; ly->moe.experts != NULL && e < c->moe.n_experts; e++)
            imat_reg_ffn(im, &ly->moe.experts[e]);
    }
    imat_reg(im, &m->lm_head);
}

int
kli_imatrix_create(struct kli_imatrix **out, const struct kli_model *m, struct kli_err *err)
{
    const struct k_config *c = &m->cfg;
    struct kli_imatrix *im = k_calloc(1, sizeof(*im));
    int64_t total = 0;

    *out = NULL;
    if (im == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory for the importance matrix");
    pthread_mutex_init(&im->lock, NULL);
    /* at most 9 mixer matrices, a router and 3 per expert (and shared expert) per layer */
    im->cap = (int64_t)c->n_layers * (13 + 3 * (int64_t)c->moe.n_experts) + 1;
    for (im->n_slot = 64; im->n_slot < 2 * im->cap; im->n_slot *= 2)
        ;
    im->ent = k_calloc((size_t)im->cap, sizeof(*im->ent));
    im->slot = k_calloc((size_t)im->n_slot, sizeof(*im->slot));
    if (im->ent == NULL || im->slot == NULL)
        goto nomem;
    im->fingerprint = kli_model_fingerprint(m);
    imat_walk(im, m);
    for (int64_t i = 0; i < im->n; i++)
        total += im->ent[i].width;
    double *sums = k_calloc((size_t)total, sizeof(double));
    if (sums == NULL)
        goto nomem;
    for (int64_t i = 0, o = 0; i < im->n; o += im->ent[i].width, i++)
        im->ent[i].sum = sums + o;
    *out = im;
    return KLI_OK;
nomem:
    kli_imatrix_free(im);
    return err_set(err, KLI_E_NOMEM, "out of memory for the importance matrix");
}

void
kli_imatrix_free(struct kli_imatrix *im)
{
    if (im == NULL)
        return;
    if (im->ent != NULL && im->n > 0)
        free(im->ent[0].sum);
    for (int64_t i = 0; im->ent != NULL && i < im->n; i++)
        free(im->ent[i].cov);
    free(im->ent);
    free(im->slot);
    pthread_mutex_destroy(&im->lock);
    free(im);
}

int
kli_imatrix_covariance(struct kli_imatrix *im, struct kli_err *err)
{
    for (int64_t i = 0; i < im->n; i++) {
        if (im->ent[i].count > 0)
            return err_set(err, KLI_E_INVALID, "kli_imatrix_covariance: %s has rows already: "
                               "ask before collecting", im->ent[i].name);
    }
    for (int64_t i = 0; i < im->n; i++) {
        struct imat_ent *e = &im->ent[i];
        if (e->cov == NULL &&
            (e->cov = k_calloc((size_t)(e->width * e->width), sizeof(double))) == NULL)
            return err_set(err, KLI_E_NOMEM, "out of memory for the covariance of %s (%lld x "
                               "%lld)", e->name, (long long)e->width, (long long)e->width);
    }
    return KLI_OK;
}

void
imat_add(struct kli_imatrix *im, const struct tensor *w, const float *x, int64_t ldx,
         int64_t m)
{
    if (w->name == NULL)
        return;
    struct imat_ent *e = imat_find(im, w->name);
    if (e == NULL || e->width != w->shape[1])
        return;
    pthread_mutex_lock(&im->lock);
    for (int64_t t = 0; t < m; t++) {
        const float *r = x + t * ldx;
        for (int64_t j = 0; j < e->width; j++)
            e->sum[j] += (double)r[j] * r[j];
        for (int64_t a = 0; e->cov != NULL && a < e->width; a++) {
            double *ca = e->cov + a * e->width, xa = r[a];
            for (int64_t b = 0; b <= a; b++)
                ca[b] += xa * r[b];
        }
    }
    e->count += (uint64_t)m;
    pthread_mutex_unlock(&im->lock);
}

int
kli_session_set_imatrix(struct kli_session *s, struct kli_imatrix *im, struct kli_err *err)
{
    if (im != NULL && (s->gpu != NULL || s->m->gpu != NULL))
        return err_set(err, KLI_E_INVALID, "an importance matrix is collected on the CPU: "
                           "open the model with GPU use off");
    s->imat = im;
    return KLI_OK;
}

int
kli_imatrix_save(const struct kli_imatrix *im, const char *path, const char *const *meta_kv,
                 int32_t n_meta, struct kli_err *err)
{
    struct st_entry *ent = NULL;
    struct st_writer *w = NULL;
    const char **kv = NULL;
    char **names = NULL, **cnames = NULL, fp[32], nmat[32];
    float *buf = NULL;
    int64_t maxw = 1, nt = 0;
    int rc = KLI_E_NOMEM;

    ent = k_calloc((size_t)(3 * im->n), sizeof(*ent));
    names = k_calloc((size_t)im->n, sizeof(*names));
    cnames = k_calloc((size_t)im->n, sizeof(*cnames));
    kv = k_calloc((size_t)(2 * n_meta + 6), sizeof(*kv));
    if (ent == NULL || names == NULL || cnames == NULL || kv == NULL)
        goto nomem;
    for (int64_t i = 0; i < im->n; i++) {
        const struct imat_ent *e = &im->ent[i];
        size_t len = strlen(e->name) + sizeof(".count");
        if ((names[i] = k_malloc(len)) == NULL || (cnames[i] = k_malloc(len)) == NULL)
            goto nomem;
        snprintf(names[i], len, "%s.count", e->name);
        snprintf(cnames[i], len, "%s.cov", e->name);
        ent[nt++] = (struct st_entry){e->name, "F32", 1, {e->width}, 4 * (uint64_t)e->width};
        ent[nt++] = (struct st_entry){names[i], "I64", 1, {1}, 8};
        if (e->cov != NULL)
            ent[nt++] = (struct st_entry){cnames[i], "F32", 2, {e->width, e->width},
                                          4 * (uint64_t)(e->width * e->width)};
        maxw = e->width > maxw ? e->width : maxw;
    }
    if ((buf = k_mallocarray((size_t)maxw, sizeof(float))) == NULL)
        goto nomem;
    snprintf(fp, sizeof(fp), "%016" PRIx64, im->fingerprint);
    snprintf(nmat, sizeof(nmat), "%" PRId64, im->n);
    kv[0] = "kli.imatrix";
    kv[1] = "1";
    kv[2] = "kli.model_fingerprint";
    kv[3] = fp;
    kv[4] = "kli.matrices";
    kv[5] = nmat;
    if (n_meta > 0)   /* meta_kv may be NULL then */
        memcpy(kv + 6, meta_kv, (size_t)(2 * n_meta) * sizeof(*kv));
    if ((rc = st_writer_open_meta(&w, path, ent, nt, kv, n_meta + 3, err)) != KLI_OK)
        goto out;
    for (int64_t i = 0; i < im->n && rc == KLI_OK; i++) {
        const struct imat_ent *e = &im->ent[i];
        uint8_t c8[8];
        for (int64_t j = 0; j < e->width; j++)
            buf[j] = e->count > 0 ? (float)(e->sum[j] / (double)e->count) : 0.0f;
        util_wr64(c8, e->count);
        if ((rc = st_writer_write(w, buf, 4 * (uint64_t)e->width, err)) == KLI_OK)
            rc = st_writer_write(w, c8, 8, err);
        /* the covariance row by row, mirrored from its lower triangle */
        for (int64_t a = 0; e->cov != NULL && a < e->width && rc == KLI_OK; a++) {
            for (int64_t b = 0; b < e->width; b++) {
                double v = b <= a ? e->cov[a * e->width + b] : e->cov[b * e->width + a];
                buf[b] = e->count > 0 ? (float)(v / (double)e->count) : 0.0f;
            }
            rc = st_writer_write(w, buf, 4 * (uint64_t)e->width, err);
        }
    }
    goto out;
nomem:
    rc = err_set(err, KLI_E_NOMEM, "out of memory writing %s", path);
out:
    rc = st_writer_finish(w, rc, err);
    for (int64_t i = 0; names != NULL && i < im->n; i++)
        free(names[i]);
    for (int64_t i = 0; cnames != NULL && i < im->n; i++)
        free(cnames[i]);
    free(names);
    free(cnames);
    free(ent);
    free(kv);
    free(buf);
    return rc;
}

/* ==== reading the file for kli_quantize ================================================= */

/* Checks a copy v of n floats from tensor `d` of the file: all finite, and none negative in
 * a vector of mean squares (a covariance's off-diagonal values may be). */
static int
imat_check(const char *path, const struct tensor_desc *d, const float *v, int64_t n,
           struct kli_err *err)
{
    for (int64_t j = 0; j < n; j++) {
        const char *what = v[j] < 0.0f && d->ndim == 1 ? "negative"
                           : !isfinite(v[j])            ? "not finite"
                                                        : NULL;
        if (what != NULL)
            return err_set(err, KLI_E_FORMAT, "%s: %s[%lld] is %s", path, d->name,
                           (long long)j, what);
    }
    return KLI_OK;
}

/* The optional "<name>.cov" of a matrix of width w: *cov stays NULL without one. */
static int
imat_take_cov(const char *path, const struct wfile *f, const char *name, int64_t w,
              float **cov, struct kli_err *err)
{
    char cname[512];
    const struct tensor_desc *c;
    int rc;

    snprintf(cname, sizeof(cname), "%s.cov", name);
    if ((c = wfile_find(f, cname)) == NULL)
        return KLI_OK;
    if (c->dtype != KLI_DT_F32 || c->ndim != 2 || c->shape[0] != w || c->shape[1] != w)
        return err_set(err, KLI_E_FORMAT, "%s: %.400s is not F32 [%lld, %lld]", path, cname,
                       (long long)w, (long long)w);
    if ((*cov = k_mallocarray((size_t)(w * w), sizeof(float))) == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory reading %s", path);
    memcpy(*cov, c->data, (size_t)(w * w) * sizeof(float));
    if ((rc = imat_check(path, c, *cov, w * w, err)) != KLI_OK) {
        free(*cov);
        *cov = NULL;
    }
    return rc;
}

/* Checks one mean-squares tensor `d` of the file against the checkpoint and copies it out,
 * with its covariance where the file has one: both stay NULL when its count is 0. */
static int
imat_take(const char *path, const struct wfile *f, const struct wfile *wf,
          const struct tensor_desc *d, float **imp, float **cov, struct kli_err *err)
{
    const struct tensor_desc *m = wfile_find(wf, d->name), *c;
    char cname[512];
    float *v;

    if (d->dtype != KLI_DT_F32 || d->ndim != 1)
        return err_set(err, KLI_E_FORMAT, "%s: not an importance matrix: tensor %s is not a "
                           "vector of F32", path, d->name);
    if (m == NULL || m->ndim != 2 || m->shape[1] != d->shape[0])
        return err_set(err, KLI_E_INVALID, "%s: made for another model: %s %s", path,
                       d->name, m == NULL ? "is not in this checkpoint"
                                          : "has another input width here");
    snprintf(cname, sizeof(cname), "%s.count", d->name);
    c = wfile_find(f, cname);
    if (c == NULL || strcmp(c->dtype_name, "I64") != 0 || c->ndim != 1 || c->shape[0] != 1)
        return err_set(err, KLI_E_FORMAT, "%s: not an importance matrix: no I64 [1] tensor "
                           "%.400s", path, cname);
    int64_t count = (int64_t)util_rd64(c->data);
    if (count < 0)
        return err_set(err, KLI_E_FORMAT, "%s: %s is negative", path, cname);
    if (count == 0)
        return KLI_OK;
    if ((v = k_mallocarray((size_t)d->shape[0], sizeof(float))) == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory reading %s", path);
    memcpy(v, d->data, (size_t)d->shape[0] * sizeof(float));
    int rc = imat_check(path, d, v, d->shape[0], err);
    if (rc == KLI_OK)
        rc = imat_take_cov(path, f, d->name, d->shape[0], cov, err);
    if (rc != KLI_OK) {
        free(v);
        return rc;
    }
    *imp = v;
    return KLI_OK;
}

int
imat_load(const char *path, const struct wfile *wf, float ***out, struct kli_err *err)
{
    struct wfile *f = NULL;
    int64_t n = wfile_n_tensors(wf), found = 0;
    float **imp = k_calloc((size_t)(n > 0 ? 2 * n : 1), sizeof(*imp));
    int rc;

    *out = NULL;
    if (imp == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory reading %s", path);
    if ((rc = wfile_open(&f, path, err)) != KLI_OK)
        goto fail;
    for (int64_t i = 0; i < wfile_n_tensors(f); i++) {
        const struct tensor_desc *d = wfile_tensor(f, i);
        size_t len = strlen(d->name);
        if ((len > 6 && strcmp(d->name + len - 6, ".count") == 0) ||
            (len > 4 && strcmp(d->name + len - 4, ".cov") == 0))
            continue;
        const struct tensor_desc *m = wfile_find(wf, d->name);
        float *v = NULL, *cv = NULL;
        if ((rc = imat_take(path, f, wf, d, &v, &cv, err)) != KLI_OK)
            goto fail;
        imp[wfile_index(wf, m)] = v;
        imp[n + wfile_index(wf, m)] = cv;
        found++;
    }
    if (found == 0) {
        rc = err_set(err, KLI_E_FORMAT, "%s: not an importance matrix: no matrices", path);
        goto fail;
    }
    wfile_close(f);
    *out = imp;
    return KLI_OK;
fail:
    wfile_close(f);
    imat_imp_free(imp, n);
    return rc;
}

void
imat_imp_free(float **imp, int64_t n)
{
    for (int64_t i = 0; imp != NULL && i < 2 * n; i++)
        free(imp[i]);
    free(imp);
}
