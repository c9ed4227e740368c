/*
 * fuzz-schema.c - libFuzzer target for the JSON Schema compiler and the grammar matcher
 * (src/jsonschema.c, src/grammar.c).
 *
 * Build with -fsanitize=fuzzer,address -DKLI_LIBFUZZER; without KLI_LIBFUZZER a main()
 * replays the files named on the command line. The input is schema text, compiled for the
 * tokenizer fixture ($KLI_FUZZ_TOKENIZER_DIR, else ./tests/data/tokenizer). Besides "no
 * crash", it checks: a refusal carries a message; an accepted schema yields a value, token
 * by token (the choices drawn from the input's hash), where every mask equals its plain twin
 * (each token fed on its own), some token is always allowed until the value is whole within
 * the budget, and the whole value parses as JSON.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "grammar.h"
#include "kli.h"
#define FUZZ_NAME "fuzz-schema"
#define FUZZ_CLEANUP
#define FUZZ_TOKENIZER
#include "fuzz.h"

#ifndef KLI_LIBFUZZER
static void
fuzz_cleanup(void)
{
    kli_tokenizer_close(fuzz_tok);
}
#endif

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kli_err err = {0};
    struct kli_grammar *g = NULL;
    struct gr_matcher *m = NULL;
    int32_t nv, nw, budget;
    uint64_t *plain, h = 0xcbf29ce484222325ull;
    char text[4096];
    size_t len = 0;

    if (fuzz_tok == NULL)
        fuzz_load();
    int rc = kli_grammar_create(&g, fuzz_tok, (const char *)data, size, &err);
    if (rc != KLI_OK) {
        fuzz_check(g == NULL && err.code == rc && err.msg[0] != '\0',
                   "failure without a message");
        return 0;
    }
    nv = kli_tokenizer_n_vocab(fuzz_tok);
    nw = (nv + 63) / 64;
    plain = calloc((size_t)nw, sizeof(uint64_t));
    fuzz_check(plain != NULL && gr_matcher_create(&m, g, nv, &err) == KLI_OK, "out of memory");
    budget = g->nodes[g->root].minlen + 24;
    if (budget > 200)
        budget = 200;
    gr_matcher_reset(m, budget);
    for (size_t i = 0; i < size; i++)
        h = (h ^ data[i]) * 0x100000001b3ull;
    while (g->nodes[g->root].minlen <= budget && gr_matcher_status(m) == 0) {
        const uint64_t *mk = gr_matcher_mask(m);
        int32_t cnt = 0;
        gr_matcher_mask_plain(m, plain);
        for (int32_t w = 0; w < nw; w++) {
            fuzz_check((mk != NULL ? mk[w] : 0) == plain[w], "trie mask differs from plain");
            cnt += __builtin_popcountll(plain[w]);
        }
        fuzz_check(cnt > 0, "no token allowed before the value is whole");
        h ^= h >> 29;
        h *= 0xbf58476d1ce4e5b9ull;
        int32_t pick = (int32_t)((h >> 11) % (uint64_t)cnt), id = 0;
        for (; id < nv; id++) {
            if (((plain[id / 64] >> (id % 64)) & 1) && pick-- == 0)
                break;
        }
        size_t bl = 0;
        const char *b = id < kli_tokenizer_n_base(fuzz_tok) ? kli_token_bytes(fuzz_tok, id, &bl)
                                                           : NULL;
        gr_matcher_accept(m, id);
        if (b != NULL && len + bl < sizeof(text)) {
            memcpy(text + len, b, bl);
            len += bl;
        }
    }
    if (g->nodes[g->root].minlen <= budget) {
        fuzz_check(gr_matcher_status(m) == 1, "the value is not whole within the budget");
        cJSON *v = cJSON_ParseWithLength(text, len);
        fuzz_check(v != NULL, "the value does not parse");
        cJSON_Delete(v);
    }
    gr_matcher_free(m);
    free(plain);
    kli_grammar_free(g);
    return 0;
}
