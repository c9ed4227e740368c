/*
 * cli_batch_io.c - the input and output side of kli batch: indexing the JSONL input (ids,
 * shards, duplicates, records already done), reading the ids of an existing output, turning
 * a record into prompt tokens and settings, and writing JSON strings.
 *
 * The input is scanned once before any work, every line parsed, so that each record's id
 * is known up front: that gives the total for the progress bar, the duplicate check (a
 * record whose id appeared on an earlier line fails as "line:N") and the shard split, and it
 * is the same in every copy of a sharded job because it depends on the input alone. A record
 * is parsed again, and tokenized, only when it is about to run.
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kli.h"
#include "cli.h"
#include "cli_batch.h"
#include "cli_oai.h"
#include "cli_toolcall.h"
#include "util.h"

/* ==== bytes, UTF-8 and JSON strings ======================================================== */

int
bbuf_add(struct bbuf *b, const void *p, size_t n)
{
    return util_text_add(&b->p, &b->n, &b->cap, p, n);
}

int
bbuf_addf(struct bbuf *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    int k;

    va_start(ap, fmt);
    k = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (k < 0 || (size_t)k >= sizeof(tmp))
        return -1;
    return bbuf_add(b, tmp, (size_t)k);
}

/* The well-formed UTF-8 sequences (Unicode, Table 3-7): by lead byte, how many
 * continuation bytes follow and the range of the first of them (the others: 80..BF). */
static const struct {
    unsigned char first, last, lo, hi;
    int need;
} utf8_leads[] = {
    {0xc2, 0xdf, 0x80, 0xbf, 1}, {0xe0, 0xe0, 0xa0, 0xbf, 2}, {0xe1, 0xec, 0x80, 0xbf, 2},
    {0xed, 0xed, 0x80, 0x9f, 2}, {0xee, 0xef, 0x80, 0xbf, 2}, {0xf0, 0xf0, 0x90, 0xbf, 3},
    {0xf1, 0xf3, 0x80, 0xbf, 3}, {0xf4, 0xf4, 0x80, 0x8f, 3},
};

int
cli_utf8_seq(const unsigned char *p, size_t n)
{
    unsigned c = p[0], lo, hi;
    size_t i = 0;
    int need;

    if (c < 0x80)
        return 1;
    while (i < sizeof(utf8_leads) / sizeof(utf8_leads[0]) &&
           (c < utf8_leads[i].first || c > utf8_leads[i].last))
        i++;
    if (i == sizeof(utf8_leads) / sizeof(utf8_leads[0]))
        return -1;
    need = utf8_leads[i].need;
    lo = utf8_leads[i].lo;
    hi = utf8_leads[i].hi;
    for (int k = 1; k <= need; k++) {
        if ((size_t)k >= n || p[k] < lo || p[k] > hi)
            return -k;
        lo = 0x80;
        hi = 0xbf;
    }
    return need + 1;
}

size_t
batch_utf8_valid(const char *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        int k = cli_utf8_seq((const unsigned char *)s + i, n - i);
        if (k < 0)
            return i;
        i += (size_t)k;
    }
    return n;
}

/* With `shown`, the text rule of cli_text_write: control characters but \n and \t become
 * U+FFFD too. */
static int
json_str(struct bbuf *b, const char *s, size_t n, int shown)
{
    size_t i = 0;

    if (bbuf_add(b, "\"", 1) != 0)
        return -1;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        int k, rc;
        if (shown && ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7f ||
                      (c == 0xc2 && i + 1 < n && (unsigned char)s[i + 1] < 0xa0 &&
                       (unsigned char)s[i + 1] >= 0x80))) {
            rc = bbuf_add(b, "\xef\xbf\xbd", 3);
            i += c == 0xc2 ? 2 : 1;
        } else if (c < 0x80) {
            switch (c) {
            case '"': rc = bbuf_add(b, "\\\"", 2); break;
            case '\\': rc = bbuf_add(b, "\\\\", 2); break;
            case '\n': rc = bbuf_add(b, "\\n", 2); break;
            case '\r': rc = bbuf_add(b, "\\r", 2); break;
            case '\t': rc = bbuf_add(b, "\\t", 2); break;
            default:
                rc = c < 0x20 ? bbuf_addf(b, "\\u%04x", c) : bbuf_add(b, s + i, 1);
            }
            i++;
        } else if ((k = cli_utf8_seq((const unsigned char *)s + i, n - i)) > 0) {
            rc = bbuf_add(b, s + i, (size_t)k);
            i += (size_t)k;
        } else {
            rc = bbuf_add(b, "\xef\xbf\xbd", 3);
            i += (size_t)-k;
        }
        if (rc != 0)
            return -1;
    }
    return bbuf_add(b, "\"", 1);
}

int
bbuf_json_str(struct bbuf *b, const char *s, size_t n)
{
    return json_str(b, s, n, 0);
}

int
bbuf_json_text(struct bbuf *b, const char *s, size_t n)
{
    return json_str(b, s, n, 1);
}

