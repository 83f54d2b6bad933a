/* check_forward.c - the forward passes against transformers' logits.
 *
 * For every fixture in tests/fixtures/models (see its README): the prompt
 * goes through as one batch, then the recorded decode_input tokens one by
 * one through the paged KV cache (teacher forcing), and every row is
 * compared with transformers' logits by max|got - ref| / max|ref|. The same
 * models re-quantized in-test (F16, BF16, Q8_0, Q4_0) are compared with an
 * F32 run over their own dequantized weights (the kernels) and with
 * transformers (the model), and one mixed batch over several sequences
 * must equal each sequence run alone.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "forward.h"
#include "gguf.h"
#include "kvcache.h"
#include "quant.h"

#define FIXDIR MOE_SRC_DIR "/tests/fixtures/models/"

typedef struct ref {
    char gguf[2][64];
    int n_gguf;
    int n_vocab, n_prompt, n_decode, n_rows, n_layer, n_embd;
    int32_t prompt[64], decode_input[64], decode_argmax[64];
    float *logits; /* (n_rows, n_vocab) */
    float *hidden; /* (n_layer, n_rows, n_embd) */
} ref;

static float *read_f32(const char *name, size_t n) {
    char path[512];
    snprintf(path, sizeof path, FIXDIR "%s", name);
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "open %s", path);
    float *v = malloc(n * sizeof(float));
    ck_assert_uint_eq(fread(v, sizeof(float), n, f), n);
    fclose(f);
    return v;
}

static void read_ints(char *rest, int32_t *out, int max) {
    int i = 0;
    for (char *tok = strtok(rest, " \n"); tok && i < max; tok = strtok(NULL, " \n")) out[i++] = atoi(tok);
}

static void load_ref(const char *name, ref *r) {
    memset(r, 0, sizeof(*r));
    char path[512], line[1024], logits[64] = "", hidden[64] = "";
    snprintf(path, sizeof path, FIXDIR "%s.ref.txt", name);
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "open %s", path);
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#' || line[0] == '\n') continue;
        char *sp = strchr(line, ' ');
        if (!sp) continue;
        *sp = 0;
        char *rest = sp + 1;
        rest[strcspn(rest, "#")] = 0;
        if (!strcmp(line, "gguf")) {
            for (char *tok = strtok(rest, " \n"); tok && r->n_gguf < 2; tok = strtok(NULL, " \n"))
                snprintf(r->gguf[r->n_gguf++], 64, "%s", tok);
        } else if (!strcmp(line, "logits")) sscanf(rest, "%63s", logits);
        else if (!strcmp(line, "hidden")) sscanf(rest, "%63s", hidden);
        else if (!strcmp(line, "n_vocab")) r->n_vocab = atoi(rest);
        else if (!strcmp(line, "n_prompt")) r->n_prompt = atoi(rest);
        else if (!strcmp(line, "n_decode")) r->n_decode = atoi(rest);
        else if (!strcmp(line, "n_rows")) r->n_rows = atoi(rest);
        else if (!strcmp(line, "n_layer")) r->n_layer = atoi(rest);
        else if (!strcmp(line, "n_embd")) r->n_embd = atoi(rest);
        else if (!strcmp(line, "prompt")) read_ints(rest, r->prompt, 64);
        else if (!strcmp(line, "decode_input")) read_ints(rest, r->decode_input, 64);
        else if (!strcmp(line, "decode_argmax")) read_ints(rest, r->decode_argmax, 64);
    }
    fclose(f);
    ck_assert_int_eq(r->n_rows, r->n_prompt + r->n_decode);
    r->logits = read_f32(logits, (size_t)r->n_rows * r->n_vocab);
    r->hidden = read_f32(hidden, (size_t)r->n_layer * r->n_rows * r->n_embd);
}

static void free_ref(ref *r) {
    free(r->logits);
    free(r->hidden);
}

static int argmax(const float *v, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b]) b = i;
    return b;
}

static double rel_err(const float *got, const float *want, size_t n) {
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= md)) md = d; /* NaN propagates as a failure */
        if (fabs(want[i]) > mr) mr = fabs(want[i]);
    }
    return md / mr;
}

typedef struct run_result {
    double err;        /* over all rows */
    int argmax_ok;     /* decode rows whose argmax is decode_argmax */
    double layer_err;  /* first prompt layer's residual error (debug) */
    int worst_layer;
    float *logits;     /* (n_rows, n_vocab), caller frees */
    float *hidden;     /* (n_layer, n_rows, n_embd) residual after each layer, as ref.hidden; caller frees */
    int32_t *routes;   /* (n_layer, n_rows, n_used) chosen experts, -1 for dense layers; caller frees */
    int n_used;
} run_result;

static void free_run(run_result *res) {
    free(res->logits);
    free(res->hidden);
    free(res->routes);
}

