/* engine.c - the engine thread: model load, request intake, the step loop
 * (scheduler -> one forward pass -> sampler -> events), cancellation,
 * statistics. See engine.h for the contract, scheduler.h for batching and
 * sampler.h for the token choice.
 *
 * Locking: e->mu guards the intake queue, the registry of live requests
 * (so moe_engine_cancel can find one by id), the statistics and the
 * state transitions. Everything else (model, KV cache, scheduler, the
 * requests once taken) belongs to the engine thread, which never holds
 * e->mu while it runs a forward pass or calls on_event.
 *
 * A step: take new requests and cancellations; moe_sched_step() plans the
 * batch (decodes, prefill chunks, admissions, preemption, prefix-cache
 * reuse); one moe_fwd_run(); moe_sched_commit(); every logits row is
 * sampled (on a small thread pool for large vocabularies, each choice with
 * its own RNG, so the result does not depend on the thread count); then,
 * in row order, each token is detokenized, matched against stop strings
 * and emitted, and finished requests get their DONE.
 *
 * Token accounting: an EOS/EOT that ends a choice is counted in its
 * completion_tokens (it was generated, as vLLM counts it) but gets no
 * TOKEN event, because it is not rendered. prompt_tokens_total counts
 * positions actually computed: prefix-cache hits are not, recomputation
 * after preemption is.
 *
 * Defaults: ctx_size is the model's context_length capped at
 * MOE_DEFAULT_CTX_CAP and at what the KV cache holds (a sequence must
 * always fit alone, or preemption could not guarantee progress);
 * kv_blocks comes from kv_mem_mb
 * at (k_width + v_width) * n_layer * 4 bytes per position.
 */
#include "engine.h"
#ifdef MOE_HAVE_CUDA
#include "cuda_backend.h"
#endif

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "finite.h"
#include "forward.h"
#include "kvcache.h"
#include "model.h"
#include "sampler.h"
#include "scheduler.h"
#include "threadpool.h"

#define IDLE_WAIT_NS 100000000ull /* 100 ms: the heartbeat keeps ticking while idle */
#define SAMPLE_THREADS_MAX 8      /* sampling threads (each has ~17 bytes x n_vocab of scratch) */
#define SAMPLE_PAR_VOCAB 8192     /* smaller vocabularies sample inline: a row costs microseconds */

uint64_t moe_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void moe_sampling_defaults(moe_sampling *s) {
    if (!s) return;
    memset(s, 0, sizeof(*s));
    s->temperature = 1.0f;
    s->top_p = 1.0f;
    s->repetition_penalty = 1.0f;
}

typedef struct eng_req eng_req;

/* One sampled logits row (filled in parallel, consumed in order). */
typedef struct row_out {
    int rc; /* MOE_OK, a sampler error, MOE_ENONFINITE (id: the first bad logit), or 1: skipped */
    int32_t id;
    float logprob;
    moe_logprob top[MOE_MAX_TOP_LOGPROBS];
} row_out;

typedef struct eng_choice {
    eng_req *r;
    int32_t index;
    moe_rng rng;
    moe_tok_stream *ts;
    char *hold; /* (hold_cap) text not yet emitted: it may start a stop string */
    size_t hold_len, hold_cap;
    int64_t n_gen;
    bool finished;
} eng_choice;

struct eng_req {
    uint64_t id;
    int64_t n_prompt, max_tokens;
    int32_t n;
    moe_sampling samp; /* its bias arrays point at bias_ids / bias below */
    int32_t *bias_ids;
    float *bias;
    bool logprobs, ignore_eos;
    int32_t top_logprobs;
    char **stop; /* (n_stop) NUL-terminated copies */
    size_t *stop_len;
    int32_t n_stop;
    void (*on_event)(void *user, const moe_event *ev);
    void *user;
    uint64_t t_submit;
    moe_sched_group *g;
    eng_choice *ch; /* (n) */
    int32_t n_finished;
    int64_t completion_total;
    atomic_bool cancel;
    bool in_sched;
    char fail[160]; /* set when the request failed this step: ERROR follows */
    double energy_j, energy_s; /* attributed so far (energy.h) */
    eng_req *reg_prev, *reg_next; /* registry, under e->mu */
    eng_req *in_next;             /* intake queue, under e->mu */
    eng_req *act_prev, *act_next; /* engine thread's list */
};

struct moe_engine {
    moe_engine_opts o;
    char *model_path, *device_opt, *energy_opt;
    pthread_t th;
    bool th_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;       /* wakes the engine thread */
    pthread_cond_t cv_state; /* state changes and "no more requests", for waiters */
    _Atomic int state;
    char err[MOE_ERR_MAX + 128];

    /* under mu */
    eng_req *reg;
    eng_req *in_head, *in_tail;
    int64_t n_in;
    int64_t sched_waiting;
    int64_t n_live; /* submitted and not yet DONE */
    bool quit, cancel_all;
    uint64_t next_id;
    moe_engine_stats st;

    /* engine thread (info is read-only once READY) */
    moe_model *model;
    moe_tok *tok;
    moe_chat_template chat;
    bool chat_ok;
    moe_backend be;
    bool be_ok;
    moe_fwd *fw;
    moe_kv_cache *kv;
    moe_sched *sched;
    cpu_pool *spool;    /* rows of a step are sampled in parallel (NULL: inline) */
    moe_sampler **sms;  /* (n_sms) one scratch per sampling thread */
    int n_sms;
    float *logits;      /* (max_seqs, n_vocab) */
    struct row_out *ro; /* (max_seqs) this step's sampled rows */
    moe_energy_source custom_src; /* opts.energy_custom, taken over at start */
    moe_energy_meter *meter;      /* NULL: energy accounting off */
    eng_req **ew_req;   /* (max_seqs) the requests of this step ... */
    double *ew_work;    /* (max_seqs) ... the tokens each computes in it ... */
    double *ew_j, *ew_s;/* (max_seqs) ... and their shares of the step */
    int64_t ew_n;
    eng_req *act;
    moe_engine_info info;
    char model_id[256];
    char arch[64];
    const char *device_name;
};

static void set_status(moe_engine *e, const char *s) {
    if (e->o.on_status) e->o.on_status(e->o.status_user, s);
}

static void fail_load(moe_engine *e, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->err, sizeof e->err, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&e->mu);
    atomic_store(&e->state, MOE_ENGINE_FAILED);
    pthread_cond_broadcast(&e->cv_state);
    pthread_mutex_unlock(&e->mu);
}

