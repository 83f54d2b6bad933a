/* responses.c - the OpenAI Responses API over the chat request (see responses.h). */
#include "responses.h"

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

void srv_resp_echo_free(srv_resp_echo *e) {
    free(e->instructions);
    free(e->metadata);
    memset(e, 0, sizeof *e);
    e->max_output_tokens = -1;
}

/* One input item's content -> chat text parts. */
static int item_content(const cJSON *c, const char *path, bool assistant, cJSON *parts, srv_oai_err *err) {
    if (cJSON_IsString(c)) {
        cJSON *t = cJSON_CreateObject();
        cJSON_AddStringToObject(t, "type", "text");
        cJSON_AddStringToObject(t, "text", c->valuestring);
        cJSON_AddItemToArray(parts, t);
        return 0;
    }
    if (!cJSON_IsArray(c)) return srv_oai_bad(err, path, "'%s' must be a string or an array of content parts", path);
    size_t j = 0;
    char p[96];
    for (const cJSON *x = c->child; x; x = x->next, j++) {
        snprintf(p, sizeof p, "%s[%zu]", path, j);
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(x, "type");
        if (!cJSON_IsObject(x) || !cJSON_IsString(type))
            return srv_oai_bad(err, p, "'%s' must be an object with a string 'type'", p);
        const char *ty = type->valuestring;
        /* An earlier answer passed back as input holds output_text. */
        if (!strcmp(ty, "input_text") || !strcmp(ty, "output_text") || (assistant && !strcmp(ty, "refusal"))) {
            const char *key = strcmp(ty, "refusal") ? "text" : "refusal";
            const cJSON *text = cJSON_GetObjectItemCaseSensitive(x, key);
            if (!cJSON_IsString(text)) {
                snprintf(p, sizeof p, "%s[%zu].%s", path, j, key);
                return srv_oai_bad(err, p, "'%s' must be a string", p);
            }
            cJSON *t = cJSON_CreateObject();
            cJSON_AddStringToObject(t, "type", "text");
            cJSON_AddStringToObject(t, "text", text->valuestring);
            cJSON_AddItemToArray(parts, t);
            continue;
        }
        snprintf(p, sizeof p, "%s[%zu].type", path, j);
        return srv_oai_bad(err, p, "'%s': content type '%.40s' is not supported (only input_text and output_text)", p, ty);
    }
    return 0;
}

static int input_items(const cJSON *in, cJSON *msgs, srv_oai_err *err) {
    if (cJSON_IsString(in)) {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddItemToArray(msgs, m);
        cJSON_AddStringToObject(m, "role", "user");
        cJSON_AddStringToObject(m, "content", in->valuestring);
        return 0;
    }
    if (!cJSON_IsArray(in)) return srv_oai_bad(err, "input", "'input' must be a string or an array of input items");
    if (!in->child) return srv_oai_bad(err, "input", "'input' must not be empty");
    size_t i = 0;
    char p[64];
    for (const cJSON *it = in->child; it; it = it->next, i++) {
        snprintf(p, sizeof p, "input[%zu]", i);
        if (!cJSON_IsObject(it)) return srv_oai_bad(err, p, "'%s' must be an object", p);
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(it, "type");
        if (!absent(type)) {
            snprintf(p, sizeof p, "input[%zu].type", i);
            if (!cJSON_IsString(type)) return srv_oai_bad(err, p, "'%s' must be a string", p);
            if (!strcmp(type->valuestring, "reasoning")) continue;
            if (strcmp(type->valuestring, "message")) {
                bool tool = strstr(type->valuestring, "call") != NULL;
                return srv_oai_bad(err, p, "'%s': item type '%.40s' is not supported%s", p, type->valuestring,
                           tool ? " (no tool calling yet)" : " (only message items)");
            }
        }
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(it, "role");
        snprintf(p, sizeof p, "input[%zu].role", i);
        if (!cJSON_IsString(role)) return srv_oai_bad(err, p, "'%s' is required and must be a string", p);
        const char *r = role->valuestring;
        if (strcmp(r, "user") && strcmp(r, "assistant") && strcmp(r, "system") && strcmp(r, "developer"))
            return srv_oai_bad(err, p, "'%s' must be one of user, assistant, system, developer (got '%.40s')", p, r);
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(it, "content");
        snprintf(p, sizeof p, "input[%zu].content", i);
        if (absent(c)) return srv_oai_bad(err, p, "'%s' is required", p);
        cJSON *m = cJSON_CreateObject();
        cJSON_AddItemToArray(msgs, m);
        cJSON_AddStringToObject(m, "role", strcmp(r, "developer") ? r : "system");
        int st = item_content(c, p, !strcmp(r, "assistant"), cJSON_AddArrayToObject(m, "content"), err);
        if (st) return st;
    }
    return 0;
}

