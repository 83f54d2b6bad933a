/* cpu_backend.c - the reference backend: every op of backend.h on the CPU.
 *
 * Matrix products go through cpu_matmul / cpu_matmul_experts (weights used
 * in place from the mapped file); attention runs one task per (token,
 * head) on the pool. Buffers are plain heap memory, so upload/download are
 * memcpy and bind_weight is the identity.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu_matmul.h"
#include "qblocks.h"
#include "quant.h"
#include "threadpool.h"

typedef struct cpu_ctx {
    cpu_pool *pool;
    int n_threads;
} cpu_ctx;

/* n rounded up to 64 bytes, for carving one scratch block into arrays. */
static size_t al64(size_t n) { return (n + 63) & ~(size_t)63; }

static void cpu_destroy(void *vctx) {
    cpu_ctx *c = vctx;
    if (!c) return;
    cpu_pool_destroy(c->pool);
    free(c);
}

static void *cpu_alloc(void *vctx, size_t nbytes) {
    (void)vctx;
    return calloc(1, nbytes ? nbytes : 1);
}

static void cpu_free(void *vctx, void *buf) {
    (void)vctx;
    free(buf);
}

static int cpu_copy(void *vctx, void *dst, const void *src, size_t nbytes) {
    (void)vctx;
    if ((!dst || !src) && nbytes) return MOE_EINVAL;
    if (nbytes) memmove(dst, src, nbytes);
    return MOE_OK;
}

static int cpu_bind_weight(void *vctx, const void *host, size_t nbytes, const void **out) {
    (void)vctx;
    (void)nbytes;
    if (!out) return MOE_EINVAL;
    *out = host;
    return MOE_OK;
}

static void cpu_unbind_weight(void *vctx, const void *bound) {
    (void)vctx;
    (void)bound;
}

static size_t mat_stride(const moe_weight *w) {
    return w->mat_stride ? w->mat_stride : (size_t)w->n_out * moe_row_size(w->type, w->n_in);
}

static int cpu_embed(void *vctx, const moe_weight *w, const int32_t *ids, int64_t n, float *out) {
    (void)vctx;
    if (!w || !ids || !out || n < 0) return MOE_EINVAL;
    size_t rs = moe_row_size(w->type, w->n_in);
    if (!rs) return MOE_EUNSUPPORTED;
    for (int64_t t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= w->n_out) return MOE_EINVAL;
        int rc = moe_dequantize_row(w->type, (const char *)w->data + (size_t)ids[t] * rs, out + t * w->n_in, w->n_in);
        if (rc) return rc;
    }
    return MOE_OK;
}

static int cpu_get_rows(void *vctx, const float *x, int64_t x_stride, int64_t n_col, const int32_t *rows, int64_t n,
                        float *out) {
    (void)vctx;
    if (!x || !rows || !out || n < 0 || n_col < 0) return MOE_EINVAL;
    for (int64_t i = 0; i < n; i++) memmove(out + i * n_col, x + (int64_t)rows[i] * x_stride, (size_t)n_col * sizeof(float));
    return MOE_OK;
}

static int cpu_rms_norm(void *vctx, const float *x, int64_t x_stride, float *y, int64_t y_stride, int64_t n_rows,
                        int64_t n, const float *w, float eps) {
    (void)vctx;
    if (!x || !y || !w || n <= 0 || n_rows < 0) return MOE_EINVAL;
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * x_stride;
        float *yr = y + r * y_stride;
        double ss = 0;
        for (int64_t i = 0; i < n; i++) ss += (double)xr[i] * xr[i];
        float inv = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
        for (int64_t i = 0; i < n; i++) yr[i] = w[i] * (xr[i] * inv);
    }
    return MOE_OK;
}

static int cpu_matmul_op(void *vctx, const moe_weight *w, const float *x, int64_t n_tok, const float *bias, float *y) {
    cpu_ctx *c = vctx;
    if (!w || w->n_mat > 1) return MOE_EINVAL;
    if (n_tok == 0) return MOE_OK;
    int rc = cpu_matmul(c->pool, w->type, w->data, w->n_in, w->n_out, x, n_tok, y);
    if (rc) return rc;
    if (bias)
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t o = 0; o < w->n_out; o++) y[t * w->n_out + o] += bias[o];
    return MOE_OK;
}

static int cpu_add(void *vctx, float *y, const float *x, int64_t n) {
    (void)vctx;
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
    return MOE_OK;
}

