/* endpoints.c - responses (bodies, errors, the headers every answer
 * carries) and the endpoints other than generation: /v1/models, /health,
 * /metrics, /tokenize and /detokenize.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "anthropic.h"
#include "serve_internal.h"
#include "utf8.h"

/* Errors on these paths come in Anthropic's shape. */
bool srv__path_is_anthropic(const char *path) {
    return !strcmp(path, "/v1/messages") || !strcmp(path, "/v1/messages/count_tokens");
}

/* The connection's X-Request-Id: the client's (checked from the head),
 * the generation's id, or a fresh one. */
void srv__conn_request_id(server *s, srv_conn *c) {
    if (c->req_id[0]) return;
    if (c->gen) snprintf(c->req_id, sizeof c->req_id, "%s", c->gen->id);
    else srv__make_id(s, "req-", c->req_id, sizeof c->req_id);
}

void srv__add_cors(server *s, struct MHD_Connection *conn, struct MHD_Response *r, bool preflight) {
    if (!s->cfg->n_cors_origins) return;
    const char *origin = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Origin");
    if (!origin) return;
    bool any = false, ok = false;
    for (size_t i = 0; i < s->cfg->n_cors_origins; i++) {
        if (!strcmp(s->cfg->cors_origins[i], "*")) any = true;
        else if (!strcmp(s->cfg->cors_origins[i], origin)) ok = true;
    }
    if (!ok && !any) return;
    MHD_add_response_header(r, "Access-Control-Allow-Origin", ok ? origin : "*");
    if (ok) MHD_add_response_header(r, "Vary", "Origin");
    if (preflight) {
        MHD_add_response_header(r, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
        const char *req_h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Access-Control-Request-Headers");
        MHD_add_response_header(r, "Access-Control-Allow-Headers", req_h ? req_h : "Authorization, Content-Type");
        MHD_add_response_header(r, "Access-Control-Max-Age", "600");
    }
}

/* Queues body (malloc'd, taken) with status. */
enum MHD_Result srv__respond(server *s, srv_conn *c, struct MHD_Connection *conn, int status, const char *ctype,
                             char *body, size_t len, const char *retry_after) {
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body ? body : (char *)"",
                                                             body ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    if (ctype) MHD_add_response_header(r, "Content-Type", ctype);
    if (retry_after) MHD_add_response_header(r, "Retry-After", retry_after);
    if (c->close) MHD_add_response_header(r, "Connection", "close");
    srv__conn_request_id(s, c);
    MHD_add_response_header(r, "X-Request-Id", c->req_id);
    srv__add_cors(s, conn, r, false);
    c->status = status;
    enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

enum MHD_Result srv__respond_json(server *s, srv_conn *c, struct MHD_Connection *conn, int status, cJSON *o) {
    char *body = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!body) return MHD_NO;
    return srv__respond(s, c, conn, status, "application/json", body, strlen(body), NULL);
}

enum MHD_Result srv__respond_err(server *s, srv_conn *c, struct MHD_Connection *conn, const srv_oai_err *e) {
    char *body = srv__path_is_anthropic(c->path) ? srv_anth_err_json(e) : srv_oai_err_json(e);
    /* The Messages API's own messages already start with the field. */
    bool named = e->param[0] && strncmp(e->message, e->param, strlen(e->param));
    snprintf(c->err, sizeof c->err, "%s%s%s", named ? e->param : "", named ? ": " : "", e->message);
    if (!body) return MHD_NO;
    const char *retry = e->http == 429 || e->http == 503 ? "1" : NULL;
    return srv__respond(s, c, conn, e->http, "application/json", body, strlen(body), retry);
}

enum MHD_Result srv__respond_errf(server *s, srv_conn *c, struct MHD_Connection *conn, int http, const char *param,
                                  const char *code, const char *msg) {
    srv_oai_err e;
    srv_oai_err_set(&e, http, param, "%s", msg);
    if (code) snprintf(e.code, sizeof e.code, "%s", code);
    return srv__respond_err(s, c, conn, &e);
}

static cJSON *model_object(server *s) {
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", s->model_name);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double)s->started_unix);
    cJSON_AddStringToObject(m, "owned_by", "moed");
    if (s->ready) {
        cJSON_AddNumberToObject(m, "max_model_len", (double)s->info.ctx_size);
        if (s->info.arch) cJSON_AddStringToObject(m, "arch", s->info.arch);
    }
    return m;
}

enum MHD_Result srv__handle_models(server *s, srv_conn *c, struct MHD_Connection *conn, const char *id) {
    if (id) {
        bool known = !strcmp(id, s->model_name) || (s->model_file_id && !strcmp(id, s->model_file_id));
        for (size_t i = 0; !known && i < s->n_model_ids; i++) known = !strcmp(id, s->model_ids[i]);
        if (!known) return srv__respond_errf(s, c, conn, 404, "model", "model_not_found", "The model does not exist");
        return srv__respond_json(s, c, conn, 200, model_object(s));
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON *d = cJSON_AddArrayToObject(o, "data");
    cJSON_AddItemToArray(d, model_object(s));
    return srv__respond_json(s, c, conn, 200, o);
}

const char *srv__health_state(server *s, bool *ok) {
    *ok = false;
    if (s->draining || !s->eng) return "draining";
    moe_engine_stats st;
    moe_engine_get_stats(s->eng, &st);
    switch (st.state) {
    case MOE_ENGINE_LOADING: return "loading";
    case MOE_ENGINE_FAILED: return "failed";
    case MOE_ENGINE_DRAINING: return "draining";
    case MOE_ENGINE_STOPPED: return "stopped";
    case MOE_ENGINE_READY: break;
    }
    uint64_t now = moe_now_ns();
    if (st.heartbeat_ns && now > st.heartbeat_ns && srv__ns_to_s(now - st.heartbeat_ns) > s->cfg->heartbeat_timeout)
        return "unresponsive";
    if (!s->ready) return "loading";
    *ok = true;
    return "ok";
}

enum MHD_Result srv__handle_health(server *s, srv_conn *c, struct MHD_Connection *conn) {
    bool ok;
    const char *state = srv__health_state(s, &ok);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "status", state);
    if (!ok && !strcmp(state, "failed")) cJSON_AddStringToObject(o, "error", moe_engine_error(s->eng));
    char *body = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!body) return MHD_NO;
    return srv__respond(s, c, conn, ok ? 200 : 503, "application/json", body, strlen(body), ok ? NULL : "1");
}

