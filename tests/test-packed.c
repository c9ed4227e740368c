/*
 * test-packed.c - the .kli format (weights/packed.c) and kli_convert: the tiny model
 * converted and read back gives the directory's logits bit for bit (as stored, bf16, and
 * q8_0/q4 against load-time conversion), the same tokenizer and description; routed experts
 * are page-aligned contiguous ranges; every damaged section is named, truncated files and
 * newer major versions are refused; an interrupted or killed conversion leaves no output,
 * and an existing output is kept without force.
 */
#include "config.h"

#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kli.h"
#include "tap.h"
#include "testlib.h"
#include "util.h"
#include "weights.h"

static char fixture[4096];
static kli_token ids[40];

/* Both models' logits over ids exist and are equal bit for bit. */
static int
same_logits(const char *a, const char *wa, const char *b, const char *wb)
{
    return tl_same_logits(a, wa, b, wb, ids, (int)(sizeof(ids) / sizeof(ids[0])));
}

static int
convert(const char *in, const char *out, const char *type, int force, struct kli_err *err)
{
    struct kli_convert_options o;

    kli_convert_options_init(&o);
    o.type = type;
    o.force = force;
    memset(err, 0, sizeof(*err));
    return kli_convert(in, out, &o, err);
}

/* The number of entries of directory d whose names begin with prefix. */
static int
count_prefixed(const char *d, const char *prefix)
{
    DIR *dp = opendir(d);
    struct dirent *de;
    int n = 0;

    while (dp != NULL && (de = readdir(dp)) != NULL)
        n += strncmp(de->d_name, prefix, strlen(prefix)) == 0;
    if (dp != NULL)
        closedir(dp);
    return n;
}

static int
exists(const char *path)
{
    struct stat st;

    return stat(path, &st) == 0;
}

/* Offset and size of section `kind` (kli-pack(5): the table at 64, 32-byte entries). */
static int
section(const uint8_t *b, uint32_t kind, uint64_t *off, uint64_t *size)
{
    for (int i = 0; i < 8; i++) {
        const uint8_t *e = b + 64 + 32 * i;

        if (e[0] == kind) {
            *off = util_rd64(e + 8);
            *size = util_rd64(e + 16);
            return 1;
        }
    }
    return 0;
}

/* Opens `path` as a model (and verifies its tensors when `verify`); @return the status,
 * the message in err. */
static int
open_status(const char *path, int verify, struct kli_err *err)
{
    struct kli_model *m = NULL;
    int rc;

    memset(err, 0, sizeof(*err));
    rc = kli_model_open(&m, path, NULL, err);
    if (rc == KLI_OK && verify)
        rc = kli_model_verify(m, NULL, NULL, err);
    kli_model_close(m);
    return rc;
}

static int interrupt_calls;

static int
interrupt_after_3(void *ud)
{
    (void)ud;
    return ++interrupt_calls > 3;
}

static void
die_midway(void *ud, uint64_t done, uint64_t total, const char *what)
{
    (void)ud;
    (void)what;
    if (done > total / 3)
        raise(SIGKILL);
}

/* The writer over more than its 8 MiB buffer, fed in odd-sized pieces (one larger than the
 * buffer), so that its flushes, which fall on multiples of 8 MiB of the file, land inside
 * tensors and inside calls: the tensors read back byte for byte and match their checksums. */
