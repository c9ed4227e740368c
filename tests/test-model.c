/*
 * test-model.c - the whole forward pass through the public API against the golden logits of
 * the official implementation (tests/data/tiny-kimi-linear: float64 reference, see its
 * README): one-call prefill, token-at-a-time, a split prompt, chunked feeding, a small
 * batch_max, reset, and the error paths of kli_session_eval (bad token id, full context)
 * that must leave the session unchanged.
 *
 * Data: tests/data/tiny-kimi-linear (testlib.h).
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "tap.h"
#include "testlib.h"

#define TOL 1e-4
#define MAXTOK 512

static char dir[4096];
static struct kli_model *model;      /* the handle sessions are made from */
static struct kli_model *model_mt;   /* the one opened with 2 threads */
static int32_t V;

static int32_t n_prompt, n_decode, n_split;
static kli_token tokens[MAXTOK];   /* prompt, then decode_tokens */
static float *ref_prefill, *ref_decode, *ref_split;
/* Reads an integer array of golden.json into `out` (at most cap values). */
static int32_t
json_ids(const cJSON *root, const char *key, kli_token *out, int32_t cap)
{
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(root, key), *it;
    int32_t n = 0;

    if (!cJSON_IsArray(a))
        return -1;
    cJSON_ArrayForEach(it, a) {
        if (!cJSON_IsNumber(it) || n >= cap)
            return -1;
        out[n++] = (kli_token)it->valueint;
    }
    return n;
}

static void
load_golden(void)
{
    cJSON *root = tl_load_json(dir, "golden.json");

    n_prompt = json_ids(root, "prompt", tokens, MAXTOK);
    n_decode = n_prompt > 0 ? json_ids(root, "decode_tokens", tokens + n_prompt,
                                       MAXTOK - n_prompt) : -1;
    const cJSON *sp = cJSON_GetObjectItemCaseSensitive(root, "split");
    const cJSON *vo = cJSON_GetObjectItemCaseSensitive(root, "vocab");
    n_split = cJSON_IsNumber(sp) ? sp->valueint : -1;
    if (n_prompt <= 0 || n_decode <= 0 || n_split <= 0 || n_split >= n_prompt ||
        !cJSON_IsNumber(vo) || vo->valueint != V) {
        printf("Bail out! %s/golden.json: unexpected content (prompt %d, decode %d, "
               "split %d)\n", dir, n_prompt, n_decode, n_split);
        exit(1);
    }
    diag("golden: %d prompt tokens, %d decode tokens, split at %d, vocab %d", n_prompt,
         n_decode, n_split, V);
    cJSON_Delete(root);
}

static struct kli_session *
new_session(int32_t ctx_max, int32_t batch_max)
{
    return tl_session(model, ctx_max, batch_max, KLI_CACHE_F32);
}

/* Evaluates tokens [t0, t0+n) in one call, writing their logits at rows t0.. of `all`. */
static int
eval_rows(struct kli_session *s, int32_t t0, int32_t n, float *all)
{
    struct kli_err err = {0};
    int rc = kli_session_eval(s, tokens + t0, n, all + (int64_t)t0 * V, &err);

    if (rc != KLI_OK)
        diag("kli_session_eval(%d tokens at %d): %d %s", n, t0, rc, err.msg);
    return rc == KLI_OK;
}

/* Compares the logits of a full prompt+decode run: rows [0, n_prompt) against `ref_p`
 * (prefill or split reference), rows [n_prompt, n_prompt+n_decode) against the decode
 * reference, and the greedy tokens. */
static void
check_run(const char *what, const float *all, const float *ref_p)
{
    double ep = tl_rel_l2(all, ref_p, (int64_t)n_prompt * V);
    double ed = tl_rel_l2(all + (int64_t)n_prompt * V, ref_decode, (int64_t)n_decode * V);
    int am_ref = 1, am_tok = 1;

    diag("%s: prompt rows rel L2 %.3g, decode rows rel L2 %.3g", what, ep, ed);
    ok(ep < TOL, "%s: prompt logits [%d][%d] within %g: %.3g", what, n_prompt, V, TOL, ep);
    ok(ed < TOL, "%s: decode logits [%d][%d] within %g: %.3g", what, n_decode, V, TOL, ed);
    for (int32_t i = 0; i < n_decode; i++) {
        const float *row = all + (int64_t)(n_prompt + i) * V;
        int32_t a = tl_argmax(row, V), r = tl_argmax(ref_decode + (int64_t)i * V, V);
        if (a != r) {
            am_ref = 0;
            diag("%s: decode row %d argmax %d, reference %d", what, i, a, r);
        }
        if (i + 1 < n_decode && a != tokens[n_prompt + i + 1]) {
            am_tok = 0;
            diag("%s: decode row %d argmax %d, decode_tokens[%d] = %d", what, i, a, i + 1,
                 tokens[n_prompt + i + 1]);
        }
    }
    int32_t a0 = tl_argmax(all + (int64_t)(n_prompt - 1) * V, V);
    ok(am_ref, "%s: argmax of every decode row equals the reference's", what);
    ok(am_tok && a0 == tokens[n_prompt],
       "%s: greedy continuation equals decode_tokens (first %d, wanted %d)", what, a0,
       tokens[n_prompt]);
}

