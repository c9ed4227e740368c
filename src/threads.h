/*
 * threads.h - the one place kli runs work on several cores.
 *
 * threads_parallel_for splits [0, n) into nth = min(workers, n / grain) contiguous ranges,
 * share i being [n * i / nth, n * (i + 1) / nth), and calls fn(ctx, i0, i1, i) for each on
 * worker thread i (the same thread every call; the caller is worker 0). A call from inside
 * a share, from another thread while the pool runs a region, or with n below 2 * grain runs
 * serially on its caller as fn(ctx, 0, n, 0). Every share runs with denormals flushed. Model
 * and kernel files never start threads or contain OpenMP pragmas: threads.c is the one place.
 */
#ifndef KLI_THREADS_H
#define KLI_THREADS_H

#include <stdint.h>

typedef void (*range_fn)(void *ctx, int64_t i0, int64_t i1, int ith);

void threads_parallel_for(int64_t n, int64_t grain, range_fn fn, void *ctx);

/* Sets the worker count for this process (0 = one per physical core). */
void threads_set_count(int n);
int threads_count(void);
/* Physical cores of this machine (logical CPUs when unknown). */
int threads_physical_cores(void);

/* NUMA nodes a worker's node index may name (topology.h TOPO_MAX_NODES). */
#define THREADS_NODES 64

/* Worker placement (numa.c): worker i runs on OS CPU cpus[i], pinned there when `pin`, and
 * belongs to logical NUMA node nodes[i]. Sets the worker count to n. Process-wide, like
 * threads_set_count; the calling thread is worker 0. */
void threads_set_plan(int n, const int32_t *cpus, const int32_t *nodes, int pin);
/* @return the NUMA node (logical index) of the calling worker under the current plan; 0
 *         without one. Kernels use it to read a node-local copy of a weight. */
int threads_node(void);
/* @return the NUMA node (logical index) of worker slot `slot` under the current plan; 0
 *         without one or beyond it. */
int threads_slot_node(int slot);
/* The CPUs the process could run on before kli pinned anything: set[i] = 1 for i < n.
 * @return their number; 0 when unknown (not Linux). */
int threads_allowed_cpus(uint8_t *set, int n);

#endif
