/*
 * test-sampler.c - sampling: greedy, seeds, top-k/top-p/min-p, penalties, bad options,
 * and the sampled frequencies against the softmax they should follow.
 *
 * White-box part (sampler.h): the set a draw chooses from (the sampler groups candidates
 * into buckets of logit and sorts only where a cut falls), from 3 to 163,840 candidates,
 * against a reference made here that sorts every candidate: the same tokens, the same
 * probabilities.
 * kli_sampler_sample_many against each sampler alone. The log-probabilities a sampler records
 * against that reference (and a softmax of the penalised logits for greedy). Temperatures, logits, cuts and penalties
 * at their extremes (1e-39 overflowed logit / T to inf and crashed the cut).
 */
#include "config.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "sampler.h"
#include "tap.h"
#include "testlib.h"

static struct kli_sampler *
mk(struct kli_sampler_options *o, int32_t V)
{
    struct kli_sampler *s = NULL;
    struct kli_err err = {0};

    if (kli_sampler_create(&s, o, V, &err) != KLI_OK)
        diag("create failed: %s", err.msg);
    return s;
}

/* The defaults, but for these settings. */
static void
opts_set(struct kli_sampler_options *o, float temp, float top_p, float min_p, float rp,
         int top_k)
{
    kli_sampler_options_init(o);
    o->temperature = temp;
    o->top_p = top_p;
    o->min_p = min_p;
    o->repeat_penalty = rp;
    o->top_k = top_k;
}

/* How often a fresh sampler with options o picks each token of the 3 logits l in n draws. */
static void
counts3(struct kli_sampler_options *o, const float *l, int n, int cnt[3])
{
    struct kli_sampler *s = mk(o, 3);

    cnt[0] = cnt[1] = cnt[2] = 0;
    for (int i = 0; i < n; i++)
        cnt[kli_sampler_sample(s, l)]++;
    kli_sampler_free(s);
}

/* ---- the support against a full sort ------------------------------------------------------ */

#define TSEED 0x243f6a8885a308d3ull

static uint64_t trng = TSEED;

/* Uniform in [0, 1). */
static double
tuni(void)
{
    return tl_unit(tl_xorshift(&trng));
}

struct rc {
    double z;
    int id;
};

static int
rc_cmp(const void *a, const void *b)
{
    const struct rc *x = a, *y = b;

    if (x->z != y->z)
        return x->z > y->z ? -1 : 1;
    return x->id - y->id;
}

/* The reference: every finite logit within 30 nats (after temperature) of the best, sorted,
 * then top-k, min-p and top-p in that order. Fills prob[id] (0 for tokens left out) with the
 * normalised probabilities. @return the number kept. */
static int
ref_support(const float *l, int V, float temp, int top_k, float top_p, float min_p,
            double *prob)
{
    struct rc *c = malloc((size_t)V * sizeof(*c));
    double mx = -INFINITY;
    int n = 0;

    for (int i = 0; i < V; i++) {
        prob[i] = 0;
        if (l[i] == l[i] && (double)(l[i] / temp) > mx)
            mx = (double)(l[i] / temp);
    }
    for (int i = 0; i < V; i++) {
        double z = l[i] == l[i] ? (double)(l[i] / temp) : -INFINITY;
        if (z >= mx - 30.0) {
            c[n].z = z;
            c[n].id = i;
            n++;
        }
    }
    qsort(c, (size_t)n, sizeof(*c), rc_cmp);
    if (top_k > 0 && top_k < n)
        n = top_k;
    double total = 0;
    int k = 0;
    for (; k < n; k++) {
        double p = exp(c[k].z - mx);
        if (min_p > 0 && p < min_p)
            break;
        total += p;
    }
    n = k;
    if (top_p < 1) {
        double acc = 0;
        for (k = 0; k < n;) {
            acc += exp(c[k++].z - mx);
            if (acc >= top_p * total)
                break;
        }
        n = k;
        total = acc;
    }
    for (int i = 0; i < n; i++)
        prob[c[i].id] = exp(c[i].z - mx) / total;
    free(c);
    return n;
}

