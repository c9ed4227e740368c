/*
 * cli.h - helpers shared by the files of the kli command (not part of the library).
 */
#ifndef KLI_CLI_H
#define KLI_CLI_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

#include "kli.h"

struct cli_command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
};

void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int cli_parse_int(const char *s, long lo, long hi, const char *what, long *out);
char *cli_read_file(const char *path, size_t max, size_t max_line, const char *limit,
                    size_t *len);
/* The most text read from a file or standard input where no --ctx bounds it (kli(1),
 * LIMITS): tokenize, detokenize, logits --ids-file, and run's prompt without --ctx. With
 * --ctx N a prompt may hold CLI_PROMPT_PER_TOKEN bytes per token, and at least 1 MiB. */
#define CLI_TEXT_MAX ((size_t)64 << 20)
#define CLI_PROMPT_PER_TOKEN 128
/* A size: bytes, or with a K, M, G or T suffix ("512M", "8GiB"). @return 0, or -1 (not
 * reported). */
int cli_parse_size(const char *s, uint64_t *out);
int cli_parse_ids(const char *s, kli_token **out, int32_t *n_out);
/* The ids of the file path ("-": standard input) by cli_parse_ids, read as by cli_read_file
 * (at most CLI_TEXT_MAX bytes, `limit` naming that limit); a NUL byte is refused.
 * @return 0, or -1 after reporting. */
int cli_read_ids(const char *path, const char *limit, kli_token **out, int32_t *n_out);
int cli_open_model(const char *path, int threads, struct kli_model **m);
/* The model directory to open: `model` (-m), or else the built-in demo model, written to a
 * new temporary directory whose path goes to demo[cap] (cli_demo_remove deletes it).
 * @return the path, or NULL after reporting. */
const char *cli_model_path(const char *model, char *demo, size_t cap);
/* After getopt_long: an operand left on the command line is an error, reported as
 * "CMD: unexpected argument 'X'" (without "CMD: " for a NULL cmd). @return 0 if none is
 * left, -1 after reporting. */
int cli_no_operands(int argc, char **argv, const char *cmd);

/* The GPU options of run, chat, logits and bench: --gpu auto|on|off, --gpu-mem SIZE,
 * --gpu-experts N|auto, --gpu-profile FILE. A command lists CLI_GPU_LONGOPTS in its option
 * table and hands these codes to cli_gpu_option; cli_open_model (or cli_gpu_apply, for a
 * command that opens models itself) uses the values. */
enum { CLI_OPT_GPU = 0x4000, CLI_OPT_GPU_MEM, CLI_OPT_GPU_EXPERTS, CLI_OPT_GPU_PROFILE };
#define CLI_GPU_LONGOPTS \
    {"gpu", required_argument, NULL, CLI_OPT_GPU}, \
    {"gpu-mem", required_argument, NULL, CLI_OPT_GPU_MEM}, \
    {"gpu-experts", required_argument, NULL, CLI_OPT_GPU_EXPERTS}, \
    {"gpu-profile", required_argument, NULL, CLI_OPT_GPU_PROFILE}
/* @return 1 if c was a GPU option (parsed), 0 if not, -1 for a bad value (reported). */
int cli_gpu_option(int c, const char *arg);
void cli_gpu_apply(struct kli_model_options *mo);
/* Prints the model's GPU status line to stderr when a GPU option was given or a GPU is in
 * use, so that a CPU-only fallback always says why when one was asked for. */
void cli_gpu_report(const struct kli_model *m);
int cli_threads(long opt_t);

/* The placement options of every command that takes -t: --cpus LIST and --numa POLICY. A
 * command lists CLI_PLACEMENT_LONGOPTS in its option table and hands these codes to
 * cli_placement_option; cli_open_model (or cli_placement_apply) passes the values on. */
enum { CLI_OPT_CPUS = 0x4100, CLI_OPT_NUMA, CLI_OPT_MEM_BUDGET };
#define CLI_PLACEMENT_LONGOPTS \
    {"cpus", required_argument, NULL, CLI_OPT_CPUS}, \
    {"numa", required_argument, NULL, CLI_OPT_NUMA}, \
    {"mem-budget", required_argument, NULL, CLI_OPT_MEM_BUDGET}
/* @return 1 if c was a placement option (parsed), 0 if not, -1 for a bad value (reported). */
int cli_placement_option(int c, const char *arg);
void cli_placement_apply(struct kli_model_options *mo);
/* The options of every command that opens a model: -t/--threads N (1..4096, into *threads),
 * the placement and the GPU options (those a command's table lists).
 * @return 1 if c was one of them (parsed), 0 if not, -1 for a bad value (reported). */