/* ==== a set of ids: open addressing over FNV hashes ======================================== */

struct batch_idset {
    char **key;
    int32_t *val;
    uint64_t cap, n;    /* cap: a power of two, at most half full */
};

struct batch_idset *
batch_idset_create(void)
{
    struct batch_idset *s = calloc(1, sizeof(*s));

    if (s == NULL)
        return NULL;
    s->cap = 1024;
    s->key = calloc(s->cap, sizeof(*s->key));
    s->val = calloc(s->cap, sizeof(*s->val));
    if (s->key == NULL || s->val == NULL) {
        batch_idset_free(s);
        return NULL;
    }
    return s;
}

void
batch_idset_free(struct batch_idset *s)
{
    if (s == NULL)
        return;
    if (s->key != NULL) {
        for (uint64_t i = 0; i < s->cap; i++)
            free(s->key[i]);
    }
    free(s->key);
    free(s->val);
    free(s);
}

static uint64_t
idset_slot(char *const *key, uint64_t cap, const char *id)
{
    uint64_t i = util_fnv1a(UTIL_FNV_BASIS, id, strlen(id)) & (cap - 1);

    while (key[i] != NULL && strcmp(key[i], id) != 0)
        i = (i + 1) & (cap - 1);
    return i;
}

int
batch_idset_add(struct batch_idset *s, const char *id, int32_t v, int32_t *value)
{
    uint64_t i = idset_slot(s->key, s->cap, id);

    if (s->key[i] != NULL) {
        if (value != NULL)
            *value = s->val[i];
        return 0;
    }
    if (2 * (s->n + 1) > s->cap) {
        uint64_t nc = 2 * s->cap;
        char **nk = calloc(nc, sizeof(*nk));
        int32_t *nv = calloc(nc, sizeof(*nv));
        if (nk == NULL || nv == NULL) {
            free(nk);
            free(nv);
            return -1;
        }
        for (uint64_t k = 0; k < s->cap; k++) {
            if (s->key[k] != NULL) {
                uint64_t j = idset_slot(nk, nc, s->key[k]);
                nk[j] = s->key[k];
                nv[j] = s->val[k];
            }
        }
        free(s->key);
        free(s->val);
        s->key = nk;
        s->val = nv;
        s->cap = nc;
        i = idset_slot(s->key, s->cap, id);
    }
    if ((s->key[i] = strdup(id)) == NULL)
        return -1;
    s->val[i] = v;
    s->n++;
    if (value != NULL)
        *value = v;
    return 1;
}

int
batch_idset_has(const struct batch_idset *s, const char *id)
{
    return s->key[idset_slot(s->key, s->cap, id)] != NULL;
}

int
batch_idset_find(const struct batch_idset *s, const char *id, int32_t *value)
{
    uint64_t i = idset_slot(s->key, s->cap, id);

    if (s->key[i] == NULL)
        return 0;
    *value = s->val[i];
    return 1;
}

int64_t
batch_idset_count(const struct batch_idset *s)
{
    return (int64_t)s->n;
}

/* ==== the input index ====================================================================== */

static char *
io_strdupf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static char *
io_strdupf(const char *fmt, ...)
{
    char tmp[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    return strdup(tmp);
}

static int
io_load(struct batch_input *in, const char *path, int64_t max_line)
{
    struct stat st;
    int fd;

    if (strcmp(path, "-") != 0) {
        if ((fd = open(path, O_RDONLY)) < 0) {
            cli_error("%s: %s", path, strerror(errno));
            return -1;
        }
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0) {
            void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
            close(fd);
            if (p == MAP_FAILED) {
                cli_error("%s: %s", path, strerror(errno));
                return -1;
            }
            in->text = p;
            in->len = (size_t)st.st_size;
            in->mapped = 1;
            return 0;
        }
        close(fd);
    }
    /* A pipe, FIFO or device is read into memory, each line capped as the records are (a
     * longer one could only be refused), so that /dev/zero ends at once with a message. */
    char *t = cli_read_file(path, SIZE_MAX / 2, (size_t)max_line, "see --max-prompt-bytes",
                            &in->len);
    if (t == NULL)
        return -1;
    in->text = t;
    return 0;
}

/* The id of the record on a line, or NULL when it has none (or not a usable one). Sets
 * *error for a line that is no record at all. */
