/*
 * numa.c - carries out topology.c's plan for a model: workers pinned through threads.c,
 * weights bound to NUMA nodes, trunk copies per node, and a page-by-page check.
 *
 * What the kernel allows, and so what this file does. The weights are a read-only private
 * file mapping: their pages are page-cache pages, and Linux allocates a page-cache page by
 * the memory policy of the thread that first reads it, not by the policy of the mapping
 * (mbind on a file mapping is recorded, get_mempolicy reports it, but page-cache
 * allocation does not consult it). So placing the weights takes three steps per 2 MiB
 * stripe: (1) mbind the range, for the record and for anonymous memory (weights converted
 * at open live there); (2) read the stripe in from a worker whose own policy is bound to the
 * stripe's target node, so that pages not yet cached are allocated there; (3) ask
 * move_pages where every page is and move the strays (pages cached earlier, by an earlier
 * run, elsewhere). Step (3) moves only pages no other process maps (the kernel refuses
 * the others without CAP_SYS_NICE); what is left where is counted and reported, never
 * assumed. Placing therefore reads the whole model at open.
 *
 * Replicate needs no such care: the copies are anonymous memory allocated with a BIND
 * policy (hwloc_alloc_membind) before they are written.
 *
 * Partition also routes the work: numa_route gives each MoE layer the node of each routed
 * expert (moe_w.node), and moe.c's grouped path, which every batch then takes, splits
 * each expert's rows over the workers of its node only and the shared expert over all
 * workers, so every routed expert is read from local memory, in prefill and decode.
 */
#define _GNU_SOURCE
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/syscall.h>
#endif
#ifdef HAVE_HWLOC
#include <hwloc.h>
#endif

#include "internal.h"
#include "model.h"
#include "numa.h"
#include "threads.h"

_Static_assert(THREADS_NODES == TOPO_MAX_NODES, "threads.h and topology.h node bounds differ");

#define NUMA_STRIPE ((uintptr_t)2 << 20)    /* interleave granularity and unit of work */
#define NUMA_QUERY 512                      /* pages per move_pages call */
#define NUMA_MASK_BITS 4096                 /* node mask of get_mempolicy */

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

/* Linux memory-policy ABI (linux/mempolicy.h) for the raw system calls: kli does not link
 * libnuma for two calls. */
enum {
    NUMA_MPOL_PREFERRED = 1,
    NUMA_MPOL_BIND = 2,
    NUMA_MPOL_INTERLEAVE = 3,
    NUMA_MPOL_PREFERRED_MANY = 5,
    NUMA_MPOL_F_ADDR = 1 << 1,
    NUMA_MPOL_MF_MOVE = 1 << 1
};

#if defined(__linux__) && defined(SYS_move_pages) && defined(SYS_get_mempolicy)
#define NUMA_LINUX 1
#endif

static uintptr_t
numa_page(void)
{
    long p = sysconf(_SC_PAGESIZE);

    return p > 0 ? (uintptr_t)p : 4096;
}

/* The logical node that should hold the page at address a: `node` itself, or for
 * TOPO_NODE_INTERLEAVE the worker node of a's stripe (stripe i on worker node i mod k). */
static int32_t
numa_target(const struct topo_plan *p, uintptr_t a, int32_t node)
{
    if (node >= 0)
        return node;
    uint64_t k = (uint64_t)(a / NUMA_STRIPE) % (uint64_t)(p->n_worker_nodes > 0
                                                           ? p->n_worker_nodes : 1);
    for (int32_t nd = 0; nd < TOPO_MAX_NODES; nd++) {
        if ((p->worker_nodes >> nd & 1) && k-- == 0)
            return nd;
    }
    return 0;
}

static int32_t
numa_logical(const struct topo *t, int os)
{
    for (int32_t nd = 0; nd < t->n_nodes; nd++) {
        if (t->node_os[nd] == os)
            return nd;
    }
    return -1;
}

/* ==== Page check ========================================================================== */

