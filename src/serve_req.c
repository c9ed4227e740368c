/*
 * serve_req.c - kli serve: the body of an OpenAI chat or completions request to a scheduler
 * request (serve.h). Every member of the body is looked up in one table: a field kli
 * honours is checked and applied, a field of the OpenAI API that kli cannot honour is
 * refused unless it has its neutral value (n 1, echo false, ...),
 * and any other name is refused as unknown; the error names the field. Absent fields and
 * nulls take the command line's defaults.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "kli.h"
#include "cli_toolcall.h"
#include "cli_oai.h"
#include "serve.h"

int
serve_fail(struct serve_err *e, const char *param, const char *fmt, ...)
{
    va_list ap;

    if (e->status == 0)
        e->status = 400;
    if (e->type == NULL)
        e->type = "invalid_request_error";
    snprintf(e->param, sizeof(e->param), "%s", param != NULL ? param : "");
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
    va_end(ap);
    return -1;
}

void
serve_req_clear(struct serve_req *r)
{
    free(r->toks);
    free(r->bias_ids);
    free(r->bias);
    free(r->schema);
    kli_grammar_free(r->grammar);
    cJSON_Delete(r->tools);
    cJSON_Delete(r->tool_choice);
    for (int32_t i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    memset(r, 0, sizeof(*r));
}

/* ==== fields =============================================================================== */

enum field_how {
    F_FLOAT,        /* a number in [lo, hi] into the sampler option at `off` */
    F_INT,          /* an integer in [lo, hi] into the sampler option at `off` */
    F_MAX_TOKENS,   /* max_tokens, max_completion_tokens */
    F_SEED, F_STOP, F_STREAM, F_STREAM_OPTIONS,
    F_STRING,       /* any string (model, user): accepted, not used */
    F_MESSAGES, F_PROMPT,
    F_ONE,          /* best_of: only 1 */
    F_FALSE,        /* echo: only false */
    F_BIAS,         /* logit_bias (cli_oai.h) */
    F_FORMAT,       /* response_format (cli_oai.h), compiled once the prompt is good */
    F_TOOLS,        /* tools, tool_choice: kept, read with the messages (cli_toolcall.h) */
    F_PARALLEL,     /* parallel_tool_calls: true, or false for one call (cli_toolcall.h) */
    F_NEVER,        /* fields kli has no way to honour: any value but null is refused */
    F_LOGPROBS,     /* logprobs (chat): true or false */
    F_TOP_LOGPROBS, /* top_logprobs (chat), logprobs (completions): an integer in [lo, hi] */
    F_N,            /* n: choices, an integer in [lo, hi] */
};

#define CHAT 1
#define COMPL 2
#define SO(m) offsetof(struct kli_sampler_options, m)

