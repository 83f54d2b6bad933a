/* check_engine.c - the engine thread end to end on the committed tiny
 * fixtures: greedy output of batched, chunked, concurrent requests equals
 * a separately coded single-sequence greedy loop over moe_fwd_run; text,
 * stop strings, EOS, event order, validation, queue limit, cancellation,
 * seeds, stats, drain/destroy, and the device switch. */
#include <check.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "engine.h"
#ifdef MOE_HAVE_CUDA
#include "cuda_backend.h"
#endif
#include "forward.h"
#include "gguf.h"
#include "kvcache.h"
#include "mkmodel.h"
#include "tokenizer.h"

#define FIXDIR MOE_SRC_DIR "/tests/fixtures/models/"
#define MAXC 4
#define MAXT 256

/* ---- the independent reference: one sequence, prefill then decode ---- */

static void ref_greedy(const char *path, const int32_t *prompt, int64_t n_prompt, int64_t n_gen, int32_t *out) {
    int st = 0;
    moe_model *mdl = moe_model_load(path, &st, NULL, 0);
    const moe_gguf *g = moe_model_gguf(mdl);
    ck_assert_ptr_nonnull(g);
    moe_backend be;
    ck_assert_int_eq(moe_cpu_backend_init(&be, &(moe_cpu_backend_opts){.n_threads = 1}), MOE_OK);
    moe_fwd *fw = moe_fwd_create(mdl, &be, &st, NULL, 0);
    ck_assert_ptr_nonnull(fw);
    int64_t nv = moe_fwd_n_vocab(fw), total = n_prompt + n_gen;
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, 16, (total + 15) / 16, &ko);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    ck_assert_ptr_nonnull(kv);
    moe_kv_seq seq = {0};
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &seq, total), MOE_OK);
    float *lg = malloc((size_t)nv * n_prompt * sizeof(float));
    int32_t *pos = malloc((size_t)n_prompt * sizeof(int32_t)), *sq = calloc((size_t)n_prompt, sizeof(int32_t));
    for (int64_t i = 0; i < n_prompt; i++) pos[i] = (int32_t)i;
    moe_batch b = {.n_tok = n_prompt, .ids = prompt, .pos = pos, .seq = sq, .n_seq = 1, .seqs = &seq};
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, lg), MOE_OK);
    const float *row = lg + (size_t)(n_prompt - 1) * nv;
    for (int64_t i = 0; i < n_gen; i++) {
        int32_t best = 0;
        for (int32_t v = 1; v < nv; v++)
            if (row[v] > row[best]) best = v;
        out[i] = best;
        int32_t p = (int32_t)(n_prompt + i), s0 = 0;
        moe_batch d = {.n_tok = 1, .ids = &out[i], .pos = &p, .seq = &s0, .n_seq = 1, .seqs = &seq};
        ck_assert_int_eq(moe_fwd_run(fw, kv, &d, lg), MOE_OK);
        row = lg;
    }
    free(lg);
    free(pos);
    free(sq);
    moe_kv_seq_release(kv, &seq);
    moe_kv_destroy(kv);
    moe_fwd_free(fw);
    moe_backend_destroy(&be);
    moe_model_free(mdl);
}

/* ---- event collection ---- */

typedef struct col {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int32_t toks[MAXC][MAXT];
    int ntok[MAXC];
    float lp[MAXC][MAXT];
    moe_logprob top[MAXC][MAXT][MOE_MAX_TOP_LOGPROBS];
    int ntop[MAXC][MAXT];
    char text[MAXC][8192];
    size_t tlen[MAXC];
    int n_finish[MAXC];
    moe_finish finish[MAXC];
    int32_t stop_index[MAXC];
    int64_t comp[MAXC];
    int n_error, n_done;
    char err[256];
    bool order_bad;
    int64_t done_comp, prompt_tokens;
    /* cancel itself after this many tokens of choice 0 (0: never) */
    int cancel_after;
    moe_engine *e;
    uint64_t id;
} col;

static void col_init(col *c) {
    memset(c, 0, sizeof(*c));
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
}

static void on_event(void *user, const moe_event *ev) {
    col *c = user;
    pthread_mutex_lock(&c->mu);
    if (c->n_done) c->order_bad = true;
    int i = ev->index;
    switch (ev->kind) {
    case MOE_EV_TOKEN:
        if (i < 0 || i >= MAXC || c->n_finish[i] || c->n_error) {
            c->order_bad = true;
            break;
        }
        if (c->ntok[i] < MAXT) {
            c->lp[i][c->ntok[i]] = ev->logprob;
            c->ntop[i][c->ntok[i]] = ev->n_top;
            for (int k = 0; k < ev->n_top && k < MOE_MAX_TOP_LOGPROBS; k++) c->top[i][c->ntok[i]][k] = ev->top[k];
            c->toks[i][c->ntok[i]++] = ev->token;
        }
        if (c->tlen[i] + ev->text_len < sizeof c->text[i]) {
            memcpy(c->text[i] + c->tlen[i], ev->text, ev->text_len);
            c->tlen[i] += ev->text_len;
        }
        if (i == 0 && c->cancel_after && c->ntok[0] == c->cancel_after) moe_engine_cancel(c->e, ev->req_id);
        break;
    case MOE_EV_FINISH:
        if (i < 0 || i >= MAXC || c->n_finish[i] || c->n_error) {
            c->order_bad = true;
            break;
        }
        c->n_finish[i]++;
        c->finish[i] = ev->finish;
        c->stop_index[i] = ev->stop_index;
        c->comp[i] = ev->completion_tokens;
        c->prompt_tokens = ev->prompt_tokens;
        if (c->tlen[i] + ev->text_len < sizeof c->text[i]) {
            memcpy(c->text[i] + c->tlen[i], ev->text, ev->text_len);
            c->tlen[i] += ev->text_len;
        }
        break;
    case MOE_EV_ERROR:
        c->n_error++;
        snprintf(c->err, sizeof c->err, "%.*s", (int)ev->text_len, ev->text);
        break;
    case MOE_EV_DONE:
        c->n_done++;
        c->done_comp = ev->completion_tokens;
        if (ev->t_now_ns < ev->t_submit_ns) c->order_bad = true;
        pthread_cond_broadcast(&c->cv);
        break;
    }
    pthread_mutex_unlock(&c->mu);
}

