/* emulation stand-in (tests/gpu/emu): the f16 conversions the kernels use */
#ifndef EMU_CUDA_FP16_H
#define EMU_CUDA_FP16_H
#include "quant.h"
struct __half { unsigned short x; };
static inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
static inline float __half2float(__half h) { return moe_f16_to_f32(h.x); }
static inline __half __float2half_rn(float f) { return __half{moe_f32_to_f16(f)}; }
#endif
