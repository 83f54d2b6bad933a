/* cpu_dot_avx512.c - AVX-512 (F + BW) kernels for the two main decode
 * types, Q8_0 and Q4_0; every other type keeps its AVX2 kernel.
 *
 * UNTESTED on the development machine (an AMD Zen 3 without AVX-512): the
 * code is compiled everywhere through function-level target attributes
 * and selected only where the CPU reports avx512f and avx512bw. On such a
 * machine tests/check_cpu_matmul compares it with the scalar path (it
 * loops over every ISA the CPU has), so run that suite there first.
 *
 * With avx512vnni, vpdpbusd replaces maddubs + madd.
 *
 * Two 32-element blocks share one 512-bit register. AVX-512BW has no
 * vpsignb, so the signed x signed product moves the weight's sign onto
 * the activation with a mask subtract instead.
 */
#include "cpu_dot.h"

#if defined(__x86_64__)

#include <immintrin.h>

#define TGT512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))

TGT512 static inline float hsum16(__m512 v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* [a x 8, b x 8] */
TGT512 static inline __m512 two_scales(float a, float b) {
    __m512d lo = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(a)));
    return _mm512_castpd_ps(_mm512_insertf64x4(lo, _mm256_castps_pd(_mm256_set1_ps(b)), 1));
}

TGT512 static inline __m512i join256(__m256i lo, __m256i hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* 16 int32 pair-sums of signed bytes w * x (x in [-127, 127]). */
TGT512 static inline __m512i mul_sum_i8_512(__m512i w, __m512i x) {
    __mmask64 neg = _mm512_movepi8_mask(w);
    __m512i xs = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
    __m512i p = _mm512_maddubs_epi16(_mm512_abs_epi8(w), xs);
    return _mm512_madd_epi16(p, _mm512_set1_epi16(1));
}

TGT512 static inline __m256i nibbles256(const uint8_t *p) {
    __m128i t = _mm_loadu_si128((const __m128i *)p);
    __m256i v = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

/* VNNI (vpdpbusd) sums 4 u8*s8 products per int32 lane in one instruction,
 * the same lane layout as maddubs + madd(1). */
#define TGTVNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))

TGTVNNI static void dot_q8_0_vnni(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q8_0 *w = wv;
    const cpu__q8blk *x = xv;
    int64_t nb = n / 32, b = 0;
    __m512 acc = _mm512_setzero_ps();
    for (; b + 2 <= nb; b += 2) {
        CPU_PF_AHEAD(w + b);
        __m512i qw = join256(_mm256_loadu_si256((const __m256i *)w[b].qs), _mm256_loadu_si256((const __m256i *)w[b + 1].qs));
        __m512i qx = join256(_mm256_loadu_si256((const __m256i *)x[b].qs), _mm256_loadu_si256((const __m256i *)x[b + 1].qs));
        __m512i xs = _mm512_mask_sub_epi8(qx, _mm512_movepi8_mask(qw), _mm512_setzero_si512(), qx);
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(qw), xs);
        acc = _mm512_fmadd_ps(two_scales(_cvtsh_ss(w[b].d) * x[b].d, _cvtsh_ss(w[b + 1].d) * x[b + 1].d),
                              _mm512_cvtepi32_ps(s), acc);
    }
    float tail = 0;
    if (b < nb) {
        int32_t s = 0;
        for (int j = 0; j < 32; j++)
            s += (int32_t)w[b].qs[j] * x[b].qs[j];
        tail = _cvtsh_ss(w[b].d) * x[b].d * (float)s;
    }
    *out = hsum16(acc) + tail;
}

TGTVNNI static void dot_q4_0_vnni(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q4_0 *w = wv;
    const cpu__q8blk *x = xv;
    int64_t nb = n / 32, b = 0;
    __m512 acc = _mm512_setzero_ps();
    float moff = 0;
    for (; b + 2 <= nb; b += 2) {
        CPU_PF_AHEAD(w + b);
        __m512i q = join256(nibbles256(w[b].qs), nibbles256(w[b + 1].qs));
        __m512i qx = join256(_mm256_loadu_si256((const __m256i *)x[b].qs), _mm256_loadu_si256((const __m256i *)x[b + 1].qs));
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, qx);
        float d0 = _cvtsh_ss(w[b].d), d1 = _cvtsh_ss(w[b + 1].d);
        acc = _mm512_fmadd_ps(two_scales(d0 * x[b].d, d1 * x[b + 1].d), _mm512_cvtepi32_ps(s), acc);
        moff += d0 * x[b].s + d1 * x[b + 1].s;
    }
    float tail = 0;
    if (b < nb) {
        int32_t s = 0;
        for (int j = 0; j < 16; j++)
            s += ((w[b].qs[j] & 0xF) - 8) * x[b].qs[j] + ((w[b].qs[j] >> 4) - 8) * x[b].qs[j + 16];
        tail = _cvtsh_ss(w[b].d) * x[b].d * (float)s;
    }
    *out = hsum16(acc) - 8.0f * moff + tail;
}

