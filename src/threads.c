/*
 * threads.c - kli_parallel_for over OpenMP (or serially when built without it).
 *
 * Work is split statically (ith/nth), so the same thread handles the same rows every call
 * and results do not depend on scheduling.
 */
#include "config.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef HAVE_OPENBLAS
#include <cblas.h>
#endif

#include "threads.h"

static int threads_n;

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
    int nth = threads_count();

    if (n <= 0)
        return;
    if (grain < 1)
        grain = 1;
    if ((int64_t)nth > n / grain)
        nth = (int)(n / grain);
#ifdef _OPENMP
    if (nth > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(nth)
        {
            int ith = omp_get_thread_num();
            int tn = omp_get_num_threads();
            int64_t i0 = n * ith / tn, i1 = n * (ith + 1) / tn;
            if (i1 > i0)
                fn(ctx, i0, i1, ith);
        }
        return;
    }
#endif
    fn(ctx, 0, n, 0);
}
