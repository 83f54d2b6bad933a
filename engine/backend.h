/* backend.h - the op table every forward pass is written against.
 *
 * A backend is a vtable plus a context (struct moe_backend). The forward
 * passes in engine/forward*.c call these coarse ops and never ask which
 * backend they run on; the CPU backend (engine/cpu/cpu_backend.c) is the
 * reference implementation, a CUDA backend implements the same table.
 *
 * Memory model:
 * - Activations, KV cache pages and scratch live in backend buffers
 *   (alloc/free; host-visible only through upload/download). All float
 *   buffers are f32.
 * - Weights are bound once: bind_weight() turns a pointer into the mapped
 *   GGUF into one the backend can read (the CPU backend returns the same
 *   pointer, so weights stay memory-mapped; a GPU backend copies).
 * - Small per-step index arrays (token ids, positions, sequence ids, block
 *   tables, the moe_route_params struct itself, rope frequencies) are
 *   passed as HOST memory in every call; a device backend copies them
 *   itself. They are small (ints per token).
 *
 * Threads: a backend belongs to one thread (the engine thread); its ops
 * may use worker threads internally. Every op returns MOE_OK or a negative
 * moe_status (MOE_EINVAL for bad arguments, MOE_ENOMEM, MOE_EUNSUPPORTED
 * for a weight type the backend cannot use, MOE_EBACKEND for a device
 * failure); on error the output buffers hold unspecified values.
 */
#ifndef MOE_BACKEND_H
#define MOE_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A (stack of) weight matrices on the backend: n_mat matrices of n_out
 * rows by n_in columns of `type` (GGUF order: row o of matrix m starts at
 * byte m * mat_stride + o * moe_row_size(type, n_in)). n_mat is the expert
 * count for *_exps tensors, the head count for MLA's per-head k_b / v_b,
 * and 1 for ordinary matrices. mat_stride 0 means n_out rows exactly.
 * 1-D tensors (norm weights, biases) are F32 with n_in elements, n_out 1. */
typedef struct moe_weight {
    int type;         /* moe_type */
    const void *data; /* backend pointer (from bind_weight) */
    int64_t n_in;
    int64_t n_out;
    int64_t n_mat;
    size_t mat_stride; /* bytes between matrices; 0 = packed */
} moe_weight;

/* Rope styles: NORM rotates adjacent pairs (2i, 2i+1) (llama after
 * convert's q/k permutation, DeepSeek), NEOX rotates (i, i + n_rot/2)
 * (Qwen). */
typedef enum moe_rope_style { MOE_ROPE_NORM = 0, MOE_ROPE_NEOX = 1 } moe_rope_style;

/* Rope on n_head heads of each token row. Pair i of a head at position p
 * is rotated by angle p * inv_freq[i]; cos and sin are multiplied by
 * attn_factor (YaRN magnitude; 1 for DeepSeek, whose scale goes into the
 * softmax scale instead). inv_freq is host memory, n_rot / 2 entries,
 * precomputed by the caller (plain theta or YaRN ramp). */
typedef struct moe_rope_params {
    int style;       /* moe_rope_style */
    int64_t n_rot;   /* rotated dims per head, even, starting at the head's first element */
    const float *inv_freq;
    float attn_factor;
} moe_rope_params;

/* The paged KV cache as the attention ops see it. Each layer's cache is
 * n_blocks * block_size slots of k_width (and v_width) floats. Token t of
 * the batch belongs to sequence seq[t] and sits at position pos[t]; the
 * cache slot of position p of sequence s is
 *   block_table[block_off[s] + p / block_size] * block_size + p % block_size.
 * All arrays here are host memory. */
typedef struct moe_kv_view {
    int64_t block_size;
    int64_t n_seq;
    const int32_t *block_table; /* flattened block tables of all sequences */
    const int64_t *block_off;   /* (n_seq + 1): sequence s uses block_table[block_off[s] .. block_off[s+1]) */
    const int32_t *seq;         /* (n_tok) */
    const int32_t *pos;         /* (n_tok) */
    int64_t n_tok;
} moe_kv_view;

/* Gating functions, numbered as GGUF's expert_gating_func. */
typedef enum moe_gating { MOE_GATING_SOFTMAX = 1, MOE_GATING_SIGMOID = 2 } moe_gating;

