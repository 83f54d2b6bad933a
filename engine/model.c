/* model.c - hyper-parameters from GGUF metadata and tensor binding with
 * shape checks. The key names and defaults follow llama.cpp's
 * llama-arch.cpp / llama-model.cpp so downloaded files load as they are. */
#include "model.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "array.h"
#include "log_hook.h"
#include "quant.h"

/* Dimensions beyond this are refused: they would overflow the int64
 * products of a layer's shapes long before any real model gets there. */
#define DIM_MAX ((int64_t)1 << 24)

struct moe_model {
    moe_gguf *g;
    char arch[32];
    moe_hparams hp;
    moe_model_weights w;
    int64_t n_params, n_active;
    uint64_t n_bytes;
    const moe_gguf_tensor **bound; /* sorted after load: every bound tensor, for the extra-tensor warning */
    int64_t n_bound, cap_bound;
};

static const char *const ARCH_NAMES[MOE_ARCH_COUNT] = {
    [MOE_ARCH_LLAMA] = "llama",         [MOE_ARCH_QWEN2] = "qwen2",         [MOE_ARCH_QWEN2MOE] = "qwen2moe",
    [MOE_ARCH_QWEN3MOE] = "qwen3moe",   [MOE_ARCH_DEEPSEEK2] = "deepseek2",
};

const char *moe_arch_name(moe_arch a) {
    return (unsigned)a < MOE_ARCH_COUNT ? ARCH_NAMES[a] : "unknown";
}

int moe_arch_from_name(const char *name, moe_arch *out) {
    for (int i = 0; name && i < MOE_ARCH_COUNT; i++)
        if (strcmp(name, ARCH_NAMES[i]) == 0) {
            *out = (moe_arch)i;
            return MOE_OK;
        }
    return MOE_EUNSUPPORTED;
}

typedef struct loader {
    moe_model *m;
    char *err;
    size_t errsz;
} loader;

static void key_of(const loader *L, const char *suffix, char *buf, size_t n) {
    snprintf(buf, n, "%s.%s", L->m->arch, suffix);
}

/* Integer key <arch>.<suffix>. Absent: *out = def and MOE_OK, unless
 * required (MOE_EFORMAT naming the key). Present but not an integer in
 * [lo, hi]: MOE_EFORMAT. */
static int get_int(loader *L, const char *suffix, bool required, int64_t def, int64_t lo, int64_t hi,
                   int64_t *out) {
    char key[160];
    key_of(L, suffix, key, sizeof key);
    const moe_gguf_kv *kv = moe_gguf_find_kv(L->m->g, key);
    if (!kv) {
        if (required) {
            return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "missing required key '%s'", key);
        }
        *out = def;
        return MOE_OK;
    }
    int64_t v;
    if (kv->value.type == MOE_GGUF_ARRAY) {
        /* llama.cpp allows per-layer arrays for a few keys (feed_forward_length,
         * head_count); moed supports them when every layer agrees */
        const moe_gguf_array *a = &kv->value.v.arr;
        if (a->n == 0 || moe_gguf_arr_i64(a, 0, &v) != MOE_OK) goto bad;
        for (uint64_t i = 1; i < a->n; i++) {
            int64_t x;
            if (moe_gguf_arr_i64(a, i, &x) != MOE_OK) goto bad;
            if (x != v) {
                return moe_seterr(L->err, L->errsz, MOE_EUNSUPPORTED, "key '%s': per-layer values that differ are not supported", key);
            }
        }
    } else if (moe_gguf_get_i64(L->m->g, key, &v) != MOE_OK) {
        goto bad;
    }
    if (v < lo || v > hi) {
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "key '%s' = %lld is out of range [%lld, %lld]", key, (long long)v, (long long)lo,
                          (long long)hi);
    }
    *out = v;
    return MOE_OK;
bad:
    return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "key '%s' is not an integer", key);
}

static int get_f64(loader *L, const char *suffix, bool required, double def, double *out) {
    char key[160];
    key_of(L, suffix, key, sizeof key);
    int rc = moe_gguf_get_f64(L->m->g, key, out);
    if (rc == MOE_ENOTFOUND && !required) {
        *out = def;
        return MOE_OK;
    }
    if (rc == MOE_ENOTFOUND) {
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "missing required key '%s'", key);
    }
    if (rc != MOE_OK || !(*out == *out)) {
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "key '%s' is not a number", key);
    }
    return MOE_OK;
}

static int get_bool(loader *L, const char *suffix, bool def, bool *out) {
    char key[160];
    key_of(L, suffix, key, sizeof key);
    int rc = moe_gguf_get_bool(L->m->g, key, out);
    if (rc == MOE_ENOTFOUND) {
        *out = def;
        return MOE_OK;
    }
    if (rc != MOE_OK) {
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "key '%s' is not a bool", key);
    }
    return MOE_OK;
}

