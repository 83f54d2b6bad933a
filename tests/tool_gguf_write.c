/* tool_gguf_write - writes a fixed GGUF recipe with moed's writer, for
 * tests/py/test_gguf_interop.py to read back with gguf-py.
 *
 * Usage: tool_gguf_write OUT.gguf
 * The recipe (every metadata type, arrays of every element type, nested
 * and empty arrays, alignment 64, eight tensor types) is mirrored in the
 * Python test; tensor k's byte i is ((i*131 + k*17 + 7 + (i>>8)) & 0xff),
 * streamed in 100-byte chunks.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "status.h"

#define CHECK(x)                                                                     \
    do {                                                                             \
        int rc_ = (x);                                                               \
        if (rc_) {                                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, moe_strerror(rc_)); \
            return 1;                                                                \
        }                                                                            \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUT.gguf\n", argv[0]);
        return 2;
    }
    moe_gguf_writer *w = moe_gguf_writer_new();
    if (!w)
        return 1;
    CHECK(moe_gguf_writer_set_str(w, "general.architecture", "llama"));
    CHECK(moe_gguf_writer_set_u32(w, "general.alignment", 64));
    CHECK(moe_gguf_writer_set_u8(w, "t.u8", 200));
    CHECK(moe_gguf_writer_set_i8(w, "t.i8", -100));
    CHECK(moe_gguf_writer_set_u16(w, "t.u16", 60000));
    CHECK(moe_gguf_writer_set_i16(w, "t.i16", -30000));
    CHECK(moe_gguf_writer_set_u32(w, "t.u32", 4000000000u));
    CHECK(moe_gguf_writer_set_i32(w, "t.i32", -2000000000));
    CHECK(moe_gguf_writer_set_f32(w, "t.f32", 0.1f));
    CHECK(moe_gguf_writer_set_bool(w, "t.bool", true));
    CHECK(moe_gguf_writer_set_str(w, "t.str", "h\xc3\xa9llo w\xc3\xb6rld \xe2\x9c\x93"));
    CHECK(moe_gguf_writer_set_strn(w, "t.str_nul", "a\0b", 3));
    CHECK(moe_gguf_writer_set_str(w, "t.str_empty", ""));
    CHECK(moe_gguf_writer_set_u64(w, "t.u64", 9223372036854775813ull));
    CHECK(moe_gguf_writer_set_i64(w, "t.i64", -4611686018427387907ll));
    CHECK(moe_gguf_writer_set_f64(w, "t.f64", 2.718281828459045));

    const uint8_t u8[] = {0, 1, 255};
    const int8_t i8[] = {-128, 0, 127};
    const uint16_t u16[] = {0, 65535};
    const int16_t i16[] = {-32768, 32767};
    const uint32_t u32[] = {0, 4294967295u};
    const int32_t i32[] = {INT32_MIN, INT32_MAX, 0};
    const float f32[] = {0.5f, -1.25f, 3.4028234663852886e38f};
    const uint8_t bools[] = {1, 0, 1};
    const uint64_t u64[] = {UINT64_MAX, 0};
    const int64_t i64[] = {INT64_MIN, INT64_MAX};
    const double f64[] = {0.1, -1e308};
    CHECK(moe_gguf_writer_set_arr(w, "a.u8", MOE_GGUF_UINT8, u8, 3));
    CHECK(moe_gguf_writer_set_arr(w, "a.i8", MOE_GGUF_INT8, i8, 3));
    CHECK(moe_gguf_writer_set_arr(w, "a.u16", MOE_GGUF_UINT16, u16, 2));
    CHECK(moe_gguf_writer_set_arr(w, "a.i16", MOE_GGUF_INT16, i16, 2));
    CHECK(moe_gguf_writer_set_arr(w, "a.u32", MOE_GGUF_UINT32, u32, 2));
    CHECK(moe_gguf_writer_set_arr(w, "a.i32", MOE_GGUF_INT32, i32, 3));
    CHECK(moe_gguf_writer_set_arr(w, "a.f32", MOE_GGUF_FLOAT32, f32, 3));
    CHECK(moe_gguf_writer_set_arr(w, "a.bool", MOE_GGUF_BOOL, bools, 3));
    CHECK(moe_gguf_writer_set_arr(w, "a.u64", MOE_GGUF_UINT64, u64, 2));
    CHECK(moe_gguf_writer_set_arr(w, "a.i64", MOE_GGUF_INT64, i64, 2));
    CHECK(moe_gguf_writer_set_arr(w, "a.f64", MOE_GGUF_FLOAT64, f64, 2));
    const char *strs[] = {"alpha", "", "\xc3\xbcn\xc3\xaf"};
    CHECK(moe_gguf_writer_set_arr_str(w, "a.str", strs, 3));
    CHECK(moe_gguf_writer_set_arr(w, "a.empty", MOE_GGUF_INT32, NULL, 0));

    const int32_t n0[] = {1, 2}, n1[] = {3};
    moe_gguf_value inner[2] = {{.type = MOE_GGUF_ARRAY}, {.type = MOE_GGUF_ARRAY}};
    inner[0].v.arr = (moe_gguf_array){MOE_GGUF_INT32, 2, n0, NULL};
    inner[1].v.arr = (moe_gguf_array){MOE_GGUF_INT32, 1, n1, NULL};
    moe_gguf_value outer = {.type = MOE_GGUF_ARRAY};
    outer.v.arr = (moe_gguf_array){MOE_GGUF_ARRAY, 2, NULL, inner};
    CHECK(moe_gguf_writer_set_value(w, "a.nested", &outer));

    moe_gguf_value s0[2] = {{.type = MOE_GGUF_STRING}, {.type = MOE_GGUF_STRING}}, s1[1] = {{.type = MOE_GGUF_STRING}};
    s0[0].v.str = (moe_gguf_str){"x", 1};
    s0[1].v.str = (moe_gguf_str){"y", 1};
    s1[0].v.str = (moe_gguf_str){"z", 1};
    moe_gguf_value sin[2] = {{.type = MOE_GGUF_ARRAY}, {.type = MOE_GGUF_ARRAY}};
    sin[0].v.arr = (moe_gguf_array){MOE_GGUF_STRING, 2, NULL, s0};
    sin[1].v.arr = (moe_gguf_array){MOE_GGUF_STRING, 1, NULL, s1};
    moe_gguf_value sout = {.type = MOE_GGUF_ARRAY};
    sout.v.arr = (moe_gguf_array){MOE_GGUF_ARRAY, 2, NULL, sin};
    CHECK(moe_gguf_writer_set_value(w, "a.nested_str", &sout));

    static const struct {
        const char *name;
        moe_type type;
        uint32_t nd;
        int64_t ne[4];
    } tensors[] = {
        {"tok", MOE_TYPE_F32, 2, {8, 3}},       {"h", MOE_TYPE_F16, 1, {16}},
        {"b", MOE_TYPE_BF16, 2, {32, 2}},       {"q8", MOE_TYPE_Q8_0, 2, {64, 2}},
        {"q4k", MOE_TYPE_Q4_K, 2, {256, 2}},    {"q6k", MOE_TYPE_Q6_K, 1, {256}},
        {"i32", MOE_TYPE_I32, 3, {4, 2, 3}},    {"f64", MOE_TYPE_F64, 4, {2, 2, 1, 2}},
    };
    const int nt = (int)(sizeof(tensors) / sizeof(tensors[0]));
    size_t sizes[8];
    for (int k = 0; k < nt; k++) {
        CHECK(moe_gguf_writer_add_tensor(w, tensors[k].name, tensors[k].type, tensors[k].nd, tensors[k].ne));
        sizes[k] = moe_row_size(tensors[k].type, tensors[k].ne[0]);
        for (uint32_t d = 1; d < tensors[k].nd; d++)
            sizes[k] *= (size_t)tensors[k].ne[d];
    }
    CHECK(moe_gguf_writer_begin(w, argv[1]));
    for (int k = 0; k < nt; k++) {
        unsigned char *buf = malloc(sizes[k]);
        if (!buf)
            return 1;
        for (size_t i = 0; i < sizes[k]; i++)
            buf[i] = (unsigned char)((i * 131 + (size_t)k * 17 + 7 + (i >> 8)) & 0xff);
        for (size_t off = 0; off < sizes[k]; off += 100)
            CHECK(moe_gguf_writer_write_tensor(w, buf + off, sizes[k] - off < 100 ? sizes[k] - off : 100));
        free(buf);
    }
    CHECK(moe_gguf_writer_finish(w));
    moe_gguf_writer_free(w);
    return 0;
}
