/*
 * test-safetensors.c - the safetensors reader and the sharded index: valid files read back
 * exactly, and every malformed input fails with a code and a message that says what is
 * wrong (never a crash). Files are written into a fresh mkdtemp directory.
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kli.h"
#include "tap.h"
#include "testlib.h"
#include "util.h"
#include "weights.h"

#define MAX_PATHS 128

static char tmpdir[256];
static char created[MAX_PATHS][512];   /* files and directories to remove, in order made */
static int n_created;

/* ==== Writing test files ==== */

static const char *
tpath(const char *rel)
{
    static char buf[4][512];
    static int k;
    char *p = buf[k++ % 4];

    snprintf(p, 512, "%s/%s", tmpdir, rel);
    return p;
}

static void
remember(const char *path)
{
    for (int i = 0; i < n_created; i++) {
        if (strcmp(created[i], path) == 0)
            return;
    }
    if (n_created < MAX_PATHS)
        snprintf(created[n_created++], sizeof(created[0]), "%s", path);
}

static int
write_file(const char *rel, const void *bytes, size_t n)
{
    const char *path = tpath(rel);
    FILE *f = fopen(path, "wb");
    int ok_ = 1;

    if (f == NULL)
        return 0;
    remember(path);
    if (n > 0 && fwrite(bytes, 1, n, f) != n)
        ok_ = 0;
    if (fclose(f) != 0)
        ok_ = 0;
    return ok_;
}

static void
make_dir(const char *rel)
{
    const char *path = tpath(rel);

    if (mkdir(path, 0700) == 0)
        remember(path);
}

/* A safetensors image: u64 LE header length, the header padded with spaces to a multiple
 * of 8 (as the reference writer does), then the data. */
static uint8_t *
build_st(const char *hdr, const void *data, size_t dlen, size_t *out_len)
{
    size_t h = strlen(hdr), hp = (h + 7) / 8 * 8;
    uint8_t *b = malloc(8 + hp + dlen + 1);

    if (b == NULL)
        return NULL;
    util_wr64(b, (uint64_t)hp);
    memcpy(b + 8, hdr, h);
    memset(b + 8 + h, ' ', hp - h);
    if (dlen > 0)
        memcpy(b + 8 + hp, data, dlen);
    *out_len = 8 + hp + dlen;
    return b;
}

static int
write_st(const char *rel, const char *hdr, const void *data, size_t dlen)
{
    size_t n;
    uint8_t *b = build_st(hdr, data, dlen, &n);
    int r = b != NULL && write_file(rel, b, n);

    free(b);
    return r;
}

/* An image whose first 8 bytes are `hlen` verbatim, followed by `rest`. */
static int
write_raw_len(const char *rel, uint64_t hlen, const char *rest)
{
    size_t n = strlen(rest);
    uint8_t *b = malloc(8 + n + 1);
    int r;

    if (b == NULL)
        return 0;
    util_wr64(b, hlen);
    memcpy(b + 8, rest, n);
    r = write_file(rel, b, 8 + n);
    free(b);
    return r;
}

/* ==== Checking failures ==== */

/* Opens `rel` and expects failure with `code` and a message containing both `needle` and
 * `needle2` (the file or tensor at fault; NULL to skip). */
static void
expect_fail(const char *what, const char *rel, int code, const char *needle,
            const char *needle2)
{
    struct kli_err err = {0};
    struct wfile *w = (struct wfile *)&err;   /* must be reset to NULL */
    int rc = wfile_open(&w, tpath(rel), &err);
    int good = rc == code && err.code == code && w == NULL && strstr(err.msg, needle) != NULL &&
               (needle2 == NULL || strstr(err.msg, needle2) != NULL);

    ok(good, "%s: fails with %s", what, kli_strerror(code));
    if (!good)
        diag("rc %d, message: %s (wanted \"%s\"%s%s)", rc, err.msg, needle,
             needle2 != NULL ? " and " : "", needle2 != NULL ? needle2 : "");
    wfile_close(rc == KLI_OK ? w : NULL);
}

/* Writes the header into bad.safetensors and expects a KLI_E_FORMAT naming the file. */
static void
expect_bad_header(const char *what, const char *hdr, const void *data, size_t dlen,
                  const char *needle)
{
    if (!write_st("bad.safetensors", hdr, data, dlen)) {
        ok(0, "%s: write the file", what);
        return;
    }
    expect_fail(what, "bad.safetensors", KLI_E_FORMAT, needle, "bad.safetensors");
}

/* ==== Valid files ==== */

static const char single_hdr[] =
    "{\"__metadata__\":{\"format\":\"pt\"},"
    "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
    "\"b\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[24,32]},"
    "\"c\":{\"dtype\":\"I8\",\"shape\":[3],\"data_offsets\":[32,35]},"
    "\"s\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[35,37]},"
    "\"z\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[37,37]}}";

static uint8_t single_data[37];

