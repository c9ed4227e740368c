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

/* The declarations are public: they live in kli.h. */

/* Internal, for tests only (not part of the public API): a kli_tokenize() flag that makes
 * PCRE2 split every piece, bypassing the ASCII fast path, so that tests can compare the two. */
#define TOKENIZER_PCRE2_ONLY (1 << 30)

#endif /* KLI_TOKENIZER_H */
