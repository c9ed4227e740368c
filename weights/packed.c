/*
 * packed.c - kli's own weight file (.kli): reader and streaming writer.
 *
 * One file holds everything a model needs: config.json, the tokenizer files, a tensor
 * directory and the tensor data, each tensor row-major in the dtype the kernels read, so
 * opening is a mmap plus checks of a few small sections. The byte layout is specified in
 * kli-pack(5); in short:
 *
 *     [0, 512)         header: magic, version, byte-order mark, file size, section table,
 *                      XXH64 of the header itself
 *     CONFIG           config.json text + NUL
 *     TOKENIZER        lengths, tiktoken.model text + NUL, tokenizer_config.json text + NUL
 *     DIRECTORY        counts, tensor records (128 bytes), group records (32 bytes), names
 *     DATA             tensors, 64-byte aligned; each routed expert's w1, w3, w2 one run
 *                      that starts on a page and whose last page no other tensor shares
 *
 * Every integer is little-endian. Every section carries an XXH64 in the section table; the
 * small ones are verified at open, the DATA section per tensor on request (wfile_verify)
 * because reading it all would make opening as slow as the model is large.
 *
 * Checklist: a change of the layout needs kli-pack(5) updated, KLI_PACK_VERSION_MINOR bumped
 * for a compatible addition (a new section kind, longer records) or _MAJOR for anything an
 * older reader would misread, and tests/fuzz/fuzz-packed.c's resealing kept in step.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "util.h"
#include "wbuf.h"
#include "weights.h"
#include "xxhash.h"

#ifndef O_CLOEXEC
#define O_CLOEXEC 0
#endif

enum {
    PACK_HEADER_SIZE = 512,
    PACK_HEADER_SUM = 504,        /* the header's own checksum covers bytes [0, 504) */
    PACK_TABLE = 64,              /* the section table starts here */
    PACK_MAX_SECTIONS = 8,
    PACK_SECTION_SIZE = 32,
    PACK_ALIGN = 4096,            /* the alignment this writer uses (the header records it) */
    PACK_TENSOR_ALIGN = 64,       /* every tensor starts on a cache line */
    PACK_DIR_HEAD = 32,
    PACK_TENSOR_REC = 128,
    PACK_GROUP_REC = 32,
    PACK_MAX_NAME = 512,
    PACK_BOM = 0x01020304,
};

enum pack_kind {
    PACK_CONFIG = 1,
    PACK_TOKENIZER = 2,
    PACK_DIRECTORY = 3,
    PACK_DATA = 4,
};

static const char *const pack_kind_names[] = {"?", "config", "tokenizer", "directory", "data"};

/* ==== Small helpers ======================================================================== */

static uint64_t
pack_align(uint64_t x, uint64_t a)
{
    return (x + a - 1) / a * a;
}

KLI_PRINTF(4, 5) static int
pack_err(struct kli_err *err, int code, const char *fname, const char *fmt, ...)
{
    char what[200];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    return err_set(err, code, "%s%s: %s", err_path_tail(fname) == fname ? "" : "...",
                       err_path_tail(fname), what);
}

/* Bytes of `numel` elements of dt, or UINT64_MAX when not whole blocks or too large. */
static uint64_t
pack_nbytes(enum k_dtype dt, const int64_t *shape, int32_t ndim, uint64_t numel)
{
    int32_t blk = dtype_info(dt)->block;
    uint64_t bb = (uint64_t)dtype_info(dt)->block_bytes;

    if (blk > 1 && (ndim == 0 || shape[ndim - 1] % blk != 0))
        return UINT64_MAX;
    if (numel / (uint64_t)blk > UINT64_MAX / bb)
        return UINT64_MAX;
    return dtype_nbytes(dt, numel);
}

/* Element count of a shape, or -1 when a dimension is negative or the count exceeds 2^62. */
static int64_t
pack_numel(const int64_t *shape, int32_t ndim)
{
    uint64_t n = 1;

    for (int32_t k = 0; k < ndim; k++) {
        if (shape[k] < 0)
            return -1;
        if (shape[k] != 0 && n > ((uint64_t)1 << 62) / (uint64_t)shape[k])
            return -1;
        n *= (uint64_t)shape[k];
    }
    return (int64_t)n;
}

/* ==== Reader =============================================================================== */

struct pack_section {
    uint64_t offset, size, checksum;
    int present;
};

/* A byte range of the data section owned by one tensor or one group (page-rounded). */
struct pack_range {
    uint64_t begin, end;
    int64_t idx;       /* descriptor index (relative to the first one this file added) */
};

