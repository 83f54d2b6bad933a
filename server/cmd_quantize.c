/* cmd_quantize.c - `moed quantize IN.gguf OUT.gguf TYPE`: write a copy of a
 * model with its weight matrices stored in another type.
 *
 * Which tensor gets which type follows llama.cpp's llama-quantize for the
 * same file type name (llama_tensor_get_type in its src/llama-quant.cpp),
 * so a moed Q4_K_M file has the layout people expect from that name:
 *   - only matrices (2-D and 3-D expert stacks) whose names end in
 *     "weight" are converted; norms, routers (ffn_gate_inp), 1-D tensors
 *     and non-float tensors are copied unchanged;
 *   - the output head (and token_embd when it is tied to the output) gets
 *     Q6_K unless the base type is Q8_0;
 *   - attn_v (attn_qkv, attn_kv_b) and ffn_down get Q6_K in the first and
 *     last eighth of the layers and every third layer between for the _M
 *     mixes (attn_v counted in llama.cpp's tensor order: by layer number); 8-expert models (Mixtral) get Q8_0 attn_v/attn_k and Q5_K
 *     attn_output;
 *   - a row length that is not a multiple of the chosen block size falls
 *     back (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, else F16).
 * The decision is made for every tensor before anything is written, so the
 * header and tensor infos go out first with their final offsets and each
 * tensor is then converted and streamed in chunks of rows: memory is the
 * mapped input plus one chunk of output, whatever the model's size.
 *
 * The file is written under a temporary name next to OUT and renamed when
 * complete; on any failure it is removed, so OUT is either the whole new
 * file or untouched.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "gguf.h"
#include "qblocks.h"
#include "quant.h"
#include "status.h"

/* llama_ftype numbers as stored in general.file_type. */
enum {
    FT_ALL_F32 = 0,
    FT_F16 = 1,
    FT_Q4_0 = 2,
    FT_Q4_1 = 3,
    FT_Q8_0 = 7,
    FT_Q5_0 = 8,
    FT_Q5_1 = 9,
    FT_Q4_K_S = 14,
    FT_Q4_K_M = 15,
    FT_Q5_K_S = 16,
    FT_Q5_K_M = 17,
    FT_Q6_K = 18,
    FT_BF16 = 32,
};

typedef struct {
    const char *name;
    int ftype;
    moe_type base;
    const char *help;
} qmode;

static const qmode modes[] = {
    {"F32", FT_ALL_F32, MOE_TYPE_F32, "32-bit float"},
    {"F16", FT_F16, MOE_TYPE_F16, "16-bit float"},
    {"BF16", FT_BF16, MOE_TYPE_BF16, "bfloat16"},
    {"Q8_0", FT_Q8_0, MOE_TYPE_Q8_0, "8.5 bits/weight"},
    {"Q6_K", FT_Q6_K, MOE_TYPE_Q6_K, "6.56 bits/weight"},
    {"Q5_K_M", FT_Q5_K_M, MOE_TYPE_Q5_K, "Q5_K, Q6_K for half of attn_v/ffn_down and the output"},
    {"Q5_K", FT_Q5_K_S, MOE_TYPE_Q5_K, "Q5_K, Q6_K output (llama.cpp's Q5_K_S)"},
    {"Q5_K_S", FT_Q5_K_S, MOE_TYPE_Q5_K, "same as Q5_K"},
    {"Q5_1", FT_Q5_1, MOE_TYPE_Q5_1, "6 bits/weight"},
    {"Q5_0", FT_Q5_0, MOE_TYPE_Q5_0, "5.5 bits/weight"},
    {"Q4_K_M", FT_Q4_K_M, MOE_TYPE_Q4_K, "Q4_K, Q6_K for half of attn_v/ffn_down and the output"},
    {"Q4_K", FT_Q4_K_S, MOE_TYPE_Q4_K, "Q4_K, a few Q5_K layers, Q6_K output (llama.cpp's Q4_K_S)"},
    {"Q4_K_S", FT_Q4_K_S, MOE_TYPE_Q4_K, "same as Q4_K"},
    {"Q4_1", FT_Q4_1, MOE_TYPE_Q4_1, "5 bits/weight"},
    {"Q4_0", FT_Q4_0, MOE_TYPE_Q4_0, "4.5 bits/weight, Q6_K output"},
};
#define N_MODES (sizeof(modes) / sizeof(modes[0]))

