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
 *  - ABI. libkli exports the functions marked KLI_API below and nothing else. Within one
 *    soname (libkli.so.N) this header grows by additions alone: new functions, new enum
 *    values, new members at the end of a struct kli_*_options; nothing is removed, renamed,
 *    reordered or given another meaning (a new behaviour is a new function, or an option
 *    whose default is the old one). Every options struct starts with `size`, which its
 *    _init sets to sizeof the struct as the program was compiled: fill options with their
 *    _init, always; the library reads the members `size` covers and gives later ones their
 *    defaults. Structs the library fills (kli_err, kli_*_stats, kli_generate_result) and
 *    arrays of kli_chat_message never grow: new results come through new functions.
 *    configure.ac holds the soname's version rules, man/kli.3 (ABI) the whole policy.
 */
#ifndef KLI_H
#define KLI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Marks what libkli exports: every function of this header, nothing else (the library is
 * built with -fvisibility=hidden; tests/test-exports.sh checks libkli.so and libkli.a). */
#if defined(__GNUC__) || defined(__clang__)
#define KLI_API __attribute__((visibility("default")))
#else
#define KLI_API
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
KLI_API const char *kli_strerror(int code);

/* @return the library version as "MAJOR.MINOR.PATCH"; static. */
KLI_API const char *kli_version(void);

/* @return the name of the CPU kernel variant in use ("generic", "avx2", "avx512", "avx512vnni",
 * "amx", "neon", "neondot").
 * The choice is made once per process, honouring the KLI_SIMD environment variable. */
KLI_API const char *kli_simd_variant(void);


/* ==== Tokenizer ============================================================================
 * Kimi's tiktoken BPE tokenizer. It reproduces tokenization_kimi.py's
 * TikTokenTokenizer.encode() byte for byte: the text is cut into 400,000-character pieces,
 * each piece where a run of whitespace or of non-whitespace characters would exceed 25,000,
 * and every resulting chunk is encoded on its own by tiktoken's algorithm (optional
 * special-token matching, the Kimi split pattern, then byte-pair merging by rank). No BOS or
 * EOS is ever added. A kli_tokenizer is immutable once open: any number of threads may use
 * it at once. */

struct kli_tokenizer;

/* Flags of kli_tokenize(). */
enum kli_tokenize_flags {
    /* Special-token strings in the text ("<|im_end|>", "[BOS]", and also the unnamed
     * "<|reserved_token_N|>" slots) become their ids, as tiktoken's allowed_special="all"
     * (tokenization_kimi.py's default). Without this flag they are ordinary text. */
    KLI_TOKENIZE_SPECIAL = 1
};

/* Opens the tokenizer of a model directory:
 *  - `dir`/tiktoken.model (required): one "<base64 bytes> <rank>" per line; the ranks must be
 *    0..n-1 with no gaps, no byte string may appear twice, and each of the 256 single bytes
 *    must have a rank. The number of ranks is n_base.
 *  - `dir`/tokenizer_config.json (optional): its "added_tokens_decoder" names special ids.
 * The special tokens take the ids n_base .. n_base+255; a slot without a name is called
 * "<|reserved_token_ID|>" with its absolute id. When added_tokens_decoder names id n_base+256
 * or n_base+257, there are 258 slots instead (the older tokenization_*.py variant). Without
 * tokenizer_config.json every slot is unnamed. `dir` may also be a .kli file (kli_convert),
 * whose tokenizer section holds the same two files.
 * @return KLI_OK; KLI_E_IO if a file cannot be read; KLI_E_FORMAT with the file and line at
 *         fault; KLI_E_NOMEM; KLI_E_INVALID for NULL arguments. On failure *out is NULL.
 *         On success the caller owns *out and releases it with kli_tokenizer_close(). */
KLI_API int kli_tokenizer_open(struct kli_tokenizer **out, const char *dir, struct kli_err *err);

/* Releases a tokenizer. NULL is allowed. */
KLI_API void kli_tokenizer_close(struct kli_tokenizer *t);

/* Encodes `len` bytes of UTF-8 text (not NUL-terminated; `text` may be NULL when len is 0).
 * @param flags  0 (special-token strings are plain text) or KLI_TOKENIZE_SPECIAL.
 * @param out    receives the first min(cap, result) token ids; may be NULL when cap is 0.
 * @return the number of tokens the whole text encodes to, which may exceed `cap`: then only
 *         `cap` ids were written, and the caller retries with a buffer of the returned size.
 *         Every token covers at least one byte of the text, so the result is at most `len`,
 *         and a buffer of len + 1 ids (len + 1 so that it is never empty) is always enough.
 *         Negative on error: KLI_E_FORMAT when the text is not valid UTF-8 (the message gives
 *         the byte offset), KLI_E_INVALID for bad arguments, KLI_E_NOMEM, KLI_E_RANGE when the
 *         regex engine hits its match limit. */
KLI_API int64_t kli_tokenize(const struct kli_tokenizer *t, const char *text, size_t len, int flags,
                             kli_token *out, int64_t cap, struct kli_err *err);

/* Decodes `n` token ids to the concatenation of their bytes (a special id gives its name).
 * The result is raw bytes: it is not NUL-terminated, and it may end inside a UTF-8 character
 * or contain invalid UTF-8 (see kli_utf8_complete_prefix() for streaming).
 * @param out  receives the first min(cap, result) bytes; may be NULL when cap is 0.
 * @return the number of bytes the whole decoding needs (retry with that much room when it
 *         exceeds `cap`); KLI_E_RANGE if an id is outside [0, n_vocab), naming its index;
 *         KLI_E_INVALID for bad arguments. */
KLI_API int64_t kli_detokenize(const struct kli_tokenizer *t, const kli_token *ids, int64_t n,
                               char *out, int64_t cap, struct kli_err *err);

/* @return the bytes of token `id` (a special token's name for special ids) and their count in
 *         *len (when len is not NULL); NULL (and *len 0) if id is outside [0, n_vocab).
 *         Borrowed: valid while the tokenizer is open. The bytes are followed by a NUL for
 *         convenience, but may themselves contain NUL (the token of byte 0x00). */
KLI_API const char *kli_token_bytes(const struct kli_tokenizer *t, kli_token id, size_t *len);

/* @return the number of token ids: n_base + the special slots (256 or 258). */
KLI_API int32_t kli_tokenizer_n_vocab(const struct kli_tokenizer *t);

/* @return the number of BPE ranks in tiktoken.model; the first special id. */
KLI_API int32_t kli_tokenizer_n_base(const struct kli_tokenizer *t);

/* @return the id of the special token called `name` (e.g. "<|im_end|>", or a reserved name
 *         such as "<|reserved_token_163600|>"), or -1 if no special slot has that name. */
KLI_API kli_token kli_tokenizer_find_special(const struct kli_tokenizer *t, const char *name);

/* For streaming decoded text without splitting a character between two writes.
 * @return the length of the longest prefix of s[0..n) that does not end inside an incomplete
 *         UTF-8 sequence: trailing bytes that start a sequence which more bytes could still
 *         complete (a lead byte followed by fewer continuation bytes than it announces) are
 *         left out, at most 3 of them. Bytes that can never become valid are kept, so that
 *         invalid input is passed on rather than held back forever. Never more than n. */
KLI_API size_t kli_utf8_complete_prefix(const char *s, size_t n);

/* ==== Model ================================================================================ */

struct kli_model;

