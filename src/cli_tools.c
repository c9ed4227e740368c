/*
 * cli_tools.c - the tool commands of kli: synth, quantize, bench.
 */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kli.h"
#include "cli.h"
#include "util.h"

/* ==== progress ============================================================================ */

struct progress {
    double t0, last;
    int tty;
    const char *what;
};

/* A bar with ETA on a terminal; a plain line every 10 s otherwise. */
static void
on_progress(void *ud, uint64_t done, uint64_t total, const char *what)
{
    struct progress *p = ud;
    double t = util_now_s(), el = t - p->t0;
    double frac = total > 0 ? (double)done / (double)total : 1.0;
    double eta = frac > 0 ? el / frac - el : 0;

    (void)what;
    if (done < total && t - p->last < (p->tty ? 0.2 : 10.0))
        return;
    p->last = t;
    if (p->tty) {
        int w = 30, fill = (int)(frac * w);
        fprintf(stderr, "\r%s [%.*s%*s] %5.1f%% %6.0f MB  ETA %4.0f s ", p->what, fill,
                "##############################", w - fill, "", 100 * frac,
                (double)done / 1e6, eta);
        if (done >= total)
            fputc('\n', stderr);
    } else {
        fprintf(stderr, "%s: %.1f%% (%.0f of %.0f MB), ETA %.0f s\n", p->what, 100 * frac,
                (double)done / 1e6, (double)total / 1e6, eta);
    }
}

/* ==== kli synth =========================================================================== */

static const char synth_usage[] =
    "usage: kli synth -o|--output DIR [--layers N] [--experts E] [--type bf16|q8_0|q4]\n"
    "                 [--seed S] [--force] [-h|--help]\n";

static int
cmd_synth(int argc, char **argv)
{
    static const struct option opts[] = {
        {"output", required_argument, NULL, 'o'},
        {"layers", required_argument, NULL, 'L'},
        {"experts", required_argument, NULL, 'E'},
        {"type", required_argument, NULL, 'T'},
        {"seed", required_argument, NULL, 'S'},
        {"force", no_argument, NULL, 'F'},
        CLI_HELP_LONGOPT,
        CLI_LONGOPTS_END,
    };
    struct kli_synth_options o;
    struct kli_err err = {0};
    struct progress p = {util_now_s(), 0, isatty(STDERR_FILENO), "synth"};
    const char *out = NULL;
    long layers, experts, seed = -1;   /* -1: the default seed */
    const struct cli_int_opt ints[] = {
        {'L', "--layers", 1, 1024, &layers},
        {'E', "--experts", 1, 4096, &experts},
        {'S', "--seed", 0, 2147483647L, &seed},
    };
    struct cli_args ca = {.usage = synth_usage, .ints = ints, .n_ints = 3};
    int c;

    kli_synth_options_init(&o);
    layers = o.n_layers;
    experts = o.n_experts;
    while ((c = cli_getopt(argc, argv, "o:h", opts, &ca)) > 0) {
        switch (c) {
        case 'o': out = optarg; break;
        case 'T': o.type = optarg; break;
        case 'F': o.force = 1; break;
        }
    }
    if (c != CLI_ARGS_END)
        return cli_args_exit(c);
    o.n_layers = (int32_t)layers;
    o.n_experts = (int32_t)experts;
    if (seed >= 0)
        o.seed = (uint64_t)seed;
    if (out == NULL || optind < argc) {
        cli_error("usage: kli synth -o DIR [--layers N] [--experts E] [--type T] [--seed S]");
        return 2;
    }
    o.progress = on_progress;
    o.ud = &p;
    if (kli_synth(out, &o, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        return 1;
    }
    fprintf(stderr, "synth: wrote %s in %.1f s\n", out, util_now_s() - p.t0);
    return 0;
}

/* ==== kli quantize / kli convert: the same options ======================================= */

#define TOOLS_MAX_KEEP 64

struct convert_args {
    struct cli_args ca;             /* -m IN and --help */
    const char *out;
    const char *keep[TOOLS_MAX_KEEP];
    int64_t used[2];                /* --imatrix: matrices weighted, and not in the file */
    struct kli_convert_options o;   /* initialized by the caller: its defaults */
};

/* The options quantize and convert share; convert adds --to (quantize writes a directory). */
#define CLI_CONVERT_LONGOPTS \
    CLI_MODEL_LONGOPT, \
    {"output", required_argument, NULL, 'o'}, \
    {"type", required_argument, NULL, 'T'}, \
    {"keep", required_argument, NULL, 'K'}, \
    {"force", no_argument, NULL, 'F'}, \
    {"imatrix", required_argument, NULL, 'I'}, \
    CLI_HELP_LONGOPT

static const struct option quantize_opts[] = {
    CLI_CONVERT_LONGOPTS,
    CLI_LONGOPTS_END,
};

static const struct option convert_opts[] = {
    CLI_CONVERT_LONGOPTS,
    {"to", required_argument, NULL, 'G'},
    CLI_LONGOPTS_END,
};

/* What tells kli quantize and kli convert apart: the name, the option table (convert's adds
 * --to), the library's defaults and call, whether Ctrl-C is caught, and the usage texts:
 * `help` for -h, `usage` with a usage error. */
struct convert_cmd {
    const char *what;
    const struct option *opts;
    void (*init)(struct kli_convert_options *o);
    int (*run)(const char *in, const char *out, const struct kli_convert_options *o,
               struct kli_err *err);
    int catch_signals;   /* convert: Ctrl-C stops between slabs and removes the temporary file */
    const char *help, *usage;
};

/* -m IN -o OUT [--type T] [--keep GLOB=TYPE]... [--imatrix FILE] [--force] and, in cmd->opts,
 * convert's [--to FORMAT], into a->o (whose progress goes to `p`).
 * @return 0 to go on, 1 after --help, -1 on a usage error (reported). */
static int
convert_args_parse(int argc, char **argv, const struct convert_cmd *cmd, struct convert_args *a,
                   struct progress *p)
{
    int c;

    a->ca.usage = cmd->help;
    while ((c = cli_getopt(argc, argv, "m:o:h", cmd->opts, &a->ca)) > 0) {
        switch (c) {
        case 'o': a->out = optarg; break;
        case 'T': a->o.type = optarg; break;
        case 'K':
            if (a->o.n_keep == TOOLS_MAX_KEEP) {
                cli_error("--keep: at most %d rules", TOOLS_MAX_KEEP);
                return -1;
            }
            a->keep[a->o.n_keep++] = optarg;
            break;
        case 'F': a->o.force = 1; break;
        case 'I': a->o.imatrix = optarg; break;
        case 'G': a->o.format = optarg; break;
        }
    }
    if (c != CLI_ARGS_END)
        return c == CLI_ARGS_HELP ? 1 : -1;
    if (a->ca.model == NULL || a->out == NULL || optind < argc) {
        cli_error("%s", cmd->usage);
        return -1;
    }
    if (a->o.format != NULL && strcmp(a->o.format, "kli") != 0 &&
        strcmp(a->o.format, "gguf") != 0) {
        cli_error("--to %s: the formats are kli and gguf", a->o.format);
        return -1;
    }
    a->o.keep = a->keep;
    a->o.imatrix_used = a->used;
    a->o.progress = on_progress;
    a->o.ud = p;
    return 0;
}

static volatile sig_atomic_t convert_signal;

static void
convert_on_signal(int sig)
{
    convert_signal = sig;
}

static int
convert_interrupt(void *ud)
{
    (void)ud;
    return convert_signal != 0;
}

/* kli quantize and kli convert: the options, the library call, then where the output went
 * and what --imatrix weighted. */
static int
convert_cmd_run(int argc, char **argv, const struct convert_cmd *cmd)
{
    struct kli_err err = {0};
    struct progress p = {util_now_s(), 0, isatty(STDERR_FILENO), cmd->what};
    struct sigaction sa, old_int, old_term;
    struct convert_args a = {0};
    int rc;

    cmd->init(&a.o);
    if ((rc = convert_args_parse(argc, argv, cmd, &a, &p)) != 0)
        return rc > 0 ? 0 : 2;
    if (cmd->catch_signals) {
        a.o.interrupt = convert_interrupt;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = convert_on_signal;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, &old_int);
        sigaction(SIGTERM, &sa, &old_term);
    }
    rc = cmd->run(a.ca.model, a.out, &a.o, &err);
    if (cmd->catch_signals) {
        sigaction(SIGINT, &old_int, NULL);
        sigaction(SIGTERM, &old_term, NULL);
    }
    if (rc != KLI_OK) {
        if (p.tty)
            fputc('\n', stderr);   /* after the progress bar */
        cli_error("%s", err.msg);
        return rc == KLI_E_INTERRUPTED ? 128 + (int)convert_signal : 1;
    }
    fprintf(stderr, "%s: wrote %s in %.1f s\n", p.what, a.out, util_now_s() - p.t0);
    if (a.o.imatrix != NULL)
        fprintf(stderr, "%s: %lld matrices weighted by %s, %lld unweighted (not in it or never "
                "seen)\n", p.what, (long long)a.used[0], a.o.imatrix, (long long)a.used[1]);
    return 0;
}

