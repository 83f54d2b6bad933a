/* check_cpu_matmul - engine/cpu/cpu_matmul.c against a double-precision
 * reference built from quant.c's dequantizer.
 *
 * Tolerances. For F32/F16/BF16 weights the kernel multiplies exact values
 * and only f32 summation error remains: |y - ref| <= 1e-5 * sum|w*x|.
 * For quantized weights the activation row is quantized to int8 with one
 * scale per block (32 elements for Q*_0/Q*_1, 256 for K-quants), so each
 * x_i moves by at most amax(block)/254; hence, rigorously,
 *     |y - ref| <= sum_blocks amax_b/254 * sum_{i in b} |w_i|  (+ f32 slack).
 * That bound is asserted per output. In aggregate the error is rounding
 * noise: each x_i moves by ~uniform(-step/2, step/2), step = amax_b/127,
 * so the expected squared error of an output is sum_b step_b^2/12 *
 * sum_{i in b} w_i^2; the whole output's L2 error must stay within 1.5x
 * of that prediction. With this test's data (outliers of 8x in many
 * blocks) that is ~1 % relative for 32-blocks and ~2.3 % for 256-blocks.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cpu_dot.h" /* internal: activation quantizers per ISA */
#include "cpu_matmul.h"
#include "quant.h"
#include "skip.h"
#include "status.h"
#include "threadpool.h"

static const int all_types[] = {MOE_TYPE_F32,  MOE_TYPE_F16,  MOE_TYPE_BF16, MOE_TYPE_Q8_0,
                                MOE_TYPE_Q4_0, MOE_TYPE_Q4_1, MOE_TYPE_Q5_0, MOE_TYPE_Q5_1,
                                MOE_TYPE_Q4_K, MOE_TYPE_Q5_K, MOE_TYPE_Q6_K};
#define N_TYPES ((int)(sizeof all_types / sizeof all_types[0]))

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float frand(void) { /* uniform in (-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((int64_t)(rng >> 11) - (1ll << 52)) / (float)(1ll << 52);
}

static int is_float_type(int t) { return t == MOE_TYPE_F32 || t == MOE_TYPE_F16 || t == MOE_TYPE_BF16; }
static int act_block(int t) { return is_float_type(t) ? 0 : (moe_type_get(t)->blck == 256 ? 256 : 32); }

typedef struct {
    int type;
    int64_t n_in, n_out, n_tok;
    void *w;    /* quantized weights */
    float *wf;  /* (n_out, n_in) dequantized */
    float *x;   /* (n_tok, n_in) */
    double *ref; /* (n_tok, n_out) */
    double *bound; /* (n_tok, n_out) per-output tolerance */
    double *sigma; /* (n_tok, n_out) expected RMS error of the activation rounding */
} problem;

