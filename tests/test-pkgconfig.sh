#!/bin/sh
# test-pkgconfig.sh - the installed library as a program outside the tree links it: `make
# install DESTDIR=...` of this build, then kli.pc through pkg-config. kli.pc names the
# libraries that have .pc files (Requires.private) instead of copying their flags, so it
# holds no -L but its own libdir's (and CUDA's, which has no .pc); `pkg-config --libs
# --static kli` gives what libkli.a needs; contrib/examples/minimal.c, compiled and linked
# with those flags alone, generates text from the tiny fixture; libkli.a links into a shared
# object as well as into a program.
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
command -v pkg-config >/dev/null 2>&1 || { echo "1..0 # SKIP no pkg-config"; exit 0; }
command -v cc >/dev/null 2>&1 || { echo "1..0 # SKIP no cc"; exit 0; }
build=$(dirname "$KLI_BIN")
D="$tmp/inst"

${MAKE:-make} -C "$build" install DESTDIR="$D" >"$tmp/install.log" 2>&1
rc=$?
pc=$(find "$D" -name kli.pc | head -1)
[ $rc = 0 ] && [ -n "$pc" ]
check $? "make install DESTDIR= installs kli.pc$([ $rc = 0 ] || tail -3 "$tmp/install.log" | tr '\n' ' ')"
[ -n "$pc" ] || { echo "1..$n"; exit 1; }

# The installed tree stands where DESTDIR put it: point the prefix there.
prefix=$(sed -n 's/^prefix=//p' "$pc")
mkdir "$tmp/pc" && sed "s|^prefix=.*|prefix=$D$prefix|" "$pc" >"$tmp/pc/kli.pc"
export PKG_CONFIG_PATH="$tmp/pc${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"

grep -q "^Requires.private: .*libcjson" "$tmp/pc/kli.pc" &&
    ! grep "^Libs" "$tmp/pc/kli.pc" | sed 's|-L/usr/local/cuda[^ ]*||g' | grep -q -- "-L/"
check $? "kli.pc names its dependencies (Requires.private) and copies no library directory"

libs=$(pkg-config --libs --static kli 2>"$tmp/pc.err")
rc=$?
echo "# pkg-config --libs --static kli: $libs"
want="-lkli -lcjson -lpcre2-8"
grep -q "HAVE_OPENBLAS 1" "$build/config.h" && want="$want -lopenblas"
grep -q "HAVE_ZSTD 1" "$build/config.h" && want="$want -lzstd"
for l in $want; do
    case " $libs " in *" $l "*) ;; *) rc=1; echo "# missing $l" ;; esac
done
check $rc "pkg-config --libs --static kli resolves the libraries libkli.a needs"

# A sanitized libkli.a needs its runtime, which no installed .pc would name.
san=""
grep -q -a __asan_init "$KLI_BIN" && san="$san -fsanitize=address"
grep -q -a __ubsan_handle "$KLI_BIN" && san="$san -fsanitize=undefined"
# shellcheck disable=SC2046,SC2086
cc -std=c11 $san -o "$tmp/minimal" "$KLI_SRCDIR/contrib/examples/minimal.c" \
    $(pkg-config --cflags --libs --static kli) >"$tmp/cc.log" 2>&1
rc=$?
sed 's/^/# /' "$tmp/cc.log" | tail -5
check $rc "contrib/examples/minimal.c builds against the installed library with pkg-config's flags"
# -lkli finds libkli.so when it was built: the installed tree is not on the loader's path
libdir=$(pkg-config --variable=libdir kli)
LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    "$tmp/minimal" "$KLI_TESTDATA/tiny-kimi-linear" "Hello" >"$tmp/m.out" 2>"$tmp/m.err" &&
    [ -s "$tmp/m.out" ]
check $? "and the program it builds generates text"

# the same program with the installed libkli.a named instead of -lkli: the static library
# (its internals made local) holds all the API needs
a="$libdir/libkli.a"
# shellcheck disable=SC2046,SC2086
cc -std=c11 $san -o "$tmp/minimal-static" "$KLI_SRCDIR/contrib/examples/minimal.c" \
    $(pkg-config --cflags --libs --static kli | sed "s#\(^\| \)-lkli\( \|\$\)# $a #") \
    >"$tmp/cc2.log" 2>&1 &&
    "$tmp/minimal-static" "$KLI_TESTDATA/tiny-kimi-linear" "Hello" >"$tmp/m2.out" 2>&1 &&
    [ -s "$tmp/m2.out" ]
rc=$?
sed 's/^/# /' "$tmp/cc2.log" | tail -5
check $rc "it links and runs with the installed libkli.a too"

# libkli.a linked into a shared object (a plugin, a language binding) that a program then
# loads: its objects must be position-independent in every build, --disable-shared too.
static_deps=$(pkg-config --libs --static kli | sed "s#\(^\| \)-lkli\( \|\$\)# #")
cat >"$tmp/plug.c" <<'EOF2'
#include <kli.h>
const char *plug_version(void);
const char *plug_version(void) { return kli_version(); }
EOF2
cat >"$tmp/plugmain.c" <<'EOF2'
#include <stdio.h>
const char *plug_version(void);
int main(void) { return puts(plug_version()) < 0; }
EOF2
# shellcheck disable=SC2046,SC2086
cc -std=c11 $san -shared -fPIC -o "$tmp/libplug.so" "$tmp/plug.c" \
    $(pkg-config --cflags kli) "$a" $static_deps >"$tmp/cc3.log" 2>&1 &&
    cc -std=c11 $san -o "$tmp/plugmain" "$tmp/plugmain.c" -L"$tmp" -lplug >>"$tmp/cc3.log" 2>&1 &&
    LD_LIBRARY_PATH="$tmp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        "$tmp/plugmain" >"$tmp/m3.out" 2>&1 &&
    grep -q "^$(sed -n 's/^Version: //p' "$tmp/pc/kli.pc")" "$tmp/m3.out"
rc=$?
sed 's/^/# /' "$tmp/cc3.log" | tail -5
check $rc "the installed libkli.a links into a shared object that a program loads"

echo "1..$n"
exit $fail
