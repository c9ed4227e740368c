/*
 * threads.c - threads_parallel_for over a pool of kli's own threads.
 *
 * Work is split statically (ith/nth), so the same thread handles the same rows every call
 * and results do not depend on scheduling.
 *
 * The pool: worker i (1 <= i < team) is one thread for the life of the process, started at
 * the first region that needs it; the caller is worker 0 of every region it starts. A
 * region publishes its job by bumping a generation word, and each worker with a share runs
 * it and counts down `pending`; the caller runs its own share, then waits for zero. Both
 * sides wait the same way: they spin on the word for a short, bounded time (KLI_SPIN_US,
 * 200 us by default: long enough to bridge the serial gaps of a decode step on an idle
 * machine), then sleep on it (a futex on Linux). Why not OpenMP: libgomp's workers spin for
 * milliseconds by default, and its spin policy (OMP_WAIT_POLICY, GOMP_SPINCOUNT) is read
 * from the environment when the library loads, too early for kli to set. On a host where
 * another process keeps a core busy, a spinning worker never sleeps, so it shares that core
 * with the other process a scheduler slice at a time, and every region waits for its slice:
 * decode ran 42x slower with two threads than with one. A worker that sleeps wakes with the
 * scheduler's preference for sleepers, and a caller that sleeps frees its core, onto which
 * the scheduler moves the waiting worker.
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
#include <limits.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#endif
#ifdef HAVE_OPENBLAS
#include <cblas.h>
#endif

#include "simd.h"
#include "threads.h"
#include "util.h"

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
static _Thread_local int threads_tls_busy;   /* inside a region: a nested call runs serially */

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
    if (n > THREADS_MAX)
        n = THREADS_MAX;
    threads_n = n;
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

/* ==== The pool ============================================================================ */

/* The generation word: a sequence number above the region's worker count, so that a worker
 * learns from one atomic load both that a region began and whether it has a share in it
 * (a worker without one never reads the job, which the next region may be rewriting). */
enum { POOL_NTH_BITS = 13, POOL_NTH_MASK = (1 << POOL_NTH_BITS) - 1 };
_Static_assert((int)THREADS_MAX <= (int)POOL_NTH_MASK, "the worker count fits the generation word");

enum { POOL_SPIN_US = 200, POOL_SPIN_MAX_US = 100000 };

static struct {
    pthread_mutex_t lock;       /* held by the thread whose region the pool runs */
    atomic_uint word;           /* the generation word (a futex) */
    atomic_uint pending;        /* workers still running their share (a futex) */
    atomic_int sleepers;        /* workers asleep on `word` */
    atomic_int caller_asleep;   /* the caller asleep on `pending` */
    range_fn fn;            /* the job: written by the caller before it bumps `word`, */
    void *ctx;                  /* read by the workers with a share */
    int64_t n;
    int n_workers;              /* threads started: slots 1..n_workers */
    long spin_ns;
    unsigned start_word[THREADS_MAX];   /* `word` when worker i was started */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

#ifndef __linux__
static pthread_mutex_t pool_sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_sleep_cond = PTHREAD_COND_INITIALIZER;
#endif

/* Sleeps while *word == val (it may return early: callers loop). */
static void
pool_sleep(atomic_uint *word, unsigned val)
{
#ifdef __linux__
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
#else
    pthread_mutex_lock(&pool_sleep_lock);
    if (atomic_load(word) == val)
        pthread_cond_wait(&pool_sleep_cond, &pool_sleep_lock);
    pthread_mutex_unlock(&pool_sleep_lock);
#endif
}

/* Wakes every thread asleep on `word`; the caller changed *word before. */
static void
pool_wake(atomic_uint *word)
{
#ifdef __linux__
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)word;
    pthread_mutex_lock(&pool_sleep_lock);
    pthread_cond_broadcast(&pool_sleep_cond);
    pthread_mutex_unlock(&pool_sleep_lock);
#endif
}

static inline void
pool_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Waits until *word differs from `old` (until it is zero when `zero`): spins for at most
 * pool.spin_ns, then sleeps, counted in *asleep so that the writer knows to wake it. The
 * sequentially consistent pair (our increment of *asleep then load of *word; the writer's
 * store to *word then load of *asleep) lets no wake-up be lost.
 * @return the value that ended the wait. */
static unsigned
pool_await(atomic_uint *word, unsigned old, int zero, atomic_int *asleep)
{
    unsigned w = atomic_load_explicit(word, memory_order_acquire);

    if (zero ? w == 0 : w != old)
        return w;
    if (pool.spin_ns > 0) {
        int64_t t0 = util_now_ns();
        do {
            for (int k = 0; k < 64; k++) {
                pool_relax();
                w = atomic_load_explicit(word, memory_order_acquire);
                if (zero ? w == 0 : w != old)
                    return w;
            }
        } while (util_now_ns() - t0 < pool.spin_ns);
    }
    atomic_fetch_add(asleep, 1);
    for (;;) {
        w = atomic_load(word);
        if (zero ? w == 0 : w != old)
            break;
        pool_sleep(word, w);
    }
    atomic_fetch_sub(asleep, 1);
    return w;
}

