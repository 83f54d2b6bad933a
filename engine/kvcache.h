/* kvcache.h - the paged KV cache: fixed-size blocks of cache slots, one
 * block table per sequence.
 *
 * Every layer has the same number of blocks; block b of every layer holds
 * positions [j * block_size, (j + 1) * block_size) of whichever sequence
 * lists b as its j-th block. A slot is k_width floats of K and v_width of
 * V (GQA: n_kv_head * head_dim each; MLA: kv_lora + rope dims of latent
 * and v_width 0, nothing expanded). Storage is backend memory; the block
 * allocator is host-side bookkeeping (a free stack + a reference count per
 * block, so a double free is caught instead of corrupting the free list).
 * Blocks may be shared read-only between sequences (the full blocks of a
 * prompt that n > 1 choices continue): each holder takes a reference and
 * a block returns to the pool when its last holder frees it. Whoever
 * shares a block must not write to it again.
 *
 * Threads: engine thread only (no locking).
 */
#ifndef MOE_KVCACHE_H
#define MOE_KVCACHE_H

#include <stdint.h>

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_kv_opts {
    int64_t n_layer;
    int64_t block_size; /* positions per block, > 0 */
    int64_t n_blocks;   /* blocks per layer, 1 .. INT32_MAX */
    int64_t k_width;    /* floats per slot for K (or the MLA latent) */
    int64_t v_width;    /* floats per slot for V; 0 for MLA */
} moe_kv_opts;

typedef struct moe_kv_cache moe_kv_cache;

/* Allocates the cache on `be` (which must outlive it). Returns NULL with
 * *status = MOE_EINVAL (bad sizes, overflow) or MOE_ENOMEM. Caller frees
 * with moe_kv_destroy(). */
moe_kv_cache *moe_kv_create(const moe_backend *be, const moe_kv_opts *opts, int *status);
void moe_kv_destroy(moe_kv_cache *kv); /* NULL is a no-op */

const moe_kv_opts *moe_kv_get_opts(const moe_kv_cache *kv);
/* Layer il's storage: n_blocks * block_size slots (backend pointers); V is
 * NULL when v_width is 0 or il is out of range. */
float *moe_kv_k(moe_kv_cache *kv, int64_t il);
float *moe_kv_v(moe_kv_cache *kv, int64_t il);

/* Blocks that can be handed out: free ones plus cached ones nobody holds. */
int64_t moe_kv_n_free(const moe_kv_cache *kv);

/* Takes n blocks, all or nothing: writes their ids to out[n]. Returns
 * MOE_OK, MOE_EFULL (fewer than n free; nothing taken) or MOE_EINVAL. */
int moe_kv_alloc(moe_kv_cache *kv, int64_t n, int32_t *out);
/* Drops one reference to each block; a block whose last reference goes
 * returns to the pool. Returns MOE_EINVAL (and frees none) when an id is
 * out of range, not currently allocated (double free) or listed twice. */
int moe_kv_free(moe_kv_cache *kv, const int32_t *blocks, int64_t n);
/* Takes one more reference to each (allocated) block. Returns MOE_OK or
 * MOE_EINVAL (an id out of range or free; nothing changed). */
int moe_kv_ref(moe_kv_cache *kv, const int32_t *blocks, int64_t n);
/* Holders of `block` (0 when free or out of range). */
int32_t moe_kv_refcount(const moe_kv_cache *kv, int32_t block);

/* Prefix cache (vLLM's automatic prefix caching, by block hash): once a
 * sequence has computed a whole block, it publishes the block under the
 * hash of its tokens chained to the hash of the blocks before it. A later
 * sequence whose tokens start the same way finds those blocks and takes
 * references instead of recomputing them. A published block keeps its
 * content when its last holder frees it: it counts as free and is only
 * overwritten (evicted, least recently released first, the deepest block
 * of a sequence before its prefix) when no plain free block is left.
 * Lookups compare the tokens and the parent hash too, so a hash collision
 * can never return the wrong K/V. Off until enabled. */
/* Enables the prefix cache. Returns MOE_OK or MOE_ENOMEM. */
int moe_kv_prefix_enable(moe_kv_cache *kv);
/* Hash of a block of n token ids following the chain hash `parent` (0 for
 * the first block). Keyed per process (hash.h): never store or compare it
 * across runs. */
uint64_t moe_kv_block_hash(uint64_t parent, const int32_t *toks, int64_t n);
/* The block holding toks[0..block_size) after `parent` with this hash, with
 * a reference taken for the caller; -1 when none (or the cache is off). */
int32_t moe_kv_prefix_find(moe_kv_cache *kv, uint64_t parent, uint64_t hash, const int32_t *toks);
/* Publishes a held, fully computed block. Ignored when the cache is off,
 * the block is not held or already published, or the same content is
 * cached in another block. The caller must never write to it again. */
void moe_kv_prefix_publish(moe_kv_cache *kv, int32_t block, uint64_t parent, uint64_t hash, const int32_t *toks);
/* Cached blocks that nobody holds (counted in moe_kv_n_free). */
int64_t moe_kv_n_cached(const moe_kv_cache *kv);

/* A sequence's block table. Zero-initialize; grows with reserve, returns
 * every block with release. */
typedef struct moe_kv_seq {
    int32_t *blocks; /* (n_blocks) owned */
    int64_t n_blocks;
    int64_t cap;
} moe_kv_seq;

/* Makes the table cover positions 0 .. n_pos-1, taking blocks as needed.
 * Returns MOE_OK, MOE_EFULL (nothing changed) or MOE_ENOMEM. */
int moe_kv_seq_reserve(moe_kv_cache *kv, moe_kv_seq *s, int64_t n_pos);
/* Makes the empty table dst start with src's first n_blocks blocks,
 * taking a reference to each (prefix sharing). Returns MOE_OK, MOE_EINVAL
 * (dst not empty, n_blocks > src's) or MOE_ENOMEM (nothing changed). */
int moe_kv_seq_share(moe_kv_cache *kv, moe_kv_seq *dst, const moe_kv_seq *src, int64_t n_blocks);
/* Drops the sequence's reference to each of its blocks and frees its
 * table; s is zeroed. */
void moe_kv_seq_release(moe_kv_cache *kv, moe_kv_seq *s);

#ifdef __cplusplus
}
#endif
#endif
