/* cpu_matmul.h - matrix products against GGUF weights on the CPU.
 *
 * y[n_tok, n_out] = x[n_tok, n_in] . W^T, where W holds n_out rows of n_in
 * elements of any weight type (F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q4_K
 * Q5_K Q6_K), used in place from the memory-mapped file.
 *
 * Decode is memory-bandwidth bound, so the kernels are built to read each
 * weight byte once per call: the activation rows are quantized once (to
 * 32-element int8 blocks for the Q*_0/Q*_1 types, to 256-element Q8_K
 * blocks for K-quants) and every weight row is multiplied with all the
 * token rows of the call while it is in cache (rows are tiled 16 weight
 * rows x 32 tokens, and the next weight row is prefetched), using integer
 * dot products (AVX2 maddubs/madd, AVX-512 VNNI where present). Tokens go
 * through the kernels four at a time, so a weight block is decoded once
 * for four activation rows. F32/F16/BF16 weights use f32 FMA (a row is
 * widened to f32 once when several tokens use it).
 *
 * Precision: for the quantized types the activation quantization adds a
 * relative error of about 0.3-0.5 % per output (int8 with a float scale
 * per 32 or 256 values); F32/F16/BF16 are exact products summed in f32.
 *
 * The SIMD path is chosen at run time from the CPU (AVX-512, AVX2+FMA+F16C,
 * else portable scalar); the build needs no -march flag. MOE_CPU_ISA=
 * scalar|avx2|avx512 in the environment caps the choice, cpu_isa_set()
 * forces it (tests). Every output is computed by exactly one thread with
 * the same code, so results do not depend on the number of threads; and
 * it is the same dot product for any n_tok or routing (activations are
 * quantized per row, the 4-token kernels give the 1-token bits, a widened
 * F16/BF16 row gives the narrow kernel's bits), so a token's outputs do not
 * depend on what else is in the call. The engine's deterministic output
 * (docs/api.md) rests on this: a new kernel path must keep it, and
 * tests/check_determinism.c checks it.
 *
 * Threads: all functions may be called from any thread, but calls that
 * share a cpu_pool must be serialized (see threadpool.h).
 */
#ifndef CPU_MATMUL_H
#define CPU_MATMUL_H

#include <stdint.h>

#include "threadpool.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum cpu_isa {
    CPU_ISA_SCALAR = 0,
    CPU_ISA_AVX2 = 1,   /* avx2 + fma + f16c */
    CPU_ISA_AVX512 = 2, /* avx512f + avx512bw (+ vnni when present) */
} cpu_isa;

/* The best ISA this CPU supports (ignores MOE_CPU_ISA). */
cpu_isa cpu_isa_best(void);

/* The ISA the kernels use now: cpu_isa_best() capped by MOE_CPU_ISA, or
 * what cpu_isa_set() chose. */
cpu_isa cpu_isa_get(void);

/* Forces the kernels onto `isa` for the whole process. Returns MOE_OK, or
 * MOE_EUNSUPPORTED when the CPU lacks it. Call while no matmul runs. */
int cpu_isa_set(cpu_isa isa);

/* "scalar", "avx2", "avx512". */
const char *cpu_isa_name(cpu_isa isa);

/* True when cpu_matmul() accepts weights of `type`. */
int cpu_matmul_supported(int type);

/* y[t * n_out + o] = sum_i x[t * n_in + i] * W[o][i] for t < n_tok, o < n_out.
 * w: n_out rows of moe_row_size(type, n_in) bytes, contiguous. n_in must
 * be a multiple of the type's block size. pool may be NULL (inline).
 * x and y must not overlap. Returns MOE_OK, MOE_EINVAL (bad sizes or
 * pointers), MOE_EUNSUPPORTED (type) or MOE_ENOMEM (activation scratch). */
int cpu_matmul(cpu_pool *pool, int type, const void *w, int64_t n_in, int64_t n_out,
               const float *x, int64_t n_tok, float *y);

/* Expert-batched product for MoE layers. w is a 3-D expert tensor
 * [n_in, n_out, n_expert] (GGUF order: expert e's n_out rows start at
 * byte e * n_out * moe_row_size(type, n_in)). x holds n_x rows of n_in.
 * The routing list is grouped by expert: entries k in
 * [expert_off[e], expert_off[e + 1]) go to expert e, and entry k computes
 *     y[k * n_out + o] = sum_i x[x_rows[k] * n_in + i] * W_e[o][i].
 * x_rows == NULL means x_rows[k] = k (e.g. the down projection, whose
 * input is already in routing order). expert_off has n_expert + 1
 * non-decreasing entries starting at 0; y has expert_off[n_expert] rows.
 * Each activation row is quantized once however many experts use it, and
 * each expert's weights are read once for all its rows; experts with no
 * rows are not touched. Returns as cpu_matmul(); MOE_EINVAL also for a
 * malformed routing list (nothing is written then). */
int cpu_matmul_experts(cpu_pool *pool, int type, const void *w, int64_t n_in, int64_t n_out,
                       int64_t n_expert, const float *x, int64_t n_x, const int64_t *expert_off,
                       const int32_t *x_rows, float *y);

/* Two expert stacks of the same type and shape on the same routing (a
 * MoE layer's gate and up): y_a from w_a and y_b from w_b exactly as two
 * cpu_matmul_experts() calls would compute them (bit for bit), with the
 * activations quantized once and one dispatch to the pool instead of two.
 * Returns as cpu_matmul_experts() (MOE_EINVAL also for a NULL w_b/y_b). */
int cpu_matmul_experts2(cpu_pool *pool, int type, const void *w_a, const void *w_b, int64_t n_in, int64_t n_out,
                        int64_t n_expert, const float *x, int64_t n_x, const int64_t *expert_off,
                        const int32_t *x_rows, float *y_a, float *y_b);

#ifdef __cplusplus
}
#endif
#endif
