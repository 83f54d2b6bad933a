/* forward.c - model set-up and the per-family forward passes.
 *
 * One decoder loop serves every family; what differs is chosen by the
 * hyper-parameters and by which tensors exist (biases, q/k norms, MoE vs
 * dense FFN, MLA). The loop only calls backend ops.
 */
#include "forward.h"

#include <math.h>
#include <stdarg.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qblocks.h"
#include "quant.h"

enum fam { FAM_LLAMA, FAM_QWEN2, FAM_QWEN2MOE, FAM_QWEN3MOE, FAM_DEEPSEEK2 };

typedef struct fwd_layer {
    moe_weight attn_norm, ffn_norm;
    /* GQA */
    moe_weight wq, wk, wv, bq, bk, bv, q_norm, k_norm;
    /* MLA (wq is reused when there is no q LoRA) */
    moe_weight q_a, q_a_norm, q_b, kv_a, kv_a_norm, k_b, v_b;
    moe_weight wo;
    /* dense FFN */
    moe_weight ffn_gate, ffn_up, ffn_down;
    /* MoE */
    moe_weight gate_inp, gate_exps, up_exps, down_exps, exp_probs_b;
    moe_weight gate_sh, up_sh, down_sh, gate_inp_sh;
    void *k_b_owned; /* backend buffers derived from attn_kv_b, or NULL */
    void *v_b_owned;
    int64_t dense_bytes;  /* every weight above but the routed experts */
    int64_t expert_bytes; /* one routed expert's gate + up + down */
} fwd_layer;

/* Per-step scratch in backend memory, kept across steps and grown when a
 * step has more tokens than any before (no allocation per decode step). */
typedef struct fwd_bufs {
    float *x;    /* (n_tok, n_embd) residual stream */
    float *h;    /* (n_tok, n_embd) normed */
    float *q;    /* (n_tok, H * dq) */
    float *k;    /* (n_tok, k_width) */
    float *v;    /* (n_tok, Hkv * dv) */
    float *att;  /* (n_tok, H * dv) */
    float *o;    /* (n_tok, n_embd) */
    float *ga;   /* (n_tok, max(ff, q_lora, E)) */
    float *up;   /* (n_tok, ff) */
    float *sh;   /* (n_tok, n_embd) */
    float *gl;   /* (n_tok) */
} fwd_bufs;

struct moe_fwd {
    const moe_gguf *g;
    moe_backend be;
    enum fam fam;
    int64_t n_layer, n_embd, n_vocab, n_head, n_head_kv, dk, dv, n_rot, ctx_len;
    float eps;
    int rope_style;
    float *inv_freq; /* host (n_rot / 2) */
    float attn_factor, attn_scale;
    /* MoE */
    int64_t n_expert, n_used, n_group, n_group_used;
    int gating;
    bool expert_norm;
    float expert_scale;
    /* DeepSeek */
    int64_t kv_lora, q_lora, nope, n_dense_lead;
    moe_weight tok_embd, out_norm, output;
    fwd_layer *layers;
    const void **bound; /* every bind_weight result, for unbinding */
    int64_t n_bound, cap_bound;
    float *hidden_out;
    int32_t *route_out;
    fwd_bufs B;
    int64_t cap;     /* tokens B holds */
    float *lg;       /* (lg_cap, n_vocab) logits */
    int64_t lg_cap;
    /* traffic counting (moe_fwd_set_count_traffic) */
    bool count_traffic;
    void (*layer_cb)(void *arg); /* moe_fwd_set_layer_cb */
    void *layer_arg;
    moe_fwd_traffic last;
    int32_t *ids;    /* host (ids_cap) routing of one layer when route_out is not set */
    int64_t ids_cap;
    uint8_t *seen;   /* host (n_expert) */
    /* MOE_FWD_PROFILE=1: wall time per op kind, printed to stderr by moe_fwd_free */
    bool prof;
    int n_prof;
    int prof_bucket; /* of the running step: 0 one token, 1 up to 64, 2 more */
    const char *prof_name[64];
    int prof_b[64];
    double prof_s[64];
    int64_t prof_calls[64];
};

static double prof_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Adds dt to the op `name` (a string literal: compared by address). */
static void prof_add(moe_fwd *fw, const char *name, double dt) {
    int i = 0;
    while (i < fw->n_prof && (fw->prof_name[i] != name || fw->prof_b[i] != fw->prof_bucket)) i++;
    if (i == fw->n_prof) {
        if (i == 64) return;
        fw->prof_name[i] = name;
        fw->prof_b[i] = fw->prof_bucket;
        fw->n_prof++;
    }
    fw->prof_s[i] += dt;
    fw->prof_calls[i]++;
}

static void seterr(char *err, size_t errsz, const char *fmt, ...) {
    if (!err || !errsz) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errsz, fmt, ap);
    va_end(ap);
}

static int64_t kvi(const moe_fwd *fw, const char *arch, const char *key, int64_t def) {
    char full[160];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    int64_t v;
    return moe_gguf_get_i64(fw->g, full, &v) == MOE_OK ? v : def;
}

static double kvf(const moe_fwd *fw, const char *arch, const char *key, double def) {
    char full[160];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    double v;
    return moe_gguf_get_f64(fw->g, full, &v) == MOE_OK ? v : def;
}

static bool kvb(const moe_fwd *fw, const char *arch, const char *key, bool def) {
    char full[160];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    bool v;
    return moe_gguf_get_bool(fw->g, full, &v) == MOE_OK ? v : def;
}

static int remember(moe_fwd *fw, const void *p) {
    if (fw->n_bound == fw->cap_bound) {
        int64_t cap = fw->cap_bound ? fw->cap_bound * 2 : 64;
        const void **nb = realloc(fw->bound, (size_t)cap * sizeof(*nb));
        if (!nb) return MOE_ENOMEM;
        fw->bound = nb;
        fw->cap_bound = cap;
    }
    fw->bound[fw->n_bound++] = p;
    return MOE_OK;
}

/* Binds tensor `name` into *w. Returns MOE_OK, MOE_ENOTFOUND (absent; *w
 * zeroed) or an error. ne[0] = n_in, ne[1] = n_out, ne[2] = n_mat. */