struct kli_model_options {
    size_t size;     /* sizeof the struct, set by kli_model_options_init (ABI, above) */
    int n_threads;   /* worker threads for this process; 0 = one per physical core (default).
                        The count is process-wide: the last kli_model_open sets it, and a
                        session refuses to run with more threads than it was created for */
    const char *weight_type;   /* NULL: weights as stored. "q8_0", "q4", "bf16", "f16", "f32",
                                  "q2_k" .. "q6_k": convert the weight matrices at open (as
                                  kli_quantize would; the router and small parameters stay),
                                  held in memory */
    int gpu;         /* enum kli_gpu_mode: where the work runs (default KLI_GPU_AUTO) */
    uint64_t gpu_mem;          /* bytes of GPU memory kli may use; 0 = the free memory less
                                  1 GiB */
    int32_t gpu_experts;       /* routed experts per MoE layer kept on the GPU: -1 (default)
                                  as many as gpu_mem holds, 0 none (MLA attention only) */
    const char *gpu_profile;   /* NULL, or a routing trace (JSON lines {"layers": [[ids of
                                  MoE layer 0], ...]}) whose counts pick the first hot set */
    const char *cpus;          /* NULL: every CPU the process may use; else a list of OS CPU
                                  numbers ("0-7,16-23") the workers are pinned within */
    int numa;                  /* enum kli_numa: weight placement over NUMA nodes (default
                                  KLI_NUMA_NONE); see kli_topology_describe */
    int plan_only;             /* non-zero: work out the placement (kli_topology_describe
                                  shows it) but pin no thread and bind no memory */
    uint64_t mem_budget;       /* 0 (default): the weights are used from the mapping. Else
                                  edge mode: bytes of memory kli may use; the trunk stays
                                  mapped and the routed experts are read on demand into a
                                  bounded cache (the rest of the budget, less a reserve of
                                  32 MiB + 1/16 for sessions and the program). Results are
                                  identical; needs the experts stored in the type they run
                                  in (no weight_type conversion), no --numa partition, and
                                  keeps routed experts off the GPU. See kli_model_cache_stats */
};

/* Where the weights live on a machine with several NUMA nodes (kli_model_options.numa).
 * Workers are one per physical core in every case, pinned as kli_topology_describe says. */
enum kli_numa {
    KLI_NUMA_NONE = 0,         /* no binding: the kernel places pages where first read */
    KLI_NUMA_INTERLEAVE = 1,   /* pages of every weight spread over the nodes with workers */
    KLI_NUMA_REPLICATE = 2,    /* the trunk (attention, norms, router, shared experts, dense
                                  layers, lm_head) copied to each node, each worker reading
                                  its node's copy; the rest interleaved */
    KLI_NUMA_PARTITION = 3     /* each routed expert bound to one node, experts balanced by
                                  bytes, and computed by that node's workers; the rest
                                  interleaved */
};

/* GPU use of a model (a build with CUDA and a device with its driver). The GPU takes the MLA
 * layers (their weights, and attention over the latent cache, which it mirrors) and the
 * routed experts chosen most often (the hot set, re-chosen from the routing counts as kli
 * runs), together with the shared expert; the CPU computes the other experts at the same
 * time. When the whole model fits, the KDA layers (with the sessions' states) and lm_head
 * run there too. */
enum kli_gpu_mode {
    KLI_GPU_AUTO = 0,   /* use a GPU when one is present; else the CPU, and
                           kli_model_gpu_status says why */
    KLI_GPU_OFF = 1,    /* CPU only */
    KLI_GPU_ON = 2      /* require a GPU: kli_model_open fails (KLI_E_CUDA) without one */
};

/* Fills `opt` with the defaults. */
KLI_API void kli_model_options_init(struct kli_model_options *opt);

/* Opens a model: a directory holding config.json and model.safetensors (or a sharded
 * model.safetensors.index.json with its shards), the Hugging Face layout, or a .kli file
 * written by kli_convert (checked section by section; tensor bytes are not read, see
 * kli_model_verify). The weights are memory-mapped, not copied. Every tensor is checked
 * against config.json.
 * @param opt  NULL for the defaults.
 * @return KLI_OK, or KLI_E_IO / KLI_E_FORMAT / KLI_E_UNSUPPORTED / KLI_E_RANGE / KLI_E_NOMEM
 *         with a message that names the file, key or tensor at fault. On failure *out is
 *         NULL. */
KLI_API int kli_model_open(struct kli_model **out, const char *path,
                           const struct kli_model_options *opt, struct kli_err *err);

/* Releases the model. Every session made from it must be freed first. NULL is allowed. */
KLI_API void kli_model_close(struct kli_model *model);

/* @return one line on the model's GPU use: the device, its memory budget and what runs on
 *         it, or "CPU only: " and the reason (no GPU, no driver, not enough memory, a build
 *         without CUDA, GPU use off). Borrowed, valid until kli_model_close. */
KLI_API const char *kli_model_gpu_status(const struct kli_model *model);

KLI_API int32_t kli_model_n_vocab(const struct kli_model *model);
KLI_API int32_t kli_model_n_layers(const struct kli_model *model);
KLI_API int32_t kli_model_d_model(const struct kli_model *model);
/* @return the token ids from config.json, or -1 when absent. */
KLI_API kli_token kli_model_bos(const struct kli_model *model);
KLI_API kli_token kli_model_eos(const struct kli_model *model);

/* @return the model's tokenizer (borrowed), or NULL when its directory has none. */
KLI_API const struct kli_tokenizer *kli_model_tokenizer(const struct kli_model *model);

/* @return the bytes of weights one decode step reads: every attention and shared matrix,
 * the router, top_k routed experts per MoE layer (average expert size), one embedding row
 * and lm_head. The numerator of the decode roofline. */
KLI_API uint64_t kli_model_decode_bytes(const struct kli_model *model);

/* Of the model's weight-file pages now resident in this process: *resident bytes in all, and
 * *huge bytes of them mapped through 2 MiB pages (the rest through 4 KiB pages, one TLB
 * entry each; see kli(3) on huge pages). Weights converted at open are not counted.
 * @return 0, or -1 where the system does not say (not Linux, no /proc). */
KLI_API int kli_model_weight_pages(const struct kli_model *model, uint64_t *resident,
                                   uint64_t *huge);

/* Edge mode's expert cache (kli_model_options.mem_budget): its sizes and what it did. */
struct kli_cache_stats {
    uint64_t budget;          /* bytes: the whole budget */
    uint64_t trunk_bytes;     /* counted for the resident trunk (every tensor but the routed
                                 experts, plus the float MLA up-projections) */
    uint64_t reserve;         /* kept for sessions, scratch and the program: 32 MiB + 1/16 */
    uint64_t slot_bytes;      /* one slot: the largest routed expert, rounded to 4 KiB */
    int32_t n_slots;          /* routed experts the cache holds at once */
    int32_t n_experts;        /* routed experts in the model */
    uint64_t requests;        /* experts the forward passes asked for */
    uint64_t hits;            /* of which cached, or already being read by a prefetch */
    uint64_t prefetches;      /* speculative reads started (next layer's router on this
                                 layer's input) */
    uint64_t prefetch_used;   /* of which used before being evicted */
    uint64_t predicted;       /* experts the next-layer guesses named (read or not) */
    uint64_t predicted_right; /* of which the layer then asked for: reads start only while
                                 a running average of this ratio stays at 1/2 or more */
    uint64_t bytes_read;      /* from the weight files */
    double wait_seconds;      /* time the forward passes waited for reads */
};

/* @return 0 with *st filled in edge mode; -1 (and *st zeroed) for a model without a budget. */
KLI_API int kli_model_cache_stats(const struct kli_model *model, struct kli_cache_stats *st);

/* Zeroes the counters (requests to wait_seconds) of kli_model_cache_stats. */
KLI_API void kli_model_cache_reset(struct kli_model *model);

/* What the GPU does for a model (kli_model_options.gpu): the hot sets and their use. */
struct kli_gpu_stats {
    int32_t mla_layers;       /* 1: MLA layers run whole on the GPU; 0: attention only or none */
    int32_t whole_model;      /* 1: the whole model fits: KDA layers, their states and lm_head
                                 are on the GPU too */
    int32_t n_hot;            /* routed experts per MoE layer resident (fewest of any layer) */
    int32_t n_experts;        /* routed experts per MoE layer in the model */
    uint64_t bytes_used;      /* device memory kli holds now (weights, mirrors, workspaces) */
    uint64_t budget;          /* device memory kli may hold */
    uint64_t routed;          /* (token, routed expert) pairs of the forward passes */
    uint64_t on_gpu;          /* of which computed by the GPU (the hit rate is on_gpu/routed) */
    uint64_t swaps;           /* experts replaced in hot sets as the routing counts drifted */
};

