/* cpu_dot_avx2.c - AVX2 + FMA + F16C dot-product kernels (see cpu_dot.h).
 *
 * Compiled with function-level target attributes, so the file builds with
 * no -march flag; cpu_matmul.c only installs these after checking the CPU.
 *
 * Integer kernels: weights and activations are int8 (or unsigned 4/5/6-bit
 * levels) multiplied with maddubs (u8 x s8 -> s16 pairs) and widened with
 * madd. For signed x signed the sign of the weight is moved onto the
 * activation (|w| * sign(w)*x), which is exact because activations stay in
 * [-127, 127]. maddubs saturates at 32767; the largest pair sum here is
 * 2*128*127 = 32512 (a -128 Q8_0 weight), so it never does.
 */
#include "cpu_dot.h"

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>
#include <string.h>

#define TGT __attribute__((target("avx2,fma,f16c")))

TGT static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TGT static inline float h2f(moe_f16 h) { return _cvtsh_ss(h); }

/* 8 int32 sums of pairs of products of signed bytes. */
TGT static inline __m256i mul_sum_i8(__m256i w, __m256i x) {
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* Same for unsigned weight levels (0..63) times signed activations. */
TGT static inline __m256i mul_sum_u8(__m256i u, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
}

/* 16 bytes of nibble pairs -> 32 levels: low nibbles (elements 0..15)
 * then high nibbles (16..31), the Q4_0/Q4_1/Q5_x element order. */
TGT static inline __m256i unpack_nibbles(const uint8_t *p) {
    __m128i t = _mm_loadu_si128((const __m128i *)p);
    __m256i v = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

/* The 32 bits of qh spread to 32 bytes: 0x10 where bit j is set. Each
 * byte j picks byte j/8 of qh; OR-ing with all bits except bit j%8 set
 * gives 0xFF exactly when that bit is set. */
TGT static inline __m256i q5_high_bits(const uint8_t qh_bytes[4]) {
    uint32_t qh;
    memcpy(&qh, qh_bytes, 4);
    const __m256i pick = _mm256_set_epi64x(0x0303030303030303ll, 0x0202020202020202ll,
                                           0x0101010101010101ll, 0x0000000000000000ll);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), pick);
    b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfell));
    b = _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
    return _mm256_and_si256(b, _mm256_set1_epi8(0x10));
}

/* ---- F32 / F16 / BF16: one summation structure for all three ---- */

TGT static inline __m256 ld_f32(const void *p, int64_t i) { return _mm256_loadu_ps((const float *)p + i); }
TGT static inline __m256 ld_f16(const void *p, int64_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const moe_f16 *)p + i)));
}
TGT static inline __m256 ld_bf16(const void *p, int64_t i) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const moe_bf16 *)p + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
TGT static inline float s_f32(const void *p, int64_t i) { return ((const float *)p)[i]; }
TGT static inline float s_f16(const void *p, int64_t i) { return _cvtsh_ss(((const moe_f16 *)p)[i]); }
TGT static inline float s_bf16(const void *p, int64_t i) {
    uint32_t u = (uint32_t)((const moe_bf16 *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* NT activation rows per pass; two accumulators per row (more would not
 * fit 16 registers at NT = 4). Per row, the float operations are the same
 * for every NT and for all three weight types, which makes dot4 == dot
 * and dot[F16](w) == dot[F32](widened w) bit for bit (cpu_dot.h). */
#define AVX2_F_NT(NAME, LD, SLD, ESZ)                                                              \
    TGT static inline __attribute__((always_inline)) void NAME(const int NT, int64_t n, const void *w, \
                                                               const void *const *xv, float *const *out) { \
        const float *const *x = (const float *const *)xv;                                          \
        __m256 a0[4], a1[4];                                                                       \
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) a0[t] = a1[t] = _mm256_setzero_ps();  \
        int64_t i = 0;                                                                             \
        for (; i + 16 <= n; i += 16) {                                                             \
            CPU_PF_AHEAD((const char *)w + i * ESZ);                                               \
            __m256 w0 = LD(w, i), w1 = LD(w, i + 8);                                               \
            _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {                                 \
                a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t] + i), a0[t]);                     \
                a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[t] + i + 8), a1[t]);                 \
            }                                                                                      \
        }                                                                                          \
        if (i + 8 <= n) {                                                                          \
            __m256 w0 = LD(w, i);                                                                  \
            _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) a0[t] =                           \
                _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t] + i), a0[t]);                             \
            i += 8;                                                                                \
        }                                                                                          \
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {                                     \
            float s = hsum8(_mm256_add_ps(a0[t], a1[t]));                                          \
            for (int64_t k = i; k < n; k++)                                                        \
                s += SLD(w, k) * x[t][k];                                                          \
            *out[t] = s;                                                                           \
        }                                                                                          \
    }

