/* check_gguf - engine/gguf.c: writer/reader round trips and a malformed
 * corpus.
 *
 * The independent reference is a byte builder in this file that lays out
 * GGUF by hand from the format description (magic, version, counts, kvs,
 * tensor infos, aligned data): the writer's output is compared with it
 * byte for byte, and every malformed file is built with it so each field
 * is placed exactly. Interop with llama.cpp's own gguf-py reader/writer is
 * in tests/py/test_gguf_interop.py.
 */
#include <check.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "gguf.h"
#include "status.h"

/* ---- byte builder ---- */

typedef struct {
    uint8_t *p;
    size_t n, cap;
} bb;

static void bb_bytes(bb *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n)
            cap *= 2;
        b->p = realloc(b->p, cap);
        ck_assert_ptr_nonnull(b->p);
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void bb_u8(bb *b, uint8_t x) { bb_bytes(b, &x, 1); }
static void bb_u32(bb *b, uint32_t x) { bb_bytes(b, &x, 4); }
static void bb_u64(bb *b, uint64_t x) { bb_bytes(b, &x, 8); }
static void bb_strn(bb *b, const char *s, size_t n) {
    bb_u64(b, n);
    bb_bytes(b, s, n);
}
static void bb_str(bb *b, const char *s) { bb_strn(b, s, strlen(s)); }
static void bb_pad(bb *b, size_t align) {
    while (b->n % align)
        bb_u8(b, 0);
}
static void bb_zeros(bb *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        bb_u8(b, 0);
}
static void bb_hdr(bb *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    bb_bytes(b, "GGUF", 4);
    bb_u32(b, version);
    bb_u64(b, n_tensors);
    bb_u64(b, n_kv);
}
static void bb_kv_u32(bb *b, const char *key, uint32_t v) {
    bb_str(b, key);
    bb_u32(b, MOE_GGUF_UINT32);
    bb_u32(b, v);
}
static void bb_tinfo(bb *b, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type, uint64_t off) {
    bb_str(b, name);
    bb_u32(b, n_dims);
    for (uint32_t d = 0; d < n_dims; d++)
        bb_u64(b, ne[d]);
    bb_u32(b, type);
    bb_u64(b, off);
}

/* ---- helpers ---- */

static char tmp_path[64];

static void setup_tmp(void) {
    snprintf(tmp_path, sizeof(tmp_path), "/tmp/check_gguf_%d.gguf", (int)getpid());
}
static void teardown_tmp(void) { unlink(tmp_path); }

static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *p = malloc(sz ? (size_t)sz : 1);
    ck_assert_ptr_nonnull(p);
    ck_assert_uint_eq(fread(p, 1, (size_t)sz, f), (size_t)sz);
    fclose(f);
    *n = (size_t)sz;
    return p;
}

static uint8_t pattern(uint64_t i, uint64_t k) { return (uint8_t)(i * 31 + k * 7 + (i >> 8) + 1); }

static char err[MOE_ERR_MAX];

/* Opens `b` from memory and expects failure with `status` and each of the
 * NULL-terminated substrings in the message. */
static void expect_fail(const bb *b, int status, ...) {
    int st = 12345;
    memset(err, 'x', sizeof(err));
    moe_gguf *g = moe_gguf_open_memory(b->p, b->n, &st, err, sizeof(err));
    ck_assert_msg(g == NULL, "accepted a malformed file");
    ck_assert_msg(st == status, "status %s, expected %s (%s)", moe_status_name(st), moe_status_name(status), err);
    ck_assert_msg(memchr(err, 0, sizeof(err)) != NULL, "message not NUL-terminated");
    va_list ap;
    va_start(ap, status);
    for (const char *s; (s = va_arg(ap, const char *));)
        ck_assert_msg(strstr(err, s), "message '%s' lacks '%s'", err, s);
    va_end(ap);
}

static moe_gguf *expect_ok(const bb *b) {
    int st;
    moe_gguf *g = moe_gguf_open_memory(b->p, b->n, &st, err, sizeof(err));
    ck_assert_msg(g != NULL, "refused: %s %s", moe_status_name(st), err);
    return g;
}

/* ---- writer layout vs hand-built bytes ---- */

START_TEST(test_writer_bytes_exact) {
    moe_gguf_writer *w = moe_gguf_writer_new();
    ck_assert_ptr_nonnull(w);
    ck_assert_int_eq(moe_gguf_writer_set_u8(w, "a", 7), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_str(w, "name", "xy"), MOE_OK);
    int64_t ne1[1] = {3}, ne2[2] = {32, 2};
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "t", MOE_TYPE_F32, 1, ne1), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "q", MOE_TYPE_Q8_0, 2, ne2), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_begin(w, tmp_path), MOE_OK);
    float f[3] = {1.0f, 2.0f, -3.5f};
    ck_assert_int_eq(moe_gguf_writer_write_tensor(w, f, sizeof(f)), MOE_OK);
    uint8_t q[68];
    for (int i = 0; i < 68; i++)
        q[i] = pattern(i, 1);
    ck_assert_int_eq(moe_gguf_writer_write_tensor(w, q, 10), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_write_tensor(w, q + 10, 58), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_finish(w), MOE_OK);
    moe_gguf_writer_free(w);

    bb e = {0};
    bb_hdr(&e, 3, 2, 2);
    bb_str(&e, "a");
    bb_u32(&e, MOE_GGUF_UINT8);
    bb_u8(&e, 7);
    bb_str(&e, "name");
    bb_u32(&e, MOE_GGUF_STRING);
    bb_str(&e, "xy");
    bb_tinfo(&e, "t", 1, (uint64_t[]){3}, MOE_TYPE_F32, 0);
    bb_tinfo(&e, "q", 2, (uint64_t[]){32, 2}, MOE_TYPE_Q8_0, 32); /* 12 bytes padded to 32 */
    bb_pad(&e, 32);
    bb_bytes(&e, f, sizeof(f));
    bb_pad(&e, 32);
    bb_bytes(&e, q, sizeof(q));
    bb_pad(&e, 32);

    size_t n;
    uint8_t *got = slurp(tmp_path, &n);
    ck_assert_uint_eq(n, e.n);
    ck_assert_mem_eq(got, e.p, n);
    free(got);
    free(e.p);
}
END_TEST

/* ---- metadata round trip ---- */

static const uint8_t a_u8[] = {0, 1, 255};
static const int8_t a_i8[] = {-128, 0, 127};
static const uint16_t a_u16[] = {0, 65535, 1234};
static const int16_t a_i16[] = {-32768, 32767, -1};
static const uint32_t a_u32[] = {0, UINT32_MAX, 77};
static const int32_t a_i32[] = {INT32_MIN, INT32_MAX, -5};
static const float a_f32[] = {-0.0f, 1e-45f, 3.4028235e38f};
static const uint8_t a_bool[] = {1, 0, 1};
static const uint64_t a_u64[] = {UINT64_MAX, 0, 1ull << 40};
static const int64_t a_i64[] = {INT64_MIN, INT64_MAX, -1};
static const double a_f64[] = {0.1, -1e308, 4.9e-324};

static const struct {
    moe_gguf_vtype t;
    const void *data;
    size_t size;
} fixed_arrays[] = {
    {MOE_GGUF_UINT8, a_u8, sizeof(a_u8)},       {MOE_GGUF_INT8, a_i8, sizeof(a_i8)},
    {MOE_GGUF_UINT16, a_u16, sizeof(a_u16)},    {MOE_GGUF_INT16, a_i16, sizeof(a_i16)},
    {MOE_GGUF_UINT32, a_u32, sizeof(a_u32)},    {MOE_GGUF_INT32, a_i32, sizeof(a_i32)},
    {MOE_GGUF_FLOAT32, a_f32, sizeof(a_f32)},   {MOE_GGUF_BOOL, a_bool, sizeof(a_bool)},
    {MOE_GGUF_UINT64, a_u64, sizeof(a_u64)},    {MOE_GGUF_INT64, a_i64, sizeof(a_i64)},
    {MOE_GGUF_FLOAT64, a_f64, sizeof(a_f64)},
};

