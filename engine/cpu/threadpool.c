/* threadpool.c - see threadpool.h.
 *
 * Protocol: the caller publishes a job (fn, ctx) and then one 64-bit
 * claim word holding the job's generation, its task count and the next
 * task to hand out, and bumps `generation` to wake the workers (they spin
 * for a while, else sleep on `wake`). Everyone, the caller included,
 * claims tasks by compare-and-swap on that word, which fails once the
 * word belongs to another generation, so a worker that wakes up late can
 * never run a task of a job it did not see start. Finished tasks are
 * counted and the caller returns as soon as all tasks of its job are done
 * (spin, then the `idle` condition): it never waits for a worker that
 * claimed nothing. On a loaded machine a descheduled worker would
 * otherwise hold up every op until the scheduler ran it again; now the
 * caller does its share. The job's ctx may be freed as soon as
 * cpu_pool_run() returns. Jobs of more than MAX_JOB tasks run in pieces.
 */
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "status.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

/* pause takes ~10-150 cycles depending on the CPU, so this polls for
 * roughly 20-250 us: long enough to bridge back-to-back ops of one forward
 * pass, short enough not to matter when the server is idle. */
#define SPIN_ITERS 5000

/* claim word: generation (24 bits) | task count (20) | next task (20) */
#define IDX_BITS 20
#define MAX_JOB ((1 << IDX_BITS) - 1)
#define GEN_MASK 0xFFFFFFu

static inline uint64_t claim_word(unsigned gen, int64_t n, int64_t next) {
    return ((uint64_t)(gen & GEN_MASK) << (2 * IDX_BITS)) | ((uint64_t)n << IDX_BITS) | (uint64_t)next;
}

struct cpu_pool {
    int n;           /* threads including the caller */
    pthread_t *tids; /* (n - 1) workers */
    pthread_mutex_t mu;
    pthread_cond_t wake; /* workers wait here for a new generation */
    pthread_cond_t idle; /* the caller waits here for the last task */
    atomic_uint generation;
    _Atomic uint64_t claim;       /* see claim_word() */
    atomic_int_fast64_t finished; /* tasks of the current job done */
    int stop;                     /* under mu */
    cpu_task_fn fn;               /* the current job; read only after a successful claim */
    void *ctx;
    struct {
        void *p;
        size_t cap;
    } scratch[CPU_SCRATCH_COUNT]; /* cpu_pool_scratch */
};

typedef struct {
    cpu_pool *pool;
    int id;
} worker_arg;

/* Claims and runs tasks of generation `gen` until none are left. Returns
 * whether this thread finished the job's last task. */