static void
fill_single_data(void)
{
    float a[6] = {1, -2, 3.5f, 0.25f, 100, -0.125f};
    uint16_t b[4];
    int8_t c[3] = {-1, 0, 127};
    uint16_t s = 0x3c00;   /* 1.0 in f16 */

    for (int i = 0; i < 4; i++)
        b[i] = f32_to_bf16((float)i - 1.5f);
    memcpy(single_data, a, 24);
    memcpy(single_data + 24, b, 8);
    memcpy(single_data + 32, c, 3);
    memcpy(single_data + 35, &s, 2);
}

static int
shape_is(const struct tensor_desc *d, int ndim, const int64_t *shape)
{
    if (d == NULL || d->ndim != ndim)
        return 0;
    for (int i = 0; i < ndim; i++) {
        if (d->shape[i] != shape[i])
            return 0;
    }
    return 1;
}

static void
check_single(const char *what, const char *path)
{
    struct kli_err err = {0};
    struct wfile *w = NULL;
    const struct tensor_desc *a, *b, *c, *s, *z;
    float fa[6];
    int rc = wfile_open(&w, path, &err);

    if (!ok(rc == KLI_OK && w != NULL, "%s: opens", what)) {
        diag("%s", err.msg);
        return;
    }
    ok(wfile_n_tensors(w) == 5, "%s: 5 tensors (__metadata__ is not one)", what);
    ok(wfile_n_files(w) == 1 && strcmp(wfile_file_path(w, 0), tpath("one.safetensors"))
       == 0, "%s: one file, path kept", what);
    a = wfile_find(w, "a");
    b = wfile_find(w, "b");
    c = wfile_find(w, "c");
    s = wfile_find(w, "s");
    z = wfile_find(w, "z");
    ok(a != NULL && b != NULL && c != NULL && s != NULL && z != NULL, "%s: finds all", what);
    if (a == NULL || b == NULL || c == NULL || s == NULL || z == NULL) {
        wfile_close(w);
        return;
    }
    ok(wfile_find(w, "nope") == NULL && wfile_find(w, "__metadata__") == NULL &&
       wfile_find(w, "") == NULL, "%s: absent names are not found", what);
    ok(wfile_tensor(w, 0) == a && wfile_tensor(w, 4) == z &&
       wfile_tensor(w, 5) == NULL && wfile_tensor(w, -1) == NULL,
       "%s: tensors in header order, bounds checked", what);
    ok(a->dtype == KLI_DT_F32 && strcmp(a->dtype_name, "F32") == 0 &&
       shape_is(a, 2, (const int64_t[]){2, 3}) && a->numel == 6 && a->nbytes == 24 &&
       a->file == 0 && strcmp(a->name, "a") == 0, "%s: F32 [2,3]", what);
    memcpy(fa, a->data, 24);
    ok(memcmp(a->data, single_data, 24) == 0 && fa[2] == 3.5f, "%s: F32 data reads back",
       what);
    ok(b->dtype == KLI_DT_BF16 && strcmp(b->dtype_name, "BF16") == 0 &&
       shape_is(b, 1, (const int64_t[]){4}) && b->numel == 4 && b->nbytes == 8 &&
       memcmp(b->data, single_data + 24, 8) == 0, "%s: BF16 [4] and its data", what);
    {
        uint16_t h;

        memcpy(&h, (const uint8_t *)b->data + 2, 2);
        ok(bf16_to_f32(h) == -0.5f, "%s: BF16 element 1 is -0.5", what);
    }
    ok(c->dtype == KLI_DT_OTHER && strcmp(c->dtype_name, "I8") == 0 && c->numel == 3 &&
       c->nbytes == 3 && ((const int8_t *)c->data)[2] == 127, "%s: I8 kept as OTHER", what);
    ok(s->dtype == KLI_DT_F16 && s->ndim == 0 && s->numel == 1 && s->nbytes == 2 &&
       memcmp(s->data, single_data + 35, 2) == 0, "%s: F16 scalar", what);
    ok(z->dtype == KLI_DT_F32 && shape_is(z, 2, (const int64_t[]){0, 5}) && z->numel == 0 &&
       z->nbytes == 0, "%s: zero-size tensor", what);
    ok(wfile_data_bytes(w) == 37, "%s: data bytes 37", what);
    ok((const uint8_t *)b->data - (const uint8_t *)a->data == 24 &&
       (const uint8_t *)s->data - (const uint8_t *)a->data == 35, "%s: data points into file",
       what);
    wfile_close(w);
}

