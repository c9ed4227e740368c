/*
 * kquant.c - the super-block types Q2_K .. Q6_K: GGUF's block layouts, decoded and written.
 *
 * Every type holds 256 weights (KLI_QK_K) in sub-blocks of 16 or 32 that share an integer
 * scale (and, in Q2_K, Q4_K and Q5_K, an integer minimum); those integers are themselves
 * scaled by the block's f16 d (and dmin). Weight i of sub-block j decodes as
 *
 *     w = d * sc[j] * q[i] - dmin * mn[j]
 *
 * with q in [QLO, QHI] of the type (signed in Q3_K and Q6_K, which have no minimum). Both
 * directions go through one unpacked form (struct kq_block): a type's unpack and pack
 * functions are the only code that knows its byte layout (kli-weights(5) gives the offsets
 * and the element order), and the decoder and the quantizer share everything else.
 *
 * The quantizer is ours. Per sub-block, candidate scales around the range over the largest
 * level are rounded to levels and refitted by weighted least squares (scale, and minimum
 * where the type has one), then re-rounded until the error stops falling. The sub-block
 * scales are then quantized against d (and dmin), trying the two nearest integers for each
 * and keeping the pair with the smaller error; d and dmin are refitted over the whole block
 * by least squares with the integers fixed, and the weights re-rounded against the stored
 * (f16) scales. Everything is deterministic, in the order written.
 */
#include "config.h"

#include <math.h>
#include <stdlib.h>

#include "dtype.h"
#include "internal.h"
#include "util.h"

#define KQ_F16_MAX 65504.0f

/* A super-block unpacked: weight i is d * sc[i / sub] * q[i] - dmin * mn[i / sub]. */
struct kq_block {
    float d, dmin;
    int sc[16], mn[16];
    int q[KLI_QK_K];
};

/* What sets a type apart besides its bytes. */
struct kq_type {
    int sub;          /* weights per sub-block: 16 or 32 */
    int qlo, qhi;     /* the levels */
    int sclo, schi;   /* the sub-block scales */
    int mnhi;         /* the sub-block minimums (0..mnhi; 0: the type has none) */
};

static const struct kq_type kq_types[5] = {
    /* Q2_K */ {16, 0, 3, 0, 15, 15},
    /* Q3_K */ {16, -4, 3, -32, 31, 0},
    /* Q4_K */ {32, 0, 15, 0, 63, 63},
    /* Q5_K */ {32, 0, 31, 0, 63, 63},
    /* Q6_K */ {16, -32, 31, -128, 127, 0},
};

static const struct kq_type *
kq_type(enum k_dtype dt)
{
    return &kq_types[dt - KLI_DT_Q2_K];
}

/* The f16 at p (d, dmin), and its store: util.h's little-endian I/O. */
static float
kq_rd16(const uint8_t *p)
{
    return f16_to_f32(util_rd16(p));
}

static void
kq_wr16(uint8_t *p, float f)
{
    util_wr16(p, f32_to_f16(f));
}

/* ==== the layouts ======================================================================== */

/*
 * Q2_K and Q3_K share the order of their 2-bit fields: weight i = 128 h + 32 j + l (h < 2,
 * j < 4, l < 32) is bits 2j..2j+1 of qs[32 h + l]. Q3_K's third bit of that weight is bit
 * 4h + j of hmask[l].
 */
static int
kq_q2_index(int i, int *shift)
{
    int h = i / 128, j = i % 128 / 32, l = i % 32;

    *shift = 2 * j;
    return 32 * h + l;
}

/* Q2_K, 84 bytes: scales[16] at 0 (low nibble scale, high nibble min), qs[64] at 16, d at 80,
 * dmin at 82. */
static void
kq_unpack_q2(const uint8_t *p, struct kq_block *b)
{
    for (int s = 0; s < 16; s++) {
        b->sc[s] = p[s] & 15;
        b->mn[s] = p[s] >> 4;
    }
    for (int i = 0; i < KLI_QK_K; i++) {
        int sh, k = kq_q2_index(i, &sh);
        b->q[i] = (p[16 + k] >> sh) & 3;
    }
    b->d = kq_rd16(p + 80);
    b->dmin = kq_rd16(p + 82);
}

