#!/bin/sh
# cli.sh - the kli command as a user meets it: exit codes, messages, output files.
# (tests/man-examples.sh runs the EXAMPLES of kli(1).)
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
has() {   # has DESCRIPTION FILE PATTERN
    n=$((n + 1))
    if grep -q -- "$3" "$2"; then
        echo "ok $n - $1"
    else
        fail=1
        echo "not ok $n - $1: '$3' not in $(basename "$2")"
        sed 's/^/# /' "$2" | head -5
    fi
}

t "--version" 0 "$kli" --version
has "--version names the kernels" "$tmp/stdout" "kernels:"
t "no command is a usage error" 2 "$kli"
t "unknown command is a usage error" 2 "$kli" frobnicate
has "unknown command is named" "$tmp/stderr" "frobnicate"

t "info" 0 "$kli" info -m "$model"
has "info counts layers" "$tmp/stdout" "5 layers (4 KDA, 1 MLA; 1 dense, 4 MoE)"
t "info --tensors" 0 "$kli" info -m "$model" --tensors
has "info lists tensors" "$tmp/stdout" "model.layers.3.self_attn.kv_b_proj.weight"
t "info on a missing directory" 1 "$kli" info -m "$tmp/nope"
has "the message names the path" "$tmp/stderr" "$tmp/nope"

t "logits" 0 "$kli" logits -m "$model" --ids 1,2,3 -o "$tmp/l.f32"
n=$((n + 1))
if [ "$(wc -c <"$tmp/l.f32")" -eq $((3 * 512 * 4)) ]; then echo "ok $n - logits size"; else
    fail=1; echo "not ok $n - logits size"; fi
printf '1 2\n3' >"$tmp/ids.txt"
t "logits --ids-file with whitespace" 0 "$kli" logits -m "$model" --ids-file "$tmp/ids.txt" \
    --chunk 1 -o "$tmp/l1.f32"
t "logits to stdout" 0 "$kli" logits -m "$model" --ids 5 -o -
t "logits without -o" 2 "$kli" logits -m "$model" --ids 1
t "logits with a bad id" 2 "$kli" logits -m "$model" --ids 1,x,3 -o "$tmp/x.f32"
has "bad id is pointed at" "$tmp/stderr" "character 3"
t "logits with an id outside the vocabulary" 1 "$kli" logits -m "$model" --ids 1,512 \
    -o "$tmp/x.f32"
has "out-of-range id message" "$tmp/stderr" "outside the vocabulary"
n=$((n + 1))
if [ ! -e "$tmp/x.f32" ] && [ -z "$(ls "$tmp" | grep 'x.f32.tmp')" ]; then
    echo "ok $n - a failed run leaves no output file"
else
    fail=1; echo "not ok $n - a failed run left a file"
fi
t "logits --chunk 0 is rejected" 2 "$kli" logits -m "$model" --ids 1 --chunk 0 -o "$tmp/y"
t "logits with a missing ids file" 1 "$kli" logits -m "$model" --ids-file "$tmp/none" -o "$tmp/y"

# ---- session state: --save-state / --load-state, /save and /load ----
t "run uninterrupted" 0 "$kli" run -m "$model" --raw -p 'Once' -n 12 --temp 1 --seed 9 --quiet
cp "$tmp/stdout" "$tmp/full.txt"
t "run --save-state after the prompt" 0 "$kli" run -m "$model" --raw -p 'Once' -n 0 --temp 1 \
    --seed 9 --quiet --save-state "$tmp/st"
t "run --load-state continues" 0 "$kli" run -m "$model" --raw -p '' -n 12 --temp 1 --seed 9 \
    --quiet --load-state "$tmp/st"
n=$((n + 1))
if cmp -s "$tmp/stdout" "$tmp/full.txt"; then
    echo "ok $n - a saved and loaded run continues as the uninterrupted one"
else
    fail=1; echo "not ok $n - the continuation after --load-state differs"
fi
t "chat format after --load-state" 0 "$kli" run -m "$model" -p 'More' -n 4 --quiet \
    --load-state "$tmp/st" --save-state "$tmp/st2"
t "--load-state of a missing file" 1 "$kli" run -m "$model" -p x -n 1 --load-state "$tmp/none"
has "the missing state file is named" "$tmp/stderr" "$tmp/none"
cp "$tmp/st" "$tmp/bad"
printf 'XXXX' | dd of="$tmp/bad" bs=1 seek=200 conv=notrunc 2>/dev/null
t "--load-state of a damaged file" 1 "$kli" run -m "$model" -p x -n 1 --load-state "$tmp/bad"
has "the damage is reported" "$tmp/stderr" "damaged"
t "--load-state longer than --ctx" 1 "$kli" run -m "$model" -p x -n 1 --ctx 2 \
    --load-state "$tmp/st2"
