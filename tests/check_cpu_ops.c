/* check_cpu_ops.c - the CPU backend's ops against naive double references
 * and hand-worked cases: rms_norm (strided), rope NORM/NEOX (partial, with
 * attn_factor), YaRN frequencies, paged GQA attention over scattered
 * blocks with mixed prefill/decode, MLA attention on the latent cache
 * against the expanded formulation, MoE routing rules (non-finite router
 * logits included), and the MoE op. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "forward.h"
#include "qblocks.h"

static moe_backend be;
static void setup(void) { ck_assert_int_eq(moe_cpu_backend_init(&be, &(moe_cpu_backend_opts){.n_threads = 2}), 0); }
static void teardown(void) { moe_backend_destroy(&be); }

static unsigned rs = 1;
static float rnd(void) { /* uniform in [-1, 1) */
    rs = rs * 1664525u + 1013904223u;
    return (float)((rs >> 8) & 0xffffff) / (float)(1 << 23) - 1.0f;
}

static moe_weight f32w(const float *d, int64_t n_in, int64_t n_out, int64_t n_mat) {
    return (moe_weight){.type = MOE_TYPE_F32, .data = d, .n_in = n_in, .n_out = n_out, .n_mat = n_mat};
}

START_TEST(rms_norm_strided) {
    /* 3 rows of 10; norm the first 6 of each into rows of stride 8 */
    float x[30], w[6], y[24];
    for (int i = 0; i < 30; i++) x[i] = rnd() * 3;
    for (int i = 0; i < 6; i++) w[i] = 0.5f + (float)i * 0.1f;
    for (int i = 0; i < 24; i++) y[i] = 42.0f;
    ck_assert_int_eq(be.ops->rms_norm(be.ctx, x, 10, y, 8, 3, 6, w, 1e-6f), 0);
    for (int r = 0; r < 3; r++) {
        double ss = 0;
        for (int i = 0; i < 6; i++) ss += (double)x[r * 10 + i] * x[r * 10 + i];
        double inv = 1.0 / sqrt(ss / 6 + 1e-6);
        for (int i = 0; i < 6; i++) ck_assert_double_eq_tol(y[r * 8 + i], w[i] * x[r * 10 + i] * inv, 1e-5);
        ck_assert_float_eq(y[r * 8 + 6], 42.0f); /* outside the slice: untouched */
    }
}
END_TEST

START_TEST(rope_styles) {
    /* 2 tokens x 3 heads x 10 dims, rotating the first 6 of each head */
    for (int style = 0; style < 2; style++) {
        float x[60], x0[60], inv[3] = {1.0f, 0.3f, 0.01f};
        int32_t pos[2] = {3, 17};
        for (int i = 0; i < 60; i++) x0[i] = x[i] = rnd();
        moe_rope_params p = {.style = style, .n_rot = 6, .inv_freq = inv, .attn_factor = 0.75f};
        ck_assert_int_eq(be.ops->rope(be.ctx, x, 2, 30, 3, 10, pos, &p), 0);
        for (int t = 0; t < 2; t++)
            for (int h = 0; h < 3; h++) {
                const float *a = x0 + t * 30 + h * 10;
                const float *g = x + t * 30 + h * 10;
                for (int i = 0; i < 3; i++) {
                    int i0 = style == MOE_ROPE_NEOX ? i : 2 * i, i1 = style == MOE_ROPE_NEOX ? i + 3 : 2 * i + 1;
                    double th = pos[t] * (double)inv[i];
                    ck_assert_double_eq_tol(g[i0], 0.75 * (a[i0] * cos(th) - a[i1] * sin(th)), 1e-5);
                    ck_assert_double_eq_tol(g[i1], 0.75 * (a[i0] * sin(th) + a[i1] * cos(th)), 1e-5);
                }
                for (int i = 6; i < 10; i++) ck_assert_float_eq(g[i], a[i]); /* not rotated */
            }
    }
}
END_TEST

