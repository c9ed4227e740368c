/*
 * test-gguf-llama.c - GGUF files made by llama.cpp's own tools, read by kli.
 *
 * The fixtures in tests/data/gguf/llama were written by llama.cpp's convert_hf_to_gguf.py
 * (F32, BF16, Q8_0 and a vocabulary-only file) and quantized with ggml's own quantizers
 * (the K mixes); tests/data/gguf/README.md says how. Each is checked against the model it
 * was made from: the weights kli reads against the safetensors weights, within each type's
 * rounding; the logits; the tokenizer against the tiktoken.model it came from.
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "dtype.h"
#include "kli.h"
#include "tap.h"
#include "testlib.h"
#include "util.h"
#include "weights.h"

/* The token ids the logits cases feed: the first 40 of the tiny model's golden prompt (set
 * in main; every id is below both models' vocabularies). */
static kli_token ids[40];

#define TINY "tiny-kimi-linear"
#define NANO "../../contrib/models/kimi-linear-nano"

/* A fixture, the safetensors model it was made from, and the largest relative L2 distance
 * of any matrix kli reads from it to that model's weights (the coarsest type's rounding
 * of these random weights with some room: a block read another way is near 1 or more). */
struct fixture {
    const char *file;
    const char *src;
    double bound;
};

static const struct fixture fixtures[] = {
    {"gguf/llama/tiny-f32.gguf", TINY, 1e-6},
    {"gguf/llama/tiny-bf16.gguf", TINY, 1e-6},
    {"gguf/llama/tiny-q8_0.gguf", TINY, 0.01},
    {"gguf/llama/tiny-q4_k_m.gguf", TINY, 0.15},
    {"gguf/llama/nano-q4_k_m.gguf", NANO, 0.15},
    {"gguf/llama/nano-q2_k.gguf", NANO, 0.5},
};
#define N_FIXTURES (sizeof(fixtures) / sizeof(fixtures[0]))

/* Every tensor of the view of the fixture against the safetensors model's tensor of the
 * same name: the same number of elements (the view gives A_log and the conv weights the
 * shapes kli uses, not the checkpoint's), and its values (dtype_to_f32) within the bound. */
static void
test_weights(void)
{
    for (size_t f = 0; f < N_FIXTURES; f++) {
        char p[4200], s[4200];
        struct kli_err err = {0};
        struct wfile *w = NULL, *r = NULL;
        double worst = 0;
        const char *worst_name = "";
        int n = 0, same_shape = 0;

        tl_path(p, sizeof(p), fixtures[f].file);
        tl_path(s, sizeof(s), fixtures[f].src);
        if (wfile_open(&w, p, &err) != KLI_OK || wfile_open(&r, s, &err) != KLI_OK) {
            ok(0, "%s: open: %s", fixtures[f].file, err.msg);
            wfile_close(w);
            continue;
        }
        n = (int)wfile_n_tensors(r);
        for (int i = 0; i < n; i++) {
            const struct tensor_desc *b = wfile_tensor(r, i), *a = wfile_find(w, b->name);
            if (a == NULL || a->numel != b->numel) {
                diag("%s: %s missing or of another size", fixtures[f].file, b->name);
                continue;
            }
            same_shape++;
            float *x = tl_malloc((size_t)a->numel * sizeof(float));
            float *y = tl_malloc((size_t)b->numel * sizeof(float));
            dtype_to_f32(a->dtype, a->data, x, a->numel);
            dtype_to_f32(b->dtype, b->data, y, b->numel);
            double e = tl_rel_l2(x, y, a->numel);
            if (!(e <= worst)) {
                worst = e;
                worst_name = b->name;
            }
            free(x);
            free(y);
        }
        ok(n > 40 && same_shape == n && wfile_n_tensors(w) == n,
           "%s: the %d tensors of the safetensors model, of the same sizes (%d)",
           fixtures[f].file, n, same_shape);
        ok(worst <= fixtures[f].bound, "%s: every tensor within rel L2 %g of the model's "
           "(worst %.3g, %s)", fixtures[f].file, fixtures[f].bound, worst, worst_name);
        wfile_close(w);
        wfile_close(r);
    }
}

/* F32 and BF16 files: the safetensors model's logits. BF16 runs the same kernels on the same
 * bits, over 40 tokens; F32 holds the same values but runs the F32 kernels, whose other
 * order of summation the recurrent state carries on (rel L2 1e-6 after 40 tokens under the
 * generic kernels), so 8 tokens, as test-gguf's F32 case. */
static void
test_logits_float(void)
{
    for (size_t f = 0; f < 2; f++) {
        char a[4200], b[4200];
        int n = f == 0 ? 8 : 40;
        double e = tl_logits_rel_l2(tl_path(b, sizeof(b), fixtures[f].file), NULL,
                                    tl_path(a, sizeof(a), TINY), NULL, ids, n);

        ok(e <= 1e-6, "%s: logits = safetensors logits (rel L2 %.3g <= 1e-6, %d tokens)",
           fixtures[f].file, e, n);
    }
}

/* Quantized files: one-token logits with the blocks used in place (kli's int8 kernels)
 * against logits on the same weights dequantized to F32 at open, for each of 12 tokens. The
 * int8 rounding of the activations differs (test-gguf's logits_quant says why the bound is
 * loose), and now and then it flips which experts the router picks, which moves that token's
 * logits far (seen: 1 token in 12, up to rel L2 1.2, in kli's own Q8_0 files as in these);
 * so the median is held: a block read another way leaves nothing in common for any token. */
