/*
 * backend.cu - the CUDA device: opening it (or saying why not), the memory budget, weight
 * uploads, and queues (a stream with its workspace and pinned staging, one per session).
 *
 * Memory is taken with plain cudaMalloc, never managed memory, and every byte handed out is
 * counted against the budget the caller gave (--gpu-mem), so that kli shares a card
 * predictably with whatever else runs on it.
 */
#include <stdlib.h>
#include <string.h>

#include "common.cuh"

static int
cu_open(struct k_gpu **out, int device, uint64_t budget, struct gpu_info *info,
        struct kli_err *err)
{
    struct cudaDeviceProp p;
    size_t fr = 0, tot = 0;
    int n = 0, optin = 0;
    cudaError_t e;

    *out = NULL;
    /* No driver, no device, a driver older than the runtime: all land here. */
    if ((e = cudaGetDeviceCount(&n)) != cudaSuccess) {
        (void)cudaGetLastError();
        return err_set(err, KLI_E_CUDA, "no GPU: %s", cudaGetErrorString(e));
    }
    if (n == 0)
        return err_set(err, KLI_E_CUDA, "no GPU: no CUDA device is visible");
    if (device < 0 || device >= n)
        return err_set(err, KLI_E_CUDA, "no GPU: device %d requested, %d visible", device, n);
    if (cu_check(cudaSetDevice(device), err, "cudaSetDevice") != KLI_OK ||
        cu_check(cudaGetDeviceProperties(&p, device), err, "cudaGetDeviceProperties") != KLI_OK ||
        cu_check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        device), err, "cudaDeviceGetAttribute") != KLI_OK ||
        cu_check(cudaMemGetInfo(&fr, &tot), err, "cudaMemGetInfo") != KLI_OK)
        return KLI_E_CUDA;
    struct k_gpu *g = (struct k_gpu *)calloc(1, sizeof(*g));
    if (g == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    snprintf(g->info.name, sizeof(g->info.name), "%.127s", p.name);
    g->info.device = device;
    g->info.n_sm = p.multiProcessorCount;
    g->info.cc_major = p.major;
    g->info.cc_minor = p.minor;
    g->info.mem_total = tot;
    g->info.mem_free = fr;
    g->info.smem_block = (uint64_t)optin;
    g->budget = budget > 0 ? budget : fr > (1ull << 30) ? (uint64_t)fr - (1ull << 30) : 0;
    pthread_mutex_init(&g->lock, NULL);
    *info = g->info;
    *out = g;
    return KLI_OK;
}

static void
cu_close(struct k_gpu *g)
{
    if (g == NULL)
        return;
    pthread_mutex_destroy(&g->lock);
    free(g);
}

static int
cu_alloc(struct k_gpu *g, void **out, uint64_t bytes, struct kli_err *err)
{
    int over;

    *out = NULL;
    pthread_mutex_lock(&g->lock);
    over = g->used + bytes > g->budget;
    if (!over)
        g->used += bytes;
    pthread_mutex_unlock(&g->lock);
    if (over)
        return err_set(err, KLI_E_NOMEM, "GPU: %.1f MiB more would exceed the budget of "
                       "%.1f MiB", (double)bytes / 1048576.0, (double)g->budget / 1048576.0);
    cudaError_t e = cudaSetDevice(g->info.device);
    if (e == cudaSuccess)
        e = cudaMalloc(out, bytes > 0 ? bytes : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        *out = NULL;
        pthread_mutex_lock(&g->lock);
        g->used -= bytes;
        pthread_mutex_unlock(&g->lock);
        /* out of device memory is a budget matter (the caller falls back), not a fault */
        return err_set(err, e == cudaErrorMemoryAllocation ? KLI_E_NOMEM : KLI_E_CUDA,
                       "CUDA: cudaMalloc of %.1f MiB: %s", (double)bytes / 1048576.0,
                       cudaGetErrorString(e));
    }
    return KLI_OK;
}

static void
cu_release(struct k_gpu *g, void *p, uint64_t bytes)
{
    if (p == NULL)
        return;
    (void)cudaSetDevice(g->info.device);   /* the mover thread frees too */
    (void)cudaFree(p);
    pthread_mutex_lock(&g->lock);
    g->used -= bytes;
    pthread_mutex_unlock(&g->lock);
}

static uint64_t
cu_used(struct k_gpu *g, uint64_t *budget)
{
    pthread_mutex_lock(&g->lock);
    uint64_t u = g->used;
    pthread_mutex_unlock(&g->lock);
    if (budget != NULL)
        *budget = g->budget;
    return u;
}

/* A synchronous copy between host and device; any thread may call this (the hot-set mover
 * has its own): the device first. */
static int
cu_copy(struct k_gpu *g, void *dst, const void *src, uint64_t bytes, cudaMemcpyKind kind,
        const char *what, struct kli_err *err)
{
    int rc;

    if ((rc = cu_check(cudaSetDevice(g->info.device), err, "cudaSetDevice")) != KLI_OK)
        return rc;
    return cu_check(cudaMemcpy(dst, src, bytes, kind), err, what);
}