/* A float key that must be finite and, when `positive`, > 0: the forward
 * pass divides by or takes the log of these, so 0, NaN and Inf would turn
 * every logit into NaN. MOE_EFORMAT naming the key otherwise. */
static int get_finite(loader *L, const char *suffix, double def, bool positive, double *out) {
    MOE_TRY(get_f64(L, suffix, false, def, out));
    /* finite as a float too: the forward pass keeps some of them in floats */
    if (!isfinite(*out) || fabs(*out) > FLT_MAX || (positive && !(*out > 0))) {
        char key[160];
        key_of(L, suffix, key, sizeof key);
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "key '%s' = %g must be %s", key, *out, positive ? "finite and > 0" : "finite");
    }
    return MOE_OK;
}

static int read_hparams(loader *L) {
    moe_hparams *hp = &L->m->hp;
    moe_arch a = hp->arch;
    const int64_t D = DIM_MAX;
    MOE_TRY(get_int(L, "block_count", true, 0, 1, 4096, &hp->n_layer));
    MOE_TRY(get_int(L, "embedding_length", true, 0, 1, D, &hp->n_embd));
    MOE_TRY(get_int(L, "context_length", true, 0, 1, (int64_t)1 << 40, &hp->n_ctx_train));
    MOE_TRY(get_int(L, "attention.head_count", true, 0, 1, 65536, &hp->n_head));
    MOE_TRY(get_int(L, "attention.head_count_kv", false, hp->n_head, 1, hp->n_head, &hp->n_head_kv));
    if (hp->n_head % hp->n_head_kv) {
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "%s.attention.head_count %lld is not a multiple of head_count_kv %lld", L->m->arch,
                          (long long)hp->n_head, (long long)hp->n_head_kv);
    }
    MOE_TRY(get_int(L, "feed_forward_length", false, 0, 0, D, &hp->n_ff));
    double eps;
    MOE_TRY(get_f64(L, "attention.layer_norm_rms_epsilon", true, 0, &eps));
    /* as a float (what the norms add): a tiny eps would round to 0 */
    if (!(eps > 0 && eps < 1) || !((float)eps > 0)) {
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "key '%s.attention.layer_norm_rms_epsilon' = %g is out of range (0, 1)", L->m->arch,
                          eps);
    }
    hp->rms_eps = (float)eps;

    int64_t dk_mla = 0, dv_mla = 0;
    MOE_TRY(get_int(L, "attention.key_length_mla", false, 0, 0, D, &dk_mla));
    MOE_TRY(get_int(L, "attention.value_length_mla", false, 0, 0, D, &dv_mla));
    if (dk_mla > 0) {
        hp->n_embd_head_k = dk_mla;
        hp->n_embd_head_v = dv_mla > 0 ? dv_mla : dk_mla;
    } else {
        int64_t def = hp->n_embd / hp->n_head;
        MOE_TRY(get_int(L, "attention.key_length", false, def, 1, D, &hp->n_embd_head_k));
        MOE_TRY(get_int(L, "attention.value_length", false, hp->n_embd_head_k, 1, D, &hp->n_embd_head_v));
    }
    if (hp->n_embd_head_k < 1) {
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "%s: head size is 0 (embedding_length < head_count and no key_length)", L->m->arch);
    }
    MOE_TRY(get_int(L, "rope.dimension_count", false, hp->n_embd_head_k, 2, hp->n_embd_head_k, &hp->n_rot));
    if (hp->n_rot & 1) {
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "%s.rope.dimension_count %lld is odd", L->m->arch, (long long)hp->n_rot);
    }
    MOE_TRY(get_finite(L, "rope.freq_base", 10000.0, true, &hp->rope_freq_base));
    double factor;
    MOE_TRY(get_f64(L, "rope.scaling.factor", false, 1.0, &factor));
    char key[160];
    key_of(L, "rope.scaling.type", key, sizeof key);
    moe_gguf_str st;
    bool typed = moe_gguf_get_str(L->m->g, key, &st) == MOE_OK;
    bool scaled = typed && !(st.len == 4 && !memcmp(st.ptr, "none", 4));
    /* llama.cpp reads a factor of 0 as none; with a scaling type named the
     * forward pass would divide by it, so there it is an error */
    if (factor == 0 && scaled) {
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "key '%s.rope.scaling.factor' = 0 with rope scaling '%.*s': the factor must be >= 1",
                          L->m->arch, (int)(st.len > 32 ? 32 : st.len), st.ptr);
    }
    hp->rope_scaling_factor = factor == 0 ? 1.0 : factor;
    if (!(hp->rope_scaling_factor >= 1.0 && hp->rope_scaling_factor < 1e6)) {
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "key '%s.rope.scaling.factor' = %g is out of range [1, 1e6)", L->m->arch,
                          hp->rope_scaling_factor);
    }
    hp->rope_scaling = hp->rope_scaling_factor > 1.0 ? MOE_ROPE_SCALING_LINEAR : MOE_ROPE_SCALING_NONE;
    if (typed) {
        if (st.len == 4 && !memcmp(st.ptr, "none", 4)) hp->rope_scaling = MOE_ROPE_SCALING_NONE;
        else if (st.len == 6 && !memcmp(st.ptr, "linear", 6)) hp->rope_scaling = MOE_ROPE_SCALING_LINEAR;
        else if (st.len == 4 && !memcmp(st.ptr, "yarn", 4)) hp->rope_scaling = MOE_ROPE_SCALING_YARN;
        else {
            return moe_seterr(L->err, L->errsz, MOE_EUNSUPPORTED, "key '%s': rope scaling '%.*s' is not supported", key,
                              (int)(st.len > 32 ? 32 : st.len), st.ptr);
        }
    }
    if (hp->rope_scaling == MOE_ROPE_SCALING_NONE) hp->rope_scaling_factor = 1.0;
    MOE_TRY(get_int(L, "rope.scaling.original_context_length", false, hp->n_ctx_train, 1, (int64_t)1 << 40,
                &hp->rope_orig_ctx));
    MOE_TRY(get_finite(L, "rope.scaling.yarn_log_multiplier", 0.0, false, &hp->rope_yarn_log_mul));
    hp->rope_yarn_beta_fast = 32.0;
    hp->rope_yarn_beta_slow = 1.0;
    if (hp->rope_scaling == MOE_ROPE_SCALING_YARN) {
        /* the YaRN ramp takes log(orig_ctx / (beta * 2 pi)) / log(freq_base) */
        MOE_TRY(get_finite(L, "rope.scaling.yarn_beta_fast", 32.0, true, &hp->rope_yarn_beta_fast));
        MOE_TRY(get_finite(L, "rope.scaling.yarn_beta_slow", 1.0, true, &hp->rope_yarn_beta_slow));
        if (hp->rope_freq_base == 1.0) {
            return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "key '%s.rope.freq_base' = 1 with YaRN scaling (its ramp divides by log(base))",
                              L->m->arch);
        }
    }
    hp->rope_neox = a == MOE_ARCH_QWEN2 || a == MOE_ARCH_QWEN2MOE || a == MOE_ARCH_QWEN3MOE;
    hp->rope_attn_factor = 1.0f;
    hp->attn_scale = (float)(1.0 / sqrt((double)hp->n_embd_head_k));
    if (hp->rope_scaling == MOE_ROPE_SCALING_YARN && hp->rope_scaling_factor > 1.0) {
        if (a == MOE_ARCH_DEEPSEEK2) {
            /* DeepSeek: mscale = mscale_all_dim, so cos/sin are unscaled and
             * the softmax scale carries mscale_all^2 */
            double m = 1.0 + hp->rope_yarn_log_mul * log(hp->rope_scaling_factor);
            hp->attn_scale = (float)(m * m / sqrt((double)hp->n_embd_head_k));
        } else {
            hp->rope_attn_factor = (float)(1.0 + 0.1 * log(hp->rope_scaling_factor));
        }
    }

    /* MoE */
    MOE_TRY(get_int(L, "expert_count", false, 0, 0, 65536, &hp->n_expert));
    hp->is_moe = hp->n_expert > 0;
    if (a == MOE_ARCH_QWEN2MOE || a == MOE_ARCH_QWEN3MOE) {
        if (!hp->is_moe) {
            return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "missing required key '%s.expert_count'", L->m->arch);
        }
    } else if (a == MOE_ARCH_QWEN2 && hp->is_moe) {
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "qwen2 is a dense architecture but %s.expert_count is %lld", L->m->arch,
                          (long long)hp->n_expert);
    }
    if (hp->is_moe) {
        MOE_TRY(get_int(L, "expert_used_count", true, 0, 1, hp->n_expert, &hp->n_expert_used));
        int64_t def_ff_exp = a == MOE_ARCH_LLAMA ? hp->n_ff : hp->n_ff / hp->n_expert_used;
        MOE_TRY(get_int(L, "expert_feed_forward_length", a == MOE_ARCH_DEEPSEEK2, def_ff_exp, 1, D, &hp->n_ff_exp));
        if (hp->n_ff_exp < 1) {
            return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "%s: expert FFN width is 0 (no feed_forward_length)", L->m->arch);
        }
        MOE_TRY(get_finite(L, "expert_weights_scale", 1.0, false, &hp->expert_weights_scale));
        int64_t gf;
        MOE_TRY(get_int(L, "expert_gating_func", false, MOE_HP_GATING_SOFTMAX, 1, 2, &gf));
        hp->expert_gating_func = (int)gf;
        MOE_TRY(get_int(L, "expert_group_count", false, 1, 1, hp->n_expert, &hp->n_expert_group));
        MOE_TRY(get_int(L, "expert_group_used_count", false, hp->n_expert_group, 1, hp->n_expert_group,
                    &hp->n_group_used));
        if (hp->n_expert % hp->n_expert_group) {
            return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "%s.expert_count %lld is not a multiple of expert_group_count %lld", L->m->arch,
                              (long long)hp->n_expert, (long long)hp->n_expert_group);
        }
        /* the kept groups must hold the top-k, or routing has nothing to pick */
        if (hp->n_group_used * (hp->n_expert / hp->n_expert_group) < hp->n_expert_used) {
            return moe_seterr(L->err, L->errsz, MOE_EFORMAT,
                              "key '%s.expert_group_used_count' = %lld: %lld group(s) of %lld experts cannot hold "
                              "expert_used_count %lld",
                              L->m->arch, (long long)hp->n_group_used, (long long)hp->n_group_used,
                              (long long)(hp->n_expert / hp->n_expert_group), (long long)hp->n_expert_used);
        }
        if (hp->n_group_used < hp->n_expert_group && hp->n_expert_group > 256) {
            return moe_seterr(L->err, L->errsz, MOE_EUNSUPPORTED, "key '%s.expert_group_count' = %lld: a group limit over more than 256 groups "
                              "is not supported", L->m->arch, (long long)hp->n_expert_group);
        }
        switch (a) {
        case MOE_ARCH_LLAMA:
        case MOE_ARCH_QWEN3MOE: hp->expert_weights_norm = true; break;
        case MOE_ARCH_QWEN2MOE: hp->expert_weights_norm = false; break;
        default: MOE_TRY(get_bool(L, "expert_weights_norm", false, &hp->expert_weights_norm)); break;
        }
        if (a == MOE_ARCH_DEEPSEEK2) {
            MOE_TRY(get_int(L, "expert_shared_count", false, 0, 0, 4096, &hp->n_expert_shared));
            hp->n_ff_shexp = hp->n_ff_exp * hp->n_expert_shared;
            MOE_TRY(get_int(L, "leading_dense_block_count", false, 0, 0, hp->n_layer, &hp->n_layer_dense_lead));
        } else if (a == MOE_ARCH_QWEN2MOE) {
            MOE_TRY(get_int(L, "expert_shared_feed_forward_length", false, hp->n_ff, 0, D, &hp->n_ff_shexp));
        }
    }
    if (a == MOE_ARCH_DEEPSEEK2) {
        hp->is_mla = true;
        MOE_TRY(get_int(L, "attention.q_lora_rank", false, 0, 0, D, &hp->q_lora_rank));
        hp->has_q_lora = hp->q_lora_rank > 0;
        MOE_TRY(get_int(L, "attention.kv_lora_rank", true, 0, 1, D, &hp->kv_lora_rank));
        hp->n_embd_head_qk_nope = hp->n_embd_head_k - hp->n_rot;
        if (hp->n_embd_head_qk_nope < 1) {
            return moe_seterr(L->err, L->errsz, MOE_EFORMAT,
                              "key 'deepseek2.rope.dimension_count' = %lld leaves no non-rope part of key_length %lld",
                              (long long)hp->n_rot, (long long)hp->n_embd_head_k);
        }
    }
    bool has_dense = !hp->is_moe || hp->n_layer_dense_lead > 0;
    if (has_dense && hp->n_ff < 1) {
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "missing required key '%s.feed_forward_length'", L->m->arch);
    }
    hp->has_qkv_bias = a == MOE_ARCH_QWEN2 || a == MOE_ARCH_QWEN2MOE;
    hp->has_qk_norm = a == MOE_ARCH_QWEN3MOE;
    return MOE_OK;
}

