/*
 * serve.c - kli serve: an OpenAI-compatible HTTP server on the library's scheduler.
 *
 * Threads. libmicrohttpd runs one thread per connection (MHD_USE_THREAD_PER_CONNECTION):
 * it parses HTTP, and our handler checks and tokenizes a request (serve_req.c), puts it in
 * the inbox and waits for it. One thread of our own drives the scheduler (kli_sched_*,
 * src/sched.c, which is not thread-safe): it submits what the inbox holds, passes on
 * cancellations, and runs kli_sched_step while anything waits or runs, so requests join and
 * leave between decode steps (continuous batching). The scheduler's callbacks run on that
 * thread and append each request's output (SSE events, or the final text) to its job, under
 * the one mutex `mu`, and wake the connection's thread through the job's condition variable.
 *
 * Streams pass on only text that can no longer change: bytes that might still turn out to
 * begin a stop string, or that end inside a UTF-8 character, are held until the next token
 * decides (job_safe), and the rest comes from the scheduler's final text, so a streamed
 * answer is exactly the whole one.
 *
 * A client that goes away is noticed while its thread waits (the socket polled every 0.1 s,
 * and at the latest when a write fails); its request is then cancelled and leaves the
 * scheduler at the next step. SIGTERM stops accepting, lets running requests finish for
 * --grace seconds, cancels the rest and exits 0; SIGHUP reopens --log. Every request gets
 * one log line.
 */
#define _GNU_SOURCE   /* POLLRDHUP */
#include "config.h"

#include "cli.h"

#ifndef HAVE_MICROHTTPD

int
cli_serve(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    cli_error("serve: this kli was built without the HTTP server (configure did not find "
              "libmicrohttpd; Debian: apt-get install libmicrohttpd-dev, then configure and "
              "build again)");
    return 1;
}

#else

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "cli_batch.h"
#include "cli_toolcall.h"
#include "serve.h"
#include "util.h"

/* Appends a string literal. */
#define BB_ADD(b, lit) bbuf_add((b), (lit), sizeof(lit) - 1)

/* ==== options ============================================================================= */

enum {
    OPT_HOST = 0x5000, OPT_PORT, OPT_API_KEY, OPT_API_KEY_FILE, OPT_INSECURE, OPT_CTX,
    OPT_STATE_CACHE, OPT_STATE_DIR, OPT_MIN_PREFIX, OPT_MAX_BODY, OPT_MAX_PROMPT,
    OPT_MAX_TOKENS_LIMIT, OPT_QUEUE, OPT_TIMEOUT, OPT_GRACE, OPT_LOG, OPT_NAME,
};

struct serve_args {
    struct cli_args ca;
    const char *host, *api_key_file, *state_dir, *log, *name;
    char *api_key;
    long port, parallel, ctx, min_prefix, max_prompt, max_tokens, max_tokens_limit, queue;
    long timeout, grace, threads;
    int insecure, seeded;
    uint64_t state_bytes, max_body;
    int state_given;                   /* --state-cache was on the command line */
    struct kli_sampler_options so;
};

static const struct option serve_opts[] = {
    CLI_MODEL_LONGOPT,
    CLI_THREADS_LONGOPT,
    {"host", required_argument, NULL, OPT_HOST},
    {"port", required_argument, NULL, OPT_PORT},
    {"parallel", required_argument, NULL, 'P'},
    {"api-key", required_argument, NULL, OPT_API_KEY},
    {"api-key-file", required_argument, NULL, OPT_API_KEY_FILE},
    {"insecure", no_argument, NULL, OPT_INSECURE},
    {"ctx", required_argument, NULL, OPT_CTX},
    {"state-cache", required_argument, NULL, OPT_STATE_CACHE},
    {"state-dir", required_argument, NULL, OPT_STATE_DIR},
    {"min-prefix", required_argument, NULL, OPT_MIN_PREFIX},
    {"max-body", required_argument, NULL, OPT_MAX_BODY},
    {"max-prompt-tokens", required_argument, NULL, OPT_MAX_PROMPT},
    {"max-tokens", required_argument, NULL, 'n'},
    {"max-tokens-limit", required_argument, NULL, OPT_MAX_TOKENS_LIMIT},
    {"queue", required_argument, NULL, OPT_QUEUE},
    {"timeout", required_argument, NULL, OPT_TIMEOUT},
    {"grace", required_argument, NULL, OPT_GRACE},
    {"log", required_argument, NULL, OPT_LOG},
    {"model-name", required_argument, NULL, OPT_NAME},
    CLI_SAMPLING_LONGOPTS,
    CLI_PLACEMENT_LONGOPTS,
    CLI_GPU_LONGOPTS,
    CLI_HELP_LONGOPT,
    CLI_LONGOPTS_END,
};

static const char serve_usage[] =
    "usage: kli serve [-m|--model MODEL] [--host ADDR] [--port N] [-P|--parallel N]\n"
    "                 [--api-key KEY | --api-key-file FILE] [--insecure] [--ctx N]\n"
    "                 [--state-cache SIZE] [--state-dir DIR] [--min-prefix N]\n"
    "                 [--max-body SIZE] [--max-prompt-tokens N] [-n|--max-tokens N]\n"
    "                 [--max-tokens-limit N] [--queue N] [--timeout SEC] [--grace SEC]\n"
    "                 [--log FILE] [--model-name NAME] [-h|--help]\n"
    CLI_SAMPLING_HELP CLI_PLACEMENT_HELP CLI_GPU_HELP
    "An OpenAI-compatible HTTP server: POST /v1/chat/completions, /v1/completions,\n"
    "/tokenize, /detokenize; GET /v1/models, /health, /metrics. Listens on 127.0.0.1:8080\n"
    "by default; another address needs --api-key or --insecure. See kli(1).\n";

static int
serve_parse(int argc, char **argv, struct serve_args *a)
{
    int c;

    memset(a, 0, sizeof(*a));
    a->host = "127.0.0.1";
    a->port = 8080;
    a->parallel = 8;
    a->min_prefix = 64;
    a->max_tokens = 256;
    a->max_tokens_limit = 8192;
    a->queue = 64;
    a->timeout = 600;
    a->grace = 10;
    a->state_bytes = 1ULL << 30;
    a->max_body = 4ULL << 20;
    kli_sampler_options_init(&a->so);
    const struct cli_int_opt ints[] = {
        {OPT_PORT, "--port", 0, 65535, &a->port},
        {'P', "--parallel", 1, 256, &a->parallel},
        {OPT_CTX, "--ctx", 1, 1 << 24, &a->ctx},
        {OPT_MIN_PREFIX, "--min-prefix", 1, 1 << 30, &a->min_prefix},
        {OPT_MAX_PROMPT, "--max-prompt-tokens", 1, 1 << 24, &a->max_prompt},
        {'n', "--max-tokens", 1, 1 << 24, &a->max_tokens},
        {OPT_MAX_TOKENS_LIMIT, "--max-tokens-limit", 1, 1 << 24, &a->max_tokens_limit},
        {OPT_QUEUE, "--queue", 1, 1 << 20, &a->queue},
        {OPT_TIMEOUT, "--timeout", 1, 1 << 24, &a->timeout},
        {OPT_GRACE, "--grace", 0, 1 << 20, &a->grace},
    };
    a->ca.usage = serve_usage;
    a->ca.ints = ints;
    a->ca.n_ints = sizeof(ints) / sizeof(ints[0]);
    while ((c = cli_getopt(argc, argv, "m:t:P:n:h", serve_opts, &a->ca)) > 0) {
        int r;
        switch (c) {
        case OPT_HOST: a->host = optarg; break;
        case OPT_API_KEY: a->api_key = optarg; break;
        case OPT_API_KEY_FILE: a->api_key_file = optarg; break;
        case OPT_INSECURE: a->insecure = 1; break;
        case OPT_STATE_DIR: a->state_dir = optarg; break;
        case OPT_LOG: a->log = optarg; break;
        case OPT_NAME: a->name = optarg; break;
        case OPT_STATE_CACHE:
        case OPT_MAX_BODY: {
            uint64_t v;
            v = 0;   /* "0": no state cache */
            if ((strcmp(optarg, "0") != 0 && cli_parse_size(optarg, &v) != 0) ||
                (c == OPT_MAX_BODY && v == 0)) {
                cli_error("%s: '%s' is not a size (such as 512M or 2G)",
                          c == OPT_MAX_BODY ? "--max-body" : "--state-cache", optarg);
                return -1;
            }
            *(c == OPT_MAX_BODY ? &a->max_body : &a->state_bytes) = v;
            a->state_given |= c == OPT_STATE_CACHE;
            break;
        }
        default:
            if ((r = cli_sampling_option(c, optarg, &a->so)) < 0)
                return -1;
            a->seeded |= c == CLI_OPT_SEED;
            break;
        }
    }
    a->threads = a->ca.threads;
    a->ca.ints = NULL;
    if (c != CLI_ARGS_END)
        return c == CLI_ARGS_HELP ? 1 : -1;
    if (cli_no_operands(argc, argv, "serve") != 0)
        return -1;
    if (a->api_key != NULL && a->api_key_file != NULL) {
        cli_error("serve: give --api-key or --api-key-file, not both");
        return -1;
    }
    if (a->api_key_file != NULL) {
        size_t len;
        char *k = cli_read_file(a->api_key_file, 4096, 4096, "4 KiB", &len);
        if (k == NULL)
            return -1;
        while (len > 0 && (k[len - 1] == '\n' || k[len - 1] == '\r' || k[len - 1] == ' '))
            k[--len] = '\0';
        if (len == 0 || strlen(k) != len) {
            cli_error("%s: no API key in it (one line, no NUL)", a->api_key_file);
            free(k);
            return -1;
        }
        a->api_key = k;
    } else if (a->api_key != NULL) {
        if (a->api_key[0] == '\0') {
            cli_error("--api-key: empty");
            return -1;
        }
        if ((a->api_key = strdup(a->api_key)) == NULL) {
            cli_error("out of memory");
            return -1;
        }
    }
    struct cli_gen_opts g;   /* the sampling options, checked as run checks them */
    cli_gen_init(&g);
    g.so = a->so;
    return cli_gen_check(&g);
}