enum MHD_Result srv__handle_metrics(server *s, srv_conn *c, struct MHD_Connection *conn) {
    moe_engine_stats st;
    memset(&st, 0, sizeof st);
    if (s->eng) moe_engine_get_stats(s->eng, &st);
    if (s->http) {
        srv_http_stats hs;
        srv_http_get_stats(s->http, &hs);
        s->metrics.http_connections = srv_http_connections(s->http);
        s->metrics.http_closed_header_timeout = hs.header_timeouts;
        s->metrics.http_closed_body_timeout = hs.body_timeouts;
        s->metrics.http_closed_idle_timeout = hs.idle_timeouts;
        s->metrics.http_closed_evicted = hs.evicted;
    }
    size_t len;
    char *body = srv_metrics_render(&s->metrics, &st, s->model_name, &len);
    if (!body) return MHD_NO;
    return srv__respond(s, c, conn, 200, "text/plain; version=0.0.4; charset=utf-8", body, len, NULL);
}

static cJSON *parse_body_object(server *s, const char *body, size_t len, srv_oai_err *e) {
    if (srv_oai_precheck(body, len, (int)s->cfg->max_json_depth, e)) return NULL;
    cJSON *o = len ? cJSON_ParseWithLength(body, len) : NULL;
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        srv_oai_err_set(e, 400, NULL, "request body must be a JSON object");
        return NULL;
    }
    return o;
}

