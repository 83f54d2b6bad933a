/* cmd_convert.c - `moed convert`: a Hugging Face checkpoint directory to
 * GGUF (engine/convert.h). */
#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "convert.h"
#include "qblocks.h"

static void usage(FILE *f) {
    fprintf(f, "usage: moed convert HF_DIR OUT.gguf [--type F32|F16|BF16|Q8_0] [--quiet]\n"
               "  HF_DIR: config.json, tokenizer.json (+ tokenizer_config.json), model.safetensors or\n"
               "    shards listed by model.safetensors.index.json, of a Llama, Mistral, Mixtral, Qwen2,\n"
               "    Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 or DeepSeek-V3 model (FP8 block-scaled weights too)\n"
               "  --type: the type of the matrices (default F16); norms, biases and routers stay F32\n"
               "  --quiet: no progress line (it is shown only on a terminal anyway)\n");
}

int srv_cmd_convert(int argc, char **argv) {
    const char *pos[2] = {NULL, NULL}, *type = "F16";
    int n_pos = 0;
    bool quiet = false;
    enum { OPT_TYPE = 256, OPT_QUIET };
    static const struct option opts[] = {{"type", required_argument, 0, OPT_TYPE},
                                         {"quiet", no_argument, 0, OPT_QUIET},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_TYPE: type = optarg; break;
        case OPT_QUIET: quiet = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    for (; optind < argc; optind++) {
        if (n_pos == 2) {
            fprintf(stderr, "moed convert: unexpected argument '%s'\n", argv[optind]);
            usage(stderr);
            return 2;
        }
        pos[n_pos++] = argv[optind];
    }
    if (n_pos != 2) {
        fprintf(stderr, "moed convert: HF_DIR and OUT.gguf are required\n");
        usage(stderr);
        return 2;
    }
    moe_type t;
    if (moe_type_from_name(type, &t) != MOE_OK ||
        (t != MOE_TYPE_F32 && t != MOE_TYPE_F16 && t != MOE_TYPE_BF16 && t != MOE_TYPE_Q8_0)) {
        fprintf(stderr, "moed convert: --type '%s' is not one of F32, F16, BF16, Q8_0\n", type);
        return 2;
    }
    moe_convert_opts o = {.type = t, .progress = !quiet && isatty(STDERR_FILENO)};
    char err[1024] = "";
    int rc = moe_convert(pos[0], pos[1], &o, err, sizeof err);
    if (rc != MOE_OK) {
        fprintf(stderr, "moed convert: %s\n", err[0] ? err : moe_strerror(rc));
        return rc == MOE_EINVAL ? 2 : 1;
    }
    printf("wrote %s (%s)\n", pos[1], moe_type_name(t));
    return 0;
}
