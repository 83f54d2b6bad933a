/* convert.c - Hugging Face checkpoint -> GGUF. The names, keys and layout
 * choices follow llama.cpp's convert_hf_to_gguf.py (read for its naming;
 * this is moed's own code), so the output is what engine/model.c reads.
 *
 * Two passes: a plan (every output tensor with its GGUF shape, type and
 * the source rows it is made of, each source checked for presence, dtype
 * and exact shape before anything is written), then the write, one
 * output tensor at a time in chunks of rows. */
#include "convert.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gguf.h"
#include "quant.h"
#include "safetensors.h"

#define MAX_SHARDS 4096
#define MAX_JSON_BYTES ((size_t)256 << 20) /* a tokenizer.json is ~10 MB; a config far less */
#define CHUNK_FLOATS ((size_t)4 << 20)     /* rows converted at a time: 16 MB of floats */
#define FP8_BLOCK 128
#define MAX_SRC 512 /* experts stacked into one tensor (DeepSeek-V3: 256) */

enum { TT_NORMAL = 1, TT_CONTROL = 3, TT_USER_DEFINED = 4, TT_UNUSED = 5 };

typedef enum { R_COPY, R_PERM, R_STACK, R_VB, R_KB, R_GEN } recipe;

typedef struct out_tensor {
    char name[96];
    int64_t ne[3];  /* ne[0] contiguous; ne[2] slabs (experts, heads) */
    int type;       /* moe_type written */
    recipe how;
    int n_src;
    const moe_st_tensor *src[MAX_SRC];
    const moe_st_tensor *scale[MAX_SRC]; /* FP8 weight_scale_inv, or NULL */
    int64_t a, b;   /* R_PERM: n_head; R_VB/R_KB: nope, v */
} out_tensor;

typedef struct conv {
    const char *dir;
    char *err;
    size_t errsz;
    cJSON *cfg;
    moe_st *shard[MAX_SHARDS];
    int n_shard;
    out_tensor *out;
    int n_out, cap_out;
    int out_type;
    /* hyper-parameters read from config.json */
    char arch[16];
    const char *model_type;
    int64_t n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab;
    int64_t n_expert, n_expert_used, n_ff_exp, n_ff_shexp;
    int64_t q_lora, kv_lora, nope, rope_dim, v_dim, n_dense_lead;
    float *rope_freqs; /* (head_dim / 2) Llama 3.1 frequency divisors, or NULL */
    float fp8[256];    /* e4m3 byte -> value: a table, not ldexpf per weight */
} conv;

static void seterr(conv *c, const char *fmt, ...) {
    if (!c->err || !c->errsz) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, c->errsz, fmt, ap);
    va_end(ap);
}

#define TRY(expr)                                                                                                    \
    do {                                                                                                             \
        int rc_ = (expr);                                                                                            \
        if (rc_) return rc_;                                                                                         \
    } while (0)

/* --- files --- */

static int read_file(conv *c, const char *name, char **out, size_t *len, bool required) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", c->dir, name);
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (!required && errno == ENOENT) return MOE_ENOTFOUND;
        seterr(c, "cannot open '%s': %s", path, strerror(errno));
        return MOE_EIO;
    }
    struct stat sb;
    if (fstat(fileno(f), &sb) || !S_ISREG(sb.st_mode) || (uint64_t)sb.st_size > MAX_JSON_BYTES) {
        fclose(f);
        seterr(c, "'%s' is not a regular file of at most %zu bytes", path, MAX_JSON_BYTES);
        return MOE_EFORMAT;
    }
    char *buf = malloc((size_t)sb.st_size + 1);
    if (!buf) {
        fclose(f);
        return MOE_ENOMEM;
    }
    size_t n = fread(buf, 1, (size_t)sb.st_size, f);
    fclose(f);
    buf[n] = 0;
    *out = buf;
    *len = n;
    return MOE_OK;
}

static int read_json(conv *c, const char *name, cJSON **out, bool required) {
    char *buf;
    size_t len;
    *out = NULL;
    int rc = read_file(c, name, &buf, &len, required);
    if (rc) return rc;
    const char *end = NULL;
    *out = cJSON_ParseWithLengthOpts(buf, len, &end, 0);
    if (!*out) {
        seterr(c, "%s/%s is not valid JSON (near byte %zu)", c->dir, name, end ? (size_t)(end - buf) : 0);
        free(buf);
        return MOE_EFORMAT;
    }
    free(buf);
    return MOE_OK;
}

/* A shard file name from the index: a plain name inside the checkpoint
 * directory, never a path that could lead out of it. */
static bool safe_name(const char *s) {
    return s && *s && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, "..") && strlen(s) < 1024;
}

static int open_shard(conv *c, const char *name) {
    if (c->n_shard == MAX_SHARDS) {
        seterr(c, "more than %d safetensors shards", MAX_SHARDS);
        return MOE_EUNSUPPORTED;
    }
    char path[4096], e[MOE_ERR_MAX];
    snprintf(path, sizeof path, "%s/%s", c->dir, name);
    int st;
    c->shard[c->n_shard] = moe_st_open(path, &st, e, sizeof e);
    if (!c->shard[c->n_shard]) {
        seterr(c, "%s", e);
        return st;
    }
    c->n_shard++;
    return MOE_OK;
}

static int open_weights(conv *c) {
    cJSON *idx;
    int rc = read_json(c, "model.safetensors.index.json", &idx, false);
    if (rc == MOE_ENOTFOUND) return open_shard(c, "model.safetensors");
    if (rc) return rc;
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(idx, "weight_map");
    if (!cJSON_IsObject(wm) || !wm->child) {
        seterr(c, "model.safetensors.index.json: 'weight_map' is missing or empty");
        cJSON_Delete(idx);
        return MOE_EFORMAT;
    }
    /* each distinct shard once, in order of first mention */
    const char *names[MAX_SHARDS];
    int n = 0;
    for (const cJSON *e = wm->child; e && !rc; e = e->next) {
        if (!cJSON_IsString(e) || !safe_name(e->valuestring)) {
            seterr(c, "model.safetensors.index.json: weight_map['%.64s'] is not a file name in the directory",
                   e->string);
            rc = MOE_EFORMAT;
            break;
        }
        bool seen = false;
        for (int i = 0; i < n && !seen; i++) seen = !strcmp(names[i], e->valuestring);
        if (seen) continue;
        if (n == MAX_SHARDS) {
            seterr(c, "more than %d safetensors shards", MAX_SHARDS);
            rc = MOE_EUNSUPPORTED;
            break;
        }
        names[n++] = e->valuestring;
    }
    for (int i = 0; i < n && !rc; i++) rc = open_shard(c, names[i]);
    cJSON_Delete(idx);
    return rc;
}

static const moe_st_tensor *find(conv *c, const char *name) {
    for (int i = 0; i < c->n_shard; i++) {
        const moe_st_tensor *t = moe_st_find(c->shard[i], name);
        if (t) return t;
    }
    return NULL;
}

/* --- config.json --- */

static const cJSON *cfg_item(conv *c, const char *key) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(c->cfg, key);
    return cJSON_IsNull(j) ? NULL : j;
}

/* An integer in [lo, hi]; absent (or null): def, or MOE_EFORMAT when def < 0 (required). */
static int cfg_int(conv *c, const char *key, int64_t def, int64_t lo, int64_t hi, int64_t *out) {
    const cJSON *j = cfg_item(c, key);
    if (!j) {
        if (def < 0) {
            seterr(c, "config.json: missing required '%s'", key);
            return MOE_EFORMAT;
        }
        *out = def;
        return MOE_OK;
    }
    if (!cJSON_IsNumber(j) || floor(j->valuedouble) != j->valuedouble || j->valuedouble < (double)lo ||
        j->valuedouble > (double)hi) {
        seterr(c, "config.json: '%s' must be an integer in [%lld, %lld]", key, (long long)lo, (long long)hi);
        return MOE_EFORMAT;
    }
    *out = (int64_t)j->valuedouble;
    return MOE_OK;
}

static int num_in(conv *c, const cJSON *obj, const char *where, const char *key, double def, double *out) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!j || cJSON_IsNull(j)) {
        *out = def;
        return MOE_OK;
    }
    if (!cJSON_IsNumber(j) || !isfinite(j->valuedouble)) {
        seterr(c, "config.json: '%s%s' must be a finite number", where, key);
        return MOE_EFORMAT;
    }
    *out = j->valuedouble;
    return MOE_OK;
}

