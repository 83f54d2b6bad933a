/* tool_matbench - memory bandwidth vs. matrix-vector rate of cpu_matmul.
 *
 *   tool_matbench [--threads N] [--mem MIB] [--iters N] [--tok N] [--types q8_0,q4_0,bf16,...]
 *
 * 1. Read bandwidth: N threads sum a MIB-sized buffer (default 1024) of
 *    uint64 words; best of --iters passes.
 * 2. Matvec: y = W x at n_tok = 1 (or --tok N rows, as a batched decode) for each type on a 4096x4096 and an
 *    expert-shaped 2048->1408 weight. Enough copies of W are cycled that
 *    their total exceeds 512 MiB, so the weights come from DRAM, not the
 *    32 MiB L3, as they would in a real model. Prints GB/s of weight bytes
 *    read per second and the ratio to the measured bandwidth.
 * Exit status 0; numbers are informative, nothing is asserted.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu_matmul.h"
#include "quant.h"
#include "status.h"
#include "threadpool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    const uint64_t *buf;
    int64_t words, chunk;
    uint64_t sums[64 * 8]; /* one cache line per task slot */
} bw_job;

#if defined(__x86_64__)
__attribute__((target("avx2"))) static uint64_t sum_avx2(const uint64_t *p, int64_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i *)(p + i)));
        a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i *)(p + i + 4)));
        a2 = _mm256_add_epi64(a2, _mm256_loadu_si256((const __m256i *)(p + i + 8)));
        a3 = _mm256_add_epi64(a3, _mm256_loadu_si256((const __m256i *)(p + i + 12)));
    }
    a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    uint64_t t[4];
    _mm256_storeu_si256((__m256i *)t, a0);
    uint64_t s = t[0] + t[1] + t[2] + t[3];
    for (; i < n; i++)
        s += p[i];
    return s;
}
#endif

static uint64_t sum_words(const uint64_t *p, int64_t n) {
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2"))
        return sum_avx2(p, n);
#endif
    uint64_t s0 = 0, s1 = 0;
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
        s0 += p[i];
        s1 += p[i + 1];
    }
    return s0 + s1 + (i < n ? p[i] : 0);
}

static void bw_task(void *ctx, int64_t t, int thread) {
    bw_job *j = ctx;
    int64_t a = t * j->chunk, b = a + j->chunk < j->words ? a + j->chunk : j->words;
    j->sums[8 * (t % 64)] += sum_words(j->buf + a, b - a);
    (void)thread;
}

static double measure_bandwidth(cpu_pool *pool, size_t bytes, int iters) {
    uint64_t *buf = malloc(bytes);
    if (!buf)
        return 0;
    for (size_t i = 0; i < bytes / 8; i++)
        buf[i] = i * 2654435761u;
    bw_job j;
    memset(&j, 0, sizeof j);
    j.buf = buf;
    j.words = (int64_t)(bytes / 8);
    int n_tasks = cpu_pool_size(pool) * 4; /* 4 large static-ish chunks per thread */
    j.chunk = (j.words + n_tasks - 1) / n_tasks;
    double best = 1e30;
    for (int it = 0; it < iters; it++) {
        double t0 = now();
        cpu_pool_run(pool, bw_task, &j, n_tasks);
        double dt = now() - t0;
        best = dt < best ? dt : best;
    }
    uint64_t s = 0;
    for (int i = 0; i < 64; i++)
        s += j.sums[8 * i];
    free(buf);
    if (s == 42)
        printf("(checksum %llu)\n", (unsigned long long)s); /* keeps the sums live */
    return (double)bytes / best / 1e9;
}

static void fill_weights(int type, uint8_t *w, int64_t n_in, int64_t n_out) {
    /* Quantize 16 distinct random rows and repeat them: realistic blocks
     * without paying for quantizing every row. */
    size_t rs = moe_row_size(type, n_in);
    float *row = malloc(sizeof(float) * n_in);
    uint64_t r = 12345;
    for (int64_t o = 0; o < n_out; o++) {
        if (o < 16) {
            for (int64_t i = 0; i < n_in; i++) {
                r = r * 6364136223846793005ull + 1442695040888963407ull;
                row[i] = (float)((int64_t)(r >> 33) - (1ll << 30)) / (float)(1ll << 30);
            }
            moe_quantize_row(type, row, w + rs * o, n_in);
        } else {
            memcpy(w + rs * o, w + rs * (o % 16), rs);
        }
    }
    free(row);
}

