/* check_cuda_ops.c - every op of the CUDA backend against the CPU backend.
 *
 * Each test draws fresh random inputs (the seed is printed, and
 * MOE_TEST_SEED=n replays one), runs the op on both backends, poisons the
 * GPU's output buffers with 0xFF bytes (NaN) first so an unwritten element
 * fails, and compares by ||gpu - cpu|| / ||cpu|| (NaN never passes).
 *
 * Bands (tests/check_cuda_ops.c is the place that states them):
 *  - f32 arithmetic on both sides: 1e-4 (measured errors are ~1e-6; the
 *    band allows different summation orders over n_in up to 4096).
 *  - embed/get_rows: bit-exact (the dequantizers evaluate quant.c's
 *    expressions, with FMA contraction ruled out).
 *  - matmul on quantized weights vs the CPU: 5e-3 measured on the scale
 *    sum_i |w_i x_i| of each output (one dot product can cancel to ~0, so
 *    ||y|| is no scale for a single output). The GPU multiplies the exactly
 *    dequantized weights by f32 activations; the CPU rounds the activations
 *    to int8 per block of 32 (Q8_0 family) or 256 (K-quants) first. The
 *    CPU's own error against an f64 product, measured with
 *    MOE_CUDA_TEST_EMULATE=1 over every type and shape: <= 6e-4 on that
 *    scale, <= 5.1e-3 as ||err|| / ||y||. The GPU is additionally held to
 *    1e-4 (||err|| / ||y||) against the f64 product, so the CPU band hides
 *    nothing of its own.
 *  - matmul through cuBLAS (F16/BF16 weights, more than 8 tokens): the
 *    activations are rounded to the weight type: f16 2e-3 (unit roundoff
 *    2^-11), bf16 1e-2 (2^-8) against the f64 reference.
 *  - moe / mla on quantized weights vs the CPU: 3e-2 as ||err|| / ||out||,
 *    ~6x the CPU's 5e-3 per product above (two or three chained products);
 *    the expert choice itself must be identical.
 *
 * Built with CUDA=0, or where CUDA reports no device, the GPU tests are
 * skipped and the skip counted (skip.h); where a GPU is visible but CUDA
 * cannot use it, the suite fails with the CUDA error (cuda_gate.h, whose
 * decision is tested here on every machine).
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "cuda_gate.h"
#include "qblocks.h"
#include "quant.h"
#include "skip.h"

/* The run/skip/fail decision over the cases that matter: a too-old driver
 * (35) or any other error with a GPU visible fails; "no device" skips
 * even with one visible (deliberately hidden); nothing visible skips. */
START_TEST(gate_decides) {
    ck_assert_int_eq(cuda_gate_decide(0, 1, 0, 1), CUDA_GATE_RUN);
    ck_assert_int_eq(cuda_gate_decide(0, 2, 0, 0), CUDA_GATE_RUN); /* CUDA sees one: run, whatever else says */
    ck_assert_int_eq(cuda_gate_decide(35, 0, 0, 1), CUDA_GATE_FAIL); /* cudaErrorInsufficientDriver */
    ck_assert_int_eq(cuda_gate_decide(35, 0, 0, 0), CUDA_GATE_SKIP); /* no driver, no GPU: the toolkit alone */
    ck_assert_int_eq(cuda_gate_decide(999, 0, 0, 1), CUDA_GATE_FAIL); /* cudaErrorUnknown */
    ck_assert_int_eq(cuda_gate_decide(-1, 0, 0, 1), CUDA_GATE_FAIL); /* the probe gave no answer */
    ck_assert_int_eq(cuda_gate_decide(100, 0, 1, 1), CUDA_GATE_SKIP); /* cudaErrorNoDevice */
    ck_assert_int_eq(cuda_gate_decide(100, 0, 1, 0), CUDA_GATE_SKIP);
    ck_assert_int_eq(cuda_gate_decide(0, 0, 1, 0), CUDA_GATE_SKIP);
    ck_assert(cuda_gate_visible("0", 0, 0));
    ck_assert(cuda_gate_visible(NULL, 1, 0));
    ck_assert(cuda_gate_visible(NULL, 0, 1));
    ck_assert(!cuda_gate_visible(NULL, 0, 0));
    ck_assert(!cuda_gate_visible("", 0, 0)); /* set empty: no device is meant to be seen */
}
END_TEST

#ifdef MOE_HAVE_CUDA
#include "cuda_backend.h"

/* ---- harness ---- */

static moe_backend cpu, gpu;
static uint64_t rng_state;
/* MOE_CUDA_TEST_EMULATE=1: "gpu" is a second CPU backend, so the harness
 * itself (references, bands, layouts) can be exercised without a GPU; the
 * f64 references then measure the CPU's own error, i.e. the gap a correct
 * GPU shows against the CPU. Device-only tests (sampling) are skipped. */
static int emulate;

static void setup(void) {
    ck_assert_int_eq(moe_cpu_backend_init(&cpu, &(moe_cpu_backend_opts){.n_threads = 2}), MOE_OK);
    if (emulate) ck_assert_int_eq(moe_cpu_backend_init(&gpu, &(moe_cpu_backend_opts){.n_threads = 2}), MOE_OK);
    else ck_assert_int_eq(moe_cuda_backend_init(&gpu, NULL), MOE_OK);
    const char *s = getenv("MOE_TEST_SEED");
    rng_state = s ? strtoull(s, NULL, 10) : ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
    fprintf(stderr, "seed %llu\n", (unsigned long long)rng_state);
    rng_state = rng_state * 2654435761u + 1;
}

static void teardown(void) {
    moe_backend_destroy(&gpu);
    moe_backend_destroy(&cpu);
}

static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static float urand(float lo, float hi) { return lo + (hi - lo) * (float)((rnd() >> 11) * (1.0 / 9007199254740992.0)); }
static int irand(int n) { return (int)(rnd() % (uint64_t)n); }

static float *rand_vec(size_t n, float lo, float hi) {
    float *v = malloc(n * sizeof(float) + 1);
    for (size_t i = 0; i < n; i++) v[i] = urand(lo, hi);
    return v;
}

/* A device copy of host data. */
static void *dev(const void *host, size_t nbytes) {
    void *d = gpu.ops->alloc(gpu.ctx, nbytes);
    ck_assert_ptr_nonnull(d);
    if (host) ck_assert_int_eq(gpu.ops->upload(gpu.ctx, d, host, nbytes), MOE_OK);
    return d;
}

/* Fills a device buffer with 0xFF bytes (NaN as f32, -1 as int). */
static void poison(void *d, size_t nbytes) {
    void *p = malloc(nbytes + 1);
    memset(p, 0xFF, nbytes);
    ck_assert_int_eq(gpu.ops->upload(gpu.ctx, d, p, nbytes), MOE_OK);
    free(p);
}

