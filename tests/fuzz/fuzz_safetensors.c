/* fuzz_safetensors - libFuzzer target for the safetensors reader (`make fuzz`).
 *
 * Opens the input with moe_st_open_memory() and, when it is accepted,
 * checks what the header promised: every tensor inside the buffer, its
 * byte count the shape's, sorted by offset without overlap, found again
 * by name; every byte of every extent is touched, so under ASan a pointer
 * outside the input cannot go unnoticed. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "safetensors.h"

static volatile uint64_t sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int status;
    char err[MOE_ERR_MAX];
    moe_st *s = moe_st_open_memory(data, size, &status, err, sizeof(err));
    if (!s) {
        sink += strlen(err);
        return 0;
    }
    uint64_t prev_end = 0;
    for (uint64_t i = 0; i < moe_st_n_tensors(s); i++) {
        const moe_st_tensor *t = moe_st_tensor_at(s, i);
        if (moe_st_find(s, t->name) != t || t->n_dims > MOE_ST_MAX_DIMS)
            __builtin_trap();
        if (t->nbytes != t->n_elem * moe_st_dtype_size(t->dtype))
            __builtin_trap();
        const uint8_t *p = t->data;
        if (t->nbytes) {
            if (p < data || p + t->nbytes > data + size || t->offset < prev_end)
                __builtin_trap();
            prev_end = t->offset + t->nbytes;
            for (uint64_t k = 0; k < t->nbytes; k++)
                sink += p[k];
        }
    }
    sink += moe_st_metadata(s, "format") != NULL;
    moe_st_close(s);
    return 0;
}