static void
test_large(const char *dir)
{
    enum { NA = 777777, NB = 5000003 };      /* floats: 3.1 MB and 20 MB */
    struct pack_entry e[2] = {
        {.name = "a", .dtype = KLI_DT_F32, .ndim = 1, .shape = {NA},
         .nbytes = (uint64_t)NA * 4, .group = -1},
        {.name = "b", .dtype = KLI_DT_F32, .ndim = 2, .shape = {1, NB},
         .nbytes = (uint64_t)NB * 4, .group = -1},
    };
    static const char cfg[] = "{}";
    struct pack_meta meta = {.config = cfg, .config_len = sizeof(cfg) - 1};
    size_t total = ((size_t)NA + NB) * 4;
    uint8_t *src = tl_pattern(total);
    char path[4200];
    struct pack_writer *w = NULL;
    struct wfile *wf = NULL;
    struct kli_err err = {0};
    int rc;

    snprintf(path, sizeof(path), "%s/large.kli", dir);
    rc = pack_writer_open(&w, path, &meta, e, 2, &err);
    if (rc == KLI_OK)
        rc = tl_feed(pack_writer_sink, w, src, total, &err);
    if (rc == KLI_OK)
        rc = pack_writer_close(w, &err);
    else
        pack_writer_abort(w);
    ok(rc == KLI_OK, "writer: %zu bytes in odd pieces: %s", total, err.msg);
    rc = wfile_open(&wf, path, &err);
    if (rc == KLI_OK)
        rc = wfile_verify(wf, NULL, NULL, &err);
    const struct tensor_desc *a = rc == KLI_OK ? wfile_find(wf, "a") : NULL;
    const struct tensor_desc *b = rc == KLI_OK ? wfile_find(wf, "b") : NULL;
    ok(a != NULL && b != NULL && a->nbytes == e[0].nbytes && b->nbytes == e[1].nbytes &&
       memcmp(a->data, src, a->nbytes) == 0 &&
       memcmp(b->data, src + a->nbytes, b->nbytes) == 0,
       "the large file verifies and reads back byte for byte: %s", err.msg);
    wfile_close(wf);
    remove(path);
    free(src);
}

static void
test_xxh64(void)
{
    const char *s = "Nobody inspects the spammish repetition";

    ok(xxh64("", 0, 0) == 0xef46db3751d8e999ull &&
       xxh64("a", 1, 0) == 0xd24ec4f1a98c6e5bull &&
       xxh64("abc", 3, 0) == 0x44bc2cf5ad770999ull &&
       xxh64(s, strlen(s), 0) == 0xfbcea83c8a378bf1ull,
       "XXH64 gives the reference values (empty, short, and past one 32-byte stripe)");
}

/* Routed experts: one group per expert of every MoE layer, each w1, w3, w2 back to back in
 * a range that starts on a page and shares no page with another tensor. */
static void
test_groups(const char *path)
{
    struct wfile *wf = NULL;
    struct kli_err err = {0};
    const struct pack_info *pk;
    int good = 1, contiguous = 1, alone = 1;

    if (wfile_open(&wf, path, &err) != KLI_OK || (pk = wfile_pack(wf)) == NULL) {
        ok(0, "open %s as a wfile: %s", path, err.msg);
        wfile_close(wf);
        return;
    }
    ok(pk->n_groups == 4 * 8, "32 expert groups (4 MoE layers x 8 experts): %lld",
       (long long)pk->n_groups);
    for (int64_t g = 0; g < pk->n_groups; g++) {
        const struct tensor_group *G = &pk->groups[g];
        static const char *const role[3] = {"w1", "w3", "w2"};
        uint64_t end = (G->offset + G->size + 4095) / 4096 * 4096;

        good &= G->offset % 4096 == 0 && G->n == 3 && (uintptr_t)G->data % 4096 == 0;
        for (int k = 0; k < G->n && k < 3; k++) {
            const struct tensor_desc *d = wfile_tensor(wf, G->first + k);
            char want[128];

            snprintf(want, sizeof(want), "model.layers.%d.block_sparse_moe.experts.%d.%s.weight",
                     G->layer, G->expert, role[k]);
            good &= strcmp(d->name, want) == 0;
            if (k > 0) {
                const struct tensor_desc *p = wfile_tensor(wf, G->first + k - 1);
                contiguous &= (const uint8_t *)d->data ==
                              (const uint8_t *)p->data + (p->nbytes + 63) / 64 * 64;
            }
        }
        for (int64_t t = 0; t < wfile_n_tensors(wf); t++) {
            const struct tensor_desc *d = wfile_tensor(wf, t);
            uint64_t o = (uint64_t)((const uint8_t *)d->data - (const uint8_t *)G->data) +
                         G->offset;

            if (t >= G->first && t < G->first + G->n)
                continue;
            alone &= d->nbytes == 0 || o + d->nbytes <= G->offset || o >= end;
        }
    }
    ok(good, "each group starts on a page and holds w1, w3, w2 of its layer and expert");
    ok(contiguous, "an expert's three matrices are contiguous (64-byte steps)");
    ok(alone, "no other tensor shares a page with an expert's range");
    wfile_close(wf);
}