static bool col_wait(col *c, int timeout_s) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_s;
    pthread_mutex_lock(&c->mu);
    while (!c->n_done)
        if (pthread_cond_timedwait(&c->cv, &c->mu, &ts)) break;
    bool ok = c->n_done == 1;
    pthread_mutex_unlock(&c->mu);
    return ok;
}

static moe_engine *start(const char *model, moe_engine_opts o) {
    o.model_path = model;
    if (!o.n_threads) o.n_threads = 1;
    if (!o.kv_blocks) o.kv_blocks = 64;
    o.chat_family = -1;
    int st = -99;
    char err[256];
    moe_engine *e = moe_engine_start(&o, &st, err, sizeof err);
    ck_assert_msg(e != NULL, "start: %s", err);
    ck_assert_int_eq(moe_engine_wait_ready(e, 20000), MOE_ENGINE_READY);
    return e;
}

static moe_request greedy_req(const int32_t *prompt, int64_t n, int64_t max_tokens, col *c) {
    moe_request r = {.prompt = prompt, .n_prompt = n, .max_tokens = max_tokens, .n = 1, .on_event = on_event,
                     .user = c, .ignore_eos = true};
    moe_sampling_defaults(&r.sampling);
    r.sampling.temperature = 0;
    return r;
}

static void make_prompt(int32_t *p, int64_t n, unsigned seed) {
    p[0] = 316; /* <s> */
    for (int64_t i = 1; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (int32_t)((seed >> 16) % 316);
    }
}

static char *decode(const moe_engine *e, const int32_t *ids, int n, size_t *len) {
    moe_engine_info in;
    ck_assert_int_eq(moe_engine_get_info(e, &in), MOE_OK);
    char *s = NULL;
    ck_assert_int_eq(moe_tok_decode(in.tok, ids, (size_t)n, false, &s, len), MOE_OK);
    return s;
}

/* Several requests at once (different prompt lengths) must each produce
 * exactly the reference's greedy tokens and their text. */
static void concurrent_greedy(const char *model, moe_engine_opts o, int n_req) {
    enum { NR = 6, GEN = 12 };
    static const int64_t lens[NR] = {1, 5, 17, 40, 3, 23};
    int32_t prompts[NR][64], ref[NR][GEN];
    for (int i = 0; i < n_req; i++) {
        make_prompt(prompts[i], lens[i], 1000u + (unsigned)i);
        ref_greedy(model, prompts[i], lens[i], GEN, ref[i]);
    }
    moe_engine *e = start(model, o);
    col *c = calloc(NR, sizeof(col));
    for (int i = 0; i < n_req; i++) {
        col_init(&c[i]);
        moe_request r = greedy_req(prompts[i], lens[i], GEN, &c[i]);
        char err[256];
        uint64_t id = 0;
        ck_assert_msg(moe_engine_submit(e, &r, &id, err, sizeof err) == MOE_OK, "%s", err);
        ck_assert_uint_gt(id, 0);
    }
    for (int i = 0; i < n_req; i++) {
        ck_assert(col_wait(&c[i], 60));
        ck_assert(!c[i].order_bad);
        ck_assert_int_eq(c[i].n_error, 0);
        ck_assert_int_eq(c[i].ntok[0], GEN);
        for (int t = 0; t < GEN; t++)
            ck_assert_msg(c[i].toks[0][t] == ref[i][t], "request %d token %d: %d, reference %d", i, t, c[i].toks[0][t],
                          ref[i][t]);
        ck_assert_int_eq(c[i].n_finish[0], 1);
        ck_assert_int_eq(c[i].finish[0], MOE_FINISH_LENGTH);
        ck_assert_int_eq(c[i].comp[0], GEN);
        ck_assert_int_eq(c[i].done_comp, GEN);
        ck_assert_int_eq(c[i].prompt_tokens, lens[i]);
        size_t len;
        char *want = decode(e, ref[i], GEN, &len);
        ck_assert_uint_eq(c[i].tlen[0], len);
        ck_assert(!memcmp(c[i].text[0], want, len));
        free(want);
    }
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    if (o.kv_blocks && o.kv_blocks < 20) ck_assert_uint_gt(st.preemptions_total, 0);
    ck_assert_int_eq(st.requests_running, 0);
    ck_assert_int_eq(st.requests_waiting, 0);
    ck_assert_int_eq(st.seqs_running, 0);
    ck_assert_int_eq(st.kv_blocks_used, 0);
    ck_assert_uint_eq(st.requests_finished_total, (uint64_t)n_req);
    ck_assert_uint_eq(st.generation_tokens_total, (uint64_t)n_req * GEN);
    int64_t sum_prompt = 0;
    for (int i = 0; i < n_req; i++) sum_prompt += lens[i];
    ck_assert_uint_ge(st.prompt_tokens_total, (uint64_t)sum_prompt);
    uint64_t h = 0;
    for (int k = 0; k < 9; k++) h += st.batch_hist[k];
    ck_assert_uint_eq(h, st.steps_total);
    ck_assert_uint_gt(st.steps_total, 0);
    moe_engine_destroy(e, 1000);
    free(c);
}

START_TEST(greedy_equals_reference_mla) {
    concurrent_greedy(FIXDIR "deepseek2.gguf", (moe_engine_opts){0}, 6);
}
END_TEST

START_TEST(greedy_equals_reference_gqa_chunked) {
    /* tiny blocks and a 7-token step budget: prompts are split over many
     * steps, mixed with other requests' decodes; 3 slots for 6 requests */
    concurrent_greedy(FIXDIR "qwen2moe.gguf", (moe_engine_opts){.block_size = 4, .step_tokens = 7, .max_seqs = 3}, 6);
}
END_TEST

START_TEST(greedy_equals_reference_preempted) {
    /* 16 blocks of 4: the 6 requests (up to 52 positions each) cannot all
     * fit, so the youngest are preempted and recomputed */
    concurrent_greedy(FIXDIR "deepseek3.gguf", (moe_engine_opts){.block_size = 4, .kv_blocks = 16, .max_seqs = 6}, 6);
}
END_TEST

/* Stop strings: take the reference text, pick a stop string that spans a
 * token boundary, and expect everything before its first occurrence. */
