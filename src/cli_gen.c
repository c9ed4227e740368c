/*
 * cli_gen.c - the text commands of kli: run, chat, tokenize, detokenize.
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "kli.h"
#include "cli.h"
#include "cli_batch.h"
#include "cli_toolcall.h"
#include "util.h"

/* ==== options shared by run and chat ====================================================== */

enum {
    OPT_SPECIAL = 256, OPT_MESSAGES, OPT_SAVE_STATE, OPT_LOAD_STATE, OPT_TOOLS, OPT_TOOL_CHOICE,
    OPT_LOGPROBS, OPT_LOGPROBS_FILE
};


struct gen_args {
    struct cli_args ca;                    /* -m, --help, the demo model */
    struct cli_gen_opts g;                 /* the options run and chat share with batch */
    const char *prompt, *file, *messages;
    const char *save_state, *load_state;   /* kli run --save-state / --load-state */
    const char *tools, *tool_choice;       /* kli run --tools / --tool-choice */
    int special;
    long logprobs;                         /* kli run --logprobs N; -1: none */
    const char *logprobs_file;             /* --logprobs-file; NULL: standard error */
};

static const struct option run_opts[] = {
    CLI_GEN_LONGOPTS,
    CLI_GEN_RAW_LONGOPT,
    {"prompt", required_argument, NULL, 'p'},
    {"file", required_argument, NULL, 'f'},
    {"messages", required_argument, NULL, OPT_MESSAGES},
    {"special", no_argument, NULL, OPT_SPECIAL},
    {"save-state", required_argument, NULL, OPT_SAVE_STATE},
    {"load-state", required_argument, NULL, OPT_LOAD_STATE},
    {"tools", required_argument, NULL, OPT_TOOLS},
    {"tool-choice", required_argument, NULL, OPT_TOOL_CHOICE},
    {"logprobs", required_argument, NULL, OPT_LOGPROBS},
    {"logprobs-file", required_argument, NULL, OPT_LOGPROBS_FILE},
    CLI_HELP_LONGOPT,
    CLI_LONGOPTS_END,
};

/* chat takes those of run but the prompt's (-p, -f, --messages, --raw), the tools' and the
 * state files' (it has /save and /load). */
static const struct option chat_opts[] = {
    CLI_GEN_LONGOPTS,
    {"special", no_argument, NULL, OPT_SPECIAL},
    CLI_HELP_LONGOPT,
    CLI_LONGOPTS_END,
};

/* @return 0 to go on, 1 for --help (already printed), -1 for a usage error. */
static int
gen_parse(int argc, char **argv, const struct option *opts, const char *shortopts,
          struct gen_args *a, const char *usage)
{
    int c;

    memset(a, 0, sizeof(*a));
    a->logprobs = -1;
    cli_gen_init(&a->g);
    a->ca.usage = usage;
    a->ca.gen = &a->g;
    while ((c = cli_getopt(argc, argv, shortopts, opts, &a->ca)) > 0) {
        switch (c) {
        case 'p': a->prompt = optarg; break;
        case 'f': a->file = optarg; break;
        case OPT_MESSAGES: a->messages = optarg; break;
        case OPT_SPECIAL: a->special = 1; break;
        case OPT_SAVE_STATE: a->save_state = optarg; break;
        case OPT_LOAD_STATE: a->load_state = optarg; break;
        case OPT_TOOLS: a->tools = optarg; break;
        case OPT_TOOL_CHOICE: a->tool_choice = optarg; break;
        case OPT_LOGPROBS:
            if (cli_parse_int(optarg, 0, KLI_LOGPROBS_MAX, "--logprobs", &a->logprobs) != 0)
                return -1;
            break;
        case OPT_LOGPROBS_FILE: a->logprobs_file = optarg; break;
        }
    }
    if (c != CLI_ARGS_END)
        return c == CLI_ARGS_HELP ? 1 : -1;
    if (cli_no_operands(argc, argv, NULL) != 0)
        return -1;
    /* Check the sampling options now, before a model is loaded. */
    return cli_gen_check(&a->g);
}

/* ==== streaming output and interruption =================================================== */

static volatile sig_atomic_t gen_interrupted;
static int gen_write_failed;
static struct cli_text gen_text;   /* what generation writes goes through cli_text_write */

static void
gen_on_sigint(int sig)
{
    (void)sig;
    gen_interrupted = 1;
}

static int
gen_print(void *ud, const char *text, size_t len)
{
    (void)ud;
    if (cli_text_write(&gen_text, stdout, text, len) != 0 || fflush(stdout) != 0) {
        gen_write_failed = 1;
        return 1;
    }
    return gen_interrupted ? 1 : 0;
}

static const char *
finish_name(enum kli_finish f)
{
    switch (f) {
    case KLI_FINISH_EOS: return "end of turn";
    case KLI_FINISH_STOP: return "stop string";
    case KLI_FINISH_LENGTH: return "token limit";
    case KLI_FINISH_INTERRUPT: return "interrupted";
    default: return "none";
    }
}

static void
gen_report(const struct kli_generate_result *r)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    fprintf(stderr,
            "\nkli: prompt %d tokens, prefill %.1f tok/s | generated %d tokens, decode %.1f "
            "tok/s | peak memory %.1f MiB | stop: %s\n",
            r->n_prompt, r->prefill_seconds > 0 ? r->n_prompt / r->prefill_seconds : 0.0,
            r->n_generated, r->decode_seconds > 0 ? r->n_generated / r->decode_seconds : 0.0,
            (double)ru.ru_maxrss / 1024.0, finish_name(r->finish));
}

