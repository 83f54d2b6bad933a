/* scheduler.c - continuous batching; see scheduler.h. */
#include "scheduler.h"

#include <stdlib.h>
#include <string.h>

struct moe_sched {
    moe_kv_cache *kv;
    moe_sched_opts o;
    int64_t bs;
    /* running sequences, ascending order (oldest first) */
    moe_sched_seq **run;
    int64_t n_run;
    /* preempted sequences, ascending order */
    moe_sched_seq **pre;
    int64_t n_pre;
    int64_t n_fork_wait;
    moe_sched_group *wait_head, *wait_tail;
    int64_t n_wait, n_groups_running;
    uint64_t next_order;
    uint64_t preemptions;
    uint64_t prefix_hits;
    uint64_t step_no;
    int64_t budget; /* during moe_sched_step */
    /* batch arrays */
    int32_t *ids, *pos, *seq; /* (step_tokens) */
    uint8_t *want;            /* (step_tokens) */
    moe_kv_seq *seqs;         /* (max_seqs) */
    moe_sched_seq **bseq;     /* (max_seqs) sequence of each batch slot */
    int64_t n_bseq;
    moe_sched_seq **rows;     /* (max_seqs) */
    moe_sched_seq **failed;   /* (max_seqs) */
};

moe_sched_group *moe_sched_group_new(const int32_t *prompt, int64_t n_prompt, int32_t n, int64_t max_new, void *user) {
    if (!prompt || n_prompt < 1 || n < 1 || max_new < 0 || n_prompt > INT32_MAX - max_new) return NULL;
    moe_sched_group *g = calloc(1, sizeof(*g));
    if (!g) return NULL;
    g->user = user;
    g->n = n;
    g->n_prompt = n_prompt;
    g->seqs = calloc((size_t)n, sizeof(moe_sched_seq));
    if (!g->seqs) goto fail;
    for (int32_t i = 0; i < n; i++) {
        moe_sched_seq *q = &g->seqs[i];
        q->group = g;
        q->index = i;
        q->cap = n_prompt + max_new;
        q->toks = malloc((size_t)q->cap * sizeof(int32_t));
        if (!q->toks) goto fail;
        memcpy(q->toks, prompt, (size_t)n_prompt * sizeof(int32_t));
        q->n_tok = n_prompt;
        q->row = -1;
    }
    return g;
fail:
    moe_sched_group_free(g);
    return NULL;
}

void moe_sched_group_free(moe_sched_group *g) {
    if (!g) return;
    for (int32_t i = 0; g->seqs && i < g->n; i++) {
        free(g->seqs[i].toks);
        free(g->seqs[i].kv.blocks); /* only a table; blocks were released by the scheduler */
    }
    free(g->seqs);
    free(g);
}

moe_sched *moe_sched_new(moe_kv_cache *kv, const moe_sched_opts *o) {
    if (!kv || !o || o->max_seqs < 1 || o->step_tokens < o->max_seqs || o->max_seqs > INT32_MAX ||
        o->step_tokens > INT32_MAX)
        return NULL;
    if (o->prefix_cache && moe_kv_prefix_enable(kv)) return NULL;
    moe_sched *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->kv = kv;
    s->o = *o;
    s->bs = moe_kv_get_opts(kv)->block_size;
    size_t ms = (size_t)o->max_seqs, st = (size_t)o->step_tokens;
    s->run = calloc(ms, sizeof(*s->run));
    s->pre = calloc(ms, sizeof(*s->pre));
    s->ids = calloc(st, sizeof(int32_t));
    s->pos = calloc(st, sizeof(int32_t));
    s->seq = calloc(st, sizeof(int32_t));
    s->want = calloc(st, 1);
    s->seqs = calloc(ms, sizeof(moe_kv_seq));
    s->bseq = calloc(ms, sizeof(*s->bseq));
    s->rows = calloc(ms, sizeof(*s->rows));
    s->failed = calloc(ms, sizeof(*s->failed));
    if (!s->run || !s->pre || !s->ids || !s->pos || !s->seq || !s->want || !s->seqs || !s->bseq || !s->rows ||
        !s->failed) {
        moe_sched_free(s);
        return NULL;
    }
    return s;
}

static void list_del(moe_sched_seq **a, int64_t *n, moe_sched_seq *q) {
    for (int64_t i = 0; i < *n; i++)
        if (a[i] == q) {
            memmove(a + i, a + i + 1, (size_t)(*n - i - 1) * sizeof(*a));
            (*n)--;
            return;
        }
}

/* Inserts q keeping ascending order (callers guarantee room: at most
 * max_seqs sequences are admitted, preempted or not). */
