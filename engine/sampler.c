/* sampler.c - logits processing and the draw; see sampler.h. */
#include "sampler.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* filter histogram: see bucket_of() */
#define HIST_SHIFT 17
#define HIST_N ((0x3F800000u >> HIST_SHIFT) + 1)

struct moe_sampler {
    int64_t n;
    float *l;        /* (n) working logits */
    int32_t *idx;    /* (n) candidate ids; a best-first sorted prefix grows in place */
    int32_t *cnt;    /* (n) generated-token counts; all zero between calls */
    uint8_t *mark;   /* (n) repetition-penalty applied; all zero between calls */
    int32_t *touch;  /* (n) ids whose cnt/mark must be cleared */
    int64_t *hcnt;   /* (HIST_N) filter histogram: tokens per bucket */
    double *hmass;   /* (HIST_N) and their weight */
};

moe_sampler *moe_sampler_new(int64_t n_vocab) {
    if (n_vocab <= 0 || n_vocab > INT32_MAX) return NULL;
    moe_sampler *sm = calloc(1, sizeof(*sm));
    if (!sm) return NULL;
    size_t n = (size_t)n_vocab;
    sm->n = n_vocab;
    sm->l = malloc(n * sizeof(float));
    sm->idx = malloc(n * sizeof(int32_t));
    sm->cnt = calloc(n, sizeof(int32_t));
    sm->mark = calloc(n, 1);
    sm->touch = malloc(n * sizeof(int32_t));
    sm->hcnt = malloc(HIST_N * sizeof(int64_t));
    sm->hmass = malloc(HIST_N * sizeof(double));
    if (!sm->l || !sm->idx || !sm->cnt || !sm->mark || !sm->touch || !sm->hcnt || !sm->hmass) {
        moe_sampler_free(sm);
        return NULL;
    }
    return sm;
}

void moe_sampler_free(moe_sampler *sm) {
    if (!sm) return;
    free(sm->l);
    free(sm->idx);
    free(sm->cnt);
    free(sm->mark);
    free(sm->touch);
    free(sm->hcnt);
    free(sm->hmass);
    free(sm);
}

/* exp(x) for x <= 0, four lanes at a time (GCC/Clang vector extensions:
 * SSE2 on any x86-64, NEON on arm64, no -march needed): Cephes' expf
 * polynomial after a round-to-nearest range reduction, relative error
 * < 2e-7. NaN and x < -87 (below FLT_MIN) give 0. libm's expf per token
 * was most of a 100k-vocabulary draw. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

static inline v4f exp_neg4(v4f x) {
    const v4f lo = {-87.0f, -87.0f, -87.0f, -87.0f};
    v4i ok = x >= lo; /* all ones where x >= -87; NaN compares false */
    v4f xc = (v4f)((ok & (v4i)x) | (~ok & (v4i)lo));
    v4f r = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* nearest integer (1.5 * 2^23) */
    v4i k = __builtin_convertvector(r, v4i);
    v4f f = xc - r * 0.693359375f;
    f = f - r * -2.12194440e-4f;
    v4f y = ((((1.9875691500e-4f * f + 1.3981999507e-3f) * f + 8.3334519073e-3f) * f + 4.1665795894e-2f) * f +
             1.6666665459e-1f) * f + 5.0000001201e-1f;
    y = y * f * f + f + 1.0f;
    v4f p2 = (v4f)((k + 127) << 23);
    return (v4f)(ok & (v4i)(y * p2));
}

static inline float exp_neg(float x) {
    v4f v = {x, x, x, x};
    return exp_neg4(v)[0];
}

/* Sum of exp((v[i] - mx) * inv_t) over i < n (every v[i] <= mx), also
 * stored to w[i] when w is not NULL (w may be v). Four vectors of partial
 * sums, flushed to a double every 1024 values to keep rounding small. */