static const struct field {
    const char *name;
    int kinds;
    enum field_how how;
    size_t off;
    double lo, hi;
} fields[] = {
    {"model", CHAT | COMPL, F_STRING, 0, 0, 0},
    {"user", CHAT | COMPL, F_STRING, 0, 0, 0},
    {"messages", CHAT, F_MESSAGES, 0, 0, 0},
    {"prompt", COMPL, F_PROMPT, 0, 0, 0},
    {"temperature", CHAT | COMPL, F_FLOAT, SO(temperature), 0, 2},
    {"top_p", CHAT | COMPL, F_FLOAT, SO(top_p), 0, 1},
    {"min_p", CHAT | COMPL, F_FLOAT, SO(min_p), 0, 1},
    {"top_k", CHAT | COMPL, F_INT, SO(top_k), -1, 1 << 30},
    {"presence_penalty", CHAT | COMPL, F_FLOAT, SO(presence_penalty), -2, 2},
    {"frequency_penalty", CHAT | COMPL, F_FLOAT, SO(frequency_penalty), -2, 2},
    {"repetition_penalty", CHAT | COMPL, F_FLOAT, SO(repeat_penalty), 0.01, 100},
    {"max_tokens", CHAT | COMPL, F_MAX_TOKENS, 0, 0, 0},
    {"max_completion_tokens", CHAT, F_MAX_TOKENS, 0, 0, 0},
    {"seed", CHAT | COMPL, F_SEED, 0, 0, 0},
    {"stop", CHAT | COMPL, F_STOP, 0, 0, 0},
    {"stream", CHAT | COMPL, F_STREAM, 0, 0, 0},
    {"stream_options", CHAT | COMPL, F_STREAM_OPTIONS, 0, 0, 0},
    {"n", CHAT | COMPL, F_N, 0, 1, SERVE_MAX_N},
    {"best_of", COMPL, F_ONE, 0, 0, 0},
    {"logprobs", CHAT, F_LOGPROBS, 0, 0, 0},
    {"logprobs", COMPL, F_TOP_LOGPROBS, 0, 0, 5},
    {"top_logprobs", CHAT, F_TOP_LOGPROBS, 0, 0, KLI_LOGPROBS_MAX},
    {"echo", COMPL, F_FALSE, 0, 0, 0},
    {"logit_bias", CHAT | COMPL, F_BIAS, 0, 0, 0},
    {"suffix", COMPL, F_NEVER, 0, 0, 0},
    {"response_format", CHAT | COMPL, F_FORMAT, 0, 0, 0},
    {"tools", CHAT, F_TOOLS, 0, 0, 0},
    {"tool_choice", CHAT, F_TOOLS, 0, 0, 0},
    {"parallel_tool_calls", CHAT, F_PARALLEL, 0, 0, 0},
    {"functions", CHAT, F_NEVER, 0, 0, 0},
    {"function_call", CHAT, F_NEVER, 0, 0, 0},
    {"audio", CHAT, F_NEVER, 0, 0, 0},
    {"modalities", CHAT, F_NEVER, 0, 0, 0},
    {"prediction", CHAT, F_NEVER, 0, 0, 0},
    {"reasoning_effort", CHAT, F_NEVER, 0, 0, 0},
    {"web_search_options", CHAT, F_NEVER, 0, 0, 0},
    {"store", CHAT, F_NEVER, 0, 0, 0},
    {"metadata", CHAT, F_NEVER, 0, 0, 0},
    {"service_tier", CHAT | COMPL, F_NEVER, 0, 0, 0},
};

/* A number in [lo, hi] (an integer with `integer`). @return 0, or -1 with e filled in. */
static int
req_number(const cJSON *j, const char *name, double lo, double hi, int integer,
           struct serve_err *e, double *out)
{
    if (!cJSON_IsNumber(j) || !(j->valuedouble >= lo && j->valuedouble <= hi) ||
        (integer && j->valuedouble != (double)(int64_t)j->valuedouble))
        return serve_fail(e, name, "'%s' must be %s from %g to %g", name,
                          integer ? "an integer" : "a number", lo, hi);
    *out = j->valuedouble;
    return 0;
}

static int
req_stop(struct serve_req *r, const cJSON *j, struct serve_err *e)
{
    const cJSON *s;

    if (cJSON_IsString(j)) {
        if (j->valuestring[0] == '\0')
            return serve_fail(e, "stop", "'stop' may not be an empty string");
        if ((r->stop[0] = strdup(j->valuestring)) == NULL)
            goto nomem;
        r->n_stop = 1;
        return 0;
    }
    if (!cJSON_IsArray(j))
        return serve_fail(e, "stop", "'stop' must be a string or an array of strings");
    cJSON_ArrayForEach(s, j) {
        if (!cJSON_IsString(s) || s->valuestring[0] == '\0')
            return serve_fail(e, "stop", "'stop' must hold non-empty strings");
        if (r->n_stop == SERVE_MAX_STOP)
            return serve_fail(e, "stop", "'stop': at most %d strings", SERVE_MAX_STOP);
        if ((r->stop[r->n_stop] = strdup(s->valuestring)) == NULL)
            goto nomem;
        r->n_stop++;
    }
    return 0;
nomem:
    e->status = 500;
    e->type = "server_error";
    return serve_fail(e, NULL, "out of memory");
}

