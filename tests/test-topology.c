/*
 * test-topology.c - the placement plan on machines kli never runs on, and the mechanics on
 * this one.
 *
 * Plans (pure functions of topology, options and model shape) on synthetic topologies:
 *   A  1 package, 1 node, 2 cores, 1 PU each;
 *   B  2 packages x 2 nodes x 8 cores x 2 PUs (hwloc's "pack:2 numa:2 core:8 pu:2");
 *   C  4 nodes with 6, 4, 2 and 1 cores, SMT on node 0 only (an hwloc XML file; hwloc
 *      builds only).
 * checked: workers = cores (never PUs), never more than the allowed cores, --cpus honoured,
 * nodes balanced under a NUMA policy; partition balances routed-expert bytes per node
 * within one expert and spreads each layer's experts; replicate marks exactly the trunk;
 * interleave and none decide every region alike. The fallback parser (builds without hwloc)
 * must agree with hwloc on the synthetic machines.
 *
 * On this machine: pinning through threads.c (each worker's affinity is its plan CPU, and a
 * plan without pinning restores the original), memory binding of a file mapping with its
 * get_mempolicy/move_pages check (one node suffices for the mechanics), node copies, and
 * the matmul reading a tensor's node copy (tensor.node_data).
 *
 * Worker identity: regions with fewer items than workers leave the team as it is, so worker i
 * is the same thread before and after (libgomp would otherwise end and recreate threads).
 *
 * The pool of threads.c: every index covered once under many team and region sizes, with
 * the static split (n * i / nth); nested calls and calls from a second thread run serially;
 * regions after the workers fell asleep; more workers than CPUs; denormals flushed inside a
 * share and the caller's mode restored; and a worker waiting for work gives its CPU back
 * (the CPU time it burns while the caller computes alone is a small part of the caller's:
 * libgomp's workers spun through the whole of it, against another process on a busy host).
 *
 * Routing under partition, on a described two-node worker plan: each routed expert of a
 * prefill and of a decode step is computed only by workers of its node (moe.c counts rows computed away from
 * an expert's node: none with routing, some without), and the logits stay those of the
 * plain split.
 */
#define _GNU_SOURCE
#include "config.h"

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "model.h"
#include "numa.h"
#include "threads.h"
#include "topology.h"
#include "tap.h"
#include "testlib.h"

static struct topo_plan wp;      /* the plan under test (big: not on the stack) */

static struct topo *
load(const char *spec)
{
    struct kli_err err = {0};
    struct topo *t = NULL;

    if (topo_discover(&t, spec, &err) != KLI_OK) {
        diag("%s: %s", spec ? spec : "this machine", err.msg);
        return NULL;
    }
    return t;
}

static int
plan_for(const struct topo *t, int n_threads, const char *cpus, enum kli_numa numa,
         struct kli_err *err)
{
    struct topo_options o = {n_threads, cpus, numa};

    return topo_plan_workers(t, &o, &wp, err);
}

/* Workers on distinct cores, each on an allowed CPU of its core, grouped by node, and the
 * per-node counts consistent. */
static int
plan_sane(const struct topo *t, const uint8_t *allowed_cpus)
{
    uint8_t used[TOPO_MAX_CPUS] = {0};
    int32_t per_node[TOPO_MAX_NODES] = {0};

    for (int32_t i = 0; i < wp.n_workers; i++) {
        const struct topo_worker *w = &wp.workers[i];
        const struct topo_core *c = &t->cores[w->core];
        int on_core = 0;
        if (used[w->core]++ || w->node != c->node)
            return 0;
        for (int32_t k = 0; k < c->n_pu; k++)
            on_core |= t->pu_os[c->pu0 + k] == w->cpu;
        if (!on_core || (allowed_cpus != NULL && !allowed_cpus[w->cpu]))
            return 0;
        if (i > 0 && wp.workers[i - 1].node > w->node)
            return 0;
        per_node[w->node]++;
    }
    for (int nd = 0; nd < TOPO_MAX_NODES; nd++) {
        if (per_node[nd] != wp.node_workers[nd] ||
            (per_node[nd] > 0) != (int)(wp.worker_nodes >> nd & 1))
            return 0;
    }
    return 1;
}

/* ==== Worker plans ======================================================================== */

static void
test_machine_a(void)
{
    struct kli_err err = {0};
    struct topo *t = load("synthetic:pack:1 numa:1 core:2 pu:1");

    if (!ok(t != NULL, "A: 1 node, 2 cores loads"))
        return;
    ok(t->n_nodes == 1 && t->n_cores == 2 && t->n_pus == 2 && t->synthetic, "A: 1 node, "
       "2 cores, 2 PUs");
    ok(plan_for(t, 0, NULL, KLI_NUMA_NONE, &err) == KLI_OK && wp.n_workers == 2 &&
       !wp.pin && plan_sane(t, NULL), "A: default is one worker per core (2), not pinned");
    ok(plan_for(t, 1, NULL, KLI_NUMA_NONE, &err) == KLI_OK && wp.n_workers == 1 &&
       !wp.pin, "A: -t 1 uses one core and does not pin (part of the machine, no --cpus)");
    ok(plan_for(t, 5, NULL, KLI_NUMA_NONE, &err) == KLI_OK && wp.n_workers == 2 &&
       wp.requested == 5, "A: -t 5 is capped to the 2 cores");
    ok(plan_for(t, 0, "1", KLI_NUMA_NONE, &err) == KLI_OK && wp.n_workers == 1 &&
       wp.workers[0].cpu == 1 && wp.pin, "A: --cpus 1 gives one worker pinned on CPU 1");
    memset(&err, 0, sizeof(err));
    ok(plan_for(t, 0, "2", KLI_NUMA_NONE, &err) == KLI_E_RANGE && strstr(err.msg, "CPU 2"),
       "A: --cpus 2 (absent) is refused: %s", err.msg);
    memset(&err, 0, sizeof(err));
    ok(plan_for(t, 0, "0-", KLI_NUMA_NONE, &err) == KLI_E_RANGE &&
       plan_for(t, 0, "1-0", KLI_NUMA_NONE, NULL) == KLI_E_RANGE &&
       plan_for(t, 0, "", KLI_NUMA_NONE, NULL) == KLI_E_RANGE &&
       plan_for(t, 0, "0,,1", KLI_NUMA_NONE, NULL) == KLI_E_RANGE,
       "A: malformed CPU lists are refused: %s", err.msg);
    topo_free(t);
}

