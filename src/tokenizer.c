/*
 * tokenizer.c - Kimi's tiktoken BPE: tiktoken.model + tokenizer_config.json in, token ids out.
 *
 * The reference is tokenization_kimi.py's TikTokenTokenizer.encode() on top of tiktoken's Rust
 * core (doc/formats.md section 1). Encoding goes through four stages, each one reproduced
 * exactly because any difference changes ids:
 *
 *   1. Chunking (tokenization_kimi.py): 400,000-character pieces, each cut wherever a run of
 *      same-class characters (Python isspace) would exceed 25,000. Chunks never interact.
 *   2. Special tokens (tiktoken, allowed_special="all"): the leftmost occurrence of any special
 *      string is emitted as its id; the text before it is ordinary text.
 *   3. Pre-tokenization: the Kimi split pattern, matched repeatedly left to right: by PCRE2,
 *      or for pieces made of ASCII alone by a hand-written matcher (tok_split_ascii) that
 *      tests check against PCRE2.
 *   4. Byte-pair merging per piece (tiktoken's _byte_pair_merge): a piece that is a token is
 *      emitted whole; otherwise start from single bytes and keep merging the adjacent pair
 *      whose concatenated bytes have the lowest rank, leftmost first, until no pair has one.
 *
 * A tokenizer is read-only after open, so every per-call resource (PCRE2 match data, JIT
 * stack, merge scratch) lives in a struct tok_enc on the caller's stack.
 */
#include "config.h"

#define PCRE2_CODE_UNIT_WIDTH 8

#include <cjson/cJSON.h>
#include <errno.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "internal.h"
#include "tokenizer.h"
#include "unicode.h"
#include "weights.h"

enum {
    TOK_SLOTS = 256,               /* special slots after the ranks (Kimi K2 / Kimi Linear) */
    TOK_SLOTS_OLD = 258,           /* older tokenization_*.py: num_reserved_special_tokens + 2 */
    TOK_MAX_LINE = 4096,           /* longest tiktoken.model line accepted */
    TOK_MAX_RANKS = 1 << 26,
    TOK_MAX_SPECIAL = 1024,        /* longest special-token name accepted, in bytes */
    TOK_MAX_FILE = 256 << 20,      /* largest tiktoken.model or tokenizer_config.json read */
    TOK_CHUNK_CHARS = 400000,      /* tokenization_kimi.py TIKTOKEN_MAX_ENCODE_CHARS */
    TOK_RUN_CHARS = 25000,         /* tokenization_kimi.py MAX_NO_WHITESPACES_CHARS */
};

/* Pieces up to this many bytes are merged by tiktoken's quadratic scan, longer ones through
 * a heap; both give the same ids (overridable at build time to test the heap path). */
#ifndef TOK_BPE_LINEAR_MAX
#define TOK_BPE_LINEAR_MAX 128
#endif

#define TOK_NO_RANK UINT32_MAX

/* What the split pattern sees in an ASCII byte (the fast path of tok_split_ascii). */
enum tok_class {
    TOK_C_END = 0,                 /* the end of the subject */
    TOK_C_UPPER,                   /* A-Z: \p{Lu} */
    TOK_C_LOWER,                   /* a-z: \p{Ll} */
    TOK_C_DIGIT,                   /* 0-9: \p{N} */
    TOK_C_NEWLINE,                 /* \r \n */
    TOK_C_SPACE,                   /* ' ' */
    TOK_C_BLANK,                   /* \t \v \f: the rest of ASCII White_Space */
    TOK_C_OTHER,                   /* anything else below 0x80 */
    TOK_C_NONASCII                 /* a byte of a multi-byte character: ask PCRE2 */
};

/* Open-addressing map from a byte string to a token id, the strings living in the token
 * pool. A slot is 0 when empty, else (hash >> 32) << 32 | (id + 1): the upper half filters
 * out most mismatches before the bytes are compared. */
struct tok_map {
    uint64_t *slot;                /* [mask + 1] */
    size_t mask;
};

struct kli_tokenizer {
    int32_t n_base;                /* ranks in tiktoken.model; the first special id */
    int32_t n_vocab;               /* n_base + special slots */
    uint32_t *tok_off;             /* [n_vocab]: bytes of token i at pool + tok_off[i] */
    uint32_t *tok_len;             /* [n_vocab] (each token is followed by a NUL in the pool) */
    char *pool;
    size_t pool_len, pool_cap;
    struct tok_map ranks;          /* ids 0 .. n_base-1 */
    struct tok_map specials;       /* ids n_base .. n_vocab-1 */
    uint32_t max_rank_len;         /* longest ranked byte string: longer ones need no lookup */
    kli_token byte_id[256];        /* the rank of each single byte */
    uint32_t *pair_rank;           /* [65536]: rank of the two bytes (b0 << 8 | b1), or none */
    unsigned char special_one[256];    /* bytes that are a whole special name */
    uint8_t special_start[65536 / 8];  /* bit (b0 << 8 | b1): some special name starts so */
    uint32_t special_lens[TOK_SLOTS_OLD];  /* distinct special name lengths, longest first */
    int n_special_lens;
    unsigned char aclass[256];     /* enum tok_class of each byte, for the ASCII fast path */
    pcre2_code *re;
    int jit;                       /* re is JIT-compiled */
};

/* Kimi's split pattern (doc/formats.md 1.4), rewritten for PCRE2 with the same meaning:
 *  - [X&&[^\p{Han}]] (class intersection, which PCRE2 lacks) becomes (?:(?!Han)[X]);
 *  - \p{Han} is the Script property (Rust regex), spelled sc:Han because PCRE2 >= 10.40
 *    reads a bare script name as Script_Extensions, which would take in "。" and "、";
 *  - \s is spelled out as Unicode White_Space (Rust regex), because PCRE2's \s also matches
 *    U+180E.
 * Alternation is leftmost-first and quantifiers greedy with backtracking in both engines. */
#if PCRE2_MAJOR > 10 || (PCRE2_MAJOR == 10 && PCRE2_MINOR >= 40)
#define TOK_HAN "\\p{sc:Han}"
#else
#define TOK_HAN "\\p{Han}"
#endif
#define TOK_WS "\\t\\n\\x0B\\f\\r\\x20\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}" \
               "\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
#define TOK_UPPER "(?:(?!" TOK_HAN ")[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}])"
#define TOK_LOWER "(?:(?!" TOK_HAN ")[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}])"
#define TOK_CONTRACTION "(?i:'s|'t|'re|'ve|'m|'ll|'d)?"

static const char tok_pattern[] =
    "[" TOK_HAN "]+"
    "|[^\\r\\n\\p{L}\\p{N}]?" TOK_UPPER "*" TOK_LOWER "+" TOK_CONTRACTION
    "|[^\\r\\n\\p{L}\\p{N}]?" TOK_UPPER "+" TOK_LOWER "*" TOK_CONTRACTION
    "|\\p{N}{1,3}"
    "| ?[^" TOK_WS "\\p{L}\\p{N}]+[\\r\\n]*"
    "|[" TOK_WS "]*[\\r\\n]+"
    "|[" TOK_WS "]+(?![^" TOK_WS "])"
    "|[" TOK_WS "]+";