AVX2_F_NT(f32_nt, ld_f32, s_f32, 4)
AVX2_F_NT(f16_nt, ld_f16, s_f16, 2)
AVX2_F_NT(bf16_nt, ld_bf16, s_bf16, 2)

#define DEFINE_DOT1(NAME, IMPL)                                                                    \
    TGT static void NAME(int64_t n, const void *w, const void *x, float *out) {                    \
        const void *xs[1] = {x};                                                                   \
        float *os[1] = {out};                                                                      \
        IMPL(1, n, w, xs, os);                                                                     \
    }

DEFINE_DOT1(dot_f32, f32_nt)
DEFINE_DOT1(dot_f16, f16_nt)
DEFINE_DOT1(dot_bf16, bf16_nt)

TGT static void dot_f32_x4(int64_t n, const void *w, const void *const *x, float *const *out) {
    f32_nt(4, n, w, x, out);
}

TGT static void cvt_f16(int64_t n, const void *w, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, ld_f16(w, i));
    for (; i < n; i++)
        out[i] = s_f16(w, i);
}

TGT static void cvt_bf16(int64_t n, const void *w, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, ld_bf16(w, i));
    for (; i < n; i++)
        out[i] = s_bf16(w, i);
}

/* ---- 32-element block types; two blocks per step for two FMA chains ---- */

#define BLOCK_LOOP(BODY)                                                                           \
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                                 \
    int64_t nb = n / 32, b = 0;                                                                    \
    for (; b + 2 <= nb; b += 2) {                                                                  \
        CPU_PF_AHEAD(w + b);                                                                       \
        { BODY(b, acc0) }                                                                          \
        { BODY(b + 1, acc1) }                                                                      \
    }                                                                                              \
    if (b < nb) {                                                                                  \
        BODY(b, acc0)                                                                              \
    }

/* Multi-token kernels. Each is written once for NT activation rows and
 * instantiated for NT = 1 (dot) and NT = 4 (dot4): the weight block is
 * decoded once and used for every row, while the float operations per row
 * are exactly those of the NT = 1 version, so dot4 and dot agree bit for
 * bit (cpu_dot.h contract). */
#define NT_MAX 4
#define FOR_T _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
#define ALWAYS_INLINE __attribute__((always_inline)) inline

TGT static ALWAYS_INLINE void q8_0_step(const int NT, const moe_block_q8_0 *w, const cpu__q8blk *const *x,
                                        int64_t b, __m256 *acc) {
    __m256i wq = _mm256_loadu_si256((const __m256i *)w[b].qs);
    __m256i aw = _mm256_sign_epi8(wq, wq);
    /* the weight scale broadcast once per block; each row's scale comes in
     * with a broadcast load (no shuffle-port op), and the vector product
     * equals the scalar dw * d in every lane, so the sums are unchanged */
    __m256 dw = _mm256_set1_ps(h2f(w[b].d));
    FOR_T {
        __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)x[t][b].qs), wq);
        __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), _mm256_set1_epi16(1));
        __m256 sc = _mm256_mul_ps(dw, _mm256_broadcast_ss(&x[t][b].d));
        acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), acc[t]);
    }
}

