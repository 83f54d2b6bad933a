// attention.cu - the paged KV cache: store, GQA attention, MLA attention.
//
// One kernel serves both attentions: a block per (token, query head) walks
// the token's positions 0..pos[t] in tiles of ATT_TILE cache slots, looked
// up through the block table on the device. Per tile: one warp per position
// computes q.k (lanes over the head dimension, coalesced), then a running
// max and sum rescale the output accumulators (online softmax), and each
// thread adds the tile's weighted V for its own output dimensions (threads
// over dimensions, coalesced). Simple first: no split over positions
// (flash-decoding), so a long-context decode step runs H blocks per token.
//
// MLA (DeepSeek) runs over the compressed cache exactly as the CPU does:
// q_nope is absorbed into the latent space per head (q_lat = k_b[h] q_nope,
// a grouped product), attention treats each cached row (latent c, k_pe)
// as the key and its first kv_lora floats as the value, and v_b[h] maps the
// latent output back (a second grouped product).
#include <math.h>

#include "cuda_internal.cuh"

#define ATT_THREADS 128
#define ATT_WARPS (ATT_THREADS / 32)
#define ATT_TILE 128
#define ATT_MAXV 4 // output dims per thread: dv <= ATT_MAXV * ATT_THREADS

// ---- host-side checks (the view is host memory, as on the CPU) ----

static int64_t kv_slot(const moe_kv_view *kv, int32_t s, int64_t p) {
    if (s < 0 || s >= kv->n_seq || p < 0) return -1;
    int64_t b = p / kv->block_size;
    if (b >= kv->block_off[s + 1] - kv->block_off[s]) return -1;
    int32_t blk = kv->block_table[kv->block_off[s] + b];
    if (blk < 0) return -1;
    return (int64_t)blk * kv->block_size + p % kv->block_size;
}

static int check_kv(const moe_kv_view *kv) {
    if (!kv || !kv->seq || !kv->pos || !kv->block_off || kv->block_size <= 0 || kv->n_seq < 0 || kv->n_tok < 0)
        return MOE_EINVAL;
    if (kv->n_tok && !kv->block_table) return MOE_EINVAL;
    for (int64_t t = 0; t < kv->n_tok; t++)
        if (kv_slot(kv, kv->seq[t], kv->pos[t]) < 0) return MOE_EINVAL;
    return MOE_OK;
}

// ---- store ----

__global__ void k_kv_store(const int64_t *__restrict__ slot, int64_t n_tok, float *__restrict__ kc,
                           float *__restrict__ vc, int64_t kw, int64_t vw, const float *__restrict__ k,
                           const float *__restrict__ v) {
    for (int64_t t = blockIdx.y; t < n_tok; t += gridDim.y) {
        int64_t s = slot[t];
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < kw + vw; i += (int64_t)gridDim.x * blockDim.x) {
            if (i < kw) kc[s * kw + i] = k[t * kw + i];
            else vc[s * vw + (i - kw)] = v[t * vw + (i - kw)];
        }
    }
}

extern "C" int cuda__kv_store(void *vctx, const moe_kv_view *kv, float *k_cache, float *v_cache, int64_t k_width,
                              int64_t v_width, const float *k, const float *v) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    int rc = check_kv(kv);
    if (rc) return rc;
    if (!k_cache || !k || k_width <= 0 || v_width < 0 || (v_width > 0 && (!v_cache || !v))) return MOE_EINVAL;
    if (!kv->n_tok) return MOE_OK;
    size_t n = (size_t)kv->n_tok * sizeof(int64_t);
    cuda_stage st;
    MOE_TRY(cuda__stage_begin(c, cuda__stage_size(n), &st));
    int64_t *slots = (int64_t *)(st.seg->host + st.used);
    const int64_t *d_slot = (const int64_t *)cuda__stage_put(&st, NULL, n);
    for (int64_t t = 0; t < kv->n_tok; t++) slots[t] = kv_slot(kv, kv->seq[t], kv->pos[t]);
    MOE_TRY(cuda__stage_end(c, &st));
    dim3 grid(cuda__grid(k_width + v_width, 256), (unsigned)(kv->n_tok < 65535 ? kv->n_tok : 65535));
    CUDA_LAUNCH(k_kv_store, grid, 256, 0, c->stream, d_slot, kv->n_tok, k_cache, v_cache, k_width, v_width, k, v);
    CUDA_LAUNCH_CHECK();
    return MOE_OK;
}

