/* hash.c - SipHash-1-3 and the process key; see hash.h. */
#include "hash.h"

#include <pthread.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>


static inline uint64_t rotl(uint64_t x, int b) { return (x << b) | (x >> (64 - b)); }

#define SIPROUND                                                                                                     \
    do {                                                                                                             \
        v0 += v1, v1 = rotl(v1, 13), v1 ^= v0, v0 = rotl(v0, 32);                                                    \
        v2 += v3, v3 = rotl(v3, 16), v3 ^= v2;                                                                       \
        v0 += v3, v3 = rotl(v3, 21), v3 ^= v0;                                                                       \
        v2 += v1, v1 = rotl(v1, 17), v1 ^= v2, v2 = rotl(v2, 32);                                                    \
    } while (0)

static inline uint64_t le64(const unsigned char *p) {
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--) x = x << 8 | p[i];
    return x;
}

uint64_t moe_hash_keyed(const void *p, size_t n, const moe_hash_key *k) {
    const unsigned char *s = p;
    uint64_t v0 = k->k0 ^ 0x736f6d6570736575ull, v1 = k->k1 ^ 0x646f72616e646f6dull;
    uint64_t v2 = k->k0 ^ 0x6c7967656e657261ull, v3 = k->k1 ^ 0x7465646279746573ull;
    size_t full = n & ~(size_t)7;
    for (size_t i = 0; i < full; i += 8) {
        uint64_t m = le64(s + i);
        v3 ^= m;
        SIPROUND;
        v0 ^= m;
    }
    uint64_t b = (uint64_t)n << 56;
    for (size_t i = full; i < n; i++) b |= (uint64_t)s[i] << (8 * (i - full));
    v3 ^= b;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static moe_hash_key g_key;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void key_init(void) {
    if (getrandom(&g_key, sizeof g_key, GRND_NONBLOCK) != (ssize_t)sizeof g_key) {
        /* Early boot without entropy: still unknown to whoever wrote the
         * file, which is all the tables need. */
        struct timespec ts[2];
        clock_gettime(CLOCK_REALTIME, &ts[0]);
        clock_gettime(CLOCK_MONOTONIC, &ts[1]);
        const moe_hash_key mix = {0x9e3779b97f4a7c15ull, (uint64_t)(uintptr_t)&g_key};
        g_key.k0 = moe_hash_keyed(&ts[0], sizeof ts[0], &mix);
        g_key.k1 = moe_hash_keyed(&ts[1], sizeof ts[1], &mix);
    }
}

const moe_hash_key *moe_hash_process_key(void) {
    pthread_once(&g_once, key_init);
    return &g_key;
}

uint64_t moe_hash_bytes(const void *p, size_t n) { return moe_hash_keyed(p, n, moe_hash_process_key()); }

uint64_t moe_hash_u64(uint64_t x) {
    unsigned char b[8];
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(x >> (8 * i));
    return moe_hash_keyed(b, 8, moe_hash_process_key());
}

uint64_t moe_hash_fixed(const void *p, size_t n) {
    static const moe_hash_key fixed = {0x6d6f65642d6d6b6dull, 0x6f64656c2d736565ull}; /* "moed-mkmodel-see" */
    return moe_hash_keyed(p, n, &fixed);
}
