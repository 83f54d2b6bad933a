/* cpu_matmul.c - driver, activation quantization and the portable scalar
 * kernels of cpu_matmul.h. SIMD kernels live in cpu_dot_avx2.c and
 * cpu_dot_avx512.c; they are compiled with function-level target
 * attributes and only called after a run-time CPU check.
 */
#include "cpu_matmul.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_dot.h"
#include "quant.h"
#include "status.h"

/* ---- scalar kernels ---- */

/* Four interleaved f32 accumulators: the same summation order is used by
 * the F16/BF16 kernels below, so widening a row first gives identical
 * results (cpu_dot.h contract). */
#define SCALAR_F_DOT(NAME, T, LOAD)                                                                \
    static void NAME(int64_t n, const void *wv, const void *xv, float *out) {                      \
        const T *w = wv;                                                                           \
        const float *x = xv;                                                                       \
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0;                                                      \
        int64_t i = 0;                                                                             \
        for (; i + 4 <= n; i += 4) {                                                               \
            a0 += LOAD(w[i]) * x[i];                                                               \
            a1 += LOAD(w[i + 1]) * x[i + 1];                                                       \
            a2 += LOAD(w[i + 2]) * x[i + 2];                                                       \
            a3 += LOAD(w[i + 3]) * x[i + 3];                                                       \
        }                                                                                          \
        for (; i < n; i++)                                                                         \
            a0 += LOAD(w[i]) * x[i];                                                               \
        *out = (a0 + a1) + (a2 + a3);                                                              \
    }

#define LOAD_F32(v) (v)
SCALAR_F_DOT(dot_f32_scalar, float, LOAD_F32)
SCALAR_F_DOT(dot_f16_scalar, moe_f16, moe_f16_to_f32)
SCALAR_F_DOT(dot_bf16_scalar, moe_bf16, moe_bf16_to_f32)

static void cvt_f16_scalar(int64_t n, const void *w, float *out) { moe_dequantize_row(MOE_TYPE_F16, w, out, n); }
static void cvt_bf16_scalar(int64_t n, const void *w, float *out) { moe_dequantize_row(MOE_TYPE_BF16, w, out, n); }

static void dot_q8_0_scalar(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q8_0 *w = wv;
    const cpu__q8blk *x = xv;
    float acc = 0;
    for (int64_t b = 0; b < n / 32; b++) {
        int32_t s = 0;
        for (int j = 0; j < 32; j++)
            s += (int32_t)w[b].qs[j] * x[b].qs[j];
        acc += moe_f16_to_f32(w[b].d) * x[b].d * (float)s;
    }
    *out = acc;
}

static void dot_q4_0_scalar(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q4_0 *w = wv;
    const cpu__q8blk *x = xv;
    float acc = 0;
    for (int64_t b = 0; b < n / 32; b++) {
        int32_t s = 0;
        for (int j = 0; j < 16; j++) {
            s += ((w[b].qs[j] & 0xF) - 8) * x[b].qs[j];
            s += ((w[b].qs[j] >> 4) - 8) * x[b].qs[j + 16];
        }
        acc += moe_f16_to_f32(w[b].d) * x[b].d * (float)s;
    }
    *out = acc;
}

static void dot_q4_1_scalar(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q4_1 *w = wv;
    const cpu__q8blk *x = xv;
    float acc = 0;
    for (int64_t b = 0; b < n / 32; b++) {
        int32_t s = 0;
        for (int j = 0; j < 16; j++) {
            s += (w[b].qs[j] & 0xF) * x[b].qs[j];
            s += (w[b].qs[j] >> 4) * x[b].qs[j + 16];
        }
        acc += moe_f16_to_f32(w[b].d) * x[b].d * (float)s + moe_f16_to_f32(w[b].m) * x[b].s;
    }
    *out = acc;
}

static int q5_value(const uint8_t *qs, uint32_t qh, int j) {
    int lo = j < 16 ? (qs[j] & 0xF) : (qs[j - 16] >> 4);
    return lo | (int)(((qh >> j) & 1u) << 4);
}

static void dot_q5_0_scalar(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q5_0 *w = wv;
    const cpu__q8blk *x = xv;
    float acc = 0;
    for (int64_t b = 0; b < n / 32; b++) {
        uint32_t qh;
        memcpy(&qh, w[b].qh, 4);
        int32_t s = 0;
        for (int j = 0; j < 32; j++)
            s += (q5_value(w[b].qs, qh, j) - 16) * x[b].qs[j];
        acc += moe_f16_to_f32(w[b].d) * x[b].d * (float)s;
    }
    *out = acc;
}