static void usage(FILE *f) {
    fprintf(f, "usage: moed quantize IN.gguf OUT.gguf TYPE [--threads N] [--pure]\n"
               "  Writes OUT.gguf: IN's metadata and tensors with the weight matrices stored as TYPE,\n"
               "  mixed per tensor the way llama.cpp's llama-quantize mixes the same TYPE.\n"
               "  --threads N  worker threads (default: one per online CPU)\n"
               "  --pure       every convertible matrix gets TYPE itself (no per-tensor mix)\n"
               "TYPE:\n");
    for (size_t i = 0; i < N_MODES; i++) fprintf(f, "  %-7s %s\n", modes[i].name, modes[i].help);
}

static bool is_float_type(int t) { return t == MOE_TYPE_F32 || t == MOE_TYPE_F16 || t == MOE_TYPE_BF16; }

static bool is_quantized(int t) {
    const moe_type_traits *tr = moe_type_get(t);
    return tr && tr->blck > 1;
}

/* Dimensions that count, as ggml_n_dims: trailing 1s do not. */
static int n_dims_of(const moe_gguf_tensor *t) {
    int n = 1;
    for (int i = 1; i < MOE_GGUF_MAX_DIMS; i++)
        if (t->ne[i] > 1) n = i + 1;
    return n;
}

typedef enum { CAT_OTHER, CAT_OUTPUT, CAT_TOKEN_EMBD, CAT_ATTN_V, CAT_ATTN_K, CAT_ATTN_Q, CAT_ATTN_OUT,
               CAT_FFN_UP, CAT_FFN_GATE, CAT_FFN_DOWN } category;

static bool has(const char *s, const char *sub) { return strstr(s, sub) != NULL; }

static category category_of(const char *name) {
    if (!strcmp(name, "output.weight")) return CAT_OUTPUT;
    if (!strcmp(name, "token_embd.weight") || !strcmp(name, "per_layer_token_embd.weight")) return CAT_TOKEN_EMBD;
    /* attn_qkv and attn_kv_b hold V as well and are treated like attn_v. */
    if (has(name, "attn_qkv.weight") || has(name, "attn_kv_b.weight") || has(name, "attn_v.weight"))
        return CAT_ATTN_V;
    if (has(name, "attn_k.weight")) return CAT_ATTN_K;
    if (has(name, "attn_q.weight")) return CAT_ATTN_Q;
    if (has(name, "attn_output.weight")) return CAT_ATTN_OUT;
    if (has(name, "ffn_up")) return CAT_FFN_UP;
    if (has(name, "ffn_gate")) return CAT_FFN_GATE; /* ffn_gate_inp is never converted at all */
    if (has(name, "ffn_down")) return CAT_FFN_DOWN;
    return CAT_OTHER;
}

/* Whether llama.cpp would convert this tensor at all. */
static bool convertible(const moe_gguf_tensor *t) {
    const char *n = t->name;
    size_t len = strlen(n);
    if (n_dims_of(t) < 2) return false;
    if (len < 6 || strcmp(n + len - 6, "weight")) return false;
    if (has(n, "_norm.weight") || has(n, "ffn_gate_inp.weight")) return false;
    if (has(n, "ssm_conv1d") || has(n, "attn_rel_b.weight") || has(n, "position_embd")) return false;
    /* Only the float types and the quantized types moed can decode are read. */
    return is_float_type(t->type) || (is_quantized(t->type) && moe_quant_supported(t->type));
}

typedef struct {
    const moe_gguf *g;
    const qmode *mode;
    bool pure;
    int64_t n_layer;
    int64_t n_expert;
    bool is_70b; /* llama with 80 layers: llama.cpp's LLM_TYPE_70B bump for attn_v */
    bool tied;   /* no output.weight: token_embd is the output head too */
    int n_attn_v, i_ffn_down;
} plan;

/* llama.cpp's use_more_bits(): the first and last eighth and every third layer between. */
static bool more_bits(int64_t i, int64_t n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

/* llama.cpp quantizes tensors in the order of its loader's map: by layer
 * number ("blk.N.", none first), then by name; its attn_v counter follows
 * that order, not the file's (files are often sorted by name, blk.10
 * before blk.2). */
static int llama_order_cmp(const char *a, const char *b) {
    int la = -1, lb = -1;
    sscanf(a, "blk.%d.", &la);
    sscanf(b, "blk.%d.", &lb);
    if (la != lb) return la < lb ? -1 : 1;
    return strcmp(a, b);
}

/* The index of attn_v-like tensor t among all of them in llama.cpp's order. */
static int attn_v_rank(const moe_gguf *g, const moe_gguf_tensor *t) {
    int rank = 0;
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *u = moe_gguf_tensor_at(g, i);
        if (category_of(u->name) == CAT_ATTN_V && llama_order_cmp(u->name, t->name) < 0) rank++;
    }
    return rank;
}