static int64_t
gen_oom(struct kli_err *err)
{
    err->code = KLI_E_NOMEM;
    snprintf(err->msg, sizeof(err->msg), "out of memory");
    return KLI_E_NOMEM;
}

/* ==== prompts ============================================================================= */

/* The most bytes of a prompt file (-f, standard input, --messages): a prompt longer than the
 * context could only be refused, and no token of a real vocabulary is near 128 bytes long, so
 * --ctx bounds it; without --ctx the context is the model's, not known yet. */
#define GEN_PROMPT_LIMIT "the limit is 128 bytes per token of --ctx, at least 1 MiB, or 64 MiB " \
    "without --ctx"

static size_t
gen_prompt_max(long ctx)
{
    size_t most = (size_t)ctx * CLI_PROMPT_PER_TOKEN;

    if (ctx <= 0)
        return CLI_TEXT_MAX;
    return most < ((size_t)1 << 20) ? (size_t)1 << 20 : most;
}

/* Tokens of a messages JSON file: [{"role": ..., "content": ...}, ...]. */
static int64_t
messages_tokens(const struct kli_tokenizer *tok, const char *path, size_t max, kli_token **ids,
                struct kli_err *err)
{
    size_t len;
    char *text = cli_read_file(path, max, 0, GEN_PROMPT_LIMIT, &len);
    cJSON *root = NULL;
    struct kli_chat_message *msgs = NULL;
    int64_t n = -1;

    if (text == NULL)
        return -1;
    root = cJSON_ParseWithLength(text, len);
    if (root == NULL || !cJSON_IsArray(root)) {
        cli_error("%s: expected a JSON array of {\"role\", \"content\"} objects", path);
        goto out;
    }
    int64_t nul = cli_find_nul(text, len, 1);
    if (nul >= 0) {
        cli_error("%s: a NUL (\\u0000) at byte %lld: prompts cannot hold NUL bytes", path,
                  (long long)nul + 1);
        goto out;
    }
    int count = cJSON_GetArraySize(root);
    msgs = calloc((size_t)count + 1, sizeof(*msgs));
    if (msgs == NULL)
        goto out;
    for (int i = 0; i < count; i++) {
        cJSON *m = cJSON_GetArrayItem(root, i);
        cJSON *r = cJSON_GetObjectItemCaseSensitive(m, "role");
        cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
        if (!cJSON_IsString(r) || !cJSON_IsString(c)) {
            cli_error("%s: message %d needs string \"role\" and \"content\"", path, i);
            goto out;
        }
        msgs[i].role = r->valuestring;
        msgs[i].content = c->valuestring;
    }
    n = kli_chat_render(tok, msgs, count, 1, 0, NULL, 0, err);
    if (n < 0 || (*ids = malloc((size_t)n * sizeof(kli_token) + 1)) == NULL) {
        cli_error("%s: %s", path, err->msg);
        n = -1;
        goto out;
    }
    n = kli_chat_render(tok, msgs, count, 1, 0, *ids, n, err);
out:
    free(msgs);
    cJSON_Delete(root);
    free(text);
    return n;
}

/* With `cont`, the session already holds a conversation (a loaded state): the chat format
 * renders the next turn as kli chat does, after an <|im_end|> that closes the last answer. */
static int64_t
prompt_tokens(const struct gen_args *a, const struct kli_tokenizer *tok, const char *text,
              size_t len, int cont, kli_token **ids, struct kli_err *err)
{
    int64_t n;
    int off = cont ? 1 : 0;

    if (a->g.raw) {
        *ids = malloc((len + 1) * sizeof(kli_token));
        if (*ids == NULL)
            return gen_oom(err);
        n = kli_tokenize(tok, text, len, a->special ? KLI_TOKENIZE_SPECIAL : 0, *ids,
                         (int64_t)len + 1, err);
        return n;
    }
    struct kli_chat_message msgs[2];
    int nm = 0;
    if (a->g.system != NULL) {
        msgs[nm].role = "system";
        msgs[nm++].content = a->g.system;
    }
    msgs[nm].role = "user";
    msgs[nm++].content = text;
    n = kli_chat_render(tok, msgs, nm, 1, cont, NULL, 0, err);
    if (n < 0)
        return n;
    *ids = malloc(((size_t)n + 1) * sizeof(kli_token));
    if (*ids == NULL)
        return gen_oom(err);
    if (cont)
        (*ids)[0] = kli_tokenizer_find_special(tok, "<|im_end|>");
    n = kli_chat_render(tok, msgs, nm, 1, cont, *ids + off, n, err);
    return n < 0 ? n : n + off;
}

/* ==== kli run --tools ===================================================================== */

/* The declarations of --tools, --tool-choice and the answer, collected. */
struct gen_tools {
    cJSON *tools;               /* the file's array */
    cJSON *choice;              /* --tool-choice as a request gives tool_choice */
    const char *forced;         /* NULL, "" (required) or a function's name */
    int none;
    char *schema, *prefix;      /* what a forced call is constrained with (tc_forced_grammar) */
    char *out;                  /* the answer, special tokens by name */
    size_t n, cap;
    struct gen_lp *lp;          /* --logprobs with --tools: the writer (gen_tools_on_token) */
};

static int
gen_collect(void *ud, const char *text, size_t len)
{
    struct gen_tools *t = ud;

    if (util_text_add(&t->out, &t->n, &t->cap, text, len) != 0) {
        gen_write_failed = 1;
        return 1;
    }
    return gen_interrupted ? 1 : 0;
}

