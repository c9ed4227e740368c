/*
 * cli.c - the kli command: main(), the command table, and the commands that work on ids
 * and models (logits, info). Uses only the public kli.h.
 *
 * Exit status: 0 success, 1 runtime error (bad model, I/O), 2 usage error.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>   /* mallopt */
#endif

#include "kli.h"
#include "cli.h"

/* ==== helpers shared by the commands ===================================================== */

void
cli_error(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "kli: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
}

int
cli_parse_int(const char *s, long lo, long hi, const char *what, long *out)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi) {
        cli_error("%s: '%s' is not an integer in [%ld, %ld]", what, s, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

int
cli_parse_float(const char *s, const char *what, float *out)
{
    char *end;

    errno = 0;
    double v = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || v != v) {
        cli_error("%s: '%s' is not a number", what, s);
        return -1;
    }
    *out = (float)v;
    return 0;
}

int
cli_sampling_option(int c, const char *arg, struct kli_sampler_options *so)
{
    long v;

    switch (c) {
    case CLI_OPT_TEMP: return cli_parse_float(arg, "--temp", &so->temperature) ? -1 : 1;
    case CLI_OPT_TOPP: return cli_parse_float(arg, "--top-p", &so->top_p) ? -1 : 1;
    case CLI_OPT_MINP: return cli_parse_float(arg, "--min-p", &so->min_p) ? -1 : 1;
    case CLI_OPT_REPEAT:
        return cli_parse_float(arg, "--repeat-penalty", &so->repeat_penalty) ? -1 : 1;
    case CLI_OPT_PRESENCE:
        return cli_parse_float(arg, "--presence-penalty", &so->presence_penalty) ? -1 : 1;
    case CLI_OPT_FREQUENCY:
        return cli_parse_float(arg, "--frequency-penalty", &so->frequency_penalty) ? -1 : 1;
    case CLI_OPT_TOPK:
        if (cli_parse_int(arg, 0, 1 << 30, "--top-k", &v))
            return -1;
        so->top_k = (int32_t)v;
        return 1;
    case CLI_OPT_LASTN:
        if (cli_parse_int(arg, 0, 1 << 24, "--repeat-last-n", &v))
            return -1;
        so->penalty_last_n = (int32_t)v;
        return 1;
    case CLI_OPT_SEED: {
        char *end;
        errno = 0;
        unsigned long long s = strtoull(arg, &end, 10);
        if (errno != 0 || end == arg || *end != '\0' || arg[0] == '-') {
            cli_error("--seed: '%s' is not a non-negative integer", arg);
            return -1;
        }
        so->seed = s;
        return 1;
    }
    default:
        return 0;
    }
}

void
cli_gen_init(struct cli_gen_opts *g)
{
    memset(g, 0, sizeof(*g));
    g->max_tokens = 256;
    kli_sampler_options_init(&g->so);
}

/* --logit-bias ID:BIAS[,ID:BIAS]...: @return 1, or -1 after reporting. */
static int
cli_logit_bias(const char *arg, struct cli_gen_opts *g)
{
    const char *p = arg;

    for (;;) {
        char *end;
        long id;
        double b;
        errno = 0;
        id = strtol(p, &end, 10);
        if (*p < '0' || *p > '9' || errno != 0 || end == p || *end != ':' || id < 0 ||
            id > INT32_MAX)
            goto bad;
        /* the sampler adds the biases of a repeated id: 5:60,5:60 would be 120 */
        for (int32_t i = 0; i < g->so.n_bias; i++) {
            if (g->bias_ids[i] == (kli_token)id) {
                cli_error("--logit-bias: token %ld is given twice", id);
                return -1;
            }
        }
        p = end + 1;
        b = strtod(p, &end);
        if (end == p || !(b >= -100.0 && b <= 100.0) || (*end != ',' && *end != '\0'))
            goto bad;
        if (g->so.n_bias == CLI_GEN_MAX_BIAS) {
            cli_error("--logit-bias: at most %d tokens", CLI_GEN_MAX_BIAS);
            return -1;
        }
        g->bias_ids[g->so.n_bias] = (kli_token)id;
        g->bias[g->so.n_bias++] = (float)b;
        g->so.bias_ids = g->bias_ids;
        g->so.bias = g->bias;
        if (*end == '\0')
            return 1;
        p = end + 1;
    }
bad:
    cli_error("--logit-bias: '%s' is not ID:BIAS[,ID:BIAS]... (a token id, a bias in "
              "[-100, 100])", arg);
    return -1;
}

int
cli_gen_option(int c, const char *arg, struct cli_gen_opts *g)
{
    int r;

    switch (c) {
    case 's': g->system = arg; return 1;
    case 'n': return cli_parse_int(arg, 0, 1 << 30, "--max-tokens", &g->max_tokens) ? -1 : 1;
    case 't': return cli_parse_int(arg, 1, 4096, "--threads", &g->threads) ? -1 : 1;
    case CLI_OPT_CTX: return cli_parse_int(arg, 1, 1 << 30, "--ctx", &g->ctx) ? -1 : 1;
    case CLI_OPT_CACHE_TYPE: return cli_parse_cache_type(arg, &g->cache_type) ? -1 : 1;
    case CLI_OPT_RAW: g->raw = 1; return 1;
    case CLI_OPT_QUIET: g->quiet = 1; return 1;
    case CLI_OPT_JSON_SCHEMA: g->json_schema = arg; return 1;
    case CLI_OPT_LOGIT_BIAS:
        return cli_logit_bias(arg, g);
    case CLI_OPT_STOP:
        if (g->n_stop == CLI_GEN_MAX_STOP) {
            cli_error("--stop: at most %d stop strings", CLI_GEN_MAX_STOP);
            return -1;
        }
        if (arg[0] == '\0') {
            cli_error("--stop: empty stop string");
            return -1;
        }
        g->stop[g->n_stop++] = arg;
        return 1;
    default:
        if ((r = cli_sampling_option(c, arg, &g->so)) != 0)
            return r;
        return cli_model_option(c, arg, &g->threads);   /* placement and GPU ('t' is above) */
    }
}

int
cli_session_create(const struct kli_model *m, int32_t type, struct kli_session **s)
{
    struct kli_session_options so;
    struct kli_err err = {0};

    kli_session_options_init(&so);
    so.cache_type = type;
    if (kli_session_create(s, m, &so, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        return -1;
    }
    return 0;
}

int
cli_parse_cache_type(const char *s, int32_t *out)
{
    for (int32_t t = KLI_CACHE_F32; t <= KLI_CACHE_Q8_0; t++) {
        if (strcmp(s, kli_cache_type_name(t)) == 0) {
            *out = t;
            return 0;
        }
    }
    cli_error("--cache-type: '%s' is none of f32, bf16, q8_0", s);
    return -1;
}

/* The first number after `key` in the text file at path (a line "key value"), or -1. */
static int64_t
cli_file_num(const char *path, const char *key)
{
    char line[256];
    FILE *f = fopen(path, "r");
    int64_t v = -1;
    size_t kl = strlen(key);

    if (f == NULL)
        return -1;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, key, kl) == 0) {
            char *end;
            long long x = strtoll(line + kl, &end, 10);
            if (end != line + kl && x >= 0)
                v = x;
            break;
        }
    }
    fclose(f);
    return v;
}

