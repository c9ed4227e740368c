/*
 * outfile.c - replacing a file safely (kli.h, "output files"): every writer of kli goes
 * through here, so that no writer follows a planted link, replaces a device node, leaves a
 * partial file under the target's name or races another writer of the same file.
 *
 * The target is resolved first (a symbolic link names the file to replace), then locked:
 * DIR/.NAME.lock holds an exclusive flock while the writer works, and the lock counts only
 * once that name still leads to the locked inode (a writer that finished meanwhile removed
 * it). The lock file is removed at the end; one left by a killed writer is simply reused,
 * since the kernel dropped its lock. The new contents go to DIR/.NAME.XXXXXXXXXXXXXXXX.tmp,
 * a random name opened with O_CREAT|O_EXCL|O_NOFOLLOW (temporaries of killed writers are
 * swept once the lock is held), and the commit is fsync, rename and an fsync of the
 * directory.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/random.h>
#endif

#include "internal.h"
#include "wbuf.h"

#ifndef O_CLOEXEC
#define O_CLOEXEC 0
#endif
#ifndef O_NOFOLLOW
#define O_NOFOLLOW 0
#endif

struct kli_outfile {
    int fd;          /* the temporary file, or the target itself when streaming */
    int lock;        /* the lock file, holding the flock; -1 when streaming */
    char *path;      /* the resolved target */
    char *tmp;       /* the temporary file, in lockpath's block; NULL when streaming, before
                        it is created and once renamed */
    char *lockpath;  /* DIR/.NAME.lock, then room for tmp */
};

/* 64 bits nobody can guess in advance; the clock and the address are a fallback only. */
static uint64_t
of_random(void)
{
    static unsigned long counter;
    uint64_t r = 0;
    struct timespec ts;

#ifdef __linux__
    if (getrandom(&r, sizeof(r), 0) == (ssize_t)sizeof(r))
        return r;
#endif
    clock_gettime(CLOCK_REALTIME, &ts);
    r = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ull ^ (uint64_t)ts.tv_sec ^
        ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)&r ^ ++counter;
    r ^= r >> 29;
    r *= 0xbf58476d1ce4e5b9ull;
    return r ^ (r >> 32);
}

/* *out: the file `path` names, its links followed; a missing file is fine, a dangling
 * link not. */