struct numa_count {
    uint64_t checked, on_target, absent, on_node[TOPO_MAX_NODES];
};

static void
numa_count_add(struct topo_report *rep, const struct numa_count *c)
{
    __atomic_add_fetch(&rep->pages_checked, c->checked, __ATOMIC_RELAXED);
    __atomic_add_fetch(&rep->pages_on_target, c->on_target, __ATOMIC_RELAXED);
    __atomic_add_fetch(&rep->pages_absent, c->absent, __ATOMIC_RELAXED);
    for (int nd = 0; nd < TOPO_MAX_NODES; nd++) {
        if (c->on_node[nd])
            __atomic_add_fetch(&rep->pages_on_node[nd], c->on_node[nd], __ATOMIC_RELAXED);
    }
}

#ifdef NUMA_LINUX
/* Where pages[0..n) are: status[i] = OS node, or -errno (-ENOENT: not resident). */
static int
numa_where(void **pages, int64_t n, int *status)
{
    return syscall(SYS_move_pages, 0, (unsigned long)n, pages, NULL, status, 0) == 0 ? 0 : -1;
}

/* Checks [a, b) (page-aligned) against target `node`; with `fix`, first moves the pages
 * that are resident elsewhere. */
static int
numa_check_span(const struct topo *t, const struct topo_plan *p, uintptr_t a, uintptr_t b,
                int32_t node, int fix, struct numa_count *c)
{
    uintptr_t ps = numa_page();
    void *pages[NUMA_QUERY], *stray[NUMA_QUERY];
    int status[NUMA_QUERY], dest[NUMA_QUERY], moved[NUMA_QUERY], idx[NUMA_QUERY];

    while (a < b) {
        int64_t n = (int64_t)((b - a) / ps), ns = 0;
        if (n > NUMA_QUERY)
            n = NUMA_QUERY;
        for (int64_t i = 0; i < n; i++)
            pages[i] = (void *)(a + (uintptr_t)i * ps);
        if (numa_where(pages, n, status) != 0)
            return -1;
        for (int64_t i = 0; fix && i < n; i++) {
            int32_t want = numa_target(p, (uintptr_t)pages[i], node);
            if (status[i] >= 0 && status[i] != t->node_os[want]) {
                stray[ns] = pages[i];
                dest[ns] = t->node_os[want];
                idx[ns++] = (int)i;
            }
        }
        if (ns > 0 && syscall(SYS_move_pages, 0, (unsigned long)ns, stray, dest, moved,
                              NUMA_MPOL_MF_MOVE) >= 0) {
            for (int64_t k = 0; k < ns; k++)
                status[idx[k]] = moved[k];
        }
        for (int64_t i = 0; i < n; i++) {
            int32_t lg = status[i] >= 0 ? numa_logical(t, status[i]) : -1;
            c->checked++;
            if (status[i] < 0) {
                c->absent++;
                continue;
            }
            if (lg >= 0) {
                c->on_node[lg]++;
                c->on_target += lg == numa_target(p, (uintptr_t)pages[i], node);
            }
        }
        a += (uintptr_t)n * ps;
    }
    return 0;
}
#endif

int
numa_check_pages(const struct topo *t, const struct topo_plan *plan, const void *p,
                 uint64_t bytes, int32_t node, struct topo_report *rep)
{
#ifdef NUMA_LINUX
    uintptr_t ps = numa_page(), a = (uintptr_t)p & ~(ps - 1);
    uintptr_t b = ((uintptr_t)p + bytes + ps - 1) & ~(ps - 1);
    struct numa_count c;

    memset(&c, 0, sizeof(c));
    if (numa_check_span(t, plan, a, b, node, 0, &c) != 0)
        return -1;
    numa_count_add(rep, &c);
    return 0;
#else
    (void)t; (void)plan; (void)p; (void)bytes; (void)node; (void)rep;
    return -1;
#endif
}