// ---- attention ----

typedef struct att_args {
    // the query of (t, h) is q1[0..n1) followed by q2[0..n2)
    const float *q1;
    int64_t q1_tok, q1_head, n1;
    const float *q2;
    int64_t q2_tok, q2_head, n2;
    // key of slot s for kv head g: kc + s * k_stride + g * k_head, (n1 + n2) floats
    const float *kc;
    int64_t k_stride, k_head;
    // value: vc + s * v_stride + g * v_head, dv floats
    const float *vc;
    int64_t v_stride, v_head, dv;
    int64_t n_tok, n_head, group;
    float scale;
    // the view, on the device
    const int32_t *seq, *pos, *bt;
    const int64_t *boff;
    int64_t block_size;
    float *out;
    int64_t o_tok, o_head;
} att_args;

// Sum (or max) over the block; every thread gets the result. `red` holds
// ATT_WARPS floats; the leading barrier protects it from the previous use.
__device__ __forceinline__ float block_reduce(float v, float *red, bool is_max) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, u) : v + u;
    }
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = red[0];
#pragma unroll
    for (int w = 1; w < ATT_WARPS; w++) r = is_max ? fmaxf(r, red[w]) : r + red[w];
    return r;
}

__global__ void __launch_bounds__(ATT_THREADS) k_attention(att_args a) {
    CUDA_DYN_SMEM(float, qs); // (n1 + n2) query of this (t, h)
    __shared__ float sc[ATT_TILE];
    __shared__ int64_t sl[ATT_TILE];
    __shared__ float red[ATT_WARPS];
    int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    int64_t h = blockIdx.x, dk = a.n1 + a.n2, g = h / a.group;
    for (int64_t t = blockIdx.y; t < a.n_tok; t += gridDim.y) {
        __syncthreads(); // the previous token's readers of qs/sc/sl are done
        for (int64_t i = tid; i < dk; i += ATT_THREADS)
            qs[i] = i < a.n1 ? a.q1[t * a.q1_tok + h * a.q1_head + i] : a.q2[t * a.q2_tok + h * a.q2_head + (i - a.n1)];
        int64_t len = (int64_t)a.pos[t] + 1;
        const int32_t *bt = a.bt + a.boff[a.seq[t]];
        float m = -INFINITY, l = 0.0f, acc[ATT_MAXV];
#pragma unroll
        for (int r = 0; r < ATT_MAXV; r++) acc[r] = 0.0f;
        for (int64_t p0 = 0; p0 < len; p0 += ATT_TILE) {
            int n = (int)(len - p0 < ATT_TILE ? len - p0 : ATT_TILE);
            __syncthreads(); // qs written; the previous tile's sc/sl readers are done
            for (int i = tid; i < n; i += ATT_THREADS) {
                int64_t p = p0 + i;
                sl[i] = (int64_t)bt[p / a.block_size] * a.block_size + p % a.block_size;
            }
            __syncthreads();
            for (int i = warp; i < n; i += ATT_WARPS) {
                const float *k = a.kc + sl[i] * a.k_stride + g * a.k_head;
                float d = 0.0f;
                for (int64_t j = lane; j < dk; j += 32) d += qs[j] * k[j];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                if (lane == 0) sc[i] = d * a.scale;
            }
            __syncthreads();
            float mx = -INFINITY;
            for (int i = tid; i < n; i += ATT_THREADS) mx = fmaxf(mx, sc[i]);
            mx = block_reduce(mx, red, true);
            float m_new = fmaxf(m, mx);
            float alpha = expf(m - m_new); // 0 on the first tile (m = -inf)
            float ps = 0.0f;
            for (int i = tid; i < n; i += ATT_THREADS) {
                float e = expf(sc[i] - m_new);
                sc[i] = e;
                ps += e;
            }
            ps = block_reduce(ps, red, false); // its barriers also publish sc
            l = l * alpha + ps;
            m = m_new;
            // each thread: its output dims tid, tid + 128, ... over the tile's positions
            float s[ATT_MAXV];
#pragma unroll
            for (int r = 0; r < ATT_MAXV; r++) s[r] = 0.0f;
            const float *vb = a.vc + g * a.v_head + tid;
            for (int i = 0; i < n; i++) {
                float w = sc[i];
                const float *row = vb + sl[i] * a.v_stride;
#pragma unroll
                for (int r = 0; r < ATT_MAXV; r++)
                    if (tid + r * ATT_THREADS < a.dv) s[r] += w * row[r * ATT_THREADS];
            }
#pragma unroll
            for (int r = 0; r < ATT_MAXV; r++) acc[r] = acc[r] * alpha + s[r];
        }
        float inv = 1.0f / l;
#pragma unroll
        for (int r = 0; r < ATT_MAXV; r++) {
            int64_t d = tid + (int64_t)r * ATT_THREADS;
            if (d < a.dv) a.out[t * a.o_tok + h * a.o_head + d] = acc[r] * inv;
        }
    }
}

