/*
 * cli_batch.c - kli batch: the records of a JSONL file through one model, many at a time.
 *
 * Scheduling and prefix reuse are the library's (kli_sched_*, src/sched.c): up to
 * --parallel records decode together, joining and leaving at any step, and a record that
 * shares at least --min-prefix leading tokens with another starts from the kept state of
 * that prefix. This file keeps the scheduler's queue filled with the next records of the
 * input (the waiting ones are what it searches for shared prefixes, so sixteen questions
 * about one document evaluate the document once), writes each record's line when the
 * scheduler reports its end, and shows progress.
 *
 * Output and interruption. A line is built whole and written with one write(2) on a file
 * opened O_APPEND, so the output only ever holds complete lines. SIGINT and SIGTERM set a
 * flag that is checked between decode steps and between the 256-token pieces of a prefill:
 * the records still running are dropped (a rerun redoes them) and kli exits 128 + signal.
 */
#include "config.h"

#include <cjson/cJSON.h>
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
#include "cli_toolcall.h"
#include "util.h"

#define BATCH_MAX_PARALLEL 256
#define BATCH_MAX_SCHEMAS 64     /* distinct response_format schemas in one run */

/* ==== options ============================================================================= */

enum {
    OPT_PREFIX_CACHE = 256, OPT_PREFIX_DIR, OPT_MIN_PREFIX, OPT_SHARD, OPT_RESUME,
    OPT_OVERWRITE, OPT_MAX_PROMPT, OPT_MAX_ERRORS,
};

struct batch_args {
    struct cli_args ca;           /* -m, --help, the demo model */
    struct cli_gen_opts g;        /* the options batch shares with run */
    const char *input, *output, *prefix_dir;
    long parallel, min_prefix, shard_k, shard_n;
    long max_errors;              /* failed records tolerated before exit status 3 */
    uint64_t prefix_bytes, max_prompt_bytes;
    int overwrite;
};

static const struct option batch_opts[] = {
    CLI_GEN_LONGOPTS,
    CLI_GEN_RAW_LONGOPT,
    {"input", required_argument, NULL, 'i'},
    {"output", required_argument, NULL, 'o'},
    {"parallel", required_argument, NULL, 'P'},
    {"prefix-cache", required_argument, NULL, OPT_PREFIX_CACHE},
    {"prefix-dir", required_argument, NULL, OPT_PREFIX_DIR},
    {"min-prefix", required_argument, NULL, OPT_MIN_PREFIX},
    {"shard", required_argument, NULL, OPT_SHARD},
    {"resume", no_argument, NULL, OPT_RESUME},
    {"overwrite", no_argument, NULL, OPT_OVERWRITE},
    {"max-prompt-bytes", required_argument, NULL, OPT_MAX_PROMPT},
    {"max-errors", required_argument, NULL, OPT_MAX_ERRORS},
    CLI_HELP_LONGOPT,
    CLI_LONGOPTS_END,
};

