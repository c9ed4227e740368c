#!/bin/sh
# test-term.sh - kli where a person meets it: generated text as shown by run and chat (valid
# UTF-8 without control characters but newline and tab, by the rule of batch's JSON
# strings), a prompt read from a terminal that ends at the first Ctrl-D, prompts with a
# NUL byte refused in every mode, with the byte named; every long option of every command
# (found in the source) in its --help, in kli help CMD and in kli(1); usage errors exit 2
# with a hint.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
need_python "json, pty" "no python3"
M="$KLI_TESTDATA/tiny-kimi-linear"

# ---- generated text: run, chat and batch by one rule ---------------------------------------
# The tiny model's byte-level vocabulary at temperature 1.5 writes control bytes and broken
# UTF-8 within a few dozen tokens; batch samples the same tokens for the same seed, and its
# JSON writer (a separate implementation of the rule) must give the same text.
rc=0
for seed in 3 4 5 6; do
    printf '{"id": "r%s", "prompt": "Once", "raw": true, "max_tokens": 80, "temperature": 1.5, "seed": %s}\n{"id": "c%s", "prompt": "Hi", "max_tokens": 80, "temperature": 1.5, "seed": %s}\n' \
        "$seed" "$seed" "$seed" "$seed" >>"$tmp/in.jsonl"
    "$KLI_BIN" run --gpu off -m "$M" --raw -p Once -n 80 --temp 1.5 --seed "$seed" --quiet \
        >"$tmp/run$seed.txt" 2>/dev/null || rc=1
    echo Hi | "$KLI_BIN" chat --gpu off -m "$M" -n 80 --temp 1.5 --seed "$seed" --quiet \
        >"$tmp/chat$seed.txt" 2>/dev/null || rc=1
done
"$KLI_BIN" batch --gpu off -m "$M" -i "$tmp/in.jsonl" -o "$tmp/out.jsonl" --quiet \
    2>/dev/null || rc=1
[ $rc = 0 ] && "$PY" - "$tmp" <<'PYEOF' >"$tmp/py.out" 2>&1
import json, sys

d = sys.argv[1]
out = {}
for line in open(d + "/out.jsonl", encoding="utf-8"):
    r = json.loads(line)
    out[r["id"]] = r["text"]

repl = 0
for seed in (3, 4, 5, 6):
    for k, f in (("r", "run"), ("c", "chat")):
        text = out["%s%d" % (k, seed)]
        got = open("%s/%s%d.txt" % (d, f, seed), "rb").read()
        s = got.decode("utf-8")     # strict: valid UTF-8
        bad = [c for c in s if (ord(c) < 0x20 and c not in "\n\t") or 0x7f <= ord(c) < 0xa0]
        assert not bad, (f, seed, bad)
        bad = [c for c in text if (ord(c) < 0x20 and c not in "\n\t") or 0x7f <= ord(c) < 0xa0]
        assert not bad, ("batch", seed, bad)
        assert s == text + "\n", (f, seed, s, text)
        repl += s.count("\ufffd")
assert repl > 0, repl   # the rule was put to the test
print("U+FFFD written %d times" % repl)
PYEOF
rc=$((rc + $?))
sed 's/^/# /' "$tmp/py.out"
check $rc "run, chat and batch show generated text alike: valid UTF-8 without control characters but newline and tab"

# ---- a prompt typed at a terminal ends at the first Ctrl-D ---------------------------------
cat >"$tmp/tty_ctrl_d.py" <<'PYEOF'
import os, pty, select, sys, time

pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
out = b""
sent = False
deadline = time.time() + 60      # a hang, not a speed: the run itself takes a second
eof = False
while time.time() < deadline:
    r, _, _ = select.select([] if eof else [fd], [], [], 0.2)
    if r:
        try:
            d = os.read(fd, 4096)
        except OSError:     # the terminal's other side closed: the child has ended
            d = b""
        eof = not d
        out += d
    if not sent and b"Ctrl-D" in out:
        os.write(fd, b"Once upon\n\x04")    # one line, then one Ctrl-D
        sent = True
    p, st = os.waitpid(pid, os.WNOHANG)
    if p:
        print("exit", os.waitstatus_to_exitcode(st))
        sys.exit(0)
os.kill(pid, 9)
os.waitpid(pid, 0)
print("still reading after one Ctrl-D:", out)
sys.exit(1)
PYEOF
"$PY" "$tmp/tty_ctrl_d.py" "$KLI_BIN" run --gpu off -m "$M" --raw -n 2 --quiet >"$tmp/pty.out" 2>&1
rc=$?
sed 's/^/# /' "$tmp/pty.out"
[ $rc = 0 ] && grep -q "^exit 0" "$tmp/pty.out"
check $? "run reading its prompt from a terminal ends at the first Ctrl-D"

