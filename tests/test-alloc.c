/*
 * test-alloc.c - the checked allocators and the arena that holds the weights converted at
 * open (src/alloc.c): overflow gives NULL, not a short block; arena blocks are 64-byte
 * aligned, disjoint and keep what was written in them, chunks start on 2 MiB boundaries,
 * a block larger than a chunk gets a chunk of its own, and freeing empties the arena. k_carve
 * hands out zeroed, aligned, disjoint arrays of one block; k_grow doubles.
 */
#include "config.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "tap.h"
#include "testlib.h"

#define HUGE_PAGE ((uintptr_t)2 << 20)

static void
test_checked(void)
{
    void *p = k_mallocarray(SIZE_MAX / 2, 3);
    void *q = k_malloc_aligned(SIZE_MAX - 10);

    ok(p == NULL && q == NULL, "n x size past SIZE_MAX and an aligned SIZE_MAX - 10 give NULL");
    p = k_malloc_aligned(100);
    ok(p != NULL && (uintptr_t)p % 64 == 0, "k_malloc_aligned is 64-byte aligned");
    k_free_aligned(p);
}

static void
test_arena(void)
{
    /* sizes: odd, tiny, zero, one that fills most of a chunk, one over a chunk */
    static const size_t want[] = {1, 100, 0, 4097, 3 << 20, KLI_ARENA_CHUNK - 4096,
                                  KLI_ARENA_CHUNK + 12345, 65, 7 << 20};
    enum { N = sizeof(want) / sizeof(want[0]) };
    struct arena a;
    uint8_t *p[N];
    int aligned = 1, disjoint = 1, kept = 1, all = 1;

    memset(&a, 0, sizeof(a));
    for (int i = 0; i < N; i++) {
        p[i] = arena_alloc(&a, want[i]);
        all &= p[i] != NULL;
        if (p[i] == NULL)
            continue;
        aligned &= (uintptr_t)p[i] % 64 == 0;
        memset(p[i], i + 1, want[i]);
    }
    ok(all, "every block is given");
    ok(aligned, "every block is 64-byte aligned");
    for (int i = 0; i < N && all; i++) {
        for (size_t j = 0; j < want[i]; j++)
            kept &= p[i][j] == (uint8_t)(i + 1);
        for (int k = 0; k < N; k++) {
            uintptr_t a0 = (uintptr_t)p[i], a1 = a0 + want[i];
            uintptr_t b0 = (uintptr_t)p[k], b1 = b0 + want[k];

            if (k != i && want[i] && want[k] && a0 < b1 && b0 < a1)
                disjoint = 0;
        }
    }
    ok(disjoint && kept, "blocks are disjoint and keep their bytes");
    int chunks_ok = a.n >= 2;
    for (int i = 0; i < a.n; i++)
        chunks_ok &= (uintptr_t)a.c[i].base % HUGE_PAGE == 0 && a.c[i].len % HUGE_PAGE == 0 &&
                     a.c[i].used <= a.c[i].len && a.c[i].len >= KLI_ARENA_CHUNK;
    ok(chunks_ok, "%d chunks, each on a 2 MiB boundary, a multiple of 2 MiB long, at least "
       "KLI_ARENA_CHUNK", a.n);
    int own = 0;
    for (int i = 0; i < a.n; i++)
        own |= a.c[i].len >= KLI_ARENA_CHUNK + 12345 && a.c[i].used >= KLI_ARENA_CHUNK + 12345;
    ok(own, "the block over a chunk got a chunk that holds it");
    ok(arena_alloc(&a, SIZE_MAX - 8) == NULL, "a block of SIZE_MAX - 8 bytes is refused");
    arena_free(&a);
    ok(a.n == 0 && a.c == NULL, "freeing empties the arena");
    p[0] = arena_alloc(&a, 10);
    ok(p[0] != NULL && a.n == 1, "and it can be used again");
    arena_free(&a);
}

/* Three arrays of odd sizes from one block, as a constructor takes them. */
static void
carve3(struct k_carve *cv, size_t n, char **a, double **b, int32_t **c)
{
    *a = k_carve(cv, 3, 1);
    *b = k_carve(cv, n, sizeof(**b));
    *c = k_carve(cv, 5, sizeof(**c));
}

static void
test_carve(void)
{
    struct k_carve cv = {0}, over = {0};
    char *a;
    double *b;
    int32_t *c;
    int zero = 1;

    carve3(&cv, 7, &a, &b, &c);
    ok(a == NULL && b == NULL && c == NULL, "the measuring pass hands out nothing");
    void *mem = k_carve_block(&cv);
    carve3(&cv, 7, &a, &b, &c);
    for (int i = 0; i < 3; i++)
        zero &= a[i] == 0;
    for (int i = 0; i < 7; i++)
        zero &= b[i] == 0.0;
    for (int i = 0; i < 5; i++)
        zero &= c[i] == 0;
    ok(mem != NULL && (void *)a == mem && zero, "the arrays are zeroed, the first at the block");
    ok((uintptr_t)b % _Alignof(max_align_t) == 0 && (uintptr_t)c % _Alignof(max_align_t) == 0 &&
       (char *)b >= a + 3 && (char *)c >= (char *)(b + 7), "aligned as malloc's and disjoint");
    free(mem);
    k_carve(&over, 8, 1);
    k_carve(&over, SIZE_MAX / 2, 4);
    ok(k_carve_block(&over) == NULL, "a size past SIZE_MAX gives no block");
}

static void
test_grow(void)
{
    int32_t *p = NULL, cap = 0, caps[40];
    int good = 1;

    for (int32_t n = 0; n < 40; n++) {
        int32_t *np = k_grow(p, n, &cap, 4, sizeof(*p));
        good &= np != NULL;
        if (np == NULL)
            break;
        p = np;
        p[n] = n;
        caps[n] = cap;
    }
    for (int32_t n = 0; good && n < 40; n++)
        good &= p[n] == n;
    ok(good && caps[0] == 4 && caps[4] == 8 && caps[8] == 16 && caps[39] == 64,
       "k_grow: 4, then doubling, the contents kept");
    free(p);
}

static const struct tap_fn cases[] = {
    {"checked", test_checked},
    {"arena", test_arena},
    {"carve", test_carve},
    {"grow", test_grow},
};

TAP_MAIN(cases)