static const char batch_usage[] =
    "usage: kli batch [-m|--model MODEL] -i|--input IN.jsonl -o|--output OUT.jsonl\n"
    "                 [-P|--parallel N] [-n|--max-tokens MAX] [--stop STR]...\n"
    "                 [-s|--system SYSTEM] [--raw] [--ctx N] [--cache-type T]\n"
    "                 [--shard K/N]\n"
    "                 [--resume | --overwrite] [--prefix-cache SIZE] [--prefix-dir DIR]\n"
    "                 [--min-prefix N] [--max-prompt-bytes SIZE] [--max-errors N] [--quiet]\n"
    "                 [-h|--help]\n"
    CLI_JSON_HELP CLI_SAMPLING_HELP CLI_PLACEMENT_HELP CLI_GPU_HELP
    "Each input line is a JSON object: {\"id\": ..., \"prompt\": ... | \"messages\": [...],\n"
    "optional \"max_tokens\", \"temperature\", \"top_p\", \"top_k\", \"min_p\", \"seed\", "
    "\"stop\",\n\"response_format\", \"tools\", \"tool_choice\", \"logprobs\", \"top_logprobs\", ...}.\n"
    "OpenAI Batch lines ({\"custom_id\", \"method\", \"url\", \"body\"}) get OpenAI's output.\n"
    "Each output line: id, text, prompt_tokens, completion_tokens, cached_tokens,\n"
    "finish_reason, prefill_ms, decode_ms (and tool_calls, error, logprobs).\n"
    "Exit status 3: more than --max-errors N (default 0) records failed. See kli(1).\n";

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
    cli_gen_init(&a->g);
    a->parallel = 8;
    a->min_prefix = 64;
    a->shard_k = a->shard_n = 1;
    a->prefix_bytes = 1ULL << 30;
    a->max_prompt_bytes = 4ULL << 20;
    const struct cli_int_opt ints[] = {
        {'P', "--parallel", 1, BATCH_MAX_PARALLEL, &a->parallel},
        {OPT_MIN_PREFIX, "--min-prefix", 1, 1 << 30, &a->min_prefix},
        {OPT_MAX_ERRORS, "--max-errors", 0, INT32_MAX, &a->max_errors},
    };
    a->ca.usage = batch_usage;
    a->ca.gen = &a->g;
    a->ca.ints = ints;
    a->ca.n_ints = 3;
    while ((c = cli_getopt(argc, argv, "m:i:o:P:n:t:s:h", batch_opts, &a->ca)) > 0) {
        switch (c) {
        case 'i': a->input = optarg; break;
        case 'o': a->output = optarg; break;
        case OPT_PREFIX_CACHE:
            if (batch_size(optarg, "--prefix-cache", 1ULL << 50, &a->prefix_bytes))
                return -1;
            break;
        case OPT_PREFIX_DIR: a->prefix_dir = optarg; break;
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
        case OPT_RESUME: a->overwrite = 0; break;
        case OPT_OVERWRITE: a->overwrite = 1; break;
        }
    }
    a->ca.ints = NULL;   /* the table above ends with this function */
    if (c != CLI_ARGS_END)
        return c == CLI_ARGS_HELP ? 1 : -1;
    if (cli_no_operands(argc, argv, "batch") != 0)
        return -1;
    if (a->input == NULL || a->output == NULL) {
        cli_error("batch: -i IN.jsonl and -o OUT.jsonl are required");
        return -1;
    }
    if (a->max_prompt_bytes == 0) {
        cli_error("--max-prompt-bytes: must be at least 1");
        return -1;
    }
    return cli_gen_check(&a->g);
}

/* ==== state =============================================================================== */

struct batch {
    const struct batch_args *a;
    struct batch_input in;
    struct batch_defaults dflt;
    const struct kli_tokenizer *tok;
    struct kli_sched *sched;
    int64_t next_item;            /* the next input item to prepare */
    int cap_ahead;                /* records kept waiting in the scheduler */
    int fd;                       /* the output */
    int io_failed;
    int64_t done, errors, prompt_tokens, cached_tokens, gen_tokens;
    double t0, last;
    int tty;
    const char *model_name;       /* "model" of OpenAI output lines: the model's file name */
    struct kli_grammar *gram;     /* --json / --json-schema, or NULL */
    struct kli_grammar *gram_object;   /* response_format json_object, made when asked */
    /* response_format json_schema: the grammars of the distinct schemas met, kept for the
     * whole run (the scheduler's requests borrow them) */
    char *schema_key[BATCH_MAX_SCHEMAS];
    struct kli_grammar *schema_gram[BATCH_MAX_SCHEMAS];
    int n_schemas;
};

static volatile sig_atomic_t batch_signal;

/* The grammar of record r (NULL: none). A schema that does not compile, or one too many,
 * fails the record: its message goes to msg (cap bytes) and *fail. @return 0, or -1 when
 * out of memory. */