static int
of_resolve(const char *path, char **out, struct kli_err *err)
{
    struct stat st;
    char *r;

    if (lstat(path, &st) != 0 || !S_ISLNK(st.st_mode)) {
        if ((*out = k_strdup(path)) == NULL)
            return err_set(err, KLI_E_NOMEM, "out of memory");
        return KLI_OK;
    }
    if ((r = realpath(path, NULL)) == NULL)
        return err_set(err, KLI_E_IO, "%s: a symbolic link to a missing file (%s)", path,
                           strerror(errno));
    *out = k_strdup(r);
    free(r);
    if (*out == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    return KLI_OK;
}

static int
of_type_error(const char *path, mode_t m, struct kli_err *err)
{
    const char *what = S_ISDIR(m) ? "a directory" : S_ISCHR(m) || S_ISBLK(m) ? "a device" :
                       S_ISFIFO(m) ? "a FIFO" : "not a regular file";

    return err_set(err, KLI_E_IO, "%s: is %s; kli replaces only regular files here", path,
                       what);
}

/* Opens and locks f->lockpath. @return KLI_OK, or 1 when the name moved to another file
 * meanwhile (a writer that finished removed it: try again), or an error. */
static int
of_lock(struct kli_outfile *f, struct kli_err *err)
{
    struct stat st, now;
    int fd;

    do {
        fd = open(f->lockpath, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0666);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return err_set(err, KLI_E_IO, "%s: %s", f->lockpath, strerror(errno));
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return err_set(err, KLI_E_IO, "%s: not a lock file", f->lockpath);
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        if (e == ENOLCK || e == EOPNOTSUPP || e == ENOSYS) {
            /* a file system without locks: write without one rather than not at all */
            f->lock = fd;
            return KLI_OK;
        }
        close(fd);
        if (e == EWOULDBLOCK)
            return err_set(err, KLI_E_IO, "%s: being written by another process; try "
                               "again when it is done", f->path);
        return err_set(err, KLI_E_IO, "%s: cannot lock: %s", f->lockpath, strerror(e));
    }
    if (lstat(f->lockpath, &now) != 0 || now.st_dev != st.st_dev || now.st_ino != st.st_ino) {
        close(fd);
        return 1;
    }
    f->lock = fd;
    return KLI_OK;
}

/* Removes what writers of this target that were killed left behind: .NAME.<16 hex>.tmp
 * files in its directory. Only called with the lock held, so none of them is being
 * written; unlink removes a link itself, never what it names. */
static void
of_sweep(const struct kli_outfile *f, size_t dl)
{
    const char *name = f->path + dl;
    size_t nl = strlen(name);
    char dir[PATH_MAX], p[PATH_MAX];
    struct dirent *de;
    DIR *d;

    if (dl == 0)
        snprintf(dir, sizeof(dir), ".");
    else if (dl >= sizeof(dir))
        return;
    else
        snprintf(dir, sizeof(dir), "%.*s", (int)dl, f->path);
    if ((d = opendir(dir)) == NULL)
        return;
    while ((de = readdir(d)) != NULL) {
        const char *e = de->d_name;
        size_t el = strlen(e), k;

        if (el != nl + 22 || e[0] != '.' || strncmp(e + 1, name, nl) != 0 || e[nl + 1] != '.' ||
            strcmp(e + nl + 18, ".tmp") != 0)
            continue;
        for (k = nl + 2; k < nl + 18 && strchr("0123456789abcdef", e[k]) != NULL; k++)
            ;
        if (k == nl + 18 && snprintf(p, sizeof(p), "%s/%s", dir, e) < (int)sizeof(p))
            unlink(p);
    }
    closedir(d);
}

void
kli_outfile_abort(struct kli_outfile *f)
{
    if (f == NULL)
        return;
    if (f->fd >= 0)
        close(f->fd);
    if (f->tmp != NULL)
        unlink(f->tmp);
    if (f->lock >= 0) {
        unlink(f->lockpath);   /* still held: nobody else can be using this one */
        close(f->lock);
    }
    free(f->path);
    free(f->lockpath);
    free(f);
}

int
kli_outfile_open(struct kli_outfile **out, const char *path, unsigned flags,
                 struct kli_err *err)
{
    struct kli_outfile *f;
    struct stat st;
    int rc = KLI_OK, exists;

    *out = NULL;
    if (path == NULL || path[0] == '\0')
        return err_set(err, KLI_E_INVALID, "kli_outfile_open: no path");
    if ((f = k_calloc(1, sizeof(*f))) == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    f->fd = -1;
    f->lock = -1;
    if ((rc = of_resolve(path, &f->path, err)) != KLI_OK)
        goto fail;
    exists = stat(f->path, &st) == 0;
    if (exists && !S_ISREG(st.st_mode)) {
        if ((flags & KLI_OUTFILE_STREAM) && (S_ISCHR(st.st_mode) || S_ISFIFO(st.st_mode))) {
            /* written in place: a device is never replaced, a FIFO's reader gets the data */
            do {
                f->fd = open(f->path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
            } while (f->fd < 0 && errno == EINTR);
            if (f->fd < 0) {
                rc = err_set(err, KLI_E_IO, "%s: %s", f->path, strerror(errno));
                goto fail;
            }
            *out = f;
            return KLI_OK;
        }
        rc = of_type_error(f->path, st.st_mode, err);
        goto fail;
    }

    /* DIR/.NAME.lock, then DIR/.NAME.<16 hex digits>.tmp, next to the target */
    const char *slash = strrchr(f->path, '/');
    size_t dl = slash != NULL ? (size_t)(slash - f->path) + 1 : 0;
    size_t cap = strlen(f->path) + 32;
    if ((f->lockpath = k_malloc(2 * cap)) == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "out of memory");
        goto fail;
    }
    snprintf(f->lockpath, cap, "%.*s.%s.lock", (int)dl, f->path, f->path + dl);
    for (int tries = 0; (rc = of_lock(f, err)) == 1; tries++) {
        if (tries == 100) {
            rc = err_set(err, KLI_E_IO, "%s: keeps changing under another writer", path);
            goto fail;
        }
    }
    if (rc != KLI_OK)
        goto fail;
    of_sweep(f, dl);
    for (int tries = 0; f->fd < 0; tries++) {
        f->tmp = f->lockpath + cap;
        snprintf(f->tmp, cap, "%.*s.%s.%016llx.tmp", (int)dl, f->path, f->path + dl,
                 (unsigned long long)of_random());
        f->fd = open(f->tmp, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
        if (f->fd < 0 && (errno != EEXIST || tries == 100)) {
            rc = err_set(err, KLI_E_IO, "%s: %s", f->tmp, strerror(errno));
            f->tmp = NULL;
            goto fail;
        }
    }
    /* a replaced file keeps its permissions */
    if (exists)
        (void)fchmod(f->fd, st.st_mode & 0777);
    *out = f;
    return KLI_OK;
fail:
    kli_outfile_abort(f);
    return rc;
}

int
kli_outfile_fd(const struct kli_outfile *f)
{
    return f != NULL ? f->fd : -1;
}

int
kli_outfile_commit(struct kli_outfile *f, struct kli_err *err)
{
    int rc = KLI_OK;

    if (f == NULL)
        return err_set(err, KLI_E_INVALID, "kli_outfile_commit: NULL file");
    if (f->tmp == NULL) {   /* streaming: nothing to rename */
        int r = close(f->fd);
        f->fd = -1;
        if (r != 0)
            rc = err_set(err, KLI_E_IO, "%s: write error: %s", f->path, strerror(errno));
        kli_outfile_abort(f);
        return rc;
    }
    if (fsync(f->fd) != 0 || close(f->fd) != 0) {
        f->fd = -1;
        rc = err_set(err, KLI_E_IO, "%s: write error: %s", f->tmp, strerror(errno));
        kli_outfile_abort(f);
        return rc;
    }
    f->fd = -1;
    if (rename(f->tmp, f->path) != 0) {
        rc = err_set(err, KLI_E_IO, "%s: %s", f->path, strerror(errno));
        kli_outfile_abort(f);
        return rc;
    }
    f->tmp = NULL;

    /* the rename itself is durable once the directory is synced */
    const char *slash = strrchr(f->path, '/');
    int dfd;
    if (slash == NULL) {
        dfd = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } else if (slash == f->path) {
        dfd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } else {
        *(char *)slash = '\0';
        dfd = open(f->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        *(char *)slash = '/';
    }
    if (dfd >= 0) {
        if (fsync(dfd) != 0 && errno != EINVAL && errno != EROFS)
            rc = err_set(err, KLI_E_IO, "%s: syncing its directory: %s", f->path,
                             strerror(errno));
        close(dfd);
    }
    kli_outfile_abort(f);
    return rc;
}

int
k_write_file(const char *path, const void *p, size_t n, struct kli_err *err)
{
    struct kli_outfile *f;
    int rc;

    if ((rc = kli_outfile_open(&f, path, 0, err)) != KLI_OK)
        return rc;
    if ((rc = write_all(f->fd, p, n, path, err)) != KLI_OK) {
        kli_outfile_abort(f);
        return rc;
    }
    return kli_outfile_commit(f, err);
}

/* ==== outputs that are inputs =============================================================== */

int
kli_output_check(const char *out, const char *in, struct kli_err *err)
{
    struct stat so, si, se;
    char path[PATH_MAX];
    struct dirent *de;
    DIR *d;
    int rc = KLI_OK;

    if (out == NULL || in == NULL || stat(out, &so) != 0 || stat(in, &si) != 0)
        return KLI_OK;
    if (so.st_dev == si.st_dev && so.st_ino == si.st_ino)
        return err_set(err, KLI_E_INVALID, "%s is the input %s: writing it would destroy "
                           "what is being read; choose another output", out, in);
    if (!S_ISDIR(si.st_mode) || (d = opendir(in)) == NULL)
        return KLI_OK;
    while (rc == KLI_OK && (de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (snprintf(path, sizeof(path), "%s/%s", in, de->d_name) >= (int)sizeof(path))
            continue;
        if (stat(path, &se) == 0 && se.st_dev == so.st_dev && se.st_ino == so.st_ino)
            rc = err_set(err, KLI_E_INVALID, "%s is the input file %s: writing it would "
                             "destroy what is being read; choose another output", out, path);
    }
    closedir(d);
    return rc;
}
