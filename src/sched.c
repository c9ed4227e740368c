/*
 * sched.c - the scheduler: many requests through one model, many at a time (kli.h,
 * "Scheduler").
 *
 * Continuous batching. Each place owns a decode session (batch_max = parallel, so its
 * scratch is small) and, while a request runs there, the request's sampler. At each step,
 * free places take the next waiting requests (while others decode, only as many as
 * join_tokens prompt tokens take to evaluate): a joining prompt is evaluated in one shared
 * prefill session (batch_max SCHED_PREFILL, so prefill runs as matrix products), whose state
 * is then copied into the place (kli_session_copy). Then one token of every running request
 * goes through kli_session_eval_batch: one pass over the weights, the experts shared by
 * several rows run as one product, so a step costs little more for 16 rows than for one. A
 * finished request leaves at once.
 *
 * Prefix reuse. When a joining request shares at least min_prefix leading tokens with
 * another (one still waiting, or one of the last SCHED_RECENT that ran), the prefill
 * session's state at the end of that common prefix is kept in the prefix cache (prefix.c)
 * before the rest of the prompt is evaluated. Every later request starts from the longest
 * kept prefix of its prompt and evaluates only the rest. Looking at the waiting requests
 * lets the first of a group already leave the shared state behind, so sixteen questions
 * about one document evaluate the document once. This needs no knowledge of the chat
 * format: a shared system turn, a shared document and identical prompts are all common
 * token prefixes.
 *
 * A request samples as kli_generate does: an end token or a stop string finishes it, so do
 * max_tokens and a full context; its sampler sees only its own tokens, so it decodes what it
 * would decode alone.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kli.h"
#include "internal.h"
#include "prefix.h"
#include "tokenizer.h"
#include "util.h"

#define SCHED_MAX_PARALLEL 256
#define SCHED_MAX_STOP 16
#define SCHED_RECENT 8           /* requests that ran, kept for finding shared prefixes */
#define SCHED_PREFILL 256        /* batch_max of the prefill session: kli's default */

struct sched_req {
    uint64_t id;
    void *user;
    kli_token *toks;
    int32_t n;
    struct kli_sampler_options so;
    int32_t max_tokens;
    const struct kli_grammar *grammar;
    int32_t logprobs;             /* kli_sampler_set_logprobs's n_top, -1: none */
    kli_token *bias_ids;          /* the copies so.bias_ids and so.bias point at */
    float *bias;
    char *stop[SCHED_MAX_STOP];
    int32_t n_stop;
    char *fail;
    int cancelled;
};

struct sched_place {
    struct kli_session *s;        /* batch_max = parallel */
    struct kli_sampler *smp;      /* the request's, while it runs */
    struct sched_req *rq;         /* NULL: the place is free */
    kli_token next;               /* the token to feed at the next step */
    int32_t n_gen, cached;
    char *text;                   /* generated text so far */
    size_t n_text, cap_text;
    double prefill_s, t_decode;
};

struct kli_sched {
    struct kli_sched_options o;
    const struct kli_model *m;
    const struct kli_tokenizer *tok;
    struct kli_session *pre;      /* the prefill session */
    struct prefix_cache *cache;   /* NULL: no prefix reuse */
    struct sched_req **wait;      /* waiting requests, in submission order */
    int32_t n_wait, cap_wait;
    kli_token *recent[SCHED_RECENT];
    int32_t n_recent[SCHED_RECENT];
    int at_recent;
    kli_token ends[TOKENIZER_N_ENDS];
    int32_t n_base;
    uint64_t next_id;
    int64_t steps, step_tokens;
    double step_s;
    int in_step;                  /* kli_sched_step is running: its callbacks may not step */
    int freeing;                  /* kli_sched_free is running: nothing may be submitted */
    struct sched_place pl[];      /* [o.parallel], allocated with the scheduler */
};

static int
sched_stopped(const struct kli_sched *s)
{
    return s->o.should_stop != NULL && s->o.should_stop(s->o.ud) != 0;
}