static int
req_stream_options(struct serve_req *r, const cJSON *j, struct serve_err *e)
{
    const cJSON *m;

    if (!cJSON_IsObject(j))
        return serve_fail(e, "stream_options", "'stream_options' must be an object");
    cJSON_ArrayForEach(m, j) {
        if (strcmp(m->string, "include_usage") != 0)
            return serve_fail(e, "stream_options", "'stream_options.%s' is not supported "
                              "(only include_usage is)", m->string);
        if (!cJSON_IsBool(m) && !cJSON_IsNull(m))
            return serve_fail(e, "stream_options", "'stream_options.include_usage' must be "
                              "true or false");
        r->include_usage = cJSON_IsTrue(m);
    }
    return 0;
}

/* Only the neutral value of a field kli does not implement passes. */
static int
req_neutral(const struct field *f, const cJSON *j, struct serve_err *e)
{
    int neutral;

    switch (f->how) {
    case F_ONE: neutral = cJSON_IsNumber(j) && j->valuedouble == 1; break;
    case F_FALSE: neutral = cJSON_IsFalse(j); break;
    default: neutral = 0; break;
    }
    if (neutral)
        return 0;
    switch (f->how) {
    case F_ONE:
        return serve_fail(e, f->name, "'%s': kli serve gives one choice per request; send "
                          "the request again for more", f->name);
    default:
        return serve_fail(e, f->name, "'%s' is not supported by kli serve", f->name);
    }
}

/* ==== the prompt ========================================================================== */

static int
req_nomem(struct serve_err *e)
{
    e->status = 503;   /* for a while: other requests hold the memory */
    e->type = "server_error";
    return serve_fail(e, NULL, "out of memory");
}

/* The tokens of chat messages (string content, or an array of text parts). */
static int
req_messages(struct serve_req *r, const cJSON *j, const struct kli_tokenizer *tok,
             struct serve_err *e)
{
    struct kli_chat_message *msgs = NULL;
    char **joined = NULL;
    char param[96];
    struct kli_err err = {0};
    const cJSON *m;
    int count, i = 0, rc = -1;
    int64_t n;

    if (!cJSON_IsArray(j) || (count = cJSON_GetArraySize(j)) < 1)
        return serve_fail(e, "messages", "'messages' must be a non-empty array");
    if ((msgs = calloc((size_t)count, sizeof(*msgs))) == NULL ||
        (joined = calloc((size_t)count, sizeof(*joined))) == NULL) {
        req_nomem(e);
        goto out;
    }
    cJSON_ArrayForEach(m, j) {
        const cJSON *f, *role = NULL, *content = NULL;
        snprintf(param, sizeof(param), "messages[%d]", i);
        if (!cJSON_IsObject(m)) {
            serve_fail(e, param, "'%s' must be an object with role and content", param);
            goto out;
        }
        cJSON_ArrayForEach(f, m) {
            if (strcmp(f->string, "role") == 0 && role == NULL) {
                role = f;
            } else if (strcmp(f->string, "content") == 0 && content == NULL) {
                content = f;
            } else {
                snprintf(param, sizeof(param), "messages[%d].%.40s", i, f->string);
                serve_fail(e, param, "'%s' is not supported by kli serve (a message has a "
                           "role and a content)", param);
                goto out;
            }
        }
        if (!cJSON_IsString(role)) {
            snprintf(param, sizeof(param), "messages[%d].role", i);
            serve_fail(e, param, "'%s' must be a string", param);
            goto out;
        }
        if (strcmp(role->valuestring, "system") != 0 && strcmp(role->valuestring, "user") != 0 &&
            strcmp(role->valuestring, "assistant") != 0) {
            snprintf(param, sizeof(param), "messages[%d].role", i);
            serve_fail(e, param, "'%s': '%.60s' is not system, user or assistant", param,
                       role->valuestring);
            goto out;
        }
        msgs[i].role = role->valuestring;
        if (cJSON_IsString(content)) {
            msgs[i].content = content->valuestring;
        } else if (cJSON_IsArray(content)) {
            /* text parts, joined */
            size_t len = 0;
            const cJSON *p;
            int k = 0;
            cJSON_ArrayForEach(p, content) {
                const cJSON *type = cJSON_GetObjectItemCaseSensitive(p, "type");
                const cJSON *text = cJSON_GetObjectItemCaseSensitive(p, "text");
                snprintf(param, sizeof(param), "messages[%d].content[%d]", i, k);
                if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") != 0 ||
                    !cJSON_IsString(text) || cJSON_GetArraySize(p) != 2) {
                    serve_fail(e, param, "'%s': only parts {\"type\": \"text\", \"text\": ...} "
                               "are supported", param);
                    goto out;
                }
                len += strlen(text->valuestring);
                k++;
            }
            if ((joined[i] = malloc(len + 1)) == NULL) {
                req_nomem(e);
                goto out;
            }
            len = 0;
            cJSON_ArrayForEach(p, content) {
                const char *t = cJSON_GetObjectItemCaseSensitive(p, "text")->valuestring;
                size_t l = strlen(t);
                memcpy(joined[i] + len, t, l);
                len += l;
            }
            joined[i][len] = '\0';
            msgs[i].content = joined[i];
        } else {
            snprintf(param, sizeof(param), "messages[%d].content", i);
            serve_fail(e, param, "'%s' must be a string or an array of text parts", param);
            goto out;
        }
        i++;
    }
    n = kli_chat_render(tok, msgs, count, 1, 0, NULL, 0, &err);
    if (n < 0) {
        serve_fail(e, "messages", "'messages': %s", err.msg);
        goto out;
    }
    if (n > INT32_MAX - 1) {
        serve_fail(e, "messages", "'messages': too long");
        goto out;
    }
    if ((r->toks = malloc(((size_t)n + 1) * sizeof(kli_token))) == NULL) {
        req_nomem(e);
        goto out;
    }
    kli_chat_render(tok, msgs, count, 1, 0, r->toks, n, &err);
    r->n = (int32_t)n;
    rc = 0;