static void dot_q5_1_scalar(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q5_1 *w = wv;
    const cpu__q8blk *x = xv;
    float acc = 0;
    for (int64_t b = 0; b < n / 32; b++) {
        uint32_t qh;
        memcpy(&qh, w[b].qh, 4);
        int32_t s = 0;
        for (int j = 0; j < 32; j++)
            s += q5_value(w[b].qs, qh, j) * x[b].qs[j];
        acc += moe_f16_to_f32(w[b].d) * x[b].d * (float)s + moe_f16_to_f32(w[b].m) * x[b].s;
    }
    *out = acc;
}

static void k4_scales(const uint8_t q[12], uint8_t sc[8], uint8_t m[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = q[j] & 63;
        m[j] = q[j + 4] & 63;
        sc[j + 4] = (uint8_t)((q[j + 8] & 0xF) | ((q[j] >> 6) << 4));
        m[j + 4] = (uint8_t)((q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4));
    }
}

/* Q4_K/Q5_K: x = d*sc*q - dmin*m, so the dot is
 * d*xd*sum_j sc_j*sum(q*xq) - dmin*xd*sum_j m_j*sum(xq); the second sum
 * comes from Q8_K's bsums. */
static void dot_q4_K_scalar(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q4_K *w = wv;
    const cpu__q8k *x = xv;
    float acc = 0;
    for (int64_t b = 0; b < n / 256; b++) {
        uint8_t sc[8], m[8];
        k4_scales(w[b].scales, sc, m);
        int32_t sumi = 0, summ = 0;
        for (int j = 0; j < 8; j++)
            summ += m[j] * (x[b].bsums[2 * j] + x[b].bsums[2 * j + 1]);
        for (int c = 0; c < 4; c++) {
            int32_t s0 = 0, s1 = 0;
            for (int l = 0; l < 32; l++) {
                s0 += (w[b].qs[32 * c + l] & 0xF) * x[b].qs[64 * c + l];
                s1 += (w[b].qs[32 * c + l] >> 4) * x[b].qs[64 * c + 32 + l];
            }
            sumi += sc[2 * c] * s0 + sc[2 * c + 1] * s1;
        }
        acc += moe_f16_to_f32(w[b].d) * x[b].d * (float)sumi - moe_f16_to_f32(w[b].dmin) * x[b].d * (float)summ;
    }
    *out = acc;
}

static void dot_q5_K_scalar(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q5_K *w = wv;
    const cpu__q8k *x = xv;
    float acc = 0;
    for (int64_t b = 0; b < n / 256; b++) {
        uint8_t sc[8], m[8];
        k4_scales(w[b].scales, sc, m);
        int32_t sumi = 0, summ = 0;
        for (int j = 0; j < 8; j++)
            summ += m[j] * (x[b].bsums[2 * j] + x[b].bsums[2 * j + 1]);
        for (int c = 0; c < 4; c++) {
            int32_t s0 = 0, s1 = 0;
            for (int l = 0; l < 32; l++) {
                int q0 = (w[b].qs[32 * c + l] & 0xF) | (((w[b].qh[l] >> (2 * c)) & 1) << 4);
                int q1 = (w[b].qs[32 * c + l] >> 4) | (((w[b].qh[l] >> (2 * c + 1)) & 1) << 4);
                s0 += q0 * x[b].qs[64 * c + l];
                s1 += q1 * x[b].qs[64 * c + 32 + l];
            }
            sumi += sc[2 * c] * s0 + sc[2 * c + 1] * s1;
        }
        acc += moe_f16_to_f32(w[b].d) * x[b].d * (float)sumi - moe_f16_to_f32(w[b].dmin) * x[b].d * (float)summ;
    }
    *out = acc;
}