static char *print_json(cJSON *o) {
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

/* {"content": str, "add_special"?, "parse_special"?} -> {"tokens": [...]}.
 * Returns the body, or NULL with e filled. Any thread. */
char *srv__tokenize_body(server *s, const char *body, size_t len, srv_oai_err *e) {
    cJSON *o = parse_body_object(s, body, len, e);
    if (!o) return NULL;
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(o, "content");
    const cJSON *add = cJSON_GetObjectItemCaseSensitive(o, "add_special");
    const cJSON *parse = cJSON_GetObjectItemCaseSensitive(o, "parse_special");
    char *out = NULL;
    if (!cJSON_IsString(content)) {
        srv_oai_err_set(e, 400, "content", "'content' must be a string");
    } else if ((add && !cJSON_IsBool(add)) || (parse && !cJSON_IsBool(parse))) {
        const char *p = add && !cJSON_IsBool(add) ? "add_special" : "parse_special";
        srv_oai_err_set(e, 400, p, "'%s' must be a boolean", p);
    } else {
        int32_t *ids = NULL;
        size_t n = 0;
        /* as a completion prompt is tokenized: parse_special false is the
         * plain text of chat content */
        moe_tok_seg all = {strlen(content->valuestring), parse ? cJSON_IsTrue(parse) : true};
        int st = moe_tok_encode_segs(s->info.tok, content->valuestring, all.len, &all, 1,
                                     add ? cJSON_IsTrue(add) : false, &ids, &n);
        if (st) {
            srv_oai_err_set(e, 500, NULL, "%s", moe_strerror(st));
        } else {
            cJSON *r = cJSON_CreateObject(), *a = cJSON_AddArrayToObject(r, "tokens");
            for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(ids[i]));
            if (!(out = print_json(r))) srv_oai_err_set(e, 500, NULL, "out of memory");
        }
        free(ids);
    }
    cJSON_Delete(o);
    return out;
}

/* {"tokens": [...]} -> {"content": str}. As srv__tokenize_body. */
char *srv__detokenize_body(server *s, const char *body, size_t len, srv_oai_err *e) {
    cJSON *o = parse_body_object(s, body, len, e);
    if (!o) return NULL;
    const cJSON *toks = cJSON_GetObjectItemCaseSensitive(o, "tokens");
    char *out = NULL;
    int32_t *ids = NULL;
    if (!cJSON_IsArray(toks)) {
        srv_oai_err_set(e, 400, "tokens", "'tokens' must be an array of token ids");
        goto done;
    }
    int n = cJSON_GetArraySize(toks), k = 0;
    if (!(ids = malloc(((size_t)n + 1) * sizeof *ids))) {
        srv_oai_err_set(e, 500, NULL, "out of memory");
        goto done;
    }
    for (const cJSON *x = toks->child; x; x = x->next, k++) {
        if (!cJSON_IsNumber(x) || x->valuedouble != floor(x->valuedouble) || x->valuedouble < 0 ||
            x->valuedouble >= (double)s->info.n_vocab) {
            srv_oai_err_set(e, 400, "tokens", "'tokens[%d]' is not a token id in [0, %lld)", k,
                            (long long)s->info.n_vocab);
            goto done;
        }
        ids[k] = (int32_t)x->valuedouble;
    }
    char *text = NULL;
    size_t tl = 0;
    int st = moe_tok_decode(s->info.tok, ids, (size_t)k, false, &text, &tl);
    if (st) {
        srv_oai_err_set(e, 500, NULL, "%s", moe_strerror(st));
        goto done;
    }
    char *clean = moe_utf8_clean(text, tl);
    free(text);
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "content", clean ? clean : "");
    free(clean);
    if (!(out = print_json(r))) srv_oai_err_set(e, 500, NULL, "out of memory");
done:
    free(ids);
    cJSON_Delete(o);
    return out;
}
