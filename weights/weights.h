/*
 * weights.h - a format-neutral directory of stored tensors.
 *
 * A wfile is one checkpoint: a single safetensors file, or a sharded Hugging Face
 * checkpoint (model.safetensors.index.json + its shards). Every file is memory-mapped
 * read-only; tensor data pointers point into the mappings (no copy) and stay valid until
 * wfile_close. Opening checks every header offset and size against its file, so a
 * tensor returned here can be read in full without going out of bounds.
 *
 * This directory knows nothing about models: names are the checkpoint's own.
 */
#ifndef KLI_WEIGHTS_H
#define KLI_WEIGHTS_H

#include <stddef.h>
#include <stdint.h>

#include "kli.h"
#include "dtype.h"
#include "xxhash.h"

#define KLI_MAX_DIMS 8

struct tensor_desc {
    const char *name;              /* the checkpoint's name, NUL-terminated */
    enum k_dtype dtype;
    char dtype_name[16];           /* as written in the file ("BF16", "I8", ...) */
    int32_t ndim;                  /* 0 for a scalar */
    int64_t shape[KLI_MAX_DIMS];   /* outermost first (PyTorch order) */
    int64_t numel;
    const void *data;              /* into the mapping; aligned only as the file aligns it */
    uint64_t nbytes;
    int32_t file;                  /* index of the shard that holds it */
};

struct wfile;

/* Opens `path`: a directory (model.safetensors.index.json if present, else
 * model.safetensors) or a single .safetensors file.
 * @return KLI_OK, or KLI_E_IO / KLI_E_FORMAT / KLI_E_NOMEM with a message naming the file
 *         (and tensor) at fault. */
int wfile_open(struct wfile **out, const char *path, struct kli_err *err);
void wfile_close(struct wfile *w);

/* @return the tensor called `name`, or NULL. */
const struct tensor_desc *wfile_find(const struct wfile *w, const char *name);
int64_t wfile_n_tensors(const struct wfile *w);
const struct tensor_desc *wfile_tensor(const struct wfile *w, int64_t i);
/* @return i such that wfile_tensor(w, i) == d, for d from this wfile (constant time). */
int64_t wfile_index(const struct wfile *w, const struct tensor_desc *d);
/* Total bytes of tensor data. */
uint64_t wfile_data_bytes(const struct wfile *w);

/* Parses one safetensors image held in memory (`base`, `size` bytes): the header length,
 * the JSON header and every tensor's bounds. Used by wfile_open and by the fuzzer.
 * On success the descriptors (appended to *descs, *n growing) point into `base`. */
int safetensors_parse(const uint8_t *base, uint64_t size, const char *fname, int32_t file,
                          struct tensor_desc **descs, int64_t *n, int64_t *cap,
                          struct kli_err *err);

/* Descriptor names are heap copies owned by whoever owns the array: safetensors_parse
 * allocates them, and on failure it frees the ones it added and restores *n (*descs may
 * have grown). This frees `n` names and the array itself. NULL is allowed. */
void safetensors_free_descs(struct tensor_desc *descs, int64_t n);

/* The files behind a wfile: one for a single file, one per shard (in the order of
 * tensor_desc.file) for a sharded checkpoint. For messages that name the file.
 * @return the path as opened, or NULL if i is out of range. */
int32_t wfile_n_files(const struct wfile *w);
const char *wfile_file_path(const struct wfile *w, int32_t i);

/* Where the byte at `p` (a pointer into one of w's mappings, such as a tensor's data) lies:
 * the file index (wfile_file_path) and the offset in that file. For readers that pread
 * tensor bytes instead of touching the mapping (edge mode, xcache.c).
 * @return 0, or -1 if p is not inside any mapping. */
int wfile_locate(const struct wfile *w, const void *p, int32_t *file, uint64_t *off);

/* ==== writing safetensors ==================================================================
 * A streaming writer: the tensor list is declared up front (so the header can be written
 * first), then each tensor's bytes are appended in that order. The file is written through
 * kli_outfile (kli.h): a temporary file renamed over PATH only by a successful
 * st_writer_close, so an interrupted run never leaves a half-written file under the
 * final name, and a second writer of PATH fails while one is at work. */

struct st_entry {
    const char *name;
    const char *dtype;            /* safetensors dtype string: "BF16", "F32", "KLI_Q8_0", ... */
    int32_t ndim;
    int64_t shape[KLI_MAX_DIMS];
    uint64_t nbytes;
};

struct st_writer;

int st_writer_open(struct st_writer **out, const char *path,
                       const struct st_entry *entries, int64_t n, struct kli_err *err);
/* The same with n_meta more "__metadata__" entries: meta_kv[2i] = meta_kv[2i + 1]. */
int st_writer_open_meta(struct st_writer **out, const char *path,
                        const struct st_entry *entries, int64_t n, const char *const *meta_kv,
                        int32_t n_meta, struct kli_err *err);
/* Appends bytes of the current tensor(s); any split of the data into calls is fine. */
int st_writer_write(struct st_writer *w, const void *data, uint64_t nbytes,
                        struct kli_err *err);
