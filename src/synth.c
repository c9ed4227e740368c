/*
 * synth.c - kli_synth: a random-weight checkpoint with the real per-layer shapes of
 * Kimi-Linear-48B-A3B, for measuring speed on machines the real model does not fit
 * (doc/measuring.md section 2: 4 layers KDA, KDA, KDA, MLA, all MoE, 64 experts by
 * default).
 *
 * Weights are uniform with the standard deviation 1/sqrt(fan_in), so activations keep a
 * sane scale through the layers; norms are 1; the gate parameters are in their usual
 * ranges. Generated and written tensor by tensor, row slab by row slab.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "weights.h"

/* The shape of the released model (doc/model.md section 1). */
enum {
    SY_HIDDEN = 2304, SY_VOCAB = 163840, SY_KDA_HEADS = 32, SY_KDA_DIM = 128,
    SY_MLA_HEADS = 32, SY_LATENT = 512, SY_NOPE = 128, SY_ROPE = 64, SY_V = 128,
    SY_EXPERT_FF = 1024, SY_TOPK = 8, SY_DENSE_FF = 9216,
};

void
kli_synth_options_init(struct kli_synth_options *opt)
{
    *opt = (struct kli_synth_options){.size = sizeof(*opt), .n_layers = 4, .n_experts = 64,
                                      .type = "bf16", .seed = 1};
}

enum sy_init { SY_MAT, SY_ONES, SY_CONV, SY_ALOG, SY_DTBIAS, SY_SMALL };

struct sy_tensor {
    char name[128];
    int64_t rows, cols;   /* cols = 1 with ndim 1 */
    int ndim;
    enum k_dtype dt;
    enum sy_init init;
};

struct sy_list {
    struct sy_tensor *t;
    int64_t n, cap;
};

static int sy_add(struct sy_list *l, enum k_dtype dt, enum sy_init init, int64_t rows,
                  int64_t cols, int ndim, const char *fmt, ...) KLI_PRINTF(7, 8);

static int
sy_add(struct sy_list *l, enum k_dtype dt, enum sy_init init, int64_t rows, int64_t cols,
       int ndim, const char *fmt, ...)
{
    va_list ap;

    if (l->n == l->cap) {
        int64_t nc = l->cap ? l->cap * 2 : 256;
        struct sy_tensor *nt = k_reallocarray(l->t, (size_t)nc, sizeof(*nt));
        if (nt == NULL)
            return -1;
        l->t = nt;
        l->cap = nc;
    }
    struct sy_tensor *t = &l->t[l->n++];
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof(t->name), fmt, ap);
    va_end(ap);
    t->rows = rows;
    t->cols = cols;
    t->ndim = ndim;
    t->dt = dt;
    t->init = init;
    return 0;
}

/* xorshift64* uniform in [-1, 1) */
static inline float
sy_rand(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return (float)((int64_t)(*s * 0x2545f4914f6cdd1dull) >> 11) * (1.0f / 4503599627370496.0f);
}

static void
sy_fill(const struct sy_tensor *t, float *x, int64_t n, uint64_t *rng)
{
    float a = sqrtf(3.0f / (float)t->cols);   /* uniform with std 1/sqrt(fan_in) */

    for (int64_t i = 0; i < n; i++) {
        switch (t->init) {
        case SY_MAT: x[i] = a * sy_rand(rng); break;
        case SY_ONES: x[i] = 1.0f; break;
        case SY_CONV: x[i] = 0.5f * sy_rand(rng); break;
        case SY_ALOG: x[i] = logf(1.0f + 7.5f * (sy_rand(rng) + 1.0f)); break;
        case SY_DTBIAS: x[i] = -2.0f + sy_rand(rng); break;
        case SY_SMALL: x[i] = 0.01f * sy_rand(rng); break;
        }
    }
}

