#!/bin/sh
# gguf-llama.sh - kli and the GGUF files of llama.cpp's tools, both ways.
# `kli info` on every file of tests/data/gguf/llama (made by llama.cpp's converter and ggml's
# quantizers; tests/data/gguf/README.md): the model and the types it holds. Then the files
# `kli convert --to gguf` writes (f32, q8_0, q4_k) read by tests/gguf_read.py, a reader that
# shares no code with kli, against those files: every offset and size valid, the same
# tensor names and shapes, the same hyper-parameters and vocabulary, and values within the
# types' rounding of theirs.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
L="$KLI_TESTDATA/gguf/llama"
NANO="$KLI_SRCDIR/contrib/models/kimi-linear-nano"

# info FILE LAYERS TYPES...: kli info reads FILE as a model of LAYERS layers holding TYPES.
info() {
    f=$1 layers=$2
    shift 2
    t "kli info -m llama/$f" 0 "$KLI_BIN" info -m "$L/$f"
    grep -q "^architecture: kimi_linear, $layers layers" "$tmp/stdout"
    check $? "llama/$f: kimi_linear, $layers layers"
    for ty in "$@"; do
        grep -q "^bytes: .* $ty [0-9]" "$tmp/stdout"
        check $? "llama/$f: holds $ty"
    done
}
info tiny-f32.gguf 5 F32
info tiny-bf16.gguf 5 BF16 F32
info tiny-q8_0.gguf 5 Q8_0 F32
info tiny-q4_k_m.gguf 5 Q4_K Q8_0
info nano-q4_k_m.gguf 4 Q4_K Q6_K
info nano-q2_k.gguf 4 Q2_K Q3_K Q6_K
t "kli info -m llama/vocab.gguf: no tensors, refused" 1 "$KLI_BIN" info -m "$L/vocab.gguf"
grep -q "holds no tensors" "$tmp/stderr"
check $? "llama/vocab.gguf: the message says so: $(head -c 120 "$tmp/stderr")"

need_python numpy "no python3 with numpy for tests/gguf_read.py"
# mine SRC TYPE THEIRS BOUND: kli convert --to gguf --type TYPE of SRC against THEIRS.
mine() {
    out="$tmp/$(basename "$1")-$2.gguf"
    t "kli convert --to gguf --type $2 of $(basename "$1")" 0 \
        "$KLI_BIN" convert -m "$1" -o "$out" --to gguf --type "$2"
    "$PY" "$KLI_SRCDIR/tests/gguf_read.py" "$out" "$L/$3" "$4" >"$tmp/py" 2>&1
    check $? "$2 against llama/$3 within $4: $(head -c 160 "$tmp/py")"
}
mine "$model" f32 tiny-f32.gguf 1e-6
mine "$model" q8_0 tiny-q8_0.gguf 0.01
mine "$model" q4_k tiny-f32.gguf 0.1
mine "$NANO" q4_k nano-q4_k_m.gguf 0.2
echo "1..$n"
exit $fail
