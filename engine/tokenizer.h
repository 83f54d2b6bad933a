/* tokenizer.h - text <-> token ids, from a GGUF's tokenizer.ggml.* metadata.
 *
 * Two vocabulary kinds, as llama.cpp names them in tokenizer.ggml.model:
 *   "gpt2"  byte-level BPE with merge ranks and a pre-tokenizer chosen by
 *           tokenizer.ggml.pre (deepseek-llm, deepseek-v3, qwen2, llama-bpe,
 *           default/gpt2). The pre-tokenizer regexes are Hugging Face's,
 *           applied in HF's order and run with PCRE2 (UTF + UCP, JIT).
 *   "llama" SentencePiece-style (Mistral/Mixtral): score-ordered merges,
 *           U+2581 for spaces, <0xXX> byte fallback, and a dummy prefix
 *           space before the text and after every added token matched in
 *           it (each stretch of text is encoded apart, as sentencepiece is
 *           called per message by Mistral's own code; llama.cpp agrees).
 *           Decoding drops the one dummy space at the start.
 *
 * Input text that is not valid UTF-8 is read as if every maximal invalid
 * subpart were U+FFFD (what Python's bytes.decode('utf-8','replace') does),
 * so encode never fails on bad bytes. Added tokens: CONTROL tokens (type 3:
 * BOS/EOS, <|im_start|>, <｜User｜>...) are matched in the text only when
 * parse_special is set or inside template text (moe_tok_encode_segs),
 * never in message content; USER_DEFINED tokens (type 4, e.g.
 * DeepSeek-V3's <think>) are matched as Hugging Face does for non-special
 * added tokens, except turn-marker-looking ones in message content.
 * Unicode normalization (Qwen2's NFC) is not applied, as in llama.cpp.
 *
 * Ownership and threads: moe_tok_load() copies everything it needs, so the
 * moe_gguf may be closed afterwards. A loaded tokenizer is immutable and
 * may be used by any number of threads at once. A moe_tok_stream belongs
 * to one thread at a time and must not outlive its tokenizer.
 */
#ifndef MOE_TOKENIZER_H
#define MOE_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "status.h"
#include "utf8.h" /* moe_utf8_next, shared with the chat code */

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_tok moe_tok;

typedef enum moe_tok_kind {
    MOE_TOK_BPE = 1, /* tokenizer.ggml.model = "gpt2" */
    MOE_TOK_SPM = 2, /* tokenizer.ggml.model = "llama" */
} moe_tok_kind;

/* GGUF token types (tokenizer.ggml.token_type). */
enum {
    MOE_TOKTYPE_NORMAL = 1,
    MOE_TOKTYPE_UNKNOWN = 2,
    MOE_TOKTYPE_CONTROL = 3,
    MOE_TOKTYPE_USER_DEFINED = 4,
    MOE_TOKTYPE_UNUSED = 5,
    MOE_TOKTYPE_BYTE = 6,
};

/* Builds a tokenizer from g's tokenizer.ggml.* keys. Returns it, or NULL
 * with *status = MOE_ENOTFOUND (no tokenizer.ggml.tokens), MOE_EUNSUPPORTED
 * (unknown model kind), MOE_EFORMAT (inconsistent arrays, bad ids) or
 * MOE_ENOMEM, and a reason in err (may be NULL). An unknown
 * tokenizer.ggml.pre falls back to the GPT-2 regex with a warning
 * through moe_log (log_hook.h). Caller frees with moe_tok_free(). */
moe_tok *moe_tok_load(const moe_gguf *g, int *status, char *err, size_t errsz);

/* NULL is a no-op. */
void moe_tok_free(moe_tok *t);

moe_tok_kind moe_tok_get_kind(const moe_tok *t);
/* Value of tokenizer.ggml.pre ("default" when absent). */
const char *moe_tok_pre_name(const moe_tok *t);
int32_t moe_tok_n_vocab(const moe_tok *t);
/* Special ids; -1 when the model has none. */
int32_t moe_tok_bos(const moe_tok *t);
int32_t moe_tok_eos(const moe_tok *t);
int32_t moe_tok_eot(const moe_tok *t);
int32_t moe_tok_pad(const moe_tok *t);
/* tokenizer.ggml.add_bos_token / add_eos_token (defaults: SPM true/false,
 * BPE false/false). */
bool moe_tok_add_bos_default(const moe_tok *t);
bool moe_tok_add_eos_default(const moe_tok *t);
/* True for ids that end generation: EOS, EOT, EOM and control tokens
 * such as <|im_end|>, <|eot_id|>, <|endoftext|>, <｜end▁of▁sentence｜>. */
bool moe_tok_is_eog(const moe_tok *t, int32_t id);
/* Token type (MOE_TOKTYPE_*), 0 for ids out of range. */
int moe_tok_type(const moe_tok *t, int32_t id);