static void write_meta_file(void) {
    moe_gguf_writer *w = moe_gguf_writer_new();
    ck_assert_int_eq(moe_gguf_writer_set_u8(w, "s.u8", 255), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_i8(w, "s.i8", -128), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_u16(w, "s.u16", 65535), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_i16(w, "s.i16", -32768), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_u32(w, "s.u32", UINT32_MAX), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_i32(w, "s.i32", INT32_MIN), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_f32(w, "s.f32", 1e-45f), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_bool(w, "s.bool", true), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_bool(w, "s.bool_f", false), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_str(w, "s.str", "hello, gguf"), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_str(w, "s.empty", ""), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_strn(w, "s.nul", "a\0b\0", 4), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_u64(w, "s.u64", UINT64_MAX), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_i64(w, "s.i64", INT64_MIN), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_f64(w, "s.f64", M_PI), MOE_OK);
    /* Replacing a key keeps one entry with the new value and type. */
    ck_assert_int_eq(moe_gguf_writer_set_u32(w, "s.replaced", 1), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_str(w, "s.replaced", "second"), MOE_OK);
    char key[32];
    for (size_t i = 0; i < sizeof(fixed_arrays) / sizeof(fixed_arrays[0]); i++) {
        size_t esz = moe_gguf_vtype_size(fixed_arrays[i].t);
        snprintf(key, sizeof(key), "a.%s", moe_gguf_vtype_name(fixed_arrays[i].t));
        ck_assert_int_eq(moe_gguf_writer_set_arr(w, key, fixed_arrays[i].t, fixed_arrays[i].data,
                                                 fixed_arrays[i].size / esz),
                         MOE_OK);
        snprintf(key, sizeof(key), "e.%s", moe_gguf_vtype_name(fixed_arrays[i].t));
        ck_assert_int_eq(moe_gguf_writer_set_arr(w, key, fixed_arrays[i].t, NULL, 0), MOE_OK);
    }
    const char *strs[] = {"alpha", "", "gamma delta"};
    ck_assert_int_eq(moe_gguf_writer_set_arr_str(w, "a.STRING", strs, 3), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_arr_str(w, "e.STRING", NULL, 0), MOE_OK);

    /* [[1, 2], [], [3]] of INT16, [["x", ""], ["y\0z"]], and [[[7]]]. */
    int16_t n1[] = {1, 2}, n3[] = {3};
    moe_gguf_value inner[3] = {{.type = MOE_GGUF_ARRAY}, {.type = MOE_GGUF_ARRAY}, {.type = MOE_GGUF_ARRAY}};
    inner[0].v.arr = (moe_gguf_array){MOE_GGUF_INT16, 2, n1, NULL};
    inner[1].v.arr = (moe_gguf_array){MOE_GGUF_INT16, 0, NULL, NULL};
    inner[2].v.arr = (moe_gguf_array){MOE_GGUF_INT16, 1, n3, NULL};
    moe_gguf_value outer = {.type = MOE_GGUF_ARRAY};
    outer.v.arr = (moe_gguf_array){MOE_GGUF_ARRAY, 3, NULL, inner};
    ck_assert_int_eq(moe_gguf_writer_set_value(w, "n.int16", &outer), MOE_OK);

    moe_gguf_value s0[2] = {{.type = MOE_GGUF_STRING}, {.type = MOE_GGUF_STRING}}, s1[1] = {{.type = MOE_GGUF_STRING}};
    s0[0].v.str = (moe_gguf_str){"x", 1};
    s0[1].v.str = (moe_gguf_str){"", 0};
    s1[0].v.str = (moe_gguf_str){"y\0z", 3};
    moe_gguf_value sin[2] = {{.type = MOE_GGUF_ARRAY}, {.type = MOE_GGUF_ARRAY}};
    sin[0].v.arr = (moe_gguf_array){MOE_GGUF_STRING, 2, NULL, s0};
    sin[1].v.arr = (moe_gguf_array){MOE_GGUF_STRING, 1, NULL, s1};
    moe_gguf_value sout = {.type = MOE_GGUF_ARRAY};
    sout.v.arr = (moe_gguf_array){MOE_GGUF_ARRAY, 2, NULL, sin};
    ck_assert_int_eq(moe_gguf_writer_set_value(w, "n.str", &sout), MOE_OK);

    uint32_t seven = 7;
    moe_gguf_value l3 = {.type = MOE_GGUF_ARRAY}, l2 = {.type = MOE_GGUF_ARRAY}, l1 = {.type = MOE_GGUF_ARRAY};
    l3.v.arr = (moe_gguf_array){MOE_GGUF_UINT32, 1, &seven, NULL};
    l2.v.arr = (moe_gguf_array){MOE_GGUF_ARRAY, 1, NULL, &l3};
    l1.v.arr = (moe_gguf_array){MOE_GGUF_ARRAY, 1, NULL, &l2};
    ck_assert_int_eq(moe_gguf_writer_set_value(w, "n.deep", &l1), MOE_OK);

    ck_assert_int_eq(moe_gguf_writer_begin(w, tmp_path), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_finish(w), MOE_OK);
    moe_gguf_writer_free(w);
}

START_TEST(test_meta_roundtrip) {
    write_meta_file();
    int st;
    moe_gguf *g = moe_gguf_open(tmp_path, &st, err, sizeof(err));
    ck_assert_msg(g != NULL, "%s", err);
    ck_assert_uint_eq(moe_gguf_version(g), 3);
    ck_assert_uint_eq(moe_gguf_alignment(g), 32);
    ck_assert_uint_eq(moe_gguf_n_tensors(g), 0);
    ck_assert_uint_eq(moe_gguf_n_kv(g), 16 + 2 * 12 + 3);

    const moe_gguf_kv *kv;
#define SCALAR(k, ty, field, val)                                 \
    kv = moe_gguf_find_kv(g, k);                                  \
    ck_assert_ptr_nonnull(kv);                                    \
    ck_assert_str_eq(kv->key, k);                                 \
    ck_assert_int_eq(kv->value.type, ty);                         \
    ck_assert(kv->value.v.field == (val));
    SCALAR("s.u8", MOE_GGUF_UINT8, u64, 255);
    SCALAR("s.i8", MOE_GGUF_INT8, i64, -128);
    SCALAR("s.u16", MOE_GGUF_UINT16, u64, 65535);
    SCALAR("s.i16", MOE_GGUF_INT16, i64, -32768);
    SCALAR("s.u32", MOE_GGUF_UINT32, u64, UINT32_MAX);
    SCALAR("s.i32", MOE_GGUF_INT32, i64, INT32_MIN);
    SCALAR("s.f32", MOE_GGUF_FLOAT32, f64, (double)1e-45f);
    SCALAR("s.bool", MOE_GGUF_BOOL, b, true);
    SCALAR("s.bool_f", MOE_GGUF_BOOL, b, false);
    SCALAR("s.u64", MOE_GGUF_UINT64, u64, UINT64_MAX);
    SCALAR("s.i64", MOE_GGUF_INT64, i64, INT64_MIN);
    SCALAR("s.f64", MOE_GGUF_FLOAT64, f64, M_PI);
#undef SCALAR
    moe_gguf_str s;
    ck_assert_int_eq(moe_gguf_get_str(g, "s.str", &s), MOE_OK);
    ck_assert_uint_eq(s.len, 11);
    ck_assert_mem_eq(s.ptr, "hello, gguf", 11);
    ck_assert_int_eq(moe_gguf_get_str(g, "s.empty", &s), MOE_OK);
    ck_assert_uint_eq(s.len, 0);
    ck_assert_int_eq(moe_gguf_get_str(g, "s.nul", &s), MOE_OK);
    ck_assert_uint_eq(s.len, 4);
    ck_assert_mem_eq(s.ptr, "a\0b\0", 4);
    ck_assert_int_eq(moe_gguf_get_str(g, "s.replaced", &s), MOE_OK);
    ck_assert_mem_eq(s.ptr, "second", 6);

    char key[32];
    for (size_t i = 0; i < sizeof(fixed_arrays) / sizeof(fixed_arrays[0]); i++) {
        moe_gguf_vtype t = fixed_arrays[i].t;
        size_t esz = moe_gguf_vtype_size(t);
        snprintf(key, sizeof(key), "a.%s", moe_gguf_vtype_name(t));
        const moe_gguf_array *a = moe_gguf_get_arr(g, key);
        ck_assert_msg(a != NULL, "%s", key);
        ck_assert_int_eq(a->etype, t);
        ck_assert_uint_eq(a->n, fixed_arrays[i].size / esz);
        ck_assert_ptr_null(a->items);
        ck_assert_mem_eq(a->data, fixed_arrays[i].data, fixed_arrays[i].size);
        snprintf(key, sizeof(key), "e.%s", moe_gguf_vtype_name(t));
        a = moe_gguf_get_arr(g, key);
        ck_assert_ptr_nonnull(a);
        ck_assert_int_eq(a->etype, t);
        ck_assert_uint_eq(a->n, 0);
    }
    /* Element helpers widen with range checks. */
    const moe_gguf_array *a = moe_gguf_get_arr(g, "a.INT8");
    int64_t i64;
    uint64_t u64;
    double f64;
    ck_assert_int_eq(moe_gguf_arr_i64(a, 0, &i64), MOE_OK);
    ck_assert_int_eq(i64, -128);
    ck_assert_int_eq(moe_gguf_arr_u64(a, 0, &u64), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_arr_u64(a, 2, &u64), MOE_OK);
    ck_assert_uint_eq(u64, 127);
    ck_assert_int_eq(moe_gguf_arr_i64(a, 3, &i64), MOE_EINVAL);
    a = moe_gguf_get_arr(g, "a.UINT64");
    ck_assert_int_eq(moe_gguf_arr_u64(a, 0, &u64), MOE_OK);
    ck_assert_uint_eq(u64, UINT64_MAX);
    ck_assert_int_eq(moe_gguf_arr_i64(a, 0, &i64), MOE_EINVAL);
    a = moe_gguf_get_arr(g, "a.FLOAT64");
    ck_assert_int_eq(moe_gguf_arr_f64(a, 1, &f64), MOE_OK);
    ck_assert(f64 == -1e308);
    a = moe_gguf_get_arr(g, "a.FLOAT32");
    ck_assert_int_eq(moe_gguf_arr_f64(a, 2, &f64), MOE_OK);
    ck_assert(f64 == (double)3.4028235e38f);
    ck_assert_int_eq(moe_gguf_arr_u64(a, 0, &u64), MOE_EINVAL);
    a = moe_gguf_get_arr(g, "a.STRING");
    ck_assert_int_eq(a->etype, MOE_GGUF_STRING);
    ck_assert_uint_eq(a->n, 3);
    ck_assert_ptr_null(a->data);
    ck_assert_int_eq(a->items[0].type, MOE_GGUF_STRING);
    ck_assert_mem_eq(a->items[0].v.str.ptr, "alpha", 5);
    ck_assert_uint_eq(a->items[1].v.str.len, 0);
    ck_assert_uint_eq(a->items[2].v.str.len, 11);
    ck_assert_mem_eq(a->items[2].v.str.ptr, "gamma delta", 11);
    ck_assert_int_eq(moe_gguf_arr_u64(a, 0, &u64), MOE_EINVAL);
    a = moe_gguf_get_arr(g, "e.STRING");
    ck_assert_uint_eq(a->n, 0);
    ck_assert_int_eq(a->etype, MOE_GGUF_STRING);

    a = moe_gguf_get_arr(g, "n.int16");
    ck_assert_int_eq(a->etype, MOE_GGUF_ARRAY);
    ck_assert_uint_eq(a->n, 3);
    ck_assert_int_eq(a->items[0].type, MOE_GGUF_ARRAY);
    ck_assert_int_eq(a->items[0].v.arr.etype, MOE_GGUF_INT16);
    ck_assert_uint_eq(a->items[0].v.arr.n, 2);
    ck_assert_int_eq(moe_gguf_arr_i64(&a->items[0].v.arr, 1, &i64), MOE_OK);
    ck_assert_int_eq(i64, 2);
    ck_assert_uint_eq(a->items[1].v.arr.n, 0);
    ck_assert_int_eq(moe_gguf_arr_i64(&a->items[2].v.arr, 0, &i64), MOE_OK);
    ck_assert_int_eq(i64, 3);
    a = moe_gguf_get_arr(g, "n.str");
    ck_assert_uint_eq(a->n, 2);
    ck_assert_uint_eq(a->items[0].v.arr.n, 2);
    ck_assert_mem_eq(a->items[0].v.arr.items[0].v.str.ptr, "x", 1);
    ck_assert_uint_eq(a->items[0].v.arr.items[1].v.str.len, 0);
    ck_assert_uint_eq(a->items[1].v.arr.items[0].v.str.len, 3);
    ck_assert_mem_eq(a->items[1].v.arr.items[0].v.str.ptr, "y\0z", 3);
    a = moe_gguf_get_arr(g, "n.deep");
    const moe_gguf_array *a3 = &a->items[0].v.arr.items[0].v.arr;
    ck_assert_int_eq(a3->etype, MOE_GGUF_UINT32);
    ck_assert_int_eq(moe_gguf_arr_u64(a3, 0, &u64), MOE_OK);
    ck_assert_uint_eq(u64, 7);

    /* kv_at keeps file order and find_kv agrees with it. */
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        kv = moe_gguf_kv_at(g, i);
        ck_assert_ptr_eq(moe_gguf_find_kv(g, kv->key), kv);
    }
    ck_assert_str_eq(moe_gguf_kv_at(g, 0)->key, "s.u8");
    ck_assert_ptr_null(moe_gguf_kv_at(g, moe_gguf_n_kv(g)));
    ck_assert_ptr_null(moe_gguf_find_kv(g, "s.u8x"));
    ck_assert_ptr_null(moe_gguf_find_kv(g, "s."));
    moe_gguf_close(g);
}
END_TEST

