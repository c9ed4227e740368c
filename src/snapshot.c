/*
 * snapshot.c - a session's complete state to bytes and back: snapshots in memory and in
 * files, restore, and fork.
 *
 * A snapshot holds everything the next token depends on: the KDA recurrent and conv states,
 * the MLA latent cache rows [0,pos), the token history, the logits of the last position and,
 * optionally, the sampler's random stream and recent tokens. Restoring it and generating
 * gives the same tokens and the same logits, bit for bit, as generating without the
 * interruption (the same model, thread count and kernels doing the same arithmetic).
 *
 * Format, version 1. Integers and floats are little-endian; every field is a whole number of
 * 4-byte words, so the checksum can run over words.
 *
 *   header, 80 bytes (later versions keep the magic, the version and the header checksum
 *   where they are, so that a reader can always tell damage from a newer format):
 *      0  magic "KLISNAP\0"
 *      8  u32 format version (1)
 *     12  u32 flags: bit 0 the payload is stored as one zstd frame (else as is),
 *                    bit 1 the payload ends with sampler state
 *     16  u64 model fingerprint (struct kli_model .fingerprint)
 *     24  u64 payload size, uncompressed
 *     32  u64 stored size: the bytes that follow the header
 *     40  u64 payload checksum: snap_hash of the uncompressed payload
 *     48  u64 stored checksum: snap_hash of the stored bytes (the last word zero-padded), so
 *         that any damage is caught before decompression
 *     56  u32 tokens in the session (pos)
 *     60  u32 MLA cache type: enum kli_cache_type (0 f32, 1 bf16, 2 q8_0); 0 in the
 *         snapshots of kli before cache types, which held the field reserved
 *     64  u64 reserved, 0
 *     72  u64 header checksum: snap_hash of bytes [0,72)
 *
 *   payload:
 *     u32 n_layers, n_vocab, kda n_heads, kda head_dim, kda conv_size, MLA row (latent+rope)
 *     i32 pos, ctx_max, batch_max (the options of the session saved), has_logits (0 or 1)
 *     u32 mixer[n_layers]                      1 = KDA, 2 = MLA
 *     i32 tokens[pos]                          the history
 *     per layer, in order:
 *       KDA: f32 S[H][K][K], f32 conv[3][H*K][W-1]
 *       MLA: cache[pos] rows of latent+rope values as the cache type stores them
 *            (mla_row_bytes: f32, bf16, or q8_0 blocks of an f16 scale and 32 int8)
 *     f32 logits[n_vocab]                      when has_logits
 *     sampler (flag bit 1):
 *       u32 n_vocab
 *       f32 temperature, i32 top_k, f32 top_p, f32 min_p, f32 repeat_penalty,
 *       f32 presence_penalty, f32 frequency_penalty, i32 penalty_last_n, u64 seed
 *       u64 rng, i32 n_recent, i32 recent[n_recent] oldest first
 *
 * Restore checks the header, the model, the sizes and both checksums (zstd's own frame
 * checksum too) and decodes the whole payload into temporary memory before it touches the
 * session, so a damaged or foreign snapshot is refused and the session stays as it was.
 * A cache saved as another type than the session's is converted row by row, through float
 * (exact when widening; narrowing rounds as writing the rows would have).
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef HAVE_ZSTD
#include <zstd.h>
#endif

#include "backend.h"
#include "internal.h"
#include "mla.h"
#include "sampler.h"
#include "session.h"
#include "util.h"

enum {
    SNAP_VERSION = 1,
    SNAP_HEADER = 80,
    SNAP_HEADER_SUM = 72,      /* offset of the header checksum */
    SNAP_F_ZSTD = 1,
    SNAP_F_SAMPLER = 2,
    SNAP_STAGE = 1 << 16,      /* small writes are gathered into blocks of this size */
    SNAP_SAMPLER_FIXED = 56,   /* bytes of sampler state before the recent tokens */
    SNAP_MAX_RECENT = 1 << 24, /* kli_sampler_create's limit on penalty_last_n */
};

/* zstd level 1: the payload is mostly float state, which no level compresses much, and
 * saving a long context should take about as long as writing it. */
#define SNAP_ZSTD_LEVEL 1

static const char snap_magic[8] = {'K', 'L', 'I', 'S', 'N', 'A', 'P', '\0'};

/* ==== Encoding helpers ====================================================================== */

/* FNV-1a 64 over 32-bit little-endian words: every single-word change is detected (each step
 * h -> (h ^ w) * prime is a bijection of h), and it runs at a word per multiply. `n` is a
 * multiple of 4. */
static uint64_t
snap_hash(uint64_t h, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i + 4 <= n; i += 4)
        h = (h ^ util_rd32(p + i)) * UTIL_FNV_PRIME;
    return h;
}

