/* check_scheduler.c - continuous batching driven directly (no engine
 * thread): greedy outputs under chunked prefill, a KV cache so small that
 * sequences are preempted and recomputed, and n > 1 choices sharing
 * prompt blocks must all equal a separately coded single-sequence greedy
 * loop; step budgets and max_seqs hold; decodes are never starved by a
 * prefill; cancellation and the end of every request free every block. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "forward.h"
#include "gguf.h"
#include "kvcache.h"
#include "scheduler.h"

#define FIXDIR MOE_SRC_DIR "/tests/fixtures/models/"
#define NG 5
#define GEN 10

static moe_backend be;
static moe_model *mdl;
static moe_fwd *fw;
static int64_t nv;

static void open_model(const char *name) {
    int st = 0;
    mdl = moe_model_load(name, &st, NULL, 0);
    ck_assert_ptr_nonnull(mdl);
    ck_assert_int_eq(moe_cpu_backend_init(&be, &(moe_cpu_backend_opts){.n_threads = 1}), MOE_OK);
    fw = moe_fwd_create(mdl, &be, &st, NULL, 0);
    ck_assert_ptr_nonnull(fw);
    nv = moe_fwd_n_vocab(fw);
}

static void close_model(void) {
    moe_fwd_free(fw);
    moe_backend_destroy(&be);
    moe_model_free(mdl);
    fw = NULL;
    mdl = NULL;
}

static int32_t argmax(const float *row) {
    int32_t b = 0;
    for (int32_t v = 1; v < nv; v++)
        if (row[v] > row[b]) b = v;
    return b;
}

/* the reference: its own cache, whole prompt then one token at a time */
static void ref_greedy(const int32_t *prompt, int64_t np, int32_t *out) {
    int st;
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, 8, (np + GEN + 7) / 8, &ko);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    moe_kv_seq s = {0};
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s, np + GEN), MOE_OK);
    float *lg = malloc((size_t)nv * sizeof(float));
    int32_t *pos = malloc((size_t)np * sizeof(int32_t)), *sq = calloc((size_t)np, sizeof(int32_t));
    uint8_t *w = calloc((size_t)np, 1);
    for (int64_t i = 0; i < np; i++) pos[i] = (int32_t)i;
    w[np - 1] = 1;
    moe_batch b = {.n_tok = np, .ids = prompt, .pos = pos, .seq = sq, .n_seq = 1, .seqs = &s, .want_logits = w};
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, lg), MOE_OK);
    for (int i = 0; i < GEN; i++) {
        out[i] = argmax(lg);
        int32_t p = (int32_t)(np + i), z = 0;
        moe_batch d = {.n_tok = 1, .ids = &out[i], .pos = &p, .seq = &z, .n_seq = 1, .seqs = &s};
        ck_assert_int_eq(moe_fwd_run(fw, kv, &d, lg), MOE_OK);
    }
    free(lg);
    free(pos);
    free(sq);
    free(w);
    moe_kv_seq_release(kv, &s);
    moe_kv_destroy(kv);
}

typedef struct spec {
    int64_t np;
    int32_t n;
    int add_at; /* step at which the group arrives */
} spec;

typedef struct result {
    int32_t out[NG][3][GEN];
    uint64_t preemptions;
    int64_t steps, max_tok, max_seqs, max_used;
} result;

static void make_prompt(int32_t *p, int64_t n, unsigned seed) {
    p[0] = 316;
    for (int64_t i = 1; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (int32_t)((seed >> 16) % 316);
    }
}

/* Runs the groups of sp greedily to GEN tokens each through a scheduler
 * over a cache of n_blocks blocks of bs. */
