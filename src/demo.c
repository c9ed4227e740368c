/*
 * demo.c - the demo model built into the kli binary: kimi-linear-nano, the trained
 * miniature of contrib/models/kimi-linear-nano (4 layers, 3.9M parameters, BPE vocabulary of
 * 2048 ranks; see its README.md), so that `kli run` works on a fresh machine with no model
 * downloaded and answers in English. Every stage (tokenizer, chat format, KDA, MLA, MoE,
 * sampling, streaming) runs for real.
 *
 * The files are linked in with the assembler's .incbin and written to a private temporary
 * directory when used, which is then opened like any model directory.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"

#define DEMO_FILE(sym, file)                                                          \
    __asm__(".section .rodata\n"                                                      \
            ".balign 64\n"                                                            \
            ".global " #sym "_start\n" #sym "_start:\n"                               \
            ".incbin \"" KLI_DEMO_DIR "/" file "\"\n"                                 \
            ".global " #sym "_end\n" #sym "_end:\n"                                   \
            ".byte 0\n"                                                               \
            ".previous\n");                                                           \
    extern const char sym##_start[], sym##_end[]

DEMO_FILE(demo_config, "config.json");
DEMO_FILE(demo_weights, "model.safetensors");
DEMO_FILE(demo_vocab, "tiktoken.model");
DEMO_FILE(demo_tokcfg, "tokenizer_config.json");

static const struct {
    const char *name;
    const char *start, *end;
} demo_files[] = {
    {"config.json", demo_config_start, demo_config_end},
    {"model.safetensors", demo_weights_start, demo_weights_end},
    {"tiktoken.model", demo_vocab_start, demo_vocab_end},
    {"tokenizer_config.json", demo_tokcfg_start, demo_tokcfg_end},
};

void
cli_demo_remove(const char *dir)
{
    char path[4096];

    if (dir == NULL || dir[0] == '\0')
        return;
    for (size_t i = 0; i < sizeof(demo_files) / sizeof(demo_files[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, demo_files[i].name);
        unlink(path);
    }
    rmdir(dir);
}

int
cli_demo_dir(char *dir, size_t cap)
{
    const char *tmp = getenv("TMPDIR");
    char path[4096];

    if (tmp == NULL || tmp[0] == '\0')
        tmp = "/tmp";
    if (snprintf(dir, cap, "%s/kli-demo-XXXXXX", tmp) >= (int)cap || mkdtemp(dir) == NULL) {
        cli_error("demo model: cannot create a directory in %s: %s", tmp, strerror(errno));
        dir[0] = '\0';
        return -1;
    }
    for (size_t i = 0; i < sizeof(demo_files) / sizeof(demo_files[0]); i++) {
        size_t n = (size_t)(demo_files[i].end - demo_files[i].start);
        snprintf(path, sizeof(path), "%s/%s", dir, demo_files[i].name);
        FILE *f = fopen(path, "wb");
        if (f == NULL || fwrite(demo_files[i].start, 1, n, f) != n || fclose(f) != 0) {
            cli_error("demo model: cannot write %s: %s", path, strerror(errno));
            cli_demo_remove(dir);
            dir[0] = '\0';
            return -1;
        }
    }
    return 0;
}
