/* cmd_info.c - `moed info MODEL.gguf`: what a model file holds, as the
 * loader sees it (engine/model.h); `moed info --check MODEL.gguf`: every
 * tensor decoded and searched for NaN/Inf. */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "finite.h"
#include "gguf.h"
#include "model.h"
#include "qblocks.h"

/* Prints up to max bytes of s, control bytes as \xNN so that a hostile
 * file cannot write terminal escapes. */
static void put_str(const char *s, uint64_t len, uint64_t max) {
    putchar('"');
    for (uint64_t i = 0; i < len && i < max; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\n') fputs("\\n", stdout);
        else if (c < 0x20 || c == 0x7f) printf("\\x%02x", c);
        else putchar(c);
    }
    putchar('"');
    if (len > max) printf("... (%" PRIu64 " bytes)", len);
}

static void put_scalar(const moe_gguf_value *v) {
    switch (v->type) {
    case MOE_GGUF_UINT8:
    case MOE_GGUF_UINT16:
    case MOE_GGUF_UINT32:
    case MOE_GGUF_UINT64: printf("%" PRIu64, v->v.u64); break;
    case MOE_GGUF_INT8:
    case MOE_GGUF_INT16:
    case MOE_GGUF_INT32:
    case MOE_GGUF_INT64: printf("%" PRId64, v->v.i64); break;
    case MOE_GGUF_FLOAT32:
    case MOE_GGUF_FLOAT64: printf("%g", v->v.f64); break;
    case MOE_GGUF_BOOL: fputs(v->v.b ? "true" : "false", stdout); break;
    case MOE_GGUF_STRING: put_str(v->v.str.ptr, v->v.str.len, 72); break;
    case MOE_GGUF_ARRAY: {
        const moe_gguf_array *a = &v->v.arr;
        printf("[%s x %" PRIu64 "]", moe_gguf_vtype_name(a->etype), a->n);
        break;
    }
    default: fputs("?", stdout); break;
    }
}

static const char *human(double bytes, char *buf, size_t n) {
    const char *u[] = {"B", "KB", "MB", "GB", "TB"};
    int i = 0;
    while (bytes >= 1000 && i < 4) bytes /= 1000, i++;
    snprintf(buf, n, i ? "%.2f %s" : "%.0f %s", bytes, u[i]);
    return buf;
}

static const char *count_str(int64_t n, char *buf, size_t sz) {
    if (n >= 1000000000) snprintf(buf, sz, "%.2f B", (double)n / 1e9);
    else if (n >= 1000000) snprintf(buf, sz, "%.2f M", (double)n / 1e6);
    else if (n >= 1000) snprintf(buf, sz, "%.2f K", (double)n / 1e3);
    else snprintf(buf, sz, "%" PRId64, n);
    return buf;
}

/* The token string of `id` from tokenizer.ggml.tokens, printed quoted. */
static void put_token(const moe_gguf *g, const char *key) {
    int64_t id;
    if (moe_gguf_get_i64(g, key, &id) != MOE_OK) {
        fputs("none", stdout);
        return;
    }
    printf("%" PRId64, id);
    const moe_gguf_array *toks = moe_gguf_get_arr(g, "tokenizer.ggml.tokens");
    if (toks && toks->etype == MOE_GGUF_STRING && id >= 0 && (uint64_t)id < toks->n) {
        putchar(' ');
        put_str(toks->items[id].v.str.ptr, toks->items[id].v.str.len, 64);
    } else {
        fputs(" (out of vocabulary)", stdout);
    }
}

static bool shown_elsewhere(const char *key, const char *arch) {
    size_t al = strlen(arch);
    if (!strncmp(key, arch, al) && key[al] == '.') return true; /* hyper-parameters */
    static const char *const tk[] = {"tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                                     "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                                     "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                     "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
                                     "general.architecture", "general.alignment"};
    for (size_t i = 0; i < sizeof tk / sizeof *tk; i++)
        if (!strcmp(key, tk[i])) return true;
    return false;
}