/* ==== state =============================================================================== */

#define SERVE_STATUSES 12
static const int serve_codes[SERVE_STATUSES] = {200, 400, 401, 404, 405, 413, 429, 500, 503,
                                                504, 0, 0};

struct srv;

/* A completion request from its submission to its answer. Fields below `mu` are guarded by
 * srv->mu; the job is freed when the connection, the response and the scheduler have all
 * let go of it (refs). */
struct job {
    struct srv *s;
    struct serve_req rq;
    char id[48];
    long long created;
    int fd;                      /* the client's socket, polled to notice a disconnect */
    double t0, deadline;
    pthread_cond_t cv;
    /* mu */
    int refs;
    int submitted, cancel, cancel_sent, done, timed_out, gone;
    uint64_t sched_id;
    struct bbuf acc;             /* the generated bytes so far */
    size_t sent;                 /* of acc, passed on in events */
    struct bbuf out;             /* bytes for the client (a stream), from out_off */
    size_t out_off;
    enum kli_finish finish;
    char *text, *error;          /* the final text; the error message */
    cJSON *calls;                /* the tool calls read from the answer, else NULL */
    size_t len;
    int32_t n_prompt, n_cached, n_gen;
    double t_first;
    struct job *next;            /* in the inbox, or among the submitted */
    struct lp_list lp;           /* with logprobs: every reported token's */
    int32_t lp_sent;             /* of lp, passed on in events */
    size_t lp_off;               /* the text offset where token lp_sent starts */
    int lp_bad;                  /* one could not be kept: the answer fails */
    int nomem;                   /* it failed for memory: 503, worth a retry */
    int first_done;              /* one_call: its first tool call ended; cancelled there */
    int acc_bad;                 /* text was lost for memory: the answer fails */
    /* n > 1: every choice is a job of its own on the scheduler. The first, the lead, holds
     * the connection, the stream (out, cv) and the request (the others borrow its rq); it is
     * done when all its choices have ended. A choice holds a reference to the lead while
     * the scheduler has it, and the lead one to each choice until it is freed. */
    int index;                   /* the choice's */
    struct job *lead;            /* choice 0's job (itself for choice 0) */
    struct job **sib;            /* lead: choices 1..n_sib */
    int n_sib, n_open;           /* lead: choices not yet ended */
};

/* One HTTP request (MHD's per-request pointer). */
struct conn {
    struct bbuf body;
    int too_big, nomem, status;
    char method[8], path[64], peer[64];
    double t0;
    struct job *job;
};

struct srv {
    const struct serve_args *a;
    struct kli_model *model;
    const struct kli_tokenizer *tok;
    struct kli_sched *sched;
    struct serve_limits lim;
    const char *name;
    int ctx;
    pthread_mutex_t mu;
    pthread_cond_t cv;           /* the scheduler thread's */
    struct job *inbox, *inbox_tail, *active;
    int n_jobs, n_sched;         /* jobs taken (for --queue); submitted and not ended */
    int n_answering;             /* connections with a job, until their answer is out */
    int draining, stop;
    volatile int stop_now;       /* ends a prefill at once (after --grace) */
    uint64_t counter;
    /* metrics (mu) */
    int64_t by_status[SERVE_STATUSES];
    int64_t prompt_tokens, cached_tokens, gen_tokens, cache_hits, finished;
    double ttft_sum;
    int64_t ttft_count;
    struct kli_sched_stats st;
    /* the log */
    pthread_mutex_t log_mu;
    int log_fd;
};

static uint64_t
serve_mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* mu held */
static void
job_unref(struct job *j)
{
    if (--j->refs > 0)
        return;
    if (j->lead == j || j->lead == NULL) {
        for (int i = 0; i < j->n_sib; i++)
            job_unref(j->sib[i]);
        free(j->sib);
        serve_req_clear(&j->rq);
    }
    free(j->acc.p);
    free(j->out.p);
    lp_list_free(&j->lp);
    free(j->text);
    free(j->error);
    cJSON_Delete(j->calls);
    pthread_cond_destroy(&j->cv);
    free(j);
}

/* ==== output ============================================================================== */

/* The bytes of acc that can go out: up to the first stop string, less a tail that could
 * begin one, less a character cut short. */
static size_t
job_safe(const struct job *j)
{
    const char *a = j->acc.p;
    size_t lim = j->acc.n, hold = 0;

    for (int32_t i = 0; i < j->rq.n_stop; i++) {
        const char *st = j->rq.stop[i];
        size_t l = strlen(st);
        for (size_t p = j->sent; p + l <= lim; p++) {
            if (memcmp(a + p, st, l) == 0) {
                lim = p;
                break;
            }
        }
    }
    for (int32_t i = 0; i < j->rq.n_stop; i++) {
        const char *st = j->rq.stop[i];
        size_t l = strlen(st), k = l - 1 < lim - j->sent ? l - 1 : lim - j->sent;
        for (; k > hold; k--) {
            if (memcmp(a + lim - k, st, k) == 0) {
                hold = k;
                break;
            }
        }
    }
    lim -= hold;
    /* an answer read for tool calls: the content streams up to the first marker (a forced
     * call: none of it), the rest waits for the end */
    if (j->rq.tool_mode == SERVE_TOOLS_FORCED)
        lim = j->sent;
    for (size_t p = j->sent; j->rq.tool_mode == SERVE_TOOLS_AUTO && p < lim; p++) {
        if (a[p] == '<' && (p + 1 == lim || a[p + 1] == '|')) {
            lim = p;
            break;
        }
    }
    return j->sent + kli_utf8_complete_prefix(a + j->sent, lim - j->sent);
}

static const char *
serve_reason(const struct job *j)
{
    return j->calls != NULL ? "tool_calls" : j->finish == KLI_FINISH_LENGTH ? "length" : "stop";
}

/* The answer of a request with tools, read at its end (mu held): the text with its special
 * tokens by name (acc, cut at a stop string) split into content (j->text) and calls. A
 * damaged section leaves the whole text as content. @return 0, or -1 when out of memory. */
static int
job_tools(struct job *j)
{
    char msg[256], *content;
    int rc = tc_answer(j->acc.p != NULL ? j->acc.p : "", j->acc.n,
                       (const char *const *)j->rq.stop, j->rq.n_stop, j->rq.tools,
                       j->rq.tool_mode == SERVE_TOOLS_FORCED ? j->rq.forced : NULL, &content,
                       &j->calls, msg, sizeof(msg), cli_utf8_seq);

    if (rc < 0)
        return -1;
    if (j->rq.one_call)
        tc_keep_first(j->calls);
    /* The content is made valid UTF-8 (each bad sequence becomes the 3 bytes of U+FFFD),
     * while j->sent counts bytes of acc: what was streamed, acc[0, sent) (which ends before
     * a stop string and a marker, on a whole character), is the content's first
     * `streamed` bytes, and the rest goes out from there. */
    size_t streamed = 0;
    for (size_t i = 0; i < j->sent;) {
        int k = cli_utf8_seq((const unsigned char *)j->acc.p + i, j->sent - i);
        streamed += k > 0 ? (size_t)k : 3;
        i += (size_t)(k > 0 ? k : -k);
    }
    free(j->text);
    j->text = content;
    j->len = strlen(content);
    j->sent = streamed < j->len ? streamed : j->len;
    return 0;
}

