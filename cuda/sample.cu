// sample.cu - token sampling on the device: greedy argmax, temperature and
// top-p (nucleus), one block per row of logits.
//
// Top-p without sorting: with p_i = exp((l_i - max) / T), the kept set is
// {i : p_i >= tau} for the largest tau whose kept mass reaches top_p of the
// total. Mass is a decreasing step function of tau, and the bit patterns
// of non-negative floats are ordered like their values, so a 31-step
// binary search over the bits finds tau exactly (ties at tau are kept).
// The draw then walks the kept tokens in id order: each thread sums a
// contiguous chunk, a serial scan of the 1024 chunk sums finds the chunk
// holding u, and that thread walks it. Sums are in double in a fixed
// order, so a (seed, row) always gives the same token.
#include <math.h>
#include <string.h>

#include "cuda_internal.cuh"

#define SMP_THREADS 1024
#define SMP_WARPS (SMP_THREADS / 32)

__device__ double block_sum_d(double v, double *red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    double r = 0;
    for (int w = 0; w < SMP_WARPS; w++) r += red[w]; // same order in every thread
    return r;
}

// (v, i) beats (bv, bi): larger, or equal with a lower id; NaN never wins.
__device__ __forceinline__ bool arg_better(float v, int i, float bv, int bi) {
    return i >= 0 && !isnan(v) && (bi < 0 || v > bv || (v == bv && i < bi));
}

__device__ void block_argmax(float v, int i, float *rv, int *ri, float &out_v, int &out_i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (arg_better(ov, oi, v, i)) v = ov, i = oi;
    }
    __syncthreads();
    if (threadIdx.x % 32 == 0) rv[threadIdx.x / 32] = v, ri[threadIdx.x / 32] = i;
    __syncthreads();
    float bv = rv[0];
    int bi = ri[0];
    for (int w = 1; w < SMP_WARPS; w++)
        if (arg_better(rv[w], ri[w], bv, bi)) bv = rv[w], bi = ri[w];
    out_v = bv;
    out_i = bi;
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

