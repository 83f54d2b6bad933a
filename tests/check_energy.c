/* check_energy.c - energy sources and attribution (engine/energy.h): the
 * share rule, counter wrap-around, the estimate model, the meter's books,
 * source selection and its errors, and the engine end to end with a
 * scripted source that feeds exactly 1 J per step, so that each request's
 * energy is known by hand from the tokens it computed in each step. */
#include <check.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "energy.h"
#include "engine.h"
#include "status.h"

#define FIXDIR MOE_SRC_DIR "/tests/fixtures/models/"

START_TEST(share_is_proportional_and_complete) {
    /* a prefill chunk of 30, two decodes, a chunk of 8: 40 tokens, 40 J, 4 s */
    double work[4] = {30, 1, 1, 8}, j[4] = {0}, s[4] = {0};
    ck_assert_double_eq(moe_energy_share(work, 4, 40.0, 4.0, j, s), 40.0);
    double want_j[4] = {30, 1, 1, 8}, want_s[4] = {3.0, 0.1, 0.1, 0.8};
    for (int i = 0; i < 4; i++) {
        ck_assert_double_eq_tol(j[i], want_j[i], 1e-12);
        ck_assert_double_eq_tol(s[i], want_s[i], 1e-12);
    }
    /* it adds: a second step on top */
    moe_energy_share(work, 4, 40.0, 4.0, j, s);
    ck_assert_double_eq_tol(j[0], 60.0, 1e-12);
    /* no work: nothing shared, the caller books it as idle */
    double none[2] = {0, 0}, jn[2] = {0};
    ck_assert_double_eq(moe_energy_share(none, 2, 5.0, 1.0, jn, NULL), 0.0);
    ck_assert_double_eq(jn[0] + jn[1], 0.0);
}
END_TEST

START_TEST(counter_wraps) {
    ck_assert_uint_eq(moe_energy_counter_delta(100, 250, 1000), 150);
    /* 900 -> wrap at 1000 -> 50: 100 + 50 */
    ck_assert_uint_eq(moe_energy_counter_delta(900, 50, 1000), 150);
    /* a real RAPL range (2^32 uJ) */
    ck_assert_uint_eq(moe_energy_counter_delta(4294967000ull, 704, 4294967296ull), 1000);
}
END_TEST

START_TEST(estimate_is_watts_times_time) {
    moe_energy_source s;
    moe_energy_source_estimate(&s, 10.0, 100.0);
    ck_assert_str_eq(s.name, "estimate");
    double j = -1;
    uint64_t t0 = 5000000000ull;
    ck_assert_int_eq(s.read(s.ctx, t0, false, &j), MOE_OK);
    ck_assert_double_eq(j, 0.0);
    ck_assert_int_eq(s.read(s.ctx, t0 + 1000000000ull, false, &j), MOE_OK); /* 1 s idle: 10 J */
    ck_assert_double_eq_tol(j, 10.0, 1e-9);
    ck_assert_int_eq(s.read(s.ctx, t0 + 1500000000ull, true, &j), MOE_OK); /* 0.5 s busy: 50 J */
    ck_assert_double_eq_tol(j, 60.0, 1e-9);
    ck_assert_int_eq(s.read(s.ctx, t0 + 1400000000ull, true, &j), MOE_OK); /* time going back adds nothing */
    ck_assert_double_eq_tol(j, 60.0, 1e-9);
    moe_energy_source_close(&s);
    ck_assert_ptr_null(s.read);
    moe_energy_source_close(&s); /* closed twice: a no-op */
}
END_TEST

/* A scripted source: each busy read adds busy_j, each idle read idle_j.
 * With `gate` armed, an idle read blocks until the test releases it (so the
 * test can queue several requests before the engine takes any). */
typedef struct script {
    double busy_j, idle_j, total;
    int n_busy, n_idle;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool armed, blocked;
} script;

static int script_read(void *ctx, uint64_t now_ns, bool busy, double *joules) {
    (void)now_ns;
    script *c = ctx;
    pthread_mutex_lock(&c->mu);
    if (!busy && c->armed) {
        c->blocked = true;
        pthread_cond_broadcast(&c->cv);
        while (c->armed) pthread_cond_wait(&c->cv, &c->mu);
        c->blocked = false;
    }
    c->total += busy ? c->busy_j : c->idle_j;
    if (busy) c->n_busy++;
    else c->n_idle++;
    *joules = c->total;
    pthread_mutex_unlock(&c->mu);
    return MOE_OK;
}