/* @return 0 with *st filled when the model uses a GPU; -1 (and *st zeroed) otherwise. The
 * counters count from the open or from kli_model_gpu_reset. */
KLI_API int kli_model_gpu_stats(const struct kli_model *model, struct kli_gpu_stats *st);

/* Zeroes the counters (routed, on_gpu, swaps) of kli_model_gpu_stats. */
KLI_API void kli_model_gpu_reset(struct kli_model *model);

/* @return the model's identity as recorded in snapshots: a hash of the configuration, every
 * tensor's name, dtype and shape and the dtypes computed in (weight_type). It does not cover
 * the weight values: two checkpoints of one architecture share it. */
KLI_API uint64_t kli_model_fingerprint(const struct kli_model *model);

/* Writes a human-readable architecture summary (layer kinds, dimensions, parameter count,
 * bytes by dtype, state sizes) into `buf`, NUL-terminated and truncated to `cap`.
 * With `tensors` non-zero, the tensor list follows.
 * @return the length the full text needs (excluding the NUL), like snprintf. */
KLI_API size_t kli_model_describe(const struct kli_model *model, int tensors, char *buf,
                                  size_t cap);

/* ==== Session: per-sequence state ========================================================== */

struct kli_session;

struct kli_session_options {
    size_t size;     /* sizeof the struct, set by kli_session_options_init (ABI, above) */
    int32_t ctx_max;     /* tokens the session may hold; 0 = the model's maximum */
    int32_t batch_max;   /* tokens computed together in one step of an eval; 0 = 256 */
    int32_t cache_type;  /* enum kli_cache_type of the MLA latent cache; 0 = KLI_CACHE_F32 */
};

/* How the MLA latent cache stores its rows (576 values per token and MLA layer on Kimi
 * Linear): converted once when written, read by the attention as they are. F32 is exact;
 * BF16 halves the cache, Q8_0 (blocks of 32 int8 with an f16 scale) takes 17/64 of it; what
 * each costs in accuracy is in kli(1), CACHE TYPES. The GPU mirrors only F32 caches: a session
 * of another type computes its attention on the CPU. */
enum kli_cache_type {
    KLI_CACHE_F32 = 0,
    KLI_CACHE_BF16 = 1,
    KLI_CACHE_Q8_0 = 2,
};

/* "f32", "bf16", "q8_0" for a cache type; NULL for another value. */
KLI_API const char *kli_cache_type_name(int32_t type);

/* @return the bytes a session of `model` needs for a context of `tokens` tokens at cache type
 *         `type` beyond its fixed state: the MLA latent cache of all MLA layers (most of it),
 *         the token history and the attention scores (the KDA layers' state does not grow
 *         with the context); 0 when the model's rows cannot be stored as that type (Q8_0
 *         needs whole 32-blocks, kli(3)). */
KLI_API uint64_t kli_model_cache_bytes(const struct kli_model *model, int32_t type,
                                       int64_t tokens);

KLI_API void kli_session_options_init(struct kli_session_options *opt);

/* Creates an empty session (no tokens seen) for `model`.
 * @param opt  NULL for the defaults.
 * @return KLI_OK or KLI_E_NOMEM / KLI_E_RANGE. */
KLI_API int kli_session_create(struct kli_session **out, const struct kli_model *model,
                               const struct kli_session_options *opt, struct kli_err *err);

/* Releases the session. NULL is allowed. */
KLI_API void kli_session_free(struct kli_session *s);

/* Forgets every token: the session is as new. */
KLI_API void kli_session_reset(struct kli_session *s);

/* Runs `n` tokens through the model after those already seen. Feeding a prompt in one call,
 * in pieces, or one token at a time gives the same result (up to float rounding).
 * @param logits  NULL, or room for [n][n_vocab] floats that receives the logits of every
 *                position of this call.
 * @return KLI_OK; KLI_E_RANGE if a token id is outside the vocabulary or the session would
 *         exceed ctx_max (the session is then unchanged). */
KLI_API int kli_session_eval(struct kli_session *s, const kli_token *tokens, int32_t n,
                             float *logits, struct kli_err *err);

/* One decode step for n sequences at once: session ss[i] takes token tokens[i]. Every row
 * goes through the same pass over the weights (the experts chosen by several sequences run
 * one matrix product over their rows), which is what makes continuous batching pay off:
 * memory traffic per step barely grows with n. Each session's logits are then in
 * kli_session_logits(ss[i]). The sessions must be distinct and of one model; ss[0]'s scratch
 * serves the step, so n must not exceed its batch_max, and its attention workspace grows to
 * the longest context among them (which may exceed ss[0]'s own ctx_max). The same thread
 * rule applies to all of them at once (no other thread may use any of these sessions
 * meanwhile).
 * @return KLI_OK; KLI_E_RANGE (a bad id, a full sequence, n too large), KLI_E_INVALID,
 *         KLI_E_NOMEM (the sessions are then unchanged). */
KLI_API int kli_session_eval_batch(struct kli_session *const *ss, const kli_token *tokens,
                                   int32_t n, struct kli_err *err);

/* @return the logits of the last evaluated position, [n_vocab]; NULL before any eval.
 *         Borrowed: valid until the next eval/reset/free of the session. */
KLI_API const float *kli_session_logits(const struct kli_session *s);

/* @return the number of tokens the session has seen. */
KLI_API int32_t kli_session_pos(const struct kli_session *s);

/* @return the most tokens the session may hold (its ctx_max, or the model's maximum). */
KLI_API int32_t kli_session_ctx_max(const struct kli_session *s);

/* @return the session's enum kli_cache_type. */
KLI_API int32_t kli_session_cache_type(const struct kli_session *s);

/* For measuring decode speed at depth (kli bench --depth): appends n positions to a session
 * that has seen at least one token, repeating its token history and MLA cache rows from the
 * start, and leaves the KDA states and the logits as they are. The attention then reads a
 * cache of pos + n rows of realistic values, as after a long prompt, without the prompt's
 * cost; the text it continues is meaningless. @return KLI_OK; KLI_E_INVALID (no tokens yet,
 * n < 0); KLI_E_RANGE past ctx_max; KLI_E_NOMEM. */
KLI_API int kli_session_pad(struct kli_session *s, int32_t n, struct kli_err *err);

/* The token ids the session has seen, in order (prompt and generated tokens alike).
 * @param out  receives a pointer to kli_session_pos(s) ids (borrowed: valid until the next
 *             eval/reset/restore/free of the session); may be NULL.
 * @return the number of ids, kli_session_pos(s). */
KLI_API int32_t kli_session_tokens(const struct kli_session *s, const kli_token **out);

/* Time spent per part of the forward pass, accumulated over evals since the session was
 * created or kli_session_reset_timers was called. */
enum kli_phase {
    KLI_PHASE_KDA = 0,      /* KDA layers (projections, convolutions, the delta rule) */
    KLI_PHASE_MLA = 1,      /* MLA layers (projections and attention) */
    KLI_PHASE_MOE = 2,      /* router, routed and shared experts */
    KLI_PHASE_DENSE = 3,    /* dense MLP layers */
    KLI_PHASE_LM_HEAD = 4,  /* final norm and lm_head */
    KLI_PHASE_OTHER = 5,    /* embedding, norms, residual adds */
    KLI_PHASE_COUNT = 6
};
KLI_API void kli_session_phase_seconds(const struct kli_session *s, double out[KLI_PHASE_COUNT]);
KLI_API void kli_session_reset_timers(struct kli_session *s);

