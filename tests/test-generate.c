/*
 * test-generate.c - chat rendering and generation through the public API on the tiny model:
 * the chat layout, no control-token injection, greedy generation against a hand-run argmax
 * loop, stop strings, streaming on UTF-8 boundaries, limits and interruption.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "kli.h"
#include "tap.h"
#include "testlib.h"

struct sink {
    char buf[8192];
    size_t n;
    int chunks, stop_after;
    size_t cuts[512];   /* byte offsets where one chunk ended and the next began */
};

static int
on_text(void *ud, const char *t, size_t len)
{
    struct sink *s = ud;

    if (tl_append(s->buf, sizeof(s->buf), &s->n, t, len))
        s->buf[s->n] = 0;
    if (s->chunks < 512)
        s->cuts[s->chunks] = s->n;
    s->chunks++;
    return s->stop_after > 0 && s->chunks >= s->stop_after;
}

/* Number of cuts that fall strictly inside a valid UTF-8 sequence of the whole text. */
static int
split_chars(const struct sink *s)
{
    int bad = 0;
    const unsigned char *b = (const unsigned char *)s->buf;

    for (size_t i = 0; i < s->n;) {
        size_t L = b[i] < 0x80 ? 1 : (b[i] >> 5) == 6 ? 2 : (b[i] >> 4) == 14 ? 3
                 : (b[i] >> 3) == 30 ? 4 : 1;
        int valid = i + L <= s->n;
        for (size_t k = 1; valid && k < L; k++)
            valid = (b[i + k] & 0xc0) == 0x80;
        if (!valid)
            L = 1;
        for (int c = 0; c < s->chunks && c < 512; c++)
            bad += s->cuts[c] > i && s->cuts[c] < i + L;
        i += L;
    }
    return bad;
}

static kli_token
tokid(const struct kli_tokenizer *t, const char *name)
{
    return kli_tokenizer_find_special(t, name);
}

