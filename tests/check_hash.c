/* check_hash.c - the keyed table hash (engine/hash.h).
 *
 * - SipHash-1-3 against an independent implementation: CPython 3.11's
 *   bytes hash is SipHash-1-3, and PYTHONHASHSEED=0 makes its key zero,
 *   so `PYTHONHASHSEED=0 python3 -c "print(hex(hash(b'abc') % 2**64))"`
 *   gives the expected values below (lengths on both sides of the 8-byte
 *   block boundary).
 * - Seeded: two keys give different values, and two processes draw
 *   different process keys.
 * - Flooding: a vocabulary built to pile into one probe run under the old
 *   unkeyed FNV-1a table hash loads as fast as an ordinary one.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "gguf.h"
#include "hash.h"
#include "tokenizer.h"

static const moe_hash_key ZERO = {0, 0};

START_TEST(siphash13_reference) {
    static const struct {
        const char *s;
        uint64_t want;
    } v[] = {
        {"abc", 0xc03bc3a0042630f2ull},
        {"abcdefg", 0x6db12aae9070f506ull},
        {"abcdefgh", 0x3f7b849c0b8e35eaull},
        {"abcdefghijklmno", 0x1fd27a29b0e9dc7aull},
        {"abcdefghijklmnop", 0x94f60d3d29e6a312ull},
        {"0123456789abcdef0123", 0x560ed5360a9a319aull},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        uint64_t got = moe_hash_keyed(v[i].s, strlen(v[i].s), &ZERO);
        ck_assert_msg(got == v[i].want, "'%s': %016llx, want %016llx", v[i].s, (unsigned long long)got,
                      (unsigned long long)v[i].want);
    }
}
END_TEST

/* Two keys: every one of 1000 inputs hashes differently (a 64-bit
 * collision between two keyed PRFs has probability ~1000 / 2^64). */
START_TEST(two_keys_differ) {
    moe_hash_key a = {1, 2}, b = {1, 3};
    char s[32];
    int same = 0;
    for (int i = 0; i < 1000; i++) {
        int n = snprintf(s, sizeof s, "token%d", i);
        same += moe_hash_keyed(s, (size_t)n, &a) == moe_hash_keyed(s, (size_t)n, &b);
    }
    ck_assert_int_eq(same, 0);
    /* the process-keyed entry points use the process key */
    const moe_hash_key *pk = moe_hash_process_key();
    ck_assert(pk->k0 || pk->k1);
    ck_assert_uint_eq(moe_hash_bytes("abc", 3), moe_hash_keyed("abc", 3, pk));
    ck_assert_uint_eq(moe_hash_u64(0x1122334455667788ull), moe_hash_u64_keyed(0x1122334455667788ull, pk));
    same = 0;
    for (uint64_t i = 0; i < 1000; i++) same += moe_hash_u64_keyed(i, &a) == moe_hash_u64_keyed(i, &b);
    ck_assert_int_eq(same, 0);
    /* the fixed variant is not the process one, and is stable */
    ck_assert_uint_ne(moe_hash_fixed("abc", 3), moe_hash_bytes("abc", 3));
    ck_assert_uint_eq(moe_hash_fixed("abc", 3), moe_hash_fixed("abc", 3));
}
END_TEST

/* Two processes that each draw their key: the same input hashes
 * differently (so nobody can precompute collisions offline). */
START_TEST(process_keys_differ) {
    uint64_t h[2];
    for (int i = 0; i < 2; i++) {
        int fd[2];
        ck_assert_int_eq(pipe(fd), 0);
        pid_t pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
            uint64_t x = moe_hash_bytes("vocabulary", 10);
            _exit(write(fd[1], &x, sizeof x) == (ssize_t)sizeof x ? 0 : 1);
        }
        close(fd[1]);
        ck_assert_int_eq(read(fd[0], &h[i], sizeof h[i]), (ssize_t)sizeof h[i]);
        close(fd[0]);
        int ws;
        waitpid(pid, &ws, 0);
        ck_assert(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
    }
    ck_assert_uint_ne(h[0], h[1]);
}
END_TEST

/* Integer keys that differ only in their high bits (merge pairs (a, b)
 * with b fixed, say) spread over a table masked to the low bits: linear
 * probing of 4096 of them into 8192 slots takes ~1.5 probes each, where
 * the identity (or any hash keeping the low bits) would pile them all into
 * one run, ~N^2/2 = 8e6 probes. */
START_TEST(u64_high_bit_keys_spread) {
    enum { N = 4096, SLOTS = 8192 };
    static uint64_t table[SLOTS];
    uint64_t probes = 0;
    for (uint64_t i = 1; i <= N; i++) {
        uint64_t key = i << 32 | 7u;
        uint64_t h = moe_hash_u64(key) & (SLOTS - 1);
        while (table[h]) h = (h + 1) & (SLOTS - 1), probes++;
        table[h] = key;
        probes++;
    }
    ck_assert_msg(probes < 3 * N, "%llu probes for %d keys", (unsigned long long)probes, N);
}
END_TEST