/* @return the model a session belongs to (borrowed). */
KLI_API const struct kli_model *kli_session_model(const struct kli_session *s);

/* ==== Sampling ============================================================================= */

struct kli_sampler;

struct kli_sampler_options {
    size_t size;     /* sizeof the struct, set by kli_sampler_options_init (ABI, above) */
    float temperature;        /* 0 = greedy (argmax, ties to the lowest id); default 0.7 */
    int32_t top_k;            /* keep the k most likely tokens; 0 = off (default) */
    float top_p;              /* nucleus: smallest set with probability >= p; 1 = off; 0.9 */
    float min_p;              /* drop tokens below min_p * p(best); 0 = off (default) */
    float repeat_penalty;     /* divide positive / multiply negative logits of recent
                                 tokens (CTRL-style); 1 = off (default) */
    float presence_penalty;   /* subtract once from every recent token's logit; 0 = off */
    float frequency_penalty;  /* subtract per occurrence of a recent token; 0 = off */
    int32_t penalty_last_n;   /* recent tokens the penalties look at; default 64 */
    uint64_t seed;            /* the random stream; the same seed gives the same tokens */
    /* logit_bias: bias[i] (in [-100, 100]) is added to the logit of token bias_ids[i], for
     * i < n_bias (up to 1024), before the penalties; -100 all but bans a token. The arrays
     * are copied by kli_sampler_create (and kli_sched_submit). Default: none. */
    const kli_token *bias_ids;
    const float *bias;
    int32_t n_bias;
};

KLI_API void kli_sampler_options_init(struct kli_sampler_options *opt);

/* Creates a sampler for a vocabulary of n_vocab ids.
 * @return KLI_OK; KLI_E_RANGE naming an option outside its range (temperature < 0,
 *         top_p outside (0,1], min_p outside [0,1], repeat_penalty <= 0, ...). */
KLI_API int kli_sampler_create(struct kli_sampler **out, const struct kli_sampler_options *opt,
                               int32_t n_vocab, struct kli_err *err);
KLI_API void kli_sampler_free(struct kli_sampler *smp);

/* Picks the next token from logits [n_vocab] (not modified). */
KLI_API kli_token kli_sampler_sample(struct kli_sampler *smp, const float *logits);

/* out[i] = kli_sampler_sample(smp[i], logits[i]) for i < n, the samplers spread over the
 * worker threads (as after kli_session_eval_batch: one sampler per sequence). The samplers
 * must be distinct. @return KLI_OK; KLI_E_INVALID for NULL arrays, a NULL or repeated sampler
 * or n < 0 (then nothing is sampled). */
KLI_API int kli_sampler_sample_many(struct kli_sampler *const *smp, const float *const *logits,
                                    int32_t n, kli_token *out, struct kli_err *err);

/* Records a token of the context for the penalties (prompt tokens too, if wanted). */
KLI_API void kli_sampler_accept(struct kli_sampler *smp, kli_token tok);

/* Forgets the recorded tokens and restarts the random stream from the seed. */
KLI_API void kli_sampler_reset(struct kli_sampler *smp);

/* ---- log-probabilities ------------------------------------------------------------------
 * A sampler asked for them records, at each draw, the log-probability (natural log) of the
 * token drawn and of the n_top most likely tokens, under the distribution the draw used:
 * the logits after logit_bias, the penalties and a grammar's mask, divided by the
 * temperature, cut by top-k, min-p and top-p and renormalised over the tokens kept (an
 * alternative is always a token the draw could have picked, so there may be fewer than
 * n_top). With temperature 0 (greedy) the draw has no distribution: then it is the softmax
 * of those logits at temperature 1 over the whole vocabulary, whose most likely token greedy
 * takes. A token chosen without a draw (a grammar's end token, a forced fallback) has
 * log-probability 0 and no alternatives. Log-probabilities are at least -9999. */
#define KLI_LOGPROBS_MAX 20

struct kli_token_logprob {
    kli_token token;
    float logprob;
};

struct kli_logprobs {
    kli_token token;             /* the token drawn */
    float logprob;               /* its log-probability, <= 0 */
    int32_t n_top;               /* entries of top: at most the n_top asked for */
    struct kli_token_logprob top[KLI_LOGPROBS_MAX];   /* most likely first, ties to the lower
                                                         id; the token drawn among them when
                                                         it is one of the most likely */
};

/* Starts (n_top in [0, KLI_LOGPROBS_MAX]) or stops (-1, the default) recording each draw's
 * log-probabilities. Recording costs a pass over the vocabulary per draw.
 * @return KLI_OK, or KLI_E_RANGE for another n_top. */
KLI_API int kli_sampler_set_logprobs(struct kli_sampler *smp, int32_t n_top, struct kli_err *err);

/* @return the last draw's log-probabilities (valid until the next draw), or NULL when not
 * recording or before the first draw since recording started. */
KLI_API const struct kli_logprobs *kli_sampler_logprobs(const struct kli_sampler *smp);

/* ---- constrained decoding: JSON Schema ------------------------------------------------
 * A grammar is a JSON Schema compiled for one tokenizer; a sampler given one (and a token
 * budget) draws only tokens that keep the output a prefix of a valid value, which can still
 * be completed within the tokens left, and ends it (an end token) once the value is whole.
 * The subset, and what is written for it (compact JSON, declared properties in their order),
 * is in kli(3), GRAMMARS. A grammar is immutable but for a mask cache behind a lock: any
 * number of samplers, on any threads, may share one. */
struct kli_grammar;

/* Compiles `schema` (len bytes of JSON Schema text; NULL: any JSON object) for `tok`, which
 * must outlive the grammar.
 * @return KLI_OK; KLI_E_FORMAT (not JSON, a keyword's value of the wrong type),
 *         KLI_E_UNSUPPORTED (a keyword outside the subset, named with its place as a JSON
 *         pointer; a tokenizer without <|im_end|> or [EOS]), KLI_E_INVALID (no value
 *         satisfies the schema), KLI_E_NOMEM. */
KLI_API int kli_grammar_create(struct kli_grammar **out, const struct kli_tokenizer *tok,
                               const char *schema, size_t len, struct kli_err *err);
KLI_API void kli_grammar_free(struct kli_grammar *g);

/* Constrains smp's draws to `g` (NULL: no constraint), the value to be complete within
 * max_tokens draws (> 0); kli_sampler_reset starts the value again. Once the value is
 * complete, kli_sampler_sample returns the grammar's end token (<|im_end|>, else [EOS]).
 * The grammar's state is not part of a snapshot. `g` must outlive its use by smp.
 * @return KLI_OK; KLI_E_INVALID (max_tokens <= 0); KLI_E_NOMEM. */
KLI_API int kli_sampler_set_grammar(struct kli_sampler *smp, const struct kli_grammar *g,
                                    int32_t max_tokens, struct kli_err *err);

/* @return 1 when the sampler's value is complete, 0 while it is not (or no grammar is set),
 *         -1 when no token could follow (the draws so far are not a valid prefix: a bug, or
 *         tokens drawn elsewhere were accepted). */
KLI_API int kli_sampler_grammar_status(const struct kli_sampler *smp);

/* ==== Snapshots: saving, restoring and forking a session ==================================
 * A snapshot is a session's complete state: the KDA recurrent and convolution states, the MLA
 * latent cache, the token history, the logits of the last position and, when a sampler is
 * given, the sampler's random stream and recent tokens. Restoring it and going on gives the
 * same tokens and bitwise the same logits as going on without the interruption (on the same
 * model, with the same thread count and CPU kernels).
 *
 * The bytes are a versioned header (magic "KLISNAP", the fingerprint of the model, sizes and
 * checksums) and a zstd frame (stored uncompressed when kli is built without zstd; both
 * forms are read back). The format is described in kli(3). A snapshot is tied to its model:
 * the fingerprint covers the configuration, every tensor's name, dtype and shape and the
 * dtypes the weights are computed in (kli_model_options.weight_type), but not the weight
 * values. The sampler options are recorded but not restored: a restore puts the random
 * stream and recent tokens into the sampler given, whatever its options. */