static int64_t layer_of(const char *name, int64_t counter) {
    int il;
    if (sscanf(name, "blk.%d.", &il) == 1 && il >= 0) return il;
    return counter;
}

/* The mixed type for a convertible tensor, before the shape fallback. */
static moe_type mix_type(plan *p, const moe_gguf_tensor *t) {
    int ft = p->mode->ftype;
    moe_type nt = p->mode->base;
    category c = category_of(t->name);
    if (c == CAT_OUTPUT || (p->tied && c == CAT_TOKEN_EMBD)) {
        int64_t blck = moe_type_get(nt)->blck;
        if (t->ne[0] % blck != 0) return MOE_TYPE_Q8_0;
        return nt == MOE_TYPE_Q8_0 ? nt : MOE_TYPE_Q6_K;
    }
    switch (c) {
    case CAT_ATTN_V: {
        int iv = attn_v_rank(p->g, t);
        if ((ft == FT_Q4_K_M || ft == FT_Q5_K_M) && more_bits(iv, p->n_attn_v)) nt = MOE_TYPE_Q6_K;
        else if (ft == FT_Q4_K_S && iv < 4) nt = MOE_TYPE_Q5_K;
        if (p->is_70b && nt == MOE_TYPE_Q4_K) nt = MOE_TYPE_Q5_K;
        if (p->n_expert == 8) nt = MOE_TYPE_Q8_0;
        break;
    }
    case CAT_ATTN_K:
        if (p->n_expert == 8) nt = MOE_TYPE_Q8_0;
        break;
    case CAT_FFN_DOWN: {
        int64_t il = layer_of(t->name, p->i_ffn_down);
        if (ft == FT_Q4_K_M && more_bits(il, p->n_layer)) nt = MOE_TYPE_Q6_K;
        else if (ft == FT_Q5_K_M && more_bits(il, p->n_layer)) nt = MOE_TYPE_Q6_K;
        else if (ft == FT_Q4_K_S && il < p->n_layer / 8) nt = MOE_TYPE_Q5_K;
        p->i_ffn_down++;
        break;
    }
    case CAT_ATTN_OUT:
        if (p->n_expert == 8 && (ft == FT_Q4_K_S || ft == FT_Q4_K_M)) nt = MOE_TYPE_Q5_K;
        break;
    default:
        break;
    }
    return nt;
}

/* llama.cpp's fallback for a row length the block size does not divide. */
static moe_type fallback(moe_type want, int64_t ne0) {
    if (ne0 % moe_type_get(want)->blck == 0) return want;
    moe_type fb = want;
    switch (want) {
    case MOE_TYPE_Q4_K: fb = MOE_TYPE_Q5_0; break;
    case MOE_TYPE_Q5_K: fb = MOE_TYPE_Q5_1; break;
    case MOE_TYPE_Q6_K: fb = MOE_TYPE_Q8_0; break;
    default: break;
    }
    if (ne0 % moe_type_get(fb)->blck != 0) fb = MOE_TYPE_F16;
    return fb;
}

/* The type of tensor t in the output; *fell_back is set when the row
 * length forced a fallback (it is left alone otherwise). */
static moe_type choose(plan *p, const moe_gguf_tensor *t, bool *fell_back) {
    if (!convertible(t)) return t->type;
    moe_type nt = p->mode->base;
    if (is_quantized(nt) && !p->pure) nt = mix_type(p, t);
    if (is_quantized(nt)) {
        moe_type fb = fallback(nt, t->ne[0]);
        if (fb != nt) *fell_back = true;
        nt = fb;
    }
    return nt;
}

/* --- conversion, multi-threaded over rows --- */

typedef struct {
    const uint8_t *src; /* rows in the input type */
    uint8_t *dst;       /* rows in the output type */
    int in_type, out_type;
    int64_t ne0, row0, row1;
    size_t in_row, out_row;
    int rc;
} job;

