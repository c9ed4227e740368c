/*
 * safetensors.c - the safetensors reader and the Hugging Face sharded checkpoint.
 *
 * A safetensors file is: u64 LE header length N, N bytes of JSON (an object, maybe padded
 * with spaces), then the data buffer. Each header entry gives a tensor's dtype, shape and
 * [begin, end) byte range in the buffer. Everything here is about distrust: every length,
 * offset and size is checked before a pointer into the mapping is handed out, so that a
 * descriptor returned by this file can be read in full. See doc/formats.md section 2.
 *
 * Checklist: a new safetensors dtype needs a row in st_dtypes; a new kli dtype needs its
 * mapping there too (and the dtype.h checklist).
 */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "internal.h"
#include "mmap.h"
#include "util.h"
#include "gguf.h"
#include "weights.h"

#define ST_MAX_HEADER 100000000u   /* the reference reader's limit on N */
#define ST_MAX_INDEX 100000000u    /* the index JSON (about 2 MB for a 20k-tensor model) */
#define ST_MAX_NAME 512            /* bytes in a tensor name */
#define ST_MAX_INT 9007199254740992.0   /* 2^53: above it a JSON number is not exact */
#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SINGLE_NAME "model.safetensors"

/* Every dtype the safetensors format defines. Those kli cannot compute with are still
 * accepted (KLI_DT_OTHER) so a checkpoint with, say, an I64 position table opens, and their
 * bounds are checked like any other tensor's. Sizes are in bits for the sub-byte floats. */
struct st_dtype {
    const char *name;
    enum k_dtype dt;
    int bits;
};

static const struct st_dtype st_dtypes[] = {
    {"F32", KLI_DT_F32, 32},
    {"F16", KLI_DT_F16, 16},
    {"BF16", KLI_DT_BF16, 16},
    {"BOOL", KLI_DT_OTHER, 8},
    {"U8", KLI_DT_OTHER, 8},
    {"I8", KLI_DT_OTHER, 8},
    {"I16", KLI_DT_OTHER, 16},
    {"U16", KLI_DT_OTHER, 16},
    {"I32", KLI_DT_OTHER, 32},
    {"U32", KLI_DT_OTHER, 32},
    {"I64", KLI_DT_OTHER, 64},
    {"U64", KLI_DT_OTHER, 64},
    {"F64", KLI_DT_OTHER, 64},
    {"C64", KLI_DT_OTHER, 64},
    {"F8_E5M2", KLI_DT_OTHER, 8},
    {"F8_E4M3", KLI_DT_OTHER, 8},
    {"F8_E4M3FNUZ", KLI_DT_OTHER, 8},
    {"F8_E5M2FNUZ", KLI_DT_OTHER, 8},
    {"F8_E8M0", KLI_DT_OTHER, 8},
    {"F6_E2M3", KLI_DT_OTHER, 6},
    {"F6_E3M2", KLI_DT_OTHER, 6},
    {"F4", KLI_DT_OTHER, 4},
    /* kli's own block-quantized types (written by `kli quantize`; bits = 0 marks them):
     * rows of whole blocks (32 elements, 256 for the K types), sized by dtype_nbytes. */
    {"KLI_Q8_0", KLI_DT_Q8_0, 0},
    {"KLI_Q4", KLI_DT_Q4, 0},
    {"KLI_Q2_K", KLI_DT_Q2_K, 0},
    {"KLI_Q3_K", KLI_DT_Q3_K, 0},
    {"KLI_Q4_K", KLI_DT_Q4_K, 0},
    {"KLI_Q5_K", KLI_DT_Q5_K, 0},
    {"KLI_Q6_K", KLI_DT_Q6_K, 0},
};

/* One tensor's byte range in the data buffer, for the overlap check. */
struct st_range {
    uint64_t begin;
    uint64_t end;
    int64_t idx;   /* into the descriptor array */
};

struct wfile {
    struct k_mmap *maps;           /* [n_files] */
    char **paths;                    /* [n_files], as opened */
    int32_t n_files;
    struct tensor_desc *descs;   /* [n] file after file, each in header order */
    int64_t n;
    int64_t cap;
    int64_t *slots;                  /* [mask + 1] hash table: descriptor index + 1, 0 empty */
    uint64_t mask;
    uint64_t data_bytes;
    struct pack_info *pack;      /* a .kli file (packed.c); NULL for safetensors */
    struct gguf_view *gguf;      /* a GGUF file (gguf_kimi.c) */
    struct pack_meta meta;       /* wfile_meta of a .kli */
};

/* ==== Small helpers ==== */

