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

/* kli_tokenizer_open from memory: the texts of tiktoken.model (`ranks`) and of
 * tokenizer_config.json (`config`, NULL when there is none), as a .kli file holds them.
 * They are copied. `name` stands for the files in messages. Same results as the files. */
int tokenizer_open_mem(struct kli_tokenizer **out, const char *ranks, size_t ranks_len,
                       const char *config, size_t config_len, const char *name,
                       struct kli_err *err);

/* The tokens that end generation, for kli_generate and the scheduler: the model's `eos`,
 * <|im_end|> and [EOS]; one that is absent is -1. In tokenizer_load.c. */
#define TOKENIZER_N_ENDS 3
void tokenizer_end_tokens(const struct kli_tokenizer *t, kli_token eos,
                          kli_token ends[TOKENIZER_N_ENDS]);

/* Internal, for tests only (not part of the public API): a kli_tokenize() flag that makes
 * PCRE2 split every piece, bypassing the ASCII fast path, so that tests can compare the two. */
#define TOKENIZER_PCRE2_ONLY (1 << 30)

#endif /* KLI_TOKENIZER_H */
