/*
 * prefix.c - the prefix cache of the scheduler (sched.c): evaluated prompt prefixes kept as
 * sessions.
 *
 * An entry is a session (created with batch_max 1, so it holds little besides its state)
 * whose state is that after a prompt prefix; its token history is the key. Finding the
 * longest cached prefix of a prompt is a linear scan with memcmp: entries are few (each
 * holds the whole recurrent state of the model, megabytes for a real one), and a scan costs
 * far less than evaluating one token. Entries are evicted least recently used first once
 * their kli_session_nbytes exceed the budget.
 *
 * The directory form stores each entry as a snapshot file "<key>-<len>.klisnap", where key
 * is FNV-1a-64 over the model key (8 bytes, little-endian) and the len tokens (4 bytes
 * each, little-endian). Files are written under a private temporary name and renamed, so
 * several processes (the shards of one job) may share a directory. Only the names are read
 * at start; a prompt is looked up by hashing its first len tokens for each len present, and
 * a loaded snapshot's token history is compared with the prompt, so a hash collision or a
 * foreign file can only cost a miss.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kli.h"
#include "internal.h"
#include "prefix.h"
#include "util.h"

struct prefix_entry {
    struct kli_session *s;
    uint64_t bytes;
    uint64_t used;                /* the clock value of its last use, for LRU */
};

struct prefix_disk {
    uint64_t key;
    int32_t len;
};

struct prefix_cache {
    const struct kli_model *m;
    uint64_t max_bytes, bytes, clock, model_key;
    int32_t cache_type;                /* of every session kept (enum kli_cache_type) */
    struct prefix_entry *e;
    int32_t n, cap;
    char *dir;                    /* NULL: memory only */
    struct prefix_disk *disk;     /* files known in dir */
    int32_t n_disk, cap_disk;
    struct kli_prefix_stats st;
};

/* ==== keys and the directory =============================================================== */

static uint64_t
prefix_hash(uint64_t model_key, const kli_token *toks, int32_t n)
{
    uint8_t b[8];
    uint64_t h;

    util_wr64(b, model_key);
    h = util_fnv1a(UTIL_FNV_BASIS, b, 8);
    for (int32_t k = 0; k < n; k++) {
        util_wr32(b, (uint32_t)toks[k]);
        h = util_fnv1a(h, b, 4);
    }
    return h;
}

static int
prefix_disk_add(struct prefix_cache *c, uint64_t key, int32_t len)
{
    for (int32_t i = 0; i < c->n_disk; i++) {
        if (c->disk[i].key == key && c->disk[i].len == len)
            return 0;
    }
    struct prefix_disk *nd = k_grow(c->disk, c->n_disk, &c->cap_disk, 64, sizeof(*nd));
    if (nd == NULL)
        return -1;
    c->disk = nd;
    c->disk[c->n_disk].key = key;
    c->disk[c->n_disk++].len = len;
    return 0;
}

static int
prefix_disk_has(const struct prefix_cache *c, uint64_t key, int32_t len)
{
    for (int32_t i = 0; i < c->n_disk; i++) {
        if (c->disk[i].key == key && c->disk[i].len == len)
            return 1;
    }
    return 0;
}

static void
prefix_path(const struct prefix_cache *c, uint64_t key, int32_t len, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s/%016" PRIx64 "-%d.klisnap", c->dir, key, (int)len);
}

/* Learns the names of the snapshots already in the directory. */
static int
prefix_disk_scan(struct prefix_cache *c, struct kli_err *err)
{
    DIR *d;
    struct dirent *de;

    if (mkdir(c->dir, 0777) != 0 && errno != EEXIST) {
        return err_set(err, KLI_E_IO, "%s: %s", c->dir, strerror(errno));
    }
    if ((d = opendir(c->dir)) == NULL) {
        return err_set(err, KLI_E_IO, "%s: %s", c->dir, strerror(errno));
    }
    while ((de = readdir(d)) != NULL) {
        const char *nm = de->d_name;
        char *end;
        if (strlen(nm) < 18 || nm[16] != '-')
            continue;
        errno = 0;
        uint64_t key = strtoull(nm, &end, 16);
        if (errno != 0 || end != nm + 16)
            continue;
        long len = strtol(nm + 17, &end, 10);
        if (end == nm + 17 || len < 1 || len > INT32_MAX || strcmp(end, ".klisnap") != 0)
            continue;
        if (prefix_disk_add(c, key, (int32_t)len) != 0) {
            closedir(d);
            return err_set(err, KLI_E_NOMEM, "out of memory");
        }
    }
    closedir(d);
    return 0;
}

