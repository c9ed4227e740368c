/*
 * test-cache.c - the MLA latent cache stored as bf16 or q8_0 (kli_session_options.cache_type)
 * against the f32 cache: the attention over a narrow cache against the f32 attention over
 * the same values widened (its plain twin), the logits of the trained nano model within the
 * rounding of the type, snapshots of each type restored bit for bit, restores across types
 * (converted), copies and forks (prefix reuse) at each type, and the refusals.
 *
 * Tolerances (measured on the nano model, 256 tokens of its README; stated with a margin):
 *   attention, narrow vs widened f32: 1e-5 with every kernel table (the one-pass form widens
 *     each tile of rows and computes in float: the same products summed in another order,
 *     the softmax taken online; measured 3e-7).
 *   logits of every position vs the f32 cache: bf16 1e-3 rel L2 (measured 3.8e-5: bf16
 *     keeps 8 bits, rows round by up to 2^-9), q8_0 3e-3 (measured 2.6e-4: int8 blocks);
 *     about ten times what was measured, as other kernels sum in other orders. Both must
 *     also differ from f32 at all, or the cache was
 *     not narrow. The same bounds for a state restored across types and decoded on.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "mla.h"
#include "model.h"
#include "simd.h"
#include "tap.h"
#include "testlib.h"

#define NANO "../../contrib/models/kimi-linear-nano"
#define NP 256

static struct kli_model *nano;
static kli_token prompt[NP];

static struct kli_session *
sess(int32_t type, int32_t ctx)
{
    return tl_session(nano, ctx, 0, type);
}

/* Feeds the same 4 tokens to both sessions; 1 when their logits agree bit for bit. */
static int
same_future(struct kli_session *a, struct kli_session *b)
{
    return tl_same_future(a, b, 4, 7, 31);
}

static void
case_types(void)
{
    struct kli_model *tiny = tl_open_model("tiny-kimi-linear", 0);
    struct kli_session_options o;
    struct kli_session *s = NULL;
    struct kli_err err = {0};

    ok(strcmp(kli_cache_type_name(KLI_CACHE_BF16), "bf16") == 0 &&
       kli_cache_type_name(3) == NULL && kli_cache_type_name(-1) == NULL, "type names");
    /* nano: one MLA layer of 128 + 64 values per token */
    uint64_t f = kli_model_cache_bytes(nano, KLI_CACHE_F32, 1000);
    uint64_t b = kli_model_cache_bytes(nano, KLI_CACHE_BF16, 1000);
    uint64_t q = kli_model_cache_bytes(nano, KLI_CACHE_Q8_0, 1000);
    ok(f - b == 1000 * 192 * 2 && f - q == 1000 * (192 * 4 - 6 * 34),
       "context bytes differ by the rows' sizes (f32 %llu, bf16 %llu, q8_0 %llu)",
       (unsigned long long)f, (unsigned long long)b, (unsigned long long)q);
    ok(kli_model_cache_bytes(nano, 7, 10) == 0, "no bytes for an unknown type");
    /* tiny: rope 16 is no whole q8_0 block */
    ok(kli_model_cache_bytes(tiny, KLI_CACHE_Q8_0, 10) == 0, "no q8_0 bytes for rope 16");
    kli_session_options_init(&o);
    o.cache_type = KLI_CACHE_Q8_0;
    ok(kli_session_create(&s, tiny, &o, &err) == KLI_E_UNSUPPORTED && s == NULL &&
       strstr(err.msg, "64 latent + 16 rope") != NULL, "q8_0 refused for rows of 64 + 16: %s",
       err.msg);
    memset(&err, 0, sizeof(err));
    o.cache_type = 3;
    ok(kli_session_create(&s, tiny, &o, &err) == KLI_E_INVALID && s == NULL,
       "an unknown cache type refused: %s", err.msg);
    o.cache_type = KLI_CACHE_BF16;
    ok(kli_session_create(&s, tiny, &o, &err) == KLI_OK &&
       kli_session_cache_type(s) == KLI_CACHE_BF16, "bf16 on the tiny model");
    kli_session_free(s);
    kli_model_close(tiny);
}

/* mla_attend over a narrow cache against the f32 attention over the same rows widened: 300
 * rows (split over the workers, in tiles and a partial one), then 40 (one worker: the
 * others' parts, left from the longer context, must not count). */
