#!/bin/sh
# recipes.sh KLI MODEL TEXT WORKDIR [IMATRIX]
#
# Each recipe of kli quantize (and q4 for comparison) on MODEL, scored on TEXT against the
# f32 copy: "recipe kld_mean kld_err top1 bits_total file_bytes" lines, bits_total being kli
# info's total bits per weight. With IMATRIX, q2_k and q3_k_m again with --imatrix
# ("q2_k+imatrix" ...). doc/quality.md ("Recipes") is its output on the nano model.
set -eu
kli=$1 model=$2 text=$3 work=$4 imat=${5:-}
mkdir -p "$work"
"$kli" quantize -m "$model" -o "$work/f32" --type f32 --force 2>/dev/null
"$kli" perplexity -m "$work/f32" -f "$text" --ctx 512 -t 1 --kld-base "$work/base.kld" \
    >/dev/null 2>&1
# score NAME DIR
score() {
    j=$("$kli" perplexity -m "$2" -f "$text" --ctx 512 -t 1 --json \
        --kld-base "$work/base.kld" 2>/dev/null)
    k=$(echo "$j" | sed -n 's/.*"kld_mean": \([^,]*\),.*/\1/p')
    e=$(echo "$j" | sed -n 's/.*"kld_err": \([^,]*\),.*/\1/p')
    a=$(echo "$j" | sed -n 's/.*"top1_agreement": \([^,]*\),.*/\1/p')
    b=$("$kli" info -m "$2" | sed -n 's/^bits.* total \([0-9.]*\)$/\1/p')
    s=$(wc -c < "$2/model.safetensors")
    echo "$1 $k $e $a $b $s"
}
for r in q4 q2_k q3_k_m q4_k_m q5_k_m q6_k q8_0; do
    "$kli" quantize -m "$model" -o "$work/$r" --type $r --force 2>/dev/null
    score $r "$work/$r"
done
[ -n "$imat" ] || exit 0
for r in q2_k q3_k_m q4_k_m; do
    "$kli" quantize -m "$model" -o "$work/$r-im" --type $r --imatrix "$imat" --force \
        2>/dev/null
    score "$r+imatrix" "$work/$r-im"
done
