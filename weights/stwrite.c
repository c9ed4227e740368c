/*
 * stwrite.c - a streaming safetensors writer (the format of doc/formats.md 2.1): header
 * length, JSON header padded with spaces to a multiple of 8, then the tensors back to back
 * in the declared order. Written to PATH.tmp and renamed on success.
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "wbuf.h"
#include "weights.h"

#ifndef O_CLOEXEC
#define O_CLOEXEC 0
#endif

struct kli_st_writer {
    int fd;
    struct kli_wbuf wb;           /* the tensor bytes, in aligned pieces (wbuf.h) */
    char *path, *tmp;
    uint64_t total, written;
};

void
kli_st_writer_abort(struct kli_st_writer *w)
{
    if (w == NULL)
        return;
    if (w->fd >= 0)
        close(w->fd);
    free(w->wb.buf);
    if (w->tmp != NULL)
        unlink(w->tmp);
    free(w->path);
    free(w->tmp);
    free(w);
}

int
kli_st_writer_open(struct kli_st_writer **out, const char *path,
                   const struct kli_st_entry *entries, int64_t n, struct kli_err *err)
{
    struct kli_st_writer *w = kli_calloc(1, sizeof(*w));
    cJSON *hdr = cJSON_CreateObject(), *meta;
    char *text = NULL;
    int rc = KLI_OK;

    *out = NULL;
    if (w == NULL || hdr == NULL)
        goto nomem;
    w->fd = -1;
    size_t pl = strlen(path);
    w->path = kli_strdup(path);
    w->tmp = kli_malloc(pl + 8);
    if (w->path == NULL || w->tmp == NULL)
        goto nomem;
    snprintf(w->tmp, pl + 8, "%s.tmp", path);
    for (int64_t i = 0; i < n; i++) {
        const struct kli_st_entry *e = &entries[i];
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
    text = cJSON_PrintUnformatted(hdr);
    if (text == NULL)
        goto nomem;
    size_t hl = strlen(text), pad = (8 - hl % 8) % 8;
    uint64_t nh = hl + pad;
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)(nh >> (8 * i));
    if ((w->wb.buf = kli_malloc(KLI_WBUF_SIZE)) == NULL)
        goto nomem;
    do {
        w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    } while (w->fd < 0 && errno == EINTR);
    if (w->fd < 0) {
        rc = kli_err_set(err, KLI_E_IO, "%s: %s", w->tmp, strerror(errno));
        goto fail;
    }
    if ((rc = kli_write_all(w->fd, len8, 8, w->tmp, err)) != KLI_OK ||
        (rc = kli_write_all(w->fd, text, hl, w->tmp, err)) != KLI_OK ||
        (rc = kli_write_all(w->fd, "        ", pad, w->tmp, err)) != KLI_OK)
        goto fail;
    w->wb.fd = w->fd;
    w->wb.name = w->tmp;
    w->wb.pos = 8 + nh;
    free(text);
    cJSON_Delete(hdr);
    *out = w;
    return KLI_OK;
nomem:
    rc = kli_err_set(err, KLI_E_NOMEM, "out of memory writing %s", path);
fail:
    free(text);
    cJSON_Delete(hdr);
    kli_st_writer_abort(w);
    return rc;
}

int
kli_st_writer_write(struct kli_st_writer *w, const void *data, uint64_t nbytes,
                    struct kli_err *err)
{
    if (w->written + nbytes > w->total)
        return kli_err_set(err, KLI_E_INVALID, "%s: more tensor bytes than declared", w->path);
    w->written += nbytes;
    return kli_wbuf_append(&w->wb, data, nbytes, err);
}

int
kli_st_writer_close(struct kli_st_writer *w, struct kli_err *err)
{
    int rc;

    if (w->written != w->total) {
        rc = kli_err_set(err, KLI_E_INVALID, "%s: %llu of %llu tensor bytes written", w->path,
                         (unsigned long long)w->written, (unsigned long long)w->total);
        kli_st_writer_abort(w);
        return rc;
    }
    if ((rc = kli_wbuf_flush(&w->wb, err)) != KLI_OK) {
        kli_st_writer_abort(w);
        return rc;
    }
    if (fsync(w->fd) != 0 || close(w->fd) != 0) {
        w->fd = -1;
        rc = kli_err_set(err, KLI_E_IO, "%s: write error: %s", w->tmp, strerror(errno));
        kli_st_writer_abort(w);
        return rc;
    }
    w->fd = -1;
    if (rename(w->tmp, w->path) != 0) {
        rc = kli_err_set(err, KLI_E_IO, "%s: %s", w->path, strerror(errno));
        kli_st_writer_abort(w);
        return rc;
    }
    free(w->tmp);
    w->tmp = NULL;
    kli_st_writer_abort(w);
    return KLI_OK;
}