out:
    for (int k = 0; joined != NULL && k < count; k++)
        free(joined[k]);
    free(joined);
    free(msgs);
    return rc;
}

/* The tokens of a completion prompt: a string, or an array of one string. */
static int
req_prompt(struct serve_req *r, const cJSON *j, const struct kli_tokenizer *tok,
           struct serve_err *e)
{
    struct kli_err err = {0};
    int64_t n;
    size_t len;

    if (cJSON_IsArray(j) && cJSON_GetArraySize(j) == 1 && cJSON_IsString(j->child))
        j = j->child;
    if (!cJSON_IsString(j))
        return serve_fail(e, "prompt", "'prompt' must be a string (one prompt per request)");
    len = strlen(j->valuestring);
    if ((r->toks = malloc((len + 1) * sizeof(kli_token))) == NULL)
        return req_nomem(e);
    n = kli_tokenize(tok, j->valuestring, len, 0, r->toks, (int64_t)len + 1, &err);
    if (n < 0)
        return serve_fail(e, "prompt", "'prompt': %s", err.msg);
    if (n > INT32_MAX - 1)
        return serve_fail(e, "prompt", "'prompt': too long");
    r->n = (int32_t)n;
    return 0;
}

/* ==== logit_bias and response_format (cli_oai.h, as kli batch reads them) ==================== */

static int
req_bias(struct serve_req *r, const cJSON *j, const struct serve_limits *lim,
         struct serve_err *e)
{
    char msg[256];
    int rc = oai_logit_bias(j, lim->n_vocab, &r->bias_ids, &r->bias, &r->so.n_bias, msg,
                            sizeof(msg));

    if (rc == -2)
        return req_nomem(e);
    if (rc != 0)
        return serve_fail(e, "logit_bias", "%s", msg);
    r->so.bias_ids = r->bias_ids;
    r->so.bias = r->bias;
    return 0;
}

