/* forward.h - the transformer forward passes (llama / Mixtral / qwen2 /
 * qwen2moe / qwen3moe / deepseek2 (V2, V2-Lite, V3)) over a flat batch and
 * the paged KV cache, written once against backend.h.
 *
 * moe_fwd_create() takes a loaded moe_model (model.h: hyper-parameters,
 * rope scaling and the weight views, all read and checked there) and binds
 * every weight on the backend (the CPU backend uses the mapped file in
 * place). It derives one small tensor: for DeepSeek files with the
 * original `attn_kv_b` layout, the per-head transposed k_b that MLA
 * attention needs to work on the compressed cache (same type for
 * F32/F16/BF16 files, Q8_0 for quantized ones when the nope width allows,
 * else F32).
 *
 * Threads: a moe_fwd belongs to the thread that owns its backend.
 */
#ifndef MOE_FORWARD_H
#define MOE_FORWARD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "batch.h"
#include "kvcache.h"
#include "model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_fwd moe_fwd;

/* Builds the forward pass for model `m` on `be`; both must outlive it.
 * Returns NULL with *status (MOE_EINVAL: a backend op missing, named in
 * err; MOE_EUNSUPPORTED: a weight type the backend cannot compute with;
 * MOE_ENOMEM; or the backend's error) and a reason in err (errsz bytes,
 * may be NULL). Free with moe_fwd_free(). */
moe_fwd *moe_fwd_create(const moe_model *m, const moe_backend *be, int *status, char *err, size_t errsz);
void moe_fwd_free(moe_fwd *fw); /* NULL is a no-op */
/* Profiling: with MOE_FWD_PROFILE=1 in the environment when the pass is
 * created, each backend op's wall time is summed (by op, and by step size:
 * one token, up to 64, more; opstats.h) and logged (moe_log, info) by
 * moe_fwd_free(). Off otherwise (the ops are called unwrapped). */

int64_t moe_fwd_n_vocab(const moe_fwd *fw);
int64_t moe_fwd_n_layer(const moe_fwd *fw);
int64_t moe_fwd_n_embd(const moe_fwd *fw);
int64_t moe_fwd_ctx_len(const moe_fwd *fw); /* context_length from the file */

/* The KV cache layout this model needs (k/v widths, layers) for the given
 * block size and count; pass the result to moe_kv_create(). */
int moe_fwd_kv_opts(const moe_fwd *fw, int64_t block_size, int64_t n_blocks, moe_kv_opts *out);

/* Runs one step. Writes the batch's K/V (or MLA latents) into `kv` and
 * the logits of the tokens marked in b->want_logits (all when NULL) to
 * logits (host, n_marked * n_vocab, in token order). Activation scratch
 * (and the host index arrays) is kept in fw between steps and grows to the
 * largest batch seen, so a steady-state decode step calls no allocator
 * (check_forward's alloc_free_decode counts). Returns MOE_OK,
 * MOE_EINVAL (bad ids, positions beyond a block table), MOE_ENOMEM or a
 * backend error. */
int moe_fwd_run(moe_fwd *fw, moe_kv_cache *kv, const moe_batch *b, float *logits);

/* Debugging/test hook: when set, the residual stream after each layer
 * (n_tok, n_embd, host) is copied to hidden + il * n_tok * n_embd. */
void moe_fwd_set_hidden_out(moe_fwd *fw, float *hidden);

/* Test hook: when set, each MoE layer il writes the experts chosen for
 * each token, ordered by decreasing choice score, to
 * ids + (il * n_tok + t) * n_used (dense layers leave theirs untouched). */
void moe_fwd_set_route_out(moe_fwd *fw, int32_t *ids);
int64_t moe_fwd_n_expert_used(const moe_fwd *fw); /* 0 for dense models */

/* Weight and cache traffic of the last moe_fwd_run, for benchmarks:
 * what a step has to read from memory at least, counting every byte once
 * per step however many tokens use it. */
typedef struct moe_fwd_traffic {
    int64_t dense_bytes;  /* weights every token passes through: attention, dense FFNs, shared
                           * experts, routers, norms, the output head when logits were asked
                           * for, and the embedding rows looked up */
    int64_t expert_bytes; /* routed experts: the distinct (layer, expert) pairs the step
                           * selected times each one's gate+up+down bytes */
    int64_t expert_reads; /* those distinct (layer, expert) pairs */
    int64_t kv_bytes;     /* cache slots attention read: per token, its context times the
                           * slot width, every layer */
} moe_fwd_traffic;

/* Turns the traffic count on or off (off by default: on a device backend
 * counting the distinct experts costs a copy of the routing per MoE layer).
 * Cheap on the CPU backend. */
void moe_fwd_set_count_traffic(moe_fwd *fw, bool on);

/* Calls cb(arg) on the calling thread after each layer of every
 * moe_fwd_run, so a long step can show it is moving: the engine ticks its
 * heartbeat there, and a many-second prefill on a CPU is not taken for a
 * stuck engine (/health, the systemd watchdog). On a device backend the
 * layer has been queued, not necessarily run. cb NULL: none. */
void moe_fwd_set_layer_cb(moe_fwd *fw, void (*cb)(void *arg), void *arg);

/* The counts of the last moe_fwd_run that ran with counting on (zeros
 * before). Returns MOE_OK or MOE_EINVAL (NULL argument). */
int moe_fwd_last_traffic(const moe_fwd *fw, moe_fwd_traffic *out);

/* Bytes of all weights a step may read (dense plus every expert; the
 * embedding table excluded), for reports. */
int64_t moe_fwd_weight_bytes(const moe_fwd *fw);

#ifdef __cplusplus
}
#endif
#endif