static void
test_support(void)
{
    const int Vs[] = {300, 5000, 163840};
    const float spreads[] = {2.0f, 12.0f, 60.0f};
    const float temps[] = {0.6f, 1.0f, 1.7f};
    const int topks[] = {0, 40, 2000};
    const float topps[] = {1.0f, 0.9f, 0.4f};
    const float minps[] = {0.0f, 0.02f};
    int cases = 0, bad = 0, big = 0;
    double worst = 0;

    for (int vi = 0; vi < 3; vi++) {
        int V = Vs[vi];
        float *l = malloc((size_t)V * sizeof(float));
        double *prob = malloc((size_t)V * sizeof(double));
        char *seen = malloc((size_t)V);
        for (int si = 0; si < 3; si++) {
            for (int i = 0; i < V; i++)   /* the first spread quantised, so many logits tie */
                l[i] = si == 0 ? (float)floor(tuni() * spreads[si] * 64.0) / 64.0f
                               : (float)(tuni() * spreads[si]);
            l[V / 3] = NAN;
            l[V / 2] = -INFINITY;
            for (int c = 0; c < 3 * 3 * 3 * 2; c++) {
                if (V == 163840 && c % 5 != 0)
                    continue;   /* a sample of the settings at full vocabulary size */
                struct kli_sampler_options o;
                kli_sampler_options_init(&o);
                o.temperature = temps[c % 3];
                o.top_k = topks[(c / 3) % 3];
                o.top_p = topps[(c / 9) % 3];
                o.min_p = minps[(c / 27) % 2];
                struct kli_sampler *s = mk(&o, V);
                double sum = 0;
                kli_token tok = -1;
                int32_t n = sampler_support(s, l, &sum, &tok);
                int want = ref_support(l, V, o.temperature, o.top_k, o.top_p, o.min_p, prob);
                int good = n == want;
                memset(seen, 0, (size_t)V);
                for (int32_t i = 0; i < n && good; i++) {
                    kli_token id;
                    float w;
                    sampler_support_at(s, i, &id, &w);
                    good &= id >= 0 && id < V && !seen[id] && prob[id] > 0;
                    if (!good)
                        break;
                    seen[id] = 1;
                    double e = fabs((double)w / sum - prob[id]) / prob[id];
                    worst = e > worst ? e : worst;
                    good &= e < 1e-5;
                }
                if (!good)
                    diag("V %d spread %g T %g top-k %d top-p %g min-p %g: %d tokens, want %d",
                         V, spreads[si], o.temperature, o.top_k, o.top_p, o.min_p, n, want);
                bad += !good;
                big += n > 1024 || want > 1024;
                cases++;
                kli_sampler_free(s);
            }
        }
        free(l);
        free(prob);
        free(seen);
    }
    ok(bad == 0 && big > 10, "the set a draw chooses from equals a full sort's: %d settings (%d "
       "with over 1024 candidates), probabilities within %.1e", cases, big, worst);

    /* the bucketed path's draws follow those probabilities */
    {
        int V = 3000;
        float *l = malloc((size_t)V * sizeof(float));
        for (int i = 0; i < V; i++)
            l[i] = (float)tuni();
        l[7] = 6.0f;
        l[2500] = 5.0f;
        struct kli_sampler_options o;
        kli_sampler_options_init(&o);
        o.temperature = 1.0f;
        o.top_p = 1.0f;
        struct kli_sampler *s = mk(&o, V);
        double z = 0;
        for (int i = 0; i < V; i++)
            z += exp(l[i] - 6.0);
        int c7 = 0, c2500 = 0;
        for (int i = 0; i < 20000; i++) {
            kli_token t = kli_sampler_sample(s, l);
            c7 += t == 7;
            c2500 += t == 2500;
        }
        double f7 = c7 / 20000.0, f2500 = c2500 / 20000.0;
        ok(fabs(f7 - 1.0 / z) < 0.02 && fabs(f2500 - exp(-1.0) / z) < 0.02,
           "3000 candidates: sampled frequencies %.3f %.3f against %.3f %.3f", f7, f2500,
           1.0 / z, exp(-1.0) / z);
        kli_sampler_free(s);
        free(l);
    }
}

