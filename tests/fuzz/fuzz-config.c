/*
 * fuzz-config.c - libFuzzer target for the config.json parser (src/hparams.c).
 *
 * Build with -fsanitize=fuzzer,address -DKLI_LIBFUZZER; without KLI_LIBFUZZER a main()
 * replays the files named on the command line. Besides "no crash", it checks that a
 * failure always carries a message and that an accepted config is internally consistent
 * (every layer has a kind, top-k fits the experts), which the model code relies on.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hparams.h"
#define FUZZ_NAME "fuzz-config"
#include "fuzz.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct k_config cfg;
    struct kli_err err = {0};
    int rc = hparams_parse(&cfg, (const char *)data, size, "fuzz", &err);

    if (rc != KLI_OK) {
        fuzz_check(err.code == rc && err.msg[0] != '\0', "failure without a message");
        return 0;
    }
    fuzz_check(cfg.n_layers >= 1 && cfg.n_layers <= KLI_MAX_LAYERS, "layer count");
    fuzz_check(cfg.d_model >= 1 && cfg.n_vocab >= 1, "dimensions");
    for (int i = 0; i < cfg.n_layers; i++) {
        fuzz_check(cfg.layer_mixer[i] == KLI_MIXER_KDA || cfg.layer_mixer[i] == KLI_MIXER_MLA,
                   "every layer has a mixer");
        fuzz_check(cfg.layer_ffn[i] == KLI_FFN_DENSE || cfg.layer_ffn[i] == KLI_FFN_MOE,
                   "every layer has an FFN");
    }
    if (cfg.moe.n_experts > 0)
        fuzz_check(cfg.moe.top_k >= 1 && cfg.moe.top_k <= cfg.moe.n_experts &&
                   cfg.moe.n_experts % cfg.moe.n_group == 0, "routing shape");
    return 0;
}