static void drive(const spec *sp, int ng, int64_t bs, int64_t n_blocks, moe_sched_opts so, result *res) {
    memset(res, 0, sizeof(*res));
    int st;
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, bs, n_blocks, &ko);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    ck_assert_ptr_nonnull(kv);
    moe_sched *s = moe_sched_new(kv, &so);
    ck_assert_ptr_nonnull(s);
    moe_sched_group *grp[NG] = {0};
    int32_t prompts[NG][64];
    int left = ng;
    float *lg = malloc((size_t)so.max_seqs * (size_t)nv * sizeof(float));
    for (int step = 0; left > 0; step++) {
        ck_assert_int_lt(step, 2000);
        for (int i = 0; i < ng; i++)
            if (sp[i].add_at == step) {
                make_prompt(prompts[i], sp[i].np, 500u + (unsigned)i);
                grp[i] = moe_sched_group_new(prompts[i], sp[i].np, sp[i].n, GEN, NULL);
                ck_assert_ptr_nonnull(grp[i]);
                moe_sched_add(s, grp[i]);
            }
        moe_sched_batch sb;
        ck_assert_int_eq(moe_sched_step(s, &sb), MOE_OK);
        ck_assert_int_eq(sb.n_failed, 0);
        if (!sb.b.n_tok) continue;
        /* budgets */
        ck_assert_int_le(sb.b.n_tok, so.step_tokens);
        ck_assert_int_le(sb.b.n_seq, so.max_seqs);
        if (sb.b.n_tok > res->max_tok) res->max_tok = sb.b.n_tok;
        if (sb.b.n_seq > res->max_seqs) res->max_seqs = sb.b.n_seq;
        int64_t used = n_blocks - moe_kv_n_free(kv);
        if (used > res->max_used) res->max_used = used;
        ck_assert_int_eq(moe_fwd_run(fw, kv, &sb.b, lg), MOE_OK);
        moe_sched_commit(s);
        res->steps++;
        for (int64_t r = 0; r < sb.n_rows; r++) {
            moe_sched_seq *q = sb.rows[r];
            ck_assert_int_eq(q->row, r);
            int32_t id = argmax(lg + (size_t)r * (size_t)nv);
            ck_assert_int_eq(moe_sched_append(s, q, id), MOE_OK);
            int64_t k = q->n_tok - q->group->n_prompt;
            int gi = 0;
            while (grp[gi] != q->group) gi++;
            res->out[gi][q->index][k - 1] = id;
            if (k == GEN) moe_sched_finish(s, q);
        }
        for (int i = 0; i < ng; i++)
            if (grp[i] && grp[i]->n_finished == grp[i]->n) {
                moe_sched_remove(s, grp[i]);
                moe_sched_group_free(grp[i]);
                grp[i] = NULL;
                left--;
            }
    }
    moe_sched_counts sc;
    moe_sched_get_counts(s, &sc);
    ck_assert_int_eq(sc.seqs_running, 0);
    ck_assert_int_eq(sc.groups_running, 0);
    ck_assert_int_eq(sc.groups_waiting, 0);
    ck_assert_int_eq(sc.seqs_preempted, 0);
    res->preemptions = sc.preemptions;
    ck_assert_int_eq(moe_kv_n_free(kv), n_blocks); /* every block came back */
    free(lg);
    moe_sched_free(s);
    moe_kv_destroy(kv);
}

static void check_against_reference(const spec *sp, int ng, const result *res) {
    for (int i = 0; i < ng; i++) {
        int32_t prompt[64], ref[GEN];
        make_prompt(prompt, sp[i].np, 500u + (unsigned)i);
        ref_greedy(prompt, sp[i].np, ref);
        for (int c = 0; c < sp[i].n; c++)
            for (int t = 0; t < GEN; t++)
                ck_assert_msg(res->out[i][c][t] == ref[t], "group %d choice %d token %d: %d, reference %d", i, c, t,
                              res->out[i][c][t], ref[t]);
    }
}

static const spec mix[NG] = {
    {.np = 13, .n = 1, .add_at = 0}, {.np = 30, .n = 2, .add_at = 0}, {.np = 3, .n = 1, .add_at = 2},
    {.np = 9, .n = 3, .add_at = 3},  {.np = 21, .n = 1, .add_at = 5},
};

