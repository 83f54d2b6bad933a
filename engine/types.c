#include "qblocks.h"
#include "status.h"

#include <strings.h>

static const moe_type_traits type_table[MOE_TYPE_COUNT] = {
    [MOE_TYPE_F32] = {"F32", 1, 4},
    [MOE_TYPE_F16] = {"F16", 1, 2},
    [MOE_TYPE_Q4_0] = {"Q4_0", MOE_QK4_0, sizeof(moe_block_q4_0)},
    [MOE_TYPE_Q4_1] = {"Q4_1", MOE_QK4_1, sizeof(moe_block_q4_1)},
    [MOE_TYPE_Q5_0] = {"Q5_0", MOE_QK5_0, sizeof(moe_block_q5_0)},
    [MOE_TYPE_Q5_1] = {"Q5_1", MOE_QK5_1, sizeof(moe_block_q5_1)},
    [MOE_TYPE_Q8_0] = {"Q8_0", MOE_QK8_0, sizeof(moe_block_q8_0)},
    [MOE_TYPE_Q8_1] = {"Q8_1", MOE_QK8_1, sizeof(moe_block_q8_1)},
    [MOE_TYPE_Q2_K] = {"Q2_K", MOE_QK_K, sizeof(moe_block_q2_K)},
    [MOE_TYPE_Q3_K] = {"Q3_K", MOE_QK_K, sizeof(moe_block_q3_K)},
    [MOE_TYPE_Q4_K] = {"Q4_K", MOE_QK_K, sizeof(moe_block_q4_K)},
    [MOE_TYPE_Q5_K] = {"Q5_K", MOE_QK_K, sizeof(moe_block_q5_K)},
    [MOE_TYPE_Q6_K] = {"Q6_K", MOE_QK_K, sizeof(moe_block_q6_K)},
    [MOE_TYPE_Q8_K] = {"Q8_K", MOE_QK_K, sizeof(moe_block_q8_K)},
    [MOE_TYPE_I8] = {"I8", 1, 1},
    [MOE_TYPE_I16] = {"I16", 1, 2},
    [MOE_TYPE_I32] = {"I32", 1, 4},
    [MOE_TYPE_I64] = {"I64", 1, 8},
    [MOE_TYPE_F64] = {"F64", 1, 8},
    [MOE_TYPE_BF16] = {"BF16", 1, 2},
};

const moe_type_traits *moe_type_get(int t) {
    if (t < 0 || t >= MOE_TYPE_COUNT || type_table[t].size == 0)
        return NULL;
    return &type_table[t];
}

const char *moe_type_name(int t) {
    const moe_type_traits *tr = moe_type_get(t);
    return tr ? tr->name : "unknown";
}

int moe_type_from_name(const char *name, moe_type *out) {
    if (!name)
        return MOE_EINVAL;
    for (int t = 0; t < MOE_TYPE_COUNT; t++) {
        if (type_table[t].size && strcasecmp(type_table[t].name, name) == 0) {
            *out = (moe_type)t;
            return MOE_OK;
        }
    }
    return MOE_EINVAL;
}

size_t moe_row_size(int t, int64_t n) {
    const moe_type_traits *tr = moe_type_get(t);
    if (!tr || n < 0 || n % tr->blck != 0)
        return 0;
    return (size_t)(n / tr->blck) * tr->size;
}
