/*
 * test-sched.c - the scheduler (kli_sched_*) against its plain twin, one request run alone:
 * a session that evaluates the prompt and a sampler that samples token after token. Requests
 * that join and leave at different steps get the tokens (and the logits) that each gets
 * alone with the same seed; a cancelled request ends alone; a bad request fails alone; a
 * request that starts from a kept prefix gets, bit for bit, the logits it gets without one.
 */
#include "config.h"

#include <dirent.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kli.h"
#include "tap.h"
#include "testlib.h"

#define MAXGEN 32

/* What a test expects of one request, and what the scheduler reported. */
struct req {
    const char *name;
    kli_token prompt[400];
    int32_t n_prompt, max_tokens;
    int32_t split;                /* alone: evaluate the prompt in two pieces, split here */
    struct kli_sampler_options so;
    uint64_t id;
    /* from the scheduler */
    kli_token got[MAXGEN];
    float *got_logits;            /* [MAXGEN][V] */
    int32_t n_got, finishes, n_cached, started, status;
    enum kli_finish finish;
    char error[256];
    /* alone */
    kli_token want[MAXGEN];
    float *want_logits;
    int32_t n_want;
    enum kli_finish want_finish;
};

static const struct kli_model *g_m;
static int32_t g_V;

static void
on_token(void *ud, const struct kli_sched_token *t)
{
    struct req *r = t->user;

    (void)ud;
    if (r->n_got < MAXGEN) {
        memcpy(r->got_logits + (size_t)r->n_got * (size_t)g_V, t->logits,
               (size_t)g_V * sizeof(float));
        r->got[r->n_got] = t->token;
    }
    r->n_got++;
}

static void
on_finish(void *ud, const struct kli_sched_result *res)
{
    struct req *r = res->user;

    (void)ud;
    r->finishes++;
    r->finish = res->finish;
    r->status = res->status;
    r->started = res->started;
    r->n_cached = res->n_cached;
    snprintf(r->error, sizeof(r->error), "%s", res->error != NULL ? res->error : "");
}

static int
is_end(kli_token t)
{
    const struct kli_tokenizer *tok = kli_model_tokenizer(g_m);

    return t == kli_model_eos(g_m) || t == kli_tokenizer_find_special(tok, "<|im_end|>") ||
           t == kli_tokenizer_find_special(tok, "[EOS]");
}

/* The request run alone: the prompt evaluated at once (or its first r->split tokens, then
 * the rest), then sample, accept, feed. */
static void
alone(struct req *r, int32_t ctx_max)
{
    struct kli_session_options o;
    struct kli_session *s = NULL;
    struct kli_sampler *smp = NULL;
    struct kli_err err = {0};

    kli_session_options_init(&o);
    o.ctx_max = ctx_max;
    r->want_finish = KLI_FINISH_LENGTH;
    if (kli_session_create(&s, g_m, &o, &err) != KLI_OK ||
        kli_sampler_create(&smp, &r->so, g_V, &err) != KLI_OK ||
        (r->split > 0 && kli_session_eval(s, r->prompt, r->split, NULL, &err) != KLI_OK) ||
        kli_session_eval(s, r->prompt + r->split, r->n_prompt - r->split, NULL, &err) != KLI_OK) {
        diag("alone: %s", err.msg);
        r->want_finish = KLI_FINISH_ERROR;
        goto out;
    }
    while (r->n_want < r->max_tokens) {
        kli_token t = kli_sampler_sample(smp, kli_session_logits(s));
        memcpy(r->want_logits + (size_t)r->n_want * (size_t)g_V, kli_session_logits(s),
               (size_t)g_V * sizeof(float));
        if (is_end(t)) {
            r->want_finish = KLI_FINISH_EOS;
            break;
        }
        kli_sampler_accept(smp, t);
        r->want[r->n_want++] = t;
        if (r->n_want < r->max_tokens && kli_session_eval(s, &t, 1, NULL, &err) != KLI_OK) {
            r->want_finish = KLI_FINISH_ERROR;
            break;
        }
    }
out:
    kli_sampler_free(smp);
    kli_session_free(s);
}

static void
req_init(struct req *r, const char *name, int32_t n_prompt, int32_t max_tokens, float temp,
         int salt)
{
    memset(r, 0, sizeof(*r));
    r->name = name;
    r->n_prompt = n_prompt;
    r->max_tokens = max_tokens;
    for (int32_t i = 0; i < n_prompt; i++)
        r->prompt[i] = (kli_token)((i * 37 + salt * 11 + 5) % 256);
    kli_sampler_options_init(&r->so);
    r->so.temperature = temp;
    r->so.seed = (uint64_t)salt;   /* the seed too */
    r->got_logits = calloc((size_t)MAXGEN * (size_t)g_V, sizeof(float));
    r->want_logits = calloc((size_t)MAXGEN * (size_t)g_V, sizeof(float));
}

static void
req_free(struct req *r)
{
    free(r->got_logits);
    free(r->want_logits);
}

/* What a test's requests differ in. Request i gets salt salt0 + i (its prompt and seed). */
struct spec {
    const char *name;
    int32_t n_prompt, max_tokens;
    float temp;
};

static void
req_init_all(struct req *r, const struct spec *sp, int n, int salt0)
{
    for (int i = 0; i < n; i++)
        req_init(&r[i], sp[i].name, sp[i].n_prompt, sp[i].max_tokens, sp[i].temp, salt0 + i);
}

/* Frees the scheduler, then the n requests (which the scheduler may end as it goes). */
static void
release(struct kli_sched *s, struct req *r, int n)
{
    kli_sched_free(s);
    for (int i = 0; i < n; i++)
        req_free(&r[i]);
}

