/*
 * tokenizer_impl.h - what the tokenizer's two halves share: tokenizer_load.c builds a
 * struct kli_tokenizer from tiktoken.model and tokenizer_config.json, tokenizer.c encodes
 * and decodes with it. The byte-string map's lookup is here, inline, because BPE calls it
 * for every candidate pair. Private to those two files.
 */
#ifndef KLI_TOKENIZER_IMPL_H
#define KLI_TOKENIZER_IMPL_H

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif

#include <pcre2.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kli.h"

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

struct gr_trie;

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
    void *mem;                     /* the block tok_off, tok_len and pair_rank are carved from */
    unsigned char special_one[256];    /* bytes that are a whole special name */
    uint8_t special_start[65536 / 8];  /* bit (b0 << 8 | b1): some special name starts so */
    uint32_t special_lens[TOK_SLOTS_OLD];  /* distinct special name lengths, longest first */
    int n_special_lens;
    unsigned char aclass[256];     /* enum tok_class of each byte, for the ASCII fast path */
    pcre2_code *re;
    int jit;                       /* re is JIT-compiled */
    struct gr_trie *trie;          /* the vocabulary as grammar.c walks it: built by the
                                      first grammar, shared by all, freed here */
};

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

#endif /* KLI_TOKENIZER_IMPL_H */