static int
pack_range_cmp(const void *a, const void *b)
{
    const struct pack_range *x = a, *y = b;

    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

void
pack_info_free(struct pack_info *info)
{
    if (info == NULL)
        return;
    free(info->groups);
    free(info->checksums);
    memset(info, 0, sizeof(*info));
}

int
pack_probe(const char *path)
{
    return file_has_magic(path, KLI_PACK_MAGIC, 8);
}

/* The header: magic, its checksum, version, byte order, sizes, then the section table. A
 * section of a kind this reader does not know is skipped (a later minor version may add
 * one); each known kind may appear once. */
static int
pack_parse_header(const uint8_t *base, uint64_t size, const char *fname,
                  struct pack_section sec[5], uint64_t *align, struct pack_info *info,
                  struct kli_err *err)
{
    uint64_t fsize;
    uint32_t n_sec;
    uint16_t major, minor;

    if (size < PACK_HEADER_SIZE) {
        return pack_err(err, KLI_E_FORMAT, fname, "truncated: %llu bytes, too short for the "
                        "%d-byte header", (unsigned long long)size, PACK_HEADER_SIZE);
    }
    if (memcmp(base, KLI_PACK_MAGIC, 8) != 0)
        return pack_err(err, KLI_E_FORMAT, fname, "not a .kli file (no KLIPACK magic)");
    if (!util_host_le()) {
        return pack_err(err, KLI_E_UNSUPPORTED, fname, "kli reads .kli tensor data in place, "
                        "which needs a little-endian host");
    }
    major = util_rd16(base + 8);
    minor = util_rd16(base + 10);
    if (xxh64(base, PACK_HEADER_SUM, 0) != util_rd64(base + PACK_HEADER_SUM)) {
        if (major != KLI_PACK_VERSION_MAJOR) {
            return pack_err(err, KLI_E_UNSUPPORTED, fname, "format version %u.%u is not "
                            "supported (this kli reads %d.x), or the header is damaged",
                            major, minor, KLI_PACK_VERSION_MAJOR);
        }
        return pack_err(err, KLI_E_FORMAT, fname, "section \"header\" is damaged (checksum "
                        "mismatch)");
    }
    if (major != KLI_PACK_VERSION_MAJOR) {
        return pack_err(err, KLI_E_UNSUPPORTED, fname, "format version %u.%u is not supported "
                        "(this kli reads %d.x)", major, minor, KLI_PACK_VERSION_MAJOR);
    }
    info->version_major = major;
    info->version_minor = minor;
    if (util_rd32(base + 12) != PACK_BOM) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"header\": byte-order mark "
                        "0x%08x is not 0x%08x", util_rd32(base + 12), PACK_BOM);
    }
    if (util_rd32(base + 16) != PACK_HEADER_SIZE) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"header\": header size %u is not "
                        "%d", util_rd32(base + 16), PACK_HEADER_SIZE);
    }
    *align = util_rd32(base + 20);
    if (*align < PACK_TENSOR_ALIGN || *align > (1u << 20) || (*align & (*align - 1)) != 0) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"header\": alignment %llu is not a "
                        "power of two in [64, 2^20]", (unsigned long long)*align);
    }
    fsize = util_rd64(base + 24);
    if (size < fsize) {
        return pack_err(err, KLI_E_FORMAT, fname, "truncated: the header says %llu bytes, the "
                        "file has %llu", (unsigned long long)fsize, (unsigned long long)size);
    }
    if (size > fsize) {
        return pack_err(err, KLI_E_FORMAT, fname, "%llu bytes follow the end the header gives "
                        "(%llu bytes): the file was appended to or damaged",
                        (unsigned long long)(size - fsize), (unsigned long long)fsize);
    }
    n_sec = util_rd32(base + 32);
    if (n_sec > PACK_MAX_SECTIONS) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"header\": %u sections, at most %d",
                        n_sec, PACK_MAX_SECTIONS);
    }
    memset(sec, 0, 5 * sizeof(*sec));
    for (uint32_t i = 0; i < n_sec; i++) {
        const uint8_t *e = base + PACK_TABLE + i * PACK_SECTION_SIZE;
        uint32_t kind = util_rd32(e);
        struct pack_section s = {util_rd64(e + 8), util_rd64(e + 16), util_rd64(e + 24), 1};

        if (kind < PACK_CONFIG || kind > PACK_DATA)
            continue;
        if (sec[kind].present) {
            return pack_err(err, KLI_E_FORMAT, fname, "section \"header\": section \"%s\" is "
                            "listed twice", pack_kind_names[kind]);
        }
        if (s.offset < PACK_HEADER_SIZE || s.offset > size || s.size > size - s.offset) {
            return pack_err(err, KLI_E_FORMAT, fname, "section \"%s\" at [%llu, +%llu) lies "
                            "outside the file (%llu bytes) or over the header",
                            pack_kind_names[kind], (unsigned long long)s.offset,
                            (unsigned long long)s.size, (unsigned long long)size);
        }
        sec[kind] = s;
    }
    for (int k = PACK_CONFIG; k <= PACK_DATA; k++) {
        if (!sec[k].present && k != PACK_TOKENIZER) {
            return pack_err(err, KLI_E_FORMAT, fname, "section \"%s\" is missing",
                            pack_kind_names[k]);
        }
    }
    /* Known sections may not share a byte. */
    for (int a = PACK_CONFIG; a <= PACK_DATA; a++) {
        for (int b = a + 1; b <= PACK_DATA; b++) {
            if (sec[a].size == 0 || sec[b].size == 0)
                continue;
            if (sec[a].offset < sec[b].offset + sec[b].size &&
                sec[b].offset < sec[a].offset + sec[a].size) {
                return pack_err(err, KLI_E_FORMAT, fname, "sections \"%s\" and \"%s\" overlap",
                                pack_kind_names[a], pack_kind_names[b]);
            }
        }
    }
    if (sec[PACK_DATA].offset % *align != 0) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"data\" at %llu is not aligned to "
                        "%llu", (unsigned long long)sec[PACK_DATA].offset,
                        (unsigned long long)*align);
    }
    info->data_checksum = sec[PACK_DATA].checksum;
    return KLI_OK;
}

/* TOKENIZER: u64 ranks_len, u64 config_len, u32 flags (bit 0: tokenizer_config.json
 * present), u32 reserved, the tiktoken.model text + NUL, the tokenizer_config.json text +
 * NUL. An empty section means no tokenizer. */
static int
pack_parse_tokenizer(const uint8_t *p, uint64_t size, const char *fname,
                     struct pack_info *info, struct kli_err *err)
{
    uint64_t rl, cl;
    uint32_t flags;