int cli_model_option(int c, const char *arg, long *threads);

/* The options that many commands share, each declared once: -m/--model, -t/--threads,
 * --json and -h/--help. A command lists those it takes in its option table and reads the
 * command line with cli_getopt, which handles them and the codes of cli_model_option (or,
 * for run, chat and batch, those of cli_gen_option) into a struct cli_args and hands the
 * command only its own options. */
enum { CLI_OPT_JSON = 0x4400 };
#define CLI_MODEL_LONGOPT {"model", required_argument, NULL, 'm'}
#define CLI_THREADS_LONGOPT {"threads", required_argument, NULL, 't'}
#define CLI_JSON_LONGOPT {"json", no_argument, NULL, CLI_OPT_JSON}
#define CLI_HELP_LONGOPT {"help", no_argument, NULL, 'h'}
#define CLI_LONGOPTS_END {NULL, 0, NULL, 0}
/* An integer option of a command's own: its code in the option table, its name in messages,
 * its range and the variable it sets. A command lists them in its struct cli_args, and
 * cli_getopt parses them (cli_parse_int). */
struct cli_int_opt {
    int code;
    const char *name;
    long lo, hi;
    long *out;
};
struct cli_args {
    const char *usage;          /* what --help prints */
    const char *model;          /* -m, or NULL */
    long threads;               /* -t, or 0 */
    int json;                   /* --json */
    char demo[4096];            /* the demo model's directory (cli_model_path), or "" */
    struct cli_gen_opts *gen;   /* run, chat, batch: what cli_gen_option reads (-t too) */
    const struct cli_int_opt *ints;   /* the command's integer options, n_ints of them */
    size_t n_ints;
};
/* What cli_getopt returns besides the code of an option. */
enum { CLI_ARGS_END = 0, CLI_ARGS_HELP = -1, CLI_ARGS_BAD = -2 };
struct option;
/* getopt_long over `opts` until an option that is the command's own. @return its code;
 * CLI_ARGS_END when no option is left; CLI_ARGS_HELP after printing a->usage to stdout;
 * CLI_ARGS_BAD after a usage error (reported). */
int cli_getopt(int argc, char **argv, const char *shortopts, const struct option *opts,
               struct cli_args *a);
/* The exit status for a cli_getopt result that ends the command: 0 after --help, else 2. */
int cli_args_exit(int c);
/* The end of the option tables of logits and perplexity, which open one model with the
 * options of every such command and no others of run's: -t, --help, the GPU and the
 * placement groups (-h aside, the codes of cli_model_option) and the terminator. */
#define CLI_MODEL_LONGOPTS_END \
    CLI_THREADS_LONGOPT, \
    CLI_HELP_LONGOPT, \
    CLI_GPU_LONGOPTS, \
    CLI_PLACEMENT_LONGOPTS, \
    CLI_LONGOPTS_END
/* The sizes --mem-budget listed (kli bench takes several, other commands one).
 * @return their count (0: no budget); *out borrowed. */
int cli_mem_budgets(const uint64_t **out);
/* The options of the commands that read a text in windows of --ctx tokens (perplexity,
 * imatrix): -f/--file FILE, --ctx N and --bos; the caller lists --ctx's range and default in
 * its struct cli_int_opt and hands the text to cli_text_tokens. */
#define CLI_TEXT_LONGOPTS \
    {"file", required_argument, NULL, 'f'}, \
    {"ctx", required_argument, NULL, 'c'}, \
    {"bos", no_argument, NULL, 'B'}
/* The tokens of a text as kli perplexity scores them (special-token strings as plain text;
 * a BOS first when `bos`), in *out (malloc'd). @return their count, or -1 after reporting
 * (messages start with `cmd`). */
int64_t cli_text_tokens(const struct kli_model *m, const char *text, size_t len, int bos,
                        const char *cmd, kli_token **out);
/* kli imatrix (cli_imatrix.c). */
int cli_imatrix(int argc, char **argv);
/* The edge-mode line for stderr after a run: cache size, hit rate, bytes read. */
void cli_cache_report(const struct kli_model *m);

/* The sampling options shared by run, chat and batch (--temp, --top-k, --top-p, --min-p,
 * the three penalties, --repeat-last-n, --seed): a command lists CLI_SAMPLING_LONGOPTS and
 * hands the codes to cli_sampling_option. */
