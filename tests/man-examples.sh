#!/bin/sh
# man-examples.sh - the manual pages as tests (TAP).
#
#  1. Every command line of the EXAMPLES section of man/kli.1 (each is one ".Dl" line) is
#     run with the built kli and must exit 0. The word "kli" becomes "$KLI_BIN", and the
#     examples run in a scratch directory where model/ is a link to the tiny test model, so
#     "-m model/" works; later examples may use files that earlier ones wrote there.
#  2. mandoc -Tlint -Wwarning finds nothing in any page of man/ (skipped without mandoc).
#
# Environment (set by the harness): KLI_BIN, the kli binary; KLI_SRCDIR, the top source
# directory; KLI_TESTDATA, tests/data.
set -u
: "${KLI_BIN:?}" "${KLI_SRCDIR:?}" "${KLI_TESTDATA:?}"
# The examples run in another directory: make the paths absolute.
case $KLI_BIN in /*) ;; *) KLI_BIN=$(pwd)/$KLI_BIN ;; esac
case $KLI_SRCDIR in /*) ;; *) KLI_SRCDIR=$(pwd)/$KLI_SRCDIR ;; esac
case $KLI_TESTDATA in /*) ;; *) KLI_TESTDATA=$(pwd)/$KLI_TESTDATA ;; esac
export KLI_BIN

# With bash, a pipeline fails when any of its commands does (an example such as
# "kli tokenize | kli detokenize" must not hide a failing first half); else plain sh.
if command -v bash >/dev/null 2>&1; then
    run_sh() { bash -o pipefail -c "$1"; }
else
    run_sh() { sh -c "$1"; }
fi

page="$KLI_SRCDIR/man/kli.1"
tmp=$(mktemp -d) || exit 99
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/run" || exit 99
ln -s "$KLI_TESTDATA/tiny-kimi-linear" "$tmp/run/model" || exit 99

n=0
fail=0
# printf, not echo: an example may hold a backslash that echo would interpret.
ok() {
    n=$((n + 1))
    printf 'ok %d - %s\n' "$n" "$1"
}
not_ok() {
    n=$((n + 1))
    fail=1
    printf 'not ok %d - %s\n' "$n" "$1"
}
diag() {   # diag FILE: the first lines of FILE as TAP comments
    sed -n '1,8s/^/# /p' "$1"
}

# ---- 1. the examples -------------------------------------------------------------------------

# The .Dl lines of the EXAMPLES section, with the few escapes the page uses undone:
# \(dq is ", \- is -, \& is nothing, \e is a backslash.
awk '
    /^\.Sh / { ex = ($0 == ".Sh EXAMPLES"); next }
    ex && /^\.Dl / { sub(/^\.Dl[ \t]+/, ""); print }
' "$page" | sed -e 's/\\(dq/"/g' -e 's/\\-/-/g' -e 's/\\&//g' -e 's/\\e/\\/g' \
    >"$tmp/examples" || exit 99

if [ -s "$tmp/examples" ]; then
    ok "kli.1 has examples ($(wc -l <"$tmp/examples" | tr -d ' ') command lines)"
else
    not_ok "kli.1 has examples: no .Dl line in its EXAMPLES section"
fi

while IFS= read -r line; do
    # "kli" as a word: at the start, or after a space (a pipe, an assignment).
    cmd=$(printf '%s\n' "$line" |
          sed -e 's/^kli /"$KLI_BIN" /' -e 's/^kli$/"$KLI_BIN"/' \
              -e 's/ kli / "$KLI_BIN" /g' -e 's/ kli$/ "$KLI_BIN"/')
    (cd "$tmp/run" && run_sh "$cmd") </dev/null >"$tmp/out" 2>"$tmp/err"
    rc=$?
    if [ "$rc" -eq 0 ]; then
        ok "example: $line"
    else
        not_ok "example: $line (exit $rc)"
        diag "$tmp/err"
    fi
done <"$tmp/examples"

# ---- 2. mandoc lint --------------------------------------------------------------------------

if command -v mandoc >/dev/null 2>&1; then
    for p in "$KLI_SRCDIR"/man/*.[0-9]; do
        [ -f "$p" ] || continue
        name=$(basename "$p")
        # Notes about the system's mandoc.db are not about the page.
        mandoc -Tlint -Wwarning "$p" 2>&1 | grep -v 'mandoc\.db' >"$tmp/lint"
        if [ -s "$tmp/lint" ]; then
            not_ok "mandoc -Tlint -Wwarning $name"
            diag "$tmp/lint"
        else
            ok "mandoc -Tlint -Wwarning $name"
        fi
    done
else
    ok "mandoc lint # SKIP mandoc is not installed"
fi

echo "1..$n"
exit $fail
