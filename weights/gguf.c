/*
 * gguf.c - the GGUF reader: a mapped image checked whole, then described (gguf.h).
 *
 * Everything is read through a cursor that refuses to step past the end, so a count or a
 * length is only believed once the bytes it claims are there; allocations are sized by
 * counts already bounded by the bytes left (an entry takes at least 13 bytes, a tensor info
 * at least 24), so a forged count cannot ask for more memory than the file could describe.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf.h"
#include "internal.h"
#include "util.h"

struct gg_cur {
    const uint8_t *base;
    uint64_t size, pos;
    const char *fname;
    struct kli_err *err;
};

/* The ggml types: name, elements per block, bytes per block. Ids 4, 5 and 31..33, 36..38
 * are retired and stay empty. */
static const struct {
    const char *name;
    uint32_t block, bytes;
} gg_types[] = {
    [0] = {"F32", 1, 4}, [1] = {"F16", 1, 2}, [2] = {"Q4_0", 32, 18}, [3] = {"Q4_1", 32, 20},
    [6] = {"Q5_0", 32, 22}, [7] = {"Q5_1", 32, 24}, [8] = {"Q8_0", 32, 34},
    [9] = {"Q8_1", 32, 36}, [10] = {"Q2_K", 256, 84}, [11] = {"Q3_K", 256, 110},
    [12] = {"Q4_K", 256, 144}, [13] = {"Q5_K", 256, 176}, [14] = {"Q6_K", 256, 210},
    [15] = {"Q8_K", 256, 292}, [16] = {"IQ2_XXS", 256, 66}, [17] = {"IQ2_XS", 256, 74},
    [18] = {"IQ3_XXS", 256, 98}, [19] = {"IQ1_S", 256, 50}, [20] = {"IQ4_NL", 32, 18},
    [21] = {"IQ3_S", 256, 110}, [22] = {"IQ2_S", 256, 82}, [23] = {"IQ4_XS", 256, 136},
    [24] = {"I8", 1, 1}, [25] = {"I16", 1, 2}, [26] = {"I32", 1, 4}, [27] = {"I64", 1, 8},
    [28] = {"F64", 1, 8}, [29] = {"IQ1_M", 256, 56}, [30] = {"BF16", 1, 2},
    [34] = {"TQ1_0", 256, 54}, [35] = {"TQ2_0", 256, 66}, [39] = {"MXFP4", 32, 17},
};

/* Bytes of one scalar of each value type (0: string or array, sized by content). */
static const uint8_t gg_vsize[GGUF_T_COUNT] = {
    [GGUF_T_U8] = 1, [GGUF_T_I8] = 1, [GGUF_T_U16] = 2, [GGUF_T_I16] = 2, [GGUF_T_U32] = 4,
    [GGUF_T_I32] = 4, [GGUF_T_F32] = 4, [GGUF_T_BOOL] = 1, [GGUF_T_U64] = 8,
    [GGUF_T_I64] = 8, [GGUF_T_F64] = 8,
};

static const char *const gg_vname[GGUF_T_COUNT] = {
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string",
    "array", "uint64", "int64", "float64",
};

const char *
gguf_type_name(uint32_t type)
{
    return type < KLI_ARRAY_LEN(gg_types) ? gg_types[type].name : NULL;
}

void
gguf_type_block(uint32_t type, uint32_t *elems, uint32_t *bytes)
{
    int known = type < KLI_ARRAY_LEN(gg_types) && gg_types[type].name != NULL;

    *elems = known ? gg_types[type].block : 0;
    *bytes = known ? gg_types[type].bytes : 0;
}

/* ==== the cursor ==== */

static uint64_t
gg_left(const struct gg_cur *c)
{
    return c->size - c->pos;
}

/* "<file>: <what> at byte <pos>: the file ends" */
static int
gg_short(struct gg_cur *c, const char *what)
{
    return err_set(c->err, KLI_E_FORMAT, "%s: %s at byte %llu: the file ends (%llu bytes)",
                   c->fname, what, (unsigned long long)c->pos, (unsigned long long)c->size);
}