static int select_backend(moe_engine *e, moe_backend *be, char *err, size_t errsz) {
    return moe_backend_create(e->device_opt, e->o.n_threads, be, &e->device_name, err, errsz);
}

/* After each layer of a forward pass: a step of many seconds (a long
 * prefill on a CPU) still ticks the heartbeat that /health and the
 * systemd watchdog read, which then only go stale when a layer hangs. */
static void layer_tick(void *arg) {
    moe_engine *e = arg;
    uint64_t now = moe_now_ns();
    pthread_mutex_lock(&e->mu);
    e->st.heartbeat_ns = now;
    pthread_mutex_unlock(&e->mu);
}

/* Opens the energy source and its meter (none when energy_source is "off"). */
static int energy_open(moe_engine *e) {
    moe_energy_source src;
    char err[256] = "";
    int st;
    if (e->custom_src.read) {
        src = e->custom_src;
        memset(&e->custom_src, 0, sizeof e->custom_src);
    } else {
        moe_energy_opts eo = {.source = e->o.energy_source, .idle_watts = e->o.energy_idle_watts,
                              .busy_watts = e->o.energy_busy_watts,
                              .gpu = e->device_name && !strcmp(e->device_name, "cuda")};
        if ((st = moe_energy_source_open(&src, &eo, err, sizeof err))) {
            fail_load(e, "%s", err);
            return st;
        }
        if (!src.read) return MOE_OK; /* off */
    }
    const char *name = src.name ? src.name : "?";
    e->meter = moe_energy_meter_new(&src, &st);
    if (!e->meter) {
        fail_load(e, "energy_source: %s: the first reading failed (%s)", name, moe_strerror(st));
        return st;
    }
    return MOE_OK;
}

static int load(moe_engine *e) {
    int st = 0;
    char err[MOE_ERR_MAX] = "";
    set_status(e, "mapping");
    e->model = moe_model_load(e->model_path, &st, err, sizeof err);
    if (!e->model) {
        fail_load(e, "%s: %s (%s)", e->model_path, err, moe_strerror(st));
        return st;
    }
    const moe_gguf *g = moe_model_gguf(e->model);
    e->tok = moe_tok_load(g, &st, err, sizeof err);
    if (!e->tok) {
        fail_load(e, "%s: tokenizer: %s (%s)", e->model_path, err, moe_strerror(st));
        return st;
    }
    moe_chat_family force = e->o.chat_family < 0 ? MOE_CHAT_AUTO : (moe_chat_family)e->o.chat_family;
    if ((st = moe_chat_template_from_model(&e->chat, g, e->tok, force))) {
        fail_load(e, "chat template: %s", moe_strerror(st));
        return st;
    }
    e->chat_ok = true;
    if ((st = select_backend(e, &e->be, err, sizeof err))) {
        fail_load(e, "%s", err);
        return st;
    }
    e->be_ok = true;
    set_status(e, "binding weights");
    e->fw = moe_fwd_create(e->model, &e->be, &st, err, sizeof err);
    if (!e->fw) {
        fail_load(e, "%s: %s (%s)", e->model_path, err, moe_strerror(st));
        return st;
    }
    moe_fwd_set_layer_cb(e->fw, layer_tick, e);
    int64_t n_vocab = moe_fwd_n_vocab(e->fw);
    int64_t bs = e->o.block_size > 0 ? e->o.block_size : MOE_DEFAULT_BLOCK_SIZE;
    int64_t ctx = e->o.ctx_size;
    if (ctx <= 0) {
        ctx = moe_fwd_ctx_len(e->fw);
        if (ctx <= 0 || ctx > MOE_DEFAULT_CTX_CAP) ctx = MOE_DEFAULT_CTX_CAP;
    }
    moe_kv_opts ko;
    moe_fwd_kv_opts(e->fw, bs, 1, &ko);
    int64_t n_blocks = e->o.kv_blocks;
    if (n_blocks <= 0) {
        int64_t mb = e->o.kv_mem_mb > 0 ? e->o.kv_mem_mb : MOE_DEFAULT_KV_MEM_MB;
        double slot = (double)(ko.k_width + ko.v_width) * (double)ko.n_layer * 4.0;
        double nb = (double)mb * 1048576.0 / (slot * (double)bs);
        n_blocks = nb > (double)INT32_MAX ? INT32_MAX : (int64_t)nb;
        if (n_blocks < 1) n_blocks = 1;
    }
    /* one sequence must always fit alone, or preemption could not help it */
    if (ctx > n_blocks * bs) ctx = n_blocks * bs;
    ko.n_blocks = n_blocks;
    set_status(e, "allocating the KV cache");
    e->kv = moe_kv_create(&e->be, &ko, &st);
    if (!e->kv) {
        fail_load(e, "KV cache of %lld blocks x %lld positions: %s", (long long)n_blocks, (long long)bs,
                  moe_strerror(st));
        return st;
    }
    int64_t max_seqs = e->o.max_seqs > 0 ? e->o.max_seqs : MOE_DEFAULT_MAX_SEQS;
    int64_t step = e->o.step_tokens > 0 ? e->o.step_tokens : MOE_DEFAULT_STEP_TOKENS;
    if (step < max_seqs) step = max_seqs; /* every running decode fits one step */
    e->sched = moe_sched_new(e->kv, &(moe_sched_opts){.max_seqs = max_seqs, .step_tokens = step, .prefix_cache = true});
    /* sampling threads: the backend's count, capped (scratch per thread) */
    int nt = e->o.n_threads > 0 ? e->o.n_threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    nt = nt < 1 ? 1 : nt > SAMPLE_THREADS_MAX ? SAMPLE_THREADS_MAX : nt;
    if (n_vocab < SAMPLE_PAR_VOCAB || max_seqs < 2) nt = 1;
    if (nt > 1) e->spool = cpu_pool_create(nt, NULL); /* without it sampling runs inline */
    e->n_sms = e->spool ? cpu_pool_size(e->spool) : 1;
    e->sms = calloc((size_t)e->n_sms, sizeof(moe_sampler *));
    for (int i = 0; e->sms && i < e->n_sms; i++)
        if (!(e->sms[i] = moe_sampler_new(n_vocab))) {
            fail_load(e, "sampler buffers: %s", moe_strerror(MOE_ENOMEM));
            return MOE_ENOMEM;
        }
    e->logits = malloc((size_t)max_seqs * (size_t)n_vocab * sizeof(float));
    e->ro = malloc((size_t)max_seqs * sizeof(row_out));
    if (!e->sched || !e->sms || !e->logits || !e->ro) {
        fail_load(e, "scheduler buffers: %s", moe_strerror(MOE_ENOMEM));
        return MOE_ENOMEM;
    }
    /* one token through the model: pages the mapped weights in and proves
     * the backend works before the first request waits on either */
    set_status(e, "warming up");
    moe_kv_seq ws = {0};
    int32_t wid = moe_tok_bos(e->tok) >= 0 && moe_tok_bos(e->tok) < n_vocab ? moe_tok_bos(e->tok) : 0, wpos = 0, wsq = 0;
    st = moe_kv_seq_reserve(e->kv, &ws, 1);
    if (!st) {
        moe_batch wb = {.n_tok = 1, .ids = &wid, .pos = &wpos, .seq = &wsq, .n_seq = 1, .seqs = &ws};
        st = moe_fwd_run(e->fw, e->kv, &wb, e->logits);
    }
    moe_kv_seq_release(e->kv, &ws);
    if (st) {
        fail_load(e, "warm-up forward pass: %s", moe_strerror(st));
        return st;
    }
    /* a model whose first token already gives NaN/Inf would fail every
     * request: refuse it now, naming the cause */
    int64_t bad = moe_nonfinite_find(e->logits, n_vocab);
    if (bad >= 0) {
        fail_load(e, "warm-up forward pass: non-finite logits (%s at token id %lld) for token %d at position 0; "
                     "the weights hold NaN/Inf or overflow (moed info --check finds NaN/Inf tensors)",
                  moe_nonfinite_kind(e->logits[bad]), (long long)bad, wid);
        return MOE_ENONFINITE;
    }
    /* energy last, so the load and warm-up are not in the first interval
     * of a run (the meter's first read is its origin) */
    if ((st = energy_open(e))) return st;
    e->ew_req = calloc((size_t)max_seqs, sizeof *e->ew_req);
    e->ew_work = calloc((size_t)max_seqs, sizeof *e->ew_work);
    e->ew_j = calloc((size_t)max_seqs, sizeof *e->ew_j);
    e->ew_s = calloc((size_t)max_seqs, sizeof *e->ew_s);
    if (!e->ew_req || !e->ew_work || !e->ew_j || !e->ew_s) {
        fail_load(e, "energy buffers: %s", moe_strerror(MOE_ENOMEM));
        return MOE_ENOMEM;
    }
    const char *base = strrchr(e->model_path, '/');
    base = base ? base + 1 : e->model_path;
    snprintf(e->model_id, sizeof e->model_id, "%s", base);
    size_t ml = strlen(e->model_id);
    if (ml > 5 && !strcmp(e->model_id + ml - 5, ".gguf")) e->model_id[ml - 5] = 0;
    snprintf(e->arch, sizeof e->arch, "%s", moe_model_arch_str(e->model));
    e->info = (moe_engine_info){.model_id = e->model_id, .arch = e->arch, .device = e->device_name,
                                .n_vocab = n_vocab, .ctx_size = ctx, .max_seqs = max_seqs,
                                .kv_blocks = n_blocks, .block_size = bs,
                                .n_params = moe_model_n_params(e->model), .tok = e->tok, .chat = &e->chat,
                                .energy_source = moe_energy_meter_source(e->meter)};
    pthread_mutex_lock(&e->mu);
    e->st.kv_blocks_total = n_blocks;
    e->st.energy_source = e->info.energy_source;
    atomic_store(&e->state, MOE_ENGINE_READY);
    pthread_cond_broadcast(&e->cv_state);
    pthread_mutex_unlock(&e->mu);
    return MOE_OK;
}

