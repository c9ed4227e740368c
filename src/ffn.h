/*
 * ffn.h - the SwiGLU MLP: dense lead layers, shared experts and each routed expert.
 */
#ifndef KLI_FFN_H
#define KLI_FFN_H

#include <stdint.h>

#include "model.h"

/* y = W_down (silu(W_gate x) * (W_up x)) for m rows: x [m][d_model] -> y [m][d_model].
 * h1, h3: scratch [m][d_ff] each. */
void ffn_forward(const struct ffn_w *w, const float *x, int64_t m, float *y, float *h1,
                 float *h3);

/* h1[i] = silu(h1[i]) * h3[i] over n values, split across threads. */
void ffn_swiglu(float *h1, const float *h3, int64_t n);

#endif