START_TEST(test_getters) {
    write_meta_file();
    int st;
    moe_gguf *g = moe_gguf_open(tmp_path, &st, err, sizeof(err));
    ck_assert_ptr_nonnull(g);
    uint64_t u64;
    int64_t i64;
    uint32_t u32;
    double f64;
    float f32;
    bool b;
    moe_gguf_str s;
    ck_assert_int_eq(moe_gguf_get_u64(g, "s.u8", &u64), MOE_OK);
    ck_assert_uint_eq(u64, 255);
    ck_assert_int_eq(moe_gguf_get_u64(g, "s.i8", &u64), MOE_EINVAL); /* negative */
    ck_assert_int_eq(moe_gguf_get_i64(g, "s.i8", &i64), MOE_OK);
    ck_assert_int_eq(i64, -128);
    ck_assert_int_eq(moe_gguf_get_i64(g, "s.u64", &i64), MOE_EINVAL); /* > INT64_MAX */
    ck_assert_int_eq(moe_gguf_get_i64(g, "s.u32", &i64), MOE_OK);
    ck_assert_int_eq(i64, UINT32_MAX);
    ck_assert_int_eq(moe_gguf_get_u32(g, "s.u32", &u32), MOE_OK);
    ck_assert_uint_eq(u32, UINT32_MAX);
    ck_assert_int_eq(moe_gguf_get_u32(g, "s.u16", &u32), MOE_OK);
    ck_assert_uint_eq(u32, 65535);
    ck_assert_int_eq(moe_gguf_get_u32(g, "s.u64", &u32), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_get_u64(g, "s.str", &u64), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_get_u64(g, "s.f32", &u64), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_get_u64(g, "missing", &u64), MOE_ENOTFOUND);
    ck_assert_int_eq(moe_gguf_get_f64(g, "s.f64", &f64), MOE_OK);
    ck_assert(f64 == M_PI);
    ck_assert_int_eq(moe_gguf_get_f32(g, "s.f64", &f32), MOE_OK); /* rounded to the nearest float */
    ck_assert(f32 == (float)M_PI);
    ck_assert_int_eq(moe_gguf_get_f32(g, "s.f32", &f32), MOE_OK);
    ck_assert(f32 == 1e-45f);
    ck_assert_int_eq(moe_gguf_get_f64(g, "s.i16", &f64), MOE_OK); /* exact integer */
    ck_assert(f64 == -32768.0);
    ck_assert_int_eq(moe_gguf_get_f64(g, "s.u64", &f64), MOE_EINVAL); /* 2^64-1 is not a double */
    ck_assert_int_eq(moe_gguf_get_f64(g, "s.str", &f64), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_get_bool(g, "s.bool", &b), MOE_OK);
    ck_assert(b);
    ck_assert_int_eq(moe_gguf_get_bool(g, "s.u8", &b), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_get_bool(g, "nope", &b), MOE_ENOTFOUND);
    ck_assert_int_eq(moe_gguf_get_str(g, "s.u8", &s), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_get_str(g, "nope", &s), MOE_ENOTFOUND);
    ck_assert_ptr_null(moe_gguf_get_arr(g, "s.u8"));
    ck_assert_ptr_null(moe_gguf_get_arr(g, "nope"));
    ck_assert_uint_eq(moe_gguf_vtype_size(MOE_GGUF_UINT16), 2);
    ck_assert_uint_eq(moe_gguf_vtype_size(MOE_GGUF_FLOAT64), 8);
    ck_assert_uint_eq(moe_gguf_vtype_size(MOE_GGUF_STRING), 0);
    ck_assert_uint_eq(moe_gguf_vtype_size(-1), 0);
    ck_assert_uint_eq(moe_gguf_vtype_size(13), 0);
    ck_assert_str_eq(moe_gguf_vtype_name(MOE_GGUF_BOOL), "BOOL");
    ck_assert_str_eq(moe_gguf_vtype_name(99), "unknown");
    moe_gguf_close(g);
}
END_TEST

/* ---- tensors of every type, 1..4 dims, several alignments ---- */

