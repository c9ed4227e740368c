# tests/lib.sh - sourced by the shell tests (". "$KLI_SRCDIR/tests/lib.sh""): a scratch
# directory removed on exit, the TAP counters and lines, and the Python the checks need.

tmp=$(mktemp -d) || exit 99
trap 'rm -rf "$tmp"' EXIT
n=0
fail=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
notok() { n=$((n + 1)); fail=1; echo "not ok $n - $1"; }
check() { if [ "$1" = 0 ]; then ok "$2"; else notok "$2"; fi; }
# t DESCRIPTION EXPECTED-STATUS COMMAND...: a check of the command's exit status; its output
# is left in $tmp/stdout and $tmp/stderr, and the first lines of stderr are shown on failure.
t() {
    desc=$1 want=$2
    shift 2
    "$@" >"$tmp/stdout" 2>"$tmp/stderr"
    got=$?
    if [ "$got" -eq "$want" ]; then ok "$desc"; else
        notok "$desc (exit $got, want $want)"
        sed 's/^/# /' "$tmp/stderr" | head -5
    fi
}

# need_python MODULES REASON: PY becomes a Python ($KLI_PYTHON first) that imports MODULES
# (comma-separated); without one the whole script is skipped with REASON.
need_python() {
    PY=""
    for p in ${KLI_PYTHON:-} python3 /usr/bin/python3; do
        if "$p" -c "import $1" 2>/dev/null; then
            PY=$p
            return 0
        fi
    done
    echo "1..0 # SKIP $2"
    exit 0
}