static void *convert_rows(void *arg) {
    job *j = arg;
    float *tmp = malloc((size_t)j->ne0 * sizeof(float));
    if (!tmp) {
        j->rc = MOE_ENOMEM;
        return NULL;
    }
    for (int64_t r = j->row0; r < j->row1 && !j->rc; r++) {
        j->rc = moe_dequantize_row(j->in_type, j->src + (size_t)r * j->in_row, tmp, j->ne0);
        if (!j->rc) j->rc = moe_quantize_row(j->out_type, tmp, j->dst + (size_t)(r - j->row0) * j->out_row, j->ne0);
    }
    free(tmp);
    return NULL;
}

/* Converts rows [r0, r1) of t into out using up to n_threads threads. */
static int convert_chunk(const moe_gguf_tensor *t, moe_type out_type, int64_t r0, int64_t r1, uint8_t *out,
                         int n_threads) {
    size_t in_row = moe_row_size(t->type, t->ne[0]), out_row = moe_row_size(out_type, t->ne[0]);
    int64_t n = r1 - r0;
    int nt = n_threads;
    if (nt > n) nt = (int)n;
    if (nt < 1) nt = 1;
    job jobs[256];
    pthread_t th[256];
    if (nt > 256) nt = 256;
    for (int i = 0; i < nt; i++) {
        int64_t a = r0 + n * i / nt, b = r0 + n * (i + 1) / nt;
        jobs[i] = (job){.src = t->data, .dst = out + (size_t)(a - r0) * out_row, .in_type = t->type,
                        .out_type = out_type, .ne0 = t->ne[0], .row0 = a, .row1 = b, .in_row = in_row,
                        .out_row = out_row};
    }
    int started = 0;
    for (int i = 1; i < nt; i++, started++)
        if (pthread_create(&th[i], NULL, convert_rows, &jobs[i])) break;
    convert_rows(&jobs[0]);
    for (int i = 1; i <= started; i++) pthread_join(th[i], NULL);
    for (int i = started + 1; i < nt; i++) convert_rows(&jobs[i]); /* threads that did not start */
    for (int i = 0; i < nt; i++)
        if (jobs[i].rc) return jobs[i].rc;
    return MOE_OK;
}

static double mib(uint64_t b) { return (double)b / (1024.0 * 1024.0); }

static int parse_threads(const char *s, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 1 || v > 256) return -1;
    *out = (int)v;
    return 0;
}

/* The temporary file being written, removed if SIGINT/SIGTERM/SIGHUP ends
 * the run (a multi-GB conversion is often interrupted on purpose). */
static const char *volatile g_tmp_path;

