/*
 * wbuf.c - the aligned append buffer of wbuf.h.
 */
#include "config.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "wbuf.h"

int
write_all(int fd, const void *p, size_t n, const char *name, struct kli_err *err)
{
    const uint8_t *b = p;

    while (n > 0) {
        ssize_t k = write(fd, b, n);

        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            int e = k < 0 ? errno : ENOSPC;

            return err_set(err, KLI_E_IO, "%s: write error: %s", name, strerror(e));
        }
        b += k;
        n -= (size_t)k;
    }
    return KLI_OK;
}

int
wbuf_flush(struct k_wbuf *b, struct kli_err *err)
{
    size_t n = b->n;

    b->n = 0;
    return write_all(b->fd, b->buf, n, b->name, err);
}

int
wbuf_append(struct k_wbuf *b, const void *p, uint64_t n, struct kli_err *err)
{
    const uint8_t *s = p;
    int rc;

    while (n > 0) {
        /* the buffer holds the bytes from b->pos - b->n, all in one aligned piece */
        size_t take = KLI_WBUF_SIZE - (size_t)(b->pos % KLI_WBUF_SIZE);

        if (take > n)
            take = (size_t)n;
        memcpy(b->buf + b->n, s, take);
        b->n += take;
        b->pos += take;
        s += take;
        n -= take;
        if (b->pos % KLI_WBUF_SIZE == 0 && (rc = wbuf_flush(b, err)) != KLI_OK)
            return rc;
    }
    return KLI_OK;
}
