#!/bin/sh
# examples.sh - contrib/examples/minimal.c, built by make check, generates text.
set -u
: "${KLI_TESTDATA:?}"
bin=${KLI_EXAMPLE:-contrib/examples/minimal}
out=$("$bin" "$KLI_TESTDATA/tiny-kimi-linear" "Hi" 2>&1)
rc=$?
if [ $rc -eq 0 ] && echo "$out" | grep -q "prompt tokens"; then
    echo "ok 1 - minimal example generates text"
else
    echo "not ok 1 - minimal example (exit $rc)"
    echo "$out" | sed 's/^/# /' | head
fi
"$bin" /nonexistent >/dev/null 2>&1
rc=$?
if [ $rc -eq 1 ]; then echo "ok 2 - minimal example reports a bad model"; else
    echo "not ok 2 - minimal example on a bad model exited $rc"; fi
echo "1..2"