/* ---- requests ---- */

static void req_free(eng_req *r) {
    if (!r) return;
    for (int32_t i = 0; r->ch && i < r->n; i++) {
        moe_tok_stream_free(r->ch[i].ts);
        free(r->ch[i].hold);
    }
    free(r->ch);
    for (int32_t i = 0; r->stop && i < r->n_stop; i++) free(r->stop[i]);
    free(r->stop);
    free(r->stop_len);
    free(r->bias_ids);
    free(r->bias);
    moe_sched_group_free(r->g);
    free(r);
}

static void emit(eng_req *r, moe_event *ev) {
    ev->req_id = r->id;
    ev->t_submit_ns = r->t_submit;
    ev->t_now_ns = moe_now_ns();
    ev->prompt_tokens = r->n_prompt;
    r->on_event(r->user, ev);
}

/* Delivers DONE, unlinks r everywhere and frees it. */
static void req_done(moe_engine *e, eng_req *r) {
    if (r->in_sched) moe_sched_remove(e->sched, r->g);
    r->in_sched = false;
    if (r->act_prev) r->act_prev->act_next = r->act_next;
    else if (e->act == r) e->act = r->act_next;
    if (r->act_next) r->act_next->act_prev = r->act_prev;
    /* out of the registry before DONE: once the caller sees DONE it may
     * forget the id, and a late cancel must not find freed memory */
    moe_sched_counts sc;
    moe_sched_get_counts(e->sched, &sc);
    pthread_mutex_lock(&e->mu);
    if (r->reg_prev) r->reg_prev->reg_next = r->reg_next;
    else e->reg = r->reg_next;
    if (r->reg_next) r->reg_next->reg_prev = r->reg_prev;
    e->st.requests_finished_total++;
    /* stats already show the request gone when its DONE arrives */
    if (e->kv) {
        e->sched_waiting = sc.groups_waiting;
        e->st.requests_running = sc.groups_running;
        e->st.requests_waiting = e->n_in + sc.groups_waiting;
        e->st.seqs_running = sc.seqs_running;
        e->st.kv_blocks_used = e->st.kv_blocks_total - moe_kv_n_free(e->kv);
    }
    pthread_mutex_unlock(&e->mu);
    moe_event ev = {.kind = MOE_EV_DONE, .completion_tokens = r->completion_total, .has_energy = e->meter != NULL,
                    .energy_joules = r->energy_j, .energy_seconds = r->energy_s};
    emit(r, &ev);
    req_free(r);
    pthread_mutex_lock(&e->mu);
    e->n_live--;
    if (!e->n_live) pthread_cond_broadcast(&e->cv_state);
    pthread_mutex_unlock(&e->mu);
}

static void req_error(moe_engine *e, eng_req *r, const char *msg) {
    moe_event ev = {.kind = MOE_EV_ERROR, .text = msg, .text_len = strlen(msg)};
    emit(r, &ev);
    req_done(e, r);
}