/* Runs share ith of nth of [0, n) on the calling thread, denormals flushed. */
static void
pool_share(range_fn fn, void *ctx, int64_t n, int ith, int nth)
{
    int64_t i0 = n * ith / nth, i1 = n * (ith + 1) / nth;

    if (threads_tls_gen != threads_gen || threads_tls_slot != ith)
        threads_place(ith);
    unsigned long fpm = fp_flush_begin();
    if (i1 > i0)
        fn(ctx, i0, i1, ith);
    fp_flush_end(fpm);
}

static void *
pool_main(void *arg)
{
    int ith = (int)(intptr_t)arg;
    unsigned seen = pool.start_word[ith];

    threads_tls_busy = 1;       /* a parallel_for from inside a share runs serially */
    for (;;) {
        seen = pool_await(&pool.word, seen, 0, &pool.sleepers);
        int nth = (int)(seen & POOL_NTH_MASK);
        if (ith >= nth)
            continue;           /* no share in this region */
        pool_share(pool.fn, pool.ctx, pool.n, ith, nth);
        if (atomic_fetch_sub(&pool.pending, 1) == 1 && atomic_load(&pool.caller_asleep))
            pool_wake(&pool.pending);
    }
    return NULL;
}

/* A child of fork() has only the thread that forked: it starts its own workers. */
static void
pool_atfork_child(void)
{
    pthread_mutex_init(&pool.lock, NULL);
    pool.n_workers = 0;
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.caller_asleep, 0);
    atomic_store(&pool.pending, 0);
}

static void
pool_init(void)
{
    const char *s = getenv("KLI_SPIN_US");
    char *end;
    long us = POOL_SPIN_US;

    if (s != NULL && *s != '\0') {
        long v = strtol(s, &end, 10);
        if (*end == '\0' && v >= 0 && v <= POOL_SPIN_MAX_US)
            us = v;
    }
    pool.spin_ns = us * 1000;
    pthread_atfork(NULL, NULL, pool_atfork_child);
}

/* Starts workers until the pool has `want`; the lock is held. Workers block every signal:
 * handlers run on the application's own threads.
 * @return the workers there are (fewer than `want` when the system refuses threads). */
static int
pool_grow(int want)
{
    pthread_attr_t attr;
    sigset_t all, old;

    if (pool.n_workers >= want)
        return pool.n_workers;
    if (pthread_attr_init(&attr) != 0)
        return pool.n_workers;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (pool.n_workers < want) {
        pthread_t t;
        int slot = pool.n_workers + 1;
        pool.start_word[slot] = atomic_load_explicit(&pool.word, memory_order_relaxed);
        if (pthread_create(&t, &attr, pool_main, (void *)(intptr_t)slot) != 0)
            break;
        pool.n_workers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return pool.n_workers;
}

void
threads_parallel_for(int64_t n, int64_t grain, range_fn fn, void *ctx)
{
    int team = threads_count(), nth = team;

    if (n <= 0)
        return;
    if (grain < 1)
        grain = 1;
    if ((int64_t)nth > n / grain)
        nth = (int)(n / grain);
    /* One region at a time: a call from inside a region, or from another thread while the
     * pool runs a region, runs serially on its caller (results are the same: the split is
     * what the call's own worker count makes it). */
    if (nth > 1 && !threads_tls_busy && pthread_mutex_trylock(&pool.lock) == 0) {
        pthread_once(&pool_once, pool_init);
        int have = pool_grow(team - 1) + 1;
        if (nth > have)
            nth = have;
        if (nth > 1) {
            pool.fn = fn;
            pool.ctx = ctx;
            pool.n = n;
            atomic_store_explicit(&pool.pending, (unsigned)(nth - 1), memory_order_relaxed);
            unsigned w = atomic_load_explicit(&pool.word, memory_order_relaxed);
            w = ((w & ~(unsigned)POOL_NTH_MASK) + (1u << POOL_NTH_BITS)) | (unsigned)nth;
            atomic_store(&pool.word, w);
            if (atomic_load(&pool.sleepers) > 0)
                pool_wake(&pool.word);
            threads_tls_busy = 1;
            pool_share(fn, ctx, n, 0, nth);
            threads_tls_busy = 0;
            pool_await(&pool.pending, 0, 1, &pool.caller_asleep);
            pthread_mutex_unlock(&pool.lock);
            return;
        }
        pthread_mutex_unlock(&pool.lock);
    }
    if (!threads_tls_busy && (threads_tls_gen != threads_gen || threads_tls_slot != 0))
        threads_place(0);
    unsigned long fpm = fp_flush_begin();
    fn(ctx, 0, n, 0);
    fp_flush_end(fpm);
}