/* ==== kli quantize ======================================================================== */

static const struct convert_cmd quantize_cmd = {
    .what = "quantize",
    .opts = quantize_opts,
    .init = kli_quantize_options_init,
    .run = kli_quantize,
    .help = "usage: kli quantize -m|--model DIR -o|--output OUT_DIR --type TYPE\n"
            "                    [--keep GLOB=TYPE]... [--imatrix FILE] [--force] [-h|--help]\n"
            "  TYPE: a recipe, q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k, q8_0 (default),\n"
            "        or one type for every matrix, q5_k, q4_k, q4, q3_k, bf16, f16, f32\n",
    .usage = "usage: kli quantize -m DIR -o OUT_DIR --type TYPE [--keep GLOB=TYPE]...",
};

static int
cmd_quantize(int argc, char **argv)
{
    return convert_cmd_run(argc, argv, &quantize_cmd);
}

/* ==== kli convert ========================================================================= */

static const struct convert_cmd convert_cmd = {
    .what = "convert",
    .opts = convert_opts,
    .init = kli_convert_options_init,
    .run = kli_convert,
    .catch_signals = 1,
    .help = "usage: kli convert -m|--model MODEL -o|--output OUT [--to kli|gguf] [--type TYPE]\n"
            "                   [--keep GLOB=TYPE]... [--imatrix FILE] [--force] [-h|--help]\n"
            "  OUT: a .kli file, or with --to gguf a GGUF file for llama.cpp-family tools\n"
            "  TYPE: a recipe, q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k, q8_0, or one type\n"
            "        for every matrix, q5_k, q4_k, q4, q3_k, bf16, f16, f32 (default: as stored)\n",
    .usage = "usage: kli convert -m MODEL -o OUT [--to kli|gguf] [--type TYPE] "
             "[--keep GLOB=TYPE]...",
};

static int
cmd_convert(int argc, char **argv)
{
    return convert_cmd_run(argc, argv, &convert_cmd);
}

/* ==== kli bench =========================================================================== */

struct stat3 {
    double med, min, max;
};

static struct stat3
stats(double *v, int n)
{
    struct stat3 s = {0, 0, 0};

    if (n == 0)
        return s;
    s.med = util_median(v, (size_t)n);
    s.min = v[0];
    s.max = v[n - 1];
    return s;
}

static uint64_t bench_rng = 88172645463325252ull;

static kli_token
rand_token(int32_t V)
{
    bench_rng ^= bench_rng << 13;
    bench_rng ^= bench_rng >> 7;
    bench_rng ^= bench_rng << 17;
    return (kli_token)(bench_rng % (uint64_t)V);
}

