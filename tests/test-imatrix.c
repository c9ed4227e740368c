/*
 * test-imatrix.c - the importance-matrix collector (kli_imatrix_*, src/imatrix.c) on the
 * nano demo model: layer 0's mixer inputs against the normed embeddings computed here, the
 * counts every matrix must have (tokens for the dense ones, tokens x top_k over a layer's
 * experts), the file's round trip through kli_quantize's reader, and the reader refusing
 * damaged or foreign files; covariance, feedback: kli_imatrix_covariance's second moments
 * (layer 0's against the outer products computed here, every one symmetric with the means
 * on its diagonal), read back, refused when damaged, and changing a K type's bytes only.
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kli.h"
#include "imatrix.h"
#include "model.h"
#include "ops.h"
#include "tap.h"
#include "testlib.h"
#include "util.h"
#include "weights.h"

#define N_TOK 150

static char tmpdir[] = "/tmp/kli-imat-XXXXXX";
static struct kli_model *nano;
static struct wfile *saved;        /* the collector's file, read back */
static struct wfile *covsaved;     /* the same with kli_imatrix_covariance (cov.imat) */
static kli_token ids[N_TOK];
static int n_evals;                /* lm_head runs on the last row of each */

/* The model at tl_data()/rel on 2 threads of the CPU. */
static struct kli_model *
open_cpu(const char *rel)
{
    struct kli_model_options opt;

    kli_model_options_init(&opt);
    opt.n_threads = 2;
    opt.gpu = KLI_GPU_OFF;
    return tl_open_model_opts(rel, &opt);
}

/* The mean squares and the count the file holds for matrix t. */
static const float *
file_mean(const struct tensor *t, int64_t *count)
{
    char cname[512];
    const struct tensor_desc *d = wfile_find(saved, t->name), *c;

    snprintf(cname, sizeof(cname), "%s.count", t->name);
    c = wfile_find(saved, cname);
    if (d == NULL || c == NULL || d->shape[0] != t->shape[1]) {
        *count = -1;
        return NULL;
    }
    *count = (int64_t)util_rd64(c->data);
    return d->data;
}

/* A session on nano collecting into a new collector *im (with the covariance when cov),
 * fed the ids in pieces of 7 and 64 tokens: the grouped and the per-expert MoE schedules
 * both run. @return the session's status. */
static int
collect(struct kli_session **s, struct kli_imatrix **im, int cov, struct kli_err *err)
{
    int rc = kli_session_create(s, nano, NULL, err);

    rc = rc == KLI_OK ? kli_imatrix_create(im, nano, err) : rc;
    rc = rc == KLI_OK && cov ? kli_imatrix_covariance(*im, err) : rc;
    rc = rc == KLI_OK ? kli_session_set_imatrix(*s, *im, err) : rc;
    for (int p = 0; rc == KLI_OK && p < N_TOK;) {
        int k = p < 70 ? 7 : 64;
        k = p + k > N_TOK ? N_TOK - p : k;
        rc = kli_session_eval(*s, ids + p, k, NULL, err);
        p += k;
        n_evals += !cov;
    }
    return rc;
}

/* Collects over ids and saves to tmpdir/nano.imat. */
static void
case_collect(void)
{
    struct kli_session *s = NULL;
    struct kli_imatrix *im = NULL;
    struct kli_err err = {0};
    char path[4200];
    int rc;

    snprintf(path, sizeof(path), "%s/nano.imat", tmpdir);
    rc = collect(&s, &im, 0, &err);
    const char *kv[] = {"test", "yes"};
    rc = rc == KLI_OK ? kli_imatrix_save(im, path, kv, 1, &err) : rc;
    ok(rc == KLI_OK, "collect over %d tokens and save (%s)", N_TOK, err.msg);
    /* detached, the session adds nothing more: a second save is the same file */
    char again[4200];
    size_t n1 = 0, n2 = 0;
    snprintf(again, sizeof(again), "%s/again.imat", tmpdir);
    kli_session_set_imatrix(s, NULL, &err);
    kli_session_reset(s);
    kli_session_eval(s, ids, 8, NULL, &err);
    kli_imatrix_save(im, again, kv, 1, &err);
    char *f1 = tl_slurp(path, &n1), *f2 = tl_slurp(again, &n2);
    ok(f1 != NULL && f2 != NULL && n1 == n2 && memcmp(f1, f2, n1) == 0,
       "a detached session adds nothing");
    free(f1);
    free(f2);
    kli_session_free(s);
    kli_imatrix_free(im);
    rc = wfile_open(&saved, path, &err);
    ok(rc == KLI_OK, "the file opens as safetensors (%s)", err.msg);
    if (rc != KLI_OK)
        exit(1);
}

