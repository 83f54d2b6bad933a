/* opstats.h - a backend that wraps another to time its ops and count the
 * memory traffic they imply, so the forward pass itself carries neither.
 *
 * moe_opstats_create() fills a moe_backend whose ops call the wrapped
 * backend's. With timing on, each op's wall time is summed by op and by
 * step size (one token, up to 64, more); with counting on, each op adds
 * the weight bytes it reads once per call (matrices, norm weights, biases,
 * the embedding rows looked up, the distinct routed experts a moe call
 * selects) and the KV cache bytes attention reads. On a device backend the
 * times are those of queueing unless the backend synchronises.
 *
 * Threads: belongs to the thread that owns the wrapped backend.
 */
#ifndef MOE_OPSTATS_H
#define MOE_OPSTATS_H

#include <stdbool.h>
#include <stdint.h>

#include "backend.h"
#include "forward.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_opstats moe_opstats;

/* Wraps `inner` (which must outlive the wrapper) into *out. Returns NULL
 * on allocation failure. Free with moe_opstats_free(); destroying *out
 * does not destroy `inner`. */
moe_opstats *moe_opstats_create(const moe_backend *inner, moe_backend *out);
void moe_opstats_free(moe_opstats *s); /* NULL is a no-op */

/* Starts a step of n_tok tokens: sets the time bucket and, with `count`,
 * zeroes the traffic count. */
void moe_opstats_begin_step(moe_opstats *s, int64_t n_tok, bool time, bool count);

/* The traffic counted since the last moe_opstats_begin_step. Returns
 * MOE_OK, MOE_ENOMEM (a moe call could not grow its routing scratch, so
 * the count is short) or MOE_EINVAL (NULL argument). */
int moe_opstats_traffic(const moe_opstats *s, moe_fwd_traffic *out);

/* Logs the time table (moe_log, info level); nothing when no op was
 * timed. */
void moe_opstats_log_profile(const moe_opstats *s);

#ifdef __cplusplus
}
#endif
#endif