/* Appends text to the choice's hold buffer. */
static int hold_add(eng_choice *c, const char *s, size_t n) {
    if (!n) return MOE_OK;
    if (c->hold_len + n + 1 > c->hold_cap) {
        size_t cap = c->hold_cap ? c->hold_cap : 64;
        while (cap < c->hold_len + n + 1) cap *= 2;
        char *nh = realloc(c->hold, cap);
        if (!nh) return MOE_ENOMEM;
        c->hold = nh;
        c->hold_cap = cap;
    }
    memcpy(c->hold + c->hold_len, s, n);
    c->hold_len += n;
    c->hold[c->hold_len] = 0;
    return MOE_OK;
}

/* Scans the hold buffer for stop strings. Returns true when one matched
 * (*emit_len = the text before it, *which = its index: the earliest in the
 * text, the first listed on a tie); else *emit_len is the longest prefix
 * that cannot be the start of a stop string (final: everything). */
static bool stop_scan(const eng_req *r, const eng_choice *c, bool final, size_t *emit_len, int32_t *which) {
    const char *h = c->hold;
    size_t n = c->hold_len, first = n;
    bool hit = false;
    *which = -1;
    for (int32_t i = 0; i < r->n_stop; i++) {
        if (r->stop_len[i] > n) continue;
        const char *p = memmem(h, n, r->stop[i], r->stop_len[i]);
        if (p && (size_t)(p - h) < first) {
            first = (size_t)(p - h);
            hit = true;
            *which = i;
        }
    }
    if (hit || final) {
        *emit_len = first;
        return hit;
    }
    /* the longest suffix of h that is a proper prefix of some stop string */
    size_t keep = 0;
    for (int32_t i = 0; i < r->n_stop; i++) {
        size_t sl = r->stop_len[i], kmax = sl - 1 < n ? sl - 1 : n;
        for (size_t k = kmax; k > keep; k--)
            if (h[n - k] == r->stop[i][0] && !memcmp(h + n - k, r->stop[i], k)) {
                keep = k;
                break;
            }
    }
    *emit_len = n - keep;
    return false;
}

static void hold_drop(eng_choice *c, size_t n) {
    if (!c->hold) return;
    memmove(c->hold, c->hold + n, c->hold_len - n);
    c->hold_len -= n;
    c->hold[c->hold_len] = 0;
}

/* Ends choice c with `why`; text still held back is flushed (minus a stop
 * string) with the FINISH event. stop_hit: the index of the stop string
 * that already matched, or -1. */
static void choice_finish(moe_engine *e, eng_choice *c, moe_finish why, int32_t stop_hit) {
    eng_req *r = c->r;
    size_t len = 0;
    if (stop_hit < 0 && why != MOE_FINISH_CANCELLED) {
        const char *d = NULL;
        size_t dl = 0;
        if (c->ts && !moe_tok_stream_flush(c->ts, &d, &dl)) hold_add(c, d, dl);
        if (stop_scan(r, c, true, &len, &stop_hit)) why = MOE_FINISH_STOP;
    }
    moe_event ev = {.kind = MOE_EV_FINISH, .index = c->index, .finish = why, .completion_tokens = c->n_gen,
                    .text = c->hold ? c->hold : "", .text_len = len, .token = -1, .stop_index = stop_hit};
    c->finished = true;
    r->n_finished++;
    r->completion_total += c->n_gen;
    moe_sched_finish(e->sched, &r->g->seqs[c->index]);
    emit(r, &ev);
    c->hold_len = 0;
}

/* Cancels every unfinished choice of r and delivers DONE. */
static void req_cancel(moe_engine *e, eng_req *r) {
    for (int32_t i = 0; i < r->n; i++)
        if (!r->ch[i].finished) choice_finish(e, &r->ch[i], MOE_FINISH_CANCELLED, -1);
    req_done(e, r);
}

/* A sampled token: render it, match stop strings, emit, check the limits. */
static void choice_token(moe_engine *e, eng_choice *c, moe_sched_seq *q, int32_t id, const row_out *ro) {
    eng_req *r = c->r;
    c->n_gen++;
    moe_sched_append(e->sched, q, id);
    if (!r->ignore_eos && moe_tok_is_eog(e->tok, id)) {
        choice_finish(e, c, MOE_FINISH_STOP, -1);
        return;
    }
    moe_event ev = {.kind = MOE_EV_TOKEN, .index = c->index, .token = id};
    if (r->logprobs || r->top_logprobs > 0) {
        ev.logprob = ro->logprob;
        ev.top = ro->top;
        ev.n_top = r->top_logprobs;
    }
    const char *d = NULL;
    size_t dl = 0;
    if (c->ts && id < moe_tok_n_vocab(e->tok) && !moe_tok_stream_feed(c->ts, id, &d, &dl)) hold_add(c, d, dl);
    size_t len = 0;
    int32_t which;
    bool hit = stop_scan(r, c, false, &len, &which);
    ev.text = c->hold ? c->hold : "";
    ev.text_len = len;
    emit(r, &ev);
    if (hit) {
        c->hold_len = 0;
        choice_finish(e, c, MOE_FINISH_STOP, which);
        return;
    }
    hold_drop(c, len);
    if (c->n_gen >= r->max_tokens || q->n_tok >= e->info.ctx_size) choice_finish(e, c, MOE_FINISH_LENGTH, -1);
}

/* ---- submit / cancel / state ---- */

#define BAD(code, ...) return moe_seterr(err, errsz, (code), __VA_ARGS__)