/* Prompt as one batch, then teacher-forced decode through the cache. */
static run_result run_fixture(const char *gguf_path, const ref *r, int n_threads, int block_size) {
    run_result res = {0};
    char err[256] = "";
    int st = 0;
    moe_model *mdl = moe_model_load(gguf_path, &st, err, sizeof err);
    const moe_gguf *g = moe_model_gguf(mdl);
    ck_assert_msg(g != NULL, "%s: %s", gguf_path, err);
    moe_backend be;
    ck_assert_int_eq(moe_cpu_backend_init(&be, &(moe_cpu_backend_opts){.n_threads = n_threads}), MOE_OK);
    moe_fwd *fw = moe_fwd_create(mdl, &be, &st, err, sizeof err);
    ck_assert_msg(fw != NULL, "%s: %s (%s)", gguf_path, err, moe_strerror(st));
    ck_assert_int_eq(moe_fwd_n_vocab(fw), r->n_vocab);
    moe_kv_opts ko;
    ck_assert_int_eq(moe_fwd_kv_opts(fw, block_size, 64, &ko), MOE_OK);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    ck_assert_ptr_nonnull(kv);
    moe_kv_seq seq = {0};
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &seq, r->n_rows), MOE_OK);

    float *got = malloc((size_t)r->n_rows * r->n_vocab * sizeof(float));
    int K = (int)moe_fwd_n_expert_used(fw), KK = K ? K : 1;
    size_t n_rt = (size_t)r->n_layer * r->n_rows * KK;
    int32_t *routes = malloc(n_rt * sizeof(int32_t)), *rt = malloc(n_rt * sizeof(int32_t));
    for (size_t i = 0; i < n_rt; i++) routes[i] = rt[i] = -1;
    moe_fwd_set_route_out(fw, rt);
    float *hid = malloc((size_t)r->n_layer * r->n_prompt * r->n_embd * sizeof(float));
    float *hid1 = malloc((size_t)r->n_layer * r->n_embd * sizeof(float)); /* (n_layer, 1, n_embd) of a decode step */
    float *hidden = malloc((size_t)r->n_layer * r->n_rows * r->n_embd * sizeof(float));
    size_t E = (size_t)r->n_embd;
    int32_t pos[64], sq[64] = {0};
    for (int i = 0; i < r->n_prompt; i++) pos[i] = i;
    moe_fwd_set_hidden_out(fw, hid);
    moe_batch b = {.n_tok = r->n_prompt, .ids = r->prompt, .pos = pos, .seq = sq, .n_seq = 1, .seqs = &seq};
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, got), MOE_OK);
    for (int il = 0; il < r->n_layer; il++)
        memcpy(hidden + (size_t)il * r->n_rows * E, hid + (size_t)il * r->n_prompt * E,
               (size_t)r->n_prompt * E * sizeof(float));
    moe_fwd_set_hidden_out(fw, hid1);
    /* routes of step s with n tokens from row0 land in rt as (n_layer, n, K) */
    for (int il = 0; il < r->n_layer; il++)
        memcpy(routes + ((size_t)il * r->n_rows) * KK, rt + (size_t)il * r->n_prompt * KK,
               (size_t)r->n_prompt * KK * sizeof(int32_t));
    res.worst_layer = -1;
    for (int il = 0; il < r->n_layer; il++) {
        double worst = 0;
        for (int t = 0; t < r->n_prompt; t++) {
            double e = rel_err(hid + ((size_t)il * r->n_prompt + t) * r->n_embd,
                               r->hidden + ((size_t)il * r->n_rows + t) * r->n_embd, (size_t)r->n_embd);
            worst = e > worst ? e : worst;
        }
        if (res.worst_layer < 0 && worst > 1e-3) {
            res.worst_layer = il;
            res.layer_err = worst;
        }
    }
    for (int i = 0; i < r->n_decode; i++) {
        int32_t p = r->n_prompt + i, s0 = 0;
        moe_batch d = {.n_tok = 1, .ids = &r->decode_input[i], .pos = &p, .seq = &s0, .n_seq = 1, .seqs = &seq};
        float *row = got + (size_t)(r->n_prompt + i) * r->n_vocab;
        ck_assert_int_eq(moe_fwd_run(fw, kv, &d, row), MOE_OK);
        for (int il = 0; il < r->n_layer; il++)
            memcpy(hidden + ((size_t)il * r->n_rows + r->n_prompt + i) * E, hid1 + (size_t)il * E, E * sizeof(float));
        for (int il = 0; il < r->n_layer; il++)
            memcpy(routes + ((size_t)il * r->n_rows + r->n_prompt + i) * KK, rt + (size_t)il * KK,
                   (size_t)KK * sizeof(int32_t));
        res.argmax_ok += argmax(row, r->n_vocab) == r->decode_argmax[i];
    }
    res.err = rel_err(got, r->logits, (size_t)r->n_rows * r->n_vocab);
    res.logits = got;
    res.hidden = hidden;
    res.routes = routes;
    res.n_used = KK;
    moe_fwd_set_hidden_out(fw, NULL);
    free(rt);
    free(hid);
    free(hid1);
    moe_kv_seq_release(kv, &seq);
    ck_assert_int_eq(moe_kv_n_free(kv), 64);
    moe_kv_destroy(kv);
    moe_fwd_free(fw);
    moe_backend_destroy(&be);
    moe_model_free(mdl);
    return res;
}

static const char *FIXTURES[] = {"llama", "qwen2", "mixtral", "qwen2moe", "qwen3moe",
                                 "deepseek2", "deepseek2lite", "deepseek3"};
#define N_FIX (int)(sizeof FIXTURES / sizeof FIXTURES[0])

START_TEST(f32_matches_transformers) {
    ref r;
    load_ref(FIXTURES[_i], &r);
    for (int gi = 0; gi < r.n_gguf; gi++) {
        char path[512];
        snprintf(path, sizeof path, FIXDIR "%s", r.gguf[gi]);
        /* block size 4 so the 15 positions span several blocks */
        run_result res = run_fixture(path, &r, 2, 4);
        fprintf(stderr, "%-20s F32 max rel err %.2e (first layer > 1e-3: %d)\n", r.gguf[gi], res.err,
                res.worst_layer);
        ck_assert_msg(res.err <= 1e-3, "%s: rel err %.3e; first diverging layer %d (%.3e)", r.gguf[gi], res.err,
                      res.worst_layer, res.layer_err);
        ck_assert_int_eq(res.argmax_ok, r.n_decode);
        free_run(&res);
    }
    free_ref(&r);
}
END_TEST