static double exp_sum(const float *v, float *w, int64_t n, float mx, float inv_t) {
    double z = 0;
    int64_t i = 0;
    v4f m = {mx, mx, mx, mx};
    while (i + 16 <= n) {
        v4f acc[4] = {{0}};
        for (int64_t end = i + 1024 < n ? i + 1024 : n; i + 16 <= end; i += 16)
            for (int j = 0; j < 4; j++) {
                v4f x;
                memcpy(&x, v + i + 4 * j, sizeof x);
                v4f e = exp_neg4((x - m) * inv_t);
                if (w) memcpy(w + i + 4 * j, &e, sizeof e);
                acc[j] += e;
            }
        v4f t = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        z += (double)t[0] + (double)t[1] + (double)t[2] + (double)t[3];
    }
    for (; i < n; i++) {
        float e = exp_neg((v[i] - mx) * inv_t);
        if (w) w[i] = e;
        z += e;
    }
    return z;
}

/* The maximum of v[0..n), NaN ignored (-inf when nothing else). */
static float row_max(const float *v, int64_t n) {
    v4f m = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}, m2 = m;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v4f x, y;
        memcpy(&x, v + i, sizeof x);
        memcpy(&y, v + i + 4, sizeof y);
        v4i gx = x > m, gy = y > m2;
        m = (v4f)((gx & (v4i)x) | (~gx & (v4i)m));
        m2 = (v4f)((gy & (v4i)y) | (~gy & (v4i)m2));
    }
    float mx = -INFINITY;
    for (int j = 0; j < 4; j++) {
        mx = m[j] > mx ? m[j] : mx;
        mx = m2[j] > mx ? m2[j] : mx;
    }
    for (; i < n; i++) mx = v[i] > mx ? v[i] : mx;
    return mx;
}

/* dst = src with NaN as -inf; returns the maximum. */
static float copy_max(const float *src, float *dst, int64_t n) {
    const v4f ninf = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    v4f m = ninf;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        v4f x;
        memcpy(&x, src + i, sizeof x);
        v4i ok = x == x;
        x = (v4f)((ok & (v4i)x) | (~ok & (v4i)ninf));
        memcpy(dst + i, &x, sizeof x);
        v4i gt = x > m;
        m = (v4f)((gt & (v4i)x) | (~gt & (v4i)m));
    }
    float mx = m[0];
    for (int j = 1; j < 4; j++) mx = m[j] > mx ? m[j] : mx;
    for (; i < n; i++) {
        dst[i] = isnan(src[i]) ? -INFINITY : src[i];
        mx = dst[i] > mx ? dst[i] : mx;
    }
    return mx;
}

/* The first token whose running weight sum exceeds u (blocks of 64 are
 * summed as vectors and skipped whole). u is in [0, sum of w). */
static int32_t draw_all(const float *w, int64_t n, double u) {
    double acc = 0;
    int64_t i = 0, last = -1;
    for (; i + 64 <= n; i += 64) {
        v4f a = {0}, b = {0};
        for (int j = 0; j < 64; j += 8) {
            v4f x, y;
            memcpy(&x, w + i + j, sizeof x);
            memcpy(&y, w + i + j + 4, sizeof y);
            a += x;
            b += y;
        }
        v4f t = a + b;
        double bsum = (double)t[0] + (double)t[1] + (double)t[2] + (double)t[3];
        if (bsum > 0) last = i; /* remembers a block with weight for the rounding case */
        if (u < acc + bsum) break;
        acc += bsum;
    }
    for (; i < n; i++) {
        if (w[i] <= 0) continue;
        acc += w[i];
        last = i;
        if (u < acc) return (int32_t)i;
    }
    /* rounding slack past the end: the last token with weight */
    if (last >= 0)
        for (int64_t j = last + 63 < n - 1 ? last + 63 : n - 1; j >= last; j--)
            if (w[j] > 0) return (int32_t)j;
    return 0;
}

/* Repetition (prompt + generated), presence and frequency (generated)
 * penalties on sm->l; scratch counts are cleared again before returning. */