static int validate(const moe_engine *e, const moe_request *q, char *err, size_t errsz) {
    const moe_engine_info *in = &e->info;
    if (!q) BAD(MOE_EINVAL, "request: NULL");
    if (!q->on_event) BAD(MOE_EINVAL, "on_event: a callback is required");
    if (q->n_prompt < 1 || !q->prompt) BAD(MOE_EINVAL, "prompt: at least one token is required");
    for (int64_t i = 0; i < q->n_prompt; i++)
        if (q->prompt[i] < 0 || q->prompt[i] >= in->n_vocab)
            BAD(MOE_ERANGE, "prompt: token id %d at position %lld is outside the vocabulary (0..%lld)", q->prompt[i],
                (long long)i, (long long)in->n_vocab - 1);
    if (q->max_tokens < 1) BAD(MOE_ERANGE, "max_tokens: must be at least 1 (got %lld)", (long long)q->max_tokens);
    if (q->n_prompt > in->ctx_size || q->max_tokens > in->ctx_size - q->n_prompt)
        BAD(MOE_ERANGE, "max_tokens: prompt (%lld) + max_tokens (%lld) exceeds the context size %lld",
            (long long)q->n_prompt, (long long)q->max_tokens, (long long)in->ctx_size);
    if (q->n < 1 || q->n > in->max_seqs)
        BAD(MOE_ERANGE, "n: %d is outside 1..%lld", q->n, (long long)in->max_seqs);
    const moe_sampling *s = &q->sampling;
    if (!(s->temperature >= 0 && s->temperature <= 2))
        BAD(MOE_ERANGE, "temperature: %g is outside 0..2", (double)s->temperature);
    if (!(s->top_p > 0 && s->top_p <= 1)) BAD(MOE_ERANGE, "top_p: %g is outside (0, 1]", (double)s->top_p);
    if (!(s->min_p >= 0 && s->min_p <= 1)) BAD(MOE_ERANGE, "min_p: %g is outside 0..1", (double)s->min_p);
    if (!(s->presence_penalty >= -2 && s->presence_penalty <= 2))
        BAD(MOE_ERANGE, "presence_penalty: %g is outside -2..2", (double)s->presence_penalty);
    if (!(s->frequency_penalty >= -2 && s->frequency_penalty <= 2))
        BAD(MOE_ERANGE, "frequency_penalty: %g is outside -2..2", (double)s->frequency_penalty);
    if (!(s->repetition_penalty > 0 && isfinite(s->repetition_penalty)))
        BAD(MOE_ERANGE, "repetition_penalty: %g must be > 0", (double)s->repetition_penalty);
    if (s->n_logit_bias < 0) BAD(MOE_EINVAL, "logit_bias: negative count");
    if (s->n_logit_bias > 0 && (!s->logit_bias_ids || !s->logit_bias)) BAD(MOE_EINVAL, "logit_bias: NULL arrays");
    for (int32_t i = 0; i < s->n_logit_bias; i++) {
        if (s->logit_bias_ids[i] < 0 || s->logit_bias_ids[i] >= in->n_vocab)
            BAD(MOE_ERANGE, "logit_bias: token id %d is outside the vocabulary (0..%lld)", s->logit_bias_ids[i],
                (long long)in->n_vocab - 1);
        if (!(s->logit_bias[i] >= -100 && s->logit_bias[i] <= 100))
            BAD(MOE_ERANGE, "logit_bias: bias %g for token %d is outside -100..100", (double)s->logit_bias[i],
                s->logit_bias_ids[i]);
    }
    if (q->top_logprobs < 0 || q->top_logprobs > MOE_MAX_TOP_LOGPROBS)
        BAD(MOE_ERANGE, "top_logprobs: %d is outside 0..%d", q->top_logprobs, MOE_MAX_TOP_LOGPROBS);
    if (q->top_logprobs > in->n_vocab)
        BAD(MOE_ERANGE, "top_logprobs: %d exceeds the vocabulary size", q->top_logprobs);
    if (q->n_stop < 0 || q->n_stop > MOE_MAX_STOP)
        BAD(MOE_ERANGE, "stop: %d strings, at most %d allowed", q->n_stop, MOE_MAX_STOP);
    if (q->n_stop > 0 && !q->stop) BAD(MOE_EINVAL, "stop: NULL array");
    for (int32_t i = 0; i < q->n_stop; i++) {
        if (!q->stop[i]) BAD(MOE_EINVAL, "stop[%d]: NULL", i);
        size_t l = strnlen(q->stop[i], MOE_MAX_STOP_LEN + 1);
        if (!l) BAD(MOE_EINVAL, "stop[%d]: empty string", i);
        if (l > MOE_MAX_STOP_LEN) BAD(MOE_ERANGE, "stop[%d]: longer than %d bytes", i, MOE_MAX_STOP_LEN);
    }
    return MOE_OK;
}

static eng_req *req_new(moe_engine *e, const moe_request *q) {
    eng_req *r = calloc(1, sizeof(*r));
    if (!r) return NULL;
    r->n_prompt = q->n_prompt;
    r->max_tokens = q->max_tokens;
    r->n = q->n;
    r->samp = q->sampling;
    r->logprobs = q->logprobs;
    r->ignore_eos = q->ignore_eos;
    r->top_logprobs = q->top_logprobs;
    r->on_event = q->on_event;
    r->user = q->user;
    r->t_submit = moe_now_ns();
    atomic_init(&r->cancel, false);
    int32_t nb = q->sampling.n_logit_bias;
    if (nb > 0) {
        r->bias_ids = malloc((size_t)nb * sizeof(int32_t));
        r->bias = malloc((size_t)nb * sizeof(float));
        if (!r->bias_ids || !r->bias) goto fail;
        memcpy(r->bias_ids, q->sampling.logit_bias_ids, (size_t)nb * sizeof(int32_t));
        memcpy(r->bias, q->sampling.logit_bias, (size_t)nb * sizeof(float));
    }
    r->samp.logit_bias_ids = r->bias_ids;
    r->samp.logit_bias = r->bias;
    if (q->n_stop > 0) {
        r->stop = calloc((size_t)q->n_stop, sizeof(char *));
        r->stop_len = calloc((size_t)q->n_stop, sizeof(size_t));
        if (!r->stop || !r->stop_len) goto fail;
        r->n_stop = q->n_stop;
        for (int32_t i = 0; i < q->n_stop; i++) {
            r->stop_len[i] = strlen(q->stop[i]);
            r->stop[i] = strdup(q->stop[i]);
            if (!r->stop[i]) goto fail;
        }
    }
    r->ch = calloc((size_t)q->n, sizeof(eng_choice));
    if (!r->ch) goto fail;
    uint64_t seed = q->sampling.has_seed ? q->sampling.seed : moe_rng_os_seed();
    for (int32_t i = 0; i < q->n; i++) {
        eng_choice *c = &r->ch[i];
        c->r = r;
        c->index = i;
        moe_rng_seed(&c->rng, seed + (uint64_t)i);
        c->ts = moe_tok_stream_new(e->tok, false);
        if (!c->ts) goto fail;
    }
    r->g = moe_sched_group_new(q->prompt, q->n_prompt, q->n, q->max_tokens, r);
    if (!r->g) goto fail;
    for (int32_t i = 0; i < q->n; i++) r->g->seqs[i].user = &r->ch[i];
    return r;
fail:
    req_free(r);
    return NULL;
}

