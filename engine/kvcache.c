/* kvcache.c - block allocator and storage of the paged KV cache. */
#include "kvcache.h"

#include <stdlib.h>
#include <string.h>

struct moe_kv_cache {
    moe_backend be;
    moe_kv_opts o;
    float **k; /* (n_layer) */
    float **v; /* (n_layer) or NULL entries */
    int32_t *free_stack; /* (n_blocks) */
    int64_t n_free;
    int32_t *ref; /* (n_blocks) holders of each block; 0 = free */
};

moe_kv_cache *moe_kv_create(const moe_backend *be, const moe_kv_opts *o, int *status) {
    int st = MOE_EINVAL;
    moe_kv_cache *kv = NULL;
    if (!be || !be->ops || !o || o->n_layer <= 0 || o->block_size <= 0 || o->n_blocks <= 0 ||
        o->n_blocks > INT32_MAX || o->k_width <= 0 || o->v_width < 0)
        goto fail;
    if (o->n_blocks > INT64_MAX / o->block_size) goto fail;
    int64_t slots = o->n_blocks * o->block_size;
    if ((uint64_t)slots > SIZE_MAX / sizeof(float) / (uint64_t)o->k_width ||
        (o->v_width && (uint64_t)slots > SIZE_MAX / sizeof(float) / (uint64_t)o->v_width))
        goto fail;
    st = MOE_ENOMEM;
    kv = calloc(1, sizeof(*kv));
    if (!kv) goto fail;
    kv->be = *be;
    kv->o = *o;
    kv->k = calloc((size_t)o->n_layer, sizeof(float *));
    kv->v = calloc((size_t)o->n_layer, sizeof(float *));
    kv->free_stack = malloc((size_t)o->n_blocks * sizeof(int32_t));
    kv->ref = calloc((size_t)o->n_blocks, sizeof(int32_t));
    if (!kv->k || !kv->v || !kv->free_stack || !kv->ref) goto fail;
    for (int64_t il = 0; il < o->n_layer; il++) {
        kv->k[il] = be->ops->alloc(be->ctx, (size_t)slots * (size_t)o->k_width * sizeof(float));
        if (!kv->k[il]) goto fail;
        if (o->v_width) {
            kv->v[il] = be->ops->alloc(be->ctx, (size_t)slots * (size_t)o->v_width * sizeof(float));
            if (!kv->v[il]) goto fail;
        }
    }
    /* low ids on top, so a fresh cache hands out 0, 1, 2, ... */
    for (int64_t i = 0; i < o->n_blocks; i++) kv->free_stack[i] = (int32_t)(o->n_blocks - 1 - i);
    kv->n_free = o->n_blocks;
    if (status) *status = MOE_OK;
    return kv;
fail:
    moe_kv_destroy(kv);
    if (status) *status = st;
    return NULL;
}

void moe_kv_destroy(moe_kv_cache *kv) {
    if (!kv) return;
    for (int64_t il = 0; il < kv->o.n_layer; il++) {
        if (kv->k && kv->k[il]) kv->be.ops->free(kv->be.ctx, kv->k[il]);
        if (kv->v && kv->v[il]) kv->be.ops->free(kv->be.ctx, kv->v[il]);
    }
    free(kv->k);
    free(kv->v);
    free(kv->free_stack);
    free(kv->ref);
    free(kv);
}

const moe_kv_opts *moe_kv_get_opts(const moe_kv_cache *kv) { return kv ? &kv->o : NULL; }

float *moe_kv_k(moe_kv_cache *kv, int64_t il) {
    return kv && il >= 0 && il < kv->o.n_layer ? kv->k[il] : NULL;
}

float *moe_kv_v(moe_kv_cache *kv, int64_t il) {
    return kv && il >= 0 && il < kv->o.n_layer ? kv->v[il] : NULL;
}

int64_t moe_kv_n_free(const moe_kv_cache *kv) { return kv ? kv->n_free : 0; }

