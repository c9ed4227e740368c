/*
 * test-tokenizer.c - the tiktoken BPE tokenizer against ids made by the tiktoken library
 * (tests/data/tokenizer/golden.json), plus chunking, error and loading cases.
 *
 * Data: tests/data/tokenizer and tests/data/tiny-kimi-linear (testlib.h).
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tap.h"
#include "testlib.h"
#include "tokenizer.h"
#include "unicode.h"

static const char *testdata;

/* Encodes into a fresh array; *n receives the count (or the negative status). */
static kli_token *
encode(const struct kli_tokenizer *t, const char *s, size_t len, int flags, int64_t *n)
{
    kli_token *ids = malloc((len + 1) * sizeof(*ids));

    *n = kli_tokenize(t, s, len, flags, ids, (int64_t)len + 1, NULL);
    return ids;
}

/* A short one-line label for a case: control characters become '?'; no split character. */
static const char *
label(const char *text, char *buf, size_t cap)
{
    size_t n = strlen(text), i;

    if (n > cap - 1)
        n = kli_utf8_complete_prefix(text, cap - 1);
    for (i = 0; i < n; i++)
        buf[i] = (unsigned char)text[i] < 0x20 ? '?' : text[i];
    buf[n] = '\0';
    return buf;
}

static int
same_ids(const kli_token *a, int64_t na, const cJSON *arr)
{
    int64_t i = 0;
    const cJSON *v;

    if (na != cJSON_GetArraySize(arr))
        return 0;
    cJSON_ArrayForEach(v, arr) {
        if (!cJSON_IsNumber(v) || a[i] != (kli_token)v->valueint)
            return 0;
        i++;
    }
    return 1;
}

static int
decodes_to(const struct kli_tokenizer *t, const kli_token *ids, int64_t n, const char *s,
           size_t len)
{
    char *buf = malloc(len + 1);
    int64_t got = kli_detokenize(t, ids, n, buf, (int64_t)len + 1, NULL);
    int r = got == (int64_t)len && memcmp(buf, s, len) == 0;

    free(buf);
    return r;
}

/* ==== golden.json ========================================================================== */

static void
test_golden(const struct kli_tokenizer *t, const cJSON *golden)
{
    const cJSON *cases = cJSON_GetObjectItem(golden, "cases");
    const cJSON *specials = cJSON_GetObjectItem(golden, "specials");
    const cJSON *c, *sp;
    int n_case = 0, bad = 0, n_sp = 0;

    ok(kli_tokenizer_n_base(t) == cJSON_GetObjectItem(golden, "n_base")->valueint,
       "n_base is %d", kli_tokenizer_n_base(t));
    ok(kli_tokenizer_n_vocab(t) == kli_tokenizer_n_base(t) + 256, "n_vocab is n_base + 256");

    cJSON_ArrayForEach(sp, specials) {
        size_t len = 0;
        const char *b = kli_token_bytes(t, (kli_token)sp->valueint, &len);

        n_sp++;
        if (kli_tokenizer_find_special(t, sp->string) != sp->valueint || b == NULL ||
            len != strlen(sp->string) || memcmp(b, sp->string, len) != 0) {
            diag("special %s: want %d, find_special gives %d", sp->string, sp->valueint,
                 (int)kli_tokenizer_find_special(t, sp->string));
            bad++;
        }
    }
    ok(n_sp == 256 && bad == 0, "the %d special ids and names match golden.json", n_sp);
    ok(kli_tokenizer_find_special(t, "<|im_start|>") == -1, "no special <|im_start|>");

    cJSON_ArrayForEach(c, cases) {
        const char *text = cJSON_GetObjectItem(c, "text")->valuestring;
        size_t len = strlen(text);
        int64_t no, ns;
        kli_token *ord = encode(t, text, len, 0, &no);
        kli_token *spe = encode(t, text, len, KLI_TOKENIZE_SPECIAL, &ns);
        int64_t np, nq;
        kli_token *ord_p = encode(t, text, len, TOKENIZER_PCRE2_ONLY, &np);
        kli_token *spe_p = encode(t, text, len, KLI_TOKENIZE_SPECIAL | TOKENIZER_PCRE2_ONLY, &nq);
        char lb[48];

        ok(same_ids(ord, no, cJSON_GetObjectItem(c, "ordinary")),
           "case %d ordinary (%lld ids): %s", n_case, (long long)no,
           label(text, lb, sizeof(lb)));
        ok(same_ids(spe, ns, cJSON_GetObjectItem(c, "special")),
           "case %d special (%lld ids)", n_case, (long long)ns);
        ok(decodes_to(t, ord, no, text, len) && decodes_to(t, spe, ns, text, len) &&
           no <= (int64_t)len && ns <= (int64_t)len,
           "case %d decodes back byte for byte; ids <= bytes", n_case);
        ok(same_ids(ord_p, np, cJSON_GetObjectItem(c, "ordinary")) &&
           same_ids(spe_p, nq, cJSON_GetObjectItem(c, "special")),
           "case %d with PCRE2 alone (no ASCII fast path)", n_case);
        free(ord);
        free(spe);
        free(ord_p);
        free(spe_p);
        n_case++;
    }
    ok(n_case >= 30, "%d golden cases", n_case);
}