/* A little-endian integer of `bytes` (4 or 8) into *v. */
static int
gg_uint(struct gg_cur *c, const char *what, unsigned bytes, uint64_t *v)
{
    if (gg_left(c) < bytes)
        return gg_short(c, what);
    *v = bytes == 4 ? util_rd32(c->base + c->pos) : util_rd64(c->base + c->pos);
    c->pos += bytes;
    return KLI_OK;
}

static int
gg_u32(struct gg_cur *c, const char *what, uint32_t *v)
{
    uint64_t x = 0;
    int rc = gg_uint(c, what, 4, &x);

    if (rc == KLI_OK)
        *v = (uint32_t)x;
    return rc;
}

static int
gg_u64(struct gg_cur *c, const char *what, uint64_t *v)
{
    return gg_uint(c, what, 8, v);
}

/* A gguf_string: u64 length, then the bytes (no NUL). *s points into the image. */
static int
gg_str(struct gg_cur *c, const char *what, const uint8_t **s, uint64_t *len)
{
    int rc = gg_u64(c, what, len);

    if (rc != KLI_OK)
        return rc;
    if (*len > gg_left(c)) {
        return err_set(c->err, KLI_E_FORMAT, "%s: %s at byte %llu claims %llu bytes; %llu "
                       "remain", c->fname, what, (unsigned long long)(c->pos - 8),
                       (unsigned long long)*len, (unsigned long long)gg_left(c));
    }
    *s = c->base + c->pos;
    c->pos += *len;
    return KLI_OK;
}

/* A key or name: printable, no NUL, not empty, at most `max` bytes; into a heap copy. */
static int
gg_name(struct gg_cur *c, const char *what, uint64_t max, char **out)
{
    const uint8_t *s;
    uint64_t len;
    int rc = gg_str(c, what, &s, &len);

    if (rc != KLI_OK)
        return rc;
    if (len == 0 || len > max)
        return err_set(c->err, KLI_E_FORMAT, "%s: %s at byte %llu is %llu bytes long (1 to "
                       "%llu allowed)", c->fname, what, (unsigned long long)(c->pos - len - 8),
                       (unsigned long long)len, (unsigned long long)max);
    for (uint64_t i = 0; i < len; i++) {
        if (s[i] < 0x20 || s[i] == 0x7f)
            return err_set(c->err, KLI_E_FORMAT, "%s: %s at byte %llu holds control byte "
                           "0x%02x", c->fname, what, (unsigned long long)(c->pos - len - 8),
                           s[i]);
    }
    *out = k_malloc((size_t)len + 1);
    if (*out == NULL)
        return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
    memcpy(*out, s, (size_t)len);
    (*out)[len] = '\0';
    return KLI_OK;
}

/* ==== metadata ==== */