/* Lowers *most to `room` bytes (when known, >= 0), naming the limit. */
static void
cli_room(int64_t room, const char *what, int64_t *most, const char **why)
{
    if (room >= 0 && (*most < 0 || room < *most)) {
        *most = room;
        *why = what;
    }
}

int64_t
cli_mem_room(const char **why)
{
    int64_t most = -1, max, cur;
    struct rlimit rl;

    *why = NULL;
    int64_t kb = cli_file_num("/proc/meminfo", "MemAvailable:");
    cli_room(kb >= 0 ? kb * 1024 : -1, "available memory (MemAvailable)", &most, why);
    /* cgroup v2, then v1: the limit less what the group uses now ("max": none) */
    max = cli_file_num("/sys/fs/cgroup/memory.max", "");
    cur = cli_file_num("/sys/fs/cgroup/memory.current", "");
    if (max < 0) {
        max = cli_file_num("/sys/fs/cgroup/memory/memory.limit_in_bytes", "");
        cur = cli_file_num("/sys/fs/cgroup/memory/memory.usage_in_bytes", "");
    }
    if (max >= 0 && cur >= 0 && max < ((int64_t)1 << 60))
        cli_room(max > cur ? max - cur : 0, "the cgroup's memory limit", &most, why);
    /* RLIMIT_AS less the address space mapped now (the model's mapping among it) */
    int64_t vm = cli_file_num("/proc/self/status", "VmSize:");
    if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && vm >= 0) {
        int64_t lim = rl.rlim_cur > (rlim_t)INT64_MAX ? INT64_MAX : (int64_t)rl.rlim_cur;
        cli_room(lim > vm * 1024 ? lim - vm * 1024 : 0, "the address space limit (RLIMIT_AS)",
                 &most, why);
    }
    return most;
}

int
cli_ctx_fits(const struct kli_model *m, int32_t type, int64_t ctx)
{
    uint64_t need = kli_model_cache_bytes(m, type, ctx);
    const char *why;
    int64_t most;

    if (need == 0)
        return 0;   /* a type the model cannot hold: the session says so */
    most = cli_mem_room(&why);
    if (most < 0 || need <= (uint64_t)most)
        return 0;
    cli_error("a context of %lld tokens needs %.2f GiB for its %s latent cache and attention "
              "scores, but %s leaves %.2f GiB: lower --ctx%s", (long long)ctx,
              (double)need / (1 << 30), kli_cache_type_name(type), why,
              (double)most / (1 << 30), type == KLI_CACHE_F32 ? " or take --cache-type bf16 "
              "or q8_0" : type == KLI_CACHE_BF16 ? " or take --cache-type q8_0" : "");
    return -1;
}