START_TEST(stop_strings) {
    const char *model = FIXDIR "llama.gguf";
    enum { GEN = 24 };
    int32_t prompt[8], ref[GEN];
    make_prompt(prompt, 8, 77);
    ref_greedy(model, prompt, 8, GEN, ref);
    moe_engine *e = start(model, (moe_engine_opts){0});
    size_t full_len;
    char *full = decode(e, ref, GEN, &full_len);
    /* boundary between token 5 and 6: the stop string is the last 2 bytes
     * of the text so far plus the first 2 bytes after */
    size_t cut;
    char *pre = decode(e, ref, 6, &cut);
    free(pre);
    ck_assert_uint_ge(cut, 2);
    ck_assert_uint_ge(full_len, cut + 2);
    char stop[5];
    memcpy(stop, full + cut - 2, 4);
    stop[4] = 0;
    size_t expect = (size_t)((char *)memmem(full, full_len, stop, 4) - full);
    const char *stops[] = {"this-never-appears-anywhere", stop};
    col c;
    col_init(&c);
    moe_request r = greedy_req(prompt, 8, GEN, &c);
    r.stop = stops;
    r.n_stop = 2;
    ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_OK);
    ck_assert(col_wait(&c, 30));
    ck_assert(!c.order_bad);
    ck_assert_int_eq(c.finish[0], MOE_FINISH_STOP);
    ck_assert_int_eq(c.stop_index[0], 1); /* which of the request's stop strings it was */
    ck_assert_uint_eq(c.tlen[0], expect);
    ck_assert(!memcmp(c.text[0], full, expect));
    /* it stopped on the token that completed the stop string */
    ck_assert_int_le(c.ntok[0], 7 + 2);
    for (int t = 0; t < c.ntok[0]; t++) ck_assert_int_eq(c.toks[0][t], ref[t]);
    ck_assert_int_eq(c.comp[0], c.ntok[0]);

    /* a stop string that only partly appears at the end: held back, then
     * released by FINISH (LENGTH) */
    col d;
    col_init(&d);
    char tail[8];
    memcpy(tail, full + full_len - 1, 1);
    memcpy(tail + 1, "\x01\x02", 3);
    const char *stops2[] = {tail};
    moe_request r2 = greedy_req(prompt, 8, GEN, &d);
    r2.stop = stops2;
    r2.n_stop = 1;
    ck_assert_int_eq(moe_engine_submit(e, &r2, NULL, NULL, 0), MOE_OK);
    ck_assert(col_wait(&d, 30));
    ck_assert_int_eq(d.finish[0], MOE_FINISH_LENGTH);
    ck_assert_int_eq(d.stop_index[0], -1);
    ck_assert_uint_eq(d.tlen[0], full_len);
    ck_assert(!memcmp(d.text[0], full, full_len));
    free(full);
    moe_engine_destroy(e, 1000);
}
END_TEST

/* EOS ends a choice (STOP, not rendered, no TOKEN event); ignore_eos goes
 * on to max_tokens. logit_bias makes </s> (317) the argmax. */
START_TEST(eos_and_logit_bias) {
    moe_engine *e = start(FIXDIR "deepseek2.gguf", (moe_engine_opts){0});
    int32_t prompt[5];
    make_prompt(prompt, 5, 5);
    int32_t bid[] = {317};
    float bv[] = {100};
    col c;
    col_init(&c);
    moe_request r = greedy_req(prompt, 5, 10, &c);
    r.ignore_eos = false;
    r.sampling.n_logit_bias = 1;
    r.sampling.logit_bias_ids = bid;
    r.sampling.logit_bias = bv;
    ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_OK);
    ck_assert(col_wait(&c, 30));
    ck_assert_int_eq(c.finish[0], MOE_FINISH_STOP);
    ck_assert_int_eq(c.stop_index[0], -1); /* EOS, not a stop string */
    ck_assert_int_eq(c.ntok[0], 0);
    ck_assert_int_eq(c.comp[0], 1);
    ck_assert_uint_eq(c.tlen[0], 0);

    col d;
    col_init(&d);
    r.user = &d;
    r.ignore_eos = true;
    ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_OK);
    ck_assert(col_wait(&d, 30));
    ck_assert_int_eq(d.finish[0], MOE_FINISH_LENGTH);
    ck_assert_int_eq(d.ntok[0], 10);
    for (int t = 0; t < 10; t++) ck_assert_int_eq(d.toks[0][t], 317);
    ck_assert_uint_eq(d.tlen[0], 0); /* a control token renders as nothing */
    moe_engine_destroy(e, 1000);
}
END_TEST

/* Logprobs are log_softmax of the raw logits: checked against the
 * reference forward pass's last prompt row. */
START_TEST(logprobs) {
    const char *model = FIXDIR "qwen2.gguf";
    int32_t prompt[6];
    make_prompt(prompt, 6, 9);
    /* reference row */
    int st;
    moe_model *mdl = moe_model_load(model, &st, NULL, 0);
    moe_backend be;
    moe_cpu_backend_init(&be, NULL);
    moe_fwd *fw = moe_fwd_create(mdl, &be, &st, NULL, 0);
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, 16, 1, &ko);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    moe_kv_seq s = {0};
    moe_kv_seq_reserve(kv, &s, 6);
    int32_t pos[6] = {0, 1, 2, 3, 4, 5}, sq[6] = {0};
    uint8_t want[6] = {0, 0, 0, 0, 0, 1};
    float row[320];
    moe_batch b = {.n_tok = 6, .ids = prompt, .pos = pos, .seq = sq, .n_seq = 1, .seqs = &s, .want_logits = want};
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, row), MOE_OK);
    moe_kv_seq_release(kv, &s);
    moe_kv_destroy(kv);
    moe_fwd_free(fw);
    moe_backend_destroy(&be);
    moe_model_free(mdl);
    double mx = row[0], z = 0;
    int best = 0;
    for (int v = 1; v < 320; v++)
        if (row[v] > mx) mx = row[v], best = v;
    for (int v = 0; v < 320; v++) z += exp(row[v] - mx);

    moe_engine *e = start(model, (moe_engine_opts){0});
    col c;
    col_init(&c);
    moe_request r = greedy_req(prompt, 6, 1, &c);
    r.logprobs = true;
    r.top_logprobs = 5;
    ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_OK);
    ck_assert(col_wait(&c, 30));
    ck_assert_int_eq(c.ntok[0], 1);
    ck_assert_int_eq(c.toks[0][0], best);
    ck_assert_double_eq_tol(c.lp[0][0], row[best] - mx - log(z), 1e-4);
    ck_assert_int_eq(c.ntop[0][0], 5);
    ck_assert_int_eq(c.top[0][0][0].id, best);
    for (int k = 0; k < 5; k++) {
        int id = c.top[0][0][k].id;
        ck_assert_double_eq_tol(c.top[0][0][k].logprob, row[id] - mx - log(z), 1e-4);
        if (k) ck_assert(c.top[0][0][k].logprob <= c.top[0][0][k - 1].logprob);
        /* nothing outside the list beats the 5th */
    }
    int better = 0;
    for (int v = 0; v < 320; v++)
        if (row[v] > row[c.top[0][0][4].id]) better++;
    ck_assert_int_eq(better, 4);
    moe_engine_destroy(e, 1000);
}
END_TEST