static int cpu_mul(void *vctx, float *y, const float *x, int64_t n) {
    (void)vctx;
    for (int64_t i = 0; i < n; i++) y[i] *= x[i];
    return MOE_OK;
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

static int cpu_swiglu(void *vctx, const float *gate, const float *up, float *out, int64_t n) {
    (void)vctx;
    for (int64_t i = 0; i < n; i++) out[i] = silu(gate[i]) * up[i];
    return MOE_OK;
}

static int cpu_sigmoid_scale(void *vctx, float *y, const float *g, int64_t n_rows, int64_t n) {
    (void)vctx;
    for (int64_t r = 0; r < n_rows; r++) {
        float s = 1.0f / (1.0f + expf(-g[r]));
        for (int64_t i = 0; i < n; i++) y[r * n + i] *= s;
    }
    return MOE_OK;
}

static int cpu_rope(void *vctx, float *x, int64_t n_tok, int64_t tok_stride, int64_t n_head, int64_t head_stride,
                    const int32_t *pos, const moe_rope_params *p) {
    (void)vctx;
    if (!x || !pos || !p || !p->inv_freq || p->n_rot <= 0 || (p->n_rot & 1)) return MOE_EINVAL;
    int64_t half = p->n_rot / 2;
    for (int64_t t = 0; t < n_tok; t++) {
        for (int64_t i = 0; i < half; i++) {
            /* the angle in double: p * inv_freq loses digits in f32 at long context */
            double ang = (double)pos[t] * (double)p->inv_freq[i];
            float cs = (float)cos(ang) * p->attn_factor, sn = (float)sin(ang) * p->attn_factor;
            for (int64_t h = 0; h < n_head; h++) {
                float *v = x + t * tok_stride + h * head_stride;
                int64_t a = p->style == MOE_ROPE_NEOX ? i : 2 * i;
                int64_t b = p->style == MOE_ROPE_NEOX ? i + half : 2 * i + 1;
                float x0 = v[a], x1 = v[b];
                v[a] = x0 * cs - x1 * sn;
                v[b] = x0 * sn + x1 * cs;
            }
        }
    }
    return MOE_OK;
}

/* Cache slot of position p of sequence s, or -1 when the block table is too short. */
static int64_t kv_slot(const moe_kv_view *kv, int32_t s, int64_t p) {
    int64_t b = p / kv->block_size;
    if (s < 0 || s >= kv->n_seq || p < 0 || b >= kv->block_off[s + 1] - kv->block_off[s]) return -1;
    int32_t blk = kv->block_table[kv->block_off[s] + b];
    if (blk < 0) return -1;
    return (int64_t)blk * kv->block_size + p % kv->block_size;
}

static int check_kv(const moe_kv_view *kv) {
    if (!kv || !kv->seq || !kv->pos || !kv->block_off || kv->block_size <= 0) return MOE_EINVAL;
    if (kv->n_tok && !kv->block_table) return MOE_EINVAL;
    for (int64_t t = 0; t < kv->n_tok; t++)
        if (kv_slot(kv, kv->seq[t], kv->pos[t]) < 0) return MOE_EINVAL;
    return MOE_OK;
}

static int cpu_kv_store(void *vctx, const moe_kv_view *kv, float *k_cache, float *v_cache, int64_t k_width,
                        int64_t v_width, const float *k, const float *v) {
    (void)vctx;
    int rc = check_kv(kv);
    if (rc) return rc;
    if (!k_cache || !k || (v_width > 0 && (!v_cache || !v))) return MOE_EINVAL;
    for (int64_t t = 0; t < kv->n_tok; t++) {
        int64_t slot = kv_slot(kv, kv->seq[t], kv->pos[t]);
        memcpy(k_cache + slot * k_width, k + t * k_width, (size_t)k_width * sizeof(float));
        if (v_width > 0) memcpy(v_cache + slot * v_width, v + t * v_width, (size_t)v_width * sizeof(float));
    }
    return MOE_OK;
}

/* One (token, head) of GQA attention. Scores for positions 0..pos go to a
 * per-thread scratch row. */
typedef struct attn_job {
    const moe_kv_view *kv;
    const float *q;   /* (n_tok, n_head, q_width) */
    int64_t q_width;  /* per head */
    const float *k_cache;
    int64_t k_stride; /* floats per cache slot */
    int64_t k_off_per_kvh;
    const float *v_cache;
    int64_t v_stride;
    int64_t v_off_per_kvh;
    int64_t dk, dv;   /* dot length (from q's head start), value width */
    int64_t n_head, group;
    float scale;
    float *scratch;   /* n_threads * max_len */
    int64_t max_len;
    float *out;       /* (n_tok, n_head, dv) */
} attn_job;

/* f32 dot with 8 independent partial sums, so the compiler can keep them
 * in one vector register (a single running sum is a serial dependency). */
static float dotf_generic(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y[i] += w * x[i] */
static void axpyf_generic(float *restrict y, float w, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += w * x[i];
}

/* Weighted row sums for MLA: for heads [h0, h1) and columns [r0, r1),
 * o[h * o_stride + i] += w[h * w_stride + p] * rows[p][i] for p = 0 .. np - 1,
 * one position after another. Each element's chain is fixed: the AVX2
 * version uses FMA on the elements of whole 8-column groups counted from
 * r0 and a multiply-add on the rest, so callers that cut the columns at
 * multiples of 8 get the same bits however they cut them. Accumulating in
 * registers across positions reads each row once per head instead of also
 * reading and writing o every position (axpyf). */
static void wsumf_generic(float *o, int64_t o_stride, const float *w, int64_t w_stride, const float *const *rows,
                          int64_t np, int64_t h0, int64_t h1, int64_t r0, int64_t r1) {
    for (int64_t h = h0; h < h1; h++)
        for (int64_t i = r0; i < r1; i++) {
            float acc = o[h * o_stride + i];
            for (int64_t p = 0; p < np; p++) acc += w[h * w_stride + p] * rows[p][i];
            o[h * o_stride + i] = acc;
        }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* AVX2 versions, compiled per function (the build has no -march) and
 * picked at run time like the matmul kernels. */
__attribute__((target("avx2,fma"))) static float dotf_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s0 = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float s = _mm_cvtss_f32(h);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

__attribute__((target("avx2,fma"))) static void axpyf_avx2(float *restrict y, float w, const float *restrict x,
                                                            int64_t n) {
    __m256 vw = _mm256_set1_ps(w);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vw, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += w * x[i];
}

__attribute__((target("avx2,fma"))) static void wsumf_avx2(float *o, int64_t o_stride, const float *w, int64_t w_stride,
                                                            const float *const *rows, int64_t np, int64_t h0, int64_t h1,
                                                            int64_t r0, int64_t r1) {
    for (int64_t h = h0; h < h1; h++) {
        float *oh = o + h * o_stride;
        const float *wh = w + h * w_stride;
        int64_t i = r0;
        for (; i + 32 <= r1; i += 32) {
            __m256 a0 = _mm256_loadu_ps(oh + i), a1 = _mm256_loadu_ps(oh + i + 8);
            __m256 a2 = _mm256_loadu_ps(oh + i + 16), a3 = _mm256_loadu_ps(oh + i + 24);
            for (int64_t p = 0; p < np; p++) {
                __m256 vw = _mm256_broadcast_ss(wh + p);
                const float *c = rows[p] + i;
                a0 = _mm256_fmadd_ps(vw, _mm256_loadu_ps(c), a0);
                a1 = _mm256_fmadd_ps(vw, _mm256_loadu_ps(c + 8), a1);
                a2 = _mm256_fmadd_ps(vw, _mm256_loadu_ps(c + 16), a2);
                a3 = _mm256_fmadd_ps(vw, _mm256_loadu_ps(c + 24), a3);
            }
            _mm256_storeu_ps(oh + i, a0);
            _mm256_storeu_ps(oh + i + 8, a1);
            _mm256_storeu_ps(oh + i + 16, a2);
            _mm256_storeu_ps(oh + i + 24, a3);
        }
        for (; i + 8 <= r1; i += 8) {
            __m256 a0 = _mm256_loadu_ps(oh + i);
            for (int64_t p = 0; p < np; p++) a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(wh + p), _mm256_loadu_ps(rows[p] + i), a0);
            _mm256_storeu_ps(oh + i, a0);
        }
        for (; i < r1; i++) {
            float acc = oh[i];
            for (int64_t p = 0; p < np; p++) acc += wh[p] * rows[p][i];
            oh[i] = acc;
        }
    }
}
#endif

static float (*dotf)(const float *, const float *, int64_t) = dotf_generic;
static void (*axpyf)(float *restrict, float, const float *restrict, int64_t) = axpyf_generic;
static void (*wsumf)(float *, int64_t, const float *, int64_t, const float *const *, int64_t, int64_t, int64_t, int64_t,
                     int64_t) = wsumf_generic;

/* Chooses the vector helpers for the ISA the matmul kernels use. */
static void pick_simd(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_isa_get() >= CPU_ISA_AVX2) {
        dotf = dotf_avx2;
        axpyf = axpyf_avx2;
        wsumf = wsumf_avx2;
        return;
    }
#endif
    dotf = dotf_generic;
    axpyf = axpyf_generic;
    wsumf = wsumf_generic;
}

static void attn_task(void *vctx, int64_t task, int thread) {
    attn_job *j = vctx;
    int64_t t = task / j->n_head, h = task % j->n_head;
    int64_t kvh = h / j->group;
    const float *q1 = j->q + (t * j->n_head + h) * j->q_width;
    int64_t len = (int64_t)j->kv->pos[t] + 1;
    float *sc = j->scratch + (int64_t)thread * j->max_len;
    float mx = -INFINITY;
    for (int64_t p = 0; p < len; p++) {
        int64_t slot = kv_slot(j->kv, j->kv->seq[t], p);
        const float *k = j->k_cache + slot * j->k_stride + kvh * j->k_off_per_kvh;
        float s = dotf(q1, k, j->dk) * j->scale;
        sc[p] = s;
        if (s > mx) mx = s;
    }
    double sum = 0;
    for (int64_t p = 0; p < len; p++) {
        sc[p] = expf(sc[p] - mx);
        sum += sc[p];
    }
    float inv = (float)(1.0 / sum);
    float *o = j->out + (t * j->n_head + h) * j->dv;
    for (int64_t i = 0; i < j->dv; i++) o[i] = 0;
    for (int64_t p = 0; p < len; p++) {
        int64_t slot = kv_slot(j->kv, j->kv->seq[t], p);
        const float *v = j->v_cache + slot * j->v_stride + kvh * j->v_off_per_kvh;
        axpyf(o, sc[p] * inv, v, j->dv);
    }
}

static int run_attn(cpu_ctx *c, attn_job *j) {
    int64_t max_len = 1;
    for (int64_t t = 0; t < j->kv->n_tok; t++)
        if ((int64_t)j->kv->pos[t] + 1 > max_len) max_len = (int64_t)j->kv->pos[t] + 1;
    j->max_len = max_len;
    j->scratch = cpu_pool_scratch(c->pool, CPU_SCRATCH_ATTN, (size_t)cpu_pool_size(c->pool) * (size_t)max_len * sizeof(float));
    if (!j->scratch) return MOE_ENOMEM;
    cpu_pool_run(c->pool, attn_task, j, j->kv->n_tok * j->n_head);
    return MOE_OK;
}

static int cpu_attention(void *vctx, const moe_kv_view *kv, const float *q, const float *k_cache, const float *v_cache,
                         int64_t n_head, int64_t n_kv_head, int64_t head_dim, float scale, float *out) {
    int rc = check_kv(kv);
    if (rc) return rc;
    if (!q || !k_cache || !v_cache || !out || n_head <= 0 || n_kv_head <= 0 || n_head % n_kv_head || head_dim <= 0)
        return MOE_EINVAL;
    if (kv->n_tok == 0) return MOE_OK;
    attn_job j = {
        .kv = kv, .q = q, .q_width = head_dim, .k_cache = k_cache, .k_stride = n_kv_head * head_dim,
        .k_off_per_kvh = head_dim, .v_cache = v_cache, .v_stride = n_kv_head * head_dim, .v_off_per_kvh = head_dim,
        .dk = head_dim, .dv = head_dim, .n_head = n_head, .group = n_head / n_kv_head, .scale = scale, .out = out,
    };
    return run_attn(vctx, &j);
}

/* MLA attention over the latent cache. Every head of a token reads the
 * same cached row (latent c and k_pe), so the loops run over positions
 * outside and heads inside, reading each row once for all heads (128 on
 * V3), not once per head.
 *
 * The softmax is two-pass (all scores, then max, exponentials, sum and
 * weights, then the weighted sum of the rows), and every sum runs over
 * positions in order: score s[h][p] is one dot product, the sum of
 * exponentials and each output element o[h][i] = sum_p w[h][p] c_p[i] are
 * sequential over p. So a token's bits are a function of its own query and
 * cache rows only: the same in decode or in a prefill chunk, beside any
 * other sequences and on any thread count (issue 20). The earlier online
 * softmax over position chunks, whose count followed the step's size
 * (flash-decoding), gave different bits per step shape.
 *
 * The work is spread without touching that order: scores by (token,
 * position block, head group), the softmax by (token, head) (both by
 * (token, head group) in one dispatch when the rows are short), the weighted
 * sums by (token, column slice, head group; slices start at multiples of
 * MLA_SLICE, see wsumf). With many tokens one task per token does all
 * three passes itself over all columns at once. */
#define MLA_SLICE 64 /* output columns per weighted-sum task (a multiple of 8: wsumf) */
#define MLA_PBLK 64  /* positions per score task */

typedef struct mla_job {
    const moe_kv_view *kv;
    const float *q;     /* (n_tok, H, dq): q_pe at offset nope of each head */
    const float *q_lat; /* (n_tok, H, R) absorbed q_nope */
    int64_t H, R, n_rot, dq, nope;
    float scale;
    const float *cache; /* slots of R + n_rot */
    float *o_lat;       /* (n_tok, H, R) result */
    /* spread schedule */
    const int64_t *soff; /* (n_tok) offsets into s */
    float *s;            /* scores, then weights; token t's (H, pos[t] + 1) at soff[t] */
    const int32_t *task; /* (n_task, 5): token, range start, range end, first head, end head */
    /* token schedule: per thread H * max_len scores */
    float *scratch;
    int64_t max_len; /* the longest token's length rounded up to MLA_PBLK */
} mla_job;

static int64_t mla_len(const mla_job *j, int64_t t) { return (int64_t)j->kv->pos[t] + 1; }

/* s[h * len + p] for heads [h0, h1), positions [p0, p1) of token t. */
static void mla_scores(const mla_job *j, int64_t t, int64_t p0, int64_t p1, int64_t h0, int64_t h1, float *s) {
    int64_t H = j->H, R = j->R, W = R + j->n_rot, len = mla_len(j, t);
    for (int64_t p = p0; p < p1; p++) {
        const float *c = j->cache + kv_slot(j->kv, j->kv->seq[t], p) * W;
        for (int64_t h = h0; h < h1; h++) {
            const float *ql = j->q_lat + (t * H + h) * R;
            const float *qp = j->q + (t * H + h) * j->dq + j->nope;
            s[h * len + p] = (dotf(ql, c, R) + dotf(qp, c + R, j->n_rot)) * j->scale;
        }
    }
}

/* One head's scores of a token (len of them) become its softmax weights
 * in place: exp(s - max) summed in position order, then scaled by 1/sum. */
static void mla_softmax(float *s, int64_t len) {
    float mx = -INFINITY;
    for (int64_t p = 0; p < len; p++) mx = s[p] > mx ? s[p] : mx;
    double sum = 0;
    for (int64_t p = 0; p < len; p++) {
        s[p] = expf(s[p] - mx);
        sum += s[p];
    }
    float inv = (float)(1.0 / sum);
    for (int64_t p = 0; p < len; p++) s[p] *= inv;
}

/* o[h][r0, r1) = sum_p w[h][p] c_p[r0, r1) for heads [h0, h1) of token t,
 * p in order (r0 a multiple of 8: wsumf); o is the token's (H, R) output.
 * Rows go by in blocks of MLA_PBLK, which stay in cache while every head
 * of the range passes over them. */
static void mla_wsum(const mla_job *j, int64_t t, int64_t r0, int64_t r1, int64_t h0, int64_t h1, const float *w,
                     float *o) {
    int64_t R = j->R, W = R + j->n_rot, len = mla_len(j, t);
    const float *rows[MLA_PBLK];
    for (int64_t h = h0; h < h1; h++) memset(o + h * R + r0, 0, (size_t)(r1 - r0) * sizeof(float));
    for (int64_t p0 = 0; p0 < len; p0 += MLA_PBLK) {
        int64_t np = p0 + MLA_PBLK < len ? MLA_PBLK : len - p0;
        for (int64_t p = 0; p < np; p++) rows[p] = j->cache + kv_slot(j->kv, j->kv->seq[t], p0 + p) * W;
        wsumf(o, R, w + p0, len, rows, np, h0, h1, r0, r1);
    }
}

/* Token schedule: all three passes of one token. */
static void mla_token_task(void *vctx, int64_t t, int thread) {
    const mla_job *j = vctx;
    int64_t H = j->H, R = j->R, len = mla_len(j, t);
    float *s = j->scratch + (size_t)thread * (size_t)(H * j->max_len);
    mla_scores(j, t, 0, len, 0, H, s);
    for (int64_t h = 0; h < H; h++) mla_softmax(s + h * len, len);
    mla_wsum(j, t, 0, R, 0, H, s, j->o_lat + t * H * R);
}

static void mla_scores_task(void *vctx, int64_t k, int thread) {
    (void)thread;
    const mla_job *j = vctx;
    const int32_t *tk = j->task + 5 * k;
    mla_scores(j, tk[0], tk[1], tk[2], tk[3], tk[4], j->s + j->soff[tk[0]]);
}

/* Scores of every position for a head group, then those heads' softmax:
 * the first two passes in one dispatch, when re-reading the rows once per
 * group is cheap (short contexts). */
static void mla_scores_softmax_task(void *vctx, int64_t k, int thread) {
    (void)thread;
    const mla_job *j = vctx;
    const int32_t *tk = j->task + 5 * k;
    int64_t t = tk[0], len = mla_len(j, t);
    float *s = j->s + j->soff[t];
    mla_scores(j, t, 0, len, tk[3], tk[4], s);
    for (int64_t h = tk[3]; h < tk[4]; h++) mla_softmax(s + h * len, len);
}

static void mla_softmax_task(void *vctx, int64_t k, int thread) {
    (void)thread;
    const mla_job *j = vctx;
    int64_t t = k / j->H, h = k % j->H, len = mla_len(j, t);
    mla_softmax(j->s + j->soff[t] + h * len, len);
}

static void mla_wsum_task(void *vctx, int64_t k, int thread) {
    (void)thread;
    const mla_job *j = vctx;
    const int32_t *tk = j->task + 5 * k;
    int64_t t = tk[0];
    mla_wsum(j, t, tk[1], tk[2], tk[3], tk[4], j->s + j->soff[t], j->o_lat + t * j->H * j->R);
}

/* Fills the task list: for each token, its range [0, n(t)) cut into
 * blocks of blk, each block's heads cut into n_hg groups. Returns the count. */
static int64_t mla_tasks(const mla_job *j, int32_t *task, bool positions, int64_t blk, int64_t n_hg) {
    int64_t n = 0, H = j->H;
    for (int64_t t = 0; t < j->kv->n_tok; t++) {
        int64_t end = positions ? mla_len(j, t) : j->R;
        for (int64_t a = 0; a < end; a += blk)
            for (int64_t g = 0; g < n_hg; g++, n++) {
                int32_t *tk = task + 5 * n;
                tk[0] = (int32_t)t;
                tk[1] = (int32_t)a;
                tk[2] = (int32_t)(a + blk < end ? a + blk : end);
                tk[3] = (int32_t)(H * g / n_hg);
                tk[4] = (int32_t)(H * (g + 1) / n_hg);
            }
    }
    return n;
}

/* Cache rows (all tokens of the step) up to which the spread schedule
 * reads them once per head group to fuse scores and softmax. */
#define MLA_FUSED_MAX_ROW_BYTES ((int64_t)512 << 10)

/* Scores and weights the spread schedule may hold at once. */
#define MLA_SPREAD_MAX_BYTES ((size_t)256 << 20)

/* o_lat (n_tok, H, R) = softmax-weighted latent sums, per head. */
static int mla_latent_attention(cpu_ctx *c, mla_job *j, float *o_lat) {
    const moe_kv_view *kv = j->kv;
    int64_t n_tok = kv->n_tok, H = j->H, R = j->R, n_thr = cpu_pool_size(c->pool), want = 4 * n_thr;
    /* the score room of a token is its length rounded up to MLA_PBLK, so a
     * decode step needs more scratch only every MLA_PBLK positions (and
     * the pool's margin absorbs most of those) */
    int64_t n_s = 0, max_len = 1, n_pblk = 0, n_rs = (R + MLA_SLICE - 1) / MLA_SLICE;
    for (int64_t t = 0; t < n_tok; t++) {
        int64_t len = (int64_t)kv->pos[t] + 1, nb = (len + MLA_PBLK - 1) / MLA_PBLK;
        n_s += H * nb * MLA_PBLK;
        n_pblk += nb;
        max_len = nb * MLA_PBLK > max_len ? nb * MLA_PBLK : max_len;
    }
    j->o_lat = o_lat;
    j->max_len = max_len;
    size_t b_s = al64((size_t)n_s * sizeof(float));
    /* the tokens alone keep every thread busy, or the scores would not fit:
     * a task per token (the results are the same either way) */
    if (n_tok >= want || b_s > MLA_SPREAD_MAX_BYTES) {
        j->scratch = cpu_pool_scratch(c->pool, CPU_SCRATCH_MLA_LATENT,
                                      (size_t)n_thr * (size_t)(H * max_len) * sizeof(float));
        if (!j->scratch) return MOE_ENOMEM;
        cpu_pool_run(c->pool, mla_token_task, j, n_tok);
        return MOE_OK;
    }
    /* Rows short enough to read once per head group from cache: scores and
     * softmax by (token, head group) in one dispatch, which matters at
     * small sizes where the dispatches cost more than the work. Else
     * scores by position block, then the softmax. Head groups so that each
     * pass has about `want` tasks. */
    int64_t rows_bytes = 0;
    for (int64_t t = 0; t < n_tok; t++) rows_bytes += ((int64_t)kv->pos[t] + 1) * (R + j->n_rot) * (int64_t)sizeof(float);
    bool fused = rows_bytes <= MLA_FUSED_MAX_ROW_BYTES;
    int64_t hg_s = fused ? (want + n_tok - 1) / n_tok : (want + n_pblk - 1) / n_pblk;
    int64_t hg_w = (want + n_tok * n_rs - 1) / (n_tok * n_rs);
    hg_s = hg_s > H ? H : hg_s;
    hg_w = hg_w > H ? H : hg_w;
    int64_t n_task_max = (n_pblk * hg_s > n_tok * n_rs * hg_w ? n_pblk * hg_s : n_tok * n_rs * hg_w);
    size_t b_soff = al64((size_t)n_tok * sizeof(int64_t)), b_task = al64((size_t)n_task_max * 5 * sizeof(int32_t));
    char *base = cpu_pool_scratch(c->pool, CPU_SCRATCH_MLA_LATENT, b_s + b_soff + b_task);
    if (!base) return MOE_ENOMEM;
    j->s = (float *)(void *)base;
    int64_t *soff = (int64_t *)(void *)(base + b_s);
    int32_t *task = (int32_t *)(void *)(base + b_s + b_soff);
    for (int64_t t = 0, o = 0; t < n_tok; t++) {
        soff[t] = o;
        o += H * (((int64_t)kv->pos[t] + MLA_PBLK) / MLA_PBLK) * MLA_PBLK;
    }
    j->soff = soff;
    j->task = task;
    if (fused) {
        cpu_pool_run(c->pool, mla_scores_softmax_task, j, mla_tasks(j, task, true, INT32_MAX, hg_s));
    } else {
        cpu_pool_run(c->pool, mla_scores_task, j, mla_tasks(j, task, true, MLA_PBLK, hg_s));
        cpu_pool_run(c->pool, mla_softmax_task, j, n_tok * H);
    }
    cpu_pool_run(c->pool, mla_wsum_task, j, mla_tasks(j, task, false, MLA_SLICE, hg_w));
    return MOE_OK;
}

/* Per-head products: y[t][h] (w->n_out) = W_h . x[t][h][0 .. w->n_in), where
 * head h of token t starts at x + (t * n_head + h) * head_stride, n_head =
 * w->n_mat. Packed stacks go through one expert-batched call (heads as
 * experts: one pool dispatch, each head's matrix read once); strided views
 * fall back to one call per head. */
static int heads_matmul(cpu_ctx *c, const moe_weight *w, const float *x, int64_t head_stride, int64_t n_tok, float *y) {
    int64_t H = w->n_mat, n_in = w->n_in, n_out = w->n_out, n = H * n_tok;
    size_t b_xg = al64((size_t)n * (size_t)n_in * sizeof(float)), b_yg = al64((size_t)n * (size_t)n_out * sizeof(float));
    char *base = cpu_pool_scratch(c->pool, CPU_SCRATCH_HEADS, b_xg + b_yg + (size_t)(H + 1) * sizeof(int64_t));
    int rc = base ? MOE_OK : MOE_ENOMEM;
    float *xg = (float *)(void *)base, *yg = (float *)(void *)(base + b_xg);
    int64_t *off = (int64_t *)(void *)(base + b_xg + b_yg);
    /* head-major order: rows [h * n_tok, (h + 1) * n_tok) belong to head h */
    for (int64_t h = 0; h < H && !rc; h++)
        for (int64_t t = 0; t < n_tok; t++)
            memcpy(xg + (h * n_tok + t) * n_in, x + (t * H + h) * head_stride, (size_t)n_in * sizeof(float));
    if (!rc && mat_stride(w) == (size_t)n_out * moe_row_size(w->type, n_in)) {
        for (int64_t h = 0; h <= H; h++) off[h] = h * n_tok;
        rc = cpu_matmul_experts(c->pool, w->type, w->data, n_in, n_out, H, xg, n, off, NULL, yg);
    } else {
        for (int64_t h = 0; h < H && !rc; h++)
            rc = cpu_matmul(c->pool, w->type, (const char *)w->data + (size_t)h * mat_stride(w), n_in, n_out,
                            xg + h * n_tok * n_in, n_tok, yg + h * n_tok * n_out);
    }
    for (int64_t h = 0; h < H && !rc; h++)
        for (int64_t t = 0; t < n_tok; t++)
            memcpy(y + (t * H + h) * n_out, yg + (h * n_tok + t) * n_out, (size_t)n_out * sizeof(float));
    return rc;
}

static int cpu_mla_attention(void *vctx, const moe_kv_view *kv, const float *q, const float *cache, int64_t kv_lora,
                             int64_t n_rot, int64_t nope, const moe_weight *k_b, const moe_weight *v_b, float scale,
                             float *out) {
    cpu_ctx *c = vctx;
    int rc = check_kv(kv);
    if (rc) return rc;
    if (!q || !cache || !out || !k_b || !v_b || kv_lora <= 0 || n_rot < 0 || nope <= 0) return MOE_EINVAL;
    int64_t n_head = k_b->n_mat, n_tok = kv->n_tok, dq = nope + n_rot;
    if (k_b->n_in != nope || k_b->n_out != kv_lora || v_b->n_mat != n_head || v_b->n_in != kv_lora) return MOE_EINVAL;
    if (n_tok == 0) return MOE_OK;
    /* Absorb k_b into the queries: q_nope . (c . k_b[h]) = c . (k_b[h] q_nope),
     * so attention runs over the cached latent and k/v are never expanded. */
    size_t b_lat = al64((size_t)n_tok * (size_t)n_head * (size_t)kv_lora * sizeof(float));
    char *base = cpu_pool_scratch(c->pool, CPU_SCRATCH_MLA, 2 * b_lat);
    rc = base ? MOE_OK : MOE_ENOMEM;
    float *q_lat = (float *)(void *)base, *o_lat = (float *)(void *)(base + b_lat);
    if (!rc) rc = heads_matmul(c, k_b, q, dq, n_tok, q_lat);
    if (!rc) {
        mla_job j = {.kv = kv, .q = q, .q_lat = q_lat, .H = n_head, .R = kv_lora, .n_rot = n_rot, .dq = dq,
                     .nope = nope, .scale = scale, .cache = cache};
        rc = mla_latent_attention(c, &j, o_lat);
    }
    if (!rc) rc = heads_matmul(c, v_b, o_lat, kv_lora, n_tok, out);
    return rc;
}

/* Routing for one token: ids/w (n_used), ordered by decreasing choice score.
 * Exposed to tests through the moe op's ids_out/w_out. Non-finite input
 * never leaves the expert range: a NaN choice (or group score) ranks as
 * -inf, ties go to the lowest id, and the experts of dropped groups and
 * those already taken are excluded by marking them NaN (never a candidate),
 * so there are always n_used candidates (n_group_used * E / n_group >=
 * n_used is checked by the caller). A NaN weight is passed on: the step's
 * logits then turn non-finite and the engine fails that sequence. */
static int route_token(const float *logits, const moe_route_params *rp, double *s, double *choice, int32_t *ids,
                       float *w) {
    int64_t E = rp->n_expert;
    if (rp->gating == MOE_GATING_SIGMOID) {
        for (int64_t e = 0; e < E; e++) s[e] = 1.0 / (1.0 + exp(-(double)logits[e]));
    } else {
        double mx = -INFINITY, sum = 0;
        for (int64_t e = 0; e < E; e++) mx = logits[e] > mx ? logits[e] : mx;
        for (int64_t e = 0; e < E; e++) sum += (s[e] = exp((double)logits[e] - mx));
        for (int64_t e = 0; e < E; e++) s[e] /= sum;
    }
    for (int64_t e = 0; e < E; e++) {
        choice[e] = s[e] + (rp->bias ? rp->bias[e] : 0.0);
        if (isnan(choice[e])) choice[e] = -INFINITY;
    }
    if (rp->n_group > 1 && rp->n_group_used < rp->n_group) {
        int64_t G = rp->n_group, per = E / G;
        double gs[256];
        int keep[256];
        if (G > 256) return MOE_EUNSUPPORTED;
        for (int64_t g = 0; g < G; g++) {
            const double *cg = choice + g * per;
            if (rp->gating == MOE_GATING_SIGMOID) {
                double a = -INFINITY, b = -INFINITY; /* two best */
                for (int64_t i = 0; i < per; i++) {
                    if (cg[i] > a) { b = a; a = cg[i]; } else if (cg[i] > b) b = cg[i];
                }
                gs[g] = per > 1 ? a + b : a;
            } else {
                double a = -INFINITY;
                for (int64_t i = 0; i < per; i++) a = cg[i] > a ? cg[i] : a;
                gs[g] = a;
            }
            if (isnan(gs[g])) gs[g] = -INFINITY; /* +inf + -inf */
            keep[g] = 0;
        }
        for (int64_t k = 0; k < rp->n_group_used; k++) {
            int64_t best = -1;
            for (int64_t g = 0; g < G; g++)
                if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
            keep[best] = 1; /* n_group_used <= G: some group is always left */
        }
        for (int64_t g = 0; g < G; g++)
            if (!keep[g])
                for (int64_t i = 0; i < per; i++) choice[g * per + i] = NAN; /* excluded */
    }
    double wsum = 0;
    for (int64_t k = 0; k < rp->n_used; k++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (!isnan(choice[e]) && (best < 0 || choice[e] > choice[best])) best = e;
        if (best < 0) return MOE_EINVAL; /* fewer candidates than n_used: refused by the caller's checks */
        ids[k] = (int32_t)best;
        w[k] = (float)s[best];
        wsum += s[best];
        choice[best] = NAN; /* taken */
    }
    for (int64_t k = 0; k < rp->n_used; k++) {
        double v = w[k];
        if (rp->norm) v /= wsum + 1e-20;
        w[k] = (float)(v * rp->scale);
    }
    return MOE_OK;
}

static int cpu_moe(void *vctx, const float *h, int64_t n_tok, const float *router_logits, const moe_route_params *rp,
                   const moe_weight *gate, const moe_weight *up, const moe_weight *down, float *out, int32_t *ids_out,
                   float *w_out) {
    cpu_ctx *c = vctx;
    if (!h || !router_logits || !rp || !gate || !up || !down || !out) return MOE_EINVAL;
    int64_t E = rp->n_expert, K = rp->n_used, n_embd = gate->n_in, n_ff = gate->n_out;
    if (E <= 0 || K <= 0 || K > E || gate->n_mat != E || up->n_mat != E || down->n_mat != E || up->n_in != n_embd ||
        up->n_out != n_ff || down->n_in != n_ff || down->n_out != n_embd || (rp->n_group > 1 && E % rp->n_group) ||
        (rp->n_group > 1 && (rp->n_group_used <= 0 || rp->n_group_used > rp->n_group ||
                             rp->n_group_used * (E / rp->n_group) < K)))
        return MOE_EINVAL;
    memset(out, 0, (size_t)n_tok * (size_t)n_embd * sizeof(float));
    if (n_tok == 0) return MOE_OK;
    int64_t n_ent = n_tok * K;
    /* one scratch block, carved: (token, k) routing, per-expert offsets and
     * fill cursors, the grouped rows and the expert activations */
    const size_t sz[] = {
        al64((size_t)n_ent * sizeof(int32_t)),             /* ids */
        al64((size_t)n_ent * sizeof(float)),               /* wts */
        al64((size_t)E * 2 * sizeof(double)),              /* s: scores and choices */
        al64(((size_t)E + 1) * sizeof(int64_t)),           /* off */
        al64((size_t)E * sizeof(int64_t)),                 /* fill */
        al64((size_t)n_ent * sizeof(int32_t)),             /* rows */
        al64((size_t)n_ent * sizeof(int64_t)),             /* ent_of: (token, k) -> routing-order entry */
        al64((size_t)n_ent * (size_t)n_ff * sizeof(float)), /* g */
        al64((size_t)n_ent * (size_t)n_ff * sizeof(float)), /* u */
        al64((size_t)n_ent * (size_t)n_embd * sizeof(float)), /* d */
    };
    size_t at[sizeof sz / sizeof sz[0] + 1] = {0};
    for (size_t i = 0; i < sizeof sz / sizeof sz[0]; i++) at[i + 1] = at[i] + sz[i];
    char *base = cpu_pool_scratch(c->pool, CPU_SCRATCH_MOE, at[sizeof sz / sizeof sz[0]]);
    if (!base) return MOE_ENOMEM;
    int32_t *ids = (int32_t *)(void *)(base + at[0]);
    float *wts = (float *)(void *)(base + at[1]);
    double *s = (double *)(void *)(base + at[2]);
    int64_t *off = (int64_t *)(void *)(base + at[3]), *fill = (int64_t *)(void *)(base + at[4]);
    int32_t *rows = (int32_t *)(void *)(base + at[5]);
    int64_t *ent_of = (int64_t *)(void *)(base + at[6]);
    float *g = (float *)(void *)(base + at[7]), *u = (float *)(void *)(base + at[8]);
    float *d = (float *)(void *)(base + at[9]);
    memset(off, 0, ((size_t)E + 1) * sizeof(int64_t));
    int rc = MOE_OK;
    for (int64_t t = 0; t < n_tok && !rc; t++)
        rc = route_token(router_logits + t * E, rp, s, s + E, ids + t * K, wts + t * K);
    if (!rc) {
        /* group the (token, expert) pairs by expert so each expert's weights are read once */
        for (int64_t i = 0; i < n_ent; i++) off[ids[i] + 1]++;
        for (int64_t e = 0; e < E; e++) off[e + 1] += off[e];
        memcpy(fill, off, (size_t)E * sizeof(int64_t));
        for (int64_t i = 0; i < n_ent; i++) {
            int64_t k = fill[ids[i]]++;
            rows[k] = (int32_t)(i / K);
            ent_of[i] = k;
        }
    }
    if (!rc && gate->type == up->type && mat_stride(gate) == mat_stride(up) &&
        mat_stride(gate) == (size_t)n_ff * moe_row_size(gate->type, n_embd)) {
        /* gate and up in one pass: one quantization of h, one dispatch */
        rc = cpu_matmul_experts2(c->pool, gate->type, gate->data, up->data, n_embd, n_ff, E, h, n_tok, off, rows, g, u);
    } else {
        if (!rc) rc = cpu_matmul_experts(c->pool, gate->type, gate->data, n_embd, n_ff, E, h, n_tok, off, rows, g);
        if (!rc) rc = cpu_matmul_experts(c->pool, up->type, up->data, n_embd, n_ff, E, h, n_tok, off, rows, u);
    }
    if (!rc) {
        for (int64_t i = 0; i < n_ent * n_ff; i++) g[i] = silu(g[i]) * u[i];
        rc = cpu_matmul_experts(c->pool, down->type, down->data, n_ff, n_embd, E, g, n_ent, off, NULL, d);
    }
    if (!rc) {
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t k = 0; k < K; k++) {
                const float *dr = d + ent_of[t * K + k] * n_embd;
                float w = wts[t * K + k];
                for (int64_t i = 0; i < n_embd; i++) out[t * n_embd + i] += w * dr[i];
            }
        if (ids_out) memcpy(ids_out, ids, (size_t)n_ent * sizeof(int32_t));
        if (w_out) memcpy(w_out, wts, (size_t)n_ent * sizeof(float));
    }
    return rc;
}

