/*
 * ops.c - scalar reference operators and the threaded matrix product.
 */
#include "config.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#ifdef HAVE_OPENBLAS
#include <cblas.h>
#include <sys/mman.h>
#endif

#include "ops.h"
#include "imatrix.h"
#include "simd.h"
#include "threads.h"

uint64_t
model_row_bytes(const struct tensor *t)
{
    return dtype_nbytes(t->dtype, (uint64_t)t->shape[1]);
}

/* The copy of W the calling worker reads: its NUMA node's under --numa replicate. */
static inline const uint8_t *
ops_wdata(const struct tensor *w)
{
    return w->node_data != NULL ? w->node_data[threads_node()] : w->data;
}

void
ops_matmul_rows(const struct tensor *w, int64_t r0, int64_t r1, const float *x,
                int64_t ldx, float *y, int64_t ldy, int64_t m)
{
    const struct k_kernels *kk = k_kernels();
    const uint8_t *base = ops_wdata(w) + (uint64_t)r0 * model_row_bytes(w);

    if (r1 > r0)
        kk->matmul[w->dtype](y + r0, ldy, x, ldx, base, r1 - r0, w->shape[1], m);
}

/* One product of ops_matmul: y = x W^T with m rows of x. */
struct matmul_job {
    struct ops_mm p;
    int64_t m;
};

static void
matmul_range(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct matmul_job *j = ctx;

    (void)ith;
    ops_matmul_rows(j->p.w, i0, i1, j->p.x, j->p.ldx, j->p.y, j->p.ldy, j->m);
}

#ifdef HAVE_OPENBLAS
/*
 * OpenBLAS under a memory limit. A thread's first cblas_sgemm takes a work buffer from
 * OpenBLAS's pool, allocating it when the pool has no free one: 128 MiB (BUFFER_SIZE of the
 * x86-64 builds, Debian 12's 0.3.21 among them) by mmap, else by malloc. When both fail it
 * tries them again, forever (blas_memory_alloc in driver/others/memory.c): under ulimit -v
 * or strict overcommit the process spins at 100% CPU and never returns, and nothing kli
 * does afterwards (a signal flag, an error) can run. The pool keeps every buffer for the
 * life of the process, so only a product on more workers than any before can need a new
 * one. Before such a product, ops_blas_ready reserves OPS_BLAS_RESERVE bytes of address
 * space per new worker, as OpenBLAS would take them, and releases them at once: if that
 * fails, the product runs on kli's own kernels instead (slower, allocating nothing), and
 * the next one asks again.
 */
#define OPS_BLAS_RESERVE ((size_t)136 << 20)   /* a 128 MiB buffer, its page and slack */

static atomic_int ops_blas_warm;   /* the most workers a BLAS product has run on */

/* Whether the workers of threads_parallel_for(n, grain, ...) may all call cblas_sgemm at
 * once without OpenBLAS allocating a buffer that the system would refuse. */
static int
ops_blas_ready(int64_t n, int64_t grain)
{
    int workers = threads_count(), warm = atomic_load(&ops_blas_warm);
    size_t len;
    void *p;

    if (grain > 0 && n / grain < workers)
        workers = n / grain > 1 ? (int)(n / grain) : 1;
    if (workers <= warm)
        return 1;
    len = (size_t)(workers - warm) * OPS_BLAS_RESERVE;
    p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return 0;
    munmap(p, len);
    /* Counted before the product runs: its buffers stay in the pool once allocated. */
    while (warm < workers && !atomic_compare_exchange_weak(&ops_blas_warm, &warm, workers))
        ;
    return 1;
}

/* Float32 weights with many rows of x (the KDA chunk products, the MLA up-projections kept
 * in float): each worker multiplies its range of W's rows with one single-threaded SGEMM.
 * BLAS never starts threads of its own here (threads.c sets it to one), so nothing
 * oversubscribes the cores. Stored types (bf16, q8_0, q4, f16) go to the kernels' own
 * blocked GEMM instead, which widens W panel by panel in cache: converting W to float tiles
 * for SGEMM measured 27-37% slower in prefill (2-core Skylake-SP, pp256: q8_0 61 vs 84
 * tok/s, bf16 58 vs 79), as SGEMM re-packs x for every tile. */
static void
matmul_sgemm_range(void *ctx, int64_t r0, int64_t r1, int ith)
{
    struct matmul_job *j = ctx;
    int64_t k = j->p.w->shape[1];

    (void)ith;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)j->m, (blasint)(r1 - r0),
                (blasint)k, 1.0f, j->p.x, (blasint)j->p.ldx,
                (const float *)(const void *)ops_wdata(j->p.w) + r0 * k, (blasint)k, 0.0f,
                j->p.y + r0, (blasint)j->p.ldy);
}
#endif

