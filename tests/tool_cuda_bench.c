/* tool_cuda_bench.c - times the CUDA backend's hot ops on decode- and
 * prefill-shaped inputs and prints achieved bandwidth / arithmetic rate
 * next to what the H200 can do (tests/gpu/run.sh runs it; numbers come
 * from this one run).
 *
 * Weights are random bytes (a valid encoding for every block type as far
 * as timing goes; the values are never checked here). Each case: 3 warm-up
 * calls, then the median of 15 timed calls, each closed by a 4-byte
 * download (which synchronizes the backend's stream), so a call's time
 * includes its launch overhead. Built with CUDA=0 it only says so.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "qblocks.h"

#ifdef MOE_HAVE_CUDA
#include "cuda_backend.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static uint64_t s = 88172645463325252ull;
static void fill(void *p, size_t n) {
    uint8_t *b = p;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        b[i] = (uint8_t)(s >> 32);
    }
}

static void fill_f32(float *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        p[i] = (float)((s >> 40) & 0xFFFF) / 65536.0f - 0.5f;
    }
}

static moe_backend be;
static float sync_buf;

#define TIME(label, expr, bytes, flops)                                                                           \
    do {                                                                                                          \
        double t_[15];                                                                                            \
        int rc_ = 0;                                                                                              \
        for (int r_ = 0; r_ < 18 && !rc_; r_++) {                                                                 \
            double t0_ = now();                                                                                   \
            rc_ = (expr);                                                                                         \
            if (!rc_) rc_ = be.ops->download(be.ctx, &sync_buf, ysync, sizeof(float));                            \
            if (r_ >= 3) t_[r_ - 3] = now() - t0_;                                                                \
        }                                                                                                         \
        if (rc_) {                                                                                                \
            printf("%-44s failed: %s\n", label, moe_strerror(rc_));                                               \
            break;                                                                                                \
        }                                                                                                         \
        qsort(t_, 15, sizeof(double), cmp_d);                                                                     \
        double m_ = t_[7];                                                                                        \
        printf("%-44s %9.1f us  %7.0f GB/s  %7.1f TFLOP/s\n", label, m_ * 1e6, (double)(bytes) / m_ / 1e9,       \
               (double)(flops) / m_ / 1e12);                                                                      \
    } while (0)

int main(void) {
    if (cuda_device_count() <= 0) {
        printf("SKIP: no CUDA device\n");
        return 0;
    }
    int rc = moe_cuda_backend_init(&be, NULL);
    if (rc) {
        printf("cuda backend: %s\n", moe_strerror(rc));
        return 1;
    }
    printf("%-44s %12s  %12s  %15s\n", "case", "median", "weights+kv", "rate");
    /* matmul: a 4096 -> 14336 projection (Llama/Mixtral FFN shape) */
    static const int types[] = {MOE_TYPE_F32, MOE_TYPE_BF16, MOE_TYPE_Q8_0, MOE_TYPE_Q4_K, MOE_TYPE_Q6_K};
    static const int64_t toks[] = {1, 8, 512};
    int64_t n_in = 4096, n_out = 14336;
    float *x = malloc((size_t)512 * n_in * sizeof(float));
    fill_f32(x, (size_t)512 * n_in);
    float *dx = be.ops->alloc(be.ctx, (size_t)512 * n_in * sizeof(float));
    float *dy = be.ops->alloc(be.ctx, (size_t)512 * n_out * sizeof(float));
    float *ysync = dy;
    be.ops->upload(be.ctx, dx, x, (size_t)512 * n_in * sizeof(float));
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
        size_t nb = moe_row_size(types[ti], n_in) * (size_t)n_out;
        void *h = malloc(nb);
        fill(h, nb);
        if (types[ti] == MOE_TYPE_F32 || types[ti] == MOE_TYPE_BF16) fill_f32(h, nb / 4); /* finite values */
        const void *w = NULL;
        if (be.ops->bind_weight(be.ctx, h, nb, &w)) {
            printf("bind %s failed\n", moe_type_name(types[ti]));
            free(h);
            continue;
        }
        moe_weight mw = {.type = types[ti], .data = w, .n_in = n_in, .n_out = n_out, .n_mat = 1};
        for (size_t k = 0; k < sizeof toks / sizeof toks[0]; k++) {
            char label[64];
            snprintf(label, sizeof label, "matmul %-5s 4096x14336 n_tok %lld", moe_type_name(types[ti]),
                     (long long)toks[k]);
            TIME(label, be.ops->matmul(be.ctx, &mw, dx, toks[k], NULL, dy), nb,
                 2.0 * (double)n_in * (double)n_out * (double)toks[k]);
        }
        be.ops->unbind_weight(be.ctx, w);
        free(h);
    }
    /* decode attention: 8 sequences x 4096 positions, 32 heads / 8 kv heads x 128 */
    {
        int64_t B = 8, L = 4096, H = 32, Hkv = 8, D = 128, bs = 16, nblk = B * L / bs;
        size_t ncache = (size_t)(nblk * bs * Hkv * D);
        float *kc = be.ops->alloc(be.ctx, ncache * 4), *vc = be.ops->alloc(be.ctx, ncache * 4);
        float *q = be.ops->alloc(be.ctx, (size_t)(B * H * D) * 4), *o = be.ops->alloc(be.ctx, (size_t)(B * H * D) * 4);
        float *hc = malloc(ncache * 4); /* never time on zeros */
        fill_f32(hc, ncache);
        be.ops->upload(be.ctx, kc, hc, ncache * 4);
        fill_f32(hc, ncache);
        be.ops->upload(be.ctx, vc, hc, ncache * 4);
        fill_f32(hc, (size_t)(B * H * D));
        be.ops->upload(be.ctx, q, hc, (size_t)(B * H * D) * 4);
        free(hc);
        int32_t *bt = malloc((size_t)nblk * 4), seq[8], pos[8];
        int64_t off[9];
        for (int64_t i = 0; i < nblk; i++) bt[i] = (int32_t)i;
        for (int b = 0; b <= B; b++) off[b] = b * (L / bs);
        for (int b = 0; b < B; b++) seq[b] = b, pos[b] = (int32_t)(L - 1);
        moe_kv_view kv = {.block_size = bs, .n_seq = B, .block_table = bt, .block_off = off, .seq = seq, .pos = pos,
                          .n_tok = B};
        size_t bytes = 2 * ncache * 4;
        TIME("attention decode 8 x 4096 pos, 32/8 x 128",
             be.ops->attention(be.ctx, &kv, q, kc, vc, H, Hkv, D, 0.088f, o), bytes, 4.0 * B * H * L * D);
        be.ops->free(be.ctx, kc);
        be.ops->free(be.ctx, vc);
        be.ops->free(be.ctx, q);
        be.ops->free(be.ctx, o);
        free(bt);
    }
    be.ops->free(be.ctx, dx);
    be.ops->free(be.ctx, dy);
    free(x);
    moe_backend_destroy(&be);
    printf("(H200 ceilings seen here: ~4.3 TB/s device copy, ~790 TFLOP/s bf16 cuBLAS; f32 SIMT ~60 TFLOP/s)\n");
    return 0;
}

#else

int main(void) {
    printf("SKIP: no CUDA device (built with CUDA=0)\n");
    return 0;
}

#endif
