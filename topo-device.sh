#!/bin/sh
# Temporary: test-topology on the 16-core device, built by hand (no autotools there).
set -u
if [ ! -e /usr/include/hwloc.h ]; then echo "SKIP: no /usr/include/hwloc.h"; exit 0; fi
nproc
lscpu | grep -E 'Model name|Socket|Core|Thread|NUMA' || true
command -v numactl >/dev/null && numactl -H
cat /sys/fs/cgroup/cpuset.cpus.effective 2>/dev/null
ls /usr/include/cjson/cJSON.h /usr/include/pcre2.h /usr/include/zstd.h 2>&1
D=/tmp/kb
mkdir -p $D/o
printf '#define HAVE_HWLOC 1\n#define PACKAGE_VERSION "0.1.0"\n' > $D/config.h
LIBS="-lhwloc -lcjson -lpcre2-8 -lm -lpthread"
if [ -e /usr/include/zstd.h ]; then echo '#define HAVE_ZSTD 1' >> $D/config.h; LIBS="$LIBS -lzstd"; fi
export CF="-std=gnu11 -O2 -g -fopenmp -Wall -Wextra -Wno-unused-parameter -I$D -Isrc -Iweights -Isimd -Icuda"
export D
ls src/*.c weights/*.c simd/cpu.c simd/dispatch.c simd/generic.c | grep -v -e '^src/cli' -e '^src/demo\.c' |
    xargs -P 16 -I{} sh -c 'gcc $CF -c {} -o $D/o/$(echo {} | tr / _).o' 2>&1 | grep -E 'warning|error' | head -20
gcc $CF tests/test-topology.c $D/o/*.o -o $D/tt $LIBS || exit 1
KLI_TESTDATA=$PWD/tests/data OMP_WAIT_POLICY=passive $D/tt
echo "rc=$?"