static void
test_single(void)
{
    fill_single_data();
    ok(write_st("one.safetensors", single_hdr, single_data, sizeof(single_data)),
       "write one.safetensors");
    check_single("single file", tpath("one.safetensors"));

    /* A directory holding model.safetensors. */
    make_dir("dir1");
    ok(write_st("dir1/model.safetensors", single_hdr, single_data, sizeof(single_data)),
       "write dir1/model.safetensors");
    {
        struct kli_err err = {0};
        struct wfile *w = NULL;
        int rc = wfile_open(&w, tpath("dir1"), &err);

        ok(rc == KLI_OK && wfile_n_tensors(w) == 5 && wfile_find(w, "c") != NULL,
           "directory with model.safetensors opens");
        if (rc != KLI_OK)
            diag("%s", err.msg);
        wfile_close(w);
    }

    /* Unpadded header (MLX writes these), whitespace padding of other kinds, every
     * safetensors dtype accepted with the right size, holes between tensors allowed. */
    {
        static const char hdr[] =
            "{\"x\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]},"
            "\"y\":{\"dtype\":\"F4\",\"shape\":[2,3],\"data_offsets\":[8,11]},"
            "\"w\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[16,18]},"
            "\"v\":{\"dtype\":\"BOOL\",\"shape\":[1],\"data_offsets\":[18,19]},"
            "\"u\":{\"dtype\":\"U64\",\"shape\":[1,1],\"data_offsets\":[24,32],\"extra\":1}}\n";
        uint8_t data[32] = {0};
        size_t h = strlen(hdr);
        uint8_t *b = malloc(8 + h + sizeof(data));
        struct tensor_desc *descs = NULL;
        int64_t n = 0, cap = 0;
        struct kli_err err = {0};
        int rc;

        util_wr64(b, (uint64_t)h);
        memcpy(b + 8, hdr, h);
        memcpy(b + 8 + h, data, sizeof(data));
        rc = safetensors_parse(b, 8 + h + sizeof(data), "mem", 3, &descs, &n, &cap, &err);
        ok(rc == KLI_OK && n == 5, "unpadded header, other dtypes, holes: parse");
        if (rc != KLI_OK)
            diag("%s", err.msg);
        else
            ok(descs[0].dtype == KLI_DT_OTHER && descs[0].nbytes == 8 && descs[1].nbytes == 3 &&
               descs[2].nbytes == 2 && descs[3].nbytes == 1 && descs[4].nbytes == 8 &&
               descs[4].file == 3 && descs[4].data == b + 8 + h + 24,
               "F64/F4/F8/BOOL/U64 sizes and pointers");
        safetensors_free_descs(descs, n);
        free(b);
    }
}

static void
test_sharded(void)
{
    static const char h1[] =
        "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
        "\"y\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[8,16]}}";
    static const char h2[] =
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"z\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,6]}}";
    static const char index[] =
        "{\"metadata\":{\"total_size\":22},\"weight_map\":{"
        "\"x\":\"model-00001-of-00002.safetensors\","
        "\"z\":\"model-00002-of-00002.safetensors\","
        "\"y\":\"model-00001-of-00002.safetensors\"}}\n";
    uint8_t d1[16], d2[6];
    struct kli_err err = {0};
    struct wfile *w = NULL;
    const struct tensor_desc *x, *y, *z;
    int rc;

    for (int i = 0; i < 16; i++)
        d1[i] = (uint8_t)(i * 7 + 1);
    for (int i = 0; i < 6; i++)
        d2[i] = (uint8_t)(200 + i);
    make_dir("sharded");
    ok(write_st("sharded/model-00001-of-00002.safetensors", h1, d1, sizeof(d1)) &&
       write_st("sharded/model-00002-of-00002.safetensors", h2, d2, sizeof(d2)) &&
       write_file("sharded/model.safetensors.index.json", index, strlen(index)),
       "write a 2-shard checkpoint");
    /* The index wins over a model.safetensors next to it. */
    ok(write_st("sharded/model.safetensors", single_hdr, single_data, sizeof(single_data)),
       "write a decoy model.safetensors");

    rc = wfile_open(&w, tpath("sharded"), &err);
    if (!ok(rc == KLI_OK && w != NULL, "sharded: opens")) {
        diag("%s", err.msg);
        return;
    }
    ok(wfile_n_tensors(w) == 3 && wfile_n_files(w) == 2 &&
       wfile_find(w, "a") == NULL, "sharded: 3 tensors in 2 files, decoy ignored");
    x = wfile_find(w, "x");
    y = wfile_find(w, "y");
    z = wfile_find(w, "z");
    ok(x != NULL && y != NULL && z != NULL, "sharded: finds x, y, z");
    if (x != NULL && y != NULL && z != NULL) {
        ok(x->file == 0 && y->file == 0 && z->file == 1, "sharded: shard numbers");
        ok(x->dtype == KLI_DT_F32 && x->nbytes == 8 && memcmp(x->data, d1, 8) == 0 &&
           y->dtype == KLI_DT_BF16 && shape_is(y, 2, (const int64_t[]){2, 2}) &&
           memcmp(y->data, d1 + 8, 8) == 0, "sharded: shard 1 data reads back");
        ok(z->dtype == KLI_DT_F16 && z->numel == 3 && memcmp(z->data, d2, 6) == 0,
           "sharded: shard 2 data reads back");
        ok(strstr(wfile_file_path(w, z->file), "model-00002-of-00002.safetensors") != NULL,
           "sharded: file path of shard 2");
    }
    ok(wfile_data_bytes(w) == 22, "sharded: data bytes 22");
    wfile_close(w);

    /* The index path itself works too. */
    w = NULL;
    memset(&err, 0, sizeof(err));
    rc = wfile_open(&w, tpath("sharded/model.safetensors.index.json"), &err);
    ok(rc == KLI_OK && wfile_n_tensors(w) == 3, "sharded: opens through the index path");
    if (rc != KLI_OK)
        diag("%s", err.msg);
    wfile_close(w);
}

