/*
 * cli_perplexity.c - kli perplexity: how well a model predicts a text file, and how far a
 * model's distributions moved from a reference run's (KL divergence, top-1 agreement).
 *
 * The file is tokenized exactly as `kli tokenize` does (special-token strings are plain
 * text; no BOS unless --bos). Token i (i >= 1) is scored given tokens 0..i-1. A file longer
 * than --ctx is scored in windows of ctx tokens, each a fresh session: window w starts at
 * w*(ctx - ctx/2); the first scores all of its tokens after its first, every later one
 * only its tokens past the first ctx/2 (so each token is scored once, with at least ctx/2
 * tokens of context).
 *
 * --kld-base FILE: without FILE, the run writes every scored position's log-probabilities
 * there (float32, with the token ids and ctx, so that a later run can check it scores the
 * same thing); with FILE, it compares its own distributions with the stored ones.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kli.h"
#include "cli.h"
#include "util.h"

#define PPL_CHUNK 64
static const char kld_magic[8] = {'K', 'L', 'I', 'K', 'L', 'D', '1', '\0'};

struct kld_file {
    FILE *f;
    struct kli_outfile *of;     /* writing: the new file, renamed over the path at the end */
    int writing;
    uint32_t vocab;
    uint64_t n_scored;
};

struct ppl_stats {
    double nll_sum, nll_sq;       /* of -log q(target) */
    double base_nll_sum;
    uint64_t n;
    double *kld;                  /* per scored position, with a base */
    double dp_sum, dp_sq;         /* q(target) - p(target) */
    uint64_t top1_same;
    double kld_sum, kld_sq;
};

/* log-softmax of one row, in double, into lp[V]. */
static void
log_softmax(const float *z, int32_t V, double *lp)
{
    double mx = z[0], s = 0;

    for (int32_t j = 1; j < V; j++)
        if (z[j] > mx)
            mx = z[j];
    for (int32_t j = 0; j < V; j++)
        s += exp((double)z[j] - mx);
    double lse = mx + log(s);
    for (int32_t j = 0; j < V; j++)
        lp[j] = (double)z[j] - lse;
}

static int32_t
argmax_d(const double *v, int32_t n)
{
    int32_t b = 0;

    for (int32_t j = 1; j < n; j++)
        if (v[j] > v[b])
            b = j;
    return b;
}