static float *down(const void *d, size_t n) {
    float *h = malloc(n * sizeof(float) + 1);
    ck_assert_int_eq(gpu.ops->download(gpu.ctx, h, d, n * sizeof(float)), MOE_OK);
    return h;
}

static void gfree(void *d) { gpu.ops->free(gpu.ctx, d); }

/* ||a - b|| / ||b||, NaN-propagating (a NaN anywhere gives NaN). */
static double rel(const float *a, const float *b, size_t n) {
    double dd = 0, bb = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        dd += d * d;
        bb += (double)b[i] * b[i];
    }
    return bb > 0 ? sqrt(dd / bb) : sqrt(dd);
}

static double rel_d(const float *a, const double *b, size_t n) {
    double dd = 0, bb = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        dd += d * d;
        bb += b[i] * b[i];
    }
    return bb > 0 ? sqrt(dd / bb) : sqrt(dd);
}

#define CHECK_REL(got, want, n, tol, what)                                                                   \
    do {                                                                                                     \
        double e_ = rel((got), (want), (n));                                                                 \
        ck_assert_msg(e_ <= (tol), "%s: rel err %.3e > %.1e", (what), e_, (double)(tol));                   \
    } while (0)

/* A weight stack on both backends: n_mat matrices of n_out rows of n_in. */
typedef struct wpair {
    moe_weight c, g;
    void *host;
    float *deq; /* (n_mat * n_out, n_in) the dequantized values */
} wpair;

static wpair make_weight(int type, int64_t n_in, int64_t n_out, int64_t n_mat, float scale) {
    wpair w = {0};
    size_t rs = moe_row_size(type, n_in);
    ck_assert_uint_gt(rs, 0);
    int64_t rows = n_out * n_mat;
    w.host = malloc(rs * (size_t)rows + 16);
    w.deq = malloc((size_t)rows * (size_t)n_in * sizeof(float));
    float *row = malloc((size_t)n_in * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < n_in; i++) row[i] = urand(-scale, scale);
        ck_assert_int_eq(moe_quantize_row(type, row, (char *)w.host + (size_t)r * rs, n_in), MOE_OK);
        ck_assert_int_eq(moe_dequantize_row(type, (char *)w.host + (size_t)r * rs, w.deq + r * n_in, n_in), MOE_OK);
    }
    free(row);
    w.c = (moe_weight){.type = type, .data = w.host, .n_in = n_in, .n_out = n_out, .n_mat = n_mat};
    w.g = w.c;
    const void *bound = NULL;
    ck_assert_int_eq(gpu.ops->bind_weight(gpu.ctx, w.host, rs * (size_t)rows, &bound), MOE_OK);
    w.g.data = bound;
    return w;
}

static void free_weight(wpair *w) {
    gpu.ops->unbind_weight(gpu.ctx, w->g.data);
    free(w->host);
    free(w->deq);
}

static const int ALL_TYPES[] = {MOE_TYPE_F32,  MOE_TYPE_F16,  MOE_TYPE_BF16, MOE_TYPE_Q8_0,
                                MOE_TYPE_Q4_0, MOE_TYPE_Q4_1, MOE_TYPE_Q5_0, MOE_TYPE_Q5_1,
                                MOE_TYPE_Q4_K, MOE_TYPE_Q5_K, MOE_TYPE_Q6_K};
#define N_TYPES (int)(sizeof ALL_TYPES / sizeof ALL_TYPES[0])

static int is_plain(int t) { return t == MOE_TYPE_F32 || t == MOE_TYPE_F16 || t == MOE_TYPE_BF16; }
static int is_kquant(int t) { return t == MOE_TYPE_Q4_K || t == MOE_TYPE_Q5_K || t == MOE_TYPE_Q6_K; }

/* ---- the kernels' dequantizer on the host (runs without a GPU) ---- */

START_TEST(dequant_host_matches_quant_c) {
    uint64_t seed = rng_state ? rng_state : 12345;
    rng_state = seed;
    for (int ti = 0; ti < N_TYPES; ti++) {
        int type = ALL_TYPES[ti];
        /* plain types also with a tail that is not a multiple of 8 */
        int64_t ns[2] = {is_kquant(type) ? 512 : 96, is_plain(type) ? 37 : (is_kquant(type) ? 256 : 32)};
        for (int k = 0; k < 2; k++) {
            int64_t n = ns[k];
            float *x = rand_vec((size_t)n, -3, 3), *want = malloc((size_t)n * 4), *got = malloc((size_t)n * 4);
            void *q = malloc(moe_row_size(type, n) + 16);
            ck_assert_int_eq(moe_quantize_row(type, x, q, n), MOE_OK);
            ck_assert_int_eq(moe_dequantize_row(type, q, want, n), MOE_OK);
            memset(got, 0xFF, (size_t)n * 4);
            ck_assert_int_eq(cuda__dequant_row_host(type, q, got, n), MOE_OK);
            ck_assert_msg(memcmp(got, want, (size_t)n * 4) == 0, "%s n %lld: kernel dequantizer differs (rel %.2e)",
                          moe_type_name(type), (long long)n, rel(got, want, (size_t)n));
            free(x);
            free(want);
            free(got);
            free(q);
        }
    }
    ck_assert_int_eq(cuda__dequant_row_host(MOE_TYPE_Q2_K, "", (float[1]){0}, 256), MOE_EUNSUPPORTED);
}
END_TEST

/* ---- embed, get_rows ---- */

START_TEST(embed_bit_exact) {
    for (int ti = 0; ti < N_TYPES; ti++) {
        int type = ALL_TYPES[ti];
        int64_t n_in = is_kquant(type) ? 512 : (is_plain(type) ? 72 : 96), n_out = 50, n = 17;
        wpair w = make_weight(type, n_in, n_out, 1, 2.0f);
        int32_t ids[17];
        for (int i = 0; i < n; i++) ids[i] = irand((int)n_out);
        float *want = malloc((size_t)n * n_in * sizeof(float));
        ck_assert_int_eq(cpu.ops->embed(cpu.ctx, &w.c, ids, n, want), MOE_OK);
        float *d = dev(NULL, (size_t)n * n_in * sizeof(float));
        poison(d, (size_t)n * n_in * sizeof(float));
        ck_assert_int_eq(gpu.ops->embed(gpu.ctx, &w.g, ids, n, d), MOE_OK);
        float *got = down(d, (size_t)n * n_in);
        ck_assert_msg(memcmp(got, want, (size_t)n * n_in * sizeof(float)) == 0, "embed %s not bit-exact (rel %.2e)",
                      moe_type_name(type), rel(got, want, (size_t)n * n_in));
        int32_t bad = (int32_t)n_out;
        ck_assert_int_eq(gpu.ops->embed(gpu.ctx, &w.g, &bad, 1, d), MOE_EINVAL);
        gfree(d);
        free(got);
        free(want);
        free_weight(&w);
    }
}
END_TEST

