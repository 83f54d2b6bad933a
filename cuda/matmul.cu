// matmul.cu - products against GGUF weights on the GPU.
//
// Three paths, chosen per call:
//  - GEMV (<= gemv_max_tok entries per weight matrix, i.e. decode): one
//    warp per output row; each lane dequantizes 8 consecutive weights at a
//    time (16-byte loads for F16/BF16, 2 x 16 for F32, 8-byte loads for the
//    nibbles of Q4_K/Q5_K/Q5_1) and multiplies them with every entry's
//    activations, so each weight byte is read once per call.
//  - Tiled GEMM (more entries, quantized weights, and every grouped call):
//    64 weight rows x 64 entries per block, K in steps of 32; weights are
//    dequantized exactly to f32 while loading the shared-memory tile; f32
//    FMA. Simple first: no double buffering, no tensor cores.
//  - cuBLAS (more entries, F32/F16/BF16, one matrix): cublasGemmEx with
//    f32 accumulation; F16/BF16 weights take the activations rounded to the
//    weight's type (the only place this backend rounds activations).
// The grouped form (cuda_gmm) also serves MoE experts and MLA's per-head
// matrices: entries are grouped by matrix with device-side offsets, so
// routing results never come back to the host.
//
// Dequantization evaluates the same float expressions as engine/quant.c,
// with __fmul_rn where quant.c's a*b-c must not become an FMA, so embed
// reproduces moe_dequantize_row bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <limits.h>
#include <string.h>

#include "cuda_internal.cuh"

// ---- loads ----

// The dequantizer is __host__ __device__ so that cuda__dequant_row_host()
// can check the very same code against engine/quant.c without a GPU.
#define HD __host__ __device__ __forceinline__
#ifdef __CUDA_ARCH__
#define LDG(p) __ldg(p)
#define FMUL_RN(a, b) __fmul_rn(a, b)
#define UNROLL _Pragma("unroll")
#else
#define UNROLL
#define LDG(p) (*(p))
#define FMUL_RN(a, b) ((a) * (b)) /* host: -std=c++17 does not contract */
#endif

HD float f16_to_f32(uint16_t b) { return __half2float(__ushort_as_half(b)); }
HD float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
HD uint16_t ld_u16(const uint8_t *p) { return LDG((const unsigned short *)p); }

// 8 bytes from a 2-byte aligned address (Q8_0, Q4_0, Q5_0 and Q6_K blocks
// are 2-byte aligned only), as two little-endian words.
HD uint2 ld8_a2(const uint8_t *p) {
    const unsigned short *s = (const unsigned short *)p;
    uint2 r;
    r.x = (uint32_t)LDG(s) | ((uint32_t)LDG(s + 1) << 16);
    r.y = (uint32_t)LDG(s + 2) | ((uint32_t)LDG(s + 3) << 16);
    return r;
}
HD uint2 ld8_a4(const uint8_t *p) {
    const unsigned *s = (const unsigned *)p;
    return make_uint2(LDG(s), LDG(s + 1));
}
HD uint2 ld8_a8(const uint8_t *p) { return LDG((const uint2 *)p); }

HD int byte_of(uint2 v, int i) { return (int)(((i < 4 ? v.x : v.y) >> (8 * (i & 3))) & 0xFF); }

HD bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

// xv[0..8) = x[k .. k+8) (zero past n); 16-byte loads when aligned.
HD void load_x8(const float *xr, int64_t k, int64_t n, float xv[8]) {
    const float *p = xr + k;
    if (k + 8 <= n && aligned16(p)) {
        float4 a = LDG((const float4 *)p), b = LDG((const float4 *)p + 1);
        xv[0] = a.x, xv[1] = a.y, xv[2] = a.z, xv[3] = a.w;
        xv[4] = b.x, xv[5] = b.y, xv[6] = b.z, xv[7] = b.w;
    } else {
UNROLL
        for (int i = 0; i < 8; i++) xv[i] = k + i < n ? LDG(p + i) : 0.0f;
    }
}

// ---- dequantization: 8 consecutive weights of a row, starting at k (k % 8 == 0) ----

// 6-bit scale and min j of a Q4_K/Q5_K block (engine/quant.c k4_scale_min)
HD void k4_scale_min(int j, const uint8_t *q, int &sc, int &m) {
    if (j < 4) {
        sc = LDG(q + j) & 63;
        m = LDG(q + j + 4) & 63;
    } else {
        sc = (LDG(q + j + 4) & 0xF) | ((LDG(q + j - 4) >> 6) << 4);
        m = (LDG(q + j + 4) >> 4) | ((LDG(q + j) >> 6) << 4);
    }
}

