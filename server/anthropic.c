/* anthropic.c - the Anthropic Messages API over the chat request (see anthropic.h). */
#include "anthropic.h"

#include <cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sse_events.h"
#include "status.h"
#include "utf8.h"


static bool absent(const cJSON *v) { return !v || cJSON_IsNull(v); }

/* A number in [lo, hi] copied into the chat body under the same name. */
static int copy_num(const cJSON *root, cJSON *chat, const char *name, double lo, double hi, bool integral,
                    srv_oai_err *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, name);
    if (absent(v)) return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || (integral && v->valuedouble != floor(v->valuedouble)))
        return srv_oai_bad(err, name, "%s: must be %s", name, integral ? "an integer" : "a number");
    if (v->valuedouble < lo || v->valuedouble > hi)
        return srv_oai_bad(err, name, "%s: must be between %g and %g (got %g)", name, lo, hi, v->valuedouble);
    cJSON_AddNumberToObject(chat, name, v->valuedouble);
    return 0;
}

/* Text blocks (or a string) -> an array of chat text parts in `parts`.
 * Thinking blocks are dropped; anything else is refused by name. */
static int text_blocks(const cJSON *c, const char *path, bool system, cJSON *parts, srv_oai_err *err) {
    char p[96];
    if (cJSON_IsString(c)) {
        cJSON *t = cJSON_CreateObject();
        cJSON_AddStringToObject(t, "type", "text");
        cJSON_AddStringToObject(t, "text", c->valuestring);
        cJSON_AddItemToArray(parts, t);
        return 0;
    }
    if (!cJSON_IsArray(c)) return srv_oai_bad(err, path, "%s: must be a string or an array of content blocks", path);
    size_t j = 0;
    for (const cJSON *b = c->child; b; b = b->next, j++) {
        snprintf(p, sizeof p, "%s.%zu", path, j);
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(b, "type");
        if (!cJSON_IsObject(b) || !cJSON_IsString(type))
            return srv_oai_bad(err, p, "%s: must be an object with a string 'type'", p);
        const char *ty = type->valuestring;
        if (!strcmp(ty, "text")) {
            const cJSON *text = cJSON_GetObjectItemCaseSensitive(b, "text");
            if (!cJSON_IsString(text)) {
                snprintf(p, sizeof p, "%s.%zu.text", path, j);
                return srv_oai_bad(err, p, "%s: must be a string", p);
            }
            cJSON *t = cJSON_CreateObject();
            cJSON_AddStringToObject(t, "type", "text");
            cJSON_AddStringToObject(t, "text", text->valuestring);
            cJSON_AddItemToArray(parts, t);
            continue;
        }
        if (!system && (!strcmp(ty, "thinking") || !strcmp(ty, "redacted_thinking"))) continue;
        snprintf(p, sizeof p, "%s.%zu.type", path, j);
        if (!strcmp(ty, "tool_use") || !strcmp(ty, "tool_result") || !strcmp(ty, "server_tool_use"))
            return srv_oai_bad(err, p, "%s: '%s' blocks are not supported: this server does not do tool use yet", p, ty);
        return srv_oai_bad(err, p, "%s: content block type '%.40s' is not supported (only 'text'%s)", p, ty,
                   system ? "" : " and, ignored, 'thinking'");
    }
    return 0;
}

