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

#include "internal.h"
#include "sampler.h"

struct sampler_cand {
    float logit;
    kli_token id;
};

struct kli_sampler {
    struct kli_sampler_options o;
    int32_t n_vocab;
    uint64_t rng;
    kli_token *recent;        /* ring of the last penalty_last_n accepted tokens */
    int32_t n_recent, head;
    int32_t *count;           /* [n_vocab] occurrences among `recent` */
    float *work;              /* [n_vocab] penalised logits */
    struct sampler_cand *cand;   /* [n_vocab] */
};

void
kli_sampler_options_init(struct kli_sampler_options *o)
{
    memset(o, 0, sizeof(*o));
    o->temperature = 0.7f;
    o->top_k = 0;
    o->top_p = 0.9f;
    o->min_p = 0.0f;
    o->repeat_penalty = 1.0f;
    o->penalty_last_n = 64;
    o->seed = 0x5eed;
}

void
kli_sampler_free(struct kli_sampler *smp)
{
    if (smp == NULL)
        return;
    free(smp->recent);
    free(smp->count);
    free(smp->work);
    free(smp->cand);
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
}

int
kli_sampler_create(struct kli_sampler **out, const struct kli_sampler_options *opt,
                   int32_t n_vocab, struct kli_err *err)
{
    struct kli_sampler_options dflt;
    struct kli_sampler *smp;

    if (out == NULL || n_vocab <= 0)
        return kli_err_set(err, KLI_E_INVALID, "kli_sampler_create: invalid arguments");
    *out = NULL;
    if (opt == NULL) {
        kli_sampler_options_init(&dflt);
        opt = &dflt;
    }
    if (!(opt->temperature >= 0.0f && opt->temperature <= 100.0f))
        return kli_err_set(err, KLI_E_RANGE, "temperature %g is outside [0, 100]",
                           (double)opt->temperature);
    if (opt->top_k < 0)
        return kli_err_set(err, KLI_E_RANGE, "top-k %d is negative", opt->top_k);
    if (!(opt->top_p > 0.0f && opt->top_p <= 1.0f))
        return kli_err_set(err, KLI_E_RANGE, "top-p %g is outside (0, 1]", (double)opt->top_p);
    if (!(opt->min_p >= 0.0f && opt->min_p <= 1.0f))
        return kli_err_set(err, KLI_E_RANGE, "min-p %g is outside [0, 1]", (double)opt->min_p);
    if (!(opt->repeat_penalty > 0.0f && opt->repeat_penalty <= 100.0f))
        return kli_err_set(err, KLI_E_RANGE, "repeat penalty %g is outside (0, 100]",
                           (double)opt->repeat_penalty);
    if (!isfinite(opt->presence_penalty) || !isfinite(opt->frequency_penalty))
        return kli_err_set(err, KLI_E_RANGE, "presence/frequency penalties must be finite");
    if (opt->penalty_last_n < 0 || opt->penalty_last_n > (1 << 24))
        return kli_err_set(err, KLI_E_RANGE, "penalty window %d is outside [0, 2^24]",
                           opt->penalty_last_n);
    smp = kli_calloc(1, sizeof(*smp));
    if (smp == NULL)
        return kli_err_set(err, KLI_E_NOMEM, "out of memory");
    smp->o = *opt;
    smp->n_vocab = n_vocab;
    smp->recent = kli_mallocarray((size_t)opt->penalty_last_n + 1, sizeof(kli_token));
    smp->count = kli_calloc((size_t)n_vocab, sizeof(int32_t));
    smp->work = kli_mallocarray((size_t)n_vocab, sizeof(float));
    smp->cand = kli_mallocarray((size_t)n_vocab, sizeof(struct sampler_cand));
    if (!smp->recent || !smp->count || !smp->work || !smp->cand) {
        kli_sampler_free(smp);
        return kli_err_set(err, KLI_E_NOMEM, "out of memory");
    }
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

const struct kli_sampler_options *
sampler_options(const struct kli_sampler *smp)
{
    return &smp->o;
}

int32_t
sampler_n_vocab(const struct kli_sampler *smp)
{
    return smp->n_vocab;
}

uint64_t
sampler_rng(const struct kli_sampler *smp)
{
    return smp->rng;
}

int32_t
sampler_n_recent(const struct kli_sampler *smp)
{
    return smp->n_recent;
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

kli_token
kli_sampler_sample(struct kli_sampler *smp, const float *logits)
{
    const struct kli_sampler_options *o = &smp->o;
    int32_t V = smp->n_vocab;
    float *l = smp->work;

    /* Greedy without penalties: one pass over the logits, no copy (the same choice as the
     * general path: a NaN is never chosen, ties go to the lower id, all NaN gives 0). In
     * batched decode on a GPU this pass is a large part of each sequence's step. */
    if (o->temperature == 0.0f &&
        (smp->n_recent == 0 || (o->repeat_penalty == 1.0f && o->presence_penalty == 0.0f &&
                                o->frequency_penalty == 0.0f))) {
        int32_t best = 0;
        float bv = logits[0] == logits[0] ? logits[0] : -INFINITY;
        for (int32_t i = 1; i < V; i++) {
            if (logits[i] > bv) {
                bv = logits[i];
                best = i;
            }
        }
        return best;
    }
    memcpy(l, logits, (size_t)V * sizeof(float));
    for (int32_t i = 0; i < V; i++) {
        if (!(l[i] == l[i]))
            l[i] = -INFINITY;   /* a NaN logit is never chosen */
    }
    if (smp->n_recent > 0) {
        for (int32_t i = 0; i < V; i++) {
            int32_t c = smp->count[i];
            if (c == 0)
                continue;
            if (o->repeat_penalty != 1.0f)
                l[i] = l[i] > 0 ? l[i] / o->repeat_penalty : l[i] * o->repeat_penalty;
            l[i] -= o->presence_penalty + o->frequency_penalty * (float)c;
        }
    }
    if (o->temperature == 0.0f) {
        int32_t best = 0;
        for (int32_t i = 1; i < V; i++) {
            if (l[i] > l[best])
                best = i;
        }
        return best;
    }

    /* Candidates sorted by logit (ties to the lower id: deterministic). Tokens more than
     * e^30 times less likely than the best are left out before sorting: together they hold
     * under n_vocab * 1e-13 of the probability, and sorting 163,840 logits per token would
     * cost more than the rest of sampling. */
    float mxl = -INFINITY;
    for (int32_t i = 0; i < V; i++)
        mxl = l[i] > mxl ? l[i] : mxl;
    if (mxl == -INFINITY)
        return 0;
    float floor_l = mxl / o->temperature - 30.0f;
    int32_t n = 0;
    for (int32_t i = 0; i < V; i++) {
        float z = l[i] / o->temperature;
        if (z >= floor_l) {
            smp->cand[n].logit = z;
            smp->cand[n].id = i;
            n++;
        }
    }
    qsort(smp->cand, (size_t)n, sizeof(*smp->cand), cand_cmp);
    if (o->top_k > 0 && o->top_k < n)
        n = o->top_k;
    /* Softmax over the survivors, in double for stable sums. */
    double mx = smp->cand[0].logit, sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        double p = exp((double)smp->cand[i].logit - mx);
        smp->cand[i].logit = (float)p;
        sum += p;
    }
    if (!(sum > 0.0))
        return smp->cand[0].id;
    if (o->min_p > 0.0f) {
        double cut = o->min_p * smp->cand[0].logit;
        int32_t k = 1;
        while (k < n && smp->cand[k].logit >= cut)
            k++;
        for (int32_t i = k; i < n; i++)
            sum -= smp->cand[i].logit;
        n = k;
    }
    if (o->top_p < 1.0f) {
        double acc = 0.0;
        int32_t k = 0;
        while (k < n) {
            acc += smp->cand[k].logit;
            k++;
            if (acc >= o->top_p * sum)
                break;
        }
        n = k;
        sum = acc;
    }
    double r = sampler_uniform(smp) * sum, acc = 0.0;
    for (int32_t i = 0; i < n; i++) {
        acc += smp->cand[i].logit;
        if (r < acc)
            return smp->cand[i].id;
    }
    return smp->cand[n - 1].id;
}