TGT static ALWAYS_INLINE void q8_0_nt(const int NT, int64_t n, const void *wv, const void *const *xv, float *const *out) {
    const moe_block_q8_0 *w = wv;
    const cpu__q8blk *const *x = (const cpu__q8blk *const *)xv;
    __m256 acc0[NT_MAX], acc1[NT_MAX];
    FOR_T acc0[t] = acc1[t] = _mm256_setzero_ps();
    int64_t nb = n / 32, b = 0;
    for (; b + 2 <= nb; b += 2) { /* two FMA chains per row */
        CPU_PF_AHEAD(w + b);
        q8_0_step(NT, w, x, b, acc0);
        q8_0_step(NT, w, x, b + 1, acc1);
    }
    if (b < nb)
        q8_0_step(NT, w, x, b, acc0);
    FOR_T *out[t] = hsum8(_mm256_add_ps(acc0[t], acc1[t]));
}

/* Q4_0 multiplies the unsigned levels and subtracts the offset through
 * the activation block sum: d_w*d_x*sum(q*x) - 8*d_w*(d_x*sum(x)), which
 * saves the sign trick's two ops per block. */
TGT static ALWAYS_INLINE void q4_0_step(const int NT, const moe_block_q4_0 *w, const cpu__q8blk *const *x,
                                        int64_t b, __m256 *acc, float *moff) {
    __m256i q = unpack_nibbles(w[b].qs);
    float dw = h2f(w[b].d);
    __m256 dwv = _mm256_set1_ps(dw); /* as in q8_0_step */
    FOR_T {
        __m256i s = mul_sum_u8(q, _mm256_loadu_si256((const __m256i *)x[t][b].qs));
        __m256 sc = _mm256_mul_ps(dwv, _mm256_broadcast_ss(&x[t][b].d));
        acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), acc[t]);
        moff[t] += dw * x[t][b].s;
    }
}

TGT static ALWAYS_INLINE void q4_0_nt(const int NT, int64_t n, const void *wv, const void *const *xv, float *const *out) {
    const moe_block_q4_0 *w = wv;
    const cpu__q8blk *const *x = (const cpu__q8blk *const *)xv;
    __m256 acc0[NT_MAX], acc1[NT_MAX];
    float moff[NT_MAX];
    FOR_T {
        acc0[t] = acc1[t] = _mm256_setzero_ps();
        moff[t] = 0;
    }
    int64_t nb = n / 32, b = 0;
    for (; b + 2 <= nb; b += 2) {
        CPU_PF_AHEAD(w + b);
        q4_0_step(NT, w, x, b, acc0, moff);
        q4_0_step(NT, w, x, b + 1, acc1, moff);
    }
    if (b < nb)
        q4_0_step(NT, w, x, b, acc0, moff);
    FOR_T *out[t] = hsum8(_mm256_add_ps(acc0[t], acc1[t])) - 8.0f * moff[t];
}

#define DEFINE_DOTS(NAME, IMPL)                                                                    \
    TGT static void NAME(int64_t n, const void *w, const void *x, float *out) {                    \
        const void *xs[1] = {x};                                                                   \
        float *os[1] = {out};                                                                      \
        IMPL(1, n, w, xs, os);                                                                     \
    }                                                                                              \
    TGT static void NAME##_x4(int64_t n, const void *w, const void *const *x, float *const *out) { \
        IMPL(4, n, w, x, out);                                                                     \
    }

DEFINE_DOTS(dot_q8_0, q8_0_nt)
DEFINE_DOTS(dot_q4_0, q4_0_nt)

#define Q4_1_BODY(B, ACC)                                                                          \
    __m256i s = mul_sum_u8(unpack_nibbles(w[B].qs), _mm256_loadu_si256((const __m256i *)x[B].qs)); \
    ACC = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w[B].d) * x[B].d), _mm256_cvtepi32_ps(s), ACC);       \
    moff += h2f(w[B].m) * x[B].s;

TGT static void dot_q4_1(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q4_1 *w = wv;
    const cpu__q8blk *x = xv;
    float moff = 0;
    BLOCK_LOOP(Q4_1_BODY)
    *out = hsum8(_mm256_add_ps(acc0, acc1)) + moff;
}

#define Q5_0_BODY(B, ACC)                                                                          \
    __m256i q = _mm256_or_si256(unpack_nibbles(w[B].qs), q5_high_bits(w[B].qh));                   \
    __m256i s = mul_sum_u8(q, _mm256_loadu_si256((const __m256i *)x[B].qs));                       \
    float dw = h2f(w[B].d);                                                                        \
    ACC = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[B].d), _mm256_cvtepi32_ps(s), ACC);                \
    moff += dw * x[B].s;

