/*
 * moe_sched.h - the schedules that compute a routed MoE layer's experts on the CPU, after
 * moe_route_rows has grouped the rows by expert (sc->order, sc->count, sc->wt).
 */
#ifndef KLI_MOE_SCHED_H
#define KLI_MOE_SCHED_H

#include <stdint.h>

#include "model.h"
#include "moe.h"

/* out [T][d_model] = the shared expert (when skip is NULL) plus every routed expert e with
 * rows and !skip[e], weighted. skip [n_experts] (NULL: none skipped, the shared expert
 * included) names the experts a device computes; the shared expert is then the device's too.
 * Small batches (and every batch under --numa partition) take the grouped schedule, the others
 * one matrix product per expert; both give the same bits. */
void moe_sched_cpu(const struct kli_model *m, const struct moe_w *w,
                   struct moe_scratch *sc, const float *x, int64_t T, float *out,
                   const uint8_t *skip);

/* Adds into out what a failed device left undone: the shared expert, then each routed
 * expert e with rows and only[e], ascending, one at a time. */
void moe_sched_add(const struct kli_model *m, const struct moe_w *w,
                   struct moe_scratch *sc, const float *x, int64_t T, float *out,
                   const uint8_t *only);

/* Edge mode (m->xc): out = the shared expert plus the routed experts of layer `layer`, read
 * through the expert cache one at a time in ascending order; the next MoE layer's likely
 * experts are prefetched first. @return KLI_OK, or the cache's read error (`err` set). */
int moe_sched_cached(const struct kli_model *m, int layer, const struct moe_w *w,
                     struct moe_scratch *sc, const float *x, int64_t T, float *out,
                     struct kli_err *err);

#endif
