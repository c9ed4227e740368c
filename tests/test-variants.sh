#!/bin/sh
# test-variants.sh - the golden logits of the official implementation (test-model: prefill,
# token-at-a-time, split prompts, chunked feeding) under every CPU kernel variant this
# machine can run, each forced with KLI_SIMD. A variant that is not compiled in or that the
# CPU lacks is skipped: test-model names the kernels it ran with. Then the same for the K
# types on the demo model (test-ktypes nano).
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
T="$(dirname "$KLI_BIN")/tests/test-model"

for v in generic avx2 avx512 avx512vnni neon neondot; do
    KLI_SIMD=$v "$T" >"$tmp/$v.out" 2>&1
    rc=$?
    used=$(sed -n 's/^# kernels: //p' "$tmp/$v.out" | head -1)
    if [ "$used" != "$v" ]; then
        ok "$v # SKIP not compiled in or not usable on this CPU (ran ${used:-nothing})"
        continue
    fi
    grep -q '^not ok' "$tmp/$v.out" && rc=1
    grep '^not ok' "$tmp/$v.out" | head -5 | sed 's/^/# /'
    check $rc "$v: the golden logits ($(grep -c '^ok' "$tmp/$v.out") checks of test-model)"
done
# The super-block types (tests/test-ktypes, case nano): the demo model converted to each K type
# at load time, its logits against f32, under each variant too.
K="$(dirname "$KLI_BIN")/tests/test-ktypes"
for v in generic avx2 avx512 avx512vnni neon neondot; do
    KLI_SIMD=$v "$K" nano >"$tmp/k-$v.out" 2>&1
    rc=$?
    used=$(sed -n 's/^# kernels: //p' "$tmp/k-$v.out" | head -1)
    if [ "$used" != "$v" ]; then
        ok "$v K types # SKIP not compiled in or not usable on this CPU (ran ${used:-nothing})"
        continue
    fi
    grep -q '^not ok' "$tmp/k-$v.out" && rc=1
    grep '^not ok' "$tmp/k-$v.out" | head -5 | sed 's/^/# /'
    check $rc "$v: the nano model in every K type ($(grep -c '^ok' "$tmp/k-$v.out") checks)"
done
echo "1..$n"
exit $fail