/* ==== Malformed files ==== */

/* Every proper prefix of a valid image must fail cleanly; each copy is exactly k bytes on
 * the heap, so an over-read shows under ASan. */
static void
test_truncation(void)
{
    size_t len;
    uint8_t *full = build_st(single_hdr, single_data, sizeof(single_data), &len);
    size_t bad = 0, no_msg = 0;

    for (size_t k = 0; k < len; k++) {
        uint8_t *b = malloc(k == 0 ? 1 : k);
        struct tensor_desc *descs = NULL;
        int64_t n = 0, cap = 0;
        struct kli_err err = {0};
        int rc;

        memcpy(b, full, k);
        rc = safetensors_parse(b, k, "trunc.safetensors", 0, &descs, &n, &cap, &err);
        if (rc == KLI_OK || n != 0) {
            if (bad++ == 0)
                diag("prefix of %zu bytes was accepted", k);
        } else if (err.code != rc || strstr(err.msg, "trunc.safetensors") == NULL) {
            no_msg++;
        }
        safetensors_free_descs(descs, n);
        free(b);
    }
    ok(bad == 0, "all %zu truncations of a valid file are rejected", len);
    ok(no_msg == 0, "each with a message naming the file");
    {
        struct tensor_desc *descs = NULL;
        int64_t n = 0, cap = 0;
        struct kli_err err = {0};

        ok(safetensors_parse(full, len, "full", 0, &descs, &n, &cap, &err) == KLI_OK &&
           n == 5, "the untruncated image parses");
        safetensors_free_descs(descs, n);
    }

    /* The same through files: empty, 5 bytes, and header cut in the middle. */
    write_file("bad.safetensors", full, 0);
    expect_fail("empty file", "bad.safetensors", KLI_E_FORMAT, "truncated", "bad.safetensors");
    write_file("bad.safetensors", full, 5);
    expect_fail("5-byte file", "bad.safetensors", KLI_E_FORMAT, "truncated", NULL);
    write_file("bad.safetensors", full, 40);
    expect_fail("header cut short", "bad.safetensors", KLI_E_FORMAT, "header length", NULL);
    write_file("bad.safetensors", full, len - 1);
    expect_fail("data cut short", "bad.safetensors", KLI_E_FORMAT, "past the end", "\"s\"");
    free(full);
}