template <int T>
HD void dequant8(const uint8_t *row, int64_t k, int64_t n, float v[8]) {
    if constexpr (T == MOE_TYPE_F32) {
        load_x8((const float *)row, k, n, v);
    } else if constexpr (T == MOE_TYPE_F16 || T == MOE_TYPE_BF16) {
        const uint16_t *p = (const uint16_t *)row + k;
        if (k + 8 <= n && aligned16(p)) {
            uint4 q = LDG((const uint4 *)p);
            uint32_t w[4] = {q.x, q.y, q.z, q.w};
UNROLL
            for (int i = 0; i < 4; i++) {
                uint16_t lo = (uint16_t)(w[i] & 0xFFFF), hi = (uint16_t)(w[i] >> 16);
                v[2 * i] = T == MOE_TYPE_F16 ? f16_to_f32(lo) : bf16_to_f32(lo);
                v[2 * i + 1] = T == MOE_TYPE_F16 ? f16_to_f32(hi) : bf16_to_f32(hi);
            }
        } else {
UNROLL
            for (int i = 0; i < 8; i++) {
                uint16_t b = k + i < n ? LDG((const unsigned short *)p + i) : 0;
                v[i] = T == MOE_TYPE_F16 ? f16_to_f32(b) : bf16_to_f32(b);
            }
        }
    } else if constexpr (T == MOE_TYPE_Q8_0) {
        const uint8_t *b = row + (k / 32) * sizeof(moe_block_q8_0);
        int j0 = (int)(k % 32);
        float d = f16_to_f32(ld_u16(b));
        uint2 q = ld8_a2(b + 2 + j0);
UNROLL
        for (int i = 0; i < 8; i++) v[i] = d * (float)(int8_t)byte_of(q, i);
    } else if constexpr (T == MOE_TYPE_Q4_0) {
        const uint8_t *b = row + (k / 32) * sizeof(moe_block_q4_0);
        int j0 = (int)(k % 32), sh = j0 >= 16 ? 4 : 0;
        float d = f16_to_f32(ld_u16(b));
        uint2 q = ld8_a2(b + 2 + (j0 & 15));
UNROLL
        for (int i = 0; i < 8; i++) v[i] = d * (float)(((byte_of(q, i) >> sh) & 0xF) - 8);
    } else if constexpr (T == MOE_TYPE_Q4_1) {
        const uint8_t *b = row + (k / 32) * sizeof(moe_block_q4_1);
        int j0 = (int)(k % 32), sh = j0 >= 16 ? 4 : 0;
        float d = f16_to_f32(ld_u16(b)), m = f16_to_f32(ld_u16(b + 2));
        uint2 q = ld8_a4(b + 4 + (j0 & 15));
UNROLL
        for (int i = 0; i < 8; i++) v[i] = FMUL_RN(d, (float)((byte_of(q, i) >> sh) & 0xF)) + m;
    } else if constexpr (T == MOE_TYPE_Q5_0) {
        const uint8_t *b = row + (k / 32) * sizeof(moe_block_q5_0);
        int j0 = (int)(k % 32), sh = j0 >= 16 ? 4 : 0;
        float d = f16_to_f32(ld_u16(b));
        uint32_t qh = (uint32_t)ld_u16(b + 2) | ((uint32_t)ld_u16(b + 4) << 16);
        uint2 q = ld8_a2(b + 6 + (j0 & 15));
UNROLL
        for (int i = 0; i < 8; i++) {
            int lo = (byte_of(q, i) >> sh) & 0xF, hi = (int)((qh >> (j0 + i)) & 1u) << 4;
            v[i] = d * (float)((lo | hi) - 16);
        }
    } else if constexpr (T == MOE_TYPE_Q5_1) {
        const uint8_t *b = row + (k / 32) * sizeof(moe_block_q5_1);
        int j0 = (int)(k % 32), sh = j0 >= 16 ? 4 : 0;
        float d = f16_to_f32(ld_u16(b)), m = f16_to_f32(ld_u16(b + 2));
        uint32_t qh = LDG((const unsigned *)(b + 4));
        uint2 q = ld8_a8(b + 8 + (j0 & 15));
UNROLL
        for (int i = 0; i < 8; i++) {
            int lo = (byte_of(q, i) >> sh) & 0xF, hi = (int)((qh >> (j0 + i)) & 1u) << 4;
            v[i] = FMUL_RN(d, (float)(lo | hi)) + m;
        }
    } else if constexpr (T == MOE_TYPE_Q4_K || T == MOE_TYPE_Q5_K) {
        constexpr size_t BS = T == MOE_TYPE_Q4_K ? sizeof(moe_block_q4_K) : sizeof(moe_block_q5_K);
        constexpr int QS = T == MOE_TYPE_Q4_K ? 16 : 48; // offset of qs in the block
        const uint8_t *b = row + (k / 256) * BS;
        int e = (int)(k % 256), c = e / 64, hi = (e % 64) >= 32, l = e % 32;
        float d = f16_to_f32(ld_u16(b)), dmin = f16_to_f32(ld_u16(b + 2));
        int sc, m;
        k4_scale_min(2 * c + hi, b + 4, sc, m);
        float d1 = d * (float)sc, m1 = FMUL_RN(dmin, (float)m); // no FMA with the subtraction below
        uint2 q = ld8_a8(b + QS + 32 * c + l);
        uint2 h = make_uint2(0, 0);
        if constexpr (T == MOE_TYPE_Q5_K) h = ld8_a8(b + 16 + l);
UNROLL
        for (int i = 0; i < 8; i++) {
            int qv = (byte_of(q, i) >> (4 * hi)) & 0xF;
            if constexpr (T == MOE_TYPE_Q5_K) qv += ((byte_of(h, i) >> (2 * c + hi)) & 1) ? 16 : 0;
            v[i] = FMUL_RN(d1, (float)qv) - m1;
        }
    } else if constexpr (T == MOE_TYPE_Q6_K) {
        const uint8_t *b = row + (k / 256) * sizeof(moe_block_q6_K);
        int e = (int)(k % 256), h = e / 128, r = e % 128, qq = r / 32, l = r % 32;
        float d = f16_to_f32(ld_u16(b + 208));
        int sc = (int8_t)LDG(b + 192 + 8 * h + l / 16 + 2 * qq);
        float ds = d * (float)sc;
        uint2 ql = ld8_a2(b + 64 * h + l + ((qq & 1) ? 32 : 0));
        uint2 qh = ld8_a2(b + 128 + 32 * h + l);
UNROLL
        for (int i = 0; i < 8; i++) {
            int lo = (byte_of(ql, i) >> (qq >= 2 ? 4 : 0)) & 0xF;
            int hb = (byte_of(qh, i) >> (2 * qq)) & 3;
            v[i] = ds * (float)((lo | (hb << 4)) - 32);
        }
    }
}

