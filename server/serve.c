/* serve.c - `moed serve`: the OpenAI-compatible HTTP server's routing
 * and lifecycle.
 *
 * One thread runs a libuv loop that drives libmicrohttpd (server/http.c).
 * Requests are routed here; generation requests are parsed, validated,
 * rendered and tokenized (server/openai.c) on libuv's thread pool while
 * their connection is suspended, then handed to gen.c, which submits them
 * to the engine from the loop. endpoints.c answers the rest. The lifecycle
 * (startup, signals, drain, timeouts, shutdown) is at the end of this file.
 */
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <cJSON.h>

#include "cli.h"
#include "anthropic.h"
#include "config.h"
#include "fault.h"
#include "engine.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "notify.h"
#include "openai.h"
#include "responses.h"
#include "rng.h"
#include "status.h"
#include "serve_internal.h"

static char *model_id_from_path(const char *path) {
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    size_t n = strlen(b);
    if (n > 5 && !strcasecmp(b + n - 5, ".gguf")) n -= 5;
    return strndup(b, n);
}

const char *srv__make_id(server *s, const char *prefix, char *buf, size_t n) {
    uint64_t st = s->id_base + s->id_next++;
    uint64_t x = moe_splitmix64(&st);
    snprintf(buf, n, "%s%016" PRIx64 "%08" PRIx64, prefix, x, s->id_next);
    return buf;
}

static void fill_limits(server *s, srv_oai_limits *lim) {
    memset(lim, 0, sizeof *lim);
    lim->model_name = s->model_name;
    lim->model_alt = s->model_file_id;
    lim->model_aliases = s->model_ids;
    lim->n_model_aliases = s->n_model_ids;
    lim->n_vocab = s->info.n_vocab;
    lim->ctx_size = s->info.ctx_size;
    lim->max_seqs = s->info.max_seqs;
    lim->max_depth = (int)s->cfg->max_json_depth;
    lim->tok = s->info.tok;
    lim->chat = s->info.chat;
    lim->chat_parse_special = s->cfg->chat_parse_special;
}

static bool key_ok(server *s, const char *h) {
    size_t hl = strlen(h);
    bool ok = false;
    for (size_t i = 0; i < s->cfg->n_api_keys; i++) {
        const char *k = s->cfg->api_keys[i];
        size_t kl = strlen(k);
        /* constant time in the key's length */
        unsigned char diff = (unsigned char)(kl != hl);
        for (size_t j = 0; j < kl; j++) diff |= (unsigned char)(k[j] ^ (j < hl ? h[j] : 0));
        ok |= !diff;
    }
    return ok;
}

/* "Authorization: Bearer KEY" (OpenAI) or "x-api-key: KEY" (Anthropic);
 * either is accepted on every endpoint. */
static bool auth_ok(server *s, struct MHD_Connection *conn) {
    if (!s->cfg->n_api_keys) return true;
    const char *x = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "x-api-key");
    if (x && key_ok(s, x)) return true;
    const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7)) return false;
    h += 7;
    while (*h == ' ') h++;
    return key_ok(s, h);
}

typedef enum {
    R_NONE,
    R_CHAT,
    R_COMPL,
    R_MODELS,
    R_MODEL,
    R_HEALTH,
    R_METRICS,
    R_TOKENIZE,
    R_DETOKENIZE,
    R_MESSAGES,
    R_COUNT_TOKENS,
    R_RESPONSES
} route;

static route find_route(const char *url, const char **arg) {
    *arg = NULL;
    if (!strcmp(url, "/v1/chat/completions")) return R_CHAT;
    if (!strcmp(url, "/v1/completions")) return R_COMPL;
    if (!strcmp(url, "/v1/messages")) return R_MESSAGES;
    if (!strcmp(url, "/v1/messages/count_tokens")) return R_COUNT_TOKENS;
    if (!strcmp(url, "/v1/responses")) return R_RESPONSES;
    if (!strcmp(url, "/v1/models")) return R_MODELS;
    if (!strncmp(url, "/v1/models/", 11) && url[11]) {
        *arg = url + 11;
        return R_MODEL;
    }
    if (!strcmp(url, "/health") || !strcmp(url, "/v1/health")) return R_HEALTH;
    if (!strcmp(url, "/metrics")) return R_METRICS;
    if (!strcmp(url, "/tokenize")) return R_TOKENIZE;
    if (!strcmp(url, "/detokenize")) return R_DETOKENIZE;
    return R_NONE;
}

