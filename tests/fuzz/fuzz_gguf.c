/* fuzz_gguf - libFuzzer target for the GGUF reader (`make fuzz`).
 *
 * Opens the input with moe_gguf_open_memory() and, when it is accepted,
 * walks everything the reader hands out: every kv (recursing into array
 * items and reading every fixed-size element through the helpers), every
 * tensor's first and last data byte, and every lookup by name. Under ASan
 * this proves that whatever a file claims, no pointer the reader returns
 * leads outside the buffer.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "gguf.h"

static volatile uint64_t sink;

static void walk_value(const moe_gguf_value *v) {
    switch (v->type) {
    case MOE_GGUF_STRING:
        if (v->v.str.len)
            sink += (uint8_t)v->v.str.ptr[0] + (uint8_t)v->v.str.ptr[v->v.str.len - 1];
        break;
    case MOE_GGUF_ARRAY: {
        const moe_gguf_array *a = &v->v.arr;
        if (a->items) {
            for (uint64_t i = 0; i < a->n; i++)
                walk_value(&a->items[i]);
        } else {
            for (uint64_t i = 0; i < a->n; i++) {
                uint64_t u;
                int64_t s;
                double d;
                if (moe_gguf_arr_u64(a, i, &u) == 0)
                    sink += u;
                if (moe_gguf_arr_i64(a, i, &s) == 0)
                    sink += (uint64_t)s;
                if (moe_gguf_arr_f64(a, i, &d) == 0)
                    sink += d == d;
            }
        }
        break;
    }
    default:
        sink += v->v.u64;
        break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int status;
    char err[MOE_ERR_MAX];
    moe_gguf *g = moe_gguf_open_memory(data, size, &status, err, sizeof(err));
    if (!g) {
        sink += strlen(err);
        return 0;
    }
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        const moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        walk_value(&kv->value);
        if (moe_gguf_find_kv(g, kv->key) != kv)
            __builtin_trap();
        uint64_t u;
        int64_t s;
        double d;
        bool b;
        moe_gguf_str str;
        sink += moe_gguf_get_u64(g, kv->key, &u) + moe_gguf_get_i64(g, kv->key, &s) +
                moe_gguf_get_f64(g, kv->key, &d) + moe_gguf_get_bool(g, kv->key, &b) +
                moe_gguf_get_str(g, kv->key, &str);
    }
    uint64_t data_end = moe_gguf_file_size(g);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        if (moe_gguf_find_tensor(g, t->name) != t)
            __builtin_trap();
        if (t->nbytes) {
            const uint8_t *p = t->data;
            if (p < data || p + t->nbytes > data + data_end)
                __builtin_trap();
            sink += p[0] + p[t->nbytes - 1];
        }
    }
    moe_gguf_close(g);
    return 0;
}