TGT512 static void dot_q8_0_512(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q8_0 *w = wv;
    const cpu__q8blk *x = xv;
    int64_t nb = n / 32, b = 0;
    __m512 acc = _mm512_setzero_ps();
    for (; b + 2 <= nb; b += 2) {
        CPU_PF_AHEAD(w + b);
        __m512i qw = join256(_mm256_loadu_si256((const __m256i *)w[b].qs), _mm256_loadu_si256((const __m256i *)w[b + 1].qs));
        __m512i qx = join256(_mm256_loadu_si256((const __m256i *)x[b].qs), _mm256_loadu_si256((const __m256i *)x[b + 1].qs));
        __m512 s = _mm512_cvtepi32_ps(mul_sum_i8_512(qw, qx));
        acc = _mm512_fmadd_ps(two_scales(_cvtsh_ss(w[b].d) * x[b].d, _cvtsh_ss(w[b + 1].d) * x[b + 1].d), s, acc);
    }
    float tail = 0;
    if (b < nb) {
        int32_t s = 0;
        for (int j = 0; j < 32; j++)
            s += (int32_t)w[b].qs[j] * x[b].qs[j];
        tail = _cvtsh_ss(w[b].d) * x[b].d * (float)s;
    }
    *out = hsum16(acc) + tail;
}

/* Unsigned levels times x, offset through the block sum (as in AVX2). */
TGT512 static void dot_q4_0_512(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q4_0 *w = wv;
    const cpu__q8blk *x = xv;
    int64_t nb = n / 32, b = 0;
    __m512 acc = _mm512_setzero_ps();
    float moff = 0;
    for (; b + 2 <= nb; b += 2) {
        CPU_PF_AHEAD(w + b);
        __m512i q = join256(nibbles256(w[b].qs), nibbles256(w[b + 1].qs));
        __m512i qx = join256(_mm256_loadu_si256((const __m256i *)x[b].qs), _mm256_loadu_si256((const __m256i *)x[b + 1].qs));
        __m512i s = _mm512_madd_epi16(_mm512_maddubs_epi16(q, qx), _mm512_set1_epi16(1));
        float d0 = _cvtsh_ss(w[b].d), d1 = _cvtsh_ss(w[b + 1].d);
        acc = _mm512_fmadd_ps(two_scales(d0 * x[b].d, d1 * x[b + 1].d), _mm512_cvtepi32_ps(s), acc);
        moff += d0 * x[b].s + d1 * x[b + 1].s;
    }
    float tail = 0;
    if (b < nb) {
        int32_t s = 0;
        for (int j = 0; j < 16; j++)
            s += ((w[b].qs[j] & 0xF) - 8) * x[b].qs[j] + ((w[b].qs[j] >> 4) - 8) * x[b].qs[j + 16];
        tail = _cvtsh_ss(w[b].d) * x[b].d * (float)s;
    }
    *out = hsum16(acc) - 8.0f * moff + tail;
}

void cpu__kernels_avx512(cpu__kernels *k) {
    int vnni = __builtin_cpu_supports("avx512vnni");
    k->dot[MOE_TYPE_Q8_0] = vnni ? dot_q8_0_vnni : dot_q8_0_512;
    k->dot[MOE_TYPE_Q4_0] = vnni ? dot_q4_0_vnni : dot_q4_0_512;
    /* The AVX2 4-token kernels stay for these types; their per-row float
     * order differs from the 512-bit ones, so drop them to keep dot4 and
     * dot bit-identical (cpu_dot.h contract). */
    k->dot4[MOE_TYPE_Q8_0] = NULL;
    k->dot4[MOE_TYPE_Q4_0] = NULL;
}

#else

void cpu__kernels_avx512(cpu__kernels *k) { (void)k; }

#endif