/* --check: decodes every tensor of the file (not only those the loader
 * binds, and without the loader's checks, so a file it refuses can still
 * be examined) and names each one holding NaN/Inf with its first such
 * element. Returns the exit status: 0 all finite, 1 NaN/Inf found or the
 * file cannot be read. */
static int check_tensors(const char *path) {
    char err[MOE_ERR_MAX] = "";
    int st = MOE_OK;
    moe_gguf *g = moe_gguf_open(path, &st, err, sizeof err);
    if (!g) {
        fprintf(stderr, "moed info: %s: %s\n", path, err[0] ? err : moe_strerror(st));
        return 1;
    }
    double t0 = srv_cli_now_s();
    uint64_t n_t = moe_gguf_n_tensors(g), n_bad = 0, n_skip = 0;
    int64_t n_el = 0;
    const char *first_skip = NULL;
    for (uint64_t i = 0; i < n_t; i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        int64_t n = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3], bad = -1;
        float v = 0;
        st = moe_nonfinite_scan_tensor(t->type, t->data, n, &bad, &v);
        if (st == MOE_EUNSUPPORTED) {
            if (!n_skip++) first_skip = t->name;
            continue;
        }
        if (st) {
            fprintf(stderr, "moed info: %s: tensor '%s': %s\n", path, t->name, moe_strerror(st));
            moe_gguf_close(g);
            return 1;
        }
        n_el += n;
        if (bad < 0) continue;
        if (!n_bad++) printf("check: %s: NaN/Inf found\n", path);
        /* row and column too: for token_embd the row is the token id */
        printf("  tensor '%s' (%s): element %" PRId64 " (row %" PRId64 ", column %" PRId64 ") is %s\n", t->name,
               moe_type_name(t->type), bad, bad / t->ne[0], bad % t->ne[0], moe_nonfinite_kind(v));
    }
    double dt = srv_cli_now_s() - t0;
    if (n_skip)
        printf("  %" PRIu64 " tensor(s) of types moed cannot decode were not checked, first '%s'\n", n_skip,
               first_skip);
    if (n_bad)
        printf("check: %" PRIu64 " of %" PRIu64 " tensors hold NaN/Inf\n", n_bad, n_t);
    else
        printf("check: %s: %" PRIu64 " tensors, %" PRId64 " elements decoded, all finite (%.2f s)\n", path,
               n_t - n_skip, n_el, dt);
    moe_gguf_close(g);
    return n_bad ? 1 : 0;
}

static void usage(FILE *f) {
    fprintf(f, "usage: moed info [--no-tensors] [-m] MODEL.gguf\n"
               "       moed info --check [-m] MODEL.gguf\n"
               "  Prints the file header, architecture, hyper-parameters, parameter counts,\n"
               "  tensors, bytes by type, tokenizer summary and the other metadata keys.\n"
               "  -m, --model FILE  the model (or give it as the one positional argument)\n"
               "      --no-tensors  leave out the tensor list\n"
               "      --check       decode every tensor instead and name each one holding NaN or Inf\n"
               "                    (its first such element); exit status 1 when any does, 0 when\n"
               "                    all are finite\n"
               "  -h, --help        this help\n");
}

enum { OPT_NO_TENSORS = 256, OPT_CHECK };

