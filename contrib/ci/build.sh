#!/bin/sh
# contrib/ci/build.sh - the README's first command: installs the build dependencies that are
# missing (Debian 12) and builds kli in ./build.
set -eu
cd "$(dirname "$0")/../.."
pkgs="build-essential autoconf automake libtool pkg-config libcjson-dev libpcre2-dev libopenblas-dev
      libhwloc-dev libzstd-dev"
. contrib/ci/deps.sh
# shellcheck disable=SC2086
ci_install $pkgs
[ -x configure ] || ./autogen.sh
mkdir -p build
cd build
[ -f Makefile ] || ../configure
make -j"$(nproc)"
