/*
 * topology.h - what the machine looks like (packages, NUMA nodes, cores, SMT siblings) and
 * the placement plan: which CPU each worker runs on, and which NUMA node holds each weight.
 *
 * Discovery goes through hwloc when kli is built with it (HAVE_HWLOC), else through Linux
 * sysfs, else sysconf (every CPU a core of one node). A description can replace the
 * machine: the environment variable KLI_TOPOLOGY, or the `spec` argument of topo_discover,
 * "synthetic:pack:2 numa:2 core:8 pu:2" (hwloc's synthetic syntax) or "xml:PATH" (an hwloc
 * XML export, hwloc builds only). A described machine is planned for but never pinned or
 * bound to: its CPUs are not this process's.
 *
 * The plan is a pure function of (topology, options, model shape): topo_plan_workers and
 * topo_plan_memory read nothing else, so tests/test-topology.c checks their decisions on
 * machines kli never runs on. numa.c carries the plan out.
 */
#ifndef KLI_TOPOLOGY_H
#define KLI_TOPOLOGY_H

#include <stddef.h>
#include <stdint.h>

#include "kli.h"

enum {
    TOPO_MAX_NODES = 64,    /* NUMA nodes (a node mask is one uint64_t) */
    TOPO_MAX_CPUS = 4096    /* OS CPU numbers, and workers (the -t limit) */
};

/* ==== Topology ============================================================================ */

struct topo_core {
    int32_t package;        /* logical package index */
    int32_t node;           /* logical NUMA node index: the node whose memory is local */
    int32_t pu0, n_pu;      /* its hardware threads (SMT siblings): pu_os[pu0 .. pu0+n_pu) */
};

struct topo {
    int32_t n_packages, n_nodes, n_cores, n_pus;
    struct topo_core *cores;            /* [n_cores], in logical (hwloc) order */
    int32_t *pu_os;                     /* [n_pus]: OS CPU number, grouped by core */
    uint8_t *pu_allowed;                /* [n_pus]: 1 if this process may run there */
    int32_t node_os[TOPO_MAX_NODES];    /* OS number of each logical node */
    uint64_t node_mem[TOPO_MAX_NODES];  /* local memory in bytes; 0 when unknown */
    int synthetic;                      /* a description, not this machine */
    char source[160];                   /* "hwloc 2.9.0", "sysfs", "synthetic: pack:2 ..." */
    void *hw;                           /* hwloc_topology_t of this machine (binding), or NULL */
};

/* Discovers this machine, or loads the description `spec` ("synthetic:DESC" or "xml:PATH");
 * a NULL spec takes $KLI_TOPOLOGY when set and non-empty.
 * @return KLI_OK; KLI_E_RANGE for a bad description or more than TOPO_MAX_NODES nodes or
 *         TOPO_MAX_CPUS CPUs; KLI_E_UNSUPPORTED for xml: without hwloc; KLI_E_NOMEM. */
int topo_discover(struct topo **out, const char *spec, struct kli_err *err);
void topo_free(struct topo *t);

/* The discovery of builds without hwloc, compiled in every build so that the test can hold
 * it against hwloc: sysfs (else sysconf) for this machine, or a synthetic description
 * (package, NUMA node, core and PU levels; consecutive cores share a package or node). */
int topo_discover_fallback(struct topo **out, const char *synthetic, struct kli_err *err);

/* Parses a CPU list "0-7,16-23,31" (OS numbers below TOPO_MAX_CPUS) into set[TOPO_MAX_CPUS]
 * (1 = listed). `what` names the list in messages.
 * @return KLI_OK or KLI_E_RANGE. */
int topo_parse_cpus(const char *list, uint8_t *set, const char *what, struct kli_err *err);

/* ==== Worker plan ========================================================================= */

struct topo_options {
    int32_t n_threads;      /* 0: one worker per allowed physical core */
    const char *cpus;       /* NULL, or a CPU list restricting where workers may run */
    enum kli_numa numa;
};

struct topo_worker {
    int32_t cpu;            /* OS CPU number: the core's first allowed hardware thread */
    int32_t core;           /* index into topo.cores */
    int32_t node;           /* logical NUMA node */
};

struct topo_plan {
    int32_t n_workers;
    struct topo_worker workers[TOPO_MAX_CPUS];   /* [n_workers], grouped by node */
    int32_t n_cores_allowed;    /* cores with an allowed CPU (process affinity, --cpus) */
    int32_t n_cpus_allowed;
    int32_t requested;          /* the n_threads asked for; 0 = one per core */
    int pin;                    /* pin worker i to workers[i].cpu */
    enum kli_numa numa;
    uint64_t worker_nodes;      /* bit i: logical node i holds workers */
    int32_t n_worker_nodes;
    int32_t node_workers[TOPO_MAX_NODES];
};