static int num(const cJSON *root, cJSON *chat, const char *name, double lo, double hi, double *out, srv_oai_err *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, name);
    if (absent(v)) return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) return srv_oai_bad(err, name, "'%s' must be a number", name);
    if (v->valuedouble < lo || v->valuedouble > hi)
        return srv_oai_bad(err, name, "'%s' must be between %g and %g (got %g)", name, lo, hi, v->valuedouble);
    cJSON_AddNumberToObject(chat, name, v->valuedouble);
    *out = v->valuedouble;
    return 0;
}

static int translate(const cJSON *root, cJSON *chat, srv_resp_echo *echo, srv_oai_err *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!absent(v)) {
        if (!cJSON_IsString(v)) return srv_oai_bad(err, "model", "'model' must be a string");
        cJSON_AddStringToObject(chat, "model", v->valuestring);
    }
    /* Nothing is stored, so nothing can be continued or fetched later. */
    v = cJSON_GetObjectItemCaseSensitive(root, "previous_response_id");
    if (!absent(v))
        return srv_oai_bad(err, "previous_response_id",
                   "'previous_response_id' is not supported: this server is stateless; send the whole conversation "
                   "as 'input'");
    v = cJSON_GetObjectItemCaseSensitive(root, "conversation");
    if (!absent(v)) return srv_oai_bad(err, "conversation", "'conversation' is not supported: this server is stateless");
    v = cJSON_GetObjectItemCaseSensitive(root, "store");
    if (!absent(v)) {
        if (!cJSON_IsBool(v)) return srv_oai_bad(err, "store", "'store' must be a boolean");
        if (cJSON_IsTrue(v))
            return srv_oai_bad(err, "store", "'store': true is not supported: this server keeps no responses (send false)");
    }
    v = cJSON_GetObjectItemCaseSensitive(root, "background");
    if (!absent(v) && !cJSON_IsFalse(v))
        return srv_oai_bad(err, "background", "'background' must be false: responses are not stored to be polled");
    v = cJSON_GetObjectItemCaseSensitive(root, "stream");
    if (!absent(v)) {
        if (!cJSON_IsBool(v)) return srv_oai_bad(err, "stream", "'stream' must be a boolean");
        cJSON_AddBoolToObject(chat, "stream", cJSON_IsTrue(v));
    }
    v = cJSON_GetObjectItemCaseSensitive(root, "max_output_tokens");
    if (!absent(v)) {
        if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || !isfinite(v->valuedouble))
            return srv_oai_bad(err, "max_output_tokens", "'max_output_tokens' must be an integer");
        if (v->valuedouble < 1 || v->valuedouble > 1e15)
            return srv_oai_bad(err, "max_output_tokens", "'max_output_tokens' must be at least 1 (got %g)", v->valuedouble);
        cJSON_AddNumberToObject(chat, "max_tokens", v->valuedouble);
        echo->max_output_tokens = (int64_t)v->valuedouble;
    }
    int st;
    if ((st = num(root, chat, "temperature", 0, 2, &echo->temperature, err))) return st;
    if ((st = num(root, chat, "top_p", 0, 1, &echo->top_p, err))) return st;
    v = cJSON_GetObjectItemCaseSensitive(root, "ignore_eos"); /* moed extension, as on the other endpoints */
    if (!absent(v)) {
        if (!cJSON_IsBool(v)) return srv_oai_bad(err, "ignore_eos", "'ignore_eos' must be a boolean");
        cJSON_AddBoolToObject(chat, "ignore_eos", cJSON_IsTrue(v));
    }
    v = cJSON_GetObjectItemCaseSensitive(root, "metadata");
    if (!absent(v)) {
        if (!cJSON_IsObject(v)) return srv_oai_bad(err, "metadata", "'metadata' must be an object");
        if (!(echo->metadata = cJSON_PrintUnformatted(v))) return MOE_ENOMEM;
    }
    v = cJSON_GetObjectItemCaseSensitive(root, "text");
    if (!absent(v)) {
        if (!cJSON_IsObject(v)) return srv_oai_bad(err, "text", "'text' must be an object");
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(v, "format");
        if (!absent(f)) {
            const cJSON *t = cJSON_GetObjectItemCaseSensitive(f, "type");
            if (!cJSON_IsString(t)) return srv_oai_bad(err, "text.format.type", "'text.format.type' must be a string");
            if (strcmp(t->valuestring, "text"))
                return srv_oai_bad(err, "text.format",
                           "'text.format' type '%.40s' is not supported: structured output needs grammar-constrained "
                           "sampling, which this server does not have yet (only {\"type\": \"text\"})",
                           t->valuestring);
        }
    }
    v = cJSON_GetObjectItemCaseSensitive(root, "tools");
    if (!absent(v) && !(cJSON_IsArray(v) && !v->child))
        return srv_oai_bad(err, "tools", "'tools' (tool calling) is not supported by this server yet");
    v = cJSON_GetObjectItemCaseSensitive(root, "tool_choice");
    if (!absent(v) && !(cJSON_IsString(v) && (!strcmp(v->valuestring, "none") || !strcmp(v->valuestring, "auto"))))
        return srv_oai_bad(err, "tool_choice", "'tool_choice' must be \"none\" or \"auto\" (no tool calling yet)");

    cJSON *msgs = cJSON_AddArrayToObject(chat, "messages");
    v = cJSON_GetObjectItemCaseSensitive(root, "instructions");
    if (!absent(v)) {
        if (!cJSON_IsString(v)) return srv_oai_bad(err, "instructions", "'instructions' must be a string");
        cJSON *m = cJSON_CreateObject();
        cJSON_AddItemToArray(msgs, m);
        cJSON_AddStringToObject(m, "role", "system");
        cJSON_AddStringToObject(m, "content", v->valuestring);
        if (!(echo->instructions = strdup(v->valuestring))) return MOE_ENOMEM;
    }
    v = cJSON_GetObjectItemCaseSensitive(root, "input");
    if (absent(v)) return srv_oai_bad(err, "input", "'input' is required");
    return input_items(v, msgs, err);
}