/* x[D]: layer 0's mixer input for token ids[t], rmsnorm(embed[id]) * attn_norm, in the
 * model's float steps (row: D floats of scratch). */
static void
layer0_input(int t, float *row, double *x)
{
    const struct k_layer *ly = &nano->layers[0];
    int64_t D = nano->cfg.d_model;
    double ss = 0;

    ops_row_f32(&nano->embed, ids[t], row);
    for (int64_t j = 0; j < D; j++)
        ss += (double)row[j] * row[j];
    double r = 1.0 / sqrt(ss / (double)D + nano->cfg.norm_eps);
    for (int64_t j = 0; j < D; j++)
        x[j] = (double)(float)((float)(row[j] * (float)r) * ly->attn_norm[j]);
}

/* Layer 0 (KDA) multiplies q, k, v, f_a, b and g_a with rmsnorm(embed[id]) * attn_norm. */
static void
case_layer0(void)
{
    const struct k_layer *ly = &nano->layers[0];
    int64_t D = nano->cfg.d_model, count;
    double *want = tl_calloc((size_t)D, sizeof(double));
    double *x = tl_malloc((size_t)D * sizeof(double));
    float *row = tl_malloc((size_t)D * sizeof(float));

    for (int t = 0; t < N_TOK; t++) {
        layer0_input(t, row, x);
        for (int64_t j = 0; j < D; j++)
            want[j] += x[j] * x[j] / N_TOK;
    }
    const struct tensor *mats[] = {&ly->kda.q_proj, &ly->kda.k_proj, &ly->kda.v_proj,
                                   &ly->kda.f_a, &ly->kda.b_proj, &ly->kda.g_a};
    for (size_t i = 0; i < sizeof(mats) / sizeof(mats[0]); i++) {
        const float *got = file_mean(mats[i], &count);
        double e = got != NULL ? tl_rel_l2_d(got, want, D) : INFINITY;
        ok(count == N_TOK && e < 1e-5, "%s: %lld rows, means within %.2g of rmsnorm(embed)^2",
           mats[i]->name, (long long)count, e);
    }
    free(x);
    free(want);
    free(row);
}

/* Every matrix saw every token, but the routed experts: top_k per token over a layer. */
static void
case_counts(void)
{
    const struct k_config *c = &nano->cfg;
    int64_t count, bad = 0, n = 0;

    for (int i = 0; i < c->n_layers; i++) {
        const struct k_layer *ly = &nano->layers[i];
        if (ly->ffn_kind != KLI_FFN_MOE)
            continue;
        int64_t sum = 0, cr, cs;
        file_mean(&ly->moe.router, &cr);
        file_mean(&ly->moe.shared.down, &cs);
        for (int e = 0; e < c->moe.n_experts; e++) {
            int64_t cg, cu, cd;
            file_mean(&ly->moe.experts[e].gate, &cg);
            file_mean(&ly->moe.experts[e].up, &cu);
            file_mean(&ly->moe.experts[e].down, &cd);
            bad += cg != cu || cg != cd || cg < 0;
            sum += cg;
        }
        ok(sum == (int64_t)N_TOK * c->moe.top_k && cr == N_TOK && cs == N_TOK,
           "layer %d: experts saw %lld rows = %d tokens x top-%d; router %lld, shared %lld",
           i, (long long)sum, N_TOK, c->moe.top_k, (long long)cr, (long long)cs);
        n++;
    }
    ok(n > 0 && bad == 0, "each expert's gate, up and down saw the same rows");
    file_mean(&nano->lm_head, &count);
    int64_t ckvb = -1;
    for (int i = 0; i < c->n_layers; i++) {
        if (nano->layers[i].mixer == KLI_MIXER_MLA)
            file_mean(&nano->layers[i].mla.kv_b, &ckvb);
    }
    ok(count == n_evals && ckvb == N_TOK, "lm_head %lld rows (one per call without logits), "
       "MLA kv_b %lld", (long long)count, (long long)ckvb);
}

