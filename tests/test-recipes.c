/*
 * test-recipes.c - the recipes of kli quantize --type (src/quantize.c, kli(1)).
 *
 * parse: recipe and dtype names, any case, and an unknown name naming the valid ones;
 * classes: quantize_class on the nano model's tensors (KDA and MLA told apart by layer);
 * files: each recipe on the nano model, every tensor in its class's type (short rows in the
 * fallback), and kli info's bits per weight per class equal to the bytes the table gives;
 * keep: --keep rules override a recipe; size48: the recipes' arithmetic on the shapes of
 * Kimi-Linear-48B-A3B (doc/model.md 2), whose sizes kli(1) lists.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kli.h"
#include "model.h"
#include "quantize.h"
#include "tap.h"
#include "testlib.h"
#include "weights.h"

static const char *const recipes[] = {"q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "q8_0"};
#define N_RECIPES ((int)(sizeof(recipes) / sizeof(recipes[0])))

static char nano_dir[4096];
static char tmpdir[] = "/tmp/kli-recipes-XXXXXX";

static void
case_parse(void)
{
    struct quant_plan p;
    struct kli_err err = {0};
    int good = 1;

    for (int r = 0; r < N_RECIPES; r++) {
        memset(&p, 0xff, sizeof(p));
        good &= quantize_plan(recipes[r], &p, &err) == KLI_OK && p.recipe == 1 &&
                p.type[QC_ROUTER] == KLI_DT_COUNT && p.type[QC_OTHER] == KLI_DT_COUNT &&
                dtype_is_k(p.type[QC_EXPERTS]) == (r < 5);
    }
    ok(good, "every recipe parses; the router and norms stay stored, experts K types but q8_0");
    ok(quantize_plan("Q4_K_M", &p, &err) == KLI_OK && p.recipe &&
       p.type[QC_EXPERTS] == KLI_DT_Q4_K, "recipe names in any case");
    good = quantize_plan("q4_k", &p, &err) == KLI_OK && !p.recipe;
    for (int c = 0; c < QC_N; c++)
        good &= p.type[c] == (c == QC_ROUTER || c == QC_OTHER ? KLI_DT_COUNT : KLI_DT_Q4_K);
    ok(good, "a dtype name: every matrix class in it, the router stored");
    good = quantize_plan(NULL, &p, &err) == KLI_OK;
    for (int c = 0; c < QC_N; c++)
        good &= p.type[c] == KLI_DT_COUNT;
    ok(good, "no type: everything as stored (kli convert's default)");
    int rc = quantize_plan("q4_k_s", &p, &err);
    ok(rc == KLI_E_RANGE && strstr(err.msg, "\"q4_k_s\"") != NULL &&
       strstr(err.msg, KLI_RECIPE_NAMES) != NULL && strstr(err.msg, KLI_DTYPE_NAMES) != NULL,
       "an unknown name names the recipes and the types: %s", err.msg);
    struct kli_convert_options o;
    kli_quantize_options_init(&o);
    o.type = "q3_k_l";
    memset(&err, 0, sizeof(err));
    char out[4200];
    snprintf(out, sizeof(out), "%s/never", tmpdir);
    ok(kli_quantize(nano_dir, out, &o, &err) == KLI_E_RANGE && strstr(err.msg, "q3_k_m") &&
       access(out, F_OK) != 0, "kli_quantize refuses it before writing: %s", err.msg);
}

static void
case_classes(void)
{
    static const struct {
        const char *name;
        enum quant_class c;
    } want[] = {
        {"model.embed_tokens.weight", QC_EMBED},
        {"lm_head.weight", QC_LM_HEAD},
        {"model.norm.weight", QC_OTHER},
        {"model.layers.0.self_attn.q_proj.weight", QC_KDA},
        {"model.layers.0.self_attn.f_b_proj.weight", QC_KDA},
        {"model.layers.0.self_attn.q_conv1d.weight", QC_OTHER},
        {"model.layers.0.self_attn.A_log", QC_OTHER},
        {"model.layers.0.mlp.down_proj.weight", QC_DENSE},
        {"model.layers.3.self_attn.q_proj.weight", QC_MLA},
        {"model.layers.3.self_attn.kv_b_proj.weight", QC_MLA},
        {"model.layers.3.self_attn.kv_a_layernorm.weight", QC_OTHER},
        {"model.layers.2.block_sparse_moe.gate.weight", QC_ROUTER},
        {"model.layers.2.block_sparse_moe.gate.e_score_correction_bias", QC_OTHER},
        {"model.layers.2.block_sparse_moe.experts.5.w2.weight", QC_EXPERTS},
        {"model.layers.2.block_sparse_moe.shared_experts.up_proj.weight", QC_SHARED},
    };
    struct wfile *wf = NULL;
    struct kli_err err = {0};
    int good;

    good = wfile_open(&wf, nano_dir, &err) == KLI_OK;
    for (size_t i = 0; good && i < sizeof(want) / sizeof(want[0]); i++) {
        const struct tensor_desc *d = wfile_find(wf, want[i].name);
        enum quant_class c = d != NULL ? quantize_class(wf, d) : QC_N;
        if (c != want[i].c) {
            diag("%s: class %s, want %s", want[i].name, quantize_class_name(c),
                 quantize_class_name(want[i].c));
            good = 0;
        }
    }
    ok(good, "the nano model's tensors in their classes (layer 3, with kv_a_proj, is MLA)");
    wfile_close(wf);
}

/* The class's "NAME BITS (" of a kli info description, or -1. */
static double
info_bits(const char *desc, enum quant_class c)
{
    char key[64];
    const char *p;

    snprintf(key, sizeof(key), " %s ", quantize_class_name(c));
    if ((p = strstr(desc, "bits/weight:")) == NULL || (p = strstr(p, key)) == NULL)
        return -1.0;
    return atof(p + strlen(key));
}

