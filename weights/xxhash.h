/*
 * xxhash.h - XXH64, the checksum of the .kli format (packed.c) and of the edge cache's
 * re-reads (xcache.c): one shot, or streamed over any split of the input.
 */
#ifndef KLI_XXHASH_H
#define KLI_XXHASH_H

#include <stddef.h>
#include <stdint.h>

/* XXH64 (xxhash.com, spec in the xxHash repository's doc/xxhash_spec.md) of n bytes. */
uint64_t xxh64(const void *p, size_t n, uint64_t seed);

/* The streaming form: init, update with the bytes in order (any split), digest (which
 * leaves the state as it was, so a digest may be taken midway). */
struct xxh64_state {
    uint64_t v[4];
    uint64_t total;
    uint8_t mem[32];
    uint32_t n_mem;
};

void xxh64_init(struct xxh64_state *s, uint64_t seed);
void xxh64_update(struct xxh64_state *s, const void *data, size_t n);
uint64_t xxh64_digest(const struct xxh64_state *s);

#endif /* KLI_XXHASH_H */