#if defined(HAVE_HWLOC) && defined(NUMA_LINUX)
/* The range's recorded policy (get_mempolicy MPOL_F_ADDR) is the planned one. */
static int
numa_policy_ok(const struct topo *t, const struct topo_plan *p, uintptr_t a, int32_t node)
{
    unsigned long mask[NUMA_MASK_BITS / (8 * sizeof(unsigned long))];
    const size_t lb = 8 * sizeof(unsigned long);
    int mode = -1;

    memset(mask, 0, sizeof(mask));
    if (syscall(SYS_get_mempolicy, &mode, mask, (unsigned long)NUMA_MASK_BITS, (void *)a,
                (unsigned long)NUMA_MPOL_F_ADDR) != 0)
        return 0;
    /* hwloc's BIND without STRICT is MPOL_PREFERRED_MANY on recent kernels (MPOL_PREFERRED
     * for one node before): the node is preferred, and a full node spills over rather than
     * failing the allocation. That is what weights want; the page check shows any spill. */
    if (node >= 0 ? mode != NUMA_MPOL_BIND && mode != NUMA_MPOL_PREFERRED &&
                    mode != NUMA_MPOL_PREFERRED_MANY
                  : mode != NUMA_MPOL_INTERLEAVE)
        return 0;
    for (int32_t nd = 0; nd < t->n_nodes; nd++) {
        int os = t->node_os[nd];
        int want = node >= 0 ? nd == node : (int)(p->worker_nodes >> nd & 1);
        if (os < 0 || os >= NUMA_MASK_BITS)
            continue;
        if (want != (int)(mask[(size_t)os / lb] >> ((size_t)os % lb) & 1))
            return 0;
    }
    return 1;
}
#endif

/* ==== Binding ============================================================================= */

#if defined(HAVE_HWLOC) && defined(NUMA_LINUX)
struct numa_span {              /* page-aligned [a, b) with one target */
    uintptr_t a, b;
    int32_t node;               /* logical node, or TOPO_NODE_INTERLEAVE */
};

static int
numa_span_cmp(const void *x, const void *y)
{
    const struct numa_span *s = x, *t = y;

    return (s->a > t->a) - (s->a < t->a);
}

struct numa_job {
    const struct topo *t;
    const struct topo_plan *p;
    const struct numa_span *pieces;    /* each within one stripe */
    struct topo_report *rep;
};

/* Reads each piece in under a thread policy bound to its target node, moves strays,
 * counts. */
static void
numa_place_range(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct numa_job *j = ctx;
    hwloc_topology_t hw = j->t->hw;
    hwloc_bitmap_t set = hwloc_bitmap_alloc();
    int32_t cur = -1;
    uintptr_t ps = numa_page();
    struct numa_count c;

    (void)ith;
    memset(&c, 0, sizeof(c));
    for (int64_t i = i0; i < i1; i++) {
        const struct numa_span *s = &j->pieces[i];
        int32_t want = numa_target(j->p, s->a, s->node);
        if (set != NULL && want != cur) {
            hwloc_bitmap_only(set, (unsigned)j->t->node_os[want]);
            hwloc_set_membind(hw, set, HWLOC_MEMBIND_BIND,
                              HWLOC_MEMBIND_THREAD | HWLOC_MEMBIND_BYNODESET);
            cur = want;
        }
        if (madvise((void *)s->a, s->b - s->a, MADV_POPULATE_READ) != 0) {
            /* Before Linux 5.14: one read per page does the same. */
            volatile const uint8_t *q = (const uint8_t *)s->a;
            for (uintptr_t o = 0; o < s->b - s->a; o += ps)
                (void)q[o];
        }
        numa_check_span(j->t, j->p, s->a, s->b, s->node, 1, &c);
    }
    if (set != NULL && cur >= 0)
        hwloc_set_membind(hw, hwloc_topology_get_complete_nodeset(hw), HWLOC_MEMBIND_DEFAULT,
                          HWLOC_MEMBIND_THREAD | HWLOC_MEMBIND_BYNODESET);
    hwloc_bitmap_free(set);
    numa_count_add(j->rep, &c);
}
#endif

