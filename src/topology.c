/*
 * topology.c - machine discovery and the placement plan (see topology.h).
 *
 * Nothing here pins a thread or binds a page: numa.c does that from the plan. Keeping the
 * decisions free of side effects is what lets make check test a two-socket, four-node
 * machine on a laptop.
 */
#define _GNU_SOURCE
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef HAVE_HWLOC
#include <hwloc.h>
#endif

#include "internal.h"
#include "threads.h"
#include "topology.h"

/* ==== Building a topology ================================================================= */

static int
topo_alloc(struct topo *t, int64_t n_cores, int64_t n_pus, struct kli_err *err)
{
    if (n_cores < 1 || n_pus < n_cores || n_pus > TOPO_MAX_CPUS)
        return err_set(err, KLI_E_RANGE, "topology: %lld CPUs in %lld cores (kli handles "
                           "1 to %d CPUs, TOPO_MAX_CPUS)", (long long)n_pus,
                           (long long)n_cores, TOPO_MAX_CPUS);
    t->cores = k_calloc((size_t)n_cores, sizeof(*t->cores));
    t->pu_os = k_calloc((size_t)n_pus, sizeof(*t->pu_os));
    t->pu_allowed = k_calloc((size_t)n_pus, 1);
    if (t->cores == NULL || t->pu_os == NULL || t->pu_allowed == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory for the topology");
    t->n_cores = (int32_t)n_cores;
    t->n_pus = (int32_t)n_pus;
    memset(t->pu_allowed, 1, (size_t)n_pus);
    return KLI_OK;
}

void
topo_free(struct topo *t)
{
    if (t == NULL)
        return;
#ifdef HAVE_HWLOC
    if (t->hw != NULL)
        hwloc_topology_destroy((hwloc_topology_t)t->hw);
#endif
    free(t->cores);
    free(t->pu_os);
    free(t->pu_allowed);
    free(t);
}

/* The allowed CPUs of a real machine: the process's affinity as it was before kli pinned
 * anything (threads.c keeps that copy). */
static void
topo_mark_allowed(struct topo *t)
{
    uint8_t set[TOPO_MAX_CPUS];

    if (threads_allowed_cpus(set, TOPO_MAX_CPUS) <= 0)
        return;
    for (int32_t i = 0; i < t->n_pus; i++)
        t->pu_allowed[i] = set[t->pu_os[i]];
}

/* A synthetic description without hwloc: "pack:2 numa:2 core:8 pu:2". Levels are nested in
 * the order given; levels other than package, NUMA node, core and PU (l3:2, group:2)
 * multiply what follows. Packages and nodes are consecutive runs of cores. */
static int
topo_synthetic_basic(struct topo *t, const char *desc, struct kli_err *err)
{
    int64_t mult = 1, n_pack = 1, n_node = 1, n_core = -1, n_pu = -1;
    const char *p = desc;

    while (*p != '\0') {
        while (*p == ' ')
            p++;
        if (*p == '\0')
            break;
        const char *colon = strchr(p, ':');
        char *end;
        if (colon == NULL || colon == p)
            goto bad;
        long v = strtol(colon + 1, &end, 10);
        if (end == colon + 1 || v < 1 || v > TOPO_MAX_CPUS || (*end != ' ' && *end != '\0'))
            goto bad;
        size_t len = (size_t)(colon - p);
        mult *= v;
        if (mult > TOPO_MAX_CPUS)
            return err_set(err, KLI_E_RANGE, "topology: \"%s\" has more than %d CPUs",
                               desc, TOPO_MAX_CPUS);
#define IS(s) (len == strlen(s) && strncmp(p, s, len) == 0)
        if (IS("pack") || IS("package") || IS("socket"))
            n_pack = mult;
        else if (IS("numa") || IS("node") || IS("numanode"))
            n_node = mult;
        else if (IS("core"))
            n_core = mult;
        else if (IS("pu") || IS("thread"))
            n_pu = mult;
#undef IS
        p = end;
    }
    if (n_core < 0 && n_pu < 0)
        goto bad;
    if (n_core < 0)
        n_core = n_pu;
    if (n_pu < 0)
        n_pu = n_core;
    if (n_pu % n_core != 0 || n_core % n_pack != 0 || n_core % n_node != 0 ||
        n_node > TOPO_MAX_NODES)
        goto bad;
    int rc = topo_alloc(t, n_core, n_pu, err);
    if (rc != KLI_OK)
        return rc;
    int64_t smt = n_pu / n_core;
    for (int64_t c = 0; c < n_core; c++) {
        t->cores[c].package = (int32_t)(c / (n_core / n_pack));
        t->cores[c].node = (int32_t)(c / (n_core / n_node));
        t->cores[c].pu0 = (int32_t)(c * smt);
        t->cores[c].n_pu = (int32_t)smt;
    }
    for (int64_t i = 0; i < n_pu; i++)
        t->pu_os[i] = (int32_t)i;
    t->n_packages = (int32_t)n_pack;
    t->n_nodes = (int32_t)n_node;
    for (int64_t n = 0; n < n_node; n++)
        t->node_os[n] = (int32_t)n;
    return KLI_OK;
bad:
    return err_set(err, KLI_E_RANGE, "topology: cannot read the synthetic description "
                       "\"%s\" (expected levels such as \"pack:2 numa:2 core:8 pu:2\")", desc);
}

#ifdef HAVE_HWLOC
/* Any hwloc topology: this machine, a synthetic description or an XML export. */
static int
topo_from_hwloc(struct topo *t, const char *synth, const char *xml, struct kli_err *err)
{
    hwloc_topology_t hw;
    int rc;

    if (hwloc_topology_init(&hw) != 0)
        return err_set(err, KLI_E_NOMEM, "topology: hwloc_topology_init failed");
    if (synth != NULL && hwloc_topology_set_synthetic(hw, synth) != 0) {
        hwloc_topology_destroy(hw);
        return err_set(err, KLI_E_RANGE, "topology: hwloc rejects the synthetic "
                           "description \"%s\"", synth);
    }
    if (xml != NULL && hwloc_topology_set_xml(hw, xml) != 0) {
        rc = errno;
        hwloc_topology_destroy(hw);
        return err_set(err, KLI_E_RANGE, "topology: %s: cannot read as hwloc XML (%s)",
                           xml, strerror(rc));
    }
    if (hwloc_topology_load(hw) != 0) {
        hwloc_topology_destroy(hw);
        return err_set(err, KLI_E_RANGE, "topology: hwloc cannot load %s",
                           synth ? synth : xml ? xml : "this machine");
    }
    int n_pu = hwloc_get_nbobjs_by_type(hw, HWLOC_OBJ_PU);
    int n_node = hwloc_get_nbobjs_by_type(hw, HWLOC_OBJ_NUMANODE);
    int n_pack = hwloc_get_nbobjs_by_type(hw, HWLOC_OBJ_PACKAGE);
    int n_core = 0;
    hwloc_obj_t prev = NULL;

    /* PUs of one core are consecutive in logical order; a PU without a core object (some
     * virtual machines) is a core of its own. */
    for (int i = 0; i < n_pu; i++) {
        hwloc_obj_t pu = hwloc_get_obj_by_type(hw, HWLOC_OBJ_PU, (unsigned)i);
        hwloc_obj_t core = hwloc_get_ancestor_obj_by_type(hw, HWLOC_OBJ_CORE, pu);
        if (core == NULL || core != prev)
            n_core++;
        prev = core;
    }
    if (n_node > TOPO_MAX_NODES) {
        hwloc_topology_destroy(hw);
        return err_set(err, KLI_E_RANGE, "topology: %d NUMA nodes (kli handles up to %d, "
                           "TOPO_MAX_NODES)", n_node, TOPO_MAX_NODES);
    }
    if ((rc = topo_alloc(t, n_core, n_pu, err)) != KLI_OK) {
        hwloc_topology_destroy(hw);
        return rc;
    }
    t->n_packages = n_pack > 0 ? n_pack : 1;
    t->n_nodes = n_node > 0 ? n_node : 1;
    for (int n = 0; n < n_node; n++) {
        hwloc_obj_t o = hwloc_get_obj_by_type(hw, HWLOC_OBJ_NUMANODE, (unsigned)n);
        t->node_os[n] = (int32_t)o->os_index;
        t->node_mem[n] = o->attr != NULL ? o->attr->numanode.local_memory : 0;
    }
    int c = -1;
    prev = NULL;
    for (int i = 0; i < n_pu; i++) {
        hwloc_obj_t pu = hwloc_get_obj_by_type(hw, HWLOC_OBJ_PU, (unsigned)i);
        hwloc_obj_t core = hwloc_get_ancestor_obj_by_type(hw, HWLOC_OBJ_CORE, pu);
        if (pu->os_index >= TOPO_MAX_CPUS) {
            hwloc_topology_destroy(hw);
            return err_set(err, KLI_E_RANGE, "topology: CPU %u (kli handles CPU numbers "
                               "below %d, TOPO_MAX_CPUS)", pu->os_index, TOPO_MAX_CPUS);
        }
        if (core == NULL || core != prev) {
            c++;
            hwloc_obj_t pk = hwloc_get_ancestor_obj_by_type(hw, HWLOC_OBJ_PACKAGE, pu);
            t->cores[c].package = pk != NULL ? (int32_t)pk->logical_index : 0;
            t->cores[c].pu0 = i;
            t->cores[c].node = 0;
            for (int n = 0; n < n_node; n++) {
                hwloc_obj_t o = hwloc_get_obj_by_type(hw, HWLOC_OBJ_NUMANODE, (unsigned)n);
                if (o->cpuset != NULL && hwloc_bitmap_isset(o->cpuset, pu->os_index)) {
                    t->cores[c].node = n;
                    break;
                }
            }
        }
        prev = core;
        t->cores[c].n_pu++;
        t->pu_os[i] = (int32_t)pu->os_index;
    }
    t->hw = hw;
    return KLI_OK;
}
#endif

/* Reads one integer from a sysfs file; -1 when absent or unreadable. */
static long
topo_sysfs_long(const char *path)
{
    FILE *f = fopen(path, "r");
    long v = -1;

    if (f == NULL)
        return -1;
    if (fscanf(f, "%ld", &v) != 1)
        v = -1;
    fclose(f);
    return v;
}

static int
topo_sysfs_list(const char *path, uint8_t *set)
{
    char line[8192];
    FILE *f = fopen(path, "r");
    int ok = 0;

    if (f == NULL)
        return -1;
    if (fgets(line, sizeof(line), f) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        ok = line[0] == '\0' ? (memset(set, 0, TOPO_MAX_CPUS), 1)
             : topo_parse_cpus(line, set, path, NULL) == KLI_OK;
    }
    fclose(f);
    return ok ? 0 : -1;
}

struct topo_sysfs {
    uint8_t online[TOPO_MAX_CPUS], nodecpus[TOPO_MAX_CPUS];
    int32_t pkg[TOPO_MAX_CPUS], cid[TOPO_MAX_CPUS], node[TOPO_MAX_CPUS];
    int32_t core_of[TOPO_MAX_CPUS], first_cpu[TOPO_MAX_CPUS], pkg_os[TOPO_MAX_CPUS];
};

/* Linux sysfs: packages and cores from cpuN/topology, nodes from nodeN/cpulist.
 * @return KLI_OK, 1 when sysfs cannot be read, or a negative status. */
static int
topo_from_sysfs(struct topo *t, struct kli_err *err)
{
    struct topo_sysfs *S = k_calloc(1, sizeof(*S));
    int32_t n_pu = 0, n_core = 0, n_node = 0, n_pkg = 0;
    char path[128];
    int rc;

    if (S == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory for the topology");
    uint8_t *online = S->online, *nodecpus = S->nodecpus;
    int32_t *pkg = S->pkg, *cid = S->cid, *node = S->node, *core_of = S->core_of;
    int32_t *first_cpu = S->first_cpu, *pkg_os = S->pkg_os;
    if (topo_sysfs_list("/sys/devices/system/cpu/online", online) != 0) {
        free(S);
        return 1;
    }
    for (int c = 0; c < TOPO_MAX_CPUS; c++) {
        node[c] = 0;
        if (!online[c])
            continue;
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/"
                 "physical_package_id", c);
        pkg[c] = (int32_t)topo_sysfs_long(path);
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/core_id", c);
        cid[c] = (int32_t)topo_sysfs_long(path);
        n_pu++;
    }
    if (n_pu == 0) {
        free(S);
        return 1;
    }
    for (int n = 0; n < TOPO_MAX_NODES; n++) {
        snprintf(path, sizeof(path), "/sys/devices/system/node/node%d/cpulist", n);
        if (topo_sysfs_list(path, nodecpus) != 0)
            continue;
        for (int c = 0; c < TOPO_MAX_CPUS; c++) {
            if (nodecpus[c])
                node[c] = n_node;
        }
        t->node_os[n_node++] = n;
    }
    /* A core is a distinct (package, core id); CPUs with unknown ids are cores of their own. */
    for (int c = 0; c < TOPO_MAX_CPUS; c++) {
        if (!online[c])
            continue;
        int k = -1;
        for (int j = 0; j < n_core && cid[c] >= 0; j++) {
            int f = first_cpu[j];
            if (pkg[f] == pkg[c] && cid[f] == cid[c] && node[f] == node[c])
                k = j;
        }
        if (k < 0) {
            k = n_core++;
            first_cpu[k] = c;
        }
        core_of[c] = k;
    }
    if ((rc = topo_alloc(t, n_core, n_pu, err)) != KLI_OK) {
        free(S);
        return rc;
    }
    int32_t i = 0;
    for (int k = 0; k < n_core; k++) {
        int f = first_cpu[k], p = -1;
        for (int j = 0; j < n_pkg; j++) {
            if (pkg_os[j] == pkg[f])
                p = j;
        }
        if (p < 0) {
            p = n_pkg;
            pkg_os[n_pkg++] = pkg[f];
        }
        t->cores[k].package = p;
        t->cores[k].node = node[f];
        t->cores[k].pu0 = i;
        for (int c = f; c < TOPO_MAX_CPUS; c++) {
            if (online[c] && core_of[c] == k) {
                t->pu_os[i++] = c;
                t->cores[k].n_pu++;
            }
        }
    }
    t->n_packages = n_pkg > 0 ? n_pkg : 1;
    t->n_nodes = n_node > 0 ? n_node : 1;
    free(S);
    return KLI_OK;
}

static int
topo_from_sysconf(struct topo *t, struct kli_err *err)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    int rc;

    if (n < 1)
        n = 1;
    if (n > TOPO_MAX_CPUS)
        n = TOPO_MAX_CPUS;
    if ((rc = topo_alloc(t, n, n, err)) != KLI_OK)
        return rc;
    for (long i = 0; i < n; i++) {
        t->cores[i].pu0 = (int32_t)i;
        t->cores[i].n_pu = 1;
        t->pu_os[i] = (int32_t)i;
    }
    t->n_packages = 1;
    t->n_nodes = 1;
    return KLI_OK;
}