/* The tokenizer's vocabulary hash before it was keyed: FNV-1a with a fold
 * of the high bits. Public, so an attacker can search for keys offline. */
static uint64_t old_fnv(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h ^ (h >> 29);
}

enum { N_FLOOD = 20000 };

/* Writes a vocabulary of N_FLOOD tokens; when `flood`, every token's slot
 * under old_fnv in the tokenizer's table (2 * N rounded up to a power of
 * two) lies in the first 1/16 of it, so linear probing builds one run of
 * ~N and inserting costs ~N^2/2 probes. Found by trying suffixes: ~32
 * tries a token, as cheap for an attacker as for this test. */
static void write_vocab(const char *path, int flood) {
    size_t hsize = 1;
    while (hsize < 2 * (size_t)N_FLOOD) hsize <<= 1;
    const uint64_t window = hsize / 16;
    char **toks = malloc(N_FLOOD * sizeof *toks);
    float *scores = calloc(N_FLOOD, sizeof *scores);
    int32_t *types = malloc(N_FLOOD * sizeof *types);
    ck_assert(toks && scores && types);
    uint64_t tries = 0;
    for (int i = 0; i < N_FLOOD; i++) {
        char s[48];
        int n;
        for (uint64_t k = 0;; k++) {
            n = snprintf(s, sizeof s, "w%d_%llu", i, (unsigned long long)k);
            tries++;
            if (!flood || (old_fnv(s, (size_t)n) & (hsize - 1)) < window) break;
        }
        toks[i] = strdup(s);
        types[i] = 1;
    }
    if (flood) ck_assert_msg(tries < 64ull * N_FLOOD, "%llu tries", (unsigned long long)tries);
    moe_gguf_writer *w = moe_gguf_writer_new();
    ck_assert_int_eq(moe_gguf_writer_set_str(w, "tokenizer.ggml.model", "llama"), 0);
    ck_assert_int_eq(moe_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)toks, N_FLOOD), 0);
    ck_assert_int_eq(moe_gguf_writer_set_arr(w, "tokenizer.ggml.token_type", MOE_GGUF_INT32, types, N_FLOOD), 0);
    ck_assert_int_eq(moe_gguf_writer_set_arr(w, "tokenizer.ggml.scores", MOE_GGUF_FLOAT32, scores, N_FLOOD), 0);
    ck_assert_int_eq(moe_gguf_writer_begin(w, path), 0);
    ck_assert_int_eq(moe_gguf_writer_finish(w), 0);
    moe_gguf_writer_free(w);
    for (int i = 0; i < N_FLOOD; i++) free(toks[i]);
    free(toks);
    free(scores);
    free(types);
}

/* Fastest of three loads, in seconds. */
static double load_s(const char *path) {
    char err[256];
    int st;
    moe_gguf *g = moe_gguf_open(path, &st, err, sizeof err);
    ck_assert_msg(g, "%s", err);
    double best = 1e9;
    for (int r = 0; r < 3; r++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        moe_tok *t = moe_tok_load(g, &st, err, sizeof err);
        clock_gettime(CLOCK_MONOTONIC, &b);
        ck_assert_msg(t, "%s", err);
        ck_assert_int_eq(moe_tok_find(t, "w7_0", 4) >= -1, 1);
        moe_tok_free(t);
        double s = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) * 1e-9;
        if (s < best) best = s;
    }
    moe_gguf_close(g);
    return best;
}

/* Under the old hash the flooding vocabulary took ~N^2/2 = 2e8 probes
 * (hundreds of ms against a few ms); keyed, its tokens spread like any
 * others, so loading stays within a small factor of the ordinary one. */
START_TEST(vocab_flood_loads_linear) {
    char pf[64], pr[64];
    snprintf(pf, sizeof pf, "/tmp/moed_check_hash_flood_%d.gguf", (int)getpid());
    snprintf(pr, sizeof pr, "/tmp/moed_check_hash_plain_%d.gguf", (int)getpid());
    write_vocab(pf, 1);
    write_vocab(pr, 0);
    double tf = load_s(pf), tr = load_s(pr);
    unlink(pf);
    unlink(pr);
    fprintf(stderr, "vocab of %d: flooding %.2f ms, ordinary %.2f ms\n", N_FLOOD, tf * 1e3, tr * 1e3);
    ck_assert_msg(tf < 4 * tr + 0.010, "flooding vocabulary loads in %.1f ms, ordinary in %.1f ms", tf * 1e3,
                  tr * 1e3);
}
END_TEST

static Suite *hash_suite(void) {
    Suite *s = suite_create("hash");
    TCase *tc = tcase_create("siphash");
    tcase_add_test(tc, siphash13_reference);
    suite_add_tcase(s, tc);
    tc = tcase_create("seeded");
    tcase_add_test(tc, two_keys_differ);
    tcase_add_test(tc, process_keys_differ);
    tcase_add_test(tc, u64_high_bit_keys_spread);
    suite_add_tcase(s, tc);
    tc = tcase_create("flood");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, vocab_flood_loads_linear);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(hash_suite());
    srunner_set_fork_status(sr, CK_FORK);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? EXIT_FAILURE : EXIT_SUCCESS;
}