/* Sets "<file>: tensor "<name>": <problem>". */
KLI_PRINTF(5, 6) static int
st_terr(struct kli_err *err, int code, const char *fname, const char *name,
        const char *fmt, ...)
{
    char what[200];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    return err_set(err, code, "%s%s: tensor \"%.64s%s\": %s",
                       err_path_tail(fname) == fname ? "" : "...", err_path_tail(fname), name,
                       strlen(name) > 64 ? "..." : "", what);
}

/* A JSON number that must be a non-negative integer below 2^53.
 * @return 0, or 1 not a number, 2 negative, 3 not an integer, 4 too large. */
static int
st_json_uint(const cJSON *v, uint64_t *out)
{
    double d;

    if (!cJSON_IsNumber(v))
        return 1;
    d = v->valuedouble;
    if (d < 0)
        return 2;
    if (!(d <= ST_MAX_INT))   /* also catches NaN */
        return 4;
    *out = (uint64_t)d;
    if ((double)*out != d)
        return 3;
    return 0;
}

static const char *
st_uint_problem(int why)
{
    switch (why) {
    case 1: return "is not a number";
    case 2: return "is negative";
    case 3: return "is not an integer";
    default: return "is too large";
    }
}

static const struct st_dtype *
st_dtype_find(const char *s)
{
    for (size_t i = 0; i < KLI_ARRAY_LEN(st_dtypes); i++) {
        if (strcmp(st_dtypes[i].name, s) == 0)
            return &st_dtypes[i];
    }
    return NULL;
}

static int
st_range_cmp(const void *a, const void *b)
{
    const struct st_range *x = a, *y = b;

    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return 0;
}

static int
st_desc_name_cmp(const void *a, const void *b)
{
    const struct tensor_desc *const *x = a, *const *y = b;

    return strcmp((*x)->name, (*y)->name);
}

static int
st_str_cmp(const void *a, const void *b)
{
    const char *const *x = a, *const *y = b;

    return strcmp(*x, *y);
}

static char *
st_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = k_malloc(a + b + 2);

    if (p == NULL)
        return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

/* Parses `len` bytes of JSON text that must hold one value followed only by whitespace.
 * cJSON 1.7.15 and older read a byte past `len` on some inputs (cJSON issue #800, fixed in
 * 1.7.18), so it gets a NUL-terminated heap copy, never the mapping itself.
 * @return KLI_OK; KLI_E_FORMAT with the byte offset of the problem in *where (-1 unknown)
 *         and *trailing set when the value parsed but garbage follows; KLI_E_NOMEM. */
static int
st_json_parse(const char *text, uint64_t len, cJSON **out, long long *where, int *trailing)
{
    const char *end = NULL;
    char *copy;
    cJSON *root;

    *out = NULL;
    *where = -1;
    *trailing = 0;
    copy = len < SIZE_MAX ? k_malloc((size_t)len + 1) : NULL;
    if (copy == NULL)
        return KLI_E_NOMEM;
    memcpy(copy, text, (size_t)len);
    copy[len] = '\0';
    root = cJSON_ParseWithLengthOpts(copy, (size_t)len, &end, 0);
    if (root == NULL) {
        if (end != NULL)
            *where = (long long)(end - copy);
        free(copy);
        return KLI_E_FORMAT;
    }
    for (const char *p = end; p < copy + len; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            *where = (long long)(p - copy);
            *trailing = 1;
            cJSON_Delete(root);
            free(copy);
            return KLI_E_FORMAT;
        }
    }
    free(copy);
    *out = root;
    return KLI_OK;
}

/* ==== One safetensors image ==== */

/* Parses one header entry into *d (name copied) and its byte range into *r. */
static int
st_parse_tensor(const cJSON *item, const char *fname, const uint8_t *data, uint64_t dsize,
                int32_t file, struct tensor_desc *d, struct st_range *r,
                struct kli_err *err)
{
    const char *name = item->string;
    const cJSON *jdtype = NULL, *jshape = NULL, *joff = NULL, *f, *v;
    const struct st_dtype *dt;
    uint64_t numel = 1, off[2], nbytes;
    size_t len = strlen(name);
    int ndim = 0, why;

    memset(d, 0, sizeof(*d));
    if (len == 0)
        return st_terr(err, KLI_E_FORMAT, fname, "", "empty tensor name");
    if (len > ST_MAX_NAME) {
        return st_terr(err, KLI_E_FORMAT, fname, name, "name of %zu bytes is longer than %d",
                       len, ST_MAX_NAME);
    }
    if (!cJSON_IsObject(item))
        return st_terr(err, KLI_E_FORMAT, fname, name, "entry is not a JSON object");
    cJSON_ArrayForEach(f, item) {
        const cJSON **slot = NULL;

        if (strcmp(f->string, "dtype") == 0)
            slot = &jdtype;
        else if (strcmp(f->string, "shape") == 0)
            slot = &jshape;
        else if (strcmp(f->string, "data_offsets") == 0)
            slot = &joff;
        else
            continue;   /* unknown keys are ignored, as the reference reader does */
        if (*slot != NULL) {
            return st_terr(err, KLI_E_FORMAT, fname, name, "duplicate key \"%s\"",
                           f->string);
        }
        *slot = f;
    }