static void
test_bad_headers(void)
{
    static const uint8_t zeros[64];
    char big[1200];

    write_raw_len("bad.safetensors", 30, "{}");
    expect_fail("header length past the end", "bad.safetensors", KLI_E_FORMAT,
                "runs past the end", "bad.safetensors");
    write_raw_len("bad.safetensors", UINT64_C(1) << 63, "{}");
    expect_fail("header length 2^63", "bad.safetensors", KLI_E_FORMAT, "exceeds the limit",
                NULL);
    write_raw_len("bad.safetensors", 100000001, "{}");
    expect_fail("header length 100000001", "bad.safetensors", KLI_E_FORMAT,
                "exceeds the limit", NULL);
    write_raw_len("bad.safetensors", 0, "");
    expect_fail("header length 0", "bad.safetensors", KLI_E_FORMAT, "not a JSON object",
                NULL);

    expect_bad_header("header not JSON", "{this is not json}", NULL, 0, "not valid JSON");
    expect_bad_header("header JSON cut", "{\"a\":{\"dtype\":\"F32\"", NULL, 0,
                      "not valid JSON");
    expect_bad_header("header JSON array", "[1, 2, 3]", NULL, 0, "not a JSON object");
    expect_bad_header("header JSON string", "\"abc\"", NULL, 0, "not a JSON object");
    expect_bad_header("garbage after the object", "{} x", NULL, 0, "not valid JSON");
    /* cJSON before 1.7.18 reads past the end here (the padding is skipped as whitespace). */
    expect_bad_header("header ending after a comma", "{\"__metadata__\":{},", NULL, 0,
                      "not valid JSON");
    expect_bad_header("overlapping offsets",
                      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                      zeros, 12, "overlap");
    expect_bad_header("tensor inside another",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]},"
                      "\"b\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]}}",
                      zeros, 16, "overlap");
    expect_bad_header("offsets out of range",
                      "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
                      zeros, 8, "past the end");
    expect_bad_header("end before begin",
                      "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}",
                      zeros, 8, "before begin");
    expect_bad_header("size mismatch",
                      "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}",
                      zeros, 8, "size mismatch");
    expect_bad_header("size mismatch (dtype)",
                      "{\"a\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,16]}}",
                      zeros, 16, "size mismatch");
    expect_bad_header("unknown dtype",
                      "{\"a\":{\"dtype\":\"Q7_K\",\"shape\":[4],\"data_offsets\":[0,4]}}",
                      zeros, 4, "unknown dtype \"Q7_K\"");
    expect_bad_header("unknown dtype names the tensor",
                      "{\"w.q\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
                      zeros, 4, "\"w.q\"");
    expect_bad_header("duplicate tensor name",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                      "\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]},"
                      "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[2,3]}}",
                      zeros, 3, "duplicate");
    expect_bad_header("negative shape",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,0]}}",
                      zeros, 0, "negative");
    expect_bad_header("shape overflow",
                      "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],"
                      "\"data_offsets\":[0,0]}}", zeros, 0, "overflow");
    expect_bad_header("shape overflow in bytes",
                      "{\"a\":{\"dtype\":\"F64\",\"shape\":[2147483648,2147483648],"
                      "\"data_offsets\":[0,0]}}", zeros, 0, "byte size exceeds");
    expect_bad_header("huge dimension",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1e300],\"data_offsets\":[0,0]}}",
                      zeros, 0, "too large");
    expect_bad_header("fractional dimension",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1.5],\"data_offsets\":[0,0]}}",
                      zeros, 0, "not an integer");
    expect_bad_header("string dimension",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[\"2\"],\"data_offsets\":[0,2]}}",
                      zeros, 2, "not a number");
    expect_bad_header("9 dimensions",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],"
                      "\"data_offsets\":[0,1]}}", zeros, 1, "more than 8");
    expect_bad_header("missing dtype",
                      "{\"a\":{\"shape\":[1],\"data_offsets\":[0,1]}}", zeros, 1, "dtype");
    expect_bad_header("missing shape",
                      "{\"a\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", zeros, 1, "shape");
    expect_bad_header("missing data_offsets",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1]}}", zeros, 1, "data_offsets");
    expect_bad_header("three data_offsets",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,2]}}",
                      zeros, 2, "pair");
    expect_bad_header("negative offset",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[-1,0]}}",
                      zeros, 2, "negative");
    expect_bad_header("entry not an object", "{\"a\":[1,2]}", NULL, 0, "not a JSON object");
    expect_bad_header("duplicate key in an entry",
                      "{\"a\":{\"dtype\":\"U8\",\"dtype\":\"F32\",\"shape\":[1],"
                      "\"data_offsets\":[0,1]}}", zeros, 1, "duplicate key");
    expect_bad_header("empty tensor name",
                      "{\"\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                      zeros, 1, "empty tensor name");
    expect_bad_header("__metadata__ with a number",
                      "{\"__metadata__\":{\"format\":\"pt\",\"n\":3}}", NULL, 0,
                      "__metadata__");
    expect_bad_header("__metadata__ not an object", "{\"__metadata__\":[]}", NULL, 0,
                      "__metadata__");
    expect_bad_header("odd number of F4 elements",
                      "{\"a\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}",
                      zeros, 2, "whole number of bytes");

    /* A 513-byte name. */
    snprintf(big, sizeof(big), "{\"%0513d\":{\"dtype\":\"U8\",\"shape\":[1],"
             "\"data_offsets\":[0,1]}}", 0);
    expect_bad_header("513-byte name", big, zeros, 1, "longer than 512");
    snprintf(big, sizeof(big), "{\"%0512d\":{\"dtype\":\"U8\",\"shape\":[1],"
             "\"data_offsets\":[0,1]}}", 0);
    ok(write_st("bad.safetensors", big, zeros, 1), "write a 512-byte name");
    {
        struct kli_err err = {0};
        struct wfile *w = NULL;

        ok(wfile_open(&w, tpath("bad.safetensors"), &err) == KLI_OK &&
           strlen(wfile_tensor(w, 0)->name) == 512, "a 512-byte name is fine");
        wfile_close(w);
    }
}

static void
test_bad_paths(void)
{
    make_dir("empty");
    expect_fail("missing file", "does-not-exist.safetensors", KLI_E_IO,
                "does-not-exist.safetensors", NULL);
    expect_fail("directory without a checkpoint", "empty", KLI_E_IO, "no model.safetensors",
                NULL);
    {
        struct kli_err err = {0};

        ok(wfile_open(NULL, "x", &err) == KLI_E_INVALID, "NULL out is KLI_E_INVALID");
        wfile_close(NULL);
        ok(wfile_find(NULL, "x") == NULL && wfile_n_tensors(NULL) == 0 &&
           wfile_data_bytes(NULL) == 0, "NULL wfile is tolerated");
    }
}