#define SNAP_HASH_BASIS UTIL_FNV_BASIS

/* snap_hash over bytes that arrive in pieces of any length: whole words are hashed as they
 * complete, and a final partial word is zero-padded. */
struct snap_hasher {
    uint64_t h;
    uint8_t carry[4];
    size_t nc;
};

static void
snap_hasher_add(struct snap_hasher *x, const uint8_t *p, size_t n)
{
    if (x->nc > 0) {
        while (x->nc < 4 && n > 0) {
            x->carry[x->nc++] = *p++;
            n--;
        }
        if (x->nc < 4)
            return;
        x->h = snap_hash(x->h, x->carry, 4);
        x->nc = 0;
    }
    size_t whole = n & ~(size_t)3;
    x->h = snap_hash(x->h, p, whole);
    memcpy(x->carry, p + whole, n - whole);
    x->nc = n - whole;
}

static uint64_t
snap_hasher_end(struct snap_hasher *x)
{
    if (x->nc > 0) {
        memset(x->carry + x->nc, 0, 4 - x->nc);
        x->h = snap_hash(x->h, x->carry, 4);
        x->nc = 0;
    }
    return x->h;
}

/* Copies n 32-bit little-endian words (floats or ints) from the payload to memory. */
static void
snap_copy32(void *dst, const uint8_t *src, int64_t n)
{
    if (util_host_le()) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    uint32_t *d = dst;
    for (int64_t i = 0; i < n; i++)
        d[i] = util_rd32(src + 4 * i);
}

/* ==== Sizes ================================================================================= */

/* Bytes of the state in a payload after its fixed fields, with `pos` tokens: every state
 * entry of the session's table (session.h) in its order (the token history, each layer's
 * state, then the logits when has_logits). */
/* Whether state entry e is an MLA cache (floats growing with the context). */
static int
snap_is_cache(const struct sess_buf *e)
{
    return e->f != NULL && e->per_tok > 0;
}

static uint64_t
snap_body_bytes(const struct kli_session *s, int64_t pos, int has_logits, enum k_dtype cdt)
{
    uint64_t n = 0;

    for (int k = 0; k < s->n_state; k++) {
        const struct sess_buf *e = &s->buf[k];
        if ((e->flags & SESS_LOGITS) && !has_logits)
            continue;
        if (snap_is_cache(e))
            n += (uint64_t)mla_row_bytes(&s->m->cfg, cdt) * (uint64_t)pos;
        else
            n += 4 * (uint64_t)session_state_words(e, pos);
    }
    return n;
}

/* Payload bytes without the sampler part, the MLA caches stored as cdt. */
static uint64_t
snap_state_bytes(const struct kli_session *s, int64_t pos, int has_logits, enum k_dtype cdt)
{
    return 4 * (10 + (uint64_t)s->m->cfg.n_layers) + snap_body_bytes(s, pos, has_logits, cdt);
}

/* ==== Writing =============================================================================== */

/* The payload on its way out: hashed, gathered into blocks, compressed (or not) and written
 * to memory (bytes past `cap` are counted but dropped: the kli_tokenize protocol) or a file. */
struct snap_enc {
    uint8_t *buf;               /* memory output: the whole snapshot, header first */
    size_t cap;
    FILE *fp;                   /* file output, positioned after the header */
    const char *path;           /* for messages */
    uint64_t stored;            /* bytes produced after the header */
    struct snap_hasher sh;      /* their checksum */
    uint64_t hash, n;           /* checksum and size of the payload so far */
    uint8_t *stage;             /* [SNAP_STAGE] */
    size_t n_stage;
    int rc;                     /* the first error, already in err */
    struct kli_err *err;
#ifdef HAVE_ZSTD
    ZSTD_CCtx *cctx;            /* NULL: stored as is */
    uint8_t *zout;              /* [zcap] compressed bytes on their way out */
    size_t zcap;
#endif
};

static void
snap_emit(struct snap_enc *e, const void *p, size_t n)
{
    if (e->rc != KLI_OK || n == 0)
        return;
    if (e->fp != NULL) {
        if (fwrite(p, 1, n, e->fp) != n)
            e->rc = err_set(e->err, KLI_E_IO, "%s: write error: %s", e->path,
                                strerror(errno));
    } else if (e->buf != NULL && SNAP_HEADER + e->stored < e->cap) {
        size_t room = e->cap - SNAP_HEADER - (size_t)e->stored;
        memcpy(e->buf + SNAP_HEADER + e->stored, p, n < room ? n : room);
    }
    snap_hasher_add(&e->sh, p, n);
    e->stored += n;
}

