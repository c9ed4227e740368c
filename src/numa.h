/*
 * numa.h - carrying out the placement plan of topology.c for a model: worker pinning (through
 * threads.c), memory binding of the weights, node-local copies of the trunk, and a check of
 * where the pages really are.
 */
#ifndef KLI_NUMA_H
#define KLI_NUMA_H

#include <stdint.h>

#include "kli.h"
#include "topology.h"

struct kli_model;
struct tensor;

struct numa_state {
    struct topo *topo;
    struct topo_plan plan;
    struct topo_region *regions;        /* [n_regions]: every weight matrix of the model */
    struct tensor **tensors;        /* [n_regions]: the bound tensor of each region */
    int64_t n_regions;
    void **copies;                      /* [n_copies] node-local copies (hwloc memory) */
    uint64_t *copy_bytes;               /* [n_copies] */
    int64_t n_copies;
    const void **node_ptrs;             /* backing store of tensor.node_data */
    int plan_only;
    struct topo_report report;
    int8_t *expert_node;                /* [n_layers][E] backing store of moe_w.node */
    void *region_mem, *copy_mem;        /* the blocks regions, tensors and node_ptrs,
                                         * copies, copy_bytes are carved from */
};

/* Discovers the machine, plans the workers for `opt` and hands the plan to threads.c (which
 * pins them unless the plan, plan_only or a described machine says not to).
 * @return KLI_OK or KLI_E_RANGE (bad cpus list, bad numa value) / KLI_E_NOMEM. */
int numa_open(struct numa_state **out, const struct kli_model_options *opt,
              struct kli_err *err);

/* Plans the memory of model m's weights and, on a machine with several NUMA nodes and a
 * policy other than none, binds them, makes the node copies (replicate) and checks the
 * pages. What happened goes to s->report.
 * @return KLI_OK; KLI_E_NOMEM (a node copy could not be allocated). */
int numa_place(struct numa_state *s, struct kli_model *m, struct kli_err *err);

void numa_close(struct numa_state *s);

/* The binding part of numa_place, whatever the node count (numa_place calls it only with
 * several nodes; the test calls it on one): node copies for replicate (once), then
 * numa_bind. @return KLI_OK or KLI_E_NOMEM. */
int numa_apply(struct numa_state *s, struct kli_err *err);

/* The binding step on its own, for regions already planned (topo_plan_memory) on a real
 * topology (t->hw set): each region with a node or TOPO_NODE_INTERLEAVE gets its memory
 * policy (mbind through hwloc), its pages are read in by threads bound to their target
 * node, pages found elsewhere are moved (move_pages), and every page is then checked.
 * Interleaving is by 2 MiB stripes, stripe i of the address space on worker node i mod k.
 * Works on one node too (the test uses that). Fills rep (ranges, pages, policy checks).
 * @return KLI_OK; KLI_E_UNSUPPORTED without hwloc or off Linux; KLI_E_NOMEM. */
int numa_bind(const struct topo *t, const struct topo_plan *p, const struct topo_region *r,
              int64_t n, struct topo_report *rep, struct kli_err *err);

/* Copies `bytes` at src into memory bound to logical node `node` (hwloc_alloc_membind).
 * @return the copy, released with numa_free_copy; NULL on failure. */
void *numa_copy_to_node(const struct topo *t, int32_t node, const void *src, uint64_t bytes);
void numa_free_copy(const struct topo *t, void *p, uint64_t bytes);

/* Counts where the pages of [p, p+bytes) are (move_pages query): pages on logical node
 * `node` (or, for TOPO_NODE_INTERLEAVE, on their stripe's node), absent, and per node.
 * @return 0, or -1 when the query is not available (not Linux). */
int numa_check_pages(const struct topo *t, const struct topo_plan *plan, const void *p,
                     uint64_t bytes, int32_t node, struct topo_report *rep);

#endif
