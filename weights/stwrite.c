/*
 * stwrite.c - a streaming safetensors writer (the format of docs/formats.md 2.1): header
 * length, JSON header padded with spaces to a multiple of 8, then the tensors back to back
 * in the declared order. Written to PATH.tmp and renamed on success.
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "weights.h"

/* The tensor bytes go through a buffer of 8 MiB that is written out where the file offset
 * is a multiple of its size (stdio itself is unbuffered): file systems with large folios
 * then cache the new file in 2 MiB folios, which a mapping reads through huge-page TLB
 * entries (weights/mmap.c). stdio's 4 KiB writes would leave it in 4 KiB pages. */
#define ST_WBUF ((size_t)8 << 20)

struct kli_st_writer {
    FILE *f;
    uint8_t *buf;                 /* ST_WBUF bytes; NULL: every write goes straight out */
    size_t n_buf;
    uint64_t pos;                 /* file offset of the next byte */
    char *path, *tmp;
    uint64_t total, written;
};

void
kli_st_writer_abort(struct kli_st_writer *w)
{
    if (w == NULL)
        return;
    if (w->f != NULL)
        fclose(w->f);
    free(w->buf);
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
    w->f = fopen(w->tmp, "wb");
    if (w->f == NULL) {
        rc = kli_err_set(err, KLI_E_IO, "%s: %s", w->tmp, strerror(errno));
        goto fail;
    }
    w->buf = kli_malloc(ST_WBUF);
    if (w->buf == NULL || setvbuf(w->f, NULL, _IONBF, 0) != 0)
        goto nomem;
    if (fwrite(len8, 1, 8, w->f) != 8 || fwrite(text, 1, hl, w->f) != hl ||
        fwrite("        ", 1, pad, w->f) != pad) {
        rc = kli_err_set(err, KLI_E_IO, "%s: write error: %s", w->tmp, strerror(errno));
        goto fail;
    }
    w->pos = 8 + nh;
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

static int
st_flush(struct kli_st_writer *w, struct kli_err *err)
{
    size_t n = w->n_buf;

    w->n_buf = 0;
    if (n > 0 && fwrite(w->buf, 1, n, w->f) != n)
        return kli_err_set(err, KLI_E_IO, "%s: write error: %s", w->tmp, strerror(errno));
    return KLI_OK;
}

int
kli_st_writer_write(struct kli_st_writer *w, const void *data, uint64_t nbytes,
                    struct kli_err *err)
{
    const uint8_t *b = data;

    if (w->written + nbytes > w->total)
        return kli_err_set(err, KLI_E_INVALID, "%s: more tensor bytes than declared", w->path);
    w->written += nbytes;
    while (nbytes > 0) {
        size_t take = ST_WBUF - (size_t)(w->pos % ST_WBUF);

        if (take > nbytes)
            take = (size_t)nbytes;
        memcpy(w->buf + w->n_buf, b, take);
        w->n_buf += take;
        w->pos += take;
        b += take;
        nbytes -= take;
        if (w->pos % ST_WBUF == 0 && st_flush(w, err) != KLI_OK)
            return KLI_E_IO;
    }
    return KLI_OK;
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
    if ((rc = st_flush(w, err)) != KLI_OK) {
        kli_st_writer_abort(w);
        return rc;
    }
    if (fflush(w->f) != 0 || fsync(fileno(w->f)) != 0 || fclose(w->f) != 0) {
        w->f = NULL;
        rc = kli_err_set(err, KLI_E_IO, "%s: write error: %s", w->tmp, strerror(errno));
        kli_st_writer_abort(w);
        return rc;
    }
    w->f = NULL;
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
