/* check_model.c - Check suite "model": mkmodel writes every architecture
 * at every type, model.c loads it back with the hyper-parameters asked
 * for and parameter counts computed here independently from the shapes;
 * damaged files (one change each) are refused naming the tensor or key,
 * hyper-parameters that would divide by zero or make NaN among them;
 * the vocabulary round-trips text; `moed info` prints the model. */
#include <check.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "chat_template.h"
#include "gguf.h"
#include "mkmodel.h"
#include "model.h"
#include "qblocks.h"
#include "quant.h"
#include "tokenizer.h"

static const char *const ARCHS[] = {"deepseek2", "qwen2moe", "qwen3moe", "mixtral", "llama", "qwen2"};
#define N_ARCHS 6
static const int TYPES[] = {MOE_TYPE_F32, MOE_TYPE_F16, MOE_TYPE_BF16, MOE_TYPE_Q8_0, MOE_TYPE_Q4_0};

static char tmpdir[64];

static void setup(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/check_model_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static void teardown(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
}

static void tmp_path(char *buf, size_t n, const char *name) { snprintf(buf, n, "%s/%s", tmpdir, name); }

/* Parameter counts from the configuration alone, written out per
 * architecture (not from the file): total and active per token. */
static void expected_params(const moe_mkmodel_cfg *c, int64_t *total, int64_t *active) {
    const moe_hparams *h = &c->hp;
    int64_t E = h->n_embd, H = h->n_head, Hkv = h->n_head_kv, dk = h->n_embd_head_k, dv = h->n_embd_head_v;
    bool ds = !strcmp(c->arch, "deepseek2"), moe = strcmp(c->arch, "llama") && strcmp(c->arch, "qwen2");
    int64_t attn;
    if (ds) {
        int64_t q = h->q_lora_rank ? E * h->q_lora_rank + h->q_lora_rank + h->q_lora_rank * H * dk : E * H * dk;
        int64_t nope = dk - h->n_rot;
        attn = q + E * (h->kv_lora_rank + h->n_rot) + h->kv_lora_rank + h->kv_lora_rank * H * (nope + dv) + H * dv * E;
    } else {
        attn = E * H * dk + 2 * E * Hkv * dk + H * dk * E;
        if (!strcmp(c->arch, "qwen2") || !strcmp(c->arch, "qwen2moe")) attn += H * dk + 2 * Hkv * dk;
        if (!strcmp(c->arch, "qwen3moe")) attn += 2 * dk;
    }
    int64_t norms = 2 * E;
    int64_t dense = 3 * E * h->n_ff;
    int64_t n_ff_exp = h->n_ff_exp;
    int64_t routed = 3 * E * n_ff_exp * h->n_expert, routed_act = 3 * E * n_ff_exp * h->n_expert_used;
    int64_t sh = 0;
    if (ds) sh = 3 * E * n_ff_exp * h->n_expert_shared;
    if (!strcmp(c->arch, "qwen2moe")) sh = 3 * E * h->n_ff_shexp + E;
    int64_t router = E * h->n_expert;
    if (ds && h->expert_gating_func == MOE_HP_GATING_SIGMOID) router += h->n_expert; /* exp_probs_b */
    int64_t lead = ds ? h->n_layer_dense_lead : 0;
    int64_t t = 0, a = 0;
    for (int64_t il = 0; il < h->n_layer; il++) {
        t += attn + norms, a += attn + norms;
        if (!moe || il < lead) t += dense, a += dense;
        else t += routed + sh + router, a += routed_act + sh + router;
    }
    int64_t embd = E * h->n_vocab;
    *total = t + 2 * embd + E;
    *active = a + embd + E;
}

static moe_model *make_and_load(const char *arch, int type, const char *file, moe_mkmodel_cfg *cfg) {
    char err[MOE_ERR_MAX] = "", path[128];
    ck_assert_int_eq(moe_mkmodel_preset(arch, "tiny", cfg, err, sizeof err), MOE_OK);
    cfg->type = type;
    cfg->seed = 7;
    tmp_path(path, sizeof path, file);
    int rc = moe_mkmodel_write(cfg, path, err, sizeof err);
    ck_assert_msg(rc == MOE_OK, "%s: %s", arch, err);
    int st = 0;
    moe_model *m = moe_model_load(path, &st, err, sizeof err);
    ck_assert_msg(m != NULL, "%s %s: load: %s", arch, moe_type_name(type), err);
    return m;
}

static void assert_hparams(const moe_mkmodel_cfg *c, const moe_hparams *h) {
    const moe_hparams *w = &c->hp;
    bool ds = !strcmp(c->arch, "deepseek2");
    ck_assert_int_eq(h->n_layer, w->n_layer);
    ck_assert_int_eq(h->n_embd, w->n_embd);
    ck_assert_int_eq(h->n_vocab, w->n_vocab);
    ck_assert_int_eq(h->n_ctx_train, w->n_ctx_train);
    ck_assert_int_eq(h->n_head, w->n_head);
    ck_assert_int_eq(h->n_head_kv, w->n_head_kv);
    ck_assert_int_eq(h->n_rot, w->n_rot);
    ck_assert_int_eq(h->n_embd_head_v, w->n_embd_head_v);
    ck_assert_int_eq(h->n_embd_head_k, ds ? w->n_embd_head_qk_nope + w->n_rot : w->n_embd_head_k);
    ck_assert_float_eq(h->rms_eps, w->rms_eps);
    ck_assert_double_eq_tol(h->rope_freq_base, w->rope_freq_base, 1e-3);
    ck_assert_int_eq(h->rope_scaling, w->rope_scaling);
    ck_assert_double_eq_tol(h->rope_scaling_factor, w->rope_scaling_factor, 1e-6);
    if (w->rope_scaling == MOE_ROPE_SCALING_YARN) {
        ck_assert_int_eq(h->rope_orig_ctx, w->rope_orig_ctx);
        ck_assert_double_eq_tol(h->rope_yarn_log_mul, w->rope_yarn_log_mul, 1e-6);
    }
    bool moe = strcmp(c->arch, "llama") && strcmp(c->arch, "qwen2");
    ck_assert_int_eq(h->is_moe, moe);
    if (!moe) {
        ck_assert_int_eq(h->n_ff, w->n_ff);
        ck_assert_int_eq(h->n_expert, 0);
        return;
    }
    ck_assert_int_eq(h->n_expert, w->n_expert);
    ck_assert_int_eq(h->n_expert_used, w->n_expert_used);
    ck_assert_int_eq(h->n_ff_exp, w->n_ff_exp);
    if (!strcmp(c->arch, "mixtral")) ck_assert_int_eq(h->n_ff, w->n_ff_exp); /* Mixtral's feed_forward_length */
    if (!ds) {
        ck_assert_int_eq(h->expert_gating_func, MOE_HP_GATING_SOFTMAX);
        ck_assert_int_eq(h->expert_weights_norm, !strcmp(c->arch, "mixtral") || !strcmp(c->arch, "qwen3moe"));
    }
    if (!strcmp(c->arch, "qwen2moe")) ck_assert_int_eq(h->n_ff_shexp, w->n_ff_shexp);
    if (ds) {
        ck_assert_int_eq(h->n_expert_shared, w->n_expert_shared);
        ck_assert_int_eq(h->n_ff_shexp, w->n_ff_exp * w->n_expert_shared);
        ck_assert_int_eq(h->n_layer_dense_lead, w->n_layer_dense_lead);
        ck_assert_int_eq(h->q_lora_rank, w->q_lora_rank);
        ck_assert_int_eq(h->has_q_lora, w->q_lora_rank > 0);
        ck_assert_int_eq(h->kv_lora_rank, w->kv_lora_rank);
        ck_assert_int_eq(h->n_embd_head_qk_nope, w->n_embd_head_qk_nope);
        ck_assert_double_eq_tol(h->expert_weights_scale, w->expert_weights_scale, 1e-6);
        ck_assert_int_eq(h->expert_gating_func, w->expert_gating_func);
        ck_assert_int_eq(h->expert_weights_norm, w->expert_weights_norm);
        ck_assert_int_eq(h->n_expert_group, w->n_expert_group);
        ck_assert_int_eq(h->n_group_used, w->n_group_used);
        ck_assert_int_eq(h->n_ff, w->n_ff);
    }
}

START_TEST(every_arch_every_type) {
    const char *arch = ARCHS[_i];
    for (size_t ti = 0; ti < sizeof TYPES / sizeof *TYPES; ti++) {
        moe_mkmodel_cfg cfg;
        char file[64];
        snprintf(file, sizeof file, "%s-%s.gguf", arch, moe_type_name(TYPES[ti]));
        moe_model *m = make_and_load(arch, TYPES[ti], file, &cfg);
        const moe_hparams *h = moe_model_hparams(m);
        ck_assert_str_eq(moe_model_arch_str(m), moe_mkmodel_gguf_arch(arch));
        assert_hparams(&cfg, h);
        int64_t total, active;
        expected_params(&cfg, &total, &active);
        ck_assert_int_eq(moe_model_n_params(m), total);
        ck_assert_int_eq(moe_model_n_params_active(m), active);
        /* matrices in the asked type, norms and routers F32 */
        const moe_model_weights *w = moe_model_weights_get(m);
        ck_assert_int_eq(w->tok_embd.type, TYPES[ti]);
        ck_assert_int_eq(w->output.type, TYPES[ti]);
        ck_assert_int_eq(w->output_norm.type, MOE_TYPE_F32);
        ck_assert(!h->tied_output);
        const moe_layer_weights *L = &w->layers[h->n_layer - 1];
        ck_assert_int_eq(L->wo.type, TYPES[ti]);
        ck_assert_int_eq(L->attn_norm.type, MOE_TYPE_F32);
        ck_assert_int_eq(L->is_moe, h->is_moe);
        if (h->is_moe) {
            ck_assert_int_eq(L->gate_inp.type, MOE_TYPE_F32);
            ck_assert_int_eq(L->down_exps.type, TYPES[ti]);
            ck_assert_int_eq(L->down_exps.ne[0], h->n_ff_exp);
            ck_assert_int_eq(L->down_exps.ne[1], h->n_embd);
            ck_assert_int_eq(L->down_exps.ne[2], h->n_expert);
        }
        /* norm weights are exactly 1 */
        float one;
        memcpy(&one, L->ffn_norm.data, sizeof one);
        ck_assert_float_eq(one, 1.0f);
        moe_model_free(m);
    }
}
END_TEST

START_TEST(overrides_and_v2lite) {
    char err[MOE_ERR_MAX] = "", path[128];
    moe_mkmodel_cfg cfg;
    ck_assert_int_eq(moe_mkmodel_preset("deepseek2", "tiny", &cfg, err, sizeof err), MOE_OK);
    cfg.hp.n_layer = 4, cfg.hp.n_layer_dense_lead = 2, cfg.hp.n_expert = 16, cfg.hp.n_expert_used = 3;
    cfg.hp.n_embd = 96, cfg.hp.n_vocab = 700, cfg.hp.n_ctx_train = 2048, cfg.hp.q_lora_rank = 0;
    cfg.hp.n_expert_shared = 2, cfg.hp.kv_lora_rank = 64;
    cfg.type = MOE_TYPE_Q4_0;
    tmp_path(path, sizeof path, "ov.gguf");
    ck_assert_int_eq(moe_mkmodel_write(&cfg, path, err, sizeof err), MOE_OK);
    int st;
    moe_model *m = moe_model_load(path, &st, err, sizeof err);
    ck_assert_msg(m != NULL, "%s", err);
    assert_hparams(&cfg, moe_model_hparams(m));
    int64_t total, active;
    expected_params(&cfg, &total, &active);
    ck_assert_int_eq(moe_model_n_params(m), total);
    ck_assert_int_eq(moe_model_n_params_active(m), active);
    moe_model_free(m);

    /* DeepSeek-V3-style routing: sigmoid + selection bias, groups, renormalised, scaled */
    ck_assert_int_eq(moe_mkmodel_preset("deepseek2", "tiny", &cfg, err, sizeof err), MOE_OK);
    cfg.hp.expert_gating_func = MOE_HP_GATING_SIGMOID, cfg.hp.n_expert_group = 4, cfg.hp.n_group_used = 2;
    cfg.hp.expert_weights_norm = true, cfg.hp.expert_weights_scale = 2.5;
    tmp_path(path, sizeof path, "v3.gguf");
    ck_assert_int_eq(moe_mkmodel_write(&cfg, path, err, sizeof err), MOE_OK);
    m = moe_model_load(path, &st, err, sizeof err);
    ck_assert_msg(m != NULL, "%s", err);
    assert_hparams(&cfg, moe_model_hparams(m));
    const moe_tensor_view *pb = &moe_model_weights_get(m)->layers[1].exp_probs_b;
    ck_assert_ptr_nonnull(pb->data);
    ck_assert_int_eq(pb->ne[0], 8);
    ck_assert_int_eq(pb->type, MOE_TYPE_F32);
    ck_assert_ptr_null(moe_model_weights_get(m)->layers[0].exp_probs_b.data); /* dense lead layer */
    expected_params(&cfg, &total, &active);
    ck_assert_int_eq(moe_model_n_params(m), total);
    ck_assert_int_eq(moe_model_n_params_active(m), active);
    moe_model_free(m);
    cfg.hp.n_expert_group = 3; /* 8 experts do not split into 3 groups */
    ck_assert_int_eq(moe_mkmodel_write(&cfg, path, err, sizeof err), MOE_EINVAL);
    ck_assert_msg(strstr(err, "groups") != NULL, "%s", err);

    /* inconsistent requests are refused before anything is written */
    ck_assert_int_eq(moe_mkmodel_preset("deepseek2", "tiny", &cfg, err, sizeof err), MOE_OK);
    cfg.hp.n_expert = 16;
    cfg.hp.n_expert_used = 17;
    ck_assert_int_eq(moe_mkmodel_write(&cfg, path, err, sizeof err), MOE_EINVAL);
    ck_assert_msg(strstr(err, "experts-used") != NULL, "%s", err);
    ck_assert_int_eq(moe_mkmodel_preset("qwen2", "v2-lite", &cfg, err, sizeof err), MOE_EINVAL);
    ck_assert_int_eq(moe_mkmodel_preset("gpt2", "tiny", &cfg, err, sizeof err), MOE_EINVAL);

    /* v2-lite is DeepSeek-V2-Lite's config.json; 15.7 B total, 2.4 B activated */
    ck_assert_int_eq(moe_mkmodel_preset("deepseek2", "v2-lite", &cfg, err, sizeof err), MOE_OK);
    const moe_hparams *h = &cfg.hp;
    ck_assert_int_eq(h->n_embd, 2048);
    ck_assert_int_eq(h->n_layer, 27);
    ck_assert_int_eq(h->n_head, 16);
    ck_assert_int_eq(h->q_lora_rank, 0);
    ck_assert_int_eq(h->kv_lora_rank, 512);
    ck_assert_int_eq(h->n_embd_head_qk_nope, 128);
    ck_assert_int_eq(h->n_rot, 64);
    ck_assert_int_eq(h->n_embd_head_v, 128);
    ck_assert_int_eq(h->n_ff, 10944);
    ck_assert_int_eq(h->n_expert, 64);
    ck_assert_int_eq(h->n_ff_exp, 1408);
    ck_assert_int_eq(h->n_expert_used, 6);
    ck_assert_int_eq(h->n_expert_shared, 2);
    ck_assert_int_eq(h->n_vocab, 102400);
    ck_assert_double_eq(h->rope_scaling_factor, 40);
    ck_assert_int_eq(h->rope_orig_ctx, 4096);
    expected_params(&cfg, &total, &active);
    fprintf(stderr, "v2-lite: %lld total, %lld active\n", (long long)total, (long long)active);
    ck_assert_msg(total > 15650000000LL && total < 15750000000LL, "%lld", (long long)total);
    ck_assert_msg(active > 2350000000LL && active < 2500000000LL, "%lld", (long long)active);
}
END_TEST

/* ---- damaged files: copy a valid file with one change ---- */

typedef struct edit {
    const char *drop_key;
    const char *set_key; /* with set_str or set_u32 */
    const char *set_str;
    uint32_t set_u32;
    const char *set2_key; /* a second u32 key */
    uint32_t set2_u32;
    const char *setf_key; /* an f32 key */
    float setf;
    const char *setd_key; /* an f64 key */
    double setd;
    const char *drop_tensor;  /* exact name; with every_layer, the suffix after "blk.N." */
    bool every_layer;
    const char *reshape;      /* tensor to give shape new_ne (zero data) */
    int64_t new_ne[3];
    const char *retype_f16;   /* tensor rewritten as F16 */
    const char *add_tensor;   /* an extra F32 tensor of 32 zeros */
} edit;

static bool drop_it(const edit *e, const char *name) {
    if (!e->drop_tensor) return false;
    if (!e->every_layer) return !strcmp(name, e->drop_tensor);
    const char *dot = strncmp(name, "blk.", 4) ? NULL : strchr(name + 4, '.');
    return dot && !strcmp(dot + 1, e->drop_tensor);
}

static void copy_edit(const char *src, const char *dst, const edit *e) {
    int st;
    char err[MOE_ERR_MAX];
    moe_gguf *g = moe_gguf_open(src, &st, err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    moe_gguf_writer *w = moe_gguf_writer_new();
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        const moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        if (e->drop_key && !strcmp(kv->key, e->drop_key)) continue;
        ck_assert_int_eq(moe_gguf_writer_set_value(w, kv->key, &kv->value), MOE_OK);
    }
    if (e->set_key && e->set_str) ck_assert_int_eq(moe_gguf_writer_set_str(w, e->set_key, e->set_str), MOE_OK);
    else if (e->set_key) ck_assert_int_eq(moe_gguf_writer_set_u32(w, e->set_key, e->set_u32), MOE_OK);
    if (e->set2_key) ck_assert_int_eq(moe_gguf_writer_set_u32(w, e->set2_key, e->set2_u32), MOE_OK);
    if (e->setf_key) ck_assert_int_eq(moe_gguf_writer_set_f32(w, e->setf_key, e->setf), MOE_OK);
    if (e->setd_key) ck_assert_int_eq(moe_gguf_writer_set_f64(w, e->setd_key, e->setd), MOE_OK);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        if (drop_it(e, t->name)) continue;
        if (e->reshape && !strcmp(t->name, e->reshape)) {
            uint32_t nd = e->new_ne[2] > 1 ? 3 : e->new_ne[1] > 1 ? 2 : 1;
            ck_assert_int_eq(moe_gguf_writer_add_tensor(w, t->name, t->type, nd, e->new_ne), MOE_OK);
        } else if (e->retype_f16 && !strcmp(t->name, e->retype_f16)) {
            ck_assert_int_eq(moe_gguf_writer_add_tensor(w, t->name, MOE_TYPE_F16, t->n_dims, t->ne), MOE_OK);
        } else {
            ck_assert_int_eq(moe_gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne), MOE_OK);
        }
    }
    int64_t extra_ne[1] = {32};
    if (e->add_tensor) ck_assert_int_eq(moe_gguf_writer_add_tensor(w, e->add_tensor, MOE_TYPE_F32, 1, extra_ne), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_begin(w, dst), MOE_OK);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        if (drop_it(e, t->name)) continue;
        if ((e->reshape && !strcmp(t->name, e->reshape)) || (e->retype_f16 && !strcmp(t->name, e->retype_f16))) {
            int64_t n = e->reshape && !strcmp(t->name, e->reshape) ? e->new_ne[0] * e->new_ne[1] * e->new_ne[2]
                                                                   : t->ne[0] * t->ne[1] * t->ne[2];
            size_t nb = e->reshape && !strcmp(t->name, e->reshape) ? moe_row_size(t->type, n) : (size_t)n * 2;
            void *z = calloc(1, nb);
            ck_assert_int_eq(moe_gguf_writer_write_tensor(w, z, nb), MOE_OK);
            free(z);
        } else {
            ck_assert_int_eq(moe_gguf_writer_write_tensor(w, t->data, t->nbytes), MOE_OK);
        }
    }
    if (e->add_tensor) {
        float z[32] = {0};
        ck_assert_int_eq(moe_gguf_writer_write_tensor(w, z, sizeof z), MOE_OK);
    }
    ck_assert_int_eq(moe_gguf_writer_finish(w), MOE_OK);
    moe_gguf_writer_free(w);
    moe_gguf_close(g);
}