static void dot_q6_K_scalar(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q6_K *w = wv;
    const cpu__q8k *x = xv;
    float acc = 0;
    for (int64_t b = 0; b < n / 256; b++) {
        int8_t q[256];
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = w[b].ql + 64 * h, *qh = w[b].qh + 32 * h;
            int8_t *o = q + 128 * h;
            for (int l = 0; l < 32; l++) {
                o[l] = (int8_t)(((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
                o[l + 32] = (int8_t)(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
                o[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                o[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
            }
        }
        int32_t sumi = 0;
        for (int j = 0; j < 16; j++) {
            int32_t s = 0;
            for (int l = 0; l < 16; l++)
                s += q[16 * j + l] * x[b].qs[16 * j + l];
            sumi += w[b].scales[j] * s;
        }
        acc += moe_f16_to_f32(w[b].d) * x[b].d * (float)sumi;
    }
    *out = acc;
}

/* Symmetric int8 with scale amax/127, rounded half-to-even (the magic
 * constant 1.5*2^23 does that for |v| <= 2^22 in the default rounding
 * mode, without a libm call); levels stay in [-127, 127] as the SIMD sign
 * trick requires. The AVX2 version produces the same bytes. */
static float quantize_i8(const float *x, int n, int8_t *q) {
    float amax = 0;
    for (int j = 0; j < n; j++)
        amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    float d = amax / 127.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < n; j++) {
        float v = (x[j] * id + 12582912.0f) - 12582912.0f; /* not folded without -ffast-math */
        q[j] = (int8_t)(v > 127.0f ? 127 : (v < -127.0f ? -127 : v));
    }
    return d;
}

static void act_q8_scalar(const float *x, int64_t n, cpu__q8blk *b) {
    for (int64_t i = 0; i < n / 32; i++) {
        b[i].d = quantize_i8(x + 32 * i, 32, b[i].qs);
        int32_t s = 0;
        for (int j = 0; j < 32; j++)
            s += b[i].qs[j];
        b[i].s = b[i].d * (float)s;
    }
}

static void act_q8k_scalar(const float *x, int64_t n, cpu__q8k *b) {
    for (int64_t i = 0; i < n / 256; i++) {
        b[i].d = quantize_i8(x + 256 * i, 256, b[i].qs);
        for (int j = 0; j < 16; j++) {
            int s = 0;
            for (int l = 0; l < 16; l++)
                s += b[i].qs[16 * j + l];
            b[i].bsums[j] = (int16_t)s;
        }
    }
}

void cpu__kernels_scalar(cpu__kernels *k) {
    memset(k, 0, sizeof *k);
    k->dot[MOE_TYPE_F32] = dot_f32_scalar;
    k->dot[MOE_TYPE_F16] = dot_f16_scalar;
    k->dot[MOE_TYPE_BF16] = dot_bf16_scalar;
    k->cvt[MOE_TYPE_F16] = cvt_f16_scalar;
    k->cvt[MOE_TYPE_BF16] = cvt_bf16_scalar;
    k->dot[MOE_TYPE_Q8_0] = dot_q8_0_scalar;
    k->dot[MOE_TYPE_Q4_0] = dot_q4_0_scalar;
    k->dot[MOE_TYPE_Q4_1] = dot_q4_1_scalar;
    k->dot[MOE_TYPE_Q5_0] = dot_q5_0_scalar;
    k->dot[MOE_TYPE_Q5_1] = dot_q5_1_scalar;
    k->dot[MOE_TYPE_Q4_K] = dot_q4_K_scalar;
    k->dot[MOE_TYPE_Q5_K] = dot_q5_K_scalar;
    k->dot[MOE_TYPE_Q6_K] = dot_q6_K_scalar;
    k->act_q8 = act_q8_scalar;
    k->act_q8k = act_q8k_scalar;
}

/* ---- ISA selection ---- */

static cpu__kernels kernel_tables[3];
static pthread_once_t kernels_once = PTHREAD_ONCE_INIT;
static cpu_isa isa_best_v;
static atomic_int isa_active;

static cpu_isa detect_isa(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        return CPU_ISA_AVX512;
    if (avx2)
        return CPU_ISA_AVX2;
#endif
    return CPU_ISA_SCALAR;
}

static void kernels_init(void) {
    cpu__kernels_scalar(&kernel_tables[CPU_ISA_SCALAR]);
    kernel_tables[CPU_ISA_AVX2] = kernel_tables[CPU_ISA_SCALAR];
    cpu__kernels_avx2(&kernel_tables[CPU_ISA_AVX2]);
    kernel_tables[CPU_ISA_AVX512] = kernel_tables[CPU_ISA_AVX2];
    cpu__kernels_avx512(&kernel_tables[CPU_ISA_AVX512]);
    isa_best_v = detect_isa();
    cpu_isa use = isa_best_v;
    const char *env = getenv("MOE_CPU_ISA");
    if (env) {
        if (strcmp(env, "scalar") == 0)
            use = CPU_ISA_SCALAR;
        else if (strcmp(env, "avx2") == 0 && use > CPU_ISA_AVX2)
            use = CPU_ISA_AVX2;
    }
    atomic_store(&isa_active, (int)use);
}

cpu_isa cpu_isa_best(void) {
    pthread_once(&kernels_once, kernels_init);
    return isa_best_v;
}

cpu_isa cpu_isa_get(void) {
    pthread_once(&kernels_once, kernels_init);
    return (cpu_isa)atomic_load(&isa_active);
}

int cpu_isa_set(cpu_isa isa) {
    pthread_once(&kernels_once, kernels_init);
    if ((int)isa < 0 || isa > isa_best_v)
        return MOE_EUNSUPPORTED;
    atomic_store(&isa_active, (int)isa);
    return MOE_OK;
}

const char *cpu_isa_name(cpu_isa isa) {
    switch (isa) {
    case CPU_ISA_SCALAR: return "scalar";
    case CPU_ISA_AVX2: return "avx2";
    case CPU_ISA_AVX512: return "avx512";
    }
    return "unknown";
}

int cpu_matmul_supported(int type) {
    switch (type) {
    case MOE_TYPE_F32:
    case MOE_TYPE_F16:
    case MOE_TYPE_BF16:
    case MOE_TYPE_Q8_0:
    case MOE_TYPE_Q4_0:
    case MOE_TYPE_Q4_1:
    case MOE_TYPE_Q5_0:
    case MOE_TYPE_Q5_1:
    case MOE_TYPE_Q4_K:
    case MOE_TYPE_Q5_K:
    case MOE_TYPE_Q6_K:
        return 1;
    default:
        return 0;
    }
}

/* ---- activation quantization ---- */

typedef enum { ACT_F32, ACT_Q8, ACT_Q8K } act_kind;

static act_kind act_kind_of(int type) {
    switch (type) {
    case MOE_TYPE_F32:
    case MOE_TYPE_F16:
    case MOE_TYPE_BF16:
        return ACT_F32;
    case MOE_TYPE_Q4_K:
    case MOE_TYPE_Q5_K:
    case MOE_TYPE_Q6_K:
        return ACT_Q8K;
    default:
        return ACT_Q8;
    }
}

/* ---- driver ---- */

#define ROW_TILE 16 /* weight rows kept hot while a token tile passes */
#define TOK_TILE 32 /* activation rows per tile (4096-wide Q8: ~140 KiB) */

typedef struct {
    const cpu__kernels *k;
    bool pf_rows; /* prefetch the next row here (the scalar kernels do not) */
    int type;
    cpu__dot_fn dot;
    cpu__cvt_fn cvt; /* widen a row once when an expert has > 1 token */
    const uint8_t *w, *w2; /* w2/y2: a second matrix stack on the same rows, or NULL */
    size_t row_bytes, expert_bytes;
    int64_t n_in, n_out, n_x;
    const float *x;
    act_kind kind;
    uint8_t *xa; /* quantized activations, n_x rows of xa_stride bytes */
    size_t xa_stride;
    float *y, *y2;
    const int64_t *off;
    const int32_t *x_rows;
    const int32_t *active; /* experts with rows, in order */
    int64_t rows_per_task, tasks_per_expert;
    float *scratch; /* n_threads * n_in */
} mm_job;

static void quant_task(void *ctx, int64_t t, int thread) {
    (void)thread;
    mm_job *j = ctx;
    const float *x = j->x + t * j->n_in;
    void *dst = j->xa + (size_t)t * j->xa_stride;
    if (j->kind == ACT_Q8)
        j->k->act_q8(x, j->n_in, dst);
    else
        j->k->act_q8k(x, j->n_in, dst);
}

static void mm_task(void *ctx, int64_t task, int thread) {
    const mm_job *j = ctx;
    /* with two stacks, an expert's tasks are its row chunks of the first
     * then of the second, so both read the same activations back to back */
    int n_mats = j->w2 ? 2 : 1;
    int64_t per_e = j->tasks_per_expert * n_mats, rem = task % per_e;
    int32_t e = j->active[task / per_e];
    int second = rem >= j->tasks_per_expert;
    const uint8_t *wbase = second ? j->w2 : j->w;
    float *yout = second ? j->y2 : j->y;
    int64_t r0 = (rem % j->tasks_per_expert) * j->rows_per_task;
    int64_t r1 = r0 + j->rows_per_task < j->n_out ? r0 + j->rows_per_task : j->n_out;
    int64_t k0 = j->off[e], k1 = j->off[e + 1];
    const uint8_t *wexp = wbase + (size_t)e * j->expert_bytes;
    int widen = j->cvt && k1 - k0 > 1;
    float *row_f32 = j->scratch ? j->scratch + (size_t)thread * (size_t)j->n_in : NULL;
    cpu__dot_fn dot = widen ? j->k->dot[MOE_TYPE_F32] : j->dot;
    cpu__dot4_fn dot4 = widen ? j->k->dot4[MOE_TYPE_F32] : j->k->dot4[j->type];
    for (int64_t rt = r0; rt < r1; rt += ROW_TILE) {
        int64_t rt1 = rt + ROW_TILE < r1 ? rt + ROW_TILE : r1;
        for (int64_t kt = k0; kt < k1; kt += TOK_TILE) {
            int64_t kt1 = kt + TOK_TILE < k1 ? kt + TOK_TILE : k1;
            for (int64_t r = rt; r < rt1; r++) {
                const void *wr = wexp + (size_t)r * j->row_bytes;
                if (j->pf_rows && kt == k0 && r + 1 < r1) {
                    /* The scalar kernels: one row ahead (~0.2-1 us of work),
                     * enough to hide DRAM latency at their rate. The SIMD
                     * kernels prefetch as they go (CPU_PF_AHEAD). */
                    const char *nx = (const char *)wr + j->row_bytes;
                    for (size_t o = 0; o < j->row_bytes; o += 64)
                        __builtin_prefetch(nx + o, 0, 3);
                }
                if (widen) {
                    j->cvt(j->n_in, wr, row_f32);
                    wr = row_f32;
                }
                int64_t k = kt;
                if (dot4) {
                    for (; k + 4 <= kt1; k += 4) {
                        const void *xs[4];
                        float *ys[4];
                        for (int t = 0; t < 4; t++) {
                            int64_t xr = j->x_rows ? j->x_rows[k + t] : k + t;
                            xs[t] = j->xa + (size_t)xr * j->xa_stride;
                            ys[t] = &yout[(k + t) * j->n_out + r];
                        }
                        dot4(j->n_in, wr, xs, ys);
                    }
                }
                for (; k < kt1; k++) {
                    int64_t xr = j->x_rows ? j->x_rows[k] : k;
                    dot(j->n_in, wr, j->xa + (size_t)xr * j->xa_stride, &yout[k * j->n_out + r]);
                }
            }
        }
    }
}

static int matmul_experts(cpu_pool *pool, int type, const void *w, const void *w2, int64_t n_in, int64_t n_out,
                          int64_t n_expert, const float *x, int64_t n_x, const int64_t *expert_off,
                          const int32_t *x_rows, float *y, float *y2) {
    if (!cpu_matmul_supported(type))
        return MOE_EUNSUPPORTED;
    const moe_type_traits *tr = moe_type_get(type);
    if (!w || !expert_off || n_in <= 0 || n_out <= 0 || n_expert <= 0 || n_x < 0 || n_in % tr->blck)
        return MOE_EINVAL;
    if (expert_off[0] != 0)
        return MOE_EINVAL;
    int64_t n_active = 0;
    for (int64_t e = 0; e < n_expert; e++) {
        if (expert_off[e + 1] < expert_off[e])
            return MOE_EINVAL;
        n_active += expert_off[e + 1] > expert_off[e];
    }
    int64_t n_rows = expert_off[n_expert];
    if (n_rows == 0)
        return MOE_OK;
    if (!x || !y || n_x == 0 || n_expert > INT32_MAX || (w2 && !y2))
        return MOE_EINVAL;
    if (x_rows) {
        for (int64_t k = 0; k < n_rows; k++)
            if (x_rows[k] < 0 || x_rows[k] >= n_x)
                return MOE_EINVAL;
    } else if (n_rows > n_x) {
        return MOE_EINVAL;
    }

    pthread_once(&kernels_once, kernels_init);
    mm_job j;
    memset(&j, 0, sizeof j);
    int isa = atomic_load(&isa_active);
    j.k = &kernel_tables[isa];
    j.pf_rows = isa == CPU_ISA_SCALAR;
    j.type = type;
    j.dot = j.k->dot[type];
    j.cvt = j.k->cvt[type];
    j.w = w;
    j.w2 = w2;
    j.row_bytes = moe_row_size(type, n_in);
    j.expert_bytes = j.row_bytes * (size_t)n_out;
    j.n_in = n_in;
    j.n_out = n_out;
    j.n_x = n_x;
    j.x = x;
    j.kind = act_kind_of(type);
    j.y = y;
    j.y2 = w2 ? y2 : NULL;
    j.off = expert_off;
    j.x_rows = x_rows;
    int n_threads = cpu_pool_size(pool);

    int rc = MOE_ENOMEM;
    if (j.kind == ACT_Q8K && n_in % 256)
        return MOE_EINVAL;
    /* one block for the active list, the per-thread dequantized rows and
     * the quantized activations: the pool's reusable scratch, so a decode
     * step allocates nothing (malloc'd and freed here without a pool) */
    size_t xa_stride = j.kind == ACT_F32   ? (size_t)n_in * sizeof(float)
                       : j.kind == ACT_Q8 ? (size_t)(n_in / 32) * sizeof(cpu__q8blk)
                                          : (size_t)(n_in / 256) * sizeof(cpu__q8k);
    size_t b_active = ((size_t)n_active * sizeof(int32_t) + 63) & ~(size_t)63;
    size_t b_scratch = j.cvt ? (((size_t)n_threads * (size_t)n_in * sizeof(float) + 63) & ~(size_t)63) : 0;
    size_t b_xa = j.kind == ACT_F32 ? 0 : xa_stride * (size_t)n_x;
    uint8_t *owned = NULL;
    uint8_t *base = pool ? cpu_pool_scratch(pool, CPU_SCRATCH_MATMUL, b_active + b_scratch + b_xa)
                         : (owned = malloc(b_active + b_scratch + b_xa));
    if (!base)
        goto out;
    int32_t *active = (int32_t *)(void *)base;
    for (int64_t e = 0, a = 0; e < n_expert; e++)
        if (expert_off[e + 1] > expert_off[e])
            active[a++] = (int32_t)e;
    j.active = active;
    if (j.cvt)
        j.scratch = (float *)(void *)(base + b_active);
    j.xa_stride = xa_stride;
    if (j.kind == ACT_F32) {
        j.xa = (uint8_t *)(uintptr_t)x;
    } else {
        j.xa = base + b_active + b_scratch;
        /* a handful of rows (decode) is quicker to quantize here than to
         * hand out to the pool and wait for */
        if (n_x * n_in <= 16384)
            for (int64_t t = 0; t < n_x; t++)
                quant_task(&j, t, 0);
        else
            cpu_pool_run(pool, quant_task, &j, n_x);
    }
    /* Aim for ~8 tasks per thread over all active experts so uneven expert
     * loads still balance, but never split below 4 rows. */
    int64_t total = n_out * n_active * (w2 ? 2 : 1);
    int64_t per = (total + (int64_t)n_threads * 8 - 1) / ((int64_t)n_threads * 8);
    per = per < 4 ? 4 : per;
    per = per > n_out ? n_out : per;
    j.rows_per_task = per;
    j.tasks_per_expert = (n_out + per - 1) / per;
    cpu_pool_run(pool, mm_task, &j, j.tasks_per_expert * n_active * (w2 ? 2 : 1));
    rc = MOE_OK;
out:
    free(owned);
    return rc;
}

int cpu_matmul_experts(cpu_pool *pool, int type, const void *w, int64_t n_in, int64_t n_out,
                       int64_t n_expert, const float *x, int64_t n_x, const int64_t *expert_off,
                       const int32_t *x_rows, float *y) {
    return matmul_experts(pool, type, w, NULL, n_in, n_out, n_expert, x, n_x, expert_off, x_rows, y, NULL);
}

int cpu_matmul_experts2(cpu_pool *pool, int type, const void *w_a, const void *w_b, int64_t n_in, int64_t n_out,
                        int64_t n_expert, const float *x, int64_t n_x, const int64_t *expert_off,
                        const int32_t *x_rows, float *y_a, float *y_b) {
    if (!w_b)
        return MOE_EINVAL;
    return matmul_experts(pool, type, w_a, w_b, n_in, n_out, n_expert, x, n_x, expert_off, x_rows, y_a, y_b);
}

int cpu_matmul(cpu_pool *pool, int type, const void *w, int64_t n_in, int64_t n_out,
               const float *x, int64_t n_tok, float *y) {
    if (n_tok < 0)
        return MOE_EINVAL;
    int64_t off[2] = {0, n_tok};
    return cpu_matmul_experts(pool, type, w, n_in, n_out, 1, x, n_tok, off, NULL, y);
}
