/*
 * bench.c - the memory-bandwidth probes `kli bench` measures decode against.
 *
 * A STREAM triad and a read-only pass, run by the same worker threads, with the same static
 * split, as the forward pass: their GB/s are what those threads can pull from memory right
 * now, which on a shared machine moves by tens of percent from minute to minute; so `kli
 * bench` measures them in the same run as the model. Decode only reads its weights, so the
 * read pass is its ceiling (doc/measuring.md section 3); the triad, which also writes, is
 * kept for comparison with STREAM figures.
 */
#include "config.h"

#include <stdlib.h>
#include <sys/mman.h>
#include <string.h>

#include "internal.h"
#include "threads.h"
#include "util.h"

struct triad_job {
    float *a;
    const float *b, *c;
    float s;
};

static void
triad_init(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct triad_job *j = ctx;

    (void)ith;
    for (int64_t i = i0; i < i1; i++) {
        j->a[i] = 0.0f;
        ((float *)j->b)[i] = 1.0f;
        ((float *)j->c)[i] = 2.0f;
    }
}

static void
triad_run(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct triad_job *j = ctx;
    float *restrict a = j->a;
    const float *restrict b = j->b, *restrict c = j->c;
    float s = j->s;

    (void)ith;
    for (int64_t i = i0; i < i1; i++)
        a[i] = b[i] + s * c[i];
}

/* Both probes' measurement: the workers first touch the n elements (init), so that the
 * pages sit where those threads run, then time five passes of run; @return the best GB/s
 * of moving `bytes` a pass. */
static double
probe_best(int64_t n, range_fn init, range_fn run, void *job, double bytes)
{
    double best = -1.0;

    threads_parallel_for(n, 1 << 16, init, job);
    for (int rep = 0; rep < 5; rep++) {
        double t0 = util_now_s();
        threads_parallel_for(n, 1 << 16, run, job);
        double gbs = bytes / (util_now_s() - t0) / 1e9;
        best = gbs > best ? gbs : best;
    }
    return best;
}

double
kli_bench_triad(size_t bytes_per_array)
{
    int64_t n = (int64_t)(bytes_per_array / sizeof(float)) & ~(int64_t)1023;
    /* One anonymous mapping, unmapped at the end: its pages go straight back to the system
     * (a heap might keep them, and the caller reads the peak resident size around this) */
    size_t len = 3 * (size_t)n * sizeof(float);
    void *map = n > 0 ? mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                             -1, 0) : MAP_FAILED;
    float *a = map != MAP_FAILED ? map : NULL, *b = a != NULL ? a + n : NULL;
    float *c = a != NULL ? a + 2 * n : NULL;
    double best = -1.0;

    if (a != NULL) {
        struct triad_job j = {a, b, c, 3.0f};
        best = probe_best(n, triad_init, triad_run, &j, 3.0 * (double)n * sizeof(float));
    }
    if (map != MAP_FAILED)
        munmap(map, len);
    return best;
}

struct read_job {
    uint64_t *p;
    uint64_t *sum;     /* one per worker: stored, then read, so no pass can be left out */
};

static void
read_init(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct read_job *j = ctx;

    (void)ith;
    for (int64_t i = i0; i < i1; i++)
        j->p[i] = (uint64_t)i;
}

/* Eight independent sums, so that the adds do not chain and the loads stream (the compiler
 * may pair them into 16-byte loads, which is all baseline x86-64 needs to fill memory). */
static void
read_run(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct read_job *j = ctx;
    const uint64_t *restrict p = j->p;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    int64_t i = i0;

    for (; i + 8 <= i1; i += 8) {
        s0 += p[i];
        s1 += p[i + 1];
        s2 += p[i + 2];
        s3 += p[i + 3];
        s4 += p[i + 4];
        s5 += p[i + 5];
        s6 += p[i + 6];
        s7 += p[i + 7];
    }
    for (; i < i1; i++)
        s0 += p[i];
    j->sum[ith] = s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7;
}

double
kli_bench_read(size_t bytes)
{
    size_t len = bytes & ~(((size_t)64 << 10) - 1);
    int64_t n = (int64_t)(len / sizeof(uint64_t));
    int nth = threads_count();
    /* One anonymous mapping, as for the triad; written first by the workers, since an
     * untouched one reads as the kernel's single zero page, from the cache */
    void *map = n > 0 ? mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                             -1, 0) : MAP_FAILED;
    uint64_t *sum = map != MAP_FAILED ? calloc((size_t)nth, sizeof(uint64_t)) : NULL;
    volatile uint64_t sink = 0;
    double best = -1.0;

    if (sum != NULL) {
        struct read_job j = {map, sum};
        best = probe_best(n, read_init, read_run, &j, (double)len);
        for (int t = 0; t < nth; t++)   /* the sums are stored through j, and read here */
            sink += sum[t];
    }
    (void)sink;
    free(sum);
    if (map != MAP_FAILED)
        munmap(map, len);
    return best;
}

int
kli_threads(void)
{
    return threads_count();
}
