#!/bin/sh
# imatrix-cli.sh - kli imatrix and kli quantize --imatrix on the nano demo model: a file
# collected from the first half of the held-out text, quantize with it (the summary of
# weighted and unweighted matrices), the mean KLD of `kli perplexity --kld-base` on the
# second half with and without it (lower with it, at q4 and at each K type kli can run; at
# q2_k by more than 10% with --covariance's error feedback), and
# hostile input: an empty text, one shorter than a chunk, -o naming the model or the text, a
# FIFO as -f, a damaged file, an imatrix for another model. (test-imatrix checks that an
# imatrix covering nothing gives the plain bytes.) Every matrix's counts and means against
# the NumPy reference's forward pass (contrib/reference/imatrix_ref.py).
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
N="$KLI_SRCDIR/contrib/models/kimi-linear-nano"
K="$KLI_BIN"
H="$KLI_SRCDIR/contrib/train/heldout-eval.txt"

head -c 7000 "$H" >"$tmp/cal.txt"
tail -c +7001 "$H" | head -c 4000 >"$tmp/eval.txt"

if tcase collect; then
    t "kli imatrix on nano" 0 "$K" imatrix -m "$N" -f "$tmp/cal.txt" -o "$tmp/nano.imat" \
        --ctx 256 -t 2
    grep -q "imatrix: chunk [0-9]*/[0-9]*, [0-9]* tokens" "$tmp/stderr"
    check $? "progress on stderr: chunks, tokens, ETA"
    t "--chunks 1 stops after one chunk" 0 "$K" imatrix -m "$N" -f "$tmp/cal.txt" \
        -o "$tmp/one.imat" --ctx 128 --chunks 1
    grep -q "chunk 1/1, 128 tokens" "$tmp/stderr"
    check $? "one chunk of 128 tokens"
fi

# the NumPy reference's forward pass, every product's input recorded: all 101 matrices of
# nano, per-expert counts included, within 1e-4 (float32 against float64)
if tcase reference; then
    PY=""
    for p in ${KLI_PYTHON:-} python3 /usr/bin/python3; do
        "$p" -c "import numpy" 2>/dev/null && PY=$p && break
    done
    if [ -z "$PY" ]; then
        ok "# SKIP no python3 with numpy"
    else
        head -c 400 "$H" >"$tmp/ref.txt"
        "$K" tokenize -m "$N" -f "$tmp/ref.txt" >"$tmp/ref.ids"
        t "kli imatrix over one chunk of 48 tokens" 0 "$K" imatrix -m "$N" -f "$tmp/ref.txt" \
            -o "$tmp/ref.imat" --ctx 48 --chunks 1
        # shellcheck disable=SC2046
        "$PY" "$KLI_SRCDIR/contrib/reference/imatrix_ref.py" "$N" "$tmp/ref.imat" 1e-4 \
            $(tr ' ' '\n' <"$tmp/ref.ids" | head -48) >"$tmp/ref.out" 2>&1
        check $? "every matrix's count and means match kimi_ref.py's forward pass"
        sed 's/^/# /' "$tmp/ref.out" | tail -5
    fi
fi

if tcase hostile; then
    : >"$tmp/empty.txt"
    t "an empty text is refused" 1 "$K" imatrix -m "$N" -f "$tmp/empty.txt" -o "$tmp/e.imat"
    grep -q "fewer than one chunk" "$tmp/stderr"
    check $? "... saying it holds less than a chunk"
    printf 'In the beginning' >"$tmp/short.txt"
    t "a text shorter than one chunk is refused" 1 "$K" imatrix -m "$N" -f "$tmp/short.txt" \
        -o "$tmp/s.imat" --ctx 64
    [ ! -e "$tmp/s.imat" ] && [ ! -e "$tmp/e.imat" ]
    check $? "... and writes nothing"
    cp "$tmp/cal.txt" "$tmp/cal2.txt"
    t "-o equal to -f is refused" 1 "$K" imatrix -m "$N" -f "$tmp/cal2.txt" -o "$tmp/cal2.txt"
    cmp -s "$tmp/cal.txt" "$tmp/cal2.txt"
    check $? "... the text untouched"
    t "-o equal to the model's weights is refused" 1 "$K" imatrix -m "$N" -f "$tmp/cal.txt" \
        -o "$N/model.safetensors"
    mkfifo "$tmp/fifo"
    (head -c 3000 "$H" >"$tmp/fifo") &
    t "a FIFO as -f is read to its end" 0 "$K" imatrix -m "$N" -f "$tmp/fifo" \
        -o "$tmp/fifo.imat" --ctx 128
    wait
fi

