/*
 * cli_batch.c - kli batch: the records of a JSONL file through one model, many at a time.
 *
 * Scheduling (continuous batching). Up to --parallel records are active, each in a slot
 * that owns a decode session (batch_max = --parallel, so its scratch is small) and, while a
 * record runs, the record's sampler. Between decode steps, free slots take the next records
 * (while others decode, only as many as BATCH_JOIN_TOKENS prompt tokens take to evaluate):
 * a joining record's prompt is evaluated in one shared prefill session (batch_max 256, so
 * prefill runs as matrix products), whose state is then copied into the slot
 * (kli_session_copy). Each decode step feeds one token of every active record through
 * kli_session_eval_batch: one pass over the weights, the experts shared by several rows run
 * as one product, so a step costs little more for 16 rows than for one. A finished record
 * leaves at once and its line is written.
 *
 * Prefix reuse. When a joining record shares at least --min-prefix leading tokens with
 * another record (one of the next records waiting in the input, or one of the last
 * BATCH_RECENT that ran), the prefill session's state at the end of that common prefix is
 * kept in the prefix cache (cli_prefix.c) before the rest of the prompt is evaluated. Every
 * later record starts from the longest cached prefix of its prompt and evaluates only the
 * rest. Looking ahead in the input lets the first record of a group already leave the
 * shared state behind, so sixteen questions about one document evaluate the document once.
 * This needs no knowledge of the chat format: a shared system turn, a shared document and
 * identical prompts are all common token prefixes.
 *
 * Output and interruption. A line is built whole and written with one write(2) on a file
 * opened O_APPEND, so the output only ever holds complete lines. SIGINT and SIGTERM set a
 * flag that is checked between decode steps and between the 256-token pieces of a prefill:
 * the records still running are dropped (a rerun redoes them) and kli exits 128 + signal.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kli.h"
#include "cli.h"
#include "cli_batch.h"
#include "cli_prefix.h"

#define BATCH_MAX_PARALLEL 256
#define BATCH_RECENT 8           /* records that ran, kept for finding shared prefixes */
#define BATCH_PREFILL 256        /* batch_max of the prefill session: kli's default */
#define BATCH_JOIN_TOKENS 512    /* prompt tokens evaluated per fill round while others run */

/* ==== options ============================================================================= */

enum {
    OPT_STOP = 256, OPT_RAW, OPT_CTX, OPT_QUIET, OPT_PREFIX_CACHE,
    OPT_PREFIX_DIR, OPT_MIN_PREFIX, OPT_SHARD, OPT_RESUME, OPT_OVERWRITE, OPT_MAX_PROMPT,
    OPT_MAX_ERRORS,
};

struct batch_args {
    const char *model, *input, *output, *system, *prefix_dir;
    long parallel, max_tokens, ctx, threads, min_prefix, shard_k, shard_n;
    long max_errors;              /* failed records tolerated before exit status 3 */
    uint64_t prefix_bytes, max_prompt_bytes;
    int raw, overwrite, quiet;
    struct kli_sampler_options so;
    const char *stop[BATCH_MAX_STOP];
    int n_stop;
    char demo[4096];
};

static const struct option batch_opts[] = {
    {"model", required_argument, NULL, 'm'},
    {"input", required_argument, NULL, 'i'},
    {"output", required_argument, NULL, 'o'},
    {"parallel", required_argument, NULL, 'P'},
    {"max-tokens", required_argument, NULL, 'n'},
    {"threads", required_argument, NULL, 't'},
    {"system", required_argument, NULL, 's'},
    CLI_SAMPLING_LONGOPTS,
    {"stop", required_argument, NULL, OPT_STOP},
    {"raw", no_argument, NULL, OPT_RAW},
    {"ctx", required_argument, NULL, OPT_CTX},
    {"quiet", no_argument, NULL, OPT_QUIET},
    {"prefix-cache", required_argument, NULL, OPT_PREFIX_CACHE},
    {"prefix-dir", required_argument, NULL, OPT_PREFIX_DIR},
    {"min-prefix", required_argument, NULL, OPT_MIN_PREFIX},
    {"shard", required_argument, NULL, OPT_SHARD},
    {"resume", no_argument, NULL, OPT_RESUME},
    {"overwrite", no_argument, NULL, OPT_OVERWRITE},
    {"max-prompt-bytes", required_argument, NULL, OPT_MAX_PROMPT},
    {"max-errors", required_argument, NULL, OPT_MAX_ERRORS},
    {"help", no_argument, NULL, 'h'},
    CLI_PLACEMENT_LONGOPTS,
    CLI_GPU_LONGOPTS,
    {NULL, 0, NULL, 0},
};