static int
submit(struct kli_sched *s, struct req *r, const char *fail)
{
    struct kli_sched_request q;
    struct kli_err err = {0};

    kli_sched_request_init(&q);
    q.prompt = r->prompt;
    q.n_prompt = r->n_prompt;
    q.so = r->so;
    q.max_tokens = r->max_tokens;
    q.fail = fail;
    q.user = r;
    if (kli_sched_submit(s, &q, &r->id, &err) != KLI_OK) {
        diag("submit %s: %s", r->name, err.msg);
        return -1;
    }
    return 0;
}

/* Whether the scheduler gave r what r gets alone: the same tokens; the logits of the first
 * token (the prompt evaluated, then copied from the prefill session) bit for bit, those of
 * the later ones (batched decode, which doc/model.md section 9 does not promise bit for bit
 * against single decode) within the 1e-5 of test-batch.c. */
static void
same_as_alone(struct req *r, int32_t ctx_max, const char *what)
{
    double worst = 0;

    alone(r, ctx_max);
    int32_t n = r->n_want < MAXGEN ? r->n_want : MAXGEN;
    int same = r->finishes == 1 && r->n_got == r->n_want && r->finish == r->want_finish &&
               memcmp(r->got, r->want, (size_t)n * sizeof(kli_token)) == 0;
    int first = same && (n == 0 || memcmp(r->got_logits, r->want_logits,
                                          (size_t)g_V * sizeof(float)) == 0);
    for (int32_t k = 1; same && k < n; k++) {
        double e = tl_rel_l2(r->got_logits + (size_t)k * (size_t)g_V,
                             r->want_logits + (size_t)k * (size_t)g_V, g_V);
        worst = e > worst ? e : worst;
    }
    ok(same, "%s: %s: %d tokens as alone (%d), finish %d (%d)", what, r->name, (int)r->n_got,
       (int)r->n_want, (int)r->finish, (int)r->want_finish);
    ok(first && worst <= 1e-5, "%s: %s: the first logits bit for bit, the rest within 1e-5 "
       "(worst rel L2 %.2e)", what, r->name, worst);
}

static int
run_all(struct kli_sched *s)
{
    int steps = 0;

    while (kli_sched_step(s) > 0 && steps < 1000)
        steps++;
    return steps;
}

static struct kli_sched *
make(int32_t parallel, int32_t ctx_max, uint64_t prefix_bytes, int32_t min_prefix)
{
    struct kli_sched_options o;
    struct kli_sched *s = NULL;
    struct kli_err err = {0};

    kli_sched_options_init(&o);
    o.parallel = parallel;
    o.ctx_max = ctx_max;
    o.prefix_bytes = prefix_bytes;
    o.min_prefix = min_prefix;
    o.on_token = on_token;
    o.on_finish = on_finish;
    if (kli_sched_create(&s, g_m, &o, &err) != KLI_OK)
        diag("kli_sched_create: %s", err.msg);
    return s;
}

/* Four requests, three places: two start, run a step, two more arrive; one of them waits
 * for a place. They leave at different steps. */
static void
join_and_leave(void)
{
    static const struct spec sp[4] = {
        {"a", 40, 12, 0.9f}, {"b", 7, 3, 0.8f}, {"c", 100, 8, 1.0f}, {"d", 20, 5, 0.0f},
    };
    struct req r[4];
    struct kli_sched *s = make(3, 0, 0, 64);

    req_init_all(r, sp, 4, 1);
    r[3].so.top_k = 5;
    ok(s != NULL && submit(s, &r[0], NULL) == 0 && submit(s, &r[1], NULL) == 0,
       "join: two requests submitted");
    ok(kli_sched_step(s) == 2 && kli_sched_step(s) == 2, "join: two steps of two");
    ok(submit(s, &r[2], NULL) == 0 && submit(s, &r[3], NULL) == 0, "join: two more");
    run_all(s);
    for (int i = 0; i < 4; i++)
        same_as_alone(&r[i], 0, "join and leave");
    struct kli_sched_stats st;
    kli_sched_stats(s, &st);
    ok(st.waiting == 0 && st.running == 0 && st.steps > 0 && st.step_tokens > st.steps,
       "join: the stats count %lld steps, %lld tokens", (long long)st.steps,
       (long long)st.step_tokens);
    release(s, r, 4);
}

/* A running request and a waiting one are cancelled; the others go on as alone. */
static void
cancel(void)
{
    static const struct spec sp[3] = {
        {"running", 30, 20, 0.9f}, {"kept", 25, 10, 0.9f}, {"waiting", 10, 10, 0.9f},
    };
    struct req r[3];
    struct kli_sched *s = make(2, 0, 0, 64);

    req_init_all(r, sp, 3, 5);
    ok(s != NULL && submit(s, &r[0], NULL) == 0 && submit(s, &r[1], NULL) == 0 &&
       submit(s, &r[2], NULL) == 0, "cancel: three requests for two places");
    kli_sched_step(s);
    kli_sched_step(s);
    ok(kli_sched_waiting(s) == 1, "cancel: one waits");
    ok(kli_sched_cancel(s, r[0].id) == KLI_OK && kli_sched_cancel(s, r[2].id) == KLI_OK,
       "cancel: a running and a waiting request");
    ok(kli_sched_cancel(s, 999999) == KLI_E_RANGE, "cancel: an unknown id is refused");
    run_all(s);
    ok(r[0].finishes == 1 && r[0].finish == KLI_FINISH_INTERRUPT && r[0].started &&
       r[0].n_got == 3, "cancel: the running one ended after its %d tokens", (int)r[0].n_got);
    ok(r[2].finishes == 1 && r[2].finish == KLI_FINISH_INTERRUPT && !r[2].started &&
       r[2].n_got == 0, "cancel: the waiting one never started");
    same_as_alone(&r[1], 0, "cancel");
    release(s, r, 3);
}

