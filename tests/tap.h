/*
 * tap.h - a tiny TAP emitter for the unit tests (automake's tap-driver.sh reads it).
 */
#ifndef KLI_TAP_H
#define KLI_TAP_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static int tap_n;
static int tap_failed;

__attribute__((unused)) static void
plan(int n)
{
    printf("1..%d\n", n);
}

__attribute__((unused)) static void
plan_done(void)
{
    printf("1..%d\n", tap_n);
}

__attribute__((format(printf, 2, 3))) static int
ok(int cond, const char *fmt, ...)
{
    va_list ap;

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

#endif