static void
case_twin(void)
{
    const struct k_config *cfg = &nano->cfg;
    int64_t H = cfg->mla.n_heads, L = cfg->mla.kv_lora_rank, row = mla_row_floats(cfg);
    int64_t n = 300, T = 3;
    enum k_dtype types[2] = {KLI_DT_BF16, KLI_DT_Q8_0};
    uint64_t st = 23;

    float *rows = tl_malloc((size_t)(n * row) * 4), *wide = tl_malloc((size_t)(n * row) * 4);
    uint8_t *narrow = tl_malloc((size_t)(n * row) * 4);
    float *qfull = tl_malloc((size_t)(T * H * row) * 4);
    float *lat0 = tl_malloc((size_t)(T * H * L) * 4), *lat1 = tl_malloc((size_t)(T * H * L) * 4);
    float *work = tl_malloc((size_t)mla_work_floats(cfg, n) * 4);
    float *part = tl_malloc((size_t)(kli_threads() * mla_part_floats(cfg)) * 4);
    for (int64_t i = 0; i < n * row; i++)
        rows[i] = (float)tl_normal(&st);
    for (int64_t i = 0; i < T * H * row; i++)
        qfull[i] = (float)(0.2 * tl_normal(&st));
    for (int k = 0; k < 4; k++) {
        enum k_dtype dt = types[k % 2];
        int64_t rb = mla_row_bytes(cfg, dt), len = k < 2 ? n : 40;
        for (int64_t s = 0; s < n; s++) {
            dtype_from_f32(dt, rows + s * row, narrow + s * rb, row);
            dtype_to_f32(dt, narrow + s * rb, wide + s * row, row);
        }
        struct mla_scratch sc;
        memset(&sc, 0, sizeof(sc));
        sc.qfull = qfull;
        sc.work = work;
        sc.work_n = n;
        sc.part = part;
        int64_t pos = len - T;
        float *c0 = wide, *c1 = (float *)(void *)narrow;
        sc.lat = lat0;
        sc.cache_dt = KLI_DT_F32;
        mla_attend(nano, &c0, &pos, 1, &sc, T);
        sc.lat = lat1;
        sc.cache_dt = dt;
        mla_attend(nano, &c1, &pos, 1, &sc, T);
        double e = tl_rel_l2(lat1, lat0, T * H * L);
        ok(e < 1e-5, "%s cache, %lld rows, %s kernels: attention within 1e-5 of the f32 "
           "attention over the same values: %.3g", k_dtype_name(dt), (long long)len,
           k_kernels()->name, e);
    }
    free(rows);
    free(wide);
    free(narrow);
    free(qfull);
    free(lat0);
    free(lat1);
    free(work);
    free(part);
}

static void
case_logits(void)
{
    struct kli_err err = {0};
    int64_t V = kli_model_n_vocab(nano);
    float *lg[3];
    static const double tol[3] = {0, 1e-3, 3e-3};

    for (int t = 0; t < 3; t++) {
        struct kli_session *s = sess(t, NP);
        lg[t] = tl_malloc((size_t)(NP * V) * sizeof(float));
        ok(s != NULL && kli_session_eval(s, prompt, NP, lg[t], &err) == KLI_OK,
           "%s cache: %d tokens evaluated", kli_cache_type_name(t), NP);
        kli_session_free(s);
    }
    for (int t = 1; t < 3; t++) {
        double e = tl_rel_l2(lg[t], lg[0], NP * V);
        ok(e > 0 && e < tol[t], "%s cache: logits of every position within %.0e of f32 "
           "(and not equal): rel L2 %.3g", kli_cache_type_name(t), tol[t], e);
    }
    for (int t = 0; t < 3; t++)
        free(lg[t]);
}

static void
case_snapshot(void)
{
    struct kli_err err = {0};

    for (int t = 0; t < 3; t++) {
        struct kli_session *a = sess(t, NP + 16), *b = sess(t, NP + 16);
        kli_session_eval(a, prompt, 100, NULL, &err);
        int64_t n = kli_session_snapshot(a, NULL, NULL, 0, &err);
        uint8_t *buf = tl_malloc((size_t)n);
        ok(kli_session_snapshot(a, NULL, buf, n, &err) == n &&
           kli_session_restore(b, NULL, buf, (size_t)n, &err) == KLI_OK &&
           same_future(a, b), "%s cache: a snapshot restored goes on bit for bit",
           kli_cache_type_name(t));
        free(buf);
        kli_session_free(a);
        kli_session_free(b);
    }
}

/* A bf16 (or q8_0) state restored into an f32 session, saved again and restored into a
 * session of its first type: widening is exact and narrowing again gives the same rows, so
 * that session goes on exactly as the first. An f32 state restored into a narrow session
 * goes on within the type's rounding of the f32 one. */
