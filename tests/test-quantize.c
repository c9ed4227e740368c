/*
 * test-quantize.c - quantized weights: the reference quantizers' error bounds, kli_quantize
 * on the tiny model (q8_0 and q4 checkpoints that load and stay close to the stored
 * weights), load-time conversion giving the same logits as the written checkpoint, keep
 * rules, and refusing to overwrite.
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
#include "tap.h"
#include "testlib.h"
#include "util.h"
#include "weights.h"

static char fixture[4096];

/* An interrupt callback that asks to stop at once. */
static int
stop_now(void *ud)
{
    (void)ud;
    return 1;
}

/* Median over rows of the per-row relative L2 error: a random-weight model routes on
 * near-ties, so a few rows flip an MoE choice and carry large errors; the median shows the
 * weight error itself, and the count of rows above 0.1 shows the flips. */
static double
median_row_err(const float *a, const float *b, int n, int32_t V, int *big)
{
    double e[256];

    *big = 0;
    for (int i = 0; i < n && i < 256; i++) {
        e[i] = tl_rel_l2(a + (size_t)i * V, b + (size_t)i * V, (size_t)V);
        *big += e[i] > 0.1;
    }
    qsort(e, (size_t)n, sizeof(double), util_cmp_double);
    return e[n / 2];
}

/* 1 when the 256 values x come back from a round trip through dt within amax / div * frac
 * (+1%) of each 32-block's largest |x|; q and y are scratch for 256 values. */
static int
round_trip_ok(enum k_dtype dt, const float *x, uint8_t *q, float *y, float div, float frac)
{
    int good = 1;

    dtype_from_f32(dt, x, q, 256);
    dtype_to_f32(dt, q, y, 256);
    for (int b = 0; b < 8; b++) {
        float amax = 0;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        for (int j = 0; j < 32; j++)
            good &= fabsf(x[b * 32 + j] - y[b * 32 + j]) <= amax / div * frac * 1.01f + 1e-7f;
    }
    return good;
}

struct want_dtype {
    const char *name;
    enum k_dtype dtype;
};

/* ok(what) when the `label` checkpoint at path opens and each of the n tensors has its dtype. */
static void
expect_dtypes(const char *path, const char *label, const struct want_dtype *want, int n,
              const char *what)
{
    struct wfile *wf = NULL;
    struct kli_err err = {0};
    int good = 1;

    if (wfile_open(&wf, path, &err) != KLI_OK) {
        ok(0, "open %s checkpoint: %s", label, err.msg);
        return;
    }
    for (int i = 0; i < n; i++) {
        const struct tensor_desc *t = wfile_find(wf, want[i].name);
        good = good && t != NULL && t->dtype == want[i].dtype;
    }
    ok(good, "%s", what);
    wfile_close(wf);
}

static int
argmax_agree(const float *a, const float *b, int n, int32_t V)
{
    int agree = 0;

    for (int i = 0; i < n; i++)
        agree += tl_argmax(a + (size_t)i * V, V) == tl_argmax(b + (size_t)i * V, V);
    return agree;
}

