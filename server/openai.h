/* openai.h - OpenAI request bodies -> engine requests, engine output ->
 * OpenAI response bodies and SSE chunks. No I/O, no engine calls: every
 * function is pure (plus malloc), so all of it is unit-tested without a
 * server (tests/check_openai.c).
 *
 * Parsing validates field by field; the first bad field produces an
 * srv_oai_err whose param names it (JSON path as OpenAI writes it:
 * "messages[2].content", "logit_bias", "stop") and whose http status is
 * 400 (bad JSON, types, ranges, the context limit), 404 (unknown model).
 *
 * Threads: any; nothing here has global state.
 */
#ifndef SRV_OPENAI_H
#define SRV_OPENAI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine.h"

typedef enum srv_oai_kind { SRV_OAI_CHAT = 0, SRV_OAI_COMPLETION = 1 } srv_oai_kind;

/* What a request is checked against (from the engine info + config). */
typedef struct srv_oai_limits {
    const char *model_name;  /* served model id; a request naming another model gets 404 */
    const char *model_alt;   /* a second accepted id (the file's), or NULL */
    const char *const *model_aliases; /* (n_model_aliases) more accepted ids */
    size_t n_model_aliases;
    int64_t n_vocab;
    int64_t ctx_size;        /* prompt + max_tokens limit */
    int64_t max_seqs;        /* n limit */
    int max_depth;           /* JSON nesting limit (<= 0: 64) */
    const moe_tok *tok;      /* text prompts; may be NULL when only token prompts are parsed */
    const moe_chat_template *chat; /* chat requests; may be NULL for completions */
    bool chat_parse_special; /* default of a chat request's parse_special (config chat_parse_special) */
} srv_oai_limits;

typedef struct srv_oai_err {
    int http;          /* 400, 401, 404, 405, 413, 429, 500, 503 */
    char message[512];
    char param[96];    /* "" = null */
    char code[48];     /* "" = null */
} srv_oai_err;