/* A prompt longer than the context, bad sampler settings and a caller's own failure end
 * their requests; the good ones go on as alone. Freeing ends what is still held. */
static void
bad_requests(void)
{
    static const struct spec sp[5] = {
        {"good", 20, 6, 0.9f}, {"too long", 100, 6, 0.9f}, {"bad sampler", 10, 6, 0.9f},
        {"own failure", 10, 6, 0.9f}, {"good too", 30, 9, 0.7f},
    };
    struct req r[5];
    struct kli_sched *s = make(2, 64, 0, 64);
    struct kli_sched_request q;
    struct kli_err err = {0};
    const char *stops[17];

    req_init_all(r, sp, 5, 8);
    r[2].so.top_p = 2.0f;
    ok(s != NULL && submit(s, &r[0], NULL) == 0 && submit(s, &r[1], NULL) == 0 &&
       submit(s, &r[2], NULL) == 0 && submit(s, &r[3], "the caller's reason") == 0 &&
       submit(s, &r[4], NULL) == 0, "bad: five requests");
    run_all(s);
    same_as_alone(&r[0], 64, "bad");
    same_as_alone(&r[4], 64, "bad");
    ok(r[1].finishes == 1 && r[1].finish == KLI_FINISH_ERROR && r[1].status == KLI_E_RANGE &&
       !r[1].started && strstr(r[1].error, "does not fit") != NULL, "bad: %s", r[1].error);
    ok(r[2].finishes == 1 && r[2].finish == KLI_FINISH_ERROR && r[2].status < 0 &&
       !r[2].started && r[2].error[0] != '\0', "bad: %s", r[2].error);
    ok(r[3].finishes == 1 && r[3].finish == KLI_FINISH_ERROR &&
       strcmp(r[3].error, "the caller's reason") == 0, "bad: %s", r[3].error);

    kli_sched_request_init(&q);
    q.prompt = r[0].prompt;
    q.n_prompt = 5;
    for (int i = 0; i < 17; i++)
        stops[i] = "x";
    q.stop = stops;
    q.n_stop = 17;
    ok(kli_sched_submit(s, &q, NULL, &err) == KLI_E_INVALID, "bad: 17 stop strings refused");
    q.n_stop = 0;
    q.prompt = NULL;
    ok(kli_sched_submit(s, &q, NULL, &err) == KLI_E_INVALID, "bad: a NULL prompt refused");
    ok(kli_sched_step(NULL) == KLI_E_INVALID, "bad: a NULL scheduler refused");

    /* held at free: ends as INTERRUPT, once */
    struct req h;
    req_init(&h, "held", 10, 6, 0.9f, 13);
    submit(s, &h, NULL);
    kli_sched_step(s);
    release(s, r, 5);
    ok(h.finishes == 1 && h.finish == KLI_FINISH_INTERRUPT, "bad: free ends a held request");
    req_free(&h);
}

/* Three prompts share 200 tokens. The first leaves the shared state behind (the second
 * waits beside it), the second and a later third start from it: their first logits are
 * those of a fresh session that evaluates the same two pieces (200 tokens, then the rest),
 * bit for bit: a kept prefix costs nothing in accuracy. (Evaluating the prompt in one piece instead
 * chunks the recurrence differently: equal to rounding, not bit for bit.) */
static void
prefix_reuse(void)
{
    struct req r[3];
    struct kli_sched *s = make(1, 0, 64ULL << 20, 16);

    for (int i = 0; i < 3; i++) {
        req_init(&r[i], i == 0 ? "first" : i == 1 ? "second" : "third", 230 + 10 * i, 6,
                 0.9f, 20 + i);
        for (int k = 0; k < 200; k++)
            r[i].prompt[k] = (kli_token)((k * 13 + 7) % 256);
        r[i].split = 200;
    }
    ok(s != NULL && submit(s, &r[0], NULL) == 0 && submit(s, &r[1], NULL) == 0,
       "prefix: two requests");
    run_all(s);
    ok(submit(s, &r[2], NULL) == 0, "prefix: a third, later");
    run_all(s);
    for (int i = 0; i < 3; i++)
        same_as_alone(&r[i], 0, "prefix reuse");
    ok(r[0].n_cached == 0 && r[1].n_cached >= 200 && r[2].n_cached >= 200,
       "prefix: cached tokens %d, %d, %d", (int)r[0].n_cached, (int)r[1].n_cached,
       (int)r[2].n_cached);
    struct kli_sched_stats st;
    kli_sched_stats(s, &st);
    ok(st.prefix.stored >= 1 && st.prefix.entries >= 1, "prefix: %lld stored",
       (long long)st.prefix.stored);
    release(s, r, 3);
}

/* A prompt of no tokens has no logits to sample from: it fails alone, as kli_generate
 * fails on one; the request beside it goes on as alone. */
static void
empty_prompt(void)
{
    static const struct spec sp[2] = {{"empty", 0, 5, 0.9f}, {"beside", 12, 5, 0.9f}};
    struct req r[2];
    struct kli_sched *s = make(2, 0, 0, 64);

    req_init_all(r, sp, 2, 30);
    ok(s != NULL && submit(s, &r[0], NULL) == 0 && submit(s, &r[1], NULL) == 0,
       "empty: two requests");
    run_all(s);
    ok(r[0].finishes == 1 && r[0].finish == KLI_FINISH_ERROR && r[0].status == KLI_E_INVALID &&
       !r[0].started && r[0].n_got == 0, "empty: fails: %s", r[0].error);
    same_as_alone(&r[1], 0, "empty");
    release(s, r, 2);
}