static void roomy_chunked_and_tight(const char *model) {
    open_model(model);
    result a, b, c;
    /* roomy cache, generous budget */
    drive(mix, NG, 4, 256, (moe_sched_opts){.max_seqs = 16, .step_tokens = 256}, &a);
    ck_assert_uint_eq(a.preemptions, 0);
    check_against_reference(mix, NG, &a);
    /* chunked: 6 tokens per step, 4 slots */
    drive(mix, NG, 4, 256, (moe_sched_opts){.max_seqs = 4, .step_tokens = 6}, &b);
    ck_assert_int_le(b.max_tok, 6);
    ck_assert_int_le(b.max_seqs, 4);
    check_against_reference(mix, NG, &b);
    /* tight: 11 blocks of 4 = 44 positions, barely one 30 + 10 sequence */
    drive(mix, NG, 4, 11, (moe_sched_opts){.max_seqs = 8, .step_tokens = 64}, &c);
    ck_assert_uint_gt(c.preemptions, 0);
    ck_assert_int_le(c.max_used, 11);
    check_against_reference(mix, NG, &c);
    /* the same with the prefix cache: re-admitted sequences find their own
     * blocks when they were not evicted meanwhile */
    result d, e2;
    drive(mix, NG, 4, 11, (moe_sched_opts){.max_seqs = 8, .step_tokens = 64, .prefix_cache = true}, &d);
    ck_assert_uint_gt(d.preemptions, 0);
    check_against_reference(mix, NG, &d);
    drive(mix, NG, 4, 256, (moe_sched_opts){.max_seqs = 4, .step_tokens = 6, .prefix_cache = true}, &e2);
    check_against_reference(mix, NG, &e2);
    fprintf(stderr, "%s: steps roomy %lld, chunked %lld, tight %lld (%llu preemptions)\n", model, (long long)a.steps,
            (long long)b.steps, (long long)c.steps, (unsigned long long)c.preemptions);
    close_model();
}

START_TEST(outputs_equal_reference_mla) { roomy_chunked_and_tight(FIXDIR "deepseek2.gguf"); }
END_TEST

START_TEST(outputs_equal_reference_gqa) { roomy_chunked_and_tight(FIXDIR "llama.gguf"); }
END_TEST

/* A long prompt arriving while others decode is chunked, and every
 * running decode is in every step meanwhile. */
START_TEST(decodes_not_starved) {
    open_model(FIXDIR "llama.gguf");
    int st;
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, 4, 64, &ko);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    moe_sched *s = moe_sched_new(kv, &(moe_sched_opts){.max_seqs = 4, .step_tokens = 8});
    int32_t p1[3], p2[60];
    make_prompt(p1, 3, 1);
    make_prompt(p2, 60, 2);
    moe_sched_group *a = moe_sched_group_new(p1, 3, 2, 100, NULL);
    moe_sched_group *b = moe_sched_group_new(p2, 60, 1, 100, NULL);
    moe_sched_add(s, a);
    float *lg = malloc(4 * (size_t)nv * sizeof(float));
    int prefill_steps = 0;
    for (int step = 0; step < 30; step++) {
        if (step == 2) moe_sched_add(s, b);
        moe_sched_batch sb;
        ck_assert_int_eq(moe_sched_step(s, &sb), MOE_OK);
        ck_assert_int_le(sb.b.n_tok, 8);
        if (step >= 2) {
            /* both choices of a decode in every step */
            ck_assert_int_ge(a->seqs[0].chunk, 1);
            ck_assert_int_ge(a->seqs[1].chunk, 1);
            if (b->seqs[0].chunk > 1) prefill_steps++;
        }
        ck_assert_int_eq(moe_fwd_run(fw, kv, &sb.b, lg), MOE_OK);
        moe_sched_commit(s);
        for (int64_t r = 0; r < sb.n_rows; r++) moe_sched_append(s, sb.rows[r], argmax(lg + (size_t)r * (size_t)nv));
    }
    /* 60 prompt tokens at most 6 per step beside two decodes */
    ck_assert_int_ge(prefill_steps, 10);
    ck_assert_int_eq(b->seqs[0].n_computed >= 60, 1);
    /* cancellation: everything back, nothing running */
    moe_sched_remove(s, a);
    moe_sched_remove(s, b);
    ck_assert_int_eq(moe_kv_n_free(kv), 64);
    moe_sched_counts sc;
    moe_sched_get_counts(s, &sc);
    ck_assert_int_eq(sc.seqs_running, 0);
    ck_assert_int_eq(sc.groups_running, 0);
    moe_sched_batch sb;
    ck_assert_int_eq(moe_sched_step(s, &sb), MOE_OK);
    ck_assert_int_eq(sb.b.n_tok, 0);
    moe_sched_group_free(a);
    moe_sched_group_free(b);
    free(lg);
    moe_sched_free(s);
    moe_kv_destroy(kv);
    close_model();
}
END_TEST

