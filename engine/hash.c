/* hash.c - SipHash-1-3 and the process key; see hash.h. */
#include "hash.h"

#include <pthread.h>
#include <sys/random.h>
#include <time.h>


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

uint64_t moe_hash_u64(uint64_t x) { return moe_hash_u64_keyed(x, moe_hash_process_key()); }

uint64_t moe_hash_fixed(const void *p, size_t n) {
    static const moe_hash_key fixed = {0x6d6f65642d6d6b6dull, 0x6f64656c2d736565ull}; /* "moed-mkmodel-see" */
    return moe_hash_keyed(p, n, &fixed);
}
