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

#include <stddef.h>
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

/* Reusable scratch owned by the pool, one buffer per slot, so the ops of
 * a steady-state step allocate nothing: the buffer grows (contents not
 * kept) when n exceeds what the slot held, and lives until
 * cpu_pool_destroy(). Slots keep nested users apart (the moe op's buffer
 * stays valid across the matmuls it calls). Returns NULL for a NULL pool
 * or on allocation failure. The pool's calling thread only. */
enum {
    CPU_SCRATCH_MATMUL = 0, /* cpu_matmul*: active experts, per-thread rows, quantized activations */
    CPU_SCRATCH_ATTN,       /* attention: per-thread scores */
    CPU_SCRATCH_MLA,        /* MLA: absorbed queries and latent outputs */
    CPU_SCRATCH_MLA_LATENT, /* MLA: scores, softmax sums, task list */
    CPU_SCRATCH_HEADS,      /* per-head products: gathered inputs and outputs */
    CPU_SCRATCH_MOE,        /* moe: routing and expert activations */
    CPU_SCRATCH_COUNT
};
void *cpu_pool_scratch(cpu_pool *pool, int slot, size_t n);

#ifdef __cplusplus
}
#endif
#endif