/* Writes a snapshot of `s` (and of `smp`, when not NULL) to `buf`.
 * @param buf  receives the first min(cap, result) bytes; may be NULL when cap is 0.
 * @return the size of the whole snapshot, which may exceed `cap` (see kli_tokenize for the
 *         protocol; note that a call compresses the whole state, so size the buffer
 *         generously rather than asking first); KLI_E_INVALID for bad arguments;
 *         KLI_E_NOMEM. The session and sampler are not modified. */
KLI_API int64_t kli_session_snapshot(const struct kli_session *s, const struct kli_sampler *smp,
                                     void *buf, int64_t cap, struct kli_err *err);

/* Replaces the state of `s` (and of `smp`) by the snapshot in buf[0..len). Everything is
 * checked and decoded into temporary memory before the session is touched: when this fails,
 * the session and the sampler are exactly as they were.
 * @param smp  NULL: sampler state in the snapshot is ignored. A snapshot without sampler
 *             state leaves `smp` as it is. When `smp` has a shorter penalty window than the
 *             saved sampler, the most recent tokens that fit are kept.
 * @return KLI_OK; KLI_E_FORMAT for bytes that are not a snapshot, are truncated or damaged
 *         (checksum mismatch); KLI_E_INVALID when the snapshot was made with another model
 *         (the message names both fingerprints); KLI_E_UNSUPPORTED for a newer format
 *         version, or a compressed snapshot in a build without zstd; KLI_E_RANGE when it
 *         holds more tokens than the session's ctx_max; KLI_E_NOMEM. The session's options
 *         (ctx_max, batch_max) stay its own. */
KLI_API int kli_session_restore(struct kli_session *s, struct kli_sampler *smp, const void *buf,
                                size_t len, struct kli_err *err);

/* kli_session_snapshot to a file, written as kli_outfile_open describes (a temporary file,
 * synced and renamed over `path`), so `path` holds either the old file or the complete new
 * one; a `path` that is not a regular file is refused.
 * @return KLI_OK; KLI_E_IO naming the file; KLI_E_NOMEM; KLI_E_INVALID. */
KLI_API int kli_session_save(const struct kli_session *s, const struct kli_sampler *smp,
                             const char *path, struct kli_err *err);

/* kli_session_restore from a file, which must be a regular file (a FIFO or a device is
 * refused without blocking) no larger than the largest snapshot `s` could hold. Messages
 * name the file.
 * @return as kli_session_restore, KLI_E_IO when the file cannot be read or is not a
 *         regular file, KLI_E_RANGE when it is over that size. */
KLI_API int kli_session_load(struct kli_session *s, struct kli_sampler *smp, const char *path,
                             struct kli_err *err);

/* Creates a new, independent session with the model and options of `src` and a copy of its
 * state (no serialisation): many continuations can share one evaluated prefix. Evaluating
 * one session never changes the other. The sampler is not part of a session: fork it by
 * creating another (see kli_session_snapshot to carry its random stream over).
 * @return KLI_OK; KLI_E_NOMEM; KLI_E_INVALID. On failure *out is NULL; on success the
 *         caller owns *out and releases it with kli_session_free(). */
KLI_API int kli_session_fork(struct kli_session **out, const struct kli_session *src,
                             struct kli_err *err);

/* Replaces the state of `dst` by a copy of the state of `src` (a session of the same model),
 * as kli_session_fork does, but into a session that already exists and keeps its own
 * options: a prompt prefilled in a session with a large batch_max can move into a small one
 * for decoding, or into a cache entry created with batch_max 1. Afterwards `dst` goes on
 * exactly as `src` would; `src` is not modified. Allocates only when dst's cache must grow.
 * @return KLI_OK; KLI_E_INVALID (NULL, the same session twice, two models); KLI_E_RANGE when
 *         src holds more tokens than dst's ctx_max; KLI_E_NOMEM. On failure dst is as it
 *         was. */
KLI_API int kli_session_copy(struct kli_session *dst, const struct kli_session *src,
                             struct kli_err *err);

/* @return the bytes of memory the session holds now: its state (KDA states, the MLA cache as
 *         allocated, the token history, logits) and its scratch, which grows with batch_max.
 *         For caches of sessions bounded in bytes. */
KLI_API uint64_t kli_session_nbytes(const struct kli_session *s);

/* ==== Chat format ========================================================================== */

struct kli_chat_message {
    const char *role;      /* "system", "user", "assistant" or "tool" */
    const char *content;   /* UTF-8; special-token strings in it stay plain text */
};

/* Renders messages in Kimi's chat format, as token ids:
 *     <|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>   (default system
 *                                                   turn, when the first message is no system)
 *     <|im_user|>user<|im_middle|>CONTENT<|im_end|> ...
 *     <|im_assistant|>assistant<|im_middle|>        (with add_generation_prompt)
 * Role markers are emitted as special ids; content is encoded as ordinary text, so a user
 * cannot inject control tokens. With `continuation` set, the default system turn is not
 * added (for the next turns of a conversation already in a session).
 * @return the number of ids (see kli_tokenize for the `cap` protocol), or a negative status:
 *         KLI_E_INVALID for an unknown role, KLI_E_UNSUPPORTED when the tokenizer lacks the
 *         chat special tokens, KLI_E_FORMAT for invalid UTF-8. */
KLI_API int64_t kli_chat_render(const struct kli_tokenizer *tok,
                                const struct kli_chat_message *msgs, int32_t n,
                                int add_generation_prompt, int continuation,
                                kli_token *out, int64_t cap, struct kli_err *err);

/* Renders an OpenAI-style conversation with tools in Kimi's chat format (doc/formats.md 1.7):
 * `messages` (len bytes) is a JSON array of {"role", "content"} objects, where content is a
 * string, a list of {"type": "text", "text"} parts or null; an assistant message may carry
 * "tool_calls" ([{"id", "function": {"name", "arguments"}}], arguments a JSON string or
 * value) and a "tool" message needs "tool_call_id". `tools` (tools_len bytes; NULL or 0: none)
 * is the request's JSON array of tool declarations, rendered first as the tool_declare
 * system turn (keys sorted, Python's JSON spacing), as Kimi's template does:
 *     <|im_system|>tool_declare<|im_middle|>[{"function": ...}]<|im_end|>
 *     ... <|im_assistant|>assistant<|im_middle|>TEXT<|tool_calls_section_begin|>
 *         <|tool_call_begin|>ID<|tool_call_argument_begin|>ARGS<|tool_call_end|>
 *         <|tool_calls_section_end|><|im_end|>
 *     <|im_system|>tool<|im_middle|>## Return of ID\nCONTENT<|im_end|>
 * Otherwise as kli_chat_render (the default system turn, continuation, the cap protocol).
 * @return the number of ids, or a negative status: KLI_E_FORMAT (not JSON), KLI_E_INVALID
 *         (a message of an unknown role or missing field, named by its index),
 *         KLI_E_UNSUPPORTED (a content part other than text; a tokenizer without the chat or
 *         tool-call tokens). */
KLI_API int64_t kli_chat_render_json(const struct kli_tokenizer *tok, const char *messages,
                                     size_t len, const char *tools, size_t tools_len,
                                     int add_generation_prompt, int continuation,
                                     kli_token *out, int64_t cap, struct kli_err *err);

/* ==== Generation =========================================================================== */

enum kli_finish {
    KLI_FINISH_NONE = 0,
    KLI_FINISH_EOS = 1,        /* the model produced an end token (<|im_end|>, [EOS]) */
    KLI_FINISH_STOP = 2,       /* a stop string appeared */
    KLI_FINISH_LENGTH = 3,     /* max_tokens reached, or the context is full */
    KLI_FINISH_INTERRUPT = 4,  /* the callback asked to stop; a scheduler request cancelled */
    KLI_FINISH_ERROR = 5       /* a scheduler request failed (see its status and message) */
};