static const char batch_usage[] =
    "usage: kli batch [-m|--model MODEL] -i|--input IN.jsonl -o|--output OUT.jsonl\n"
    "                 [-P|--parallel N] [-n|--max-tokens MAX] [--stop STR]...\n"
    "                 [-s|--system SYSTEM] [--raw] [--ctx N] [--shard K/N]\n"
    "                 [--resume | --overwrite] [--prefix-cache SIZE] [--prefix-dir DIR]\n"
    "                 [--min-prefix N] [--max-prompt-bytes SIZE] [--max-errors N] [--quiet]\n"
    "                 [-h|--help]\n"
    CLI_SAMPLING_HELP CLI_PLACEMENT_HELP CLI_GPU_HELP
    "Each input line is a JSON object: {\"id\": ..., \"prompt\": ... | \"messages\": [...],\n"
    "optional \"max_tokens\", \"temperature\", \"top_p\", \"top_k\", \"min_p\", \"seed\", "
    "\"stop\", ...}.\n"
    "Each output line: id, text, prompt_tokens, completion_tokens, cached_tokens,\n"
    "finish_reason, prefill_ms, decode_ms (and error). Exit status 3: more than\n"
    "--max-errors N (default 0) records failed. See kli(1).\n";

/* A byte count: digits with an optional K, M, G or T (powers of 1024), optionally followed
 * by B or iB. */
static int
batch_size(const char *s, const char *what, uint64_t max, uint64_t *out)
{
    char *end;
    unsigned long long v;
    uint64_t mul = 1;

    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno == 0 && end != s && s[0] != '-') {
        switch (*end) {
        case 'k': case 'K': mul = 1ULL << 10; end++; break;
        case 'm': case 'M': mul = 1ULL << 20; end++; break;
        case 'g': case 'G': mul = 1ULL << 30; end++; break;
        case 't': case 'T': mul = 1ULL << 40; end++; break;
        default: break;
        }
        if (mul > 1 && *end == 'i')
            end++;
        if (*end == 'B')
            end++;
        if (*end == '\0' && v <= max / mul) {
            *out = v * mul;
            return 0;
        }
    }
    cli_error("%s: '%s' is not a size (such as 512M or 2G) up to %llu bytes", what, s,
              (unsigned long long)max);
    return -1;
}