/* Decodes n tokens one at a time after the session's current context. @return tok/s. */
static double
bench_decode(struct kli_session *s, int n, int32_t V, struct kli_err *err)
{
    double t0 = util_now_s();

    for (int i = 0; i < n; i++) {
        kli_token t = rand_token(V);
        if (kli_session_eval(s, &t, 1, NULL, err) != KLI_OK)
            return -1;
    }
    return n / (util_now_s() - t0);
}

/* Fills s to `depth` tokens for decoding at depth: a prefill of up to BENCH_DEPTH_PREFILL
 * random tokens, then its rows repeated up to the depth (kli_session_pad): the attention
 * reads a cache of the full depth, and the fill costs a copy rather than a prefill whose
 * attention grows with the square of the depth. The decode's speed depends on the cache's
 * size, not on how often its rows repeat. */
enum { BENCH_DEPTH_PREFILL = 128 };

static int
bench_fill(struct kli_session *s, kli_token *prompt, long depth, int32_t V,
           struct kli_err *err)
{
    int32_t n = depth < BENCH_DEPTH_PREFILL ? (int32_t)depth : BENCH_DEPTH_PREFILL;
    int rc;

    kli_session_reset(s);
    for (int32_t i = 0; i < n; i++)
        prompt[i] = rand_token(V);
    if ((rc = kli_session_eval(s, prompt, n, NULL, err)) != KLI_OK)
        return rc;
    return kli_session_pad(s, (int32_t)(depth - n), err);
}

/* KL(p || q) of two logit rows, in nats, whether their argmaxes agree, and by how much p's
 * largest logit exceeds its second (*gap). */
static double
kl_row(const float *p, const float *q, int32_t V, int *same, double *gap)
{
    double mp = -INFINITY, mq = -INFINITY, p2 = -INFINITY, zp = 0, zq = 0, kl = 0;
    int ap = 0, aq = 0;

    for (int32_t i = 0; i < V; i++) {
        if (p[i] > mp) { p2 = mp; mp = p[i]; ap = i; }
        else if (p[i] > p2) { p2 = p[i]; }
        if (q[i] > mq) { mq = q[i]; aq = i; }
    }
    *gap = mp - p2;
    for (int32_t i = 0; i < V; i++) {
        zp += exp(p[i] - mp);
        zq += exp(q[i] - mq);
    }
    double lzp = log(zp) + mp, lzq = log(zq) + mq;
    for (int32_t i = 0; i < V; i++) {
        double lp = p[i] - lzp, lq = q[i] - lzq;
        kl += exp(lp) * (lp - lq);
    }
    *same = ap == aq;
    return kl;
}

static int
bench_quality(const char *path, int threads, const kli_token *ids, int32_t n, int json)
{
    const char *types[] = {"q8_0", "q4"};
    struct kli_model *ref = NULL;
    struct kli_session *s = NULL;
    struct kli_err err = {0};
    float *lr = NULL, *lq = NULL;
    int rc = 1;

    if (cli_open_model(path, threads, &ref) != 0)
        return 1;
    int32_t V = kli_model_n_vocab(ref);
    lr = malloc((size_t)n * (size_t)V * sizeof(float));
    lq = malloc((size_t)n * (size_t)V * sizeof(float));
    if (lr == NULL || lq == NULL || kli_session_create(&s, ref, NULL, &err) != KLI_OK ||
        kli_session_eval(s, ids, n, lr, &err) != KLI_OK) {
        cli_error("quality: %s", err.msg[0] ? err.msg : "out of memory");
        goto out;
    }
    kli_session_free(s);
    s = NULL;
    if (json)
        printf("{\"quality\": [");
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        struct kli_model *m = NULL;
        struct kli_model_options mo;
        kli_model_options_init(&mo);
        mo.n_threads = threads;
        mo.weight_type = types[t];
        if (kli_model_open(&m, path, &mo, &err) != KLI_OK ||
            kli_session_create(&s, m, NULL, &err) != KLI_OK ||
            kli_session_eval(s, ids, n, lq, &err) != KLI_OK) {
            cli_error("quality: %s", err.msg);
            kli_session_free(s);
            kli_model_close(m);
            goto out;
        }
        double sum = 0, mx = 0;
        int agree = 0, big = 0, clear = 0, clear_agree = 0;
        for (int32_t i = 0; i < n; i++) {
            int same;
            double gap, kl = kl_row(lr + (size_t)i * V, lq + (size_t)i * V, V, &same, &gap);
            sum += kl;
            mx = kl > mx ? kl : mx;
            agree += same;
            big += kl > 0.1;   /* isolated large errors: MoE top-k flips on near-ties */
            /* positions where the reference prefers its top token at least e:1 over the
             * next: random-weight models are nearly flat, and their other argmaxes flip on
             * any perturbation */
            if (gap >= 1.0) {
                clear++;
                clear_agree += same;
            }
        }
        if (json)
            printf("%s{\"type\": \"%s\", \"kl_mean\": %.6g, \"kl_max\": %.6g, "
                   "\"top1_agreement\": %.4f, \"positions\": %d, \"kl_above_0.1\": %d, "
                   "\"clear_positions\": %d, \"clear_top1_agreement\": %.4f}",
                   t ? ", " : "", types[t], sum / n, mx, (double)agree / n, n, big, clear,
                   clear ? (double)clear_agree / clear : 0.0);
        else
            printf("%-5s vs stored weights: KL mean %.3g max %.3g nats, top-1 agreement "
                   "%.1f%% (%d/%d), positions with KL > 0.1: %d; where the top logit leads by "
                   ">= 1: %.1f%% (%d/%d)\n", types[t], sum / n, mx, 100.0 * agree / n, agree,
                   n, big, clear ? 100.0 * clear_agree / clear : 0.0, clear_agree, clear);
        kli_session_free(s);
        s = NULL;
        kli_model_close(m);
    }
    if (json)
        printf("]}\n");
    rc = 0;
out:
    free(lr);
    free(lq);
    kli_session_free(s);
    kli_model_close(ref);
    return rc;
}

