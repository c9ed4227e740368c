/*
 * util.h - the few helpers every part of kli needs once: little-endian loads and stores,
 * the host's byte order, FNV-1a-64, a monotonic clock, a growing text buffer, a string search
 * in counted bytes and the median of doubles.
 *
 * Header-only (static inline, nothing to link, no state), so the library, weights/ and the
 * CLI may all include it without depending on each other (tests/test-deps.sh allows it).
 * XXH64, which is more than a few lines, lives in weights/xxhash.c.
 */
#ifndef KLI_UTIL_H
#define KLI_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ==== little-endian I/O ==================================================================== */

/* 1 on a little-endian host. The file formats are little-endian; a reader that maps words
 * in place (packed.c, snapshot.c) uses this to refuse or convert on any other host. */
static inline int
util_host_le(void)
{
    const uint32_t one = 1;
    uint8_t b;

    memcpy(&b, &one, 1);
    return b == 1;
}

static inline uint16_t
util_rd16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static inline uint32_t
util_rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t
util_rd64(const uint8_t *p)
{
    return (uint64_t)util_rd32(p) | (uint64_t)util_rd32(p + 4) << 32;
}

static inline void
util_wr16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline void
util_wr32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void
util_wr64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* ==== FNV-1a-64 ============================================================================
 * Continue a hash with util_fnv1a(h, ...), start one from UTIL_FNV_BASIS. Not a checksum
 * against an adversary: a name for a model, a key for a table. */

#define UTIL_FNV_BASIS 0xcbf29ce484222325ull
#define UTIL_FNV_PRIME 0x100000001b3ull

static inline uint64_t
util_fnv1a(uint64_t h, const void *p, size_t n)
{
    const uint8_t *b = p;

    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * UTIL_FNV_PRIME;
    return h;
}

/* ==== monotonic clock ====================================================================== */

/* Nanoseconds on CLOCK_MONOTONIC: for deadlines and spin limits. */
static inline int64_t
util_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Seconds on CLOCK_MONOTONIC: for timings that are printed. */
static inline double
util_now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Appends len bytes to the NUL-terminated text *buf (*n bytes long, *cap allocated, NULL and
 * 0 at first), growing it to twice what it needs when full.
 * @return 0, or -1 when out of memory (the text is left as it was). */
static inline int
util_text_add(char **buf, size_t *n, size_t *cap, const void *p, size_t len)
{
    if (*n + len + 1 > *cap) {
        size_t nc = (*n + len + 1) * 2;
        char *nb = realloc(*buf, nc);
        if (nb == NULL)
            return -1;
        *buf = nb;
        *cap = nc;
    }
    if (len > 0)
        memcpy(*buf + *n, p, len);
    *n += len;
    (*buf)[*n] = '\0';
    return 0;
}

/* The first occurrence of the NUL-terminated `needle` (not empty) in s[0..n), which may hold
 * NUL bytes (memmem, which C11 lacks). @return it, or NULL. */
static inline const char *
util_find(const char *s, size_t n, const char *needle)
{
    size_t k = strlen(needle);

    for (size_t i = 0; k <= n && i <= n - k; i++) {
        if (s[i] == needle[0] && memcmp(s + i, needle, k) == 0)
            return s + i;
    }
    return NULL;
}

/* ==== order statistics ==================================================================== */

/* qsort's comparison of two doubles, ascending. */
static inline int
util_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

/* Sorts v[n] (n > 0) ascending, in place. @return the median: the middle value, or with n
 * even the mean of the middle two. */
static inline double
util_median(double *v, size_t n)
{
    qsort(v, n, sizeof(double), util_cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#endif /* KLI_UTIL_H */