/* Seeds: same seed -> same tokens; choice i of n uses seed + i, so choice
 * 1 of seed S equals choice 0 of seed S + 1. */
START_TEST(seeded_choices) {
    moe_engine *e = start(FIXDIR "mixtral.gguf", (moe_engine_opts){.block_size = 4});
    int32_t prompt[11];
    make_prompt(prompt, 11, 3);
    col a, b, c;
    col_init(&a);
    col_init(&b);
    col_init(&c);
    moe_request r = greedy_req(prompt, 11, 16, &a);
    r.sampling.temperature = 1.0f;
    r.sampling.has_seed = true;
    r.sampling.seed = 42;
    r.n = 3;
    ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_OK);
    r.n = 1;
    r.user = &b;
    ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_OK);
    r.user = &c;
    r.sampling.seed = 43;
    ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_OK);
    ck_assert(col_wait(&a, 30) && col_wait(&b, 30) && col_wait(&c, 30));
    ck_assert(!a.order_bad);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(a.ntok[i], 16);
        ck_assert_int_eq(a.n_finish[i], 1);
        ck_assert_int_eq(a.comp[i], 16);
    }
    ck_assert_int_eq(a.done_comp, 48);
    ck_assert(!memcmp(a.toks[0], b.toks[0], 16 * sizeof(int32_t)));
    ck_assert(!memcmp(a.toks[1], c.toks[0], 16 * sizeof(int32_t)));
    /* at T=1 on a random model two seeds give different streams */
    ck_assert(memcmp(a.toks[0], a.toks[1], 16 * sizeof(int32_t)) || memcmp(a.toks[1], a.toks[2], 16 * sizeof(int32_t)));
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    ck_assert_int_eq(st.kv_blocks_used, 0);
    moe_engine_destroy(e, 1000);
}
END_TEST

/* Defaults: KV blocks from kv_mem_mb at (k + v widths) * layers * 4 bytes
 * per position; ctx_size = context_length capped at 8192 and at what the
 * cache holds. llama.gguf: 2 kv heads x 16 for K and V, 2 layers. */
START_TEST(defaults_from_model) {
    const char *model = FIXDIR "llama.gguf";
    int st;
    moe_gguf *g = moe_gguf_open(model, &st, NULL, 0);
    uint64_t ctx_len = 0;
    ck_assert_int_eq(moe_gguf_get_u64(g, "llama.context_length", &ctx_len), MOE_OK);
    moe_gguf_close(g);
    moe_engine_opts o = {.model_path = model, .n_threads = 1, .kv_mem_mb = 1, .chat_family = -1};
    moe_engine *e = moe_engine_start(&o, &st, NULL, 0);
    ck_assert_int_eq(moe_engine_wait_ready(e, 20000), MOE_ENGINE_READY);
    moe_engine_info in;
    ck_assert_int_eq(moe_engine_get_info(e, &in), MOE_OK);
    int64_t slot = (2 * 16 + 2 * 16) * 2 * 4;
    ck_assert_int_eq(in.block_size, 16);
    ck_assert_int_eq(in.kv_blocks, 1048576 / (slot * 16));
    int64_t want = (int64_t)ctx_len < 8192 ? (int64_t)ctx_len : 8192;
    if (want > in.kv_blocks * 16) want = in.kv_blocks * 16;
    ck_assert_int_eq(in.ctx_size, want);
    ck_assert_int_eq(in.max_seqs, 32);
    moe_engine_stats sts;
    moe_engine_get_stats(e, &sts);
    ck_assert_int_eq(sts.kv_blocks_total, in.kv_blocks);
    ck_assert_int_eq(sts.state, MOE_ENGINE_READY);
    moe_engine_destroy(e, 0);
}
END_TEST

static void expect_bad(moe_engine *e, moe_request r, int code, const char *field) {
    char err[256] = "";
    uint64_t id = 7;
    int rc = moe_engine_submit(e, &r, &id, err, sizeof err);
    ck_assert_msg(rc == code, "%s: got %d (%s), want %d", field, rc, err, code);
    ck_assert_msg(strstr(err, field) != NULL, "message '%s' does not name %s", err, field);
}

