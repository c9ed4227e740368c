/*
 * chat.c - Kimi's chat format (doc/formats.md 1.7), rendered natively to token ids.
 *
 *   <|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>
 *   <|im_user|>user<|im_middle|>Hello<|im_end|>
 *   <|im_assistant|>assistant<|im_middle|>
 *
 * No newlines between turns and no BOS. The role markers are special ids; everything a
 * person wrote is encoded as ordinary text, so "<|im_end|>" typed by a user stays text.
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "internal.h"
#include "tokenizer.h"
#include "util.h"

#define CHAT_DEFAULT_SYSTEM "You are a helpful assistant"

struct chat_out {
    kli_token *out;
    int64_t cap, n;
};

static void
chat_put(struct chat_out *o, kli_token t)
{
    if (o->n < o->cap)
        o->out[o->n] = t;
    o->n++;
}

static int
chat_text(struct chat_out *o, const struct kli_tokenizer *tok, const char *text,
          struct kli_err *err)
{
    int64_t room = o->n < o->cap ? o->cap - o->n : 0;
    int64_t r = kli_tokenize(tok, text, strlen(text), 0, room ? o->out + o->n : NULL, room,
                             err);

    if (r < 0)
        return (int)r;
    if (r > room) {
        /* Count only; the caller retries with a buffer of the returned size. */
        o->n += r;
        return KLI_OK;
    }
    o->n += r;
    return KLI_OK;
}

static int
chat_turn(struct chat_out *o, const struct kli_tokenizer *tok, kli_token head,
          const char *role, const char *content, kli_token middle, kli_token end,
          struct kli_err *err)
{
    int rc;

    chat_put(o, head);
    if ((rc = chat_text(o, tok, role, err)) != KLI_OK)
        return rc;
    chat_put(o, middle);
    if (content != NULL && (rc = chat_text(o, tok, content, err)) != KLI_OK)
        return rc;
    if (end >= 0)
        chat_put(o, end);
    return KLI_OK;
}

struct chat_ids {
    kli_token sys, usr, ast, mid, end, sec_begin, sec_end, call_begin, arg_begin, call_end;
};

/* The ids of the chat format's markers (the tool-call ones -1 where the tokenizer lacks
 * them). @return KLI_OK, or KLI_E_UNSUPPORTED without the five of the turns. */
static int
chat_ids_find(const struct kli_tokenizer *tok, struct chat_ids *k, struct kli_err *err)
{
    k->sys = kli_tokenizer_find_special(tok, "<|im_system|>");
    k->usr = kli_tokenizer_find_special(tok, "<|im_user|>");
    k->ast = kli_tokenizer_find_special(tok, "<|im_assistant|>");
    k->mid = kli_tokenizer_find_special(tok, "<|im_middle|>");
    k->end = kli_tokenizer_find_special(tok, "<|im_end|>");
    k->sec_begin = kli_tokenizer_find_special(tok, "<|tool_calls_section_begin|>");
    k->sec_end = kli_tokenizer_find_special(tok, "<|tool_calls_section_end|>");
    k->call_begin = kli_tokenizer_find_special(tok, "<|tool_call_begin|>");
    k->arg_begin = kli_tokenizer_find_special(tok, "<|tool_call_argument_begin|>");
    k->call_end = kli_tokenizer_find_special(tok, "<|tool_call_end|>");
    if (k->sys < 0 || k->usr < 0 || k->ast < 0 || k->mid < 0 || k->end < 0)
        return err_set(err, KLI_E_UNSUPPORTED, "the tokenizer lacks the chat tokens "
                       "(<|im_system|>, <|im_user|>, <|im_assistant|>, <|im_middle|>, "
                       "<|im_end|>)");
    return KLI_OK;
}

/* The marker that opens message i's turn: a tool's result is a system turn.
 * @return it, or KLI_E_INVALID (err set) for an unknown role. */
static kli_token
chat_head(const struct chat_ids *k, const char *role, int i, struct kli_err *err)
{
    if (strcmp(role, "system") == 0 || strcmp(role, "tool") == 0)
        return k->sys;
    if (strcmp(role, "user") == 0)
        return k->usr;
    if (strcmp(role, "assistant") == 0)
        return k->ast;
    return err_set(err, KLI_E_INVALID, "chat message %d: unknown role \"%.40s\" (system, "
                   "user, assistant or tool)", i, role);
}

