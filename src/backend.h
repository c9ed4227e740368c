/*
 * backend.h - the boundary between kli's CPU code and an accelerator backend.
 *
 * Two layers live here:
 *
 *   struct backend_ops  the device vtable. It knows buffers, streams and a few
 *                           model-neutral blocks (latent attention, whole MLA and KDA layers,
 *                           SwiGLU experts); it knows nothing of kli_model or kli_session.
 *                           cuda/ implements it (cuda_backend() in cuda/kli_cuda.h) and
 *                           includes this header and internal.h (for err_set) and nothing
 *                           else of src/.
 *   backend_*               the glue in backend.c that maps the model onto the vtable: which
 *                           MLA caches are mirrored on the device, which experts of which
 *                           layer are resident (the hot set), and the fallback to the CPU.
 *
 * The CPU path is always complete: the latent cache in host memory stays the truth, so a
 * device failure costs speed, never a result. The exception is whole-model mode, where the
 * KDA states live on the device: a failure there loses them and the sessions are marked
 * broken.
 *
 * One return convention for every backend_* call that offers to do work (layer.c, the layer
 * dispatcher, is the one caller during a pass):
 *     KLI_OK        done on the device;
 *     BACKEND_CPU   not done: the caller's CPU code does it, nothing was lost;
 *     negative      a device failure that lost state only the device held (whole-model
 *                   KDA states): err says why, the sessions must be marked broken.
 */
#ifndef KLI_BACKEND_H
#define KLI_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "kli.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The backend_* answer "the CPU does it" (see above); the vtable's members never return it. */
#define BACKEND_CPU 1

/* ==== The device vtable ===================================================================== */

struct k_gpu;         /* one device: its context and the memory budget kli may use */
struct gpu_queue;   /* one stream with its workspace and pinned staging: one per session */

struct gpu_info {
    char name[128];         /* "NVIDIA H100 80GB HBM3" */
    int device;             /* index among the visible devices */
    int n_sm;               /* multiprocessors */
    int cc_major, cc_minor; /* compute capability */
    uint64_t mem_total;     /* bytes on the device */
    uint64_t mem_free;      /* bytes free when it was opened */
    uint64_t smem_block;    /* most shared memory one block may use (opt-in limit) */
};

/* One SwiGLU FFN whose three matrices are on the device, rows contiguous:
 * gate, up [d_ff][d_model] of dtype and down [d_model][d_ff] of dtype_down (enum k_dtype:
 * F32, F16, BF16, Q8_0, Q4 or a K type; both widths multiples of 32, and a matrix of a K
 * type has rows of whole super-blocks). */
struct gpu_ffn {
    const void *gate, *up, *down;
    int32_t dtype;
    int32_t d_ff;
    int32_t dtype_down;
};

/* The device share of one MoE layer over T rows: item j (an expert, or the shared expert
 * over all rows) computes y_p = FFN_j(x[row[p]]) for its pairs p in [start[j], start[j+1]),
 * and the result is out[t] = sum over the pairs p with row[p] = t of wt[p] * y_p. */
struct gpu_moe_job {
    int64_t T, D;                      /* rows, d_model */
    const float *x;                    /* host [T][D] */
    int32_t n_items;
    const struct gpu_ffn *item;    /* [n_items] */
    const int32_t *start;              /* [n_items+1] */
    const int32_t *row;                /* [start[n_items]] */
    const float *wt;                   /* [start[n_items]] */
};

/* Absorbed-form latent attention (doc/model.md 5.2) for T query rows, all heads:
 *     S[h][s]   = scale * q[t][h] . cache_t[s]          s < n[t]   (C = L + rope values)
 *     P         = softmax(S[h])
 *     lat[t][h] = sum_s P[h][s] cache_t[s][0:L]
 * cache_t is the device cache of the sequence row t belongs to: rows of C values stored as
 * dtype (F32, BF16 or Q8_0, mla_row_bytes; cache[t] points at its first byte whatever the
 * type), widened to float as they are read. */
struct gpu_mla_job {
    int64_t T;
    int32_t H, L, C;
    float scale;
    const float *const *cache;   /* [T] device pointers (host array) */
    const int64_t *n;            /* [T] rows attended, >= 1 */
    const float *q;              /* host [T][H][C] */
    float *lat;                  /* host [T][H][L], written */
    int32_t dtype;               /* the rows' enum k_dtype: KLI_DT_F32 (0) unless set */
};

