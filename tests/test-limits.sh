#!/bin/sh
# test-limits.sh - nothing kli reads can hang it or fill the memory (TAP):
#   - a FIFO (or a device) where a file is expected - the weights, config.json, the tokenizer
#     files, a .kli model, --load-state, the snapshots of --prefix-dir - is refused at once
#     with a message naming the path, while a FIFO or a pipe given as the prompt is read;
#   - text read from a file or standard input is capped: /dev/zero as a prompt, --messages,
#     --ids-file, tokenize input or batch input, and /dev/zero as batch output (no resume
#     scan), end at once with a message; an oversized (sparse) tokenizer or state file is
#     refused before it is read;
#   - under an address-space limit (ulimit -v) every command either works or fails with a
#     message, never spins (OpenBLAS retries a failed buffer allocation forever), the logits
#     match the unlimited run's, and SIGTERM stops a running batch with whole lines (exit
#     143) that a rerun completes. AddressSanitizer reserves terabytes of shadow address
#     space and cannot run under ulimit -v: a sanitizer build (or one that cannot start
#     under the limit at all, as under an emulator) runs the SIGTERM check only.
# Every command runs under timeout(1): a hang fails its check instead of the suite.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
need_python json "python3 is needed to check the JSON output"
T=${KLI_TEST_HANG_S:-60}   # seconds before a command counts as hung; each takes well under 1