static void tensor_roundtrip(uint32_t align) {
    moe_gguf_writer *w = moe_gguf_writer_new();
    if (align != MOE_GGUF_DEFAULT_ALIGNMENT)
        ck_assert_int_eq(moe_gguf_writer_set_u32(w, "general.alignment", align), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_str(w, "general.architecture", "test"), MOE_OK);
    typedef struct {
        char name[48];
        int type;
        uint32_t nd;
        int64_t ne[4];
        uint64_t nbytes;
    } spec;
    spec specs[MOE_TYPE_COUNT * 4 + 1];
    int ns = 0;
    for (int t = 0; t < MOE_TYPE_COUNT; t++) {
        const moe_type_traits *tr = moe_type_get(t);
        if (!tr)
            continue;
        for (uint32_t nd = 1; nd <= 4; nd++) {
            spec *s = &specs[ns];
            snprintf(s->name, sizeof(s->name), "blk.%d.%s.d%u", ns, tr->name, nd);
            s->type = t;
            s->nd = nd;
            int64_t full[4] = {tr->blck * (1 + (t + nd) % 3), 3, 2, 2};
            s->nbytes = 1;
            for (int d = 0; d < 4; d++) {
                s->ne[d] = d < (int)nd ? full[d] : 1;
                s->nbytes *= (uint64_t)s->ne[d];
            }
            s->nbytes = s->nbytes / (uint64_t)tr->blck * tr->size;
            ck_assert_int_eq(moe_gguf_writer_add_tensor(w, s->name, (moe_type)t, nd, s->ne), MOE_OK);
            ns++;
        }
    }
    /* A zero-sized tensor in the middle takes no space. */
    spec *z = &specs[ns++];
    snprintf(z->name, sizeof(z->name), "empty");
    z->type = MOE_TYPE_F32;
    z->nd = 2;
    z->ne[0] = 4;
    z->ne[1] = 0;
    z->ne[2] = z->ne[3] = 1;
    z->nbytes = 0;
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "empty", MOE_TYPE_F32, 2, z->ne), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_begin(w, tmp_path), MOE_OK);
    uint8_t *buf = malloc(1 << 16);
    for (int k = 0; k < ns; k++) {
        ck_assert_uint_lt(specs[k].nbytes, 1 << 16);
        for (uint64_t i = 0; i < specs[k].nbytes; i++)
            buf[i] = pattern(i, (uint64_t)k);
        /* Stream in uneven chunks. */
        uint64_t done = 0, chunk = 1 + (uint64_t)k * 13 % 97;
        while (done < specs[k].nbytes) {
            uint64_t c = specs[k].nbytes - done < chunk ? specs[k].nbytes - done : chunk;
            ck_assert_int_eq(moe_gguf_writer_write_tensor(w, buf + done, c), MOE_OK);
            done += c;
        }
    }
    free(buf);
    ck_assert_int_eq(moe_gguf_writer_finish(w), MOE_OK);
    moe_gguf_writer_free(w);

    int st;
    moe_gguf *g = moe_gguf_open(tmp_path, &st, err, sizeof(err));
    ck_assert_msg(g != NULL, "%s", err);
    ck_assert_uint_eq(moe_gguf_alignment(g), align);
    ck_assert_uint_eq(moe_gguf_data_offset(g) % align, 0);
    ck_assert_uint_eq(moe_gguf_n_tensors(g), (uint64_t)ns);
    const uint8_t *base = (const uint8_t *)moe_gguf_tensor_at(g, 0)->data - moe_gguf_data_offset(g);
    uint64_t expect_off = 0;
    for (int k = 0; k < ns; k++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, (uint64_t)k);
        ck_assert_str_eq(t->name, specs[k].name);
        ck_assert_ptr_eq(moe_gguf_find_tensor(g, specs[k].name), t);
        ck_assert_int_eq(t->type, specs[k].type);
        ck_assert_uint_eq(t->n_dims, specs[k].nd);
        for (int d = 0; d < 4; d++)
            ck_assert_int_eq(t->ne[d], specs[k].ne[d]);
        ck_assert_uint_eq(t->nbytes, specs[k].nbytes);
        ck_assert_uint_eq(t->offset, expect_off);
        ck_assert_uint_eq(t->offset % align, 0);
        ck_assert_ptr_eq(t->data, base + moe_gguf_data_offset(g) + t->offset);
        ck_assert_uint_eq(((uintptr_t)t->data - (uintptr_t)base) % align, 0);
        const uint8_t *p = t->data;
        for (uint64_t i = 0; i < t->nbytes; i++)
            if (p[i] != pattern(i, (uint64_t)k))
                ck_abort_msg("tensor %s byte %llu differs", t->name, (unsigned long long)i);
        expect_off += (specs[k].nbytes + align - 1) / align * align;
    }
    ck_assert_uint_eq(moe_gguf_file_size(g), moe_gguf_data_offset(g) + expect_off);
    ck_assert_ptr_null(moe_gguf_find_tensor(g, "nope"));
    ck_assert_ptr_null(moe_gguf_tensor_at(g, (uint64_t)ns));
    moe_gguf_close(g);
}

START_TEST(test_tensors_default_align) { tensor_roundtrip(32); }
END_TEST
START_TEST(test_tensors_align_64) { tensor_roundtrip(64); }
END_TEST
START_TEST(test_tensors_align_1) { tensor_roundtrip(1); }
END_TEST
START_TEST(test_tensors_align_4096) { tensor_roundtrip(4096); }
END_TEST

START_TEST(test_open_memory_matches_file) {
    write_meta_file();
    size_t n;
    uint8_t *p = slurp(tmp_path, &n);
    int st;
    moe_gguf *a = moe_gguf_open(tmp_path, &st, err, sizeof(err));
    moe_gguf *b = moe_gguf_open_memory(p, n, &st, err, sizeof(err));
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_nonnull(b);
    ck_assert_uint_eq(moe_gguf_n_kv(a), moe_gguf_n_kv(b));
    ck_assert_uint_eq(moe_gguf_file_size(a), n);
    ck_assert_uint_eq(moe_gguf_data_offset(a), moe_gguf_data_offset(b));
    moe_gguf_str s;
    ck_assert_int_eq(moe_gguf_get_str(b, "s.str", &s), MOE_OK);
    ck_assert((const uint8_t *)s.ptr >= p && (const uint8_t *)s.ptr + s.len <= p + n);
    moe_gguf_close(a);
    moe_gguf_close(b);
    free(p);
    moe_gguf_close(NULL);
}
END_TEST

START_TEST(test_open_errors) {
    int st = 0;
    ck_assert_ptr_null(moe_gguf_open("/nonexistent/dir/x.gguf", &st, err, sizeof(err)));
    ck_assert_int_eq(st, MOE_EIO);
    ck_assert_ptr_nonnull(strstr(err, "/nonexistent/dir/x.gguf"));
    ck_assert_ptr_null(moe_gguf_open("/tmp", &st, err, sizeof(err)));
    ck_assert_int_eq(st, MOE_EIO);
    ck_assert_ptr_nonnull(strstr(err, "not a regular file (directory)"));
    ck_assert_ptr_null(moe_gguf_open("/dev/null", &st, err, sizeof(err)));
    ck_assert_ptr_nonnull(strstr(err, "'/dev/null': not a regular file (character device)"));
    FILE *f = fopen(tmp_path, "wb");
    fclose(f);
    ck_assert_ptr_null(moe_gguf_open(tmp_path, &st, err, sizeof(err)));
    ck_assert_int_eq(st, MOE_EFORMAT);
    /* err may be NULL, and a 1-byte buffer still gets its terminator. */
    ck_assert_ptr_null(moe_gguf_open(tmp_path, &st, NULL, 0));
    char one[1] = {'x'};
    ck_assert_ptr_null(moe_gguf_open(tmp_path, &st, one, 1));
    ck_assert_int_eq(one[0], 0);
}
END_TEST

/* Opening a FIFO must neither wait for a writer nor accept it. */
START_TEST(test_open_fifo) {
    char path[] = "/tmp/check_gguf_fifo_XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(path));
    char fifo[64];
    snprintf(fifo, sizeof fifo, "%s/m.gguf", path);
    ck_assert_int_eq(mkfifo(fifo, 0600), 0);
    alarm(10); /* a blocking open fails the test instead of hanging it */
    int st = 0;
    ck_assert_ptr_null(moe_gguf_open(fifo, &st, err, sizeof(err)));
    alarm(0);
    ck_assert_int_eq(st, MOE_EIO);
    ck_assert_ptr_nonnull(strstr(err, "not a regular file (FIFO)"));
    unlink(fifo);
    rmdir(path);
}
END_TEST

/* The mapping table a SIGBUS handler reads: an open file's bytes are in
 * it under its path, other addresses are not, a closed file is gone. */
START_TEST(test_mapping_lookup) {
    int st;
    const char *path = MOE_SRC_DIR "/tests/fixtures/models/llama.gguf";
    moe_gguf *g = moe_gguf_open(path, &st, err, sizeof(err));
    ck_assert_msg(g != NULL, "%s", err);
    const moe_gguf_tensor *t = moe_gguf_find_tensor(g, "token_embd.weight");
    ck_assert_ptr_nonnull(t);
    const uint8_t *first = (const uint8_t *)t->data - moe_gguf_data_offset(g) - t->offset;
    char got[600] = "unset";
    ck_assert(moe_gguf_mapping_lookup(t->data, got, sizeof got));
    ck_assert_str_eq(got, path);
    ck_assert(moe_gguf_mapping_lookup(first, NULL, 0));
    ck_assert(moe_gguf_mapping_lookup(first + moe_gguf_file_size(g) - 1, NULL, 0));
    ck_assert(!moe_gguf_mapping_lookup(first + moe_gguf_file_size(g), NULL, 0));
    ck_assert(!moe_gguf_mapping_lookup(first - 1, NULL, 0));
    ck_assert(!moe_gguf_mapping_lookup(&st, NULL, 0));
    char small[8];
    ck_assert(moe_gguf_mapping_lookup(t->data, small, sizeof small));
    ck_assert_uint_eq(strlen(small), 7); /* cut, NUL-terminated */
    ck_assert_int_eq(strncmp(small, path, 7), 0);
    const void *data = t->data;
    moe_gguf_close(g);
    ck_assert(!moe_gguf_mapping_lookup(data, NULL, 0));
}
END_TEST

