/*
 * dispatch.c - picks the kernel table once per process.
 *
 * The best variant the CPU (and OS) supports wins; KLI_SIMD=generic|avx2|avx512|avx512vnni|
 * amx|neon|neondot forces one, which is how tests and benchmarks compare variants. A forced
 * variant that is not compiled in or not supported falls back to the best available one.
 */
#include "config.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

static const struct k_kernels *dispatch_table;
static pthread_once_t dispatch_once = PTHREAD_ONCE_INIT;

int
kernels_all(const struct k_kernels **out, int cap)
{
    const struct k_kernels *(*get[])(void) = {
        kernels_generic, kernels_neon, kernels_neondot, kernels_avx2,
        kernels_avx512, kernels_avx512vnni, kernels_amx,
    };
    int n = 0;

    for (size_t i = 0; i < sizeof(get) / sizeof(get[0]) && n < cap; i++) {
        const struct k_kernels *k = get[i]();
        if (k != NULL)
            out[n++] = k;
    }
    return n;
}

/* The chosen table with any entry a variant leaves NULL taken from generic.c, so a new
 * kernel can land in generic.c first and in the ISA files later. */
static struct k_kernels dispatch_merged;

static void
dispatch_init(void)
{
    const struct k_kernels *all[8], *gen = kernels_generic();
    int n = kernels_all(all, 8);
    const char *want = getenv("KLI_SIMD");
    const struct k_kernels *pick = all[n - 1];

    if (want != NULL && *want != '\0') {
        for (int i = 0; i < n; i++) {
            if (strcmp(all[i]->name, want) == 0)
                pick = all[i];
        }
    }
    dispatch_merged = *pick;
#define DISPATCH_FILL(entry)                                                                  \
    do {                                                                                      \
        if (dispatch_merged.entry == NULL)                                                    \
            dispatch_merged.entry = gen->entry;                                               \
    } while (0)
    for (int d = 0; d < KLI_DT_COUNT; d++)
        DISPATCH_FILL(matmul[d]);
    DISPATCH_FILL(dot);
    DISPATCH_FILL(dot_decay);
    DISPATCH_FILL(mul_decay);
    DISPATCH_FILL(gemm_nn);
    DISPATCH_FILL(silu);
    DISPATCH_FILL(axpy);
    DISPATCH_FILL(scale);
    DISPATCH_FILL(to_f32);
#undef DISPATCH_FILL
    dispatch_table = &dispatch_merged;
}

const struct k_kernels *
k_kernels(void)
{
    pthread_once(&dispatch_once, dispatch_init);
    return dispatch_table;
}

#ifndef KLI_BUILD_AVX2
const struct k_kernels *kernels_avx2(void) { return NULL; }
#endif
#ifndef KLI_BUILD_AVX512
const struct k_kernels *kernels_avx512(void) { return NULL; }
#endif
#ifndef KLI_BUILD_AVX512VNNI
const struct k_kernels *kernels_avx512vnni(void) { return NULL; }
#endif
#ifndef KLI_BUILD_AMX
const struct k_kernels *kernels_amx(void) { return NULL; }
#endif
#ifndef KLI_BUILD_NEON
const struct k_kernels *kernels_neon(void) { return NULL; }
const struct k_kernels *kernels_neondot(void) { return NULL; }
#endif
