/*
 * quantize.h - which dtype each stored tensor is written in: the rules shared by
 * kli_quantize (a new safetensors checkpoint) and kli_convert (a .kli file).
 */
#ifndef KLI_QUANTIZE_H
#define KLI_QUANTIZE_H

#include <stdint.h>

#include "kli.h"
#include "weights.h"

/* Checks `n_keep` rules "GLOB=TYPE" (TYPE a dtype name or "keep").
 * @return KLI_OK or KLI_E_RANGE naming the malformed rule. */
int quantize_check_rules(const char *const *keep, int32_t n_keep, struct kli_err *err);

/* The tensor classes a recipe gives a type each (kli(1), QUANTIZATION), and by which
 * kli info reports bits per weight. */
enum quant_class {
    QC_EXPERTS,     /* routed experts: block_sparse_moe.experts.* */
    QC_SHARED,      /* the shared expert */
    QC_KDA,         /* the projections of KDA layers' self_attn */
    QC_MLA,         /* the projections of MLA layers' self_attn (those with kv_a_proj) */
    QC_DENSE,       /* the dense FFN (mlp.*) */
    QC_ROUTER,      /* block_sparse_moe.gate.weight */
    QC_EMBED,       /* embed_tokens */
    QC_LM_HEAD,
    QC_OTHER,       /* norms, convolution taps, gate parameters */
    QC_N
};

/* The class of tensor `d` of `wf`, by its name (and, for self_attn, its layer's tensors). */
enum quant_class quantize_class(const struct wfile *wf, const struct tensor_desc *d);

/* A short name of each class, for messages and kli info ("experts", "KDA attention"...). */
const char *quantize_class_name(enum quant_class c);

/* What --type asks for: a dtype per class (KLI_DT_COUNT: as stored). A recipe name
 * (q4_k_m, ...) gives its row of the recipe table; a dtype name gives it to every matrix
 * class but the router (stored); NULL (convert's default) keeps everything as stored. */
struct quant_plan {
    enum k_dtype type[QC_N];
    int recipe;             /* 1 when `type` came from the recipe table */
};

/* Every recipe name, for messages and kli(1). */
#define KLI_RECIPE_NAMES "q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k, q8_0"

/* Fills `p` for --type `type`.
 * @return KLI_OK or KLI_E_RANGE naming the valid recipes and types. */
int quantize_plan(const char *type, struct quant_plan *p, struct kli_err *err);

/* The dtype tensor `d` of `wf` is written in: the plan's type for its class (KLI_DT_COUNT:
 * as stored), the stored dtype for what the math reads element by element (norms,
 * convolution taps, gate parameters, anything that is not a matrix of whole 32-element
 * blocks per row), then the first matching rule wins. A K type on rows that are not whole
 * super-blocks falls back (dtype_fit); a block type falls back to the stored dtype when
 * rows are not whole blocks; KLI_DT_OTHER stays. The rules must have passed
 * quantize_check_rules. */
enum k_dtype quantize_target(const struct wfile *wf, const struct tensor_desc *d,
                             const struct quant_plan *p, const char *const *keep,
                             int32_t n_keep);

/* Streaming one tensor into a writer, converted to dtype `to` in slabs of whole rows (or
 * copied in chunks when `to` is its stored dtype or KLI_DT_OTHER). The source pages are
 * dropped behind the conversion, so a 1 GB tensor costs no more resident memory than a
 * small one. `write` receives the output bytes in order; after each slab or chunk the input
 * bytes consumed count towards `done` of `total`, reported through opt->progress; then
 * opt->interrupt is polled (KLI_E_INTERRUPTED when it asks to stop). */
typedef int (*quantize_write_fn)(void *ctx, const void *data, uint64_t n, struct kli_err *err);

struct quantize_stream {
    quantize_write_fn write;
    void *ctx;
    const struct kli_convert_options *opt;
    uint64_t done, total;     /* input bytes */
    float *fbuf;          /* [rows * max_cols] */
    uint8_t *qbuf;        /* [rows * max_cols * 4]: the widest output dtype */
    int64_t rows;         /* rows per slab */
    const float *imp;     /* NULL, or the next tensor's per-column weights (kli_quantize's
                             --imatrix): each row is quantized with dtype_from_f32_w */
    const float *cov;     /* NULL, or its inputs' second moments (cols x cols): K types then
                             spread rounding errors over the row (kq_from_f32_h) */
};

/* Allocates the slab buffers for rows of up to max_cols elements (about 4 MB of floats per
 * slab). @return KLI_OK or KLI_E_NOMEM. */
int quantize_stream_init(struct quantize_stream *qs, int64_t max_cols, struct kli_err *err);
void quantize_stream_free(struct quantize_stream *qs);

/* Sets qs->imp and qs->cov for tensor i of n (kli_convert_options.imatrix, loaded by
 * imat_load into imp[], indexed like the input's tensors) as it goes from dtype `from` to
 * `to`: imp[i] and imp[n + i] when it becomes a block type, counted in used[0] (weighted) or
 * used[1] (the file has nothing for it); NULL otherwise, and always when imp is NULL. */
void quantize_imp(struct quantize_stream *qs, float *const *imp, int64_t n, int64_t i,
                  enum k_dtype from, enum k_dtype to, int64_t used[2]);

int quantize_tensor(struct quantize_stream *qs, const struct wfile *wf,
                    const struct tensor_desc *d, enum k_dtype to, struct kli_err *err);

#endif
