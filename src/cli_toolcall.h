/*
 * cli_toolcall.h - Kimi's tool calls for the CLI (kli run --tools, kli batch, kli serve): the
 * section the model writes, read into OpenAI "tool_calls" (doc/formats.md 1.7). Part of the
 * CLI, not of the library.
 */
#ifndef KLI_CLI_TOOLCALL_H
#define KLI_CLI_TOOLCALL_H

#include <stddef.h>
#include <stdint.h>

#include "kli.h"

struct cJSON;

#define TC_SECTION_BEGIN "<|tool_calls_section_begin|>"
#define TC_SECTION_END "<|tool_calls_section_end|>"
#define TC_CALL_BEGIN "<|tool_call_begin|>"
#define TC_ARG_BEGIN "<|tool_call_argument_begin|>"
#define TC_CALL_END "<|tool_call_end|>"

/* The longest function name a declaration may have, in bytes (OpenAI's limit). */
#define TC_NAME_MAX 64

/* Splits generated text, its special tokens written as their names (kli_generate_options
 * special), into the content and the calls of its tool-call section:
 *     TEXT <|tool_calls_section_begin|>
 *         (<|tool_call_begin|>[functions.]NAME:IDX<|tool_call_argument_begin|>JSON
 *          <|tool_call_end|>)+ <|tool_calls_section_end|> TEXT
 * `tools` (the request's declarations; NULL: any name) names the functions that may be
 * called. *calls is a cJSON array of {"id", "type": "function", "function": {"name",
 * "arguments"}} (the id as the model wrote it, arguments the JSON object's text), or NULL
 * when the text holds no section; *content (malloc'd) is the text outside the section.
 * @return 0; 1 for a malformed section (msg says what is wrong; *content is then the whole
 *         text, *calls NULL); -1 when out of memory. */
int tc_parse(const char *text, size_t len, const struct cJSON *tools, char **content,
             struct cJSON **calls, char *msg, size_t cap);

/* Checks a request's "tools" (an array of {"type": "function", "function": {"name", ...}})
 * and "tool_choice" (NULL, "auto", "none", "required" or {"type": "function", "function":
 * {"name"}}). *forced is then NULL (auto or none), "" (required) or the named function's
 * name (borrowed from tool_choice); *none is 1 for "none".
 * @return 0; -1 with the reason in msg. */
int tc_check(const struct cJSON *tools, const struct cJSON *choice, const char **forced,
             int *none, char *msg, size_t cap);

/* Reads a request's "parallel_tool_calls" (NULL, null, true or false): *one is 1 for false,
 * an answer then keeps only its first call (tc_keep_first). @return 0; -1 with the reason in
 * msg. */
int tc_parallel(const struct cJSON *v, int *one, char *msg, size_t cap);

/* Drops every call of `calls` (a tc_parse array, or NULL) after the first. */
void tc_keep_first(struct cJSON *calls);

/* The JSON Schema that tool_choice "required" or a named function constrains the
 * arguments with (malloc'd text), and the text forced after the generation prompt
 * (malloc'd, special tokens by name): for one function (named, or the only one)
 * "<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>"
 * and that function's parameters; for several, no prefix and a schema of
 * {"name": NAME, "arguments": PARAMETERS} objects, one per function (tc_forced_calls reads it
 * back). @return 0; -1 when out of memory or a parameters schema is not an object. */
int tc_forced_grammar(const struct cJSON *tools, const char *forced, char **schema,
                      char **prefix);

/* The calls of an answer written under tc_forced_grammar: `text` is the arguments (one
 * function) or a {"name", "arguments"} object (several). @return as tc_parse. */
int tc_forced_calls(const struct cJSON *tools, const char *forced, const char *text,
                    size_t len, struct cJSON **calls, char *msg, size_t cap);

/* Makes *content and the calls' arguments valid UTF-8 (what a random model writes may not
 * be): each invalid sequence, as `seq` (cli_utf8_seq) finds it, becomes U+FFFD.
 * @return 0, or -1 when out of memory. */
int tc_utf8(char **content, struct cJSON *calls, int (*seq)(const unsigned char *, size_t));

/* An answer read for tool calls, as run, batch and serve read it: `text` (n bytes, special
 * tokens by name) cut at the first of the stop strings, then under a forced call
 * (tc_forced_grammar; `forced` not NULL) the call it is, else tc_parse's content and calls;
 * both made valid UTF-8 (tc_utf8). @return as tc_parse (on -1 nothing is returned). */
int tc_answer(const char *text, size_t n, const char *const *stop, int n_stop,
              const struct cJSON *tools, const char *forced, char **content,
              struct cJSON **calls, char *msg, size_t cap,
              int (*seq)(const unsigned char *, size_t));

/* The prompt of a conversation with tools: `messages` (a JSON array; tool calls and results
 * allowed) and `tools` (NULL: none) rendered by kli_chat_render_json, generation prompt
 * on, then `prefix` (NULL or the text a forced call starts with, special tokens by name).
 * With `cont` it continues a session that holds a conversation (kli run --load-state): an
 * <|im_end|> closes its last answer first, and no default system message is added.
 * @return the number of tokens in *ids (malloc'd), or a negative status with err set. */
int64_t tc_render(const struct kli_tokenizer *tok, const struct cJSON *messages,
                  const struct cJSON *tools, const char *prefix, int cont, kli_token **ids,
                  struct kli_err *err);

/* The conversation of one prompt in the chat format: a system message (NULL: none) and the
 * user's, as a JSON array of messages. @return it, or NULL when out of memory. */
struct cJSON *tc_messages(const char *system, const char *user);

/* Whether a token (its marker name, len bytes; 0 for an ordinary token) ends the first call
 * of an answer whose text so far is acc[0..n): it is TC_CALL_END, and since its first
 * section's begin acc holds exactly one call's begin and argument begin, no other marker.
 * With "parallel_tool_calls": false the answer can end there. */
int tc_first_call_end(const char *acc, size_t n, const char *tok, size_t len);

/* Whether a special token's name (len bytes) is a tool-call marker, one that an answer read
 * for calls keeps by name (as kli_generate_options special 2 does). */
int tc_marker(const char *name, size_t len);

#endif
