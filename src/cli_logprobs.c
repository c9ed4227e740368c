/*
 * cli_logprobs.c - the log-probabilities of generated tokens (kli_sampler_logprobs) as JSON,
 * in the shapes of OpenAI's API: a chat choice's logprobs.content entries (also the lines of
 * kli run --logprobs) and a completion choice's tokens / token_logprobs / top_logprobs /
 * text_offset. Shared by run, batch and serve.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "cli_batch.h"

int
lp_list_add(struct lp_list *l, const struct kli_logprobs *lp)
{
    if (l->n == l->cap) {
        int32_t cap = l->cap > 0 ? l->cap * 2 : 64;
        struct kli_logprobs *v = realloc(l->v, (size_t)cap * sizeof(*v));
        if (v == NULL)
            return -1;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = *lp;
    return 0;
}

void
lp_list_free(struct lp_list *l)
{
    if (l == NULL)
        return;
    free(l->v);
    memset(l, 0, sizeof(*l));
}

/* "token":TEXT,"logprob":X,"bytes":[...]: a special token by its name, with "bytes" null
 * (it adds no bytes to the text). */
static int
lp_token(struct bbuf *b, const struct kli_tokenizer *tok, kli_token id, float logprob)
{
    size_t len = 0;
    const char *p = kli_token_bytes(tok, id, &len);
    int bad;

    if (p == NULL)
        p = "";
    bad = bbuf_add(b, "\"token\":", 8);
    bad |= bbuf_json_str(b, p, len);
    bad |= bbuf_addf(b, ",\"logprob\":%.8g,\"bytes\":", (double)logprob);
    if (id >= kli_tokenizer_n_base(tok))
        return bad | bbuf_add(b, "null", 4);
    bad |= bbuf_add(b, "[", 1);
    for (size_t i = 0; i < len; i++)
        bad |= bbuf_addf(b, i > 0 ? ",%u" : "%u", (unsigned)(unsigned char)p[i]);
    return bad | bbuf_add(b, "]", 1);
}

int
lp_chat_entry(struct bbuf *b, const struct kli_tokenizer *tok, const struct kli_logprobs *lp,
              int with_id)
{
    int bad = bbuf_add(b, "{", 1);

    if (with_id)
        bad |= bbuf_addf(b, "\"id\":%d,", (int)lp->token);
    bad |= lp_token(b, tok, lp->token, lp->logprob);
    bad |= bbuf_add(b, ",\"top_logprobs\":[", 17);
    for (int32_t k = 0; k < lp->n_top; k++) {
        bad |= bbuf_add(b, k > 0 ? ",{" : "{", k > 0 ? 2 : 1);
        if (with_id)
            bad |= bbuf_addf(b, "\"id\":%d,", (int)lp->top[k].token);
        bad |= lp_token(b, tok, lp->top[k].token, lp->top[k].logprob);
        bad |= bbuf_add(b, "}", 1);
    }
    return bad | bbuf_add(b, "]}", 2);
}

int
lp_chat_json(struct bbuf *b, const struct kli_tokenizer *tok, const struct kli_logprobs *lp,
             int32_t n)
{
    int bad = bbuf_add(b, "{\"content\":[", 12);

    for (int32_t i = 0; i < n; i++) {
        if (i > 0)
            bad |= bbuf_add(b, ",", 1);
        bad |= lp_chat_entry(b, tok, &lp[i], 0);
    }
    return bad | bbuf_add(b, "]}", 2);
}

size_t
lp_text_len(const struct kli_tokenizer *tok, kli_token t)
{
    size_t len = 0;

    if (t < kli_tokenizer_n_base(tok))
        kli_token_bytes(tok, t, &len);
    return len;
}

int
lp_compl_json(struct bbuf *b, const struct kli_tokenizer *tok, const struct kli_logprobs *lp,
              int32_t n, size_t off0)
{
    size_t len;
    const char *p;
    int bad = bbuf_add(b, "{\"tokens\":[", 11);

    for (int32_t i = 0; i < n; i++) {
        p = kli_token_bytes(tok, lp[i].token, &len);
        bad |= bbuf_add(b, ",", i > 0);
        bad |= bbuf_json_str(b, p != NULL ? p : "", p != NULL ? len : 0);
    }
    bad |= bbuf_add(b, "],\"token_logprobs\":[", 20);
    for (int32_t i = 0; i < n; i++)
        bad |= bbuf_addf(b, i > 0 ? ",%.8g" : "%.8g", (double)lp[i].logprob);
    bad |= bbuf_add(b, "],\"top_logprobs\":[", 18);
    for (int32_t i = 0; i < n; i++) {
        /* an object: two tokens whose texts print alike (invalid UTF-8 turns into U+FFFD)
         * would repeat a key; the first, likelier one stands */
        struct bbuf keys = {NULL, 0, 0};
        size_t at[KLI_LOGPROBS_MAX + 1] = {0};
        bad |= bbuf_add(b, i > 0 ? ",{" : "{", i > 0 ? 2 : 1);
        for (int32_t k = 0, shown = 0; k < lp[i].n_top; k++) {
            size_t lk;
            const char *pk = kli_token_bytes(tok, lp[i].top[k].token, &lk);
            int dup = 0;
            at[k] = keys.n;
            bad |= bbuf_json_str(&keys, pk != NULL ? pk : "", pk != NULL ? lk : 0);
            for (int32_t j = 0; j < k && !dup && keys.p != NULL; j++)
                dup = at[j + 1] - at[j] == keys.n - at[k] &&
                      memcmp(keys.p + at[j], keys.p + at[k], keys.n - at[k]) == 0;
            at[k + 1] = keys.n;
            if (dup || keys.p == NULL)
                continue;
            bad |= bbuf_add(b, ",", shown++ > 0);
            bad |= bbuf_add(b, keys.p + at[k], keys.n - at[k]);
            bad |= bbuf_addf(b, ":%.8g", (double)lp[i].top[k].logprob);
        }
        free(keys.p);
        bad |= bbuf_add(b, "}", 1);
    }
    bad |= bbuf_add(b, "],\"text_offset\":[", 17);
    for (int32_t i = 0; i < n; i++) {
        bad |= bbuf_addf(b, i > 0 ? ",%zu" : "%zu", off0);
        off0 += lp_text_len(tok, lp[i].token);
    }
    return bad | bbuf_add(b, "]}", 2);
}

int32_t
lp_upto(const struct kli_tokenizer *tok, const struct lp_list *l, int32_t from, size_t *off,
        size_t end)
{
    for (size_t len; from < l->n && *off + (len = lp_text_len(tok, l->v[from].token)) <= end;
         from++)
        *off += len;
    return from;
}
