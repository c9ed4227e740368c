/*
 * generate.c - kli_generate: prompt in, streamed text out.
 *
 * The prompt is evaluated in one call; then each step samples a token, turns it into text
 * and feeds it back. Text is held back while it might still become a stop string or while
 * it ends inside a UTF-8 character, so the callback never sees half a character or part of
 * a stop string. End tokens (<|im_end|>, [EOS], config's eos) end generation without being
 * fed, so a chat can append <|im_end|> and the next turn to the same session.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "session.h"
#include "tokenizer.h"
#include "unicode.h"
#include "util.h"

void
kli_generate_options_init(struct kli_generate_options *opt)
{
    *opt = (struct kli_generate_options){.size = sizeof(*opt), .max_tokens = 256};
}

/* Longest k < strlen(stop) such that buf ends with the first k bytes of stop. */
static size_t
gen_partial_stop(const char *buf, size_t n, const char *stop)
{
    size_t sl = strlen(stop);

    for (size_t k = sl - 1 < n ? sl - 1 : n; k > 0; k--) {
        if (memcmp(buf + n - k, stop, k) == 0)
            return k;
    }
    return 0;
}

struct gen_text {
    char *buf;
    size_t n, cap;
};

static int
gen_emit(struct gen_text *t, size_t k, const struct kli_generate_options *o)
{
    int stop = 0;

    if (k > 0 && o->on_text != NULL)
        stop = o->on_text(o->ud, t->buf, k);
    if (k > 0)
        memmove(t->buf, t->buf + k, t->n - k);   /* buf is NULL until text arrives */
    t->n -= k;
    return stop;
}

int
kli_generate(struct kli_session *s, const struct kli_tokenizer *tok, struct kli_sampler *smp,
             const kli_token *prompt, int32_t n_prompt, const struct kli_generate_options *opt,
             struct kli_generate_result *res, struct kli_err *err)
{
    struct kli_generate_options dflt;
    struct kli_generate_result r;
    struct gen_text text = {NULL, 0, 0};
    kli_token ends[TOKENIZER_N_ENDS];
    int rc = KLI_OK;
    double t0;

    memset(&r, 0, sizeof(r));
    r.last = -1;
    if (s == NULL || tok == NULL || smp == NULL || (prompt == NULL && n_prompt > 0) ||
        n_prompt < 0)
        return err_set(err, KLI_E_INVALID, "kli_generate: invalid arguments");
    if ((opt = OPTS_TAKE(kli_generate_options_init, dflt, opt, "kli_generate", err)) == NULL)
        return KLI_E_INVALID;
    if (opt->max_tokens < 0 || opt->n_stop < 0 || (opt->n_stop > 0 && opt->stop == NULL))
        return err_set(err, KLI_E_INVALID, "kli_generate: invalid options");
    for (int32_t i = 0; i < opt->n_stop; i++) {
        if (opt->stop[i] == NULL || opt->stop[i][0] == '\0')
            return err_set(err, KLI_E_INVALID, "stop string %d is empty", i);
    }
    tokenizer_end_tokens(tok, s->m->cfg.eos, ends);
    int32_t n_base = kli_tokenizer_n_base(tok);

    t0 = util_now_s();
    if (n_prompt > 0 && (rc = kli_session_eval(s, prompt, n_prompt, NULL, err)) != KLI_OK)
        goto out;
    r.n_prompt = n_prompt;
    r.prefill_seconds = util_now_s() - t0;
    if (kli_session_logits(s) == NULL) {
        rc = err_set(err, KLI_E_INVALID, "kli_generate: empty prompt and empty session");
        goto out;
    }

    t0 = util_now_s();
    while (r.n_generated < opt->max_tokens) {
        kli_token t = kli_sampler_sample(smp, kli_session_logits(s));
        int is_end = 0;
        r.last = t;
        for (int i = 0; i < TOKENIZER_N_ENDS; i++)
            is_end |= ends[i] >= 0 && t == ends[i];
        if (is_end) {
            r.finish = KLI_FINISH_EOS;
            break;
        }
        kli_sampler_accept(smp, t);
        r.n_generated++;
        if (opt->on_token != NULL)
            opt->on_token(opt->ud, t, kli_sampler_logprobs(smp));
        /* Special tokens other than the ends produce no text, or their names: all of them
         * (special 1) or the tool-call markers, <|tool_call...|> (special 2). */
        size_t len;
        const char *p = kli_token_bytes(tok, t, &len);
        if (t < n_base || opt->special == 1 ||
            (opt->special == 2 && p != NULL && len > 11 && memcmp(p, "<|tool_call", 11) == 0)) {
            if (p != NULL && util_text_add(&text.buf, &text.n, &text.cap, p, len) != 0) {
                rc = err_set(err, KLI_E_NOMEM, "out of memory");
                goto out;
            }
        }
        /* A stop string: emit what precedes it and end. */
        size_t hold = 0;
        for (int32_t i = 0; i < opt->n_stop && r.finish == KLI_FINISH_NONE; i++) {
            const char *hit = strstr(text.buf != NULL ? text.buf : "", opt->stop[i]);
            if (hit != NULL) {
                text.n = (size_t)(hit - text.buf);
                r.finish = KLI_FINISH_STOP;
            } else {
                size_t k = gen_partial_stop(text.buf, text.n, opt->stop[i]);
                hold = k > hold ? k : hold;
            }
        }
        if (r.finish == KLI_FINISH_STOP) {
            gen_emit(&text, text.n, opt);
            /* The token is part of the conversation all the same. */
            rc = kli_session_eval(s, &t, 1, NULL, err);
            break;
        }
        /* A grammar's value is whole: it ends like an end token, the token fed. */
        if (kli_sampler_grammar_status(smp) == 1) {
            r.finish = KLI_FINISH_EOS;
            gen_emit(&text, text.n, opt);
            rc = kli_session_eval(s, &t, 1, NULL, err);
            break;
        }
        size_t safe = kli_utf8_complete_prefix(text.buf, text.n - hold);
        if (gen_emit(&text, safe, opt) != 0) {
            r.finish = KLI_FINISH_INTERRUPT;
            rc = kli_session_eval(s, &t, 1, NULL, err);
            break;
        }
        if (kli_session_pos(s) >= s->ctx_max) {
            r.finish = KLI_FINISH_LENGTH;
            break;
        }
        if ((rc = kli_session_eval(s, &t, 1, NULL, err)) != KLI_OK)
            goto out;
    }
    if (r.finish == KLI_FINISH_NONE)
        r.finish = KLI_FINISH_LENGTH;
    if (r.finish != KLI_FINISH_STOP && r.finish != KLI_FINISH_INTERRUPT)
        gen_emit(&text, text.n, opt);   /* whatever remains, even a partial character */
    r.decode_seconds = util_now_s() - t0;
out:
    free(text.buf);
    if (res != NULL)
        *res = r;
    return rc;
}