static void problem_make_x(problem *p, int type, int64_t n_in, int64_t n_out, int64_t n_tok, const float *x_in) {
    p->type = type;
    p->n_in = n_in;
    p->n_out = n_out;
    p->n_tok = n_tok;
    size_t rs = moe_row_size(type, n_in);
    ck_assert_uint_gt(rs, 0);
    p->w = malloc(rs * n_out);
    p->wf = malloc(sizeof(float) * n_in * n_out);
    p->x = malloc(sizeof(float) * n_in * n_tok);
    p->ref = malloc(sizeof(double) * n_out * n_tok);
    p->bound = malloc(sizeof(double) * n_out * n_tok);
    p->sigma = malloc(sizeof(double) * n_out * n_tok);
    float *row = malloc(sizeof(float) * n_in);
    for (int64_t o = 0; o < n_out; o++) {
        float scale = 0.05f + (float)(o % 7) * 0.3f; /* rows of different magnitude */
        for (int64_t i = 0; i < n_in; i++)
            row[i] = frand() * scale;
        ck_assert_int_eq(moe_quantize_row(type, row, (uint8_t *)p->w + rs * o, n_in), MOE_OK);
        ck_assert_int_eq(moe_dequantize_row(type, (uint8_t *)p->w + rs * o, p->wf + n_in * o, n_in), MOE_OK);
    }
    for (int64_t i = 0; i < n_in * n_tok; i++)
        p->x[i] = x_in ? x_in[i] : frand() * (i % 61 == 0 ? 8.0f : 1.0f); /* a few outliers per block */
    int ab = act_block(type);
    for (int64_t t = 0; t < n_tok; t++) {
        const float *x = p->x + n_in * t;
        for (int64_t o = 0; o < n_out; o++) {
            const float *w = p->wf + n_in * o;
            double s = 0, sabs = 0, qb = 0, var = 0;
            for (int64_t i = 0; i < n_in; i++) {
                s += (double)w[i] * x[i];
                sabs += fabs((double)w[i] * x[i]);
            }
            if (ab) {
                for (int64_t b = 0; b < n_in; b += ab) {
                    double amax = 0, wsum = 0, w2 = 0;
                    for (int i = 0; i < ab; i++) {
                        amax = fmax(amax, fabs(x[b + i]));
                        wsum += fabs(w[b + i]);
                        w2 += (double)w[b + i] * w[b + i];
                    }
                    qb += amax / 254.0 * wsum;
                    /* rounding error ~ uniform over one step: variance step^2/12 */
                    var += (amax / 127.0) * (amax / 127.0) / 12.0 * w2;
                }
            }
            p->ref[n_out * t + o] = s;
            p->bound[n_out * t + o] = qb * 1.001 + 1e-5 * sabs + 1e-30;
            p->sigma[n_out * t + o] = sqrt(var) + 1e-6 * sabs;
        }
    }
    free(row);
}

static void problem_free(problem *p) {
    free(p->w);
    free(p->wf);
    free(p->x);
    free(p->ref);
    free(p->bound);
    free(p->sigma);
}

static void problem_make(problem *p, int type, int64_t n_in, int64_t n_out, int64_t n_tok) {
    problem_make_x(p, type, n_in, n_out, n_tok, NULL);
}

/* Checks y against the reference; returns the relative L2 error. */
static double check_against_ref(const problem *p, const float *y, const char *what) {
    double se = 0, ss = 0, sv = 0;
    for (int64_t k = 0; k < p->n_tok * p->n_out; k++) {
        sv += p->sigma[k] * p->sigma[k];
        double e = fabs((double)y[k] - p->ref[k]);
        if (!(e <= p->bound[k]))
            ck_abort_msg("%s %s n_in=%lld n_out=%lld n_tok=%lld: out %lld = %g, ref %g, |err| %g > bound %g", what,
                         moe_type_name(p->type), (long long)p->n_in, (long long)p->n_out, (long long)p->n_tok,
                         (long long)k, y[k], p->ref[k], e, p->bound[k]);
        se += e * e;
        ss += p->ref[k] * p->ref[k];
    }
    /* In aggregate the error must look like rounding noise: at most 1.5x
     * the RMS the step sizes predict (plus f32 slack for float types). */
    double rel = sqrt(se / ss), lim = 1.5 * sqrt(sv / ss);
    ck_assert_msg(rel <= lim, "%s %s: relative L2 error %g > %g", what, moe_type_name(p->type), rel, lim);
    return rel;
}

static const int64_t shapes[][2] = {{256, 67}, {512, 33}, {96, 35}, {1024, 9}};
static const int64_t toks[] = {1, 3, 8, 33};

/* Every type, shape and token count, on every ISA this CPU has. */
START_TEST(test_vs_reference) {
    int type = all_types[_i];
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        if (shapes[s][0] % moe_type_get(type)->blck)
            continue;
        for (size_t t = 0; t < sizeof toks / sizeof toks[0]; t++) {
            problem p;
            problem_make(&p, type, shapes[s][0], shapes[s][1], toks[t]);
            float *y = malloc(sizeof(float) * p.n_out * p.n_tok);
            for (int isa = CPU_ISA_SCALAR; isa <= (int)cpu_isa_best(); isa++) {
                ck_assert_int_eq(cpu_isa_set((cpu_isa)isa), MOE_OK);
                memset(y, 0xff, sizeof(float) * p.n_out * p.n_tok);
                ck_assert_int_eq(cpu_matmul(NULL, type, p.w, p.n_in, p.n_out, p.x, p.n_tok, y), MOE_OK);
                check_against_ref(&p, y, cpu_isa_name((cpu_isa)isa));
            }
            free(y);
            problem_free(&p);
        }
    }
}
END_TEST