static int bind(moe_fwd *fw, const char *name, moe_weight *w) {
    memset(w, 0, sizeof(*w));
    const moe_gguf_tensor *t = moe_gguf_find_tensor(fw->g, name);
    if (!t) return MOE_ENOTFOUND;
    if (t->ne[3] != 1) return MOE_ESHAPE;
    /* 1-D tensors (norms, biases) feed f32 ops directly; matrices must be a
     * type the matmul kernels know, checked here rather than mid-request */
    if (t->n_dims == 1 ? t->type != MOE_TYPE_F32 : !moe_quant_supported(t->type)) return MOE_EUNSUPPORTED;
    const void *p = NULL;
    int rc = fw->be.ops->bind_weight(fw->be.ctx, t->data, (size_t)t->nbytes, &p);
    if (rc) return rc;
    rc = remember(fw, p);
    if (rc) {
        fw->be.ops->unbind_weight(fw->be.ctx, p);
        return rc;
    }
    w->type = t->type;
    w->data = p;
    w->n_in = t->ne[0];
    w->n_out = t->ne[1];
    w->n_mat = t->ne[2];
    w->mat_stride = 0;
    return MOE_OK;
}

static bool has(const moe_weight *w) { return w->data != NULL; }

/* Bytes of w's data (0 when absent). */
static int64_t wbytes(const moe_weight *w) {
    if (!has(w)) return 0;
    size_t ms = w->mat_stride ? w->mat_stride : (size_t)w->n_out * moe_row_size(w->type, w->n_in);
    return (int64_t)ms * (w->n_mat > 0 ? w->n_mat : 1);
}

void moe_rope_yarn_inv_freq(int64_t n_rot, double base, double factor, double orig_ctx, double beta_fast,
                            double beta_slow, float *inv_freq) {
    int64_t half = n_rot / 2;
    double low = 0, high = 0;
    if (factor > 1.0) {
        double d = (double)n_rot;
        double cf = d * log(orig_ctx / (beta_fast * 2 * M_PI)) / (2 * log(base));
        double cs = d * log(orig_ctx / (beta_slow * 2 * M_PI)) / (2 * log(base));
        low = floor(cf) > 0 ? floor(cf) : 0;
        high = ceil(cs) < d - 1 ? ceil(cs) : d - 1;
        if (low == high) high += 0.001; /* as transformers: avoid a zero-width ramp */
    }
    for (int64_t i = 0; i < half; i++) {
        double extra = pow(base, -2.0 * (double)i / (double)n_rot);
        if (factor > 1.0) {
            double ramp = ((double)i - low) / (high - low);
            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            inv_freq[i] = (float)(extra / factor * ramp + extra * (1 - ramp));
        } else {
            inv_freq[i] = (float)extra;
        }
    }
}

/* DeepSeek's original layout stores attn_kv_b (H*(nope+dv), kv_lora): MLA on
 * the latent cache wants per head k_b[h] (kv_lora rows of nope) = the
 * transpose of the k_nope block and v_b[h] = the V block, so derive both
 * once at load (what current convert_hf_to_gguf writes as attn_k_b/v_b). */
static int derive_kv_b(moe_fwd *fw, fwd_layer *L, const moe_gguf_tensor *t) {
    int64_t H = fw->n_head, nope = fw->nope, dv = fw->dv, r = fw->kv_lora;
    if (t->ne[0] != r || t->ne[1] != H * (nope + dv) || t->ne[2] != 1 || t->ne[3] != 1) return MOE_ESHAPE;
    if (!moe_quant_supported(t->type)) return MOE_EUNSUPPORTED;
    size_t rs = moe_row_size(t->type, r);
    float *row = malloc((size_t)r * sizeof(float));
    float *kb = malloc((size_t)H * (size_t)r * (size_t)nope * sizeof(float));
    int rc = (row && kb) ? MOE_OK : MOE_ENOMEM;
    for (int64_t h = 0; h < H && !rc; h++)
        for (int64_t n = 0; n < nope && !rc; n++) {
            rc = moe_dequantize_row(t->type, (const char *)t->data + (size_t)(h * (nope + dv) + n) * rs, row, r);
            for (int64_t c = 0; c < r && !rc; c++) kb[(h * r + c) * nope + n] = row[c];
        }
    /* Keep the file's precision class: exact transposition for F32/F16/BF16;
     * quantized kv_b is re-quantized to Q8_0 (a full-precision F32 copy would
     * be read every step and cost ~4x the bytes of the original). */
    int kt = MOE_TYPE_F32;
    if (t->type == MOE_TYPE_F16 || t->type == MOE_TYPE_BF16) kt = t->type;
    else if (t->type != MOE_TYPE_F32 && nope % moe_type_get(MOE_TYPE_Q8_0)->blck == 0) kt = MOE_TYPE_Q8_0;
    size_t krs = moe_row_size(kt, nope);
    size_t nb = (size_t)H * (size_t)r * krs;
    char *kq = rc ? NULL : malloc(nb);
    if (!rc && !kq) rc = MOE_ENOMEM;
    for (int64_t i = 0; i < H * r && !rc; i++) rc = moe_quantize_row(kt, kb + i * nope, kq + (size_t)i * krs, nope);
    /* V blocks copied packed (exact bytes), so both per-head stacks go
     * through one expert-batched product per step instead of one per head */
    size_t vnb = (size_t)H * (size_t)dv * rs;
    char *vq = rc ? NULL : malloc(vnb);
    if (!rc && !vq) rc = MOE_ENOMEM;
    for (int64_t h = 0; h < H && !rc; h++)
        memcpy(vq + (size_t)h * dv * rs, (const char *)t->data + (size_t)(h * (nope + dv) + nope) * rs, (size_t)dv * rs);
    if (!rc) {
        L->k_b_owned = fw->be.ops->alloc(fw->be.ctx, nb);
        L->v_b_owned = fw->be.ops->alloc(fw->be.ctx, vnb);
        if (!L->k_b_owned || !L->v_b_owned) rc = MOE_ENOMEM;
        if (!rc) rc = fw->be.ops->upload(fw->be.ctx, L->k_b_owned, kq, nb);
        if (!rc) rc = fw->be.ops->upload(fw->be.ctx, L->v_b_owned, vq, vnb);
    }
    free(kq);
    free(vq);
    if (!rc) {
        L->k_b = (moe_weight){.type = kt, .data = L->k_b_owned, .n_in = nope, .n_out = r, .n_mat = H};
        L->v_b = (moe_weight){.type = t->type, .data = L->v_b_owned, .n_in = r, .n_out = dv, .n_mat = H};
    }
    free(row);
    free(kb);
    return rc;
}

