/*
 * test-ktypes.c - the super-block types Q2_K .. Q6_K (weights/kquant.c).
 *
 * layout_*: hand-built blocks whose values are worked out here from the layouts of
 * kli-weights(5) (GGUF's), every field of every type set and chosen elements checked;
 * error_*: the quantizer's relative RMS error on Gaussian rows, within bounds and strictly
 * falling from Q2_K to Q6_K, Q4_K well below Q4; weighted_*: importance weights lower the
 * weighted error, NULL weights give dtype_from_f32's bytes, and weights that favour some
 * columns lower those columns' error; feedback_*: the inverse's factor, and error feedback
 * (kq_from_f32_h) lowering e^T H e on correlated inputs, a diagonal H giving the weighted
 * bytes; edge_*: zeros, tiny, huge
 * and non-finite inputs give finite, deterministic blocks; matmul: every table's matmul of
 * every K type against the dequantized weights in double (generic to 1e-5 of sum |x w|, the
 * SIMD tables within the rounding of x to int8 per super-block); nano: the trained demo model
 * converted to each K type at load time runs, its logits close to f32 and its top-1
 * agreement ordered Q6_K >= Q4_K >= Q2_K; files: kli quantize and kli convert to a K type
 * give the load-time conversion's logits bit for bit, short rows take the fallback, and
 * K-type tensors of the wrong size or shape are refused with messages that say why.
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kli.h"
#include "dtype.h"
#include "simd.h"
#include "tap.h"
#include "testlib.h"
#include "util.h"

/* The K types, then the two 32-element block types (for the weighted quantizer). */
static const enum k_dtype ktypes[7] = {
    KLI_DT_Q2_K, KLI_DT_Q3_K, KLI_DT_Q4_K, KLI_DT_Q5_K, KLI_DT_Q6_K, KLI_DT_Q4, KLI_DT_Q8_0,
};

/* Decodes one block of dt and checks element idx[i] == want[i] exactly. */
static int
check_elems(enum k_dtype dt, const uint8_t *blk, const int *idx, const float *want, int n)
{
    float y[256];
    int good = 1;

    dtype_to_f32(dt, blk, y, 256);
    for (int i = 0; i < n; i++) {
        if (y[idx[i]] != want[i]) {
            diag("%s element %d: %g, want %g", k_dtype_name(dt), idx[i], y[idx[i]], want[i]);
            good = 0;
        }
    }
    return good;
}

/* f16 1.0 = 0x3c00, 0.5 = 0x3800, 0.25 = 0x3400 (little-endian bytes). */
static void
put_half(uint8_t *p, uint16_t h)
{
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}

static void
layout_table(void)
{
    const struct dtype_info *in[5];
    enum k_dtype dt;

    for (int t = 0; t < 5; t++)
        in[t] = dtype_info(ktypes[t]);
    ok(in[0]->block == 256 && in[0]->block_bytes == 84 && in[1]->block_bytes == 110 &&
       in[2]->block_bytes == 144 && in[3]->block_bytes == 176 && in[4]->block_bytes == 210 &&
       in[4]->block == 256, "K types: blocks of 256 in 84, 110, 144, 176, 210 bytes");
    ok(KLI_DT_Q2_K == 6 && KLI_DT_Q6_K == 10 && KLI_DT_OTHER == 5,
       "dtype codes: Q2_K..Q6_K are 6..10 after OTHER (5), as .kli files store them");
    ok(dtype_parse("q2_k", &dt) == 0 && dt == KLI_DT_Q2_K && dtype_parse("Q6_K", &dt) == 0 &&
       dt == KLI_DT_Q6_K && dtype_parse("q4_K", &dt) == 0 && dt == KLI_DT_Q4_K &&
       dtype_parse("q4k", &dt) != 0, "dtype_parse names q2_k .. q6_k (any case)");
    ok(strcmp(dtype_st_name(KLI_DT_Q3_K), "KLI_Q3_K") == 0 &&
       strcmp(dtype_st_name(KLI_DT_Q5_K), "KLI_Q5_K") == 0 &&
       strcmp(k_dtype_name(KLI_DT_Q4_K), "Q4_K") == 0, "safetensors names KLI_Q*_K");
    ok(dtype_nbytes(KLI_DT_Q4_K, 2304) == 9 * 144 && dtype_nbytes(KLI_DT_Q4_K, 64) ==
       UINT64_MAX, "dtype_nbytes: whole super-blocks only");
}

static void
layout_q2_k(void)
{
    uint8_t b[84] = {0};

    put_half(b + 80, 0x3c00);   /* d = 1 */
    put_half(b + 82, 0x3800);   /* dmin = 0.5 */
    b[5] = 0x32;                /* sub-block 5: scale 2, min 3 */
    b[13] = 0x1f;               /* sub-block 13: scale 15, min 1 */
    b[16 + 16] = 0x30;          /* qs[16] bits 4-5 = 3: element 64 + 16 = 80 */
    b[16 + 48] = 0x20;          /* qs[48] bits 4-5 = 2: element 128 + 64 + 16 = 208 */
    b[16 + 63] = 0x40;          /* qs[63] bits 6-7 = 1: element 128 + 96 + 31 = 255 (sub 15) */
    int idx[] = {80, 81, 208, 0, 79, 255};
    float want[] = {2 * 3 - 0.5f * 3, -0.5f * 3, 15 * 2 - 0.5f * 1, 0, 0, 0};
    ok(check_elems(KLI_DT_Q2_K, b, idx, want, 6), "Q2_K: scales/mins nibbles, 2-bit order, "
       "d and dmin");
}

