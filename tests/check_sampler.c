/* check_sampler.c - the sampler against hand-computed cases (greedy ties,
 * bias, penalties, logprobs) and seeded draws against the analytic
 * distribution of each filter (chi-square bounds), on small vocabularies
 * and on a 100k one whose reference top-k / nucleus comes from a full
 * sort done here. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sampler.h"

static moe_sampling greedy(void) {
    moe_sampling s;
    moe_sampling_defaults(&s);
    s.temperature = 0;
    return s;
}

static int32_t pick(int64_t n, const float *l, const moe_sampling *s, const int32_t *prompt, int64_t np,
                    const int32_t *gen, int64_t ng) {
    moe_sampler *sm = moe_sampler_new(n);
    ck_assert_ptr_nonnull(sm);
    moe_rng r;
    moe_rng_seed(&r, 1);
    int32_t id = -1;
    ck_assert_int_eq(moe_sampler_sample(sm, s, &r, l, prompt, np, gen, ng, &id), MOE_OK);
    moe_sampler_free(sm);
    return id;
}

START_TEST(greedy_ties_nonfinite) {
    moe_sampling s = greedy();
    float a[] = {1, 3, 3, 2};
    ck_assert_int_eq(pick(4, a, &s, NULL, 0, NULL, 0), 1);
    float b[] = {-INFINITY, -INFINITY, -INFINITY};
    ck_assert_int_eq(pick(3, b, &s, NULL, 0, NULL, 0), 0);
    float c[] = {NAN, 0.5f, NAN, 0.7f};
    ck_assert_int_eq(pick(4, c, &s, NULL, 0, NULL, 0), 3);
    /* sampling at T > 0 with one finite logit always returns it */
    moe_sampling t;
    moe_sampling_defaults(&t);
    float d[] = {-INFINITY, NAN, 4, -INFINITY};
    for (int i = 0; i < 20; i++) ck_assert_int_eq(pick(4, d, &t, NULL, 0, NULL, 0), 2);
    float e[] = {1, INFINITY, 3, INFINITY};
    for (int i = 0; i < 5; i++) ck_assert_int_eq(pick(4, e, &t, NULL, 0, NULL, 0), 1);
    /* long rows go through the vector paths and their tails */
    for (int n = 1; n < 80; n += 7) {
        float *l = malloc((size_t)n * sizeof(float));
        for (int i = 0; i < n; i++) l[i] = i == n / 2 ? 50.0f : (i % 3 ? -INFINITY : NAN);
        ck_assert_int_eq(pick(n, l, &t, NULL, 0, NULL, 0), n / 2);
        ck_assert_int_eq(pick(n, l, &s, NULL, 0, NULL, 0), n / 2);
        free(l);
    }
}
END_TEST