/* A byte changed in each section is reported naming that section. */
static void
test_damage(const char *path, const char *dir)
{
    static const struct {
        uint32_t kind;
        const char *name;
    } secs[] = {{1, "config"}, {2, "tokenizer"}, {3, "directory"}};
    struct kli_err err;
    char bad[4200];
    size_t len;
    uint8_t *b = (uint8_t *)tl_slurp(path, &len);
    uint64_t off, size;

    if (b == NULL) {
        ok(0, "read %s", path);
        return;
    }
    snprintf(bad, sizeof(bad), "%s/bad.kli", dir);

    b[40] ^= 0x10;   /* a reserved byte: only the checksum notices */
    ok(tl_spill(bad, b, len) && open_status(bad, 0, &err) == KLI_E_FORMAT &&
       strstr(err.msg, "section \"header\" is damaged") != NULL,
       "a damaged header is named: %s", err.msg);
    b[40] ^= 0x10;
    for (size_t i = 0; i < sizeof(secs) / sizeof(secs[0]); i++) {
        char want[64];

        if (!section(b, secs[i].kind, &off, &size) || size == 0) {
            ok(0, "section %s present", secs[i].name);
            continue;
        }
        snprintf(want, sizeof(want), "section \"%s\" is damaged", secs[i].name);
        b[off + size / 2] ^= 0x01;
        ok(tl_spill(bad, b, len) && open_status(bad, 0, &err) == KLI_E_FORMAT &&
           strstr(err.msg, want) != NULL, "a damaged %s is named: %s", secs[i].name, err.msg);
        b[off + size / 2] ^= 0x01;
    }
    /* Tensor data: opening does not read it; verification finds it. */
    if (section(b, 4, &off, &size)) {
        b[off + 5] ^= 0x40;
        ok(tl_spill(bad, b, len) && open_status(bad, 0, &err) == KLI_OK,
           "a damaged tensor does not slow or fail opening");
        ok(open_status(bad, 1, &err) == KLI_E_FORMAT &&
           strstr(err.msg, "section \"data\" is damaged: tensor \"") != NULL,
           "verification names the damaged tensor: %s", err.msg);
        b[off + 5] ^= 0x40;
    }
    ok(tl_spill(bad, b, len) && open_status(bad, 1, &err) == KLI_OK,
       "the undamaged copy verifies: %s", err.msg);

    /* Truncation, at the end and inside the header. */
    ok(tl_spill(bad, b, len - 1) && open_status(bad, 0, &err) == KLI_E_FORMAT &&
       strstr(err.msg, "truncated") != NULL, "one byte short is refused: %s", err.msg);
    ok(tl_spill(bad, b, 300) && open_status(bad, 0, &err) == KLI_E_FORMAT &&
       strstr(err.msg, "truncated") != NULL, "a cut header is refused: %s", err.msg);
    {
        int all = 1;
        size_t cuts[] = {0, 7, 8, 63, 64, 511, 512, 4096, len / 2, len - 4096};

        for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
            struct tensor_desc *descs = NULL;
            int64_t n = 0, cap = 0;
            struct pack_info info;

            memset(&err, 0, sizeof(err));
            all &= k_pack_parse(b, cuts[i], "cut", 0, &descs, &n, &cap, &info, &err) ==
                   KLI_E_FORMAT && n == 0 && err.msg[0] != '\0';
            safetensors_free_descs(descs, n);
        }
        ok(all, "every truncation point fails cleanly in the parser");
    }

    /* A newer major version (with a valid checksum) is not misread. */
    b[8] = 2;
    util_wr64(b + 504, xxh64(b, 504, 0));
    ok(tl_spill(bad, b, len) && open_status(bad, 0, &err) == KLI_E_UNSUPPORTED &&
       strstr(err.msg, "version 2.0") != NULL, "a newer major version is refused: %s",
       err.msg);
    free(b);
    unlink(bad);
}

