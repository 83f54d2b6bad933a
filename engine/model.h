/* model.h - a GGUF model's hyper-parameters and weight views.
 *
 * moe_model_load() opens a llama.cpp-style GGUF file, reads the
 * hyper-parameters of its architecture from exactly the metadata keys
 * llama.cpp uses ("<arch>.block_count", ...), binds every tensor by its
 * llama.cpp name and checks each one's shape and type against the
 * hyper-parameters. The split follows llama2.c: moe_hparams (config),
 * moe_layer_weights / moe_model_weights (views into the mapped file), and
 * no run state at all (activations and the KV cache belong to the forward
 * pass and the engine).
 *
 * Supported architectures (general.architecture):
 *   llama     dense Llama; Mixtral when blk.N.ffn_*_exps exist (expert_count > 0)
 *   qwen2     dense Qwen2 (q/k/v biases)
 *   qwen2moe  Qwen1.5/2-MoE (q/k/v biases, shared expert with a sigmoid gate)
 *   qwen3moe  Qwen3-MoE (per-head q/k RMSNorm, no shared expert)
 *   deepseek2 DeepSeek-V2 / V2-Lite / V3 / R1 (MLA, shared + routed experts)
 *
 * Defaults applied when an optional key is absent (all llama.cpp's):
 *   attention.head_count_kv       = head_count
 *   attention.key_length          = embedding_length / head_count
 *   attention.value_length        = key_length
 *   rope.dimension_count          = key_length (deepseek2: required in practice, see n_rot)
 *   rope.freq_base                = 10000
 *   rope.scaling.type             = none (linear when only a factor is given, as llama.cpp)
 *   rope.scaling.factor           = 1 (0 in the file also means 1 when no
 *                                   scaling type, or "none", is named)
 *   rope.scaling.original_context_length = context_length
 *   rope.scaling.yarn_log_multiplier     = 0
 *   rope.scaling.yarn_beta_fast / yarn_beta_slow = 32 / 1
 *   vocab_size                    = rows of token_embd (the key is only checked when present)
 *   feed_forward_length           = 0 (then dense layers are refused)
 *   expert_count / expert_used_count     = 0 (dense model)
 *   expert_feed_forward_length    = feed_forward_length for llama (Mixtral),
 *                                   feed_forward_length / expert_used_count for qwen2moe/qwen3moe
 *   expert_shared_feed_forward_length (qwen2moe) = feed_forward_length
 *   expert_shared_count           = 0 (deepseek2: shared FFN width = n_ff_exp * count)
 *   leading_dense_block_count     = 0
 *   expert_weights_scale          = 1
 *   expert_weights_norm           = true for Mixtral and qwen3moe (their
 *                                   routers renormalise), false for qwen2moe;
 *                                   the key's value for deepseek2 (default false)
 *   expert_gating_func            = 1 (softmax); 2 is sigmoid (DeepSeek-V3)
 *   expert_group_count / expert_group_used_count = 1 / 1 (no group limit)
 *   attention.q_lora_rank         = 0 (no q LoRA: blk.N.attn_q, as V2-Lite)
 * Values that would divide by zero or make NaN are refused (MOE_EFORMAT
 * naming the key): every float key above must be finite (as a float
 * too); freq_base, yarn_beta_fast/slow > 0; freq_base != 1 with YaRN; a
 * scaling factor in [1, 1e6) (0 with a scaling type named is an error);
 * rms epsilon in
 * (0, 1) and nonzero as a float; integer dimensions >= 1 (rope dims even,
 * <= key_length); expert_used_count <= expert_count and within the kept
 * groups (expert_group_used_count * expert_count / expert_group_count).
 * Required keys (as in llama.cpp): block_count, embedding_length,
 * attention.head_count, attention.layer_norm_rms_epsilon, context_length;
 * for deepseek2 also attention.kv_lora_rank; expert_used_count when
 * expert_count > 0.
 *
 * DeepSeek head sizes: files converted before llama.cpp's MLA rework
 * carry attention.key_length = qk_nope + qk_rope and blk.N.attn_kv_b;
 * newer ones carry attention.key_length_mla / value_length_mla (the real
 * per-head sizes; key_length is then kv_lora + rope) and the split
 * blk.N.attn_k_b + attn_v_b. Both are accepted; n_embd_head_k/_v always
 * hold the real per-head sizes.
 *
 * Threads: a loaded model is immutable and may be shared by threads.
 */