static void bench_matvec(cpu_pool *pool, int type, int64_t n_in, int64_t n_out, int iters, double bw, int n_tok) {
    size_t bytes = moe_row_size(type, n_in) * (size_t)n_out;
    int copies = (int)((512ull << 20) / bytes) + 1;
    uint8_t *w = malloc(bytes * copies);
    float *x = malloc(sizeof(float) * n_in * n_tok), *y = malloc(sizeof(float) * n_out * n_tok);
    if (!w || !x || !y) {
        printf("%-5s %5lldx%-5lld  out of memory\n", moe_type_name(type), (long long)n_in, (long long)n_out);
        goto out;
    }
    fill_weights(type, w, n_in, n_out);
    for (int c = 1; c < copies; c++)
        memcpy(w + bytes * c, w, bytes);
    for (int64_t i = 0; i < n_in * n_tok; i++)
        x[i] = (float)((i * 37) % 101) / 50.0f - 1.0f;
    int n_calls = iters * copies;
    if (n_calls < 2 * copies)
        n_calls = 2 * copies;
    cpu_matmul(pool, type, w, n_in, n_out, x, n_tok, y); /* warm-up */
    double t0 = now();
    for (int c = 0; c < n_calls; c++) {
        int rc = cpu_matmul(pool, type, w + bytes * (c % copies), n_in, n_out, x, n_tok, y);
        if (rc != MOE_OK) {
            printf("cpu_matmul: %s\n", moe_strerror(rc));
            goto out;
        }
    }
    double dt = (now() - t0) / n_calls;
    double gbs = (double)bytes / dt / 1e9;
    printf("%-5s %5lld x %-5lld x %2d tok  %7.2f MB  %8.1f us/matvec  %6.2f GB/s  %5.0f %% of bandwidth\n",
           moe_type_name(type), (long long)n_out, (long long)n_in, n_tok, (double)bytes / 1e6, dt * 1e6, gbs,
           100.0 * gbs / bw);
out:
    free(w);
    free(x);
    free(y);
}

int main(int argc, char **argv) {
    int threads = 0, iters = 3, n_tok = 1;
    size_t mem_mib = 1024;
    const char *types = "q8_0,q4_0,bf16,f16,q4_k,q5_k,q6_k";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--mem") && i + 1 < argc)
            mem_mib = (size_t)atol(argv[++i]);
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc)
            iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tok") && i + 1 < argc)
            n_tok = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--types") && i + 1 < argc)
            types = argv[++i];
        else {
            fprintf(stderr, "usage: %s [--threads N] [--mem MIB] [--iters N] [--tok N] [--types a,b]\n", argv[0]);
            return 2;
        }
    }
    int st;
    cpu_pool *pool = cpu_pool_create(threads, &st);
    if (!pool) {
        fprintf(stderr, "cpu_pool_create: %s\n", moe_strerror(st));
        return 1;
    }
    printf("threads %d, isa %s\n", cpu_pool_size(pool), cpu_isa_name(cpu_isa_get()));
    double bw = measure_bandwidth(pool, mem_mib << 20, iters + 2);
    printf("read bandwidth: %.2f GB/s (sum over %zu MiB)\n", bw, mem_mib);
    static const int64_t shapes[][2] = {{4096, 4096}, {2048, 1408}};
    char list[256];
    snprintf(list, sizeof list, "%s", types);
    for (size_t s = 0; s < 2; s++) {
        char tmp[256];
        memcpy(tmp, list, sizeof tmp);
        for (char *save = NULL, *tok = strtok_r(tmp, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            moe_type t;
            if (moe_type_from_name(tok, &t) != MOE_OK || !cpu_matmul_supported(t)) {
                printf("skipping %s\n", tok);
                continue;
            }
            bench_matvec(pool, t, shapes[s][0], shapes[s][1], iters, bw, n_tok < 1 ? 1 : n_tok);
        }
    }
    cpu_pool_destroy(pool);
    return 0;
}