static void
test_machine_b(void)
{
    struct kli_err err = {0};
    struct topo *t = load("synthetic:pack:2 numa:2 core:8 pu:2");
    uint8_t set[TOPO_MAX_CPUS];

    if (!ok(t != NULL, "B: 2 packages x 2 nodes x 8 cores x 2 PUs loads"))
        return;
    ok(t->n_packages == 2 && t->n_nodes == 4 && t->n_cores == 32 && t->n_pus == 64,
       "B: 2 packages, 4 nodes, 32 cores, 64 PUs");
    int layout = 1;
    for (int32_t c = 0; c < t->n_cores; c++)
        layout &= t->cores[c].node == c / 8 && t->cores[c].package == c / 16 &&
                  t->cores[c].n_pu == 2;
    ok(layout, "B: cores 8 per node, 16 per package, 2 siblings each");

    ok(plan_for(t, 0, NULL, KLI_NUMA_NONE, &err) == KLI_OK && wp.n_workers == 32 &&
       !wp.pin && plan_sane(t, NULL), "B: default: 32 workers (cores, not the 64 PUs), "
       "not pinned");
    int first_sibling = 1;
    for (int32_t i = 0; i < wp.n_workers; i++)
        first_sibling &= wp.workers[i].cpu % 2 == 0;
    ok(first_sibling, "B: each worker on its core's first hardware thread");
    ok(plan_for(t, 64, NULL, KLI_NUMA_INTERLEAVE, &err) == KLI_OK && wp.n_workers == 32,
       "B: -t 64 is capped to 32 cores");

    ok(plan_for(t, 0, "0-7,16-23", KLI_NUMA_NONE, &err) == KLI_OK && wp.n_workers == 8 &&
       wp.n_cpus_allowed == 16 && wp.pin, "B: --cpus 0-7,16-23 covers 8 cores: 8 workers");
    topo_parse_cpus("0-7,16-23", set, "cpus", NULL);
    ok(plan_sane(t, set), "B: --cpus respected (every worker on a listed CPU)");
    ok(wp.n_worker_nodes == 2 && wp.node_workers[0] == 4 && wp.node_workers[1] == 4,
       "B: those cores are nodes 0 and 1, 4 each");
    ok(plan_for(t, 100, "0-7,16-23", KLI_NUMA_NONE, &err) == KLI_OK && wp.n_workers == 8,
       "B: -t 100 --cpus 0-7,16-23 stays at 8 workers");
    ok(plan_for(t, 0, "1,3,5", KLI_NUMA_NONE, &err) == KLI_OK && wp.n_workers == 3 &&
       wp.workers[0].cpu == 1 && wp.workers[2].cpu == 5,
       "B: --cpus of second siblings only: one worker per core, on the listed sibling");
    ok(plan_for(t, 0, "0,1", KLI_NUMA_NONE, &err) == KLI_OK && wp.n_workers == 1,
       "B: --cpus naming two siblings of one core gives one worker");

    ok(plan_for(t, 8, NULL, KLI_NUMA_NONE, &err) == KLI_OK && wp.n_worker_nodes == 1 &&
       !wp.pin, "B: -t 8 without a policy packs node 0 and leaves pinning off");
    ok(plan_for(t, 8, NULL, KLI_NUMA_PARTITION, &err) == KLI_OK && wp.n_worker_nodes == 4 &&
       wp.node_workers[0] == 2 && wp.node_workers[3] == 2 && wp.pin &&
       plan_sane(t, NULL), "B: -t 8 under a policy: 2 workers on each of the 4 nodes, pinned");
    ok(plan_for(t, 6, NULL, KLI_NUMA_REPLICATE, &err) == KLI_OK &&
       wp.node_workers[0] == 2 && wp.node_workers[1] == 2 && wp.node_workers[2] == 1 &&
       wp.node_workers[3] == 1, "B: -t 6 under a policy: 2,2,1,1");
    topo_free(t);
}

#ifdef HAVE_HWLOC
/* hwloc XML of machine C: nodes of 6 (SMT 2), 4, 2 and 1 cores, CPUs numbered in order
 * (node 0: 0-11, node 1: 12-15, node 2: 16-17, node 3: 18); nodes 0-1 in package 0. */
static int
write_machine_c(const char *path)
{
    static const unsigned cores[4] = {6, 4, 2, 1}, smt[4] = {2, 1, 1, 1};
    unsigned first[5] = {0}, core = 0;
    FILE *f = fopen(path, "w");

    if (f == NULL)
        return -1;
    for (int n = 0; n < 4; n++)
        first[n + 1] = first[n] + cores[n] * smt[n];
#define SPAN(a, b) ((((1u << (b)) - 1) >> (a)) << (a))     /* bits [a, b) */
    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<!DOCTYPE topology SYSTEM \"hwloc2.dtd\">\n<topology version=\"2.0\">\n"
            "<object type=\"Machine\" os_index=\"0\" cpuset=\"0x%08x\" "
            "complete_cpuset=\"0x%08x\" allowed_cpuset=\"0x%08x\" nodeset=\"0xf\" "
            "complete_nodeset=\"0xf\" allowed_nodeset=\"0xf\">\n", SPAN(0, first[4]),
            SPAN(0, first[4]), SPAN(0, first[4]));
    for (int pk = 0; pk < 2; pk++) {
        unsigned pset = SPAN(first[2 * pk], first[2 * pk + 2]), pnodes = 3u << (2 * pk);
        fprintf(f, "<object type=\"Package\" os_index=\"%d\" cpuset=\"0x%08x\" "
                "complete_cpuset=\"0x%08x\" nodeset=\"0x%08x\" complete_nodeset=\"0x%08x\">\n",
                pk, pset, pset, pnodes, pnodes);
        for (int n = 2 * pk; n < 2 * pk + 2; n++) {
            unsigned nset = SPAN(first[n], first[n + 1]), pu = first[n];
            fprintf(f, "<object type=\"Group\" cpuset=\"0x%08x\" complete_cpuset=\"0x%08x\" "
                    "nodeset=\"0x%08x\" complete_nodeset=\"0x%08x\">\n"
                    "<object type=\"NUMANode\" os_index=\"%d\" cpuset=\"0x%08x\" "
                    "complete_cpuset=\"0x%08x\" nodeset=\"0x%08x\" complete_nodeset=\"0x%08x\" "
                    "local_memory=\"%llu\"/>\n", nset, nset, 1u << n, 1u << n, n, nset, nset,
                    1u << n, 1u << n, (unsigned long long)(n + 1) << 30);
            for (unsigned c = 0; c < cores[n]; c++, core++) {
                unsigned cset = SPAN(pu, pu + smt[n]);
                fprintf(f, "<object type=\"Core\" os_index=\"%u\" cpuset=\"0x%08x\" "
                        "complete_cpuset=\"0x%08x\" nodeset=\"0x%08x\" "
                        "complete_nodeset=\"0x%08x\">\n", core, cset, cset, 1u << n, 1u << n);
                for (unsigned k = 0; k < smt[n]; k++, pu++)
                    fprintf(f, "<object type=\"PU\" os_index=\"%u\" cpuset=\"0x%08x\" "
                            "complete_cpuset=\"0x%08x\" nodeset=\"0x%08x\" "
                            "complete_nodeset=\"0x%08x\"/>\n", pu, 1u << pu, 1u << pu,
                            1u << n, 1u << n);
                fprintf(f, "</object>\n");
            }
            fprintf(f, "</object>\n");
        }
        fprintf(f, "</object>\n");
    }
#undef SPAN
    fprintf(f, "</object>\n</topology>\n");
    return fclose(f);
}
#endif

static void
test_machine_c(void)
{
#ifdef HAVE_HWLOC
    char path[] = "/tmp/kli-topo-XXXXXX", spec[64];
    struct kli_err err = {0};
    int fd = mkstemp(path);

    if (fd < 0 || close(fd) != 0 || write_machine_c(path) != 0) {
        ok(0, "C: cannot write the XML topology");
        return;
    }
    snprintf(spec, sizeof(spec), "xml:%s", path);
    struct topo *t = load(spec);
    unlink(path);
    if (!ok(t != NULL, "C: 4 uneven nodes load from hwloc XML"))
        return;
    int32_t per[4] = {0};
    for (int32_t c = 0; c < t->n_cores; c++)
        per[t->cores[c].node]++;
    ok(t->n_nodes == 4 && t->n_cores == 13 && t->n_pus == 19 && t->n_packages == 2 &&
       per[0] == 6 && per[1] == 4 && per[2] == 2 && per[3] == 1,
       "C: 4 nodes of 6, 4, 2, 1 cores, 19 PUs, 2 packages (got %d nodes, %d cores, %d PUs)",
       t->n_nodes, t->n_cores, t->n_pus);
    ok(plan_for(t, 0, NULL, KLI_NUMA_PARTITION, &err) == KLI_OK && wp.n_workers == 13 &&
       wp.node_workers[0] == 6 && wp.node_workers[3] == 1 && plan_sane(t, NULL),
       "C: default: 13 workers (not 19), as many per node as it has cores");
    ok(plan_for(t, 8, NULL, KLI_NUMA_PARTITION, &err) == KLI_OK && wp.node_workers[0] == 3 &&
       wp.node_workers[1] == 2 && wp.node_workers[2] == 2 && wp.node_workers[3] == 1,
       "C: -t 8 round-robin over uneven nodes: 3,2,2,1");
    ok(plan_for(t, 4, NULL, KLI_NUMA_INTERLEAVE, &err) == KLI_OK && wp.n_worker_nodes == 4,
       "C: -t 4 under a policy: one worker per node");
    ok(plan_for(t, 0, "12-18", KLI_NUMA_NONE, &err) == KLI_OK && wp.n_workers == 7 &&
       wp.node_workers[0] == 0, "C: --cpus 12-18 (nodes 1-3) gives their 7 cores");
    topo_free(t);
#else
    diag("C: skipped: the uneven machine is an hwloc XML file (built without hwloc)");
#endif
}