START_TEST(damaged_files_refused) {
    static const struct {
        const char *arch;
        edit e;
        int status; /* MOE_OK: loads */
        const char *msg;
    } cases[] = {
        {"deepseek2", {.set_key = "general.architecture", .set_str = "gpt-neox"}, MOE_EUNSUPPORTED, "'gpt-neox'"},
        {"deepseek2", {.drop_key = "general.architecture"}, MOE_EFORMAT, "general.architecture"},
        {"deepseek2", {.drop_key = "deepseek2.block_count"}, MOE_EFORMAT, "'deepseek2.block_count'"},
        {"deepseek2", {.drop_key = "deepseek2.attention.kv_lora_rank"}, MOE_EFORMAT, "deepseek2.attention.kv_lora_rank"},
        {"deepseek2", {.drop_key = "deepseek2.expert_feed_forward_length"}, MOE_EFORMAT, "expert_feed_forward_length"},
        {"qwen2moe", {.drop_key = "qwen2moe.expert_used_count"}, MOE_EFORMAT, "'qwen2moe.expert_used_count'"},
        {"llama", {.drop_key = "llama.attention.layer_norm_rms_epsilon"}, MOE_EFORMAT, "layer_norm_rms_epsilon"},
        {"llama", {.drop_key = "llama.embedding_length"}, MOE_EFORMAT, "'llama.embedding_length'"},
        {"deepseek2", {.drop_tensor = "token_embd.weight"}, MOE_EFORMAT, "'token_embd.weight'"},
        {"deepseek2", {.drop_tensor = "output_norm.weight"}, MOE_EFORMAT, "'output_norm.weight'"},
        {"deepseek2", {.drop_tensor = "blk.2.attn_norm.weight"}, MOE_EFORMAT, "'blk.2.attn_norm.weight'"},
        {"deepseek2", {.drop_tensor = "blk.1.attn_q_b.weight"}, MOE_EFORMAT, "'blk.1.attn_q_b.weight'"},
        {"deepseek2", {.drop_tensor = "blk.1.attn_kv_a_mqa.weight"}, MOE_EFORMAT, "'blk.1.attn_kv_a_mqa.weight'"},
        {"deepseek2", {.drop_tensor = "blk.1.attn_kv_b.weight"}, MOE_EFORMAT, "'blk.1.attn_kv_b.weight'"},
        {"deepseek2", {.drop_tensor = "blk.0.ffn_down.weight"}, MOE_EFORMAT, "'blk.0.ffn_down.weight'"},
        {"deepseek2", {.drop_tensor = "blk.1.ffn_gate_inp.weight"}, MOE_EFORMAT, "'blk.1.ffn_gate_inp.weight'"},
        {"deepseek2", {.drop_tensor = "blk.2.ffn_up_exps.weight"}, MOE_EFORMAT, "'blk.2.ffn_up_exps.weight'"},
        {"deepseek2", {.drop_tensor = "blk.1.ffn_down_shexp.weight"}, MOE_EFORMAT, "'blk.1.ffn_down_shexp.weight'"},
        {"qwen2moe", {.drop_tensor = "blk.1.ffn_gate_inp_shexp.weight"}, MOE_EFORMAT, "'blk.1.ffn_gate_inp_shexp.weight'"},
        {"qwen2", {.drop_tensor = "blk.0.attn_k.bias"}, MOE_EFORMAT, "'blk.0.attn_k.bias'"},
        {"qwen3moe", {.drop_tensor = "blk.1.attn_k_norm.weight"}, MOE_EFORMAT, "'blk.1.attn_k_norm.weight'"},
        {"mixtral", {.drop_tensor = "blk.0.ffn_down_exps.weight"}, MOE_EFORMAT, "'blk.0.ffn_down_exps.weight'"},
        {"llama", {.drop_tensor = "blk.1.attn_v.weight"}, MOE_EFORMAT, "'blk.1.attn_v.weight'"},
        {"deepseek2", {.reshape = "blk.1.ffn_up_exps.weight", .new_ne = {64, 64, 8}}, MOE_ESHAPE,
         "'blk.1.ffn_up_exps.weight' has shape [64, 64, 8], expected [64, 32, 8]"},
        {"llama", {.reshape = "blk.0.attn_k.weight", .new_ne = {64, 64, 1}}, MOE_ESHAPE,
         "'blk.0.attn_k.weight' has shape [64, 64], expected [64, 32]"},
        {"qwen2", {.reshape = "token_embd.weight", .new_ne = {32, 512, 1}}, MOE_ESHAPE, "'token_embd.weight'"},
        {"llama", {.set_key = "llama.vocab_size", .set_u32 = 1000}, MOE_ESHAPE, "vocab_size"},
        {"llama", {.retype_f16 = "blk.0.ffn_norm.weight"}, MOE_EUNSUPPORTED, "'blk.0.ffn_norm.weight' has type F16"},
        {"llama", {.set_key = "llama.attention.head_count_kv", .set_u32 = 3}, MOE_EFORMAT, "head_count_kv"},
        /* accepted: an extra tensor (warned), and a tied output head */
        {"llama", {.add_tensor = "blk.0.something_new.weight"}, MOE_OK, NULL},
        {"qwen2", {.drop_tensor = "output.weight"}, MOE_OK, NULL},
    };
    char src[128], dst[128], err[MOE_ERR_MAX];
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        moe_mkmodel_cfg cfg;
        ck_assert_int_eq(moe_mkmodel_preset(cases[i].arch, "tiny", &cfg, err, sizeof err), MOE_OK);
        cfg.type = MOE_TYPE_F32;
        snprintf(src, sizeof src, "%s/src-%s.gguf", tmpdir, cases[i].arch);
        snprintf(dst, sizeof dst, "%s/bad.gguf", tmpdir);
        struct stat sb;
        if (stat(src, &sb) != 0) ck_assert_int_eq(moe_mkmodel_write(&cfg, src, err, sizeof err), MOE_OK);
        copy_edit(src, dst, &cases[i].e);
        int st = 12345;
        err[0] = 0;
        moe_model *m = moe_model_load(dst, &st, err, sizeof err);
        if (cases[i].status == MOE_OK) {
            ck_assert_msg(m != NULL, "case %zu: %s", i, err);
            ck_assert_int_eq(st, MOE_OK);
            if (cases[i].e.drop_tensor) { /* tied: output is token_embd, counted once */
                const moe_hparams *h = moe_model_hparams(m);
                ck_assert(h->tied_output);
                ck_assert_ptr_eq(moe_model_weights_get(m)->output.data, moe_model_weights_get(m)->tok_embd.data);
                int64_t total, active;
                expected_params(&cfg, &total, &active);
                ck_assert_int_eq(moe_model_n_params(m), total - h->n_embd * h->n_vocab);
                ck_assert_int_eq(moe_model_n_params_active(m), active);
            }
            moe_model_free(m);
            continue;
        }
        ck_assert_msg(m == NULL, "case %zu loaded", i);
        ck_assert_msg(st == cases[i].status, "case %zu: status %s, want %s (%s)", i, moe_status_name(st),
                      moe_status_name(cases[i].status), err);
        ck_assert_msg(strstr(err, cases[i].msg) != NULL, "case %zu: message '%s' lacks '%s'", i, err, cases[i].msg);
    }
}
END_TEST