/* Each bad index lives in its own directory next to two good shards. */
static void
bad_index(const char *what, const char *dir, const char *index, int code, const char *needle,
          const char *needle2)
{
    static const char h1[] =
        "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    static const char h2[] =
        "{\"y\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    static const char h2_dup[] =
        "{\"y\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
        "\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}";
    static const uint8_t zeros[8];
    char rel[128];

    make_dir(dir);
    snprintf(rel, sizeof(rel), "%s/s1.safetensors", dir);
    write_st(rel, h1, zeros, 8);
    snprintf(rel, sizeof(rel), "%s/s2.safetensors", dir);
    write_st(rel, strstr(what, "two shards") != NULL ? h2_dup : h2, zeros, 8);
    snprintf(rel, sizeof(rel), "%s/model.safetensors.index.json", dir);
    write_file(rel, index, strlen(index));
    expect_fail(what, dir, code, needle, needle2);
}

static void
test_bad_index(void)
{
    bad_index("index naming a missing shard", "ix1",
              "{\"weight_map\":{\"x\":\"s1.safetensors\",\"w\":\"s9.safetensors\"}}",
              KLI_E_IO, "s9.safetensors", "cannot open");
    bad_index("index naming a tensor absent from its shard", "ix2",
              "{\"weight_map\":{\"x\":\"s1.safetensors\",\"q\":\"s1.safetensors\"}}",
              KLI_E_FORMAT, "\"q\"", "does not have it");
    bad_index("index naming the wrong shard", "ix3",
              "{\"weight_map\":{\"x\":\"s2.safetensors\",\"y\":\"s1.safetensors\"}}",
              KLI_E_FORMAT, "\"x\"", "but it is in shard s1.safetensors");
    bad_index("tensor found in two shards", "ix4",
              "{\"weight_map\":{\"x\":\"s1.safetensors\",\"y\":\"s2.safetensors\"}}",
              KLI_E_FORMAT, "also found in", "\"x\"");
    bad_index("shard name with '/'", "ix5",
              "{\"weight_map\":{\"x\":\"../ix1/s1.safetensors\"}}",
              KLI_E_FORMAT, "not a plain file name", "../ix1/s1.safetensors");
    bad_index("shard name '..'", "ix6", "{\"weight_map\":{\"x\":\"..\"}}",
              KLI_E_FORMAT, "not a plain file name", NULL);
    bad_index("malformed index JSON", "ix7", "{\"weight_map\":{\"x\":\"s1.safetensors\"",
              KLI_E_FORMAT, "not valid JSON", "model.safetensors.index.json");
    bad_index("index without weight_map", "ix8", "{\"metadata\":{}}",
              KLI_E_FORMAT, "weight_map", NULL);
    bad_index("index weight_map value not a string", "ix9",
              "{\"weight_map\":{\"x\":1}}", KLI_E_FORMAT, "not a string", NULL);
    bad_index("index listing a tensor twice", "ix10",
              "{\"weight_map\":{\"x\":\"s1.safetensors\",\"x\":\"s1.safetensors\"}}",
              KLI_E_FORMAT, "twice", NULL);
    bad_index("index is an array", "ix11", "[]", KLI_E_FORMAT, "not a JSON object", NULL);
    bad_index("empty weight_map", "ix12", "{\"weight_map\":{}}", KLI_E_FORMAT, "empty", NULL);
}

/* Hostile files of issue 14: a header of "{}" (the checks did arithmetic on a NULL
 * descriptor array) and shards holding tensors the index does not list (the loader marked
 * them in an array sized by the index, past its end). */
