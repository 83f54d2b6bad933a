/* safetensors.c - safetensors reader: mmap, validate the whole JSON header
 * with overflow-checked arithmetic, index the tensors by offset and name. */
#include "safetensors.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct moe_st {
    const uint8_t *buf;
    size_t size;
    bool mapped;
    moe_st_tensor *t; /* (n) sorted by offset */
    uint64_t n;
    const moe_st_tensor **by_name; /* (n) sorted by name */
    char **meta;                   /* (2 * n_meta) key, value, key, value... */
    uint64_t n_meta;
};

static const struct {
    const char *name;
    size_t size;
} DTYPES[MOE_ST_DTYPE_COUNT] = {
    [MOE_ST_BOOL] = {"BOOL", 1},    [MOE_ST_U8] = {"U8", 1},        [MOE_ST_I8] = {"I8", 1},
    [MOE_ST_F8_E4M3] = {"F8_E4M3", 1}, [MOE_ST_F8_E5M2] = {"F8_E5M2", 1}, [MOE_ST_I16] = {"I16", 2},
    [MOE_ST_U16] = {"U16", 2},      [MOE_ST_F16] = {"F16", 2},      [MOE_ST_BF16] = {"BF16", 2},
    [MOE_ST_I32] = {"I32", 4},      [MOE_ST_U32] = {"U32", 4},      [MOE_ST_F32] = {"F32", 4},
    [MOE_ST_I64] = {"I64", 8},      [MOE_ST_U64] = {"U64", 8},      [MOE_ST_F64] = {"F64", 8},
};

const char *moe_st_dtype_name(int d) { return d >= 0 && d < MOE_ST_DTYPE_COUNT ? DTYPES[d].name : "?"; }
size_t moe_st_dtype_size(int d) { return d >= 0 && d < MOE_ST_DTYPE_COUNT ? DTYPES[d].size : 0; }

static void seterr(char *err, size_t errsz, const char *fmt, ...) {
    if (!err || !errsz) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errsz, fmt, ap);
    va_end(ap);
}

/* A tensor name as it may be shown: hostile names must not carry terminal
 * escapes into a log, nor make the message unbounded. */
static const char *shown(const char *s, char *buf, size_t n) {
    size_t i = 0;
    for (; s[i] && i + 1 < n; i++) buf[i] = ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) ? '?' : s[i];
    buf[i] = 0;
    return buf;
}

/* A JSON number that is an exact non-negative integer <= 2^53 (beyond
 * that a double cannot say which integer the file meant). */
static bool json_u64(const cJSON *j, uint64_t *out) {
    if (!cJSON_IsNumber(j)) return false;
    double d = j->valuedouble;
    if (!(d >= 0 && d <= 9007199254740992.0) || floor(d) != d) return false;
    *out = (uint64_t)d;
    return true;
}

static int cmp_off(const void *a, const void *b) {
    const moe_st_tensor *x = a, *y = b;
    return x->offset < y->offset ? -1 : x->offset > y->offset ? 1 : (x->nbytes > y->nbytes) - (x->nbytes < y->nbytes);
}

static int cmp_name(const void *a, const void *b) {
    return strcmp((*(const moe_st_tensor *const *)a)->name, (*(const moe_st_tensor *const *)b)->name);
}

