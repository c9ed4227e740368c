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
 * A tokenizer is read-only after open (tokenizer_load.c builds it), so every per-call resource
 * (PCRE2 match data, JIT stack, merge scratch) lives in a struct tok_enc on the caller's stack.
 */
#include "config.h"

#define PCRE2_CODE_UNIT_WIDTH 8

#include <pcre2.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "tokenizer.h"
#include "tokenizer_impl.h"
#include "unicode.h"

/* Pieces up to this many bytes are merged by tiktoken's quadratic scan, longer ones through
 * a heap; both give the same ids (overridable at build time to test the heap path). */
#ifndef TOK_BPE_LINEAR_MAX
#define TOK_BPE_LINEAR_MAX 128
#endif

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
    void *scratch;                 /* the block the five are carved from */
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
    struct k_carve cv = {0};

    if (n <= e->scratch_n)
        return KLI_OK;
    if (n > UINT32_MAX / 4)
        return err_set(e->err, KLI_E_RANGE, "tokenize: a piece of %zu bytes is too long",
                           n);
    /* tok_bpe_heap fills the scratch anew for every piece: nothing to keep when it grows */
    free(e->scratch);
    e->scratch_n = 0;
    for (int pass = 0; pass < 2; pass++) {   /* k_carve: measure, then hand out */
        e->nx = k_carve(&cv, n + 1, sizeof(*e->nx));
        e->pv = k_carve(&cv, n + 1, sizeof(*e->pv));
        e->rk = k_carve(&cv, n + 1, sizeof(*e->rk));
        e->id = k_carve(&cv, n + 1, sizeof(*e->id));
        e->heap = k_carve(&cv, 3 * n + 1, sizeof(*e->heap));
        if (pass == 0 && (e->scratch = k_carve_block(&cv)) == NULL)
            return err_set(e->err, KLI_E_NOMEM, "tokenize: out of memory");
    }
    e->scratch_n = n;
    return KLI_OK;
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
            return err_set(e->err, rc == PCRE2_ERROR_NOMEMORY ? KLI_E_NOMEM : KLI_E_RANGE,
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
        return err_set(err, KLI_E_INVALID, "kli_tokenize: invalid argument");
    if (len > (size_t)INT64_MAX)
        return err_set(err, KLI_E_RANGE, "kli_tokenize: text too long");
    bad = unicode_valid_prefix(text, len);
    if (bad != len)
        return err_set(err, KLI_E_FORMAT,
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
        rc = err_set(err, KLI_E_NOMEM, "tokenize: out of memory");
        goto out;
    }
    rc = tok_encode_text(&e, len, flags & KLI_TOKENIZE_SPECIAL);
out:
    free(e.scratch);
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
        return err_set(err, KLI_E_INVALID, "kli_detokenize: invalid argument");
    for (int64_t i = 0; i < n; i++) {
        kli_token id = ids[i];
        size_t l;

        if (id < 0 || id >= t->n_vocab)
            return err_set(err, KLI_E_RANGE,
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
