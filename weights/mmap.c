/*
 * mmap.c - read-only whole-file mappings (POSIX mmap).
 *
 * Weights are mapped, never read: the kernel pages them in on first touch and can drop clean
 * pages under pressure, so a 90 GiB checkpoint costs no anonymous memory. MAP_PRIVATE keeps a
 * stray write (a bug) from ever reaching the file.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "mmap.h"

#ifndef O_CLOEXEC
#define O_CLOEXEC 0
#endif

/* What an empty file maps to: a valid address with nothing behind it that may be read. */
static const uint8_t mmap_empty[1];

/*
 * Why 2 MiB. A decode step streams every weight once, so from 4 KiB pages it misses the TLB
 * once per 4 KiB: on a 2-core Skylake-SP VM a q8_0 GEMV over 401 MB ran at 18.5-19.7 GB/s
 * from 4 KiB pages and at 22 GB/s from 2 MiB pages. The kernel can map a 2 MiB page-cache
 * folio with one entry only where the address and the file offset agree modulo 2 MiB, hence
 * the alignment; MADV_HUGEPAGE makes page faults read ahead in 2 MiB folios (Linux 6.x, on
 * file systems with large folios) and lets anonymous memory take huge pages. Pages already
 * cached in smaller folios stay as they are. Both are hints: where they fail the mapping
 * is still a plain one.
 */
void *
map_huge(int fd, size_t len, int prot)
{
    int flags = MAP_PRIVATE | (fd < 0 ? MAP_ANONYMOUS : 0);
    uint8_t *r, *a;
    void *addr;

    if (len < KLI_HUGE_PAGE || len > SIZE_MAX - KLI_HUGE_PAGE)
        return mmap(NULL, len, prot, flags, fd, 0);
    /* Reserve len + 2 MiB of address space, map over its aligned part, give the rest back. */
    r = mmap(NULL, len + KLI_HUGE_PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED)
        return mmap(NULL, len, prot, flags, fd, 0);
    a = r + (KLI_HUGE_PAGE - (uintptr_t)r % KLI_HUGE_PAGE) % KLI_HUGE_PAGE;
    addr = mmap(a, len, prot, flags | MAP_FIXED, fd, 0);
    if (addr == MAP_FAILED) {
        int e = errno;

        munmap(r, len + KLI_HUGE_PAGE);
        errno = e;
        return MAP_FAILED;
    }
    if (a > r)
        munmap(r, (size_t)(a - r));
    if (r + KLI_HUGE_PAGE > a)
        munmap(a + len, (size_t)(r + KLI_HUGE_PAGE - a));
#ifdef MADV_HUGEPAGE
    madvise(addr, len, MADV_HUGEPAGE);
#endif
    return addr;
}

int
mmap_open(struct k_mmap *m, const char *path, struct kli_err *err)
{
    uint64_t size;
    void *addr;
    int fd, e;

    memset(m, 0, sizeof(*m));
    /* A regular file, or a message: a FIFO here would block open() (src/file.c). */
    if ((fd = kli_file_open(path, &size, err)) < 0)
        return fd;
    if (size > (uint64_t)SIZE_MAX) {
        close(fd);
        return err_set(err, KLI_E_NOMEM, "%s: file of %llu bytes does not fit in memory",
                           path, (unsigned long long)size);
    }
    if (size == 0) {
        /* mmap rejects length 0; an empty file is still a valid (if useless) input. */
        close(fd);
        m->base = mmap_empty;
        return KLI_OK;
    }
    addr = map_huge(fd, (size_t)size, PROT_READ);
    e = errno;
    close(fd);   /* the mapping keeps its own reference to the file */
    if (addr == MAP_FAILED) {
        return err_set(err, e == ENOMEM ? KLI_E_NOMEM : KLI_E_IO,
                           "%s: cannot map %llu bytes: %s", path, (unsigned long long)size,
                           strerror(e));
    }
    m->addr = addr;
    m->len = (size_t)size;
    m->base = addr;
    m->size = size;
    return KLI_OK;
}

void
mmap_close(struct k_mmap *m)
{
    if (m == NULL)
        return;
    if (m->addr != NULL)
        munmap(m->addr, m->len);
    memset(m, 0, sizeof(*m));
}

int
mmap_advise(const struct k_mmap *m, uint64_t off, uint64_t len,
                enum mmap_advice advice)
{
#if defined(POSIX_MADV_NORMAL)
    long page = sysconf(_SC_PAGESIZE);
    uint64_t start, end;
    int how;

    if (m == NULL || m->addr == NULL || off >= m->size)
        return 0;
    if (len == 0 || len > m->size - off)
        len = m->size - off;
    if (page <= 0)
        page = 4096;
    /* posix_madvise wants a page-aligned start; widen the range down to the page. */
    start = off - off % (uint64_t)page;
    end = off + len;
#if defined(MADV_DONTNEED)
    /* glibc ignores POSIX_MADV_DONTNEED (the kernel's MADV_DONTNEED discards changes, which
     * POSIX's must not). Our mappings are read-only and private: there are none to lose. */
    if (advice == KLI_MMAP_DONTNEED)
        return madvise((uint8_t *)m->addr + start, (size_t)(end - start), MADV_DONTNEED) == 0 ?
               0 : errno;
#endif
    switch (advice) {
    case KLI_MMAP_SEQUENTIAL: how = POSIX_MADV_SEQUENTIAL; break;
    case KLI_MMAP_RANDOM: how = POSIX_MADV_RANDOM; break;
    case KLI_MMAP_WILLNEED: how = POSIX_MADV_WILLNEED; break;
    case KLI_MMAP_DONTNEED: how = POSIX_MADV_DONTNEED; break;
    default: how = POSIX_MADV_NORMAL; break;
    }
    return posix_madvise((uint8_t *)m->addr + start, (size_t)(end - start), how);
#else
    (void)m;
    (void)off;
    (void)len;
    (void)advice;
    return 0;
#endif
}

int
mmap_pages(const struct k_mmap *const *maps, int n, uint64_t *resident, uint64_t *huge)
{
    *resident = *huge = 0;
#ifdef __linux__
    /* /proc/self/smaps: a line "start-end perms ..." opens each mapping (one file mapping may
     * be several, split by madvise), then "Key: N kB" lines; Rss counts the resident pages,
     * FilePmdMapped those mapped by 2 MiB entries. */
    FILE *f = fopen("/proc/self/smaps", "re");
    long page = sysconf(_SC_PAGESIZE);
    char line[512];
    int in = 0, seen = 0;

    if (page <= 0)
        page = 4096;
    if (f == NULL)
        return -1;
    while (fgets(line, sizeof(line), f) != NULL) {
        unsigned long long a, b, kb;

        if (sscanf(line, "%llx-%llx ", &a, &b) == 2) {
            in = 0;
            for (int i = 0; i < n; i++) {
                uintptr_t lo = (uintptr_t)maps[i]->addr;
                uintptr_t hi = lo + (maps[i]->len + (size_t)page - 1) / (size_t)page *
                               (size_t)page;

                if (maps[i]->addr != NULL && a >= lo && b <= hi)
                    in = 1;
            }
        } else if (in && sscanf(line, "Rss: %llu kB", &kb) == 1) {
            *resident += (uint64_t)kb << 10;
            seen = 1;
        } else if (in && sscanf(line, "FilePmdMapped: %llu kB", &kb) == 1) {
            *huge += (uint64_t)kb << 10;
        }
    }
    fclose(f);
    return seen || n == 0 ? 0 : -1;
#else
    (void)maps;
    (void)n;
    return -1;
#endif
}