static int remember(moe_model *m, const moe_gguf_tensor *t) {
    MOE_TRY(moe_array_grow((void **)&m->bound, &m->cap_bound, m->n_bound + 1, 256, sizeof(*m->bound)));
    m->bound[m->n_bound++] = t;
    return MOE_OK;
}

static int fmt_shape(char *buf, size_t n, const int64_t *ne, int nd) {
    int k = snprintf(buf, n, "[");
    for (int i = 0; i < nd && k > 0 && (size_t)k < n; i++)
        k += snprintf(buf + k, n - (size_t)k, i ? ", %lld" : "%lld", (long long)ne[i]);
    if (k > 0 && (size_t)k < n) k += snprintf(buf + k, n - (size_t)k, "]");
    return k;
}

/* Binds tensor `name` into *out after checking its shape is exactly
 * {e0, e1, e2} (trailing 1s are unused dims) and its type: 1-D tensors
 * (norms, biases, the router bias) must be F32 as the forward pass reads
 * them directly; matrices must be a type moed's kernels compute with.
 * Absent: MOE_OK with *out zeroed unless required (MOE_EFORMAT). */
static int bind(loader *L, const char *name, bool required, int64_t e0, int64_t e1, int64_t e2, moe_tensor_view *out) {
    memset(out, 0, sizeof(*out));
    const moe_gguf_tensor *t = moe_gguf_find_tensor(L->m->g, name);
    if (!t) {
        if (!required) return MOE_OK;
        return moe_seterr(L->err, L->errsz, MOE_EFORMAT, "missing tensor '%s'", name);
    }
    int64_t want[4] = {e0, e1, e2, 1};
    int nd_want = e2 > 1 ? 3 : e1 > 1 ? 2 : 1;
    if (memcmp(want, t->ne, sizeof want) != 0) {
        char a[96], b[96];
        int nd = (int)(t->n_dims > 4 ? 4 : t->n_dims);
        fmt_shape(a, sizeof a, t->ne, nd < 1 ? 1 : nd);
        fmt_shape(b, sizeof b, want, nd_want);
        return moe_seterr(L->err, L->errsz, MOE_ESHAPE, "tensor '%s' has shape %s, expected %s", name, a, b);
    }
    if (nd_want == 1 ? t->type != MOE_TYPE_F32 : !moe_quant_supported(t->type)) {
        return moe_seterr(L->err, L->errsz, MOE_EUNSUPPORTED, "tensor '%s' has type %s, %s", name, moe_type_name(t->type),
                          nd_want == 1 ? "expected F32 for a 1-D tensor" : "which moed cannot compute with");
    }
    MOE_TRY(remember(L->m, t));
    out->name = t->name;
    out->type = t->type;
    out->n_dims = t->n_dims;
    memcpy(out->ne, t->ne, sizeof out->ne);
    out->data = t->data;
    out->nbytes = t->nbytes;
    return MOE_OK;
}

