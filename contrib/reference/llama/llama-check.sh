#!/bin/sh
# llama-check.sh: does libllama (llama.cpp) load the GGUF files `kli convert --to gguf`
# writes, and do llama.cpp and kli compute the same logits on the same GGUF?
#
# usage: llama-check.sh [LLAMA_DIR [KLI_SRC [WORK]]]
#   LLAMA_DIR  llama.cpp source tree with libllama built in LLAMA_DIR/build (CPU, Release)
#   KLI_SRC    kli source tree with kli built in KLI_SRC/build   default: this tree
#   WORK       scratch directory                                 default /tmp/llama-check
# env: KV=f16|f32 (llama.cpp's KV cache type, default f32), TYPES (kli convert types),
#      NICE (default "nice -n 15")
# libllama was built from llama.cpp 1fd6dfe9f3d4b69cce101d832339fbda2d14b056 with
#   (optionally pruned to compile only the Kimi Linear graph; see README.md)
#   cmake -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
#         -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
#         -DCMAKE_BUILD_TYPE=Release
#   cmake --build build -j2 --target llama
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
LLAMA=${1:?usage: llama-check.sh LLAMA_DIR [KLI_SRC [WORK]]}
KLISRC=${2:-$(cd "$HERE/../../.." && pwd)}
WORK=${3:-/tmp/llama-check}
KV=${KV:-f32}
TYPES=${TYPES:-"f32 bf16 q8_0 q6_k q4_k_m q2_k"}
NICE=${NICE:-nice -n 15}
KLI=$KLISRC/build/kli
TINY=$KLISRC/tests/data/tiny-kimi-linear
NANO=$KLISRC/contrib/models/kimi-linear-nano
LGG=$KLISRC/tests/data/gguf/llama
mkdir -p "$WORK/out"
cd "$WORK"

# the two small programs
LIBDIR=$LLAMA/build/bin
[ -e "$LIBDIR/libllama.so" ] || LIBDIR=$(dirname "$(find "$LLAMA/build" -name 'libllama.so*' | head -1)")
cc -O2 -std=c11 -Wall -I"$LLAMA/include" -I"$LLAMA/ggml/include" -o llama-logits \
    "$HERE/llama-logits.c" -L"$LIBDIR" -Wl,-rpath,"$LIBDIR" -lllama -lggml -lggml-base
cc -O2 -std=c11 -Wall -o logits-cmp "$HERE/logits-cmp.c" -lm

# ids: kli's tokenization of English text with the nano model, BOS first (64 ids);
# the tiny model (vocab 512) gets the same ids mod 500, BOS 256 first
TEXT="The quick brown fox jumps over the lazy dog. Once upon a time, there was a small village near the river, where people lived quietly and worked in the fields every day, and the children played in the sun."
printf '%s\n' "$TEXT" > text.txt
{ printf '2048 '; $KLI tokenize -m "$NANO" --file text.txt; } | tr -s ' \n' '\n\n' | grep . > nano.col
[ "$(wc -l < nano.col)" -eq 64 ] || { echo "llama-check: expected 64 ids" >&2; exit 1; }
tr '\n' ' ' < nano.col > nano.ids
{ echo 256; tail -n +2 nano.col | while read -r i; do echo $((i % 500)); done; } | tr '\n' ' ' > tiny.ids

vocab() { case $1 in tiny) echo 512;; nano) echo 2304;; esac; }

# kli's GGUF files
for m in tiny nano; do
    src=$TINY; [ $m = nano ] && src=$NANO
    for t in $TYPES; do
        $NICE "$KLI" convert -m "$src" -o kli-$m-$t.gguf --to gguf --type "$t" --force >/dev/null 2>&1
    done
done

run_kli() {   # model ids out
    $NICE "$KLI" logits -m "$1" --ids-file "$2" -o "$3" -t 1 >/dev/null 2>kli.err || { cat kli.err >&2; return 1; }
}
run_llama() { # model ids out
    $NICE ./llama-logits "$1" "$2" "$3" --kv "$KV" -t 1 >llama.log 2>&1 ||
        { echo "  llama.cpp FAILED on $1:"; grep -iE 'error|failed|exception|key|tensor' llama.log | tail -5 | sed 's/^/    /'; return 1; }
}
cmp_row() {   # label a b V
    printf "%-46s %s\n" "$1" "$(./logits-cmp "$2" "$3" "$4")"
}

echo "== reference: kli on the safetensors models"
run_kli "$TINY" tiny.ids out/kli-tiny-st.f32
run_kli "$NANO" nano.ids out/kli-nano-st.f32