int
numa_bind(const struct topo *t, const struct topo_plan *p, const struct topo_region *r,
          int64_t n, struct topo_report *rep, struct kli_err *err)
{
#if defined(HAVE_HWLOC) && defined(NUMA_LINUX)
    hwloc_topology_t hw = t->hw;
    uintptr_t ps = numa_page();
    struct numa_span *sp = NULL, *pieces = NULL;
    hwloc_bitmap_t set = NULL;
    int64_t ns = 0, k = 0, np = 0;
    int rc = KLI_OK;

    if (hw == NULL)
        return err_set(err, KLI_E_UNSUPPORTED, "numa: no hwloc topology of this machine");
    if ((sp = k_mallocarray((size_t)n + 1, sizeof(*sp))) == NULL ||
        (set = hwloc_bitmap_alloc()) == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory placing the weights");
        goto out;
    }
    for (int64_t i = 0; i < n; i++) {
        if (r[i].bytes == 0 || (r[i].node < 0 && r[i].node != TOPO_NODE_INTERLEAVE))
            continue;
        uintptr_t a = (uintptr_t)r[i].data & ~(ps - 1);
        uintptr_t b = ((uintptr_t)r[i].data + r[i].bytes + ps - 1) & ~(ps - 1);
        sp[ns++] = (struct numa_span){a, b, r[i].node};
    }
    /* Sorted, overlaps cut (a page shared by two matrices goes with the first), and
     * neighbours with one target merged: fewer mbind calls, fewer kernel VMAs. */
    qsort(sp, (size_t)ns, sizeof(*sp), numa_span_cmp);
    for (int64_t i = 0; i < ns; i++) {
        struct numa_span s = sp[i];
        if (k > 0 && s.a < sp[k - 1].b)
            s.a = sp[k - 1].b;
        if (s.a >= s.b)
            continue;
        if (k > 0 && sp[k - 1].b == s.a && sp[k - 1].node == s.node)
            sp[k - 1].b = s.b;
        else
            sp[k++] = s;
    }
    ns = k;

    /* (1) The recorded policy of each range. */
    for (int64_t i = 0; i < ns; i++) {
        hwloc_bitmap_zero(set);
        for (int32_t nd = 0; nd < t->n_nodes; nd++) {
            if (sp[i].node >= 0 ? nd == sp[i].node : (int)(p->worker_nodes >> nd & 1))
                hwloc_bitmap_set(set, (unsigned)t->node_os[nd]);
        }
        rep->ranges++;
        if (hwloc_set_area_membind(hw, (void *)sp[i].a, sp[i].b - sp[i].a, set,
                                   sp[i].node >= 0 ? HWLOC_MEMBIND_BIND
                                                   : HWLOC_MEMBIND_INTERLEAVE,
                                   HWLOC_MEMBIND_BYNODESET) != 0)
            rep->ranges_failed++;
    }

    /* (2, 3) Stripe by stripe, in parallel: read in on the target node, move strays. */
    for (int64_t i = 0; i < ns; i++)
        np += (int64_t)((sp[i].b - 1) / NUMA_STRIPE - sp[i].a / NUMA_STRIPE) + 1;
    if ((pieces = k_mallocarray((size_t)np + 1, sizeof(*pieces))) == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory placing the weights");
        goto out;
    }
    np = 0;
    for (int64_t i = 0; i < ns; i++) {
        for (uintptr_t a = sp[i].a; a < sp[i].b; ) {
            uintptr_t b = (a / NUMA_STRIPE + 1) * NUMA_STRIPE;
            if (b > sp[i].b)
                b = sp[i].b;
            pieces[np++] = (struct numa_span){a, b, sp[i].node};
            a = b;
        }
    }
    struct numa_job job = {t, p, pieces, rep};
    threads_parallel_for(np, 1, numa_place_range, &job);

    for (int64_t i = 0; i < ns; i++) {
        rep->policy_checked++;
        rep->policy_ok += numa_policy_ok(t, p, sp[i].a, sp[i].node);
    }
    rep->bound = 1;
    rep->verified = 1;
out:
    hwloc_bitmap_free(set);
    free(sp);
    free(pieces);
    return rc;
#else
    (void)t; (void)p; (void)r; (void)n; (void)rep;
    return err_set(err, KLI_E_UNSUPPORTED, "numa: memory binding needs hwloc on Linux");
#endif
}