TGT static void dot_q5_0(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q5_0 *w = wv;
    const cpu__q8blk *x = xv;
    float moff = 0;
    BLOCK_LOOP(Q5_0_BODY)
    *out = hsum8(_mm256_add_ps(acc0, acc1)) - 16.0f * moff;
}

#define Q5_1_BODY(B, ACC)                                                                          \
    __m256i q = _mm256_or_si256(unpack_nibbles(w[B].qs), q5_high_bits(w[B].qh));                   \
    __m256i s = mul_sum_u8(q, _mm256_loadu_si256((const __m256i *)x[B].qs));                       \
    ACC = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w[B].d) * x[B].d), _mm256_cvtepi32_ps(s), ACC);       \
    moff += h2f(w[B].m) * x[B].s;

TGT static void dot_q5_1(int64_t n, const void *wv, const void *xv, float *out) {
    const moe_block_q5_1 *w = wv;
    const cpu__q8blk *x = xv;
    float moff = 0;
    BLOCK_LOOP(Q5_1_BODY)
    *out = hsum8(_mm256_add_ps(acc0, acc1)) + moff;
}

/* ---- K-quants against Q8_K ---- */

/* The 8 six-bit scales and mins of a Q4_K/Q5_K block widened to int16:
 * lanes 0..7 scales, 8..15 mins. Done with 32-bit masks on the packed
 * words instead of byte by byte:
 *   sc[0..3] = w0 & 63         m[0..3] = w1 & 63
 *   sc[4..7] = (w2 & 15) | (w0 >> 6) << 4
 *   m[4..7]  = (w2 >> 4 & 15) | (w1 >> 6) << 4   (per byte) */
TGT static inline __m256i k4_scales_mins(const uint8_t q[12]) {
    uint32_t w0, w1, w2;
    memcpy(&w0, q, 4);
    memcpy(&w1, q + 4, 4);
    memcpy(&w2, q + 8, 4);
    uint32_t sc_lo = w0 & 0x3f3f3f3fu, m_lo = w1 & 0x3f3f3f3fu;
    uint32_t sc_hi = (w2 & 0x0f0f0f0fu) | (((w0 >> 6) & 0x03030303u) << 4);
    uint32_t m_hi = ((w2 >> 4) & 0x0f0f0f0fu) | (((w1 >> 6) & 0x03030303u) << 4);
    return _mm256_cvtepu8_epi16(_mm_setr_epi32((int)sc_lo, (int)sc_hi, (int)m_lo, (int)m_hi));
}

/* shuffle masks that broadcast int16 lane i of a 128-bit half */
static const uint8_t k4_lane_mask[8][32] __attribute__((aligned(32))) = {
#define K4M(i) {2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, \
                2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, \
                2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1}
    K4M(0), K4M(1), K4M(2), K4M(3), K4M(4), K4M(5), K4M(6), K4M(7)
#undef K4M
};

TGT static inline __m256i k4_scale_bcast(__m256i scales, int i) {
    return _mm256_shuffle_epi8(scales, _mm256_load_si256((const __m256i *)k4_lane_mask[i]));
}

/* sum_j m_j * (bsums[2j] + bsums[2j+1]) as 4 int32 lanes */
TGT static inline __m128i k4_min_dot(__m256i sm, const int16_t bsums[16]) {
    __m128i b0 = _mm_loadu_si128((const __m128i *)bsums), b1 = _mm_loadu_si128((const __m128i *)(bsums + 8));
    __m128i pairs = _mm_hadd_epi16(b0, b1); /* |pair| <= 32*127, no overflow */
    return _mm_madd_epi16(_mm256_extracti128_si256(sm, 1), pairs);
}

/* Q4_K and Q5_K: per 64-element chunk c, low nibbles go with x[64c..+32)
 * and sub-block scale 2c, high nibbles with x[64c+32..+64) and scale 2c+1.
 * Level*x pair sums (<= 2*31*127) times a 6-bit scale fit the int16 x
 * int16 -> int32 madd. Q5_K adds bit 2c / 2c+1 of qh as 16. The mins
 * term, dmin * sum_j m_j * sum(x in sub-block j), comes from bsums. */
