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
#include "cpu_membw.h"
#include "quant.h"
#include "status.h"
#include "threadpool.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The same measurement moed bench makes (engine/cpu/cpu_membw.c), in GB/s;
 * 0 when it cannot measure. */
static double measure_bandwidth(cpu_pool *pool, size_t bytes, int iters) {
    double bw = cpu_mem_read_bw(pool, bytes, iters);
    return bw > 0 ? bw / 1e9 : 0;
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
