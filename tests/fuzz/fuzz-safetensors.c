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
#define FUZZ_NAME "fuzz-safetensors"
#include "fuzz.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct tensor_desc *descs = NULL;
    int64_t n = 0, cap = 0;
    struct kli_err err = {0};
    int rc;

    rc = safetensors_parse(data, size, "fuzz", 0, &descs, &n, &cap, &err);
    if (rc != KLI_OK) {
        fuzz_check(n == 0 && err.code == rc && err.msg[0] != '\0', "failure without message");
    } else {
        fuzz_check(err.code == 0, "success with an error set");
        for (int64_t i = 0; i < n; i++) {
            const struct tensor_desc *d = &descs[i];
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
    safetensors_free_descs(descs, n);
    return 0;
}
