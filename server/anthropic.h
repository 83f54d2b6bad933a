/* anthropic.h - the Anthropic Messages API (POST /v1/messages and
 * /v1/messages/count_tokens) on top of the chat request that openai.c
 * builds: a Messages body is validated field by field (errors name the
 * field as Anthropic writes it: "messages.1.content.0.type",
 * "max_tokens"), translated into a chat-completions request and parsed by
 * srv_oai_parse; the engine's output is rendered as a Message object or
 * as the Messages streaming events. No I/O, no engine calls, no global
 * state: any thread.
 *
 * Tool use (tools, tool_choice, tool_use / tool_result blocks) and
 * extended thinking are refused with a 400 naming the field; thinking
 * blocks in the history are dropped (as Anthropic drops earlier turns'
 * thinking from the prompt). A last assistant message (prefill) is
 * refused.
 */
#ifndef SRV_ANTHROPIC_H
#define SRV_ANTHROPIC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "openai.h"

/* Parses a Messages body[0..len) into *out (a SRV_OAI_CHAT request with
 * n = 1; free with srv_oai_req_free). count_only: the count_tokens body
 * (max_tokens optional, stream ignored, a prompt longer than the context
 * still counted). Returns 0, or a negative status
 * with *err filled (400; 404 for an unknown model) and *out zeroed. */
int srv_anth_parse(const char *body, size_t len, const srv_oai_limits *lim, bool count_only, srv_oai_req *out,
                   srv_oai_err *err);

/* {"type":"error","error":{"type":...,"message":...}} with Anthropic's
 * error type for e->http; the message starts with the field when e->param
 * names one. Malloc'd; NULL on ENOMEM. */
char *srv_anth_err_json(const srv_oai_err *e);

/* "end_turn" (EOS), "stop_sequence" (stop_index >= 0), "max_tokens", or
 * NULL (cancelled). */
const char *srv_anth_stop_reason(moe_finish f, int32_t stop_index);

/* The non-streamed Message object. stop_sequence: the matched string or
 * NULL. Malloc'd. */
char *srv_anth_render_message(const char *id, const char *model, const char *text, size_t len, moe_finish finish,
                              const char *stop_sequence, int64_t input_tokens, int64_t output_tokens);

/* Streaming, as "event: NAME\ndata: JSON\n\n" text (malloc'd):
 * message_start + content_block_start + ping; one text_delta; and
 * content_block_stop + message_delta + message_stop. */
char *srv_anth_sse_start(const char *id, const char *model, int64_t input_tokens);
char *srv_anth_sse_delta(const char *text, size_t len);
char *srv_anth_sse_end(moe_finish finish, const char *stop_sequence, int64_t output_tokens);
/* An error event (a failure after the stream started). */
char *srv_anth_sse_error(const srv_oai_err *e);

/* {"input_tokens": n}. Malloc'd. */
char *srv_anth_render_count(int64_t input_tokens);

#endif