/* Fills e (http, param may be NULL, printf message). */
void srv_oai_err_set(srv_oai_err *e, int http, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* srv_oai_err_set(e, 400, param, ...) and returns MOE_EINVAL: the one way
 * the request parsers (chat, Anthropic, Responses) refuse a field. */
int srv_oai_bad(srv_oai_err *e, const char *param, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* {"error":{"message","type","param","code"}}; malloc'd, caller frees; NULL on ENOMEM.
 * type is invalid_request_error (4xx), authentication_error (401),
 * rate_limit_error (429) or server_error (5xx). */
char *srv_oai_err_json(const srv_oai_err *e);

/* One prompt of a request: its ids and, for echo/logging, its text. */
typedef struct srv_oai_prompt {
    int32_t *ids;   /* (n) */
    int64_t n;
    char *text;     /* completions: the prompt text (decoded for token prompts); chat: the rendered prompt */
    size_t text_len;
} srv_oai_prompt;

typedef struct srv_oai_req {
    srv_oai_kind kind;
    char *model;             /* as requested (NULL = not given) */
    bool stream;
    bool include_usage;      /* stream_options.include_usage */
    int64_t max_tokens;      /* resolved: given, else the default (16 for completions, the rest of the context for chat) */
    int32_t n;
    moe_sampling sampling;   /* logit_bias points into bias_ids / bias below */
    int32_t *bias_ids;       /* (sampling.n_logit_bias) */
    float *bias;
    bool logprobs;
    int32_t top_logprobs;
    bool echo;               /* completions */
    bool ignore_eos;
    bool parse_special;      /* resolved: control-token text in content / prompt becomes control tokens */
    char **stop;             /* (n_stop) */
    int32_t n_stop;
    char *user;
    srv_oai_prompt *prompts; /* (n_prompts): chat 1; completions one per prompt */
    size_t n_prompts;
} srv_oai_req;

/* Parses and validates body[0..len) (need not be NUL-terminated) for the
 * endpoint `kind`, tokenizes the prompt(s) (chat: rendered through
 * lim->chat with the generation prompt), and checks prompt + max_tokens
 * against the context. Returns 0 and fills *out (free with
 * srv_oai_req_free), or a negative status with *err filled and *out
 * zeroed. */
int srv_oai_parse(srv_oai_kind kind, const char *body, size_t len, const srv_oai_limits *lim, srv_oai_req *out,
                  srv_oai_err *err);
void srv_oai_req_free(srv_oai_req *r);

/* The engine request for prompt i (pointers into r; r must outlive submit). */
void srv_oai_engine_request(const srv_oai_req *r, size_t i, moe_request *out);

/* Checks body for valid UTF-8, nesting depth <= max_depth and strings
 * free of NUL (\u0000 or a raw 0 byte; err->param names the string's
 * path, a key included) without building anything (also used for
 * /tokenize). Returns 0 or MOE_EINVAL with err filled (400). */
int srv_oai_precheck(const char *body, size_t len, int max_depth, srv_oai_err *err);

/* srv_oai_precheck, then the body parsed as exactly one JSON object
 * (nothing but white space after it). Returns the object (caller frees
 * with cJSON_Delete), or NULL with err filled (400) and *status set
 * (MOE_EINVAL). For the APIs that translate their bodies (Anthropic,
 * Responses). */
struct cJSON *srv_oai_parse_object(const char *body, size_t len, int max_depth, srv_oai_err *err, int *status);

/* --- output --- */

/* One generated token's logprob data. */
typedef struct srv_oai_lp {
    int32_t id;
    float logprob;
    int32_t n_top;
    moe_logprob top[MOE_MAX_TOP_LOGPROBS];
    size_t text_offset; /* completions: offset of the token's text in the choice's text */
} srv_oai_lp;

/* One choice accumulated for a non-streamed response. */
typedef struct srv_oai_choice {
    char *text;
    size_t len, cap;
    srv_oai_lp *lps;
    size_t n_lps, cap_lps;
    moe_finish finish;
    int64_t completion_tokens;
} srv_oai_choice;

/* Appends text / a logprob entry. 0 or MOE_ENOMEM. */
int srv_oai_choice_append(srv_oai_choice *c, const char *text, size_t len);
int srv_oai_choice_add_lp(srv_oai_choice *c, const srv_oai_lp *lp);
void srv_oai_choice_free(srv_oai_choice *c);

/* What every rendered body shares. */
typedef struct srv_oai_ctx {
    srv_oai_kind kind;
    const char *id;      /* "chatcmpl-..." / "cmpl-..." */
    int64_t created;     /* unix seconds */
    const char *model;
    const moe_tok *tok;  /* token texts for logprobs; may be NULL when logprobs is off */
    bool logprobs;
    /* usage extensions (docs/api.md): added to usage when set */
    bool has_energy;
    double energy_joules;
    bool has_cost;
    double cost_usd;
} srv_oai_ctx;

/* The non-streamed body: choices[0..n) in index order, and usage. Malloc'd. */
char *srv_oai_render_response(const srv_oai_ctx *c, const srv_oai_choice *choices, size_t n, int64_t prompt_tokens,
                              int64_t completion_tokens);

/* One SSE chunk's JSON (no "data: " framing): choice `index` with the
 * role (chat, when `role`), text[0..len), the logprob entries lps[0..n_lps)
 * and finish (MOE_FINISH_NONE -> null). Malloc'd. */
char *srv_oai_render_chunk(const srv_oai_ctx *c, int32_t index, bool role, const char *text, size_t len,
                           const srv_oai_lp *lps, size_t n_lps, moe_finish finish);
/* The final usage chunk (choices: []). Malloc'd. */
char *srv_oai_render_usage_chunk(const srv_oai_ctx *c, int64_t prompt_tokens, int64_t completion_tokens);

/* "stop" / "length" / NULL (none, cancelled). */
const char *srv_oai_finish_name(moe_finish f);


#endif
