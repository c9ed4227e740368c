/*
 * internal.h - small shared internals of libkli: error setting, assertions, checked
 * allocation. Nothing model-specific lives here.
 */
#ifndef KLI_INTERNAL_H
#define KLI_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "kli.h"

#define KLI_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#if defined(__GNUC__)
#define KLI_PRINTF(f, a) __attribute__((format(printf, f, a)))
#define KLI_NORETURN __attribute__((noreturn))
#else
#define KLI_PRINTF(f, a)
#define KLI_NORETURN
#endif

/* Sets `err` (if not NULL and not already set: the first error wins) and returns `code`,
 * so that `return kli_err_set(err, KLI_E_FORMAT, "...")` reads naturally. */
int kli_err_set(struct kli_err *err, int code, const char *fmt, ...) KLI_PRINTF(3, 4);

/* For our own bugs only, never for input validation. On in every build. */
KLI_NORETURN void kli_panic(const char *file, int line, const char *what);
#define KLI_ASSERT(cond) \
    do { if (!(cond)) kli_panic(__FILE__, __LINE__, #cond); } while (0)

/* Overflow-checked allocation; NULL on failure (never exits). */
void *kli_malloc(size_t n);
void *kli_calloc(size_t n, size_t size);
void *kli_mallocarray(size_t n, size_t size);
void *kli_reallocarray(void *p, size_t n, size_t size);
/* 64-byte aligned allocation, released with kli_free_aligned. */
void *kli_malloc_aligned(size_t n);
void kli_free_aligned(void *p);
char *kli_strdup(const char *s);

#endif /* KLI_INTERNAL_H */