int moe_engine_submit(moe_engine *e, const moe_request *req, uint64_t *id, char *err, size_t errsz) {
    if (err && errsz) err[0] = 0;
    if (!e) BAD(MOE_EINVAL, "engine: NULL");
    int s = atomic_load(&e->state);
    if (s != MOE_ENGINE_READY)
        BAD(MOE_ESTATE, "the engine is not accepting requests (%s)",
            s == MOE_ENGINE_LOADING ? "loading" : s == MOE_ENGINE_FAILED ? "failed" : "draining or stopped");
    int rc = validate(e, req, err, errsz);
    if (rc) return rc;
    eng_req *r = req_new(e, req);
    if (!r) BAD(MOE_ENOMEM, "out of memory for the request");
    int64_t limit = e->o.queue_limit > 0 ? e->o.queue_limit : MOE_DEFAULT_QUEUE_LIMIT;
    pthread_mutex_lock(&e->mu);
    if (atomic_load(&e->state) != MOE_ENGINE_READY || e->quit) {
        pthread_mutex_unlock(&e->mu);
        req_free(r);
        BAD(MOE_ESTATE, "the engine is not accepting requests (draining or stopped)");
    }
    if (e->n_in + e->sched_waiting >= limit) {
        pthread_mutex_unlock(&e->mu);
        req_free(r);
        BAD(MOE_EFULL, "queue full: %lld requests waiting", (long long)limit);
    }
    r->id = ++e->next_id;
    r->reg_next = e->reg;
    if (e->reg) e->reg->reg_prev = r;
    e->reg = r;
    if (e->in_tail) e->in_tail->in_next = r;
    else e->in_head = r;
    e->in_tail = r;
    e->n_in++;
    e->n_live++;
    e->st.requests_waiting = e->n_in + e->sched_waiting;
    if (id) *id = r->id;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return MOE_OK;
}

void moe_engine_cancel(moe_engine *e, uint64_t id) {
    if (!e) return;
    pthread_mutex_lock(&e->mu);
    for (eng_req *r = e->reg; r; r = r->reg_next)
        if (r->id == id) {
            atomic_store(&r->cancel, true);
            pthread_cond_signal(&e->cv);
            break;
        }
    pthread_mutex_unlock(&e->mu);
}

/* ---- the engine thread ---- */

static void publish_stats(moe_engine *e, const moe_sched_batch *sb, bool stepped) {
    moe_sched_counts sc;
    moe_sched_get_counts(e->sched, &sc);
    pthread_mutex_lock(&e->mu);
    moe_engine_stats *st = &e->st;
    e->sched_waiting = sc.groups_waiting;
    st->requests_running = sc.groups_running;
    st->requests_waiting = e->n_in + sc.groups_waiting;
    st->seqs_running = sc.seqs_running;
    st->kv_blocks_used = st->kv_blocks_total - moe_kv_n_free(e->kv);
    st->preemptions_total = sc.preemptions;
    if (stepped) {
        st->steps_total++;
        st->prompt_tokens_total += (uint64_t)sb->n_prefill;
        st->generation_tokens_total += (uint64_t)sb->n_rows;
        st->last_batch_seqs = sb->b.n_seq;
        st->last_batch_tokens = sb->b.n_tok;
        int k = 0;
        while (k < 8 && sb->b.n_seq > (1 << k)) k++;
        st->batch_hist[k]++;
        st->batch_seqs_total += (uint64_t)sb->b.n_seq;
    }
    st->heartbeat_ns = moe_now_ns();
    pthread_mutex_unlock(&e->mu);
}

/* Delivers what the step decided: ERROR + DONE for failed requests, DONE
 * for those whose choices all finished. Done after the step's loops so
 * that no loop touches a freed request. */
static void finalize(moe_engine *e) {
    for (eng_req *r = e->act, *nx; r; r = nx) {
        nx = r->act_next;
        if (r->fail[0]) req_error(e, r, r->fail);
        else if (r->n_finished == r->n) req_done(e, r);
    }
}

typedef struct sample_job {
    moe_engine *e;
    const moe_sched_batch *sb;
} sample_job;

/* Samples logits row k (a pool task: it touches only row k's choice, its
 * RNG and this thread's scratch). */
static void sample_task(void *ctx, int64_t k, int thread) {
    sample_job *j = ctx;
    moe_engine *e = j->e;
    moe_sched_seq *q = j->sb->rows[k];
    eng_choice *c = q->user;
    eng_req *r = c->r;
    row_out *ro = &e->ro[k];
    ro->rc = 1;
    if (c->finished || r->fail[0]) return;
    const float *row = e->logits + (size_t)k * (size_t)e->info.n_vocab;
    moe_sampler *sm = e->sms[thread < e->n_sms ? thread : 0];
    /* a NaN/Inf logit means the model's numbers broke down for this
     * sequence (a NaN weight row, an overflow): fail it rather than sample
     * from what the sampler would read as -inf */
    int64_t bad = moe_nonfinite_find(row, e->info.n_vocab);
    if (bad >= 0) {
        ro->rc = MOE_ENONFINITE;
        ro->id = (int32_t)bad;
        ro->logprob = row[bad];
        return;
    }
    int64_t np = r->n_prompt;
    ro->rc = moe_sampler_sample(sm, &r->samp, &c->rng, row, q->toks, np, q->toks + np, q->n_tok - np, &ro->id);
    if (!ro->rc && (r->logprobs || r->top_logprobs > 0))
        moe_sampler_logprobs(sm, row, ro->id, r->top_logprobs, &ro->logprob, ro->top);
}

/* Copies the meter's totals into the statistics. */
static void energy_publish(moe_engine *e, uint64_t now) {
    if (!e->meter) return;
    moe_energy_totals t;
    moe_energy_meter_totals(e->meter, now, &t);
    pthread_mutex_lock(&e->mu);
    e->st.energy = t;
    pthread_mutex_unlock(&e->mu);
}

/* Notes the tokens each request computes in the planned step (before the
 * pass: commit clears the chunks). */
static void energy_plan(moe_engine *e) {
    e->ew_n = 0;
    if (!e->meter) return;
    int64_t cap = e->info.max_seqs;
    for (eng_req *r = e->act; r; r = r->act_next) {
        double w = 0;
        for (int32_t i = 0; i < r->n; i++)
            if (r->g->seqs[i].chunk > 0) w += (double)r->g->seqs[i].chunk;
        if (w <= 0) continue;
        if (e->ew_n == cap) break; /* cannot happen: a request in the step runs a sequence */
        e->ew_req[e->ew_n] = r;
        e->ew_work[e->ew_n] = w;
        e->ew_n++;
    }
}

