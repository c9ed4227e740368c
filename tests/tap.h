/*
 * tap.h - a tiny TAP emitter for the unit tests (automake's tap-driver.sh reads it), and the
 * selection of named cases:
 *
 *     tests/test-kda                        every case
 *     tests/test-kda strided 'strong_*'     the cases named (shell patterns, fnmatch(3))
 *     tests/test-kda -l                     the names of the cases, one a line
 *
 * main() calls tap_init(argc, argv) first and wraps each case in `if (tap_case("name"))`.
 * A name that matches no case is an error (reported by plan_done), not a silent pass.
 */
#ifndef KLI_TAP_H
#define KLI_TAP_H

#include <fnmatch.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TAP_MAX_NAMES 64

static int tap_n;
static int tap_failed;
static int tap_listing;                      /* -l: print the case names, run nothing */
static int tap_n_names;                      /* case names given on the command line */
static const char *tap_names[TAP_MAX_NAMES];
static int tap_matched[TAP_MAX_NAMES];

/* Reads `[-l] [case...]` from the command line; exits 2 on anything else. */
__attribute__((unused)) static void
tap_init(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-l") == 0) {
            tap_listing = 1;
        } else if (argv[i][0] == '-' || tap_n_names == TAP_MAX_NAMES) {
            fprintf(stderr, "usage: %s [-l] [case...]\n"
                    "  -l     list the cases\n"
                    "  case   run only the cases named (shell patterns); default all\n",
                    argv[0]);
            exit(strcmp(argv[i], "-h") == 0 ? 0 : 2);
        } else {
            tap_names[tap_n_names++] = argv[i];
        }
    }
}

/* Whether the case `name` runs: every case when none was named, else those named. Under -l
 * it prints the name instead and the case does not run. */
__attribute__((unused)) static int
tap_case(const char *name)
{
    int run = tap_n_names == 0;

    if (tap_listing) {
        printf("%s\n", name);
        return 0;
    }
    for (int i = 0; i < tap_n_names; i++) {
        if (fnmatch(tap_names[i], name, 0) == 0) {
            tap_matched[i] = 1;
            run = 1;
        }
    }
    return run;
}

/* A case that is one function: a table of them runs through tap_run. */
struct tap_fn {
    const char *name;
    void (*run)(void);
};

/* Runs (or under -l lists) the n cases of the table in order. */
__attribute__((unused)) static void
tap_run(const struct tap_fn *cases, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (tap_case(cases[i].name))
            cases[i].run();
    }
}

/* tap_case, and when the case runs, *state = seed: a case that draws random inputs starts
 * from its seed, so that run alone it sees what it sees in the whole run. */
__attribute__((unused)) static int
tap_case_seeded(const char *name, uint64_t *state, uint64_t seed)
{
    if (!tap_case(name))
        return 0;
    *state = seed;
    return 1;
}

/* Under -l, or when a name given matched no case: ends the program (status 0, or 1 with a
 * "Bail out!"). Called by plan_done. */
__attribute__((unused)) static void
tap_check_names(void)
{
    if (tap_listing) {
        fflush(stdout);
        exit(0);
    }
    for (int i = 0; i < tap_n_names; i++) {
        if (!tap_matched[i]) {
            printf("Bail out! no case matches \"%s\" (-l lists them)\n", tap_names[i]);
            exit(1);
        }
    }
}

/* tap_init for a test not split into cases: it is one case, "all"; when that is not
 * selected the program ends here. */
__attribute__((unused)) static void
tap_init_whole(int argc, char **argv)
{
    tap_init(argc, argv);
    if (!tap_case("all")) {
        tap_check_names();
        printf("1..0\n");
        exit(0);
    }
}

__attribute__((unused)) static void
plan(int n)
{
    if (tap_listing || tap_n_names > 0)
        return;   /* a selection: the count is not known, plan_done prints it at the end */
    printf("1..%d\n", n);
}

__attribute__((unused)) static void
plan_done(void)
{
    tap_check_names();
    printf("1..%d\n", tap_n);
}

__attribute__((format(printf, 2, 3))) static int
ok(int cond, const char *fmt, ...)
{
    va_list ap;

    if (tap_listing)
        return cond;   /* -l prints the case names only */
    tap_n++;
    printf("%s %d - ", cond ? "ok" : "not ok", tap_n);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    if (!cond)
        tap_failed++;
    return cond;
}

__attribute__((format(printf, 1, 2), unused)) static void
diag(const char *fmt, ...)
{
    va_list ap;

    if (tap_listing)
        return;   /* -l prints the case names only */
    printf("# ");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
}

__attribute__((unused)) static void
skip_all(const char *why)
{
    printf("1..0 # SKIP %s\n", why);
    exit(0);
}

__attribute__((unused)) static int
tap_exit(void)
{
    return tap_failed ? 1 : 0;
}

/* TAP_MAIN(cases) defines the whole main() of a test that is just the table `cases` (an
 * array of struct tap_fn): tap_init, tap_run, plan_done, and the exit status. */
#define TAP_MAIN(cases) \
    int \
    main(int argc, char **argv) \
    { \
        tap_init(argc, argv); \
        tap_run(cases, sizeof(cases) / sizeof((cases)[0])); \
        plan_done(); \
        return tap_exit(); \
    }

#endif
