/*
 * reuse.c - what callers need to reuse evaluated state between sessions cheaply: copying one
 * session's state into another that already exists (kli_session_copy), the memory a session
 * holds (kli_session_nbytes, for caches bounded in bytes), and the model identity that keys
 * saved states (kli_model_fingerprint).
 *
 * kli_session_fork makes a new session with the options of its source; kli_session_copy
 * keeps the destination's options instead. That is what a batch scheduler wants: a prompt is
 * prefilled in a session with a large batch_max (prefill runs as matrix products over up to
 * batch_max rows), and its state then moves into a small decode session, or into a cache
 * entry created with batch_max 1, without a second large scratch arena per sequence.
 */
#include "config.h"

#include <string.h>

#include "backend.h"
#include "internal.h"
#include "session.h"

uint64_t
kli_model_fingerprint(const struct kli_model *m)
{
    return m->fingerprint;
}

int
kli_session_copy(struct kli_session *dst, const struct kli_session *src, struct kli_err *err)
{
    int rc;

    if (dst == NULL || src == NULL || dst == src)
        return err_set(err, KLI_E_INVALID, "kli_session_copy: NULL or identical sessions");
    if (dst->m != src->m)
        return err_set(err, KLI_E_INVALID, "kli_session_copy: sessions of two models");
    if (dst->cache_type != src->cache_type)
        return err_set(err, KLI_E_INVALID, "kli_session_copy: a %s cache into a %s one",
                           kli_cache_type_name(src->cache_type),
                           kli_cache_type_name(dst->cache_type));
    if (src->pos > dst->ctx_max)
        return err_set(err, KLI_E_RANGE, "kli_session_copy: %d tokens exceed the "
                           "destination's ctx_max %d", src->pos, dst->ctx_max);
    /* Grow first: on failure dst is untouched. */
    if ((rc = session_reserve(dst, src->pos > 0 ? src->pos : 1, err)) != KLI_OK)
        return rc;
    if ((rc = backend_sess_pull((struct kli_session *)src, err)) != KLI_OK)
        return rc;
    backend_sess_written(dst);

    /* every piece of state, from the one table (session.h): the two tables list the same
     * buffers in the same order, as the sessions are of one model */
    KLI_ASSERT(dst->n_state == src->n_state);
    for (int k = 0; k < src->n_state; k++) {
        int64_t words = session_state_words(&src->buf[k], src->pos);
        if (words > 0)
            memcpy(session_buf_ptr(&dst->buf[k]), session_buf_ptr(&src->buf[k]),
                   (size_t)words * 4);
    }
    dst->has_logits = src->has_logits;
    dst->pos = src->pos;
    dst->broken = src->broken;
    return KLI_OK;
}

uint64_t
kli_session_nbytes(const struct kli_session *s)
{
    const struct k_config *cfg = &s->m->cfg;
    uint64_t words = 0;

    /* every buffer the session holds is in its table (session.h), with its size as
     * allocated; moe.c's grouped-path rows are the one buffer grown elsewhere */
    for (int k = 0; k < s->n_buf; k++)
        words += (uint64_t)s->buf[k].words;
    words += (uint64_t)s->moe_sc.gcap;
    return words * 4 + (uint64_t)s->n_buf * sizeof(*s->buf) +
           (uint64_t)cfg->n_layers * (sizeof(*s->kda) + sizeof(*s->cache)) + sizeof(*s);
}

int32_t
kli_session_ctx_max(const struct kli_session *s)
{
    return s->ctx_max;
}
