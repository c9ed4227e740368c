/*
 * ops.c - scalar reference operators and the threaded matrix product.
 */
#include "config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef HAVE_OPENBLAS
#include <cblas.h>
#endif

#include "ops.h"
#include "simd.h"
#include "threads.h"

uint64_t
model_row_bytes(const struct kli_tensor *t)
{
    return kli_dtype_nbytes(t->dtype, (uint64_t)t->shape[1]);
}

/* The copy of W the calling worker reads: its NUMA node's under --numa replicate. */
static inline const uint8_t *
ops_wdata(const struct kli_tensor *w)
{
    return w->node_data != NULL ? w->node_data[threads_node()] : w->data;
}

void
ops_matmul_rows(const struct kli_tensor *w, int64_t r0, int64_t r1, const float *x,
                int64_t ldx, float *y, int64_t ldy, int64_t m)
{
    const struct kli_kernels *kk = kli_kernels();
    const uint8_t *base = ops_wdata(w) + (uint64_t)r0 * model_row_bytes(w);

    if (r1 > r0)
        kk->matmul[w->dtype](y + r0, ldy, x, ldx, base, r1 - r0, w->shape[1], m);
}

struct matmul_job {
    const struct kli_tensor *w;
    const float *x;
    int64_t ldx;
    float *y;
    int64_t ldy;
    int64_t m;
};

static void
matmul_range(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct matmul_job *j = ctx;

    (void)ith;
    ops_matmul_rows(j->w, i0, i1, j->x, j->ldx, j->y, j->ldy, j->m);
}

#ifdef HAVE_OPENBLAS
/* Many rows of x (prefill, or an expert's tokens): each worker converts a tile of W's rows to
 * float and multiplies it with a single-threaded SGEMM, so W is read once per call and the
 * arithmetic runs in OpenBLAS's blocked kernels. BLAS never starts threads of its own here
 * (threads.c sets it to one), so nothing oversubscribes the cores. */
#define OPS_TILE_ROWS 32

static void
matmul_gemm_range(void *ctx, int64_t t0, int64_t t1, int ith)
{
    struct matmul_job *j = ctx;
    const struct kli_kernels *kk = kli_kernels();
    int64_t k = j->w->shape[1], n = j->w->shape[0];
    uint64_t rb = model_row_bytes(j->w);
    float *tile = j->w->dtype == KLI_DT_F32 ? NULL
                  : malloc((size_t)OPS_TILE_ROWS * (size_t)k * sizeof(float));

    (void)ith;
    for (int64_t t = t0; t < t1; t++) {
        int64_t r0 = t * OPS_TILE_ROWS, r1 = r0 + OPS_TILE_ROWS < n ? r0 + OPS_TILE_ROWS : n;
        const float *wt;
        if (j->w->dtype == KLI_DT_F32) {
            wt = (const float *)(const void *)ops_wdata(j->w) + r0 * k;
        } else if (tile == NULL) {
            /* No memory for the tile: the kernel's own path computes the same product. */
            ops_matmul_rows(j->w, r0, r1, j->x, j->ldx, j->y, j->ldy, j->m);
            continue;
        } else {
            kk->to_f32(j->w->dtype, ops_wdata(j->w) + (uint64_t)r0 * rb, tile,
                       (r1 - r0) * k);
            wt = tile;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)j->m, (blasint)(r1 - r0),
                    (blasint)k, 1.0f, j->x, (blasint)j->ldx, wt, (blasint)k, 0.0f, j->y + r0,
                    (blasint)j->ldy);
    }
    free(tile);
}
#endif

void
ops_matmul(const struct kli_tensor *w, const float *x, int64_t ldx, float *y, int64_t ldy,
           int64_t m)
{
    struct matmul_job j = {w, x, ldx, y, ldy, m};

#ifdef HAVE_OPENBLAS
    if (m >= OPS_GEMM_MIN_ROWS) {
        int64_t tiles = (w->shape[0] + OPS_TILE_ROWS - 1) / OPS_TILE_ROWS;
        threads_parallel_for(tiles, 1, matmul_gemm_range, &j);
        return;
    }
#endif
    threads_parallel_for(w->shape[0], 16, matmul_range, &j);
}

struct kli_tensor
ops_view_f32(const float *data, int64_t rows, int64_t cols)
{
    struct kli_tensor t;

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

    (void)ith;
#ifdef HAVE_OPENBLAS
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)(i1 - i0), (blasint)j->n,
                (blasint)j->k, 1.0f, j->x + i0 * j->ldx, (blasint)j->ldx, j->B, (blasint)j->ldb,
                0.0f, j->y + i0 * j->ldy, (blasint)j->ldy);
#else
    const struct kli_kernels *kk = kli_kernels();
    for (int64_t i = i0; i < i1; i++) {
        float *yi = j->y + i * j->ldy;
        memset(yi, 0, (size_t)j->n * sizeof(float));
        for (int64_t l = 0; l < j->k; l++)
            kk->axpy(yi, j->x[i * j->ldx + l], j->B + l * j->ldb, j->n);
    }
#endif
}

void
ops_gemm_nn(const float *x, int64_t ldx, const float *B, int64_t ldb, float *y, int64_t ldy,
            int64_t m, int64_t n, int64_t k)
{
    struct gemm_nn_job j = {x, B, y, ldx, ldb, ldy, n, k};

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
ops_row_f32(const struct kli_tensor *t, int64_t id, float *out)
{
    const uint8_t *p = (const uint8_t *)t->data + (uint64_t)id * model_row_bytes(t);

    kli_kernels()->to_f32(t->dtype, p, out, t->shape[1]);
}