/* Open the base file: read and check its header, or create it and write one. */
static int
kld_open(struct kld_file *k, const char *path, int32_t V, const kli_token *ids, int32_t n,
         int32_t ctx, int bos)
{
    struct kli_err err = {0};
    uint32_t hdr[4];
    int fd;

    memset(k, 0, sizeof(*k));
    k->vocab = (uint32_t)V;
    /* An existing base must be a regular file: a FIFO would block the open (kli_file_open). */
    if ((fd = kli_file_open(path, NULL, &err)) >= 0) {
        if ((k->f = fdopen(fd, "rb")) == NULL) {
            close(fd);
            cli_error("%s: %s", path, strerror(errno));
            return -1;
        }
        char magic[8];
        if (fread(magic, 1, 8, k->f) != 8 || memcmp(magic, kld_magic, 8) != 0 ||
            fread(hdr, sizeof(uint32_t), 4, k->f) != 4) {
            cli_error("%s: not a kli perplexity base file", path);
            return -1;
        }
        if (hdr[0] != (uint32_t)V || hdr[1] != (uint32_t)n || hdr[2] != (uint32_t)ctx ||
            hdr[3] != (uint32_t)bos) {
            cli_error("%s: written for vocab %u, %u tokens, ctx %u%s; this run has vocab %d, "
                      "%d tokens, ctx %d%s", path, hdr[0], hdr[1], hdr[2],
                      hdr[3] ? ", --bos" : "", V, n, ctx, bos ? ", --bos" : "");
            return -1;
        }
        for (int32_t i = 0; i < n; i++) {
            int32_t id;
            if (fread(&id, sizeof(id), 1, k->f) != 1 || id != ids[i]) {
                cli_error("%s: written for other tokens (a different file or tokenizer)", path);
                return -1;
            }
        }
        return 0;
    }
    if (errno != ENOENT) {
        cli_error("%s", err.msg);
        return -1;
    }
    /* A new base is written as every kli output is (kli_outfile): into a new file renamed
     * over the path once complete, so an interrupted run leaves no partial base behind, and
     * under a lock, so two runs cannot write one base at once. */
    err = (struct kli_err){0};
    k->writing = 1;
    if (kli_outfile_open(&k->of, path, 0, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        return -1;
    }
    if ((fd = dup(kli_outfile_fd(k->of))) < 0 || (k->f = fdopen(fd, "wb")) == NULL) {
        if (fd >= 0)
            close(fd);
        cli_error("%s: %s", path, strerror(errno));
        return -1;
    }
    hdr[0] = (uint32_t)V;
    hdr[1] = (uint32_t)n;
    hdr[2] = (uint32_t)ctx;
    hdr[3] = (uint32_t)bos;
    if (fwrite(kld_magic, 1, 8, k->f) != 8 || fwrite(hdr, sizeof(uint32_t), 4, k->f) != 4 ||
        fwrite(ids, sizeof(kli_token), (size_t)n, k->f) != (size_t)n) {
        cli_error("%s: write error: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* Score one position: lp = this model's log-probabilities, target = the next token. */
static int
score(struct ppl_stats *st, struct kld_file *k, const double *lp, int32_t V, kli_token target,
      float *f32, double *base)
{
    double nll = -lp[target];

    st->nll_sum += nll;
    st->nll_sq += nll * nll;
    if (k->f != NULL && k->writing) {
        for (int32_t j = 0; j < V; j++)
            f32[j] = (float)lp[j];
        if (fwrite(f32, sizeof(float), (size_t)V, k->f) != (size_t)V) {
            cli_error("--kld-base: write error: %s", strerror(errno));
            return -1;
        }
    } else if (k->f != NULL) {
        if (fread(f32, sizeof(float), (size_t)V, k->f) != (size_t)V) {
            cli_error("--kld-base: the file ends early");
            return -1;
        }
        double kl = 0;
        for (int32_t j = 0; j < V; j++) {
            base[j] = f32[j];
            kl += exp(base[j]) * (base[j] - lp[j]);
        }
        if (kl < 0)
            kl = 0;     /* rounding of the stored float32 values */
        st->kld[st->n] = kl;
        st->kld_sum += kl;
        st->kld_sq += kl * kl;
        st->base_nll_sum += -base[target];
        double dp = exp(lp[target]) - exp(base[target]);
        st->dp_sum += dp;
        st->dp_sq += dp * dp;
        st->top1_same += argmax_d(base, V) == argmax_d(lp, V);
    }
    st->n++;
    return 0;
}

/* Standard error of a mean from a sum and a sum of squares over n samples. */
static double
sem(double sum, double sq, uint64_t n)
{
    if (n < 2)
        return 0;
    double m = sum / (double)n, var = (sq - (double)n * m * m) / (double)(n - 1);
    return var > 0 ? sqrt(var / (double)n) : 0;
}

int64_t
cli_text_tokens(const struct kli_model *m, const char *text, size_t len, int bos,
                const char *cmd, kli_token **out)
{
    const struct kli_tokenizer *tok = kli_model_tokenizer(m);
    struct kli_err err = {0};
    kli_token *ids;
    int64_t n;

    *out = NULL;
    if (tok == NULL) {
        cli_error("%s: the model has no tokenizer", cmd);
        return -1;
    }
    if (len > INT32_MAX - 2 || (ids = malloc((len + 2) * sizeof(kli_token))) == NULL) {
        cli_error("%s: the file is too large", cmd);
        return -1;
    }
    if (bos)
        ids[0] = kli_model_bos(m);
    n = kli_tokenize(tok, text, len, 0, ids + bos, (int64_t)len + 1, &err);
    if (n < 0) {
        cli_error("%s", err.msg);
        free(ids);
        return -1;
    }
    *out = ids;
    return n + bos;
}

static const char ppl_usage[] =
    "usage: kli perplexity [-m|--model MODEL] -f|--file FILE [--ctx N] [--bos] [--json]\n"
    "                      [--kld-base FILE] [--cache-type T] [-h|--help]\n"
    CLI_PLACEMENT_HELP CLI_GPU_HELP;

int
cli_perplexity(int argc, char **argv)
{
    static const struct option opts[] = {
        CLI_MODEL_LONGOPT,
        CLI_TEXT_LONGOPTS,
        CLI_JSON_LONGOPT,
        {"kld-base", required_argument, NULL, 'K'},
        CLI_CACHE_TYPE_LONGOPT,
        CLI_MODEL_LONGOPTS_END,
    };
    int32_t ctype = KLI_CACHE_F32;
    const char *model, *file = NULL, *kpath = NULL;
    long ctx = 4096;
    const struct cli_int_opt ints[] = {{'c', "--ctx", 2, INT32_MAX, &ctx}};
    struct cli_args ca = {.usage = ppl_usage, .ints = ints, .n_ints = 1};
    int c, rc = 1, bos = 0;
    struct kli_model *m = NULL;
    struct kli_session *s = NULL;
    struct kli_err err = {0};
    struct kld_file k = {0};
    struct ppl_stats st = {0};
    kli_token *ids = NULL;
    char *text = NULL;
    float *buf = NULL, *f32 = NULL;
    double *lp = NULL, *base = NULL;
    size_t len;
    int64_t n = 0;

    while ((c = cli_getopt(argc, argv, "m:f:t:h", opts, &ca)) > 0) {
        switch (c) {
        case 'f': file = optarg; break;
        case 'B': bos = 1; break;
        case 'K': kpath = optarg; break;
        case CLI_OPT_CACHE_TYPE:
            if (cli_parse_cache_type(optarg, &ctype) != 0)
                return 2;
            break;
        }
    }
    if (c != CLI_ARGS_END || cli_no_operands(argc, argv, "perplexity") != 0)
        return cli_args_exit(c);
    if (file == NULL) {
        cli_error("perplexity: -f FILE is required");
        fputs(ppl_usage, stderr);
        return 2;
    }
    if ((text = cli_read_file(file, CLI_TEXT_MAX, 0, "the limit of perplexity", &len)) == NULL)
        return 1;
    if ((model = cli_model_path(ca.model, ca.demo, sizeof(ca.demo))) == NULL)
        goto out;
    if (cli_open_model(model, cli_threads(ca.threads), &m) != 0)
        goto out;
    if ((n = cli_text_tokens(m, text, len, bos, "perplexity", &ids)) < 0)
        goto out;
    if (n < 2) {
        cli_error("perplexity: %s has %lld token(s); at least 2 are needed", file, (long long)n);
        goto out;
    }
    int32_t V = kli_model_n_vocab(m);
    buf = malloc((size_t)PPL_CHUNK * (size_t)V * sizeof(float));
    f32 = malloc((size_t)V * sizeof(float));
    lp = malloc((size_t)V * sizeof(double));
    base = malloc((size_t)V * sizeof(double));
    if (buf == NULL || f32 == NULL || lp == NULL || base == NULL) {
        cli_error("out of memory");
        goto out;
    }
    if (kpath != NULL) {
        if (kld_open(&k, kpath, V, ids, (int32_t)n, (int32_t)ctx, bos) != 0)
            goto out;
        if (!k.writing && (st.kld = malloc((size_t)n * sizeof(double))) == NULL) {
            cli_error("out of memory");
            goto out;
        }
    }
    if (cli_session_create(m, ctype, &s) != 0)
        goto out;

    int64_t keep = ctx / 2, stride = ctx - keep, windows = 0;
    for (int64_t start = 0;; start += stride) {
        int64_t end = start + ctx < n ? start + ctx : n;
        int64_t first = start == 0 ? 1 : start + keep;    /* first scored position */
        kli_session_reset(s);
        windows++;
        for (int64_t p = start; p < end - 1; p += PPL_CHUNK) {
            /* evaluate tokens p .. q-1; row r predicts token p+r+1 */
            int64_t q = p + PPL_CHUNK < end - 1 ? p + PPL_CHUNK : end - 1;
            if (kli_session_eval(s, ids + p, (int32_t)(q - p), buf, &err) != KLI_OK) {
                cli_error("%s", err.msg);
                goto out;
            }
            for (int64_t r = 0; r < q - p; r++) {
                if (p + r + 1 < first)
                    continue;
                log_softmax(buf + (size_t)r * (size_t)V, V, lp);
                if (score(&st, &k, lp, V, ids[p + r + 1], f32, base) != 0)
                    goto out;
            }
        }
        if (end == n)
            break;
    }

    double nll = st.nll_sum / (double)st.n, nll_err = sem(st.nll_sum, st.nll_sq, st.n);
    double ppl = exp(nll);
    int cmp = k.f != NULL && !k.writing;
    double kl_mean = 0, kl_err = 0, kl_med = 0, kl_p99 = 0, base_ppl = 0, top1 = 0, dp = 0,
           dp_err = 0;
    if (cmp) {
        kl_mean = st.kld_sum / (double)st.n;
        kl_err = sem(st.kld_sum, st.kld_sq, st.n);
        kl_med = util_median(st.kld, (size_t)st.n);
        kl_p99 = st.kld[(size_t)floor(0.99 * (double)(st.n - 1))];
        base_ppl = exp(st.base_nll_sum / (double)st.n);
        top1 = (double)st.top1_same / (double)st.n;
        dp = st.dp_sum / (double)st.n;
        dp_err = sem(st.dp_sum, st.dp_sq, st.n);
    }
    if (k.f != NULL) {
        int bad = k.writing ? fclose(k.f) != 0 : (fclose(k.f), 0);
        k.f = NULL;
        if (bad) {
            cli_error("%s: write error: %s", kpath, strerror(errno));
            goto out;
        }
    }
    if (k.of != NULL) {
        int crc = kli_outfile_commit(k.of, &err);
        k.of = NULL;
        if (crc != KLI_OK) {
            cli_error("%s", err.msg);
            goto out;
        }
    }
    if (ca.json) {
        printf("{\"perplexity\": %.6f, \"perplexity_err\": %.6f, \"tokens\": %llu, "
               "\"nll_mean\": %.6f, \"nll_err\": %.6f, \"file_tokens\": %lld, \"ctx\": %ld, "
               "\"windows\": %lld, \"bos\": %s",
               ppl, ppl * nll_err, (unsigned long long)st.n, nll, nll_err, (long long)n, ctx,
               (long long)windows, bos ? "true" : "false");
        if (cmp)
            printf(", \"base_perplexity\": %.6f, \"ppl_ratio\": %.6f, \"kld_mean\": %.6g, "
                   "\"kld_err\": %.3g, \"kld_median\": %.6g, \"kld_p99\": %.6g, "
                   "\"top1_agreement\": %.6f, \"delta_p_mean\": %.6g, \"delta_p_err\": %.3g",
                   base_ppl, ppl / base_ppl, kl_mean, kl_err, kl_med, kl_p99, top1, dp,
                   dp_err);
        printf("}\n");
    } else {
        printf("tokens:      %llu scored of %lld (ctx %ld, %lld window%s%s)\n",
               (unsigned long long)st.n, (long long)n, ctx, (long long)windows,
               windows == 1 ? "" : "s", bos ? ", BOS added" : "");
        printf("nll:         %.4f +/- %.4f nats/token\n", nll, nll_err);
        printf("perplexity:  %.4f +/- %.4f\n", ppl, ppl * nll_err);
        if (k.writing)
            printf("kld base:    written to %s\n", kpath);
        if (cmp) {
            printf("base ppl:    %.4f (ratio %.5f)\n", base_ppl, ppl / base_ppl);
            printf("KLD:         mean %.6f +/- %.6f, median %.6f, p99 %.6f\n", kl_mean, kl_err,
                   kl_med, kl_p99);
            printf("top-1:       %.2f%% agree with the base\n", 100 * top1);
            printf("delta p:     %+.5f +/- %.5f (correct token's probability)\n", dp, dp_err);
        }
    }
    rc = fflush(stdout) == 0 ? 0 : 1;
out:
    if (k.f != NULL)
        fclose(k.f);
    kli_outfile_abort(k.of);   /* a base not committed: its new file goes, the path is kept */
    free(st.kld);
    free(base);
    free(lp);
    free(f32);
    free(buf);
    free(ids);
    free(text);
    kli_session_free(s);
    kli_model_close(m);
    cli_demo_remove(ca.demo);
    return rc;
}
