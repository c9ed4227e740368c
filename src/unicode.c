/*
 * unicode.c - UTF-8 decoding and validation, and Python's isspace.
 *
 * The split pattern itself (letters, numbers, Han, ...) is matched by PCRE2 in tokenizer.c;
 * this file only has what the tokenizer needs around it: checking that input is valid UTF-8
 * (tiktoken takes a Python str, so nothing else can reach it), walking characters to count
 * them, and the isspace() that tokenization_kimi.py uses to cut long runs.
 */
#include "config.h"

#include <string.h>

#include "unicode.h"

/*
 * The range a sequence's second byte must fall in, by lead byte; this is where overlongs
 * (E0 80..9F, F0 80..8F), surrogates (ED A0..BF) and values above U+10FFFF (F4 90..BF) are
 * excluded. Later continuation bytes are always 80..BF.
 */
static int
unicode_seq_len(unsigned char b, unsigned char *lo, unsigned char *hi)
{
    *lo = 0x80;
    *hi = 0xBF;
    if (b < 0x80)
        return 1;
    if (b < 0xC2)
        return 0;             /* continuation byte, or overlong C0/C1 lead */
    if (b < 0xE0)
        return 2;
    if (b < 0xF0) {
        if (b == 0xE0)
            *lo = 0xA0;
        else if (b == 0xED)
            *hi = 0x9F;
        return 3;
    }
    if (b < 0xF5) {
        if (b == 0xF0)
            *lo = 0x90;
        else if (b == 0xF4)
            *hi = 0x8F;
        return 4;
    }
    return 0;
}

size_t
unicode_decode(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned char lo, hi;
    uint32_t c;
    int len, i;

    if (n == 0)
        return 0;
    len = unicode_seq_len(s[0], &lo, &hi);
    if (len == 0 || (size_t)len > n)
        return 0;
    if (len == 1) {
        *cp = s[0];
        return 1;
    }
    if (s[1] < lo || s[1] > hi)
        return 0;
    c = s[0] & (0x7F >> len);
    for (i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        c = (c << 6) | (s[i] & 0x3F);
    }
    *cp = c;
    return (size_t)len;
}

size_t
unicode_valid_prefix(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    uint32_t cp;

    while (i < n) {
        /* ASCII text is the common case: skip it eight bytes at a time. */
        while (n - i >= 8) {
            uint64_t w;

            memcpy(&w, p + i, 8);
            if (w & UINT64_C(0x8080808080808080))
                break;
            i += 8;
        }
        if (i >= n)
            break;
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        size_t len = unicode_decode(p + i, n - i, &cp);
        if (len == 0)
            return i;
        i += len;
    }
    return n;
}

int
unicode_isspace(uint32_t cp)
{
    if (cp < 0x80)
        return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20);
    if (cp < 0x1680)
        return cp == 0x85 || cp == 0xA0;
    if (cp >= 0x2000 && cp <= 0x200A)
        return 1;
    switch (cp) {
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
        return 1;
    default:
        return 0;
    }
}

size_t
kli_utf8_complete_prefix(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    unsigned char lo, hi;
    size_t k;

    /* An incomplete sequence is a lead byte followed by at most 2 continuation bytes, so the
     * last lead byte is looked for among the last 3 bytes only. */
    for (k = 1; k <= 3 && k <= n; k++) {
        unsigned char b = p[n - k];
        int len;

        if ((b & 0xC0) == 0x80)
            continue;
        len = unicode_seq_len(b, &lo, &hi);
        if ((size_t)len <= k)
            return n;       /* ASCII, an impossible lead, or a sequence with all its bytes */
        /* Held back only if the bytes so far can still become a valid sequence. */
        if (k >= 2 && (p[n - k + 1] < lo || p[n - k + 1] > hi))
            return n;
        return n - k;
    }
    return n;
}