/* Routing of one MoE layer (router logits l = ffn_gate_inp . h):
 * s = softmax(l) or sigmoid(l); choice = s + bias (bias: a bound weight,
 * i.e. backend memory, or NULL); if n_group > 1 the experts are split
 * into n_group consecutive groups scored by their best choice (softmax)
 * or the sum of their two best (sigmoid), and only the n_group_used best
 * groups compete; top n_used experts by choice; weights = their s,
 * divided by their sum when `norm`, times `scale`.
 * Ties go to the lowest expert id. Non-finite logits still route inside
 * [0, n_expert): a NaN choice or group score ranks as -inf (so an all-NaN
 * row takes experts 0 .. n_used-1); NaN weights are passed on, so the
 * step's logits turn NaN and the engine fails that sequence. */
typedef struct moe_route_params {
    int gating; /* moe_gating */
    int64_t n_expert;
    int64_t n_used;
    int64_t n_group;      /* <= 1: no group limit */
    int64_t n_group_used;
    bool norm;
    float scale;
    const float *bias; /* (n_expert) backend pointer or NULL */
} moe_route_params;

/* Every function member of moe_backend_ops, in order: moe_backend_check
 * and the op-timing wrapper (opstats.c) walk this list, so a new op is
 * added here and in the struct. */
#define MOE_BACKEND_OPS(X)                                                                                           \
    X(destroy) X(supports_type) X(alloc) X(free) X(upload) X(download) X(bind_weight) X(unbind_weight) X(embed)      \
    X(get_rows) X(rms_norm) X(matmul) X(add) X(mul) X(swiglu) X(sigmoid_scale) X(rope) X(kv_store) X(attention)       \
    X(mla_attention) X(moe)

/* Every member must be set (moe_backend_check names the first that is
 * not); backends fill the table with designated initializers. */
struct moe_backend_ops {
    const char *name;
    void (*destroy)(void *ctx);
    /* Capability: nonzero when matmul, embed and moe compute with weights
     * of `type` (moe_type). 1-D weights (norms, biases) are always F32. */
    int (*supports_type)(void *ctx, int type);

    /* --- memory --- */
    /* Zero-filled buffer of nbytes, or NULL. */
    void *(*alloc)(void *ctx, size_t nbytes);
    void (*free)(void *ctx, void *buf);
    int (*upload)(void *ctx, void *dst, const void *src_host, size_t nbytes);
    int (*download)(void *ctx, void *dst_host, const void *src, size_t nbytes);
    /* *out = a backend pointer to the nbytes at host (mapped file), valid
     * until unbind_weight(*out). */
    int (*bind_weight)(void *ctx, const void *host, size_t nbytes, const void **out);
    void (*unbind_weight)(void *ctx, const void *bound);

    /* --- ops (every float pointer is backend memory) --- */
    /* out[t] = row ids[t] of w (any type, n_mat 1), dequantized: (n, w->n_in). */
    int (*embed)(void *ctx, const moe_weight *w, const int32_t *ids, int64_t n, float *out);
    /* Copies rows rows[i] of x (row stride x_stride) to out (n, n_col). */
    int (*get_rows)(void *ctx, const float *x, int64_t x_stride, int64_t n_col, const int32_t *rows,
                    int64_t n, float *out);
    /* y[r][i] = w[i] * x[r][i] / sqrt(mean_i(x[r]^2) + eps) for r < n_rows, i < n;
     * rows are x_stride / y_stride floats apart (norm a slice of a wider
     * row, or each head of a row). w: n floats. x may equal y. */
    int (*rms_norm)(void *ctx, const float *x, int64_t x_stride, float *y, int64_t y_stride, int64_t n_rows,
                    int64_t n, const float *w, float eps);
    /* y (n_tok, w->n_out) = x (n_tok, w->n_in) . W^T (+ bias (n_out) when not NULL). */
    int (*matmul)(void *ctx, const moe_weight *w, const float *x, int64_t n_tok, const float *bias, float *y);
    /* y[i] += x[i]. */
    int (*add)(void *ctx, float *y, const float *x, int64_t n);
    /* y[i] *= x[i]. */
    int (*mul)(void *ctx, float *y, const float *x, int64_t n);
    /* out[r][i] = silu(gate[r][i]) * up[r][i]; out may alias gate. */
    int (*swiglu)(void *ctx, const float *gate, const float *up, float *out, int64_t n);
    /* y[r][:] *= sigmoid(g[r]) for r < n_rows, rows of n (Qwen2-MoE's shared-expert gate). */
    int (*sigmoid_scale)(void *ctx, float *y, const float *g, int64_t n_rows, int64_t n);
    /* In-place rope of x: token t, head h starts at x + t*tok_stride + h*head_stride. */
    int (*rope)(void *ctx, float *x, int64_t n_tok, int64_t tok_stride, int64_t n_head, int64_t head_stride,
                const int32_t *pos, const moe_rope_params *p);

