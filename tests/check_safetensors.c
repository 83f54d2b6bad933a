/* check_safetensors.c - the safetensors reader on good and hand-built
 * hostile files: every refusal names its cause, nothing handed out points
 * outside the buffer. */
#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"

/* 8-byte little-endian header length, the header, then `data_len` bytes
 * of data (byte i = i & 0xff). Caller frees. */
static uint8_t *mk(const char *header, size_t data_len, size_t *size) {
    size_t hl = strlen(header);
    *size = 8 + hl + data_len;
    uint8_t *b = malloc(*size ? *size : 1);
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(b + 8, header, hl);
    for (size_t i = 0; i < data_len; i++) b[8 + hl + i] = (uint8_t)i;
    return b;
}

/* Opening must fail with MOE_EFORMAT and a message containing `needle`. */
static void refused(const char *header, size_t data_len, const char *needle) {
    size_t n;
    uint8_t *b = mk(header, data_len, &n);
    int st = 0;
    char err[256] = "";
    moe_st *s = moe_st_open_memory(b, n, &st, err, sizeof err);
    ck_assert_msg(s == NULL, "accepted: %s", header);
    ck_assert_int_eq(st, MOE_EFORMAT);
    ck_assert_msg(strstr(err, needle) != NULL, "error '%s' for %s does not say '%s'", err, header, needle);
    free(b);
}

START_TEST(good_file) {
    size_t n;
    uint8_t *b = mk("{\"__metadata__\": {\"format\": \"pt\"}, "
                    "\"b\": {\"dtype\": \"BF16\", \"shape\": [2, 3], \"data_offsets\": [16, 28]}, "
                    "\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}, "
                    "\"s\": {\"dtype\": \"F8_E4M3\", \"shape\": [], \"data_offsets\": [28, 29]}, "
                    "\"z\": {\"dtype\": \"I64\", \"shape\": [0, 5], \"data_offsets\": [29, 29]}}   ",
                    29, &n);
    int st = -1;
    char err[256] = "";
    moe_st *s = moe_st_open_memory(b, n, &st, err, sizeof err);
    ck_assert_msg(s != NULL, "%s", err);
    ck_assert_int_eq(st, MOE_OK);
    ck_assert_uint_eq(moe_st_n_tensors(s), 4);
    const char *order[] = {"a", "b", "s", "z"};
    for (int i = 0; i < 4; i++) ck_assert_str_eq(moe_st_tensor_at(s, (uint64_t)i)->name, order[i]);
    ck_assert_ptr_null(moe_st_tensor_at(s, 4));
    const moe_st_tensor *t = moe_st_find(s, "b");
    ck_assert_ptr_nonnull(t);
    ck_assert_int_eq(t->dtype, MOE_ST_BF16);
    ck_assert_uint_eq(t->n_dims, 2);
    ck_assert_int_eq(t->shape[0], 2);
    ck_assert_int_eq(t->shape[1], 3);
    ck_assert_uint_eq(t->n_elem, 6);
    ck_assert_uint_eq(t->nbytes, 12);
    size_t data0 = n - 29;
    ck_assert_ptr_eq(t->data, b + data0 + 16);
    ck_assert_int_eq(((const uint8_t *)t->data)[0], 16);
    t = moe_st_find(s, "s");
    ck_assert_uint_eq(t->n_dims, 0);
    ck_assert_uint_eq(t->n_elem, 1);
    ck_assert_uint_eq(moe_st_find(s, "z")->nbytes, 0);
    ck_assert_ptr_null(moe_st_find(s, "c"));
    ck_assert_ptr_null(moe_st_find(s, "__metadata__"));
    ck_assert_str_eq(moe_st_metadata(s, "format"), "pt");
    ck_assert_ptr_null(moe_st_metadata(s, "other"));
    ck_assert_str_eq(moe_st_dtype_name(MOE_ST_F8_E4M3), "F8_E4M3");
    ck_assert_uint_eq(moe_st_dtype_size(MOE_ST_F64), 8);
    ck_assert_str_eq(moe_st_dtype_name(99), "?");
    moe_st_close(s);
    moe_st_close(NULL);
    free(b);
}
END_TEST

