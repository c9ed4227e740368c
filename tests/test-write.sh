#!/bin/sh
# test-write.sh - what kli writes never harms anything else (TAP): an output that is the
# input (or one of its files, through links too) is refused and the input stays intact; a
# link planted where a temporary file used to go is not followed; a link target is written
# through and stays a link; a FIFO gets the data and stays a FIFO; a second writer of an
# output (a held flock) is refused with a message; kli batch's synthetic ids cannot collide
# with real ones, and failed records give exit status 3 unless --max-errors allows them.
#
# Runs as root in CI: no check relies on a permission error.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
need_python json "python3 is needed to check the JSON output"
src="$KLI_TESTDATA/tiny-kimi-linear"
m="$tmp/model"
mkdir "$m" && cp "$src/config.json" "$src/model.safetensors" "$src/tiktoken.model" \
    "$src/tokenizer_config.json" "$m/" || exit 99
precious="precious bytes"

# intact DESCRIPTION: the model's files are byte for byte the originals (put back if not,
# so that the later checks do not fail for this one's reason)
intact() {
    r=0
    for f in config.json model.safetensors tiktoken.model tokenizer_config.json; do
        cmp -s "$src/$f" "$m/$f" || { r=1; echo "# $f changed"; rm -f "$m/$f"; cp "$src/$f" "$m/"; }
    done
    check $r "$1"
}
# says DESCRIPTION WORDS: stderr of the last t contains WORDS
says() {
    if grep -q "$2" "$tmp/stderr"; then ok "$1"; else
        notok "$1"
        sed 's/^/# /' "$tmp/stderr" | head -5
    fi
}
victim() { printf '%s\n' "$precious" >"$tmp/victim"; }
victim_ok() { check "$([ "$(cat "$tmp/victim")" = "$precious" ]; echo $?)" "$1"; }

# ---- outputs that are inputs ----------------------------------------------------------------
t "quantize -o the input directory is refused" 1 "$kli" quantize -m "$m" -o "$m" \
    --type q8_0 --force
says "... saying why" "is the input"
intact "... and the input is intact"
ln -s "$m" "$tmp/mlink"
t "quantize -o a link to the input directory is refused" 1 "$kli" quantize -m "$m" \
    -o "$tmp/mlink" --type q8_0 --force
intact "... and the input is intact"
mkdir "$tmp/q1" && ln -s "$m/config.json" "$tmp/q1/config.json"
t "quantize into a directory whose config.json links to the input's is refused" 1 \
    "$kli" quantize -m "$m" -o "$tmp/q1" --type q8_0 --force
intact "... and the input is intact"
t "convert -o a file of the input is refused" 1 "$kli" convert -m "$m" \
    -o "$m/model.safetensors" --force
intact "... and the input is intact"
t "logits -o a file of the model is refused" 1 "$kli" logits -m "$m" --ids 1,2 \
    -o "$m/config.json"
intact "... and the model is intact"
t "run --save-state to a file of the model is refused" 1 "$kli" run -m "$m" -p Hi -n 1 \
    --temp 0 --save-state "$m/tiktoken.model"
intact "... and the model is intact"

# ---- links planted at the old temporary names ------------------------------------------------
victim
ln -s "$tmp/victim" "$tmp/out.kli.tmp"
t "convert beside a link planted at out.kli.tmp" 0 "$kli" convert -m "$m" -o "$tmp/out.kli"
victim_ok "... leaves the file the link names alone"
t "... and the model it wrote opens" 0 "$kli" info -m "$tmp/out.kli"
mkdir "$tmp/q2" && ln -s "$tmp/victim" "$tmp/q2/model.safetensors.tmp"
t "quantize beside a link planted at model.safetensors.tmp" 0 "$kli" quantize -m "$m" \
    -o "$tmp/q2" --type q8_0
victim_ok "... leaves the file the link names alone"
t "... and the model it wrote runs" 0 "$kli" run -m "$tmp/q2" -p Hi -n 2 --temp 0
check "$(ls -A "$tmp/q2" | grep -c '\.tmp$' | grep -qx 1; echo $?)" \
    "... and leaves no temporary file of its own"

# ---- targets that are links or FIFOs ---------------------------------------------------------
t "logits to a plain file" 0 "$kli" logits -m "$m" --ids 1,2,3 -o "$tmp/plain.f32"
echo old >"$tmp/real.f32"
ln -s real.f32 "$tmp/link.f32"
t "logits to a link" 0 "$kli" logits -m "$m" --ids 1,2,3 -o "$tmp/link.f32"
check "$([ -L "$tmp/link.f32" ]; echo $?)" "... which stays a link"
check "$(cmp -s "$tmp/real.f32" "$tmp/plain.f32"; echo $?)" "... to the file with the logits"
mkfifo "$tmp/fifo"
cat "$tmp/fifo" >"$tmp/fromfifo" &
reader=$!
t "logits to a FIFO" 0 "$kli" logits -m "$m" --ids 1,2,3 -o "$tmp/fifo"
if [ -p "$tmp/fifo" ] && [ "$got" -eq 0 ]; then wait $reader; else kill $reader; fi
check "$([ -p "$tmp/fifo" ]; echo $?)" "... which stays a FIFO"
check "$(cmp -s "$tmp/fromfifo" "$tmp/plain.f32"; echo $?)" "... and its reader gets the logits"
mkfifo "$tmp/fifo2"
t "convert to a FIFO is refused" 1 "$kli" convert -m "$m" -o "$tmp/fifo2" --force
check "$([ -p "$tmp/fifo2" ]; echo $?)" "... and it stays a FIFO"

