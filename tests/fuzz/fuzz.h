/*
 * fuzz.h - what every fuzz harness shares: the libFuzzer entry point's prototype, the
 * invariant check, and (without KLI_LIBFUZZER) the replay of files named on the command
 * line, which `make check` runs over tests/fuzz/corpus (tests/test-fuzz-corpus.sh).
 *
 * A harness defines FUZZ_NAME (its program name, for messages) before including this, and
 * FUZZ_CLEANUP too when it keeps state between inputs: then it defines fuzz_cleanup(), which
 * the replay's main() calls at the end (so that LeakSanitizer sees a clean exit).
 */
#ifndef KLI_FUZZ_H
#define KLI_FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* An invariant broken: crash on purpose so the fuzzer records the input. */
static void
fuzz_check(int cond, const char *what)
{
    if (!cond) {
        fprintf(stderr, FUZZ_NAME ": invariant broken: %s\n", what);
        abort();
    }
}

#ifdef FUZZ_TOKENIZER
/* The harnesses that need the tokenizer fixture define FUZZ_TOKENIZER (and include kli.h):
 * fuzz_tok is loaded once by fuzz_load, from $KLI_FUZZ_TOKENIZER_DIR or else
 * ./tests/data/tokenizer. */
static struct kli_tokenizer *fuzz_tok;

static void
fuzz_load(void)
{
    const char *dir = getenv("KLI_FUZZ_TOKENIZER_DIR");
    struct kli_err err = {0};

    if (dir == NULL)
        dir = "tests/data/tokenizer";
    if (kli_tokenizer_open(&fuzz_tok, dir, &err) != KLI_OK) {
        fprintf(stderr, FUZZ_NAME ": cannot load %s: %s\n", dir, err.msg);
        abort();
    }
}
#endif

#ifndef KLI_LIBFUZZER
/* Runs every file named in argv[1..] through the harness, each from a buffer of exactly its
 * size (so that a read past the end shows under ASan). @return 0, or 1 when a file cannot
 * be read. */
static int
fuzz_replay(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        uint8_t *buf = NULL, *exact;
        size_t len = 0, cap = 0, got;

        if (f == NULL) {
            fprintf(stderr, FUZZ_NAME ": cannot open %s\n", argv[i]);
            return 1;
        }
        do {
            if (len == cap) {
                uint8_t *p = realloc(buf, cap = cap ? 2 * cap : 4096);
                if (p == NULL) {
                    fprintf(stderr, FUZZ_NAME ": %s: out of memory\n", argv[i]);
                    free(buf);
                    fclose(f);
                    return 1;
                }
                buf = p;
            }
            got = fread(buf + len, 1, cap - len, f);
            len += got;
        } while (got > 0);
        if (ferror(f) || (exact = malloc(len > 0 ? len : 1)) == NULL) {
            fprintf(stderr, FUZZ_NAME ": cannot read %s\n", argv[i]);
            free(buf);
            fclose(f);
            return 1;
        }
        fclose(f);
        if (len > 0)
            memcpy(exact, buf, len);
        free(buf);
        LLVMFuzzerTestOneInput(exact, len);
        free(exact);
    }
    printf(FUZZ_NAME ": %d input(s) ok\n", argc - 1);
    return 0;
}

#ifdef FUZZ_CLEANUP
static void fuzz_cleanup(void);
#endif

int
main(int argc, char **argv)
{
    int rc = fuzz_replay(argc, argv);

#ifdef FUZZ_CLEANUP
    fuzz_cleanup();
#endif
    return rc;
}
#endif

#endif