TGT static ALWAYS_INLINE void q45_K_nt(const int NT, const int HAS_QH, int64_t n, const void *wv,
                                       const void *const *xv, float *const *out) {
    const cpu__q8k *const *x = (const cpu__q8k *const *)xv;
    const size_t bsz = HAS_QH ? sizeof(moe_block_q5_K) : sizeof(moe_block_q4_K);
    __m256 acc[NT_MAX];
    __m128 accm[NT_MAX];
    FOR_T {
        acc[t] = _mm256_setzero_ps();
        accm[t] = _mm_setzero_ps();
    }
    const __m256i mask4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    for (int64_t b = 0; b < n / 256; b++) {
        /* Q4_K and Q5_K share d, dmin and scales at the same offsets */
        const moe_block_q4_K *w4 = (const moe_block_q4_K *)((const uint8_t *)wv + bsz * b);
        CPU_PF_AHEAD(w4);
        CPU_PF_AHEAD((const char *)w4 + 64);
        CPU_PF_AHEAD((const char *)w4 + 128);
        const moe_block_q5_K *w5 = (const moe_block_q5_K *)w4;
        const uint8_t *qs = HAS_QH ? w5->qs : w4->qs;
        __m256i sm = k4_scales_mins(w4->scales);
        __m256i scales = _mm256_permute2x128_si256(sm, sm, 0x00);
        __m256i hb = HAS_QH ? _mm256_loadu_si256((const __m256i *)w5->qh) : _mm256_setzero_si256();
        __m256i sum[NT_MAX];
        FOR_T sum[t] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m256i lo = _mm256_and_si256(q, mask4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask4);
            if (HAS_QH) { /* bits 2c and 2c+1 of qh are the fifth bits; move them to bit 4 */
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hb, one), 4));
                hb = _mm256_srli_epi16(hb, 1);
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(hb, one), 4));
                hb = _mm256_srli_epi16(hb, 1);
            }
            __m256i s0 = k4_scale_bcast(scales, 2 * c), s1 = k4_scale_bcast(scales, 2 * c + 1);
            FOR_T {
                const int8_t *xq = x[t][b].qs + 64 * c;
                __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xq));
                __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 32)));
                sum[t] = _mm256_add_epi32(sum[t], _mm256_add_epi32(_mm256_madd_epi16(p0, s0), _mm256_madd_epi16(p1, s1)));
            }
        }
        float dw = h2f(w4->d), dm = h2f(w4->dmin);
        FOR_T {
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[t][b].d), _mm256_cvtepi32_ps(sum[t]), acc[t]);
            accm[t] = _mm_fmadd_ps(_mm_set1_ps(dm * x[t][b].d), _mm_cvtepi32_ps(k4_min_dot(sm, x[t][b].bsums)), accm[t]);
        }
    }
    FOR_T {
        __m128 m = _mm_add_ps(accm[t], _mm_movehl_ps(accm[t], accm[t]));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        *out[t] = hsum8(acc[t]) - _mm_cvtss_f32(m);
    }
}

#define Q4_K_IMPL(NT, n, w, x, out) q45_K_nt(NT, 0, n, w, x, out)
#define Q5_K_IMPL(NT, n, w, x, out) q45_K_nt(NT, 1, n, w, x, out)
DEFINE_DOTS(dot_q4_K, Q4_K_IMPL)
DEFINE_DOTS(dot_q5_K, Q5_K_IMPL)

/* Q6_K: levels 0..63 (the -32 offset is applied through bsums), 16-element
 * sub-blocks with int8 scales: each 32-byte maddubs result holds two
 * sub-blocks, one per 128-bit half, so the scale vector is split too:
 * mask k puts int16 scale 2k in the low half and 2k+1 in the high half. */
static const uint8_t q6_pair_mask[4][32] __attribute__((aligned(32))) = {
#define Q6M(k) {4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1,                     \
                4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1,                     \
                4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3,     \
                4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3}
    Q6M(0), Q6M(1), Q6M(2), Q6M(3)
#undef Q6M
};

