/* batch.h - one forward step's flat batch.
 *
 * Tokens of several sequences (prefill chunks and single decode tokens
 * alike) go through one forward pass. Token t is ids[t] at position pos[t]
 * of sequence seq[t]; sequence s's KV block table is seqs[s] (see
 * kvcache.h), which must already cover every position in the batch. A
 * token attends to positions 0 .. pos[t] of its sequence: earlier steps'
 * entries from the cache, this step's from the batch itself (written to the
 * cache before attention). All arrays are host memory owned by the caller.
 */
#ifndef MOE_BATCH_H
#define MOE_BATCH_H

#include <stdint.h>

#include "kvcache.h"

typedef struct moe_batch {
    int64_t n_tok;
    const int32_t *ids; /* (n_tok) token ids */
    const int32_t *pos; /* (n_tok) positions, from 0 */
    const int32_t *seq; /* (n_tok) index into seqs */
    int64_t n_seq;
    const moe_kv_seq *seqs; /* (n_seq) block tables */
    /* (n_tok) nonzero where logits are wanted, or NULL for every token.
     * Logits rows come back in token order of the marked tokens. */
    const uint8_t *want_logits;
} moe_batch;

#endif