/* Quantizes nano to `out` with --type type and the rules; opens the input and output. */
static int
quantize_nano(const char *type, const char *const *keep, int32_t n_keep, const char *out,
              struct wfile **in, struct wfile **res)
{
    struct kli_convert_options o;
    struct kli_err err = {0};

    kli_quantize_options_init(&o);
    o.type = type;
    o.keep = keep;
    o.n_keep = n_keep;
    o.force = 1;
    if (kli_quantize(nano_dir, out, &o, &err) != KLI_OK ||
        wfile_open(in, nano_dir, &err) != KLI_OK || wfile_open(res, out, &err) != KLI_OK) {
        diag("%s: %s", type, err.msg);
        return -1;
    }
    return 0;
}

/* What the recipe table says tensor d is written in, worked out here from the plan: the
 * class's type, a K type on rows not whole super-blocks in Q8_0, stored for the rest. */
static enum k_dtype
expected(const struct wfile *wf, const struct tensor_desc *d, const struct quant_plan *p)
{
    enum k_dtype t = p->type[quantize_class(wf, d)];
    int64_t cols = d->shape[d->ndim - 1];

    if (t == KLI_DT_COUNT || d->ndim != 2 || strstr(d->name, "norm") != NULL)
        return d->dtype;
    if (dtype_is_k(t) && cols % KLI_QK_K != 0)
        return KLI_DT_Q8_0;
    return t;
}