TGT static ALWAYS_INLINE void q6_K_nt(const int NT, int64_t n, const void *wv, const void *const *xv, float *const *out) {
    const moe_block_q6_K *w = wv;
    const cpu__q8k *const *x = (const cpu__q8k *const *)xv;
    __m256 acc[NT_MAX], acco[NT_MAX];
    FOR_T acc[t] = acco[t] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    const __m256i pm0 = _mm256_load_si256((const __m256i *)q6_pair_mask[0]);
    const __m256i pm1 = _mm256_load_si256((const __m256i *)q6_pair_mask[1]);
    const __m256i pm2 = _mm256_load_si256((const __m256i *)q6_pair_mask[2]);
    const __m256i pm3 = _mm256_load_si256((const __m256i *)q6_pair_mask[3]);
    for (int64_t b = 0; b < n / 256; b++) {
        for (int o = 0; o < (int)sizeof(moe_block_q6_K); o += 64) CPU_PF_AHEAD((const char *)(w + b) + o);
        __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w[b].scales)); /* s[0..15] */
        __m256i sum[NT_MAX];
        FOR_T sum[t] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = w[b].ql + 64 * h;
            /* this half's 8 scales, in both 128-bit lanes */
            __m256i sh = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11) : _mm256_permute2x128_si256(sc16, sc16, 0x00);
            __m256i qh = _mm256_loadu_si256((const __m256i *)(w[b].qh + 32 * h));
            __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            __m256i q1 = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4));
            __m256i q2 = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                         _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4));
            __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                         _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4));
            __m256i q4 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                         _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4));
            __m256i s1 = _mm256_shuffle_epi8(sh, pm0), s2 = _mm256_shuffle_epi8(sh, pm1);
            __m256i s3 = _mm256_shuffle_epi8(sh, pm2), s4 = _mm256_shuffle_epi8(sh, pm3);
            FOR_T {
                const int8_t *xq = x[t][b].qs + 128 * h;
                __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(q1, _mm256_loadu_si256((const __m256i *)xq)), s1);
                __m256i p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(q2, _mm256_loadu_si256((const __m256i *)(xq + 32))), s2);
                __m256i p3 = _mm256_madd_epi16(_mm256_maddubs_epi16(q3, _mm256_loadu_si256((const __m256i *)(xq + 64))), s3);
                __m256i p4 = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, _mm256_loadu_si256((const __m256i *)(xq + 96))), s4);
                sum[t] = _mm256_add_epi32(sum[t], _mm256_add_epi32(_mm256_add_epi32(p1, p2), _mm256_add_epi32(p3, p4)));
            }
        }
        float dw = h2f(w[b].d);
        FOR_T {
            /* 32 * sum_j s_j * bsums_j, the level offset */
            __m256i sb = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)x[t][b].bsums));
            __m256 d = _mm256_set1_ps(dw * x[t][b].d);
            acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum[t]), acc[t]);
            acco[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sb), acco[t]);
        }
    }
    FOR_T *out[t] = hsum8(acc[t]) - 32.0f * hsum8(acco[t]);
}

DEFINE_DOTS(dot_q6_K, q6_K_nt)

/* ---- activation quantization (same bytes as the scalar version) ---- */

TGT static inline float absmax8(__m256 m) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Rounds 32 floats times id to int8 (half-to-even, as the scalar code's
 * magic-constant rounding) and stores them in element order; returns the
 * 8 lanes of int32 sums of levels. */
TGT static inline __m256i round_store32(const float *x, __m256 id, int8_t *q) {
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8), id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 16), id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 24), id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    /* packs work per 128-bit lane; the final dword permute restores order */
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, p);
    return sum;
}

TGT static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

TGT static void act_q8(const float *x, int64_t n, cpu__q8blk *b) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / 32; i++, x += 32) {
        __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(x));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8)));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 16)));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 24)));
        float d = absmax8(m) / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = d;
        b[i].s = d * (float)hsum_i32(round_store32(x, _mm256_set1_ps(id), b[i].qs));
    }
}