/* The calls of a finished answer as "tool_calls": [...] members; `index` for stream deltas. */
static int
job_calls_json(struct bbuf *b, const struct job *j, int index)
{
    const cJSON *c;
    int i = 0, bad = BB_ADD(b, "\"tool_calls\":[");

    cJSON_ArrayForEach(c, j->calls) {
        char *p = cJSON_PrintUnformatted(c);
        if (p == NULL)
            return -1;
        if (i > 0)
            bad |= BB_ADD(b, ",");
        if (index)
            bad |= bbuf_addf(b, "{\"index\":%d,", i) | bbuf_add(b, p + 1, strlen(p) - 1);
        else
            bad |= bbuf_add(b, p, strlen(p));
        free(p);
        i++;
    }
    return bad | BB_ADD(b, "]");
}

/* The start of an object of the response: id, object, created, model. */
static int
serve_head(struct bbuf *b, const struct job *j, const char *object)
{
    int bad = bbuf_addf(b, "{\"id\":\"%s\",\"object\":\"%s\",\"created\":%lld,\"model\":", j->id,
                        object, j->created);
    return bad | bbuf_json_str(b, j->s->name, strlen(j->s->name));
}

/* The choices of lead j: i = 0 is j itself. */
static struct job *
job_choice(struct job *j, int i)
{
    return i == 0 ? j : j->sib[i - 1];
}

/* The tokens generated for all the choices of lead j. */
static int32_t
job_completion_tokens(const struct job *j)
{
    int32_t n = j->n_gen;

    for (int i = 0; i < j->n_sib; i++)
        n += j->sib[i]->n_gen;
    return n;
}

static int
serve_usage_json(struct bbuf *b, const struct job *j)
{
    int32_t gen = job_completion_tokens(j);

    return bbuf_addf(b, "\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,"
                     "\"total_tokens\":%d,\"prompt_tokens_details\":{\"cached_tokens\":%d}}",
                     (int)j->n_prompt, (int)gen, (int)(j->n_prompt + gen), (int)j->n_cached);
}

/* A choice's "logprobs" value for its tokens [from, to), the first at text offset off. */
static int
job_logprobs(struct bbuf *b, const struct job *j, int32_t from, int32_t to, size_t off)
{
    if (!j->rq.logprobs_on)
        return BB_ADD(b, "null");
    if (j->rq.kind == SERVE_CHAT)
        return lp_chat_json(b, j->s->tok, j->lp.v + from, to - from);
    return lp_compl_json(b, j->s->tok, j->lp.v + from, to - from, off);
}

/* One SSE event of a stream: a piece of text (finish NULL), or the end of the choice. With
 * logprobs, a piece of text carries those of its tokens whose text it ends (`last`: all the
 * rest). */
static int
job_event_lp(struct job *j, const char *text, size_t len, const char *finish, int last)
{
    struct bbuf *b = &j->lead->out;
    int chat = j->rq.kind == SERVE_CHAT, bad;

    bad = BB_ADD(b, "data: ");
    bad |= serve_head(b, j, chat ? "chat.completion.chunk" : "text_completion");
    bad |= bbuf_addf(b, ",\"choices\":[{\"index\":%d,", j->index);
    if (chat && text == NULL) {
        bad |= BB_ADD(b, "\"delta\":{");
        if (finish == NULL)
            bad |= BB_ADD(b, "\"role\":\"assistant\",\"content\":\"\"");
        bad |= BB_ADD(b, "}");
    } else {
        bad |= chat ? BB_ADD(b, "\"delta\":{\"content\":") : BB_ADD(b, "\"text\":");
        bad |= bbuf_json_str(b, text != NULL ? text : "", len);
        if (chat)
            bad |= BB_ADD(b, "}");
    }
    bad |= BB_ADD(b, ",\"logprobs\":");
    if (text != NULL && j->rq.logprobs_on) {
        int32_t from = j->lp_sent;
        size_t off = j->lp_off;
        j->lp_sent = lp_upto(j->s->tok, &j->lp, from, &j->lp_off,
                             last ? SIZE_MAX : (size_t)(text + len - j->acc.p));
        bad |= job_logprobs(b, j, from, j->lp_sent, off);
    } else {
        bad |= BB_ADD(b, "null");
    }
    bad |= BB_ADD(b, ",\"finish_reason\":");
    if (finish != NULL)
        bad |= bbuf_addf(b, "\"%s\"", finish);
    else
        bad |= BB_ADD(b, "null");
    bad |= BB_ADD(b, "}]}\n\n");
    return bad;
}

static int
job_event(struct job *j, const char *text, size_t len, const char *finish)
{
    return job_event_lp(j, text, len, finish, 0);
}

/* The end of a choice's stream: the rest of its text and its finish reason, or an error
 * event; after the last choice (`last`), the usage and [DONE]. */
