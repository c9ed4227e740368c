/*
 * error.c - status strings and the sticky error out-parameter.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

const char *
kli_strerror(int code)
{
    switch (code) {
    case KLI_OK: return "success";
    case KLI_E_NOMEM: return "out of memory";
    case KLI_E_IO: return "input/output error";
    case KLI_E_FORMAT: return "malformed input";
    case KLI_E_UNSUPPORTED: return "unsupported";
    case KLI_E_RANGE: return "value out of range";
    case KLI_E_CUDA: return "CUDA error";
    case KLI_E_INVALID: return "invalid argument";
    case KLI_E_INTERRUPTED: return "interrupted";
    default: return "unknown error";
    }
}

const char *
kli_version(void)
{
    return KLI_VERSION_STRING;
}

int
err_set(struct kli_err *err, int code, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || err->code != 0)
        return code;
    err->code = code;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    return code;
}

const char *
err_path_tail(const char *path)
{
    size_t len = strlen(path);

    return len > 96 ? path + len - 96 : path;
}

void
panic(const char *file, int line, const char *what)
{
    fprintf(stderr, "kli: internal error at %s:%d: %s\n", file, line, what);
    abort();
}

int
opts_take(void *dflt, size_t cap, const void *opt, const char *fn, struct kli_err *err)
{
    size_t n;

    if (opt == NULL)
        return KLI_OK;
    memcpy(&n, opt, sizeof(n));
    if (n == 0)
        return err_set(err, KLI_E_INVALID, "%s: options not filled by their _init function",
                       fn);
    memcpy(dflt, opt, n < cap ? n : cap);
    memcpy(dflt, &cap, sizeof(cap));
    return KLI_OK;
}