static bool cfg_bool(conv *c, const char *key, bool def) {
    const cJSON *j = cfg_item(c, key);
    return cJSON_IsBool(j) ? cJSON_IsTrue(j) : def;
}

static const char *cfg_str(conv *c, const char *key) {
    const cJSON *j = cfg_item(c, key);
    return cJSON_IsString(j) ? j->valuestring : NULL;
}

static int read_config(conv *c) {
    TRY(read_json(c, "config.json", &c->cfg, true));
    if (!cJSON_IsObject(c->cfg)) {
        seterr(c, "config.json is not a JSON object");
        return MOE_EFORMAT;
    }
    static const struct {
        const char *hf, *gguf;
    } MAP[] = {
        {"llama", "llama"},         {"mistral", "llama"},           {"mixtral", "llama"},
        {"qwen2", "qwen2"},         {"qwen2_moe", "qwen2moe"},      {"qwen3_moe", "qwen3moe"},
        {"deepseek_v2", "deepseek2"}, {"deepseek_v3", "deepseek2"},
    };
    c->model_type = cfg_str(c, "model_type");
    if (!c->model_type) {
        seterr(c, "config.json: missing 'model_type'");
        return MOE_EFORMAT;
    }
    for (size_t i = 0; i < sizeof MAP / sizeof *MAP; i++)
        if (!strcmp(MAP[i].hf, c->model_type)) snprintf(c->arch, sizeof c->arch, "%s", MAP[i].gguf);
    if (!c->arch[0]) {
        seterr(c, "config.json: model_type '%.64s' is not supported (known: llama, mistral, mixtral, qwen2, "
                  "qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3)",
               c->model_type);
        return MOE_EUNSUPPORTED;
    }
    const int64_t D = (int64_t)1 << 24;
    TRY(cfg_int(c, "num_hidden_layers", -1, 1, 4096, &c->n_layer));
    TRY(cfg_int(c, "hidden_size", -1, 1, D, &c->n_embd));
    TRY(cfg_int(c, "num_attention_heads", -1, 1, 65536, &c->n_head));
    TRY(cfg_int(c, "num_key_value_heads", c->n_head, 1, c->n_head, &c->n_head_kv));
    TRY(cfg_int(c, "vocab_size", -1, 1, (int64_t)1 << 31, &c->n_vocab));
    TRY(cfg_int(c, "intermediate_size", 0, 0, D, &c->n_ff));
    TRY(cfg_int(c, "head_dim", c->n_embd / c->n_head, 1, D, &c->head_dim));
    if (c->head_dim < 1 || (c->head_dim & 1)) {
        seterr(c, "config.json: head size %lld (head_dim, or hidden_size / num_attention_heads) must be even and >= 2",
               (long long)c->head_dim);
        return MOE_EFORMAT;
    }
    bool ds = !strcmp(c->arch, "deepseek2");
    if (!strcmp(c->model_type, "mixtral")) {
        TRY(cfg_int(c, "num_local_experts", -1, 1, MAX_SRC, &c->n_expert));
        c->n_ff_exp = c->n_ff;
    } else if (!strcmp(c->model_type, "qwen2_moe") || !strcmp(c->model_type, "qwen3_moe")) {
        /* Hub checkpoints say num_experts; transformers 5 saves num_local_experts */
        TRY(cfg_int(c, cfg_item(c, "num_experts") ? "num_experts" : "num_local_experts", -1, 1, MAX_SRC, &c->n_expert));
        TRY(cfg_int(c, "moe_intermediate_size", -1, 1, D, &c->n_ff_exp));
        TRY(cfg_int(c, "shared_expert_intermediate_size", 0, 0, D, &c->n_ff_shexp));
    } else if (ds) {
        TRY(cfg_int(c, "n_routed_experts", -1, 1, MAX_SRC, &c->n_expert));
        TRY(cfg_int(c, "moe_intermediate_size", -1, 1, D, &c->n_ff_exp));
        TRY(cfg_int(c, "n_shared_experts", 0, 0, 4096, &c->n_ff_shexp));
        c->n_ff_shexp *= c->n_ff_exp;
        TRY(cfg_int(c, "q_lora_rank", 0, 1, D, &c->q_lora));
        TRY(cfg_int(c, "kv_lora_rank", -1, 1, D, &c->kv_lora));
        TRY(cfg_int(c, "qk_nope_head_dim", -1, 1, D, &c->nope));
        TRY(cfg_int(c, "qk_rope_head_dim", -1, 2, D, &c->rope_dim));
        TRY(cfg_int(c, "v_head_dim", -1, 1, D, &c->v_dim));
        TRY(cfg_int(c, "first_k_dense_replace", 0, 0, c->n_layer, &c->n_dense_lead));
    }
    if (c->n_expert) TRY(cfg_int(c, "num_experts_per_tok", -1, 1, c->n_expert, &c->n_expert_used));
    /* FP8 checkpoints name their block size; the dequantizer knows 128x128 */
    const cJSON *qc = cfg_item(c, "quantization_config");
    const cJSON *bs = cJSON_IsObject(qc) ? cJSON_GetObjectItemCaseSensitive(qc, "weight_block_size") : NULL;
    if (bs && !(cJSON_IsArray(bs) && cJSON_GetArraySize(bs) == 2 && cJSON_IsNumber(bs->child) &&
                bs->child->valuedouble == FP8_BLOCK && cJSON_IsNumber(bs->child->next) &&
                bs->child->next->valuedouble == FP8_BLOCK)) {
        seterr(c, "config.json: quantization_config.weight_block_size must be [%d, %d]", FP8_BLOCK, FP8_BLOCK);
        return MOE_EUNSUPPORTED;
    }
    /* What moed's forward passes hard-code must hold, or the logits would
     * be silently wrong: refused here instead. */
    bool qmoe = !strcmp(c->model_type, "qwen2_moe") || !strcmp(c->model_type, "qwen3_moe");
    const cJSON *mol = cfg_item(c, "mlp_only_layers");
    int64_t step = 1;
    if (qmoe) TRY(cfg_int(c, "decoder_sparse_step", 1, 1, 4096, &step));
    if (qmoe && (step != 1 || (cJSON_IsArray(mol) && cJSON_GetArraySize(mol) > 0))) {
        seterr(c, "config.json: dense layers between MoE layers (decoder_sparse_step %lld, mlp_only_layers) are "
                  "not supported", (long long)step);
        return MOE_EUNSUPPORTED;
    }
    if (qmoe) {
        bool want = !strcmp(c->model_type, "qwen3_moe");
        if (cfg_bool(c, "norm_topk_prob", want) != want) {
            seterr(c, "config.json: norm_topk_prob %s is not supported for %s (moed follows the released models: %s)",
                   want ? "false" : "true", c->model_type, want ? "true" : "false");
            return MOE_EUNSUPPORTED;
        }
    }
    if (!strcmp(c->arch, "llama") && (cfg_bool(c, "attention_bias", false) || cfg_bool(c, "mlp_bias", false))) {
        seterr(c, "config.json: attention_bias/mlp_bias are not supported for %s", c->model_type);
        return MOE_EUNSUPPORTED;
    }
    if ((!c->n_expert || c->n_dense_lead > 0) && c->n_ff < 1) {
        seterr(c, "config.json: missing required 'intermediate_size'");
        return MOE_EFORMAT;
    }
    return MOE_OK;
}

/* rope_theta and the rope scaling object: transformers < 5 writes
 * rope_theta and rope_scaling, transformers 5 one rope_parameters object. */
typedef struct rope_cfg {
    double theta, factor;
    const cJSON *sc;   /* the scaling object, or NULL */
    const char *where; /* its name, for messages */
    const char *type;  /* "default", "linear", "yarn", "llama3", ... */
} rope_cfg;