START_TEST(test_fixture_model) {
    int st;
    moe_gguf *g = moe_gguf_open(MOE_SRC_DIR "/tests/fixtures/models/llama.gguf", &st, err, sizeof(err));
    ck_assert_msg(g != NULL, "%s", err);
    moe_gguf_str s;
    ck_assert_int_eq(moe_gguf_get_str(g, "general.architecture", &s), MOE_OK);
    ck_assert_uint_eq(s.len, 5);
    ck_assert_mem_eq(s.ptr, "llama", 5);
    const moe_gguf_tensor *t = moe_gguf_find_tensor(g, "token_embd.weight");
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(t->nbytes, moe_row_size(t->type, t->ne[0]) * (uint64_t)t->ne[1]);
    ck_assert_ptr_nonnull(moe_gguf_get_arr(g, "tokenizer.ggml.tokens"));
    moe_gguf_close(g);
}
END_TEST

/* ---- writer misuse ---- */

START_TEST(test_writer_errors) {
    moe_gguf_writer *w = moe_gguf_writer_new();
    int64_t ne[4] = {32, 2, 1, 1};
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "a", MOE_TYPE_Q4_0, 2, ne), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "a", MOE_TYPE_F32, 1, ne), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "b", (moe_type)4, 1, ne), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "b", (moe_type)99, 1, ne), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "b", MOE_TYPE_Q4_K, 1, ne), MOE_EINVAL); /* 32 % 256 */
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "b", MOE_TYPE_F32, 0, ne), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "b", MOE_TYPE_F32, 5, ne), MOE_EINVAL);
    int64_t neg[2] = {32, -1};
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "b", MOE_TYPE_F32, 2, neg), MOE_EINVAL);
    int64_t huge[2] = {INT64_C(1) << 62, INT64_C(1) << 62};
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "b", MOE_TYPE_F32, 2, huge), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_set_u32(w, "general.alignment", 0), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_set_u32(w, "general.alignment", 48), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_set_u64(w, "general.alignment", 64), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_set_arr(w, "x", MOE_GGUF_STRING, NULL, 0), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_set_arr(w, "x", MOE_GGUF_UINT8, NULL, 3), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_set_str(w, "x", NULL), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_set_u8(w, NULL, 1), MOE_EINVAL);
    moe_gguf_value bad = {.type = (moe_gguf_vtype)13};
    ck_assert_int_eq(moe_gguf_writer_set_value(w, "x", &bad), MOE_EINVAL);
    /* Widened values that do not fit the declared width. */
    bad = (moe_gguf_value){.type = MOE_GGUF_UINT8, .v.u64 = 256};
    ck_assert_int_eq(moe_gguf_writer_set_value(w, "x", &bad), MOE_EINVAL);
    bad = (moe_gguf_value){.type = MOE_GGUF_INT16, .v.i64 = -32769};
    ck_assert_int_eq(moe_gguf_writer_set_value(w, "x", &bad), MOE_EINVAL);
    bad = (moe_gguf_value){.type = MOE_GGUF_UINT32, .v.u64 = 1ull << 33};
    ck_assert_int_eq(moe_gguf_writer_set_value(w, "general.alignment", &bad), MOE_EINVAL);
    bad = (moe_gguf_value){.type = MOE_GGUF_INT32, .v.i64 = INT32_MIN};
    ck_assert_int_eq(moe_gguf_writer_set_value(w, "x", &bad), MOE_OK);
    /* An item whose type differs from the array's etype. */
    moe_gguf_value item = {.type = MOE_GGUF_UINT8};
    moe_gguf_value arr = {.type = MOE_GGUF_ARRAY};
    arr.v.arr = (moe_gguf_array){MOE_GGUF_STRING, 1, NULL, &item};
    ck_assert_int_eq(moe_gguf_writer_set_value(w, "x", &arr), MOE_EINVAL);
    /* Nine levels of arrays are more than the reader accepts. */
    moe_gguf_value lv[10];
    uint8_t byte = 1;
    lv[9].type = MOE_GGUF_ARRAY;
    lv[9].v.arr = (moe_gguf_array){MOE_GGUF_UINT8, 1, &byte, NULL};
    for (int i = 8; i >= 0; i--) {
        lv[i].type = MOE_GGUF_ARRAY;
        lv[i].v.arr = (moe_gguf_array){MOE_GGUF_ARRAY, 1, NULL, &lv[i + 1]};
    }
    ck_assert_int_eq(moe_gguf_writer_set_value(w, "deep9", &lv[1]), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_set_value(w, "deep10", &lv[0]), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_finish(w), MOE_ESTATE); /* before begin */
    ck_assert_int_eq(moe_gguf_writer_write_tensor(w, &byte, 1), MOE_ESTATE);
    ck_assert_int_eq(moe_gguf_writer_begin(w, "/nonexistent/dir/out.gguf"), MOE_EIO);
    moe_gguf_writer_free(w);

    w = moe_gguf_writer_new();
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "a", MOE_TYPE_Q4_0, 2, ne), MOE_OK); /* 36 bytes */
    ck_assert_int_eq(moe_gguf_writer_begin(w, tmp_path), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_set_u8(w, "late", 1), MOE_ESTATE);
    ck_assert_int_eq(moe_gguf_writer_add_tensor(w, "late", MOE_TYPE_F32, 1, ne), MOE_ESTATE);
    ck_assert_int_eq(moe_gguf_writer_begin(w, tmp_path), MOE_ESTATE);
    uint8_t data[40] = {0};
    ck_assert_int_eq(moe_gguf_writer_write_tensor(w, data, 37), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_write_tensor(w, data, 30), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_finish(w), MOE_ESTATE);
    ck_assert_int_eq(moe_gguf_writer_write_tensor(w, data, 7), MOE_EINVAL);
    ck_assert_int_eq(moe_gguf_writer_write_tensor(w, data, 6), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_write_tensor(w, data, 1), MOE_EINVAL); /* all written */
    ck_assert_int_eq(moe_gguf_writer_finish(w), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_finish(w), MOE_ESTATE);
    moe_gguf_writer_free(w);
    moe_gguf_writer_free(NULL);

    /* Eight levels, the most the reader takes, are written and read back. */
    w = moe_gguf_writer_new();
    ck_assert_int_eq(moe_gguf_writer_set_value(w, "deep8", &lv[2]), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_begin(w, tmp_path), MOE_OK);
    ck_assert_int_eq(moe_gguf_writer_finish(w), MOE_OK);
    moe_gguf_writer_free(w);
    int st;
    moe_gguf *g = moe_gguf_open(tmp_path, &st, err, sizeof(err));
    ck_assert_msg(g != NULL, "%s", err);
    moe_gguf_close(g);
}
END_TEST

/* ---- malformed corpus ---- */

/* A valid file: 3 kvs (u32, string array, nested array), two tensors,
 * the last one ending exactly at the end of the file. */
static void build_small(bb *b, uint64_t *data_end) {
    bb_hdr(b, 3, 2, 3);
    bb_kv_u32(b, "general.alignment", 32);
    bb_str(b, "tok");
    bb_u32(b, MOE_GGUF_ARRAY);
    bb_u32(b, MOE_GGUF_STRING);
    bb_u64(b, 2);
    bb_str(b, "ab");
    bb_str(b, "");
    bb_str(b, "nest");
    bb_u32(b, MOE_GGUF_ARRAY);
    bb_u32(b, MOE_GGUF_ARRAY);
    bb_u64(b, 1);
    bb_u32(b, MOE_GGUF_INT16);
    bb_u64(b, 2);
    bb_u32(b, 0xffff0001u);
    bb_tinfo(b, "w.q8", 2, (uint64_t[]){32, 2}, MOE_TYPE_Q8_0, 0);
    bb_tinfo(b, "w.f32", 1, (uint64_t[]){8}, MOE_TYPE_F32, 96);
    bb_pad(b, 32);
    for (int i = 0; i < 68; i++)
        bb_u8(b, pattern(i, 0));
    bb_pad(b, 32);
    for (int i = 0; i < 32; i++)
        bb_u8(b, pattern(i, 1));
    *data_end = b->n;
}

START_TEST(test_truncation_every_offset) {
    bb b = {0};
    uint64_t end;
    build_small(&b, &end);
    moe_gguf_close(expect_ok(&b));
    for (size_t n = 0; n < b.n; n++) {
        /* A copy of exactly n bytes, so ASan catches any read past it. */
        bb t = {0};
        bb_bytes(&t, b.p, n);
        if (n == 0)
            t.p = malloc(1);
        int st;
        moe_gguf *g = moe_gguf_open_memory(t.p, n, &st, err, sizeof(err));
        ck_assert_msg(g == NULL, "prefix of %zu bytes accepted", n);
        ck_assert_int_eq(st, MOE_EFORMAT);
        ck_assert_msg(strstr(err, "truncated") || strstr(err, "exceeds") || strstr(err, "past end") ||
                          strstr(err, "too small") || strstr(err, "need"),
                      "prefix %zu: '%s'", n, err);
        ck_assert_msg(strstr(err, "offset") || strstr(err, "bytes"), "prefix %zu: '%s'", n, err);
        free(t.p);
    }
    free(b.p);
}
END_TEST