START_TEST(validation) {
    moe_engine *e = start(FIXDIR "llama.gguf", (moe_engine_opts){.ctx_size = 64, .max_seqs = 4});
    moe_engine_info in;
    ck_assert_int_eq(moe_engine_get_info(e, &in), MOE_OK);
    ck_assert_int_eq(in.n_vocab, 320);
    ck_assert_int_eq(in.ctx_size, 64);
    ck_assert_int_eq(in.max_seqs, 4);
    ck_assert_int_eq(in.kv_blocks, 64);
    ck_assert_int_eq(in.block_size, 16);
    ck_assert_str_eq(in.model_id, "llama");
    ck_assert_str_eq(in.arch, "llama");
    ck_assert_str_eq(in.device, "cpu");
    ck_assert_int_gt(in.n_params, 0);
    ck_assert_ptr_nonnull(in.tok);
    ck_assert_ptr_nonnull(in.chat);
    int32_t p[3] = {316, 5, 6}, bad[2] = {1, 320};
    col c;
    col_init(&c);
    moe_request ok = greedy_req(p, 3, 4, &c), r;
    r = ok, r.n_prompt = 0;
    expect_bad(e, r, MOE_EINVAL, "prompt");
    r = ok, r.prompt = bad, r.n_prompt = 2;
    expect_bad(e, r, MOE_ERANGE, "prompt");
    r = ok, r.max_tokens = 0;
    expect_bad(e, r, MOE_ERANGE, "max_tokens");
    r = ok, r.max_tokens = 62;
    expect_bad(e, r, MOE_ERANGE, "max_tokens");
    r = ok, r.n = 0;
    expect_bad(e, r, MOE_ERANGE, "n:");
    r = ok, r.n = 5;
    expect_bad(e, r, MOE_ERANGE, "n:");
    r = ok, r.sampling.temperature = 2.5f;
    expect_bad(e, r, MOE_ERANGE, "temperature");
    r = ok, r.sampling.top_p = 0;
    expect_bad(e, r, MOE_ERANGE, "top_p");
    r = ok, r.sampling.min_p = 1.5f;
    expect_bad(e, r, MOE_ERANGE, "min_p");
    r = ok, r.sampling.presence_penalty = 3;
    expect_bad(e, r, MOE_ERANGE, "presence_penalty");
    r = ok, r.sampling.frequency_penalty = -3;
    expect_bad(e, r, MOE_ERANGE, "frequency_penalty");
    r = ok, r.sampling.repetition_penalty = 0;
    expect_bad(e, r, MOE_ERANGE, "repetition_penalty");
    int32_t bid[1] = {400};
    float bv[1] = {1};
    r = ok, r.sampling.n_logit_bias = 1, r.sampling.logit_bias_ids = bid, r.sampling.logit_bias = bv;
    expect_bad(e, r, MOE_ERANGE, "logit_bias");
    r = ok, r.top_logprobs = 21;
    expect_bad(e, r, MOE_ERANGE, "top_logprobs");
    const char *stops[MOE_MAX_STOP + 1] = {0};
    for (int i = 0; i <= MOE_MAX_STOP; i++) stops[i] = "x";
    r = ok, r.stop = stops, r.n_stop = MOE_MAX_STOP + 1;
    expect_bad(e, r, MOE_ERANGE, "stop");
    char *longstop = malloc(MOE_MAX_STOP_LEN + 2);
    memset(longstop, 'a', MOE_MAX_STOP_LEN + 1);
    longstop[MOE_MAX_STOP_LEN + 1] = 0;
    const char *ls[1] = {longstop};
    r = ok, r.stop = ls, r.n_stop = 1;
    expect_bad(e, r, MOE_ERANGE, "stop[0]");
    free(longstop);
    const char *es[1] = {""};
    r = ok, r.stop = es, r.n_stop = 1;
    expect_bad(e, r, MOE_EINVAL, "stop[0]");
    r = ok, r.on_event = NULL;
    expect_bad(e, r, MOE_EINVAL, "on_event");
    /* the exact limit is fine */
    r = ok, r.max_tokens = 61;
    ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_OK);
    ck_assert(col_wait(&c, 30));
    ck_assert_int_eq(c.ntok[0], 61);
    ck_assert_int_eq(c.finish[0], MOE_FINISH_LENGTH);
    /* nothing was queued by the failures */
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    ck_assert_uint_eq(st.requests_finished_total, 1);
    /* drained: refused with ESTATE */
    moe_engine_drain(e);
    ck_assert_int_eq(moe_engine_get_state(e), MOE_ENGINE_DRAINING);
    ck_assert_int_eq(moe_engine_submit(e, &ok, NULL, NULL, 0), MOE_ESTATE);
    ck_assert_int_eq(moe_engine_get_info(e, &in), MOE_OK);
    moe_engine_destroy(e, 1000);
}
END_TEST

/* queue_limit waiting requests: the next submit gets EFULL; all of them
 * are cancelled by destroy and still get FINISH(CANCELLED) + DONE. */
START_TEST(queue_full_and_destroy_cancels) {
    moe_engine *e = start(FIXDIR "llama.gguf", (moe_engine_opts){.max_seqs = 1, .queue_limit = 2, .ctx_size = 4096,
                                                                 .kv_blocks = 300});
    int32_t p[3] = {316, 5, 6};
    col c[4];
    int ok = 0, full = 0;
    for (int i = 0; i < 4; i++) {
        col_init(&c[i]);
        moe_request r = greedy_req(p, 3, 4000, &c[i]);
        char err[128];
        int rc = moe_engine_submit(e, &r, NULL, err, sizeof err);
        if (rc == MOE_OK) ok++;
        else {
            ck_assert_int_eq(rc, MOE_EFULL);
            full++;
        }
    }
    ck_assert_int_ge(full, 1);
    ck_assert_int_ge(ok, 2);
    moe_engine_destroy(e, 0);
    for (int i = 0; i < ok; i++) {
        ck_assert_int_eq(c[i].n_done, 1);
        ck_assert_int_eq(c[i].n_finish[0], 1);
        ck_assert_int_eq(c[i].finish[0], MOE_FINISH_CANCELLED);
        ck_assert(!c[i].order_bad);
    }
    for (int i = ok; i < 4; i++) ck_assert_int_eq(c[i].n_done, 0);
}
END_TEST

/* Cancelling a running request from its own callback: CANCELLED within a
 * step, blocks freed, other requests unaffected. */