/* ==== Byte-string map ======================================================================= */

static inline uint64_t
tok_load64(const unsigned char *p)
{
    uint64_t w;

    memcpy(&w, p, 8);
    return w;
}

static inline uint32_t
tok_load32(const unsigned char *p)
{
    uint32_t w;

    memcpy(&w, p, 4);
    return w;
}

/* A fast hash of short byte strings: the overlapping loads cover every byte once the length
 * is mixed in, so equal-length strings that differ anywhere feed different words. */
static inline uint64_t
tok_hash(const unsigned char *s, size_t n)
{
    const unsigned char *end = s + n;
    uint64_t h = (n + 1) * UINT64_C(0x9E3779B97F4A7C15);
    uint64_t w;

    if (n >= 8) {
        while (end - s > 8) {
            h = (h ^ tok_load64(s)) * UINT64_C(0xBF58476D1CE4E5B9);
            h ^= h >> 29;
            s += 8;
        }
        w = tok_load64(end - 8);
    } else if (n >= 4) {
        w = tok_load32(s) | (uint64_t)tok_load32(end - 4) << 32;
    } else if (n > 0) {
        w = s[0] | (uint64_t)s[n >> 1] << 8 | (uint64_t)end[-1] << 16;
    } else {
        w = 0;
    }
    h = (h ^ w) * UINT64_C(0x94D049BB133111EB);
    h ^= h >> 31;
    h *= UINT64_C(0xD6E8FEB86659FD93);
    h ^= h >> 32;
    return h;
}

/* memcmp(a, b, n) == 0, inlined for the short strings that BPE looks up. */
static inline int
tok_equal(const unsigned char *a, const unsigned char *b, size_t n)
{
    if (n >= 4 && n <= 8)
        return tok_load32(a) == tok_load32(b) && tok_load32(a + n - 4) == tok_load32(b + n - 4);
    if (n < 4) {
        for (size_t i = 0; i < n; i++) {
            if (a[i] != b[i])
                return 0;
        }
        return 1;
    }
    return memcmp(a, b, n) == 0;
}

static int
tok_map_init(struct tok_map *m, size_t count)
{
    size_t cap = 16;

    while (cap < count + count / 2 + 1)
        cap *= 2;
    m->slot = kli_calloc(cap, sizeof(*m->slot));
    if (m->slot == NULL)
        return KLI_E_NOMEM;
    m->mask = cap - 1;
    return KLI_OK;
}

/* @return the id whose bytes are s[0..n), or -1. */
static inline kli_token
tok_map_find(const struct kli_tokenizer *t, const struct tok_map *m, const unsigned char *s,
             size_t n)
{
    uint64_t h = tok_hash(s, n);
    uint32_t tag = (uint32_t)(h >> 32);
    size_t i = (size_t)h & m->mask;

    for (;;) {
        uint64_t e = m->slot[i];

        if (e == 0)
            return -1;
        if ((uint32_t)(e >> 32) == tag) {
            kli_token id = (kli_token)((uint32_t)e - 1);

            if (t->tok_len[id] == n &&
                tok_equal((const unsigned char *)t->pool + t->tok_off[id], s, n))
                return id;
        }
        i = (i + 1) & m->mask;
    }
}

/* Adds token `id` (its bytes already in the pool).
 * @return -1 on success, or the id that already has the same bytes. */
static kli_token
tok_map_insert(const struct kli_tokenizer *t, struct tok_map *m, kli_token id)
{
    const unsigned char *s = (const unsigned char *)t->pool + t->tok_off[id];
    size_t n = t->tok_len[id];
    kli_token old = tok_map_find(t, m, s, n);
    uint64_t h;
    size_t i;

    if (old >= 0)
        return old;
    h = tok_hash(s, n);
    i = (size_t)h & m->mask;
    while (m->slot[i] != 0)
        i = (i + 1) & m->mask;
    m->slot[i] = (h >> 32) << 32 | (uint32_t)(id + 1);
    return -1;
}

/* ==== Loading =============================================================================== */

/* Reads tiktoken.model or tokenizer_config.json whole (a regular file of at most
 * TOK_MAX_FILE bytes: src/file.c) into a NUL-terminated buffer.
 * @return KLI_OK, 1 if the file does not exist and `optional` is set, or an error. */
static int
tok_read_file(const char *path, int optional, char **buf, size_t *len, struct kli_err *err)
{
    struct stat st;

    *buf = NULL;
    *len = 0;
    if (optional && stat(path, &st) != 0 && errno == ENOENT)
        return 1;
    return kli_file_read(path, TOK_MAX_FILE, buf, len, err);
}

static int
tok_b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Decodes standard padded base64 (what tiktoken writes).
 * @return the decoded length, or -1 if s[0..n) is not valid base64. */
static long
tok_b64_decode(const char *s, size_t n, unsigned char *out)
{
    size_t i, pad = 0, o = 0;

    if (n == 0 || n % 4 != 0)
        return -1;
    if (s[n - 1] == '=')
        pad = s[n - 2] == '=' ? 2 : 1;
    for (i = 0; i < n; i += 4) {
        int v[4];

        for (int k = 0; k < 4; k++) {
            if (i + k >= n - pad)
                v[k] = 0;
            else if ((v[k] = tok_b64_value((unsigned char)s[i + k])) < 0)
                return -1;
        }
        uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 |
                     (uint32_t)v[3];
        out[o++] = (unsigned char)(w >> 16);
        out[o++] = (unsigned char)(w >> 8);
        out[o++] = (unsigned char)w;
    }
    return (long)(o - pad);
}

/* Appends a token's bytes and a NUL to the pool. */
static int
tok_pool_add(struct kli_tokenizer *t, kli_token id, const void *s, size_t n)
{
    if (t->pool_cap - t->pool_len < n + 1) {
        size_t cap = t->pool_cap * 2 + n + 1;
        char *p;

        if (cap > UINT32_MAX)
            return KLI_E_RANGE;
        p = realloc(t->pool, cap);
        if (p == NULL)
            return KLI_E_NOMEM;
        t->pool = p;
        t->pool_cap = cap;
    }
    memcpy(t->pool + t->pool_len, s, n);
    t->pool[t->pool_len + n] = '\0';
    t->tok_off[id] = (uint32_t)t->pool_len;
    t->tok_len[id] = (uint32_t)n;
    t->pool_len += n + 1;
    return KLI_OK;
}

static int
tok_is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}