START_TEST(yarn_frequencies) {
    /* The DeepSeek fixtures' setting: dim 8, base 1e4, factor 40, original
     * context 4096, beta 32/1. corr(32) = 8 ln(4096/(64 pi)) / (2 ln 1e4) = 1.31
     * -> low 1; corr(1) = 2.81 -> high 3; ramp = clamp((i-1)/2) = 0, 0, .5, 1. */
    float inv[4];
    moe_rope_yarn_inv_freq(8, 1e4, 40, 4096, 32, 1, inv);
    const double ramp[4] = {0, 0, 0.5, 1};
    for (int i = 0; i < 4; i++) {
        double ex = pow(1e4, -2.0 * i / 8);
        ck_assert_double_eq_tol(inv[i], ex * (ramp[i] / 40 + 1 - ramp[i]), 1e-7 * ex);
    }
    /* factor 1: plain theta frequencies */
    float pl[8];
    moe_rope_yarn_inv_freq(16, 1e6, 1, 0, 0, 0, pl);
    for (int i = 0; i < 8; i++) ck_assert_double_eq_tol(pl[i], pow(1e6, -2.0 * i / 16), 1e-7);
}
END_TEST

/* Two sequences in scattered blocks of 4. Sequence 0 has positions 0..6
 * cached by an earlier step and decodes position 7; sequence 1 prefills
 * positions 0..4. */
#define BS 4
static const int32_t BT[] = {5, 2, 7, /* seq 0 */ 0, 3};
static const int64_t BOFF[] = {0, 3, 5};

static void ref_attend(const double *q, const double *const *k, const double *const *v, int len, int d, int dv,
                       double scale, double *out) {
    double s[512], mx = -INFINITY, sum = 0;
    for (int p = 0; p < len; p++) {
        s[p] = 0;
        for (int i = 0; i < d; i++) s[p] += q[i] * k[p][i];
        s[p] *= scale;
        mx = s[p] > mx ? s[p] : mx;
    }
    for (int p = 0; p < len; p++) sum += (s[p] = exp(s[p] - mx));
    for (int i = 0; i < dv; i++) out[i] = 0;
    for (int p = 0; p < len; p++)
        for (int i = 0; i < dv; i++) out[i] += s[p] / sum * v[p][i];
}