/* Passes payload bytes on: compressed, or as they are. `end` closes the zstd frame. */
static void
snap_feed(struct snap_enc *e, const void *p, size_t n, int end)
{
    if (e->rc != KLI_OK)
        return;
#ifdef HAVE_ZSTD
    if (e->cctx != NULL) {
        ZSTD_inBuffer in = {p, n, 0};
        ZSTD_EndDirective mode = end ? ZSTD_e_end : ZSTD_e_continue;
        for (;;) {
            ZSTD_outBuffer out = {e->zout, e->zcap, 0};
            size_t r = ZSTD_compressStream2(e->cctx, &out, &in, mode);
            if (ZSTD_isError(r)) {
                e->rc = err_set(e->err, KLI_E_NOMEM, "snapshot: zstd compression failed: "
                                    "%s", ZSTD_getErrorName(r));
                return;
            }
            snap_emit(e, e->zout, out.pos);
            if (e->rc != KLI_OK || (end ? r == 0 : in.pos == in.size))
                return;
        }
    }
#endif
    (void)end;
    snap_emit(e, p, n);
}

static void
snap_flush(struct snap_enc *e)
{
    snap_feed(e, e->stage, e->n_stage, 0);
    e->n_stage = 0;
}

/* Appends n bytes (little-endian words) to the payload. */
static void
snap_put(struct snap_enc *e, const void *p, size_t n)
{
    KLI_ASSERT(n % 4 == 0);
    e->hash = snap_hash(e->hash, p, n);
    e->n += n;
    if (e->n_stage + n > SNAP_STAGE)
        snap_flush(e);
    if (n < SNAP_STAGE) {
        memcpy(e->stage + e->n_stage, p, n);
        e->n_stage += n;
    } else {
        snap_feed(e, p, n, 0);
    }
}

static void
snap_put32(struct snap_enc *e, uint32_t v)
{
    uint8_t b[4];

    util_wr32(b, v);
    snap_put(e, b, 4);
}

static void
snap_put64(struct snap_enc *e, uint64_t v)
{
    uint8_t b[8];

    util_wr64(b, v);
    snap_put(e, b, 8);
}

static void
snap_putf(struct snap_enc *e, float f)
{
    uint32_t u;

    memcpy(&u, &f, 4);
    snap_put32(e, u);
}

/* n 32-bit values (floats or ints) from memory. */
static void
snap_put_words(struct snap_enc *e, const void *p, int64_t n)
{
    if (util_host_le()) {
        snap_put(e, p, (size_t)n * 4);
        return;
    }
    const uint32_t *w = p;
    for (int64_t i = 0; i < n; i++)
        snap_put32(e, w[i]);
}

static uint64_t
snap_payload_bytes(const struct kli_session *s, const struct kli_sampler *smp)
{
    uint64_t n = snap_state_bytes(s, s->pos, s->has_logits, s->mla_sc.cache_dt);

    if (smp != NULL)
        n += SNAP_SAMPLER_FIXED + 4 * (uint64_t)sampler_state(smp).n_recent;
    return n;
}

static void
snap_put_payload(struct snap_enc *e, const struct kli_session *s, const struct kli_sampler *smp)
{
    const struct k_config *c = &s->m->cfg;

    snap_put32(e, (uint32_t)c->n_layers);
    snap_put32(e, (uint32_t)c->n_vocab);
    snap_put32(e, (uint32_t)c->kda.n_heads);
    snap_put32(e, (uint32_t)c->kda.head_dim);
    snap_put32(e, (uint32_t)c->kda.conv_size);
    snap_put32(e, (uint32_t)mla_row_floats(c));
    snap_put32(e, (uint32_t)s->pos);
    snap_put32(e, (uint32_t)s->ctx_max);
    snap_put32(e, (uint32_t)s->batch_max);
    snap_put32(e, s->has_logits ? 1 : 0);
    for (int i = 0; i < c->n_layers; i++)
        snap_put32(e, (uint32_t)c->layer_mixer[i]);
    /* the history, every layer's state and the logits: the session's state entries */
    for (int k = 0; k < s->n_state; k++) {
        const struct sess_buf *b = &s->buf[k];
        if ((b->flags & SESS_LOGITS) && !s->has_logits)
            continue;
        snap_put_words(e, session_buf_ptr(b), session_state_words(b, s->pos));
    }
    if (smp != NULL) {
        struct sampler_state st = sampler_state(smp);
        const struct kli_sampler_options *o = st.o;
        snap_put32(e, (uint32_t)st.n_vocab);
        snap_putf(e, o->temperature);
        snap_put32(e, (uint32_t)o->top_k);
        snap_putf(e, o->top_p);
        snap_putf(e, o->min_p);
        snap_putf(e, o->repeat_penalty);
        snap_putf(e, o->presence_penalty);
        snap_putf(e, o->frequency_penalty);
        snap_put32(e, (uint32_t)o->penalty_last_n);
        snap_put64(e, o->seed);
        snap_put64(e, st.rng);
        snap_put32(e, (uint32_t)st.n_recent);
        for (int32_t i = 0; i < st.n_recent; i++)
            snap_put32(e, (uint32_t)sampler_recent(smp, i));
    }
}

