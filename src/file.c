/*
 * file.c - opening and reading the files that must be files.
 *
 * Weights, config.json, the tokenizer files and saved session states are files: kli maps
 * them, reads them whole, or reads them at offsets. Given a FIFO in their place, a plain
 * open() blocks until some other process opens the FIFO for writing, which may be never; a
 * device such as /dev/zero opens at once and then reads without end. So every such file is
 * opened here: O_NONBLOCK makes open() of a FIFO return at once, fstat then refuses anything
 * but a regular file with a message naming the path and what it is, and the flag is cleared
 * again (it changes nothing for a regular file, but the descriptor should be a plain one).
 *
 * Text input that may come through a pipe (prompts, -f -, batch input) is the CLI's to read:
 * there a FIFO is a legitimate source, and only the size is capped.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#ifndef O_CLOEXEC
#define O_CLOEXEC 0
#endif
#ifndef O_NOCTTY
#define O_NOCTTY 0
#endif

const char *
file_kind(unsigned mode)
{
    if (S_ISDIR(mode))
        return "a directory";
    if (S_ISFIFO(mode))
        return "a FIFO";
    if (S_ISCHR(mode))
        return "a character device";
    if (S_ISBLK(mode))
        return "a block device";
    if (S_ISSOCK(mode))
        return "a socket";
    return "not a plain file";
}

int
kli_file_open(const char *path, uint64_t *size, struct kli_err *err)
{
    struct stat st;
    int fd, fl, e;

    do {
        fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        e = errno;
        err_set(err, KLI_E_IO, "%s: cannot open: %s", path, strerror(e));
        errno = e;
        return KLI_E_IO;
    }
    if (fstat(fd, &st) != 0) {
        e = errno;
        close(fd);
        return err_set(err, KLI_E_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        errno = EINVAL;
        return err_set(err, KLI_E_IO, "%s: not a regular file (%s)", path,
                           file_kind(st.st_mode));
    }
    if ((fl = fcntl(fd, F_GETFL)) == -1 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) == -1) {
        e = errno;
        close(fd);
        return err_set(err, KLI_E_IO, "%s: %s", path, strerror(e));
    }
    if (size != NULL)
        *size = st.st_size > 0 ? (uint64_t)st.st_size : 0;
    return fd;
}

int
file_read(const char *path, uint64_t max, char **buf, size_t *len, struct kli_err *err)
{
    uint64_t size;
    size_t n = 0;
    char *b;
    int fd;

    *buf = NULL;
    *len = 0;
    if ((fd = kli_file_open(path, &size, err)) < 0)
        return fd;
    if (size > max || size > (uint64_t)SIZE_MAX - 1) {
        close(fd);
        return err_set(err, KLI_E_RANGE, "%s: %llu bytes is over the limit of %llu for "
                           "this file", path, (unsigned long long)size,
                           (unsigned long long)max);
    }
    if ((b = k_malloc((size_t)size + 1)) == NULL) {
        close(fd);
        return err_set(err, KLI_E_NOMEM, "%s: out of memory for %llu bytes", path,
                           (unsigned long long)size);
    }
    while (n < (size_t)size) {
        ssize_t r = read(fd, b + n, (size_t)size - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            int e = errno;
            close(fd);
            free(b);
            return err_set(err, KLI_E_IO, "%s: %s", path,
                               r < 0 ? strerror(e) : "the file shrank while read");
        }
        n += (size_t)r;
    }
    close(fd);
    b[n] = '\0';
    *buf = b;
    *len = n;
    return KLI_OK;
}

int
file_has_magic(const char *path, const void *magic, size_t n)
{
    unsigned char head[16];
    ssize_t got;
    int fd;

    if (n > sizeof(head) || (fd = kli_file_open(path, NULL, NULL)) < 0)
        return 0;
    do {
        got = read(fd, head, n);
    } while (got < 0 && errno == EINTR);
    close(fd);
    return got == (ssize_t)n && memcmp(head, magic, n) == 0;
}