    if (!cJSON_IsString(jdtype))
        return st_terr(err, KLI_E_FORMAT, fname, name, "missing or non-string \"dtype\"");
    dt = st_dtype_find(jdtype->valuestring);
    if (dt == NULL) {
        return st_terr(err, KLI_E_FORMAT, fname, name, "unknown dtype \"%.32s\"",
                       jdtype->valuestring);
    }

    if (!cJSON_IsArray(jshape))
        return st_terr(err, KLI_E_FORMAT, fname, name, "missing or non-array \"shape\"");
    cJSON_ArrayForEach(v, jshape) {
        uint64_t dim = 0;

        if (ndim == KLI_MAX_DIMS) {
            return st_terr(err, KLI_E_FORMAT, fname, name,
                           "shape has more than %d dimensions", KLI_MAX_DIMS);
        }
        why = st_json_uint(v, &dim);
        if (why != 0) {
            return st_terr(err, KLI_E_FORMAT, fname, name, "shape[%d] %s", ndim,
                           st_uint_problem(why));
        }
        /* numel stays below 2^63 so it fits int64_t. */
        if (dim != 0 && numel > (uint64_t)INT64_MAX / dim) {
            return st_terr(err, KLI_E_FORMAT, fname, name,
                           "shape overflows: the element count exceeds 2^63");
        }
        numel *= dim;
        d->shape[ndim++] = (int64_t)dim;
    }
    if (dt->bits == 0) {
        int32_t blk = dtype_info(dt->dt)->block;

        if (ndim == 0 || d->shape[ndim - 1] % blk != 0) {
            return st_terr(err, KLI_E_FORMAT, fname, name,
                           "%s rows must be whole blocks of %d elements", dt->name, blk);
        }
        nbytes = dtype_nbytes(dt->dt, numel);
    } else if (dt->bits % 8 == 0) {
        uint64_t size = (uint64_t)dt->bits / 8;

        if (numel > UINT64_MAX / size) {
            return st_terr(err, KLI_E_FORMAT, fname, name,
                           "shape overflows: the byte size exceeds 2^64");
        }
        nbytes = numel * size;
    } else {
        /* Sub-byte floats (F4, F6_*): whole bytes only, counted without overflow. */
        uint64_t tail_bits = numel % 8 * (uint64_t)dt->bits;

        if (tail_bits % 8 != 0) {
            return st_terr(err, KLI_E_FORMAT, fname, name,
                           "%llu elements of %s are not a whole number of bytes",
                           (unsigned long long)numel, dt->name);
        }
        nbytes = numel / 8 * (uint64_t)dt->bits + tail_bits / 8;
    }

    if (!cJSON_IsArray(joff))
        return st_terr(err, KLI_E_FORMAT, fname, name, "missing or non-array \"data_offsets\"");
    {
        int k = 0;

        cJSON_ArrayForEach(v, joff) {
            if (k == 2)
                break;
            why = st_json_uint(v, &off[k]);
            if (why != 0) {
                return st_terr(err, KLI_E_FORMAT, fname, name, "data_offsets[%d] %s", k,
                               st_uint_problem(why));
            }
            k++;
        }
        if (k != 2 || v != NULL) {
            return st_terr(err, KLI_E_FORMAT, fname, name,
                           "data_offsets is not a pair [begin, end]");
        }
    }
    if (off[1] < off[0]) {
        return st_terr(err, KLI_E_FORMAT, fname, name,
                       "data_offsets end %llu is before begin %llu",
                       (unsigned long long)off[1], (unsigned long long)off[0]);
    }
    if (off[1] > dsize) {
        return st_terr(err, KLI_E_FORMAT, fname, name,
                       "data_offsets [%llu, %llu] run past the end of the data (%llu bytes)",
                       (unsigned long long)off[0], (unsigned long long)off[1],
                       (unsigned long long)dsize);
    }
    if (off[1] - off[0] != nbytes) {
        return st_terr(err, KLI_E_FORMAT, fname, name,
                       "size mismatch: data_offsets span %llu bytes but %d-d shape of %s "
                       "needs %llu", (unsigned long long)(off[1] - off[0]), ndim, dt->name,
                       (unsigned long long)nbytes);
    }

    d->name = k_strdup(name);
    if (d->name == NULL)
        return st_terr(err, KLI_E_NOMEM, fname, name, "out of memory");
    d->dtype = dt->dt;
    snprintf(d->dtype_name, sizeof(d->dtype_name), "%s", dt->name);
    d->ndim = ndim;
    d->numel = (int64_t)numel;
    d->data = data + off[0];
    d->nbytes = nbytes;
    d->file = file;
    r->begin = off[0];
    r->end = off[1];
    return KLI_OK;
}