void *
numa_copy_to_node(const struct topo *t, int32_t node, const void *src, uint64_t bytes)
{
#ifdef HAVE_HWLOC
    hwloc_bitmap_t set;
    void *p;

    if (t->hw == NULL || node < 0 || node >= t->n_nodes || (set = hwloc_bitmap_alloc()) == NULL)
        return NULL;
    hwloc_bitmap_only(set, (unsigned)t->node_os[node]);
    p = hwloc_alloc_membind((hwloc_topology_t)t->hw, (size_t)bytes, set, HWLOC_MEMBIND_BIND,
                            HWLOC_MEMBIND_BYNODESET);
    hwloc_bitmap_free(set);
    if (p == NULL)
        return NULL;
#ifdef MADV_HUGEPAGE
    /* before the first touch, so that the copy's aligned 2 MiB stretches get huge pages
     * (decode streams the copy; see weights/mmap.c). A hint: refused, nothing changes. */
    madvise(p, (size_t)bytes, MADV_HUGEPAGE);
#endif
    memcpy(p, src, (size_t)bytes);
    return p;
#else
    (void)t; (void)node; (void)src; (void)bytes;
    return NULL;
#endif
}

void
numa_free_copy(const struct topo *t, void *p, uint64_t bytes)
{
#ifdef HAVE_HWLOC
    if (p != NULL && t->hw != NULL)
        hwloc_free((hwloc_topology_t)t->hw, p, (size_t)bytes);
#else
    (void)t; (void)p; (void)bytes;
#endif
}

/* ==== The model =========================================================================== */

static void
numa_add(struct numa_state *s, struct tensor *t, enum topo_role force)
{
    struct topo_region *r;

    if (t->data == NULL || t->shape[0] <= 0)
        return;
    r = &s->regions[s->n_regions];
    s->tensors[s->n_regions++] = t;
    r->name = t->name != NULL ? t->name : "?";
    r->data = t->data;
    r->bytes = model_row_bytes(t) * (uint64_t)t->shape[0];
    r->role = topo_role_of(r->name, &r->layer, &r->expert);
    if (force != TOPO_ROLE_OTHER)
        r->role = force;
    r->node = TOPO_NODE_NONE;
}

static void
numa_add_ffn(struct numa_state *s, struct ffn_w *f)
{
    numa_add(s, &f->gate, TOPO_ROLE_OTHER);
    numa_add(s, &f->up, TOPO_ROLE_OTHER);
    numa_add(s, &f->down, TOPO_ROLE_OTHER);
}