/* Temperatures, logits, cuts and penalties at their extremes: every draw is a finite-logit
 * token the limit calls for, never a crash, and kli_sampler_sample_many (which runs with
 * denormals flushed to zero) picks what a sampler alone picks. */
static int
draws(struct kli_sampler *s, const float *l, int times, const int *allowed, int n_allowed,
      int *hits)
{
    int good = 1;

    for (int i = 0; i < times; i++) {
        kli_token t = kli_sampler_sample(s, l);
        int in = 0;
        for (int k = 0; k < n_allowed; k++) {
            if (t == allowed[k]) {
                in = 1;
                if (hits)
                    hits[k]++;
            }
        }
        good &= in;
    }
    return good;
}

static void
test_extremes(void)
{
    struct kli_sampler_options o;
    struct kli_sampler *s;
    const float temps[] = {1.4e-45f, 1e-39f, 1e-30f, 1.17549435e-38f, 1e-6f};
    float l[6] = {-5.0f, 3.0f, 2.999f, -1e30f, NAN, -INFINITY};
    float neg[4] = {-100.0f, -50.0f, -50.5f, -3e38f};
    float big[4] = {3e38f, -3e38f, 1e38f, 0.0f};
    int one = 1, zero = 0, bad = 0;

    /* tiny temperatures (denormal ones included) overflowed l / T to inf: the argmax */
    for (size_t i = 0; i < sizeof(temps) / sizeof(temps[0]); i++) {
        kli_sampler_options_init(&o);
        o.temperature = temps[i];
        o.top_p = 1.0f;
        s = mk(&o, 6);
        int good = s != NULL && draws(s, l, 50, &one, 1, NULL);
        kli_sampler_free(s);
        s = mk(&o, 4);
        good &= s != NULL && draws(s, neg, 50, &one, 1, NULL) &&
                draws(s, big, 50, &zero, 1, NULL);
        if (s != NULL) {
            struct kli_sampler *many[1] = {s};
            const float *rows[1] = {neg};
            kli_token got = -1;
            struct kli_err err = {0};
            good &= kli_sampler_sample_many(many, rows, 1, &got, &err) == KLI_OK && got == 1;
        }
        kli_sampler_free(s);
        if (!good)
            diag("temperature %g: a draw other than the best", (double)temps[i]);
        bad += !good;
    }
    ok(bad == 0, "temperatures from 1.4e-45 to 1e-6, logits from -3e38 to 3e38: the best");

    /* tied best at a tiny temperature: both, about equally */
    {
        float tie[4] = {1.0f, 7.0f, 6.0f, 7.0f};
        int allowed[2] = {1, 3}, hits[2] = {0, 0};
        kli_sampler_options_init(&o);
        o.temperature = 1e-39f;
        s = mk(&o, 4);
        int good = draws(s, tie, 2000, allowed, 2, hits);
        ok(good && hits[0] > 800 && hits[1] > 800, "temperature 1e-39, two tied best: %d / %d",
           hits[0], hits[1]);
        kli_sampler_free(s);
    }

    /* +inf logits: only they are drawn, about equally, at any temperature */
    {
        float inf[5] = {1.0f, INFINITY, 2.0f, INFINITY, NAN};
        int allowed[2] = {1, 3}, hits[2] = {0, 0}, good = 1;
        const float ts[] = {0.0f, 1e-39f, 1.0f, 100.0f};
        for (int i = 0; i < 4; i++) {
            kli_sampler_options_init(&o);
            o.temperature = ts[i];
            s = mk(&o, 5);
            good &= draws(s, inf, 500, allowed, 2, i == 2 ? hits : NULL);
            kli_sampler_free(s);
        }
        ok(good && hits[0] > 150 && hits[1] > 150, "+inf logits: only they, at T 0 to 100 "
           "(%d / %d at T 1)", hits[0], hits[1]);
    }

    /* temperature 100 (the largest allowed): p ~ p^(1/100), renormalised */
    {
        float l3[3] = {logf(0.5f), logf(0.3f), logf(0.2f)};
        int allowed[3] = {0, 1, 2}, hits[3] = {0, 0, 0};
        double w[3] = {pow(0.5, 0.01), pow(0.3, 0.01), pow(0.2, 0.01)};
        double z = w[0] + w[1] + w[2];
        kli_sampler_options_init(&o);
        o.temperature = 100.0f;
        o.top_p = 1.0f;
        s = mk(&o, 3);
        int good = draws(s, l3, 20000, allowed, 3, hits);
        int close = 1;
        for (int k = 0; k < 3; k++)
            close &= fabs(hits[k] / 20000.0 - w[k] / z) < 0.02;
        ok(good && close, "temperature 100: %d %d %d against %.3f %.3f %.3f", hits[0],
           hits[1], hits[2], w[0] / z, w[1] / z, w[2] / z);
        kli_sampler_free(s);
    }

    /* the cuts at their limits: top-p at its smallest, top-k at its largest, min-p 1 */
    {
        float l4[4] = {0.5f, 2.0f, 1.9f, -1.0f};
        int allowed[4] = {0, 1, 2, 3}, hits[4] = {0, 0, 0, 0}, good = 1;
        kli_sampler_options_init(&o);
        o.temperature = 1.0f;
        o.top_p = 1.4e-45f;
        s = mk(&o, 4);
        good &= draws(s, l4, 200, &one, 1, NULL);
        kli_sampler_free(s);
        o.top_p = 1.0f;
        o.min_p = 1.0f;
        s = mk(&o, 4);
        good &= draws(s, l4, 200, &one, 1, NULL);
        kli_sampler_free(s);
        o.min_p = 0.0f;
        o.top_k = 2147483647;
        s = mk(&o, 4);
        good &= draws(s, l4, 4000, allowed, 4, hits);
        kli_sampler_free(s);
        ok(good && hits[0] > 0 && hits[1] > 0 && hits[2] > 0 && hits[3] > 0,
           "top-p 1.4e-45 and min-p 1 keep the best; top-k 2^31-1 keeps all four");
    }

    /* penalties at their extremes: a frequency penalty of -3e38 on a token seen twice makes
     * its logit +inf (and the -inf one NaN): the +inf one wins, the NaN one never does */
    {
        const float ts[] = {0.0f, 0.7f, 1e-39f};
        float lp[4] = {-INFINITY, 1.0f, 2.0f, 0.0f};
        int three = 3, good = 1;
        for (int i = 0; i < 3; i++) {
            kli_sampler_options_init(&o);
            o.temperature = ts[i];
            o.frequency_penalty = -3e38f;
            o.repeat_penalty = 100.0f;
            s = mk(&o, 4);
            kli_sampler_accept(s, 0);
            kli_sampler_accept(s, 0);
            kli_sampler_accept(s, 3);
            kli_sampler_accept(s, 3);
            good &= draws(s, lp, 200, &three, 1, NULL);
            kli_sampler_free(s);
        }
        /* and +3e38 pushes the seen best to -inf: the next one wins */
        kli_sampler_options_init(&o);
        o.temperature = 1e-39f;
        o.presence_penalty = 3e38f;
        o.frequency_penalty = 3e38f;
        s = mk(&o, 4);
        kli_sampler_accept(s, 2);
        kli_sampler_accept(s, 2);
        good &= draws(s, lp, 200, &one, 1, NULL);
        kli_sampler_free(s);
        ok(good, "penalties of +-3e38 and repeat penalty 100: the right token, never a NaN one");
    }
}

