/*
 * testlib.c - the helpers the C tests share (testlib.h).
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "testlib.h"

#ifndef KLI_TESTDATA_DIR
#define KLI_TESTDATA_DIR "tests/data"
#endif

const char *
tl_data(void)
{
    const char *d = getenv("KLI_TESTDATA");

    return d != NULL && d[0] != '\0' ? d : KLI_TESTDATA_DIR;
}

char *
tl_path(char *buf, size_t cap, const char *rel)
{
    int n = snprintf(buf, cap, "%s/%s", tl_data(), rel);

    if (n < 0 || (size_t)n >= cap) {
        printf("Bail out! the path %s/%s is too long\n", tl_data(), rel);
        exit(1);
    }
    return buf;
}

uint64_t
tl_xorshift(uint64_t *state)
{
    uint64_t x = *state;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return x;
}

uint64_t
tl_splitmix(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

double
tl_unit(uint64_t bits)
{
    return (double)(bits >> 11) / 9007199254740992.0;
}

double
tl_unif(uint64_t *state)
{
    return ((double)(tl_xorshift(state) >> 11) + 0.5) / 9007199254740992.0;
}

double
tl_normal(uint64_t *state)
{
    double u1 = tl_unif(state), u2 = tl_unif(state);

    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* The reference is bf (float) or, when bf is NULL, bd (double). */
static double
rel_l2_of(const float *a, const float *bf, const double *bd, int64_t n)
{
    double num = 0.0, den = 0.0;

    for (int64_t i = 0; i < n; i++) {
        double b = bf != NULL ? (double)bf[i] : bd[i];
        if (!isfinite(a[i]) || !isfinite(b))
            return INFINITY;
        double d = (double)a[i] - b;
        num += d * d;
        den += b * b;
    }
    if (den == 0.0)
        return num == 0.0 ? 0.0 : INFINITY;
    return sqrt(num / den);
}

double
tl_rel_l2(const float *a, const float *b, int64_t n)
{
    return rel_l2_of(a, b, NULL, n);
}

double
tl_rel_l2_d(const float *a, const double *b, int64_t n)
{
    return rel_l2_of(a, NULL, b, n);
}

int32_t
tl_argmax(const float *x, int32_t n)
{
    int32_t best = 0;

    for (int32_t i = 1; i < n; i++)
        best = x[i] > x[best] ? i : best;
    return best;
}

void *
tl_malloc(size_t n)
{
    void *p = malloc(n ? n : 1);

    if (p == NULL) {
        printf("Bail out! out of memory\n");
        exit(1);
    }
    return p;
}

void *
tl_calloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);

    if (p == NULL) {
        printf("Bail out! out of memory\n");
        exit(1);
    }
    return p;
}

char *
tl_slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *b = NULL;
    long n;

    if (f == NULL)
        return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
        b = tl_malloc((size_t)n + 1);
        if (fread(b, 1, (size_t)n, f) != (size_t)n) {
            free(b);
            b = NULL;
        } else {
            b[n] = '\0';
            *len = (size_t)n;
        }
    }
    fclose(f);
    return b;
}

int
tl_spill(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    int ok_ = f != NULL && fwrite(p, 1, n, f) == n;

    if (f != NULL && fclose(f) != 0)
        ok_ = 0;
    return ok_;
}

uint8_t *
tl_pattern(size_t n)
{
    uint8_t *p = tl_malloc(n);

    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(i * 2654435761u >> 13);
    return p;
}

int
tl_feed(int (*write)(void *ctx, const void *p, uint64_t n, struct kli_err *err), void *ctx,
        const uint8_t *src, size_t n, struct kli_err *err)
{
    static const size_t piece[] = {1, 4093, 1000003, 9 << 20, 65536, 777};
    int rc = KLI_OK;

    for (size_t o = 0, i = 0; rc == KLI_OK && o < n; i++) {
        size_t k = piece[i % 6] < n - o ? piece[i % 6] : n - o;

        rc = write(ctx, src + o, k, err);
        o += k;
    }
    return rc;
}

int
tl_append(char *buf, size_t cap, size_t *len, const char *t, size_t n)
{
    if (*len + n >= cap)
        return 0;
    memcpy(buf + *len, t, n);
    *len += n;
    return 1;
}

float *
tl_load_f32(const char *dir, const char *name, size_t count)
{
    char path[4200];
    size_t len = 0;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    char *b = tl_slurp(path, &len);
    if (b == NULL || len != count * sizeof(float)) {
        printf("Bail out! %s: missing or not %zu float32 values (%zu bytes)\n", path, count,
               len);
        exit(1);
    }
    return (float *)(void *)b;
}

struct cJSON *
tl_load_json(const char *dir, const char *name)
{
    char path[4200];
    size_t len = 0;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    char *text = tl_slurp(path, &len);
    cJSON *root = text != NULL ? cJSON_ParseWithLength(text, len) : NULL;
    free(text);
    if (root == NULL) {
        printf("Bail out! cannot read or parse %s\n", path);
        exit(1);
    }
    return root;
}