/* Every weight matrix of the model, as regions. */
static int
numa_collect(struct numa_state *s, struct kli_model *m, struct kli_err *err)
{
    const struct k_config *c = &m->cfg;
    int64_t cap = 2 + (int64_t)c->n_layers * (16 + 3 * (int64_t)c->moe.n_experts);
    struct k_carve cv = {0};

    for (int pass = 0; pass < 2; pass++) {   /* k_carve: measure, then hand out */
        s->regions = k_carve(&cv, (size_t)cap, sizeof(*s->regions));
        s->tensors = k_carve(&cv, (size_t)cap, sizeof(*s->tensors));
        if (pass == 0 && (s->region_mem = k_carve_block(&cv)) == NULL)
            return err_set(err, KLI_E_NOMEM, "out of memory for the placement plan");
    }
    numa_add(s, &m->embed, TOPO_ROLE_EMBED);
    numa_add(s, &m->lm_head, TOPO_ROLE_LM_HEAD);    /* also when tied to the embedding */
    for (int i = 0; i < c->n_layers; i++) {
        struct k_layer *ly = &m->layers[i];
        if (ly->mixer == KLI_MIXER_KDA) {
            struct tensor *kt[] = {
                &ly->kda.q_proj, &ly->kda.k_proj, &ly->kda.v_proj, &ly->kda.f_a, &ly->kda.f_b,
                &ly->kda.b_proj, &ly->kda.g_a, &ly->kda.g_b, &ly->kda.o_proj,
            };
            for (size_t k = 0; k < KLI_ARRAY_LEN(kt); k++)
                numa_add(s, kt[k], TOPO_ROLE_OTHER);
        } else {
            numa_add(s, &ly->mla.q_proj, TOPO_ROLE_OTHER);
            numa_add(s, &ly->mla.kv_a, TOPO_ROLE_OTHER);
            numa_add(s, &ly->mla.kv_b, TOPO_ROLE_OTHER);
            numa_add(s, &ly->mla.o_proj, TOPO_ROLE_OTHER);
        }
        if (ly->ffn_kind == KLI_FFN_DENSE) {
            numa_add_ffn(s, &ly->ffn);
            continue;
        }
        numa_add(s, &ly->moe.router, TOPO_ROLE_OTHER);
        for (int e = 0; ly->moe.experts != NULL && e < c->moe.n_experts; e++)
            numa_add_ffn(s, &ly->moe.experts[e]);
        if (c->moe.n_shared > 0)
            numa_add_ffn(s, &ly->moe.shared);
    }
    KLI_ASSERT(s->n_regions <= cap);
    return KLI_OK;
}

/* Replicate: a copy of every trunk matrix on every worker node; the matmul picks the copy
 * of the worker's node through tensor.node_data (ops.c). */
static int
numa_replicate(struct numa_state *s, struct kli_err *err)
{
    const struct topo_plan *p = &s->plan;
    int64_t n_trunk = 0, j = 0;

    for (int64_t i = 0; i < s->n_regions; i++)
        n_trunk += s->regions[i].node == TOPO_NODE_REPLICATE;
    size_t n_copy = (size_t)(n_trunk * p->n_worker_nodes) + 1;
    struct k_carve cv = {0};
    for (int pass = 0; pass < 2; pass++) {   /* k_carve: measure, then hand out */
        s->node_ptrs = k_carve(&cv, (size_t)n_trunk * THREADS_NODES + 1, sizeof(*s->node_ptrs));
        s->copies = k_carve(&cv, n_copy, sizeof(*s->copies));
        s->copy_bytes = k_carve(&cv, n_copy, sizeof(*s->copy_bytes));
        if (pass == 0 && (s->copy_mem = k_carve_block(&cv)) == NULL)
            return err_set(err, KLI_E_NOMEM, "out of memory for the node copies");
    }
    for (int64_t i = 0; i < s->n_regions; i++) {
        const struct topo_region *r = &s->regions[i];
        if (r->node != TOPO_NODE_REPLICATE)
            continue;
        const void **ptrs = s->node_ptrs + j++ * THREADS_NODES;
        for (int nd = 0; nd < THREADS_NODES; nd++)
            ptrs[nd] = r->data;
        for (int32_t nd = 0; nd < s->topo->n_nodes; nd++) {
            if (!(p->worker_nodes >> nd & 1))
                continue;
            void *c = numa_copy_to_node(s->topo, nd, r->data, r->bytes);
            if (c == NULL)
                return err_set(err, KLI_E_NOMEM, "numa replicate: cannot allocate a copy "
                                   "of %s (%llu bytes) on node %d", r->name,
                                   (unsigned long long)r->bytes, nd);
            s->copies[s->n_copies] = c;
            s->copy_bytes[s->n_copies++] = r->bytes;
            s->report.replica_bytes += r->bytes;
            ptrs[nd] = c;
            numa_check_pages(s->topo, p, c, r->bytes, nd, &s->report);
        }
        s->tensors[i]->node_data = ptrs;
    }
    s->report.replicas = s->n_copies;
    return KLI_OK;
}