START_TEST(test_bad_header) {
    bb b = {0};
    bb_bytes(&b, "GGUG", 4);
    bb_u32(&b, 3);
    bb_u64(&b, 0);
    bb_u64(&b, 0);
    expect_fail(&b, MOE_EFORMAT, "bad magic", "offset 0", NULL);
    b.n = 0;
    bb_bytes(&b, "FUGG", 4);
    bb_u32(&b, 3);
    expect_fail(&b, MOE_EUNSUPPORTED, "byte-swapped", "big-endian", NULL);
    b.n = 0;
    bb_hdr(&b, 0x03000000u, 0, 0);
    expect_fail(&b, MOE_EUNSUPPORTED, "byte-swapped", "big-endian", NULL);
    b.n = 0;
    bb_hdr(&b, 1, 0, 0);
    expect_fail(&b, MOE_EUNSUPPORTED, "version 1", "offset 4", NULL);
    b.n = 0;
    bb_hdr(&b, 99, 0, 0);
    expect_fail(&b, MOE_EUNSUPPORTED, "version 99", NULL);
    b.n = 0;
    bb_hdr(&b, 2, 0, 0); /* version 2 has the same layout */
    moe_gguf *g = expect_ok(&b);
    ck_assert_uint_eq(moe_gguf_version(g), 2);
    moe_gguf_close(g);
    free(b.p);
}
END_TEST

START_TEST(test_huge_counts) {
    const uint64_t huge[] = {1ull << 30, 1ull << 63, UINT64_MAX, UINT64_MAX / 13 + 1};
    for (size_t i = 0; i < sizeof(huge) / sizeof(huge[0]); i++) {
        bb b = {0};
        bb_hdr(&b, 3, 0, huge[i]);
        bb_kv_u32(&b, "k", 1);
        expect_fail(&b, MOE_EFORMAT, "metadata count", NULL);
        b.n = 0;
        bb_hdr(&b, 3, huge[i], 0);
        bb_zeros(&b, 64);
        expect_fail(&b, MOE_EFORMAT, "tensor count", NULL);
        /* Key, string value, string array item and array count. */
        b.n = 0;
        bb_hdr(&b, 3, 0, 1);
        bb_u64(&b, huge[i]);
        bb_zeros(&b, 16);
        expect_fail(&b, MOE_EFORMAT, "kv #0", "key length", "offset 24", NULL);
        b.n = 0;
        bb_hdr(&b, 3, 0, 1);
        bb_str(&b, "general.name");
        bb_u32(&b, MOE_GGUF_STRING);
        bb_u64(&b, huge[i]);
        bb_zeros(&b, 16);
        expect_fail(&b, MOE_EFORMAT, "'general.name'", "string length", NULL);
        b.n = 0;
        bb_hdr(&b, 3, 0, 1);
        bb_str(&b, "tokens");
        bb_u32(&b, MOE_GGUF_ARRAY);
        bb_u32(&b, MOE_GGUF_STRING);
        bb_u64(&b, 2);
        bb_str(&b, "ok");
        bb_u64(&b, huge[i]);
        bb_zeros(&b, 16);
        expect_fail(&b, MOE_EFORMAT, "'tokens'", "string length", NULL);
        const int etypes[] = {MOE_GGUF_UINT8, MOE_GGUF_UINT64, MOE_GGUF_STRING, MOE_GGUF_ARRAY};
        for (size_t e = 0; e < 4; e++) {
            b.n = 0;
            bb_hdr(&b, 3, 0, 1);
            bb_str(&b, "arr");
            bb_u32(&b, MOE_GGUF_ARRAY);
            bb_u32(&b, (uint32_t)etypes[e]);
            bb_u64(&b, huge[i]);
            bb_zeros(&b, 64);
            expect_fail(&b, MOE_EFORMAT, "'arr'", "array of", moe_gguf_vtype_name(etypes[e]), NULL);
        }
        /* Tensor name length. */
        b.n = 0;
        bb_hdr(&b, 3, 1, 0);
        bb_u64(&b, huge[i]);
        bb_zeros(&b, 32);
        expect_fail(&b, MOE_EFORMAT, "tensor #0", "tensor name length", NULL);
        free(b.p);
    }
    /* Counts that fit the bytes left exactly are fine: 64 empty-array kvs
     * would not be, since each kv needs at least 13 bytes. */
    bb b = {0};
    bb_hdr(&b, 3, 0, 2);
    bb_kv_u32(&b, "a", 1);
    expect_fail(&b, MOE_EFORMAT, "metadata count 2", NULL);
    free(b.p);
}
END_TEST

static void hdr_align_kv(bb *b, uint32_t vtype, uint64_t v) {
    bb_str(b, "general.alignment");
    bb_u32(b, vtype);
    if (vtype == MOE_GGUF_UINT64)
        bb_u64(b, v);
    else
        bb_u32(b, (uint32_t)v);
}

START_TEST(test_bad_alignment) {
    bb b = {0};
    bb_hdr(&b, 3, 0, 1);
    hdr_align_kv(&b, MOE_GGUF_UINT32, 0);
    expect_fail(&b, MOE_EFORMAT, "general.alignment", "power of two", NULL);
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    hdr_align_kv(&b, MOE_GGUF_UINT32, 48);
    expect_fail(&b, MOE_EFORMAT, "general.alignment", "48", "power of two", NULL);
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    hdr_align_kv(&b, MOE_GGUF_UINT64, 64);
    expect_fail(&b, MOE_EFORMAT, "general.alignment", "UINT64", "UINT32", NULL);
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    hdr_align_kv(&b, MOE_GGUF_UINT32, 1u << 31);
    moe_gguf *g = expect_ok(&b); /* legal, just large */
    ck_assert_uint_eq(moe_gguf_alignment(g), 1u << 31);
    moe_gguf_close(g);
    free(b.p);
}
END_TEST

/* One tensor `name` after an alignment kv, with `data_bytes` of data. */
static void one_tensor(bb *b, uint32_t nd, const uint64_t *ne, uint32_t type, uint64_t off, size_t data_bytes) {
    bb_hdr(b, 3, 1, 0);
    bb_tinfo(b, "blk.0.attn_q.weight", nd, ne, type, off);
    bb_pad(b, 32);
    bb_zeros(b, data_bytes);
}