/* "__metadata__": an object whose values are all strings. Its contents are not kept. */
static int
st_check_metadata(const cJSON *meta, const char *fname, struct kli_err *err)
{
    const cJSON *v;

    if (!cJSON_IsObject(meta))
        return err_set(err, KLI_E_FORMAT, "%s: __metadata__ is not an object", fname);
    cJSON_ArrayForEach(v, meta) {
        if (!cJSON_IsString(v)) {
            return err_set(err, KLI_E_FORMAT,
                               "%s: __metadata__ value \"%.64s\" is not a string", fname,
                               v->string);
        }
    }
    return KLI_OK;
}

/* Two tensors of one file with the same name (cJSON keeps both keys). */
static int
st_check_duplicates(const struct tensor_desc *descs, int64_t n, const char *fname,
                    struct kli_err *err)
{
    const struct tensor_desc **v;
    int rc = KLI_OK;

    if (n < 2)
        return KLI_OK;
    v = k_mallocarray((size_t)n, sizeof(*v));
    if (v == NULL)
        return err_set(err, KLI_E_NOMEM, "%s: out of memory", fname);
    for (int64_t i = 0; i < n; i++)
        v[i] = &descs[i];
    qsort(v, (size_t)n, sizeof(*v), st_desc_name_cmp);
    for (int64_t i = 1; i < n; i++) {
        if (strcmp(v[i - 1]->name, v[i]->name) == 0) {
            rc = st_terr(err, KLI_E_FORMAT, fname, v[i]->name,
                         "duplicate tensor name in the header");
            break;
        }
    }
    free(v);
    return rc;
}

/* No byte may belong to two tensors. Empty tensors occupy nothing and may sit anywhere.
 * Holes are allowed: they cost nothing to a reader. */
static int
st_check_overlaps(struct st_range *r, int64_t n, const struct tensor_desc *descs,
                  const char *fname, struct kli_err *err)
{
    uint64_t max_end = 0;
    int64_t owner = -1;

    qsort(r, (size_t)n, sizeof(*r), st_range_cmp);
    for (int64_t i = 0; i < n; i++) {
        if (r[i].begin == r[i].end)
            continue;
        if (owner >= 0 && r[i].begin < max_end) {
            return st_terr(err, KLI_E_FORMAT, fname, descs[r[i].idx].name,
                           "data_offsets [%llu, %llu] overlap tensor \"%.64s\"",
                           (unsigned long long)r[i].begin, (unsigned long long)r[i].end,
                           descs[owner].name);
        }
        if (r[i].end > max_end) {
            max_end = r[i].end;
            owner = r[i].idx;
        }
    }
    return KLI_OK;
}

int
safetensors_parse(const uint8_t *base, uint64_t size, const char *fname, int32_t file,
                      struct tensor_desc **descs, int64_t *n, int64_t *cap,
                      struct kli_err *err)
{
    const int64_t n0 = *n;
    const char *hdr;
    long long where;
    int trailing;
    const cJSON *item, *meta = NULL;
    cJSON *root = NULL;
    struct st_range *ranges = NULL;
    uint64_t hlen, dsize, count = 0;
    int64_t n_ranges = 0;
    int rc;

    if (fname == NULL)
        fname = "(memory)";
    if (size < 8) {
        return err_set(err, KLI_E_FORMAT,
                           "%s: truncated: %llu bytes, too short for the 8-byte header length",
                           fname, (unsigned long long)size);
    }
    hlen = util_rd64(base);
    if (hlen > ST_MAX_HEADER) {
        return err_set(err, KLI_E_FORMAT,
                           "%s: header length %llu exceeds the limit of %u bytes", fname,
                           (unsigned long long)hlen, ST_MAX_HEADER);
    }
    if (hlen > size - 8) {
        return err_set(err, KLI_E_FORMAT,
                           "%s: truncated: header length %llu runs past the end of the file "
                           "(%llu bytes)", fname, (unsigned long long)hlen,
                           (unsigned long long)size);
    }
    hdr = (const char *)base + 8;
    if (hlen == 0 || hdr[0] != '{') {
        return err_set(err, KLI_E_FORMAT,
                           "%s: header is not a JSON object (it does not start with '{')",
                           fname);
    }
    /* The writer pads the header with spaces; anything else after the object is garbage. */
    rc = st_json_parse(hdr, hlen, &root, &where, &trailing);
    if (rc == KLI_E_NOMEM) {
        return err_set(err, rc, "%s: out of memory for a %llu-byte header", fname,
                           (unsigned long long)hlen);
    }
    if (rc != KLI_OK) {
        return err_set(err, rc, "%s: header is not valid JSON (%s at byte %lld of %llu)",
                           fname, trailing ? "garbage after the object" : "error", where,
                           (unsigned long long)hlen);
    }
    if (!cJSON_IsObject(root)) {
        rc = err_set(err, KLI_E_FORMAT, "%s: header is not a JSON object", fname);
        goto fail;
    }
    dsize = size - 8 - hlen;