static void free_bufs(moe_fwd *fw) {
    float **all[] = {&fw->B.x, &fw->B.h, &fw->B.q, &fw->B.k, &fw->B.v, &fw->B.att, &fw->B.o,
                     &fw->B.ga, &fw->B.up, &fw->B.sh, &fw->B.gl, &fw->lg};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (*all[i]) fw->be.ops->free(fw->be.ctx, *all[i]);
        *all[i] = NULL;
    }
    fw->cap = fw->lg_cap = 0;
}

void moe_fwd_free(moe_fwd *fw) {
    if (!fw) return;
    if (fw->prof && fw->n_prof) {
        static const char *bname[] = {"1 token", "2-64 tokens", "> 64 tokens"};
        for (int bk = 0; bk < 3; bk++) {
            double tot = 0;
            for (int i = 0; i < fw->n_prof; i++) tot += fw->prof_b[i] == bk ? fw->prof_s[i] : 0;
            if (tot == 0) continue;
            fprintf(stderr, "moe_fwd profile, steps of %s (%.3f s in ops):\n", bname[bk], tot);
            for (int i = 0; i < fw->n_prof; i++)
                if (fw->prof_b[i] == bk)
                    fprintf(stderr, "  %-16s %9.3f s %5.1f%% %8lld calls %9.3f ms/call\n", fw->prof_name[i],
                            fw->prof_s[i], 100.0 * fw->prof_s[i] / tot, (long long)fw->prof_calls[i],
                            1e3 * fw->prof_s[i] / (double)fw->prof_calls[i]);
        }
    }
    free_bufs(fw);
    for (int64_t i = 0; i < fw->n_bound; i++) fw->be.ops->unbind_weight(fw->be.ctx, fw->bound[i]);
    for (int64_t il = 0; fw->layers && il < fw->n_layer; il++) {
        if (fw->layers[il].k_b_owned) fw->be.ops->free(fw->be.ctx, fw->layers[il].k_b_owned);
        if (fw->layers[il].v_b_owned) fw->be.ops->free(fw->be.ctx, fw->layers[il].v_b_owned);
    }
    free(fw->bound);
    free(fw->ids);
    free(fw->seen);
    free(fw->layers);
    free(fw->inv_freq);
    free(fw);
}

#define REQ(expr, what)                                                                                              \
    do {                                                                                                             \
        int rc_ = (expr);                                                                                            \
        if (rc_) {                                                                                                   \
            seterr(err, errsz, "%s: %s", what, rc_ == MOE_ENOTFOUND ? "missing" : moe_strerror(rc_));                \
            st = rc_ == MOE_ENOTFOUND ? MOE_EFORMAT : rc_;                                                           \
            goto fail;                                                                                               \
        }                                                                                                            \
    } while (0)
#define OPT(expr)                                                                                                    \
    do {                                                                                                             \
        int rc_ = (expr);                                                                                            \
        if (rc_ && rc_ != MOE_ENOTFOUND) {                                                                           \
            st = rc_;                                                                                                \
            seterr(err, errsz, "binding a tensor: %s", moe_strerror(rc_));                                           \
            goto fail;                                                                                               \
        }                                                                                                            \
    } while (0)

/* Does w hold n_out rows of n_in (for one matrix)? */
static bool shape_ok(const moe_weight *w, int64_t n_in, int64_t n_out) {
    return w->n_in == n_in && w->n_out == n_out;
}

