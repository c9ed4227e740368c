/*
 * test-batch.c - batched decode: n sequences stepped together through
 * kli_session_eval_batch give the logits each would get alone, for n below and above the
 * SGEMM threshold and for sequences of very unequal lengths; the sessions stay independent;
 * bad batches are refused.
 */
#include "config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "tap.h"
#include "testlib.h"

/* Sequences of very unequal lengths in one step, the shortest leading (its scratch serves
 * the step; its own context is small): every sequence gets the logits it gets alone. The
 * leader's attention workspace once served only its own context, and the long sequences'
 * scores [H][n] ran past it (heap-buffer-overflow under AddressSanitizer). One thread, so
 * that the sizes at stake do not depend on the machine's core count. */
static void
unequal_lengths(const char *dir)
{
    enum { NS = 4, STEPS = 3 };
    static const int len[NS] = {3, 700, 1, 300};
    struct kli_model_options mo;
    struct kli_model *m = NULL;
    struct kli_err err = {0};
    struct kli_session *a[NS] = {0}, *b[NS] = {0};
    double worst = 0;
    int ok_all = 1;

    kli_model_options_init(&mo);
    mo.n_threads = 1;
    if (kli_model_open(&m, dir, &mo, &err) != KLI_OK) {
        ok(0, "open with one thread: %s", err.msg);
        return;
    }
    int32_t V = kli_model_n_vocab(m);
    float *alone = malloc((size_t)V * sizeof(float));
    kli_token *p = malloc(1000 * sizeof(kli_token));
    for (int i = 0; i < NS; i++) {
        struct kli_session_options so;
        kli_session_options_init(&so);
        so.ctx_max = i == 0 ? 32 : 0;   /* the leader: a small context of its own */
        so.batch_max = i == 0 ? NS : 0;
        for (int k = 0; k < len[i]; k++)
            p[k] = (kli_token)((k * 37 + i * 11 + 5) % 256);
        if (kli_session_create(&a[i], m, &so, &err) != KLI_OK ||
            kli_session_create(&b[i], m, &so, &err) != KLI_OK ||
            kli_session_eval(a[i], p, len[i], NULL, &err) != KLI_OK ||
            kli_session_eval(b[i], p, len[i], NULL, &err) != KLI_OK) {
            ok_all = 0;
            diag("prefill %d: %s", i, err.msg);
        }
    }
    uint64_t lead_bytes = ok_all ? kli_session_nbytes(b[0]) : 0;
    for (int t = 0; ok_all && t < STEPS; t++) {
        kli_token toks[NS];
        for (int i = 0; i < NS; i++)
            toks[i] = (kli_token)((t * 17 + i * 3 + 2) % 256);
        if (kli_session_eval_batch(b, toks, NS, &err) != KLI_OK) {
            ok_all = 0;
            diag("batch step failed: %s", err.msg);
            break;
        }
        for (int i = 0; i < NS; i++) {
            kli_session_eval(a[i], &toks[i], 1, NULL, &err);
            memcpy(alone, kli_session_logits(a[i]), (size_t)V * sizeof(float));
            double e = tl_rel_l2(kli_session_logits(b[i]), alone, V);
            worst = e > worst ? e : worst;
            ok_all &= kli_session_pos(b[i]) == len[i] + t + 1;
        }
    }
    ok(ok_all && worst < 1e-5, "lengths 3 (leading, ctx_max 32), 700, 1, 300 stepped together "
       "match stepping alone (worst rel L2 %.2e over %d steps)", worst, STEPS);
    /* the leader's buffers grew: the batched logits [NS][V], its attention workspace (to
     * serve 700 tokens) and the MoE rows; the memory it reports counts more than the first */
    ok(ok_all && kli_session_nbytes(b[0]) > lead_bytes + (uint64_t)V * NS * 4,
       "the leader's kli_session_nbytes counts what the step added: %llu -> %llu",
       (unsigned long long)lead_bytes, (unsigned long long)kli_session_nbytes(b[0]));
    for (int i = 0; i < NS; i++) {
        kli_session_free(a[i]);
        kli_session_free(b[i]);
    }
    free(p);
    free(alone);
    kli_model_close(m);
}

