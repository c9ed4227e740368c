/*
 * unicode.h - UTF-8 decoding and validation, and the character classes the tokenizer needs
 * outside its split pattern.
 *
 * "Valid UTF-8" here is the strict definition of RFC 3629 (the one Python's str enforces):
 * no overlong forms, no surrogates (U+D800..U+DFFF), nothing above U+10FFFF.
 */
#ifndef KLI_UNICODE_H
#define KLI_UNICODE_H

#include <stddef.h>
#include <stdint.h>

/* Decodes the code point at the start of `s` (n bytes available).
 * @return its length in bytes (1..4) with *cp set, or 0 when the bytes at `s` are not a
 *         complete valid UTF-8 sequence (also when n is 0); *cp is then untouched. */
size_t unicode_decode(const unsigned char *s, size_t n, uint32_t *cp);

/* @return the length of the longest valid UTF-8 prefix of s[0..n): n when all of it is valid,
 *         else the byte offset of the first byte that does not start a valid sequence. */
size_t unicode_valid_prefix(const char *s, size_t n);

/* @return non-zero iff Python's str.isspace() is true for the one-character string `cp`
 *         (bidirectional class WS, B or S, or general category Zs; unlike the Unicode
 *         White_Space property it includes U+001C..U+001F). */
int unicode_isspace(uint32_t cp);

/* kli_utf8_complete_prefix, the streaming helper, is part of the API: kli.h declares it
 * (KLI_API), so that its definition here is exported. */
#include "kli.h"

#endif /* KLI_UNICODE_H */
