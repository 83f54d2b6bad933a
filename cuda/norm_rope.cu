// norm_rope.cu - RMS norm and rotary position embedding.
//
// Both follow the CPU reference's arithmetic closely: the sum of squares
// and the rope angle are formed in double (the angle p * inv_freq loses
// digits in f32 at long context), the rest in f32.
#include "cuda_internal.cuh"

#define NORM_THREADS 256

// One block per row: sum of squares in double, tree-reduced in shared memory.
__global__ void __launch_bounds__(NORM_THREADS)
k_rms_norm(const float *x, int64_t x_stride, float *y, int64_t y_stride, int64_t n_rows, int64_t n,
           const float *__restrict__ w, float eps) {
    __shared__ double red[NORM_THREADS];
    for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
        const float *xr = x + r * x_stride;
        float *yr = y + r * y_stride;
        double ss = 0;
        for (int64_t i = threadIdx.x; i < n; i += NORM_THREADS) ss += (double)xr[i] * xr[i];
        red[threadIdx.x] = ss;
        __syncthreads();
        for (int s = NORM_THREADS / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
            __syncthreads();
        }
        float inv = (float)(1.0 / sqrt(red[0] / (double)n + (double)eps));
        __syncthreads(); // red[0] read by all before the next row overwrites it
        // x may equal y: each element is read and written by the same thread
        for (int64_t i = threadIdx.x; i < n; i += NORM_THREADS) yr[i] = w[i] * (xr[i] * inv);
    }
}

extern "C" int cuda__rms_norm(void *vctx, const float *x, int64_t x_stride, float *y, int64_t y_stride,
                              int64_t n_rows, int64_t n, const float *w, float eps) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if (!x || !y || !w || n <= 0 || n_rows < 0) return MOE_EINVAL;
    if (!n_rows) return MOE_OK;
    unsigned grid = (unsigned)(n_rows < (int64_t)CUDA_MAX_BLOCKS ? n_rows : CUDA_MAX_BLOCKS);
    CUDA_LAUNCH(k_rms_norm, grid, NORM_THREADS, 0, c->stream, x, x_stride, y, y_stride, n_rows, n, w, eps);
    CUDA_LAUNCH_CHECK();
    return MOE_OK;
}

// One thread per (token, pair); it rotates that pair in every head, so cos
// and sin are computed once per (token, pair) as on the CPU.
__global__ void k_rope(float *x, int64_t n_tok, int64_t tok_stride, int64_t n_head, int64_t head_stride,
                       const int32_t *__restrict__ pos, const float *__restrict__ inv_freq, int64_t half,
                       int neox, float attn_factor) {
    int64_t total = n_tok * half;
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = k / half, i = k % half;
        double ang = (double)pos[t] * (double)inv_freq[i];
        double sd, cd;
        sincos(ang, &sd, &cd);
        float cs = (float)cd * attn_factor, sn = (float)sd * attn_factor;
        int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        for (int64_t h = 0; h < n_head; h++) {
            float *v = x + t * tok_stride + h * head_stride;
            float x0 = v[a], x1 = v[b];
            v[a] = x0 * cs - x1 * sn;
            v[b] = x0 * sn + x1 * cs;
        }
    }
}

extern "C" int cuda__rope(void *vctx, float *x, int64_t n_tok, int64_t tok_stride, int64_t n_head,
                          int64_t head_stride, const int32_t *pos, const moe_rope_params *p) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if (!x || !pos || !p || !p->inv_freq || p->n_rot <= 0 || (p->n_rot & 1) || n_tok < 0 || n_head < 0)
        return MOE_EINVAL;
    if (!n_tok || !n_head) return MOE_OK;
    int64_t half = p->n_rot / 2;
    cuda_stage st;
    MOE_TRY(cuda__stage_begin(c, cuda__stage_size((size_t)n_tok * 4) + cuda__stage_size((size_t)half * 4), &st));
    const int32_t *d_pos = (const int32_t *)cuda__stage_put(&st, pos, (size_t)n_tok * 4);
    const float *d_freq = (const float *)cuda__stage_put(&st, p->inv_freq, (size_t)half * 4);
    MOE_TRY(cuda__stage_end(c, &st));
    CUDA_LAUNCH(k_rope, cuda__grid(n_tok * half, 256), 256, 0, c->stream, x, n_tok, tok_stride, n_head, head_stride, d_pos,
                                                                d_freq, half, p->style == MOE_ROPE_NEOX,
                                                                p->attn_factor);
    CUDA_LAUNCH_CHECK();
    return MOE_OK;
}