static void
job_stream_end(struct job *j, int last)
{
    struct bbuf *b = &j->lead->out;
    size_t at = b->n;
    int bad = 0;

    if (j->error != NULL || j->finish == KLI_FINISH_INTERRUPT) {
        const char *msg = j->error != NULL ? j->error
                          : j->lead->timed_out ? "the request took longer than --timeout allows"
                          : "the request was cancelled";
        bad |= BB_ADD(b, "data: {\"error\":{\"message\":");
        bad |= bbuf_json_str(b, msg, strlen(msg));
        bad |= BB_ADD(b, ",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n");
    } else {
        if (j->len > j->sent || j->lp_sent < j->lp.n)
            bad |= job_event_lp(j, j->text + j->sent, j->len - j->sent, NULL, 1);
        if (j->calls != NULL) {   /* the calls whole, in one delta */
            bad |= BB_ADD(b, "data: ");
            bad |= serve_head(b, j, "chat.completion.chunk");
            bad |= bbuf_addf(b, ",\"choices\":[{\"index\":%d,\"delta\":{", j->index);
            bad |= job_calls_json(b, j, 1);
            bad |= BB_ADD(b, "},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
        }
        bad |= job_event(j, NULL, 0, serve_reason(j));
    }
    if (last && j->rq.include_usage && j->lead->error == NULL &&
        j->lead->finish != KLI_FINISH_INTERRUPT) {
        bad |= BB_ADD(b, "data: ");
        bad |= serve_head(b, j, j->rq.kind == SERVE_CHAT ? "chat.completion.chunk"
                                                         : "text_completion");
        bad |= BB_ADD(b, ",\"choices\":[],");
        bad |= serve_usage_json(b, j->lead);
        bad |= BB_ADD(b, "}\n\n");
    }
    if (last)
        bad |= BB_ADD(b, "data: [DONE]\n\n");
    if (bad)   /* out of memory: the client sees the stream break off */
        b->n = at;
}

/* mu held: choice j has ended (its text, finish and error are in): its stream ends, the lead
 * is done after its last choice, and the scheduler's references go. */
static void
job_end(struct srv *s, struct job *j)
{
    struct job *lead = j->lead;

    lead->n_open--;
    if (j->rq.stream)
        job_stream_end(j, lead->n_open == 0);
    if (j != lead || lead->n_open == 0)
        j->done = 1;   /* the lead's: all its choices have ended */
    lead->done = lead->n_open == 0;
    s->n_jobs--;
    pthread_cond_broadcast(&lead->cv);
    if (j != lead)
        job_unref(lead);   /* the choice's hold on its lead */
    job_unref(j);
}

/* ==== the scheduler's callbacks (its thread) ============================================== */

static void
serve_on_token(void *ud, const struct kli_sched_token *t)
{
    struct srv *s = ud;
    struct job *j = t->user;
    size_t safe;

    pthread_mutex_lock(&s->mu);
    if (j->t_first == 0 && j == j->lead) {
        j->t_first = util_now_s();
        s->ttft_sum += j->t_first - j->t0;
        s->ttft_count++;
    }
    s->gen_tokens++;
    if (t->lp != NULL && lp_list_add(&j->lp, t->lp) != 0)
        j->lp_bad = 1;
    const char *text = t->text;
    size_t len = t->len;
    int ended = 0;
    if (len == 0 && j->rq.tool_mode != SERVE_TOOLS_OFF) {   /* a tool-call marker, by name */
        text = kli_token_bytes(s->tok, t->token, &len);
        if (!tc_marker(text, len))
            len = 0;
        /* parallel_tool_calls false: the first call is the answer, so it ends here (the
         * section closed) rather than generating calls that would be dropped */
        ended = j->rq.one_call && tc_first_call_end(j->acc.p, j->acc.n, text, len);
    }
    if (j->first_done)
        len = 0;   /* a token decoded before the cancel took effect */
    if (bbuf_add(&j->acc, text, text != NULL ? len : 0) != 0)
        j->acc_bad = 1;
    if (ended && !j->first_done) {
        j->first_done = 1;
        if (bbuf_add(&j->acc, TC_SECTION_END, strlen(TC_SECTION_END)) != 0)
            j->acc_bad = 1;
        kli_sched_cancel(s->sched, t->id);
    }
    if (j->rq.stream && (safe = job_safe(j)) > j->sent) {
        if (job_event(j, j->acc.p + j->sent, safe - j->sent, NULL) == 0)
            j->sent = safe;
        pthread_cond_broadcast(&j->lead->cv);
    }
    pthread_mutex_unlock(&s->mu);
}

static void
serve_on_finish(void *ud, const struct kli_sched_result *r)
{
    struct srv *s = ud;
    struct job *j = r->user, **pp;

    pthread_mutex_lock(&s->mu);
    for (pp = &s->active; *pp != NULL && *pp != j; pp = &(*pp)->next)
        ;
    if (*pp == j)
        *pp = j->next;
    j->finish = r->finish == KLI_FINISH_INTERRUPT && j->first_done ? KLI_FINISH_EOS : r->finish;
    j->n_prompt = r->n_prompt;
    j->n_cached = r->n_cached;
    j->n_gen = r->n_generated;
    if ((j->text = malloc(r->len + 1)) != NULL) {
        memcpy(j->text, r->text, r->len);
        j->text[r->len] = '\0';
        j->len = r->len;
    } else if (r->error == NULL) {
        j->error = strdup("out of memory");
    }
    if (r->error != NULL)
        j->error = strdup(r->error);
    else if (j->lp_bad && j->error == NULL)
        j->error = strdup("out of memory (logprobs)");
    else if (j->acc_bad && j->error == NULL)
        j->error = strdup("out of memory (the answer's text)");
    if (j->error == NULL && j->rq.tool_mode != SERVE_TOOLS_OFF && j->finish != KLI_FINISH_ERROR &&
        j->finish != KLI_FINISH_INTERRUPT && job_tools(j) != 0)
        j->error = strdup("out of memory");
    j->nomem = r->status == KLI_E_NOMEM || (r->error == NULL && j->error != NULL);
    if (j->len < j->sent)   /* cannot happen: what was sent is final */
        j->sent = j->len;
    if (r->started) {
        s->prompt_tokens += r->n_prompt;
        s->cached_tokens += r->n_cached;
        s->cache_hits += r->n_cached > 0;
    }
    s->finished++;
    s->n_sched--;
    job_end(s, j);
    pthread_mutex_unlock(&s->mu);
}

static int
serve_should_stop(void *ud)
{
    return ((struct srv *)ud)->stop_now;
}

static void
serve_on_notice(void *ud, const char *msg)
{
    (void)ud;
    cli_error("serve: state cache: %s", msg);
}

/* The scheduler's thread. */
static void *
serve_loop(void *arg)
{
    struct srv *s = arg;

    pthread_mutex_lock(&s->mu);
    while (!s->stop) {
        struct job *j;
        while ((j = s->inbox) != NULL) {
            struct kli_sched_request q;
            struct kli_err err = {0};
            s->inbox = j->next;
            kli_sched_request_init(&q);
            q.prompt = j->rq.toks;
            q.n_prompt = j->rq.n;
            q.so = j->rq.so;
            q.max_tokens = j->rq.max_tokens;
            q.stop = (const char *const *)j->rq.stop;
            q.n_stop = j->rq.n_stop;
            q.grammar = j->rq.grammar;
            q.logprobs = j->rq.logprobs_on ? j->rq.top_logprobs : -1;
            q.so.seed += (uint64_t)j->index;   /* each choice a stream of its own */
            q.user = j;
            int rc = kli_sched_submit(s->sched, &q, &j->sched_id, &err);
            if (rc != KLI_OK) {
                j->error = strdup(err.msg);
                j->nomem = rc == KLI_E_NOMEM || j->error == NULL;
                j->finish = KLI_FINISH_ERROR;
                job_end(s, j);
                continue;
            }
            j->submitted = 1;
            j->next = s->active;
            s->active = j;
            s->n_sched++;
        }
        s->inbox_tail = NULL;
        for (j = s->active; j != NULL; j = j->next) {
            if ((j->cancel || j->lead->cancel) && !j->cancel_sent) {
                kli_sched_cancel(s->sched, j->sched_id);
                j->cancel_sent = 1;
            }
        }
        if (s->n_sched == 0) {
            pthread_cond_wait(&s->cv, &s->mu);
            continue;
        }
        pthread_mutex_unlock(&s->mu);
        kli_sched_step(s->sched);
        struct kli_sched_stats st;
        kli_sched_stats(s->sched, &st);
        pthread_mutex_lock(&s->mu);
        s->st = st;
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ==== HTTP ================================================================================ */

static void
serve_log(struct srv *s, const struct conn *cn, const struct job *j)
{
    char line[512], ts[32];
    time_t now = time(NULL);
    struct tm tm;
    int k;

    if (s->log_fd < 0)
        return;
    gmtime_r(&now, &tm);
    strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%SZ", &tm);
    k = snprintf(line, sizeof(line), "%s %s %s %s %d %.1fms", ts, cn->peer, cn->method,
                 cn->path, cn->status, 1e3 * (util_now_s() - cn->t0));
    if (j != NULL && k > 0 && (size_t)k < sizeof(line))
        k += snprintf(line + k, sizeof(line) - (size_t)k, " id=%s prompt=%d cached=%d "
                      "completion=%d finish=%s ttft=%.1fms", j->id, (int)j->n_prompt,
                      (int)j->n_cached, (int)job_completion_tokens(j),
                      !j->done ? "none" : j->error != NULL ? "error"
                      : j->finish == KLI_FINISH_INTERRUPT ? "cancelled" : serve_reason(j),
                      j->t_first > 0 ? 1e3 * (j->t_first - j->t0) : 0.0);
    if (k < 0)
        return;
    if ((size_t)k >= sizeof(line) - 1)
        k = (int)sizeof(line) - 2;
    line[k++] = '\n';
    pthread_mutex_lock(&s->log_mu);
    if (write(s->log_fd, line, (size_t)k) < 0) {
        /* nowhere to report it */
    }
    pthread_mutex_unlock(&s->log_mu);
}

/* Queues a response of `body` (malloc'd, taken over). */
/* The answer when memory runs out while a request is read or answered: made at start, so
 * that the client gets a 503 to retry rather than a connection reset (MHD responses may be
 * queued on any number of connections). */
static struct MHD_Response *serve_oom_resp;
static const char serve_oom_body[] = "{\"error\":{\"message\":\"out of memory: retry later\","
                                     "\"type\":\"server_error\",\"param\":null,"
                                     "\"code\":null}}\n";

static int
serve_oom_init(void)
{
    serve_oom_resp = MHD_create_response_from_buffer(sizeof(serve_oom_body) - 1,
                                                     (void *)serve_oom_body,
                                                     MHD_RESPMEM_PERSISTENT);
    if (serve_oom_resp == NULL ||
        MHD_add_response_header(serve_oom_resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                                "application/json") != MHD_YES ||
        MHD_add_response_header(serve_oom_resp, MHD_HTTP_HEADER_RETRY_AFTER, "1") != MHD_YES)
        return -1;
    return 0;
}

static enum MHD_Result
serve_oom(struct conn *cn, struct MHD_Connection *c)
{
    if (cn != NULL)
        cn->status = 503;
    return MHD_queue_response(c, 503, serve_oom_resp);
}

static enum MHD_Result
serve_reply(struct conn *cn, struct MHD_Connection *c, int status, const char *ctype,
            char *body, size_t len, int retry_after)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    enum MHD_Result rc;

    if (r == NULL) {
        free(body);
        return serve_oom(cn, c);
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (retry_after > 0) {
        char v[16];
        snprintf(v, sizeof(v), "%d", retry_after);
        MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, v);
    }
    if (status == 401)
        MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    cn->status = status;
    rc = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result
serve_json(struct conn *cn, struct MHD_Connection *c, int status, struct bbuf *b)
{
    if (b->p == NULL && BB_ADD(b, "") != 0)
        return serve_oom(cn, c);
    return serve_reply(cn, c, status, "application/json", b->p, b->n, 0);
}

/* An OpenAI error object. A 503 (no memory, shutting down) and a 429 (queue full) pass, so
 * they tell the client when to try again: Retry-After: 1. */
static enum MHD_Result
serve_error(struct conn *cn, struct MHD_Connection *c, const struct serve_err *e)
{
    struct bbuf b = {NULL, 0, 0};
    int bad = BB_ADD(&b, "{\"error\":{\"message\":");

    bad |= bbuf_json_str(&b, e->msg, strlen(e->msg));
    bad |= bbuf_addf(&b, ",\"type\":\"%s\",\"param\":", e->type != NULL ? e->type
                                                                        : "invalid_request_error");
    if (e->param[0] != '\0')
        bad |= bbuf_json_str(&b, e->param, strlen(e->param));
    else
        bad |= BB_ADD(&b, "null");
    if (e->code != NULL)
        bad |= bbuf_addf(&b, ",\"code\":\"%s\"}}\n", e->code);
    else
        bad |= BB_ADD(&b, ",\"code\":null}}\n");
    if (bad) {
        free(b.p);
        return serve_oom(cn, c);
    }
    return serve_reply(cn, c, e->status, "application/json", b.p, b.n,
                       e->status == 503 || e->status == 429);
}

static enum MHD_Result
serve_fail_reply(struct conn *cn, struct MHD_Connection *c, int status, const char *type,
                 const char *code, const char *msg)
{
    struct serve_err e;

    memset(&e, 0, sizeof(e));
    e.status = status;
    e.type = type;
    e.code = code;
    snprintf(e.msg, sizeof(e.msg), "%s", msg);
    return serve_error(cn, c, &e);
}

/* Whether the client has closed its end (no wait). */
static int
serve_gone(int fd)
{
    struct pollfd p = {fd, POLLIN | POLLRDHUP, 0};
    char ch;

    if (fd < 0 || poll(&p, 1, 0) <= 0)
        return 0;
    if (p.revents & (POLLRDHUP | POLLHUP | POLLERR))
        return 1;
    return (p.revents & POLLIN) && recv(fd, &ch, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

/* mu held: waits up to 0.1 s for news of j; cancels it when its client has gone or its
 * time is up. */
static void
job_wait(struct job *j)
{
    struct timespec ts;
    struct srv *s = j->s;

    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 100000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_cond_timedwait(&j->cv, &s->mu, &ts);
    if (j->done || j->cancel)
        return;
    if (util_now_s() > j->deadline)
        j->timed_out = 1;
    if (!j->timed_out)
        j->gone = serve_gone(j->fd);
    if (j->timed_out || j->gone) {
        j->cancel = 1;
        pthread_cond_signal(&s->cv);
    }
}

/* The stream's body, as MHD asks for it. */
static ssize_t
serve_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct job *j = cls;
    struct srv *s = j->s;
    ssize_t n;

    (void)pos;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        if (j->out.n > j->out_off) {
            size_t k = j->out.n - j->out_off < max ? j->out.n - j->out_off : max;
            memcpy(buf, j->out.p + j->out_off, k);
            j->out_off += k;
            if (j->out_off == j->out.n)
                j->out_off = j->out.n = 0;
            n = (ssize_t)k;
            break;
        }
        if (j->done) {
            n = MHD_CONTENT_READER_END_OF_STREAM;
            break;
        }
        if (j->cancel && !j->timed_out) {   /* gone; a timeout ends with an error event */
            n = MHD_CONTENT_READER_END_WITH_ERROR;
            break;
        }
        job_wait(j);
    }
    pthread_mutex_unlock(&s->mu);
    return n;
}

static void
serve_read_free(void *cls)
{
    struct job *j = cls;
    struct srv *s = j->s;

    pthread_mutex_lock(&s->mu);
    if (!j->done) {
        j->cancel = 1;
        pthread_cond_signal(&s->cv);
    }
    job_unref(j);
    pthread_mutex_unlock(&s->mu);
}

/* The whole answer of a finished job (mu held). */
static enum MHD_Result
job_answer(struct conn *cn, struct MHD_Connection *c, struct job *j)
{
    struct bbuf b = {NULL, 0, 0};
    int chat = j->rq.kind == SERVE_CHAT, bad;

    if (j->gone) {   /* nobody to answer */
        cn->status = 499;
        return MHD_NO;
    }
    struct job *failed = j->error != NULL ? j : NULL;   /* the lead, else the first choice */
    for (int i = 1; i <= j->n_sib && failed == NULL; i++) {
        if (j->sib[i - 1]->error != NULL)
            failed = j->sib[i - 1];
    }
    /* memory runs short for a while (other requests hold it): a 503 asks for a retry */
    if (failed != NULL)
        return serve_fail_reply(cn, c, failed->nomem ? 503 : 500, "server_error", NULL,
                                failed->error);
    /* a choice cut short; the timeout counts only then (an answer that ended as the
     * deadline passed is whole) */
    int cut = j->finish == KLI_FINISH_INTERRUPT;
    for (int i = 1; i <= j->n_sib; i++)
        cut |= j->sib[i - 1]->finish == KLI_FINISH_INTERRUPT;
    if (cut && j->timed_out)
        return serve_fail_reply(cn, c, 504, "server_error", "timeout",
                                "the request took longer than --timeout allows");
    if (cut)
        return serve_fail_reply(cn, c, 503, "server_error", NULL,
                                "the request was cancelled (the server is shutting down)");
    bad = serve_head(&b, j, chat ? "chat.completion" : "text_completion");
    bad |= BB_ADD(&b, ",\"choices\":[");
    for (int i = 0; i <= j->n_sib; i++) {
        const struct job *ch = job_choice(j, i);
        bad |= bbuf_addf(&b, "%s{\"index\":%d,", i > 0 ? "," : "", i);
        bad |= chat ? BB_ADD(&b, "\"message\":{\"role\":\"assistant\",\"content\":")
                    : BB_ADD(&b, "\"text\":");
        if (ch->calls != NULL && ch->len == 0)
            bad |= BB_ADD(&b, "null");
        else
            bad |= bbuf_json_str(&b, ch->text, ch->len);
        if (ch->calls != NULL)
            bad |= BB_ADD(&b, ",") | job_calls_json(&b, ch, 0);
        bad |= bbuf_addf(&b, "%s,\"logprobs\":", chat ? "}" : "");
        bad |= job_logprobs(&b, ch, 0, ch->lp.n, 0);
        bad |= bbuf_addf(&b, ",\"finish_reason\":\"%s\"}", serve_reason(ch));
    }
    bad |= BB_ADD(&b, "],");
    bad |= serve_usage_json(&b, j);
    bad |= BB_ADD(&b, "}\n");
    if (bad) {
        free(b.p);
        return serve_oom(cn, c);
    }
    return serve_json(cn, c, 200, &b);
}

/* POST /v1/chat/completions and /v1/completions. */
static enum MHD_Result
serve_complete(struct srv *s, struct conn *cn, struct MHD_Connection *c, enum serve_kind kind)
{
    struct serve_err e;
    struct job *j;
    const union MHD_ConnectionInfo *ci;
    enum MHD_Result rc;

    if (cli_find_nul(cn->body.p, cn->body.n, 1) >= 0)
        return serve_fail_reply(cn, c, 400, "invalid_request_error", NULL,
                                "the body holds a NUL character (\\u0000)");
    if ((j = calloc(1, sizeof(*j))) == NULL)
        return serve_oom(cn, c);
    if (serve_req_parse(&j->rq, kind, cn->body.p, cn->body.n, s->tok, &s->lim, &e) != 0) {
        free(j);
        return serve_error(cn, c, &e);
    }
    j->s = s;
    j->t0 = util_now_s();
    j->deadline = j->t0 + (double)s->a->timeout;
    j->created = (long long)time(NULL);
    ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    j->fd = ci != NULL ? ci->connect_fd : -1;
    pthread_cond_init(&j->cv, NULL);
    pthread_mutex_lock(&s->mu);
    uint64_t k = ++s->counter;
    snprintf(j->id, sizeof(j->id), "%s-%016" PRIx64, kind == SERVE_CHAT ? "chatcmpl" : "cmpl",
             serve_mix(k ^ ((uint64_t)j->created << 20)));
    if (!j->rq.seeded)
        j->rq.so.seed = serve_mix(k ^ (uint64_t)(j->t0 * 1e9));
    j->lead = j;
    j->n_open = j->rq.n_choices > 1 ? j->rq.n_choices : 1;
    if (j->n_open > 1 && (j->sib = calloc((size_t)j->n_open - 1, sizeof(*j->sib))) == NULL)
        j->n_open = 0;
    for (int i = 1; i < j->n_open; i++) {   /* the other choices borrow the request */
        struct job *ch = calloc(1, sizeof(*ch));
        if (ch == NULL) {
            j->n_open = 0;
            break;
        }
        ch->s = s;
        ch->rq = j->rq;
        memcpy(ch->id, j->id, sizeof(ch->id));
        ch->created = j->created;
        ch->fd = -1;
        ch->t0 = j->t0;
        ch->index = i;
        ch->lead = j;
        ch->refs = 1;   /* the lead's */
        pthread_cond_init(&ch->cv, NULL);
        j->sib[j->n_sib++] = ch;
    }
    if (j->n_open == 0) {   /* out of memory */
        j->refs = 1;
        job_unref(j);
        pthread_mutex_unlock(&s->mu);
        return serve_oom(cn, c);
    }
    if (s->draining || s->n_jobs + j->n_open > s->a->queue) {
        int drain = s->draining;
        j->refs = 1;
        job_unref(j);
        pthread_mutex_unlock(&s->mu);
        if (drain)
            return serve_fail_reply(cn, c, 503, "server_error", NULL,
                                    "the server is shutting down");
        return serve_fail_reply(cn, c, 429, "rate_limit_error", NULL,
                                "too many requests queued (--queue); try again shortly");
    }
    s->n_jobs += j->n_open;
    /* the connection, the scheduler, a stream's response, each other choice */
    j->refs = 2 + j->rq.stream + j->n_sib;
    for (int i = 0; i < j->n_open; i++) {
        struct job *ch = job_choice(j, i);
        if (i > 0)
            ch->refs++;   /* the scheduler's */
        if (s->inbox == NULL)
            s->inbox = ch;
        else
            s->inbox_tail->next = ch;
        s->inbox_tail = ch;
    }
    cn->job = j;
    s->n_answering++;
    pthread_cond_signal(&s->cv);
    if (j->rq.stream) {
        for (int i = 0; i < j->n_open && kind == SERVE_CHAT; i++)
            job_event(job_choice(j, i), NULL, 0, NULL);   /* the role first */
        pthread_mutex_unlock(&s->mu);
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384,
                                                                   serve_read, j,
                                                                   serve_read_free);
        if (r == NULL) {
            serve_read_free(j);
            return serve_oom(cn, c);
        }
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        cn->status = 200;
        rc = MHD_queue_response(c, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        return rc;
    }
    while (!j->done)
        job_wait(j);
    rc = job_answer(cn, c, j);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

/* POST /tokenize {"content": TEXT} and /detokenize {"tokens": [ID...]}. */
static enum MHD_Result
serve_tokens(struct srv *s, struct conn *cn, struct MHD_Connection *c, int encode)
{
    struct serve_err e = {0};
    cJSON *root = serve_json_parse(cn->body.p, cn->body.n, &e), *m;
    struct bbuf b = {NULL, 0, 0};
    struct kli_err err = {0};
    const char *want = encode ? "content" : "tokens";
    char msg[300];
    int bad = 0;

    if (root == NULL && e.status == 503)
        return serve_error(cn, c, &e);
    if (!cJSON_IsObject(root) || cn->body.n == 0) {
        cJSON_Delete(root);
        return serve_fail_reply(cn, c, 400, "invalid_request_error", NULL,
                                "the body must be a JSON object");
    }
    cJSON_ArrayForEach(m, root) {
        if (strcmp(m->string, want) != 0) {
            snprintf(msg, sizeof(msg), "unknown field '%.60s' (only '%s')", m->string, want);
            cJSON_Delete(root);
            return serve_fail_reply(cn, c, 400, "invalid_request_error", NULL, msg);
        }
    }
    m = cJSON_GetObjectItemCaseSensitive(root, want);
    if (encode && cJSON_IsString(m) && cli_find_nul(cn->body.p, cn->body.n, 1) < 0) {
        size_t len = strlen(m->valuestring);
        kli_token *t = malloc((len + 1) * sizeof(*t));
        int64_t n = t == NULL ? KLI_E_NOMEM
                              : kli_tokenize(s->tok, m->valuestring, len, 0, t, (int64_t)len + 1,
                                             &err);
        if (n >= 0) {
            bad |= BB_ADD(&b, "{\"tokens\":[");
            for (int64_t i = 0; i < n; i++)
                bad |= bbuf_addf(&b, "%s%d", i > 0 ? "," : "", (int)t[i]);
            bad |= BB_ADD(&b, "]}\n");
        }
        free(t);
        snprintf(msg, sizeof(msg), "'content': %s", n == KLI_E_NOMEM ? "out of memory" : err.msg);
        bad |= n < 0;
    } else if (!encode && cJSON_IsArray(m)) {
        int64_t cnt = cJSON_GetArraySize(m), i = 0;
        kli_token *t = malloc(((size_t)cnt + 1) * sizeof(*t));
        const cJSON *v;
        snprintf(msg, sizeof(msg), "'tokens' must be an array of token ids");
        bad = t == NULL;
        cJSON_ArrayForEach(v, m) {
            if (bad || !cJSON_IsNumber(v) || v->valuedouble != (double)(int32_t)v->valuedouble) {
                bad = 1;
                break;
            }
            t[i++] = (kli_token)v->valuedouble;
        }
        int64_t n = bad ? -1 : kli_detokenize(s->tok, t, cnt, NULL, 0, &err);
        char *text = n >= 0 ? malloc((size_t)n + 1) : NULL;
        if (n < 0 || text == NULL) {
            if (n < 0 && !bad)
                snprintf(msg, sizeof(msg), "'tokens': %s", err.msg);
            bad = 1;
        } else {
            kli_detokenize(s->tok, t, cnt, text, n, &err);
            bad |= BB_ADD(&b, "{\"content\":");
            bad |= bbuf_json_str(&b, text, (size_t)n);
            bad |= BB_ADD(&b, "}\n");
        }
        free(text);
        free(t);
    } else {
        snprintf(msg, sizeof(msg), "'%s' must be %s", want,
                 encode ? "a string (without NUL)" : "an array of token ids");
        bad = 1;
    }
    cJSON_Delete(root);
    if (bad) {
        free(b.p);
        return serve_fail_reply(cn, c, 400, "invalid_request_error", NULL, msg);
    }
    return serve_json(cn, c, 200, &b);
}

static enum MHD_Result
serve_metrics(struct srv *s, struct conn *cn, struct MHD_Connection *c)
{
    struct bbuf b = {NULL, 0, 0};
    int bad = 0;

    pthread_mutex_lock(&s->mu);
    const struct kli_sched_stats *st = &s->st;
    bad |= BB_ADD(&b, "# HELP kli_http_requests_total HTTP requests answered, by status.\n"
                    "# TYPE kli_http_requests_total counter\n");
    for (int i = 0; i < SERVE_STATUSES; i++) {
        if (serve_codes[i] != 0)
            bad |= bbuf_addf(&b, "kli_http_requests_total{code=\"%d\"} %" PRId64 "\n",
                             serve_codes[i], s->by_status[i]);
    }
    bad |= bbuf_addf(&b, "kli_http_requests_total{code=\"other\"} %" PRId64 "\n",
                     s->by_status[SERVE_STATUSES - 1]);
#define METRIC(name, type, help, fmt, v) \
    bad |= bbuf_addf(&b, "# HELP kli_" name " " help "\n# TYPE kli_" name " " type "\nkli_" \
                     name " " fmt "\n", v)
    METRIC("completions_total", "counter", "Completion requests ended.", "%" PRId64,
           s->finished);
    METRIC("prompt_tokens_total", "counter", "Prompt tokens of started requests.", "%" PRId64,
           s->prompt_tokens);
    METRIC("cached_tokens_total", "counter", "Prompt tokens taken from the state cache.",
           "%" PRId64, s->cached_tokens);
    METRIC("cache_hits_total", "counter", "Requests that started from a cached state.",
           "%" PRId64, s->cache_hits);
    METRIC("completion_tokens_total", "counter", "Tokens generated.", "%" PRId64,
           s->gen_tokens);
    METRIC("requests_waiting", "gauge", "Requests waiting for a place.", "%" PRId64,
           st->waiting + (s->n_jobs - s->n_sched));
    METRIC("requests_running", "gauge", "Requests decoding.", "%" PRId64, st->running);
    METRIC("time_to_first_token_seconds_sum", "counter",
           "Time from a request's arrival to its first token, summed.", "%.6f", s->ttft_sum);
    METRIC("time_to_first_token_seconds_count", "counter",
           "Requests that produced a first token.", "%" PRId64, s->ttft_count);
    METRIC("decode_tokens_per_second", "gauge", "Tokens decoded per second in decode steps.",
           "%.3f", st->step_seconds > 0 ? (double)st->step_tokens / st->step_seconds : 0.0);
    METRIC("state_cache_entries", "gauge", "States kept in the state cache.", "%" PRId64,
           st->prefix.entries);
    METRIC("state_cache_bytes", "gauge", "Bytes of the kept states.", "%" PRId64,
           st->prefix.bytes);
    METRIC("state_cache_evicted_total", "counter", "States dropped for room.", "%" PRId64,
           st->prefix.evicted);
#undef METRIC
    pthread_mutex_unlock(&s->mu);
    if (bad) {
        free(b.p);
        return serve_oom(cn, c);
    }
    return serve_reply(cn, c, 200, "text/plain; version=0.0.4", b.p, b.n, 0);
}

/* Whether the request carries the API key (compared in constant time). */
static int
serve_authorized(const struct srv *s, struct MHD_Connection *c)
{
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND,
                                                MHD_HTTP_HEADER_AUTHORIZATION);
    const char *key = s->a->api_key;
    size_t n, kn;
    unsigned diff;

    if (key == NULL)
        return 1;
    if (h == NULL || strncmp(h, "Bearer ", 7) != 0)
        return 0;
    h += 7;
    n = strlen(h);
    kn = strlen(key);
    diff = n != kn;
    for (size_t i = 0; i < kn; i++)
        diff |= (unsigned)(key[i] ^ (i < n ? h[i] : 0));
    return diff == 0;
}

static enum MHD_Result
serve_route(struct srv *s, struct conn *cn, struct MHD_Connection *c, const char *url,
            const char *method)
{
    int get = strcmp(method, "GET") == 0, post = strcmp(method, "POST") == 0;
    struct bbuf b = {NULL, 0, 0};
    static const char *const posts[] = {"/v1/chat/completions", "/v1/completions", "/tokenize",
                                        "/detokenize"};
    int which = -1;

    if (strcmp(url, "/health") == 0 && get) {
        int drain;
        pthread_mutex_lock(&s->mu);
        drain = s->draining;
        pthread_mutex_unlock(&s->mu);
        bbuf_addf(&b, "{\"status\":\"%s\"}\n", drain ? "draining" : "ok");
        return serve_json(cn, c, drain ? 503 : 200, &b);
    }
    for (int i = 0; i < 4; i++)
        which = strcmp(url, posts[i]) == 0 ? i : which;
    if (which < 0 && strcmp(url, "/v1/models") != 0 && strcmp(url, "/metrics") != 0)
        return serve_fail_reply(cn, c, 404, "invalid_request_error", "unknown_url",
                                "no such endpoint (see kli(1), kli serve)");
    if (!serve_authorized(s, c))
        return serve_fail_reply(cn, c, 401, "invalid_request_error", "invalid_api_key",
                                "a valid API key is needed (Authorization: Bearer KEY)");
    if (which >= 0 ? !post : !get)
        return serve_fail_reply(cn, c, 405, "invalid_request_error", NULL,
                                which >= 0 ? "use POST here" : "use GET here");
    if (strcmp(url, "/metrics") == 0)
        return serve_metrics(s, cn, c);
    if (which < 0) {
        int bad = BB_ADD(&b, "{\"object\":\"list\",\"data\":[{\"id\":");
        bad |= bbuf_json_str(&b, s->name, strlen(s->name));
        bad |= bbuf_addf(&b, ",\"object\":\"model\",\"created\":0,\"owned_by\":\"kli\","
                         "\"context_length\":%d}]}\n", s->ctx);
        if (bad) {
            free(b.p);
            return serve_oom(cn, c);
        }
        return serve_json(cn, c, 200, &b);
    }
    if (which >= 2)
        return serve_tokens(s, cn, c, which == 2);
    return serve_complete(s, cn, c, which == 0 ? SERVE_CHAT : SERVE_COMPLETION);
}

static enum MHD_Result
serve_handle(void *cls, struct MHD_Connection *c, const char *url, const char *method,
             const char *version, const char *upload, size_t *upload_size, void **ctx)
{
    struct srv *s = cls;
    struct conn *cn = *ctx;

    (void)version;
    if (cn == NULL) {
        const union MHD_ConnectionInfo *ci;
        const char *cl;
        if ((cn = calloc(1, sizeof(*cn))) == NULL)
            return serve_oom(NULL, c);
        *ctx = cn;
        cn->t0 = util_now_s();
        snprintf(cn->method, sizeof(cn->method), "%s", method);
        snprintf(cn->path, sizeof(cn->path), "%s", url);
        for (char *p = cn->path; *p != '\0'; p++)   /* one log line, however odd the URL */
            *p = (*p <= ' ' || *p == 0x7f) ? '?' : *p;
        snprintf(cn->peer, sizeof(cn->peer), "-");
        ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        if (ci != NULL && ci->client_addr != NULL) {
            const struct sockaddr *sa = ci->client_addr;
            if (sa->sa_family == AF_INET)
                inet_ntop(AF_INET, &((const struct sockaddr_in *)(const void *)sa)->sin_addr,
                          cn->peer, sizeof(cn->peer));
            else if (sa->sa_family == AF_INET6)
                inet_ntop(AF_INET6,
                          &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr,
                          cn->peer, sizeof(cn->peer));
        }
        cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl != NULL && strtoull(cl, NULL, 10) > s->a->max_body)
            return serve_fail_reply(cn, c, 413, "invalid_request_error", NULL,
                                    "the body is over --max-body");
        return MHD_YES;
    }
    if (*upload_size > 0) {
        if (!cn->too_big && cn->body.n + *upload_size > s->a->max_body) {
            cn->too_big = 1;
            free(cn->body.p);
            memset(&cn->body, 0, sizeof(cn->body));
        }
        if (!cn->too_big && !cn->nomem && bbuf_add(&cn->body, upload, *upload_size) != 0) {
            cn->nomem = 1;   /* the rest is read and dropped; the answer is a 503 */
            free(cn->body.p);
            memset(&cn->body, 0, sizeof(cn->body));
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (cn->too_big)
        return serve_fail_reply(cn, c, 413, "invalid_request_error", NULL,
                                "the body is over --max-body");
    if (cn->nomem || (cn->body.p == NULL && BB_ADD(&cn->body, "") != 0))
        return serve_oom(cn, c);
    return serve_route(s, cn, c, url, method);
}

static void
serve_completed(void *cls, struct MHD_Connection *c, void **ctx,
                enum MHD_RequestTerminationCode toe)
{
    struct srv *s = cls;
    struct conn *cn = *ctx;
    int i;

    (void)c;
    if (cn == NULL)
        return;
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && cn->status == 200)
        cn->status = 499;   /* the client went away (nginx's code), in the log only */
    pthread_mutex_lock(&s->mu);
    for (i = 0; i < SERVE_STATUSES - 1 && serve_codes[i] != cn->status; i++)
        ;
    s->by_status[i]++;
    if (cn->job != NULL && !cn->job->done) {
        /* the client went away: cancel, and wait (a step, at most 10 s) for the end, so
         * that the log line tells how the request ended */
        double until = util_now_s() + 10;
        cn->job->cancel = 1;
        pthread_cond_signal(&s->cv);
        while (!cn->job->done && util_now_s() < until)
            job_wait(cn->job);
    }
    pthread_mutex_unlock(&s->mu);
    serve_log(s, cn, cn->job);
    if (cn->job != NULL) {
        pthread_mutex_lock(&s->mu);
        job_unref(cn->job);
        s->n_answering--;
        pthread_mutex_unlock(&s->mu);
    }
    free(cn->body.p);
    free(cn);
    *ctx = NULL;
}

/* ==== the command ========================================================================= */

static int
serve_loopback(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)(const void *)sa)->sin_addr.s_addr) >> 24)
               == 127;
    return IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr);
}