/* Whether the device kernels compute a [.][cols] matrix of dtype dt (struct gpu_mat, struct
 * gpu_ffn): F32, F16, BF16, Q8_0, Q4 or a K type, and cols a multiple of 8 (the plain types),
 * 32 (Q8_0, Q4) or 256 (the K types: whole super-blocks). */
static inline int
gpu_dtype_ok(int32_t dt, int64_t cols)
{
    if (dt < KLI_DT_F32 || dt > KLI_DT_Q6_K || dt == KLI_DT_OTHER)
        return 0;
    return cols > 0 && cols % (dt == KLI_DT_Q8_0 || dt == KLI_DT_Q4 ? 32 :
                               dtype_is_k((enum k_dtype)dt) ? KLI_QK_K : 8) == 0;
}

/* One weight matrix on the device: [rows][cols] of dtype (F32, F16, BF16, Q8_0, Q4 or a K
 * type; cols a multiple of 8, of 32 for Q8_0 and Q4, of 256 for the K types), rows
 * contiguous. */
struct gpu_mat {
    const void *w;
    int32_t dtype;
    int32_t rows, cols;
};

/* An MLA layer's weights on the device (the shapes of struct k_mla_w in src/model.h). */
struct gpu_mla_w {
    struct gpu_mat q_proj;   /* [H*(nope+rope)][D] */
    struct gpu_mat kv_a;     /* [L+rope][D] */
    struct gpu_mat o_proj;   /* [D][H*v] */
    const float *kv_norm;        /* [L] */
    const float *w_uk_t;         /* [H][L][nope] */
    const float *w_uv;           /* [H][v][L] */
};

/* A whole MLA layer (doc/model.md 5, the absorbed form) for T rows:
 *     q = q_proj x,  (c, k_pe) = kv_a x,  cache_t[n[t]-1] = (rmsnorm(c) * kv_norm, k_pe),
 *     qfull[h] = (W_UK[h]^T q_nope[h], q_pe[h]),  lat = attention (as gpu_mla_job),
 *     o[h] = W_UV[h] lat[h],  out = o_proj o.
 * Row t's new cache row is written into its device cache before any row attends, so rows of
 * one sequence in one job see each other causally; the new rows also come back in rows. */
struct gpu_mla_layer_job {
    int64_t T;
    int32_t D, H, L, rope, nope, dv;
    float scale, eps;
    const struct gpu_mla_w *w;
    float *const *cache;         /* [T] device caches (host array) */
    const int64_t *n;            /* [T] rows attended, the last one new, >= 1 */
    const float *x;              /* host [T][D] */
    float *out;                  /* host [T][D], written */
    float *rows;                 /* host [T][L+rope], written: the new cache rows */
};

/* A KDA layer's weights on the device (the shapes of struct k_kda_w in src/model.h). */
struct gpu_kda_w {
    struct gpu_mat q, k, v;        /* [H*K][D] */
    struct gpu_mat f_a, g_a;       /* [r_f][D], [r_g][D] */
    struct gpu_mat b;              /* [H][D] */
    struct gpu_mat f_b, g_b;       /* [H*K][r_f], [H*K][r_g] */
    struct gpu_mat o;              /* [D][H*K] */
    const float *conv;                 /* [3][H*K][W] q, k, v taps */
    const float *a_neg;                /* [H] */
    const float *dt_bias;              /* [H*K] */
    const float *o_norm;               /* [K] */
};

/* A whole KDA layer (doc/model.md 4) over n_seq sequences of T_seq rows (row s*T_seq + t
 * is token t of sequence s): projections, short convolution + SiLU with the conv state,
 * gates, normalised q and k, the delta rule token by token (the recurrence, also in
 * prefill), the gated RMSNorm and o_proj. The states are device memory and advance. */
struct gpu_kda_job {
    int32_t n_seq, T_seq, D, H, K, W;
    float eps;                         /* of the gated RMSNorm */
    const struct gpu_kda_w *w;
    float *const *S;                   /* [n_seq] device states [H][K][K] (host array) */
    float *const *conv;                /* [n_seq] device conv states [3][H*K][W-1] */
    const float *x;                    /* host [T][D] */
    float *out;                        /* host [T][D], written */
};

/* Every member returns KLI_OK or a negative status with a message in `err` (KLI_E_CUDA with
 * the runtime's own words for a device failure); none aborts. Members marked (optional)
 * may be NULL. */
