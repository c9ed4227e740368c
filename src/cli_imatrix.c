/*
 * cli_imatrix.c - kli imatrix: the mean squared activation per input channel of every weight
 * matrix of a model over a text (kli-imatrix(5)), for kli quantize --imatrix.
 *
 * The text is tokenized as kli perplexity does it (cli_text_tokens) and run in chunks of --ctx
 * tokens, each a fresh session, fed PPL-sized pieces at a time with every position's logits
 * computed (so that lm_head sees every row). Chunks do not overlap: each token counts once.
 * Collection runs on the CPU (the GPU stays off). The file is written at the end, every
 * --save-every chunks, and when the first Ctrl-C stops the run between pieces.
 */
#include "config.h"

#include <getopt.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kli.h"
#include "cli.h"
#include "util.h"

#define IMAT_PIECE 64          /* tokens per kli_session_eval, as perplexity feeds them */

static volatile sig_atomic_t imat_stop;

static void
imat_on_sigint(int sig)
{
    (void)sig;
    imat_stop = 1;
}

struct imat_run {
    const char *out, *file;
    const kli_token *ids;
    int64_t n, ctx, chunks, done, tokens;
    uint64_t text_hash;
    struct kli_imatrix *im;
};

/* Writes what the run has collected so far. @return 0, or -1 after reporting. */
static int
imat_save(const struct imat_run *r)
{
    char hash[32], tokens[32], chunks[32], ctx[32];
    struct kli_err err = {0};

    snprintf(hash, sizeof(hash), "%016llx", (unsigned long long)r->text_hash);
    snprintf(tokens, sizeof(tokens), "%lld", (long long)r->tokens);
    snprintf(chunks, sizeof(chunks), "%lld", (long long)r->done);
    snprintf(ctx, sizeof(ctx), "%lld", (long long)r->ctx);
    const char *kv[] = {"kli.text_fnv1a", hash, "kli.tokens", tokens, "kli.chunks", chunks,
                        "kli.chunk_tokens", ctx};
    if (kli_imatrix_save(r->im, r->out, kv, 4, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        return -1;
    }
    return 0;
}

/* Runs the chunks, saving every `every` of them. @return 0, 1 when Ctrl-C stopped it (what
 * was done saved), or -1 after reporting. */
static int
imat_collect(struct imat_run *r, struct kli_session *s, float *logits, long every)
{
    struct kli_err err = {0};
    double t0 = util_now_s();
    int tty = isatty(STDERR_FILENO);

    for (int64_t c = 0; c < r->chunks; c++) {
        const kli_token *ids = r->ids + c * r->ctx;
        kli_session_reset(s);
        for (int64_t p = 0; p < r->ctx; p += IMAT_PIECE) {
            int32_t k = (int32_t)(r->ctx - p < IMAT_PIECE ? r->ctx - p : IMAT_PIECE);
            if (kli_session_eval(s, ids + p, k, logits, &err) != KLI_OK) {
                cli_error("%s", err.msg);
                return -1;
            }
            r->tokens += k;   /* the sums hold every piece run, a chunk's first ones too */
            if (imat_stop) {
                fprintf(stderr, "%skli: interrupted in chunk %lld: saving what %lld tokens "
                        "gave\n", tty ? "\n" : "", (long long)c + 1, (long long)r->tokens);
                return imat_save(r) == 0 ? 1 : -1;
            }
        }
        r->done++;
        double el = util_now_s() - t0, eta = el / (double)r->done * (double)(r->chunks - r->done);
        fprintf(stderr, "%simatrix: chunk %lld/%lld, %lld tokens, %.1f s, ETA %.0f s%s",
                tty ? "\r" : "", (long long)r->done, (long long)r->chunks,
                (long long)r->tokens, el, eta, tty ? "" : "\n");
        if (every > 0 && r->done % every == 0 && r->done < r->chunks && imat_save(r) != 0)
            return -1;
    }
    if (tty)
        fputc('\n', stderr);
    return imat_save(r);
}

static const char imat_usage[] =
    "usage: kli imatrix [-m|--model MODEL] -f|--file TEXT -o|--output FILE [--ctx N]\n"
    "                   [--chunks N] [--save-every N] [--bos] [--covariance] [-h|--help]\n"
    CLI_PLACEMENT_HELP;

int
cli_imatrix(int argc, char **argv)
{
    static const struct option opts[] = {
        CLI_MODEL_LONGOPT,
        CLI_TEXT_LONGOPTS,
        {"output", required_argument, NULL, 'o'},
        {"chunks", required_argument, NULL, 'C'},
        {"save-every", required_argument, NULL, 'S'},
        {"covariance", no_argument, NULL, 'V'},
        CLI_THREADS_LONGOPT,
        CLI_HELP_LONGOPT,
        CLI_PLACEMENT_LONGOPTS,
        CLI_LONGOPTS_END,
    };
    struct imat_run r = {0};
    const char *model;
    long ctx = 512, chunks = 0, every = 10;
    const struct cli_int_opt ints[] = {
        {'c', "--ctx", 2, INT32_MAX, &ctx},
        {'C', "--chunks", 1, INT32_MAX, &chunks},
        {'S', "--save-every", 0, INT32_MAX, &every},
    };
    struct cli_args ca = {.usage = imat_usage, .ints = ints, .n_ints = 3};
    int c, rc = 1, bos = 0, cov = 0;
    struct kli_model *m = NULL;
    struct kli_session *s = NULL;
    struct kli_err err = {0};
    struct sigaction sa, old;
    kli_token *ids = NULL;
    char *text = NULL;
    float *logits = NULL;
    size_t len;

    while ((c = cli_getopt(argc, argv, "m:f:o:t:h", opts, &ca)) > 0) {
        switch (c) {
        case 'f': r.file = optarg; break;
        case 'o': r.out = optarg; break;
        case 'B': bos = 1; break;
        case 'V': cov = 1; break;
        }
    }
    if (c != CLI_ARGS_END)
        return cli_args_exit(c);
    if (cli_no_operands(argc, argv, "imatrix") != 0)
        return 2;
    if (r.file == NULL || r.out == NULL) {
        cli_error("imatrix: -f TEXT and -o FILE are required");
        fputs(imat_usage, stderr);
        return 2;
    }
    if ((model = cli_model_path(ca.model, ca.demo, sizeof(ca.demo))) == NULL)
        goto out;
    if (kli_output_check(r.out, model, &err) != KLI_OK ||
        (strcmp(r.file, "-") != 0 && kli_output_check(r.out, r.file, &err) != KLI_OK)) {
        cli_error("%s", err.msg);
        goto out;
    }
    if ((text = cli_read_file(r.file, CLI_TEXT_MAX, 0, "the limit of imatrix", &len)) == NULL)
        goto out;
    /* collection runs on the CPU: no GPU whatever the environment asks */
    if (cli_gpu_option(CLI_OPT_GPU, "off") != 1 ||
        cli_open_model(model, cli_threads(ca.threads), &m) != 0)
        goto out;
    if ((r.n = cli_text_tokens(m, text, len, bos, "imatrix", &ids)) < 0)
        goto out;
    r.ids = ids;
    r.ctx = ctx;
    r.chunks = r.n / ctx;
    if (chunks > 0 && chunks < r.chunks)
        r.chunks = chunks;
    if (r.chunks == 0) {
        cli_error("imatrix: %s has %lld token(s), fewer than one chunk of --ctx %ld", r.file,
                  (long long)r.n, ctx);
        goto out;
    }
    r.text_hash = util_fnv1a(UTIL_FNV_BASIS, ids, (size_t)r.n * sizeof(kli_token));
    logits = malloc((size_t)IMAT_PIECE * (size_t)kli_model_n_vocab(m) * sizeof(float));
    if (logits == NULL) {
        cli_error("out of memory");
        goto out;
    }
    struct kli_session_options so;
    kli_session_options_init(&so);
    so.ctx_max = (int32_t)ctx;
    if (kli_session_create(&s, m, &so, &err) != KLI_OK ||
        kli_imatrix_create(&r.im, m, &err) != KLI_OK ||
        (cov && kli_imatrix_covariance(r.im, &err) != KLI_OK) ||
        kli_session_set_imatrix(s, r.im, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        goto out;
    }
    fprintf(stderr, "imatrix: %lld tokens, %lld chunk(s) of %ld\n", (long long)r.n,
            (long long)r.chunks, ctx);
    /* The first Ctrl-C saves what is done and stops; a second one kills. */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = imat_on_sigint;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old);
    int cr = imat_collect(&r, s, logits, every);
    sigaction(SIGINT, &old, NULL);
    if (cr == 0)
        fprintf(stderr, "imatrix: wrote %s (%lld tokens)\n", r.out, (long long)r.tokens);
    rc = cr == 0 ? 0 : cr > 0 ? 130 : 1;
out:
    kli_session_free(s);
    kli_imatrix_free(r.im);
    free(logits);
    free(ids);
    free(text);
    kli_model_close(m);
    cli_demo_remove(ca.demo);
    return rc;
}