START_TEST(cancel_running) {
    const char *model = FIXDIR "deepseek2.gguf";
    int32_t p[9], ref[8];
    make_prompt(p, 9, 11);
    ref_greedy(model, p, 9, 8, ref);
    moe_engine *e = start(model, (moe_engine_opts){.block_size = 4, .ctx_size = 2048, .kv_blocks = 600});
    col a, b;
    col_init(&a);
    col_init(&b);
    a.cancel_after = 3;
    a.e = e;
    moe_request r = greedy_req(p, 9, 2000, &a);
    r.n = 2;
    ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_OK);
    moe_request r2 = greedy_req(p, 9, 8, &b);
    ck_assert_int_eq(moe_engine_submit(e, &r2, NULL, NULL, 0), MOE_OK);
    ck_assert(col_wait(&a, 30) && col_wait(&b, 30));
    ck_assert(!a.order_bad);
    ck_assert_int_eq(a.finish[0], MOE_FINISH_CANCELLED);
    ck_assert_int_eq(a.finish[1], MOE_FINISH_CANCELLED);
    ck_assert_int_eq(a.ntok[0], 3); /* cancelled in the step it was asked */
    ck_assert_int_le(a.ntok[1], 4);
    ck_assert_int_eq(a.comp[0], 3);
    for (int t = 0; t < 8; t++) ck_assert_int_eq(b.toks[0][t], ref[t]);
    /* both choices are greedy: equal to the reference too */
    for (int t = 0; t < a.ntok[1]; t++) ck_assert_int_eq(a.toks[1][t], ref[t]);
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    ck_assert_int_eq(st.kv_blocks_used, 0);
    ck_assert_int_eq(st.seqs_running, 0);
    ck_assert_int_eq(st.requests_running, 0);
    /* unknown ids are ignored */
    moe_engine_cancel(e, 999999);
    /* the idle loop keeps the heartbeat going */
    uint64_t h0 = st.heartbeat_ns;
    usleep(350 * 1000);
    moe_engine_get_stats(e, &st);
    ck_assert_uint_gt(st.heartbeat_ns, h0 + 100000000ull);
    ck_assert_int_eq(st.state, MOE_ENGINE_READY);
    moe_engine_destroy(e, -1);
}
END_TEST

/* The prefix cache: the same prompt again computes only its last partial
 * block (prompt_tokens_total counts what was computed), same output. */
START_TEST(prefix_cache) {
    const char *model = FIXDIR "qwen3moe.gguf";
    int32_t p[37], ref[6];
    make_prompt(p, 37, 31);
    ref_greedy(model, p, 37, 6, ref);
    moe_engine *e = start(model, (moe_engine_opts){.block_size = 8});
    uint64_t before[3];
    for (int k = 0; k < 2; k++) {
        moe_engine_stats st;
        moe_engine_get_stats(e, &st);
        before[k] = st.prompt_tokens_total;
        col c;
        col_init(&c);
        moe_request r = greedy_req(p, 37, 6, &c);
        ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_OK);
        ck_assert(col_wait(&c, 30));
        ck_assert_int_eq(c.ntok[0], 6);
        for (int t = 0; t < 6; t++) ck_assert_int_eq(c.toks[0][t], ref[t]);
    }
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    before[2] = st.prompt_tokens_total;
    ck_assert_uint_eq(before[1] - before[0], 37);
    ck_assert_uint_eq(before[2] - before[1], 37 - 32); /* 4 whole blocks of 8 reused */
    ck_assert_int_eq(st.kv_blocks_used, 0);
    moe_engine_destroy(e, 1000);
}
END_TEST

/* Several threads submit and cancel at random: every accepted request gets
 * exactly one DONE after its FINISH events, and nothing is left over. */
typedef struct stress_arg {
    moe_engine *e;
    unsigned seed;
    int n_ok;
    col *cols;
} stress_arg;

#define STRESS_N 24

static void *stress_thread(void *p) {
    stress_arg *a = p;
    unsigned r = a->seed;
    for (int i = 0; i < STRESS_N; i++) {
        col *c = &a->cols[i];
        col_init(c);
        int32_t prompt[20];
        r = r * 1103515245u + 12345u;
        int64_t np = 1 + (r >> 16) % 20;
        make_prompt(prompt, np, r);
        moe_request q = greedy_req(prompt, np, 1 + (int64_t)((r >> 8) % 30), c);
        q.n = 1 + (int32_t)((r >> 4) % 3);
        q.sampling.temperature = (r >> 20) % 2 ? 0.8f : 0;
        q.ignore_eos = (r >> 21) % 2;
        uint64_t id = 0;
        if (moe_engine_submit(a->e, &q, &id, NULL, 0) != MOE_OK) {
            c->n_done = -1; /* refused: no events expected */
            continue;
        }
        a->n_ok++;
        if ((r >> 12) % 3 == 0) {
            usleep((r >> 3) % 2000);
            moe_engine_cancel(a->e, id);
        }
    }
    return NULL;
}

START_TEST(stress_submit_cancel) {
    moe_engine *e = start(FIXDIR "qwen2moe.gguf", (moe_engine_opts){.block_size = 4, .kv_blocks = 40, .max_seqs = 5,
                                                                    .step_tokens = 16, .queue_limit = 1000});
    enum { NT = 3 };
    pthread_t th[NT];
    stress_arg a[NT];
    for (int t = 0; t < NT; t++) {
        a[t] = (stress_arg){.e = e, .seed = 17u + (unsigned)t, .cols = calloc(STRESS_N, sizeof(col))};
        pthread_create(&th[t], NULL, stress_thread, &a[t]);
    }
    for (int t = 0; t < NT; t++) pthread_join(th[t], NULL);
    int total = 0;
    for (int t = 0; t < NT; t++)
        for (int i = 0; i < STRESS_N; i++) {
            col *c = &a[t].cols[i];
            if (c->n_done < 0) continue;
            total++;
            ck_assert(col_wait(c, 60));
            ck_assert(!c->order_bad);
            ck_assert_int_eq(c->n_error, 0);
            int64_t sum = 0;
            for (int k = 0; k < MAXC; k++) {
                if (!c->n_finish[k]) continue;
                ck_assert_int_eq(c->n_finish[k], 1);
                ck_assert_int_eq(c->comp[k], c->ntok[k] + (c->finish[k] == MOE_FINISH_STOP && c->comp[k] > c->ntok[k]));
                sum += c->comp[k];
            }
            ck_assert_int_eq(c->done_comp, sum);
        }
    ck_assert_int_gt(total, 0);
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    ck_assert_uint_eq(st.requests_finished_total, (uint64_t)total);
    ck_assert_int_eq(st.kv_blocks_used, 0);
    ck_assert_int_eq(st.seqs_running, 0);
    ck_assert_int_eq(st.requests_running, 0);
    ck_assert_int_eq(st.requests_waiting, 0);
    moe_engine_destroy(e, 1000);
    for (int t = 0; t < NT; t++) free(a[t].cols);
}
END_TEST

/* A 16k vocabulary samples the rows of a step on a thread pool: the
 * streams (tokens and logprobs) equal those of the inline path, and greedy
 * still equals the reference. */