struct backend_ops {
    const char *name;
    /* Opens device `device` (KLI_E_CUDA "no GPU: ..." when there is none or no driver) and
     * fills `info`. `budget` bytes (0 = the free memory less 1 GiB) bound what alloc hands
     * out. */
    int (*open)(struct k_gpu **out, int device, uint64_t budget, struct gpu_info *info,
                struct kli_err *err);
    void (*close)(struct k_gpu *g);
    /* Device memory counted against the budget (KLI_E_NOMEM beyond it). */
    int (*alloc)(struct k_gpu *g, void **out, uint64_t bytes, struct kli_err *err);
    void (*release)(struct k_gpu *g, void *p, uint64_t bytes);
    /* @return bytes allocated now, and the budget */
    uint64_t (*used)(struct k_gpu *g, uint64_t *budget);
    /* Synchronous copy host -> device (weights at load). */
    int (*upload)(struct k_gpu *g, void *dst, const void *src, uint64_t bytes,
                  struct kli_err *err);
    /* Synchronous copy device -> host (tests, diagnostics). */
    int (*download)(struct k_gpu *g, void *dst, const void *src, uint64_t bytes,
                    struct kli_err *err);
    int (*queue_create)(struct k_gpu *g, struct gpu_queue **out, struct kli_err *err);
    void (*queue_free)(struct gpu_queue *q);
    /* Host -> device in the queue's order; `src` may be reused when it returns. */
    int (*queue_upload)(struct gpu_queue *q, void *dst, const void *src, uint64_t bytes,
                        struct kli_err *err);
    /* Device -> device in the queue's order. */
    int (*queue_copy)(struct gpu_queue *q, void *dst, const void *src, uint64_t bytes,
                      struct kli_err *err);
    /* Waits until everything queued has run. */
    int (*queue_sync)(struct gpu_queue *q, struct kli_err *err);
    /* Checks that a job's shape is supported (KLI_E_UNSUPPORTED with the reason if not). */
    int (*mla_check)(struct k_gpu *g, int32_t H, int32_t L, int32_t C, struct kli_err *err);
    /* Runs the job; j->lat is written when it returns. */
    int (*mla_attend)(struct gpu_queue *q, const struct gpu_mla_job *j,
                      struct kli_err *err);
    /* Checks that the layer's weight shapes and dtypes suit mla_layer (KLI_E_UNSUPPORTED
     * with the reason if not); mla_check must accept H, L, L+rope as well. */
    int (*mla_layer_check)(struct k_gpu *g, const struct gpu_mla_w *w, int32_t D,
                           int32_t H, int32_t nope, int32_t rope, int32_t dv,
                           struct kli_err *err);
    /* Runs the whole layer; out and rows are written when it returns. */
    int (*mla_layer)(struct gpu_queue *q, const struct gpu_mla_layer_job *j,
                     struct kli_err *err);
    /* Checks a KDA layer's weights and shapes (KLI_E_UNSUPPORTED with the reason if not). */
    int (*kda_check)(struct k_gpu *g, const struct gpu_kda_w *w, int32_t D, int32_t H,
                     int32_t K, int32_t W, struct kli_err *err);
    /* Runs the whole layer; out is written and the states advanced when it returns. */
    int (*kda_layer)(struct gpu_queue *q, const struct gpu_kda_job *j,
                     struct kli_err *err);
    /* y [T][w->rows] = x [T][w->cols] W^T, host in and out (lm_head). */
    int (*matmul)(struct gpu_queue *q, const struct gpu_mat *w, const float *x,
                  int64_t T, float *y, struct kli_err *err);
    /* Starts the job and returns at once (the host arrays may be reused); moe_wait then adds
     * the result into out [T][D]. Every successful moe_launch is followed by one moe_wait. */
    int (*moe_launch)(struct gpu_queue *q, const struct gpu_moe_job *j,
                      struct kli_err *err);
    int (*moe_wait)(struct gpu_queue *q, float *out, struct kli_err *err);
};

/* The CUDA table when built with it (HAVE_CUDA), else NULL. */
const struct backend_ops *backend_cuda(void);

/* ==== The glue: the model's and the session's device state ================================== */

struct kli_model;
struct kli_session;
struct backend_model;   /* kli_model.gpu: device, budget, resident weights, hot sets */
struct backend_sess;    /* kli_session.gpu: queue and the device mirrors of its MLA caches */
struct moe_scratch;