/* Parsing, chat rendering and tokenizing take about a second per MB of
 * prompt on a busy core: they run on libuv's thread pool while the
 * connection is suspended, so other streams keep flowing meanwhile. */
typedef struct srv_work {
    uv_work_t req;
    server *s;
    srv_conn *c; /* NULL once the connection is gone */
    struct MHD_Connection *conn;
    route r;
    char *in;   /* the request body, taken from the connection */
    size_t in_len;
    srv_oai_req parsed;
    srv_resp_echo echo;
    srv_oai_err err;
    int rc;
    char *body; /* tokenize / detokenize answer */
    bool done;
} srv_work;

static srv_oai_kind route_kind(route r) { return r == R_CHAT ? SRV_OAI_CHAT : SRV_OAI_COMPLETION; }

/* Thread pool: reads only the request body and immutable engine info. */
static void work_cb(uv_work_t *req) {
    srv_work *w = req->data;
    server *s = w->s;
    const char *body = w->in ? w->in : "";
    size_t len = w->in_len;
    srv_oai_limits lim;
    fill_limits(s, &lim);
    if (w->r == R_TOKENIZE) w->body = srv__tokenize_body(s, body, len, &w->err);
    else if (w->r == R_DETOKENIZE) w->body = srv__detokenize_body(s, body, len, &w->err);
    else if (w->r == R_MESSAGES) w->rc = srv_anth_parse(body, len, &lim, false, &w->parsed, &w->err);
    else if (w->r == R_COUNT_TOKENS) {
        if (!(w->rc = srv_anth_parse(body, len, &lim, true, &w->parsed, &w->err))) {
            if (!(w->body = srv_anth_render_count(w->parsed.prompts[0].n))) srv_oai_err_set(&w->err, 500, NULL, "out of memory");
            srv_oai_req_free(&w->parsed);
        }
    } else if (w->r == R_RESPONSES) w->rc = srv_resp_parse(body, len, &lim, &w->parsed, &w->echo, &w->err);
    else w->rc = srv_oai_parse(route_kind(w->r), body, len, &lim, &w->parsed, &w->err);
}

static void shutdown_server(server *s);

static void after_work_cb(uv_work_t *req, int status) {
    (void)status;
    srv_work *w = req->data;
    server *s = w->s;
    s->n_work--;
    w->done = true;
    free(w->in);
    w->in = NULL;
    if (!w->c) {
        srv_oai_req_free(&w->parsed);
        srv_resp_echo_free(&w->echo);
        free(w->body);
        free(w);
    } else {
        MHD_resume_connection(w->conn);
        if (s->http) srv_http_kick(s->http);
    }
    if (!s->n_work && s->shutdown_pending) shutdown_server(s);
}

static enum MHD_Result start_work(server *s, srv_conn *c, struct MHD_Connection *conn, route r) {
    srv_work *w = calloc(1, sizeof *w);
    if (!w) return srv__respond_errf(s, c, conn, 503, NULL, "out_of_memory", "out of memory");
    w->s = s;
    w->c = c;
    w->conn = conn;
    w->r = r;
    w->req.data = w;
    w->in = c->body;
    w->in_len = c->len;
    if (uv_queue_work(s->loop, &w->req, work_cb, after_work_cb)) {
        free(w);
        return srv__respond_errf(s, c, conn, 503, NULL, "server_busy", "cannot queue the request");
    }
    c->body = NULL;
    c->len = c->cap = 0;
    c->work = w;
    c->state = SRV_CONN_PARSING;
    s->n_work++;
    MHD_suspend_connection(conn);
    return MHD_YES;
}

/* The handler is called again once the job resumed the connection. */
static enum MHD_Result finish_work(server *s, srv_conn *c, struct MHD_Connection *conn) {
    srv_work *w = c->work;
    if (!w->done) { /* spurious: wait on */
        MHD_suspend_connection(conn);
        return MHD_YES;
    }
    c->work = NULL;
    c->state = SRV_CONN_ANSWERED;
    enum MHD_Result ret;
    if (w->r == R_TOKENIZE || w->r == R_DETOKENIZE || (w->r == R_COUNT_TOKENS && !w->rc)) {
        if (w->body) ret = srv__respond(s, c, conn, 200, "application/json", w->body, strlen(w->body), NULL);
        else ret = srv__respond_err(s, c, conn, &w->err);
    } else if (w->rc) {
        ret = srv__respond_err(s, c, conn, &w->err);
    } else {
        srv_api api = w->r == R_MESSAGES ? API_ANTHROPIC : w->r == R_RESPONSES ? API_RESPONSES : API_OPENAI;
        ret = srv__gen_start(s, c, conn, route_kind(w->r), api, &w->parsed, &w->echo);
    }
    free(w);
    return ret;
}

