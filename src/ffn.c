/*
 * ffn.c - the SwiGLU MLP (doc/model.md 6.1): y = W_down(silu(W_gate x) * W_up x).
 */
#include "config.h"

#include "ffn.h"
#include "imatrix.h"
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
    k_kernels()->silu(j->h1 + i0, j->h1 + i0, j->h3 + i0, i1 - i0);
}

void
ffn_swiglu(float *h1, const float *h3, int64_t n)
{
    struct swiglu_job j = {h1, h3};

    threads_parallel_for(n, 4096, swiglu_range, &j);
}

/* Gate and up for rows [r0, r1) of the hidden layer, then the SwiGLU product on that slice of
 * every token: one parallel region instead of three, so the workers meet at one barrier per
 * expert less twice (on a shared VM, spinning at short barriers cost a 16-core prefill half
 * its speed once the product itself became fast). */
struct ffn_job {
    const struct ffn_w *w;
    const float *x;
    float *h1, *h3;
    int64_t m, D, F;
};

static void
ffn_gateup_range(void *ctx, int64_t r0, int64_t r1, int ith)
{
    struct ffn_job *j = ctx;
    const struct k_kernels *kk = k_kernels();

    (void)ith;
    ops_matmul_rows(&j->w->gate, r0, r1, j->x, j->D, j->h1, j->F, j->m);
    ops_matmul_rows(&j->w->up, r0, r1, j->x, j->D, j->h3, j->F, j->m);
    for (int64_t t = 0; t < j->m; t++) {
        float *h = j->h1 + t * j->F + r0;
        kk->silu(h, h, j->h3 + t * j->F + r0, r1 - r0);
    }
}

void
ffn_forward(const struct ffn_w *w, const float *x, int64_t m, float *y, float *h1, float *h3)
{
    int64_t D = w->gate.shape[1], F = w->gate.shape[0];
    struct ffn_job j = {w, x, h1, h3, m, D, F};

    imat_hook(&w->gate, x, D, m);
    imat_hook(&w->up, x, D, m);
    threads_parallel_for(F, 16, ffn_gateup_range, &j);
    ops_matmul(&w->down, h1, F, y, D, m);
}
