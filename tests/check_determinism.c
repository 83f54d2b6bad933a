/* check_determinism.c - a token's arithmetic does not depend on the step
 * it is computed in (issue 20).
 *
 * forward: random-weight models of every attention/FFN family (MLA, GQA
 * with q/k norms, shared experts, dense) and several weight types; each
 * prompt's logits at every position, computed in one full-prompt step
 * alone (the reference), must come back bit for bit the same when the
 * prompt is fed one token per step, in chunks of 16/64, or in random
 * chunks beside the other prompts in mixed steps, on 1, 2 or 3 threads,
 * on every ISA this CPU has (each ISA against its own reference).
 *
 * engine: the engine end to end. 50 prompts x {greedy, seeded sampling}
 * with logprobs run alone one by one (the reference), then all at once in
 * random bursts, under preemption (a tiny KV cache), with step budgets of
 * 16/64/512 tokens, with and without prefix-cache hits, on another thread
 * count: every token and every logprob (a float computed from the raw
 * logits row) must be identical.
 */
#include <check.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "cpu_matmul.h"
#include "engine.h"
#include "forward.h"
#include "kvcache.h"
#include "mkmodel.h"

static uint64_t rng_state;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}
static int64_t rnd_in(int64_t lo, int64_t hi) { return lo + (int64_t)(rnd() % (uint64_t)(hi - lo + 1)); }

static char tmpdir[64];

/* kv_lora > 0 overrides the preset's latent width (MLA). */
static void make_model(const char *arch, int type, int64_t kv_lora, const char *name, char *path, size_t pathsz) {
    if (!tmpdir[0]) {
        snprintf(tmpdir, sizeof tmpdir, "/tmp/check_determinism_XXXXXX");
        ck_assert_ptr_nonnull(mkdtemp(tmpdir));
    }
    snprintf(path, pathsz, "%s/%s.gguf", tmpdir, name);
    moe_mkmodel_cfg cfg;
    char err[256];
    ck_assert_int_eq(moe_mkmodel_preset(arch, "tiny", &cfg, err, sizeof err), MOE_OK);
    cfg.type = type;
    cfg.seed = 7;
    cfg.n_threads = 1;
    if (kv_lora > 0) cfg.hp.kv_lora_rank = kv_lora;
    ck_assert_msg(moe_mkmodel_write(&cfg, path, err, sizeof err) == MOE_OK, "%s", err);
}

static void rm_model(const char *path) {
    unlink(path);
    rmdir(tmpdir);
    tmpdir[0] = 0; /* the next test makes its own (CK_FORK=no runs them in one process) */
}

/* ---- forward level ---- */

enum { NP = 8, MAXLEN = 200, BS = 16 };

typedef struct rig {
    moe_model *mdl;
    moe_backend be;
    moe_fwd *fw;
    moe_kv_cache *kv;
    int64_t nv;
} rig;

static void rig_open(rig *r, const char *path, int threads) {
    int st = 0;
    r->mdl = moe_model_load(path, &st, NULL, 0);
    ck_assert_ptr_nonnull(r->mdl);
    ck_assert_int_eq(moe_cpu_backend_init(&r->be, &(moe_cpu_backend_opts){.n_threads = threads}), MOE_OK);
    char err[256] = "";
    r->fw = moe_fwd_create(r->mdl, &r->be, &st, err, sizeof err);
    ck_assert_msg(r->fw != NULL, "%s", err);
    r->nv = moe_fwd_n_vocab(r->fw);
    moe_kv_opts ko;
    moe_fwd_kv_opts(r->fw, BS, NP * ((MAXLEN + BS - 1) / BS), &ko);
    r->kv = moe_kv_create(&r->be, &ko, &st);
    ck_assert_ptr_nonnull(r->kv);
}

static void rig_close(rig *r) {
    moe_kv_destroy(r->kv);
    moe_fwd_free(r->fw);
    moe_backend_destroy(&r->be);
    moe_model_free(r->mdl);
}

typedef struct prompts {
    int64_t len[NP];
    int32_t ids[NP][MAXLEN];
} prompts;