static int64_t nel(const moe_tensor_view *v) {
    return v->data ? v->ne[0] * v->ne[1] * v->ne[2] * v->ne[3] : 0;
}

static int bind_layer(loader *L, int64_t il, moe_layer_weights *w) {
    const moe_hparams *hp = &L->m->hp;
    const int64_t E = hp->n_embd, H = hp->n_head, Hkv = hp->n_head_kv, dk = hp->n_embd_head_k,
                  dv = hp->n_embd_head_v;
    char n[160];
#define NM(s) (snprintf(n, sizeof n, "blk.%lld.%s", (long long)il, s), n)
    MOE_TRY(bind(L, NM("attn_norm.weight"), true, E, 1, 1, &w->attn_norm));
    if (hp->arch == MOE_ARCH_DEEPSEEK2) {
        const int64_t r = hp->kv_lora_rank, nope = hp->n_embd_head_qk_nope;
        if (hp->has_q_lora) {
            MOE_TRY(bind(L, NM("attn_q_a.weight"), true, E, hp->q_lora_rank, 1, &w->q_a));
            MOE_TRY(bind(L, NM("attn_q_a_norm.weight"), true, hp->q_lora_rank, 1, 1, &w->q_a_norm));
            MOE_TRY(bind(L, NM("attn_q_b.weight"), true, hp->q_lora_rank, H * dk, 1, &w->q_b));
        } else {
            MOE_TRY(bind(L, NM("attn_q.weight"), true, E, H * dk, 1, &w->wq));
        }
        MOE_TRY(bind(L, NM("attn_kv_a_mqa.weight"), true, E, r + hp->n_rot, 1, &w->kv_a_mqa));
        MOE_TRY(bind(L, NM("attn_kv_a_norm.weight"), true, r, 1, 1, &w->kv_a_norm));
        if (hp->mla_split_kv_b) {
            MOE_TRY(bind(L, NM("attn_k_b.weight"), true, nope, r, H, &w->k_b));
            MOE_TRY(bind(L, NM("attn_v_b.weight"), true, r, dv, H, &w->v_b));
        } else {
            MOE_TRY(bind(L, NM("attn_kv_b.weight"), true, r, H * (nope + dv), 1, &w->kv_b));
        }
    } else {
        MOE_TRY(bind(L, NM("attn_q.weight"), true, E, H * dk, 1, &w->wq));
        MOE_TRY(bind(L, NM("attn_k.weight"), true, E, Hkv * dk, 1, &w->wk));
        MOE_TRY(bind(L, NM("attn_v.weight"), true, E, Hkv * dv, 1, &w->wv));
        if (hp->has_qkv_bias) {
            MOE_TRY(bind(L, NM("attn_q.bias"), true, H * dk, 1, 1, &w->bq));
            MOE_TRY(bind(L, NM("attn_k.bias"), true, Hkv * dk, 1, 1, &w->bk));
            MOE_TRY(bind(L, NM("attn_v.bias"), true, Hkv * dv, 1, 1, &w->bv));
        }
        if (hp->has_qk_norm) {
            MOE_TRY(bind(L, NM("attn_q_norm.weight"), true, dk, 1, 1, &w->q_norm));
            MOE_TRY(bind(L, NM("attn_k_norm.weight"), true, dk, 1, 1, &w->k_norm));
        }
    }
    MOE_TRY(bind(L, NM("attn_output.weight"), true, H * dv, E, 1, &w->wo));
    MOE_TRY(bind(L, NM("ffn_norm.weight"), true, E, 1, 1, &w->ffn_norm));
    w->is_moe = hp->is_moe && il >= hp->n_layer_dense_lead;
    if (!w->is_moe) {
        MOE_TRY(bind(L, NM("ffn_gate.weight"), true, E, hp->n_ff, 1, &w->ffn_gate));
        MOE_TRY(bind(L, NM("ffn_up.weight"), true, E, hp->n_ff, 1, &w->ffn_up));
        MOE_TRY(bind(L, NM("ffn_down.weight"), true, hp->n_ff, E, 1, &w->ffn_down));
        return MOE_OK;
    }
    const int64_t X = hp->n_expert, F = hp->n_ff_exp, S = hp->n_ff_shexp;
    MOE_TRY(bind(L, NM("ffn_gate_inp.weight"), true, E, X, 1, &w->gate_inp));
    MOE_TRY(bind(L, NM("ffn_gate_exps.weight"), true, E, F, X, &w->gate_exps));
    MOE_TRY(bind(L, NM("ffn_up_exps.weight"), true, E, F, X, &w->up_exps));
    MOE_TRY(bind(L, NM("ffn_down_exps.weight"), true, F, E, X, &w->down_exps));
    if (hp->arch == MOE_ARCH_DEEPSEEK2) MOE_TRY(bind(L, NM("exp_probs_b.bias"), false, X, 1, 1, &w->exp_probs_b));
    if (S > 0) {
        MOE_TRY(bind(L, NM("ffn_gate_shexp.weight"), true, E, S, 1, &w->gate_shexp));
        MOE_TRY(bind(L, NM("ffn_up_shexp.weight"), true, E, S, 1, &w->up_shexp));
        MOE_TRY(bind(L, NM("ffn_down_shexp.weight"), true, S, E, 1, &w->down_shexp));
        if (hp->arch == MOE_ARCH_QWEN2MOE) MOE_TRY(bind(L, NM("ffn_gate_inp_shexp.weight"), true, E, 1, 1, &w->gate_inp_shexp));
    }
#undef NM
    return MOE_OK;
}