/* kli_quantize's reader gives back the file's values for the checkpoint it was made from. */
static void
case_roundtrip(void)
{
    char path[4200];
    struct kli_err err = {0};
    float **imp = NULL;
    int64_t n = wfile_n_tensors(nano->wf), found = 0, same = 1;

    snprintf(path, sizeof(path), "%s/nano.imat", tmpdir);
    int rc = imat_load(path, nano->wf, &imp, &err);
    ok(rc == KLI_OK, "imat_load on its own model (%s)", err.msg);
    for (int64_t i = 0; rc == KLI_OK && i < n; i++) {
        const struct tensor_desc *d = wfile_tensor(nano->wf, i), *f;
        if (imp[i] == NULL)
            continue;
        found++;
        f = wfile_find(saved, d->name);
        same &= f != NULL && memcmp(f->data, imp[i], (size_t)d->shape[1] * 4) == 0;
    }
    ok(found > 50 && same, "%lld matrices weighted, each with the file's values",
       (long long)found);
    imat_imp_free(imp, n);
}

/* A one-matrix imatrix file for nano's lm_head whose value j0 is v (count `count`). */
static void
write_one(const char *path, float v, int64_t count, int64_t width)
{
    struct st_writer *w = NULL;
    struct kli_err err = {0};
    const char *name = nano->lm_head.name;
    char cname[512];
    float *x = tl_calloc((size_t)width, sizeof(float));
    uint8_t c8[8];

    snprintf(cname, sizeof(cname), "%s.count", name);
    struct st_entry e[2] = {{name, "F32", 1, {width}, 4 * (uint64_t)width},
                            {cname, "I64", 1, {1}, 8}};
    x[3] = v;
    util_wr64(c8, (uint64_t)count);
    if (st_writer_open(&w, path, e, 2, &err) != KLI_OK ||
        st_writer_write(w, x, 4 * (uint64_t)width, &err) != KLI_OK ||
        st_writer_write(w, c8, 8, &err) != KLI_OK || st_writer_close(w, &err) != KLI_OK) {
        printf("Bail out! writing %s: %s\n", path, err.msg);
        exit(1);
    }
    free(x);
}

static int
refused(const char *path, const struct wfile *wf, int code, const char *what)
{
    struct kli_err err = {0};
    float **imp = NULL;
    int rc = imat_load(path, wf, &imp, &err);

    diag("%s: %s", what, err.msg);
    imat_imp_free(imp, wfile_n_tensors(wf));
    return rc == code && imp == NULL && strstr(err.msg, path) != NULL;
}

static void
case_refuse(void)
{
    char p[4200], dir[4096];
    int64_t D = nano->cfg.d_model;
    struct kli_model *tiny = open_cpu("tiny-kimi-linear");
    struct kli_err err = {0};
    float **imp = NULL;

    snprintf(p, sizeof(p), "%s/text", tmpdir);
    tl_spill(p, "hello, not safetensors\n", 23);
    ok(refused(p, nano->wf, KLI_E_FORMAT, "text"), "a text file is refused");
    tl_path(dir, sizeof(dir), "tiny-kimi-linear");
    ok(refused(dir, nano->wf, KLI_E_FORMAT, "a checkpoint"), "a model checkpoint is refused");
    snprintf(p, sizeof(p), "%s/nano.imat", tmpdir);
    ok(refused(p, tiny->wf, KLI_E_INVALID, "another model"),
       "an imatrix of nano for the tiny model: made for another model");
    snprintf(p, sizeof(p), "%s/wide.imat", tmpdir);
    write_one(p, 1.0f, 5, D + 32);
    ok(refused(p, nano->wf, KLI_E_INVALID, "width"), "another input width is refused");
    snprintf(p, sizeof(p), "%s/nan.imat", tmpdir);
    write_one(p, NAN, 5, D);
    ok(refused(p, nano->wf, KLI_E_FORMAT, "NaN"), "a NaN mean is refused");
    snprintf(p, sizeof(p), "%s/inf.imat", tmpdir);
    write_one(p, INFINITY, 5, D);
    ok(refused(p, nano->wf, KLI_E_FORMAT, "inf"), "an infinite mean is refused");
    snprintf(p, sizeof(p), "%s/neg.imat", tmpdir);
    write_one(p, -1.0f, 5, D);
    ok(refused(p, nano->wf, KLI_E_FORMAT, "negative"), "a negative mean is refused");
    snprintf(p, sizeof(p), "%s/zero.imat", tmpdir);
    write_one(p, 1.0f, 0, D);
    int rc = imat_load(p, nano->wf, &imp, &err);
    int none = rc == KLI_OK;
    for (int64_t i = 0; none && i < wfile_n_tensors(nano->wf); i++)
        none &= imp[i] == NULL;
    ok(none, "a matrix never seen (count 0) is loaded as unweighted");
    imat_imp_free(imp, wfile_n_tensors(nano->wf));
    kli_model_close(tiny);
}

