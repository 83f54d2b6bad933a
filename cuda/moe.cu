// moe.cu - the mixture-of-experts layer on the device: routing, grouping
// by expert, the expert FFN as grouped products, and the weighted combine.
//
// Nothing comes back to the host between the steps: the grouped products
// read the per-expert offsets on the device and size their grid for the
// worst case (every token on one expert), so no sync is needed unless the
// caller asks for ids_out / w_out.
//
// Routing runs in double, with the CPU reference's exact order of
// operations and tie rules (lowest expert id wins a tie, everywhere), so
// both backends choose the same experts on the same logits. Non-finite
// logits follow the CPU's rule too (a NaN choice or group score ranks as
// -inf; dropped groups and taken experts are NaN, never candidates), so an
// expert id is always in [0, E).
#include <math.h>

#include "cuda_internal.cuh"

typedef struct route_args {
    int gating;
    int64_t E, K, G, Gu;
    bool norm;
    float scale;
    const float *bias; // device or NULL
} route_args;

// (v, e) beats (bv, be): nothing chosen yet, larger, or tied with a lower id.
__device__ __forceinline__ bool better(double v, int e, double bv, int be) {
    return e >= 0 && (be < 0 || v > bv || (v == bv && e < be));
}

// One warp per token. Shared: s (E), choice (E), group scores (G), kept flags (G).
__global__ void __launch_bounds__(32) k_route(const float *__restrict__ logits, route_args r, int32_t *ids,
                                              float *wts) {
    CUDA_DYN_SMEM(double, smd);
    int64_t t = blockIdx.x, E = r.E;
    int lane = threadIdx.x;
    double *s = smd, *ch = smd + E, *gs = smd + 2 * E;
    int *keep = (int *)(gs + r.G);
    const float *lg = logits + t * E;
    if (r.gating == MOE_GATING_SIGMOID) {
        for (int64_t e = lane; e < E; e += 32) s[e] = 1.0 / (1.0 + exp(-(double)lg[e]));
    } else {
        double mx = -INFINITY, sum = 0;
        for (int64_t e = lane; e < E; e += 32) mx = fmax(mx, (double)lg[e]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        for (int64_t e = lane; e < E; e += 32) sum += (s[e] = exp((double)lg[e] - mx));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        for (int64_t e = lane; e < E; e += 32) s[e] /= sum;
    }
    for (int64_t e = lane; e < E; e += 32) {
        double v = s[e] + (r.bias ? (double)r.bias[e] : 0.0);
        ch[e] = isnan(v) ? -INFINITY : v;
    }
    __syncwarp();
    if (r.G > 1 && r.Gu < r.G) {
        int64_t per = E / r.G;
        for (int64_t g = lane; g < r.G; g += 32) {
            const double *cg = ch + g * per;
            double a = -INFINITY, b = -INFINITY;
            for (int64_t i = 0; i < per; i++) {
                if (r.gating == MOE_GATING_SIGMOID) {
                    if (cg[i] > a) {
                        b = a;
                        a = cg[i];
                    } else if (cg[i] > b) {
                        b = cg[i];
                    }
                } else {
                    a = cg[i] > a ? cg[i] : a;
                }
            }
            double v = r.gating == MOE_GATING_SIGMOID && per > 1 ? a + b : a;
            gs[g] = isnan(v) ? -INFINITY : v; // +inf + -inf
            keep[g] = 0;
        }
        __syncwarp();
        if (lane == 0) // a handful of groups: serial, exactly as the CPU picks them
            for (int64_t k = 0; k < r.Gu; k++) {
                int64_t best = -1;
                for (int64_t g = 0; g < r.G; g++)
                    if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
                if (best >= 0) keep[best] = 1;
            }
        __syncwarp();
        for (int64_t e = lane; e < E; e += 32)
            if (!keep[e / per]) ch[e] = NAN; // excluded
        __syncwarp();
    }
    double wsum = 0;
    for (int64_t k = 0; k < r.K; k++) {
        double bv = 0;
        int be = -1;
        for (int64_t e = lane; e < E; e += 32)
            if (!isnan(ch[e]) && better(ch[e], (int)e, bv, be)) bv = ch[e], be = (int)e;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            double ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (better(ov, oe, bv, be)) bv = ov, be = oe;
        }
        // every lane holds the same winner now; n_group_used * per >= K
        // (checked by the launcher) leaves a candidate, so be >= 0 -- the
        // guard only keeps a broken invariant from indexing s[-1]
        if (be < 0) be = 0;
        wsum += s[be];
        if (lane == 0) {
            ids[t * r.K + k] = be;
            wts[t * r.K + k] = (float)s[be];
            ch[be] = NAN; // taken
        }
        __syncwarp();
    }
    if (lane == 0)
        for (int64_t k = 0; k < r.K; k++) {
            double v = wts[t * r.K + k];
            if (r.norm) v /= wsum + 1e-20;
            wts[t * r.K + k] = (float)(v * r.scale);
        }
}