/* kli_sampler_sample_many gives each sampler the token it would give alone, step after step. */
static void
test_many(void)
{
    enum { N = 6, V = 4000, STEPS = 5 };
    struct kli_sampler *a[N], *b[N];
    float *l = malloc((size_t)N * V * sizeof(float));
    const float *rows[N];
    kli_token got[N];
    struct kli_err err = {0};
    int same = 1;

    for (int i = 0; i < N; i++) {
        struct kli_sampler_options o;
        kli_sampler_options_init(&o);
        o.seed = 1000 + (uint64_t)i;
        o.temperature = i == 0 ? 0.0f : 0.5f + 0.3f * (float)i;   /* one greedy */
        o.top_k = i == 2 ? 30 : 0;
        o.repeat_penalty = i == 3 ? 1.3f : 1.0f;
        a[i] = mk(&o, V);
        b[i] = mk(&o, V);
        rows[i] = l + (size_t)i * V;
    }
    for (int t = 0; t < STEPS; t++) {
        for (int i = 0; i < N * V; i++)
            l[i] = (float)(tuni() * (i % 7 == 0 ? 9.0 : 3.0));
        if (kli_sampler_sample_many(a, rows, N, got, &err) != KLI_OK) {
            same = 0;
            diag("%s", err.msg);
            break;
        }
        for (int i = 0; i < N; i++) {
            kli_token alone = kli_sampler_sample(b[i], rows[i]);
            same &= got[i] == alone;
            kli_sampler_accept(a[i], got[i]);
            kli_sampler_accept(b[i], alone);
        }
    }
    ok(same, "sample_many: %d samplers over %d steps give the tokens each gives alone", N, STEPS);
    struct kli_sampler *twice[2] = {a[0], a[0]};
    ok(kli_sampler_sample_many(twice, rows, 2, got, &err) == KLI_E_INVALID &&
           kli_sampler_sample_many(a, rows, -1, got, &err) == KLI_E_INVALID &&
           kli_sampler_sample_many(NULL, rows, 2, got, &err) == KLI_E_INVALID &&
           kli_sampler_sample_many(a, rows, 0, got, &err) == KLI_OK,
       "sample_many refuses a repeated sampler, n < 0 and NULL arrays; n = 0 is a no-op");
    for (int i = 0; i < N; i++) {
        kli_sampler_free(a[i]);
        kli_sampler_free(b[i]);
    }
    free(l);
}