static void make_prompts(prompts *p, int64_t nv) {
    /* lengths past 64 and 128 so attention spans several of any fixed chunk */
    static const int64_t lens[NP] = {1, 7, 33, 64, 65, 130, 157, MAXLEN};
    for (int i = 0; i < NP; i++) {
        p->len[i] = lens[i];
        for (int64_t t = 0; t < lens[i]; t++) p->ids[i][t] = (int32_t)rnd_in(0, nv - 1);
    }
}

/* Feeds the prompts selected by mask through the rig in steps: each step
 * takes, from every selected prompt not yet done (in a random order when
 * shuffle), the next chunk of chunk(prompt) tokens; out[i] receives the
 * logits of all positions of prompt i. */
static void feed(rig *r, const prompts *p, unsigned mask, int64_t (*chunk)(int64_t max), int64_t max_chunk,
                 bool shuffle, float **out) {
    moe_kv_seq seqs[NP];
    memset(seqs, 0, sizeof seqs);
    int64_t done[NP] = {0}, n_left = 0;
    for (int i = 0; i < NP; i++)
        if (mask >> i & 1) {
            ck_assert_int_eq(moe_kv_seq_reserve(r->kv, &seqs[i], p->len[i]), MOE_OK);
            n_left++;
        }
    int32_t ids[NP * MAXLEN], pos[NP * MAXLEN], sq[NP * MAXLEN];
    int owner[NP * MAXLEN];
    float *lg = malloc((size_t)NP * MAXLEN * (size_t)r->nv * sizeof(float));
    while (n_left) {
        int order[NP], n_ord = 0;
        for (int i = 0; i < NP; i++)
            if ((mask >> i & 1) && done[i] < p->len[i]) order[n_ord++] = i;
        for (int k = n_ord - 1; shuffle && k > 0; k--) {
            int j = (int)rnd_in(0, k), tmp = order[k];
            order[k] = order[j];
            order[j] = tmp;
        }
        int64_t n = 0;
        for (int k = 0; k < n_ord; k++) {
            int i = order[k];
            int64_t c = chunk(max_chunk), left = p->len[i] - done[i];
            if (c > left) c = left;
            for (int64_t t = 0; t < c; t++, n++) {
                ids[n] = p->ids[i][done[i] + t];
                pos[n] = (int32_t)(done[i] + t);
                sq[n] = i;
                owner[n] = i;
            }
        }
        moe_batch b = {.n_tok = n, .ids = ids, .pos = pos, .seq = sq, .n_seq = NP, .seqs = seqs};
        ck_assert_int_eq(moe_fwd_run(r->fw, r->kv, &b, lg), MOE_OK);
        for (int64_t t = 0; t < n; t++) {
            int i = owner[t];
            memcpy(out[i] + (size_t)pos[t] * r->nv, lg + (size_t)t * r->nv, (size_t)r->nv * sizeof(float));
        }
        for (int k = 0; k < n_ord; k++) {
            int i = order[k];
            int64_t c = 0;
            for (int64_t t = 0; t < n; t++) c += owner[t] == i;
            done[i] += c;
            if (done[i] == p->len[i]) n_left--;
        }
    }
    for (int i = 0; i < NP; i++) moe_kv_seq_release(r->kv, &seqs[i]);
    free(lg);
}

static int64_t chunk_fixed(int64_t max) { return max; }
static int64_t chunk_random(int64_t max) { return rnd_in(1, max); }

/* First differing (prompt, position, logit), or false when all are equal. */
static bool logits_differ(const prompts *p, int64_t nv, float **a, float **b, char *why, size_t whysz) {
    for (int i = 0; i < NP; i++)
        for (int64_t t = 0; t < p->len[i]; t++)
            if (memcmp(a[i] + t * nv, b[i] + t * nv, (size_t)nv * sizeof(float))) {
                for (int64_t v = 0; v < nv; v++)
                    if (memcmp(&a[i][t * nv + v], &b[i][t * nv + v], sizeof(float))) {
                        snprintf(why, whysz, "prompt %d (len %lld) position %lld logit %lld: %.9g vs %.9g", i,
                                 (long long)p->len[i], (long long)t, (long long)v, a[i][t * nv + v], b[i][t * nv + v]);
                        return true;
                    }
            }
    return false;
}