/* Hyper-parameters the forward pass divides by, takes logs of or sizes
 * buffers with: each bad value alone is refused at load with MOE_EFORMAT
 * and a message naming the GGUF key. Before, a linear rope with factor 0
 * loaded and every logit came out NaN (inv_freq / 0). */
START_TEST(bad_hparams_refused) {
    const float NaN = NAN, Inf = INFINITY;
#define DS(k) "deepseek2." k
#define LL(k) "llama." k
    static struct {
        const char *arch;
        edit e;
        const char *key; /* the message names it */
    } cases[] = {
        /* rope scaling factor: 0 with a type named, < 1, non-finite */
        {"llama", {.set_key = LL("rope.scaling.type"), .set_str = "linear", .setf_key = LL("rope.scaling.factor")},
         LL("rope.scaling.factor")},
        {"deepseek2", {.setf_key = DS("rope.scaling.factor"), .setf = 0}, DS("rope.scaling.factor")},
        {"deepseek2", {.setf_key = DS("rope.scaling.factor"), .setf = -4}, DS("rope.scaling.factor")},
        {"deepseek2", {.setf_key = DS("rope.scaling.factor"), .setf = 0.5f}, DS("rope.scaling.factor")},
        {"llama", {.set_key = LL("rope.scaling.type"), .set_str = "linear", .setf_key = LL("rope.scaling.factor"),
                   .setf = 1}, NULL}, /* 1 is fine */
        /* rope base */
        {"llama", {.setf_key = LL("rope.freq_base"), .setf = 0}, LL("rope.freq_base")},
        {"llama", {.setf_key = LL("rope.freq_base"), .setf = -10000}, LL("rope.freq_base")},
        {"deepseek2", {.setf_key = DS("rope.freq_base"), .setf = 1}, DS("rope.freq_base")}, /* YaRN: log(1) = 0 */
        /* YaRN parameters as the forward pass reads them */
        {"deepseek2", {.setf_key = DS("rope.scaling.yarn_beta_fast"), .setf = 0}, DS("rope.scaling.yarn_beta_fast")},
        {"deepseek2", {.setf_key = DS("rope.scaling.yarn_beta_slow"), .setf = -1}, DS("rope.scaling.yarn_beta_slow")},
        {"deepseek2", {.set_key = DS("rope.scaling.original_context_length"), .set_u32 = 0},
         DS("rope.scaling.original_context_length")},
        /* rms epsilon: <= 0, >= 1, and so small that it is 0 as a float */
        {"llama", {.setf_key = LL("attention.layer_norm_rms_epsilon"), .setf = 0}, LL("attention.layer_norm_rms_epsilon")},
        {"llama", {.setf_key = LL("attention.layer_norm_rms_epsilon"), .setf = -1e-5f},
         LL("attention.layer_norm_rms_epsilon")},
        {"deepseek2", {.setf_key = DS("attention.layer_norm_rms_epsilon"), .setf = 1},
         DS("attention.layer_norm_rms_epsilon")},
        /* zero dimensions */
        {"llama", {.set_key = LL("attention.key_length"), .set_u32 = 0}, LL("attention.key_length")},
        {"llama", {.set_key = LL("attention.value_length"), .set_u32 = 0}, LL("attention.value_length")},
        {"llama", {.set_key = LL("rope.dimension_count"), .set_u32 = 0}, LL("rope.dimension_count")},
        {"llama", {.set_key = LL("rope.dimension_count"), .set_u32 = 15}, LL("rope.dimension_count")},
        {"llama", {.set_key = LL("attention.head_count"), .set_u32 = 0}, LL("attention.head_count")},
        {"llama", {.set_key = LL("attention.head_count_kv"), .set_u32 = 0}, LL("attention.head_count_kv")},
        {"llama", {.set_key = LL("embedding_length"), .set_u32 = 0}, LL("embedding_length")},
        {"llama", {.set_key = LL("block_count"), .set_u32 = 0}, LL("block_count")},
        {"llama", {.set_key = LL("context_length"), .set_u32 = 0}, LL("context_length")},
        {"llama", {.set_key = LL("feed_forward_length"), .set_u32 = 0}, LL("feed_forward_length")},
        {"deepseek2", {.set_key = DS("attention.kv_lora_rank"), .set_u32 = 0}, DS("attention.kv_lora_rank")},
        {"deepseek2", {.set_key = DS("rope.dimension_count"), .set_u32 = 32}, DS("rope.dimension_count")}, /* no nope */
        {"deepseek2", {.set_key = DS("expert_feed_forward_length"), .set_u32 = 0}, DS("expert_feed_forward_length")},
        /* expert counts */
        {"qwen2moe", {.set_key = "qwen2moe.expert_count", .set_u32 = 0}, "qwen2moe.expert_count"},
        {"deepseek2", {.set_key = DS("expert_used_count"), .set_u32 = 0}, DS("expert_used_count")},
        {"deepseek2", {.set_key = DS("expert_used_count"), .set_u32 = 9}, DS("expert_used_count")},
        {"deepseek2", {.set_key = DS("expert_group_count"), .set_u32 = 0}, DS("expert_group_count")},
        {"deepseek2", {.set_key = DS("expert_group_count"), .set_u32 = 8, .set2_key = DS("expert_group_used_count"),
                       .set2_u32 = 1}, DS("expert_group_used_count")}, /* 1 group of 1 cannot hold top-2 */
        {"deepseek2", {.set_key = DS("expert_group_count"), .set_u32 = 4, .set2_key = DS("expert_group_used_count"),
                       .set2_u32 = 0}, DS("expert_group_used_count")},
        {"deepseek2", {.set_key = DS("expert_group_count"), .set_u32 = 4, .set2_key = DS("expert_group_used_count"),
                       .set2_u32 = 1}, NULL}, /* 1 group of 2 holds top-2: fine */
        {"deepseek2", {.set_key = DS("expert_gating_func"), .set_u32 = 0}, DS("expert_gating_func")},
        /* finite doubles that are Inf as floats */
        {"deepseek2", {.setd_key = DS("rope.scaling.yarn_log_multiplier"), .setd = 1e300},
         DS("rope.scaling.yarn_log_multiplier")},
        {"deepseek2", {.setd_key = DS("expert_weights_scale"), .setd = -1e40}, DS("expert_weights_scale")},
        {"deepseek2", {.setd_key = DS("expert_weights_scale"), .setd = 2.5}, NULL}, /* V3's value, as f64 */
    };
#undef DS
#undef LL
    /* the non-finite values every float key must refuse */
    static const char *const fkeys[][2] = {
        {"llama", "llama.rope.freq_base"},
        {"llama", "llama.attention.layer_norm_rms_epsilon"},
        {"deepseek2", "deepseek2.rope.scaling.factor"},
        {"deepseek2", "deepseek2.rope.scaling.yarn_log_multiplier"},
        {"deepseek2", "deepseek2.rope.scaling.yarn_beta_fast"},
        {"deepseek2", "deepseek2.rope.scaling.yarn_beta_slow"},
        {"deepseek2", "deepseek2.expert_weights_scale"},
    };
    char src[128], dst[128], err[MOE_ERR_MAX];
    size_t n_cases = sizeof cases / sizeof *cases, n_f = sizeof fkeys / sizeof *fkeys;
    for (size_t i = 0; i < n_cases + 3 * n_f; i++) {
        const char *arch, *key;
        edit e;
        if (i < n_cases) {
            arch = cases[i].arch, e = cases[i].e, key = cases[i].key;
        } else {
            size_t j = (i - n_cases) / 3;
            const float vals[3] = {NaN, Inf, -Inf};
            arch = fkeys[j][0], key = fkeys[j][1];
            e = (edit){.setf_key = key, .setf = vals[(i - n_cases) % 3]};
        }
        moe_mkmodel_cfg cfg;
        ck_assert_int_eq(moe_mkmodel_preset(arch, "tiny", &cfg, err, sizeof err), MOE_OK);
        cfg.type = MOE_TYPE_F32;
        snprintf(src, sizeof src, "%s/src-%s.gguf", tmpdir, arch);
        snprintf(dst, sizeof dst, "%s/bad.gguf", tmpdir);
        struct stat sb;
        if (stat(src, &sb) != 0) ck_assert_int_eq(moe_mkmodel_write(&cfg, src, err, sizeof err), MOE_OK);
        copy_edit(src, dst, &e);
        int st = 12345;
        err[0] = 0;
        moe_model *m = moe_model_load(dst, &st, err, sizeof err);
        if (!key) {
            ck_assert_msg(m != NULL, "case %zu: %s", i, err);
            moe_model_free(m);
            continue;
        }
        ck_assert_msg(m == NULL, "case %zu (%s) loaded", i, key);
        ck_assert_msg(st == MOE_EFORMAT, "case %zu (%s): status %s (%s)", i, key, moe_status_name(st), err);
        ck_assert_msg(strstr(err, key) != NULL, "case %zu: message '%s' lacks '%s'", i, err, key);
    }
}
END_TEST