void
ops_share(int64_t rows, int64_t grain, int ith, int tn, int64_t *r0, int64_t *r1)
{
    int64_t nth = rows / grain < tn ? rows / grain : tn;

    if (nth < 1)
        nth = 1;
    *r0 = *r1 = 0;
    if (ith < nth) {
        *r0 = rows * ith / nth;
        *r1 = rows * (ith + 1) / nth;
    }
}

struct multi_job {
    const struct ops_mm *mm;
    int n, tn;
    int64_t m;
};

static void
matmul_multi_range(void *ctx, int64_t t0, int64_t t1, int ith)
{
    struct multi_job *j = ctx;

    (void)ith;
    for (int64_t wk = t0; wk < t1; wk++) {   /* one worker each, or all when run serially */
        for (int i = 0; i < j->n; i++) {
            const struct ops_mm *p = &j->mm[i];
            int64_t r0, r1;
            ops_share(p->w->shape[0], 16, (int)wk, j->tn, &r0, &r1);
            if (r1 > r0)
                ops_matmul_rows(p->w, r0, r1, p->x, p->ldx, p->y, p->ldy, j->m);
        }
    }
}

void
ops_matmul_multi(const struct ops_mm *mm, int n, int64_t m)
{
    struct multi_job j = {mm, n, threads_count(), m};

    for (int i = 0; imat_current != NULL && i < n; i++)
        imat_add(imat_current, mm[i].w, mm[i].x, mm[i].ldx, m);
    threads_parallel_for(j.tn, 1, matmul_multi_range, &j);
}

void
ops_matmul(const struct tensor *w, const float *x, int64_t ldx, float *y, int64_t ldy,
           int64_t m)
{
    struct matmul_job j = {{w, x, ldx, y, ldy}, m};

    imat_hook(w, x, ldx, m);
#ifdef HAVE_OPENBLAS
    if (w->dtype == KLI_DT_F32 && m >= OPS_GEMM_MIN_ROWS && ops_blas_ready(w->shape[0], 64)) {
        threads_parallel_for(w->shape[0], 64, matmul_sgemm_range, &j);
        return;
    }
#endif
    threads_parallel_for(w->shape[0], 16, matmul_range, &j);
}

struct tensor
ops_view_f32(const float *data, int64_t rows, int64_t cols)
{
    struct tensor t;

    memset(&t, 0, sizeof(t));
    t.dtype = KLI_DT_F32;
    t.ndim = 2;
    t.shape[0] = rows;
    t.shape[1] = cols;
    t.data = data;
    t.name = "(scratch)";
    return t;
}

struct gemm_nn_job {
    const float *x, *B;
    float *y;
    int64_t ldx, ldb, ldy, n, k;
};

static void
gemm_nn_range(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct gemm_nn_job *j = ctx;
    const struct k_kernels *kk = k_kernels();

    (void)ith;
    for (int64_t i = i0; i < i1; i++) {
        float *yi = j->y + i * j->ldy;
        memset(yi, 0, (size_t)j->n * sizeof(float));
        for (int64_t l = 0; l < j->k; l++)
            kk->axpy(yi, j->x[i * j->ldx + l], j->B + l * j->ldb, j->n);
    }
}

#ifdef HAVE_OPENBLAS
static void
gemm_nn_sgemm_range(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct gemm_nn_job *j = ctx;

    (void)ith;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)(i1 - i0), (blasint)j->n,
                (blasint)j->k, 1.0f, j->x + i0 * j->ldx, (blasint)j->ldx, j->B, (blasint)j->ldb,
                0.0f, j->y + i0 * j->ldy, (blasint)j->ldy);
}
#endif

void
ops_gemm_nn(const float *x, int64_t ldx, const float *B, int64_t ldb, float *y, int64_t ldy,
            int64_t m, int64_t n, int64_t k)
{
    struct gemm_nn_job j = {x, B, y, ldx, ldb, ldy, n, k};

#ifdef HAVE_OPENBLAS
    if (ops_blas_ready(m, 1)) {
        threads_parallel_for(m, 1, gemm_nn_sgemm_range, &j);
        return;
    }
#endif
    threads_parallel_for(m, 1, gemm_nn_range, &j);
}

void
ops_rmsnorm(float *y, const float *x, const float *w, int64_t n, float eps)
{
    double ss = 0.0;

    for (int64_t i = 0; i < n; i++)
        ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss / (double)n + eps));
    for (int64_t i = 0; i < n; i++)
        y[i] = x[i] * r * w[i];
}

void
ops_softmax(float *x, int64_t n)
{
    float mx = -INFINITY;
    double s = 0.0;

    for (int64_t i = 0; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        s += x[i];
    }
    float inv = (float)(1.0 / s);
    for (int64_t i = 0; i < n; i++)
        x[i] *= inv;
}

void
ops_row_f32(const struct tensor *t, int64_t id, float *out)
{
    const uint8_t *p = (const uint8_t *)t->data + (uint64_t)id * model_row_bytes(t);

    k_kernels()->to_f32(t->dtype, p, out, t->shape[1]);
}
