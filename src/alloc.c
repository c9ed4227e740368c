/*
 * alloc.c - checked allocators. They return NULL on failure or overflow and never exit;
 * callers turn NULL into KLI_E_NOMEM with a message.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

void *
kli_malloc(size_t n)
{
    return malloc(n == 0 ? 1 : n);
}

void *
kli_calloc(size_t n, size_t size)
{
    if (n == 0 || size == 0)
        return calloc(1, 1);
    return calloc(n, size);
}

void *
kli_mallocarray(size_t n, size_t size)
{
    if (size != 0 && n > SIZE_MAX / size)
        return NULL;
    return kli_malloc(n * size);
}

void *
kli_reallocarray(void *p, size_t n, size_t size)
{
    if (size != 0 && n > SIZE_MAX / size)
        return NULL;
    return realloc(p, n * size == 0 ? 1 : n * size);
}

void *
kli_malloc_aligned(size_t n)
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
kli_free_aligned(void *p)
{
    free(p);
}

char *
kli_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = kli_malloc(n);

    if (d != NULL)
        memcpy(d, s, n);
    return d;
}