/* out/model.safetensors of kli_quantize(nano, out, type, imatrix); NULL on failure. */
static char *
quantized_as(const char *name, const char *type, const char *imatrix, int64_t used[2],
             size_t *len)
{
    char in[4096], out[4200], file[4300];
    struct kli_convert_options o;
    struct kli_err err = {0};

    tl_path(in, sizeof(in), "../../contrib/models/kimi-linear-nano");
    snprintf(out, sizeof(out), "%s/%s", tmpdir, name);
    kli_quantize_options_init(&o);
    o.type = type;
    o.imatrix = imatrix;
    o.imatrix_used = used;
    if (kli_quantize(in, out, &o, &err) != KLI_OK) {
        diag("quantize %s: %s", name, err.msg);
        return NULL;
    }
    snprintf(file, sizeof(file), "%s/model.safetensors", out);
    return tl_slurp(file, len);
}

static char *
quantized(const char *name, const char *imatrix, int64_t used[2], size_t *len)
{
    return quantized_as(name, "q4", imatrix, used, len);
}

/* An imatrix that covers nothing seen leaves every byte as without one; the collected one
 * changes them (the weighted quantizer runs). */
static void
case_unweighted(void)
{
    char zero[4200], full[4200];
    int64_t u0[2] = {-1, -1}, u1[2] = {-1, -1}, u2[2] = {-1, -1};
    size_t n0 = 0, n1 = 0, n2 = 0;

    snprintf(zero, sizeof(zero), "%s/zero.imat", tmpdir);
    snprintf(full, sizeof(full), "%s/nano.imat", tmpdir);
    write_one(zero, 1.0f, 0, nano->cfg.d_model);
    char *plain = quantized("plain", NULL, u0, &n0);
    char *none = quantized("none", zero, u1, &n1);
    char *w = quantized("weighted", full, u2, &n2);
    ok(plain != NULL && none != NULL && n0 == n1 && memcmp(plain, none, n0) == 0 &&
       u0[0] == 0 && u0[1] == 0 && u1[0] == 0 && u1[1] > 50,
       "an imatrix that saw nothing: %lld matrices unweighted, the plain q4 bytes",
       (long long)u1[1]);
    ok(w != NULL && n2 == n0 && memcmp(plain, w, n0) != 0 && u2[0] > 50,
       "the collected one weights %lld matrices (%lld not) and changes the bytes",
       (long long)u2[0], (long long)u2[1]);
    free(plain);
    free(none);
    free(w);
}

/* Collects with kli_imatrix_covariance over the ids in case_collect's pieces, to
 * tmpdir/cov.imat. @return the file, or NULL. */