/* Checks that every declared byte was written, flushes and renames into place. */
int st_writer_close(struct st_writer *w, struct kli_err *err);
/* Abandons the file (removes the temporary file). NULL is allowed. */
void st_writer_abort(struct st_writer *w);
/* The end of a writer whatever happened: with rc KLI_OK, st_writer_close (@return its
 * result), else st_writer_abort (@return rc). NULL is allowed (rc is returned). */
int st_writer_finish(struct st_writer *w, int rc, struct kli_err *err);

/* ==== kli's packed format (.kli, packed.c; the byte layout is kli-pack(5)) ==================
 * One file: a versioned header with a section table, the config.json text, the tokenizer
 * files, a tensor directory and the tensor data (row-major in the dtype the kernels read,
 * each routed expert's matrices one page-aligned range). wfile_open recognises a .kli
 * by its magic; what a .kli holds besides tensors is reached through wfile_pack. */

#define KLI_PACK_MAGIC "KLIPACK"   /* 8 bytes with the NUL */
#define KLI_PACK_VERSION_MAJOR 1
#define KLI_PACK_VERSION_MINOR 0

/* A run of tensors stored together: one routed expert's w1, w3 and w2. `offset` (into the
 * file) is a multiple of the page size and nothing else shares the pages of
 * [offset, offset + size rounded up to a page), so one madvise covers the expert. */
struct tensor_group {
    const void *data;      /* first byte, in the mapping */
    uint64_t offset, size;
    int64_t first;         /* index of its first tensor (wfile_tensor) */
    int32_t n;             /* tensors first .. first + n - 1 */
    int32_t layer, expert;
};

struct pack_info {
    uint16_t version_major, version_minor;
    const char *config;         /* config.json text, NUL-terminated, in the mapping */
    uint64_t config_len;
    const char *tok_ranks;      /* tiktoken.model text (NUL-terminated); NULL: no tokenizer */
    uint64_t tok_ranks_len;
    const char *tok_config;     /* tokenizer_config.json text; NULL when absent */
    uint64_t tok_config_len;
    struct tensor_group *groups;   /* [n_groups], heap */
    int64_t n_groups;
    uint64_t *checksums;        /* [tensors]: XXH64 of each tensor's bytes, heap */
    uint64_t data_checksum;     /* the DATA section's: XXH64 of the per-tensor checksums */
};

/* Parses a .kli image held in memory (`base`, `size` bytes): header, section table, the
 * checksums of the header, config, tokenizer and directory sections, and every tensor's
 * bounds (tensor bytes are not read). Descriptors are appended like safetensors_parse;
 * *info is filled (release with pack_info_free). Messages name the damaged section.
 * @return KLI_OK; KLI_E_FORMAT (truncated, damaged, malformed); KLI_E_UNSUPPORTED (another
 *         major version, big-endian host, unknown tensor layout); KLI_E_NOMEM. */
int k_pack_parse(const uint8_t *base, uint64_t size, const char *fname, int32_t file,
                   struct tensor_desc **descs, int64_t *n, int64_t *cap,
                   struct pack_info *info, struct kli_err *err);
void pack_info_free(struct pack_info *info);

/* @return 1 if the file at `path` starts with the .kli magic, else 0. */
int pack_probe(const char *path);

/* @return the .kli contents of a wfile opened from a .kli file, NULL for safetensors. */
const struct pack_info *wfile_pack(const struct wfile *w);

/* Reads every tensor of a .kli and checks it against its checksum (a safetensors wfile has
 * none: KLI_OK). Progress in bytes. @return KLI_OK or KLI_E_FORMAT naming the tensor. */
int wfile_verify(const struct wfile *w, kli_progress_fn progress, void *ud,
                     struct kli_err *err);

/* Drops the pages of tensor `d` from this process (they are read again on the next touch).
 * Streaming readers use it to keep their resident size small. @return 0 or an errno. */
int wfile_dontneed(const struct wfile *w, const struct tensor_desc *d);

/* Of the weight files' pages now resident in this process, *resident bytes in all and
 * *huge bytes mapped through 2 MiB entries. @return 0, or -1 where the system does not say. */
int wfile_pages(const struct wfile *w, uint64_t *resident, uint64_t *huge);

/* The streaming writer: declare the tensors in file order, then append their bytes in
 * that order (any split into calls), then close. Tensors with the same group >= 0 must be
 * consecutive; each such run becomes one page-aligned range in the group table. Written
 * through kli_outfile (kli.h): a temporary file, synced and renamed over PATH by a
 * successful close. */
struct pack_entry {
    const char *name;
    enum k_dtype dtype;
    const char *dtype_name;     /* the source's dtype name ("BF16", "I64"); NULL: kli's */
    int32_t ndim;
    int64_t shape[KLI_MAX_DIMS];
    uint64_t nbytes;
    int64_t group;              /* -1: none */
    int32_t layer, expert;      /* the group's labels */
};

struct pack_meta {
    const char *config;         /* config.json text */
    uint64_t config_len;
    const char *tok_ranks;      /* tiktoken.model text, or NULL (no tokenizer) */
    uint64_t tok_ranks_len;
    const char *tok_config;     /* tokenizer_config.json text, or NULL */
    uint64_t tok_config_len;
};