static void apply_penalties(moe_sampler *sm, const moe_sampling *p, bool rep, const int32_t *prompt,
                            int64_t n_prompt, const int32_t *gen, int64_t n_gen) {
    float *l = sm->l;
    int64_t n = sm->n, nt = 0;
    for (int64_t i = 0; i < n_gen; i++) {
        int32_t t = gen[i];
        if (t < 0 || t >= n) continue;
        if (!sm->cnt[t] && !sm->mark[t]) sm->touch[nt++] = t;
        sm->cnt[t]++;
        if (rep && !sm->mark[t]) {
            sm->mark[t] = 1;
            l[t] = l[t] > 0 ? l[t] / p->repetition_penalty : l[t] * p->repetition_penalty;
        }
    }
    for (int64_t i = 0; rep && i < n_prompt; i++) {
        int32_t t = prompt[i];
        if (t < 0 || t >= n || sm->mark[t]) continue;
        if (!sm->cnt[t]) sm->touch[nt++] = t;
        sm->mark[t] = 1;
        l[t] = l[t] > 0 ? l[t] / p->repetition_penalty : l[t] * p->repetition_penalty;
    }
    for (int64_t i = 0; i < nt; i++) {
        int32_t t = sm->touch[i];
        if (sm->cnt[t]) l[t] -= p->presence_penalty + p->frequency_penalty * (float)sm->cnt[t];
        sm->cnt[t] = 0;
        sm->mark[t] = 0;
    }
}

/* a ranks before b: higher value, ties to the lower id */
static inline bool better(const float *v, int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); }

static inline void swap32(int32_t *a, int32_t *b) {
    int32_t t = *a;
    *a = *b;
    *b = t;
}

/* Sifts idx[lo + i] down a heap over idx[lo..lo+n) whose root is the worst. */
static void sift_worst(const float *v, int32_t *h, int64_t i, int64_t n) {
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n) return;
        if (c + 1 < n && better(v, h[c], h[c + 1])) c++; /* the worse child */
        if (!better(v, h[i], h[c])) return;
        swap32(&h[i], &h[c]);
        i = c;
    }
}

/* Sorts idx[lo..hi) best first: insertion sort for short runs, else a
 * heapsort (no recursion, no comparator context needed). */
static void sort_best(const float *v, int32_t *idx, int64_t lo, int64_t hi) {
    int64_t n = hi - lo;
    if (n <= 32) {
        for (int64_t i = lo + 1; i < hi; i++) {
            int32_t x = idx[i];
            int64_t j = i;
            while (j > lo && better(v, x, idx[j - 1])) {
                idx[j] = idx[j - 1];
                j--;
            }
            idx[j] = x;
        }
        return;
    }
    int32_t *h = idx + lo;
    for (int64_t i = n / 2 - 1; i >= 0; i--) sift_worst(v, h, i, n);
    for (int64_t end = n - 1; end > 0; end--) {
        swap32(&h[0], &h[end]); /* the worst left goes last */
        sift_worst(v, h, 0, end);
    }
}

/* Weights w in (0, 1] bucketed by their float bits, which order positive
 * floats like their values: 6 mantissa bits per octave, bucket 0 holds
 * the largest. Filters find the bucket where the kept set ends with one
 * O(n) histogram pass and sort only inside that bucket. */

static inline uint32_t bucket_of(float w) {
    uint32_t b;
    memcpy(&b, &w, sizeof b);
    return (0x3F800000u - b) >> HIST_SHIFT;
}

/* Keeps the best of idx[0..n_c) by weight w (ties to the lower id): the k
 * best when k > 0, else the smallest best-first prefix whose weight
 * reaches `mass`. Compacts idx in place (order not kept); returns the
 * count kept. */
static int64_t keep_best(moe_sampler *sm, const float *w, int32_t *idx, int64_t n_c, int64_t k, double mass) {
    if (n_c <= 512) { /* few: sort them and take the prefix */
        sort_best(w, idx, 0, n_c);
        int64_t m = 0;
        double acc = 0;
        while (m < n_c && (k > 0 ? m < k : acc < mass)) acc += w[idx[m++]];
        return m;
    }
    memset(sm->hcnt, 0, HIST_N * sizeof(*sm->hcnt));
    memset(sm->hmass, 0, HIST_N * sizeof(*sm->hmass));
    for (int64_t i = 0; i < n_c; i++) {
        uint32_t b = bucket_of(w[idx[i]]);
        sm->hcnt[b]++;
        sm->hmass[b] += w[idx[i]];
    }
    int64_t cnt = 0;
    double acc = 0;
    uint32_t B = 0;
    for (; B < HIST_N; B++) {
        if (k > 0 ? cnt + sm->hcnt[B] >= k : acc + sm->hmass[B] >= mass) break;
        cnt += sm->hcnt[B];
        acc += sm->hmass[B];
    }
    if (B == HIST_N) return n_c; /* rounding: the target is the whole mass */
    int64_t m = 0, t = 0;
    int32_t *tmp = sm->touch; /* free outside the penalty pass */
    for (int64_t i = 0; i < n_c; i++) {
        uint32_t b = bucket_of(w[idx[i]]);
        if (b < B) idx[m++] = idx[i];
        else if (b == B) tmp[t++] = idx[i];
    }
    sort_best(w, tmp, 0, t);
    for (int64_t j = 0; j < t; j++) {
        if (k > 0 ? cnt >= k : acc >= mass) break;
        idx[m++] = tmp[j];
        cnt++;
        acc += w[tmp[j]];
    }
    return m;
}