static void
layout_q3_k(void)
{
    uint8_t b[110] = {0};

    put_half(b + 108, 0x3800);  /* d = 0.5 */
    /* sub-block 9 (u[8 + 1]): u = 37: low 4 bits 5 in the high nibble of scales[1], high 2
     * bits (2) in bits 4-5 of scales[9] */
    b[96 + 1] = 0x50;
    b[96 + 9] = 0x20;
    /* sub-block 6 (u[4 + 2]): u = 29: low nibble of scales[6] = 13, bits 2-3 of scales[10]
     * = 1 */
    b[96 + 6] = 0x0d;
    b[96 + 10] = 0x04;
    /* sub-block 12 (u[12 + 0]): u = 63: high nibble of scales[4] = 15, bits 6-7 of
     * scales[8] = 3 */
    b[96 + 4] = 0xf0;
    b[96 + 8] = 0xc0;
    /* element 144 = 128 + 16: qs[48] bits 0-1 = 3, hmask[16] bit 4 set: q = 3 */
    b[32 + 48] = 0x03;
    b[16] = 0x10;
    /* element 145: qs[49] bits 0-1 = 1, high bit clear: q = 1 - 4 */
    b[32 + 49] = 0x01;
    /* element 96 = 3 * 32: qs[0] bits 6-7 = 3, hmask[0] bit 3: q = 3 (sub-block 6) */
    b[32 + 0] = 0xc0;
    b[0] |= 0x08;
    /* element 192 = 128 + 64: qs[32] bits 4-5 = 1, hmask[0] bit 6: q = 1 (sub-block 12) */
    b[32 + 32] = 0x10;
    b[0] |= 0x40;
    /* element 17 (sub-block 1, u = 0): qs[17] bits 0-1 = 2, high bit clear: q = -2 */
    b[32 + 17] = 0x02;
    int idx[] = {144, 145, 96, 192, 0, 17};
    float want[] = {0.5f * 5 * 3, 0.5f * 5 * -3, 0.5f * -3 * 3, 0.5f * 31 * 1, 0.5f * -32 * -4,
                    0.5f * -32 * -2};
    ok(check_elems(KLI_DT_Q3_K, b, idx, want, 6), "Q3_K: 6-bit scale packing, hmask bits, "
       "2-bit order, d");
}

static void
layout_q45(int five)
{
    uint8_t b[176] = {0};
    uint8_t *qh = b + 16, *qs = b + (five ? 48 : 16);
    enum k_dtype dt = five ? KLI_DT_Q5_K : KLI_DT_Q4_K;

    put_half(b, 0x3c00);        /* d = 1 */
    put_half(b + 2, 0x3400);    /* dmin = 0.25 */
    b[4 + 1] = 7;               /* scale 1 */
    b[4 + 5] = 9;               /* min 1 */
    /* scale 6 = 5 | 2 << 4 = 37 (low nibble of byte 10, top bits of byte 2); min 6 = 3 |
     * 1 << 4 = 19 (high nibble of byte 10, top bits of byte 6) */
    b[4 + 10] = 0x35;
    b[4 + 2] = 0x80;
    b[4 + 6] = 0x40;
    qs[1] = 0xa0;               /* element 32 + 1: high nibble of qs[1] */
    qs[96 + 8] = 0x04;          /* element 192 + 8: low nibble of qs[104] */
    if (five) {
        qh[1] = 0x02;           /* element 33: bit 2 * 0 + 1 of qh[1] */
        qh[8] = 0x40;           /* element 200: bit 2 * 3 + 0 of qh[8] */
    }
    int idx[] = {33, 200, 0, 232};
    float want[] = {7.0f * (10 + 16 * five) - 0.25f * 9, 37.0f * (4 + 16 * five) - 0.25f * 19,
                    0, 0};
    ok(check_elems(dt, b, idx, want, 4), "%s: d, dmin, 6-bit scale/min packing, nibble "
       "order%s", k_dtype_name(dt), five ? ", fifth bits" : "");
}

static void
layout_q4_k(void)
{
    layout_q45(0);
}

static void
layout_q5_k(void)
{
    layout_q45(1);
}

static void
layout_q6_k(void)
{
    uint8_t b[210] = {0};

    put_half(b + 208, 0x3800);  /* d = 0.5 */
    b[192 + 0] = 3;
    b[192 + 6] = 4;
    b[192 + 9] = 0xfe;          /* -2 */
    b[192 + 13] = 0x7f;
    b[0] = 0x05;                /* element 0: low nibble of ql[0] */
    b[128] = 0xc2;              /* qh[0]: bits 0-1 = 2 (element 0), bits 6-7 = 3 (element 96) */
    b[32] = 0x90;               /* element 96: high nibble of ql[32] */
    b[80] = 0x3f;               /* ql[64 + 16]: element 144 (low 15), element 208 (high 3) */
    b[128 + 48] = 0x30;         /* qh[32 + 16]: bits 4-5 = 3 for element 208 */
    int idx[] = {0, 96, 144, 208, 1};
    float want[] = {0.5f * 3 * 5, 0.5f * 4 * 25, 0.5f * -2 * -17, 0.5f * 127 * 19,
                    0.5f * 3 * -32};
    ok(check_elems(KLI_DT_Q6_K, b, idx, want, 5), "Q6_K: ql nibbles, qh pairs, int8 scales, "
       "d");
}

/* Relative RMS error of rows x[rows][k] through dt (imp: per-column weights or NULL; the
 * error is weighted by wgt, or plain when wgt is NULL). */
static double
rel_err(enum k_dtype dt, const float *x, int rows, int k, const float *imp, const float *wgt)
{
    uint8_t *q = tl_malloc((size_t)dtype_nbytes(dt, (uint64_t)k));
    float *y = tl_malloc((size_t)k * sizeof(float));
    double num = 0.0, den = 0.0;

    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * k;
        dtype_from_f32_w(dt, xr, q, k, imp);
        dtype_to_f32(dt, q, y, k);
        for (int j = 0; j < k; j++) {
            double w = wgt != NULL ? wgt[j] : 1.0;
            num += w * ((double)y[j] - xr[j]) * ((double)y[j] - xr[j]);
            den += w * (double)xr[j] * xr[j];
        }
    }
    free(q);
    free(y);
    return sqrt(num / den);
}