/* Receives generated text as it is produced: `len` bytes that never contain (the start of) a
 * stop string and never end inside a UTF-8 character, except the final piece, which passes
 * on whatever bytes remain. Return non-zero to stop. */
typedef int (*kli_text_fn)(void *ud, const char *text, size_t len);

struct kli_generate_options {
    size_t size;     /* sizeof the struct, set by kli_generate_options_init (ABI, above) */
    int32_t max_tokens;          /* default 256 */
    const char *const *stop;     /* stop strings (not emitted), n_stop of them */
    int32_t n_stop;
    kli_text_fn on_text;         /* may be NULL */
    void *ud;
    int32_t special;             /* 1: special tokens other than the end tokens are passed
                                    to on_text as their names ("<|im_user|>"); 2: only the
                                    tool-call markers ("<|tool_call_begin|>", ...);
                                    default 0: they produce no text */
    /* Called with every generated token but the end tokens (the one that completes a stop
     * string included), before its text reaches on_text; lp is kli_sampler_logprobs of the
     * sampler (NULL unless it records them). May be NULL. */
    void (*on_token)(void *ud, kli_token token, const struct kli_logprobs *lp);
};

struct kli_generate_result {
    int32_t n_prompt, n_generated;
    double prefill_seconds, decode_seconds;
    enum kli_finish finish;
    kli_token last;              /* the last sampled token (the end token on KLI_FINISH_EOS) */
};

KLI_API void kli_generate_options_init(struct kli_generate_options *opt);

/* Feeds `prompt` to the session and samples up to max_tokens tokens, feeding each one
 * back (the end token is not fed: the session ends just before it). Text goes to on_text.
 * @return KLI_OK (see res->finish for why it stopped) or a negative status. */
KLI_API int kli_generate(struct kli_session *s, const struct kli_tokenizer *tok,
                         struct kli_sampler *smp, const kli_token *prompt, int32_t n_prompt,
                         const struct kli_generate_options *opt, struct kli_generate_result *res,
                         struct kli_err *err);

/* ==== Scheduler: many requests through one model (continuous batching) ==================
 *
 * A scheduler runs requests (a prompt, sampler settings, a token limit, stop strings)
 * through one model, up to `parallel` at a time. Each kli_sched_step admits waiting requests
 * into free places (their prompts evaluated as matrix products in a prefill session, at most
 * about `join_tokens` prompt tokens per step while others decode, so long prompts do not
 * stall the running ones) and then decodes one token of every running request in one pass
 * over the weights (kli_session_eval_batch). Requests join and leave at any step; a request
 * decodes exactly what it would decode alone with the same settings and seed.
 *
 * Prefix reuse: when a joining prompt shares at least `min_prefix` leading tokens with a
 * waiting request or one of the last few that ran, the state at the end of the shared part
 * is kept (up to `prefix_bytes`, optionally saved in `prefix_dir`), and every later request
 * starts from the longest kept prefix of its prompt. Its logits are bit-identical to
 * evaluating the shared part and then the rest (not to one piece: the recurrence is
 * chunked otherwise, equal to rounding); a prompt that shares a prefix is split there even
 * when the kept state is evicted before its use.
 *
 * Results come through callbacks, called from kli_sched_step (and kli_sched_free), on the
 * caller's thread: on_token for every generated token, on_finish exactly once for every
 * submitted request. A request's failure (a prompt longer than the context, bad sampler
 * settings, an empty prompt) ends only that request. Not thread-safe: one thread drives a
 * scheduler. The callbacks may call kli_sched_submit, kli_sched_cancel, kli_sched_waiting
 * and kli_sched_stats; kli_sched_step from a callback is refused (KLI_E_INVALID), and
 * kli_sched_free must never be called from one. */

struct kli_sched;

/* A generated token: its bytes (none for special tokens), borrowed for the call. End tokens
 * and the tokens after a stop string are not reported. */
struct kli_sched_token {
    uint64_t id;                 /* from kli_sched_submit */
    void *user;                  /* the request's */
    kli_token token;
    const char *text;
    size_t len;
    int32_t n_generated;         /* tokens generated so far, this one included */
    const float *logits;         /* the kli_model_n_vocab logits it was sampled from */
    const struct kli_logprobs *lp;   /* with the request's logprobs >= 0, else NULL */
};

/* How a request ended. `text` (all its generated text, cut before a stop string) and
 * `error` are borrowed for the call. */
struct kli_sched_result {
    uint64_t id;
    void *user;
    enum kli_finish finish;      /* EOS, STOP, LENGTH, INTERRUPT (cancelled, or the
                                    scheduler was stopped or freed first) or ERROR */
    int status;                  /* KLI_OK, or the negative status of an error */
    const char *error;           /* the message of an error, else NULL */
    const char *text;
    size_t len;
    int started;                 /* 1 when its prompt was evaluated (the counts below hold) */
    int32_t n_prompt, n_cached, n_generated;   /* n_cached: prompt tokens from a kept prefix */
    double prefill_seconds, decode_seconds;
};

struct kli_sched_options {
    size_t size;                 /* sizeof the struct, set by kli_sched_options_init (ABI) */
    int32_t parallel;            /* requests decoded together, 1..256; default 8 */
    int32_t ctx_max;             /* context of each request; 0: the model's */
    int32_t join_tokens;         /* prompt tokens admitted per step while others decode;
                                    default 512 */
    int32_t min_prefix;          /* shortest shared prefix kept; default 64 */
    uint64_t prefix_bytes;       /* memory for kept prefixes; default 1 GiB; 0 (and no
                                    prefix_dir): no prefix reuse */
    const char *prefix_dir;      /* NULL, or a directory of kept prefixes (created if
                                    missing), shared by processes of one model */
    uint64_t prefix_key;         /* with prefix_dir: tells apart models whose states differ */
    void *ud;                    /* passed to the callbacks */
    void (*on_token)(void *ud, const struct kli_sched_token *t);     /* may be NULL */
    void (*on_finish)(void *ud, const struct kli_sched_result *r);   /* may be NULL */
    /* Called before a waiting request is taken, so that a caller with a known backlog can
     * keep a few requests waiting (they are searched for shared prefixes). May be NULL. */
    void (*on_need)(void *ud, struct kli_sched *s);
    /* Polled before each admission and between prefill pieces of 256 tokens: non-zero ends
     * the step at once (a request caught in its prefill ends as INTERRUPT). May be NULL. */
    int (*should_stop)(void *ud);
    /* Problems that fail no request (a prefix could not be kept, or saved in prefix_dir).
     * May be NULL. */
    void (*on_notice)(void *ud, const char *msg);
    /* Non-zero, with prefix reuse: the state at the end of every request that ends with
     * EOS, STOP or LENGTH (its prompt and the generated tokens that were fed) is kept too,
     * so that the next turn of a conversation, whose prompt repeats the request and its
     * answer, starts from it; and so is the state at the end of every prompt of at least
     * min_prefix tokens that was not already kept, for a next turn whose answer does not
     * tokenize again into the tokens generated (it then starts after the prompt). Default 0. */
    int keep_finished;
    int32_t cache_type;          /* enum kli_cache_type of every session; 0 = KLI_CACHE_F32 */
};

struct kli_sched_request {
    size_t size;                 /* sizeof the struct, set by kli_sched_request_init (ABI) */
    const kli_token *prompt;     /* n_prompt tokens, copied */
    int32_t n_prompt;
    struct kli_sampler_options so;
    int32_t max_tokens;          /* default 256; 0 evaluates the prompt only */
    const char *const *stop;     /* up to 16 stop strings, copied */
    int32_t n_stop;
    /* Not NULL: the request fails with this message (copied) when its turn comes, so a
     * caller's own errors keep their place among the results. */
    const char *fail;
    void *user;                  /* handed back in the callbacks */
    /* Not NULL: the output is a value of this grammar, complete within max_tokens
     * (kli_sampler_set_grammar); borrowed, it must outlive the request. */
    const struct kli_grammar *grammar;
    /* -1 (default): none; 0..KLI_LOGPROBS_MAX: every reported token carries its
     * log-probabilities and this many alternatives (kli_sched_token.lp). */
    int32_t logprobs;
};