static void
test_hostile(void)
{
    struct kli_err err = {0};
    struct tensor_desc *descs = NULL;
    int64_t n = 0, cap = 0;
    size_t len;
    uint8_t *b = build_st("{}", NULL, 0, &len);
    struct wfile *w = NULL;
    int rc;

    rc = safetensors_parse(b, len, "empty.safetensors", 0, &descs, &n, &cap, &err);
    ok(rc == KLI_OK && n == 0 && descs == NULL, "header {}: no tensors, nothing allocated");
    if (rc != KLI_OK)
        diag("%s", err.msg);
    free(b);
    ok(write_st("empty.safetensors", "{}", NULL, 0), "write a file whose header is {}");
    rc = wfile_open(&w, tpath("empty.safetensors"), &err);
    ok(rc == KLI_OK && wfile_n_tensors(w) == 0 && wfile_find(w, "x") == NULL,
       "a file whose header is {} opens with no tensors");
    wfile_close(w);

    /* Shard s1 holds 1000 tensors u0000..u0999 and then x; shard s2 holds y and 1000 more;
     * the index names only x and y. Both extra sets are kept and found. */
    enum { EXTRA = 1000 };
    size_t cap_h = (size_t)EXTRA * 80 + 256;
    char *h1 = malloc(cap_h), *h2 = malloc(cap_h);
    uint8_t *zeros = calloc((size_t)EXTRA + 8, 4);
    size_t k1 = 0, k2 = 0;
    k1 += (size_t)snprintf(h1 + k1, cap_h - k1, "{");
    k2 += (size_t)snprintf(h2 + k2, cap_h - k2, "{\"y\":{\"dtype\":\"F32\",\"shape\":[1],"
                           "\"data_offsets\":[0,4]}");
    for (int i = 0; i < EXTRA; i++) {
        k1 += (size_t)snprintf(h1 + k1, cap_h - k1, "\"u%04d\":{\"dtype\":\"F32\",\"shape\":"
                               "[1],\"data_offsets\":[%d,%d]},", i, 4 * i, 4 * i + 4);
        k2 += (size_t)snprintf(h2 + k2, cap_h - k2, ",\"v%04d\":{\"dtype\":\"U8\",\"shape\":"
                               "[1],\"data_offsets\":[%d,%d]}", i, 4 + i, 5 + i);
    }
    snprintf(h1 + k1, cap_h - k1, "\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":"
             "[%d,%d]}}", 4 * EXTRA, 4 * EXTRA + 4);
    snprintf(h2 + k2, cap_h - k2, "}");
    static const char index[] =
        "{\"weight_map\":{\"x\":\"s1.safetensors\",\"y\":\"s2.safetensors\"}}";
    make_dir("extra");
    ok(write_st("extra/s1.safetensors", h1, zeros, (size_t)EXTRA * 4 + 4) &&
       write_st("extra/s2.safetensors", h2, zeros, (size_t)EXTRA + 4) &&
       write_file("extra/model.safetensors.index.json", index, strlen(index)),
       "write 2 shards holding 2002 tensors, an index naming 2 of them");
    w = NULL;
    memset(&err, 0, sizeof(err));
    rc = wfile_open(&w, tpath("extra"), &err);
    ok(rc == KLI_OK && wfile_n_tensors(w) == 2 * EXTRA + 2 &&
       wfile_find(w, "x") != NULL && wfile_find(w, "y") != NULL &&
       wfile_find(w, "u0999") != NULL && wfile_find(w, "v0000") != NULL,
       "shards holding tensors the index does not list: open, every tensor found");
    if (rc != KLI_OK)
        diag("%s", err.msg);
    wfile_close(w);
    free(h1);
    free(h2);
    free(zeros);
}

/* 20,000 tensors (the real model has 20,493): every one is found by name. */
static void
test_many(void)
{
    enum { N = 20000 };
    size_t cap = (size_t)N * 80 + 16, len = 0;
    char *hdr = malloc(cap);
    uint8_t *data = malloc(N);
    struct kli_err err = {0};
    struct wfile *w = NULL;
    int rc, found = 0;
    char name[64];

    len += (size_t)snprintf(hdr + len, cap - len, "{");
    for (int i = 0; i < N; i++) {
        len += (size_t)snprintf(hdr + len, cap - len,
                                "%s\"model.layers.%d.w\":{\"dtype\":\"U8\",\"shape\":[1],"
                                "\"data_offsets\":[%d,%d]}", i ? "," : "", i, N - 1 - i,
                                N - i);
        data[i] = (uint8_t)i;
    }
    snprintf(hdr + len, cap - len, "}");
    ok(write_st("many.safetensors", hdr, data, N), "write 20000 tensors");
    rc = wfile_open(&w, tpath("many.safetensors"), &err);
    ok(rc == KLI_OK && wfile_n_tensors(w) == N, "20000 tensors open");
    if (rc == KLI_OK) {
        for (int i = 0; i < N; i++) {
            const struct tensor_desc *d;

            snprintf(name, sizeof(name), "model.layers.%d.w", i);
            d = wfile_find(w, name);
            found += d != NULL && d == wfile_tensor(w, i) &&
                     *(const uint8_t *)d->data == (uint8_t)(N - 1 - i);
        }
        ok(found == N && wfile_find(w, "model.layers.20000.w") == NULL &&
           wfile_data_bytes(w) == N, "each of 20000 found by name");
    } else {
        diag("%s", err.msg);
    }
    wfile_close(w);
    free(hdr);
    free(data);
}

/* ==== The committed fixture ==== */

static void
test_fixture(void)
{
    const char *td = tl_data();
    char path[1100], dir[1024];
    struct kli_err err = {0};
    struct wfile *w = NULL;
    const struct tensor_desc *q;
    uint8_t head[8];
    uint64_t hlen = 0;
    struct stat st;
    FILE *f;
    int rc;

    snprintf(dir, sizeof(dir), "%s/tiny-kimi-linear", td);
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    f = fopen(path, "rb");
    if (!ok(f != NULL && fread(head, 1, 8, f) == 8 && stat(path, &st) == 0,
            "read the fixture's header length")) {
        if (f != NULL)
            fclose(f);
        return;
    }
    fclose(f);
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | head[i];

    rc = wfile_open(&w, path, &err);
    if (!ok(rc == KLI_OK, "fixture opens")) {
        diag("%s", err.msg);
        return;
    }
    /* From the file's own header: 198 keys, one of them __metadata__. */
    ok(wfile_n_tensors(w) == 197, "fixture has 197 tensors");
    q = wfile_find(w, "model.layers.0.self_attn.q_proj.weight");
    ok(q != NULL && q->dtype == KLI_DT_BF16 && shape_is(q, 2, (const int64_t[]){64, 128}) &&
       q->numel == 8192 && q->nbytes == 16384, "q_proj of layer 0 is BF16 [64,128]");
    q = wfile_find(w, "model.layers.0.self_attn.A_log");
    ok(q != NULL && shape_is(q, 4, (const int64_t[]){1, 1, 2, 1}),
       "A_log of layer 0 is [1,1,2,1]");
    ok(wfile_data_bytes(w) == (uint64_t)st.st_size - 8 - hlen,
       "tensors cover the whole data buffer");
    wfile_close(w);

    w = NULL;
    rc = wfile_open(&w, dir, &err);
    ok(rc == KLI_OK && wfile_find(w, "lm_head.weight") != NULL,
       "fixture directory opens");
    wfile_close(w);
}

