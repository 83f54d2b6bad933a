/* gguf.c - GGUF reader (mmap, validate everything, index) and streaming
 * writer. See gguf.h for the contract.
 *
 * The reader treats the file as hostile: every count is checked against
 * the bytes that remain before anything is allocated for it, so the
 * memory used is bounded by a small multiple of the file size whatever the
 * header claims, and all size arithmetic is overflow-checked. Only
 * status.c, types.c and hash.c are needed besides this file (the fuzz
 * target links exactly those four).
 */
#include "gguf.h"
#include "hash.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "gguf.c reads little-endian GGUF files in place and needs a little-endian host"
#endif

/* Arrays nested deeper than this are refused: real files use one level
 * (at most two), and the limit bounds the parser's recursion. */
#define GGUF_MAX_DEPTH 8
/* Longest key or tensor name quoted in an error message. */
#define NAME_QUOTE_MAX 80

/* ---------- helpers shared by reader and writer ---------- */

static const uint8_t vtype_sizes[MOE_GGUF_VTYPE_COUNT] = {
    [MOE_GGUF_UINT8] = 1,   [MOE_GGUF_INT8] = 1,   [MOE_GGUF_UINT16] = 2,  [MOE_GGUF_INT16] = 2,
    [MOE_GGUF_UINT32] = 4,  [MOE_GGUF_INT32] = 4,  [MOE_GGUF_FLOAT32] = 4, [MOE_GGUF_BOOL] = 1,
    [MOE_GGUF_STRING] = 0,  [MOE_GGUF_ARRAY] = 0,  [MOE_GGUF_UINT64] = 8,  [MOE_GGUF_INT64] = 8,
    [MOE_GGUF_FLOAT64] = 8,
};

static const char *const vtype_names[MOE_GGUF_VTYPE_COUNT] = {
    [MOE_GGUF_UINT8] = "UINT8",     [MOE_GGUF_INT8] = "INT8",       [MOE_GGUF_UINT16] = "UINT16",
    [MOE_GGUF_INT16] = "INT16",     [MOE_GGUF_UINT32] = "UINT32",   [MOE_GGUF_INT32] = "INT32",
    [MOE_GGUF_FLOAT32] = "FLOAT32", [MOE_GGUF_BOOL] = "BOOL",       [MOE_GGUF_STRING] = "STRING",
    [MOE_GGUF_ARRAY] = "ARRAY",     [MOE_GGUF_UINT64] = "UINT64",   [MOE_GGUF_INT64] = "INT64",
    [MOE_GGUF_FLOAT64] = "FLOAT64",
};

size_t moe_gguf_vtype_size(int vtype) {
    if (vtype < 0 || vtype >= MOE_GGUF_VTYPE_COUNT)
        return 0;
    return vtype_sizes[vtype];
}

const char *moe_gguf_vtype_name(int vtype) {
    if (vtype < 0 || vtype >= MOE_GGUF_VTYPE_COUNT)
        return "unknown";
    return vtype_names[vtype];
}

static bool vtype_is_uint(int t) {
    return t == MOE_GGUF_UINT8 || t == MOE_GGUF_UINT16 || t == MOE_GGUF_UINT32 || t == MOE_GGUF_UINT64;
}
static bool vtype_is_int(int t) {
    return t == MOE_GGUF_INT8 || t == MOE_GGUF_INT16 || t == MOE_GGUF_INT32 || t == MOE_GGUF_INT64;
}
static bool vtype_is_float(int t) { return t == MOE_GGUF_FLOAT32 || t == MOE_GGUF_FLOAT64; }

static bool is_pow2(uint64_t x) { return x != 0 && (x & (x - 1)) == 0; }

/* Decodes one fixed-size little-endian element into a widened value. */
static void decode_fixed(int type, const uint8_t *p, moe_gguf_value *out) {
    out->type = (moe_gguf_vtype)type;
    switch (type) {
    case MOE_GGUF_UINT8: out->v.u64 = p[0]; break;
    case MOE_GGUF_INT8: out->v.i64 = (int8_t)p[0]; break;
    case MOE_GGUF_BOOL: out->v.b = p[0] != 0; break;
    case MOE_GGUF_UINT16: { uint16_t x; memcpy(&x, p, 2); out->v.u64 = x; break; }
    case MOE_GGUF_INT16: { int16_t x; memcpy(&x, p, 2); out->v.i64 = x; break; }
    case MOE_GGUF_UINT32: { uint32_t x; memcpy(&x, p, 4); out->v.u64 = x; break; }
    case MOE_GGUF_INT32: { int32_t x; memcpy(&x, p, 4); out->v.i64 = x; break; }
    case MOE_GGUF_FLOAT32: { float x; memcpy(&x, p, 4); out->v.f64 = x; break; }
    case MOE_GGUF_UINT64: memcpy(&out->v.u64, p, 8); break;
    case MOE_GGUF_INT64: memcpy(&out->v.i64, p, 8); break;
    case MOE_GGUF_FLOAT64: memcpy(&out->v.f64, p, 8); break;
    default: break;
    }
}

/* ---------- reader: arena and index ---------- */

/* Keys, names and decoded array items live in one arena freed at close. */
typedef struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
    max_align_t data[];
} arena_chunk;

typedef struct {
    arena_chunk *head;
} arena;

static void *arena_alloc(arena *a, size_t n) {
    if (n > SIZE_MAX / 2)
        return NULL;
    n = (n + 15) & ~(size_t)15;
    if (n == 0)
        n = 16;
    arena_chunk *c = a->head;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > 65536 ? n : 65536;
        c = malloc(sizeof(arena_chunk) + cap);
        if (!c)
            return NULL;
        c->used = 0;
        c->cap = cap;
        c->next = a->head;
        a->head = c;
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    return p;
}

static void arena_free(arena *a) {
    arena_chunk *c = a->head;
    while (c) {
        arena_chunk *n = c->next;
        free(c);
        c = n;
    }
    a->head = NULL;
}

/* Open-addressing hash of names to index+1 (0 = empty slot). The names
 * come from the file, so the hash is the keyed one (hash.h): a file
 * packed with names that share a probe run cannot make loading quadratic. */
typedef struct {
    uint64_t *slots;
    uint64_t mask;
} name_index;

static int index_init(name_index *ix, uint64_t n) {
    uint64_t cap = 8;
    while (cap < 2 * n)
        cap <<= 1;
    ix->slots = calloc(cap, sizeof(uint64_t));
    ix->mask = cap - 1;
    return ix->slots ? MOE_OK : MOE_ENOMEM;
}

/* Returns the slot holding `name` (found) or the empty slot to fill. */
static uint64_t *index_slot(const name_index *ix, const char *name, size_t len, const char *(*name_of)(const void *, uint64_t),
                            const void *ctx) {
    uint64_t h = moe_hash_bytes(name, len) & ix->mask;
    for (;;) {
        uint64_t *s = &ix->slots[h];
        if (*s == 0)
            return s;
        const char *other = name_of(ctx, *s - 1);
        if (strlen(other) == len && memcmp(other, name, len) == 0)
            return s;
        h = (h + 1) & ix->mask;
    }
}

struct moe_gguf {
    const uint8_t *base;
    size_t size;
    bool mapped;
    uint32_t version;
    uint64_t alignment;
    uint64_t data_offset;
    uint64_t n_kv;
    moe_gguf_kv *kvs;
    uint64_t n_tensors;
    moe_gguf_tensor *tensors;
    name_index kv_ix, tensor_ix;
    arena arena;
    int map_slot; /* 1 + its g_maps slot; 0 = not registered */
};