/* Writes a copy of the F32 GGUF `src` to `dst` with every 2-D/3-D weight
 * whose rows fit the type's blocks re-quantized to `type` (the rest, and
 * all 1-D tensors, stay F32, as llama.cpp's quantizer keeps norms F32). */
typedef struct extra_tensor {
    const char *name;
    const float *data;
    int64_t n;
} extra_tensor;

static void copy_gguf(const char *src, const char *dst, moe_type type, int *n_quant, const char *drop,
                      const char *as_f16, const char *arch, const extra_tensor *extra);

static void requantize(const char *src, const char *dst, moe_type type, int *n_quant) {
    copy_gguf(src, dst, type, n_quant, NULL, NULL, NULL, NULL);
}

/* The copy behind requantize(), which can also drop tensor `drop`, store
 * tensor `as_f16` as F16, rename the architecture (for the refusal tests)
 * and append one F32 vector; NULL leaves each alone. */
static void copy_gguf(const char *src, const char *dst, moe_type type, int *n_quant, const char *drop,
                      const char *as_f16, const char *arch, const extra_tensor *extra) {
    int st;
    char err[256];
    moe_gguf *g = moe_gguf_open(src, &st, err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    moe_gguf_writer *w = moe_gguf_writer_new();
    ck_assert_ptr_nonnull(w);
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        const moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        ck_assert_int_eq(moe_gguf_writer_set_value(w, kv->key, &kv->value), MOE_OK);
    }
    if (arch) ck_assert_int_eq(moe_gguf_writer_set_str(w, "general.architecture", arch), MOE_OK);
    int64_t blck = moe_type_get(type)->blck;
    moe_type *tt = malloc(moe_gguf_n_tensors(g) * sizeof(moe_type));
    *n_quant = 0;
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        /* as llama.cpp's quantizer: the MoE router and vectors ({n, 1}, ggml_n_dims 1) stay F32 */
        bool vec = t->ne[1] * t->ne[2] * t->ne[3] == 1;
        tt[i] = (!vec && t->ne[0] % blck == 0 && !strstr(t->name, "ffn_gate_inp")) ? type : MOE_TYPE_F32;
        if (as_f16 && !strcmp(t->name, as_f16)) tt[i] = MOE_TYPE_F16;
        *n_quant += tt[i] == type;
        if (drop && !strcmp(t->name, drop)) continue;
        ck_assert_int_eq(moe_gguf_writer_add_tensor(w, t->name, tt[i], t->n_dims, t->ne), MOE_OK);
    }
    if (extra) ck_assert_int_eq(moe_gguf_writer_add_tensor(w, extra->name, MOE_TYPE_F32, 1, &extra->n), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_begin(w, dst), MOE_OK);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        if (drop && !strcmp(t->name, drop)) continue;
        int64_t rows = t->ne[1] * t->ne[2] * t->ne[3];
        size_t rsz = moe_row_size(tt[i], t->ne[0]);
        size_t src_rsz = moe_row_size(t->type, t->ne[0]);
        void *buf = malloc(rsz);
        float *row = malloc((size_t)t->ne[0] * sizeof(float));
        for (int64_t r = 0; r < rows; r++) {
            ck_assert_int_eq(moe_dequantize_row(t->type, (const uint8_t *)t->data + r * src_rsz, row, t->ne[0]), MOE_OK);
            ck_assert_int_eq(moe_quantize_row(tt[i], row, buf, t->ne[0]), MOE_OK);
            ck_assert_int_eq(moe_gguf_writer_write_tensor(w, buf, rsz), MOE_OK);
        }
        free(row);
        free(buf);
    }
    if (extra) ck_assert_int_eq(moe_gguf_writer_write_tensor(w, extra->data, (size_t)extra->n * sizeof(float)), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_finish(w), MOE_OK);
    moe_gguf_writer_free(w);
    free(tt);
    moe_gguf_close(g);
}

/* Quantized models, two comparisons per type.
 *
 * The engine: the quantized file Q against an F32 file D holding exactly
 * Q's dequantized weights. Both compute with the same weight values, so
 * the only difference is what the CPU kernels do beyond dequantizing:
 * F16/BF16 rows are widened exactly and multiplied in f32 (summation
 * order only), Q8_0/Q4_0 products round the activations to int8 per block
 * of 32 first. A wrong scale, nibble order or block offset in a kernel
 * shows here at full size, undiluted by weight noise.
 *
 * The model: Q against transformers' logits and residual stream, which
 * adds the weight rounding itself (F16 keeps 11 significant bits, BF16 8,
 * Q8_0 ~0.4 % per weight, Q4_0 16 levels per block). */
