/* check_array.c - engine/array.h: the two growth rules and their failures. */
#include <check.h>
#include <stdint.h>
#include <stdlib.h>

#include "array.h"
#include "status.h"

/* Appending one at a time doubles from `min`: 100 appends from 4 reallocate
 * at 5, 9, 17, 33, 65 (5 times) and end with room for 128. */
START_TEST(grow_doubles) {
    int32_t *a = NULL;
    int64_t cap = 0, grows = 0;
    for (int64_t n = 0; n < 100; n++) {
        int64_t before = cap;
        ck_assert_int_eq(moe_array_grow((void **)&a, &cap, n + 1, 4, sizeof *a), MOE_OK);
        grows += cap != before;
        a[n] = (int32_t)n;
    }
    ck_assert_int_eq(cap, 128);
    ck_assert_int_eq(grows, 6); /* the first allocation (4) and five doublings */
    for (int64_t n = 0; n < 100; n++) ck_assert_int_eq(a[n], n);
    /* a jump past twice the capacity lands on a power-of-two multiple */
    ck_assert_int_eq(moe_array_grow((void **)&a, &cap, 1000, 4, sizeof *a), MOE_OK);
    ck_assert_int_eq(cap, 1024);
    ck_assert_int_eq(a[99], 99);
    free(a);
}
END_TEST

/* Scratch grows to exactly the largest need, and never shrinks. */
START_TEST(fit_exact) {
    float *s = NULL;
    int64_t cap = 0;
    ck_assert_int_eq(moe_array_fit((void **)&s, &cap, 300, sizeof *s), MOE_OK);
    ck_assert_int_eq(cap, 300);
    ck_assert_int_eq(moe_array_fit((void **)&s, &cap, 100, sizeof *s), MOE_OK);
    ck_assert_int_eq(cap, 300);
    ck_assert_int_eq(moe_array_fit((void **)&s, &cap, 301, sizeof *s), MOE_OK);
    ck_assert_int_eq(cap, 301);
    free(s);
}
END_TEST

/* A byte size that overflows is MOE_ENOMEM and changes nothing. */
START_TEST(overflow_refused) {
    double *d = NULL;
    int64_t cap = 0;
    ck_assert_int_eq(moe_array_fit((void **)&d, &cap, 8, sizeof *d), MOE_OK);
    double *keep = d;
    ck_assert_int_eq(moe_array_fit((void **)&d, &cap, INT64_MAX / 4, sizeof *d), MOE_ENOMEM);
    ck_assert_int_eq(moe_array_grow((void **)&d, &cap, INT64_MAX, 4, sizeof *d), MOE_ENOMEM);
    ck_assert_ptr_eq(d, keep);
    ck_assert_int_eq(cap, 8);
    free(d);
}
END_TEST

static Suite *array_suite(void) {
    Suite *s = suite_create("array");
    TCase *tc = tcase_create("growth");
    tcase_add_test(tc, grow_doubles);
    tcase_add_test(tc, fit_exact);
    tcase_add_test(tc, overflow_refused);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(array_suite());
    srunner_set_fork_status(sr, CK_FORK);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? EXIT_FAILURE : EXIT_SUCCESS;
}