static float *
gauss_rows(uint64_t *st, int rows, int k)
{
    float *x = tl_malloc((size_t)rows * k * sizeof(float));

    for (int i = 0; i < rows * k; i++)
        x[i] = (float)tl_normal(st) * 0.02f;
    return x;
}

/* e[t] = the relative RMS error of ktypes[t] (unweighted) on the rows.
 * @return whether it falls strictly from Q2_K to Q6_K */
static int
ktype_errors(const float *x, int rows, int k, double e[5])
{
    int order = 1;

    for (int t = 0; t < 5; t++) {
        e[t] = rel_err(ktypes[t], x, rows, k, NULL, NULL);
        order &= t == 0 || e[t] < e[t - 1];
    }
    return order;
}

static void
error_gauss(void)
{
    uint64_t st = 17;   /* each case starts from its seed */

    int rows = 32, k = 1024;
    float *x = gauss_rows(&st, rows, k);
    /* bounds: a little above what the types reach on Gaussian rows (measured, see the
     * diagnostics); a layout or fit broken anywhere misses them by far */
    static const double bound[5] = {0.40, 0.20, 0.10, 0.05, 0.025};
    double e[5], e4 = rel_err(KLI_DT_Q4, x, rows, k, NULL, NULL);
    double e8 = rel_err(KLI_DT_Q8_0, x, rows, k, NULL, NULL);
    int order = ktype_errors(x, rows, k, e), within = 1;
    for (int t = 0; t < 5; t++) {
        diag("%s relative RMS error %.5f (%.4f bits per weight)", k_dtype_name(ktypes[t]), e[t],
             8.0 * dtype_info(ktypes[t])->block_bytes / 256.0);
        within &= e[t] < bound[t];
    }
    diag("Q4 %.5f (4.5 bits), Q8_0 %.5f (8.5 bits)", e4, e8);
    ok(within, "K types: relative RMS error on Gaussian rows within bounds");
    ok(order, "relative RMS error falls strictly Q2_K > Q3_K > Q4_K > Q5_K > Q6_K");
    ok(e[2] < 0.85 * e4, "Q4_K's error (%.4f) is clearly below Q4's (%.4f)", e[2], e4);
    ok(e[4] < e8 * 4.0 && e[4] > e8, "Q6_K between Q8_0 and 4 x its error");
    free(x);
}

/* Heavy-tailed rows (a few outliers per block, as trained weights have) stay within the
 * same ordering. */
static void
error_outliers(void)
{
    uint64_t st = 23;   /* each case starts from its seed */

    int rows = 16, k = 512;
    float *x = gauss_rows(&st, rows, k);
    for (int i = 0; i < rows * k; i += 97)
        x[i] *= 12.0f;
    double e[5];
    ok(ktype_errors(x, rows, k, e),
       "rows with outliers: the error still falls strictly Q2_K .. Q6_K");
    free(x);
}

static void
weighted_lower(void)
{
    uint64_t st = 31;   /* each case starts from its seed */

    int rows = 16, k = 1024;
    float *x = gauss_rows(&st, rows, k);
    float *imp = tl_malloc((size_t)k * sizeof(float));
    for (int j = 0; j < k; j++)
        imp[j] = (float)exp(2.0 * tl_normal(&st));
    const enum k_dtype *all = ktypes;
    int lower = 1;
    for (int t = 0; t < 7; t++) {
        double eu = rel_err(all[t], x, rows, k, NULL, imp);
        double ew = rel_err(all[t], x, rows, k, imp, imp);
        diag("%s weighted error: %.5f unweighted quantizer, %.5f weighted (%.1f%% lower)",
             k_dtype_name(all[t]), eu, ew, 100.0 * (1.0 - ew / eu));
        lower &= t < 5 ? ew < 0.97 * eu : ew <= eu;
    }
    ok(lower, "importance weights lower the weighted error (K types by > 3%%, Q4 and Q8_0 "
       "never raise it)");
    free(x);
    free(imp);
}

static void
weighted_null(void)
{
    uint64_t st = 37;   /* each case starts from its seed */

    int k = 512;
    float *x = gauss_rows(&st, 1, k);
    float *ones = tl_malloc((size_t)k * sizeof(float));
    int same = 1, ones_same = 1;
    for (int j = 0; j < k; j++)
        ones[j] = 1.0f;
    const enum k_dtype *all = ktypes;
    for (int t = 0; t < 7; t++) {
        size_t nb = (size_t)dtype_nbytes(all[t], (uint64_t)k);
        uint8_t *p = tl_malloc(nb), *q = tl_malloc(nb);
        dtype_from_f32(all[t], x, p, k);
        dtype_from_f32_w(all[t], x, q, k, NULL);
        same &= memcmp(p, q, nb) == 0;
        if (t < 5) {
            dtype_from_f32_w(all[t], x, q, k, ones);
            ones_same &= memcmp(p, q, nb) == 0;
        }
        free(p);
        free(q);
    }
    ok(same, "dtype_from_f32_w with NULL weights gives dtype_from_f32's bytes");
    ok(ones_same, "K types: uniform weights give the unweighted bytes");
    free(x);
    free(ones);
}