/* Reads the energy since the previous read and books it: shared among the
 * step's requests (attributed), or, with attribute false (an idle wait, a
 * failed pass), as idle. */
static void energy_close(moe_engine *e, bool busy, bool attribute) {
    if (!e->meter) return;
    double dj, ds;
    moe_energy_meter_read(e->meter, busy, &dj, &ds);
    double w = 0;
    if (attribute && e->ew_n) {
        for (int64_t i = 0; i < e->ew_n; i++) e->ew_j[i] = e->ew_s[i] = 0;
        w = moe_energy_share(e->ew_work, (size_t)e->ew_n, dj, ds, e->ew_j, e->ew_s);
        for (int64_t i = 0; i < e->ew_n; i++) {
            e->ew_req[i]->energy_j += e->ew_j[i];
            e->ew_req[i]->energy_s += e->ew_s[i];
        }
    }
    e->ew_n = 0;
    uint64_t now = moe_now_ns();
    moe_energy_meter_book(e->meter, dj, ds, (uint64_t)w, now);
    energy_publish(e, now);
}

/* One scheduler step: plan, forward, sample, publish. Returns true when
 * there was work. */
static bool step(moe_engine *e) {
    moe_sched_batch sb;
    if (moe_sched_step(e->sched, &sb)) return false;
    for (int64_t i = 0; i < sb.n_failed; i++) {
        eng_req *r = sb.failed[i]->group->user;
        snprintf(r->fail, sizeof r->fail, "the request cannot fit the KV cache (%lld blocks of %lld positions)",
                 (long long)e->info.kv_blocks, (long long)e->info.block_size);
    }
    if (!sb.b.n_tok) {
        finalize(e);
        return sb.n_failed > 0;
    }
    energy_plan(e);
    int rc = moe_fwd_run(e->fw, e->kv, &sb.b, e->logits);
    if (rc) {
        energy_close(e, true, false);
        /* the step's requests cannot go on; the others may */
        for (eng_req *r = e->act; r; r = r->act_next)
            for (int32_t i = 0; i < r->n; i++)
                if (r->g->seqs[i].chunk > 0)
                    snprintf(r->fail, sizeof r->fail, "forward pass failed: %s", moe_strerror(rc));
        finalize(e);
        publish_stats(e, &sb, false);
        return true;
    }
    moe_sched_commit(e->sched);
    /* the step's counters first, so they are current when its events arrive */
    publish_stats(e, &sb, true);
    /* sample every row (in parallel), then render and emit in row order */
    sample_job job = {.e = e, .sb = &sb};
    cpu_pool_run(sb.n_rows > 1 ? e->spool : NULL, sample_task, &job, sb.n_rows);
    /* the step's energy before its events: a request's DONE carries it */
    energy_close(e, true, true);
    for (int64_t k = 0; k < sb.n_rows; k++) {
        moe_sched_seq *q = sb.rows[k];
        eng_choice *c = q->user;
        eng_req *r = c->r;
        const row_out *ro = &e->ro[k];
        if (ro->rc == 1 || c->finished || r->fail[0]) continue;
        if (ro->rc == MOE_ENONFINITE) {
            /* the row is the output at the sequence's last position */
            snprintf(r->fail, sizeof r->fail, "non-finite logits (%s at token id %d) at position %lld",
                     moe_nonfinite_kind(ro->logprob), ro->id, (long long)(q->n_tok - 1));
            continue;
        }
        if (ro->rc) {
            snprintf(r->fail, sizeof r->fail, "sampling failed: %s", moe_strerror(ro->rc));
            continue;
        }
        choice_token(e, c, q, ro->id, ro);
    }
    finalize(e);
    return true;
}

static void *engine_main(void *arg) {
    moe_engine *e = arg;
    bool ok = load(e) == MOE_OK;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        e->st.heartbeat_ns = moe_now_ns();
        eng_req *in = e->in_head;
        e->in_head = e->in_tail = NULL;
        e->sched_waiting += e->n_in; /* still waiting, now in the scheduler */
        e->n_in = 0;
        bool quit = e->quit, cancel_all = e->cancel_all;
        pthread_mutex_unlock(&e->mu);
        while (in) {
            eng_req *r = in;
            in = r->in_next;
            r->in_next = NULL;
            r->act_next = e->act;
            if (e->act) e->act->act_prev = r;
            e->act = r;
            moe_sched_add(e->sched, r->g);
            r->in_sched = true;
        }
        for (eng_req *r = e->act, *nx; r; r = nx) {
            nx = r->act_next;
            if (cancel_all || atomic_load(&r->cancel)) req_cancel(e, r);
        }
        if (quit && !e->act) break;
        bool worked = ok && e->act && step(e);
        if (!worked) {
            if (ok) publish_stats(e, NULL, false);
            /* the wait is idle, and so is what came since the last step
             * (its events went out; nothing was computed) */
            energy_close(e, false, false);
            pthread_mutex_lock(&e->mu);
            if (!e->in_head && !e->quit) {
                struct timespec ts;
                uint64_t t = moe_now_ns() + IDLE_WAIT_NS;
                ts.tv_sec = (time_t)(t / 1000000000ull);
                ts.tv_nsec = (long)(t % 1000000000ull);
                pthread_cond_timedwait(&e->cv, &e->mu, &ts);
            }
            pthread_mutex_unlock(&e->mu);
            energy_close(e, false, false);
        }
    }
    pthread_mutex_lock(&e->mu);
    atomic_store(&e->state, MOE_ENGINE_STOPPED);
    pthread_cond_broadcast(&e->cv_state);
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

