#!/bin/sh
# test-variants.sh - the golden logits of the official implementation (test-model: prefill,
# token-at-a-time, split prompts, chunked feeding) under every CPU kernel variant this
# machine can run, each forced with KLI_SIMD. A variant that is not compiled in or that the
# CPU lacks is skipped: test-model names the kernels it ran with. Then the same for the K
# types on the demo model (test-ktypes nano) and the narrow latent caches (test-cache).
set -u
: "${KLI_BIN:?}" "${KLI_TESTDATA:?}" "${KLI_SRCDIR:?}"
. "$KLI_SRCDIR/tests/lib.sh"
B="$(dirname "$KLI_BIN")/tests"

# variants PROGRAM LABEL [CASE...]: PROGRAM (which prints "# kernels: NAME") under each
# variant forced with KLI_SIMD.
variants() {
    prog=$1 label=$2
    shift 2
    for v in generic avx2 avx512 avx512vnni amx neon neondot; do
        KLI_SIMD=$v "$B/$prog" "$@" >"$tmp/$prog-$v.out" 2>&1
        rc=$?
        used=$(sed -n 's/^# kernels: //p' "$tmp/$prog-$v.out" | head -1)
        if [ "$used" != "$v" ]; then
            ok "$v $prog # SKIP not compiled in or not usable on this CPU (ran ${used:-nothing})"
            continue
        fi
        grep -q '^not ok' "$tmp/$prog-$v.out" && rc=1
        grep '^not ok' "$tmp/$prog-$v.out" | head -5 | sed 's/^/# /'
        check $rc "$v: $label ($(grep -c '^ok' "$tmp/$prog-$v.out") checks of $prog)"
    done
}

variants test-model "the golden logits"
# The super-block types: the demo model converted to each K type at load time, its logits
# against f32.
variants test-ktypes "the nano model in every K type" nano
# The bf16 and q8_0 latent caches: their attention against f32's, the nano model's logits.
variants test-cache "the narrow latent caches" twin logits
echo "1..$n"
exit $fail
