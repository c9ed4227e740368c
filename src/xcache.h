/*
 * xcache.h - edge mode: the routed experts are read from the weight files on demand into a
 * bounded cache, so a model larger than the memory kli may use still runs
 * (kli_model_options.mem_budget, `kli --mem-budget`).
 *
 * The trunk (attention, norms, routers, shared experts, embeddings, lm_head) stays in the
 * memory mapping and is counted against the budget in full; the routed experts' pages in the
 * mapping are never touched. Each cache slot holds one routed expert's three matrices, read
 * with pread (one read per contiguous range: a .kli file keeps an expert in one range) by
 * two I/O threads, and checked against the .kli per-tensor checksums when the file has them.
 *
 * Per MoE layer the forward pass calls xcache_begin with the experts its tokens chose (the
 * loads of the missing ones start at once), then xcache_get / xcache_put for each expert in
 * ascending order, as the resident path computes them, so results are bit-identical to a run
 * without a budget. xcache_prefetch queues speculative loads for a layer about to run; they
 * never evict an expert used during the current forward step.
 *
 * Eviction: slots split evenly over the MoE layers, least recently used first within a
 * layer (contrib/tools/xcache-sim.py measures the choice on a real router trace).
 *
 * One forward pass at a time uses a cache: forward_run holds xcache_lock for its whole pass
 * (layer_pass_begin to layer_pass_end), so sessions of one model driven from several threads
 * take turns. The I/O threads are internal.
 */
#ifndef KLI_XCACHE_H
#define KLI_XCACHE_H

#include <stdint.h>

#include "kli.h"
#include "model.h"

struct xcache;


/* The least budget that leaves room for `min_slots` experts (for messages and tests). */
uint64_t xcache_min_budget(const struct kli_model *m, int32_t min_slots);

/* Sizes the cache from `budget` bytes and starts the I/O threads. Slots are allocated when
 * first filled. @return KLI_OK, KLI_E_RANGE (budget too small: the message says the
 * least that works), KLI_E_UNSUPPORTED (no routed experts), KLI_E_IO or KLI_E_NOMEM. */
int xcache_open(struct xcache **out, const struct kli_model *m, uint64_t budget,
                struct kli_err *err);
void xcache_close(struct xcache *c);

/* A new forward step starts (prefetches may evict only what this step has not used). */
void xcache_step(struct xcache *c);

/* The experts ids[0..n) (ascending) of MoE layer `layer` will be asked for: counts and queues
 * the loads of those not cached, as many as free slots allow (the rest load in xcache_get). */
void xcache_begin(struct xcache *c, int32_t layer, const int32_t *ids, int32_t n);

/* Waits until expert e of `layer` is in the cache and pins it.
 * @return its matrices (valid until xcache_put), or NULL with `err` set when its read failed
 *         or its bytes do not match the file's checksum. */
const struct ffn_w *xcache_get(struct xcache *c, int32_t layer, int32_t e,
                                   struct kli_err *err);
void xcache_put(struct xcache *c, int32_t layer, int32_t e);

/* A guess of the experts a layer about to run will ask for: recorded and scored against
 * what the layer then asks for; read ahead (never evicting what this step used) while the
 * running hit ratio of the guesses is at least 1/2. */
void xcache_prefetch(struct xcache *c, int32_t layer, const int32_t *ids, int32_t n);

void xcache_get_stats(const struct xcache *c, struct kli_cache_stats *st);

/* Serializes forward passes over one cache (see above). */
void xcache_lock(struct xcache *c);
void xcache_unlock(struct xcache *c);
void xcache_reset_stats(struct xcache *c);

#endif