/* One "<base64> <rank>" line, without its '\n'. */
static int
tok_parse_rank_line(struct kli_tokenizer *t, const char *path, long lineno, const char *s,
                    size_t n, uint32_t *rank_line, unsigned char *dec, struct kli_err *err)
{
    size_t i = 0, b64, b64_len, d;
    uint64_t rank = 0;
    long len;
    kli_token old;
    int rc;

    while (i < n && tok_is_blank(s[i]))
        i++;
    b64 = i;
    while (i < n && !tok_is_blank(s[i]))
        i++;
    b64_len = i - b64;
    while (i < n && tok_is_blank(s[i]))
        i++;
    d = i;
    while (i < n && s[i] >= '0' && s[i] <= '9' && i - d < 10) {
        rank = rank * 10 + (uint64_t)(s[i] - '0');
        i++;
    }
    if (i == d || (i < n && !tok_is_blank(s[i])))
        return kli_err_set(err, KLI_E_FORMAT,
                           "tokenizer: %s line %ld: expected \"<base64> <rank>\"", path, lineno);
    while (i < n && tok_is_blank(s[i]))
        i++;
    if (i != n)
        return kli_err_set(err, KLI_E_FORMAT,
                           "tokenizer: %s line %ld: extra text after the rank", path, lineno);
    len = tok_b64_decode(s + b64, b64_len, dec);
    if (len <= 0)
        return kli_err_set(err, KLI_E_FORMAT, "tokenizer: %s line %ld: invalid base64 \"%.*s\"",
                           path, lineno, (int)(b64_len > 40 ? 40 : b64_len), s + b64);
    if (rank >= (uint64_t)t->n_base)
        return kli_err_set(err, KLI_E_FORMAT,
                           "tokenizer: %s line %ld: rank %llu out of range: %d entries need "
                           "ranks 0..%d with no gaps", path, lineno, (unsigned long long)rank,
                           t->n_base, t->n_base - 1);
    if (rank_line[rank] != 0)
        return kli_err_set(err, KLI_E_FORMAT,
                           "tokenizer: %s line %ld: rank %llu repeated (first on line %lu)",
                           path, lineno, (unsigned long long)rank,
                           (unsigned long)rank_line[rank]);
    rank_line[rank] = (uint32_t)lineno;
    rc = tok_pool_add(t, (kli_token)rank, dec, (size_t)len);
    if (rc != KLI_OK)
        return kli_err_set(err, rc, "tokenizer: %s: out of memory", path);
    old = tok_map_insert(t, &t->ranks, (kli_token)rank);
    if (old >= 0)
        return kli_err_set(err, KLI_E_FORMAT,
                           "tokenizer: %s line %ld: the bytes of rank %llu repeat those of "
                           "rank %d (line %lu)", path, lineno, (unsigned long long)rank, old,
                           (unsigned long)rank_line[old]);
    if ((uint32_t)len > t->max_rank_len)
        t->max_rank_len = (uint32_t)len;
    return KLI_OK;
}

/* tiktoken.model text (`len` bytes, NUL-terminated); `path` names it in messages. */
static int
tok_parse_ranks(struct kli_tokenizer *t, const char *path, const char *buf, size_t len,
                struct kli_err *err)
{
    size_t i, n_lines = 0;
    uint32_t *rank_line = NULL;
    unsigned char dec[TOK_MAX_LINE];
    long lineno;
    int rc;

    if (len > UINT32_MAX / 2) {
        rc = kli_err_set(err, KLI_E_FORMAT, "tokenizer: %s is larger than 2 GiB", path);
        goto out;
    }
    /* Pass 1: count entries (tiktoken skips empty lines) and bound line lengths. */
    lineno = 0;
    for (i = 0; i < len;) {
        const char *nl = memchr(buf + i, '\n', len - i);
        size_t e = nl != NULL ? (size_t)(nl - buf) : len;
        size_t ll = e - i;

        lineno++;
        if (ll > 0 && buf[e - 1] == '\r')
            ll--;
        if (ll > TOK_MAX_LINE) {
            rc = kli_err_set(err, KLI_E_FORMAT, "tokenizer: %s line %ld: longer than %d bytes",
                             path, lineno, TOK_MAX_LINE);
            goto out;
        }
        if (ll > 0)
            n_lines++;
        i = e + 1;
    }
    if (n_lines < 256 || n_lines > TOK_MAX_RANKS) {
        rc = kli_err_set(err, KLI_E_FORMAT, "tokenizer: %s has %zu ranks; expected 256..%d",
                         path, n_lines, TOK_MAX_RANKS);
        goto out;
    }
    t->n_base = (int32_t)n_lines;
    t->n_vocab = t->n_base;     /* the specials come later */
    t->tok_off = kli_calloc((size_t)t->n_base + TOK_SLOTS_OLD, sizeof(*t->tok_off));
    t->tok_len = kli_calloc((size_t)t->n_base + TOK_SLOTS_OLD, sizeof(*t->tok_len));
    rank_line = kli_calloc((size_t)t->n_base, sizeof(*rank_line));
    t->pool_cap = len + 1 + TOK_SLOTS_OLD * 32;
    t->pool = kli_malloc(t->pool_cap);
    if (t->tok_off == NULL || t->tok_len == NULL || rank_line == NULL || t->pool == NULL ||
        tok_map_init(&t->ranks, (size_t)t->n_base) != KLI_OK) {
        rc = kli_err_set(err, KLI_E_NOMEM, "tokenizer: out of memory loading %s", path);
        goto out;
    }
    /* Pass 2: decode. */
    lineno = 0;
    for (i = 0; i < len;) {
        const char *nl = memchr(buf + i, '\n', len - i);
        size_t e = nl != NULL ? (size_t)(nl - buf) : len;
        size_t ll = e - i;

        lineno++;
        if (ll > 0 && buf[e - 1] == '\r')
            ll--;
        if (ll > 0) {
            rc = tok_parse_rank_line(t, path, lineno, buf + i, ll, rank_line, dec, err);
            if (rc != KLI_OK)
                goto out;
        }
        i = e + 1;
    }
    t->pair_rank = kli_mallocarray(65536, sizeof(*t->pair_rank));
    if (t->pair_rank == NULL) {
        rc = kli_err_set(err, KLI_E_NOMEM, "tokenizer: out of memory loading %s", path);
        goto out;
    }
    for (i = 0; i < 65536; i++)
        t->pair_rank[i] = TOK_NO_RANK;
    for (i = 0; i < (size_t)t->n_base; i++) {
        if (t->tok_len[i] == 2) {
            const unsigned char *b = (const unsigned char *)t->pool + t->tok_off[i];

            t->pair_rank[b[0] << 8 | b[1]] = (uint32_t)i;
        }
    }
    for (i = 0; i < 256; i++) {
        unsigned char b = (unsigned char)i;

        t->byte_id[i] = tok_map_find(t, &t->ranks, &b, 1);
        if (t->byte_id[i] < 0) {
            rc = kli_err_set(err, KLI_E_FORMAT,
                             "tokenizer: %s: byte 0x%02zx has no rank (every single byte "
                             "needs one)", path, i);
            goto out;
        }
    }
    rc = KLI_OK;
out:
    free(rank_line);
    return rc;
}

static int
tok_load_ranks(struct kli_tokenizer *t, const char *path, struct kli_err *err)
{
    char *buf = NULL;
    size_t len;
    int rc;

    rc = tok_read_file(path, 0, &buf, &len, err);
    if (rc != KLI_OK)
        return rc;
    rc = tok_parse_ranks(t, path, buf, len, err);
    free(buf);
    return rc;
}

/* Reads the names of tokenizer_config.json's added_tokens_decoder into names[0..258)
 * (slot k = id n_base + k; NULL = unnamed) and sets *n_slots. The strings are copied.
 * A missing file names nothing. */