int
cli_gen_check(const struct cli_gen_opts *g)
{
    struct kli_sampler *probe = NULL;
    struct kli_sampler_options so = g->so;
    struct kli_err err = {0};

    so.n_bias = 0;   /* the token ids are checked against the model's vocabulary */
    if (kli_sampler_create(&probe, &so, 1, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        return -1;
    }
    kli_sampler_free(probe);
    if (g->json && g->json_schema != NULL) {
        cli_error("give --json or --json-schema, not both");
        return -1;
    }
    if ((g->json || g->json_schema != NULL) && g->max_tokens == 0) {
        cli_error("%s needs --max-tokens above 0", g->json ? "--json" : "--json-schema");
        return -1;
    }
    return 0;
}

int
cli_gen_grammar(const struct cli_gen_opts *g, const struct kli_tokenizer *tok,
                struct kli_grammar **out)
{
    struct kli_err err = {0};
    char *text = NULL;
    size_t len = 0;
    int rc;

    *out = NULL;
    if (!g->json && g->json_schema == NULL)
        return 0;
    if (g->json_schema != NULL &&
        (text = cli_read_file(g->json_schema, CLI_SCHEMA_MAX, 0, "(the limit is 1 MiB)",
                              &len)) == NULL)
        return -1;
    rc = kli_grammar_create(out, tok, text, len, &err);
    free(text);
    if (rc != KLI_OK) {
        cli_error("%s: %s", g->json_schema != NULL ? g->json_schema : "--json", err.msg);
        return -1;
    }
    return 0;
}

/* Reads a whole file (or stdin for "-") into a NUL-terminated buffer. A FIFO or a pipe is a
 * legitimate source of text (prompts, batch input) and is read until its writer closes it;
 * what bounds the read is its size: more than `max` bytes, or a line (up to a newline)
 * longer than `max_line` when that is not 0, is refused with a message ending in `limit`,
 * so that /dev/zero or an endless pipe fails at once instead of filling the memory. */
char *
cli_read_file(const char *path, size_t max, size_t max_line, const char *limit, size_t *len)
{
    int fd = strcmp(path, "-") == 0 ? STDIN_FILENO : open(path, O_RDONLY | O_CLOEXEC);
    char *buf = NULL;
    size_t n = 0, cap = 0, line = 0;   /* line: bytes since the last newline */

    if (fd < 0) {
        cli_error("%s: %s", path, strerror(errno));
        return NULL;
    }
    for (;;) {
        if (cap - n < 65536 && cap <= max) {
            size_t nc = cap ? cap * 2 : 65536;
            if (nc > max + 1 || nc < cap)
                nc = max + 1;   /* one byte past the limit tells a file over it */
            char *nb = realloc(buf, nc + 1);
            if (nb == NULL) {
                cli_error("%s: out of memory", path);
                goto fail;
            }
            buf = nb;
            cap = nc;
        }
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0) {   /* EINTR too: only a signal the command catches (to stop) gets here */
            cli_error("%s: %s", path, errno == EINTR ? "interrupted" : strerror(errno));
            goto fail;
        }
        if (r == 0)
            break;   /* the end (a terminal's Ctrl-D included) */
        if (max_line > 0) {
            size_t k = (size_t)r;
            while (k > 0 && buf[n + k - 1] != '\n')
                k--;
            line = k > 0 ? (size_t)r - k : line + (size_t)r;
            if (line > max_line) {
                cli_error("%s: a line of more than %zu bytes (%s)", path, max_line, limit);
                goto fail;
            }
        }
        n += (size_t)r;
        if (n > max) {
            cli_error("%s: more than %zu bytes (%s)", path, max, limit);
            goto fail;
        }
    }
    buf[n] = '\0';
    *len = n;
    if (fd != STDIN_FILENO)
        close(fd);
    return buf;
fail:
    free(buf);
    if (fd != STDIN_FILENO)
        close(fd);
    return NULL;
}

/* ==== text for people ====================================================================== */

/* Writes the text of p[0, limit) by the rule of cli_text_write, reading on to n for a
 * sequence that starts before limit. @return the bytes consumed, less than limit when the
 * text ends inside a sequence (unless `final`, where that becomes U+FFFD), or (size_t)-1 on a
 * write error. */
static size_t
text_scan(FILE *f, const unsigned char *p, size_t n, size_t limit, int final)
{
    static const char fffd[] = "\xef\xbf\xbd";
    size_t i = 0, run = 0;   /* p[run, i) passes unchanged */

    while (i < limit) {
        int k = cli_utf8_seq(p + i, n - i);
        if (k < 0 && (size_t)-k == n - i && p[i] >= 0xc2 && p[i] <= 0xf4 && !final)
            break;   /* the rest may come with the next write */
        unsigned cp = p[i];
        if (k == 2)
            cp = ((p[i] & 0x1fu) << 6) | (p[i + 1] & 0x3fu);
        int ctl = k == 1 ? (cp < 0x20 && cp != '\n' && cp != '\t') || cp == 0x7f
                         : k == 2 && cp >= 0x80 && cp < 0xa0;
        if (k > 0 && !ctl) {
            i += (size_t)k;
            continue;
        }
        if (fwrite(p + run, 1, i - run, f) != i - run || fwrite(fffd, 1, 3, f) != 3)
            return (size_t)-1;
        i += (size_t)(k > 0 ? k : -k);
        run = i;
    }
    if (fwrite(p + run, 1, i - run, f) != i - run)
        return (size_t)-1;
    return i;
}

int
cli_text_write(struct cli_text *t, FILE *f, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t off = 0;

    if (t->n_held > 0) {
        /* The held start of a character and enough of the new text to finish it. */
        unsigned char b[8];
        size_t m = n < 4 ? n : 4, h = t->n_held;
        memcpy(b, t->held, h);
        memcpy(b + h, u, m);
        size_t used = text_scan(f, b, h + m, h, 0);
        if (used == (size_t)-1)
            return -1;
        if (used < h) {   /* still unfinished: hold it all */
            memmove(t->held, b + used, h + m - used);
            t->n_held = h + m - used;
            return 0;
        }
        off = used - h;
        t->n_held = 0;
    }
    size_t used = text_scan(f, u + off, n - off, n - off, 0);
    if (used == (size_t)-1)
        return -1;
    memcpy(t->held, u + off + used, n - off - used);
    t->n_held = n - off - used;
    return 0;
}

int
cli_text_end(struct cli_text *t, FILE *f)
{
    size_t h = t->n_held;

    t->n_held = 0;
    return h > 0 && text_scan(f, t->held, h, h, 1) == (size_t)-1 ? -1 : 0;
}

int64_t
cli_find_nul(const char *s, size_t n, int json)
{
    const char *z = memchr(s, '\0', n);
    int in_str = 0;

    if (!json)
        return z != NULL ? (int64_t)(z - s) : -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '"') {
            in_str = !in_str;
        } else if (in_str && s[i] == '\\' && i + 1 < n) {
            if (s[i + 1] == 'u' && i + 5 < n && memcmp(s + i + 2, "0000", 4) == 0)
                return (int64_t)i;
            i++;   /* the escaped character */
        }
    }
    return -1;
}