static struct wfile *
collect_cov(void)
{
    struct kli_session *s = NULL;
    struct kli_imatrix *im = NULL;
    struct kli_err err = {0};
    struct wfile *f = NULL;
    char path[4200];
    int rc;

    snprintf(path, sizeof(path), "%s/cov.imat", tmpdir);
    rc = collect(&s, &im, 1, &err);
    rc = rc == KLI_OK ? kli_imatrix_save(im, path, NULL, 0, &err) : rc;
    ok(rc == KLI_OK, "collect with the covariance and save (%s)", err.msg);
    memset(&err, 0, sizeof(err));
    ok(im != NULL && kli_imatrix_covariance(im, &err) == KLI_E_INVALID,
       "asking for it after rows were added is refused: %s", err.msg);
    kli_session_free(s);
    kli_imatrix_free(im);
    if (rc == KLI_OK && wfile_open(&f, path, &err) != KLI_OK)
        diag("%s: %s", path, err.msg);
    return f;
}

/* The covariance of layer 0's q_proj against rmsnorm(embed) x attn_norm computed here;
 * every matrix's: symmetric, its diagonal the file's means. */
static void
case_covariance(void)
{
    const struct k_layer *ly = &nano->layers[0];
    int64_t D = nano->cfg.d_model, nmat = 0;
    const struct wfile *f = covsaved;
    double *want = tl_calloc((size_t)(D * D), sizeof(double));
    float *row = tl_malloc((size_t)D * sizeof(float));
    double *x = tl_malloc((size_t)D * sizeof(double)), worst = 0.0;
    int sym = 1, diag_ok = 1;
    char cname[600];

    for (int t = 0; t < N_TOK; t++) {
        layer0_input(t, row, x);
        for (int64_t a = 0; a < D; a++)
            for (int64_t b = 0; b < D; b++)
                want[a * D + b] += x[a] * x[b] / N_TOK;
    }
    snprintf(cname, sizeof(cname), "%s.cov", ly->kda.q_proj.name);
    const struct tensor_desc *c = f != NULL ? wfile_find(f, cname) : NULL;
    double e = c != NULL && c->ndim == 2 && c->shape[0] == D && c->shape[1] == D
                   ? tl_rel_l2_d(c->data, want, D * D) : INFINITY;
    ok(e < 1e-5, "%s within %.2g of the mean of x x^T computed here", cname, e);
    for (int64_t i = 0; f != NULL && i < wfile_n_tensors(f); i++) {
        const struct tensor_desc *d = wfile_tensor(f, i), *m, *cv;
        if (d->ndim != 2)
            continue;
        size_t len = strlen(d->name) - 4;
        char name[600];
        snprintf(name, sizeof(name), "%.*s", (int)len, d->name);
        m = wfile_find(saved, name);
        cv = d;
        int64_t w = cv->shape[0];
        const float *cd = cv->data;
        if (m == NULL || m->shape[0] != w) {
            diag_ok = 0;
            continue;
        }
        const float *md = m->data;
        for (int64_t a = 0; a < w; a++) {
            double dv = fabs((double)cd[a * w + a] - md[a]);
            worst = dv / (md[a] + 1e-30) > worst ? dv / (md[a] + 1e-30) : worst;
            for (int64_t b = 0; b < a; b++)
                sym &= cd[a * w + b] == cd[b * w + a];
        }
        nmat++;
    }
    diag_ok &= worst < 1e-5;
    ok(nmat > 50 && sym && diag_ok, "%lld covariances, symmetric, each diagonal the means "
       "(worst %.2g)", (long long)nmat, worst);
    free(want);
    free(row);
    free(x);
}

/* Whether imat_load refuses (with code) an imatrix for lm_head, means 1 and count 5, whose
 * covariance is (D + more)^2 of v on the diagonal. */