struct kli_session *
tl_session(struct kli_model *m, int32_t ctx_max, int32_t batch_max, int32_t cache_type)
{
    struct kli_session_options opt;
    struct kli_session *s = NULL;
    struct kli_err err = {0};

    kli_session_options_init(&opt);
    opt.ctx_max = ctx_max;
    opt.batch_max = batch_max;
    opt.cache_type = cache_type;
    if (kli_session_create(&s, m, &opt, &err) != KLI_OK) {
        printf("Bail out! kli_session_create: %s\n", err.msg);
        exit(1);
    }
    return s;
}

int
tl_same_future(struct kli_session *a, struct kli_session *b, int n, kli_token first,
               kli_token step)
{
    struct kli_err err = {0};
    size_t V = (size_t)kli_model_n_vocab(kli_session_model(a));

    for (int t = 0; t < n; t++) {
        kli_token tok = first + step * (kli_token)t;
        if (kli_session_eval(a, &tok, 1, NULL, &err) != KLI_OK ||
            kli_session_eval(b, &tok, 1, NULL, &err) != KLI_OK)
            return 0;
        if (memcmp(kli_session_logits(a), kli_session_logits(b), V * sizeof(float)) != 0)
            return 0;
    }
    return 1;
}

struct kli_model *
tl_open_model(const char *name, int n_threads)
{
    struct kli_model_options opt;

    kli_model_options_init(&opt);
    opt.n_threads = n_threads;
    return tl_open_model_opts(name, &opt);
}

struct kli_model *
tl_open_model_opts(const char *name, const struct kli_model_options *opt)
{
    char dir[4096];
    struct kli_model *m = NULL;
    struct kli_err err = {0};

    tl_path(dir, sizeof(dir), name);
    if (kli_model_open(&m, dir, opt, &err) != KLI_OK) {
        printf("Bail out! cannot open %s: %s\n", dir, err.msg);
        exit(1);
    }
    return m;
}

int
tl_rmtree(const char *dir)
{
    char cmd[4200];

    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

float *
tl_logits(struct kli_model *m, const kli_token *ids, int n, int chunk, struct kli_err *err)
{
    struct kli_session *s = NULL;
    float *out = NULL;

    if (kli_session_create(&s, m, NULL, err) != KLI_OK)
        return NULL;
    int32_t V = kli_model_n_vocab(m);
    int step = chunk > 0 ? chunk : n;
    out = tl_malloc((size_t)n * (size_t)V * sizeof(float));
    for (int i = 0; i < n; i += step) {
        int k = n - i < step ? n - i : step;
        if (kli_session_eval(s, ids + i, k, out + (size_t)i * (size_t)V, err) != KLI_OK) {
            free(out);
            out = NULL;
            break;
        }
    }
    kli_session_free(s);
    return out;
}

float *
tl_logits_of(const char *path, const char *weight_type, const kli_token *ids, int n,
             int32_t *V)
{
    struct kli_model_options mo;
    struct kli_model *m = NULL;
    struct kli_err err = {0};
    float *out = NULL;

    kli_model_options_init(&mo);
    mo.weight_type = weight_type;
    if (kli_model_open(&m, path, &mo, &err) == KLI_OK) {
        *V = kli_model_n_vocab(m);
        out = tl_logits(m, ids, n, 0, &err);
    }
    if (out == NULL)
        printf("# logits of %s: %s\n", path, err.msg);
    kli_model_close(m);
    return out;
}

/* The logits of the models a and b on the same n ids into *la and *lb (to free, NULL when
 * missing). @return their vocabulary size, or 0 when either has none or the two differ. */
static int32_t
logits_pair(const char *a, const char *wa, const char *b, const char *wb, const kli_token *ids,
            int n, float **la, float **lb)
{
    int32_t va = 0, vb = 0;

    *la = tl_logits_of(a, wa, ids, n, &va);
    *lb = tl_logits_of(b, wb, ids, n, &vb);
    return *la != NULL && *lb != NULL && va == vb ? va : 0;
}

double
tl_logits_rel_l2(const char *a, const char *wa, const char *b, const char *wb,
                 const kli_token *ids, int n)
{
    float *la, *lb;
    int32_t V = logits_pair(a, wa, b, wb, ids, n, &la, &lb);
    double e = V > 0 ? tl_rel_l2(la, lb, (int64_t)V * n) : INFINITY;

    free(la);
    free(lb);
    return e;
}

int
tl_same_logits(const char *a, const char *wa, const char *b, const char *wb,
               const kli_token *ids, int n)
{
    float *la, *lb;
    int32_t V = logits_pair(a, wa, b, wb, ids, n, &la, &lb);
    int same = V > 0 && memcmp(la, lb, (size_t)n * (size_t)V * sizeof(float)) == 0;

    free(la);
    free(lb);
    return same;
}