/* The SIMD paths compute the same integer block sums as the scalar one;
 * only the order of the f32 accumulation differs. */
START_TEST(test_scalar_vs_simd) {
    int type = all_types[_i];
    if (cpu_isa_best() == CPU_ISA_SCALAR) {
        test_skip("check_cpu_matmul", "scalar_vs_simd %s: this CPU has no SIMD ISA", moe_type_name(type));
        return;
    }
    problem p;
    int64_t n_in = moe_type_get(type)->blck == 256 ? 2048 : 1024 + 96;
    problem_make(&p, type, n_in, 41, 5);
    size_t ny = (size_t)(p.n_out * p.n_tok);
    float *ys = malloc(sizeof(float) * ny), *yv = malloc(sizeof(float) * ny);
    ck_assert_int_eq(cpu_isa_set(CPU_ISA_SCALAR), MOE_OK);
    ck_assert_int_eq(cpu_matmul(NULL, type, p.w, p.n_in, p.n_out, p.x, p.n_tok, ys), MOE_OK);
    for (int isa = CPU_ISA_AVX2; isa <= (int)cpu_isa_best(); isa++) {
        ck_assert_int_eq(cpu_isa_set((cpu_isa)isa), MOE_OK);
        ck_assert_int_eq(cpu_matmul(NULL, type, p.w, p.n_in, p.n_out, p.x, p.n_tok, yv), MOE_OK);
        for (size_t k = 0; k < ny; k++) {
            double sabs = 0;
            const float *w = p.wf + (k % p.n_out) * n_in, *x = p.x + (k / p.n_out) * n_in;
            for (int64_t i = 0; i < n_in; i++)
                sabs += fabs((double)w[i] * x[i]);
            if (!(fabs((double)ys[k] - yv[k]) <= 2e-6 * sabs))
                ck_abort_msg("%s %s out %zu: scalar %.9g simd %.9g", moe_type_name(type), cpu_isa_name((cpu_isa)isa),
                             k, ys[k], yv[k]);
        }
    }
    free(ys);
    free(yv);
    problem_free(&p);
}
END_TEST

/* Each output is computed by one thread with the same code, so any thread
 * count gives the same bits. */
START_TEST(test_threads_identical) {
    int type = all_types[_i];
    problem p;
    problem_make(&p, type, 512, 203, 7);
    size_t ny = (size_t)(p.n_out * p.n_tok);
    float *y1 = malloc(sizeof(float) * ny), *y2 = malloc(sizeof(float) * ny);
    int st;
    cpu_pool *pool2 = cpu_pool_create(2, &st), *pool3 = cpu_pool_create(3, &st);
    ck_assert_ptr_nonnull(pool2);
    ck_assert_ptr_nonnull(pool3);
    cpu_isa_set(cpu_isa_best());
    ck_assert_int_eq(cpu_matmul(NULL, type, p.w, p.n_in, p.n_out, p.x, p.n_tok, y1), MOE_OK);
    for (int rep = 0; rep < 3; rep++) {
        memset(y2, 0, sizeof(float) * ny);
        ck_assert_int_eq(cpu_matmul(rep == 1 ? pool3 : pool2, type, p.w, p.n_in, p.n_out, p.x, p.n_tok, y2), MOE_OK);
        ck_assert(memcmp(y1, y2, sizeof(float) * ny) == 0);
    }
    /* n_tok = 1 (decode) too */
    ck_assert_int_eq(cpu_matmul(NULL, type, p.w, p.n_in, p.n_out, p.x, 1, y1), MOE_OK);
    ck_assert_int_eq(cpu_matmul(pool2, type, p.w, p.n_in, p.n_out, p.x, 1, y2), MOE_OK);
    ck_assert(memcmp(y1, y2, sizeof(float) * p.n_out) == 0);
    cpu_pool_destroy(pool2);
    cpu_pool_destroy(pool3);
    free(y1);
    free(y2);
    problem_free(&p);
}
END_TEST

