/*
 * dtype.h - element types of stored tensors and the reference conversions between them.
 *
 * Checklist: a new dtype needs an entry here, a row in dtype.c's table, a reader mapping in
 * safetensors.c, and matmul kernels in simd/ (generic first); on the GPU, a decoder in
 * cuda/common.cuh (cu_w8, cu_dtype_switch) and gpu_dtype_ok in src/backend.h, without which
 * the device declines it and the CPU computes it. The codes are stored in .kli files
 * (kli-pack(5)): a new type takes the next code, existing codes never change.
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
    /* Super-blocks of 256 (KLI_QK_K) weights, bit for bit GGUF's layouts of the same names
     * (kquant.c, kli-weights(5)): sub-block scales quantized against an f16 d (and dmin). */
    KLI_DT_Q2_K = 6,    /* 84 bytes: 16 x (4-bit scale, 4-bit min), 2-bit q, d, dmin */
    KLI_DT_Q3_K = 7,    /* 110 bytes: high-bit mask, 2-bit q, 16 6-bit scales, d */
    KLI_DT_Q4_K = 8,    /* 144 bytes: d, dmin, 8 x (6-bit scale, 6-bit min), 4-bit q */
    KLI_DT_Q5_K = 9,    /* 176 bytes: as Q4_K plus a fifth bit per weight */
    KLI_DT_Q6_K = 10,   /* 210 bytes: 4 + 2-bit q, 16 int8 scales, d */
    KLI_DT_COUNT
};

#define KLI_QK_K 256    /* elements per super-block of the K types */

/* Whether dt is one of the super-block types Q2_K .. Q6_K. */
static inline int
dtype_is_k(enum k_dtype dt)
{
    return dt >= KLI_DT_Q2_K && dt <= KLI_DT_Q6_K;
}

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

/* Converts `n` float elements (whole blocks) to dtype dt. The reference quantizers:
 * Q8_0 and Q4 round to nearest with blocks scaled by their largest magnitude; the K types
 * search their scales (and minimums) for the least squared error (kquant.c). Deterministic.
 * Non-finite inputs are the caller's to refuse (quantize.c does); here they count as zero
 * in the K types. Equals dtype_from_f32_w(dt, src, dst, n, NULL). */
void dtype_from_f32(enum k_dtype dt, const float *src, void *dst, int64_t n);

/* The same, minimising the error weighted by imp[j] >= 0 for element j (an importance, say
 * the mean squared activation of input column j): call it one row at a time, n the row
 * length (whole blocks) and imp its n weights. imp == NULL is uniform and gives exactly
 * dtype_from_f32's bytes. Negative or non-finite weights count as zero; a block or
 * sub-block whose weights are all zero is fitted as if uniform. Float types ignore imp. */
void dtype_from_f32_w(enum k_dtype dt, const float *src, void *dst, int64_t n,
                      const float *imp);

/* The K types' halves of dtype_to_f32 and dtype_from_f32_w (kquant.c): `nb` super-blocks. */
void kq_to_f32(enum k_dtype dt, const uint8_t *src, float *dst, int64_t nb);
void kq_from_f32(enum k_dtype dt, const float *src, uint8_t *dst, int64_t nb,
                 const float *imp);

/*
 * Error feedback over a row (GPTQ's rounding, Frantar et al. 2022): with H = E[x x^T] the
 * input's second moments (k x k), the output error of a row is e^T H e, which the per-column
 * weights of dtype_from_f32_w see only through diag(H). kq_hinv_factor writes the upper
 * triangular u (k x k, row-major) with u^T u = (H + damp * mean(diag H) * I)^-1, in double,
 * from the upper triangle of h; @return 0, or -1 when H is not positive definite (after the
 * damping). kq_from_f32_h quantizes one row of nb super-blocks (k = 256 nb): each block's
 * scales are searched as kq_from_f32's with imp (k weights, diag(H) say), on the row as
 * corrected so far; its weights are then rounded in order to the nearest level of those
 * scales, each rounding error spread over the later columns through u, so that later
 * columns make up for it where the inputs are correlated. Other scales are then tried (a
 * search with GPTQ's own column weights 1/u_jj^2, and searches on the values the best
 * rounding so far ended with), and the block keeps those whose rounding leaves the least
 * sum of (error_j / u_jj)^2, the block's part of e^T H e. tmp: k floats of scratch. A
 * diagonal H (u diagonal) gives kq_from_f32's bytes. kq_from_f32_hp: the same with
 * `passes` of the search (kq_from_f32_h: 4; 0: the first scales alone), for tests.
 */
int kq_hinv_factor(const double *h, int64_t k, double damp, float *u);
void kq_from_f32_h(enum k_dtype dt, const float *src, uint8_t *dst, int64_t nb,
                   const float *imp, const float *u, float *tmp);
void kq_from_f32_hp(enum k_dtype dt, const float *src, uint8_t *dst, int64_t nb,
                    const float *imp, const float *u, float *tmp, int passes);

/* The dtype a matrix with rows of `cols` elements is written in when dt is asked for: dt
 * when the rows are whole blocks of it; for a K type whose rows are not whole super-blocks
 * but whole 32-blocks, KLI_DT_K_FALLBACK; else KLI_DT_COUNT (no block type fits: the caller
 * keeps the stored dtype). */
enum k_dtype dtype_fit(enum k_dtype dt, int64_t cols);

/* What a K type falls back to on rows it cannot hold (kli(1), QUANTIZATION): Q8_0, which on
 * the nano model's 64-column expert matrices kept the logits closer to f32 than Q4 did
 * (doc/formats.md 2.4). */
#define KLI_DT_K_FALLBACK KLI_DT_Q8_0

/* Short names for messages: every type dtype_parse accepts. */
#define KLI_DTYPE_NAMES "f32, f16, bf16, q8_0, q4, q2_k, q3_k, q4_k, q5_k, q6_k"

/* "f32", "f16", "bf16", "q8_0", "q4", "q2_k" .. "q6_k" (any case) to a dtype.
 * @return 0 or -1. */
int dtype_parse(const char *s, enum k_dtype *out);

/* The dtype's name in a safetensors header ("BF16", "KLI_Q8_0", "KLI_Q4_K", ...). */
const char *dtype_st_name(enum k_dtype dt);

/* Converts `n` elements of `src` (dtype dt, whole blocks) to float. */
void dtype_to_f32(enum k_dtype dt, const void *src, float *dst, int64_t n);

#endif