static int
gg_value(struct gg_cur *c, struct gguf_kv *kv)
{
    int rc;

    kv->n = 1;
    kv->val = c->base + c->pos;
    if (kv->type == GGUF_T_STRING) {
        const uint8_t *s;
        uint64_t len;
        return gg_str(c, kv->key, &s, &len);
    }
    if (kv->type != GGUF_T_ARRAY) {
        if (gg_left(c) < gg_vsize[kv->type])
            return gg_short(c, kv->key);
        if (kv->type == GGUF_T_BOOL && c->base[c->pos] > 1)
            return err_set(c->err, KLI_E_FORMAT, "%s: %s: a bool of value %u", c->fname,
                           kv->key, c->base[c->pos]);
        c->pos += gg_vsize[kv->type];
        return KLI_OK;
    }
    if ((rc = gg_u32(c, kv->key, &kv->elem)) != KLI_OK ||
        (rc = gg_u64(c, kv->key, &kv->n)) != KLI_OK)
        return rc;
    if (kv->elem >= GGUF_T_COUNT || kv->elem == GGUF_T_ARRAY)
        return err_set(c->err, KLI_E_FORMAT, "%s: %s: array of element type %u (%s)",
                       c->fname, kv->key, kv->elem,
                       kv->elem == GGUF_T_ARRAY ? "nested arrays are not read" : "unknown");
    kv->val = c->base + c->pos;
    if (kv->elem != GGUF_T_STRING) {
        uint64_t es = gg_vsize[kv->elem];
        if (kv->n > gg_left(c) / es)
            return err_set(c->err, KLI_E_FORMAT, "%s: %s: %llu elements of %s need more "
                           "than the %llu bytes left", c->fname, kv->key,
                           (unsigned long long)kv->n, gg_vname[kv->elem],
                           (unsigned long long)gg_left(c));
        if (kv->elem == GGUF_T_BOOL) {
            for (uint64_t i = 0; i < kv->n; i++) {
                if (kv->val[i] > 1)
                    return err_set(c->err, KLI_E_FORMAT, "%s: %s[%llu]: a bool of value %u",
                                   c->fname, kv->key, (unsigned long long)i, kv->val[i]);
            }
        }
        c->pos += kv->n * es;
        return KLI_OK;
    }
    /* strings: each at least its 8-byte length */
    if (kv->n > gg_left(c) / 8)
        return err_set(c->err, KLI_E_FORMAT, "%s: %s: %llu strings cannot fit in the %llu "
                       "bytes left", c->fname, kv->key, (unsigned long long)kv->n,
                       (unsigned long long)gg_left(c));
    kv->str_off = k_mallocarray((size_t)kv->n + 1, sizeof(*kv->str_off));
    if (kv->str_off == NULL)
        return err_set(c->err, KLI_E_NOMEM, "%s: out of memory for %s", c->fname, kv->key);
    for (uint64_t i = 0; i < kv->n; i++) {
        const uint8_t *s;
        uint64_t len;
        kv->str_off[i] = (uint64_t)(c->base + c->pos - kv->val);
        if ((rc = gg_str(c, kv->key, &s, &len)) != KLI_OK)
            return rc;
    }
    return KLI_OK;
}

static int
gg_read_kv(struct gg_cur *c, struct gguf *g)
{
    int rc;

    for (int64_t i = 0; i < g->n_kv; i++) {
        struct gguf_kv *kv = &g->kv[i];
        uint64_t at = c->pos;

        if ((rc = gg_name(c, "a metadata key", 65535, &kv->key)) != KLI_OK ||
            (rc = gg_u32(c, kv->key, &kv->type)) != KLI_OK)
            return rc;
        if (kv->type >= GGUF_T_COUNT)
            return err_set(c->err, KLI_E_FORMAT, "%s: metadata %s (byte %llu): unknown value "
                           "type %u", c->fname, kv->key, (unsigned long long)at, kv->type);
        if ((rc = gg_value(c, kv)) != KLI_OK)
            return rc;
    }
    return KLI_OK;
}

/* ==== tensor infos ==== */

static int
gg_read_tensor(struct gg_cur *c, struct gguf *g, struct gguf_tensor *t)
{
    uint32_t nd, block, bytes;
    int rc;

    if ((rc = gg_name(c, "a tensor name", GGUF_MAX_NAME, &t->name)) != KLI_OK ||
        (rc = gg_u32(c, t->name, &nd)) != KLI_OK)
        return rc;
    if (nd < 1 || nd > GGUF_MAX_DIMS)
        return err_set(c->err, KLI_E_FORMAT, "%s: tensor %s has %u dimensions (1 to %d)",
                       c->fname, t->name, nd, GGUF_MAX_DIMS);
    t->ndim = (int32_t)nd;
    t->numel = 1;
    for (uint32_t d = 0; d < nd; d++) {
        uint64_t ne;
        if ((rc = gg_u64(c, t->name, &ne)) != KLI_OK)
            return rc;
        /* a product under 2^62 keeps every byte count below overflow */
        if (ne > ((uint64_t)1 << 62) || (ne > 0 && (uint64_t)t->numel > ((uint64_t)1 << 62) / ne))
            return err_set(c->err, KLI_E_FORMAT, "%s: tensor %s: dimension %u of %llu makes "
                           "it too large", c->fname, t->name, d, (unsigned long long)ne);
        t->ne[d] = (int64_t)ne;
        t->numel *= (int64_t)ne;
    }
    for (uint32_t d = nd; d < GGUF_MAX_DIMS; d++)
        t->ne[d] = 1;
    if ((rc = gg_u32(c, t->name, &t->type)) != KLI_OK ||
        (rc = gg_u64(c, t->name, &t->offset)) != KLI_OK)
        return rc;
    gguf_type_block(t->type, &block, &bytes);
    if (block == 0)
        return err_set(c->err, KLI_E_FORMAT, "%s: tensor %s has ggml type %u, which ggml "
                       "does not define", c->fname, t->name, t->type);
    if (t->ne[0] % block != 0)
        return err_set(c->err, KLI_E_FORMAT, "%s: tensor %s: rows of %lld are not whole %s "
                       "blocks of %u", c->fname, t->name, (long long)t->ne[0],
                       gguf_type_name(t->type), block);
    t->nbytes = (uint64_t)t->numel / block * bytes;
    (void)g;
    return KLI_OK;
}

