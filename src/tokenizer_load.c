/*
 * tokenizer_load.c - opening Kimi's tiktoken tokenizer: tiktoken.model (base64 byte strings
 * and their ranks) and tokenizer_config.json (the special tokens), from a model directory,
 * a .kli file or memory, into the tables tokenizer.c encodes with (doc/formats.md section 1).
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
#include "grammar.h"
#include "tokenizer.h"
#include "tokenizer_impl.h"
#include "unicode.h"
#include "weights.h"

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

static int
tok_map_init(struct tok_map *m, size_t count)
{
    size_t cap = 16;

    while (cap < count + count / 2 + 1)
        cap *= 2;
    m->slot = k_calloc(cap, sizeof(*m->slot));
    if (m->slot == NULL)
        return KLI_E_NOMEM;
    m->mask = cap - 1;
    return KLI_OK;
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
    return file_read(path, TOK_MAX_FILE, buf, len, err);
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
        return err_set(err, KLI_E_FORMAT,
                           "tokenizer: %s line %ld: expected \"<base64> <rank>\"", path, lineno);
    while (i < n && tok_is_blank(s[i]))
        i++;
    if (i != n)
        return err_set(err, KLI_E_FORMAT,
                           "tokenizer: %s line %ld: extra text after the rank", path, lineno);
    len = tok_b64_decode(s + b64, b64_len, dec);
    if (len <= 0)
        return err_set(err, KLI_E_FORMAT, "tokenizer: %s line %ld: invalid base64 \"%.*s\"",
                           path, lineno, (int)(b64_len > 40 ? 40 : b64_len), s + b64);
    if (rank >= (uint64_t)t->n_base)
        return err_set(err, KLI_E_FORMAT,
                           "tokenizer: %s line %ld: rank %llu out of range: %d entries need "
                           "ranks 0..%d with no gaps", path, lineno, (unsigned long long)rank,
                           t->n_base, t->n_base - 1);
    if (rank_line[rank] != 0)
        return err_set(err, KLI_E_FORMAT,
                           "tokenizer: %s line %ld: rank %llu repeated (first on line %lu)",
                           path, lineno, (unsigned long long)rank,
                           (unsigned long)rank_line[rank]);
    rank_line[rank] = (uint32_t)lineno;
    rc = tok_pool_add(t, (kli_token)rank, dec, (size_t)len);
    if (rc != KLI_OK)
        return err_set(err, rc, "tokenizer: %s: out of memory", path);
    old = tok_map_insert(t, &t->ranks, (kli_token)rank);
    if (old >= 0)
        return err_set(err, KLI_E_FORMAT,
                           "tokenizer: %s line %ld: the bytes of rank %llu repeat those of "
                           "rank %d (line %lu)", path, lineno, (unsigned long long)rank, old,
                           (unsigned long)rank_line[old]);
    if ((uint32_t)len > t->max_rank_len)
        t->max_rank_len = (uint32_t)len;
    return KLI_OK;
}

/* The line of buf[0, len) that starts at *i: *line, *ll bytes without the "\n" or "\r\n";
 * *i moves past it. @return 0 at the end of the text. */
static int
tok_next_line(const char *buf, size_t len, size_t *i, const char **line, size_t *ll)
{
    const char *nl;
    size_t e;

    if (*i >= len)
        return 0;
    nl = memchr(buf + *i, '\n', len - *i);
    e = nl != NULL ? (size_t)(nl - buf) : len;
    *line = buf + *i;
    *ll = e - *i;
    if (*ll > 0 && buf[e - 1] == '\r')
        (*ll)--;
    *i = e + 1;
    return 1;
}

/* tiktoken.model text (`len` bytes, NUL-terminated); `path` names it in messages. */
static int
tok_parse_ranks(struct kli_tokenizer *t, const char *path, const char *buf, size_t len,
                struct kli_err *err)
{
    size_t i, ll, n_lines = 0;
    const char *line;
    uint32_t *rank_line = NULL;
    unsigned char dec[TOK_MAX_LINE];
    long lineno;
    int rc;