START_TEST(paged_gqa_attention) {
    enum { H = 4, HKV = 2, D = 8, NB = 8, W = HKV * D };
    static float kc[NB * BS * W], vc[NB * BS * W];
    /* the whole history of both sequences, K/V per position */
    static float kall[2][8][W], vall[2][8][W];
    for (int s = 0; s < 2; s++)
        for (int p = 0; p < 8; p++)
            for (int i = 0; i < W; i++) kall[s][p][i] = rnd(), vall[s][p][i] = rnd();
    /* step 1: seq 0 positions 0..6 */
    int32_t seq1[7], pos1[7];
    for (int i = 0; i < 7; i++) seq1[i] = 0, pos1[i] = i;
    moe_kv_view kv1 = {.block_size = BS, .n_seq = 2, .block_table = BT, .block_off = BOFF, .seq = seq1,
                       .pos = pos1, .n_tok = 7};
    ck_assert_int_eq(be.ops->kv_store(be.ctx, &kv1, kc, vc, W, W, &kall[0][0][0], &vall[0][0][0]), 0);
    /* step 2: mixed batch, seq 1 tokens interleaved with seq 0's decode */
    int32_t seq2[6] = {1, 1, 0, 1, 1, 1}, pos2[6] = {0, 1, 7, 2, 3, 4};
    float k2[6][W], v2[6][W], q[6][H * D], out[6][H * D];
    for (int t = 0; t < 6; t++) {
        memcpy(k2[t], kall[seq2[t]][pos2[t]], sizeof k2[t]);
        memcpy(v2[t], vall[seq2[t]][pos2[t]], sizeof v2[t]);
        for (int i = 0; i < H * D; i++) q[t][i] = rnd();
    }
    moe_kv_view kv2 = {.block_size = BS, .n_seq = 2, .block_table = BT, .block_off = BOFF, .seq = seq2,
                       .pos = pos2, .n_tok = 6};
    ck_assert_int_eq(be.ops->kv_store(be.ctx, &kv2, kc, vc, W, W, &k2[0][0], &v2[0][0]), 0);
    ck_assert_int_eq(be.ops->attention(be.ctx, &kv2, &q[0][0], kc, vc, H, HKV, D, 0.3f, &out[0][0]), 0);
    for (int t = 0; t < 6; t++)
        for (int h = 0; h < H; h++) {
            double qd[D], kd[8][D], vd[8][D], o[D];
            const double *kp[8], *vp[8];
            int kvh = h / (H / HKV), len = pos2[t] + 1;
            for (int i = 0; i < D; i++) qd[i] = q[t][h * D + i];
            for (int p = 0; p < len; p++) {
                for (int i = 0; i < D; i++) {
                    kd[p][i] = kall[seq2[t]][p][kvh * D + i];
                    vd[p][i] = vall[seq2[t]][p][kvh * D + i];
                }
                kp[p] = kd[p];
                vp[p] = vd[p];
            }
            ref_attend(qd, kp, vp, len, D, D, 0.3, o);
            for (int i = 0; i < D; i++) ck_assert_double_eq_tol(out[t][h * D + i], o[i], 1e-5);
        }
    /* a position beyond the block table is refused */
    int32_t badpos = 12, s0 = 0;
    moe_kv_view kb = {.block_size = BS, .n_seq = 2, .block_table = BT, .block_off = BOFF, .seq = &s0, .pos = &badpos,
                      .n_tok = 1};
    ck_assert_int_eq(be.ops->attention(be.ctx, &kb, &q[0][0], kc, vc, H, HKV, D, 0.3f, &out[0][0]), MOE_EINVAL);
}
END_TEST

START_TEST(mla_attention_vs_expanded) {
    enum { H = 3, R = 8 /* kv_lora */, ROT = 4, NOPE = 6, DV = 5, NB = 8, KW = R + ROT };
    static float cache[NB * BS * KW];
    static float lat[2][8][KW];
    float kb[H][R][NOPE], vb[H][DV][R];
    for (int h = 0; h < H; h++) {
        for (int c = 0; c < R; c++)
            for (int n = 0; n < NOPE; n++) kb[h][c][n] = rnd();
        for (int v = 0; v < DV; v++)
            for (int c = 0; c < R; c++) vb[h][v][c] = rnd();
    }
    for (int s = 0; s < 2; s++)
        for (int p = 0; p < 8; p++)
            for (int i = 0; i < KW; i++) lat[s][p][i] = rnd();
    int32_t seq[8], pos[8];
    int n = 0;
    for (int p = 0; p < 6; p++) seq[n] = 0, pos[n++] = p;
    for (int p = 0; p < 2; p++) seq[n] = 1, pos[n++] = p;
    float k[8][KW], q[8][H * (NOPE + ROT)], out[8][H * DV];
    for (int t = 0; t < n; t++) {
        memcpy(k[t], lat[seq[t]][pos[t]], sizeof k[t]);
        for (int i = 0; i < H * (NOPE + ROT); i++) q[t][i] = rnd();
    }
    moe_kv_view kv = {.block_size = BS, .n_seq = 2, .block_table = BT, .block_off = BOFF, .seq = seq, .pos = pos,
                      .n_tok = n};
    ck_assert_int_eq(be.ops->kv_store(be.ctx, &kv, cache, NULL, KW, 0, &k[0][0], NULL), 0);
    moe_weight wkb = f32w(&kb[0][0][0], NOPE, R, H), wvb = f32w(&vb[0][0][0], R, DV, H);
    ck_assert_int_eq(be.ops->mla_attention(be.ctx, &kv, &q[0][0], cache, R, ROT, NOPE, &wkb, &wvb, 0.4f, &out[0][0]),
                     0);
    /* expanded: k[h] = (c . k_b[h] | k_pe), v[h] = v_b[h] . c */
    for (int t = 0; t < n; t++)
        for (int h = 0; h < H; h++) {
            double qd[NOPE + ROT], kd[8][NOPE + ROT], vd[8][DV], o[DV];
            const double *kp[8], *vp[8];
            for (int i = 0; i < NOPE + ROT; i++) qd[i] = q[t][h * (NOPE + ROT) + i];
            for (int p = 0; p <= pos[t]; p++) {
                const float *c = lat[seq[t]][p];
                for (int j = 0; j < NOPE; j++) {
                    kd[p][j] = 0;
                    for (int i = 0; i < R; i++) kd[p][j] += (double)c[i] * kb[h][i][j];
                }
                for (int j = 0; j < ROT; j++) kd[p][NOPE + j] = c[R + j];
                for (int j = 0; j < DV; j++) {
                    vd[p][j] = 0;
                    for (int i = 0; i < R; i++) vd[p][j] += (double)vb[h][j][i] * c[i];
                }
                kp[p] = kd[p];
                vp[p] = vd[p];
            }
            ref_attend(qd, kp, vp, pos[t] + 1, NOPE + ROT, DV, 0.4, o);
            for (int i = 0; i < DV; i++) ck_assert_double_eq_tol(out[t][h * DV + i], o[i], 1e-4);
        }
}
END_TEST