START_TEST(parallel_sampling) {
    char dir[] = "/tmp/check_engine_XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char path[128];
    snprintf(path, sizeof path, "%s/big.gguf", dir);
    moe_mkmodel_cfg cfg;
    char err[256];
    ck_assert_int_eq(moe_mkmodel_preset("llama", "tiny", &cfg, err, sizeof err), MOE_OK);
    cfg.hp.n_vocab = 16384;
    cfg.type = MOE_TYPE_F32;
    cfg.n_threads = 1;
    ck_assert_msg(moe_mkmodel_write(&cfg, path, err, sizeof err) == MOE_OK, "%s", err);
    enum { NR = 4, GEN = 10 };
    int32_t prompts[NR][12], ref[GEN];
    for (int i = 0; i < NR; i++) make_prompt(prompts[i], 12, 40u + (unsigned)i);
    ref_greedy(path, prompts[0], 12, GEN, ref);
    col *c[2];
    for (int run = 0; run < 2; run++) {
        moe_engine *e = start(path, (moe_engine_opts){.n_threads = run ? 2 : 1, .max_seqs = 8});
        c[run] = calloc(NR, sizeof(col));
        for (int i = 0; i < NR; i++) {
            col_init(&c[run][i]);
            moe_request r = greedy_req(prompts[i], 12, GEN, &c[run][i]);
            if (i) {
                r.sampling.temperature = 0.9f;
                r.sampling.top_k = i == 2 ? 50 : 0;
                r.sampling.top_p = i == 3 ? 0.9f : 1.0f;
                r.sampling.has_seed = true;
                r.sampling.seed = 1000 + (uint64_t)i;
                r.n = 2;
                r.logprobs = true;
                r.top_logprobs = 3;
            }
            ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_OK);
        }
        for (int i = 0; i < NR; i++) ck_assert(col_wait(&c[run][i], 60));
        moe_engine_destroy(e, 1000);
    }
    for (int t = 0; t < GEN; t++) ck_assert_int_eq(c[1][0].toks[0][t], ref[t]);
    for (int i = 0; i < NR; i++)
        for (int k = 0; k < (i ? 2 : 1); k++) {
            ck_assert_int_eq(c[0][i].ntok[k], GEN);
            ck_assert_int_eq(c[1][i].ntok[k], GEN);
            ck_assert(!memcmp(c[0][i].toks[k], c[1][i].toks[k], GEN * sizeof(int32_t)));
            for (int t = 0; t < GEN && i; t++) {
                ck_assert_float_eq(c[0][i].lp[k][t], c[1][i].lp[k][t]);
                ck_assert_int_eq(c[0][i].top[k][t][0].id, c[1][i].top[k][t][0].id);
            }
        }
    free(c[0]);
    free(c[1]);
    unlink(path);
    rmdir(dir);
}
END_TEST

/* Overwrites rows [row0, row0 + n_rows) of F32 tensor `name` of the file
 * at path with value (all rows when n_rows < 0), in place. */
static void poison(const char *path, const char *name, int64_t row0, int64_t n_rows, float value) {
    int st = 0;
    moe_gguf *g = moe_gguf_open(path, &st, NULL, 0);
    ck_assert_ptr_nonnull(g);
    const moe_gguf_tensor *t = moe_gguf_find_tensor(g, name);
    ck_assert_ptr_nonnull(t);
    ck_assert_int_eq(t->type, MOE_TYPE_F32);
    int64_t rows = t->ne[1] * t->ne[2], n = n_rows < 0 ? rows : n_rows;
    uint64_t off = moe_gguf_data_offset(g) + t->offset + (uint64_t)row0 * (uint64_t)t->ne[0] * 4;
    size_t count = (size_t)(n * t->ne[0]);
    moe_gguf_close(g);
    float *v = malloc(count * sizeof(float));
    for (size_t i = 0; i < count; i++) v[i] = value;
    FILE *f = fopen(path, "r+b");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fseek(f, (long)off, SEEK_SET), 0);
    ck_assert_uint_eq(fwrite(v, sizeof(float), count, f), count);
    ck_assert_int_eq(fclose(f), 0);
    free(v);
}

/* A NaN token_embd row X: a request whose prompt holds X gets NaN logits
 * and fails with the cause and position; one submitted with it that never
 * meets X produces exactly the reference tokens; the engine goes on. A
 * model whose first step is NaN (the router of a MoE layer) never gets
 * READY: the warm-up names the cause. Before, route_token indexed expert
 * -1 on the NaN router row (ASan: heap-buffer-overflow). */
