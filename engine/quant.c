/* quant.c - reference float16/bfloat16 conversion and row (de)quantization.
 *
 * Everything here is portable scalar C and is the ground truth the SIMD
 * kernels in engine/cpu/ are tested against. Block layouts are those of
 * qblocks.h (llama.cpp's GGUF layouts).
 *
 * Exactness: the dequantizers evaluate the same float expressions, in the
 * same order, as the llama.cpp reference (and gguf-py's numpy port), e.g.
 * Q4_K is (d*sc)*q - (dmin*m). The build uses -std=c11, under which GCC
 * does not contract a*b+c into an FMA, so results are bit-identical.
 *
 * Quantizers:
 *  - Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 follow the classic round-to-nearest
 *    reference algorithms, so their bytes equal llama.cpp's / gguf-py's.
 *  - Q4_K / Q5_K (affine, x = d*sc*q - dmin*m): each 32-element sub-block
 *    is fitted by a short search: for 21 candidate inverse scales around
 *    nmax/(max-min) the elements are rounded, then the scale and offset
 *    are refitted by least squares on those levels (offset clamped <= 0,
 *    as the format stores a non-negative min); the pair with the smallest
 *    squared error wins. The 8 sub-block scales and mins are then
 *    quantized to 6 bits against the super-block d/dmin (stored f16) and
 *    the elements are re-rounded against the *quantized* scales, so the
 *    stored levels match what a reader reconstructs.
 *  - Q6_K (symmetric, x = d*sc*(q-32)): each 16-element sub-block gets the
 *    best of 21 candidate scales (least-squares refit on the rounded
 *    levels), scales are quantized to int8 against d = max|scale|/128,
 *    then elements are re-rounded against the quantized scales.
 *  These are simpler than llama.cpp's importance-weighted searches; the
 *  errors are bounded in tests/check_quant.c.
 */
#include "quant.h"

#include <math.h>
#include <string.h>

#include "status.h"

/* ---- float16 / bfloat16 ---- */

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float moe_f16_to_f32(moe_f16 h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    if (e == 0x1f)
        return f32_from_bits(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
        if (m == 0)
            return f32_from_bits(sign);
        /* Subnormal: renormalise so the leading 1 becomes implicit. */
        int32_t ee = 1;
        while (!(m & 0x400u)) {
            m <<= 1;
            ee--;
        }
        m &= 0x3ffu;
        return f32_from_bits(sign | ((uint32_t)(ee + 112) << 23) | (m << 13));
    }
    return f32_from_bits(sign | ((e + 112) << 23) | (m << 13));
}

moe_f16 moe_f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN: force quiet, keep the top payload bits */
        return (moe_f16)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) /* >= 65520 rounds (ties-to-even) to inf */
        return (moe_f16)(sign | 0x7c00u);
    if (a >= 0x38800000u) { /* normal half: |f| >= 2^-14 */
        /* Round to nearest even at bit 13; a carry ripples into the
         * exponent, which is exactly the right result. */
        uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
        return (moe_f16)(sign | ((r - 0x38000000u) >> 13));
    }
    if (a <= 0x33000000u) /* <= 2^-25: rounds to (signed) zero */
        return sign;
    /* Half subnormal: value = q * 2^-24. */
    uint32_t e = a >> 23;
    uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e; /* 14..24 */
    uint32_t q = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u)))
        q++;
    return (moe_f16)(sign | q);
}

float moe_bf16_to_f32(moe_bf16 h) { return f32_from_bits((uint32_t)h << 16); }

moe_bf16 moe_f32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (moe_bf16)((x >> 16) | 0x40u); /* quiet NaN */
    return (moe_bf16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/* ---- helpers ---- */

static float f16f(moe_f16 h) { return moe_f16_to_f32(h); }

static int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* Round half away from zero, exactly as roundf() (and gguf-py's
 * np_roundf), but inline: roundf is a libm call on baseline x86-64 and
 * the K-quant search calls this ~700 times per 32 weights. The fraction
 * a - trunc(a) is exact in float, so the tie test is exact. */
static inline int round_int(float v) {
    float a = fabsf(v);
    if (!(a < 2147483520.0f)) /* NaN or out of int range: saturate like a clamp would */
        return v < 0 ? -2147483647 : (v > 0 ? 2147483647 : 0);
    int i = (int)a;
    if (a - (float)i >= 0.5f)
        i++;
    return v < 0 ? -i : i;
}

/* 6-bit scale and min j (0..7) of a Q4_K/Q5_K block's 12 packed bytes. */
static void k4_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

static void k4_pack_scales(const uint8_t sc[8], const uint8_t m[8], uint8_t out[12]) {
    for (int j = 0; j < 4; j++) {
        out[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        out[j + 4] = (uint8_t)((m[j] & 63) | ((m[j + 4] >> 4) << 6));
        out[j + 8] = (uint8_t)((sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4));
    }
}

/* ---- dequantization ---- */

static void deq_q4_0(const moe_block_q4_0 *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += 32) {
        float d = f16f(b[i].d);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((b[i].qs[j] & 0xF) - 8);
            y[j + 16] = d * (float)((b[i].qs[j] >> 4) - 8);
        }
    }
}