static const struct {
    moe_type type;
    double tol_engine; /* Q vs D, rel_l2 of every clean logits row and residual cell */
    double tol_model;  /* Q vs transformers, the same */
    int min_cells;     /* clean residual cells each comparison must reach; -1: all of them */
} QTYPES[] = {
    /* The bounds, with the worst honest value over all fixtures and the
     * smallest value a 5 % error injected into every non-F32 product gives
     * (the kernels' output scaled by 0.95) in brackets.
     * Engine, F16/BF16 [0 | 0.11]: the same f32 products, so only the
     * summation order may differ (f32 roundoff, ~1e-7 per layer).
     * Engine, Q8_0/Q4_0 [3.7e-2 | 8.0e-2]: rounding activations to int8
     * with a scale of max|x|/127 per block of 32 leaves an rms error of
     * (max|x|/127)/sqrt(12) per element: 0.5 % of the block's rms for
     * Gaussian-like blocks, 1.3 % at worst (max/rms <= sqrt(32)). Through
     * the fixtures' 2-3 layers the injected 5 % grows 1.6-4.8x; the same
     * growth on 0.5-1.3 % is 0.8-6 %, measured 1.2-3.7 %.
     * Model: weight rounding on top. F16 [2.0e-3 | 0.11] rounds each
     * weight by <= 2^-11 relative, BF16 [1.7e-2 | 0.11] by 2^-8 (8x), Q8_0
     * [5.9e-2 | 0.11] by max/254 per block plus the activations above.
     * Q4_0 [0.47 | 0.20] has 16 levels per block, an rms error ~8 % per
     * weight: a 5 % kernel error drowns in it, so against transformers
     * Q4_0 only catches blow-ups; its kernel is held by the engine bound. */
    {MOE_TYPE_F16, 1e-5, 3e-3, -1},
    {MOE_TYPE_BF16, 1e-5, 3e-2, -1},
    {MOE_TYPE_Q8_0, 5e-2, 8e-2, 15},  /* [min 24 cells: a layer-0 choice near-tie at row 10 of qwen3moe] */
    {MOE_TYPE_Q4_0, 5e-2, 0.6, 7},    /* [min 13: MoE fixtures flip from row 0] */
};
#define N_QT (int)(sizeof QTYPES / sizeof QTYPES[0])

/* ||got - want|| / ||want||; NaN never passes. The L2 ratio rather than
 * the max element: rounding noise spreads over a row's elements, so its
 * worst element is ~3x its rms, while a wrong scale moves every element
 * by the same fraction - the L2 ratio keeps the two apart. */
static double rel_l2(const float *got, const float *want, size_t n) {
    double dd = 0, ww = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - want[i];
        dd += d * d;
        ww += (double)want[i] * want[i];
    }
    double e = sqrt(dd / ww);
    return e == e ? e : INFINITY;
}

/* What two runs of a fixture agree on being comparable: the residual
 * cells (row t, layer j) and logits rows that no difference in expert
 * choice has reached. Cell (t, j) is layer j's attention over layer
 * j - 1's cells of rows <= t, then row t's own FFN/MoE; so a choice that
 * differs at (r, l) changes (r, l) itself and every (t > r, j > l) - not
 * (t > r, l): a first difference at row 0 still leaves that layer in
 * every later row, and every layer before it. Logits row t is clean when
 * all its layers are. */
typedef struct cmp {
    double logit_err;  /* max over clean rows of rel_l2 of the row */
    double hidden_err; /* the same over clean residual cells (n_embd each) */
    int n_rows;        /* clean logits rows compared */
    int n_cells;       /* clean residual cells compared */
    int flip_row, flip_layer; /* first choice difference; -1 if none */
} cmp;

/* Whether runs a and b chose different expert sets at (row, layer). Sets,
 * not order: two experts swapping rank change only the summation order. */
static int choice_differs(const run_result *a, const run_result *b, const ref *r, int row, int il) {
    int K = a->n_used;
    const int32_t *x = a->routes + ((size_t)il * r->n_rows + row) * K;
    const int32_t *y = b->routes + ((size_t)il * r->n_rows + row) * K;
    for (int i = 0; i < K; i++) {
        int found = 0;
        for (int j = 0; j < K; j++) found |= x[i] == y[j];
        if (!found) return 1;
    }
    return 0;
}

/* Compares `got` with want_logits/want_hidden ((n_rows, n_vocab) and
 * (n_layer, n_rows, n_embd)) on the cells that no difference between
 * got's expert choices and base's has reached. */
static cmp compare_clean(const run_result *got, const run_result *base, const float *want_logits,
                         const float *want_hidden, const ref *r) {
    cmp c = {.flip_row = -1, .flip_layer = -1};
    size_t E = (size_t)r->n_embd, V = (size_t)r->n_vocab;
    int m = r->n_layer; /* min over earlier rows of their first unclean layer */
    for (int t = 0; t < r->n_rows; t++) {
        int u = m + 1 < r->n_layer ? m + 1 : r->n_layer; /* this row's first unclean layer */
        for (int il = 0; il < u; il++)
            if (choice_differs(got, base, r, t, il)) {
                if (c.flip_row < 0) c.flip_row = t, c.flip_layer = il;
                u = il;
            }
        for (int il = 0; il < u; il++) {
            size_t o = ((size_t)il * r->n_rows + t) * E;
            c.hidden_err = fmax(c.hidden_err, rel_l2(got->hidden + o, want_hidden + o, E));
            c.n_cells++;
        }
        if (u == r->n_layer) {
            c.logit_err = fmax(c.logit_err, rel_l2(got->logits + t * V, want_logits + t * V, V));
            c.n_rows++;
        }
        m = u < m ? u : m;
    }
    return c;
}