static void list_ins(moe_sched_seq **a, int64_t *n, moe_sched_seq *q) {
    int64_t i = *n;
    while (i > 0 && a[i - 1]->order > q->order) {
        a[i] = a[i - 1];
        i--;
    }
    a[i] = q;
    (*n)++;
}

static void unqueue(moe_sched *s, moe_sched_group *g) {
    if (!g->queued) return;
    moe_sched_group **pp = &s->wait_head, *prev = NULL;
    while (*pp && *pp != g) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (*pp) {
        *pp = g->next;
        if (s->wait_tail == g) s->wait_tail = prev;
    }
    g->next = NULL;
    g->queued = false;
    s->n_wait--;
}

void moe_sched_finish(moe_sched *s, moe_sched_seq *q) {
    if (!s || !q || q->state == MOE_SEQ_FINISHED) return;
    if (q->state == MOE_SEQ_RUNNING) {
        list_del(s->run, &s->n_run, q);
    } else if (q->state == MOE_SEQ_FORK_WAIT) {
        s->n_fork_wait--;
        q->group->n_fork_wait--;
    } else if (q->order) {
        list_del(s->pre, &s->n_pre, q);
    }
    /* keep the table allocation for moe_sched_group_free; drop the blocks */
    if (q->kv.n_blocks) moe_kv_free(s->kv, q->kv.blocks, q->kv.n_blocks);
    q->kv.n_blocks = 0;
    q->state = MOE_SEQ_FINISHED;
    q->chunk = 0;
    q->row = -1;
    q->group->n_finished++;
}

void moe_sched_remove(moe_sched *s, moe_sched_group *g) {
    if (!s || !g) return;
    unqueue(s, g);
    for (int32_t i = 0; i < g->n; i++) moe_sched_finish(s, &g->seqs[i]);
    if (g->admitted) {
        s->n_groups_running--;
        g->admitted = false;
    }
}

void moe_sched_free(moe_sched *s) {
    if (!s) return;
    for (int64_t i = s->n_run - 1; i >= 0; i--) moe_sched_remove(s, s->run[i]->group);
    for (int64_t i = s->n_pre - 1; i >= 0; i--) moe_sched_remove(s, s->pre[i]->group);
    while (s->wait_head) moe_sched_remove(s, s->wait_head);
    free(s->run);
    free(s->pre);
    free(s->ids);
    free(s->pos);
    free(s->seq);
    free(s->want);
    free(s->seqs);
    free(s->bseq);
    free(s->rows);
    free(s->failed);
    free(s);
}

void moe_sched_add(moe_sched *s, moe_sched_group *g) {
    if (!s || !g || g->queued) return;
    g->next = NULL;
    if (s->wait_tail) s->wait_tail->next = g;
    else s->wait_head = g;
    s->wait_tail = g;
    g->queued = true;
    s->n_wait++;
}

int moe_sched_append(moe_sched *s, moe_sched_seq *q, int32_t id) {
    (void)s;
    if (!q || q->n_tok >= q->cap) return MOE_EFULL;
    q->toks[q->n_tok++] = id;
    return MOE_OK;
}

/* Positions of the prompt that choices > 0 share: whole blocks, short of
 * the last position so that each choice computes its own last-prompt
 * logits. */
static int64_t shared_len(const moe_sched *s, const moe_sched_group *g) {
    return (g->n_prompt - 1) / s->bs * s->bs;
}

static void preempt(moe_sched *s, moe_sched_seq *q) {
    list_del(s->run, &s->n_run, q);
    if (q->kv.n_blocks) moe_kv_free(s->kv, q->kv.blocks, q->kv.n_blocks);
    q->kv.n_blocks = 0;
    q->n_computed = 0;
    q->n_hashed = 0;
    q->chain_hash = 0;
    s->budget += q->chunk;
    q->chunk = 0;
    q->state = MOE_SEQ_WAITING;
    q->n_preempted++;
    list_ins(s->pre, &s->n_pre, q);
    s->preemptions++;
}

/* Makes q's table cover n_pos positions, preempting the youngest running
 * sequences as needed. Returns false when q itself had to go (preempted,
 * or recorded as failed when it cannot fit even alone). */
static bool reserve(moe_sched *s, moe_sched_seq *q, int64_t n_pos, moe_sched_batch *out) {
    for (;;) {
        int rc = moe_kv_seq_reserve(s->kv, &q->kv, n_pos);
        if (rc == MOE_OK) return true;
        moe_sched_seq *victim = s->n_run ? s->run[s->n_run - 1] : q;
        if (rc != MOE_EFULL || victim == q) {
            if (s->n_run == 1 && rc == MOE_EFULL) {
                /* alone and still no room: it can never fit */
                list_del(s->run, &s->n_run, q);
                if (q->kv.n_blocks) moe_kv_free(s->kv, q->kv.blocks, q->kv.n_blocks);
                q->kv.n_blocks = 0;
                q->n_computed = 0;
                q->n_hashed = 0;
                q->chain_hash = 0;
                q->chunk = 0;
                q->state = MOE_SEQ_WAITING;
                q->order = 0; /* in no list now */
                out->failed[out->n_failed++] = q;
                return false;
            }
            preempt(s, q);
            return false;
        }
        preempt(s, victim);
    }
}