    if (size == 0)
        return KLI_OK;
    if (size < 26)
        return pack_err(err, KLI_E_FORMAT, fname, "section \"tokenizer\" is too short");
    rl = util_rd64(p);
    cl = util_rd64(p + 8);
    flags = util_rd32(p + 16);
    if (rl > size - 26 || cl != size - 26 - rl) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"tokenizer\": lengths %llu + %llu "
                        "do not fill its %llu bytes", (unsigned long long)rl,
                        (unsigned long long)cl, (unsigned long long)size);
    }
    if (p[24 + rl] != 0 || p[25 + rl + cl] != 0)
        return pack_err(err, KLI_E_FORMAT, fname, "section \"tokenizer\": text not NUL-terminated");
    if ((flags & 1) == 0 && cl != 0) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"tokenizer\": a tokenizer_config.json "
                        "text but its flag is clear");
    }
    info->tok_ranks = (const char *)p + 24;
    info->tok_ranks_len = rl;
    if (flags & 1) {
        info->tok_config = (const char *)p + 25 + rl;
        info->tok_config_len = cl;
    }
    return KLI_OK;
}

/* One tensor record into *d (name copied). `i` numbers it in messages until the name is
 * known. */
static int
pack_parse_tensor(const uint8_t *rec, const uint8_t *strings, uint64_t ss, const uint8_t *base,
                  uint64_t data_begin, uint64_t data_end, int64_t i, const char *fname,
                  struct tensor_desc *d, uint64_t *sum, struct kli_err *err)
{
    uint64_t name_off = util_rd64(rec), off = util_rd64(rec + 88), nb = util_rd64(rec + 96);
    uint32_t name_len = util_rd32(rec + 8), dt = util_rd32(rec + 12), layout = util_rd32(rec + 16);
    uint32_t ndim = util_rd32(rec + 20);
    const char *name;
    int64_t numel;

    memset(d, 0, sizeof(*d));
    if (name_len == 0 || name_len > PACK_MAX_NAME || name_off > ss || name_len >= ss - name_off ||
        strings[name_off + name_len] != 0 || memchr(strings + name_off, 0, name_len) != NULL) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"directory\": tensor %lld: bad name "
                        "(offset %llu, %u bytes, in %llu bytes of names)", (long long)i,
                        (unsigned long long)name_off, name_len, (unsigned long long)ss);
    }
    name = (const char *)strings + name_off;
    if (dt >= KLI_DT_COUNT) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"directory\": tensor \"%.64s\": "
                        "unknown dtype code %u", name, dt);
    }
    if (layout != 0) {
        return pack_err(err, KLI_E_UNSUPPORTED, fname, "tensor \"%.64s\": layout %u is not "
                        "known to this kli (0 = row-major)", name, layout);
    }
    if (ndim > KLI_MAX_DIMS) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"directory\": tensor \"%.64s\": %u "
                        "dimensions, at most %d", name, ndim, KLI_MAX_DIMS);
    }
    for (uint32_t k = 0; k < ndim; k++) {
        uint64_t v = util_rd64(rec + 24 + 8 * k);

        if (v > ((uint64_t)1 << 62)) {
            return pack_err(err, KLI_E_FORMAT, fname, "section \"directory\": tensor \"%.64s\": "
                            "shape[%u] is too large", name, k);
        }
        d->shape[k] = (int64_t)v;
    }
    numel = pack_numel(d->shape, (int32_t)ndim);
    if (numel < 0) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"directory\": tensor \"%.64s\": the "
                        "element count overflows", name);
    }
    if (dt != KLI_DT_OTHER && pack_nbytes(dt, d->shape, (int32_t)ndim, (uint64_t)numel) != nb) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"directory\": tensor \"%.64s\": %llu "
                        "bytes do not match its %u-d shape of %s", name,
                        (unsigned long long)nb, ndim, k_dtype_name(dt));
    }
    if (off < data_begin || off > data_end || nb > data_end - off ||
        off % PACK_TENSOR_ALIGN != 0) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"directory\": tensor \"%.64s\": "
                        "bytes [%llu, +%llu) are not 64-byte aligned inside the data section "
                        "[%llu, %llu)", name, (unsigned long long)off, (unsigned long long)nb,
                        (unsigned long long)data_begin, (unsigned long long)data_end);
    }
    if (rec[112 + 15] != 0 || rec[112] == 0) {
        return pack_err(err, KLI_E_FORMAT, fname, "section \"directory\": tensor \"%.64s\": "
                        "dtype name is empty or not NUL-terminated", name);
    }
    d->name = k_strdup(name);
    if (d->name == NULL)
        return pack_err(err, KLI_E_NOMEM, fname, "out of memory");
    d->dtype = (enum k_dtype)dt;
    snprintf(d->dtype_name, sizeof(d->dtype_name), "%s", (const char *)rec + 112);
    d->ndim = (int32_t)ndim;
    d->numel = numel;
    d->data = base + off;
    d->nbytes = nb;
    *sum = util_rd64(rec + 104);
    return KLI_OK;
}

/* What k_pack_parse reads one file with: the mapping, where the data section lies, and
 * the directory's counts; the per-section steps below share it. */
struct pack_parse {
    const uint8_t *base;
    const char *fname;
    uint64_t align, data_begin, data_end;
    const uint8_t *dir;             /* the directory section */
    uint64_t nt, ng, ss, trs, grs;  /* tensors, groups, name bytes, record sizes */
    struct tensor_desc **descs;
    int64_t n0;                     /* the first descriptor this file adds */
    int64_t *owner;                 /* [nt]: the group holding each tensor, or -1 */
};

/* The small sections' checksums, then CONFIG: the config.json text and a NUL. */
static int
pack_parse_config(const struct pack_parse *P, const struct pack_section sec[5],
                  struct pack_info *info, struct kli_err *err)
{
    for (int k = PACK_CONFIG; k <= PACK_DIRECTORY; k++) {
        if (sec[k].present && xxh64(P->base + sec[k].offset, (size_t)sec[k].size, 0) !=
            sec[k].checksum) {
            return pack_err(err, KLI_E_FORMAT, P->fname, "section \"%s\" is damaged (checksum "
                            "mismatch)", pack_kind_names[k]);
        }
    }
    if (sec[PACK_CONFIG].size == 0 ||
        P->base[sec[PACK_CONFIG].offset + sec[PACK_CONFIG].size - 1]) {
        return pack_err(err, KLI_E_FORMAT, P->fname,
                        "section \"config\" is not NUL-terminated text");
    }
    info->config = (const char *)P->base + sec[PACK_CONFIG].offset;
    info->config_len = sec[PACK_CONFIG].size - 1;
    return KLI_OK;
}