START_TEST(quantized_within_bounds) {
    ref r;
    load_ref(FIXTURES[_i], &r);
    char src[512], qpath[96], dpath[96];
    const char *name = r.gguf[r.n_gguf - 1];
    snprintf(src, sizeof src, FIXDIR "%s", name);
    run_result base = run_fixture(src, &r, 2, 16);
    for (int q = 0; q < N_QT; q++) {
        const char *tn = moe_type_name(QTYPES[q].type);
        snprintf(qpath, sizeof qpath, "/tmp/check_forward_%d_%s.gguf", (int)getpid(), tn);
        snprintf(dpath, sizeof dpath, "/tmp/check_forward_%d_%s_deq.gguf", (int)getpid(), tn);
        int n_quant = 0, n_deq = 0;
        requantize(src, qpath, QTYPES[q].type, &n_quant);
        ck_assert_int_gt(n_quant, 4);
        copy_gguf(qpath, dpath, MOE_TYPE_F32, &n_deq, NULL, NULL, NULL, NULL);
        run_result rq = run_fixture(qpath, &r, 2, 16);
        run_result rd = run_fixture(dpath, &r, 2, 16);
        unlink(qpath);
        unlink(dpath);
        cmp eng = compare_clean(&rq, &rd, rd.logits, rd.hidden, &r);
        cmp mod = compare_clean(&rq, &base, r.logits, r.hidden, &r);
        fprintf(stderr,
                "%-19s %-4s (%2d tensors) vs dequantized F32: logits %.2e on %2d rows, residual %.2e on %2d cells"
                " (flip %d/%d) | vs transformers: logits %.2e on %2d rows, residual %.2e on %2d cells (flip %d/%d)\n",
                name, tn, n_quant, eng.logit_err, eng.n_rows, eng.hidden_err, eng.n_cells, eng.flip_row,
                eng.flip_layer, mod.logit_err, mod.n_rows, mod.hidden_err, mod.n_cells, mod.flip_row, mod.flip_layer);
        ck_assert_msg(eng.logit_err <= QTYPES[q].tol_engine && eng.hidden_err <= QTYPES[q].tol_engine,
                      "%s as %s vs its dequantized F32 copy: logits %.3e, residual %.3e > %.1e", name, tn,
                      eng.logit_err, eng.hidden_err, QTYPES[q].tol_engine);
        ck_assert_msg(mod.logit_err <= QTYPES[q].tol_model && mod.hidden_err <= QTYPES[q].tol_model,
                      "%s as %s vs transformers: logits %.3e, residual %.3e > %.1e", name, tn, mod.logit_err,
                      mod.hidden_err, QTYPES[q].tol_model);
        /* every comparison must have compared something: a choice that
         * differs at row 0 still leaves earlier layers and later rows */
        int all = r.n_layer * r.n_rows, min_cells = QTYPES[q].min_cells < 0 ? all : QTYPES[q].min_cells;
        ck_assert_msg(eng.n_cells >= min_cells && mod.n_cells >= min_cells,
                      "%s as %s: compared %d and %d residual cells of %d, want >= %d", name, tn, eng.n_cells,
                      mod.n_cells, all, min_cells);
        free_run(&rq);
        free_run(&rd);
    }
    free_run(&base);
    free_ref(&r);
}
END_TEST

/* Runs `n` tokens of one step into (kv, seqs) and returns their logits. */
static void step(moe_fwd *fw, moe_kv_cache *kv, moe_kv_seq *seqs, int n_seq, int n, const int32_t *ids,
                 const int32_t *pos, const int32_t *sq, const uint8_t *want, float *out) {
    for (int t = 0; t < n; t++) ck_assert_int_eq(moe_kv_seq_reserve(kv, &seqs[sq[t]], pos[t] + 1), MOE_OK);
    moe_batch b = {.n_tok = n, .ids = ids, .pos = pos, .seq = sq, .n_seq = n_seq, .seqs = seqs, .want_logits = want};
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, out), MOE_OK);
}

/* One mixed step (a decode token, a second prefill chunk and a whole new
 * prompt, interleaved) gives each sequence the logits it gets alone. */