static int run_tasks(cpu_pool *p, unsigned gen, int thread) {
    uint64_t v = atomic_load_explicit(&p->claim, memory_order_acquire);
    int last = 0;
    for (;;) {
        if ((unsigned)(v >> (2 * IDX_BITS)) != (gen & GEN_MASK))
            break;
        int64_t n = (int64_t)((v >> IDX_BITS) & MAX_JOB), t = (int64_t)(v & MAX_JOB);
        if (t >= n)
            break;
        if (!atomic_compare_exchange_weak_explicit(&p->claim, &v, v + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue; /* v was reloaded */
        /* the job cannot finish before this task does, so fn/ctx are its own */
        p->fn(p->ctx, t, thread);
        last = atomic_fetch_add_explicit(&p->finished, 1, memory_order_acq_rel) + 1 == n;
        v = atomic_load_explicit(&p->claim, memory_order_acquire);
    }
    return last;
}

static void *worker_main(void *arg) {
    worker_arg *wa = arg;
    cpu_pool *p = wa->pool;
    int id = wa->id;
    free(wa);
    unsigned seen = 0;
    for (;;) {
        unsigned g = atomic_load_explicit(&p->generation, memory_order_acquire);
        for (int i = 0; g == seen && i < SPIN_ITERS; i++) {
            CPU_RELAX();
            g = atomic_load_explicit(&p->generation, memory_order_acquire);
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            while (!p->stop && (g = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen)
                pthread_cond_wait(&p->wake, &p->mu);
            int stop = p->stop;
            pthread_mutex_unlock(&p->mu);
            if (stop)
                return NULL;
        }
        seen = g;
        if (run_tasks(p, g, id)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->idle);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

cpu_pool *cpu_pool_create(int n, int *status) {
    int st = MOE_OK;
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    if (n > 1024) {
        st = MOE_EINVAL;
        goto fail;
    }
    cpu_pool *p = calloc(1, sizeof *p);
    if (!p) {
        st = MOE_ENOMEM;
        goto fail;
    }
    p->n = n;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->idle, NULL);
    atomic_init(&p->generation, 0);
    atomic_init(&p->claim, claim_word(0, 0, 0));
    atomic_init(&p->finished, 0);
    if (n > 1) {
        p->tids = calloc((size_t)n - 1, sizeof *p->tids);
        if (!p->tids) {
            free(p);
            st = MOE_ENOMEM;
            goto fail;
        }
        for (int i = 1; i < n; i++) {
            worker_arg *wa = malloc(sizeof *wa);
            if (wa) {
                wa->pool = p;
                wa->id = i;
            }
            if (!wa || pthread_create(&p->tids[i - 1], NULL, worker_main, wa) != 0) {
                free(wa);
                p->n = i; /* workers 1..i-1 exist; destroy joins exactly those */
                cpu_pool_destroy(p);
                st = MOE_ENOMEM;
                goto fail;
            }
        }
    }
    if (status)
        *status = MOE_OK;
    return p;
fail:
    if (status)
        *status = st;
    return NULL;
}

void cpu_pool_destroy(cpu_pool *p) {
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i + 1 < p->n; i++)
        pthread_join(p->tids[i], NULL);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->idle);
    pthread_mutex_destroy(&p->mu);
    for (int i = 0; i < CPU_SCRATCH_COUNT; i++)
        free(p->scratch[i].p);
    free(p->tids);
    free(p);
}

void *cpu_pool_scratch(cpu_pool *p, int slot, size_t n) {
    if (!p || slot < 0 || slot >= CPU_SCRATCH_COUNT)
        return NULL;
    if (n > p->scratch[slot].cap || !p->scratch[slot].p) {
        /* a quarter more than asked, so slowly growing contexts do not
         * reallocate every step */
        size_t cap = n + n / 4 + 64;
        void *np = malloc(cap);
        if (!np)
            return NULL;
        free(p->scratch[slot].p);
        p->scratch[slot].p = np;
        p->scratch[slot].cap = cap;
    }
    return p->scratch[slot].p;
}

int cpu_pool_size(const cpu_pool *p) { return p ? p->n : 1; }

typedef struct {
    cpu_task_fn fn;
    void *ctx;
    int64_t off;
} piece_ctx;

static void piece_task(void *ctx, int64_t t, int thread) {
    piece_ctx *pc = ctx;
    pc->fn(pc->ctx, pc->off + t, thread);
}

void cpu_pool_run(cpu_pool *p, cpu_task_fn fn, void *ctx, int64_t n_tasks) {
    if (n_tasks <= 0)
        return;
    if (!p || p->n == 1 || n_tasks == 1) {
        for (int64_t t = 0; t < n_tasks; t++)
            fn(ctx, t, 0);
        return;
    }
    if (n_tasks > MAX_JOB) {
        for (int64_t off = 0; off < n_tasks; off += MAX_JOB) {
            piece_ctx pc = {fn, ctx, off};
            cpu_pool_run(p, piece_task, &pc, n_tasks - off < MAX_JOB ? n_tasks - off : MAX_JOB);
        }
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    atomic_store_explicit(&p->finished, 0, memory_order_relaxed);
    unsigned gen = atomic_load_explicit(&p->generation, memory_order_relaxed) + 1;
    /* the release publishes fn/ctx/finished to whoever claims a task */
    atomic_store_explicit(&p->claim, claim_word(gen, n_tasks, 0), memory_order_release);
    pthread_mutex_lock(&p->mu);
    atomic_store_explicit(&p->generation, gen, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    run_tasks(p, gen, 0);
    for (int i = 0; i < SPIN_ITERS; i++) {
        if (atomic_load_explicit(&p->finished, memory_order_acquire) == n_tasks)
            return;
        CPU_RELAX();
    }
    pthread_mutex_lock(&p->mu);
    while (atomic_load_explicit(&p->finished, memory_order_acquire) != n_tasks)
        pthread_cond_wait(&p->idle, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
