/*
 * cli_batch.h - the parts of kli batch shared by its files (not part of the library):
 * cli_batch.c (the command and the scheduler) and cli_batch_io.c (the input index, the ids
 * already done, records and output lines).
 */
#ifndef KLI_CLI_BATCH_H
#define KLI_CLI_BATCH_H

#include <stddef.h>
#include <stdint.h>

#include "kli.h"
#include "cli_oai.h"

#define BATCH_MAX_STOP 16

/* ==== growable byte buffer ================================================================= */

struct bbuf {
    char *p;
    size_t n, cap;
};

int bbuf_add(struct bbuf *b, const void *p, size_t n);
int bbuf_addf(struct bbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends `s` as a JSON string: escaped, and with every invalid UTF-8 sequence replaced by
 * U+FFFD (one per maximal subpart, as Unicode recommends and Python's decoder does). */
int bbuf_json_str(struct bbuf *b, const char *s, size_t n);

/* The same for generated text: by the rule of cli_text_write, control characters but
 * newline and tab become U+FFFD too, so a record's text is what kli run shows. */
int bbuf_json_text(struct bbuf *b, const char *s, size_t n);
/* @return the offset of the first byte that is not part of valid UTF-8, or n. */
size_t batch_utf8_valid(const char *s, size_t n);

/* ==== log-probabilities in OpenAI's shapes (cli_logprobs.c) ============================= */

/* A growing list of the log-probabilities of a choice's tokens. */
struct lp_list {
    struct kli_logprobs *v;
    int32_t n, cap;
};
/* @return 0, or -1 out of memory. */
int lp_list_add(struct lp_list *l, const struct kli_logprobs *lp);
/* Frees l's entries, leaving it empty; l may be NULL. */
void lp_list_free(struct lp_list *l);
/* One entry of a chat choice's logprobs.content: {"token", "logprob", "bytes",
 * "top_logprobs": [{"token", "logprob", "bytes"}...]}, each with "id" (the token id) first
 * when with_id (kli run --logprobs). @return 0, or -1 out of memory. */
int lp_chat_entry(struct bbuf *b, const struct kli_tokenizer *tok, const struct kli_logprobs *lp,
                  int with_id);
/* A chat choice's "logprobs" value for tokens lp[0..n): {"content": [entries]}. */
int lp_chat_json(struct bbuf *b, const struct kli_tokenizer *tok, const struct kli_logprobs *lp,
                 int32_t n);
/* The bytes token t adds to the generated text: none for special tokens. */
size_t lp_text_len(const struct kli_tokenizer *tok, kli_token t);
/* Tokens l[from..) whose text, token `from` starting at text offset *off, ends by `end`;
 * *off becomes the offset after them. @return the index after the last of them. */
int32_t lp_upto(const struct kli_tokenizer *tok, const struct lp_list *l, int32_t from,
                size_t *off, size_t end);
/* A completion choice's "logprobs" value: {"tokens", "token_logprobs", "top_logprobs" (an
 * object per token, text to log-probability; a repeated text keeps its first, likelier
 * entry), "text_offset" (byte offsets in the generated text, the first off0)}. */
int lp_compl_json(struct bbuf *b, const struct kli_tokenizer *tok, const struct kli_logprobs *lp,
                  int32_t n, size_t off0);

/* ==== the input ============================================================================ */

/* One line of the input that holds a record (blank lines hold none). */
struct cJSON;
struct batch_tools;

struct batch_item {
    int64_t off, len;        /* the line's bytes in the input */
    int32_t line;            /* 1-based line number */
    char *id;                /* the record's id, or "line:N" */
    char *error;             /* a reason found while scanning (malformed, duplicate,
                                oversized), or NULL */
    int api;                 /* enum batch_api: the record's format, and its line's */
    struct batch_tools *tools;   /* a record with tools, from its submission to its line */
    struct lp_list *lp;      /* a record with logprobs: its tokens', likewise */
};

/* What a record with tools needs to read its answer (cli_toolcall.h). */
struct batch_tools {
    struct cJSON *tools;     /* its "tools" */
    char *forced;            /* tool_choice required ("") or a named function, else NULL */
    int one_call;            /* "parallel_tool_calls": false keeps only the first call */
    char *stop[BATCH_MAX_STOP];   /* its stop strings, copied */
    int n_stop;
    char *acc;               /* the answer, special tokens by name */
    size_t n, cap;
    int first_done;          /* one_call: the first call ended, the request was cancelled */
};
void batch_tools_free(struct batch_tools *t);

/* A record's format: kli's own, or an OpenAI Batch API line (custom_id, method, url, body)
 * for one of the two endpoints kli serves. */
enum batch_api {
    BATCH_API_KLI,
    BATCH_API_CHAT,          /* "url": "/v1/chat/completions" */
    BATCH_API_COMPLETIONS,   /* "url": "/v1/completions" */
    BATCH_API_OTHER          /* custom_id with another url: the record fails */
};

struct batch_input {
    const char *text;        /* the input (mapped or read) */
    size_t len;
    int mapped;
    struct batch_item *items;   /* the records this run does, in input order */
    int64_t n_items;
    int64_t n_lines, n_records, n_done, n_other_shards;
    int64_t n_done_errors;   /* of n_done, those whose line in the output is an error */
};

/* Which records to keep while scanning. */
struct batch_select {
    int64_t max_line;               /* longer lines are errors without parsing */
    int32_t shard_k, shard_n;       /* record belongs when fnv(id) % n == k - 1 */
    struct batch_idset *done;       /* ids already in the output; may be NULL */
};

/* Reads `path` ("-" for standard input) and indexes its records. @return 0, or -1 after a
 * message (the file cannot be read). */
int batch_input_open(struct batch_input *in, const char *path, const struct batch_select *sel);
void batch_input_close(struct batch_input *in);

/* ==== a set of ids ========================================================================= */

struct batch_idset;

struct batch_idset *batch_idset_create(void);
void batch_idset_free(struct batch_idset *set);
/* @return 1 if added, 0 if it was there, -1 out of memory. `id` is copied. When `value` is
 * not NULL, *value receives the value stored with the id (the first add's). */
int batch_idset_add(struct batch_idset *set, const char *id, int32_t v, int32_t *value);
int batch_idset_has(const struct batch_idset *set, const char *id);
/* @return 1 and *value (the value stored with id) if id is in the set, else 0. */
int batch_idset_find(const struct batch_idset *set, const char *id, int32_t *value);
int64_t batch_idset_count(const struct batch_idset *set);

/* Reads the ids of an existing output file into `set`, with the value 1 for error lines
 * (finish_reason "error") and 0 for the others. An incomplete last line (no newline: a
 * crash mid-write) is cut off the file. @return 0, or -1 after a message. */
int batch_output_scan(const char *path, struct batch_idset *set, int quiet);

/* ==== records ============================================================================== */

/* Defaults for the fields a record may leave out. */
struct batch_defaults {
    struct kli_sampler_options so;
    int32_t max_tokens;
    const char *const *stop;
    int n_stop;
    const char *system;        /* for "prompt" records in the chat format; NULL: default */
    int raw;                   /* "prompt" is plain text to continue */
    int64_t max_prompt_bytes;
};

/* A record ready to submit: its prompt tokens and settings. kli_sched_submit copies what
 * the scheduler keeps (tokens, stop strings, error), so a record lives only until its
 * request is submitted; the request's `user` is the record's item. */
struct batch_rec {
    kli_token *toks;
    int32_t n;
    struct kli_sampler_options so;
    int32_t max_tokens;
    const char *stop[BATCH_MAX_STOP];  /* the defaults' or those of `json` (borrowed) */
    int n_stop;
    const char *error;         /* set: the record fails with this message (the item's or
                                  `msg`) */
    char msg[512];
    struct cJSON *json;        /* the parsed record */
    kli_token *bias_ids;       /* its "logit_bias" (malloc'd), so.bias_ids points here */
    float *bias;
    int format;                /* its response_format: enum batch_format */
    char *schema;              /* BATCH_FMT_SCHEMA: the schema as compact JSON (malloc'd) */
    struct batch_tools *tools; /* with "tools" read for calls (owned until submitted) */
    int32_t logprobs;          /* "logprobs" / "top_logprobs": the alternatives; -1: none */
};

/* What a record's "response_format" asks for. */
enum batch_format {
    BATCH_FMT_DEFAULT = OAI_FMT_NONE,    /* none given: --json / --json-schema, if any */
    BATCH_FMT_TEXT = OAI_FMT_TEXT,
    BATCH_FMT_OBJECT = OAI_FMT_OBJECT,
    BATCH_FMT_SCHEMA = OAI_FMT_SCHEMA
};

/* Parses and tokenizes the record of item `it` into r. Problems with the record end up in
 * r->error. @return 0, or -1 only when out of memory (r holds nothing then). */
int batch_rec_prepare(struct batch_rec *r, const struct batch_input *in,
                      const struct batch_item *it, const struct kli_tokenizer *tok,
                      const struct batch_defaults *d);
/* Frees what batch_rec_prepare allocated (once; r is done with then). */
void batch_rec_clear(struct batch_rec *r);

#endif
