/*
 * test-gguf.c - the GGUF reader (weights/gguf.c) and the Kimi Linear view of a GGUF
 * (weights/gguf_kimi.c).
 *
 * The container cases build GGUF images in memory byte by byte (gb_*, written from the
 * format's description, not with the reader's code) and check what the parser makes of
 * them: every value type, every truncation of a small file, forged counts, overlapping
 * tensors, wrong types, each with its message. The model cases use the fixtures in
 * tests/data/gguf (made by make_gguf.py there, as llama.cpp's converter lays a Kimi Linear
 * model out) against the safetensors model they came from.
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf.h"
#include "kli.h"
#include "tap.h"
#include "testlib.h"
#include "weights.h"

/* ==== building images ==== */

struct gb {
    uint8_t *p;
    size_t n, cap;
};

static void
gb_raw(struct gb *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        uint8_t *np = realloc(b->p, b->cap);
        if (np == NULL) {
            printf("Bail out! out of memory\n");
            exit(1);
        }
        b->p = np;
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void
gb_le(struct gb *b, uint64_t v, int bytes)
{
    uint8_t t[8];

    for (int i = 0; i < bytes; i++)
        t[i] = (uint8_t)(v >> (8 * i));
    gb_raw(b, t, (size_t)bytes);
}

static void
gb_str(struct gb *b, const char *s)
{
    gb_le(b, strlen(s), 8);
    gb_raw(b, s, strlen(s));
}

static void
gb_head(struct gb *b, uint32_t version, uint64_t n_t, uint64_t n_kv)
{
    gb_raw(b, "GGUF", 4);
    gb_le(b, version, 4);
    gb_le(b, n_t, 8);
    gb_le(b, n_kv, 8);
}

static void
gb_kv_u32(struct gb *b, const char *key, uint32_t v)
{
    gb_str(b, key);
    gb_le(b, GGUF_T_U32, 4);
    gb_le(b, v, 4);
}

static void
gb_kv_str(struct gb *b, const char *key, const char *v)
{
    gb_str(b, key);
    gb_le(b, GGUF_T_STRING, 4);
    gb_str(b, v);
}

static void
gb_tinfo(struct gb *b, const char *name, int nd, const uint64_t *ne, uint32_t type,
         uint64_t off)
{
    gb_str(b, name);
    gb_le(b, (uint64_t)nd, 4);
    for (int i = 0; i < nd; i++)
        gb_le(b, ne[i], 8);
    gb_le(b, type, 4);
    gb_le(b, off, 8);
}

/* Zeros up to a multiple of a, then n data bytes (a pattern). */
static void
gb_data(struct gb *b, size_t a, size_t n)
{
    while (b->n % a != 0)
        gb_le(b, 0, 1);
    for (size_t i = 0; i < n; i++)
        gb_le(b, (i * 7 + 3) & 0xff, 1);
}

/* A small file with one value of every type, arrays of numbers and of strings, and two
 * tensors (F32 [4, 2] at 0 and Q8_0 [32] at 32). */
static void
gb_small(struct gb *b)
{
    uint64_t ne_a[2] = {4, 2}, ne_b[1] = {32};

    gb_head(b, 3, 2, 15);
    gb_str(b, "u8"); gb_le(b, GGUF_T_U8, 4); gb_le(b, 200, 1);
    gb_str(b, "i8"); gb_le(b, GGUF_T_I8, 4); gb_le(b, 0xfe, 1);
    gb_str(b, "u16"); gb_le(b, GGUF_T_U16, 4); gb_le(b, 60000, 2);
    gb_str(b, "i16"); gb_le(b, GGUF_T_I16, 4); gb_le(b, 0x8000, 2);
    gb_kv_u32(b, "u32", 4000000000u);
    gb_str(b, "i32"); gb_le(b, GGUF_T_I32, 4); gb_le(b, 0xffffffffu, 4);
    gb_str(b, "f32"); gb_le(b, GGUF_T_F32, 4); gb_le(b, 0x3fc00000u, 4);     /* 1.5 */
    gb_str(b, "bool"); gb_le(b, GGUF_T_BOOL, 4); gb_le(b, 1, 1);
    gb_kv_str(b, "str", "hello");
    gb_str(b, "u64"); gb_le(b, GGUF_T_U64, 4); gb_le(b, 1ull << 40, 8);
    gb_str(b, "i64"); gb_le(b, GGUF_T_I64, 4); gb_le(b, (uint64_t)-5, 8);
    gb_str(b, "f64"); gb_le(b, GGUF_T_F64, 4); gb_le(b, 0xc004000000000000ull, 8);   /* -2.5 */
    gb_str(b, "arr.i32"); gb_le(b, GGUF_T_ARRAY, 4); gb_le(b, GGUF_T_I32, 4); gb_le(b, 3, 8);
    gb_le(b, 7, 4); gb_le(b, (uint32_t)-1, 4); gb_le(b, 9, 4);
    gb_str(b, "arr.str"); gb_le(b, GGUF_T_ARRAY, 4); gb_le(b, GGUF_T_STRING, 4);
    gb_le(b, 3, 8); gb_str(b, "a"); gb_str(b, ""); gb_str(b, "xyz");
    gb_kv_u32(b, "general.alignment", 32);
    gb_tinfo(b, "a", 2, ne_a, GGML_F32, 0);
    gb_tinfo(b, "b", 1, ne_b, GGML_Q8_0, 32);
    gb_data(b, 32, 32 + 34);
}

static int
parse(const struct gb *b, struct gguf **g, struct kli_err *err)
{
    memset(err, 0, sizeof(*err));
    return gguf_parse(b->p, b->n, "t.gguf", g, err);
}

/* The token ids the model cases feed (set in main). */
static kli_token ids[40];

/* ==== the container ==== */

static void
test_values(void)
{
    struct gb b = {0};
    struct gguf *g = NULL;
    struct kli_err err;
    int64_t i = 0;
    double x = 0;
    const char *s;
    uint64_t len;

    gb_small(&b);
    ok(parse(&b, &g, &err) == KLI_OK, "a small file parses: %s", err.msg);
    if (g == NULL) {
        free(b.p);
        return;
    }
    ok(g->version == 3 && g->n_kv == 15 && g->n_t == 2 && g->alignment == 32,
       "version, counts and alignment");
    ok(gguf_get_int(g, "u8", &i) == 0 && i == 200, "uint8");
    ok(gguf_get_int(g, "i8", &i) == 0 && i == -2, "int8");
    ok(gguf_get_int(g, "u16", &i) == 0 && i == 60000, "uint16");
    ok(gguf_get_int(g, "i16", &i) == 0 && i == -32768, "int16");
    ok(gguf_get_int(g, "u32", &i) == 0 && i == 4000000000ll, "uint32");
    ok(gguf_get_int(g, "i32", &i) == 0 && i == -1, "int32");
    ok(gguf_get_num(g, "f32", &x) == 0 && x == 1.5, "float32");
    ok(gguf_get_int(g, "bool", &i) == 0 && i == 1, "bool");
    ok(gguf_get_str(g, "str", &s, &len) == 0 && len == 5 && memcmp(s, "hello", 5) == 0,
       "string");
    ok(gguf_get_int(g, "u64", &i) == 0 && i == 1ll << 40, "uint64");
    ok(gguf_get_int(g, "i64", &i) == 0 && i == -5, "int64");
    ok(gguf_get_num(g, "f64", &x) == 0 && x == -2.5, "float64");
    ok(gguf_get_int(g, "f64", &i) == -1 && gguf_get_int(g, "str", &i) == -1 &&
       gguf_get_int(g, "none", &i) == -1, "no integer from a float, a string or nothing");
    const struct gguf_kv *a = gguf_find(g, "arr.i32"), *as = gguf_find(g, "arr.str");
    ok(a != NULL && a->n == 3 && gguf_arr_int(a, 1, &i) == 0 && i == -1 &&
       gguf_arr_int(a, 3, &i) == -1, "array of int32");
    int sok = as != NULL && as->n == 3;
    sok = sok && gguf_arr_str(as, 0, &s, &len) == 0 && len == 1 && s[0] == 'a';
    sok = sok && gguf_arr_str(as, 1, &s, &len) == 0 && len == 0;
    sok = sok && gguf_arr_str(as, 2, &s, &len) == 0 && len == 3 && memcmp(s, "xyz", 3) == 0;
    ok(sok, "array of strings, an empty one among them");
    size_t dstart = (b.n - 66);
    ok(g->data_offset == dstart && g->t[0].data == b.p + dstart && g->t[0].nbytes == 32 &&
       g->t[1].data == b.p + dstart + 32 && g->t[1].nbytes == 34 && g->t[0].ne[1] == 2 &&
       g->t[0].numel == 8, "tensor infos: data where the offsets say, sizes from type and ne");
    gguf_free(g);
    free(b.p);
}

static void
test_truncations(void)
{
    struct gb b = {0};
    struct gguf *g = NULL;
    struct kli_err err;
    int bad = 0;

    gb_small(&b);
    for (size_t n = 0; n < b.n; n++) {
        uint8_t *copy = tl_malloc(n + 1);   /* exactly n bytes readable for ASan */
        memcpy(copy, b.p, n);
        memset(&err, 0, sizeof(err));
        int rc = gguf_parse(copy, n, "cut.gguf", &g, &err);
        if (rc != KLI_E_FORMAT || g != NULL || strstr(err.msg, "cut.gguf") == NULL) {
            if (bad++ < 3)
                diag("cut at %zu: rc %d: %s", n, rc, err.msg);
        }
        free(copy);
    }
    ok(bad == 0, "every truncation of a %zu-byte file is refused with a message", b.n);
    free(b.p);
}

/* Parses b and checks the error code and that the message holds `want`. */
static void
refused(struct gb *b, int code, const char *want, const char *what)
{
    struct gguf *g = NULL;
    struct kli_err err;
    int rc = parse(b, &g, &err);

    ok(rc == code && g == NULL && strstr(err.msg, want) != NULL, "%s: %s", what, err.msg);
    gguf_free(g);
    free(b->p);
    memset(b, 0, sizeof(*b));
}

/* A head with one key "k" and that key's value type; the value is the caller's. */
static void
gb_one_key(struct gb *b, uint32_t type)
{
    gb_head(b, 3, 0, 1);
    gb_str(b, "k");
    gb_le(b, type, 4);
}

static void
test_damaged(void)
{
    struct gb b = {0};
    uint64_t ne[5] = {32, 1, 1, 1, 1}, ne0[1] = {0};   /* five: the too-many-dims case */

    gb_raw(&b, "GGUX", 4);
    gb_le(&b, 3, 4);
    refused(&b, KLI_E_FORMAT, "not a GGUF file", "wrong magic");
    gb_head(&b, 1, 0, 0);
    refused(&b, KLI_E_UNSUPPORTED, "version 1", "version 1");
    gb_head(&b, 0x03000000u, 0, 0);
    refused(&b, KLI_E_UNSUPPORTED, "big-endian", "a big-endian file");
    gb_head(&b, 3, 0, 1ull << 60);
    refused(&b, KLI_E_FORMAT, "cannot fit", "a forged metadata count");
    gb_head(&b, 3, 1ull << 40, 0);
    refused(&b, KLI_E_FORMAT, "cannot fit", "a forged tensor count");
    gb_head(&b, 3, 0, 1);
    gb_le(&b, 1ull << 62, 8);
    gb_le(&b, 0, 8);
    refused(&b, KLI_E_FORMAT, "claims", "a forged string length");
    gb_one_key(&b, 13);
    refused(&b, KLI_E_FORMAT, "unknown value type 13", "an unknown value type");
    gb_one_key(&b, GGUF_T_ARRAY);
    gb_le(&b, GGUF_T_ARRAY, 4);
    gb_le(&b, 0, 8);
    refused(&b, KLI_E_FORMAT, "nested", "a nested array");
    gb_one_key(&b, GGUF_T_ARRAY);
    gb_le(&b, GGUF_T_U64, 4);
    gb_le(&b, 1ull << 61, 8);
    gb_le(&b, 0, 8);
    refused(&b, KLI_E_FORMAT, "elements of uint64", "an array count past the end");
    gb_one_key(&b, GGUF_T_BOOL);
    gb_le(&b, 2, 1);
    refused(&b, KLI_E_FORMAT, "bool of value 2", "a bool that is 2");
    gb_head(&b, 3, 0, 2);
    gb_kv_u32(&b, "k", 1);
    gb_kv_u32(&b, "k", 2);
    refused(&b, KLI_E_FORMAT, "k appears twice", "a key twice");
    gb_head(&b, 3, 0, 1);
    gb_kv_str(&b, "general.alignment", "32");
    refused(&b, KLI_E_FORMAT, "must be a uint32", "an alignment of the wrong type");
    gb_head(&b, 3, 0, 1);
    gb_kv_u32(&b, "general.alignment", 48);
    refused(&b, KLI_E_FORMAT, "not a power of two", "an alignment of 48");
    /* one tensor "t" of ne[0..nd) in its own data section of `data` bytes after 32 */
    static const struct {
        int nd;
        uint32_t type;
        uint64_t off;
        size_t data;
        const char *want, *what;
    } one[] = {
        {5, GGML_F32, 0, 128, "5 dimensions", "five dimensions"},
        {1, 31, 0, 128, "ggml type 31", "a retired ggml type"},
        {1, GGML_Q4_K, 0, 144, "not whole Q4_K blocks", "a row of 32 in Q4_K"},
        {1, GGML_F32, 16, 256, "not a multiple of the alignment", "an unaligned offset"},
        {1, GGML_F32, 0, 127, "run past the end", "a tensor one byte short"},
        {1, GGML_F32, 1ull << 63, 128, "run past the end", "an offset near 2^63"},
    };
    for (size_t k = 0; k < sizeof(one) / sizeof(one[0]); k++) {
        gb_head(&b, 3, 1, 0);
        gb_tinfo(&b, "t", one[k].nd, ne, one[k].type, one[k].off);
        gb_data(&b, 32, one[k].data);
        refused(&b, KLI_E_FORMAT, one[k].want, one[k].what);
    }
    gb_head(&b, 3, 1, 0);
    {
        uint64_t big[2] = {1ull << 40, 1ull << 40};
        gb_tinfo(&b, "t", 2, big, GGML_F32, 0);
    }
    refused(&b, KLI_E_FORMAT, "too large", "dimensions whose product overflows");
    gb_head(&b, 3, 2, 0);
    gb_tinfo(&b, "t", 1, ne, GGML_F32, 0);
    gb_tinfo(&b, "u", 1, ne, GGML_F32, 96);
    gb_data(&b, 32, 256);
    refused(&b, KLI_E_FORMAT, "overlap", "overlapping tensors");
    gb_head(&b, 3, 2, 0);
    gb_tinfo(&b, "t", 1, ne, GGML_F32, 0);
    gb_tinfo(&b, "t", 1, ne, GGML_F32, 128);
    gb_data(&b, 32, 256);
    refused(&b, KLI_E_FORMAT, "tensor t appears twice", "a tensor name twice");
    gb_head(&b, 3, 1, 0);
    gb_tinfo(&b, "a_name_longer_than_sixty_three_bytes_which_ggml_cannot_hold_at_all", 1,
             ne, GGML_F32, 0);
    gb_data(&b, 32, 128);
    refused(&b, KLI_E_FORMAT, "1 to 63 allowed", "a tensor name of 67 bytes");

    /* 200,000 keys, the last a repeat of the first: found (by sorting, not in n^2 steps) */
    {
        char key[32];
        gb_head(&b, 3, 0, 200000);
        for (int i = 0; i < 200000; i++) {
            snprintf(key, sizeof(key), "k.%d", i == 199999 ? 0 : i);
            gb_kv_u32(&b, key, (uint32_t)i);
        }
        refused(&b, KLI_E_FORMAT, "metadata key k.0 appears twice", "a repeat among 200,000 keys");
    }
    /* a zero-sized tensor is fine anywhere; version 2 reads as 3 */
    struct gguf *g = NULL;
    struct kli_err err;
    gb_head(&b, 2, 2, 0);
    gb_tinfo(&b, "z", 1, ne0, GGML_F32, 0);
    gb_tinfo(&b, "t", 1, ne, GGML_F32, 0);
    gb_data(&b, 32, 128);
    ok(parse(&b, &g, &err) == KLI_OK && g->t[0].nbytes == 0 && g->version == 2,
       "version 2, and an empty tensor sharing an offset: %s", err.msg);
    gguf_free(g);
    free(b.p);
}

/* ==== the Kimi Linear view ==== */

/* The least metadata gguf_kimi_open reads, then one tensor `name` of `type`, [256, 2]. */
static void
gb_kimi_one(struct gb *b, const char *arch, const char *name, uint32_t type)
{
    uint32_t block, bytes;
    uint64_t ne[2] = {256, 2};

    gguf_type_block(type, &block, &bytes);
    gb_head(b, 3, 1, 5);
    gb_kv_str(b, "general.architecture", arch);
    gb_kv_u32(b, "kimi-linear.block_count", 1);
    gb_kv_u32(b, "kimi-linear.embedding_length", 256);
    gb_kv_u32(b, "kimi-linear.attention.head_count", 2);
    gb_kv_u32(b, "kimi-linear.kda.head_dim", 32);
    /* head_count_kv is missing: added by the caller where wanted */
    gb_tinfo(b, name, 2, ne, type, 0);
}

static int
kimi_open(struct gb *b, struct kli_err *err, int64_t *n_out)
{
    struct tensor_desc *d = NULL;
    struct gguf_view *v = NULL;
    int64_t n = 0, cap = 0;

    memset(err, 0, sizeof(*err));
    int rc = gguf_kimi_open(b->p, b->n, "k.gguf", 0, &d, &n, &cap, &v, err);
    if (n_out != NULL)
        *n_out = n;
    safetensors_free_descs(d, n);
    gguf_view_free(v);
    return rc;
}

static void
test_view_refusals(void)
{
    struct gb b = {0};
    struct kli_err err;
    uint32_t block, bytes;

    /* another architecture; then the per-layer kinds missing */
    static const struct {
        const char *arch;
        int code;
        const char *want, *what;
    } view[] = {
        {"llama", KLI_E_UNSUPPORTED, "\"llama\"", "another architecture is refused, named"},
        {"kimi-linear", KLI_E_FORMAT, "head_count_kv", "no head_count_kv array"},
    };
    for (size_t k = 0; k < sizeof(view) / sizeof(view[0]); k++) {
        gb_kimi_one(&b, view[k].arch, "token_embd.weight", GGML_F32);
        gb_data(&b, 32, 2048);
        ok(kimi_open(&b, &err, NULL) == view[k].code && strstr(err.msg, view[k].want),
           "%s: %s", view[k].what, err.msg);
        free(b.p);
        memset(&b, 0, sizeof(b));
    }

    /* an IQ type */
    gguf_type_block(16, &block, &bytes);
    gb_head(&b, 3, 1, 7);
    gb_kv_str(&b, "general.architecture", "kimi-linear");
    gb_kv_u32(&b, "kimi-linear.block_count", 1);
    gb_kv_u32(&b, "kimi-linear.embedding_length", 256);
    gb_kv_u32(&b, "kimi-linear.attention.head_count", 2);
    gb_kv_u32(&b, "kimi-linear.kda.head_dim", 32);
    gb_kv_u32(&b, "kimi-linear.vocab_size", 16);
    gb_str(&b, "kimi-linear.attention.head_count_kv");
    gb_le(&b, GGUF_T_ARRAY, 4);
    gb_le(&b, GGUF_T_U32, 4);
    gb_le(&b, 1, 8);
    gb_le(&b, 0, 4);
    {
        uint64_t ne[2] = {256, 2};
        gb_tinfo(&b, "blk.0.attn_q.weight", 2, ne, 16, 0);
    }
    gb_data(&b, 32, 2 * bytes);
    ok(kimi_open(&b, &err, NULL) == KLI_E_UNSUPPORTED && strstr(err.msg, "IQ2_XXS") &&
       strstr(err.msg, "blk.0.attn_q.weight") && strstr(err.msg, "kli quantize"),
       "an IQ2_XXS tensor is refused, naming type and tensor: %s", err.msg);
    /* the same file with the tensor renamed to something Kimi Linear does not have */
    for (size_t i = 0; i + 6 <= b.n; i++) {
        if (memcmp(b.p + i, "attn_q", 6) == 0)
            b.p[i + 5] = 'z';
    }
    ok(kimi_open(&b, &err, NULL) == KLI_E_FORMAT && strstr(err.msg, "blk.0.attn_z.weight"),
       "a tensor that is not Kimi Linear's is refused: %s", err.msg);
    free(b.p);
}

static float
f16(uint16_t h)
{
    int e = (h >> 10) & 31, m = h & 1023;
    float v = e == 0 ? ldexpf((float)m, -24) : ldexpf((float)(m | 1024), e - 25);

    return h & 0x8000 ? -v : v;
}

/* GGUF's 32-element blocks, decoded here from ggml's layouts: Q8_0 (d, 32 int8), and the
 * 4/5-bit ones: Q4_0 (minus 8), Q4_1 and Q5_1 (d, m: q d + m), Q5_0 (minus 16), IQ4_NL
 * (ggml's 16 levels); the 5-bit ones add a 32-bit mask of fifth bits after d (and m). Low
 * nibbles are elements 0..15, high ones 16..31. */
static void
block_ref(uint32_t type, const uint8_t *p, float *y)
{
    static const int lv[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                               1, 13, 25, 38, 53, 69, 89, 113};
    float d = f16((uint16_t)(p[0] | p[1] << 8));
    int has_m = type == GGML_Q4_1 || type == GGML_Q5_1, five = type == GGML_Q5_0 ||
        type == GGML_Q5_1;
    float m = has_m ? f16((uint16_t)(p[2] | p[3] << 8)) : 0;
    const uint8_t *q = p + (has_m ? 4 : 2);
    uint32_t qh = five ? (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 |
                         (uint32_t)q[3] << 24 : 0;

    q += five ? 4 : 0;
    for (int j = 0; j < 32; j++) {
        int nib = j < 16 ? q[j] & 15 : q[j - 16] >> 4;
        int v = nib | (int)((qh >> j) & 1) << 4;
        switch (type) {
        case GGML_Q8_0: y[j] = (float)(int8_t)p[2 + j] * d; break;
        case GGML_Q4_0: y[j] = (float)(nib - 8) * d; break;
        case GGML_IQ4_NL: y[j] = (float)lv[nib] * d; break;
        case GGML_Q5_0: y[j] = (float)(v - 16) * d; break;
        default: y[j] = (float)v * d + m; break;
        }
    }
}

/* How far a block's values may lie from the weights it was quantized from, in units of
 * |d|: half a step plus the f16 rounding of d times q (Q8_0: 127 * 2^-11); a step where the
 * quantizer clamps the extreme (Q4_0, Q5_0) or rounds the offset; IQ4_NL its widest gap
 * between levels (24). */
static float
block_slack(uint32_t type)
{
    switch (type) {
    case GGML_Q8_0: return 0.5f + 127.0f / 2048;
    case GGML_IQ4_NL: return 24.0f;
    default: return 1.0f + 32.0f / 2048;
    }
}

static const char *
fx(char *buf, size_t cap, const char *rel);

/* The checkpoint name of the elements GGUF tensor `t` starts with: the matrix, or expert
 * 0's of a stack. @return 0, or -1 for a tensor these checks pass over. */
static int
block_name(const struct wfile *w, const char *gg, char *name, size_t cap)
{
    static const char *const exps[][2] = {
        {"ffn_gate_exps.weight", "w1"}, {"ffn_up_exps.weight", "w3"},
        {"ffn_down_exps.weight", "w2"},
    };
    int layer;
    const char *rest;

    /* a one-to-one name: the view's descriptor whose GGUF name it is */
    for (int64_t i = 0; i < wfile_n_tensors(w); i++) {
        char back[96];
        const char *hf = wfile_tensor(w, i)->name;
        if (gguf_kimi_name(hf, back, sizeof(back)) == 0 && strcmp(back, gg) == 0)
            return snprintf(name, cap, "%s", hf) < (int)cap ? 0 : -1;
    }
    if (strncmp(gg, "blk.", 4) != 0 || (rest = strchr(gg + 4, '.')) == NULL)
        return -1;
    layer = atoi(gg + 4);
    for (size_t i = 0; i < sizeof(exps) / sizeof(exps[0]); i++) {
        if (strcmp(rest + 1, exps[i][0]) == 0) {
            snprintf(name, cap, "model.layers.%d.block_sparse_moe.experts.0.%s.weight", layer,
                     exps[i][1]);
            return 0;
        }
    }
    return -1;
}

/* Every block of `types` in the fixture GGUF (the elements a descriptor of the view covers):
 * kli's values (dtype_to_f32 on the view, in place or repacked) equal GGUF's decoding, and
 * that is within block_slack steps of the safetensors model's weights. */
static void
check_blocks(const char *fixture, const uint32_t *types, int n_types, const char *what)
{
    char p[4200], name[160];
    size_t len = 0;
    struct kli_err err = {0};
    struct gguf *g = NULL;
    struct wfile *w = NULL, *s = NULL;
    uint8_t *img = (uint8_t *)tl_slurp(fx(p, sizeof(p), fixture), &len);
    int64_t blocks = 0, elems = 0, same = 0, near = 0, seen[8] = {0};

    if (img == NULL || gguf_parse(img, len, p, &g, &err) != KLI_OK ||
        wfile_open(&w, p, &err) != KLI_OK ||
        wfile_open(&s, fx(p, sizeof(p), "tiny-kimi-linear"), &err) != KLI_OK) {
        ok(0, "open the fixtures: %s", err.msg);
        goto out;
    }
    for (int64_t i = 0; i < g->n_t; i++) {
        const struct gguf_tensor *t = &g->t[i];
        int k = 0;
        while (k < n_types && types[k] != t->type)
            k++;
        if (k == n_types || block_name(w, t->name, name, sizeof(name)) != 0)
            continue;
        const struct tensor_desc *d = wfile_find(w, name), *o = wfile_find(s, name);
        if (d == NULL || o == NULL || d->numel % 32 != 0)
            continue;
        uint32_t bl, by;
        gguf_type_block(t->type, &bl, &by);
        int64_t n = d->numel;
        float *a = tl_malloc((size_t)n * 4), *ref = tl_malloc((size_t)n * 4), y[32];
        dtype_to_f32(d->dtype, d->data, a, n);
        dtype_to_f32(o->dtype, o->data, ref, n);
        for (int64_t q = 0; q < n / 32; q++) {
            const uint8_t *blk = t->data + q * by;
            float slack = fabsf(f16((uint16_t)(blk[0] | blk[1] << 8))) * block_slack(t->type);
            block_ref(t->type, blk, y);
            for (int j = 0; j < 32; j++) {
                same += a[32 * q + j] == y[j];
                near += fabsf(y[j] - ref[32 * q + j]) <= slack * 1.001f + 1e-12f;
            }
            blocks++;
            elems += 32;
            seen[k]++;
        }
        free(a);
        free(ref);
    }
    int all_types = 1;
    for (int k = 0; k < n_types; k++)
        all_types &= seen[k] > 0;
    ok(all_types && blocks > 100 && same == elems, "%s: kli reads them as GGUF decodes them "
       "(%lld of %lld elements, %lld blocks)", what, (long long)same, (long long)elems,
       (long long)blocks);
    ok(near == elems, "%s: within their rounding of the model's weights (%lld of %lld)", what,
       (long long)near, (long long)elems);
out:
    wfile_close(s);
    wfile_close(w);
    gguf_free(g);
    free(img);
}

/* Q8_0 and Q4_0, in place. */
static void
test_blocks(void)
{
    static const uint32_t types[] = {GGML_Q8_0, GGML_Q4_0};

    check_blocks("gguf/tiny-q.gguf", types, 2, "Q8_0 and Q4_0 blocks");
}

/* The fallback types llama-quantize writes for rows that are not whole super-blocks,
 * repacked at load; k_b in IQ4_NL through the kv_b_proj it rebuilds. */
static void
test_fallback(void)
{
    static const uint32_t types[] = {GGML_Q5_0, GGML_Q5_1, GGML_Q4_1};
    char p[4200];
    size_t len = 0;
    struct kli_err err = {0};
    struct gguf *g = NULL;
    struct wfile *w = NULL;
    uint8_t *img;

    check_blocks("gguf/tiny-fallback.gguf", types, 3, "Q5_0, Q5_1 and Q4_1 repacked at load");
    img = (uint8_t *)tl_slurp(fx(p, sizeof(p), "gguf/tiny-fallback.gguf"), &len);
    if (img == NULL || gguf_parse(img, len, p, &g, &err) != KLI_OK ||
        wfile_open(&w, p, &err) != KLI_OK) {
        ok(0, "open the fixture: %s", err.msg);
        goto out;
    }
    const struct tensor_desc *kv = wfile_find(w, "model.layers.3.self_attn.kv_b_proj.weight");
    const struct tensor_desc *fb = wfile_find(w, "model.layers.0.self_attn.f_b_proj.weight");
    ok(kv != NULL && kv->dtype == KLI_DT_F32 && fb != NULL && fb->dtype == KLI_DT_Q8_0,
       "IQ4_NL k_b/v_b rebuild kv_b_proj; a Q5_0 matrix becomes Q8_0 (exactly: 5-bit values "
       "and one f16 scale)");
    const struct gguf_tensor *kb = NULL;
    for (int64_t i = 0; i < g->n_t && kb == NULL; i++)
        kb = strcmp(g->t[i].name, "blk.3.attn_k_b.weight") == 0 ? &g->t[i] : NULL;
    int kb_ok = kb != NULL && kb->type == GGML_IQ4_NL && kv != NULL;
    if (kb_ok) {
        /* k_b ne [nope 32, latent 64, heads 2]: element (h, l, r) is kv_b row h*64 + r,
         * column l */
        float y[32];
        const float *kvf = kv->data;
        for (int64_t q = 0; q < kb->numel / 32 && kb_ok; q++) {
            block_ref(GGML_IQ4_NL, kb->data + q * 18, y);
            for (int j = 0; j < 32; j++) {
                int64_t e = q * 32 + j, r = e % 32, l = (e / 32) % 64, h = e / (32 * 64);
                kb_ok &= kvf[(h * 64 + r) * 64 + l] == y[j];
            }
        }
    }
    ok(kb_ok, "IQ4_NL: kv_b_proj holds k_b as GGUF decodes it, transposed per head");
    int32_t va = 0;
    float *lg = tl_logits_of(p, NULL, ids, 4, &va);
    int fin = lg != NULL;
    for (int64_t i = 0; fin && i < (int64_t)va * 4; i++)
        fin = isfinite(lg[i]);
    ok(fin, "the model runs on them (finite logits)");
    free(lg);
out:
    wfile_close(w);
    gguf_free(g);
    free(img);
}

static const char *
fx(char *buf, size_t cap, const char *rel)
{
    return tl_path(buf, cap, rel);
}


static void
test_logits_bf16(void)
{
    char a[4200], b[4200];
    int32_t va = 0, vb = 0;
    float *la = tl_logits_of(fx(a, sizeof(a), "tiny-kimi-linear"), NULL, ids, 40, &va);
    float *lb = tl_logits_of(fx(b, sizeof(b), "gguf/tiny-bf16.gguf"), NULL, ids, 40, &vb);

    ok(la != NULL && lb != NULL && va == vb, "both open");
    if (la != NULL && lb != NULL && va == vb) {
        double e = tl_rel_l2(lb, la, (int64_t)va * 40);
        ok(e <= 1e-6, "BF16 GGUF logits = safetensors logits (rel L2 %.3g <= 1e-6)", e);
    }
    free(la);
    free(lb);
}

/* A GGUF quantized by make_gguf.py (Q8_0, Q4_0 in place) against kli's logits on the same
 * weights dequantized to F32 at open. The int8 kernels round the activations to 8 bits,
 * which this random tiny model amplifies (kli's own q8_0 model differs from its dequantized
 * self by 2% after one token, 16% after 40), so the bound is loose: what it catches is a
 * block read another way (a nibble order, a scale), which leaves nothing in common. The bits
 * themselves are checked in test_blocks. */
static void
test_logits_quant(void)
{
    char p[4200], t[4300];
    int32_t va = 0, vb = 0;
    float *lq, *lf;
    char dir[] = "/tmp/kli-gguf-XXXXXX";
    struct kli_err err = {0};

    fx(p, sizeof(p), "gguf/tiny-q.gguf");
    lq = tl_logits_of(p, NULL, ids, 1, &va);
    lf = tl_logits_of(p, "f32", ids, 1, &vb);
    ok(lq != NULL && lf != NULL && va == vb, "the Q8_0/Q4_0 GGUF opens as stored and as f32");
    if (lq != NULL && lf != NULL && va == vb) {
        double e = tl_rel_l2(lq, lf, (int64_t)va);
        ok(e <= 0.1, "in-place Q8_0/Q4_0 logits = logits on the dequantized weights (rel "
           "L2 %.3g <= 0.1, one token)", e);
    }
    /* kli convert: the GGUF into a .kli, as stored: bit-identical logits */
    if (mkdtemp(dir) == NULL) {
        ok(0, "mkdtemp");
    } else {
        snprintf(t, sizeof(t), "%s/m.kli", dir);
        int rc = kli_convert(p, t, NULL, &err);
        ok(rc == KLI_OK && tl_same_logits(t, NULL, p, NULL, ids, 40),
           "kli convert GGUF -> .kli: logits bit-identical: %s", err.msg);
        unlink(t);
        rmdir(dir);
    }
    free(lq);
    free(lf);
}

/* The tensors of the GGUF view: in the mapping where the layouts agree. */
static void
test_in_place(void)
{
    char p[4200];
    struct wfile *w = NULL;
    struct kli_err err = {0};
    int32_t file;
    uint64_t off;

    if (wfile_open(&w, fx(p, sizeof(p), "gguf/tiny-q.gguf"), &err) != KLI_OK) {
        ok(0, "open: %s", err.msg);
        return;
    }
    const struct tensor_desc *q = wfile_find(w, "model.layers.0.self_attn.q_proj.weight");
    const struct tensor_desc *e0 = wfile_find(w, "model.layers.1.block_sparse_moe.experts.0."
                                              "w2.weight");
    const struct tensor_desc *e7 = wfile_find(w, "model.layers.1.block_sparse_moe.experts.7."
                                              "w2.weight");
    const struct tensor_desc *kv = wfile_find(w, "model.layers.3.self_attn.kv_b_proj.weight");
    const struct tensor_desc *al = wfile_find(w, "model.layers.0.self_attn.A_log");
    ok(q != NULL && q->dtype == KLI_DT_Q8_0 && q->shape[0] == 64 && q->shape[1] == 128 &&
       wfile_locate(w, q->data, &file, &off) == 0 && off % 64 == 0,
       "a Q8_0 matrix is read in place, at the file's 64-byte alignment");
    ok(e0 != NULL && e7 != NULL && e0->dtype == KLI_DT_Q4 && e0->shape[0] == 128 &&
       e0->shape[1] == 32 && (const uint8_t *)e7->data - (const uint8_t *)e0->data ==
       (ptrdiff_t)(7 * e0->nbytes) && wfile_locate(w, e7->data, &file, &off) == 0,
       "stacked experts become one in-place matrix per expert");
    ok(kv != NULL && kv->dtype == KLI_DT_F32 && kv->shape[0] == 2 * 64 && kv->shape[1] == 64,
       "kv_b_proj rebuilt from k_b and v_b (F32 from Q8_0 halves)");
    ok(al != NULL && al->numel == 2, "A_log rebuilt from ssm_a");
    /* every tensor the safetensors model has, the GGUF view has, with its shape */
    struct wfile *s = NULL;
    int same = 0, n = 0;
    if (wfile_open(&s, fx(p, sizeof(p), "tiny-kimi-linear"), &err) == KLI_OK) {
        n = (int)wfile_n_tensors(s);
        for (int i = 0; i < n; i++) {
            const struct tensor_desc *a = wfile_tensor(s, i), *b = wfile_find(w, a->name);
            same += b != NULL && b->numel == a->numel;
        }
    }
    ok(n > 0 && same == n && wfile_n_tensors(w) == n,
       "the view has the %d tensors of the safetensors model, of the same sizes (%d)", n,
       same);
    wfile_close(s);
    wfile_close(w);
}

/* The tokenizer rebuilt from a GGUF's vocabulary against the tiktoken.model it came from. */
static void
test_tokenizer(void)
{
    char d[4200], g[4200];
    struct kli_tokenizer *a = NULL, *b = NULL;
    struct kli_err err = {0};
    size_t len = 0;

    int rc = kli_tokenizer_open(&a, fx(d, sizeof(d), "tokenizer"), &err);
    rc = rc == KLI_OK ? kli_tokenizer_open(&b, fx(g, sizeof(g), "gguf/vocab.gguf"), &err) : rc;
    ok(rc == KLI_OK, "both tokenizers open: %s", err.msg);
    if (rc != KLI_OK)
        goto out;
    ok(kli_tokenizer_n_vocab(a) == kli_tokenizer_n_vocab(b) &&
       kli_tokenizer_n_base(a) == kli_tokenizer_n_base(b), "same vocabulary (%d, %d base)",
       kli_tokenizer_n_vocab(b), kli_tokenizer_n_base(b));
    int same = 1;
    for (kli_token t = 0; t < kli_tokenizer_n_vocab(a); t++) {
        size_t la, lb;
        const char *ba = kli_token_bytes(a, t, &la), *bb = kli_token_bytes(b, t, &lb);
        same &= la == lb && memcmp(ba, bb, la) == 0;
    }
    ok(same, "every token's bytes agree");
    char *text = tl_slurp(fx(d, sizeof(d), "tokenizer/corpus.txt"), &len);
    kli_token *ia = tl_calloc(len + 16, sizeof(*ia)), *ib = tl_calloc(len + 16, sizeof(*ib));
    int to = KLI_TOKENIZE_SPECIAL;
    int64_t na = kli_tokenize(a, text, len, to, ia, (int64_t)len + 16, &err);
    int64_t nb = kli_tokenize(b, text, len, to, ib, (int64_t)len + 16, &err);
    ok(na > 0 && na == nb && memcmp(ia, ib, (size_t)na * sizeof(*ia)) == 0,
       "the corpus (%zu bytes) encodes to the same %lld ids", len, (long long)na);
    const char *sp = "<|im_user|>hi<|im_end|>";
    na = kli_tokenize(a, sp, strlen(sp), to, ia, 16, &err);
    nb = kli_tokenize(b, sp, strlen(sp), to, ib, 16, &err);
    ok(na > 0 && na == nb && memcmp(ia, ib, (size_t)na * sizeof(*ia)) == 0 &&
       ia[0] >= kli_tokenizer_n_base(a), "special tokens are the same ids");
    free(ia);
    free(ib);
    free(text);
out:
    kli_tokenizer_close(a);
    kli_tokenizer_close(b);
}


/* Two GGUFs' metadata entry `key`: the same type and value bytes. */
static int
same_kv(const struct gguf *a, const struct gguf *b, const char *key)
{
    const struct gguf_kv *x = gguf_find(a, key), *y = gguf_find(b, key);

    /* an integer array is the same in INT32 as in UINT32 (llama.cpp's loader takes both) */
    int ints = x != NULL && y != NULL && x->type == GGUF_T_ARRAY && y->type == GGUF_T_ARRAY &&
               (x->elem == GGUF_T_U32 || x->elem == GGUF_T_I32) &&
               (y->elem == GGUF_T_U32 || y->elem == GGUF_T_I32);

    if (x == NULL || y == NULL || x->type != y->type || (x->elem != y->elem && !ints) ||
        x->n != y->n)
        return 0;
    if (x->type == GGUF_T_ARRAY && x->elem == GGUF_T_STRING) {
        for (uint64_t i = 0; i < x->n; i++) {
            const char *s, *t;
            uint64_t ls, lt;
            if (gguf_arr_str(x, i, &s, &ls) || gguf_arr_str(y, i, &t, &lt) || ls != lt ||
                memcmp(s, t, ls) != 0)
                return 0;
        }
        return 1;
    }
    int64_t u, v;
    double f, g;
    if (x->type == GGUF_T_ARRAY) {
        for (uint64_t i = 0; i < x->n; i++) {
            if (gguf_arr_int(x, i, &u) || gguf_arr_int(y, i, &v) || u != v)
                return 0;
        }
        return 1;
    }
    if (x->type == GGUF_T_STRING) {
        const char *s, *t;
        uint64_t ls, lt;
        return gguf_get_str(a, key, &s, &ls) == 0 && gguf_get_str(b, key, &t, &lt) == 0 &&
               ls == lt && memcmp(s, t, ls) == 0;
    }
    return gguf_get_num(a, key, &f) == 0 && gguf_get_num(b, key, &g) == 0 && f == g;
}


/* The tensors of GGUF b against those of the same names in a: types, shapes and bytes;
 * ssm_a (-exp of A_log) to an ulp or two. @return how many are the same bytes; *near
 * receives how many ssm_a are near instead. */
static int
same_tensors(const struct gguf *a, const struct gguf *b, int *near)
{
    int same = 0;

    *near = 0;
    for (int64_t i = 0; i < b->n_t; i++) {
        const struct gguf_tensor *y = &b->t[i], *x = NULL;
        for (int64_t j = 0; j < a->n_t && x == NULL; j++)
            x = strcmp(a->t[j].name, y->name) == 0 ? &a->t[j] : NULL;
        if (x == NULL || x->type != y->type || x->ndim != y->ndim ||
            memcmp(x->ne, y->ne, sizeof(x->ne)) != 0 || x->nbytes != y->nbytes) {
            diag("%s differs in type or shape", y->name);
            continue;
        }
        if (memcmp(x->data, y->data, x->nbytes) == 0) {
            same++;
        } else if (strstr(y->name, "ssm_a") != NULL && y->type == GGML_F32) {
            float fa[64], fb[64];
            int64_t n = y->numel < 64 ? y->numel : 64;
            memcpy(fa, x->data, (size_t)n * 4);
            memcpy(fb, y->data, (size_t)n * 4);
            *near += tl_rel_l2(fa, fb, n) <= 1e-6;
        } else {
            diag("%s: other bytes", y->name);
        }
    }
    return same;
}

/* A GGUF kli writes of model `src` (kli convert --to gguf, into a temporary directory) and
 * the fixture it is compared with, both read and parsed. */
struct written {
    char dir[32];
    char out[4300];
    struct kli_convert_options o;
    struct kli_err err;
    uint8_t *ia, *ib;
    size_t la, lb;
    struct gguf *a, *b;
};

/* @return 1 when the conversion and both parses went (each reported), else 0. */
static int
write_gguf(struct written *w, const char *src, const char *fixture, const char *what)
{
    char fpath[4200];

    memset(w, 0, sizeof(*w));
    snprintf(w->dir, sizeof(w->dir), "/tmp/kli-gguf-w-XXXXXX");
    if (mkdtemp(w->dir) == NULL) {
        ok(0, "mkdtemp");
        return 0;
    }
    snprintf(w->out, sizeof(w->out), "%s/out.gguf", w->dir);
    kli_convert_options_init(&w->o);
    w->o.format = "gguf";
    int rc = kli_convert(src, w->out, &w->o, &w->err);
    ok(rc == KLI_OK, "kli convert --to gguf of %s: %s", what, w->err.msg);
    w->ia = rc == KLI_OK ? (uint8_t *)tl_slurp(w->out, &w->la) : NULL;
    w->ib = (uint8_t *)tl_slurp(fx(fpath, sizeof(fpath), fixture), &w->lb);
    if (w->ia == NULL || w->ib == NULL ||
        gguf_parse(w->ia, w->la, w->out, &w->a, &w->err) != KLI_OK ||
        gguf_parse(w->ib, w->lb, fpath, &w->b, &w->err) != KLI_OK) {
        ok(0, "both GGUFs parse: %s", w->err.msg);
        return 0;
    }
    return 1;
}

static void
written_free(struct written *w)
{
    gguf_free(w->a);
    gguf_free(w->b);
    free(w->ia);
    free(w->ib);
    if (w->dir[0] != '\0')
        tl_rmtree(w->dir);
}

/* kli convert --to gguf of the safetensors model against make_gguf.py's file of it (two
 * writers written apart), then read back. */
/* ok() that model out's logits on the 40 ids are model src's (rel L2 <= 1e-6), naming src
 * as `whose`. */
static void
same_logits(const char *src, const char *out, const char *whose)
{
    double e = tl_logits_rel_l2(out, NULL, src, NULL, ids, 40);

    ok(e <= 1e-6, "its logits = %s (rel L2 %.3g <= 1e-6)", whose, e);
}

static void
test_write(void)
{
    char src[4200], q8[4300], q8dir[4300];
    struct written wr;
    struct wfile *ws = NULL, *wg = NULL, *wq = NULL, *wk = NULL;
    int rc;

    fx(src, sizeof(src), "tiny-kimi-linear");
    if (!write_gguf(&wr, src, "gguf/tiny-bf16.gguf", "the tiny model"))
        goto out;
    struct kli_convert_options o = wr.o;
    struct kli_err err = {0};
    const char *dir = wr.dir, *out = wr.out;
    const struct gguf *a = wr.a, *b = wr.b;
    snprintf(q8, sizeof(q8), "%s/q8.gguf", dir);
    snprintf(q8dir, sizeof(q8dir), "%s/q8", dir);
    ok(kli_convert(src, out, &o, &err) == KLI_E_IO && strstr(err.msg, "exists"),
       "an existing output is kept without --force: %s", err.msg);
    memset(&err, 0, sizeof(err));
    int near = 0, same = same_tensors(a, b, &near);
    ok(a->n_t == b->n_t && same + near == b->n_t && near <= 5,
       "the same %lld tensors as make_gguf.py writes: %d bit for bit, %d ssm_a within 1e-6",
       (long long)b->n_t, same, near);
    static const char *const keys[] = {
        "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
    };
    int kv_ok = 1;
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        if (!same_kv(a, b, keys[i])) {
            diag("metadata %s differs", keys[i]);
            kv_ok = 0;
        }
    }
    for (int64_t i = 0; i < b->n_kv; i++) {
        const char *k = b->kv[i].key;
        if (strncmp(k, "kimi-linear.", 12) == 0 && strcmp(k, "kimi-linear.rope.freq_base") &&
            !same_kv(a, b, k)) {
            diag("metadata %s differs", k);
            kv_ok = 0;
        }
    }
    ok(kv_ok, "the same kimi-linear.* hyper-parameters (rope.freq_base aside: kli has no use "
       "for it), vocabulary, token types, merges and special ids");

    /* read back: every tensor of the source, the same values */
    if (wfile_open(&ws, src, &err) != KLI_OK || wfile_open(&wg, out, &err) != KLI_OK) {
        ok(0, "open source and written GGUF: %s", err.msg);
        goto out;
    }
    int eq = 0, n = (int)wfile_n_tensors(ws);
    for (int i = 0; i < n; i++) {
        const struct tensor_desc *d = wfile_tensor(ws, i), *e = wfile_find(wg, d->name);
        if (e == NULL || e->numel != d->numel)
            continue;
        float *u = tl_malloc((size_t)d->numel * 4), *v = tl_malloc((size_t)d->numel * 4);
        dtype_to_f32(d->dtype, d->data, u, d->numel);
        dtype_to_f32(e->dtype, e->data, v, e->numel);
        eq += memcmp(u, v, (size_t)d->numel * 4) == 0 ||
              (strstr(d->name, "A_log") != NULL && tl_rel_l2(v, u, d->numel) <= 1e-6);
        free(u);
        free(v);
    }
    ok(n > 0 && eq == n && wfile_n_tensors(wg) == n, "read back, all %d tensors hold the "
       "source's values (%d; A_log within 1e-6)", n, eq);
    same_logits(src, out, "the safetensors model's");
    /* and written again from itself: the same file, byte for byte */
    {
        char again[4400];
        size_t l3 = 0;
        snprintf(again, sizeof(again), "%s/again.gguf", dir);
        memset(&err, 0, sizeof(err));
        char *i3 = kli_convert(out, again, &o, &err) == KLI_OK ? tl_slurp(again, &l3) : NULL;
        ok(i3 != NULL && l3 == wr.la && memcmp(i3, wr.ia, wr.la) == 0,
           "a GGUF written by kli, converted to GGUF again, is the same file: %s", err.msg);
        free(i3);
    }

    /* --type q8_0: the matrices are kli's own q8_0 bytes */
    o.type = "q8_0";
    struct kli_convert_options qo;
    kli_quantize_options_init(&qo);
    qo.type = "q8_0";
    rc = kli_convert(src, q8, &o, &err);
    rc = rc == KLI_OK ? kli_quantize(src, q8dir, &qo, &err) : rc;
    if (rc != KLI_OK || wfile_open(&wq, q8, &err) != KLI_OK ||
        wfile_open(&wk, q8dir, &err) != KLI_OK) {
        ok(0, "q8_0 GGUF and kli quantize: %s", err.msg);
        goto out;
    }
    int q = 0, qs = 0;
    for (int64_t i = 0; i < wfile_n_tensors(wk); i++) {
        const struct tensor_desc *d = wfile_tensor(wk, i), *e = wfile_find(wq, d->name);
        if (d->dtype != KLI_DT_Q8_0 || strstr(d->name, "kv_b_proj") != NULL)
            continue;
        q++;
        qs += e != NULL && e->dtype == KLI_DT_Q8_0 && e->nbytes == d->nbytes &&
              memcmp(e->data, d->data, d->nbytes) == 0;
    }
    ok(q > 100 && qs == q, "--type q8_0: the %d Q8_0 matrices are kli quantize's bytes (%d)",
       q, qs);
    /* an F32 GGUF (every matrix widened from BF16, exactly) */
    {
        char f32[4400];
        snprintf(f32, sizeof(f32), "%s/f32.gguf", dir);
        o.type = "f32";
        memset(&err, 0, sizeof(err));
        /* against the safetensors model widened to F32 at load, so that both run the F32
         * kernels: BF16 kernels sum in other orders, which this chaotic tiny model turns into
         * 8e-7 (AVX2) to 1.4e-6 (AVX-512) over 8 tokens */
        double ef = kli_convert(src, f32, &o, &err) == KLI_OK ?
            tl_logits_rel_l2(f32, NULL, src, "f32", ids, 8) : INFINITY;
        ok(ef <= 1e-6, "an F32 GGUF's logits = the safetensors model's (widened to F32) over "
           "8 tokens (rel L2 %.3g <= 1e-6): %s", ef, err.msg);
    }
out:
    wfile_close(ws);
    wfile_close(wg);
    wfile_close(wq);
    wfile_close(wk);
    written_free(&wr);
}

/* The nano model (a real BPE vocabulary of 2048 ranks): kli's GGUF of it carries the
 * vocabulary, types and merges make_gguf.py derives (llama.cpp's way: the last split of
 * each token's BPE up to its own rank), tokenizes like the directory and gives its logits. */
static void
test_write_nano(void)
{
    char src[4200], corpus[4200];
    struct written wr;

    snprintf(src, sizeof(src), "%s/../../contrib/models/kimi-linear-nano", tl_data());
    if (!write_gguf(&wr, src, "gguf/nano-vocab.gguf", "the nano model"))
        goto out;
    struct kli_err err = {0};
    const char *out = wr.out;
    const struct gguf *a = wr.a, *b = wr.b;
    const struct gguf_kv *mg = gguf_find(a, "tokenizer.ggml.merges");
    ok(mg != NULL && mg->n > 1000 && same_kv(a, b, "tokenizer.ggml.merges") &&
       same_kv(a, b, "tokenizer.ggml.tokens") && same_kv(a, b, "tokenizer.ggml.token_type"),
       "the same %llu merges, tokens and token types as make_gguf.py's",
       mg != NULL ? (unsigned long long)mg->n : 0ull);
    /* tokenizes like the directory */
    struct kli_tokenizer *ta = NULL, *tb = NULL;
    size_t len = 0;
    char *text = tl_slurp(fx(corpus, sizeof(corpus), "tokenizer/corpus.txt"), &len);
    if (kli_tokenizer_open(&ta, src, &err) == KLI_OK &&
        kli_tokenizer_open(&tb, out, &err) == KLI_OK && text != NULL) {
        kli_token *x = tl_calloc(len + 1, sizeof(*x)), *y = tl_calloc(len + 1, sizeof(*y));
        int64_t nx = kli_tokenize(ta, text, len, KLI_TOKENIZE_SPECIAL, x, (int64_t)len + 1, &err);
        int64_t ny = kli_tokenize(tb, text, len, KLI_TOKENIZE_SPECIAL, y, (int64_t)len + 1, &err);
        ok(nx > 0 && nx == ny && memcmp(x, y, (size_t)nx * sizeof(*x)) == 0,
           "its tokenizer encodes the corpus as the directory's (%lld ids)", (long long)nx);
        free(x);
        free(y);
    } else {
        ok(0, "tokenizers: %s", err.msg);
    }
    kli_tokenizer_close(ta);
    kli_tokenizer_close(tb);
    free(text);
    same_logits(src, out, "the directory's");
out:
    written_free(&wr);
}

/* Edge mode (--mem-budget: experts read from the file into a cache, src/xcache.c) on a GGUF,
 * whose stacked experts lie far apart: the same logits as resident weights, bit for bit. */
static void
test_edge(void)
{
    static const char *const files[] = {"gguf/tiny-bf16.gguf", "gguf/tiny-q.gguf"};

    for (size_t f = 0; f < sizeof(files) / sizeof(files[0]); f++) {
        struct kli_model_options mo;
        struct kli_err err = {0};
        struct kli_model *a, *b;
        kli_model_options_init(&mo);
        mo.n_threads = 1;
        mo.gpu = KLI_GPU_OFF;   /* with a GPU the resident run would compute MLA there */
        a = tl_open_model_opts(files[f], &mo);
        mo.mem_budget = 40ull << 20;
        b = tl_open_model_opts(files[f], &mo);
        float *la = tl_logits(a, ids, 40, 0, &err), *lb = tl_logits(b, ids, 40, 0, &err);
        int32_t V = kli_model_n_vocab(a);
        ok(la != NULL && lb != NULL && memcmp(la, lb, (size_t)V * 40 * sizeof(float)) == 0,
           "%s: edge mode's logits = resident logits (CPU), bit for bit: %s", files[f], err.msg);
        free(la);
        free(lb);
        kli_model_close(a);
        kli_model_close(b);
    }
}

/* The metadata key k of GGUF g is one of the names in `list` (NULL-terminated). */
static int
key_in(const char *k, const char *const *list)
{
    for (; *list != NULL; list++) {
        if (strcmp(k, *list) == 0)
            return 1;
    }
    return 0;
}

/* kli convert --to gguf of the tiny model against the file llama.cpp's own converter made of
 * it (tests/data/gguf/llama/tiny-bf16.gguf): the same tensors, names, types, shapes and
 * bytes, and the same metadata but for the keys named here. */
static void
test_write_llama(void)
{
    static const char *const theirs_only[] = {
        "general.size_label",           /* a label of the parameter count */
        "kimi-linear.rope.freq_base",   /* kli has no use for it; llama.cpp's default */
        NULL,
    };
    static const char *const other_value[] = {
        "general.name",
        "tokenizer.ggml.eos_token_id",  /* theirs tiktoken's [EOS], ours config.json's */
        NULL,
    };
    static const char *const ours_only[] = {
        "kimi-linear.expert_weights_norm",
        "tokenizer.ggml.merges",        /* empty: the tiny vocabulary has no merges */
        NULL,
    };
    char src[4200];
    struct written wr;
    int near = 0, same, kv_ok = 1;

    if (!write_gguf(&wr, fx(src, sizeof(src), "tiny-kimi-linear"), "gguf/llama/tiny-bf16.gguf",
                    "the tiny model"))
        goto out;
    same = same_tensors(wr.a, wr.b, &near);
    ok(wr.a->n_t == wr.b->n_t && same + near == wr.b->n_t && near <= 5,
       "the same %lld tensors as llama.cpp's converter writes: %d bit for bit, %d ssm_a "
       "within 1e-6", (long long)wr.b->n_t, same, near);
    for (int64_t i = 0; i < wr.b->n_kv; i++) {
        const char *k = wr.b->kv[i].key;
        int mine = gguf_find(wr.a, k) != NULL;
        if (key_in(k, theirs_only) ? mine : !mine) {
            diag("metadata %s: %s", k, mine ? "now written by kli too" : "missing");
            kv_ok = 0;
        } else if (mine && !key_in(k, other_value) && !same_kv(wr.a, wr.b, k)) {
            diag("metadata %s differs", k);
            kv_ok = 0;
        }
    }
    for (int64_t i = 0; i < wr.a->n_kv; i++) {
        const char *k = wr.a->kv[i].key;
        if (gguf_find(wr.b, k) == NULL && !key_in(k, ours_only)) {
            diag("metadata %s: written by kli only", k);
            kv_ok = 0;
        }
    }
    ok(kv_ok, "the same metadata keys and values as llama.cpp's converter writes (but "
       "general.name, the eos id, general.size_label, rope.freq_base, expert_weights_norm, "
       "the empty merges)");
out:
    written_free(&wr);
}

/* K types in place: the nano model (rows of 256) written as a Q4_K GGUF. Every K-type matrix
 * of the file is used from the mapping with kli quantize's q4_k bytes; its logits against
 * the same weights dequantized to F32 at open (the int8 rounding of the activations, as in
 * test_logits_quant) and against the .kli of the same --type (which differs only in kv_b:
 * the GGUF splits it into F32 halves, the .kli keeps it Q8_0). */
static void
test_ktypes(void)
{
    char src[4200], kdir[4300], kli[4300];
    struct written wr;
    struct wfile *wg = NULL, *wk = NULL;
    struct kli_convert_options qo;
    struct kli_err err = {0};
    int32_t v1 = 0, v2 = 0, v3 = 0;

    snprintf(src, sizeof(src), "%s/../../contrib/models/kimi-linear-nano", tl_data());
    memset(&wr, 0, sizeof(wr));
    snprintf(wr.dir, sizeof(wr.dir), "/tmp/kli-gguf-k-XXXXXX");
    if (mkdtemp(wr.dir) == NULL) {
        ok(0, "mkdtemp");
        return;
    }
    snprintf(wr.out, sizeof(wr.out), "%s/q4k.gguf", wr.dir);
    snprintf(kdir, sizeof(kdir), "%s/q4k", wr.dir);
    snprintf(kli, sizeof(kli), "%s/q4k.kli", wr.dir);
    kli_convert_options_init(&wr.o);
    wr.o.format = "gguf";
    wr.o.type = "q4_k";
    kli_quantize_options_init(&qo);
    qo.type = "q4_k";
    int rc = kli_convert(src, wr.out, &wr.o, &err);
    wr.o.format = NULL;
    rc = rc ? rc : kli_convert(src, kli, &wr.o, &err);
    rc = rc ? rc : kli_quantize(src, kdir, &qo, &err);
    if (rc != KLI_OK || wfile_open(&wg, wr.out, &err) != KLI_OK ||
        wfile_open(&wk, kdir, &err) != KLI_OK) {
        ok(0, "q4_k GGUF, .kli and kli quantize of the nano model: %s", err.msg);
        goto out;
    }
    int n = 0, same = 0;
    for (int64_t i = 0; i < wfile_n_tensors(wk); i++) {
        const struct tensor_desc *d = wfile_tensor(wk, i), *e = wfile_find(wg, d->name);
        int32_t file;
        uint64_t off;
        if (!dtype_is_k(d->dtype))
            continue;
        n++;
        same += e != NULL && e->dtype == d->dtype && e->nbytes == d->nbytes &&
                memcmp(e->data, d->data, d->nbytes) == 0 &&
                wfile_locate(wg, e->data, &file, &off) == 0;
    }
    ok(n > 20 && same == n, "the %d Q4_K matrices are in place, kli quantize's bytes (%d)", n,
       same);
    float *lq = tl_logits_of(wr.out, NULL, ids, 1, &v1);
    float *lf = tl_logits_of(wr.out, "f32", ids, 1, &v2);
    float *lk = tl_logits_of(kli, NULL, ids, 1, &v3);
    int have = lq != NULL && lf != NULL && lk != NULL && v1 == v2 && v1 == v3;
    double e1 = have ? tl_rel_l2(lq, lf, v1) : 1, e2 = have ? tl_rel_l2(lq, lk, v1) : 1;
    ok(e1 <= 0.05, "Q4_K GGUF logits = logits on its weights dequantized (rel L2 %.3g <= 0.05, "
       "one token)", e1);
    ok(e2 <= 0.05, "and = the q4_k .kli's (rel L2 %.3g <= 0.05)", e2);
    free(lq);
    free(lf);
    free(lk);
out:
    wfile_close(wg);
    wfile_close(wk);
    written_free(&wr);
}

int
main(int argc, char **argv)
{
    static const struct tap_fn cases[] = {
        {"values", test_values},
        {"truncations", test_truncations},
        {"damaged", test_damaged},
        {"view_refusals", test_view_refusals},
        {"in_place", test_in_place},
        {"blocks", test_blocks},
        {"fallback", test_fallback},
        {"logits_bf16", test_logits_bf16},
        {"logits_quant", test_logits_quant},
        {"tokenizer", test_tokenizer},
        {"edge", test_edge},
        {"write", test_write},
        {"write_nano", test_write_nano},
        {"write_llama", test_write_llama},
        {"ktypes", test_ktypes},
    };

    tap_init(argc, argv);
    for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++)
        ids[i] = (kli_token)((i * 37 + 11) % 500);
    tap_run(cases, sizeof(cases) / sizeof(cases[0]));
    plan_done();
    return tap_exit();
}