static char *
io_line_id(const char *p, size_t len, int64_t max_line, char **error, int *api)
{
    size_t bad;

    if ((int64_t)len > max_line) {
        *error = io_strdupf("a line of %zu bytes is over the limit of %lld (see "
                            "--max-prompt-bytes)", len, (long long)max_line);
        return NULL;
    }
    if ((bad = batch_utf8_valid(p, len)) < len) {
        *error = io_strdupf("not valid UTF-8 at byte %zu", bad + 1);
        return NULL;
    }
    cJSON *root = cJSON_ParseWithLength(p, len);
    if (root == NULL) {
        const char *at = cJSON_GetErrorPtr();
        size_t off = at != NULL && at >= p && at <= p + len ? (size_t)(at - p) + 1 : 0;
        *error = io_strdupf("malformed JSON near byte %zu", off);
        return NULL;
    }
    char *id = NULL;
    int64_t nul;
    if (!cJSON_IsObject(root)) {
        *error = strdup("not a JSON object");
    } else if ((nul = cli_find_nul(p, len, 1)) >= 0) {
        *error = io_strdupf("a NUL (\\u0000) at byte %lld: prompts cannot hold NUL bytes",
                            (long long)nul + 1);
    } else {
        cJSON *j = cJSON_GetObjectItemCaseSensitive(root, "custom_id");
        if (j != NULL) {   /* an OpenAI Batch line: its custom_id is its id */
            const cJSON *url = cJSON_GetObjectItemCaseSensitive(root, "url");
            *api = !cJSON_IsString(url) ? BATCH_API_OTHER :
                   strcmp(url->valuestring, "/v1/chat/completions") == 0 ? BATCH_API_CHAT :
                   strcmp(url->valuestring, "/v1/completions") == 0 ? BATCH_API_COMPLETIONS :
                   BATCH_API_OTHER;
        } else {
            j = cJSON_GetObjectItemCaseSensitive(root, "id");
        }
        /* "line:" begins only the ids kli gives records without one, so that such an id
         * names exactly one line and a resumed run never takes one record for another */
        if (cJSON_IsString(j) && strncmp(j->valuestring, "line:", 5) == 0)
            *error = io_strdupf("the id \"%.200s\" is reserved: ids beginning with "
                                "\"line:\" name records by line number", j->valuestring);
        else if (cJSON_IsString(j) && j->valuestring[0] != '\0')
            id = strdup(j->valuestring);
    }
    cJSON_Delete(root);
    return id;
}

int
batch_input_open(struct batch_input *in, const char *path, const struct batch_select *sel)
{
    struct batch_idset *seen = batch_idset_create();
    int64_t cap = 0;
    size_t pos = 0;
    int32_t ln = 0;

    memset(in, 0, sizeof(*in));
    if (seen == NULL || io_load(in, path, sel->max_line) != 0)
        goto fail;
    while (pos < in->len) {
        const char *p = in->text + pos, *nl = memchr(p, '\n', in->len - pos);
        size_t len = nl != NULL ? (size_t)(nl - p) : in->len - pos;
        pos += len + (nl != NULL);
        ln++;
        if (len > 0 && p[len - 1] == '\r')
            len--;
        size_t k = 0;
        while (k < len && (p[k] == ' ' || p[k] == '\t'))
            k++;
        if (k == len)
            continue;   /* a blank line is no record */
        in->n_records++;

        struct batch_item it = {(int64_t)(p - in->text), (int64_t)len, ln, NULL, NULL,
                                 BATCH_API_KLI, NULL, NULL};
        char lid[32];
        int32_t first;
        snprintf(lid, sizeof(lid), "line:%d", (int)ln);
        it.id = io_line_id(p, len, sel->max_line, &it.error, &it.api);
        if (it.id != NULL) {
            int r = batch_idset_add(seen, it.id, ln, &first);
            if (r < 0)
                goto nomem;
            if (r == 0) {
                it.error = io_strdupf("duplicate id \"%.200s\" (first on line %d)", it.id,
                                      (int)first);
                free(it.id);
                it.id = NULL;
            }
        }
        if (it.id == NULL && (it.id = strdup(lid)) == NULL)
            goto nomem;
        if (util_fnv1a(UTIL_FNV_BASIS, it.id, strlen(it.id)) % (uint64_t)sel->shard_n !=
            (uint64_t)(sel->shard_k - 1)) {
            in->n_other_shards++;
            free(it.id);
            free(it.error);
            continue;
        }
        int32_t failed = 0;
        if (sel->done != NULL && batch_idset_find(sel->done, it.id, &failed)) {
            in->n_done++;
            in->n_done_errors += failed;
            free(it.id);
            free(it.error);
            continue;
        }
        if (in->n_items == cap) {
            int64_t nc = cap ? 2 * cap : 256;
            struct batch_item *ni = realloc(in->items, (size_t)nc * sizeof(*ni));
            if (ni == NULL) {
                free(it.id);
                free(it.error);
                goto nomem;
            }
            in->items = ni;
            cap = nc;
        }
        in->items[in->n_items++] = it;
    }
    in->n_lines = ln;
    batch_idset_free(seen);
    return 0;
nomem:
    cli_error("%s: out of memory", path);
fail:
    batch_idset_free(seen);
    batch_input_close(in);
    return -1;
}

void
batch_input_close(struct batch_input *in)
{
    for (int64_t i = 0; i < in->n_items; i++) {
        free(in->items[i].id);
        free(in->items[i].error);
        batch_tools_free(in->items[i].tools);
        lp_list_free(in->items[i].lp);
        free(in->items[i].lp);
    }
    free(in->items);
    if (in->mapped)
        munmap((void *)in->text, in->len);
    else
        free((void *)in->text);
    memset(in, 0, sizeof(*in));
}