    cJSON_ArrayForEach(item, root)
        count++;
    if (count == 0) {
        /* "{}": a file without tensors. Nothing to add, and *descs may still be NULL, where
         * the checks below would do arithmetic on it. */
        cJSON_Delete(root);
        return KLI_OK;
    }
    if ((uint64_t)n0 + count > (uint64_t)*cap) {
        uint64_t want = (uint64_t)n0 + count;
        uint64_t grow = (uint64_t)*cap * 2;
        struct tensor_desc *p;

        if (grow > want)
            want = grow;
        if (want < 16)
            want = 16;
        p = want > SIZE_MAX ? NULL : k_reallocarray(*descs, (size_t)want, sizeof(*p));
        if (p == NULL) {
            rc = err_set(err, KLI_E_NOMEM, "%s: out of memory for %llu tensors", fname,
                             (unsigned long long)count);
            goto fail;
        }
        *descs = p;
        *cap = (int64_t)want;
    }
    ranges = k_mallocarray((size_t)count, sizeof(*ranges));
    if (ranges == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "%s: out of memory", fname);
        goto fail;
    }

    cJSON_ArrayForEach(item, root) {
        if (strcmp(item->string, "__metadata__") == 0) {
            if (meta != NULL) {
                rc = err_set(err, KLI_E_FORMAT, "%s: duplicate __metadata__", fname);
                goto fail;
            }
            meta = item;
            rc = st_check_metadata(meta, fname, err);
            if (rc != KLI_OK)
                goto fail;
            continue;
        }
        rc = st_parse_tensor(item, fname, base + 8 + hlen, dsize, file, &(*descs)[*n],
                             &ranges[n_ranges], err);
        if (rc != KLI_OK)
            goto fail;
        ranges[n_ranges++].idx = *n;
        (*n)++;
    }

    rc = st_check_duplicates(*descs + n0, *n - n0, fname, err);
    if (rc != KLI_OK)
        goto fail;
    rc = st_check_overlaps(ranges, n_ranges, *descs, fname, err);
    if (rc != KLI_OK)
        goto fail;

    free(ranges);
    cJSON_Delete(root);
    return KLI_OK;

fail:
    for (int64_t i = n0; i < *n; i++)
        free((char *)(*descs)[i].name);
    *n = n0;
    free(ranges);
    cJSON_Delete(root);
    return rc;
}

void
safetensors_free_descs(struct tensor_desc *descs, int64_t n)
{
    if (descs == NULL)
        return;
    for (int64_t i = 0; i < n; i++)
        free((char *)descs[i].name);
    free(descs);
}

/* ==== The checkpoint: files, shards and the name table ==== */

/* Maps `path` as file number w->n_files and appends its tensors. */
static int
st_add_file(struct wfile *w, const char *path, struct kli_err *err)
{
    struct k_mmap *maps;
    char **paths;
    int32_t i = w->n_files;
    int rc;

    maps = k_reallocarray(w->maps, (size_t)i + 1, sizeof(*maps));
    if (maps == NULL)
        return err_set(err, KLI_E_NOMEM, "%s: out of memory", path);
    w->maps = maps;
    paths = k_reallocarray(w->paths, (size_t)i + 1, sizeof(*paths));
    if (paths == NULL)
        return err_set(err, KLI_E_NOMEM, "%s: out of memory", path);
    w->paths = paths;
    w->paths[i] = k_strdup(path);
    if (w->paths[i] == NULL)
        return err_set(err, KLI_E_NOMEM, "%s: out of memory", path);
    rc = mmap_open(&w->maps[i], path, err);
    if (rc != KLI_OK) {
        free(w->paths[i]);
        return rc;
    }
    w->n_files++;
    if (gguf_probe(path)) {
        return gguf_kimi_open(w->maps[i].base, w->maps[i].size, path, i, &w->descs, &w->n,
                              &w->cap, &w->gguf, err);
    }
    if (w->pack != NULL) {
        return k_pack_parse(w->maps[i].base, w->maps[i].size, path, i, &w->descs, &w->n,
                              &w->cap, w->pack, err);
    }
    return safetensors_parse(w->maps[i].base, w->maps[i].size, path, i, &w->descs,
                                 &w->n, &w->cap, err);
}