START_TEST(mixed_batch_equals_alone) {
    static const char *files[] = {"llama.gguf", "qwen2moe.gguf", "deepseek2.gguf", "deepseek3-mla.gguf"};
    char path[512], err[256];
    int st;
    snprintf(path, sizeof path, FIXDIR "%s", files[_i]);
    moe_model *mdl = moe_model_load(path, &st, err, sizeof err);
    const moe_gguf *g = moe_model_gguf(mdl);
    ck_assert_ptr_nonnull(g);
    moe_backend be;
    ck_assert_int_eq(moe_cpu_backend_init(&be, &(moe_cpu_backend_opts){.n_threads = 2}), MOE_OK);
    moe_fwd *fw = moe_fwd_create(mdl, &be, &st, err, sizeof err);
    ck_assert_msg(fw != NULL, "%s", err);
    int64_t V = moe_fwd_n_vocab(fw);
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, 4, 32, &ko);
    /* the three sequences' tokens */
    static const int32_t A[11] = {316, 72, 105, 32, 261, 109, 280, 101, 33, 300, 162};
    static const int32_t B[7] = {316, 290, 40, 41, 270, 99, 7};
    static const int32_t C[5] = {5, 260, 311, 64, 200};
    /* alone: A = 10 + 1, B = 4 + 3, C = 5 */
    float alone_a[11 * 320], alone_b[7 * 320], alone_c[5 * 320];
    ck_assert_int_le(V, 320);
    {
        moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
        moe_kv_seq s[1] = {{0}};
        int32_t pos[11], sq[11] = {0};
        for (int i = 0; i < 11; i++) pos[i] = i;
        step(fw, kv, s, 1, 10, A, pos, sq, NULL, alone_a);
        step(fw, kv, s, 1, 1, A + 10, pos + 10, sq, NULL, alone_a + 10 * V);
        moe_kv_seq_release(kv, &s[0]);
        step(fw, kv, s, 1, 4, B, pos, sq, NULL, alone_b);
        step(fw, kv, s, 1, 3, B + 4, pos + 4, sq, NULL, alone_b + 4 * V);
        moe_kv_seq_release(kv, &s[0]);
        step(fw, kv, s, 1, 5, C, pos, sq, NULL, alone_c);
        moe_kv_seq_release(kv, &s[0]);
        ck_assert_int_eq(moe_kv_n_free(kv), 32);
        moe_kv_destroy(kv);
    }
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    moe_kv_seq s[3] = {{0}};
    /* step 1: B's first chunk, then A's prompt (B's blocks come first, so A's are not block 0..) */
    int32_t ids1[14], pos1[14], sq1[14];
    for (int i = 0; i < 4; i++) ids1[i] = B[i], pos1[i] = i, sq1[i] = 1;
    for (int i = 0; i < 10; i++) ids1[4 + i] = A[i], pos1[4 + i] = i, sq1[4 + i] = 0;
    float out1[14 * 320];
    step(fw, kv, s, 3, 14, ids1, pos1, sq1, NULL, out1);
    /* step 2: interleaved C prompt, A decode, B's second chunk; logits only for the last of each */
    int32_t ids2[9] = {C[0], C[1], A[10], B[4], B[5], C[2], B[6], C[3], C[4]};
    int32_t pos2[9] = {0, 1, 10, 4, 5, 2, 6, 3, 4};
    int32_t sq2[9] = {2, 2, 0, 1, 1, 2, 1, 2, 2};
    uint8_t want2[9] = {0, 0, 1, 0, 0, 0, 1, 0, 1};
    float out2[3 * 320];
    step(fw, kv, s, 3, 9, ids2, pos2, sq2, want2, out2);
    double e = 0;
    for (int i = 0; i < 4; i++) e = fmax(e, rel_err(out1 + i * V, alone_b + i * V, (size_t)V));
    for (int i = 0; i < 10; i++) e = fmax(e, rel_err(out1 + (4 + i) * V, alone_a + i * V, (size_t)V));
    e = fmax(e, rel_err(out2, alone_a + 10 * V, (size_t)V));
    e = fmax(e, rel_err(out2 + V, alone_b + 6 * V, (size_t)V));
    e = fmax(e, rel_err(out2 + 2 * V, alone_c + 4 * V, (size_t)V));
    fprintf(stderr, "%-20s mixed batch vs alone: max rel err %.2e\n", files[_i], e);
    /* not bit-exact: the matmul kernels group tokens differently in the two
     * runs (4-token vs 1-token paths), which reorders f32 sums */
    ck_assert_msg(e <= 1e-5, "%s: mixed batch differs from alone by %.3e", files[_i], e);
    for (int i = 0; i < 3; i++) moe_kv_seq_release(kv, &s[i]);
    ck_assert_int_eq(moe_kv_n_free(kv), 32);
    moe_kv_destroy(kv);
    moe_fwd_free(fw);
    moe_backend_destroy(&be);
    moe_model_free(mdl);
}
END_TEST