/* ==== the output of an earlier run ========================================================= */

int
batch_output_scan(const char *path, struct batch_idset *set, int quiet)
{
    size_t len, pos = 0, bad = 0;
    struct kli_err err = {0};
    uint64_t size;
    char *text;
    int fd;

    /* Only a regular file holds records to resume (the caller scans no other): a FIFO or a
     * device has none, and reading one would block or never end. A file is mapped, not
     * read, so its size costs no memory. */
    if ((fd = kli_file_open(path, &size, &err)) < 0) {
        cli_error("%s", err.msg);
        return -1;
    }
    if (size == 0) {
        close(fd);
        return 0;
    }
    len = (size_t)size;
    text = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (text == MAP_FAILED) {
        cli_error("%s: %s", path, strerror(errno));
        return -1;
    }
    if (text[len - 1] != '\n') {
        size_t keep = len;
        while (keep > 0 && text[keep - 1] != '\n')
            keep--;
        if (truncate(path, (off_t)keep) != 0) {
            cli_error("%s: cannot cut off its incomplete last line: %s", path, strerror(errno));
            munmap(text, (size_t)size);
            return -1;
        }
        if (!quiet)
            fprintf(stderr, "kli: %s: dropped an incomplete last line (%zu bytes)\n", path,
                    len - keep);
        len = keep;
    }
    while (pos < len) {
        char *p = text + pos, *nl = memchr(p, '\n', len - pos);
        size_t n = (size_t)(nl - p);   /* every line ends in a newline now */
        pos += n + 1;
        cJSON *root = cJSON_ParseWithLength(p, n);
        cJSON *id = cJSON_GetObjectItemCaseSensitive(root, "custom_id");
        const cJSON *fr = cJSON_GetObjectItemCaseSensitive(root, "finish_reason");
        const cJSON *oerr = cJSON_GetObjectItemCaseSensitive(root, "error");
        int32_t failed = cJSON_IsString(fr) && strcmp(fr->valuestring, "error") == 0;
        if (id != NULL)   /* an OpenAI Batch output line: failed when its error is set */
            failed = oerr != NULL && !cJSON_IsNull(oerr);
        else
            id = cJSON_GetObjectItemCaseSensitive(root, "id");
        if (cJSON_IsString(id)) {
            if (batch_idset_add(set, id->valuestring, failed, NULL) < 0) {
                cJSON_Delete(root);
                munmap(text, (size_t)size);
                cli_error("%s: out of memory", path);
                return -1;
            }
        } else if (n > 0) {
            bad++;
        }
        cJSON_Delete(root);
    }
    if (bad > 0 && !quiet)
        fprintf(stderr, "kli: %s: %zu lines without an id ignored\n", path, bad);
    munmap(text, (size_t)size);
    return 0;
}

/* ==== records ============================================================================== */

static int
rec_fail(struct batch_rec *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int
rec_fail(struct batch_rec *r, const char *fmt, ...)
{
    va_list ap;

    if (r->error == NULL) {     /* the first reason stays */
        va_start(ap, fmt);
        vsnprintf(r->msg, sizeof(r->msg), fmt, ap);
        va_end(ap);
        r->error = r->msg;
    }
    return -1;
}

/* A number field: absent leaves *out, anything but a number in [lo, hi] fails. */
static int
rec_num(struct batch_rec *r, const cJSON *o, const char *name, double lo, double hi,
        int integer, double *out)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, name);

    if (j == NULL || cJSON_IsNull(j))
        return 0;
    if (!cJSON_IsNumber(j) || !(j->valuedouble >= lo && j->valuedouble <= hi) ||
        (integer && j->valuedouble != (double)(int64_t)j->valuedouble))
        return rec_fail(r, "\"%s\" must be %s in [%g, %g]", name,
                        integer ? "an integer" : "a number", lo, hi);
    *out = j->valuedouble;
    return 0;
}

/* "logit_bias": {"TOKEN_ID": BIAS, ...}, as OpenAI's API has it (cli_oai.h). */
static int
rec_bias(struct batch_rec *r, const cJSON *o)
{
    const cJSON *lb = cJSON_GetObjectItemCaseSensitive(o, "logit_bias");
    char msg[256];
    int rc;

    if (lb == NULL)
        return 0;
    rc = oai_logit_bias(lb, 0, &r->bias_ids, &r->bias, &r->so.n_bias, msg, sizeof(msg));
    if (rc == -2)
        return rec_fail(r, "out of memory");
    if (rc != 0)
        return rec_fail(r, "%s", msg);
    r->so.bias_ids = r->bias_ids;
    r->so.bias = r->bias;
    return 0;
}