/* Parses ids separated by whitespace and/or commas. */
int
cli_parse_ids(const char *s, kli_token **out, int32_t *n_out)
{
    size_t cap = 64, n = 0;
    kli_token *ids = malloc(cap * sizeof(*ids));
    const char *p = s;

    if (ids == NULL)
        return -1;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ',')
            p++;
        if (*p == '\0')
            break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno != 0 || v < 0 || v > INT32_MAX ||
            (*end != '\0' && *end != ' ' && *end != '\t' && *end != '\n' && *end != '\r' &&
             *end != ',')) {
            cli_error("token ids: bad id at character %zu: '%.20s'", (size_t)(p - s) + 1, p);
            free(ids);
            return -1;
        }
        if (n == cap) {
            kli_token *ni = realloc(ids, cap * 2 * sizeof(*ids));
            if (ni == NULL) {
                free(ids);
                return -1;
            }
            ids = ni;
            cap *= 2;
        }
        ids[n++] = (kli_token)v;
        if (n > INT32_MAX / 2) {
            cli_error("token ids: too many");
            free(ids);
            return -1;
        }
        p = end;
    }
    *out = ids;
    *n_out = (int32_t)n;
    return 0;
}

int
cli_read_ids(const char *path, const char *limit, kli_token **out, int32_t *n_out)
{
    size_t len;
    char *text = cli_read_file(path, CLI_TEXT_MAX, 0, limit, &len);
    int rc = -1;

    if (text == NULL)
        return -1;
    if (strlen(text) != len)
        cli_error("%s: contains a NUL byte", path);
    else
        rc = cli_parse_ids(text, out, n_out);
    free(text);
    return rc;
}

/* ==== GPU options ========================================================================== */

static struct {
    int given;                    /* any --gpu* option */
    int mode;                     /* enum kli_gpu_mode */
    uint64_t mem;
    int32_t experts;
    const char *profile;
} cli_gpu = {0, KLI_GPU_AUTO, 0, -1, NULL};

/* "8G", "512M", "1024K" or bytes; @return 0 or -1. */
int
cli_parse_size(const char *s, uint64_t *out)
{
    char *end;
    double v;

    errno = 0;
    v = strtod(s, &end);
    if (errno != 0 || end == s || !(v > 0) || v > 1e15)
        return -1;
    switch (*end) {
    case 'k': case 'K': v *= 1024.0; end++; break;
    case 'm': case 'M': v *= 1048576.0; end++; break;
    case 'g': case 'G': v *= 1073741824.0; end++; break;
    case 't': case 'T': v *= 1099511627776.0; end++; break;
    default: break;
    }
    if (end[0] != '\0' && (end[0] == 'i' || end[0] == 'I') && (end[1] == 'b' || end[1] == 'B'))
        end += 2;   /* GiB */
    else if (end[0] == 'b' || end[0] == 'B')
        end++;
    if (*end != '\0')
        return -1;
    *out = (uint64_t)v;
    return 0;
}

int
cli_gpu_option(int c, const char *arg)
{
    long v;

    switch (c) {
    case CLI_OPT_GPU:
        if (strcmp(arg, "auto") == 0)
            cli_gpu.mode = KLI_GPU_AUTO;
        else if (strcmp(arg, "on") == 0)
            cli_gpu.mode = KLI_GPU_ON;
        else if (strcmp(arg, "off") == 0)
            cli_gpu.mode = KLI_GPU_OFF;
        else {
            cli_error("--gpu: '%s' is not auto, on or off", arg);
            return -1;
        }
        break;
    case CLI_OPT_GPU_MEM:
        if (cli_parse_size(arg, &cli_gpu.mem) != 0) {
            cli_error("--gpu-mem: '%s' is not a size (such as 20G or 512M)", arg);
            return -1;
        }
        break;
    case CLI_OPT_GPU_EXPERTS:
        if (strcmp(arg, "auto") == 0)
            cli_gpu.experts = -1;
        else if (cli_parse_int(arg, 0, 1 << 20, "--gpu-experts", &v) != 0)
            return -1;
        else
            cli_gpu.experts = (int32_t)v;
        break;
    case CLI_OPT_GPU_PROFILE:
        cli_gpu.profile = arg;
        break;
    default:
        return 0;
    }
    cli_gpu.given = 1;
    return 1;
}

void
cli_gpu_apply(struct kli_model_options *mo)
{
    mo->gpu = cli_gpu.mode;
    mo->gpu_mem = cli_gpu.mem;
    mo->gpu_experts = cli_gpu.experts;
    mo->gpu_profile = cli_gpu.profile;
}

void
cli_gpu_report(const struct kli_model *m)
{
    const char *st = kli_model_gpu_status(m);

    if (cli_gpu.given || strncmp(st, "CPU only", 8) != 0)
        fprintf(stderr, "kli: %s\n", st);
}

/* ==== Placement options (--cpus, --numa) =================================================== */

#define CLI_MAX_BUDGETS 16

static struct {
    const char *cpus;
    int numa;                     /* enum kli_numa */
    int plan_only;                /* kli info --topology */
    uint64_t budgets[CLI_MAX_BUDGETS];   /* --mem-budget */
    int n_budgets;
} cli_place = {NULL, KLI_NUMA_NONE, 0, {0}, 0};