    if (len > UINT32_MAX / 2) {
        rc = err_set(err, KLI_E_FORMAT, "tokenizer: %s is larger than 2 GiB", path);
        goto out;
    }
    /* Pass 1: count entries (tiktoken skips empty lines) and bound line lengths. */
    lineno = 0;
    for (i = 0; tok_next_line(buf, len, &i, &line, &ll);) {
        lineno++;
        if (ll > TOK_MAX_LINE) {
            rc = err_set(err, KLI_E_FORMAT, "tokenizer: %s line %ld: longer than %d bytes",
                             path, lineno, TOK_MAX_LINE);
            goto out;
        }
        if (ll > 0)
            n_lines++;
    }
    if (n_lines < 256 || n_lines > TOK_MAX_RANKS) {
        rc = err_set(err, KLI_E_FORMAT, "tokenizer: %s has %zu ranks; expected 256..%d",
                         path, n_lines, TOK_MAX_RANKS);
        goto out;
    }
    t->n_base = (int32_t)n_lines;
    t->n_vocab = t->n_base;     /* the specials come later */
    struct k_carve cv = {0};
    for (int pass = 0; pass < 2; pass++) {   /* k_carve: measure, then hand out */
        t->tok_off = k_carve(&cv, (size_t)t->n_base + TOK_SLOTS_OLD, sizeof(*t->tok_off));
        t->tok_len = k_carve(&cv, (size_t)t->n_base + TOK_SLOTS_OLD, sizeof(*t->tok_len));
        t->pair_rank = k_carve(&cv, 65536, sizeof(*t->pair_rank));
        if (pass == 0)
            t->mem = k_carve_block(&cv);
    }
    rank_line = k_calloc((size_t)t->n_base, sizeof(*rank_line));
    t->pool_cap = len + 1 + TOK_SLOTS_OLD * 32;
    t->pool = k_malloc(t->pool_cap);
    if (t->mem == NULL || rank_line == NULL || t->pool == NULL ||
        tok_map_init(&t->ranks, (size_t)t->n_base) != KLI_OK) {
        rc = err_set(err, KLI_E_NOMEM, "tokenizer: out of memory loading %s", path);
        goto out;
    }
    /* Pass 2: decode. */
    lineno = 0;
    for (i = 0; tok_next_line(buf, len, &i, &line, &ll);) {
        lineno++;
        if (ll > 0) {
            rc = tok_parse_rank_line(t, path, lineno, line, ll, rank_line, dec, err);
            if (rc != KLI_OK)
                goto out;
        }
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
            rc = err_set(err, KLI_E_FORMAT,
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
        rc = err_set(err, KLI_E_FORMAT, "tokenizer: %s is not a JSON object", path);
        goto out;
    }
    dec = cJSON_GetObjectItemCaseSensitive(root, "added_tokens_decoder");
    if (dec == NULL || cJSON_IsNull(dec)) {
        rc = KLI_OK;
        goto out;
    }
    if (!cJSON_IsObject(dec)) {
        rc = err_set(err, KLI_E_FORMAT,
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
            rc = err_set(err, KLI_E_FORMAT,
                             "tokenizer: %s: added_tokens_decoder key \"%s\" is not a token id",
                             path, key != NULL ? key : "");
            goto out;
        }
        if (id < t->n_base || id >= (long)t->n_base + TOK_SLOTS_OLD) {
            rc = err_set(err, KLI_E_FORMAT,
                             "tokenizer: %s: added token id %ld is outside the special slots "
                             "%d..%d", path, id, t->n_base, t->n_base + TOK_SLOTS_OLD - 1);
            goto out;
        }
        if (!cJSON_IsString(content) || content->valuestring == NULL ||
            content->valuestring[0] == '\0') {
            rc = err_set(err, KLI_E_FORMAT,
                             "tokenizer: %s: added token %ld has no \"content\" string", path,
                             id);
            goto out;
        }
        nlen = strlen(content->valuestring);
        if (nlen > TOK_MAX_SPECIAL ||
            unicode_valid_prefix(content->valuestring, nlen) != nlen) {
            rc = err_set(err, KLI_E_FORMAT,
                             "tokenizer: %s: added token %ld is longer than %d bytes or not "
                             "UTF-8", path, id, TOK_MAX_SPECIAL);
            goto out;
        }
        if (names[id - t->n_base] != NULL) {
            rc = err_set(err, KLI_E_FORMAT, "tokenizer: %s: added token %ld named twice",
                             path, id);
            goto out;
        }
        names[id - t->n_base] = k_strdup(content->valuestring);
        if (names[id - t->n_base] == NULL) {
            rc = err_set(err, KLI_E_NOMEM, "tokenizer: out of memory reading %s", path);
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
        return err_set(err, KLI_E_NOMEM, "tokenizer: out of memory");
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
            return err_set(err, rc, "tokenizer: out of memory");
        old = tok_map_insert(t, &t->specials, id);
        if (old >= 0)
            return err_set(err, KLI_E_FORMAT,
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
        return err_set(err, KLI_E_UNSUPPORTED,
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

/* The tokenizer of a .kli file (its section) or a GGUF file (rebuilt from its metadata). */
static int
tok_open_packed(struct kli_tokenizer **out, const char *path, struct kli_err *err)
{
    struct wfile *wf = NULL;
    const struct pack_meta *pk;
    int rc = wfile_open(&wf, path, err);

    if (rc != KLI_OK)
        return rc;
    pk = wfile_meta(wf);
    if (pk == NULL || pk->tok_ranks == NULL)
        rc = err_set(err, KLI_E_FORMAT, "tokenizer: %s holds no tokenizer", path);
    else
        rc = tokenizer_open_mem(out, pk->tok_ranks, (size_t)pk->tok_ranks_len, pk->tok_config,
                                (size_t)pk->tok_config_len, path, err);
    wfile_close(wf);
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
        return err_set(err, KLI_E_INVALID, "kli_tokenizer_open: NULL argument");
    *out = NULL;
    if (wfile_probe(dir))
        return tok_open_packed(out, dir, err);
    plen = strlen(dir) + sizeof("/tokenizer_config.json");
    path = k_malloc(plen);
    t = k_calloc(1, sizeof(*t));
    if (path == NULL || t == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "tokenizer: out of memory");
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
    rb = k_malloc(ranks_len + 1);
    cb = config != NULL ? k_malloc(config_len + 1) : NULL;
    t = k_calloc(1, sizeof(*t));
    if (rb == NULL || (config != NULL && cb == NULL) || t == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "tokenizer: out of memory");
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
    gr_trie_free(t->trie);
    pcre2_code_free(t->re);
    free(t->specials.slot);
    free(t->ranks.slot);
    free(t->pool);
    free(t->mem);
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

void
tokenizer_end_tokens(const struct kli_tokenizer *t, kli_token eos,
                     kli_token ends[TOKENIZER_N_ENDS])
{
    ends[0] = eos;
    ends[1] = kli_tokenizer_find_special(t, "<|im_end|>");
    ends[2] = kli_tokenizer_find_special(t, "[EOS]");
}