static int read_rope(conv *c, rope_cfg *r) {
    const cJSON *rp = cfg_item(c, "rope_parameters");
    const cJSON *rs = cfg_item(c, "rope_scaling");
    if (rp && !cJSON_IsObject(rp)) {
        seterr(c, "config.json: 'rope_parameters' is not an object");
        return MOE_EFORMAT;
    }
    if (rs && !cJSON_IsObject(rs)) {
        seterr(c, "config.json: 'rope_scaling' is not an object");
        return MOE_EFORMAT;
    }
    TRY(num_in(c, c->cfg, "", "rope_theta", 10000.0, &r->theta));
    if (rp) TRY(num_in(c, rp, "rope_parameters.", "rope_theta", r->theta, &r->theta));
    if (!(r->theta > 0)) {
        seterr(c, "config.json: rope_theta %g must be > 0", r->theta);
        return MOE_EFORMAT;
    }
    r->sc = rs ? rs : rp;
    r->where = rs ? "rope_scaling." : "rope_parameters.";
    const cJSON *ty = r->sc ? cJSON_GetObjectItemCaseSensitive(r->sc, "rope_type") : NULL;
    if (r->sc && !cJSON_IsString(ty)) ty = cJSON_GetObjectItemCaseSensitive(r->sc, "type");
    r->type = cJSON_IsString(ty) ? ty->valuestring : "default";
    r->factor = 1.0;
    if (!strcmp(r->type, "default")) return MOE_OK;
    TRY(num_in(c, r->sc, r->where, "factor", 1.0, &r->factor));
    if (!(r->factor >= 1.0 && r->factor < 1e6)) {
        seterr(c, "config.json: '%sfactor' = %g is out of range [1, 1e6)", r->where, r->factor);
        return MOE_EFORMAT;
    }
    return MOE_OK;
}

/* Llama 3.1's scaling as llama.cpp ships it: one divisor per rope pair,
 * 1 for wavelengths under orig/high_freq_factor, `factor` over
 * orig/low_freq_factor, blended between. */
static int llama3_freqs(conv *c, const rope_cfg *r) {
    double lo, hi, orig;
    TRY(num_in(c, r->sc, r->where, "low_freq_factor", 1.0, &lo));
    TRY(num_in(c, r->sc, r->where, "high_freq_factor", 4.0, &hi));
    TRY(num_in(c, r->sc, r->where, "original_max_position_embeddings", 8192, &orig));
    if (!(lo > 0 && hi > lo && orig >= 1)) {
        seterr(c, "config.json: llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor and "
                  "original_max_position_embeddings >= 1");
        return MOE_EFORMAT;
    }
    int64_t n = c->head_dim / 2;
    if (!(c->rope_freqs = malloc((size_t)n * sizeof(float)))) return MOE_ENOMEM;
    for (int64_t i = 0; i < n; i++) {
        double freq = pow(r->theta, -2.0 * (double)i / (double)c->head_dim), wavelen = 2 * M_PI / freq;
        double f;
        if (wavelen < orig / hi) f = 1.0;
        else if (wavelen > orig / lo) f = r->factor;
        else {
            double smooth = (orig / wavelen - lo) / (hi - lo);
            f = 1.0 / ((1.0 - smooth) / r->factor + smooth);
        }
        c->rope_freqs[i] = (float)f;
    }
    return MOE_OK;
}

static int write_rope(conv *c, moe_gguf_writer *w, char *key, size_t ks) {
#define K(s) (snprintf(key, ks, "%s.%s", c->arch, s), key)
    rope_cfg r;
    TRY(read_rope(c, &r));
    int rc = moe_gguf_writer_set_f32(w, K("rope.freq_base"), (float)r.theta);
    const cJSON *sc = r.sc;
    const char *where = r.where, *type = r.type;
    double factor = r.factor, orig, bf, bs, mscale_all;
    if (!strcmp(type, "default")) return rc;
    if (!strcmp(type, "llama3") && c->rope_freqs) return rc; /* the divisors are the rope_freqs tensor */
    if (!strcmp(type, "linear")) {
        rc |= moe_gguf_writer_set_str(w, K("rope.scaling.type"), "linear");
        rc |= moe_gguf_writer_set_f32(w, K("rope.scaling.factor"), (float)factor);
        return rc;
    }
    if (strcmp(type, "yarn")) {
        seterr(c, "config.json: rope scaling '%.32s' is not supported (default, linear, yarn; llama3 for Llama)", type);
        return MOE_EUNSUPPORTED;
    }
    TRY(num_in(c, sc, where, "original_max_position_embeddings", 4096, &orig));
    TRY(num_in(c, sc, where, "beta_fast", 32.0, &bf));
    TRY(num_in(c, sc, where, "beta_slow", 1.0, &bs));
    TRY(num_in(c, sc, where, "mscale_all_dim", 0.0, &mscale_all));
    if (!(orig >= 1 && orig < 1e12)) {
        seterr(c, "config.json: '%soriginal_max_position_embeddings' = %g is out of range", where, orig);
        return MOE_EFORMAT;
    }
    rc |= moe_gguf_writer_set_str(w, K("rope.scaling.type"), "yarn");
    rc |= moe_gguf_writer_set_f32(w, K("rope.scaling.factor"), (float)factor);
    rc |= moe_gguf_writer_set_u32(w, K("rope.scaling.original_context_length"), (uint32_t)orig);
    rc |= moe_gguf_writer_set_f32(w, K("rope.scaling.yarn_beta_fast"), (float)bf);
    rc |= moe_gguf_writer_set_f32(w, K("rope.scaling.yarn_beta_slow"), (float)bs);
    /* DeepSeek's attention scale: llama.cpp carries mscale_all_dim as 0.1 x it */
    if (!strcmp(c->arch, "deepseek2"))
        rc |= moe_gguf_writer_set_f32(w, K("rope.scaling.yarn_log_multiplier"), (float)(0.1 * mscale_all));
    return rc;
#undef K
}