static void
case_cross(void)
{
    struct kli_err err = {0};
    size_t V = (size_t)kli_model_n_vocab(nano);

    for (int t = 1; t < 3; t++) {
        struct kli_session *a = sess(t, NP), *w = sess(KLI_CACHE_F32, NP), *b = sess(t, NP);
        kli_session_eval(a, prompt, 120, NULL, &err);
        int64_t n = kli_session_snapshot(a, NULL, NULL, 0, &err);
        uint8_t *buf = tl_malloc((size_t)n * 4 + 4096);
        kli_session_snapshot(a, NULL, buf, n, &err);
        int rc = kli_session_restore(w, NULL, buf, (size_t)n, &err);
        if (rc != KLI_OK)
            diag("%s", err.msg);
        int64_t n2 = kli_session_snapshot(w, NULL, buf, n * 4 + 4096, &err);
        int rc2 = kli_session_restore(b, NULL, buf, (size_t)n2, &err);
        ok(rc == KLI_OK && rc2 == KLI_OK && kli_session_cache_type(b) == t && same_future(a, b),
           "%s -> f32 -> %s: the rows come back, bit for bit (%lld then %lld bytes)",
           kli_cache_type_name(t), kli_cache_type_name(t), (long long)n, (long long)n2);
        /* f32 state into the narrow type: close to the f32 session's own future */
        kli_session_reset(w);
        kli_session_eval(w, prompt, 120, NULL, &err);
        n2 = kli_session_snapshot(w, NULL, buf, n * 4 + 4096, &err);
        kli_session_reset(b);
        ok(kli_session_restore(b, NULL, buf, (size_t)n2, &err) == KLI_OK,
           "an f32 snapshot restores into a %s session", kli_cache_type_name(t));
        kli_token tok = 42;
        kli_session_eval(w, &tok, 1, NULL, &err);
        kli_session_eval(b, &tok, 1, NULL, &err);
        double e = tl_rel_l2(kli_session_logits(b), kli_session_logits(w), (int64_t)V);
        ok(e < (t == 1 ? 1e-3 : 3e-3), "and goes on within the type's tolerance: %.3g", e);
        free(buf);
        kli_session_free(a);
        kli_session_free(w);
        kli_session_free(b);
    }
}

static void
case_reuse(void)
{
    struct kli_err err = {0};

    for (int t = 0; t < 3; t++) {
        struct kli_session *a = sess(t, NP), *c = sess(t, NP), *f = NULL;
        struct kli_session *other = sess((t + 1) % 3, NP);
        kli_session_eval(a, prompt, 80, NULL, &err);
        ok(kli_session_fork(&f, a, &err) == KLI_OK && kli_session_cache_type(f) == t &&
           kli_session_copy(c, a, &err) == KLI_OK, "%s cache: fork and copy",
           kli_cache_type_name(t));
        ok(same_future(a, c) && kli_session_copy(c, f, &err) == KLI_OK && same_future(f, c),
           "%s: the fork and the copy go on as their source", kli_cache_type_name(t));
        memset(&err, 0, sizeof(err));
        ok(kli_session_copy(other, a, &err) == KLI_E_INVALID && kli_session_pos(other) == 0,
           "a copy into a %s session refused: %s", kli_cache_type_name((t + 1) % 3), err.msg);
        struct kli_session *pair[2] = {a, other};
        kli_token two[2] = {1, 2};
        kli_session_eval(other, prompt, 1, NULL, &err);
        memset(&err, 0, sizeof(err));
        ok(kli_session_eval_batch(pair, two, 2, &err) == KLI_E_INVALID,
           "a batched step over two cache types refused: %s", err.msg);
        kli_session_free(a);
        kli_session_free(c);
        kli_session_free(f);
        kli_session_free(other);
    }
}

static void
case_pad(void)
{
    struct kli_err err = {0};
    struct kli_session *s = sess(KLI_CACHE_BF16, 64);
    const kli_token *h;

    ok(kli_session_pad(s, 5, &err) == KLI_E_INVALID, "pad refuses an empty session");
    kli_session_eval(s, prompt, 3, NULL, &err);
    ok(kli_session_pad(s, 7, &err) == KLI_OK && kli_session_pos(s) == 10 &&
       kli_session_tokens(s, &h) == 10 && h[3] == prompt[0] && h[9] == prompt[0] &&
       h[8] == prompt[2], "pad repeats the history to 10 tokens");
    memset(&err, 0, sizeof(err));
    ok(kli_session_pad(s, 60, &err) == KLI_E_RANGE && kli_session_pos(s) == 10,
       "pad past ctx_max refused: %s", err.msg);
    kli_token tok = 5;
    ok(kli_session_eval(s, &tok, 1, NULL, &err) == KLI_OK, "decoding goes on after a pad");
    kli_session_free(s);
}

int
main(int argc, char **argv)
{
    static const struct tap_fn cases[] = {
        {"types", case_types}, {"twin", case_twin}, {"logits", case_logits},
        {"snapshot", case_snapshot}, {"cross", case_cross}, {"reuse", case_reuse},
        {"pad", case_pad},
    };
    char path[4096];
    struct kli_err err = {0};
    size_t len;

    tap_init(argc, argv);
    diag("kernels: %s", k_kernels()->name);
    nano = tl_open_model(NANO, 0);
    char *text = tl_slurp(tl_path(path, sizeof(path), NANO "/README.md"), &len);
    int64_t n = text != NULL ? kli_tokenize(kli_model_tokenizer(nano), text, len, 0, NULL, 0,
                                            &err) : 0;
    kli_token *ids = tl_malloc((size_t)(n > NP ? n : NP) * sizeof(kli_token));
    kli_tokenize(kli_model_tokenizer(nano), text, len, 0, ids, n, &err);
    if (n < NP) {
        printf("Bail out! the nano README gives %lld tokens, fewer than %d\n", (long long)n,
               NP);
        return 1;
    }
    memcpy(prompt, ids, sizeof(prompt));
    free(ids);
    free(text);
    tap_run(cases, sizeof(cases) / sizeof(cases[0]));
    kli_model_close(nano);
    plan_done();
    return tap_exit();
}
