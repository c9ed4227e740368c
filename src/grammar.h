/*
 * grammar.h - constrained decoding: a JSON Schema (a subset) compiled by jsonschema.c into a
 * graph of nodes, and the byte-level pushdown matcher of grammar.c that walks it, with the
 * token mask over the vocabulary that the sampler applies before it draws.
 *
 * The matcher's state is a small set of configurations (anyOf and oneOf fork them), each a
 * stack of frames, one frame per value being written. It accepts compact JSON only (no
 * whitespace between tokens), which keeps a random model from looping on blanks. Besides
 * "can these bytes go on?", every state knows the fewest bytes that complete its value
 * (gr_state_dist); the mask only admits tokens after which the value can still be finished
 * within the tokens left, so output is complete JSON even when max_tokens runs out.
 */
#ifndef KLI_GRAMMAR_H
#define KLI_GRAMMAR_H

#include <pthread.h>
#include <stdint.h>

#include "kli.h"

enum gr_kind { GR_ANY, GR_OBJECT, GR_ARRAY, GR_STRING, GR_NUMBER, GR_LITERAL, GR_UNION };

/* The nodes every grammar has first: any value and the pieces it is made of. */
enum {
    GR_N_ANY, GR_N_STR, GR_N_NUM, GR_N_TRUE, GR_N_FALSE, GR_N_NULL, GR_N_OBJ, GR_N_ARR,
    GR_N_BUILTIN
};

#define GR_INF INT32_MAX        /* no completion */
#define GR_MAX_SET 64           /* properties of an object, values of an enum */
#define GR_MAX_DIGITS 15        /* digits of a generated number, fraction included */
#define GR_MAX_FRAC 6           /* digits of its fraction */

struct gr_prop {
    char *lit;                  /* "NAME": as compact JSON, the bytes that start it */
    int32_t len;
    int32_t node;
    int required;
    int64_t rest;               /* bytes the required properties from this one on take:
                                   a comma, the key and the shortest value each */
};

struct gr_node {
    int kind;
    int integer;                /* GR_NUMBER: no fraction */
    int has_min, has_max, min_excl, max_excl;
    double min, max;
    int32_t min_len, max_len;   /* string: characters, array: items; max -1: none */
    int32_t child;              /* array: its items; object with free keys: the values */
    int32_t first, n;           /* object: props[first..); union: alts[first..);
                                   literal: lits[first..) */
    int free_keys;              /* an object of any keys (no properties declared) */
    int32_t pattern;            /* string: 1 + its index in res, 0: none */
    int32_t minlen;             /* bytes of the shortest value; GR_INF: none */
};

/* A pattern's position automaton (regex.c): position 0 is the start; a set of positions is
 * a bit set. */
#define GR_RX_MAX 64
struct gr_regex {
    int n;                      /* positions */
    uint64_t follow[GR_RX_MAX]; /* the positions that may come after each */
    uint64_t on[128];           /* the positions each byte may take */
    uint64_t accept;            /* the positions a match may end at */
    int32_t dist[GR_RX_MAX];    /* the fewest bytes from each to a match */
};

/* Compiles pattern pat (len bytes). @return 0, or -1 with the reason in msg. */
int rx_compile(struct gr_regex *r, const char *pat, size_t len, char *msg, size_t cap);
/* The positions after byte c from the set. */
uint64_t rx_step(const struct gr_regex *r, uint64_t set, int c);
/* The fewest bytes from the set to a match (GR_INF: none). */
int32_t rx_dist(const struct gr_regex *r, uint64_t set);

struct gr_lit {
    char *s;                    /* compact JSON */
    int32_t len;
};

/* The shared token trie: the vocabulary's byte strings in preorder (tr_* arrays). */
struct gr_trie {
    int32_t n;
    uint8_t *byte;
    uint8_t *depth;             /* 1 for a first byte */
    int32_t *tok;               /* the token ending here, or -1 */
    int32_t *skip;              /* the node after this one's subtree */
    int32_t *dup;               /* [n_vocab] another token of the same bytes, or -1 */
    int32_t max_len;
};

