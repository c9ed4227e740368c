#!/bin/sh
# test-exports.sh - libkli exports its API and nothing else. The API is what src/kli.h
# declares: every function there is marked KLI_API (default visibility), the library is
# compiled with -fvisibility=hidden, libkli.so exports the marked functions, and libkli.a
# (one relocatable object whose hidden symbols were made local) defines no other global
# symbol. A function added to kli.h without KLI_API, or an internal function given default
# visibility, fails here.
set -u
: "${KLI_BIN:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
command -v nm >/dev/null 2>&1 || { echo "1..0 # SKIP no nm"; exit 0; }
build=$(dirname "$KLI_BIN")
hdr="$KLI_SRCDIR/src/kli.h"

# The functions kli.h declares: a declaration starts in column 0 with its return type, after
# KLI_API when marked (a typedef is no declaration of a function).
awk '/^(KLI_API )?[a-z]/ && !/^(KLI_API )?typedef/ && match($0, /kli_[a-z0-9_]+\(/) {
         print substr($0, RSTART, RLENGTH - 1) }' "$hdr" | sort -u >"$tmp/declared"
awk '/^KLI_API / { if (match($0, /kli_[a-z0-9_]+\(/)) print substr($0, RSTART, RLENGTH - 1)
                   else print "(not a function: " $0 ")" }' "$hdr" | sort -u >"$tmp/marked"
[ -s "$tmp/declared" ] && cmp -s "$tmp/declared" "$tmp/marked"
rc=$?
diff "$tmp/declared" "$tmp/marked" | sed -n 's/^[<>] /# /p' | head -20
check $rc "every function kli.h declares is marked KLI_API ($(wc -l <"$tmp/declared") functions)"

# compare LABEL FILE: FILE (the global symbols a library defines) against the declarations.
compare() {
    sort -u "$2" >"$2.s"
    comm -13 "$tmp/declared" "$2.s" >"$tmp/extra"
    comm -23 "$tmp/declared" "$2.s" >"$tmp/missing"
    sed 's/^/# exported but not in kli.h: /' "$tmp/extra" | head -20
    sed 's/^/# in kli.h but not exported: /' "$tmp/missing" | head -20
    [ ! -s "$tmp/extra" ] && [ ! -s "$tmp/missing" ]
    check $? "$1 exports exactly the functions of kli.h ($(wc -l <"$2.s") global symbols)"
}

# nm's global definitions: upper-case types (T, D, B, R, W, V, ...), and u (GNU unique).
globals() {
    awk 'NF >= 3 && ($2 ~ /^[A-Z]$/ || $2 == "u") && $2 != "U" { print $3 }'
}

so=""
if [ -f "$build/libkli.la" ]; then
    dl=$(sed -n "s/^dlname='\(.*\)'$/\1/p" "$build/libkli.la")
    [ -n "$dl" ] && so="$build/.libs/$dl"
fi
if [ -n "$so" ] && [ -f "$so" ]; then
    nm -D --defined-only "$so" | globals >"$tmp/so"
    compare "libkli.so ($dl)" "$tmp/so"
    soname=$(objdump -p "$so" 2>/dev/null | awk '$1 == "SONAME" { print $2 }')
    [ "$soname" = "$dl" ]
    check $? "libkli.so's soname is its file name ($soname)"
    # libtool's own static libkli.a (--enable-static) would hold every internal symbol and
    # take the place of the one below on `make install`: libkli.la has none (-shared).
    old=$(sed -n "s/^old_library='\(.*\)'$/\1/p" "$build/libkli.la")
    [ -z "$old" ]
    check $? "libtool makes no static libkli.a of its own${old:+ (libkli.la has $old)}"
else
    ok "# SKIP libkli.so: a build without shared libraries"
    ok "# SKIP libkli.la"
    ok "# SKIP libkli.so's soname"
fi

if [ -f "$build/libkli.a" ]; then
    nm --defined-only -g "$build/libkli.a" 2>/dev/null | globals >"$tmp/a"
    compare "libkli.a" "$tmp/a"
else
    notok "libkli.a was not built"
fi

# kli_ means public: no internal global symbol of the whole library (libkli_all, which the
# kli binary and the tests link) carries the prefix unless kli.h declares it.
all="$build/.libs/libkli_all.a"
if [ -f "$all" ]; then
    nm --defined-only -g "$all" 2>/dev/null | globals | grep '^kli_' | sort -u >"$tmp/allk"
    comm -23 "$tmp/allk" "$tmp/declared" >"$tmp/stray"
    sed 's/^/# internal but named kli_: /' "$tmp/stray" | head -20
    [ ! -s "$tmp/stray" ]
    check $? "no internal symbol is named kli_ ($(wc -l <"$tmp/allk") kli_ symbols, all in kli.h)"
else
    notok "libkli_all.a was not built"
fi

echo "1..$n"
exit $fail