static void
edge_values(void)
{
    float x[512], y[512];
    uint8_t q[2][210 * 2];
    int zero = 1, finite = 1, det = 1, tiny_ok = 1, huge_ok = 1;

    for (int t = 0; t < 5; t++) {
        enum k_dtype dt = ktypes[t];
        size_t nb = (size_t)dtype_nbytes(dt, 512);
        memset(x, 0, sizeof(x));
        dtype_from_f32(dt, x, q[0], 512);
        dtype_to_f32(dt, q[0], y, 512);
        for (int i = 0; i < 512; i++)
            zero &= y[i] == 0.0f;
        /* tiny, huge, non-finite */
        for (int i = 0; i < 512; i++)
            x[i] = (float)((i * 37) % 19 - 9) * 1e-30f;
        dtype_from_f32(dt, x, q[0], 512);
        dtype_to_f32(dt, q[0], y, 512);
        for (int i = 0; i < 512; i++)
            tiny_ok &= isfinite(y[i]) && fabsf(y[i]) <= 1e-28f;
        for (int i = 0; i < 512; i++)
            x[i] = (float)((i * 37) % 19 - 9) * 1e4f;
        dtype_from_f32(dt, x, q[0], 512);
        dtype_to_f32(dt, q[0], y, 512);
        for (int i = 0; i < 512; i++)
            finite &= isfinite(y[i]);
        huge_ok &= tl_rel_l2(y, x, 512) < 0.5;
        x[3] = NAN;
        x[300] = INFINITY;
        x[301] = -INFINITY;
        x[500] = 3e38f;
        dtype_from_f32(dt, x, q[0], 512);
        dtype_from_f32(dt, x, q[1], 512);
        det &= memcmp(q[0], q[1], nb) == 0;
        dtype_to_f32(dt, q[0], y, 512);
        for (int i = 0; i < 512; i++)
            finite &= isfinite(y[i]);
    }
    ok(zero, "all-zero blocks decode to zeros");
    ok(tiny_ok, "values of 1e-30 give finite, tiny weights");
    ok(huge_ok, "values of 1e5 stay within reach of f16 scales");
    ok(finite, "NaN, infinities and 3e38 give finite blocks (non-finite counts as zero)");
    ok(det, "the quantizer is deterministic");
}

static void
matmul_tables(void)
{
    const struct k_kernels *all[8];
    int nk = kernels_all(all, 8);
    uint64_t st = 41;   /* each case starts from its seed */
    int n = 5, k = 768, mmax = 17;
    float *w = gauss_rows(&st, n, k), *x = gauss_rows(&st, mmax, k);
    float *wd = tl_malloc((size_t)n * k * sizeof(float));
    float *y = tl_malloc((size_t)mmax * n * sizeof(float));
    for (int v = 0; v < nk; v++) {
        for (int t = 0; t < 5; t++) {
            enum k_dtype dt = ktypes[t];
            size_t rb = (size_t)dtype_nbytes(dt, (uint64_t)k);
            uint8_t *q = tl_malloc(rb * (size_t)n);
            dtype_from_f32(dt, w, q, (int64_t)n * k);
            dtype_to_f32(dt, q, wd, (int64_t)n * k);
            double worst = 0.0, worstq = 0.0;
            int have = all[v]->matmul[dt] != NULL;
            for (int m = 1; have && m <= mmax; m += 8) {
                all[v]->matmul[dt](y, n, x, k, q, n, k, m);
                for (int i = 0; i < m; i++) {
                    for (int r = 0; r < n; r++) {
                        double s = 0.0, a = 0.0, qb = 0.0;
                        for (int j = 0; j < k; j++) {
                            s += (double)x[i * k + j] * wd[r * k + j];
                            a += fabs((double)x[i * k + j] * wd[r * k + j]);
                        }
                        /* the SIMD kernels round x to int8 per super-block (scale amax/127):
                         * each x_j moves by at most amax/254 (test-simd.c) */
                        for (int b = 0; b < k; b += KLI_QK_K) {
                            double amax = 0.0, wsum = 0.0;
                            for (int j = b; j < b + KLI_QK_K; j++) {
                                amax = fmax(amax, fabs(x[i * k + j]));
                                wsum += fabs(wd[r * k + j]);
                            }
                            qb += amax / 254.0 * wsum;
                        }
                        double e = fabs(y[i * n + r] - s);
                        worst = fmax(worst, e / (a > 0 ? a : 1));
                        worstq = fmax(worstq, e / (1.01 * qb + 1e-5 * a + 1e-30));
                    }
                }
            }
            if (strcmp(all[v]->name, "generic") == 0)
                ok(have && worst < 1e-5, "%s matmul %s (m = 1, 9, 17) = the dequantized "
                   "weights (worst %.2g of sum |x w|)", all[v]->name, k_dtype_name(dt), worst);
            else
                ok(have && worstq <= 1.0, "%s matmul %s (m = 1, 9, 17) = the dequantized "
                   "weights within the int8 rounding of x (worst %.2g of the bound)",
                   all[v]->name, k_dtype_name(dt), worstq);
            free(q);
        }
    }
    free(w);
    free(x);
    free(wd);
    free(y);
}

/* The demo model and up to NANO_MAX tokens of held-out text (tokenized by its tokenizer). */
#define NANO_MAX 256
static char nano_dir[4096];
static kli_token nano_ids[NANO_MAX];
static int nano_n;

static int
nano_tokens(void)
{
    struct kli_tokenizer *tok = NULL;
    struct kli_err err = {0};
    char path[4200];
    size_t len = 0;

    if (nano_n > 0)
        return nano_n;
    snprintf(nano_dir, sizeof(nano_dir), "%s/../../contrib/models/kimi-linear-nano", tl_data());
    snprintf(path, sizeof(path), "%s/../../contrib/train/heldout-eval.txt", tl_data());
    char *text = tl_slurp(path, &len);
    if (text == NULL || kli_tokenizer_open(&tok, nano_dir, &err) != KLI_OK) {
        diag("nano tokens: %s", err.msg);
        free(text);
        return 0;
    }
    len = len > 1500 ? 1500 : len;
    while (len > 0 && ((unsigned char)text[len] & 0xc0) == 0x80)
        len--;   /* cut on a character boundary */
    int64_t n = kli_tokenize(tok, text, len, 0, nano_ids, NANO_MAX, &err);
    nano_n = n < 0 ? 0 : n > NANO_MAX ? NANO_MAX : (int)n;
    kli_tokenizer_close(tok);
    free(text);
    return nano_n;
}