/* The Messages body -> a chat-completions body (the caller frees it). */
static int translate(const cJSON *root, bool count_only, cJSON *chat, srv_oai_err *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (absent(v)) return srv_oai_bad(err, "model", "model: Field required");
    if (!cJSON_IsString(v)) return srv_oai_bad(err, "model", "model: must be a string");
    cJSON_AddStringToObject(chat, "model", v->valuestring);

    v = cJSON_GetObjectItemCaseSensitive(root, "max_tokens");
    if (absent(v) && !count_only) return srv_oai_bad(err, "max_tokens", "max_tokens: Field required");
    if (!absent(v)) {
        if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || !isfinite(v->valuedouble))
            return srv_oai_bad(err, "max_tokens", "max_tokens: must be an integer");
        if (v->valuedouble < 1) return srv_oai_bad(err, "max_tokens", "max_tokens: must be at least 1 (got %g)", v->valuedouble);
        if (!count_only) cJSON_AddNumberToObject(chat, "max_tokens", v->valuedouble);
    }
    int st;
    if ((st = copy_num(root, chat, "temperature", 0, 1, false, err))) return st;
    if ((st = copy_num(root, chat, "top_p", 0, 1, false, err))) return st;
    if ((st = copy_num(root, chat, "top_k", 0, 1e9, true, err))) return st;
    v = cJSON_GetObjectItemCaseSensitive(root, "stream");
    if (!absent(v)) {
        if (!cJSON_IsBool(v)) return srv_oai_bad(err, "stream", "stream: must be a boolean");
        if (!count_only) cJSON_AddBoolToObject(chat, "stream", cJSON_IsTrue(v));
    }
    v = cJSON_GetObjectItemCaseSensitive(root, "ignore_eos"); /* moed extension, as on the OpenAI endpoints */
    if (!absent(v)) {
        if (!cJSON_IsBool(v)) return srv_oai_bad(err, "ignore_eos", "ignore_eos: must be a boolean");
        cJSON_AddBoolToObject(chat, "ignore_eos", cJSON_IsTrue(v));
    }
    v = cJSON_GetObjectItemCaseSensitive(root, "metadata");
    if (!absent(v) && !cJSON_IsObject(v)) return srv_oai_bad(err, "metadata", "metadata: must be an object");
    v = cJSON_GetObjectItemCaseSensitive(root, "stop_sequences");
    if (!absent(v)) {
        if (!cJSON_IsArray(v)) return srv_oai_bad(err, "stop_sequences", "stop_sequences: must be an array of strings");
        int n = cJSON_GetArraySize(v);
        if (n > MOE_MAX_STOP)
            return srv_oai_bad(err, "stop_sequences", "stop_sequences: %d strings; at most %d are allowed", n, MOE_MAX_STOP);
        cJSON *stop = cJSON_AddArrayToObject(chat, "stop");
        int i = 0;
        for (const cJSON *x = v->child; x; x = x->next, i++) {
            char p[48];
            snprintf(p, sizeof p, "stop_sequences.%d", i);
            if (!cJSON_IsString(x)) return srv_oai_bad(err, p, "%s: must be a string", p);
            size_t l = strlen(x->valuestring);
            if (!l) return srv_oai_bad(err, p, "%s: must not be empty", p);
            if (l > MOE_MAX_STOP_LEN) return srv_oai_bad(err, p, "%s: longer than %d bytes", p, MOE_MAX_STOP_LEN);
            cJSON_AddItemToArray(stop, cJSON_CreateString(x->valuestring));
        }
        if (!n) cJSON_DeleteItemFromObject(chat, "stop");
    }
    /* Tool use is a separate feature: refuse it rather than answer as if
     * the tools were not there. An empty list is the same as none. */
    v = cJSON_GetObjectItemCaseSensitive(root, "tools");
    if (!absent(v) && !(cJSON_IsArray(v) && !v->child))
        return srv_oai_bad(err, "tools", "tools: tool use is not supported by this server yet");
    v = cJSON_GetObjectItemCaseSensitive(root, "tool_choice");
    if (!absent(v)) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(v, "type");
        if (!cJSON_IsString(t) || strcmp(t->valuestring, "none"))
            return srv_oai_bad(err, "tool_choice", "tool_choice: only {\"type\": \"none\"} is supported (no tool use yet)");
    }
    /* output_config.effort only tunes a reasoning model: accepted, no effect. */
    v = cJSON_GetObjectItemCaseSensitive(root, "output_config");
    if (!absent(v)) {
        if (!cJSON_IsObject(v)) return srv_oai_bad(err, "output_config", "output_config: must be an object");
        if (!absent(cJSON_GetObjectItemCaseSensitive(v, "format")))
            return srv_oai_bad(err, "output_config.format",
                       "output_config.format: structured output needs grammar-constrained sampling, which this "
                       "server does not have yet");
    }
    v = cJSON_GetObjectItemCaseSensitive(root, "thinking");
    if (!absent(v)) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(v, "type");
        if (!cJSON_IsString(t) || strcmp(t->valuestring, "disabled"))
            return srv_oai_bad(err, "thinking", "thinking: extended thinking is not supported; only {\"type\": \"disabled\"}");
    }

    cJSON *msgs = cJSON_AddArrayToObject(chat, "messages");
    v = cJSON_GetObjectItemCaseSensitive(root, "system");
    if (!absent(v)) {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddItemToArray(msgs, m);
        cJSON_AddStringToObject(m, "role", "system");
        if ((st = text_blocks(v, "system", true, cJSON_AddArrayToObject(m, "content"), err))) return st;
    }
    const cJSON *ms = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (absent(ms)) return srv_oai_bad(err, "messages", "messages: Field required");
    if (!cJSON_IsArray(ms)) return srv_oai_bad(err, "messages", "messages: must be an array");
    if (!ms->child) return srv_oai_bad(err, "messages", "messages: at least one message is required");
    size_t i = 0;
    const cJSON *last_role = NULL;
    for (const cJSON *m = ms->child; m; m = m->next, i++) {
        char p[64];
        snprintf(p, sizeof p, "messages.%zu", i);
        if (!cJSON_IsObject(m)) return srv_oai_bad(err, p, "%s: must be an object", p);
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        snprintf(p, sizeof p, "messages.%zu.role", i);
        if (!cJSON_IsString(role) || (strcmp(role->valuestring, "user") && strcmp(role->valuestring, "assistant")))
            return srv_oai_bad(err, p, "%s: must be 'user' or 'assistant'", p);
        last_role = role;
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
        snprintf(p, sizeof p, "messages.%zu.content", i);
        if (absent(c)) return srv_oai_bad(err, p, "%s: Field required", p);
        cJSON *out = cJSON_CreateObject();
        cJSON_AddItemToArray(msgs, out);
        cJSON_AddStringToObject(out, "role", role->valuestring);
        if ((st = text_blocks(c, p, false, cJSON_AddArrayToObject(out, "content"), err))) return st;
    }
    /* A last assistant turn asks the model to continue it (prefill); the
     * chat templates here can only open a new turn, so that would answer
     * a different question. */
    if (last_role && !strcmp(last_role->valuestring, "assistant")) {
        char p[64];
        snprintf(p, sizeof p, "messages.%zu.role", i - 1);
        return srv_oai_bad(err, p, "%s: the last message must be from the user (assistant prefill is not supported)", p);
    }
    return 0;
}