static int write_hparams(conv *c, moe_gguf_writer *w) {
    char key[160];
#define K(s) (snprintf(key, sizeof key, "%s.%s", c->arch, s), key)
    int64_t ctx;
    TRY(cfg_int(c, "max_position_embeddings", 4096, 1, (int64_t)1 << 40, &ctx));
    double eps;
    TRY(num_in(c, c->cfg, "", "rms_norm_eps", 1e-6, &eps));
    if (!(eps > 0 && eps < 1)) {
        seterr(c, "config.json: rms_norm_eps %g is out of range (0, 1)", eps);
        return MOE_EFORMAT;
    }
    int rc = 0;
    rc |= moe_gguf_writer_set_u32(w, K("block_count"), (uint32_t)c->n_layer);
    rc |= moe_gguf_writer_set_u32(w, K("context_length"), (uint32_t)(ctx > UINT32_MAX ? UINT32_MAX : ctx));
    rc |= moe_gguf_writer_set_u32(w, K("embedding_length"), (uint32_t)c->n_embd);
    if (c->n_ff) rc |= moe_gguf_writer_set_u32(w, K("feed_forward_length"), (uint32_t)c->n_ff);
    rc |= moe_gguf_writer_set_u32(w, K("attention.head_count"), (uint32_t)c->n_head);
    rc |= moe_gguf_writer_set_f32(w, K("attention.layer_norm_rms_epsilon"), (float)eps);
    rc |= moe_gguf_writer_set_u32(w, K("vocab_size"), (uint32_t)c->n_vocab);
    if (rc) return MOE_ENOMEM;
    TRY(write_rope(c, w, key, sizeof key));
    if (c->n_expert) {
        rc |= moe_gguf_writer_set_u32(w, K("expert_count"), (uint32_t)c->n_expert);
        rc |= moe_gguf_writer_set_u32(w, K("expert_used_count"), (uint32_t)c->n_expert_used);
    }
    if (!strcmp(c->arch, "deepseek2")) {
        /* the MLA layout current llama.cpp writes: attention as MQA over the
         * latent (one kv head of kv_lora + rope), the per-head sizes in *_mla */
        rc |= moe_gguf_writer_set_u32(w, K("attention.head_count_kv"), 1);
        rc |= moe_gguf_writer_set_u32(w, K("attention.key_length"), (uint32_t)(c->kv_lora + c->rope_dim));
        rc |= moe_gguf_writer_set_u32(w, K("attention.value_length"), (uint32_t)c->kv_lora);
        rc |= moe_gguf_writer_set_u32(w, K("attention.key_length_mla"), (uint32_t)(c->nope + c->rope_dim));
        rc |= moe_gguf_writer_set_u32(w, K("attention.value_length_mla"), (uint32_t)c->v_dim);
        rc |= moe_gguf_writer_set_u32(w, K("rope.dimension_count"), (uint32_t)c->rope_dim);
        rc |= moe_gguf_writer_set_u32(w, K("leading_dense_block_count"), (uint32_t)c->n_dense_lead);
        if (c->q_lora) rc |= moe_gguf_writer_set_u32(w, K("attention.q_lora_rank"), (uint32_t)c->q_lora);
        rc |= moe_gguf_writer_set_u32(w, K("attention.kv_lora_rank"), (uint32_t)c->kv_lora);
        rc |= moe_gguf_writer_set_u32(w, K("expert_feed_forward_length"), (uint32_t)c->n_ff_exp);
        rc |= moe_gguf_writer_set_u32(w, K("expert_shared_count"), (uint32_t)(c->n_ff_shexp / c->n_ff_exp));
        double scale;
        TRY(num_in(c, c->cfg, "", "routed_scaling_factor", 1.0, &scale));
        rc |= moe_gguf_writer_set_f32(w, K("expert_weights_scale"), (float)scale);
        rc |= moe_gguf_writer_set_bool(w, K("expert_weights_norm"), cfg_bool(c, "norm_topk_prob", false));
        const char *sf = cfg_str(c, "scoring_func");
        bool v3 = !strcmp(c->model_type, "deepseek_v3");
        bool sigmoid = sf ? !strcmp(sf, "sigmoid") : v3;
        if (sf && !sigmoid && strcmp(sf, "softmax")) {
            seterr(c, "config.json: scoring_func '%.32s' is not supported (softmax, sigmoid)", sf);
            return MOE_EUNSUPPORTED;
        }
        rc |= moe_gguf_writer_set_u32(w, K("expert_gating_func"), sigmoid ? 2 : 1);
        /* "greedy" (V2-Lite) picks from all experts whatever n_group says */
        const char *tm = cfg_str(c, "topk_method");
        int64_t ng = 1, tg = 1;
        if (!tm || strcmp(tm, "greedy")) {
            TRY(cfg_int(c, "n_group", 1, 1, c->n_expert, &ng));
            TRY(cfg_int(c, "topk_group", ng, 1, ng, &tg));
        }
        rc |= moe_gguf_writer_set_u32(w, K("expert_group_count"), (uint32_t)ng);
        rc |= moe_gguf_writer_set_u32(w, K("expert_group_used_count"), (uint32_t)tg);
    } else {
        rc |= moe_gguf_writer_set_u32(w, K("attention.head_count_kv"), (uint32_t)c->n_head_kv);
        rc |= moe_gguf_writer_set_u32(w, K("rope.dimension_count"), (uint32_t)c->head_dim);
        if (c->head_dim != c->n_embd / c->n_head) {
            rc |= moe_gguf_writer_set_u32(w, K("attention.key_length"), (uint32_t)c->head_dim);
            rc |= moe_gguf_writer_set_u32(w, K("attention.value_length"), (uint32_t)c->head_dim);
        }
        if (!strcmp(c->arch, "qwen2moe") || !strcmp(c->arch, "qwen3moe"))
            rc |= moe_gguf_writer_set_u32(w, K("expert_feed_forward_length"), (uint32_t)c->n_ff_exp);
        if (!strcmp(c->arch, "qwen2moe"))
            rc |= moe_gguf_writer_set_u32(w, K("expert_shared_feed_forward_length"), (uint32_t)c->n_ff_shexp);
    }
#undef K
    return rc ? MOE_ENOMEM : MOE_OK;
}

/* --- tensor plan --- */

static bool dtype_ok(int d) {
    return d == MOE_ST_F32 || d == MOE_ST_F16 || d == MOE_ST_BF16 || d == MOE_ST_F8_E4M3;
}

/* Source `name` must exist with shape exactly (d0[, d1]) (row-major, as
 * HF stores it) and a dtype moed reads; FP8 needs its block scales. */
static int need(conv *c, const char *name, int64_t d0, int64_t d1, const moe_st_tensor **t,
                const moe_st_tensor **scale) {
    *t = find(c, name);
    *scale = NULL;
    if (!*t) {
        seterr(c, "missing tensor '%s'", name);
        return MOE_EFORMAT;
    }
    const moe_st_tensor *s = *t;
    int nd = d1 > 0 ? 2 : 1;
    if ((int)s->n_dims != nd || s->shape[0] != d0 || (nd == 2 && s->shape[1] != d1)) {
        char got[96] = "[";
        for (uint32_t i = 0; i < s->n_dims && strlen(got) < 64; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), i ? ", %lld" : "%lld", (long long)s->shape[i]);
        strcat(got, "]");
        if (nd == 2) seterr(c, "tensor '%s' has shape %s, expected [%lld, %lld]", name, got, (long long)d0, (long long)d1);
        else seterr(c, "tensor '%s' has shape %s, expected [%lld]", name, got, (long long)d0);
        return MOE_ESHAPE;
    }
    if (!dtype_ok(s->dtype)) {
        seterr(c, "tensor '%s' has dtype %s (F32, F16, BF16 or F8_E4M3 expected)", name, moe_st_dtype_name(s->dtype));
        return MOE_EUNSUPPORTED;
    }
    if (s->dtype == MOE_ST_F8_E4M3) {
        char sn[160];
        snprintf(sn, sizeof sn, "%s_scale_inv", name);
        const moe_st_tensor *q = find(c, sn);
        int64_t r = (d0 + FP8_BLOCK - 1) / FP8_BLOCK, k = (d1 + FP8_BLOCK - 1) / FP8_BLOCK;
        if (nd != 2 || !q) {
            seterr(c, "tensor '%s' is F8_E4M3 without its 2-D block scales '%s'", name, sn);
            return MOE_EFORMAT;
        }
        if (q->n_dims != 2 || q->shape[0] != r || q->shape[1] != k ||
            (q->dtype != MOE_ST_F32 && q->dtype != MOE_ST_BF16 && q->dtype != MOE_ST_F16)) {
            seterr(c, "tensor '%s' must be F32/BF16/F16 of shape [%lld, %lld] (128x128 blocks of '%s')", sn,
                   (long long)r, (long long)k, name);
            return MOE_EFORMAT;
        }
        *scale = q;
    }
    return MOE_OK;
}

static out_tensor *add_out(conv *c, const char *name, int64_t ne0, int64_t ne1, int64_t ne2, recipe how) {
    if (c->n_out == c->cap_out) {
        int cap = c->cap_out ? c->cap_out * 2 : 64;
        out_tensor *n = realloc(c->out, (size_t)cap * sizeof(*n));
        if (!n) return NULL;
        c->out = n;
        c->cap_out = cap;
    }
    out_tensor *o = &c->out[c->n_out++];
    memset(o, 0, sizeof(*o));
    snprintf(o->name, sizeof o->name, "%s", name);
    o->ne[0] = ne0;
    o->ne[1] = ne1;
    o->ne[2] = ne2;
    o->how = how;
    /* norms, biases and the router stay F32 (llama.cpp keeps ffn_gate_inp
     * F32 too: routing decides which experts run at all) */
    bool vec = ne1 == 1 && ne2 == 1, router = strstr(name, "ffn_gate_inp") != NULL;
    o->type = vec || router ? MOE_TYPE_F32 : c->out_type;
    if (o->type == MOE_TYPE_Q8_0 && ne0 % MOE_QK8_0) o->type = MOE_TYPE_F16;
    return o;
}

/* A GGUF matrix ne = (in, out) from one HF (out, in) weight, or a vector. */
static int plan1(conv *c, const char *gg, const char *hf, int64_t out, int64_t in, recipe how, int64_t a) {
    out_tensor *o = add_out(c, gg, in > 0 ? in : out, in > 0 ? out : 1, 1, how);
    if (!o) return MOE_ENOMEM;
    o->n_src = 1;
    o->a = a;
    return need(c, hf, out, in, &o->src[0], &o->scale[0]);
}

/* Experts j = 0..E-1 of fmt (one %d), each (out, in), stacked as ne = (in, out, E). */
static int plan_exps(conv *c, const char *gg, const char *fmt, int64_t out, int64_t in) {
    out_tensor *o = add_out(c, gg, in, out, c->n_expert, R_STACK);
    if (!o) return MOE_ENOMEM;
    o->n_src = (int)c->n_expert;
    for (int j = 0; j < o->n_src; j++) {
        char n[256];
        snprintf(n, sizeof n, fmt, j);
        TRY(need(c, n, out, in, &o->src[j], &o->scale[j]));
    }
    return MOE_OK;
}