static void
nano_logits(void)
{
    /* rel L2 bounds, a few times what the types give (see the diagnostics); a broken layout
     * or matmul lands near 1 */
    static const char *const type[5] = {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"};
    static const double bound[5] = {0.6, 0.35, 0.2, 0.1, 0.05};
    int32_t V = 0;
    int n = nano_tokens();

    if (n < 150) {
        ok(0, "nano: held-out text tokenized (%d tokens)", n);
        return;
    }
    diag("kernels: %s", kli_simd_variant());
    float *ref = tl_logits_of(nano_dir, "f32", nano_ids, n, &V);
    int agree[5] = {0};
    for (int t = 0; t < 5 && ref != NULL; t++) {
        float *l = tl_logits_of(nano_dir, type[t], nano_ids, n, &V);
        if (l == NULL) {
            ok(0, "nano %s: logits", type[t]);
            continue;
        }
        for (int i = 0; i < n; i++)
            agree[t] += tl_argmax(l + (size_t)i * V, V) == tl_argmax(ref + (size_t)i * V, V);
        double e = tl_rel_l2(l, ref, (int64_t)n * V);
        ok(e < bound[t], "nano %s: logits within %.2f of f32 (rel L2 %.4f), top-1 %d/%d", type[t],
           bound[t], e, agree[t], n);
        free(l);
    }
    ok(ref != NULL && agree[4] >= agree[2] && agree[2] >= agree[0] && agree[4] > agree[0],
       "nano top-1 agreement with f32: q6_k %d >= q4_k %d >= q2_k %d", agree[4], agree[2],
       agree[0]);
    free(ref);
}

/* The dtype name of tensor `name` in dir/model.safetensors, or NULL. */
static char *
st_dtype(const char *dir, const char *name, char *buf, size_t cap)
{
    char path[4200];
    size_t len = 0;

    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    char *all = tl_slurp(path, &len);
    if (all == NULL || len < 8)
        return NULL;
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--)
        hl = hl << 8 | (uint8_t)all[i];
    char *p = hl + 8 <= len ? strstr(all + 8, name) : NULL;
    char *q = p != NULL ? strstr(p, "\"dtype\"") : NULL;
    char *r = q != NULL ? strchr(q + 7, '"') : NULL;
    char *e = r != NULL ? strchr(r + 1, '"') : NULL;
    if (e == NULL || (size_t)(e - r - 1) >= cap || (uint64_t)(e - all) > hl + 8) {
        free(all);
        return NULL;
    }
    memcpy(buf, r + 1, (size_t)(e - r - 1));
    buf[e - r - 1] = '\0';
    free(all);
    return buf;
}

/* Writes dir/model.safetensors with the nano config and one tensor (the rest missing is
 * fine: the tensor is checked as the header is read). */
static int
write_one_tensor(const char *dir, const char *dtype, int rows, int cols, size_t nbytes)
{
    char path[4200], hdr[512];
    int hl = snprintf(hdr, sizeof(hdr), "{\"t\":{\"dtype\":\"%s\",\"shape\":[%d,%d],"
                      "\"data_offsets\":[0,%zu]}}", dtype, rows, cols, nbytes);
    while (hl % 8 != 0)
        hdr[hl++] = ' ';
    size_t total = 8 + (size_t)hl + nbytes;
    uint8_t *buf = tl_calloc(total, 1);
    util_wr64(buf, (uint64_t)hl);
    memcpy(buf + 8, hdr, (size_t)hl);
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    int rc = tl_spill(path, buf, total);
    free(buf);
    return rc;
}

