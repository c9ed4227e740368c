/*
 * fuzz-safetensors.c - libFuzzer target for the safetensors header parser.
 *
 * Build with -fsanitize=fuzzer,address -DKLI_LIBFUZZER for libFuzzer; without
 * KLI_LIBFUZZER a main() replays the files named on the command line (a corpus or crash
 * reproducers), so the target also builds with any compiler.
 *
 * Besides "no crash", it checks the parser's promises: on success every descriptor lies
 * inside the input and its size matches its shape; on failure nothing is added and a
 * message is set.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "weights.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* An invariant broken: crash on purpose so the fuzzer records the input. */
static void
fuzz_check(int cond, const char *what)
{
    if (!cond) {
        fprintf(stderr, "fuzz-safetensors: invariant broken: %s\n", what);
        abort();
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kli_tensor_desc *descs = NULL;
    int64_t n = 0, cap = 0;
    struct kli_err err = {0};
    int rc;

    rc = kli_safetensors_parse(data, size, "fuzz", 0, &descs, &n, &cap, &err);
    if (rc != KLI_OK) {
        fuzz_check(n == 0 && err.code == rc && err.msg[0] != '\0', "failure without message");
    } else {
        fuzz_check(err.code == 0, "success with an error set");
        for (int64_t i = 0; i < n; i++) {
            const struct kli_tensor_desc *d = &descs[i];
            const uint8_t *p = d->data;
            volatile uint8_t sink = 0;

            fuzz_check(d->name != NULL && d->name[0] != '\0', "empty name");
            fuzz_check(p >= data + 8 && d->nbytes <= size && (size_t)(p - data) <= size &&
                       d->nbytes <= size - (size_t)(p - data), "tensor outside the input");
            fuzz_check(d->ndim >= 0 && d->ndim <= KLI_MAX_DIMS && d->numel >= 0,
                       "bad shape");
            /* Touch the first and last byte: ASan checks the bounds for real. */
            if (d->nbytes > 0)
                sink ^= p[0] ^ p[d->nbytes - 1];
            (void)sink;
        }
    }
    kli_safetensors_free_descs(descs, n);
    return 0;
}

#ifndef KLI_LIBFUZZER
int
main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        uint8_t *buf = NULL;
        size_t len = 0, cap = 0, got;

        if (f == NULL) {
            fprintf(stderr, "%s: cannot open\n", argv[i]);
            return 1;
        }
        do {
            if (len == cap) {
                uint8_t *p;

                cap = cap ? cap * 2 : 4096;
                p = realloc(buf, cap);
                if (p == NULL) {
                    fprintf(stderr, "%s: out of memory\n", argv[i]);
                    free(buf);
                    fclose(f);
                    return 1;
                }
                buf = p;
            }
            got = fread(buf + len, 1, cap - len, f);
            len += got;
        } while (got > 0);
        fclose(f);
        {
            /* An exact-size copy, so that an over-read shows under ASan. */
            uint8_t *exact = malloc(len > 0 ? len : 1);

            if (exact == NULL) {
                fprintf(stderr, "%s: out of memory\n", argv[i]);
                free(buf);
                return 1;
            }
            if (len > 0)
                memcpy(exact, buf, len);
            free(buf);
            LLVMFuzzerTestOneInput(exact, len);
            free(exact);
        }
        printf("%s: ok (%zu bytes)\n", argv[i], len);
    }
    return 0;
}
#endif