int64_t
kli_chat_render(const struct kli_tokenizer *tok, const struct kli_chat_message *msgs,
                int32_t n, int add_generation_prompt, int continuation, kli_token *out,
                int64_t cap, struct kli_err *err)
{
    struct chat_out o = {out, out != NULL ? cap : 0, 0};
    struct chat_ids k;
    int rc;

    if (tok == NULL || (msgs == NULL && n > 0) || n < 0)
        return err_set(err, KLI_E_INVALID, "kli_chat_render: invalid arguments");
    if ((rc = chat_ids_find(tok, &k, err)) != KLI_OK)
        return rc;
    if (!continuation && (n == 0 || strcmp(msgs[0].role, "system") != 0)) {
        rc = chat_turn(&o, tok, k.sys, "system", CHAT_DEFAULT_SYSTEM, k.mid, k.end, err);
        if (rc != KLI_OK)
            return rc;
    }
    for (int32_t i = 0; i < n; i++) {
        kli_token head;
        if (msgs[i].role == NULL || msgs[i].content == NULL)
            return err_set(err, KLI_E_INVALID, "chat message %d has no role or content", i);
        if ((head = chat_head(&k, msgs[i].role, i, err)) < 0)
            return head;
        rc = chat_turn(&o, tok, head, msgs[i].role, msgs[i].content, k.mid, k.end, err);
        if (rc != KLI_OK)
            return rc;
    }
    if (add_generation_prompt) {
        rc = chat_turn(&o, tok, k.ast, "assistant", NULL, k.mid, -1, err);
        if (rc != KLI_OK)
            return rc;
    }
    return o.n;
}

/* ==== conversations with tools (doc/formats.md 1.7, the tool-call template) ============== */

/* Appends s to the buffer; a failed allocation is remembered in *bad. */
static void
chat_add(char **b, size_t *n, size_t *cap, const char *s, size_t len, int *bad)
{
    if (!*bad && util_text_add(b, n, cap, s, len) != 0)
        *bad = 1;
}

/* A JSON string as Python's json.dumps(ensure_ascii=False) writes it: the template's
 * tojson. */
static void
chat_pystr(char **b, size_t *n, size_t *cap, const char *s, int *bad)
{
    chat_add(b, n, cap, "\"", 1, bad);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        const char *e = NULL;
        switch (*p) {
        case '"': e = "\\\""; break;
        case '\\': e = "\\\\"; break;
        case '\n': e = "\\n"; break;
        case '\r': e = "\\r"; break;
        case '\t': e = "\\t"; break;
        case '\b': e = "\\b"; break;
        case '\f': e = "\\f"; break;
        default:
            if (*p < 0x20) {
                snprintf(esc, sizeof(esc), "\\u%04x", *p);
                e = esc;
            }
        }
        if (e != NULL)
            chat_add(b, n, cap, e, strlen(e), bad);
        else
            chat_add(b, n, cap, (const char *)p, 1, bad);
    }
    chat_add(b, n, cap, "\"", 1, bad);
}

/* A number as Python prints it: integral values without a fraction (a JSON "1.0" comes
 * out as "1": cJSON keeps no trace of it), others with the fewest digits that read back. */
static void
chat_pynum(char **b, size_t *n, size_t *cap, double v, int *bad)
{
    char t[40];

    if (v == floor(v) && fabs(v) < 1e16) {
        snprintf(t, sizeof(t), "%.0f", v);
    } else {
        for (int prec = 15; prec <= 17; prec++) {
            snprintf(t, sizeof(t), "%.*g", prec, v);
            if (strtod(t, NULL) == v)
                break;
        }
    }
    chat_add(b, n, cap, t, strlen(t), bad);
}

static int
chat_key_cmp(const void *a, const void *b)
{
    const cJSON *x = *(const cJSON *const *)a, *y = *(const cJSON *const *)b;
    return strcmp(x->string, y->string);
}

/* v as json.dumps writes it with the default separators (", ", ": "); `sorted`: every
 * object's keys in code-point order, as the tokenizer's apply_chat_template sorts tools. */
static void
chat_pyjson(char **b, size_t *n, size_t *cap, const cJSON *v, int sorted, int depth, int *bad)
{
    if (depth > 64) {
        *bad = 2;
        return;
    }
    if (cJSON_IsString(v)) {
        chat_pystr(b, n, cap, v->valuestring, bad);
    } else if (cJSON_IsNumber(v)) {
        chat_pynum(b, n, cap, v->valuedouble, bad);
    } else if (cJSON_IsBool(v)) {
        chat_add(b, n, cap, cJSON_IsTrue(v) ? "true" : "false", cJSON_IsTrue(v) ? 4 : 5, bad);
    } else if (cJSON_IsNull(v)) {
        chat_add(b, n, cap, "null", 4, bad);
    } else if (cJSON_IsArray(v)) {
        const cJSON *c;
        int first = 1;
        chat_add(b, n, cap, "[", 1, bad);
        cJSON_ArrayForEach(c, v) {
            if (!first)
                chat_add(b, n, cap, ", ", 2, bad);
            first = 0;
            chat_pyjson(b, n, cap, c, sorted, depth + 1, bad);
        }
        chat_add(b, n, cap, "]", 1, bad);
    } else if (cJSON_IsObject(v)) {
        int k = cJSON_GetArraySize(v), i = 0;
        const cJSON **keys = k > 0 ? malloc((size_t)k * sizeof(*keys)) : NULL;
        const cJSON *c;
        if (k > 0 && keys == NULL) {
            *bad = 1;
            return;
        }
        cJSON_ArrayForEach(c, v)
            keys[i++] = c;
        if (sorted && k > 1)
            qsort(keys, (size_t)k, sizeof(*keys), chat_key_cmp);
        chat_add(b, n, cap, "{", 1, bad);
        for (i = 0; i < k; i++) {
            if (i > 0)
                chat_add(b, n, cap, ", ", 2, bad);
            chat_pystr(b, n, cap, keys[i]->string, bad);
            chat_add(b, n, cap, ": ", 2, bad);
            chat_pyjson(b, n, cap, keys[i], sorted, depth + 1, bad);
        }
        chat_add(b, n, cap, "}", 1, bad);
        free(keys);
    }
}