/* The newer DeepSeek layout: attn_k_b {nope, kv_lora, H} + attn_v_b
 * {kv_lora, dv, H} instead of attn_kv_b, with key_length_mla. */
START_TEST(deepseek_split_kv_b) {
    char src[128], dst[128], dst2[128], err[MOE_ERR_MAX];
    moe_mkmodel_cfg cfg;
    ck_assert_int_eq(moe_mkmodel_preset("deepseek2", "tiny", &cfg, err, sizeof err), MOE_OK);
    cfg.type = MOE_TYPE_F16;
    tmp_path(src, sizeof src, "ds.gguf");
    tmp_path(dst, sizeof dst, "ds-split1.gguf");
    tmp_path(dst2, sizeof dst2, "ds-split.gguf");
    ck_assert_int_eq(moe_mkmodel_write(&cfg, src, err, sizeof err), MOE_OK);
    const moe_hparams *w = &cfg.hp;
    int64_t H = w->n_head, r = w->kv_lora_rank, nope = w->n_embd_head_qk_nope, dv = w->n_embd_head_v;
    /* step 1: drop kv_b everywhere and declare key_length_mla; step 2 adds k_b/v_b */
    edit e1 = {.drop_tensor = "attn_kv_b.weight", .every_layer = true, .set_key = "deepseek2.attention.key_length_mla",
               .set_u32 = (uint32_t)(nope + w->n_rot)};
    copy_edit(src, dst, &e1);
    edit e2 = {.set_key = "deepseek2.attention.value_length_mla", .set_u32 = (uint32_t)dv};
    copy_edit(dst, dst2, &e2);
    /* add the k_b / v_b of every layer by hand */
    int st;
    moe_gguf *g = moe_gguf_open(dst2, &st, err, sizeof err);
    ck_assert_ptr_nonnull(g);
    moe_gguf_writer *wr = moe_gguf_writer_new();
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++)
        ck_assert_int_eq(moe_gguf_writer_set_value(wr, moe_gguf_kv_at(g, i)->key, &moe_gguf_kv_at(g, i)->value), 0);
    /* later files write key_length = kv_lora + rope and head_count_kv 1 */
    moe_gguf_writer_set_u32(wr, "deepseek2.attention.key_length", (uint32_t)(r + w->n_rot));
    moe_gguf_writer_set_u32(wr, "deepseek2.attention.value_length", (uint32_t)r);
    moe_gguf_writer_set_u32(wr, "deepseek2.attention.head_count_kv", 1);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        ck_assert_int_eq(moe_gguf_writer_add_tensor(wr, t->name, t->type, t->n_dims, t->ne), 0);
    }
    for (int64_t il = 0; il < w->n_layer; il++) {
        char n[64];
        int64_t kb[3] = {nope, r, H}, vb[3] = {r, dv, H};
        snprintf(n, sizeof n, "blk.%lld.attn_k_b.weight", (long long)il);
        ck_assert_int_eq(moe_gguf_writer_add_tensor(wr, n, MOE_TYPE_F16, 3, kb), 0);
        snprintf(n, sizeof n, "blk.%lld.attn_v_b.weight", (long long)il);
        ck_assert_int_eq(moe_gguf_writer_add_tensor(wr, n, MOE_TYPE_F16, 3, vb), 0);
    }
    tmp_path(dst, sizeof dst, "ds-split-final.gguf");
    ck_assert_int_eq(moe_gguf_writer_begin(wr, dst), 0);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++)
        ck_assert_int_eq(moe_gguf_writer_write_tensor(wr, moe_gguf_tensor_at(g, i)->data, moe_gguf_tensor_at(g, i)->nbytes), 0);
    void *z = calloc(1, (size_t)(H * r * (nope + dv) * 2));
    for (int64_t il = 0; il < w->n_layer; il++) {
        ck_assert_int_eq(moe_gguf_writer_write_tensor(wr, z, (size_t)(nope * r * H * 2)), 0);
        ck_assert_int_eq(moe_gguf_writer_write_tensor(wr, z, (size_t)(r * dv * H * 2)), 0);
    }
    free(z);
    ck_assert_int_eq(moe_gguf_writer_finish(wr), 0);
    moe_gguf_writer_free(wr);
    moe_gguf_close(g);
    moe_model *m = moe_model_load(dst, &st, err, sizeof err);
    ck_assert_msg(m != NULL, "%s", err);
    const moe_hparams *h = moe_model_hparams(m);
    ck_assert(h->mla_split_kv_b);
    ck_assert_int_eq(h->n_embd_head_k, nope + w->n_rot);
    ck_assert_int_eq(h->n_embd_head_v, dv);
    const moe_layer_weights *L = &moe_model_weights_get(m)->layers[1];
    ck_assert_ptr_null(L->kv_b.data);
    ck_assert_int_eq(L->k_b.ne[0], nope);
    ck_assert_int_eq(L->k_b.ne[2], H);
    ck_assert_int_eq(L->v_b.ne[1], dv);
    int64_t total, active;
    expected_params(&cfg, &total, &active); /* k_b + v_b hold as many parameters as kv_b */
    ck_assert_int_eq(moe_model_n_params(m), total);
    moe_model_free(m);
}
END_TEST