static const char *phase_names[KLI_PHASE_COUNT] = {
    "kda", "mla", "moe", "dense", "lm_head", "other",
};

struct bench_args {
    const char *model, *type;
    int threads;
    long pp, tg, depth, reps;
    int json;
    int32_t cache_type;         /* --cache-type */
    uint64_t budget;            /* 0: resident weights */
};

/* Peak resident size since the last bench_rss_reset, in bytes (0 where unknown). */
static uint64_t
bench_rss_peak(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    uint64_t kb = 0;

    if (f == NULL)
        return 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (sscanf(line, "VmHWM: %" SCNu64, &kb) == 1)
            break;
    }
    fclose(f);
    return kb * 1024;
}

static void
bench_rss_reset(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");

    if (f != NULL) {
        fputs("5", f);   /* resets VmHWM to the current resident size (Linux 4.0+) */
        fclose(f);
    }
}

/* The last-level cache in bytes: KLI_BENCH_LLC (tests, and a machine whose cache sysconf
 * misreports), else the L3, else the L2; 0 when none is known. */
static uint64_t
bench_llc(void)
{
    const char *e = getenv("KLI_BENCH_LLC");
    uint64_t llc = 0;

    if (e != NULL && *e != '\0') {
        if (cli_parse_size(e, &llc) != 0) {
            cli_error("KLI_BENCH_LLC: '%s' is not a size (such as 32M); ignored", e);
            llc = 0;
        }
    }
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (llc == 0) {
        long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
        llc = l3 > 0 ? (uint64_t)l3 : 0;
    }
#endif
#ifdef _SC_LEVEL2_CACHE_SIZE
    if (llc == 0) {
        long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
        llc = l2 > 0 ? (uint64_t)l2 : 0;
    }
#endif
    return llc;
}

/* Bytes per triad array: four times the last-level cache, so that the probe measures memory
 * and not a large L3, but at least 64 MiB and at most 256 MiB. The cap keeps the probe's
 * 768 MiB (and a sanitizer's shadow of it) from growing with a server's cache: sysconf
 * reports the sum over an EPYC's CCDs (508 MiB on a Zen 5), while each thread sees only
 * its own CCD's share. */
#define BENCH_TRIAD_MIN ((size_t)64 << 20)
#define BENCH_TRIAD_MAX ((size_t)256 << 20)

static size_t
bench_triad_bytes(uint64_t llc)
{
    if (llc > BENCH_TRIAD_MAX / 4)
        return BENCH_TRIAD_MAX;
    return (size_t)llc * 4 > BENCH_TRIAD_MIN ? (size_t)llc * 4 : BENCH_TRIAD_MIN;
}

/* The read probe's buffer for a decode that reads `w` weight bytes a token, on a last-level
 * cache of `llc` bytes (0: unknown, taken as 32 MiB): min(w, max(4 x llc, 256 MiB)), at
 * least 64 MiB, in whole 64 KiB. The fastest way to read w bytes over and over is a plain
 * sequential read of w bytes, which gets exactly the help from the cache that the decode
 * gets, so a decode cannot beat it by more than noise; past four times the last-level cache
 * the cache helps neither, and a bigger buffer changes nothing but the memory it takes
 * (doc/measuring.md section 3). */
#define BENCH_READ_MIN ((uint64_t)64 << 20)
#define BENCH_READ_SPAN ((uint64_t)256 << 20)
#define BENCH_LLC_GUESS ((uint64_t)32 << 20)

static size_t
bench_read_bytes(uint64_t llc, uint64_t w)
{
    uint64_t span, b;

    llc = llc != 0 ? llc : BENCH_LLC_GUESS;
    span = llc > UINT64_MAX / 4 ? UINT64_MAX : 4 * llc;
    span = span > BENCH_READ_SPAN ? span : BENCH_READ_SPAN;
    b = w < span ? w : span;
    b = b > BENCH_READ_MIN ? b : BENCH_READ_MIN;
    b = b < SIZE_MAX ? b : SIZE_MAX;
    return (size_t)b & ~(((size_t)64 << 10) - 1);
}

/* @return the larger of `peak` and the peak resident size since the last reset. */
static uint64_t
bench_rss_mark(uint64_t peak)
{
    uint64_t p = bench_rss_peak();

    return p > peak ? p : peak;
}

/* What one configuration's measurement found, for bench_print_json and bench_print_text. */
struct bench_result {
    struct stat3 pf, dc, dd, tr, rd;   /* prefill, decode, decode at depth, triad, read */
    double bytes;                      /* weight bytes one decode token reads */
    double roof;                       /* median fraction of the read probe's bandwidth */
    double roof_triad;                 /* the same against the triad */
    int n_capped;                      /* repetitions whose decode outran the read probe */
    double ph[KLI_PHASE_COUNT];        /* seconds per decoded token in each phase */
    double pph[KLI_PHASE_COUNT];       /* seconds per prompt token in each phase */
    size_t triad_bytes, read_bytes;
    uint64_t peak;                     /* peak resident size */
    uint64_t w_res, w_huge;            /* weight pages resident, of them in 2 MiB pages */
    int w_known;
    int edge, gpu;
    struct kli_cache_stats cs, dsum;   /* edge mode: the cache, the decode totals */
    struct kli_gpu_stats gs;
    uint64_t g_routed, g_on, g_swaps;  /* decode totals on the GPU */
    uint64_t cache_bytes;              /* what the context at depth takes (MLA cache, ...) */
};

/* Repetition r's bandwidth probes: the triad into tr[r], the read pass into rd[r]. */
static void
bench_probe(const struct bench_result *res, double *tr, double *rd, long r)
{
    tr[r] = kli_bench_triad(res->triad_bytes);
    rd[r] = kli_bench_read(res->read_bytes);
}

/* The roofline fraction of a decode that moved `used` GB/s against a probe of `probe` GB/s:
 * used / max(probe, used), so at most 1; *capped is set when the decode outran the probe
 * (noise, or the cache serving what the probe did not get). 0 when the probe failed. */