#ifndef MOE_MODEL_H
#define MOE_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moe_arch {
    MOE_ARCH_LLAMA = 0, /* and Mixtral */
    MOE_ARCH_QWEN2,
    MOE_ARCH_QWEN2MOE,
    MOE_ARCH_QWEN3MOE,
    MOE_ARCH_DEEPSEEK2,
    MOE_ARCH_COUNT
} moe_arch;

/* The rope scaling named by <arch>.rope.scaling.type. */
typedef enum moe_rope_scaling {
    MOE_ROPE_SCALING_NONE = 0,
    MOE_ROPE_SCALING_LINEAR,
    MOE_ROPE_SCALING_YARN,
} moe_rope_scaling;

/* Expert gating, numbered as GGUF's expert_gating_func. */
#define MOE_HP_GATING_SOFTMAX 1
#define MOE_HP_GATING_SIGMOID 2

typedef struct moe_hparams {
    moe_arch arch;
    int64_t n_vocab;       /* rows of token_embd */
    int64_t n_ctx_train;   /* context_length */
    int64_t n_embd;        /* embedding_length */
    int64_t n_layer;       /* block_count */
    int64_t n_head;        /* attention.head_count */
    int64_t n_head_kv;     /* attention.head_count_kv (deepseek2: as written; MLA ignores it) */
    int64_t n_embd_head_k; /* per-head q/k width (deepseek2: qk_nope + qk_rope) */
    int64_t n_embd_head_v; /* per-head v width */
    int64_t n_rot;         /* rope.dimension_count: rotated dims per head (deepseek2: qk_rope) */
    int64_t n_ff;          /* feed_forward_length: width of dense FFN layers */
    float rms_eps;         /* attention.layer_norm_rms_epsilon */
    double rope_freq_base;
    moe_rope_scaling rope_scaling;
    double rope_scaling_factor;   /* 1 = none */
    int64_t rope_orig_ctx;        /* rope.scaling.original_context_length */
    double rope_yarn_log_mul;     /* rope.scaling.yarn_log_multiplier (DeepSeek: 0.1 * mscale_all_dim) */
    double rope_yarn_beta_fast;   /* rope.scaling.yarn_beta_fast (YaRN only, else 32) */
    double rope_yarn_beta_slow;   /* rope.scaling.yarn_beta_slow (YaRN only, else 1) */
    bool rope_neox;               /* rotate (i, i + n_rot/2) (qwen*) rather than adjacent pairs (llama, deepseek2) */
    /* Derived from the above, so the forward pass applies no policy of its own: */
    float rope_attn_factor;       /* YaRN magnitude on cos/sin (1 unless YaRN and not deepseek2) */
    float attn_scale;             /* softmax scale: 1/sqrt(n_embd_head_k), times DeepSeek's YaRN mscale^2 */

    /* MoE (all 0 / false for dense models) */
    bool is_moe;                  /* expert_count > 0 */
    int64_t n_expert;             /* expert_count */
    int64_t n_expert_used;        /* expert_used_count: top-k */
    int64_t n_expert_shared;      /* expert_shared_count (deepseek2) */
    int64_t n_ff_exp;             /* routed expert FFN width */
    int64_t n_ff_shexp;           /* shared expert FFN width (deepseek2: n_ff_exp * n_expert_shared), 0 = none */
    int64_t n_layer_dense_lead;   /* leading_dense_block_count: layers [0, this) use a dense FFN */
    double expert_weights_scale;  /* routed weights multiplied by this */
    bool expert_weights_norm;     /* renormalise the top-k weights to sum 1 */
    int expert_gating_func;       /* MOE_HP_GATING_SOFTMAX or _SIGMOID */
    int64_t n_expert_group;       /* expert_group_count (1: no group limit) */
    int64_t n_group_used;         /* expert_group_used_count */

    /* MLA (deepseek2 only) */
    bool is_mla;                  /* attention over a compressed latent cache */
    bool has_q_lora;              /* q goes through attn_q_a / attn_q_a_norm / attn_q_b */
    int64_t q_lora_rank;          /* 0 without q LoRA */
    int64_t kv_lora_rank;
    int64_t n_embd_head_qk_nope;  /* n_embd_head_k - n_rot */
    bool mla_split_kv_b;          /* the file has attn_k_b + attn_v_b instead of attn_kv_b */

    bool has_qkv_bias;            /* qwen2, qwen2moe */
    bool has_qk_norm;             /* qwen3moe */
    bool tied_output;             /* no output.weight: the output head is token_embd */
} moe_hparams;