/* DIRECTORY's head: counts and record sizes, which must fit the section. */
static int
pack_parse_dir_head(struct pack_parse *P, const struct pack_section *dsec, struct kli_err *err)
{
    const uint8_t *dir = P->base + dsec->offset;
    uint64_t room;

    P->dir = dir;
    if (dsec->size < PACK_DIR_HEAD)
        return pack_err(err, KLI_E_FORMAT, P->fname, "section \"directory\" is too short");
    P->nt = util_rd64(dir);
    P->ng = util_rd64(dir + 8);
    P->ss = util_rd64(dir + 16);
    P->trs = util_rd32(dir + 24);
    P->grs = util_rd32(dir + 28);
    room = dsec->size - PACK_DIR_HEAD;
    if (P->trs < PACK_TENSOR_REC || P->grs < PACK_GROUP_REC || P->nt > room / P->trs ||
        P->ng > (room - P->nt * P->trs) / P->grs ||
        P->ss > room - P->nt * P->trs - P->ng * P->grs) {
        return pack_err(err, KLI_E_FORMAT, P->fname, "section \"directory\": %llu tensors, "
                        "%llu groups and %llu bytes of names do not fit its %llu bytes",
                        (unsigned long long)P->nt, (unsigned long long)P->ng,
                        (unsigned long long)P->ss, (unsigned long long)dsec->size);
    }
    return KLI_OK;
}

/* Room for the file's tensors in *descs (grown geometrically from *cap). */
static int
pack_grow_descs(const struct pack_parse *P, int64_t *cap, struct kli_err *err)
{
    uint64_t want = (uint64_t)P->n0 + P->nt, grow = (uint64_t)*cap * 2;
    struct tensor_desc *p;

    if (want <= (uint64_t)*cap)
        return KLI_OK;
    want = want < grow ? grow : want;
    want = want < 16 ? 16 : want;
    p = want > SIZE_MAX / sizeof(*p) ? NULL :
        k_reallocarray(*P->descs, (size_t)want, sizeof(*p));
    if (p == NULL) {
        return pack_err(err, KLI_E_NOMEM, P->fname, "out of memory for %llu tensors",
                        (unsigned long long)P->nt);
    }
    *P->descs = p;
    *cap = (int64_t)want;
    return KLI_OK;
}

/* The tensor records, appended to *descs (counted in *n as they are, so that a failure
 * frees exactly the names copied). */
static int
pack_parse_tensors(const struct pack_parse *P, int32_t file, int64_t *n,
                   struct pack_info *info, struct kli_err *err)
{
    const uint8_t *strings = P->dir + PACK_DIR_HEAD + P->nt * P->trs + P->ng * P->grs;
    int rc;

    for (uint64_t i = 0; i < P->nt; i++) {
        rc = pack_parse_tensor(P->dir + PACK_DIR_HEAD + i * P->trs, strings, P->ss, P->base,
                               P->data_begin, P->data_end, (int64_t)i, P->fname,
                               &(*P->descs)[*n], &info->checksums[i], err);
        if (rc != KLI_OK)
            return rc;
        (*P->descs)[*n].file = file;
        (*n)++;
        P->owner[i] = -1;
    }
    return KLI_OK;
}

/* Groups: runs of consecutive tensors in one range that starts on an alignment unit; its
 * units are its own (checked by pack_check_overlaps with the tensors' ranges). */
static int
pack_parse_groups(const struct pack_parse *P, struct pack_info *info, struct kli_err *err)
{
    const struct tensor_desc *descs = *P->descs;

    info->n_groups = (int64_t)P->ng;
    for (uint64_t g = 0; g < P->ng; g++) {
        const uint8_t *r = P->dir + PACK_DIR_HEAD + P->nt * P->trs + g * P->grs;
        struct tensor_group *G = &info->groups[g];
        uint64_t off = util_rd64(r), gs = util_rd64(r + 8), prev_end = off;
        uint64_t first = util_rd32(r + 16), cnt = util_rd32(r + 20);

        if (cnt == 0 || first >= P->nt || cnt > P->nt - first || off % P->align != 0 ||
            off < P->data_begin || off > P->data_end || gs > P->data_end - off) {
            return pack_err(err, KLI_E_FORMAT, P->fname, "section \"directory\": group %llu "
                            "(tensors %llu+%llu at [%llu, +%llu)) is out of bounds or not "
                            "aligned", (unsigned long long)g, (unsigned long long)first,
                            (unsigned long long)cnt, (unsigned long long)off,
                            (unsigned long long)gs);
        }
        for (uint64_t t = first; t < first + cnt; t++) {
            const struct tensor_desc *d = &descs[P->n0 + (int64_t)t];
            uint64_t toff = (uint64_t)((const uint8_t *)d->data - P->base);

            if (P->owner[t] >= 0 || toff < prev_end || (t == first && toff != off) ||
                toff + d->nbytes > off + gs) {
                return pack_err(err, KLI_E_FORMAT, P->fname, "section \"directory\": tensor "
                                "\"%.64s\" is not in order inside group %llu, or in two "
                                "groups", d->name, (unsigned long long)g);
            }
            P->owner[t] = (int64_t)g;
            prev_end = toff + d->nbytes;
        }
        G->data = P->base + off;
        G->offset = off;
        G->size = gs;
        G->first = P->n0 + (int64_t)first;
        G->n = (int32_t)cnt;
        G->layer = (int32_t)util_rd32(r + 24);
        G->expert = (int32_t)util_rd32(r + 28);
    }
    return KLI_OK;
}