/* The parser of builds without hwloc agrees with hwloc. */
static void
test_fallback(void)
{
    static const char *const descs[] = {
        "pack:1 numa:1 core:2 pu:1", "pack:2 numa:2 core:8 pu:2", "numa:2 pack:1 core:3 pu:4",
    };

    for (size_t d = 0; d < KLI_ARRAY_LEN(descs); d++) {
        char spec[96];
        struct topo *a, *b = NULL;
        snprintf(spec, sizeof(spec), "synthetic:%s", descs[d]);
        a = load(spec);
        topo_discover_fallback(&b, descs[d], NULL);
        int same = a != NULL && b != NULL && a->n_cores == b->n_cores &&
                   a->n_pus == b->n_pus && a->n_nodes == b->n_nodes &&
                   a->n_packages == b->n_packages;
        for (int32_t c = 0; same && c < a->n_cores; c++) {
            same = a->cores[c].node == b->cores[c].node &&
                   a->cores[c].package == b->cores[c].package &&
                   a->cores[c].n_pu == b->cores[c].n_pu;
            for (int32_t k = 0; same && k < a->cores[c].n_pu; k++)
                same = a->pu_os[a->cores[c].pu0 + k] == b->pu_os[b->cores[c].pu0 + k];
        }
        ok(same, "fallback parser agrees on \"%s\"", descs[d]);
        topo_free(a);
        topo_free(b);
    }
    struct kli_err err = {0};
    struct topo *t = NULL;
    ok(topo_discover(&t, "synthetic:pack:2 bogus", &err) != KLI_OK && t == NULL,
       "a bad synthetic description is refused: %s", err.msg);
    memset(&err, 0, sizeof(err));
    ok(topo_discover(&t, "nonsense", &err) == KLI_E_RANGE, "a bad KLI_TOPOLOGY is refused");
}

/* ==== Memory plans ======================================================================== */

/* A model shape like Kimi Linear's: layer 0 dense, the others MoE with E experts, KDA
 * attention (MLA every 4th layer), shared experts; expert sizes vary when `uneven`. */
static char names[8192][96];

static int64_t
make_model(struct topo_region *r, int32_t L, int32_t E, int uneven)
{
    int64_t n = 0;

#define ADD(bytes_, ...) do { \
        snprintf(names[n], sizeof(names[n]), __VA_ARGS__); \
        r[n].name = names[n]; \
        r[n].bytes = (bytes_); \
        r[n].role = topo_role_of(names[n], &r[n].layer, &r[n].expert); \
        r[n].node = 99; \
        r[n].data = NULL; \
        n++; \
    } while (0)
    ADD(1000000, "model.embed_tokens.weight");
    ADD(1000000, "lm_head.weight");
    for (int32_t l = 0; l < L; l++) {
        static const char *const kda[] = {"q_proj", "k_proj", "v_proj", "f_a_proj", "o_proj"};
        static const char *const mla[] = {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                          "o_proj"};
        if (l % 4 == 3) {
            for (size_t k = 0; k < KLI_ARRAY_LEN(mla); k++)
                ADD(20000, "model.layers.%d.self_attn.%s.weight", l, mla[k]);
        } else {
            for (size_t k = 0; k < KLI_ARRAY_LEN(kda); k++)
                ADD(30000, "model.layers.%d.self_attn.%s.weight", l, kda[k]);
        }
        if (l == 0) {
            ADD(50000, "model.layers.%d.mlp.gate_proj.weight", l);
            ADD(50000, "model.layers.%d.mlp.up_proj.weight", l);
            ADD(50000, "model.layers.%d.mlp.down_proj.weight", l);
            continue;
        }
        ADD(4096, "model.layers.%d.block_sparse_moe.gate.weight", l);
        for (int32_t e = 0; e < E; e++) {
            /* uneven: a quarter of the experts in a wider type (1.875x), one in 7 narrower */
            uint64_t b = !uneven ? 8192 : e % 4 == 1 ? 15360 : e % 7 == 0 ? 4352 : 8192;
            ADD(b, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight", l, e);
            ADD(b, "model.layers.%d.block_sparse_moe.experts.%d.w3.weight", l, e);
            ADD(b, "model.layers.%d.block_sparse_moe.experts.%d.w2.weight", l, e);
        }
        ADD(16384, "model.layers.%d.block_sparse_moe.shared_experts.gate_proj.weight", l);
        ADD(16384, "model.layers.%d.block_sparse_moe.shared_experts.up_proj.weight", l);
        ADD(16384, "model.layers.%d.block_sparse_moe.shared_experts.down_proj.weight", l);
    }
#undef ADD
    return n;
}

/* The trunk, by a rule written independently of topo_role_of. */
static int
expect_trunk(const char *name)
{
    return strstr(name, "block_sparse_moe.experts.") == NULL &&
           strncmp(name, "model.embed_tokens", 18) != 0;
}

static void
test_roles(void)
{
    int32_t l, e;

    ok(topo_role_of("model.layers.12.block_sparse_moe.experts.37.w2.weight", &l, &e) ==
       TOPO_ROLE_EXPERT && l == 12 && e == 37, "role: routed expert, layer 12, expert 37");
    ok(topo_role_of("model.layers.3.block_sparse_moe.shared_experts.up_proj.weight", &l, &e)
       == TOPO_ROLE_SHARED && l == 3 && e == -1, "role: shared expert");
    ok(topo_role_of("model.layers.3.block_sparse_moe.gate.weight", NULL, NULL) ==
       TOPO_ROLE_ROUTER && topo_role_of("model.layers.3.block_sparse_moe.gate."
       "e_score_correction_bias", NULL, NULL) == TOPO_ROLE_ROUTER, "role: router and its bias");
    ok(topo_role_of("model.layers.0.self_attn.kv_b_proj.weight", NULL, NULL) == TOPO_ROLE_ATTN &&
       topo_role_of("model.layers.0.mlp.down_proj.weight", NULL, NULL) == TOPO_ROLE_DENSE &&
       topo_role_of("model.layers.0.input_layernorm.weight", NULL, NULL) == TOPO_ROLE_NORM &&
       topo_role_of("model.norm.weight", NULL, NULL) == TOPO_ROLE_NORM &&
       topo_role_of("lm_head.weight", NULL, NULL) == TOPO_ROLE_LM_HEAD &&
       topo_role_of("model.embed_tokens.weight", &l, &e) == TOPO_ROLE_EMBED && l == -1,
       "role: attention, dense MLP, norms, lm_head, embedding");
    ok(topo_role_is_trunk(TOPO_ROLE_ATTN) && topo_role_is_trunk(TOPO_ROLE_SHARED) &&
       topo_role_is_trunk(TOPO_ROLE_ROUTER) && topo_role_is_trunk(TOPO_ROLE_NORM) &&
       topo_role_is_trunk(TOPO_ROLE_LM_HEAD) && !topo_role_is_trunk(TOPO_ROLE_EXPERT) &&
       !topo_role_is_trunk(TOPO_ROLE_EMBED), "trunk: attention, shared, router, norms, "
       "lm_head; not routed experts or the embedding");
}

