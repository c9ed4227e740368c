/*
 * bench-kernels.c - micro benchmark of the matmul kernels of every usable SIMD variant.
 *
 * Not part of `make check`. Build by hand from the source root against a configured and built
 * tree BUILD (its config.h and its convenience library, which has every kernel table):
 *
 *   gcc -std=gnu11 -O2 -Isimd -Iweights -Isrc -IBUILD -fopenmp -o /tmp/bench-kernels \
 *       contrib/bench/bench-kernels.c BUILD/.libs/libkli_all.a -lopenblas -lhwloc -lzstd -lm
 *
 * What it prints (each number the median of 5 timed repetitions after one warm-up, with the
 * range beside it), for 1 and 2 threads (or -t LIST):
 *   - a STREAM-triad-like probe, a[i] = b[i] + s * c[i] over three 128 MiB double arrays
 *     (or -M MiB each), counting 24 bytes per element, and a read-only probe (the best
 *     table's dot product over two of the arrays);
 *   - decode: m = 1, k = 2304, n = 16384, GB/s of weight bytes read, per dtype and variant.
 *     Enough copies of W are cycled through (at least 256 MiB together, -M to change it: use
 *     several times the last-level cache) that every pass reads from memory, not from the
 *     cache; threads split the rows, as callers do, and meet at a barrier after each copy.
 *     With -B, also m = 8 (batched decode) in the same setting: the same GB/s as m = 1 means
 *     eight tokens cost what one does;
 *   - prefill: m = 64 and m = 512 (or -m LIST), k = n = 2304, GFLOP/s (2 m n k per call).
 *
 * Options: -v NAME[,NAME] (variants), -d DTYPE (one dtype, any case), -t 1,2 (thread counts),
 * -M MiB, -N ROWS (decode's n), -K COLS (k, a multiple of 256), -n ROWS (prefill's n), -B, -G
 * (include the generic variant in prefill; it is slow), -P (skip prefill), -D (skip decode).
 * -M 0 runs decode over one copy of W again and again: with a W that fits the cache (-N 256:
 * 324 KiB of Q4_K), the kernels' speed with no memory in the way.
 */
#include "config.h"

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "simd.h"

#define BENCH_REPS 5

static double
bench_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* CPU time of the calling thread: with other processes on the machine, the longest thread's
 * CPU time approximates the wall time of an unshared run. */