echo "== a. llama.cpp-made GGUF files (tests/data/gguf/llama): llama.cpp vs kli, same file"
for f in "$LGG"/tiny-*.gguf "$LGG"/nano-*.gguf; do
    b=$(basename "$f" .gguf); m=${b%%-*}; V=$(vocab $m)
    run_kli "$f" $m.ids out/kli-on-llama-$b.f32
    run_llama "$f" $m.ids out/llama-on-llama-$b.f32 || continue
    cmp_row "llama($b) vs kli($b)" out/llama-on-llama-$b.f32 out/kli-on-llama-$b.f32 $V
    cmp_row "llama($b) vs kli(safetensors)" out/llama-on-llama-$b.f32 out/kli-$m-st.f32 $V
    cmp_row "  kli($b) vs kli(safetensors)" out/kli-on-llama-$b.f32 out/kli-$m-st.f32 $V
done

echo "== b. kli convert --to gguf files: llama.cpp vs kli, same file"
for m in tiny nano; do
    V=$(vocab $m)
    for t in $TYPES; do
        f=kli-$m-$t.gguf
        run_kli "$f" $m.ids out/kli-on-kli-$m-$t.f32
        run_llama "$f" $m.ids out/llama-on-kli-$m-$t.f32 || continue
        cmp_row "llama(kli-$m-$t) vs kli(kli-$m-$t)" out/llama-on-kli-$m-$t.f32 out/kli-on-kli-$m-$t.f32 $V
        cmp_row "llama(kli-$m-$t) vs kli(safetensors)" out/llama-on-kli-$m-$t.f32 out/kli-$m-st.f32 $V
        cmp_row "  kli(kli-$m-$t) vs kli(safetensors)" out/kli-on-kli-$m-$t.f32 out/kli-$m-st.f32 $V
    done
done

echo "== tokenizer: llama.cpp's llama_tokenize on each nano GGUF vs kli tokenize (same text)"
$KLI tokenize -m "$NANO" --file text.txt > tok-kli.txt
for f in "$LGG"/nano-q4_k_m.gguf kli-nano-f32.gguf; do
    if ./llama-logits --tokenize "$f" text.txt > tok-llama.txt 2>tok.log; then
        if cmp -s tok-kli.txt tok-llama.txt; then echo "$(basename "$f"): same $(wc -w < tok-kli.txt) ids"
        else echo "$(basename "$f"): DIFFERENT"; echo "  kli:   $(cat tok-kli.txt)"; echo "  llama: $(cat tok-llama.txt)"; fi
    else echo "$(basename "$f"): llama.cpp tokenizer load FAILED"; tail -3 tok.log; fi
done

# c. the same kli files with every non-F32 tensor decoded to F32 by ggml's own block
# decoders (gguf-dequant.c): if llama.cpp and kli agree on these to F32 rounding, both read
# the same weights from kli's blocks, and what remains on the quantized files is how each
# computes products with quantized weights (llama.cpp's CPU backend rounds the activations
# to Q8_K/Q8_0/BF16 for those).
echo "== c. kli files decoded to F32 by ggml (gguf-dequant): llama.cpp vs kli, and each vs itself on the quantized file"
cc -O2 -std=c11 -Wall -I"$LLAMA/ggml/include" -o gguf-dequant "$HERE/gguf-dequant.c" \
    -L"$LIBDIR" -Wl,-rpath,"$LIBDIR" -lggml-base
for m in tiny nano; do
    V=$(vocab $m)
    for t in $TYPES; do
        [ "$t" = f32 ] && continue
        [ -e out/llama-on-kli-$m-$t.f32 ] || continue
        ./gguf-dequant kli-$m-$t.gguf deq-$m-$t.gguf 2>/dev/null
        run_kli deq-$m-$t.gguf $m.ids out/kli-on-deq-$m-$t.f32
        run_llama deq-$m-$t.gguf $m.ids out/llama-on-deq-$m-$t.f32 || continue
        cmp_row "llama(deq-$m-$t) vs kli(deq-$m-$t)" out/llama-on-deq-$m-$t.f32 out/kli-on-deq-$m-$t.f32 $V
        cmp_row "  kli(kli-$m-$t) vs kli(deq-$m-$t)" out/kli-on-kli-$m-$t.f32 out/kli-on-deq-$m-$t.f32 $V
        cmp_row "llama(kli-$m-$t) vs llama(deq-$m-$t)" out/llama-on-kli-$m-$t.f32 out/llama-on-deq-$m-$t.f32 $V
    done
done