moe_fwd *moe_fwd_create(const moe_gguf *g, const moe_backend *be, int *status, char *err, size_t errsz) {
    int st = MOE_EINVAL;
    moe_fwd *fw = NULL;
    char name[160];
    if (!g || !be || !be->ops) goto fail;
    st = MOE_ENOMEM;
    fw = calloc(1, sizeof(*fw));
    if (!fw) goto fail;
    fw->g = g;
    fw->be = *be;
    const char *pe = getenv("MOE_FWD_PROFILE");
    fw->prof = pe && *pe && strcmp(pe, "0");
    moe_gguf_str a;
    st = MOE_EFORMAT;
    if (moe_gguf_get_str(g, "general.architecture", &a) || a.len >= 32) {
        seterr(err, errsz, "general.architecture missing");
        goto fail;
    }
    char arch[32];
    memcpy(arch, a.ptr, a.len);
    arch[a.len] = 0;
    if (!strcmp(arch, "llama")) fw->fam = FAM_LLAMA;
    else if (!strcmp(arch, "qwen2")) fw->fam = FAM_QWEN2;
    else if (!strcmp(arch, "qwen2moe")) fw->fam = FAM_QWEN2MOE;
    else if (!strcmp(arch, "qwen3moe")) fw->fam = FAM_QWEN3MOE;
    else if (!strcmp(arch, "deepseek2")) fw->fam = FAM_DEEPSEEK2;
    else {
        st = MOE_EUNSUPPORTED;
        seterr(err, errsz, "architecture '%s' is not supported", arch);
        goto fail;
    }
    fw->n_layer = kvi(fw, arch, "block_count", 0);
    fw->n_embd = kvi(fw, arch, "embedding_length", 0);
    fw->n_head = kvi(fw, arch, "attention.head_count", 0);
    fw->n_head_kv = kvi(fw, arch, "attention.head_count_kv", fw->n_head);
    fw->ctx_len = kvi(fw, arch, "context_length", 4096);
    fw->eps = (float)kvf(fw, arch, "attention.layer_norm_rms_epsilon", 1e-6);
    if (fw->n_layer <= 0 || fw->n_layer > 100000 || fw->n_embd <= 0 || fw->n_head <= 0 || fw->n_head_kv <= 0 ||
        fw->n_head % fw->n_head_kv) {
        seterr(err, errsz, "bad or missing block_count/embedding_length/head counts");
        goto fail;
    }
    if (kvi(fw, arch, "attention.key_length_mla", 0) > 0) {
        fw->dk = kvi(fw, arch, "attention.key_length_mla", 0);
        fw->dv = kvi(fw, arch, "attention.value_length_mla", 0);
    } else {
        fw->dk = kvi(fw, arch, "attention.key_length", fw->n_embd / fw->n_head);
        fw->dv = kvi(fw, arch, "attention.value_length", fw->dk);
    }
    fw->n_rot = kvi(fw, arch, "rope.dimension_count", fw->dk);
    double base = kvf(fw, arch, "rope.freq_base", 10000.0);
    double factor = 1.0;
    moe_gguf_str stype = {0};
    char key[160];
    snprintf(key, sizeof key, "%s.rope.scaling.type", arch);
    bool yarn = moe_gguf_get_str(g, key, &stype) == MOE_OK && stype.len == 4 && !memcmp(stype.ptr, "yarn", 4);
    bool linear = stype.len == 6 && !memcmp(stype.ptr, "linear", 6);
    factor = kvf(fw, arch, "rope.scaling.factor", 1.0);
    if (!yarn && !linear) factor = 1.0;
    if (fw->n_rot <= 0 || (fw->n_rot & 1) || fw->n_rot > fw->dk || fw->dk <= 0 || fw->dv <= 0) {
        seterr(err, errsz, "bad head or rope dimensions");
        goto fail;
    }
    st = MOE_ENOMEM;
    fw->inv_freq = malloc((size_t)(fw->n_rot / 2) * sizeof(float));
    fw->layers = calloc((size_t)fw->n_layer, sizeof(fwd_layer));
    if (!fw->inv_freq || !fw->layers) goto fail;
    st = MOE_EFORMAT;
    if (yarn) {
        moe_rope_yarn_inv_freq(fw->n_rot, base, factor, kvf(fw, arch, "rope.scaling.original_context_length", 4096),
                               kvf(fw, arch, "rope.scaling.yarn_beta_fast", 32), kvf(fw, arch, "rope.scaling.yarn_beta_slow", 1),
                               fw->inv_freq);
    } else {
        moe_rope_yarn_inv_freq(fw->n_rot, base, 1.0, 0, 0, 0, fw->inv_freq);
        for (int64_t i = 0; i < fw->n_rot / 2; i++) fw->inv_freq[i] = (float)(fw->inv_freq[i] / factor);
    }
    /* Llama 3.1-style scaling ships per-pair frequency divisors (llama.cpp's
     * rope_freqs / rope_factors) */
    const moe_gguf_tensor *rf = moe_gguf_find_tensor(g, "rope_freqs.weight");
    if (rf) {
        if (rf->type != MOE_TYPE_F32 || rf->n_dims != 1 || rf->ne[0] != fw->n_rot / 2) {
            seterr(err, errsz, "rope_freqs.weight: want %lld F32 values", (long long)(fw->n_rot / 2));
            goto fail;
        }
        for (int64_t i = 0; i < fw->n_rot / 2; i++) {
            float d;
            memcpy(&d, (const char *)rf->data + i * sizeof(float), sizeof d);
            if (!(d > 0)) {
                seterr(err, errsz, "rope_freqs.weight: non-positive factor");
                goto fail;
            }
            fw->inv_freq[i] /= d;
        }
    }
    fw->rope_style = (fw->fam == FAM_LLAMA || fw->fam == FAM_DEEPSEEK2) ? MOE_ROPE_NORM : MOE_ROPE_NEOX;
    fw->attn_factor = 1.0f;
    fw->attn_scale = (float)(1.0 / sqrt((double)fw->dk));
    if (yarn && factor > 1.0) {
        if (fw->fam == FAM_DEEPSEEK2) {
            /* DeepSeek: mscale = mscale_all_dim, so cos/sin are unscaled and
             * the softmax scale carries mscale_all^2 */
            double m = 1.0 + kvf(fw, arch, "rope.scaling.yarn_log_multiplier", 0.0) * log(factor);
            fw->attn_scale = (float)(m * m / sqrt((double)fw->dk));
        } else {
            fw->attn_factor = (float)(1.0 + 0.1 * log(factor));
        }
    }
    /* MoE */
    fw->n_expert = kvi(fw, arch, "expert_count", 0);
    fw->n_used = kvi(fw, arch, "expert_used_count", 0);
    fw->n_group = kvi(fw, arch, "expert_group_count", 1);
    fw->n_group_used = kvi(fw, arch, "expert_group_used_count", fw->n_group);
    fw->gating = (int)kvi(fw, arch, "expert_gating_func", MOE_GATING_SOFTMAX);
    if (fw->gating != MOE_GATING_SOFTMAX && fw->gating != MOE_GATING_SIGMOID) {
        st = MOE_EUNSUPPORTED;
        seterr(err, errsz, "expert_gating_func %d", fw->gating);
        goto fail;
    }
    fw->expert_scale = (float)kvf(fw, arch, "expert_weights_scale", 1.0);
    switch (fw->fam) {
    case FAM_LLAMA: fw->expert_norm = true; break; /* Mixtral */
    case FAM_QWEN3MOE: fw->expert_norm = true; break;
    case FAM_QWEN2MOE: fw->expert_norm = false; break;
    default: fw->expert_norm = kvb(fw, arch, "expert_weights_norm", false); break;
    }
    if (fw->fam == FAM_DEEPSEEK2) {
        fw->kv_lora = kvi(fw, arch, "attention.kv_lora_rank", 0);
        fw->q_lora = kvi(fw, arch, "attention.q_lora_rank", 0);
        fw->n_dense_lead = kvi(fw, arch, "leading_dense_block_count", 0);
        fw->nope = fw->dk - fw->n_rot;
        if (fw->kv_lora <= 0 || fw->nope <= 0) {
            seterr(err, errsz, "deepseek2: bad kv_lora_rank or head sizes");
            goto fail;
        }
    }

    REQ(bind(fw, "token_embd.weight", &fw->tok_embd), "token_embd.weight");
    REQ(bind(fw, "output_norm.weight", &fw->out_norm), "output_norm.weight");
    if (bind(fw, "output.weight", &fw->output) == MOE_ENOTFOUND) fw->output = fw->tok_embd; /* tied */
    fw->n_vocab = fw->tok_embd.n_out;
    st = MOE_EFORMAT;
    if (fw->tok_embd.n_in != fw->n_embd || !shape_ok(&fw->output, fw->n_embd, fw->n_vocab) ||
        fw->out_norm.n_in != fw->n_embd || fw->out_norm.type != MOE_TYPE_F32) {
        seterr(err, errsz, "token_embd/output/output_norm shapes");
        goto fail;
    }

    for (int64_t il = 0; il < fw->n_layer; il++) {
        fwd_layer *L = &fw->layers[il];
#define T(suffix) (snprintf(name, sizeof name, "blk.%lld.%s", (long long)il, suffix), name)
        REQ(bind(fw, T("attn_norm.weight"), &L->attn_norm), name);
        REQ(bind(fw, T("ffn_norm.weight"), &L->ffn_norm), name);
        REQ(bind(fw, T("attn_output.weight"), &L->wo), name);
        int64_t H = fw->n_head;
        st = MOE_EFORMAT;
        if (!shape_ok(&L->wo, H * fw->dv, fw->n_embd)) {
            seterr(err, errsz, "%s: shape", T("attn_output.weight"));
            goto fail;
        }
        if (fw->fam == FAM_DEEPSEEK2) {
            int64_t dq = fw->nope + fw->n_rot;
            OPT(bind(fw, T("attn_q.weight"), &L->wq));
            if (!has(&L->wq)) {
                REQ(bind(fw, T("attn_q_a.weight"), &L->q_a), name);
                REQ(bind(fw, T("attn_q_a_norm.weight"), &L->q_a_norm), name);
                REQ(bind(fw, T("attn_q_b.weight"), &L->q_b), name);
                if (!shape_ok(&L->q_b, L->q_a.n_out, H * dq) || L->q_a.n_in != fw->n_embd ||
                    L->q_a_norm.n_in != L->q_a.n_out) {
                    st = MOE_EFORMAT;
                    seterr(err, errsz, "blk.%lld: q LoRA shapes", (long long)il);
                    goto fail;
                }
            } else if (!shape_ok(&L->wq, fw->n_embd, H * dq)) {
                st = MOE_EFORMAT;
                seterr(err, errsz, "%s: shape", T("attn_q.weight"));
                goto fail;
            }
            REQ(bind(fw, T("attn_kv_a_mqa.weight"), &L->kv_a), name);
            REQ(bind(fw, T("attn_kv_a_norm.weight"), &L->kv_a_norm), name);
            st = MOE_EFORMAT;
            if (!shape_ok(&L->kv_a, fw->n_embd, fw->kv_lora + fw->n_rot) || L->kv_a_norm.n_in != fw->kv_lora) {
                seterr(err, errsz, "blk.%lld: kv_a shapes", (long long)il);
                goto fail;
            }
            /* read at load only (derived into k_b/v_b), so never bound */
            const moe_gguf_tensor *kvb_t = moe_gguf_find_tensor(g, T("attn_kv_b.weight"));
            if (kvb_t) {
                int rc = derive_kv_b(fw, L, kvb_t);
                if (rc) {
                    st = rc == MOE_ESHAPE ? MOE_EFORMAT : rc;
                    seterr(err, errsz, "%s: %s", name, moe_strerror(rc));
                    goto fail;
                }
            } else {
                REQ(bind(fw, T("attn_k_b.weight"), &L->k_b), name);
                REQ(bind(fw, T("attn_v_b.weight"), &L->v_b), name);
                st = MOE_EFORMAT;
                if (!shape_ok(&L->k_b, fw->nope, fw->kv_lora) || L->k_b.n_mat != H ||
                    !shape_ok(&L->v_b, fw->kv_lora, fw->dv) || L->v_b.n_mat != H) {
                    seterr(err, errsz, "blk.%lld: attn_k_b/attn_v_b shapes", (long long)il);
                    goto fail;
                }
            }
        } else {
            REQ(bind(fw, T("attn_q.weight"), &L->wq), name);
            REQ(bind(fw, T("attn_k.weight"), &L->wk), name);
            REQ(bind(fw, T("attn_v.weight"), &L->wv), name);
            OPT(bind(fw, T("attn_q.bias"), &L->bq));
            OPT(bind(fw, T("attn_k.bias"), &L->bk));
            OPT(bind(fw, T("attn_v.bias"), &L->bv));
            OPT(bind(fw, T("attn_q_norm.weight"), &L->q_norm));
            OPT(bind(fw, T("attn_k_norm.weight"), &L->k_norm));
            st = MOE_EFORMAT;
            if (!shape_ok(&L->wq, fw->n_embd, H * fw->dk) || !shape_ok(&L->wk, fw->n_embd, fw->n_head_kv * fw->dk) ||
                !shape_ok(&L->wv, fw->n_embd, fw->n_head_kv * fw->dv) ||
                (has(&L->q_norm) && L->q_norm.n_in != fw->dk) || (has(&L->k_norm) && L->k_norm.n_in != fw->dk)) {
                seterr(err, errsz, "blk.%lld: attention shapes", (long long)il);
                goto fail;
            }
        }
        OPT(bind(fw, T("ffn_gate_inp.weight"), &L->gate_inp));
        if (has(&L->gate_inp)) {
            REQ(bind(fw, T("ffn_gate_exps.weight"), &L->gate_exps), name);
            REQ(bind(fw, T("ffn_up_exps.weight"), &L->up_exps), name);
            REQ(bind(fw, T("ffn_down_exps.weight"), &L->down_exps), name);
            OPT(bind(fw, T("exp_probs_b.bias"), &L->exp_probs_b));
            OPT(bind(fw, T("ffn_gate_shexp.weight"), &L->gate_sh));
            if (has(&L->gate_sh)) {
                REQ(bind(fw, T("ffn_up_shexp.weight"), &L->up_sh), name);
                REQ(bind(fw, T("ffn_down_shexp.weight"), &L->down_sh), name);
                OPT(bind(fw, T("ffn_gate_inp_shexp.weight"), &L->gate_inp_sh));
            }
            st = MOE_EFORMAT;
            int64_t E = fw->n_expert;
            if (E <= 0 || fw->n_used <= 0 || fw->n_used > E || !shape_ok(&L->gate_inp, fw->n_embd, E) ||
                L->gate_exps.n_mat != E || L->up_exps.n_mat != E || L->down_exps.n_mat != E ||
                L->gate_exps.n_in != fw->n_embd || L->down_exps.n_out != fw->n_embd ||
                (has(&L->exp_probs_b) && L->exp_probs_b.n_in != E) ||
                (fw->n_group > 1 && (E % fw->n_group || fw->n_group_used < 1 || fw->n_group_used > fw->n_group)) ||
                (has(&L->gate_inp_sh) && L->gate_inp_sh.n_in * L->gate_inp_sh.n_out != fw->n_embd)) {
                seterr(err, errsz, "blk.%lld: MoE shapes or expert counts", (long long)il);
                goto fail;
            }
            if (has(&L->gate_inp_sh)) { /* declared {n_embd} by llama.cpp: one output row either way */
                L->gate_inp_sh.n_in = fw->n_embd;
                L->gate_inp_sh.n_out = 1;
            }
        } else {
            REQ(bind(fw, T("ffn_gate.weight"), &L->ffn_gate), name);
            REQ(bind(fw, T("ffn_up.weight"), &L->ffn_up), name);
            REQ(bind(fw, T("ffn_down.weight"), &L->ffn_down), name);
            st = MOE_EFORMAT;
            if (L->ffn_gate.n_in != fw->n_embd || !shape_ok(&L->ffn_down, L->ffn_gate.n_out, fw->n_embd)) {
                seterr(err, errsz, "blk.%lld: FFN shapes", (long long)il);
                goto fail;
            }
        }
#undef T
        if (L->attn_norm.n_in != fw->n_embd || L->ffn_norm.n_in != fw->n_embd) {
            st = MOE_EFORMAT;
            seterr(err, errsz, "blk.%lld: norm shapes", (long long)il);
            goto fail;
        }
    }
    for (int64_t il = 0; il < fw->n_layer; il++) {
        fwd_layer *L = &fw->layers[il];
        const moe_weight *dense[] = {&L->attn_norm, &L->ffn_norm, &L->wq,       &L->wk,        &L->wv,
                                     &L->bq,        &L->bk,       &L->bv,       &L->q_norm,    &L->k_norm,
                                     &L->q_a,       &L->q_a_norm, &L->q_b,      &L->kv_a,      &L->kv_a_norm,
                                     &L->k_b,       &L->v_b,      &L->wo,       &L->ffn_gate,  &L->ffn_up,
                                     &L->ffn_down,  &L->gate_inp, &L->exp_probs_b, &L->gate_sh, &L->up_sh,
                                     &L->down_sh,   &L->gate_inp_sh};
        for (size_t i = 0; i < sizeof dense / sizeof dense[0]; i++) L->dense_bytes += wbytes(dense[i]);
        if (has(&L->gate_inp))
            L->expert_bytes = (wbytes(&L->gate_exps) + wbytes(&L->up_exps) + wbytes(&L->down_exps)) / fw->n_expert;
    }
    if (status) *status = MOE_OK;
    return fw;
fail:
    moe_fwd_free(fw);
    if (status) *status = st;
    return NULL;
}