START_TEST(bad_models_refused) {
    static const struct {
        const char *file, *drop, *as_f16, *arch;
        int status;
        const char *msg;
    } cases[] = {
        {"llama.gguf", "blk.1.ffn_down.weight", NULL, NULL, MOE_EFORMAT, "blk.1.ffn_down.weight"},
        {"llama.gguf", NULL, "blk.0.attn_norm.weight", NULL, MOE_EUNSUPPORTED, "blk.0.attn_norm.weight"},
        {"llama.gguf", NULL, NULL, "gpt-neox", MOE_EUNSUPPORTED, "gpt-neox"},
        {"deepseek3-mla.gguf", "blk.2.attn_v_b.weight", NULL, NULL, MOE_EFORMAT, "blk.2.attn_v_b.weight"},
        {"qwen2moe.gguf", "blk.0.ffn_up_exps.weight", NULL, NULL, MOE_EFORMAT, "blk.0.ffn_up_exps.weight"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char src[512], dst[64], err[256] = "";
        int nq, st = 0;
        snprintf(src, sizeof src, FIXDIR "%s", cases[i].file);
        snprintf(dst, sizeof dst, "/tmp/check_forward_bad_%d.gguf", (int)getpid());
        copy_gguf(src, dst, MOE_TYPE_F32, &nq, cases[i].drop, cases[i].as_f16, cases[i].arch, NULL);
        /* model.c is the one reader of the file: it refuses, naming the tensor or key */
        ck_assert_ptr_null(moe_model_load(dst, &st, err, sizeof err));
        unlink(dst);
        ck_assert_int_eq(st, cases[i].status);
        ck_assert_msg(strstr(err, cases[i].msg) != NULL, "case %zu: message '%s'", i, err);
    }
}
END_TEST

/* A backend that says it cannot compute with F32 matrices (the fixture's
 * type), or that lacks an op, is refused by moe_fwd_create with the
 * tensor or the op named. */
static int no_f32(void *ctx, int type) {
    (void)ctx;
    return type != MOE_TYPE_F32;
}

START_TEST(backend_refusals) {
    char path[512], err[256] = "";
    int st = 0;
    snprintf(path, sizeof path, FIXDIR "llama.gguf");
    moe_model *mdl = moe_model_load(path, &st, err, sizeof err);
    ck_assert_msg(mdl != NULL, "%s", err);
    moe_backend be;
    ck_assert_int_eq(moe_cpu_backend_init(&be, &(moe_cpu_backend_opts){.n_threads = 1}), MOE_OK);
    struct moe_backend_ops ops = *be.ops;
    moe_backend fake = {.ops = &ops, .ctx = be.ctx};
    ops.supports_type = no_f32;
    ck_assert_ptr_null(moe_fwd_create(mdl, &fake, &st, err, sizeof err));
    ck_assert_int_eq(st, MOE_EUNSUPPORTED);
    ck_assert_msg(strstr(err, "token_embd.weight") && strstr(err, "F32"), "message '%s'", err);
    ops = *be.ops;
    ops.sigmoid_scale = NULL;
    ck_assert_ptr_null(moe_fwd_create(mdl, &fake, &st, err, sizeof err));
    ck_assert_int_eq(st, MOE_EINVAL);
    ck_assert_msg(strstr(err, "'sigmoid_scale'") != NULL, "message '%s'", err);
    moe_backend_destroy(&be);
    moe_model_free(mdl);
}
END_TEST

/* Llama 3.1-style rope_freqs divide each pair's frequency: all ones change
 * nothing; all twos change every row except position 0's (angle 0). */
START_TEST(rope_freqs_factors) {
    ref r;
    load_ref("llama", &r);
    char src[512], dst[64];
    snprintf(src, sizeof src, FIXDIR "llama.gguf");
    snprintf(dst, sizeof dst, "/tmp/check_forward_rf_%d.gguf", (int)getpid());
    float ones[8] = {1, 1, 1, 1, 1, 1, 1, 1}, twos[8] = {2, 2, 2, 2, 2, 2, 2, 2};
    int nq;
    copy_gguf(src, dst, MOE_TYPE_F32, &nq, NULL, NULL, NULL, &(extra_tensor){"rope_freqs.weight", ones, 8});
    run_result a = run_fixture(dst, &r, 1, 4);
    copy_gguf(src, dst, MOE_TYPE_F32, &nq, NULL, NULL, NULL, &(extra_tensor){"rope_freqs.weight", twos, 8});
    run_result b = run_fixture(dst, &r, 1, 4);
    unlink(dst);
    ck_assert_double_le(a.err, 1e-5);
    ck_assert_double_gt(b.err, 1e-2);
    /* position 0 has no rotation, so the first row cannot change */
    ck_assert_double_le(rel_err(b.logits, r.logits, (size_t)r.n_vocab), 1e-5);
    free_run(&a);
    free_run(&b);
    free_ref(&r);
}
END_TEST

START_TEST(bad_batches_refused) {
    char path[512], err[256];
    int st;
    snprintf(path, sizeof path, FIXDIR "llama.gguf");
    moe_model *mdl = moe_model_load(path, &st, err, sizeof err);
    moe_backend be;
    ck_assert_int_eq(moe_cpu_backend_init(&be, &(moe_cpu_backend_opts){.n_threads = 1}), MOE_OK);
    moe_fwd *fw = moe_fwd_create(mdl, &be, &st, err, sizeof err);
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, 4, 4, &ko);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    moe_kv_seq s = {0};
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s, 4), MOE_OK);
    float out[320];
    int32_t id = 5, badid = 320, pos = 0, far = 4, sq = 0, badsq = 1;
    moe_batch b = {.n_tok = 1, .ids = &badid, .pos = &pos, .seq = &sq, .n_seq = 1, .seqs = &s};
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, out), MOE_EINVAL);
    b.ids = &id;
    b.pos = &far; /* beyond the sequence's one block */
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, out), MOE_EINVAL);
    b.pos = &pos;
    b.seq = &badsq;
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, out), MOE_EINVAL);
    b.seq = &sq;
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, out), MOE_OK);
    /* a cache of the wrong shape for this model */
    moe_kv_cache *other = moe_kv_create(&be, &(moe_kv_opts){.n_layer = 2, .block_size = 4, .n_blocks = 4, .k_width = 40}, &st);
    ck_assert_int_eq(moe_fwd_run(fw, other, &b, out), MOE_EINVAL);
    moe_kv_destroy(other);
    moe_kv_seq_release(kv, &s);
    moe_kv_destroy(kv);
    moe_fwd_free(fw);
    moe_backend_destroy(&be);
    moe_model_free(mdl);
}
END_TEST

/* The traffic count against sums taken from the file itself: dense bytes
 * are every tensor but the routed experts and the embedding table (plus
 * the rows looked up, and the table again when the output head is tied to
 * it); expert bytes are the distinct experts route_out reports, each
 * 1/E of its layer's three expert tensors; KV bytes are each token's
 * context times the cache slot width. */
static void count_tick(void *arg) { ++*(int64_t *)arg; }