/* Partition checks: every expert on a worker node, its three matrices together, bytes per
 * node within one expert, and (equal sizes) a layer's experts spread within one. */
static void
check_partition(const char *what, struct topo_region *r, int64_t n, int equal_sizes)
{
    uint64_t held[TOPO_MAX_NODES] = {0}, max_unit = 0, lo = UINT64_MAX, hi = 0;
    int placed = 1, together = 1, others = 1, spread = 1;
    int32_t cnt[64][TOPO_MAX_NODES];

    memset(cnt, 0, sizeof(cnt));
    for (int64_t i = 0; i < n; i++) {
        if (r[i].role != TOPO_ROLE_EXPERT) {
            others &= r[i].node == TOPO_NODE_INTERLEAVE;
            continue;
        }
        if (r[i].node < 0 || !(wp.worker_nodes >> r[i].node & 1)) {
            placed = 0;
            continue;
        }
        held[r[i].node] += r[i].bytes;
        /* w1, w3, w2 of one expert are consecutive here */
        if (strstr(r[i].name, ".w1.") != NULL) {
            together &= r[i + 1].node == r[i].node && r[i + 2].node == r[i].node;
            uint64_t u = r[i].bytes + r[i + 1].bytes + r[i + 2].bytes;
            max_unit = u > max_unit ? u : max_unit;
            cnt[r[i].layer][r[i].node]++;
        }
    }
    for (int nd = 0; nd < TOPO_MAX_NODES; nd++) {
        if (!(wp.worker_nodes >> nd & 1))
            continue;
        lo = held[nd] < lo ? held[nd] : lo;
        hi = held[nd] > hi ? held[nd] : hi;
    }
    for (int l = 0; l < 64; l++) {
        int32_t a = INT32_MAX, b = 0, any = 0;
        for (int nd = 0; nd < TOPO_MAX_NODES; nd++) {
            if (!(wp.worker_nodes >> nd & 1))
                continue;
            any |= cnt[l][nd];
            a = cnt[l][nd] < a ? cnt[l][nd] : a;
            b = cnt[l][nd] > b ? cnt[l][nd] : b;
        }
        if (any)
            spread &= b - a <= 1;
    }
    ok(placed && together && others, "%s: every expert on one worker node (its 3 matrices "
       "together), everything else interleaved", what);
    ok(hi - lo <= max_unit, "%s: expert bytes per node within one expert (%llu..%llu, "
       "expert %llu)", what, (unsigned long long)lo, (unsigned long long)hi,
       (unsigned long long)max_unit);
    if (equal_sizes)
        ok(spread, "%s: each layer's experts spread over the nodes (counts within one)", what);
}

static void
test_memory(void)
{
    static struct topo_region r[8192];
    uint64_t nb[TOPO_MAX_NODES], total = 0;
    struct topo *t = load("synthetic:pack:2 numa:2 core:8 pu:2");
    int64_t n = make_model(r, 27, 64, 0);
    int all;

    if (!ok(t != NULL && n < 8192, "model shape of %lld matrices on machine B", (long long)n))
        return;
    for (int64_t i = 0; i < n; i++)
        total += r[i].bytes;

    plan_for(t, 0, NULL, KLI_NUMA_NONE, NULL);
    topo_plan_memory(&wp, r, n, nb);
    all = 1;
    for (int64_t i = 0; i < n; i++)
        all &= r[i].node == TOPO_NODE_NONE;
    ok(all && nb[0] == 0, "none: no region bound");

    plan_for(t, 0, NULL, KLI_NUMA_INTERLEAVE, NULL);
    topo_plan_memory(&wp, r, n, nb);
    all = 1;
    for (int64_t i = 0; i < n; i++)
        all &= r[i].node == TOPO_NODE_INTERLEAVE;
    ok(all && nb[0] + nb[1] + nb[2] + nb[3] <= total && nb[0] + nb[1] + nb[2] + nb[3] + 4 *
       (uint64_t)n >= total && nb[0] == nb[3], "interleave: every region over all 4 nodes, "
       "bytes split evenly");

    plan_for(t, 0, NULL, KLI_NUMA_REPLICATE, NULL);
    topo_plan_memory(&wp, r, n, nb);
    int exact = 1, n_trunk = 0;
    uint64_t trunk = 0;
    for (int64_t i = 0; i < n; i++) {
        int is = r[i].node == TOPO_NODE_REPLICATE;
        exact &= is == expect_trunk(r[i].name) && (is || r[i].node == TOPO_NODE_INTERLEAVE);
        n_trunk += is;
        trunk += is ? r[i].bytes : 0;
    }
    ok(exact && n_trunk > 0, "replicate: exactly the trunk (%d matrices: attention, router, "
       "shared experts, dense MLP, lm_head) copied, the rest interleaved", n_trunk);
    ok(nb[0] >= trunk && nb[0] == nb[1] && nb[2] == nb[3],
       "replicate: each node holds a whole trunk copy");

    plan_for(t, 0, NULL, KLI_NUMA_PARTITION, NULL);
    topo_plan_memory(&wp, r, n, nb);
    check_partition("partition, 4 nodes", r, n, 1);

    plan_for(t, 0, "0-15,32-47", KLI_NUMA_PARTITION, NULL);
    topo_plan_memory(&wp, r, n, nb);
    check_partition("partition, --cpus on nodes 0 and 2", r, n, 1);
    int only = 1;
    for (int64_t i = 0; i < n; i++)
        only &= r[i].role != TOPO_ROLE_EXPERT || r[i].node == 0 || r[i].node == 2;
    ok(only && nb[1] == 0 && nb[3] == 0, "partition: nodes without workers receive nothing");

    n = make_model(r, 13, 48, 1);
    plan_for(t, 12, NULL, KLI_NUMA_PARTITION, NULL);
    topo_plan_memory(&wp, r, n, nb);
    check_partition("partition, uneven expert sizes", r, n, 0);
    topo_free(t);

    t = load("synthetic:pack:1 numa:3 core:2 pu:1");
    if (t != NULL) {
        n = make_model(r, 9, 10, 0);
        plan_for(t, 0, NULL, KLI_NUMA_PARTITION, NULL);
        topo_plan_memory(&wp, r, n, nb);
        check_partition("partition, 10 experts over 3 nodes", r, n, 1);
    }
    topo_free(t);
}

/* ==== This machine ======================================================================== */

struct affinity_job {
    int cpu[64];
    int n_cpus[64];
};

static void
record_affinity(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct affinity_job *j = ctx;
    cpu_set_t s;

    (void)i0;
    (void)i1;
    if (ith >= 64 || sched_getaffinity(0, sizeof(s), &s) != 0)
        return;
    j->n_cpus[ith] = CPU_COUNT(&s);
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (CPU_ISSET(c, &s)) {
            j->cpu[ith] = c;
            break;
        }
    }
}

