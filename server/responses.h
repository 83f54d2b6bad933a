/* responses.h - the OpenAI Responses API (POST /v1/responses), stateless,
 * on top of the chat request that openai.c builds: input (a string or
 * message items with input_text / output_text parts) and instructions
 * become chat messages, max_output_tokens becomes max_tokens, and the
 * engine's output is rendered as a Response object or as the Responses
 * streaming events (each with its sequence_number). No I/O, no engine
 * calls, no global state: any thread.
 *
 * Refused with a 400 naming the field: previous_response_id, store: true,
 * conversation and background (nothing is stored), text.format
 * json_schema / json_object (needs grammar-constrained sampling), tools
 * and tool items (no tool calling yet), image and file inputs. Reasoning
 * items in the input are dropped.
 */
#ifndef SRV_RESPONSES_H
#define SRV_RESPONSES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "openai.h"

/* What the Response object echoes back from the request. */
typedef struct srv_resp_echo {
    char *instructions;        /* NULL = null */
    int64_t max_output_tokens; /* -1 = null */
    double temperature, top_p;
    char *metadata;            /* the metadata object's JSON text; NULL = {} */
} srv_resp_echo;

void srv_resp_echo_free(srv_resp_echo *e);

/* Parses a Responses body[0..len) into *out (SRV_OAI_CHAT, n = 1; free
 * with srv_oai_req_free) and *echo (free with srv_resp_echo_free).
 * Returns 0, or a negative status with *err filled (400; 404 for an
 * unknown model) and both zeroed. */
int srv_resp_parse(const char *body, size_t len, const srv_oai_limits *lim, srv_oai_req *out, srv_resp_echo *echo,
                   srv_oai_err *err);

/* What every rendered object shares. */
typedef struct srv_resp_ctx {
    const char *id;      /* "resp_..." */
    const char *item_id; /* "msg_..." the output message's id */
    const char *model;
    int64_t created_at;  /* unix seconds */
    const srv_resp_echo *echo;
} srv_resp_ctx;

/* The Response object: status "completed" (EOS or a stop string),
 * "incomplete" with incomplete_details.reason "max_output_tokens".
 * Malloc'd. */
char *srv_resp_render(const srv_resp_ctx *c, const char *text, size_t len, moe_finish finish, int64_t input_tokens,
                      int64_t output_tokens);

/* Streaming, as "event: TYPE\ndata: JSON\n\n" text (malloc'd); *seq is
 * the next sequence_number and advances by one per event.
 * start: response.created, response.in_progress, response.output_item.added,
 * response.content_part.added. delta: one response.output_text.delta.
 * end (text = the whole output): response.output_text.done,
 * response.content_part.done, response.output_item.done, and
 * response.completed or, when max_output_tokens cut it, response.incomplete. */
char *srv_resp_sse_start(const srv_resp_ctx *c, int64_t *seq);
char *srv_resp_sse_delta(const srv_resp_ctx *c, int64_t *seq, const char *text, size_t len);
char *srv_resp_sse_end(const srv_resp_ctx *c, int64_t *seq, const char *text, size_t len, moe_finish finish,
                       int64_t input_tokens, int64_t output_tokens);
/* An "error" event (a failure after the stream started). */
char *srv_resp_sse_error(int64_t *seq, const srv_oai_err *e);

#endif