struct gr_cache;

struct kli_grammar {
    struct gr_node *nodes;
    int32_t n_nodes, cap_nodes, root;
    struct gr_prop *props;
    int32_t n_props, cap_props;
    int32_t *alts;
    int32_t n_alts, cap_alts;
    struct gr_lit *lits;
    int32_t n_lits, cap_lits;
    struct gr_regex *res;
    int32_t n_res, cap_res;
    const struct kli_tokenizer *tok;   /* borrowed: outlives the grammar */
    int32_t n_vocab;            /* the tokenizer's */
    kli_token end;              /* the token that ends a complete value */
    kli_token ends[3];          /* tokens that count as an end */
    const struct gr_trie *trie; /* the tokenizer's */
    pthread_mutex_t lock;       /* guards the cache */
    struct gr_cache *cache;
};

/* ---- jsonschema.c ---------------------------------------------------------------------- */

/* Compiles schema text into g's nodes (g->root); NULL: any JSON object. Refusals name the
 * keyword and where it is (a JSON pointer). @return KLI_OK, KLI_E_FORMAT (not JSON, a
 * keyword's value of the wrong type), KLI_E_UNSUPPORTED (a keyword outside the subset),
 * KLI_E_INVALID (a schema no value satisfies), KLI_E_NOMEM. */
int schema_compile(struct kli_grammar *g, const char *text, size_t len, struct kli_err *err);

/* Appends a node (zeroed but for kind, max_len -1 and minlen GR_INF). @return its index, or
 * -1 when out of memory. */
int32_t gr_node_add(struct kli_grammar *g, int kind);

/* Fills every node's minlen and every property's rest (a fixpoint over references). */
void gr_minlen(struct kli_grammar *g);

/* The shortest number node n allows, in bytes (grammar.c's rule for numbers). */
int64_t gr_num_shortest(const struct gr_node *n);

/* Frees a tokenizer's trie (kli_tokenizer_close). NULL is allowed. */
void gr_trie_free(struct gr_trie *t);

/* ---- grammar.c: the matcher --------------------------------------------------------------- */

struct gr_matcher;

int gr_matcher_create(struct gr_matcher **out, const struct kli_grammar *g, int32_t n_vocab,
                      struct kli_err *err);
void gr_matcher_free(struct gr_matcher *m);
/* Back to the start, with `budget` tokens to write the value in. */
void gr_matcher_reset(struct gr_matcher *m, int32_t budget);
/* @return 1 when the value is complete, 0 while it goes on, -1 when nothing can follow
 * (a bug, or a budget too small for the schema). */
int gr_matcher_status(const struct gr_matcher *m);
/* The tokens allowed next, n_vocab bits (the end tokens when the value may end here).
 * @return the mask, or NULL when no token is allowed. */
const uint64_t *gr_matcher_mask(struct gr_matcher *m);
/* gr_matcher_mask's plain twin, for the tests: each token's bytes fed on their own from
 * the current state, no trie, no cache. */
void gr_matcher_mask_plain(struct gr_matcher *m, uint64_t *mask);
/* Advances over a token (one of the mask's); an end token or one that does not fit
 * leaves the matcher stuck (status -1). */
void gr_matcher_accept(struct gr_matcher *m, kli_token t);
/* Advances over raw bytes. @return 0, or -1 when they do not fit (the state is kept). */
int gr_matcher_feed(struct gr_matcher *m, const char *s, size_t n);
/* The fewest bytes that complete the value from here (0: complete, or may end here). */
int64_t gr_matcher_dist(const struct gr_matcher *m);
/* The token a complete value ends with. */
kli_token gr_matcher_end(const struct gr_matcher *m);

#endif