int
main(int argc, char **argv)
{
    static const char *size_names[] = {"n1", "n3", "n12"};
    char dir[4096];
    struct kli_model *m = tl_open_model("tiny-kimi-linear", 0);
    struct kli_err err = {0};
    enum { N = 12, STEPS = 6 };

    tap_init(argc, argv);
    tl_path(dir, sizeof(dir), "tiny-kimi-linear");
    int32_t V = kli_model_n_vocab(m);

    int sizes[] = {1, 3, N};
    for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
        if (!tap_case(size_names[si]))
            continue;
        int n = sizes[si];
        struct kli_session *a[N] = {0}, *b[N] = {0};
        float *alone = malloc((size_t)N * STEPS * V * sizeof(float));
        double worst = 0;
        int ok_all = 1;
        /* Different prompt lengths, so the sequences sit at different positions. */
        for (int i = 0; i < n; i++) {
            kli_token p[40];
            int len = 5 + 3 * i;
            for (int k = 0; k < len; k++)
                p[k] = (kli_token)((k * 31 + i * 7 + 3) % 256);
            kli_session_create(&a[i], m, NULL, &err);
            kli_session_create(&b[i], m, NULL, &err);
            kli_session_eval(a[i], p, len, NULL, &err);
            kli_session_eval(b[i], p, len, NULL, &err);
        }
        for (int t = 0; t < STEPS; t++) {
            kli_token toks[N];
            for (int i = 0; i < n; i++) {
                toks[i] = (kli_token)((t * 13 + i * 5 + 1) % 256);
                kli_session_eval(a[i], &toks[i], 1, NULL, &err);
                memcpy(alone + ((size_t)i * STEPS + t) * V, kli_session_logits(a[i]),
                       (size_t)V * sizeof(float));
            }
            if (kli_session_eval_batch(b, toks, n, &err) != KLI_OK) {
                ok_all = 0;
                diag("batch step failed: %s", err.msg);
                break;
            }
            for (int i = 0; i < n; i++) {
                double e = tl_rel_l2(kli_session_logits(b[i]),
                                     alone + ((size_t)i * STEPS + t) * V, V);
                worst = e > worst ? e : worst;
                ok_all &= kli_session_pos(b[i]) == kli_session_pos(a[i]);
            }
        }
        ok(ok_all && worst < 1e-5, "%d sequences stepped together match stepping alone "
           "(worst rel L2 %.2e over %d steps)", n, worst, STEPS);
        /* A later single eval continues each batched sequence correctly. */
        kli_token extra = 42;
        double e2 = 0;
        for (int i = 0; i < n; i++) {
            kli_session_eval(a[i], &extra, 1, NULL, &err);
            kli_session_eval(b[i], &extra, 1, NULL, &err);
            double e = tl_rel_l2(kli_session_logits(b[i]), kli_session_logits(a[i]), V);
            e2 = e > e2 ? e : e2;
        }
        ok(e2 < 1e-5, "%d sequences: the state after the batch carries on (%.2e)", n, e2);
        for (int i = 0; i < n; i++) {
            kli_session_free(a[i]);
            kli_session_free(b[i]);
        }
        free(alone);
    }

    /* refusals */
    if (tap_case("refusals")) {
        struct kli_session *s1 = NULL, *s2 = NULL;
        struct kli_session_options so;
        kli_session_options_init(&so);
        so.batch_max = 2;
        kli_session_create(&s1, m, &so, &err);
        kli_session_create(&s2, m, NULL, &err);
        struct kli_session *dup[2] = {s1, s1}, *three[3] = {s1, s2, s2};
        kli_token tk[3] = {1, 2, 3}, bad[2] = {1, 9999};
        struct kli_session *pair[2] = {s1, s2};
        memset(&err, 0, sizeof(err));
        ok(kli_session_eval_batch(dup, tk, 2, &err) == KLI_E_INVALID, "a session twice: %s",
           err.msg);
        memset(&err, 0, sizeof(err));
        ok(kli_session_eval_batch(three, tk, 3, &err) == KLI_E_RANGE, "more than batch_max: %s",
           err.msg);
        memset(&err, 0, sizeof(err));
        ok(kli_session_eval_batch(pair, bad, 2, &err) == KLI_E_RANGE &&
           kli_session_pos(s1) == 0 && kli_session_pos(s2) == 0,
           "a bad id refuses the whole step: %s", err.msg);
        kli_session_free(s1);
        kli_session_free(s2);
    }
    if (tap_case("unequal_lengths"))
        unequal_lengths(dir);
    kli_model_close(m);
    plan_done();
    return tap_exit();
}