static void
files(void)
{
    char dir[] = "/tmp/kli-ktypes-XXXXXX", q[4200], kl[4200], buf[64];
    struct kli_convert_options o;
    struct kli_err err = {0};
    int32_t V = 0;
    int n = nano_tokens();

    if (mkdtemp(dir) == NULL || n < 150) {
        ok(0, "files: a temporary directory and the nano tokens");
        return;
    }
    snprintf(q, sizeof(q), "%s/q4k", dir);
    snprintf(kl, sizeof(kl), "%s/q3k.kli", dir);
    kli_quantize_options_init(&o);
    o.type = "q4_k";
    ok(kli_quantize(nano_dir, q, &o, &err) == KLI_OK, "kli_quantize --type q4_k: %s", err.msg);
    ok(st_dtype(q, "model.layers.1.self_attn.q_proj.weight", buf, sizeof(buf)) &&
       strcmp(buf, "KLI_Q4_K") == 0 &&
       st_dtype(q, "model.layers.1.block_sparse_moe.experts.0.w2.weight", buf, sizeof(buf)) &&
       strcmp(buf, "KLI_Q8_0") == 0 &&
       st_dtype(q, "model.layers.1.block_sparse_moe.gate.weight", buf, sizeof(buf)) &&
       strcmp(buf, "BF16") == 0, "256-column matrices are KLI_Q4_K, 64-column ones take the "
       "Q8_0 fallback, the router stays BF16");
    /* kli info's bits per weight: the experts hold Q4_K and the Q8_0 fallback */
    struct kli_model *mi = NULL;
    char info[8192] = "";
    if (kli_model_open(&mi, q, NULL, &err) == KLI_OK)
        kli_model_describe(mi, 0, info, sizeof(info));
    kli_model_close(mi);
    char *bpw = strstr(info, "bits/weight:");
    ok(bpw != NULL && strstr(bpw, "experts 5.83 (Q8_0+Q4_K)") != NULL &&
       strstr(bpw, "embeddings 4.50 (Q4_K)") != NULL && strstr(bpw, "router 16.00 (BF16)"),
       "kli info: bits per weight per class, the fallback shown (%.60s...)",
       bpw != NULL ? bpw : "no bits/weight line");
    /* a keep rule naming a K type */
    const char *keep[] = {"*.mlp.*=q2_k"};
    char qk[4200];
    snprintf(qk, sizeof(qk), "%s/keep", dir);
    kli_quantize_options_init(&o);
    o.keep = keep;
    o.n_keep = 1;
    memset(&err, 0, sizeof(err));
    ok(kli_quantize(nano_dir, qk, &o, &err) == KLI_OK &&
       st_dtype(qk, "model.layers.0.mlp.up_proj.weight", buf, sizeof(buf)) &&
       strcmp(buf, "KLI_Q2_K") == 0 &&
       st_dtype(qk, "model.layers.0.self_attn.o_proj.weight", buf, sizeof(buf)) &&
       strcmp(buf, "KLI_Q8_0") == 0, "--keep '*.mlp.*=q2_k' under q8_0: the dense MLP in Q2_K %s",
       err.msg);
    float *lq = tl_logits_of(q, NULL, nano_ids, n, &V);
    float *lc = tl_logits_of(nano_dir, "q4_k", nano_ids, n, &V);
    ok(lq != NULL && lc != NULL && memcmp(lq, lc, (size_t)n * V * sizeof(float)) == 0,
       "the q4_k checkpoint gives load-time q4_k conversion's logits bit for bit");
    kli_convert_options_init(&o);
    o.type = "q3_k";
    memset(&err, 0, sizeof(err));
    ok(kli_convert(nano_dir, kl, &o, &err) == KLI_OK, "kli_convert --type q3_k: %s", err.msg);
    float *lk = tl_logits_of(kl, NULL, nano_ids, n, &V);
    float *l3 = tl_logits_of(nano_dir, "q3_k", nano_ids, n, &V);
    ok(lk != NULL && l3 != NULL && memcmp(lk, l3, (size_t)n * V * sizeof(float)) == 0,
       "the q3_k .kli gives load-time q3_k conversion's logits bit for bit");
    /* edge mode: the routed experts read from the file into a bounded cache */
    struct kli_model_options mo;
    struct kli_model *me = NULL, *mr = NULL;
    float *le = NULL, *lr = NULL;
    kli_model_options_init(&mo);
    mo.gpu = KLI_GPU_OFF;   /* with a GPU the resident run would compute MLA there */
    memset(&err, 0, sizeof(err));
    if (kli_model_open(&mr, kl, &mo, &err) == KLI_OK)
        lr = tl_logits(mr, nano_ids, n, 0, &err);
    mo.mem_budget = (uint64_t)48 << 20;
    if (lr != NULL && kli_model_open(&me, kl, &mo, &err) == KLI_OK)
        le = tl_logits(me, nano_ids, n, 0, &err);
    ok(le != NULL && lr != NULL && memcmp(le, lr, (size_t)n * V * sizeof(float)) == 0,
       "edge mode (--mem-budget 48M) on the q3_k .kli: the resident logits (CPU) bit for bit %s",
       err.msg);
    kli_model_close(me);
    kli_model_close(mr);
    free(le);
    free(lr);
    struct kli_model *m = NULL;
    memset(&err, 0, sizeof(err));
    ok(kli_model_open(&m, kl, NULL, &err) == KLI_OK &&
       kli_model_verify(m, NULL, NULL, &err) == KLI_OK, "the q3_k .kli verifies: %s", err.msg);
    kli_model_close(m);
    m = NULL;
    /* one bit flipped in the middle of the file: inside a Q3_K tensor's bytes */
    size_t klen = 0;
    uint8_t *img = (uint8_t *)tl_slurp(kl, &klen);
    if (img != NULL) {
        img[klen / 2] ^= 0x10;
        tl_spill(kl, img, klen);
        free(img);
    }
    memset(&err, 0, sizeof(err));
    ok(img != NULL && kli_model_open(&m, kl, NULL, &err) == KLI_OK &&
       kli_model_verify(m, NULL, NULL, &err) == KLI_E_FORMAT && strstr(err.msg, "checksum"),
       "a damaged Q3_K tensor is named by verification: %s", err.msg);
    kli_model_close(m);
    m = NULL;
    free(lq);
    free(lc);
    free(lk);
    free(l3);

    /* damaged K tensors in a safetensors header */
    char bad[4200];
    snprintf(bad, sizeof(bad), "%s/bad", dir);
    mkdir(bad, 0777);
    char cfg[4300], cfg2[4300];
    size_t clen = 0;
    snprintf(cfg, sizeof(cfg), "%s/config.json", nano_dir);
    snprintf(cfg2, sizeof(cfg2), "%s/config.json", bad);
    char *ctext = tl_slurp(cfg, &clen);
    if (ctext != NULL)
        tl_spill(cfg2, ctext, clen);
    free(ctext);
    write_one_tensor(bad, "KLI_Q4_K", 2, 64, 144);
    memset(&err, 0, sizeof(err));
    ok(kli_model_open(&m, bad, NULL, &err) != KLI_OK && strstr(err.msg, "whole blocks of 256"),
       "a KLI_Q4_K tensor with 64-column rows is refused: %s", err.msg);
    write_one_tensor(bad, "KLI_Q6_K", 2, 256, 2 * 210 - 1);
    memset(&err, 0, sizeof(err));
    ok(kli_model_open(&m, bad, NULL, &err) != KLI_OK && strstr(err.msg, "\"t\"") != NULL,
       "a KLI_Q6_K tensor one byte short is refused, naming it: %s", err.msg);
    kli_model_close(m);
    ok(tl_rmtree(dir) == 0, "clean up");
}

