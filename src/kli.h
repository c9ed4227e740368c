/*
 * kli.h - the public interface of libkli, a CPU-first inference runtime for Kimi Linear.
 *
 * A minimal program:
 *
 *     #include <kli.h>
 *
 *     struct kli_err err = {0};
 *     struct kli_model *model = NULL;
 *     struct kli_session *s = NULL;
 *     kli_token ids[] = {1, 2, 3};
 *
 *     if (kli_model_open(&model, "Kimi-Linear-48B-A3B-Instruct", NULL, &err) != KLI_OK ||
 *         kli_session_create(&s, model, NULL, &err) != KLI_OK ||
 *         kli_session_eval(s, ids, 3, NULL, &err) != KLI_OK) {
 *         fprintf(stderr, "kli: %s\n", err.msg);
 *         goto out;
 *     }
 *     const float *logits = kli_session_logits(s);      // [kli_model_n_vocab(model)]
 *     ...
 * out:
 *     kli_session_free(s);
 *     kli_model_close(model);
 *
 * Rules that hold for every function below:
 *
 *  - Errors. Functions that can fail return KLI_OK (0) or a negative enum kli_status and, when
 *    `err` is not NULL, write a one-line message into it. The first error wins: a message set
 *    deep inside the library is not overwritten on the way out. The library never exits,
 *    aborts or prints on bad input.
 *  - Ownership. Objects returned through `**out` are owned by the caller and released with the
 *    matching _close/_free, each of which accepts NULL. Pointers returned by getters are
 *    borrowed and live as long as the object they came from.
 *  - Threads. A kli_model is immutable once open and may be shared by any number of sessions
 *    and threads. A kli_session (and a kli_sampler) is used by one thread at a time.
 */
#ifndef KLI_H
#define KLI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KLI_VERSION_MAJOR 0
#define KLI_VERSION_MINOR 1
#define KLI_VERSION_PATCH 0
#define KLI_VERSION_STRING "0.1.0"

typedef int32_t kli_token;

/* Status codes. Pinned: never renumbered. */
enum kli_status {
    KLI_OK = 0,
    KLI_E_NOMEM = -1,        /* an allocation failed */
    KLI_E_IO = -2,           /* a file could not be opened, read, mapped or written */
    KLI_E_FORMAT = -3,       /* a file or input is malformed */
    KLI_E_UNSUPPORTED = -4,  /* well-formed, but a feature kli does not implement */
    KLI_E_RANGE = -5,        /* a value outside its allowed range (token id, size, option) */
    KLI_E_CUDA = -6,         /* the CUDA backend failed */
    KLI_E_INVALID = -7,      /* a call that breaks the API contract (NULL where not allowed) */
    KLI_E_INTERRUPTED = -8   /* stopped on request (a callback returned non-zero) */
};

/* The error out-parameter. A fixed buffer, so reporting works when memory is exhausted. */
struct kli_err {
    int code;        /* 0 or an enum kli_status */
    char msg[256];   /* NUL-terminated message; empty when code is 0 */
};

/* @return a static description of a status code; never NULL. */
const char *kli_strerror(int code);

/* @return the library version as "MAJOR.MINOR.PATCH"; static. */
const char *kli_version(void);

/* @return the name of the CPU kernel variant in use ("generic", "avx2", "avx512", "neon").
 * The choice is made once per process, honouring the KLI_SIMD environment variable. */
const char *kli_simd_variant(void);

/* ==== Model ================================================================================ */

struct kli_model;

struct kli_model_options {
    int n_threads;   /* worker threads for this process; 0 = one per physical core (default) */
};

/* Fills `opt` with the defaults. */
void kli_model_options_init(struct kli_model_options *opt);

/* Opens a model: a directory holding config.json and model.safetensors (or a sharded
 * model.safetensors.index.json with its shards), the Hugging Face layout. The weights are
 * memory-mapped, not copied. Every tensor is checked against config.json.
 * @param opt  NULL for the defaults.
 * @return KLI_OK, or KLI_E_IO / KLI_E_FORMAT / KLI_E_UNSUPPORTED / KLI_E_NOMEM with a message
 *         that names the file or tensor at fault. On failure *out is NULL. */
int kli_model_open(struct kli_model **out, const char *path,
                   const struct kli_model_options *opt, struct kli_err *err);

/* Releases the model. Every session made from it must be freed first. NULL is allowed. */
void kli_model_close(struct kli_model *model);

int32_t kli_model_n_vocab(const struct kli_model *model);
int32_t kli_model_n_layers(const struct kli_model *model);
int32_t kli_model_d_model(const struct kli_model *model);
/* @return the token ids from config.json, or -1 when absent. */
kli_token kli_model_bos(const struct kli_model *model);
kli_token kli_model_eos(const struct kli_model *model);

struct kli_tokenizer;
/* @return the model's tokenizer (borrowed), or NULL when its directory has none. */
const struct kli_tokenizer *kli_model_tokenizer(const struct kli_model *model);

/* Writes a human-readable architecture summary (layer kinds, dimensions, parameter count,
 * bytes by dtype, state sizes) into `buf`, NUL-terminated and truncated to `cap`.
 * With `tensors` non-zero, the tensor list follows.
 * @return the length the full text needs (excluding the NUL), like snprintf. */
size_t kli_model_describe(const struct kli_model *model, int tensors, char *buf, size_t cap);

/* ==== Session: per-sequence state ========================================================== */

struct kli_session;

struct kli_session_options {
    int32_t ctx_max;     /* tokens the session may hold; 0 = the model's maximum */
    int32_t batch_max;   /* tokens computed together in one step of an eval; 0 = 256 */
};

void kli_session_options_init(struct kli_session_options *opt);

/* Creates an empty session (no tokens seen) for `model`.
 * @param opt  NULL for the defaults.
 * @return KLI_OK or KLI_E_NOMEM / KLI_E_RANGE. */
int kli_session_create(struct kli_session **out, const struct kli_model *model,
                       const struct kli_session_options *opt, struct kli_err *err);

/* Releases the session. NULL is allowed. */
void kli_session_free(struct kli_session *s);

/* Forgets every token: the session is as new. */
void kli_session_reset(struct kli_session *s);

/* Runs `n` tokens through the model after those already seen. Feeding a prompt in one call,
 * in pieces, or one token at a time gives the same result (up to float rounding).
 * @param logits  NULL, or room for [n][n_vocab] floats that receives the logits of every
 *                position of this call.
 * @return KLI_OK; KLI_E_RANGE if a token id is outside the vocabulary or the session would
 *         exceed ctx_max (the session is then unchanged). */
int kli_session_eval(struct kli_session *s, const kli_token *tokens, int32_t n,
                     float *logits, struct kli_err *err);

/* @return the logits of the last evaluated position, [n_vocab]; NULL before any eval.
 *         Borrowed: valid until the next eval/reset/free of the session. */
const float *kli_session_logits(const struct kli_session *s);

/* @return the number of tokens the session has seen. */
int32_t kli_session_pos(const struct kli_session *s);

/* @return the model a session belongs to (borrowed). */
const struct kli_model *kli_session_model(const struct kli_session *s);

#ifdef __cplusplus
}
#endif

#endif /* KLI_H */