static int
rec_settings(struct batch_rec *r, const cJSON *o)
{
    double v;
    const cJSON *stop;

    static const struct {
        const char *name;
        size_t off;
        double lo, hi;
    } floats[] = {
        {"temperature", offsetof(struct kli_sampler_options, temperature), 0, 100},
        {"top_p", offsetof(struct kli_sampler_options, top_p), 0, 1},
        {"min_p", offsetof(struct kli_sampler_options, min_p), 0, 1},
        {"repeat_penalty", offsetof(struct kli_sampler_options, repeat_penalty), 0, 100},
        {"presence_penalty", offsetof(struct kli_sampler_options, presence_penalty), -100, 100},
        {"frequency_penalty", offsetof(struct kli_sampler_options, frequency_penalty), -100,
         100},
    };
    for (size_t i = 0; i < sizeof(floats) / sizeof(floats[0]); i++) {
        float *f = (float *)((char *)&r->so + floats[i].off);
        v = *f;
        if (rec_num(r, o, floats[i].name, floats[i].lo, floats[i].hi, 0, &v) != 0)
            return -1;
        *f = (float)v;
    }
    v = r->so.top_k;
    if (rec_num(r, o, "top_k", 0, 1 << 30, 1, &v) != 0)
        return -1;
    r->so.top_k = (int32_t)v;
    v = r->so.penalty_last_n;
    if (rec_num(r, o, "repeat_last_n", 0, 1 << 24, 1, &v) != 0)
        return -1;
    r->so.penalty_last_n = (int32_t)v;
    v = r->max_tokens;
    if (rec_num(r, o, "max_tokens", 0, 1 << 30, 1, &v) != 0)
        return -1;
    r->max_tokens = (int32_t)v;
    /* Seeds above 2^53 cannot be told apart in a JSON number; they are rejected. */
    v = (double)r->so.seed;
    if (rec_num(r, o, "seed", 0, 9007199254740992.0, 1, &v) != 0)
        return -1;
    r->so.seed = (uint64_t)v;

    stop = cJSON_GetObjectItemCaseSensitive(o, "stop");
    if (stop != NULL && !cJSON_IsNull(stop)) {
        r->n_stop = 0;          /* in place of the defaults */
        if (cJSON_IsString(stop)) {
            if (stop->valuestring[0] == '\0')
                return rec_fail(r, "\"stop\" may not be empty");
            r->stop[r->n_stop++] = stop->valuestring;
        } else if (cJSON_IsArray(stop)) {
            const cJSON *s;
            cJSON_ArrayForEach(s, stop) {
                if (!cJSON_IsString(s) || s->valuestring[0] == '\0')
                    return rec_fail(r, "\"stop\" must hold non-empty strings");
                if (r->n_stop == BATCH_MAX_STOP)
                    return rec_fail(r, "\"stop\": at most %d strings", BATCH_MAX_STOP);
                r->stop[r->n_stop++] = s->valuestring;
            }
        } else {
            return rec_fail(r, "\"stop\" must be a string or an array of strings");
        }
    }
    if (rec_bias(r, o) != 0)
        return -1;
    struct kli_sampler *probe = NULL;
    struct kli_sampler_options so = r->so;
    struct kli_err err = {0};
    so.n_bias = 0;   /* the ids are checked against the model's vocabulary when it runs */
    if (kli_sampler_create(&probe, &so, 1, &err) != KLI_OK)
        return rec_fail(r, "%s", err.msg);
    kli_sampler_free(probe);
    return 0;
}

/* "logprobs" and "top_logprobs": a chat body's and kli's records take logprobs true or false
 * and top_logprobs 0..20 (which needs logprobs true), a completions body logprobs 0..5. */
static int
rec_logprobs(struct batch_rec *r, const cJSON *o, int api)
{
    const cJSON *lp = cJSON_GetObjectItemCaseSensitive(o, "logprobs");
    const cJSON *top = cJSON_GetObjectItemCaseSensitive(o, "top_logprobs");
    double v = 0;

    r->logprobs = -1;
    if (api == BATCH_API_COMPLETIONS) {
        if (top != NULL)
            return rec_fail(r, "\"top_logprobs\" does not belong to /v1/completions (its "
                            "\"logprobs\" is the number of alternatives)");
        if (rec_num(r, o, "logprobs", 0, 5, 1, &v) != 0)
            return -1;
        r->logprobs = lp != NULL && !cJSON_IsNull(lp) ? (int32_t)v : -1;
        return 0;
    }
    if (lp != NULL && !cJSON_IsNull(lp) && !cJSON_IsBool(lp))
        return rec_fail(r, "\"logprobs\" must be true or false");
    if (rec_num(r, o, "top_logprobs", 0, KLI_LOGPROBS_MAX, 1, &v) != 0)
        return -1;
    if (cJSON_IsTrue(lp))
        r->logprobs = (int32_t)v;
    else if (v > 0)
        return rec_fail(r, "\"top_logprobs\" needs \"logprobs\": true");
    return 0;
}

/* "response_format": OpenAI's text, json_object or json_schema (cli_oai.h). */
static int
rec_format(struct batch_rec *r, const cJSON *o)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(o, "response_format");
    enum oai_format fmt;
    char msg[256];

    if (f == NULL)
        return 0;
    if (oai_response_format(f, &fmt, &r->schema, msg, sizeof(msg)) != 0)
        return rec_fail(r, "%s", msg);
    r->format = (int)fmt;
    if (fmt != OAI_FMT_NONE && fmt != OAI_FMT_TEXT && r->max_tokens == 0)
        return rec_fail(r, "\"response_format\" needs \"max_tokens\" above 0");
    return 0;
}

