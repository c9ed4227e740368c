/*
 * prefix.h - the prefix cache of the scheduler (sched.c): evaluated prompt prefixes kept as
 * sessions, bounded in bytes, optionally backed by a directory of snapshots (internal).
 */
#ifndef KLI_PREFIX_H
#define KLI_PREFIX_H

#include <stddef.h>
#include <stdint.h>

#include "kli.h"

struct prefix_cache;


/* A cache of at most `max_bytes` (kli_session_nbytes of its sessions; 0 keeps only the entry
 * in use) for sessions of `m`. With `dir` (created if missing), every entry is also saved
 * there as a snapshot named by a hash of `model_key` and its tokens, and entries found
 * there are loaded on demand: `model_key` must tell apart every model whose states differ.
 * @return KLI_OK or a negative status with a message in `err`. */
int prefix_cache_create(struct prefix_cache **out, const struct kli_model *m,
                        uint64_t max_bytes, const char *dir, uint64_t model_key,
                        int32_t cache_type, struct kli_err *err);
void prefix_cache_free(struct prefix_cache *c);

/* The longest entry whose tokens are a prefix of toks[0..n) (in memory, else in the
 * directory). @return its session, borrowed until the next call on the cache, with its token
 * count in *len; NULL (and *len 0) when there is none. */
const struct kli_session *prefix_cache_find(struct prefix_cache *c, const kli_token *toks,
                                            int32_t n, int32_t *len);

/* Keeps a copy of the state of `s`, keyed by its token history (a no-op when that prefix is
 * already cached). @return KLI_OK or a negative status with a message in `err` (the cache
 * is then unchanged; a failure to save to the directory is only counted). */
int prefix_cache_put(struct prefix_cache *c, const struct kli_session *s,
                     struct kli_err *err);

void prefix_cache_stats(const struct prefix_cache *c, struct kli_prefix_stats *st);

#endif