/* Retry protocol: a short buffer gets the first ids and the full count. */
static void
test_short_buffer(const struct kli_tokenizer *t)
{
    const char *s = "Hello, World! <|im_end|> getUserName 1234567";
    int64_t n, m;
    kli_token *full = encode(t, s, strlen(s), KLI_TOKENIZE_SPECIAL, &n);
    kli_token part[4] = {-7, -7, -7, -7};
    char buf[8];

    m = kli_tokenize(t, s, strlen(s), KLI_TOKENIZE_SPECIAL, part, 3, NULL);
    ok(m == n && n > 3 && memcmp(part, full, 3 * sizeof(*part)) == 0 && part[3] == -7,
       "cap 3: returns %lld (the full count) and writes exactly 3 ids", (long long)m);
    ok(kli_tokenize(t, s, strlen(s), 0, NULL, 0, NULL) > 0, "cap 0 with NULL out counts");
    m = kli_detokenize(t, full, n, buf, (int64_t)sizeof(buf), NULL);
    ok(m == (int64_t)strlen(s) && memcmp(buf, s, sizeof(buf)) == 0,
       "detokenize into 8 bytes: needs %lld, first 8 written", (long long)m);
    free(full);
}

/*
 * The ASCII fast path of the split against PCRE2 alone, on random strings built from pieces
 * that probe its edges: every ASCII class, contractions in all cases, whitespace runs, and
 * the non-ASCII characters next to which it must hand over (letters, digits, spaces, "'ſ").
 */
static void
test_fast_path(const struct kli_tokenizer *t, const char *what)
{
    static const char *const atoms[] = {
        "a", "Z", "q", "Hello", "WORLD", "iPhone", "HTTPServer", "x", "7", "123456", " ", "  ",
        "\t", "\n", "\r\n", "\v", "\f", " \n ", "\n\n", "'", "'s", "'S", "'t", "'re", "'RE",
        "'ve", "'m", "'ll", "'lL", "'d", "'x", "'r", "'l", ".", "...", "!?", "-", "_", "#", "\x1c",
        "\x1f", "\x7f", "\x01", "(", "\"", "\xc3\xa9", "\xc3\x89", "\xc5\xbf", "\xc2\xa0",
        "\xe3\x80\x80", "\xe4\xb8\xad", "\xd9\xa3", "\xf0\x9f\x98\x80", "\xe2\x80\x8b",
        "\xcc\x81", "\xc7\x85", "\xe1\xa0\x8e", "<|im_end|>", "[BOS]",
    };
    uint64_t rng = 0x9E3779B97F4A7C15u;
    char text[512];
    kli_token a[512], b[512];
    int bad = 0, i, k;

    for (i = 0; i < 5000; i++) {
        size_t len = 0;
        int n_atoms;

        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        n_atoms = (int)(rng % 24);
        for (k = 0; k < n_atoms; k++) {
            const char *at;

            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            at = atoms[(rng >> 8) % (sizeof(atoms) / sizeof(atoms[0]))];
            memcpy(text + len, at, strlen(at));
            len += strlen(at);
        }
        for (int flags = 0; flags <= KLI_TOKENIZE_SPECIAL; flags++) {
            int64_t na = kli_tokenize(t, text, len, flags, a, 512, NULL);
            int64_t nb = kli_tokenize(t, text, len, flags | TOKENIZER_PCRE2_ONLY, b, 512, NULL);

            if (na < 0 || na != nb || memcmp(a, b, (size_t)na * sizeof(*a)) != 0) {
                if (bad++ < 3)
                    diag("fast path differs on %.*s", (int)len, text);
            }
        }
    }
    ok(bad == 0, "%s: ASCII fast path = PCRE2 alone on 5,000 random strings (%d differ)", what,
       bad);
}

