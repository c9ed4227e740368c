/*
 * sampler.c - turning logits into the next token: penalties, temperature, top-k, top-p,
 * min-p, and a seeded random stream (xorshift64*, as llama2.c and calm use), so the same
 * seed and the same logits give the same tokens.
 *
 * Order of operations (the usual one): penalties on the raw logits of recent tokens, then
 * greedy if temperature is 0, else temperature scaling, top-k, softmax, min-p, top-p, draw.
 */
#include "config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "grammar.h"
#include "internal.h"
#include "sampler.h"
#include "threads.h"

struct sampler_cand {
    float logit;
    kli_token id;
};

/* Candidates go into buckets of scaled logit (SAMPLER_BUCKETS over the 30 nats kept below the
 * best), and only the bucket where a top-k or top-p cut falls is sorted: sorting 163,840
 * candidates cost more than a decode step. */
#define SAMPLER_BUCKETS 4096

struct kli_sampler {
    struct kli_sampler_options o;
    int32_t n_vocab;
    uint64_t rng;
    kli_token *recent;        /* ring of the last penalty_last_n accepted tokens */
    int32_t n_recent, head;
    int32_t *count;           /* [n_vocab] occurrences among `recent` */
    float *work;              /* [n_vocab] penalised logits */
    struct sampler_cand *cand;   /* [n_vocab] */
    struct sampler_cand *tmp;    /* [n_vocab] candidates grouped by bucket */
    uint16_t *bk;             /* [n_vocab] each candidate's bucket */
    int32_t *bstart;          /* [SAMPLER_BUCKETS + 1] */
    void *mem;                /* the block the arrays above are carved from */
    kli_token *bias_ids;      /* [o.n_bias] the options' logit_bias, copied */
    float *bias;
    float *blog;              /* [n_vocab] the logits with the bias added */
    struct gr_matcher *gm;    /* kli_sampler_set_grammar's, or NULL */
    int32_t g_budget;         /* its max_tokens */
    float *glog;              /* [n_vocab] the logits the grammar allows, -inf elsewhere */
    int32_t lp_top;           /* kli_sampler_set_logprobs's n_top; -1: not recording */
    int lp_valid;             /* lp holds the last draw's */
    struct kli_logprobs lp;
};

void
kli_sampler_options_init(struct kli_sampler_options *o)
{
    *o = (struct kli_sampler_options){.size = sizeof(*o), .temperature = 0.7f, .top_k = 0,
                                      .top_p = 0.9f, .min_p = 0.0f, .repeat_penalty = 1.0f,
                                      .penalty_last_n = 64, .seed = 0x5eed};
}

void
kli_sampler_free(struct kli_sampler *smp)
{
    if (smp == NULL)
        return;
    gr_matcher_free(smp->gm);
    free(smp->glog);
    free(smp->mem);
    free(smp);
}

void
kli_sampler_reset(struct kli_sampler *smp)
{
    smp->rng = smp->o.seed ^ 0x9e3779b97f4a7c15ull;
    if (smp->rng == 0)
        smp->rng = 1;
    smp->n_recent = smp->head = 0;
    memset(smp->count, 0, (size_t)smp->n_vocab * sizeof(int32_t));
    if (smp->gm != NULL)
        gr_matcher_reset(smp->gm, smp->g_budget);
}

/* The arrays, all sized by the options and n_vocab (k_carve's two passes). */
static void
sampler_carve(struct kli_sampler *smp, struct k_carve *cv)
{
    size_t nv = (size_t)smp->n_vocab;

    smp->recent = k_carve(cv, (size_t)smp->o.penalty_last_n + 1, sizeof(kli_token));
    smp->count = k_carve(cv, nv, sizeof(int32_t));
    smp->work = k_carve(cv, nv, sizeof(float));
    smp->cand = k_carve(cv, nv, sizeof(struct sampler_cand));
    smp->tmp = k_carve(cv, nv, sizeof(struct sampler_cand));
    smp->bstart = k_carve(cv, SAMPLER_BUCKETS + 1, sizeof(int32_t));
    smp->bk = k_carve(cv, nv, sizeof(uint16_t));
    smp->bias_ids = k_carve(cv, (size_t)smp->o.n_bias, sizeof(kli_token));
    smp->bias = k_carve(cv, (size_t)smp->o.n_bias, sizeof(float));
    smp->blog = k_carve(cv, smp->o.n_bias > 0 ? nv : 0, sizeof(float));
}