/* The grammar of the request's response_format. */
static int
req_grammar(struct serve_req *r, const struct kli_tokenizer *tok, struct serve_err *e)
{
    char msg[512];
    /* a forced tool call's schema is its function's parameters (req_conversation) */
    const char *what = r->tool_mode == SERVE_TOOLS_FORCED ? "tools" : "response_format";
    int rc = oai_grammar(&r->grammar, tok, (enum oai_format)r->format, r->schema, what, msg,
                         sizeof(msg));

    if (rc < 0)
        return req_nomem(e);
    if (rc > 0)
        return serve_fail(e, what, "%s", msg);
    free(r->schema);
    r->schema = NULL;
    return 0;
}

/* The settings and the grammar go to a sampler as the scheduler will give them, so that what
 * it would refuse (a schema longer than max_tokens allows, ...) is a 400 now. */
static int
req_probe(struct serve_req *r, const struct serve_limits *lim, struct serve_err *e)
{
    struct kli_sampler *probe = NULL;
    struct kli_sampler_options so = r->so;
    struct kli_err err = {0};
    int rc;

    if (lim->n_vocab <= 0)
        so.n_bias = 0;      /* the ids cannot be checked */
    rc = kli_sampler_create(&probe, &so, lim->n_vocab > 0 ? lim->n_vocab : 1, &err);
    if (rc == KLI_OK && r->grammar != NULL) {
        rc = kli_sampler_set_grammar(probe, r->grammar, r->max_tokens, &err);
        if (rc == KLI_E_RANGE) {
            kli_sampler_free(probe);
            return serve_fail(e, "max_tokens", "'%s': %s", r->tool_mode == SERVE_TOOLS_FORCED ?
                              "tool_choice" : "response_format", err.msg);
        }
    }
    kli_sampler_free(probe);
    if (rc == KLI_E_NOMEM)
        return req_nomem(e);
    if (rc != KLI_OK)
        return serve_fail(e, NULL, "%s", err.msg);
    return 0;
}

/* ==== tools (cli_toolcall.h) ============================================================== */

/* The messages with tools, tool calls or tool results (tc_render). */
static int
req_tool_messages(struct serve_req *r, const cJSON *j, const struct kli_tokenizer *tok,
                  const char *prefix, struct serve_err *e)
{
    struct kli_err err = {0};
    kli_token *ids = NULL;
    int64_t n = tc_render(tok, j, r->tools, prefix, 0, &ids, &err);

    if (n == KLI_E_NOMEM)
        return req_nomem(e);
    if (n < 0)
        return serve_fail(e, "messages", "'messages': %s", err.msg);
    r->toks = ids;
    if (n > INT32_MAX - 1)
        return serve_fail(e, "messages", "'messages': too long");
    r->n = (int32_t)n;
    return 0;
}

/* The conversation: plain messages as before; with tools or tool messages through the JSON
 * renderer, with tool_choice read (a forced call is constrained by a grammar, as a
 * response_format would be). */
static int
req_conversation(struct serve_req *r, const cJSON *j, const struct kli_tokenizer *tok,
                 struct serve_err *e)
{
    char msg[256], *prefix = NULL;
    int none = 0, rc;

    if (r->tools == NULL && r->tool_choice == NULL && !oai_tool_messages(j))
        return req_messages(r, j, tok, e);
    if (!cJSON_IsArray(j) || cJSON_GetArraySize(j) < 1)
        return serve_fail(e, "messages", "'messages' must be a non-empty array");
    if (tc_check(r->tools, r->tool_choice, &r->forced, &none, msg, sizeof(msg)) != 0)
        return serve_fail(e, r->tool_choice != NULL ? "tool_choice" : "tools", "%s", msg);
    r->tool_mode = r->forced != NULL ? SERVE_TOOLS_FORCED :
                   none || r->tools == NULL ? SERVE_TOOLS_OFF : SERVE_TOOLS_AUTO;
    if (r->forced != NULL) {
        if (r->format == OAI_FMT_OBJECT || r->format == OAI_FMT_SCHEMA)
            return serve_fail(e, "tool_choice", "'tool_choice' %s does not go with "
                              "'response_format'", r->forced[0] ? "naming a function"
                                                               : "\"required\"");
        if (tc_forced_grammar(r->tools, r->forced, &r->schema, &prefix) != 0)
            return req_nomem(e);
        r->format = OAI_FMT_SCHEMA;
    }
    rc = req_tool_messages(r, j, tok, prefix, e);
    free(prefix);
    return rc;
}