START_TEST(bias_and_penalties) {
    moe_sampling s = greedy();
    float l[] = {2.0f, -1.0f, 1.5f, 0.5f};
    /* bias: +2 on id 3 -> 2.5 beats 2.0 */
    int32_t bid[] = {3};
    float bv[] = {2.0f};
    s.n_logit_bias = 1, s.logit_bias_ids = bid, s.logit_bias = bv;
    ck_assert_int_eq(pick(4, l, &s, NULL, 0, NULL, 0), 3);
    bid[0] = 4;
    moe_sampler *sm = moe_sampler_new(4);
    int32_t id;
    ck_assert_int_eq(moe_sampler_sample(sm, &s, NULL, l, NULL, 0, NULL, 0, &id), MOE_EINVAL);
    moe_sampler_free(sm);
    s = greedy();
    /* repetition 2 on the prompt's id 0: 2.0 -> 1.0 < 1.5 */
    s.repetition_penalty = 2.0f;
    int32_t p0[] = {0, 0, 0};
    ck_assert_int_eq(pick(4, l, &s, p0, 3, NULL, 0), 2);
    /* ... and on a generated id: the same */
    ck_assert_int_eq(pick(4, l, &s, NULL, 0, p0, 1), 2);
    /* 1.9 -> 0.95 would lose, 1.4 stays; penalty 1.2: 2.0 -> 1.667 still wins */
    s.repetition_penalty = 1.2f;
    ck_assert_int_eq(pick(4, l, &s, p0, 3, NULL, 0), 0);
    /* negative logits are multiplied: -1 -> -2 loses to -1.5 */
    float neg[] = {-1.0f, -1.5f};
    s.repetition_penalty = 2.0f;
    int32_t g0[] = {0};
    ck_assert_int_eq(pick(2, neg, &s, NULL, 0, g0, 1), 1);
    /* presence / frequency count generated tokens only */
    s = greedy();
    float f[] = {3.0f, 2.5f, 0.0f};
    int32_t gg[] = {0, 0};
    s.frequency_penalty = 0.3f; /* 3 - 0.6 = 2.4 < 2.5 */
    ck_assert_int_eq(pick(3, f, &s, NULL, 0, gg, 2), 1);
    s.frequency_penalty = 0.2f; /* 2.6 */
    ck_assert_int_eq(pick(3, f, &s, NULL, 0, gg, 2), 0);
    ck_assert_int_eq(pick(3, f, &s, gg, 2, NULL, 0), 0); /* the prompt does not count */
    s.frequency_penalty = 0;
    s.presence_penalty = 0.6f; /* once: 2.4 */
    ck_assert_int_eq(pick(3, f, &s, NULL, 0, gg, 2), 1);
    s.presence_penalty = 0.4f; /* 2.6 */
    ck_assert_int_eq(pick(3, f, &s, NULL, 0, gg, 2), 0);
    s.presence_penalty = -2.0f; /* a negative penalty favours repeats */
    float f2[] = {1.0f, 2.5f};
    ck_assert_int_eq(pick(2, f2, &s, NULL, 0, gg, 2), 0);
    /* the scratch counts are cleared between calls: the same call twice */
    s = greedy();
    s.frequency_penalty = 0.3f;
    sm = moe_sampler_new(3);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(moe_sampler_sample(sm, &s, NULL, f, NULL, 0, gg, 2, &id), MOE_OK);
        ck_assert_int_eq(id, 1);
    }
    ck_assert_int_eq(moe_sampler_sample(sm, &s, NULL, f, NULL, 0, NULL, 0, &id), MOE_OK);
    ck_assert_int_eq(id, 0);
    moe_sampler_free(sm);
}
END_TEST

/* Draws N tokens and checks the counts against want[] (probabilities,
 * summing to 1): zero-probability tokens must never appear, the rest pass
 * a chi-square bound far in the tail (df + 7 sqrt(2 df)). */
static void check_dist(int64_t n, const float *l, const moe_sampling *s, const double *want, int N, uint64_t seed) {
    moe_sampler *sm = moe_sampler_new(n);
    moe_rng r;
    moe_rng_seed(&r, seed);
    int *cnt = calloc((size_t)n, sizeof(int));
    for (int i = 0; i < N; i++) {
        int32_t id;
        ck_assert_int_eq(moe_sampler_sample(sm, s, &r, l, NULL, 0, NULL, 0, &id), MOE_OK);
        ck_assert(id >= 0 && id < n);
        cnt[id]++;
    }
    double x2 = 0, pool_e = 0;
    int df = -1, pool_o = 0;
    for (int64_t i = 0; i < n; i++) {
        if (want[i] == 0) {
            ck_assert_msg(cnt[i] == 0, "token %lld has probability 0 but was drawn %d times", (long long)i, cnt[i]);
            continue;
        }
        double e = want[i] * N;
        if (e < 5) { /* rare tokens share one bin, as chi-square needs */
            pool_e += e;
            pool_o += cnt[i];
            continue;
        }
        x2 += (cnt[i] - e) * (cnt[i] - e) / e;
        df++;
    }
    if (pool_e > 0) {
        x2 += (pool_o - pool_e) * (pool_o - pool_e) / pool_e;
        df++;
    }
    if (df > 0) ck_assert_msg(x2 < df + 7 * sqrt(2.0 * df), "chi2 %.1f with %d dof", x2, df);
    free(cnt);
    moe_sampler_free(sm);
}

static void softmax_t(const float *l, int n, double t, double *p) {
    double mx = -1e30, z = 0;
    for (int i = 0; i < n; i++) mx = fmax(mx, l[i]);
    for (int i = 0; i < n; i++) z += p[i] = exp((l[i] - mx) / t);
    for (int i = 0; i < n; i++) p[i] /= z;
}

