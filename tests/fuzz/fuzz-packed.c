/*
 * fuzz-packed.c - libFuzzer target for the .kli parser (weights/packed.c: header, section
 * table, tokenizer lengths, tensor directory, expert groups).
 *
 * Build with -fsanitize=fuzzer,address -DKLI_LIBFUZZER for libFuzzer; without
 * KLI_LIBFUZZER a main() replays the files named on the command line (a corpus or crash
 * reproducers, e.g. a small .kli written by kli convert), so the target also builds with any
 * compiler.
 *
 * Every input is parsed twice: as it is, and "resealed": the file size, the section
 * checksums and the header checksum recomputed (kli-pack(5)), so that mutations reach the
 * structure behind the checksums instead of stopping at them. Besides "no crash", it checks
 * the parser's promises: on success every descriptor, group and text lies inside the input
 * and the texts are NUL-terminated; on failure nothing is added and a message is set.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "util.h"
#include "weights.h"
#define FUZZ_NAME "fuzz-packed"
#include "fuzz.h"

static int
inside(const uint8_t *base, size_t size, const void *p, uint64_t n)
{
    const uint8_t *q = p;

    return q >= base && (size_t)(q - base) <= size && n <= size - (size_t)(q - base);
}

/* Recomputes what the checksums and the size field would be for these bytes. */
static void
reseal(uint8_t *b, size_t size)
{
    uint64_t dir_off = 0, dir_size = 0;
    int have_dir = 0;

    if (size < 512)
        return;
    util_wr64(b + 24, size);
    for (int i = 0; i < 8; i++) {
        uint8_t *e = b + 64 + 32 * i;
        uint32_t kind = (uint32_t)e[0] | (uint32_t)e[1] << 8 | (uint32_t)e[2] << 16 |
                        (uint32_t)e[3] << 24;
        uint64_t off = util_rd64(e + 8), n = util_rd64(e + 16);

        if (kind < 1 || kind > 3 || off > size || n > size - off)
            continue;
        util_wr64(e + 24, xxh64(b + off, (size_t)n, 0));
        if (kind == 3) {
            dir_off = off;
            dir_size = n;
            have_dir = 1;
        }
    }
    /* DATA: the XXH64 of the per-tensor checksums, when the directory lets us find them. */
    if (have_dir && dir_size >= 32) {
        uint64_t nt = util_rd64(b + dir_off), trs = util_rd64(b + dir_off + 24) & 0xffffffffu;

        if (trs >= 128 && nt <= (dir_size - 32) / trs && nt < (1u << 20)) {
            uint8_t *sums = malloc((size_t)nt * 8 + 1);

            if (sums != NULL) {
                for (uint64_t t = 0; t < nt; t++)
                    memcpy(sums + t * 8, b + dir_off + 32 + t * trs + 104, 8);
                for (int i = 0; i < 8; i++) {
                    uint8_t *e = b + 64 + 32 * i;

                    if (e[0] == 4 && e[1] == 0 && e[2] == 0 && e[3] == 0)
                        util_wr64(e + 24, xxh64(sums, (size_t)nt * 8, 0));
                }
                free(sums);
            }
        }
    }
    util_wr64(b + 504, xxh64(b, 504, 0));
}

static void
fuzz_one(const uint8_t *data, size_t size)
{
    struct tensor_desc *descs = NULL;
    struct pack_info info;
    int64_t n = 0, cap = 0;
    struct kli_err err = {0};
    int rc;

    rc = k_pack_parse(data, size, "fuzz", 0, &descs, &n, &cap, &info, &err);
    if (rc != KLI_OK) {
        fuzz_check(n == 0 && err.code == rc && err.msg[0] != '\0', "failure without message");
        fuzz_check(info.groups == NULL && info.checksums == NULL, "failure left allocations");
        safetensors_free_descs(descs, n);
        return;
    }
    fuzz_check(err.code == 0, "success with an error set");
    fuzz_check(inside(data, size, info.config, info.config_len + 1) &&
               info.config[info.config_len] == '\0', "config outside the input");
    if (info.tok_ranks != NULL) {
        fuzz_check(inside(data, size, info.tok_ranks, info.tok_ranks_len + 1) &&
                   info.tok_ranks[info.tok_ranks_len] == '\0', "tokenizer outside the input");
    }
    if (info.tok_config != NULL) {
        fuzz_check(inside(data, size, info.tok_config, info.tok_config_len + 1) &&
                   info.tok_config[info.tok_config_len] == '\0', "tokenizer config outside");
    }
    for (int64_t i = 0; i < n; i++) {
        const struct tensor_desc *d = &descs[i];
        volatile uint8_t sink = 0;

        fuzz_check(d->name != NULL && d->name[0] != '\0', "empty name");
        fuzz_check(inside(data, size, d->data, d->nbytes), "tensor outside the input");
        fuzz_check(d->ndim >= 0 && d->ndim <= KLI_MAX_DIMS && d->numel >= 0, "bad shape");
        fuzz_check((int)d->dtype >= 0 && (int)d->dtype < KLI_DT_COUNT, "bad dtype");
        if (d->dtype != KLI_DT_OTHER)
            fuzz_check(dtype_nbytes(d->dtype, (uint64_t)d->numel) == d->nbytes,
                       "size does not match the shape");
        /* Touch the first and last byte: ASan checks the bounds for real. */
        if (d->nbytes > 0)
            sink ^= ((const uint8_t *)d->data)[0] ^ ((const uint8_t *)d->data)[d->nbytes - 1];
        (void)sink;
    }
    for (int64_t g = 0; g < info.n_groups; g++) {
        const struct tensor_group *G = &info.groups[g];

        fuzz_check(inside(data, size, G->data, G->size) && G->n > 0 && G->first >= 0 &&
                   G->first + G->n <= n, "group outside the input or the directory");
    }
    pack_info_free(&info);
    safetensors_free_descs(descs, n);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *copy;

    fuzz_one(data, size);
    copy = malloc(size > 0 ? size : 1);
    if (copy == NULL)
        return 0;
    if (size > 0)
        memcpy(copy, data, size);
    reseal(copy, size);
    fuzz_one(copy, size);
    free(copy);
    return 0;
}