# ---- NUL bytes: refused in every mode, the byte named ----------------------------------------
printf 'Once\000upon' >"$tmp/nul.txt"
printf '[{"role": "user", "content": "Once\\u0000upon"}]' >"$tmp/nul.json"
printf '[{"role": "user", "content": "Once \\\\u0000 upon"}]' >"$tmp/esc.json"
rc=0
for mode in "-f $tmp/nul.txt" "--raw -f $tmp/nul.txt" "--messages $tmp/nul.json"; do
    # shellcheck disable=SC2086
    "$KLI_BIN" run --gpu off -m "$M" $mode -n 1 --quiet >/dev/null 2>"$tmp/e"
    e=$?
    echo "# run $mode: exit $e"; sed "s/^/#   /" "$tmp/e"
    [ $e = 1 ] && grep -q "NUL.* at byte \(5\|35\):" "$tmp/e" || rc=1
done
"$KLI_BIN" run --gpu off -m "$M" -n 1 --quiet <"$tmp/nul.txt" >/dev/null 2>"$tmp/e"
[ $? = 1 ] && grep -q "standard input: a NUL byte at byte 5" "$tmp/e" || rc=1
"$KLI_BIN" run --gpu off -m "$M" --messages "$tmp/esc.json" -n 1 --quiet >/dev/null 2>&1 || rc=1
check $rc "run refuses a NUL in a prompt file, with --raw, on stdin and as an escaped NUL in --messages (exit 1, byte named); an escaped backslash before u0000 is no NUL"

printf '{"id": "a", "prompt": "Once\\u0000upon"}\n{"id": "b", "prompt": "Once", "raw": true, "stop": ["x\\u0000"]}\n{"id": "c", "prompt": "Once"}\n' >"$tmp/nul.jsonl"
"$KLI_BIN" batch --gpu off -m "$M" -i "$tmp/nul.jsonl" -o "$tmp/nul.out" -n 2 --quiet \
    2>/dev/null
"$PY" - "$tmp/nul.out" <<'PYEOF' >"$tmp/py.out" 2>&1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
err = [r for r in rows if "NUL" in r.get("error", "")]
assert len(rows) == 3 and len(err) == 2, rows
assert all("at byte 28" in r["error"] or "at byte 55" in r["error"] for r in err), err
assert any(r["id"] == "c" and r["finish_reason"] != "error" for r in rows), rows
PYEOF
check $? "batch refuses a record with an escaped NUL in any string, naming the byte, and runs the others"

printf 'Once\000upon\nHi\n' | "$KLI_BIN" chat --gpu off -m "$M" -n 2 --quiet \
    >"$tmp/c.out" 2>"$tmp/c.err"
rc=$?
[ $rc = 0 ] && grep -q "a NUL byte at byte 5 of the line" "$tmp/c.err" &&
    [ "$(grep -c . "$tmp/c.out")" -le 1 ]
check $? "chat refuses a line with a NUL byte, naming it, and answers the next"

# ---- --help, kli help, man/kli.1: every long option a command accepts ----------------------
# The options come from the source: each command's function in the command tables of
# src/cli*.c (kli serve's in src/serve*.c), the struct option tables it (or a parse helper it
# calls, or a command descriptor it names) uses, and the
# CLI_*_LONGOPT entries and CLI_*_LONGOPTS groups of src/cli.h they list.
cat >"$tmp/opts.py" <<'PYEOF'
import glob, re, sys

src = sys.argv[1]
text = {f: open(f).read() for f in sorted(glob.glob(src + "/src/cli*.[ch]") +
                                          glob.glob(src + "/src/serve*.[ch]"))}
allc = "\n".join(text.values())
# the CLI_*_LONGOPT entries and CLI_*_LONGOPTS groups of cli.h (groups hold entries and groups)
MACRO = r'CLI_\w+_LONGOPTS?(?:_END)?'
macros = {m.group(1): m.group(2)
          for m in re.finditer(r'#define (%s)\b((?:.*\\\n)*.*)' % MACRO, allc)}


def entries(body):
    names = re.findall(r'\{"([a-z0-9-]+)", *\w+_argument', body)
    for g in re.findall(r'\b(%s)\b' % MACRO, body):
        if g in macros:
            names += entries(macros[g])
    return names


