/*
 * fuzz-gguf.c - libFuzzer target for the GGUF reader (weights/gguf.c) and the Kimi Linear
 * view of a GGUF (weights/gguf_kimi.c).
 *
 * Build with -fsanitize=fuzzer,address -DKLI_LIBFUZZER for libFuzzer; without KLI_LIBFUZZER
 * a main() replays the files named on the command line (fuzz.h).
 *
 * Besides "no crash", it checks the parser's promises: on success every tensor lies inside
 * the input, at a multiple of the alignment past the data section's start, its size follows
 * from its type and shape, no two overlap, every string of a metadata array is readable; on
 * failure nothing is returned and a message is set. The view, run on what parses, must
 * likewise fail with a message or give descriptors inside the input or its own memory.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "kli.h"
#include "weights.h"
#define FUZZ_NAME "fuzz-gguf"
#include "fuzz.h"

static void
check_parsed(const struct gguf *g, const uint8_t *data, size_t size)
{
    volatile uint8_t sink = 0;

    /* a file without tensors may end before its (empty) data section's aligned start */
    fuzz_check(g->alignment > 0 && (g->alignment & (g->alignment - 1)) == 0 &&
               g->data_offset <= size && (g->n_t == 0 || g->data_offset % g->alignment == 0),
               "bad alignment or data offset");
    for (int64_t i = 0; i < g->n_kv; i++) {
        const struct gguf_kv *kv = &g->kv[i];
        const char *s;
        uint64_t len;
        fuzz_check(kv->key != NULL && kv->key[0] != '\0' && kv->type < GGUF_T_COUNT,
                   "bad key");
        if (kv->type == GGUF_T_ARRAY && kv->elem == GGUF_T_STRING) {
            for (uint64_t j = 0; j < kv->n; j++) {
                fuzz_check(gguf_arr_str(kv, j, &s, &len) == 0 &&
                           (const uint8_t *)s >= data && (const uint8_t *)s + len <=
                           data + size, "array string outside the input");
                if (len > 0)
                    sink ^= (uint8_t)(s[0] ^ s[len - 1]);
            }
        }
    }
    for (int64_t i = 0; i < g->n_t; i++) {
        const struct gguf_tensor *t = &g->t[i];
        uint32_t block, bytes;
        gguf_type_block(t->type, &block, &bytes);
        fuzz_check(block > 0 && t->ndim >= 1 && t->ndim <= GGUF_MAX_DIMS && t->numel >= 0 &&
                   t->ne[0] % block == 0 && t->nbytes == (uint64_t)t->numel / block * bytes,
                   "bad shape or size");
        fuzz_check(t->data == data + g->data_offset + t->offset && t->offset <= size &&
                   t->nbytes <= size - g->data_offset - t->offset,
                   "tensor outside the input");
        fuzz_check(t->offset % g->alignment == 0, "unaligned tensor");
        if (t->nbytes > 0)
            sink ^= t->data[0] ^ t->data[t->nbytes - 1];
        for (int64_t j = 0; j < i; j++) {
            const struct gguf_tensor *u = &g->t[j];
            fuzz_check(t->nbytes == 0 || u->nbytes == 0 || t->offset >= u->offset + u->nbytes ||
                       u->offset >= t->offset + t->nbytes, "overlapping tensors");
        }
    }
    (void)sink;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct gguf *g = NULL;
    struct kli_err err = {0};
    int rc = gguf_parse(data, size, "fuzz", &g, &err);

    if (rc != KLI_OK) {
        fuzz_check(g == NULL && err.code == rc && err.msg[0] != '\0', "failure without message");
        return 0;
    }
    fuzz_check(g != NULL && err.code == 0, "success with an error set");
    check_parsed(g, data, size);
    gguf_free(g);

    /* the view over the same bytes */
    struct tensor_desc *d = NULL;
    struct gguf_view *v = NULL;
    int64_t n = 0, cap = 0;
    memset(&err, 0, sizeof(err));
    rc = gguf_kimi_open(data, size, "fuzz", 0, &d, &n, &cap, &v, &err);
    if (rc != KLI_OK) {
        fuzz_check(v == NULL && n == 0 && err.msg[0] != '\0', "view failure without message");
    } else {
        const struct pack_meta *m = gguf_view_meta(v);
        fuzz_check(m != NULL && m->config != NULL && m->config_len > 0, "view without config");
        for (int64_t i = 0; i < n; i++) {
            volatile uint8_t sink = 0;
            const uint8_t *p = d[i].data;
            fuzz_check(d[i].name != NULL && d[i].ndim >= 0 && d[i].ndim <= KLI_MAX_DIMS,
                       "bad descriptor");
            if (d[i].nbytes > 0)
                sink ^= p[0] ^ p[d[i].nbytes - 1];
            (void)sink;
        }
    }
    safetensors_free_descs(d, n);
    gguf_view_free(v);
    return 0;
}
