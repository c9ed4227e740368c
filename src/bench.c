/*
 * bench.c - the memory-bandwidth probe `kli bench` measures decode against.
 *
 * A STREAM triad run by the same worker threads, with the same static split, as the
 * forward pass: its GB/s is what those threads can pull from memory right now, which on a
 * shared machine moves by tens of percent from minute to minute; so `kli bench` measures it
 * in the same run as the model.
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
        threads_parallel_for(n, 1 << 16, triad_init, &j);   /* first touch by the workers */
        for (int rep = 0; rep < 5; rep++) {
            double t0 = util_now_s();
            threads_parallel_for(n, 1 << 16, triad_run, &j);
            double dt = util_now_s() - t0;
            double gbs = 3.0 * (double)n * sizeof(float) / dt / 1e9;
            best = gbs > best ? gbs : best;
        }
    }
    if (map != MAP_FAILED)
        munmap(map, len);
    return best;
}

int
kli_threads(void)
{
    return threads_count();
}