int srv_anth_parse(const char *body, size_t len, const srv_oai_limits *lim, bool count_only, srv_oai_req *out,
                   srv_oai_err *err) {
    memset(out, 0, sizeof *out);
    out->kind = SRV_OAI_CHAT;
    int st = 0;
    cJSON *root = srv_oai_parse_object(body, len, lim->max_depth, err, &st);
    if (!root) return st; /* precheck's paths are written OpenAI's way (messages[0].content) */
    cJSON *chat = cJSON_CreateObject();
    if (!chat) {
        cJSON_Delete(root);
        srv_oai_err_set(err, 500, NULL, "out of memory");
        return MOE_ENOMEM;
    }
    st = translate(root, count_only, chat, err);
    cJSON_Delete(root);
    char *text = st ? NULL : cJSON_PrintUnformatted(chat);
    cJSON_Delete(chat);
    if (st) return st;
    if (!text) {
        srv_oai_err_set(err, 500, NULL, "out of memory");
        return MOE_ENOMEM;
    }
    /* Counting is allowed for a prompt the context could not run: that is
     * what a client counts for, to trim it. */
    srv_oai_limits l2 = *lim;
    if (count_only) l2.ctx_size = INT64_MAX / 4;
    st = srv_oai_parse(SRV_OAI_CHAT, text, strlen(text), &l2, out, err);
    free(text);
    if (st && !strcmp(err->param, "max_completion_tokens")) snprintf(err->param, sizeof err->param, "max_tokens");
    /* The chat body's system message shifted the indexes; every message
     * field was checked above, so what is left concerns the whole list. */
    if (st && !strncmp(err->param, "messages[", 9)) snprintf(err->param, sizeof err->param, "messages");
    return st;
}

static const char *err_type(int http) {
    switch (http) {
    case 400: return "invalid_request_error";
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 413: return "request_too_large";
    case 429: return "rate_limit_error";
    case 503: return "overloaded_error";
    case 504: return "timeout_error";
    default: return http >= 500 ? "api_error" : "invalid_request_error";
    }
}

static cJSON *err_object(const srv_oai_err *e) {
    cJSON *root = cJSON_CreateObject(), *o = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(root, "type", "error");
    cJSON_AddStringToObject(o, "type", err_type(e->http));
    char msg[sizeof e->message + sizeof e->param + 4];
    size_t pl = strlen(e->param);
    /* Anthropic's messages start with the field ("max_tokens: Field required"). */
    if (pl && strncmp(e->message, e->param, pl)) snprintf(msg, sizeof msg, "%s: %s", e->param, e->message);
    else snprintf(msg, sizeof msg, "%s", e->message);
    char *clean = moe_utf8_clean(msg, strlen(msg));
    cJSON_AddStringToObject(o, "message", clean ? clean : "");
    free(clean);
    return root;
}

static char *print(cJSON *o) {
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    return s;
}

char *srv_anth_err_json(const srv_oai_err *e) { return print(err_object(e)); }