if tcase quantize; then
    [ -e "$tmp/nano.imat" ] || "$K" imatrix -m "$N" -f "$tmp/cal.txt" -o "$tmp/nano.imat" \
        --ctx 256 >/dev/null 2>&1
    t "quantize q4 --imatrix" 0 "$K" quantize -m "$N" -o "$tmp/q4w" --type q4 \
        --imatrix "$tmp/nano.imat"
    grep -q "quantize: [1-9][0-9]* matrices weighted by .*, [0-9]* unweighted" "$tmp/stderr"
    check $? "the summary counts the weighted matrices"
    t "quantize q4 without" 0 "$K" quantize -m "$N" -o "$tmp/q4" --type q4
    t "convert q4 --imatrix" 0 "$K" convert -m "$N" -o "$tmp/w.kli" --type q4 \
        --imatrix "$tmp/nano.imat"
    grep -q "convert: [1-9][0-9]* matrices weighted by .*, [0-9]* unweighted" "$tmp/stderr"
    check $? "... the summary counts the weighted matrices"
    t "convert q4 without" 0 "$K" convert -m "$N" -o "$tmp/p.kli" --type q4
    ! cmp -s "$tmp/w.kli" "$tmp/p.kli"
    check $? "... the weighted .kli differs from the plain one"
    "$K" convert -m "$tmp/q4w" -o "$tmp/q.kli" >/dev/null 2>&1 &&
        "$K" logits -m "$tmp/w.kli" --ids 1,2,3 -o "$tmp/lw.f32" >/dev/null 2>&1 &&
        "$K" logits -m "$tmp/q.kli" --ids 1,2,3 -o "$tmp/lq.f32" >/dev/null 2>&1 &&
        cmp -s "$tmp/lw.f32" "$tmp/lq.f32"
    check $? "... and gives the logits of quantize --imatrix's output"
    printf 'garbage' >"$tmp/bad.imat"
    t "a damaged imatrix is refused" 1 "$K" quantize -m "$N" -o "$tmp/q4b" --type q4 \
        --imatrix "$tmp/bad.imat"
    t "an imatrix for another model is refused" 1 "$K" quantize -m "$model" -o "$tmp/q4c" \
        --type q4 --imatrix "$tmp/nano.imat"
    grep -q "made for another model" "$tmp/stderr"
    check $? "... saying so"
fi

# kld TYPE [IMATRIX]: the mean KLD on the evaluation half of TYPE without and with the
# imatrix (default nano.imat), in $plain and $weighted; status 77 when kli cannot run that
# type yet.
kld() {
    ty=$1
    for w in plain weighted; do
        im=""
        [ $w = weighted ] && im="${2:-$tmp/nano.imat}"
        "$K" quantize -m "$N" -o "$tmp/$ty-$w" --type "$ty" --force ${im:+--imatrix "$im"} \
            >/dev/null 2>&1 || return 1
        "$K" perplexity -m "$tmp/$ty-$w" -f "$tmp/eval.txt" --ctx 256 --kld-base "$tmp/base" \
            --json >"$tmp/$w.json" 2>"$tmp/$w.err" || {
            grep -q "kli reads" "$tmp/$w.err" && return 77
            return 1
        }
    done
    plain=$(sed 's/.*"kld_mean": \([^,]*\),.*/\1/' "$tmp/plain.json")
    weighted=$(sed 's/.*"kld_mean": \([^,]*\),.*/\1/' "$tmp/weighted.json")
}

if tcase kld; then
    [ -e "$tmp/nano.imat" ] || "$K" imatrix -m "$N" -f "$tmp/cal.txt" -o "$tmp/nano.imat" \
        --ctx 256 >/dev/null 2>&1
    t "the base: stored weights" 0 "$K" perplexity -m "$N" -f "$tmp/eval.txt" --ctx 256 \
        --kld-base "$tmp/base"
    for ty in q4 q3_k q2_k; do
        kld $ty
        rc=$?
        if [ $rc = 77 ]; then
            ok "$ty: # SKIP kli cannot run $ty weights yet"
            continue
        fi
        echo "# $ty: mean KLD $plain without the imatrix, $weighted with it"
        [ $rc = 0 ] && awk -v a="$plain" -v b="$weighted" 'BEGIN { exit !(b < a) }'
        check $? "$ty: the imatrix lowers the mean KLD ($plain -> $weighted)"
    done
fi

if tcase covariance; then
    t "kli imatrix --covariance" 0 "$K" imatrix -m "$N" -f "$tmp/cal.txt" \
        -o "$tmp/cov.imat" --ctx 256 --covariance
    [ -e "$tmp/base" ] || "$K" perplexity -m "$N" -f "$tmp/eval.txt" --ctx 256 \
        --kld-base "$tmp/base" >/dev/null 2>&1
    kld q2_k "$tmp/cov.imat"
    rc=$?
    echo "# q2_k: mean KLD $plain without the imatrix, $weighted with its covariance"
    [ $rc = 0 ] && awk -v a="$plain" -v b="$weighted" 'BEGIN { exit !(b < 0.9 * a) }'
    check $? "q2_k: the covariance's error feedback lowers the mean KLD by > 10%"
fi

tdone