# refused DESCRIPTION PATTERN COMMAND...: exits 1 within T seconds, stderr matching PATTERN
refused() {
    desc=$1 pat=$2
    shift 2
    timeout -k 10 $T "$@" </dev/null >"$tmp/out" 2>"$tmp/err"
    got=$?
    if [ "$got" -eq 1 ] && grep -q -- "$pat" "$tmp/err"; then ok "$desc"; else
        notok "$desc (exit $got$([ "$got" -eq 124 ] && echo ': hung'), want 1 and '$pat')"
        sed 's/^/# /' "$tmp/err" | head -3
    fi
}
# works DESCRIPTION COMMAND...: exits 0 within T seconds
works() {
    desc=$1
    shift
    timeout -k 10 $T "$@" >"$tmp/out" 2>"$tmp/err"
    got=$?
    if [ "$got" -eq 0 ]; then ok "$desc"; else
        notok "$desc (exit $got$([ "$got" -eq 124 ] && echo ': hung'))"
        sed 's/^/# /' "$tmp/err" | head -3
    fi
}
# mdir NAME: a copy of the tiny model
mdir() { mkdir "$tmp/$1" && cp "$model"/* "$tmp/$1/"; }

# ---- a FIFO where a file is expected ------------------------------------------------------
for f in tiktoken.model tokenizer_config.json config.json model.safetensors; do
    mdir "fifo-$f"
    rm "$tmp/fifo-$f/$f"
    mkfifo "$tmp/fifo-$f/$f"
    refused "a FIFO as $f is refused" "fifo-$f/$f: not a regular file (a FIFO)" \
        "$kli" run -m "$tmp/fifo-$f" -p hi -n 2 --gpu off
done
mdir dev-tok
ln -sf /dev/zero "$tmp/dev-tok/tiktoken.model"
refused "/dev/zero as tiktoken.model is refused" "not a regular file (a character device)" \
    "$kli" run -m "$tmp/dev-tok" -p hi -n 2 --gpu off
mkfifo "$tmp/m.kli"
refused "a FIFO as the model is refused" "m.kli: not a regular file (a FIFO)" \
    "$kli" run -m "$tmp/m.kli" -p hi -n 2 --gpu off
mkfifo "$tmp/state.fifo"
refused "a FIFO as --load-state is refused" "state.fifo: not a regular file (a FIFO)" \
    "$kli" run -m "$model" -p hi -n 2 --gpu off --load-state "$tmp/state.fifo"
refused "/dev/zero as --load-state is refused" "not a regular file (a character device)" \
    "$kli" run -m "$model" -p hi -n 2 --gpu off --load-state /dev/zero

# The prompt may come through a FIFO or a pipe: the same answer as from a file.
printf 'Tell me about rivers.' >"$tmp/prompt.txt"
works "a prompt from a file" "$kli" run -m "$model" -f "$tmp/prompt.txt" -n 6 --temp 0 \
    --gpu off
cp "$tmp/out" "$tmp/want.txt"
mkfifo "$tmp/prompt.fifo"
(cat "$tmp/prompt.txt" >"$tmp/prompt.fifo" &)
works "a prompt from a FIFO" "$kli" run -m "$model" -f "$tmp/prompt.fifo" -n 6 --temp 0 \
    --gpu off
cmp -s "$tmp/out" "$tmp/want.txt"
check $? "... gives the same answer"
cat "$tmp/prompt.txt" | timeout -k 10 $T "$kli" run -m "$model" -f - -n 6 --temp 0 --gpu off \
    >"$tmp/out" 2>"$tmp/err" && cmp -s "$tmp/out" "$tmp/want.txt"
check $? "a prompt from a pipe (-f -) gives the same answer"

# --prefix-dir: snapshots replaced by FIFOs count as damaged; the batch goes on.
i=0
: >"$tmp/doc.jsonl"
while [ $i -lt 4 ]; do
    i=$((i + 1))
    printf '{"id": "d%d", "prompt": "%s Question %d?", "max_tokens": 3}\n' $i \
        "A shared document about lakes, rivers and the sea, long enough to be kept." \
        $i >>"$tmp/doc.jsonl"
done
works "batch with --prefix-dir" "$kli" batch -m "$model" -i "$tmp/doc.jsonl" \
    -o "$tmp/p1.jsonl" --prefix-dir "$tmp/pdir" --temp 0 -t 1 --gpu off --quiet
n_snap=0
for s in "$tmp"/pdir/*.klisnap; do
    [ -e "$s" ] || continue
    rm "$s" && mkfifo "$s" && n_snap=$((n_snap + 1))
done
[ "$n_snap" -gt 0 ]
check $? "... saved snapshots ($n_snap), now FIFOs"
works "a batch over FIFO snapshots in --prefix-dir" "$kli" batch -m "$model" \
    -i "$tmp/doc.jsonl" -o "$tmp/p2.jsonl" --prefix-dir "$tmp/pdir" --temp 0 -t 1 --gpu off \
    --quiet
[ "$(wc -l <"$tmp/p2.jsonl")" -eq 4 ]
check $? "... writes every record"

# ---- caps on what is read -----------------------------------------------------------------
refused "/dev/zero as the prompt" "/dev/zero: more than 67108864 bytes" \
    "$kli" run -m "$model" -f /dev/zero -n 2 --gpu off
refused "/dev/zero as the prompt, --ctx 64: 1 MiB" "/dev/zero: more than 1048576 bytes" \
    "$kli" run -m "$model" -f /dev/zero -n 2 --ctx 64 --gpu off
head -c 1048577 /dev/zero | tr '\0' 'a' >"$tmp/big.txt"
refused "a prompt file over 128 bytes per --ctx token" "more than 1048576 bytes" \
    "$kli" run -m "$model" -f "$tmp/big.txt" -n 2 --ctx 64 --gpu off
refused "/dev/zero as --messages" "/dev/zero: more than" \
    "$kli" run -m "$model" --messages /dev/zero -n 2 --gpu off
refused "/dev/zero as --ids-file" "/dev/zero: more than" \
    "$kli" logits -m "$model" --ids-file /dev/zero -o "$tmp/l.f32" --gpu off
refused "/dev/zero to tokenize" "/dev/zero: more than" "$kli" tokenize -m "$model" -f /dev/zero
refused "/dev/zero to detokenize" "/dev/zero: more than" \
    "$kli" detokenize -m "$model" -f /dev/zero
refused "/dev/zero as batch input" "/dev/zero: a line of more than" \
    "$kli" batch -m "$model" -i /dev/zero -o "$tmp/z.jsonl" --gpu off
refused "/dev/zero piped as batch input" "a line of more than" \
    sh -c "head -c 20000000 /dev/zero | '$kli' batch -m '$model' -i - -o '$tmp/z.jsonl'"
printf '{"id": "a", "prompt": "hi", "max_tokens": 2}\n' >"$tmp/one.jsonl"
works "/dev/zero as batch output (nothing to resume)" "$kli" batch -m "$model" \
    -i "$tmp/one.jsonl" -o /dev/zero -t 1 --gpu off --quiet
mdir big-tok
truncate -s 300M "$tmp/big-tok/tiktoken.model"
refused "a 300 MB tiktoken.model" "tiktoken.model: 314572800 bytes is over the limit" \
    "$kli" run -m "$tmp/big-tok" -p hi -n 2 --gpu off
truncate -s 300M "$tmp/big.klisnap"
refused "a 300 MB --load-state file" "big.klisnap: 314572800 bytes is over the limit" \
    "$kli" run -m "$model" -p hi -n 2 --ctx 64 --gpu off --load-state "$tmp/big.klisnap"
rm -f "$tmp/big-tok/tiktoken.model" "$tmp/big.klisnap"

# ---- under ulimit -v, and SIGTERM ---------------------------------------------------------
# A record set long enough that SIGTERM comes while the batch runs.
i=0
: >"$tmp/many.jsonl"
while [ $i -lt 40 ]; do
    i=$((i + 1))
    printf '{"id": "r%d", "prompt": "Record %d: tell a long story.", "max_tokens": 200}\n' \
        $i $i >>"$tmp/many.jsonl"
done
cat >"$tmp/ids.py" <<'EOF'
import json, sys
ids, bad = [], 0
for line in open(sys.argv[1], "rb"):
    try:
        ids.append(json.loads(line)["id"])
    except Exception:
        bad += 1
want = int(sys.argv[2])
if bad or len(ids) != len(set(ids)) or (want and len(ids) != want):
    sys.exit("%d lines, %d distinct ids, %d not whole records" % (len(ids), len(set(ids)), bad))
print(len(ids))
EOF
# sigterm NAME LIMIT: SIGTERM to a batch once it has written a line (under ulimit -v LIMIT
# KiB when LIMIT is not 0); then a rerun without the limit completes the set.
sigterm() {
    out="$tmp/$1.jsonl"
    (
        [ "$2" -gt 0 ] && ulimit -v "$2"
        exec "$kli" batch -m "$model" -i "$tmp/many.jsonl" -o "$out" -P 2 --temp 0 -t 1 \
            --gpu off --quiet
    ) 2>"$tmp/$1.err" &
    pid=$!
    poll 1200 test -s "$out"
    kill -TERM $pid 2>/dev/null
    poll 1200 gone $pid
    if kill -0 $pid 2>/dev/null; then
        kill -KILL $pid 2>/dev/null
        wait $pid
        notok "$1: SIGTERM stops the batch (still running after 60 s)"
    else
        wait $pid
        rc=$?
        if [ $rc -eq 143 ]; then ok "$1: SIGTERM stops the batch, exit 143"; else
            notok "$1: SIGTERM stops the batch (exit $rc, want 143)"
            sed 's/^/# /' "$tmp/$1.err" | head -3
        fi
    fi
    "$PY" "$tmp/ids.py" "$out" 0 >"$tmp/ids.out" 2>&1
    check $? "$1: only whole records written ($(cat "$tmp/ids.out") of 40)"
    timeout -k 10 300 "$kli" batch -m "$model" -i "$tmp/many.jsonl" -o "$out" -P 2 --temp 0 -t 1 \
        -n 8 --gpu off --quiet 2>"$tmp/$1.err2" &&
        "$PY" "$tmp/ids.py" "$out" 40 >"$tmp/ids.out" 2>&1
    check $? "$1: a rerun completes the set, every id once"
}
sigterm term 0

if grep -q __asan_init "$kli" 2>/dev/null; then
    echo "# AddressSanitizer build: the ulimit -v checks are skipped (ASan needs terabytes" \
         "of address space for its shadow)"
elif ! (ulimit -v 300000 && exec timeout -k 10 $T "$kli" --version) >/dev/null 2>&1; then
    echo "# kli cannot even start under ulimit -v 300000 here (an emulator such as" \
         "qemu-user, or another runtime that reserves address space): the ulimit -v" \
         "checks are skipped"
else
    # The reference: logits without a limit.
    ids=1,20,300,400,5,60,70,80,9,10,11,12
    works "logits without a limit" "$kli" logits -m "$model" --ids $ids -o "$tmp/ref.f32" \
        --gpu off -t 2
    for lim in 100000 200000 300000; do
        for cmd in "run -m $model -p hi -n 4 --temp 0 --gpu off -t 2" \
                   "batch -m $model -i $tmp/one.jsonl -o $tmp/u$lim.jsonl --quiet --gpu off -t 2" \
                   "logits -m $model --ids $ids -o $tmp/u$lim.f32 --gpu off -t 2" \
                   "convert -m $model -o $tmp/u$lim.kli" \
                   "tokenize -m $model -f $tmp/prompt.txt" \
                   "info -m $model"; do
            # shellcheck disable=SC2086
            (ulimit -v $lim && exec timeout -k 10 $T "$kli" $cmd) </dev/null >"$tmp/out" \
                2>"$tmp/err"
            rc=$?
            name="ulimit -v $lim: kli ${cmd%% *}"
            if [ $rc -eq 0 ]; then ok "$name works"
            elif [ $rc -ne 124 ] && [ $rc -lt 128 ] && [ -s "$tmp/err" ]; then
                ok "$name fails with a message: $(head -1 "$tmp/err")"
            else
                notok "$name (exit $rc$([ $rc -eq 124 ] && echo ': hung'))"
                sed 's/^/# /' "$tmp/err" | head -3
            fi
        done
        if [ -s "$tmp/u$lim.f32" ]; then
            "$PY" - "$tmp/ref.f32" "$tmp/u$lim.f32" <<'EOF'
import array, sys
a, b = array.array("f"), array.array("f")
a.frombytes(open(sys.argv[1], "rb").read())
b.frombytes(open(sys.argv[2], "rb").read())
d = max(abs(x - y) for x, y in zip(a, b)) if len(a) == len(b) and a else 1e9
sys.exit(0 if d <= 1e-4 else "max |difference| %g" % d)
EOF
            check $? "ulimit -v $lim: the logits equal the unlimited run's within 1e-4"
        fi
    done
    sigterm term-ulimit 200000
fi

echo "1..$n"
exit $fail