int srv_resp_parse(const char *body, size_t len, const srv_oai_limits *lim, srv_oai_req *out, srv_resp_echo *echo,
                   srv_oai_err *err) {
    memset(out, 0, sizeof *out);
    out->kind = SRV_OAI_CHAT;
    memset(echo, 0, sizeof *echo);
    echo->max_output_tokens = -1;
    echo->temperature = 1;
    echo->top_p = 1;
    int st = 0;
    cJSON *root = srv_oai_parse_object(body, len, lim->max_depth, err, &st);
    if (!root) return st;
    cJSON *chat = cJSON_CreateObject();
    st = chat ? translate(root, chat, echo, err) : MOE_ENOMEM;
    cJSON_Delete(root);
    char *text = st ? NULL : cJSON_PrintUnformatted(chat);
    cJSON_Delete(chat);
    if (!st && !text) st = MOE_ENOMEM;
    if (!st) {
        st = srv_oai_parse(SRV_OAI_CHAT, text, strlen(text), lim, out, err);
        /* The chat request's names for what the Responses body calls otherwise. */
        if (st && !strcmp(err->param, "max_tokens")) {
            snprintf(err->param, sizeof err->param, "max_output_tokens");
            char *m = strstr(err->message, "max_tokens");
            if (m) {
                char rest[sizeof err->message];
                snprintf(rest, sizeof rest, "%s", m + 10);
                snprintf(m, sizeof err->message - (size_t)(m - err->message), "max_output_tokens%s", rest);
            }
        }
        if (st && !strncmp(err->param, "messages", 8)) snprintf(err->param, sizeof err->param, "input");
    }
    free(text);
    if (st == MOE_ENOMEM) srv_oai_err_set(err, 500, NULL, "out of memory");
    if (st) srv_resp_echo_free(echo);
    return st;
}

