/* tool_gguf_dump - canonical JSON-lines dump of a GGUF file as moed reads
 * it, for tests/py/test_gguf_interop.py to compare with gguf-py.
 *
 * Usage: tool_gguf_dump FILE
 * Line 1: {"version":V,"alignment":A,"data_offset":D,"n_kv":K,"n_tensors":T}
 * Then one line per kv in file order:
 *   {"kv":KEY,"type":TYPE,"value":VALUE}
 * where an array VALUE is {"etype":ETYPE,"items":[...]} (nested arrays
 * recursively), FLOAT32 prints with %.9g and FLOAT64 with %.17g (both
 * round-trip exactly), NaN/Infinity as Python's json reads them.
 * Then one line per tensor in file order:
 *   {"tensor":NAME,"type":"Q8_0","type_id":8,"ne":[...],"offset":O,
 *    "nbytes":N,"fnv1a":"16 hex digits of FNV-1a 64 over the data"}
 * On a refused file prints {"error":"EFORMAT","message":...} and exits 1.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "status.h"

static void put_json_str(const char *s, uint64_t n) {
    putchar('"');
    for (uint64_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20 || c == 0x7f)
            printf("\\u%04x", c);
        else
            putchar(c); /* UTF-8 passes through */
    }
    putchar('"');
}

static void put_double(double d, int digits) {
    if (isnan(d))
        fputs("NaN", stdout);
    else if (isinf(d))
        fputs(d > 0 ? "Infinity" : "-Infinity", stdout);
    else
        printf("%.*g", digits, d);
}

static void put_value(const moe_gguf_value *v);

static void put_elem(const moe_gguf_array *a, uint64_t i) {
    moe_gguf_value v = {.type = a->etype};
    uint64_t u;
    int64_t s;
    double d;
    switch (a->etype) {
    case MOE_GGUF_BOOL:
        moe_gguf_arr_u64(a, i, &u);
        fputs(u ? "true" : "false", stdout);
        return;
    case MOE_GGUF_FLOAT32:
    case MOE_GGUF_FLOAT64:
        moe_gguf_arr_f64(a, i, &d);
        v.v.f64 = d;
        break;
    case MOE_GGUF_INT8:
    case MOE_GGUF_INT16:
    case MOE_GGUF_INT32:
    case MOE_GGUF_INT64:
        moe_gguf_arr_i64(a, i, &s);
        v.v.i64 = s;
        break;
    default:
        moe_gguf_arr_u64(a, i, &u);
        v.v.u64 = u;
        break;
    }
    put_value(&v);
}

static void put_value(const moe_gguf_value *v) {
    switch (v->type) {
    case MOE_GGUF_UINT8:
    case MOE_GGUF_UINT16:
    case MOE_GGUF_UINT32:
    case MOE_GGUF_UINT64:
        printf("%llu", (unsigned long long)v->v.u64);
        break;
    case MOE_GGUF_INT8:
    case MOE_GGUF_INT16:
    case MOE_GGUF_INT32:
    case MOE_GGUF_INT64:
        printf("%lld", (long long)v->v.i64);
        break;
    case MOE_GGUF_FLOAT32:
        put_double(v->v.f64, 9);
        break;
    case MOE_GGUF_FLOAT64:
        put_double(v->v.f64, 17);
        break;
    case MOE_GGUF_BOOL:
        fputs(v->v.b ? "true" : "false", stdout);
        break;
    case MOE_GGUF_STRING:
        put_json_str(v->v.str.ptr, v->v.str.len);
        break;
    case MOE_GGUF_ARRAY: {
        const moe_gguf_array *a = &v->v.arr;
        printf("{\"etype\":\"%s\",\"items\":[", moe_gguf_vtype_name(a->etype));
        for (uint64_t i = 0; i < a->n; i++) {
            if (i)
                putchar(',');
            if (a->items)
                put_value(&a->items[i]);
            else
                put_elem(a, i);
        }
        fputs("]}", stdout);
        break;
    }
    default:
        fputs("null", stdout);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE.gguf\n", argv[0]);
        return 2;
    }
    int st;
    char err[MOE_ERR_MAX];
    moe_gguf *g = moe_gguf_open(argv[1], &st, err, sizeof(err));
    if (!g) {
        printf("{\"error\":\"%s\",\"message\":", moe_status_name(st));
        put_json_str(err, strlen(err));
        puts("}");
        return 1;
    }
    printf("{\"version\":%u,\"alignment\":%llu,\"data_offset\":%llu,\"n_kv\":%llu,\"n_tensors\":%llu}\n",
           moe_gguf_version(g), (unsigned long long)moe_gguf_alignment(g),
           (unsigned long long)moe_gguf_data_offset(g), (unsigned long long)moe_gguf_n_kv(g),
           (unsigned long long)moe_gguf_n_tensors(g));
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        const moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        fputs("{\"kv\":", stdout);
        put_json_str(kv->key, strlen(kv->key));
        printf(",\"type\":\"%s\",\"value\":", moe_gguf_vtype_name(kv->value.type));
        put_value(&kv->value);
        puts("}");
    }
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        uint64_t h = 0xcbf29ce484222325ull;
        const unsigned char *p = t->data;
        for (uint64_t k = 0; k < t->nbytes; k++) {
            h ^= p[k];
            h *= 0x100000001b3ull;
        }
        fputs("{\"tensor\":", stdout);
        put_json_str(t->name, strlen(t->name));
        printf(",\"type\":\"%s\",\"type_id\":%d,\"ne\":[", moe_type_name(t->type), (int)t->type);
        for (uint32_t d = 0; d < t->n_dims; d++)
            printf("%s%lld", d ? "," : "", (long long)t->ne[d]);
        printf("],\"offset\":%llu,\"nbytes\":%llu,\"fnv1a\":\"%016llx\"}\n", (unsigned long long)t->offset,
               (unsigned long long)t->nbytes, (unsigned long long)h);
    }
    moe_gguf_close(g);
    return 0;
}
