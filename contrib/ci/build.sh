#!/bin/sh
# contrib/ci/build.sh - the README's first command: installs the build dependencies that are
# missing (Debian 12) and builds kli in ./build. KLI_CI_MORE_PKGS names more packages to
# install (contrib/ci/test.sh adds what the tests need).
set -eu
cd "$(dirname "$0")/../.."
pkgs="build-essential autoconf automake libtool pkg-config libcjson-dev libpcre2-dev libopenblas-dev
      libhwloc-dev libzstd-dev libmicrohttpd-dev ${KLI_CI_MORE_PKGS:-}"
. contrib/ci/deps.sh
# shellcheck disable=SC2086
ci_install $pkgs
# configure is made again when configure.ac or Makefile.am is newer (a checkout that moved on)
{ [ configure -nt configure.ac ] && [ configure -nt Makefile.am ]; } || ./autogen.sh
mkdir -p build
cd build
[ -f Makefile ] || ../configure
make -j"$(nproc)"