# ---- one writer at a time --------------------------------------------------------------------
cp "$tmp/out.kli" "$tmp/out.kli.orig"
t "convert while another process holds the output's lock is refused" 1 \
    flock "$tmp/.out.kli.lock" "$kli" convert -m "$m" -o "$tmp/out.kli" --type q8_0 --force
says "... saying so" "another process"
check "$(cmp -s "$tmp/out.kli" "$tmp/out.kli.orig"; echo $?)" "... and the output is untouched"
t "the lock is gone once the holder ends" 0 "$kli" convert -m "$m" -o "$tmp/out.kli" \
    --type q8_0 --force
check "$([ ! -e "$tmp/.out.kli.lock" ]; echo $?)" "... and the writer removes its lock file"

printf '{"id":"a","prompt":"Hi","max_tokens":2}\n{"id":"b","prompt":"Yo","max_tokens":2}\n' \
    >"$tmp/in.jsonl"
cp "$tmp/in.jsonl" "$tmp/in.orig"
t "batch -o the input is refused" 1 "$kli" batch -m "$m" -i "$tmp/in.jsonl" \
    -o "$tmp/in.jsonl" -t 1 --temp 0 --quiet
t "... with --overwrite too" 1 "$kli" batch -m "$m" -i "$tmp/in.jsonl" \
    -o "$tmp/in.jsonl" -t 1 --temp 0 --quiet --overwrite
check "$(cmp -s "$tmp/in.jsonl" "$tmp/in.orig"; echo $?)" "... and the input is intact"
cp "$tmp/in.orig" "$tmp/in.jsonl"
: >"$tmp/b.out"
t "batch while another process holds the output's lock is refused" 1 \
    flock "$tmp/b.out" "$kli" batch -m "$m" -i "$tmp/in.jsonl" -o "$tmp/b.out" -t 1 \
    --temp 0 --quiet
says "... saying so" "another process"
check "$([ ! -s "$tmp/b.out" ]; echo $?)" "... and writes nothing"

# ---- kli batch: synthetic ids, failed records and the exit status --------------------------
ids() {   # ids FILE: the ids of an output file, sorted, on one line
    "$PY" -c 'import json,sys
print(" ".join(sorted(json.loads(l)["id"] for l in open(sys.argv[1]))))' "$1"
}
reasons() {   # reasons FILE: id=finish_reason, sorted, on one line
    "$PY" -c 'import json,sys
print(" ".join(sorted("%s=%s" % (r["id"], r["finish_reason"])
                      for r in map(json.loads, open(sys.argv[1])))))' "$1"
}
printf '{"id":"line:2","prompt":"Hi","max_tokens":2}\n{"prompt":"Yo","max_tokens":2}\n' \
    >"$tmp/syn.jsonl"
t "a record with a reserved id fails: exit status 3" 3 "$kli" batch -m "$m" \
    -i "$tmp/syn.jsonl" -o "$tmp/syn.out" -t 1 --temp 0 --quiet
says "... saying how many failed" "1 record failed"
check "$([ "$(reasons "$tmp/syn.out")" = "line:1=error line:2=length" ]; echo $?)" \
    "... its line is line:1, an error; the record without an id is line:2 and runs"
grep -v '"line:2"' "$tmp/syn.out" >"$tmp/syn.part" && mv "$tmp/syn.part" "$tmp/syn.out"
t "a resumed run with --max-errors 1" 0 "$kli" batch -m "$m" -i "$tmp/syn.jsonl" \
    -o "$tmp/syn.out" -t 1 --temp 0 --quiet --max-errors 1
check "$([ "$(ids "$tmp/syn.out")" = "line:1 line:2" ]; echo $?)" \
    "... runs the missing record: every id exactly once"
t "a rerun with nothing left still reports the failed record" 3 "$kli" batch -m "$m" \
    -i "$tmp/syn.jsonl" -o "$tmp/syn.out" -t 1 --temp 0 --quiet
t "... unless --max-errors allows it" 0 "$kli" batch -m "$m" -i "$tmp/syn.jsonl" \
    -o "$tmp/syn.out" -t 1 --temp 0 --quiet --max-errors 1
t "--max-errors -1 is a usage error" 2 "$kli" batch -m "$m" -i "$tmp/syn.jsonl" \
    -o "$tmp/x.out" --max-errors -1

echo "1..$n"
exit $fail