static const char *kv_name_of(const void *ctx, uint64_t i) { return ((const moe_gguf *)ctx)->kvs[i].key; }
static const char *tensor_name_of(const void *ctx, uint64_t i) { return ((const moe_gguf *)ctx)->tensors[i].name; }

/* ---------- reader: parser ---------- */

typedef struct {
    moe_gguf *g;
    const uint8_t *buf;
    size_t size;
    size_t pos;
    char *err;
    size_t errsz;
    char where[160]; /* what is being parsed, prefixed to every message */
} parser;

static int fail(parser *p, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(parser *p, int status, const char *fmt, ...) {
    if (p->err && p->errsz) {
        int n = 0;
        if (p->where[0])
            n = snprintf(p->err, p->errsz, "%s: ", p->where);
        if (n < 0)
            n = 0;
        if ((size_t)n < p->errsz) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(p->err + n, p->errsz - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return status;
}

static size_t left(const parser *p) { return p->size - p->pos; }

static int need(parser *p, size_t n, const char *what) {
    if (left(p) < n)
        return fail(p, MOE_EFORMAT, "file truncated at offset %zu reading %s (need %zu bytes, %zu left)", p->pos,
                    what, n, left(p));
    return MOE_OK;
}

static int rd_u32(parser *p, uint32_t *out, const char *what) {
    int rc = need(p, 4, what);
    if (rc)
        return rc;
    memcpy(out, p->buf + p->pos, 4);
    p->pos += 4;
    return MOE_OK;
}

static int rd_u64(parser *p, uint64_t *out, const char *what) {
    int rc = need(p, 8, what);
    if (rc)
        return rc;
    memcpy(out, p->buf + p->pos, 8);
    p->pos += 8;
    return MOE_OK;
}

static int rd_str(parser *p, moe_gguf_str *out, const char *what) {
    size_t at = p->pos;
    uint64_t len;
    int rc = rd_u64(p, &len, what);
    if (rc)
        return rc;
    if (len > left(p))
        return fail(p, MOE_EFORMAT, "%s length %llu at offset %zu exceeds the %zu bytes left in the file", what,
                    (unsigned long long)len, at, left(p));
    out->ptr = (const char *)p->buf + p->pos;
    out->len = len;
    p->pos += (size_t)len;
    return MOE_OK;
}

/* Reads a key or tensor name: no embedded NUL, copied NUL-terminated. */
static int rd_name(parser *p, char **out, const char *what) {
    size_t at = p->pos;
    moe_gguf_str s;
    int rc = rd_str(p, &s, what);
    if (rc)
        return rc;
    if (memchr(s.ptr, 0, s.len))
        return fail(p, MOE_EFORMAT, "%s at offset %zu contains a NUL byte", what, at);
    char *c = arena_alloc(&p->g->arena, (size_t)s.len + 1);
    if (!c)
        return fail(p, MOE_ENOMEM, "out of memory copying %s", what);
    memcpy(c, s.ptr, s.len);
    c[s.len] = 0;
    *out = c;
    return MOE_OK;
}

static int rd_value(parser *p, int type, moe_gguf_value *out, int depth);

static int rd_array(parser *p, moe_gguf_array *a, int depth) {
    if (depth > GGUF_MAX_DEPTH)
        return fail(p, MOE_EFORMAT, "array at offset %zu nested deeper than %d levels", p->pos, GGUF_MAX_DEPTH);
    size_t at = p->pos;
    uint32_t et;
    uint64_t n;
    int rc = rd_u32(p, &et, "array element type");
    if (rc)
        return rc;
    if (et >= MOE_GGUF_VTYPE_COUNT)
        return fail(p, MOE_EFORMAT, "array element type %u at offset %zu is not a GGUF value type", et, at);
    rc = rd_u64(p, &n, "array length");
    if (rc)
        return rc;
    /* Every element takes at least this many bytes of the file: checking
     * the count against what is left bounds all later allocation. */
    size_t min_elem = vtype_sizes[et] ? vtype_sizes[et] : et == MOE_GGUF_STRING ? 8 : 12;
    uint64_t need_bytes;
    if (__builtin_mul_overflow(n, (uint64_t)min_elem, &need_bytes) || need_bytes > left(p))
        return fail(p, MOE_EFORMAT,
                    "array of %llu %s elements at offset %zu needs at least %llu x %zu bytes, only %zu left",
                    (unsigned long long)n, vtype_names[et], at, (unsigned long long)n, min_elem, left(p));
    a->etype = (moe_gguf_vtype)et;
    a->n = n;
    a->data = NULL;
    a->items = NULL;
    if (vtype_sizes[et]) {
        a->data = p->buf + p->pos;
        p->pos += (size_t)need_bytes;
        return MOE_OK;
    }
    size_t bytes;
    if (__builtin_mul_overflow((size_t)n, sizeof(moe_gguf_value), &bytes))
        return fail(p, MOE_EFORMAT, "array length %llu at offset %zu is too large", (unsigned long long)n, at);
    a->items = arena_alloc(&p->g->arena, bytes);
    if (!a->items)
        return fail(p, MOE_ENOMEM, "out of memory for an array of %llu items", (unsigned long long)n);
    for (uint64_t i = 0; i < n; i++) {
        rc = rd_value(p, (int)et, &a->items[i], depth);
        if (rc)
            return rc;
    }
    return MOE_OK;
}

/* `depth` is the number of arrays enclosing this value. */
static int rd_value(parser *p, int type, moe_gguf_value *out, int depth) {
    memset(out, 0, sizeof(*out));
    out->type = (moe_gguf_vtype)type;
    if (type == MOE_GGUF_STRING)
        return rd_str(p, &out->v.str, "string");
    if (type == MOE_GGUF_ARRAY)
        return rd_array(p, &out->v.arr, depth + 1);
    size_t sz = vtype_sizes[type];
    int rc = need(p, sz, vtype_names[type]);
    if (rc)
        return rc;
    decode_fixed(type, p->buf + p->pos, out);
    p->pos += sz;
    return MOE_OK;
}

/* Up to NAME_QUOTE_MAX bytes of a name from the file, control bytes shown
 * as '?', so a hostile key cannot forge lines or terminal escapes in the
 * logs that print the message. */
typedef struct {
    char s[NAME_QUOTE_MAX + 1];
} quoted;

static quoted quote(const char *name) {
    quoted q;
    size_t n = 0;
    for (; name[n] && n < NAME_QUOTE_MAX; n++) {
        unsigned char c = (unsigned char)name[n];
        q.s[n] = c < 0x20 || c == 0x7f ? '?' : (char)c;
    }
    q.s[n] = 0;
    return q;
}

static void set_where(parser *p, const char *kind, uint64_t i, const char *name) {
    if (name)
        snprintf(p->where, sizeof(p->where), "%s #%llu '%s'", kind, (unsigned long long)i, quote(name).s);
    else
        snprintf(p->where, sizeof(p->where), "%s #%llu", kind, (unsigned long long)i);
}

static void set_where_tensor(parser *p, uint64_t i, const char *name) {
    snprintf(p->where, sizeof(p->where), "tensor '%s' (#%llu)", quote(name).s, (unsigned long long)i);
}

static int parse_header(parser *p) {
    moe_gguf *g = p->g;
    snprintf(p->where, sizeof(p->where), "header");
    if (p->size < 4)
        return fail(p, MOE_EFORMAT, "file is %zu bytes, too small for the GGUF magic", p->size);
    if (memcmp(p->buf, "GGUF", 4) != 0) {
        if (memcmp(p->buf, "FUGG", 4) == 0)
            return fail(p, MOE_EUNSUPPORTED, "byte-swapped magic 'FUGG' at offset 0: big-endian GGUF is not supported");
        return fail(p, MOE_EFORMAT, "bad magic %02x %02x %02x %02x at offset 0 (expected 'GGUF')", p->buf[0],
                    p->buf[1], p->buf[2], p->buf[3]);
    }
    p->pos = 4;
    uint32_t ver;
    int rc = rd_u32(p, &ver, "version");
    if (rc)
        return rc;
    if (ver != 2 && ver != 3) {
        uint32_t sw = __builtin_bswap32(ver);
        if (sw >= 1 && sw <= 3)
            return fail(p, MOE_EUNSUPPORTED,
                        "version field at offset 4 is byte-swapped (%u read big-endian): big-endian GGUF is not "
                        "supported",
                        sw);
        if (ver == 0)
            return fail(p, MOE_EFORMAT, "version 0 at offset 4 is not a GGUF version");
        return fail(p, MOE_EUNSUPPORTED, "GGUF version %u at offset 4 is not supported (only 2 and 3)", ver);
    }
    g->version = ver;
    uint64_t nt, nkv;
    if ((rc = rd_u64(p, &nt, "tensor count")) || (rc = rd_u64(p, &nkv, "metadata count")))
        return rc;
    /* Smallest possible entries: a kv is key length (8) + type (4) + one
     * byte of value; a tensor info is name length (8) + n_dims (4) + one
     * dim (8) + type (4) + offset (8). */
    uint64_t kv_min, t_min, sum;
    if (__builtin_mul_overflow(nkv, (uint64_t)13, &kv_min) || kv_min > left(p))
        return fail(p, MOE_EFORMAT,
                    "metadata count %llu at offset 16 needs at least %llu x 13 bytes, only %zu left",
                    (unsigned long long)nkv, (unsigned long long)nkv, left(p));
    if (__builtin_mul_overflow(nt, (uint64_t)32, &t_min) || t_min > left(p))
        return fail(p, MOE_EFORMAT, "tensor count %llu at offset 8 needs at least %llu x 32 bytes, only %zu left",
                    (unsigned long long)nt, (unsigned long long)nt, left(p));
    if (__builtin_add_overflow(kv_min, t_min, &sum) || sum > left(p))
        return fail(p, MOE_EFORMAT,
                    "%llu metadata entries and %llu tensors need at least %llu bytes after offset %zu, only %zu left",
                    (unsigned long long)nkv, (unsigned long long)nt, (unsigned long long)kv_min + t_min, p->pos,
                    left(p));
    g->n_kv = nkv;
    g->n_tensors = nt;
    g->kvs = calloc(nkv ? nkv : 1, sizeof(*g->kvs));
    g->tensors = calloc(nt ? nt : 1, sizeof(*g->tensors));
    if (!g->kvs || !g->tensors || index_init(&g->kv_ix, nkv) || index_init(&g->tensor_ix, nt))
        return fail(p, MOE_ENOMEM, "out of memory for %llu kvs and %llu tensors", (unsigned long long)nkv,
                    (unsigned long long)nt);
    return MOE_OK;
}

static int parse_kvs(parser *p) {
    moe_gguf *g = p->g;
    for (uint64_t i = 0; i < g->n_kv; i++) {
        moe_gguf_kv *kv = &g->kvs[i];
        set_where(p, "kv", i, NULL);
        size_t key_at = p->pos;
        char *key;
        int rc = rd_name(p, &key, "key");
        if (rc)
            return rc;
        kv->key = key;
        set_where(p, "kv", i, key);
        size_t klen = strlen(key);
        uint64_t *slot = index_slot(&g->kv_ix, key, klen, kv_name_of, g);
        if (*slot)
            return fail(p, MOE_EFORMAT, "duplicate key at offset %zu (first defined by kv #%llu)", key_at,
                        (unsigned long long)(*slot - 1));
        size_t at = p->pos;
        uint32_t type;
        if ((rc = rd_u32(p, &type, "value type")))
            return rc;
        if (type >= MOE_GGUF_VTYPE_COUNT)
            return fail(p, MOE_EFORMAT, "value type %u at offset %zu is not a GGUF value type", type, at);
        if ((rc = rd_value(p, (int)type, &kv->value, 0)))
            return rc;
        *slot = i + 1;
    }
    return MOE_OK;
}

static int parse_alignment(parser *p) {
    moe_gguf *g = p->g;
    g->alignment = MOE_GGUF_DEFAULT_ALIGNMENT;
    const moe_gguf_kv *kv = moe_gguf_find_kv(g, "general.alignment");
    if (!kv)
        return MOE_OK;
    snprintf(p->where, sizeof(p->where), "key 'general.alignment'");
    if (kv->value.type != MOE_GGUF_UINT32)
        return fail(p, MOE_EFORMAT, "has type %s, must be UINT32", vtype_names[kv->value.type]);
    if (!is_pow2(kv->value.v.u64))
        return fail(p, MOE_EFORMAT, "value %llu is not a power of two", (unsigned long long)kv->value.v.u64);
    g->alignment = kv->value.v.u64;
    return MOE_OK;
}

static int parse_tensor_infos(parser *p) {
    moe_gguf *g = p->g;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        moe_gguf_tensor *t = &g->tensors[i];
        set_where(p, "tensor", i, NULL);
        size_t name_at = p->pos;
        char *name;
        int rc = rd_name(p, &name, "tensor name");
        if (rc)
            return rc;
        t->name = name;
        set_where_tensor(p, i, name);
        size_t nlen = strlen(name);
        uint64_t *slot = index_slot(&g->tensor_ix, name, nlen, tensor_name_of, g);
        if (*slot)
            return fail(p, MOE_EFORMAT, "duplicate tensor name at offset %zu (first defined by tensor #%llu)",
                        name_at, (unsigned long long)(*slot - 1));
        *slot = i + 1;
        size_t at = p->pos;
        uint32_t nd;
        if ((rc = rd_u32(p, &nd, "n_dims")))
            return rc;
        if (nd < 1 || nd > MOE_GGUF_MAX_DIMS)
            return fail(p, MOE_EFORMAT, "n_dims %u at offset %zu is outside 1..%d", nd, at, MOE_GGUF_MAX_DIMS);
        t->n_dims = nd;
        for (int d = 0; d < MOE_GGUF_MAX_DIMS; d++)
            t->ne[d] = 1;
        for (uint32_t d = 0; d < nd; d++) {
            at = p->pos;
            uint64_t v;
            if ((rc = rd_u64(p, &v, "dimension")))
                return rc;
            if (v > (uint64_t)INT64_MAX)
                return fail(p, MOE_EFORMAT, "dimension %u at offset %zu is negative (%lld)", d, at,
                            (long long)(int64_t)v);
            t->ne[d] = (int64_t)v;
        }
        at = p->pos;
        uint32_t ty;
        if ((rc = rd_u32(p, &ty, "tensor type")))
            return rc;
        const moe_type_traits *tr = moe_type_get((int)ty);
        if (!tr)
            return fail(p, MOE_EUNSUPPORTED, "unknown tensor type id %u at offset %zu", ty, at);
        t->type = (moe_type)ty;
        if (t->ne[0] % tr->blck != 0)
            return fail(p, MOE_EFORMAT, "ne[0] = %lld is not a multiple of the %s block size %lld",
                        (long long)t->ne[0], tr->name, (long long)tr->blck);
        uint64_t nbytes;
        bool ovf = __builtin_mul_overflow((uint64_t)(t->ne[0] / tr->blck), (uint64_t)tr->size, &nbytes);
        int64_t nel = t->ne[0];
        for (int d = 1; d < MOE_GGUF_MAX_DIMS; d++) {
            ovf |= __builtin_mul_overflow(nbytes, (uint64_t)t->ne[d], &nbytes);
            ovf |= __builtin_mul_overflow(nel, t->ne[d], &nel);
        }
        if (ovf)
            return fail(p, MOE_EFORMAT, "size of [%lld, %lld, %lld, %lld] %s overflows 64 bits", (long long)t->ne[0],
                        (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3], tr->name);
        t->nbytes = nbytes;
        at = p->pos;
        if ((rc = rd_u64(p, &t->offset, "data offset")))
            return rc;
        if (t->offset % g->alignment != 0)
            return fail(p, MOE_EFORMAT, "data offset %llu (at offset %zu) is not a multiple of the alignment %llu",
                        (unsigned long long)t->offset, at, (unsigned long long)g->alignment);
    }
    return MOE_OK;
}

typedef struct {
    uint64_t off, end, idx;
} extent;

static int extent_cmp(const void *a, const void *b) {
    const extent *x = a, *y = b;
    if (x->off != y->off)
        return x->off < y->off ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

static int place_tensors(parser *p) {
    moe_gguf *g = p->g;
    uint64_t hdr_end = p->pos, data_off;
    if (__builtin_add_overflow(hdr_end, g->alignment - 1, &data_off))
        return fail(p, MOE_EFORMAT, "data section offset overflows");
    data_off &= ~(g->alignment - 1);
    g->data_offset = data_off;
    if (g->n_tensors == 0)
        return MOE_OK;
    if (data_off > p->size) {
        snprintf(p->where, sizeof(p->where), "header");
        return fail(p, MOE_EFORMAT, "tensor data section starts at offset %llu, past end of file (size %zu)",
                    (unsigned long long)data_off, p->size);
    }
    uint64_t data_size = p->size - data_off;
    extent *ex = malloc(g->n_tensors * sizeof(*ex));
    if (!ex)
        return fail(p, MOE_ENOMEM, "out of memory sorting %llu tensors", (unsigned long long)g->n_tensors);
    int rc = MOE_OK;
    for (uint64_t i = 0; i < g->n_tensors && rc == MOE_OK; i++) {
        moe_gguf_tensor *t = &g->tensors[i];
        uint64_t end;
        if (__builtin_add_overflow(t->offset, t->nbytes, &end) || end > data_size) {
            set_where_tensor(p, i, t->name);
            rc = fail(p, MOE_EFORMAT,
                      "data [offset %llu, %llu bytes] extends past end of file (size %zu, data section at %llu)",
                      (unsigned long long)t->offset, (unsigned long long)t->nbytes, p->size,
                      (unsigned long long)data_off);
            break;
        }
        t->data = p->buf + data_off + t->offset;
        ex[i] = (extent){t->offset, end, i};
    }
    if (rc == MOE_OK) {
        qsort(ex, g->n_tensors, sizeof(*ex), extent_cmp);
        /* Zero-byte tensors own no bytes and overlap nothing. */
        uint64_t prev = UINT64_MAX;
        for (uint64_t k = 0; k < g->n_tensors; k++) {
            if (ex[k].end == ex[k].off)
                continue;
            if (prev != UINT64_MAX && ex[prev].end > ex[k].off) {
                const moe_gguf_tensor *a = &g->tensors[ex[prev].idx], *b = &g->tensors[ex[k].idx];
                set_where_tensor(p, ex[k].idx, b->name);
                rc = fail(p, MOE_EFORMAT,
                          "data [offset %llu, %llu bytes] overlaps tensor '%s' (#%llu) [offset %llu, %llu bytes]",
                          (unsigned long long)b->offset, (unsigned long long)b->nbytes, quote(a->name).s,
                          (unsigned long long)ex[prev].idx, (unsigned long long)a->offset,
                          (unsigned long long)a->nbytes);
                break;
            }
            prev = k;
        }
    }
    free(ex);
    return rc;
}

static moe_gguf *open_buf(const uint8_t *buf, size_t size, bool mapped, int *status, char *err, size_t errsz) {
    int st_dummy;
    if (!status)
        status = &st_dummy;
    if (err && errsz)
        err[0] = 0;
    moe_gguf *g = calloc(1, sizeof(*g));
    if (!g) {
        if (mapped && size)
            munmap((void *)buf, size);
        *status = moe_seterr(err, errsz, MOE_ENOMEM, "out of memory");
        return NULL;
    }
    g->base = buf;
    g->size = size;
    g->mapped = mapped;
    parser p = {.g = g, .buf = buf, .size = size, .err = err, .errsz = errsz};
    int rc = parse_header(&p);
    if (!rc)
        rc = parse_kvs(&p);
    if (!rc)
        rc = parse_alignment(&p);
    if (!rc)
        rc = parse_tensor_infos(&p);
    if (!rc)
        rc = place_tensors(&p);
    *status = rc;
    if (rc) {
        moe_gguf_close(g);
        return NULL;
    }
    return g;
}

moe_gguf *moe_gguf_open_memory(const void *buf, size_t size, int *status, char *err, size_t errsz) {
    if (!buf && size) {
        int st = moe_seterr(err, errsz, MOE_EINVAL, "NULL buffer");
        if (status)
            *status = st;
        return NULL;
    }
    return open_buf(buf, size, false, status, err, errsz);
}

/* Live file mappings, for moe_gguf_mapping_lookup (a SIGBUS handler).
 * Readers take no lock: a slot is published by storing its base last and
 * retired by clearing the base first. */
#define MAP_SLOTS 16
static struct {
    _Atomic(uintptr_t) base;
    _Atomic(size_t) size;
    char path[512];
} g_maps[MAP_SLOTS];
static pthread_mutex_t g_maps_mu = PTHREAD_MUTEX_INITIALIZER;

/* Returns 1 + the slot, or 0 when all are taken (the mapping then works
 * as before, only a fault in it is not recognised). */
static int map_register(const void *base, size_t size, const char *path) {
    int slot = 0;
    pthread_mutex_lock(&g_maps_mu);
    for (int i = 0; i < MAP_SLOTS && !slot; i++)
        if (!atomic_load(&g_maps[i].base)) {
            snprintf(g_maps[i].path, sizeof g_maps[i].path, "%s", path);
            atomic_store(&g_maps[i].size, size);
            atomic_store(&g_maps[i].base, (uintptr_t)base);
            slot = i + 1;
        }
    pthread_mutex_unlock(&g_maps_mu);
    return slot;
}

static void map_unregister(int slot) {
    if (slot <= 0) return;
    pthread_mutex_lock(&g_maps_mu);
    atomic_store(&g_maps[slot - 1].base, 0);
    pthread_mutex_unlock(&g_maps_mu);
}

bool moe_gguf_mapping_lookup(const void *addr, char *path, size_t pathsz) {
    uintptr_t a = (uintptr_t)addr;
    for (int i = 0; i < MAP_SLOTS; i++) {
        uintptr_t b = atomic_load(&g_maps[i].base);
        if (!b || a < b || a - b >= atomic_load(&g_maps[i].size)) continue;
        if (path && pathsz) {
            size_t k = 0;
            for (; k + 1 < pathsz && g_maps[i].path[k]; k++) path[k] = g_maps[i].path[k];
            path[k] = 0;
        }
        return true;
    }
    return false;
}

moe_gguf *moe_gguf_open(const char *path, int *status, char *err, size_t errsz) {
    int st_dummy;
    if (!status)
        status = &st_dummy;
    if (!path) {
        *status = moe_seterr(err, errsz, MOE_EINVAL, "NULL path");
        return NULL;
    }
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
     * writer forever (and a serving process could not even be stopped);
     * it changes nothing for the regular file we accept. */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        *status = moe_seterr(err, errsz, MOE_EIO, "cannot open '%s': %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    const char *why = NULL;
    if (fstat(fd, &st) != 0)
        why = strerror(errno);
    else if (!S_ISREG(st.st_mode))
        why = S_ISFIFO(st.st_mode)  ? "not a regular file (FIFO)"
              : S_ISDIR(st.st_mode) ? "not a regular file (directory)"
              : S_ISCHR(st.st_mode) ? "not a regular file (character device)"
              : S_ISBLK(st.st_mode) ? "not a regular file (block device)"
              : S_ISSOCK(st.st_mode) ? "not a regular file (socket)"
                                     : "not a regular file";
    if (why) {
        close(fd);
        *status = moe_seterr(err, errsz, MOE_EIO, "'%s': %s", path, why);
        return NULL;
    }
    size_t size = (size_t)st.st_size;
    void *buf = NULL;
    if (size) {
        buf = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (buf == MAP_FAILED) {
            int e = errno;
            close(fd);
            *status = moe_seterr(err, errsz, e == ENOMEM ? MOE_ENOMEM : MOE_EIO, "cannot map '%s' (%zu bytes): %s",
                                 path, size, strerror(e));
            return NULL;
        }
    }
    close(fd); /* the mapping keeps the file alive */
    /* registered before parsing: the header is read through the mapping too */
    int slot = size ? map_register(buf, size, path) : 0;
    moe_gguf *g = open_buf(buf, size, size != 0, status, err, errsz);
    if (g) g->map_slot = slot;
    else map_unregister(slot);
    return g;
}

void moe_gguf_close(moe_gguf *g) {
    if (!g)
        return;
    map_unregister(g->map_slot);
    if (g->mapped && g->size)
        munmap((void *)g->base, g->size);
    free(g->kvs);
    free(g->tensors);
    free(g->kv_ix.slots);
    free(g->tensor_ix.slots);
    arena_free(&g->arena);
    free(g);
}

uint32_t moe_gguf_version(const moe_gguf *g) { return g ? g->version : 0; }
uint64_t moe_gguf_alignment(const moe_gguf *g) { return g ? g->alignment : 0; }
uint64_t moe_gguf_file_size(const moe_gguf *g) { return g ? g->size : 0; }
uint64_t moe_gguf_data_offset(const moe_gguf *g) { return g ? g->data_offset : 0; }
uint64_t moe_gguf_n_kv(const moe_gguf *g) { return g ? g->n_kv : 0; }
uint64_t moe_gguf_n_tensors(const moe_gguf *g) { return g ? g->n_tensors : 0; }

const moe_gguf_kv *moe_gguf_kv_at(const moe_gguf *g, uint64_t i) {
    return g && i < g->n_kv ? &g->kvs[i] : NULL;
}

const moe_gguf_tensor *moe_gguf_tensor_at(const moe_gguf *g, uint64_t i) {
    return g && i < g->n_tensors ? &g->tensors[i] : NULL;
}

const moe_gguf_kv *moe_gguf_find_kv(const moe_gguf *g, const char *key) {
    if (!g || !key || !g->kv_ix.slots)
        return NULL;
    uint64_t *s = index_slot(&g->kv_ix, key, strlen(key), kv_name_of, g);
    return *s ? &g->kvs[*s - 1] : NULL;
}

const moe_gguf_tensor *moe_gguf_find_tensor(const moe_gguf *g, const char *name) {
    if (!g || !name || !g->tensor_ix.slots)
        return NULL;
    uint64_t *s = index_slot(&g->tensor_ix, name, strlen(name), tensor_name_of, g);
    return *s ? &g->tensors[*s - 1] : NULL;
}

/* ---------- typed getters ---------- */

static int val_u64(const moe_gguf_value *v, uint64_t *out) {
    if (vtype_is_uint(v->type)) {
        *out = v->v.u64;
        return MOE_OK;
    }
    if (vtype_is_int(v->type) && v->v.i64 >= 0) {
        *out = (uint64_t)v->v.i64;
        return MOE_OK;
    }
    return MOE_EINVAL;
}

static int val_i64(const moe_gguf_value *v, int64_t *out) {
    if (vtype_is_int(v->type)) {
        *out = v->v.i64;
        return MOE_OK;
    }
    if (vtype_is_uint(v->type) && v->v.u64 <= (uint64_t)INT64_MAX) {
        *out = (int64_t)v->v.u64;
        return MOE_OK;
    }
    return MOE_EINVAL;
}

/* Floats as they are; integers too when the double holds them exactly. */
static int val_f64(const moe_gguf_value *v, double *out) {
    if (vtype_is_float(v->type)) {
        *out = v->v.f64;
        return MOE_OK;
    }
    const double two53 = 9007199254740992.0;
    if (vtype_is_uint(v->type) && v->v.u64 <= (uint64_t)two53) {
        *out = (double)v->v.u64;
        return MOE_OK;
    }
    if (vtype_is_int(v->type) && v->v.i64 <= (int64_t)two53 && v->v.i64 >= -(int64_t)two53) {
        *out = (double)v->v.i64;
        return MOE_OK;
    }
    return MOE_EINVAL;
}

static const moe_gguf_value *lookup(const moe_gguf *g, const char *key, int *rc) {
    if (!g || !key) {
        *rc = MOE_EINVAL;
        return NULL;
    }
    const moe_gguf_kv *kv = moe_gguf_find_kv(g, key);
    *rc = kv ? MOE_OK : MOE_ENOTFOUND;
    return kv ? &kv->value : NULL;
}

int moe_gguf_get_u64(const moe_gguf *g, const char *key, uint64_t *out) {
    int rc;
    const moe_gguf_value *v = lookup(g, key, &rc);
    return v ? val_u64(v, out) : rc;
}

int moe_gguf_get_i64(const moe_gguf *g, const char *key, int64_t *out) {
    int rc;
    const moe_gguf_value *v = lookup(g, key, &rc);
    return v ? val_i64(v, out) : rc;
}

int moe_gguf_get_u32(const moe_gguf *g, const char *key, uint32_t *out) {
    uint64_t x;
    int rc = moe_gguf_get_u64(g, key, &x);
    if (rc)
        return rc;
    if (x > UINT32_MAX)
        return MOE_EINVAL;
    *out = (uint32_t)x;
    return MOE_OK;
}

int moe_gguf_get_f64(const moe_gguf *g, const char *key, double *out) {
    int rc;
    const moe_gguf_value *v = lookup(g, key, &rc);
    return v ? val_f64(v, out) : rc;
}

int moe_gguf_get_f32(const moe_gguf *g, const char *key, float *out) {
    double x;
    int rc = moe_gguf_get_f64(g, key, &x);
    if (rc)
        return rc;
    /* Converters write some hyper-parameters as FLOAT64; round those to
     * the nearest float (what llama.cpp's f32 keys hold anyway), but refuse
     * a finite value the float range cannot hold. */
    if (isfinite(x) && fabs(x) > FLT_MAX)
        return MOE_EINVAL;
    float f = (float)x;
    *out = f;
    return MOE_OK;
}

int moe_gguf_get_bool(const moe_gguf *g, const char *key, bool *out) {
    int rc;
    const moe_gguf_value *v = lookup(g, key, &rc);
    if (!v)
        return rc;
    if (v->type != MOE_GGUF_BOOL)
        return MOE_EINVAL;
    *out = v->v.b;
    return MOE_OK;
}

int moe_gguf_get_str(const moe_gguf *g, const char *key, moe_gguf_str *out) {
    int rc;
    const moe_gguf_value *v = lookup(g, key, &rc);
    if (!v)
        return rc;
    if (v->type != MOE_GGUF_STRING)
        return MOE_EINVAL;
    *out = v->v.str;
    return MOE_OK;
}

const moe_gguf_array *moe_gguf_get_arr(const moe_gguf *g, const char *key) {
    int rc;
    const moe_gguf_value *v = lookup(g, key, &rc);
    return v && v->type == MOE_GGUF_ARRAY ? &v->v.arr : NULL;
}

static int arr_elem(const moe_gguf_array *a, uint64_t i, moe_gguf_value *out) {
    if (!a || i >= a->n || !a->data || a->etype < 0 || a->etype >= MOE_GGUF_VTYPE_COUNT || !vtype_sizes[a->etype])
        return MOE_EINVAL;
    decode_fixed(a->etype, (const uint8_t *)a->data + i * vtype_sizes[a->etype], out);
    return MOE_OK;
}

int moe_gguf_arr_u64(const moe_gguf_array *a, uint64_t i, uint64_t *out) {
    moe_gguf_value v;
    int rc = arr_elem(a, i, &v);
    if (rc)
        return rc;
    if (v.type == MOE_GGUF_BOOL) {
        *out = v.v.b;
        return MOE_OK;
    }
    return val_u64(&v, out);
}

int moe_gguf_arr_i64(const moe_gguf_array *a, uint64_t i, int64_t *out) {
    moe_gguf_value v;
    int rc = arr_elem(a, i, &v);
    if (rc)
        return rc;
    if (v.type == MOE_GGUF_BOOL) {
        *out = v.v.b;
        return MOE_OK;
    }
    return val_i64(&v, out);
}

int moe_gguf_arr_f64(const moe_gguf_array *a, uint64_t i, double *out) {
    moe_gguf_value v;
    int rc = arr_elem(a, i, &v);
    return rc ? rc : val_f64(&v, out);
}

/* ---------- writer ---------- */

typedef struct {
    char *key;
    moe_gguf_value value; /* deep copy owned by the writer */
} wkv;

typedef struct {
    char *name;
    moe_type type;
    uint32_t n_dims;
    int64_t ne[MOE_GGUF_MAX_DIMS];
    uint64_t offset, nbytes;
} wtensor;

enum { W_META, W_DATA, W_DONE, W_FAILED };

struct moe_gguf_writer {
    wkv *kvs;
    size_t n_kv, cap_kv;
    wtensor *tensors;
    size_t n_tensors, cap_tensors;
    name_index tix; /* tensor names, for duplicate checks */
    uint64_t alignment;
    int state;
    FILE *f;
    size_t cur;        /* tensor being streamed */
    uint64_t cur_done; /* its bytes written so far */
};

static const char *wtensor_name_of(const void *ctx, uint64_t i) {
    return ((const moe_gguf_writer *)ctx)->tensors[i].name;
}

moe_gguf_writer *moe_gguf_writer_new(void) {
    moe_gguf_writer *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->alignment = MOE_GGUF_DEFAULT_ALIGNMENT;
    return w;
}

static void wvalue_free(moe_gguf_value *v) {
    if (v->type == MOE_GGUF_STRING) {
        free((void *)v->v.str.ptr);
    } else if (v->type == MOE_GGUF_ARRAY) {
        if (v->v.arr.items)
            for (uint64_t i = 0; i < v->v.arr.n; i++)
                wvalue_free(&v->v.arr.items[i]);
        free(v->v.arr.items);
        free((void *)v->v.arr.data);
    }
    memset(v, 0, sizeof(*v));
}

void moe_gguf_writer_free(moe_gguf_writer *w) {
    if (!w)
        return;
    if (w->f)
        fclose(w->f);
    for (size_t i = 0; i < w->n_kv; i++) {
        free(w->kvs[i].key);
        wvalue_free(&w->kvs[i].value);
    }
    free(w->kvs);
    for (size_t i = 0; i < w->n_tensors; i++)
        free(w->tensors[i].name);
    free(w->tensors);
    free(w->tix.slots);
    free(w);
}

/* Deep-copies `src` into `dst` after checking it is writable and readable
 * back (types in range, nesting within the reader's limit). */
static int wvalue_copy(moe_gguf_value *dst, const moe_gguf_value *src, int depth) {
    memset(dst, 0, sizeof(*dst));
    if (src->type < 0 || src->type >= MOE_GGUF_VTYPE_COUNT)
        return MOE_EINVAL;
    dst->type = src->type;
    if (src->type == MOE_GGUF_STRING) {
        if (!src->v.str.ptr && src->v.str.len)
            return MOE_EINVAL;
        if (src->v.str.len >= SIZE_MAX)
            return MOE_ENOMEM;
        char *s = malloc((size_t)src->v.str.len + 1);
        if (!s)
            return MOE_ENOMEM;
        if (src->v.str.len)
            memcpy(s, src->v.str.ptr, (size_t)src->v.str.len);
        s[src->v.str.len] = 0;
        dst->v.str.ptr = s;
        dst->v.str.len = src->v.str.len;
        return MOE_OK;
    }
    if (src->type != MOE_GGUF_ARRAY) {
        /* A widened value must fit the declared width, or the file would
         * silently hold a different number. */
        uint64_t u = src->v.u64;
        int64_t i = src->v.i64;
        bool ok = true;
        switch (src->type) {
        case MOE_GGUF_UINT8: ok = u <= UINT8_MAX; break;
        case MOE_GGUF_UINT16: ok = u <= UINT16_MAX; break;
        case MOE_GGUF_UINT32: ok = u <= UINT32_MAX; break;
        case MOE_GGUF_INT8: ok = i >= INT8_MIN && i <= INT8_MAX; break;
        case MOE_GGUF_INT16: ok = i >= INT16_MIN && i <= INT16_MAX; break;
        case MOE_GGUF_INT32: ok = i >= INT32_MIN && i <= INT32_MAX; break;
        default: break;
        }
        if (!ok)
            return MOE_EINVAL;
        dst->v = src->v;
        return MOE_OK;
    }
    const moe_gguf_array *a = &src->v.arr;
    if (depth + 1 > GGUF_MAX_DEPTH || a->etype < 0 || a->etype >= MOE_GGUF_VTYPE_COUNT)
        return MOE_EINVAL;
    moe_gguf_array *d = &dst->v.arr;
    d->etype = a->etype;
    size_t esz = vtype_sizes[a->etype];
    if (esz) {
        size_t bytes;
        if (__builtin_mul_overflow(a->n, (uint64_t)esz, &bytes) || (!a->data && a->n))
            return MOE_EINVAL;
        void *p = malloc(bytes ? bytes : 1);
        if (!p)
            return MOE_ENOMEM;
        if (bytes)
            memcpy(p, a->data, bytes);
        d->data = p;
        d->n = a->n;
        return MOE_OK;
    }
    if (!a->items && a->n)
        return MOE_EINVAL;
    size_t bytes;
    if (__builtin_mul_overflow(a->n, (uint64_t)sizeof(moe_gguf_value), &bytes))
        return MOE_EINVAL;
    d->items = calloc(a->n ? a->n : 1, sizeof(moe_gguf_value));
    if (!d->items)
        return MOE_ENOMEM;
    for (uint64_t i = 0; i < a->n; i++) {
        if (a->items[i].type != a->etype) {
            wvalue_free(dst);
            return MOE_EINVAL;
        }
        int rc = wvalue_copy(&d->items[i], &a->items[i], depth + 1);
        d->n = i + 1; /* so a failure frees what was copied */
        if (rc) {
            wvalue_free(dst);
            return rc;
        }
    }
    d->n = a->n;
    return MOE_OK;
}

/* Takes ownership of `*v` (already a deep copy) on success and failure. */
static int wkv_put(moe_gguf_writer *w, const char *key, moe_gguf_value *v) {
    int rc = MOE_OK;
    if (strcmp(key, "general.alignment") == 0) {
        if (v->type != MOE_GGUF_UINT32 || !is_pow2(v->v.u64))
            rc = MOE_EINVAL;
        else
            w->alignment = v->v.u64;
    }
    if (rc) {
        wvalue_free(v);
        return rc;
    }
    for (size_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kvs[i].key, key) == 0) {
            wvalue_free(&w->kvs[i].value);
            w->kvs[i].value = *v;
            return MOE_OK;
        }
    }
    if (w->n_kv == w->cap_kv) {
        size_t cap = w->cap_kv ? 2 * w->cap_kv : 16;
        wkv *n = realloc(w->kvs, cap * sizeof(*n));
        if (!n) {
            wvalue_free(v);
            return MOE_ENOMEM;
        }
        w->kvs = n;
        w->cap_kv = cap;
    }
    char *k = strdup(key);
    if (!k) {
        wvalue_free(v);
        return MOE_ENOMEM;
    }
    w->kvs[w->n_kv].key = k;
    w->kvs[w->n_kv].value = *v;
    w->n_kv++;
    return MOE_OK;
}

int moe_gguf_writer_set_value(moe_gguf_writer *w, const char *key, const moe_gguf_value *v) {
    if (!w || !key || !v)
        return MOE_EINVAL;
    if (w->state != W_META)
        return MOE_ESTATE;
    moe_gguf_value c;
    int rc = wvalue_copy(&c, v, 0);
    if (rc)
        return rc;
    return wkv_put(w, key, &c);
}

#define SETTER(fn, ctype, vt, field)                                              \
    int moe_gguf_writer_set_##fn(moe_gguf_writer *w, const char *key, ctype x) {  \
        moe_gguf_value v = {.type = vt};                                          \
        v.v.field = x;                                                            \
        return moe_gguf_writer_set_value(w, key, &v);                             \
    }
SETTER(u8, uint8_t, MOE_GGUF_UINT8, u64)
SETTER(i8, int8_t, MOE_GGUF_INT8, i64)
SETTER(u16, uint16_t, MOE_GGUF_UINT16, u64)
SETTER(i16, int16_t, MOE_GGUF_INT16, i64)
SETTER(u32, uint32_t, MOE_GGUF_UINT32, u64)
SETTER(i32, int32_t, MOE_GGUF_INT32, i64)
SETTER(u64, uint64_t, MOE_GGUF_UINT64, u64)
SETTER(i64, int64_t, MOE_GGUF_INT64, i64)
SETTER(f32, float, MOE_GGUF_FLOAT32, f64)
SETTER(f64, double, MOE_GGUF_FLOAT64, f64)
SETTER(bool, bool, MOE_GGUF_BOOL, b)
#undef SETTER

int moe_gguf_writer_set_strn(moe_gguf_writer *w, const char *key, const char *s, uint64_t len) {
    moe_gguf_value v = {.type = MOE_GGUF_STRING};
    v.v.str.ptr = s;
    v.v.str.len = len;
    return moe_gguf_writer_set_value(w, key, &v);
}

int moe_gguf_writer_set_str(moe_gguf_writer *w, const char *key, const char *s) {
    if (!s)
        return MOE_EINVAL;
    return moe_gguf_writer_set_strn(w, key, s, strlen(s));
}

int moe_gguf_writer_set_arr(moe_gguf_writer *w, const char *key, moe_gguf_vtype etype, const void *data,
                            uint64_t n) {
    if (etype < 0 || etype >= MOE_GGUF_VTYPE_COUNT || !vtype_sizes[etype])
        return MOE_EINVAL;
    moe_gguf_value v = {.type = MOE_GGUF_ARRAY};
    v.v.arr.etype = etype;
    v.v.arr.n = n;
    v.v.arr.data = data;
    return moe_gguf_writer_set_value(w, key, &v);
}

int moe_gguf_writer_set_arr_str(moe_gguf_writer *w, const char *key, const char *const *strs, uint64_t n) {
    if (!w || !key || (!strs && n))
        return MOE_EINVAL;
    if (w->state != W_META)
        return MOE_ESTATE;
    /* Build the copy directly rather than through a temporary item array. */
    moe_gguf_value v = {.type = MOE_GGUF_ARRAY};
    v.v.arr.etype = MOE_GGUF_STRING;
    if (n > SIZE_MAX / sizeof(moe_gguf_value))
        return MOE_ENOMEM;
    v.v.arr.items = calloc(n ? n : 1, sizeof(moe_gguf_value));
    if (!v.v.arr.items)
        return MOE_ENOMEM;
    for (uint64_t i = 0; i < n; i++) {
        v.v.arr.n = i;
        if (!strs[i]) {
            wvalue_free(&v);
            return MOE_EINVAL;
        }
        char *s = strdup(strs[i]);
        if (!s) {
            wvalue_free(&v);
            return MOE_ENOMEM;
        }
        v.v.arr.items[i].type = MOE_GGUF_STRING;
        v.v.arr.items[i].v.str.ptr = s;
        v.v.arr.items[i].v.str.len = strlen(s);
    }
    v.v.arr.n = n;
    return wkv_put(w, key, &v);
}

int moe_gguf_writer_add_tensor(moe_gguf_writer *w, const char *name, moe_type type, uint32_t n_dims,
                               const int64_t *ne) {
    if (!w || !name || !ne)
        return MOE_EINVAL;
    if (w->state != W_META)
        return MOE_ESTATE;
    const moe_type_traits *tr = moe_type_get((int)type);
    if (!tr || n_dims < 1 || n_dims > MOE_GGUF_MAX_DIMS)
        return MOE_EINVAL;
    wtensor t = {.type = type, .n_dims = n_dims};
    for (int d = 0; d < MOE_GGUF_MAX_DIMS; d++)
        t.ne[d] = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        if (ne[d] < 0)
            return MOE_EINVAL;
        t.ne[d] = ne[d];
    }
    if (t.ne[0] % tr->blck)
        return MOE_EINVAL;
    bool ovf = __builtin_mul_overflow((uint64_t)(t.ne[0] / tr->blck), (uint64_t)tr->size, &t.nbytes);
    for (int d = 1; d < MOE_GGUF_MAX_DIMS; d++)
        ovf |= __builtin_mul_overflow(t.nbytes, (uint64_t)t.ne[d], &t.nbytes);
    if (ovf || t.nbytes > (uint64_t)INT64_MAX)
        return MOE_EINVAL;
    size_t len = strlen(name);
    if (w->n_tensors == w->cap_tensors) {
        size_t cap = w->cap_tensors ? 2 * w->cap_tensors : 64;
        wtensor *n = realloc(w->tensors, cap * sizeof(*n));
        if (!n)
            return MOE_ENOMEM;
        w->tensors = n;
        w->cap_tensors = cap;
        /* Rebuild the name index at twice the new capacity. */
        name_index ix;
        if (index_init(&ix, cap))
            return MOE_ENOMEM;
        free(w->tix.slots);
        w->tix = ix;
        for (size_t i = 0; i < w->n_tensors; i++)
            *index_slot(&w->tix, w->tensors[i].name, strlen(w->tensors[i].name), wtensor_name_of, w) = i + 1;
    }
    uint64_t *slot = index_slot(&w->tix, name, len, wtensor_name_of, w);
    if (*slot)
        return MOE_EINVAL;
    t.name = strdup(name);
    if (!t.name)
        return MOE_ENOMEM;
    w->tensors[w->n_tensors] = t;
    *slot = ++w->n_tensors;
    return MOE_OK;
}

