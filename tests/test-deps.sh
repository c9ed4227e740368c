#!/bin/sh
# test-deps.sh - the dependency rules of HACKING, checked by grep:
#   weights/ uses nothing of ours but kli.h and src/internal.h (errors and allocation, no
#   model code); simd/ nothing but kli.h and weights/dtype.h; src/ includes no CUDA headers; the CLI, contrib/examples and
#   the black-box tests include only kli.h; no exit()/abort() in library code.
set -u
: "${KLI_SRCDIR:?}"
cd "$KLI_SRCDIR" || exit 99
n=0
fail=0
check() {   # check DESCRIPTION OFFENDING-LINES
    n=$((n + 1))
    if [ -z "$2" ]; then
        echo "ok $n - $1"
    else
        fail=1
        echo "not ok $n - $1"
        echo "$2" | sed 's/^/# /'
    fi
}
inc() { grep -Hn '^#include "' "$@" 2>/dev/null; }

check "weights/ includes only its own headers, kli.h and internal.h" \
    "$(inc weights/*.c weights/*.h | grep -vE '"(config|kli|internal|weights|dtype|mmap|wbuf)\.h"')"
check "simd/ includes only its own headers, dtype.h and kli.h" \
    "$(inc simd/*.c simd/*.h | grep -vE '"(config|kli|simd|dtype)\.h"')"
check "src/ includes no CUDA headers" \
    "$(grep -Hn '#include' src/*.c src/*.h | grep -E 'cuda|\.cuh' | grep -v 'kli_cuda\.h')"
check "the CLI includes only kli.h (and its own cli.h, cli_*.h)" \
    "$(inc src/cli*.c src/cli*.h | grep -vE '"(config|kli|cli|cli_[a-z_]+)\.h"')"
check "contrib/examples include only kli.h" \
    "$(inc contrib/examples/*.c 2>/dev/null | grep -vE '"kli\.h"')"
check "no exit() or abort() in library code (kli_panic in error.c is the one assert path)" \
    "$(grep -HnE '\b(exit|abort|_exit)\s*\(' src/*.c weights/*.c simd/*.c 2>/dev/null |
       grep -v '^src/cli' | grep -v '^src/error\.c' | grep -vE '^\S+:\s*[0-9]+:\s*(/\*|\*)')"
check "no #pragma omp outside threads.c" \
    "$(grep -Hn '#pragma omp' src/*.c simd/*.c weights/*.c | grep -v '^src/threads\.c')"
check "no ISA intrinsics headers outside simd/<isa>.c" \
    "$(grep -Hn 'immintrin\.h\|arm_neon\.h' src/*.c weights/*.c simd/generic.c simd/dispatch.c)"
echo "1..$n"
exit $fail