/* @return 0 to go on, 1 for --help (printed), -1 for a usage error. */
static int
batch_parse(int argc, char **argv, struct batch_args *a)
{
    int c;

    memset(a, 0, sizeof(*a));
    a->parallel = 8;
    a->max_tokens = 256;
    a->min_prefix = 64;
    a->shard_k = a->shard_n = 1;
    a->prefix_bytes = 1ULL << 30;
    a->max_prompt_bytes = 4ULL << 20;
    kli_sampler_options_init(&a->so);
    while ((c = getopt_long(argc, argv, "m:i:o:P:n:t:s:h", batch_opts, NULL)) != -1) {
        switch (c) {
        case 'm': a->model = optarg; break;
        case 'i': a->input = optarg; break;
        case 'o': a->output = optarg; break;
        case 's': a->system = optarg; break;
        case 'P':
            if (cli_parse_int(optarg, 1, BATCH_MAX_PARALLEL, "--parallel", &a->parallel))
                return -1;
            break;
        case 'n':
            if (cli_parse_int(optarg, 0, 1 << 30, "--max-tokens", &a->max_tokens))
                return -1;
            break;
        case 't':
            if (cli_parse_int(optarg, 1, 4096, "--threads", &a->threads))
                return -1;
            break;
        case CLI_OPT_CPUS: case CLI_OPT_NUMA: case CLI_OPT_MEM_BUDGET:
            if (cli_placement_option(c, optarg) != 1)
                return -1;
            break;
        case OPT_CTX:
            if (cli_parse_int(optarg, 1, 1 << 30, "--ctx", &a->ctx))
                return -1;
            break;
        case OPT_STOP:
            if (a->n_stop == BATCH_MAX_STOP || optarg[0] == '\0') {
                cli_error("--stop: at most %d stop strings, none empty", BATCH_MAX_STOP);
                return -1;
            }
            a->stop[a->n_stop++] = optarg;
            break;
        case OPT_RAW: a->raw = 1; break;
        case OPT_QUIET: a->quiet = 1; break;
        case OPT_PREFIX_CACHE:
            if (batch_size(optarg, "--prefix-cache", 1ULL << 50, &a->prefix_bytes))
                return -1;
            break;
        case OPT_PREFIX_DIR: a->prefix_dir = optarg; break;
        case OPT_MIN_PREFIX:
            if (cli_parse_int(optarg, 1, 1 << 30, "--min-prefix", &a->min_prefix))
                return -1;
            break;
        case OPT_MAX_PROMPT:
            if (batch_size(optarg, "--max-prompt-bytes", 1ULL << 31, &a->max_prompt_bytes))
                return -1;
            break;
        case OPT_SHARD: {
            char *end;
            errno = 0;
            long k = strtol(optarg, &end, 10), n = 0;
            if (errno == 0 && end != optarg && *end == '/') {
                const char *q = end + 1;
                n = strtol(q, &end, 10);
                if (errno != 0 || end == q || *end != '\0')
                    n = 0;
            }
            if (n < 1 || n > 1000000 || k < 1 || k > n) {
                cli_error("--shard: '%s' is not K/N with 1 <= K <= N <= 1000000", optarg);
                return -1;
            }
            a->shard_k = k;
            a->shard_n = n;
            break;
        }
        case OPT_MAX_ERRORS:
            if (cli_parse_int(optarg, 0, INT32_MAX, "--max-errors", &a->max_errors))
                return -1;
            break;
        case OPT_RESUME: a->overwrite = 0; break;
        case OPT_OVERWRITE: a->overwrite = 1; break;
        case 'h':
            printf("%s", batch_usage);
            return 1;
        default:
            if (cli_sampling_option(c, optarg, &a->so) == 1)
                break;
            if (cli_gpu_option(c, optarg) != 1)
                return -1;
            break;
        }
    }
    if (optind < argc) {
        cli_error("batch: unexpected argument '%s'", argv[optind]);
        return -1;
    }
    if (a->input == NULL || a->output == NULL) {
        cli_error("batch: -i IN.jsonl and -o OUT.jsonl are required");
        return -1;
    }
    if (a->max_prompt_bytes == 0) {
        cli_error("--max-prompt-bytes: must be at least 1");
        return -1;
    }
    struct kli_sampler *probe = NULL;
    struct kli_err err = {0};
    if (kli_sampler_create(&probe, &a->so, 1, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        return -1;
    }
    kli_sampler_free(probe);
    return 0;
}

/* ==== state =============================================================================== */

struct batch_slot {
    struct kli_session *s;        /* batch_max = --parallel */
    struct kli_sampler *smp;      /* the record's, while it runs */
    struct batch_rec *rec;        /* NULL: the slot is free */
    kli_token next;               /* the token to feed at the next step */
    int32_t n_gen, cached;
    struct bbuf text;             /* generated text so far */
    double prefill_s, t_decode;
};

struct batch {
    const struct batch_args *a;
    struct batch_input in;
    const struct kli_model *m;
    const struct kli_tokenizer *tok;
    struct batch_defaults dflt;
    struct kli_session *pre;      /* the prefill session */
    struct batch_slot *slot;      /* [a->parallel] */
    struct prefix_cache *cache;   /* NULL: no prefix reuse */
    int64_t next_item;            /* the next input item to prepare */
    struct batch_rec **ahead;     /* prepared records waiting, in input order */
    int n_ahead, cap_ahead;
    kli_token *recent[BATCH_RECENT];
    int32_t n_recent[BATCH_RECENT];
    int at_recent;
    kli_token ends[3];
    int32_t n_base;
    int fd;                       /* the output */
    int io_failed;
    int64_t done, errors, prompt_tokens, cached_tokens, gen_tokens, step_tokens;
    double t0, step_s, last;
    int tty;
};

static volatile sig_atomic_t batch_signal;

static void
batch_on_signal(int sig)
{
    batch_signal = sig;
}

static double
batch_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ==== output ============================================================================== */

static void
batch_write(struct batch *b, const char *p, size_t n)
{
    while (n > 0 && !b->io_failed) {
        ssize_t w = write(b->fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            cli_error("%s: write error: %s", b->a->output, w < 0 ? strerror(errno) : "no room");
            b->io_failed = 1;
            return;
        }
        p += w;
        n -= (size_t)w;
    }
}

static void batch_progress(struct batch *b, int final);

/* Writes the line of record r: text from slot sl (NULL for a record that never ran). */
static void
batch_emit(struct batch *b, struct batch_rec *r, const struct batch_slot *sl,
           const char *reason, const char *error)
{
    struct bbuf l = {NULL, 0, 0};
    const char *id = r->it->id;
    int bad = 0;
    double dec = sl != NULL ? batch_now() - sl->t_decode : 0;

    bad |= bbuf_add(&l, "{\"id\":", 6);
    bad |= bbuf_json_str(&l, id, strlen(id));
    bad |= bbuf_add(&l, ",\"text\":", 8);
    bad |= bbuf_json_text(&l, sl != NULL ? sl->text.p : "", sl != NULL ? sl->text.n : 0);
    bad |= bbuf_addf(&l, ",\"prompt_tokens\":%d,\"completion_tokens\":%d,\"cached_tokens\":%d,"
                     "\"finish_reason\":\"%s\",\"prefill_ms\":%.1f,\"decode_ms\":%.1f",
                     (int)r->n, sl != NULL ? (int)sl->n_gen : 0, sl != NULL ? (int)sl->cached : 0,
                     reason, sl != NULL ? 1e3 * sl->prefill_s : 0.0, 1e3 * dec);
    if (error != NULL) {
        bad |= bbuf_add(&l, ",\"error\":", 9);
        bad |= bbuf_json_str(&l, error, strlen(error));
    }
    bad |= bbuf_add(&l, "}\n", 2);
    if (bad) {
        cli_error("out of memory writing the line of %s", id);
        b->io_failed = 1;
    } else {
        batch_write(b, l.p, l.n);
    }
    free(l.p);
    b->done++;
    b->errors += error != NULL;
    if (sl != NULL) {
        b->prompt_tokens += r->n;
        b->cached_tokens += sl->cached;
    }
    batch_progress(b, 0);
}

/* Ends the record of slot sl: writes its line and frees the slot. */
static void
batch_finish(struct batch *b, struct batch_slot *sl, const char *reason, const char *error)
{
    batch_emit(b, sl->rec, sl, reason, error);
    batch_rec_free(sl->rec);
    sl->rec = NULL;
    kli_sampler_free(sl->smp);
    sl->smp = NULL;
}

/* ==== progress ============================================================================ */

static void
batch_eta(double s, char *buf, size_t cap)
{
    if (s < 100)
        snprintf(buf, cap, "%.0f s", s);
    else if (s < 6000)
        snprintf(buf, cap, "%.0f min", s / 60);
    else
        snprintf(buf, cap, "%.1f h", s / 3600);
}

/* A bar on a terminal, a plain line every 10 s otherwise (stderr; nothing with --quiet). */
static void
batch_progress(struct batch *b, int final)
{
    int64_t total = b->in.n_items, done = b->done;
    double t = batch_now(), el = t - b->t0;
    double rate = el > 0 ? (double)b->gen_tokens / el : 0;
    char eta[32];

    if (b->a->quiet || (!final && t - b->last < (b->tty ? 0.2 : 10.0)))
        return;
    if (final && !b->tty)
        return;
    b->last = t;
    batch_eta(done > 0 ? el / (double)done * (double)(total - done) : 0, eta, sizeof(eta));
    if (b->tty) {
        int w = 24, fill = total > 0 ? (int)((double)w * (double)done / (double)total) : w;
        fprintf(stderr, "\rbatch [%.*s%*s] %lld/%lld records | %.1f tok/s | ETA %s   ", fill,
                "########################", w - fill, "", (long long)done, (long long)total,
                rate, done > 0 ? eta : "?");
        if (final)
            fputc('\n', stderr);
    } else {
        fprintf(stderr, "batch: %lld/%lld records, %.1f tok/s, ETA %s\n", (long long)done,
                (long long)total, rate, done > 0 ? eta : "?");
    }
}

static void
batch_summary(struct batch *b)
{
    double el = batch_now() - b->t0;
    struct prefix_stats ps;

    if (b->a->quiet)
        return;
    fprintf(stderr, "batch: %lld records written (%lld errors) in %.1f s | prompt %lld tokens, "
            "%lld from the prefix cache | generated %lld tokens, %.1f tok/s overall, %.1f "
            "tok/s in decode steps\n", (long long)b->done, (long long)b->errors, el,
            (long long)b->prompt_tokens, (long long)b->cached_tokens,
            (long long)b->gen_tokens, el > 0 ? (double)b->gen_tokens / el : 0.0,
            b->step_s > 0 ? (double)b->step_tokens / b->step_s : 0.0);
    if (b->cache != NULL) {
        prefix_cache_stats(b->cache, &ps);
        fprintf(stderr, "batch: prefix cache: %lld prefixes stored, %lld in memory (%.1f MiB), "
                "%lld evicted", (long long)ps.stored, (long long)ps.entries,
                (double)ps.bytes / 1048576.0, (long long)ps.evicted);
        if (b->a->prefix_dir != NULL)
            fprintf(stderr, ", %lld loaded from and %lld saved to %s (%lld failures)",
                    (long long)ps.disk_loads, (long long)ps.disk_saves, b->a->prefix_dir,
                    (long long)ps.disk_errors);
        fputc('\n', stderr);
    }
}

/* ==== records in and out of slots ========================================================= */

/* The next record to run, prepared, or NULL at the end of the input. Keeps up to
 * --parallel (at least 8) records prepared ahead for finding shared prefixes. */
static struct batch_rec *
batch_next(struct batch *b)
{
    while (b->n_ahead < b->cap_ahead && b->next_item < b->in.n_items) {
        struct batch_rec *r = batch_rec_prepare(&b->in, &b->in.items[b->next_item], b->tok,
                                                &b->dflt);
        if (r == NULL) {
            cli_error("out of memory");
            b->io_failed = 1;
            return NULL;
        }
        b->next_item++;
        b->ahead[b->n_ahead++] = r;
    }
    if (b->n_ahead == 0)
        return NULL;
    struct batch_rec *r = b->ahead[0];
    memmove(b->ahead, b->ahead + 1, (size_t)(--b->n_ahead) * sizeof(*b->ahead));
    return r;
}

static int32_t
batch_lcp(const kli_token *x, int32_t nx, const kli_token *y, int32_t ny)
{
    int32_t n = nx < ny ? nx : ny, i = 0;

    while (i < n && x[i] == y[i])
        i++;
    return i;
}

/* The longest prefix r shares with a record waiting or one that ran lately, or 0 when it is
 * shorter than --min-prefix. */
static int32_t
batch_shared(const struct batch *b, const struct batch_rec *r)
{
    int32_t best = 0;

    for (int i = 0; i < b->n_ahead; i++) {
        const struct batch_rec *o = b->ahead[i];
        int32_t l = batch_lcp(r->toks, r->n, o->toks, o->n);
        best = l > best ? l : best;
    }
    for (int i = 0; i < BATCH_RECENT; i++) {
        int32_t l = batch_lcp(r->toks, r->n, b->recent[i], b->n_recent[i]);
        best = l > best ? l : best;
    }
    return best >= b->a->min_prefix ? best : 0;
}

static void
batch_remember(struct batch *b, const struct batch_rec *r)
{
    kli_token *c = malloc((size_t)r->n * sizeof(kli_token) + 1);

    if (c == NULL)
        return;
    memcpy(c, r->toks, (size_t)r->n * sizeof(kli_token));
    free(b->recent[b->at_recent]);
    b->recent[b->at_recent] = c;
    b->n_recent[b->at_recent] = r->n;
    b->at_recent = (b->at_recent + 1) % BATCH_RECENT;
}

/* Evaluates n tokens in the prefill session, in pieces so that a signal is noticed.
 * @return 0, 1 when interrupted, or a negative status with a message in err. */
static int
batch_prefill(struct batch *b, const kli_token *t, int32_t n, struct kli_err *err)
{
    for (int32_t i = 0; i < n; i += BATCH_PREFILL) {
        int rc;
        if (batch_signal)
            return 1;
        if ((rc = kli_session_eval(b->pre, t + i, n - i < BATCH_PREFILL ? n - i : BATCH_PREFILL,
                                   NULL, err)) != KLI_OK)
            return rc;
    }
    return 0;
}

/* Searches for `pat` in s[from, n). */
static const char *
batch_find(const char *s, size_t n, size_t from, const char *pat)
{
    size_t pl = strlen(pat);

    for (size_t i = from; i + pl <= n; i++) {
        if (s[i] == pat[0] && memcmp(s + i, pat, pl) == 0)
            return s + i;
    }
    return NULL;
}

/* Takes the token sampled for slot sl, as kli_generate does: an end token or a stop string
 * finishes the record ("stop"), so do max_tokens and a full context ("length"); otherwise
 * the token is fed at the next step. */
static void
batch_take(struct batch *b, struct batch_slot *sl, kli_token t)
{
    struct batch_rec *r = sl->rec;
    size_t old = sl->text.n;

    for (int i = 0; i < 3; i++) {
        if (b->ends[i] >= 0 && t == b->ends[i]) {
            batch_finish(b, sl, "stop", NULL);
            return;
        }
    }
    kli_sampler_accept(sl->smp, t);
    sl->n_gen++;
    b->gen_tokens++;
    if (t < b->n_base) {   /* other special tokens produce no text */
        size_t len;
        const char *p = kli_token_bytes(b->tok, t, &len);
        if (p != NULL && bbuf_add(&sl->text, p, len) != 0) {
            batch_finish(b, sl, "error", "out of memory");
            return;
        }
    }
    for (int i = 0; i < r->n_stop; i++) {
        size_t sl_len = strlen(r->stop[i]);
        size_t from = old >= sl_len - 1 ? old - (sl_len - 1) : 0;
        const char *hit = batch_find(sl->text.p, sl->text.n, from, r->stop[i]);
        if (hit != NULL) {
            sl->text.n = (size_t)(hit - sl->text.p);
            batch_finish(b, sl, "stop", NULL);
            return;
        }
    }
    if (sl->n_gen >= r->max_tokens || kli_session_pos(sl->s) >= kli_session_ctx_max(sl->s)) {
        batch_finish(b, sl, "length", NULL);
        return;
    }
    sl->next = t;
}

/* Starts record r in free slot sl: the prompt after the longest cached prefix is evaluated
 * in the prefill session, whose state then moves to the slot, and the first token is
 * sampled. A record that cannot run gets its error line. *evaluated receives the number of
 * prompt tokens evaluated. @return 1 when interrupted (r is dropped, to run again next
 * time), else 0. */
static int
batch_join(struct batch *b, struct batch_slot *sl, struct batch_rec *r, int32_t *evaluated)
{
    struct kli_err err = {0};
    const struct kli_session *hit = NULL;
    double t0 = batch_now();
    int32_t have = 0, shared = 0, ctx = kli_session_ctx_max(sl->s);
    int rc;

    if (r->error != NULL) {
        batch_emit(b, r, NULL, "error", r->error);
        batch_rec_free(r);
        return 0;
    }
    if (r->n > ctx) {
        snprintf(err.msg, sizeof(err.msg), "the prompt of %d tokens does not fit the context "
                 "of %d tokens (--ctx)", (int)r->n, (int)ctx);
        batch_emit(b, r, NULL, "error", err.msg);
        batch_rec_free(r);
        return 0;
    }
    if (kli_sampler_create(&sl->smp, &r->so, kli_model_n_vocab(b->m), &err) != KLI_OK) {
        batch_emit(b, r, NULL, "error", err.msg);
        batch_rec_free(r);
        return 0;
    }
    sl->rec = r;
    sl->n_gen = 0;
    sl->text.n = 0;
    if (b->cache != NULL) {
        hit = prefix_cache_find(b->cache, r->toks, r->n, &have);
        shared = batch_shared(b, r);
    }
    if (hit != NULL) {
        rc = kli_session_copy(b->pre, hit, &err);
    } else {
        kli_session_reset(b->pre);
        rc = KLI_OK;
    }
    int32_t at = have;
    if (rc == KLI_OK && shared > have) {
        /* Leave the state at the end of the shared prefix behind for the others. */
        if ((rc = batch_prefill(b, r->toks + at, shared - at, &err)) == KLI_OK) {
            at = shared;
            struct kli_err perr = {0};
            if (prefix_cache_put(b->cache, b->pre, &perr) != 0 && !b->a->quiet)
                cli_error("prefix cache: %s", perr.msg);
        }
    }
    if (rc == KLI_OK)
        rc = batch_prefill(b, r->toks + at, r->n - at, &err);
    if (rc == KLI_OK)
        rc = kli_session_copy(sl->s, b->pre, &err);
    if (rc == 1) {   /* interrupted */
        batch_rec_free(r);
        sl->rec = NULL;
        kli_sampler_free(sl->smp);
        sl->smp = NULL;
        return 1;
    }
    *evaluated = r->n - have;
    sl->cached = have;
    sl->prefill_s = batch_now() - t0;
    sl->t_decode = batch_now();
    if (rc != KLI_OK) {
        sl->cached = 0;
        batch_finish(b, sl, "error", err.msg);
        return 0;
    }
    batch_remember(b, r);
    if (r->max_tokens == 0) {
        batch_finish(b, sl, "length", NULL);
        return 0;
    }
    batch_take(b, sl, kli_sampler_sample(sl->smp, kli_session_logits(sl->s)));
    return 0;
}

static int
batch_active(const struct batch *b)
{
    int n = 0;

    for (int i = 0; i < b->a->parallel; i++)
        n += b->slot[i].rec != NULL;
    return n;
}

/* One decode step of every active record. */
static void
batch_step(struct batch *b)
{
    struct kli_session *ss[BATCH_MAX_PARALLEL];
    kli_token tk[BATCH_MAX_PARALLEL];
    int idx[BATCH_MAX_PARALLEL], n = 0;
    struct kli_err err = {0};
    double t0 = batch_now();

    for (int i = 0; i < b->a->parallel; i++) {
        if (b->slot[i].rec != NULL) {
            ss[n] = b->slot[i].s;
            tk[n] = b->slot[i].next;
            idx[n++] = i;
        }
    }
    if (n == 0)
        return;
    if (kli_session_eval_batch(ss, tk, n, &err) != KLI_OK) {
        for (int j = 0; j < n; j++)
            batch_finish(b, &b->slot[idx[j]], "error", err.msg);
        return;
    }
    /* every sequence's sampler at once, on the workers the step itself used */
    struct kli_sampler *smp[BATCH_MAX_PARALLEL];
    const float *lg[BATCH_MAX_PARALLEL];
    for (int j = 0; j < n; j++) {
        smp[j] = b->slot[idx[j]].smp;
        lg[j] = kli_session_logits(b->slot[idx[j]].s);
    }
    if (kli_sampler_sample_many(smp, lg, n, tk, &err) != KLI_OK) {
        for (int j = 0; j < n; j++)
            batch_finish(b, &b->slot[idx[j]], "error", err.msg);
        return;
    }
    for (int j = 0; j < n; j++)
        batch_take(b, &b->slot[idx[j]], tk[j]);
    b->step_s += batch_now() - t0;
    b->step_tokens += n;
}

/* ==== setup =============================================================================== */

static int
batch_cmp_str(const void *x, const void *y)
{
    return strcmp(*(char *const *)x, *(char *const *)y);
}

/* The key of saved prefix states: the model's fingerprint (configuration, tensor shapes and
 * dtypes) and, since that does not cover the weight values, the sizes of the weight files
 * and three 4 KiB samples of each, so that another checkpoint of the same shape never
 * reuses a state. */
static uint64_t
batch_model_key(const char *dir, const struct kli_model *m)
{
    uint64_t fp = kli_model_fingerprint(m), h = batch_fnv(BATCH_FNV_BASIS, &fp, sizeof(fp));
    char *names[256], path[4096], buf[4096];
    int n = 0;
    DIR *d = opendir(dir);
    struct dirent *de;

    if (d == NULL)
        return h;
    while ((de = readdir(d)) != NULL && n < 256) {
        size_t l = strlen(de->d_name);
        if (l > 12 && strcmp(de->d_name + l - 12, ".safetensors") == 0 &&
            (names[n] = strdup(de->d_name)) != NULL)
            n++;
    }
    closedir(d);
    qsort(names, (size_t)n, sizeof(names[0]), batch_cmp_str);
    for (int i = 0; i < n; i++) {
        uint64_t size;
        int fd;
        h = batch_fnv(h, names[i], strlen(names[i]));
        /* Only regular files count: a FIFO by that name must not block (kli_file_open). */
        if (snprintf(path, sizeof(path), "%s/%s", dir, names[i]) < (int)sizeof(path) &&
            (fd = kli_file_open(path, &size, NULL)) >= 0) {
            int64_t sz = (int64_t)size;
            int64_t at[3] = {sz / 3, 2 * sz / 3, sz - (int64_t)sizeof(buf)};
            h = batch_fnv(h, &sz, sizeof(sz));
            for (int k = 0; k < 3; k++) {
                ssize_t r = pread(fd, buf, sizeof(buf), at[k] > 0 ? (off_t)at[k] : 0);
                if (r > 0)
                    h = batch_fnv(h, buf, (size_t)r);
            }
            close(fd);
        }
        free(names[i]);
    }
    return h;
}

/* Opens the output: appending after the records already there, unless --overwrite. A
 * regular file stays locked (flock) while the batch runs, so that a second batch writing it
 * refuses instead of running every record again beside this one; the lock is taken before
 * the file is read or truncated. */
static int
batch_open_output(const struct batch_args *a, struct batch_idset *done)
{
    struct kli_err err = {0};
    struct stat st;
    int fd;

    if (strcmp(a->output, "-") == 0)
        return STDOUT_FILENO;
    if ((strcmp(a->input, "-") != 0 && kli_output_check(a->output, a->input, &err) != KLI_OK) ||
        (a->model != NULL && kli_output_check(a->output, a->model, &err) != KLI_OK)) {
        cli_error("batch: %s", err.msg);
        return -1;
    }
    if ((fd = open(a->output, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0666)) < 0) {
        cli_error("%s: %s", a->output, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        return fd;   /* a terminal, pipe or device: nothing to lock, read or truncate */
    if (flock(fd, LOCK_EX | LOCK_NB) != 0 && errno != ENOLCK && errno != EOPNOTSUPP &&
        errno != ENOSYS) {   /* a file system without locks: go on without one */
        if (errno == EWOULDBLOCK)
            cli_error("%s: another process (a kli batch?) is writing it; wait for it to end, "
                      "or split one job with --shard K/N and one output per shard", a->output);
        else
            cli_error("%s: cannot lock: %s", a->output, strerror(errno));
        close(fd);
        return -1;
    }
    if (a->overwrite ? ftruncate(fd, 0) != 0 : batch_output_scan(a->output, done, a->quiet) != 0) {
        if (a->overwrite)
            cli_error("%s: %s", a->output, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* The exit status for a batch that wrote every line: 3 when more records failed (in this
 * run and in the earlier runs the output holds) than --max-errors allows. */
static int
batch_status(const struct batch *b)
{
    int64_t failed = b->errors + b->in.n_done_errors;

    if (failed <= b->a->max_errors)
        return 0;
    fprintf(stderr, "kli: %s: %lld record%s failed (see their \"error\"); --max-errors %ld "
            "tolerates more\n", b->a->output, (long long)failed, failed == 1 ? "" : "s",
            b->a->max_errors);
    return 3;
}

static int
batch_sessions(struct batch *b, struct kli_err *err)
{
    struct kli_session_options o;

    kli_session_options_init(&o);
    o.ctx_max = (int32_t)b->a->ctx;
    o.batch_max = BATCH_PREFILL;
    if (kli_session_create(&b->pre, b->m, &o, err) != KLI_OK)
        return -1;
    o.batch_max = (int32_t)b->a->parallel;
    for (int i = 0; i < b->a->parallel; i++) {
        if (kli_session_create(&b->slot[i].s, b->m, &o, err) != KLI_OK)
            return -1;
    }
    return 0;
}

/* ==== kli batch =========================================================================== */

static int
cmd_batch(int argc, char **argv)
{
    struct batch_args a;
    struct batch b;
    struct batch_idset *done = NULL;
    struct batch_select sel;
    struct kli_model *model = NULL;
    struct kli_err err = {0};
    struct sigaction sa;
    int pr, rc = 1;

    if ((pr = batch_parse(argc, argv, &a)) != 0)
        return pr > 0 ? 0 : 2;
    memset(&b, 0, sizeof(b));
    b.a = &a;
    b.fd = -1;
    b.tty = isatty(STDERR_FILENO);
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = batch_on_signal;   /* no SA_RESTART: write() is retried on EINTR */
    /* The first SIGINT or SIGTERM ends the batch after whole lines; should kli be stuck
     * somewhere that does not look at the flag, a second one ends it at once. */
    sa.sa_flags = SA_RESETHAND;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    if ((done = batch_idset_create()) == NULL) {
        cli_error("out of memory");
        goto out;
    }
    if ((b.fd = batch_open_output(&a, done)) < 0)
        goto out;
    sel.max_line = (int64_t)a.max_prompt_bytes * 2 + 65536;
    sel.shard_k = (int32_t)a.shard_k;
    sel.shard_n = (int32_t)a.shard_n;
    sel.done = done;
    if (batch_input_open(&b.in, a.input, &sel) != 0) {
        if (batch_signal)   /* stopped while reading the input */
            rc = 128 + (int)batch_signal;
        goto out;
    }
    if (!a.quiet) {
        fprintf(stderr, "batch: %lld records to run", (long long)b.in.n_items);
        if (b.in.n_done > 0)
            fprintf(stderr, ", %lld already in %s", (long long)b.in.n_done, a.output);
        if (a.shard_n > 1)
            fprintf(stderr, ", %lld in other shards (shard %ld/%ld)",
                    (long long)b.in.n_other_shards, a.shard_k, a.shard_n);
        fprintf(stderr, "\n");
    }
    if (b.in.n_items == 0) {
        rc = batch_status(&b);
        goto out;
    }

    const char *path = a.model;
    if (path == NULL) {
        if (cli_demo_dir(a.demo, sizeof(a.demo)) != 0)
            goto out;
        path = a.demo;
    }
    if (cli_open_model(path, cli_threads(a.threads), &model) != 0)
        goto out;
    b.m = model;
    if ((b.tok = kli_model_tokenizer(model)) == NULL) {
        cli_error("%s: no tokenizer (tiktoken.model) in the model directory", path);
        goto out;
    }
    b.ends[0] = kli_model_eos(model);
    b.ends[1] = kli_tokenizer_find_special(b.tok, "<|im_end|>");
    b.ends[2] = kli_tokenizer_find_special(b.tok, "[EOS]");
    b.n_base = kli_tokenizer_n_base(b.tok);
    b.dflt.so = a.so;
    b.dflt.max_tokens = (int32_t)a.max_tokens;
    b.dflt.stop = a.stop;
    b.dflt.n_stop = a.n_stop;
    b.dflt.system = a.system;
    b.dflt.raw = a.raw;
    b.dflt.max_prompt_bytes = (int64_t)a.max_prompt_bytes;
    b.cap_ahead = a.parallel > 8 ? (int)a.parallel : 8;
    b.slot = calloc((size_t)a.parallel, sizeof(*b.slot));
    b.ahead = calloc((size_t)b.cap_ahead, sizeof(*b.ahead));
    if (b.slot == NULL || b.ahead == NULL) {
        cli_error("out of memory");
        goto out;
    }
    if (batch_sessions(&b, &err) != 0) {
        cli_error("%s", err.msg);
        goto out;
    }
    if ((a.prefix_bytes > 0 || a.prefix_dir != NULL) &&
        prefix_cache_create(&b.cache, model, a.prefix_bytes, a.prefix_dir,
                            batch_model_key(path, model), &err) != 0) {
        cli_error("--prefix-dir: %s", err.msg);
        goto out;
    }

    /* The loop: fill free slots, then one decode step for all. A fill round ends early once
     * the records it started have evaluated BATCH_JOIN_TOKENS prompt tokens while some record
     * is ready to decode: long prompts then join one or two per step, rather than stalling
     * the running records (and holding back every line) until all the slots are full. */
    b.t0 = b.last = batch_now();
    while (!batch_signal && !b.io_failed) {
        int active = 0;
        int64_t spent = 0;
        for (int i = 0; i < a.parallel && !batch_signal && !b.io_failed; i++) {
            while (b.slot[i].rec == NULL && !batch_signal && !b.io_failed &&
                   (spent < BATCH_JOIN_TOKENS || batch_active(&b) == 0)) {
                struct batch_rec *r = batch_next(&b);
                int32_t ev = 0;
                if (r == NULL || batch_join(&b, &b.slot[i], r, &ev) != 0)
                    break;
                spent += ev;
            }
            active += b.slot[i].rec != NULL;
        }
        if (active == 0 || batch_signal || b.io_failed)
            break;
        batch_step(&b);
        batch_progress(&b, 0);
    }
    batch_progress(&b, 1);
    if (b.fd != STDOUT_FILENO && fsync(b.fd) != 0 && errno != EINVAL) {
        cli_error("%s: %s", a.output, strerror(errno));
        b.io_failed = 1;
    }
    batch_summary(&b);
    if (b.io_failed) {
        rc = 1;
    } else if (batch_signal) {
        fprintf(stderr, "kli: interrupted: %lld of %lld records written; run the same command "
                "again to do the rest\n", (long long)b.done, (long long)b.in.n_items);
        rc = 128 + (int)batch_signal;
    } else {
        rc = batch_status(&b);
    }
out:
    if (b.slot != NULL) {
        for (int i = 0; i < a.parallel; i++) {
            batch_rec_free(b.slot[i].rec);
            kli_sampler_free(b.slot[i].smp);
            kli_session_free(b.slot[i].s);
            free(b.slot[i].text.p);
        }
    }
    for (int i = 0; i < b.n_ahead; i++)
        batch_rec_free(b.ahead[i]);
    for (int i = 0; i < BATCH_RECENT; i++)
        free(b.recent[i]);
    free(b.ahead);
    free(b.slot);
    prefix_cache_free(b.cache);
    kli_session_free(b.pre);
    cli_cache_report(model);
    kli_model_close(model);
    batch_input_close(&b.in);
    batch_idset_free(done);
    if (b.fd > STDOUT_FILENO && close(b.fd) != 0 && rc == 0) {
        cli_error("%s: %s", a.output, strerror(errno));
        rc = 1;
    }
    cli_demo_remove(a.demo);
    return rc;
}

const struct cli_command cli_batch_commands[] = {
    {"batch", cmd_batch, "run the records of a JSONL file, many at a time (resumable)"},
    {NULL, NULL, NULL},
};