static bool w_bytes(moe_gguf_writer *w, const void *p, size_t n) {
    return n == 0 || fwrite(p, 1, n, w->f) == n;
}
static bool w_u32(moe_gguf_writer *w, uint32_t x) { return w_bytes(w, &x, 4); }
static bool w_u64(moe_gguf_writer *w, uint64_t x) { return w_bytes(w, &x, 8); }
static bool w_str(moe_gguf_writer *w, const char *s, uint64_t len) { return w_u64(w, len) && w_bytes(w, s, len); }

static bool w_pad(moe_gguf_writer *w, uint64_t pos) {
    static const uint8_t zeros[256];
    uint64_t pad = (w->alignment - pos % w->alignment) % w->alignment;
    while (pad) {
        size_t k = pad > sizeof(zeros) ? sizeof(zeros) : (size_t)pad;
        if (!w_bytes(w, zeros, k))
            return false;
        pad -= k;
    }
    return true;
}

static bool w_value(moe_gguf_writer *w, const moe_gguf_value *v) {
    uint8_t b[8];
    switch (v->type) {
    case MOE_GGUF_UINT8: b[0] = (uint8_t)v->v.u64; return w_bytes(w, b, 1);
    case MOE_GGUF_INT8: b[0] = (uint8_t)(int8_t)v->v.i64; return w_bytes(w, b, 1);
    case MOE_GGUF_BOOL: b[0] = v->v.b ? 1 : 0; return w_bytes(w, b, 1);
    case MOE_GGUF_UINT16: { uint16_t x = (uint16_t)v->v.u64; return w_bytes(w, &x, 2); }
    case MOE_GGUF_INT16: { int16_t x = (int16_t)v->v.i64; return w_bytes(w, &x, 2); }
    case MOE_GGUF_UINT32: return w_u32(w, (uint32_t)v->v.u64);
    case MOE_GGUF_INT32: { int32_t x = (int32_t)v->v.i64; return w_bytes(w, &x, 4); }
    case MOE_GGUF_FLOAT32: { float x = (float)v->v.f64; return w_bytes(w, &x, 4); }
    case MOE_GGUF_UINT64: return w_u64(w, v->v.u64);
    case MOE_GGUF_INT64: return w_bytes(w, &v->v.i64, 8);
    case MOE_GGUF_FLOAT64: return w_bytes(w, &v->v.f64, 8);
    case MOE_GGUF_STRING: return w_str(w, v->v.str.ptr, v->v.str.len);
    case MOE_GGUF_ARRAY: {
        const moe_gguf_array *a = &v->v.arr;
        if (!w_u32(w, (uint32_t)a->etype) || !w_u64(w, a->n))
            return false;
        if (vtype_sizes[a->etype])
            return w_bytes(w, a->data, (size_t)a->n * vtype_sizes[a->etype]);
        for (uint64_t i = 0; i < a->n; i++)
            if (!w_value(w, &a->items[i]))
                return false;
        return true;
    }
    default: return false;
    }
}