has "the context limit is named" "$tmp/stderr" "ctx_max"
t "chat refuses --load-state" 2 "$kli" chat -m "$model" --load-state "$tmp/st"
printf '%s\n' 'Hi' "/save $tmp/c.state" '/load' "/load $tmp/c.state" 'Again' "/load $tmp/none" \
    >"$tmp/chat.in"
t "chat /save and /load" 0 sh -c '"$1" chat -m "$2" -n 4 <"$3"' sh "$kli" "$model" "$tmp/chat.in"
has "/save reports" "$tmp/stdout" "(saved "
has "/load reports" "$tmp/stdout" "(loaded "
has "/load without a file shows the usage" "$tmp/stdout" "usage: /load FILE"
has "a failed /load is reported" "$tmp/stderr" "$tmp/none"

# ---- latent cache types: --cache-type, info, --ctx against the memory there is ----
t "info" 0 "$kli" info -m "$model" --ctx 1000
has "info gives the cache row of each type" "$tmp/stdout" "f32 320 bytes, bf16 160 bytes"
has "info --ctx gives the context's memory" "$tmp/stdout" "at --ctx 1000: f32 0.000 GiB"
t "run --cache-type bf16" 0 "$kli" run -m "$model" --raw -p 'Once' -n 12 --temp 1 --seed 9 \
    --quiet --cache-type bf16
cp "$tmp/stdout" "$tmp/bf16.txt"
t "bf16: --save-state after the prompt" 0 "$kli" run -m "$model" --raw -p 'Once' -n 0 \
    --temp 1 --seed 9 --quiet --cache-type bf16 --save-state "$tmp/stb"
t "bf16: --load-state continues" 0 "$kli" run -m "$model" --raw -p '' -n 12 --temp 1 \
    --seed 9 --quiet --cache-type bf16 --load-state "$tmp/stb"
n=$((n + 1))
if cmp -s "$tmp/stdout" "$tmp/bf16.txt"; then
    echo "ok $n - a bf16 state saved and loaded continues as the uninterrupted run"
else
    fail=1; echo "not ok $n - the bf16 continuation after --load-state differs"
fi
t "a bf16 state loads into an f32 run (converted)" 0 "$kli" run -m "$model" --raw -p '' \
    -n 4 --quiet --load-state "$tmp/stb"
t "--cache-type with an unknown type" 2 "$kli" run -m "$model" -p x -n 1 --cache-type f16
has "the types are listed" "$tmp/stderr" "none of f32, bf16, q8_0"
t "q8_0 on rows of 64 + 16 values" 1 "$kli" run -m "$model" -p x -n 1 --cache-type q8_0
has "the rows are named" "$tmp/stderr" "64 latent + 16 rope"
# (AddressSanitizer reserves terabytes of shadow address space: it cannot start under
# ulimit -v, as tests/test-limits.sh says too.)
if grep -q -a -e __asan_init "$kli"; then
    ok "--ctx past the memory allowed # SKIP AddressSanitizer cannot run under ulimit -v"
else
    t "--ctx past the memory allowed, up front" 1 sh -c 'ulimit -v 4000000; exec "$@"' sh \
        "$kli" run -m "$model" -p x -n 1 --ctx 1000000000
    has "what the context needs and the limit are named" "$tmp/stderr" \
        "needs 309.[0-9]* GiB for its f32 latent cache.*RLIMIT_AS"
fi

# ---- tokenize / detokenize on a directory holding only the two tokenizer files ----
tokdir="$KLI_TESTDATA/tokenizer"
t "tokenize the corpus" 0 "$kli" tokenize -m "$tokdir" --file "$tokdir/corpus.txt"
cp "$tmp/stdout" "$tmp/corpus.ids"
t "detokenize it back" 0 "$kli" detokenize -m "$tokdir" --file "$tmp/corpus.ids"
n=$((n + 1))
if cmp -s "$tmp/stdout" "$tokdir/corpus.txt"; then echo "ok $n - corpus round trip is byte-exact"
else fail=1; echo "not ok $n - corpus round trip differs"; fi
for py in python3 /usr/bin/python3; do
    if "$py" -c 'import json' 2>/dev/null; then
        n=$((n + 1))
        for mode in ordinary special; do
            flag=""
            [ "$mode" = special ] && flag="--special"
            # shellcheck disable=SC2086
            "$kli" tokenize -m "$tokdir" $flag --file "$tokdir/corpus.txt" >"$tmp/$mode.ids"
        done
        if "$py" - "$tokdir/golden.json" "$tokdir/corpus.txt" "$tmp" <<'PY'
