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

/* The dtype tensor `d` is written in: `want` for the weight matrices (KLI_DT_COUNT: every
 * tensor as stored), the stored dtype for what the math reads element by element or needs at
 * full precision (norms, convolution taps, gate parameters, the router, anything that is not
 * a matrix of whole 32-element blocks per row), then the first matching rule wins. A block
 * type falls back to the stored dtype when rows are not whole blocks; KLI_DT_OTHER stays.
 * The rules must have passed quantize_check_rules. */
enum kli_dtype quantize_target(const struct kli_tensor_desc *d, enum kli_dtype want,
                               const char *const *keep, int32_t n_keep);

#endif