static int
batch_grammar(struct batch *b, const struct batch_rec *r, const struct kli_grammar **out,
              char *msg, size_t cap, const char **fail)
{
    struct kli_grammar *g = NULL;

    *out = NULL;
    switch (r->format) {
    case BATCH_FMT_DEFAULT:
        *out = b->gram;
        return 0;
    case BATCH_FMT_TEXT:
        return 0;
    case BATCH_FMT_OBJECT:
        if (b->gram_object == NULL &&
            oai_grammar(&b->gram_object, b->tok, OAI_FMT_OBJECT, NULL, NULL, msg, cap) != 0)
            return -1;
        *out = b->gram_object;
        return 0;
    default:
        break;
    }
    for (int i = 0; i < b->n_schemas; i++) {
        if (strcmp(b->schema_key[i], r->schema) == 0) {
            *out = b->schema_gram[i];
            return 0;
        }
    }
    if (b->n_schemas == BATCH_MAX_SCHEMAS) {
        snprintf(msg, cap, "\"response_format\": more than %d distinct schemas in one run",
                 BATCH_MAX_SCHEMAS);
        *fail = msg;
        return 0;
    }
    /* a forced tool call's schema is its function's parameters (rec_tools) */
    int rc = oai_grammar(&g, b->tok, OAI_FMT_SCHEMA, r->schema,
                         r->tools != NULL && r->tools->forced != NULL ? "tools" : NULL, msg,
                         cap);
    if (rc < 0)
        return -1;
    if (rc > 0) {
        *fail = msg;
        return 0;
    }
    if ((b->schema_key[b->n_schemas] = strdup(r->schema)) == NULL) {
        kli_grammar_free(g);
        return -1;
    }
    b->schema_gram[b->n_schemas++] = g;
    *out = g;
    return 0;
}