START_TEST(get_rows_exact) {
    int64_t n_row = 40, stride = 100, n_col = 77, n = 13;
    float *x = rand_vec((size_t)n_row * stride, -3, 3);
    int32_t rows[13];
    for (int i = 0; i < n; i++) rows[i] = irand((int)n_row);
    float *want = malloc((size_t)n * n_col * sizeof(float));
    ck_assert_int_eq(cpu.ops->get_rows(cpu.ctx, x, stride, n_col, rows, n, want), MOE_OK);
    float *dx = dev(x, (size_t)n_row * stride * sizeof(float)), *dy = dev(NULL, (size_t)n * n_col * sizeof(float));
    poison(dy, (size_t)n * n_col * sizeof(float));
    ck_assert_int_eq(gpu.ops->get_rows(gpu.ctx, dx, stride, n_col, rows, n, dy), MOE_OK);
    float *got = down(dy, (size_t)n * n_col);
    ck_assert(memcmp(got, want, (size_t)n * n_col * sizeof(float)) == 0);
    gfree(dx);
    gfree(dy);
    free(x);
    free(want);
    free(got);
}
END_TEST

/* ---- elementwise ---- */

START_TEST(elementwise_ops) {
    static const int64_t sizes[] = {1, 1000, (1 << 20) + 3};
    for (int si = 0; si < 3; si++) {
        int64_t n = sizes[si];
        size_t nb = (size_t)n * sizeof(float);
        float *a = rand_vec((size_t)n, -6, 6), *b = rand_vec((size_t)n, -2, 2);
        float *da = dev(a, nb), *db = dev(b, nb), *dc = dev(NULL, nb);
        float *ca = malloc(nb);
        /* add */
        memcpy(ca, a, nb);
        cpu.ops->add(cpu.ctx, ca, b, n);
        ck_assert_int_eq(gpu.ops->add(gpu.ctx, da, db, n), MOE_OK);
        float *g = down(da, (size_t)n);
        CHECK_REL(g, ca, (size_t)n, 1e-6, "add");
        free(g);
        /* mul (on the sum) */
        cpu.ops->mul(cpu.ctx, ca, b, n);
        ck_assert_int_eq(gpu.ops->mul(gpu.ctx, da, db, n), MOE_OK);
        g = down(da, (size_t)n);
        CHECK_REL(g, ca, (size_t)n, 1e-6, "mul");
        free(g);
        /* swiglu to a separate output, then in place (out aliases gate) */
        float *cs = malloc(nb);
        cpu.ops->swiglu(cpu.ctx, a, b, cs, n);
        ck_assert_int_eq(gpu.ops->upload(gpu.ctx, da, a, nb), MOE_OK);
        poison(dc, nb);
        ck_assert_int_eq(gpu.ops->swiglu(gpu.ctx, da, db, dc, n), MOE_OK);
        g = down(dc, (size_t)n);
        CHECK_REL(g, cs, (size_t)n, 1e-5, "swiglu");
        free(g);
        ck_assert_int_eq(gpu.ops->swiglu(gpu.ctx, da, db, da, n), MOE_OK);
        g = down(da, (size_t)n);
        CHECK_REL(g, cs, (size_t)n, 1e-5, "swiglu in place");
        free(g);
        /* sigmoid_scale: rows of 1000 (or fewer) */
        int64_t cols = n < 1000 ? n : 1000, n_rows = n / cols;
        memcpy(ca, a, nb);
        cpu.ops->sigmoid_scale(cpu.ctx, ca, b, n_rows, cols);
        ck_assert_int_eq(gpu.ops->upload(gpu.ctx, da, a, nb), MOE_OK);
        ck_assert_int_eq(gpu.ops->sigmoid_scale(gpu.ctx, da, db, n_rows, cols), MOE_OK);
        g = down(da, (size_t)n);
        CHECK_REL(g, ca, (size_t)n, 1e-5, "sigmoid_scale");
        free(g);
        free(cs);
        free(ca);
        free(a);
        free(b);
        gfree(da);
        gfree(db);
        gfree(dc);
    }
}
END_TEST

/* ---- rms_norm, rope ---- */

START_TEST(rms_norm_shapes) {
    /* (rows, n, x_stride, y_stride, in place) */
    static const int64_t shapes[][5] = {{1, 64, 64, 64, 0}, {7, 4096, 4096, 4096, 0}, {12, 32, 40, 32, 0},
                                        {9, 512, 576, 576, 1}, {300, 128, 128, 128, 1}};
    for (int si = 0; si < 5; si++) {
        int64_t R = shapes[si][0], n = shapes[si][1], xs = shapes[si][2], ys = shapes[si][3];
        int inplace = (int)shapes[si][4];
        size_t nx = (size_t)R * xs, ny = (size_t)R * ys;
        float *x = rand_vec(nx, -4, 4), *w = rand_vec((size_t)n, 0.5f, 1.5f);
        float *cy = malloc((inplace ? nx : ny) * sizeof(float));
        if (inplace) memcpy(cy, x, nx * sizeof(float));
        ck_assert_int_eq(cpu.ops->rms_norm(cpu.ctx, inplace ? cy : x, xs, cy, ys, R, n, w, 1e-6f), MOE_OK);
        float *dx = dev(x, nx * sizeof(float)), *dw = dev(w, (size_t)n * sizeof(float));
        float *dy = inplace ? dx : dev(NULL, ny * sizeof(float));
        if (!inplace) poison(dy, ny * sizeof(float));
        ck_assert_int_eq(gpu.ops->rms_norm(gpu.ctx, dx, xs, dy, ys, R, n, dw, 1e-6f), MOE_OK);
        size_t cnt = inplace ? nx : ny;
        float *g = down(dy, cnt);
        if (!inplace) /* only the normed columns are defined */
            for (int64_t r = 0; r < R; r++)
                for (int64_t i = n; i < ys; i++) g[r * ys + i] = cy[r * ys + i] = 0;
        CHECK_REL(g, cy, cnt, 1e-5, "rms_norm");
        free(g);
        free(x);
        free(w);
        free(cy);
        gfree(dx);
        gfree(dw);
        if (!inplace) gfree(dy);
    }
}
END_TEST

