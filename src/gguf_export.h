/*
 * gguf_export.h - kli_convert's GGUF output (gguf_export.c).
 */
#ifndef KLI_GGUF_EXPORT_H
#define KLI_GGUF_EXPORT_H

#include "kli.h"

struct kli_model;

/* Writes the open model m to `out` as a kimi-linear GGUF, its matrices in the dtypes
 * opt->type and opt->keep give (as for a .kli), through kli_outfile.
 * @return KLI_OK, or a negative status naming what GGUF cannot hold or the file at fault. */
int gguf_export(const struct kli_model *m, const char *out,
                const struct kli_convert_options *opt, struct kli_err *err);

#endif