/* Long context: a decode token at position 299 and a mixed short one, so
 * the latent attention is split into position chunks and merged (the
 * flash-decoding path), with blocks scattered in reverse order. */
START_TEST(mla_attention_long_context) {
    enum { H = 2, R = 8, ROT = 4, NOPE = 6, DV = 5, LEN = 300, LBS = 16, NBL = (LEN + LBS - 1) / LBS + 1, KW = R + ROT };
    static float cache[NBL * LBS * KW], lat[LEN][KW];
    float kb[H][R][NOPE], vb[H][DV][R];
    for (int h = 0; h < H; h++) {
        for (int c = 0; c < R; c++)
            for (int n = 0; n < NOPE; n++) kb[h][c][n] = rnd();
        for (int v = 0; v < DV; v++)
            for (int c = 0; c < R; c++) vb[h][v][c] = rnd();
    }
    for (int p = 0; p < LEN; p++)
        for (int i = 0; i < KW; i++) lat[p][i] = rnd() * 2;
    /* seq 0 uses blocks NBL-2 .. 0 in reverse; seq 1 uses block NBL-1 */
    int32_t bt[NBL];
    for (int i = 0; i < NBL - 1; i++) bt[i] = NBL - 2 - i;
    bt[NBL - 1] = NBL - 1;
    int64_t boff[3] = {0, NBL - 1, NBL};
    static int32_t seq[LEN], pos[LEN];
    for (int p = 0; p < LEN; p++) seq[p] = 0, pos[p] = p;
    moe_kv_view st = {.block_size = LBS, .n_seq = 2, .block_table = bt, .block_off = boff, .seq = seq, .pos = pos,
                      .n_tok = LEN};
    ck_assert_int_eq(be.ops->kv_store(be.ctx, &st, cache, NULL, KW, 0, &lat[0][0], NULL), 0);
    int32_t s2[2] = {0, 1}, p2[2] = {LEN - 1, 0};
    float q[2][H * (NOPE + ROT)], out[2][H * DV];
    for (int t = 0; t < 2; t++)
        for (int i = 0; i < H * (NOPE + ROT); i++) q[t][i] = rnd();
    /* seq 1's only position holds lat[0] too */
    moe_kv_view one = {.block_size = LBS, .n_seq = 2, .block_table = bt, .block_off = boff, .seq = s2 + 1,
                       .pos = p2 + 1, .n_tok = 1};
    ck_assert_int_eq(be.ops->kv_store(be.ctx, &one, cache, NULL, KW, 0, &lat[0][0], NULL), 0);
    moe_kv_view dec = {.block_size = LBS, .n_seq = 2, .block_table = bt, .block_off = boff, .seq = s2, .pos = p2,
                       .n_tok = 2};
    moe_weight wkb = f32w(&kb[0][0][0], NOPE, R, H), wvb = f32w(&vb[0][0][0], R, DV, H);
    ck_assert_int_eq(be.ops->mla_attention(be.ctx, &dec, &q[0][0], cache, R, ROT, NOPE, &wkb, &wvb, 0.3f, &out[0][0]), 0);
    for (int t = 0; t < 2; t++)
        for (int h = 0; h < H; h++) {
            static double kd[LEN][NOPE + ROT], vd[LEN][DV];
            static const double *kp[LEN], *vp[LEN];
            double qd[NOPE + ROT], o[DV];
            for (int i = 0; i < NOPE + ROT; i++) qd[i] = q[t][h * (NOPE + ROT) + i];
            for (int p = 0; p <= p2[t]; p++) {
                const float *c = lat[p];
                for (int j = 0; j < NOPE; j++) {
                    kd[p][j] = 0;
                    for (int i = 0; i < R; i++) kd[p][j] += (double)c[i] * kb[h][i][j];
                }
                for (int j = 0; j < ROT; j++) kd[p][NOPE + j] = c[R + j];
                for (int j = 0; j < DV; j++) {
                    vd[p][j] = 0;
                    for (int i = 0; i < R; i++) vd[p][j] += (double)vb[h][j][i] * c[i];
                }
                kp[p] = kd[p];
                vp[p] = vd[p];
            }
            ref_attend(qd, kp, vp, p2[t] + 1, NOPE + ROT, DV, 0.3, o);
            for (int i = 0; i < DV; i++) ck_assert_double_eq_tol(out[t][h * DV + i], o[i], 1e-4);
        }
}
END_TEST