static void script_init(script *c, double busy_j, double idle_j) {
    memset(c, 0, sizeof *c);
    c->busy_j = busy_j;
    c->idle_j = idle_j;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
}

static moe_energy_source script_source(script *c) {
    return (moe_energy_source){.name = "script", .read = script_read, .ctx = c};
}

START_TEST(meter_books_attributed_idle_and_window) {
    script c;
    script_init(&c, 2.0, 0.5);
    moe_energy_source src = script_source(&c);
    int st = -99;
    moe_energy_meter *m = moe_energy_meter_new(&src, &st);
    ck_assert_ptr_nonnull(m);
    ck_assert_int_eq(st, MOE_OK);
    ck_assert_ptr_null(src.read); /* taken over */
    ck_assert_str_eq(moe_energy_meter_source(m), "script");
    double dj, ds;
    uint64_t now = 100ull * 1000000000ull;
    moe_energy_meter_read(m, true, &dj, &ds);
    ck_assert_double_eq(dj, 2.0);
    ck_assert(ds >= 0);
    moe_energy_meter_book(m, dj, 0.25, 40, now);
    moe_energy_meter_read(m, false, &dj, &ds);
    ck_assert_double_eq(dj, 0.5);
    moe_energy_meter_book(m, dj, 1.0, 0, now);
    moe_energy_meter_read(m, true, &dj, &ds);
    moe_energy_meter_book(m, dj, 0.5, 10, now + 30ull * 1000000000ull);
    moe_energy_totals t;
    moe_energy_meter_totals(m, now + 30ull * 1000000000ull, &t);
    ck_assert_double_eq(t.joules, 4.5);
    ck_assert_double_eq(t.attributed_joules, 4.0);
    ck_assert_double_eq(t.idle_joules, 0.5);
    ck_assert_double_eq(t.attributed_seconds, 0.75);
    ck_assert_double_eq(t.idle_seconds, 1.0);
    ck_assert_uint_eq(t.attributed_tokens, 50);
    ck_assert_double_eq(t.window_joules, 4.0);
    ck_assert_uint_eq(t.window_tokens, 50);
    /* 70 s after the first step only the second is in the 60 s window */
    moe_energy_meter_totals(m, now + 70ull * 1000000000ull, &t);
    ck_assert_double_eq(t.window_joules, 2.0);
    ck_assert_uint_eq(t.window_tokens, 10);
    ck_assert_double_eq(t.window_seconds, 0.5);
    moe_energy_meter_free(m);
}
END_TEST

START_TEST(source_selection_and_errors) {
    char err[256];
    moe_energy_source s;
    ck_assert_int_eq(moe_energy_source_open(&s, &(moe_energy_opts){.source = "solar"}, err, sizeof err), MOE_EINVAL);
    ck_assert_msg(strstr(err, "energy_source") && strstr(err, "solar"), "%s", err);
    ck_assert_int_eq(moe_energy_opts_check(&(moe_energy_opts){.source = "estimate", .busy_watts = -1}, err, sizeof err),
                     MOE_EINVAL);
    ck_assert_msg(strstr(err, "energy_busy_watts"), "%s", err);
    ck_assert_int_eq(moe_energy_source_open(&s, &(moe_energy_opts){.source = "off"}, err, sizeof err), MOE_OK);
    ck_assert_ptr_null(s.read);
    ck_assert_int_eq(moe_energy_source_open(&s, &(moe_energy_opts){.source = "estimate", .busy_watts = 5}, err, sizeof err),
                     MOE_OK);
    ck_assert_str_eq(s.name, "estimate");
    moe_energy_source_close(&s);
    /* rapl: works where the counters are readable, else names the cause */
    bool rapl_ok = access("/sys/class/powercap/intel-rapl:0/energy_uj", R_OK) == 0;
    int rc = moe_energy_source_open(&s, &(moe_energy_opts){.source = "rapl"}, err, sizeof err);
    if (rapl_ok) {
        ck_assert_int_eq(rc, MOE_OK);
        ck_assert_str_eq(s.name, "rapl");
        double j0, j1;
        ck_assert_int_eq(s.read(s.ctx, 0, true, &j0), MOE_OK);
        usleep(20000);
        ck_assert_int_eq(s.read(s.ctx, 0, true, &j1), MOE_OK);
        ck_assert(j1 >= j0);
        moe_energy_source_close(&s);
    } else {
        ck_assert_int_eq(rc, MOE_EUNSUPPORTED);
        ck_assert_msg(strstr(err, "energy_source: rapl: "), "%s", err);
        ck_assert_ptr_null(s.read);
    }
    /* auto never fails: the first source that reads */
    ck_assert_int_eq(moe_energy_source_open(&s, &(moe_energy_opts){.source = "auto", .gpu = true}, err, sizeof err),
                     MOE_OK);
    ck_assert_ptr_nonnull(s.read);
    if (!rapl_ok && access("/dev/nvidia0", F_OK)) ck_assert_str_eq(s.name, "estimate");
    moe_energy_source_close(&s);
    /* nvml without a driver (or a CPU build): a clear error, not a crash */
    rc = moe_energy_source_open(&s, &(moe_energy_opts){.source = "nvml"}, err, sizeof err);
    if (rc) ck_assert_msg(strstr(err, "energy_source: nvml: "), "%s", err);
    moe_energy_source_close(&s);
}
END_TEST