/* Encodes the payload into e (memory or file, positioned after the header) and fills `hdr`.
 * @return KLI_OK or the first error. */
static int
snap_encode(struct snap_enc *e, const struct kli_session *s, const struct kli_sampler *smp,
            uint8_t hdr[SNAP_HEADER])
{
    uint64_t size = snap_payload_bytes(s, smp);
    uint32_t flags = smp != NULL ? SNAP_F_SAMPLER : 0;

    if (s->broken)
        return err_set(e->err, KLI_E_INVALID, "the session's state is incomplete after a "
                           "failed step: nothing to save");

    e->hash = SNAP_HASH_BASIS;
    e->sh.h = SNAP_HASH_BASIS;
    e->stage = k_malloc(SNAP_STAGE);
    if (e->stage == NULL)
        return err_set(e->err, KLI_E_NOMEM, "out of memory writing a snapshot");
#ifdef HAVE_ZSTD
    e->zcap = ZSTD_CStreamOutSize();
    e->cctx = ZSTD_createCCtx();
    e->zout = k_malloc(e->zcap);
    if (e->cctx == NULL || e->zout == NULL) {
        e->rc = err_set(e->err, KLI_E_NOMEM, "out of memory writing a snapshot");
        goto out;
    }
    /* The frame records the content size and its own checksum (XXH64, 32 bits kept). */
    if (ZSTD_isError(ZSTD_CCtx_setParameter(e->cctx, ZSTD_c_compressionLevel,
                                            SNAP_ZSTD_LEVEL)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(e->cctx, ZSTD_c_checksumFlag, 1)) ||
        ZSTD_isError(ZSTD_CCtx_setPledgedSrcSize(e->cctx, size))) {
        e->rc = err_set(e->err, KLI_E_UNSUPPORTED, "snapshot: zstd refused the frame "
                            "parameters");
        goto out;
    }
    flags |= SNAP_F_ZSTD;
#endif
    snap_put_payload(e, s, smp);
    snap_flush(e);
    snap_feed(e, NULL, 0, 1);
    if (e->rc == KLI_OK) {
        KLI_ASSERT(e->n == size);
        memset(hdr, 0, SNAP_HEADER);
        memcpy(hdr, snap_magic, 8);
        util_wr32(hdr + 8, SNAP_VERSION);
        util_wr32(hdr + 12, flags);
        util_wr64(hdr + 16, s->m->fingerprint);
        util_wr64(hdr + 24, size);
        util_wr64(hdr + 32, e->stored);
        util_wr64(hdr + 40, e->hash);
        util_wr64(hdr + 48, snap_hasher_end(&e->sh));
        util_wr32(hdr + 56, (uint32_t)s->pos);
        util_wr32(hdr + 60, (uint32_t)s->cache_type);
        util_wr64(hdr + SNAP_HEADER_SUM, snap_hash(SNAP_HASH_BASIS, hdr, SNAP_HEADER_SUM));
    }
#ifdef HAVE_ZSTD
out:
    ZSTD_freeCCtx(e->cctx);
    free(e->zout);
#endif
    free(e->stage);
    return e->rc;
}

int64_t
kli_session_snapshot(const struct kli_session *s, const struct kli_sampler *smp, void *buf,
                     int64_t cap, struct kli_err *err)
{
    struct snap_enc e;
    uint8_t hdr[SNAP_HEADER];
    int rc;

    if (s == NULL || cap < 0 || (buf == NULL && cap > 0))
        return err_set(err, KLI_E_INVALID, "kli_session_snapshot: invalid arguments");
    /* the KDA states may lead on the GPU (logically const: the host copy catches up) */
    if ((rc = backend_sess_pull((struct kli_session *)s, err)) != KLI_OK)
        return rc;
    memset(&e, 0, sizeof(e));
    e.buf = buf;
    e.cap = (uint64_t)cap > SIZE_MAX ? SIZE_MAX : (size_t)cap;
    e.err = err;
    if ((rc = snap_encode(&e, s, smp, hdr)) != KLI_OK)
        return rc;
    if (buf != NULL)
        memcpy(buf, hdr, e.cap < SNAP_HEADER ? e.cap : SNAP_HEADER);
    return (int64_t)(SNAP_HEADER + e.stored);
}

