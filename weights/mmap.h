/*
 * mmap.h - read-only mappings of whole files.
 *
 * A k_mmap maps a regular file PROT_READ / MAP_PRIVATE. The bytes stay valid until
 * mmap_close. An empty file maps fine: size is 0 and base points at a static empty byte
 * (never NULL), so `base + 0` and a loop over zero bytes are always safe.
 */
#ifndef KLI_MMAP_H
#define KLI_MMAP_H

#include <stddef.h>
#include <stdint.h>

#include "kli.h"

struct k_mmap {
    const uint8_t *base;   /* first byte of the file; never NULL once opened */
    uint64_t size;         /* file size in bytes */
    void *addr;            /* what mmap returned, or NULL for an empty file */
    size_t len;            /* length passed to mmap (== size) */
};

/* Access-pattern hints, passed on to posix_madvise where the system has it. */
enum mmap_advice {
    KLI_MMAP_NORMAL = 0,
    KLI_MMAP_SEQUENTIAL = 1,   /* read once front to back (headers, conversion) */
    KLI_MMAP_RANDOM = 2,       /* scattered reads (routed experts): no read-ahead */
    KLI_MMAP_WILLNEED = 3,     /* start paging in now */
    KLI_MMAP_DONTNEED = 4      /* the pages may be dropped; they re-read from the file */
};

/* Maps the regular file `path` read-only into *m (zeroed first).
 * @return KLI_OK, or KLI_E_IO (missing file, not a regular file, mmap failure) /
 *         KLI_E_NOMEM (the file does not fit in the address space) with a message naming
 *         the path and the system error. On failure *m is left closed (safe to close). */
int mmap_open(struct k_mmap *m, const char *path, struct kli_err *err);

#define KLI_HUGE_PAGE ((size_t)2 << 20)   /* the huge pages map_huge aligns for */

/* Maps len bytes of file fd from offset 0 (or anonymous memory when fd < 0), MAP_PRIVATE
 * with protection prot, at a 2 MiB boundary when len is at least 2 MiB, advised
 * MADV_HUGEPAGE (mmap.c says why). Released with munmap(addr, len).
 * @return the address, or MAP_FAILED with errno set. */
void *map_huge(int fd, size_t len, int prot);

/* Unmaps. Safe on a zeroed or already-closed struct; leaves *m zeroed. */
void mmap_close(struct k_mmap *m);

/* Hints the access pattern for bytes [off, off + len) (clamped to the file; len 0 means "to
 * the end"). A hint is only a hint: a system without posix_madvise, or one that refuses, is
 * not an error.
 * @return 0 if the hint was given, or a positive errno value (informational only). */
int mmap_advise(const struct k_mmap *m, uint64_t off, uint64_t len,
                    enum mmap_advice advice);

/* Of the pages of mappings maps[0..n) now resident, *resident bytes in all and *huge bytes
 * mapped through 2 MiB entries (Linux: /proc/self/smaps).
 * @return 0, or -1 where the system does not say (then both are 0). */
int mmap_pages(const struct k_mmap *const *maps, int n, uint64_t *resident,
                   uint64_t *huge);

#endif