/* Renders chat messages to r->toks. */
static int
rec_render(struct batch_rec *r, const struct kli_tokenizer *tok,
           const struct kli_chat_message *msgs, int32_t nm)
{
    struct kli_err err = {0};
    int64_t n = kli_chat_render(tok, msgs, nm, 1, 0, NULL, 0, &err);

    if (n < 0)
        return rec_fail(r, "%s", err.msg);
    if (n > INT32_MAX - 1)
        return rec_fail(r, "the prompt is too long");
    if ((r->toks = malloc(((size_t)n + 1) * sizeof(kli_token))) == NULL)
        return rec_fail(r, "out of memory");
    kli_chat_render(tok, msgs, nm, 1, 0, r->toks, n, &err);
    r->n = (int32_t)n;
    return 0;
}

static int
rec_prompt(struct batch_rec *r, const cJSON *o, const struct kli_tokenizer *tok,
           const struct batch_defaults *d)
{
    const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(o, "prompt");
    const cJSON *messages = cJSON_GetObjectItemCaseSensitive(o, "messages");
    const cJSON *system = cJSON_GetObjectItemCaseSensitive(o, "system");
    const cJSON *raw = cJSON_GetObjectItemCaseSensitive(o, "raw");
    struct kli_err err = {0};

    if (prompt != NULL && messages != NULL)
        return rec_fail(r, "give \"prompt\" or \"messages\", not both");
    if (prompt == NULL && messages == NULL)
        return rec_fail(r, "the record has no \"prompt\" and no \"messages\"");
    if (system != NULL && !cJSON_IsString(system))
        return rec_fail(r, "\"system\" must be a string");
    if (raw != NULL && !cJSON_IsBool(raw))
        return rec_fail(r, "\"raw\" must be true or false");
    if (prompt != NULL) {
        if (!cJSON_IsString(prompt))
            return rec_fail(r, "\"prompt\" must be a string");
        const char *text = prompt->valuestring;
        size_t len = strlen(text);
        if ((int64_t)len > d->max_prompt_bytes)
            return rec_fail(r, "the prompt of %zu bytes is over --max-prompt-bytes %lld", len,
                            (long long)d->max_prompt_bytes);
        if (raw != NULL ? cJSON_IsTrue(raw) : d->raw) {
            if ((r->toks = malloc((len + 1) * sizeof(kli_token))) == NULL)
                return rec_fail(r, "out of memory");
            int64_t n = kli_tokenize(tok, text, len, 0, r->toks, (int64_t)len + 1, &err);
            if (n < 0)
                return rec_fail(r, "%s", err.msg);
            if (n > INT32_MAX - 1)
                return rec_fail(r, "the prompt is too long");
            r->n = (int32_t)n;
            return 0;
        }
        struct kli_chat_message msgs[2];
        int nm = 0;
        const char *sys = system != NULL ? system->valuestring : d->system;
        if (sys != NULL) {
            msgs[nm].role = "system";
            msgs[nm++].content = sys;
        }
        msgs[nm].role = "user";
        msgs[nm++].content = text;
        return rec_render(r, tok, msgs, nm);
    }
    if (!cJSON_IsArray(messages) || cJSON_GetArraySize(messages) < 1)
        return rec_fail(r, "\"messages\" must be a non-empty array of {\"role\", \"content\"}");
    int count = cJSON_GetArraySize(messages);
    struct kli_chat_message *msgs = calloc((size_t)count, sizeof(*msgs));
    int64_t bytes = 0;
    const cJSON *m;
    int i = 0, rc;
    if (msgs == NULL)
        return rec_fail(r, "out of memory");
    cJSON_ArrayForEach(m, messages) {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
        if (!cJSON_IsString(role) || !cJSON_IsString(content)) {
            free(msgs);
            return rec_fail(r, "message %d needs string \"role\" and \"content\"", i);
        }
        msgs[i].role = role->valuestring;
        msgs[i++].content = content->valuestring;
        bytes += (int64_t)strlen(content->valuestring);
    }
    if (bytes > d->max_prompt_bytes) {
        free(msgs);
        return rec_fail(r, "the messages of %lld bytes are over --max-prompt-bytes %lld",
                        (long long)bytes, (long long)d->max_prompt_bytes);
    }
    rc = rec_render(r, tok, msgs, count);
    free(msgs);
    return rc;
}

/* ==== tools (cli_toolcall.h) ============================================================== */

void
batch_tools_free(struct batch_tools *t)
{
    if (t == NULL)
        return;
    cJSON_Delete(t->tools);
    free(t->forced);
    for (int i = 0; i < t->n_stop; i++)
        free(t->stop[i]);
    free(t->acc);
    free(t);
}