static int
serve_open_log(struct srv *s, const char *path)
{
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0640);

    if (fd < 0) {
        cli_error("--log: %s: %s", path, strerror(errno));
        return -1;
    }
    pthread_mutex_lock(&s->log_mu);
    if (s->log_fd > STDERR_FILENO)
        close(s->log_fd);
    s->log_fd = fd;
    pthread_mutex_unlock(&s->log_mu);
    return 0;
}

/* The served model's name: --model-name, else the last part of its path. */
static const char *
serve_name(const struct serve_args *a, char *buf, size_t cap)
{
    const char *p = a->ca.model;
    size_t n;

    if (a->name != NULL)
        return a->name;
    if (p == NULL)
        return "kli-demo";
    n = strlen(p);
    while (n > 1 && p[n - 1] == '/')
        n--;
    const char *q = p + n;
    while (q > p && q[-1] != '/')
        q--;
    snprintf(buf, cap, "%.*s", (int)(p + n - q), q);
    return buf[0] != '\0' ? buf : "kli";
}

/* The state cache shares this process's memory with the running sessions and with every
 * connection's buffers and thread: kept states that fill all the room left make the next
 * connection's allocations fail, and the client sees its connection reset (ulimit -v). So
 * without --state-cache the cache keeps at most an eighth of the room the process has
 * before its sessions exist (cli_mem_room): the rest is for what requests take while they
 * run (the sessions' buffers, OpenBLAS's, the connections), which grows well past what the
 * process maps at start. A --state-cache above half of the room is kept as given, with a
 * warning. */