/* Moves past the finished tensor and any zero-byte ones after it, adding
 * the padding that aligns the next tensor. */
static bool w_advance(moe_gguf_writer *w) {
    while (w->cur < w->n_tensors && w->cur_done == w->tensors[w->cur].nbytes) {
        if (w->tensors[w->cur].nbytes && !w_pad(w, w->tensors[w->cur].nbytes))
            return false;
        w->cur++;
        w->cur_done = 0;
    }
    return true;
}

int moe_gguf_writer_begin(moe_gguf_writer *w, const char *path) {
    if (!w || !path)
        return MOE_EINVAL;
    if (w->state != W_META)
        return MOE_ESTATE;
    uint64_t off = 0;
    for (size_t i = 0; i < w->n_tensors; i++) {
        w->tensors[i].offset = off;
        uint64_t padded = (w->tensors[i].nbytes + w->alignment - 1) & ~(w->alignment - 1);
        if (__builtin_add_overflow(off, padded, &off))
            return MOE_EINVAL;
    }
    w->f = fopen(path, "wb");
    if (!w->f)
        return MOE_EIO;
    setvbuf(w->f, NULL, _IOFBF, 1 << 20);
    bool ok = w_bytes(w, "GGUF", 4) && w_u32(w, 3) && w_u64(w, w->n_tensors) && w_u64(w, w->n_kv);
    for (size_t i = 0; ok && i < w->n_kv; i++)
        ok = w_str(w, w->kvs[i].key, strlen(w->kvs[i].key)) && w_u32(w, (uint32_t)w->kvs[i].value.type) &&
             w_value(w, &w->kvs[i].value);
    for (size_t i = 0; ok && i < w->n_tensors; i++) {
        const wtensor *t = &w->tensors[i];
        ok = w_str(w, t->name, strlen(t->name)) && w_u32(w, t->n_dims);
        for (uint32_t d = 0; ok && d < t->n_dims; d++)
            ok = w_u64(w, (uint64_t)t->ne[d]);
        ok = ok && w_u32(w, (uint32_t)t->type) && w_u64(w, t->offset);
    }
    long pos = ok ? ftell(w->f) : -1;
    ok = ok && pos >= 0 && w_pad(w, (uint64_t)pos);
    w->cur = 0;
    w->cur_done = 0;
    ok = ok && w_advance(w);
    w->state = ok ? W_DATA : W_FAILED;
    return ok ? MOE_OK : MOE_EIO;
}