static int
gg_str_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* A name among n (at stride `step` bytes from `first`) that appears twice: sorted, so that
 * a forged file of millions of entries costs n log n, not n^2. @return KLI_OK or an error
 * naming it. */
static int
gg_unique(struct gg_cur *c, const void *first, int64_t n, size_t step, const char *what)
{
    const char **v;
    int rc = KLI_OK;

    if (n < 2)
        return KLI_OK;
    if ((v = k_mallocarray((size_t)n, sizeof(*v))) == NULL)
        return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
    for (int64_t i = 0; i < n; i++)
        v[i] = *(char *const *)(const void *)((const char *)first + (size_t)i * step);
    qsort(v, (size_t)n, sizeof(*v), gg_str_cmp);
    for (int64_t i = 1; i < n && rc == KLI_OK; i++) {
        if (strcmp(v[i - 1], v[i]) == 0)
            rc = err_set(c->err, KLI_E_FORMAT, "%s: %s %s appears twice", c->fname, what, v[i]);
    }
    free(v);
    return rc;
}

static int
gg_off_cmp(const void *a, const void *b)
{
    const struct gguf_tensor *x = *(const struct gguf_tensor *const *)a;
    const struct gguf_tensor *y = *(const struct gguf_tensor *const *)b;

    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Every tensor inside the data section, at a multiple of the alignment, none overlapping. */
static int
gg_place(struct gg_cur *c, struct gguf *g)
{
    uint64_t dsize = c->size - g->data_offset;
    struct gguf_tensor **by = NULL;
    int rc = KLI_OK;

    for (int64_t i = 0; i < g->n_t; i++) {
        struct gguf_tensor *t = &g->t[i];
        if (t->offset % g->alignment != 0)
            return err_set(c->err, KLI_E_FORMAT, "%s: tensor %s: offset %llu is not a "
                           "multiple of the alignment %u", c->fname, t->name,
                           (unsigned long long)t->offset, g->alignment);
        if (t->offset > dsize || t->nbytes > dsize - t->offset)
            return err_set(c->err, KLI_E_FORMAT, "%s: tensor %s: %llu bytes at data offset "
                           "%llu run past the end of the file (%llu data bytes)", c->fname,
                           t->name, (unsigned long long)t->nbytes,
                           (unsigned long long)t->offset, (unsigned long long)dsize);
        t->data = c->base + g->data_offset + t->offset;
    }
    if (g->n_t < 2)
        return KLI_OK;
    by = k_mallocarray((size_t)g->n_t, sizeof(*by));
    if (by == NULL)
        return err_set(c->err, KLI_E_NOMEM, "%s: out of memory", c->fname);
    for (int64_t i = 0; i < g->n_t; i++)
        by[i] = &g->t[i];
    qsort(by, (size_t)g->n_t, sizeof(*by), gg_off_cmp);
    for (int64_t i = 1; i < g->n_t && rc == KLI_OK; i++) {
        const struct gguf_tensor *a = by[i - 1], *b = by[i];
        if (a->nbytes > 0 && b->nbytes > 0 && a->offset + a->nbytes > b->offset)
            rc = err_set(c->err, KLI_E_FORMAT, "%s: tensors %s (data bytes %llu..%llu) and "
                         "%s (from %llu) overlap", c->fname, a->name,
                         (unsigned long long)a->offset,
                         (unsigned long long)(a->offset + a->nbytes - 1), b->name,
                         (unsigned long long)b->offset);
    }
    free(by);
    return rc;
}

static int
gg_alignment(struct gg_cur *c, struct gguf *g)
{
    const struct gguf_kv *kv = gguf_find(g, "general.alignment");

    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    if (kv == NULL)
        return KLI_OK;
    if (kv->type != GGUF_T_U32)
        return err_set(c->err, KLI_E_FORMAT, "%s: general.alignment is a %s; it must be a "
                       "uint32", c->fname, gg_vname[kv->type]);
    uint32_t a = util_rd32(kv->val);
    if (a == 0 || (a & (a - 1)) != 0)
        return err_set(c->err, KLI_E_FORMAT, "%s: general.alignment is %u, not a power of two",
                       c->fname, a);
    g->alignment = a;
    return KLI_OK;
}

int
gguf_parse(const uint8_t *base, uint64_t size, const char *fname, struct gguf **out,
           struct kli_err *err)
{
    struct gg_cur c = {base, size, 0, fname, err};
    struct gguf *g;
    uint64_t nt, nkv;
    int rc;

    *out = NULL;
    if (size < 4 || memcmp(base, GGUF_MAGIC, 4) != 0)
        return err_set(err, KLI_E_FORMAT, "%s: not a GGUF file (no \"GGUF\" magic)", fname);
    g = k_calloc(1, sizeof(*g));
    if (g == NULL)
        return err_set(err, KLI_E_NOMEM, "%s: out of memory", fname);
    c.pos = 4;
    if ((rc = gg_u32(&c, "the version", &g->version)) != KLI_OK)
        goto fail;
    if ((g->version & 0xffff) == 0 && g->version != 0) {
        rc = err_set(err, KLI_E_UNSUPPORTED, "%s: GGUF version 0x%08x: a big-endian file; "
                     "kli reads little-endian GGUF", fname, g->version);
        goto fail;
    }
    if (g->version != 2 && g->version != 3) {
        rc = err_set(err, KLI_E_UNSUPPORTED, "%s: GGUF version %u; kli reads versions 2 and 3",
                     fname, g->version);
        goto fail;
    }
    if ((rc = gg_u64(&c, "the tensor count", &nt)) != KLI_OK ||
        (rc = gg_u64(&c, "the metadata count", &nkv)) != KLI_OK)
        goto fail;
    /* a key/value takes at least 8 + 1 + 4 bytes, a tensor info 8 + 1 + 4 + 8 + 4 + 8 */
    if (nkv > gg_left(&c) / 13 || nt > gg_left(&c) / 33) {
        rc = err_set(err, KLI_E_FORMAT, "%s: %llu tensors and %llu metadata entries cannot "
                     "fit in the file (%llu bytes)", fname, (unsigned long long)nt,
                     (unsigned long long)nkv, (unsigned long long)size);
        goto fail;
    }
    g->n_kv = (int64_t)nkv;
    g->n_t = (int64_t)nt;
    g->kv = k_calloc((size_t)nkv + 1, sizeof(*g->kv));
    g->t = k_calloc((size_t)nt + 1, sizeof(*g->t));
    if (g->kv == NULL || g->t == NULL) {
        rc = err_set(err, KLI_E_NOMEM, "%s: out of memory", fname);
        goto fail;
    }
    if ((rc = gg_read_kv(&c, g)) != KLI_OK ||
        (rc = gg_unique(&c, &g->kv[0].key, g->n_kv, sizeof(*g->kv), "metadata key")) != KLI_OK ||
        (rc = gg_alignment(&c, g)) != KLI_OK)
        goto fail;
    for (int64_t i = 0; i < g->n_t; i++) {
        if ((rc = gg_read_tensor(&c, g, &g->t[i])) != KLI_OK)
            goto fail;
    }
    if ((rc = gg_unique(&c, &g->t[0].name, g->n_t, sizeof(*g->t), "tensor")) != KLI_OK)
        goto fail;
    /* the data section starts at the next multiple of the alignment */
    uint64_t pad = (g->alignment - c.pos % g->alignment) % g->alignment;
    if (pad > gg_left(&c)) {
        if (g->n_t > 0) {
            rc = err_set(err, KLI_E_FORMAT, "%s: the file ends (%llu bytes) before its data "
                         "section (at byte %llu)", fname, (unsigned long long)size,
                         (unsigned long long)(c.pos + pad));
            goto fail;
        }
        pad = gg_left(&c);
    }
    g->data_offset = c.pos + pad;
    c.pos = g->data_offset;
    if ((rc = gg_place(&c, g)) != KLI_OK)
        goto fail;
    *out = g;
    return KLI_OK;
fail:
    gguf_free(g);
    return rc;
}

void
gguf_free(struct gguf *g)
{
    if (g == NULL)
        return;
    for (int64_t i = 0; g->kv != NULL && i < g->n_kv; i++) {
        free(g->kv[i].key);
        free(g->kv[i].str_off);
    }
    for (int64_t i = 0; g->t != NULL && i < g->n_t; i++)
        free(g->t[i].name);
    free(g->kv);
    free(g->t);
    free(g);
}

int
gguf_probe(const char *path)
{
    return file_has_magic(path, GGUF_MAGIC, 4);
}

/* ==== lookups ==== */

const struct gguf_kv *
gguf_find(const struct gguf *g, const char *key)
{
    for (int64_t i = 0; i < g->n_kv; i++) {
        if (strcmp(g->kv[i].key, key) == 0)
            return &g->kv[i];
    }
    return NULL;
}

/* One integer element of type `type` at p. @return 0, or -1 for a non-integer type. */
static int
gg_int_at(uint32_t type, const uint8_t *p, int64_t *out)
{
    switch (type) {
    case GGUF_T_U8: case GGUF_T_BOOL: *out = p[0]; return 0;
    case GGUF_T_I8: *out = (int8_t)p[0]; return 0;
    case GGUF_T_U16: *out = util_rd16(p); return 0;
    case GGUF_T_I16: *out = (int16_t)util_rd16(p); return 0;
    case GGUF_T_U32: *out = util_rd32(p); return 0;
    case GGUF_T_I32: *out = (int32_t)util_rd32(p); return 0;
    case GGUF_T_I64: *out = (int64_t)util_rd64(p); return 0;
    case GGUF_T_U64:
        if (util_rd64(p) > INT64_MAX)
            return -1;
        *out = (int64_t)util_rd64(p);
        return 0;
    default:
        return -1;
    }
}

int
gguf_get_int(const struct gguf *g, const char *key, int64_t *out)
{
    const struct gguf_kv *kv = gguf_find(g, key);

    return kv == NULL ? -1 : gg_int_at(kv->type, kv->val, out);
}

int
gguf_get_num(const struct gguf *g, const char *key, double *out)
{
    const struct gguf_kv *kv = gguf_find(g, key);
    int64_t i;

    if (kv == NULL)
        return -1;
    if (kv->type == GGUF_T_F32) {
        uint32_t u = util_rd32(kv->val);
        float f;
        memcpy(&f, &u, 4);
        *out = f;
        return 0;
    }
    if (kv->type == GGUF_T_F64) {
        uint64_t u = util_rd64(kv->val);
        memcpy(out, &u, 8);
        return 0;
    }
    if (gg_int_at(kv->type, kv->val, &i) != 0)
        return -1;
    *out = (double)i;
    return 0;
}

int
gguf_get_str(const struct gguf *g, const char *key, const char **s, uint64_t *len)
{
    const struct gguf_kv *kv = gguf_find(g, key);

    if (kv == NULL || kv->type != GGUF_T_STRING)
        return -1;
    *len = util_rd64(kv->val);
    *s = (const char *)kv->val + 8;
    return 0;
}

int
gguf_arr_int(const struct gguf_kv *kv, uint64_t i, int64_t *out)
{
    if (kv->type != GGUF_T_ARRAY || i >= kv->n || kv->elem == GGUF_T_STRING)
        return -1;
    return gg_int_at(kv->elem, kv->val + i * gg_vsize[kv->elem], out);
}

int
gguf_arr_str(const struct gguf_kv *kv, uint64_t i, const char **s, uint64_t *len)
{
    if (kv->type != GGUF_T_ARRAY || i >= kv->n || kv->elem != GGUF_T_STRING)
        return -1;
    const uint8_t *p = kv->val + kv->str_off[i];
    *len = util_rd64(p);
    *s = (const char *)p + 8;
    return 0;
}
