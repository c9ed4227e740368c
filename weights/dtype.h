/*
 * dtype.h - element types of stored tensors and the reference conversions between them.
 *
 * Checklist: a new dtype needs an entry here, a row in dtype.c's table, a reader mapping in
 * safetensors.c, and matmul kernels in simd/ (generic first).
 */
#ifndef KLI_DTYPE_H
#define KLI_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum k_dtype {
    KLI_DT_F32 = 0,
    KLI_DT_F16 = 1,
    KLI_DT_BF16 = 2,
    KLI_DT_Q8_0 = 3,    /* blocks of 32: f16 scale + 32 x int8 (34 bytes) */
    KLI_DT_Q4 = 4,      /* blocks of 32: f16 scale + 16 bytes of nibbles (18); dtype.c */
    KLI_DT_OTHER = 5,   /* a valid safetensors dtype kli cannot compute with (I8, F64, ...) */
    KLI_DT_COUNT
};

struct dtype_info {
    const char *name;     /* "F32", "BF16", ... */
    int32_t block;        /* elements per block (1 for plain types) */
    int32_t block_bytes;  /* bytes per block */
};

const struct dtype_info *dtype_info(enum k_dtype dt);
const char *k_dtype_name(enum k_dtype dt);

/* Bytes for `n` elements, or UINT64_MAX if n is not a multiple of the block size. */
uint64_t dtype_nbytes(enum k_dtype dt, uint64_t n);

static inline float
bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;

    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even; NaN stays NaN. */
static inline uint16_t
f32_to_bf16(float f)
{
    uint32_t u;

    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

/* Converts `n` float elements (whole blocks) to dtype dt (round to nearest; blocks scaled by
 * their largest magnitude). The reference quantizers. */
void dtype_from_f32(enum k_dtype dt, const float *src, void *dst, int64_t n);

/* The same, minimising the error weighted by imp[j] >= 0 for element j (the mean squared
 * activation of input column j): one row at a time, n the row length (whole blocks) and imp
 * its n weights. imp == NULL gives exactly dtype_from_f32's bytes. (Until the weighted
 * quantizers land this ignores imp.) */
void dtype_from_f32_w(enum k_dtype dt, const float *src, void *dst, int64_t n,
                      const float *imp);

/* "f32", "f16", "bf16", "q8_0", "q4" (any case) to a dtype. @return 0 or -1. */
int dtype_parse(const char *s, enum k_dtype *out);

/* The dtype's name in a safetensors header ("BF16", "KLI_Q8_0", ...). */
const char *dtype_st_name(enum k_dtype dt);

/* Converts `n` elements of `src` (dtype dt, whole blocks) to float. */
void dtype_to_f32(enum k_dtype dt, const void *src, float *dst, int64_t n);

#endif