static int plan(conv *c) {
    const int64_t E = c->n_embd, H = c->n_head, Hkv = c->n_head_kv, hd = c->head_dim;
    bool ds = !strcmp(c->arch, "deepseek2"), llama = !strcmp(c->arch, "llama");
    bool qwen = !strcmp(c->arch, "qwen2") || !strcmp(c->arch, "qwen2moe");
    TRY(plan1(c, "token_embd.weight", "model.embed_tokens.weight", c->n_vocab, E, R_COPY, 0));
    TRY(plan1(c, "output_norm.weight", "model.norm.weight", E, 0, R_COPY, 0));
    /* tied embeddings: no output.weight; the loader reuses token_embd */
    if (find(c, "lm_head.weight") || !cfg_bool(c, "tie_word_embeddings", false))
        TRY(plan1(c, "output.weight", "lm_head.weight", c->n_vocab, E, R_COPY, 0));
    rope_cfg rc;
    TRY(read_rope(c, &rc));
    if (llama && !strcmp(rc.type, "llama3")) {
        TRY(llama3_freqs(c, &rc));
        out_tensor *o = add_out(c, "rope_freqs.weight", hd / 2, 1, 1, R_GEN);
        if (!o) return MOE_ENOMEM;
    }
    char g[96], h[256];
    for (int64_t il = 0; il < c->n_layer; il++) {
#define G(s) (snprintf(g, sizeof g, "blk.%lld.%s", (long long)il, s), g)
#define HF(s) (snprintf(h, sizeof h, "model.layers.%lld.%s", (long long)il, s), h)
        TRY(plan1(c, G("attn_norm.weight"), HF("input_layernorm.weight"), E, 0, R_COPY, 0));
        if (ds) {
            const int64_t r = c->kv_lora, qk = c->nope + c->rope_dim;
            if (c->q_lora) {
                TRY(plan1(c, G("attn_q_a.weight"), HF("self_attn.q_a_proj.weight"), c->q_lora, E, R_COPY, 0));
                TRY(plan1(c, G("attn_q_a_norm.weight"), HF("self_attn.q_a_layernorm.weight"), c->q_lora, 0, R_COPY, 0));
                TRY(plan1(c, G("attn_q_b.weight"), HF("self_attn.q_b_proj.weight"), H * qk, c->q_lora, R_COPY, 0));
            } else {
                TRY(plan1(c, G("attn_q.weight"), HF("self_attn.q_proj.weight"), H * qk, E, R_COPY, 0));
            }
            TRY(plan1(c, G("attn_kv_a_mqa.weight"), HF("self_attn.kv_a_proj_with_mqa.weight"), r + c->rope_dim, E,
                      R_COPY, 0));
            TRY(plan1(c, G("attn_kv_a_norm.weight"), HF("self_attn.kv_a_layernorm.weight"), r, 0, R_COPY, 0));
            /* kv_b (H*(nope+v), r) split per head: k_b[h] = its nope rows
             * transposed (ne nope, r), v_b[h] = its v rows (ne r, v) */
            out_tensor *o = add_out(c, G("attn_k_b.weight"), c->nope, r, H, R_KB);
            if (!o) return MOE_ENOMEM;
            o->n_src = 1, o->a = c->nope, o->b = c->v_dim;
            TRY(need(c, HF("self_attn.kv_b_proj.weight"), H * (c->nope + c->v_dim), r, &o->src[0], &o->scale[0]));
            out_tensor *v = add_out(c, G("attn_v_b.weight"), r, c->v_dim, H, R_VB);
            if (!v) return MOE_ENOMEM;
            v->n_src = 1, v->a = c->nope, v->b = c->v_dim;
            v->src[0] = c->out[c->n_out - 2].src[0], v->scale[0] = c->out[c->n_out - 2].scale[0];
            TRY(plan1(c, G("attn_output.weight"), HF("self_attn.o_proj.weight"), E, H * c->v_dim, R_COPY, 0));
        } else {
            /* HF's rotate_half pairs row j with j + d/2 of each head; the llama
             * arch's rope pairs 2i, 2i+1: llama.cpp permutes q and k rows */
            recipe qk = llama ? R_PERM : R_COPY;
            TRY(plan1(c, G("attn_q.weight"), HF("self_attn.q_proj.weight"), H * hd, E, qk, H));
            TRY(plan1(c, G("attn_k.weight"), HF("self_attn.k_proj.weight"), Hkv * hd, E, qk, Hkv));
            TRY(plan1(c, G("attn_v.weight"), HF("self_attn.v_proj.weight"), Hkv * hd, E, R_COPY, 0));
            TRY(plan1(c, G("attn_output.weight"), HF("self_attn.o_proj.weight"), E, H * hd, R_COPY, 0));
            if (qwen) {
                TRY(plan1(c, G("attn_q.bias"), HF("self_attn.q_proj.bias"), H * hd, 0, R_COPY, 0));
                TRY(plan1(c, G("attn_k.bias"), HF("self_attn.k_proj.bias"), Hkv * hd, 0, R_COPY, 0));
                TRY(plan1(c, G("attn_v.bias"), HF("self_attn.v_proj.bias"), Hkv * hd, 0, R_COPY, 0));
            }
            if (!strcmp(c->arch, "qwen3moe")) {
                TRY(plan1(c, G("attn_q_norm.weight"), HF("self_attn.q_norm.weight"), hd, 0, R_COPY, 0));
                TRY(plan1(c, G("attn_k_norm.weight"), HF("self_attn.k_norm.weight"), hd, 0, R_COPY, 0));
            }
        }
        TRY(plan1(c, G("ffn_norm.weight"), HF("post_attention_layernorm.weight"), E, 0, R_COPY, 0));
        bool moe = c->n_expert > 0 && il >= c->n_dense_lead;
        if (!moe) {
            TRY(plan1(c, G("ffn_gate.weight"), HF("mlp.gate_proj.weight"), c->n_ff, E, R_COPY, 0));
            TRY(plan1(c, G("ffn_up.weight"), HF("mlp.up_proj.weight"), c->n_ff, E, R_COPY, 0));
            TRY(plan1(c, G("ffn_down.weight"), HF("mlp.down_proj.weight"), E, c->n_ff, R_COPY, 0));
            continue;
        }
        const int64_t F = c->n_ff_exp;
        char fmt[256];
        if (!strcmp(c->model_type, "mixtral")) {
            TRY(plan1(c, G("ffn_gate_inp.weight"), HF("block_sparse_moe.gate.weight"), c->n_expert, E, R_COPY, 0));
            /* w1 = gate, w3 = up, w2 = down */
            snprintf(fmt, sizeof fmt, "model.layers.%lld.block_sparse_moe.experts.%%d.w1.weight", (long long)il);
            TRY(plan_exps(c, G("ffn_gate_exps.weight"), fmt, F, E));
            snprintf(fmt, sizeof fmt, "model.layers.%lld.block_sparse_moe.experts.%%d.w3.weight", (long long)il);
            TRY(plan_exps(c, G("ffn_up_exps.weight"), fmt, F, E));
            snprintf(fmt, sizeof fmt, "model.layers.%lld.block_sparse_moe.experts.%%d.w2.weight", (long long)il);
            TRY(plan_exps(c, G("ffn_down_exps.weight"), fmt, E, F));
            continue;
        }
        TRY(plan1(c, G("ffn_gate_inp.weight"), HF("mlp.gate.weight"), c->n_expert, E, R_COPY, 0));
        static const char *const PROJ[3][2] = {{"ffn_gate_exps.weight", "gate_proj"},
                                               {"ffn_up_exps.weight", "up_proj"},
                                               {"ffn_down_exps.weight", "down_proj"}};
        for (int p = 0; p < 3; p++) {
            snprintf(fmt, sizeof fmt, "model.layers.%lld.mlp.experts.%%d.%s.weight", (long long)il, PROJ[p][1]);
            TRY(plan_exps(c, G(PROJ[p][0]), fmt, p == 2 ? E : F, p == 2 ? F : E));
        }
        if (ds && find(c, HF("mlp.gate.e_score_correction_bias")))
            TRY(plan1(c, G("exp_probs_b.bias"), HF("mlp.gate.e_score_correction_bias"), c->n_expert, 0, R_COPY, 0));
        const int64_t S = c->n_ff_shexp;
        if (S > 0) {
            const char *sh = ds ? "mlp.shared_experts" : "mlp.shared_expert";
            char nm[96];
            snprintf(nm, sizeof nm, "%s.gate_proj.weight", sh);
            TRY(plan1(c, G("ffn_gate_shexp.weight"), HF(nm), S, E, R_COPY, 0));
            snprintf(nm, sizeof nm, "%s.up_proj.weight", sh);
            TRY(plan1(c, G("ffn_up_shexp.weight"), HF(nm), S, E, R_COPY, 0));
            snprintf(nm, sizeof nm, "%s.down_proj.weight", sh);
            TRY(plan1(c, G("ffn_down_shexp.weight"), HF(nm), E, S, R_COPY, 0));
            if (!ds) TRY(plan1(c, G("ffn_gate_inp_shexp.weight"), HF("mlp.shared_expert_gate.weight"), 1, E, R_COPY, 0));
        }
#undef G
#undef HF
    }
    return MOE_OK;
}