static float **alloc_logits(int64_t nv) {
    float **l = calloc(NP, sizeof(float *));
    for (int i = 0; i < NP; i++) l[i] = calloc((size_t)MAXLEN * (size_t)nv, sizeof(float));
    return l;
}

static void free_logits(float **l) {
    for (int i = 0; i < NP; i++) free(l[i]);
    free(l);
}

/* The whole forward-level check on one model file, on the current ISA. */
static void forward_invariance(const char *path, uint64_t seed) {
    rng_state = seed;
    rig r;
    rig_open(&r, path, 1);
    prompts p;
    make_prompts(&p, r.nv);
    float **ref = alloc_logits(r.nv), **got = alloc_logits(r.nv);
    /* reference: each prompt alone, in one step of its full length */
    for (int i = 0; i < NP; i++) feed(&r, &p, 1u << i, chunk_fixed, MAXLEN, false, ref);
    char why[256];
    static const struct {
        const char *name;
        int threads;
        bool together, shuffle;
        int64_t (*chunk)(int64_t);
        int64_t max;
    } cases[] = {
        {"alone, one token per step", 1, false, false, chunk_fixed, 1},
        {"alone, chunks of 16", 2, false, false, chunk_fixed, 16},
        {"alone, chunks of 64", 3, false, false, chunk_fixed, 64},
        {"together, one token each per step", 2, true, false, chunk_fixed, 1},
        {"together, random chunks 1..16, shuffled", 1, true, true, chunk_random, 16},
        {"together, random chunks 1..64, shuffled", 2, true, true, chunk_random, 64},
        {"together, random chunks 1..200, shuffled", 3, true, true, chunk_random, 200},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        rig_close(&r);
        rig_open(&r, path, cases[k].threads);
        for (int i = 0; i < NP; i++) memset(got[i], 0xff, (size_t)MAXLEN * (size_t)r.nv * sizeof(float));
        if (cases[k].together)
            feed(&r, &p, (1u << NP) - 1, cases[k].chunk, cases[k].max, cases[k].shuffle, got);
        else
            for (int i = 0; i < NP; i++) feed(&r, &p, 1u << i, cases[k].chunk, cases[k].max, false, got);
        ck_assert_msg(!logits_differ(&p, r.nv, ref, got, why, sizeof why), "%s, isa %s, %s, %d thread(s): %s", path,
                      cpu_isa_name(cpu_isa_get()), cases[k].name, cases[k].threads, why);
    }
    free_logits(ref);
    free_logits(got);
    rig_close(&r);
}

static void forward_case(const char *arch, int type, int64_t kv_lora, const char *name) {
    char path[128];
    make_model(arch, type, kv_lora, name, path, sizeof path);
    for (int isa = 0; isa <= (int)cpu_isa_best(); isa++) {
        ck_assert_int_eq(cpu_isa_set((cpu_isa)isa), MOE_OK);
        forward_invariance(path, 0x9e3779b97f4a7c15ull + (uint64_t)isa);
    }
    rm_model(path);
}

START_TEST(forward_mla_q8_0) { forward_case("deepseek2", MOE_TYPE_Q8_0, 0, "ds2_q8"); }
END_TEST
/* a latent of 516: the weighted sums are cut into column slices of 64,
 * the last of 4 (shorter than a vector); rows of 2 KiB, so a lone decode
 * token fuses scores and softmax while steps of several long tokens do not */
START_TEST(forward_mla_f16_wide_latent) { forward_case("deepseek2", MOE_TYPE_F16, 516, "ds2_f16"); }
END_TEST
START_TEST(forward_gqa_qknorm_q4_0) { forward_case("qwen3moe", MOE_TYPE_Q4_0, 0, "q3_q4"); }
END_TEST
START_TEST(forward_shared_expert_bf16) { forward_case("qwen2moe", MOE_TYPE_BF16, 0, "q2_bf16"); }
END_TEST
START_TEST(forward_dense_f32) { forward_case("llama", MOE_TYPE_F32, 0, "llama_f32"); }
END_TEST


