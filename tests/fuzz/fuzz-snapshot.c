/*
 * fuzz-snapshot.c - libFuzzer target for the session snapshot reader (src/snapshot.c,
 * kli_session_restore), on the tiny test model.
 *
 * Build with -fsanitize=fuzzer -DKLI_LIBFUZZER (configure --enable-fuzzing); without
 * KLI_LIBFUZZER a main() replays the files named on the command line. The model is opened
 * once, from $KLI_FUZZ_MODEL_DIR or else ./tests/data/tiny-kimi-linear.
 *
 * Restore checks checksums before it parses, so random bytes would never get past them: an
 * input of 80 bytes or more with the snapshot magic is resealed first (the model's
 * fingerprint, the stored size and both checksums of the payload, then the header's own),
 * unless byte 60 (reserved) has bit 7 set, which keeps the input as it is. Besides "no
 * crash", it checks restore's promises: a failure carries a message and leaves the session
 * as it was; after a success the session holds the snapshot's token count, evaluates one
 * more token, and snapshots back to a restore that succeeds.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kli.h"
#define FUZZ_NAME "fuzz-snapshot"
#define FUZZ_CLEANUP
#include "fuzz.h"

static struct kli_model *fuzz_model;
static struct kli_session *fuzz_sess;
static struct kli_sampler *fuzz_smp;
static uint8_t *fuzz_base;     /* a snapshot of 3 tokens: the state before every input */
static int64_t fuzz_base_len;

static void
fuzz_load(void)
{
    const char *dir = getenv("KLI_FUZZ_MODEL_DIR");
    struct kli_model_options mo;
    struct kli_session_options so;
    struct kli_err err = {0};

    if (dir == NULL)
        dir = "tests/data/tiny-kimi-linear";
    kli_model_options_init(&mo);
    mo.n_threads = 1;
    kli_session_options_init(&so);
    so.ctx_max = 64;
    if (kli_model_open(&fuzz_model, dir, &mo, &err) != KLI_OK ||
        kli_session_create(&fuzz_sess, fuzz_model, &so, &err) != KLI_OK ||
        kli_sampler_create(&fuzz_smp, NULL, kli_model_n_vocab(fuzz_model), &err) != KLI_OK) {
        fprintf(stderr, "fuzz-snapshot: cannot load %s: %s\n", dir, err.msg);
        abort();
    }
    static const kli_token three[3] = {1, 2, 3};
    fuzz_check(kli_session_eval(fuzz_sess, three, 3, NULL, &err) == KLI_OK, "eval");
    fuzz_base_len = kli_session_snapshot(fuzz_sess, NULL, NULL, 0, &err);
    fuzz_base = fuzz_base_len > 0 ? malloc((size_t)fuzz_base_len) : NULL;
    fuzz_check(fuzz_base != NULL && kli_session_snapshot(fuzz_sess, NULL, fuzz_base,
               fuzz_base_len, &err) == fuzz_base_len, "snapshot");
}

/* The reader's checksum: FNV-1a 64 over 32-bit little-endian words, a last partial word
 * zero-padded (snapshot.c, snap_hash). */
static uint64_t
fuzz_hash(const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;

    for (size_t i = 0; i < n; i += 4) {
        uint8_t w[4] = {0, 0, 0, 0};
        memcpy(w, p + i, n - i < 4 ? n - i : 4);
        h = (h ^ ((uint32_t)w[0] | (uint32_t)w[1] << 8 | (uint32_t)w[2] << 16 |
                  (uint32_t)w[3] << 24)) * 0x100000001b3ull;
    }
    return h;
}

static void
fuzz_put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kli_err err = {0};
    uint8_t *b;
    int rc;

    if (fuzz_model == NULL)
        fuzz_load();
    b = malloc(size > 0 ? size : 1);
    fuzz_check(b != NULL, "out of memory");
    if (size > 0)
        memcpy(b, data, size);
    if (size >= 80 && memcmp(b, "KLISNAP", 8) == 0 && (b[60] & 0x80) == 0) {
        uint32_t flags = (uint32_t)b[12] | (uint32_t)b[13] << 8;
        fuzz_put64(b + 16, kli_model_fingerprint(fuzz_model));
        fuzz_put64(b + 32, size - 80);
        fuzz_put64(b + 48, fuzz_hash(b + 80, size - 80));
        if ((flags & 1) == 0)   /* stored as is: the payload checksum is the same sum */
            fuzz_put64(b + 40, fuzz_hash(b + 80, size - 80));
        fuzz_put64(b + 72, fuzz_hash(b, 72));
    }
    /* a known state to compare with after a failure (restoring it costs less than
     * evaluating it again) */
    fuzz_check(kli_session_restore(fuzz_sess, NULL, fuzz_base, (size_t)fuzz_base_len,
                                   &err) == KLI_OK, "restore of the base state");
    uint8_t *again = malloc((size_t)fuzz_base_len);
    fuzz_check(again != NULL, "out of memory");

    rc = kli_session_restore(fuzz_sess, fuzz_smp, b, size, &err);
    if (rc != KLI_OK) {
        fuzz_check(err.code == rc && err.msg[0] != '\0', "failure without a message");
        fuzz_check(kli_session_snapshot(fuzz_sess, NULL, again, fuzz_base_len, &err) ==
                   fuzz_base_len && memcmp(fuzz_base, again, (size_t)fuzz_base_len) == 0,
                   "a failed restore changed the session");
    } else {
        int32_t pos = kli_session_pos(fuzz_sess);
        fuzz_check(pos >= 0 && pos <= kli_session_ctx_max(fuzz_sess), "token count");
        if (pos < kli_session_ctx_max(fuzz_sess)) {
            kli_token one = 5;
            fuzz_check(kli_session_eval(fuzz_sess, &one, 1, NULL, &err) == KLI_OK,
                       "eval after a restore");
        }
        int64_t n = kli_session_snapshot(fuzz_sess, fuzz_smp, NULL, 0, &err);
        uint8_t *out = n > 0 ? malloc((size_t)n) : NULL;
        fuzz_check(out != NULL && kli_session_snapshot(fuzz_sess, fuzz_smp, out, n, &err) == n,
                   "snapshot after a restore");
        fuzz_check(kli_session_restore(fuzz_sess, fuzz_smp, out, (size_t)n, &err) == KLI_OK,
                   "a snapshot of a restored session does not restore");
        free(out);
    }
    free(again);
    free(b);
    return 0;
}

#ifndef KLI_LIBFUZZER
static void
fuzz_cleanup(void)
{
    free(fuzz_base);
    kli_sampler_free(fuzz_smp);
    kli_session_free(fuzz_sess);
    kli_model_close(fuzz_model);
}
#endif