int moe_gguf_writer_write_tensor(moe_gguf_writer *w, const void *data, size_t n) {
    if (!w || (!data && n))
        return MOE_EINVAL;
    if (w->state == W_FAILED)
        return MOE_EIO;
    if (w->state != W_DATA)
        return MOE_ESTATE;
    if (n == 0)
        return MOE_OK;
    if (w->cur >= w->n_tensors || n > w->tensors[w->cur].nbytes - w->cur_done)
        return MOE_EINVAL;
    if (!w_bytes(w, data, n)) {
        w->state = W_FAILED;
        return MOE_EIO;
    }
    w->cur_done += n;
    if (!w_advance(w)) {
        w->state = W_FAILED;
        return MOE_EIO;
    }
    return MOE_OK;
}

int moe_gguf_writer_finish(moe_gguf_writer *w) {
    if (!w)
        return MOE_EINVAL;
    if (w->state == W_FAILED)
        return MOE_EIO;
    if (w->state != W_DATA)
        return MOE_ESTATE;
    if (w->cur < w->n_tensors)
        return MOE_ESTATE;
    int bad = fflush(w->f) != 0 || ferror(w->f);
    bad |= fclose(w->f) != 0;
    w->f = NULL;
    w->state = bad ? W_FAILED : W_DONE;
    return bad ? MOE_EIO : MOE_OK;
}
