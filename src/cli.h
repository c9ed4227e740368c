/*
 * cli.h - helpers shared by the files of the kli command (not part of the library).
 */
#ifndef KLI_CLI_H
#define KLI_CLI_H

#include <stdarg.h>
#include <stddef.h>

#include "kli.h"

struct cli_command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
};

void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int cli_parse_int(const char *s, long lo, long hi, const char *what, long *out);
char *cli_read_file(const char *path, size_t *len);
int cli_parse_ids(const char *s, kli_token **out, int32_t *n_out);
int cli_open_model(const char *path, int threads, struct kli_model **m);
int cli_threads(long opt_t);

/* The commands of cli_gen.c, NULL-terminated. */
extern const struct cli_command cli_gen_commands[];
/* The commands of cli_tools.c, NULL-terminated. */
extern const struct cli_command cli_tool_commands[];

/* The built-in demo model (demo.c): writes it to a new temporary directory, whose path
 * goes to `dir`; cli_demo_remove deletes it again. */
int cli_demo_dir(char *dir, size_t cap);
void cli_demo_remove(const char *dir);

#endif