static int
tok_parse_config(struct kli_tokenizer *t, const char *path, const char *buf, size_t len,
                 char **names, int *n_slots, struct kli_err *err)
{
    cJSON *root = NULL;
    const cJSON *dec, *item;
    int rc;

    *n_slots = TOK_SLOTS;
    if (buf == NULL)
        return KLI_OK;
    root = cJSON_ParseWithLength(buf, len);
    if (root == NULL || !cJSON_IsObject(root)) {
        rc = kli_err_set(err, KLI_E_FORMAT, "tokenizer: %s is not a JSON object", path);
        goto out;
    }
    dec = cJSON_GetObjectItemCaseSensitive(root, "added_tokens_decoder");
    if (dec == NULL || cJSON_IsNull(dec)) {
        rc = KLI_OK;
        goto out;
    }
    if (!cJSON_IsObject(dec)) {
        rc = kli_err_set(err, KLI_E_FORMAT,
                         "tokenizer: %s: \"added_tokens_decoder\" is not an object", path);
        goto out;
    }
    cJSON_ArrayForEach(item, dec) {
        const char *key = item->string;
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(item, "content");
        char *end = NULL;
        long id;
        size_t nlen;

        errno = 0;
        id = key != NULL && key[0] >= '0' && key[0] <= '9' ? strtol(key, &end, 10) : -1;
        if (id < 0 || errno != 0 || *end != '\0') {
            rc = kli_err_set(err, KLI_E_FORMAT,
                             "tokenizer: %s: added_tokens_decoder key \"%s\" is not a token id",
                             path, key != NULL ? key : "");
            goto out;
        }
        if (id < t->n_base || id >= (long)t->n_base + TOK_SLOTS_OLD) {
            rc = kli_err_set(err, KLI_E_FORMAT,
                             "tokenizer: %s: added token id %ld is outside the special slots "
                             "%d..%d", path, id, t->n_base, t->n_base + TOK_SLOTS_OLD - 1);
            goto out;
        }
        if (!cJSON_IsString(content) || content->valuestring == NULL ||
            content->valuestring[0] == '\0') {
            rc = kli_err_set(err, KLI_E_FORMAT,
                             "tokenizer: %s: added token %ld has no \"content\" string", path,
                             id);
            goto out;
        }
        nlen = strlen(content->valuestring);
        if (nlen > TOK_MAX_SPECIAL ||
            unicode_valid_prefix(content->valuestring, nlen) != nlen) {
            rc = kli_err_set(err, KLI_E_FORMAT,
                             "tokenizer: %s: added token %ld is longer than %d bytes or not "
                             "UTF-8", path, id, TOK_MAX_SPECIAL);
            goto out;
        }
        if (names[id - t->n_base] != NULL) {
            rc = kli_err_set(err, KLI_E_FORMAT, "tokenizer: %s: added token %ld named twice",
                             path, id);
            goto out;
        }
        names[id - t->n_base] = kli_strdup(content->valuestring);
        if (names[id - t->n_base] == NULL) {
            rc = kli_err_set(err, KLI_E_NOMEM, "tokenizer: out of memory reading %s", path);
            goto out;
        }
        if (id - t->n_base >= TOK_SLOTS)
            *n_slots = TOK_SLOTS_OLD;
    }
    rc = KLI_OK;
out:
    cJSON_Delete(root);
    return rc;
}

static int
tok_load_config(struct kli_tokenizer *t, const char *path, char **names, int *n_slots,
                struct kli_err *err)
{
    char *buf = NULL;
    size_t len;
    int rc;

    *n_slots = TOK_SLOTS;
    rc = tok_read_file(path, 1, &buf, &len, err);
    if (rc == 1)
        return KLI_OK;
    if (rc != KLI_OK)
        return rc;
    rc = tok_parse_config(t, path, buf, len, names, n_slots, err);
    free(buf);
    return rc;
}

static int
tok_cmp_len_desc(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

    return x < y ? 1 : x > y ? -1 : 0;
}

/* Gives every special slot its name (or "<|reserved_token_ID|>") and indexes the names. */
static int
tok_add_specials(struct kli_tokenizer *t, char **names, int n_slots, struct kli_err *err)
{
    uint32_t lens[TOK_SLOTS_OLD];
    int k, rc;

    if (tok_map_init(&t->specials, (size_t)n_slots) != KLI_OK)
        return kli_err_set(err, KLI_E_NOMEM, "tokenizer: out of memory");
    for (k = 0; k < n_slots; k++) {
        kli_token id = t->n_base + k, old;
        char tmp[64];
        const char *name = names[k];

        if (name == NULL) {
            snprintf(tmp, sizeof(tmp), "<|reserved_token_%d|>", (int)id);
            name = tmp;
        }
        rc = tok_pool_add(t, id, name, strlen(name));
        if (rc != KLI_OK)
            return kli_err_set(err, rc, "tokenizer: out of memory");
        old = tok_map_insert(t, &t->specials, id);
        if (old >= 0)
            return kli_err_set(err, KLI_E_FORMAT,
                               "tokenizer: special token \"%s\" names both id %d and id %d",
                               name, (int)old, (int)id);
        if (t->tok_len[id] == 1) {
            t->special_one[(unsigned char)name[0]] = 1;
        } else {
            unsigned pair = (unsigned char)name[0] << 8 | (unsigned char)name[1];

            t->special_start[pair >> 3] |= (uint8_t)(1u << (pair & 7));
        }
        lens[k] = t->tok_len[id];
    }
    t->n_vocab = t->n_base + n_slots;
    qsort(lens, (size_t)n_slots, sizeof(lens[0]), tok_cmp_len_desc);
    t->n_special_lens = 0;
    for (k = 0; k < n_slots; k++) {
        if (k == 0 || lens[k] != lens[k - 1])
            t->special_lens[t->n_special_lens++] = lens[k];
    }
    return KLI_OK;
}

static unsigned char
tok_ascii_class(int c)
{
    if (c >= 0x80)
        return TOK_C_NONASCII;
    if ((c >= 'a' && c <= 'z'))
        return TOK_C_LOWER;
    if ((c >= 'A' && c <= 'Z'))
        return TOK_C_UPPER;
    if (c >= '0' && c <= '9')
        return TOK_C_DIGIT;
    if (c == '\r' || c == '\n')
        return TOK_C_NEWLINE;
    if (c == ' ')
        return TOK_C_SPACE;
    if (c == '\t' || c == '\v' || c == '\f')
        return TOK_C_BLANK;
    return TOK_C_OTHER;       /* punctuation, symbols, controls (U+001C..U+001F included) */
}

static int
tok_compile(struct kli_tokenizer *t, struct kli_err *err)
{
    int ecode;
    PCRE2_SIZE eoff;

    t->re = pcre2_compile((PCRE2_SPTR)tok_pattern, PCRE2_ZERO_TERMINATED,
                          PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &ecode, &eoff, NULL);
    if (t->re == NULL) {
        PCRE2_UCHAR msg[160];

        pcre2_get_error_message(ecode, msg, sizeof(msg));
        return kli_err_set(err, KLI_E_UNSUPPORTED,
                           "tokenizer: PCRE2 cannot compile the split pattern at offset %zu: "
                           "%s (is it built with Unicode support?)", (size_t)eoff,
                           (const char *)msg);
    }
    /* Without JIT (unsupported platform or build) pcre2_match interprets: slower, same ids. */
    t->jit = pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE) == 0;
    for (int c = 0; c < 256; c++)
        t->aclass[c] = tok_ascii_class(c);
    return KLI_OK;
}