/* --- reading rows as floats --- */

static float fp8_e4m3(uint8_t b) {
    int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 15 && m == 7) v = NAN; /* e4m3fn: no infinities, one NaN */
    else if (e == 0) v = ldexpf((float)m, -9); /* subnormal: m/8 * 2^-6 */
    else v = ldexpf(1.0f + (float)m / 8.0f, e - 7);
    return s ? -v : v;
}

static float elem(const moe_st_tensor *t, uint64_t i) {
    const uint8_t *p = (const uint8_t *)t->data;
    switch (t->dtype) {
    case MOE_ST_F32: {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    }
    case MOE_ST_F16: {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        return moe_f16_to_f32(h);
    }
    case MOE_ST_BF16: {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        return moe_bf16_to_f32(h);
    }
    case MOE_ST_F8_E4M3: return fp8_e4m3(p[i]);
    default: return NAN; /* refused by need() */
    }
}

/* Row `row` of t viewed as (rows, cols) into dst[cols], FP8 scaled by
 * its 128x128 block's scale_inv. */
static void read_row(const conv *c, const moe_st_tensor *t, const moe_st_tensor *scale, int64_t row, int64_t cols,
                     float *dst) {
    uint64_t base = (uint64_t)row * (uint64_t)cols;
    const uint8_t *p = (const uint8_t *)t->data;
    if (t->dtype == MOE_ST_F32) {
        memcpy(dst, p + 4 * base, (size_t)cols * 4);
        return;
    }
    if (t->dtype == MOE_ST_F8_E4M3)
        for (int64_t k = 0; k < cols; k++) dst[k] = c->fp8[p[base + (uint64_t)k]];
    else
        for (int64_t k = 0; k < cols; k++) dst[k] = elem(t, base + (uint64_t)k);
    if (scale) {
        int64_t nb = scale->shape[1], rb = row / FP8_BLOCK;
        for (int64_t k = 0; k < cols; k++) dst[k] *= elem(scale, (uint64_t)(rb * nb + k / FP8_BLOCK));
    }
}

/* Source row of output row i of slab j. */
static int64_t src_row(const out_tensor *o, int64_t j, int64_t i, int *si) {
    *si = 0;
    switch (o->how) {
    case R_PERM: {
        int64_t d = o->ne[1] / o->a, h = i / d, k = i % d; /* k = 2m + t <- t*d/2 + m */
        return h * d + (k & 1) * (d / 2) + k / 2;
    }
    case R_STACK: *si = (int)j; return i;
    case R_VB: return j * (o->a + o->b) + o->a + i;
    default: return j * o->ne[1] + i;
    }
}

/* Writes output tensor o: chunks of rows as floats, encoded to o->type. */
static int write_tensor(conv *c, moe_gguf_writer *w, const out_tensor *o, float *fbuf, void *qbuf, float *tbuf) {
    const int64_t cols = o->ne[0];
    const size_t row_bytes = moe_row_size(o->type, cols);
    int64_t per = (int64_t)(CHUNK_FLOATS / (size_t)cols);
    if (per < 1) per = 1;
    if (o->how == R_GEN) return moe_gguf_writer_write_tensor(w, c->rope_freqs, (size_t)cols * sizeof(float));
    for (int64_t j = 0; j < o->ne[2]; j++) {
        if (o->how == R_KB) {
            /* (nope rows of r) of head j, transposed into r rows of nope */
            const int64_t r = o->ne[1], nope = o->a;
            for (int64_t k = 0; k < nope; k++)
                read_row(c, o->src[0], o->scale[0], j * (o->a + o->b) + k, r, tbuf + k * r);
            for (int64_t i = 0; i < r; i++) {
                for (int64_t k = 0; k < nope; k++) fbuf[k] = tbuf[k * r + i];
                int rc = o->type == MOE_TYPE_F32 ? MOE_OK : moe_quantize_row(o->type, fbuf, qbuf, cols);
                if (rc == MOE_OK) rc = moe_gguf_writer_write_tensor(w, o->type == MOE_TYPE_F32 ? (void *)fbuf : qbuf, row_bytes);
                if (rc) return rc;
            }
            continue;
        }
        for (int64_t i0 = 0; i0 < o->ne[1]; i0 += per) {
            int64_t n = o->ne[1] - i0 < per ? o->ne[1] - i0 : per;
            for (int64_t i = 0; i < n; i++) {
                int si;
                int64_t sr = src_row(o, j, i0 + i, &si);
                read_row(c, o->src[si], o->scale[si], sr, cols, fbuf + i * cols);
            }
            for (int64_t i = 0; i < n; i++) {
                const float *x = fbuf + i * cols;
                for (int64_t k = 0; k < cols; k++)
                    if (!isfinite(x[k])) {
                        seterr(c, "tensor '%s' (from '%s'): non-finite value at row %lld", o->name, o->src[0]->name,
                               (long long)(j * o->ne[1] + i0 + i));
                        return MOE_ENONFINITE;
                    }
            }
            if (o->type == MOE_TYPE_F32) {
                TRY(moe_gguf_writer_write_tensor(w, fbuf, (size_t)n * row_bytes));
                continue;
            }
            for (int64_t i = 0; i < n; i++)
                TRY(moe_quantize_row(o->type, fbuf + i * cols, (uint8_t *)qbuf + (size_t)i * row_bytes, cols));
            TRY(moe_gguf_writer_write_tensor(w, qbuf, (size_t)n * row_bytes));
        }
        if (o->how == R_STACK) /* one expert at a time resident, not the whole stack */
            for (int sh = 0; sh < c->n_shard; sh++) {
                moe_st_drop_pages(c->shard[sh], o->src[j]);
                moe_st_drop_pages(c->shard[sh], o->scale[j]);
            }
    }
    return MOE_OK;
}

/* --- tokenizer --- */

/* tokenizer.ggml.pre for a tokenizer.json pre_tokenizer: the Split regexes
 * of each family as its tokenizer.json has them (after JSON decoding). */
#define RE_LLAMA3                                                                                                    \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"        \
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_QWEN2                                                                                                     \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"             \
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_DSV3_WORDS                                                                                                \
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| "             \
    "?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"

static const char *split_re(const cJSON *p) {
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(p, "type");
    if (!cJSON_IsString(ty) || strcmp(ty->valuestring, "Split")) return NULL;
    const cJSON *re = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(p, "pattern"), "Regex");
    return cJSON_IsString(re) ? re->valuestring : NULL;
}

static const char *pre_name(const cJSON *pt) {
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(pt, "type");
    if (!cJSON_IsString(ty)) return NULL;
    if (!strcmp(ty->valuestring, "ByteLevel")) /* GPT-2's own regex inside ByteLevel */
        return cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(pt, "use_regex")) ? NULL : "gpt-2";
    if (strcmp(ty->valuestring, "Sequence")) return NULL;
    const cJSON *seq = cJSON_GetObjectItemCaseSensitive(pt, "pretokenizers");
    const char *re[8] = {0};
    int n = 0;
    bool digits = false;
    for (const cJSON *p = cJSON_IsArray(seq) ? seq->child : NULL; p; p = p->next) {
        const char *r = split_re(p);
        const cJSON *pty = cJSON_GetObjectItemCaseSensitive(p, "type");
        if (r && n < 8) re[n++] = r;
        else if (cJSON_IsString(pty) && !strcmp(pty->valuestring, "Digits")) digits = true;
    }
    if (n == 1 && !strcmp(re[0], RE_LLAMA3)) return "llama-bpe";
    if (n == 1 && !strcmp(re[0], RE_QWEN2)) return "qwen2";
    if (n == 3 && !strcmp(re[0], "\\p{N}{1,3}") && !strcmp(re[2], RE_DSV3_WORDS)) return "deepseek-v3";
    /* DeepSeek LLM / V2: newline, letters, punctuation, trailing space, CJK, then each digit */
    if (n == 5 && digits && !strcmp(re[0], "[\r\n]") && !strncmp(re[1], "\\s?[A-Za-z", 10) && !strcmp(re[3], "\\s+$"))
        return "deepseek-llm";
    return NULL;
}