/* ---- engine level ---- */

enum { NPR = 50, NREQ = 2 * NPR, GEN = 12, NTOP = 2, PLEN_MAX = 150 };

/* One request's stream: tokens, their logprobs and top alternatives. */
typedef struct stream {
    int32_t tok[GEN];
    float lp[GEN];
    int32_t top[GEN][NTOP];
    float top_lp[GEN][NTOP];
    int n, n_done, n_error;
} stream;

typedef struct runset {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    stream s[NREQ];
    int n_done;
} runset;

typedef struct req_ctx {
    runset *rs;
    int idx;
} req_ctx;

static void on_event(void *user, const moe_event *ev) {
    req_ctx *rc = user;
    runset *rs = rc->rs;
    pthread_mutex_lock(&rs->mu);
    stream *st = &rs->s[rc->idx];
    if (ev->kind == MOE_EV_TOKEN && st->n < GEN) {
        st->tok[st->n] = ev->token;
        st->lp[st->n] = ev->logprob;
        for (int k = 0; k < NTOP && k < ev->n_top; k++) {
            st->top[st->n][k] = ev->top[k].id;
            st->top_lp[st->n][k] = ev->top[k].logprob;
        }
        st->n++;
    } else if (ev->kind == MOE_EV_ERROR) {
        st->n_error++;
    } else if (ev->kind == MOE_EV_DONE) {
        st->n_done++;
        rs->n_done++;
        pthread_cond_broadcast(&rs->cv);
    }
    pthread_mutex_unlock(&rs->mu);
}

typedef struct workload {
    int32_t ids[NPR][PLEN_MAX];
    int64_t len[NPR];
    int64_t total_prompt; /* over all NREQ requests */
} workload;

/* 50 prompts in 10 families: a family's prompts share a leading run of
 * 16-80 tokens (whole KV blocks or not), so later ones can hit the prefix
 * cache when earlier ones published it. */
static void make_workload(workload *w) {
    rng_state = 0x2545f4914f6cdd1dull;
    int32_t fam[10][80];
    int64_t fam_len[10];
    for (int f = 0; f < 10; f++) {
        fam_len[f] = rnd_in(16, 80);
        for (int64_t t = 0; t < fam_len[f]; t++) fam[f][t] = (int32_t)rnd_in(0, 315);
    }
    w->total_prompt = 0;
    for (int i = 0; i < NPR; i++) {
        int f = i % 10;
        int64_t shared = i < 10 ? 0 : fam_len[f]; /* the first of each family has its own start */
        w->len[i] = shared + rnd_in(1, PLEN_MAX - 80);
        memcpy(w->ids[i], fam[f], (size_t)shared * sizeof(int32_t));
        for (int64_t t = shared; t < w->len[i]; t++) w->ids[i][t] = (int32_t)rnd_in(0, 315);
        w->total_prompt += 2 * w->len[i];
    }
}

/* Request r: prompt r / 2, greedy when r is even, else seeded sampling. */
static moe_request make_req(const workload *w, int r, req_ctx *ctx) {
    int i = r / 2;
    moe_request q = {.prompt = w->ids[i], .n_prompt = w->len[i], .max_tokens = GEN, .n = 1, .logprobs = true,
                     .top_logprobs = NTOP, .ignore_eos = true, .on_event = on_event, .user = ctx};
    moe_sampling_defaults(&q.sampling);
    if (r % 2 == 0) {
        q.sampling.temperature = 0;
    } else {
        q.sampling.temperature = 0.9f;
        q.sampling.top_p = 0.95f;
        q.sampling.has_seed = true;
        q.sampling.seed = 5000u + (uint64_t)i;
    }
    return q;
}

