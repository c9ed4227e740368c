/*
 * imatrix.h - the importance-matrix collector (kli imatrix, kli-imatrix(5)): per input
 * channel of every weight matrix the forward pass multiplies, the sum of x[j]^2 over the rows
 * that went through it, and their count.
 *
 * A session carries a collector (kli_session_set_imatrix); forward_run makes it the calling
 * thread's current one for the step (imat_enter), and the places where a product is handed to
 * the workers (ops_matmul, ops_matmul_multi, ffn_forward, kda_forward's fused region,
 * moe_sched.c's grouped schedule, mla_project's latent for kv_b) call imat_hook before they
 * do. Without a collector that is one load and one predictable branch per product. The sums
 * are added on the forward pass's own thread, under the collector's lock, so workers never
 * race on them. Products of tensors the collector does not know (scratch views such as
 * MLA's absorbed per-head matrices) are ignored.
 */
#ifndef KLI_IMATRIX_H
#define KLI_IMATRIX_H

#include <stdint.h>

#include "model.h"

/* The calling thread's collector while a forward step runs; NULL otherwise. */
extern _Thread_local struct kli_imatrix *imat_current;

/* Makes `im` (NULL: none) the calling thread's collector. */
void imat_enter(struct kli_imatrix *im);

/* Adds m rows of x (row stride ldx, w->shape[1] values each) to w's sums. */
void imat_add(struct kli_imatrix *im, const struct tensor *w, const float *x, int64_t ldx,
              int64_t m);

static inline void
imat_hook(const struct tensor *w, const float *x, int64_t ldx, int64_t m)
{
    if (__builtin_expect(imat_current != NULL, 0))
        imat_add(imat_current, w, x, ldx, m);
}

struct wfile;

/* Reads the importance matrix at `path` for the checkpoint `wf` (kli_quantize): (*out)[i], for
 * tensor i of wf (n of them), is a copy of its mean squares, NULL where the file has none for
 * it or saw no rows; (*out)[n + i] its covariance (w x w, row-major), NULL where the file has
 * none. Refuses a file that is not one (KLI_E_FORMAT), one made for another model (a name
 * wf lacks or another input width: KLI_E_INVALID) and negative or non-finite values.
 * @return KLI_OK, KLI_E_IO, KLI_E_FORMAT, KLI_E_INVALID, KLI_E_NOMEM. */
int imat_load(const char *path, const struct wfile *wf, float ***out, struct kli_err *err);
void imat_imp_free(float **imp, int64_t n);

#endif
