/*
 * ffn.c - the SwiGLU MLP (docs/model.md 6.1): y = W_down(silu(W_gate x) * W_up x).
 */
#include "config.h"

#include "ffn.h"
#include "simd.h"
#include "ops.h"
#include "threads.h"

struct swiglu_job {
    float *h1;
    const float *h3;
};

static void
swiglu_range(void *ctx, int64_t i0, int64_t i1, int ith)
{
    struct swiglu_job *j = ctx;

    (void)ith;
    kli_kernels()->silu(j->h1 + i0, j->h1 + i0, j->h3 + i0, i1 - i0);
}

void
ffn_swiglu(float *h1, const float *h3, int64_t n)
{
    struct swiglu_job j = {h1, h3};

    threads_parallel_for(n, 4096, swiglu_range, &j);
}

void
ffn_forward(const struct kli_ffn_w *w, const float *x, int64_t m, float *y, float *h1, float *h3)
{
    int64_t D = w->gate.shape[1], F = w->gate.shape[0];

    ops_matmul(&w->gate, x, D, h1, F, m);
    ops_matmul(&w->up, x, D, h3, F, m);
    ffn_swiglu(h1, h3, m * F);
    ops_matmul(&w->down, h1, F, y, D, m);
}