/* Sets up the device for a model just bound (opt->gpu, gpu_mem, gpu_experts, gpu_profile).
 * With KLI_GPU_AUTO every failure leaves m->gpu describing why the CPU runs alone and
 * returns KLI_OK; with KLI_GPU_ON it is an error. */
int backend_model_open(struct kli_model *m, const struct kli_model_options *opt,
                       struct kli_err *err);
void backend_model_close(struct kli_model *m);

/* Creates the session's device state (none when the model has no device). */
int backend_sess_create(struct kli_session *s, struct kli_err *err);
void backend_sess_free(struct kli_session *s);

/* Before a forward pass over ss[0..n_seq) with T_seq new tokens each (their ids already in
 * hist): drops mirrored cache rows whose token history changed (restore, copy, rewind) and
 * fills gs[q]; in whole-model mode uploads KDA states the device lacks, or, for a pass on
 * the CPU, pulls those it leads with. @return KLI_OK when the device takes part in this
 * pass; BACKEND_CPU when not (gs untouched); negative when a session's KDA states were lost
 * (err says why). */
int backend_forward_begin(struct kli_session *const *ss, int64_t n_seq, int64_t T_seq,
                          struct backend_sess **gs, struct kli_err *err);

/* Whole-model mode (the model fits the GPU): the sessions' KDA states live on the device and
 * lead the host's copies between passes. backend_sess_pull brings the host's up to date
 * before anything reads them (snapshots, copies, forks, a pass on the CPU); on failure they
 * are lost and the session is marked broken. backend_sess_written says the host's were
 * overwritten (reset, restore, copy into), so the device's are stale. */
int backend_sess_pull(struct kli_session *s, struct kli_err *err);
void backend_sess_written(struct kli_session *s);

/* KDA layer `layer` on the device when this pass runs KDA there (backend_forward_begin):
 * @return KLI_OK when out was written; BACKEND_CPU; negative: a device failure part-way (the
 * states are lost). */
int backend_kda_layer(struct backend_sess *const *gs, int layer, int64_t n_seq,
                      int64_t T_seq, const float *x, float *out, struct kli_err *err);

/* lm_head on the device in whole-model mode: y [T][n_vocab] from x [T][d_model].
 * @return KLI_OK when done, or BACKEND_CPU. */
int backend_lm_head(struct backend_sess *const *gs, const float *x, int64_t T, float *y);

/* Attention of MLA layer `layer` on the device: mirrors the rows of caches[q] the device
 * lacks, then lat [T][H][L] from qfull [T][H][L+rope] (see mla_attend). @return KLI_OK
 * when lat was written, or BACKEND_CPU (after a device failure the session stays on the
 * CPU). */
int backend_mla_attend(struct backend_sess *const *gs, int layer, float *const *caches,
                       const int64_t *pos, int64_t n_seq, int64_t T_seq, const float *qfull,
                       float *lat);

/* The whole of MLA layer `layer` on the device, when its weights are resident there: x
 * [T][d_model] -> out, and the new rows of caches[q] (rows pos[q].. pos[q]+T_seq) written on
 * both sides. @return KLI_OK when done, or BACKEND_CPU (nothing was written that the CPU
 * path does not write again). */
int backend_mla_layer(struct backend_sess *const *gs, int layer, float *const *caches,
                      const int64_t *pos, int64_t n_seq, int64_t T_seq, const float *x,
                      float *out);

/* MoE layer `layer` with the routing in sc (idx, wt, order, count) for T rows of x: counts
 * the routing, launches the shared expert and the resident routed experts on the device and
 * returns; backend_moe_hot then tells the CPU which experts to skip, and backend_moe_wait
 * adds the device's share into out. @return KLI_OK when launched; then backend_moe_wait must
 * follow. BACKEND_CPU from either: the CPU computes everything (wait's out is untouched).
 * The hot set holds still from a launch to its wait. */
int backend_moe_launch(struct backend_sess *g, int layer, const struct moe_scratch *sc,
                       const float *x, int64_t T);
/* @return 1 when expert e of `layer` is resident on the device, else 0 (a question, not a
 * job: between a launch and its wait, the experts the device computes). */
int backend_moe_hot(const struct backend_sess *g, int layer, int32_t e);
int backend_moe_wait(struct backend_sess *g, int layer, float *out);

#ifdef __cplusplus
}
#endif

#endif
