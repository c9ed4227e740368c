/*
 * sampler.h - the mutable state of a kli_sampler (the random stream and the ring of recent
 * tokens the penalties look at), for session snapshots (snapshot.c); and the set a draw
 * chooses from, for tests.
 */
#ifndef KLI_SAMPLER_H
#define KLI_SAMPLER_H

#include <stdint.h>

#include "kli.h"

/* What a snapshot keeps of a sampler, besides its recent tokens (sampler_recent). */
struct sampler_state {
    const struct kli_sampler_options *o;   /* the options it was created with (borrowed) */
    int32_t n_vocab;    /* the vocabulary size it was created for */
    uint64_t rng;       /* the random stream; never 0 (xorshift64* would stay at 0) */
    int32_t n_recent;   /* recent tokens held (at most the options' penalty_last_n) */
};

/* @return the sampler's state. */
struct sampler_state sampler_state(const struct kli_sampler *smp);

/* @return recent token i, oldest first: i in [0, sampler_n_recent). */
kli_token sampler_recent(const struct kli_sampler *smp, int32_t i);

/* Replaces the random stream and the recent tokens (oldest first). When `n` exceeds this
 * sampler's penalty_last_n, only the last penalty_last_n tokens are kept. The caller has
 * checked that rng is not 0 and that every token is in [0, n_vocab). */
void sampler_set_state(struct kli_sampler *smp, uint64_t rng, const kli_token *recent,
                       int32_t n);

/* The tokens a draw chooses from for these logits, after the penalties, temperature, top-k,
 * min-p and top-p, as the draw walks them; their unnormalised probabilities are read with
 * sampler_support_at and *sum receives their total. @return their number, or 0 when the
 * choice needs no draw (temperature 0, or no finite logit): then *tok is the token. Does not
 * advance the random stream. */
int32_t sampler_support(struct kli_sampler *smp, const float *logits, double *sum,
                        kli_token *tok);
/* Entry i < sampler_support's count: its token and unnormalised probability. */
void sampler_support_at(const struct kli_sampler *smp, int32_t i, kli_token *id, float *w);

#endif
