/*
 * tokenizer.h - Kimi's tiktoken BPE tokenizer: encode text to token ids and back.
 *
 * These declarations are public API (they are meant to move into kli.h as they stand).
 * The tokenizer reproduces tokenization_kimi.py's TikTokenTokenizer.encode() byte for byte:
 * the text is cut into 400,000-character pieces, each piece where a run of whitespace or of
 * non-whitespace characters would exceed 25,000, and every resulting chunk is encoded on its
 * own by tiktoken's algorithm (optional special-token matching, the Kimi split pattern, then
 * byte-pair merging by rank). No BOS or EOS is ever added.
 *
 * Thread safety: a kli_tokenizer is immutable once open; any number of threads may call the
 * functions below on the same tokenizer at the same time.
 */
#ifndef KLI_TOKENIZER_H
#define KLI_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "kli.h"

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
 * tokenizer_config.json every slot is unnamed.
 * @return KLI_OK; KLI_E_IO if a file cannot be read; KLI_E_FORMAT with the file and line at
 *         fault; KLI_E_NOMEM; KLI_E_INVALID for NULL arguments. On failure *out is NULL.
 *         On success the caller owns *out and releases it with kli_tokenizer_close(). */
int kli_tokenizer_open(struct kli_tokenizer **out, const char *dir, struct kli_err *err);

/* Releases a tokenizer. NULL is allowed. */
void kli_tokenizer_close(struct kli_tokenizer *t);

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
int64_t kli_tokenize(const struct kli_tokenizer *t, const char *text, size_t len, int flags,
                     kli_token *out, int64_t cap, struct kli_err *err);

/* Decodes `n` token ids to the concatenation of their bytes (a special id gives its name).
 * The result is raw bytes: it is not NUL-terminated, and it may end inside a UTF-8 character
 * or contain invalid UTF-8 (see kli_utf8_complete_prefix() for streaming).
 * @param out  receives the first min(cap, result) bytes; may be NULL when cap is 0.
 * @return the number of bytes the whole decoding needs (retry with that much room when it
 *         exceeds `cap`); KLI_E_RANGE if an id is outside [0, n_vocab), naming its index;
 *         KLI_E_INVALID for bad arguments. */
int64_t kli_detokenize(const struct kli_tokenizer *t, const kli_token *ids, int64_t n,
                       char *out, int64_t cap, struct kli_err *err);

/* @return the bytes of token `id` (a special token's name for special ids) and their count in
 *         *len (when len is not NULL); NULL (and *len 0) if id is outside [0, n_vocab).
 *         Borrowed: valid while the tokenizer is open. The bytes are followed by a NUL for
 *         convenience, but may themselves contain NUL (the token of byte 0x00). */
const char *kli_token_bytes(const struct kli_tokenizer *t, kli_token id, size_t *len);

/* @return the number of token ids: n_base + the special slots (256 or 258). */
int32_t kli_tokenizer_n_vocab(const struct kli_tokenizer *t);

/* @return the number of BPE ranks in tiktoken.model; the first special id. */
int32_t kli_tokenizer_n_base(const struct kli_tokenizer *t);

/* @return the id of the special token called `name` (e.g. "<|im_end|>", or a reserved name
 *         such as "<|reserved_token_163600|>"), or -1 if no special slot has that name. */
kli_token kli_tokenizer_find_special(const struct kli_tokenizer *t, const char *name);

#endif /* KLI_TOKENIZER_H */