static int parse_tensor(const cJSON *e, moe_st_tensor *t, uint64_t data_size, char *err, size_t errsz) {
    char nb[80];
    const char *nm = shown(t->name, nb, sizeof nb);
    if (!cJSON_IsObject(e)) {
        seterr(err, errsz, "tensor '%s': entry is not an object", nm);
        return MOE_EFORMAT;
    }
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt)) {
        seterr(err, errsz, "tensor '%s': 'dtype' missing or not a string", nm);
        return MOE_EFORMAT;
    }
    int d = -1;
    for (int i = 0; i < MOE_ST_DTYPE_COUNT; i++)
        if (!strcmp(dt->valuestring, DTYPES[i].name)) d = i;
    if (d < 0) {
        char db[40];
        seterr(err, errsz, "tensor '%s': unknown dtype '%s'", nm, shown(dt->valuestring, db, sizeof db));
        return MOE_EFORMAT;
    }
    t->dtype = (moe_st_dtype)d;
    if (!cJSON_IsArray(sh)) {
        seterr(err, errsz, "tensor '%s': 'shape' missing or not an array", nm);
        return MOE_EFORMAT;
    }
    int nd = cJSON_GetArraySize(sh);
    if (nd > MOE_ST_MAX_DIMS) {
        seterr(err, errsz, "tensor '%s': %d dimensions (at most %d)", nm, nd, MOE_ST_MAX_DIMS);
        return MOE_EFORMAT;
    }
    t->n_dims = (uint32_t)nd;
    uint64_t n_elem = 1;
    bool overflow = false;
    int k = 0;
    for (const cJSON *x = sh->child; x; x = x->next, k++) {
        uint64_t v;
        if (!json_u64(x, &v) || v > INT64_MAX) {
            seterr(err, errsz, "tensor '%s': shape[%d] is not a non-negative integer", nm, k);
            return MOE_EFORMAT;
        }
        t->shape[k] = (int64_t)v;
        if (v && n_elem > UINT64_MAX / v) overflow = true;
        n_elem *= v;
    }
    size_t es = DTYPES[d].size;
    if (overflow || n_elem > UINT64_MAX / es) {
        seterr(err, errsz, "tensor '%s': shape's byte count overflows", nm);
        return MOE_EFORMAT;
    }
    t->n_elem = n_elem;
    uint64_t b, en;
    if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 || !json_u64(off->child, &b) ||
        !json_u64(off->child->next, &en)) {
        seterr(err, errsz, "tensor '%s': 'data_offsets' is not two non-negative integers", nm);
        return MOE_EFORMAT;
    }
    if (b > en || en > data_size) {
        seterr(err, errsz, "tensor '%s': data_offsets [%llu, %llu] outside the %llu-byte data section", nm,
               (unsigned long long)b, (unsigned long long)en, (unsigned long long)data_size);
        return MOE_EFORMAT;
    }
    if (en - b != n_elem * es) {
        seterr(err, errsz, "tensor '%s': data_offsets span %llu bytes but %s of %llu elements is %llu", nm,
               (unsigned long long)(en - b), DTYPES[d].name, (unsigned long long)n_elem,
               (unsigned long long)(n_elem * es));
        return MOE_EFORMAT;
    }
    t->offset = b;
    t->nbytes = en - b;
    return MOE_OK;
}

static int parse_meta(moe_st *s, const cJSON *m, char *err, size_t errsz) {
    if (!cJSON_IsObject(m)) {
        seterr(err, errsz, "'__metadata__' is not an object");
        return MOE_EFORMAT;
    }
    uint64_t n = (uint64_t)cJSON_GetArraySize(m);
    s->meta = calloc(n ? 2 * n : 1, sizeof(*s->meta));
    if (!s->meta) return MOE_ENOMEM;
    for (const cJSON *x = m->child; x; x = x->next) {
        if (!cJSON_IsString(x)) {
            char kb[64];
            seterr(err, errsz, "'__metadata__' entry '%s' is not a string", shown(x->string, kb, sizeof kb));
            return MOE_EFORMAT;
        }
        char *k = strdup(x->string), *v = strdup(x->valuestring);
        s->meta[2 * s->n_meta] = k;
        s->meta[2 * s->n_meta + 1] = v;
        s->n_meta++;
        if (!k || !v) return MOE_ENOMEM;
    }
    return MOE_OK;
}