/* ==== the whole body ====================================================================== */

static int
req_field(struct serve_req *r, const struct field *f, const cJSON *j,
          const struct kli_tokenizer *tok, const struct serve_limits *lim,
          struct serve_err *e)
{
    double v = 0;

    switch (f->how) {
    case F_FLOAT:
        if (req_number(j, f->name, f->lo, f->hi, 0, e, &v) != 0)
            return -1;
        *(float *)((char *)&r->so + f->off) = (float)v;
        return 0;
    case F_INT:
        if (req_number(j, f->name, f->lo, f->hi, 1, e, &v) != 0)
            return -1;
        *(int32_t *)((char *)&r->so + f->off) = v < 0 ? 0 : (int32_t)v;   /* -1: off */
        return 0;
    case F_MAX_TOKENS:
        if (req_number(j, f->name, 1, lim->max_tokens_limit, 1, e, &v) != 0)
            return -1;
        r->max_tokens = (int32_t)v;
        return 0;
    case F_SEED:
        /* OpenAI's seeds are 64-bit signed; beyond 2^53 a JSON number loses digits */
        if (req_number(j, f->name, -9007199254740992.0, 9007199254740992.0, 1, e, &v) != 0)
            return -1;
        r->so.seed = (uint64_t)(int64_t)v;
        r->seeded = 1;
        return 0;
    case F_STOP:
        return req_stop(r, j, e);
    case F_STREAM:
    case F_LOGPROBS:
        if (!cJSON_IsBool(j))
            return serve_fail(e, f->name, "'%s' must be true or false", f->name);
        *(f->how == F_STREAM ? &r->stream : &r->logprobs_on) = cJSON_IsTrue(j);
        return 0;
    case F_STREAM_OPTIONS:
        return req_stream_options(r, j, e);
    case F_TOP_LOGPROBS:
        if (req_number(j, f->name, f->lo, f->hi, 1, e, &v) != 0)
            return -1;
        r->top_logprobs = (int32_t)v;
        r->logprobs_on |= r->kind == SERVE_COMPLETION;
        return 0;
    case F_N:
        if (req_number(j, f->name, f->lo, f->hi, 1, e, &v) != 0)
            return -1;
        r->n_choices = (int32_t)v;
        return 0;
    case F_STRING:
        if (!cJSON_IsString(j))
            return serve_fail(e, f->name, "'%s' must be a string", f->name);
        return 0;
    case F_MESSAGES:
        return 0;   /* read once the tools are known (req_conversation) */
    case F_TOOLS: {
        cJSON **dst = strcmp(f->name, "tools") == 0 ? &r->tools : &r->tool_choice;
        return (*dst = cJSON_Duplicate(j, 1)) != NULL ? 0 : req_nomem(e);
    }
    case F_PARALLEL: {
        char msg[128];
        if (tc_parallel(j, &r->one_call, msg, sizeof(msg)) != 0)
            return serve_fail(e, f->name, "%s", msg);
        return 0;
    }
    case F_PROMPT:
        return req_prompt(r, j, tok, e);
    case F_BIAS:
        return req_bias(r, j, lim, e);
    case F_FORMAT: {
        enum oai_format fmt;
        char msg[256];
        if (oai_response_format(j, &fmt, &r->schema, msg, sizeof(msg)) != 0)
            return serve_fail(e, f->name, "%s", msg);
        r->format = (int)fmt;
        return 0;
    }
    default:
        return req_neutral(f, j, e);
    }
}

/* cJSON answers NULL both for a syntax error and for a failed allocation: its allocations
 * go through here, so that a parse that ran out of memory is told apart (a 503 to retry,
 * not a 400 blaming the client's JSON). */
static _Thread_local int req_json_oom;

