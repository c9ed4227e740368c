#!/bin/sh
# test-deps.sh - the dependency rules of HACKING, checked by grep:
#   weights/ uses nothing of ours but kli.h, src/internal.h (errors and allocation, no
#   model code) and the header-only src/util.h (which the CLI may use too); simd/ nothing
#   but kli.h and weights/dtype.h; src/ includes no CUDA headers; the CLI, contrib/examples
#   and the black-box tests include only kli.h; no exit()/abort() in library code; only
#   layer.c, of the forward pass, calls backend_*. Also the
#   design notes: every doc/*.md a comment (or a manual page, or a note) cites exists, with
#   the section ("doc/model.md 4.6", "section 2") or decision ("decision 1") it names.
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

check "weights/ includes only its own headers, kli.h, internal.h and util.h" \
    "$(inc weights/*.c weights/*.h |
       grep -vE '"(config|kli|internal|util|weights|dtype|mmap|wbuf|xxhash|gguf)\.h"')"
check "simd/ includes only its own headers, dtype.h and kli.h" \
    "$(inc simd/*.c simd/*.h | grep -vE '"(config|kli|simd|dtype|avx2|gemm|amx)\.h"')"
check "src/ includes no CUDA headers" \
    "$(grep -Hn '#include' src/*.c src/*.h | grep -E 'cuda|\.cuh' | grep -v 'kli_cuda\.h')"
check "the CLI includes only kli.h (and its own cli.h, cli_*.h, and the header-only util.h)" \
    "$(inc src/cli*.c src/cli*.h | grep -vE '"(config|kli|util|cli|cli_[a-z_]+)\.h"')"
check "contrib/examples include only kli.h" \
    "$(inc contrib/examples/*.c 2>/dev/null | grep -vE '"kli\.h"')"
check "no exit() or abort() in library code (panic in error.c is the one assert path)" \
    "$(grep -HnE '\b(exit|abort|_exit)\s*\(' src/*.c weights/*.c simd/*.c 2>/dev/null |
       grep -v '^src/cli' | grep -v '^src/error\.c' | grep -vE '^\S+:\s*[0-9]+:\s*(/\*|\*)')"
check "only layer.c, of the forward pass, asks the device: no backend_* in the math files" \
    "$(grep -Hn 'backend\.h\|backend_[a-z_]*(' src/forward.c src/kda.c src/mla.c src/moe.c \
       src/moe_sched.c src/ffn.c 2>/dev/null)"
check "no OpenMP: parallel work goes through threads.c's pool" \
    "$(grep -Hn '#pragma omp\|omp\.h' src/*.c src/*.h simd/*.c weights/*.c)"
check "no ISA intrinsics outside simd/<isa>.c and simd/<isa>.h (gemm.h and amx.h, drivers, have none)" \
    "$(grep -Hn 'immintrin\.h\|arm_neon\.h' src/*.c weights/*.c simd/generic.c simd/dispatch.c \
           simd/gemm.h simd/amx.h
       grep -HnE '\b_mm[0-9]*_[a-z]|\b__m(128|256|512)|\b_tile_' src/*.c src/*.h weights/*.c \
           weights/*.h simd/generic.c simd/dispatch.c simd/simd.h simd/gemm.h simd/amx.h)"
# Citations of the design notes: "doc/<name>.md", optionally followed by "section N",
# "decision N" or a bare section number N or N.M. A section is a heading "## N." or
# "### N.M"; a decision is item "N." of model.md's "## Decisions". (The xxHash
# repository's doc/xxhash_spec.md is not ours.)
doc_cites=$(grep -rnoIE \
    'docs?/[A-Za-z0-9_-]+\.md(,? (section|decision) [0-9]+(\.[0-9]+)?| [0-9]+(\.[0-9]+)?)?' \
    src simd weights cuda tests contrib man doc HACKING README.md Makefile.am configure.ac \
    2>/dev/null | grep -v 'doc/xxhash_spec\.md')
check "comments cite design notes that exist in doc/, and their sections" \
    "$(echo "$doc_cites" | while IFS= read -r c; do
        [ -n "$c" ] || continue
        ref=${c#*:*:}
        f=${ref%%.md*}.md
        rest=${ref#"$f"}
        if [ ! -f "$f" ]; then
            echo "$c: no file $f"
            continue
        fi
        num=$(echo "$rest" | grep -oE '[0-9]+(\.[0-9]+)?')
        [ -n "$num" ] || continue
        re=$(echo "$num" | sed 's/\./\\./g')
        case $rest in
        *decision*)
            awk '/^## Decisions/ { d = 1; next } /^## / { d = 0 } d' "$f" |
                grep -qE "^$re\. " || echo "$c: $f has no decision $num" ;;
        *)
            grep -qE "^#+ $re\.? " "$f" || echo "$c: $f has no section $num" ;;
        esac
    done)"
echo "1..$n"
exit $fail
