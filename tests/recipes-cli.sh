#!/bin/sh
# recipes-cli.sh - the recipes of kli quantize --type on the nano demo model, end to end: an
# unknown recipe is refused naming the valid ones; kli info names each recipe's classes; the
# mean KLD of `kli perplexity --kld-base` against f32 on held-out text falls strictly
# q2_k > q3_k_m > q4_k_m > q6_k, with the issue's targets that the nano model can show
# (q4_k_m at most a third of q4's, q3_k_m below q4's; their bits per weight are not: see
# doc/quality.md, "Recipes"); --imatrix lowers q2_k's. (test-recipes checks each tensor's
# type and the bits per weight.)
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
K="$KLI_BIN" N="$KLI_SRCDIR/contrib/models/kimi-linear-nano"

# the held-out text, split as imatrix-cli.sh splits it: 7000 bytes to calibrate, 4000 to
# score
tail -c +7001 "$KLI_SRCDIR/contrib/train/heldout-eval.txt" | head -c 4000 >"$tmp/eval.txt"
head -c 7000 "$KLI_SRCDIR/contrib/train/heldout-eval.txt" >"$tmp/cal.txt"

if tcase refuse; then
    t "an unknown recipe is refused" 1 "$K" quantize -m "$N" -o "$tmp/x" --type q4_k_s
    grep -q 'q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k, q8_0' "$tmp/stderr"
    check $? "... naming the recipes"
    [ ! -e "$tmp/x/model.safetensors" ]
    check $? "... and writing nothing"
    t "kli convert takes a recipe too" 0 "$K" convert -m "$N" -o "$tmp/q4km.kli" \
        --type q4_k_m
    t "kli info on it" 0 "$K" info -m "$tmp/q4km.kli"
    want='experts [0-9.]* (Q8_0+Q4_K), .*KDA attention [0-9.]* (Q8_0+Q6_K), '
    want="${want}MLA attention [0-9.]* (Q8_0+Q4_K), dense ffn 8.50 (Q8_0), "
    want="${want}router 16.00 (BF16), embeddings 6.56 (Q6_K), lm_head 5.50 (Q5_K)"
    grep -q "$want" "$tmp/stdout"
    check $? "... shows q4_k_m's types per class"
fi

# kld NAME ARGS...: quantizes nano with ARGS and sets $kld to its mean KLD on eval.txt.
kld() {
    name=$1
    shift
    kld=""
    "$K" quantize -m "$N" -o "$tmp/$name" --force "$@" >/dev/null 2>&1 &&
        "$K" perplexity -m "$tmp/$name" -f "$tmp/eval.txt" --ctx 256 -t 2 \
            --kld-base "$tmp/base" --json >"$tmp/$name.json" 2>/dev/null &&
        kld=$(sed 's/.*"kld_mean": \([^,]*\),.*/\1/' "$tmp/$name.json")
    echo "# $name: mean KLD $kld"
    [ -n "$kld" ]
}

# less A B: whether A < B (floating point)
less() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 < b + 0) }'; }

if tcase order; then
    t "the base: stored weights" 0 "$K" perplexity -m "$N" -f "$tmp/eval.txt" --ctx 256 \
        -t 2 --kld-base "$tmp/base"
    kld q4 --type q4 && q4=$kld && kld q2_k --type q2_k && q2=$kld &&
        kld q3_k_m --type q3_k_m && q3=$kld && kld q4_k_m --type q4_k_m && q4m=$kld &&
        kld q6_k --type q6_k && q6=$kld
    check $? "quantize and score q4 and the recipes"
    less "${q6:-1}" "${q4m:-0}" && less "${q4m:-1}" "${q3:-0}" && less "${q3:-1}" "${q2:-0}"
    check $? "mean KLD q6_k < q4_k_m < q3_k_m < q2_k (${q6:-} ${q4m:-} ${q3:-} ${q2:-})"
    less "${q4m:-1}" "$(awk -v a="${q4:-0}" 'BEGIN { print a / 3 }')"
    check $? "q4_k_m's mean KLD is below a third of q4's (${q4m:-} against ${q4:-})"
    less "${q3:-1}" "${q4:-0}"
    check $? "q3_k_m's mean KLD is below q4's"
fi

if tcase imatrix; then
    [ -e "$tmp/base" ] || "$K" perplexity -m "$N" -f "$tmp/eval.txt" --ctx 256 -t 2 \
        --kld-base "$tmp/base" >/dev/null 2>&1
    t "kli imatrix on nano" 0 "$K" imatrix -m "$N" -f "$tmp/cal.txt" -o "$tmp/nano.imat" \
        --ctx 256 -t 2
    kld q2_k --type q2_k && a=$kld && kld q2_k-im --type q2_k --imatrix "$tmp/nano.imat" &&
        b=$kld
    check $? "q2_k with and without the imatrix"
    less "${b:-1}" "${a:-0}"
    check $? "--imatrix lowers q2_k's mean KLD (${a:-} -> ${b:-}; the issue's 20% is not \
met on this model: doc/quality.md)"
fi

tdone