static double
bench_cpu(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int
bench_cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

/* Sorts v[BENCH_REPS]; @return the median. */
static double
bench_median(double *v)
{
    qsort(v, BENCH_REPS, sizeof(double), bench_cmp);
    return v[BENCH_REPS / 2];
}

static uint64_t bench_rng = 88172645463325252ull;

static uint32_t
bench_rand(void)
{
    bench_rng ^= bench_rng << 13;
    bench_rng ^= bench_rng >> 7;
    bench_rng ^= bench_rng << 17;
    return (uint32_t)(bench_rng >> 32);
}

static float
bench_randf(void)
{
    return (float)bench_rand() / 2147483648.0f - 1.0f;
}

static void *
bench_alloc(size_t n)
{
    void *p = NULL;

    if (posix_memalign(&p, 64, n) != 0) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

/* Random but valid weights. */
static void
bench_fill(enum k_dtype dt, uint8_t *w, int64_t nelem)
{
    int bb = dtype_info(dt)->block_bytes, blk = dtype_info(dt)->block;
    int64_t nb = nelem / blk;

    for (int64_t b = 0; b < nb; b++) {
        uint8_t *p = w + b * bb;
        if (dtype_is_k(dt)) {
            /* super-blocks through the quantizer: random bytes would be random f16 scales */
            float f[KLI_QK_K];
            for (int i = 0; i < KLI_QK_K; i++)
                f[i] = 0.05f * bench_randf();
            dtype_from_f32(dt, f, p, KLI_QK_K);
        } else if (dt == KLI_DT_F32) {
            float f = bench_randf();
            memcpy(p, &f, 4);
        } else if (dt == KLI_DT_F16 || dt == KLI_DT_BF16) {
            float f = bench_randf();
            uint16_t h = dt == KLI_DT_F16 ? f32_to_f16(f) : f32_to_bf16(f);
            memcpy(p, &h, 2);
        } else {
            uint16_t h = f32_to_f16(0.01f * bench_randf());
            memcpy(p, &h, 2);
            for (int i = 2; i < bb; i++)
                p[i] = (uint8_t)bench_rand();
        }
    }
}

/* ---- bandwidth probes --------------------------------------------------------------------- */

static void
bench_bandwidth(int nt, int footprint_mib)
{
    /* 128 MiB per double array, or the -M footprint if larger */
    int64_t n = ((int64_t)(footprint_mib > 128 ? footprint_mib : 128) << 20) / 8;
    double *a = bench_alloc((size_t)n * 8), *b = bench_alloc((size_t)n * 8);
    double *c = bench_alloc((size_t)n * 8);
    double tri[BENCH_REPS], rd[BENCH_REPS], tric[BENCH_REPS], rdc[BENCH_REPS], sink = 0.0;

#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        a[i] = 0.0;
        b[i] = 1.0 + (double)(i & 7);
        c[i] = 2.0;
    }
    for (int rep = -1; rep < BENCH_REPS; rep++) {
        double t0 = bench_now(), cmax = 0.0;
#pragma omp parallel num_threads(nt) reduction(max : cmax)
        {
            int th = omp_get_thread_num(), tn = omp_get_num_threads();
            int64_t i0 = n * th / tn, i1 = n * (th + 1) / tn;
            double c0 = bench_cpu();
            for (int64_t i = i0; i < i1; i++)
                a[i] = b[i] + 3.0 * c[i];
            cmax = bench_cpu() - c0;
        }
        double t = bench_now() - t0;
        if (rep >= 0) {
            tri[rep] = 24.0 * (double)n / t * 1e-9;
            tric[rep] = 24.0 * (double)n / cmax * 1e-9;
        }
    }
    /* read-only: the best table's dot product over a and b viewed as floats, 256 MiB (the
     * doubles hold small integers, so the floats are zeros and normal numbers) */
    const struct k_kernels *kt = k_kernels();
    for (int rep = -1; rep < BENCH_REPS; rep++) {
        double t0 = bench_now(), s = 0.0, cmax = 0.0;
#pragma omp parallel num_threads(nt) reduction(+ : s) reduction(max : cmax)
        {
            int th = omp_get_thread_num(), tn = omp_get_num_threads();
            int64_t i0 = 2 * n * th / tn, i1 = 2 * n * (th + 1) / tn;
            double c0 = bench_cpu();
            s += kt->dot((const float *)a + i0, (const float *)b + i0, i1 - i0);
            cmax = bench_cpu() - c0;
        }
        double t = bench_now() - t0;
        sink += s;
        if (rep >= 0) {
            rd[rep] = 16.0 * (double)n / t * 1e-9;
            rdc[rep] = 16.0 * (double)n / cmax * 1e-9;
        }
    }
    double mt = bench_median(tri), mr = bench_median(rd);
    double mtc = bench_median(tric), mrc = bench_median(rdc);
    printf("bandwidth  triad      %dT  %6.1f GB/s  (%.1f-%.1f)  cpu-time %6.1f\n", nt, mt,
           tri[0], tri[BENCH_REPS - 1], mtc);
    printf("bandwidth  read-only  %dT  %6.1f GB/s  (%.1f-%.1f)  cpu-time %6.1f%s\n", nt, mr,
           rd[0], rd[BENCH_REPS - 1], mrc, sink == 1.0 ? " " : "");
    free(a);
    free(b);
    free(c);
}

/* ---- matmul ---------------------------------------------------------------------------------- */

/* One timed pass: every copy of W, rows split over nt threads, barrier after each copy.
 * @return wall seconds; *cpu gets the largest per-thread CPU seconds (barrier waits excluded) */
static double
bench_pass(const struct k_kernels *kt, enum k_dtype dt, int nt, uint8_t **w, int ncopy,
           float *y, const float *x, int64_t n, int64_t k, int64_t m, double *cpu)
{
    size_t rb = (size_t)dtype_nbytes(dt, (uint64_t)k);
    double t0 = bench_now(), cmax = 0.0;

#pragma omp parallel num_threads(nt) reduction(max : cmax)
    {
        int th = omp_get_thread_num(), tn = omp_get_num_threads();
        double c = 0.0;
        /* rows split in multiples of 48, the largest GEMM panel */
        int64_t units = (n + 47) / 48;
        int64_t r0 = units * th / tn * 48, r1 = units * (th + 1) / tn * 48;
        if (r1 > n)
            r1 = n;
        for (int i = 0; i < ncopy; i++) {
            double c0 = bench_cpu();
            if (r1 > r0)
                kt->matmul[dt](y + r0, n, x, k, w[i] + (size_t)r0 * rb, r1 - r0, k, m);
            c += bench_cpu() - c0;
#pragma omp barrier
        }
        cmax = c;
    }
    *cpu = cmax;
    return bench_now() - t0;
}

static void
bench_matmul(const struct k_kernels **tabs, int ntab, const int *threads, int nthreads,
             int only_dt, int prefill, int with_generic, int batch, int footprint_mib,
             const int64_t *pm, int npm, int64_t decode_n, int64_t k, int64_t prefill_n)
{
    int64_t n = prefill ? prefill_n : decode_n;
    int64_t ms[16] = {1, 8};
    int nm = batch ? 2 : 1;

    if (prefill) {
        memcpy(ms, pm, sizeof(int64_t) * (size_t)npm);
        nm = npm;
    }

    for (int dt = 0; dt < KLI_DT_COUNT; dt++) {
        if (dt == KLI_DT_OTHER || (only_dt >= 0 && dt != only_dt))
            continue;
        size_t wbytes = (size_t)dtype_nbytes(dt, (uint64_t)(n * k));
        int ncopy = prefill ? 1 : (int)(((size_t)footprint_mib << 20) / wbytes + 1);
        /* -M 0: the one copy again and again, from the cache if it fits (compute speed) */
        int nalloc = ncopy;
        if (!prefill && footprint_mib == 0)
            ncopy = (int)((256u << 20) / wbytes + 1);
        uint8_t **w = malloc(sizeof(*w) * (size_t)ncopy);
        int64_t mmax = 1;
        for (int i = 0; i < nm; i++)
            mmax = ms[i] > mmax ? ms[i] : mmax;
        float *x = bench_alloc((size_t)(mmax * k) * 4), *y = bench_alloc((size_t)(mmax * n) * 4);

        for (int c = 0; c < ncopy; c++) {
            if (c >= nalloc) {
                w[c] = w[0];
                continue;
            }
            w[c] = bench_alloc(wbytes);
            bench_fill(dt, w[c], n * k);
        }
        for (int64_t i = 0; i < mmax * k; i++)
            x[i] = bench_randf();
        for (int im = 0; im < nm; im++) {
            int64_t m = ms[im];
            for (int v = 0; v < ntab; v++) {
                const struct k_kernels *kt = tabs[v];
                if (prefill && !with_generic && strcmp(kt->name, "generic") == 0)
                    continue;
                for (int it = 0; it < nthreads; it++) {
                    double r[BENCH_REPS], rc[BENCH_REPS];
                    double work = prefill ? 2.0 * (double)(m * n * k) : (double)wbytes * ncopy;
                    for (int rep = -1; rep < BENCH_REPS; rep++) {
                        double c, t = bench_pass(kt, dt, threads[it], w, ncopy, y, x, n, k, m,
                                                 &c);
                        if (rep >= 0) {
                            r[rep] = work / t * 1e-9;
                            rc[rep] = work / c * 1e-9;
                        }
                    }
                    double med = bench_median(r), medc = bench_median(rc);
                    if (prefill)
                        printf("prefill m=%-3lld k=%lld n=%lld  %-8s %-5s %dT  %6.1f GFLOP/s"
                               "  (%.1f-%.1f)  cpu-time %6.1f\n", (long long)m, (long long)k,
                               (long long)n, kt->name, k_dtype_name(dt), threads[it], med,
                               r[0], r[BENCH_REPS - 1], medc);
                    else
                        printf("decode  m=%lld k=%lld n=%lld  %-8s %-5s %dT  %6.1f GB/s"
                               "  (%.1f-%.1f)  cpu-time %6.1f\n", (long long)m, (long long)k,
                               (long long)n, kt->name, k_dtype_name(dt), threads[it], med, r[0],
                               r[BENCH_REPS - 1], medc);
                    fflush(stdout);
                }
            }
        }
        for (int c = 0; c < nalloc; c++)
            free(w[c]);
        free(w);
        free(x);
        free(y);
    }
}

/* A size option's value: a whole multiple of `unit` (at least one), else -1 after saying so. */
static int
bench_size(const char *prog, const char *opt, const char *val, int64_t unit, int64_t *out)
{
    char *end;
    long long v = strtoll(val, &end, 10);

    if (*end != '\0' || v < unit || v % unit != 0) {
        fprintf(stderr, "%s: %s wants a multiple of %lld\n", prog, opt, (long long)unit);
        return -1;
    }
    *out = v;
    return 0;
}

int
main(int argc, char **argv)
{
    const struct k_kernels *all[8], *tabs[8];
    int nall = kernels_all(all, 8), ntab = 0;
    const char *only_v = NULL;
    int only_dt = -1, with_generic = 0, do_prefill = 1, do_decode = 1, batch = 0;
    int footprint = 256, npm = 2;
    int64_t decode_n = 16384, k = 2304, prefill_n = 2304;
    int64_t pm[16] = {64, 512};
    int threads[8] = {1, 2}, nthreads = 2;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-v") == 0 && i + 1 < argc) {
            only_v = argv[++i];
        } else if (strcmp(argv[i], "-d") == 0 && i + 1 < argc) {
            const char *d = argv[++i];
            for (int dt = 0; dt < KLI_DT_COUNT; dt++) {
                if (dt != KLI_DT_OTHER && strcasecmp(k_dtype_name(dt), d) == 0)
                    only_dt = dt;
            }
        } else if (strcmp(argv[i], "-t") == 0 && i + 1 < argc) {
            char *s = argv[++i];
            nthreads = 0;
            while (*s && nthreads < 8) {
                threads[nthreads++] = (int)strtol(s, &s, 10);
                if (*s == ',')
                    s++;
            }
        } else if (strcmp(argv[i], "-M") == 0 && i + 1 < argc) {
            footprint = atoi(argv[++i]);
        } else if (strcmp(argv[i], "-N") == 0 && i + 1 < argc) {
            if (bench_size(argv[0], "-N", argv[++i], 4, &decode_n) != 0)
                return 2;
        } else if (strcmp(argv[i], "-K") == 0 && i + 1 < argc) {
            if (bench_size(argv[0], "-K", argv[++i], 256, &k) != 0)
                return 2;
        } else if (strcmp(argv[i], "-n") == 0 && i + 1 < argc) {
            if (bench_size(argv[0], "-n", argv[++i], 4, &prefill_n) != 0)
                return 2;
        } else if (strcmp(argv[i], "-m") == 0 && i + 1 < argc) {
            char *s = argv[++i];
            npm = 0;
            while (*s && npm < 16) {
                pm[npm++] = strtol(s, &s, 10);
                if (*s == ',')
                    s++;
            }
        } else if (strcmp(argv[i], "-B") == 0) {
            batch = 1;
        } else if (strcmp(argv[i], "-G") == 0) {
            with_generic = 1;
        } else if (strcmp(argv[i], "-P") == 0) {
            do_prefill = 0;
        } else if (strcmp(argv[i], "-D") == 0) {
            do_decode = 0;
        } else {
            fprintf(stderr, "usage: %s [-v variants] [-d dtype] [-t 1,2] [-M MiB] [-B] "
                    "[-N rows] [-K k] [-n rows] [-m 64,512] [-G] [-P] [-D]\n", argv[0]);
            return 2;
        }
    }
    for (int i = 0; i < nall; i++) {
        size_t len = strlen(all[i]->name);
        const char *hit = only_v;
        /* -v takes a comma-separated list of names */
        while (hit != NULL && (hit = strstr(hit, all[i]->name)) != NULL) {
            if ((hit == only_v || hit[-1] == ',') && (hit[len] == '\0' || hit[len] == ','))
                break;
            hit += len;
        }
        if (only_v == NULL || hit != NULL)
            tabs[ntab++] = all[i];
    }
    printf("variants:");
    for (int i = 0; i < ntab; i++)
        printf(" %s", tabs[i]->name);
    printf("   (median of %d; range in parentheses)\n", BENCH_REPS);
    FILE *la = fopen("/proc/loadavg", "r");
    char line[128];
    if (la != NULL && fgets(line, sizeof(line), la) != NULL)
        printf("load average at start: %s", line);
    if (la != NULL)
        fclose(la);
    for (int i = 0; i < nthreads; i++)
        bench_bandwidth(threads[i], footprint);
    if (do_decode)
        bench_matmul(tabs, ntab, threads, nthreads, only_dt, 0, with_generic, batch, footprint,
                     pm, npm, decode_n, k, prefill_n);
    if (do_prefill)
        bench_matmul(tabs, ntab, threads, nthreads, only_dt, 1, with_generic, 0, footprint, pm,
                     npm, decode_n, k, prefill_n);
    for (int i = 0; i < nthreads; i++)
        bench_bandwidth(threads[i], footprint);
    return 0;
}