// Stages the view's arrays and fills a's device pointers.
static int stage_view(cuda_ctx *c, const moe_kv_view *kv, size_t extra, cuda_stage *st, att_args *a) {
    int64_t n_bt = kv->block_off[kv->n_seq];
    size_t s_tok = (size_t)kv->n_tok * 4, s_bt = (size_t)(n_bt > 0 ? n_bt : 0) * 4,
           s_off = (size_t)(kv->n_seq + 1) * 8;
    MOE_TRY(cuda__stage_begin(c, 2 * cuda__stage_size(s_tok) + cuda__stage_size(s_bt) + cuda__stage_size(s_off) + extra,
                            st));
    a->seq = (const int32_t *)cuda__stage_put(st, kv->seq, s_tok);
    a->pos = (const int32_t *)cuda__stage_put(st, kv->pos, s_tok);
    a->bt = (const int32_t *)cuda__stage_put(st, kv->block_table, s_bt);
    a->boff = (const int64_t *)cuda__stage_put(st, kv->block_off, s_off);
    a->block_size = kv->block_size;
    return MOE_OK;
}

static int launch_attention(cuda_ctx *c, const att_args *a) {
    size_t smem = (size_t)(a->n1 + a->n2) * sizeof(float);
    if (smem > 48 * 1024 || a->dv > (int64_t)ATT_MAXV * ATT_THREADS || a->n_head > 65535) {
        moe_log(MOE_LOG_ERROR, "cuda: attention head too wide (dk %lld, dv %lld)", (long long)(a->n1 + a->n2),
                (long long)a->dv);
        return MOE_EUNSUPPORTED;
    }
    dim3 grid((unsigned)a->n_head, (unsigned)(a->n_tok < 65535 ? a->n_tok : 65535));
    CUDA_LAUNCH(k_attention, grid, ATT_THREADS, smem, c->stream, *a);
    CUDA_LAUNCH_CHECK();
    return MOE_OK;
}

extern "C" int cuda__attention(void *vctx, const moe_kv_view *kv, const float *q, const float *k_cache,
                               const float *v_cache, int64_t n_head, int64_t n_kv_head, int64_t head_dim, float scale,
                               float *out) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    int rc = check_kv(kv);
    if (rc) return rc;
    if (!q || !k_cache || !v_cache || !out || n_head <= 0 || n_kv_head <= 0 || n_head % n_kv_head || head_dim <= 0)
        return MOE_EINVAL;
    if (kv->n_tok == 0) return MOE_OK;
    att_args a = {};
    cuda_stage st;
    MOE_TRY(stage_view(c, kv, 0, &st, &a));
    MOE_TRY(cuda__stage_end(c, &st));
    a.q1 = q, a.q1_tok = n_head * head_dim, a.q1_head = head_dim, a.n1 = head_dim;
    a.q2 = q, a.q2_tok = 0, a.q2_head = 0, a.n2 = 0;
    a.kc = k_cache, a.k_stride = n_kv_head * head_dim, a.k_head = head_dim;
    a.vc = v_cache, a.v_stride = n_kv_head * head_dim, a.v_head = head_dim, a.dv = head_dim;
    a.n_tok = kv->n_tok, a.n_head = n_head, a.group = n_head / n_kv_head, a.scale = scale;
    a.out = out, a.o_tok = n_head * head_dim, a.o_head = head_dim;
    return launch_attention(c, &a);
}