import json, sys
g = json.load(open(sys.argv[1]))
text = open(sys.argv[2], encoding="utf-8").read()
case = [c for c in g["cases"] if c["text"] == text]
ok = bool(case)
for mode in ("ordinary", "special"):
    got = [int(x) for x in open(sys.argv[3] + "/" + mode + ".ids").read().split()]
    ok = ok and got == case[0][mode]
sys.exit(0 if ok else 1)
PY
        then echo "ok $n - kli tokenize equals tiktoken's ids for the whole corpus, both modes"
        else fail=1; echo "not ok $n - kli tokenize differs from the golden ids"; fi
        break
    fi
done
printf '\377\376bad' >"$tmp/bad.txt"
t "invalid UTF-8 is refused" 1 "$kli" tokenize -m "$tokdir" --file "$tmp/bad.txt"
has "the offset is named" "$tmp/stderr" "offset"
t "an unknown id is refused by detokenize" 1 sh -c "echo 999999 | '$kli' detokenize -m '$tokdir'"

# ---- kli convert: one .kli file that every -m accepts ----
t "convert" 0 "$kli" convert -m "$model" -o "$tmp/m.kli"
t "info on a .kli" 0 "$kli" info -m "$tmp/m.kli" --verify
has "info on a .kli counts layers" "$tmp/stdout" "5 layers (4 KDA, 1 MLA; 1 dense, 4 MoE)"
has "info --verify reports the checksums" "$tmp/stdout" "every checksum matches"
t "logits from the directory" 0 "$kli" logits -m "$model" --ids 1,2,3 -o "$tmp/ld.f32"
t "logits from the .kli" 0 "$kli" logits -m "$tmp/m.kli" --ids 1,2,3 -o "$tmp/lk.f32"
n=$((n + 1))
if cmp -s "$tmp/ld.f32" "$tmp/lk.f32"; then echo "ok $n - the .kli gives the same logits"
else fail=1; echo "not ok $n - the .kli logits differ"; fi
t "run on a .kli" 0 "$kli" run -m "$tmp/m.kli" --raw -p 'Once' -n 4 --temp 0 --quiet
printf 'Hello, <|im_end|> world' >"$tmp/tok.txt"
t "tokenize with a .kli" 0 "$kli" tokenize -m "$tmp/m.kli" --special --file "$tmp/tok.txt"
cp "$tmp/stdout" "$tmp/tk.ids"
t "tokenize with the directory" 0 "$kli" tokenize -m "$model" --special --file "$tmp/tok.txt"
n=$((n + 1))
if cmp -s "$tmp/stdout" "$tmp/tk.ids"; then echo "ok $n - the .kli tokenizer gives the same ids"
else fail=1; echo "not ok $n - the .kli tokenizer gives other ids"; fi
t "quantize reads a .kli" 0 "$kli" quantize -m "$tmp/m.kli" -o "$tmp/mq" --type q8_0
t "and its output opens" 0 "$kli" info -m "$tmp/mq"
t "convert refuses to overwrite" 1 "$kli" convert -m "$model" -o "$tmp/m.kli" --type q8_0
has "the refusal names --force" "$tmp/stderr" "use --force"
t "convert --force --type q8_0" 0 "$kli" convert -m "$model" -o "$tmp/m.kli" --type q8_0 --force
t "convert with a bad type" 1 "$kli" convert -m "$model" -o "$tmp/x.kli" --type q7
t "convert without -o" 2 "$kli" convert -m "$model"
n=$((n + 1))
if [ ! -e "$tmp/x.kli" ] && [ ! -e "$tmp/x.kli.tmp" ]; then
    echo "ok $n - a failed convert leaves no file"
else fail=1; echo "not ok $n - a failed convert left a file"; fi
head -c 100000 "$tmp/m.kli" >"$tmp/cut.kli"
t "a truncated .kli is refused" 1 "$kli" info -m "$tmp/cut.kli"
has "truncation is named" "$tmp/stderr" "truncated"

# ---- placement: --cpus, --numa, info --topology --------------------------------------------
t "info --topology" 0 "$kli" info --topology -m "$model" --numa partition
has "it shows the workers" "$tmp/stdout" "workers:"
t "--numa with a bad policy is a usage error" 2 "$kli" logits -m "$model" --ids 1 -o - --numa x
t "--cpus naming a CPU the machine lacks" 1 "$kli" logits -m "$model" --ids 1 -o - --cpus 4095
has "the CPU is named" "$tmp/stderr" "CPU 4095"
t "info --topology with a bad --cpus" 1 "$kli" info --topology --cpus 4095

echo "1..$n"
exit $fail