/* The tokenizer section of a .kli file (weights/packed.c). */
static int
tok_open_packed(struct kli_tokenizer **out, const char *path, struct kli_err *err)
{
    struct kli_wfile *wf = NULL;
    const struct kli_pack_info *pk;
    int rc = kli_wfile_open(&wf, path, err);

    if (rc != KLI_OK)
        return rc;
    pk = kli_wfile_pack(wf);
    if (pk == NULL || pk->tok_ranks == NULL)
        rc = kli_err_set(err, KLI_E_FORMAT, "tokenizer: %s holds no tokenizer", path);
    else
        rc = tokenizer_open_mem(out, pk->tok_ranks, (size_t)pk->tok_ranks_len, pk->tok_config,
                                (size_t)pk->tok_config_len, path, err);
    kli_wfile_close(wf);
    return rc;
}

int
kli_tokenizer_open(struct kli_tokenizer **out, const char *dir, struct kli_err *err)
{
    struct kli_tokenizer *t = NULL;
    char *names[TOK_SLOTS_OLD] = {0};
    char *path = NULL;
    size_t plen;
    int n_slots, k, rc;

    if (out == NULL || dir == NULL)
        return kli_err_set(err, KLI_E_INVALID, "kli_tokenizer_open: NULL argument");
    *out = NULL;
    if (kli_pack_probe(dir))
        return tok_open_packed(out, dir, err);
    plen = strlen(dir) + sizeof("/tokenizer_config.json");
    path = kli_malloc(plen);
    t = kli_calloc(1, sizeof(*t));
    if (path == NULL || t == NULL) {
        rc = kli_err_set(err, KLI_E_NOMEM, "tokenizer: out of memory");
        goto fail;
    }
    snprintf(path, plen, "%s/tiktoken.model", dir);
    rc = tok_load_ranks(t, path, err);
    if (rc != KLI_OK)
        goto fail;
    snprintf(path, plen, "%s/tokenizer_config.json", dir);
    rc = tok_load_config(t, path, names, &n_slots, err);
    if (rc != KLI_OK)
        goto fail;
    rc = tok_add_specials(t, names, n_slots, err);
    if (rc != KLI_OK)
        goto fail;
    rc = tok_compile(t, err);
    if (rc != KLI_OK)
        goto fail;
    for (k = 0; k < TOK_SLOTS_OLD; k++)
        free(names[k]);
    free(path);
    *out = t;
    return KLI_OK;
fail:
    for (k = 0; k < TOK_SLOTS_OLD; k++)
        free(names[k]);
    free(path);
    kli_tokenizer_close(t);
    return rc;
}

int
tokenizer_open_mem(struct kli_tokenizer **out, const char *ranks, size_t ranks_len,
                   const char *config, size_t config_len, const char *name, struct kli_err *err)
{
    struct kli_tokenizer *t = NULL;
    char *names[TOK_SLOTS_OLD] = {0};
    char *rb = NULL, *cb = NULL, what[160];
    int n_slots, k, rc;

    *out = NULL;
    /* The parsers want NUL-terminated text, as tok_read_file gives them. */
    rb = kli_malloc(ranks_len + 1);
    cb = config != NULL ? kli_malloc(config_len + 1) : NULL;
    t = kli_calloc(1, sizeof(*t));
    if (rb == NULL || (config != NULL && cb == NULL) || t == NULL) {
        rc = kli_err_set(err, KLI_E_NOMEM, "tokenizer: out of memory");
        goto out;
    }
    memcpy(rb, ranks, ranks_len);
    rb[ranks_len] = '\0';
    if (cb != NULL) {
        memcpy(cb, config, config_len);
        cb[config_len] = '\0';
    }
    snprintf(what, sizeof(what), "%s (tiktoken.model)", name);
    if ((rc = tok_parse_ranks(t, what, rb, ranks_len, err)) != KLI_OK)
        goto out;
    snprintf(what, sizeof(what), "%s (tokenizer_config.json)", name);
    if ((rc = tok_parse_config(t, what, cb, config_len, names, &n_slots, err)) != KLI_OK ||
        (rc = tok_add_specials(t, names, n_slots, err)) != KLI_OK ||
        (rc = tok_compile(t, err)) != KLI_OK)
        goto out;
    *out = t;
    t = NULL;
out:
    for (k = 0; k < TOK_SLOTS_OLD; k++)
        free(names[k]);
    free(rb);
    free(cb);
    kli_tokenizer_close(t);
    return rc;
}

void
kli_tokenizer_close(struct kli_tokenizer *t)
{
    if (t == NULL)
        return;
    pcre2_code_free(t->re);
    free(t->specials.slot);
    free(t->ranks.slot);
    free(t->pair_rank);
    free(t->pool);
    free(t->tok_len);
    free(t->tok_off);
    free(t);
}

int32_t
kli_tokenizer_n_vocab(const struct kli_tokenizer *t)
{
    return t->n_vocab;
}

int32_t
kli_tokenizer_n_base(const struct kli_tokenizer *t)
{
    return t->n_base;
}

const char *
kli_token_bytes(const struct kli_tokenizer *t, kli_token id, size_t *len)
{
    if (id < 0 || id >= t->n_vocab) {
        if (len != NULL)
            *len = 0;
        return NULL;
    }
    if (len != NULL)
        *len = t->tok_len[id];
    return t->pool + t->tok_off[id];
}

kli_token
kli_tokenizer_find_special(const struct kli_tokenizer *t, const char *name)
{
    if (name == NULL)
        return -1;
    return tok_map_find(t, &t->specials, (const unsigned char *)name, strlen(name));
}

/* ==== Encoding ============================================================================== */

/* Per-call state: everything kli_tokenize() needs that the shared tokenizer cannot hold. */
struct tok_enc {
    const struct kli_tokenizer *t;
    const unsigned char *text;
    kli_token *out;
    int64_t cap;
    int64_t n;                     /* tokens produced so far (may exceed cap) */
    int fast;                      /* ASCII fast path on (off: TOKENIZER_PCRE2_ONLY) */
    pcre2_match_data *md;
    pcre2_match_context *mctx;     /* NULL until a match outgrows the default JIT stack */
    pcre2_jit_stack *jstack;
    /* Scratch of the heap merge, grown to the longest piece seen. */
    uint32_t *nx, *pv, *rk;        /* [scratch_n + 1] each */
    kli_token *id;                 /* [scratch_n + 1] */
    uint64_t *heap;                /* [3 * scratch_n + 1] */
    size_t scratch_n;
    struct kli_err *err;
};

static inline void
tok_emit(struct tok_enc *e, kli_token id)
{
    if (e->n < e->cap)
        e->out[e->n] = id;
    e->n++;
}

/* The rank of s[0..n), or TOK_NO_RANK. */
static inline uint32_t
tok_rank(const struct kli_tokenizer *t, const unsigned char *s, size_t n)
{
    kli_token id;

    if (n > t->max_rank_len)
        return TOK_NO_RANK;
    id = tok_map_find(t, &t->ranks, s, n);
    return id < 0 ? TOK_NO_RANK : (uint32_t)id;
}