static double
bench_roof(double used, double probe, int *capped)
{
    if (probe <= 0)
        return 0;
    if (used > probe) {
        *capped = 1;
        return 1;
    }
    return used / probe;
}

/* Adds the session's seconds in each phase since its timers were reset, over `div` (the
 * tokens of all repetitions), to acc: the mean per token. */
static void
bench_phases(const struct kli_session *s, double acc[KLI_PHASE_COUNT], double div)
{
    double p1[KLI_PHASE_COUNT];

    kli_session_phase_seconds(s, p1);
    for (int k = 0; k < KLI_PHASE_COUNT; k++)
        acc[k] += p1[k] / div;
}

/* Measures one model configuration: prefill, decode (and at depth), probes, phases; in edge
 * mode the expert cache's counts, on a GPU its own, and the peak resident size. The model
 * and session are left in *mp and *sp for the caller to close.
 * @return 0, or 1 after an error message. */
static int
bench_measure(const struct bench_args *a, struct kli_model **mp, struct kli_session **sp,
              struct bench_result *res)
{
    const char *model = a->model, *type = a->type;
    long pp = a->pp, tg = a->tg, depth = a->depth, reps = a->reps;
    int json = a->json, rc = 1;
    struct kli_model *m = NULL;
    struct kli_session *s = NULL;
    struct kli_err err = {0};
    struct kli_model_options mo;
    struct kli_session_options so;
    struct kli_session *sd = NULL;   /* at depth */
    kli_token *prompt = NULL;