const char *srv_anth_stop_reason(moe_finish f, int32_t stop_index) {
    if (f == MOE_FINISH_STOP) return stop_index >= 0 ? "stop_sequence" : "end_turn";
    if (f == MOE_FINISH_LENGTH) return "max_tokens";
    return NULL;
}

static void add_str_or_null(cJSON *o, const char *key, const char *s) {
    if (s) {
        char *c = moe_utf8_clean(s, strlen(s));
        cJSON_AddStringToObject(o, key, c ? c : "");
        free(c);
    } else cJSON_AddNullToObject(o, key);
}

static cJSON *text_block(const char *text, size_t len) {
    cJSON *b = cJSON_CreateObject();
    cJSON_AddStringToObject(b, "type", "text");
    char *c = moe_utf8_clean(text ? text : "", text ? len : 0);
    cJSON_AddStringToObject(b, "text", c ? c : "");
    free(c);
    return b;
}

static cJSON *message_object(const char *id, const char *model, moe_finish finish, const char *stop_sequence,
                             int64_t in, int64_t out) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", id);
    cJSON_AddStringToObject(o, "type", "message");
    cJSON_AddStringToObject(o, "role", "assistant");
    cJSON_AddStringToObject(o, "model", model);
    cJSON_AddArrayToObject(o, "content");
    const char *reason = srv_anth_stop_reason(finish, stop_sequence ? 0 : -1);
    add_str_or_null(o, "stop_reason", reason);
    add_str_or_null(o, "stop_sequence", reason && !strcmp(reason, "stop_sequence") ? stop_sequence : NULL);
    cJSON *u = cJSON_AddObjectToObject(o, "usage");
    cJSON_AddNumberToObject(u, "input_tokens", (double)in);
    cJSON_AddNumberToObject(u, "output_tokens", (double)out);
    return o;
}

char *srv_anth_render_message(const char *id, const char *model, const char *text, size_t len, moe_finish finish,
                              const char *stop_sequence, int64_t input_tokens, int64_t output_tokens) {
    cJSON *o = message_object(id, model, finish, stop_sequence, input_tokens, output_tokens);
    cJSON_AddItemToArray(cJSON_GetObjectItemCaseSensitive(o, "content"), text_block(text, len));
    return print(o);
}

char *srv_anth_sse_start(const char *id, const char *model, int64_t input_tokens) {
    cJSON *ev[3];
    ev[0] = srv_sse_typed("message_start");
    cJSON_AddItemToObject(ev[0], "message", message_object(id, model, MOE_FINISH_NONE, NULL, input_tokens, 0));
    ev[1] = srv_sse_typed("content_block_start");
    cJSON_AddNumberToObject(ev[1], "index", 0);
    cJSON_AddItemToObject(ev[1], "content_block", text_block("", 0));
    ev[2] = srv_sse_typed("ping");
    return srv_sse_events(ev, 3, NULL);
}

char *srv_anth_sse_delta(const char *text, size_t len) {
    cJSON *ev = srv_sse_typed("content_block_delta");
    cJSON_AddNumberToObject(ev, "index", 0);
    cJSON *d = text_block(text, len);
    cJSON_ReplaceItemInObjectCaseSensitive(d, "type", cJSON_CreateString("text_delta"));
    cJSON_AddItemToObject(ev, "delta", d);
    return srv_sse_events(&ev, 1, NULL);
}

char *srv_anth_sse_end(moe_finish finish, const char *stop_sequence, int64_t output_tokens) {
    cJSON *ev[3];
    ev[0] = srv_sse_typed("content_block_stop");
    cJSON_AddNumberToObject(ev[0], "index", 0);
    ev[1] = srv_sse_typed("message_delta");
    cJSON *d = cJSON_AddObjectToObject(ev[1], "delta");
    const char *reason = srv_anth_stop_reason(finish, stop_sequence ? 0 : -1);
    add_str_or_null(d, "stop_reason", reason);
    add_str_or_null(d, "stop_sequence", reason && !strcmp(reason, "stop_sequence") ? stop_sequence : NULL);
    cJSON *u = cJSON_AddObjectToObject(ev[1], "usage");
    cJSON_AddNumberToObject(u, "output_tokens", (double)output_tokens);
    ev[2] = srv_sse_typed("message_stop");
    return srv_sse_events(ev, 3, NULL);
}

char *srv_anth_sse_error(const srv_oai_err *e) {
    cJSON *o = err_object(e);
    return srv_sse_events(&o, 1, NULL);
}

char *srv_anth_render_count(int64_t input_tokens) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "input_tokens", (double)input_tokens);
    return print(o);
}
