/* hash.h - the one keyed hash of the engine's tables.
 *
 * Table keys come from places an attacker may control: a model file's
 * vocabulary, merges and tensor names, and the token ids of requests
 * (the prefix cache chains block hashes of client prompts). An unkeyed
 * hash (FNV-1a, a fixed mixer) lets such input be chosen to fall into one
 * probe run and turn loading or lookups quadratic. SipHash is a PRF under
 * a secret 128-bit key, so without the key colliding inputs cannot be
 * precomputed; 1-3 rounds is what Python and Rust use for their tables.
 *
 * Byte strings get SipHash-1-3, 64-bit integers a keyed wyhash-style mix
 * (see moe_hash_u64_keyed); both under the same key.
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
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_hash_key {
    uint64_t k0, k1;
} moe_hash_key;

/* SipHash-1-3 of p[0..n) under key k (the reference algorithm with one
 * compression and three finalization rounds). Inline: the tokenizer calls
 * it per vocabulary lookup, with the key copied into its own struct. */
static inline uint64_t moe_hash_keyed(const void *p, size_t n, const moe_hash_key *k);
/* A 64-bit integer under key k: wyhash's multiply-and-fold twice, keyed
 * both times. Not SipHash: it is the BPE merge lookup of the tokenizer's
 * inner loop, where SipHash-1-3 cost 18% more instructions per encode
 * (callgrind, tool_tokbench on DeepSeek-V2's vocabulary) and this 2%. */
static inline uint64_t moe_hash_u64_keyed(uint64_t x, const moe_hash_key *k);

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

/* SipHash's state and steps (Aumasson & Bernstein); internal. */
typedef struct moe__sip {
    uint64_t v0, v1, v2, v3;
} moe__sip;

static inline uint64_t moe__rotl(uint64_t x, int b) { return (x << b) | (x >> (64 - b)); }

static inline void moe__sip_round(moe__sip *s) {
    s->v0 += s->v1, s->v1 = moe__rotl(s->v1, 13), s->v1 ^= s->v0, s->v0 = moe__rotl(s->v0, 32);
    s->v2 += s->v3, s->v3 = moe__rotl(s->v3, 16), s->v3 ^= s->v2;
    s->v0 += s->v3, s->v3 = moe__rotl(s->v3, 21), s->v3 ^= s->v0;
    s->v2 += s->v1, s->v1 = moe__rotl(s->v1, 17), s->v1 ^= s->v2, s->v2 = moe__rotl(s->v2, 32);
}

static inline moe__sip moe__sip_init(const moe_hash_key *k) {
    moe__sip s = {k->k0 ^ 0x736f6d6570736575ull, k->k1 ^ 0x646f72616e646f6dull, k->k0 ^ 0x6c7967656e657261ull,
                  k->k1 ^ 0x7465646279746573ull};
    return s;
}

/* One compression round per message word: the "1" of SipHash-1-3. */
static inline void moe__sip_word(moe__sip *s, uint64_t m) {
    s->v3 ^= m;
    moe__sip_round(s);
    s->v0 ^= m;
}

/* The last word (the length in its top byte) and three finalization rounds. */
static inline uint64_t moe__sip_final(moe__sip *s, uint64_t last) {
    moe__sip_word(s, last);
    s->v2 ^= 0xff;
    moe__sip_round(s);
    moe__sip_round(s);
    moe__sip_round(s);
    return s->v0 ^ s->v1 ^ s->v2 ^ s->v3;
}

static inline uint64_t moe_hash_keyed(const void *p, size_t n, const moe_hash_key *k) {
    const unsigned char *b = (const unsigned char *)p;
    moe__sip s = moe__sip_init(k);
    size_t full = n & ~(size_t)7;
    for (size_t i = 0; i < full; i += 8) {
        uint64_t m;
        memcpy(&m, b + i, 8); /* one load: moed runs on little-endian hosts only (gguf.c checks) */
        moe__sip_word(&s, m);
    }
    uint64_t last = (uint64_t)n << 56;
    for (size_t i = full; i < n; i++) last |= (uint64_t)b[i] << (8 * (i - full));
    return moe__sip_final(&s, last);
}

/* 64x64 -> 128-bit multiply, halves folded: wyhash's mixing step. */
static inline uint64_t moe__mum(uint64_t a, uint64_t b) {
    unsigned __int128 r = (unsigned __int128)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

static inline uint64_t moe_hash_u64_keyed(uint64_t x, const moe_hash_key *k) {
    uint64_t h = moe__mum(x ^ k->k0 ^ 0xa0761d6478bd642full, k->k1 ^ 0xe7037ed1a0b428dbull);
    return moe__mum(h ^ k->k1 ^ 0x8ebc6af09c88c6e3ull, k->k0 ^ 0x589965cc75374cc3ull);
}

#ifdef __cplusplus
}
#endif
#endif
