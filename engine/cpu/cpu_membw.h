/* cpu_membw.h - measures the memory read bandwidth the CPU kernels can
 * expect, for benchmarks that compare a decode step's bytes per second
 * with what the memory delivers (moed bench, tool_matbench).
 *
 * The pool's threads sum a buffer of uint64 words (AVX2 when present) far
 * larger than the last-level cache, in a few large chunks per thread; the
 * result is the best of `passes` timed passes, after one untimed pass that
 * faults the pages in.
 *
 * Threads: serialised with every other user of the pool (threadpool.h).
 */
#ifndef CPU_MEMBW_H
#define CPU_MEMBW_H

#include <stddef.h>

#include "threadpool.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Read bandwidth in bytes per second over a `bytes`-sized buffer (at least
 * 1 MiB), best of `passes` (>= 1). Returns the bandwidth, or a negative
 * moe_status (MOE_EINVAL, MOE_ENOMEM) when it cannot measure. */
double cpu_mem_read_bw(cpu_pool *pool, size_t bytes, int passes);

/* The same over a caller's buffer (at least 1 MiB, filled with non-zero
 * data), so a benchmark can measure again between its phases without
 * paying for the allocation each time. */
double cpu_mem_read_bw_buf(cpu_pool *pool, const void *buf, size_t bytes, int passes);

#ifdef __cplusplus
}
#endif
#endif