/* --- output --- */

static char *print(cJSON *o) {
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    return s;
}

static void add_text(cJSON *o, const char *key, const char *text, size_t len) {
    char *c = moe_utf8_clean(text ? text : "", text ? len : 0);
    cJSON_AddStringToObject(o, key, c ? c : "");
    free(c);
}

static cJSON *text_part(const char *text, size_t len) {
    cJSON *p = cJSON_CreateObject();
    cJSON_AddStringToObject(p, "type", "output_text");
    add_text(p, "text", text, len);
    cJSON_AddArrayToObject(p, "annotations");
    cJSON_AddArrayToObject(p, "logprobs");
    return p;
}

static cJSON *message_item(const srv_resp_ctx *c, const char *status, const char *text, size_t len) {
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", c->item_id);
    cJSON_AddStringToObject(m, "type", "message");
    cJSON_AddStringToObject(m, "status", status);
    cJSON_AddStringToObject(m, "role", "assistant");
    cJSON *content = cJSON_AddArrayToObject(m, "content");
    if (text) cJSON_AddItemToArray(content, text_part(text, len));
    return m;
}

/* status: "in_progress" (no output yet, usage null), "completed", "incomplete". */
static cJSON *response_object(const srv_resp_ctx *c, const char *status, const char *text, size_t len, int64_t in,
                              int64_t out) {
    const srv_resp_echo *e = c->echo;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", c->id);
    cJSON_AddStringToObject(o, "object", "response");
    cJSON_AddNumberToObject(o, "created_at", (double)c->created_at);
    cJSON_AddStringToObject(o, "status", status);
    cJSON_AddNullToObject(o, "error");
    if (!strcmp(status, "incomplete")) {
        cJSON *d = cJSON_AddObjectToObject(o, "incomplete_details");
        cJSON_AddStringToObject(d, "reason", "max_output_tokens");
    } else cJSON_AddNullToObject(o, "incomplete_details");
    if (e && e->instructions) add_text(o, "instructions", e->instructions, strlen(e->instructions));
    else cJSON_AddNullToObject(o, "instructions");
    if (e && e->max_output_tokens >= 0) cJSON_AddNumberToObject(o, "max_output_tokens", (double)e->max_output_tokens);
    else cJSON_AddNullToObject(o, "max_output_tokens");
    cJSON_AddStringToObject(o, "model", c->model);
    cJSON *output = cJSON_AddArrayToObject(o, "output");
    bool done = strcmp(status, "in_progress") != 0;
    if (done) cJSON_AddItemToArray(output, message_item(c, status, text, len));
    cJSON_AddBoolToObject(o, "parallel_tool_calls", false);
    cJSON_AddNullToObject(o, "previous_response_id");
    cJSON *r = cJSON_AddObjectToObject(o, "reasoning");
    cJSON_AddNullToObject(r, "effort");
    cJSON_AddNullToObject(r, "summary");
    cJSON_AddBoolToObject(o, "store", false);
    cJSON_AddNumberToObject(o, "temperature", e ? e->temperature : 1);
    cJSON *t = cJSON_AddObjectToObject(o, "text");
    cJSON_AddStringToObject(cJSON_AddObjectToObject(t, "format"), "type", "text");
    cJSON_AddStringToObject(o, "tool_choice", "none");
    cJSON_AddArrayToObject(o, "tools");
    cJSON_AddNumberToObject(o, "top_p", e ? e->top_p : 1);
    cJSON_AddStringToObject(o, "truncation", "disabled");
    if (done) {
        cJSON *u = cJSON_AddObjectToObject(o, "usage");
        cJSON_AddNumberToObject(u, "input_tokens", (double)in);
        cJSON_AddNumberToObject(cJSON_AddObjectToObject(u, "input_tokens_details"), "cached_tokens", 0);
        cJSON_AddNumberToObject(u, "output_tokens", (double)out);
        cJSON_AddNumberToObject(cJSON_AddObjectToObject(u, "output_tokens_details"), "reasoning_tokens", 0);
        cJSON_AddNumberToObject(u, "total_tokens", (double)(in + out));
    } else cJSON_AddNullToObject(o, "usage");
    cJSON *md = e && e->metadata ? cJSON_Parse(e->metadata) : NULL;
    cJSON_AddItemToObject(o, "metadata", md ? md : cJSON_CreateObject());
    return o;
}