__global__ void __launch_bounds__(SMP_THREADS) k_sample(const float *__restrict__ logits, int64_t V,
                                                        const moe_cuda_sample_params *__restrict__ prm,
                                                        int32_t *__restrict__ out) {
    __shared__ double red[SMP_WARPS];
    __shared__ float rv[SMP_WARPS];
    __shared__ int ri[SMP_WARPS];
    __shared__ double chunk_sum[SMP_THREADS];
    __shared__ int pick;
    int64_t row = blockIdx.x;
    const float *l = logits + row * V;
    int tid = threadIdx.x;

    float bv = 0.0f;
    int bi = -1;
    for (int64_t i = tid; i < V; i += SMP_THREADS)
        if (arg_better(l[i], (int)i, bv, bi)) bv = l[i], bi = (int)i;
    float mx;
    int am;
    block_argmax(bv, bi, rv, ri, mx, am);
    moe_cuda_sample_params p = prm[row];
    if (!(p.temperature > 0.0f) || am < 0 || isinf(mx)) {
        if (tid == 0) out[row] = am < 0 ? 0 : am;
        return;
    }
    float inv_t = 1.0f / p.temperature;
    // total mass, then the threshold (largest tau with mass(tau) >= top_p * total)
    double z = 0;
    for (int64_t i = tid; i < V; i += SMP_THREADS) {
        float li = l[i];
        z += isnan(li) ? 0.0 : (double)expf((li - mx) * inv_t);
    }
    z = block_sum_d(z, red);
    float tau = 0.0f;
    if (p.top_p < 1.0f) {
        double target = (double)p.top_p * z;
        uint32_t lo = 0, hi = __float_as_uint(1.0f) + 1; // mass(lo) >= target > mass(hi)
        while (hi - lo > 1) {
            uint32_t mid = lo + (hi - lo) / 2;
            float tm = __uint_as_float(mid);
            double m = 0;
            for (int64_t i = tid; i < V; i += SMP_THREADS) {
                float li = l[i];
                float pi = isnan(li) ? 0.0f : expf((li - mx) * inv_t);
                if (pi >= tm) m += pi;
            }
            m = block_sum_d(m, red);
            if (m >= target) lo = mid;
            else hi = mid;
        }
        tau = __uint_as_float(lo);
    }
    // kept mass per contiguous chunk
    int64_t chunk = (V + SMP_THREADS - 1) / SMP_THREADS, i0 = tid * chunk, i1 = i0 + chunk < V ? i0 + chunk : V;
    double cs = 0;
    for (int64_t i = i0; i < i1; i++) {
        float li = l[i];
        float pi = isnan(li) ? 0.0f : expf((li - mx) * inv_t);
        if (pi >= tau) cs += pi;
    }
    chunk_sum[tid] = cs;
    if (tid == 0) pick = -1;
    __syncthreads();
    __shared__ double u_s, before_s;
    __shared__ int owner;
    if (tid == 0) {
        double total = 0;
        for (int j = 0; j < SMP_THREADS; j++) total += chunk_sum[j];
        uint64_t r = splitmix64(p.seed ^ splitmix64((uint64_t)row + 1));
        double u = (double)(r >> 11) * (1.0 / 9007199254740992.0) * total; // [0, total)
        double acc = 0;
        owner = -1;
        for (int j = 0; j < SMP_THREADS; j++) {
            if (chunk_sum[j] > 0 && acc + chunk_sum[j] > u) {
                owner = j;
                break;
            }
            acc += chunk_sum[j];
        }
        u_s = u;
        before_s = acc;
        if (owner < 0) pick = am; // rounding put u past the end: the most probable token
    }
    __syncthreads();
    if (tid == owner) {
        double acc = before_s;
        int last = -1;
        for (int64_t i = i0; i < i1; i++) {
            float li = l[i];
            float pi = isnan(li) ? 0.0f : expf((li - mx) * inv_t);
            if (pi < tau || pi <= 0.0f) continue;
            last = (int)i;
            acc += pi;
            if (acc > u_s) break;
        }
        pick = last; // the chunk's mass exceeds u, so the walk stops inside it (or at its last kept token)
    }
    __syncthreads();
    if (tid == 0) out[row] = pick < 0 ? am : pick;
}

extern "C" int moe_cuda_sample(const moe_backend *be, const float *logits, int64_t n_rows, int64_t n_vocab,
                               const moe_cuda_sample_params *params, int32_t *out_host) {
    if (!be || !be->ctx || !be->ops || !logits || !params || !out_host || n_rows < 0 || n_vocab <= 0 ||
        n_vocab > INT32_MAX || n_rows > 65535 || !be->ops->name || strcmp(be->ops->name, "cuda"))
        return MOE_EINVAL;
    if (!n_rows) return MOE_OK;
    for (int64_t r = 0; r < n_rows; r++)
        if (!(params[r].top_p > 0.0f) || params[r].top_p > 1.0f || isnan(params[r].temperature)) return MOE_EINVAL;
    cuda_ctx *c = (cuda_ctx *)be->ctx;
    size_t np = (size_t)n_rows * sizeof(moe_cuda_sample_params);
    cuda_stage st;
    MOE_TRY(cuda__stage_begin(c, cuda__stage_size(np), &st));
    const moe_cuda_sample_params *d_p = (const moe_cuda_sample_params *)cuda__stage_put(&st, params, np);
    MOE_TRY(cuda__stage_end(c, &st));
    int32_t *d_out = (int32_t *)cuda__scratch(c, SCR_SAMPLE, (size_t)n_rows * sizeof(int32_t));
    if (!d_out) return MOE_ENOMEM;
    CUDA_LAUNCH(k_sample, (unsigned)n_rows, SMP_THREADS, 0, c->stream, logits, n_vocab, d_p, d_out);
    CUDA_LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpyAsync(out_host, d_out, (size_t)n_rows * sizeof(int32_t), cudaMemcpyDeviceToHost, c->stream));
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    return MOE_OK;
}
