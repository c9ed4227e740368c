/*
 * kli_cuda.h - the CUDA backend's C ABI: the one header of cuda/ that src/ includes.
 *
 * Plain C, no CUDA types: the backend is reached only through the vtable of src/backend.h
 * (struct backend_ops), whose contracts hold here. Built and linked only when configure
 * finds nvcc (HAVE_CUDA); a build without CUDA never sees this file.
 *
 * Files: common.cuh (error mapping, launch checks), backend.cu (device, memory, queues),
 * mla.cu (latent attention and whole MLA layers), kda.cu (whole KDA layers), moe.cu
 * (SwiGLU experts), gemm.cu (the prefill products through cuBLAS, on tensor cores).
 */
#ifndef KLI_CUDA_H
#define KLI_CUDA_H

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* @return the CUDA implementation of the backend vtable (never NULL; whether a device is
 * there is decided by its open member, which says why not). */
const struct backend_ops *cuda_backend(void);

#ifdef __cplusplus
}
#endif

#endif