START_TEST(vocab_and_template) {
    static const struct {
        const char *arch, *pre, *bos, *eos;
        moe_chat_family fam;
    } F[] = {
        {"deepseek2", "deepseek-llm", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", MOE_CHAT_DEEPSEEK2},
        {"qwen2moe", "qwen2", "<|endoftext|>", "<|im_end|>", MOE_CHAT_CHATML},
        {"llama", "llama-bpe", "<|begin_of_text|>", "<|eot_id|>", MOE_CHAT_LLAMA3},
    };
    const char *text = "Hello! The server returns the answer of the model.\n"
                       "def main(args):\n    return 0  # naïve café 東京 🙂 \x01 tabs\there";
    for (size_t i = 0; i < sizeof F / sizeof *F; i++) {
        moe_mkmodel_cfg cfg;
        char file[64];
        snprintf(file, sizeof file, "tok-%s.gguf", F[i].arch);
        moe_model *m = make_and_load(F[i].arch, MOE_TYPE_Q8_0, file, &cfg);
        const moe_gguf *g = moe_model_gguf(m);
        int st;
        char err[MOE_ERR_MAX];
        moe_tok *t = moe_tok_load(g, &st, err, sizeof err);
        ck_assert_msg(t != NULL, "%s", err);
        ck_assert_int_eq(moe_tok_n_vocab(t), cfg.hp.n_vocab);
        ck_assert_str_eq(moe_tok_pre_name(t), F[i].pre);
        size_t len;
        const char *s = moe_tok_text(t, moe_tok_bos(t), &len);
        ck_assert(len == strlen(F[i].bos) && !memcmp(s, F[i].bos, len));
        s = moe_tok_text(t, moe_tok_eos(t), &len);
        ck_assert(len == strlen(F[i].eos) && !memcmp(s, F[i].eos, len));
        ck_assert_int_eq(moe_tok_type(t, moe_tok_bos(t)), MOE_TOKTYPE_CONTROL);
        ck_assert(moe_tok_is_eog(t, moe_tok_eos(t)));
        /* 256 bytes, the merges, the specials: a full vocabulary here */
        const moe_gguf_array *mg = moe_gguf_get_arr(g, "tokenizer.ggml.merges");
        ck_assert_int_eq(256 + (int64_t)mg->n + (moe_tok_eos(t) - moe_tok_bos(t) + 1), cfg.hp.n_vocab);
        /* common words are single tokens */
        ck_assert_int_ge(moe_tok_find(t, "Ġthe", strlen("Ġthe")), 256);
        ck_assert_int_ge(moe_tok_find(t, "Ġserver", strlen("Ġserver")), 256);
        int32_t *ids;
        size_t n;
        ck_assert_int_eq(moe_tok_encode(t, text, strlen(text), false, false, &ids, &n), MOE_OK);
        ck_assert_uint_lt(n, strlen(text) * 2 / 3); /* merges do compress */
        char *back;
        size_t blen;
        ck_assert_int_eq(moe_tok_decode(t, ids, n, false, &back, &blen), MOE_OK);
        ck_assert_uint_eq(blen, strlen(text));
        ck_assert_str_eq(back, text);
        free(back);
        free(ids);
        moe_gguf_str tmpl;
        ck_assert_int_eq(moe_gguf_get_str(g, "tokenizer.chat_template", &tmpl), MOE_OK);
        ck_assert_int_eq(moe_chat_detect(tmpl.ptr, tmpl.len), F[i].fam);
        moe_tok_free(t);
        moe_model_free(m);
    }
    /* v2-lite's vocabulary is padded to exactly 102400 (built, not written) */
}
END_TEST

START_TEST(deterministic_seed) {
    char err[MOE_ERR_MAX], a[128], b[128], c[128];
    moe_mkmodel_cfg cfg;
    ck_assert_int_eq(moe_mkmodel_preset("qwen3moe", "tiny", &cfg, err, sizeof err), MOE_OK);
    cfg.hp.n_embd = 256, cfg.hp.n_vocab = 2000, cfg.n_threads = 1; /* big enough to be split over threads */
    tmp_path(a, sizeof a, "a.gguf");
    tmp_path(b, sizeof b, "b.gguf");
    tmp_path(c, sizeof c, "c.gguf");
    ck_assert_int_eq(moe_mkmodel_write(&cfg, a, err, sizeof err), MOE_OK);
    ck_assert_int_eq(moe_mkmodel_write(&cfg, b, err, sizeof err), MOE_OK);
    cfg.n_threads = 3; /* rows are seeded by index: the thread count changes nothing */
    ck_assert_int_eq(moe_mkmodel_write(&cfg, b, err, sizeof err), MOE_OK);
    cfg.seed = 2;
    ck_assert_int_eq(moe_mkmodel_write(&cfg, c, err, sizeof err), MOE_OK);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "cmp -s %s %s", a, b);
    ck_assert_int_eq(system(cmd), 0);
    snprintf(cmd, sizeof cmd, "cmp -s %s %s", a, c);
    ck_assert_int_ne(system(cmd), 0);
    /* weights are uniform, centred, variance 1 / fan_in: |w| <= sqrt(3 / fan_in) */
    int st;
    moe_model *m = moe_model_load(a, &st, err, sizeof err);
    ck_assert_ptr_nonnull(m);
    const moe_tensor_view *q = &moe_model_weights_get(m)->layers[0].wq;
    ck_assert_int_eq(q->type, MOE_TYPE_Q8_0);
    int64_t n = q->ne[0] * q->ne[1];
    float *x = malloc((size_t)n * sizeof *x);
    ck_assert_int_eq(moe_dequantize_row(q->type, q->data, x, n), MOE_OK);
    double amp = sqrt(3.0 / (double)q->ne[0]), sum = 0, sq = 0, mx = 0;
    for (int64_t i = 0; i < n; i++) sum += x[i], sq += (double)x[i] * x[i], mx = fmax(mx, fabs(x[i]));
    free(x);
    double mean = sum / (double)n, var = sq / (double)n - mean * mean;
    ck_assert_double_le(mx, amp * 1.01);
    ck_assert_double_lt(fabs(mean), 0.05 * amp);
    ck_assert_double_eq_tol(var * (double)q->ne[0], 1.0, 0.1);
    moe_model_free(m);
}
END_TEST