struct pack_writer;

int pack_writer_open(struct pack_writer **out, const char *path,
                         const struct pack_meta *meta, const struct pack_entry *entries,
                         int64_t n, struct kli_err *err);
int pack_writer_write(struct pack_writer *w, const void *data, uint64_t nbytes,
                          struct kli_err *err);
int pack_writer_close(struct pack_writer *w, struct kli_err *err);
/* Abandons the file (removes the temporary file). NULL is allowed. */
void pack_writer_abort(struct pack_writer *w);

/* The two writers as byte sinks: st_writer_write and pack_writer_write for a caller that
 * holds the writer as a void * (a conversion stream's write and ctx, quantize.h; the tests'
 * tl_feed). */
int st_writer_sink(void *w, const void *data, uint64_t nbytes, struct kli_err *err);
int pack_writer_sink(void *w, const void *data, uint64_t nbytes, struct kli_err *err);

/* ==== GGUF (gguf.c reads the container, gguf_kimi.c the Kimi Linear model in it) ==========
 * wfile_open recognises a GGUF by its magic and presents it as the checkpoint it was made
 * from: descriptors under the Hugging Face names (data in the mapping where the layouts
 * agree), config.json and the tokenizer files rebuilt from the metadata (wfile_meta). */

struct gguf_view;

/* Parses a GGUF image and appends its descriptors (as safetensors_parse does); *out holds
 * what they point to that is not in the image, and the rebuilt texts.
 * @return KLI_OK; KLI_E_FORMAT (damaged, or not a Kimi Linear model); KLI_E_UNSUPPORTED
 *         (a tensor type kli does not read: the message names it and the tensor; another
 *         architecture or GGUF version); KLI_E_NOMEM. */
int gguf_kimi_open(const uint8_t *base, uint64_t size, const char *fname, int32_t file,
                   struct tensor_desc **descs, int64_t *n, int64_t *cap,
                   struct gguf_view **out, struct kli_err *err);
void gguf_view_free(struct gguf_view *v);
const struct pack_meta *gguf_view_meta(const struct gguf_view *v);

/* The GGUF name of a checkpoint tensor that maps one to one (gguf_kimi.c's table):
 * "model.layers.3.self_attn.q_proj.weight" -> "blk.3.attn_q.weight". The routed experts,
 * kv_b_proj and A_log, which change shape or value, are not in it.
 * @return 0 (out filled), or -1. */
int gguf_kimi_name(const char *hf, char *out, size_t cap);

/* Writing a GGUF v3 file (gguf_write.c): metadata entries appended to a gguf_kvbuf, tensors
 * declared (their names must live until close), then each tensor's bytes in order, any
 * split into calls. Through kli_outfile: a temporary file renamed by a successful close. */
struct gguf_kvbuf {
    char *p;
    size_t n, cap;
    uint64_t count;     /* entries */
    int oom;
};

void gguf_kv_key(struct gguf_kvbuf *b, const char *key, uint32_t type);
void gguf_kv_string(struct gguf_kvbuf *b, const char *s, size_t len);
void gguf_kv_u32(struct gguf_kvbuf *b, const char *key, uint32_t v);
void gguf_kv_f32(struct gguf_kvbuf *b, const char *key, float v);
void gguf_kv_bool(struct gguf_kvbuf *b, const char *key, int v);
void gguf_kv_str(struct gguf_kvbuf *b, const char *key, const char *v);
/* An array's header; its n elements follow (gguf_kv_elem, or gguf_kv_string each). */
void gguf_kv_array(struct gguf_kvbuf *b, const char *key, uint32_t elem, uint64_t n);
void gguf_kv_elem(struct gguf_kvbuf *b, uint64_t v, int bytes);

struct gguf_wtensor {
    const char *name;
    uint32_t type;             /* ggml type */
    int32_t ndim;
    int64_t ne[4];             /* the fastest first */
    uint64_t nbytes;
    uint64_t offset;           /* set by the writer */
};

struct gguf_writer;

int gguf_writer_open(struct gguf_writer **out, const char *path, const struct gguf_kvbuf *kv,
                     const struct gguf_wtensor *t, int64_t n, struct kli_err *err);
int gguf_writer_write(struct gguf_writer *w, const void *data, uint64_t nbytes,
                      struct kli_err *err);
int gguf_writer_close(struct gguf_writer *w, struct kli_err *err);
void gguf_writer_abort(struct gguf_writer *w);

/* The ggml type of a kli dtype. @return 0, or -1 (KLI_DT_OTHER). */
int gguf_type_of(enum k_dtype dt, uint32_t *type);

/* The texts a model needs besides its tensors (config.json, tiktoken.model,
 * tokenizer_config.json): a .kli's sections or a GGUF's rebuilt ones; NULL for safetensors
 * (the files beside it hold them). tok_ranks is NULL where there is no tokenizer. */
const struct pack_meta *wfile_meta(const struct wfile *w);

/* @return 1 if `path` is a file wfile_open reads as one model (.kli or GGUF), else 0. */
int wfile_probe(const char *path);

#endif