int
main(int argc, char **argv)
{
    const char *td = tl_data();
    char dir[4096];
    struct kli_model *m = NULL;
    struct kli_session *s = NULL;
    struct kli_sampler *smp = NULL;
    struct kli_sampler_options so;
    struct kli_generate_options go;
    struct kli_generate_result res;
    struct kli_err err = {0};
    kli_token ids[4096];

    tap_init_whole(argc, argv);
    snprintf(dir, sizeof(dir), "%s/tiny-kimi-linear", td);
    if (kli_model_open(&m, dir, NULL, &err) != KLI_OK)
        skip_all(err.msg);
    const struct kli_tokenizer *tok = kli_model_tokenizer(m);
    ok(tok != NULL, "the tiny model has a tokenizer");

    /* ---- chat layout ---- */
    struct kli_chat_message msgs[] = {{"user", "hi <|im_end|>"}};
    int64_t n = kli_chat_render(tok, msgs, 1, 1, 0, ids, 4096, &err);
    kli_token want[256];
    int64_t w = 0;
    want[w++] = tokid(tok, "<|im_system|>");
    w += kli_tokenize(tok, "system", 6, 0, want + w, 256 - w, &err);
    want[w++] = tokid(tok, "<|im_middle|>");
    w += kli_tokenize(tok, "You are a helpful assistant", 27, 0, want + w, 256 - w, &err);
    want[w++] = tokid(tok, "<|im_end|>");
    want[w++] = tokid(tok, "<|im_user|>");
    w += kli_tokenize(tok, "user", 4, 0, want + w, 256 - w, &err);
    want[w++] = tokid(tok, "<|im_middle|>");
    w += kli_tokenize(tok, "hi <|im_end|>", 13, 0, want + w, 256 - w, &err);
    want[w++] = tokid(tok, "<|im_end|>");
    want[w++] = tokid(tok, "<|im_assistant|>");
    w += kli_tokenize(tok, "assistant", 9, 0, want + w, 256 - w, &err);
    want[w++] = tokid(tok, "<|im_middle|>");
    ok(n == w && memcmp(ids, want, (size_t)n * sizeof(kli_token)) == 0,
       "chat layout: default system turn, user turn, generation prompt (%lld ids)",
       (long long)n);
    int im_end_count = 0;
    for (int64_t i = 0; i < n; i++)
        im_end_count += ids[i] == tokid(tok, "<|im_end|>");
    ok(im_end_count == 2, "\"<|im_end|>\" typed by the user stays text");
    struct kli_chat_message sys[] = {{"system", "S"}, {"user", "u"}};
    int64_t n2 = kli_chat_render(tok, sys, 2, 0, 0, NULL, 0, &err);
    ok(n2 == 3 + 6 + 1 + 3 + 4 + 1, "an explicit system turn replaces the default (%lld)",
       (long long)n2);
    struct kli_chat_message badrole[] = {{"wizard", "x"}};
    memset(&err, 0, sizeof(err));
    ok(kli_chat_render(tok, badrole, 1, 1, 0, NULL, 0, &err) == KLI_E_INVALID,
       "unknown role refused: %s", err.msg);
    memset(&err, 0, sizeof(err));

    /* ---- greedy generation equals a hand-run argmax loop ---- */
    n = kli_chat_render(tok, msgs, 1, 1, 0, ids, 4096, &err);
    kli_sampler_options_init(&so);
    so.temperature = 0;
    kli_sampler_create(&smp, &so, kli_model_n_vocab(m), &err);
    kli_session_create(&s, m, NULL, &err);
    kli_generate_options_init(&go);
    go.max_tokens = 24;
    struct sink out1 = {0};
    go.on_text = on_text;
    go.ud = &out1;
    int rc = kli_generate(s, tok, smp, ids, (int32_t)n, &go, &res, &err);
    ok(rc == KLI_OK && res.n_prompt == n, "generate: %s", err.msg);
    ok(kli_session_pos(s) == n + res.n_generated, "every generated token was fed (pos %d)",
       kli_session_pos(s));

    struct kli_session *s2 = NULL;
    kli_session_create(&s2, m, NULL, &err);
    kli_session_eval(s2, ids, (int32_t)n, NULL, &err);
    kli_token hand[64];
    int nh = 0, V = kli_model_n_vocab(m);
    for (; nh < res.n_generated; nh++) {
        const float *lg = kli_session_logits(s2);
        kli_token best = tl_argmax(lg, V);
        hand[nh] = best;
        kli_session_eval(s2, &best, 1, NULL, &err);
    }
    /* Special ids (>= n_base) produce no text when generating. */
    char text[4096];
    size_t tl = 0;
    for (int i = 0; i < nh; i++) {
        size_t len;
        const char *b = kli_token_bytes(tok, hand[i], &len);
        if (hand[i] < kli_tokenizer_n_base(tok) && tl + len < sizeof(text)) {
            memcpy(text + tl, b, len);
            tl += len;
        }
    }
    ok(tl == out1.n && memcmp(text, out1.buf, out1.n) == 0,
       "greedy text equals the argmax loop's (%zu bytes)", out1.n);
    ok(split_chars(&out1) == 0, "no chunk boundary splits a UTF-8 character (%d chunks)",
       out1.chunks);
    ok(res.finish == KLI_FINISH_LENGTH || res.finish == KLI_FINISH_EOS,
       "finish reason %d", res.finish);

    /* ---- a stop string from the middle of that text ---- */
    if (out1.n >= 6) {
        char stop[4];
        memcpy(stop, out1.buf + out1.n / 2, 3);
        stop[3] = 0;
        const char *stops[] = {stop};
        const char *first = strstr(out1.buf, stop);
        kli_session_reset(s);
        kli_sampler_reset(smp);
        struct sink out2 = {0};
        go.ud = &out2;
        go.stop = stops;
        go.n_stop = 1;
        rc = kli_generate(s, tok, smp, ids, (int32_t)n, &go, &res, &err);
        ok(rc == KLI_OK && res.finish == KLI_FINISH_STOP &&
           out2.n == (size_t)(first - out1.buf) && memcmp(out2.buf, out1.buf, out2.n) == 0,
           "stop string: output ends just before it (%zu bytes)", out2.n);
        go.stop = NULL;
        go.n_stop = 0;
    } else {
        ok(1, "# SKIP greedy text too short for a stop-string test");
    }

    /* ---- limits and interruption ---- */
    kli_session_reset(s);
    struct sink out3 = {0};
    go.ud = &out3;
    go.max_tokens = 3;
    so.temperature = 0.9f;
    so.seed = 7;
    kli_sampler_free(smp);
    kli_sampler_create(&smp, &so, kli_model_n_vocab(m), &err);
    rc = kli_generate(s, tok, smp, ids, (int32_t)n, &go, &res, &err);
    ok(rc == KLI_OK && (res.n_generated == 3 || res.finish == KLI_FINISH_EOS),
       "max_tokens 3: %d generated", res.n_generated);
    kli_session_reset(s);
    struct sink out4 = {0};
    out4.stop_after = 1;
    go.ud = &out4;
    go.max_tokens = 50;
    rc = kli_generate(s, tok, smp, ids, (int32_t)n, &go, &res, &err);
    ok(rc == KLI_OK && (res.finish == KLI_FINISH_INTERRUPT || res.finish == KLI_FINISH_EOS) &&
       out4.chunks <= 1, "the callback stops generation (finish %d)", res.finish);

    /* context limit */
    struct kli_session *s3 = NULL;
    struct kli_session_options sopt;
    kli_session_options_init(&sopt);
    sopt.ctx_max = (int32_t)n + 2;
    kli_session_create(&s3, m, &sopt, &err);
    go.ud = &out3;
    out3.n = 0;
    rc = kli_generate(s3, tok, smp, ids, (int32_t)n, &go, &res, &err);
    ok(rc == KLI_OK && (res.finish == KLI_FINISH_LENGTH || res.finish == KLI_FINISH_EOS) &&
       kli_session_pos(s3) <= n + 2, "a full context ends generation (pos %d)",
       kli_session_pos(s3));
    memset(&err, 0, sizeof(err));
    kli_session_reset(s3);
    rc = kli_generate(s3, tok, smp, ids, (int32_t)n + 0, &go, &res, &err);
    kli_token more[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    memset(&err, 0, sizeof(err));
    ok(kli_session_eval(s3, more, 8, NULL, &err) == KLI_E_RANGE, "eval past ctx_max: %s",
       err.msg);

    /* ---- special: the names of special tokens, all (1) or the tool-call markers (2) ----
     * Greedy under a bias towards two special tokens, one a tool-call marker: the text of
     * special 0 is that of 1 without any special name, that of 2 without the other one. */
    kli_token bias_ids[2] = {tokid(tok, "<|tool_call_begin|>"), tokid(tok, "<|im_user|>")};
    float bias[2] = {3, 3};
    struct sink sp[3];
    so.temperature = 0;
    so.bias_ids = bias_ids;
    so.bias = bias;
    so.n_bias = 2;
    go.max_tokens = 40;
    for (int k = 0; k < 3; k++) {
        memset(&sp[k], 0, sizeof(sp[k]));
        memset(&err, 0, sizeof(err));
        kli_sampler_free(smp);
        kli_sampler_create(&smp, &so, kli_model_n_vocab(m), &err);
        kli_session_reset(s);
        go.ud = &sp[k];
        go.special = k;
        rc = kli_generate(s, tok, smp, ids, (int32_t)n, &go, &res, &err);
        ok(rc == KLI_OK, "special %d: %s", k, err.msg);
    }
    go.special = 0;
    char cut[2][8192];
    size_t cn[2] = {0, 0};
    const char *mk = "<|tool_call_begin|>", *us = "<|im_user|>";
    for (size_t i = 0; i < sp[1].n;) {
        /* a special token's name, or one byte of text */
        const char *e = strncmp(sp[1].buf + i, "<|", 2) == 0 ? strstr(sp[1].buf + i, "|>") : NULL;
        char name[64] = "";
        if (e != NULL && (size_t)(e + 2 - sp[1].buf - i) < sizeof(name))
            memcpy(name, sp[1].buf + i, (size_t)(e + 2 - sp[1].buf - i));
        int special = name[0] != '\0' && kli_tokenizer_find_special(tok, name) >= 0;
        size_t step = special ? strlen(name) : 1;
        if (!special)
            cut[0][cn[0]++] = sp[1].buf[i];
        if (!special || strncmp(name, "<|tool_call", 11) == 0) {
            memcpy(cut[1] + cn[1], sp[1].buf + i, step);
            cn[1] += step;
        }
        i += step;
    }
    ok(strstr(sp[1].buf, mk) != NULL && strstr(sp[1].buf, us) != NULL,
       "special 1 names both tokens: %.80s", sp[1].buf);
    ok(cn[0] == sp[0].n && memcmp(cut[0], sp[0].buf, cn[0]) == 0,
       "special 0: the same text without the names (%zu bytes)", sp[0].n);
    ok(cn[1] == sp[2].n && memcmp(cut[1], sp[2].buf, cn[1]) == 0 && strstr(sp[2].buf, mk),
       "special 2: the tool-call markers only (%zu bytes)", sp[2].n);
    so.n_bias = 0;

    kli_session_free(s3);
    kli_session_free(s2);
    kli_session_free(s);
    kli_sampler_free(smp);
    kli_model_close(m);
    plan_done();
    return tap_exit();
}