/* The raw vocabulary string of `id` as stored in the GGUF (byte-level
 * "Ġhello", SPM "▁hello"); NULL when out of range. Lives as long as t. */
const char *moe_tok_text(const moe_tok *t, int32_t id, size_t *len);
/* The bytes `id` decodes to ("hello" with its leading space as a real
 * space, <0x0A> as "\n"); may be part of a UTF-8 character. NULL when out
 * of range. Lives as long as t. */
const char *moe_tok_piece(const moe_tok *t, int32_t id, size_t *len);
/* Returns the id whose vocabulary string is exactly s[0..len), or -1. */
int32_t moe_tok_find(const moe_tok *t, const char *s, size_t len);

/* Tokenizes text[0..len). parse_special: match CONTROL tokens written in
 * the text (only for text the server built, e.g. a rendered chat template);
 * without it USER_DEFINED tokens are still matched, as Hugging Face's
 * encode_special_tokens does (moe_tok_encode_segs's plain text is stricter).
 * add_bos: prepend BOS when the model has one. On success *ids (malloc'd,
 * never NULL, caller frees with free()) holds *n ids and 0 is returned; else MOE_ENOMEM
 * or MOE_EINVAL (NULL arguments), with *ids = NULL. Any thread. */
int moe_tok_encode(const moe_tok *t, const char *text, size_t len, bool parse_special, bool add_bos,
                   int32_t **ids, size_t *n);

/* One stretch of the text given to moe_tok_encode_segs. */
typedef struct moe_tok_seg {
    size_t len;   /* bytes; the segments cover the text in order */
    bool special; /* template text: control-token text in it becomes control tokens */
} moe_tok_seg;

/* Tokenizes text[0..len) made of segs[0..n_segs) (their lengths must add
 * up to len, else MOE_EINVAL), the way a chat prompt is: an added token is
 * matched only inside one segment. A special segment is encoded as with
 * parse_special; a plain one (message content) matches no CONTROL token
 * and no USER_DEFINED token that looks like a turn marker (<|...|>,
 * <｜...｜>: what llama.cpp's converter makes CONTROL, e.g. DeepSeek-V3's
 * <｜User｜>), so a user cannot forge turns; other USER_DEFINED tokens
 * (<think>) are matched as Hugging Face matches them. The text between
 * two matched added tokens is encoded as one run across segment ends, so
 * a prompt whose content holds no such text gets exactly the ids of
 * moe_tok_encode(parse_special=true). Otherwise as moe_tok_encode. */
int moe_tok_encode_segs(const moe_tok *t, const char *text, size_t len, const moe_tok_seg *segs, size_t n_segs,
                        bool add_bos, int32_t **ids, size_t *n);

/* Concatenates the pieces of ids[0..n) into a malloc'd, NUL-terminated
 * string (*out, length *out_len; caller frees). CONTROL tokens are
 * rendered only when render_special is set. Byte sequences that are not
 * valid UTF-8 become U+FFFD: one per maximal ill-formed subpart for BPE
 * (as HF's byte-level decoder), one per byte for SPM (as sentencepiece).
 * SPM drops the dummy-prefix space of the first printed piece unless a
 * byte token (<0x20>) made it, and an unprinted control token still ends
 * a run of byte tokens, as sentencepiece does. <unk> prints nothing. Ids
 * out of range are MOE_EINVAL. */
int moe_tok_decode(const moe_tok *t, const int32_t *ids, size_t n, bool render_special, char **out,
                   size_t *out_len);

/* Incremental detokenizer for streaming: feed ids one at a time, get the
 * text they add. A delta never ends inside a UTF-8 character (bytes of an
 * incomplete character wait for the next token); invalid bytes become
 * U+FFFD; moe_tok_stream_flush() turns a dangling incomplete character into
 * U+FFFD. The concatenated deltas equal moe_tok_decode() of all ids. */
typedef struct moe_tok_stream moe_tok_stream;

/* Returns a new stream, or NULL on ENOMEM. Free with moe_tok_stream_free(). */
moe_tok_stream *moe_tok_stream_new(const moe_tok *t, bool render_special);
void moe_tok_stream_free(moe_tok_stream *s);
/* Adds token `id`. *delta and *delta_len receive the new complete text (maybe
 * empty), valid until the next call on s. Returns 0, MOE_EINVAL (id out of
 * range) or MOE_ENOMEM. */
int moe_tok_stream_feed(moe_tok_stream *s, int32_t id, const char **delta, size_t *delta_len);
/* Emits whatever is pending (as U+FFFD) and resets s for a new sequence. */
int moe_tok_stream_flush(moe_tok_stream *s, const char **delta, size_t *delta_len);

#ifdef __cplusplus
}
#endif
#endif