static void
test_logits_quant(void)
{
    for (size_t f = 2; f < N_FIXTURES; f++) {
        char p[4200];
        double e[12];

        tl_path(p, sizeof(p), fixtures[f].file);
        for (int k = 0; k < 12; k++)
            e[k] = tl_logits_rel_l2(p, NULL, p, "f32", ids + k, 1);
        double med = util_median(e, 12);
        ok(med <= 0.05, "%s: logits = logits on its weights dequantized (median rel L2 over 12 "
           "tokens %.3g <= 0.05; least %.3g, most %.3g)", fixtures[f].file, med, e[0], e[11]);
    }
}

/* kli convert of each quantized file into a .kli (packed, the blocks as they are): the same
 * logits, bit for bit, on 8 tokens. */
static void
test_to_kli(void)
{
    char dir[] = "/tmp/kli-gguf-llama-XXXXXX";

    if (mkdtemp(dir) == NULL) {
        ok(0, "mkdtemp");
        return;
    }
    for (size_t f = 2; f < N_FIXTURES; f++) {
        char p[4200], out[4300];
        struct kli_err err = {0};

        snprintf(out, sizeof(out), "%s/%zu.kli", dir, f);
        int rc = kli_convert(tl_path(p, sizeof(p), fixtures[f].file), out, NULL, &err);
        ok(rc == KLI_OK && tl_same_logits(p, NULL, out, NULL, ids, 8),
           "%s -> .kli: the same logits, bit for bit: %s", fixtures[f].file, err.msg);
    }
    tl_rmtree(dir);
}

/* ok() that tokenizers a and b encode `len` bytes of text to the same ids with `flags`. */
static void
same_ids(struct kli_tokenizer *a, struct kli_tokenizer *b, const char *text, size_t len,
         int flags, const char *what)
{
    struct kli_err err = {0};
    kli_token *ia = tl_calloc(len + 16, sizeof(*ia)), *ib = tl_calloc(len + 16, sizeof(*ib));
    int64_t na = kli_tokenize(a, text, len, flags, ia, (int64_t)len + 16, &err);
    int64_t nb = kli_tokenize(b, text, len, flags, ib, (int64_t)len + 16, &err);

    ok(na > 0 && na == nb && memcmp(ia, ib, (size_t)na * sizeof(*ia)) == 0,
       "%s: the corpus (%zu bytes) encodes to the same %lld ids as tiktoken.model (%s)", what,
       len, (long long)na, flags ? "special tokens" : "ordinary");
    free(ia);
    free(ib);
}

/* The tokenizer rebuilt from each file's metadata against the tiktoken.model of the
 * directory it was made from, on tests/data/tokenizer/corpus.txt (with and without special
 * tokens) and each token's bytes. */
static void
test_tokenizer(void)
{
    char c[4200];
    size_t len = 0;
    char *text = tl_slurp(tl_path(c, sizeof(c), "tokenizer/corpus.txt"), &len);

    /* vocab.gguf, then every model file */
    for (size_t i = 0; i <= N_FIXTURES; i++) {
        const char *file = i == 0 ? "gguf/llama/vocab.gguf" : fixtures[i - 1].file;
        const char *dir = i == 0 ? "tokenizer" : fixtures[i - 1].src;
        char g[4200], d[4200];
        struct kli_tokenizer *a = NULL, *b = NULL;
        struct kli_err err = {0};
        int rc = kli_tokenizer_open(&a, tl_path(d, sizeof(d), dir), &err);

        rc = rc == KLI_OK ? kli_tokenizer_open(&b, tl_path(g, sizeof(g), file), &err) : rc;
        ok(rc == KLI_OK, "%s: both tokenizers open: %s", file, err.msg);
        if (rc == KLI_OK) {
            int same = kli_tokenizer_n_vocab(a) == kli_tokenizer_n_vocab(b) &&
                       kli_tokenizer_n_base(a) == kli_tokenizer_n_base(b);
            for (kli_token t = 0; same && t < kli_tokenizer_n_vocab(a); t++) {
                size_t la, lb;
                const char *ba = kli_token_bytes(a, t, &la), *bb = kli_token_bytes(b, t, &lb);
                same &= la == lb && memcmp(ba, bb, la) == 0;
            }
            ok(same, "%s: the same %d tokens (%d ranks), byte for byte", file,
               kli_tokenizer_n_vocab(b), kli_tokenizer_n_base(b));
            same_ids(a, b, text, len, 0, file);
            same_ids(a, b, text, len, KLI_TOKENIZE_SPECIAL, file);
        }
        kli_tokenizer_close(a);
        kli_tokenizer_close(b);
    }
    free(text);
}

int
main(int argc, char **argv)
{
    static const struct tap_fn cases[] = {
        {"weights", test_weights},
        {"logits_float", test_logits_float},
        {"logits_quant", test_logits_quant},
        {"to_kli", test_to_kli},
        {"tokenizer", test_tokenizer},
    };

    char d[4200];
    cJSON *golden = tl_load_json(tl_path(d, sizeof(d), TINY), "golden.json");
    const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(golden, "prompt");

    tap_init(argc, argv);
    if (cJSON_GetArraySize(prompt) < 40) {
        printf("Bail out! %s/golden.json: no prompt of 40 ids\n", d);
        return 1;
    }
    for (int i = 0; i < 40; i++)
        ids[i] = (kli_token)cJSON_GetArrayItem(prompt, i)->valueint;
    cJSON_Delete(golden);
    tap_run(cases, sizeof(cases) / sizeof(cases[0]));
    plan_done();
    return tap_exit();
}
