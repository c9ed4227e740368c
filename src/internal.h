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
 * so that `return err_set(err, KLI_E_FORMAT, "...")` reads naturally. */
int err_set(struct kli_err *err, int code, const char *fmt, ...) KLI_PRINTF(3, 4);

/* A path for a message: its last 96 bytes when it is longer, so that a long path does not
 * push the problem out of the message (the result != path when it was cut). */
const char *err_path_tail(const char *path);

/* The options a public function works with, by kli.h's ABI rule: *dflt holds the defaults
 * (from the struct's _init, `size` first) and gets the members the caller's opt->size
 * covers; the later members keep their defaults. opt NULL: the defaults alone.
 * @return KLI_OK, or KLI_E_INVALID when opt->size is 0 (opt not filled by its _init). */
int opts_take(void *dflt, size_t cap, const void *opt, const char *fn, struct kli_err *err);
/* The options struct `dflt` filled by its _init function `init` and then by opts_take from
 * the caller's `opt`: the options to use (&dflt), or NULL when opt is unusable (err set).
 * `if ((opt = OPTS_TAKE(kli_x_options_init, dflt, opt, "kli_x", err)) == NULL)`. */
#define OPTS_TAKE(init, dflt, opt, fn, err) \
    (init(&(dflt)), opts_take(&(dflt), sizeof(dflt), (opt), (fn), (err)) == KLI_OK ? &(dflt) : NULL)

/* For our own bugs only, never for input validation. On in every build. */
KLI_NORETURN void panic(const char *file, int line, const char *what);
#define KLI_ASSERT(cond) \
    do { if (!(cond)) panic(__FILE__, __LINE__, #cond); } while (0)

/* Overflow-checked allocation; NULL on failure (never exits). */
void *k_malloc(size_t n);
void *k_calloc(size_t n, size_t size);
void *k_mallocarray(size_t n, size_t size);
void *k_reallocarray(void *p, size_t n, size_t size);
/* 64-byte aligned allocation, released with k_free_aligned. */
void *k_malloc_aligned(size_t n);
void k_free_aligned(void *p);
char *k_strdup(const char *s);

/* Several arrays of an object, all sized at create, from one zeroed block: one failure path
 * at create and one free() in the destructor. The code that carves every array in turn runs
 * twice (a function called twice, or a loop of two passes): first over a zeroed struct
 * k_carve, where k_carve returns NULL and only measures; then k_carve_block allocates the
 * block (NULL when out of memory or a size overflowed) and rewinds, and the second run hands
 * the arrays out, each aligned as malloc's. The block is the object's to free(). */
struct k_carve {
    unsigned char *base;   /* NULL while measuring */
    size_t off;
    int over;              /* a size overflowed */
};

void *k_carve(struct k_carve *c, size_t n, size_t size);
void *k_carve_block(struct k_carve *c);

/* Room for one more element in the array p of n elements of `size` bytes, *cap allocated:
 * full, it grows to `first` elements, then by doubling. @return the array, moved or not, or
 * NULL when out of memory (p and *cap as they were). */
void *k_grow(void *p, int32_t n, int32_t *cap, int32_t first, size_t size);

/* The caller's buffer of a describe function (kli_model_describe, kli_topology_describe):
 * text_printf appends as snprintf would, and len counts every byte asked for, also past
 * cap, so that the caller learns the size it needs. In describe.c. */
struct text_buf {
    char *buf;
    size_t cap, len;
};

void text_printf(struct text_buf *t, const char *fmt, ...) KLI_PRINTF(2, 3);

/* What a stat mode that is not a regular file is, in words ("a FIFO", "a directory", ...). */
const char *file_kind(unsigned mode);

/* Whether the regular file `path` begins with the n bytes of `magic` (a FIFO, a directory
 * or an unreadable path does not: the format probes that pick a loader by magic). */
int file_has_magic(const char *path, const void *magic, size_t n);

/* Reads the regular file `path` whole into a NUL-terminated buffer (*buf, freed with free;
 * *len excludes the NUL). A file over `max` bytes is refused before anything is read.
 * @return KLI_OK, KLI_E_IO (as kli_file_open, or a read error), KLI_E_RANGE (over max) or
 *         KLI_E_NOMEM, with a message naming the path. */
int file_read(const char *path, uint64_t max, char **buf, size_t *len, struct kli_err *err);

/* Memory for many long-lived blocks freed together (the weights converted at open): carved
 * 64-byte aligned from chunks of at least KLI_ARENA_CHUNK bytes that start on 2 MiB
 * boundaries and are advised MADV_HUGEPAGE, so that what the decode streams is read
 * through 2 MiB TLB entries (see weights/mmap.c). A zeroed struct is an empty arena. */
#define KLI_ARENA_CHUNK ((size_t)64 << 20)

struct k_arena_chunk {
    uint8_t *base;         /* from map_huge: on a 2 MiB boundary */
    size_t len, used;
};

struct arena {
    struct k_arena_chunk *c;
    int32_t n, cap;
};

/* @return n bytes (64-byte aligned, contents unspecified), or NULL when out of memory. */
void *arena_alloc(struct arena *a, size_t n);
/* Releases every block; leaves the arena empty. */
void arena_free(struct arena *a);

#endif /* KLI_INTERNAL_H */