int srv_cmd_info(int argc, char **argv) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"no-tensors", no_argument, 0, OPT_NO_TENSORS},
                                         {"check", no_argument, 0, OPT_CHECK},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *path = NULL;
    bool tensors = true, check = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': path = optarg; break;
        case OPT_NO_TENSORS: tensors = false; break;
        case OPT_CHECK: check = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    /* `moed info M` and `moed info -m M` alike, as `moed serve` takes both */
    if (optind < argc && !path) path = argv[optind++];
    if (!path || optind != argc) {
        usage(stderr);
        return 2;
    }
    if (check) return check_tensors(path);
    char err[MOE_ERR_MAX] = "";
    int st = MOE_OK;
    moe_model *m = moe_model_load(path, &st, err, sizeof err);
    if (!m) {
        fprintf(stderr, "moed info: %s: %s\n", path, err[0] ? err : moe_strerror(st));
        return 1;
    }
    const moe_gguf *g = moe_model_gguf(m);
    const moe_hparams *hp = moe_model_hparams(m);
    char b1[32], b2[32];

    printf("file:           %s\n", path);
    printf("  gguf version %" PRIu32 ", %s (%" PRIu64 " bytes), alignment %" PRIu64 ", data at %" PRIu64
           ", %" PRIu64 " tensors, %" PRIu64 " metadata keys\n",
           moe_gguf_version(g), human((double)moe_gguf_file_size(g), b1, sizeof b1), moe_gguf_file_size(g),
           moe_gguf_alignment(g), moe_gguf_data_offset(g), moe_gguf_n_tensors(g), moe_gguf_n_kv(g));
    moe_gguf_str name;
    printf("architecture:   %s", moe_model_arch_str(m));
    if (hp->arch == MOE_ARCH_LLAMA && hp->is_moe) fputs(" (Mixtral-style experts)", stdout);
    if (moe_gguf_get_str(g, "general.name", &name) == MOE_OK) {
        fputs("  name ", stdout);
        put_str(name.ptr, name.len, 64);
    }
    putchar('\n');
    printf("parameters:     %s total (%" PRId64 "), %s active per token (%" PRId64 "), %s of weights\n",
           count_str(moe_model_n_params(m), b1, sizeof b1), moe_model_n_params(m),
           count_str(moe_model_n_params_active(m), b2, sizeof b2), moe_model_n_params_active(m),
           human((double)moe_model_n_bytes(m), (char[32]){0}, 32));

    printf("hyper-parameters:\n");
    printf("  n_vocab %" PRId64 ", n_ctx_train %" PRId64 ", n_embd %" PRId64 ", n_layer %" PRId64 "\n", hp->n_vocab,
           hp->n_ctx_train, hp->n_embd, hp->n_layer);
    printf("  n_head %" PRId64 ", n_head_kv %" PRId64 ", head_k %" PRId64 ", head_v %" PRId64 ", n_rot %" PRId64
           ", n_ff %" PRId64 ", rms_eps %g\n",
           hp->n_head, hp->n_head_kv, hp->n_embd_head_k, hp->n_embd_head_v, hp->n_rot, hp->n_ff, (double)hp->rms_eps);
    static const char *const scal[] = {"none", "linear", "yarn"};
    printf("  rope: base %g, scaling %s", hp->rope_freq_base, scal[hp->rope_scaling]);
    if (hp->rope_scaling != MOE_ROPE_SCALING_NONE)
        printf(" factor %g, original ctx %" PRId64 ", yarn log multiplier %g", hp->rope_scaling_factor,
               hp->rope_orig_ctx, hp->rope_yarn_log_mul);
    putchar('\n');
    if (hp->is_moe) {
        printf("  experts: %" PRId64 " routed, %" PRId64 " used per token, ff %" PRId64, hp->n_expert,
               hp->n_expert_used, hp->n_ff_exp);
        if (hp->n_ff_shexp) printf("; shared expert ff %" PRId64, hp->n_ff_shexp);
        if (hp->n_expert_shared) printf(" (%" PRId64 " shared experts)", hp->n_expert_shared);
        if (hp->n_layer_dense_lead) printf("; %" PRId64 " leading dense layer(s)", hp->n_layer_dense_lead);
        putchar('\n');
        printf("  routing: %s, weights %s, scale %g, groups %" PRId64 " (%" PRId64 " used)\n",
               hp->expert_gating_func == MOE_HP_GATING_SIGMOID ? "sigmoid" : "softmax",
               hp->expert_weights_norm ? "renormalised" : "not renormalised", hp->expert_weights_scale,
               hp->n_expert_group, hp->n_group_used);
    }
    if (hp->arch == MOE_ARCH_DEEPSEEK2)
        printf("  MLA: q_lora_rank %" PRId64 "%s, kv_lora_rank %" PRId64 ", qk_nope %" PRId64 ", qk_rope %" PRId64
               ", v_head %" PRId64 ", kv_b %s\n",
               hp->q_lora_rank, hp->has_q_lora ? "" : " (none)", hp->kv_lora_rank, hp->n_embd_head_qk_nope,
               hp->n_rot, hp->n_embd_head_v, hp->mla_split_kv_b ? "split (attn_k_b + attn_v_b)" : "attn_kv_b");
    printf("  output head: %s\n", hp->tied_output ? "tied to token_embd" : "output.weight");

    uint64_t by_type[MOE_TYPE_COUNT] = {0}, n_by_type[MOE_TYPE_COUNT] = {0};
    if (tensors) printf("tensors:\n  %-36s %-6s %-26s %s\n", "name", "type", "shape", "size");
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        if ((unsigned)t->type < MOE_TYPE_COUNT) by_type[t->type] += t->nbytes, n_by_type[t->type]++;
        if (!tensors) continue;
        char shape[64];
        int k = snprintf(shape, sizeof shape, "[");
        for (uint32_t d = 0; d < t->n_dims && d < 4; d++)
            k += snprintf(shape + k, sizeof shape - (size_t)k, d ? ", %" PRId64 : "%" PRId64, t->ne[d]);
        snprintf(shape + k, sizeof shape - (size_t)k, "]");
        printf("  %-36s %-6s %-26s %s\n", t->name, moe_type_name(t->type), shape,
               human((double)t->nbytes, b1, sizeof b1));
    }
    printf("bytes by type:\n");
    for (int t = 0; t < MOE_TYPE_COUNT; t++)
        if (n_by_type[t])
            printf("  %-6s %5" PRIu64 " tensors  %s\n", moe_type_name(t), n_by_type[t],
                   human((double)by_type[t], b1, sizeof b1));

    printf("tokenizer:\n");
    moe_gguf_str s;
    fputs("  model ", stdout);
    if (moe_gguf_get_str(g, "tokenizer.ggml.model", &s) == MOE_OK) put_str(s.ptr, s.len, 32);
    else fputs("none", stdout);
    fputs(", pre ", stdout);
    if (moe_gguf_get_str(g, "tokenizer.ggml.pre", &s) == MOE_OK) put_str(s.ptr, s.len, 32);
    else fputs("none", stdout);
    const moe_gguf_array *toks = moe_gguf_get_arr(g, "tokenizer.ggml.tokens");
    const moe_gguf_array *merges = moe_gguf_get_arr(g, "tokenizer.ggml.merges");
    printf(", vocab %" PRIu64 ", merges %" PRIu64 "\n", toks ? toks->n : 0, merges ? merges->n : 0);
    fputs("  bos ", stdout);
    put_token(g, "tokenizer.ggml.bos_token_id");
    fputs(", eos ", stdout);
    put_token(g, "tokenizer.ggml.eos_token_id");
    fputs(", pad ", stdout);
    put_token(g, "tokenizer.ggml.padding_token_id");
    putchar('\n');
    if (moe_gguf_get_str(g, "tokenizer.chat_template", &s) == MOE_OK)
        printf("  chat template: present (%" PRIu64 " bytes)\n", s.len);
    else
        printf("  chat template: absent\n");

    printf("other metadata:\n");
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        const moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        if (shown_elsewhere(kv->key, moe_model_arch_str(m))) continue;
        printf("  %s = ", kv->key);
        put_scalar(&kv->value);
        putchar('\n');
    }
    printf("metadata of %s:\n", moe_model_arch_str(m));
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        const moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        size_t al = strlen(moe_model_arch_str(m));
        if (strncmp(kv->key, moe_model_arch_str(m), al) || kv->key[al] != '.') continue;
        printf("  %s = ", kv->key);
        put_scalar(&kv->value);
        putchar('\n');
    }
    moe_model_free(m);
    return 0;
}
