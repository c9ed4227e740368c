/*
 * cli_oai.h - members of an OpenAI request that kli batch (cli_batch_io.c) and kli serve
 * (serve_req.c) both honour, read the same way: response_format, logit_bias and whether the
 * messages need the renderer of tools. Part of the CLI, not of the library.
 */
#ifndef KLI_CLI_OAI_H
#define KLI_CLI_OAI_H

#include <stddef.h>
#include <stdint.h>

#include "kli.h"

struct cJSON;

#define OAI_MAX_BIAS 1024           /* logit_bias members, as kli_sampler_options allows */

/* What "response_format" asks for. */
enum oai_format {
    OAI_FMT_NONE,                   /* absent or null */
    OAI_FMT_TEXT,                   /* {"type": "text"}: free text */
    OAI_FMT_OBJECT,                 /* {"type": "json_object"}: any JSON object */
    OAI_FMT_SCHEMA                  /* {"type": "json_schema", "json_schema": {"schema": ...}} */
};

/* Reads "response_format" (f: its value, not NULL). For OAI_FMT_SCHEMA, *schema is the
 * schema as compact JSON (malloc'd, the caller frees it); else NULL.
 * @return 0; -1 with the reason in msg (cap bytes), *schema NULL. */
int oai_response_format(const struct cJSON *f, enum oai_format *fmt, char **schema,
                        char *msg, size_t cap);

/* The grammar of a format for tok: NULL for NONE and TEXT, any JSON object for OBJECT, the
 * schema text for SCHEMA (the caller frees it with kli_grammar_free). `what` names the
 * schema's source in msg (NULL: "response_format"; a forced tool call's is "tools").
 * @return 0; 1 when the schema is refused (msg says why, naming the keyword); -1 when out
 *         of memory. */
int oai_grammar(struct kli_grammar **out, const struct kli_tokenizer *tok, enum oai_format fmt,
                const char *schema, const char *what, char *msg, size_t cap);

/* Reads "logit_bias" (lb: its value, not NULL): {"TOKEN_ID": BIAS, ...}, ids in
 * [0, n_vocab) (n_vocab 0: any id up to INT32_MAX, checked later), biases in [-100, 100], at
 * most OAI_MAX_BIAS members. *ids and *bias are malloc'd (the caller frees them, also on
 * failure). @return 0; -1 with the reason in msg (cap bytes); -2 when out of memory. */
int oai_logit_bias(const struct cJSON *lb, int32_t n_vocab, kli_token **ids, float **bias,
                   int32_t *n, char *msg, size_t cap);

/* Whether "messages" (an array; anything else: no) holds a message with a tool call
 * ("tool_calls") or a tool result ("tool_call_id", role "tool"): one that only the renderer
 * of tools (cli_toolcall.h tc_render) reads. */
int oai_tool_messages(const struct cJSON *messages);

#endif