static void
batch_on_signal(int sig)
{
    batch_signal = sig;
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
static int batch_tool_answer(struct batch_item *it, struct kli_sched_result *res,
                             char **content, cJSON **calls, const char **reason);

/* ,"tool_calls":[...] when there are calls. @return 0, or non-zero when out of memory. */
static int
batch_calls_json(struct bbuf *l, const cJSON *calls)
{
    char *p;
    int bad;

    if (calls == NULL)
        return 0;
    if ((p = cJSON_PrintUnformatted(calls)) == NULL)
        return -1;
    bad = bbuf_add(l, ",\"tool_calls\":", 14) | bbuf_add(l, p, strlen(p));
    free(p);
    return bad;
}

/* The output line of an OpenAI Batch record: OpenAI's Batch output format, the body a
 * chat.completion or a text_completion object with its usage, or an error (a status of 400
 * for a record that is refused, 500 for one that failed while it ran). @return 0, or
 * non-zero when out of memory. */
static int
batch_openai_line(const struct batch *b, const struct batch_item *it,
                  const struct kli_sched_result *res, const char *reason, const cJSON *calls,
                  const struct lp_list *lp, struct bbuf *l)
{
    int chat = it->api == BATCH_API_CHAT, bad = 0;

    bad |= bbuf_addf(l, "{\"id\":\"batch_req_%d\",\"custom_id\":", (int)it->line);
    bad |= bbuf_json_str(l, it->id, strlen(it->id));
    if (res->error != NULL) {
        bad |= bbuf_addf(l, ",\"response\":{\"status_code\":%d,\"request_id\":\"req_%d\","
                         "\"body\":null},\"error\":{\"code\":\"%s\",\"message\":",
                         res->started ? 500 : 400, (int)it->line,
                         res->started ? "server_error" : "invalid_request");
        bad |= bbuf_json_str(l, res->error, strlen(res->error));
        return bad | bbuf_add(l, "}}\n", 3);
    }
    bad |= bbuf_addf(l, ",\"response\":{\"status_code\":200,\"request_id\":\"req_%d\","
                     "\"body\":{\"id\":\"%s-%d\",\"object\":\"%s\",\"created\":%lld,"
                     "\"model\":", (int)it->line, chat ? "chatcmpl" : "cmpl", (int)it->line,
                     chat ? "chat.completion" : "text_completion", (long long)time(NULL));
    bad |= bbuf_json_str(l, b->model_name, strlen(b->model_name));
    const char *choice = chat ? ",\"choices\":[{\"index\":0,\"message\":{\"role\":"
                                "\"assistant\",\"content\":"
                              : ",\"choices\":[{\"index\":0,\"text\":";
    bad |= bbuf_add(l, choice, strlen(choice));
    if (calls != NULL && res->len == 0)
        bad |= bbuf_add(l, "null", 4);
    else
        bad |= bbuf_json_text(l, res->text, res->len);
    bad |= batch_calls_json(l, calls);
    bad |= bbuf_addf(l, "%s,\"logprobs\":", chat ? "}" : "");
    if (lp == NULL)
        bad |= bbuf_add(l, "null", 4);
    else if (chat)
        bad |= lp_chat_json(l, b->tok, lp->v, lp->n);
    else
        bad |= lp_compl_json(l, b->tok, lp->v, lp->n, 0);
    bad |= bbuf_addf(l, ",\"finish_reason\":\"%s\"}],\"usage\":{"
                     "\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d,"
                     "\"prompt_tokens_details\":{\"cached_tokens\":%d}}}},\"error\":null}\n",
                     reason, (int)res->n_prompt, (int)res->n_generated,
                     (int)(res->n_prompt + res->n_generated), (int)res->n_cached);
    return bad;
}

/* Writes the line of the record a request was made for, when the scheduler ends it. */
static void
batch_on_finish(void *ud, const struct kli_sched_result *res)
{
    struct batch *b = ud;
    struct batch_item *it = res->user;
    struct kli_sched_result rr = *res;
    struct bbuf l = {NULL, 0, 0};
    const char *id = it->id, *reason;
    struct lp_list *lp = it->lp;   /* taken from the item, freed below */
    char *content = NULL;
    cJSON *calls = NULL;
    int bad = 0;

    it->lp = NULL;
    if (res->finish == KLI_FINISH_INTERRUPT && it->tools != NULL && it->tools->first_done)
        rr.finish = KLI_FINISH_EOS;   /* cancelled at the end of its one tool call */
    else if (res->finish == KLI_FINISH_INTERRUPT) {   /* stopped: no line, a rerun redoes it */
        batch_tools_free(it->tools);
        it->tools = NULL;
        goto out;
    }
    reason = res->finish == KLI_FINISH_LENGTH ? "length"
             : res->finish == KLI_FINISH_ERROR ? "error" : "stop";
    bad = batch_tool_answer(it, &rr, &content, &calls, &reason);
    res = &rr;
    if (it->api != BATCH_API_KLI) {
        bad |= batch_openai_line(b, it, res, reason, calls, lp, &l);
        goto write;
    }
    bad |= bbuf_add(&l, "{\"id\":", 6);
    bad |= bbuf_json_str(&l, id, strlen(id));
    bad |= bbuf_add(&l, ",\"text\":", 8);
    bad |= bbuf_json_text(&l, res->text, res->len);
    bad |= batch_calls_json(&l, calls);
    bad |= bbuf_addf(&l, ",\"prompt_tokens\":%d,\"completion_tokens\":%d,\"cached_tokens\":%d,"
                     "\"finish_reason\":\"%s\",\"prefill_ms\":%.1f,\"decode_ms\":%.1f",
                     (int)res->n_prompt, (int)res->n_generated, (int)res->n_cached, reason,
                     1e3 * res->prefill_seconds, 1e3 * res->decode_seconds);
    if (res->error != NULL) {
        bad |= bbuf_add(&l, ",\"error\":", 9);
        bad |= bbuf_json_str(&l, res->error, strlen(res->error));
    } else if (lp != NULL) {
        bad |= bbuf_add(&l, ",\"logprobs\":", 12);
        bad |= lp_chat_json(&l, b->tok, lp->v, lp->n);
    }
    bad |= bbuf_add(&l, "}\n", 2);
write:
    if (bad) {
        cli_error("out of memory writing the line of %s", id);
        b->io_failed = 1;
    } else {
        batch_write(b, l.p, l.n);
    }
    free(l.p);
    free(content);
    cJSON_Delete(calls);
    batch_tools_free(it->tools);
    it->tools = NULL;
    b->done++;
    b->errors += res->error != NULL;
    if (res->started) {
        b->prompt_tokens += res->n_prompt;
        b->cached_tokens += res->n_cached;
    }
    batch_progress(b, 0);
out:
    lp_list_free(lp);
    free(lp);
}

static void
batch_on_token(void *ud, const struct kli_sched_token *t)
{
    struct batch *b = ud;
    const struct batch_item *it = t->user;
    struct batch_tools *tl = it->tools;

    b->gen_tokens++;
    if (t->lp != NULL && it->lp != NULL && lp_list_add(it->lp, t->lp) != 0) {
        cli_error("out of memory");
        b->io_failed = 1;
    }
    if (tl != NULL && !tl->first_done) {   /* the answer is read for calls: special tokens
                                            * by name */
        size_t len = t->len;
        const char *p = len > 0 ? t->text : kli_token_bytes(b->tok, t->token, &len);
        if (t->len == 0 && !tc_marker(p, len))
            len = 0;   /* special tokens but the tool-call markers give no text */
        /* parallel_tool_calls false: the first call is the answer, so it ends here (the
         * section closed) rather than generating calls that would be dropped */
        int ended = tl->one_call && t->len == 0 && tc_first_call_end(tl->acc, tl->n, p, len);
        if (p != NULL && util_text_add(&tl->acc, &tl->n, &tl->cap, p, len) != 0) {
            cli_error("out of memory");
            b->io_failed = 1;
        }
        if (ended) {
            tl->first_done = 1;
            if (util_text_add(&tl->acc, &tl->n, &tl->cap, TC_SECTION_END,
                              strlen(TC_SECTION_END)) != 0) {
                cli_error("out of memory");
                b->io_failed = 1;
            }
            kli_sched_cancel(b->sched, t->id);
        }
    }
}

/* A record with tools: res's text becomes the content read from the answer, *calls its
 * tool calls (NULL: none), *reason "tool_calls" when there are some. @return 0, or -1 when
 * out of memory. */
static int
batch_tool_answer(struct batch_item *it, struct kli_sched_result *res, char **content,
                  cJSON **calls, const char **reason)
{
    struct batch_tools *tl = it->tools;
    char msg[256];
    int rc;

    *content = NULL;
    *calls = NULL;
    if (tl == NULL || res->error != NULL)
        return 0;
    rc = tc_answer(tl->acc != NULL ? tl->acc : "", tl->n, (const char *const *)tl->stop,
                   tl->n_stop, tl->tools, tl->forced, content, calls, msg, sizeof(msg),
                   cli_utf8_seq);
    if (rc < 0)
        return -1;
    if (tl->one_call)
        tc_keep_first(*calls);
    res->text = *content;
    res->len = strlen(*content);
    if (*calls != NULL)
        *reason = "tool_calls";
    return 0;
}

static void
batch_on_notice(void *ud, const char *msg)
{
    if (!((struct batch *)ud)->a->g.quiet)
        cli_error("prefix cache: %s", msg);
}

static int
batch_should_stop(void *ud)
{
    return batch_signal != 0 || ((struct batch *)ud)->io_failed;
}

/* Keeps up to --parallel (at least 8) records waiting in the scheduler, prepared, for
 * finding shared prefixes. */
static void
batch_on_need(void *ud, struct kli_sched *sched)
{
    struct batch *b = ud;
    struct kli_err err = {0};

    while (!b->io_failed && kli_sched_waiting(sched) < b->cap_ahead &&
           b->next_item < b->in.n_items) {
        struct batch_item *it = &b->in.items[b->next_item];
        struct batch_rec r;
        struct kli_sched_request q;
        char msg[600];
        int rc = batch_rec_prepare(&r, &b->in, it, b->tok, &b->dflt);
        kli_sched_request_init(&q);
        if (rc == 0) {
            q.prompt = r.toks;
            q.n_prompt = r.n;
            q.so = r.so;
            q.max_tokens = r.max_tokens;
            q.stop = r.stop;
            q.n_stop = r.n_stop;
            q.fail = r.error;
            q.user = it;
            q.logprobs = r.logprobs;
            if (r.error == NULL)
                rc = batch_grammar(b, &r, &q.grammar, msg, sizeof(msg), &q.fail);
            if (rc == 0 && q.fail == NULL) {   /* the item reads its answer for calls */
                it->tools = r.tools;
                r.tools = NULL;
            }
            if (rc == 0)
                rc = kli_sched_submit(sched, &q, NULL, &err) == KLI_OK ? 0 : -1;
            if (rc == 0 && r.error == NULL && r.logprobs >= 0 &&
                (it->lp = calloc(1, sizeof(*it->lp))) == NULL)
                rc = -1;
            batch_rec_clear(&r);
        }
        if (rc != 0) {
            cli_error("out of memory");
            b->io_failed = 1;
            return;
        }
        b->next_item++;
    }
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
    double t = util_now_s(), el = t - b->t0;
    double rate = el > 0 ? (double)b->gen_tokens / el : 0;
    char eta[32];

    if (b->a->g.quiet || (!final && t - b->last < (b->tty ? 0.2 : 10.0)))
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
    double el = util_now_s() - b->t0;
    struct kli_sched_stats st;

    if (b->a->g.quiet)
        return;
    kli_sched_stats(b->sched, &st);
    fprintf(stderr, "batch: %lld records written (%lld errors) in %.1f s | prompt %lld tokens, "
            "%lld from the prefix cache | generated %lld tokens, %.1f tok/s overall, %.1f "
            "tok/s in decode steps\n", (long long)b->done, (long long)b->errors, el,
            (long long)b->prompt_tokens, (long long)b->cached_tokens,
            (long long)b->gen_tokens, el > 0 ? (double)b->gen_tokens / el : 0.0,
            st.step_seconds > 0 ? (double)st.step_tokens / st.step_seconds : 0.0);
    if (b->sched != NULL && (b->a->prefix_bytes > 0 || b->a->prefix_dir != NULL)) {
        fprintf(stderr, "batch: prefix cache: %lld prefixes stored, %lld in memory (%.1f MiB), "
                "%lld evicted", (long long)st.prefix.stored, (long long)st.prefix.entries,
                (double)st.prefix.bytes / 1048576.0, (long long)st.prefix.evicted);
        if (b->a->prefix_dir != NULL)
            fprintf(stderr, ", %lld loaded from and %lld saved to %s (%lld failures)",
                    (long long)st.prefix.disk_loads, (long long)st.prefix.disk_saves,
                    b->a->prefix_dir, (long long)st.prefix.disk_errors);
        fputc('\n', stderr);
    }
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
uint64_t
cli_model_key(const char *dir, const struct kli_model *m)
{
    uint64_t fp = kli_model_fingerprint(m), h = util_fnv1a(UTIL_FNV_BASIS, &fp, sizeof(fp));
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
        h = util_fnv1a(h, names[i], strlen(names[i]));
        /* Only regular files count: a FIFO by that name must not block (kli_file_open). */
        if (snprintf(path, sizeof(path), "%s/%s", dir, names[i]) < (int)sizeof(path) &&
            (fd = kli_file_open(path, &size, NULL)) >= 0) {
            int64_t sz = (int64_t)size;
            int64_t at[3] = {sz / 3, 2 * sz / 3, sz - (int64_t)sizeof(buf)};
            h = util_fnv1a(h, &sz, sizeof(sz));
            for (int k = 0; k < 3; k++) {
                ssize_t r = pread(fd, buf, sizeof(buf), at[k] > 0 ? (off_t)at[k] : 0);
                if (r > 0)
                    h = util_fnv1a(h, buf, (size_t)r);
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
        (a->ca.model != NULL && kli_output_check(a->output, a->ca.model, &err) != KLI_OK) ||
        (a->g.json_schema != NULL &&
         kli_output_check(a->output, a->g.json_schema, &err) != KLI_OK)) {
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
    if (a->overwrite ? ftruncate(fd, 0) != 0
                     : batch_output_scan(a->output, done, a->g.quiet) != 0) {
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
    struct kli_sched_options so;
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
    if (!a.g.quiet) {
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

    const char *path = cli_model_path(a.ca.model, a.ca.demo, sizeof(a.ca.demo));
    if (path == NULL)
        goto out;
    if (cli_open_model(path, cli_threads(a.g.threads), &model) != 0)
        goto out;
    if ((b.tok = kli_model_tokenizer(model)) == NULL) {
        cli_error("%s: no tokenizer (tiktoken.model) in the model directory", path);
        goto out;
    }
    /* every place and the prefill session may fill its context */
    if (a.g.ctx > 0 && cli_ctx_fits(model, a.g.cache_type, a.g.ctx * (a.parallel + 1)) != 0)
        goto out;
    b.dflt.so = a.g.so;
    b.dflt.max_tokens = (int32_t)a.g.max_tokens;
    b.dflt.stop = a.g.stop;
    b.dflt.n_stop = a.g.n_stop;
    b.dflt.system = a.g.system;
    b.dflt.raw = a.g.raw;
    b.dflt.max_prompt_bytes = (int64_t)a.max_prompt_bytes;
    b.model_name = strrchr(path, '/') != NULL && strrchr(path, '/')[1] != '\0'
                   ? strrchr(path, '/') + 1 : path;
    if (cli_gen_grammar(&a.g, b.tok, &b.gram) != 0)
        goto out;
    b.cap_ahead = a.parallel > 8 ? (int)a.parallel : 8;
    kli_sched_options_init(&so);
    so.parallel = (int32_t)a.parallel;
    so.ctx_max = (int32_t)a.g.ctx;
    so.cache_type = a.g.cache_type;
    so.min_prefix = (int32_t)a.min_prefix;
    so.prefix_bytes = a.prefix_bytes;
    so.prefix_dir = a.prefix_dir;
    if (a.prefix_dir != NULL)
        so.prefix_key = cli_model_key(path, model);
    so.ud = &b;
    so.on_token = batch_on_token;
    so.on_finish = batch_on_finish;
    so.on_need = batch_on_need;
    so.should_stop = batch_should_stop;
    so.on_notice = batch_on_notice;
    if (kli_sched_create(&b.sched, model, &so, &err) != KLI_OK) {
        cli_error(err.code == KLI_E_IO ? "--prefix-dir: %s" : "%s", err.msg);
        goto out;
    }

    /* The loop: the scheduler admits records and decodes a token of each, until every
     * record has its line or a signal or a write error stops it. */
    b.t0 = b.last = util_now_s();
    while (!batch_signal && !b.io_failed) {
        if (kli_sched_step(b.sched) <= 0)
            break;
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
    kli_sched_free(b.sched);   /* the records still held end without a line */
    kli_grammar_free(b.gram);
    kli_grammar_free(b.gram_object);
    for (int i = 0; i < b.n_schemas; i++) {
        kli_grammar_free(b.schema_gram[i]);
        free(b.schema_key[i]);
    }
    cli_cache_report(model);
    kli_model_close(model);
    batch_input_close(&b.in);
    batch_idset_free(done);
    if (b.fd > STDOUT_FILENO && close(b.fd) != 0 && rc == 0) {
        cli_error("%s: %s", a.output, strerror(errno));
        rc = 1;
    }
    cli_demo_remove(a.ca.demo);
    return rc;
}

const struct cli_command cli_batch_commands[] = {
    {"batch", cmd_batch, "run the records of a JSONL file, many at a time (resumable)"},
    {NULL, NULL, NULL},
};