/* Weights that favour every other column lower those columns' own (unweighted) error and
 * raise the rest's, against the unweighted quantizer. */
static void
weighted_channels(void)
{
    uint64_t st = 41;   /* each case starts from its seed */
    int rows = 16, k = 512, good = 1;
    float *x = gauss_rows(&st, rows, k), *imp = tl_malloc((size_t)k * sizeof(float));
    float *even = tl_malloc((size_t)k * sizeof(float)), *odd = tl_malloc((size_t)k * 4);
    for (int j = 0; j < k; j++) {
        imp[j] = j % 2 == 0 ? 8.0f : 1.0f;
        even[j] = j % 2 == 0 ? 1.0f : 0.0f;   /* each half's own error, unweighted */
        odd[j] = 1.0f - even[j];
    }
    for (int t = 0; t < 7; t++) {
        double f0 = rel_err(ktypes[t], x, rows, k, NULL, even);
        double f1 = rel_err(ktypes[t], x, rows, k, imp, even);
        double o0 = rel_err(ktypes[t], x, rows, k, NULL, odd);
        double o1 = rel_err(ktypes[t], x, rows, k, imp, odd);
        diag("%s favoured columns %.5f -> %.5f, the others %.5f -> %.5f",
             k_dtype_name(ktypes[t]), f0, f1, o0, o1);
        good &= t < 5 ? f1 < 0.97 * f0 && o1 > o0 : f1 <= f0;
    }
    ok(good, "weights favouring half the columns lower their error (K types by > 3%%, at "
       "the others' cost; Q4 and Q8_0 never raise it)");
    free(x);
    free(imp);
    free(even);
    free(odd);
}

/* H = a a^T / r + eps I for a random k x r a: inputs with strong correlations. */
static double *
corr_h(uint64_t *st, int k, int r, double eps)
{
    double *a = tl_malloc((size_t)k * r * sizeof(double));
    double *h = tl_malloc((size_t)k * k * sizeof(double));

    for (int i = 0; i < k * r; i++)
        a[i] = tl_normal(st);
    for (int i = 0; i < k; i++) {
        for (int j = 0; j < k; j++) {
            double t = i == j ? eps : 0.0;
            for (int p = 0; p < r; p++)
                t += a[i * r + p] * a[j * r + p] / r;
            h[i * k + j] = t;
        }
    }
    free(a);
    return h;
}

/* u^T u (H + damp mean(diag H) I) = I, u upper triangular; no factor for an H that is not
 * positive definite. */
static void
feedback_factor(void)
{
    uint64_t st = 43;   /* each case starts from its seed */

    int k = 48;
    double *h = corr_h(&st, k, 8, 0.05), md = 0.0, worst = 0.0;
    float *u = tl_malloc((size_t)k * k * sizeof(float));
    int upper = 1;
    for (int i = 0; i < k; i++)
        md += h[i * k + i] / k;
    ok(kq_hinv_factor(h, k, 0.1, u) == 0, "a positive definite H is factored");
    for (int i = 0; i < k; i++) {
        for (int j = 0; j < k; j++) {
            double t = 0.0;   /* (u^T u H')[i][j] */
            for (int p = 0; p < k; p++) {
                double g = 0.0;
                for (int q = 0; q < k; q++)
                    g += (double)u[q * k + i] * u[q * k + p];
                t += g * (h[p * k + j] + (p == j ? 0.1 * md : 0.0));
            }
            double d = fabs(t - (i == j ? 1.0 : 0.0));
            worst = d > worst ? d : worst;
            upper &= j >= i || u[i * k + j] == 0.0f;
        }
    }
    ok(upper && worst < 1e-4, "u is upper triangular and u^T u H' = I to %.2g", worst);
    for (int i = 0; i < k * k; i++)
        h[i] = 0.0;
    ok(kq_hinv_factor(h, k, 0.0, u) != 0, "a zero H without damping is refused");
    h[0] = -1.0;
    ok(kq_hinv_factor(h, 1, 0.0, u) != 0, "a negative 1 x 1 H is refused");
    free(h);
    free(u);
}

/* sum over rows of e^T H e, e a row's error through dt: with error feedback (u) or without
 * (the per-column weights diag H). */
static double
out_err(enum k_dtype dt, const float *x, int rows, int k, const double *h, const float *u)
{
    uint8_t *q = tl_malloc((size_t)dtype_nbytes(dt, (uint64_t)k));
    float *y = tl_malloc((size_t)k * sizeof(float)), *tmp = tl_malloc((size_t)k * 4);
    float *dg = tl_malloc((size_t)k * sizeof(float));
    double *e = tl_malloc((size_t)k * sizeof(double)), sum = 0.0;

    for (int j = 0; j < k; j++)
        dg[j] = (float)h[j * k + j];
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * k;
        if (u != NULL)
            kq_from_f32_h(dt, xr, q, k / 256, dg, u, tmp);
        else
            dtype_from_f32_w(dt, xr, q, k, dg);
        dtype_to_f32(dt, q, y, k);
        for (int j = 0; j < k; j++)
            e[j] = (double)y[j] - xr[j];
        for (int i = 0; i < k; i++)
            for (int j = 0; j < k; j++)
                sum += e[i] * h[i * k + j] * e[j];
    }
    free(q);
    free(y);
    free(tmp);
    free(dg);
    free(e);
    return sum;
}

/* Inputs with strong correlations: error feedback lowers the output error e^T H e well
 * below what the per-column weights reach; a diagonal H gives the weighted bytes. */