START_TEST(hostile_headers) {
    /* length field and framing */
    int st;
    char err[256] = "";
    uint8_t tiny[7] = {0};
    ck_assert_ptr_null(moe_st_open_memory(tiny, sizeof tiny, &st, err, sizeof err));
    ck_assert_int_eq(st, MOE_EFORMAT);
    ck_assert(strstr(err, "shorter than the 8-byte header length"));
    uint8_t huge[16] = {0, 0, 0, 0, 0, 0, 0, 0x80};
    ck_assert_ptr_null(moe_st_open_memory(huge, sizeof huge, &st, err, sizeof err));
    ck_assert(strstr(err, "exceeds the limit"));
    uint8_t past[16] = {9, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    ck_assert_ptr_null(moe_st_open_memory(past, sizeof past, &st, err, sizeof err));
    ck_assert(strstr(err, "does not fit the 16-byte file"));
    refused("{\"a\": ", 0, "not valid JSON");
    refused("[1, 2]", 0, "not a JSON object");
    refused("{} x", 0, "trailing bytes");
    /* entries */
    refused("{\"a\": 1}", 0, "tensor 'a': entry is not an object");
    refused("{\"a\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "'dtype' missing");
    refused("{\"a\": {\"dtype\": \"F33\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "unknown dtype 'F33'");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": 1, \"data_offsets\": [0, 4]}}", 4, "'shape' missing or not an array");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", 4, "shape[0] is not a non-negative");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}", 4, "shape[0]");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [1, \"2\"], \"data_offsets\": [0, 8]}}", 8, "shape[1]");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [1e300], \"data_offsets\": [0, 4]}}", 4, "shape[0]");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 4]}}", 4,
            "9 dimensions");
    /* 2^32 * 2^32: the element count overflows 64 bits */
    refused("{\"a\": {\"dtype\": \"U8\", \"shape\": [4294967296, 4294967296], \"data_offsets\": [0, 0]}}", 0,
            "overflows");
    /* 2^62 elements of 8 bytes: the element count fits, the byte count overflows */
    refused("{\"a\": {\"dtype\": \"F64\", \"shape\": [4294967296, 1073741824], \"data_offsets\": [0, 0]}}", 0,
            "overflows");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, "'data_offsets' is not two");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}", 4, "'data_offsets' is not two");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4, 8]}}", 8, "'data_offsets' is not two");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}", 4, "'data_offsets' is not two");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}", 8, "outside the 8-byte data");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 7, "outside the 7-byte data");
    /* offsets past 2^53 cannot be told apart as doubles: refused, never rounded */
    refused("{\"a\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [18446744073709551615, "
            "18446744073709551615]}}", 0, "'data_offsets' is not two");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 4]}}", 8,
            "span 4 bytes but F32 of 2 elements is 8");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, "
            "\"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 8, "overlap at data offset 4");
    /* an empty tensor sorted between two overlapping ones does not hide them */
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}, "
            "\"z\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [4, 4]}, "
            "\"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 12]}}", 16, "overlap");
    refused("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, "
            "\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 8, "'a' appears twice");
    refused("{\"\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "tensor name of 0 bytes");
    refused("{\"__metadata__\": [], \"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
            "'__metadata__' is not an object");
    refused("{\"__metadata__\": {\"k\": 1}}", 0, "'__metadata__' entry 'k' is not a string");
    refused("{\"__metadata__\": {}, \"__metadata__\": {}}", 0, "appears twice");
    /* names are shown without control bytes */
    refused("{\"a\\u001b[31m\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 4]}}", 4, "'a?[31m'");
}
END_TEST

START_TEST(files) {
    int st;
    char err[256] = "", path[128];
    ck_assert_ptr_null(moe_st_open("/nonexistent/x.safetensors", &st, err, sizeof err));
    ck_assert_int_eq(st, MOE_EIO);
    ck_assert(strstr(err, "/nonexistent/x.safetensors"));
    ck_assert_ptr_null(moe_st_open("/tmp", &st, err, sizeof err));
    ck_assert_int_eq(st, MOE_EIO);
    ck_assert(strstr(err, "not a regular file"));
    /* a FIFO is refused at once, not waited on */
    snprintf(path, sizeof path, "/tmp/check_st_%d.fifo", (int)getpid());
    ck_assert_int_eq(mkfifo(path, 0600), 0);
    ck_assert_ptr_null(moe_st_open(path, &st, err, sizeof err));
    ck_assert(strstr(err, "not a regular file"));
    unlink(path);
    /* a good file through the mapping; a bad one names the file */
    size_t n;
    uint8_t *b = mk("{\"w\": {\"dtype\": \"F16\", \"shape\": [2, 2], \"data_offsets\": [0, 8]}}", 8, &n);
    snprintf(path, sizeof path, "/tmp/check_st_%d.safetensors", (int)getpid());
    FILE *f = fopen(path, "wb");
    ck_assert_uint_eq(fwrite(b, 1, n, f), n);
    fclose(f);
    moe_st *s = moe_st_open(path, &st, err, sizeof err);
    ck_assert_msg(s != NULL, "%s", err);
    ck_assert_int_eq(((const uint8_t *)moe_st_find(s, "w")->data)[7], 7);
    moe_st_close(s);
    ck_assert_int_eq(truncate(path, (off_t)n - 1), 0);
    ck_assert_ptr_null(moe_st_open(path, &st, err, sizeof err));
    ck_assert_int_eq(st, MOE_EFORMAT);
    ck_assert(strstr(err, path) && strstr(err, "outside the 7-byte data section"));
    unlink(path);
    free(b);
}
END_TEST

int main(void) {
    Suite *s = suite_create("safetensors");
    TCase *tc = tcase_create("reader");
    tcase_add_test(tc, good_file);
    tcase_add_test(tc, hostile_headers);
    tcase_add_test(tc, files);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