/* A stdio stream over a new file that replaces `path` on sy_close (kli_outfile). */
static FILE *
sy_open(const char *path, struct kli_outfile **of, int *rc, struct kli_err *err)
{
    FILE *f = NULL;
    int fd;

    if ((*rc = kli_outfile_open(of, path, 0, err)) != KLI_OK)
        return NULL;
    if ((fd = dup(kli_outfile_fd(*of))) < 0 || (f = fdopen(fd, "w")) == NULL) {
        *rc = err_set(err, KLI_E_IO, "%s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        kli_outfile_abort(*of);
        *of = NULL;
    }
    return f;
}

static int
sy_close(struct kli_outfile *of, FILE *f, const char *path, struct kli_err *err)
{
    int bad = ferror(f), closed = fclose(f);

    if (bad || closed != 0) {
        kli_outfile_abort(of);
        return err_set(err, KLI_E_IO, "%s: write error", path);
    }
    return kli_outfile_commit(of, err);
}

static int
sy_config(const char *out, const struct kli_synth_options *o, struct kli_err *err)
{
    char path[4096];
    struct kli_outfile *of;
    FILE *f;
    int rc;

    snprintf(path, sizeof(path), "%s/config.json", out);
    if ((f = sy_open(path, &of, &rc, err)) == NULL)
        return rc;
    fprintf(f, "{\n \"architectures\": [\"KimiLinearForCausalLM\"],\n"
               " \"model_type\": \"kimi_linear\",\n \"vocab_size\": %d,\n"
               " \"hidden_size\": %d,\n \"num_hidden_layers\": %d,\n"
               " \"intermediate_size\": %d,\n \"rms_norm_eps\": 1e-05,\n"
               " \"num_attention_heads\": %d,\n \"q_lora_rank\": null,\n"
               " \"kv_lora_rank\": %d,\n \"qk_nope_head_dim\": %d,\n"
               " \"qk_rope_head_dim\": %d,\n \"v_head_dim\": %d,\n \"mla_use_nope\": true,\n"
               " \"tie_word_embeddings\": false,\n \"num_experts\": %d,\n"
               " \"num_experts_per_token\": %d,\n \"num_shared_experts\": 1,\n"
               " \"moe_intermediate_size\": %d,\n \"first_k_dense_replace\": 0,\n"
               " \"moe_layer_freq\": 1,\n \"moe_router_activation_func\": \"sigmoid\",\n"
               " \"moe_renormalize\": true,\n \"routed_scaling_factor\": 2.446,\n"
               " \"num_expert_group\": 1,\n \"topk_group\": 1,\n \"bos_token_id\": 163584,\n"
               " \"eos_token_id\": 163586,\n \"linear_attn_config\": {\n  \"kda_layers\": [",
            SY_VOCAB, SY_HIDDEN, o->n_layers, SY_DENSE_FF, SY_MLA_HEADS, SY_LATENT, SY_NOPE,
            SY_ROPE, SY_V, o->n_experts, o->n_experts < SY_TOPK ? o->n_experts : SY_TOPK,
            SY_EXPERT_FF);
    int first = 1;
    for (int i = 0; i < o->n_layers; i++) {
        if (i % 4 != 3) {
            fprintf(f, "%s%d", first ? "" : ", ", i + 1);
            first = 0;
        }
    }
    fprintf(f, "],\n  \"full_attn_layers\": [");
    first = 1;
    for (int i = 0; i < o->n_layers; i++) {
        if (i % 4 == 3) {
            fprintf(f, "%s%d", first ? "" : ", ", i + 1);
            first = 0;
        }
    }
    fprintf(f, "],\n  \"head_dim\": %d,\n  \"num_heads\": %d,\n"
               "  \"short_conv_kernel_size\": 4\n }\n}\n", SY_KDA_DIM, SY_KDA_HEADS);
    if ((rc = sy_close(of, f, path, err)) != KLI_OK)
        return rc;
    return KLI_OK;
}

/* base64 of up to 3 bytes (tiktoken.model's encoding). */
static void
sy_b64(const uint8_t *b, int n, char *out)
{
    static const char tab[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    uint32_t v = (uint32_t)b[0] << 16 | (n > 1 ? (uint32_t)b[1] << 8 : 0) | (n > 2 ? b[2] : 0);

    out[0] = tab[(v >> 18) & 63];
    out[1] = tab[(v >> 12) & 63];
    out[2] = n > 1 ? tab[(v >> 6) & 63] : '=';
    out[3] = n > 2 ? tab[v & 63] : '=';
    out[4] = '\0';
}

/* A tokenizer with the released model's layout: 163,584 ranks (the 256 bytes, then every
 * pair of bytes, then byte triples made of printable ASCII, in a fixed order) and Kimi's
 * named specials from id 163,584, so text prompts work on a synthetic model. The merges are
 * not a trained vocabulary, but tokenization runs the same code at the same vocabulary
 * size. */
static int
sy_tokenizer(const char *out, struct kli_err *err)
{
    static const char *const names[][2] = {
        {"163584", "[BOS]"}, {"163585", "[EOS]"}, {"163586", "<|im_end|>"},
        {"163587", "<|im_user|>"}, {"163588", "<|im_assistant|>"},
        {"163590", "<|start_header_id|>"}, {"163591", "<|end_header_id|>"},
        {"163593", "[EOT]"}, {"163594", "<|im_system|>"}, {"163601", "<|im_middle|>"},
        {"163838", "[UNK]"}, {"163839", "[PAD]"},
    };
    char path[4096], b64[8];
    struct kli_outfile *of;
    FILE *f;
    int rc;
    int rank = 0;

    snprintf(path, sizeof(path), "%s/tiktoken.model", out);
    if ((f = sy_open(path, &of, &rc, err)) == NULL)
        return rc;
    for (int a = 0; a < 256; a++) {
        uint8_t b[1] = {(uint8_t)a};
        sy_b64(b, 1, b64);
        fprintf(f, "%s %d\n", b64, rank++);
    }
    for (int a = 0; a < 256 && rank < SY_VOCAB - 256; a++) {
        for (int c = 0; c < 256 && rank < SY_VOCAB - 256; c++) {
            uint8_t b[2] = {(uint8_t)a, (uint8_t)c};
            sy_b64(b, 2, b64);
            fprintf(f, "%s %d\n", b64, rank++);
        }
    }
    for (int a = 32; a < 127 && rank < SY_VOCAB - 256; a++) {
        for (int c = 32; c < 127 && rank < SY_VOCAB - 256; c++) {
            for (int d = 32; d < 127 && rank < SY_VOCAB - 256; d++) {
                uint8_t b[3] = {(uint8_t)a, (uint8_t)c, (uint8_t)d};
                sy_b64(b, 3, b64);
                fprintf(f, "%s %d\n", b64, rank++);
            }
        }
    }
    if ((rc = sy_close(of, f, path, err)) != KLI_OK)
        return rc;
    snprintf(path, sizeof(path), "%s/tokenizer_config.json", out);
    if ((f = sy_open(path, &of, &rc, err)) == NULL)
        return rc;
    fprintf(f, "{\n \"added_tokens_decoder\": {\n");
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        fprintf(f, "  \"%s\": {\"content\": \"%s\", \"special\": true}%s\n", names[i][0],
                names[i][1], i + 1 < sizeof(names) / sizeof(names[0]) ? "," : "");
    fprintf(f, " }\n}\n");
    if ((rc = sy_close(of, f, path, err)) != KLI_OK)
        return rc;
    return KLI_OK;
}

int
kli_synth(const char *out, const struct kli_synth_options *opt, struct kli_err *err)
{
    struct kli_synth_options dflt;
    struct sy_list l = {0};
    struct st_entry *ent = NULL;
    struct st_writer *w = NULL;
    float *fbuf = NULL;
    uint8_t *qbuf = NULL;
    enum k_dtype mt;
    char path[4096];
    struct stat st;
    int rc = KLI_OK;

    if ((opt = OPTS_TAKE(kli_synth_options_init, dflt, opt, "kli_synth", err)) == NULL)
        return KLI_E_INVALID;
    if (opt->n_layers < 1 || opt->n_layers > 1024 || opt->n_experts < 1 ||
        opt->n_experts > 4096)
        return err_set(err, KLI_E_RANGE, "synth: layers must be 1..1024 and experts "
                           "1..4096");
    if (dtype_parse(opt->type, &mt) != 0)
        return err_set(err, KLI_E_RANGE, "synth: unknown weight type \"%s\"", opt->type);
    if (mkdir(out, 0777) != 0 && errno != EEXIST)
        return err_set(err, KLI_E_IO, "%s: %s", out, strerror(errno));
    snprintf(path, sizeof(path), "%s/model.safetensors", out);
    if (!opt->force && stat(path, &st) == 0)
        return err_set(err, KLI_E_IO, "%s exists (use --force to overwrite)", path);

    const int D = SY_HIDDEN, HK = SY_KDA_HEADS * SY_KDA_DIM, K = SY_KDA_DIM;
    const enum k_dtype F = KLI_DT_F32, B = KLI_DT_BF16;
    int bad = 0;
#define L "model.layers.%d."
    bad |= sy_add(&l, mt, SY_MAT, SY_VOCAB, D, 2, "model.embed_tokens.weight");
    for (int i = 0; i < opt->n_layers; i++) {
        bad |= sy_add(&l, B, SY_ONES, D, 1, 1, L "input_layernorm.weight", i);
        bad |= sy_add(&l, B, SY_ONES, D, 1, 1, L "post_attention_layernorm.weight", i);
        if (i % 4 != 3) {
            bad |= sy_add(&l, mt, SY_MAT, HK, D, 2, L "self_attn.q_proj.weight", i);
            bad |= sy_add(&l, mt, SY_MAT, HK, D, 2, L "self_attn.k_proj.weight", i);
            bad |= sy_add(&l, mt, SY_MAT, HK, D, 2, L "self_attn.v_proj.weight", i);
            bad |= sy_add(&l, B, SY_CONV, HK, 4, 3, L "self_attn.q_conv1d.weight", i);
            bad |= sy_add(&l, B, SY_CONV, HK, 4, 3, L "self_attn.k_conv1d.weight", i);
            bad |= sy_add(&l, B, SY_CONV, HK, 4, 3, L "self_attn.v_conv1d.weight", i);
            bad |= sy_add(&l, F, SY_ALOG, SY_KDA_HEADS, 1, 4, L "self_attn.A_log", i);
            bad |= sy_add(&l, mt, SY_MAT, K, D, 2, L "self_attn.f_a_proj.weight", i);
            bad |= sy_add(&l, mt, SY_MAT, HK, K, 2, L "self_attn.f_b_proj.weight", i);
            bad |= sy_add(&l, F, SY_DTBIAS, HK, 1, 1, L "self_attn.dt_bias", i);
            bad |= sy_add(&l, mt, SY_MAT, SY_KDA_HEADS, D, 2, L "self_attn.b_proj.weight", i);
            bad |= sy_add(&l, mt, SY_MAT, K, D, 2, L "self_attn.g_a_proj.weight", i);
            bad |= sy_add(&l, mt, SY_MAT, HK, K, 2, L "self_attn.g_b_proj.weight", i);
            bad |= sy_add(&l, B, SY_ONES, K, 1, 1, L "self_attn.o_norm.weight", i);
            bad |= sy_add(&l, mt, SY_MAT, D, HK, 2, L "self_attn.o_proj.weight", i);
        } else {
            bad |= sy_add(&l, mt, SY_MAT, SY_MLA_HEADS * (SY_NOPE + SY_ROPE), D, 2,
                          L "self_attn.q_proj.weight", i);
            bad |= sy_add(&l, mt, SY_MAT, SY_LATENT + SY_ROPE, D, 2,
                          L "self_attn.kv_a_proj_with_mqa.weight", i);
            bad |= sy_add(&l, B, SY_ONES, SY_LATENT, 1, 1, L "self_attn.kv_a_layernorm.weight",
                          i);
            bad |= sy_add(&l, mt, SY_MAT, SY_MLA_HEADS * (SY_NOPE + SY_V), SY_LATENT, 2,
                          L "self_attn.kv_b_proj.weight", i);
            bad |= sy_add(&l, mt, SY_MAT, D, SY_MLA_HEADS * SY_V, 2, L "self_attn.o_proj.weight",
                          i);
        }
        bad |= sy_add(&l, B, SY_MAT, opt->n_experts, D, 2, L "block_sparse_moe.gate.weight",
                      i);
        bad |= sy_add(&l, F, SY_SMALL, opt->n_experts, 1, 1,
                      L "block_sparse_moe.gate.e_score_correction_bias", i);
        for (int e = 0; e < opt->n_experts; e++) {
            bad |= sy_add(&l, mt, SY_MAT, SY_EXPERT_FF, D, 2,
                          L "block_sparse_moe.experts.%d.w1.weight", i, e);
            bad |= sy_add(&l, mt, SY_MAT, SY_EXPERT_FF, D, 2,
                          L "block_sparse_moe.experts.%d.w3.weight", i, e);
            bad |= sy_add(&l, mt, SY_MAT, D, SY_EXPERT_FF, 2,
                          L "block_sparse_moe.experts.%d.w2.weight", i, e);
        }
        bad |= sy_add(&l, mt, SY_MAT, SY_EXPERT_FF, D, 2,
                      L "block_sparse_moe.shared_experts.gate_proj.weight", i);
        bad |= sy_add(&l, mt, SY_MAT, SY_EXPERT_FF, D, 2,
                      L "block_sparse_moe.shared_experts.up_proj.weight", i);
        bad |= sy_add(&l, mt, SY_MAT, D, SY_EXPERT_FF, 2,
                      L "block_sparse_moe.shared_experts.down_proj.weight", i);
    }
#undef L
    bad |= sy_add(&l, B, SY_ONES, D, 1, 1, "model.norm.weight");
    bad |= sy_add(&l, mt, SY_MAT, SY_VOCAB, D, 2, "lm_head.weight");
    ent = k_calloc((size_t)l.n, sizeof(*ent));
    if (bad || ent == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory");
        goto out;
    }
    uint64_t total = 0;
    for (int64_t i = 0; i < l.n; i++) {
        struct sy_tensor *t = &l.t[i];
        ent[i].name = t->name;
        ent[i].dtype = dtype_st_name(t->dt);
        ent[i].ndim = t->ndim;
        if (t->ndim == 1) {
            ent[i].shape[0] = t->rows;
        } else if (t->ndim == 2) {
            ent[i].shape[0] = t->rows;
            ent[i].shape[1] = t->cols;
        } else if (t->ndim == 3) {   /* conv taps [HK][1][4] */
            ent[i].shape[0] = t->rows;
            ent[i].shape[1] = 1;
            ent[i].shape[2] = t->cols;
        } else {                     /* A_log [1][1][H][1] */
            ent[i].shape[0] = 1;
            ent[i].shape[1] = 1;
            ent[i].shape[2] = t->rows;
            ent[i].shape[3] = 1;
        }
        ent[i].nbytes = dtype_nbytes(t->dt, (uint64_t)(t->rows * t->cols));
        total += ent[i].nbytes;
    }
    /* the weights' writer first: it locks model.safetensors against a second run */
    if ((rc = st_writer_open(&w, path, ent, l.n, err)) != KLI_OK ||
        (rc = sy_config(out, opt, err)) != KLI_OK || (rc = sy_tokenizer(out, err)) != KLI_OK)
        goto out;
    const int64_t slab = 1 << 20;   /* floats per slab; every row length divides into it */
    fbuf = k_mallocarray((size_t)slab + 16384, sizeof(float));
    qbuf = k_mallocarray((size_t)slab + 16384, 4);
    if (fbuf == NULL || qbuf == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory");
        goto out;
    }
    uint64_t done = 0, rng = opt->seed * 0x9e3779b97f4a7c15ull + 0x1234567ull;
    for (int64_t i = 0; i < l.n && rc == KLI_OK; i++) {
        struct sy_tensor *t = &l.t[i];
        int64_t total_el = t->rows * t->cols;
        int64_t step = (slab / t->cols) * t->cols;
        if (step == 0)
            step = t->cols;
        for (int64_t j = 0; j < total_el && rc == KLI_OK; j += step) {
            int64_t k = total_el - j < step ? total_el - j : step;
            sy_fill(t, fbuf, k, &rng);
            dtype_from_f32(t->dt, fbuf, qbuf, k);
            rc = st_writer_write(w, qbuf, dtype_nbytes(t->dt, (uint64_t)k), err);
        }
        done += ent[i].nbytes;
        if (opt->progress != NULL)
            opt->progress(opt->ud, done, total, t->name);
    }
out:
    rc = st_writer_finish(w, rc, err);
    free(fbuf);
    free(qbuf);
    free(ent);
    free(l.t);
    return rc;
}
