/* kvcache.c - block allocator and storage of the paged KV cache. */
#include "kvcache.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "array.h"
#include "hash.h"

struct moe_kv_cache {
    moe_backend be;
    moe_kv_opts o;
    float **k; /* (n_layer) */
    float **v; /* (n_layer) or NULL entries */
    int32_t *free_stack; /* (n_blocks) blocks with no content worth keeping */
    int64_t n_stack;
    int64_t n_free; /* n_stack + cached blocks nobody holds (both can be handed out) */
    int32_t *ref;   /* (n_blocks) holders of each block; 0 = free or cached */
    /* prefix cache (NULL until moe_kv_prefix_enable) */
    struct kv_prefix *pc;
};

/* A published block: its content is the K/V of `toks` at positions that
 * follow the chain whose hash is `parent`. Published blocks nobody holds
 * sit in an LRU list (oldest at the head) and are evicted when the free
 * stack runs dry. */
struct kv_prefix {
    int64_t n_buckets; /* power of two */
    int32_t *bucket;   /* (n_buckets) first block of each hash chain, -1 */
    int32_t *chain;    /* (n_blocks) next block in the same bucket, -1 */
    uint64_t *hash, *parent; /* (n_blocks) */
    int32_t *toks;     /* (n_blocks, block_size) */
    uint8_t *published; /* (n_blocks) */
    int32_t *lru_prev, *lru_next; /* (n_blocks) */
    int32_t lru_head, lru_tail;
    int64_t n_lru;
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
    kv->n_stack = kv->n_free = o->n_blocks;
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
    if (kv->pc) {
        free(kv->pc->bucket);
        free(kv->pc->chain);
        free(kv->pc->hash);
        free(kv->pc->parent);
        free(kv->pc->toks);
        free(kv->pc->published);
        free(kv->pc->lru_prev);
        free(kv->pc->lru_next);
        free(kv->pc);
    }
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

static void lru_unlink(struct kv_prefix *pc, int32_t b) {
    int32_t p = pc->lru_prev[b], n = pc->lru_next[b];
    if (p >= 0) pc->lru_next[p] = n;
    else pc->lru_head = n;
    if (n >= 0) pc->lru_prev[n] = p;
    else pc->lru_tail = p;
    pc->lru_prev[b] = pc->lru_next[b] = -1;
    pc->n_lru--;
}

static void lru_push(struct kv_prefix *pc, int32_t b) {
    pc->lru_prev[b] = pc->lru_tail;
    pc->lru_next[b] = -1;
    if (pc->lru_tail >= 0) pc->lru_next[pc->lru_tail] = b;
    else pc->lru_head = b;
    pc->lru_tail = b;
    pc->n_lru++;
}

/* Forgets what block b holds (it is about to be overwritten). */
static void unpublish(struct kv_prefix *pc, int32_t b) {
    if (!pc->published[b]) return;
    int32_t *pp = &pc->bucket[pc->hash[b] & (uint64_t)(pc->n_buckets - 1)];
    while (*pp != b) pp = &pc->chain[*pp];
    *pp = pc->chain[b];
    pc->chain[b] = -1;
    pc->published[b] = 0;
}

int moe_kv_alloc(moe_kv_cache *kv, int64_t n, int32_t *out) {
    if (!kv || n < 0 || (n && !out)) return MOE_EINVAL;
    if (n > kv->n_free) return MOE_EFULL;
    for (int64_t i = 0; i < n; i++) {
        int32_t b;
        if (kv->n_stack) {
            b = kv->free_stack[--kv->n_stack];
        } else { /* evict the least recently released cached block */
            b = kv->pc->lru_head;
            lru_unlink(kv->pc, b);
            unpublish(kv->pc, b);
        }
        kv->n_free--;
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
    /* last block first: a sequence's deepest cached blocks are evicted
     * before the prefix they extend */
    for (int64_t i = n - 1; i >= 0; i--) {
        int32_t b = blocks[i];
        if (--kv->ref[b]) continue;
        kv->n_free++;
        if (kv->pc && kv->pc->published[b]) lru_push(kv->pc, b);
        else kv->free_stack[kv->n_stack++] = b;
    }
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
    MOE_TRY(moe_array_grow((void **)&s->blocks, &s->cap, need, 4, sizeof *s->blocks));
    int rc = moe_kv_alloc(kv, need - s->n_blocks, s->blocks + s->n_blocks);
    if (rc) return rc;
    s->n_blocks = need;
    return MOE_OK;
}

int moe_kv_seq_share(moe_kv_cache *kv, moe_kv_seq *dst, const moe_kv_seq *src, int64_t n_blocks) {
    if (!kv || !dst || !src || dst->n_blocks || n_blocks < 0 || n_blocks > src->n_blocks) return MOE_EINVAL;
    MOE_TRY(moe_array_grow((void **)&dst->blocks, &dst->cap, n_blocks, 4, sizeof *dst->blocks));
    int rc = moe_kv_ref(kv, src->blocks, n_blocks);
    if (rc) return rc;
    if (n_blocks) memcpy(dst->blocks, src->blocks, (size_t)n_blocks * sizeof(int32_t));
    dst->n_blocks = n_blocks;
    return MOE_OK;
}

int moe_kv_prefix_enable(moe_kv_cache *kv) {
    if (!kv) return MOE_EINVAL;
    if (kv->pc) return MOE_OK;
    int64_t nb = kv->o.n_blocks, nbk = 16;
    while (nbk < nb) nbk *= 2;
    if ((uint64_t)nb > SIZE_MAX / sizeof(int32_t) / (uint64_t)kv->o.block_size) return MOE_ENOMEM;
    struct kv_prefix *pc = calloc(1, sizeof(*pc));
    if (!pc) return MOE_ENOMEM;
    pc->n_buckets = nbk;
    pc->bucket = malloc((size_t)nbk * sizeof(int32_t));
    pc->chain = malloc((size_t)nb * sizeof(int32_t));
    pc->hash = calloc((size_t)nb, sizeof(uint64_t));
    pc->parent = calloc((size_t)nb, sizeof(uint64_t));
    pc->toks = malloc((size_t)nb * (size_t)kv->o.block_size * sizeof(int32_t));
    pc->published = calloc((size_t)nb, 1);
    pc->lru_prev = malloc((size_t)nb * sizeof(int32_t));
    pc->lru_next = malloc((size_t)nb * sizeof(int32_t));
    kv->pc = pc; /* freed by moe_kv_destroy even when incomplete */
    if (!pc->bucket || !pc->chain || !pc->hash || !pc->parent || !pc->toks || !pc->published || !pc->lru_prev ||
        !pc->lru_next) {
        kv->pc = NULL;
        free(pc->bucket);
        free(pc->chain);
        free(pc->hash);
        free(pc->parent);
        free(pc->toks);
        free(pc->published);
        free(pc->lru_prev);
        free(pc->lru_next);
        free(pc);
        return MOE_ENOMEM;
    }
    memset(pc->bucket, 0xff, (size_t)nbk * sizeof(int32_t));
    memset(pc->chain, 0xff, (size_t)nb * sizeof(int32_t));
    memset(pc->lru_prev, 0xff, (size_t)nb * sizeof(int32_t));
    memset(pc->lru_next, 0xff, (size_t)nb * sizeof(int32_t));
    pc->lru_head = pc->lru_tail = -1;
    return MOE_OK;
}

/* The tokens are a client's prompt: the keyed hash (hash.h) keeps a client
 * from sending prompts whose blocks all share one bucket chain. The parent
 * goes into the key, which chains the blocks without copying them. */
uint64_t moe_kv_block_hash(uint64_t parent, const int32_t *toks, int64_t n) {
    moe_hash_key k = *moe_hash_process_key();
    k.k0 ^= parent;
    return moe_hash_keyed(toks, (size_t)n * sizeof *toks, &k);
}

static bool same_block(const moe_kv_cache *kv, int32_t b, uint64_t parent, uint64_t hash, const int32_t *toks) {
    const struct kv_prefix *pc = kv->pc;
    return pc->hash[b] == hash && pc->parent[b] == parent &&
           !memcmp(pc->toks + (size_t)b * (size_t)kv->o.block_size, toks, (size_t)kv->o.block_size * sizeof(int32_t));
}

int32_t moe_kv_prefix_find(moe_kv_cache *kv, uint64_t parent, uint64_t hash, const int32_t *toks) {
    if (!kv || !kv->pc || !toks) return -1;
    struct kv_prefix *pc = kv->pc;
    for (int32_t b = pc->bucket[hash & (uint64_t)(pc->n_buckets - 1)]; b >= 0; b = pc->chain[b]) {
        if (!same_block(kv, b, parent, hash, toks)) continue;
        if (kv->ref[b] == 0) { /* cached, unheld: no longer evictable */
            lru_unlink(pc, b);
            kv->n_free--;
        }
        kv->ref[b]++;
        return b;
    }
    return -1;
}

void moe_kv_prefix_publish(moe_kv_cache *kv, int32_t block, uint64_t parent, uint64_t hash, const int32_t *toks) {
    if (!kv || !kv->pc || !toks || block < 0 || block >= kv->o.n_blocks || !kv->ref[block]) return;
    struct kv_prefix *pc = kv->pc;
    if (pc->published[block]) return;
    int32_t *head = &pc->bucket[hash & (uint64_t)(pc->n_buckets - 1)];
    for (int32_t b = *head; b >= 0; b = pc->chain[b])
        if (same_block(kv, b, parent, hash, toks)) return; /* already cached elsewhere */
    pc->hash[block] = hash;
    pc->parent[block] = parent;
    memcpy(pc->toks + (size_t)block * (size_t)kv->o.block_size, toks, (size_t)kv->o.block_size * sizeof(int32_t));
    pc->published[block] = 1;
    pc->chain[block] = *head;
    *head = block;
}

int64_t moe_kv_n_cached(const moe_kv_cache *kv) { return kv && kv->pc ? kv->pc->n_lru : 0; }

void moe_kv_seq_release(moe_kv_cache *kv, moe_kv_seq *s) {
    if (!s) return;
    if (kv && s->n_blocks) moe_kv_free(kv, s->blocks, s->n_blocks);
    free(s->blocks);
    memset(s, 0, sizeof(*s));
}