START_TEST(rope_styles) {
    for (int style = 0; style < 2; style++)
        for (int variant = 0; variant < 2; variant++) {
            /* variant 0: GQA q (n_rot = head_dim); 1: MLA k_pe inside a wider row (n_rot < width) */
            int64_t n_tok = 23, n_head = variant ? 1 : 8, hd = 64, n_rot = variant ? 16 : 64;
            int64_t tok_stride = variant ? 48 : n_head * hd, head_stride = variant ? 48 : hd, off = variant ? 32 : 0;
            size_t nx = (size_t)n_tok * tok_stride;
            float *x = rand_vec(nx, -2, 2), *cx = malloc(nx * sizeof(float));
            memcpy(cx, x, nx * sizeof(float));
            float inv_freq[32];
            for (int i = 0; i < n_rot / 2; i++) inv_freq[i] = powf(10000.0f, -2.0f * i / (float)n_rot);
            int32_t pos[23];
            for (int t = 0; t < n_tok; t++) pos[t] = t < 5 ? t : irand(200000);
            moe_rope_params p = {.style = style, .n_rot = n_rot, .inv_freq = inv_freq,
                                 .attn_factor = variant ? 1.0f : 1.17f};
            ck_assert_int_eq(cpu.ops->rope(cpu.ctx, cx + off, n_tok, tok_stride, n_head, head_stride, pos, &p), MOE_OK);
            float *dx = dev(x, nx * sizeof(float));
            ck_assert_int_eq(gpu.ops->rope(gpu.ctx, dx + off, n_tok, tok_stride, n_head, head_stride, pos, &p), MOE_OK);
            float *g = down(dx, nx);
            CHECK_REL(g, cx, nx, 1e-5, style ? "rope neox" : "rope norm");
            free(g);
            free(x);
            free(cx);
            gfree(dx);
        }
}
END_TEST

/* ---- matmul ---- */

/* y = x . W^T in f64 from the dequantized weights; *mag (same shape) =
 * sum_i |w_oi x_ti| + |bias_o|, the scale the rounding of either operand
 * is relative to (a single dot product can cancel to near zero). */
static double *ref_matmul(const float *deq, int64_t n_in, int64_t n_out, const float *x, int64_t n_tok,
                          const float *bias, double **mag) {
    double *y = malloc((size_t)n_tok * n_out * sizeof(double));
    *mag = malloc((size_t)n_tok * n_out * sizeof(double));
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t o = 0; o < n_out; o++) {
            double s = bias ? bias[o] : 0, a = bias ? fabs(bias[o]) : 0;
            for (int64_t i = 0; i < n_in; i++) {
                double p = (double)deq[o * n_in + i] * x[t * n_in + i];
                s += p;
                a += fabs(p);
            }
            y[t * n_out + o] = s;
            (*mag)[t * n_out + o] = a;
        }
    return y;
}

/* ||a - b|| / ||mag|| */
static double rel_mag(const float *a, const float *b, const double *mag, size_t n) {
    double dd = 0, mm = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        dd += d * d;
        mm += mag[i] * mag[i];
    }
    return mm > 0 ? sqrt(dd / mm) : sqrt(dd);
}

START_TEST(matmul_types_shapes) {
    int type = ALL_TYPES[_i];
    /* (n_in, n_out) classes: small, one-row output (shared-expert gate), wide */
    int64_t shapes[3][2] = {{256, 96}, {256, 1}, {2048, 300}};
    if (is_plain(type)) shapes[1][0] = 36; /* a row that is not a multiple of 8 */
    static const int64_t toks[] = {1, 3, 8, 9, 64, 100};
    for (int si = 0; si < 3; si++)
        for (int ti = 0; ti < 6; ti++) {
            int64_t n_in = shapes[si][0], n_out = shapes[si][1], n_tok = toks[ti];
            if (si == 2 && (n_tok == 3 || n_tok == 9)) continue; /* keep the run short */
            wpair w = make_weight(type, n_in, n_out, 1, 1.0f);
            float *x = rand_vec((size_t)n_tok * n_in, -1, 1);
            float *bias = ti % 2 ? rand_vec((size_t)n_out, -1, 1) : NULL;
            float *cy = malloc((size_t)n_tok * n_out * sizeof(float));
            ck_assert_int_eq(cpu.ops->matmul(cpu.ctx, &w.c, x, n_tok, bias, cy), MOE_OK);
            float *dx = dev(x, (size_t)n_tok * n_in * sizeof(float));
            float *db = bias ? dev(bias, (size_t)n_out * sizeof(float)) : NULL;
            float *dy = dev(NULL, (size_t)n_tok * n_out * sizeof(float));
            poison(dy, (size_t)n_tok * n_out * sizeof(float));
            ck_assert_int_eq(gpu.ops->matmul(gpu.ctx, &w.g, dx, n_tok, db, dy), MOE_OK);
            float *g = down(dy, (size_t)n_tok * n_out);
            double *mag = NULL, *ref = ref_matmul(w.deq, n_in, n_out, x, n_tok, bias, &mag);
            double tol_ref = 1e-4, tol_cpu = is_plain(type) ? 1e-4 : 5e-3;
            if (n_tok > 8 && type == MOE_TYPE_F16) tol_ref = tol_cpu = 2e-3;
            if (n_tok > 8 && type == MOE_TYPE_BF16) tol_ref = tol_cpu = 1e-2;
            if (emulate) tol_ref = tol_cpu;
            /* the CPU's int8 activations: its error is relative to sum |w x| */
            double e_ref = rel_d(g, ref, (size_t)n_tok * n_out),
                   e_cpu = is_plain(type) ? rel(g, cy, (size_t)n_tok * n_out) : rel_mag(g, cy, mag, (size_t)n_tok * n_out);
            if (emulate && !is_plain(type)) {
                float *rf = malloc((size_t)n_tok * n_out * sizeof(float));
                for (size_t i = 0; i < (size_t)(n_tok * n_out); i++) rf[i] = (float)ref[i];
                if (getenv("MOE_TEST_VERBOSE")) fprintf(stderr, "  plain rel %.2e\n", rel_d(g, ref, (size_t)n_tok * n_out));
                e_ref = rel_mag(g, rf, mag, (size_t)n_tok * n_out); /* the CPU's own error, on the same scale */
                free(rf);
            }
            if (getenv("MOE_TEST_VERBOSE"))
                fprintf(stderr, "matmul %-5s %5lld x %4lld n_tok %3lld: vs f64 %.2e, vs cpu %.2e\n", moe_type_name(type),
                        (long long)n_in, (long long)n_out, (long long)n_tok, e_ref, e_cpu);
            ck_assert_msg(e_ref <= tol_ref && e_cpu <= tol_cpu,
                          "matmul %s n_in %lld n_out %lld n_tok %lld: vs f64 %.2e (<= %.0e), vs cpu %.2e (<= %.0e)",
                          moe_type_name(type), (long long)n_in, (long long)n_out, (long long)n_tok, e_ref, tol_ref,
                          e_cpu, tol_cpu);
            free(ref);
            free(mag);
            free(g);
            free(cy);
            free(x);
            free(bias);
            gfree(dx);
            gfree(dy);
            if (db) gfree(db);
            free_weight(&w);
        }
}
END_TEST