// Counting sort of the n_ent (token, k) entries by expert, in one block:
// off (E + 1) offsets, rows[pos] = the token of the entry at pos, ent_of[i]
// = the position of entry i. Order inside an expert does not matter (each
// entry's products are computed alone).
__global__ void __launch_bounds__(1024) k_permute(const int32_t *__restrict__ ids, int64_t n_ent, int64_t K, int64_t E,
                                                  int32_t *off, int32_t *rows, int32_t *ent_of) {
    CUDA_DYN_SMEM(int, cnt);
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    // k_route writes ids in [0, E); the clamp makes that true by construction
    // here as well, so no id can ever index outside cnt
    for (int64_t i = threadIdx.x; i < n_ent; i += blockDim.x) atomicAdd(&cnt[(uint32_t)ids[i] < (uint32_t)E ? ids[i] : 0], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int64_t e = 0; e < E; e++) {
            off[e] = acc;
            int n = cnt[e];
            cnt[e] = acc; // becomes the fill cursor
            acc += n;
        }
        off[E] = acc;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n_ent; i += blockDim.x) {
        int p = atomicAdd(&cnt[(uint32_t)ids[i] < (uint32_t)E ? ids[i] : 0], 1);
        rows[p] = (int32_t)(i / K);
        ent_of[i] = p;
    }
}

// out[t][i] = sum_k w[t][k] * d[ent_of[t][k]][i], k in routing order.
__global__ void k_combine(const float *__restrict__ d, const float *__restrict__ w, const int32_t *__restrict__ ent_of,
                          int64_t n_tok, int64_t K, int64_t n_embd, float *__restrict__ out) {
    int64_t total = n_tok * n_embd;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < total; j += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = j / n_embd, i = j % n_embd;
        float acc = 0.0f;
        for (int64_t k = 0; k < K; k++) acc += w[t * K + k] * d[(int64_t)ent_of[t * K + k] * n_embd + i];
        out[j] = acc;
    }
}

