/* quant.h - scalar conversions between float and the stored weight types.
 *
 * Reference (portable, exact) routines: float16/bfloat16 conversion and
 * whole-row quantize/dequantize for every block type in qblocks.h that
 * moed computes with. The CPU backend's SIMD dot products are checked
 * against these. Any thread may call them; they keep no state.
 */
#ifndef MOE_QUANT_H
#define MOE_QUANT_H

#include <stdint.h>

#include "qblocks.h"

#ifdef __cplusplus
extern "C" {
#endif

float moe_f16_to_f32(moe_f16 h);
/* Round-to-nearest-even; overflows to inf, keeps NaN a NaN. */
moe_f16 moe_f32_to_f16(float f);
float moe_bf16_to_f32(moe_bf16 h);
/* Round-to-nearest-even; keeps NaN a NaN. */
moe_bf16 moe_f32_to_bf16(float f);

/* Decodes n elements of type `type` at `src` into dst[n]. n must be a
 * multiple of the type's block size. Returns MOE_OK, MOE_EINVAL (bad n)
 * or MOE_EUNSUPPORTED (a type that holds no model weights, e.g. Q8_K). */
int moe_dequantize_row(int type, const void *src, float *dst, int64_t n);

/* Encodes src[n] as type `type` into dst (moe_row_size(type, n) bytes).
 * Supports F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
 * Returns MOE_OK, MOE_EINVAL or MOE_EUNSUPPORTED. */
int moe_quantize_row(int type, const float *src, void *dst, int64_t n);

/* True when moe_quantize_row() and moe_dequantize_row() handle `type`. */
int moe_quant_supported(int type);

#ifdef __cplusplus
}
#endif
#endif
