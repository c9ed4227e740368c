/*
 * testlib.h - what the C tests share: where the fixtures are, a seeded random source,
 * the relative error every numeric test states its tolerance in, and a few allocation and
 * file helpers that bail out (TAP "Bail out!") instead of returning failure.
 *
 * The fixtures: $KLI_TESTDATA when set, else tests/data of the source tree the test was
 * built from (compiled in), so a test binary runs by hand from anywhere.
 */
#ifndef KLI_TESTLIB_H
#define KLI_TESTLIB_H

#include <stddef.h>
#include <stdint.h>

#include "kli.h"

/* The fixture directory: $KLI_TESTDATA, else the source tree's tests/data. Never NULL. */
const char *tl_data(void);

/* Writes "<tl_data()>/<rel>" into buf (cap bytes); bails out when it does not fit. */
char *tl_path(char *buf, size_t cap, const char *rel);

/* xorshift64 (13, 7, 17): the next value of *state (which must not be 0). */
uint64_t tl_xorshift(uint64_t *state);

/* SplitMix64: the next value of the counter *state. */
uint64_t tl_splitmix(uint64_t *state);

/* The top 53 bits of a 64-bit draw as a double in [0, 1). */
double tl_unit(uint64_t bits);

/* From xorshift64: uniform in (0, 1) (never 0, so log() is safe), and standard normal
 * (Box-Muller, one value per two uniforms). */
double tl_unif(uint64_t *state);
double tl_normal(uint64_t *state);

/* ||a - b|| / ||b|| in double. +inf when a value of a or b is not finite; when b is all
 * zeros, 0 if a is too and +inf otherwise. tl_rel_l2_d takes a double reference. */
double tl_rel_l2(const float *a, const float *b, int64_t n);
double tl_rel_l2_d(const float *a, const double *b, int64_t n);

/* The index of the largest of x[0, n) (n > 0), the lowest one on ties: the greedy token of a
 * row of logits. */
int32_t tl_argmax(const float *x, int32_t n);

/* malloc / calloc that bail out when memory runs out (a zero size still gives a pointer). */
void *tl_malloc(size_t n);
void *tl_calloc(size_t n, size_t size);

/* The whole file, NUL-terminated (len excludes the NUL); NULL when it cannot be read. */
char *tl_slurp(const char *path, size_t *len);

/* Writes the n bytes at p to path (created or truncated); 1 when all of them were written and
 * the file closed, else 0. */
int tl_spill(const char *path, const void *p, size_t n);

/* For the large-file writer tests: n bytes of a fixed pattern (tl_malloc'd; bails out when
 * memory runs out), and tl_feed, which hands the n bytes at src to write(ctx, ...) in odd-sized
 * pieces (1 byte to 9 MiB, cycled) so that the writer's buffer flushes fall inside calls.
 * tl_feed @return KLI_OK, or the first error of write (err filled by it). */
uint8_t *tl_pattern(size_t n);
int tl_feed(int (*write)(void *ctx, const void *p, uint64_t n, struct kli_err *err), void *ctx,
            const uint8_t *src, size_t n, struct kli_err *err);

/* For the on_text callbacks that collect generated text: appends the n bytes at t to buf (cap
 * bytes, *len of them used) when they fit with a byte to spare (for a terminating NUL, which
 * the caller writes if it wants one); else leaves buf alone. 1 when appended. */
int tl_append(char *buf, size_t cap, size_t *len, const char *t, size_t n);

/* Exactly `count` float32 values (the host is assumed little-endian) of the file dir/name;
 * bails out when the file is missing or of another size. */
float *tl_load_f32(const char *dir, const char *name, size_t count);

/* The JSON file dir/name parsed (cJSON_Delete it); bails out when it cannot be read or
 * parsed. */
struct cJSON *tl_load_json(const char *dir, const char *name);

/* A session of m with these options (0: the default); bails out on failure. */
struct kli_session *tl_session(struct kli_model *m, int32_t ctx_max, int32_t batch_max,
                               int32_t cache_type);
/* Feeds the n tokens first, first + step, first + 2 step, ... to the sessions a and b (of
 * one model) one at a time; 1 when every eval succeeds and their logits agree bit for bit
 * after each. */
int tl_same_future(struct kli_session *a, struct kli_session *b, int n, kli_token first,
                   kli_token step);

/* Opens the fixture model tl_data()/name with n_threads threads; bails out on failure. */
struct kli_model *tl_open_model(const char *name, int n_threads);
/* The same with the options `opt` (NULL: the defaults). */
struct kli_model *tl_open_model_opts(const char *name, const struct kli_model_options *opt);

/* Removes the directory dir and everything in it (rm -rf). @return 0, or -1 when that
 * failed. */
int tl_rmtree(const char *dir);

/* The logits [n][V] of ids fed to a fresh session of m in calls of `chunk` tokens (0: all in
 * one call). NULL on failure, err filled. */
float *tl_logits(struct kli_model *m, const kli_token *ids, int n, int chunk,
                 struct kli_err *err);

/* tl_logits in one call of the model at path, opened with weight_type (NULL: as stored);
 * *V receives its vocabulary size. NULL on failure (with a TAP diagnostic). */
float *tl_logits_of(const char *path, const char *weight_type, const kli_token *ids, int n,
                    int32_t *V);

/* The models at a and b, each opened with its weight type (NULL: as stored), given the same
 * n ids by tl_logits_of: tl_logits_rel_l2 is tl_rel_l2 of a's logits against b's (+inf when
 * either has none or the vocabularies differ), tl_same_logits 1 when both have logits and
 * they are equal bit for bit. */
double tl_logits_rel_l2(const char *a, const char *wa, const char *b, const char *wb,
                        const kli_token *ids, int n);
int tl_same_logits(const char *a, const char *wa, const char *b, const char *wb,
                   const kli_token *ids, int n);

#endif
