/* hash.h - the one hash of the engine's tables: SipHash-1-3.
 *
 * Table keys come from places an attacker may control: a model file's
 * vocabulary, merges and tensor names, and the token ids of requests
 * (the prefix cache chains block hashes of client prompts). An unkeyed
 * hash (FNV-1a, a fixed mixer) lets such input be chosen to fall into one
 * probe run and turn loading or lookups quadratic. SipHash is a PRF under
 * a secret 128-bit key, so without the key colliding inputs cannot be
 * precomputed; 1-3 rounds is what Python and Rust use for their tables.
 *
 * moe_hash_bytes / moe_hash_u64 use one random key per process, drawn
 * from getrandom() on first use: values differ from run to run and must
 * never be stored or printed. moe_hash_fixed uses a fixed key for the one
 * place whose output must be reproducible: mkmodel derives each tensor's
 * weight stream from its name and --seed.
 *
 * Any thread.
 */
#ifndef MOE_HASH_H
#define MOE_HASH_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_hash_key {
    uint64_t k0, k1;
} moe_hash_key;

/* SipHash-1-3 of p[0..n) under key k (the reference algorithm with one
 * compression and three finalization rounds). */
uint64_t moe_hash_keyed(const void *p, size_t n, const moe_hash_key *k);

/* The process's secret key: random (getrandom, else clock and address
 * bits), drawn once. */
const moe_hash_key *moe_hash_process_key(void);

/* Keyed by the process key: for every table whose keys come from a file
 * or a request. */
uint64_t moe_hash_bytes(const void *p, size_t n);
uint64_t moe_hash_u64(uint64_t x);

/* Keyed by a fixed key: only where the value must be the same in every
 * run (see above). */
uint64_t moe_hash_fixed(const void *p, size_t n);

#ifdef __cplusplus
}
#endif
#endif
