/* check_kvcache.c - paged KV cache: block allocation, exhaustion, double
 * free, per-sequence tables, and that every block comes back. */
#include <check.h>
#include <stdlib.h>

#include "backend.h"
#include "kvcache.h"

static moe_backend be;
static moe_kv_cache *kv;

static void setup(void) {
    ck_assert_int_eq(moe_cpu_backend_init(&be, &(moe_cpu_backend_opts){.n_threads = 1}), MOE_OK);
    int st = -99;
    kv = moe_kv_create(&be, &(moe_kv_opts){.n_layer = 2, .block_size = 4, .n_blocks = 8, .k_width = 6, .v_width = 6},
                       &st);
    ck_assert_ptr_nonnull(kv);
    ck_assert_int_eq(st, MOE_OK);
}

static void teardown(void) {
    moe_kv_destroy(kv);
    kv = NULL;
    moe_backend_destroy(&be);
}

START_TEST(alloc_free) {
    int32_t a[8], b[1];
    ck_assert_int_eq(moe_kv_n_free(kv), 8);
    ck_assert_int_eq(moe_kv_alloc(kv, 3, a), MOE_OK);
    ck_assert_int_eq(moe_kv_n_free(kv), 5);
    /* distinct, in range */
    for (int i = 0; i < 3; i++) {
        ck_assert(a[i] >= 0 && a[i] < 8);
        for (int j = 0; j < i; j++) ck_assert_int_ne(a[i], a[j]);
    }
    ck_assert_int_eq(moe_kv_alloc(kv, 5, a + 3), MOE_OK);
    ck_assert_int_eq(moe_kv_n_free(kv), 0);
    /* exhaustion: refused, nothing taken */
    ck_assert_int_eq(moe_kv_alloc(kv, 1, b), MOE_EFULL);
    ck_assert_int_eq(moe_kv_free(kv, a, 8), MOE_OK);
    ck_assert_int_eq(moe_kv_n_free(kv), 8);
    ck_assert_int_eq(moe_kv_alloc(kv, 9, a), MOE_EFULL);
    ck_assert_int_eq(moe_kv_n_free(kv), 8);
}
END_TEST

START_TEST(double_free_and_bad_ids) {
    int32_t a[2];
    ck_assert_int_eq(moe_kv_alloc(kv, 2, a), MOE_OK);
    ck_assert_int_eq(moe_kv_free(kv, a, 1), MOE_OK);
    /* a[0] is free already: the whole call is refused, a[1] stays allocated */
    ck_assert_int_eq(moe_kv_free(kv, a, 2), MOE_EINVAL);
    ck_assert_int_eq(moe_kv_n_free(kv), 7);
    int32_t dup[2] = {a[1], a[1]};
    ck_assert_int_eq(moe_kv_free(kv, dup, 2), MOE_EINVAL);
    int32_t bad[1] = {8};
    ck_assert_int_eq(moe_kv_free(kv, bad, 1), MOE_EINVAL);
    ck_assert_int_eq(moe_kv_free(kv, a + 1, 1), MOE_OK);
    ck_assert_int_eq(moe_kv_n_free(kv), 8);
    ck_assert_int_eq(moe_kv_alloc(kv, -1, a), MOE_EINVAL);
}
END_TEST

START_TEST(sequences) {
    moe_kv_seq s1 = {0}, s2 = {0};
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s1, 1), MOE_OK);
    ck_assert_int_eq(s1.n_blocks, 1);
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s1, 4), MOE_OK); /* same block */
    ck_assert_int_eq(s1.n_blocks, 1);
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s1, 5), MOE_OK);
    ck_assert_int_eq(s1.n_blocks, 2);
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s2, 24), MOE_OK);
    ck_assert_int_eq(s2.n_blocks, 6);
    ck_assert_int_eq(moe_kv_n_free(kv), 0);
    /* growing past the pool fails and leaves the table as it was */
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s1, 9), MOE_EFULL);
    ck_assert_int_eq(s1.n_blocks, 2);
    moe_kv_seq_release(kv, &s2);
    ck_assert_int_eq(s2.n_blocks, 0);
    ck_assert_ptr_null(s2.blocks);
    ck_assert_int_eq(moe_kv_n_free(kv), 6);
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s1, 32), MOE_OK);
    ck_assert_int_eq(s1.n_blocks, 8);
    moe_kv_seq_release(kv, &s1);
    ck_assert_int_eq(moe_kv_n_free(kv), 8);
}
END_TEST

