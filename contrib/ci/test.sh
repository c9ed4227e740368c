#!/bin/sh
# contrib/ci/test.sh - the README's test command: installs the build and test dependencies
# that are missing (Debian 12), builds in ./build, runs `make check`, then the whole suite
# again under AddressSanitizer and UBSan (`make check-sanitize`).
set -eu
cd "$(dirname "$0")/../.."
pkgs="build-essential autoconf automake libtool pkg-config libcjson-dev libpcre2-dev libopenblas-dev
      libhwloc-dev libzstd-dev mandoc python3 python3-numpy"
. contrib/ci/deps.sh
# shellcheck disable=SC2086
ci_install $pkgs
./autogen.sh
mkdir -p build
cd build
../configure
make -j"$(nproc)"
rc=0
make -j"$(nproc)" check || rc=1
make -j"$(nproc)" check-sanitize || rc=1
echo $rc >../ci-status
exit $rc
