/* chat_template.h - OpenAI chat messages -> the model's prompt text.
 *
 * The GGUF's tokenizer.chat_template (Jinja) is never executed: it is only
 * recognised by distinctive markers, and the family's format is rendered
 * by C code that reproduces what transformers' apply_chat_template prints
 * for the real templates (tests/check_chat_template.c holds the proof):
 *   DEEPSEEK2  "User: ...\n\nAssistant: ...<eos>"  (DeepSeek-V2 / V2-Lite)
 *   DEEPSEEK3  "<｜User｜>...<｜Assistant｜>..."    (DeepSeek-V3 / R1; R1's
 *              "<think>\n" generation prompt is recognised too)
 *   CHATML     "<|im_start|>role\n...<|im_end|>\n"  (Qwen, and the fallback)
 *   MISTRAL    "[INST] ... [/INST]...</s>"         (Mistral / Mixtral v0.1)
 *   MISTRAL_V3 "[INST]...[/INST]...</s>"           (Mixtral-8x22B, Mistral-7B v0.3:
 *              chosen over MISTRAL when the vocabulary has [INST] as a
 *              control token; ids as Mistral's mistral-common encodes them)
 *   LLAMA3     "<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>"
 * An unrecognised or missing template falls back to CHATML with a warning
 * through moe_log (log_hook.h). The output is meant to be tokenized with moe_tok_encode_segs
 * and the segments moe_chat_render_segs reports: control-token text the
 * template writes (<|im_start|>, BOS/EOS, <｜User｜>, [INST] where it is a
 * control token) becomes control tokens, the same text inside a message's
 * content or role stays plain text, so a user cannot forge turns (what
 * OpenAI does; transformers, vLLM and llama.cpp tokenize the whole string
 * with special parsing). Tokenizing the whole output with parse_special
 * restores that. Plain-text formats stay forgeable by design: "User: "
 * (DEEPSEEK2) and "[INST]" (MISTRAL v1, where it is no token) are text.
 *
 * Deviations where the real template would raise or drop things:
 * MISTRAL folds system messages into the first user turn ("sys\n\nuser"),
 * MISTRAL_V3 into the last one (both as mistral-common does);
 * roles a family has no syntax for (tool in DEEPSEEK2/MISTRAL) are skipped,
 * as the templates do. Assistant tool_calls are not modelled yet.
 *
 * Threads: a moe_chat_template is immutable after init; render is
 * reentrant. No dependency on cJSON: the server fills moe_chat_msg.
 */
#ifndef MOE_CHAT_TEMPLATE_H
#define MOE_CHAT_TEMPLATE_H

#include <stdbool.h>
#include <stddef.h>

#include "gguf.h"
#include "status.h"
#include "tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moe_chat_family {
    MOE_CHAT_AUTO = 0, /* recognise from the template text */
    MOE_CHAT_CHATML,
    MOE_CHAT_DEEPSEEK2,
    MOE_CHAT_DEEPSEEK3,
    MOE_CHAT_MISTRAL,
    MOE_CHAT_LLAMA3,
    MOE_CHAT_MISTRAL_V3, /* Mistral's v2/v3 tokenizers: [INST] is a control token */
} moe_chat_family;

/* One {"type":"text","text":...} part of an array content. */
typedef struct moe_chat_part {
    const char *text;
    size_t len;
} moe_chat_part;

/* A message. role: "system", "user", "assistant" or "tool" (others are
 * rendered as ChatML does, by name, and skipped by the other families).
 * Content is `content[0..content_len)` when parts is NULL, else the text
 * parts joined with "\n" (what vLLM does). Nothing is copied. */
typedef struct moe_chat_msg {
    const char *role;
    const char *content;
    size_t content_len;
    const moe_chat_part *parts;
    size_t n_parts;
} moe_chat_msg;

typedef struct moe_chat_template {
    moe_chat_family family;
    char bos[64]; /* BOS/EOS token text; "" when the model has none */
    char eos[64];
    char *default_system; /* ChatML system prompt used when none is given (Qwen2), or NULL */
    bool think_open;      /* DEEPSEEK3: the generation prompt opens "<think>\n" (DeepSeek-R1) */
} moe_chat_template;

/* Picks the family: `force` unless MOE_CHAT_AUTO, else recognised from
 * tmpl[0..tmpl_len) (tmpl may be NULL). bos/eos (may be NULL) are the token
 * texts the template prints. Returns 0, or MOE_ENOMEM. Free with
 * moe_chat_template_free(). Warns (moe_log) when falling back to ChatML. */
int moe_chat_template_init(moe_chat_template *ct, const char *tmpl, size_t tmpl_len, moe_chat_family force,
                           const char *bos, const char *eos);
void moe_chat_template_free(moe_chat_template *ct);

/* moe_chat_template_init() for a loaded model: the template text is g's
 * tokenizer.chat_template (absent -> ChatML with a warning, unless forced),
 * BOS/EOS texts are t's; MISTRAL (recognised or forced) becomes MISTRAL_V3
 * when t has [INST] as a control token. The rendered prompt already holds BOS where the
 * template writes it: tokenize it with add_bos=false. */
int moe_chat_template_from_model(moe_chat_template *ct, const moe_gguf *g, const moe_tok *t,
                                 moe_chat_family force);

/* Recognition only: MOE_CHAT_AUTO when nothing matches. */
moe_chat_family moe_chat_detect(const char *tmpl, size_t tmpl_len);

/* "chatml", "deepseek2", "deepseek3", "mistral", "llama3", "mistral-v3"
 * (and "auto"). */
const char *moe_chat_family_name(moe_chat_family f);
/* Inverse of moe_chat_family_name (also accepts "qwen", "deepseek-v2",
 * "deepseek-v3", "mixtral", "llama-3"); -1 when unknown. */
int moe_chat_family_parse(const char *name);

/* Renders msgs[0..n) into a malloc'd NUL-terminated string (*out, *out_len;
 * caller frees). add_generation_prompt appends the assistant turn opener as
 * transformers does. MOE_EINVAL for a NULL role or content, MOE_ENOMEM. */
int moe_chat_render(const moe_chat_template *ct, const moe_chat_msg *msgs, size_t n, bool add_generation_prompt,
                    char **out, size_t *out_len);

/* moe_chat_render, plus the output's segments for moe_tok_encode_segs
 * (*segs malloc'd, never NULL on success, caller frees; they cover *out in
 * order): special = written by the template, plain = message content and
 * role names. segs and n_segs may be NULL. Same errors. */
int moe_chat_render_segs(const moe_chat_template *ct, const moe_chat_msg *msgs, size_t n, bool add_generation_prompt,
                         char **out, size_t *out_len, moe_tok_seg **segs, size_t *n_segs);

#ifdef __cplusplus
}
#endif
#endif
