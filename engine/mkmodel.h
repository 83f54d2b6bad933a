/* mkmodel.h - random-weight models of real architectures, for tests and
 * the out-of-the-box demo (`moed mkmodel`).
 *
 * The file written is what llama.cpp's converter would write for a model
 * of that shape: its architecture name, metadata keys and tensor names,
 * 1-D tensors (norms, biases, router bias) in F32 and every matrix in the
 * requested type, plus a working byte-level BPE tokenizer (GPT-2 byte
 * mapping, merges learned at build time from an embedded English/code
 * text, the family's special tokens as CONTROL, padded to n_vocab with
 * UNUSED tokens) and a chat template in the family's format, so
 * moe_model_load(), the tokenizer and the chat templates all take it.
 *
 * Weights are deterministic in the seed: each tensor's stream is seeded
 * from (seed, tensor name), so changing the layer count leaves the other
 * tensors as they were, and each row from (tensor, row), so the thread
 * count does not change a byte. Norm weights are 1; matrices are uniform
 * with the variance 1/fan_in, output projections further scaled by
 * 1/sqrt(2 n_layer) so the residual stream stays O(1) through the layers. Tensors are
 * streamed row chunk by row chunk: memory stays bounded for any size.
 *
 * Threads: any thread; no shared state. moe_mkmodel_write() generates
 * each chunk of rows on cfg->n_threads threads of its own.
 */
#ifndef MOE_MKMODEL_H
#define MOE_MKMODEL_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What to write. moe_mkmodel_preset() fills every field; callers then
 * override what they like. Only the hparams fields that the
 * architecture uses are written (e.g. kv_lora_rank only for deepseek2);
 * derived fields (is_moe, n_ff_shexp for deepseek2, n_embd_head_qk_nope,
 * has_*, tied_output) are recomputed by moe_mkmodel_write. */
typedef struct moe_mkmodel_cfg {
    char arch[16];     /* "deepseek2", "qwen2moe", "qwen3moe", "mixtral", "llama", "qwen2" */
    moe_hparams hp;    /* hp.n_vocab is the padded vocabulary size */
    int type;          /* moe_type of the matrices: F32, F16, BF16, Q8_0 or Q4_0 */
    uint64_t seed;
    int n_threads;     /* generator threads; 0 = one per online CPU. The bytes written do not depend on it */
} moe_mkmodel_cfg;

/* Fills *cfg with preset `preset` ("tiny": a few hundred KB for unit tests;
 * "demo": serves fast on two CPU cores; "v2-lite": the exact shape of
 * DeepSeek-V2-Lite, deepseek2 only) of architecture `arch`, type Q8_0,
 * seed 1. Returns MOE_OK or MOE_EINVAL (unknown arch or preset, or
 * v2-lite for another arch) with a reason in err. */
int moe_mkmodel_preset(const char *arch, const char *preset, moe_mkmodel_cfg *cfg, char *err, size_t errsz);

/* Writes the model described by cfg to `path`. Returns MOE_OK, MOE_EINVAL
 * (inconsistent shape: e.g. experts_used > experts, vocab too small for
 * the special tokens; the reason in err), MOE_ENOMEM or MOE_EIO. A matrix
 * whose row length is not a multiple of the type's block size is written
 * as F16 instead (what llama.cpp's quantizer falls back to). */
int moe_mkmodel_write(const moe_mkmodel_cfg *cfg, const char *path, char *err, size_t errsz);

/* The GGUF general.architecture for a mkmodel arch name ("mixtral" ->
 * "llama"), or NULL when unknown. */
const char *moe_mkmodel_gguf_arch(const char *arch);

#ifdef __cplusplus
}
#endif
#endif