// The alignment (bytes) dequant8 needs of every block start; 0 = unsupported.
static int type_align(int type);

extern "C" int cuda__supports_type(void *vctx, int type) {
    (void)vctx;
    return type_align(type) != 0;
}

static int type_align(int type) {
    switch (type) {
    case MOE_TYPE_F32: return 4;
    case MOE_TYPE_F16:
    case MOE_TYPE_BF16:
    case MOE_TYPE_Q8_0:
    case MOE_TYPE_Q4_0:
    case MOE_TYPE_Q5_0:
    case MOE_TYPE_Q6_K: return 2;
    case MOE_TYPE_Q4_1: return 4;
    case MOE_TYPE_Q5_1:
    case MOE_TYPE_Q4_K:
    case MOE_TYPE_Q5_K: return 8;
    default: return 0;
    }
}

bool cuda__gmm_supported(int type) { return type_align(type) != 0; }

template <int T> static void dequant_row_host(const uint8_t *row, float *out, int64_t n) {
    for (int64_t k = 0; k < n; k += 8) {
        float v[8];
        dequant8<T>(row, k, n, v);
        for (int i = 0; i < 8 && k + i < n; i++) out[k + i] = v[i];
    }
}

// Runs BODY with TT = the runtime type as a compile-time constant (one
// instantiation per type); returns MOE_EUNSUPPORTED from the caller otherwise.
#define TYPE_SWITCH(type, BODY)                                                                                       \
    switch (type) {                                                                                                   \
    case MOE_TYPE_F32: { constexpr int TT = MOE_TYPE_F32; BODY; } break;                                              \
    case MOE_TYPE_F16: { constexpr int TT = MOE_TYPE_F16; BODY; } break;                                              \
    case MOE_TYPE_BF16: { constexpr int TT = MOE_TYPE_BF16; BODY; } break;                                            \
    case MOE_TYPE_Q8_0: { constexpr int TT = MOE_TYPE_Q8_0; BODY; } break;                                            \
    case MOE_TYPE_Q4_0: { constexpr int TT = MOE_TYPE_Q4_0; BODY; } break;                                            \
    case MOE_TYPE_Q4_1: { constexpr int TT = MOE_TYPE_Q4_1; BODY; } break;                                            \
    case MOE_TYPE_Q5_0: { constexpr int TT = MOE_TYPE_Q5_0; BODY; } break;                                            \
    case MOE_TYPE_Q5_1: { constexpr int TT = MOE_TYPE_Q5_1; BODY; } break;                                            \
    case MOE_TYPE_Q4_K: { constexpr int TT = MOE_TYPE_Q4_K; BODY; } break;                                            \
    case MOE_TYPE_Q5_K: { constexpr int TT = MOE_TYPE_Q5_K; BODY; } break;                                            \
    case MOE_TYPE_Q6_K: { constexpr int TT = MOE_TYPE_Q6_K; BODY; } break;                                            \
    default: return MOE_EUNSUPPORTED;                                                                                 \
    }