enum {
    CLI_OPT_TEMP = 0x4200, CLI_OPT_TOPK, CLI_OPT_TOPP, CLI_OPT_MINP, CLI_OPT_REPEAT,
    CLI_OPT_PRESENCE, CLI_OPT_FREQUENCY, CLI_OPT_LASTN, CLI_OPT_SEED,
};
#define CLI_SAMPLING_LONGOPTS \
    {"temp", required_argument, NULL, CLI_OPT_TEMP}, \
    {"temperature", required_argument, NULL, CLI_OPT_TEMP}, \
    {"top-k", required_argument, NULL, CLI_OPT_TOPK}, \
    {"top-p", required_argument, NULL, CLI_OPT_TOPP}, \
    {"min-p", required_argument, NULL, CLI_OPT_MINP}, \
    {"repeat-penalty", required_argument, NULL, CLI_OPT_REPEAT}, \
    {"presence-penalty", required_argument, NULL, CLI_OPT_PRESENCE}, \
    {"frequency-penalty", required_argument, NULL, CLI_OPT_FREQUENCY}, \
    {"repeat-last-n", required_argument, NULL, CLI_OPT_LASTN}, \
    {"seed", required_argument, NULL, CLI_OPT_SEED}
/* @return 1 if c was a sampling option (parsed into so), 0 if not, -1 for a bad value
 * (reported). */
int cli_sampling_option(int c, const char *arg, struct kli_sampler_options *so);
/* A float option value: @return 0, or -1 after reporting. */
int cli_parse_float(const char *s, const char *what, float *out);

/* The memory this process can still take, in bytes: the least of MemAvailable, the cgroup's
 * limit less its use, and RLIMIT_AS less the address space mapped now; -1 when none of them
 * is known. *why names the limit that gave it. */
int64_t cli_mem_room(const char **why);

/* The options of the text generating commands, run, chat and batch, in one table and one
 * parser: -m, -s, -n, -t, --stop, --ctx, --quiet and the sampling, placement and GPU groups
 * (CLI_GEN_LONGOPTS), and --raw (CLI_GEN_RAW_LONGOPT; run and batch). A command lists them,
 * reads the command line with cli_getopt (-m goes to its struct cli_args, the rest to
 * cli_gen_option through args->gen), and checks the result with cli_gen_check once the
 * command line is read. */
enum {
    CLI_OPT_STOP = 0x4300, CLI_OPT_RAW, CLI_OPT_CTX, CLI_OPT_QUIET, CLI_OPT_CACHE_TYPE,
    CLI_OPT_JSON_SCHEMA, CLI_OPT_LOGIT_BIAS
};
#define CLI_GEN_MAX_BIAS 64
#define CLI_GEN_MAX_STOP 16
struct cli_gen_opts {
    const char *system;
    long threads, max_tokens, ctx;
    int raw, quiet;
    int32_t cache_type;          /* --cache-type: enum kli_cache_type */
    struct kli_sampler_options so;
    const char *stop[CLI_GEN_MAX_STOP];
    int n_stop;
    const char *json_schema;    /* --json-schema FILE */
    int json;                   /* --json: any JSON object */
    kli_token bias_ids[CLI_GEN_MAX_BIAS];   /* --logit-bias ID:BIAS, so.bias_ids points here */
    float bias[CLI_GEN_MAX_BIAS];
};
#define CLI_GEN_LONGOPTS \
    CLI_MODEL_LONGOPT, \
    {"system", required_argument, NULL, 's'}, \
    {"max-tokens", required_argument, NULL, 'n'}, \
    CLI_THREADS_LONGOPT, \
    {"stop", required_argument, NULL, CLI_OPT_STOP}, \
    {"ctx", required_argument, NULL, CLI_OPT_CTX}, \
    CLI_CACHE_TYPE_LONGOPT, \
    {"quiet", no_argument, NULL, CLI_OPT_QUIET}, \
    {"json-schema", required_argument, NULL, CLI_OPT_JSON_SCHEMA}, \
    {"logit-bias", required_argument, NULL, CLI_OPT_LOGIT_BIAS}, \
    CLI_JSON_LONGOPT, \
    CLI_SAMPLING_LONGOPTS, \
    CLI_PLACEMENT_LONGOPTS, \
    CLI_GPU_LONGOPTS
#define CLI_CACHE_TYPE_LONGOPT {"cache-type", required_argument, NULL, CLI_OPT_CACHE_TYPE}
/* --cache-type f32|bf16|q8_0 to an enum kli_cache_type. @return 0, or -1 after reporting. */
int cli_parse_cache_type(const char *s, int32_t *out);
/* A session of the model's context with cache type `type`. @return 0, or -1 after
 * reporting. */
int cli_session_create(const struct kli_model *m, int32_t type, struct kli_session **s);
/* Whether a context of ctx tokens at cache type `type` fits the memory this process may still
 * take (available memory, the cgroup's limit, RLIMIT_AS), with the model loaded: the MLA
 * cache grows as the context does, so without this check a long context would fail late,
 * by OOM. @return 0, or -1 after reporting what it needs and what there is. */