static void *
req_json_malloc(size_t n)
{
    void *p = malloc(n);
    if (p == NULL)
        req_json_oom = 1;
    return p;
}

void
serve_json_hooks(void)
{
    cJSON_Hooks h = {req_json_malloc, free};
    cJSON_InitHooks(&h);
}

/* The body parsed, or NULL with the error in e: not JSON (400), or out of memory (503). */
cJSON *
serve_json_parse(const char *body, size_t len, struct serve_err *e)
{
    cJSON *root;

    req_json_oom = 0;
    if ((root = cJSON_ParseWithLength(body, len)) != NULL)
        return root;
    if (req_json_oom) {
        req_nomem(e);
        return NULL;
    }
    const char *at = cJSON_GetErrorPtr();   /* global in cJSON: checked to lie in the body */
    if (at != NULL && at >= body && at <= body + len)
        serve_fail(e, NULL, "the body is not valid JSON (at byte %zu)", (size_t)(at - body));
    else
        serve_fail(e, NULL, "the body is not valid JSON");
    return NULL;
}

int
serve_req_parse(struct serve_req *r, enum serve_kind kind, const char *body, size_t len,
                const struct kli_tokenizer *tok, const struct serve_limits *lim,
                struct serve_err *e)
{
    cJSON *root;
    const cJSON *m;
    const char *need = kind == SERVE_CHAT ? "messages" : "prompt";
    int mask = kind == SERVE_CHAT ? CHAT : COMPL, have_prompt = 0;

    memset(r, 0, sizeof(*r));
    memset(e, 0, sizeof(*e));
    r->kind = kind;
    r->so = lim->so;
    r->seeded = lim->seeded;
    r->max_tokens = lim->max_tokens;
    r->n_choices = 1;
    if ((root = serve_json_parse(body, len, e)) == NULL)
        return -1;
    if (!cJSON_IsObject(root)) {
        serve_fail(e, NULL, "the body must be a JSON object");
        goto fail;
    }
    const cJSON *msgs = NULL;
    cJSON_ArrayForEach(m, root) {
        const struct field *f = NULL;
        for (const cJSON *o = root->child; o != m; o = o->next) {
            if (strcmp(o->string, m->string) == 0) {
                serve_fail(e, m->string, "'%.60s' appears twice", m->string);
                goto fail;
            }
        }
        for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]) && f == NULL; i++) {
            if ((fields[i].kinds & mask) && strcmp(fields[i].name, m->string) == 0)
                f = &fields[i];
        }
        if (f == NULL) {
            serve_fail(e, m->string, "unknown field '%.60s'", m->string);
            goto fail;
        }
        if (cJSON_IsNull(m) && f->how != F_MESSAGES && f->how != F_PROMPT)
            continue;
        have_prompt |= f->how == F_MESSAGES || f->how == F_PROMPT;
        if (f->how == F_MESSAGES)
            msgs = m;
        if (req_field(r, f, m, tok, lim, e) != 0)
            goto fail;
    }
    if (msgs != NULL && req_conversation(r, msgs, tok, e) != 0)
        goto fail;
    if (!have_prompt) {
        serve_fail(e, need, "'%s' is required", need);
        goto fail;
    }
    if (r->top_logprobs > 0 && !r->logprobs_on) {
        serve_fail(e, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
        goto fail;
    }
    if (r->include_usage && !r->stream) {
        serve_fail(e, "stream_options", "'stream_options' needs 'stream': true");
        goto fail;
    }
    if (r->n == 0) {
        serve_fail(e, need, "'%s': the prompt is empty", need);
        goto fail;
    }
    if (r->n > lim->max_prompt_tokens) {
        e->code = "context_length_exceeded";
        serve_fail(e, need, "the prompt of %d tokens is over the limit of %d tokens",
                   (int)r->n, (int)lim->max_prompt_tokens);
        goto fail;
    }
    if (req_grammar(r, tok, e) != 0 || req_probe(r, lim, e) != 0)
        goto fail;
    cJSON_Delete(root);
    return 0;
fail:
    cJSON_Delete(root);
    serve_req_clear(r);
    return -1;
}