static int
cu_upload(struct k_gpu *g, void *dst, const void *src, uint64_t bytes, struct kli_err *err)
{
    return cu_copy(g, dst, src, bytes, cudaMemcpyHostToDevice, "cudaMemcpy (upload)", err);
}

static int
cu_download(struct k_gpu *g, void *dst, const void *src, uint64_t bytes, struct kli_err *err)
{
    return cu_copy(g, dst, src, bytes, cudaMemcpyDeviceToHost, "cudaMemcpy (download)", err);
}

static void
cu_queue_free(struct gpu_queue *q)
{
    if (q == NULL)
        return;
    (void)cudaStreamSynchronize(q->st);
    cu_gemm_free(q);
    cu_release(q->g, q->gws, q->gws_bytes);
    cu_release(q->g, q->ws, q->ws_bytes);
    if (q->pin != NULL)
        (void)cudaFreeHost(q->pin);
    (void)cudaStreamDestroy(q->st);
    free(q);
}

static int
cu_queue_create(struct k_gpu *g, struct gpu_queue **out, struct kli_err *err)
{
    struct gpu_queue *q = (struct gpu_queue *)calloc(1, sizeof(*q));

    *out = NULL;
    if (q == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    q->g = g;
    if (cu_check(cudaSetDevice(g->info.device), err, "cudaSetDevice") != KLI_OK ||
        cu_check(cudaStreamCreateWithFlags(&q->st, cudaStreamNonBlocking), err,
                 "cudaStreamCreate") != KLI_OK) {
        free(q);
        return KLI_E_CUDA;
    }
    *out = q;
    return KLI_OK;
}

int
cu_queue_grow(struct gpu_queue *q, void **buf, uint64_t *have, uint64_t bytes,
              struct kli_err *err)
{
    if (bytes <= *have)
        return KLI_OK;
    uint64_t want = bytes > 2 * *have ? bytes : 2 * *have;
    void *p = NULL;
    if (cu_check(cudaStreamSynchronize(q->st), err, "cudaStreamSynchronize") != KLI_OK)
        return KLI_E_CUDA;
    cu_release(q->g, *buf, *have);
    *buf = NULL;
    *have = 0;
    /* The doubling is a wish: settle for the exact size near the budget's end. */
    if (cu_alloc(q->g, &p, want, NULL) != KLI_OK) {
        int rc;
        want = bytes;
        if ((rc = cu_alloc(q->g, &p, want, err)) != KLI_OK)
            return rc;
    }
    *buf = p;
    *have = want;
    return KLI_OK;
}

int
cu_queue_reserve(struct gpu_queue *q, uint64_t bytes, uint64_t pin_bytes,
                 struct kli_err *err)
{
    int rc;

    if ((rc = cu_queue_grow(q, &q->ws, &q->ws_bytes, bytes, err)) != KLI_OK)
        return rc;
    if (pin_bytes > q->pin_bytes) {
        uint64_t want = pin_bytes > 2 * q->pin_bytes ? pin_bytes : 2 * q->pin_bytes;
        if (cu_check(cudaStreamSynchronize(q->st), err, "cudaStreamSynchronize") != KLI_OK)
            return KLI_E_CUDA;
        if (q->pin != NULL)
            (void)cudaFreeHost(q->pin);
        q->pin = NULL;
        q->pin_bytes = 0;
        if (cu_check(cudaMallocHost(&q->pin, want), err, "cudaMallocHost") != KLI_OK) {
            q->pin = NULL;
            return KLI_E_CUDA;
        }
        q->pin_bytes = want;
    }
    return KLI_OK;
}

static int
cu_queue_upload(struct gpu_queue *q, void *dst, const void *src, uint64_t bytes,
                struct kli_err *err)
{
    /* From pageable memory the copy is staged before the call returns, so src is free. */
    return cu_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, q->st), err,
                    "cudaMemcpyAsync (host to device)");
}

static int
cu_queue_copy(struct gpu_queue *q, void *dst, const void *src, uint64_t bytes,
              struct kli_err *err)
{
    return cu_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, q->st), err,
                    "cudaMemcpyAsync (device to device)");
}

static int
cu_queue_sync(struct gpu_queue *q, struct kli_err *err)
{
    return cu_check(cudaStreamSynchronize(q->st), err, "cudaStreamSynchronize");
}

static const struct backend_ops cu_ops = {
    "cuda",
    cu_open,
    cu_close,
    cu_alloc,
    cu_release,
    cu_used,
    cu_upload,
    cu_download,
    cu_queue_create,
    cu_queue_free,
    cu_queue_upload,
    cu_queue_copy,
    cu_queue_sync,
    cu_mla_check,
    cu_mla_attend,
    cu_mla_layer_check,
    cu_mla_layer,
    cu_kda_check,
    cu_kda_layer,
    cu_matmul,
    cu_moe_launch,
    cu_moe_wait,
};

extern "C" const struct backend_ops *
cuda_backend(void)
{
    return &cu_ops;
}