static void
serve_state_room(struct serve_args *a)
{
    const char *why;
    int64_t room = cli_mem_room(&why);

    if (room < 0 || a->state_bytes == 0)
        return;
    if (!a->state_given && a->state_bytes > (uint64_t)room / 8) {
        a->state_bytes = (uint64_t)room / 8;
        fprintf(stderr, "kli serve: %s leaves %.0f MiB: the state cache keeps at most "
                "%.0f MiB (--state-cache)\n", why, (double)room / 1048576.0,
                (double)a->state_bytes / 1048576.0);
    } else if (a->state_given && a->state_bytes > (uint64_t)room / 2) {
        fprintf(stderr, "kli serve: warning: --state-cache %.0f MiB is over half of the "
                "%.0f MiB that %s leaves: requests may fail for memory once it fills\n",
                (double)a->state_bytes / 1048576.0, (double)room / 1048576.0, why);
    }
}

int
cli_serve(int argc, char **argv)
{
    struct serve_args a;
    struct srv s;
    struct sockaddr_storage addr;
    struct kli_sched_options so;
    struct kli_err err = {0};
    struct MHD_Daemon *d = NULL;
    pthread_t loop;
    int loop_started = 0, rc = 1, pr, v6 = 0, sig;
    char namebuf[256];
    sigset_t set;

    if ((pr = serve_parse(argc, argv, &a)) != 0)
        return pr > 0 ? 0 : 2;
    memset(&s, 0, sizeof(s));
    memset(&addr, 0, sizeof(addr));
    s.a = &a;
    s.log_fd = STDERR_FILENO;
    pthread_mutex_init(&s.mu, NULL);
    pthread_mutex_init(&s.log_mu, NULL);
    pthread_cond_init(&s.cv, NULL);
    {
        struct sockaddr_in *a4 = (struct sockaddr_in *)(void *)&addr;
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)(void *)&addr;
        if (inet_pton(AF_INET, a.host, &a4->sin_addr) == 1) {
            a4->sin_family = AF_INET;
            a4->sin_port = htons((uint16_t)a.port);
        } else if (inet_pton(AF_INET6, a.host, &a6->sin6_addr) == 1) {
            a6->sin6_family = AF_INET6;
            a6->sin6_port = htons((uint16_t)a.port);
            v6 = 1;
        } else {
            cli_error("--host: '%s' is not an IPv4 or IPv6 address", a.host);
            rc = 2;
            goto out;
        }
    }
    if (!serve_loopback((struct sockaddr *)&addr) && a.api_key == NULL && !a.insecure) {
        cli_error("serve: --host %s is reachable from other machines: give --api-key or "
                  "--api-key-file (or --insecure to serve without one)", a.host);
        rc = 2;
        goto out;
    }
    if (a.log != NULL && serve_open_log(&s, a.log) != 0)
        goto out;
    s.name = serve_name(&a, namebuf, sizeof(namebuf));

    serve_json_hooks();
    if (serve_oom_init() != 0) {
        cli_error("serve: out of memory");
        goto out;
    }
    const char *path = cli_model_path(a.ca.model, a.ca.demo, sizeof(a.ca.demo));
    if (path == NULL || cli_open_model(path, cli_threads(a.threads), &s.model) != 0)
        goto out;
    if ((s.tok = kli_model_tokenizer(s.model)) == NULL) {
        cli_error("%s: no tokenizer (tiktoken.model) in the model directory", path);
        goto out;
    }
    kli_sched_options_init(&so);
    so.parallel = (int32_t)a.parallel;
    so.ctx_max = (int32_t)a.ctx;
    so.min_prefix = (int32_t)a.min_prefix;
    serve_state_room(&a);
    so.prefix_bytes = a.state_bytes;
    so.prefix_dir = a.state_dir;
    if (a.state_dir != NULL)
        so.prefix_key = cli_model_key(path, s.model);
    so.ud = &s;
    so.on_token = serve_on_token;
    so.on_finish = serve_on_finish;
    so.should_stop = serve_should_stop;
    so.on_notice = serve_on_notice;
    so.keep_finished = 1;   /* a conversation's next turn starts where it ended */
    if (kli_sched_create(&s.sched, s.model, &so, &err) != KLI_OK) {
        cli_error(err.code == KLI_E_IO ? "--state-dir: %s" : "%s", err.msg);
        goto out;
    }
    {
        /* the context: --ctx, or the model's (a session knows it) */
        struct kli_session *probe = NULL;
        struct kli_session_options sopt;
        kli_session_options_init(&sopt);
        sopt.ctx_max = (int32_t)a.ctx;
        sopt.batch_max = 1;
        if (kli_session_create(&probe, s.model, &sopt, &err) != KLI_OK) {
            cli_error("%s", err.msg);
            goto out;
        }
        s.ctx = kli_session_ctx_max(probe);
        kli_session_free(probe);
    }
    s.lim.so = a.so;
    s.lim.seeded = a.seeded;
    s.lim.max_tokens = (int32_t)a.max_tokens;
    s.lim.max_tokens_limit = (int32_t)a.max_tokens_limit;
    s.lim.n_vocab = kli_model_n_vocab(s.model);
    s.lim.max_prompt_tokens = a.max_prompt > 0 && a.max_prompt < s.ctx ? (int32_t)a.max_prompt
                                                                         : s.ctx;

    /* Signals go to this thread alone (sigwait below): block them before any thread starts. */
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (pthread_create(&loop, NULL, serve_loop, &s) != 0) {
        cli_error("serve: cannot start a thread");
        goto out;
    }
    loop_started = 1;
    d = MHD_start_daemon(MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                         MHD_USE_ITC | (v6 ? MHD_USE_IPv6 : 0), 0, NULL, NULL,
                         serve_handle, &s,
                         MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
                         MHD_OPTION_NOTIFY_COMPLETED, serve_completed, &s,
                         MHD_OPTION_CONNECTION_LIMIT, (unsigned)(4 * a.queue + 64),
                         MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)60,
                         /* not RLIMIT_STACK's 8 MiB of address space per connection:
                          * a handler parses JSON and writes answers from the heap */
                         MHD_OPTION_THREAD_STACK_SIZE, (size_t)(1 << 20),
                         MHD_OPTION_END);
    if (d == NULL) {
        cli_error("serve: cannot listen on %s port %ld: %s", a.host, a.port, strerror(errno));
        goto out;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    fprintf(stderr, "kli serve: %s on http://%s%s%s:%u/ (%ld in parallel, context %d)\n",
            s.name, v6 ? "[" : "", a.host, v6 ? "]" : "", di != NULL ? di->port : 0,
            a.parallel, s.ctx);

    for (;;) {
        if (sigwait(&set, &sig) != 0)
            continue;
        if (sig != SIGHUP)
            break;
        if (a.log != NULL)
            serve_open_log(&s, a.log);
    }
    /* Stop accepting, let the running requests finish within --grace, cancel the rest. */
    fprintf(stderr, "kli serve: %s: finishing the requests running (--grace %ld s)\n",
            strsignal(sig), a.grace);
    /* new connections are refused from now on (a load balancer moves on) */
    MHD_socket lfd = MHD_quiesce_daemon(d);
    if (lfd != MHD_INVALID_SOCKET)
        close(lfd);
    pthread_mutex_lock(&s.mu);
    s.draining = 1;
    pthread_mutex_unlock(&s.mu);
    double end = util_now_s() + (double)a.grace;
    for (;;) {
        struct timespec ts = {0, 50000000};
        int left;
        pthread_mutex_lock(&s.mu);
        left = s.n_jobs;
        pthread_mutex_unlock(&s.mu);
        if (left == 0 || util_now_s() >= end || sigtimedwait(&set, NULL, &ts) > 0)
            break;
    }
    rc = 0;
out:
    if (loop_started) {
        pthread_mutex_lock(&s.mu);
        s.stop = 1;
        s.stop_now = 1;
        pthread_cond_signal(&s.cv);
        pthread_mutex_unlock(&s.mu);
        pthread_join(loop, NULL);
    }
    kli_sched_free(s.sched);   /* what still runs ends as cancelled */
    pthread_mutex_lock(&s.mu);
    for (struct job *j = s.inbox, *next; j != NULL; j = next) {
        next = j->next;
        j->finish = KLI_FINISH_INTERRUPT;
        job_end(&s, j);
    }
    s.inbox = NULL;
    pthread_mutex_unlock(&s.mu);
    /* the answers (a cancelled stream's error event and [DONE]) go out, for up to 2 s */
    for (double until = util_now_s() + 2; d != NULL && util_now_s() < until;) {
        struct timespec ts = {0, 20000000};
        int left;
        pthread_mutex_lock(&s.mu);
        left = s.n_answering;
        pthread_mutex_unlock(&s.mu);
        if (left == 0)
            break;
        nanosleep(&ts, NULL);
    }
    if (d != NULL)
        MHD_stop_daemon(d);
    if (serve_oom_resp != NULL)
        MHD_destroy_response(serve_oom_resp);
    kli_model_close(s.model);
    cli_demo_remove(a.ca.demo);
    if (s.log_fd > STDERR_FILENO)
        close(s.log_fd);
    free(a.api_key);
    pthread_cond_destroy(&s.cv);
    pthread_mutex_destroy(&s.mu);
    pthread_mutex_destroy(&s.log_mu);
    return rc;
}

#endif
