/* cmd_mkmodel.c - `moed mkmodel`: write a random-weight model of a real
 * architecture (engine/mkmodel.h) for tests and the demo. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "cli.h"
#include "mkmodel.h"
#include "model.h"
#include "qblocks.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: moed mkmodel --arch ARCH [--preset tiny|demo|v2-lite] [--type F32|F16|BF16|Q8_0|Q4_0]\n"
            "                    [--seed N] [shape overrides] -o OUT.gguf\n"
            "  ARCH: deepseek2, qwen2moe, qwen3moe, mixtral, llama, qwen2 (default preset: tiny, type Q8_0)\n"
            "  shape overrides: --layers N --embd N --vocab N --ctx N --heads N --heads-kv N --head-dim N\n"
            "    --ff N (dense FFN width) --experts N --experts-used N --ff-exp N --ff-shexp N (qwen2moe)\n"
            "    --shared N --dense-lead N --q-lora N --kv-lora N --qk-nope N --qk-rope N --v-head N (deepseek2)\n"
            "    --rope-base X\n"
            "  --threads N: generator threads (default: all CPUs; the output does not depend on it)\n"
            "  DeepSeek-V3-style routing (deepseek2): --gating softmax|sigmoid (sigmoid adds exp_probs_b)\n"
            "    --groups N --groups-used N --norm-topk 0|1 --routed-scale X\n");
}

static int parse_i64(const char *opt, const char *s, long long *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < 0) {
        fprintf(stderr, "moed mkmodel: %s wants a non-negative integer, got '%s'\n", opt, s);
        return -1;
    }
    *out = v;
    return 0;
}

int srv_cmd_mkmodel(int argc, char **argv) {
    const char *arch = NULL, *preset = "tiny", *out = NULL, *type = "Q8_0";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        if (i + 1 >= argc) break;
        if (!strcmp(a, "--arch")) arch = argv[++i];
        else if (!strcmp(a, "--preset")) preset = argv[++i];
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) out = argv[++i];
        else if (!strcmp(a, "--type")) type = argv[++i];
        else i++; /* overrides: applied after the preset below */
    }
    if (!arch || !out) {
        fprintf(stderr, "moed mkmodel: --arch and -o are required\n");
        usage(stderr);
        return 2;
    }
    char err[MOE_ERR_MAX] = "";
    moe_mkmodel_cfg cfg;
    if (moe_mkmodel_preset(arch, preset, &cfg, err, sizeof err) != MOE_OK) {
        fprintf(stderr, "moed mkmodel: %s\n", err);
        return 2;
    }
    moe_type t;
    if (moe_type_from_name(type, &t) != MOE_OK) {
        fprintf(stderr, "moed mkmodel: unknown --type '%s'\n", type);
        return 2;
    }
    cfg.type = t;
    moe_hparams *hp = &cfg.hp;
    struct {
        const char *opt;
        int64_t *field;
    } ov[] = {
        {"--layers", &hp->n_layer},         {"--embd", &hp->n_embd},
        {"--vocab", &hp->n_vocab},          {"--ctx", &hp->n_ctx_train},
        {"--heads", &hp->n_head},           {"--heads-kv", &hp->n_head_kv},
        {"--ff", &hp->n_ff},                {"--experts", &hp->n_expert},
        {"--experts-used", &hp->n_expert_used}, {"--ff-exp", &hp->n_ff_exp},
        {"--ff-shexp", &hp->n_ff_shexp},    {"--shared", &hp->n_expert_shared},
        {"--dense-lead", &hp->n_layer_dense_lead}, {"--q-lora", &hp->q_lora_rank},
        {"--kv-lora", &hp->kv_lora_rank},   {"--qk-nope", &hp->n_embd_head_qk_nope},
        {"--qk-rope", &hp->n_rot},          {"--v-head", &hp->n_embd_head_v},
        {"--groups", &hp->n_expert_group},  {"--groups-used", &hp->n_group_used},
    };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--arch") || !strcmp(a, "--preset") || !strcmp(a, "-o") || !strcmp(a, "--output") ||
            !strcmp(a, "--type")) {
            i++;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "moed mkmodel: %s needs a value\n", a);
            return 2;
        }
        long long v;
        if (!strcmp(a, "--seed")) {
            if (parse_i64(a, argv[++i], &v)) return 2;
            cfg.seed = (uint64_t)v;
            continue;
        }
        if (!strcmp(a, "--threads")) {
            if (parse_i64(a, argv[++i], &v)) return 2;
            cfg.n_threads = (int)(v > 256 ? 256 : v);
            continue;
        }
        if (!strcmp(a, "--rope-base")) {
            char *end;
            double d = strtod(argv[++i], &end);
            if (*end || !(d > 0)) {
                fprintf(stderr, "moed mkmodel: --rope-base wants a positive number\n");
                return 2;
            }
            hp->rope_freq_base = d;
            continue;
        }
        if (!strcmp(a, "--gating")) {
            const char *g = argv[++i];
            if (!strcmp(g, "softmax")) hp->expert_gating_func = MOE_HP_GATING_SOFTMAX;
            else if (!strcmp(g, "sigmoid")) hp->expert_gating_func = MOE_HP_GATING_SIGMOID;
            else {
                fprintf(stderr, "moed mkmodel: --gating softmax|sigmoid\n");
                return 2;
            }
            continue;
        }
        if (!strcmp(a, "--norm-topk")) {
            if (parse_i64(a, argv[++i], &v) || v > 1) return 2;
            hp->expert_weights_norm = v == 1;
            continue;
        }
        if (!strcmp(a, "--routed-scale")) {
            char *end;
            double d = strtod(argv[++i], &end);
            if (*end || !(d > 0)) {
                fprintf(stderr, "moed mkmodel: --routed-scale wants a positive number\n");
                return 2;
            }
            hp->expert_weights_scale = d;
            continue;
        }
        if (!strcmp(a, "--head-dim")) {
            if (parse_i64(a, argv[++i], &v)) return 2;
            hp->n_embd_head_k = hp->n_embd_head_v = hp->n_rot = v;
            continue;
        }
        size_t k;
        for (k = 0; k < sizeof ov / sizeof *ov; k++)
            if (!strcmp(a, ov[k].opt)) break;
        if (k == sizeof ov / sizeof *ov) {
            fprintf(stderr, "moed mkmodel: unknown option '%s'\n", a);
            usage(stderr);
            return 2;
        }
        if (parse_i64(a, argv[++i], &v)) return 2;
        *ov[k].field = v;
        /* fewer layers than the preset's leading dense ones: keep it valid */
        if (ov[k].field == &hp->n_layer && hp->n_layer_dense_lead > v) hp->n_layer_dense_lead = v;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = moe_mkmodel_write(&cfg, out, err, sizeof err);
    if (rc != MOE_OK) {
        fprintf(stderr, "moed mkmodel: %s\n", err[0] ? err : moe_strerror(rc));
        /* an invalid request fails before the file is created: leave any
         * file of that name alone; otherwise drop the partial output */
        if (rc != MOE_EINVAL) remove(out);
        return rc == MOE_EINVAL ? 2 : 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    struct stat sb;
    double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    fprintf(stderr, "moed mkmodel: wrote %s (%s %s, %.1f MB) in %.2f s\n", out, arch, moe_type_name(cfg.type),
            stat(out, &sb) == 0 ? (double)sb.st_size / 1e6 : 0.0, secs);
    return 0;
}