    memset(res, 0, sizeof(*res));
    /* The bandwidth probes run right before each repetition's decode, so that each roofline
     * fraction compares numbers from the same minute of a noisy machine. Their buffers are
     * freed before the peak resident size is read on (bench_rss_mark). Under a memory budget
     * the probes all run first, before the model takes its share; the bytes a decode reads
     * are not known then, and the read probe takes no more than the triad's three arrays. */
    /* One value a repetition: triad and read GB/s, roofline fractions against the read probe
     * and the triad, prefill, decode, decode at depth */
    double *tr = calloc((size_t)reps * 7, sizeof(double));
    uint64_t llc = bench_llc();
    res->triad_bytes = bench_triad_bytes(llc);
    if (tr == NULL) {
        cli_error("out of memory");
        return 1;
    }
    double *rd = tr + reps, *rf = rd + reps, *rt = rf + reps, *pf = rt + reps;
    double *dc = pf + reps, *dd = dc + reps;
    if (a->budget != 0)
        res->read_bytes = bench_read_bytes(llc, 3 * (uint64_t)res->triad_bytes);
    for (long r = 0; r < reps && a->budget != 0; r++)
        bench_probe(res, tr, rd, r);
    bench_rss_reset();
    kli_model_options_init(&mo);
    mo.n_threads = a->threads;
    mo.weight_type = type;
    cli_gpu_apply(&mo);
    cli_placement_apply(&mo);
    mo.mem_budget = a->budget;
    if (kli_model_open(mp, model, &mo, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        goto out;
    }
    m = *mp;
    cli_gpu_report(m);
    res->edge = kli_model_cache_stats(m, &res->cs) == 0;
    res->gpu = kli_model_gpu_stats(m, &res->gs) == 0;
    res->bytes = (double)kli_model_decode_bytes(m);
    if (a->budget == 0)
        res->read_bytes = bench_read_bytes(llc, (uint64_t)res->bytes);
    kli_session_options_init(&so);
    so.batch_max = pp > 0 && pp < 512 ? (int32_t)pp : 512;
    so.cache_type = a->cache_type;
    if (kli_session_create(sp, m, &so, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        goto out;
    }
    s = *sp;
    if (depth > 0) {   /* its own session: room for the depth and every repetition's decode */
        so.ctx_max = (int32_t)(depth + tg * reps + 1);
        so.batch_max = BENCH_DEPTH_PREFILL;
        if (cli_ctx_fits(m, a->cache_type, so.ctx_max) != 0)
            goto out;
        if (kli_session_create(&sd, m, &so, &err) != KLI_OK)
            goto fail;
    }
    int32_t V = kli_model_n_vocab(m);
    size_t np = (size_t)(pp > BENCH_DEPTH_PREFILL ? pp : BENCH_DEPTH_PREFILL);
    prompt = malloc(((np > 32 ? np : 32) + 1) * sizeof(kli_token));
    if (!prompt) {
        cli_error("out of memory");
        goto out;
    }
    if (!json)
        fprintf(stderr, "bench: %s, kernels %s, %d threads, weights %s, %s cache; %ld "
                "repetitions\n", model, kli_simd_variant(), kli_threads(),
                type ? type : "as stored", kli_cache_type_name(a->cache_type), reps);
    if (!json && res->edge)
        fprintf(stderr, "bench: memory budget %.0f MiB: trunk %.0f MiB, expert cache %d of %d "
                "experts (%.1f MiB each)\n", (double)res->cs.budget / 1048576.0,
                (double)res->cs.trunk_bytes / 1048576.0, res->cs.n_slots, res->cs.n_experts,
                (double)res->cs.slot_bytes / 1048576.0);
    /* Warm-up, untimed: a short prompt maps nearly every weight page and starts the workers,
     * so the first repetition does not pay for page faults. */
    if (tg > 0 || pp > 0) {
        int32_t nw = 32;
        for (int32_t i = 0; i < nw; i++)
            prompt[i] = rand_token(V);
        kli_session_reset(s);
        if (nw > so.batch_max)
            nw = so.batch_max;
        if (kli_session_eval(s, prompt, nw, NULL, &err) != KLI_OK)
            goto fail;
    }
    /* the context at depth, filled once: each repetition decodes tg tokens further on */
    if (depth > 0 && tg > 0 && bench_fill(sd, prompt, depth, V, &err) != KLI_OK)
        goto fail;
    for (long r = 0; r < reps; r++) {
        if (a->budget == 0) {
            res->peak = bench_rss_mark(res->peak);
            bench_probe(res, tr, rd, r);
            bench_rss_reset();
        }
        if (pp > 0) {
            for (long i = 0; i < pp; i++)
                prompt[i] = rand_token(V);
            kli_session_reset(s);
            kli_session_reset_timers(s);
            double t0 = util_now_s();
            if (kli_session_eval(s, prompt, (int32_t)pp, NULL, &err) != KLI_OK)
                goto fail;
            pf[r] = pp / (util_now_s() - t0);
            bench_phases(s, res->pph, (double)pp * (double)reps);
        }
        if (tg > 0) {
            kli_session_reset(s);
            kli_session_reset_timers(s);
            kli_model_cache_reset(m);
            kli_model_gpu_reset(m);
            if ((dc[r] = bench_decode(s, (int)tg, V, &err)) < 0)
                goto fail;
            int capped = 0;
            rf[r] = bench_roof(res->bytes * dc[r] / 1e9, rd[r], &capped);
            rt[r] = tr[r] > 0 ? res->bytes * dc[r] / (tr[r] * 1e9) : 0;
            res->n_capped += capped;
            if (res->gpu) {
                kli_model_gpu_stats(m, &res->gs);
                res->g_routed += res->gs.routed;
                res->g_on += res->gs.on_gpu;
                res->g_swaps += res->gs.swaps;
            }
            if (res->edge) {
                struct kli_cache_stats *cs = &res->cs, *dsum = &res->dsum;

                kli_model_cache_stats(m, cs);
                dsum->requests += cs->requests;
                dsum->hits += cs->hits;
                dsum->bytes_read += cs->bytes_read;
                dsum->prefetches += cs->prefetches;
                dsum->prefetch_used += cs->prefetch_used;
                dsum->wait_seconds += cs->wait_seconds;
            }
            bench_phases(s, res->ph, (double)tg * (double)reps);
            if (depth > 0 && (dd[r] = bench_decode(sd, (int)tg, V, &err)) < 0)
                goto fail;
        }
        if (!json)
            fprintf(stderr, "  rep %ld: prefill %.1f tok/s, decode %.2f tok/s%s, read %.1f "
                    "GB/s, triad %.1f GB/s\n", r + 1, pf[r], dc[r],
                    depth > 0 ? " (empty context)" : "", rd[r], tr[r]);
    }
    res->pf = stats(pf, (int)reps);
    res->dc = stats(dc, (int)reps);
    res->dd = stats(dd, (int)reps);
    res->tr = stats(tr, (int)reps);
    res->rd = stats(rd, (int)reps);
    res->cache_bytes = kli_model_cache_bytes(m, a->cache_type, depth);
    /* the medians of the repetitions' fractions, each against its own probes */
    res->roof = tg > 0 ? stats(rf, (int)reps).med : 0;
    res->roof_triad = tg > 0 ? stats(rt, (int)reps).med : 0;
    res->peak = bench_rss_mark(res->peak);
    res->w_known = kli_model_weight_pages(m, &res->w_res, &res->w_huge) == 0;
    rc = 0;
    goto out;
fail:
    cli_error("%s", err.msg);
out:
    kli_session_free(sd);
    free(prompt);
    free(tr);
    return rc;
}

static void
bench_print_json(const struct bench_args *a, const struct bench_result *res)
{
    const struct kli_cache_stats *cs = &res->cs, *dsum = &res->dsum;
    const struct kli_gpu_stats *gs = &res->gs;
    long tg = a->tg, reps = a->reps;

    printf("{\"model\": \"%s\", \"simd\": \"%s\", \"threads\": %d, \"weight_type\": \"%s\", "
           "\"prompt_tokens\": %ld, \"gen_tokens\": %ld, \"depth\": %ld, \"reps\": %ld, "
           "\"prefill_tok_s\": %.3f, \"prefill_tok_s_min\": %.3f, "
           "\"prefill_tok_s_max\": %.3f, \"decode_tok_s\": %.3f, \"decode_tok_s_min\": %.3f, "
           "\"decode_tok_s_max\": %.3f, \"decode_depth_tok_s\": %.3f, "
           "\"cache_type\": \"%s\", \"context_bytes\": %llu, "
           "\"triad_gb_s\": %.3f, \"triad_gb_s_min\": %.3f, \"triad_gb_s_max\": %.3f, "
           "\"triad_bytes\": %zu, \"read_gb_s\": %.3f, \"read_gb_s_min\": %.3f, "
           "\"read_gb_s_max\": %.3f, \"read_probe_bytes\": %zu, "
           "\"decode_bytes_per_token\": %.0f, ",
           a->model, kli_simd_variant(), kli_threads(), a->type ? a->type : "stored", a->pp,
           tg, a->depth, reps, res->pf.med, res->pf.min, res->pf.max, res->dc.med, res->dc.min,
           res->dc.max, res->dd.med, kli_cache_type_name(a->cache_type),
           (unsigned long long)res->cache_bytes, res->tr.med, res->tr.min, res->tr.max,
           res->triad_bytes, res->rd.med, res->rd.min, res->rd.max, res->read_bytes,
           res->bytes);
    /* a CPU roofline says nothing of a run that uses the GPU; six significant digits, not
     * four decimals, which left a small model's 0.0035 two and failed its checks */
    if (res->gpu)
        printf("\"roofline_fraction\": null, \"roofline_triad\": null, "
               "\"roofline_capped\": null, ");
    else
        printf("\"roofline_fraction\": %.6g, \"roofline_triad\": %.6g, "
               "\"roofline_capped\": %s, ", res->roof, res->roof_triad,
               res->n_capped > 0 ? "true" : "false");
    printf("\"phase_ms\": {");
    for (int k = 0; k < KLI_PHASE_COUNT; k++)
        printf("%s\"%s\": %.4f", k ? ", " : "", phase_names[k], res->ph[k] * 1e3);
    printf("}, \"prefill_phase_ms\": {");
    for (int k = 0; k < KLI_PHASE_COUNT; k++)
        printf("%s\"%s\": %.4f", k ? ", " : "", phase_names[k], res->pph[k] * 1e3);
    printf("}");
    if (res->edge)
        printf(", \"mem_budget\": %llu, \"cache_slots\": %d, \"cache_experts\": %d, "
               "\"cache_hit_rate\": %.4f, \"cache_bytes_read_per_token\": %.0f, "
               "\"cache_prefetch_used\": %.4f, \"cache_wait_ms_per_token\": %.3f",
               (unsigned long long)cs->budget, cs->n_slots, cs->n_experts,
               dsum->requests ? (double)dsum->hits / (double)dsum->requests : 0.0,
               tg > 0 ? (double)dsum->bytes_read / (double)(tg * reps) : 0.0,
               dsum->prefetches ? (double)dsum->prefetch_used / (double)dsum->prefetches : 0.0,
               tg > 0 ? dsum->wait_seconds * 1e3 / (double)(tg * reps) : 0.0);
    if (res->gpu)
        printf(", \"gpu_whole_model\": %d, \"gpu_mla_layers\": %d, \"gpu_hot_experts\": %d, "
               "\"gpu_experts\": %d, "
               "\"gpu_bytes_used\": %llu, \"gpu_expert_hit_rate\": %.4f, "
               "\"gpu_swaps\": %llu", gs->whole_model, gs->mla_layers, gs->n_hot, gs->n_experts,
               (unsigned long long)gs->bytes_used,
               res->g_routed ? (double)res->g_on / (double)res->g_routed : 0.0,
               (unsigned long long)res->g_swaps);
    if (res->w_known)
        printf(", \"weights_resident_bytes\": %llu, \"weights_huge_bytes\": %llu",
               (unsigned long long)res->w_res, (unsigned long long)res->w_huge);
    printf(", \"peak_rss_bytes\": %llu}\n", (unsigned long long)res->peak);
}

/* The roofline line of the text report: medians of the repetitions, each against the
 * probes run just before its decode. */
static void
bench_print_roofline(const struct bench_args *a, const struct bench_result *res)
{
    if (res->gpu) {
        printf("roofline for CPU runs only (this run uses the GPU)\n");
        return;
    }
    printf("roofline %.3f of the read probe (%.0f MiB, %.1f GB/s; triad %.1f GB/s, fraction "
           "%.3f); %.1f GB/s used in decode\n", res->roof,
           (double)res->read_bytes / 1048576.0, res->rd.med, res->tr.med, res->roof_triad,
           res->bytes * res->dc.med / 1e9);
    if (res->n_capped > 0)
        printf("roofline capped at 1 in %d of %ld repetitions: decode outran the read probe "
               "(noise, or the cache serving what the probe did not get)\n", res->n_capped,
               a->reps);
}

static void
bench_print_text(const struct bench_args *a, const struct bench_result *res)
{
    const struct kli_cache_stats *cs = &res->cs, *dsum = &res->dsum;
    const struct kli_gpu_stats *gs = &res->gs;
    long tg = a->tg, reps = a->reps;

    printf("prefill  %6ld tokens: %8.2f tok/s (min %.2f, max %.2f)\n", a->pp, res->pf.med,
           res->pf.min, res->pf.max);
    printf("decode   %6ld tokens: %8.2f tok/s (min %.2f, max %.2f), empty context\n", tg,
           res->dc.med, res->dc.min, res->dc.max);
    if (a->depth > 0)
        printf("decode at depth %ld: %8.2f tok/s (min %.2f, max %.2f), %.2f of empty, %s "
               "cache of %.1f MiB\n", a->depth, res->dd.med, res->dd.min, res->dd.max,
               res->dc.med > 0 ? res->dd.med / res->dc.med : 0.0,
               kli_cache_type_name(a->cache_type), (double)res->cache_bytes / 1048576.0);
    printf("decode phases (ms/token):");
    for (int k = 0; k < KLI_PHASE_COUNT; k++)
        printf(" %s %.2f", phase_names[k], res->ph[k] * 1e3);
    if (a->pp > 0) {
        printf("\nprefill phases (ms/token):");
        for (int k = 0; k < KLI_PHASE_COUNT; k++)
            printf(" %s %.3f", phase_names[k], res->pph[k] * 1e3);
    }
    printf("\nmemory   read %.1f GB/s (min %.1f, max %.1f) over %.0f MiB, triad %.1f GB/s "
           "(min %.1f, max %.1f); decode reads %.1f MB/token\n", res->rd.med, res->rd.min,
           res->rd.max, (double)res->read_bytes / 1048576.0, res->tr.med, res->tr.min,
           res->tr.max, res->bytes / 1e6);
    bench_print_roofline(a, res);
    if (res->edge)
        printf("cache    budget %.0f MiB, %d of %d experts: decode hit rate %.1f%%, %.1f MB "
               "read/token, prefetches used %.0f%%, %.2f ms/token waiting\n",
               (double)cs->budget / 1048576.0, cs->n_slots, cs->n_experts,
               dsum->requests ? 100.0 * (double)dsum->hits / (double)dsum->requests : 0.0,
               tg > 0 ? (double)dsum->bytes_read / 1e6 / (double)(tg * reps) : 0.0,
               dsum->prefetches ? 100.0 * (double)dsum->prefetch_used /
                                  (double)dsum->prefetches : 0.0,
               tg > 0 ? dsum->wait_seconds * 1e3 / (double)(tg * reps) : 0.0);
    if (res->gpu)
        printf("gpu      %s, %d of %d routed experts per layer resident, %.0f MiB used: "
               "decode expert hit rate %.1f%%, %llu experts swapped\n",
               gs->whole_model ? "whole model" : gs->mla_layers ? "MLA layers" :
               "MLA attention", gs->n_hot, gs->n_experts,
               (double)gs->bytes_used / 1048576.0,
               res->g_routed ? 100.0 * (double)res->g_on / (double)res->g_routed : 0.0,
               (unsigned long long)res->g_swaps);
    if (res->w_known) {
        printf("weights  %.1f MiB of the files resident, %.0f%% of it in 2 MiB pages\n",
               (double)res->w_res / 1048576.0,
               res->w_res ? 100.0 * (double)res->w_huge / (double)res->w_res : 0.0);
        /* 64 MiB: below that the TLB hardly matters (the tiny test models) */
        if (res->w_res >= (64u << 20) && res->w_huge < res->w_res / 2)
            fprintf(stderr, "bench: most weight pages are 4 KiB pages, which can cost "
                    "15-25%% of the speed; a file read back from disk may get 2 MiB "
                    "pages (see kli(1), bench)\n");
    }
    printf("memory   peak resident %.1f MiB\n", (double)res->peak / 1048576.0);
}

/* One model configuration: measured, then printed as JSON or text. */
static int
bench_one(const struct bench_args *a)
{
    struct kli_model *m = NULL;
    struct kli_session *s = NULL;
    struct bench_result res;
    int rc = bench_measure(a, &m, &s, &res);

    if (rc == 0) {
        if (a->json)
            bench_print_json(a, &res);
        else
            bench_print_text(a, &res);
    }
    kli_session_free(s);
    kli_model_close(m);
    return rc;
}

static const char bench_usage[] =
    "usage: kli bench [-m|--model MODEL] [-p|--prompt 512] [-n|--gen 128] [--depth D]\n"
    "                 [--cache-type T] [-r|--reps 5] [--type T] [--json] [-h|--help]\n"
    "       kli bench --quality [-m|--model MODEL] [-p|--prompt N | --ids 1,2,3] [--json]\n"
    CLI_PLACEMENT_HELP CLI_GPU_HELP;

static int
cmd_bench(int argc, char **argv)
{
    static const struct option opts[] = {
        CLI_MODEL_LONGOPT,
        {"prompt", required_argument, NULL, 'p'},
        {"gen", required_argument, NULL, 'n'},
        {"depth", required_argument, NULL, 'd'},
        {"reps", required_argument, NULL, 'r'},
        CLI_THREADS_LONGOPT,
        {"type", required_argument, NULL, 'T'},
        CLI_CACHE_TYPE_LONGOPT,
        CLI_JSON_LONGOPT,
        {"quality", no_argument, NULL, 'Q'},
        {"ids", required_argument, NULL, 'I'},
        CLI_HELP_LONGOPT,
        CLI_GPU_LONGOPTS,
        CLI_PLACEMENT_LONGOPTS,
        CLI_LONGOPTS_END,
    };
    const char *model, *type = NULL, *ids_arg = NULL;
    long pp = 512, tg = 128, depth = 0, reps = 5;
    const struct cli_int_opt ints[] = {
        {'p', "-p", 0, 1 << 20, &pp},
        {'n', "-n", 0, 1 << 20, &tg},
        {'d', "--depth", 0, 1 << 30, &depth},
        {'r', "-r", 1, 1000, &reps},
    };
    struct cli_args ca = {.usage = bench_usage, .ints = ints, .n_ints = 4};
    int json, quality = 0, c, rc = 1;
    int32_t cache_type = KLI_CACHE_F32;

    while ((c = cli_getopt(argc, argv, "m:p:n:d:r:t:h", opts, &ca)) > 0) {
        switch (c) {
        case 'T': type = optarg; break;
        case CLI_OPT_CACHE_TYPE:
            if (cli_parse_cache_type(optarg, &cache_type) != 0)
                return 2;
            break;
        case 'Q': quality = 1; break;
        case 'I': ids_arg = optarg; break;
        }
    }
    if (c != CLI_ARGS_END || cli_no_operands(argc, argv, "bench") != 0)
        return cli_args_exit(c);
    if ((model = cli_model_path(ca.model, ca.demo, sizeof(ca.demo))) == NULL)
        return 1;
    int th = cli_threads(ca.threads);
    json = ca.json;

    if (quality) {
        kli_token *ids = NULL;
        int32_t n = 0;
        if (ids_arg != NULL) {
            if (cli_parse_ids(ids_arg, &ids, &n) != 0 || n == 0) {
                free(ids);
                rc = 2;
                goto out;
            }
        } else {
            struct kli_model *probe = NULL;
            if (cli_open_model(model, th, &probe) != 0)
                goto out;
            n = pp > 0 ? (int32_t)pp : 64;
            ids = malloc((size_t)n * sizeof(kli_token));
            for (int32_t i = 0; ids != NULL && i < n; i++)
                ids[i] = rand_token(kli_model_n_vocab(probe));
            kli_model_close(probe);
        }
        rc = ids != NULL ? bench_quality(model, th, ids, n, json) : 1;
        free(ids);
        goto out;
    }

    const uint64_t *budgets;
    int nb = cli_mem_budgets(&budgets);
    rc = 0;
    for (int i = 0; i < (nb > 0 ? nb : 1) && rc == 0; i++) {
        struct bench_args ba = {model, type, th, pp, tg, depth, reps, json, cache_type,
                                nb > 0 ? budgets[i] : 0};
        rc = bench_one(&ba);
    }
out:
    cli_demo_remove(ca.demo);
    return rc;
}

const struct cli_command cli_tool_commands[] = {
    {"synth", cmd_synth, "write a random model with the real per-layer shapes, for benchmarks"},
    {"quantize", cmd_quantize, "convert a model's weight matrices to q8_0, q4, bf16, ..."},
    {"convert", cmd_convert, "write a model as one .kli file, or as GGUF (--to gguf)"},
    {"bench", cmd_bench, "measure prefill and decode speed, bandwidth, and quantization quality"},
    {"perplexity", cli_perplexity, "score a text file: perplexity, KL divergence from a base run"},
    {"imatrix", cli_imatrix, "collect the mean squared activations that quantize --imatrix "
                             "weights by"},
    {NULL, NULL, NULL},
};