static void
test_pinning(void)
{
    struct kli_model_options mo;
    struct numa_state *s = NULL;
    struct kli_err err = {0};
    struct affinity_job job;
    uint8_t allowed[TOPO_MAX_CPUS];
    int n_allowed = threads_allowed_cpus(allowed, TOPO_MAX_CPUS);

    kli_model_options_init(&mo);
    mo.gpu = KLI_GPU_OFF;   /* the CPU's mechanics: a GPU would take lm_head and experts */
    int rc = numa_open(&s, &mo, &err);
    if (!ok(rc == KLI_OK, "this machine: %s", rc == KLI_OK ? s->topo->source : err.msg))
        return;
    diag("this machine: %d nodes, %d cores, %d CPUs; %d workers", s->topo->n_nodes,
         s->topo->n_cores, s->topo->n_pus, s->plan.n_workers);
    ok(s->plan.n_workers <= s->topo->n_cores && s->plan.n_workers == threads_count(),
       "this machine: one worker per core, and threads.c runs that many");
    memset(&job, 0, sizeof(job));
    threads_parallel_for(s->plan.n_workers, 1, record_affinity, &job);
    int pinned = 1;
    for (int i = 0; i < s->plan.n_workers && i < 64; i++)
        pinned &= job.n_cpus[i] == 1 && job.cpu[i] == s->plan.workers[i].cpu;
    ok(!s->plan.pin || pinned, "pinning: worker i runs on plan CPU i only");
    numa_close(s);

    if (s != NULL && n_allowed > 1) {
        mo.n_threads = 1;
        s = NULL;
        numa_open(&s, &mo, &err);
        memset(&job, 0, sizeof(job));
        threads_parallel_for(1, 1, record_affinity, &job);
        ok(s != NULL && !s->plan.pin && job.n_cpus[0] == n_allowed,
           "pinning: a plan without pinning gives the caller its %d CPUs back", n_allowed);
        numa_close(s);
    }
}

static void
test_binding(void)
{
#if defined(HAVE_HWLOC) && defined(__linux__)
    struct topo *t = load(NULL);
    struct topo_report rep;
    struct topo_region r[8];
    struct kli_err err = {0};
    char path[] = "/tmp/kli-bind-XXXXXX";
    const size_t size = 8u << 20;
    int fd = mkstemp(path);
    uint8_t *buf = malloc(size);

    if (t == NULL || fd < 0 || buf == NULL) {
        ok(0, "binding: setup");
        free(buf);
        return;
    }
    for (size_t i = 0; i < size; i++)
        buf[i] = (uint8_t)(i * 31 + 7);
    int wrote = write(fd, buf, size) == (ssize_t)size;
    uint8_t *map = wrote ? mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
    close(fd);
    unlink(path);
    if (!ok(map != MAP_FAILED, "binding: a read-only private file mapping, as for weights")) {
        free(buf);
        topo_free(t);
        return;
    }
    /* Four "experts" of 1.5 MiB (unaligned, as in safetensors), then interleaved rest. */
    for (int i = 0; i < 4; i++) {
        snprintf(names[i], sizeof(names[i]),
                 "model.layers.1.block_sparse_moe.experts.%d.w1.weight", i);
        r[i] = (struct topo_region){names[i], map + 1000 + (size_t)i * (3u << 19), 3u << 19,
                                    TOPO_ROLE_EXPERT, 1, i, 0};
    }
    r[4] = (struct topo_region){"model.embed_tokens.weight", map + 1000 + (6u << 20),
                                size - 1000 - (6u << 20), TOPO_ROLE_EMBED, -1, -1, 0};
    plan_for(t, 0, NULL, KLI_NUMA_PARTITION, NULL);
    topo_plan_memory(&wp, r, 5, NULL);
    memset(&rep, 0, sizeof(rep));
    int rc = numa_bind(t, &wp, r, 5, &rep, &err);
    ok(rc == KLI_OK && rep.bound && rep.verified, "binding: numa_bind ran (%s)",
       rc ? err.msg : "ok");
    diag("binding: %lld ranges, %lld refused; policy %lld/%lld; pages %llu, on target %llu, "
         "absent %llu", (long long)rep.ranges, (long long)rep.ranges_failed,
         (long long)rep.policy_ok, (long long)rep.policy_checked,
         (unsigned long long)rep.pages_checked, (unsigned long long)rep.pages_on_target,
         (unsigned long long)rep.pages_absent);
    if (rep.ranges > 0 && rep.ranges_failed == rep.ranges) {
        diag("binding: the kernel refuses mbind here (container?): policy checks skipped");
    } else {
        ok(rep.policy_checked > 0 && rep.policy_ok == rep.policy_checked,
           "binding: get_mempolicy(MPOL_F_ADDR) reports the planned policy on every range");
    }
    ok(rep.pages_checked >= size / 4096 - 1 && rep.pages_absent == 0 &&
       rep.pages_on_target == rep.pages_checked,
       "binding: every page resident and on its planned node (move_pages)");
    ok(memcmp(map, buf, size) == 0, "binding: the mapping reads the file unchanged");

    void *c = numa_copy_to_node(t, 0, buf, size);
    memset(&rep, 0, sizeof(rep));
    ok(c != NULL && memcmp(c, buf, size) == 0 &&
       numa_check_pages(t, &wp, c, size, 0, &rep) == 0 &&
       rep.pages_on_target == rep.pages_checked && rep.pages_checked >= size / 4096,
       "replicate: a node copy is equal and its pages are on its node");
    numa_free_copy(t, c, size);
    munmap(map, size);
    free(buf);
    topo_free(t);
#else
    diag("binding: skipped (needs hwloc on Linux)");
#endif
}

/* The matmul reads a tensor's node copy when it has one: zero lm_head's copy, and the
 * logits must all be zero; without the copy they are not. */
/* The tiny fixture's directory into dir, and model options for the CPU's mechanics: with a
 * GPU it would take lm_head and experts. */
static void
tiny_options(struct kli_model_options *mo, char *dir, size_t cap)
{
    tl_path(dir, cap, "tiny-kimi-linear");
    kli_model_options_init(mo);
    mo->gpu = KLI_GPU_OFF;
}

static void
test_node_data(void)
{
    char dir[4096];
    struct kli_model *m = NULL;
    struct kli_session *s = NULL;
    struct kli_err err = {0};
    struct kli_model_options mo;
    kli_token tok = 1;

    tiny_options(&mo, dir, sizeof(dir));
    mo.numa = KLI_NUMA_REPLICATE;
    if (!ok(kli_model_open(&m, dir, &mo, &err) == KLI_OK, "model opens with --numa replicate "
            "(%s)", err.msg))
        return;
    size_t need = kli_topology_describe(m, NULL, NULL, 0);
    char *text = malloc(need + 1);
    kli_topology_describe(m, NULL, text, need + 1);
    ok(text != NULL && strlen(text) == need && strstr(text, "numa:         replicate") &&
       strstr(text, "lm_head"), "kli_topology_describe reports the model's plan");
    if (m->numa->topo->n_nodes < 2)
        ok(strstr(text, "one NUMA node") != NULL, "one node: nothing bound, and it says why");
    free(text);

    struct tensor *lm = &m->lm_head;
    const void *saved = lm->node_data;
    uint64_t bytes = model_row_bytes(lm) * (uint64_t)lm->shape[0];
    void *zero = calloc(1, bytes);
    const void *ptrs[THREADS_NODES];
    for (int i = 0; i < THREADS_NODES; i++)
        ptrs[i] = zero;
    int32_t V = kli_model_n_vocab(m);
    int nonzero = 0, zeros = 1;
    if (kli_session_create(&s, m, NULL, &err) == KLI_OK &&
        kli_session_eval(s, &tok, 1, NULL, &err) == KLI_OK) {
        const float *lg = kli_session_logits(s);
        for (int32_t i = 0; i < V; i++)
            nonzero |= lg[i] != 0.0f;
        lm->node_data = ptrs;
        kli_session_reset(s);
        if (kli_session_eval(s, &tok, 1, NULL, &err) == KLI_OK) {
            lg = kli_session_logits(s);
            for (int32_t i = 0; i < V; i++)
                zeros &= lg[i] == 0.0f;
        }
        lm->node_data = saved;
    }
    ok(nonzero && zeros, "matmul reads the node copy of a tensor (tensor.node_data)");
    free(zero);
    kli_session_free(s);
    kli_model_close(m);
}

