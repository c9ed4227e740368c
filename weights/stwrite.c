/*
 * stwrite.c - a streaming safetensors writer (the format of doc/formats.md 2.1): header
 * length, JSON header padded with spaces to a multiple of 8, then the tensors back to back
 * in the declared order. Written through kli_outfile (outfile.c): a temporary file renamed
 * over PATH on success.
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "util.h"
#include "wbuf.h"
#include "weights.h"

struct st_writer {
    struct kli_outfile *of;
    int fd;
    struct k_wbuf wb;           /* the tensor bytes, in aligned pieces (wbuf.h) */
    char *path;
    uint64_t total, written;
};

void
st_writer_abort(struct st_writer *w)
{
    if (w == NULL)
        return;
    kli_outfile_abort(w->of);
    free(w->wb.buf);
    free(w->path);
    free(w);
}

int
st_writer_open(struct st_writer **out, const char *path,
                   const struct st_entry *entries, int64_t n, struct kli_err *err)
{
    return st_writer_open_meta(out, path, entries, n, NULL, 0, err);
}

int
st_writer_open_meta(struct st_writer **out, const char *path, const struct st_entry *entries,
                    int64_t n, const char *const *meta_kv, int32_t n_meta, struct kli_err *err)
{
    struct st_writer *w = k_calloc(1, sizeof(*w));
    cJSON *hdr = cJSON_CreateObject(), *meta;
    char *text = NULL;
    int rc = KLI_OK;

    *out = NULL;
    if (w == NULL || hdr == NULL)
        goto nomem;
    w->fd = -1;
    w->path = k_strdup(path);
    if (w->path == NULL)
        goto nomem;
    for (int64_t i = 0; i < n; i++) {
        const struct st_entry *e = &entries[i];
        cJSON *t = cJSON_CreateObject(), *shape = cJSON_CreateArray(), *off = cJSON_CreateArray();
        if (t == NULL || shape == NULL || off == NULL) {
            cJSON_Delete(t);
            cJSON_Delete(shape);
            cJSON_Delete(off);
            goto nomem;
        }
        cJSON_AddItemToObject(hdr, e->name, t);
        cJSON_AddStringToObject(t, "dtype", e->dtype);
        for (int d = 0; d < e->ndim; d++)
            cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)e->shape[d]));
        cJSON_AddItemToObject(t, "shape", shape);
        cJSON_AddItemToArray(off, cJSON_CreateNumber((double)w->total));
        cJSON_AddItemToArray(off, cJSON_CreateNumber((double)(w->total + e->nbytes)));
        cJSON_AddItemToObject(t, "data_offsets", off);
        w->total += e->nbytes;
    }
    meta = cJSON_AddObjectToObject(hdr, "__metadata__");
    if (meta == NULL || cJSON_AddStringToObject(meta, "format", "pt") == NULL)
        goto nomem;
    for (int32_t i = 0; i < n_meta; i++) {
        if (cJSON_AddStringToObject(meta, meta_kv[2 * i], meta_kv[2 * i + 1]) == NULL)
            goto nomem;
    }
    text = cJSON_PrintUnformatted(hdr);
    if (text == NULL)
        goto nomem;
    size_t hl = strlen(text), pad = (8 - hl % 8) % 8;
    uint64_t nh = hl + pad;
    uint8_t len8[8];
    util_wr64(len8, nh);
    if ((w->wb.buf = k_malloc(KLI_WBUF_SIZE)) == NULL)
        goto nomem;
    if ((rc = kli_outfile_open(&w->of, path, 0, err)) != KLI_OK)
        goto fail;
    w->fd = kli_outfile_fd(w->of);
    if ((rc = write_all(w->fd, len8, 8, w->path, err)) != KLI_OK ||
        (rc = write_all(w->fd, text, hl, w->path, err)) != KLI_OK ||
        (rc = write_all(w->fd, "        ", pad, w->path, err)) != KLI_OK)
        goto fail;
    w->wb.fd = w->fd;
    w->wb.name = w->path;
    w->wb.pos = 8 + nh;
    free(text);
    cJSON_Delete(hdr);
    *out = w;
    return KLI_OK;
nomem:
    rc = err_set(err, KLI_E_NOMEM, "out of memory writing %s", path);
fail:
    free(text);
    cJSON_Delete(hdr);
    st_writer_abort(w);
    return rc;
}

int
st_writer_write(struct st_writer *w, const void *data, uint64_t nbytes,
                    struct kli_err *err)
{
    if (w->written + nbytes > w->total)
        return err_set(err, KLI_E_INVALID, "%s: more tensor bytes than declared", w->path);
    w->written += nbytes;
    return wbuf_append(&w->wb, data, nbytes, err);
}

int
st_writer_sink(void *w, const void *data, uint64_t nbytes, struct kli_err *err)
{
    return st_writer_write(w, data, nbytes, err);
}

int
st_writer_close(struct st_writer *w, struct kli_err *err)
{
    int rc;

    if (w->written != w->total) {
        rc = err_set(err, KLI_E_INVALID, "%s: %llu of %llu tensor bytes written", w->path,
                         (unsigned long long)w->written, (unsigned long long)w->total);
        st_writer_abort(w);
        return rc;
    }
    if ((rc = wbuf_flush(&w->wb, err)) != KLI_OK) {
        st_writer_abort(w);
        return rc;
    }
    rc = kli_outfile_commit(w->of, err);
    w->of = NULL;
    st_writer_abort(w);
    return rc;
}

int
st_writer_finish(struct st_writer *w, int rc, struct kli_err *err)
{
    if (rc == KLI_OK && w != NULL)
        return st_writer_close(w, err);
    st_writer_abort(w);
    return rc;
}