/* A view of one tensor of the mapped file. Absent optional tensors are
 * all-zero (data == NULL, name == NULL). */
typedef struct moe_tensor_view {
    const char *name;  /* owned by the gguf reader */
    int type;          /* moe_type */
    uint32_t n_dims;
    int64_t ne[4];     /* ne[0] contiguous (the input dim of a matrix); unused dims 1 */
    const void *data;  /* into the mapping */
    uint64_t nbytes;
} moe_tensor_view;

/* Shapes below are GGUF ne[] order (ne[0] first). H = n_head,
 * Hkv = n_head_kv, dk/dv = n_embd_head_k/_v, E = n_expert. */
typedef struct moe_layer_weights {
    bool is_moe; /* this layer has routed experts (else the dense FFN) */
    moe_tensor_view attn_norm;   /* {n_embd} */
    /* GQA (llama, qwen*) and deepseek2 without q LoRA */
    moe_tensor_view wq;          /* {n_embd, H*dk} */
    moe_tensor_view wk;          /* {n_embd, Hkv*dk} */
    moe_tensor_view wv;          /* {n_embd, Hkv*dv} */
    moe_tensor_view bq, bk, bv;  /* {H*dk} {Hkv*dk} {Hkv*dv}: qwen2, qwen2moe */
    moe_tensor_view q_norm;      /* {dk}: qwen3moe */
    moe_tensor_view k_norm;      /* {dk}: qwen3moe */
    /* MLA (deepseek2) */
    moe_tensor_view q_a;         /* {n_embd, q_lora} */
    moe_tensor_view q_a_norm;    /* {q_lora} */
    moe_tensor_view q_b;         /* {q_lora, H*dk} */
    moe_tensor_view kv_a_mqa;    /* {n_embd, kv_lora + n_rot} */
    moe_tensor_view kv_a_norm;   /* {kv_lora} */
    moe_tensor_view kv_b;        /* {kv_lora, H*(nope + dv)}, or absent when split: */
    moe_tensor_view k_b;         /* {nope, kv_lora, H} */
    moe_tensor_view v_b;         /* {kv_lora, dv, H} */
    moe_tensor_view wo;          /* {H*dv, n_embd} */
    moe_tensor_view ffn_norm;    /* {n_embd} */
    /* dense FFN */
    moe_tensor_view ffn_gate;    /* {n_embd, n_ff} */
    moe_tensor_view ffn_up;      /* {n_embd, n_ff} */
    moe_tensor_view ffn_down;    /* {n_ff, n_embd} */
    /* routed experts */
    moe_tensor_view gate_inp;    /* {n_embd, E} router */
    moe_tensor_view gate_exps;   /* {n_embd, n_ff_exp, E} */
    moe_tensor_view up_exps;     /* {n_embd, n_ff_exp, E} */
    moe_tensor_view down_exps;   /* {n_ff_exp, n_embd, E} */
    moe_tensor_view exp_probs_b; /* {E}: DeepSeek-V3 selection bias, optional */
    /* shared expert(s) */
    moe_tensor_view gate_shexp;     /* {n_embd, n_ff_shexp} */
    moe_tensor_view up_shexp;       /* {n_embd, n_ff_shexp} */
    moe_tensor_view down_shexp;     /* {n_ff_shexp, n_embd} */
    moe_tensor_view gate_inp_shexp; /* {n_embd}: qwen2moe's sigmoid gate on the shared expert */
} moe_layer_weights;