static void
case_files(void)
{
    for (int r = 0; r < N_RECIPES; r++) {
        struct wfile *in = NULL, *res = NULL;
        struct quant_plan p;
        struct kli_err err = {0};
        struct kli_model *m = NULL;
        uint64_t bytes[QC_N] = {0};
        int64_t n[QC_N] = {0};
        char out[4200], desc[8192];
        int good, fallback = 0;

        snprintf(out, sizeof(out), "%s/%s", tmpdir, recipes[r]);
        good = quantize_nano(recipes[r], NULL, 0, out, &in, &res) == 0 &&
               quantize_plan(recipes[r], &p, &err) == KLI_OK;
        for (int64_t i = 0; good && i < wfile_n_tensors(in); i++) {
            const struct tensor_desc *d = wfile_tensor(in, i);
            const struct tensor_desc *q = wfile_find(res, d->name);
            enum k_dtype e = expected(in, d, &p);
            enum quant_class c = quantize_class(in, d);
            if (q == NULL || q->dtype != e) {
                diag("%s: %s is %s, want %s", recipes[r], d->name,
                     q != NULL ? k_dtype_name(q->dtype) : "missing", k_dtype_name(e));
                good = 0;
                break;
            }
            fallback += e == KLI_DT_Q8_0 && p.type[c] != KLI_DT_Q8_0;
            bytes[c] += q->nbytes;
            n[c] += q->numel;
        }
        ok(good, "%s: every tensor in its class's type, %d short-row matrices in Q8_0",
           recipes[r], fallback);
        good = good && kli_model_open(&m, out, NULL, &err) == KLI_OK &&
               kli_model_describe(m, 0, desc, sizeof(desc)) < sizeof(desc);
        for (int c = 0; good && c < QC_N; c++) {
            double want = 8.0 * (double)bytes[c] / (double)n[c], got = info_bits(desc, c);
            if (got < want - 0.006 || got > want + 0.006) {
                diag("%s: %s %.3f bits per weight, kli info says %.2f", recipes[r],
                     quantize_class_name(c), want, got);
                good = 0;
            }
        }
        ok(good, "%s: kli info's bits per weight per class are the table's", recipes[r]);
        kli_model_close(m);
        wfile_close(in);
        wfile_close(res);
    }
}

static void
case_keep(void)
{
    static const char *const keep[] = {
        "lm_head.weight=q8_0", "*.experts.*=keep", "*.gate.weight=q6_k",
    };
    struct wfile *in = NULL, *res = NULL;
    char out[4200];
    const struct tensor_desc *d;
    int good;

    snprintf(out, sizeof(out), "%s/keep", tmpdir);
    good = quantize_nano("q4_k_m", keep, 3, out, &in, &res) == 0;
    good = good && (d = wfile_find(res, "lm_head.weight")) != NULL && d->dtype == KLI_DT_Q8_0;
    good = good && (d = wfile_find(res, "model.layers.1.block_sparse_moe.experts.2.w1.weight"))
                   != NULL && d->dtype == KLI_DT_BF16;
    good = good && (d = wfile_find(res, "model.layers.1.block_sparse_moe.gate.weight")) != NULL
           && d->dtype == KLI_DT_Q6_K;
    good = good && (d = wfile_find(res, "model.layers.0.self_attn.q_proj.weight")) != NULL &&
           d->dtype == KLI_DT_Q6_K;
    good = good && (d = wfile_find(res, "model.layers.3.self_attn.q_proj.weight")) != NULL &&
           d->dtype == KLI_DT_Q4_K;
    ok(good, "--keep overrides q4_k_m (lm_head q8_0, experts stored, router q6_k); the rest "
       "keeps the recipe's types");
    wfile_close(in);
    wfile_close(res);
}

/*
 * The released model's matrices (doc/model.md 2): class, rows, columns, how many. Stored
 * (BF16) besides: the norms, convolution taps, A_log, dt_bias, e_score_correction_bias.
 */