int64_t moe_fwd_n_vocab(const moe_fwd *fw) { return fw ? fw->n_vocab : 0; }
int64_t moe_fwd_n_layer(const moe_fwd *fw) { return fw ? fw->n_layer : 0; }
int64_t moe_fwd_n_embd(const moe_fwd *fw) { return fw ? fw->n_embd : 0; }
int64_t moe_fwd_ctx_len(const moe_fwd *fw) { return fw ? fw->ctx_len : 0; }
void moe_fwd_set_hidden_out(moe_fwd *fw, float *hidden) {
    if (fw) fw->hidden_out = hidden;
}

void moe_fwd_set_route_out(moe_fwd *fw, int32_t *ids) {
    if (fw) fw->route_out = ids;
}

int64_t moe_fwd_n_expert_used(const moe_fwd *fw) { return fw ? fw->n_used : 0; }

void moe_fwd_set_layer_cb(moe_fwd *fw, void (*cb)(void *arg), void *arg) {
    if (!fw) return;
    fw->layer_cb = cb;
    fw->layer_arg = arg;
}

void moe_fwd_set_count_traffic(moe_fwd *fw, bool on) {
    if (fw) fw->count_traffic = on;
}

int moe_fwd_last_traffic(const moe_fwd *fw, moe_fwd_traffic *out) {
    if (!fw || !out) return MOE_EINVAL;
    *out = fw->last;
    return MOE_OK;
}

