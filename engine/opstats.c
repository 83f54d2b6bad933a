/* opstats.c - timing and traffic counting as a backend wrapper (see opstats.h). */
#include "opstats.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "array.h"
#include "log_hook.h"
#include "quant.h"

#define OPS(X)                                                                                                       \
    X(embed) X(get_rows) X(rms_norm) X(matmul) X(add) X(mul) X(swiglu) X(sigmoid_scale) X(rope) X(kv_store)          \
    X(attention) X(mla_attention) X(moe) X(download)

enum {
#define X(o) OP_##o,
    OPS(X)
#undef X
    OP_COUNT
};

static const char *const OP_NAME[OP_COUNT] = {
#define X(o) #o,
    OPS(X)
#undef X
};

struct moe_opstats {
    moe_backend in;
    struct moe_backend_ops ops;
    bool time, count;
    int bucket; /* 0 one token, 1 up to 64, 2 more */
    double s[3][OP_COUNT];
    int64_t calls[3][OP_COUNT];
    moe_fwd_traffic tr;
    int rc_count; /* MOE_ENOMEM when routing scratch could not grow */
    int32_t *ids; /* (ids_cap) routing of a moe call whose caller passed none */
    int64_t ids_cap;
    uint8_t *seen; /* (seen_cap) experts seen in one moe call */
    int64_t seen_cap;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int64_t wbytes(const moe_weight *w) {
    if (!w || !w->data) return 0;
    size_t ms = w->mat_stride ? w->mat_stride : (size_t)w->n_out * moe_row_size(w->type, w->n_in);
    return (int64_t)ms * (w->n_mat > 0 ? w->n_mat : 1);
}

/* Calls the wrapped op, timing it under `o` when timing is on. */
#define FWD(o, ...)                                                                                                  \
    do {                                                                                                             \
        double t0_ = s->time ? now() : 0;                                                                            \
        int rc_ = s->in.ops->o(s->in.ctx, __VA_ARGS__);                                                              \
        if (s->time) {                                                                                               \
            s->s[s->bucket][OP_##o] += now() - t0_;                                                                  \
            s->calls[s->bucket][OP_##o]++;                                                                           \
        }                                                                                                            \
        return rc_;                                                                                                  \
    } while (0)

static void w_destroy(void *ctx) { (void)ctx; /* the wrapper does not own the wrapped backend */ }
static int w_supports_type(void *ctx, int type) {
    moe_opstats *s = ctx;
    return s->in.ops->supports_type(s->in.ctx, type);
}
static void *w_alloc(void *ctx, size_t n) {
    moe_opstats *s = ctx;
    return s->in.ops->alloc(s->in.ctx, n);
}
static void w_free(void *ctx, void *buf) {
    moe_opstats *s = ctx;
    s->in.ops->free(s->in.ctx, buf);
}
static int w_upload(void *ctx, void *dst, const void *src, size_t n) {
    moe_opstats *s = ctx;
    return s->in.ops->upload(s->in.ctx, dst, src, n);
}
static int w_download(void *ctx, void *dst, const void *src, size_t n) {
    moe_opstats *s = ctx;
    FWD(download, dst, src, n);
}
static int w_bind_weight(void *ctx, const void *host, size_t n, const void **out) {
    moe_opstats *s = ctx;
    return s->in.ops->bind_weight(s->in.ctx, host, n, out);
}
static void w_unbind_weight(void *ctx, const void *bound) {
    moe_opstats *s = ctx;
    s->in.ops->unbind_weight(s->in.ctx, bound);
}
static int w_embed(void *ctx, const moe_weight *w, const int32_t *ids, int64_t n, float *out) {
    moe_opstats *s = ctx;
    if (s->count) s->tr.dense_bytes += n * (int64_t)moe_row_size(w->type, w->n_in);
    FWD(embed, w, ids, n, out);
}
static int w_get_rows(void *ctx, const float *x, int64_t xs, int64_t nc, const int32_t *rows, int64_t n, float *out) {
    moe_opstats *s = ctx;
    FWD(get_rows, x, xs, nc, rows, n, out);
}
static int w_rms_norm(void *ctx, const float *x, int64_t xs, float *y, int64_t ys, int64_t nr, int64_t n,
                      const float *w, float eps) {
    moe_opstats *s = ctx;
    if (s->count && w) s->tr.dense_bytes += n * (int64_t)sizeof(float);
    FWD(rms_norm, x, xs, y, ys, nr, n, w, eps);
}
static int w_matmul(void *ctx, const moe_weight *w, const float *x, int64_t n_tok, const float *bias, float *y) {
    moe_opstats *s = ctx;
    if (s->count) s->tr.dense_bytes += wbytes(w) + (bias ? w->n_out * (int64_t)sizeof(float) : 0);
    FWD(matmul, w, x, n_tok, bias, y);
}
static int w_add(void *ctx, float *y, const float *x, int64_t n) {
    moe_opstats *s = ctx;
    FWD(add, y, x, n);
}
static int w_mul(void *ctx, float *y, const float *x, int64_t n) {
    moe_opstats *s = ctx;
    FWD(mul, y, x, n);
}
static int w_swiglu(void *ctx, const float *g, const float *u, float *out, int64_t n) {
    moe_opstats *s = ctx;
    FWD(swiglu, g, u, out, n);
}
static int w_sigmoid_scale(void *ctx, float *y, const float *g, int64_t nr, int64_t n) {
    moe_opstats *s = ctx;
    FWD(sigmoid_scale, y, g, nr, n);
}
static int w_rope(void *ctx, float *x, int64_t n_tok, int64_t ts, int64_t nh, int64_t hs, const int32_t *pos,
                  const moe_rope_params *p) {
    moe_opstats *s = ctx;
    FWD(rope, x, n_tok, ts, nh, hs, pos, p);
}
static int w_kv_store(void *ctx, const moe_kv_view *kv, float *kc, float *vc, int64_t kw, int64_t vw, const float *k,
                      const float *v) {
    moe_opstats *s = ctx;
    FWD(kv_store, kv, kc, vc, kw, vw, k, v);
}

/* Each token reads its context: positions 0 .. pos[t], `slot` bytes each. */
static void count_kv(moe_opstats *s, const moe_kv_view *kv, int64_t slot) {
    for (int64_t t = 0; t < kv->n_tok; t++) s->tr.kv_bytes += ((int64_t)kv->pos[t] + 1) * slot;
}

static int w_attention(void *ctx, const moe_kv_view *kv, const float *q, const float *kc, const float *vc,
                       int64_t nh, int64_t nkv, int64_t hd, float scale, float *out) {
    moe_opstats *s = ctx;
    if (s->count) count_kv(s, kv, 2 * nkv * hd * (int64_t)sizeof(float));
    FWD(attention, kv, q, kc, vc, nh, nkv, hd, scale, out);
}
static int w_mla_attention(void *ctx, const moe_kv_view *kv, const float *q, const float *cache, int64_t kv_lora,
                           int64_t n_rot, int64_t nope, const moe_weight *k_b, const moe_weight *v_b, float scale,
                           float *out) {
    moe_opstats *s = ctx;
    if (s->count) {
        count_kv(s, kv, (kv_lora + n_rot) * (int64_t)sizeof(float));
        s->tr.dense_bytes += wbytes(k_b) + wbytes(v_b);
    }
    FWD(mla_attention, kv, q, cache, kv_lora, n_rot, nope, k_b, v_b, scale, out);
}

static int w_moe(void *ctx, const float *h, int64_t n_tok, const float *rl, const moe_route_params *rp,
                 const moe_weight *gate, const moe_weight *up, const moe_weight *down, float *out, int32_t *ids_out,
                 float *w_out) {
    moe_opstats *s = ctx;
    int32_t *ids = ids_out;
    int64_t n_ids = n_tok * rp->n_used;
    bool count = s->count;
    if (count && !ids) {
        if (moe_array_fit((void **)&s->ids, &s->ids_cap, n_ids, sizeof(int32_t))) {
            s->rc_count = MOE_ENOMEM;
            count = false;
        }
        ids = s->ids;
    }
    if (count && moe_array_fit((void **)&s->seen, &s->seen_cap, rp->n_expert, 1)) {
        s->rc_count = MOE_ENOMEM;
        count = false;
    }
    double t0 = s->time ? now() : 0;
    int rc = s->in.ops->moe(s->in.ctx, h, n_tok, rl, rp, gate, up, down, out, count ? ids : ids_out, w_out);
    if (s->time) {
        s->s[s->bucket][OP_moe] += now() - t0;
        s->calls[s->bucket][OP_moe]++;
    }
    if (count && !rc) {
        /* every byte once per step: each distinct expert's three matrices, the router bias */
        int64_t each = (wbytes(gate) + wbytes(up) + wbytes(down)) / (rp->n_expert > 0 ? rp->n_expert : 1);
        memset(s->seen, 0, (size_t)rp->n_expert);
        for (int64_t i = 0; i < n_ids; i++)
            if (ids[i] >= 0 && ids[i] < rp->n_expert && !s->seen[ids[i]]) {
                s->seen[ids[i]] = 1;
                s->tr.expert_reads++;
                s->tr.expert_bytes += each;
            }
        if (rp->bias) s->tr.dense_bytes += rp->n_expert * (int64_t)sizeof(float);
    }
    return rc;
}

moe_opstats *moe_opstats_create(const moe_backend *inner, moe_backend *out) {
    if (!inner || !inner->ops || !out) return NULL;
    moe_opstats *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->in = *inner;
    s->ops = (struct moe_backend_ops){
        .name = inner->ops->name, .supports_type = w_supports_type, .destroy = w_destroy, .alloc = w_alloc,
        .free = w_free, .upload = w_upload, .download = w_download, .bind_weight = w_bind_weight,
        .unbind_weight = w_unbind_weight, .embed = w_embed, .get_rows = w_get_rows, .rms_norm = w_rms_norm,
        .matmul = w_matmul, .add = w_add, .mul = w_mul, .swiglu = w_swiglu, .sigmoid_scale = w_sigmoid_scale,
        .rope = w_rope, .kv_store = w_kv_store, .attention = w_attention, .mla_attention = w_mla_attention,
        .moe = w_moe,
    };
    out->ops = &s->ops;
    out->ctx = s;
    return s;
}

void moe_opstats_free(moe_opstats *s) {
    if (!s) return;
    free(s->ids);
    free(s->seen);
    free(s);
}

void moe_opstats_begin_step(moe_opstats *s, int64_t n_tok, bool time, bool count) {
    if (!s) return;
    s->bucket = n_tok <= 1 ? 0 : n_tok <= 64 ? 1 : 2;
    s->time = time;
    s->count = count;
    if (count) {
        memset(&s->tr, 0, sizeof s->tr);
        s->rc_count = MOE_OK;
    }
}

int moe_opstats_traffic(const moe_opstats *s, moe_fwd_traffic *out) {
    if (!s || !out) return MOE_EINVAL;
    *out = s->tr;
    return s->rc_count;
}

void moe_opstats_log_profile(const moe_opstats *s) {
    static const char *bname[] = {"1 token", "2-64 tokens", "> 64 tokens"};
    for (int bk = 0; s && bk < 3; bk++) {
        double tot = 0;
        for (int i = 0; i < OP_COUNT; i++) tot += s->s[bk][i];
        if (tot == 0) continue;
        moe_log(MOE_LOG_INFO, "moe_fwd profile, steps of %s (%.3f s in ops):", bname[bk], tot);
        for (int i = 0; i < OP_COUNT; i++)
            if (s->calls[bk][i])
                moe_log(MOE_LOG_INFO, "  %-16s %9.3f s %5.1f%% %8lld calls %9.3f ms/call", OP_NAME[i], s->s[bk][i],
                        100.0 * s->s[bk][i] / tot, (long long)s->calls[bk][i],
                        1e3 * s->s[bk][i] / (double)s->calls[bk][i]);
    }
}