/* No byte of the data section belongs to two tensors, and no tensor outside a group
 * touches the group's alignment units. `ranges` has room for nt + ng. */
static int
pack_check_overlaps(const struct pack_parse *P, const struct pack_info *info,
                    struct pack_range *ranges, struct kli_err *err)
{
    const struct tensor_desc *descs = *P->descs + P->n0;
    int64_t nr = 0, last = 0;   /* last: the range reaching furthest so far */

    for (uint64_t t = 0; t < P->nt; t++) {
        const struct tensor_desc *d = &descs[t];
        uint64_t toff = (uint64_t)((const uint8_t *)d->data - P->base);

        if (P->owner[t] < 0 && d->nbytes > 0)
            ranges[nr++] = (struct pack_range){toff, toff + d->nbytes, (int64_t)t};
    }
    for (uint64_t g = 0; g < P->ng; g++) {
        uint64_t end = pack_align(info->groups[g].offset + info->groups[g].size, P->align);

        ranges[nr++] = (struct pack_range){info->groups[g].offset,
                                           end < P->data_end ? end : P->data_end,
                                           -1 - (int64_t)g};
    }
    qsort(ranges, (size_t)nr, sizeof(*ranges), pack_range_cmp);
    for (int64_t k = 1; k < nr; k++) {
        if (ranges[k].end > ranges[k].begin && ranges[k].begin < ranges[last].end) {
            int64_t a = ranges[last].idx, b = ranges[k].idx;
            char wa[96], wb[96];

            if (a >= 0)
                snprintf(wa, sizeof(wa), "tensor \"%.64s\"", descs[a].name);
            else
                snprintf(wa, sizeof(wa), "group %lld", (long long)(-1 - a));
            if (b >= 0)
                snprintf(wb, sizeof(wb), "tensor \"%.64s\"", descs[b].name);
            else
                snprintf(wb, sizeof(wb), "group %lld", (long long)(-1 - b));
            return pack_err(err, KLI_E_FORMAT, P->fname, "section \"directory\": %s overlaps %s",
                            wa, wb);
        }
        if (ranges[k].end > ranges[last].end)
            last = k;
    }
    return KLI_OK;
}

/* The DATA section's checksum commits to the per-tensor ones. */
static int
pack_check_data(const struct pack_parse *P, const struct pack_info *info, uint64_t sum,
                struct kli_err *err)
{
    struct xxh64_state h;
    uint8_t b[8];

    xxh64_init(&h, 0);
    for (uint64_t t = 0; t < P->nt; t++) {
        util_wr64(b, info->checksums[t]);
        xxh64_update(&h, b, 8);
    }
    if (xxh64_digest(&h) != sum) {
        return pack_err(err, KLI_E_FORMAT, P->fname, "section \"data\": its checksum does not "
                        "match the tensor checksums in the directory");
    }
    return KLI_OK;
}

int
k_pack_parse(const uint8_t *base, uint64_t size, const char *fname, int32_t file,
               struct tensor_desc **descs, int64_t *n, int64_t *cap,
               struct pack_info *info, struct kli_err *err)
{
    struct pack_parse P = {.base = base, .fname = fname != NULL ? fname : "(memory)",
                           .align = PACK_ALIGN, .descs = descs, .n0 = *n};
    struct pack_section sec[5];
    struct pack_range *ranges = NULL;
    int rc;

    memset(info, 0, sizeof(*info));
    if ((rc = pack_parse_header(base, size, P.fname, sec, &P.align, info, err)) != KLI_OK ||
        (rc = pack_parse_config(&P, sec, info, err)) != KLI_OK)
        return rc;
    if (sec[PACK_TOKENIZER].present &&
        (rc = pack_parse_tokenizer(base + sec[PACK_TOKENIZER].offset, sec[PACK_TOKENIZER].size,
                                   P.fname, info, err)) != KLI_OK)
        goto fail;
    if ((rc = pack_parse_dir_head(&P, &sec[PACK_DIRECTORY], err)) != KLI_OK)
        goto fail;
    P.data_begin = sec[PACK_DATA].offset;
    P.data_end = P.data_begin + sec[PACK_DATA].size;
    if ((rc = pack_grow_descs(&P, cap, err)) != KLI_OK)
        goto fail;
    info->checksums = k_mallocarray((size_t)P.nt + 1, sizeof(*info->checksums));
    info->groups = k_mallocarray((size_t)P.ng + 1, sizeof(*info->groups));
    ranges = k_mallocarray((size_t)(P.nt + P.ng) + 1, sizeof(*ranges));
    P.owner = k_mallocarray((size_t)P.nt + 1, sizeof(*P.owner));
    if (info->checksums == NULL || info->groups == NULL || ranges == NULL || P.owner == NULL) {
        rc = pack_err(err, KLI_E_NOMEM, P.fname, "out of memory for %llu tensors",
                      (unsigned long long)P.nt);
        goto fail;
    }
    if ((rc = pack_parse_tensors(&P, file, n, info, err)) != KLI_OK ||
        (rc = pack_parse_groups(&P, info, err)) != KLI_OK ||
        (rc = pack_check_overlaps(&P, info, ranges, err)) != KLI_OK ||
        (rc = pack_check_data(&P, info, sec[PACK_DATA].checksum, err)) != KLI_OK)
        goto fail;
    free(ranges);
    free(P.owner);
    return KLI_OK;

fail:
    for (int64_t i = P.n0; i < *n; i++)
        free((char *)(*descs)[i].name);
    *n = P.n0;
    free(ranges);
    free(P.owner);
    pack_info_free(info);
    return rc;
}