/* Chooses the workers: one per allowed physical core (never one per SMT sibling, never more
 * than the allowed cores: n_threads above that is capped), spread round-robin over the
 * nodes that have allowed cores when a NUMA policy is on (each node's memory controller
 * serves its workers), packed node by node otherwise. Workers are pinned when the whole
 * allowed machine is used, when `cpus` was given, or when a NUMA policy is on; a smaller -t
 * without --cpus leaves them to the scheduler, so that two processes do not pile up on the
 * same first cores.
 * @return KLI_OK; KLI_E_RANGE when `cpus` is malformed, names a CPU this machine lacks, or
 *         leaves no CPU the process may use. */
int topo_plan_workers(const struct topo *t, const struct topo_options *o, struct topo_plan *p,
                      struct kli_err *err);

/* ==== Memory plan ========================================================================= */

/* What a weight matrix is, from its checkpoint name. The trunk is what every token reads:
 * attention (KDA and MLA), norms, the router, shared experts, dense MLP layers and lm_head.
 * Routed experts are read only by the tokens routed to them, and the embedding table one
 * row per token: neither is trunk. */
enum topo_role {
    TOPO_ROLE_OTHER = 0,
    TOPO_ROLE_EMBED,
    TOPO_ROLE_LM_HEAD,
    TOPO_ROLE_NORM,
    TOPO_ROLE_ATTN,
    TOPO_ROLE_ROUTER,
    TOPO_ROLE_SHARED,
    TOPO_ROLE_DENSE,
    TOPO_ROLE_EXPERT
};

/* @return the role of checkpoint tensor `name`; *layer and *expert (either may be NULL)
 *         receive its layer and routed-expert index, or -1. */
enum topo_role topo_role_of(const char *name, int32_t *layer, int32_t *expert);
int topo_role_is_trunk(enum topo_role r);
const char *topo_role_name(enum topo_role r);
const char *topo_numa_name(enum kli_numa n);

/* Region decisions besides a node number. */
enum {
    TOPO_NODE_NONE = -1,        /* not bound: first touch decides */
    TOPO_NODE_INTERLEAVE = -2,  /* pages spread over the nodes holding workers */
    TOPO_NODE_REPLICATE = -3    /* one copy on each node holding workers */
};

struct topo_region {            /* one weight matrix */
    const char *name;
    const void *data;
    uint64_t bytes;
    enum topo_role role;
    int32_t layer, expert;      /* -1: not in a layer / not a routed expert */
    int32_t node;               /* the decision: TOPO_NODE_* or a logical node */
};

/* Decides every region's node for plan p:
 *   none       every region TOPO_NODE_NONE;
 *   interleave every region TOPO_NODE_INTERLEAVE;
 *   replicate  trunk regions TOPO_NODE_REPLICATE, the others interleaved;
 *   partition  each routed expert (its three matrices together) on one node, the others
 *              interleaved. Experts go layer by layer, largest first, each to the node
 *              holding the fewest expert bytes so far (ties: the lowest node): the bytes of
 *              any two nodes then differ by at most one expert, and a layer's equal-sized
 *              experts spread evenly over the nodes (so one token's top-k meets them all).
 * Only nodes holding workers receive memory. node_bytes[TOPO_MAX_NODES] (may be NULL)
 * receives the bytes each node would hold, interleaved regions split evenly.
 * @return KLI_OK or KLI_E_NOMEM. */
int topo_plan_memory(const struct topo_plan *p, struct topo_region *r, int64_t n,
                     uint64_t *node_bytes);

/* ==== Report ============================================================================== */

/* What numa.c did and found, for kli_topology_describe. */
struct topo_report {
    int bound;                  /* memory binding was applied */
    char why[256];              /* when not: the reason ("one NUMA node", ...) */
    int64_t ranges, ranges_failed;      /* bind calls, and those the kernel refused */
    int64_t replicas;                   /* node-local copies made */
    uint64_t replica_bytes;
    int verified;               /* the page check below ran */
    int64_t policy_checked, policy_ok;  /* get_mempolicy(MPOL_F_ADDR) on each range */
    uint64_t pages_checked, pages_on_target, pages_absent;   /* move_pages query */
    uint64_t pages_on_node[TOPO_MAX_NODES];
};

/* Writes what kli sees and what it would do: the topology, the workers and, when r is not
 * NULL, the memory plan of its n regions, with the report `rep` (may be NULL). Returns the
 * length needed (excluding the NUL), like snprintf; buf is NUL-terminated within cap. */
size_t topo_describe(const struct topo *t, const struct topo_plan *p,
                     const struct topo_region *r, int64_t n, const struct topo_report *rep,
                     char *buf, size_t cap);

#endif