int moe_kv_alloc(moe_kv_cache *kv, int64_t n, int32_t *out) {
    if (!kv || n < 0 || (n && !out)) return MOE_EINVAL;
    if (n > kv->n_free) return MOE_EFULL;
    for (int64_t i = 0; i < n; i++) {
        int32_t b = kv->free_stack[--kv->n_free];
        kv->ref[b] = 1;
        out[i] = b;
    }
    return MOE_OK;
}

int moe_kv_free(moe_kv_cache *kv, const int32_t *blocks, int64_t n) {
    if (!kv || n < 0 || (n && !blocks)) return MOE_EINVAL;
    /* validate everything first so a bad list frees nothing */
    for (int64_t i = 0; i < n; i++) {
        if (blocks[i] < 0 || blocks[i] >= kv->o.n_blocks || !kv->ref[blocks[i]]) return MOE_EINVAL;
        for (int64_t j = 0; j < i; j++)
            if (blocks[j] == blocks[i]) return MOE_EINVAL;
    }
    for (int64_t i = 0; i < n; i++)
        if (--kv->ref[blocks[i]] == 0) kv->free_stack[kv->n_free++] = blocks[i];
    return MOE_OK;
}

int moe_kv_ref(moe_kv_cache *kv, const int32_t *blocks, int64_t n) {
    if (!kv || n < 0 || (n && !blocks)) return MOE_EINVAL;
    for (int64_t i = 0; i < n; i++)
        if (blocks[i] < 0 || blocks[i] >= kv->o.n_blocks || !kv->ref[blocks[i]] || kv->ref[blocks[i]] == INT32_MAX)
            return MOE_EINVAL;
    for (int64_t i = 0; i < n; i++) kv->ref[blocks[i]]++;
    return MOE_OK;
}

int32_t moe_kv_refcount(const moe_kv_cache *kv, int32_t block) {
    return kv && block >= 0 && block < kv->o.n_blocks ? kv->ref[block] : 0;
}

int moe_kv_seq_reserve(moe_kv_cache *kv, moe_kv_seq *s, int64_t n_pos) {
    if (!kv || !s || n_pos < 0) return MOE_EINVAL;
    int64_t need = (n_pos + kv->o.block_size - 1) / kv->o.block_size;
    if (need <= s->n_blocks) return MOE_OK;
    if (need - s->n_blocks > kv->n_free) return MOE_EFULL;
    if (need > s->cap) {
        int64_t cap = s->cap ? s->cap : 4;
        while (cap < need) cap *= 2;
        int32_t *nb = realloc(s->blocks, (size_t)cap * sizeof(int32_t));
        if (!nb) return MOE_ENOMEM;
        s->blocks = nb;
        s->cap = cap;
    }
    int rc = moe_kv_alloc(kv, need - s->n_blocks, s->blocks + s->n_blocks);
    if (rc) return rc;
    s->n_blocks = need;
    return MOE_OK;
}

int moe_kv_seq_share(moe_kv_cache *kv, moe_kv_seq *dst, const moe_kv_seq *src, int64_t n_blocks) {
    if (!kv || !dst || !src || dst->n_blocks || n_blocks < 0 || n_blocks > src->n_blocks) return MOE_EINVAL;
    if (n_blocks > dst->cap) {
        int64_t cap = dst->cap ? dst->cap : 4;
        while (cap < n_blocks) cap *= 2;
        int32_t *nb = realloc(dst->blocks, (size_t)cap * sizeof(int32_t));
        if (!nb) return MOE_ENOMEM;
        dst->blocks = nb;
        dst->cap = cap;
    }
    int rc = moe_kv_ref(kv, src->blocks, n_blocks);
    if (rc) return rc;
    if (n_blocks) memcpy(dst->blocks, src->blocks, (size_t)n_blocks * sizeof(int32_t));
    dst->n_blocks = n_blocks;
    return MOE_OK;
}

void moe_kv_seq_release(moe_kv_cache *kv, moe_kv_seq *s) {
    if (!s) return;
    if (kv && s->n_blocks) moe_kv_free(kv, s->blocks, s->n_blocks);
    free(s->blocks);
    memset(s, 0, sizeof(*s));
}
