/*
 * forward.h - the per-batch driver of the forward pass.
 */
#ifndef KLI_FORWARD_H
#define KLI_FORWARD_H

#include <stdint.h>

#include "session.h"

/* Runs T <= batch_max tokens through every layer, after the s->pos already seen, and
 * advances s->pos. Writes the logits of every position into `logits_all` [T][n_vocab] when
 * it is not NULL, and those of the last position into s->logits. The caller has checked
 * the ids and reserved the cache. */
int forward_batch(struct kli_session *s, const kli_token *tok, int64_t T, float *logits_all,
                  struct kli_err *err);

/* Most sequences one forward_run serves together. */
#define FORWARD_MAX_SEQ 512

/* The general form: n_seq sessions of T_seq new tokens each (tok [n_seq][T_seq]), every row
 * through the same pass over the weights; ss[0]'s scratch (sized for n_seq * T_seq rows)
 * holds the activations. With logits_all [n_seq*T_seq][n_vocab] every row's logits are
 * written there; each session's last row goes to its own logits either way (for n_seq > 1
 * logits_all is required).
 * @return KLI_OK, or an error of edge mode's expert reads (xcache.c): the sessions are then
 *         marked broken (their state holds part of the step) until reset or restored. */
int forward_run(struct kli_session *const *ss, int64_t n_seq, const kli_token *tok,
                int64_t T_seq, float *logits_all, struct kli_err *err);

#endif
