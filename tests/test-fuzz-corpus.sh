#!/bin/sh
# test-fuzz-corpus.sh - replays the fuzz corpus (TAP): every file in tests/fuzz/corpus/TARGET
# goes through the harness tests/fuzz/fuzz-TARGET, which checks the parser's promises on it
# (no crash, a message with every failure, a success that keeps its invariants). The corpus
# is what libFuzzer found (minimised with -merge=1), with the inputs of fixed bugs among it,
# so a regression in any parser fails `make check` without clang. With --enable-fuzzing the
# harnesses are libFuzzer binaries, which run the files given as arguments the same way.
# tests/fuzz/README says how the corpus was made and how to extend it.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
bindir=$(dirname "$KLI_BIN")
corpus="$KLI_SRCDIR/tests/fuzz/corpus"
# the harnesses that need a fixture find it through these
KLI_FUZZ_TOKENIZER_DIR="$KLI_TESTDATA/tokenizer"
KLI_FUZZ_MODEL_DIR="$KLI_TESTDATA/tiny-kimi-linear"
export KLI_FUZZ_TOKENIZER_DIR KLI_FUZZ_MODEL_DIR

for target in safetensors packed config tokenizer tokfile snapshot serve-req gguf schema toolcall; do
    bin="$bindir/tests/fuzz/fuzz-$target"
    files=$(ls "$corpus/$target" 2>/dev/null | wc -l)
    if [ ! -x "$bin" ]; then
        notok "fuzz-$target: $bin is not built"
        continue
    fi
    if [ "$files" -eq 0 ]; then
        notok "fuzz-$target: no corpus in $corpus/$target"
        continue
    fi
    # one process for the whole directory; the file names are libFuzzer's hex digests and
    # the names given to reproducers (no blanks), so the list splits safely
    # shellcheck disable=SC2046
    if "$bin" $(ls -d "$corpus/$target"/*) >"$tmp/out" 2>&1; then
        ok "fuzz-$target: $files corpus files replay cleanly"
    else
        notok "fuzz-$target: a corpus file fails"
        tail -n 20 "$tmp/out" | sed 's/^/# /'
    fi
done
echo "1..$n"
exit $fail