const char *moe_convert_pre_name(const char *json) {
    cJSON *j = cJSON_Parse(json);
    const char *r = j ? pre_name(j) : NULL;
    cJSON_Delete(j);
    return r;
}

/* A special token named in tokenizer_config.json: a string or {"content": ...}. */
static const char *tok_content(const cJSON *tc, const char *key) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(tc, key);
    if (cJSON_IsObject(j)) j = cJSON_GetObjectItemCaseSensitive(j, "content");
    return cJSON_IsString(j) ? j->valuestring : NULL;
}

static int64_t tok_id(char **tokens, int64_t n, const char *s) {
    for (int64_t i = 0; s && i < n; i++)
        if (tokens[i] && !strcmp(tokens[i], s)) return i;
    return -1;
}

static int write_tokenizer(conv *c, moe_gguf_writer *w) {
    cJSON *tj = NULL, *tc = NULL;
    char *tmpl_file = NULL;
    char **tokens = NULL, **merges = NULL;
    int32_t *types = NULL;
    int64_t nv = c->n_vocab, n_merges = 0;
    int rc = read_json(c, "tokenizer.json", &tj, true);
    if (rc) goto out;
    rc = read_json(c, "tokenizer_config.json", &tc, false);
    if (rc == MOE_ENOTFOUND) rc = MOE_OK;
    if (rc) goto out;
    rc = MOE_EFORMAT;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(tj, "model");
    const cJSON *mty = cJSON_GetObjectItemCaseSensitive(model, "type");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *mg = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsString(mty) || strcmp(mty->valuestring, "BPE")) {
        seterr(c, "tokenizer.json: model type '%.32s' is not supported (BPE)",
               cJSON_IsString(mty) ? mty->valuestring : "?");
        rc = MOE_EUNSUPPORTED;
        goto out;
    }
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(mg)) {
        seterr(c, "tokenizer.json: model.vocab (object) or model.merges (array) missing");
        goto out;
    }
    const char *pre = pre_name(cJSON_GetObjectItemCaseSensitive(tj, "pre_tokenizer"));
    if (!pre) {
        /* a SentencePiece-style BPE (byte_fallback, no ByteLevel) or an
         * unknown split: llama.cpp refuses an unknown pre-tokenizer too */
        seterr(c, "tokenizer.json: pre_tokenizer is not a byte-level one moed knows (gpt-2, llama-bpe, qwen2, "
                  "deepseek-llm, deepseek-v3)");
        rc = MOE_EUNSUPPORTED;
        goto out;
    }
    tokens = calloc((size_t)nv, sizeof(*tokens));
    types = calloc((size_t)nv, sizeof(*types));
    if (!tokens || !types) {
        rc = MOE_ENOMEM;
        goto out;
    }
    for (const cJSON *e = vocab->child; e; e = e->next) {
        double d = cJSON_IsNumber(e) ? e->valuedouble : -1;
        if (!(d >= 0 && d < (double)nv) || floor(d) != d) {
            seterr(c, "tokenizer.json: vocab entry '%.64s' has id %g outside config.json vocab_size %lld", e->string,
                   d, (long long)nv);
            goto out;
        }
        int64_t id = (int64_t)d;
        if (tokens[id]) {
            seterr(c, "tokenizer.json: token id %lld appears twice in model.vocab", (long long)id);
            goto out;
        }
        tokens[id] = e->string;
        types[id] = TT_NORMAL;
    }
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(tj, "added_tokens");
    for (const cJSON *e = cJSON_IsArray(added) ? added->child : NULL; e; e = e->next) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        const cJSON *ct = cJSON_GetObjectItemCaseSensitive(e, "content");
        double d = cJSON_IsNumber(id) ? id->valuedouble : -1;
        if (!cJSON_IsString(ct) || !(d >= 0 && d < (double)nv) || floor(d) != d) {
            seterr(c, "tokenizer.json: an added_tokens entry has no content or an id outside vocab_size %lld",
                   (long long)nv);
            goto out;
        }
        tokens[(int64_t)d] = ct->valuestring;
        types[(int64_t)d] = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(e, "special")) ? TT_CONTROL : TT_USER_DEFINED;
    }
    char pad[32];
    for (int64_t i = 0; i < nv; i++)
        if (!tokens[i]) {
            snprintf(pad, sizeof pad, "[PAD%lld]", (long long)i);
            if (!(tokens[i] = strdup(pad))) {
                rc = MOE_ENOMEM;
                goto out;
            }
            types[i] = -TT_UNUSED; /* negative: ours to free */
        }
    n_merges = cJSON_GetArraySize(mg);
    merges = calloc((size_t)n_merges + 1, sizeof(*merges));
    if (!merges) {
        rc = MOE_ENOMEM;
        goto out;
    }
    int64_t k = 0;
    for (const cJSON *e = mg->child; e; e = e->next, k++) {
        /* "a b" strings, or ["a", "b"] pairs in newer tokenizers */
        if (cJSON_IsString(e)) {
            merges[k] = strdup(e->valuestring);
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(e->child) &&
                   cJSON_IsString(e->child->next)) {
            size_t la = strlen(e->child->valuestring), lb = strlen(e->child->next->valuestring);
            if ((merges[k] = malloc(la + lb + 2))) {
                memcpy(merges[k], e->child->valuestring, la);
                merges[k][la] = ' ';
                memcpy(merges[k] + la + 1, e->child->next->valuestring, lb + 1);
            }
        } else {
            seterr(c, "tokenizer.json: model.merges[%lld] is neither \"a b\" nor [\"a\", \"b\"]", (long long)k);
            goto out;
        }
        if (!merges[k]) {
            rc = MOE_ENOMEM;
            goto out;
        }
    }
    int32_t *tt = malloc((size_t)nv * sizeof(*tt));
    if (!tt) {
        rc = MOE_ENOMEM;
        goto out;
    }
    for (int64_t i = 0; i < nv; i++) tt[i] = types[i] < 0 ? -types[i] : types[i];
    int wr = 0;
    wr |= moe_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2");
    wr |= moe_gguf_writer_set_str(w, "tokenizer.ggml.pre", pre);
    wr |= moe_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)tokens, (uint64_t)nv);
    wr |= moe_gguf_writer_set_arr(w, "tokenizer.ggml.token_type", MOE_GGUF_INT32, tt, (uint64_t)nv);
    wr |= moe_gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", (const char *const *)merges, (uint64_t)n_merges);
    free(tt);
    /* special tokens: tokenizer_config.json by content, else config.json ids */
    static const struct {
        const char *tc, *cfg, *key;
    } SP[] = {
        {"bos_token", "bos_token_id", "tokenizer.ggml.bos_token_id"},
        {"eos_token", "eos_token_id", "tokenizer.ggml.eos_token_id"},
        {"pad_token", "pad_token_id", "tokenizer.ggml.padding_token_id"},
        {"unk_token", NULL, "tokenizer.ggml.unknown_token_id"},
    };
    int64_t bos = -1;
    for (size_t i = 0; i < sizeof SP / sizeof *SP; i++) {
        int64_t id = tok_id(tokens, nv, tok_content(tc, SP[i].tc));
        const cJSON *j = SP[i].cfg ? cfg_item(c, SP[i].cfg) : NULL;
        if (cJSON_IsArray(j)) j = j->child; /* eos_token_id may be a list: the first */
        if (id < 0 && cJSON_IsNumber(j) && j->valuedouble >= 0 && j->valuedouble < (double)nv)
            id = (int64_t)j->valuedouble;
        if (id >= 0) wr |= moe_gguf_writer_set_u32(w, SP[i].key, (uint32_t)id);
        if (i == 0) bos = id;
    }
    /* add_bos: tokenizer_config.json says, else whether a TemplateProcessing
     * post-processor puts the BOS token first (Llama 3); neither: the key is
     * left out, as llama.cpp leaves it */
    const cJSON *ab = cJSON_GetObjectItemCaseSensitive(tc, "add_bos_token");
    if (cJSON_IsBool(ab)) {
        wr |= moe_gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", cJSON_IsTrue(ab));
    } else if (bos >= 0) {
        const cJSON *pp = cJSON_GetObjectItemCaseSensitive(tj, "post_processor");
        const cJSON *single = NULL;
        const cJSON *procs = cJSON_GetObjectItemCaseSensitive(pp, "processors");
        for (const cJSON *p = cJSON_IsArray(procs) ? procs->child : pp; p && !single; p = cJSON_IsArray(procs) ? p->next : NULL)
            single = cJSON_GetObjectItemCaseSensitive(p, "single");
        if (cJSON_IsArray(single)) {
            const cJSON *st = cJSON_GetObjectItemCaseSensitive(single->child, "SpecialToken");
            const cJSON *sid = cJSON_GetObjectItemCaseSensitive(st, "id");
            wr |= moe_gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token",
                                           cJSON_IsString(sid) && !strcmp(sid->valuestring, tokens[bos]));
        }
    }
    const cJSON *ae = cJSON_GetObjectItemCaseSensitive(tc, "add_eos_token");
    if (cJSON_IsBool(ae)) wr |= moe_gguf_writer_set_bool(w, "tokenizer.ggml.add_eos_token", cJSON_IsTrue(ae));
    /* chat template: chat_template.jinja (newer transformers), else
     * tokenizer_config.json's string or the list entry named "default" */
    size_t tl;
    int trc = read_file(c, "chat_template.jinja", &tmpl_file, &tl, false);
    if (trc && trc != MOE_ENOTFOUND) {
        rc = trc;
        goto out;
    }
    const char *tmpl = tmpl_file;
    const cJSON *ct = cJSON_GetObjectItemCaseSensitive(tc, "chat_template");
    if (!tmpl && cJSON_IsString(ct)) tmpl = ct->valuestring;
    for (const cJSON *e = !tmpl && cJSON_IsArray(ct) ? ct->child : NULL; e; e = e->next) {
        const cJSON *nm = cJSON_GetObjectItemCaseSensitive(e, "name"), *t = cJSON_GetObjectItemCaseSensitive(e, "template");
        if (cJSON_IsString(nm) && !strcmp(nm->valuestring, "default") && cJSON_IsString(t)) tmpl = t->valuestring;
    }
    if (tmpl) wr |= moe_gguf_writer_set_str(w, "tokenizer.chat_template", tmpl);
    rc = wr ? MOE_ENOMEM : MOE_OK;