int64_t moe_fwd_weight_bytes(const moe_fwd *fw) {
    if (!fw) return 0;
    int64_t n = wbytes(&fw->out_norm) + wbytes(&fw->output);
    for (int64_t il = 0; il < fw->n_layer; il++)
        n += fw->layers[il].dense_bytes + fw->layers[il].expert_bytes * fw->n_expert;
    return n;
}

int moe_fwd_kv_opts(const moe_fwd *fw, int64_t block_size, int64_t n_blocks, moe_kv_opts *out) {
    if (!fw || !out) return MOE_EINVAL;
    out->n_layer = fw->n_layer;
    out->block_size = block_size;
    out->n_blocks = n_blocks;
    if (fw->fam == FAM_DEEPSEEK2) {
        out->k_width = fw->kv_lora + fw->n_rot; /* the latent and the shared roped k_pe, nothing expanded */
        out->v_width = 0;
    } else {
        out->k_width = fw->n_head_kv * fw->dk;
        out->v_width = fw->n_head_kv * fw->dv;
    }
    return MOE_OK;
}


#define CK(expr)                                                                                                     \
    do {                                                                                                             \
        rc = (expr);                                                                                                 \
        if (rc) goto out;                                                                                            \
    } while (0)
/* CK, timing the op under `name` when profiling */
#define CKP(name, expr)                                                                                              \
    do {                                                                                                             \
        double t0_ = fw->prof ? prof_now() : 0;                                                                      \
        rc = (expr);                                                                                                 \
        if (fw->prof) prof_add(fw, name, prof_now() - t0_);                                                          \
        if (rc) goto out;                                                                                            \
    } while (0)

/* y = down(silu(gate x) * up x) */
static int ffn(moe_fwd *fw, const moe_weight *gate, const moe_weight *up, const moe_weight *down, const float *x,
               int64_t n_tok, float *ga, float *ub, float *y) {
    const struct moe_backend_ops *op = fw->be.ops;
    void *c = fw->be.ctx;
    int rc = op->matmul(c, gate, x, n_tok, NULL, ga);
    if (!rc) rc = op->matmul(c, up, x, n_tok, NULL, ub);
    if (!rc) rc = op->swiglu(c, ga, ub, ga, n_tok * gate->n_out);
    if (!rc) rc = op->matmul(c, down, ga, n_tok, NULL, y);
    return rc;
}