START_TEST(matmul_unsupported) {
    if (emulate) {
        test_skip("check_cuda_ops", "matmul_unsupported needs the device (MOE_CUDA_TEST_EMULATE)");
        return;
    }
    /* Q2_K is readable but the CPU multiplies it neither */
    int64_t n_in = 256;
    size_t rs = moe_row_size(MOE_TYPE_Q2_K, n_in);
    void *h = calloc(4, rs);
    const void *b = NULL;
    ck_assert_int_eq(gpu.ops->bind_weight(gpu.ctx, h, 4 * rs, &b), MOE_OK);
    moe_weight w = {.type = MOE_TYPE_Q2_K, .data = b, .n_in = n_in, .n_out = 4, .n_mat = 1};
    float *dx = dev(NULL, (size_t)n_in * sizeof(float)), *dy = dev(NULL, 4 * sizeof(float));
    ck_assert_int_eq(gpu.ops->matmul(gpu.ctx, &w, dx, 1, NULL, dy), MOE_EUNSUPPORTED);
    gpu.ops->unbind_weight(gpu.ctx, b);
    gfree(dx);
    gfree(dy);
    free(h);
}
END_TEST

/* ---- attention ---- */

/* A random paged layout: n_seq sequences with lengths len[s], blocks
 * handed out in a shuffled order so neighbouring positions live in
 * unrelated blocks. */
typedef struct layout {
    int64_t bs, n_blocks, n_seq;
    int32_t *bt;
    int64_t *boff;
} layout;