static moe_engine *eng_start(const char *model, moe_engine_opts o) {
    o.model_path = model;
    o.chat_family = -1;
    int st = 0;
    char err[256];
    moe_engine *e = moe_engine_start(&o, &st, err, sizeof err);
    ck_assert_msg(e != NULL, "start: %s", err);
    ck_assert_int_eq(moe_engine_wait_ready(e, 20000), MOE_ENGINE_READY);
    return e;
}

static void submit(moe_engine *e, const workload *w, runset *rs, req_ctx *ctx, int r) {
    ctx[r] = (req_ctx){rs, r};
    moe_request q = make_req(w, r, &ctx[r]);
    char err[256];
    ck_assert_msg(moe_engine_submit(e, &q, NULL, err, sizeof err) == MOE_OK, "submit %d: %s", r, err);
}

static void wait_done(runset *rs, int n) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 120;
    pthread_mutex_lock(&rs->mu);
    while (rs->n_done < n)
        if (pthread_cond_timedwait(&rs->cv, &rs->mu, &ts)) break;
    int got = rs->n_done;
    pthread_mutex_unlock(&rs->mu);
    ck_assert_int_eq(got, n);
}

static runset *runset_new(void) {
    runset *rs = calloc(1, sizeof *rs);
    pthread_mutex_init(&rs->mu, NULL);
    pthread_cond_init(&rs->cv, NULL);
    return rs;
}

static void runset_free(runset *rs) {
    pthread_mutex_destroy(&rs->mu);
    pthread_cond_destroy(&rs->cv);
    free(rs);
}

/* The reference: every request alone in an engine of its own (so no
 * prefix-cache hit either), on one thread, whole prompts in one step. */
static void reference(const char *model, const workload *w, runset *ref) {
    req_ctx ctx[NREQ];
    for (int r = 0; r < NREQ; r++) {
        moe_engine *e = eng_start(model, (moe_engine_opts){.n_threads = 1, .kv_blocks = 64});
        submit(e, w, ref, ctx, r);
        wait_done(ref, r + 1);
        moe_engine_destroy(e, 1000);
    }
}

static void same_streams(const runset *ref, const runset *got, const char *what) {
    for (int r = 0; r < NREQ; r++) {
        const stream *a = &ref->s[r], *b = &got->s[r];
        ck_assert_msg(a->n_error == 0 && b->n_error == 0 && a->n == GEN && b->n == GEN, "%s: request %d incomplete",
                      what, r);
        for (int t = 0; t < GEN; t++) {
            ck_assert_msg(a->tok[t] == b->tok[t], "%s: request %d (%s) token %d: %d alone, %d here", what, r,
                          r % 2 ? "sampled" : "greedy", t, a->tok[t], b->tok[t]);
            /* bitwise: a logprob is a float function of the raw logits row */
            ck_assert_msg(!memcmp(&a->lp[t], &b->lp[t], sizeof(float)) &&
                              !memcmp(a->top[t], b->top[t], sizeof a->top[t]) &&
                              !memcmp(a->top_lp[t], b->top_lp[t], sizeof a->top_lp[t]),
                          "%s: request %d token %d: logprob %.9g alone, %.9g here", what, r, t, a->lp[t], b->lp[t]);
        }
    }
}

typedef enum { ALL_AT_ONCE, BURSTS, TWICE } pattern;

/* Runs the workload on an engine with options o in the given pattern and
 * compares it with the reference; returns the engine's stats. */