static int64_t blocks_for(const moe_sched *s, int64_t n_pos) { return (n_pos + s->bs - 1) / s->bs; }

/* Schedules up to `budget` pending tokens of running sequence q. */
static void schedule(moe_sched *s, moe_sched_seq *q, moe_sched_batch *out) {
    int64_t pending = q->n_tok - q->n_computed;
    int64_t c = pending < s->budget ? pending : s->budget;
    if (c <= 0) return;
    if (!reserve(s, q, q->n_computed + c, out)) return;
    q->chunk = c;
    s->budget -= c;
}

/* Takes the prefix cache's blocks for q's leading whole blocks (never
 * its last position: the step that computes it yields q's logits). */
static void prefix_lookup(moe_sched *s, moe_sched_seq *q) {
    if (!s->o.prefix_cache || q->n_computed || q->kv.n_blocks) return;
    int64_t bs = s->bs, max_blocks = (q->n_tok - 1) / bs;
    uint64_t h = 0;
    while (q->kv.n_blocks < max_blocks) {
        const int32_t *t = q->toks + q->kv.n_blocks * bs;
        uint64_t hj = moe_kv_block_hash(h, t, bs);
        if (q->kv.n_blocks == q->kv.cap) {
            int64_t cap = q->kv.cap ? q->kv.cap * 2 : 4;
            int32_t *nb = realloc(q->kv.blocks, (size_t)cap * sizeof(int32_t));
            if (!nb) break;
            q->kv.blocks = nb;
            q->kv.cap = cap;
        }
        int32_t b = moe_kv_prefix_find(s->kv, h, hj, t);
        if (b < 0) break;
        q->kv.blocks[q->kv.n_blocks++] = b;
        h = hj;
    }
    q->n_computed = q->kv.n_blocks * bs;
    q->n_hashed = q->kv.n_blocks;
    q->chain_hash = h;
    s->prefix_hits += (uint64_t)q->n_computed;
}

/* Publishes q's whole computed blocks not published yet. */
static void prefix_publish(moe_sched *s, moe_sched_seq *q) {
    if (!s->o.prefix_cache) return;
    int64_t bs = s->bs;
    while ((q->n_hashed + 1) * bs <= q->n_computed && q->n_hashed < q->kv.n_blocks) {
        const int32_t *t = q->toks + q->n_hashed * bs;
        uint64_t hj = moe_kv_block_hash(q->chain_hash, t, bs);
        moe_kv_prefix_publish(s->kv, q->kv.blocks[q->n_hashed], q->chain_hash, hj, t);
        q->chain_hash = hj;
        q->n_hashed++;
    }
}

static void admit(moe_sched *s, moe_sched_seq *q) {
    if (!q->order) q->order = ++s->next_order;
    q->state = MOE_SEQ_RUNNING;
    list_ins(s->run, &s->n_run, q);
    prefix_lookup(s, q);
}