/* --mem-budget SIZE[,SIZE...] */
static int
cli_parse_budgets(const char *arg)
{
    char buf[512], *tok, *save = NULL;

    if (strlen(arg) >= sizeof(buf)) {
        cli_error("--mem-budget: list too long");
        return -1;
    }
    snprintf(buf, sizeof(buf), "%s", arg);
    cli_place.n_budgets = 0;
    for (tok = strtok_r(buf, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
        if (cli_place.n_budgets == CLI_MAX_BUDGETS) {
            cli_error("--mem-budget: at most %d sizes", CLI_MAX_BUDGETS);
            return -1;
        }
        if (cli_parse_size(tok, &cli_place.budgets[cli_place.n_budgets]) != 0) {
            cli_error("--mem-budget: '%s' is not a size (such as 6G or 1500M)", tok);
            return -1;
        }
        cli_place.n_budgets++;
    }
    if (cli_place.n_budgets == 0) {
        cli_error("--mem-budget: no size given");
        return -1;
    }
    return 0;
}

int
cli_mem_budgets(const uint64_t **out)
{
    *out = cli_place.budgets;
    return cli_place.n_budgets;
}

void
cli_cache_report(const struct kli_model *m)
{
    struct kli_cache_stats st;

    if (kli_model_cache_stats(m, &st) != 0)
        return;
    fprintf(stderr, "kli: expert cache: %d of %d experts (%.1f MiB of a %.1f MiB budget), "
            "%llu asked, %.1f%% hits, %.1f MiB read, %.2f s waiting; next-layer guesses "
            "%.0f%% right\n", st.n_slots, st.n_experts,
            (double)st.slot_bytes * st.n_slots / 1048576.0, (double)st.budget / 1048576.0,
            (unsigned long long)st.requests,
            st.requests ? 100.0 * (double)st.hits / (double)st.requests : 0.0,
            (double)st.bytes_read / 1048576.0, st.wait_seconds,
            st.predicted ? 100.0 * (double)st.predicted_right / (double)st.predicted : 0.0);
}

int
cli_placement_option(int c, const char *arg)
{
    static const char *const names[] = {"none", "interleave", "replicate", "partition"};

    if (c == CLI_OPT_CPUS) {
        cli_place.cpus = arg;
        return 1;
    }
    if (c == CLI_OPT_MEM_BUDGET)
        return cli_parse_budgets(arg) == 0 ? 1 : -1;
    if (c != CLI_OPT_NUMA)
        return 0;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcmp(arg, names[i]) == 0) {
            cli_place.numa = (int)i;    /* the order of enum kli_numa */
            return 1;
        }
    }
    cli_error("--numa: '%s' is not interleave, replicate, partition or none", arg);
    return -1;
}

int
cli_model_option(int c, const char *arg, long *threads)
{
    int r;

    if (c == 't')
        return cli_parse_int(arg, 1, 4096, "-t", threads) == 0 ? 1 : -1;
    if ((r = cli_placement_option(c, arg)) != 0)
        return r;
    return cli_gpu_option(c, arg);
}

/* @return 1 if c is one of the n integer options `t` (parsed), 0 if not, -1 for a bad value
 * (reported). */
static int
cli_int_option(int c, const char *arg, const struct cli_int_opt *t, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (t[i].code == c)
            return cli_parse_int(arg, t[i].lo, t[i].hi, t[i].name, t[i].out) == 0 ? 1 : -1;
    }
    return 0;
}

int
cli_getopt(int argc, char **argv, const char *shortopts, const struct option *opts,
           struct cli_args *a)
{
    int c, r;

    while ((c = getopt_long(argc, argv, shortopts, opts, NULL)) != -1) {
        switch (c) {
        case 'm': a->model = optarg; break;
        case CLI_OPT_JSON:
            a->json = 1;
            if (a->gen != NULL)
                a->gen->json = 1;
            break;
        case 'h':
            fputs(a->usage, stdout);
            return CLI_ARGS_HELP;
        case '?':                   /* reported by getopt_long */
            return CLI_ARGS_BAD;
        default:
            r = cli_int_option(c, optarg, a->ints, a->n_ints);
            if (r == 0)
                r = a->gen != NULL ? cli_gen_option(c, optarg, a->gen)
                                   : cli_model_option(c, optarg, &a->threads);
            if (r <= 0)
                return r < 0 ? CLI_ARGS_BAD : c;
            break;
        }
    }
    return CLI_ARGS_END;
}

int
cli_args_exit(int c)
{
    return c == CLI_ARGS_HELP ? 0 : 2;
}

void
cli_placement_apply(struct kli_model_options *mo)
{
    mo->cpus = cli_place.cpus;
    mo->numa = cli_place.numa;
    mo->plan_only = cli_place.plan_only;
    mo->mem_budget = cli_place.n_budgets > 0 ? cli_place.budgets[0] : 0;
}

/* What kli_topology_describe writes for m (or none) and mo, in a new buffer.
 * @return it (to free), or NULL when out of memory. */
static char *
topology_text(const struct kli_model *m, const struct kli_model_options *mo)
{
    size_t need = kli_topology_describe(m, mo, NULL, 0);
    char *buf = malloc(need + 1);

    if (buf != NULL)
        kli_topology_describe(m, mo, buf, need + 1);
    return buf;
}

/* With a --numa policy, the placement lines of kli_topology_describe go to stderr: what was
 * bound and where the pages were found. */
static void
cli_placement_report(const struct kli_model *m)
{
    char *buf, *line, *save = NULL;

    if (cli_place.numa == KLI_NUMA_NONE || cli_place.plan_only)
        return;
    if ((buf = topology_text(m, NULL)) == NULL)
        return;
    for (line = strtok_r(buf, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "placement:", 10) == 0 || strncmp(line, "verified:", 9) == 0 ||
            strncmp(line, "  pages by node:", 16) == 0)
            fprintf(stderr, "kli: %s\n", line);
    }
    free(buf);
}