START_TEST(storage_and_churn) {
    ck_assert_ptr_nonnull(moe_kv_k(kv, 0));
    ck_assert_ptr_nonnull(moe_kv_v(kv, 1));
    ck_assert_ptr_null(moe_kv_k(kv, 2));
    /* slots are writable end to end */
    float *k = moe_kv_k(kv, 1);
    k[8 * 4 * 6 - 1] = 1.0f;
    /* random alloc/free churn never loses a block */
    moe_kv_seq s[4] = {{0}};
    unsigned r = 12345;
    for (int it = 0; it < 2000; it++) {
        r = r * 1103515245u + 12345u;
        int i = (int)((r >> 16) % 4);
        if ((r >> 8) & 1) moe_kv_seq_release(kv, &s[i]);
        else (void)moe_kv_seq_reserve(kv, &s[i], (int64_t)((r >> 20) % 12));
        int64_t used = 0;
        for (int j = 0; j < 4; j++) used += s[j].n_blocks;
        ck_assert_int_eq(used + moe_kv_n_free(kv), 8);
    }
    for (int j = 0; j < 4; j++) moe_kv_seq_release(kv, &s[j]);
    ck_assert_int_eq(moe_kv_n_free(kv), 8);
}
END_TEST

/* shared blocks: a block returns to the pool only when its last holder
 * frees it; sharing a prefix takes one reference per block */
START_TEST(references) {
    int32_t a[2];
    ck_assert_int_eq(moe_kv_alloc(kv, 2, a), MOE_OK);
    ck_assert_int_eq(moe_kv_refcount(kv, a[0]), 1);
    ck_assert_int_eq(moe_kv_ref(kv, a, 2), MOE_OK);
    ck_assert_int_eq(moe_kv_refcount(kv, a[1]), 2);
    ck_assert_int_eq(moe_kv_free(kv, a, 2), MOE_OK);
    ck_assert_int_eq(moe_kv_n_free(kv), 6); /* still held once */
    ck_assert_int_eq(moe_kv_free(kv, a, 2), MOE_OK);
    ck_assert_int_eq(moe_kv_n_free(kv), 8);
    ck_assert_int_eq(moe_kv_refcount(kv, a[0]), 0);
    ck_assert_int_eq(moe_kv_ref(kv, a, 1), MOE_EINVAL); /* free blocks cannot be shared */
    ck_assert_int_eq(moe_kv_refcount(kv, 99), 0);

    moe_kv_seq s1 = {0}, s2 = {0}, s3 = {0};
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s1, 10), MOE_OK); /* 3 blocks */
    ck_assert_int_eq(moe_kv_seq_share(kv, &s2, &s1, 2), MOE_OK);
    ck_assert_int_eq(s2.n_blocks, 2);
    ck_assert_int_eq(s2.blocks[1], s1.blocks[1]);
    ck_assert_int_eq(moe_kv_n_free(kv), 5);
    ck_assert_int_eq(moe_kv_seq_share(kv, &s2, &s1, 1), MOE_EINVAL); /* s2 not empty */
    ck_assert_int_eq(moe_kv_seq_share(kv, &s3, &s1, 4), MOE_EINVAL); /* more than s1 has */
    /* s2 grows with blocks of its own */
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s2, 12), MOE_OK);
    ck_assert_int_eq(moe_kv_n_free(kv), 4);
    ck_assert_int_ne(s2.blocks[2], s1.blocks[2]);
    moe_kv_seq_release(kv, &s1);
    ck_assert_int_eq(moe_kv_n_free(kv), 5); /* only s1's own third block came back */
    ck_assert_int_eq(moe_kv_refcount(kv, s2.blocks[0]), 1);
    moe_kv_seq_release(kv, &s2);
    ck_assert_int_eq(moe_kv_n_free(kv), 8);
}
END_TEST

START_TEST(bad_create) {
    int st = 0;
    ck_assert_ptr_null(moe_kv_create(&be, &(moe_kv_opts){.n_layer = 1, .block_size = 0, .n_blocks = 1, .k_width = 1}, &st));
    ck_assert_int_eq(st, MOE_EINVAL);
    ck_assert_ptr_null(
        moe_kv_create(&be, &(moe_kv_opts){.n_layer = 1, .block_size = INT64_MAX / 2, .n_blocks = 4, .k_width = 1}, &st));
    ck_assert_int_eq(st, MOE_EINVAL);
    /* MLA layout: no V */
    moe_kv_cache *m = moe_kv_create(&be, &(moe_kv_opts){.n_layer = 1, .block_size = 16, .n_blocks = 2, .k_width = 40}, &st);
    ck_assert_ptr_nonnull(m);
    ck_assert_ptr_null(moe_kv_v(m, 0));
    moe_kv_destroy(m);
}
END_TEST

int main(void) {
    Suite *s = suite_create("kvcache");
    TCase *tc = tcase_create("blocks");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, alloc_free);
    tcase_add_test(tc, double_free_and_bad_ids);
    tcase_add_test(tc, bad_create);
    tcase_add_test(tc, storage_and_churn);
    suite_add_tcase(s, tc);
    TCase *tq = tcase_create("sequences");
    tcase_add_checked_fixture(tq, setup, teardown);
    tcase_add_test(tq, sequences);
    tcase_add_test(tq, references);
    suite_add_tcase(s, tq);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