static void
test_tokenizer(const char *kli)
{
    static const char *const texts[] = {
        "Hello, world!", "  indented\n\tlines\r\n", "<|im_end|> special [BOS] text",
        "caf\xc3\xa9 \xe4\xbd\xa0\xe5\xa5\xbd 123456789", "",
    };
    struct kli_model *a = NULL, *b = NULL;
    struct kli_err err = {0};
    int same = 1;

    if (kli_model_open(&a, fixture, NULL, &err) != KLI_OK ||
        kli_model_open(&b, kli, NULL, &err) != KLI_OK || kli_model_tokenizer(b) == NULL) {
        ok(0, "tokenizers: %s", err.msg);
        goto out;
    }
    const struct kli_tokenizer *ta = kli_model_tokenizer(a), *tb = kli_model_tokenizer(b);
    same = kli_tokenizer_n_vocab(ta) == kli_tokenizer_n_vocab(tb) &&
           kli_tokenizer_n_base(ta) == kli_tokenizer_n_base(tb) &&
           kli_tokenizer_find_special(ta, "<|im_end|>") ==
           kli_tokenizer_find_special(tb, "<|im_end|>");
    for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
        for (int flags = 0; flags <= KLI_TOKENIZE_SPECIAL; flags += KLI_TOKENIZE_SPECIAL) {
            kli_token x[256], y[256];
            size_t len = strlen(texts[i]);
            int64_t nx = kli_tokenize(ta, texts[i], len, flags, x, 256, &err);
            int64_t ny = kli_tokenize(tb, texts[i], len, flags, y, 256, &err);

            same &= nx == ny && nx >= 0 && nx <= 256 &&
                    memcmp(x, y, (size_t)nx * sizeof(kli_token)) == 0;
        }
    }
    ok(same, "the .kli tokenizer encodes like the directory's (plain and with specials)");

    /* Without the tensor list, which follows the file's order. */
    size_t na = kli_model_describe(a, 0, NULL, 0), nb = kli_model_describe(b, 0, NULL, 0);
    char *da = malloc(na + 1), *db = malloc(nb + 1);
    if (da != NULL && db != NULL) {
        kli_model_describe(a, 0, da, na + 1);
        kli_model_describe(b, 0, db, nb + 1);
        /* The first line names the path. */
        const char *ra = strchr(da, '\n'), *rb = strchr(db, '\n');
        ok(ra != NULL && rb != NULL && strcmp(ra, rb) == 0,
           "kli info describes the .kli like the directory");
    } else {
        ok(0, "out of memory");
    }
    free(da);
    free(db);
out:
    kli_model_close(a);
    kli_model_close(b);
}