/* Expert-batched entry: 5 experts, one unused, tokens routed to 2 each. */
START_TEST(test_experts) {
    int type = all_types[_i];
    const int64_t n_in = 256, n_out = 37, n_exp = 5, n_tok = 6, top_k = 2;
    problem pe[5];
    size_t rs = moe_row_size(type, n_in);
    uint8_t *w = malloc(rs * n_out * n_exp);
    for (int e = 0; e < n_exp; e++) {
        problem_make_x(&pe[e], type, n_in, n_out, n_tok, e ? pe[0].x : NULL); /* same tokens for all */
        memcpy(w + rs * n_out * e, pe[e].w, rs * n_out);
    }
    /* routing: token t -> experts (t % 4) and ((t + 1) % 4); expert 4 unused */
    int64_t off[6] = {0};
    int32_t rows[12], ent_exp[12];
    int64_t k = 0;
    for (int e = 0; e < n_exp; e++) {
        for (int t = 0; t < n_tok; t++)
            if (e < 4 && (t % 4 == e || (t + 1) % 4 == e)) {
                rows[k] = t;
                ent_exp[k] = e;
                k++;
            }
        off[e + 1] = k;
    }
    ck_assert_int_eq(k, n_tok * top_k);
    int st;
    cpu_pool *pool = cpu_pool_create(2, &st);
    for (int isa = CPU_ISA_SCALAR; isa <= (int)cpu_isa_best(); isa++) {
        cpu_isa_set((cpu_isa)isa);
        float *y = malloc(sizeof(float) * n_out * k);
        float *yd = malloc(sizeof(float) * n_out * n_tok);
        ck_assert_int_eq(cpu_matmul_experts(pool, type, w, n_in, n_out, n_exp, pe[0].x, n_tok, off, rows, y), MOE_OK);
        for (int64_t kk = 0; kk < k; kk++) {
            /* must equal the dense product of that expert, bit for bit */
            const problem *p = &pe[ent_exp[kk]];
            ck_assert_int_eq(cpu_matmul(NULL, type, p->w, n_in, n_out, pe[0].x, n_tok, yd), MOE_OK);
            ck_assert(memcmp(y + n_out * kk, yd + n_out * rows[kk], sizeof(float) * n_out) == 0);
            for (int64_t o = 0; o < n_out; o++) {
                double e = fabs((double)y[n_out * kk + o] - p->ref[n_out * rows[kk] + o]);
                ck_assert(e <= p->bound[n_out * rows[kk] + o]);
            }
        }
        /* x_rows == NULL: entry k reads x row k (down-projection layout) */
        float *xin = malloc(sizeof(float) * n_in * k);
        for (int64_t kk = 0; kk < k; kk++)
            memcpy(xin + n_in * kk, pe[0].x + n_in * rows[kk], sizeof(float) * n_in);
        float *y2 = malloc(sizeof(float) * n_out * k);
        ck_assert_int_eq(cpu_matmul_experts(pool, type, w, n_in, n_out, n_exp, xin, k, off, NULL, y2), MOE_OK);
        ck_assert(memcmp(y, y2, sizeof(float) * n_out * k) == 0);
        /* two stacks at once (gate + up): each equals its own call bit for
         * bit; the second stack here is the first with its experts rotated */
        uint8_t *wb = malloc(rs * n_out * n_exp);
        for (int e = 0; e < n_exp; e++)
            memcpy(wb + rs * n_out * e, w + rs * n_out * ((e + 1) % n_exp), rs * n_out);
        float *ya = malloc(sizeof(float) * n_out * k), *yb = malloc(sizeof(float) * n_out * k);
        float *yb1 = malloc(sizeof(float) * n_out * k);
        ck_assert_int_eq(cpu_matmul_experts2(pool, type, w, wb, n_in, n_out, n_exp, pe[0].x, n_tok, off, rows, ya, yb),
                         MOE_OK);
        ck_assert_int_eq(cpu_matmul_experts(pool, type, wb, n_in, n_out, n_exp, pe[0].x, n_tok, off, rows, yb1), MOE_OK);
        ck_assert(memcmp(ya, y, sizeof(float) * n_out * k) == 0);
        ck_assert(memcmp(yb, yb1, sizeof(float) * n_out * k) == 0);
        ck_assert(memcmp(yb, ya, sizeof(float) * n_out * k) != 0);
        ck_assert_int_eq(cpu_matmul_experts2(pool, type, w, NULL, n_in, n_out, n_exp, pe[0].x, n_tok, off, rows, ya, yb),
                         MOE_EINVAL);
        free(wb);
        free(ya);
        free(yb);
        free(yb1);
        free(xin);
        free(y2);
        free(y);
        free(yd);
    }
    cpu_pool_destroy(pool);
    for (int e = 0; e < n_exp; e++)
        problem_free(&pe[e]);
    free(w);
}
END_TEST