int cli_ctx_fits(const struct kli_model *m, int32_t type, int64_t ctx);
#define CLI_GEN_RAW_LONGOPT {"raw", no_argument, NULL, CLI_OPT_RAW}
/* The defaults: 256 tokens, the sampler's defaults, the rest zero. */
void cli_gen_init(struct cli_gen_opts *g);
/* @return 1 if c was one of these options (parsed into g), 0 if not, -1 for a bad value
 * (reported). */
int cli_gen_option(int c, const char *arg, struct cli_gen_opts *g);
/* Checks the sampling options before a model is loaded. @return 0, or -1 after reporting. */
int cli_gen_check(const struct cli_gen_opts *g);
/* The grammar that --json or --json-schema ask for, compiled for tok; *out is NULL when
 * neither was given. @return 0, or -1 after reporting. */
int cli_gen_grammar(const struct cli_gen_opts *g, const struct kli_tokenizer *tok,
                    struct kli_grammar **out);
/* The largest --json-schema file (and response_format schema) read. */
#define CLI_SCHEMA_MAX (1 << 20)

/* The length of the valid UTF-8 sequence at p (1 to 4), or minus the length of its maximal
 * subpart: the bytes that started a sequence before it broke off (at least 1). */
int cli_utf8_seq(const unsigned char *p, size_t n);

/* Text for people (what run and chat generate), written by one rule wherever it goes, a
 * terminal or not, the rule batch's JSON strings keep too: valid UTF-8 passes; each
 * invalid sequence (maximal subpart) becomes U+FFFD, and so does each control character
 * but newline and tab (C0, DEL and C1: ESC, CR, FF and the rest), so that generated text
 * cannot move the cursor, clear the screen or send a terminal escape. A character split
 * between two writes is held until the next; cli_text_end flushes what is held (an
 * unfinished sequence becomes U+FFFD). @return 0, or -1 on a write error. */
struct cli_text {
    unsigned char held[4];
    size_t n_held;
};
int cli_text_write(struct cli_text *t, FILE *f, const char *s, size_t n);
int cli_text_end(struct cli_text *t, FILE *f);

/* Prompts hold no NUL byte: the chat format (kli_chat_render) and JSON strings (cJSON) end
 * text there, so kli refuses such a prompt in every mode rather than cut it silently.
 * @return the offset of the first NUL byte of s[0, n), or with `json`, of the first \u0000
 * escape inside a string of the (valid) JSON text s; -1 if none. */
int64_t cli_find_nul(const char *s, size_t n, int json);

/* The lines of --help texts for the shared option groups above (sampling, placement with
 * -t, GPU): every option a command's table accepts appears in its --help (test-term.sh). */
#define CLI_SAMPLING_HELP \
    "  sampling:  [--temp|--temperature T] [--top-k K] [--top-p P] [--min-p P] [--seed S]\n" \
    "             [--repeat-penalty R] [--presence-penalty P] [--frequency-penalty F]\n" \
    "             [--repeat-last-n N]\n"
#define CLI_JSON_HELP \
    "  JSON:      [--json | --json-schema FILE]   [--logit-bias ID:BIAS[,ID:BIAS]...]\n"
#define CLI_PLACEMENT_HELP \
    "  placement: [-t|--threads N] [--cpus LIST] [--numa POLICY] [--mem-budget SIZE]\n"
#define CLI_GPU_HELP \
    "  GPU:       [--gpu auto|on|off] [--gpu-mem SIZE] [--gpu-experts N|auto]\n" \
    "             [--gpu-profile FILE]\n"

/* The commands of cli_gen.c, NULL-terminated. */
extern const struct cli_command cli_gen_commands[];
/* The commands of cli_tools.c, NULL-terminated. */
extern const struct cli_command cli_tool_commands[];
/* kli perplexity (src/cli_perplexity.c), listed among the tool commands */
int cli_perplexity(int argc, char **argv);
/* The commands of cli_batch.c, NULL-terminated. */
extern const struct cli_command cli_batch_commands[];

/* The key of saved prefix states (kli batch --prefix-dir, kli serve --state-dir; in
 * cli_batch.c): the model's fingerprint and samples of its weight files, so that another
 * checkpoint of the same shape never reuses a state. */
uint64_t cli_model_key(const char *dir, const struct kli_model *m);
/* kli serve (src/serve.c). */
int cli_serve(int argc, char **argv);

/* The built-in demo model (demo.c): writes it to a new temporary directory, whose path
 * goes to `dir`; cli_demo_remove deletes it again. */
int cli_demo_dir(char *dir, size_t cap);
void cli_demo_remove(const char *dir);

#endif