static enum MHD_Result respond_unauthorized(server *s, srv_conn *c, struct MHD_Connection *conn) {
    srv_oai_err e;
    srv_oai_err_set(&e, 401, NULL, "Incorrect API key provided (Authorization: Bearer KEY or x-api-key: KEY)");
    snprintf(e.code, sizeof e.code, "invalid_api_key");
    return srv__respond_err(s, c, conn, &e);
}

static bool route_is_post(route r) {
    return r == R_CHAT || r == R_COMPL || r == R_TOKENIZE || r == R_DETOKENIZE || r == R_MESSAGES ||
           r == R_COUNT_TOKENS || r == R_RESPONSES;
}

/* Whether the request reaches the key check in dispatch (the same order:
 * OPTIONS, 404 and 405 come first; /health and /metrics need no key). */
static bool needs_key(const char *url, const char *method) {
    const char *arg;
    route r = find_route(url, &arg);
    if (r == R_NONE || r == R_HEALTH || r == R_METRICS) return false;
    if (route_is_post(r)) return !strcmp(method, "POST");
    return !strcmp(method, "GET") || !strcmp(method, "HEAD");
}

static enum MHD_Result dispatch(server *s, srv_conn *c, struct MHD_Connection *conn, const char *url,
                                const char *method) {
    const char *arg;
    route r = find_route(url, &arg);
    if (!strcmp(method, "OPTIONS")) {
        struct MHD_Response *resp = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
        MHD_add_response_header(resp, "Allow", "GET, POST, OPTIONS");
        srv__conn_request_id(s, c);
        MHD_add_response_header(resp, "X-Request-Id", c->req_id);
        srv__add_cors(s, conn, resp, true);
        c->status = 204;
        enum MHD_Result ret = MHD_queue_response(conn, 204, resp);
        MHD_destroy_response(resp);
        return ret;
    }
    if (r == R_NONE) return srv__respond_errf(s, c, conn, 404, NULL, "not_found", "no such endpoint");
    bool post = route_is_post(r);
    bool head = !strcmp(method, "HEAD");
    if (post ? strcmp(method, "POST") : (strcmp(method, "GET") && !head)) {
        srv_oai_err e;
        srv_oai_err_set(&e, 405, NULL, "method %.16s is not allowed here; use %s", method, post ? "POST" : "GET");
        snprintf(e.code, sizeof e.code, "method_not_allowed");
        char *body = srv__path_is_anthropic(c->path) ? srv_anth_err_json(&e) : srv_oai_err_json(&e);
        if (!body) return MHD_NO;
        struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
        MHD_add_response_header(resp, "Allow", post ? "POST, OPTIONS" : "GET, HEAD, OPTIONS");
        MHD_add_response_header(resp, "Content-Type", "application/json");
        srv__conn_request_id(s, c);
        MHD_add_response_header(resp, "X-Request-Id", c->req_id);
        srv__add_cors(s, conn, resp, false);
        c->status = 405;
        enum MHD_Result ret = MHD_queue_response(conn, 405, resp);
        MHD_destroy_response(resp);
        return ret;
    }
    if (r == R_HEALTH) return srv__handle_health(s, c, conn);
    if (r == R_METRICS) return srv__handle_metrics(s, c, conn);
    if (!auth_ok(s, conn)) return respond_unauthorized(s, c, conn);
    if (c->too_large) {
        char msg[96];
        snprintf(msg, sizeof msg, "request body is larger than %lld bytes", (long long)s->cfg->max_body);
        return srv__respond_errf(s, c, conn, 413, NULL, "request_too_large", msg);
    }
    if (r == R_MODELS) return srv__handle_models(s, c, conn, NULL);
    if (r == R_MODEL) return srv__handle_models(s, c, conn, arg);
    if (s->draining)
        return srv__respond_errf(s, c, conn, 503, NULL, "server_shutdown", "the server is shutting down");
    if (!s->ready) {
        bool ok;
        const char *st = srv__health_state(s, &ok);
        char msg[96];
        snprintf(msg, sizeof msg, "the model is not ready (%s)", st);
        return srv__respond_errf(s, c, conn, 503, NULL, "model_not_ready", msg);
    }
    return start_work(s, c, conn, r);
}