static void
feedback_lower(void)
{
    uint64_t st = 47;   /* each case starts from its seed */
    int rows = 8, k = 512, lower = 1, same = 1;
    float *x = gauss_rows(&st, rows, k), *u = tl_malloc((size_t)k * k * sizeof(float));
    double *h = corr_h(&st, k, 32, 0.05);
    ok(kq_hinv_factor(h, k, 0.01, u) == 0, "H factored");
    for (int t = 0; t < 5; t++) {
        double ew = out_err(ktypes[t], x, rows, k, h, NULL);
        double ef = out_err(ktypes[t], x, rows, k, h, u);
        diag("%s output error %.4g with the weights, %.4g with feedback (%.1f%% lower)",
             k_dtype_name(ktypes[t]), ew, ef, 100.0 * (1.0 - ef / ew));
        lower &= ef < 0.8 * ew;
    }
    ok(lower, "error feedback lowers the output error by > 20%% in every K type");
    /* a diagonal H: u diagonal, nothing spread */
    for (int i = 0; i < k; i++)
        for (int j = 0; j < k; j++)
            h[i * k + j] = i == j ? 0.5 + (double)(i % 7) : 0.0;
    ok(kq_hinv_factor(h, k, 0.0, u) == 0, "diagonal H factored");
    float *dg = tl_malloc((size_t)k * sizeof(float)), *tmp = tl_malloc((size_t)k * 4);
    for (int j = 0; j < k; j++)
        dg[j] = (float)h[j * k + j];
    for (int t = 0; t < 5; t++) {
        size_t nb = (size_t)dtype_nbytes(ktypes[t], (uint64_t)k);
        uint8_t *p = tl_malloc(nb), *q = tl_malloc(nb);
        for (int r = 0; r < rows; r++) {
            dtype_from_f32_w(ktypes[t], x + (size_t)r * k, p, k, dg);
            kq_from_f32_h(ktypes[t], x + (size_t)r * k, q, k / 256, dg, u, tmp);
            same &= memcmp(p, q, nb) == 0;
        }
        free(p);
        free(q);
    }
    ok(same, "a diagonal H gives the weighted quantizer's bytes in every K type");
    free(x);
    free(h);
    free(u);
    free(dg);
    free(tmp);
}

/* The scale search of kq_from_f32_h, on rows of one super-block: there its loss, sum of
 * (error_j / u_jj)^2, is the whole row's e^T H' e (H' the damped H), so the scales it keeps
 * can never give a larger e^T H' e than the first ones (passes 0), and on correlated inputs
 * they give less. */
static void
feedback_search(void)
{
    uint64_t st = 53;   /* each case starts from its seed */
    int rows = 24, k = 256, never_worse = 1, lower = 1;
    float *x = gauss_rows(&st, rows, k), *u = tl_malloc((size_t)k * k * sizeof(float));
    float *dg = tl_malloc((size_t)k * sizeof(float)), *tmp = tl_malloc((size_t)k * 4);
    float *y = tl_malloc((size_t)k * sizeof(float));
    double *h = corr_h(&st, k, 16, 0.05), md = 0.0;
    for (int j = 0; j < k; j++) {
        dg[j] = (float)h[j * k + j];
        md += h[j * k + j] / k;
    }
    ok(kq_hinv_factor(h, k, 0.2, u) == 0, "H factored");
    for (int j = 0; j < k; j++)
        h[j * k + j] += 0.2 * md;   /* H' */
    for (int t = 0; t < 5; t++) {
        size_t nb = (size_t)dtype_nbytes(ktypes[t], (uint64_t)k);
        uint8_t *q = tl_malloc(nb);
        double sum[2] = {0.0, 0.0};
        for (int r = 0; r < rows; r++) {
            const float *xr = x + (size_t)r * k;
            double e2[2];
            for (int v = 0; v < 2; v++) {
                kq_from_f32_hp(ktypes[t], xr, q, 1, dg, u, tmp, v == 0 ? 0 : 4);
                dtype_to_f32(ktypes[t], q, y, k);
                e2[v] = 0.0;
                for (int i = 0; i < k; i++)
                    for (int j = 0; j < k; j++)
                        e2[v] += ((double)y[i] - xr[i]) * h[i * k + j] * ((double)y[j] - xr[j]);
                sum[v] += e2[v];
            }
            never_worse &= e2[1] <= e2[0] * (1.0 + 1e-5);
        }
        diag("%s e^T H' e: first scales %.4g, searched %.4g (%.1f%% lower)",
             k_dtype_name(ktypes[t]), sum[0], sum[1], 100.0 * (1.0 - sum[1] / sum[0]));
        lower &= sum[1] < sum[0];
        free(q);
    }
    ok(never_worse, "no row's searched scales give a larger e^T H' e than the first scales");
    ok(lower, "the search lowers e^T H' e in every K type");
    free(x);
    free(u);
    free(dg);
    free(tmp);
    free(y);
    free(h);
}

static const struct tap_fn cases[] = {
    {"layout_table", layout_table},
    {"layout_q2_k", layout_q2_k},
    {"layout_q3_k", layout_q3_k},
    {"layout_q4_k", layout_q4_k},
    {"layout_q5_k", layout_q5_k},
    {"layout_q6_k", layout_q6_k},
    {"error_gauss", error_gauss},
    {"error_outliers", error_outliers},
    {"weighted_lower", weighted_lower},
    {"weighted_null", weighted_null},
    {"weighted_channels", weighted_channels},
    {"feedback_factor", feedback_factor},
    {"feedback_lower", feedback_lower},
    {"feedback_search", feedback_search},
    {"edge_values", edge_values},
    {"matmul", matmul_tables},
    {"nano", nano_logits},
    {"files", files},
};

TAP_MAIN(cases)
