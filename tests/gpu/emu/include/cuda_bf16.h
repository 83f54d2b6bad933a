/* emulation stand-in (tests/gpu/emu) */
#ifndef EMU_CUDA_BF16_H
#define EMU_CUDA_BF16_H
#include "quant.h"
struct __nv_bfloat16 { unsigned short x; };
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{moe_f32_to_bf16(f)}; }
#endif
