#!/bin/sh
# contrib/ci/test.sh - the README's test command: installs the build and test dependencies
# that are missing (Debian 12) and builds in ./build (both by contrib/ci/build.sh), runs
# every test, the slow end-to-end ones too (`make check-all`), then all of them again under
# AddressSanitizer and UBSan (`make check-sanitize`).
set -eu
cd "$(dirname "$0")/../.."
. contrib/ci/deps.sh
ci_install_tool curl:curl node:nodejs npm:npm
KLI_CI_MORE_PKGS="mandoc python3 python3-numpy python3-jinja2" sh contrib/ci/build.sh
cd build
rc=0
make -j"$(nproc)" check-all || rc=1
make -j"$(nproc)" check-sanitize || rc=1
echo $rc >../ci-status
exit $rc
