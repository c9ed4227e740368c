/* llama-logits: evaluate token ids with libllama, write every position's logits.
 *
 * usage: llama-logits MODEL.gguf IDS_FILE OUT.f32 [--kv f32|f16] [-t N] [--ubatch N]
 *        llama-logits --tokenize MODEL.gguf TEXT_FILE   (prints llama.cpp's token ids)
 *
 * IDS_FILE: token ids separated by commas and/or white space (as `kli logits --ids-file`).
 * OUT: n_tokens x n_vocab float32 in machine byte order, row i = logits after id i, no
 * header (the layout `kli logits` writes).  All ids go in one llama_decode() call, one
 * sequence, positions 0..n-1, logits requested for every position.  CPU backend only.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void die(const char *msg) {
    fprintf(stderr, "llama-logits: %s\n", msg);
    exit(1);
}

static int read_ids(const char *path, llama_token **out) {
    FILE *f = fopen(path, "r");
    if (!f) { perror(path); exit(1); }
    int n = 0, cap = 256;
    llama_token *v = malloc(cap * sizeof *v);
    int c;
    long cur = -1;
    while ((c = fgetc(f)) != EOF || cur >= 0) {
        if (c >= '0' && c <= '9') {
            cur = (cur < 0 ? 0 : cur) * 10 + (c - '0');
            if (cur > 0x7fffffff) die("id too large");
            continue;
        }
        if (c != EOF && c != ',' && c != ' ' && c != '\n' && c != '\t' && c != '\r')
            die("bad character in ids file");
        if (cur >= 0) {
            if (n == cap) { cap *= 2; v = realloc(v, cap * sizeof *v); }
            v[n++] = (llama_token)cur;
            cur = -1;
        }
        if (c == EOF) break;
    }
    fclose(f);
    *out = v;
    return n;
}

static int tokenize(const char *model_path, const char *text_path) {
    FILE *f = fopen(text_path, "rb");
    if (!f) { perror(text_path); return 1; }
    static char text[1 << 16];
    size_t len = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[len] = 0;
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) die("failed to load model");
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    static llama_token ids[1 << 16];
    int n = llama_tokenize(vocab, text, (int32_t)len, ids, 1 << 16, false, false);
    if (n < 0) die("llama_tokenize failed");
    for (int i = 0; i < n; i++) printf("%s%d", i ? " " : "", ids[i]);
    printf("\n");
    llama_model_free(model);
    llama_backend_free();
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "--tokenize")) return tokenize(argv[2], argv[3]);
    if (argc < 4) {
        fprintf(stderr, "usage: llama-logits MODEL.gguf IDS_FILE OUT.f32 [--kv f32|f16] [-t N] [--ubatch N]\n");
        return 2;
    }
    const char *model_path = argv[1], *ids_path = argv[2], *out_path = argv[3];
    enum ggml_type kv = GGML_TYPE_F16;   /* llama.cpp's default cache type */
    int threads = 1, ubatch = 0;
    for (int i = 4; i < argc; i++) {
        if (!strcmp(argv[i], "--kv") && i + 1 < argc) {
            i++;
            if (!strcmp(argv[i], "f32")) kv = GGML_TYPE_F32;
            else if (!strcmp(argv[i], "f16")) kv = GGML_TYPE_F16;
            else die("--kv: f32 or f16");
        } else if (!strcmp(argv[i], "-t") && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--ubatch") && i + 1 < argc) {
            ubatch = atoi(argv[++i]);
        } else {
            die("unknown option");
        }
    }

    llama_token *ids;
    int n = read_ids(ids_path, &ids);
    if (n <= 0) die("no ids");

    llama_backend_init();

    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.use_mmap = false;
    mp.check_tensors = true;
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) die("failed to load model");

    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= n_vocab) die("id out of the vocabulary");

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(n < 256 ? 256 : n);
    cp.n_batch = (uint32_t)n;
    cp.n_ubatch = (uint32_t)(ubatch > 0 ? ubatch : n);
    cp.n_seq_max = 1;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = kv;
    cp.type_v = kv;
    cp.no_perf = true;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) die("failed to create context");

    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = ids[i];
        b.pos[i] = i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = 1;
    }
    b.n_tokens = n;
    int rc = llama_decode(ctx, b);
    if (rc != 0) { fprintf(stderr, "llama-logits: llama_decode returned %d\n", rc); return 1; }

    FILE *o = fopen(out_path, "wb");
    if (!o) { perror(out_path); return 1; }
    for (int i = 0; i < n; i++) {
        const float *row = llama_get_logits_ith(ctx, i);
        if (!row) die("no logits for a position");
        if (fwrite(row, sizeof(float), (size_t)n_vocab, o) != (size_t)n_vocab) die("write failed");
    }
    if (fclose(o) != 0) die("write failed");
    fprintf(stderr, "llama-logits: %d tokens x %d vocab -> %s\n", n, n_vocab, out_path);

    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(ids);
    return 0;
}