extern "C" int cuda__moe(void *vctx, const float *h, int64_t n_tok, const float *router_logits,
                         const moe_route_params *rp, const moe_weight *gate, const moe_weight *up,
                         const moe_weight *down, float *out, int32_t *ids_out, float *w_out) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if (!h || !router_logits || !rp || !gate || !up || !down || !out || n_tok < 0) return MOE_EINVAL;
    int64_t E = rp->n_expert, K = rp->n_used, n_embd = gate->n_in, n_ff = gate->n_out;
    if (E <= 0 || K <= 0 || K > E || gate->n_mat != E || up->n_mat != E || down->n_mat != E || up->n_in != n_embd ||
        up->n_out != n_ff || down->n_in != n_ff || down->n_out != n_embd || (rp->n_group > 1 && E % rp->n_group) ||
        (rp->n_group > 1 && (rp->n_group_used <= 0 || rp->n_group_used > rp->n_group ||
                             rp->n_group_used * (E / rp->n_group) < K)))
        return MOE_EINVAL;
    if (rp->gating != MOE_GATING_SOFTMAX && rp->gating != MOE_GATING_SIGMOID) return MOE_EINVAL;
    if (n_tok == 0) return MOE_OK;
    int64_t G = rp->n_group > 1 ? rp->n_group : 1, n_ent = n_tok * K;
    size_t route_smem = (size_t)(2 * E + G) * sizeof(double) + (size_t)G * sizeof(int);
    if (route_smem > 48 * 1024 || (size_t)E * sizeof(int) > 48 * 1024 || E > 65535 || n_ent > INT32_MAX / 2) {
        moe_log(MOE_LOG_ERROR, "cuda: moe with %lld experts unsupported", (long long)E);
        return MOE_EUNSUPPORTED;
    }
    if (!cuda__gmm_supported(gate->type) || !cuda__gmm_supported(up->type) || !cuda__gmm_supported(down->type))
        return MOE_EUNSUPPORTED;

    // routing scratch: ids, wts, rows, ent_of (n_ent each), off (E + 1)
    size_t a_ent = cuda__stage_size((size_t)n_ent * 4), a_off = cuda__stage_size((size_t)(E + 1) * 4);
    char *idx = (char *)cuda__scratch(c, SCR_MOE_IDX, 4 * a_ent + a_off);
    float *G_ = (float *)cuda__scratch(c, SCR_MOE_G, (size_t)n_ent * (size_t)n_ff * sizeof(float));
    float *U_ = (float *)cuda__scratch(c, SCR_MOE_U, (size_t)n_ent * (size_t)n_ff * sizeof(float));
    float *D_ = (float *)cuda__scratch(c, SCR_MOE_D, (size_t)n_ent * (size_t)n_embd * sizeof(float));
    if (!idx || !G_ || !U_ || !D_) return MOE_ENOMEM;
    int32_t *ids = (int32_t *)idx, *rows = (int32_t *)(idx + 2 * a_ent), *ent_of = (int32_t *)(idx + 3 * a_ent);
    float *wts = (float *)(idx + a_ent);
    int32_t *off = (int32_t *)(idx + 4 * a_ent);

    route_args r = {rp->gating, E, K, G, rp->n_group_used, rp->norm, rp->scale, rp->bias};
    CUDA_LAUNCH(k_route, (unsigned)n_tok, 32, route_smem, c->stream, router_logits, r, ids, wts);
    CUDA_LAUNCH_CHECK();
    CUDA_LAUNCH(k_permute, 1, 1024, (size_t)E * sizeof(int), c->stream, ids, n_ent, K, E, off, rows, ent_of);
    CUDA_LAUNCH_CHECK();

    cuda_gmm g = {};
    g.n_group = E, g.off = off, g.max_rows = n_tok;
    g.type = gate->type, g.w = gate->data, g.mat_stride = cuda__mat_stride(gate);
    g.n_in = n_embd, g.n_out = n_ff;
    g.x = h, g.x_stride = n_embd, g.x_rows = rows;
    g.y = G_, g.y_stride = n_ff;
    MOE_TRY(cuda__gmm(c, &g));
    g.type = up->type, g.w = up->data, g.mat_stride = cuda__mat_stride(up);
    g.y = U_;
    MOE_TRY(cuda__gmm(c, &g));
    MOE_TRY(cuda__swiglu(c, G_, U_, G_, n_ent * n_ff));
    g.type = down->type, g.w = down->data, g.mat_stride = cuda__mat_stride(down);
    g.n_in = n_ff, g.n_out = n_embd;
    g.x = G_, g.x_stride = n_ff, g.x_rows = NULL;
    g.y = D_, g.y_stride = n_embd;
    MOE_TRY(cuda__gmm(c, &g));
    CUDA_LAUNCH(k_combine, cuda__grid(n_tok * n_embd, 256), 256, 0, c->stream, D_, wts, ent_of, n_tok, K, n_embd, out);
    CUDA_LAUNCH_CHECK();
    if (ids_out || w_out) {
        if (ids_out) CUDA_CHECK(cudaMemcpyAsync(ids_out, ids, (size_t)n_ent * 4, cudaMemcpyDeviceToHost, c->stream));
        if (w_out) CUDA_CHECK(cudaMemcpyAsync(w_out, wts, (size_t)n_ent * 4, cudaMemcpyDeviceToHost, c->stream));
        CUDA_CHECK(cudaStreamSynchronize(c->stream));
    }
    return MOE_OK;
}
