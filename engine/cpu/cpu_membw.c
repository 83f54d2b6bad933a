/* cpu_membw.c - see cpu_membw.h. */
#include "cpu_membw.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "status.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

typedef struct {
    const uint64_t *buf;
    int64_t words, chunk;
    uint64_t sums[64 * 8]; /* one cache line per task slot, so threads do not share lines */
} bw_job;

#if defined(__x86_64__) && defined(__GNUC__)
/* Four independent vector sums keep enough loads in flight to saturate the
 * memory; the adds cost nothing next to the loads. */
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
    for (; i < n; i++) s += p[i];
    return s;
}
#endif

static uint64_t sum_words(const uint64_t *p, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2")) return sum_avx2(p, n);
#endif
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += p[i];
        s1 += p[i + 1];
        s2 += p[i + 2];
        s3 += p[i + 3];
    }
    for (; i < n; i++) s0 += p[i];
    return s0 + s1 + s2 + s3;
}

static void bw_task(void *ctx, int64_t t, int thread) {
    (void)thread;
    bw_job *j = ctx;
    int64_t a = t * j->chunk, b = a + j->chunk < j->words ? a + j->chunk : j->words;
    if (a < b) j->sums[8 * (t % 64)] += sum_words(j->buf + a, b - a);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double cpu_mem_read_bw_buf(cpu_pool *pool, const void *buf, size_t bytes, int passes) {
    if (!buf || bytes < ((size_t)1 << 20) || passes < 1) return MOE_EINVAL;
    bw_job *j = calloc(1, sizeof *j);
    if (!j) return MOE_ENOMEM;
    j->buf = buf;
    j->words = (int64_t)(bytes / 8);
    int64_t n_tasks = (int64_t)cpu_pool_size(pool) * 4; /* a few large chunks per thread */
    j->chunk = (j->words + n_tasks - 1) / n_tasks;
    double best = 0;
    for (int it = 0; it <= passes; it++) {
        double t0 = now_s();
        cpu_pool_run(pool, bw_task, j, n_tasks);
        double dt = now_s() - t0;
        if (it > 0 && dt > 0 && (best == 0 || dt < best)) best = dt; /* pass 0 only warms up */
    }
    uint64_t s = 0;
    for (int i = 0; i < 64; i++) s += j->sums[8 * i];
    /* keep the sums observable so the loads are not optimised away */
    volatile uint64_t sink = s;
    (void)sink;
    double nbytes = (double)j->words * 8.0;
    free(j);
    return best > 0 ? nbytes / best : MOE_EINVAL;
}

double cpu_mem_read_bw(cpu_pool *pool, size_t bytes, int passes) {
    if (bytes < ((size_t)1 << 20) || passes < 1) return MOE_EINVAL;
    uint64_t *buf = malloc(bytes);
    if (!buf) return MOE_ENOMEM;
    /* distinct non-zero words: a zero page could be shared by the kernel */
    for (size_t i = 0; i < bytes / 8; i++) buf[i] = i * 2654435761u + 1;
    double bw = cpu_mem_read_bw_buf(pool, buf, bytes, passes);
    free(buf);
    return bw;
}