/* A record with "tools", "tool_choice" or tool messages: its prompt rendered with them
 * (tc_render), a forced call's grammar as its schema, and r->tools to read the answer with
 * (NULL under tool_choice "none"). *done: the prompt is made (or the record failed). */
static int
rec_tools(struct batch_rec *r, const cJSON *o, const struct kli_tokenizer *tok,
          const struct batch_defaults *d, int *done)
{
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(o, "tools");
    const cJSON *choice = cJSON_GetObjectItemCaseSensitive(o, "tool_choice");
    const cJSON *messages = cJSON_GetObjectItemCaseSensitive(o, "messages");
    const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(o, "prompt");
    const char *forced = NULL;
    char msg[256], *prefix = NULL;
    cJSON *built = NULL;
    kli_token *ids = NULL;
    struct kli_err err = {0};
    int none = 0, one = 0;
    int64_t n;

    *done = 0;
    if (cJSON_IsNull(tools))
        tools = NULL;
    if (tools == NULL && (choice == NULL || cJSON_IsNull(choice)) &&
        !oai_tool_messages(messages))
        return 0;
    *done = 1;
    if (tc_check(tools, choice, &forced, &none, msg, sizeof(msg)) != 0 ||
        tc_parallel(cJSON_GetObjectItemCaseSensitive(o, "parallel_tool_calls"), &one, msg,
                    sizeof(msg)) != 0)
        return rec_fail(r, "%s", msg);
    if (prompt != NULL && (messages != NULL || !cJSON_IsString(prompt) ||
                           cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "raw"))))
        return rec_fail(r, "\"tools\" need \"messages\", or a \"prompt\" string in the chat "
                        "format");
    if (prompt != NULL) {   /* the chat format's system and user turns */
        const cJSON *sys = cJSON_GetObjectItemCaseSensitive(o, "system");
        if (sys != NULL && !cJSON_IsString(sys))
            return rec_fail(r, "\"system\" must be a string");
        built = tc_messages(cJSON_IsString(sys) ? sys->valuestring : d->system,
                            prompt->valuestring);
        if (built == NULL)
            return rec_fail(r, "out of memory");
        messages = built;
    }
    if (!cJSON_IsArray(messages) || cJSON_GetArraySize(messages) < 1) {
        cJSON_Delete(built);
        return rec_fail(r, "\"messages\" must be a non-empty array");
    }
    if (forced != NULL) {
        if (r->format == BATCH_FMT_OBJECT || r->format == BATCH_FMT_SCHEMA) {
            cJSON_Delete(built);
            return rec_fail(r, "\"tool_choice\" %s does not go with \"response_format\"",
                            forced[0] ? "naming a function" : "\"required\"");
        }
        if (r->max_tokens == 0) {
            cJSON_Delete(built);
            return rec_fail(r, "\"tool_choice\" %s needs \"max_tokens\" above 0",
                            forced[0] ? "naming a function" : "\"required\"");
        }
        free(r->schema);
        r->schema = NULL;
        if (tc_forced_grammar(tools, forced, &r->schema, &prefix) != 0) {
            cJSON_Delete(built);
            return rec_fail(r, "out of memory");
        }
        r->format = BATCH_FMT_SCHEMA;
    }
    n = tc_render(tok, messages, tools, prefix, 0, &ids, &err);
    free(prefix);
    cJSON_Delete(built);
    if (n < 0)
        return rec_fail(r, "%s", err.msg);
    r->toks = ids;
    if (n > INT32_MAX - 1)
        return rec_fail(r, "the prompt is too long");
    r->n = (int32_t)n;
    if (none || tools == NULL)
        return 0;
    if ((r->tools = calloc(1, sizeof(*r->tools))) == NULL ||
        (r->tools->tools = cJSON_Duplicate(tools, 1)) == NULL ||
        (forced != NULL && (r->tools->forced = strdup(forced)) == NULL))
        return rec_fail(r, "out of memory");
    r->tools->one_call = one;
    for (int i = 0; i < r->n_stop; i++) {
        if ((r->tools->stop[i] = strdup(r->stop[i])) == NULL)
            return rec_fail(r, "out of memory");
        r->tools->n_stop = i + 1;
    }
    return 0;
}

/* The members of an OpenAI request body kli reads, besides those it ignores (model, user,
 * metadata, store) and those it checks for their one allowed value (n, stream). */
static const char *const rec_body_fields[] = {
    "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "min_p", "seed", "stop", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "response_format", "logit_bias", "model", "user", "metadata",
    "store", "n", "stream", "tools", "tool_choice", "parallel_tool_calls", "logprobs",
    "top_logprobs",
};

/* An OpenAI Batch line: *o becomes its body, checked member by member (one kli cannot
 * honour fails the record naming it), with OpenAI's names turned into kli's. */
