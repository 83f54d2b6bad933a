/* convert.h - Hugging Face checkpoint directory -> GGUF (`moed convert`).
 *
 * Reads config.json, tokenizer.json (+ tokenizer_config.json for the chat
 * template and special tokens) and the safetensors weights (one
 * model.safetensors, or shards listed by model.safetensors.index.json) of
 * a supported architecture and writes the GGUF that llama.cpp's
 * convert_hf_to_gguf.py would: its architecture name, metadata keys and
 * tensor names, so engine/model.c loads it as it is.
 *
 *   HF model_type                      GGUF arch
 *   llama, mistral                     llama
 *   mixtral                            llama (stacked *_exps experts)
 *   qwen2                              qwen2
 *   qwen2_moe                          qwen2moe
 *   qwen3_moe                          qwen3moe
 *   deepseek_v2, deepseek_v3           deepseek2 (MLA: attn_k_b + attn_v_b)
 *
 * Weights may be F32, F16, BF16 or FP8 e4m3 with 128x128 block scales
 * (`<name>_scale_inv`, DeepSeek-V3): w = fp8 * scale_inv of its block.
 * 1-D tensors and routers are written F32, matrices in the requested
 * type (a Q8_0 matrix whose rows are not a multiple of 32 as F16).
 *
 * Streaming: one tensor (one expert matrix for stacked experts) is read
 * at a time, a bounded chunk of rows converted at a time. The output is
 * written to "<out>.tmp" and renamed onto `out` only when complete.
 *
 * Threads: any thread; no shared state.
 */
#ifndef MOE_CONVERT_H
#define MOE_CONVERT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_convert_opts {
    int type;      /* moe_type of the matrices: F32, F16, BF16 or Q8_0 */
    bool progress; /* a progress line on stderr, redrawn per tensor */
} moe_convert_opts;

/* Converts the checkpoint in directory `hf_dir` to `out`. Returns MOE_OK,
 * MOE_EIO (a file missing or unreadable, the output not writable),
 * MOE_EFORMAT (a malformed config, tokenizer, index or safetensors file;
 * a tensor missing or of the wrong shape), MOE_EUNSUPPORTED (an
 * architecture, dtype, tokenizer model or rope scaling moed cannot run),
 * MOE_EINVAL (bad options) or MOE_ENOMEM, with a message naming the file,
 * field or tensor in err. On failure nothing is left at `out` (an
 * existing file there is untouched) nor at the temporary name. */
int moe_convert(const char *hf_dir, const char *out, const moe_convert_opts *opts, char *err, size_t errsz);

/* The tokenizer.ggml.pre that llama.cpp names for a tokenizer.json
 * pre_tokenizer (a JSON object as text, NUL-terminated), or NULL when it
 * is not one moed knows. Exposed for tests. */
const char *moe_convert_pre_name(const char *pre_tokenizer_json);

#ifdef __cplusplus
}
#endif
#endif
