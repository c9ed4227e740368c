#!/bin/sh
# contrib/ci/test.sh - the README's test command: installs the build and test dependencies
# that are missing (Debian 12), builds in ./build, runs every test, the slow end-to-end ones
# too (`make check-all`), then all of them again under AddressSanitizer and UBSan
# (`make check-sanitize`).
set -eu
cd "$(dirname "$0")/../.."
pkgs="build-essential autoconf automake pkg-config libcjson-dev libpcre2-dev libopenblas-dev
      libhwloc-dev libzstd-dev mandoc python3 python3-numpy"
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
./autogen.sh
mkdir -p build
cd build
../configure
make -j"$(nproc)"
rc=0
make -j"$(nproc)" check-all || rc=1
make -j"$(nproc)" check-sanitize || rc=1
echo $rc >../ci-status
exit $rc