START_TEST(temperature_distribution) {
    float l[8] = {0.3f, -1.2f, 2.0f, 0.9f, 1.4f, -0.4f, 0.0f, 1.1f};
    double p[8];
    moe_sampling s;
    moe_sampling_defaults(&s);
    for (int k = 0; k < 3; k++) {
        double t = k == 0 ? 1.0 : k == 1 ? 0.5 : 1.7;
        s.temperature = (float)t;
        softmax_t(l, 8, t, p);
        check_dist(8, l, &s, p, 40000, 100 + (uint64_t)k);
    }
    /* penalties feed the distribution too: logits 0,0 with id 0 generated
     * once and frequency 1 -> p0 = 1 / (1 + e) */
    float z2[2] = {0, 0};
    moe_sampler *sm = moe_sampler_new(2);
    moe_rng r;
    moe_rng_seed(&r, 5);
    s.temperature = 1;
    s.frequency_penalty = 1;
    int32_t g[1] = {0}, id;
    int c0 = 0, N = 40000;
    for (int i = 0; i < N; i++) {
        moe_sampler_sample(sm, &s, &r, z2, NULL, 0, g, 1, &id);
        c0 += id == 0;
    }
    double p0 = 1 / (1 + exp(1.0)), sd = sqrt(N * p0 * (1 - p0));
    ck_assert_double_le(fabs(c0 - N * p0), 5 * sd);
    moe_sampler_free(sm);
}
END_TEST

START_TEST(filters) {
    /* probabilities 0.4 0.3 0.2 0.1 as logits at T = 1 */
    float l[4] = {logf(0.4f), logf(0.3f), logf(0.2f), logf(0.1f)};
    moe_sampling s;
    moe_sampling_defaults(&s);
    int N = 30000;
    s.top_k = 2;
    check_dist(4, l, &s, (double[]){4 / 7.0, 3 / 7.0, 0, 0}, N, 1);
    s.top_k = 0;
    s.top_p = 0.65f; /* 0.4 < 0.65 <= 0.7 */
    check_dist(4, l, &s, (double[]){4 / 7.0, 3 / 7.0, 0, 0}, N, 2);
    s.top_p = 0.85f;
    check_dist(4, l, &s, (double[]){4 / 9.0, 3 / 9.0, 2 / 9.0, 0}, N, 3);
    s.top_p = 0.3f; /* the best alone reaches it */
    check_dist(4, l, &s, (double[]){1, 0, 0, 0}, 200, 4);
    s.top_p = 1;
    s.min_p = 0.6f; /* keeps p >= 0.24 */
    check_dist(4, l, &s, (double[]){4 / 7.0, 3 / 7.0, 0, 0}, N, 5);
    s.min_p = 0.4f; /* keeps p >= 0.16 */
    check_dist(4, l, &s, (double[]){4 / 9.0, 3 / 9.0, 2 / 9.0, 0}, N, 6);
    /* order: top_p sees the distribution renormalised after top_k:
     * top_k 3 -> 4/9 3/9 2/9; top_p 0.75 -> 4/9 < 0.75 <= 7/9: {0, 1}
     * (on the full distribution it would keep three) */
    s.min_p = 0;
    s.top_k = 3;
    s.top_p = 0.75f;
    check_dist(4, l, &s, (double[]){4 / 7.0, 3 / 7.0, 0, 0}, N, 7);
    /* min_p after both: relative to the best, 0.3/0.4 = 0.75 < 0.8 */
    s.min_p = 0.8f;
    check_dist(4, l, &s, (double[]){1, 0, 0, 0}, 200, 8);
    /* top_k boundary ties go to the lower ids */
    float t[5] = {1, 2, 2, 2, 0};
    moe_sampling_defaults(&s);
    s.top_k = 2;
    check_dist(5, t, &s, (double[]){0, 0.5, 0.5, 0, 0}, 20000, 9);
    /* temperature before the filters: at T = 0.5 the probabilities are
     * 16:9:4:1 /30, so top_p 0.6 keeps {0, 1} (16/30 < 0.6 <= 25/30) */
    moe_sampling_defaults(&s);
    s.temperature = 0.5f;
    s.top_p = 0.6f;
    check_dist(4, l, &s, (double[]){16 / 25.0, 9 / 25.0, 0, 0}, N, 10);
}
END_TEST