static void
gen_tools_free(struct gen_tools *t)
{
    cJSON_Delete(t->tools);
    cJSON_Delete(t->choice);
    free(t->schema);
    free(t->prefix);
    free(t->out);
}

/* Reads --tools and --tool-choice. @return 0, or -1 after reporting. */
static int
gen_tools_open(const struct gen_args *a, struct gen_tools *t)
{
    size_t len;
    char msg[256];
    char *text = cli_read_file(a->tools, CLI_SCHEMA_MAX, 0, "(the limit is 1 MiB)", &len);
    const char *c = a->tool_choice != NULL ? a->tool_choice : "auto";

    if (text == NULL)
        return -1;
    t->tools = cJSON_ParseWithLength(text, len);
    free(text);
    if (!cJSON_IsArray(t->tools)) {
        cli_error("%s: expected a JSON array of tool declarations", a->tools);
        return -1;
    }
    if (strcmp(c, "auto") == 0 || strcmp(c, "none") == 0 || strcmp(c, "required") == 0) {
        t->choice = cJSON_CreateString(c);
    } else if ((t->choice = cJSON_CreateObject()) != NULL) {
        cJSON *fn = cJSON_AddObjectToObject(t->choice, "function");
        if (cJSON_AddStringToObject(t->choice, "type", "function") == NULL || fn == NULL ||
            cJSON_AddStringToObject(fn, "name", c) == NULL) {
            cli_error("out of memory");
            return -1;
        }
    }
    if (t->choice == NULL) {
        cli_error("out of memory");
        return -1;
    }
    if (tc_check(t->tools, t->choice, &t->forced, &t->none, msg, sizeof(msg)) != 0) {
        cli_error("%s: %s", a->tools, msg);
        return -1;
    }
    if (t->forced != NULL && tc_forced_grammar(t->tools, t->forced, &t->schema,
                                               &t->prefix) != 0) {
        cli_error("out of memory");
        return -1;
    }
    return 0;
}

/* The prompt with the tools: the conversation of --messages (tool calls and results
 * included) or -s and the prompt, then the text a forced call starts with. */
static int64_t
gen_tools_prompt(const struct gen_args *a, const struct gen_tools *t,
                 const struct kli_tokenizer *tok, const char *text, int cont, kli_token **ids,
                 struct kli_err *err)
{
    cJSON *msgs = NULL;
    int64_t n;

    if (a->messages != NULL) {
        size_t len;
        char *f = cli_read_file(a->messages, gen_prompt_max(a->g.ctx), 0, GEN_PROMPT_LIMIT,
                                &len);
        if (f == NULL)
            return -1;   /* reported */
        msgs = cJSON_ParseWithLength(f, len);
        free(f);
        if (msgs == NULL) {
            cli_error("%s: not JSON", a->messages);
            return -1;
        }
    } else {
        msgs = tc_messages(a->g.system, text);
    }
    if (msgs == NULL)
        return gen_oom(err);
    n = tc_render(tok, msgs, t->tools, t->prefix, cont, ids, err);
    cJSON_Delete(msgs);
    return n;
}

/* Prints the answer as an assistant message: {"content", "tool_calls", "finish_reason"}. */
static int
gen_tools_print(const struct gen_tools *t, const struct kli_generate_result *r)
{
    char msg[256] = "", *content = NULL, *js;
    cJSON *calls = NULL, *o = cJSON_CreateObject();
    const char *text = t->out != NULL ? t->out : "";
    int rc;

    rc = tc_answer(text, t->n, NULL, 0, t->tools, t->forced, &content, &calls, msg,
                   sizeof(msg), cli_utf8_seq);
    if (rc == 1)
        fprintf(stderr, "kli: the tool calls are malformed (%s): the answer is given as "
                "content\n", msg);
    if (rc < 0 || o == NULL) {
        cli_error("out of memory");
        cJSON_Delete(o);
        cJSON_Delete(calls);
        free(content);
        return -1;
    }
    const char *fin = calls != NULL ? "tool_calls" :
                      r->finish == KLI_FINISH_LENGTH ? "length" : "stop";
    if (calls != NULL && content[0] == '\0')
        cJSON_AddNullToObject(o, "content");
    else
        cJSON_AddStringToObject(o, "content", content);
    if (calls != NULL)
        cJSON_AddItemToObject(o, "tool_calls", calls);
    cJSON_AddStringToObject(o, "finish_reason", fin);
    free(content);
    js = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (js == NULL) {
        cli_error("out of memory");
        return -1;
    }
    printf("%s\n", js);
    free(js);
    return 0;
}

/* ==== kli run ============================================================================= */

/* kli run --logprobs: one JSON line per generated token (lp_chat_entry with ids). */
struct gen_lp {
    const struct kli_tokenizer *tok;
    FILE *f;
    struct bbuf line;
    int failed;
};

static void
gen_on_logprobs(void *ud, kli_token token, const struct kli_logprobs *lp)
{
    struct gen_lp *g = ud;

    (void)token;
    if (lp == NULL || g->failed)
        return;
    g->line.n = 0;
    if (lp_chat_entry(&g->line, g->tok, lp, 1) != 0 || bbuf_add(&g->line, "\n", 1) != 0 ||
        fwrite(g->line.p, 1, g->line.n, g->f) != g->line.n)
        g->failed = 1;
}

/* on_token under --tools: the tools' context carries the logprobs writer. */
static void
gen_tools_on_token(void *ud, kli_token token, const struct kli_logprobs *lp)
{
    gen_on_logprobs(((struct gen_tools *)ud)->lp, token, lp);
}