/* The text of a message's content: a string, the "text" of each part of a list, or none
 * (null or absent). @return KLI_OK or a negative status. */
static int
chat_content(const cJSON *c, int i, char **b, size_t *n, size_t *cap, struct kli_err *err)
{
    const cJSON *part;
    int bad = 0;

    if (c == NULL || cJSON_IsNull(c))
        return KLI_OK;
    if (cJSON_IsString(c)) {
        chat_add(b, n, cap, c->valuestring, strlen(c->valuestring), &bad);
    } else if (cJSON_IsArray(c)) {
        cJSON_ArrayForEach(part, c) {
            const cJSON *ty = cJSON_GetObjectItemCaseSensitive(part, "type");
            const cJSON *tx = cJSON_GetObjectItemCaseSensitive(part, "text");
            if (!cJSON_IsString(ty) || strcmp(ty->valuestring, "text") != 0 ||
                !cJSON_IsString(tx))
                return err_set(err, KLI_E_UNSUPPORTED, "chat message %d: a content part "
                               "that is not {\"type\": \"text\", \"text\": ...} (kli reads "
                               "text only)", i);
            chat_add(b, n, cap, tx->valuestring, strlen(tx->valuestring), &bad);
        }
    } else {
        return err_set(err, KLI_E_INVALID, "chat message %d: \"content\" must be a string, "
                       "a list of text parts or null", i);
    }
    if (bad)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    return KLI_OK;
}

/* An assistant message's tool calls: the section the model writes, each call's id and
 * arguments (a string as it is, an object as JSON). */
static int
chat_calls(struct chat_out *o, const struct kli_tokenizer *tok, const struct chat_ids *k,
           const cJSON *calls, int i, struct kli_err *err)
{
    const cJSON *c;
    int j = 0, rc;

    if (k->sec_begin < 0 || k->sec_end < 0 || k->call_begin < 0 || k->arg_begin < 0 ||
        k->call_end < 0)
        return err_set(err, KLI_E_UNSUPPORTED, "the tokenizer lacks the tool-call tokens "
                       "(<|tool_calls_section_begin|> ...)");
    chat_put(o, k->sec_begin);
    cJSON_ArrayForEach(c, calls) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(c, "id");
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(c, "function");
        const cJSON *args = cJSON_GetObjectItemCaseSensitive(fn, "arguments");
        char *a = NULL;
        size_t an = 0, acap = 0;
        int bad = 0;

        if (!cJSON_IsString(id) || !cJSON_IsObject(fn) || args == NULL)
            return err_set(err, KLI_E_INVALID, "chat message %d: tool_calls[%d] needs a "
                           "string \"id\" and a \"function\" with \"arguments\"", i, j);
        chat_put(o, k->call_begin);
        if ((rc = chat_text(o, tok, id->valuestring, err)) != KLI_OK)
            return rc;
        chat_put(o, k->arg_begin);
        if (cJSON_IsString(args))
            chat_add(&a, &an, &acap, args->valuestring, strlen(args->valuestring), &bad);
        else
            chat_pyjson(&a, &an, &acap, args, 0, 0, &bad);
        rc = bad ? err_set(err, bad == 1 ? KLI_E_NOMEM : KLI_E_RANGE, bad == 1 ?
                           "out of memory" : "chat message %d: arguments nest too deep", i)
                 : chat_text(o, tok, a != NULL ? a : "", err);
        free(a);
        if (rc != KLI_OK)
            return rc;
        chat_put(o, k->call_end);
        j++;
    }
    chat_put(o, k->sec_end);
    return KLI_OK;
}