static void cleanup_cb(int sig) {
    const char *p = g_tmp_path;
    if (p) unlink(p); /* async-signal-safe */
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Output chunk size: bounds memory for multi-GB tensors. */
#define CHUNK_BYTES ((size_t)64 << 20)

int srv_cmd_quantize(int argc, char **argv) {
    const char *pos[3] = {0};
    int n_pos = 0, n_threads = 0;
    bool pure = false;
    enum { OPT_PURE = 256 };
    static const struct option opts[] = {{"threads", required_argument, 0, 't'},
                                         {"pure", no_argument, 0, OPT_PURE},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "t:h", opts, NULL)) != -1) {
        switch (c) {
        case 't':
            if (parse_threads(optarg, &n_threads)) {
                fprintf(stderr, "moed quantize: --threads wants an integer 1..256, got '%s'\n", optarg);
                return 2;
            }
            break;
        case OPT_PURE: pure = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    for (; optind < argc; optind++) {
        if (n_pos == 3) {
            fprintf(stderr, "moed quantize: unexpected argument '%s'\n", argv[optind]);
            return 2;
        }
        pos[n_pos++] = argv[optind];
    }
    if (n_pos != 3) {
        fprintf(stderr, "moed quantize: want IN.gguf OUT.gguf TYPE\n");
        usage(stderr);
        return 2;
    }
    const char *in = pos[0], *out = pos[1], *tname = pos[2];
    const qmode *mode = NULL;
    for (size_t i = 0; i < N_MODES; i++)
        if (!strcasecmp(tname, modes[i].name)) mode = &modes[i];
    if (!mode) {
        fprintf(stderr, "moed quantize: unknown TYPE '%s' (one of:", tname);
        for (size_t i = 0; i < N_MODES; i++) fprintf(stderr, " %s", modes[i].name);
        fprintf(stderr, ")\n");
        return 2;
    }
    if (n_threads <= 0) {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = nc < 1 ? 1 : nc > 256 ? 256 : (int)nc;
    }
    struct stat st_out;
    if (stat(out, &st_out) == 0 && !S_ISREG(st_out.st_mode)) {
        fprintf(stderr, "moed quantize: OUT '%s' exists and is not a regular file\n", out);
        return 2;
    }

    char err[MOE_ERR_MAX] = "";
    int st = 0;
    moe_gguf *g = moe_gguf_open(in, &st, err, sizeof err);
    if (!g) {
        fprintf(stderr, "moed quantize: %s: %s\n", in, err[0] ? err : moe_strerror(st));
        return 1;
    }
    struct stat st_in;
    if (stat(in, &st_in) == 0 && stat(out, &st_out) == 0 && st_in.st_dev == st_out.st_dev &&
        st_in.st_ino == st_out.st_ino) {
        fprintf(stderr, "moed quantize: OUT is the same file as IN\n");
        moe_gguf_close(g);
        return 2;
    }

    plan p = {.g = g, .mode = mode, .pure = pure, .tied = true};
    moe_gguf_str arch = {0};
    char key[256];
    if (moe_gguf_get_str(g, "general.architecture", &arch) == MOE_OK && arch.len < 100) {
        uint64_t v;
        snprintf(key, sizeof key, "%.*s.block_count", (int)arch.len, arch.ptr);
        if (moe_gguf_get_u64(g, key, &v) == MOE_OK) p.n_layer = (int64_t)v;
        snprintf(key, sizeof key, "%.*s.expert_count", (int)arch.len, arch.ptr);
        if (moe_gguf_get_u64(g, key, &v) == MOE_OK) p.n_expert = (int64_t)v;
        p.is_70b = arch.len == 5 && !memcmp(arch.ptr, "llama", 5) && p.n_layer == 80;
    }
    uint64_t nt = moe_gguf_n_tensors(g);
    const moe_gguf_tensor *requant = NULL;
    for (uint64_t i = 0; i < nt; i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        category c = category_of(t->name);
        if (c == CAT_OUTPUT) p.tied = false;
        if (c == CAT_ATTN_V) p.n_attn_v++;
        if (!requant && convertible(t) && is_quantized(t->type)) requant = t;
    }
    if (p.n_layer <= 0) p.n_layer = p.n_attn_v > 0 ? p.n_attn_v : 1;

    moe_type *types = calloc(nt ? nt : 1, sizeof *types);
    moe_gguf_writer *w = moe_gguf_writer_new();
    char *tmp = malloc(strlen(out) + 32);
    int rc = 1;
    bool created = false;
    uint8_t *buf = NULL;
    if (!types || !w || !tmp) {
        fprintf(stderr, "moed quantize: out of memory\n");
        goto done;
    }
    if (requant)
        fprintf(stderr,
                "moed quantize: warning: %s is already quantized (%s is %s); its weights are decoded to F32 first%s\n",
                in, requant->name, moe_type_name(requant->type),
                mode->base == MOE_TYPE_F32 ? " (exactly: F32 output adds no error)"
                                           : ", so the new file carries the old rounding error plus the new one");

    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        const moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        if (!strcmp(kv->key, "general.file_type") || !strcmp(kv->key, "general.quantization_version")) continue;
        if ((st = moe_gguf_writer_set_value(w, kv->key, &kv->value))) {
            fprintf(stderr, "moed quantize: metadata key '%s': %s\n", kv->key, moe_strerror(st));
            goto done;
        }
    }
    moe_gguf_writer_set_u32(w, "general.file_type", (uint32_t)mode->ftype);
    if (is_quantized(mode->base)) moe_gguf_writer_set_u32(w, "general.quantization_version", 2);

    uint64_t in_bytes = 0, out_bytes = 0;
    int n_fallback = 0, n_conv = 0;
    uint64_t fb_first = 0;
    for (uint64_t i = 0; i < nt; i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        bool fell = false;
        types[i] = choose(&p, t, &fell);
        n_conv += convertible(t);
        if (fell && !n_fallback++) fb_first = i;
        if ((st = moe_gguf_writer_add_tensor(w, t->name, types[i], t->n_dims, t->ne))) {
            fprintf(stderr, "moed quantize: tensor '%s' as %s: %s\n", t->name, moe_type_name(types[i]),
                    moe_strerror(st));
            goto done;
        }
        in_bytes += t->nbytes;
        int64_t rows = 1;
        for (int d = 1; d < MOE_GGUF_MAX_DIMS; d++) rows *= t->ne[d];
        out_bytes += types[i] == t->type ? t->nbytes : moe_row_size(types[i], t->ne[0]) * (uint64_t)rows;
    }
    /* llama.cpp warns per tensor; one line says the same: a model whose
     * width is not a multiple of 256 gets few K-quant blocks at all. */
    if (n_fallback)
        fprintf(stderr,
                "moed quantize: warning: %d of %d matrices have rows whose length the chosen block size does not "
                "divide (first: %s, %lld wide, stored as %s): they take llama.cpp's fallback type\n",
                n_fallback, n_conv, moe_gguf_tensor_at(g, fb_first)->name,
                (long long)moe_gguf_tensor_at(g, fb_first)->ne[0], moe_type_name(types[fb_first]));

    sprintf(tmp, "%s.tmp%ld", out, (long)getpid());
    g_tmp_path = tmp;
    signal(SIGINT, cleanup_cb);
    signal(SIGTERM, cleanup_cb);
    signal(SIGHUP, cleanup_cb);
    if ((st = moe_gguf_writer_begin(w, tmp))) {
        fprintf(stderr, "moed quantize: cannot create '%s': %s\n", tmp, strerror(errno));
        unlink(tmp);
        goto done;
    }
    created = true;
    bool tty = isatty(STDERR_FILENO);
    double t0 = srv_cli_now_s();
    uint64_t done_in = 0;
    for (uint64_t i = 0; i < nt; i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        if (tty)
            fprintf(stderr, "\r\033[K[%4llu/%llu] %3d%% %-40s %-5s -> %-5s", (unsigned long long)i + 1,
                    (unsigned long long)nt, (int)(in_bytes ? 100.0 * (double)done_in / (double)in_bytes : 100),
                    t->name, moe_type_name(t->type), moe_type_name(types[i]));
        done_in += t->nbytes;
        if (types[i] == t->type) {
            if ((st = moe_gguf_writer_write_tensor(w, t->data, t->nbytes))) goto write_failed;
            continue;
        }
        size_t out_row = moe_row_size(types[i], t->ne[0]);
        int64_t rows = 1;
        for (int d = 1; d < MOE_GGUF_MAX_DIMS; d++) rows *= t->ne[d];
        int64_t chunk = (int64_t)(CHUNK_BYTES / out_row);
        if (chunk < 1) chunk = 1;
        if (chunk > rows) chunk = rows;
        uint8_t *nb = realloc(buf, (size_t)chunk * out_row);
        if (!nb) {
            fprintf(stderr, "\nmoed quantize: out of memory for tensor '%s'\n", t->name);
            goto done;
        }
        buf = nb;
        for (int64_t r = 0; r < rows; r += chunk) {
            int64_t r1 = r + chunk < rows ? r + chunk : rows;
            if ((st = convert_chunk(t, types[i], r, r1, buf, n_threads))) {
                fprintf(stderr, "%smoed quantize: tensor '%s' (%s -> %s): %s\n", tty ? "\n" : "", t->name,
                        moe_type_name(t->type), moe_type_name(types[i]), moe_strerror(st));
                goto done;
            }
            if ((st = moe_gguf_writer_write_tensor(w, buf, (size_t)(r1 - r) * out_row))) goto write_failed;
        }
    }
    if ((st = moe_gguf_writer_finish(w))) goto write_failed;
    if (rename(tmp, out)) {
        fprintf(stderr, "moed quantize: cannot rename '%s' to '%s': %s\n", tmp, out, strerror(errno));
        goto done;
    }
    created = false;
    if (tty) fprintf(stderr, "\r\033[K");
    printf("moed quantize: %s: %.2f MiB -> %.2f MiB (%s), %llu tensors, %.1f s\n", out, mib(in_bytes), mib(out_bytes),
           mode->name, (unsigned long long)nt, srv_cli_now_s() - t0);
    rc = 0;
    goto done;
write_failed:
    fprintf(stderr, "%smoed quantize: writing '%s': %s (%s)\n", tty ? "\n" : "", tmp, moe_strerror(st),
            strerror(errno));
done:
    moe_gguf_writer_free(w);
    if (created) unlink(tmp);
    g_tmp_path = NULL;
    free(buf);
    free(tmp);
    free(types);
    moe_gguf_close(g);
    return rc;
}