START_TEST(test_bad_tensor_infos) {
    bb b = {0};
    one_tensor(&b, 2, (uint64_t[]){8, 2}, MOE_TYPE_F32, 0, 64);
    moe_gguf_close(expect_ok(&b));
    b.n = 0;
    one_tensor(&b, 0, NULL, MOE_TYPE_F32, 0, 64);
    expect_fail(&b, MOE_EFORMAT, "'blk.0.attn_q.weight' (#0)", "n_dims 0", NULL);
    b.n = 0;
    one_tensor(&b, 5, (uint64_t[]){1, 1, 1, 1, 1}, MOE_TYPE_F32, 0, 64);
    expect_fail(&b, MOE_EFORMAT, "'blk.0.attn_q.weight'", "n_dims 5", NULL);
    b.n = 0;
    one_tensor(&b, 2, (uint64_t[]){8, (uint64_t)-3}, MOE_TYPE_F32, 0, 64);
    expect_fail(&b, MOE_EFORMAT, "'blk.0.attn_q.weight'", "dimension 1", "negative (-3)", NULL);
    b.n = 0;
    one_tensor(&b, 2, (uint64_t[]){8, 2}, 99, 0, 64);
    expect_fail(&b, MOE_EUNSUPPORTED, "'blk.0.attn_q.weight'", "unknown tensor type id 99", NULL);
    b.n = 0;
    one_tensor(&b, 2, (uint64_t[]){8, 2}, 4, 0, 64); /* Q4_2: removed upstream */
    expect_fail(&b, MOE_EUNSUPPORTED, "'blk.0.attn_q.weight'", "id 4", NULL);
    b.n = 0;
    one_tensor(&b, 1, (uint64_t[]){48}, MOE_TYPE_Q4_0, 0, 64);
    expect_fail(&b, MOE_EFORMAT, "'blk.0.attn_q.weight'", "ne[0] = 48", "block size 32", NULL);
    b.n = 0;
    one_tensor(&b, 2, (uint64_t[]){1ull << 62, 1ull << 62}, MOE_TYPE_F32, 0, 64);
    expect_fail(&b, MOE_EFORMAT, "'blk.0.attn_q.weight'", "overflows", NULL);
    b.n = 0;
    one_tensor(&b, 1, (uint64_t[]){1ull << 62}, MOE_TYPE_F32, 0, 64); /* 2^64 bytes */
    expect_fail(&b, MOE_EFORMAT, "'blk.0.attn_q.weight'", "overflows", NULL);
    b.n = 0;
    one_tensor(&b, 4, (uint64_t[]){1ull << 20, 1ull << 20, 1ull << 20, 1ull << 20}, MOE_TYPE_I8, 0, 64);
    expect_fail(&b, MOE_EFORMAT, "overflows", NULL);
    b.n = 0;
    one_tensor(&b, 2, (uint64_t[]){8, 2}, MOE_TYPE_F32, 16, 96);
    expect_fail(&b, MOE_EFORMAT, "'blk.0.attn_q.weight'", "offset 16", "not a multiple of the alignment 32", NULL);
    b.n = 0;
    one_tensor(&b, 2, (uint64_t[]){8, 2}, MOE_TYPE_F32, 0, 63);
    expect_fail(&b, MOE_EFORMAT, "tensor 'blk.0.attn_q.weight' (#0): data [offset 0, 64 bytes] extends past end",
                "size", NULL);
    b.n = 0;
    one_tensor(&b, 2, (uint64_t[]){8, 2}, MOE_TYPE_F32, UINT64_MAX - 31, 64); /* offset + nbytes wraps */
    expect_fail(&b, MOE_EFORMAT, "'blk.0.attn_q.weight'", "extends past end", NULL);
    b.n = 0;
    /* A huge nbytes that does not overflow still has to fit the file. */
    one_tensor(&b, 2, (uint64_t[]){1ull << 30, 1ull << 30}, MOE_TYPE_F32, 0, 64);
    expect_fail(&b, MOE_EFORMAT, "'blk.0.attn_q.weight'", "4611686018427387904 bytes", "extends past end", NULL);
    /* Data section itself past EOF (header ends before padding). */
    b.n = 0;
    bb_hdr(&b, 3, 1, 0);
    bb_tinfo(&b, "t", 1, (uint64_t[]){0}, MOE_TYPE_F32, 0);
    expect_fail(&b, MOE_EFORMAT, "data section", "past end of file", NULL);
    /* Zero-sized tensors are fine and overlap nothing. */
    b.n = 0;
    bb_hdr(&b, 3, 3, 0);
    bb_tinfo(&b, "z0", 1, (uint64_t[]){0}, MOE_TYPE_F32, 0);
    bb_tinfo(&b, "a", 1, (uint64_t[]){8}, MOE_TYPE_F32, 0);
    bb_tinfo(&b, "z1", 2, (uint64_t[]){8, 0}, MOE_TYPE_F32, 0);
    bb_pad(&b, 32);
    bb_zeros(&b, 32);
    moe_gguf *g = expect_ok(&b);
    ck_assert_uint_eq(moe_gguf_find_tensor(g, "z1")->nbytes, 0);
    moe_gguf_close(g);
    free(b.p);
}
END_TEST

START_TEST(test_overlap_and_duplicates) {
    bb b = {0};
    bb_hdr(&b, 3, 3, 0);
    bb_tinfo(&b, "c", 1, (uint64_t[]){8}, MOE_TYPE_F32, 64);
    bb_tinfo(&b, "a", 1, (uint64_t[]){16}, MOE_TYPE_F32, 0); /* 64 bytes: [0, 64) */
    bb_tinfo(&b, "b", 1, (uint64_t[]){16}, MOE_TYPE_F32, 32); /* [32, 96) overlaps a and c */
    bb_pad(&b, 32);
    bb_zeros(&b, 128);
    expect_fail(&b, MOE_EFORMAT, "tensor 'b' (#2)", "overlaps tensor 'a' (#1)", NULL);
    b.n = 0;
    bb_hdr(&b, 3, 2, 0);
    bb_tinfo(&b, "x", 1, (uint64_t[]){8}, MOE_TYPE_F32, 0);
    bb_tinfo(&b, "x", 1, (uint64_t[]){8}, MOE_TYPE_F32, 32);
    bb_pad(&b, 32);
    bb_zeros(&b, 64);
    expect_fail(&b, MOE_EFORMAT, "tensor 'x' (#1)", "duplicate tensor name", "#0", NULL);
    b.n = 0;
    bb_hdr(&b, 3, 0, 3);
    bb_kv_u32(&b, "k.a", 1);
    bb_kv_u32(&b, "k.b", 2);
    bb_kv_u32(&b, "k.a", 3);
    expect_fail(&b, MOE_EFORMAT, "kv #2 'k.a'", "duplicate key", "kv #0", NULL);
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    bb_strn(&b, "k\0x", 3);
    bb_u32(&b, MOE_GGUF_UINT8);
    bb_u8(&b, 1);
    expect_fail(&b, MOE_EFORMAT, "kv #0", "key at offset 24", "NUL", NULL);
    b.n = 0;
    bb_hdr(&b, 3, 1, 0);
    bb_strn(&b, "t\0", 2);
    bb_u32(&b, 1);
    bb_u64(&b, 8);
    bb_u32(&b, MOE_TYPE_F32);
    bb_u64(&b, 0);
    bb_pad(&b, 32);
    bb_zeros(&b, 32);
    expect_fail(&b, MOE_EFORMAT, "tensor #0", "tensor name at offset 24", "NUL", NULL);
    free(b.p);
}
END_TEST

START_TEST(test_bad_value_types) {
    bb b = {0};
    bb_hdr(&b, 3, 0, 1);
    bb_str(&b, "k.bad");
    bb_u32(&b, 13);
    bb_zeros(&b, 16);
    expect_fail(&b, MOE_EFORMAT, "kv #0 'k.bad'", "value type 13", "offset 37", NULL);
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    bb_str(&b, "k.bad");
    bb_u32(&b, 0x80000000u);
    bb_zeros(&b, 16);
    expect_fail(&b, MOE_EFORMAT, "'k.bad'", "value type 2147483648", NULL);
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    bb_str(&b, "k.arr");
    bb_u32(&b, MOE_GGUF_ARRAY);
    bb_u32(&b, 77);
    bb_u64(&b, 1);
    bb_zeros(&b, 16);
    expect_fail(&b, MOE_EFORMAT, "'k.arr'", "array element type 77", "offset 41", NULL);
    /* Element type inside a nested array. */
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    bb_str(&b, "k.arr");
    bb_u32(&b, MOE_GGUF_ARRAY);
    bb_u32(&b, MOE_GGUF_ARRAY);
    bb_u64(&b, 1);
    bb_u32(&b, 13);
    bb_u64(&b, 0);
    expect_fail(&b, MOE_EFORMAT, "'k.arr'", "array element type 13", NULL);
    free(b.p);
}
END_TEST

static void nested(bb *b, int levels) {
    bb_hdr(b, 3, 0, 1);
    bb_str(b, "k.deep");
    bb_u32(b, MOE_GGUF_ARRAY);
    for (int i = 1; i < levels; i++) {
        bb_u32(b, MOE_GGUF_ARRAY);
        bb_u64(b, 1);
    }
    bb_u32(b, MOE_GGUF_UINT8);
    bb_u64(b, 1);
    bb_u8(b, 42);
}

START_TEST(test_nesting_limit) {
    bb b = {0};
    nested(&b, 8);
    moe_gguf *g = expect_ok(&b);
    const moe_gguf_array *a = moe_gguf_get_arr(g, "k.deep");
    for (int i = 1; i < 8; i++) {
        ck_assert_int_eq(a->etype, MOE_GGUF_ARRAY);
        a = &a->items[0].v.arr;
    }
    uint64_t u;
    ck_assert_int_eq(moe_gguf_arr_u64(a, 0, &u), MOE_OK);
    ck_assert_uint_eq(u, 42);
    moe_gguf_close(g);
    b.n = 0;
    nested(&b, 9);
    expect_fail(&b, MOE_EFORMAT, "'k.deep'", "nested deeper than 8", NULL);
    b.n = 0;
    nested(&b, 100000);
    expect_fail(&b, MOE_EFORMAT, "'k.deep'", "nested deeper than 8", NULL);
    free(b.p);
}
END_TEST

/* Flipping any single byte of a valid file never crashes the reader. */
START_TEST(test_byte_flips) {
    bb b = {0};
    uint64_t end;
    build_small(&b, &end);
    const uint8_t vals[] = {0x00, 0x01, 0x08, 0x0d, 0x7f, 0x80, 0xff};
    for (size_t i = 0; i < b.n; i++) {
        uint8_t orig = b.p[i];
        for (size_t v = 0; v < sizeof(vals); v++) {
            b.p[i] = vals[v];
            int st;
            moe_gguf *g = moe_gguf_open_memory(b.p, b.n, &st, err, sizeof(err));
            if (g) {
                for (uint64_t k = 0; k < moe_gguf_n_tensors(g); k++) {
                    const moe_gguf_tensor *t = moe_gguf_tensor_at(g, k);
                    ck_assert((const uint8_t *)t->data + t->nbytes <= b.p + b.n);
                }
                moe_gguf_close(g);
            } else {
                ck_assert(st == MOE_EFORMAT || st == MOE_EUNSUPPORTED);
                ck_assert(err[0] != 0);
            }
        }
        b.p[i] = orig;
    }
    free(b.p);
}
END_TEST