static const struct {
    enum quant_class c;
    int64_t rows, cols, count;
} shapes48[] = {
    {QC_EMBED, 163840, 2304, 1},
    {QC_LM_HEAD, 163840, 2304, 1},
    {QC_EXPERTS, 1024, 2304, 26 * 256 * 2},     /* w1, w3 */
    {QC_EXPERTS, 2304, 1024, 26 * 256},         /* w2 */
    {QC_SHARED, 1024, 2304, 26 * 2},
    {QC_SHARED, 2304, 1024, 26},
    {QC_KDA, 4096, 2304, 20 * 3},               /* q, k, v */
    {QC_KDA, 2304, 4096, 20},                   /* o */
    {QC_KDA, 128, 2304, 20 * 2},                /* f_a, g_a */
    {QC_KDA, 4096, 128, 20 * 2},                /* f_b, g_b: the fallback */
    {QC_KDA, 32, 2304, 20},                     /* b */
    {QC_MLA, 6144, 2304, 7},                    /* q */
    {QC_MLA, 576, 2304, 7},                     /* kv_a_proj_with_mqa */
    {QC_MLA, 8192, 512, 7},                     /* kv_b */
    {QC_MLA, 2304, 4096, 7},                    /* o */
    {QC_DENSE, 9216, 2304, 2},
    {QC_DENSE, 2304, 9216, 1},
    {QC_ROUTER, 256, 2304, 26},
    {QC_OTHER, 1, 2304, 1 + 27 * 2},            /* final norm, two per layer */
    {QC_OTHER, 1, 4096 * 3 * 4 + 32 + 4096 + 128, 20},  /* KDA conv, A_log, dt_bias, o_norm */
    {QC_OTHER, 1, 512, 7},                      /* kv_a_layernorm */
    {QC_OTHER, 1, 256, 26},                     /* e_score_correction_bias */
};

static void
case_size48(void)
{
    int64_t params = 0;
    int good = 1;

    for (size_t i = 0; i < sizeof(shapes48) / sizeof(shapes48[0]); i++)
        params += shapes48[i].rows * shapes48[i].cols * shapes48[i].count;
    ok(params == 49122681728LL, "the 48B model's shapes hold %lld parameters (doc/model.md: "
       "49,122,681,728)", (long long)params);
    for (int r = 0; r < N_RECIPES; r++) {
        struct quant_plan p;
        struct kli_err err = {0};
        double bytes = 0.0, ex = 0.0, fb = 0.0;
        quantize_plan(recipes[r], &p, &err);
        for (size_t i = 0; i < sizeof(shapes48) / sizeof(shapes48[0]); i++) {
            enum k_dtype t = p.type[shapes48[i].c];
            t = t == KLI_DT_COUNT ? KLI_DT_COUNT : dtype_fit(t, shapes48[i].cols);
            if (t == KLI_DT_COUNT)
                t = KLI_DT_BF16;
            double b = (double)dtype_nbytes(t, (uint64_t)shapes48[i].cols) *
                       (double)(shapes48[i].rows * shapes48[i].count);
            bytes += b;
            ex += shapes48[i].c == QC_EXPERTS ? b : 0.0;
            fb += t == KLI_DT_Q8_0 && p.type[shapes48[i].c] != KLI_DT_Q8_0 ? b : 0.0;
        }
        diag("48B %-7s %.2f bits/weight, %.1f GB = %.1f GiB (experts %.1f GiB; fallback "
             "%.2f GiB)", recipes[r], 8.0 * bytes / (double)params, bytes / 1e9,
             bytes / 1073741824.0, ex / 1073741824.0, fb / 1073741824.0);
        good &= r == 0 || bytes > 0.0;
        if (strcmp(recipes[r], "q4_k_m") == 0)
            good &= 8.0 * bytes / (double)params <= 4.9;
        if (strcmp(recipes[r], "q3_k_m") == 0)
            good &= 8.0 * bytes / (double)params <= 4.0;
    }
    ok(good, "on the 48B model q4_k_m <= 4.9 and q3_k_m <= 4.0 bits per weight");
}

int
main(int argc, char **argv)
{
    static const struct tap_fn cases[] = {
        {"parse", case_parse}, {"classes", case_classes}, {"files", case_files},
        {"keep", case_keep}, {"size48", case_size48},
    };
    char cmd[4300];

    tap_init(argc, argv);
    snprintf(nano_dir, sizeof(nano_dir), "%s/../../contrib/models/kimi-linear-nano", tl_data());
    if (mkdtemp(tmpdir) == NULL)
        skip_all("mkdtemp failed");
    tap_run(cases, sizeof(cases) / sizeof(cases[0]));
    snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
    if (system(cmd) != 0)
        diag("could not remove %s", tmpdir);
    plan_done();
    return tap_exit();
}