/* Runs the moe op on one token with zero experts (so only routing shows)
 * and returns the chosen ids and weights. */
static void route1(const float *logits, const moe_route_params *rp, int32_t *ids, float *w) {
    int64_t E = rp->n_expert;
    float *z = calloc((size_t)E * 32 * 32, sizeof(float)), h[32] = {0}, out[32];
    moe_weight g = f32w(z, 32, 32, E), d = f32w(z, 32, 32, E);
    ck_assert_int_eq(be.ops->moe(be.ctx, h, 1, logits, rp, &g, &g, &d, out, ids, w), 0);
    free(z);
}

START_TEST(routing_softmax_group_limited) {
    /* group maxima 3.0, 2.9, 2.95, 0 -> groups 0 and 2 survive; expert 2
     * (2.9, the third best overall) is excluded with its group, so the
     * top-3 is {0, 4, 1} instead of {0, 4, 2}. Weights are the softmax over
     * all 8 (not renormalised) times the routed scale. */
    const float l[8] = {3.0f, -1.0f, 2.9f, -2.0f, 2.95f, -3.0f, 0.0f, 0.0f};
    moe_route_params rp = {.gating = MOE_GATING_SOFTMAX, .n_expert = 8, .n_used = 3, .n_group = 4,
                           .n_group_used = 2, .norm = false, .scale = 2.5f};
    int32_t ids[3];
    float w[3];
    route1(l, &rp, ids, w);
    double z = 0;
    for (int e = 0; e < 8; e++) z += exp(l[e]);
    const int32_t want[3] = {0, 4, 1};
    for (int k = 0; k < 3; k++) {
        ck_assert_int_eq(ids[k], want[k]);
        ck_assert_double_eq_tol(w[k], 2.5 * exp(l[want[k]]) / z, 1e-6);
    }
    /* without the group limit expert 2 wins its place back */
    rp.n_group = 1;
    route1(l, &rp, ids, w);
    ck_assert_int_eq(ids[2], 2);
    /* renormalised top-2 (Mixtral / Qwen3) sums to 1 */
    rp.n_used = 2;
    rp.norm = true;
    rp.scale = 1.0f;
    route1(l, &rp, ids, w);
    ck_assert_double_eq_tol(w[0], exp(3.0) / (exp(3.0) + exp(2.95)), 1e-6);
    ck_assert_double_eq_tol(w[0] + w[1], 1.0, 1e-6);
}
END_TEST