/* Names from the file reach logs through error messages: control bytes
 * must not, or a hostile key could forge log lines or terminal escapes. */
START_TEST(test_message_escapes_names) {
    bb b = {0};
    bb_hdr(&b, 3, 0, 2);
    bb_kv_u32(&b, "bad\n\x1b[31mkey\r", 1);
    bb_kv_u32(&b, "bad\n\x1b[31mkey\r", 2);
    expect_fail(&b, MOE_EFORMAT, "kv #1 'bad??[31mkey?'", "duplicate key", NULL);
    ck_assert_ptr_null(strpbrk(err, "\n\r\x1b"));
    b.n = 0;
    bb_hdr(&b, 3, 2, 0);
    bb_tinfo(&b, "w\x07" "a", 1, (uint64_t[]){16}, MOE_TYPE_F32, 0);
    bb_tinfo(&b, "w\x07" "b", 1, (uint64_t[]){16}, MOE_TYPE_F32, 32);
    bb_pad(&b, 32);
    bb_zeros(&b, 96);
    expect_fail(&b, MOE_EFORMAT, "tensor 'w?b' (#1)", "overlaps tensor 'w?a' (#0)", NULL);
    ck_assert_ptr_null(strchr(err, '\x07'));
    free(b.p);
}
END_TEST

/* ---- scale: a real model's shape of header ---- */

/* 3000 keys, a 150k-token vocabulary and 3000 tensors (DeepSeek-V3 has
 * ~1100 tensors, Qwen2 a 151k vocabulary): every key and tensor is found
 * by name with the right value, and vocabulary items are intact. */
START_TEST(test_many_entries) {
    enum { NKV = 3000, NT = 3000, NVOCAB = 150000 };
    moe_gguf_writer *w = moe_gguf_writer_new();
    char key[64];
    for (int i = 0; i < NKV; i++) {
        snprintf(key, sizeof(key), "k.%d", i);
        ck_assert_int_eq(moe_gguf_writer_set_i32(w, key, i * 3 - 7), MOE_OK);
    }
    char **vocab = malloc(NVOCAB * sizeof(char *));
    for (int i = 0; i < NVOCAB; i++) {
        vocab[i] = malloc(16);
        snprintf(vocab[i], 16, "tok%d", i);
    }
    ck_assert_int_eq(moe_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)vocab, NVOCAB),
                     MOE_OK);
    for (int i = 0; i < NT; i++) {
        snprintf(key, sizeof(key), "blk.%d.ffn_up.weight", i);
        ck_assert_int_eq(moe_gguf_writer_add_tensor(w, key, MOE_TYPE_F32, 1, (int64_t[]){1}), MOE_OK);
    }
    ck_assert_int_eq(moe_gguf_writer_begin(w, tmp_path), MOE_OK);
    for (int i = 0; i < NT; i++) {
        float f = (float)i;
        ck_assert_int_eq(moe_gguf_writer_write_tensor(w, &f, 4), MOE_OK);
    }
    ck_assert_int_eq(moe_gguf_writer_finish(w), MOE_OK);
    moe_gguf_writer_free(w);
    moe_gguf *g = moe_gguf_open(tmp_path, NULL, NULL, 0);
    ck_assert_ptr_nonnull(g);
    ck_assert_uint_eq(moe_gguf_n_kv(g), NKV + 1);
    for (int i = NKV - 1; i >= 0; i--) {
        snprintf(key, sizeof(key), "k.%d", i);
        int64_t v;
        ck_assert_int_eq(moe_gguf_get_i64(g, key, &v), MOE_OK);
        ck_assert_int_eq(v, i * 3 - 7);
    }
    for (int i = 0; i < NT; i++) {
        snprintf(key, sizeof(key), "blk.%d.ffn_up.weight", i);
        const moe_gguf_tensor *t = moe_gguf_find_tensor(g, key);
        ck_assert_ptr_eq(t, moe_gguf_tensor_at(g, (uint64_t)i));
        float f;
        memcpy(&f, t->data, 4);
        ck_assert(f == (float)i);
        ck_assert_uint_eq(t->offset, (uint64_t)i * 32);
    }
    ck_assert_ptr_null(moe_gguf_find_tensor(g, "blk.3000.ffn_up.weight"));
    ck_assert_ptr_null(moe_gguf_find_kv(g, "k.3000"));
    const moe_gguf_array *a = moe_gguf_get_arr(g, "tokenizer.ggml.tokens");
    ck_assert_ptr_nonnull(a);
    ck_assert_int_eq(a->etype, MOE_GGUF_STRING);
    ck_assert_uint_eq(a->n, NVOCAB);
    for (int i = 0; i < NVOCAB; i++) {
        ck_assert_uint_eq(a->items[i].v.str.len, strlen(vocab[i]));
        ck_assert_int_eq(memcmp(a->items[i].v.str.ptr, vocab[i], a->items[i].v.str.len), 0);
    }
    moe_gguf_close(g);
    for (int i = 0; i < NVOCAB; i++)
        free(vocab[i]);
    free(vocab);
}
END_TEST

/* ---- hash flooding ---- */

/* Plain FNV-1a 64, the hash an unseeded name index would use. */
static uint64_t plain_fnv1a(const char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* 20000 keys whose plain FNV-1a falls in the first 64 slots of a
 * 65536-slot table: with a predictable hash they form one probe run and
 * loading is quadratic (about 1.3 s at -O2, against ~10 ms seeded). */
START_TEST(test_colliding_keys_load_fast) {
    enum { N = 20000 };
    bb b = {0};
    bb_hdr(&b, 3, 0, N);
    char key[10] = "k";
    uint64_t ctr = 0;
    for (int found = 0; found < N; ctr++) {
        for (int d = 0; d < 8; d++)
            key[1 + d] = "0123456789abcdef"[(ctr >> (4 * d)) & 15];
        if ((plain_fnv1a(key, 9) & 65535) >= 64)
            continue;
        bb_strn(&b, key, 9);
        bb_u32(&b, MOE_GGUF_UINT8);
        bb_u8(&b, (uint8_t)found);
        found++;
    }
    clock_t c0 = clock();
    moe_gguf *g = expect_ok(&b);
    double cpu = (double)(clock() - c0) / CLOCKS_PER_SEC;
    ck_assert_uint_eq(moe_gguf_n_kv(g), N);
    const moe_gguf_kv *last = moe_gguf_kv_at(g, N - 1);
    ck_assert_ptr_eq(moe_gguf_find_kv(g, last->key), last);
    moe_gguf_close(g);
    free(b.p);
    ck_assert_msg(cpu < 0.6, "opening 20000 crafted keys took %.2f s of CPU: name hash is predictable", cpu);
}
END_TEST

static Suite *gguf_suite(void) {
    Suite *s = suite_create("gguf");
    TCase *tc = tcase_create("writer_layout");
    tcase_add_checked_fixture(tc, setup_tmp, teardown_tmp);
    tcase_add_test(tc, test_writer_bytes_exact);
    tcase_add_test(tc, test_writer_errors);
    suite_add_tcase(s, tc);

    tc = tcase_create("metadata");
    tcase_add_checked_fixture(tc, setup_tmp, teardown_tmp);
    tcase_add_test(tc, test_meta_roundtrip);
    tcase_add_test(tc, test_getters);
    tcase_add_test(tc, test_open_memory_matches_file);
    suite_add_tcase(s, tc);

    tc = tcase_create("tensors");
    tcase_add_checked_fixture(tc, setup_tmp, teardown_tmp);
    tcase_add_test(tc, test_tensors_default_align);
    tcase_add_test(tc, test_tensors_align_64);
    tcase_add_test(tc, test_tensors_align_1);
    tcase_add_test(tc, test_tensors_align_4096);
    tcase_add_test(tc, test_fixture_model);
    suite_add_tcase(s, tc);

    tc = tcase_create("malformed");
    tcase_add_checked_fixture(tc, setup_tmp, teardown_tmp);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_open_errors);
    tcase_add_test(tc, test_open_fifo);
    tcase_add_test(tc, test_mapping_lookup);
    tcase_add_test(tc, test_truncation_every_offset);
    tcase_add_test(tc, test_bad_header);
    tcase_add_test(tc, test_huge_counts);
    tcase_add_test(tc, test_bad_alignment);
    tcase_add_test(tc, test_bad_tensor_infos);
    tcase_add_test(tc, test_overlap_and_duplicates);
    tcase_add_test(tc, test_bad_value_types);
    tcase_add_test(tc, test_nesting_limit);
    tcase_add_test(tc, test_byte_flips);
    tcase_add_test(tc, test_message_escapes_names);
    suite_add_tcase(s, tc);

    tc = tcase_create("scale");
    tcase_add_checked_fixture(tc, setup_tmp, teardown_tmp);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_many_entries);
    suite_add_tcase(s, tc);

    tc = tcase_create("hash_flooding");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_colliding_keys_load_fast);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(gguf_suite());
    srunner_set_fork_status(sr, CK_FORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
