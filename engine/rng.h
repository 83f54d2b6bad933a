/* rng.h - the one pseudo-random generator of moed: xoshiro256**, seeded
 * through splitmix64. The same seed gives the same stream on every
 * platform, so sampling with a request's seed and mkmodel's weights are
 * reproducible. Not for secrets (hash.h keys its tables from getrandom).
 *
 * Threads: a moe_rng belongs to one thread at a time; the functions
 * without one are any-thread.
 */
#ifndef MOE_RNG_H
#define MOE_RNG_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_rng {
    uint64_t s[4];
} moe_rng;

void moe_rng_seed(moe_rng *r, uint64_t seed);
uint64_t moe_rng_next(moe_rng *r);
/* Uniform in [0, 1) with 53 random bits. */
double moe_rng_uniform(moe_rng *r);
/* A seed from the OS (getrandom), falling back to the clock. */
uint64_t moe_rng_os_seed(void);

/* One splitmix64 step of state *x: a stateless way to derive well-mixed
 * seeds from counters (row numbers, ids). */
uint64_t moe_splitmix64(uint64_t *x);

#ifdef __cplusplus
}
#endif
#endif
