/* check_finite.c - Check suite "finite": the NaN/Inf search of finite.h on
 * float rows and on stored tensors of every type moed quantizes, with the
 * bad value in a later decoding chunk than the first and NaN/Inf planted
 * in f16 block scales (what `moed info --check` relies on). */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "finite.h"
#include "qblocks.h"
#include "quant.h"
#include "status.h"

START_TEST(find_in_rows) {
    float x[100];
    for (int i = 0; i < 100; i++) x[i] = (float)i - 50.0f;
    x[10] = 3e38f; /* large but finite */
    ck_assert_int_eq(moe_nonfinite_find(x, 100), -1);
    ck_assert_int_eq(moe_nonfinite_find(x, 0), -1);
    x[99] = -INFINITY;
    ck_assert_int_eq(moe_nonfinite_find(x, 100), 99);
    ck_assert_int_eq(moe_nonfinite_find(x, 99), -1);
    x[42] = NAN;
    ck_assert_int_eq(moe_nonfinite_find(x, 100), 42);
    ck_assert_str_eq(moe_nonfinite_kind(x[42]), "NaN");
    ck_assert_str_eq(moe_nonfinite_kind(INFINITY), "+Inf");
    ck_assert_str_eq(moe_nonfinite_kind(x[99]), "-Inf");
    ck_assert_str_eq(moe_nonfinite_kind(1.0f), "finite");
}
END_TEST

/* Types moe_quantize_row writes, with the byte offset of the block's f16
 * scale d (and of the second f16, m / dmin, or -1). */
static const struct {
    int type;
    int off_d, off_m;
} QT[] = {
    {MOE_TYPE_F32, -1, -1},  {MOE_TYPE_F16, -1, -1},  {MOE_TYPE_BF16, -1, -1}, {MOE_TYPE_Q4_0, 0, -1},
    {MOE_TYPE_Q4_1, 0, 2},   {MOE_TYPE_Q5_0, 0, -1},  {MOE_TYPE_Q5_1, 0, 2},   {MOE_TYPE_Q8_0, 0, -1},
    {MOE_TYPE_Q4_K, 0, 2},   {MOE_TYPE_Q5_K, 0, 2},   {MOE_TYPE_Q6_K, 208, -1},
};

enum { N = 3 * 16384 + 512 }; /* past three decoding chunks, a multiple of 256 */

START_TEST(scan_every_type) {
    int type = QT[_i].type;
    const moe_type_traits *tt = moe_type_get(type);
    float *src = malloc(N * sizeof(float));
    unsigned s = 7;
    for (int i = 0; i < N; i++) {
        s = s * 1664525u + 1013904223u;
        src[i] = (float)((s >> 8) & 0xffff) / 65536.0f - 0.5f;
    }
    size_t nb = moe_row_size(type, N);
    char *q = malloc(nb);
    ck_assert_int_eq(moe_quantize_row(type, src, q, N), MOE_OK);
    int64_t first = 123;
    float v = 0;
    ck_assert_int_eq(moe_nonfinite_scan_tensor(type, q, N, &first, &v), MOE_OK);
    ck_assert_int_eq(first, -1);
    /* a block in the third chunk */
    int64_t blk = (2 * 16384 + 300) / tt->blck, want = blk * tt->blck;
    if (QT[_i].off_d < 0) { /* plain floats: the element itself */
        src[want] = NAN;
        ck_assert_int_eq(moe_quantize_row(type, src, q, N), MOE_OK);
        ck_assert_int_eq(moe_nonfinite_scan_tensor(type, q, N, &first, &v), MOE_OK);
        ck_assert_int_eq(first, want);
        ck_assert(isnan(v));
        src[want] = -INFINITY;
        ck_assert_int_eq(moe_quantize_row(type, src, q, N), MOE_OK);
        ck_assert_int_eq(moe_nonfinite_scan_tensor(type, q, N, &first, &v), MOE_OK);
        ck_assert_int_eq(first, want);
        ck_assert(isinf(v) && v < 0);
    } else {
        const uint16_t bits[3] = {0x7E00, 0x7C00, 0xFC00}; /* f16 NaN, +Inf, -Inf */
        const int offs[2] = {QT[_i].off_d, QT[_i].off_m};
        for (int k = 0; k < 2; k++) {
            if (offs[k] < 0) continue;
            for (int b = 0; b < 3; b++) {
                char *blkp = q + (size_t)blk * tt->size + offs[k];
                uint16_t keep;
                memcpy(&keep, blkp, 2);
                memcpy(blkp, &bits[b], 2);
                ck_assert_int_eq(moe_nonfinite_scan_tensor(type, q, N, &first, &v), MOE_OK);
                ck_assert_msg(first == want, "%s scale at %d = %04x: first %lld, want %lld", moe_type_name(type),
                              offs[k], bits[b], (long long)first, (long long)want);
                ck_assert(!isfinite(v));
                if (b == 0) ck_assert(isnan(v));
                memcpy(blkp, &keep, 2);
            }
        }
    }
    free(src);
    free(q);
}
END_TEST

START_TEST(scan_refusals) {
    int64_t first;
    float v;
    int32_t ints[4] = {1, 2, 3, 4};
    ck_assert_int_eq(moe_nonfinite_scan_tensor(MOE_TYPE_I32, ints, 4, &first, &v), MOE_OK);
    ck_assert_int_eq(first, -1);
    double d[3] = {1, NAN, 2};
    ck_assert_int_eq(moe_nonfinite_scan_tensor(MOE_TYPE_F64, d, 3, &first, &v), MOE_OK);
    ck_assert_int_eq(first, 1);
    char blk[34] = {0};
    ck_assert_int_eq(moe_nonfinite_scan_tensor(MOE_TYPE_Q8_0, blk, 31, &first, &v), MOE_EINVAL); /* not whole blocks */
    ck_assert_int_eq(moe_nonfinite_scan_tensor(99, blk, 32, &first, &v), MOE_EUNSUPPORTED);
    ck_assert_int_eq(moe_nonfinite_scan_tensor(MOE_TYPE_Q8_0, NULL, 32, &first, &v), MOE_EINVAL);
    ck_assert_int_eq(moe_nonfinite_scan_tensor(MOE_TYPE_Q8_0, blk, 32, NULL, &v), MOE_EINVAL);
    ck_assert_int_eq(moe_nonfinite_scan_tensor(MOE_TYPE_Q8_0, blk, 32, &first, &v), MOE_OK);
    ck_assert_int_eq(first, -1); /* scale 0: zeros, finite */
}
END_TEST

int main(void) {
    Suite *s = suite_create("finite");
    TCase *tc = tcase_create("rows");
    tcase_add_test(tc, find_in_rows);
    suite_add_tcase(s, tc);
    tc = tcase_create("tensors");
    tcase_add_loop_test(tc, scan_every_type, 0, (int)(sizeof QT / sizeof *QT));
    tcase_add_test(tc, scan_refusals);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