/*
 * tiktoken's _byte_pair_merge: the parts of the piece, named by their first byte, form a list
 * (nx; index n ends it), and pr[a] is the rank of the bytes of part a and the part after it
 * together. Each round scans for the lowest pr (strict <, so the leftmost wins), merges that
 * pair and recomputes the two pair ranks it changed. Quadratic, so only for short pieces;
 * id[a] tracks each part's own token.
 */
static void
tok_bpe_linear(struct tok_enc *e, const unsigned char *s, size_t n)
{
    const struct kli_tokenizer *t = e->t;
    uint32_t nx[TOK_BPE_LINEAR_MAX + 1], pr[TOK_BPE_LINEAR_MAX + 1];
    kli_token id[TOK_BPE_LINEAR_MAX + 1];
    uint32_t a, b, c, p, prev, best, best_prev, min;

    for (a = 0; a < n; a++) {
        nx[a] = a + 1;
        id[a] = t->byte_id[s[a]];
        pr[a] = a + 1 < n ? t->pair_rank[s[a] << 8 | s[a + 1]] : TOK_NO_RANK;
    }
    for (;;) {
        min = TOK_NO_RANK;
        best = best_prev = 0;
        for (prev = 0, a = 0; a < n; prev = a, a = nx[a]) {
            if (pr[a] < min) {
                min = pr[a];
                best = a;
                best_prev = prev;
            }
        }
        if (min == TOK_NO_RANK)
            break;
        /* Part a absorbs its right neighbour b; c is the part after them. */
        a = best;
        b = nx[a];
        c = nx[b];
        id[a] = (kli_token)min;
        nx[a] = c;
        pr[a] = c < n ? tok_rank(t, s + a, nx[c] - a) : TOK_NO_RANK;
        if (a > 0) {
            p = best_prev;
            pr[p] = tok_rank(t, s + p, c - p);
        }
    }
    for (a = 0; a < n; a = nx[a])
        tok_emit(e, id[a]);
}

