/* threadpool.c - see threadpool.h.
 *
 * Protocol: the caller publishes a job (fn, ctx, n_tasks), resets the task
 * counter and bumps `generation`. Workers notice the new generation by
 * spinning for a while, else by sleeping on `wake`. Everyone, the caller
 * included, claims tasks with an atomic fetch-add until they run out;
 * each worker then increments `done`, and the caller waits (spin, then
 * the `idle` condition) until all workers have checked in, so the job's
 * ctx may be freed as soon as cpu_pool_run() returns.
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

struct cpu_pool {
    int n;           /* threads including the caller */
    pthread_t *tids; /* (n - 1) workers */
    pthread_mutex_t mu;
    pthread_cond_t wake; /* workers wait here for a new generation */
    pthread_cond_t idle; /* the caller waits here for `done` */
    atomic_uint generation;
    atomic_int done;       /* workers finished with the current generation */
    atomic_int_fast64_t next; /* next task to claim */
    int stop;              /* under mu */
    cpu_task_fn fn;
    void *ctx;
    int64_t n_tasks;
};

typedef struct {
    cpu_pool *pool;
    int id;
} worker_arg;

static void run_tasks(cpu_pool *p, int thread) {
    for (;;) {
        int64_t t = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (t >= p->n_tasks)
            break;
        p->fn(p->ctx, t, thread);
    }
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
        run_tasks(p, id);
        if (atomic_fetch_add_explicit(&p->done, 1, memory_order_acq_rel) + 1 == p->n - 1) {
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
    atomic_init(&p->done, 0);
    atomic_init(&p->next, 0);
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
    free(p->tids);
    free(p);
}

int cpu_pool_size(const cpu_pool *p) { return p ? p->n : 1; }

void cpu_pool_run(cpu_pool *p, cpu_task_fn fn, void *ctx, int64_t n_tasks) {
    if (n_tasks <= 0)
        return;
    if (!p || p->n == 1 || n_tasks == 1) {
        for (int64_t t = 0; t < n_tasks; t++)
            fn(ctx, t, 0);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    /* The release publishes fn/ctx/n_tasks to workers that acquire it. */
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    run_tasks(p, 0);
    int workers = p->n - 1;
    for (int i = 0; i < SPIN_ITERS; i++) {
        if (atomic_load_explicit(&p->done, memory_order_acquire) == workers)
            return;
        CPU_RELAX();
    }
    pthread_mutex_lock(&p->mu);
    while (atomic_load_explicit(&p->done, memory_order_acquire) != workers)
        pthread_cond_wait(&p->idle, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
