/*
 * fuzz-serve-req.c - libFuzzer target for kli serve's request parser (src/serve_req.c): an
 * OpenAI chat or completions body to a scheduler request.
 *
 * Build with -fsanitize=fuzzer,address -DKLI_LIBFUZZER; without KLI_LIBFUZZER a main()
 * replays the files named on the command line. The first byte picks the endpoint (even:
 * chat, odd: completions), the rest is the body. The tokenizer is loaded once, from
 * $KLI_FUZZ_TOKENIZER_DIR or else ./tests/data/tokenizer. Besides "no crash", it checks the
 * parser's promises: a refusal carries a status (400, or 500 for memory) and a message, and
 * nothing is left allocated; an accepted request has a prompt of 1..max_prompt_tokens ids
 * inside the vocabulary, max_tokens within the limit, at most 16 non-empty stop strings,
 * include_usage only with stream, sampler settings the sampler takes, logit_bias ids inside
 * the vocabulary, and a grammar exactly when response_format asks for JSON.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "cli_oai.h"
#include "serve.h"
#define FUZZ_NAME "fuzz-serve-req"
#define FUZZ_CLEANUP
#include "fuzz.h"

static struct kli_tokenizer *fuzz_tok;

static void
fuzz_cleanup(void)
{
    kli_tokenizer_close(fuzz_tok);
    fuzz_tok = NULL;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct serve_limits lim;
    struct serve_req r;
    struct serve_err e;
    struct kli_sampler *smp = NULL;
    struct kli_err err = {0};

    if (fuzz_tok == NULL) {
        const char *dir = getenv("KLI_FUZZ_TOKENIZER_DIR");
        if (kli_tokenizer_open(&fuzz_tok, dir != NULL ? dir : "tests/data/tokenizer",
                               &err) != KLI_OK) {
            fprintf(stderr, FUZZ_NAME ": cannot load the tokenizer: %s\n", err.msg);
            abort();
        }
    }
    if (size < 1)
        return 0;
    memset(&lim, 0, sizeof(lim));
    kli_sampler_options_init(&lim.so);
    lim.max_tokens = 16;
    lim.max_tokens_limit = 64;
    lim.max_prompt_tokens = 512;
    lim.n_vocab = kli_tokenizer_n_vocab(fuzz_tok);
    enum serve_kind kind = data[0] & 1 ? SERVE_COMPLETION : SERVE_CHAT;
    if (serve_req_parse(&r, kind, (const char *)data + 1, size - 1, fuzz_tok, &lim, &e) != 0) {
        fuzz_check((e.status == 400 || e.status == 500) && e.msg[0] != '\0' &&
                   e.type != NULL, "a refusal without a status or a message");
        fuzz_check(r.toks == NULL && r.n_stop == 0 && r.grammar == NULL && r.bias_ids == NULL &&
                   r.schema == NULL, "a refusal that keeps memory");
        return 0;
    }
    fuzz_check(r.n >= 1 && r.n <= lim.max_prompt_tokens, "prompt length");
    for (int32_t i = 0; i < r.n; i++)
        fuzz_check(r.toks[i] >= 0 && r.toks[i] < kli_tokenizer_n_vocab(fuzz_tok), "token id");
    fuzz_check(r.max_tokens >= 1 && r.max_tokens <= lim.max_tokens_limit, "max_tokens");
    fuzz_check(r.n_stop >= 0 && r.n_stop <= SERVE_MAX_STOP, "stop count");
    for (int32_t i = 0; i < r.n_stop; i++)
        fuzz_check(r.stop[i] != NULL && r.stop[i][0] != '\0', "empty stop string");
    fuzz_check(!r.include_usage || r.stream, "include_usage without stream");
    fuzz_check(r.so.n_bias >= 0 && r.so.n_bias <= 1024, "logit_bias count");
    for (int32_t i = 0; i < r.so.n_bias; i++)
        fuzz_check(r.so.bias_ids[i] >= 0 && r.so.bias_ids[i] < lim.n_vocab &&
                   r.so.bias[i] >= -100 && r.so.bias[i] <= 100, "logit_bias member");
    fuzz_check((r.grammar != NULL) ==
                   (r.format == OAI_FMT_OBJECT || r.format == OAI_FMT_SCHEMA) && r.schema == NULL,
               "the grammar of response_format");
    fuzz_check(kli_sampler_create(&smp, &r.so, lim.n_vocab, &err) == KLI_OK,
               "sampler settings");
    kli_sampler_free(smp);
    serve_req_clear(&r);
    return 0;
}
