/* scheduler.h - continuous batching over the paged KV cache.
 *
 * A group is one request: n sequences (choices) that start from the same
 * prompt. The scheduler decides, step by step, which tokens of which
 * sequences go into the next forward pass, and owns their KV block
 * tables; the caller (engine.c, or a test) runs the pass, samples, and
 * reports tokens back. It knows nothing about sampling, text or threads.
 *
 * One step (moe_sched_step):
 *   1. every running sequence with exactly one token not yet in the cache
 *      (a decode) gets it scheduled, oldest first;
 *   2. running sequences with more (prefill, or recompute after
 *      preemption) get chunks of up to what is left of step_tokens, oldest
 *      first (chunked prefill: a long prompt never stalls the decodes);
 *   3. with budget left, preempted sequences (oldest first), then waiting
 *      groups (FIFO) are admitted while sequence slots (max_seqs) and free
 *      KV blocks allow.
 *   Whenever a running sequence needs a block and none is free, the most
 *   recently admitted running sequence is preempted: its blocks are
 *   dropped, and it is re-admitted later and recomputes its prompt and
 *   generated tokens (nothing is ever truncated). A sequence that cannot
 *   fit even when it runs alone is reported as failed.
 *   The batch asks for logits only on the last token of a sequence whose
 *   chunk reaches the end of its tokens (end of prompt, or a decode).
 * After a successful forward pass, moe_sched_commit() marks the scheduled
 * tokens as cached; the caller then samples every logits row and calls
 * moe_sched_append() or moe_sched_finish() for its sequence.
 *
 * Prefix cache (opts.prefix_cache, see kvcache.h): a sequence admitted
 * (or re-admitted after preemption) first takes the cached blocks that
 * match its leading whole blocks, short of its last position (whose
 * logits it needs), and computes only the rest; every whole block it
 * computes is published after the step.
 *
 * Sharing (n > 1): choice 0 computes the prompt; once it has cached the
 * prompt's whole blocks short of the last position, the other choices
 * take references to those blocks (moe_kv_seq_share) and compute only
 * the remaining tail themselves, so each gets its own logits for the
 * prompt's last position and never writes to a shared block.
 *
 * Threads: one thread (the engine thread) per scheduler; groups may be
 * created on any thread before moe_sched_add().
 */
#ifndef MOE_SCHEDULER_H
#define MOE_SCHEDULER_H

#include <stdbool.h>
#include <stdint.h>

#include "batch.h"
#include "kvcache.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moe_seq_state {
    MOE_SEQ_WAITING = 0,   /* not admitted yet, or preempted; holds no blocks */
    MOE_SEQ_FORK_WAIT = 1, /* admitted; waits for choice 0 to cache the shared prompt blocks */
    MOE_SEQ_RUNNING = 2,
    MOE_SEQ_FINISHED = 3
} moe_seq_state;

typedef struct moe_sched_group moe_sched_group;

typedef struct moe_sched_seq {
    moe_sched_group *group;
    int32_t index;      /* choice index */
    void *user;         /* the caller's per-choice state */
    int32_t *toks;      /* (cap) prompt then generated ids */
    int64_t n_tok;
    int64_t cap;        /* n_prompt + max_new */
    int64_t n_computed; /* positions 0 .. n_computed-1 are in the cache */
    moe_kv_seq kv;
    moe_seq_state state;
    uint64_t order;     /* admission order; lower is older (kept across preemption) */
    int64_t n_preempted;
    int64_t n_hashed;    /* leading whole blocks whose prefix-cache hash is known (published or found) */
    uint64_t chain_hash; /* hash of the chain of those blocks */
    uint64_t admit_step; /* the step it was last re-admitted in */
    /* the current step, valid from moe_sched_step to the next one */
    int64_t chunk; /* tokens of this sequence in the batch */
    int64_t row;   /* its logits row, or -1 */
} moe_sched_seq;

struct moe_sched_group {
    void *user;
    int32_t n;
    int64_t n_prompt;
    moe_sched_seq *seqs; /* (n) */
    int32_t n_finished;
    int32_t n_fork_wait;
    bool admitted; /* at least one choice was admitted once */
    bool queued;   /* in the waiting FIFO */
    moe_sched_group *next;
};

/* Makes a group of n (>= 1) sequences with copies of prompt[0..n_prompt)
 * (n_prompt >= 1) and room for max_new generated tokens each. Returns NULL
 * on bad arguments or ENOMEM. Free with moe_sched_group_free() once it is
 * not (or no longer) in a scheduler. Any thread. */
moe_sched_group *moe_sched_group_new(const int32_t *prompt, int64_t n_prompt, int32_t n, int64_t max_new, void *user);
void moe_sched_group_free(moe_sched_group *g); /* NULL is a no-op; blocks must have been released */

typedef struct moe_sched_opts {
    int64_t max_seqs;    /* sequences admitted at once, >= 1 */
    int64_t step_tokens; /* tokens per step, >= max_seqs */
    bool prefix_cache;   /* reuse cached blocks of earlier sequences with the same leading tokens */
} moe_sched_opts;

typedef struct moe_sched moe_sched;

/* Returns a scheduler over kv (which must outlive it), or NULL (bad
 * options, ENOMEM). */
moe_sched *moe_sched_new(moe_kv_cache *kv, const moe_sched_opts *o);
/* Releases every block still held by the groups in it (they stay the
 * caller's to free) and frees the scheduler. NULL is a no-op. */
void moe_sched_free(moe_sched *s);

/* Queues g (FIFO). */
void moe_sched_add(moe_sched *s, moe_sched_group *g);
/* Takes g out of the scheduler whatever its state: every unfinished
 * sequence is marked FINISHED and its blocks are freed. */
void moe_sched_remove(moe_sched *s, moe_sched_group *g);
/* Ends one sequence (its blocks freed, state FINISHED). */
void moe_sched_finish(moe_sched *s, moe_sched_seq *q);
/* Appends a generated id to q. MOE_EFULL when q has no room left. */
int moe_sched_append(moe_sched *s, moe_sched_seq *q, int32_t id);

/* One step's batch. Arrays belong to the scheduler and stay valid until
 * the next moe_sched_step(). */
typedef struct moe_sched_batch {
    moe_batch b;             /* n_tok == 0: nothing to run */
    int64_t n_rows;          /* logits rows the pass returns */
    moe_sched_seq **rows;    /* (n_rows) the sequence of each row */
    int64_t n_prefill;       /* tokens that are prompt or recompute (the rest are decodes) */
    moe_sched_seq **failed;  /* (n_failed) sequences that can never fit the cache; the caller removes their groups */
    int64_t n_failed;
} moe_sched_batch;

/* Plans the next step (see the top of this file). Returns MOE_OK or
 * MOE_ENOMEM. */
int moe_sched_step(moe_sched *s, moe_sched_batch *out);
/* Marks the last step's tokens as cached and lets waiting choices share
 * choice 0's prompt blocks. Call once after a successful forward pass. */
void moe_sched_commit(moe_sched *s);

typedef struct moe_sched_counts {
    int64_t groups_waiting;  /* queued, never admitted */
    int64_t groups_running;  /* admitted, not removed */
    int64_t seqs_running;    /* RUNNING + FORK_WAIT */
    int64_t seqs_preempted;  /* waiting for re-admission */
    uint64_t preemptions;    /* total */
    uint64_t prefix_hit_tokens; /* positions taken from the prefix cache instead of computed */
} moe_sched_counts;
void moe_sched_get_counts(const moe_sched *s, moe_sched_counts *out);

#ifdef __cplusplus
}
#endif
#endif
