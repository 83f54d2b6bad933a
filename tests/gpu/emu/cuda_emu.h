/* cuda_emu.h - force-included when tests/gpu/emu/build.sh compiles the cuda/ kernels
 * with the host C++ compiler: just enough of CUDA's device language for
 * this backend's kernels to run on the CPU, slowly. Each launch runs its
 * blocks one after another; the threads of a block are real threads, so
 * __syncthreads is a barrier of blockDim threads, a warp shuffle is an
 * exchange between 32 of them, and __shared__ variables (static here) are
 * shared by the block and reused by the next one. Not a simulator of
 * timing or of memory spaces: it finds indexing, reduction and barrier
 * mistakes, and lets the Check suites run where there is no GPU. */
#ifndef CUDA_EMU_H
#define CUDA_EMU_H
#define CUDA_EMU 1

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
static inline uint2 make_uint2(unsigned a, unsigned b) { return uint2{a, b}; }

extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

void __syncthreads(void);
void __syncwarp(unsigned mask = 0xffffffffu);
uint64_t emu_shfl_xor(uint64_t v, int lane_mask);
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int o) {
    uint64_t u = 0;
    memcpy(&u, &v, sizeof v);
    u = emu_shfl_xor(u, o);
    T r;
    memcpy(&r, &u, sizeof r);
    return r;
}
static inline int atomicAdd(int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T> static inline T __ldg(const T *p) { return *p; }
static inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float __fmul_rn(float a, float b) { return a * b; }

void *emu_dyn_smem(void);
void emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()> &body);

#define CUDA_LAUNCH(kernel, grid, block, smem, stream, ...)                                                        \
    emu_launch(dim3(grid), dim3(block), (size_t)(smem), [=]() { kernel(__VA_ARGS__); })
#define CUDA_DYN_SMEM(type, name) type *name = (type *)emu_dyn_smem()

#endif