int moe_sampler_sample(moe_sampler *sm, const moe_sampling *p, moe_rng *rng, const float *logits,
                       const int32_t *prompt, int64_t n_prompt, const int32_t *gen, int64_t n_gen, int32_t *out) {
    if (!sm || !p || !logits || !out || (n_prompt > 0 && !prompt) || (n_gen > 0 && !gen)) return MOE_EINVAL;
    if (p->n_logit_bias > 0 && (!p->logit_bias_ids || !p->logit_bias)) return MOE_EINVAL;
    const int64_t n = sm->n;
    for (int32_t i = 0; i < p->n_logit_bias; i++)
        if (p->logit_bias_ids[i] < 0 || p->logit_bias_ids[i] >= n) return MOE_EINVAL;
    bool rep = p->repetition_penalty > 0 && p->repetition_penalty != 1.0f;
    bool pen = rep || p->presence_penalty != 0 || p->frequency_penalty != 0;
    bool greedy = !(p->temperature > 0);
    if (greedy && !pen && p->n_logit_bias == 0) {
        /* plain greedy reads the row in place: the maximum with vectors
         * (NaN never compares greater), then its first index */
        float bv = row_max(logits, n);
        int64_t best = 0;
        if (bv > -INFINITY)
            while (logits[best] != bv) best++;
        *out = (int32_t)best;
        return MOE_OK;
    }
    float *l = sm->l;
    float mx = copy_max(logits, l, n);
    for (int32_t i = 0; i < p->n_logit_bias; i++) l[p->logit_bias_ids[i]] += p->logit_bias[i];
    if (pen) apply_penalties(sm, p, rep, prompt, n_prompt, gen, n_gen);
    if (pen || p->n_logit_bias) { /* sparse updates may have moved the maximum */
        mx = -INFINITY;
        for (int64_t i = 0; i < n; i++) mx = l[i] > mx ? l[i] : mx;
    }
    if (greedy || mx == -INFINITY || mx == INFINITY) { /* (an infinite logit wins outright) */
        int64_t best = 0;
        for (int64_t i = 1; i < n; i++)
            if (l[i] > l[best]) best = i;
        *out = (int32_t)best;
        return MOE_OK;
    }
    if (!rng) return MOE_EINVAL;
    /* From here on l holds unnormalised probabilities w = exp((l - max)/T):
     * one exp per token, the order is the logits' order, the best is 1. */
    double z = exp_sum(l, l, n, mx, 1.0f / p->temperature);

    bool filt = (p->top_k > 0 && p->top_k < n) || p->top_p < 1.0f || p->min_p > 0;
    if (!filt) {
        *out = draw_all(l, n, moe_rng_uniform(rng) * z);
        return MOE_OK;
    }

    /* Candidates idx[0..n_c): tokens with weight > thr. Without top_k, a
     * token of weight <= (1 - top_p) z / n can never be in the nucleus
     * (all such tokens weigh at most (1 - top_p) z together, so the better
     * ones reach top_p first): they are dropped before any selection. */
    int32_t *idx = sm->idx;
    float thr = 0;
    if (!(p->top_k > 0 && p->top_k < n)) { /* (top_p's mass must be the top_k set's, so only without it) */
        if (p->top_p < 1.0f) thr = (float)((1.0 - (double)p->top_p) * z / (double)n);
        /* min_p keeps a best-first prefix too (w >= min_p): filtering first gives the same set */
        if (p->min_p > thr) thr = nextafterf(p->min_p, 0.0f);
    }
    int64_t n_c = 0;
    if (p->top_k > 0 && p->top_k <= 256) {
        /* small k: one pass keeping the k best in a heap whose root is the
         * worst of them (scanning ids upwards, an equal weight later never
         * displaces an earlier one) */
        int64_t k = p->top_k;
        float cut = thr; /* a token must beat this: thr, then also the heap's worst */
        for (int64_t i = 0; i < n; i++) {
            if (!(l[i] > cut)) continue;
            if (n_c < k) {
                int64_t c = n_c++;
                idx[c] = (int32_t)i;
                while (c > 0 && better(l, idx[(c - 1) / 2], idx[c])) { /* parent better: move up the worse */
                    swap32(&idx[c], &idx[(c - 1) / 2]);
                    c = (c - 1) / 2;
                }
            } else {
                idx[0] = (int32_t)i;
                sift_worst(l, idx, 0, n_c);
            }
            if (n_c == k) cut = l[idx[0]] > thr ? l[idx[0]] : thr;
        }
        z = 0;
        for (int64_t i = 0; i < n_c; i++) z += l[idx[i]];
    } else {
        for (int64_t i = 0; i < n; i++)
            if (l[i] > thr) idx[n_c++] = (int32_t)i;
        if (p->top_k > 0 && p->top_k < n_c) {
            n_c = keep_best(sm, l, idx, n_c, p->top_k, 0);
            z = 0;
            for (int64_t i = 0; i < n_c; i++) z += l[idx[i]];
        }
    }
    if (p->top_p < 1.0f && n_c > 1) {
        n_c = keep_best(sm, l, idx, n_c, 0, (double)p->top_p * z);
        z = 0;
        for (int64_t i = 0; i < n_c; i++) z += l[idx[i]];
    }
    if (p->min_p > 0 && n_c > 1) {
        int64_t k = 0;
        z = 0;
        for (int64_t i = 0; i < n_c; i++)
            if (l[idx[i]] >= p->min_p) { /* the best weighs 1 */
                idx[k++] = idx[i];
                z += l[idx[i]];
            }
        n_c = k;
    }
    if (n_c == 1) { /* the best token always survives every filter */
        *out = idx[0];
        return MOE_OK;
    }
    double u = moe_rng_uniform(rng) * z, acc = 0;
    for (int64_t i = 0; i < n_c; i++) {
        acc += l[idx[i]];
        if (u < acc) {
            *out = idx[i];
            return MOE_OK;
        }
    }
    *out = idx[n_c - 1]; /* u landed on rounding slack at the very end */
    return MOE_OK;
}