static const float *g_v;
static int by_logit(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (g_v[x] != g_v[y]) return g_v[x] > g_v[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A 100k vocabulary: the reference top-k set and nucleus come from a full
 * sort here; draws must stay inside them with the right frequencies. */
START_TEST(large_vocab) {
    enum { NV = 102400 };
    float *l = malloc(NV * sizeof(float));
    moe_rng r;
    moe_rng_seed(&r, 77);
    for (int i = 0; i < NV; i++) {
        /* a Gaussian-ish spread (sum of uniforms) with a few strong tokens */
        double u = moe_rng_uniform(&r) + moe_rng_uniform(&r) + moe_rng_uniform(&r) - 1.5;
        l[i] = (float)(3.0 * u);
    }
    for (int i = 0; i < 30; i++) l[(i * 7919) % NV] = 12.0f - 0.2f * (float)i;
    int32_t *ord = malloc(NV * sizeof(int32_t));
    for (int i = 0; i < NV; i++) ord[i] = i;
    g_v = l;
    qsort(ord, NV, sizeof(int32_t), by_logit);
    double *p = malloc(NV * sizeof(double)), *want = calloc(NV, sizeof(double));
    softmax_t(l, NV, 1.0, p);
    moe_sampling s;
    moe_sampling_defaults(&s);
    /* top_k 40 */
    s.top_k = 40;
    double z = 0;
    for (int i = 0; i < 40; i++) z += p[ord[i]];
    for (int i = 0; i < 40; i++) want[ord[i]] = p[ord[i]] / z;
    check_dist(NV, l, &s, want, 2000, 11);
    /* top_k 1000 takes the histogram path (more than the heap's 256) */
    memset(want, 0, NV * sizeof(double));
    s.top_k = 1000;
    z = 0;
    for (int i = 0; i < 1000; i++) z += p[ord[i]];
    for (int i = 0; i < 1000; i++) want[ord[i]] = p[ord[i]] / z;
    check_dist(NV, l, &s, want, 2000, 13);
    /* ... and then top_p over those 1000 (histogram again): 0.5 of their mass */
    memset(want, 0, NV * sizeof(double));
    s.top_p = 0.5f;
    double acc2 = 0;
    int k2 = 0;
    while (acc2 < 0.5 * z) acc2 += p[ord[k2++]];
    for (int i = 0; i < k2; i++) want[ord[i]] = p[ord[i]] / acc2;
    check_dist(NV, l, &s, want, 2000, 14);
    /* top_p 0.9: the smallest best-first prefix reaching 0.9 */
    memset(want, 0, NV * sizeof(double));
    s.top_k = 0;
    s.top_p = 0.9f;
    double acc = 0;
    int k = 0;
    while (acc < 0.9 && k < NV) acc += p[ord[k++]];
    ck_assert_int_gt(k, 64); /* the nucleus is wider than the first partial sort */
    for (int i = 0; i < k; i++) want[ord[i]] = p[ord[i]] / acc;
    check_dist(NV, l, &s, want, 2000, 12);

    /* cost per token (printed; the bound is loose for busy machines) */
    moe_sampler *sm = moe_sampler_new(NV);
    int32_t id;
    const int reps = 50;
    double t0 = now_s();
    moe_sampling_defaults(&s);
    for (int i = 0; i < reps; i++) moe_sampler_sample(sm, &s, &r, l, NULL, 0, NULL, 0, &id);
    double t1 = now_s();
    s.top_p = 0.95f;
    s.top_k = 50;
    for (int i = 0; i < reps; i++) moe_sampler_sample(sm, &s, &r, l, NULL, 0, NULL, 0, &id);
    double t2 = now_s();
    s.top_k = 0;
    for (int i = 0; i < reps; i++) moe_sampler_sample(sm, &s, &r, l, NULL, 0, NULL, 0, &id);
    double t3 = now_s();
    moe_logprob top[20];
    float lp;
    for (int i = 0; i < reps; i++) moe_sampler_logprobs(sm, l, 5, 20, &lp, top);
    double t4 = now_s();
    fprintf(stderr, "sampler, %d vocab: plain %.0f us, top_k 50 + top_p .95 %.0f us, top_p .95 %.0f us, logprobs+top20 %.0f us\n",
            NV, (t1 - t0) / reps * 1e6, (t2 - t1) / reps * 1e6, (t3 - t2) / reps * 1e6, (t4 - t3) / reps * 1e6);
    ck_assert_double_lt((t3 - t0) / reps / 3, 0.02);
    /* logprobs top 20 = the sort's first 20 */
    for (int i = 0; i < 20; i++) {
        ck_assert_int_eq(top[i].id, ord[i]);
        ck_assert_double_eq_tol(top[i].logprob, log(p[ord[i]]), 1e-4);
    }
    moe_sampler_free(sm);
    free(l);
    free(ord);
    free(p);
    free(want);
}
END_TEST

START_TEST(seeds) {
    float l[16];
    for (int i = 0; i < 16; i++) l[i] = (float)((i * 37) % 11) * 0.3f;
    moe_sampler *sm = moe_sampler_new(16);
    moe_sampling s;
    moe_sampling_defaults(&s);
    int32_t a[200], b[200], c[200];
    moe_rng r1, r2, r3;
    moe_rng_seed(&r1, 1234);
    moe_rng_seed(&r2, 1234);
    moe_rng_seed(&r3, 1235);
    for (int i = 0; i < 200; i++) {
        moe_sampler_sample(sm, &s, &r1, l, NULL, 0, NULL, 0, &a[i]);
        moe_sampler_sample(sm, &s, &r2, l, NULL, 0, NULL, 0, &b[i]);
        moe_sampler_sample(sm, &s, &r3, l, NULL, 0, NULL, 0, &c[i]);
    }
    ck_assert(!memcmp(a, b, sizeof a));
    ck_assert(memcmp(a, c, sizeof a));
    /* the generator itself: splitmix-seeded xoshiro256**, first output
     * for seed 0 (computed by hand from the published algorithms) */
    moe_rng z;
    moe_rng_seed(&z, 0);
    ck_assert_uint_eq(z.s[0], 0xe220a8397b1dcdafull); /* splitmix64(0) first output */
    double sum = 0;
    for (int i = 0; i < 100000; i++) {
        double u = moe_rng_uniform(&z);
        ck_assert(u >= 0 && u < 1);
        sum += u;
    }
    ck_assert_double_le(fabs(sum / 100000 - 0.5), 0.005);
    ck_assert_uint_ne(moe_rng_os_seed(), moe_rng_os_seed());
    moe_sampler_free(sm);
}
END_TEST

START_TEST(logprobs_hand) {
    float l[4] = {1, 2, 3, 3};
    moe_sampler *sm = moe_sampler_new(4);
    float lp;
    moe_logprob top[4];
    ck_assert_int_eq(moe_sampler_logprobs(sm, l, 2, 3, &lp, top), MOE_OK);
    double lse = log(exp(1) + exp(2) + 2 * exp(3));
    ck_assert_double_eq_tol(lp, 3 - lse, 1e-6);
    ck_assert_int_eq(top[0].id, 2);
    ck_assert_int_eq(top[1].id, 3);
    ck_assert_int_eq(top[2].id, 1);
    ck_assert_double_eq_tol(top[2].logprob, 2 - lse, 1e-6);
    ck_assert_int_eq(moe_sampler_logprobs(sm, l, 0, 4, &lp, top), MOE_OK);
    ck_assert_int_eq(top[3].id, 0);
    ck_assert_double_eq_tol(lp, 1 - lse, 1e-6);
    ck_assert_int_eq(moe_sampler_logprobs(sm, l, 4, 0, &lp, NULL), MOE_EINVAL);
    ck_assert_int_eq(moe_sampler_logprobs(sm, l, 0, 5, &lp, top), MOE_EINVAL);
    moe_sampler_free(sm);
    ck_assert_ptr_null(moe_sampler_new(0));
}
END_TEST

int main(void) {
    Suite *s = suite_create("sampler");
    TCase *th = tcase_create("hand");
    tcase_add_test(th, greedy_ties_nonfinite);
    tcase_add_test(th, bias_and_penalties);
    tcase_add_test(th, logprobs_hand);
    tcase_add_test(th, seeds);
    suite_add_tcase(s, th);
    TCase *td = tcase_create("distribution");
    tcase_set_timeout(td, 60);
    tcase_add_test(td, temperature_distribution);
    tcase_add_test(td, filters);
    tcase_add_test(td, large_vocab);
    suite_add_tcase(s, td);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
