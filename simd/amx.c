/*
 * amx.c - the amx table: the avx512vnni kernels with the prefill GEMM of bf16, Q8_0 and Q4
 * weights on AMX tiles (Sapphire Rapids and later).
 *
 * Compiled with the AVX-512 and VNNI flags of avx512vnni plus -mamx-tile -mamx-bf16
 * -mamx-int8 (configure leaves the table out where the compiler lacks them). The GEMM is
 * amx.h's, over the AMX instructions defined here; every other entry, and these three below
 * AMX_MPACK tokens or for k not a multiple of 32, is avx512vnni's.
 *
 * kernels_amx() hands the table out only when CPUID reports AMX-TILE, AMX-BF16 and AMX-INT8,
 * the OS enables the tile state in XCR0 (cpu.c) and Linux grants this process the tile data
 * (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16 and later): without that permission the first
 * tile instruction faults, so a refusal leaves the table out and avx512vnni runs instead.
 * The tile configuration is per thread: each GEMM loads it and releases the tiles at its end.
 */
#include "config.h"

#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "simd.h"

/* GCC's ldtilecfg and tileloadd are asm statements that name no memory they read (the
 * configuration as one pointer-sized object, the tile's rows not at all), so the compiler
 * may keep the packing's stores to those bytes from reaching memory before them: each is
 * preceded by a compiler barrier. (tilestored declares its memory clobber itself.) */
#define AMX_BARRIER() __asm__ volatile("" ::: "memory")
#define AMX_CONFIG(cfg)                                                                       \
    do {                                                                                      \
        AMX_BARRIER();                                                                        \
        _tile_loadconfig(cfg);                                                                \
    } while (0)
#define AMX_ZERO(t) _tile_zero(t)
#define AMX_LOAD(t, p, stride)                                                                \
    do {                                                                                      \
        AMX_BARRIER();                                                                        \
        _tile_loadd(t, p, (long)(stride));                                                    \
    } while (0)
#define AMX_STORE(t, p, stride) _tile_stored(t, p, (long)(stride))
#define AMX_DP_BF16(c, a, b) _tile_dpbf16ps(c, a, b)
#define AMX_DP_S8(c, a, b) _tile_dpbssd(c, a, b)
#define AMX_RELEASE() _tile_release()

static inline float
amx_f16(const uint8_t *p)
{
    uint16_t h;

    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
#define AMX_F16(p) amx_f16(p)

#include "amx.h"

/* Linux's arch_prctl codes for the dynamically enabled tile data (asm/prctl.h) */
#define AMX_ARCH_GET_XCOMP_PERM 0x1022
#define AMX_ARCH_REQ_XCOMP_PERM 0x1023
#define AMX_XFEATURE_XTILEDATA 18

static const struct k_kernels *amx_base;
static struct k_kernels amx_table;
static const struct k_kernels *amx_ready;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

KLI_MATMUL_ENTRY(amx_matmul_bf16, amx_matmul, amx_base, KLI_DT_BF16)
KLI_MATMUL_ENTRY(amx_matmul_q8_0, amx_matmul, amx_base, KLI_DT_Q8_0)
KLI_MATMUL_ENTRY(amx_matmul_q4, amx_matmul, amx_base, KLI_DT_Q4)

/* Whether Linux lets this process use the tile data (asked once; the grant is for the whole
 * process, threads started later included). */
static int
amx_permitted(void)
{
    unsigned long bits = 0;

    if (syscall(SYS_arch_prctl, AMX_ARCH_REQ_XCOMP_PERM, AMX_XFEATURE_XTILEDATA) != 0)
        return 0;
    if (syscall(SYS_arch_prctl, AMX_ARCH_GET_XCOMP_PERM, &bits) != 0)
        return 0;
    return (bits >> AMX_XFEATURE_XTILEDATA) & 1;
}

static void
amx_init(void)
{
    const struct k_cpu_features *f = k_cpu_features();

    amx_base = kernels_avx512vnni();
    if (amx_base == NULL || !f->amx_tile || !f->amx_bf16 || !f->amx_int8 || !amx_permitted())
        return;
    amx_table = *amx_base;
    amx_table.name = "amx";
    amx_table.matmul[KLI_DT_BF16] = amx_matmul_bf16;
    amx_table.matmul[KLI_DT_Q8_0] = amx_matmul_q8_0;
    amx_table.matmul[KLI_DT_Q4] = amx_matmul_q4;
    amx_ready = &amx_table;
}

const struct k_kernels *
kernels_amx(void)
{
    pthread_once(&amx_once, amx_init);
    return amx_ready;
}
