/*
 * test-reuse.c - kli_session_copy against its slow twin, kli_session_fork: a prompt
 * evaluated in a session with a large batch_max and copied into small sessions (or into
 * cache-sized ones) goes on bit for bit as the original; the copy is independent of its
 * source; refusals leave the destination as it was. Also kli_session_nbytes and
 * kli_session_ctx_max.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "tap.h"
#include "testlib.h"

int
main(int argc, char **argv)
{
    char dir[4096];
    struct kli_model *m;
    struct kli_err err = {0};
    struct kli_session_options o;
    struct kli_session *big = NULL, *forked = NULL, *small = NULL, *tiny = NULL, *src2 = NULL;
    kli_token prompt[300];

    tap_init_whole(argc, argv);
    tl_path(dir, sizeof(dir), "tiny-kimi-linear");
    m = tl_open_model("tiny-kimi-linear", 0);
    int32_t V = kli_model_n_vocab(m);
    for (int i = 0; i < 300; i++)
        prompt[i] = (kli_token)((i * 37 + 11) % 256);

    kli_session_options_init(&o);
    o.ctx_max = 1000;
    kli_session_create(&big, m, &o, &err);   /* batch_max 256: the prefill session */
    o.batch_max = 4;
    kli_session_create(&small, m, &o, &err);
    kli_session_options_init(&o);
    o.ctx_max = 300;
    o.batch_max = 1;
    kli_session_create(&tiny, m, &o, &err);
    ok(big != NULL && small != NULL && tiny != NULL, "sessions created");
    ok(kli_session_ctx_max(big) == 1000 && kli_session_ctx_max(tiny) == 300,
       "kli_session_ctx_max reports the option");

    ok(kli_session_eval(big, prompt, 300, NULL, &err) == KLI_OK, "prompt of 300 tokens");
    ok(kli_session_fork(&forked, big, &err) == KLI_OK, "fork");
    ok(kli_session_copy(small, big, &err) == KLI_OK && kli_session_pos(small) == 300,
       "copy into a session with batch_max 4");
    ok(kli_session_copy(tiny, big, &err) == KLI_OK, "copy into a session with room for "
       "exactly the prompt and batch_max 1");
    const kli_token *h;
    ok(kli_session_tokens(tiny, &h) == 300 && memcmp(h, prompt, sizeof(prompt)) == 0,
       "the copy has the token history");
    ok(memcmp(kli_session_logits(small), kli_session_logits(big), (size_t)V * sizeof(float))
       == 0, "the copy has the logits");
    ok(kli_session_nbytes(tiny) < kli_session_nbytes(small) &&
       kli_session_nbytes(small) < kli_session_nbytes(big),
       "nbytes grows with batch_max (%llu < %llu < %llu)",
       (unsigned long long)kli_session_nbytes(tiny), (unsigned long long)kli_session_nbytes(small),
       (unsigned long long)kli_session_nbytes(big));

    /* The slow twin: a fork goes on exactly as the original, and so must the copies. */
    ok(tl_same_future(forked, small, 5, 3, 17), "a copy goes on bit for bit as a fork");
    ok(kli_session_pos(big) == 300, "the source is unchanged by its copies' evals");

    /* The full context of tiny refuses more tokens; a copy of too many tokens is refused
     * and leaves the destination as it was. */
    kli_token one = 5;
    memset(&err, 0, sizeof(err));
    ok(kli_session_eval(tiny, &one, 1, NULL, &err) == KLI_E_RANGE, "the copy keeps its own "
       "ctx_max: %s", err.msg);
    kli_session_fork(&src2, small, &err);   /* 305 tokens */
    memset(&err, 0, sizeof(err));
    ok(kli_session_copy(tiny, src2, &err) == KLI_E_RANGE && kli_session_pos(tiny) == 300,
       "305 tokens do not fit 300, and the destination is unchanged: %s", err.msg);
    memset(&err, 0, sizeof(err));
    ok(kli_session_copy(tiny, tiny, &err) == KLI_E_INVALID, "a session onto itself: %s",
       err.msg);

    /* Copying the empty state resets. */
    kli_session_reset(big);
    ok(kli_session_copy(small, big, &err) == KLI_OK && kli_session_pos(small) == 0 &&
       kli_session_logits(small) == NULL, "copying an empty session empties the destination");
    struct kli_model *m2 = NULL;
    ok(kli_model_open(&m2, dir, NULL, &err) == KLI_OK && kli_model_fingerprint(m) != 0 &&
       kli_model_fingerprint(m2) == kli_model_fingerprint(m),
       "the fingerprint is the same for the same model");
    kli_model_close(m2);

    kli_session_free(src2);
    kli_session_free(forked);
    kli_session_free(tiny);
    kli_session_free(small);
    kli_session_free(big);
    kli_model_close(m);
    plan_done();
    return tap_exit();
}