int
numa_open(struct numa_state **out, const struct kli_model_options *opt, struct kli_err *err)
{
    struct numa_state *s;
    struct topo_options to;
    int rc;

    *out = NULL;
    if (opt->numa < KLI_NUMA_NONE || opt->numa > KLI_NUMA_PARTITION)
        return err_set(err, KLI_E_RANGE, "numa: policy %d is not one of none (0), "
                           "interleave (1), replicate (2), partition (3)", opt->numa);
    if ((s = k_calloc(1, sizeof(*s))) == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory for the placement plan");
    s->plan_only = opt->plan_only;
    if ((rc = topo_discover(&s->topo, NULL, err)) != KLI_OK)
        goto fail;
    to.n_threads = opt->n_threads;
    to.cpus = opt->cpus;
    to.numa = (enum kli_numa)opt->numa;
    if ((rc = topo_plan_workers(s->topo, &to, &s->plan, err)) != KLI_OK)
        goto fail;
    if (s->topo->synthetic) {
        /* Planned for another machine: this one keeps the plain thread count. */
        threads_set_count(opt->n_threads);
    } else {
        int32_t cpus[TOPO_MAX_CPUS], nodes[TOPO_MAX_CPUS];
        for (int32_t i = 0; i < s->plan.n_workers; i++) {
            cpus[i] = s->plan.workers[i].cpu;
            nodes[i] = s->plan.workers[i].node;
        }
        threads_set_plan(s->plan.n_workers, cpus, nodes, s->plan.pin && !s->plan_only);
    }
    *out = s;
    return KLI_OK;
fail:
    numa_close(s);
    return rc;
}

static int numa_route(struct numa_state *s, struct kli_model *m, struct kli_err *err);

int
numa_place(struct numa_state *s, struct kli_model *m, struct kli_err *err)
{
    struct topo_report *rep = &s->report;
    const char *why = NULL;
    int rc;

    if ((rc = numa_collect(s, m, err)) != KLI_OK)
        return rc;
    if (topo_plan_memory(&s->plan, s->regions, s->n_regions, NULL) != KLI_OK)
        return err_set(err, KLI_E_NOMEM, "out of memory for the placement plan");
    if (!s->plan_only && (rc = numa_route(s, m, err)) != KLI_OK)
        return rc;
    if (s->plan.numa == KLI_NUMA_NONE)
        why = "--numa none (pages stay where they are first read)";
    else if (s->plan_only)
        why = "plan only (nothing is bound by kli info)";
    else if (s->topo->synthetic)
        why = "a described machine (KLI_TOPOLOGY)";
    else if (s->topo->n_nodes < 2)
        why = "one NUMA node: all memory is local";
#if !defined(HAVE_HWLOC) || !defined(NUMA_LINUX)
    else
        why = "memory binding needs kli built with hwloc, on Linux";
#endif
    if (why != NULL) {
        snprintf(rep->why, sizeof(rep->why), "%s", why);
        return KLI_OK;
    }
    return numa_apply(s, err);
}

int
numa_apply(struct numa_state *s, struct kli_err *err)
{
    struct topo_report *rep = &s->report;
    struct kli_err e2 = {0};
    int rc;

    if (s->topo->hw == NULL || s->topo->synthetic) {
        snprintf(rep->why, sizeof(rep->why), "no hwloc topology of this machine");
        return KLI_OK;
    }
    rep->why[0] = '\0';
    if (s->plan.numa == KLI_NUMA_REPLICATE && s->node_ptrs == NULL &&
        (rc = numa_replicate(s, err)) != KLI_OK)
        return rc;
    if (numa_bind(s->topo, &s->plan, s->regions, s->n_regions, rep, &e2) != KLI_OK)
        snprintf(rep->why, sizeof(rep->why), "%s", e2.msg);
    if (rep->replicas > 0)
        rep->bound = 1;
    return KLI_OK;
}

/* Under partition on a machine whose workers span several nodes: each MoE layer learns the
 * node of each of its routed experts, so that moe.c computes it there. */
static int
numa_route(struct numa_state *s, struct kli_model *m, struct kli_err *err)
{
    const struct k_config *c = &m->cfg;
    int64_t E = c->moe.n_experts, nodes = 0;

    nodes = s->plan.n_worker_nodes;
    if (s->plan.numa != KLI_NUMA_PARTITION || s->topo->synthetic || nodes < 2 || E == 0)
        return KLI_OK;
    s->expert_node = k_calloc((size_t)(c->n_layers * E), 1);
    if (s->expert_node == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory for the placement plan");
    memset(s->expert_node, -1, (size_t)(c->n_layers * E));
    for (int64_t i = 0; i < s->n_regions; i++) {
        const struct topo_region *r = &s->regions[i];
        if (r->role == TOPO_ROLE_EXPERT && r->layer >= 0 && r->layer < c->n_layers &&
            r->expert >= 0 && r->expert < E && r->node >= 0 && r->node < TOPO_MAX_NODES)
            s->expert_node[r->layer * E + r->expert] = (int8_t)r->node;
    }
    for (int i = 0; i < c->n_layers; i++) {
        if (m->layers[i].ffn_kind != KLI_FFN_MOE)
            continue;
        int whole = 1;
        for (int64_t e = 0; e < E; e++)
            whole &= s->expert_node[i * E + e] >= 0;
        if (whole)   /* a layer with an expert of no node keeps the plain split */
            m->layers[i].moe.node = s->expert_node + i * E;
    }
    m->numa_route = 1;
    return KLI_OK;
}

void
numa_close(struct numa_state *s)
{
    if (s == NULL)
        return;
    free(s->expert_node);
    for (int64_t i = 0; i < s->n_copies; i++)
        numa_free_copy(s->topo, s->copies[i], s->copy_bytes[i]);
    free(s->copy_mem);
    free(s->region_mem);
    topo_free(s->topo);
    free(s);
}

/* ==== Public ============================================================================== */

size_t
kli_topology_describe(const struct kli_model *model, const struct kli_model_options *opt,
                      char *buf, size_t cap)
{
    struct kli_model_options dflt;
    struct kli_err err = {0};
    struct topo *t = NULL;
    struct topo_plan *p = NULL;
    struct topo_options to;
    size_t len;

    if (model != NULL && model->numa != NULL) {
        const struct numa_state *s = model->numa;
        return topo_describe(s->topo, &s->plan, s->regions, s->n_regions, &s->report, buf,
                             cap);
    }
    if (opt == NULL) {
        kli_model_options_init(&dflt);
        opt = &dflt;
    }
    if (topo_discover(&t, NULL, &err) != KLI_OK) {
        int w = snprintf(buf, cap, "topology:     %s\n", err.msg);
        return w > 0 ? (size_t)w : 0;
    }
    to.n_threads = opt->n_threads;
    to.cpus = opt->cpus;
    to.numa = (enum kli_numa)opt->numa;
    if ((p = k_malloc(sizeof(*p))) == NULL) {
        err.code = KLI_E_NOMEM;
        snprintf(err.msg, sizeof(err.msg), "out of memory");
    } else if (topo_plan_workers(t, &to, p, &err) == KLI_OK) {
        len = topo_describe(t, p, NULL, 0, NULL, buf, cap);
        len += (size_t)snprintf(len < cap ? buf + len : NULL, len < cap ? cap - len : 0,
                                "numa:         %s (the memory plan needs a model: -m)\n",
                                topo_numa_name(to.numa));
        goto out;
    }
    len = topo_describe(t, NULL, NULL, 0, NULL, buf, cap);
    len += (size_t)snprintf(len < cap ? buf + len : NULL, len < cap ? cap - len : 0,
                            "workers:      %s\n", err.msg);
out:
    free(p);
    topo_free(t);
    return len;
}