static int cmp_ptr(const void *a, const void *b) {
    uintptr_t x = (uintptr_t) * (const moe_gguf_tensor *const *)a, y = (uintptr_t) * (const moe_gguf_tensor *const *)b;
    return x < y ? -1 : x > y;
}

/* Adds num/den of v's elements to *active; returns all of them. */
static int64_t active_add(const moe_tensor_view *v, int64_t num, int64_t den, int64_t *active) {
    int64_t k = nel(v);
    *active += den > 0 ? k / den * num : k;
    return k;
}

static void count_params(moe_model *m) {
    const moe_hparams *hp = &m->hp;
    const moe_model_weights *w = &m->w;
    int64_t total = nel(&w->tok_embd) + nel(&w->output_norm) + nel(&w->rope_freqs);
    int64_t active = nel(&w->output) + nel(&w->output_norm) + nel(&w->rope_freqs);
    if (!hp->tied_output) total += nel(&w->output);
    for (int64_t il = 0; il < hp->n_layer; il++) {
        const moe_layer_weights *L = &w->layers[il];
        const moe_tensor_view *all[] = {
            &L->attn_norm, &L->wq,        &L->wk,        &L->wv,         &L->bq,         &L->bk,
            &L->bv,        &L->q_norm,    &L->k_norm,    &L->q_a,        &L->q_a_norm,   &L->q_b,
            &L->kv_a_mqa,  &L->kv_a_norm, &L->kv_b,      &L->k_b,        &L->v_b,        &L->wo,
            &L->ffn_norm,  &L->ffn_gate,  &L->ffn_up,    &L->ffn_down,   &L->gate_inp,   &L->exp_probs_b,
            &L->gate_shexp, &L->up_shexp, &L->down_shexp, &L->gate_inp_shexp,
        };
        for (size_t i = 0; i < sizeof all / sizeof *all; i++) total += active_add(all[i], 1, 1, &active);
        /* routed experts: a token multiplies with n_expert_used of the stacked matrices */
        total += active_add(&L->gate_exps, hp->n_expert_used, hp->n_expert, &active);
        total += active_add(&L->up_exps, hp->n_expert_used, hp->n_expert, &active);
        total += active_add(&L->down_exps, hp->n_expert_used, hp->n_expert, &active);
    }
    m->n_params = total;
    m->n_active = active;
    uint64_t bytes = 0;
    for (int64_t i = 0; i < m->n_bound; i++) bytes += m->bound[i]->nbytes;
    m->n_bytes = bytes;
}