/* Activation quantization must give the same bytes on every ISA, ties
 * included (a block with amax 127 has scale 1, so x.5 values are exact
 * ties that must round to even). */
START_TEST(test_act_quant_identical) {
    if (cpu_isa_best() < CPU_ISA_AVX2) {
        test_skip("check_cpu_matmul", "act_quant_identical: this CPU has no AVX2");
        return;
    }
    cpu__kernels ks, kv;
    cpu__kernels_scalar(&ks);
    kv = ks;
    cpu__kernels_avx2(&kv);
    const int64_t n = 1024;
    float *x = malloc(sizeof(float) * n);
    for (int64_t i = 0; i < n; i++)
        x[i] = frand() * 3.0f;
    for (int64_t i = 0; i < 256; i++) /* first 256: ties */
        x[i] = (i % 32 == 0 || i == 0) ? 127.0f : (float)((int)(i % 61) - 30) + 0.5f;
    x[300] = 0.0f;
    for (int64_t i = 512; i < 768; i++) /* an all-zero 256-block */
        x[i] = 0.0f;
    cpu__q8blk a[32], b[32];
    cpu__q8k ak[4], bk[4];
    ks.act_q8(x, n, a);
    kv.act_q8(x, n, b);
    ck_assert(memcmp(a, b, sizeof a) == 0);
    ks.act_q8k(x, n, ak);
    kv.act_q8k(x, n, bk);
    ck_assert(memcmp(ak, bk, sizeof ak) == 0);
    /* spot-check the rounding itself: 2.5 -> 2, 3.5 -> 4, -2.5 -> -2 */
    ck_assert_float_eq(a[0].d, 1.0f);
    for (int j = 1; j < 32; j++) {
        float v = x[j];
        float r = (float)(int)v + ((v - (int)v) == 0.5f ? ((int)v % 2 ? 1.0f : 0.0f) : 0.0f);
        if (v < 0)
            r = -((float)(int)-v + ((int)-v % 2 ? 1.0f : 0.0f));
        ck_assert_int_eq(a[0].qs[j], (int)r);
    }
    int32_t sum = 0;
    for (int j = 0; j < 32; j++)
        sum += a[1].qs[j];
    ck_assert_float_eq(a[1].s, a[1].d * (float)sum);
    for (int j = 0; j < 16; j++) {
        int s16 = 0;
        for (int l = 0; l < 16; l++)
            s16 += ak[1].qs[16 * j + l];
        ck_assert_int_eq(ak[1].bsums[j], s16);
    }
    ck_assert(ak[2].d == 0.0f);
    free(x);
}
END_TEST

