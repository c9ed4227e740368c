/*
 * cli.c - the kli command: main(), the command table, and the commands that work on ids
 * and models (logits, info). Uses only the public kli.h.
 *
 * Exit status: 0 success, 1 runtime error (bad model, I/O), 2 usage error.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

/* Reads a whole file (or stdin for "-") into a NUL-terminated buffer. */
char *
cli_read_file(const char *path, size_t *len)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    char *buf = NULL;
    size_t n = 0, cap = 0;

    if (f == NULL) {
        cli_error("%s: %s", path, strerror(errno));
        return NULL;
    }
    for (;;) {
        if (cap - n < 65536) {
            size_t nc = cap ? cap * 2 : 65536;
            char *nb = realloc(buf, nc + 1);
            if (nb == NULL) {
                cli_error("%s: out of memory", path);
                free(buf);
                buf = NULL;
                goto out;
            }
            buf = nb;
            cap = nc;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) {
            if (ferror(f)) {
                cli_error("%s: read error", path);
                free(buf);
                buf = NULL;
                goto out;
            }
            break;
        }
    }
    buf[n] = '\0';
    *len = n;
out:
    if (f != stdin)
        fclose(f);
    return buf;
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
cli_open_model(const char *path, int threads, struct kli_model **m)
{
    struct kli_err err = {0};
    struct kli_model_options mo;

    kli_model_options_init(&mo);
    mo.n_threads = threads;
    if (kli_model_open(m, path, &mo, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        return -1;
    }
    return 0;
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

static int
cmd_logits(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, NULL, 'm'},
        {"ids", required_argument, NULL, 'i'},
        {"ids-file", required_argument, NULL, 'f'},
        {"chunk", required_argument, NULL, 'c'},
        {"output", required_argument, NULL, 'o'},
        {"threads", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *model = NULL, *ids_arg = NULL, *ids_file = NULL, *outp = NULL;
    long chunk = 0, threads = 0;
    int c, rc = 1;
    struct kli_model *m = NULL;
    struct kli_session *s = NULL;
    struct kli_err err = {0};
    kli_token *ids = NULL;
    int32_t n = 0;
    float *buf = NULL;
    FILE *out = NULL;
    char tmp[4096] = "";

    while ((c = getopt_long(argc, argv, "m:o:t:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 'i': ids_arg = optarg; break;
        case 'f': ids_file = optarg; break;
        case 'o': outp = optarg; break;
        case 'c':
            if (cli_parse_int(optarg, 1, INT32_MAX, "--chunk", &chunk) != 0)
                return 2;
            break;
        case 't':
            if (cli_parse_int(optarg, 1, 4096, "-t", &threads) != 0)
                return 2;
            break;
        case 'h':
            printf("usage: kli logits -m DIR (--ids 1,2,3 | --ids-file FILE) [--chunk N] "
                   "-o OUT\n");
            return 0;
        default:
            return 2;
        }
    }
    if (optind < argc) {
        cli_error("logits: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (model == NULL || outp == NULL || (ids_arg == NULL) == (ids_file == NULL)) {
        cli_error("usage: kli logits -m DIR (--ids 1,2,3 | --ids-file FILE) [--chunk N] -o OUT");
        return 2;
    }
    if (ids_file != NULL) {
        size_t len;
        char *text = cli_read_file(ids_file, &len);
        if (text == NULL)
            return 1;
        if (strlen(text) != len) {
            cli_error("%s: contains a NUL byte", ids_file);
            free(text);
            return 1;
        }
        int r = cli_parse_ids(text, &ids, &n);
        free(text);
        if (r != 0)
            return 1;
    } else if (cli_parse_ids(ids_arg, &ids, &n) != 0) {
        return 2;
    }
    if (n == 0) {
        cli_error("logits: no token ids given");
        free(ids);
        return 2;
    }
    if (cli_open_model(model, cli_threads(threads), &m) != 0)
        goto out;
    if (kli_session_create(&s, m, NULL, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        goto out;
    }
    int64_t V = kli_model_n_vocab(m);
    if (chunk == 0 || chunk > n)
        chunk = n;
    if ((uint64_t)chunk * (uint64_t)V > SIZE_MAX / sizeof(float) / 2 ||
        (buf = malloc((size_t)chunk * (size_t)V * sizeof(float))) == NULL) {
        cli_error("logits: cannot allocate %ld x %lld floats", chunk, (long long)V);
        goto out;
    }
    /* Write to a temporary file and rename, so an interrupted run leaves no partial file. */
    if (strcmp(outp, "-") == 0) {
        out = stdout;
    } else {
        if (snprintf(tmp, sizeof(tmp), "%s.tmp%ld", outp, (long)getpid()) >= (int)sizeof(tmp)) {
            cli_error("%s: path too long", outp);
            goto out;
        }
        if ((out = fopen(tmp, "wb")) == NULL) {
            cli_error("%s: %s", tmp, strerror(errno));
            tmp[0] = '\0';
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
        if (rename(tmp, outp) != 0) {
            cli_error("%s: %s", outp, strerror(errno));
            goto out;
        }
        tmp[0] = '\0';
    } else if (fflush(stdout) != 0) {
        cli_error("stdout: write error");
        goto out;
    }
    rc = 0;
out:
    if (out != NULL && out != stdout)
        fclose(out);
    if (tmp[0] != '\0')
        unlink(tmp);
    free(buf);
    free(ids);
    kli_session_free(s);
    kli_model_close(m);
    return rc;
}

/* ==== kli info ============================================================================ */

static int
cmd_info(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, NULL, 'm'},
        {"tensors", no_argument, NULL, 'T'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *model = NULL;
    int tensors = 0, c;
    struct kli_model *m = NULL;

    while ((c = getopt_long(argc, argv, "m:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 'T': tensors = 1; break;
        case 'h':
            printf("usage: kli info -m DIR [--tensors]\n");
            return 0;
        default:
            return 2;
        }
    }
    if (model == NULL || optind < argc) {
        cli_error("usage: kli info -m DIR [--tensors]");
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
    kli_model_close(m);
    return 0;
}

/* ==== main ================================================================================ */

static const struct cli_command commands[] = {
    {"logits", cmd_logits, "run token ids through a model and write every position's logits"},
    {"info", cmd_info, "describe a model's architecture (and its tensors)"},
};

static void
usage(FILE *f)
{
    fprintf(f, "usage: kli COMMAND [OPTIONS]\n       kli --version\n\ncommands:\n");
    for (const struct cli_command *c = cli_gen_commands; c->name != NULL; c++)
        fprintf(f, "  %-12s %s\n", c->name, c->help);
    for (const struct cli_command *c = cli_tool_commands; c->name != NULL; c++)
        fprintf(f, "  %-12s %s\n", c->name, c->help);
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        fprintf(f, "  %-12s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\nSee kli(1) for the options of each command.\n");
}

int
main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
        printf("kli %s (kernels: %s)\n", kli_version(), kli_simd_variant());
        return 0;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    for (const struct cli_command *c = cli_gen_commands; c->name != NULL; c++) {
        if (strcmp(argv[1], c->name) == 0) {
            optind = 1;
            return c->run(argc - 1, argv + 1);
        }
    }
    for (const struct cli_command *c = cli_tool_commands; c->name != NULL; c++) {
        if (strcmp(argv[1], c->name) == 0) {
            optind = 1;
            return c->run(argc - 1, argv + 1);
        }
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (strcmp(argv[1], commands[i].name) == 0) {
            optind = 1;
            return commands[i].run(argc - 1, argv + 1);
        }
    }
    cli_error("unknown command '%s'", argv[1]);
    usage(stderr);
    return 2;
}