START_TEST(routing_sigmoid_bias_groups) {
    /* V3 rules. logits -> s = sigmoid; choice = s + bias. Group scores (sum
     * of the two best choices): g0 = e0,e1; g1 = e2,e3; g2 = e4,e5; g3 = e6,e7.
     * Expert 4 has the best single choice but its group's sum is poor, so
     * with "sum of top-2" its group loses (a max rule would keep it). */
    const float l[8] = {0.4f, 0.0f, 0.2f, 0.1f, 0.0f, -2.0f, 0.0f, -0.1f};
    const float bias[8] = {0.1f, -0.1f, 0.05f, 0.04f, 0.3f, -0.3f, 0.0f, -0.01f};
    double s[8], ch[8];
    for (int e = 0; e < 8; e++) s[e] = 1 / (1 + exp(-(double)l[e])), ch[e] = s[e] + bias[e];
    /* sanity of the construction: expert 4 is the best choice overall */
    for (int e = 0; e < 8; e++) ck_assert(ch[4] >= ch[e]);
    double g[4];
    for (int i = 0; i < 4; i++) g[i] = ch[2 * i] + ch[2 * i + 1];
    ck_assert(g[0] > g[2] && g[1] > g[2] && g[0] > g[3] && g[1] > g[3]); /* groups 0, 1 kept */
    moe_route_params rp = {.gating = MOE_GATING_SIGMOID, .n_expert = 8, .n_used = 2, .n_group = 4,
                           .n_group_used = 2, .norm = true, .scale = 2.5f, .bias = bias};
    int32_t ids[2];
    float w[2];
    route1(l, &rp, ids, w);
    /* among e0..e3 the best choices: e0 (0.698), e2 (0.600) */
    ck_assert_int_eq(ids[0], 0);
    ck_assert_int_eq(ids[1], 2);
    /* weights from the unbiased s, normalised, scaled */
    ck_assert_double_eq_tol(w[0], 2.5 * s[0] / (s[0] + s[2]), 1e-6);
    ck_assert_double_eq_tol(w[1], 2.5 * s[2] / (s[0] + s[2]), 1e-6);
}
END_TEST

/* Non-finite router input (a NaN weight row, +-Inf from an overflowing
 * norm) must still route inside [0, E) by the documented rule: a NaN
 * choice or group score ranks as -inf, ties go to the lowest id. Before
 * the rule an all-NaN row chose expert -1 and wrote before its buffers. */