START_TEST(info_command) {
    char path[128], cmd[512], line[512];
    moe_mkmodel_cfg cfg;
    moe_model *m = make_and_load("deepseek2", MOE_TYPE_Q8_0, "info.gguf", &cfg);
    int64_t total = moe_model_n_params(m);
    moe_model_free(m);
    tmp_path(path, sizeof path, "info.gguf");
    snprintf(cmd, sizeof cmd, "%s/build/moed info %s 2>&1", MOE_SRC_DIR, path);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    char want[64];
    snprintf(want, sizeof want, "(%lld)", (long long)total);
    bool arch = false, params = false, tok = false, tensor = false;
    while (fgets(line, sizeof line, p)) {
        if (strstr(line, "architecture:") && strstr(line, "deepseek2")) arch = true;
        if (strstr(line, "parameters:") && strstr(line, want)) params = true;
        if (strstr(line, "pre \"deepseek-llm\"") && strstr(line, "vocab 512")) tok = true;
        if (strstr(line, "blk.2.ffn_down_exps.weight") && strstr(line, "[32, 64, 8]")) tensor = true;
    }
    int rc = pclose(p);
    ck_assert_int_eq(WEXITSTATUS(rc), 0);
    ck_assert_msg(arch && params && tok && tensor, "arch %d params %d tok %d tensor %d", arch, params, tok, tensor);
    /* a bad file: the loader's reason, exit status 1 */
    tmp_path(path, sizeof path, "garbage.gguf");
    FILE *f = fopen(path, "wb");
    fputs("not a gguf file at all", f);
    fclose(f);
    snprintf(cmd, sizeof cmd, "%s/build/moed info %s 2>&1", MOE_SRC_DIR, path);
    p = popen(cmd, "r");
    bool said = false;
    while (fgets(line, sizeof line, p))
        if (strstr(line, "moed info:") && strstr(line, "garbage.gguf")) said = true;
    rc = pclose(p);
    ck_assert_int_eq(WEXITSTATUS(rc), 1);
    ck_assert(said);
}
END_TEST