START_TEST(traffic_counts) {
    static const char *files[] = {"qwen2moe.gguf", "deepseek3-mla.gguf", "llama.gguf"};
    char path[512], err[256], name[96];
    int st;
    snprintf(path, sizeof path, FIXDIR "%s", files[_i]);
    moe_model *mdl = moe_model_load(path, &st, err, sizeof err);
    const moe_gguf *g = moe_model_gguf(mdl);
    ck_assert_msg(g != NULL, "%s", err);
    moe_backend be;
    ck_assert_int_eq(moe_cpu_backend_init(&be, &(moe_cpu_backend_opts){.n_threads = 2}), MOE_OK);
    moe_fwd *fw = moe_fwd_create(mdl, &be, &st, err, sizeof err);
    ck_assert_msg(fw != NULL, "%s", err);
    int64_t L = moe_fwd_n_layer(fw), K = moe_fwd_n_expert_used(fw), V = moe_fwd_n_vocab(fw);
    int64_t dense = 0, all = 0, exp_each[64] = {0};
    const moe_gguf_tensor *emb = moe_gguf_find_tensor(g, "token_embd.weight");
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        if (t == emb || !strcmp(t->name, "rope_freqs.weight")) continue;
        all += (int64_t)t->nbytes;
        int il;
        if (strstr(t->name, "_exps.weight") && sscanf(t->name, "blk.%d.", &il) == 1 && il < 64)
            exp_each[il] += (int64_t)t->nbytes / t->ne[2];
        else
            dense += (int64_t)t->nbytes;
    }
    if (!moe_gguf_find_tensor(g, "output.weight")) {
        dense += (int64_t)emb->nbytes;
        all += (int64_t)emb->nbytes;
    }
    ck_assert_int_eq(moe_fwd_weight_bytes(fw), all);
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, 4, 8, &ko);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    moe_kv_seq s = {0};
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s, 8), MOE_OK);
    int32_t ids[5] = {3, 17, 42, 9, 11}, pos[5] = {0, 1, 2, 3, 4}, sq[5] = {0};
    int32_t *route = calloc((size_t)(L * 5 * (K ? K : 1)), sizeof(int32_t));
    float *logits = malloc((size_t)(5 * V) * sizeof(float));
    moe_fwd_traffic tr;
    moe_batch b = {.n_tok = 3, .ids = ids, .pos = pos, .seq = sq, .n_seq = 1, .seqs = &s};
    /* off by default: nothing counted; the layer callback runs once per layer */
    int64_t ticks = 0;
    moe_fwd_set_layer_cb(fw, count_tick, &ticks);
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, logits), MOE_OK);
    ck_assert_int_eq(ticks, L);
    moe_fwd_set_layer_cb(fw, NULL, NULL);
    ck_assert_int_eq(moe_fwd_last_traffic(fw, &tr), MOE_OK);
    ck_assert(tr.dense_bytes == 0 && tr.expert_bytes == 0 && tr.expert_reads == 0 && tr.kv_bytes == 0);
    moe_fwd_set_count_traffic(fw, true);
    for (int with_route = 0; with_route < 2; with_route++) {
        /* positions 3, 4 (after the first three), then 3, 4 again */
        moe_batch d = {.n_tok = 2, .ids = ids + 3, .pos = pos + 3, .seq = sq, .n_seq = 1, .seqs = &s};
        moe_fwd_set_route_out(fw, with_route ? route : NULL);
        ck_assert_int_eq(moe_fwd_run(fw, kv, &d, logits), MOE_OK);
        ck_assert_int_eq(moe_fwd_last_traffic(fw, &tr), MOE_OK);
        ck_assert_int_eq(tr.dense_bytes, dense + 2 * (int64_t)moe_row_size(emb->type, emb->ne[0]));
        ck_assert_int_eq(tr.kv_bytes, (4 + 5) * (ko.k_width + ko.v_width) * 4 * L);
        if (!K) {
            ck_assert(tr.expert_bytes == 0 && tr.expert_reads == 0);
            continue;
        }
        if (!with_route) continue;
        int64_t reads = 0, bytes = 0;
        for (int64_t il = 0; il < L; il++) {
            if (!exp_each[il]) continue;
            snprintf(name, sizeof name, "blk.%d.ffn_gate_exps.weight", (int)il);
            int64_t E = moe_gguf_find_tensor(g, name)->ne[2];
            char seen[256] = {0};
            for (int64_t i = 0; i < 2 * K; i++) {
                int32_t e = route[il * 2 * K + i];
                ck_assert(e >= 0 && e < E);
                if (!seen[e]) {
                    seen[e] = 1;
                    reads++;
                    bytes += exp_each[il];
                }
            }
        }
        ck_assert_int_eq(tr.expert_reads, reads);
        ck_assert_int_eq(tr.expert_bytes, bytes);
        ck_assert(reads >= K); /* at least one token's worth per MoE layer */
    }
    free(route);
    free(logits);
    moe_kv_seq_release(kv, &s);
    moe_kv_destroy(kv);
    moe_fwd_free(fw);
    moe_backend_destroy(&be);
    moe_model_free(mdl);
}
END_TEST

int main(void) {
    Suite *s = suite_create("forward");
    TCase *tc = tcase_create("fixtures_f32");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, f32_matches_transformers, 0, N_FIX);
    suite_add_tcase(s, tc);
    TCase *tq = tcase_create("fixtures_quantized");
    tcase_set_timeout(tq, 300);
    tcase_add_loop_test(tq, quantized_within_bounds, 0, N_FIX);
    suite_add_tcase(s, tq);
    TCase *tb = tcase_create("batching");
    tcase_set_timeout(tb, 120);
    tcase_add_loop_test(tb, mixed_batch_equals_alone, 0, 4);
    tcase_add_test(tb, bad_batches_refused);
    tcase_add_test(tb, bad_models_refused);
    tcase_add_test(tb, backend_refusals);
    tcase_add_test(tb, rope_freqs_factors);
    tcase_add_loop_test(tb, traffic_counts, 0, 3);
    suite_add_tcase(s, tb);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