static void
kq_pack_q2(const struct kq_block *b, uint8_t *p)
{
    memset(p, 0, 84);
    for (int s = 0; s < 16; s++)
        p[s] = (uint8_t)(b->sc[s] | (b->mn[s] << 4));
    for (int i = 0; i < KLI_QK_K; i++) {
        int sh, k = kq_q2_index(i, &sh);
        p[16 + k] |= (uint8_t)(b->q[i] << sh);
    }
    kq_wr16(p + 80, b->d);
    kq_wr16(p + 82, b->dmin);
}

/*
 * Q3_K's twelve bytes of scales: sixteen 6-bit values u (scale = u - 32). For k < 4, the low
 * four bits of u[k] are the low nibble of byte k, of u[4 + k] the low nibble of byte 4 + k,
 * of u[8 + k] the high nibble of byte k, of u[12 + k] the high nibble of byte 4 + k; the two
 * high bits of u[k], u[4 + k], u[8 + k], u[12 + k] are bits 0-1, 2-3, 4-5, 6-7 of byte 8 + k.
 */
static void
kq_unpack_q3(const uint8_t *p, struct kq_block *b)
{
    const uint8_t *hm = p, *qs = p + 32, *s = p + 96;

    for (int k = 0; k < 4; k++) {
        b->sc[k] = ((s[k] & 15) | ((s[8 + k] & 3) << 4)) - 32;
        b->sc[4 + k] = ((s[4 + k] & 15) | (((s[8 + k] >> 2) & 3) << 4)) - 32;
        b->sc[8 + k] = ((s[k] >> 4) | (((s[8 + k] >> 4) & 3) << 4)) - 32;
        b->sc[12 + k] = ((s[4 + k] >> 4) | (((s[8 + k] >> 6) & 3) << 4)) - 32;
    }
    for (int i = 0; i < KLI_QK_K; i++) {
        int sh, k = kq_q2_index(i, &sh);
        int hbit = (hm[i % 32] >> (sh / 2 + 4 * (i / 128))) & 1;
        b->q[i] = ((qs[k] >> sh) & 3) - (hbit ? 0 : 4);
        b->mn[i / 16] = 0;
    }
    b->d = kq_rd16(p + 108);
    b->dmin = 0.0f;
}

static void
kq_pack_q3(const struct kq_block *b, uint8_t *p)
{
    uint8_t *hm = p, *qs = p + 32, *s = p + 96;

    memset(p, 0, 110);
    for (int k = 0; k < 4; k++) {
        int u0 = b->sc[k] + 32, u1 = b->sc[4 + k] + 32;
        int u2 = b->sc[8 + k] + 32, u3 = b->sc[12 + k] + 32;
        s[k] = (uint8_t)((u0 & 15) | ((u2 & 15) << 4));
        s[4 + k] = (uint8_t)((u1 & 15) | ((u3 & 15) << 4));
        s[8 + k] = (uint8_t)((u0 >> 4) | ((u1 >> 4) << 2) | ((u2 >> 4) << 4) | ((u3 >> 4) << 6));
    }
    for (int i = 0; i < KLI_QK_K; i++) {
        int sh, k = kq_q2_index(i, &sh), u = b->q[i] + 4;
        qs[k] |= (uint8_t)((u & 3) << sh);
        hm[i % 32] |= (uint8_t)((u >> 2) << (sh / 2 + 4 * (i / 128)));
    }
    kq_wr16(p + 108, b->d);
}

/*
 * Q4_K and Q5_K's twelve bytes of scales and minimums, eight 6-bit each: for j < 4, scale j
 * is the low six bits of byte j and minimum j those of byte 4 + j; for j >= 4, scale j is
 * the low nibble of byte 4 + j with the two top bits of byte j - 4 above it, minimum j the
 * high nibble of byte 4 + j with the two top bits of byte j above it.
 */
static void
kq_unpack_sm(const uint8_t *s, struct kq_block *b)
{
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            b->sc[j] = s[j] & 63;
            b->mn[j] = s[j + 4] & 63;
        } else {
            b->sc[j] = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
            b->mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
}