/* logit_bias: drawing with a bias is drawing from the logits with the bias added by hand,
 * token for token from the same seed; +100 forces a token, -100 bans one; bad entries are
 * refused naming them. */
static void
test_bias(void)
{
    enum { NV = 300 };
    float l[NV], lb[NV];
    kli_token ids[3] = {7, 42, 250};
    float b[3] = {3.5f, -100.0f, 1.25f};
    struct kli_sampler_options o, ob;
    struct kli_sampler *a, *c;
    struct kli_err err = {0};
    int same = 1;

    for (int i = 0; i < NV; i++)
        l[i] = (float)tl_normal(&trng);
    l[42] = 20.0f;   /* the argmax, banned by its bias */
    memcpy(lb, l, sizeof(l));
    for (int k = 0; k < 3; k++)
        lb[ids[k]] += b[k];
    kli_sampler_options_init(&o);
    o.temperature = 0.8f;
    o.top_p = 0.95f;
    ob = o;
    ob.bias_ids = ids;
    ob.bias = b;
    ob.n_bias = 3;
    a = mk(&ob, NV);
    c = mk(&o, NV);
    ids[0] = 0;   /* the sampler holds a copy */
    for (int i = 0; i < 200; i++) {
        kli_token x = kli_sampler_sample(a, l), y = kli_sampler_sample(c, lb);
        same &= x == y && x != 42;
    }
    ok(same, "logit_bias: 200 draws equal those from the biased logits; the banned token "
       "never drawn");
    kli_sampler_free(a);
    kli_sampler_free(c);
    ob.temperature = 0;
    ids[0] = 7;
    b[0] = 100.0f;
    a = mk(&ob, NV);
    ok(kli_sampler_sample(a, l) == 7, "logit_bias: +100 makes token 7 the greedy choice");
    kli_sampler_free(a);
    ids[1] = NV;
    a = NULL;
    ok(kli_sampler_create(&a, &ob, NV, &err) == KLI_E_RANGE && a == NULL &&
       strstr(err.msg, "token 300 is outside the vocabulary") != NULL,
       "logit_bias: a token outside the vocabulary refused: %s", err.msg);
    ids[1] = 1;
    b[2] = 101.0f;
    memset(&err, 0, sizeof(err));
    ok(kli_sampler_create(&a, &ob, NV, &err) == KLI_E_RANGE &&
       strstr(err.msg, "outside [-100, 100]") != NULL,
       "logit_bias: a bias of 101 refused: %s", err.msg);
    b[2] = 1.0f;
    ob.n_bias = 1025;
    memset(&err, 0, sizeof(err));
    ok(kli_sampler_create(&a, &ob, NV, &err) == KLI_E_RANGE, "logit_bias: 1025 entries "
       "refused: %s", err.msg);
}

