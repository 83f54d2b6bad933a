/* sampler.h - next-token choice from a logits row (OpenAI semantics).
 *
 * The pipeline, in order (moe_sampling in engine.h documents the fields):
 *   logit_bias -> repetition penalty (prompt + generated tokens) ->
 *   presence / frequency penalties (generated tokens) -> temperature
 *   (0: argmax, ties to the lowest id) -> top_k -> top_p -> min_p ->
 *   a draw from the caller's RNG.
 * Repetition penalty as llama.cpp / vLLM / HF: a positive logit is divided
 * by it, a negative one multiplied. Presence subtracts the penalty once
 * for every token generated at least once, frequency once per occurrence.
 * top_k keeps the k best (ties at the boundary to the lower ids); top_p
 * keeps the smallest best-first prefix whose probability reaches top_p;
 * min_p keeps tokens whose probability is at least min_p times the best
 * one's. Each step renormalises over what is left.
 *
 * Cost per token is O(n_vocab) passes plus a partial selection of the
 * candidates that top_k / top_p actually keep; the full vocabulary is
 * never sorted (top_p grows a sorted best-first prefix by doubling).
 *
 * Logprobs are log_softmax of the RAW logits (before bias, penalties and
 * temperature), as the OpenAI API reports them.
 *
 * Threads: a moe_sampler is scratch for one thread at a time; an RNG
 * belongs to one sequence.
 */
#ifndef MOE_SAMPLER_H
#define MOE_SAMPLER_H

#include <stdint.h>

#include "engine.h"
#include "rng.h" /* moe_rng: the caller's generator */

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_sampler moe_sampler;

/* Scratch for a vocabulary of n_vocab (> 0) tokens. NULL on ENOMEM or a
 * bad size. Free with moe_sampler_free(). */
moe_sampler *moe_sampler_new(int64_t n_vocab);
void moe_sampler_free(moe_sampler *sm); /* NULL is a no-op */

/* Picks the next token from logits (n_vocab floats, not modified) under p,
 * given the sequence so far (prompt[0..n_prompt), gen[0..n_gen) generated;
 * ids outside the vocabulary are ignored). Writes it to *out. Returns
 * MOE_OK or MOE_EINVAL (NULL arguments, a bias id out of range). With
 * temperature 0 the RNG is not used. Non-finite logits: NaN counts as
 * -inf; if every logit is -inf the lowest id is returned. */
int moe_sampler_sample(moe_sampler *sm, const moe_sampling *p, moe_rng *rng, const float *logits,
                       const int32_t *prompt, int64_t n_prompt, const int32_t *gen, int64_t n_gen, int32_t *out);

/* log_softmax(logits)[id] in *logprob, and when n_top > 0 the n_top
 * (<= n_vocab) most likely tokens, best first (ties to the lower id), in
 * top[0..n_top). Returns MOE_OK or MOE_EINVAL. */
int moe_sampler_logprobs(moe_sampler *sm, const float *logits, int32_t id, int32_t n_top, float *logprob,
                         moe_logprob *top);

#ifdef __cplusplus
}
#endif
#endif