moe_engine *moe_engine_start(const moe_engine_opts *opts, int *status, char *err, size_t errsz) {
    int st = MOE_EINVAL;
    if (err && errsz) err[0] = 0;
    if (!opts || !opts->model_path || !*opts->model_path) {
        moe_seterr(err, errsz, st, "model_path: required");
        goto fail0;
    }
    const char *d = opts->device;
    if (d && strcmp(d, "cpu") && strcmp(d, "cuda") && strcmp(d, "auto")) {
        moe_seterr(err, errsz, st, "device: '%s' is not cpu, cuda or auto", d);
        goto fail0;
    }
    if (opts->ctx_size < 0 || opts->max_seqs < 0 || opts->kv_blocks < 0 || opts->kv_mem_mb < 0 ||
        opts->block_size < 0 || opts->step_tokens < 0 || opts->queue_limit < 0 || opts->max_seqs > 65536 ||
        opts->block_size > 65536 || opts->step_tokens > (1 << 24) || opts->kv_blocks > INT32_MAX) {
        moe_seterr(err, errsz, st, "engine options: a size is negative or too large");
        goto fail0;
    }
    moe_energy_opts eo = {.source = opts->energy_source, .idle_watts = opts->energy_idle_watts,
                          .busy_watts = opts->energy_busy_watts};
    if (moe_energy_opts_check(&eo, err, errsz)) goto fail0;
    st = MOE_ENOMEM;
    moe_engine *e = calloc(1, sizeof(*e));
    if (!e) goto fail0;
    e->o = *opts;
    e->o.energy_custom = NULL;
    if (opts->energy_custom) {
        e->custom_src = *opts->energy_custom;
        memset(opts->energy_custom, 0, sizeof *opts->energy_custom);
    }
    e->model_path = strdup(opts->model_path);
    e->device_opt = d ? strdup(d) : NULL;
    e->energy_opt = opts->energy_source ? strdup(opts->energy_source) : NULL;
    e->o.energy_source = e->energy_opt;
    if (!e->model_path || (d && !e->device_opt) || (opts->energy_source && !e->energy_opt)) goto fail1;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, &ca);
    pthread_cond_init(&e->cv_state, &ca);
    pthread_condattr_destroy(&ca);
    atomic_init(&e->state, MOE_ENGINE_LOADING);
    e->st.heartbeat_ns = moe_now_ns();
    if (pthread_create(&e->th, NULL, engine_main, e)) {
        moe_seterr(err, errsz, st, "cannot start the engine thread");
        pthread_mutex_destroy(&e->mu);
        pthread_cond_destroy(&e->cv);
        pthread_cond_destroy(&e->cv_state);
        goto fail1;
    }
    e->th_started = true;
    if (status) *status = MOE_OK;
    return e;
fail1:
    moe_energy_source_close(&e->custom_src);
    free(e->model_path);
    free(e->device_opt);
    free(e->energy_opt);
    free(e);
fail0:
    if (opts && opts->energy_custom) moe_energy_source_close(opts->energy_custom);
    if (status) *status = st;
    return NULL;
}

moe_engine_state moe_engine_get_state(const moe_engine *e) {
    return e ? (moe_engine_state)atomic_load(&((moe_engine *)e)->state) : MOE_ENGINE_STOPPED;
}

const char *moe_engine_error(const moe_engine *e) { return e ? e->err : ""; }

static void deadline(struct timespec *ts, int64_t ms) {
    uint64_t t = moe_now_ns() + (uint64_t)ms * 1000000ull;
    ts->tv_sec = (time_t)(t / 1000000000ull);
    ts->tv_nsec = (long)(t % 1000000000ull);
}

moe_engine_state moe_engine_wait_ready(moe_engine *e, int64_t timeout_ms) {
    if (!e) return MOE_ENGINE_STOPPED;
    struct timespec ts;
    if (timeout_ms >= 0) deadline(&ts, timeout_ms);
    pthread_mutex_lock(&e->mu);
    while (atomic_load(&e->state) == MOE_ENGINE_LOADING) {
        if (timeout_ms < 0) pthread_cond_wait(&e->cv_state, &e->mu);
        else if (pthread_cond_timedwait(&e->cv_state, &e->mu, &ts) == ETIMEDOUT) break;
    }
    pthread_mutex_unlock(&e->mu);
    return (moe_engine_state)atomic_load(&e->state);
}

int moe_engine_get_info(const moe_engine *e, moe_engine_info *out) {
    if (!e || !out) return MOE_EINVAL;
    int s = atomic_load(&((moe_engine *)e)->state);
    if (s != MOE_ENGINE_READY && s != MOE_ENGINE_DRAINING) {
        memset(out, 0, sizeof(*out));
        return MOE_ESTATE;
    }
    *out = e->info;
    return MOE_OK;
}

void moe_engine_drain(moe_engine *e) {
    if (!e) return;
    pthread_mutex_lock(&e->mu);
    int expect = MOE_ENGINE_READY;
    atomic_compare_exchange_strong(&e->state, &expect, MOE_ENGINE_DRAINING);
    pthread_cond_broadcast(&e->cv_state);
    pthread_mutex_unlock(&e->mu);
}

void moe_engine_get_stats(const moe_engine *e, moe_engine_stats *out) {
    if (!out) return;
    memset(out, 0, sizeof(*out));
    if (!e) return;
    moe_engine *m = (moe_engine *)e;
    pthread_mutex_lock(&m->mu);
    *out = m->st;
    pthread_mutex_unlock(&m->mu);
    out->state = (moe_engine_state)atomic_load(&m->state);
}

void moe_engine_destroy(moe_engine *e, int64_t drain_ms) {
    if (!e) return;
    moe_engine_drain(e);
    pthread_mutex_lock(&e->mu);
    struct timespec ts;
    if (drain_ms >= 0) deadline(&ts, drain_ms);
    while (e->n_live > 0 && atomic_load(&e->state) != MOE_ENGINE_STOPPED) {
        if (drain_ms < 0) pthread_cond_wait(&e->cv_state, &e->mu);
        else if (pthread_cond_timedwait(&e->cv_state, &e->mu, &ts) == ETIMEDOUT) break;
    }
    e->cancel_all = true;
    e->quit = true;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (e->th_started) pthread_join(e->th, NULL);
    moe_sched_free(e->sched);
    cpu_pool_destroy(e->spool);
    for (int i = 0; e->sms && i < e->n_sms; i++) moe_sampler_free(e->sms[i]);
    free(e->sms);
    free(e->ro);
    free(e->logits);
    moe_energy_meter_free(e->meter);
    moe_energy_source_close(&e->custom_src);
    free(e->ew_req);
    free(e->ew_work);
    free(e->ew_j);
    free(e->ew_s);
    moe_kv_destroy(e->kv);
    moe_fwd_free(e->fw);
    if (e->be_ok) moe_backend_destroy(&e->be);
    if (e->chat_ok) moe_chat_template_free(&e->chat);
    moe_tok_free(e->tok);
    moe_model_free(e->model);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    pthread_cond_destroy(&e->cv_state);
    free(e->model_path);
    free(e->device_opt);
    free(e->energy_opt);
    free(e);
}