/* The committed reference fixtures were converted from transformers
 * models: the loader must read back the hyper-parameters of their
 * hf_config (an independent source: config.json names, not GGUF keys). */
static int64_t cfg_int(const cJSON *c, const char *const *names, int64_t def) {
    for (; *names; names++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(c, *names);
        if (cJSON_IsNumber(v)) return (int64_t)v->valuedouble;
    }
    return def;
}

START_TEST(fixtures_match_hf_config) {
    static const char *const NAMES[] = {"llama",     "qwen2",        "mixtral",   "qwen2moe",
                                        "qwen3moe",  "deepseek2",    "deepseek2lite", "deepseek3"};
    for (size_t i = 0; i < sizeof NAMES / sizeof *NAMES; i++) {
        char path[512];
        snprintf(path, sizeof path, MOE_SRC_DIR "/tests/fixtures/models/%s.json", NAMES[i]);
        FILE *f = fopen(path, "rb");
        ck_assert_msg(f != NULL, "%s", path);
        static char buf[1 << 16];
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        cJSON *j = cJSON_Parse(buf);
        ck_assert_ptr_nonnull(j);
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, "hf_config");
        ck_assert_ptr_nonnull(c);
        snprintf(path, sizeof path, MOE_SRC_DIR "/tests/fixtures/models/%s.gguf", NAMES[i]);
        char err[MOE_ERR_MAX];
        int st;
        moe_model *m = moe_model_load(path, &st, err, sizeof err);
        ck_assert_msg(m != NULL, "%s: %s", NAMES[i], err);
        const moe_hparams *h = moe_model_hparams(m);
        bool ds = !strncmp(NAMES[i], "deepseek", 8);
#define N(...) ((const char *const[]){__VA_ARGS__, NULL})
        ck_assert_int_eq(h->n_embd, cfg_int(c, N("hidden_size"), -1));
        ck_assert_int_eq(h->n_layer, cfg_int(c, N("num_hidden_layers"), -1));
        ck_assert_int_eq(h->n_head, cfg_int(c, N("num_attention_heads"), -1));
        ck_assert_int_eq(h->n_vocab, cfg_int(c, N("vocab_size"), -1));
        int64_t n_exp = cfg_int(c, N("num_experts", "num_local_experts", "n_routed_experts"), 0);
        ck_assert_int_eq(h->n_expert, n_exp);
        if (n_exp) ck_assert_int_eq(h->n_expert_used, cfg_int(c, N("num_experts_per_tok"), -1));
        if (!strcmp(NAMES[i], "mixtral")) ck_assert_int_eq(h->n_ff_exp, cfg_int(c, N("intermediate_size"), -1));
        else if (n_exp) ck_assert_int_eq(h->n_ff_exp, cfg_int(c, N("moe_intermediate_size"), -1));
        if (!n_exp || ds) ck_assert_int_eq(h->n_ff, cfg_int(c, N("intermediate_size"), -1));
        if (!strcmp(NAMES[i], "qwen2moe"))
            ck_assert_int_eq(h->n_ff_shexp, cfg_int(c, N("shared_expert_intermediate_size"), -1));
        if (!strcmp(NAMES[i], "qwen3moe")) ck_assert_int_eq(h->n_embd_head_k, cfg_int(c, N("head_dim"), -1));
        if (ds) {
            ck_assert_int_eq(h->kv_lora_rank, cfg_int(c, N("kv_lora_rank"), -1));
            ck_assert_int_eq(h->q_lora_rank, cfg_int(c, N("q_lora_rank"), 0));
            ck_assert_int_eq(h->n_rot, cfg_int(c, N("qk_rope_head_dim"), -1));
            ck_assert_int_eq(h->n_embd_head_qk_nope, cfg_int(c, N("qk_nope_head_dim"), -1));
            ck_assert_int_eq(h->n_embd_head_v, cfg_int(c, N("v_head_dim"), -1));
            ck_assert_int_eq(h->n_layer_dense_lead, cfg_int(c, N("first_k_dense_replace"), -1));
            ck_assert_int_eq(h->n_expert_shared, cfg_int(c, N("n_shared_experts"), -1));
            ck_assert_int_eq(h->n_expert_group, cfg_int(c, N("n_group"), 1));
            ck_assert_int_eq(h->n_group_used, cfg_int(c, N("topk_group"), 1));
            const cJSON *rs = cJSON_GetObjectItemCaseSensitive(c, "routed_scaling_factor");
            ck_assert_double_eq_tol(h->expert_weights_scale, rs->valuedouble, 1e-6);
            ck_assert_int_eq(h->expert_weights_norm, cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "norm_topk_prob")));
            ck_assert_int_eq(h->expert_gating_func, !strcmp(NAMES[i], "deepseek3") ? MOE_HP_GATING_SIGMOID
                                                                                     : MOE_HP_GATING_SOFTMAX);
            ck_assert_int_eq(h->rope_scaling, MOE_ROPE_SCALING_YARN);
        } else {
            ck_assert_int_eq(h->n_head_kv, cfg_int(c, N("num_key_value_heads"), -1));
        }
#undef N
        moe_model_free(m);
        cJSON_Delete(j);
    }
}
END_TEST

int main(void) {
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("mkmodel_roundtrip");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_loop_test(tc, every_arch_every_type, 0, N_ARCHS);
    tcase_add_test(tc, overrides_and_v2lite);
    tcase_add_test(tc, deterministic_seed);
    suite_add_tcase(s, tc);
    TCase *tr = tcase_create("refusals");
    tcase_add_checked_fixture(tr, setup, teardown);
    tcase_add_test(tr, damaged_files_refused);
    tcase_add_test(tr, bad_hparams_refused);
    tcase_add_test(tr, deepseek_split_kv_b);
    suite_add_tcase(s, tr);
    TCase *tf = tcase_create("fixtures");
    tcase_add_test(tf, fixtures_match_hf_config);
    suite_add_tcase(s, tf);
    TCase *tv = tcase_create("vocab");
    tcase_add_checked_fixture(tv, setup, teardown);
    tcase_add_test(tv, vocab_and_template);
    suite_add_tcase(s, tv);
    TCase *ti = tcase_create("info");
    tcase_add_checked_fixture(ti, setup, teardown);
    tcase_add_test(ti, info_command);
    suite_add_tcase(s, ti);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