extern "C" int cuda__mla_attention(void *vctx, const moe_kv_view *kv, const float *q, const float *cache,
                                   int64_t kv_lora, int64_t n_rot, int64_t nope, const moe_weight *k_b,
                                   const moe_weight *v_b, float scale, float *out) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    int rc = check_kv(kv);
    if (rc) return rc;
    if (!q || !cache || !out || !k_b || !v_b || kv_lora <= 0 || n_rot < 0 || nope <= 0) return MOE_EINVAL;
    int64_t H = k_b->n_mat, n_tok = kv->n_tok, dq = nope + n_rot, R = kv_lora, dv = v_b->n_out;
    if (k_b->n_in != nope || k_b->n_out != kv_lora || v_b->n_mat != H || v_b->n_in != kv_lora || H <= 0)
        return MOE_EINVAL;
    if (n_tok == 0) return MOE_OK;
    if (n_tok * H > INT32_MAX / 2) return MOE_EINVAL;
    size_t nq = (size_t)n_tok * (size_t)H * (size_t)R * sizeof(float);
    float *q_lat = (float *)cuda__scratch(c, SCR_MLA_QLAT, nq);
    float *o_lat = (float *)cuda__scratch(c, SCR_MLA_OLAT, nq);
    if (!q_lat || !o_lat) return MOE_ENOMEM;

    // heads as groups: entry h * n_tok + t is row t * H + h of q / q_lat / o_lat / out
    size_t s_off = (size_t)(H + 1) * 4, s_idx = (size_t)(n_tok * H) * 4;
    att_args a = {};
    cuda_stage st;
    MOE_TRY(stage_view(c, kv, cuda__stage_size(s_off) + cuda__stage_size(s_idx), &st, &a));
    int32_t *h_off = (int32_t *)(st.seg->host + st.used);
    const int32_t *d_off = (const int32_t *)cuda__stage_put(&st, NULL, s_off);
    int32_t *h_idx = (int32_t *)(st.seg->host + st.used);
    const int32_t *d_idx = (const int32_t *)cuda__stage_put(&st, NULL, s_idx);
    for (int64_t h = 0; h <= H; h++) h_off[h] = (int32_t)(h * n_tok);
    for (int64_t h = 0; h < H; h++)
        for (int64_t t = 0; t < n_tok; t++) h_idx[h * n_tok + t] = (int32_t)(t * H + h);
    MOE_TRY(cuda__stage_end(c, &st));

    // q_lat[t][h] = k_b[h] . q_nope[t][h]
    cuda_gmm g = {};
    g.type = k_b->type, g.w = k_b->data, g.mat_stride = cuda__mat_stride(k_b);
    g.n_in = nope, g.n_out = R, g.n_group = H, g.off = d_off, g.max_rows = n_tok;
    g.x = q, g.x_stride = dq, g.x_rows = d_idx;
    g.y = q_lat, g.y_stride = R, g.y_rows = d_idx;
    MOE_TRY(cuda__gmm(c, &g));

    a.q1 = q_lat, a.q1_tok = H * R, a.q1_head = R, a.n1 = R;
    a.q2 = q + nope, a.q2_tok = H * dq, a.q2_head = dq, a.n2 = n_rot;
    a.kc = cache, a.k_stride = R + n_rot, a.k_head = 0;
    a.vc = cache, a.v_stride = R + n_rot, a.v_head = 0, a.dv = R;
    a.n_tok = n_tok, a.n_head = H, a.group = H, a.scale = scale;
    a.out = o_lat, a.o_tok = H * R, a.o_head = R;
    MOE_TRY(launch_attention(c, &a));

    // out[t][h] = v_b[h] . o_lat[t][h]
    g.type = v_b->type, g.w = v_b->data, g.mat_stride = cuda__mat_stride(v_b);
    g.n_in = R, g.n_out = dv;
    g.x = o_lat, g.x_stride = R, g.x_rows = d_idx;
    g.y = out, g.y_stride = dv, g.y_rows = d_idx;
    return cuda__gmm(c, &g);
}
