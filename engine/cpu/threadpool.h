/* threadpool.h - a fixed pool of worker threads for parallel-for loops.
 *
 * The CPU backend splits each op into independent tasks (row ranges of a
 * matmul, heads of attention, ...) and runs them with cpu_pool_run(). The
 * calling thread takes part, so a pool of n threads starts n-1 workers and
 * a pool of 1 runs everything inline. Idle workers spin briefly (a decode
 * step issues many small ops back to back) and then sleep on a condition
 * variable, so an idle server burns no CPU.
 *
 * Threads: one thread at a time may call cpu_pool_run() on a given pool
 * (the engine thread); tasks must not call cpu_pool_run() on the same pool.
 */
#ifndef CPU_THREADPOOL_H
#define CPU_THREADPOOL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cpu_pool cpu_pool;

/* One unit of work. `task` is in [0, n_tasks); `thread` in
 * [0, cpu_pool_size()) names the thread running it, for per-thread
 * scratch buffers. Which thread runs which task is not specified. */
typedef void (*cpu_task_fn)(void *ctx, int64_t task, int thread);

/* Creates a pool of n threads in total (n - 1 workers plus the caller).
 * n <= 0 means one per online CPU. Returns NULL and sets *status
 * (MOE_ENOMEM, MOE_EINVAL) when the threads cannot be started; status may
 * be NULL. Caller frees with cpu_pool_destroy(). */
cpu_pool *cpu_pool_create(int n, int *status);

/* Stops and joins the workers and frees the pool. NULL is a no-op. */
void cpu_pool_destroy(cpu_pool *pool);

/* Number of threads (workers + caller); 1 for a NULL pool. */
int cpu_pool_size(const cpu_pool *pool);

/* Runs fn(ctx, task, thread) for every task in [0, n_tasks) and returns
 * when all have finished. Tasks are handed out dynamically, one at a time.
 * A NULL pool runs them inline on the caller's thread (thread 0). */
void cpu_pool_run(cpu_pool *pool, cpu_task_fn fn, void *ctx, int64_t n_tasks);

#ifdef __cplusplus
}
#endif
#endif
