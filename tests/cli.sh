#!/bin/sh
# cli.sh - the kli command as a user meets it: exit codes, messages, output files.
# (tests/man-examples.sh runs the EXAMPLES of kli(1).)
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
kli=$KLI_BIN
model="$KLI_TESTDATA/tiny-kimi-linear"
tmp=$(mktemp -d) || exit 99
trap 'rm -rf "$tmp"' EXIT
n=0
fail=0
t() {   # t DESCRIPTION EXPECTED-STATUS COMMAND...
    desc=$1 want=$2
    shift 2
    "$@" >"$tmp/out" 2>"$tmp/err"
    got=$?
    n=$((n + 1))
    if [ "$got" -eq "$want" ]; then
        echo "ok $n - $desc"
    else
        fail=1
        echo "not ok $n - $desc (exit $got, want $want)"
        sed 's/^/# /' "$tmp/err" | head -5
    fi
}
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
has "--version names the kernels" "$tmp/out" "kernels:"
t "no command is a usage error" 2 "$kli"
t "unknown command is a usage error" 2 "$kli" frobnicate
has "unknown command is named" "$tmp/err" "frobnicate"

t "info" 0 "$kli" info -m "$model"
has "info counts layers" "$tmp/out" "5 layers (4 KDA, 1 MLA; 1 dense, 4 MoE)"
t "info --tensors" 0 "$kli" info -m "$model" --tensors
has "info lists tensors" "$tmp/out" "model.layers.3.self_attn.kv_b_proj.weight"
t "info on a missing directory" 1 "$kli" info -m "$tmp/nope"
has "the message names the path" "$tmp/err" "$tmp/nope"

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
has "bad id is pointed at" "$tmp/err" "character 3"
t "logits with an id outside the vocabulary" 1 "$kli" logits -m "$model" --ids 1,512 \
    -o "$tmp/x.f32"
has "out-of-range id message" "$tmp/err" "outside the vocabulary"
n=$((n + 1))
if [ ! -e "$tmp/x.f32" ] && [ -z "$(ls "$tmp" | grep 'x.f32.tmp')" ]; then
    echo "ok $n - a failed run leaves no output file"
else
    fail=1; echo "not ok $n - a failed run left a file"
fi
t "logits --chunk 0 is rejected" 2 "$kli" logits -m "$model" --ids 1 --chunk 0 -o "$tmp/y"
t "logits with a missing ids file" 1 "$kli" logits -m "$model" --ids-file "$tmp/none" -o "$tmp/y"

echo "1..$n"
exit $fail
