/*
 * common.cuh - what the CUDA files share: the device and queue structures behind the opaque
 * handles of src/backend.h, and the mapping of CUDA errors onto kli's (struct kli_err,
 * KLI_E_CUDA with cudaGetErrorString's text). Nothing here aborts: every runtime call's status
 * goes through cu_check, and every launch through cu_launched.
 */
#ifndef KLI_CUDA_COMMON_CUH
#define KLI_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#include "kli_cuda.h"

struct kli_gpu {
    struct kli_gpu_info info;
    uint64_t budget;          /* bytes alloc may hand out in all */
    uint64_t used;            /* bytes handed out now (weights, mirrors, workspaces) */
    pthread_mutex_t lock;     /* guards used: sessions of one model run on many threads */
};

/* One stream and the memory its operations stage through. Operations on one queue run in
 * order; each synchronous one (mla_attend, moe_wait) ends with the stream idle, so the
 * workspace and the pinned buffer are free again between calls. */
struct kli_gpu_queue {
    struct kli_gpu *g;
    cudaStream_t st;
    void *ws;                 /* device workspace, grown on demand */
    uint64_t ws_bytes;
    void *pin;                /* pinned host staging, grown on demand */
    uint64_t pin_bytes;
    /* the MoE job between moe_launch and moe_wait */
    int64_t moe_n;            /* floats of its result, 0 when none is pending */
    const float *moe_res;     /* its result in pin */
};

/* Sets err as kli_err_set does (the first error wins). @return code. */
static inline int
cu_fail(struct kli_err *err, int code, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || err->code != 0)
        return code;
    err->code = code;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    return code;
}

/* @return KLI_OK, or KLI_E_CUDA naming `what` and the runtime's message. */
static inline int
cu_check(cudaError_t e, struct kli_err *err, const char *what)
{
    if (e == cudaSuccess)
        return KLI_OK;
    return cu_fail(err, KLI_E_CUDA, "CUDA: %s: %s", what, cudaGetErrorString(e));
}

/* The status of the kernel launch just made (bad configuration, no image for this GPU). */
static inline int
cu_launched(struct kli_err *err, const char *kernel)
{
    return cu_check(cudaGetLastError(), err, kernel);
}

/* Rounds n up to a multiple of 256 (the alignment cudaMalloc gives), for carving one
 * workspace into several arrays. */
static inline uint64_t
cu_align(uint64_t n)
{
    return (n + 255) & ~(uint64_t)255;
}

/* Makes q->ws hold at least `bytes` (and q->pin at least `pin_bytes`): both grow
 * geometrically, counted against the budget. */
int cu_queue_reserve(struct kli_gpu_queue *q, uint64_t bytes, uint64_t pin_bytes,
                     struct kli_err *err);

/* The blocks (mla.cu, moe.cu), behind the vtable entries of the same names. */
int cu_mla_check(struct kli_gpu *g, int32_t H, int32_t L, int32_t C, struct kli_err *err);
int cu_mla_attend(struct kli_gpu_queue *q, const struct kli_gpu_mla_job *j,
                  struct kli_err *err);
int cu_moe_launch(struct kli_gpu_queue *q, const struct kli_gpu_moe_job *j,
                  struct kli_err *err);
int cu_moe_wait(struct kli_gpu_queue *q, float *out, struct kli_err *err);

#endif