static moe_engine_stats scenario(const char *model, const workload *w, const runset *ref, moe_engine_opts o,
                                 pattern pat, const char *what) {
    moe_engine *e = eng_start(model, o);
    runset *rs = runset_new();
    req_ctx ctx[NREQ];
    int order[NREQ];
    for (int r = 0; r < NREQ; r++) order[r] = r;
    for (int k = NREQ - 1; k > 0; k--) {
        int j = (int)rnd_in(0, k), tmp = order[k];
        order[k] = order[j];
        order[j] = tmp;
    }
    if (pat == BURSTS) {
        /* groups of 1-32 requests, each group finished before the next:
         * every request runs beside 0-31 others */
        for (int r = 0; r < NREQ;) {
            int n = (int)rnd_in(1, 32);
            for (int k = 0; k < n && r < NREQ; k++, r++) submit(e, w, rs, ctx, order[r]);
            wait_done(rs, r);
        }
    } else {
        for (int r = 0; r < NREQ; r++) submit(e, w, rs, ctx, order[r]);
        wait_done(rs, NREQ);
    }
    same_streams(ref, rs, what);
    if (pat == TWICE) {
        /* the same requests again: their prompts are in the prefix cache now */
        runset *again = runset_new();
        for (int r = 0; r < NREQ; r++) submit(e, w, again, ctx, order[r]);
        wait_done(again, NREQ);
        same_streams(ref, again, what);
        runset_free(again);
    }
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    moe_engine_destroy(e, 1000);
    runset_free(rs);
    return st;
}

static void engine_case(const char *arch, const char *name) {
    char path[128];
    make_model(arch, MOE_TYPE_Q8_0, 0, name, path, sizeof path);
    workload *w = calloc(1, sizeof *w);
    make_workload(w);
    runset *ref = runset_new();
    reference(path, w, ref);
    moe_engine_stats st;
    /* random batches: all at once (batches of up to 32, arriving as others finish) and in bursts */
    st = scenario(path, w, ref, (moe_engine_opts){.n_threads = 2, .kv_blocks = 512, .max_seqs = 32}, ALL_AT_ONCE,
                  "all at once, 32 slots");
    ck_assert_int_ge(st.batch_hist[5] + st.batch_hist[6], 1); /* some step ran 17-32 sequences */
    scenario(path, w, ref, (moe_engine_opts){.n_threads = 3, .kv_blocks = 512, .max_seqs = 32}, BURSTS,
             "bursts of 1-32");
    /* preemption and recompute: 40 blocks of 16 hold two long sequences at most */
    st = scenario(path, w, ref, (moe_engine_opts){.n_threads = 2, .kv_blocks = 40, .max_seqs = 16}, ALL_AT_ONCE,
                  "tiny KV cache");
    ck_assert_uint_gt(st.preemptions_total, 0);
    /* chunked prefill at three step budgets */
    static const int64_t steps[] = {16, 64, 512};
    for (size_t k = 0; k < 3; k++) {
        char what[64];
        snprintf(what, sizeof what, "step_tokens %lld", (long long)steps[k]);
        scenario(path, w, ref,
                 (moe_engine_opts){.n_threads = 1, .kv_blocks = 512, .max_seqs = 16, .step_tokens = steps[k]},
                 ALL_AT_ONCE, what);
    }
    /* every prompt a full prefix-cache hit the second time */
    st = scenario(path, w, ref, (moe_engine_opts){.n_threads = 2, .kv_blocks = 1024, .max_seqs = 8}, TWICE,
                  "prefix cache warm");
    ck_assert_uint_lt(st.prompt_tokens_total, (uint64_t)w->total_prompt * 2 * 3 / 4);
    runset_free(ref);
    free(w);
    rm_model(path);
}

START_TEST(engine_mla) { engine_case("deepseek2", "ds2_engine"); }
END_TEST
START_TEST(engine_gqa) { engine_case("qwen3moe", "q3_engine"); }
END_TEST

int main(void) {
    Suite *s = suite_create("determinism");
    TCase *tf = tcase_create("forward");
    tcase_set_timeout(tf, 120);
    tcase_add_test(tf, forward_mla_q8_0);
    tcase_add_test(tf, forward_mla_f16_wide_latent);
    tcase_add_test(tf, forward_gqa_qknorm_q4_0);
    tcase_add_test(tf, forward_shared_expert_bf16);
    tcase_add_test(tf, forward_dense_f32);
    suite_add_tcase(s, tf);
    TCase *te = tcase_create("engine");
    tcase_set_timeout(te, 240);
    tcase_add_test(te, engine_mla);
    tcase_add_test(te, engine_gqa);
    suite_add_tcase(s, te);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
