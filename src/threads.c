/*
 * threads.c - threads_parallel_for over OpenMP (or serially when built without it).
 *
 * Work is split statically (ith/nth), so the same thread handles the same rows every call
 * and results do not depend on scheduling.
 *
 * Placement (numa.c hands over the plan of topology.c): worker ith runs on plan CPU ith.
 * Each worker pins itself the first time it runs a share after the plan changed, so the
 * cost is one comparison per call; a thread that a plan without pinning meets again gets
 * the process's original affinity back.
 */
#define _GNU_SOURCE
#include "config.h"

#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef HAVE_OPENBLAS
#include <cblas.h>
#endif

#include "simd.h"
#include "threads.h"

static int threads_n;

/* ==== Placement =========================================================================== */

enum { THREADS_MAX = 4096 };

#ifdef __linux__
typedef cpu_set_t threads_mask[THREADS_MAX / CPU_SETSIZE];   /* room for THREADS_MAX CPUs */
static threads_mask threads_orig;      /* the affinity before kli pinned anything */
static int threads_orig_ok;
#endif
static pthread_once_t threads_orig_once = PTHREAD_ONCE_INIT;
static int threads_plan_n, threads_plan_pin;
static int32_t threads_plan_cpu[THREADS_MAX], threads_plan_node[THREADS_MAX];
static unsigned threads_gen;           /* bumped by every threads_set_plan */
static _Thread_local unsigned threads_tls_gen;
static _Thread_local int threads_tls_slot = -1, threads_tls_node, threads_tls_pinned;

static void
threads_save_affinity(void)
{
#ifdef __linux__
    threads_orig_ok = sched_getaffinity(0, sizeof(threads_orig), threads_orig) == 0;
#endif
}

int
threads_allowed_cpus(uint8_t *set, int n)
{
    int count = 0;

    pthread_once(&threads_orig_once, threads_save_affinity);
#ifdef __linux__
    if (!threads_orig_ok)
        return 0;
    for (int i = 0; i < n; i++) {
        set[i] = i < THREADS_MAX && CPU_ISSET_S((size_t)i, sizeof(threads_orig), threads_orig);
        count += set[i];
    }
#else
    (void)set;
    (void)n;
#endif
    return count;
}

/* Puts the calling thread where plan slot `slot` says. No allocation: this runs inside
 * the first parallel region after a plan change, which may be a decode step. */
static void
threads_place(int slot)
{
    threads_tls_gen = threads_gen;
    threads_tls_slot = slot;
    threads_tls_node = slot < threads_plan_n ? threads_plan_node[slot] : 0;
#ifdef __linux__
    if (threads_plan_pin && slot < threads_plan_n) {
        threads_mask m;
        CPU_ZERO_S(sizeof(m), m);
        CPU_SET_S((size_t)threads_plan_cpu[slot], sizeof(m), m);
        threads_tls_pinned = pthread_setaffinity_np(pthread_self(), sizeof(m), m) == 0;
    } else if (threads_tls_pinned && threads_orig_ok) {
        pthread_setaffinity_np(pthread_self(), sizeof(threads_orig), threads_orig);
        threads_tls_pinned = 0;
    }
#endif
}

void
threads_set_plan(int n, const int32_t *cpus, const int32_t *nodes, int pin)
{
    pthread_once(&threads_orig_once, threads_save_affinity);
    if (n > THREADS_MAX)
        n = THREADS_MAX;
    for (int i = 0; i < n; i++) {
        threads_plan_cpu[i] = cpus[i];
        threads_plan_node[i] = nodes[i] >= 0 && nodes[i] < THREADS_NODES ? nodes[i] : 0;
    }
    threads_plan_n = n;
    threads_plan_pin = pin;
    threads_gen++;
    threads_set_count(n);
    threads_place(0);      /* the caller is worker 0 of every region it starts */
}

int
threads_node(void)
{
    return threads_tls_node;
}

int
threads_slot_node(int slot)
{
    return slot >= 0 && slot < threads_plan_n ? threads_plan_node[slot] : 0;
}

int
threads_physical_cores(void)
{
    /* Count distinct (physical id, core id) pairs; fall back to the logical CPU count. */
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[256];
    int phys = -1, n = 0;
    int seen[1024][2];

    if (f != NULL) {
        while (fgets(line, sizeof(line), f) != NULL) {
            int v;
            if (sscanf(line, "physical id : %d", &v) == 1)
                phys = v;
            else if (sscanf(line, "core id : %d", &v) == 1) {
                int dup = 0;
                for (int i = 0; i < n; i++)
                    dup |= seen[i][0] == phys && seen[i][1] == v;
                if (!dup && n < 1024) {
                    seen[n][0] = phys;
                    seen[n][1] = v;
                    n++;
                }
            }
        }
        fclose(f);
    }
    if (n > 0)
        return n;
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    return c > 0 ? (int)c : 1;
}

void
threads_set_count(int n)
{
    if (n <= 0)
        n = threads_physical_cores();
    threads_n = n;
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
#ifdef HAVE_OPENBLAS
    /* BLAS is called from inside our workers, one tile each: it must not start threads. */
    openblas_set_num_threads(1);
#endif
}

int
threads_count(void)
{
    if (threads_n == 0)
        threads_set_count(0);
    return threads_n;
}

void
threads_parallel_for(int64_t n, int64_t grain, kli_range_fn fn, void *ctx)
{
    int team = threads_count(), nth = team;

    if (n <= 0)
        return;
    if (grain < 1)
        grain = 1;
    if ((int64_t)nth > n / grain)
        nth = (int)(n / grain);
#ifdef _OPENMP
    if (nth > 1 && !omp_in_parallel()) {
        /* Always the whole team, the workers past nth idle: libgomp ends the threads that a
         * smaller team leaves out and starts new ones (unpinned, caches cold) for the next
         * larger one. Decode alternates 8- and 16-worker regions on 16 cores, and that
         * churn made the KDA layers 2.5x slower with 16 threads than with 8. */
#pragma omp parallel num_threads(team)
        {
            int ith = omp_get_thread_num();
            int tn = omp_get_num_threads() < nth ? omp_get_num_threads() : nth;
            if (threads_tls_gen != threads_gen || threads_tls_slot != ith)
                threads_place(ith);
            if (ith < tn) {
                int64_t i0 = n * ith / tn, i1 = n * (ith + 1) / tn;
                unsigned long fpm = kli_fp_flush_begin();
                if (i1 > i0)
                    fn(ctx, i0, i1, ith);
                kli_fp_flush_end(fpm);
            }
        }
        return;
    }
    if (!omp_in_parallel() && (threads_tls_gen != threads_gen || threads_tls_slot != 0))
        threads_place(0);
#else
    if (threads_tls_gen != threads_gen || threads_tls_slot != 0)
        threads_place(0);
#endif
    unsigned long fpm = kli_fp_flush_begin();
    fn(ctx, 0, n, 0);
    kli_fp_flush_end(fpm);
}