/* The streaming writer over a file larger than its 8 MiB buffer, fed in odd-sized pieces
 * (one larger than the buffer) so that flushes fall inside tensors and inside calls: every
 * byte reads back, and the reader's mapping starts on a 2 MiB boundary (weights/mmap.c: a
 * huge page can map the file only from such an address). */
static void
test_writer_large(void)
{
    enum { NA = 777777, NB = 5000003 };      /* floats: 3.1 MB and 20 MB */
    struct st_entry e[2] = {
        {"a", "F32", 1, {NA}, (uint64_t)NA * 4},
        {"b", "F32", 2, {1, NB}, (uint64_t)NB * 4},
    };
    size_t total = ((size_t)NA + NB) * 4;
    uint8_t *src = tl_pattern(total);
    const char *path = tpath("large.safetensors");
    struct st_writer *w = NULL;
    struct wfile *wf = NULL;
    struct kli_err err = {0};
    int rc;

    remember(path);
    rc = st_writer_open(&w, path, e, 2, &err);
    if (rc == KLI_OK)
        rc = tl_feed(st_writer_sink, w, src, total, &err);
    rc = st_writer_finish(w, rc, &err);
    ok(rc == KLI_OK, "writer: %zu bytes in odd pieces: %s", total, err.msg);

    rc = wfile_open(&wf, path, &err);
    const struct tensor_desc *a = rc == KLI_OK ? wfile_find(wf, "a") : NULL;
    const struct tensor_desc *b = rc == KLI_OK ? wfile_find(wf, "b") : NULL;
    ok(a != NULL && b != NULL && a->nbytes == e[0].nbytes && b->nbytes == e[1].nbytes &&
       memcmp(a->data, src, a->nbytes) == 0 && memcmp(b->data, src + a->nbytes, b->nbytes) == 0,
       "writer: the large file reads back byte for byte: %s", err.msg);
#ifdef __linux__
    {
        /* everything was just read, so all of the file is resident in this process */
        uint64_t res = 0, huge = 0;
        int got = wfile_pages(wf, &res, &huge);

        ok(got == 0 && res >= total && res <= total + 8192 && huge <= res,
           "its resident pages: %llu bytes (%llu in 2 MiB pages) of %zu",
           (unsigned long long)res, (unsigned long long)huge, total);
    }
#endif
#ifdef __linux__
    if (a != NULL) {
        /* the first tensor sits right after the 8-byte length and the header */
        uint64_t hl = 0;
        FILE *f = fopen(path, "rb");
        uint8_t l8[8];

        if (f != NULL && fread(l8, 1, 8, f) == 8)
            for (int i = 7; i >= 0; i--)
                hl = hl << 8 | l8[i];
        if (f != NULL)
            fclose(f);
        uintptr_t base = (uintptr_t)a->data - 8 - (uintptr_t)hl;
        ok(hl > 0 && base % ((uintptr_t)2 << 20) == 0,
           "a mapping of a file over 2 MiB starts on a 2 MiB boundary (%#lx)",
           (unsigned long)base);
    }
#endif
    wfile_close(wf);
    free(src);
}

static const struct tap_fn cases[] = {
    {"single", test_single},
    {"sharded", test_sharded},
    {"truncation", test_truncation},
    {"bad_headers", test_bad_headers},
    {"bad_paths", test_bad_paths},
    {"bad_index", test_bad_index},
    {"hostile", test_hostile},
    {"many", test_many},
    {"fixture", test_fixture},
    {"writer_large", test_writer_large},
};

int
main(int argc, char **argv)
{
    const char *t = getenv("TMPDIR");

    tap_init(argc, argv);
    snprintf(tmpdir, sizeof(tmpdir), "%s/kli-st-XXXXXX", t != NULL && *t ? t : "/tmp");
    if (mkdtemp(tmpdir) == NULL)
        skip_all("cannot make a temporary directory");
    tap_run(cases, sizeof(cases) / sizeof(cases[0]));

    for (int i = n_created - 1; i >= 0; i--) {
        if (remove(created[i]) != 0)
            diag("cannot remove %s: %s", created[i], strerror(errno));
    }
    if (rmdir(tmpdir) != 0)
        diag("cannot remove %s: %s", tmpdir, strerror(errno));
    plan_done();
    return tap_exit();
}