static void deq_q4_1(const moe_block_q4_1 *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += 32) {
        float d = f16f(b[i].d), m = f16f(b[i].m);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)(b[i].qs[j] & 0xF) + m;
            y[j + 16] = d * (float)(b[i].qs[j] >> 4) + m;
        }
    }
}

static void deq_q5_0(const moe_block_q5_0 *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += 32) {
        float d = f16f(b[i].d);
        uint32_t qh;
        memcpy(&qh, b[i].qh, 4);
        for (int j = 0; j < 16; j++) {
            int q0 = (b[i].qs[j] & 0xF) | (int)(((qh >> j) & 1u) << 4);
            int q1 = (b[i].qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
            y[j] = d * (float)(q0 - 16);
            y[j + 16] = d * (float)(q1 - 16);
        }
    }
}

static void deq_q5_1(const moe_block_q5_1 *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += 32) {
        float d = f16f(b[i].d), m = f16f(b[i].m);
        uint32_t qh;
        memcpy(&qh, b[i].qh, 4);
        for (int j = 0; j < 16; j++) {
            int q0 = (b[i].qs[j] & 0xF) | (int)(((qh >> j) & 1u) << 4);
            int q1 = (b[i].qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
            y[j] = d * (float)q0 + m;
            y[j + 16] = d * (float)q1 + m;
        }
    }
}

static void deq_q8_0(const moe_block_q8_0 *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += 32) {
        float d = f16f(b[i].d);
        for (int j = 0; j < 32; j++)
            y[j] = d * (float)b[i].qs[j];
    }
}

static void deq_q2_K(const moe_block_q2_K *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        float d = f16f(b[i].d), dmin = f16f(b[i].dmin);
        const uint8_t *q = b[i].qs;
        int is = 0;
        /* Two halves of 128; in each, 32 bytes hold 4 bit-planes of 2 bits,
         * and each plane is two sub-blocks of 16 with their own scale. */
        for (int half = 0; half < 2; half++, q += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int part = 0; part < 2; part++) {
                    uint8_t sc = b[i].scales[is++];
                    float dl = d * (float)(sc & 0xF), ml = dmin * (float)(sc >> 4);
                    for (int l = 0; l < 16; l++)
                        *y++ = dl * (float)((q[l + 16 * part] >> shift) & 3) - ml;
                }
            }
        }
    }
}