static void
tok_heap_push(uint64_t *h, size_t *n, uint64_t key)
{
    size_t i = (*n)++;

    while (i > 0) {
        size_t p = (i - 1) / 2;

        if (h[p] <= key)
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = key;
}

static uint64_t
tok_heap_pop(uint64_t *h, size_t *n)
{
    uint64_t top = h[0], key = h[--*n];
    size_t i = 0, m = *n;

    for (;;) {
        size_t c = 2 * i + 1;

        if (c >= m)
            break;
        if (c + 1 < m && h[c + 1] < h[c])
            c++;
        if (key <= h[c])
            break;
        h[i] = h[c];
        i = c;
    }
    if (m > 0)
        h[i] = key;
    return top;
}

static int
tok_scratch(struct tok_enc *e, size_t n)
{
    void *p;

    if (n <= e->scratch_n)
        return KLI_OK;
    if (n > UINT32_MAX / 4)
        return kli_err_set(e->err, KLI_E_RANGE, "tokenize: a piece of %zu bytes is too long",
                           n);
    if ((p = kli_reallocarray(e->nx, n + 1, sizeof(*e->nx))) == NULL)
        goto nomem;
    e->nx = p;
    if ((p = kli_reallocarray(e->pv, n + 1, sizeof(*e->pv))) == NULL)
        goto nomem;
    e->pv = p;
    if ((p = kli_reallocarray(e->rk, n + 1, sizeof(*e->rk))) == NULL)
        goto nomem;
    e->rk = p;
    if ((p = kli_reallocarray(e->id, n + 1, sizeof(*e->id))) == NULL)
        goto nomem;
    e->id = p;
    if ((p = kli_reallocarray(e->heap, 3 * n + 1, sizeof(*e->heap))) == NULL)
        goto nomem;
    e->heap = p;
    e->scratch_n = n;
    return KLI_OK;
nomem:
    return kli_err_set(e->err, KLI_E_NOMEM, "tokenize: out of memory");
}

/*
 * The same merge for long pieces in O(n log n), the way newer tiktoken does it: the parts
 * form a doubly linked list named by their first byte (nx/pv; index n ends the list), and a
 * min-heap holds (pair rank << 32 | first byte), whose minimum is the lowest rank and, among
 * equal ranks, the leftmost, as in the scan. Entries are not removed when a pair changes; a
 * popped entry is stale when its rank is not the part's current pair rank. That test is exact:
 * a part's pair only grows to the right, so its byte string, and with it the rank, never
 * comes back.
 */
static int
tok_bpe_heap(struct tok_enc *e, const unsigned char *s, size_t n)
{
    const struct kli_tokenizer *t = e->t;
    uint32_t *nx, *pv, *rk;
    kli_token *id;
    uint64_t *heap;
    size_t hn = 0, i;
    int rc;

    rc = tok_scratch(e, n);
    if (rc != KLI_OK)
        return rc;
    nx = e->nx;
    pv = e->pv;
    rk = e->rk;
    id = e->id;
    heap = e->heap;
    for (i = 0; i < n; i++) {
        nx[i] = (uint32_t)(i + 1);
        pv[i] = (uint32_t)i - 1;
        id[i] = t->byte_id[s[i]];
        rk[i] = i + 1 < n ? t->pair_rank[s[i] << 8 | s[i + 1]] : TOK_NO_RANK;
        if (rk[i] != TOK_NO_RANK)
            tok_heap_push(heap, &hn, (uint64_t)rk[i] << 32 | i);
    }
    nx[n] = (uint32_t)n;
    while (hn > 0) {
        uint64_t key = tok_heap_pop(heap, &hn);
        uint32_t r = (uint32_t)(key >> 32), a = (uint32_t)key, b, c;

        if (rk[a] != r)
            continue;
        /* Part a absorbs its right neighbour b; c is the part after them. */
        b = nx[a];
        c = nx[b];
        id[a] = (kli_token)r;
        nx[a] = c;
        if (c < n)
            pv[c] = a;
        rk[b] = TOK_NO_RANK;
        rk[a] = c < n ? tok_rank(t, s + a, nx[c] - a) : TOK_NO_RANK;
        if (rk[a] != TOK_NO_RANK)
            tok_heap_push(heap, &hn, (uint64_t)rk[a] << 32 | a);
        if (a > 0) {
            uint32_t p = pv[a];

            rk[p] = tok_rank(t, s + p, c - p);
            if (rk[p] != TOK_NO_RANK)
                tok_heap_push(heap, &hn, (uint64_t)rk[p] << 32 | p);
        }
    }
    for (i = 0; i < n; i = nx[i])
        tok_emit(e, id[i]);
    return KLI_OK;
}

/* Encodes one piece of the split: whole if it is a token, else merged. */
static int
tok_encode_piece(struct tok_enc *e, const unsigned char *s, size_t n)
{
    const struct kli_tokenizer *t = e->t;
    uint32_t r;

    if (n == 1) {
        tok_emit(e, t->byte_id[s[0]]);
        return KLI_OK;
    }
    r = tok_rank(t, s, n);
    if (r != TOK_NO_RANK) {
        tok_emit(e, (kli_token)r);
        return KLI_OK;
    }
    if (n <= TOK_BPE_LINEAR_MAX) {
        tok_bpe_linear(e, s, n);
        return KLI_OK;
    }
    return tok_bpe_heap(e, s, n);
}

/* One match of the split pattern at or after s[off], with PCRE2. JIT code runs on a 32 KiB
 * stack by default; a long piece can need more, so the first time it does, this call gets its
 * own JIT stack (up to 64 MiB), and should even that fail, the interpreter (whose frames live
 * on the heap) takes over. */
static int
tok_match(struct tok_enc *e, const unsigned char *s, size_t n, size_t off)
{
    const struct kli_tokenizer *t = e->t;
    int rc;

    if (t->jit) {
        /* The text was validated once, up front: pcre2_jit_match checks nothing. */
        rc = pcre2_jit_match(t->re, s, n, off, 0, e->md, e->mctx);
        if (rc != PCRE2_ERROR_JIT_STACKLIMIT)
            return rc;
        if (e->jstack == NULL) {
            e->mctx = pcre2_match_context_create(NULL);
            e->jstack = pcre2_jit_stack_create(256 * 1024, 64 * 1024 * 1024, NULL);
            if (e->mctx == NULL || e->jstack == NULL)
                return PCRE2_ERROR_NOMEMORY;
            pcre2_jit_stack_assign(e->mctx, NULL, e->jstack);
            rc = pcre2_jit_match(t->re, s, n, off, 0, e->md, e->mctx);
            if (rc != PCRE2_ERROR_JIT_STACKLIMIT)
                return rc;
        }
    }
    return pcre2_match(t->re, s, n, off, PCRE2_NO_UTF_CHECK | (t->jit ? PCRE2_NO_JIT : 0),
                       e->md, e->mctx);
}

/*
 * The split pattern on ASCII, without PCRE2: the end of the match that starts at s[i]
 * (s[i] < 0x80), found by following the pattern's alternatives in order with backtracking
 * worked out by hand (comments below). It returns 0, leaving the match to PCRE2, as soon as
 * the outcome depends on a multi-byte character (a following é could extend a word, U+00A0
 * a space run, a non-ASCII digit a number, "'ſ" is a contraction). tests compare it with
 * PCRE2 alone (TOKENIZER_PCRE2_ONLY).
 */
static size_t
tok_contraction(const unsigned char *cls, const unsigned char *s, size_t n, size_t r)
{
    unsigned char c1, c2;

    /* (?i:'s|'t|'re|'ve|'m|'ll|'d)? after the letters ending at r; only U+017F (ſ), folding
     * to s, is outside ASCII among the characters that fold to these letters. */
    if (r >= n || s[r] != '\'' || r + 1 >= n)
        return r;
    if (cls[s[r + 1]] == TOK_C_NONASCII)
        return 0;
    c1 = s[r + 1] | 0x20;
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd')
        return r + 2;
    if (c1 != 'r' && c1 != 'v' && c1 != 'l')
        return r;
    if (r + 2 >= n)
        return r;
    if (cls[s[r + 2]] == TOK_C_NONASCII)
        return 0;
    c2 = s[r + 2] | 0x20;
    return c2 == (c1 == 'l' ? 'l' : 'e') ? r + 3 : r;
}

static size_t
tok_split_ascii(const unsigned char *cls, const unsigned char *s, size_t n, size_t i)
{
#define TOK_CLS(p) ((p) < n ? cls[s[(p)]] : TOK_C_END)
    int c = TOK_CLS(i);
    size_t p, q, r, w, nl;

    /* [^\r\n\p{L}\p{N}]?[UPPER]*[LOWER]+'x?  then  [^\r\n\p{L}\p{N}]?[UPPER]+[LOWER]*'x?
     * The optional lead is taken when s[i] is no letter (and not a digit or CR/LF); giving it
     * back never helps, as the letters would then have to start at s[i]. In ASCII, UPPER is
     * A-Z and LOWER a-z: the first alternative matches when the A-Z run after the lead is
     * followed by a-z, the second when that run is not empty. */
    if (c != TOK_C_DIGIT && c != TOK_C_NEWLINE) {
        p = c == TOK_C_UPPER || c == TOK_C_LOWER ? i : i + 1;
        for (q = p; TOK_CLS(q) == TOK_C_UPPER; q++)
            ;
        for (r = q; TOK_CLS(r) == TOK_C_LOWER; r++)
            ;
        if (TOK_CLS(r) == TOK_C_NONASCII)
            return 0;
        if (r > p)
            return tok_contraction(cls, s, n, r);
    }
    /* \p{N}{1,3} */
    if (c == TOK_C_DIGIT) {
        for (q = i; q < i + 3 && TOK_CLS(q) == TOK_C_DIGIT; q++)
            ;
        return q < i + 3 && TOK_CLS(q) == TOK_C_NONASCII ? 0 : q;
    }
    /*  ?[^\s\p{L}\p{N}]+[\r\n]*   (the space is given back when no symbol follows it) */
    if (c == TOK_C_OTHER || (c == TOK_C_SPACE && TOK_CLS(i + 1) == TOK_C_OTHER)) {
        for (q = c == TOK_C_OTHER ? i : i + 1; TOK_CLS(q) == TOK_C_OTHER; q++)
            ;
        if (TOK_CLS(q) == TOK_C_NONASCII)
            return 0;
        while (TOK_CLS(q) == TOK_C_NEWLINE)
            q++;
        return q;
    }
    /* Whitespace: w ends the run, nl is one past its last CR/LF (0 if none). */
    nl = 0;
    for (w = i; TOK_CLS(w) == TOK_C_SPACE || TOK_CLS(w) == TOK_C_BLANK ||
                TOK_CLS(w) == TOK_C_NEWLINE; w++) {
        if (TOK_CLS(w) == TOK_C_NEWLINE)
            nl = w + 1;
    }
    if (TOK_CLS(w) == TOK_C_NONASCII)
        return 0;
    /* \s*[\r\n]+ : \s* backtracks from the run's end to its last CR/LF. */
    if (nl > 0)
        return nl;
    /* \s+(?!\S) : the whole run at the end of the text, else all but its last character;
     * a single blank before a non-space falls through to \s+ . */
    if (w == n)
        return w;
    return w - i >= 2 ? w - 1 : w;
#undef TOK_CLS
}

/* Ordinary text s[0..n): split by the pattern, each piece merged. tiktoken runs the pattern
 * over exactly this slice, so a lookahead at its end sees the end of the subject. */
static int
tok_encode_ordinary(struct tok_enc *e, const unsigned char *s, size_t n)
{
    size_t off = 0;
    int rc;

    while (off < n) {
        PCRE2_SIZE *ov;

        if (s[off] < 0x80 && e->fast) {
            size_t end = tok_split_ascii(e->t->aclass, s, n, off);

            if (end > off) {
                rc = tok_encode_piece(e, s + off, end - off);
                if (rc != KLI_OK)
                    return rc;
                off = end;
                continue;
            }
        }
        rc = tok_match(e, s, n, off);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0) {
            PCRE2_UCHAR msg[120];

            pcre2_get_error_message(rc, msg, sizeof(msg));
            return kli_err_set(e->err, rc == PCRE2_ERROR_NOMEMORY ? KLI_E_NOMEM : KLI_E_RANGE,
                               "tokenize: the split pattern failed near byte %zu: %s",
                               (size_t)(s - e->text) + off, (const char *)msg);
        }
        ov = pcre2_get_ovector_pointer(e->md);
        /* No alternative matches the empty string, so every match moves forward. */
        KLI_ASSERT(ov[1] > ov[0] && ov[0] >= off && ov[1] <= n);
        rc = tok_encode_piece(e, s + ov[0], ov[1] - ov[0]);
        if (rc != KLI_OK)
            return rc;
        off = ov[1];
    }
    return KLI_OK;
}