/* Writes the snapshot of `s` to the directory: a private temporary name, then rename. */
static int
prefix_disk_save(struct prefix_cache *c, const struct kli_session *s, uint64_t key,
                 int32_t len)
{
    struct kli_err err = {0};
    char path[4096];
    int64_t cap = (int64_t)kli_session_nbytes(s) + 65536, need;
    void *buf = malloc((size_t)cap);
    struct kli_outfile *of;
    int rc = -1;

    if (buf == NULL)
        return -1;
    need = kli_session_snapshot(s, NULL, buf, cap, &err);
    if (need > cap) {
        void *nb = realloc(buf, (size_t)need);
        if (nb == NULL)
            goto out;
        buf = nb;
        cap = need;
        need = kli_session_snapshot(s, NULL, buf, cap, &err);
    }
    if (need < 0 || need > cap)
        goto out;
    prefix_path(c, key, len, path, sizeof(path));
    /* a new file renamed into place (kli_outfile): a crashed or concurrent writer leaves no
     * partial state under the name another run would load */
    if (kli_outfile_open(&of, path, 0, &err) != KLI_OK)
        goto out;
    for (size_t done = 0; done < (size_t)need;) {
        ssize_t k = write(kli_outfile_fd(of), (char *)buf + done, (size_t)need - done);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            kli_outfile_abort(of);
            goto out;
        }
        done += (size_t)k;
    }
    if (kli_outfile_commit(of, &err) != KLI_OK)
        goto out;
    rc = 0;
out:
    free(buf);
    return rc;
}

/* ==== the in-memory entries ================================================================ */

static void
prefix_drop(struct prefix_cache *c, int32_t i)
{
    c->bytes -= c->e[i].bytes;
    kli_session_free(c->e[i].s);
    c->e[i] = c->e[--c->n];
}

/* Evicts least recently used entries, never `keep`, until the budget holds. */
static void
prefix_trim(struct prefix_cache *c, const struct kli_session *keep)
{
    while (c->bytes > c->max_bytes) {
        int32_t lru = -1;
        for (int32_t i = 0; i < c->n; i++) {
            if (c->e[i].s != keep && (lru < 0 || c->e[i].used < c->e[lru].used))
                lru = i;
        }
        if (lru < 0)
            break;
        prefix_drop(c, lru);
        c->st.evicted++;
    }
}

/* Takes ownership of `s` as a new entry. */
static int
prefix_insert(struct prefix_cache *c, struct kli_session *s)
{
    struct prefix_entry *ne = k_grow(c->e, c->n, &c->cap, 16, sizeof(*ne));
    if (ne == NULL)
        return -1;
    c->e = ne;
    c->e[c->n].s = s;
    c->e[c->n].bytes = kli_session_nbytes(s);
    c->e[c->n].used = ++c->clock;
    c->bytes += c->e[c->n].bytes;
    c->n++;
    c->st.stored++;
    prefix_trim(c, s);
    return 0;
}

/* A session with room for exactly `len` tokens and the smallest scratch. */
static int
prefix_session(struct prefix_cache *c, int32_t len, struct kli_session **out,
               struct kli_err *err)
{
    struct kli_session_options o;

    kli_session_options_init(&o);
    o.ctx_max = len;
    o.batch_max = 1;
    o.cache_type = c->cache_type;
    return kli_session_create(out, c->m, &o, err);
}

/* ==== the interface ======================================================================== */

int
prefix_cache_create(struct prefix_cache **out, const struct kli_model *m, uint64_t max_bytes,
                    const char *dir, uint64_t model_key, int32_t cache_type,
                    struct kli_err *err)
{
    struct prefix_cache *c = calloc(1, sizeof(*c));