extern "C" int cuda__dequant_row_host(int type, const void *row, float *out, int64_t n) {
    if (!row || !out || n < 0 || !moe_row_size(type, n)) return MOE_EINVAL;
    const uint8_t *r = (const uint8_t *)row;
    TYPE_SWITCH(type, dequant_row_host<TT>(r, out, n));
    return MOE_OK;
}

// ---- dequantized rows (embed) ----

template <int T>
__global__ void k_dequant_rows(const uint8_t *__restrict__ w, size_t row_bytes, int64_t n_in,
                               const int32_t *__restrict__ ids, int64_t n, float *__restrict__ out) {
    int64_t n_piece = (n_in + 7) / 8;
    for (int64_t r = blockIdx.y; r < n; r += gridDim.y) {
        const uint8_t *row = w + (size_t)ids[r] * row_bytes;
        for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < n_piece;
             p += (int64_t)gridDim.x * blockDim.x) {
            float v[8];
            dequant8<T>(row, 8 * p, n_in, v);
            float *o = out + r * n_in + 8 * p;
#pragma unroll
            for (int i = 0; i < 8; i++)
                if (8 * p + i < n_in) o[i] = v[i];
        }
    }
}

int cuda__dequant_rows(cuda_ctx *c, const moe_weight *w, const int32_t *ids_dev, int64_t n, float *out) {
    size_t rb = moe_row_size(w->type, w->n_in);
    int al = type_align(w->type);
    if (!rb || !al) return MOE_EUNSUPPORTED;
    if ((uintptr_t)w->data % (uintptr_t)al || rb % (size_t)al) return MOE_EINVAL;
    dim3 grid(cuda__grid((w->n_in + 7) / 8, 128), (unsigned)(n < 65535 ? n : 65535));
    const uint8_t *wp = (const uint8_t *)w->data;
    TYPE_SWITCH(w->type, (CUDA_LAUNCH(k_dequant_rows<TT>, grid, 128, 0, c->stream, wp, rb, w->n_in, ids_dev, n, out)));
    CUDA_LAUNCH_CHECK();
    return MOE_OK;
}

// ---- GEMV ----

#define GEMV_WARPS 4
#define GEMV_MAX 8 // entries per group the GEMV kernel accumulates at once

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <int T>
__global__ void __launch_bounds__(GEMV_WARPS * 32) k_gemv(cuda_gmm g, size_t row_bytes) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int64_t o = (int64_t)blockIdx.x * GEMV_WARPS + warp;
    int64_t e = blockIdx.y;
    if (o >= g.n_out) return; // a whole warp leaves together
    int64_t k0 = g.off ? g.off[e] : 0;
    int64_t cnt = g.off ? g.off[e + 1] - k0 : g.n_rows;
    if (cnt <= 0) return;
    const uint8_t *wr = (const uint8_t *)g.w + (size_t)e * g.mat_stride + (size_t)o * row_bytes;
    const float *xr[GEMV_MAX];
#pragma unroll
    for (int j = 0; j < GEMV_MAX; j++) {
        int64_t k = k0 + j;
        xr[j] = j < cnt ? g.x + (int64_t)(g.x_rows ? g.x_rows[k] : k) * g.x_stride : g.x;
    }
    float acc[GEMV_MAX];