int
kli_session_save(const struct kli_session *s, const struct kli_sampler *smp, const char *path,
                 struct kli_err *err)
{
    struct snap_enc e;
    uint8_t hdr[SNAP_HEADER] = {0};
    struct kli_outfile *of = NULL;
    FILE *fp = NULL;
    int rc;

    if (s == NULL || path == NULL)
        return err_set(err, KLI_E_INVALID, "kli_session_save: NULL argument");
    if ((rc = backend_sess_pull((struct kli_session *)s, err)) != KLI_OK)
        return rc;
    if ((rc = kli_outfile_open(&of, path, 0, err)) != KLI_OK)
        return rc;
    int fd = dup(kli_outfile_fd(of));
    if (fd < 0 || (fp = fdopen(fd, "wb")) == NULL) {
        rc = err_set(err, KLI_E_IO, "%s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        goto fail;
    }
    /* The header needs the checksum and sizes: a placeholder now, the real one at the end. */
    if (fwrite(hdr, 1, SNAP_HEADER, fp) != SNAP_HEADER) {
        rc = err_set(err, KLI_E_IO, "%s: write error: %s", path, strerror(errno));
        goto fail;
    }
    memset(&e, 0, sizeof(e));
    e.fp = fp;
    e.path = path;
    e.err = err;
    if ((rc = snap_encode(&e, s, smp, hdr)) != KLI_OK)
        goto fail;
    if (fseek(fp, 0, SEEK_SET) != 0 || fwrite(hdr, 1, SNAP_HEADER, fp) != SNAP_HEADER ||
        fflush(fp) != 0) {
        rc = err_set(err, KLI_E_IO, "%s: write error: %s", path, strerror(errno));
        goto fail;
    }
    rc = fclose(fp);
    fp = NULL;
    if (rc != 0) {
        rc = err_set(err, KLI_E_IO, "%s: write error: %s", path, strerror(errno));
        goto fail;
    }
    rc = kli_outfile_commit(of, err);
    of = NULL;
    return rc;
fail:
    if (fp != NULL)
        fclose(fp);
    kli_outfile_abort(of);
    return rc;
}

/* ==== Reading =============================================================================== */

/* A bounds-checked cursor over the decoded payload; the first overrun sticks. */
struct snap_cur {
    const uint8_t *p;
    uint64_t n, off;
    int bad;
};

static const uint8_t *
snap_take(struct snap_cur *c, uint64_t bytes)
{
    if (c->bad || bytes > c->n - c->off) {
        c->bad = 1;
        return NULL;
    }
    const uint8_t *p = c->p + c->off;
    c->off += bytes;
    return p;
}

static uint32_t
snap_get32(struct snap_cur *c)
{
    const uint8_t *p = snap_take(c, 4);

    return p != NULL ? util_rd32(p) : 0;
}

static uint64_t
snap_get64(struct snap_cur *c)
{
    const uint8_t *p = snap_take(c, 8);

    return p != NULL ? util_rd64(p) : 0;
}

/* What a validated payload holds: pointers into it, and the recent tokens decoded. */
struct snap_view {
    int32_t pos, has_logits;
    enum k_dtype cache_dt;    /* of the MLA caches in the snapshot */
    const uint8_t *tokens;    /* [pos] i32, then every layer's state and the logits: the
                                 session's state entries in order (snap_body_bytes) */
    int has_sampler;
    uint64_t rng;
    int32_t n_recent;
    kli_token *recent;        /* [n_recent], owned */
};

/* Checks a payload of `n` bytes against the session's model and fills `v`. Touches nothing
 * else. @return KLI_OK, KLI_E_FORMAT, KLI_E_RANGE (recent tokens outside smp's vocabulary)
 * or KLI_E_NOMEM. */
static int
snap_parse(const uint8_t *p, uint64_t n, uint32_t hdr_pos, int has_sampler,
           const struct kli_session *s, const struct kli_sampler *smp, struct snap_view *v,
           struct kli_err *err)
{
    const struct k_config *c = &s->m->cfg;
    struct snap_cur cur = {p, n, 0, 0};
    uint32_t dims[6], want[6] = {
        (uint32_t)c->n_layers, (uint32_t)c->n_vocab, (uint32_t)c->kda.n_heads,
        (uint32_t)c->kda.head_dim, (uint32_t)c->kda.conv_size,
        (uint32_t)mla_row_floats(c),
    };
    static const char *const dim_names[6] = {
        "layer count", "vocabulary size", "KDA head count", "KDA head size",
        "KDA convolution size", "MLA cache row size",
    };

    enum k_dtype cdt = v->cache_dt;