/* What the callbacks of from_callbacks do, as a server's would. */
static struct {
    struct kli_sched *s;
    struct req *late;             /* submitted from the first on_finish */
    struct req *victim;           /* cancelled from on_need */
    int late_done, victim_done;
    int bad;                      /* callbacks that got an answer they should not have */
    int steps_refused;
    int freeing, submits_freeing;  /* submits during kli_sched_free that were accepted */
} g_cb;

static void
cb_finish(void *ud, const struct kli_sched_result *res)
{
    on_finish(ud, res);
    /* the request has ended: its id is unknown now, at any point (freeing included) */
    g_cb.bad += kli_sched_cancel(g_cb.s, res->id) != KLI_E_RANGE;
    /* a step from inside a step is refused */
    g_cb.steps_refused += kli_sched_step(g_cb.s) == KLI_E_INVALID;
    /* a server that resubmits what was interrupted: refused while freeing, or the free
     * would never end */
    if (g_cb.freeing && g_cb.submits_freeing < 50 && res->finish == KLI_FINISH_INTERRUPT)
        g_cb.submits_freeing += submit(g_cb.s, res->user, NULL) == 0;
    if (g_cb.late != NULL && !g_cb.late_done) {
        g_cb.late_done = 1;
        g_cb.bad += submit(g_cb.s, g_cb.late, NULL) != 0;
    }
}

static void
cb_need(void *ud, struct kli_sched *s)
{
    (void)ud;
    if (g_cb.victim != NULL && !g_cb.victim_done && kli_sched_waiting(s) > 0) {
        g_cb.victim_done = 1;
        g_cb.bad += kli_sched_cancel(s, g_cb.victim->id) != KLI_OK;
    }
}

/* Submit, cancel and step from inside the callbacks: an ended request's id is unknown; a
 * step from a callback is refused; a request submitted from on_finish runs as alone; one
 * cancelled from on_need never starts; freeing with running and waiting requests ends each
 * once. */
static void
from_callbacks(void)
{
    static const struct spec sp[7] = {
        {"first", 15, 3, 0.9f}, {"cancelled 1", 10, 4, 0.9f}, {"cancelled 2", 11, 4, 0.9f},
        {"victim", 12, 4, 0.9f}, {"late", 14, 5, 0.8f}, {"held running", 9, 20, 0.9f},
        {"held waiting", 9, 20, 0.9f},
    };
    struct req r[7];
    struct kli_sched_options o;
    struct kli_err err = {0};
    struct kli_sched *s = NULL;

    memset(&g_cb, 0, sizeof(g_cb));
    req_init_all(r, sp, 7, 40);
    kli_sched_options_init(&o);
    o.parallel = 1;
    o.prefix_bytes = 0;
    o.on_token = on_token;
    o.on_finish = cb_finish;
    o.on_need = cb_need;
    ok(kli_sched_create(&s, g_m, &o, &err) == KLI_OK, "callbacks: created %s", err.msg);
    g_cb.s = s;
    ok(submit(s, &r[0], NULL) == 0 && kli_sched_step(s) == 1, "callbacks: the first runs");
    ok(submit(s, &r[1], NULL) == 0 && submit(s, &r[2], NULL) == 0 && submit(s, &r[3], NULL) == 0,
       "callbacks: three wait");
    ok(kli_sched_cancel(s, r[1].id) == KLI_OK && kli_sched_cancel(s, r[2].id) == KLI_OK,
       "callbacks: two cancelled");
    g_cb.late = &r[4];
    g_cb.victim = &r[3];
    run_all(s);
    for (int i = 1; i <= 3; i++)
        ok(r[i].finishes == 1 && r[i].finish == KLI_FINISH_INTERRUPT && !r[i].started &&
           r[i].n_got == 0, "callbacks: %s ended once, never started", r[i].name);
    ok(g_cb.victim_done, "callbacks: on_need cancelled a waiting request");
    same_as_alone(&r[0], 0, "callbacks");
    same_as_alone(&r[4], 0, "callbacks");
    ok(submit(s, &r[5], NULL) == 0 && kli_sched_step(s) == 1 && submit(s, &r[6], NULL) == 0,
       "callbacks: one runs, one waits");
    g_cb.steps_refused = 0;
    g_cb.freeing = 1;
    kli_sched_free(s);
    ok(r[5].finishes == 1 && r[5].finish == KLI_FINISH_INTERRUPT && r[5].started &&
       r[6].finishes == 1 && r[6].finish == KLI_FINISH_INTERRUPT && !r[6].started,
       "callbacks: freeing ended the running and the waiting one once");
    ok(g_cb.bad == 0, "callbacks: %d wrong answers to calls from callbacks", g_cb.bad);
    ok(g_cb.steps_refused == 2, "callbacks: a step from on_finish refused while freeing too");
    ok(g_cb.submits_freeing == 0, "callbacks: %d submits accepted while freeing",
       g_cb.submits_freeing);
    for (int i = 0; i < 7; i++)
        req_free(&r[i]);
}

static struct kli_sched *g_cancel_s;

/* on_token that cancels its request at its first token, as a server does when the client
 * has gone. */
static void
cb_token_cancel(void *ud, const struct kli_sched_token *t)
{
    struct req *r = t->user;

    on_token(ud, t);
    if (r->name[0] == 'g' && t->n_generated == 1)
        kli_sched_cancel(g_cancel_s, t->id);
}

static uint64_t g_cancel_other;

/* on_finish that cancels another request, which decodes in the same step. */
static void
cb_finish_cancel(void *ud, const struct kli_sched_result *res)
{
    on_finish(ud, res);
    if (g_cancel_other != 0)
        kli_sched_cancel(g_cancel_s, g_cancel_other);
}

/* A request cancelled from on_token of its first token (sampled as it joins) gets no second
 * token; the one beside it goes on as alone. */
