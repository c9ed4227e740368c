/*
 * xxhash.c - Yann Collet's XXH64 (doc/xxhash_spec.md of the xxHash repository): four
 * accumulators over 32-byte stripes, then the tail and an avalanche. About as fast as memory
 * on one core.
 */

#include "config.h"

#include <string.h>

#include "util.h"
#include "xxhash.h"

#define XXH_P1 11400714785074694791ull
#define XXH_P2 14029467366897019727ull
#define XXH_P3 1609587929392839161ull
#define XXH_P4 9650029242287828579ull
#define XXH_P5 2870177450012600261ull

static inline uint64_t
xxh_rotl(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t
xxh_round(uint64_t acc, uint64_t input)
{
    acc += input * XXH_P2;
    acc = xxh_rotl(acc, 31);
    return acc * XXH_P1;
}

static inline uint64_t
xxh_merge(uint64_t acc, uint64_t v)
{
    acc ^= xxh_round(0, v);
    return acc * XXH_P1 + XXH_P4;
}

/* Host-order 64-bit load: XXH64 reads little-endian words, and the readers that check it
 * (packed.c) refuse big-endian hosts before anything is hashed, so memcpy is the LE load. */
static inline uint64_t
xxh_load64(const uint8_t *p)
{
    uint64_t v;

    memcpy(&v, p, 8);
    return v;
}

void
xxh64_init(struct xxh64_state *s, uint64_t seed)
{
    memset(s, 0, sizeof(*s));
    s->v[0] = seed + XXH_P1 + XXH_P2;
    s->v[1] = seed + XXH_P2;
    s->v[2] = seed;
    s->v[3] = seed - XXH_P1;
}

static const uint8_t *
xxh64_stripes(uint64_t v[4], const uint8_t *p, const uint8_t *end)
{
    uint64_t a = v[0], b = v[1], c = v[2], d = v[3];

    while (end - p >= 32) {
        a = xxh_round(a, xxh_load64(p));
        b = xxh_round(b, xxh_load64(p + 8));
        c = xxh_round(c, xxh_load64(p + 16));
        d = xxh_round(d, xxh_load64(p + 24));
        p += 32;
    }
    v[0] = a;
    v[1] = b;
    v[2] = c;
    v[3] = d;
    return p;
}

void
xxh64_update(struct xxh64_state *s, const void *data, size_t n)
{
    const uint8_t *p = data, *end = p + n;

    s->total += n;
    if (s->n_mem + n < 32) {
        if (n > 0)
            memcpy(s->mem + s->n_mem, p, n);
        s->n_mem += (uint32_t)n;
        return;
    }
    if (s->n_mem > 0) {
        uint32_t take = 32 - s->n_mem;

        memcpy(s->mem + s->n_mem, p, take);
        xxh64_stripes(s->v, s->mem, s->mem + 32);
        p += take;
        s->n_mem = 0;
    }
    p = xxh64_stripes(s->v, p, end);
    if (p < end) {
        memcpy(s->mem, p, (size_t)(end - p));
        s->n_mem = (uint32_t)(end - p);
    }
}

uint64_t
xxh64_digest(const struct xxh64_state *s)
{
    const uint8_t *p = s->mem, *end = s->mem + s->n_mem;
    uint64_t h;

    if (s->total >= 32) {
        h = xxh_rotl(s->v[0], 1) + xxh_rotl(s->v[1], 7) + xxh_rotl(s->v[2], 12) +
            xxh_rotl(s->v[3], 18);
        for (int i = 0; i < 4; i++)
            h = xxh_merge(h, s->v[i]);
    } else {
        h = s->v[2] + XXH_P5;   /* v[2] is still the seed */
    }
    h += s->total;
    for (; end - p >= 8; p += 8) {
        h ^= xxh_round(0, xxh_load64(p));
        h = xxh_rotl(h, 27) * XXH_P1 + XXH_P4;
    }
    if (end - p >= 4) {
        h ^= (uint64_t)util_rd32(p) * XXH_P1;
        h = xxh_rotl(h, 23) * XXH_P2 + XXH_P3;
        p += 4;
    }
    for (; p < end; p++) {
        h ^= *p * XXH_P5;
        h = xxh_rotl(h, 11) * XXH_P1;
    }
    h ^= h >> 33;
    h *= XXH_P2;
    h ^= h >> 29;
    h *= XXH_P3;
    h ^= h >> 32;
    return h;
}

uint64_t
xxh64(const void *p, size_t n, uint64_t seed)
{
    struct xxh64_state s;

    xxh64_init(&s, seed);
    xxh64_update(&s, p, n);
    return xxh64_digest(&s);
}
