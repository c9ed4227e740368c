/*
 * wbuf.h - appending to a new file through one buffer that is written out in aligned
 * pieces (the safetensors and .kli writers).
 *
 * The buffer is written where the file offset is a multiple of KLI_WBUF_SIZE (8 MiB), so that
 * every write(2) covers whole aligned 2 MiB stretches of the file: file systems with large
 * folios then cache the new file in 2 MiB folios, which a mapping reads through huge-page TLB
 * entries (weights/mmap.c). Small writes would leave a freshly written model in 4 KiB pages
 * until it is next read from disk.
 */
#ifndef KLI_WBUF_H
#define KLI_WBUF_H

#include <stddef.h>
#include <stdint.h>

#include "kli.h"

#define KLI_WBUF_SIZE ((size_t)8 << 20)

struct k_wbuf {
    int fd;
    const char *name;      /* the file, for messages */
    uint8_t *buf;          /* KLI_WBUF_SIZE bytes, owned by the caller */
    size_t n;              /* bytes buffered */
    uint64_t pos;          /* file offset of the next byte appended */
};

/* Writes all n bytes of p to fd (retrying short writes and EINTR).
 * @return KLI_OK or KLI_E_IO naming `name`. */
int write_all(int fd, const void *p, size_t n, const char *name, struct kli_err *err);

/* Appends n bytes at b->pos, writing the buffer out at each multiple of KLI_WBUF_SIZE. */
int wbuf_append(struct k_wbuf *b, const void *p, uint64_t n, struct kli_err *err);

/* Writes out what is buffered. */
int wbuf_flush(struct k_wbuf *b, struct kli_err *err);

/* Replaces the file `path` with the n bytes of p, through kli_outfile (kli.h).
 * @return KLI_OK or a negative status naming the file. */
int k_write_file(const char *path, const void *p, size_t n, struct kli_err *err);

#endif
