#!/bin/sh
# test-dist.sh - the release tarball holds what building and testing it needs: `make distdir`
# of this build into a scratch directory, then the files that `make check` (and so `make
# distcheck`) runs from the source tree: the TAP driver, configure's helpers, every test
# script and kli.pc's template.
set -u
: "${KLI_BIN:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
build=$(dirname "$KLI_BIN")
d="$tmp/kli-dist"

${MAKE:-make} -C "$build" distdir distdir="$d" >"$tmp/dist.log" 2>&1
rc=$?
[ $rc = 0 ] || tail -3 "$tmp/dist.log" | sed 's/^/# /'
check $rc "make distdir copies the distribution"

missing=""
for f in configure Makefile.in kli.pc.in build-aux/tap-driver.sh build-aux/install-sh \
    build-aux/ltmain.sh tests/lib.sh tests/tap.h $(cd "$KLI_SRCDIR" && ls tests/*.sh); do
    [ -f "$d/$f" ] || missing="$missing $f"
done
[ -z "$missing" ]
check $? "the distribution holds the build's and the tests' files${missing:+ (missing:$missing)}"

echo "1..$n"
exit $fail
