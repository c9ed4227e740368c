/*
 * test-sampler.c - sampling: greedy, seeds, top-k/top-p/min-p, penalties, bad options,
 * and the sampled frequencies against the softmax they should follow.
 */
#include "config.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "tap.h"

static struct kli_sampler *
mk(struct kli_sampler_options *o, int32_t V)
{
    struct kli_sampler *s = NULL;
    struct kli_err err = {0};

    if (kli_sampler_create(&s, o, V, &err) != KLI_OK)
        diag("create failed: %s", err.msg);
    return s;
}

int
main(void)
{
    struct kli_sampler_options o;
    struct kli_sampler *s;
    struct kli_err err;
    float l3[3] = {logf(0.5f), logf(0.3f), logf(0.2f)};

    /* greedy, ties to the lowest id */
    kli_sampler_options_init(&o);
    o.temperature = 0;
    s = mk(&o, 5);
    float tie[5] = {1, 3, 2, 3, -1};
    ok(kli_sampler_sample(s, tie) == 1, "greedy picks the argmax, ties to the lower id");
    float nan[5] = {NAN, 1, 0, -1, -2};
    ok(kli_sampler_sample(s, nan) == 1, "a NaN logit is never picked");
    float allnan[5] = {NAN, NAN, NAN, NAN, NAN};
    ok(kli_sampler_sample(s, allnan) == 0, "all NaN: id 0");
    float ninf[5] = {NAN, -INFINITY, -INFINITY, -1e30f, -INFINITY};
    ok(kli_sampler_sample(s, ninf) == 3, "the only finite logit among -inf and NaN");
    kli_sampler_free(s);

    /* greedy over a large vocabulary with NaNs and repeated maxima, after accepted tokens
     * with neutral penalties (the one-pass path), against an argmax written here */
    {
        enum { NV = 100003 };
        float *big = malloc(NV * sizeof(float));
        int32_t want = -1, bad = 0;
        kli_sampler_options_init(&o);
        o.temperature = 0;
        s = mk(&o, NV);
        uint32_t r = 12345;
        for (int round = 0; round < 4; round++) {
            for (int i = 0; i < NV; i++) {
                r = r * 1664525u + 1013904223u;
                big[i] = (r >> 8) % 97 == 0 ? NAN : (float)((r >> 8) % 100000) * 1e-3f;
            }
            big[777 + round] = 200.0f;     /* two equal maxima: the lower id wins */
            big[90000 - round] = 200.0f;
            want = -1;
            for (int i = 0; i < NV; i++) {
                if (big[i] == big[i] && (want < 0 || big[i] > big[want]))
                    want = i;
            }
            kli_sampler_accept(s, (kli_token)(round * 10));
            bad += kli_sampler_sample(s, big) != want;
        }
        ok(bad == 0 && want == 780, "greedy over %d logits with NaNs and ties: the reference "
           "argmax in 4 of 4 rounds", NV);
        kli_sampler_free(s);
        free(big);
    }

    /* frequencies follow the softmax */
    kli_sampler_options_init(&o);
    o.temperature = 1;
    o.top_p = 1;
    s = mk(&o, 3);
    int cnt[3] = {0};
    for (int i = 0; i < 20000; i++)
        cnt[kli_sampler_sample(s, l3)]++;
    ok(fabs(cnt[0] / 20000.0 - 0.5) < 0.02 && fabs(cnt[1] / 20000.0 - 0.3) < 0.02 &&
       fabs(cnt[2] / 20000.0 - 0.2) < 0.02, "frequencies %d %d %d follow 0.5/0.3/0.2", cnt[0],
       cnt[1], cnt[2]);
    kli_sampler_free(s);

    /* temperature 2 flattens: p ~ sqrt(p) renormalised */
    o.temperature = 2;
    s = mk(&o, 3);
    memset(cnt, 0, sizeof(cnt));
    for (int i = 0; i < 20000; i++)
        cnt[kli_sampler_sample(s, l3)]++;
    double z = sqrt(0.5) + sqrt(0.3) + sqrt(0.2);
    ok(fabs(cnt[0] / 20000.0 - sqrt(0.5) / z) < 0.02 && fabs(cnt[2] / 20000.0 - sqrt(0.2) / z) <
       0.02, "temperature 2: %d %d %d", cnt[0], cnt[1], cnt[2]);
    kli_sampler_free(s);

    /* top-p 0.75 keeps {0.5, 0.3}: 0.625 / 0.375 */
    o.temperature = 1;
    o.top_p = 0.75f;
    s = mk(&o, 3);
    memset(cnt, 0, sizeof(cnt));
    for (int i = 0; i < 20000; i++)
        cnt[kli_sampler_sample(s, l3)]++;
    ok(cnt[2] == 0 && fabs(cnt[0] / 20000.0 - 0.625) < 0.02, "top-p 0.75: %d %d %d", cnt[0],
       cnt[1], cnt[2]);
    kli_sampler_free(s);

    /* top-k 1 and min-p 1 are greedy */
    o.top_p = 1;
    o.top_k = 1;
    s = mk(&o, 3);
    int only0 = 1;
    for (int i = 0; i < 2000; i++)
        only0 &= kli_sampler_sample(s, l3) == 0;
    ok(only0, "top-k 1 always picks the best");
    kli_sampler_free(s);
    o.top_k = 0;
    o.min_p = 0.5f;   /* keeps p >= 0.25: {0.5, 0.3} */
    s = mk(&o, 3);
    memset(cnt, 0, sizeof(cnt));
    for (int i = 0; i < 5000; i++)
        cnt[kli_sampler_sample(s, l3)]++;
    ok(cnt[2] == 0 && cnt[1] > 0, "min-p 0.5 drops the 0.2 token (%d %d %d)", cnt[0], cnt[1],
       cnt[2]);
    kli_sampler_free(s);

    /* the same seed gives the same stream; reset restarts it */
    kli_sampler_options_init(&o);
    o.temperature = 1;
    o.top_p = 1;
    o.seed = 42;
    struct kli_sampler *a = mk(&o, 3), *b = mk(&o, 3);
    int same = 1, seq[64];
    for (int i = 0; i < 64; i++) {
        seq[i] = kli_sampler_sample(a, l3);
        same &= seq[i] == kli_sampler_sample(b, l3);
    }
    ok(same, "the same seed gives the same tokens");
    kli_sampler_reset(a);
    same = 1;
    for (int i = 0; i < 64; i++)
        same &= seq[i] == kli_sampler_sample(a, l3);
    ok(same, "reset restarts the stream");
    kli_sampler_free(b);
    o.seed = 43;
    b = mk(&o, 3);
    int diff = 0;
    for (int i = 0; i < 64; i++)
        diff |= seq[i] != kli_sampler_sample(b, l3);
    ok(diff, "another seed gives another stream");
    kli_sampler_free(a);
    kli_sampler_free(b);

    /* penalties: repeat penalty 2 halves a positive logit of a seen token */
    kli_sampler_options_init(&o);
    o.temperature = 0;
    o.repeat_penalty = 2;
    s = mk(&o, 3);
    float lp[3] = {3, 2, -1};
    kli_sampler_accept(s, 0);
    ok(kli_sampler_sample(s, lp) == 1, "repeat penalty moves the pick (3/2 < 2)");
    kli_sampler_free(s);
    o.repeat_penalty = 1;
    o.frequency_penalty = 0.6f;
    s = mk(&o, 3);
    kli_sampler_accept(s, 0);
    ok(kli_sampler_sample(s, lp) == 0, "one occurrence: 3 - 0.6 still best");
    kli_sampler_accept(s, 0);
    ok(kli_sampler_sample(s, lp) == 1, "two occurrences: 3 - 1.2 < 2");
    kli_sampler_free(s);
    o.frequency_penalty = 0;
    o.presence_penalty = 1.5f;
    o.penalty_last_n = 2;
    s = mk(&o, 3);
    kli_sampler_accept(s, 0);
    ok(kli_sampler_sample(s, lp) == 1, "presence penalty 1.5 on the seen token");
    kli_sampler_accept(s, 2);
    kli_sampler_accept(s, 2);
    ok(kli_sampler_sample(s, lp) == 0, "the window of 2 forgot the token");
    kli_sampler_free(s);

    /* bad options */
    struct {
        const char *what;
        float t, p, mp, rp;
        int k;
    } bad[] = {
        {"negative temperature", -1, 0.9f, 0, 1, 0},
        {"top-p 0", 0.7f, 0, 0, 1, 0},
        {"top-p above 1", 0.7f, 1.5f, 0, 1, 0},
        {"min-p above 1", 0.7f, 0.9f, 2, 1, 0},
        {"repeat penalty 0", 0.7f, 0.9f, 0, 0, 0},
        {"negative top-k", 0.7f, 0.9f, 0, 1, -3},
        {"NaN temperature", NAN, 0.9f, 0, 1, 0},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        kli_sampler_options_init(&o);
        o.temperature = bad[i].t;
        o.top_p = bad[i].p;
        o.min_p = bad[i].mp;
        o.repeat_penalty = bad[i].rp;
        o.top_k = bad[i].k;
        memset(&err, 0, sizeof(err));
        s = NULL;
        int rc = kli_sampler_create(&s, &o, 3, &err);
        ok(rc == KLI_E_RANGE && s == NULL && err.msg[0], "%s refused: %s", bad[i].what, err.msg);
    }
    kli_sampler_free(NULL);
    plan_done();
    return tap_exit();
}