/* FNV-1a: short, and good enough for tensor names. */
static uint64_t
st_hash(const char *s)
{
    uint64_t h = 14695981039346656037ull;

    for (; *s != '\0'; s++) {
        h ^= (uint8_t)*s;
        h *= 1099511628211ull;
    }
    return h;
}

/* Builds the name table; a name in two files (shards) is an error. */
static int
st_build_table(struct wfile *w, struct kli_err *err)
{
    uint64_t size = 16;

    while (size < (uint64_t)w->n * 2)
        size *= 2;
    w->slots = k_calloc((size_t)size, sizeof(*w->slots));
    if (w->slots == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory for %lld tensor names",
                           (long long)w->n);
    w->mask = size - 1;
    w->data_bytes = 0;
    for (int64_t i = 0; i < w->n; i++) {
        const struct tensor_desc *d = &w->descs[i];
        uint64_t h = st_hash(d->name) & w->mask;

        while (w->slots[h] != 0) {
            const struct tensor_desc *o = &w->descs[w->slots[h] - 1];

            if (strcmp(o->name, d->name) == 0) {
                return st_terr(err, KLI_E_FORMAT, w->paths[d->file], d->name,
                               "also found in %s", err_path_tail(w->paths[o->file]));
            }
            h = (h + 1) & w->mask;
        }
        w->slots[h] = i + 1;
        w->data_bytes += d->nbytes;
    }
    return KLI_OK;
}

/* A shard named by the index must be a plain file name next to the index. */
static int
st_shard_name_ok(const char *s)
{
    return s[0] != '\0' && strcmp(s, ".") != 0 && strcmp(s, "..") != 0 &&
           strchr(s, '/') == NULL && strchr(s, '\\') == NULL;
}

/* model.safetensors.index.json: {"metadata": {...}, "weight_map": {tensor: shard}}. Opens
 * every shard once (in sorted name order, which is the file order of tensor_desc.file)
 * and checks that each tensor is where the index says. */
static int
st_open_index(struct wfile *w, const char *dir, const char *ipath, struct kli_err *err)
{
    struct k_mmap im = {0};
    cJSON *root = NULL;
    const cJSON *map, *e;
    const char **shards = NULL;
    uint8_t *claimed = NULL;
    char *spath = NULL;
    long long where;
    int64_t n_entries = 0, n_shards = 0;
    int trailing;
    int rc;

    rc = mmap_open(&im, ipath, err);
    if (rc != KLI_OK)
        return rc;
    if (im.size > ST_MAX_INDEX) {
        rc = err_set(err, KLI_E_FORMAT, "%s: %llu bytes is too large for an index", ipath,
                         (unsigned long long)im.size);
        goto fail;
    }
    rc = st_json_parse((const char *)im.base, im.size, &root, &where, &trailing);
    if (rc == KLI_E_NOMEM) {
        rc = err_set(err, rc, "%s: out of memory", ipath);
        goto fail;
    }
    if (rc != KLI_OK) {
        rc = err_set(err, rc, "%s: index is not valid JSON (%s at byte %lld)", ipath,
                         trailing ? "garbage after the object" : "error", where);
        goto fail;
    }
    if (!cJSON_IsObject(root)) {
        rc = err_set(err, KLI_E_FORMAT, "%s: index is not a JSON object", ipath);
        goto fail;
    }
    map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(map)) {
        rc = err_set(err, KLI_E_FORMAT, "%s: index has no \"weight_map\" object", ipath);
        goto fail;
    }
    cJSON_ArrayForEach(e, map) {
        if (!cJSON_IsString(e)) {
            rc = err_set(err, KLI_E_FORMAT,
                             "%s: weight_map entry \"%.64s\" is not a string", ipath,
                             e->string);
            goto fail;
        }
        if (!st_shard_name_ok(e->valuestring)) {
            rc = err_set(err, KLI_E_FORMAT,
                             "%s: weight_map entry \"%.64s\": shard \"%.64s\" is not a plain "
                             "file name", ipath, e->string, e->valuestring);
            goto fail;
        }
        n_entries++;
    }
    if (n_entries == 0) {
        rc = err_set(err, KLI_E_FORMAT, "%s: weight_map is empty", ipath);
        goto fail;
    }

    /* The distinct shard names, sorted. */
    shards = k_mallocarray((size_t)n_entries, sizeof(*shards));
    if (shards == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "%s: out of memory", ipath);
        goto fail;
    }
    cJSON_ArrayForEach(e, map)
        shards[n_shards++] = e->valuestring;
    qsort(shards, (size_t)n_shards, sizeof(*shards), st_str_cmp);
    {
        int64_t u = 0;

        for (int64_t i = 0; i < n_shards; i++) {
            if (u == 0 || strcmp(shards[u - 1], shards[i]) != 0)
                shards[u++] = shards[i];
        }
        n_shards = u;
    }
    if (n_shards > INT32_MAX) {
        rc = err_set(err, KLI_E_FORMAT, "%s: too many shards", ipath);
        goto fail;
    }

    for (int64_t i = 0; i < n_shards; i++) {
        spath = st_join(dir, shards[i]);
        if (spath == NULL) {
            rc = err_set(err, KLI_E_NOMEM, "%s: out of memory", ipath);
            goto fail;
        }
        rc = st_add_file(w, spath, err);
        if (rc != KLI_OK)
            goto fail;
        free(spath);
        spath = NULL;
    }
    rc = st_build_table(w, err);
    if (rc != KLI_OK)
        goto fail;

    /* Every tensor the index names must be in the shard it names. `claimed` is indexed by
     * descriptor, so it has one entry per tensor the shards hold: that can be more than the
     * index names (a shard may hold tensors the index does not list; they are kept). */
    claimed = k_calloc((size_t)w->n, 1);
    if (claimed == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "%s: out of memory", ipath);
        goto fail;
    }
    cJSON_ArrayForEach(e, map) {
        const char **s = bsearch(&e->valuestring, shards, (size_t)n_shards, sizeof(*shards),
                                 st_str_cmp);
        const struct tensor_desc *d = wfile_find(w, e->string);

        KLI_ASSERT(s != NULL);
        if (d == NULL) {
            rc = err_set(err, KLI_E_FORMAT,
                             "%s: weight_map names tensor \"%.64s\" in shard %.64s, but that "
                             "shard does not have it", ipath, e->string, *s);
            goto fail;
        }
        if (d->file != (int32_t)(s - shards)) {
            rc = err_set(err, KLI_E_FORMAT,
                             "%s: weight_map names tensor \"%.64s\" in shard %.64s, but it is in "
                             "shard %.64s", ipath, e->string, *s, shards[d->file]);
            goto fail;
        }
        if (claimed[d - w->descs] != 0) {
            rc = err_set(err, KLI_E_FORMAT,
                             "%s: weight_map lists tensor \"%.64s\" twice", ipath, e->string);
            goto fail;
        }
        claimed[d - w->descs] = 1;
    }
    rc = KLI_OK;