static int parse(moe_st *s, char *err, size_t errsz) {
    if (s->size < 8) {
        seterr(err, errsz, "file of %zu bytes is shorter than the 8-byte header length", s->size);
        return MOE_EFORMAT;
    }
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | s->buf[i];
    if (hl > MOE_ST_MAX_HEADER) {
        seterr(err, errsz, "header length %llu exceeds the limit of %llu bytes", (unsigned long long)hl,
               (unsigned long long)MOE_ST_MAX_HEADER);
        return MOE_EFORMAT;
    }
    if (hl < 2 || hl > s->size - 8) {
        seterr(err, errsz, "header length %llu does not fit the %zu-byte file", (unsigned long long)hl, s->size);
        return MOE_EFORMAT;
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts((const char *)s->buf + 8, (size_t)hl, &end, 0);
    if (!root) {
        size_t at = end ? (size_t)(end - (const char *)s->buf) : 8;
        seterr(err, errsz, "header is not valid JSON (near byte %zu)", at);
        return MOE_EFORMAT;
    }
    int rc = MOE_OK;
    /* the reference writer pads the header with spaces; anything else after
     * the object is a corrupt or hostile header */
    for (const char *p = end; p && p < (const char *)s->buf + 8 + hl; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            seterr(err, errsz, "trailing bytes after the header's JSON object (byte %zu)",
                   (size_t)(p - (const char *)s->buf));
            rc = MOE_EFORMAT;
            goto out;
        }
    if (!cJSON_IsObject(root)) {
        seterr(err, errsz, "header is not a JSON object");
        rc = MOE_EFORMAT;
        goto out;
    }
    uint64_t data_size = s->size - 8 - hl;
    uint64_t cap = (uint64_t)cJSON_GetArraySize(root);
    s->t = calloc(cap ? cap : 1, sizeof(*s->t));
    s->by_name = calloc(cap ? cap : 1, sizeof(*s->by_name));
    if (!s->t || !s->by_name) {
        rc = MOE_ENOMEM;
        goto out;
    }
    bool had_meta = false;
    for (const cJSON *e = root->child; e; e = e->next) {
        if (!strcmp(e->string, "__metadata__")) {
            if (had_meta) {
                seterr(err, errsz, "'__metadata__' appears twice");
                rc = MOE_EFORMAT;
                goto out;
            }
            had_meta = true;
            if ((rc = parse_meta(s, e, err, errsz))) goto out;
            continue;
        }
        size_t ln = strlen(e->string);
        if (ln == 0 || ln > MOE_ST_MAX_NAME) {
            seterr(err, errsz, "tensor name of %zu bytes (1..%d allowed)", ln, MOE_ST_MAX_NAME);
            rc = MOE_EFORMAT;
            goto out;
        }
        moe_st_tensor *t = &s->t[s->n];
        if (!(t->name = strdup(e->string))) {
            rc = MOE_ENOMEM;
            goto out;
        }
        s->n++;
        if ((rc = parse_tensor(e, t, data_size, err, errsz))) goto out;
    }
    qsort(s->t, s->n, sizeof(*s->t), cmp_off);
    /* the furthest end so far, not the previous one: an empty tensor sorted
     * between two others must not hide their overlap */
    const moe_st_tensor *last = NULL;
    for (uint64_t i = 0; i < s->n; i++) {
        moe_st_tensor *t = &s->t[i];
        if (t->nbytes && last && t->offset < last->offset + last->nbytes) {
            char a[80], b[80];
            seterr(err, errsz, "tensors '%s' and '%s' overlap at data offset %llu", shown(last->name, a, sizeof a),
                   shown(t->name, b, sizeof b), (unsigned long long)t->offset);
            rc = MOE_EFORMAT;
            goto out;
        }
        if (t->nbytes && (!last || t->offset + t->nbytes > last->offset + last->nbytes)) last = t;
        t->data = s->buf + 8 + hl + t->offset;
        s->by_name[i] = t;
    }
    qsort(s->by_name, s->n, sizeof(*s->by_name), cmp_name);
    for (uint64_t i = 1; i < s->n; i++)
        if (!strcmp(s->by_name[i]->name, s->by_name[i - 1]->name)) {
            char a[80];
            seterr(err, errsz, "tensor '%s' appears twice", shown(s->by_name[i]->name, a, sizeof a));
            rc = MOE_EFORMAT;
            goto out;
        }
out:
    cJSON_Delete(root);
    return rc;
}

static moe_st *open_buf(const void *buf, size_t size, bool mapped, int *status, char *err, size_t errsz) {
    int st_dummy;
    if (!status) status = &st_dummy;
    if (err && errsz) err[0] = 0;
    moe_st *s = calloc(1, sizeof(*s));
    if (!s) {
        if (mapped) munmap((void *)buf, size);
        *status = MOE_ENOMEM;
        seterr(err, errsz, "out of memory");
        return NULL;
    }
    s->buf = buf;
    s->size = size;
    s->mapped = mapped;
    int rc = parse(s, err, errsz);
    if (rc) {
        if (rc == MOE_ENOMEM) seterr(err, errsz, "out of memory reading the header");
        moe_st_close(s);
        *status = rc;
        return NULL;
    }
    *status = MOE_OK;
    return s;
}

moe_st *moe_st_open_memory(const void *buf, size_t size, int *status, char *err, size_t errsz) {
    return open_buf(buf, size, false, status, err, errsz);
}

moe_st *moe_st_open(const char *path, int *status, char *err, size_t errsz) {
    int st_dummy;
    if (!status) status = &st_dummy;
    /* O_NONBLOCK: a FIFO would otherwise block the open until a writer came */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        *status = MOE_EIO;
        seterr(err, errsz, "cannot open '%s': %s", path, strerror(errno));
        return NULL;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        *status = MOE_EIO;
        seterr(err, errsz, "'%s': not a regular file", path);
        return NULL;
    }
    size_t size = (size_t)sb.st_size;
    void *buf = NULL;
    if (size) {
        buf = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (buf == MAP_FAILED) {
            int e = errno;
            close(fd);
            *status = e == ENOMEM ? MOE_ENOMEM : MOE_EIO;
            seterr(err, errsz, "cannot map '%s': %s", path, strerror(e));
            return NULL;
        }
    }
    close(fd);
    char inner[MOE_ERR_MAX];
    moe_st *s = open_buf(buf, size, size != 0, status, inner, sizeof inner);
    if (!s) seterr(err, errsz, "%s: %s", path, inner);
    return s;
}