/* n = 3 on a 10-token prompt with blocks of 4: the choices take
 * references to choice 0's first two blocks and compute position 8..9
 * themselves. */
START_TEST(choices_share_prompt_blocks) {
    open_model(FIXDIR "llama.gguf");
    int st;
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, 4, 32, &ko);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    moe_sched *s = moe_sched_new(kv, &(moe_sched_opts){.max_seqs = 4, .step_tokens = 64});
    int32_t p[10];
    make_prompt(p, 10, 3);
    moe_sched_group *gr = moe_sched_group_new(p, 10, 3, 5, NULL);
    moe_sched_add(s, gr);
    float *lg = malloc(4 * (size_t)nv * sizeof(float));
    moe_sched_batch sb;
    ck_assert_int_eq(moe_sched_step(s, &sb), MOE_OK);
    /* only choice 0 computes the prompt; the others wait for it */
    ck_assert_int_eq(sb.b.n_tok, 10);
    ck_assert_int_eq(gr->seqs[1].state, MOE_SEQ_FORK_WAIT);
    ck_assert_int_eq(moe_fwd_run(fw, kv, &sb.b, lg), MOE_OK);
    moe_sched_commit(s);
    ck_assert_int_eq(gr->seqs[1].state, MOE_SEQ_RUNNING);
    ck_assert_int_eq(gr->seqs[1].n_computed, 8);
    for (int i = 1; i < 3; i++) {
        ck_assert_int_eq(gr->seqs[i].kv.n_blocks, 2);
        ck_assert_int_eq(gr->seqs[i].kv.blocks[0], gr->seqs[0].kv.blocks[0]);
        ck_assert_int_eq(gr->seqs[i].kv.blocks[1], gr->seqs[0].kv.blocks[1]);
    }
    ck_assert_int_eq(moe_kv_refcount(kv, gr->seqs[0].kv.blocks[0]), 3);
    ck_assert_int_eq(moe_kv_refcount(kv, gr->seqs[0].kv.blocks[2]), 1);
    ck_assert_int_eq(moe_kv_n_free(kv), 32 - 3);
    moe_sched_append(s, sb.rows[0], argmax(lg));
    ck_assert_int_eq(moe_sched_step(s, &sb), MOE_OK);
    /* choice 0 decodes one token; 1 and 2 compute positions 8 and 9 */
    ck_assert_int_eq(sb.b.n_tok, 1 + 2 + 2);
    ck_assert_int_eq(sb.n_rows, 3);
    ck_assert_int_eq(moe_kv_n_free(kv), 32 - 5);
    /* a finished choice drops only its references */
    moe_sched_finish(s, &gr->seqs[1]);
    ck_assert_int_eq(moe_kv_refcount(kv, gr->seqs[0].kv.blocks[0]), 2);
    ck_assert_int_eq(moe_kv_n_free(kv), 32 - 4);
    moe_sched_remove(s, gr);
    ck_assert_int_eq(moe_kv_n_free(kv), 32);
    moe_sched_group_free(gr);
    free(lg);
    moe_sched_free(s);
    moe_kv_destroy(kv);
    close_model();
}
END_TEST