static enum MHD_Result handler_cb(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_size, void **con_cls) {
    server *s = cls;
    srv_conn *c = *con_cls;
    if (!c) {
        c = calloc(1, sizeof *c);
        if (!c) return MHD_NO;
        c->t_start_ns = moe_now_ns();
        snprintf(c->method, sizeof c->method, "%s", method);
        snprintf(c->path, sizeof c->path, "%s", url);
        *con_cls = c;
        /* Everything decided by the head alone is answered before a body
         * byte is read: MHD then sends no 100 Continue and, when a body was
         * announced, discards it and closes the connection. */
        const char *framing = srv_http_head_error(conn, version);
        if (framing) {
            c->state = SRV_CONN_ANSWERED;
            c->close = true;
            return srv__respond_errf(s, c, conn, 400, NULL, "bad_request", framing);
        }
        /* A client's own id is echoed and logged, so it must be safe in a
         * header and a log line. */
        const char *rid = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Request-Id");
        if (rid) {
            size_t n = strlen(rid);
            bool ok = n > 0 && n < sizeof c->req_id;
            for (size_t i = 0; ok && i < n; i++) ok = rid[i] > 0x20 && rid[i] < 0x7f;
            if (!ok) {
                c->state = SRV_CONN_ANSWERED;
                return srv__respond_errf(s, c, conn, 400, NULL, "invalid_request_id",
                                    "the X-Request-Id header must be 1 to 128 printable ASCII characters without spaces");
            }
            memcpy(c->req_id, rid, n + 1);
        }
        if (needs_key(url, method) && !auth_ok(s, conn)) {
            c->state = SRV_CONN_ANSWERED;
            return respond_unauthorized(s, c, conn);
        }
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > (unsigned long long)s->cfg->max_body) {
            c->state = SRV_CONN_ANSWERED;
            char msg[96];
            snprintf(msg, sizeof msg, "request body is larger than %lld bytes", (long long)s->cfg->max_body);
            return srv__respond_errf(s, c, conn, 413, NULL, "request_too_large", msg);
        }
        return MHD_YES;
    }
    if (c->state == SRV_CONN_PARSING) return finish_work(s, c, conn);
    if (c->state == SRV_CONN_GENERATING) return srv__gen_answer(s, c, conn);
    if (*upload_size) {
        if (!c->too_large) {
            if (c->len + *upload_size > (size_t)s->cfg->max_body) {
                c->too_large = true;
                free(c->body);
                c->body = NULL;
                c->len = c->cap = 0;
            } else {
                if (c->len + *upload_size + 1 > c->cap) {
                    size_t cap = c->cap ? c->cap : 4096;
                    while (cap < c->len + *upload_size + 1) cap *= 2;
                    char *b = realloc(c->body, cap);
                    if (!b) return MHD_NO;
                    c->body = b;
                    c->cap = cap;
                }
                memcpy(c->body + c->len, upload_data, *upload_size);
                c->len += *upload_size;
                c->body[c->len] = 0;
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (c->state != SRV_CONN_READING) return MHD_YES;
    c->state = SRV_CONN_ANSWERED;
    return dispatch(s, c, conn, url, method);
}

static void completed_cb(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode toe) {
    (void)conn;
    server *s = cls;
    srv_conn *c = *con_cls;
    if (!c) return;
    *con_cls = NULL;
    if (c->work) c->work->c = NULL; /* the job frees itself */
    srv_gen *g = c->gen;
    int status = c->status ? c->status : 499; /* nginx's "client closed request" */
    srv_metrics_count_status(&s->metrics, status);
    srv_log_request lr = {.id = c->req_id[0] ? c->req_id : g ? g->id : "-",
                          .method = c->method,
                          .path = c->path,
                          .status = status,
                          .ttft_ms = -1,
                          .total_ms = (double)(moe_now_ns() - c->t_start_ns) * 1e-6,
                          .error = c->err[0] ? c->err : NULL};
    if (g) {
        g->conn = NULL;
        if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && g->state == SRV_GEN_RUNNING &&
            !(g->cancel & SRV_GEN_CLIENT_GONE)) {
            g->cancel |= SRV_GEN_CLIENT_GONE;
            s->metrics.requests_cancelled++;
            srv__gen_cancel(g);
        }
        lr.model = s->model_name;
        lr.stream = g->req.stream;
        lr.prompt_tokens = g->prompt_tokens;
        if (g->state == SRV_GEN_RUNNING)
            for (size_t i = 0; i < g->n_subs; i++) lr.prompt_tokens += g->req.prompts[i].n;
        lr.completion_tokens = g->state == SRV_GEN_FINISHED ? g->completion_tokens : g->tokens_seen;
        if (g->t_first_ns) lr.ttft_ms = (double)(g->t_first_ns - g->t_start_ns) * 1e-6;
        if (g->state == SRV_GEN_FINISHED) {
            lr.has_energy = g->ctx.has_energy;
            lr.energy_joules = g->ctx.energy_joules;
            lr.has_cost = g->ctx.has_cost;
            lr.cost_usd = g->ctx.cost_usd;
        }
        lr.finish = g->state == SRV_GEN_FINISHED ? srv__gen_finish_name(g) : "cancelled";
        /* A stream whose hang-up the tick saw first is finished (cancelled)
         * by now and its last write fails: that is the client leaving, not
         * a write error. */
        if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && toe != MHD_REQUEST_TERMINATED_CLIENT_ABORT &&
            g->state == SRV_GEN_FINISHED && !(g->cancel & SRV_GEN_CLIENT_GONE))
            lr.finish = "write_error";
    }
    bool quiet = !strcmp(c->path, "/health") || !strcmp(c->path, "/metrics");
    if (!quiet || srv_log_enabled(SRV_LOG_DEBUG) || status >= 400) srv_log_req(&lr);
    if (g) srv__gen_release(g);
    free(c->body);
    free(c);
}

