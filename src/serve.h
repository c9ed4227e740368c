/*
 * serve.h - the parts of kli serve shared by its files (not part of the library): serve.c
 * (HTTP, the scheduler thread, responses) and serve_req.c (an OpenAI request body to a
 * scheduler request), which the fuzz target tests/fuzz/fuzz-serve-req.c drives alone.
 */
#ifndef KLI_SERVE_H
#define KLI_SERVE_H

#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "kli.h"

#define SERVE_MAX_STOP 16
#define SERVE_MAX_N 16                /* choices per request ("n") */

enum serve_kind { SERVE_CHAT, SERVE_COMPLETION };

/* What a request may leave out or may not exceed: the command line's. */
struct serve_limits {
    struct kli_sampler_options so;   /* the sampling defaults */
    int seeded;                      /* --seed was given: requests without "seed" use it */
    int32_t max_tokens;              /* for a request without max_tokens */
    int32_t max_tokens_limit;        /* the most a request may ask for */
    int32_t max_prompt_tokens;       /* the longest prompt admitted */
    int32_t n_vocab;                 /* logit_bias ids are below it (0: not checked) */
};

/* A request, parsed and tokenized. Owns its tokens, stop strings, logit_bias arrays (so
 * points at them) and grammar, so they live as long as the request's job. */
struct cJSON;

struct serve_req {
    enum serve_kind kind;
    kli_token *toks;
    int32_t n;
    struct kli_sampler_options so;
    int seeded;                      /* "seed" was given (or --seed) */
    int32_t max_tokens;
    char *stop[SERVE_MAX_STOP];
    int32_t n_stop;
    int stream, include_usage;
    kli_token *bias_ids;             /* "logit_bias" */
    float *bias;
    int format;                      /* "response_format": enum oai_format */
    char *schema;                    /* its json_schema, compact (until compiled) */
    struct kli_grammar *grammar;     /* json_object or json_schema, else NULL */
    struct cJSON *tools;             /* "tools" (owned), else NULL */
    struct cJSON *tool_choice;       /* "tool_choice" (owned), else NULL */
    int tool_mode;                   /* SERVE_TOOLS_*: how the answer is read */
    const char *forced;              /* under SERVE_TOOLS_FORCED: "" or the function named */
    int one_call;                    /* "parallel_tool_calls": false keeps the first call */
    int logprobs_on;                 /* "logprobs": true (chat), or a number (completions) */
    int32_t top_logprobs;            /* the alternatives asked for with them */
    int32_t n_choices;               /* "n", 1..SERVE_MAX_N */
};

/* How an answer is read for tool calls (cli_toolcall.h). */
enum {
    SERVE_TOOLS_OFF,                 /* no tools, or tool_choice "none": text only */
    SERVE_TOOLS_AUTO,                /* the model may write a tool-call section */
    SERVE_TOOLS_FORCED               /* required or named: the answer is the call */
};

/* Why a request was refused: an HTTP status and the fields of an OpenAI error object. */
struct serve_err {
    int status;                      /* 400, 413, 500 */
    const char *type;                /* "invalid_request_error", "server_error" */
    const char *code;                /* NULL, or e.g. "context_length_exceeded" */
    char param[96];                  /* the field at fault, or "" */
    char msg[512];
};

/* Routes cJSON's allocations through kli serve's counter (once, before any request), so
 * that serve_json_parse tells a body that is not JSON (400) from memory running out (503). */
void serve_json_hooks(void);
cJSON *serve_json_parse(const char *body, size_t len, struct serve_err *e);

/* Parses a body of /v1/chat/completions or /v1/completions (JSON, `len` bytes, no NUL in
 * it) into r: every field is checked, and one kli cannot honour (unknown, or known but not
 * supported, such as tools or best_of > 1) is refused naming it rather than ignored.
 * @return 0, or -1 with e filled in (r then holds nothing). */
int serve_req_parse(struct serve_req *r, enum serve_kind kind, const char *body, size_t len,
                    const struct kli_tokenizer *tok, const struct serve_limits *lim,
                    struct serve_err *e);
void serve_req_clear(struct serve_req *r);

/* Fills e (status 400 unless changed). @return -1. */
int serve_fail(struct serve_err *e, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