/* The model under each policy: on a machine with several nodes it must be bound with
 * every page on its planned node; on one node nothing is bound, and the report says why.
 * The description goes to the log. */
static void
test_policy(enum kli_numa numa)
{
    char dir[4096];
    struct kli_model *m = NULL;
    struct kli_err err = {0};
    struct kli_model_options mo;

    tiny_options(&mo, dir, sizeof(dir));
    mo.numa = numa;
    if (!ok(kli_model_open(&m, dir, &mo, &err) == KLI_OK, "%s: model opens (%s)",
            topo_numa_name(numa), err.msg))
        return;
    size_t need = kli_topology_describe(m, NULL, NULL, 0);
    char *text = malloc(need + 1), *line, *save = NULL;
    if (text != NULL) {
        kli_topology_describe(m, NULL, text, need + 1);
        for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
            diag("%s", line);
        free(text);
    }
    const struct topo_report *rep = &m->numa->report;
    if (m->numa->topo->n_nodes >= 2 && !m->numa->topo->synthetic) {
        ok(rep->bound && rep->verified && rep->policy_ok == rep->policy_checked &&
           rep->pages_absent == 0 && rep->pages_on_target == rep->pages_checked &&
           rep->pages_checked > 0, "%s: bound, policy as planned on %lld/%lld ranges, "
           "%llu of %llu pages on their planned node", topo_numa_name(numa),
           (long long)rep->policy_ok, (long long)rep->policy_checked,
           (unsigned long long)rep->pages_on_target, (unsigned long long)rep->pages_checked);
    } else {
        ok(!rep->bound && rep->why[0] != '\0', "%s: nothing bound (%s)", topo_numa_name(numa),
           rep->why);
    }
#if defined(HAVE_HWLOC) && defined(__linux__)
    /* Binding anyway (one node is enough for the mechanics): the weights, or their copies,
     * are placed and checked, and the logits do not change by a bit. */
    int32_t V = kli_model_n_vocab(m);
    float *before = calloc((size_t)V, sizeof(float));
    struct kli_session *s = NULL;
    kli_token tok = 3;
    int same = before != NULL && kli_session_create(&s, m, NULL, &err) == KLI_OK &&
               kli_session_eval(s, &tok, 1, NULL, &err) == KLI_OK;
    if (same)
        memcpy(before, kli_session_logits(s), (size_t)V * sizeof(float));
    memset(&m->numa->report, 0, sizeof(m->numa->report));
    int rc = numa_apply(m->numa, &err);
    ok(rc == KLI_OK && rep->bound && rep->verified && rep->policy_ok == rep->policy_checked &&
       rep->pages_absent == 0 && rep->pages_on_target == rep->pages_checked &&
       rep->pages_checked > 0 && (numa != KLI_NUMA_REPLICATE ||
                                  (rep->replicas > 0 && m->lm_head.node_data != NULL)),
       "%s: applied on this machine: %lld ranges, %lld copies, %llu of %llu pages on their "
       "planned node", topo_numa_name(numa), (long long)rep->ranges, (long long)rep->replicas,
       (unsigned long long)rep->pages_on_target, (unsigned long long)rep->pages_checked);
    kli_session_reset(s);
    same = same && kli_session_eval(s, &tok, 1, NULL, &err) == KLI_OK &&
           memcmp(before, kli_session_logits(s), (size_t)V * sizeof(float)) == 0;
    ok(same, "%s: the logits are bitwise the same after placing", topo_numa_name(numa));
    kli_session_free(s);
    free(before);
#endif
    kli_model_close(m);
}

/* Logits of a 40-token prompt in one call (a prefill: more than the 32 tokens of the
 * grouped path without routing) and three decode steps. */
#define ROUTE_PROMPT 40

static int
route_run(struct kli_model *m, float *out, int32_t V)
{
    struct kli_session *s = NULL;
    struct kli_err err = {0};
    kli_token p[ROUTE_PROMPT];

    for (int i = 0; i < ROUTE_PROMPT; i++)
        p[i] = (kli_token)((5 + 37 * i) % 256);
    int good = kli_session_create(&s, m, NULL, &err) == KLI_OK &&
               kli_session_eval(s, p, ROUTE_PROMPT, out, &err) == KLI_OK;

    for (int i = 0; good && i < 3; i++) {
        kli_token t = (kli_token)(7 + 31 * i);
        good = kli_session_eval(s, &t, 1, out + (size_t)(ROUTE_PROMPT + i) * V, &err) ==
               KLI_OK;
    }
    if (!good)
        diag("eval: %s", err.msg);
    kli_session_free(s);
    return good;
}

static void
test_routing(void)
{
    char dir[4096];
    struct kli_model *m = NULL;
    struct kli_err err = {0};
    struct kli_model_options mo;

    tiny_options(&mo, dir, sizeof(dir));
    mo.n_threads = 2;
    mo.numa = KLI_NUMA_PARTITION;
    if (!ok(kli_model_open(&m, dir, &mo, &err) == KLI_OK, "routing: model opens (%s)",
            err.msg))
        return;
    int32_t V = kli_model_n_vocab(m), E = m->cfg.moe.n_experts;
    size_t n = (size_t)(ROUTE_PROMPT + 3) * V;
    float *base = calloc(n, sizeof(float)), *plain = calloc(n, sizeof(float));
    float *routed = calloc(n, sizeof(float));
    int8_t *node = malloc((size_t)E);
    int32_t cpus[2] = {0, 0}, two[2] = {0, 1}, one[2] = {0, 0};
    if (!base || !plain || !routed || !node) {
        ok(0, "routing: out of memory");
        goto out;
    }
    for (int32_t e = 0; e < E; e++)
        node[e] = (int8_t)(e % 2);
    /* one node here: no routing set up by the open */
    int none = m->numa_route == 0;
    for (int i = 0; i < m->cfg.n_layers; i++)
        none &= m->layers[i].moe.node == NULL;
    ok(none, "routing: off on a machine whose workers are on one node");
    int good = route_run(m, base, V);

    /* two workers on two described nodes, experts alternating between them */
    threads_set_plan(2, cpus, two, 0);
    for (int i = 0; i < m->cfg.n_layers; i++) {
        if (m->layers[i].ffn_kind == KLI_FFN_MOE)
            m->layers[i].moe.node = node;
    }
    m->numa_route = 0;
    m->numa_away = 0;
    good = good && route_run(m, plain, V);
    uint64_t away_plain = m->numa_away;
    m->numa_route = 1;
    m->numa_away = 0;
    good = good && route_run(m, routed, V);
    uint64_t away_routed = m->numa_away;
    double d = 0.0, ref = 0.0;
    for (size_t i = 0; i < n; i++) {
        d += ((double)routed[i] - base[i]) * ((double)routed[i] - base[i]);
        ref += (double)base[i] * base[i];
    }
    d = ref > 0 ? sqrt(d / ref) : INFINITY;
    ok(good && memcmp(plain, base, n * sizeof(float)) == 0 && away_plain > 0,
       "routing: the plain split computes %llu expert rows away from their node, logits "
       "unchanged", (unsigned long long)away_plain);
    ok(good && away_routed == 0 && d < 1e-6, "routing: with partition routing no expert row "
       "is computed off its node, in prefill (%d tokens) and decode; logits within %.2g of the "
       "plain split", ROUTE_PROMPT, d);

    /* a node without workers: the plain split, bit for bit */
    threads_set_plan(2, cpus, one, 0);
    m->numa_away = 0;
    good = good && route_run(m, routed, V);
    ok(good && memcmp(routed, base, n * sizeof(float)) == 0,
       "routing: an expert on a node without workers falls back to the plain split");
    for (int i = 0; i < m->cfg.n_layers; i++)
        m->layers[i].moe.node = NULL;
    m->numa_route = 0;
out:
    threads_set_plan(2, cpus, one, 0);
    free(base);
    free(plain);
    free(routed);
    free(node);
    kli_model_close(m);
}