/* A sequence longer than the whole cache is reported, not looped on. */
START_TEST(never_fits_reported) {
    open_model(FIXDIR "llama.gguf");
    int st;
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, 4, 2, &ko);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    moe_sched *s = moe_sched_new(kv, &(moe_sched_opts){.max_seqs = 2, .step_tokens = 4});
    int32_t p[7];
    make_prompt(p, 7, 4);
    moe_sched_group *gr = moe_sched_group_new(p, 7, 1, 4, NULL);
    moe_sched_add(s, gr);
    float *lg = malloc(2 * (size_t)nv * sizeof(float));
    int failed = 0;
    for (int step = 0; step < 10 && !failed; step++) {
        moe_sched_batch sb;
        ck_assert_int_eq(moe_sched_step(s, &sb), MOE_OK);
        if (sb.n_failed) {
            ck_assert_ptr_eq(sb.failed[0], &gr->seqs[0]);
            failed = 1;
            break;
        }
        if (!sb.b.n_tok) continue;
        ck_assert_int_eq(moe_fwd_run(fw, kv, &sb.b, lg), MOE_OK);
        moe_sched_commit(s);
        for (int64_t r = 0; r < sb.n_rows; r++) moe_sched_append(s, sb.rows[r], argmax(lg + (size_t)r * (size_t)nv));
    }
    ck_assert_int_eq(failed, 1);
    moe_sched_remove(s, gr);
    ck_assert_int_eq(moe_kv_n_free(kv), 2);
    moe_sched_group_free(gr);
    free(lg);
    moe_sched_free(s);
    moe_kv_destroy(kv);
    close_model();
}
END_TEST

/* Runs one group to GEN greedy tokens on an existing scheduler; returns
 * the tokens computed in its first step. */
static int64_t run_one(moe_sched *s, moe_kv_cache *kv, const int32_t *prompt, int64_t np, int32_t *out) {
    (void)kv;
    moe_sched_group *gr = moe_sched_group_new(prompt, np, 1, GEN, NULL);
    moe_sched_add(s, gr);
    float *lg = malloc(4 * (size_t)nv * sizeof(float));
    int64_t first = -1;
    while (gr->n_finished < 1) {
        moe_sched_batch sb;
        ck_assert_int_eq(moe_sched_step(s, &sb), MOE_OK);
        ck_assert_int_eq(sb.n_failed, 0);
        if (first < 0) first = sb.b.n_tok;
        ck_assert_int_eq(moe_fwd_run(fw, kv, &sb.b, lg), MOE_OK);
        moe_sched_commit(s);
        for (int64_t r = 0; r < sb.n_rows; r++) {
            moe_sched_seq *q = sb.rows[r];
            int32_t id = argmax(lg + (size_t)r * (size_t)nv);
            moe_sched_append(s, q, id);
            int64_t k = q->n_tok - np;
            out[k - 1] = id;
            if (k == GEN) moe_sched_finish(s, q);
        }
    }
    moe_sched_remove(s, gr);
    moe_sched_group_free(gr);
    free(lg);
    return first;
}

/* Prefix cache: the same prompt again computes only what is past its
 * cached whole blocks; a follow-up turn (prompt + answer + more) reuses
 * the answer's blocks too; eviction under pressure keeps results right. */