static void q3_K_scales(const uint8_t in[12], int8_t out[16]) {
    for (int k = 0; k < 16; k++) {
        int lo = k < 8 ? (in[k] & 0xF) : (in[k - 8] >> 4);
        int hi = (in[8 + (k & 3)] >> (2 * (k >> 2))) & 3;
        out[k] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

static void deq_q3_K(const moe_block_q3_K *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        float d = f16f(b[i].d);
        int8_t sc[16];
        q3_K_scales(b[i].scales, sc);
        const uint8_t *q = b[i].qs, *hm = b[i].hmask;
        uint8_t m = 1;
        int is = 0;
        for (int half = 0; half < 2; half++, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m = (uint8_t)(m << 1)) {
                for (int part = 0; part < 2; part++) {
                    float dl = d * (float)sc[is++];
                    for (int l = 16 * part; l < 16 * part + 16; l++) {
                        /* The high bit is stored inverted: set means +0. */
                        int v = ((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4);
                        *y++ = dl * (float)v;
                    }
                }
            }
        }
    }
}

static void deq_q4_K(const moe_block_q4_K *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        float d = f16f(b[i].d), dmin = f16f(b[i].dmin);
        const uint8_t *q = b[i].qs;
        for (int j = 0; j < 8; j += 2, q += 32) {
            uint8_t sc, m;
            k4_scale_min(j, b[i].scales, &sc, &m);
            float d1 = d * (float)sc, m1 = dmin * (float)m;
            k4_scale_min(j + 1, b[i].scales, &sc, &m);
            float d2 = d * (float)sc, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (float)(q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (float)(q[l] >> 4) - m2;
        }
    }
}

static void deq_q5_K(const moe_block_q5_K *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        float d = f16f(b[i].d), dmin = f16f(b[i].dmin);
        const uint8_t *ql = b[i].qs, *qh = b[i].qh;
        unsigned u1 = 1, u2 = 2;
        for (int j = 0; j < 8; j += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
            uint8_t sc, m;
            k4_scale_min(j, b[i].scales, &sc, &m);
            float d1 = d * (float)sc, m1 = dmin * (float)m;
            k4_scale_min(j + 1, b[i].scales, &sc, &m);
            float d2 = d * (float)sc, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (float)((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (float)((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
        }
    }
}

static void deq_q6_K(const moe_block_q6_K *b, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        float d = f16f(b[i].d);
        const uint8_t *ql = b[i].ql, *qh = b[i].qh;
        const int8_t *sc = b[i].scales;
        for (int half = 0; half < 2; half++, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * (float)sc[is + 0] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
    }
}

int moe_quant_supported(int type) {
    switch (type) {
    case MOE_TYPE_F32:
    case MOE_TYPE_F16:
    case MOE_TYPE_BF16:
    case MOE_TYPE_Q4_0:
    case MOE_TYPE_Q4_1:
    case MOE_TYPE_Q5_0:
    case MOE_TYPE_Q5_1:
    case MOE_TYPE_Q8_0:
    case MOE_TYPE_Q4_K:
    case MOE_TYPE_Q5_K:
    case MOE_TYPE_Q6_K:
        return 1;
    default:
        return 0;
    }
}

static int check_args(int type, const void *a, const void *b, int64_t n, int quantize) {
    const moe_type_traits *tr = moe_type_get(type);
    if (!tr)
        return MOE_EUNSUPPORTED;
    if (quantize ? !moe_quant_supported(type)
                 : !(moe_quant_supported(type) || type == MOE_TYPE_Q2_K || type == MOE_TYPE_Q3_K))
        return MOE_EUNSUPPORTED;
    if (n < 0 || n % tr->blck != 0)
        return MOE_EINVAL;
    if (n > 0 && (!a || !b))
        return MOE_EINVAL;
    return MOE_OK;
}

int moe_dequantize_row(int type, const void *src, float *dst, int64_t n) {
    int rc = check_args(type, src, dst, n, 0);
    if (rc != MOE_OK)
        return rc;
    if (n == 0)
        return MOE_OK;
    int64_t nb = n / moe_type_get(type)->blck;
    switch (type) {
    case MOE_TYPE_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        break;
    case MOE_TYPE_F16: {
        const moe_f16 *s = src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = moe_f16_to_f32(s[i]);
        break;
    }
    case MOE_TYPE_BF16: {
        const moe_bf16 *s = src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = moe_bf16_to_f32(s[i]);
        break;
    }
    case MOE_TYPE_Q4_0: deq_q4_0(src, dst, nb); break;
    case MOE_TYPE_Q4_1: deq_q4_1(src, dst, nb); break;
    case MOE_TYPE_Q5_0: deq_q5_0(src, dst, nb); break;
    case MOE_TYPE_Q5_1: deq_q5_1(src, dst, nb); break;
    case MOE_TYPE_Q8_0: deq_q8_0(src, dst, nb); break;
    case MOE_TYPE_Q2_K: deq_q2_K(src, dst, nb); break;
    case MOE_TYPE_Q3_K: deq_q3_K(src, dst, nb); break;
    case MOE_TYPE_Q4_K: deq_q4_K(src, dst, nb); break;
    case MOE_TYPE_Q5_K: deq_q5_K(src, dst, nb); break;
    case MOE_TYPE_Q6_K: deq_q6_K(src, dst, nb); break;
    default:
        return MOE_EUNSUPPORTED;
    }
    return MOE_OK;
}

/* ---- quantization: classic 32-element types ---- */

/* Index of the element with the largest magnitude (first on ties). */
static int absmax_index(const float *x, int n) {
    int im = 0;
    float amax = 0.0f;
    for (int j = 0; j < n; j++) {
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            im = j;
        }
    }
    return im;
}

static void qnt_q4_0(const float *x, moe_block_q4_0 *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32) {
        /* Map the signed extreme to -8 so the full [-8, 7] range is used. */
        float d = x[absmax_index(x, 32)] / -8.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = moe_f32_to_f16(d);
        for (int j = 0; j < 16; j++) {
            int q0 = (int)(x[j] * id + 8.5f), q1 = (int)(x[j + 16] * id + 8.5f);
            q0 = q0 > 15 ? 15 : q0;
            q1 = q1 > 15 ? 15 : q1;
            b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void minmax(const float *x, int n, float *mn, float *mx) {
    float lo = x[0], hi = x[0];
    for (int j = 1; j < n; j++) {
        lo = x[j] < lo ? x[j] : lo;
        hi = x[j] > hi ? x[j] : hi;
    }
    *mn = lo;
    *mx = hi;
}

static void qnt_q4_1(const float *x, moe_block_q4_1 *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32) {
        float mn, mx;
        minmax(x, 32, &mn, &mx);
        float d = (mx - mn) / 15.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = moe_f32_to_f16(d);
        b[i].m = moe_f32_to_f16(mn);
        for (int j = 0; j < 16; j++) {
            int q0 = (int)((x[j] - mn) * id + 0.5f), q1 = (int)((x[j + 16] - mn) * id + 0.5f);
            q0 = q0 > 15 ? 15 : q0;
            q1 = q1 > 15 ? 15 : q1;
            b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void pack5(const int q[32], uint8_t qs[16], uint8_t qh_out[4]) {
    uint32_t qh = 0;
    for (int j = 0; j < 16; j++) {
        qs[j] = (uint8_t)((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
        qh |= (uint32_t)((q[j] >> 4) & 1) << j;
        qh |= (uint32_t)((q[j + 16] >> 4) & 1) << (j + 16);
    }
    memcpy(qh_out, &qh, 4);
}

static void qnt_q5_0(const float *x, moe_block_q5_0 *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32) {
        float d = x[absmax_index(x, 32)] / -16.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        int q[32];
        for (int j = 0; j < 32; j++) {
            int v = (int)(x[j] * id + 16.5f);
            q[j] = v > 31 ? 31 : v;
        }
        b[i].d = moe_f32_to_f16(d);
        pack5(q, b[i].qs, b[i].qh);
    }
}

static void qnt_q5_1(const float *x, moe_block_q5_1 *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32) {
        float mn, mx;
        minmax(x, 32, &mn, &mx);
        float d = (mx - mn) / 31.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        int q[32];
        for (int j = 0; j < 32; j++) {
            int v = (int)((x[j] - mn) * id + 0.5f);
            q[j] = v > 31 ? 31 : v;
        }
        b[i].d = moe_f32_to_f16(d);
        b[i].m = moe_f32_to_f16(mn);
        pack5(q, b[i].qs, b[i].qh);
    }
}

static void qnt_q8_0(const float *x, moe_block_q8_0 *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++)
            amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = moe_f32_to_f16(d);
        for (int j = 0; j < 32; j++)
            b[i].qs[j] = (int8_t)round_int(x[j] * id);
    }
}

/* ---- quantization: K-quants (see the header comment for the method) ---- */

#define FIT_STEPS 10 /* candidates: nmax + 0.1*k for k in [-FIT_STEPS, FIT_STEPS] */

/* Fits x[0..n) ~ scale*L - mn with L in [0, nmax], scale >= 0, mn >= 0. */
static void fit_affine(const float *x, int n, int nmax, float *scale, float *mn) {
    float lo, hi;
    minmax(x, n, &lo, &hi);
    if (lo > 0.0f)
        lo = 0.0f;
    if (hi <= lo) {
        *scale = 0.0f;
        *mn = -lo;
        return;
    }
    float best_a = (hi - lo) / (float)nmax, best_b = lo;
    double best_err = INFINITY, sx = 0, sx2 = 0;
    for (int j = 0; j < n; j++) {
        sx += x[j];
        sx2 += (double)x[j] * x[j];
    }
    for (int k = -FIT_STEPS; k <= FIT_STEPS; k++) {
        float iscale = ((float)nmax + 0.1f * (float)k) / (hi - lo);
        int isl = 0, isl2 = 0;
        double slx = 0;
        for (int j = 0; j < n; j++) {
            /* x - lo >= 0, so +0.5 and truncation round to nearest */
            int l = (int)(iscale * (x[j] - lo) + 0.5f);
            l = l > nmax ? nmax : l;
            isl += l;
            isl2 += l * l;
            slx += (double)l * x[j];
        }
        double sl = isl, sl2 = isl2;
        double det = n * sl2 - sl * sl;
        if (det <= 0)
            continue;
        double a = (n * slx - sl * sx) / det;
        double b = (sx - a * sl) / n;
        if (b > 0) { /* the format cannot add a positive offset */
            b = 0;
            a = slx / sl2;
        }
        if (a <= 0)
            continue;
        /* sum (a*l + b - x)^2, expanded so no second pass is needed */
        double err = a * a * sl2 + 2 * a * b * sl + n * b * b - 2 * a * slx - 2 * b * sx + sx2;
        if (err < best_err) {
            best_err = err;
            best_a = (float)a;
            best_b = (float)b;
        }
    }
    *scale = best_a;
    *mn = -best_b;
}

/* Fits x[0..n) ~ scale*L with L in [-nneg, nneg-1]; scale may be negative
 * so the asymmetric end of the range lands on the largest magnitude. */
static float fit_symmetric(const float *x, int n, int nneg) {
    float mx = x[absmax_index(x, n)];
    if (mx == 0.0f)
        return 0.0f;
    float best = mx / -(float)nneg;
    double best_err = INFINITY, sx2 = 0;
    for (int j = 0; j < n; j++)
        sx2 += (double)x[j] * x[j];
    for (int k = -FIT_STEPS; k <= FIT_STEPS; k++) {
        float iscale = -((float)nneg + 0.1f * (float)k) / mx;
        double sl2 = 0, slx = 0;
        for (int j = 0; j < n; j++) {
            int l = clampi(round_int(iscale * x[j]), -nneg, nneg - 1);
            sl2 += (double)l * l;
            slx += (double)l * x[j];
        }
        if (sl2 <= 0)
            continue;
        /* least-squares a = slx/sl2 leaves error sx2 - slx^2/sl2 */
        double a = slx / sl2, err = sx2 - slx * a;
        if (err < best_err) {
            best_err = err;
            best = (float)a;
        }
    }
    return best;
}

/* Shared by Q4_K (nmax 15) and Q5_K (nmax 31): fills d, dmin, the packed
 * scales and L[256] (levels in [0, nmax]). */
static void qnt_k_affine(const float *x, int nmax, moe_f16 *d_out, moe_f16 *dmin_out,
                         uint8_t scales[12], uint8_t L[256]) {
    float sc_f[8], mn_f[8], max_sc = 0.0f, max_mn = 0.0f;
    for (int j = 0; j < 8; j++) {
        fit_affine(x + 32 * j, 32, nmax, &sc_f[j], &mn_f[j]);
        max_sc = sc_f[j] > max_sc ? sc_f[j] : max_sc;
        max_mn = mn_f[j] > max_mn ? mn_f[j] : max_mn;
    }
    *d_out = moe_f32_to_f16(max_sc / 63.0f);
    *dmin_out = moe_f32_to_f16(max_mn / 63.0f);
    float d = moe_f16_to_f32(*d_out), dmin = moe_f16_to_f32(*dmin_out);
    uint8_t sc[8], m[8];
    for (int j = 0; j < 8; j++) {
        sc[j] = (uint8_t)(d > 0.0f ? clampi(round_int(sc_f[j] / d), 0, 63) : 0);
        m[j] = (uint8_t)(dmin > 0.0f ? clampi(round_int(mn_f[j] / dmin), 0, 63) : 0);
    }
    k4_pack_scales(sc, m, scales);
    /* Re-round against the scales a reader will actually use. */
    for (int j = 0; j < 8; j++) {
        float dl = d * (float)sc[j], ml = dmin * (float)m[j];
        for (int l = 0; l < 32; l++) {
            int v = dl > 0.0f ? round_int((x[32 * j + l] + ml) / dl) : 0;
            L[32 * j + l] = (uint8_t)clampi(v, 0, nmax);
        }
    }
}

static void qnt_q4_K(const float *x, moe_block_q4_K *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 256) {
        uint8_t L[256];
        qnt_k_affine(x, 15, &b[i].d, &b[i].dmin, b[i].scales, L);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                b[i].qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
    }
}

static void qnt_q5_K(const float *x, moe_block_q5_K *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 256) {
        uint8_t L[256];
        qnt_k_affine(x, 31, &b[i].d, &b[i].dmin, b[i].scales, L);
        memset(b[i].qh, 0, sizeof b[i].qh);
        for (int c = 0; c < 4; c++) {
            for (int l = 0; l < 32; l++) {
                uint8_t lo = L[64 * c + l], hi = L[64 * c + 32 + l];
                b[i].qs[32 * c + l] = (uint8_t)((lo & 0xF) | ((hi & 0xF) << 4));
                b[i].qh[l] |= (uint8_t)(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
            }
        }
    }
}

static void qnt_q6_K(const float *x, moe_block_q6_K *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 256) {
        float sc_f[16], max_sc = 0.0f;
        int imax = 0;
        for (int j = 0; j < 16; j++) {
            sc_f[j] = fit_symmetric(x + 16 * j, 16, 32);
            if (fabsf(sc_f[j]) > max_sc) {
                max_sc = fabsf(sc_f[j]);
                imax = j;
            }
        }
        /* The signed scale with the largest magnitude maps to -128 so the
         * int8 range is used fully, mirroring the element rule above. */
        float d = max_sc > 0.0f ? sc_f[imax] / -128.0f : 0.0f;
        b[i].d = moe_f32_to_f16(d);
        d = moe_f16_to_f32(b[i].d);
        uint8_t L[256];
        for (int j = 0; j < 16; j++) {
            int s = d != 0.0f ? clampi(round_int(sc_f[j] / d), -128, 127) : 0;
            b[i].scales[j] = (int8_t)s;
            float dl = d * (float)s;
            for (int l = 0; l < 16; l++) {
                int v = dl != 0.0f ? round_int(x[16 * j + l] / dl) : 0;
                L[16 * j + l] = (uint8_t)(clampi(v, -32, 31) + 32);
            }
        }
        for (int half = 0; half < 2; half++) {
            const uint8_t *Lh = L + 128 * half;
            uint8_t *ql = b[i].ql + 64 * half, *qh = b[i].qh + 32 * half;
            for (int l = 0; l < 32; l++) {
                uint8_t q1 = Lh[l], q2 = Lh[l + 32], q3 = Lh[l + 64], q4 = Lh[l + 96];
                ql[l] = (uint8_t)((q1 & 0xF) | ((q3 & 0xF) << 4));
                ql[l + 32] = (uint8_t)((q2 & 0xF) | ((q4 & 0xF) << 4));
                qh[l] = (uint8_t)((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
            }
        }
    }
}

int moe_quantize_row(int type, const float *src, void *dst, int64_t n) {
    int rc = check_args(type, src, dst, n, 1);
    if (rc != MOE_OK)
        return rc;
    if (n == 0)
        return MOE_OK;
    int64_t nb = n / moe_type_get(type)->blck;
    switch (type) {
    case MOE_TYPE_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        break;
    case MOE_TYPE_F16: {
        moe_f16 *d = dst;
        for (int64_t i = 0; i < n; i++)
            d[i] = moe_f32_to_f16(src[i]);
        break;
    }
    case MOE_TYPE_BF16: {
        moe_bf16 *d = dst;
        for (int64_t i = 0; i < n; i++)
            d[i] = moe_f32_to_bf16(src[i]);
        break;
    }
    case MOE_TYPE_Q4_0: qnt_q4_0(src, dst, nb); break;
    case MOE_TYPE_Q4_1: qnt_q4_1(src, dst, nb); break;
    case MOE_TYPE_Q5_0: qnt_q5_0(src, dst, nb); break;
    case MOE_TYPE_Q5_1: qnt_q5_1(src, dst, nb); break;
    case MOE_TYPE_Q8_0: qnt_q8_0(src, dst, nb); break;
    case MOE_TYPE_Q4_K: qnt_q4_K(src, dst, nb); break;
    case MOE_TYPE_Q5_K: qnt_q5_K(src, dst, nb); break;
    case MOE_TYPE_Q6_K: qnt_q6_K(src, dst, nb); break;
    default:
        return MOE_EUNSUPPORTED;
    }
    return MOE_OK;
}