moe_model *moe_model_from_gguf(moe_gguf *g, int *status, char *err, size_t errsz) {
    int st = MOE_ENOMEM;
    moe_model *m = NULL;
    if (err && errsz) err[0] = 0;
    if (!g) {
        st = moe_seterr(err, errsz, MOE_EINVAL, "no model file");
        goto fail;
    }
    m = calloc(1, sizeof(*m));
    if (!m) {
        moe_gguf_close(g);
        goto fail;
    }
    m->g = g;
    loader L = {m, err, errsz};
    moe_gguf_str a;
    if (moe_gguf_get_str(g, "general.architecture", &a) != MOE_OK) {
        st = moe_seterr(err, errsz, MOE_EFORMAT, "missing required key 'general.architecture'");
        goto fail;
    }
    if (a.len >= sizeof m->arch || memchr(a.ptr, 0, a.len)) {
        st = moe_seterr(err, errsz, MOE_EUNSUPPORTED, "architecture of %llu bytes is not supported", (unsigned long long)a.len);
        goto fail;
    }
    memcpy(m->arch, a.ptr, a.len);
    m->arch[a.len] = 0;
    if (moe_arch_from_name(m->arch, &m->hp.arch) != MOE_OK) {
        char shown[sizeof m->arch];
        for (size_t i = 0; i <= a.len; i++) /* no terminal escapes from a hostile file */
            shown[i] = (m->arch[i] && ((unsigned char)m->arch[i] < 0x20 || m->arch[i] == 0x7f)) ? '?' : m->arch[i];
        st = moe_seterr(err, errsz, MOE_EUNSUPPORTED,
                        "architecture '%s' is not supported (known: llama, qwen2, qwen2moe, qwen3moe, deepseek2)", shown);
        goto fail;
    }
    if ((st = read_hparams(&L)) != MOE_OK) goto fail;
    moe_hparams *hp = &m->hp;
    if (hp->arch == MOE_ARCH_DEEPSEEK2)
        hp->mla_split_kv_b = !moe_gguf_find_tensor(g, "blk.0.attn_kv_b.weight") &&
                             moe_gguf_find_tensor(g, "blk.0.attn_k_b.weight") != NULL;

    /* token_embd gives n_vocab; vocab_size, when written, must agree */
    const moe_gguf_tensor *te = moe_gguf_find_tensor(g, "token_embd.weight");
    if (!te) {
        st = moe_seterr(err, errsz, MOE_EFORMAT, "missing tensor 'token_embd.weight'");
        goto fail;
    }
    hp->n_vocab = te->ne[1];
    int64_t vs;
    if ((st = get_int(&L, "vocab_size", false, hp->n_vocab, 1, (int64_t)1 << 31, &vs)) != MOE_OK) goto fail;
    if (vs != hp->n_vocab) {
        st = moe_seterr(err, errsz, MOE_ESHAPE, "tensor 'token_embd.weight' has %lld rows but %s.vocab_size is %lld", (long long)hp->n_vocab,
                        m->arch, (long long)vs);
        goto fail;
    }
    moe_model_weights *w = &m->w;
    if ((st = bind(&L, "token_embd.weight", true, hp->n_embd, hp->n_vocab, 1, &w->tok_embd))) goto fail;
    if ((st = bind(&L, "output_norm.weight", true, hp->n_embd, 1, 1, &w->output_norm))) goto fail;
    if ((st = bind(&L, "output.weight", false, hp->n_embd, hp->n_vocab, 1, &w->output))) goto fail;
    if (!w->output.data) {
        hp->tied_output = true;
        w->output = w->tok_embd;
    }
    if ((st = bind(&L, "rope_freqs.weight", false, hp->n_rot / 2, 1, 1, &w->rope_freqs))) goto fail;
    for (int64_t i = 0; w->rope_freqs.data && i < hp->n_rot / 2; i++) {
        float d;
        memcpy(&d, (const char *)w->rope_freqs.data + i * (int64_t)sizeof d, sizeof d);
        if (!(d > 0 && d < INFINITY)) { /* a divisor of each pair's frequency */
            st = moe_seterr(err, errsz, MOE_EFORMAT, "tensor 'rope_freqs.weight' holds %g at %lld, expected a positive factor", d, (long long)i);
            goto fail;
        }
    }
    st = MOE_ENOMEM;
    w->layers = calloc((size_t)hp->n_layer, sizeof(*w->layers));
    if (!w->layers) goto fail;
    for (int64_t il = 0; il < hp->n_layer; il++)
        if ((st = bind_layer(&L, il, &w->layers[il])) != MOE_OK) goto fail;

    qsort(m->bound, (size_t)m->n_bound, sizeof(*m->bound), cmp_ptr);
    uint64_t extra = 0;
    const char *first = NULL;
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        if (!bsearch(&t, m->bound, (size_t)m->n_bound, sizeof(*m->bound), cmp_ptr)) {
            if (!first) first = t->name;
            extra++;
        }
    }
    if (extra) /* e.g. a newer converter's extras: harmless, but worth a line */
        moe_log(MOE_LOG_WARN, "model: %llu tensor(s) unused by %s, first '%.64s'", (unsigned long long)extra,
                m->arch, first);
    count_params(m);
    if (status) *status = MOE_OK;
    return m;