fail:
    free(spath);
    free(claimed);
    free(shards);
    cJSON_Delete(root);
    mmap_close(&im);
    return rc;
}

static int
st_ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);

    return a >= b && strcmp(s + a - b, suffix) == 0;
}

int
wfile_open(struct wfile **out, const char *path, struct kli_err *err)
{
    struct wfile *w;
    struct stat st;
    char *p = NULL, *dir = NULL;
    int rc;

    if (out == NULL || path == NULL)
        return err_set(err, KLI_E_INVALID, "wfile_open: NULL argument");
    *out = NULL;
    if (stat(path, &st) != 0) {
        int e = errno;

        return err_set(err, KLI_E_IO, "%s: %s", path, strerror(e));
    }
    w = k_calloc(1, sizeof(*w));
    if (w == NULL)
        return err_set(err, KLI_E_NOMEM, "%s: out of memory", path);

    if (S_ISDIR(st.st_mode)) {
        p = st_join(path, ST_INDEX_NAME);
        if (p == NULL) {
            rc = err_set(err, KLI_E_NOMEM, "%s: out of memory", path);
            goto fail;
        }
        if (stat(p, &st) == 0 || errno != ENOENT) {
            /* Present (or unreadable, which st_open_index reports). */
            rc = st_open_index(w, path, p, err);
        } else {
            free(p);
            p = st_join(path, ST_SINGLE_NAME);
            if (p == NULL) {
                rc = err_set(err, KLI_E_NOMEM, "%s: out of memory", path);
                goto fail;
            }
            if (stat(p, &st) != 0) {
                rc = err_set(err, KLI_E_IO, "%s: no %s or %s in this directory", path,
                                 ST_INDEX_NAME, ST_SINGLE_NAME);
                goto fail;
            }
            rc = st_add_file(w, p, err);
            if (rc == KLI_OK)
                rc = st_build_table(w, err);
        }
    } else if (st_ends_with(path, ".index.json")) {
        /* The index itself: its shards sit next to it. */
        const char *slash = strrchr(path, '/');

        dir = slash == NULL ? k_strdup(".") : k_malloc((size_t)(slash - path) + 1);
        if (dir == NULL) {
            rc = err_set(err, KLI_E_NOMEM, "%s: out of memory", path);
            goto fail;
        }
        if (slash != NULL) {
            memcpy(dir, path, (size_t)(slash - path));
            dir[slash - path] = '\0';
            if (slash == path)
                strcpy(dir, "/");
        }
        rc = st_open_index(w, dir, path, err);
    } else {
        /* A .kli file (packed.c) is recognised by its magic. */
        if (pack_probe(path) && (w->pack = k_calloc(1, sizeof(*w->pack))) == NULL) {
            rc = err_set(err, KLI_E_NOMEM, "%s: out of memory", path);
            goto fail;
        }
        rc = st_add_file(w, path, err);
        if (rc == KLI_OK)
            rc = st_build_table(w, err);
        if (rc == KLI_OK && w->pack != NULL) {
            w->meta.config = w->pack->config;
            w->meta.config_len = w->pack->config_len;
            w->meta.tok_ranks = w->pack->tok_ranks;
            w->meta.tok_ranks_len = w->pack->tok_ranks_len;
            w->meta.tok_config = w->pack->tok_config;
            w->meta.tok_config_len = w->pack->tok_config_len;
        }
    }
    if (rc == KLI_OK) {
        *out = w;
        w = NULL;
    }
fail:
    free(p);
    free(dir);
    wfile_close(w);
    return rc;
}