START_TEST(nonfinite_logits) {
    char dir[] = "/tmp/check_engine_XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char path[128], err[256];
    snprintf(path, sizeof path, "%s/nan.gguf", dir);
    moe_mkmodel_cfg cfg;
    ck_assert_int_eq(moe_mkmodel_preset("deepseek2", "tiny", &cfg, err, sizeof err), MOE_OK);
    cfg.type = MOE_TYPE_F32;
    cfg.n_threads = 1;
    ck_assert_msg(moe_mkmodel_write(&cfg, path, err, sizeof err) == MOE_OK, "%s", err);
    enum { GEN = 10, NP = 6 };
    int32_t good[NP] = {3, 14, 15, 92, 65, 35}, ref[GEN];
    ref_greedy(path, good, NP, GEN, ref);
    /* X: a token neither in the good prompt nor in its continuation */
    int32_t x = 1;
    for (bool used = true; used; x++) {
        used = false;
        for (int i = 0; i < NP; i++) used |= good[i] == x;
        for (int i = 0; i < GEN; i++) used |= ref[i] == x;
        if (!used) break;
    }
    poison(path, "token_embd.weight", x, 1, NAN);
    int32_t bad[NP] = {3, 14, x, 92, 65, 35};
    moe_engine *e = start(path, (moe_engine_opts){.max_seqs = 4});
    col c[3];
    for (int i = 0; i < 3; i++) col_init(&c[i]);
    moe_request rg = greedy_req(good, NP, GEN, &c[0]), rb = greedy_req(bad, NP, GEN, &c[1]);
    ck_assert_int_eq(moe_engine_submit(e, &rb, NULL, NULL, 0), MOE_OK);
    ck_assert_int_eq(moe_engine_submit(e, &rg, NULL, NULL, 0), MOE_OK);
    ck_assert(col_wait(&c[1], 60) && col_wait(&c[0], 60));
    ck_assert_int_eq(c[1].n_error, 1);
    ck_assert_int_eq(c[1].ntok[0], 0); /* nothing sampled from NaN */
    ck_assert_msg(strstr(c[1].err, "non-finite logits (NaN at token id ") && strstr(c[1].err, "at position 5"), "%s",
                  c[1].err);
    ck_assert_int_eq(c[0].n_error, 0);
    ck_assert_int_eq(c[0].ntok[0], GEN);
    for (int t = 0; t < GEN; t++) ck_assert_int_eq(c[0].toks[0][t], ref[t]);
    /* still serving */
    moe_request r2 = greedy_req(good, NP, GEN, &c[2]);
    ck_assert_int_eq(moe_engine_submit(e, &r2, NULL, NULL, 0), MOE_OK);
    ck_assert(col_wait(&c[2], 60));
    ck_assert_int_eq(c[2].n_error, 0);
    ck_assert(!memcmp(c[2].toks[0], ref, sizeof ref));
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    ck_assert_int_eq(st.kv_blocks_used, 0); /* the failed sequence's blocks came back */
    moe_engine_destroy(e, 1000);

    /* every router logit of layer 1 NaN: the warm-up refuses the model */
    poison(path, "blk.1.ffn_gate_inp.weight", 0, -1, NAN);
    int sst = 0;
    e = moe_engine_start(&(moe_engine_opts){.model_path = path, .n_threads = 1, .kv_blocks = 64, .chat_family = -1},
                         &sst, err, sizeof err);
    ck_assert_ptr_nonnull(e);
    ck_assert_int_eq(moe_engine_wait_ready(e, 20000), MOE_ENGINE_FAILED);
    ck_assert_msg(strstr(moe_engine_error(e), "warm-up forward pass: non-finite logits (NaN"), "%s",
                  moe_engine_error(e));
    moe_engine_destroy(e, 0);
    unlink(path);
    rmdir(dir);
}
END_TEST

static int n_status;
static void on_status(void *u, const char *s) {
    (void)u;
    if (s && *s) n_status++;
}

START_TEST(start_failures) {
    int st = 0;
    char err[256];
    ck_assert_ptr_null(moe_engine_start(NULL, &st, err, sizeof err));
    ck_assert_int_eq(st, MOE_EINVAL);
    ck_assert_ptr_null(moe_engine_start(&(moe_engine_opts){.model_path = "x.gguf", .device = "tpu"}, &st, err, sizeof err));
    ck_assert_int_eq(st, MOE_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "device"));
    /* cuda where there is none (no CUDA in the build, or no GPU): FAILED
     * with the reason. With a GPU this case has nothing to show. */
#ifdef MOE_HAVE_CUDA
    const bool have_gpu = cuda_device_count() > 0;
#else
    const bool have_gpu = false;
#endif
    moe_engine *e = moe_engine_start(
        &(moe_engine_opts){.model_path = FIXDIR "llama.gguf", .device = have_gpu ? "tpu" : "cuda"}, &st, err,
        sizeof err);
    if (have_gpu) {
        ck_assert_ptr_null(e);
        e = moe_engine_start(&(moe_engine_opts){.model_path = "/nonexistent/m.gguf"}, &st, err, sizeof err);
        ck_assert_ptr_nonnull(e);
        ck_assert_int_eq(moe_engine_wait_ready(e, 20000), MOE_ENGINE_FAILED);
    } else {
        ck_assert_ptr_nonnull(e);
        ck_assert_int_eq(moe_engine_wait_ready(e, 20000), MOE_ENGINE_FAILED);
        ck_assert_ptr_nonnull(strstr(moe_engine_error(e), "CUDA backend"));
    }
    int32_t p[1] = {1};
    col c;
    col_init(&c);
    moe_request r = greedy_req(p, 1, 1, &c);
    ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_ESTATE);
    moe_engine_info in;
    ck_assert_int_eq(moe_engine_get_info(e, &in), MOE_ESTATE);
    moe_engine_destroy(e, 0);
    /* a missing file: FAILED naming it */
    e = moe_engine_start(&(moe_engine_opts){.model_path = "/nonexistent/m.gguf", .on_status = on_status}, &st, err,
                         sizeof err);
    ck_assert_ptr_nonnull(e);
    ck_assert_int_eq(moe_engine_wait_ready(e, 20000), MOE_ENGINE_FAILED);
    ck_assert_ptr_nonnull(strstr(moe_engine_error(e), "/nonexistent/m.gguf"));
    ck_assert_int_ge(n_status, 1);
    moe_engine_destroy(e, 0);
    moe_engine_destroy(NULL, 0);
}
END_TEST

int main(void) {
    Suite *s = suite_create("engine");
    TCase *tg = tcase_create("greedy");
    tcase_set_timeout(tg, 120);
    tcase_add_test(tg, greedy_equals_reference_mla);
    tcase_add_test(tg, greedy_equals_reference_gqa_chunked);
    tcase_add_test(tg, greedy_equals_reference_preempted);
    suite_add_tcase(s, tg);
    TCase *tt = tcase_create("text");
    tcase_set_timeout(tt, 60);
    tcase_add_test(tt, stop_strings);
    tcase_add_test(tt, eos_and_logit_bias);
    tcase_add_test(tt, logprobs);
    suite_add_tcase(s, tt);
    TCase *ts = tcase_create("sampling");
    tcase_set_timeout(ts, 60);
    tcase_add_test(ts, seeded_choices);
    tcase_add_test(ts, parallel_sampling);
    suite_add_tcase(s, ts);
    TCase *tr = tcase_create("requests");
    tcase_set_timeout(tr, 60);
    tcase_add_test(tr, validation);
    tcase_add_test(tr, defaults_from_model);
    tcase_add_test(tr, queue_full_and_destroy_cancels);
    tcase_add_test(tr, cancel_running);
    tcase_add_test(tr, prefix_cache);
    tcase_add_test(tr, stress_submit_cancel);
    tcase_add_test(tr, start_failures);
    tcase_add_test(tr, nonfinite_logits);
    suite_add_tcase(s, tr);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
