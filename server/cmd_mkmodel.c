/* cmd_mkmodel.c - `moed mkmodel`: write a random-weight model of a real
 * architecture (engine/mkmodel.h) for tests and the demo. */
#include <errno.h>
#include <getopt.h>
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

/* Long options at or above this value are the shape overrides, indexes
 * into ov[] below. */
enum { OPT_ARCH = 256, OPT_PRESET, OPT_TYPE, OPT_SEED, OPT_THREADS, OPT_ROPE_BASE, OPT_GATING, OPT_NORM_TOPK,
       OPT_ROUTED_SCALE, OPT_HEAD_DIM, OPT_OV };

static int positive(const char *opt, const char *s, double *out) {
    char *end;
    double d = strtod(s, &end);
    if (end == s || *end || !(d > 0) || d > 1e30) {
        fprintf(stderr, "moed mkmodel: %s wants a positive number, got '%s'\n", opt, s);
        return -1;
    }
    *out = d;
    return 0;
}

int srv_cmd_mkmodel(int argc, char **argv) {
    static const char *const OV[] = {"layers",  "embd",    "vocab",      "ctx",    "heads",   "heads-kv",
                                     "ff",      "experts", "experts-used", "ff-exp", "ff-shexp", "shared",
                                     "dense-lead", "q-lora", "kv-lora",  "qk-nope", "qk-rope", "v-head",
                                     "groups",  "groups-used"};
    enum { N_OV = sizeof OV / sizeof *OV };
    struct option opts[OPT_OV - OPT_ARCH + N_OV + 3] = {
        {"arch", required_argument, 0, OPT_ARCH},           {"preset", required_argument, 0, OPT_PRESET},
        {"type", required_argument, 0, OPT_TYPE},           {"seed", required_argument, 0, OPT_SEED},
        {"threads", required_argument, 0, OPT_THREADS},     {"rope-base", required_argument, 0, OPT_ROPE_BASE},
        {"gating", required_argument, 0, OPT_GATING},       {"norm-topk", required_argument, 0, OPT_NORM_TOPK},
        {"routed-scale", required_argument, 0, OPT_ROUTED_SCALE}, {"head-dim", required_argument, 0, OPT_HEAD_DIM},
    };
    int no = OPT_OV - OPT_ARCH;
    for (int k = 0; k < N_OV; k++) opts[no++] = (struct option){OV[k], required_argument, 0, OPT_OV + k};
    opts[no++] = (struct option){"output", required_argument, 0, 'o'};
    opts[no++] = (struct option){"help", no_argument, 0, 'h'};
    opts[no] = (struct option){0, 0, 0, 0};

    /* Pass 1: what the preset depends on; the rest waits for the preset. */
    const char *arch = NULL, *preset = "tiny", *out = NULL, *type = "Q8_0";
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_ARCH: arch = optarg; break;
        case OPT_PRESET: preset = optarg; break;
        case OPT_TYPE: type = optarg; break;
        case 'o': out = optarg; break;
        case 'h': usage(stdout); return 0;
        case '?': usage(stderr); return 2;
        default: break;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "moed mkmodel: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
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
    int64_t *const ov[N_OV] = {&hp->n_layer,         &hp->n_embd,          &hp->n_vocab,           &hp->n_ctx_train,
                               &hp->n_head,          &hp->n_head_kv,       &hp->n_ff,              &hp->n_expert,
                               &hp->n_expert_used,   &hp->n_ff_exp,        &hp->n_ff_shexp,        &hp->n_expert_shared,
                               &hp->n_layer_dense_lead, &hp->q_lora_rank,  &hp->kv_lora_rank,      &hp->n_embd_head_qk_nope,
                               &hp->n_rot,           &hp->n_embd_head_v,   &hp->n_expert_group,    &hp->n_group_used};
    /* Pass 2: the overrides, in order, on top of the preset. */
    optind = 1;
    int li = -1;
    while ((c = getopt_long(argc, argv, "o:h", opts, &li)) != -1) {
        const char *name = li >= 0 ? opts[li].name : "?";
        char flag[40];
        snprintf(flag, sizeof flag, "--%s", name);
        long long v;
        double d;
        li = -1;
        switch (c) {
        case OPT_SEED:
            if (parse_i64(flag, optarg, &v)) return 2;
            cfg.seed = (uint64_t)v;
            break;
        case OPT_THREADS:
            if (parse_i64(flag, optarg, &v)) return 2;
            cfg.n_threads = (int)(v > 256 ? 256 : v);
            break;
        case OPT_ROPE_BASE:
            if (positive(flag, optarg, &d)) return 2;
            hp->rope_freq_base = d;
            break;
        case OPT_GATING:
            if (!strcmp(optarg, "softmax")) hp->expert_gating_func = MOE_HP_GATING_SOFTMAX;
            else if (!strcmp(optarg, "sigmoid")) hp->expert_gating_func = MOE_HP_GATING_SIGMOID;
            else {
                fprintf(stderr, "moed mkmodel: --gating softmax|sigmoid\n");
                return 2;
            }
            break;
        case OPT_NORM_TOPK:
            if (parse_i64(flag, optarg, &v) || v > 1) return 2;
            hp->expert_weights_norm = v == 1;
            break;
        case OPT_ROUTED_SCALE:
            if (positive(flag, optarg, &d)) return 2;
            hp->expert_weights_scale = d;
            break;
        case OPT_HEAD_DIM:
            if (parse_i64(flag, optarg, &v)) return 2;
            hp->n_embd_head_k = hp->n_embd_head_v = hp->n_rot = v;
            break;
        default:
            if (c < OPT_OV) break; /* pass 1's */
            if (parse_i64(flag, optarg, &v)) return 2;
            *ov[c - OPT_OV] = v;
            /* fewer layers than the preset's leading dense ones: keep it valid */
            if (ov[c - OPT_OV] == &hp->n_layer && hp->n_layer_dense_lead > v) hp->n_layer_dense_lead = v;
        }
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