int
wfile_verify(const struct wfile *w, kli_progress_fn progress, void *ud,
                 struct kli_err *err)
{
    const struct pack_info *info = wfile_pack(w);
    int64_t n = wfile_n_tensors(w);
    uint64_t done = 0, total = wfile_data_bytes(w);

    if (info == NULL)
        return KLI_OK;
    for (int64_t i = 0; i < n; i++) {
        const struct tensor_desc *d = wfile_tensor(w, i);
        uint64_t h = xxh64(d->data, (size_t)d->nbytes, 0);

        wfile_dontneed(w, d);
        if (h != info->checksums[i]) {
            return pack_err(err, KLI_E_FORMAT, wfile_file_path(w, d->file),
                            "section \"data\" is damaged: tensor \"%.64s\" does not match its "
                            "checksum", d->name);
        }
        done += d->nbytes;
        if (progress != NULL)
            progress(ud, done, total, d->name);
    }
    return KLI_OK;
}

/* ==== Writer ===============================================================================
 * Everything before the data section (header, config, tokenizer, directory) is laid out in
 * memory at open and written as zeros-for-now; the tensors stream after it through a write
 * buffer, each hashed as it passes; close fills in the checksums and writes the prefix again.
 * Peak memory: the prefix (a few MB for the largest models) plus the 8 MiB buffer (wbuf.h). */

struct pw_tensor {
    uint64_t offset, nbytes;
};

struct pack_writer {
    struct kli_outfile *of;      /* the replacement of path (outfile.c) */
    int fd;                      /* its descriptor */
    char *path;
    uint8_t *prefix;             /* [data_off] */
    uint64_t data_off, file_size;
    uint64_t dir_off;
    struct pw_tensor *t;         /* [n] */
    int64_t n, cur;              /* tensor being written */
    uint64_t cur_done;           /* of its bytes */
    struct xxh64_state h;        /* of tensor cur */
    struct xxh64_state hdata;    /* of the per-tensor checksums */
    struct k_wbuf wb;          /* the data section's appends */
};

static const uint8_t pw_zeros[4096];

void
pack_writer_abort(struct pack_writer *w)
{
    if (w == NULL)
        return;
    kli_outfile_abort(w->of);
    free(w->path);
    free(w->prefix);
    free(w->t);
    free(w->wb.buf);
    free(w);
}

static int
pw_pad_to(struct pack_writer *w, uint64_t off, struct kli_err *err)
{
    int rc;

    KLI_ASSERT(off >= w->wb.pos);
    while (w->wb.pos < off) {
        uint64_t k = off - w->wb.pos < sizeof(pw_zeros) ? off - w->wb.pos : sizeof(pw_zeros);

        if ((rc = wbuf_append(&w->wb, pw_zeros, k, err)) != KLI_OK)
            return rc;
    }
    return KLI_OK;
}

/* Finishes every complete tensor from cur on: records its checksum, pads to the next. */
static int
pw_advance(struct pack_writer *w, struct kli_err *err)
{
    int rc;

    while (w->cur < w->n && w->cur_done == w->t[w->cur].nbytes) {
        uint64_t sum = xxh64_digest(&w->h);
        uint8_t b[8];

        util_wr64(w->prefix + w->dir_off + PACK_DIR_HEAD + (uint64_t)w->cur * PACK_TENSOR_REC +
                   104, sum);
        util_wr64(b, sum);
        xxh64_update(&w->hdata, b, 8);
        w->cur++;
        w->cur_done = 0;
        xxh64_init(&w->h, 0);
        if (w->cur < w->n && (rc = pw_pad_to(w, w->t[w->cur].offset, err)) != KLI_OK)
            return rc;
    }
    return KLI_OK;
}

static int
pw_name_cmp(const void *a, const void *b)
{
    const struct pack_entry *const *x = a, *const *y = b;

    return strcmp((*x)->name, (*y)->name);
}

/* The entries must describe a valid file: names unique and sane, sizes matching shapes,
 * each group one run. */
static int
pw_check_entries(const char *path, const struct pack_entry *e, int64_t n,
                 struct kli_err *err)
{
    const struct pack_entry **v = NULL;
    int64_t *runs = NULL, n_runs = 0;
    int rc = KLI_OK;

    for (int64_t i = 0; i < n; i++) {
        size_t nl = e[i].name != NULL ? strlen(e[i].name) : 0;
        int64_t numel = e[i].ndim >= 0 && e[i].ndim <= KLI_MAX_DIMS ?
                        pack_numel(e[i].shape, e[i].ndim) : -1;

        if (nl == 0 || nl > PACK_MAX_NAME)
            return err_set(err, KLI_E_INVALID, "%s: tensor %lld: empty or long name", path,
                               (long long)i);
        if ((unsigned)e[i].dtype >= KLI_DT_COUNT || numel < 0 ||
            (e[i].dtype != KLI_DT_OTHER &&
             pack_nbytes(e[i].dtype, e[i].shape, e[i].ndim, (uint64_t)numel) != e[i].nbytes) ||
            (e[i].dtype_name != NULL && (e[i].dtype_name[0] == '\0' ||
                                         strlen(e[i].dtype_name) > 15)))
            return err_set(err, KLI_E_INVALID, "%s: tensor %s: dtype, shape and size "
                               "disagree", path, e[i].name);
        if (e[i].nbytes > ((uint64_t)1 << 56))
            return err_set(err, KLI_E_INVALID, "%s: tensor %s is too large", path,
                               e[i].name);
    }
    v = k_mallocarray((size_t)n + 1, sizeof(*v));
    runs = k_mallocarray((size_t)n + 1, sizeof(*runs));
    if (v == NULL || runs == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "%s: out of memory", path);
        goto out;
    }
    for (int64_t i = 0; i < n; i++) {
        v[i] = &e[i];
        if (e[i].group >= 0 && (i == 0 || e[i - 1].group != e[i].group))
            runs[n_runs++] = e[i].group;
    }
    qsort(v, (size_t)n, sizeof(*v), pw_name_cmp);
    for (int64_t i = 1; i < n; i++) {
        if (strcmp(v[i - 1]->name, v[i]->name) == 0) {
            rc = err_set(err, KLI_E_INVALID, "%s: tensor %s declared twice", path,
                             v[i]->name);
            goto out;
        }
    }
    for (int64_t i = 0; i < n_runs; i++) {
        for (int64_t j = i + 1; j < n_runs; j++) {
            if (runs[i] == runs[j]) {
                rc = err_set(err, KLI_E_INVALID, "%s: the tensors of group %lld are not "
                                 "consecutive", path, (long long)runs[i]);
                goto out;
            }
        }
    }
