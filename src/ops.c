/*
 * ops.c - scalar reference operators and the threaded matrix product.
 */
#include "config.h"

#include <math.h>
#include <string.h>

#include "ops.h"
#include "simd.h"
#include "threads.h"

uint64_t
model_row_bytes(const struct kli_tensor *t)
{
    return kli_dtype_nbytes(t->dtype, (uint64_t)t->shape[1]);
}

void
ops_matmul_rows(const struct kli_tensor *w, int64_t r0, int64_t r1, const float *x,
                int64_t ldx, float *y, int64_t ldy, int64_t m)
{
    const struct kli_kernels *kk = kli_kernels();
    const uint8_t *base = (const uint8_t *)w->data + (uint64_t)r0 * model_row_bytes(w);

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

void
ops_matmul(const struct kli_tensor *w, const float *x, int64_t ldx, float *y, int64_t ldy,
           int64_t m)
{
    struct matmul_job j = {w, x, ldx, y, ldy, m};

    threads_parallel_for(w->shape[0], 16, matmul_range, &j);
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
