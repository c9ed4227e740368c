/*
 * fuzz-tokenizer.c - libFuzzer target for kli_tokenize / kli_detokenize.
 *
 * Build with -fsanitize=fuzzer,address -DKLI_LIBFUZZER for libFuzzer; without KLI_LIBFUZZER
 * a main() replays the files named on the command line (a corpus or crash reproducers).
 * The tokenizer is loaded once, from $KLI_FUZZ_TOKENIZER_DIR or else
 * ./tests/data/tokenizer (the test fixture: a small vocabulary with Kimi's special slots).
 *
 * Every input is encoded in both modes. Besides "no crash", it checks the API's promises:
 * invalid UTF-8 is refused with KLI_E_FORMAT and a message; valid text gives at most one id
 * per byte, ids inside the vocabulary (no special ids in ordinary mode), decoding gives the
 * text back byte for byte, a short buffer yields the same count and a prefix of the ids, and
 * the ASCII fast path of the split gives the same ids as PCRE2 alone.
 * kli_utf8_complete_prefix() is checked on every prefix of the input.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "tokenizer.h"
#include "unicode.h"
#define FUZZ_NAME "fuzz-tokenizer"
#define FUZZ_CLEANUP
#define FUZZ_TOKENIZER
#include "fuzz.h"

static void
fuzz_mode(const char *text, size_t size, int valid, int flags)
{
    struct kli_err err = {0};
    kli_token *ids = malloc((size + 1) * sizeof(*ids)), *part = NULL;
    char *back = malloc(size + 1);
    int64_t n, m, i, half;

    fuzz_check(ids != NULL && back != NULL, "out of memory");
    n = kli_tokenize(fuzz_tok, text, size, flags, ids, (int64_t)size + 1, &err);
    if (!valid) {
        fuzz_check(n == KLI_E_FORMAT && err.code == KLI_E_FORMAT && err.msg[0] != '\0',
                   "invalid UTF-8 not refused with a message");
        goto out;
    }
    fuzz_check(n >= 0 && err.code == 0, "valid text refused");
    fuzz_check(n <= (int64_t)size, "more ids than bytes");
    for (i = 0; i < n; i++) {
        int32_t lim = flags ? kli_tokenizer_n_vocab(fuzz_tok) : kli_tokenizer_n_base(fuzz_tok);

        fuzz_check(ids[i] >= 0 && ids[i] < lim, "id out of range");
    }
    /* The ASCII fast path of the split agrees with PCRE2 alone. */
    part = malloc((size + 1) * sizeof(*part));
    fuzz_check(part != NULL, "out of memory");
    m = kli_tokenize(fuzz_tok, text, size, flags | TOKENIZER_PCRE2_ONLY, part, (int64_t)size + 1,
                     NULL);
    fuzz_check(m == n && memcmp(part, ids, (size_t)n * sizeof(*ids)) == 0,
               "ASCII fast path differs from PCRE2");
    free(part);
    part = NULL;

    m = kli_detokenize(fuzz_tok, ids, n, back, (int64_t)size + 1, &err);
    fuzz_check(m == (int64_t)size && memcmp(back, text, size) == 0,
               "decode(encode(text)) != text");

    /* The retry protocol: a buffer of half the size gets the same count and a prefix. */
    half = n / 2;
    part = malloc(((size_t)half + 1) * sizeof(*part));
    fuzz_check(part != NULL, "out of memory");
    part[half] = -7;
    m = kli_tokenize(fuzz_tok, text, size, flags, part, half, NULL);
    fuzz_check(m == n, "count depends on the buffer size");
    fuzz_check(memcmp(part, ids, (size_t)half * sizeof(*ids)) == 0 && part[half] == -7,
               "short buffer got other ids, or more than it holds");
out:
    free(part);
    free(back);
    free(ids);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *text = (const char *)data;
    size_t valid_len = unicode_valid_prefix(text, size), k;

    if (fuzz_tok == NULL)
        fuzz_load();
    fuzz_mode(text, size, valid_len == size, 0);
    fuzz_mode(text, size, valid_len == size, KLI_TOKENIZE_SPECIAL);

    /* A prefix of valid text, cut anywhere, streams out whole characters only. */
    for (k = 0; k <= valid_len && k <= 4096; k++) {
        size_t p = kli_utf8_complete_prefix(text, k);

        fuzz_check(p <= k && k - p <= 3, "complete_prefix held back too much");
        fuzz_check(unicode_valid_prefix(text, p) == p, "complete_prefix splits a character");
        fuzz_check(p == k || unicode_valid_prefix(text, k) != k,
                   "complete_prefix held back a complete text");
    }
    return 0;
}

#ifndef KLI_LIBFUZZER
static void
fuzz_cleanup(void)
{
    kli_tokenizer_close(fuzz_tok);
}
#endif
