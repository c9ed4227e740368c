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
void forward_batch(struct kli_session *s, const kli_token *tok, int64_t T, float *logits_all);

#endif
