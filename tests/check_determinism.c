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

static void make_model(const char *arch, int type, const char *name, char *path, size_t pathsz) {
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
    ck_assert_msg(moe_mkmodel_write(&cfg, path, err, sizeof err) == MOE_OK, "%s", err);
}

static void rm_model(const char *path) {
    unlink(path);
    rmdir(tmpdir);
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

static void forward_case(const char *arch, int type, const char *name) {
    char path[128];
    make_model(arch, type, name, path, sizeof path);
    for (int isa = 0; isa <= (int)cpu_isa_best(); isa++) {
        ck_assert_int_eq(cpu_isa_set((cpu_isa)isa), MOE_OK);
        forward_invariance(path, 0x9e3779b97f4a7c15ull + (uint64_t)isa);
    }
    rm_model(path);
}

START_TEST(forward_mla_q8_0) { forward_case("deepseek2", MOE_TYPE_Q8_0, "ds2_q8"); }
END_TEST
START_TEST(forward_mla_f16) { forward_case("deepseek2", MOE_TYPE_F16, "ds2_f16"); }
END_TEST
START_TEST(forward_gqa_qknorm_q4_0) { forward_case("qwen3moe", MOE_TYPE_Q4_0, "q3_q4"); }
END_TEST
START_TEST(forward_shared_expert_bf16) { forward_case("qwen2moe", MOE_TYPE_BF16, "q2_bf16"); }
END_TEST
START_TEST(forward_dense_f32) { forward_case("llama", MOE_TYPE_F32, "llama_f32"); }
END_TEST

int main(void) {
    Suite *s = suite_create("determinism");
    TCase *tf = tcase_create("forward");
    tcase_set_timeout(tf, 120);
    tcase_add_test(tf, forward_mla_q8_0);
    tcase_add_test(tf, forward_mla_f16);
    tcase_add_test(tf, forward_gqa_qknorm_q4_0);
    tcase_add_test(tf, forward_shared_expert_bf16);
    tcase_add_test(tf, forward_dense_f32);
    suite_add_tcase(s, tf);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