START_TEST(routing_nonfinite) {
    const float N = NAN, I = INFINITY;
    int32_t ids[4];
    float w[4];
    /* softmax, every logit NaN: every choice ties at -inf -> 0, 1, 2 */
    const float all_nan[8] = {N, N, N, N, N, N, N, N};
    moe_route_params rp = {.gating = MOE_GATING_SOFTMAX, .n_expert = 8, .n_used = 3, .n_group = 1,
                           .n_group_used = 1, .norm = true, .scale = 1.0f};
    route1(all_nan, &rp, ids, w);
    for (int k = 0; k < 3; k++) {
        ck_assert_int_eq(ids[k], k);
        ck_assert(isnan(w[k])); /* passed on: the step's logits fail the sequence */
    }
    /* softmax with one NaN: the normaliser is NaN, so every s is: same rule */
    const float one_nan[8] = {1, N, 3, 0, 2, 0, -1, -2};
    route1(one_nan, &rp, ids, w);
    for (int k = 0; k < 3; k++) ck_assert_int_eq(ids[k], k);
    /* softmax with +Inf: inf - inf is NaN for that expert, 0 for the rest,
     * the sum NaN: the same rule again (never the -1 of an empty choice) */
    const float pinf[8] = {0, 0, 0, 0, 0, I, 0, 0};
    route1(pinf, &rp, ids, w);
    for (int k = 0; k < 3; k++) ck_assert_int_eq(ids[k], k);
    /* sigmoid, some NaN: finite choices rank as usual, the NaN ones after
     * them by id (4 used, 3 finite: the 4th is NaN expert 1) */
    const float some_nan[8] = {0.5f, N, 2, N, 1, N, N, N};
    rp.gating = MOE_GATING_SIGMOID;
    rp.n_used = 4;
    route1(some_nan, &rp, ids, w);
    const int32_t want_some[4] = {2, 4, 0, 1};
    for (int k = 0; k < 4; k++) ck_assert_int_eq(ids[k], want_some[k]);
    /* sigmoid, +-Inf: s = 1 for +Inf (a tie, lowest id first), 0 for -Inf */
    const float infs[8] = {-I, I, 0, I, -I, -I, -I, -I};
    rp.n_used = 3;
    rp.norm = false;
    route1(infs, &rp, ids, w);
    const int32_t want_inf[3] = {1, 3, 2};
    for (int k = 0; k < 3; k++) ck_assert_int_eq(ids[k], want_inf[k]);
    ck_assert_float_eq(w[0], 1.0f);
    ck_assert_float_eq(w[2], 0.5f);
    /* groups (V3 rules, sum of the two best): g0 {NaN, NaN} and g2 {NaN, 2}
     * score -inf, g1 {0, 1} and g3 {-1, -2} survive -> e3, e2, e6 */
    const float grp[8] = {N, N, 0, 1, N, 2, -1, -2};
    rp.n_group = 4;
    rp.n_group_used = 2;
    route1(grp, &rp, ids, w);
    const int32_t want_grp[3] = {3, 2, 6};
    for (int k = 0; k < 3; k++) ck_assert_int_eq(ids[k], want_grp[k]);
    /* all NaN with groups: every group ties at -inf, groups 0 and 1 are kept */
    route1(all_nan, &rp, ids, w);
    for (int k = 0; k < 3; k++) ck_assert_int_eq(ids[k], k);
    /* a +Inf bias next to a NaN choice: the group sum +inf + -inf is NaN,
     * ranked -inf; g1 and g2 win, and the +Inf expert is out with its group */
    const float lb[8] = {0, N, 0, 1, 2, 0, -1, -2};
    const float bias[8] = {I, 0, 0, 0, 0, 0, 0, 0};
    rp.bias = bias;
    route1(lb, &rp, ids, w);
    const int32_t want_b[3] = {4, 3, 2};
    for (int k = 0; k < 3; k++) ck_assert_int_eq(ids[k], want_b[k]);
}
END_TEST