static int
rec_openai(struct batch_rec *r, const struct batch_item *it, cJSON **o)
{
    cJSON *root = r->json, *body = cJSON_GetObjectItemCaseSensitive(root, "body"), *k;
    const cJSON *method = cJSON_GetObjectItemCaseSensitive(root, "method");

    if (!cJSON_IsString(cJSON_GetObjectItemCaseSensitive(root, "custom_id")))
        return rec_fail(r, "\"custom_id\" must be a non-empty string");
    if (method != NULL && (!cJSON_IsString(method) || strcmp(method->valuestring, "POST")))
        return rec_fail(r, "\"method\" must be \"POST\"");
    if (it->api == BATCH_API_OTHER)
        return rec_fail(r, "\"url\" must be \"/v1/chat/completions\" or \"/v1/completions\"");
    if (!cJSON_IsObject(body))
        return rec_fail(r, "\"body\" must be an object");
    cJSON_ArrayForEach(k, body) {
        size_t i = 0;
        while (i < sizeof(rec_body_fields) / sizeof(rec_body_fields[0]) &&
               strcmp(k->string, rec_body_fields[i]) != 0)
            i++;
        if (i == sizeof(rec_body_fields) / sizeof(rec_body_fields[0]))
            return rec_fail(r, "\"body.%.64s\" is not supported", k->string);
    }
    k = cJSON_GetObjectItemCaseSensitive(body, "n");
    if (k != NULL && !cJSON_IsNull(k) && !(cJSON_IsNumber(k) && k->valuedouble == 1))
        return rec_fail(r, "\"body.n\": only 1 choice is supported");
    k = cJSON_GetObjectItemCaseSensitive(body, "stream");
    if (k != NULL && !cJSON_IsNull(k) && !cJSON_IsFalse(k))
        return rec_fail(r, "\"body.stream\": a batch does not stream");
    if (it->api == BATCH_API_CHAT ? cJSON_HasObjectItem(body, "prompt")
                                  : cJSON_HasObjectItem(body, "messages"))
        return rec_fail(r, "\"body.%s\" does not belong to %s",
                        it->api == BATCH_API_CHAT ? "prompt" : "messages",
                        it->api == BATCH_API_CHAT ? "/v1/chat/completions" : "/v1/completions");
    /* a completion continues its prompt as it is: it has no tools (kli serve agrees) */
    static const char *const chat_only[] = {"tools", "tool_choice", "parallel_tool_calls"};
    for (size_t i = 0; it->api == BATCH_API_COMPLETIONS && i < 3; i++) {
        const char *f = chat_only[i];
        if (cJSON_HasObjectItem(body, f))
            return rec_fail(r, "\"body.%s\" does not belong to /v1/completions", f);
    }
    /* OpenAI's and vLLM's names for kli's */
    static const char *const alias[][2] = {
        {"max_completion_tokens", "max_tokens"}, {"repetition_penalty", "repeat_penalty"},
    };
    for (size_t i = 0; i < sizeof(alias) / sizeof(alias[0]); i++) {
        k = cJSON_GetObjectItemCaseSensitive(body, alias[i][0]);
        if (k == NULL || cJSON_HasObjectItem(body, alias[i][1]))
            continue;
        cJSON *dup = cJSON_Duplicate(k, 1);
        if (dup == NULL || !cJSON_AddItemToObject(body, alias[i][1], dup)) {
            cJSON_Delete(dup);
            return rec_fail(r, "out of memory");
        }
    }
    *o = body;
    return 0;
}

int
batch_rec_prepare(struct batch_rec *r, const struct batch_input *in,
                  const struct batch_item *it, const struct kli_tokenizer *tok,
                  const struct batch_defaults *d)
{
    memset(r, 0, sizeof(*r));
    r->logprobs = -1;
    r->so = d->so;
    r->max_tokens = d->max_tokens;
    for (; r->n_stop < d->n_stop; r->n_stop++)
        r->stop[r->n_stop] = d->stop[r->n_stop];   /* the command line's: they outlive r */
    if ((r->error = it->error) != NULL)
        return 0;
    r->json = cJSON_ParseWithLength(in->text + it->off, (size_t)it->len);
    if (r->json == NULL)
        return -1;      /* it parsed during the scan: out of memory */
    cJSON *o = r->json;
    struct batch_defaults dd = *d;
    if (it->api != BATCH_API_KLI) {
        dd.raw = it->api == BATCH_API_COMPLETIONS;   /* a completion continues its prompt */
        if (rec_openai(r, it, &o) != 0)
            o = NULL;
    }
    int done = 0;
    if (o != NULL && rec_settings(r, o) == 0 && rec_logprobs(r, o, it->api) == 0 &&
        rec_format(r, o) == 0 &&
        rec_tools(r, o, tok, &dd, &done) == 0 && (done || rec_prompt(r, o, tok, &dd) == 0) &&
        r->n == 0 && r->error == NULL)
        rec_fail(r, "the prompt is empty");
    if (r->error != NULL) {
        free(r->toks);
        r->toks = NULL;
        r->n = 0;
        batch_tools_free(r->tools);
        r->tools = NULL;
    }
    return 0;
}

void
batch_rec_clear(struct batch_rec *r)
{
    free(r->toks);
    free(r->schema);
    free(r->bias_ids);
    free(r->bias);
    batch_tools_free(r->tools);
    cJSON_Delete(r->json);
}
