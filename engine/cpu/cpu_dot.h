/* cpu_dot.h - internals shared by cpu_matmul.c and the per-ISA kernel files.
 *
 * Not a public API: only engine/cpu/cpu_matmul.c and cpu_dot_*.c include it.
 */
#ifndef CPU_DOT_H
#define CPU_DOT_H

#include <stdint.h>

#include "qblocks.h"

/* Activation block for the 32-element weight types: float scale (more
 * precise than Q8_0's f16) and s = d * sum(qs) for the types with an
 * offset (Q4_1, Q5_1). qs are in [-127, 127], which the sign trick of the
 * AVX2 kernels relies on. */
typedef struct {
    float d;
    float s;
    int8_t qs[32];
} cpu__q8blk;

/* K-quant activations use llama.cpp's Q8_K (qs in [-127, 127], bsums =
 * sums of 16 consecutive qs). */
typedef moe_block_q8_K cpu__q8k;

/* Weights stream from DRAM; one load per block in flight per thread is
 * not enough to cover its latency, and the hardware prefetcher alone
 * leaves a quarter of the bandwidth unused. A prefetch spread through the
 * loop, CPU_PF_DIST bytes ahead of the block in hand (into the next rows
 * of the same task), keeps enough lines in flight: measured on a 2-vCPU
 * EPYC, a streamed Q8_0 matvec went from ~15 to ~19 GB/s. Past the end of
 * the matrix it is a harmless hint. 2-16 KiB measured alike there;
 * OPT="-O2 -DCPU_PF_DIST=N" tries another distance. */
#ifndef CPU_PF_DIST
#define CPU_PF_DIST 4096
#endif
#define CPU_PF_AHEAD(p) __builtin_prefetch((const char *)(p) + CPU_PF_DIST, 0, 3)

/* *out = dot(weight row w, activation row x) over n elements; x is f32 for
 * F32/F16/BF16 weights, cpu__q8blk[] for Q*_0/Q*_1, cpu__q8k[] for K-quants. */
typedef void (*cpu__dot_fn)(int64_t n, const void *w, const void *x, float *out);

/* The same for 4 activation rows at once (weights decoded once): out[t] =
 * dot(w, x[t]), bit-identical to calling the dot_fn four times. */
typedef void (*cpu__dot4_fn)(int64_t n, const void *w, const void *const *x, float *const *out);

/* Widens n F16/BF16 (or copies F32) weights to f32. */
typedef void (*cpu__cvt_fn)(int64_t n, const void *w, float *out);

/* Quantizes n activations (n a multiple of 32, resp. 256). Every ISA must
 * produce the same bytes: amax/127 scale computed in scalar f32, levels
 * rounded half-to-even from x * (1/d). */
typedef void (*cpu__act_q8_fn)(const float *x, int64_t n, cpu__q8blk *out);
typedef void (*cpu__act_q8k_fn)(const float *x, int64_t n, cpu__q8k *out);

typedef struct {
    cpu__dot_fn dot[MOE_TYPE_COUNT];
    cpu__dot4_fn dot4[MOE_TYPE_COUNT]; /* optional (NULL: use dot) */
    cpu__cvt_fn cvt[MOE_TYPE_COUNT];
    cpu__act_q8_fn act_q8;
    cpu__act_q8k_fn act_q8k;
} cpu__kernels;

/* Each fills the entries it implements and leaves the others alone, so a
 * table is built as scalar, then AVX2 over it, then AVX-512 over that.
 * Contract that keeps results path-independent where it matters: within
 * one ISA, dot[F16](w) == dot[F32](cvt[F16](w)) bit for bit (same for
 * BF16), so converting a row once for many tokens changes nothing. */
void cpu__kernels_scalar(cpu__kernels *k);
void cpu__kernels_avx2(cpu__kernels *k);
void cpu__kernels_avx512(cpu__kernels *k);

#endif