static const char *final_status(moe_finish f) { return f == MOE_FINISH_LENGTH ? "incomplete" : "completed"; }

char *srv_resp_render(const srv_resp_ctx *c, const char *text, size_t len, moe_finish finish, int64_t input_tokens,
                      int64_t output_tokens) {
    return print(response_object(c, final_status(finish), text, len, input_tokens, output_tokens));
}

/* The fields that place an event in the output message's only text part. */
static cJSON *part_event(const srv_resp_ctx *c, const char *type) {
    cJSON *o = srv_sse_typed(type);
    cJSON_AddStringToObject(o, "item_id", c->item_id);
    cJSON_AddNumberToObject(o, "output_index", 0);
    cJSON_AddNumberToObject(o, "content_index", 0);
    return o;
}

char *srv_resp_sse_start(const srv_resp_ctx *c, int64_t *seq) {
    cJSON *ev[4];
    ev[0] = srv_sse_typed("response.created");
    cJSON_AddItemToObject(ev[0], "response", response_object(c, "in_progress", NULL, 0, 0, 0));
    ev[1] = srv_sse_typed("response.in_progress");
    cJSON_AddItemToObject(ev[1], "response", response_object(c, "in_progress", NULL, 0, 0, 0));
    ev[2] = srv_sse_typed("response.output_item.added");
    cJSON_AddNumberToObject(ev[2], "output_index", 0);
    cJSON_AddItemToObject(ev[2], "item", message_item(c, "in_progress", NULL, 0));
    ev[3] = part_event(c, "response.content_part.added");
    cJSON_AddItemToObject(ev[3], "part", text_part("", 0));
    return srv_sse_events(ev, 4, seq);
}

char *srv_resp_sse_delta(const srv_resp_ctx *c, int64_t *seq, const char *text, size_t len) {
    cJSON *ev = part_event(c, "response.output_text.delta");
    add_text(ev, "delta", text, len);
    cJSON_AddArrayToObject(ev, "logprobs");
    return srv_sse_events(&ev, 1, seq);
}

char *srv_resp_sse_end(const srv_resp_ctx *c, int64_t *seq, const char *text, size_t len, moe_finish finish,
                       int64_t input_tokens, int64_t output_tokens) {
    const char *status = final_status(finish);
    cJSON *ev[4];
    ev[0] = part_event(c, "response.output_text.done");
    add_text(ev[0], "text", text, len);
    cJSON_AddArrayToObject(ev[0], "logprobs");
    ev[1] = part_event(c, "response.content_part.done");
    cJSON_AddItemToObject(ev[1], "part", text_part(text, len));
    ev[2] = srv_sse_typed("response.output_item.done");
    cJSON_AddNumberToObject(ev[2], "output_index", 0);
    cJSON_AddItemToObject(ev[2], "item", message_item(c, status, text, len));
    ev[3] = srv_sse_typed(!strcmp(status, "completed") ? "response.completed" : "response.incomplete");
    cJSON_AddItemToObject(ev[3], "response", response_object(c, status, text, len, input_tokens, output_tokens));
    return srv_sse_events(ev, 4, seq);
}

char *srv_resp_sse_error(int64_t *seq, const srv_oai_err *e) {
    cJSON *ev = srv_sse_typed("error");
    if (e->code[0]) cJSON_AddStringToObject(ev, "code", e->code);
    else cJSON_AddNullToObject(ev, "code");
    char *m = moe_utf8_clean(e->message, strlen(e->message));
    cJSON_AddStringToObject(ev, "message", m ? m : "");
    free(m);
    if (e->param[0]) cJSON_AddStringToObject(ev, "param", e->param);
    else cJSON_AddNullToObject(ev, "param");
    return srv_sse_events(&ev, 1, seq);
}