/* The CPU kernels compute with every type the quantizer decodes. */
static int cpu_supports_type(void *ctx, int type) {
    (void)ctx;
    return moe_quant_supported(type);
}

static const struct moe_backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .supports_type = cpu_supports_type,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .bind_weight = cpu_bind_weight,
    .unbind_weight = cpu_unbind_weight,
    .embed = cpu_embed,
    .get_rows = cpu_get_rows,
    .rms_norm = cpu_rms_norm,
    .matmul = cpu_matmul_op,
    .add = cpu_add,
    .mul = cpu_mul,
    .swiglu = cpu_swiglu,
    .sigmoid_scale = cpu_sigmoid_scale,
    .rope = cpu_rope,
    .kv_store = cpu_kv_store,
    .attention = cpu_attention,
    .mla_attention = cpu_mla_attention,
    .moe = cpu_moe,
};

int moe_cpu_backend_init(moe_backend *be, const moe_cpu_backend_opts *opts) {
    if (!be) return MOE_EINVAL;
    be->ops = NULL;
    be->ctx = NULL;
    cpu_ctx *c = calloc(1, sizeof(*c));
    if (!c) return MOE_ENOMEM;
    int st = MOE_OK;
    c->pool = cpu_pool_create(opts ? opts->n_threads : 0, &st);
    if (!c->pool) {
        free(c);
        return st ? st : MOE_ENOMEM;
    }
    c->n_threads = cpu_pool_size(c->pool);
    pick_simd();
    be->ops = &cpu_ops;
    be->ctx = c;
    return MOE_OK;
}
