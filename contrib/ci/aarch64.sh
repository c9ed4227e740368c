#!/bin/sh
# contrib/ci/aarch64.sh - builds kli for AArch64 with the Debian cross compiler and runs
# `make check` under qemu-user: the NEON kernels (neon, and neondot where the emulated CPU has
# SDOT, which qemu's default CPU does) against generic C and the golden logits, on a machine
# without an Arm CPU. Debian 12, as root (it adds the arm64 architecture to dpkg and registers
# qemu with binfmt_misc so the test binaries run as if native). Slow: about 8 minutes on two
# cores. Set QEMU_CPU=cortex-a72 to emulate a CPU without SDOT (neondot is then skipped).
set -eu
cd "$(dirname "$0")/../.."
top=$(pwd)
if [ "$(id -u)" -ne 0 ]; then
    echo "aarch64.sh: run as root (dpkg --add-architecture, binfmt_misc)" >&2
    exit 1
fi
dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
need="gcc-aarch64-linux-gnu qemu-user-static libc6-dev-arm64-cross libcjson-dev:arm64
      libpcre2-dev:arm64 libgomp1:arm64 autoconf automake libtool pkg-config"
. contrib/ci/deps.sh
# shellcheck disable=SC2086
ci_install $need
b=/proc/sys/fs/binfmt_misc
[ -e "$b/register" ] || mount -t binfmt_misc binfmt_misc "$b"
[ -e "$b/qemu-aarch64" ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf >"$b/register"
[ -x ./configure ] || ./autogen.sh
mkdir -p build-aarch64
cd build-aarch64
PKG_CONFIG_LIBDIR=/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig \
    "$top/configure" --host=aarch64-linux-gnu --without-openblas --without-hwloc \
    --without-zstd --without-cuda
make -j"$(nproc)"
./kli --version
make -j"$(nproc)" check