    memset(v, 0, sizeof(*v));
    v->cache_dt = cdt;
    for (int i = 0; i < 6; i++) {
        dims[i] = snap_get32(&cur);
        if (!cur.bad && dims[i] != want[i])
            return err_set(err, KLI_E_FORMAT, "snapshot: %s %u, but the model's is %u",
                               dim_names[i], dims[i], want[i]);
    }
    v->pos = (int32_t)snap_get32(&cur);
    snap_get32(&cur);   /* ctx_max and batch_max of the saved session: informational */
    snap_get32(&cur);
    uint32_t hl = snap_get32(&cur);
    if (cur.bad)
        return err_set(err, KLI_E_FORMAT, "snapshot: payload too short");
    if ((uint32_t)v->pos != hdr_pos || hl > 1)
        return err_set(err, KLI_E_FORMAT, "snapshot: payload disagrees with its header "
                           "(pos %u vs %u, has_logits %u)", (uint32_t)v->pos, hdr_pos, hl);
    v->has_logits = (int32_t)hl;
    for (int i = 0; i < c->n_layers; i++) {
        uint32_t mixer = snap_get32(&cur);
        if (!cur.bad && mixer != (uint32_t)c->layer_mixer[i])
            return err_set(err, KLI_E_FORMAT, "snapshot: layer %d has mixer kind %u, but "
                               "the model's is %d", i, mixer, (int)c->layer_mixer[i]);
    }
    v->tokens = snap_take(&cur, 4 * (uint64_t)v->pos);
    for (int32_t i = 0; v->tokens != NULL && i < v->pos; i++) {
        uint32_t t = util_rd32(v->tokens + 4 * (uint64_t)i);
        if (t >= (uint32_t)c->n_vocab)
            return err_set(err, KLI_E_FORMAT, "snapshot: token %u at position %d is outside "
                               "the vocabulary", t, i);
    }
    snap_take(&cur, snap_body_bytes(s, v->pos, v->has_logits, cdt) - 4 * (uint64_t)v->pos);
    if (cur.bad)
        return err_set(err, KLI_E_FORMAT, "snapshot: payload too short for %d tokens",
                           v->pos);
    if (has_sampler) {
        uint32_t sv = snap_get32(&cur);
        snap_take(&cur, 40);   /* the options, kept for information */
        v->rng = snap_get64(&cur);
        uint32_t nr = snap_get32(&cur);
        if (cur.bad)
            return err_set(err, KLI_E_FORMAT, "snapshot: payload too short for the sampler "
                               "state");
        if (sv == 0 || v->rng == 0 || nr > SNAP_MAX_RECENT)
            return err_set(err, KLI_E_FORMAT, "snapshot: invalid sampler state");
        const uint8_t *rp = snap_take(&cur, 4 * (uint64_t)nr);
        if (rp == NULL)
            return err_set(err, KLI_E_FORMAT, "snapshot: payload too short for %u recent "
                               "tokens", nr);
        v->recent = k_mallocarray((size_t)nr + 1, sizeof(kli_token));
        if (v->recent == NULL)
            return err_set(err, KLI_E_NOMEM, "out of memory reading a snapshot");
        v->n_recent = (int32_t)nr;
        v->has_sampler = 1;
        snap_copy32(v->recent, rp, nr);
        for (uint32_t i = 0; i < nr; i++) {
            if ((uint32_t)v->recent[i] >= sv)
                return err_set(err, KLI_E_FORMAT, "snapshot: recent token %d is outside the "
                                   "saved sampler's vocabulary", v->recent[i]);
            if (smp != NULL && v->recent[i] >= sampler_state(smp).n_vocab)
                return err_set(err, KLI_E_RANGE, "snapshot: recent token %d is outside "
                                   "the vocabulary of %d of the sampler restored into",
                                   v->recent[i], sampler_state(smp).n_vocab);
        }
    }
    if (cur.off != n)
        return err_set(err, KLI_E_FORMAT, "snapshot: %llu unexpected bytes at the end of "
                           "the payload", (unsigned long long)(n - cur.off));
    return KLI_OK;
}

/* Copies a validated view into the session and sampler. Cannot fail. A cache saved as
 * another type is converted row by row through float (`row`: room for a saved row and a
 * float one, when the types differ). */
static void
snap_apply(struct kli_session *s, struct kli_sampler *smp, const struct snap_view *v,
           uint8_t *row)
{
    const struct k_config *c = &s->m->cfg;
    enum k_dtype to = s->mla_sc.cache_dt;
    int64_t rb = mla_row_bytes(c, v->cache_dt), rt = mla_row_bytes(c, to);
    const uint8_t *p = v->tokens;

    for (int k = 0; k < s->n_state; k++) {
        const struct sess_buf *e = &s->buf[k];
        if ((e->flags & SESS_LOGITS) && !v->has_logits)
            continue;
        if (snap_is_cache(e) && v->cache_dt != to) {
            float *f = (float *)(void *)(row + rb);
            uint8_t *dst = session_buf_ptr(e);
            for (int32_t t = 0; t < v->pos; t++, p += rb, dst += rt) {
                snap_copy32(row, p, rb / 4);
                dtype_to_f32(v->cache_dt, row, f, mla_row_floats(c));
                dtype_from_f32(to, f, dst, mla_row_floats(c));
            }
            continue;
        }
        int64_t words = session_state_words(e, v->pos);
        snap_copy32(session_buf_ptr(e), p, words);
        p += 4 * words;
    }
    s->has_logits = v->has_logits;
    s->pos = v->pos;
    s->broken = 0;
    if (smp != NULL && v->has_sampler)
        sampler_set_state(smp, v->rng, v->recent, v->n_recent);
}

int
kli_session_restore(struct kli_session *s, struct kli_sampler *smp, const void *buf,
                    size_t len, struct kli_err *err)
{
    const uint8_t *b = buf;
    uint8_t *dec = NULL, *conv = NULL;
    struct snap_view v;
    int rc;

    memset(&v, 0, sizeof(v));
    if (s == NULL || (buf == NULL && len > 0))
        return err_set(err, KLI_E_INVALID, "kli_session_restore: invalid arguments");
    if (len < SNAP_HEADER || memcmp(b, snap_magic, 8) != 0)
        return err_set(err, KLI_E_FORMAT, "snapshot: not a kli session snapshot (%s)",
                           len < SNAP_HEADER ? "shorter than its header" : "bad magic");
    if (util_rd64(b + SNAP_HEADER_SUM) != snap_hash(SNAP_HASH_BASIS, b, SNAP_HEADER_SUM))
        return err_set(err, KLI_E_FORMAT, "snapshot: the header is damaged (checksum "
                           "mismatch)");
    uint32_t version = util_rd32(b + 8), flags = util_rd32(b + 12), pos = util_rd32(b + 56);
    uint64_t fp = util_rd64(b + 16), size = util_rd64(b + 24), stored = util_rd64(b + 32);
    if (version != SNAP_VERSION)
        return err_set(err, KLI_E_UNSUPPORTED, "snapshot: format version %u; this kli "
                           "reads version %d", version, SNAP_VERSION);
    if (flags & ~(uint32_t)(SNAP_F_ZSTD | SNAP_F_SAMPLER))
        return err_set(err, KLI_E_UNSUPPORTED, "snapshot: unknown flags 0x%x", flags);
    if (fp != s->m->fingerprint)
        return err_set(err, KLI_E_INVALID, "snapshot: made with another model (fingerprint "
                           "%016llx; this model's is %016llx)", (unsigned long long)fp,
                           (unsigned long long)s->m->fingerprint);
    if (stored != len - SNAP_HEADER)
        return err_set(err, KLI_E_FORMAT, "snapshot: truncated or extended: the header "
                           "announces %llu bytes after it, %llu present",
                           (unsigned long long)stored, (unsigned long long)(len - SNAP_HEADER));
    if (pos > (uint32_t)s->ctx_max)
        return err_set(err, KLI_E_RANGE, "snapshot: %u tokens exceed the session's "
                           "ctx_max of %d", pos, s->ctx_max);
    /* The payload size is known up to the logits and the sampler's recent tokens. */
    uint32_t ctype = util_rd32(b + 60);
    v.cache_dt = session_cache_dt((int32_t)ctype);
    if (v.cache_dt == KLI_DT_COUNT || mla_row_bytes(&s->m->cfg, v.cache_dt) == 0)
        return err_set(err, KLI_E_FORMAT, "snapshot: MLA cache type %u is unknown or "
                           "impossible for this model", ctype);
    uint64_t lo = snap_state_bytes(s, pos, 0, v.cache_dt);
    uint64_t hi = snap_state_bytes(s, pos, 1, v.cache_dt);
    if (flags & SNAP_F_SAMPLER) {
        lo += SNAP_SAMPLER_FIXED;
        hi += SNAP_SAMPLER_FIXED + 4 * (uint64_t)SNAP_MAX_RECENT;
    }
    if (size < lo || size > hi || size % 4 != 0 || size > SIZE_MAX)
        return err_set(err, KLI_E_FORMAT, "snapshot: payload size %llu is impossible for "
                           "%u tokens of this model", (unsigned long long)size, pos);
    const uint8_t *payload = b + SNAP_HEADER;
    struct snap_hasher sh = {SNAP_HASH_BASIS, {0}, 0};
    snap_hasher_add(&sh, payload, (size_t)stored);
    if (snap_hasher_end(&sh) != util_rd64(b + 48))
        return err_set(err, KLI_E_FORMAT, "snapshot: the payload is damaged (stored "
                           "checksum mismatch)");
    if (flags & SNAP_F_ZSTD) {
#ifdef HAVE_ZSTD
        dec = k_malloc((size_t)size + 1);
        if (dec == NULL)
            return err_set(err, KLI_E_NOMEM, "out of memory decompressing a snapshot of "
                               "%llu bytes", (unsigned long long)size);
        size_t r = ZSTD_decompress(dec, (size_t)size, payload, (size_t)stored);
        if (ZSTD_isError(r) || r != size) {
            rc = err_set(err, KLI_E_FORMAT, "snapshot: the payload is damaged (zstd: %s)",
                             ZSTD_isError(r) ? ZSTD_getErrorName(r) : "wrong size");
            goto out;
        }
        payload = dec;
#else
        return err_set(err, KLI_E_UNSUPPORTED, "snapshot: the payload is zstd-compressed "
                           "and this kli was built without zstd");
#endif
    } else if (stored != size) {
        return err_set(err, KLI_E_FORMAT, "snapshot: stored size %llu differs from the "
                           "payload size %llu", (unsigned long long)stored,
                           (unsigned long long)size);
    }
    if (snap_hash(SNAP_HASH_BASIS, payload, (size_t)size) != util_rd64(b + 40)) {
        rc = err_set(err, KLI_E_FORMAT, "snapshot: the payload is damaged (checksum "
                         "mismatch)");
        goto out;
    }
    rc = snap_parse(payload, size, pos, (flags & SNAP_F_SAMPLER) != 0, s, smp, &v, err);
    if (rc != KLI_OK)
        goto out;
    /* Room for the tokens: the only step that may fail, and it changes no state. */
    if ((rc = session_reserve(s, pos > 0 ? pos : 1, err)) != KLI_OK)
        goto out;
    /* a cache of another type is converted: room for one row each way */
    if (v.cache_dt != s->mla_sc.cache_dt &&
        (conv = k_malloc((size_t)mla_row_bytes(&s->m->cfg, v.cache_dt) +
                         4 * (size_t)mla_row_floats(&s->m->cfg))) == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory restoring a snapshot");
        goto out;
    }
    snap_apply(s, smp, &v, conv);
    backend_sess_written(s);
out:
    free(v.recent);
    free(dec);
    free(conv);
    return rc;
}

int
kli_session_load(struct kli_session *s, struct kli_sampler *smp, const char *path,
                 struct kli_err *err)
{
    char *buf = NULL;
    size_t n;
    int rc, fresh = err != NULL && err->code == 0;