struct kli_prefix_stats {
    int64_t entries, bytes;      /* kept in memory now */
    int64_t stored, evicted;     /* prefixes kept, prefixes dropped for room */
    int64_t disk_loads, disk_saves, disk_errors;   /* files of prefix_dir */
};

struct kli_sched_stats {
    int64_t waiting, running;
    int64_t steps, step_tokens;  /* decode steps and the tokens they decoded */
    double step_seconds;         /* time in decode steps */
    struct kli_prefix_stats prefix;   /* zero without prefix reuse */
};

KLI_API void kli_sched_options_init(struct kli_sched_options *o);
KLI_API void kli_sched_request_init(struct kli_sched_request *r);

/* Creates the sessions (one per place, one for prefill) and the prefix cache.
 * @return KLI_OK, or a negative status (KLI_E_IO: prefix_dir could not be used;
 * KLI_E_INVALID: options of size 0, not filled by kli_sched_options_init). */
KLI_API int kli_sched_create(struct kli_sched **out, const struct kli_model *m,
                             const struct kli_sched_options *o, struct kli_err *err);
/* Ends every request still held (on_finish with KLI_FINISH_INTERRUPT) and frees. NULL-safe. */
KLI_API void kli_sched_free(struct kli_sched *s);

/* Queues a request; *id (may be NULL) receives its id. Problems with its prompt (empty:
 * KLI_E_INVALID) or settings are reported through on_finish when its turn comes.
 * @return KLI_OK, KLI_E_INVALID (NULL prompt, negative counts, more than 16 stop strings,
 * a request of size 0, a call from on_finish while kli_sched_free runs) or KLI_E_NOMEM. */
KLI_API int kli_sched_submit(struct kli_sched *s, const struct kli_sched_request *r,
                             uint64_t *id, struct kli_err *err);
/* Cancels a request: it ends (KLI_FINISH_INTERRUPT) before its next token, at the latest
 * at the start of the next step; one still waiting never starts. An ended request's id is
 * unknown, in its own on_finish too.
 * @return KLI_OK, or KLI_E_RANGE when no request has that id. */
KLI_API int kli_sched_cancel(struct kli_sched *s, uint64_t id);
/* One round: admits waiting requests, then decodes one token of every running request.
 * @return the number of requests decoded (0: nothing runs or waits, or should_stop said
 * stop), or KLI_E_INVALID for a NULL scheduler or a call from one of its callbacks. */
KLI_API int kli_sched_step(struct kli_sched *s);
/* @return the number of requests waiting to be admitted. */
KLI_API int32_t kli_sched_waiting(const struct kli_sched *s);
KLI_API void kli_sched_stats(const struct kli_sched *s, struct kli_sched_stats *st);

/* ==== Tools: writing checkpoints ========================================================== */

/* Progress of a long operation: `done` of `total` bytes; `what` names the current item. */
typedef void (*kli_progress_fn)(void *ud, uint64_t done, uint64_t total, const char *what);

/* The options of kli_quantize and kli_convert: one struct for both, as their command lines
 * are one. (kli_quantize_options is its former name.) */
struct kli_convert_options {
    size_t size;     /* sizeof the struct, set by its _init function (ABI, above) */
    const char *type;           /* a recipe, "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k" or
                                   "q8_0" (kli(1)), or every weight matrix in "q4", "bf16",
                                   "f16", "f32", "q3_k", "q4_k" or "q5_k" (rows that are not
                                   whole 256-element super-blocks take q8_0); NULL: every
                                   tensor as stored (kli_convert only) */
    const char *const *keep;    /* n_keep rules "GLOB=TYPE" (fnmatch on tensor names; TYPE
                                   as above or "keep" for the stored type); first match wins */
    int32_t n_keep;
    int force;                  /* overwrite an existing output file */
    kli_progress_fn progress;
    void *ud;
    int (*interrupt)(void *ud); /* polled as it goes (with ud): non-zero stops the conversion
                                   with KLI_E_INTERRUPTED, the weights file not written (an
                                   existing one kept); may be NULL */
    const char *imatrix;        /* NULL, or an importance matrix written by kli_imatrix_save
                                   (kli-imatrix(5)): each row of a quantized matrix it covers
                                   is quantized weighting the error of input column j by its
                                   mean square; kli_quantize only */
    int64_t *imatrix_used;      /* NULL, or [2] where kli_quantize stores how many matrices it
                                   quantized to a block type with the imatrix's weights and
                                   how many without (absent from it, or never seen) */
    const char *format;         /* kli_convert's output: NULL or "kli" a .kli file; "gguf" a
                                   GGUF file as llama.cpp's converter writes Kimi Linear
                                   (kli-weights(5), GGUF FILES) */
};
#define kli_quantize_options kli_convert_options

/* Defaults for kli_quantize: type "q8_0", the rest zero. */
KLI_API void kli_quantize_options_init(struct kli_convert_options *opt);

/* Writes a copy of the model directory `in` to directory `out` (created if missing) with its
 * weight matrices converted to opt->type: config.json and the tokenizer files are copied,
 * the weights go to one out/model.safetensors (kli's KLI_Q8_0 / KLI_Q4 dtypes for the
 * quantized types). By default the router, norms, convolution taps, gate parameters and
 * every tensor that is not a matrix with whole 32-element blocks per row keep their stored
 * dtype. Streams tensor by tensor; every file is written as kli_outfile_open describes
 * (a temporary file renamed at the end).
 * @return KLI_OK, KLI_E_IO, KLI_E_FORMAT, KLI_E_RANGE (bad type or rule), KLI_E_INVALID
 *         (`out` is `in`, or one of its files is a file of `in`), KLI_E_INTERRUPTED. */
KLI_API int kli_quantize(const char *in, const char *out, const struct kli_convert_options *opt,
                         struct kli_err *err);

/* ---- importance matrices (kli imatrix; the file is kli-imatrix(5)) ----------------------
 * A collector holds, for every weight matrix of a model (each routed expert's own), the sum
 * over the rows multiplied by it of each input value squared, and the number of rows. A
 * session carrying one adds to it in every forward step, on the CPU only; the sums are
 * added on the thread that runs the step, under the collector's lock. */
struct kli_imatrix;

/* A collector for `model`'s matrices, all sums zero. @return KLI_OK or KLI_E_NOMEM. */
KLI_API int kli_imatrix_create(struct kli_imatrix **out, const struct kli_model *model,
                               struct kli_err *err);
KLI_API void kli_imatrix_free(struct kli_imatrix *im);

/* Makes `im` also sum, for every matrix, the products x[a] x[b] of its inputs (the matrix of
 * second moments, width x width doubles each), which kli_imatrix_save writes as well and
 * kli_quantize then uses to spread each rounding error over the later columns (kli(1),
 * quantize --imatrix). Call it before any rows are added.
 * @return KLI_OK; KLI_E_INVALID when rows were added; KLI_E_NOMEM. */
KLI_API int kli_imatrix_covariance(struct kli_imatrix *im, struct kli_err *err);

/* Attaches `im` (of s's model) to s: each later kli_session_eval (and batched step s leads)
 * adds to it; NULL detaches. The collector must outlive its use by s.
 * @return KLI_OK; KLI_E_INVALID when the session or model uses a GPU. */
KLI_API int kli_session_set_imatrix(struct kli_session *s, struct kli_imatrix *im,
                                    struct kli_err *err);