out:
    free(v);
    free(runs);
    return rc;
}

int
pack_writer_open(struct pack_writer **out, const char *path,
                     const struct pack_meta *meta, const struct pack_entry *entries,
                     int64_t n, struct kli_err *err)
{
    struct pack_writer *w;
    uint64_t cfg_off, cfg_size, tok_off, tok_size, tcl, dir_size, ss = 0, pos, n_groups = 0;
    int rc;

    *out = NULL;
    if (!util_host_le())
        return err_set(err, KLI_E_UNSUPPORTED, "%s: .kli files are written on "
                           "little-endian hosts only", path);
    if ((rc = pw_check_entries(path, entries, n, err)) != KLI_OK)
        return rc;
    w = k_calloc(1, sizeof(*w));
    if (w == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory writing %s", path);
    w->fd = -1;
    w->n = n;
    w->path = k_strdup(path);
    w->t = k_calloc((size_t)n + 1, sizeof(*w->t));
    w->wb.buf = k_malloc(KLI_WBUF_SIZE);
    if (w->path == NULL || w->t == NULL || w->wb.buf == NULL)
        goto nomem;

    /* Layout: header, config, tokenizer and directory (64-byte aligned), then the data. */
    for (int64_t i = 0; i < n; i++) {
        ss += strlen(entries[i].name) + 1;
        n_groups += entries[i].group >= 0 && (i == 0 || entries[i - 1].group != entries[i].group);
    }
    cfg_off = PACK_HEADER_SIZE;
    cfg_size = meta->config_len + 1;
    tok_off = pack_align(cfg_off + cfg_size, PACK_TENSOR_ALIGN);
    tcl = meta->tok_config != NULL ? meta->tok_config_len : 0;
    tok_size = meta->tok_ranks != NULL ? 26 + meta->tok_ranks_len + tcl : 0;
    w->dir_off = pack_align(tok_off + tok_size, PACK_TENSOR_ALIGN);
    dir_size = PACK_DIR_HEAD + (uint64_t)n * PACK_TENSOR_REC + n_groups * PACK_GROUP_REC + ss;
    w->data_off = pack_align(w->dir_off + dir_size, PACK_ALIGN);
    if (w->data_off > SIZE_MAX) {
        rc = err_set(err, KLI_E_NOMEM, "%s: metadata too large", path);
        goto fail;
    }
    /* A group starts on a page, and so does whatever follows it. */
    pos = w->data_off;
    for (int64_t i = 0; i < n; i++) {
        int starts = entries[i].group >= 0 && (i == 0 || entries[i - 1].group != entries[i].group);
        int after = i > 0 && entries[i - 1].group >= 0 && entries[i - 1].group != entries[i].group;

        pos = pack_align(pos, starts || after ? PACK_ALIGN : PACK_TENSOR_ALIGN);
        w->t[i].offset = pos;
        w->t[i].nbytes = entries[i].nbytes;
        pos += entries[i].nbytes;
    }
    w->file_size = pack_align(pos, PACK_ALIGN);

    /* The prefix, complete but for the checksums. */
    w->prefix = k_calloc(1, (size_t)w->data_off);
    if (w->prefix == NULL)
        goto nomem;
    {
        uint8_t *h = w->prefix, *d = w->prefix + w->dir_off;
        uint8_t *rec = d + PACK_DIR_HEAD, *grp = rec + (uint64_t)n * PACK_TENSOR_REC;
        uint8_t *str = grp + n_groups * PACK_GROUP_REC;
        uint64_t so = 0;

        memcpy(h, KLI_PACK_MAGIC, 8);
        util_wr16(h + 8, KLI_PACK_VERSION_MAJOR);
        util_wr16(h + 10, KLI_PACK_VERSION_MINOR);
        util_wr32(h + 12, PACK_BOM);
        util_wr32(h + 16, PACK_HEADER_SIZE);
        util_wr32(h + 20, PACK_ALIGN);
        util_wr64(h + 24, w->file_size);
        util_wr32(h + 32, 4);
        {
            const uint64_t so_[4][3] = {
                {PACK_CONFIG, cfg_off, cfg_size}, {PACK_TOKENIZER, tok_off, tok_size},
                {PACK_DIRECTORY, w->dir_off, dir_size},
                {PACK_DATA, w->data_off, w->file_size - w->data_off},
            };
            for (int k = 0; k < 4; k++) {
                uint8_t *e = h + PACK_TABLE + k * PACK_SECTION_SIZE;

                util_wr32(e, (uint32_t)so_[k][0]);
                util_wr64(e + 8, so_[k][1]);
                util_wr64(e + 16, so_[k][2]);
            }
        }
        if (meta->config_len > 0)
            memcpy(h + cfg_off, meta->config, (size_t)meta->config_len);
        if (tok_size > 0) {
            uint8_t *t = h + tok_off;

            util_wr64(t, meta->tok_ranks_len);
            util_wr64(t + 8, tcl);
            util_wr32(t + 16, meta->tok_config != NULL);
            memcpy(t + 24, meta->tok_ranks, (size_t)meta->tok_ranks_len);
            if (tcl > 0)
                memcpy(t + 25 + meta->tok_ranks_len, meta->tok_config, (size_t)tcl);
        }
        util_wr64(d, (uint64_t)n);
        util_wr64(d + 8, n_groups);
        util_wr64(d + 16, ss);
        util_wr32(d + 24, PACK_TENSOR_REC);
        util_wr32(d + 28, PACK_GROUP_REC);
        for (int64_t i = 0; i < n; i++, rec += PACK_TENSOR_REC) {
            const struct pack_entry *e = &entries[i];
            size_t nl = strlen(e->name);
            const char *dn = e->dtype_name != NULL ? e->dtype_name : dtype_st_name(e->dtype);

            util_wr64(rec, so);
            util_wr32(rec + 8, (uint32_t)nl);
            util_wr32(rec + 12, (uint32_t)e->dtype);
            util_wr32(rec + 16, 0);   /* layout: row-major */
            util_wr32(rec + 20, (uint32_t)e->ndim);
            for (int k = 0; k < e->ndim; k++)
                util_wr64(rec + 24 + 8 * k, (uint64_t)e->shape[k]);
            util_wr64(rec + 88, w->t[i].offset);
            util_wr64(rec + 96, e->nbytes);
            snprintf((char *)rec + 112, 16, "%s", dn);
            memcpy(str + so, e->name, nl + 1);
            so += nl + 1;
            if (e->group >= 0 && (i == 0 || entries[i - 1].group != e->group)) {
                int64_t j = i;

                while (j + 1 < n && entries[j + 1].group == e->group)
                    j++;
                util_wr64(grp, w->t[i].offset);
                util_wr64(grp + 8, w->t[j].offset + w->t[j].nbytes - w->t[i].offset);
                util_wr32(grp + 16, (uint32_t)i);
                util_wr32(grp + 20, (uint32_t)(j - i + 1));
                util_wr32(grp + 24, (uint32_t)e->layer);
                util_wr32(grp + 28, (uint32_t)e->expert);
                grp += PACK_GROUP_REC;
            }
        }
    }

    if ((rc = kli_outfile_open(&w->of, path, 0, err)) != KLI_OK)
        goto fail;
    w->fd = kli_outfile_fd(w->of);
    if ((rc = write_all(w->fd, w->prefix, (size_t)w->data_off, w->path, err)) != KLI_OK)
        goto fail;
    w->wb.fd = w->fd;
    w->wb.name = w->path;
    w->wb.pos = w->data_off;
    xxh64_init(&w->h, 0);
    xxh64_init(&w->hdata, 0);
    if (n > 0 && (rc = pw_pad_to(w, w->t[0].offset, err)) != KLI_OK)
        goto fail;
    if ((rc = pw_advance(w, err)) != KLI_OK)
        goto fail;
    *out = w;
    return KLI_OK;
nomem:
    rc = err_set(err, KLI_E_NOMEM, "out of memory writing %s", path);
fail:
    pack_writer_abort(w);
    return rc;
}

int
pack_writer_write(struct pack_writer *w, const void *data, uint64_t nbytes,
                      struct kli_err *err)
{
    const uint8_t *p = data;
    int rc;

    while (nbytes > 0) {
        uint64_t take;

        if (w->cur >= w->n)
            return err_set(err, KLI_E_INVALID, "%s: more tensor bytes than declared",
                               w->path);
        take = w->t[w->cur].nbytes - w->cur_done;
        take = take < nbytes ? take : nbytes;
        xxh64_update(&w->h, p, (size_t)take);
        if ((rc = wbuf_append(&w->wb, p, take, err)) != KLI_OK)
            return rc;
        w->cur_done += take;
        p += take;
        nbytes -= take;
        if ((rc = pw_advance(w, err)) != KLI_OK)
            return rc;
    }
    return KLI_OK;
}

int
pack_writer_sink(void *w, const void *data, uint64_t nbytes, struct kli_err *err)
{
    return pack_writer_write(w, data, nbytes, err);
}

int
pack_writer_close(struct pack_writer *w, struct kli_err *err)
{
    uint8_t *h = w->prefix;
    int rc;

    if (w->cur < w->n) {
        rc = err_set(err, KLI_E_INVALID, "%s: tensor %lld of %lld is incomplete", w->path,
                         (long long)w->cur, (long long)w->n);
        goto fail;
    }
    if ((rc = pw_pad_to(w, w->file_size, err)) != KLI_OK ||
        (rc = wbuf_flush(&w->wb, err)) != KLI_OK)
        goto fail;
    /* Section checksums, then the header's own. */
    for (int k = 0; k < 4; k++) {
        uint8_t *e = h + PACK_TABLE + k * PACK_SECTION_SIZE;
        uint64_t sum = util_rd32(e) == PACK_DATA ? xxh64_digest(&w->hdata) :
                       xxh64(h + util_rd64(e + 8), (size_t)util_rd64(e + 16), 0);

        util_wr64(e + 24, sum);
    }
    util_wr64(h + PACK_HEADER_SUM, xxh64(h, PACK_HEADER_SUM, 0));
    for (uint64_t o = 0; o < w->data_off;) {
        ssize_t k = pwrite(w->fd, h + o, (size_t)(w->data_off - o), (off_t)o);

        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            rc = err_set(err, KLI_E_IO, "%s: write error: %s", w->path,
                             strerror(k < 0 ? errno : ENOSPC));
            goto fail;
        }
        o += (uint64_t)k;
    }
    rc = kli_outfile_commit(w->of, err);
    w->of = NULL;
    pack_writer_abort(w);
    return rc;
fail:
    pack_writer_abort(w);
    return rc;
}