static void
kq_pack_sm(const struct kq_block *b, uint8_t *s)
{
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)(b->sc[j] | ((b->sc[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)(b->mn[j] | ((b->mn[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((b->sc[j + 4] & 15) | ((b->mn[j + 4] & 15) << 4));
    }
}

/* Q4_K, 144 bytes: d at 0, dmin at 2, scales at 4, qs[128] at 16. Weight i = 64 g + 32 t + l
 * (g < 4, t < 2, l < 32) is the low (t = 0) or high (t = 1) nibble of qs[32 g + l]; Q5_K
 * (176 bytes: qh[32] at 16, qs at 48) adds bit 2g + t of qh[l] as its fifth bit (16). */
static void
kq_unpack_q45(const uint8_t *p, struct kq_block *b, int five)
{
    const uint8_t *qh = p + 16, *qs = p + (five ? 48 : 16);

    b->d = kq_rd16(p);
    b->dmin = kq_rd16(p + 2);
    kq_unpack_sm(p + 4, b);
    for (int i = 0; i < KLI_QK_K; i++) {
        int g = i / 64, t = i % 64 / 32, l = i % 32;
        int q = (qs[32 * g + l] >> (4 * t)) & 15;
        if (five)
            q |= ((qh[l] >> (2 * g + t)) & 1) << 4;
        b->q[i] = q;
    }
}

static void
kq_pack_q45(const struct kq_block *b, uint8_t *p, int five)
{
    uint8_t *qh = p + 16, *qs = p + (five ? 48 : 16);

    memset(p, 0, five ? 176 : 144);
    kq_wr16(p, b->d);
    kq_wr16(p + 2, b->dmin);
    kq_pack_sm(b, p + 4);
    for (int i = 0; i < KLI_QK_K; i++) {
        int g = i / 64, t = i % 64 / 32, l = i % 32;
        qs[32 * g + l] |= (uint8_t)((b->q[i] & 15) << (4 * t));
        if (five)
            qh[l] |= (uint8_t)((b->q[i] >> 4) << (2 * g + t));
    }
}

/* Q6_K, 210 bytes: ql[128] at 0, qh[64] at 128, int8 scales[16] at 192, d at 208. Weight
 * i = 128 h + 32 c + l (h < 2, c < 4, l < 32): its low four bits are the low (c < 2) or high
 * (c >= 2) nibble of ql[64 h + 32 (c % 2) + l], its high two bits bits 2c..2c+1 of
 * qh[32 h + l]; q = those six bits - 32. */
static void
kq_q6_index(int i, int *lo, int *losh, int *hi, int *hish)
{
    int h = i / 128, c = i % 128 / 32, l = i % 32;

    *lo = 64 * h + 32 * (c % 2) + l;
    *losh = 4 * (c / 2);
    *hi = 128 + 32 * h + l;
    *hish = 2 * c;
}

static void
kq_unpack_q6(const uint8_t *p, struct kq_block *b)
{
    for (int s = 0; s < 16; s++) {
        b->sc[s] = (int8_t)p[192 + s];
        b->mn[s] = 0;
    }
    for (int i = 0; i < KLI_QK_K; i++) {
        int lo, losh, hi, hish;
        kq_q6_index(i, &lo, &losh, &hi, &hish);
        b->q[i] = (((p[lo] >> losh) & 15) | (((p[hi] >> hish) & 3) << 4)) - 32;
    }
    b->d = kq_rd16(p + 208);
    b->dmin = 0.0f;
}

static void
kq_pack_q6(const struct kq_block *b, uint8_t *p)
{
    memset(p, 0, 210);
    for (int s = 0; s < 16; s++)
        p[192 + s] = (uint8_t)(int8_t)b->sc[s];
    for (int i = 0; i < KLI_QK_K; i++) {
        int lo, losh, hi, hish, u = b->q[i] + 32;
        kq_q6_index(i, &lo, &losh, &hi, &hish);
        p[lo] |= (uint8_t)((u & 15) << losh);
        p[hi] |= (uint8_t)((u >> 4) << hish);
    }
    kq_wr16(p + 208, b->d);
}

static void
kq_unpack(enum k_dtype dt, const uint8_t *p, struct kq_block *b)
{
    switch (dt) {
    case KLI_DT_Q2_K: kq_unpack_q2(p, b); break;
    case KLI_DT_Q3_K: kq_unpack_q3(p, b); break;
    case KLI_DT_Q4_K: kq_unpack_q45(p, b, 0); break;
    case KLI_DT_Q5_K: kq_unpack_q45(p, b, 1); break;
    default: kq_unpack_q6(p, b); break;
    }
}

static void
kq_pack(enum k_dtype dt, const struct kq_block *b, uint8_t *p)
{
    switch (dt) {
    case KLI_DT_Q2_K: kq_pack_q2(b, p); break;
    case KLI_DT_Q3_K: kq_pack_q3(b, p); break;
    case KLI_DT_Q4_K: kq_pack_q45(b, p, 0); break;
    case KLI_DT_Q5_K: kq_pack_q45(b, p, 1); break;
    default: kq_pack_q6(b, p); break;
    }
}

void
kq_to_f32(enum k_dtype dt, const uint8_t *src, float *dst, int64_t nb)
{
    const struct kq_type *ty = kq_type(dt);
    size_t bb = (size_t)dtype_info(dt)->block_bytes;
    struct kq_block b;

    for (int64_t k = 0; k < nb; k++, src += bb, dst += KLI_QK_K) {
        kq_unpack(dt, src, &b);
        for (int i = 0; i < KLI_QK_K; i++) {
            int j = i / ty->sub;
            dst[i] = b.d * (float)b.sc[j] * (float)b.q[i] - b.dmin * (float)b.mn[j];
        }
    }
}

/* ==== the quantizer ====================================================================== */

static int
kq_clamp(int v, int lo, int hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

/* The level nearest (x + m) / s, clamped; 0 for a zero scale. */
static int
kq_level(float x, float s, float m, int lo, int hi)
{
    if (s == 0.0f)
        return kq_clamp(0, lo, hi);
    float v = nearbyintf((x + m) / s);
    if (!(v >= (float)lo))
        return lo;
    return v > (float)hi ? hi : (int)v;
}

/* Weighted squared error of x[n] decoded as s * q - m (q the nearest levels, written). */
static double
kq_err(const float *x, const float *w, int n, float s, float m, int lo, int hi, int *q)
{
    double e = 0.0;

    for (int i = 0; i < n; i++) {
        q[i] = kq_level(x[i], s, m, lo, hi);
        double r = (double)s * q[i] - (double)m - (double)x[i];
        e += (double)w[i] * r * r;
    }
    return e;
}

/* Least squares s, m for x ~ s * q - m over the levels nearest (x + m0) / s0 (m = 0 without
 * a minimum; with one, m >= 0 as the layouts store it); *e receives the error of the fit on
 * those levels. One pass over x. @return 0 when the system is singular. */
static int
kq_round_fit(const float *x, const float *w, int n, float s0, float m0, int lo, int hi,
             int has_min, float *s, float *m, double *e)
{
    double a = 0, bq = 0, c = 0, xq = 0, xs = 0, xx = 0;
    float inv = 1.0f / s0;

    for (int i = 0; i < n; i++) {
        float v = nearbyintf((x[i] + m0) * inv);
        int q = !(v >= (float)lo) ? lo : v > (float)hi ? hi : (int)v;
        double wi = w[i];
        a += wi * q * q;
        bq += wi * q;
        c += wi;
        xq += wi * q * x[i];
        xs += wi * x[i];
        xx += wi * x[i] * x[i];
    }
    if (a <= 0.0)
        return 0;
    double ss = xq / a, off = 0.0;
    if (has_min) {
        double det = a * c - bq * bq;
        if (det > 1e-12 * a * c) {
            double s2 = (c * xq - bq * xs) / det, o2 = (a * xs - bq * xq) / det;
            if (o2 <= 0.0 && s2 >= 0.0) {
                ss = s2;
                off = o2;
            }
        }
        if (ss < 0.0)
            return 0;
    }
    /* sum w (ss q + off - x)^2, expanded */
    *e = ss * ss * a + 2.0 * ss * off * bq + off * off * c - 2.0 * ss * xq - 2.0 * off * xs + xx;
    *s = (float)ss;
    *m = (float)-off;
    return 1;
}

/*
 * Fits one sub-block: x ~ s * q - m, q in [lo, hi]. Candidate scales span 0.7 to 1.2 times
 * the range over the levels (the range from min(x, 0) to max(x) for the types with a
 * minimum; for the signed types, the value of largest magnitude mapped to either end), each
 * rounded to levels and refitted; the best is re-rounded and refitted while the error falls.
 */
static void
kq_fit_sub(const float *x, const float *w, int n, const struct kq_type *ty, float *ps,
           float *pm)
{
    int q[32];
    float bs = 0.0f, bm = 0.0f, m0 = 0.0f;
    double be;
    int has_min = ty->mnhi > 0;
    float base[2];
    int nbase;

    if (has_min) {
        float mn = 0.0f, mx = 0.0f;
        for (int i = 0; i < n; i++) {
            mn = x[i] < mn ? x[i] : mn;
            mx = x[i] > mx ? x[i] : mx;
        }
        base[0] = (mx - mn) / (float)ty->qhi;
        m0 = -mn;
        nbase = 1;
    } else {
        float xm = 0.0f;
        for (int i = 0; i < n; i++)
            xm = fabsf(x[i]) > fabsf(xm) ? x[i] : xm;
        base[0] = xm / (float)ty->qlo;
        base[1] = xm / (float)ty->qhi;
        nbase = 2;
    }
    be = kq_err(x, w, n, 0.0f, 0.0f, ty->qlo, ty->qhi, q);
    if (base[0] == 0.0f) {
        *ps = 0.0f;
        *pm = 0.0f;
        return;
    }
    for (int k = 0; k < nbase; k++) {
        for (int t = 0; t <= 20; t++) {
            float s0 = base[k] * (0.7f + 0.025f * (float)t), s, ms;
            double e;
            if (!isfinite(s0) || s0 == 0.0f ||
                !kq_round_fit(x, w, n, s0, m0, ty->qlo, ty->qhi, has_min, &s, &ms, &e))
                continue;
            if (e < be && s != 0.0f) {
                be = e;
                bs = s;
                bm = ms;
            }
        }
    }
    /* Re-round against the best fit and refit while the error falls. */
    for (int it = 0; it < 4 && bs != 0.0f; it++) {
        float s, m;
        double e;
        if (!kq_round_fit(x, w, n, bs, bm, ty->qlo, ty->qhi, has_min, &s, &m, &e) ||
            !(e < be) || s == 0.0f)
            break;
        be = e;
        bs = s;
        bm = m;
    }
    *ps = bs;
    *pm = bm;
}

/* Rounds to an f16 that is finite (larger magnitudes saturate); a zero is +0 (no -0 in a
 * block's d or dmin). */
static float
kq_half(float f)
{
    f = f > KQ_F16_MAX ? KQ_F16_MAX : f < -KQ_F16_MAX ? -KQ_F16_MAX : f;
    f = f16_to_f32(f32_to_f16(f));
    return f == 0.0f ? 0.0f : f;
}

/* Error of sub-block j of b with its integers sc, mn and the nearest levels (written). */
static double
kq_sub_err(struct kq_block *b, const struct kq_type *ty, const float *x, const float *w, int j)
{
    int o = j * ty->sub;

    return kq_err(x + o, w + o, ty->sub, b->d * (float)b->sc[j], b->dmin * (float)b->mn[j],
                  ty->qlo, ty->qhi, b->q + o);
}

/* Quantizes the sub-block scales s[j] (and minimums m[j]) against b->d (b->dmin), trying
 * the two integers around each and keeping the pair of least error. @return the error. */
static double
kq_pick_ints(struct kq_block *b, const struct kq_type *ty, const float *x, const float *w,
             const float *s, const float *m)
{
    int nsub = KLI_QK_K / ty->sub;
    double total = 0.0;

    for (int j = 0; j < nsub; j++) {
        float fs = b->d != 0.0f ? s[j] / b->d : 0.0f;
        float fm = b->dmin != 0.0f ? m[j] / b->dmin : 0.0f;
        int s0 = kq_clamp((int)floorf(fs), ty->sclo, ty->schi);
        int m0 = kq_clamp((int)floorf(fm), 0, ty->mnhi);
        double be = INFINITY;
        int bs = s0, bmn = m0;
        for (int a = 0; a < 2; a++) {
            for (int c = 0; c < (ty->mnhi > 0 ? 2 : 1); c++) {
                b->sc[j] = kq_clamp(s0 + a, ty->sclo, ty->schi);
                b->mn[j] = kq_clamp(m0 + c, 0, ty->mnhi);
                double e = kq_sub_err(b, ty, x, w, j);
                if (e < be) {
                    be = e;
                    bs = b->sc[j];
                    bmn = b->mn[j];
                }
            }
        }
        b->sc[j] = bs;
        b->mn[j] = bmn;
        total += kq_sub_err(b, ty, x, w, j);
    }
    return total;
}

/* Least squares d, dmin over the block with the integers fixed: x ~ d a - dmin c, a =
 * sc q, c = mn. @return 0 when singular or the result is out of the layout's signs. */
static int
kq_refit_block(const struct kq_block *b, const struct kq_type *ty, const float *x,
               const float *w, float *d, float *dmin)
{
    double aa = 0, ac = 0, cc = 0, xa = 0, xc = 0;

    for (int i = 0; i < KLI_QK_K; i++) {
        int j = i / ty->sub;
        double a = (double)b->sc[j] * b->q[i], c = b->mn[j];
        aa += w[i] * a * a;
        ac += w[i] * a * c;
        cc += w[i] * c * c;
        xa += w[i] * a * x[i];
        xc += w[i] * c * x[i];
    }
    if (aa <= 0.0)
        return 0;
    if (ty->mnhi > 0 && cc > 0.0) {
        double det = aa * cc - ac * ac;
        if (!(det > 1e-12 * aa * cc))
            return 0;
        double dd = (cc * xa - ac * xc) / det, e = (ac * xa - aa * xc) / det;
        if (dd < 0.0 || -e < 0.0)
            return 0;
        *d = (float)dd;
        *dmin = (float)-e;
        return 1;
    }
    *d = (float)(xa / aa);
    *dmin = b->dmin;
    return ty->mnhi == 0 || *d >= 0.0f;
}

/* One super-block: x[256] (finite), w[256] (>= 0, positive in every sub-block). */
static void
kq_quant_block(enum k_dtype dt, const float *x, const float *w, uint8_t *out)
{
    const struct kq_type *ty = kq_type(dt);
    int nsub = KLI_QK_K / ty->sub;
    float s[16], m[16], smax = 0.0f, mmax = 0.0f;
    struct kq_block b, keep;

    for (int j = 0; j < nsub; j++) {
        kq_fit_sub(x + j * ty->sub, w + j * ty->sub, ty->sub, ty, &s[j], &m[j]);
        smax = fabsf(s[j]) > fabsf(smax) ? s[j] : smax;
        mmax = m[j] > mmax ? m[j] : mmax;
    }
    memset(&b, 0, sizeof(b));
    /* The signed types map their largest scale to the wider (negative) end. */
    b.d = kq_half(ty->sclo < 0 ? smax / (float)ty->sclo : smax / (float)ty->schi);
    b.dmin = ty->mnhi > 0 ? kq_half(mmax / (float)ty->mnhi) : 0.0f;
    double e = kq_pick_ints(&b, ty, x, w, s, m);
    for (int it = 0; it < 2; it++) {
        float d, dmin;
        keep = b;
        if (!kq_refit_block(&b, ty, x, w, &d, &dmin))
            break;
        b.d = kq_half(d);
        b.dmin = kq_half(dmin);
        double e2 = 0.0;
        for (int j = 0; j < nsub; j++)
            e2 += kq_sub_err(&b, ty, x, w, j);
        if (!(e2 < e)) {
            b = keep;
            break;
        }
        e = e2;
    }
    kq_pack(dt, &b, out);
}

void
kq_from_f32(enum k_dtype dt, const float *src, uint8_t *dst, int64_t nb, const float *imp)
{
    const struct kq_type *ty = kq_type(dt);
    size_t bb = (size_t)dtype_info(dt)->block_bytes;
    float x[KLI_QK_K], w[KLI_QK_K];

    for (int64_t k = 0; k < nb; k++) {
        const float *xs = src + k * KLI_QK_K;
        for (int i = 0; i < KLI_QK_K; i++) {
            x[i] = isfinite(xs[i]) ? xs[i] : 0.0f;
            float v = imp != NULL ? imp[k * KLI_QK_K + i] : 1.0f;
            w[i] = v >= 0.0f && isfinite(v) ? v : 0.0f;
        }
        for (int j = 0; j < KLI_QK_K; j += ty->sub) {
            double sw = 0.0;
            for (int i = 0; i < ty->sub; i++)
                sw += w[j + i];
            for (int i = 0; i < ty->sub && !(sw > 0.0); i++)
                w[j + i] = 1.0f;
        }
        kq_quant_block(dt, x, w, dst + (size_t)k * bb);
    }
}

/* ==== error feedback (dtype.h) ========================================================== */

/* Cholesky a = l l^T in place (lower triangle of a, k x k); @return -1 if not positive
 * definite. */
static int
kq_chol(double *a, int64_t k)
{
    for (int64_t j = 0; j < k; j++) {
        double s = a[j * k + j];
        for (int64_t p = 0; p < j; p++)
            s -= a[j * k + p] * a[j * k + p];
        if (!(s > 0.0) || !isfinite(s))
            return -1;
        a[j * k + j] = sqrt(s);
        for (int64_t i = j + 1; i < k; i++) {
            double t = a[i * k + j];
            for (int64_t p = 0; p < j; p++)
                t -= a[i * k + p] * a[j * k + p];
            a[i * k + j] = t / a[j * k + j];
        }
    }
    return 0;
}

int
kq_hinv_factor(const double *h, int64_t k, double damp, float *u)
{
    double *a = k_mallocarray((size_t)(k * k), sizeof(double));
    double *b = k_mallocarray((size_t)(k * k), sizeof(double));
    double md = 0.0;
    int rc = -1;

    if (a == NULL || b == NULL || k < 1)
        goto out;
    for (int64_t i = 0; i < k; i++)
        md += h[i * k + i] / (double)k;
    for (int64_t i = 0; i < k; i++)
        for (int64_t j = 0; j <= i; j++)
            a[i * k + j] = h[j * k + i] + (i == j ? damp * md : 0.0);
    if (kq_chol(a, k) != 0)
        goto out;
    /* b = l^-1 (lower), column by column by forward substitution */
    for (int64_t c = 0; c < k; c++) {
        for (int64_t i = 0; i < c; i++)
            b[i * k + c] = 0.0;
        for (int64_t i = c; i < k; i++) {
            double t = i == c ? 1.0 : 0.0;
            for (int64_t p = c; p < i; p++)
                t -= a[i * k + p] * b[p * k + c];
            b[i * k + c] = t / a[i * k + i];
        }
    }
    /* H^-1 = b^T b: its lower triangle into a */
    for (int64_t i = 0; i < k; i++) {
        for (int64_t j = 0; j <= i; j++) {
            double t = 0.0;
            for (int64_t p = i; p < k; p++)
                t += b[p * k + i] * b[p * k + j];
            a[i * k + j] = t;
        }
    }
    if (kq_chol(a, k) != 0)
        goto out;
    /* H^-1 = l l^T = u^T u with u = l^T */
    for (int64_t i = 0; i < k; i++)
        for (int64_t j = 0; j < k; j++)
            u[i * k + j] = j >= i ? (float)a[j * k + i] : 0.0f;
    rc = 0;
out:
    free(a);
    free(b);
    return rc;
}

/*
 * Rounds one super-block of the row, columns j0.. j0 + 255, to the nearest levels of the
 * scales in b, spreading each rounding error over the block's later columns through u (the
 * columns after the block are left to the caller). x: the block as corrected so far, on
 * return as corrected while rounding; r: each column's error over u_jj. @return sum r^2:
 * the block's part of GPTQ's objective e^T H e, given that the columns after it still make
 * up for its errors. It is what the choice of the block's scales changes, so kq_from_f32_h
 * compares candidate scales by it.
 */
static double
kq_round_block(struct kq_block *b, const struct kq_type *ty, float *x, const float *u,
               int64_t k, int64_t j0, float *r)
{
    double loss = 0.0;

    for (int i = 0; i < KLI_QK_K; i++) {
        const float *uj = u + (j0 + i) * k + j0;
        float sc = b->d * (float)b->sc[i / ty->sub], mn = b->dmin * (float)b->mn[i / ty->sub];
        b->q[i] = kq_level(x[i], sc, mn, ty->qlo, ty->qhi);
        r[i] = (x[i] - (sc * (float)b->q[i] - mn)) / uj[i];
        loss += (double)r[i] * r[i];
        for (int l = i + 1; l < KLI_QK_K; l++)
            x[l] -= r[i] * uj[l];
    }
    return loss;
}

/* Scale candidates per super-block in kq_from_f32_h: passes over the block (the first on
 * the block as first seen, the later ones on the values the best rounding so far ended
 * with), each searching the scales with two sets of column weights. */
#define KQ_H_PASSES 4
#define KQ_BLOCK_MAX 210   /* the largest K block, Q6_K's */

void
kq_from_f32_h(enum k_dtype dt, const float *src, uint8_t *dst, int64_t nb, const float *imp,
              const float *u, float *tmp)
{
    kq_from_f32_hp(dt, src, dst, nb, imp, u, tmp, KQ_H_PASSES);
}

void
kq_from_f32_hp(enum k_dtype dt, const float *src, uint8_t *dst, int64_t nb, const float *imp,
               const float *u, float *tmp, int passes)
{
    const struct kq_type *ty = kq_type(dt);
    size_t bb = (size_t)dtype_info(dt)->block_bytes;
    int64_t k = nb * KLI_QK_K;
    struct kq_block b, best;
    float x[KLI_QK_K], y[KLI_QK_K], gw[KLI_QK_K], r[KLI_QK_K], rb[KLI_QK_K];
    uint8_t cand[KQ_BLOCK_MAX];

    for (int64_t i = 0; i < k; i++)
        tmp[i] = isfinite(src[i]) ? src[i] : 0.0f;
    for (int64_t s = 0; s < nb; s++) {
        int64_t j0 = s * KLI_QK_K;
        const float *t0 = tmp + j0, *ib = imp != NULL ? imp + j0 : NULL;
        /* GPTQ's loss weighs column j's error on the corrected values by 1 / u_jj^2 */
        for (int i = 0; i < KLI_QK_K; i++)
            gw[i] = 1.0f / (u[(j0 + i) * k + j0 + i] * u[(j0 + i) * k + j0 + i]);
        kq_from_f32(dt, t0, cand, 1, ib);
        kq_unpack(dt, cand, &best);
        memcpy(y, t0, sizeof(y));
        double bl = kq_round_block(&best, ty, y, u, k, j0, rb);
        for (int pass = 0; pass < passes; pass++) {
            for (int v = 0; v < 2; v++) {
                const float *w = v == 0 ? gw : ib;
                if (w == NULL || (pass == 0 && v == 1))
                    continue;   /* no imp, or the first candidate above */
                kq_from_f32(dt, pass == 0 ? t0 : y, cand, 1, w);
                kq_unpack(dt, cand, &b);
                memcpy(x, t0, sizeof(x));
                double l = kq_round_block(&b, ty, x, u, k, j0, r);
                if (l < bl) {
                    bl = l;
                    best = b;
                    memcpy(rb, r, sizeof(rb));
                    memcpy(y, x, sizeof(y));
                }
            }
        }
        kq_pack(dt, &best, dst + (size_t)s * bb);
        for (int i = 0; i < KLI_QK_K; i++) {
            const float *uj = u + (j0 + i) * k;
            for (int64_t l = j0 + KLI_QK_K; l < k; l++)
                tmp[l] -= rb[i] * uj[l];
        }
    }
}