/* ---- the engine with the scripted source ---- */

typedef struct col {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n_done;
    bool has_energy;
    double joules, seconds;
} col;

static void on_event(void *user, const moe_event *ev) {
    col *c = user;
    if (ev->kind != MOE_EV_DONE) return;
    pthread_mutex_lock(&c->mu);
    c->n_done++;
    c->has_energy = ev->has_energy;
    c->joules = ev->energy_joules;
    c->seconds = ev->energy_seconds;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static void col_init(col *c) {
    memset(c, 0, sizeof *c);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
}

static void col_wait(col *c) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 60;
    pthread_mutex_lock(&c->mu);
    while (!c->n_done)
        if (pthread_cond_timedwait(&c->cv, &c->mu, &ts)) break;
    pthread_mutex_unlock(&c->mu);
    ck_assert_int_eq(c->n_done, 1);
}

static moe_request req(const int32_t *prompt, int64_t n, int64_t max_tokens, col *c) {
    moe_request r = {.prompt = prompt, .n_prompt = n, .max_tokens = max_tokens, .n = 1, .on_event = on_event,
                     .user = c, .ignore_eos = true};
    moe_sampling_defaults(&r.sampling);
    r.sampling.temperature = 0;
    return r;
}

static void prompt_fill(int32_t *p, int64_t n, unsigned seed) {
    p[0] = 316; /* <s> of the fixture's vocabulary */
    for (int64_t i = 1; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (int32_t)((seed >> 16) % 316);
    }
}

static moe_engine *start(script *c) {
    moe_energy_source src = script_source(c);
    moe_engine_opts o = {.model_path = FIXDIR "deepseek2.gguf", .n_threads = 1, .kv_blocks = 64, .chat_family = -1,
                         .energy_custom = &src};
    int st = -99;
    char err[256];
    moe_engine *e = moe_engine_start(&o, &st, err, sizeof err);
    ck_assert_msg(e != NULL, "start: %s", err);
    ck_assert_ptr_null(src.read); /* taken over */
    ck_assert_int_eq(moe_engine_wait_ready(e, 20000), MOE_ENGINE_READY);
    moe_engine_info in;
    ck_assert_int_eq(moe_engine_get_info(e, &in), MOE_OK);
    ck_assert_str_eq(in.energy_source, "script");
    return e;
}

START_TEST(engine_one_request_gets_every_step) {
    script c;
    script_init(&c, 1.0, 0.0); /* 1 J per step, nothing while idle */
    moe_engine *e = start(&c);
    int32_t p[12];
    prompt_fill(p, 12, 7);
    col a;
    col_init(&a);
    moe_request r = req(p, 12, 5, &a);
    ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_OK);
    col_wait(&a);
    /* one prefill step (12 tokens, first token) + 4 decode steps */
    ck_assert(a.has_energy);
    ck_assert_double_eq_tol(a.joules, 5.0, 1e-9);
    ck_assert(a.seconds > 0);
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    ck_assert_str_eq(st.energy_source, "script");
    ck_assert_uint_eq(st.steps_total, 5);
    ck_assert_double_eq_tol(st.energy.attributed_joules, 5.0, 1e-9);
    ck_assert_double_eq_tol(st.energy.idle_joules, 0.0, 1e-12);
    ck_assert_uint_eq(st.energy.attributed_tokens, 12 + 4);
    ck_assert_double_eq_tol(st.energy.attributed_seconds, a.seconds, 1e-9);
    moe_engine_destroy(e, 1000);
}
END_TEST