    if (s == NULL || path == NULL)
        return err_set(err, KLI_E_INVALID, "kli_session_load: NULL argument");
    /* A regular file (src/file.c: a FIFO would block open()) no larger than the largest
     * snapshot this session could take: a full context, logits, the most recent tokens a
     * sampler keeps, and room for zstd's worst case (it stores what it cannot compress). */
    uint64_t most = snap_state_bytes(s, s->ctx_max, 1, KLI_DT_F32) + SNAP_SAMPLER_FIXED +
                    4 * (uint64_t)SNAP_MAX_RECENT;
    most += SNAP_HEADER + most / 128 + ((uint64_t)1 << 20);
    if ((rc = file_read(path, most, &buf, &n, err)) != KLI_OK)
        return rc;
    rc = kli_session_restore(s, smp, buf, n, err);
    /* Name the file in the message of a refused snapshot. */
    if (rc != KLI_OK && fresh && strncmp(err->msg, "snapshot: ", 10) == 0) {
        char msg[sizeof(err->msg)];
        snprintf(msg, sizeof(msg), "%s: %s", path, err->msg + 10);
        memcpy(err->msg, msg, sizeof(msg));
    }
    free(buf);
    return rc;
}

/* ==== Fork ================================================================================== */

int
kli_session_fork(struct kli_session **out, const struct kli_session *src, struct kli_err *err)
{
    struct kli_session_options o;
    struct kli_session *s = NULL;
    int rc;

    if (out == NULL || src == NULL)
        return err_set(err, KLI_E_INVALID, "kli_session_fork: NULL argument");
    *out = NULL;
    /* a new session with the source's options, and a copy of its state */
    kli_session_options_init(&o);
    o.ctx_max = src->ctx_max;
    o.batch_max = src->batch_max;
    o.cache_type = src->cache_type;
    if ((rc = kli_session_create(&s, src->m, &o, err)) != KLI_OK)
        return rc;
    if ((rc = kli_session_copy(s, src, err)) != KLI_OK) {
        kli_session_free(s);
        return rc;
    }
    *out = s;
    return KLI_OK;
}