    *out = NULL;
    if (c == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    c->m = m;
    c->max_bytes = max_bytes;
    /* states of another cache type are other states: f32 keeps the keys it always had */
    c->model_key = model_key ^ (0x9e3779b97f4a7c15ULL * (uint64_t)cache_type);
    c->cache_type = cache_type;
    if (dir != NULL) {
        int rc = (c->dir = strdup(dir)) == NULL ? err_set(err, KLI_E_NOMEM, "out of memory")
                                                 : prefix_disk_scan(c, err);
        if (rc != KLI_OK) {
            prefix_cache_free(c);
            return rc;
        }
    }
    *out = c;
    return 0;
}

void
prefix_cache_free(struct prefix_cache *c)
{
    if (c == NULL)
        return;
    for (int32_t i = 0; i < c->n; i++)
        kli_session_free(c->e[i].s);
    free(c->e);
    free(c->disk);
    free(c->dir);
    free(c);
}

const struct kli_session *
prefix_cache_find(struct prefix_cache *c, const kli_token *toks, int32_t n, int32_t *len)
{
    int32_t best = -1, best_len = 0;

    *len = 0;
    prefix_trim(c, NULL);
    for (int32_t i = 0; i < c->n; i++) {
        const kli_token *et;
        int32_t el = kli_session_tokens(c->e[i].s, &et);
        if (el > best_len && el <= n && memcmp(et, toks, (size_t)el * sizeof(kli_token)) == 0) {
            best = i;
            best_len = el;
        }
    }
    /* A longer prefix in the directory? Try the lengths present there, longest first. */
    for (int32_t upper = n;;) {
        int32_t dl = 0, at = -1;
        for (int32_t i = 0; i < c->n_disk; i++) {
            int32_t l = c->disk[i].len;
            if (l > best_len && l <= upper && l > dl)
                dl = l;
        }
        if (dl == 0)
            break;
        uint64_t key = prefix_hash(c->model_key, toks, dl);
        for (int32_t i = 0; i < c->n_disk; i++) {
            if (c->disk[i].key == key && c->disk[i].len == dl)
                at = i;
        }
        if (at >= 0) {
            struct kli_session *s = NULL;
            struct kli_err err = {0};
            const kli_token *lt;
            char path[4096];
            prefix_path(c, key, dl, path, sizeof(path));
            if (prefix_session(c, dl, &s, &err) == KLI_OK &&
                kli_session_load(s, NULL, path, &err) == KLI_OK &&
                kli_session_tokens(s, &lt) == dl &&
                memcmp(lt, toks, (size_t)dl * sizeof(kli_token)) == 0 &&
                prefix_insert(c, s) == 0) {
                c->st.disk_loads++;
                *len = dl;
                return s;
            }
            /* Damaged, foreign or a collision: never try this file again. */
            kli_session_free(s);
            c->st.disk_errors++;
            c->disk[at] = c->disk[--c->n_disk];
        }
        upper = dl - 1;
    }
    if (best < 0)
        return NULL;
    c->e[best].used = ++c->clock;
    *len = best_len;
    return c->e[best].s;
}

int
prefix_cache_put(struct prefix_cache *c, const struct kli_session *s, struct kli_err *err)
{
    const kli_token *toks;
    int32_t len = kli_session_tokens(s, &toks);
    struct kli_session *copy = NULL;

    if (len < 1)
        return 0;
    for (int32_t i = 0; i < c->n; i++) {
        const kli_token *et;
        if (kli_session_tokens(c->e[i].s, &et) == len &&
            memcmp(et, toks, (size_t)len * sizeof(kli_token)) == 0) {
            c->e[i].used = ++c->clock;
            return 0;
        }
    }
    int rc, saved = 1;
    if ((rc = prefix_session(c, len, &copy, err)) != KLI_OK ||
        (rc = kli_session_copy(copy, s, err)) != KLI_OK) {
        kli_session_free(copy);
        return rc;
    }
    if (c->dir != NULL) {
        uint64_t key = prefix_hash(c->model_key, toks, len);
        if (!prefix_disk_has(c, key, len)) {
            if (prefix_disk_save(c, copy, key, len) == 0 && prefix_disk_add(c, key, len) == 0) {
                c->st.disk_saves++;
            } else {
                c->st.disk_errors++;
                saved = 0;
            }
        }
    }
    if (prefix_insert(c, copy) != 0) {
        kli_session_free(copy);
        return err_set(err, KLI_E_NOMEM, "out of memory");
    }
    /* kept in memory all the same; the caller passes this on as a notice */
    if (!saved)
        return err_set(err, KLI_E_IO, "%s: a prefix of %d tokens could not be saved",
                       c->dir, (int)len);
    return 0;
}

void
prefix_cache_stats(const struct prefix_cache *c, struct kli_prefix_stats *st)
{
    *st = c->st;
    st->entries = c->n;
    st->bytes = (int64_t)c->bytes;
}