static void
cancel_from_token(void)
{
    static const struct spec sp[2] = {{"gone", 20, 10, 0.9f}, {"stays", 16, 6, 0.9f}};
    struct req r[2];
    struct kli_sched_options o;
    struct kli_err err = {0};
    struct kli_sched *s = NULL;

    req_init_all(r, sp, 2, 50);
    kli_sched_options_init(&o);
    o.parallel = 2;
    o.prefix_bytes = 0;
    o.on_token = cb_token_cancel;
    o.on_finish = on_finish;
    ok(kli_sched_create(&s, g_m, &o, &err) == KLI_OK, "cancel from token: created %s",
       err.msg);
    g_cancel_s = s;
    ok(submit(s, &r[0], NULL) == 0 && submit(s, &r[1], NULL) == 0,
       "cancel from token: two requests");
    run_all(s);
    ok(r[0].finishes == 1 && r[0].finish == KLI_FINISH_INTERRUPT && r[0].n_got == 1,
       "cancel from token: ended after its first token (%d)", (int)r[0].n_got);
    same_as_alone(&r[1], 0, "cancel from token");
    release(s, r, 2);

    /* the first ends after 2 tokens and its on_finish cancels the second, decoded in the
     * same step after it: the second gets no token after the cancel */
    static const struct spec sq[2] = {{"short", 20, 2, 0.9f}, {"other", 16, 10, 0.9f}};
    req_init_all(r, sq, 2, 55);
    o.on_token = on_token;
    o.on_finish = cb_finish_cancel;
    s = NULL;
    ok(kli_sched_create(&s, g_m, &o, &err) == KLI_OK, "cancel from finish: created");
    g_cancel_s = s;
    ok(submit(s, &r[0], NULL) == 0 && submit(s, &r[1], NULL) == 0,
       "cancel from finish: two requests");
    g_cancel_other = r[1].id;
    run_all(s);
    g_cancel_other = 0;
    ok(r[0].finishes == 1 && r[0].n_got == 2 && r[1].finishes == 1 &&
       r[1].finish == KLI_FINISH_INTERRUPT && r[1].n_got == 1,
       "cancel from finish: the other ended with the first's step (%d tokens)",
       (int)r[1].n_got);
    release(s, r, 2);
}

/* What kli_generate gives, or the scheduler gave, for one request. */
struct gen_out {
    char text[1024];
    size_t len;
    int32_t n_generated;
    enum kli_finish finish;
    int finishes;
};

static int
gen_text(void *ud, const char *text, size_t len)
{
    struct gen_out *g = ud;

    tl_append(g->text, sizeof(g->text), &g->len, text, len);
    return 0;
}

static void
gen_finish(void *ud, const struct kli_sched_result *res)
{
    struct gen_out *g = res->user;

    (void)ud;
    g->finishes++;
    g->finish = res->finish;
    g->n_generated = res->n_generated;
    g->len = res->len < sizeof(g->text) ? res->len : 0;
    memcpy(g->text, res->text, g->len);
}

/* kli_generate in a fresh session of ctx_max tokens. */
static void
generate(struct gen_out *g, const kli_token *prompt, int32_t n, int32_t ctx_max,
         const struct kli_sampler_options *so, int32_t max_tokens, const char *stop)
{
    struct kli_session_options o;
    struct kli_generate_options go;
    struct kli_generate_result res;
    struct kli_session *s = NULL;
    struct kli_sampler *smp = NULL;
    struct kli_err err = {0};

    memset(g, 0, sizeof(*g));
    kli_session_options_init(&o);
    o.ctx_max = ctx_max;
    kli_generate_options_init(&go);
    go.max_tokens = max_tokens;
    go.stop = &stop;
    go.n_stop = stop != NULL;
    go.on_text = gen_text;
    go.ud = g;
    if (kli_session_create(&s, g_m, &o, &err) != KLI_OK ||
        kli_sampler_create(&smp, so, g_V, &err) != KLI_OK ||
        kli_generate(s, kli_model_tokenizer(g_m), smp, prompt, n, &go, &res, &err) != KLI_OK) {
        diag("generate: %s", err.msg);
        g->finish = KLI_FINISH_ERROR;
    } else {
        g->finish = res.finish;
        g->n_generated = res.n_generated;
    }
    kli_sampler_free(smp);
    kli_session_free(s);
}

/* The scheduler gives what kli_generate gives with the same sampler settings and seed:
 * the text, the count and the reason, for a prompt that fills the context exactly and
 * for a stop string taken from the middle of the text (it may span tokens). */