/* One message of a JSON conversation. */
static int
chat_json_msg(struct chat_out *o, const struct kli_tokenizer *tok, const struct chat_ids *k,
              const cJSON *m, int i, struct kli_err *err)
{
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
    const cJSON *calls = cJSON_GetObjectItemCaseSensitive(m, "tool_calls");
    char *text = NULL;
    size_t n = 0, cap = 0;
    kli_token head;
    int rc = KLI_OK, bad = 0;

    if (!cJSON_IsObject(m) || !cJSON_IsString(role))
        return err_set(err, KLI_E_INVALID, "chat message %d has no \"role\"", i);
    if ((head = chat_head(k, role->valuestring, i, err)) < 0)
        return head;
    if (strcmp(role->valuestring, "tool") == 0) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(m, "tool_call_id");
        if (!cJSON_IsString(id))
            return err_set(err, KLI_E_INVALID, "chat message %d: a \"tool\" message needs a "
                           "string \"tool_call_id\"", i);
        chat_add(&text, &n, &cap, "## Return of ", 13, &bad);
        chat_add(&text, &n, &cap, id->valuestring, strlen(id->valuestring), &bad);
        chat_add(&text, &n, &cap, "\n", 1, &bad);
        if (bad) {
            free(text);
            return err_set(err, KLI_E_NOMEM, "out of memory");
        }
    }
    rc = chat_content(cJSON_GetObjectItemCaseSensitive(m, "content"), i, &text, &n, &cap, err);
    if (rc != KLI_OK) {
        free(text);
        return rc;
    }
    rc = chat_turn(o, tok, head, role->valuestring, text != NULL ? text : "", k->mid, -1, err);
    free(text);
    if (rc == KLI_OK && head == k->ast && cJSON_IsArray(calls) &&
        cJSON_GetArraySize(calls) > 0)
        rc = chat_calls(o, tok, k, calls, i, err);
    else if (rc == KLI_OK && calls != NULL && !cJSON_IsNull(calls) && !cJSON_IsArray(calls))
        rc = err_set(err, KLI_E_INVALID, "chat message %d: \"tool_calls\" must be a list", i);
    if (rc == KLI_OK)
        chat_put(o, k->end);
    return rc;
}

int64_t
kli_chat_render_json(const struct kli_tokenizer *tok, const char *messages, size_t len,
                     const char *tools, size_t tools_len, int add_generation_prompt,
                     int continuation, kli_token *out, int64_t cap, struct kli_err *err)
{
    struct chat_out o = {out, out != NULL ? cap : 0, 0};
    struct chat_ids k;
    cJSON *msgs = NULL, *tl = NULL;
    const cJSON *m;
    int64_t rc = KLI_OK;
    int i = 0;

    if (tok == NULL || messages == NULL)
        return err_set(err, KLI_E_INVALID, "kli_chat_render_json: invalid arguments");
    if ((rc = chat_ids_find(tok, &k, err)) != KLI_OK)
        return rc;
    msgs = cJSON_ParseWithLength(messages, len);
    if (!cJSON_IsArray(msgs)) {
        rc = err_set(err, KLI_E_FORMAT, "the messages are not a JSON array");
        goto out;
    }
    if (tools != NULL && tools_len > 0) {
        tl = cJSON_ParseWithLength(tools, tools_len);
        if (!cJSON_IsArray(tl) && !cJSON_IsNull(tl)) {
            rc = err_set(err, KLI_E_FORMAT, "the tools are not a JSON array");
            goto out;
        }
    }
    if (cJSON_GetArraySize(tl) > 0) {
        char *t = NULL;
        size_t tn = 0, tcap = 0;
        int bad = 0;
        chat_pyjson(&t, &tn, &tcap, tl, 1, 0, &bad);
        rc = bad ? err_set(err, bad == 1 ? KLI_E_NOMEM : KLI_E_RANGE, bad == 1 ?
                           "out of memory" : "the tools nest too deep")
                 : chat_turn(&o, tok, k.sys, "tool_declare", t, k.mid, k.end, err);
        free(t);
        if (rc != KLI_OK)
            goto out;
    }
    m = cJSON_GetArrayItem(msgs, 0);
    if (!continuation && (m == NULL || !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(
                              m, "role")) || strcmp(cJSON_GetObjectItemCaseSensitive(
                              m, "role")->valuestring, "system") != 0)) {
        rc = chat_turn(&o, tok, k.sys, "system", CHAT_DEFAULT_SYSTEM, k.mid, k.end, err);
        if (rc != KLI_OK)
            goto out;
    }
    cJSON_ArrayForEach(m, msgs) {
        if ((rc = chat_json_msg(&o, tok, &k, m, i++, err)) != KLI_OK)
            goto out;
    }
    if (add_generation_prompt &&
        (rc = chat_turn(&o, tok, k.ast, "assistant", NULL, k.mid, -1, err)) != KLI_OK)
        goto out;
    rc = o.n;
out:
    cJSON_Delete(msgs);
    cJSON_Delete(tl);
    return rc;
}
