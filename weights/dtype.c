/*
 * dtype.c - the dtype table and reference (scalar) conversions to float.
 */
#include "config.h"

#include <math.h>
#include <strings.h>

#include "dtype.h"

static const struct dtype_info dtype_table[KLI_DT_COUNT] = {
    [KLI_DT_F32] = {"F32", 1, 4},
    [KLI_DT_F16] = {"F16", 1, 2},
    [KLI_DT_BF16] = {"BF16", 1, 2},
    [KLI_DT_Q8_0] = {"Q8_0", 32, 34},
    [KLI_DT_Q4] = {"Q4", 32, 18},
    [KLI_DT_OTHER] = {"OTHER", 1, 1},
    [KLI_DT_Q2_K] = {"Q2_K", KLI_QK_K, 84},
    [KLI_DT_Q3_K] = {"Q3_K", KLI_QK_K, 110},
    [KLI_DT_Q4_K] = {"Q4_K", KLI_QK_K, 144},
    [KLI_DT_Q5_K] = {"Q5_K", KLI_QK_K, 176},
    [KLI_DT_Q6_K] = {"Q6_K", KLI_QK_K, 210},
};

const struct dtype_info *
dtype_info(enum k_dtype dt)
{
    if ((int)dt < 0 || dt >= KLI_DT_COUNT)
        return &dtype_table[KLI_DT_OTHER];
    return &dtype_table[dt];
}

const char *
k_dtype_name(enum k_dtype dt)
{
    return dtype_info(dt)->name;
}

uint64_t
dtype_nbytes(enum k_dtype dt, uint64_t n)
{
    const struct dtype_info *in = dtype_info(dt);

    if (n % (uint64_t)in->block != 0)
        return UINT64_MAX;
    return n / (uint64_t)in->block * (uint64_t)in->block_bytes;
}

/* IEEE binary16 to binary32, subnormals included. */
float
f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    float f;

    if (exp == 0) {
        f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    if (exp == 31)
        u = sign | 0x7f800000u | (man << 13);
    else
        u = sign | ((exp + 112) << 23) | (man << 13);
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, with overflow to infinity and gradual underflow. */
uint16_t
f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;

    if (a > 0x7f800000u)
        return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u)   /* rounds to >= 65520: infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) {  /* below the smallest normal half: subnormal or zero */
        float af;
        memcpy(&af, &a, 4);
        float q = af * 16777216.0f;   /* in units of 2^-24 */
        uint32_t r = (uint32_t)nearbyintf(q);
        return (uint16_t)(sign | r);
    }
    uint32_t e = ((a >> 23) - 112) << 10;
    uint32_t m = (a >> 13) & 0x3ffu;
    uint32_t rest = a & 0x1fffu;
    uint32_t h = e | m;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
        h++;
    return (uint16_t)(sign | h);
}

/* F16 and BF16 rows differ only in the element conversion. */
static void
dtype_u16_to_f32(const uint8_t *p, float *dst, int64_t n, float (*to_f32)(uint16_t))
{
    for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        dst[i] = to_f32(h);
    }
}

static void
dtype_f32_to_u16(const float *src, uint8_t *p, int64_t n, uint16_t (*from_f32)(float))
{
    for (int64_t i = 0; i < n; i++) {
        uint16_t h = from_f32(src[i]);
        memcpy(p + 2 * i, &h, 2);
    }
}

void
dtype_to_f32(enum k_dtype dt, const void *src, float *dst, int64_t n)
{
    const uint8_t *p = src;

    switch (dt) {
    case KLI_DT_F32:
        memcpy(dst, src, (size_t)n * 4);
        break;
    case KLI_DT_F16:
        dtype_u16_to_f32(p, dst, n, f16_to_f32);
        break;
    case KLI_DT_BF16:
        dtype_u16_to_f32(p, dst, n, bf16_to_f32);
        break;
    case KLI_DT_Q8_0:
        /* block: f16 d; int8 q[32]; value = q * d */
        for (int64_t b = 0; b < n / 32; b++, p += 34) {
            uint16_t h;
            memcpy(&h, p, 2);
            float d = f16_to_f32(h);
            for (int j = 0; j < 32; j++)
                dst[b * 32 + j] = (float)(int8_t)p[2 + j] * d;
        }
        break;
    case KLI_DT_Q4:
        /* block: f16 d; u8 q[16]; element j (< 16) is the low nibble of q[j], element
         * j + 16 the high nibble; value = (nibble - 8) * d */
        for (int64_t b = 0; b < n / 32; b++, p += 18) {
            uint16_t h;
            memcpy(&h, p, 2);
            float d = f16_to_f32(h);
            for (int j = 0; j < 16; j++) {
                dst[b * 32 + j] = (float)((int)(p[2 + j] & 0xf) - 8) * d;
                dst[b * 32 + j + 16] = (float)((int)(p[2 + j] >> 4) - 8) * d;
            }
        }
        break;
    case KLI_DT_Q2_K: case KLI_DT_Q3_K: case KLI_DT_Q4_K: case KLI_DT_Q5_K: case KLI_DT_Q6_K:
        kq_to_f32(dt, p, dst, n / KLI_QK_K);
        break;
    default:
        for (int64_t i = 0; i < n; i++)
            dst[i] = NAN;
        break;
    }
}