TGT static void act_q8k(const float *x, int64_t n, cpu__q8k *b) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / 256; i++, x += 256) {
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < 256; j += 8)
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
        float d = absmax8(m) / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = d;
        for (int j = 0; j < 256; j += 32)
            round_store32(x + j, _mm256_set1_ps(id), b[i].qs + j);
        for (int j = 0; j < 16; j++) {
            __m128i v = _mm_loadu_si128((const __m128i *)(b[i].qs + 16 * j));
            /* sum of 16 int8: widen to int16, madd with 1 -> 4 int32 */
            __m256i w = _mm256_cvtepi8_epi16(v);
            __m256i s = _mm256_madd_epi16(w, _mm256_set1_epi16(1));
            b[i].bsums[j] = (int16_t)hsum_i32(s);
        }
    }
}

void cpu__kernels_avx2(cpu__kernels *k) {
    k->act_q8 = act_q8;
    k->act_q8k = act_q8k;
    k->dot[MOE_TYPE_F32] = dot_f32;
    k->dot[MOE_TYPE_F16] = dot_f16;
    k->dot[MOE_TYPE_BF16] = dot_bf16;
    k->cvt[MOE_TYPE_F16] = cvt_f16;
    k->cvt[MOE_TYPE_BF16] = cvt_bf16;
    k->dot[MOE_TYPE_Q8_0] = dot_q8_0;
    k->dot[MOE_TYPE_Q4_0] = dot_q4_0;
    k->dot[MOE_TYPE_Q4_1] = dot_q4_1;
    k->dot[MOE_TYPE_Q5_0] = dot_q5_0;
    k->dot[MOE_TYPE_Q5_1] = dot_q5_1;
    k->dot[MOE_TYPE_Q4_K] = dot_q4_K;
    k->dot[MOE_TYPE_Q5_K] = dot_q5_K;
    k->dot[MOE_TYPE_Q6_K] = dot_q6_K;
    k->dot4[MOE_TYPE_F32] = dot_f32_x4;
    k->dot4[MOE_TYPE_Q8_0] = dot_q8_0_x4;
    k->dot4[MOE_TYPE_Q4_0] = dot_q4_0_x4;
    k->dot4[MOE_TYPE_Q4_K] = dot_q4_K_x4;
    k->dot4[MOE_TYPE_Q5_K] = dot_q5_K_x4;
    k->dot4[MOE_TYPE_Q6_K] = dot_q6_K_x4;
}

#else

/* ---- activation quantization (same bytes as the scalar version) ---- */

TGT static inline float absmax8(__m256 m) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Rounds 32 floats times id to int8 (half-to-even, as the scalar code's
 * magic-constant rounding) and stores them in element order; returns the
 * 8 lanes of int32 sums of levels. */
TGT static inline __m256i round_store32(const float *x, __m256 id, int8_t *q) {
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8), id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 16), id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 24), id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    /* packs work per 128-bit lane; the final dword permute restores order */
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, p);
    return sum;
}

TGT static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

TGT static void act_q8(const float *x, int64_t n, cpu__q8blk *b) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / 32; i++, x += 32) {
        __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(x));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8)));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 16)));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 24)));
        float d = absmax8(m) / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = d;
        b[i].s = d * (float)hsum_i32(round_store32(x, _mm256_set1_ps(id), b[i].qs));
    }
}

TGT static void act_q8k(const float *x, int64_t n, cpu__q8k *b) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / 256; i++, x += 256) {
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < 256; j += 8)
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
        float d = absmax8(m) / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = d;
        for (int j = 0; j < 256; j += 32)
            round_store32(x + j, _mm256_set1_ps(id), b[i].qs + j);
        for (int j = 0; j < 16; j++) {
            __m128i v = _mm_loadu_si128((const __m128i *)(b[i].qs + 16 * j));
            /* sum of 16 int8: widen to int16, madd with 1 -> 4 int32 */
            __m256i w = _mm256_cvtepi8_epi16(v);
            __m256i s = _mm256_madd_epi16(w, _mm256_set1_epi16(1));
            b[i].bsums[j] = (int16_t)hsum_i32(s);
        }
    }
}

void cpu__kernels_avx2(cpu__kernels *k) {
    k->act_q8 = act_q8;
    k->act_q8k = act_q8k; (void)k; }

#endif