/* This machine without hwloc: sysfs, else sysconf. */
static int
topo_from_os(struct topo *t, struct kli_err *err)
{
    int rc;

    snprintf(t->source, sizeof(t->source), "sysfs");
    rc = topo_from_sysfs(t, err);
    if (rc == 1) {
        snprintf(t->source, sizeof(t->source), "sysconf");
        rc = topo_from_sysconf(t, err);
    }
    return rc;
}

int
topo_discover(struct topo **out, const char *spec, struct kli_err *err)
{
    struct topo *t;
    char desc[128];
    int rc = -1;

    *out = NULL;
    if (spec == NULL) {
        spec = getenv("KLI_TOPOLOGY");
        if (spec != NULL && *spec == '\0')
            spec = NULL;
    }
    if ((t = k_calloc(1, sizeof(*t))) == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory for the topology");
    if (spec != NULL) {
        int synth = strncmp(spec, "synthetic:", 10) == 0, xml = strncmp(spec, "xml:", 4) == 0;
        const char *arg = spec + (synth ? 10 : 4);
        size_t len = strlen(arg);
        if (!synth && !xml) {
            rc = err_set(err, KLI_E_RANGE, "KLI_TOPOLOGY: \"%s\" is neither "
                             "synthetic:DESCRIPTION nor xml:PATH", spec);
            goto fail;
        }
        if (len >= sizeof(desc)) {
            rc = err_set(err, KLI_E_RANGE, "KLI_TOPOLOGY: description too long");
            goto fail;
        }
        /* Quotes kept by a shell-less caller: synthetic:"pack:2 core:4". */
        if (len >= 2 && arg[0] == '"' && arg[len - 1] == '"') {
            arg++;
            len -= 2;
        }
        memcpy(desc, arg, len);
        desc[len] = '\0';
        t->synthetic = 1;
        snprintf(t->source, sizeof(t->source), "%s %s", synth ? "synthetic:" : "xml:", desc);
#ifdef HAVE_HWLOC
        rc = topo_from_hwloc(t, synth ? desc : NULL, xml ? desc : NULL, err);
#else
        if (xml)
            rc = err_set(err, KLI_E_UNSUPPORTED, "KLI_TOPOLOGY: xml: needs kli built "
                             "with hwloc");
        else
            rc = topo_synthetic_basic(t, desc, err);
#endif
        if (rc != KLI_OK)
            goto fail;
        *out = t;
        return KLI_OK;
    }
#ifdef HAVE_HWLOC
    snprintf(t->source, sizeof(t->source), "hwloc");
    rc = topo_from_hwloc(t, NULL, NULL, err);
    if (rc != KLI_OK)
        goto fail;
#else
    if ((rc = topo_from_os(t, err)) != KLI_OK)
        goto fail;
#endif
    topo_mark_allowed(t);
    *out = t;
    return KLI_OK;
fail:
    topo_free(t);
    return rc;
}

int
topo_discover_fallback(struct topo **out, const char *synthetic, struct kli_err *err)
{
    struct topo *t = k_calloc(1, sizeof(*t));
    int rc;

    *out = NULL;
    if (t == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory for the topology");
    if (synthetic != NULL) {
        t->synthetic = 1;
        snprintf(t->source, sizeof(t->source), "synthetic: %s", synthetic);
        rc = topo_synthetic_basic(t, synthetic, err);
    } else {
        rc = topo_from_os(t, err);
        if (rc == KLI_OK)
            topo_mark_allowed(t);
    }
    if (rc != KLI_OK) {
        topo_free(t);
        return rc;
    }
    *out = t;
    return KLI_OK;
}

/* ==== CPU lists =========================================================================== */

int
topo_parse_cpus(const char *list, uint8_t *set, const char *what, struct kli_err *err)
{
    const char *p = list;
    int any = 0;

    memset(set, 0, TOPO_MAX_CPUS);
    for (;;) {
        char *end;
        long a, b;
        if (*p < '0' || *p > '9')
            goto bad;
        a = strtol(p, &end, 10);
        b = a;
        p = end;
        if (*p == '-') {
            p++;
            if (*p < '0' || *p > '9')
                goto bad;
            b = strtol(p, &end, 10);
            p = end;
        }
        if (a > b || b >= TOPO_MAX_CPUS)
            return err_set(err, KLI_E_RANGE, "%s: \"%s\": CPU numbers go from 0 to %d, "
                               "ranges low-high", what, list, TOPO_MAX_CPUS - 1);
        for (long c = a; c <= b; c++)
            set[c] = 1;
        any = 1;
        if (*p == '\0')
            break;
        if (*p != ',')
            goto bad;
        p++;
    }
    if (any)
        return KLI_OK;
bad:
    return err_set(err, KLI_E_RANGE, "%s: \"%s\" is not a CPU list such as 0-7,16-23",
                       what, list);
}

/* Writes the sorted CPU numbers cpus[0..n) as ranges "0-3,8,10-11". */
static void
topo_fmt_list(char *buf, size_t cap, const int32_t *v, int64_t n)
{
    size_t o = 0;

    buf[0] = '\0';
    for (int64_t i = 0; i < n && o < cap; ) {
        int64_t j = i;
        while (j + 1 < n && v[j + 1] == v[j] + 1)
            j++;
        int w = j > i ? snprintf(buf + o, cap - o, "%s%d-%d", i ? "," : "", v[i], v[j])
                      : snprintf(buf + o, cap - o, "%s%d", i ? "," : "", v[i]);
        o += (size_t)w;
        i = j + 1;
    }
    if (o >= cap && cap > 4)
        memcpy(buf + cap - 4, "...", 4);
}

static int
topo_int_cmp(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;

    return (x > y) - (x < y);
}

/* ==== Worker plan ========================================================================= */

static int
topo_worker_cmp(const void *a, const void *b)
{
    const struct topo_worker *x = a, *y = b;

    if (x->node != y->node)
        return (x->node > y->node) - (x->node < y->node);
    return (x->core > y->core) - (x->core < y->core);
}

int
topo_plan_workers(const struct topo *t, const struct topo_options *o, struct topo_plan *p,
                  struct kli_err *err)
{
    uint8_t want[TOPO_MAX_CPUS], exists[TOPO_MAX_CPUS];
    int32_t chosen_cpu[TOPO_MAX_CPUS];     /* per core: its worker's CPU, or -1 */
    int rc;

    memset(p, 0, sizeof(*p));
    p->requested = o->n_threads > 0 ? o->n_threads : 0;
    p->numa = o->numa;
    if (o->cpus != NULL) {
        if ((rc = topo_parse_cpus(o->cpus, want, "cpus", err)) != KLI_OK)
            return rc;
        memset(exists, 0, sizeof(exists));
        for (int32_t i = 0; i < t->n_pus; i++)
            exists[t->pu_os[i]] = 1;
        for (int c = 0; c < TOPO_MAX_CPUS; c++) {
            if (want[c] && !exists[c])
                return err_set(err, KLI_E_RANGE, "cpus: \"%s\" names CPU %d, which this "
                                   "machine does not have (%d CPUs)", o->cpus, c, t->n_pus);
        }
    }
    /* Each core with an allowed CPU offers its first allowed hardware thread: one worker per
     * physical core, never one per SMT sibling (they share the core's load/store units, and
     * a memory-bound decode gains nothing from them). */
    for (int32_t c = 0; c < t->n_cores; c++) {
        const struct topo_core *k = &t->cores[c];
        chosen_cpu[c] = -1;
        for (int32_t i = k->pu0; i < k->pu0 + k->n_pu; i++) {
            if (!t->pu_allowed[i] || (o->cpus != NULL && !want[t->pu_os[i]]))
                continue;
            p->n_cpus_allowed++;
            if (chosen_cpu[c] < 0)
                chosen_cpu[c] = t->pu_os[i];
        }
        if (chosen_cpu[c] >= 0)
            p->n_cores_allowed++;
    }
    if (p->n_cores_allowed == 0)
        return err_set(err, KLI_E_RANGE, "cpus: \"%s\" leaves no CPU this process may use",
                           o->cpus != NULL ? o->cpus : "(all)");
    int32_t n = p->n_cores_allowed;
    if (o->n_threads > 0 && o->n_threads < n)
        n = o->n_threads;

    if (o->numa == KLI_NUMA_NONE) {
        /* Packed: the first n allowed cores, so a small pool stays on few nodes. */
        for (int32_t c = 0; c < t->n_cores && p->n_workers < n; c++) {
            if (chosen_cpu[c] >= 0)
                p->workers[p->n_workers++] = (struct topo_worker){chosen_cpu[c], c,
                                                                  t->cores[c].node};
        }
    } else {
        /* Round-robin over the nodes, so every memory controller has its workers. */
        int32_t next[TOPO_MAX_NODES] = {0};
        while (p->n_workers < n) {
            for (int32_t nd = 0; nd < t->n_nodes && p->n_workers < n; nd++) {
                int32_t c = next[nd];
                while (c < t->n_cores && (chosen_cpu[c] < 0 || t->cores[c].node != nd))
                    c++;
                next[nd] = c + 1;
                if (c < t->n_cores)
                    p->workers[p->n_workers++] = (struct topo_worker){chosen_cpu[c], c, nd};
            }
        }
    }
    qsort(p->workers, (size_t)p->n_workers, sizeof(p->workers[0]), topo_worker_cmp);
    for (int32_t i = 0; i < p->n_workers; i++) {
        int32_t nd = p->workers[i].node;
        if (p->node_workers[nd]++ == 0) {
            p->worker_nodes |= 1ull << nd;
            p->n_worker_nodes++;
        }
    }
    /* Pinning only on request (--cpus, or a NUMA policy that places memory). Pinning every
     * worker by default made decode 20x slower on the 16-core GPU server, for a reason not
     * yet found; until it is, unpinned workers are the safe default. */
    p->pin = o->cpus != NULL || o->numa != KLI_NUMA_NONE;
    return KLI_OK;
}

/* ==== Memory plan ========================================================================= */

static const char *const topo_role_names[] = {
    "other", "embedding", "lm_head", "norms", "attention", "router", "shared experts",
    "dense MLP", "routed experts",
};

const char *
topo_role_name(enum topo_role r)
{
    return (unsigned)r < KLI_ARRAY_LEN(topo_role_names) ? topo_role_names[r] : "?";
}

const char *
topo_numa_name(enum kli_numa n)
{
    static const char *const names[] = {"none", "interleave", "replicate", "partition"};

    return (unsigned)n < KLI_ARRAY_LEN(names) ? names[n] : "?";
}

int
topo_role_is_trunk(enum topo_role r)
{
    return r == TOPO_ROLE_LM_HEAD || r == TOPO_ROLE_NORM || r == TOPO_ROLE_ATTN ||
           r == TOPO_ROLE_ROUTER || r == TOPO_ROLE_SHARED || r == TOPO_ROLE_DENSE;
}

/* Names are the Hugging Face checkpoint's (model.c binds the same ones). */
enum topo_role
topo_role_of(const char *name, int32_t *layer, int32_t *expert)
{
    int32_t ly = -1, ex = -1;
    enum topo_role r = TOPO_ROLE_OTHER;
    int off = 0;

    if (strncmp(name, "model.embed_tokens.", 19) == 0)
        r = TOPO_ROLE_EMBED;
    else if (strncmp(name, "lm_head.", 8) == 0)
        r = TOPO_ROLE_LM_HEAD;
    else if (strcmp(name, "model.norm.weight") == 0)
        r = TOPO_ROLE_NORM;
    else if (sscanf(name, "model.layers.%d.%n", &ly, &off) == 1 && off > 0) {
        const char *rest = name + off;
        if (strncmp(rest, "input_layernorm.", 16) == 0 ||
            strncmp(rest, "post_attention_layernorm.", 25) == 0)
            r = TOPO_ROLE_NORM;
        else if (strncmp(rest, "self_attn.", 10) == 0)
            r = TOPO_ROLE_ATTN;
        else if (strncmp(rest, "mlp.", 4) == 0)
            r = TOPO_ROLE_DENSE;
        else if (strncmp(rest, "block_sparse_moe.gate.", 22) == 0)
            r = TOPO_ROLE_ROUTER;
        else if (strncmp(rest, "block_sparse_moe.shared_experts.", 32) == 0)
            r = TOPO_ROLE_SHARED;
        else if (sscanf(rest, "block_sparse_moe.experts.%d.", &ex) == 1 && ex >= 0)
            r = TOPO_ROLE_EXPERT;
        else
            ly = ly < 0 ? -1 : ly;
    } else {
        ly = -1;
    }
    if (r != TOPO_ROLE_EXPERT)
        ex = -1;
    if (layer != NULL)
        *layer = ly;
    if (expert != NULL)
        *expert = ex;
    return r;
}

struct topo_unit {              /* one routed expert: its matrices together */
    int32_t layer, expert;
    uint64_t bytes;
    int64_t first, n;           /* its regions: keys[first .. first+n) */
};

struct topo_key {               /* a routed-expert region, sortable by (layer, expert) */
    int32_t layer, expert;
    int64_t idx;
};

static int
topo_key_cmp(const void *a, const void *b)
{
    const struct topo_key *x = a, *y = b;

    if (x->layer != y->layer)
        return (x->layer > y->layer) - (x->layer < y->layer);
    if (x->expert != y->expert)
        return (x->expert > y->expert) - (x->expert < y->expert);
    return (x->idx > y->idx) - (x->idx < y->idx);
}

static int
topo_unit_cmp(const void *a, const void *b)
{
    const struct topo_unit *x = a, *y = b;

    if (x->bytes != y->bytes)
        return x->bytes < y->bytes ? 1 : -1;    /* largest first */
    return (x->expert > y->expert) - (x->expert < y->expert);
}

/* Partition: routed experts over the worker nodes, greedy by bytes (see topology.h). */
static int
topo_partition(const struct topo_plan *p, struct topo_region *r, int64_t n)
{
    int64_t n_ex = 0, n_units = 0;
    struct topo_key *keys;
    struct topo_unit *u;
    uint64_t held[TOPO_MAX_NODES] = {0};

    for (int64_t i = 0; i < n; i++)
        n_ex += r[i].role == TOPO_ROLE_EXPERT;
    if (n_ex == 0)
        return KLI_OK;
    keys = k_mallocarray((size_t)n_ex, sizeof(*keys));
    u = k_mallocarray((size_t)n_ex, sizeof(*u));
    if (keys == NULL || u == NULL) {
        free(keys);
        free(u);
        return KLI_E_NOMEM;
    }
    n_ex = 0;
    for (int64_t i = 0; i < n; i++) {
        if (r[i].role == TOPO_ROLE_EXPERT)
            keys[n_ex++] = (struct topo_key){r[i].layer, r[i].expert, i};
    }
    qsort(keys, (size_t)n_ex, sizeof(*keys), topo_key_cmp);
    for (int64_t i = 0; i < n_ex; i++) {
        if (n_units == 0 || u[n_units - 1].layer != keys[i].layer ||
            u[n_units - 1].expert != keys[i].expert)
            u[n_units++] = (struct topo_unit){keys[i].layer, keys[i].expert, 0, i, 0};
        u[n_units - 1].bytes += r[keys[i].idx].bytes;
        u[n_units - 1].n++;
    }
    for (int64_t l0 = 0; l0 < n_units; ) {
        int64_t l1 = l0;
        int32_t in_layer[TOPO_MAX_NODES] = {0};
        while (l1 < n_units && u[l1].layer == u[l0].layer)
            l1++;
        qsort(u + l0, (size_t)(l1 - l0), sizeof(*u), topo_unit_cmp);
        for (int64_t k = l0; k < l1; k++) {
            int32_t best = -1;
            for (int32_t nd = 0; nd < TOPO_MAX_NODES; nd++) {
                if (!(p->worker_nodes >> nd & 1))
                    continue;
                if (best < 0 || held[nd] < held[best] ||
                    (held[nd] == held[best] && in_layer[nd] < in_layer[best]))
                    best = nd;
            }
            held[best] += u[k].bytes;
            in_layer[best]++;
            for (int64_t j = u[k].first; j < u[k].first + u[k].n; j++)
                r[keys[j].idx].node = best;
        }
        l0 = l1;
    }
    free(keys);
    free(u);
    return KLI_OK;
}

int
topo_plan_memory(const struct topo_plan *p, struct topo_region *r, int64_t n,
                 uint64_t *node_bytes)
{
    for (int64_t i = 0; i < n; i++) {
        switch (p->numa) {
        case KLI_NUMA_INTERLEAVE:
            r[i].node = TOPO_NODE_INTERLEAVE;
            break;
        case KLI_NUMA_REPLICATE:
            r[i].node = topo_role_is_trunk(r[i].role) ? TOPO_NODE_REPLICATE
                                                      : TOPO_NODE_INTERLEAVE;
            break;
        case KLI_NUMA_PARTITION:
            r[i].node = TOPO_NODE_INTERLEAVE;    /* experts get their node below */
            break;
        default:
            r[i].node = TOPO_NODE_NONE;
            break;
        }
    }
    if (p->numa == KLI_NUMA_PARTITION && topo_partition(p, r, n) != KLI_OK)
        return KLI_E_NOMEM;
    if (node_bytes == NULL)
        return KLI_OK;
    memset(node_bytes, 0, TOPO_MAX_NODES * sizeof(*node_bytes));
    for (int64_t i = 0; i < n; i++) {
        int32_t nd = r[i].node;
        if (nd >= 0) {
            node_bytes[nd] += r[i].bytes;
            continue;
        }
        if (nd == TOPO_NODE_NONE)
            continue;
        uint64_t share = nd == TOPO_NODE_REPLICATE ? r[i].bytes
                         : r[i].bytes / (uint64_t)p->n_worker_nodes;
        for (int32_t k = 0; k < TOPO_MAX_NODES; k++) {
            if (p->worker_nodes >> k & 1)
                node_bytes[k] += share;
        }
    }
    return KLI_OK;
}

/* ==== Describing ========================================================================== */

static const char *
topo_size(char *buf, size_t cap, uint64_t b)
{
    if (b >= (1ull << 30))
        snprintf(buf, cap, "%.1f GiB", (double)b / (double)(1ull << 30));
    else if (b >= (1ull << 20))
        snprintf(buf, cap, "%.1f MiB", (double)b / (double)(1ull << 20));
    else
        snprintf(buf, cap, "%.1f KiB", (double)b / 1024.0);
    return buf;
}

static void
topo_describe_machine(struct text_buf *sb, const struct topo *t)
{
    int32_t list[TOPO_MAX_CPUS];
    char cpus[256], sz[32];
    int32_t max_smt = 0;

    for (int32_t c = 0; c < t->n_cores; c++)
        max_smt = t->cores[c].n_pu > max_smt ? t->cores[c].n_pu : max_smt;
    text_printf(sb, "topology:     %s%s\n", t->source,
                t->synthetic ? " (a description: nothing is pinned or bound)" : "");
    text_printf(sb, "machine:      %d package%s, %d NUMA node%s, %d cores, %d CPUs "
                "(up to %d per core)\n", t->n_packages, t->n_packages == 1 ? "" : "s",
                t->n_nodes, t->n_nodes == 1 ? "" : "s", t->n_cores, t->n_pus, max_smt);
    for (int32_t nd = 0; nd < t->n_nodes; nd++) {
        int32_t n = 0, cores = 0, pkg = -1;
        for (int32_t c = 0; c < t->n_cores; c++) {
            if (t->cores[c].node != nd)
                continue;
            cores++;
            pkg = pkg < 0 ? t->cores[c].package : pkg;
            for (int32_t i = 0; i < t->cores[c].n_pu; i++)
                list[n++] = t->pu_os[t->cores[c].pu0 + i];
        }
        qsort(list, (size_t)n, sizeof(*list), topo_int_cmp);
        topo_fmt_list(cpus, sizeof(cpus), list, n);
        text_printf(sb, "  node %d:     os %d, package %d, %d cores, CPUs %s", nd,
                    t->node_os[nd], pkg, cores, n ? cpus : "none");
        if (t->node_mem[nd] > 0)
            text_printf(sb, ", %s", topo_size(sz, sizeof(sz), t->node_mem[nd]));
        text_printf(sb, "\n");
    }
}

static void
topo_describe_workers(struct text_buf *sb, const struct topo *t, const struct topo_plan *p)
{
    int32_t list[TOPO_MAX_CPUS];
    char cpus[256];

    text_printf(sb, "allowed:      %d CPUs on %d cores\n", p->n_cpus_allowed,
                p->n_cores_allowed);
    text_printf(sb, "workers:      %d, one per physical core", p->n_workers);
    if (p->requested > p->n_cores_allowed)
        text_printf(sb, " (-t %d capped: never more workers than cores)", p->requested);
    if (p->pin)
        text_printf(sb, ", pinned%s\n", t->synthetic ? " (on a real machine)" : "");
    else
        text_printf(sb, ", not pinned (%d of %d cores: give --cpus to pin)\n",
                    p->n_workers, p->n_cores_allowed);
    for (int32_t nd = 0; nd < t->n_nodes; nd++) {
        int32_t n = 0;
        if (p->node_workers[nd] == 0)
            continue;
        for (int32_t i = 0; i < p->n_workers; i++) {
            if (p->workers[i].node == nd)
                list[n++] = p->workers[i].cpu;
        }
        topo_fmt_list(cpus, sizeof(cpus), list, n);
        text_printf(sb, "  node %d:     %d worker%s on CPUs %s\n", nd, n, n == 1 ? "" : "s",
                    cpus);
    }
}

static void
topo_describe_memory(struct text_buf *sb, const struct topo *t, const struct topo_plan *p,
                     const struct topo_region *r, int64_t n)
{
    uint64_t role_bytes[TOPO_ROLE_EXPERT + 1] = {0}, per_node[TOPO_MAX_NODES] = {0};
    uint64_t ex_bytes[TOPO_MAX_NODES] = {0};
    int64_t role_n[TOPO_ROLE_EXPERT + 1] = {0}, ex_n[TOPO_MAX_NODES] = {0};
    int32_t role_node[TOPO_ROLE_EXPERT + 1];
    char sz[32];

    for (int i = 0; i <= TOPO_ROLE_EXPERT; i++)
        role_node[i] = TOPO_NODE_NONE;
    for (int64_t i = 0; i < n; i++) {
        int32_t nd = r[i].node;
        role_bytes[r[i].role] += r[i].bytes;
        role_node[r[i].role] = nd >= 0 ? 0 : nd;
        role_n[r[i].role]++;
        if (nd >= 0) {
            per_node[nd] += r[i].bytes;
            ex_bytes[nd] += r[i].bytes;
            ex_n[nd]++;
            continue;
        }
        for (int32_t k = 0; nd != TOPO_NODE_NONE && k < TOPO_MAX_NODES; k++) {
            if (p->worker_nodes >> k & 1)
                per_node[k] += nd == TOPO_NODE_REPLICATE ? r[i].bytes
                               : r[i].bytes / (uint64_t)p->n_worker_nodes;
        }
    }
    text_printf(sb, "numa:         %s\n", topo_numa_name(p->numa));
    for (int i = 0; i <= TOPO_ROLE_EXPERT; i++) {
        const char *what;
        if (role_n[i] == 0)
            continue;
        switch (role_node[i]) {
        case TOPO_NODE_NONE: what = "not bound (placed where first read)"; break;
        case TOPO_NODE_INTERLEAVE: what = "interleaved over the worker nodes"; break;
        case TOPO_NODE_REPLICATE: what = "copied to every worker node (trunk)"; break;
        default: what = "each bound to one node and computed there (partition)"; break;
        }
        text_printf(sb, "  %-15s %6lld matrices %10s: %s\n",
                    topo_role_name((enum topo_role)i), (long long)role_n[i],
                    topo_size(sz, sizeof(sz), role_bytes[i]), what);
    }
    if (p->numa == KLI_NUMA_NONE)
        return;
    for (int32_t nd = 0; nd < t->n_nodes && nd < TOPO_MAX_NODES; nd++) {
        if (!(p->worker_nodes >> nd & 1))
            continue;
        text_printf(sb, "  node %d holds %s", nd, topo_size(sz, sizeof(sz), per_node[nd]));
        if (p->numa == KLI_NUMA_PARTITION)
            text_printf(sb, ", of which routed experts %s (%lld matrices)",
                        topo_size(sz, sizeof(sz), ex_bytes[nd]), (long long)ex_n[nd]);
        text_printf(sb, "\n");
    }
}

static void
topo_describe_report(struct text_buf *sb, const struct topo *t, const struct topo_report *rep)
{
    char sz[32];

    if (!rep->bound) {
        text_printf(sb, "placement:    nothing bound: %s\n", rep->why);
        return;
    }
    text_printf(sb, "placement:    %lld ranges bound (%lld refused by the kernel)",
                (long long)rep->ranges, (long long)rep->ranges_failed);
    if (rep->replicas > 0)
        text_printf(sb, ", %lld node-local copies (%s)", (long long)rep->replicas,
                    topo_size(sz, sizeof(sz), rep->replica_bytes));
    text_printf(sb, "\n");
    if (!rep->verified) {
        text_printf(sb, "verified:     no: %s\n", rep->why[0] ? rep->why : "not run");
        return;
    }
    double pc = rep->pages_checked ? 100.0 / (double)rep->pages_checked : 0.0;
    text_printf(sb, "verified:     policy as planned on %lld of %lld ranges "
                "(get_mempolicy); %llu pages checked (move_pages): %.1f%% on the planned "
                "node, %.1f%% not yet resident\n", (long long)rep->policy_ok,
                (long long)rep->policy_checked, (unsigned long long)rep->pages_checked,
                (double)rep->pages_on_target * pc, (double)rep->pages_absent * pc);
    text_printf(sb, "  pages by node:");
    for (int32_t nd = 0; nd < t->n_nodes; nd++)
        text_printf(sb, " %d: %.1f%%", nd, (double)rep->pages_on_node[nd] * pc);
    text_printf(sb, "\n");
}

size_t
topo_describe(const struct topo *t, const struct topo_plan *p, const struct topo_region *r,
              int64_t n, const struct topo_report *rep, char *buf, size_t cap)
{
    struct text_buf sb = {buf, cap, 0};

    if (cap > 0)
        buf[0] = '\0';
    topo_describe_machine(&sb, t);
    if (p != NULL)
        topo_describe_workers(&sb, t, p);
    if (p != NULL && r != NULL)
        topo_describe_memory(&sb, t, p, r, n);
    if (rep != NULL)
        topo_describe_report(&sb, t, rep);
    return sb.len;
}
