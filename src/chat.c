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

#include <string.h>

#include "internal.h"
#include "tokenizer.h"

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

int64_t
kli_chat_render(const struct kli_tokenizer *tok, const struct kli_chat_message *msgs,
                int32_t n, int add_generation_prompt, int continuation, kli_token *out,
                int64_t cap, struct kli_err *err)
{
    struct chat_out o = {out, out != NULL ? cap : 0, 0};
    kli_token sys = kli_tokenizer_find_special(tok, "<|im_system|>");
    kli_token usr = kli_tokenizer_find_special(tok, "<|im_user|>");
    kli_token ast = kli_tokenizer_find_special(tok, "<|im_assistant|>");
    kli_token mid = kli_tokenizer_find_special(tok, "<|im_middle|>");
    kli_token end = kli_tokenizer_find_special(tok, "<|im_end|>");
    int rc;

    if (tok == NULL || (msgs == NULL && n > 0) || n < 0)
        return err_set(err, KLI_E_INVALID, "kli_chat_render: invalid arguments");
    if (sys < 0 || usr < 0 || ast < 0 || mid < 0 || end < 0)
        return err_set(err, KLI_E_UNSUPPORTED,
                           "the tokenizer lacks the chat tokens (<|im_system|>, <|im_user|>, "
                           "<|im_assistant|>, <|im_middle|>, <|im_end|>)");
    if (!continuation && (n == 0 || strcmp(msgs[0].role, "system") != 0)) {
        rc = chat_turn(&o, tok, sys, "system", CHAT_DEFAULT_SYSTEM, mid, end, err);
        if (rc != KLI_OK)
            return rc;
    }
    for (int32_t i = 0; i < n; i++) {
        const char *role = msgs[i].role;
        kli_token head;
        if (role == NULL || msgs[i].content == NULL)
            return err_set(err, KLI_E_INVALID, "chat message %d has no role or content", i);
        if (strcmp(role, "system") == 0 || strcmp(role, "tool") == 0)
            head = sys;
        else if (strcmp(role, "user") == 0)
            head = usr;
        else if (strcmp(role, "assistant") == 0)
            head = ast;
        else
            return err_set(err, KLI_E_INVALID,
                               "chat message %d: unknown role \"%.40s\" (system, user, "
                               "assistant or tool)", i, role);
        rc = chat_turn(&o, tok, head, role, msgs[i].content, mid, end, err);
        if (rc != KLI_OK)
            return rc;
    }
    if (add_generation_prompt) {
        rc = chat_turn(&o, tok, ast, "assistant", NULL, mid, -1, err);
        if (rc != KLI_OK)
            return rc;
    }
    return o.n;
}