int moe_fwd_run(moe_fwd *fw, moe_kv_cache *kvc, const moe_batch *b, float *logits) {
    if (!fw || !kvc || !b || !logits || b->n_tok <= 0 || !b->ids || !b->pos || !b->seq || b->n_seq <= 0 || !b->seqs)
        return MOE_EINVAL;
    const moe_kv_opts *ko = moe_kv_get_opts(kvc);
    moe_kv_opts want;
    moe_fwd_kv_opts(fw, ko->block_size, ko->n_blocks, &want);
    if (ko->n_layer != want.n_layer || ko->k_width != want.k_width || ko->v_width != want.v_width) return MOE_EINVAL;
    for (int64_t t = 0; t < b->n_tok; t++)
        if (b->ids[t] < 0 || b->ids[t] >= fw->n_vocab || b->seq[t] < 0 || b->seq[t] >= b->n_seq || b->pos[t] < 0)
            return MOE_EINVAL;

    const struct moe_backend_ops *op = fw->be.ops;
    void *c = fw->be.ctx;
    int64_t n = b->n_tok, E = fw->n_embd, H = fw->n_head, Hkv = fw->n_head_kv;
    bool mla = fw->fam == FAM_DEEPSEEK2;
    int64_t dq = fw->dk;
    int64_t kw = mla ? fw->kv_lora + fw->n_rot : Hkv * fw->dk;
    int64_t wide = fw->n_expert > 0 ? fw->n_expert : 1;
    for (int64_t il = 0; il < fw->n_layer; il++) {
        const fwd_layer *L = &fw->layers[il];
        int64_t w[] = {L->ffn_gate.n_out, L->gate_exps.n_out, L->gate_sh.n_out, L->q_a.n_out};
        for (size_t i = 0; i < sizeof w / sizeof w[0]; i++) wide = w[i] > wide ? w[i] : wide;
    }

    /* flatten the block tables */
    int64_t n_bt = 0;
    for (int64_t s = 0; s < b->n_seq; s++) n_bt += b->seqs[s].n_blocks;
    int32_t *bt = malloc((size_t)(n_bt ? n_bt : 1) * sizeof(int32_t));
    int64_t *boff = malloc((size_t)(b->n_seq + 1) * sizeof(int64_t));
    int32_t *rows = malloc((size_t)n * sizeof(int32_t));
    int rc = (bt && boff && rows) ? MOE_OK : MOE_ENOMEM;
    if (rc) goto out;
    boff[0] = 0;
    for (int64_t s = 0; s < b->n_seq; s++) {
        if (b->seqs[s].n_blocks) memcpy(bt + boff[s], b->seqs[s].blocks, (size_t)b->seqs[s].n_blocks * sizeof(int32_t));
        boff[s + 1] = boff[s] + b->seqs[s].n_blocks;
    }
    moe_kv_view kv = {.block_size = ko->block_size, .n_seq = b->n_seq, .block_table = bt, .block_off = boff,
                      .seq = b->seq, .pos = b->pos, .n_tok = n};
    for (int64_t t = 0; t < n; t++)
        if (b->pos[t] / ko->block_size >= b->seqs[b->seq[t]].n_blocks) {
            rc = MOE_EINVAL;
            goto out;
        }

    size_t fs = sizeof(float);
    if (n > fw->cap) {
        free_bufs(fw);
        fwd_bufs *A = &fw->B;
        A->x = op->alloc(c, (size_t)n * E * fs);
        A->h = op->alloc(c, (size_t)n * E * fs);
        A->q = op->alloc(c, (size_t)n * H * dq * fs);
        A->k = op->alloc(c, (size_t)n * kw * fs);
        A->v = op->alloc(c, (size_t)n * (Hkv * fw->dv) * fs);
        A->att = op->alloc(c, (size_t)n * H * fw->dv * fs);
        A->o = op->alloc(c, (size_t)n * E * fs);
        A->ga = op->alloc(c, (size_t)n * wide * fs);
        A->up = op->alloc(c, (size_t)n * wide * fs);
        A->sh = op->alloc(c, (size_t)n * E * fs);
        A->gl = op->alloc(c, (size_t)n * fs);
        if (!A->x || !A->h || !A->q || !A->k || !A->v || !A->att || !A->o || !A->ga || !A->up || !A->sh || !A->gl) {
            free_bufs(fw);
            rc = MOE_ENOMEM;
            goto out;
        }
        fw->cap = n;
    }
    fw->prof_bucket = n == 1 ? 0 : n <= 64 ? 1 : 2;
    moe_fwd_traffic tr = {0};
    bool count = fw->count_traffic;
    if (count) {
        int64_t need = n * (fw->n_used > 0 ? fw->n_used : 1);
        if (need > fw->ids_cap) {
            free(fw->ids);
            fw->ids = malloc((size_t)need * sizeof(int32_t));
            fw->ids_cap = fw->ids ? need : 0;
        }
        if (!fw->seen && fw->n_expert > 0) fw->seen = malloc((size_t)fw->n_expert);
        if (!fw->ids || (fw->n_expert > 0 && !fw->seen)) {
            rc = MOE_ENOMEM;
            goto out;
        }
        int64_t slot = (kw + (mla ? 0 : Hkv * fw->dv)) * (int64_t)fs * fw->n_layer;
        for (int64_t t = 0; t < n; t++) tr.kv_bytes += ((int64_t)b->pos[t] + 1) * slot;
        tr.dense_bytes = n * (int64_t)moe_row_size(fw->tok_embd.type, E);
    }
    fwd_bufs B = fw->B;
    moe_rope_params rp = {.style = fw->rope_style, .n_rot = fw->n_rot, .inv_freq = fw->inv_freq,
                          .attn_factor = fw->attn_factor};

    CKP("embed", op->embed(c, &fw->tok_embd, b->ids, n, B.x));
    for (int64_t il = 0; il < fw->n_layer; il++) {
        const fwd_layer *L = &fw->layers[il];
        tr.dense_bytes += L->dense_bytes;
        CKP("rms_norm", op->rms_norm(c, B.x, E, B.h, E, n, E, L->attn_norm.data, fw->eps));
        if (mla) {
            if (has(&L->wq)) {
                CKP("wq", op->matmul(c, &L->wq, B.h, n, NULL, B.q));
            } else {
                int64_t ql = L->q_a.n_out;
                CKP("q_a", op->matmul(c, &L->q_a, B.h, n, NULL, B.ga));
                CKP("rms_norm", op->rms_norm(c, B.ga, ql, B.ga, ql, n, ql, L->q_a_norm.data, fw->eps));
                CKP("q_b", op->matmul(c, &L->q_b, B.ga, n, NULL, B.q));
            }
            CKP("kv_a", op->matmul(c, &L->kv_a, B.h, n, NULL, B.k));
            /* norm the latent only; k_pe (the last n_rot) is roped, not normed */
            CKP("rms_norm", op->rms_norm(c, B.k, kw, B.k, kw, n, fw->kv_lora, L->kv_a_norm.data, fw->eps));
            CKP("rope", op->rope(c, B.k + fw->kv_lora, n, kw, 1, kw, b->pos, &rp));
            CKP("rope", op->rope(c, B.q + fw->nope, n, H * dq, H, dq, b->pos, &rp));
            CKP("kv_store", op->kv_store(c, &kv, moe_kv_k(kvc, il), NULL, kw, 0, B.k, NULL));
            CKP("mla_attention", op->mla_attention(c, &kv, B.q, moe_kv_k(kvc, il), fw->kv_lora, fw->n_rot, fw->nope, &L->k_b, &L->v_b,
                                 fw->attn_scale, B.att));
        } else {
            CKP("wq", op->matmul(c, &L->wq, B.h, n, has(&L->bq) ? L->bq.data : NULL, B.q));
            CKP("wk", op->matmul(c, &L->wk, B.h, n, has(&L->bk) ? L->bk.data : NULL, B.k));
            CKP("wv", op->matmul(c, &L->wv, B.h, n, has(&L->bv) ? L->bv.data : NULL, B.v));
            if (has(&L->q_norm)) CKP("rms_norm", op->rms_norm(c, B.q, dq, B.q, dq, n * H, dq, L->q_norm.data, fw->eps));
            if (has(&L->k_norm)) CKP("rms_norm", op->rms_norm(c, B.k, dq, B.k, dq, n * Hkv, dq, L->k_norm.data, fw->eps));
            CKP("rope", op->rope(c, B.q, n, H * dq, H, dq, b->pos, &rp));
            CKP("rope", op->rope(c, B.k, n, Hkv * dq, Hkv, dq, b->pos, &rp));
            CKP("kv_store", op->kv_store(c, &kv, moe_kv_k(kvc, il), moe_kv_v(kvc, il), kw, Hkv * fw->dv, B.k, B.v));
            CKP("attention", op->attention(c, &kv, B.q, moe_kv_k(kvc, il), moe_kv_v(kvc, il), H, Hkv, fw->dk, fw->attn_scale, B.att));
        }
        CKP("wo", op->matmul(c, &L->wo, B.att, n, NULL, B.o));
        CKP("add", op->add(c, B.x, B.o, n * E));
        CKP("rms_norm", op->rms_norm(c, B.x, E, B.h, E, n, E, L->ffn_norm.data, fw->eps));
        if (has(&L->gate_inp)) {
            moe_route_params r = {.gating = fw->gating, .n_expert = fw->n_expert, .n_used = fw->n_used,
                                  .n_group = fw->n_group, .n_group_used = fw->n_group_used,
                                  .norm = fw->expert_norm, .scale = fw->expert_scale,
                                  .bias = has(&L->exp_probs_b) ? L->exp_probs_b.data : NULL};
            CKP("gate_inp", op->matmul(c, &L->gate_inp, B.h, n, NULL, B.ga));
            int32_t *ids = fw->route_out ? fw->route_out + il * n * fw->n_used : count ? fw->ids : NULL;
            CKP("moe", op->moe(c, B.h, n, B.ga, &r, &L->gate_exps, &L->up_exps, &L->down_exps, B.o, ids, NULL));
            if (count) {
                memset(fw->seen, 0, (size_t)fw->n_expert);
                for (int64_t i = 0; i < n * fw->n_used; i++)
                    if (ids[i] >= 0 && ids[i] < fw->n_expert && !fw->seen[ids[i]]) {
                        fw->seen[ids[i]] = 1;
                        tr.expert_reads++;
                        tr.expert_bytes += L->expert_bytes;
                    }
            }
            if (has(&L->gate_sh)) {
                CKP("shared_ffn", ffn(fw, &L->gate_sh, &L->up_sh, &L->down_sh, B.h, n, B.ga, B.up, B.sh));
                if (has(&L->gate_inp_sh)) {
                    CKP("gate_inp_sh", op->matmul(c, &L->gate_inp_sh, B.h, n, NULL, B.gl));
                    CKP("sigmoid_scale", op->sigmoid_scale(c, B.sh, B.gl, n, E));
                }
                CKP("add", op->add(c, B.o, B.sh, n * E));
            }
        } else {
            CKP("dense_ffn", ffn(fw, &L->ffn_gate, &L->ffn_up, &L->ffn_down, B.h, n, B.ga, B.up, B.o));
        }
        CKP("add", op->add(c, B.x, B.o, n * E));
        if (fw->hidden_out) CKP("download", op->download(c, fw->hidden_out + il * n * E, B.x, (size_t)n * E * fs));
        if (fw->layer_cb) fw->layer_cb(fw->layer_arg);
    }
    /* logits only for the rows that want them */
    int64_t n_out = 0;
    for (int64_t t = 0; t < n; t++)
        if (!b->want_logits || b->want_logits[t]) rows[n_out++] = (int32_t)t;
    if (n_out) {
        if (n_out > fw->lg_cap) {
            if (fw->lg) op->free(c, fw->lg);
            fw->lg = op->alloc(c, (size_t)n_out * fw->n_vocab * fs);
            fw->lg_cap = fw->lg ? n_out : 0;
            if (!fw->lg) {
                rc = MOE_ENOMEM;
                goto out;
            }
        }
        float *lg = fw->lg;
        double t0 = fw->prof ? prof_now() : 0;
        rc = op->get_rows(c, B.x, E, E, rows, n_out, B.h);
        if (!rc) rc = op->rms_norm(c, B.h, E, B.h, E, n_out, E, fw->out_norm.data, fw->eps);
        if (!rc) rc = op->matmul(c, &fw->output, B.h, n_out, NULL, lg);
        if (!rc) rc = op->download(c, logits, lg, (size_t)n_out * fw->n_vocab * fs);
        if (fw->prof) prof_add(fw, "output", prof_now() - t0);
        tr.dense_bytes += wbytes(&fw->out_norm) + wbytes(&fw->output);
    }
    if (!rc && count) fw->last = tr;
out:
    free(bt);
    free(boff);
    free(rows);
    return rc;
}