static void close_walk_cb(uv_handle_t *h, void *arg) {
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

static void shutdown_server(server *s) {
    if (s->shutting_down) return;
    /* MHD must not stop while a job holds a suspended connection; the
     * last job to finish calls us again. */
    if (s->n_work) {
        s->shutdown_pending = true;
        return;
    }
    s->shutting_down = true;
    /* Every outstanding request gets its DONE here (cancelled at once), so
     * every generation finishes; MHD must not be stopped with suspended
     * connections. */
    if (s->eng) {
        for (srv_gen *g = s->gens; g; g = g->next)
            if (g->state == SRV_GEN_RUNNING) g->cancel |= SRV_GEN_DRAINED;
        moe_engine_destroy(s->eng, 0);
        s->eng = NULL;
    }
    srv__events_cb(&s->async);
    for (srv_gen *g = s->gens; g; g = g->next) srv__gen_resume(g);
    if (s->http) srv_http_kick(s->http);
    srv_http_stop(s->http);
    s->http = NULL;
    uv_walk(s->loop, close_walk_cb, NULL);
}

static void start_drain(server *s) {
    if (s->draining) {
        /* a second signal: stop waiting */
        srv_log(SRV_LOG_WARN, "second signal: cancelling %zu in-flight requests now", s->n_gens);
        s->drain_deadline_ns = moe_now_ns();
        return;
    }
    s->draining = true;
    srv_notify_stopping();
    srv_log(SRV_LOG_INFO, "draining: %zu requests in flight, up to %.1f s", s->n_gens, s->cfg->drain_timeout);
    if (s->http) srv_http_quiesce(s->http);
    if (s->eng) moe_engine_drain(s->eng);
    s->drain_deadline_ns = moe_now_ns() + (uint64_t)(s->cfg->drain_timeout * 1e9);
}

static void signal_cb(uv_signal_t *h, int signum) {
    server *s = h->data;
    srv_log(SRV_LOG_INFO, "received %s", signum == SIGINT ? "SIGINT" : "SIGTERM");
    start_drain(s);
}

/* SIGHUP: the live options again from the file, environment and flags;
 * a bad file keeps the current ones. There is no log file to reopen:
 * the log is stderr, which the service manager holds. */
static void hup_cb(uv_signal_t *h, int signum) {
    (void)signum;
    server *s = h->data;
    char changed[512], ignored[512], err[MOE_ERR_MAX];
    int st = srv_config_reload(s->cfg, s->argc, s->argv, NULL, changed, sizeof changed, ignored, sizeof ignored, err,
                               sizeof err);
    if (st) {
        srv_log(SRV_LOG_ERROR, "SIGHUP: reload failed, keeping the current settings: %s", err);
        return;
    }
    srv_log_setup(s->cfg->log_format, s->cfg->log_level, s->cfg->log_prompts);
    srv_log(SRV_LOG_INFO, "reloaded settings: %s", changed[0] ? changed : "none changed");
    if (ignored[0]) srv_log(SRV_LOG_WARN, "SIGHUP: changed settings that need a restart were not applied: %s", ignored);
}

static void on_ready(server *s) {
    if (moe_engine_get_info(s->eng, &s->info)) return;
    s->ready = true;
    if (s->info.model_id && strcmp(s->info.model_id, s->model_file_id)) {
        free(s->model_file_id);
        s->model_file_id = strdup(s->info.model_id);
    }
    char status[256];
    snprintf(status, sizeof status, "serving %s on %s:%d (%s, ctx %lld, %lld KV blocks)", s->model_name, s->cfg->host,
             srv_http_port(s->http), s->info.device ? s->info.device : "?", (long long)s->info.ctx_size,
             (long long)s->info.kv_blocks);
    srv_notify_ready(status);
    srv_log(SRV_LOG_INFO, "%s", status);
    if (!s->info.energy_source) srv_log(SRV_LOG_INFO, "energy: off (energy_source = off)");
    else if (!strcmp(s->info.energy_source, "estimate"))
        srv_log(SRV_LOG_INFO, "energy: estimate, not measured (%s): %g W busy, %g W idle (energy_busy_watts, "
                              "energy_idle_watts)",
                strcmp(s->cfg->energy_source, "estimate") ? "no NVML or readable RAPL counter" : "energy_source = estimate",
                s->cfg->energy_busy_watts, s->cfg->energy_idle_watts);
    else srv_log(SRV_LOG_INFO, "energy: measured by %s", s->info.energy_source);
}

/* True when the client of a suspended connection has hung up (FIN or
 * reset). MHD notices that only when it next writes, which for a
 * non-streamed answer is after the whole generation; this lets the tick
 * cancel it instead. Like vLLM and llama.cpp's server, a client that
 * half-closes its side counts as gone. */
static bool peer_closed(struct MHD_Connection *conn) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci || ci->connect_fd < 0) return false;
    struct pollfd p = {.fd = ci->connect_fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

static void tick_cb(uv_timer_t *t) {
    server *s = t->data;
    uint64_t now = moe_now_ns();
    if (!s->ready && !s->draining) {
        moe_engine_state st = moe_engine_get_state(s->eng);
        if (st == MOE_ENGINE_READY) on_ready(s);
        else if (st == MOE_ENGINE_FAILED) {
            srv_log(SRV_LOG_ERROR, "model load failed: %s", moe_engine_error(s->eng));
            srv_notify_status("model load failed: %s", moe_engine_error(s->eng));
            s->exit_code = 1;
            shutdown_server(s);
            return;
        }
    }
    /* clients gone while their request waits (suspended) */
    for (srv_gen *g = s->gens; g; g = g->next)
        if (g->state == SRV_GEN_RUNNING && !(g->cancel & SRV_GEN_CLIENT_GONE) && g->suspended && g->conn &&
            peer_closed(g->conn)) {
            g->cancel |= SRV_GEN_CLIENT_GONE;
            s->metrics.requests_cancelled++;
            srv__gen_cancel(g);
        }
    /* A stream that has said nothing for a while (queued behind others,
     * prefilling a long prompt) gets an SSE comment, so proxies and
     * clients with read timeouts do not give up on it. */
    if (s->cfg->sse_keepalive > 0)
        for (srv_gen *g = s->gens; g; g = g->next)
            if (g->req.stream && g->state == SRV_GEN_RUNNING && g->conn &&
                srv__ns_to_s(now - g->t_out_ns) >= s->cfg->sse_keepalive) {
                srv__sbuf_put(&g->out, ": keep-alive\n\n", 14);
                g->t_out_ns = now;
                srv__gen_resume(g);
                if (s->http) srv_http_kick(s->http);
            }
    /* request timeouts */
    if (s->cfg->request_timeout > 0)
        for (srv_gen *g = s->gens; g; g = g->next)
            if (g->state == SRV_GEN_RUNNING && !(g->cancel & SRV_GEN_TIMED_OUT) &&
                srv__ns_to_s(now - g->t_start_ns) > s->cfg->request_timeout) {
                g->cancel |= SRV_GEN_TIMED_OUT;
                s->metrics.requests_cancelled++;
                srv__gen_cancel(g);
            }
    if (s->draining) {
        if (!s->n_gens && !s->n_work) {
            srv_log(SRV_LOG_INFO, "drained; stopping");
            shutdown_server(s);
            return;
        }
        if (now >= s->drain_deadline_ns && !s->drain_cancelled) {
            s->drain_cancelled = true;
            srv_log(SRV_LOG_WARN, "drain timeout: ending %zu requests with an error", s->n_gens);
            for (srv_gen *g = s->gens; g; g = g->next)
                if (g->state == SRV_GEN_RUNNING) {
                    g->cancel |= SRV_GEN_DRAINED;
                    s->metrics.requests_cancelled++;
                    srv__gen_cancel(g);
                }
        }
        /* Clients that never read their last bytes do not hold the exit up. */
        if (now >= s->drain_deadline_ns + 5000000000ull) {
            srv_log(SRV_LOG_WARN, "drain: %zu connections still open; closing them", s->n_gens);
            shutdown_server(s);
        }
    }
}

static void watchdog_cb(uv_timer_t *t) {
    server *s = t->data;
    if (!s->eng) return;
    moe_engine_stats st;
    moe_engine_get_stats(s->eng, &st);
    uint64_t now = moe_now_ns();
    bool fresh = st.state != MOE_ENGINE_FAILED && st.state != MOE_ENGINE_STOPPED &&
                 (!st.heartbeat_ns || now < st.heartbeat_ns ||
                  srv__ns_to_s(now - st.heartbeat_ns) <= s->cfg->heartbeat_timeout);
    if (fresh) srv_notify_watchdog();
    else srv_log(SRV_LOG_WARN, "engine heartbeat is stale; not feeding the watchdog");
}

static void engine_status_cb(void *user, const char *status) {
    (void)user;
    srv_notify_status("loading: %s", status);
    srv_log(SRV_LOG_INFO, "loading: %s", status);
}

int srv_cmd_serve(int argc, char **argv) {
    srv_config cfg;
    srv_config_init(&cfg);
    char err[MOE_ERR_MAX];
    int rc = srv_config_from_args(&cfg, argc, argv, NULL, err, sizeof err);
    if (rc == 1 || rc == 2) {
        if (rc == 1) srv_config_usage(stdout);
        else printf("moed %s\n", MOED_VERSION);
        srv_config_free(&cfg);
        return 0;
    }
    if (rc < 0) {
        fprintf(stderr, "moed serve: %s\n", err);
        fprintf(stderr, "Try 'moed serve --help'.\n");
        srv_config_free(&cfg);
        return rc == MOE_EIO ? 1 : 2;
    }
    if (!cfg.model) {
        fprintf(stderr, "moed serve: no model given (-m MODEL.gguf, MOED_MODEL or 'model =' in --config)\n");
        srv_config_free(&cfg);
        return 2;
    }
    if (cfg.chat_template && moe_chat_family_parse(cfg.chat_template) < 0) {
        fprintf(stderr, "moed serve: chat_template: unknown format '%s'\n", cfg.chat_template);
        srv_config_free(&cfg);
        return 2;
    }
    srv_log_setup(cfg.log_format, cfg.log_level, cfg.log_prompts);
    char unknown[1024];
    if (srv_config_env_unknown(NULL, unknown, sizeof unknown))
        srv_log(SRV_LOG_WARN, "ignoring unknown environment variables: %s", unknown);
    signal(SIGPIPE, SIG_IGN);
    if (srv_fault_install()) srv_log(SRV_LOG_WARN, "cannot install the SIGBUS handler");

    server *s = calloc(1, sizeof *s);
    if (!s) return 1;
    s->cfg = &cfg;
    s->argc = argc;
    s->argv = argv;
    s->loop = uv_default_loop();
    s->model_file_id = model_id_from_path(cfg.model);
    s->model_name = strdup(cfg.n_served_model_name ? cfg.served_model_name[0] : s->model_file_id);
    const char *base = strrchr(cfg.model, '/');
    s->model_file_name = strdup(base ? base + 1 : cfg.model);
    for (size_t i = 1; i < cfg.n_served_model_name && s->n_model_ids < 7; i++)
        s->model_ids[s->n_model_ids++] = cfg.served_model_name[i];
    if (s->model_file_name) s->model_ids[s->n_model_ids++] = s->model_file_name;
    s->started_unix = (int64_t)time(NULL);
    s->id_base = moe_rng_os_seed();
    srv_metrics_init(&s->metrics);
    s->metrics.cost_per_hour = cfg.cost_per_hour;
    s->metrics.energy_price = cfg.energy_price;
    pthread_mutex_init(&s->ev_mu, NULL);
    srv_notify_init(&s->watchdog_usec);

    /* Signals first: a SIGTERM during the model load is a drain too. */
    uv_signal_init(s->loop, &s->sigterm);
    s->sigterm.data = s;
    uv_signal_start(&s->sigterm, signal_cb, SIGTERM);
    uv_signal_init(s->loop, &s->sigint);
    s->sigint.data = s;
    uv_signal_start(&s->sigint, signal_cb, SIGINT);
    uv_signal_init(s->loop, &s->sighup);
    s->sighup.data = s;
    uv_signal_start(&s->sighup, hup_cb, SIGHUP);

    moe_engine_opts eo = {0};
    eo.model_path = cfg.model;
    eo.device = cfg.device;
    eo.n_threads = (int)cfg.threads;
    eo.ctx_size = cfg.ctx_size;
    eo.max_seqs = cfg.max_seqs;
    eo.kv_blocks = cfg.kv_blocks;
    eo.kv_mem_mb = cfg.kv_cache_mb;
    eo.step_tokens = cfg.step_tokens;
    eo.queue_limit = cfg.queue_limit;
    eo.chat_family = cfg.chat_template ? moe_chat_family_parse(cfg.chat_template) : -1;
    eo.on_status = engine_status_cb;
    eo.energy_source = cfg.energy_source;
    eo.energy_idle_watts = cfg.energy_idle_watts;
    eo.energy_busy_watts = cfg.energy_busy_watts;
    srv_notify_status("loading %s", cfg.model);
    srv_log(SRV_LOG_INFO, "loading %s", cfg.model);
    int st = 0;
    s->eng = moe_engine_start(&eo, &st, err, sizeof err);
    if (!s->eng) {
        srv_log(SRV_LOG_ERROR, "cannot start the engine: %s", err);
        fprintf(stderr, "moed serve: %s\n", err);
        uv_walk(s->loop, close_walk_cb, NULL);
        uv_run(s->loop, UV_RUN_DEFAULT);
        goto fail;
    }

    uv_async_init(s->loop, &s->async, srv__events_cb);
    s->async.data = s;
    srv_http_opts ho = {.host = cfg.host,
                        .port = (int)cfg.port,
                        .idle_timeout_s = (unsigned)ceil(cfg.idle_timeout),
                        .header_timeout_s = cfg.header_timeout,
                        .body_timeout_s = cfg.body_timeout,
                        .max_connections = (unsigned)cfg.max_connections,
                        .max_per_ip = (unsigned)cfg.max_connections_per_ip,
                        .handler = handler_cb,
                        .handler_cls = s,
                        .completed = completed_cb,
                        .completed_cls = s};
    s->http = srv_http_start(s->loop, &ho, err, sizeof err);
    if (!s->http) {
        srv_log(SRV_LOG_ERROR, "%s", err);
        fprintf(stderr, "moed serve: %s\n", err);
        uv_walk(s->loop, close_walk_cb, NULL);
        uv_run(s->loop, UV_RUN_DEFAULT);
        moe_engine_destroy(s->eng, 0);
        goto fail;
    }
    srv_log(SRV_LOG_INFO, "listening on http://%s:%d", cfg.host, srv_http_port(s->http));
    uv_timer_init(s->loop, &s->tick);
    s->tick.data = s;
    uv_timer_start(&s->tick, tick_cb, 50, 100);
    uv_timer_init(s->loop, &s->watchdog);
    s->watchdog.data = s;
    if (s->watchdog_usec) {
        uint64_t ms = s->watchdog_usec / 2000;
        uv_timer_start(&s->watchdog, watchdog_cb, ms ? ms : 1, ms ? ms : 1);
    }

    uv_run(s->loop, UV_RUN_DEFAULT);

    /* The loop has ended: every handle is closed, no connection is open. */
    moe_engine_destroy(s->eng, 0);
    s->eng = NULL;
    pthread_mutex_lock(&s->ev_mu);
    ev_node *n = s->ev_head;
    s->ev_head = s->ev_tail = NULL;
    pthread_mutex_unlock(&s->ev_mu);
    while (n) {
        ev_node *next = n->next;
        free(n);
        n = next;
    }
    while (s->gens) srv__gen_free(s->gens);
    rc = s->exit_code;
    srv_log(SRV_LOG_INFO, "stopped");
    goto done;
fail:
    rc = 1;
done:
    uv_loop_close(s->loop);
    pthread_mutex_destroy(&s->ev_mu);
    free(s->model_name);
    free(s->model_file_id);
    free(s->model_file_name);
    free(s);
    srv_config_free(&cfg);
    return rc;
}