START_TEST(prefix_cache_reuse) {
    open_model(FIXDIR "deepseek2.gguf");
    int st;
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, 4, 16, &ko);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    moe_sched *s = moe_sched_new(kv, &(moe_sched_opts){.max_seqs = 4, .step_tokens = 64, .prefix_cache = true});
    ck_assert_ptr_nonnull(s);
    int32_t a[30], out[GEN], ref[GEN], out2[GEN];
    make_prompt(a, 30, 21);
    ref_greedy(a, 30, ref);
    ck_assert_int_eq(run_one(s, kv, a, 30, out), 30);
    ck_assert(!memcmp(out, ref, sizeof ref));
    /* everything is free again, most of it as cache */
    ck_assert_int_eq(moe_kv_n_free(kv), 16);
    ck_assert_int_eq(moe_kv_n_cached(kv), 9); /* positions 0..35 of the 39 computed */
    ck_assert_int_eq(run_one(s, kv, a, 30, out2), 2); /* 7 blocks (28 positions) found */
    ck_assert(!memcmp(out2, ref, sizeof ref));
    moe_sched_counts sc;
    moe_sched_get_counts(s, &sc);
    ck_assert_uint_eq(sc.prefix_hit_tokens, 28);
    /* the next turn: prompt + answer + 5 more tokens */
    int32_t b[45], refb[GEN];
    memcpy(b, a, sizeof a);
    memcpy(b + 30, ref, sizeof ref);
    make_prompt(b + 40, 5, 22);
    b[40] = 7;
    ref_greedy(b, 45, refb);
    ck_assert_int_eq(run_one(s, kv, b, 45, out), 45 - 36);
    ck_assert(!memcmp(out, refb, sizeof refb));
    /* a different 50-token sequence needs 15 of the 16 blocks: cached
     * blocks get evicted, and a itself is right again afterwards */
    int32_t c[50], refc[GEN];
    make_prompt(c, 50, 23);
    ref_greedy(c, 50, refc);
    ck_assert_int_eq(run_one(s, kv, c, 50, out), 50);
    ck_assert(!memcmp(out, refc, sizeof refc));
    ck_assert_int_lt(moe_kv_n_cached(kv), 16);
    run_one(s, kv, a, 30, out);
    ck_assert(!memcmp(out, ref, sizeof ref));
    ck_assert_int_eq(moe_kv_n_free(kv), 16);
    moe_sched_free(s);
    moe_kv_destroy(kv);
    close_model();
}
END_TEST

START_TEST(bad_arguments) {
    int32_t p[2] = {1, 2};
    ck_assert_ptr_null(moe_sched_group_new(p, 0, 1, 4, NULL));
    ck_assert_ptr_null(moe_sched_group_new(p, 2, 0, 4, NULL));
    ck_assert_ptr_null(moe_sched_group_new(NULL, 2, 1, 4, NULL));
    moe_backend b;
    moe_cpu_backend_init(&b, NULL);
    int st;
    moe_kv_cache *kv = moe_kv_create(&b, &(moe_kv_opts){.n_layer = 1, .block_size = 4, .n_blocks = 4, .k_width = 4}, &st);
    ck_assert_ptr_null(moe_sched_new(kv, &(moe_sched_opts){.max_seqs = 4, .step_tokens = 2}));
    ck_assert_ptr_null(moe_sched_new(kv, &(moe_sched_opts){.max_seqs = 0, .step_tokens = 2}));
    ck_assert_ptr_null(moe_sched_new(NULL, &(moe_sched_opts){.max_seqs = 1, .step_tokens = 2}));
    moe_sched_group *gr = moe_sched_group_new(p, 2, 1, 1, NULL);
    moe_sched *s = moe_sched_new(kv, &(moe_sched_opts){.max_seqs = 1, .step_tokens = 1});
    ck_assert_int_eq(moe_sched_append(s, &gr->seqs[0], 3), MOE_OK);
    ck_assert_int_eq(moe_sched_append(s, &gr->seqs[0], 4), MOE_EFULL);
    moe_sched_add(s, gr);
    moe_sched_free(s); /* still queued: freed scheduler leaves the group to us */
    moe_sched_group_free(gr);
    moe_kv_destroy(kv);
    moe_backend_destroy(&b);
}
END_TEST

int main(void) {
    Suite *s = suite_create("scheduler");
    TCase *tc = tcase_create("greedy");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, outputs_equal_reference_mla);
    tcase_add_test(tc, outputs_equal_reference_gqa);
    suite_add_tcase(s, tc);
    TCase *tp = tcase_create("policy");
    tcase_set_timeout(tp, 60);
    tcase_add_test(tp, decodes_not_starved);
    tcase_add_test(tp, choices_share_prompt_blocks);
    tcase_add_test(tp, never_fits_reported);
    tcase_add_test(tp, prefix_cache_reuse);
    tcase_add_test(tp, bad_arguments);
    suite_add_tcase(s, tp);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