/* Greedy, seeds, penalties and the other fixed cases. */
static void
test_basics(void)
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
    int cnt[3];
    counts3(&o, l3, 20000, cnt);
    ok(fabs(cnt[0] / 20000.0 - 0.5) < 0.02 && fabs(cnt[1] / 20000.0 - 0.3) < 0.02 &&
       fabs(cnt[2] / 20000.0 - 0.2) < 0.02, "frequencies %d %d %d follow 0.5/0.3/0.2", cnt[0],
       cnt[1], cnt[2]);

    /* temperature 2 flattens: p ~ sqrt(p) renormalised */
    o.temperature = 2;
    counts3(&o, l3, 20000, cnt);
    double z = sqrt(0.5) + sqrt(0.3) + sqrt(0.2);
    ok(fabs(cnt[0] / 20000.0 - sqrt(0.5) / z) < 0.02 && fabs(cnt[2] / 20000.0 - sqrt(0.2) / z) <
       0.02, "temperature 2: %d %d %d", cnt[0], cnt[1], cnt[2]);

    /* top-p 0.75 keeps {0.5, 0.3}: 0.625 / 0.375 */
    o.temperature = 1;
    o.top_p = 0.75f;
    counts3(&o, l3, 20000, cnt);
    ok(cnt[2] == 0 && fabs(cnt[0] / 20000.0 - 0.625) < 0.02, "top-p 0.75: %d %d %d", cnt[0],
       cnt[1], cnt[2]);

    /* top-k 1 and min-p 1 are greedy */
    o.top_p = 1;
    o.top_k = 1;
    counts3(&o, l3, 2000, cnt);
    ok(cnt[0] == 2000, "top-k 1 always picks the best");
    o.top_k = 0;
    o.min_p = 0.5f;   /* keeps p >= 0.25: {0.5, 0.3} */
    counts3(&o, l3, 5000, cnt);
    ok(cnt[2] == 0 && cnt[1] > 0, "min-p 0.5 drops the 0.2 token (%d %d %d)", cnt[0], cnt[1],
       cnt[2]);

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

    /* penalties, greedy over lp: the tokens accepted before each pick, and the pick */
    static const struct {
        float repeat, frequency, presence;
        int32_t last_n;
        struct {
            int n_accept;
            kli_token accept[2], want;
            const char *what;   /* NULL: no more steps */
        } step[2];
    } pen[] = {
        /* repeat penalty 2 halves a positive logit of a seen token */
        {2, 0, 0, 64, {{1, {0}, 1, "repeat penalty moves the pick (3/2 < 2)"}}},
        {1, 0.6f, 0, 64, {{1, {0}, 0, "one occurrence: 3 - 0.6 still best"},
                          {1, {0}, 1, "two occurrences: 3 - 1.2 < 2"}}},
        {1, 0, 1.5f, 2, {{1, {0}, 1, "presence penalty 1.5 on the seen token"},
                         {2, {2, 2}, 0, "the window of 2 forgot the token"}}},
    };
    float lp[3] = {3, 2, -1};
    for (size_t i = 0; i < sizeof(pen) / sizeof(pen[0]); i++) {
        kli_sampler_options_init(&o);
        o.temperature = 0;
        o.repeat_penalty = pen[i].repeat;
        o.frequency_penalty = pen[i].frequency;
        o.presence_penalty = pen[i].presence;
        o.penalty_last_n = pen[i].last_n;
        s = mk(&o, 3);
        for (int k = 0; k < 2 && pen[i].step[k].what != NULL; k++) {
            for (int j = 0; j < pen[i].step[k].n_accept; j++)
                kli_sampler_accept(s, pen[i].step[k].accept[j]);
            ok(kli_sampler_sample(s, lp) == pen[i].step[k].want, "%s", pen[i].step[k].what);
        }
        kli_sampler_free(s);
    }

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
        opts_set(&o, bad[i].t, bad[i].p, bad[i].mp, bad[i].rp, bad[i].k);
        memset(&err, 0, sizeof(err));
        s = NULL;
        int rc = kli_sampler_create(&s, &o, 3, &err);
        ok(rc == KLI_E_RANGE && s == NULL && err.msg[0], "%s refused: %s", bad[i].what, err.msg);
    }
    kli_sampler_free(NULL);
}