TABLE = r'struct option (\w+)\[\] = \{(.*?)\n\s*\};'
# tables at file level, used by name; a table inside a function belongs to that function
tables = {m.group(1): entries(m.group(2))
          for m in re.finditer(r'^static const ' + TABLE, allc, re.S | re.M)}
funcs = {m.group(1): m.group(2) for m in
         re.finditer(r'^(\w+)\([^;{]*?\)\n\{\n(.*?)^\}', allc, re.S | re.M)}
# command descriptors at file level (kli quantize's and convert's struct convert_cmd): a
# function that names one uses the tables its initializer names
descs = {m.group(1): m.group(2) for m in
         re.finditer(r'^static const struct \w+ (\w+) = \{(.*?)^\};', allc, re.S | re.M)}


def uses(fn, depth=0):
    body = funcs.get(fn, "")
    got = set()
    for m in re.finditer(TABLE, body, re.S):
        got |= set(entries(m.group(2)))
    for t, names in tables.items():
        if re.search(r'\b%s\b' % t, body):
            got |= set(names)
    for d, init in descs.items():
        if re.search(r'\b%s\b' % d, body):
            for t, names in tables.items():
                if re.search(r'\b%s\b' % t, init):
                    got |= set(names)
    if depth < 1:
        for callee in re.findall(r'\b(\w+)\(', body):
            if callee != fn and callee in funcs:
                got |= uses(callee, depth + 1)
    return got


for m in re.finditer(r'\{"([a-z]+)", (\w+), "', allc):
    print(m.group(1), " ".join(sorted(uses(m.group(2)))))
PYEOF
"$PY" "$tmp/opts.py" "$KLI_SRCDIR" >"$tmp/opts.txt" 2>&1
rc=$?
[ "$(wc -l <"$tmp/opts.txt")" -ge 12 ] || rc=1
while read -r cmd names; do
    "$KLI_BIN" "$cmd" --help >"$tmp/h1" 2>&1 || rc=1
    "$KLI_BIN" help "$cmd" >"$tmp/h2" 2>&1 || rc=1
    cmp -s "$tmp/h1" "$tmp/h2" || { rc=1; echo "# kli help $cmd differs from kli $cmd --help"; }
    [ -n "$names" ] || rc=1
    for o in $names; do
        grep -q -e "--$o[] |=]" -e "--$o\$" "$tmp/h1" ||
            { rc=1; echo "# kli $cmd --help lacks --$o"; }
        # in mdoc: Fl \-name, each - inside the name written - or \-
        grep -q "Fl \\\\-$(echo "$o" | sed 's/-/\\\\\\?-/g')\\( \\|\$\\)" "$KLI_SRCDIR/man/kli.1" ||
            { rc=1; echo "# man/kli.1 lacks --$o ($cmd)"; }
    done
done <"$tmp/opts.txt"
sed 's/^/# /' "$tmp/opts.txt"
check $rc "every long option of every command's table is in its --help (also kli help CMD) and in kli(1)"

# ---- usage errors: exit 2 with the hint, as kli(1) says ---------------------------------------
rc=0
while read -r cmd names; do
    "$KLI_BIN" "$cmd" --no-such-option >/dev/null 2>"$tmp/e"
    e=$?
    [ $e = 2 ] && grep -q "unrecognized option" "$tmp/e" &&
        grep -q "try 'kli $cmd --help'" "$tmp/e" || { rc=1; echo "# $cmd: exit $e"; }
done <"$tmp/opts.txt"
for args in "run --temp -1 -p x" "chat --top-p 2" "batch --temp -1 -i x -o y" "run -n -1 -p x" \
            "bench -r 0" "logits -t 0 --ids 1 -o x" "info --no-such" "run -p x extra" \
            "help no-such-command" "no-such-command"; do
    # shellcheck disable=SC2086
    "$KLI_BIN" $args >/dev/null 2>"$tmp/e" </dev/null
    e=$?
    [ $e = 2 ] || { rc=1; echo "# kli $args: exit $e, not 2"; }
done
check $rc "unknown options and bad option values exit 2 with a 'try kli CMD --help' hint"
tr '\n' ' ' <"$KLI_SRCDIR/man/kli.1" >"$tmp/man1"
grep -q "It 2 A usage error: an unknown command or option, .*an option value out of range" \
    "$tmp/man1" && ! grep -q "sampling option out of range" "$tmp/man1"
check $? "kli(1)'s EXIT STATUS calls an option value out of range a usage error"

echo "1..$n"
exit $fail