int
kli_sampler_create(struct kli_sampler **out, const struct kli_sampler_options *opt,
                   int32_t n_vocab, struct kli_err *err)
{
    struct kli_sampler_options dflt;
    struct kli_sampler *smp;
    struct k_carve cv = {0};

    if (out == NULL || n_vocab <= 0)
        return err_set(err, KLI_E_INVALID, "kli_sampler_create: invalid arguments");
    *out = NULL;
    if ((opt = OPTS_TAKE(kli_sampler_options_init, dflt, opt, "kli_sampler_create", err)) == NULL)
        return KLI_E_INVALID;
    if (!(opt->temperature >= 0.0f && opt->temperature <= 100.0f))
        return err_set(err, KLI_E_RANGE, "temperature %g is outside [0, 100]",
                           (double)opt->temperature);
    if (opt->top_k < 0)
        return err_set(err, KLI_E_RANGE, "top-k %d is negative", opt->top_k);
    if (!(opt->top_p > 0.0f && opt->top_p <= 1.0f))
        return err_set(err, KLI_E_RANGE, "top-p %g is outside (0, 1]", (double)opt->top_p);
    if (!(opt->min_p >= 0.0f && opt->min_p <= 1.0f))
        return err_set(err, KLI_E_RANGE, "min-p %g is outside [0, 1]", (double)opt->min_p);
    if (!(opt->repeat_penalty > 0.0f && opt->repeat_penalty <= 100.0f))
        return err_set(err, KLI_E_RANGE, "repeat penalty %g is outside (0, 100]",
                           (double)opt->repeat_penalty);
    if (!isfinite(opt->presence_penalty) || !isfinite(opt->frequency_penalty))
        return err_set(err, KLI_E_RANGE, "presence/frequency penalties must be finite");
    if (opt->penalty_last_n < 0 || opt->penalty_last_n > (1 << 24))
        return err_set(err, KLI_E_RANGE, "penalty window %d is outside [0, 2^24]",
                           opt->penalty_last_n);
    if (opt->n_bias < 0 || opt->n_bias > 1024 ||
        (opt->n_bias > 0 && (opt->bias_ids == NULL || opt->bias == NULL)))
        return err_set(err, KLI_E_RANGE, "logit_bias: %d entries (at most 1024, with both "
                       "arrays)", opt->n_bias);
    for (int32_t i = 0; i < opt->n_bias; i++) {
        if (opt->bias_ids[i] < 0 || opt->bias_ids[i] >= n_vocab)
            return err_set(err, KLI_E_RANGE, "logit_bias: token %d is outside the vocabulary "
                           "[0, %d)", opt->bias_ids[i], n_vocab);
        if (!(opt->bias[i] >= -100.0f && opt->bias[i] <= 100.0f))
            return err_set(err, KLI_E_RANGE, "logit_bias: the bias %g of token %d is outside "
                           "[-100, 100]", (double)opt->bias[i], opt->bias_ids[i]);
    }
    smp = k_calloc(1, sizeof(*smp));
    if (smp == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    smp->o = *opt;
    smp->n_vocab = n_vocab;
    sampler_carve(smp, &cv);
    if ((smp->mem = k_carve_block(&cv)) == NULL) {
        kli_sampler_free(smp);
        return err_set(err, KLI_E_NOMEM, "out of memory");
    }
    sampler_carve(smp, &cv);
    if (opt->n_bias > 0) {
        memcpy(smp->bias_ids, opt->bias_ids, (size_t)opt->n_bias * sizeof(kli_token));
        memcpy(smp->bias, opt->bias, (size_t)opt->n_bias * sizeof(float));
    }
    smp->o.bias_ids = smp->bias_ids;   /* the options point at the copies */
    smp->o.bias = smp->bias;
    smp->lp_top = -1;
    kli_sampler_reset(smp);
    *out = smp;
    return KLI_OK;
}

void
kli_sampler_accept(struct kli_sampler *smp, kli_token tok)
{
    int32_t n = smp->o.penalty_last_n;

    if (n == 0 || tok < 0 || tok >= smp->n_vocab)
        return;
    if (smp->n_recent == n) {
        smp->count[smp->recent[smp->head]]--;
        smp->recent[smp->head] = tok;
        smp->head = (smp->head + 1) % n;
    } else {
        smp->recent[(smp->head + smp->n_recent) % n] = tok;
        smp->n_recent++;
    }
    smp->count[tok]++;
}

/* ==== state for snapshots (sampler.h) ==================================================== */

struct sampler_state
sampler_state(const struct kli_sampler *smp)
{
    struct sampler_state st = {&smp->o, smp->n_vocab, smp->rng, smp->n_recent};

    return st;
}

kli_token
sampler_recent(const struct kli_sampler *smp, int32_t i)
{
    return smp->recent[(smp->head + i) % smp->o.penalty_last_n];
}

void
sampler_set_state(struct kli_sampler *smp, uint64_t rng, const kli_token *recent, int32_t n)
{
    int32_t w = smp->o.penalty_last_n;

    smp->n_recent = smp->head = 0;
    memset(smp->count, 0, (size_t)smp->n_vocab * sizeof(int32_t));
    for (int32_t i = n > w ? n - w : 0; i < n; i++)
        kli_sampler_accept(smp, recent[i]);
    smp->rng = rng;
}

/* xorshift64*: a uniform float in [0, 1). */
static float
sampler_uniform(struct kli_sampler *smp)
{
    smp->rng ^= smp->rng >> 12;
    smp->rng ^= smp->rng << 25;
    smp->rng ^= smp->rng >> 27;
    return (float)((smp->rng * 0x2545f4914f6cdd1dull) >> 40) / 16777216.0f;
}

static int
cand_cmp(const void *a, const void *b)
{
    const struct sampler_cand *x = a, *y = b;

    if (x->logit != y->logit)
        return x->logit > y->logit ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* @return whether a penalty changes the logits: recent tokens and a penalty set. */
static int
sampler_penalises(const struct kli_sampler *smp)
{
    const struct kli_sampler_options *o = &smp->o;

    return smp->n_recent > 0 && (o->repeat_penalty != 1.0f || o->presence_penalty != 0.0f ||
                                 o->frequency_penalty != 0.0f);
}

/* e^x for x in [-87, 0] (the candidates have x >= -30), within about 2e-7 relative: x log2(e)
 * split into an integer n and f in [-0.5, 0.5], 2^f by its Taylor series to f^6, 2^n into the
 * exponent. Inline and branch-free, where expf is a call per candidate. */
static inline float
sampler_exp(float x)
{
    float y = x * 1.44269504f;
    int32_t n = (int32_t)(y - 0.5f);   /* y <= 0: rounds to the nearest integer */
    float f = y - (float)n;
    float p = 1.0f + f * (0.693147181f + f * (0.240226507f + f * (0.0555041087f +
              f * (0.00961812911f + f * (0.00133335581f + f * 0.000154035304f)))));
    union {
        uint32_t u;
        float f;
    } sc = {(uint32_t)(n + 127) << 23};

    return p * sc.f;
}

/* The bucket of scaled logit z below the best, mx (buckets fall with z). */
static inline int32_t
sampler_bucket(float z, float mx)
{
    int32_t b = (int32_t)((mx - z) * ((float)SAMPLER_BUCKETS / 30.0f));

    return b < SAMPLER_BUCKETS ? b : SAMPLER_BUCKETS - 1;
}

/* The cuts: cand[0..n) holds (z, id) in id order with mx the largest z. Leaves in cand[0..k)
 * the set that a full sort would keep (top-k, then min-p, then top-p) as unnormalised
 * probabilities, in bucket order (buckets by falling logit; the bucket a cut falls in is
 * sorted by probability, ties to the lower id), and *sum their total. @return k. The draw
 * walks them in this order, so a seed picks other tokens than after a full sort would, with
 * the same probabilities. mx is 0 here: the candidates are distances below the best. */
static int32_t
sampler_cut(struct kli_sampler *smp, int32_t n, float mx, double *sum)
{
    const struct kli_sampler_options *o = &smp->o;
    struct sampler_cand *c = smp->cand, *t = smp->tmp;
    int32_t *bs = smp->bstart, B = SAMPLER_BUCKETS;

    /* counting sort by bucket (stable: ids ascend within a bucket), each entry's z turned
     * into its probability relative to the best (monotonic, so the order within a bucket
     * holds); afterwards bs[b] is where bucket b starts, bs[B] = n */
    uint16_t *bk = smp->bk;
    memset(bs, 0, (size_t)(B + 1) * sizeof(int32_t));
    for (int32_t i = 0; i < n; i++) {
        int32_t b = sampler_bucket(c[i].logit, mx);
        bk[i] = (uint16_t)b;
        bs[b + 1]++;
        c[i].logit = sampler_exp(c[i].logit - mx);
    }
    for (int32_t b = 0; b < B; b++)
        bs[b + 1] += bs[b];
    for (int32_t i = 0; i < n; i++)
        t[bs[bk[i]]++] = c[i];
    for (int32_t b = B; b > 0; b--)
        bs[b] = bs[b - 1];
    bs[0] = 0;

    /* top-k: the buckets before the one holding rank k, and that one's best. Every cut
     * below keeps a prefix of t in which each bucket stays where bs says, the last one
     * possibly shortened. */
    if (o->top_k > 0 && o->top_k < n) {
        int32_t b = 0;
        while (bs[b + 1] < o->top_k)
            b++;
        qsort(t + bs[b], (size_t)(bs[b + 1] - bs[b]), sizeof(*t), cand_cmp);
        n = o->top_k;
    }
    /* min-p keeps p >= min_p (the best has p = 1): whole buckets, then part of one */
    if (o->min_p > 0.0f) {
        int32_t k = 0;
        while (k < n && (double)t[k].logit >= (double)o->min_p)
            k++;
        for (int32_t i = k; i < n; i++) {
            if ((double)t[i].logit >= (double)o->min_p)
                t[k++] = t[i];
        }
        n = k;
    }
    double part[4] = {0, 0, 0, 0}, total;
    int32_t i4 = 0;
    for (; i4 + 4 <= n; i4 += 4) {
        part[0] += t[i4].logit;
        part[1] += t[i4 + 1].logit;
        part[2] += t[i4 + 2].logit;
        part[3] += t[i4 + 3].logit;
    }
    for (; i4 < n; i4++)
        part[0] += t[i4].logit;
    total = (part[0] + part[1]) + (part[2] + part[3]);
    if (o->top_p < 1.0f) {
        double target = o->top_p * total, acc = 0.0;
        int32_t i = 0;
        for (int32_t b = 0; b < B && i < n; b++) {
            int32_t end = bs[b + 1] < n ? bs[b + 1] : n;
            double m = 0.0;
            for (int32_t j = i; j < end; j++)
                m += t[j].logit;
            if (acc + m < target && end < n) {
                acc += m;
                i = end;
                continue;
            }
            /* the cut falls in this bucket: sort it, then add one by one */
            qsort(t + i, (size_t)(end - i), sizeof(*t), cand_cmp);
            while (i < end) {
                acc += t[i++].logit;
                if (acc >= target)
                    break;
            }
            break;
        }
        n = i;
        total = acc;
    }
    memcpy(c, t, (size_t)n * sizeof(*c));
    *sum = total;
    return n;
}

static int32_t sampler_candidates(struct kli_sampler *smp, const float *l, double *sum,
                                  kli_token *tok);

int32_t
sampler_support(struct kli_sampler *smp, const float *logits, double *sum, kli_token *tok)
{
    const struct kli_sampler_options *o = &smp->o;
    int32_t V = smp->n_vocab;
    float *l = smp->work;
    int penalise = sampler_penalises(smp);

    /* Without penalties the logits are read in place: the comparisons below are false for
     * NaN, so a NaN logit is never a candidate. */
    if (!penalise && o->temperature > 0.0f)
        return sampler_candidates(smp, logits, sum, tok);
    memcpy(l, logits, (size_t)V * sizeof(float));
    if (penalise) {
        for (int32_t i = 0; i < V; i++) {
            int32_t c = smp->count[i];
            if (c == 0)
                continue;
            if (o->repeat_penalty != 1.0f)
                l[i] = l[i] > 0 ? l[i] / o->repeat_penalty : l[i] * o->repeat_penalty;
            l[i] -= o->presence_penalty + o->frequency_penalty * (float)c;
        }
    }
    /* A NaN logit is never chosen, whether it came in or a penalty made it (-inf minus an
     * overflowed -inf penalty): after the penalties, so the argmax below never starts at one. */
    for (int32_t i = 0; i < V; i++) {
        if (!(l[i] == l[i]))
            l[i] = -INFINITY;
    }
    if (o->temperature == 0.0f) {
        int32_t best = 0;
        for (int32_t i = 1; i < V; i++) {
            if (l[i] > l[best])
                best = i;
        }
        *tok = best;
        return 0;
    }
    return sampler_candidates(smp, l, sum, tok);
}

/* sampler_support past the penalties, for temperature > 0: l holds the logits to use. */
static int32_t
sampler_candidates(struct kli_sampler *smp, const float *l, double *sum, kli_token *tok)
{
    const struct kli_sampler_options *o = &smp->o;
    int32_t V = smp->n_vocab;

    /* Candidates: tokens more than e^30 times less likely than the best are left out; together
     * they hold under n_vocab * 1e-13 of the probability. */
    float mxl = -INFINITY;
    for (int32_t i = 0; i < V; i++)
        mxl = l[i] > mxl ? l[i] : mxl;
    *tok = 0;
    if (mxl == -INFINITY)
        return 0;
    /* Each logit is scaled as its distance below the best, z = (l - best) / T <= 0, never
     * as l / T: with a tiny temperature (1e-39) or a huge logit, l / T overflows, the best
     * turns into inf and every later step into NaN. The distance only underflows to -inf,
     * which drops out like any other token far below. A logit equal to the best, +inf ones
     * included (inf - inf would be NaN), is at distance 0: as T goes to 0 the draw becomes
     * uniform among the tied best. */
    int32_t n = 0;
    for (int32_t i = 0; i < V; i++) {
        float z = l[i] == mxl ? 0.0f : (l[i] - mxl) / o->temperature;
        if (z >= -30.0f) {
            smp->cand[n].logit = z;
            smp->cand[n].id = i;
            n++;
        }
    }
    return sampler_cut(smp, n, 0.0f, sum);
}

void
sampler_support_at(const struct kli_sampler *smp, int32_t i, kli_token *id, float *w)
{
    *id = smp->cand[i].id;
    *w = smp->cand[i].logit;
}

/* ==== log-probabilities (kli.h) ========================================================= */

int
kli_sampler_set_logprobs(struct kli_sampler *smp, int32_t n_top, struct kli_err *err)
{
    if (smp == NULL)
        return err_set(err, KLI_E_INVALID, "kli_sampler_set_logprobs: no sampler");
    if (n_top < -1 || n_top > KLI_LOGPROBS_MAX)
        return err_set(err, KLI_E_RANGE, "logprobs %d is outside [0, %d] (-1: off)",
                       (int)n_top, KLI_LOGPROBS_MAX);
    smp->lp_top = n_top;
    smp->lp_valid = 0;
    return KLI_OK;
}

const struct kli_logprobs *
kli_sampler_logprobs(const struct kli_sampler *smp)
{
    return smp != NULL && smp->lp_top >= 0 && smp->lp_valid ? &smp->lp : NULL;
}

/* Offers (id, v) to the top list of smp->lp, kept by falling v, ties to the lower id (ids
 * come in rising order, so a tie never displaces an entry). */
static void
sampler_top_offer(struct kli_sampler *smp, kli_token id, float v)
{
    struct kli_logprobs *lp = &smp->lp;
    int32_t k = lp->n_top;

    if (k == smp->lp_top && !(v > lp->top[k - 1].logprob))
        return;
    if (k < smp->lp_top)
        lp->n_top++;
    else
        k--;
    while (k > 0 && v > lp->top[k - 1].logprob) {
        lp->top[k] = lp->top[k - 1];
        k--;
    }
    lp->top[k].token = id;
    lp->top[k].logprob = v;
}

/* A log-probability as reported: at least -9999 (-inf and NaN included). */
static float
sampler_lp_floor(double x)
{
    return x >= -9999.0 ? (float)x : -9999.0f;
}

/* Records a token chosen without a draw: probability 1. @return tok. */
static kli_token
sampler_forced(struct kli_sampler *smp, kli_token tok)
{
    if (smp->lp_top >= 0) {
        smp->lp = (struct kli_logprobs){.token = tok, .logprob = 0.0f};
        smp->lp_valid = 1;
    }
    return tok;
}

/* Records greedy's choice tok under the softmax of l [n_vocab] at temperature 1 (NaN and -inf
 * logits have probability 0). tok is the argmax of l, NaN never chosen, so l[tok] is the
 * largest logit (NaN only when none is larger than -inf): no pass of its own for the max.
 * @return tok. */
static kli_token
sampler_note_softmax(struct kli_sampler *smp, const float *l, kli_token tok)
{
    struct kli_logprobs *lp = &smp->lp;
    int32_t V = smp->n_vocab;
    float mx = l[tok];
    double sum = 0.0;

    if (smp->lp_top < 0)
        return tok;
    if (!(mx > -INFINITY && mx < INFINITY))
        return sampler_forced(smp, tok);
    lp->n_top = 0;
    for (int32_t i = 0; i < V; i++) {
        if (l[i] > -INFINITY) {
            sum += exp((double)l[i] - (double)mx);
            if (smp->lp_top > 0)
                sampler_top_offer(smp, i, l[i]);
        }
    }
    double lse = (double)mx + log(sum);
    for (int32_t k = 0; k < lp->n_top; k++)
        lp->top[k].logprob = sampler_lp_floor((double)lp->top[k].logprob - lse);
    lp->token = tok;
    lp->logprob = sampler_lp_floor((double)l[tok] - lse);
    smp->lp_valid = 1;
    return tok;
}

/* Records candidate `at` drawn from the n candidates of sampler_support (unnormalised
 * probabilities summing to sum > 0). @return its token. */
static kli_token
sampler_note_support(struct kli_sampler *smp, int32_t n, double sum, int32_t at)
{
    struct kli_logprobs *lp = &smp->lp;
    const struct sampler_cand *c = smp->cand;
    kli_token tok = c[at].id;
    double w = c[at].logit;

    if (smp->lp_top < 0)
        return tok;
    lp->n_top = 0;
    /* equal weights lie in one bucket, in rising id order (sampler_cut), as the top list
     * wants them for its ties */
    for (int32_t i = 0; i < n && smp->lp_top > 0; i++)
        sampler_top_offer(smp, c[i].id, c[i].logit);
    for (int32_t k = 0; k < lp->n_top; k++)
        lp->top[k].logprob = sampler_lp_floor(log((double)lp->top[k].logprob / sum));
    lp->token = tok;
    lp->logprob = sampler_lp_floor(log(w / sum));
    smp->lp_valid = 1;
    return tok;
}

static kli_token sampler_draw(struct kli_sampler *smp, const float *logits);

int
kli_sampler_set_grammar(struct kli_sampler *smp, const struct kli_grammar *g,
                        int32_t max_tokens, struct kli_err *err)
{
    struct gr_matcher *gm = NULL;
    float *glog = NULL;

    if (smp == NULL || (g != NULL && max_tokens <= 0))
        return err_set(err, KLI_E_INVALID, "kli_sampler_set_grammar: invalid arguments");
    if (g != NULL && g->nodes[g->root].minlen > max_tokens)
        return err_set(err, KLI_E_RANGE, "max_tokens %d is below the %d tokens that the "
                       "shortest value of the schema may take", (int)max_tokens,
                       (int)g->nodes[g->root].minlen);
    if (g != NULL) {
        int rc = gr_matcher_create(&gm, g, smp->n_vocab, err);
        if (rc != KLI_OK)
            return rc;
        if ((glog = k_mallocarray((size_t)smp->n_vocab, sizeof(float))) == NULL) {
            gr_matcher_free(gm);
            return err_set(err, KLI_E_NOMEM, "out of memory");
        }
        gr_matcher_reset(gm, max_tokens);
    }
    gr_matcher_free(smp->gm);
    free(smp->glog);
    smp->gm = gm;
    smp->glog = glog;
    smp->g_budget = max_tokens;
    return KLI_OK;
}

int
kli_sampler_grammar_status(const struct kli_sampler *smp)
{
    return smp == NULL || smp->gm == NULL ? 0 : gr_matcher_status(smp->gm);
}

/* A draw under the grammar: the logits of the tokens it does not allow become -inf; once the
 * value is complete, or nothing can follow, the end token. */
static kli_token
sampler_grammar_draw(struct kli_sampler *smp, const float *logits)
{
    struct gr_matcher *gm = smp->gm;
    const uint64_t *mask;
    int32_t V = smp->n_vocab;
    kli_token tok;

    if (gr_matcher_status(gm) != 0)
        return sampler_forced(smp, gr_matcher_end(gm));
    if ((mask = gr_matcher_mask(gm)) == NULL) {
        gr_matcher_accept(gm, -1);   /* stuck: kli_sampler_grammar_status tells */
        return sampler_forced(smp, gr_matcher_end(gm));
    }
    for (int32_t i = 0; i < V; i++)
        smp->glog[i] = (mask[i / 64] >> (i % 64)) & 1 ? logits[i] : -INFINITY;
    tok = sampler_draw(smp, smp->glog);
    if (tok < 0 || tok >= V || !((mask[tok / 64] >> (tok % 64)) & 1)) {
        /* every allowed logit NaN or -inf: the first allowed token */
        for (tok = 0; !((mask[tok / 64] >> (tok % 64)) & 1); tok++)
            ;
        sampler_forced(smp, tok);
    }
    gr_matcher_accept(gm, tok);
    return tok;
}

kli_token
kli_sampler_sample(struct kli_sampler *smp, const float *logits)
{
    if (smp->gm != NULL)
        return sampler_grammar_draw(smp, logits);
    return sampler_draw(smp, logits);
}

static kli_token
sampler_draw(struct kli_sampler *smp, const float *logits)
{
    const struct kli_sampler_options *o = &smp->o;

    if (o->n_bias > 0) {   /* logit_bias first, on a copy */
        memcpy(smp->blog, logits, (size_t)smp->n_vocab * sizeof(float));
        for (int32_t i = 0; i < o->n_bias; i++)
            smp->blog[smp->bias_ids[i]] += smp->bias[i];
        logits = smp->blog;
    }
    int32_t V = smp->n_vocab;
    kli_token tok = 0;
    double sum = 0.0;

    /* Greedy without penalties: one pass over the logits, no copy (the same choice as the
     * general path: a NaN is never chosen, ties go to the lower id, all NaN gives 0). In
     * batched decode on a GPU this pass is a large part of each sequence's step. */
    if (o->temperature == 0.0f && !sampler_penalises(smp)) {
        int32_t best = 0;
        float bv = logits[0] == logits[0] ? logits[0] : -INFINITY;
        for (int32_t i = 1; i < V; i++) {
            if (logits[i] > bv) {
                bv = logits[i];
                best = i;
            }
        }
        return sampler_note_softmax(smp, logits, best);
    }
    int32_t n = sampler_support(smp, logits, &sum, &tok);
    if (n == 0 && o->temperature == 0.0f)   /* greedy after the penalties, in smp->work */
        return sampler_note_softmax(smp, smp->work, tok);
    if (n == 0 || !(sum > 0.0))
        return sampler_forced(smp, n == 0 ? tok : smp->cand[0].id);
    double r = sampler_uniform(smp) * sum, acc = 0.0;
    int32_t i = 0;
    for (; i < n - 1; i++) {
        acc += smp->cand[i].logit;
        if (r < acc)
            break;
    }
    return sampler_note_support(smp, n, sum, i);
}

struct sample_many {
    struct kli_sampler *const *smp;
    const float *const *logits;
    kli_token *out;
};

static void
sample_many_range(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct sample_many *j = ctx;

    (void)ith;
    for (int64_t i = i0; i < i1; i++)
        j->out[i] = kli_sampler_sample(j->smp[i], j->logits[i]);
}

int
kli_sampler_sample_many(struct kli_sampler *const *smp, const float *const *logits, int32_t n,
                        kli_token *out, struct kli_err *err)
{
    if (n < 0 || (n > 0 && (smp == NULL || logits == NULL || out == NULL)))
        return err_set(err, KLI_E_INVALID, "kli_sampler_sample_many: invalid arguments");
    for (int32_t i = 0; i < n; i++) {
        if (smp[i] == NULL || logits[i] == NULL)
            return err_set(err, KLI_E_INVALID, "kli_sampler_sample_many: sampler or "
                               "logits %d is NULL", (int)i);
        for (int32_t k = 0; k < i; k++) {
            if (smp[k] == smp[i])
                return err_set(err, KLI_E_INVALID, "kli_sampler_sample_many: samplers "
                                   "%d and %d are the same", (int)k, (int)i);
        }
    }
    struct sample_many j = {smp, logits, out};
    threads_parallel_for(n, 1, sample_many_range, &j);
    return KLI_OK;
}