static layout make_layout(int64_t bs, int64_t n_seq, const int64_t *len) {
    layout L = {.bs = bs, .n_seq = n_seq};
    L.boff = malloc((size_t)(n_seq + 1) * sizeof(int64_t));
    L.boff[0] = 0;
    for (int64_t s = 0; s < n_seq; s++) L.boff[s + 1] = L.boff[s] + (len[s] + bs - 1) / bs;
    L.n_blocks = L.boff[n_seq] + 3; /* a few unused blocks */
    int32_t *perm = malloc((size_t)L.n_blocks * sizeof(int32_t));
    for (int64_t i = 0; i < L.n_blocks; i++) perm[i] = (int32_t)i;
    for (int64_t i = L.n_blocks - 1; i > 0; i--) {
        int j = irand((int)i + 1);
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    L.bt = malloc((size_t)(L.boff[n_seq] + 1) * sizeof(int32_t));
    memcpy(L.bt, perm, (size_t)L.boff[n_seq] * sizeof(int32_t));
    free(perm);
    return L;
}

static void free_layout(layout *L) {
    free(L->bt);
    free(L->boff);
}

/* Batch classes: decode (one token per sequence, long histories), prefill
 * (a whole prompt of one sequence), mixed (a chunk and decode tokens). */
typedef struct batch {
    int64_t n_tok, n_seq;
    int32_t seq[128], pos[128];
    int64_t len[8];
} batch;

static batch make_batch(int cls) {
    batch b = {0};
    if (cls == 0) { /* decode */
        b.n_seq = 4;
        for (int s = 0; s < 4; s++) {
            b.len[s] = 1 + irand(300);
            b.seq[s] = s;
            b.pos[s] = (int32_t)(b.len[s] - 1);
        }
        b.n_tok = 4;
    } else if (cls == 1) { /* prefill */
        b.n_seq = 1;
        b.len[0] = 77;
        for (int t = 0; t < 77; t++) b.seq[t] = 0, b.pos[t] = t;
        b.n_tok = 77;
    } else { /* mixed: a chunk at 150..169 of seq 0, decode on seqs 1-2 */
        b.n_seq = 3;
        b.len[0] = 170, b.len[1] = 5, b.len[2] = 260;
        for (int t = 0; t < 20; t++) b.seq[t] = 0, b.pos[t] = 150 + t;
        b.seq[20] = 1, b.pos[20] = 4;
        b.seq[21] = 2, b.pos[21] = 259;
        b.n_tok = 22;
    }
    return b;
}

/* tests/gpu/emu runs every CUDA thread as a thread: smaller shapes there,
 * still covering several tiles of positions and dv > 128 (two output
 * dims per thread) */
#ifdef MOE_CUDA_EMU
#define EMU_OR(emu, gpu) emu
#else
#define EMU_OR(emu, gpu) gpu
#endif

START_TEST(attention_gqa) {
    static const int64_t heads[][3] = {{4, 2, 16}, {EMU_OR(4, 8), EMU_OR(1, 8), EMU_OR(160, 64)}, {32, 8, 128}};
    for (int hi = 0; hi < EMU_OR(2, 3); hi++)
        for (int cls = 0; cls < 3; cls++) {
            int64_t H = heads[hi][0], Hkv = heads[hi][1], hd = heads[hi][2], kw = Hkv * hd;
            batch b = make_batch(cls);
            layout L = make_layout(16, b.n_seq, b.len);
            moe_kv_view kv = {.block_size = 16, .n_seq = b.n_seq, .block_table = L.bt, .block_off = L.boff,
                              .seq = b.seq, .pos = b.pos, .n_tok = b.n_tok};
            size_t n_slot = (size_t)(L.n_blocks * 16), ncache = n_slot * kw;
            /* history: random everywhere (unused slots too: a wrong slot gives wrong numbers) */
            float *kc = rand_vec(ncache, -1, 1), *vc = rand_vec(ncache, -1, 1);
            float *k = rand_vec((size_t)b.n_tok * kw, -1, 1), *v = rand_vec((size_t)b.n_tok * kw, -1, 1);
            float *q = rand_vec((size_t)b.n_tok * H * hd, -1, 1);
            float *dkc = dev(kc, ncache * 4), *dvc = dev(vc, ncache * 4), *dk = dev(k, (size_t)b.n_tok * kw * 4),
                  *dv = dev(v, (size_t)b.n_tok * kw * 4), *dq = dev(q, (size_t)b.n_tok * H * hd * 4);
            size_t no = (size_t)b.n_tok * H * hd;
            float *dout = dev(NULL, no * 4), *cout = malloc(no * 4);
            ck_assert_int_eq(cpu.ops->kv_store(cpu.ctx, &kv, kc, vc, kw, kw, k, v), MOE_OK);
            ck_assert_int_eq(gpu.ops->kv_store(gpu.ctx, &kv, dkc, dvc, kw, kw, dk, dv), MOE_OK);
            float *gk = down(dkc, ncache), *gv = down(dvc, ncache);
            ck_assert(memcmp(gk, kc, ncache * 4) == 0 && memcmp(gv, vc, ncache * 4) == 0);
            float scale = 1.0f / sqrtf((float)hd);
            ck_assert_int_eq(cpu.ops->attention(cpu.ctx, &kv, q, kc, vc, H, Hkv, hd, scale, cout), MOE_OK);
            poison(dout, no * 4);
            ck_assert_int_eq(gpu.ops->attention(gpu.ctx, &kv, dq, dkc, dvc, H, Hkv, hd, scale, dout), MOE_OK);
            float *g = down(dout, no);
            char what[64];
            snprintf(what, sizeof what, "attention H%lld/%lld d%lld class %d", (long long)H, (long long)Hkv,
                     (long long)hd, cls);
            CHECK_REL(g, cout, no, 1e-4, what);
            /* a position past the block table is refused */
            int32_t badpos = (int32_t)((L.boff[1] - L.boff[0]) * 16);
            moe_kv_view bad = kv;
            bad.pos = &badpos, bad.seq = b.seq, bad.n_tok = 1;
            ck_assert_int_eq(gpu.ops->attention(gpu.ctx, &bad, dq, dkc, dvc, H, Hkv, hd, scale, dout), MOE_EINVAL);
            free(g);
            free(gk);
            free(gv);
            free(kc);
            free(vc);
            free(k);
            free(v);
            free(q);
            free(cout);
            gfree(dkc);
            gfree(dvc);
            gfree(dk);
            gfree(dv);
            gfree(dq);
            gfree(dout);
            free_layout(&L);
        }
}
END_TEST

START_TEST(attention_mla) {
    /* (H, kv_lora, n_rot, nope, dv, k_b type, v_b type) */
    static const int64_t cfg[][7] = {
        {4, 32, 8, 16, 16, MOE_TYPE_F32, MOE_TYPE_F32},
        {EMU_OR(2, 16), EMU_OR(256, 512), EMU_OR(16, 64), EMU_OR(32, 128), EMU_OR(32, 128), MOE_TYPE_F16,
         MOE_TYPE_BF16},
        {EMU_OR(2, 16), EMU_OR(256, 512), EMU_OR(16, 64), EMU_OR(32, 128), EMU_OR(32, 128), MOE_TYPE_Q8_0,
         MOE_TYPE_Q8_0},
    };
    for (int ci = 0; ci < 3; ci++)
        for (int cls = 0; cls < 3; cls++) {
            int64_t H = cfg[ci][0], R = cfg[ci][1], n_rot = cfg[ci][2], nope = cfg[ci][3], dvw = cfg[ci][4];
            int quant = cfg[ci][5] == MOE_TYPE_Q8_0;
            int64_t W = R + n_rot, dq = nope + n_rot;
            batch b = make_batch(cls);
            layout L = make_layout(16, b.n_seq, b.len);
            moe_kv_view kv = {.block_size = 16, .n_seq = b.n_seq, .block_table = L.bt, .block_off = L.boff,
                              .seq = b.seq, .pos = b.pos, .n_tok = b.n_tok};
            size_t ncache = (size_t)(L.n_blocks * 16) * W;
            float *cache = rand_vec(ncache, -1, 1), *q = rand_vec((size_t)b.n_tok * H * dq, -1, 1);
            wpair kb = make_weight((int)cfg[ci][5], nope, R, H, 0.3f), vb = make_weight((int)cfg[ci][6], R, dvw, H, 0.1f);
            float *dcache = dev(cache, ncache * 4), *dqq = dev(q, (size_t)b.n_tok * H * dq * 4);
            size_t no = (size_t)b.n_tok * H * dvw;
            float *dout = dev(NULL, no * 4), *cout = malloc(no * 4);
            float scale = 1.5f / sqrtf((float)dq);
            ck_assert_int_eq(cpu.ops->mla_attention(cpu.ctx, &kv, q, cache, R, n_rot, nope, &kb.c, &vb.c, scale, cout),
                             MOE_OK);
            poison(dout, no * 4);
            ck_assert_int_eq(
                gpu.ops->mla_attention(gpu.ctx, &kv, dqq, dcache, R, n_rot, nope, &kb.g, &vb.g, scale, dout), MOE_OK);
            float *g = down(dout, no);
            char what[64];
            snprintf(what, sizeof what, "mla H%lld R%lld %s class %d", (long long)H, (long long)R,
                     moe_type_name((int)cfg[ci][5]), cls);
            CHECK_REL(g, cout, no, quant ? 3e-2 : 1e-4, what);
            free(g);
            free(cache);
            free(q);
            free(cout);
            gfree(dcache);
            gfree(dqq);
            gfree(dout);
            free_weight(&kb);
            free_weight(&vb);
            free_layout(&L);
        }
}
END_TEST

/* ---- moe ---- */

START_TEST(moe_routing_and_ffn) {
    /* (E, K, G, Gu, gating, norm, scale*10, n_embd, n_ff) */
    static const int64_t cfg[][9] = {
        {8, 2, 1, 1, MOE_GATING_SOFTMAX, 1, 10, 64, 96},     /* Mixtral-like */
        {16, 4, 4, 2, MOE_GATING_SIGMOID, 1, 25, 64, 32},    /* V3-like, with bias */
        {8, 3, 4, 2, MOE_GATING_SOFTMAX, 0, 25, 64, 32},     /* V2 group-limited greedy */
        {64, 6, 1, 1, MOE_GATING_SOFTMAX, 0, 10, 512, 256},  /* V2-Lite-like */
    };
    static const int types[] = {MOE_TYPE_F32, MOE_TYPE_BF16, MOE_TYPE_Q8_0, MOE_TYPE_Q4_K};
    static const int64_t toks[] = {1, 5, 8, 9, 70};
    for (int ci = 0; ci < EMU_OR(3, 4); ci++)
        for (int ty = 0; ty < 4; ty++) {
            int type = types[ty];
            int64_t E = cfg[ci][0], K = cfg[ci][1], n_embd = cfg[ci][7], n_ff = cfg[ci][8];
            if (type == MOE_TYPE_Q4_K && (n_embd % 256 || n_ff % 256)) continue;
            wpair gate = make_weight(type, n_embd, n_ff, E, 0.2f), up = make_weight(type, n_embd, n_ff, E, 0.2f),
                  dn = make_weight(type, n_ff, n_embd, E, 0.2f);
            for (int ti = 0; ti < 5; ti++) {
                int64_t n_tok = toks[ti];
                float *h = rand_vec((size_t)n_tok * n_embd, -1, 1), *lg = rand_vec((size_t)n_tok * E, -3, 3);
                float *bias = cfg[ci][4] == MOE_GATING_SIGMOID ? rand_vec((size_t)E, -0.15f, 0.15f) : NULL;
                float *dbias = bias ? dev(bias, (size_t)E * 4) : NULL;
                moe_route_params rp = {.gating = (int)cfg[ci][4], .n_expert = E, .n_used = K, .n_group = cfg[ci][2],
                                       .n_group_used = cfg[ci][3], .norm = cfg[ci][5] != 0,
                                       .scale = (float)cfg[ci][6] / 10.0f, .bias = bias};
                size_t no = (size_t)n_tok * n_embd, ne = (size_t)n_tok * K;
                float *cout = malloc(no * 4), *cw = malloc(ne * 4), *gw = malloc(ne * 4);
                int32_t *cid = malloc(ne * 4), *gid = malloc(ne * 4);
                ck_assert_int_eq(cpu.ops->moe(cpu.ctx, h, n_tok, lg, &rp, &gate.c, &up.c, &dn.c, cout, cid, cw), MOE_OK);
                float *dh = dev(h, no * 4), *dlg = dev(lg, (size_t)n_tok * E * 4), *dout = dev(NULL, no * 4);
                poison(dout, no * 4);
                rp.bias = dbias;
                ck_assert_int_eq(gpu.ops->moe(gpu.ctx, dh, n_tok, dlg, &rp, &gate.g, &up.g, &dn.g, dout, gid, gw),
                                 MOE_OK);
                float *g = down(dout, no);
                ck_assert_msg(memcmp(gid, cid, ne * 4) == 0, "moe cfg %d: expert choice differs", ci);
                CHECK_REL(gw, cw, ne, 1e-6, "moe weights");
                char what[64];
                snprintf(what, sizeof what, "moe cfg %d %s n_tok %lld", ci, moe_type_name(type), (long long)n_tok);
                if (getenv("MOE_TEST_VERBOSE")) fprintf(stderr, "%s: vs cpu %.2e\n", what, rel(g, cout, no));
                CHECK_REL(g, cout, no, is_plain(type) ? 1e-4 : 3e-2, what);
                free(g);
                free(cout);
                free(cw);
                free(gw);
                free(cid);
                free(gid);
                free(h);
                free(lg);
                free(bias);
                if (dbias) gfree(dbias);
                gfree(dh);
                gfree(dlg);
                gfree(dout);
            }
            free_weight(&gate);
            free_weight(&up);
            free_weight(&dn);
        }
}
END_TEST

/* Non-finite router logits: the device picks exactly the CPU's experts
 * (NaN ranks as -inf, lowest id on ties), every id in [0, E); before, an
 * all-NaN row gave id -1 and k_permute's atomicAdd hit cnt[-1]. */
START_TEST(moe_nonfinite_routing) {
    /* (E, K, G, Gu, gating) */
    static const int64_t cfg[][5] = {
        {8, 2, 1, 1, MOE_GATING_SOFTMAX},
        {16, 4, 4, 2, MOE_GATING_SIGMOID},
        {8, 3, 4, 2, MOE_GATING_SOFTMAX},
    };
    enum { T = 6, EMB = 32, FF = 32 };
    for (int ci = 0; ci < 3; ci++) {
        int64_t E = cfg[ci][0], K = cfg[ci][1];
        wpair gate = make_weight(MOE_TYPE_F32, EMB, FF, E, 0.2f), up = make_weight(MOE_TYPE_F32, EMB, FF, E, 0.2f),
              dn = make_weight(MOE_TYPE_F32, FF, EMB, E, 0.2f);
        float *h = rand_vec((size_t)T * EMB, -1, 1), *lg = rand_vec((size_t)T * E, -3, 3);
        for (int64_t e = 0; e < E; e++) {
            lg[0 * E + e] = NAN;                           /* all NaN */
            if (e % 3 == 1) lg[1 * E + e] = NAN;           /* some NaN */
            lg[2 * E + e] = e % 2 ? INFINITY : -INFINITY;  /* +-Inf */
            if (e == E - 1) lg[3 * E + e] = INFINITY;      /* one +Inf */
            if (e < E / 2) lg[4 * E + e] = NAN;            /* the first groups NaN */
        }                                                  /* row 5: finite */
        float *bias = cfg[ci][4] == MOE_GATING_SIGMOID ? rand_vec((size_t)E, -0.15f, 0.15f) : NULL;
        if (bias) bias[1] = INFINITY; /* +inf + -inf group sums */
        float *dbias = bias ? dev(bias, (size_t)E * 4) : NULL;
        moe_route_params rp = {.gating = (int)cfg[ci][4], .n_expert = E, .n_used = K, .n_group = cfg[ci][2],
                               .n_group_used = cfg[ci][3], .norm = true, .scale = 1.0f, .bias = bias};
        size_t no = (size_t)T * EMB, ne = (size_t)T * K;
        float *cout = malloc(no * 4), *cw = malloc(ne * 4), *gw = malloc(ne * 4);
        int32_t *cid = malloc(ne * 4), *gid = malloc(ne * 4);
        ck_assert_int_eq(cpu.ops->moe(cpu.ctx, h, T, lg, &rp, &gate.c, &up.c, &dn.c, cout, cid, cw), MOE_OK);
        float *dh = dev(h, no * 4), *dlg = dev(lg, (size_t)T * E * 4), *dout = dev(NULL, no * 4);
        rp.bias = dbias;
        ck_assert_int_eq(gpu.ops->moe(gpu.ctx, dh, T, dlg, &rp, &gate.g, &up.g, &dn.g, dout, gid, gw), MOE_OK);
        for (size_t i = 0; i < ne; i++) {
            ck_assert_msg(cid[i] >= 0 && cid[i] < E && gid[i] >= 0 && gid[i] < E, "cfg %d entry %zu: ids %d %d", ci,
                          i, cid[i], gid[i]);
            ck_assert_msg(gid[i] == cid[i], "cfg %d entry %zu: gpu %d, cpu %d", ci, i, gid[i], cid[i]);
            ck_assert(isnan(gw[i]) == isnan(cw[i]));
        }
        for (int k = 0; k < K; k++) ck_assert_int_eq(cid[k], k); /* all NaN: experts 0 .. K-1 */
        free(cout);
        free(cw);
        free(gw);
        free(cid);
        free(gid);
        free(h);
        free(lg);
        free(bias);
        if (dbias) gfree(dbias);
        gfree(dh);
        gfree(dlg);
        gfree(dout);
        free_weight(&gate);
        free_weight(&up);
        free_weight(&dn);
    }
}
END_TEST

/* ---- sampling ---- */

START_TEST(sample_greedy) {
    if (emulate) {
        test_skip("check_cuda_ops", "sample_greedy needs the device (MOE_CUDA_TEST_EMULATE)");
        return;
    }
    static const int64_t vocab[] = {320, 102400};
    for (int vi = 0; vi < 2; vi++) {
        int64_t V = vocab[vi], R = 5;
        float *l = rand_vec((size_t)(R * V), -10, 10);
        /* row 4: a tie for the maximum, the lower id must win */
        l[4 * V + V / 3] = 20.0f;
        l[4 * V + V / 2] = 20.0f;
        float *dl = dev(l, (size_t)(R * V) * 4);
        moe_cuda_sample_params p[5];
        for (int r = 0; r < R; r++) p[r] = (moe_cuda_sample_params){.temperature = 0, .top_p = 1, .seed = 1};
        int32_t out[5];
        ck_assert_int_eq(moe_cuda_sample(&gpu, dl, R, V, p, out), MOE_OK);
        for (int r = 0; r < R; r++) {
            int64_t b = 0;
            for (int64_t i = 1; i < V; i++)
                if (l[r * V + i] > l[r * V + b]) b = i;
            ck_assert_int_eq(out[r], b);
        }
        ck_assert_int_eq(out[4], V / 3);
        gfree(dl);
        free(l);
    }
}
END_TEST

START_TEST(sample_distribution) {
    if (emulate) {
        test_skip("check_cuda_ops", "sample_distribution needs the device (MOE_CUDA_TEST_EMULATE)");
        return;
    }
    /* 8 tokens; draws over many rows (one seed each) follow softmax(l / T), and
     * top-p keeps exactly the nucleus */
#ifdef MOE_CUDA_EMU
    enum { V = 8, R = 48 }; /* tests/gpu/emu runs each of a block's 1024 threads as a thread */
#else
    enum { V = 8, R = 20000 };
#endif
    static const float base[V] = {2.0f, 1.0f, 0.5f, 0.0f, -0.5f, -1.0f, 1.5f, -3.0f};
    float *l = malloc((size_t)R * V * sizeof(float));
    for (int r = 0; r < R; r++) memcpy(l + r * V, base, sizeof base);
    float *dl = dev(l, (size_t)R * V * 4);
    moe_cuda_sample_params *p = malloc(R * sizeof(*p));
    int32_t *out = malloc(R * sizeof(int32_t)), *out2 = malloc(R * sizeof(int32_t));
    static const float tps[] = {1.0f, 0.7f};
    for (int tp = 0; tp < 2; tp++) {
        float T = 0.8f;
        for (int r = 0; r < R; r++) p[r] = (moe_cuda_sample_params){.temperature = T, .top_p = tps[tp], .seed = 1234};
        ck_assert_int_eq(moe_cuda_sample(&gpu, dl, R, V, p, out), MOE_OK);
        ck_assert_int_eq(moe_cuda_sample(&gpu, dl, R, V, p, out2), MOE_OK);
        ck_assert(memcmp(out, out2, R * sizeof(int32_t)) == 0); /* deterministic */
        double pr[V], z = 0;
        for (int i = 0; i < V; i++) z += pr[i] = exp(base[i] / T);
        for (int i = 0; i < V; i++) pr[i] /= z;
        /* nucleus on the host: most probable first until the mass reaches top_p */
        int keep[V] = {0}, order[V];
        for (int i = 0; i < V; i++) order[i] = i;
        for (int i = 0; i < V; i++)
            for (int j = i + 1; j < V; j++)
                if (pr[order[j]] > pr[order[i]]) {
                    int t = order[i];
                    order[i] = order[j];
                    order[j] = t;
                }
        double mass = 0, kept = 0;
        for (int i = 0; i < V && mass < tps[tp]; i++) keep[order[i]] = 1, mass += pr[order[i]];
        for (int i = 0; i < V; i++) kept += keep[i] ? pr[i] : 0;
        int cnt[V] = {0};
        for (int r = 0; r < R; r++) {
            ck_assert(out[r] >= 0 && out[r] < V);
            cnt[out[r]]++;
        }
        for (int i = 0; i < V; i++) {
            double want = keep[i] ? pr[i] / kept : 0, sd = sqrt(want * (1 - want) / R) + 1e-9;
            double got = (double)cnt[i] / R;
            ck_assert_msg(fabs(got - want) <= 5 * sd + 1e-4, "top_p %.1f token %d: freq %.4f want %.4f", tps[tp], i,
                          got, want);
        }
    }
    free(p);
    free(out);
    free(out2);
    free(l);
    gfree(dl);
}
END_TEST

static Suite *cuda_ops_suite(int have_gpu) {
    Suite *s = suite_create("cuda_ops");
    TCase *tg = tcase_create("gate");
    tcase_add_test(tg, gate_decides);
    suite_add_tcase(s, tg);
    TCase *th = tcase_create("dequant_host");
    tcase_add_test(th, dequant_host_matches_quant_c);
    suite_add_tcase(s, th);
    if (!have_gpu) return s;
    struct {
        const char *name;
        const TTest *t;
        int n; /* loop count, 0 = plain */
    } cases[] = {
        {"embed", embed_bit_exact, 0},           {"get_rows", get_rows_exact, 0},
        {"elementwise", elementwise_ops, 0},     {"rms_norm", rms_norm_shapes, 0},
        {"rope", rope_styles, 0},                {"matmul", matmul_types_shapes, N_TYPES},
        {"matmul_unsupported", matmul_unsupported, 0}, {"attention", attention_gqa, 0},
        {"mla", attention_mla, 0},               {"moe", moe_routing_and_ffn, 0},
        {"moe_nonfinite", moe_nonfinite_routing, 0},
        {"sample_greedy", sample_greedy, 0},     {"sample_distribution", sample_distribution, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        TCase *tc = tcase_create(cases[i].name);
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_set_timeout(tc, 300);
        if (cases[i].n) tcase_add_loop_test(tc, cases[i].t, 0, cases[i].n);
        else tcase_add_test(tc, cases[i].t);
        suite_add_tcase(s, tc);
    }
    return s;
}

int main(void) {
    emulate = getenv("MOE_CUDA_TEST_EMULATE") ? atoi(getenv("MOE_CUDA_TEST_EMULATE")) : 0;
    int have_gpu = emulate;
    if (!emulate) {
        cuda_gate g = cuda_gate_probe();
        if (g.verdict == CUDA_GATE_FAIL) {
            printf("FAIL: check_cuda_ops: a GPU is visible but CUDA cannot use it: %s\n", g.why);
            return 1;
        }
        have_gpu = g.verdict == CUDA_GATE_RUN;
        if (!have_gpu)
            test_skip("check_cuda_ops", "no GPU here: GPU ops untested, only the gate and the kernels' host-side dequantizer run (%s)",
                      g.why);
    }
    SRunner *sr = srunner_create(cuda_ops_suite(have_gpu));
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}

#else /* built without CUDA */

int main(void) {
    test_skip("check_cuda_ops", "built with CUDA=0: GPU ops untested");
    Suite *s = suite_create("cuda_ops");
    TCase *tg = tcase_create("gate");
    tcase_add_test(tg, gate_decides);
    suite_add_tcase(s, tg);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}

#endif
