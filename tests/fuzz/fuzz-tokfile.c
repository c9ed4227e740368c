/*
 * fuzz-tokfile.c - libFuzzer target for the tokenizer's file parsers (src/tokenizer_load.c):
 * tiktoken.model (base64 token, rank per line) and tokenizer_config.json (the special
 * tokens), through tokenizer_open_mem, as a .kli file hands them over.
 *
 * Build with -fsanitize=fuzzer -DKLI_LIBFUZZER (configure --enable-fuzzing); without
 * KLI_LIBFUZZER a main() replays the files named on the command line.
 *
 * Input: byte 0 bit 0 set means "no tokenizer_config.json"; bytes 1..2 (little-endian,
 * modulo the rest's length + 1) are the length of tiktoken.model; the rest is
 * tiktoken.model then tokenizer_config.json. Besides "no crash", it checks that a failure
 * carries a message and that an accepted tokenizer encodes a short text into ids inside
 * its vocabulary and decodes them back to the text.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "tokenizer.h"
#define FUZZ_NAME "fuzz-tokfile"
#include "fuzz.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char text[] = "Hello, world! 12 ab\n\xc3\xa9t\xc3\xa9 <|im_end|>";
    struct kli_tokenizer *t = NULL;
    struct kli_err err = {0};
    kli_token ids[sizeof(text)];
    char back[sizeof(text)];
    size_t rest, rl;
    int rc;

    if (size < 3)
        return 0;
    rest = size - 3;
    rl = (size_t)(data[1] | data[2] << 8) % (rest + 1);
    rc = tokenizer_open_mem(&t, (const char *)data + 3, rl,
                            (data[0] & 1) ? NULL : (const char *)data + 3 + rl, rest - rl,
                            "fuzz", &err);
    if (rc != KLI_OK) {
        fuzz_check(t == NULL && err.code == rc && err.msg[0] != '\0',
                   "failure without a message");
        return 0;
    }
    fuzz_check(t != NULL && err.code == 0, "success with an error set");
    int32_t nv = kli_tokenizer_n_vocab(t);
    fuzz_check(nv >= kli_tokenizer_n_base(t) && kli_tokenizer_n_base(t) >= 0, "vocabulary");
    for (int flags = 0; flags < 2; flags++) {
        int64_t n = kli_tokenize(t, text, sizeof(text) - 1, flags, ids,
                                 (int64_t)(sizeof(ids) / sizeof(ids[0])), &err);
        /* a vocabulary may lack a byte the text needs: then it says so */
        if (n < 0) {
            fuzz_check(err.msg[0] != '\0', "tokenize failed without a message");
            memset(&err, 0, sizeof(err));
            continue;
        }
        fuzz_check(n <= (int64_t)sizeof(text) - 1, "more ids than bytes");
        for (int64_t i = 0; i < n; i++)
            fuzz_check(ids[i] >= 0 && ids[i] < nv, "id out of range");
        int64_t m = kli_detokenize(t, ids, n, back, (int64_t)sizeof(back), &err);
        fuzz_check(m == (int64_t)sizeof(text) - 1 && memcmp(back, text, (size_t)m) == 0,
                   "decoding does not give the text back");
    }
    kli_tokenizer_close(t);
    return 0;
}