int moe_sampler_logprobs(moe_sampler *sm, const float *logits, int32_t id, int32_t n_top, float *logprob,
                         moe_logprob *top) {
    if (!sm || !logits || id < 0 || id >= sm->n || n_top < 0 || n_top > sm->n || (n_top && !top)) return MOE_EINVAL;
    const int64_t n = sm->n;
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        if (logits[i] > mx) mx = logits[i];
    double z = mx > -INFINITY ? exp_sum(logits, NULL, n, mx, 1.0f) : 0;
    double lse = mx > -INFINITY ? (double)mx + log(z) : 0;
    if (logprob) *logprob = isnan(logits[id]) ? -INFINITY : (float)((double)logits[id] - lse);
    if (n_top) {
        /* best n_top by insertion into a short sorted list: scanning ids in
         * ascending order, a later equal value never displaces an earlier one */
        int32_t k = 0;
        for (int64_t i = 0; i < n; i++) {
            float v = isnan(logits[i]) ? -INFINITY : logits[i];
            if (k == n_top && !(v > top[k - 1].logprob)) continue;
            int32_t j = k < n_top ? k++ : k - 1;
            while (j > 0 && v > top[j - 1].logprob) {
                top[j] = top[j - 1];
                j--;
            }
            top[j].id = (int32_t)i;
            top[j].logprob = v;
        }
        for (int32_t j = 0; j < k; j++) top[j].logprob = (float)((double)top[j].logprob - lse);
    }
    return MOE_OK;
}