int
main(int argc, char **argv)
{
    const char *td = tl_data();
    char dir[] = "/tmp/kli-packed-XXXXXX";
    char p_as[4200], p_bf[4200], p_q8[4200], p_q4[4200], p_q8b[4200], p_x[4200], tmp[4300];
    struct kli_err err;
    struct kli_convert_options o;
    int rc;

    tap_init_whole(argc, argv);
    snprintf(fixture, sizeof(fixture), "%s/tiny-kimi-linear", td);
    if (mkdtemp(dir) == NULL)
        skip_all("mkdtemp failed");
    for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++)
        ids[i] = (kli_token)((i * 37 + 11) % 500);
    snprintf(p_as, sizeof(p_as), "%s/as-stored.kli", dir);
    snprintf(p_bf, sizeof(p_bf), "%s/bf16.kli", dir);
    snprintf(p_q8, sizeof(p_q8), "%s/q8_0.kli", dir);
    snprintf(p_q4, sizeof(p_q4), "%s/q4.kli", dir);
    snprintf(p_q8b, sizeof(p_q8b), "%s/q8_0-from-kli.kli", dir);
    snprintf(p_x, sizeof(p_x), "%s/x.kli", dir);

    test_xxh64();
    test_large(dir);

    /* ---- conversions and logits ---- */
    rc = convert(fixture, p_as, NULL, 0, &err);
    snprintf(tmp, sizeof(tmp), "%s.tmp", p_as);
    ok(rc == KLI_OK && exists(p_as) && !exists(tmp), "convert as stored: %s", err.msg);
    ok(same_logits(fixture, NULL, p_as, NULL), "as-stored .kli: logits bit-identical");
    ok(convert(fixture, p_bf, "bf16", 0, &err) == KLI_OK, "convert --type bf16: %s", err.msg);
    ok(same_logits(fixture, NULL, p_bf, NULL), "bf16 .kli: logits bit-identical");
    ok(convert(fixture, p_q8, "q8_0", 0, &err) == KLI_OK, "convert --type q8_0: %s", err.msg);
    ok(same_logits(fixture, "q8_0", p_q8, NULL),
       "q8_0 .kli: logits equal the directory opened with weight_type q8_0, bitwise");
    ok(convert(fixture, p_q4, "q4", 0, &err) == KLI_OK, "convert --type q4: %s", err.msg);
    ok(same_logits(fixture, "q4", p_q4, NULL),
       "q4 .kli: logits equal the directory opened with weight_type q4, bitwise");
    ok(convert(p_as, p_q8b, "q8_0", 0, &err) == KLI_OK && same_logits(p_q8, NULL, p_q8b, NULL),
       "a .kli converts too (as-stored .kli to q8_0 = directory to q8_0): %s", err.msg);
    {
        struct stat a = {0}, b = {0};
        int have = stat(p_as, &a) == 0 && stat(p_q8, &b) == 0;
        ok(have && b.st_size < a.st_size, "the q8_0 file is smaller (%lld < %lld bytes)",
           (long long)b.st_size, (long long)a.st_size);
    }

    test_tokenizer(p_as);
    test_groups(p_as);
    ok(open_status(p_q8, 1, &err) == KLI_OK, "kli_model_verify passes on a fresh file: %s",
       err.msg);
    ok(open_status(fixture, 1, &err) == KLI_OK, "kli_model_verify on a directory: nothing to do");
    test_damage(p_as, dir);

    /* ---- overwriting, interruption, a killed writer ---- */
    rc = convert(fixture, p_as, "q8_0", 0, &err);
    ok(rc == KLI_E_IO && strstr(err.msg, "--force") != NULL &&
       same_logits(fixture, NULL, p_as, NULL),
       "an existing output is refused without force and kept: %s", err.msg);
    ok(convert(fixture, p_as, "q8_0", 1, &err) == KLI_OK && same_logits(p_q8, NULL, p_as, NULL),
       "--force overwrites: %s", err.msg);

    kli_convert_options_init(&o);
    o.interrupt = interrupt_after_3;
    memset(&err, 0, sizeof(err));
    rc = kli_convert(fixture, p_x, &o, &err);
    snprintf(tmp, sizeof(tmp), "%s.tmp", p_x);
    ok(rc == KLI_E_INTERRUPTED && !exists(p_x) && !exists(tmp),
       "an interrupted conversion leaves neither the file nor its temporary: %s", err.msg);

    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        kli_convert_options_init(&o);
        o.progress = die_midway;
        kli_convert(fixture, p_x, &o, &err);
        _exit(0);
    }
    int status = 0;
    ok(pid > 0 && waitpid(pid, &status, 0) == pid && WIFSIGNALED(status) && !exists(p_x),
       "a conversion killed midway leaves no output file");
    ok(count_prefixed(dir, ".x.kli.") > 0, "... only the files it left beside it (%d)",
       count_prefixed(dir, ".x.kli."));
    ok(convert(fixture, p_x, NULL, 0, &err) == KLI_OK && same_logits(fixture, NULL, p_x, NULL),
       "the next conversion replaces the stale temporary: %s", err.msg);
    ok(count_prefixed(dir, ".x.kli.") == 0, "... and removes it (and its lock file)");

    /* ---- bad arguments ---- */
    ok(convert(fixture, p_x, "q7", 1, &err) == KLI_E_RANGE, "an unknown type is refused");
    ok(convert(dir, p_x, NULL, 1, &err) == KLI_E_IO, "a directory without a model is refused: %s",
       err.msg);
    ok(open_status(dir, 0, &err) != KLI_OK, "kli_model_open on an empty directory fails");

    unlink(p_as);
    unlink(p_bf);
    unlink(p_q8);
    unlink(p_q4);
    unlink(p_q8b);
    unlink(p_x);
    unlink(tmp);
    rmdir(dir);
    plan_done();
    return tap_exit();
}
