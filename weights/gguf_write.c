/*
 * gguf_write.c - writing a GGUF v3 file: the metadata built up front (gguf_kv_*), the
 * tensor infos declared, then the tensors' bytes streamed in their declared order. The
 * layout is gguf.c's (kli-weights(5), GGUF FILES); every tensor starts at a multiple of the
 * alignment. Written through kli_outfile (a temporary file renamed by a successful close).
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "internal.h"
#include "util.h"
#include "wbuf.h"
#include "weights.h"

/* ==== metadata ==== */

static void
kv_raw(struct gguf_kvbuf *b, const void *p, size_t n)
{
    if (!b->oom && util_text_add(&b->p, &b->n, &b->cap, p, n) != 0)
        b->oom = 1;
}

static void
kv_le(struct gguf_kvbuf *b, uint64_t v, int bytes)
{
    uint8_t t[8];

    for (int i = 0; i < bytes; i++)
        t[i] = (uint8_t)(v >> (8 * i));
    kv_raw(b, t, (size_t)bytes);
}

void
gguf_kv_string(struct gguf_kvbuf *b, const char *s, size_t len)
{
    kv_le(b, len, 8);
    kv_raw(b, s, len);
}

/* A key and its value type; the value follows. */
void
gguf_kv_key(struct gguf_kvbuf *b, const char *key, uint32_t type)
{
    gguf_kv_string(b, key, strlen(key));
    kv_le(b, type, 4);
    b->count++;
}

void
gguf_kv_u32(struct gguf_kvbuf *b, const char *key, uint32_t v)
{
    gguf_kv_key(b, key, GGUF_T_U32);
    kv_le(b, v, 4);
}

void
gguf_kv_f32(struct gguf_kvbuf *b, const char *key, float v)
{
    uint32_t u;

    memcpy(&u, &v, 4);
    gguf_kv_key(b, key, GGUF_T_F32);
    kv_le(b, u, 4);
}

void
gguf_kv_bool(struct gguf_kvbuf *b, const char *key, int v)
{
    gguf_kv_key(b, key, GGUF_T_BOOL);
    kv_le(b, v != 0, 1);
}

void
gguf_kv_str(struct gguf_kvbuf *b, const char *key, const char *v)
{
    gguf_kv_key(b, key, GGUF_T_STRING);
    gguf_kv_string(b, v, strlen(v));
}

void
gguf_kv_array(struct gguf_kvbuf *b, const char *key, uint32_t elem, uint64_t n)
{
    gguf_kv_key(b, key, GGUF_T_ARRAY);
    kv_le(b, elem, 4);
    kv_le(b, n, 8);
}

void
gguf_kv_elem(struct gguf_kvbuf *b, uint64_t v, int bytes)
{
    kv_le(b, v, bytes);
}

/* ==== the writer ==== */

struct gguf_writer {
    struct kli_outfile *of;
    char *path;
    struct gguf_wtensor *t;      /* [n], offsets filled */
    int64_t n, cur;
    uint64_t cur_done, data_off;
    uint32_t align;
    struct k_wbuf wb;
};

static const uint8_t gw_zeros[64];

static int
gw_pad(struct gguf_writer *w, struct kli_err *err)
{
    int rc = KLI_OK;

    while (rc == KLI_OK && (w->wb.pos - w->data_off) % w->align != 0) {
        uint64_t k = w->align - (w->wb.pos - w->data_off) % w->align;
        rc = wbuf_append(&w->wb, gw_zeros, k < sizeof(gw_zeros) ? k : sizeof(gw_zeros), err);
    }
    return rc;
}

/* Past the finished tensors (zero-sized ones included) to the next one's start. */
static int
gw_advance(struct gguf_writer *w, struct kli_err *err)
{
    while (w->cur < w->n && w->cur_done == w->t[w->cur].nbytes) {
        w->cur++;
        w->cur_done = 0;
        int rc = gw_pad(w, err);
        if (rc != KLI_OK)
            return rc;
    }
    return KLI_OK;
}

