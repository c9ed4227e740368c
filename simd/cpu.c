/*
 * cpu.c - run-time CPU feature detection.
 *
 * CPUID says what the processor implements; XGETBV says whether the operating system saves
 * the wider register state on a context switch. Using AVX without the second check crashes
 * (or silently corrupts registers) on kernels that disabled it, so both are required.
 */
#include <pthread.h>
#include <string.h>

#include "simd.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static uint64_t
cpu_xgetbv(void)
{
    uint32_t lo, hi;

    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static void
cpu_detect(struct k_cpu_features *f)
{
    unsigned a, b, c, d;
    int os_avx = 0, os_avx512 = 0, os_amx = 0;

    if (!__get_cpuid(1, &a, &b, &c, &d))
        return;
    f->fma = (c >> 12) & 1;
    f->f16c = (c >> 29) & 1;
    if (((c >> 27) & 1) && ((c >> 28) & 1)) {          /* OSXSAVE and AVX */
        uint64_t xcr0 = cpu_xgetbv();
        os_avx = (xcr0 & 0x6) == 0x6;                  /* XMM and YMM state */
        os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;   /* opmask, ZMM_Hi256, Hi16_ZMM */
        os_amx = (xcr0 & 0x60000) == 0x60000;          /* XTILECFG, XTILEDATA */
    }
    if (!os_avx) {
        f->fma = f->f16c = 0;
        return;
    }
    if (__get_cpuid_max(0, NULL) < 7)
        return;
    __cpuid_count(7, 0, a, b, c, d);
    f->avx2 = (b >> 5) & 1;
    if (os_amx) {
        f->amx_bf16 = (d >> 22) & 1;
        f->amx_tile = (d >> 24) & 1;
        f->amx_int8 = (d >> 25) & 1;
    }
    if (os_avx512) {
        f->avx512f = (b >> 16) & 1;
        f->avx512dq = (b >> 17) & 1;
        f->avx512bw = (b >> 30) & 1;
        f->avx512vl = (b >> 31) & 1;
        f->avx512vnni = (c >> 11) & 1;
        __cpuid_count(7, 1, a, b, c, d);
        f->avx512bf16 = (a >> 5) & 1;
    }
}
#elif defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif

static void
cpu_detect(struct k_cpu_features *f)
{
    unsigned long hw = getauxval(AT_HWCAP);

    f->neon = 1;   /* mandatory on aarch64 */
    f->dotprod = (hw & HWCAP_ASIMDDP) != 0;
}
#else
static void
cpu_detect(struct k_cpu_features *f)
{
    (void)f;
}
#endif

static struct k_cpu_features cpu_features;
static pthread_once_t cpu_once = PTHREAD_ONCE_INIT;

static void
cpu_init(void)
{
    memset(&cpu_features, 0, sizeof(cpu_features));
    cpu_detect(&cpu_features);
}

const struct k_cpu_features *
k_cpu_features(void)
{
    pthread_once(&cpu_once, cpu_init);
    return &cpu_features;
}

unsigned long
fp_flush_begin(void)
{
#if defined(__x86_64__) || defined(__i386__)
    unsigned long m = __builtin_ia32_stmxcsr();
    __builtin_ia32_ldmxcsr((unsigned)(m | 0x8040u));   /* FTZ (bit 15) and DAZ (bit 6) */
    return m;
#elif defined(__aarch64__)
    unsigned long m = __builtin_aarch64_get_fpcr64();
    __builtin_aarch64_set_fpcr64(m | (1ul << 24));       /* FZ */
    return m;
#else
    return 0;
#endif
}

void
fp_flush_end(unsigned long mode)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_ldmxcsr((unsigned)mode);
#elif defined(__aarch64__)
    __builtin_aarch64_set_fpcr64(mode);
#else
    (void)mode;
#endif
}