int moe_sched_step(moe_sched *s, moe_sched_batch *out) {
    if (!s || !out) return MOE_EINVAL;
    memset(out, 0, sizeof(*out));
    out->rows = s->rows;
    out->failed = s->failed;
    s->step_no++;
    s->budget = s->o.step_tokens;
    for (int64_t i = 0; i < s->n_run; i++) {
        s->run[i]->chunk = 0;
        s->run[i]->row = -1;
    }
    /* 1. decodes, oldest first */
    for (int64_t i = 0; i < s->n_run && s->budget > 0; i++) {
        moe_sched_seq *q = s->run[i];
        if (q->chunk == 0 && q->n_tok - q->n_computed == 1) schedule(s, q, out);
    }
    /* 2. prefill / recompute chunks of running sequences, oldest first
     * (a preemption only ever removes the youngest, so index i stays valid) */
    for (int64_t i = 0; i < s->n_run && s->budget > 0; i++) {
        moe_sched_seq *q = s->run[i];
        if (q->chunk == 0 && q->n_tok - q->n_computed > 1) schedule(s, q, out);
    }
    /* 3. admissions: preempted sequences first, then new groups */
    int64_t n_free = moe_kv_n_free(s->kv);
    int64_t watermark = moe_kv_get_opts(s->kv)->n_blocks / 100;
    while (s->budget > 0) {
        int64_t slots = s->o.max_seqs - s->n_run - s->n_fork_wait - s->n_pre;
        if (s->n_pre) {
            moe_sched_seq *q = s->pre[0];
            int64_t c = q->n_tok < s->budget ? q->n_tok : s->budget;
            if (blocks_for(s, c) > n_free || q->admit_step == s->step_no) break;
            list_del(s->pre, &s->n_pre, q);
            admit(s, q);
            q->admit_step = s->step_no; /* at most once per step: no admit/preempt ping-pong */
            schedule(s, q, out);
            if (q->state != MOE_SEQ_RUNNING) break;
            n_free = moe_kv_n_free(s->kv);
            continue;
        }
        moe_sched_group *g = s->wait_head;
        if (!g || g->n > slots) break;
        int64_t c = g->n_prompt < s->budget ? g->n_prompt : s->budget;
        /* keep a few blocks for the running decodes' growth, but never
         * hold back a group when nothing runs (it would wait forever) */
        if (blocks_for(s, c) + (s->n_run ? watermark : 0) > n_free) break;
        unqueue(s, g);
        g->admitted = true;
        s->n_groups_running++;
        bool share = g->n > 1 && shared_len(s, g) > 0;
        admit(s, &g->seqs[0]);
        for (int32_t i = 1; i < g->n; i++) {
            if (share) {
                g->seqs[i].state = MOE_SEQ_FORK_WAIT;
                g->n_fork_wait++;
                s->n_fork_wait++;
            } else {
                admit(s, &g->seqs[i]);
            }
        }
        for (int32_t i = 0; i < g->n && s->budget > 0; i++)
            if (g->seqs[i].state == MOE_SEQ_RUNNING) schedule(s, &g->seqs[i], out);
        n_free = moe_kv_n_free(s->kv);
    }

    /* the batch: sequences in age order, each one's tokens contiguous */
    int64_t nt = 0, ns = 0, nr = 0;
    for (int64_t i = 0; i < s->n_run; i++) {
        moe_sched_seq *q = s->run[i];
        if (q->chunk <= 0) continue;
        s->seqs[ns] = q->kv;
        s->bseq[ns] = q;
        int64_t p_hi = q->n_tok - 1 > q->group->n_prompt ? q->n_tok - 1 : q->group->n_prompt;
        for (int64_t j = 0; j < q->chunk; j++) {
            int64_t p = q->n_computed + j;
            s->ids[nt] = q->toks[p];
            s->pos[nt] = (int32_t)p;
            s->seq[nt] = (int32_t)ns;
            s->want[nt] = 0;
            if (p < p_hi) out->n_prefill++;
            nt++;
        }
        if (q->n_computed + q->chunk == q->n_tok) {
            s->want[nt - 1] = 1;
            q->row = nr;
            s->rows[nr++] = q;
        }
        ns++;
    }
    s->n_bseq = ns;
    out->b = (moe_batch){.n_tok = nt, .ids = s->ids, .pos = s->pos, .seq = s->seq, .n_seq = ns, .seqs = s->seqs,
                         .want_logits = s->want};
    out->n_rows = nr;
    return MOE_OK;
}

void moe_sched_commit(moe_sched *s) {
    if (!s) return;
    for (int64_t k = 0; k < s->n_bseq; k++) {
        moe_sched_seq *q = s->bseq[k];
        if (q->state != MOE_SEQ_RUNNING) continue;
        q->n_computed += q->chunk;
        q->chunk = 0;
        prefix_publish(s, q);
        moe_sched_group *g = q->group;
        if (q->index != 0 || !g->n_fork_wait || q->n_computed < shared_len(s, g)) continue;
        int64_t sl = shared_len(s, g);
        for (int32_t i = 1; i < g->n; i++) {
            moe_sched_seq *c = &g->seqs[i];
            if (c->state != MOE_SEQ_FORK_WAIT) continue;
            g->n_fork_wait--;
            s->n_fork_wait--;
            /* on ENOMEM the choice just computes the whole prompt itself */
            if (moe_kv_seq_share(s->kv, &c->kv, &q->kv, sl / s->bs) == MOE_OK) c->n_computed = sl;
            admit(s, c); /* (no prefix lookup: it holds blocks already, or computes all on ENOMEM) */
        }
    }
    s->n_bseq = 0;
}

void moe_sched_get_counts(const moe_sched *s, moe_sched_counts *out) {
    if (!out) return;
    memset(out, 0, sizeof(*out));
    if (!s) return;
    out->groups_waiting = s->n_wait;
    out->groups_running = s->n_groups_running;
    out->seqs_running = s->n_run + s->n_fork_wait;
    out->seqs_preempted = s->n_pre;
    out->preemptions = s->preemptions;
    out->prefix_hit_tokens = s->prefix_hits;
}