START_TEST(engine_splits_a_step_by_tokens) {
    script c;
    script_init(&c, 1.0, 0.25);
    moe_engine *e = start(&c);
    /* hold the engine in an idle read so that both requests are queued
     * before it takes either: their prompts then share the first step */
    pthread_mutex_lock(&c.mu);
    c.armed = true;
    while (!c.blocked) pthread_cond_wait(&c.cv, &c.mu);
    pthread_mutex_unlock(&c.mu);
    int32_t pa[30], pb[10];
    prompt_fill(pa, 30, 1);
    prompt_fill(pb, 10, 2);
    col a, b;
    col_init(&a);
    col_init(&b);
    moe_request ra = req(pa, 30, 4, &a), rb = req(pb, 10, 2, &b);
    ck_assert_int_eq(moe_engine_submit(e, &ra, NULL, NULL, 0), MOE_OK);
    ck_assert_int_eq(moe_engine_submit(e, &rb, NULL, NULL, 0), MOE_OK);
    pthread_mutex_lock(&c.mu);
    c.armed = false;
    pthread_cond_broadcast(&c.cv);
    pthread_mutex_unlock(&c.mu);
    col_wait(&a);
    col_wait(&b);
    /* step 1: prompts 30 + 10 -> 0.75 / 0.25 J; step 2: a decode each ->
     * 0.5 / 0.5 (b is done); steps 3, 4: a alone -> 1 + 1 */
    ck_assert_double_eq_tol(a.joules, 0.75 + 0.5 + 1 + 1, 1e-9);
    ck_assert_double_eq_tol(b.joules, 0.25 + 0.5, 1e-9);
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    ck_assert_uint_eq(st.steps_total, 4);
    ck_assert_double_eq_tol(st.energy.attributed_joules, a.joules + b.joules, 1e-9);
    ck_assert_double_eq_tol(st.energy.attributed_seconds, a.seconds + b.seconds, 1e-9);
    /* everything measured is attributed or idle, and idle is what the idle
     * reads fed (0.25 J each) */
    pthread_mutex_lock(&c.mu);
    double total = c.total;
    int n_idle = c.n_idle;
    pthread_mutex_unlock(&c.mu);
    moe_engine_get_stats(e, &st);
    ck_assert_double_eq_tol(st.energy.joules, st.energy.attributed_joules + st.energy.idle_joules, 1e-9);
    ck_assert(st.energy.joules <= total + 1e-9);
    ck_assert(st.energy.idle_joules <= 0.25 * n_idle + 1e-9);
    moe_engine_destroy(e, 1000);
}
END_TEST

START_TEST(engine_off_and_bad_source) {
    moe_engine_opts o = {.model_path = FIXDIR "deepseek2.gguf", .n_threads = 1, .kv_blocks = 64, .chat_family = -1,
                         .energy_source = "wind"};
    int st = 0;
    char err[256];
    ck_assert_ptr_null(moe_engine_start(&o, &st, err, sizeof err));
    ck_assert_int_eq(st, MOE_EINVAL);
    ck_assert_msg(strstr(err, "energy_source: 'wind'"), "%s", err);
    o.energy_source = "off";
    moe_engine *e = moe_engine_start(&o, &st, err, sizeof err);
    ck_assert_ptr_nonnull(e);
    ck_assert_int_eq(moe_engine_wait_ready(e, 20000), MOE_ENGINE_READY);
    moe_engine_info in;
    ck_assert_int_eq(moe_engine_get_info(e, &in), MOE_OK);
    ck_assert_ptr_null(in.energy_source);
    int32_t p[4];
    prompt_fill(p, 4, 3);
    col a;
    col_init(&a);
    moe_request r = req(p, 4, 2, &a);
    ck_assert_int_eq(moe_engine_submit(e, &r, NULL, NULL, 0), MOE_OK);
    col_wait(&a);
    ck_assert(!a.has_energy);
    moe_engine_destroy(e, 1000);
}
END_TEST

int main(void) {
    Suite *s = suite_create("energy");
    TCase *tu = tcase_create("attribution");
    tcase_add_test(tu, share_is_proportional_and_complete);
    tcase_add_test(tu, counter_wraps);
    tcase_add_test(tu, estimate_is_watts_times_time);
    tcase_add_test(tu, meter_books_attributed_idle_and_window);
    suite_add_tcase(s, tu);
    TCase *tsrc = tcase_create("sources");
    tcase_add_test(tsrc, source_selection_and_errors);
    suite_add_tcase(s, tsrc);
    TCase *te = tcase_create("engine");
    tcase_set_timeout(te, 120);
    tcase_add_test(te, engine_one_request_gets_every_step);
    tcase_add_test(te, engine_splits_a_step_by_tokens);
    tcase_add_test(te, engine_off_and_bad_source);
    suite_add_tcase(s, te);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