/* What run and chat open alike: the model with its tokenizer, a session of --ctx positions,
 * the sampler and the generation options (printing through gen_print). */
struct gen_session {
    struct kli_model *m;
    const struct kli_tokenizer *tok;
    struct kli_session *s;
    struct kli_sampler *smp;
    struct kli_grammar *gram;   /* --json, --json-schema */
    struct kli_generate_options go;
};

/* (Re)starts the JSON value of --json / --json-schema for the next answer. @return 0, or -1
 * after reporting. */
static int
gen_grammar_start(struct gen_session *gs, const struct gen_args *a)
{
    struct kli_err err = {0};

    if (gs->gram != NULL &&
        kli_sampler_set_grammar(gs->smp, gs->gram, (int32_t)a->g.max_tokens, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        return -1;
    }
    return 0;
}

/* After an answer under --json / --json-schema: a value the grammar could not go on with is
 * an error; one cut short by a stop string or Ctrl-C is reported. @return 0, or -1. */
static int
gen_grammar_check(const struct gen_session *gs, const struct kli_generate_result *r)
{
    int st = kli_sampler_grammar_status(gs->smp);

    if (gs->gram == NULL || st == 1)
        return 0;
    if (st < 0) {
        cli_error("no token could continue the JSON value: the output is incomplete");
        return -1;
    }
    if (r->finish == KLI_FINISH_STOP || r->finish == KLI_FINISH_INTERRUPT)
        fprintf(stderr, "kli: the JSON value is incomplete (%s)\n", finish_name(r->finish));
    return 0;
}

/* Opens gs (zeroed) from the model at `path`; gen_close frees it also on failure.
 * @return 0, or -1 after reporting. */
static int
gen_open(const struct gen_args *a, const char *path, struct gen_session *gs)
{
    struct kli_session_options sopt;
    struct kli_err err = {0};

    if (cli_open_model(path, cli_threads(a->g.threads), &gs->m) != 0)
        return -1;
    gs->tok = kli_model_tokenizer(gs->m);
    if (gs->tok == NULL) {
        cli_error("%s: no tokenizer (tiktoken.model) in the model directory", path);
        return -1;
    }
    kli_session_options_init(&sopt);
    sopt.ctx_max = (int32_t)a->g.ctx;
    sopt.cache_type = a->g.cache_type;
    if (a->g.ctx > 0 && cli_ctx_fits(gs->m, a->g.cache_type, a->g.ctx) != 0)
        return -1;
    if (kli_session_create(&gs->s, gs->m, &sopt, &err) != KLI_OK ||
        kli_sampler_create(&gs->smp, &a->g.so, kli_model_n_vocab(gs->m), &err) != KLI_OK) {
        cli_error("%s", err.msg);
        return -1;
    }
    if (cli_gen_grammar(&a->g, gs->tok, &gs->gram) != 0)
        return -1;
    if (gen_grammar_start(gs, a) != 0)
        return -1;
    kli_generate_options_init(&gs->go);
    gs->go.max_tokens = (int32_t)a->g.max_tokens;
    gs->go.stop = a->g.stop;
    gs->go.n_stop = a->g.n_stop;
    gs->go.on_text = gen_print;
    return 0;
}

/* Frees what gen_open opened (after the edge-mode report) and the demo model directory. */
static void
gen_close(struct gen_session *gs, const struct gen_args *a)
{
    kli_sampler_free(gs->smp);
    kli_grammar_free(gs->gram);
    kli_session_free(gs->s);
    cli_cache_report(gs->m);
    kli_model_close(gs->m);
    cli_demo_remove(a->ca.demo);
}

/* kli run's output file `out` (NULL: none, fine) may be none of its inputs: the model at
 * `path`, the files of -f, --messages, --tools and --json-schema, --load-state's (which
 * --save-state alone may replace), nor `other` (another output, or NULL). @return 0, or -1
 * after reporting. */
static int
run_output_check(const struct gen_args *a, const char *out, const char *path,
                 const char *other, const char *opt)
{
    struct kli_err err = {0};
    const char *in[] = {path, a->file, a->messages, a->tools, a->g.json_schema, other,
                        out == a->save_state ? NULL : a->load_state};

    if (out != NULL && other != NULL && strcmp(out, other) == 0) {
        cli_error("%s: '%s' is another output of this run too", opt, out);
        return -1;
    }
    for (size_t i = 0; out != NULL && i < sizeof(in) / sizeof(in[0]); i++) {
        if (in[i] != NULL && kli_output_check(out, in[i], &err) != KLI_OK) {
            cli_error("%s: %s", opt, err.msg);
            return -1;
        }
    }
    return 0;
}

static const char run_usage[] =
    "usage: kli run [-m|--model MODEL] [-p|--prompt TEXT | -f|--file FILE | --messages JSON]\n"
    "               [--raw] [--special] [-s|--system SYSTEM] [-n|--max-tokens MAX]\n"
    "               [--tools FILE [--tool-choice auto|none|required|NAME]]\n"
    "               [--stop STR]... [--ctx N] [--cache-type T] [--quiet]\n"
    "               [--load-state FILE] [--save-state FILE]\n"
    "               [--logprobs N [--logprobs-file FILE]] [-h|--help]\n"
    CLI_JSON_HELP CLI_SAMPLING_HELP CLI_PLACEMENT_HELP CLI_GPU_HELP
    "Without -m, the built-in demo model runs. Without -p/-f, the prompt is read from stdin.\n";

static int
cmd_run(int argc, char **argv)
{
    struct gen_args a;
    struct gen_session gs = {0};
    struct gen_tools gt = {0};
    struct kli_err err = {0};
    struct kli_generate_result res;
    kli_token *ids = NULL;
    char *text = NULL;
    size_t len = 0;
    int64_t n;
    int rc = 1, pr;
    struct gen_lp glp = {0};
    struct kli_outfile *lpf = NULL;

    if ((pr = gen_parse(argc, argv, run_opts, "m:p:f:s:n:t:h", &a, run_usage)) != 0)
        return pr > 0 ? 0 : 2;
    if (a.logprobs_file != NULL && a.logprobs < 0) {
        cli_error("run: --logprobs-file needs --logprobs N");
        return 2;
    }
    if ((a.prompt != NULL) + (a.file != NULL) + (a.messages != NULL) > 1) {
        cli_error("run: give one of -p, -f and --messages");
        return 2;
    }
    if (a.messages != NULL && a.g.raw) {
        cli_error("run: --messages and --raw do not go together");
        return 2;
    }
    if (a.g.system != NULL && (a.g.raw || a.messages != NULL)) {
        cli_error("run: -s applies to the chat format; with --messages put the system turn in "
                  "the file, with --raw in the text");
        return 2;
    }
    if (a.tools == NULL && a.tool_choice != NULL) {
        cli_error("run: --tool-choice needs --tools");
        return 2;
    }
    if (a.tools != NULL && (a.g.raw || a.g.json || a.g.json_schema != NULL)) {
        cli_error("run: --tools does not go with --raw, --json or --json-schema");
        return 2;
    }
    /* a forced call is constrained by a grammar, which needs a token limit (as --json) */
    if (a.tool_choice != NULL && strcmp(a.tool_choice, "auto") != 0 &&
        strcmp(a.tool_choice, "none") != 0 && a.g.max_tokens == 0) {
        cli_error("run: --tool-choice %s needs --max-tokens above 0", a.tool_choice);
        return 2;
    }
    if (a.prompt != NULL) {
        len = strlen(a.prompt);
        text = strdup(a.prompt);
    } else if (a.messages == NULL) {
        if (a.file == NULL && isatty(STDIN_FILENO))
            fprintf(stderr, "kli: reading the prompt from standard input (end with Ctrl-D)\n");
        text = cli_read_file(a.file != NULL ? a.file : "-", gen_prompt_max(a.g.ctx), 0,
                             GEN_PROMPT_LIMIT, &len);
        if (text == NULL)
            return 1;
        int64_t nul = cli_find_nul(text, len, 0);
        if (nul >= 0) {
            cli_error("%s: a NUL byte at byte %lld: prompts cannot hold NUL bytes",
                      a.file != NULL ? a.file : "standard input", (long long)nul + 1);
            free(text);
            return 1;
        }
    }
    /* From here on Ctrl-C ends generation cleanly (and removes the demo directory). */
    signal(SIGINT, gen_on_sigint);
    const char *path = cli_model_path(a.ca.model, a.ca.demo, sizeof(a.ca.demo));
    if (path == NULL)
        goto out;
    /* the state file may be the one loaded (it is replaced at the end), never an input */
    if (run_output_check(&a, a.save_state, path, NULL, "--save-state") != 0 ||
        run_output_check(&a, a.logprobs_file, path, a.save_state, "--logprobs-file") != 0)
        goto out;
    if (gen_open(&a, path, &gs) != 0 || (a.tools != NULL && gen_tools_open(&a, &gt) != 0))
        goto out;
    if (a.logprobs >= 0) {
        if (kli_sampler_set_logprobs(gs.smp, (int32_t)a.logprobs, &err) != KLI_OK) {
            cli_error("%s", err.msg);
            goto out;
        }
        glp.tok = gs.tok;
        glp.f = stderr;
        if (a.logprobs_file != NULL) {
            int fd = -1;
            if (kli_outfile_open(&lpf, a.logprobs_file, KLI_OUTFILE_STREAM, &err) != KLI_OK ||
                (fd = dup(kli_outfile_fd(lpf))) < 0 || (glp.f = fdopen(fd, "wb")) == NULL) {
                cli_error("%s", err.code != 0 ? err.msg : strerror(errno));
                if (fd >= 0)
                    close(fd);
                glp.f = NULL;
                goto out;
            }
        }
        gs.go.on_token = gen_on_logprobs;
        gs.go.ud = &glp;
    }
    gs.go.special = a.special;
    if (a.tools != NULL && !gt.none) {
        /* the answer is read for its calls: collected, the markers by name */
        gs.go.on_text = gen_collect;
        gs.go.ud = &gt;
        gs.go.special = a.special ? 1 : 2;
        if (gs.go.on_token != NULL) {   /* one ud for both: the logprobs writer through gt */
            gt.lp = &glp;
            gs.go.on_token = gen_tools_on_token;
        }
    }
    if (gt.schema != NULL &&
        (kli_grammar_create(&gs.gram, gs.tok, gt.schema, strlen(gt.schema), &err) != KLI_OK ||
         gen_grammar_start(&gs, &a) != 0)) {
        if (err.msg[0] != '\0')
            cli_error("%s: a function's parameters: %s", a.tools, err.msg);
        goto out;
    }
    if (a.load_state != NULL && kli_session_load(gs.s, gs.smp, a.load_state, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        goto out;
    }
    if (a.tools != NULL)
        n = gen_tools_prompt(&a, &gt, gs.tok, text, kli_session_pos(gs.s) > 0, &ids, &err);
    else if (a.messages != NULL)
        n = messages_tokens(gs.tok, a.messages, gen_prompt_max(a.g.ctx), &ids, &err);
    else
        n = prompt_tokens(&a, gs.tok, text, len, kli_session_pos(gs.s) > 0, &ids, &err);
    if (n < 0) {
        if (err.msg[0] != '\0')
            cli_error("prompt: %s", err.msg);
        goto out;
    }
    if (kli_generate(gs.s, gs.tok, gs.smp, ids, (int32_t)n, &gs.go, &res, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        goto out;
    }
    signal(SIGINT, SIG_DFL);
    if (a.tools != NULL && !gt.none) {
        if (gen_tools_print(&gt, &res) != 0)
            goto out;
    } else {
        if (cli_text_end(&gen_text, stdout) != 0)
            gen_write_failed = 1;
        fputc('\n', stdout);
    }
    if (fflush(stdout) != 0 || gen_write_failed) {
        cli_error("stdout: write error");
        goto out;
    }
    if (glp.f != NULL && !glp.failed && fflush(glp.f) != 0)
        glp.failed = 1;
    if (glp.failed) {
        cli_error("%s: write error", a.logprobs_file != NULL ? a.logprobs_file
                                                             : "standard error");
        goto out;
    }
    if (lpf != NULL) {
        FILE *f = glp.f;
        glp.f = NULL;
        int crc = KLI_E_IO;
        if (fclose(f) != 0)
            kli_outfile_abort(lpf);
        else
            crc = kli_outfile_commit(lpf, &err);
        lpf = NULL;
        if (crc != KLI_OK) {
            cli_error("%s: %s", a.logprobs_file, err.code != 0 ? err.msg : "write error");
            goto out;
        }
    }
    if (!a.g.quiet)
        gen_report(&res);
    if (gen_grammar_check(&gs, &res) != 0)
        goto out;
    if (a.save_state != NULL && kli_session_save(gs.s, gs.smp, a.save_state, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        goto out;
    }
    rc = gen_interrupted ? 130 : 0;
out:
    if (glp.f != NULL && glp.f != stderr)
        fclose(glp.f);
    kli_outfile_abort(lpf);
    free(glp.line.p);
    free(ids);
    free(text);
    gen_tools_free(&gt);
    gen_close(&gs, &a);
    return rc;
}

/* ==== kli chat ============================================================================ */

/* Is `line` the command `cmd`, alone or followed by a space and an argument? */
static int
chat_is_cmd(const char *line, const char *cmd)
{
    size_t n = strlen(cmd);

    return strncmp(line, cmd, n) == 0 && (line[n] == '\0' || line[n] == ' ' || line[n] == '\t');
}

/* What the slash commands act on. */
struct chat_state {
    struct kli_session *s;
    struct kli_sampler *smp;
    int turns;                  /* answered turns since the start, /reset or /load */
};

/* Each command returns 1 to leave the chat, 0 to go on; `arg` is the rest of the line. */
static int
chat_exit(struct chat_state *c, const char *arg)
{
    (void)c;
    (void)arg;
    return 1;
}

static int
chat_help(struct chat_state *c, const char *arg)
{
    (void)c;
    (void)arg;
    printf("/reset  forget the conversation\n/save F save the conversation (and the "
           "sampler) to file F\n/load F go on from a conversation saved in F\n"
           "/help   this text\n/exit   leave (also /quit and Ctrl-D)\n"
           "Ctrl-C stops the current answer.\n");
    return 0;
}

static int
chat_file(struct chat_state *c, const char *f, int load)
{
    struct kli_err err = {0};

    if (*f == '\0') {
        printf("usage: %s FILE\n", load ? "/load" : "/save");
        return 0;
    }
    if ((load ? kli_session_load(c->s, c->smp, f, &err)
              : kli_session_save(c->s, c->smp, f, &err)) != KLI_OK) {
        cli_error("%s", err.msg);
        return 0;
    }
    /* After a load the next turn continues the loaded conversation. */
    if (load)
        c->turns = kli_session_pos(c->s) > 0;
    printf("(%s %d tokens %s %s)\n", load ? "loaded" : "saved", kli_session_pos(c->s),
           load ? "from" : "to", f);
    return 0;
}

static int
chat_save(struct chat_state *c, const char *arg)
{
    return chat_file(c, arg, 0);
}

static int
chat_load(struct chat_state *c, const char *arg)
{
    return chat_file(c, arg, 1);
}

static int
chat_reset(struct chat_state *c, const char *arg)
{
    (void)arg;
    kli_session_reset(c->s);
    kli_sampler_reset(c->smp);
    c->turns = 0;
    printf("(conversation forgotten)\n");
    return 0;
}

static const struct chat_command {
    const char *name;
    int takes_arg;              /* 0: the line is the name alone */
    int (*run)(struct chat_state *c, const char *arg);
} chat_commands[] = {
    {"/exit", 0, chat_exit},
    {"/quit", 0, chat_exit},
    {"/help", 0, chat_help},
    {"/save", 1, chat_save},
    {"/load", 1, chat_load},
    {"/reset", 0, chat_reset},
};

/* Runs the slash command on `line`. @return 1 to leave the chat, 0 to go on. */
static int
chat_command(struct chat_state *c, const char *line)
{
    for (size_t i = 0; i < sizeof(chat_commands) / sizeof(chat_commands[0]); i++) {
        const struct chat_command *k = &chat_commands[i];
        const char *arg = line + strlen(k->name);

        if (k->takes_arg ? !chat_is_cmd(line, k->name) : strcmp(line, k->name) != 0)
            continue;
        while (*arg == ' ' || *arg == '\t')
            arg++;
        return k->run(c, arg);
    }
    printf("unknown command %s (/help lists them)\n", line);
    return 0;
}

static const char chat_usage[] =
    "usage: kli chat [-m|--model MODEL] [-s|--system SYSTEM] [-n|--max-tokens MAX]\n"
    "                [--stop STR]... [--ctx N] [--cache-type T] [--special] [--quiet]\n"
    "                [-h|--help]\n"
    CLI_JSON_HELP CLI_SAMPLING_HELP CLI_PLACEMENT_HELP CLI_GPU_HELP
    "Commands inside the chat: /reset, /save FILE, /load FILE, /help, /exit. Ctrl-C stops the\n"
    "current answer.\n";

static int
cmd_chat(int argc, char **argv)
{
    struct gen_args a;
    struct gen_session gs = {0};
    struct kli_err err = {0};
    struct kli_generate_result res;
    struct sigaction sa;
    char line[65536];
    struct chat_state cs = {0};
    int rc = 1, pr, tty = isatty(STDIN_FILENO);

    if ((pr = gen_parse(argc, argv, chat_opts, "m:s:n:t:h", &a, chat_usage)) != 0)
        return pr > 0 ? 0 : 2;
    const char *path = cli_model_path(a.ca.model, a.ca.demo, sizeof(a.ca.demo));
    if (path == NULL || gen_open(&a, path, &gs) != 0)
        goto out;
    gs.go.special = a.special;
    kli_token im_end = kli_tokenizer_find_special(gs.tok, "<|im_end|>");
    cs.s = gs.s;
    cs.smp = gs.smp;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = gen_on_sigint;   /* no SA_RESTART: Ctrl-C at the prompt interrupts fgets */
    sigaction(SIGINT, &sa, NULL);
    if (tty)
        fprintf(stderr, "kli chat: /help for commands, /exit or Ctrl-D to leave.\n");
    for (;;) {
        if (tty) {
            fputs("> ", stdout);
            fflush(stdout);
        }
        gen_interrupted = 0;
        /* fgets ends what it read with a NUL, after any NUL the line held: with the buffer
         * filled beforehand, the last NUL in it marks the end */
        memset(line, 0xff, sizeof(line));
        if (fgets(line, sizeof(line), stdin) == NULL) {
            if (gen_interrupted && !feof(stdin)) {
                clearerr(stdin);
                fputs("\n(use /exit or Ctrl-D to leave)\n", stdout);
                continue;
            }
            break;
        }
        size_t len = sizeof(line) - 1;
        while (len > 0 && line[len] != '\0')
            len--;
        int64_t nul = cli_find_nul(line, len, 0);
        if (nul >= 0) {
            cli_error("a NUL byte at byte %lld of the line: prompts cannot hold NUL bytes",
                      (long long)nul + 1);
            if (line[len - 1] != '\n') {
                int ch;
                while ((ch = getchar()) != EOF && ch != '\n')
                    ;
            }
            continue;
        }
        if (len == sizeof(line) - 1 && line[len - 1] != '\n') {
            cli_error("line too long (limit %zu bytes); use 'kli run -f' for long prompts",
                      sizeof(line) - 2);
            int ch;
            while ((ch = getchar()) != EOF && ch != '\n')
                ;
            continue;
        }
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        if (len == 0)
            continue;
        if (line[0] == '/') {
            if (chat_command(&cs, line))
                break;
            continue;
        }
        /* Only the new tokens of this turn are fed: the session carries the rest. */
        struct kli_chat_message msgs[2];
        int nm = 0;
        if (cs.turns == 0 && a.g.system != NULL) {
            msgs[nm].role = "system";
            msgs[nm++].content = a.g.system;
        }
        msgs[nm].role = "user";
        msgs[nm++].content = line;
        memset(&err, 0, sizeof(err));
        int64_t n = kli_chat_render(gs.tok, msgs, nm, 1, cs.turns > 0, NULL, 0, &err);
        kli_token *ids = n >= 0 ? malloc(((size_t)n + 1) * sizeof(kli_token)) : NULL;
        if (ids == NULL) {
            cli_error("%s", n < 0 ? err.msg : "out of memory");
            continue;
        }
        int off = 0;
        if (cs.turns > 0)
            ids[off++] = im_end;   /* closes the previous answer, which ended unfed */
        kli_chat_render(gs.tok, msgs, nm, 1, cs.turns > 0, ids + off, n, &err);
        if (gen_grammar_start(&gs, &a) != 0) {
            free(ids);
            continue;
        }
        int r = kli_generate(gs.s, gs.tok, gs.smp, ids, (int32_t)n + off, &gs.go, &res, &err);
        free(ids);
        cli_text_end(&gen_text, stdout);
        fputc('\n', stdout);
        if (r != KLI_OK) {
            cli_error("%s (/reset starts over)", err.msg);
            continue;
        }
        if (res.finish == KLI_FINISH_INTERRUPT)
            fputs("(stopped)\n", stdout);
        fflush(stdout);
        gen_grammar_check(&gs, &res);
        cs.turns++;
        if (!a.g.quiet && tty)
            gen_report(&res);
    }
    rc = 0;
out:
    gen_close(&gs, &a);
    return rc;
}

/* ==== kli tokenize / detokenize =========================================================== */

static int
tok_open(struct cli_args *ca, struct kli_tokenizer **t)
{
    struct kli_err err = {0};
    const char *model = cli_model_path(ca->model, ca->demo, sizeof(ca->demo));

    if (model == NULL)
        return -1;
    if (kli_tokenizer_open(t, model, &err) != KLI_OK) {
        cli_error("%s", err.msg);
        return -1;
    }
    return 0;
}

static const char tokenize_usage[] =
    "usage: kli tokenize [-m|--model MODEL] [--special] [--file F]\n"
    "                    [--messages JSON [--tools JSON]] [-h|--help]\n";
static const char detokenize_usage[] =
    "usage: kli detokenize [-m|--model MODEL] [--file F] [-h|--help]\n";

static int
cmd_tokenize(int argc, char **argv)
{
    static const struct option opts[] = {
        CLI_MODEL_LONGOPT,
        {"special", no_argument, NULL, 'S'},
        {"file", required_argument, NULL, 'f'},
        {"messages", required_argument, NULL, OPT_MESSAGES},
        {"tools", required_argument, NULL, OPT_TOOLS},
        CLI_HELP_LONGOPT,
        CLI_LONGOPTS_END,
    };
    struct cli_args ca = {.usage = tokenize_usage};
    const char *file = "-", *messages = NULL, *tools = NULL;
    char *tl = NULL;
    size_t tlen = 0;
    int special = 0, c, rc = 1;
    struct kli_tokenizer *t = NULL;
    struct kli_err err = {0};
    kli_token *ids = NULL;
    char *text = NULL;
    size_t len;

    while ((c = cli_getopt(argc, argv, "m:f:h", opts, &ca)) > 0) {
        switch (c) {
        case 'S': special = 1; break;
        case 'f': file = optarg; break;
        case OPT_MESSAGES: messages = optarg; break;
        case OPT_TOOLS: tools = optarg; break;
        }
    }
    if (c != CLI_ARGS_END || cli_no_operands(argc, argv, "tokenize") != 0)
        return cli_args_exit(c);
    if (tools != NULL && messages == NULL) {
        cli_error("tokenize: --tools needs --messages");
        return 2;
    }
    if ((text = cli_read_file(messages != NULL ? messages : file, CLI_TEXT_MAX, 0,
                              "the limit of tokenize", &len)) == NULL ||
        (tools != NULL &&
         (tl = cli_read_file(tools, CLI_SCHEMA_MAX, 0, "(the limit is 1 MiB)", &tlen)) == NULL))
        goto out;
    if (tok_open(&ca, &t) != 0)
        goto out;
    /* a conversation: rendered as run --tools renders it, generation prompt included */
    int64_t n = messages == NULL ? (int64_t)len + 1 :
                kli_chat_render_json(t, text, len, tl, tlen, 1, 0, NULL, 0, &err);
    if (n < 0 || (ids = malloc(((size_t)n + 1) * sizeof(kli_token))) == NULL) {
        cli_error("%s%s%s", messages != NULL ? messages : "", messages != NULL ? ": " : "",
                  n < 0 ? err.msg : "out of memory");
        goto out;
    }
    if (messages != NULL)
        n = kli_chat_render_json(t, text, len, tl, tlen, 1, 0, ids, n, &err);
    else
        n = kli_tokenize(t, text, len, special ? KLI_TOKENIZE_SPECIAL : 0, ids,
                         (int64_t)len + 1, &err);
    if (n < 0) {
        cli_error("%s", err.msg);
        goto out;
    }
    for (int64_t i = 0; i < n; i++)
        printf(i ? " %d" : "%d", ids[i]);
    printf("\n");
    rc = fflush(stdout) == 0 ? 0 : 1;
out:
    free(ids);
    free(text);
    free(tl);
    kli_tokenizer_close(t);
    cli_demo_remove(ca.demo);
    return rc;
}

static int
cmd_detokenize(int argc, char **argv)
{
    static const struct option opts[] = {
        CLI_MODEL_LONGOPT,
        {"file", required_argument, NULL, 'f'},
        CLI_HELP_LONGOPT,
        CLI_LONGOPTS_END,
    };
    struct cli_args ca = {.usage = detokenize_usage};
    const char *file = "-";
    int c, rc = 1;
    struct kli_tokenizer *t = NULL;
    struct kli_err err = {0};
    kli_token *ids = NULL;
    int32_t n = 0;
    char *out = NULL;

    while ((c = cli_getopt(argc, argv, "m:f:h", opts, &ca)) > 0) {
        if (c == 'f')
            file = optarg;
    }
    if (c != CLI_ARGS_END || cli_no_operands(argc, argv, "detokenize") != 0)
        return cli_args_exit(c);
    if (cli_read_ids(file, "the limit of detokenize", &ids, &n) != 0)
        goto out;
    if (tok_open(&ca, &t) != 0)
        goto out;
    int64_t need = kli_detokenize(t, ids, n, NULL, 0, &err);
    if (need < 0 || (out = malloc((size_t)need + 1)) == NULL) {
        cli_error("%s", need < 0 ? err.msg : "out of memory");
        goto out;
    }
    kli_detokenize(t, ids, n, out, need, &err);
    if (fwrite(out, 1, (size_t)need, stdout) != (size_t)need || fflush(stdout) != 0) {
        cli_error("stdout: write error");
        goto out;
    }
    rc = 0;
out:
    free(out);
    free(ids);
    kli_tokenizer_close(t);
    cli_demo_remove(ca.demo);
    return rc;
}

const struct cli_command cli_gen_commands[] = {
    {"run", cmd_run, "generate an answer to a prompt (streams to stdout)"},
    {"chat", cmd_chat, "talk with a model, turn by turn"},
    {"tokenize", cmd_tokenize, "print the token ids of a text"},
    {"detokenize", cmd_detokenize, "write the bytes of token ids"},
    {NULL, NULL, NULL},
};