int
gguf_writer_open(struct gguf_writer **out, const char *path, const struct gguf_kvbuf *kv,
                 const struct gguf_wtensor *t, int64_t n, struct kli_err *err)
{
    struct gguf_writer *w = k_calloc(1, sizeof(*w));
    struct gguf_kvbuf h = {0};
    uint64_t off = 0;
    int rc;

    *out = NULL;
    if (w == NULL || (w->path = k_strdup(path)) == NULL ||
        (w->t = k_calloc((size_t)n + 1, sizeof(*w->t))) == NULL ||
        (w->wb.buf = k_malloc(KLI_WBUF_SIZE)) == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory writing %s", path);
        goto fail;
    }
    if (kv->oom) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory for the metadata of %s", path);
        goto fail;
    }
    w->n = n;
    w->align = GGUF_DEFAULT_ALIGNMENT;
    memcpy(w->t, t, (size_t)n * sizeof(*t));
    kv_raw(&h, GGUF_MAGIC, 4);
    kv_le(&h, 3, 4);
    kv_le(&h, (uint64_t)n, 8);
    kv_le(&h, kv->count, 8);
    kv_raw(&h, kv->p, kv->n);
    for (int64_t i = 0; i < n; i++) {
        size_t len = strlen(t[i].name);
        if (len == 0 || len > GGUF_MAX_NAME || t[i].ndim < 1 || t[i].ndim > GGUF_MAX_DIMS) {
            rc = err_set(err, KLI_E_INVALID, "%s: tensor \"%s\" cannot be written in GGUF",
                         path, t[i].name);
            goto fail;
        }
        gguf_kv_string(&h, t[i].name, len);
        kv_le(&h, (uint64_t)t[i].ndim, 4);
        for (int d = 0; d < t[i].ndim; d++)
            kv_le(&h, (uint64_t)t[i].ne[d], 8);
        kv_le(&h, t[i].type, 4);
        kv_le(&h, off, 8);
        w->t[i].offset = off;
        off += (t[i].nbytes + w->align - 1) / w->align * w->align;
    }
    while (h.n % w->align != 0)
        kv_raw(&h, gw_zeros, 1);
    if (h.oom) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory writing %s", path);
        goto fail;
    }
    w->data_off = h.n;
    if ((rc = kli_outfile_open(&w->of, path, 0, err)) != KLI_OK)
        goto fail;
    w->wb.fd = kli_outfile_fd(w->of);
    w->wb.name = w->path;
    if ((rc = wbuf_append(&w->wb, h.p, h.n, err)) != KLI_OK ||
        (rc = gw_advance(w, err)) != KLI_OK)
        goto fail;
    free(h.p);
    *out = w;
    return KLI_OK;
fail:
    free(h.p);
    gguf_writer_abort(w);
    return rc;
}

int
gguf_writer_write(struct gguf_writer *w, const void *data, uint64_t nbytes,
                  struct kli_err *err)
{
    const uint8_t *p = data;
    int rc;

    while (nbytes > 0) {
        if (w->cur >= w->n)
            return err_set(err, KLI_E_INVALID, "%s: more tensor bytes than declared",
                           w->path);
        uint64_t take = w->t[w->cur].nbytes - w->cur_done;
        take = take < nbytes ? take : nbytes;
        if ((rc = wbuf_append(&w->wb, p, take, err)) != KLI_OK)
            return rc;
        w->cur_done += take;
        p += take;
        nbytes -= take;
        if ((rc = gw_advance(w, err)) != KLI_OK)
            return rc;
    }
    return KLI_OK;
}

int
gguf_writer_close(struct gguf_writer *w, struct kli_err *err)
{
    int rc;

    if (w->cur < w->n) {
        rc = err_set(err, KLI_E_INVALID, "%s: tensor %s is incomplete", w->path,
                     w->t[w->cur].name);
    } else if ((rc = wbuf_flush(&w->wb, err)) == KLI_OK) {
        rc = kli_outfile_commit(w->of, err);
        w->of = NULL;
    }
    gguf_writer_abort(w);
    return rc;
}

void
gguf_writer_abort(struct gguf_writer *w)
{
    if (w == NULL)
        return;
    kli_outfile_abort(w->of);
    free(w->wb.buf);
    free(w->t);
    free(w->path);
    free(w);
}