#pragma unroll
    for (int j = 0; j < GEMV_MAX; j++) acc[j] = 0.0f;
    int64_t n_piece = (g.n_in + 7) / 8;
    for (int64_t p = lane; p < n_piece; p += 32) {
        float wv[8];
        dequant8<T>(wr, 8 * p, g.n_in, wv);
#pragma unroll
        for (int j = 0; j < GEMV_MAX; j++) {
            if (j < cnt) {
                float xv[8];
                load_x8(xr[j], 8 * p, g.n_in, xv);
                float s = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; i++) s += wv[i] * xv[i];
                acc[j] += s;
            }
        }
    }
    float b = g.bias ? g.bias[o] : 0.0f;
#pragma unroll
    for (int j = 0; j < GEMV_MAX; j++) {
        if (j < cnt) { // cnt is the same in the whole warp
            float v = warp_sum(acc[j]);
            int64_t k = k0 + j;
            if (lane == 0) g.y[(int64_t)(g.y_rows ? g.y_rows[k] : k) * g.y_stride + o] = v + b;
        }
    }
}

// ---- tiled GEMM ----

#define TM 64 // weight rows per block
#define TN 64 // entries per block
#define TK 32 // inner step
#define GEMM_THREADS 256

template <int T>
__global__ void __launch_bounds__(GEMM_THREADS) k_gemm(cuda_gmm g, size_t row_bytes) {
    // k-major tiles; +4 keeps rows 16-byte aligned for the float4 reads
    __shared__ __align__(16) float Ws[TK][TM + 4];
    __shared__ __align__(16) float Xs[TK][TN + 4];
    int tid = threadIdx.x;
    int64_t e = blockIdx.z;
    int64_t k0 = g.off ? g.off[e] : 0;
    int64_t cnt = g.off ? g.off[e + 1] - k0 : g.n_rows;
    int64_t n0 = (int64_t)blockIdx.y * TN, o0 = (int64_t)blockIdx.x * TM;
    if (n0 >= cnt) return; // the grid is sized for the largest group
    // loaders: thread -> (row or entry lr of the tile, 8-wide piece lq of the k step)
    int lr = tid >> 2, lq = tid & 3;
    const uint8_t *wrow = o0 + lr < g.n_out
                              ? (const uint8_t *)g.w + (size_t)e * g.mat_stride + (size_t)(o0 + lr) * row_bytes
                              : NULL;
    const float *xrow = NULL;
    if (n0 + lr < cnt) {
        int64_t k = k0 + n0 + lr;
        xrow = g.x + (int64_t)(g.x_rows ? g.x_rows[k] : k) * g.x_stride;
    }
    // compute: thread -> 4 weight rows (tr) x 4 entries (tc)
    int tr = tid & 15, tc = tid >> 4;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (int64_t kb = 0; kb < g.n_in; kb += TK) {
        int64_t kk = kb + 8 * lq;
        float v[8];
        if (wrow && kk < g.n_in) dequant8<T>(wrow, kk, g.n_in, v);
        else
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) Ws[8 * lq + i][lr] = v[i];
        if (xrow && kk < g.n_in) load_x8(xrow, kk, g.n_in, v);
        else
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) Xs[8 * lq + i][lr] = v[i];
        __syncthreads();
#pragma unroll
        for (int q = 0; q < TK; q++) {
            float4 a = *(const float4 *)&Ws[q][4 * tr];
            float4 b = *(const float4 *)&Xs[q][4 * tc];
            float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
        int64_t n = n0 + 4 * tc + j;
        if (n >= cnt) continue;
        int64_t k = k0 + n;
        float *yr = g.y + (int64_t)(g.y_rows ? g.y_rows[k] : k) * g.y_stride;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int64_t o = o0 + 4 * tr + i;
            if (o < g.n_out) yr[o] = acc[i][j] + (g.bias ? g.bias[o] : 0.0f);
        }
    }
}