int
main(int argc, char **argv)
{
    const char *td = tl_data();
    struct kli_err err;
    char dir[] = "/tmp/kli-quant-XXXXXX";
    char out8[4200], out4[4200], outk[4200], cmd[4300];
    kli_token ids[96];
    int32_t V = 0;

    tap_init_whole(argc, argv);
    snprintf(fixture, sizeof(fixture), "%s/tiny-kimi-linear", td);
    if (mkdtemp(dir) == NULL)
        skip_all("mkdtemp failed");

    /* ---- reference quantizers: error within half a step per element ---- */
    {
        float x[256], y[256];
        uint8_t q[256 * 2];
        uint64_t r = 12345;
        for (int i = 0; i < 256; i++) {
            r ^= r << 13, r ^= r >> 7, r ^= r << 17;
            x[i] = (float)((int64_t)(r % 20001) - 10000) / 1000.0f * (i < 32 ? 0.01f : 1.0f);
        }
        int ok8 = round_trip_ok(KLI_DT_Q8_0, x, q, y, 127.0f, 0.5f);
        int ok4 = round_trip_ok(KLI_DT_Q4, x, q, y, 8.0f, 1.0f);
        ok(ok8, "q8_0 round trip within half a step of max|x|/127");
        ok(ok4, "q4 round trip within one step of max|x|/8 (the level opposite the extreme clips)");
        float z[32] = {0};
        dtype_from_f32(KLI_DT_Q4, z, q, 32);
        dtype_to_f32(KLI_DT_Q4, q, y, 32);
        int zeros = 1;
        for (int j = 0; j < 32; j++)
            zeros &= y[j] == 0.0f;
        ok(zeros, "an all-zero block stays zero");
    }

    for (int i = 0; i < 96; i++)
        ids[i] = (kli_token)((i * 37 + 11) % 256);
    float *ref = tl_logits_of(fixture, NULL, ids, 96, &V);
    ok(ref != NULL, "stored-weight logits");

    /* ---- q8_0 and q4 checkpoints ---- */
    struct kli_quantize_options qo;
    snprintf(out8, sizeof(out8), "%s/q8", dir);
    snprintf(out4, sizeof(out4), "%s/q4", dir);
    snprintf(outk, sizeof(outk), "%s/keep", dir);
    kli_quantize_options_init(&qo);
    memset(&err, 0, sizeof(err));
    ok(kli_quantize(fixture, out8, &qo, &err) == KLI_OK, "quantize q8_0: %s", err.msg);
    qo.type = "q4";
    ok(kli_quantize(fixture, out4, &qo, &err) == KLI_OK, "quantize q4: %s", err.msg);

    static const struct want_dtype q8[] = {
        {"model.layers.1.self_attn.q_proj.weight", KLI_DT_Q8_0},
        {"model.layers.1.block_sparse_moe.gate.weight", KLI_DT_BF16},
        {"model.layers.1.input_layernorm.weight", KLI_DT_BF16},
    };
    expect_dtypes(out8, "q8", q8, 3, "matrices are q8_0; router and norms stay bf16");

    float *l8 = tl_logits_of(out8, NULL, ids, 96, &V);
    float *l4 = tl_logits_of(out4, NULL, ids, 96, &V);
    if (ref && l8 && l4) {
        int b8, b4;
        double e8 = median_row_err(l8, ref, 96, V, &b8), e4 = median_row_err(l4, ref, 96, V, &b4);
        int a8 = argmax_agree(l8, ref, 96, V), a4 = argmax_agree(l4, ref, 96, V);
        diag("median row rel L2: q8_0 %.3g (%d rows > 0.1, top-1 %d/96), q4 %.3g (%d rows > "
             "0.1, top-1 %d/96)", e8, b8, a8, e4, b4, a4);
        ok(e8 < 0.1 && a8 >= 72, "q8_0 stays close to the stored weights");
        ok(e4 < 1.0 && e4 > e8, "q4 is further off than q8_0 but bounded");
    } else {
        ok(0, "q8_0 logits");
        ok(0, "q4 logits");
    }
    float *c8 = tl_logits_of(fixture, "q8_0", ids, 96, &V);
    ok(c8 && l8 && memcmp(c8, l8, (size_t)96 * V * sizeof(float)) == 0,
       "load-time q8_0 conversion gives the written checkpoint's logits bit for bit");
    float *cb = tl_logits_of(fixture, "bf16", ids, 96, &V);
    ok(cb && ref && memcmp(cb, ref, (size_t)96 * V * sizeof(float)) == 0,
       "bf16 to bf16 changes nothing");

    /* ---- keep rules and overwrite protection ---- */
    const char *keep[] = {"*.experts.*=keep", "lm_head.weight=f32"};
    kli_quantize_options_init(&qo);
    qo.keep = keep;
    qo.n_keep = 2;
    ok(kli_quantize(fixture, outk, &qo, &err) == KLI_OK, "quantize with keep rules");
    static const struct want_dtype kept[] = {
        {"model.layers.2.block_sparse_moe.experts.3.w2.weight", KLI_DT_BF16},
        {"lm_head.weight", KLI_DT_F32},
        {"model.layers.2.self_attn.v_proj.weight", KLI_DT_Q8_0},
    };
    expect_dtypes(outk, "keep", kept, 3, "experts kept bf16, lm_head f32, the rest q8_0");
    memset(&err, 0, sizeof(err));
    kli_quantize_options_init(&qo);
    ok(kli_quantize(fixture, out8, &qo, &err) == KLI_E_IO && strstr(err.msg, "--force"),
       "an existing output is not overwritten: %s", err.msg);
    memset(&err, 0, sizeof(err));
    qo.type = "q3";
    ok(kli_quantize(fixture, outk, &qo, &err) == KLI_E_RANGE, "unknown type: %s", err.msg);
    const char *badkeep[] = {"nonsense"};
    memset(&err, 0, sizeof(err));
    qo.type = "q8_0";
    qo.keep = badkeep;
    qo.n_keep = 1;
    qo.force = 1;
    ok(kli_quantize(fixture, outk, &qo, &err) == KLI_E_RANGE, "bad keep rule: %s", err.msg);

    /* ---- one options struct with kli_convert: its defaults (type NULL, "as stored") are
     * refused by kli_quantize, and its interrupt stops a quantization too ---- */
    struct kli_convert_options co;
    kli_convert_options_init(&co);
    memset(&err, 0, sizeof(err));
    ok(kli_quantize(fixture, outk, &co, &err) == KLI_E_RANGE && strstr(err.msg, "no weight type"),
       "kli_convert's defaults: no weight type for kli_quantize: %s", err.msg);
    struct stat before, after;
    snprintf(cmd, sizeof(cmd), "%s/model.safetensors", outk);
    kli_quantize_options_init(&co);
    co.force = 1;
    co.interrupt = stop_now;
    memset(&err, 0, sizeof(err));
    ok(stat(cmd, &before) == 0 &&
       kli_quantize(fixture, outk, &co, &err) == KLI_E_INTERRUPTED && stat(cmd, &after) == 0 &&
       after.st_ino == before.st_ino && after.st_size == before.st_size,
       "an interrupted quantization leaves the existing output as it was: %s", err.msg);

    free(ref);
    free(l8);
    free(l4);
    free(c8);
    free(cb);
    if (tl_rmtree(dir) != 0)
        diag("could not remove %s", dir);
    plan_done();
    return tap_exit();
}