static void
sched_req_free(struct sched_req *r)
{
    if (r == NULL)
        return;
    free(r->toks);
    for (int32_t i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    free(r->fail);
    free(r->bias_ids);
    free(r->bias);
    free(r);
}

/* ==== results ============================================================================== */

/* Reports the end of request r (from place p, NULL for one that never ran) and frees it. */
static void
sched_end(struct kli_sched *s, struct sched_req *r, const struct sched_place *p,
          enum kli_finish finish, int status, const char *error)
{
    struct kli_sched_result res;

    memset(&res, 0, sizeof(res));
    res.id = r->id;
    res.user = r->user;
    res.finish = finish;
    res.status = status;
    res.error = error;
    res.text = "";
    res.n_prompt = r->n;
    if (p != NULL) {
        res.text = p->text != NULL ? p->text : "";
        res.len = p->n_text;
        res.started = 1;
        res.n_cached = p->cached;
        res.n_generated = p->n_gen;
        res.prefill_seconds = p->prefill_s;
        res.decode_seconds = util_now_s() - p->t_decode;
    }
    if (s->o.on_finish != NULL)
        s->o.on_finish(s->o.ud, &res);
    sched_req_free(r);
}

/* Ends the request of place p and frees the place. */
static void
sched_finish(struct kli_sched *s, struct sched_place *p, enum kli_finish finish, int status,
             const char *error)
{
    struct sched_req *r = p->rq;

    /* keep_finished: the conversation so far, for its next turn */
    if (s->cache != NULL && s->o.keep_finished && status == KLI_OK &&
        (finish == KLI_FINISH_EOS || finish == KLI_FINISH_STOP ||
         finish == KLI_FINISH_LENGTH) && kli_session_pos(p->s) >= s->o.min_prefix) {
        struct kli_err perr = {0};
        if (prefix_cache_put(s->cache, p->s, &perr) != KLI_OK && s->o.on_notice != NULL)
            s->o.on_notice(s->o.ud, perr.msg);
    }
    p->rq = NULL;
    sched_end(s, r, p, finish, status, error);
    kli_sampler_free(p->smp);
    p->smp = NULL;
}

/* Takes the token sampled for place p: an end token or a stop string finishes the request,
 * so do max_tokens and a full context; otherwise the token is fed at the next step. */
static void
sched_take(struct kli_sched *s, struct sched_place *p, kli_token t, const float *logits)
{
    struct sched_req *r = p->rq;
    size_t old = p->n_text, len = 0;
    const char *bytes = NULL;

    for (int i = 0; i < TOKENIZER_N_ENDS; i++) {
        if (s->ends[i] >= 0 && t == s->ends[i]) {
            if (kli_sampler_grammar_status(p->smp) < 0)
                sched_finish(s, p, KLI_FINISH_ERROR, KLI_E_INVALID, "no token could continue "
                             "the JSON value (the grammar is stuck)");
            else
                sched_finish(s, p, KLI_FINISH_EOS, KLI_OK, NULL);
            return;
        }
    }
    kli_sampler_accept(p->smp, t);
    p->n_gen++;
    if (t < s->n_base)   /* other special tokens produce no text */
        bytes = kli_token_bytes(s->tok, t, &len);
    if (s->o.on_token != NULL) {
        struct kli_sched_token ev = {r->id, r->user, t, bytes != NULL ? bytes : "",
                                     bytes != NULL ? len : 0, p->n_gen, logits,
                                     kli_sampler_logprobs(p->smp)};
        s->o.on_token(s->o.ud, &ev);
    }
    if (bytes != NULL && util_text_add(&p->text, &p->n_text, &p->cap_text, bytes, len) != 0) {
        sched_finish(s, p, KLI_FINISH_ERROR, KLI_E_NOMEM, "out of memory");
        return;
    }
    for (int32_t i = 0; i < r->n_stop; i++) {
        size_t sl = strlen(r->stop[i]);
        size_t from = old >= sl - 1 ? old - (sl - 1) : 0;
        const char *hit = util_find(p->text + from, p->n_text - from, r->stop[i]);
        if (hit != NULL) {
            p->n_text = (size_t)(hit - p->text);
            p->text[p->n_text] = '\0';
            sched_finish(s, p, KLI_FINISH_STOP, KLI_OK, NULL);
            return;
        }
    }
    if (kli_sampler_grammar_status(p->smp) == 1) {   /* the JSON value is whole */
        sched_finish(s, p, KLI_FINISH_EOS, KLI_OK, NULL);
        return;
    }
    if (p->n_gen >= r->max_tokens || kli_session_pos(p->s) >= kli_session_ctx_max(p->s)) {
        sched_finish(s, p, KLI_FINISH_LENGTH, KLI_OK, NULL);
        return;
    }
    p->next = t;
}

/* ==== admission ============================================================================ */

static int32_t
sched_lcp(const kli_token *x, int32_t nx, const kli_token *y, int32_t ny)
{
    int32_t n = nx < ny ? nx : ny, i = 0;

    while (i < n && x[i] == y[i])
        i++;
    return i;
}

/* The longest prefix r shares with a waiting request or one that ran lately, or 0 when it is
 * shorter than min_prefix. */
static int32_t
sched_shared(const struct kli_sched *s, const struct sched_req *r)
{
    int32_t best = 0;

    for (int32_t i = 0; i < s->n_wait; i++) {
        const struct sched_req *o = s->wait[i];
        int32_t l = sched_lcp(r->toks, r->n, o->toks, o->n);
        best = l > best ? l : best;
    }
    for (int i = 0; i < SCHED_RECENT; i++) {
        int32_t l = sched_lcp(r->toks, r->n, s->recent[i], s->n_recent[i]);
        best = l > best ? l : best;
    }
    return best >= s->o.min_prefix ? best : 0;
}

static void
sched_remember(struct kli_sched *s, const struct sched_req *r)
{
    kli_token *c = malloc((size_t)r->n * sizeof(kli_token) + 1);

    if (c == NULL)
        return;
    memcpy(c, r->toks, (size_t)r->n * sizeof(kli_token));
    free(s->recent[s->at_recent]);
    s->recent[s->at_recent] = c;
    s->n_recent[s->at_recent] = r->n;
    s->at_recent = (s->at_recent + 1) % SCHED_RECENT;
}

/* Evaluates n tokens in the prefill session, in pieces so that should_stop is heard.
 * @return KLI_OK, KLI_E_INTERRUPTED, or a negative status with a message in err. */
static int
sched_prefill(struct kli_sched *s, const kli_token *t, int32_t n, struct kli_err *err)
{
    for (int32_t i = 0; i < n; i += SCHED_PREFILL) {
        int rc;
        if (sched_stopped(s))
            return KLI_E_INTERRUPTED;
        if ((rc = kli_session_eval(s->pre, t + i, n - i < SCHED_PREFILL ? n - i : SCHED_PREFILL,
                                   NULL, err)) != KLI_OK)
            return rc;
    }
    return KLI_OK;
}

/* The next waiting request, or NULL. */
static struct sched_req *
sched_pop(struct kli_sched *s)
{
    if (s->o.on_need != NULL)
        s->o.on_need(s->o.ud, s);
    if (s->n_wait == 0 || sched_stopped(s))
        return NULL;
    struct sched_req *r = s->wait[0];
    memmove(s->wait, s->wait + 1, (size_t)(--s->n_wait) * sizeof(*s->wait));
    return r;
}

/* Starts request r in free place p: the prompt after the longest kept prefix is evaluated
 * in the prefill session, whose state then moves to the place, and the first token is
 * sampled. A request that cannot run ends with its error. *evaluated receives the number
 * of prompt tokens evaluated. @return 1 when stopped (r ends as INTERRUPT), else 0. */
static int
sched_join(struct kli_sched *s, struct sched_place *p, struct sched_req *r, int32_t *evaluated)
{
    struct kli_err err = {0};
    const struct kli_session *hit = NULL;
    double t0 = util_now_s();
    int32_t have = 0, shared = 0, ctx = kli_session_ctx_max(p->s);
    int rc;

    if (r->fail != NULL) {
        sched_end(s, r, NULL, KLI_FINISH_ERROR, KLI_E_FORMAT, r->fail);
        return 0;
    }
    if (r->n == 0) {   /* no logits to sample the first token from */
        sched_end(s, r, NULL, KLI_FINISH_ERROR, KLI_E_INVALID, "an empty prompt");
        return 0;
    }
    if (r->n > ctx) {
        err_set(&err, KLI_E_RANGE, "the prompt of %d tokens does not fit the context of %d "
                    "tokens (--ctx)", (int)r->n, (int)ctx);
        sched_end(s, r, NULL, KLI_FINISH_ERROR, err.code, err.msg);
        return 0;
    }
    if ((rc = kli_sampler_create(&p->smp, &r->so, kli_model_n_vocab(s->m), &err)) != KLI_OK ||
        (r->grammar != NULL && r->max_tokens > 0 &&
         (rc = kli_sampler_set_grammar(p->smp, r->grammar, r->max_tokens, &err)) != KLI_OK) ||
        (rc = kli_sampler_set_logprobs(p->smp, r->logprobs, &err)) != KLI_OK) {
        kli_sampler_free(p->smp);
        p->smp = NULL;
        sched_end(s, r, NULL, KLI_FINISH_ERROR, rc, err.msg);
        return 0;
    }
    p->rq = r;
    p->n_gen = 0;
    p->n_text = 0;
    if (p->text != NULL)
        p->text[0] = '\0';
    if (s->cache != NULL) {
        hit = prefix_cache_find(s->cache, r->toks, r->n, &have);
        shared = sched_shared(s, r);
    }
    if (hit != NULL) {
        rc = kli_session_copy(s->pre, hit, &err);
    } else {
        kli_session_reset(s->pre);
        rc = KLI_OK;
    }
    int32_t at = have;
    if (rc == KLI_OK && shared > have) {
        /* Leave the state at the end of the shared prefix behind for the others. */
        if ((rc = sched_prefill(s, r->toks + at, shared - at, &err)) == KLI_OK) {
            at = shared;
            struct kli_err perr = {0};
            if (prefix_cache_put(s->cache, s->pre, &perr) != KLI_OK && s->o.on_notice != NULL)
                s->o.on_notice(s->o.ud, perr.msg);
        }
    }
    if (rc == KLI_OK)
        rc = sched_prefill(s, r->toks + at, r->n - at, &err);
    if (rc == KLI_OK && s->cache != NULL && s->o.keep_finished &&
        r->n - have >= s->o.min_prefix) {
        /* The prompt's end too: a next turn repeats this prompt, but the answer's text may
         * not tokenize again into the tokens generated, and then only this state fits. */
        struct kli_err perr = {0};
        if (prefix_cache_put(s->cache, s->pre, &perr) != KLI_OK && s->o.on_notice != NULL)
            s->o.on_notice(s->o.ud, perr.msg);
    }
    if (rc == KLI_OK)
        rc = kli_session_copy(p->s, s->pre, &err);
    if (rc == KLI_E_INTERRUPTED) {
        p->rq = NULL;
        kli_sampler_free(p->smp);
        p->smp = NULL;
        sched_end(s, r, NULL, KLI_FINISH_INTERRUPT, KLI_E_INTERRUPTED, NULL);
        return 1;
    }
    *evaluated = r->n - have;
    p->cached = have;
    p->prefill_s = util_now_s() - t0;
    p->t_decode = util_now_s();
    if (rc != KLI_OK) {
        p->cached = 0;
        sched_finish(s, p, KLI_FINISH_ERROR, rc, err.msg);
        return 0;
    }
    sched_remember(s, r);
    if (r->max_tokens == 0) {
        sched_finish(s, p, KLI_FINISH_LENGTH, KLI_OK, NULL);
        return 0;
    }
    const float *lg = kli_session_logits(p->s);
    sched_take(s, p, kli_sampler_sample(p->smp, lg), lg);
    return 0;
}

static int
sched_running(const struct kli_sched *s)
{
    int n = 0;

    for (int32_t i = 0; i < s->o.parallel; i++)
        n += s->pl[i].rq != NULL;
    return n;
}

/* Fills free places. A round ends early once the requests it started have evaluated
 * join_tokens prompt tokens while some request is ready to decode: long prompts then join
 * one or two per step, rather than stalling the running requests until all places are full.
 * @return the number running, or -1 when should_stop said stop. */
static int
sched_fill(struct kli_sched *s)
{
    int64_t spent = 0;
    int active = 0;

    for (int32_t i = 0; i < s->o.parallel; i++) {
        if (sched_stopped(s))
            return -1;
        while (s->pl[i].rq == NULL && !sched_stopped(s) &&
               (spent < s->o.join_tokens || sched_running(s) == 0)) {
            struct sched_req *r = sched_pop(s);
            int32_t ev = 0;
            if (r == NULL)
                break;
            if (r->cancelled) {   /* cancelled by a callback of this step: never starts */
                sched_end(s, r, NULL, KLI_FINISH_INTERRUPT, KLI_OK, NULL);
                continue;
            }
            if (sched_join(s, &s->pl[i], r, &ev) != 0)
                break;
            spent += ev;
        }
        active += s->pl[i].rq != NULL;
    }
    return sched_stopped(s) ? -1 : active;
}

/* Ends the cancelled requests, waiting or running. */
static void
sched_sweep(struct kli_sched *s)
{
    for (int32_t i = 0; i < s->o.parallel; i++) {
        if (s->pl[i].rq != NULL && s->pl[i].rq->cancelled)
            sched_finish(s, &s->pl[i], KLI_FINISH_INTERRUPT, KLI_OK, NULL);
    }
    /* Each request leaves the list before its on_finish, which may submit or cancel (and
     * so read the list). */
    for (int32_t i = 0; i < s->n_wait;) {
        struct sched_req *r = s->wait[i];
        if (!r->cancelled) {
            i++;
            continue;
        }
        memmove(s->wait + i, s->wait + i + 1, (size_t)(--s->n_wait - i) * sizeof(*s->wait));
        sched_end(s, r, NULL, KLI_FINISH_INTERRUPT, KLI_OK, NULL);
    }
}

/* One decode step of every running request. @return how many. */
static int
sched_decode(struct kli_sched *s)
{
    struct kli_session *ss[SCHED_MAX_PARALLEL];
    kli_token tk[SCHED_MAX_PARALLEL];
    struct kli_sampler *smp[SCHED_MAX_PARALLEL];
    const float *lg[SCHED_MAX_PARALLEL];
    int idx[SCHED_MAX_PARALLEL], n = 0, rc;
    struct kli_err err = {0};
    double t0 = util_now_s();

    for (int32_t i = 0; i < s->o.parallel; i++) {
        /* cancelled by a callback of this step (on_token of its first token): no more */
        if (s->pl[i].rq != NULL && s->pl[i].rq->cancelled)
            sched_finish(s, &s->pl[i], KLI_FINISH_INTERRUPT, KLI_OK, NULL);
        if (s->pl[i].rq != NULL) {
            ss[n] = s->pl[i].s;
            tk[n] = s->pl[i].next;
            idx[n++] = (int)i;
        }
    }
    if (n == 0)
        return 0;
    if ((rc = kli_session_eval_batch(ss, tk, n, &err)) == KLI_OK) {
        /* every sequence's sampler at once, on the workers the step itself used */
        for (int j = 0; j < n; j++) {
            smp[j] = s->pl[idx[j]].smp;
            lg[j] = kli_session_logits(s->pl[idx[j]].s);
        }
        rc = kli_sampler_sample_many(smp, lg, n, tk, &err);
    }
    if (rc != KLI_OK) {
        for (int j = 0; j < n; j++)
            sched_finish(s, &s->pl[idx[j]], KLI_FINISH_ERROR, rc, err.msg);
        return n;
    }
    for (int j = 0; j < n; j++) {
        struct sched_place *p = &s->pl[idx[j]];
        if (p->rq->cancelled)   /* by a callback of an earlier row: no more tokens */
            sched_finish(s, p, KLI_FINISH_INTERRUPT, KLI_OK, NULL);
        else
            sched_take(s, p, tk[j], lg[j]);
    }
    s->step_s += util_now_s() - t0;
    s->step_tokens += n;
    s->steps++;
    return n;
}

/* ==== the interface ======================================================================== */

void
kli_sched_options_init(struct kli_sched_options *o)
{
    *o = (struct kli_sched_options){.size = sizeof(*o), .parallel = 8, .join_tokens = 512,
                                    .min_prefix = 64, .prefix_bytes = 1ULL << 30};
}

void
kli_sched_request_init(struct kli_sched_request *r)
{
    *r = (struct kli_sched_request){.size = sizeof(*r), .max_tokens = 256, .logprobs = -1};
    kli_sampler_options_init(&r->so);
}

int
kli_sched_create(struct kli_sched **out, const struct kli_model *m,
                 const struct kli_sched_options *o, struct kli_err *err)
{
    struct kli_sched *s = NULL;
    struct kli_sched_options opt;
    struct kli_session_options so;
    int rc;

    if (out == NULL || m == NULL || o == NULL)
        return err_set(err, KLI_E_INVALID, "kli_sched_create: NULL argument");
    *out = NULL;
    if ((o = OPTS_TAKE(kli_sched_options_init, opt, o, "kli_sched_create", err)) == NULL)
        return KLI_E_INVALID;
    if (o->parallel < 1 || o->parallel > SCHED_MAX_PARALLEL || o->ctx_max < 0 ||
        o->join_tokens < 0 || o->min_prefix < 1)
        return err_set(err, KLI_E_RANGE, "scheduler: parallel must be 1..%d, ctx_max and "
                           "join_tokens at least 0, min_prefix at least 1", SCHED_MAX_PARALLEL);
    if ((s = calloc(1, sizeof(*s) + (size_t)o->parallel * sizeof(s->pl[0]))) == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    s->o = *o;
    s->m = m;
    s->next_id = 1;
    if ((s->tok = kli_model_tokenizer(m)) == NULL) {
        rc = err_set(err, KLI_E_INVALID, "scheduler: the model has no tokenizer");
        goto fail;
    }
    tokenizer_end_tokens(s->tok, kli_model_eos(m), s->ends);
    s->n_base = kli_tokenizer_n_base(s->tok);
    kli_session_options_init(&so);
    so.ctx_max = o->ctx_max;
    so.batch_max = SCHED_PREFILL;
    so.cache_type = o->cache_type;
    if ((rc = kli_session_create(&s->pre, m, &so, err)) != KLI_OK)
        goto fail;
    so.batch_max = o->parallel;
    for (int32_t i = 0; i < o->parallel; i++) {
        if ((rc = kli_session_create(&s->pl[i].s, m, &so, err)) != KLI_OK)
            goto fail;
    }
    if ((o->prefix_bytes > 0 || o->prefix_dir != NULL) &&
        (rc = prefix_cache_create(&s->cache, m, o->prefix_bytes, o->prefix_dir, o->prefix_key,
                                  o->cache_type, err)) != KLI_OK)
        goto fail;
    *out = s;
    return KLI_OK;
fail:
    kli_sched_free(s);
    return rc;
}

void
kli_sched_free(struct kli_sched *s)
{
    if (s == NULL)
        return;
    s->in_step = 1;   /* the on_finish calls below may not step a half-freed scheduler, */
    s->freeing = 1;   /* nor submit (a resubmit on every end would never let it finish) */
    for (int32_t i = 0; i < s->o.parallel; i++) {
        if (s->pl[i].rq != NULL)
            sched_finish(s, &s->pl[i], KLI_FINISH_INTERRUPT, KLI_OK, NULL);
        kli_session_free(s->pl[i].s);
        free(s->pl[i].text);
    }
    /* Each leaves the list before its on_finish (which may submit or cancel). */
    while (s->n_wait > 0) {
        struct sched_req *r = s->wait[0];
        memmove(s->wait, s->wait + 1, (size_t)(--s->n_wait) * sizeof(*s->wait));
        sched_end(s, r, NULL, KLI_FINISH_INTERRUPT, KLI_OK, NULL);
    }
    for (int i = 0; i < SCHED_RECENT; i++)
        free(s->recent[i]);
    free(s->wait);
    prefix_cache_free(s->cache);
    kli_session_free(s->pre);
    free(s);
}

int
kli_sched_submit(struct kli_sched *s, const struct kli_sched_request *r, uint64_t *id,
                 struct kli_err *err)
{
    struct sched_req *q;
    struct kli_sched_request req;

    kli_sched_request_init(&req);
    if (opts_take(&req, sizeof(req), r, "kli_sched_submit", err) != KLI_OK)
        return KLI_E_INVALID;
    if (r != NULL)
        r = &req;
    if (s == NULL || r == NULL || (r->prompt == NULL && r->n_prompt > 0) || r->n_prompt < 0 ||
        r->max_tokens < 0 || r->n_stop < 0 || r->n_stop > SCHED_MAX_STOP ||
        (r->stop == NULL && r->n_stop > 0))
        return err_set(err, KLI_E_INVALID, "kli_sched_submit: a NULL or negative "
                           "argument, or more than %d stop strings", SCHED_MAX_STOP);
    if (s->freeing)
        return err_set(err, KLI_E_INVALID, "kli_sched_submit: the scheduler is being freed");
    for (int32_t i = 0; i < r->n_stop; i++) {
        if (r->stop[i] == NULL || r->stop[i][0] == '\0')
            return err_set(err, KLI_E_INVALID, "kli_sched_submit: a NULL or empty stop "
                               "string");
    }
    struct sched_req **w = k_grow(s->wait, s->n_wait, &s->cap_wait, 16, sizeof(*w));
    if (w == NULL)
        return err_set(err, KLI_E_NOMEM, "out of memory");
    s->wait = w;
    if ((q = calloc(1, sizeof(*q))) == NULL ||
        (q->toks = malloc((size_t)r->n_prompt * sizeof(kli_token) + 1)) == NULL ||
        (r->fail != NULL && (q->fail = strdup(r->fail)) == NULL))
        goto nomem;
    if (r->n_prompt > 0)
        memcpy(q->toks, r->prompt, (size_t)r->n_prompt * sizeof(kli_token));
    q->n = r->n_prompt;
    for (; q->n_stop < r->n_stop; q->n_stop++) {
        if ((q->stop[q->n_stop] = strdup(r->stop[q->n_stop])) == NULL)
            goto nomem;
    }
    q->so = r->so;
    if (r->so.n_bias > 0 && r->so.n_bias <= 1024 && r->so.bias_ids != NULL &&
        r->so.bias != NULL) {   /* kli_sampler_create checks them when the request joins */
        q->bias_ids = k_mallocarray((size_t)r->so.n_bias, sizeof(kli_token));
        q->bias = k_mallocarray((size_t)r->so.n_bias, sizeof(float));
        if (q->bias_ids == NULL || q->bias == NULL)
            goto nomem;
        memcpy(q->bias_ids, r->so.bias_ids, (size_t)r->so.n_bias * sizeof(kli_token));
        memcpy(q->bias, r->so.bias, (size_t)r->so.n_bias * sizeof(float));
    }
    q->so.bias_ids = q->bias_ids;
    q->so.bias = q->bias;
    q->max_tokens = r->max_tokens;
    q->grammar = r->grammar;
    q->logprobs = r->logprobs;
    q->user = r->user;
    q->id = s->next_id++;
    s->wait[s->n_wait++] = q;
    if (id != NULL)
        *id = q->id;
    return KLI_OK;
nomem:
    sched_req_free(q);
    return err_set(err, KLI_E_NOMEM, "out of memory");
}

int
kli_sched_cancel(struct kli_sched *s, uint64_t id)
{
    if (s == NULL)
        return KLI_E_INVALID;
    for (int32_t i = 0; i < s->o.parallel; i++) {
        if (s->pl[i].rq != NULL && s->pl[i].rq->id == id) {
            s->pl[i].rq->cancelled = 1;
            return KLI_OK;
        }
    }
    for (int32_t i = 0; i < s->n_wait; i++) {
        if (s->wait[i]->id == id) {
            s->wait[i]->cancelled = 1;
            return KLI_OK;
        }
    }
    return KLI_E_RANGE;
}

int
kli_sched_step(struct kli_sched *s)
{
    int n = 0;

    if (s == NULL || s->in_step)   /* from one of its own callbacks */
        return KLI_E_INVALID;
    s->in_step = 1;
    sched_sweep(s);
    if (sched_fill(s) > 0)
        n = sched_decode(s);
    s->in_step = 0;
    return n;
}

int32_t
kli_sched_waiting(const struct kli_sched *s)
{
    return s != NULL ? s->n_wait : 0;
}

void
kli_sched_stats(const struct kli_sched *s, struct kli_sched_stats *st)
{
    memset(st, 0, sizeof(*st));
    if (s == NULL)
        return;
    st->waiting = s->n_wait;
    st->running = sched_running(s);
    st->steps = s->steps;
    st->step_tokens = s->step_tokens;
    st->step_seconds = s->step_s;
    if (s->cache != NULL)
        prefix_cache_stats(s->cache, &st->prefix);
}