int
cli_open_model(const char *path, int threads, struct kli_model **m)
{
    struct kli_err err = {0};
    struct kli_model_options mo;

    kli_model_options_init(&mo);
    mo.n_threads = threads;
    cli_gpu_apply(&mo);
    cli_placement_apply(&mo);
    if (cli_place.n_budgets > 1) {
        cli_error("--mem-budget: one size here (a list is for kli bench)");
        return -1;
    }
    if (kli_model_open(m, path, &mo, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        return -1;
    }
    cli_gpu_report(*m);
    cli_placement_report(*m);
    return 0;
}

const char *
cli_model_path(const char *model, char *demo, size_t cap)
{
    if (model != NULL)
        return model;
    if (cli_demo_dir(demo, cap) != 0)
        return NULL;
    return demo;
}

int
cli_no_operands(int argc, char **argv, const char *cmd)
{
    if (optind >= argc)
        return 0;
    if (cmd != NULL)
        cli_error("%s: unexpected argument '%s'", cmd, argv[optind]);
    else
        cli_error("unexpected argument '%s'", argv[optind]);
    return -1;
}

/* Threads from -t, else KLI_NUM_THREADS, else 0 (one per physical core). */
int
cli_threads(long opt_t)
{
    const char *e = getenv("KLI_NUM_THREADS");
    long v;

    if (opt_t > 0)
        return (int)opt_t;
    if (e != NULL && *e != '\0') {
        if (cli_parse_int(e, 1, 4096, "KLI_NUM_THREADS", &v) != 0) {
            cli_error("KLI_NUM_THREADS ignored: using one thread per physical core");
            return 0;
        }
        return (int)v;
    }
    return 0;
}

/* ==== kli logits ========================================================================== */

static const char logits_usage[] =
    "usage: kli logits -m|--model DIR (--ids 1,2,3 | --ids-file FILE) [--chunk N] "
    "-o|--output OUT\n                  [--cache-type T] [-h|--help]\n"
    CLI_PLACEMENT_HELP CLI_GPU_HELP;

static int
cmd_logits(int argc, char **argv)
{
    static const struct option opts[] = {
        CLI_MODEL_LONGOPT,
        {"ids", required_argument, NULL, 'i'},
        {"ids-file", required_argument, NULL, 'f'},
        {"chunk", required_argument, NULL, 'c'},
        {"output", required_argument, NULL, 'o'},
        CLI_CACHE_TYPE_LONGOPT,
        CLI_MODEL_LONGOPTS_END,
    };
    const char *model, *ids_arg = NULL, *ids_file = NULL, *outp = NULL;
    int32_t ctype = KLI_CACHE_F32;
    long chunk = 0;
    const struct cli_int_opt ints[] = {{'c', "--chunk", 1, INT32_MAX, &chunk}};
    struct cli_args ca = {.usage = logits_usage, .ints = ints, .n_ints = 1};
    int c, rc = 1;
    struct kli_model *m = NULL;
    struct kli_session *s = NULL;
    struct kli_err err = {0};
    kli_token *ids = NULL;
    int32_t n = 0;
    float *buf = NULL;
    FILE *out = NULL;
    struct kli_outfile *of = NULL;

    while ((c = cli_getopt(argc, argv, "m:o:t:h", opts, &ca)) > 0) {
        switch (c) {
        case 'i': ids_arg = optarg; break;
        case 'f': ids_file = optarg; break;
        case 'o': outp = optarg; break;
        case CLI_OPT_CACHE_TYPE:
            if (cli_parse_cache_type(optarg, &ctype) != 0)
                return 2;
            break;
        }
    }
    if (c != CLI_ARGS_END || cli_no_operands(argc, argv, "logits") != 0)
        return cli_args_exit(c);
    if ((model = ca.model) == NULL || outp == NULL || (ids_arg == NULL) == (ids_file == NULL)) {
        cli_error("usage: kli logits -m DIR (--ids 1,2,3 | --ids-file FILE) [--chunk N] -o OUT");
        return 2;
    }
    if (strcmp(outp, "-") != 0 && (kli_output_check(outp, model, &err) != KLI_OK ||
                                    (ids_file != NULL &&
                                     kli_output_check(outp, ids_file, &err) != KLI_OK))) {
        cli_error("logits: %s", err.msg);
        return 1;
    }
    if (ids_file != NULL) {
        if (cli_read_ids(ids_file, "the limit of --ids-file", &ids, &n) != 0)
            return 1;
    } else if (cli_parse_ids(ids_arg, &ids, &n) != 0) {
        return 2;
    }
    if (n == 0) {
        cli_error("logits: no token ids given");
        free(ids);
        return 2;
    }
    if (cli_open_model(model, cli_threads(ca.threads), &m) != 0)
        goto out;
    if (cli_session_create(m, ctype, &s) != 0)
        goto out;
    int64_t V = kli_model_n_vocab(m);
    if (chunk == 0 || chunk > n)
        chunk = n;
    if ((uint64_t)chunk * (uint64_t)V > SIZE_MAX / sizeof(float) / 2 ||
        (buf = malloc((size_t)chunk * (size_t)V * sizeof(float))) == NULL) {
        cli_error("logits: cannot allocate %ld x %lld floats", chunk, (long long)V);
        goto out;
    }
    /* A new file renamed over OUT at the end (kli_outfile), so an interrupted run leaves no
     * partial file; a device or FIFO is written in place. */
    if (strcmp(outp, "-") == 0) {
        out = stdout;
    } else {
        int fd = -1;
        if (kli_outfile_open(&of, outp, KLI_OUTFILE_STREAM, &err) != KLI_OK ||
            (fd = dup(kli_outfile_fd(of))) < 0 || (out = fdopen(fd, "wb")) == NULL) {
            cli_error("%s", err.code != 0 ? err.msg : strerror(errno));
            if (fd >= 0)
                close(fd);
            goto out;
        }
    }
    for (int32_t i = 0; i < n; i += (int32_t)chunk) {
        int32_t k = n - i < chunk ? n - i : (int32_t)chunk;
        if (kli_session_eval(s, ids + i, k, buf, &err) != KLI_OK) {
            cli_error("%s", err.msg);
            goto out;
        }
        if (fwrite(buf, sizeof(float), (size_t)k * (size_t)V, out) != (size_t)k * (size_t)V) {
            cli_error("%s: write error: %s", outp, strerror(errno));
            goto out;
        }
    }
    if (out != stdout) {
        if (fclose(out) != 0) {
            out = NULL;
            cli_error("%s: write error: %s", outp, strerror(errno));
            goto out;
        }
        out = NULL;
        int crc = kli_outfile_commit(of, &err);
        of = NULL;
        if (crc != KLI_OK) {
            cli_error("%s", err.msg);
            goto out;
        }
    } else if (fflush(stdout) != 0) {
        cli_error("stdout: write error");
        goto out;
    }
    rc = 0;
out:
    if (out != NULL && out != stdout)
        fclose(out);
    kli_outfile_abort(of);
    free(buf);
    free(ids);
    kli_session_free(s);
    cli_cache_report(m);
    kli_model_close(m);
    return rc;
}

/* ==== kli info ============================================================================ */

/* kli info --topology: the machine, the workers and, with a model, where its weights would
 * go, as kli_model_open would place them with these options (nothing pinned or bound). */
static int
info_topology(const char *model, long threads)
{
    struct kli_model *m = NULL;
    struct kli_model_options mo;

    cli_place.plan_only = 1;
    if (model != NULL && cli_open_model(model, cli_threads(threads), &m) != 0)
        return 1;
    kli_model_options_init(&mo);
    mo.n_threads = cli_threads(threads);
    cli_placement_apply(&mo);
    char *buf = topology_text(m, &mo);
    if (buf == NULL) {
        cli_error("out of memory");
        kli_model_close(m);
        return 1;
    }
    fputs(buf, stdout);
    /* Without a model a bad --cpus is described in place of the workers (no "allowed:"). */
    int bad = m == NULL && strstr(buf, "\nallowed:") == NULL;
    free(buf);
    kli_model_close(m);
    return bad;
}

static const char info_usage[] =
    "usage: kli info -m|--model MODEL [--ctx N] [--tensors] [--verify] [-h|--help]\n"
    "       kli info --topology [-m|--model MODEL] [-t|--threads N] [--cpus LIST]\n"
    "                       [--numa POLICY] [--mem-budget SIZE]\n";

static int
cmd_info(int argc, char **argv)
{
    static const struct option opts[] = {
        CLI_MODEL_LONGOPT,
        {"tensors", no_argument, NULL, 'T'},
        {"verify", no_argument, NULL, 'V'},
        {"topology", no_argument, NULL, 'P'},
        {"ctx", required_argument, NULL, 'C'},
        CLI_THREADS_LONGOPT,
        CLI_HELP_LONGOPT,
        CLI_PLACEMENT_LONGOPTS,
        CLI_LONGOPTS_END,
    };
    long ctx = 0;
    const struct cli_int_opt ints[] = {{'C', "--ctx", 1, 1 << 30, &ctx}};
    struct cli_args ca = {.usage = info_usage, .ints = ints, .n_ints = 1};
    const char *model;
    int tensors = 0, verify = 0, topology = 0, c;
    struct kli_model *m = NULL;

    cli_place.plan_only = 1;    /* info never pins or binds */
    while ((c = cli_getopt(argc, argv, "m:t:h", opts, &ca)) > 0) {
        switch (c) {
        case 'T': tensors = 1; break;
        case 'V': verify = 1; break;
        case 'P': topology = 1; break;
        }
    }
    if (c != CLI_ARGS_END)
        return cli_args_exit(c);
    model = ca.model;
    if (topology && optind == argc && !tensors && !verify)
        return info_topology(model, ca.threads);
    if (model == NULL || optind < argc || topology) {
        cli_error("usage: kli info -m MODEL [--tensors] [--verify] | kli info --topology "
                  "[-m MODEL] [-t N] [--cpus LIST] [--numa POLICY]");
        return 2;
    }
    if (cli_open_model(model, 1, &m) != 0)
        return 1;
    size_t need = kli_model_describe(m, tensors, NULL, 0);
    char *buf = malloc(need + 1);
    if (buf == NULL) {
        cli_error("out of memory");
        kli_model_close(m);
        return 1;
    }
    kli_model_describe(m, tensors, buf, need + 1);
    fputs(buf, stdout);
    free(buf);
    if (ctx > 0) {   /* what --ctx N takes at each cache type (0: the model cannot) */
        printf("at --ctx %ld: ", ctx);
        for (int32_t ty = KLI_CACHE_F32; ty <= KLI_CACHE_Q8_0; ty++) {
            uint64_t b = kli_model_cache_bytes(m, ty, ctx);
            if (b > 0)
                printf("%s%s %.3f GiB", ty > 0 ? ", " : "", kli_cache_type_name(ty),
                       (double)b / 1073741824.0);
        }
        printf(" (MLA cache, history, attention scores)\n");
    }
    if (verify) {
        /* Every tensor of a .kli against its checksum (a directory has none). */
        struct kli_err err = {0};
        int rc = kli_model_verify(m, NULL, NULL, &err);
        if (rc != KLI_OK)
            cli_error("%s", err.msg);
        else
            printf("verified:     every checksum matches\n");
        kli_model_close(m);
        return rc != KLI_OK;
    }
    kli_model_close(m);
    return 0;
}

/* ==== main ================================================================================ */

static const struct cli_command commands[] = {
    {"logits", cmd_logits, "run token ids through a model and write every position's logits"},
    {"info", cmd_info, "describe a model's architecture (and its tensors), or the machine"},
    {"serve", cli_serve, "an OpenAI-compatible HTTP server (continuous batching, state reuse)"},
};

static void
usage(FILE *f)
{
    fprintf(f, "usage: kli COMMAND [OPTIONS]\n       kli --version\n\ncommands:\n");
    for (const struct cli_command *c = cli_gen_commands; c->name != NULL; c++)
        fprintf(f, "  %-12s %s\n", c->name, c->help);
    for (const struct cli_command *c = cli_tool_commands; c->name != NULL; c++)
        fprintf(f, "  %-12s %s\n", c->name, c->help);
    for (const struct cli_command *c = cli_batch_commands; c->name != NULL; c++)
        fprintf(f, "  %-12s %s\n", c->name, c->help);
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        fprintf(f, "  %-12s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\n'kli help COMMAND' or 'kli COMMAND --help' lists the options of a command; "
            "kli(1)\ndescribes them.\n");
}

/* The command called `name`, or NULL. */
static const struct cli_command *
find_command(const char *name)
{
    const struct cli_command *tables[] = {cli_gen_commands, cli_tool_commands,
                                          cli_batch_commands};

    for (size_t t = 0; t < sizeof(tables) / sizeof(tables[0]); t++) {
        for (const struct cli_command *c = tables[t]; c->name != NULL; c++) {
            if (strcmp(name, c->name) == 0)
                return c;
        }
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (strcmp(name, commands[i].name) == 0)
            return &commands[i];
    }
    return NULL;
}

#ifdef HAVE_OPENBLAS
/*
 * OpenBLAS's threads under a memory limit. The pthread build of OpenBLAS (Debian's default)
 * starts a pool of threads from its library constructor, before main: one per core, or
 * OPENBLAS_NUM_THREADS (else OMP_NUM_THREADS) of them, and each takes a 128 MiB work buffer
 * as it starts. kli never uses that pool (src/threads.c sets OpenBLAS to one thread; every
 * product runs on kli's own workers, guarded by src/ops.c). But under ulimit -v (or a
 * RLIMIT_DATA) the buffer cannot be had, and OpenBLAS retries the allocation forever: a
 * thread at 100% CPU for the whole run, and an exit that hangs joining it. Only the
 * environment read by that constructor can stop the pool (a setenv before libc's own
 * initialisation does not last), so under such a limit kli runs itself again with
 * OPENBLAS_NUM_THREADS=1, unless the user has set it. Without /proc the exec fails and kli
 * goes on as before.
 */
static void
cli_blas_env(char **argv)
{
    struct rlimit as, data;

    if (getenv("OPENBLAS_NUM_THREADS") != NULL || getrlimit(RLIMIT_AS, &as) != 0 ||
        getrlimit(RLIMIT_DATA, &data) != 0)
        return;
    if (as.rlim_cur == RLIM_INFINITY && data.rlim_cur == RLIM_INFINITY)
        return;
    if (setenv("OPENBLAS_NUM_THREADS", "1", 1) == 0)
        execv("/proc/self/exe", argv);
}
#endif

/* Under an address-space limit (ulimit -v), one malloc arena: glibc gives threads arenas of
 * their own, each reserving 64 MiB of address space, so that a few threads (kli serve's
 * connections, a batch's workers) take a few hundred MiB of the limit without using it, and
 * allocations fail with most of the limit free. */
static void
cli_arena_limit(void)
{
#ifdef M_ARENA_MAX
    struct rlimit as;
    if (getrlimit(RLIMIT_AS, &as) == 0 && as.rlim_cur != RLIM_INFINITY)
        mallopt(M_ARENA_MAX, 1);
#endif
}

int
main(int argc, char **argv)
{
    const struct cli_command *cmd;
    char prog[64], help[] = "--help";

#ifdef HAVE_OPENBLAS
    cli_blas_env(argv);
#endif
    cli_arena_limit();
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
        printf("kli %s (kernels: %s)\n", kli_version(), kli_simd_variant());
        return 0;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        (strcmp(argv[1], "help") == 0 && argc == 2)) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "help") == 0) {     /* kli help COMMAND: that command's --help */
        if (argc > 3 || (cmd = find_command(argv[2])) == NULL) {
            if (argc > 3)
                cli_error("help: one command at a time");
            else
                cli_error("help: no command '%s'", argv[2]);
            usage(stderr);
            return 2;
        }
        snprintf(prog, sizeof(prog), "kli %s", cmd->name);
        char *hv[] = {prog, help, NULL};
        optind = 1;
        return cmd->run(2, hv);
    }
    if ((cmd = find_command(argv[1])) == NULL) {
        cli_error("unknown command '%s'", argv[1]);
        usage(stderr);
        return 2;
    }
    /* getopt names the program in its messages: "kli run: unrecognized option ..." */
    snprintf(prog, sizeof(prog), "kli %s", cmd->name);
    argv[1] = prog;
    optind = 1;
    int rc = cmd->run(argc - 1, argv + 1);
    if (rc == 2)
        fprintf(stderr, "kli: try 'kli %s --help'\n", cmd->name);
    return rc;
}
