#!/bin/sh
# contrib/ci/build.sh - the README's first command: installs the build dependencies that are
# missing (Debian 12) and builds kli in ./build. KLI_CI_MORE_PKGS names more packages to
# install (contrib/ci/test.sh adds what the tests need).
set -eu
cd "$(dirname "$0")/../.."
pkgs="build-essential autoconf automake pkg-config libcjson-dev libpcre2-dev libopenblas-dev
      libhwloc-dev libzstd-dev ${KLI_CI_MORE_PKGS:-}"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $missing
fi
[ -x configure ] || ./autogen.sh
mkdir -p build
cd build
[ -f Makefile ] || ../configure
make -j"$(nproc)"
