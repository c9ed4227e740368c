/* gguf-dequant: copy a GGUF file with every quantized/BF16/F16 tensor decoded to F32 by
 * ggml's own block decoders (type_traits->to_float); metadata copied unchanged except
 * general.file_type = 0 (all F32).  Used to separate "how the weights are decoded" from
 * "how the matrix products are computed" when comparing llama.cpp with kli.
 * usage: gguf-dequant IN.gguf OUT.gguf   (link: -lggml-base) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "gguf.h"

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: gguf-dequant IN.gguf OUT.gguf\n"); return 2; }
    struct ggml_context *src_data = NULL;
    struct gguf_init_params ip = { .no_alloc = false, .ctx = &src_data };
    struct gguf_context *in = gguf_init_from_file(argv[1], ip);
    if (!in) { fprintf(stderr, "gguf-dequant: cannot read %s\n", argv[1]); return 1; }
    int64_t nt = gguf_get_n_tensors(in);

    size_t need = 0;
    for (int64_t i = 0; i < nt; i++) {
        struct ggml_tensor *t = ggml_get_tensor(src_data, gguf_get_tensor_name(in, i));
        need += ggml_nelements(t) * sizeof(float) + ggml_tensor_overhead() + 64;
    }
    struct ggml_init_params cp = { .mem_size = need + (1 << 20), .mem_buffer = NULL, .no_alloc = false };
    struct ggml_context *dst_data = ggml_init(cp);

    struct gguf_context *out = gguf_init_empty();
    gguf_set_kv(out, in);
    gguf_set_val_u32(out, "general.file_type", 0);
    int n_conv = 0;
    for (int64_t i = 0; i < nt; i++) {
        const char *name = gguf_get_tensor_name(in, i);
        struct ggml_tensor *t = ggml_get_tensor(src_data, name);
        if (t->type == GGML_TYPE_F32) { gguf_add_tensor(out, t); continue; }
        const struct ggml_type_traits *tr = ggml_get_type_traits(t->type);
        if (!tr->to_float) { fprintf(stderr, "gguf-dequant: no decoder for %s\n", name); return 1; }
        struct ggml_tensor *f = ggml_new_tensor(dst_data, GGML_TYPE_F32, ggml_n_dims(t), t->ne);
        ggml_set_name(f, name);
        int64_t nrows = ggml_nrows(t), ne0 = t->ne[0];
        for (int64_t r = 0; r < nrows; r++)
            tr->to_float((const char *)t->data + r * t->nb[1], (float *)f->data + r * ne0, ne0);
        gguf_add_tensor(out, f);
        n_conv++;
    }
    if (!gguf_write_to_file(out, argv[2], false)) { fprintf(stderr, "gguf-dequant: write failed\n"); return 1; }
    fprintf(stderr, "gguf-dequant: %s -> %s (%d tensors decoded to F32)\n", argv[1], argv[2], n_conv);
    gguf_free(out); gguf_free(in); ggml_free(dst_data); ggml_free(src_data);
    return 0;
}