int cuda__gmm(cuda_ctx *c, const cuda_gmm *g) {
    size_t rb = moe_row_size(g->type, g->n_in);
    int al = type_align(g->type);
    if (!al || !rb) return MOE_EUNSUPPORTED;
    if (g->n_in <= 0 || g->n_out <= 0 || g->n_group <= 0 || g->n_group > 65535 || !g->w || !g->x || !g->y)
        return MOE_EINVAL;
    if ((uintptr_t)g->w % (uintptr_t)al || g->mat_stride % (size_t)al || rb % (size_t)al) {
        moe_log(MOE_LOG_ERROR, "cuda: weight data not %d-byte aligned", al);
        return MOE_EINVAL;
    }
    if (g->max_rows <= 0) return MOE_OK;
    if (g->max_rows <= c->gemv_max_tok) {
        dim3 grid(cuda__blocks(g->n_out, GEMV_WARPS), (unsigned)g->n_group);
        if (grid.x > 0x7fffffffu) return MOE_EINVAL;
        TYPE_SWITCH(g->type, (CUDA_LAUNCH(k_gemv<TT>, grid, GEMV_WARPS * 32, 0, c->stream, *g, rb)));
    } else {
        int64_t ty = (g->max_rows + TN - 1) / TN;
        if (ty > 65535) return MOE_EINVAL;
        dim3 grid(cuda__blocks(g->n_out, TM), (unsigned)ty, (unsigned)g->n_group);
        TYPE_SWITCH(g->type, (CUDA_LAUNCH(k_gemm<TT>, grid, GEMM_THREADS, 0, c->stream, *g, rb)));
    }
    CUDA_LAUNCH_CHECK();
    return MOE_OK;
}

// ---- cuBLAS path ----

__global__ void k_to_f16(const float *__restrict__ x, __half *__restrict__ y, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = __float2half_rn(x[i]);
}

__global__ void k_to_bf16(const float *__restrict__ x, __nv_bfloat16 *__restrict__ y, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16_rn(x[i]);
}

__global__ void k_add_bias(float *__restrict__ y, const float *__restrict__ bias, int64_t n_tok, int64_t n_out) {
    int64_t n = n_tok * n_out;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] += bias[i % n_out];
}

// y (n_tok, n_out) = x (n_tok, n_in) . W^T. Column-major view: Y^T = W^T' X^T
// with W stored as an (n_in x n_out) column-major matrix, hence OP_T on A.
static int blas_matmul(cuda_ctx *c, const moe_weight *w, const float *x, int64_t n_tok, const float *bias, float *y) {
    if (w->n_in > INT_MAX || w->n_out > INT_MAX || n_tok > INT_MAX) return MOE_EINVAL;
    int m = (int)w->n_out, n = (int)n_tok, k = (int)w->n_in;
    const float alpha = 1.0f, beta = 0.0f;
    const void *B = x;
    cudaDataType_t t = CUDA_R_32F;
    if (w->type != MOE_TYPE_F32) {
        int64_t nx = n_tok * w->n_in;
        void *xc = cuda__scratch(c, SCR_MM_X, (size_t)nx * 2);
        if (!xc) return MOE_ENOMEM;
        if (w->type == MOE_TYPE_F16) {
            t = CUDA_R_16F;
            CUDA_LAUNCH(k_to_f16, cuda__grid(nx, 256), 256, 0, c->stream, x, (__half *)xc, nx);
        } else {
            t = CUDA_R_16BF;
            CUDA_LAUNCH(k_to_bf16, cuda__grid(nx, 256), 256, 0, c->stream, x, (__nv_bfloat16 *)xc, nx);
        }
        CUDA_LAUNCH_CHECK();
        B = xc;
    }
    CUBLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, w->data, t, k, B, t, k, &beta, y,
                              CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (bias) {
        CUDA_LAUNCH(k_add_bias, cuda__grid(n_tok * w->n_out, 256), 256, 0, c->stream, y, bias, n_tok, w->n_out);
        CUDA_LAUNCH_CHECK();
    }
    return MOE_OK;
}

extern "C" int cuda__matmul(void *vctx, const moe_weight *w, const float *x, int64_t n_tok, const float *bias,
                            float *y) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if (!w || w->n_mat > 1 || n_tok < 0) return MOE_EINVAL;
    if (n_tok == 0) return MOE_OK;
    if (!x || !y || !w->data) return MOE_EINVAL;
    if (!cuda__gmm_supported(w->type)) return MOE_EUNSUPPORTED;
    bool plain = w->type == MOE_TYPE_F32 || w->type == MOE_TYPE_F16 || w->type == MOE_TYPE_BF16;
    if (plain && n_tok > c->gemv_max_tok) return blas_matmul(c, w, x, n_tok, bias, y);
    cuda_gmm g = {};
    g.type = w->type;
    g.w = w->data;
    g.mat_stride = 0;
    g.n_in = w->n_in;
    g.n_out = w->n_out;
    g.n_group = 1;
    g.off = NULL;
    g.n_rows = n_tok;
    g.max_rows = n_tok;
    g.x = x;
    g.x_stride = w->n_in;
    g.y = y;
    g.y_stride = w->n_out;
    g.bias = bias;
    return cuda__gmm(c, &g);
}