static void
like_generate(void)
{
    enum { CTX = 64, N = 3 };
    struct kli_sched_options o;
    struct kli_sched *s = NULL;
    struct kli_err err = {0};
    struct gen_out want[N], got[N];
    kli_token prompt[CTX];
    int32_t n[N] = {CTX, 20, 20}, max[N] = {5, 24, 24};
    char stop[8] = "";
    struct kli_sampler_options so;

    kli_sampler_options_init(&so);
    so.temperature = 0.9f;
    so.seed = 77;
    for (int32_t i = 0; i < CTX; i++)
        prompt[i] = (kli_token)((i * 29 + 3) % 256);
    generate(&want[0], prompt, n[0], CTX, &so, max[0], NULL);
    generate(&want[1], prompt, n[1], CTX, &so, max[1], NULL);
    /* three bytes from the middle of that text, without a NUL */
    for (size_t at = want[1].len / 2; at + 3 <= want[1].len && stop[0] == '\0'; at++) {
        if (memchr(want[1].text + at, '\0', 3) == NULL)
            memcpy(stop, want[1].text + at, 3);
    }
    generate(&want[2], prompt, n[2], CTX, &so, max[2], stop[0] != '\0' ? stop : NULL);
    ok(want[0].finish == KLI_FINISH_LENGTH && want[0].n_generated == 1,
       "like generate: a full context gives one token (%d)", (int)want[0].n_generated);
    ok(stop[0] != '\0' && want[2].finish == KLI_FINISH_STOP, "like generate: a stop string");

    kli_sched_options_init(&o);
    o.parallel = 2;
    o.ctx_max = CTX;
    o.prefix_bytes = 0;
    o.on_finish = gen_finish;
    ok(kli_sched_create(&s, g_m, &o, &err) == KLI_OK, "like generate: created %s", err.msg);
    for (int i = 0; i < N && s != NULL; i++) {
        struct kli_sched_request q;
        const char *stops[1] = {stop};
        memset(&got[i], 0, sizeof(got[i]));
        kli_sched_request_init(&q);
        q.prompt = prompt;
        q.n_prompt = n[i];
        q.so = so;
        q.max_tokens = max[i];
        q.stop = stops;
        q.n_stop = i == 2 && stop[0] != '\0';
        q.user = &got[i];
        ok(kli_sched_submit(s, &q, NULL, &err) == KLI_OK, "like generate: submitted");
    }
    if (s != NULL)
        run_all(s);
    for (int i = 0; i < N; i++)
        ok(got[i].finishes == 1 && got[i].finish == want[i].finish &&
           got[i].n_generated == want[i].n_generated && got[i].len == want[i].len &&
           memcmp(got[i].text, want[i].text, want[i].len) == 0,
           "like generate: request %d: finish %d (%d), %d tokens (%d), %zu bytes (%zu)", i,
           (int)got[i].finish, (int)want[i].finish, (int)got[i].n_generated,
           (int)want[i].n_generated, got[i].len, want[i].len);
    kli_sched_free(s);
}

static int g_notices;

static void
on_notice(void *ud, const char *msg)
{
    (void)ud;
    diag("notice: %s", msg);
    g_notices++;
}

static struct kli_sched *
make_dir(uint64_t prefix_bytes, const char *dir, struct kli_err *err)
{
    struct kli_sched_options o;
    struct kli_sched *s = NULL;

    kli_sched_options_init(&o);
    o.parallel = 1;
    o.prefix_bytes = prefix_bytes;
    o.prefix_dir = dir;
    o.min_prefix = 16;
    o.on_token = on_token;
    o.on_finish = on_finish;
    o.on_notice = on_notice;
    kli_sched_create(&s, g_m, &o, err);
    return s;
}

/* Two schedulers share a prefix_dir, as two processes would: the second, with no memory
 * for prefixes, starts from the file the first left and gets what it gets alone. A file
 * where the directory should be is refused. */
static void
prefix_dir(void)
{
    char dir[] = "/tmp/kli-test-sched-XXXXXX", path[4200];
    struct req r[3];
    struct kli_err err = {0};
    struct kli_sched_stats st;
    struct kli_sched *a, *b;

    if (mkdtemp(dir) == NULL) {
        ok(0, "prefix dir: mkdtemp");
        return;
    }
    for (int i = 0; i < 3; i++) {
        req_init(&r[i], i == 0 ? "first" : i == 1 ? "second" : "other process", 220 + 10 * i,
                 5, 0.9f, 60 + i);
        for (int k = 0; k < 200; k++)
            r[i].prompt[k] = (kli_token)((k * 17 + 3) % 256);
        r[i].split = 200;
    }
    a = make_dir(64ULL << 20, dir, &err);
    ok(a != NULL && submit(a, &r[0], NULL) == 0 && submit(a, &r[1], NULL) == 0,
       "prefix dir: two requests %s", err.msg);
    run_all(a);
    kli_sched_stats(a, &st);
    ok(st.prefix.disk_saves >= 1, "prefix dir: %lld saved", (long long)st.prefix.disk_saves);
    b = make_dir(0, dir, &err);
    ok(b != NULL && submit(b, &r[2], NULL) == 0, "prefix dir: a second scheduler %s",
       err.msg);
    run_all(b);
    kli_sched_stats(b, &st);
    ok(r[2].n_cached >= 200 && st.prefix.disk_loads >= 1, "prefix dir: %d tokens from a file",
       (int)r[2].n_cached);
    for (int i = 0; i < 3; i++)
        same_as_alone(&r[i], 0, "prefix dir");
    kli_sched_free(a);
    kli_sched_free(b);

    /* a prefix_dir gone after the start: every save fails, each with a notice; the
     * requests go on as alone */
    char gone[4300];
    struct req g[2];
    snprintf(gone, sizeof(gone), "%s/gone", dir);
    struct kli_sched *e = make_dir(64ULL << 20, gone, &err);
    rmdir(gone);
    g_notices = 0;
    for (int i = 0; i < 2; i++) {
        req_init(&g[i], i == 0 ? "unsaved 1" : "unsaved 2", 40 + i, 4, 0.9f, 65 + i);
        for (int k = 0; k < 30; k++)
            g[i].prompt[k] = (kli_token)(k + 2);
        g[i].split = 30;
    }
    ok(e != NULL && submit(e, &g[0], NULL) == 0 && submit(e, &g[1], NULL) == 0,
       "prefix dir: a directory that went away");
    run_all(e);
    kli_sched_stats(e, &st);
    ok(st.prefix.disk_errors >= 1 && g_notices == st.prefix.disk_errors,
       "prefix dir: %d notices for %lld failed saves", g_notices,
       (long long)st.prefix.disk_errors);
    for (int i = 0; i < 2; i++)
        same_as_alone(&g[i], 0, "prefix dir gone");
    release(e, g, 2);

    /* a file is no directory */
    snprintf(path, sizeof(path), "%s/file", dir);
    FILE *f = fopen(path, "w");
    if (f != NULL)
        fclose(f);
    struct kli_sched *c = make_dir(0, path, &err);
    ok(c == NULL && err.code == KLI_E_IO, "prefix dir: a file refused: %s", err.msg);

    DIR *d = opendir(dir);
    struct dirent *de;
    while (d != NULL && (de = readdir(d)) != NULL) {
        if (de->d_name[0] != '.') {
            snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
            unlink(path);
        }
    }
    if (d != NULL)
        closedir(d);
    rmdir(dir);
    for (int i = 0; i < 3; i++)
        req_free(&r[i]);
}