fail:
    moe_model_free(m);
    if (status) *status = st;
    return NULL;
}

moe_model *moe_model_load(const char *path, int *status, char *err, size_t errsz) {
    int st = MOE_OK;
    moe_gguf *g = moe_gguf_open(path, &st, err, errsz);
    if (!g) {
        if (status) *status = st;
        return NULL;
    }
    return moe_model_from_gguf(g, status, err, errsz);
}

void moe_model_free(moe_model *m) {
    if (!m) return;
    free(m->w.layers);
    free(m->bound);
    moe_gguf_close(m->g);
    free(m);
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

int moe_model_rope_inv_freq(const moe_model *m, float *inv_freq) {
    if (!m || !inv_freq) return MOE_EINVAL;
    const moe_hparams *hp = &m->hp;
    int64_t half = hp->n_rot / 2;
    switch (hp->rope_scaling) {
    case MOE_ROPE_SCALING_YARN:
        moe_rope_yarn_inv_freq(hp->n_rot, hp->rope_freq_base, hp->rope_scaling_factor, (double)hp->rope_orig_ctx,
                               hp->rope_yarn_beta_fast, hp->rope_yarn_beta_slow, inv_freq);
        break;
    case MOE_ROPE_SCALING_LINEAR: /* positions divided by the factor (read_hparams keeps it >= 1) */
        moe_rope_yarn_inv_freq(hp->n_rot, hp->rope_freq_base, 1.0, 0, 0, 0, inv_freq);
        for (int64_t i = 0; i < half; i++) inv_freq[i] = (float)(inv_freq[i] / hp->rope_scaling_factor);
        break;
    default: moe_rope_yarn_inv_freq(hp->n_rot, hp->rope_freq_base, 1.0, 0, 0, 0, inv_freq); break;
    }
    /* Llama 3.1-style per-pair divisors (llama.cpp's rope_freqs / rope_factors), checked positive at load */
    const moe_tensor_view *rf = &m->w.rope_freqs;
    for (int64_t i = 0; rf->data && i < half; i++) {
        float d;
        memcpy(&d, (const char *)rf->data + i * (int64_t)sizeof d, sizeof d);
        inv_freq[i] /= d;
    }
    return MOE_OK;
}

const moe_hparams *moe_model_hparams(const moe_model *m) { return m ? &m->hp : NULL; }
const moe_model_weights *moe_model_weights_get(const moe_model *m) { return m ? &m->w : NULL; }
const moe_gguf *moe_model_gguf(const moe_model *m) { return m ? m->g : NULL; }
const char *moe_model_arch_str(const moe_model *m) { return m ? m->arch : ""; }
int64_t moe_model_n_params(const moe_model *m) { return m ? m->n_params : 0; }
int64_t moe_model_n_params_active(const moe_model *m) { return m ? m->n_active : 0; }
uint64_t moe_model_n_bytes(const moe_model *m) { return m ? m->n_bytes : 0; }