static int
refused_cov(int64_t more, float v, int code, const char *what)
{
    struct st_writer *w = NULL;
    struct kli_err err = {0};
    const char *name = nano->lm_head.name;
    int64_t D = nano->cfg.d_model, W = D + more;
    char cname[512], vname[512], path[4200];
    float *x = tl_malloc((size_t)(W * W) * sizeof(float));
    float *ones = tl_malloc((size_t)D * sizeof(float));
    uint8_t c8[8];

    snprintf(path, sizeof(path), "%s/badcov.imat", tmpdir);
    snprintf(cname, sizeof(cname), "%s.count", name);
    snprintf(vname, sizeof(vname), "%s.cov", name);
    struct st_entry e[3] = {{name, "F32", 1, {D}, 4 * (uint64_t)D},
                            {cname, "I64", 1, {1}, 8},
                            {vname, "F32", 2, {W, W}, 4 * (uint64_t)(W * W)}};
    for (int64_t i = 0; i < W * W; i++)
        x[i] = i % (W + 1) == 0 ? v : 0.0f;
    for (int64_t i = 0; i < D; i++)
        ones[i] = 1.0f;
    util_wr64(c8, 5);
    int rc = st_writer_open(&w, path, e, 3, &err);
    rc = rc == KLI_OK ? st_writer_write(w, ones, 4 * (uint64_t)D, &err) : rc;
    rc = rc == KLI_OK ? st_writer_write(w, c8, 8, &err) : rc;
    rc = rc == KLI_OK ? st_writer_write(w, x, 4 * (uint64_t)(W * W), &err) : rc;
    rc = rc == KLI_OK ? st_writer_close(w, &err) : rc;
    free(x);
    free(ones);
    if (rc != KLI_OK) {
        diag("writing %s: %s", path, err.msg);
        return 0;
    }
    return refused(path, nano->wf, code, what);
}

/* The covariances loaded (imp[n + i]) change a K type's bytes (error feedback) and leave
 * Q4's as the means alone give them. */
static void
case_feedback(void)
{
    char full[4200], cov[4200];
    struct kli_err err = {0};
    float **imp = NULL;
    int64_t n = wfile_n_tensors(nano->wf), ncov = 0, u[2];
    size_t n0 = 0, n1 = 0, n2 = 0, n3 = 0;

    snprintf(full, sizeof(full), "%s/nano.imat", tmpdir);
    snprintf(cov, sizeof(cov), "%s/cov.imat", tmpdir);
    int rc = imat_load(cov, nano->wf, &imp, &err);
    for (int64_t i = 0; rc == KLI_OK && i < n; i++)
        ncov += imp[n + i] != NULL && imp[i] != NULL;
    ok(rc == KLI_OK && ncov > 50, "imat_load reads %lld covariances (%s)", (long long)ncov,
       err.msg);
    imat_imp_free(imp, n);
    ok(refused_cov(32, 1.0f, KLI_E_FORMAT, "cov width"), "a covariance of another width "
       "is refused");
    ok(refused_cov(0, NAN, KLI_E_FORMAT, "cov NaN"), "a NaN in a covariance is refused");
    ok(!refused_cov(0, -1.0f, KLI_E_FORMAT, "cov negative"), "negative values in a "
       "covariance are read (off the diagonal they are ordinary)");
    char *a = quantized_as("k-means", "q3_k_m", full, u, &n0);
    char *b = quantized_as("k-cov", "q3_k_m", cov, u, &n1);
    char *c = quantized("q4-means", full, u, &n2);
    char *d = quantized("q4-cov", cov, u, &n3);
    ok(a != NULL && b != NULL && n0 == n1 && memcmp(a, b, n0) != 0,
       "q3_k_m: the covariance changes the bytes");
    ok(c != NULL && d != NULL && n2 == n3 && memcmp(c, d, n2) == 0,
       "q4: the covariance is not used, the means' bytes");
    free(a);
    free(b);
    free(c);
    free(d);
}

int
main(int argc, char **argv)
{
    static const struct tap_fn cases[] = {
        {"layer0", case_layer0}, {"counts", case_counts}, {"roundtrip", case_roundtrip},
        {"refuse", case_refuse}, {"unweighted", case_unweighted},
        {"covariance", case_covariance}, {"feedback", case_feedback},
    };
    tap_init(argc, argv);
    if (mkdtemp(tmpdir) == NULL)
        skip_all("mkdtemp failed");
    nano = open_cpu("../../contrib/models/kimi-linear-nano");
    uint64_t r = 7;
    for (int i = 0; i < N_TOK; i++)
        ids[i] = (kli_token)(tl_xorshift(&r) % 2000);
    if (!tap_listing) {
        case_collect();
        covsaved = collect_cov();
    }
    tap_run(cases, sizeof(cases) / sizeof(cases[0]));
    wfile_close(saved);
    wfile_close(covsaved);
    kli_model_close(nano);
    if (tl_rmtree(tmpdir) != 0)
        diag("could not remove %s", tmpdir);
    plan_done();
    return tap_exit();
}