/* kli.h's ABI rule, through the one helper every options-taking function uses: options
 * not filled by their _init are refused, and members past the caller's size are the
 * defaults, whatever the caller's memory holds there. */
/* ---- log-probabilities (kli_sampler_logprobs) against the reference --------------------- */

/* Checks smp's record of the draw `tok` against ref[V] (log-probabilities; -inf: not in the
 * support), ntop alternatives asked for. @return 0 when it matches within tol. */
static int
lp_check(const struct kli_sampler *smp, kli_token tok, const double *ref, int V, int ntop,
         double tol, const char **why)
{
    const struct kli_logprobs *lp = kli_sampler_logprobs(smp);
    int finite = 0;

    for (int i = 0; i < V; i++)
        finite += ref[i] > -INFINITY;
    *why = "no record";
    if (lp == NULL || lp->token != tok)
        return -1;
    *why = "the token's logprob";
    if (!(fabs((double)lp->logprob - ref[tok]) <= tol))
        return -1;
    *why = "the number of alternatives";
    if (lp->n_top != (ntop < finite ? ntop : finite))
        return -1;
    for (int k = 0; k < lp->n_top; k++) {
        *why = "an alternative's logprob, or their order";
        if (!(fabs((double)lp->top[k].logprob - ref[lp->top[k].token]) <= tol) ||
            (k > 0 && lp->top[k].logprob > lp->top[k - 1].logprob))
            return -1;
    }
    for (int i = 0; i < V && lp->n_top > 0; i++) {
        int listed = 0;
        for (int k = 0; k < lp->n_top; k++)
            listed |= lp->top[k].token == i;
        *why = "a likelier token left out";
        if (!listed && ref[i] > (double)lp->top[lp->n_top - 1].logprob + tol)
            return -1;
    }
    return 0;
}