void moe_st_close(moe_st *s) {
    if (!s) return;
    for (uint64_t i = 0; i < s->n; i++) free((char *)s->t[i].name);
    for (uint64_t i = 0; i < 2 * s->n_meta; i++) free(s->meta[i]);
    free(s->meta);
    free(s->t);
    free(s->by_name);
    if (s->mapped) munmap((void *)s->buf, s->size);
    free(s);
}

uint64_t moe_st_n_tensors(const moe_st *s) { return s ? s->n : 0; }

const moe_st_tensor *moe_st_tensor_at(const moe_st *s, uint64_t i) { return s && i < s->n ? &s->t[i] : NULL; }

const moe_st_tensor *moe_st_find(const moe_st *s, const char *name) {
    if (!s || !name) return NULL;
    uint64_t lo = 0, hi = s->n;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        int c = strcmp(s->by_name[mid]->name, name);
        if (c == 0) return s->by_name[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

const char *moe_st_metadata(const moe_st *s, const char *key) {
    for (uint64_t i = 0; s && key && i < s->n_meta; i++)
        if (!strcmp(s->meta[2 * i], key)) return s->meta[2 * i + 1];
    return NULL;
}

void moe_st_drop_pages(const moe_st *s, const moe_st_tensor *t) {
    /* only a read-only file mapping: MADV_DONTNEED on anonymous memory
     * (a caller's buffer) would zero it */
    if (!s || !s->mapped || !t || t < s->t || t >= s->t + s->n || !t->nbytes) return;
    long pg = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)t->data & ~(uintptr_t)(pg - 1), e = (uintptr_t)t->data + t->nbytes;
    madvise((void *)a, e - a, MADV_DONTNEED);
}
