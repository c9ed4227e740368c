# tests/lib.sh - sourced by the shell tests (". "$KLI_SRCDIR/tests/lib.sh""): a scratch
# directory removed on exit, $kli and $model, the TAP counters and lines, the Python the
# checks need, and named cases for the scripts that have them (tcase, tdone).

# kli: the binary under test; model: the tiny fixture (tests/data/tiny-kimi-linear).
kli=${KLI_BIN:-}
model="${KLI_TESTDATA:-}/tiny-kimi-linear"
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

# is GOT WANT DESCRIPTION: a check that two strings are equal.
is() { if [ "$1" = "$2" ]; then ok "$3"; else notok "$3 (got '$1', want '$2')"; fi; }
# c DESCRIPTION CHECK ARGS...: a check of the script's $tmp/check.py (run by $py, see
# need_python), its output left in $tmp/check.out and its first lines shown on failure.
c() {
    _d=$1
    shift
    "$py" "$tmp/check.py" "$@" >"$tmp/check.out" 2>&1
    _r=$?
    check $_r "$_d"
    [ $_r = 0 ] || sed 's/^/# /' "$tmp/check.out" | head -5
}

# poll TICKS COMMAND...: runs COMMAND every 0.05 s until it succeeds, at most TICKS times.
poll() {
    _ticks=$1 _i=0
    shift
    while [ $_i -lt "$_ticks" ] && ! "$@"; do
        sleep 0.05
        _i=$((_i + 1))
    done
}
# gone PID: the process has ended (for poll).
gone() { ! kill -0 "$1" 2>/dev/null; }

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

# Named cases, as in the C tests (tests/tap.h): `sh tests/test-configs.sh [-l] [case...]`.
# tcase NAME: whether the case NAME runs (every case when none was named on the command line;
# names are shell patterns); under -l it prints NAME instead and the case does not run.
# tdone ends the script: the plan, or a "Bail out!" when a name given matched no case.
tcase_list=0
tcase_names=""
tcase_seen=" "
for tcase_a in "$@"; do
    case $tcase_a in
    -l) tcase_list=1 ;;
    -*) echo "usage: $0 [-l] [case...]" >&2; exit 2 ;;
    *) tcase_names="$tcase_names $tcase_a" ;;
    esac
done
tcase() {
    if [ "$tcase_list" = 1 ]; then echo "$1"; return 1; fi
    [ -z "$tcase_names" ] && return 0
    tcase_r=1
    set -f
    for tcase_p in $tcase_names; do
        # shellcheck disable=SC2254
        case $1 in $tcase_p) tcase_seen="$tcase_seen$tcase_p "; tcase_r=0 ;; esac
    done
    set +f
    return $tcase_r
}
tdone() {
    [ "$tcase_list" = 1 ] && exit 0
    set -f
    for tcase_p in $tcase_names; do
        case $tcase_seen in *" $tcase_p "*) ;; *)
            echo "Bail out! no case matches \"$tcase_p\" (-l lists them)"; exit 1 ;;
        esac
    done
    set +f
    echo "1..$n"
    exit $fail
}