    /* --- attention over the paged cache --- */
    /* Writes row t of k / v (k_width / v_width floats; v may be NULL when
     * v_width is 0) into the cache slot of (seq[t], pos[t]). */
    int (*kv_store)(void *ctx, const moe_kv_view *kv, float *k_cache, float *v_cache, int64_t k_width,
                    int64_t v_width, const float *k, const float *v);
    /* GQA causal attention. q (n_tok, n_head, head_dim); the cache holds
     * n_kv_head * head_dim floats per slot for K and V; query head h uses
     * kv head h / (n_head / n_kv_head). Token t attends to positions
     * 0 .. pos[t] of its sequence (stored beforehand with kv_store).
     * out (n_tok, n_head, head_dim). */
    int (*attention)(void *ctx, const moe_kv_view *kv, const float *q, const float *k_cache,
                     const float *v_cache, int64_t n_head, int64_t n_kv_head, int64_t head_dim, float scale,
                     float *out);
    /* DeepSeek MLA over the compressed cache: each slot holds the normed
     * latent c (kv_lora) followed by the roped k_pe (n_rot). q (n_tok,
     * n_head, nope + n_rot) (q_pe already roped); k_b: n_head matrices
     * (kv_lora rows of nope) so that k_nope[h] = c . k_b[h]; v_b: n_head
     * matrices (dv rows of kv_lora) so that v[h] = v_b[h] . c.
     * score = (q_nope . k_nope + q_pe . k_pe) * scale, causal.
     * out (n_tok, n_head, dv). */
    int (*mla_attention)(void *ctx, const moe_kv_view *kv, const float *q, const float *cache,
                         int64_t kv_lora, int64_t n_rot, int64_t nope, const moe_weight *k_b,
                         const moe_weight *v_b, float scale, float *out);

    /* --- mixture of experts --- */
    /* out (n_tok, n_embd) = sum over the routed experts e of token t of
     * w_e * down_e(silu(gate_e h) * up_e h), with routing from the router
     * logits (n_tok, n_expert) per `rp`. gate/up: n_expert matrices of
     * (n_ff rows of n_embd); down: (n_embd rows of n_ff). Each expert's
     * weights are read once for all its tokens. When ids_out/w_out are not
     * NULL (host, n_tok * n_used), the chosen experts and weights are
     * written there, ordered by decreasing choice score (tests). */
    int (*moe)(void *ctx, const float *h, int64_t n_tok, const float *router_logits, const moe_route_params *rp,
               const moe_weight *gate, const moe_weight *up, const moe_weight *down, float *out,
               int32_t *ids_out, float *w_out);
};

typedef struct moe_backend {
    const struct moe_backend_ops *ops;
    void *ctx;
} moe_backend;

/* Frees the backend's context (not the struct itself). NULL-safe. */
static inline void moe_backend_destroy(moe_backend *be) {
    if (be && be->ops && be->ops->destroy) be->ops->destroy(be->ctx);
    if (be) be->ctx = NULL;
}

/* Checks that every member of be's op table is set. Returns MOE_OK, or
 * MOE_EINVAL with "backend '<name>' has no '<op>' op" in err (errsz bytes,
 * may be NULL). Any thread. */
int moe_backend_check(const moe_backend *be, char *err, size_t errsz);

/* The one place a device name becomes a backend (serve, bench, generate).
 * device: "cpu", "cuda" or "auto"/NULL (CUDA when this build has it and a
 * GPU is usable, else the CPU). n_threads: the CPU backend's worker threads
 * (<= 0: one per online CPU). Fills *be (checked with moe_backend_check)
 * and *name ("cpu" or "cuda", static; name may be NULL). Returns MOE_OK,
 * MOE_EUNSUPPORTED ("cuda" in a build without CUDA, or no GPU),
 * MOE_EINVAL (an unknown device name) or the backend's error, with a
 * reason in err. Caller frees with moe_backend_destroy(). */
int moe_backend_create(const char *device, int n_threads, moe_backend *be, const char **name, char *err,
                       size_t errsz);

/* --- the CPU backend (engine/cpu/cpu_backend.c) --- */

typedef struct moe_cpu_backend_opts {
    int n_threads; /* <= 0: one per online CPU */
} moe_cpu_backend_opts;

/* Fills *be with a CPU backend. opts may be NULL (defaults). Returns
 * MOE_OK, MOE_ENOMEM or MOE_EINVAL (threads could not start). Caller
 * frees with moe_backend_destroy(). */
int moe_cpu_backend_init(moe_backend *be, const moe_cpu_backend_opts *opts);

#ifdef __cplusplus
}
#endif
#endif