static int g_late_member_called;

static void
cb_late_member(void *ud, const struct kli_sched_result *res)
{
    (void)ud;
    (void)res;
    g_late_member_called++;
}

/* The size of kli_sched_options and kli_sched_request (kli.h, ABI): 0 (not filled by the
 * _init) is refused; the members past a smaller size are not read but take defaults. */
static void
options_size(void)
{
    struct kli_sched_options o;
    struct kli_sched_request q;
    struct kli_sched *s = NULL;
    struct kli_err err = {0};
    kli_token prompt[8] = {1, 2, 3, 4, 5, 6, 7, 8};

    memset(&o, 0, sizeof(o));
    o.parallel = 2;
    o.min_prefix = 64;
    ok(kli_sched_create(&s, g_m, &o, &err) == KLI_E_INVALID && s == NULL,
       "size: options without their _init refused: %s", err.msg);
    kli_sched_options_init(&o);
    o.prefix_bytes = 0;
    o.size = offsetof(struct kli_sched_options, ud);
    o.on_finish = cb_late_member;   /* past size: not read, NULL */
    g_late_member_called = 0;
    ok(kli_sched_create(&s, g_m, &o, &err) == KLI_OK, "size: an older, smaller struct %s",
       err.msg);
    memset(&q, 0, sizeof(q));
    q.prompt = prompt;
    q.n_prompt = 8;
    q.max_tokens = 2;
    q.so.seed = 1;
    ok(kli_sched_submit(s, &q, NULL, &err) == KLI_E_INVALID,
       "size: a request without its _init refused: %s", err.msg);
    kli_sched_request_init(&q);
    q.prompt = prompt;
    q.n_prompt = 8;
    q.max_tokens = 2;
    ok(kli_sched_submit(s, &q, NULL, &err) == KLI_OK, "size: a request");
    run_all(s);
    kli_sched_free(s);
    ok(g_late_member_called == 0, "size: a callback past size never called (%d)",
       g_late_member_called);
}

/* The edges of the options: parallel 256 (and 257 refused), a prefix budget of one byte
 * (every kept prefix evicted before its use; the shared part is still evaluated first),
 * max_tokens 0 (the prompt only). */
static void
limits(void)
{
    static const struct spec sp[3] = {
        {"wide", 30, 4, 0.9f}, {"prompt only", 25, 0, 0.9f}, {"wide too", 35, 6, 0.9f},
    };
    struct req r[3];
    struct kli_sched_options o;
    struct kli_sched *s = NULL;
    struct kli_err err = {0};

    kli_sched_options_init(&o);
    o.parallel = 257;
    ok(kli_sched_create(&s, g_m, &o, &err) == KLI_E_RANGE && s == NULL,
       "limits: parallel 257 refused");
    for (int pass = 0; pass < 2; pass++) {
        const char *what = pass == 0 ? "parallel 256" : "prefix_bytes 1";
        req_init_all(r, sp, 3, 70);
        for (int i = 0; i < 3; i++) {
            for (int k = 0; k < 20; k++)
                r[i].prompt[k] = (kli_token)(k + 1);
            r[i].split = pass == 1 ? 20 : 0;   /* the shared 20 are evaluated first */
        }
        s = pass == 0 ? make(256, 0, 0, 64) : make(1, 0, 1, 8);
        ok(s != NULL && submit(s, &r[0], NULL) == 0 && submit(s, &r[1], NULL) == 0 &&
           submit(s, &r[2], NULL) == 0, "limits: %s: three requests", what);
        run_all(s);
        same_as_alone(&r[0], 0, what);
        same_as_alone(&r[2], 0, what);
        ok(r[1].finishes == 1 && r[1].finish == KLI_FINISH_LENGTH && r[1].started &&
           r[1].n_got == 0, "limits: %s: max_tokens 0 evaluates the prompt only", what);
        release(s, r, 3);
    }
}

/* Identical prompts: the second starts from the whole prompt kept (nothing left to
 * evaluate). A token id outside the vocabulary in a prompt that shares the prefix fails
 * that request alone; the others get what they get alone. */
static void
identical_and_bad(void)
{
    static const struct spec sp[4] = {
        {"same 1", 40, 5, 0.9f}, {"same 2", 40, 5, 0.9f}, {"bad id", 40, 5, 0.9f},
        {"after", 45, 5, 0.9f},
    };
    struct req r[4];
    struct kli_sched *s = make(1, 0, 64ULL << 20, 16);

    req_init_all(r, sp, 4, 80);
    for (int i = 0; i < 4; i++) {
        for (int k = 0; k < 40; k++)
            r[i].prompt[k] = (kli_token)((k * 7 + 1) % 256);
        r[i].split = 40;
        r[i].so.seed = 5;   /* the identical ones sample alike too */
    }
    r[2].prompt[39] = g_V + 3;
    ok(s != NULL && submit(s, &r[0], NULL) == 0 && submit(s, &r[1], NULL) == 0 &&
       submit(s, &r[2], NULL) == 0 && submit(s, &r[3], NULL) == 0,
       "identical: four requests");
    run_all(s);
    same_as_alone(&r[0], 0, "identical");
    same_as_alone(&r[1], 0, "identical");
    same_as_alone(&r[3], 0, "identical");
    ok(r[1].n_cached == 40 && memcmp(r[0].got, r[1].got, sizeof(r[0].got)) == 0,
       "identical: the second started from all %d tokens kept", (int)r[1].n_cached);
    ok(r[2].finishes == 1 && r[2].finish == KLI_FINISH_ERROR && r[2].status == KLI_E_RANGE,
       "identical: a bad id fails alone: %s", r[2].error);
    release(s, r, 4);
}