/* ==== Chunking (tokenization_kimi.py) ====================================================== */

/* Python str.isspace, written out again independently of unicode.c. */
static int
py_isspace(uint32_t c)
{
    static const uint32_t sp[] = {
        0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0, 0x1680,
        0x2000, 0x2001, 0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009,
        0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000,
    };

    for (size_t i = 0; i < sizeof(sp) / sizeof(sp[0]); i++) {
        if (sp[i] == c)
            return 1;
    }
    return 0;
}

static size_t
put_utf8(char *o, uint32_t c)
{
    if (c < 0x80) {
        o[0] = (char)c;
        return 1;
    }
    if (c < 0x800) {
        o[0] = (char)(0xC0 | c >> 6);
        o[1] = (char)(0x80 | (c & 0x3F));
        return 2;
    }
    if (c < 0x10000) {
        o[0] = (char)(0xE0 | c >> 12);
        o[1] = (char)(0x80 | (c >> 6 & 0x3F));
        o[2] = (char)(0x80 | (c & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | c >> 18);
    o[1] = (char)(0x80 | (c >> 12 & 0x3F));
    o[2] = (char)(0x80 | (c >> 6 & 0x3F));
    o[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

/*
 * Encodes cps[0..n) two ways: whole, and as the slices tokenization_kimi.py makes (the Python
 * loop transcribed over a code point array), each slice encoded on its own. They must agree,
 * and the slicing must cut `want_slices` times.
 */
static void
check_chunking(const struct kli_tokenizer *t, const uint32_t *cps, size_t n, int flags,
               int want_slices, const char *what)
{
    char *text = calloc(4 * n + 1, 1);
    size_t *byte_at = malloc((n + 1) * sizeof(*byte_at));
    size_t len = 0, i, piece;
    int64_t nw, ne = 0;
    kli_token *whole, *exp = malloc((4 * n + 1) * sizeof(*exp));
    int slices = 0, good = 1;

    for (i = 0; i < n; i++) {
        byte_at[i] = len;
        len += put_utf8(text + len, cps[i]);
    }
    byte_at[n] = len;
    whole = encode(t, text, len, flags, &nw);
    for (piece = 0; piece < n; piece += 400000) {
        size_t end = piece + 400000 < n ? piece + 400000 : n;
        size_t run = 0, start = piece;
        int is_sp = py_isspace(cps[piece]);

        for (i = piece; i <= end; i++) {
            int cut = i == end;

            if (!cut) {
                int now = py_isspace(cps[i]);

                if (is_sp ^ now) {
                    run = 1;
                    is_sp = now;
                } else if (++run > 25000) {
                    cut = 1;
                    run = 1;
                }
            }
            if (cut) {
                int64_t m = kli_tokenize(t, text + byte_at[start], byte_at[i] - byte_at[start],
                                         flags, exp + ne, (int64_t)(4 * n + 1) - ne, NULL);

                if (m < 0)
                    good = 0;
                else
                    ne += m;
                slices++;
                start = i;
            }
        }
    }
    ok(good && slices == want_slices && nw == ne &&
       memcmp(whole, exp, (size_t)ne * sizeof(*exp)) == 0,
       "%s: %d slices, whole text = slices encoded apart (%lld ids)", what, slices,
       (long long)nw);
    free(whole);
    free(exp);
    free(byte_at);
    free(text);
}

static void
test_chunking(const struct kli_tokenizer *t)
{
    size_t n = 820000, i;
    uint32_t *cp = malloc(n * sizeof(*cp));
    char *text;
    int64_t m;
    kli_token *ids;
    int has_bos = 0;

    for (i = 0; i < 30000; i++)
        cp[i] = 'a';
    check_chunking(t, cp, 30000, 0, 2, "30,000 x 'a'");
    for (i = 0; i < 30000; i++)
        cp[i] = ' ';
    check_chunking(t, cp, 30000, 0, 2, "30,000 spaces");
    for (i = 0; i < 30000; i++)
        cp[i] = i < 15000 ? 0x3000 : 0xA0;   /* non-ASCII isspace() characters */
    check_chunking(t, cp, 30000, 0, 2, "30,000 U+3000/U+00A0");
    for (i = 0; i < 60000; i++)
        cp[i] = i < 30000 ? 0xE9 : '\n';      /* counted in characters, not bytes */
    check_chunking(t, cp, 60000, 0, 3, "30,000 x U+00E9 + 30,000 newlines");
    for (i = 0; i < 50001; i++)
        cp[i] = i % 2 ? 0x200B : 0x4E2D;      /* U+200B is not isspace(): one long run */
    check_chunking(t, cp, 50001, 0, 3, "50,001 Han/U+200B");
    for (i = 0; i < 30000; i++)
        cp[i] = "ab[BOS]"[i % 7];
    check_chunking(t, cp, 30000, KLI_TOKENIZE_SPECIAL, 2, "specials across a 25,000 cut");
    /* Over 400,000 characters, multi-byte, with short runs only: the cuts at characters
     * 400,000 and 800,000 fall inside "hello" and "w\u00f6rld", where they change the ids. */
    for (i = 0; i < n; i++)
        cp[i] = (uint32_t[]){'h', 'e', 'l', 'l', 'o', ' ', 'w', 0xF6, 'r', 'l', 'd', ' '}[i % 12];
    check_chunking(t, cp, n, 0, 3, "820,000 characters");

    /* "[BOS]" whose run crosses character 25,000 is cut in two and stays text. */
    text = malloc(25010);
    memset(text, 'a', 24998);
    memcpy(text + 24998, "[BOS]", 5);
    ids = encode(t, text, 24998 + 5, KLI_TOKENIZE_SPECIAL, &m);
    for (i = 0; m > 0 && i < (size_t)m; i++)
        has_bos |= ids[i] == kli_tokenizer_find_special(t, "[BOS]");
    ok(m > 0 && !has_bos, "[BOS] straddling the 25,000 cut is not a special token");
    free(ids);
    memcpy(text + 24990, "[BOS]", 5);
    ids = encode(t, text, 24995, KLI_TOKENIZE_SPECIAL, &m);
    ok(m > 0 && ids[m - 1] == kli_tokenizer_find_special(t, "[BOS]"),
       "[BOS] before the cut is a special token");
    free(ids);
    free(text);
    free(cp);
}

/* ==== Errors and edge cases ================================================================ */

static void
test_invalid_utf8(const struct kli_tokenizer *t)
{
    static const struct {
        const char *s;
        size_t off;
    } bad[] = {
        {"abc\xff", 3}, {"\x80", 0}, {"a\xc0\x80", 1}, {"ok \xe0\x80\xaf", 3},
        {"\xed\xa0\x80", 0}, {"x\xf4\x90\x80\x80", 1}, {"\xe2\x82", 0}, {"\xf0\x9f\x98", 0},
        {"\xc3(", 0}, {"12345678\xf8\x88\x80\x80\x80", 8},
    };
    kli_token ids[32];
    size_t i;
    int good = 1;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct kli_err err = {0};
        char want[64];
        int64_t r = kli_tokenize(t, bad[i].s, strlen(bad[i].s), 0, ids, 32, &err);

        snprintf(want, sizeof(want), "offset %zu", bad[i].off);
        if (r != KLI_E_FORMAT || strstr(err.msg, want) == NULL) {
            diag("input %zu: %lld, \"%s\"", i, (long long)r, err.msg);
            good = 0;
        }
    }
    ok(good, "invalid UTF-8 is KLI_E_FORMAT with its byte offset");
    ok(kli_tokenize(t, "", 0, 0, ids, 32, NULL) == 0 &&
       kli_tokenize(t, NULL, 0, KLI_TOKENIZE_SPECIAL, NULL, 0, NULL) == 0,
       "empty text gives 0 tokens");
    ok(kli_tokenize(t, "a", 1, 4, ids, 32, NULL) == KLI_E_INVALID &&
       kli_tokenize(t, "a", 1, 0, NULL, 1, NULL) == KLI_E_INVALID,
       "unknown flags and NULL out are KLI_E_INVALID");
}

static void
test_decode(const struct kli_tokenizer *t)
{
    struct kli_err err = {0};
    kli_token bad[] = {1, 2, kli_tokenizer_n_vocab(t)};
    kli_token im[] = {kli_tokenizer_find_special(t, "<|im_end|>")};
    char buf[64];
    size_t len = 0;
    int64_t r;

    r = kli_detokenize(t, bad, 3, buf, sizeof(buf), &err);
    ok(r == KLI_E_RANGE && strstr(err.msg, "index 2") != NULL, "id n_vocab: KLI_E_RANGE (%s)",
       err.msg);
    bad[0] = -1;
    ok(kli_detokenize(t, bad, 1, buf, sizeof(buf), NULL) == KLI_E_RANGE, "id -1: KLI_E_RANGE");
    r = kli_detokenize(t, im, 1, buf, sizeof(buf), NULL);
    ok(r == 10 && memcmp(buf, "<|im_end|>", 10) == 0, "a special id decodes to its name");
    ok(kli_token_bytes(t, kli_tokenizer_n_vocab(t), &len) == NULL && len == 0 &&
       kli_token_bytes(t, -1, NULL) == NULL, "kli_token_bytes out of range is NULL");
}

static void
test_complete_prefix(void)
{
    const char *s = "a\xf0\x9f\x98\x80";     /* "a" U+1F600 */
    const char *e = "\xe2\x82\xac";           /* U+20AC */

    ok(kli_utf8_complete_prefix(s, 1) == 1 && kli_utf8_complete_prefix(s, 2) == 1 &&
       kli_utf8_complete_prefix(s, 3) == 1 && kli_utf8_complete_prefix(s, 4) == 1 &&
       kli_utf8_complete_prefix(s, 5) == 5, "split emoji held back until complete");
    ok(kli_utf8_complete_prefix(e, 1) == 0 && kli_utf8_complete_prefix(e, 2) == 0 &&
       kli_utf8_complete_prefix(e, 3) == 3 && kli_utf8_complete_prefix("", 0) == 0,
       "split 3-byte character");
    ok(kli_utf8_complete_prefix("a\xff", 2) == 2 && kli_utf8_complete_prefix("a\x80", 2) == 2 &&
       kli_utf8_complete_prefix("\xe0\x80", 2) == 2 &&
       kli_utf8_complete_prefix("\xf0\x9f\x98\x80\x80", 5) == 5,
       "bytes that can never complete are not held back");
}

/* ==== Loading ============================================================================== */

static void
b64(const unsigned char *s, size_t n, char *o)
{
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i;

    for (i = 0; i + 2 < n; i += 3) {
        *o++ = a[s[i] >> 2];
        *o++ = a[(s[i] & 3) << 4 | s[i + 1] >> 4];
        *o++ = a[(s[i + 1] & 15) << 2 | s[i + 2] >> 6];
        *o++ = a[s[i + 2] & 63];
    }
    if (n - i == 1) {
        *o++ = a[s[i] >> 2];
        *o++ = a[(s[i] & 3) << 4];
        *o++ = '=';
        *o++ = '=';
    } else if (n - i == 2) {
        *o++ = a[s[i] >> 2];
        *o++ = a[(s[i] & 3) << 4 | s[i + 1] >> 4];
        *o++ = a[(s[i + 1] & 15) << 2];
        *o++ = '=';
    }
    *o = '\0';
}

static char tmpdir[64];

static void
write_file(const char *name, const char *text)
{
    char path[128];

    snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
    if (text == NULL)
        unlink(path);
    else
        tl_spill(path, text, strlen(text));
}

/* Writes the tiktoken.model lines of the single bytes 0 .. n-1, each ranked as its value, at
 * o (16 bytes a line at most). @return the end of what was written. */
static char *
byte_ranks(char *o, int n)
{
    for (int i = 0; i < n; i++) {
        unsigned char b = (unsigned char)i;

        b64(&b, 1, o);
        o += strlen(o);
        o += sprintf(o, " %d\n", i);
    }
    return o;
}

/* 256 single-byte ranks, then `extra` verbatim. */
static void
write_model(const char *extra)
{
    char *buf = malloc(256 * 16 + strlen(extra) + 1);

    strcpy(byte_ranks(buf, 256), extra);
    write_file("tiktoken.model", buf);
    free(buf);
}

static void
expect_refused(const char *what, const char *want)
{
    struct kli_tokenizer *t = (struct kli_tokenizer *)1;
    struct kli_err err = {0};
    int rc = kli_tokenizer_open(&t, tmpdir, &err);

    ok(rc == KLI_E_FORMAT && t == NULL && strstr(err.msg, want) != NULL, "%s: refused (%s)",
       what, err.msg);
}

/* Closes *t, writes `config` as tokenizer_config.json and opens tmpdir's tokenizer into *t. */
static int
reopen_with_config(struct kli_tokenizer **t, const char *config, struct kli_err *err)
{
    kli_tokenizer_close(*t);
    *t = NULL;
    write_file("tokenizer_config.json", config);
    memset(err, 0, sizeof(*err));
    return kli_tokenizer_open(t, tmpdir, err);
}

static void
test_loading(void)
{
    struct kli_tokenizer *t = NULL;
    struct kli_err err = {0};
    char long_line[6000];
    int rc;

    snprintf(tmpdir, sizeof(tmpdir), "/tmp/kli-test-tok-XXXXXX");
    if (mkdtemp(tmpdir) == NULL) {
        ok(0, "mkdtemp");
        return;
    }
    write_model("YWI= 256\n");
    rc = kli_tokenizer_open(&t, tmpdir, &err);
    ok(rc == KLI_OK && kli_tokenizer_n_base(t) == 257 && kli_tokenizer_n_vocab(t) == 513 &&
       kli_tokenizer_find_special(t, "<|reserved_token_257|>") == 257 &&
       kli_tokenizer_find_special(t, "<|reserved_token_512|>") == 512,
       "no tokenizer_config.json: 256 unnamed slots (%s)", err.msg);
    if (t != NULL) {
        kli_token ids[8];
        int64_t n = kli_tokenize(t, "xab<|reserved_token_300|>", 25, KLI_TOKENIZE_SPECIAL, ids,
                                 8, NULL);

        ok(n == 3 && ids[1] == 256 && ids[2] == 300, "merges and reserved names work");
    }

    rc = reopen_with_config(&t, "{\"added_tokens_decoder\": {\"257\": {\"content\": \"[BOS]\"},"
                            " \"514\": {\"content\": \"<|extra|>\"}}}", &err);
    ok(rc == KLI_OK && kli_tokenizer_n_vocab(t) == 257 + 258 &&
       kli_tokenizer_find_special(t, "<|extra|>") == 514 &&
       kli_tokenizer_find_special(t, "<|reserved_token_513|>") == 513 &&
       kli_tokenizer_find_special(t, "[BOS]") == 257,
       "a name at n_base+257 gives 258 slots (%s)", err.msg);

    rc = reopen_with_config(&t, "{\"added_tokens_decoder\": {\"257\": {\"content\": \"@\"},"
                            " \"258\": {\"content\": \"[X]\"}, \"259\": {\"content\": \"[X]Y\"}}}",
                            &err);
    ok(rc == KLI_OK, "one-byte and nested special names load (%s)", err.msg);
    if (t != NULL) {
        kli_token ids[16];
        int64_t n = kli_tokenize(t, "a@[X]Y[X]@", 10, KLI_TOKENIZE_SPECIAL, ids, 16, NULL);

        ok(n == 5 && ids[1] == 257 && ids[2] == 259 && ids[3] == 258 && ids[4] == 257,
           "a one-byte special at the end; the longer of two names at one place wins");
    }
    kli_tokenizer_close(t);
    t = NULL;

    write_file("tokenizer_config.json",
               "{\"added_tokens_decoder\": {\"600\": {\"content\": \"x\"}}}");
    expect_refused("added token id beyond the slots", "outside the special slots");
    write_file("tokenizer_config.json",
               "{\"added_tokens_decoder\": {\"257\": {\"content\": \"<|reserved_token_258|>\"}}}");
    expect_refused("a name used twice", "names both");
    write_file("tokenizer_config.json", "{\"added_tokens_decoder\": [");
    expect_refused("broken JSON", "not a JSON object");
    write_file("tokenizer_config.json", NULL);

    write_model("Y@I= 256\n");
    expect_refused("bad base64", "line 257: invalid base64");
    write_model("YWI= 257\n");
    expect_refused("a gap in the ranks", "line 257: rank 257 out of range");
    write_model("YWI= 5\n");
    expect_refused("a repeated rank", "line 257: rank 5 repeated (first on line 6)");
    write_model("YQ== 256\n");
    expect_refused("repeated bytes", "line 257: the bytes of rank 256 repeat");
    write_model("YWI=\n");
    expect_refused("a missing rank", "line 257: expected");
    write_model("YWI= 256 7\n");
    expect_refused("extra field", "line 257: extra text");
    memset(long_line, 'Q', sizeof(long_line));
    memcpy(long_line + sizeof(long_line) - 8, " 256\n", 6);
    write_model(long_line);
    expect_refused("an overlong line", "line 257: longer than");
    write_file("tiktoken.model", "YQ== 0\nYg== 1\n");
    expect_refused("too few ranks", "has 2 ranks");
    {
        /* 256 ranks, but byte 0xFF replaced by a two-byte token. */
        char *buf = malloc(256 * 16);

        strcpy(byte_ranks(buf, 255), "YWI= 255\n");
        write_file("tiktoken.model", buf);
        free(buf);
        expect_refused("a byte without a rank", "byte 0xff has no rank");
    }
    write_file("tiktoken.model", NULL);
    memset(&err, 0, sizeof(err));
    ok(kli_tokenizer_open(&t, tmpdir, &err) == KLI_E_IO && t == NULL, "no tiktoken.model: %s",
       err.msg);
    rmdir(tmpdir);
}

/*
 * A vocabulary in which every pair of bytes is a token (ranks in a scrambled order), so that
 * the ids show where the split cut: moving a boundary by one byte changes the pairs. The
 * fixture's small vocabulary would often give the same ids for different splits.
 */
static void
test_fast_path_pairs(void)
{
    struct kli_tokenizer *t = NULL;
    struct kli_err err = {0};
    char *buf = malloc((256 + 65536) * 16), *o;
    int rank = 256;

    snprintf(tmpdir, sizeof(tmpdir), "/tmp/kli-test-tok-XXXXXX");
    if (buf == NULL || mkdtemp(tmpdir) == NULL) {
        ok(0, "mkdtemp");
        free(buf);
        return;
    }
    o = byte_ranks(buf, 256);   /* ranks 0..255, the pairs after them */
    for (uint32_t i = 0; i < 65536; i++) {
        uint32_t x = (i * 40503u + 12345u) & 0xFFFF;     /* a permutation of 0..65535 */
        unsigned char pair[2] = {(unsigned char)(x >> 8), (unsigned char)x};

        b64(pair, 2, o);
        o += strlen(o);
        o += sprintf(o, " %d\n", rank++);
    }
    write_file("tiktoken.model", buf);
    free(buf);
    ok(kli_tokenizer_open(&t, tmpdir, &err) == KLI_OK && kli_tokenizer_n_base(t) == 65792,
       "all-pairs vocabulary loads (%s)", err.msg);
    if (t != NULL)
        test_fast_path(t, "all-pairs vocabulary");
    kli_tokenizer_close(t);
    write_file("tiktoken.model", NULL);
    rmdir(tmpdir);
}

static void
test_tiny(void)
{
    char dir[1024];
    struct kli_tokenizer *t = NULL;
    struct kli_err err = {0};
    int rc;

    snprintf(dir, sizeof(dir), "%s/tiny-kimi-linear", testdata);
    rc = kli_tokenizer_open(&t, dir, &err);
    ok(rc == KLI_OK, "tiny-kimi-linear tokenizer loads (%s)", err.msg);
    if (rc != KLI_OK)
        return;
    ok(kli_tokenizer_n_base(t) == 256 && kli_tokenizer_n_vocab(t) == 512 &&
       kli_tokenizer_find_special(t, "<|im_end|>") == 258 &&
       kli_tokenizer_find_special(t, "[PAD]") == 511 &&
       kli_tokenizer_find_special(t, "[BOS]") == 256, "tiny: 256 + 256, <|im_end|> 258, [PAD] 511");
    {
        const char *s = "hi <|im_end|>";
        kli_token ids[16];
        int64_t n = kli_tokenize(t, s, strlen(s), KLI_TOKENIZE_SPECIAL, ids, 16, NULL);

        ok(n == 4 && ids[3] == 258 && decodes_to(t, ids, n, s, strlen(s)),
           "tiny: bytes + <|im_end|>");
    }
    kli_tokenizer_close(t);
}

/* ==== Threads ============================================================================== */

struct thread_arg {
    const struct kli_tokenizer *t;
    const char *text;
    size_t len;
    kli_token *ids;
    int64_t n;
};

static void *
thread_main(void *p)
{
    struct thread_arg *a = p;

    for (int r = 0; r < 20; r++)
        a->n = kli_tokenize(a->t, a->text, a->len, KLI_TOKENIZE_SPECIAL, a->ids,
                            (int64_t)a->len + 1, NULL);
    return NULL;
}

static void
test_threads(const struct kli_tokenizer *t, const char *corpus, size_t len)
{
    struct thread_arg a[4];
    pthread_t th[4];
    int64_t n;
    kli_token *want = encode(t, corpus, len, KLI_TOKENIZE_SPECIAL, &n);
    int good = 1;

    for (int i = 0; i < 4; i++) {
        a[i] = (struct thread_arg){t, corpus, len, malloc((len + 1) * sizeof(kli_token)), -1};
        if (pthread_create(&th[i], NULL, thread_main, &a[i]) != 0)
            good = 0, a[i].n = n, memcpy(a[i].ids, want, (size_t)n * sizeof(*want));
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        good &= a[i].n == n && memcmp(a[i].ids, want, (size_t)n * sizeof(*want)) == 0;
        free(a[i].ids);
    }
    ok(good, "4 threads share one tokenizer");
    free(want);
}

int
main(int argc, char **argv)
{
    char path[1024];
    struct kli_tokenizer *t = NULL;
    struct kli_err err = {0};
    char *json, *corpus;
    size_t len, clen;
    cJSON *golden;

    (void)plan;     /* tap.h: the plan is printed at the end instead */
    tap_init(argc, argv);
    testdata = tl_data();
    snprintf(path, sizeof(path), "%s/tokenizer/golden.json", testdata);
    json = tl_slurp(path, &len);
    snprintf(path, sizeof(path), "%s/tokenizer/corpus.txt", testdata);
    corpus = tl_slurp(path, &clen);
    golden = json != NULL ? cJSON_ParseWithLength(json, len) : NULL;
    if (golden == NULL || corpus == NULL) {
        printf("Bail out! cannot read %s/tokenizer\n", testdata);
        return 1;
    }
    snprintf(path, sizeof(path), "%s/tokenizer", testdata);
    if (!ok(kli_tokenizer_open(&t, path, &err) == KLI_OK, "open %s (%s)", path, err.msg)) {
        printf("Bail out! no tokenizer\n");
        return 1;
    }
    if (tap_case("golden"))
        test_golden(t, golden);
    if (tap_case("short_buffer"))
        test_short_buffer(t);
    if (tap_case("fast_path"))
        test_fast_path(t, "fixture");
    if (tap_case("chunking"))
        test_chunking(t);
    if (tap_case("invalid_utf8"))
        test_invalid_utf8(t);
    if (tap_case("decode"))
        test_decode(t);
    if (tap_case("complete_prefix"))
        test_complete_prefix();
    if (tap_case("threads"))
        test_threads(t, corpus, clen);
    kli_tokenizer_close(t);
    kli_tokenizer_close(NULL);
    if (tap_case("loading"))
        test_loading();
    if (tap_case("fast_path_pairs"))
        test_fast_path_pairs();
    if (tap_case("tiny"))
        test_tiny();
    cJSON_Delete(golden);
    free(json);
    free(corpus);
    plan_done();
    return tap_exit();
}