START_TEST(test_bad_args) {
    float x[256] = {0}, y[64];
    uint8_t w[4096] = {0};
    for (int i = 0; i < 64; i++)
        y[i] = 42.0f;
    ck_assert_int_eq(cpu_matmul(NULL, MOE_TYPE_Q2_K, w, 256, 1, x, 1, y), MOE_EUNSUPPORTED);
    ck_assert_int_eq(cpu_matmul(NULL, MOE_TYPE_Q8_K, w, 256, 1, x, 1, y), MOE_EUNSUPPORTED);
    ck_assert_int_eq(cpu_matmul(NULL, 77, w, 256, 1, x, 1, y), MOE_EUNSUPPORTED);
    ck_assert_int_eq(cpu_matmul(NULL, MOE_TYPE_Q4_0, w, 48, 1, x, 1, y), MOE_EINVAL);
    ck_assert_int_eq(cpu_matmul(NULL, MOE_TYPE_Q4_K, w, 128, 1, x, 1, y), MOE_EINVAL);
    ck_assert_int_eq(cpu_matmul(NULL, MOE_TYPE_F32, NULL, 16, 1, x, 1, y), MOE_EINVAL);
    ck_assert_int_eq(cpu_matmul(NULL, MOE_TYPE_F32, w, 16, 1, NULL, 1, y), MOE_EINVAL);
    ck_assert_int_eq(cpu_matmul(NULL, MOE_TYPE_F32, w, 16, 0, x, 1, y), MOE_EINVAL);
    ck_assert_int_eq(cpu_matmul(NULL, MOE_TYPE_F32, w, 16, 1, x, -1, y), MOE_EINVAL);
    ck_assert_int_eq(cpu_matmul(NULL, MOE_TYPE_F32, w, 16, 1, x, 0, y), MOE_OK);
    int64_t bad_off[3] = {0, 2, 1};
    ck_assert_int_eq(cpu_matmul_experts(NULL, MOE_TYPE_F32, w, 16, 2, 2, x, 4, bad_off, NULL, y), MOE_EINVAL);
    int64_t off[3] = {0, 1, 2};
    int32_t rows[2] = {0, 4};
    ck_assert_int_eq(cpu_matmul_experts(NULL, MOE_TYPE_F32, w, 16, 2, 2, x, 4, off, rows, y), MOE_EINVAL);
    int64_t off_big[3] = {0, 3, 5};
    ck_assert_int_eq(cpu_matmul_experts(NULL, MOE_TYPE_F32, w, 16, 2, 2, x, 4, off_big, NULL, y), MOE_EINVAL);
    int64_t off_nz[3] = {1, 1, 2};
    ck_assert_int_eq(cpu_matmul_experts(NULL, MOE_TYPE_F32, w, 16, 2, 2, x, 4, off_nz, NULL, y), MOE_EINVAL);
    for (int i = 0; i < 64; i++)
        ck_assert(y[i] == 42.0f); /* refusals write nothing */
    ck_assert_int_eq(cpu_isa_set((cpu_isa)7), MOE_EUNSUPPORTED);
    ck_assert(cpu_matmul_supported(MOE_TYPE_Q6_K) && !cpu_matmul_supported(MOE_TYPE_Q3_K));
}
END_TEST

/* The pool runs every task exactly once, inline or threaded, many times. */
typedef struct {
    int *hits;
    int max_thread;
} pool_ctx;
static void count_cb(void *ctx, int64_t task, int thread) {
    pool_ctx *c = ctx;
    __atomic_fetch_add(&c->hits[task], 1, __ATOMIC_RELAXED);
    if (thread > __atomic_load_n(&c->max_thread, __ATOMIC_RELAXED))
        __atomic_store_n(&c->max_thread, thread, __ATOMIC_RELAXED);
}

