/* hash.h - the byte-string hash of the engine's open-addressed tables
 * (tokenizer vocabulary, mkmodel's token set): FNV-1a with a final fold
 * of the high bits into the low ones, which the tables mask for the slot.
 * Not for keys an attacker chooses (gguf.c seeds its own for that). */
#ifndef MOE_HASH_H
#define MOE_HASH_H

#include <stddef.h>
#include <stdint.h>

static inline uint64_t moe_hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h ^ (h >> 29);
}

#endif