/* @return the position of the leftmost special name in s[0..n) (n if none), its id and
 *         length; the longest name wins where several start at one place. */
static size_t
tok_find_special(const struct kli_tokenizer *t, const unsigned char *s, size_t n,
                 kli_token *id, size_t *len)
{
    for (size_t p = 0; p < n; p++) {
        unsigned pair = p + 1 < n ? (unsigned)s[p] << 8 | s[p + 1] : 0;
        int may_start = p + 1 < n && (t->special_start[pair >> 3] >> (pair & 7) & 1);

        /* Most positions are ruled out by their first two bytes. */
        if (!may_start && !t->special_one[s[p]])
            continue;
        for (int k = 0; k < t->n_special_lens; k++) {
            size_t l = t->special_lens[k];
            kli_token sid;

            if (l > n - p)
                continue;
            sid = tok_map_find(t, &t->specials, s + p, l);
            if (sid >= 0) {
                *id = sid;
                *len = l;
                return p;
            }
        }
    }
    return n;
}

/* One chunk of tokenization_kimi.py, i.e. one tiktoken encode() call. */
static int
tok_encode_chunk(struct tok_enc *e, size_t a, size_t b, int special)
{
    const unsigned char *s = e->text + a;
    size_t n = b - a, p = 0;
    int rc;

    if (!special)
        return tok_encode_ordinary(e, s, n);
    while (p < n) {
        kli_token id = -1;
        size_t len = 0;
        size_t q = p + tok_find_special(e->t, s + p, n - p, &id, &len);

        rc = tok_encode_ordinary(e, s + p, q - p);
        if (rc != KLI_OK)
            return rc;
        if (q == n)
            break;
        tok_emit(e, id);
        p = q + len;
    }
    return KLI_OK;
}

/*
 * tokenization_kimi.py's chunking, walked character by character: the text is cut into
 * 400,000-character pieces, and within a piece a new chunk starts at the character that would
 * make the current run of isspace() or of non-isspace() characters 25,001 long (the run then
 * counts 1 again). Counts are characters, not bytes.
 */
static int
tok_encode_text(struct tok_enc *e, size_t len, int special)
{
    const unsigned char *s = e->text;
    size_t i = 0, chunk = 0;
    long piece_chars = 0, run = 0;
    int run_space = 0, rc;

    /* Up to 25,000 bytes there are at most 25,000 characters: never a cut. */
    if (len <= TOK_RUN_CHARS)
        return tok_encode_chunk(e, 0, len, special);
    while (i < len) {
        uint32_t cp = s[i];
        size_t cl = 1;
        int sp;

        if (piece_chars == TOK_CHUNK_CHARS) {
            rc = tok_encode_chunk(e, chunk, i, special);
            if (rc != KLI_OK)
                return rc;
            chunk = i;
            piece_chars = 0;
        }
        if (cp < 0x80) {
            sp = (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20);
        } else {
            cl = unicode_decode(s + i, len - i, &cp);   /* valid: checked by the caller */
            sp = unicode_isspace(cp);
        }
        if (piece_chars == 0 || sp != run_space) {
            run_space = sp;
            run = 1;
        } else if (++run > TOK_RUN_CHARS) {
            rc = tok_encode_chunk(e, chunk, i, special);
            if (rc != KLI_OK)
                return rc;
            chunk = i;
            run = 1;
        }
        piece_chars++;
        i += cl;
    }
    return tok_encode_chunk(e, chunk, len, special);
}

int64_t
kli_tokenize(const struct kli_tokenizer *t, const char *text, size_t len, int flags,
             kli_token *out, int64_t cap, struct kli_err *err)
{
    struct tok_enc e;
    size_t bad;
    int rc;

    if (t == NULL || (text == NULL && len > 0) || cap < 0 || (out == NULL && cap > 0) ||
        (flags & ~(KLI_TOKENIZE_SPECIAL | TOKENIZER_PCRE2_ONLY)) != 0)
        return kli_err_set(err, KLI_E_INVALID, "kli_tokenize: invalid argument");
    if (len > (size_t)INT64_MAX)
        return kli_err_set(err, KLI_E_RANGE, "kli_tokenize: text too long");
    bad = unicode_valid_prefix(text, len);
    if (bad != len)
        return kli_err_set(err, KLI_E_FORMAT,
                           "tokenize: invalid UTF-8 at byte offset %zu (byte 0x%02x)", bad,
                           (unsigned)(unsigned char)text[bad]);
    if (len == 0)
        return 0;
    memset(&e, 0, sizeof(e));
    e.t = t;
    e.text = (const unsigned char *)text;
    e.out = out;
    e.cap = cap;
    e.err = err;
    e.fast = !(flags & TOKENIZER_PCRE2_ONLY);
    e.md = pcre2_match_data_create_from_pattern(t->re, NULL);
    if (e.md == NULL) {
        rc = kli_err_set(err, KLI_E_NOMEM, "tokenize: out of memory");
        goto out;
    }
    rc = tok_encode_text(&e, len, flags & KLI_TOKENIZE_SPECIAL);
out:
    free(e.heap);
    free(e.id);
    free(e.rk);
    free(e.pv);
    free(e.nx);
    pcre2_match_data_free(e.md);
    pcre2_match_context_free(e.mctx);
    pcre2_jit_stack_free(e.jstack);
    return rc != KLI_OK ? rc : e.n;
}

/* ==== Decoding ============================================================================== */

int64_t
kli_detokenize(const struct kli_tokenizer *t, const kli_token *ids, int64_t n, char *out,
               int64_t cap, struct kli_err *err)
{
    int64_t need = 0;

    if (t == NULL || n < 0 || (ids == NULL && n > 0) || cap < 0 || (out == NULL && cap > 0))
        return kli_err_set(err, KLI_E_INVALID, "kli_detokenize: invalid argument");
    for (int64_t i = 0; i < n; i++) {
        kli_token id = ids[i];
        size_t l;

        if (id < 0 || id >= t->n_vocab)
            return kli_err_set(err, KLI_E_RANGE,
                               "detokenize: token %d at index %lld is outside [0, %d)",
                               (int)id, (long long)i, (int)t->n_vocab);
        l = t->tok_len[id];
        if (need < cap) {
            size_t room = (size_t)(cap - need);

            memcpy(out + need, t->pool + t->tok_off[id], l < room ? l : room);
        }
        need += (int64_t)l;
    }
    return need;
}