START_TEST(moe_op_vs_naive) {
    enum { E = 4, N = 5, EMB = 32, FF = 32, K = 2 };
    static float gate[E][FF][EMB], up[E][FF][EMB], down[E][EMB][FF], h[N][EMB], lg[N][E], out[N][EMB];
    for (int e = 0; e < E; e++)
        for (int i = 0; i < FF; i++)
            for (int j = 0; j < EMB; j++) gate[e][i][j] = rnd() * 0.3f, up[e][i][j] = rnd() * 0.3f, down[e][j][i] = rnd() * 0.3f;
    for (int t = 0; t < N; t++) {
        for (int j = 0; j < EMB; j++) h[t][j] = rnd();
        for (int e = 0; e < E; e++) lg[t][e] = rnd() * 3;
    }
    moe_weight wg = f32w(&gate[0][0][0], EMB, FF, E), wu = f32w(&up[0][0][0], EMB, FF, E),
               wd = f32w(&down[0][0][0], FF, EMB, E);
    moe_route_params rp = {.gating = MOE_GATING_SOFTMAX, .n_expert = E, .n_used = K, .n_group = 1, .norm = true,
                           .scale = 1.0f};
    int32_t ids[N * K];
    float w[N * K];
    ck_assert_int_eq(be.ops->moe(be.ctx, &h[0][0], N, &lg[0][0], &rp, &wg, &wu, &wd, &out[0][0], ids, w), 0);
    for (int t = 0; t < N; t++) {
        /* top-2 by logit, softmax renormalised over the two */
        int a = 0, b = -1;
        for (int e = 1; e < E; e++)
            if (lg[t][e] > lg[t][a]) a = e;
        for (int e = 0; e < E; e++)
            if (e != a && (b < 0 || lg[t][e] > lg[t][b])) b = e;
        ck_assert_int_eq(ids[t * K], a);
        ck_assert_int_eq(ids[t * K + 1], b);
        double wa = 1 / (1 + exp((double)lg[t][b] - lg[t][a])), wts[2] = {wa, 1 - wa};
        int ex[2] = {a, b};
        for (int j = 0; j < EMB; j++) {
            double acc = 0;
            for (int k = 0; k < 2; k++) {
                int e = ex[k];
                for (int i = 0; i < FF; i++) {
                    double gs = 0, us = 0;
                    for (int m = 0; m < EMB; m++) gs += (double)gate[e][i][m] * h[t][m], us += (double)up[e][i][m] * h[t][m];
                    acc += wts[k] * down[e][j][i] * (gs / (1 + exp(-gs)) * us);
                }
            }
            ck_assert_double_eq_tol(out[t][j], acc, 1e-4);
        }
    }
}
END_TEST

START_TEST(matmul_embed_bias) {
    float w[3][32], x[2][32], b[3] = {1, -2, 0.5f}, y[2][3], e[2][32];
    for (int o = 0; o < 3; o++)
        for (int i = 0; i < 32; i++) w[o][i] = rnd();
    for (int t = 0; t < 2; t++)
        for (int i = 0; i < 32; i++) x[t][i] = rnd();
    moe_weight mw = f32w(&w[0][0], 32, 3, 1);
    ck_assert_int_eq(be.ops->matmul(be.ctx, &mw, &x[0][0], 2, b, &y[0][0]), 0);
    for (int t = 0; t < 2; t++)
        for (int o = 0; o < 3; o++) {
            double s = b[o];
            for (int i = 0; i < 32; i++) s += (double)w[o][i] * x[t][i];
            ck_assert_double_eq_tol(y[t][o], s, 1e-5);
        }
    int32_t ids[2] = {2, 0}, bad = 3;
    ck_assert_int_eq(be.ops->embed(be.ctx, &mw, ids, 2, &e[0][0]), 0);
    ck_assert_mem_eq(e[0], w[2], sizeof e[0]);
    ck_assert_mem_eq(e[1], w[0], sizeof e[1]);
    ck_assert_int_eq(be.ops->embed(be.ctx, &mw, &bad, 1, &e[0][0]), MOE_EINVAL);
}
END_TEST

int main(void) {
    Suite *s = suite_create("cpu_ops");
    TCase *tc = tcase_create("elementwise");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, rms_norm_strided);
    tcase_add_test(tc, matmul_embed_bias);
    suite_add_tcase(s, tc);
    tc = tcase_create("rope");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, rope_styles);
    tcase_add_test(tc, yarn_frequencies);
    suite_add_tcase(s, tc);
    tc = tcase_create("attention");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, paged_gqa_attention);
    tcase_add_test(tc, mla_attention_vs_expanded);
    tcase_add_test(tc, mla_attention_long_context);
    suite_add_tcase(s, tc);
    tc = tcase_create("moe");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, routing_softmax_group_limited);
    tcase_add_test(tc, routing_sigmoid_bias_groups);
    tcase_add_test(tc, routing_nonfinite);
    tcase_add_test(tc, moe_op_vs_naive);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