START_TEST(test_pool) {
    for (int n = 1; n <= 4; n++) {
        int st = -99;
        cpu_pool *p = cpu_pool_create(n, &st);
        ck_assert_ptr_nonnull(p);
        ck_assert_int_eq(st, MOE_OK);
        ck_assert_int_eq(cpu_pool_size(p), n);
        int hits[1000];
        for (int rep = 0; rep < 200; rep++) {
            memset(hits, 0, sizeof hits);
            pool_ctx c = {hits, 0};
            int nt = 1 + (rep * 37) % 1000;
            if (rep % 50 == 49)
                usleep(3000); /* let the workers fall asleep: exercises the wake-up path */
            cpu_pool_run(p, count_cb, &c, nt);
            int bad = 0;
            for (int t = 0; t < 1000; t++)
                bad += hits[t] != (t < nt);
            ck_assert_int_eq(bad, 0);
            ck_assert_int_lt(c.max_thread, n);
        }
        cpu_pool_destroy(p);
    }
    ck_assert_int_eq(cpu_pool_size(NULL), 1);
    cpu_pool_destroy(NULL);
}
END_TEST

/* A job larger than one claim word can count (2^20 - 1 tasks) runs in
 * pieces, each task still exactly once; and a job whose ctx lives on the
 * caller's stack can be followed at once by another: a worker that wakes
 * late never runs a task of a job it did not see start (the counts of
 * every job would be off otherwise). */
typedef struct {
    unsigned char *hits;
} big_ctx;
static void big_cb(void *ctx, int64_t task, int thread) {
    (void)thread;
    big_ctx *c = ctx;
    __atomic_fetch_add(&c->hits[task], 1, __ATOMIC_RELAXED);
}

START_TEST(test_pool_big_and_back_to_back) {
    int st;
    cpu_pool *p = cpu_pool_create(3, &st);
    ck_assert_ptr_nonnull(p);
    int64_t n = 2500000;
    unsigned char *hits = calloc((size_t)n, 1);
    big_ctx c = {hits};
    cpu_pool_run(p, big_cb, &c, n);
    int64_t bad = 0;
    for (int64_t t = 0; t < n; t++)
        bad += hits[t] != 1;
    ck_assert_int_eq(bad, 0);
    free(hits);
    for (int rep = 0; rep < 20000; rep++) {
        int h[3] = {0, 0, 0};
        pool_ctx pc = {h, 0};
        cpu_pool_run(p, count_cb, &pc, 2 + rep % 2);
        ck_assert(h[0] == 1 && h[1] == 1 && h[2] == (rep % 2));
    }
    cpu_pool_destroy(p);
}
END_TEST

static Suite *cpu_matmul_suite(void) {
    Suite *s = suite_create("cpu_matmul");
    TCase *tc = tcase_create("reference");
    tcase_add_loop_test(tc, test_vs_reference, 0, N_TYPES);
    tcase_set_timeout(tc, 120);
    suite_add_tcase(s, tc);
    tc = tcase_create("paths");
    tcase_add_loop_test(tc, test_scalar_vs_simd, 0, N_TYPES);
    suite_add_tcase(s, tc);
    tc = tcase_create("threads");
    tcase_add_loop_test(tc, test_threads_identical, 0, N_TYPES);
    tcase_add_test(tc, test_pool);
    tcase_add_test(tc, test_pool_big_and_back_to_back);
    suite_add_tcase(s, tc);
    tc = tcase_create("experts");
    tcase_add_loop_test(tc, test_experts, 0, N_TYPES);
    suite_add_tcase(s, tc);
    tc = tcase_create("act_quant");
    tcase_add_test(tc, test_act_quant_identical);
    suite_add_tcase(s, tc);
    tc = tcase_create("args");
    tcase_add_test(tc, test_bad_args);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    /* every test loops over the ISAs up to the best this CPU has */
    for (int isa = (int)cpu_isa_best() + 1; isa <= CPU_ISA_AVX512; isa++)
        test_skip("check_cpu_matmul", "%s kernels untested: this CPU lacks %s", cpu_isa_name((cpu_isa)isa),
                  cpu_isa_name((cpu_isa)isa));
    SRunner *sr = srunner_create(cpu_matmul_suite());
    srunner_set_fork_status(sr, CK_FORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