typedef struct moe_model_weights {
    moe_tensor_view tok_embd;    /* {n_embd, n_vocab} */
    moe_tensor_view output_norm; /* {n_embd} */
    moe_tensor_view output;      /* {n_embd, n_vocab}; a copy of tok_embd's view when tied */
    moe_tensor_view rope_freqs;  /* {n_rot/2}: Llama-3.1 frequency divisors, optional */
    moe_layer_weights *layers;   /* (n_layer) */
} moe_model_weights;

typedef struct moe_model moe_model;

/* Opens `path` (memory-mapped via moe_gguf_open) and loads it as above.
 * Returns the model, which owns the reader, or NULL with *status set and
 * a message in err (errsz bytes, may be NULL) naming the key or tensor:
 *   MOE_EUNSUPPORTED unknown architecture, a weight type moed cannot
 *                    compute with, a non-F32 norm/bias
 *   MOE_EFORMAT      a missing required key or tensor, bad values
 *   MOE_ESHAPE       a tensor whose shape disagrees with the hyper-parameters
 *                    ("blk.3.ffn_up_exps.weight: shape [64, 32, 8], expected [64, 16, 8]")
 *   and whatever moe_gguf_open returns (MOE_EIO, MOE_EFORMAT, MOE_ENOMEM).
 * Tensors the architecture does not use are accepted with one warning line
 * through moe_log (log_hook.h). Caller frees with moe_model_free(). Any thread. */
moe_model *moe_model_load(const char *path, int *status, char *err, size_t errsz);

/* Same over an already open reader; takes ownership of `g` (closed on
 * failure too). */
moe_model *moe_model_from_gguf(moe_gguf *g, int *status, char *err, size_t errsz);

/* Frees the model and closes its reader; NULL is a no-op. */
void moe_model_free(moe_model *m);

const moe_hparams *moe_model_hparams(const moe_model *m);
const moe_model_weights *moe_model_weights_get(const moe_model *m);
/* The reader (for the tokenizer, chat template and `moed info`); lives as
 * long as the model. */
const moe_gguf *moe_model_gguf(const moe_model *m);
/* general.architecture as written, e.g. "llama" for Mixtral. */
const char *moe_model_arch_str(const moe_model *m);

/* Parameter counts (elements, not bytes).
 * total:  every tensor the model binds, each once (a tied output head is
 *         not counted twice).
 * active: the parameters one token's forward pass multiplies with: all of
 *         them except that routed expert stacks count n_expert_used of
 *         their n_expert matrices, and token_embd is left out (a lookup
 *         of one row, not a product) while the output head is counted
 *         (for a tied model that is token_embd's matrix). This matches how
 *         DeepSeek reports "activated" sizes (V2-Lite: 15.7 B / 2.4 B). */
int64_t moe_model_n_params(const moe_model *m);
int64_t moe_model_n_params_active(const moe_model *m);
/* Bytes of all bound tensors' data (each once). */
uint64_t moe_model_n_bytes(const moe_model *m);

/* The rope frequencies the forward pass uses, n_rot / 2 floats into
 * inv_freq: base^(-2i/n_rot), divided by the scaling factor (linear) or
 * blended by YaRN's ramp, then divided by rope_freqs.weight when the file
 * has one (Llama 3.1). The one place rope scaling is interpreted. Returns
 * MOE_OK or MOE_EINVAL (NULL argument). Any thread. */
int moe_model_rope_inv_freq(const moe_model *m, float *inv_freq);

/* Rope frequencies: inv_freq[i] = base^(-2i/n_rot) for i < n_rot/2, with
 * YaRN's ramp when factor > 1 (transformers / llama.cpp semantics:
 * ramp_i = clamp((i - low) / (high - low), 0, 1) from beta_fast/slow and
 * the original context, blending extrapolation and interpolation by 1/factor).
 * Exposed for tests. */
void moe_rope_yarn_inv_freq(int64_t n_rot, double base, double factor, double orig_ctx, double beta_fast,
                            double beta_slow, float *inv_freq);

/* "deepseek2", "qwen2moe", ...; "unknown" for ids out of range. */
const char *moe_arch_name(moe_arch a);
/* Parses a general.architecture value. Returns MOE_OK or MOE_EUNSUPPORTED. */
int moe_arch_from_name(const char *name, moe_arch *out);

#ifdef __cplusplus
}
#endif
#endif