/* Writes the means so far to `path` (through kli_outfile) as a safetensors file: per matrix
 * an F32 tensor of its name (the mean squares, one per input column; zeros for a matrix
 * never used), an I64 "<name>.count" (rows seen) and, after kli_imatrix_covariance, an F32
 * "<name>.cov" [width, width] (the mean of x[a] x[b]), and in __metadata__ kli.imatrix "1",
 * kli.model_fingerprint, kli.matrices and the n_meta pairs meta_kv[2i] = meta_kv[2i + 1].
 * @return KLI_OK, KLI_E_IO, KLI_E_NOMEM. */
KLI_API int kli_imatrix_save(const struct kli_imatrix *im, const char *path,
                             const char *const *meta_kv, int32_t n_meta, struct kli_err *err);

struct kli_synth_options {
    size_t size;     /* sizeof the struct, set by kli_synth_options_init (ABI, above) */
    int32_t n_layers;           /* default 4: KDA, KDA, KDA, MLA, repeating */
    int32_t n_experts;          /* default 64 */
    const char *type;           /* weight type of the matrices: "bf16" (default), "q8_0", "q4" */
    uint64_t seed;
    int force;
    kli_progress_fn progress;
    void *ud;
};

KLI_API void kli_synth_options_init(struct kli_synth_options *opt);

/* Writes a random-weight checkpoint with the real per-layer sizes of Kimi-Linear-48B-A3B
 * (hidden 2304, vocab 163840, KDA 32x128, MLA 32 heads with latent 512 and 128/64/128
 * head dims, experts 1024 wide, top-8, one shared expert) but fewer layers and experts, all
 * MoE: per-token cost is real while the model fits a small machine. For benchmarks.
 * @return KLI_OK or a negative status. */
KLI_API int kli_synth(const char *out, const struct kli_synth_options *opt, struct kli_err *err);

/* Defaults for kli_convert: every field zero (type NULL: as stored). */
KLI_API void kli_convert_options_init(struct kli_convert_options *opt);

/* Writes the model `in` (a model directory, or a .kli file) as one self-contained .kli file
 * `out` (kli-pack(5)): config.json, the tokenizer files and every tensor, row-major in the
 * dtype the kernels read, each routed expert's three matrices one page-aligned range. Which
 * tensors are converted follows kli_quantize. The input must open as a model (every tensor
 * is checked against config.json first). Streams tensor by tensor, so memory stays a few MB
 * plus the metadata whatever the model size; writes a temporary file, syncs it and renames
 * it over `out` at the end (kli_outfile_open), so an interrupted conversion never leaves a
 * partial `out` (a killed one may leave a .out.*.tmp file beside it).
 * @return KLI_OK; KLI_E_IO (an existing `out` without force, read or write errors, an
 *         `out` that another process is writing); KLI_E_INVALID (`out` is the input or one
 *         of its files);
 *         KLI_E_FORMAT; KLI_E_RANGE (bad type or rule); KLI_E_INTERRUPTED; KLI_E_NOMEM. */
KLI_API int kli_convert(const char *in, const char *out, const struct kli_convert_options *opt,
                        struct kli_err *err);

/* ---- output files ---------------------------------------------------------------------
 * Every file kli writes goes through these: the new contents go to a fresh temporary file
 * in the target's directory (a random name, created with O_EXCL|O_NOFOLLOW, so nothing
 * planted there is followed), which is synced and renamed over the target, and the
 * directory is synced. A symbolic link target is followed: the file it names is replaced
 * and the link stays. A target that is not a regular file is refused (KLI_E_IO), except
 * that with KLI_OUTFILE_STREAM a character device or FIFO is written directly. While a
 * file is being written, kli holds an exclusive flock(2) on DIR/.NAME.lock (removed at the
 * end): a second writer of the same target fails at once with KLI_E_IO ("being written by
 * another process") instead of racing. Temporary files that killed writers of the target
 * left behind are removed once the lock is held. */
struct kli_outfile;

#define KLI_OUTFILE_STREAM 1u   /* write a character device or FIFO target in place */

/* @return KLI_OK and *out; KLI_E_IO naming the path (a directory, a device node, a dangling
 *         link, a target locked by another writer, or the open error); KLI_E_NOMEM. */
KLI_API int kli_outfile_open(struct kli_outfile **out, const char *path, unsigned flags,
                             struct kli_err *err);

/* @return the descriptor to write the new contents to (seekable unless streaming). */
KLI_API int kli_outfile_fd(const struct kli_outfile *f);

/* Syncs and renames the new file over the target, then frees f (even on failure).
 * @return KLI_OK or KLI_E_IO. */
KLI_API int kli_outfile_commit(struct kli_outfile *f, struct kli_err *err);

/* Removes the temporary file, releases the lock and frees f. NULL is allowed. */
KLI_API void kli_outfile_abort(struct kli_outfile *f);

/* Opens `path` read-only (close-on-exec) and requires a regular file: a FIFO, device,
 * socket or directory is refused at once, without blocking on a FIFO or reading a device
 * without end. Every model, tokenizer and state file kli reads is opened this way. *size,
 * when not NULL, gets the file's size.
 * @return the descriptor (>= 0), or KLI_E_IO with a message naming the path; when open()
 *         itself failed, errno is left as it set it (ENOENT for a missing file). */
KLI_API int kli_file_open(const char *path, uint64_t *size, struct kli_err *err);

/* Refuses to write `out` over an input: `out` (following links) must be neither `in` nor,
 * when `in` is a directory, a file directly inside it (compared by device and inode, so
 * links and other names of the same file count). Paths that do not exist pass.
 * @return KLI_OK, or KLI_E_INVALID naming both paths. */
KLI_API int kli_output_check(const char *out, const char *in, struct kli_err *err);

/* Reads every weight of a model opened from a .kli file and checks it against the checksum
 * the file records for it (the sections opening needs are checked at open already). Slow:
 * it reads the whole file. A model directory has no checksums: KLI_OK at once.
 * @return KLI_OK; KLI_E_FORMAT naming the damaged tensor. */
KLI_API int kli_model_verify(const struct kli_model *model, kli_progress_fn progress, void *ud,
                             struct kli_err *err);

/* Measures memory bandwidth with a STREAM triad (a[i] = b[i] + s * c[i]) over three arrays
 * of `bytes_per_array` bytes, on the same worker threads the model uses; counts 3 x 4 bytes
 * per element (two reads, one write) like STREAM. @return GB/s (1e9 bytes), or -1 when the
 * arrays cannot be allocated. */
KLI_API double kli_bench_triad(size_t bytes_per_array);

/* Measures read-only memory bandwidth, the ceiling of a decode that streams its weights:
 * sums every 8-byte word of one buffer of `bytes` (rounded down to a multiple of 64 KiB),
 * written first by the worker threads the model uses, which then read it with the same
 * static split; best of five passes. @return GB/s (1e9 bytes), or -1 when the rounded size
 * is 0 or the buffer cannot be allocated. */
KLI_API double kli_bench_read(size_t bytes);

/* @return the number of worker threads in use. */
KLI_API int kli_threads(void);

/* Writes what kli sees of the machine and what it does with it: packages, NUMA nodes, cores
 * and SMT siblings (from hwloc, else sysfs; $KLI_TOPOLOGY="synthetic:pack:2 numa:2 core:8
 * pu:2" or "xml:PATH" describes another machine instead), the workers (count, CPUs, nodes,
 * pinning) and, for an open model, the node of every weight under its NUMA policy and what
 * a check of the pages found.
 * @param model  an open model (its placement is described), or NULL: the machine and the
 *               workers that `opt` (NULL for the defaults) would give.
 * @return the length the full text needs (excluding the NUL), like snprintf; buf receives
 *         at most cap bytes, NUL-terminated. A bad opt->cpus list is described, not
 *         returned as an error. */
KLI_API size_t kli_topology_describe(const struct kli_model *model,
                                     const struct kli_model_options *opt, char *buf, size_t cap);

#ifdef __cplusplus
}
#endif

#endif /* KLI_H */