/* Q8_0 block: d = max|x| / 127, q = round(x / d). */
static void
dtype_quant_q8_0(const float *x, uint8_t *out)
{
    float amax = 0.0f;

    for (int j = 0; j < 32; j++)
        amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    /* The inverse comes from the scale as stored (f16), so rounding is against it. */
    uint16_t h = f32_to_f16(amax / 127.0f);
    float d = f16_to_f32(h), id = d > 0.0f ? 1.0f / d : 0.0f;
    memcpy(out, &h, 2);
    for (int j = 0; j < 32; j++) {
        float v = nearbyintf(x[j] * id);
        out[2 + j] = (uint8_t)(int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
    }
}

/* Q4 block: the value of largest magnitude m maps to -8, so d = m / -8 and the 16 levels
 * (q - 8) * d cover [-8d, 7d] with the extreme exactly representable. */
static void
dtype_quant_q4(const float *x, uint8_t *out)
{
    float m = 0.0f;

    for (int j = 0; j < 32; j++)
        m = fabsf(x[j]) > fabsf(m) ? x[j] : m;
    uint16_t h = f32_to_f16(m / -8.0f);
    float d = f16_to_f32(h), id = d != 0.0f ? 1.0f / d : 0.0f;
    memcpy(out, &h, 2);
    for (int j = 0; j < 16; j++) {
        int lo = (int)floorf(x[j] * id + 8.5f), hi = (int)floorf(x[j + 16] * id + 8.5f);
        lo = lo < 0 ? 0 : lo > 15 ? 15 : lo;
        hi = hi < 0 ? 0 : hi > 15 ? 15 : hi;
        out[2 + j] = (uint8_t)(lo | (hi << 4));
    }
}

/* Weighted squared error of a 32-element block decoded as level(x / d) * d, where level
 * rounds and clamps to [lo, hi] (Q8_0: -127..127; Q4: -8..7). */
static double
dtype_block_err(const float *x, const float *w, float d, int lo, int hi)
{
    double e = 0.0;

    for (int j = 0; j < 32; j++) {
        float v = d != 0.0f ? nearbyintf(x[j] / d) : 0.0f;
        v = v < (float)lo ? (float)lo : v > (float)hi ? (float)hi : v;
        double r = (double)(v * d) - (double)x[j];
        e += (double)w[j] * r * r;
    }
    return e;
}

/* The weighted Q8_0 and Q4 blocks: the scale of the plain quantizer and smaller ones (a
 * clipped extreme buys finer steps for the rest) compete on the weighted error; the plain
 * block is kept on ties, so uniform weights change nothing unless the error drops. */
static void
dtype_quant_w(enum k_dtype dt, const float *x, const float *imp, uint8_t *out)
{
    float w[32], xs[32];
    int lo = dt == KLI_DT_Q8_0 ? -127 : -8, hi = dt == KLI_DT_Q8_0 ? 127 : 7;
    size_t bb = dt == KLI_DT_Q8_0 ? 34 : 18;
    uint8_t best[34];
    double sw = 0.0;

    for (int j = 0; j < 32; j++) {
        w[j] = imp[j] >= 0.0f && isfinite(imp[j]) ? imp[j] : 0.0f;
        xs[j] = isfinite(x[j]) ? x[j] : 0.0f;
        sw += w[j];
    }
    if (dt == KLI_DT_Q8_0)
        dtype_quant_q8_0(x, best);
    else
        dtype_quant_q4(x, best);
    if (sw <= 0.0) {
        memcpy(out, best, bb);
        return;
    }
    uint16_t h;
    memcpy(&h, best, 2);
    float d0 = f16_to_f32(h), dbest = d0;
    double ebest = dtype_block_err(xs, w, d0, lo, hi);
    for (int t = 1; t <= 16; t++) {
        float d = f16_to_f32(f32_to_f16(d0 * (1.0f - 0.02f * (float)t)));
        double e = dtype_block_err(xs, w, d, lo, hi);
        if (e < ebest) {
            ebest = e;
            dbest = d;
        }
    }
    if (dbest == d0) {
        memcpy(out, best, bb);
        return;
    }
    h = f32_to_f16(dbest);
    memcpy(out, &h, 2);
    for (int j = 0; j < 32; j++) {
        float v = nearbyintf(xs[j] / dbest);
        int q = (int)(v < (float)lo ? (float)lo : v > (float)hi ? (float)hi : v);
        if (dt == KLI_DT_Q8_0)
            out[2 + j] = (uint8_t)(int8_t)q;
        else if (j < 16)
            out[2 + j] = (uint8_t)(q + 8);
        else
            out[2 + j - 16] |= (uint8_t)((q + 8) << 4);
    }
}

void
dtype_from_f32(enum k_dtype dt, const float *src, void *dst, int64_t n)
{
    dtype_from_f32_w(dt, src, dst, n, NULL);
}

void
dtype_from_f32_w(enum k_dtype dt, const float *src, void *dst, int64_t n, const float *imp)
{
    uint8_t *p = dst;

    if (imp != NULL && (dt == KLI_DT_Q8_0 || dt == KLI_DT_Q4)) {
        size_t bb = dt == KLI_DT_Q8_0 ? 34 : 18;
        for (int64_t b = 0; b < n / 32; b++)
            dtype_quant_w(dt, src + 32 * b, imp + 32 * b, p + bb * (size_t)b);
        return;
    }

    switch (dt) {
    case KLI_DT_F32:
        memcpy(dst, src, (size_t)n * 4);
        break;
    case KLI_DT_F16:
        dtype_f32_to_u16(src, p, n, f32_to_f16);
        break;
    case KLI_DT_BF16:
        dtype_f32_to_u16(src, p, n, f32_to_bf16);
        break;
    case KLI_DT_Q8_0:
        for (int64_t b = 0; b < n / 32; b++)
            dtype_quant_q8_0(src + 32 * b, p + 34 * b);
        break;
    case KLI_DT_Q4:
        for (int64_t b = 0; b < n / 32; b++)
            dtype_quant_q4(src + 32 * b, p + 18 * b);
        break;
    case KLI_DT_Q2_K: case KLI_DT_Q3_K: case KLI_DT_Q4_K: case KLI_DT_Q5_K: case KLI_DT_Q6_K:
        kq_from_f32(dt, src, p, n / KLI_QK_K, imp);
        break;
    default:
        break;
    }
}

enum k_dtype
dtype_fit(enum k_dtype dt, int64_t cols)
{
    int32_t blk = dtype_info(dt)->block;

    if (cols > 0 && cols % blk == 0)
        return dt;
    if (dtype_is_k(dt) && cols > 0 && cols % dtype_info(KLI_DT_K_FALLBACK)->block == 0)
        return KLI_DT_K_FALLBACK;
    return KLI_DT_COUNT;
}

int
dtype_parse(const char *s, enum k_dtype *out)
{
    static const struct {
        const char *name;
        enum k_dtype dt;
    } names[] = {
        {"f32", KLI_DT_F32}, {"f16", KLI_DT_F16}, {"bf16", KLI_DT_BF16},
        {"q8_0", KLI_DT_Q8_0}, {"q4", KLI_DT_Q4}, {"q2_k", KLI_DT_Q2_K},
        {"q3_k", KLI_DT_Q3_K}, {"q4_k", KLI_DT_Q4_K}, {"q5_k", KLI_DT_Q5_K},
        {"q6_k", KLI_DT_Q6_K},
    };

    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcasecmp(s, names[i].name) == 0) {
            *out = names[i].dt;
            return 0;
        }
    }
    return -1;
}

const char *
dtype_st_name(enum k_dtype dt)
{
    switch (dt) {
    case KLI_DT_Q8_0: return "KLI_Q8_0";
    case KLI_DT_Q4: return "KLI_Q4";
    case KLI_DT_Q2_K: return "KLI_Q2_K";
    case KLI_DT_Q3_K: return "KLI_Q3_K";
    case KLI_DT_Q4_K: return "KLI_Q4_K";
    case KLI_DT_Q5_K: return "KLI_Q5_K";
    case KLI_DT_Q6_K: return "KLI_Q6_K";
    default: return k_dtype_name(dt);
    }
}
