/*
 * gguf.h - the GGUF container (llama.cpp's model files), read from a mapped image.
 *
 * gguf_parse checks everything before anything is used: the header, every metadata
 * key/value (all thirteen value types, arrays of them), every tensor info, the alignment
 * (general.alignment), and every count, length, offset, size and dimension against the
 * bytes that remain and against overflow; tensors that overlap are refused. The byte layout
 * is kli-weights(5), GGUF; doc/formats.md section 5 says how kli maps it.
 *
 * This file knows the container only. gguf_kimi.c presents a Kimi Linear GGUF to the rest
 * of kli under the checkpoint's own (Hugging Face) tensor names.
 */
#ifndef KLI_GGUF_H
#define KLI_GGUF_H

#include <stdint.h>

#include "kli.h"

#define GGUF_MAGIC "GGUF"
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_DIMS 4
#define GGUF_MAX_NAME 63          /* bytes of a tensor name (ggml's 64 with the NUL) */

/* Metadata value types, as stored. */
enum gguf_vtype {
    GGUF_T_U8 = 0, GGUF_T_I8 = 1, GGUF_T_U16 = 2, GGUF_T_I16 = 3, GGUF_T_U32 = 4,
    GGUF_T_I32 = 5, GGUF_T_F32 = 6, GGUF_T_BOOL = 7, GGUF_T_STRING = 8, GGUF_T_ARRAY = 9,
    GGUF_T_U64 = 10, GGUF_T_I64 = 11, GGUF_T_F64 = 12, GGUF_T_COUNT
};

/* ggml tensor type ids that kli reads, in place or repacked (gguf_kimi.c); the others are
 * known by name only. */
enum {
    GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7,
    GGML_Q8_0 = 8, GGML_Q2_K = 10, GGML_Q3_K = 11, GGML_Q4_K = 12, GGML_Q5_K = 13,
    GGML_Q6_K = 14, GGML_IQ4_NL = 20, GGML_BF16 = 30
};

struct gguf_kv {
    char *key;                /* heap copy, NUL-terminated */
    uint32_t type;            /* enum gguf_vtype */
    uint32_t elem;            /* an array's element type */
    uint64_t n;               /* an array's element count; 1 for a scalar */
    const uint8_t *val;       /* the value's bytes in the image (an array: its first element) */
    uint64_t *str_off;        /* an array of strings: offset of element i from val (heap) */
};

struct gguf_tensor {
    char *name;               /* heap copy */
    uint32_t type;            /* ggml type id */
    int32_t ndim;
    int64_t ne[GGUF_MAX_DIMS];   /* ne[0] varies fastest (the reversed PyTorch shape) */
    int64_t numel;
    uint64_t offset;          /* into the data section */
    const uint8_t *data;      /* in the image */
    uint64_t nbytes;
};

struct gguf {
    uint32_t version;
    uint32_t alignment;
    uint64_t data_offset;     /* from the start of the image */
    struct gguf_kv *kv;
    int64_t n_kv;
    struct gguf_tensor *t;
    int64_t n_t;
};

/* Parses a GGUF v2 or v3 image of `size` bytes; `fname` names it in messages.
 * @return KLI_OK (*out set; free with gguf_free), KLI_E_FORMAT (damaged or malformed, the
 *         message names the field, key or tensor and the value), KLI_E_UNSUPPORTED (another
 *         version, a big-endian file) or KLI_E_NOMEM. */
int gguf_parse(const uint8_t *base, uint64_t size, const char *fname, struct gguf **out,
               struct kli_err *err);
void gguf_free(struct gguf *g);

/* @return 1 if the file at `path` starts with the GGUF magic, else 0. */
int gguf_probe(const char *path);

/* A ggml type's name ("Q4_K", "IQ2_XXS", ...; NULL for an id ggml does not define) and its
 * block: elements and bytes (0 and 0 for an undefined id). */
const char *gguf_type_name(uint32_t type);
void gguf_type_block(uint32_t type, uint32_t *elems, uint32_t *bytes);

/* @return the metadata entry `key`, or NULL. */
const struct gguf_kv *gguf_find(const struct gguf *g, const char *key);

/* A scalar integer (any of the integer types or bool) into *out.
 * @return 0, or -1 if absent, not an integer scalar, or outside int64_t. */
int gguf_get_int(const struct gguf *g, const char *key, int64_t *out);
/* A scalar number (integer or float) into *out. @return 0 or -1. */
int gguf_get_num(const struct gguf *g, const char *key, double *out);
/* A string (not NUL-terminated: *len bytes). @return 0 or -1. */
int gguf_get_str(const struct gguf *g, const char *key, const char **s, uint64_t *len);

/* Element i of an array kv: an integer (any integer type or bool) / a string.
 * @return 0, or -1 when i is out of range or the element type does not fit. */
int gguf_arr_int(const struct gguf_kv *kv, uint64_t i, int64_t *out);
int gguf_arr_str(const struct gguf_kv *kv, uint64_t i, const char **s, uint64_t *len);

#endif
