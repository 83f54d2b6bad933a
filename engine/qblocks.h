/* qblocks.h - tensor element types and quantized block layouts.
 *
 * The numeric type ids and the byte layout of every block are exactly
 * those of GGUF files written by llama.cpp, so weights are used in place
 * from the memory-mapped file. This header is plain C that gcc and nvcc
 * both compile; every block size is pinned by a _Static_assert.
 */
#ifndef MOE_QBLOCKS_H
#define MOE_QBLOCKS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#define MOE_STATIC_ASSERT(c, m) static_assert(c, m)
extern "C" {
#else
#define MOE_STATIC_ASSERT(c, m) _Static_assert(c, m)
#endif

/* GGUF tensor type ids (ggml_type numbering). Gaps are ids that were
 * removed upstream or belong to types moed does not know. */
typedef enum moe_type {
    MOE_TYPE_F32 = 0,
    MOE_TYPE_F16 = 1,
    MOE_TYPE_Q4_0 = 2,
    MOE_TYPE_Q4_1 = 3,
    MOE_TYPE_Q5_0 = 6,
    MOE_TYPE_Q5_1 = 7,
    MOE_TYPE_Q8_0 = 8,
    MOE_TYPE_Q8_1 = 9,
    MOE_TYPE_Q2_K = 10,
    MOE_TYPE_Q3_K = 11,
    MOE_TYPE_Q4_K = 12,
    MOE_TYPE_Q5_K = 13,
    MOE_TYPE_Q6_K = 14,
    MOE_TYPE_Q8_K = 15,
    MOE_TYPE_I8 = 24,
    MOE_TYPE_I16 = 25,
    MOE_TYPE_I32 = 26,
    MOE_TYPE_I64 = 27,
    MOE_TYPE_F64 = 28,
    MOE_TYPE_BF16 = 30,
    MOE_TYPE_COUNT = 31 /* one past the largest id in this table */
} moe_type;

typedef uint16_t moe_f16;  /* IEEE half, stored as bits */
typedef uint16_t moe_bf16; /* bfloat16, stored as bits */

#define MOE_QK4_0 32
#define MOE_QK4_1 32
#define MOE_QK5_0 32
#define MOE_QK5_1 32
#define MOE_QK8_0 32
#define MOE_QK8_1 32
#define MOE_QK_K 256
#define MOE_K_SCALE_SIZE 12

/* Q4_0: x = d * (q - 8), q in [0,15]; low nibbles hold elements 0..15,
 * high nibbles 16..31. */
typedef struct {
    moe_f16 d;
    uint8_t qs[MOE_QK4_0 / 2];
} moe_block_q4_0;
MOE_STATIC_ASSERT(sizeof(moe_block_q4_0) == 2 + MOE_QK4_0 / 2, "q4_0 block");

/* Q4_1: x = d * q + m. */
typedef struct {
    moe_f16 d;
    moe_f16 m;
    uint8_t qs[MOE_QK4_1 / 2];
} moe_block_q4_1;
MOE_STATIC_ASSERT(sizeof(moe_block_q4_1) == 4 + MOE_QK4_1 / 2, "q4_1 block");

/* Q5_0: x = d * (q - 16); bit 4 of element j is bit j of qh. */
typedef struct {
    moe_f16 d;
    uint8_t qh[4];
    uint8_t qs[MOE_QK5_0 / 2];
} moe_block_q5_0;
MOE_STATIC_ASSERT(sizeof(moe_block_q5_0) == 2 + 4 + MOE_QK5_0 / 2, "q5_0 block");

/* Q5_1: x = d * q + m. */
typedef struct {
    moe_f16 d;
    moe_f16 m;
    uint8_t qh[4];
    uint8_t qs[MOE_QK5_1 / 2];
} moe_block_q5_1;
MOE_STATIC_ASSERT(sizeof(moe_block_q5_1) == 4 + 4 + MOE_QK5_1 / 2, "q5_1 block");

/* Q8_0: x = d * q. */
typedef struct {
    moe_f16 d;
    int8_t qs[MOE_QK8_0];
} moe_block_q8_0;
MOE_STATIC_ASSERT(sizeof(moe_block_q8_0) == 2 + MOE_QK8_0, "q8_0 block");

/* Q8_1: Q8_0 plus s = d * sum(q), used for activations. */
typedef struct {
    moe_f16 d;
    moe_f16 s;
    int8_t qs[MOE_QK8_1];
} moe_block_q8_1;
MOE_STATIC_ASSERT(sizeof(moe_block_q8_1) == 4 + MOE_QK8_1, "q8_1 block");

/* Q2_K: 16 sub-blocks of 16, 4-bit scale and min each. */
typedef struct {
    uint8_t scales[MOE_QK_K / 16];
    uint8_t qs[MOE_QK_K / 4];
    moe_f16 d;
    moe_f16 dmin;
} moe_block_q2_K;
MOE_STATIC_ASSERT(sizeof(moe_block_q2_K) == 2 * 2 + MOE_QK_K / 16 + MOE_QK_K / 4, "q2_K block");

/* Q3_K: 16 sub-blocks of 16, 6-bit scales packed in 12 bytes. */
typedef struct {
    uint8_t hmask[MOE_QK_K / 8];
    uint8_t qs[MOE_QK_K / 4];
    uint8_t scales[12];
    moe_f16 d;
} moe_block_q3_K;
MOE_STATIC_ASSERT(sizeof(moe_block_q3_K) == 2 + MOE_QK_K / 4 + MOE_QK_K / 8 + 12, "q3_K block");

/* Q4_K: 8 sub-blocks of 32; 6-bit scales and mins packed in 12 bytes;
 * x = d * sc * q - dmin * m. */
typedef struct {
    moe_f16 d;
    moe_f16 dmin;
    uint8_t scales[MOE_K_SCALE_SIZE];
    uint8_t qs[MOE_QK_K / 2];
} moe_block_q4_K;
MOE_STATIC_ASSERT(sizeof(moe_block_q4_K) == 2 * 2 + MOE_K_SCALE_SIZE + MOE_QK_K / 2, "q4_K block");

/* Q5_K: Q4_K plus one high bit per element in qh. */
typedef struct {
    moe_f16 d;
    moe_f16 dmin;
    uint8_t scales[MOE_K_SCALE_SIZE];
    uint8_t qh[MOE_QK_K / 8];
    uint8_t qs[MOE_QK_K / 2];
} moe_block_q5_K;
MOE_STATIC_ASSERT(sizeof(moe_block_q5_K) == 2 * 2 + MOE_K_SCALE_SIZE + MOE_QK_K / 2 + MOE_QK_K / 8,
                  "q5_K block");

/* Q6_K: 16 sub-blocks of 16 with int8 scales; x = d * sc * (q - 32). */
typedef struct {
    uint8_t ql[MOE_QK_K / 2];
    uint8_t qh[MOE_QK_K / 4];
    int8_t scales[MOE_QK_K / 16];
    moe_f16 d;
} moe_block_q6_K;
MOE_STATIC_ASSERT(sizeof(moe_block_q6_K) == 2 + MOE_QK_K / 16 + 3 * MOE_QK_K / 4, "q6_K block");

/* Q8_K: activation format for K-quant dot products (float scale). */
typedef struct {
    float d;
    int8_t qs[MOE_QK_K];
    int16_t bsums[MOE_QK_K / 16];
} moe_block_q8_K;
MOE_STATIC_ASSERT(sizeof(moe_block_q8_K) == 4 + MOE_QK_K + MOE_QK_K / 16 * 2, "q8_K block");

/* Per-type facts. blck = elements per block (1 for plain types),
 * size = bytes per block; size 0 means the id is unknown to moed. */
typedef struct moe_type_traits {
    const char *name;
    int64_t blck;
    size_t size;
} moe_type_traits;

/* Returns the traits of `t`, or NULL when `t` is not a type moed knows. */
const moe_type_traits *moe_type_get(int t);

/* Returns the type's name ("Q4_K"), or "unknown". */
const char *moe_type_name(int t);

/* Parses a name such as "q8_0" or "BF16" (case-insensitive).
 * Returns 0 and sets *out, or MOE_EINVAL. */
int moe_type_from_name(const char *name, moe_type *out);

/* Bytes taken by a row of `n` elements of type `t`, or 0 when `t` is
 * unknown or `n` is not a multiple of its block size. */
size_t moe_row_size(int t, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