/* ---- worker identity across regions of different sizes ---------------------------------- */

struct tid_job {
    long tid[8];
    int64_t covered;
};

static void
record_tid(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct tid_job *j = ctx;

    if (ith >= 0 && ith < 8)
        j->tid[ith] = (long)syscall(SYS_gettid);
    __atomic_add_fetch(&j->covered, i1 - i0, __ATOMIC_RELAXED);
}

/* Regions with fewer items than workers (nth < team) must not cost threads: libgomp ends the
 * threads a smaller team leaves out and creates new ones for the next larger team, which
 * then lose their pinning and their caches. Worker i stays the same thread throughout, and
 * every range is still covered once. */
static void
test_worker_identity(void)
{
    struct tid_job first, job;
    int same = 1, covered = 1, saved = threads_count();

    threads_set_count(4);
    memset(&first, 0, sizeof(first));
    threads_parallel_for(4, 1, record_tid, &first);
    covered &= first.covered == 4;
    for (int round = 0; round < 3; round++) {
        memset(&job, 0, sizeof(job));
        threads_parallel_for(2, 1, record_tid, &job);   /* two workers busy, two idle */
        covered &= job.covered == 2;
        memset(&job, 0, sizeof(job));
        threads_parallel_for(40, 1, record_tid, &job);
        covered &= job.covered == 40;
        for (int i = 0; i < 4; i++)
            same &= job.tid[i] == first.tid[i] && first.tid[i] != 0;
    }
    ok(same && covered, "workers: the same four threads after regions of two (every item once)");
    threads_set_count(saved);
}


/* ---- the pool: coverage, static split, nesting, sleep, flush mode, idle workers -------- */

enum { POOL_MAXN = 5000, POOL_MAXT = 16 };

struct cover_job {
    int64_t n;
    int count[POOL_MAXN];             /* times index i was handed out */
    int64_t lo[POOL_MAXT], hi[POOL_MAXT];
    int calls[POOL_MAXT];             /* times share ith ran */
    int bad_ith;
};

static void
record_cover(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct cover_job *j = ctx;

    if (ith < 0 || ith >= POOL_MAXT || i0 < 0 || i1 > j->n || i0 >= i1) {
        __atomic_store_n(&j->bad_ith, 1, __ATOMIC_RELAXED);
        return;
    }
    j->lo[ith] = i0;
    j->hi[ith] = i1;
    j->calls[ith]++;
    for (int64_t i = i0; i < i1; i++)
        __atomic_add_fetch(&j->count[i], 1, __ATOMIC_RELAXED);
}

/* Every team size against many region sizes and grains: each index once, and share i is
 * [n * i / nth, n * (i + 1) / nth) with nth = min(team, n / grain), as the header says. */
static void
test_pool_cover(void)
{
    static const int teams[] = {1, 2, 3, 4, 7, 16};
    static const int64_t sizes[] = {1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 64, 100, 999, 4097,
                                    POOL_MAXN};
    static const int64_t grains[] = {0, 1, 2, 3, 64, 1000};
    static struct cover_job j;
    int saved = threads_count(), good = 1, regions = 0;

    for (size_t t = 0; t < KLI_ARRAY_LEN(teams); t++) {
        threads_set_count(teams[t]);
        for (size_t s = 0; s < KLI_ARRAY_LEN(sizes); s++) {
            for (size_t g = 0; g < KLI_ARRAY_LEN(grains); g++) {
                int64_t n = sizes[s], grain = grains[g] < 1 ? 1 : grains[g];
                int64_t nth = teams[t] < n / grain ? teams[t] : n / grain;
                if (nth < 1)
                    nth = 1;
                memset(&j, 0, sizeof(j));
                j.n = n;
                threads_parallel_for(n, grains[g], record_cover, &j);
                regions++;
                int once = !j.bad_ith;
                for (int64_t i = 0; i < n; i++)
                    once &= j.count[i] == 1;
                for (int64_t i = 0; i < nth; i++) {
                    int64_t lo = n * i / nth, hi = n * (i + 1) / nth;
                    once &= hi > lo ? j.calls[i] == 1 && j.lo[i] == lo && j.hi[i] == hi
                                    : j.calls[i] == 0;
                }
                for (int64_t i = nth; i < POOL_MAXT; i++)
                    once &= j.calls[i] == 0;
                if (!once && good)
                    diag("team %d, n %lld, grain %lld: wrong split", teams[t], (long long)n,
                         (long long)grains[g]);
                good &= once;
            }
        }
    }
    ok(good, "pool: %d regions (teams 1 to 16 on %ld CPUs, sizes 1 to %d): every index once, "
       "share i = [n*i/nth, n*(i+1)/nth)", regions, sysconf(_SC_NPROCESSORS_ONLN), POOL_MAXN);
    threads_set_count(saved);
}

struct nest_job {
    long outer_tid[POOL_MAXT];
    int nested_ok[POOL_MAXT];
};

struct nest_inner {
    long tid;
    int calls;
    int64_t i0, i1;
    int ith;
};

static void
nest_inner_fn(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct nest_inner *in = ctx;

    in->tid = (long)syscall(SYS_gettid);
    in->calls++;
    in->i0 = i0;
    in->i1 = i1;
    in->ith = ith;
}

static void
nest_outer_fn(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct nest_job *j = ctx;
    struct nest_inner in = {0};

    (void)i0;
    (void)i1;
    if (ith < 0 || ith >= POOL_MAXT)
        return;
    j->outer_tid[ith] = (long)syscall(SYS_gettid);
    threads_parallel_for(1000, 1, nest_inner_fn, &in);
    j->nested_ok[ith] = in.calls == 1 && in.i0 == 0 && in.i1 == 1000 && in.ith == 0 &&
                        in.tid == j->outer_tid[ith];
}

/* A call from inside a share runs serially, whole, on the thread of that share (ith 0). */
static void
test_pool_nested(void)
{
    struct nest_job j;
    int saved = threads_count(), good = 1;

    threads_set_count(4);
    memset(&j, 0, sizeof(j));
    threads_parallel_for(4, 1, nest_outer_fn, &j);
    for (int i = 0; i < 4; i++)
        good &= j.nested_ok[i] && j.outer_tid[i] != 0;
    ok(good, "pool: a nested call runs serially on the calling worker, [0, n) as ith 0");
    threads_set_count(saved);
}

/* Two application threads calling at once: each call covers its range exactly once (one of
 * them may get the pool, the other runs serially), and neither waits forever. */
struct caller_arg {
    int rounds, good;
};

static void *
pool_caller_main(void *arg)
{
    struct caller_arg *a = arg;
    static _Thread_local struct cover_job j;

    a->good = 1;
    for (int r = 0; r < a->rounds; r++) {
        int64_t n = 1 + (r * 37) % 300;
        memset(&j, 0, sizeof(j));
        j.n = n;
        threads_parallel_for(n, 1, record_cover, &j);
        for (int64_t i = 0; i < n; i++)
            a->good &= j.count[i] == 1 && !j.bad_ith;
    }
    return NULL;
}