int
main(int argc, char **argv)
{
    (void)plan;   /* tap.h: the plan is printed at the end instead */
    (void)skip_all;
    tap_init(argc, argv);
    tl_path(dir, sizeof(dir), "tiny-kimi-linear");
    model_mt = tl_open_model("tiny-kimi-linear", 2);
    model = model_mt;
    diag("first on 2 threads");
    V = kli_model_n_vocab(model);
    diag("kernels: %s", kli_simd_variant());
    load_golden();
    ref_prefill = tl_load_f32(dir, "ref64_prefill.f32", (size_t)n_prompt * (size_t)V);
    ref_decode = tl_load_f32(dir, "ref64_decode.f32", (size_t)n_decode * (size_t)V);
    ref_split = tl_load_f32(dir, "ref64_split.f32", (size_t)n_prompt * (size_t)V);

    int32_t N = n_prompt + n_decode;
    size_t all_bytes = (size_t)N * (size_t)V * sizeof(float);
    float *first = tl_malloc(all_bytes), *all = tl_malloc(all_bytes);

    int two_threads = tap_case("two_threads");

    /* 1. The prompt in one call, logits for every position; then greedy decoding one
     *    token at a time (the generation path). */
    if (two_threads) {
        struct kli_session *s = new_session(0, 0);
        int good = eval_rows(s, 0, n_prompt, first);
        ok(good && kli_session_pos(s) == n_prompt, "one-call prefill: pos %d",
           kli_session_pos(s));
        const float *last = kli_session_logits(s);
        ok(last != NULL && memcmp(last, first + (int64_t)(n_prompt - 1) * V,
                                  (size_t)V * sizeof(float)) == 0,
           "kli_session_logits is the last row of the call's logits");
        for (int32_t i = 0; i < n_decode && good; i++)
            good = eval_rows(s, n_prompt + i, 1, first);
        ok(good, "decode steps");
        check_run("prefill + decode", first, ref_prefill);

        /* Reset: the session is as new, and running again gives the same bits. */
        kli_session_reset(s);
        ok(kli_session_pos(s) == 0 && kli_session_logits(s) == NULL,
           "after reset: pos %d, logits %s", kli_session_pos(s),
           kli_session_logits(s) == NULL ? "NULL" : "not NULL");
        memset(all, 0, all_bytes);
        good = eval_rows(s, 0, n_prompt, all);
        for (int32_t i = 0; i < n_decode && good; i++)
            good = eval_rows(s, n_prompt + i, 1, all);
        ok(good && memcmp(all, first, all_bytes) == 0,
           "after reset the same run gives bitwise identical logits");
        kli_session_free(s);
    }

    /* 2. batch_max 7: every call is computed 7 tokens at a time. */
    if (two_threads) {
        struct kli_session *s = new_session(0, 7);
        int good = eval_rows(s, 0, N, all);
        ok(good && kli_session_pos(s) == N, "batch_max 7, one call of %d: pos %d", N,
           kli_session_pos(s));
        check_run("batch_max 7", all, ref_prefill);
        double e = tl_rel_l2(all, first, (int64_t)N * V);
        ok(e < 1e-5, "batch_max 7 vs batch_max 256 run: %.3g", e);
        kli_session_free(s);
    }

    /* The checks above ran on 2 threads. The rest makes hundreds of small evals, where
     * OpenMP's spinning barriers cost a scheduler slice each on a loaded machine, so they
     * run on one thread: the thread count is set by the last kli_model_open. */
    model = tl_open_model("tiny-kimi-linear", 1);
    diag("now on 1 thread");

    /* 3. One token at a time from the start, reading kli_session_logits (logits NULL). */
    if (tap_case("token_at_a_time")) {
        struct kli_session *s = new_session(0, 0);
        int good = 1;
        for (int32_t i = 0; i < N && good; i++) {
            struct kli_err e = {0};
            good = kli_session_eval(s, tokens + i, 1, NULL, &e) == KLI_OK;
            const float *l = kli_session_logits(s);
            if (!good || l == NULL) {
                diag("token %d: %s", i, e.msg);
                good = 0;
                break;
            }
            memcpy(all + (int64_t)i * V, l, (size_t)V * sizeof(float));
        }
        ok(good && kli_session_pos(s) == N, "token at a time: %d evals, pos %d", N,
           kli_session_pos(s));
        check_run("token at a time", all, ref_prefill);
        kli_session_free(s);
    }

    /* 4. The prompt as two calls, 100 then 50 tokens, against ref64_split. */
    if (tap_case("split")) {
        struct kli_session *s = new_session(0, 0);
        int good = eval_rows(s, 0, n_split, all) &&
                   eval_rows(s, n_split, n_prompt - n_split, all);
        double es = tl_rel_l2(all, ref_split, (int64_t)n_prompt * V);
        double ep = tl_rel_l2(all, ref_prefill, (int64_t)n_prompt * V);
        diag("split %d + %d: vs ref64_split %.3g, vs ref64_prefill %.3g", n_split,
             n_prompt - n_split, es, ep);
        ok(good && es < TOL, "split %d + %d: logits vs ref64_split: %.3g", n_split,
           n_prompt - n_split, es);
        ok(good && ep < TOL, "split %d + %d: logits vs ref64_prefill: %.3g", n_split,
           n_prompt - n_split, ep);
        kli_session_free(s);
    }

    /* 5. The whole token list in calls of at most 100 (kli logits --chunk 100). */
    if (tap_case("chunks")) {
        struct kli_session *s = new_session(0, 0);
        int good = 1;
        for (int32_t i = 0; i < N && good; i += 100)
            good = eval_rows(s, i, N - i < 100 ? N - i : 100, all);
        ok(good, "chunks of 100: evals succeed");
        check_run("chunks of 100", all, ref_split);
        kli_session_free(s);
    }

    /* 6. A token id out of range fails with KLI_E_RANGE and changes nothing: the valid
     *    tokens before it in the same call are not consumed either. */
    if (tap_case("bad_token")) {
        struct kli_session *s = new_session(0, 0);
        float *saved = tl_malloc((size_t)V * sizeof(float));
        int good = eval_rows(s, 0, n_split, all);
        memcpy(saved, kli_session_logits(s), (size_t)V * sizeof(float));
        static const kli_token bad_ids[] = {-1, 512, INT32_MAX, INT32_MIN};
        for (size_t b = 0; b < sizeof(bad_ids) / sizeof(bad_ids[0]); b++) {
            kli_token bad[3] = {tokens[n_split], tokens[n_split + 1], bad_ids[b]};
            struct kli_err e = {0};
            float *junk = tl_malloc(3 * (size_t)V * sizeof(float));
            int rc = kli_session_eval(s, bad, 3, junk, &e);
            ok(rc == KLI_E_RANGE && e.code == KLI_E_RANGE && e.msg[0] != '\0' &&
               kli_session_pos(s) == n_split,
               "token id %d: rc %d (KLI_E_RANGE = %d), pos %d, \"%s\"", bad_ids[b], rc,
               KLI_E_RANGE, kli_session_pos(s), e.msg);
            free(junk);
        }
        ok(kli_session_logits(s) != NULL &&
           memcmp(kli_session_logits(s), saved, (size_t)V * sizeof(float)) == 0,
           "bad token ids: last logits unchanged");
        good = good && eval_rows(s, n_split, n_prompt - n_split, all);
        double es = tl_rel_l2(all, ref_split, (int64_t)n_prompt * V);
        ok(good && es < TOL, "after the failed calls the prompt continues as if none "
           "happened: vs ref64_split %.3g", es);
        free(saved);
        kli_session_free(s);
    }

    /* 7. ctx_max: a call that would exceed it fails with KLI_E_RANGE and changes nothing. */
    if (tap_case("ctx_max")) {
        struct kli_session *s = new_session(10, 0);
        struct kli_err e = {0};
        int rc = kli_session_eval(s, tokens, 11, NULL, &e);
        ok(rc == KLI_E_RANGE && kli_session_pos(s) == 0 && kli_session_logits(s) == NULL,
           "ctx_max 10: 11 tokens at once: rc %d, pos %d (\"%s\")", rc, kli_session_pos(s),
           e.msg);
        int good = eval_rows(s, 0, 8, all);
        float *saved = tl_malloc((size_t)V * sizeof(float));
        memcpy(saved, kli_session_logits(s), (size_t)V * sizeof(float));
        memset(&e, 0, sizeof(e));
        rc = kli_session_eval(s, tokens + 8, 3, NULL, &e);
        ok(rc == KLI_E_RANGE && e.code == KLI_E_RANGE && kli_session_pos(s) == 8 &&
           memcmp(kli_session_logits(s), saved, (size_t)V * sizeof(float)) == 0,
           "ctx_max 10: 8 + 3 tokens: rc %d, pos %d, logits unchanged (\"%s\")", rc,
           kli_session_pos(s), e.msg);
        good = good && eval_rows(s, 8, 2, all);
        ok(good && kli_session_pos(s) == 10, "ctx_max 10: 8 + 2 tokens fit: pos %d",
           kli_session_pos(s));
        memset(&e, 0, sizeof(e));
        rc = kli_session_eval(s, tokens + 10, 1, NULL, &e);
        ok(rc == KLI_E_RANGE && kli_session_pos(s) == 10,
           "ctx_max 10: an 11th token: rc %d, pos %d (\"%s\")", rc, kli_session_pos(s),
           e.msg);
        double ep = tl_rel_l2(all, ref_prefill, 10 * (int64_t)V);
        ok(ep < TOL, "ctx_max 10: the 10 rows computed vs ref64_prefill: %.3g", ep);
        free(saved);
        kli_session_free(s);
    }

    free(first);
    free(all);
    free(ref_prefill);
    free(ref_decode);
    free(ref_split);
    kli_model_close(model);
    kli_model_close(model_mt);
    plan_done();
    return tap_exit();
}
