/*
 * alloc.c - checked allocators. They return NULL on failure or overflow and never exit;
 * callers turn NULL into KLI_E_NOMEM with a message.
 */
#include "config.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "internal.h"
#include "mmap.h"

void *
k_malloc(size_t n)
{
    return malloc(n == 0 ? 1 : n);
}

void *
k_calloc(size_t n, size_t size)
{
    if (n == 0 || size == 0)
        return calloc(1, 1);
    return calloc(n, size);
}

void *
k_mallocarray(size_t n, size_t size)
{
    if (size != 0 && n > SIZE_MAX / size)
        return NULL;
    return k_malloc(n * size);
}

void *
k_reallocarray(void *p, size_t n, size_t size)
{
    if (size != 0 && n > SIZE_MAX / size)
        return NULL;
    return realloc(p, n * size == 0 ? 1 : n * size);
}

void *
k_malloc_aligned(size_t n)
{
    void *p = NULL;

    if (n > SIZE_MAX - 64)
        return NULL;
    n = (n + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, n == 0 ? 64 : n) != 0)
        return NULL;
    return p;
}

void
k_free_aligned(void *p)
{
    free(p);
}

char *
k_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = k_malloc(n);

    if (d != NULL)
        memcpy(d, s, n);
    return d;
}

void *
k_carve(struct k_carve *c, size_t n, size_t size)
{
    const size_t align = _Alignof(max_align_t);
    size_t at = (c->off + align - 1) & ~(align - 1);

    if (at < c->off || (size != 0 && n > SIZE_MAX / size) || n * size > SIZE_MAX - at) {
        c->over = 1;
        return NULL;
    }
    c->off = at + n * size;
    return c->base == NULL ? NULL : c->base + at;
}

void *
k_carve_block(struct k_carve *c)
{
    if (c->over)
        return NULL;
    c->base = k_calloc(1, c->off);
    c->off = 0;
    return c->base;
}

void *
k_grow(void *p, int32_t n, int32_t *cap, int32_t first, size_t size)
{
    if (n < *cap)
        return p;
    int32_t nc = *cap > 0 ? 2 * *cap : first;
    void *np = k_reallocarray(p, (size_t)nc, size);
    if (np != NULL)
        *cap = nc;
    return np;
}

/* A chunk of at least n bytes, a multiple of 2 MiB long, from map_huge. */
static int
arena_chunk(struct k_arena_chunk *c, size_t n)
{
    size_t len = n > KLI_ARENA_CHUNK ? n : KLI_ARENA_CHUNK;
    void *p;

    if (len > SIZE_MAX - KLI_HUGE_PAGE)
        return -1;
    len = (len + KLI_HUGE_PAGE - 1) / KLI_HUGE_PAGE * KLI_HUGE_PAGE;
    if ((p = map_huge(-1, len, PROT_READ | PROT_WRITE)) == MAP_FAILED)
        return -1;
    c->base = p;
    c->len = len;
    c->used = 0;
    return 0;
}

void *
arena_alloc(struct arena *a, size_t n)
{
    struct k_arena_chunk *c = a->n > 0 ? &a->c[a->n - 1] : NULL;

    if (n > SIZE_MAX - 64)
        return NULL;
    n = n == 0 ? 64 : (n + 63) & ~(size_t)63;
    if (c == NULL || c->len - c->used < n) {
        struct k_arena_chunk *g = k_grow(a->c, a->n, &a->cap, 16, sizeof(*g));

        if (g == NULL)
            return NULL;
        a->c = g;
        c = &a->c[a->n];
        if (arena_chunk(c, n) != 0)
            return NULL;
        a->n++;
    }
    void *p = c->base + c->used;
    c->used += n;
    return p;
}

void
arena_free(struct arena *a)
{
    for (int i = 0; i < a->n; i++)
        munmap(a->c[i].base, a->c[i].len);
    free(a->c);
    memset(a, 0, sizeof(*a));
}