/* keep_finished: a conversation's next turn (its prompt, what it generated, new tokens)
 * starts from the state the first turn ended with, and one whose answer differs from what
 * was generated from the state at the end of the first prompt; without the option it starts
 * from nothing kept. Either way it decodes what it decodes alone, the first logits within
 * rounding (the kept part was evaluated a token at a time). */
static void
keep_finished(void)
{
    struct req a, b[2];
    struct kli_sched_options o;
    struct kli_err err = {0};

    req_init(&a, "turn 1", 30, 6, 0.0f, 71);
    for (int k = 0; k < 2; k++) {
        struct kli_sched *s = NULL;
        kli_sched_options_init(&o);
        o.parallel = 2;
        o.min_prefix = 8;
        o.keep_finished = k == 0;
        o.on_token = on_token;
        o.on_finish = on_finish;
        ok(kli_sched_create(&s, g_m, &o, &err) == KLI_OK, "keep_finished %d: created %s", k,
           err.msg);
        a.n_got = a.finishes = 0;
        if (s == NULL || submit(s, &a, NULL) != 0)
            return;
        run_all(s);
        /* fed back: every token but an end token, or the last one at max_tokens */
        int32_t fed = a.finish == KLI_FINISH_LENGTH ? a.n_got - 1 : a.n_got;
        req_init(&b[k], "turn 2", 0, 5, 0.0f, 72);
        memcpy(b[k].prompt, a.prompt, 30 * sizeof(kli_token));
        memcpy(b[k].prompt + 30, a.got, (size_t)fed * sizeof(kli_token));
        for (int i = 0; i < 7; i++)
            b[k].prompt[30 + fed + i] = (kli_token)(100 + i);
        b[k].n_prompt = 30 + fed + 7;
        submit(s, &b[k], NULL);
        run_all(s);
        ok(b[k].n_cached == (k == 0 ? 30 + fed : 0), "keep_finished %d: %d tokens cached, "
           "want %d", k, (int)b[k].n_cached, k == 0 ? 30 + fed : 0);
        alone(&b[k], 0);
        double e = tl_rel_l2(b[k].got_logits, b[k].want_logits, g_V);
        ok(b[k].n_got == b[k].n_want && b[k].finishes == 1 &&
           memcmp(b[k].got, b[k].want, (size_t)b[k].n_want * sizeof(kli_token)) == 0 &&
           e <= 1e-5, "keep_finished %d: the second turn as alone (first logits rel L2 %.2e)",
           k, e);
        /* a next turn whose answer was not the tokens generated (its text tokenized
         * otherwise): the state kept at the end of the first prompt still serves. On a new
         * scheduler, so that no earlier second turn has left a shared prefix behind. */
        kli_sched_free(s);
        s = NULL;
        ok(kli_sched_create(&s, g_m, &o, &err) == KLI_OK, "keep_finished %d: again %s", k,
           err.msg);
        a.n_got = a.finishes = 0;
        if (s == NULL || submit(s, &a, NULL) != 0)
            return;
        run_all(s);
        struct req c;
        req_init(&c, "turn 2'", 0, 5, 0.0f, 73);
        memcpy(c.prompt, a.prompt, 30 * sizeof(kli_token));
        for (int i = 0; i < 9; i++)
            c.prompt[30 + i] = (kli_token)(200 + i);
        c.n_prompt = 39;
        submit(s, &c, NULL);
        run_all(s);
        ok(c.n_cached == (k == 0 ? 30 : 0), "keep_finished %d: another answer: %d tokens "
           "cached, want %d (the first prompt)", k, (int)c.n_cached, k == 0 ? 30 : 0);
        alone(&c, 0);
        e = tl_rel_l2(c.got_logits, c.want_logits, g_V);
        ok(c.n_got == c.n_want && c.finishes == 1 &&
           memcmp(c.got, c.want, (size_t)c.n_want * sizeof(kli_token)) == 0 && e <= 1e-5,
           "keep_finished %d: another answer decodes as alone (first logits rel L2 %.2e)", k, e);
        req_free(&c);
        kli_sched_free(s);
        req_free(&b[k]);
    }
    req_free(&a);
}

int
main(int argc, char **argv)
{
    static const struct tap_fn cases[] = {
        {"join_and_leave", join_and_leave},
        {"cancel", cancel},
        {"bad_requests", bad_requests},
        {"prefix_reuse", prefix_reuse},
        {"empty_prompt", empty_prompt},
        {"from_callbacks", from_callbacks},
        {"cancel_from_token", cancel_from_token},
        {"like_generate", like_generate},
        {"prefix_dir", prefix_dir},
        {"options_size", options_size},
        {"limits", limits},
        {"identical_and_bad", identical_and_bad},
        {"keep_finished", keep_finished},
    };

    tap_init(argc, argv);
    if (!tap_listing) {
        g_m = tl_open_model("tiny-kimi-linear", 2);
        g_V = kli_model_n_vocab(g_m);
    }
    tap_run(cases, sizeof(cases) / sizeof(cases[0]));
    kli_model_close((struct kli_model *)g_m);
    plan_done();
    return tap_exit();
}