static void
test_logprobs(void)
{
    enum { V = 3000, STEPS = 12 };
    static const struct {
        float temp, top_p, min_p, rp, pres, freq;
        int top_k, ntop;
    } set[] = {
        {0.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0, 5},      /* greedy, the fast path */
        {0.0f, 0.9f, 0.0f, 1.3f, 0.4f, 0.1f, 0, 20},     /* greedy after penalties */
        {1.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0, 3},
        {0.7f, 0.9f, 0.0f, 1.2f, 0.3f, 0.2f, 0, 20},
        {1.3f, 0.95f, 0.01f, 1.0f, 0.0f, 0.0f, 40, 8},
        {0.5f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 4, 10},     /* fewer kept than asked for */
        {2.0f, 0.5f, 0.0f, 1.0f, 1.0f, 0.0f, 0, 0},
    };
    float *l = malloc(V * sizeof(float)), *pl = malloc(V * sizeof(float));
    double *ref = malloc(V * sizeof(double)), *prob = malloc(V * sizeof(double));
    int32_t *cnt = calloc(V, sizeof(int32_t));
    double worst = 0;
    int bad = 0;
    const char *why = "";

    for (size_t si = 0; si < sizeof(set) / sizeof(set[0]); si++) {
        struct kli_sampler_options o;
        opts_set(&o, set[si].temp, set[si].top_p, set[si].min_p, set[si].rp, set[si].top_k);
        o.presence_penalty = set[si].pres;
        o.frequency_penalty = set[si].freq;
        o.seed = 100 + si;
        struct kli_sampler *smp = mk(&o, V);
        struct kli_err err = {0};
        memset(cnt, 0, V * sizeof(int32_t));
        ok(kli_sampler_logprobs(smp) == NULL &&
           kli_sampler_set_logprobs(smp, set[si].ntop, &err) == KLI_OK &&
           kli_sampler_logprobs(smp) == NULL, "setting %zu: no record before a draw", si);
        for (int step = 0; step < STEPS; step++) {
            for (int i = 0; i < V; i++)
                l[i] = (float)(4.0 * (tuni() + tuni() + tuni() - 1.5));
            kli_token t = kli_sampler_sample(smp, l);
            /* the reference: penalties as kli.h states them, then the distribution */
            for (int i = 0; i < V; i++) {
                pl[i] = l[i];
                if (cnt[i] > 0 && o.repeat_penalty != 1.0f)
                    pl[i] = pl[i] > 0 ? pl[i] / o.repeat_penalty : pl[i] * o.repeat_penalty;
                if (cnt[i] > 0)
                    pl[i] -= o.presence_penalty + o.frequency_penalty * (float)cnt[i];
            }
            if (o.temperature == 0.0f) {
                double mx = -INFINITY, sum = 0;
                for (int i = 0; i < V; i++)
                    mx = pl[i] > mx ? pl[i] : mx;
                for (int i = 0; i < V; i++)
                    sum += exp((double)pl[i] - mx);
                for (int i = 0; i < V; i++)
                    ref[i] = (double)pl[i] - mx - log(sum);
            } else {
                ref_support(pl, V, o.temperature, o.top_k, o.top_p, o.min_p, prob);
                for (int i = 0; i < V; i++)
                    ref[i] = prob[i] > 0 ? log(prob[i]) : -INFINITY;
            }
            if (!bad && lp_check(smp, t, ref, V, set[si].ntop, 2e-5, &why) != 0) {
                bad = 1;
                diag("setting %zu, step %d: %s", si, step, why);
            }
            if (ref[t] > -INFINITY)
                worst = fmax(worst, fabs((double)kli_sampler_logprobs(smp)->logprob - ref[t]));
            kli_sampler_accept(smp, t);
            cnt[t]++;
        }
        kli_sampler_free(smp);
    }
    ok(!bad, "logprobs of %d draws under 7 settings (greedy, penalties, temperature, top-k, "
       "min-p, top-p) match a full sort's within 2e-5 (worst %.1e), alternatives in order",
       STEPS * 7, worst);

    struct kli_sampler_options o;
    struct kli_err err = {0};
    kli_sampler_options_init(&o);
    struct kli_sampler *smp = mk(&o, 10);
    ok(kli_sampler_set_logprobs(smp, 21, &err) == KLI_E_RANGE &&
       kli_sampler_set_logprobs(smp, -2, &err) == KLI_E_RANGE,
       "logprobs 21 and -2 refused: %s", err.msg);
    kli_sampler_set_logprobs(smp, 2, &err);
    kli_sampler_sample(smp, l);
    ok(kli_sampler_logprobs(smp) != NULL && kli_sampler_set_logprobs(smp, -1, &err) == KLI_OK &&
       kli_sampler_logprobs(smp) == NULL, "-1 stops recording");
    kli_sampler_free(smp);
    free(l);
    free(pl);
    free(ref);
    free(prob);
    free(cnt);
}

static void
test_abi_size(void)
{
    struct kli_sampler_options o;
    struct kli_sampler *s = NULL;
    struct kli_err err = {0};

    memset(&o, 0, sizeof(o));
    ok(kli_sampler_create(&s, &o, 3, &err) == KLI_E_INVALID && s == NULL,
       "options with size 0 refused: %s", err.msg);
    kli_sampler_options_init(&o);
    o.size = offsetof(struct kli_sampler_options, top_k);   /* an older, shorter struct */
    o.temperature = 0.0f;
    o.top_p = 5.0f;                                            /* not the caller's: ignored */
    err.msg[0] = '\0';
    ok(kli_sampler_create(&s, &o, 3, &err) == KLI_OK && s != NULL,
       "members past size take their defaults %s", err.msg);
    kli_sampler_free(s);
}

int
main(int argc, char **argv)
{
    tap_init(argc, argv);
    if (tap_case_seeded("support", &trng, TSEED))
        test_support();
    if (tap_case_seeded("many", &trng, TSEED))
        test_many();
    if (tap_case_seeded("extremes", &trng, TSEED))
        test_extremes();
    if (tap_case_seeded("bias", &trng, TSEED))
        test_bias();
    if (tap_case_seeded("logprobs", &trng, TSEED))
        test_logprobs();
    if (tap_case("basics"))
        test_basics();
    if (tap_case("abi_size"))
        test_abi_size();
    plan_done();
    return tap_exit();
}