out:
    for (int64_t i = 0; tokens && types && i < nv; i++)
        if (types[i] < 0) free(tokens[i]);
    for (int64_t i = 0; merges && i < n_merges; i++) free(merges[i]);
    free(tokens);
    free(types);
    free(merges);
    free(tmpl_file);
    cJSON_Delete(tj);
    cJSON_Delete(tc);
    return rc;
}

/* --- driver --- */

static int file_type_of(int t) { /* llama_ftype */
    return t == MOE_TYPE_F16 ? 1 : t == MOE_TYPE_Q8_0 ? 7 : t == MOE_TYPE_BF16 ? 32 : 0;
}

int moe_convert(const char *hf_dir, const char *out, const moe_convert_opts *opts, char *err, size_t errsz) {
    conv c = {.dir = hf_dir, .err = err, .errsz = errsz};
    if (err && errsz) err[0] = 0;
    int t = opts ? opts->type : MOE_TYPE_F16;
    if (!hf_dir || !out || (t != MOE_TYPE_F32 && t != MOE_TYPE_F16 && t != MOE_TYPE_BF16 && t != MOE_TYPE_Q8_0)) {
        seterr(&c, "bad arguments: a directory, an output path and a type of F32, F16, BF16 or Q8_0");
        return MOE_EINVAL;
    }
    c.out_type = t;
    for (int i = 0; i < 256; i++) c.fp8[i] = fp8_e4m3((uint8_t)i);
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", out);
    moe_gguf_writer *w = NULL;
    float *fbuf = NULL, *tbuf = NULL;
    void *qbuf = NULL;
    bool begun = false;
    int rc = read_config(&c);
    if (!rc) rc = open_weights(&c);
    if (!rc) rc = plan(&c);
    if (rc) goto out;
    rc = MOE_ENOMEM;
    if (!(w = moe_gguf_writer_new())) goto out;
    /* general.name: the directory's last component ("a/b/" names b) */
    char name[256];
    snprintf(name, sizeof name, "%s", hf_dir);
    for (size_t n = strlen(name); n > 1 && name[n - 1] == '/'; n--) name[n - 1] = 0;
    const char *base = strrchr(name, '/') ? strrchr(name, '/') + 1 : name;
    memmove(name, base, strlen(base) + 1);
    int wr = moe_gguf_writer_set_str(w, "general.architecture", c.arch);
    wr |= moe_gguf_writer_set_str(w, "general.name", name);
    wr |= moe_gguf_writer_set_u32(w, "general.file_type", (uint32_t)file_type_of(t));
    wr |= moe_gguf_writer_set_u32(w, "general.quantization_version", 2);
    if (wr) goto out;
    if ((rc = write_hparams(&c, w)) || (rc = write_tokenizer(&c, w))) goto out;
    size_t max_cols = 1, max_kb = 1;
    for (int i = 0; i < c.n_out; i++) {
        const out_tensor *o = &c.out[i];
        if ((size_t)o->ne[0] > max_cols) max_cols = (size_t)o->ne[0];
        if (o->how == R_KB && (size_t)(o->ne[0] * o->ne[1]) > max_kb) max_kb = (size_t)(o->ne[0] * o->ne[1]);
        if ((rc = moe_gguf_writer_add_tensor(w, o->name, (moe_type)o->type, o->ne[2] > 1 ? 3 : o->ne[1] > 1 ? 2 : 1,
                                             o->ne))) {
            seterr(&c, "cannot declare tensor '%s' (%s)", o->name, moe_strerror(rc));
            goto out;
        }
    }
    rc = MOE_ENOMEM;
    size_t nf = max_cols > CHUNK_FLOATS ? max_cols : CHUNK_FLOATS;
    fbuf = malloc(nf * sizeof(float));
    qbuf = malloc(nf * sizeof(float));
    tbuf = malloc(max_kb * sizeof(float));
    if (!fbuf || !qbuf || !tbuf) goto out;
    if ((rc = moe_gguf_writer_begin(w, tmp))) {
        seterr(&c, "cannot write '%s': %s", tmp, strerror(errno));
        goto out;
    }
    begun = true;
    for (int i = 0; i < c.n_out; i++) {
        if (opts && opts->progress)
            fprintf(stderr, "\rmoed: convert: [%d/%d] %-40.40s %s", i + 1, c.n_out, c.out[i].name,
                    moe_type_name(c.out[i].type));
        if ((rc = write_tensor(&c, w, &c.out[i], fbuf, qbuf, tbuf))) {
            if (rc != MOE_ENONFINITE) seterr(&c, "writing tensor '%s' to '%s': %s", c.out[i].name, tmp, moe_strerror(rc));
            goto out;
        }
        /* streamed through once: let the kernel drop the source pages */
        for (int k = 0; k < c.out[i].n_src; k++)
            for (int sh = 0; sh < c.n_shard; sh++) {
                moe_st_drop_pages(c.shard[sh], c.out[i].src[k]);
                moe_st_drop_pages(c.shard[sh], c.out[i].scale[k]);
            }
    }
    if (opts && opts->progress) fprintf(stderr, "\n");
    if ((rc = moe_gguf_writer_finish(w))) {
        seterr(&c, "finishing '%s': %s", tmp, moe_strerror(rc));
        goto out;
    }
    if (rename(tmp, out) != 0) {
        seterr(&c, "cannot rename '%s' to '%s': %s", tmp, out, strerror(errno));
        rc = MOE_EIO;
        goto out;
    }
    begun = false;
out:
    if (rc == MOE_ENOMEM && err && !err[0]) seterr(&c, "out of memory");
    moe_gguf_writer_free(w);
    if (begun) unlink(tmp);
    free(fbuf);
    free(qbuf);
    free(tbuf);
    free(c.out);
    free(c.rope_freqs);
    for (int i = 0; i < c.n_shard; i++) moe_st_close(c.shard[i]);
    cJSON_Delete(c.cfg);
    return rc;
}
