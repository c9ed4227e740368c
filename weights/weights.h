/*
 * weights.h - a format-neutral directory of stored tensors.
 *
 * A kli_wfile is one checkpoint: a single safetensors file, or a sharded Hugging Face
 * checkpoint (model.safetensors.index.json + its shards). Every file is memory-mapped
 * read-only; tensor data pointers point into the mappings (no copy) and stay valid until
 * kli_wfile_close. Opening checks every header offset and size against its file, so a
 * tensor returned here can be read in full without going out of bounds.
 *
 * This directory knows nothing about models: names are the checkpoint's own.
 */
#ifndef KLI_WEIGHTS_H
#define KLI_WEIGHTS_H

#include <stdint.h>

#include "kli.h"
#include "dtype.h"

#define KLI_MAX_DIMS 8

struct kli_tensor_desc {
    const char *name;              /* the checkpoint's name, NUL-terminated */
    enum kli_dtype dtype;
    char dtype_name[16];           /* as written in the file ("BF16", "I8", ...) */
    int32_t ndim;                  /* 0 for a scalar */
    int64_t shape[KLI_MAX_DIMS];   /* outermost first (PyTorch order) */
    int64_t numel;
    const void *data;              /* into the mapping; aligned only as the file aligns it */
    uint64_t nbytes;
    int32_t file;                  /* index of the shard that holds it */
};

struct kli_wfile;

/* Opens `path`: a directory (model.safetensors.index.json if present, else
 * model.safetensors) or a single .safetensors file.
 * @return KLI_OK, or KLI_E_IO / KLI_E_FORMAT / KLI_E_NOMEM with a message naming the file
 *         (and tensor) at fault. */
int kli_wfile_open(struct kli_wfile **out, const char *path, struct kli_err *err);
void kli_wfile_close(struct kli_wfile *w);

/* @return the tensor called `name`, or NULL. */
const struct kli_tensor_desc *kli_wfile_find(const struct kli_wfile *w, const char *name);
int64_t kli_wfile_n_tensors(const struct kli_wfile *w);
const struct kli_tensor_desc *kli_wfile_tensor(const struct kli_wfile *w, int64_t i);
/* Total bytes of tensor data. */
uint64_t kli_wfile_data_bytes(const struct kli_wfile *w);

/* Parses one safetensors image held in memory (`base`, `size` bytes): the header length,
 * the JSON header and every tensor's bounds. Used by kli_wfile_open and by the fuzzer.
 * On success the descriptors (appended to *descs, *n growing) point into `base`. */
int kli_safetensors_parse(const uint8_t *base, uint64_t size, const char *fname, int32_t file,
                          struct kli_tensor_desc **descs, int64_t *n, int64_t *cap,
                          struct kli_err *err);

/* Descriptor names are heap copies owned by whoever owns the array: kli_safetensors_parse
 * allocates them, and on failure it frees the ones it added and restores *n (*descs may
 * have grown). This frees `n` names and the array itself. NULL is allowed. */
void kli_safetensors_free_descs(struct kli_tensor_desc *descs, int64_t n);

/* The files behind a wfile: one for a single file, one per shard (in the order of
 * kli_tensor_desc.file) for a sharded checkpoint. For messages that name the file.
 * @return the path as opened, or NULL if i is out of range. */
int32_t kli_wfile_n_files(const struct kli_wfile *w);
const char *kli_wfile_file_path(const struct kli_wfile *w, int32_t i);

/* ==== writing safetensors ==================================================================
 * A streaming writer: the tensor list is declared up front (so the header can be written
 * first), then each tensor's bytes are appended in that order. The file is written as
 * PATH.tmp and renamed over PATH only by a successful kli_st_writer_close, so an interrupted
 * run never leaves a half-written file under the final name. */

struct kli_st_entry {
    const char *name;
    const char *dtype;            /* safetensors dtype string: "BF16", "F32", "KLI_Q8_0", ... */
    int32_t ndim;
    int64_t shape[KLI_MAX_DIMS];
    uint64_t nbytes;
};

struct kli_st_writer;

int kli_st_writer_open(struct kli_st_writer **out, const char *path,
                       const struct kli_st_entry *entries, int64_t n, struct kli_err *err);
/* Appends bytes of the current tensor(s); any split of the data into calls is fine. */
int kli_st_writer_write(struct kli_st_writer *w, const void *data, uint64_t nbytes,
                        struct kli_err *err);
/* Checks that every declared byte was written, flushes and renames into place. */
int kli_st_writer_close(struct kli_st_writer *w, struct kli_err *err);
/* Abandons the file (removes PATH.tmp). NULL is allowed. */
void kli_st_writer_abort(struct kli_st_writer *w);

#endif