static void
test_pool_callers(void)
{
    struct caller_arg a[3] = {{300, 0}, {300, 0}, {300, 0}};
    pthread_t th[3];
    int saved = threads_count(), started = 0, good = 1;

    threads_set_count(3);
    for (int i = 0; i < 3; i++)
        started += pthread_create(&th[i], NULL, pool_caller_main, &a[i]) == 0;
    for (int i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
        good &= a[i].good;
    }
    ok(started == 3 && good, "pool: three threads calling at once, 300 regions each: every "
       "index once");
    threads_set_count(saved);
}

static void
sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* After the workers have waited long past any spin (asleep), a region still wakes every one
 * of them: the same threads, every index once. Then many more workers than CPUs. */
static void
test_pool_sleep(void)
{
    struct tid_job first, job;
    static struct cover_job j;
    int saved = threads_count(), good = 1;

    threads_set_count(4);
    memset(&first, 0, sizeof(first));
    threads_parallel_for(4, 1, record_tid, &first);
    for (int round = 0; round < 3; round++) {
        sleep_ms(150);
        memset(&job, 0, sizeof(job));
        threads_parallel_for(4, 1, record_tid, &job);
        good &= job.covered == 4;
        for (int i = 0; i < 4; i++)
            good &= job.tid[i] == first.tid[i] && first.tid[i] != 0;
    }
    ok(good, "pool: regions after 150 ms asleep run on the same four workers, every item once");

    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int team = cpus > 0 && cpus < 8 ? 4 * (int)cpus : 16;
    threads_set_count(team > POOL_MAXT ? POOL_MAXT : team);
    good = 1;
    for (int r = 0; r < 600; r++) {
        int64_t n = 1 + r % 97;
        memset(j.count, 0, (size_t)n * sizeof(j.count[0]));
        j.n = n;
        threads_parallel_for(n, 1, record_cover, &j);
        for (int64_t i = 0; i < n; i++)
            good &= j.count[i] == 1;
    }
    ok(good && !j.bad_ith, "pool: %d workers on %ld CPUs, 600 regions: no deadlock, every "
       "index once", threads_count(), cpus);
    threads_set_count(saved);
}

/* ---- denormals: flushed inside every share, the caller's mode restored ------------------- */

static volatile float denorm_a = 1e-30f, denorm_b = 1e-10f;

static int
denormal_survives(void)
{
    float p = denorm_a * denorm_b;     /* 1e-40: a denormal, or 0 when flushed */

    return p != 0.0f;
}

struct flush_job {
    int flushed[POOL_MAXT], ran[POOL_MAXT];
};

static void
record_flush(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct flush_job *j = ctx;

    (void)i0;
    (void)i1;
    if (ith >= 0 && ith < POOL_MAXT) {
        j->flushed[ith] = !denormal_survives();
        j->ran[ith] = 1;
    }
}

static void
test_pool_flush(void)
{
#if defined(__x86_64__) || defined(__i386__) || defined(__aarch64__)
    struct flush_job j;
    int saved = threads_count(), good = 1;

    if (!denormal_survives()) {
        ok(1, "# SKIP the caller already flushes denormals");
        return;
    }
    threads_set_count(4);
    for (int round = 0; round < 3; round++) {
        memset(&j, 0, sizeof(j));
        threads_parallel_for(4, 1, record_flush, &j);
        for (int i = 0; i < 4; i++)
            good &= j.ran[i] && j.flushed[i];
        good &= denormal_survives();
        memset(&j, 0, sizeof(j));
        threads_parallel_for(1, 1, record_flush, &j);     /* the serial path */
        good &= j.ran[0] && j.flushed[0] && denormal_survives();
    }
    ok(good, "pool: denormals flushed in every share (workers and caller, parallel and "
       "serial), the caller's mode restored after each region");
    threads_set_count(saved);
#else
    ok(1, "# SKIP no flush-to-zero control on this CPU");
#endif
}

/* ---- idle workers give their CPU back ---------------------------------------------------- */

struct clock_job {
    clockid_t clock;
    int have;
};

static void
record_clock(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct clock_job *j = ctx;

    (void)i0;
    (void)i1;
    if (ith == 1)
        j->have = pthread_getcpuclockid(pthread_self(), &j->clock) == 0;
}

static double
cpu_seconds(clockid_t c)
{
    struct timespec ts;

    if (clock_gettime(c, &ts) != 0)
        return -1.0;
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The caller computes alone for 1 ms of its own CPU time between regions, 60 times: a
 * worker that spins only briefly before sleeping uses a small part of that (the spin is
 * bounded by 200 us of wall time by default). Worker CPU time is compared with the caller's
 * CPU time, not with a clock, so a slow or loaded machine or a sanitizer changes neither
 * side's share: the bound of one half leaves a wide margin. libgomp's default spin (300000
 * iterations, milliseconds) kept the worker busy through every gap, on a CPU that another
 * process needed. */
static void
test_pool_idle_cpu(void)
{
    struct clock_job j = {0};
    int saved = threads_count();
    volatile double sink = 0.0;

    threads_set_count(2);
    threads_parallel_for(2, 1, record_clock, &j);
    if (!ok(j.have, "pool: the worker's CPU clock"))
        goto out;
    double w0 = cpu_seconds(j.clock), c0 = cpu_seconds(CLOCK_THREAD_CPUTIME_ID);
    for (int gap = 0; gap < 60; gap++) {
        double until = cpu_seconds(CLOCK_THREAD_CPUTIME_ID) + 0.001;
        while (cpu_seconds(CLOCK_THREAD_CPUTIME_ID) < until)
            for (int k = 0; k < 1000; k++)
                sink += k * 1e-9;
        threads_parallel_for(2, 1, record_clock, &j);
    }
    double w = cpu_seconds(j.clock) - w0, c = cpu_seconds(CLOCK_THREAD_CPUTIME_ID) - c0;
    ok(w0 >= 0 && c > 0 && w < 0.5 * c, "pool: a waiting worker sleeps: it used %.1f ms of "
       "CPU while the caller computed alone for %.1f ms", w * 1e3, c * 1e3);
out:
    threads_set_count(saved);
}

static void
test_policy_interleave(void)
{
    test_policy(KLI_NUMA_INTERLEAVE);
}

static void
test_policy_replicate(void)
{
    test_policy(KLI_NUMA_REPLICATE);
}

static void
test_policy_partition(void)
{
    test_policy(KLI_NUMA_PARTITION);
}

static const struct tap_fn cases[] = {
    {"worker_identity", test_worker_identity},
    {"pool_cover", test_pool_cover},
    {"pool_nested", test_pool_nested},
    {"pool_callers", test_pool_callers},
    {"pool_sleep", test_pool_sleep},
    {"pool_flush", test_pool_flush},
    {"pool_idle_cpu", test_pool_idle_cpu},
    {"machine_a", test_machine_a},
    {"machine_b", test_machine_b},
    {"machine_c", test_machine_c},
    {"fallback", test_fallback},
    {"roles", test_roles},
    {"memory", test_memory},
    {"pinning", test_pinning},
    {"binding", test_binding},
    {"node_data", test_node_data},
    {"policy_interleave", test_policy_interleave},
    {"policy_replicate", test_policy_replicate},
    {"policy_partition", test_policy_partition},
    {"routing", test_routing},
};

int
main(int argc, char **argv)
{
    tap_init(argc, argv);
    unsetenv("KLI_SPIN_US");    /* the default spin, whatever the environment says */
    tap_run(cases, sizeof(cases) / sizeof(cases[0]));
    plan_done();
    return tap_exit();
}