void
wfile_close(struct wfile *w)
{
    if (w == NULL)
        return;
    safetensors_free_descs(w->descs, w->n);
    for (int32_t i = 0; i < w->n_files; i++) {
        mmap_close(&w->maps[i]);
        free(w->paths[i]);
    }
    free(w->maps);
    free(w->paths);
    free(w->slots);
    pack_info_free(w->pack);
    free(w->pack);
    gguf_view_free(w->gguf);
    free(w);
}

const struct tensor_desc *
wfile_find(const struct wfile *w, const char *name)
{
    uint64_t h;

    if (w == NULL || name == NULL || w->slots == NULL)
        return NULL;
    h = st_hash(name) & w->mask;
    while (w->slots[h] != 0) {
        const struct tensor_desc *d = &w->descs[w->slots[h] - 1];

        if (strcmp(d->name, name) == 0)
            return d;
        h = (h + 1) & w->mask;
    }
    return NULL;
}

int64_t
wfile_n_tensors(const struct wfile *w)
{
    return w == NULL ? 0 : w->n;
}

int64_t
wfile_index(const struct wfile *w, const struct tensor_desc *d)
{
    KLI_ASSERT(w != NULL && d >= w->descs && d < w->descs + w->n);
    return d - w->descs;
}

const struct tensor_desc *
wfile_tensor(const struct wfile *w, int64_t i)
{
    if (w == NULL || i < 0 || i >= w->n)
        return NULL;
    return &w->descs[i];
}

uint64_t
wfile_data_bytes(const struct wfile *w)
{
    return w == NULL ? 0 : w->data_bytes;
}

int32_t
wfile_n_files(const struct wfile *w)
{
    return w == NULL ? 0 : w->n_files;
}

const char *
wfile_file_path(const struct wfile *w, int32_t i)
{
    if (w == NULL || i < 0 || i >= w->n_files)
        return NULL;
    return w->paths[i];
}

const struct pack_meta *
wfile_meta(const struct wfile *w)
{
    if (w == NULL)
        return NULL;
    if (w->gguf != NULL)
        return gguf_view_meta(w->gguf);
    return w->pack == NULL ? NULL : &w->meta;
}

int
wfile_probe(const char *path)
{
    return pack_probe(path) || gguf_probe(path);
}

const struct pack_info *
wfile_pack(const struct wfile *w)
{
    return w == NULL ? NULL : w->pack;
}

int
wfile_dontneed(const struct wfile *w, const struct tensor_desc *d)
{
    const struct k_mmap *m;

    if (w == NULL || d == NULL || d->file < 0 || d->file >= w->n_files || d->nbytes == 0)
        return 0;
    m = &w->maps[d->file];
    return mmap_advise(m, (uint64_t)((const uint8_t *)d->data - m->base), d->nbytes,
                           KLI_MMAP_DONTNEED);
}

int
wfile_pages(const struct wfile *w, uint64_t *resident, uint64_t *huge)
{
    const struct k_mmap **maps;
    int rc;

    *resident = *huge = 0;
    if (w == NULL || (maps = k_mallocarray((size_t)w->n_files, sizeof(*maps))) == NULL)
        return -1;
    for (int32_t i = 0; i < w->n_files; i++)
        maps[i] = &w->maps[i];
    rc = mmap_pages(maps, w->n_files, resident, huge);
    free(maps);
    return rc;
}

int
wfile_locate(const struct wfile *w, const void *p, int32_t *file, uint64_t *off)
{
    const uint8_t *b = p;

    if (w == NULL || p == NULL)
        return -1;
    for (int32_t i = 0; i < w->n_files; i++) {
        const struct k_mmap *m = &w->maps[i];
        if (m->size > 0 && b >= m->base && b < m->base + m->size) {
            *file = i;
            *off = (uint64_t)(b - m->base);
            return 0;
        }
    }
    return -1;
}
