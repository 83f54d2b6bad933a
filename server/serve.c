/* serve.c - `moed serve`: the OpenAI-compatible HTTP server.
 *
 * One thread runs a libuv loop that drives libmicrohttpd (server/http.c).
 * Generation requests are parsed, validated, rendered and tokenized
 * (server/openai.c) on libuv's thread pool while their connection is
 * suspended, then submitted to the engine from the loop; the engine
 * delivers token events on its own
 * thread into one mutex-protected event list plus a uv_async_t wake-up.
 * The loop drains the list, renders SSE chunks (or accumulates the
 * non-streamed body) and resumes the suspended connection.
 *
 * A generation's state (srv_gen) is shared by the engine (until the DONE
 * event of every prompt), MHD (until the request-completed callback) and,
 * for streams, the response object (until MHD frees it): a refcount on
 * the loop thread frees it after the last of the three.
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
#include "utf8.h"

typedef struct server server;
typedef struct srv_gen srv_gen;

/* Which API a generation speaks: all share the chat request and the
 * engine path; only the bodies and stream events differ. */
typedef enum srv_api { API_OPENAI = 0, API_ANTHROPIC = 1, API_RESPONSES = 2 } srv_api;

/* One engine event, copied off the engine thread. */
typedef struct ev_node {
    struct ev_node *next;
    struct srv_sub *sub;
    moe_event_kind kind;
    int32_t index;
    int32_t token;
    float logprob;
    int32_t n_top;
    moe_finish finish;
    int32_t stop_index;
    int64_t prompt_tokens, completion_tokens;
    bool has_energy;
    double energy_joules, energy_seconds;
    uint64_t t_now_ns;
    size_t text_len;
    moe_logprob *top; /* points into the node's tail */
    char *text;       /* idem, NUL-terminated */
} ev_node;

/* One engine request of a generation (completions may hold several prompts). */
typedef struct srv_sub {
    srv_gen *g;
    uint64_t eng_id;
    int32_t base;   /* choice index of this prompt's first choice */
    bool submitted;
    bool done;
} srv_sub;

typedef struct choice_state {
    uint64_t t_last_ns;
    size_t text_len; /* streamed text so far (for completions' text_offset) */
    moe_finish finish;
} choice_state;

typedef struct sbuf {
    char *p;
    size_t len, off, cap;
} sbuf;

struct srv_gen {
    server *s;
    srv_gen *prev, *next; /* server's active list */
    struct MHD_Connection *conn;
    int refs;
    srv_oai_req req;
    srv_oai_ctx ctx;
    char id[48];
    srv_api api;
    srv_resp_echo echo;      /* API_RESPONSES: what the Response object repeats */
    srv_resp_ctx ctx_resp;   /* API_RESPONSES: points into this struct */
    char item_id[48];        /* API_RESPONSES: the output message's id */
    int64_t seq;             /* API_RESPONSES: the next event's sequence_number */
    int32_t stop_index;      /* the stop string that ended choice 0, or -1 */
    uint64_t t_out_ns;       /* streams: when bytes were last queued (keep-alive) */
    srv_sub *subs;
    size_t n_subs, subs_done;
    int32_t n_choices;
    srv_oai_choice *choices; /* non-streamed: accumulated text/logprobs */
    choice_state *cs;
    sbuf out;                /* streamed bytes not yet taken by MHD */
    bool stream_finished;    /* [DONE] is in out */
    bool suspended;
    bool finished;           /* every sub is DONE */
    bool mhd_done;
    bool client_gone;
    bool drain_cancel, timed_out;
    char err[512];           /* engine error (MOE_EV_ERROR) or a failed later submit */
    int err_http;            /* its status: 500 for engine errors */
    char err_code[48];
    int status;              /* HTTP status of the answer */
    char *body;              /* non-streamed body, ready when finished */
    uint64_t t_start_ns, t_first_ns;
    int64_t prompt_tokens, completion_tokens;
    int64_t tokens_seen; /* TOKEN events so far (the count while unfinished) */
    bool has_energy;     /* every DONE so far carried energy */
    double energy_joules, energy_seconds; /* summed over the subs' DONE */
};

/* One HTTP request (MHD's con_cls). */
typedef struct srv_conn {
    uint64_t t_start_ns;
    char *body;
    size_t len, cap;
    bool too_large;
    bool seen;
    bool close;   /* the head's framing is not trusted: answer with Connection: close */
    int status;
    char method[16];
    char path[128];
    char err[640];
    char req_id[129]; /* X-Request-Id; "" until known */
    srv_gen *gen;
    struct srv_work *work; /* parsing on the thread pool */
} srv_conn;

struct server {
    srv_config *cfg;
    uv_loop_t *loop;
    srv_http *http;
    moe_engine *eng;
    moe_engine_info info;
    bool ready;
    char *model_name; /* served name */
    char *model_file_id;
    char *model_file_name;        /* the file's name with its extension, also accepted */
    const char *model_ids[8];     /* (n_model_ids) the other accepted ids: aliases, the file name */
    size_t n_model_ids;
    srv_metrics metrics;
    uv_async_t async;
    uv_timer_t tick, watchdog;
    uv_signal_t sigterm, sigint, sighup;
    pthread_mutex_t ev_mu;
    ev_node *ev_head, *ev_tail;
    srv_gen *gens;
    size_t n_gens;
    size_t n_work;          /* thread-pool jobs in flight */
    bool shutdown_pending;  /* shutdown waits for them */
    bool draining, drain_cancelled, shutting_down;
    uint64_t drain_deadline_ns;
    uint64_t watchdog_usec;
    uint64_t id_base, id_next;
    int64_t started_unix;
    int exit_code;
    int argc;    /* the command line, re-read on SIGHUP */
    char **argv;
};

/* ------------------------------------------------------------------ */
/* small helpers */

static bool sbuf_put(sbuf *b, const char *s, size_t n) {
    if (b->off && b->off == b->len) b->off = b->len = 0;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return false;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return true;
}

/* Already framed SSE text (event lines, comments); takes text. */
static void sse_put_raw(srv_gen *g, char *text) {
    if (!text) return;
    sbuf_put(&g->out, text, strlen(text));
    g->t_out_ns = moe_now_ns();
    free(text);
}

/* "data: <json>\n\n"; takes json. */
static void sse_put(srv_gen *g, char *json) {
    if (!json) return;
    g->t_out_ns = moe_now_ns();
    sbuf_put(&g->out, "data: ", 6);
    sbuf_put(&g->out, json, strlen(json));
    sbuf_put(&g->out, "\n\n", 2);
    free(json);
}

static double ns_to_s(uint64_t ns) { return (double)ns * 1e-9; }

static char *model_id_from_path(const char *path) {
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    size_t n = strlen(b);
    if (n > 5 && !strcasecmp(b + n - 5, ".gguf")) n -= 5;
    return strndup(b, n);
}

/* ------------------------------------------------------------------ */
/* responses */

/* Errors on these paths come in Anthropic's shape. */
static bool path_is_anthropic(const char *path) {
    return !strcmp(path, "/v1/messages") || !strcmp(path, "/v1/messages/count_tokens");
}

static const char *make_id(server *s, const char *prefix, char *buf, size_t n);

/* The connection's X-Request-Id: the client's (checked from the head),
 * the generation's id, or a fresh one. */
static void conn_request_id(server *s, srv_conn *c) {
    if (c->req_id[0]) return;
    if (c->gen) snprintf(c->req_id, sizeof c->req_id, "%s", c->gen->id);
    else make_id(s, "req-", c->req_id, sizeof c->req_id);
}

static void add_cors(server *s, struct MHD_Connection *conn, struct MHD_Response *r, bool preflight) {
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
static enum MHD_Result respond(server *s, srv_conn *c, struct MHD_Connection *conn, int status, const char *ctype,
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
    conn_request_id(s, c);
    MHD_add_response_header(r, "X-Request-Id", c->req_id);
    add_cors(s, conn, r, false);
    c->status = status;
    enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result respond_json(server *s, srv_conn *c, struct MHD_Connection *conn, int status, cJSON *o) {
    char *body = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!body) return MHD_NO;
    return respond(s, c, conn, status, "application/json", body, strlen(body), NULL);
}

static enum MHD_Result respond_err(server *s, srv_conn *c, struct MHD_Connection *conn, const srv_oai_err *e) {
    char *body = path_is_anthropic(c->path) ? srv_anth_err_json(e) : srv_oai_err_json(e);
    /* The Messages API's own messages already start with the field. */
    bool named = e->param[0] && strncmp(e->message, e->param, strlen(e->param));
    snprintf(c->err, sizeof c->err, "%s%s%s", named ? e->param : "", named ? ": " : "", e->message);
    if (!body) return MHD_NO;
    const char *retry = e->http == 429 || e->http == 503 ? "1" : NULL;
    return respond(s, c, conn, e->http, "application/json", body, strlen(body), retry);
}

static enum MHD_Result respond_errf(server *s, srv_conn *c, struct MHD_Connection *conn, int http, const char *param,
                                    const char *code, const char *msg) {
    srv_oai_err e;
    srv_oai_err_set(&e, http, param, "%s", msg);
    if (code) snprintf(e.code, sizeof e.code, "%s", code);
    return respond_err(s, c, conn, &e);
}

/* ------------------------------------------------------------------ */
/* generations */

static void gen_free(srv_gen *g) {
    server *s = g->s;
    if (g->prev) g->prev->next = g->next;
    else if (s->gens == g) s->gens = g->next;
    if (g->next) g->next->prev = g->prev;
    s->n_gens--;
    if (g->choices)
        for (int32_t i = 0; i < g->n_choices; i++) srv_oai_choice_free(&g->choices[i]);
    free(g->choices);
    free(g->cs);
    free(g->subs);
    free(g->out.p);
    free(g->body);
    srv_oai_req_free(&g->req);
    srv_resp_echo_free(&g->echo);
    free(g);
}

static void gen_release(srv_gen *g) {
    if (--g->refs == 0) gen_free(g);
}

static void gen_resume(srv_gen *g) {
    if (g->suspended && g->conn) {
        g->suspended = false;
        MHD_resume_connection(g->conn);
    }
}

static void gen_cancel(srv_gen *g) {
    if (!g->s->eng) return;
    for (size_t i = 0; i < g->n_subs; i++)
        if (g->subs[i].submitted && !g->subs[i].done) moe_engine_cancel(g->s->eng, g->subs[i].eng_id);
}

/* Engine thread: copy the event and wake the loop. */
static void on_event_cb(void *user, const moe_event *ev) {
    srv_sub *sub = user;
    server *s = sub->g->s;
    size_t tl = ev->text ? ev->text_len : 0;
    int32_t nt = ev->top && ev->n_top > 0 ? ev->n_top : 0;
    ev_node *n = malloc(sizeof *n + (size_t)nt * sizeof(moe_logprob) + tl + 1);
    if (!n) {
        /* Losing a TOKEN only loses text; DONE must get through or the
         * request would never be freed, so retry it until memory returns. */
        if (ev->kind != MOE_EV_DONE) return;
        while (!(n = malloc(sizeof *n + 1))) {
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
        tl = 0;
        nt = 0;
    }
    n->next = NULL;
    n->sub = sub;
    n->kind = ev->kind;
    n->index = ev->index;
    n->token = ev->token;
    n->logprob = ev->logprob;
    n->n_top = nt;
    n->finish = ev->finish;
    n->stop_index = ev->stop_index;
    n->prompt_tokens = ev->prompt_tokens;
    n->completion_tokens = ev->completion_tokens;
    n->has_energy = ev->has_energy;
    n->energy_joules = ev->energy_joules;
    n->energy_seconds = ev->energy_seconds;
    n->t_now_ns = ev->t_now_ns ? ev->t_now_ns : moe_now_ns();
    n->top = (moe_logprob *)(n + 1);
    if (nt) memcpy(n->top, ev->top, (size_t)nt * sizeof(moe_logprob));
    n->text = (char *)(n->top + nt);
    if (tl) memcpy(n->text, ev->text, tl);
    n->text[tl] = 0;
    n->text_len = tl;
    pthread_mutex_lock(&s->ev_mu);
    if (s->ev_tail) s->ev_tail->next = n;
    else s->ev_head = n;
    s->ev_tail = n;
    pthread_mutex_unlock(&s->ev_mu);
    uv_async_send(&s->async);
}

static const char *finish_log_name(srv_gen *g) {
    if (g->err[0]) return "error";
    if (g->drain_cancel) return "drain";
    if (g->timed_out) return "timeout";
    if (g->client_gone) return "cancelled";
    moe_finish f = MOE_FINISH_NONE;
    for (int32_t i = 0; i < g->n_choices; i++)
        if (g->cs[i].finish > f) f = g->cs[i].finish;
    return f == MOE_FINISH_STOP ? "stop" : f == MOE_FINISH_LENGTH ? "length" : f == MOE_FINISH_CANCELLED ? "cancelled" : NULL;
}

static void gen_error_body(srv_gen *g, int http, const char *code, const char *msg) {
    srv_oai_err e;
    srv_oai_err_set(&e, http, NULL, "%s", msg);
    snprintf(e.code, sizeof e.code, "%s", code);
    if (g->req.stream) {
        if (g->api == API_ANTHROPIC) sse_put_raw(g, srv_anth_sse_error(&e));
        else if (g->api == API_RESPONSES) sse_put_raw(g, srv_resp_sse_error(&g->seq, &e));
        else sse_put(g, srv_oai_err_json(&e));
    } else {
        g->status = http;
        free(g->body);
        g->body = g->api == API_ANTHROPIC ? srv_anth_err_json(&e) : srv_oai_err_json(&e);
    }
}

/* Whether a price is configured, so that usage carries cost_usd. */
static bool cost_on(const server *s) { return s->cfg->cost_per_hour > 0 || s->cfg->energy_price > 0; }
/* The stop string that ended the answer (Anthropic's stop_sequence), or NULL. */
static const char *gen_stop_string(const srv_gen *g) {
    return g->stop_index >= 0 && g->stop_index < g->req.n_stop ? g->req.stop[g->stop_index] : NULL;
}

/* The other APIs' last events / body (n is 1 for them). */
static void gen_finish_api(srv_gen *g) {
    srv_oai_choice *ch = &g->choices[0];
    moe_finish f = g->cs[0].finish;
    if (g->req.stream) {
        if (g->api == API_ANTHROPIC) sse_put_raw(g, srv_anth_sse_end(f, gen_stop_string(g), g->completion_tokens));
        else sse_put_raw(g, srv_resp_sse_end(&g->ctx_resp, &g->seq, ch->text, ch->len, f, g->prompt_tokens, g->completion_tokens));
        return;
    }
    g->status = 200;
    if (g->api == API_ANTHROPIC)
        g->body = srv_anth_render_message(g->id, g->ctx.model, ch->text, ch->len, f, gen_stop_string(g),
                                          g->prompt_tokens, g->completion_tokens);
    else g->body = srv_resp_render(&g->ctx_resp, ch->text, ch->len, f, g->prompt_tokens, g->completion_tokens);
    if (!g->body) gen_error_body(g, 500, "out_of_memory", "out of memory rendering the response");
}

/* Every sub is DONE: close the stream or build the body. */
static void gen_finish(srv_gen *g) {
    server *s = g->s;
    g->finished = true;
    g->ctx.has_energy = g->has_energy;
    g->ctx.energy_joules = g->energy_joules;
    g->ctx.has_cost = g->has_energy && cost_on(s);
    g->ctx.cost_usd = srv_cost_usd(g->energy_joules, g->energy_seconds, s->cfg->cost_per_hour, s->cfg->energy_price);
    srv_hist_observe(&s->metrics.e2e, ns_to_s(moe_now_ns() - g->t_start_ns));
    if (g->err[0]) gen_error_body(g, g->err_http ? g->err_http : 500, g->err_code[0] ? g->err_code : "engine_error", g->err);
    else if (g->drain_cancel) gen_error_body(g, 503, "server_shutdown", "the server is shutting down; the request was cut short");
    else if (g->timed_out) gen_error_body(g, 504, "request_timeout", "the request ran past the server's request_timeout");
    else if (g->api != API_OPENAI) gen_finish_api(g);
    else if (g->req.stream) {
        if (g->req.include_usage)
            sse_put(g, srv_oai_render_usage_chunk(&g->ctx, g->prompt_tokens, g->completion_tokens));
    } else {
        for (int32_t i = 0; i < g->n_choices; i++) g->choices[i].finish = g->cs[i].finish;
        g->status = 200;
        g->body = srv_oai_render_response(&g->ctx, g->choices, (size_t)g->n_choices, g->prompt_tokens,
                                          g->completion_tokens);
        if (!g->body) gen_error_body(g, 500, "out_of_memory", "out of memory rendering the response");
    }
    if (g->req.stream) {
        if (g->api == API_OPENAI) sbuf_put(&g->out, "data: [DONE]\n\n", 14);
        g->stream_finished = true;
    }
    gen_resume(g);
}

static void process_event(server *s, ev_node *n) {
    srv_sub *sub = n->sub;
    srv_gen *g = sub->g;
    int32_t idx = sub->base + n->index;
    bool idx_ok = n->kind == MOE_EV_TOKEN || n->kind == MOE_EV_FINISH ? idx >= 0 && idx < g->n_choices : true;
    if (!idx_ok) return;
    switch (n->kind) {
    case MOE_EV_TOKEN: {
        choice_state *cs = &g->cs[idx];
        if (!g->t_first_ns) {
            g->t_first_ns = n->t_now_ns;
            srv_hist_observe(&s->metrics.ttft, ns_to_s(n->t_now_ns - g->t_start_ns));
        }
        if (cs->t_last_ns) srv_hist_observe(&s->metrics.itl, ns_to_s(n->t_now_ns - cs->t_last_ns));
        cs->t_last_ns = n->t_now_ns;
        g->tokens_seen++;
        srv_oai_lp lp;
        if (g->req.logprobs) {
            lp.id = n->token;
            lp.logprob = n->logprob;
            lp.n_top = n->n_top < g->req.top_logprobs ? n->n_top : g->req.top_logprobs;
            memcpy(lp.top, n->top, (size_t)lp.n_top * sizeof(moe_logprob));
            lp.text_offset = cs->text_len;
        }
        if (g->api != API_OPENAI) {
            /* the Responses stream ends with the whole text, so both keep it */
            srv_oai_choice_append(&g->choices[idx], n->text, n->text_len);
            if (g->req.stream && n->text_len) {
                if (g->api == API_ANTHROPIC) sse_put_raw(g, srv_anth_sse_delta(n->text, n->text_len));
                else sse_put_raw(g, srv_resp_sse_delta(&g->ctx_resp, &g->seq, n->text, n->text_len));
            }
        } else if (g->req.stream) {
            if (n->text_len || g->req.logprobs)
                sse_put(g, srv_oai_render_chunk(&g->ctx, idx, false, n->text, n->text_len, g->req.logprobs ? &lp : NULL,
                                                g->req.logprobs ? 1 : 0, MOE_FINISH_NONE));
        } else {
            srv_oai_choice_append(&g->choices[idx], n->text, n->text_len);
            if (g->req.logprobs) srv_oai_choice_add_lp(&g->choices[idx], &lp);
        }
        cs->text_len += n->text_len;
        break;
    }
    case MOE_EV_FINISH: {
        choice_state *cs = &g->cs[idx];
        cs->finish = n->finish;
        if (idx == 0) g->stop_index = n->stop_index;
        if (g->api != API_OPENAI) {
            srv_oai_choice_append(&g->choices[idx], n->text, n->text_len);
            if (g->req.stream && n->text_len) {
                if (g->api == API_ANTHROPIC) sse_put_raw(g, srv_anth_sse_delta(n->text, n->text_len));
                else sse_put_raw(g, srv_resp_sse_delta(&g->ctx_resp, &g->seq, n->text, n->text_len));
            }
        } else if (g->req.stream) {
            if (n->finish != MOE_FINISH_CANCELLED)
                sse_put(g, srv_oai_render_chunk(&g->ctx, idx, false, n->text, n->text_len, NULL, 0, n->finish));
        } else if (n->text_len)
            srv_oai_choice_append(&g->choices[idx], n->text, n->text_len);
        cs->text_len += n->text_len;
        break;
    }
    case MOE_EV_ERROR:
        if (!g->err[0]) snprintf(g->err, sizeof g->err, "%s", n->text_len ? n->text : "engine error");
        break;
    case MOE_EV_DONE:
        sub->done = true;
        g->prompt_tokens += n->prompt_tokens;
        g->completion_tokens += n->completion_tokens;
        g->has_energy = (g->subs_done == 0 || g->has_energy) && n->has_energy;
        g->energy_joules += n->energy_joules;
        g->energy_seconds += n->energy_seconds;
        if (++g->subs_done == g->n_subs) {
            gen_finish(g);
            gen_release(g); /* the engine's reference */
            return;
        }
        break;
    }
    if (g->req.stream) gen_resume(g);
}

static void async_cb(uv_async_t *a) {
    server *s = a->data;
    pthread_mutex_lock(&s->ev_mu);
    ev_node *n = s->ev_head;
    s->ev_head = s->ev_tail = NULL;
    pthread_mutex_unlock(&s->ev_mu);
    while (n) {
        ev_node *next = n->next;
        process_event(s, n);
        free(n);
        n = next;
    }
    if (s->http) srv_http_kick(s->http);
}

/* MHD: the stream's bytes. */
static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    srv_gen *g = cls;
    if (g->out.off < g->out.len) {
        size_t n = g->out.len - g->out.off;
        if (n > max) n = max;
        memcpy(buf, g->out.p + g->out.off, n);
        g->out.off += n;
        if (g->out.off == g->out.len) g->out.off = g->out.len = 0;
        return (ssize_t)n;
    }
    if (g->stream_finished) return MHD_CONTENT_READER_END_OF_STREAM;
    if (!g->conn) return MHD_CONTENT_READER_END_WITH_ERROR;
    MHD_suspend_connection(g->conn);
    g->suspended = true;
    return 0;
}

static void stream_free_cb(void *cls) { gen_release(cls); }

static const char *make_id(server *s, const char *prefix, char *buf, size_t n) {
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

/* Maps a failed submit to an HTTP error. */
static void submit_error(int st, const char *msg, srv_oai_err *e) {
    if (st == MOE_EFULL) {
        srv_oai_err_set(e, 429, NULL, "the server is at capacity (request queue full); retry later");
        snprintf(e->code, sizeof e->code, "queue_full");
    } else if (st == MOE_ESTATE) {
        srv_oai_err_set(e, 503, NULL, "the engine is not accepting requests (loading or shutting down)");
        snprintf(e->code, sizeof e->code, "engine_unavailable");
    } else if (st == MOE_EINVAL || st == MOE_ERANGE) {
        /* The engine's message starts with the field name ("max_tokens: ..."). */
        char param[64] = "";
        const char *colon = strchr(msg, ':');
        if (colon && colon - msg < (ptrdiff_t)sizeof param && colon > msg) {
            memcpy(param, msg, (size_t)(colon - msg));
            param[colon - msg] = 0;
            for (char *p = param; *p; p++)
                if (*p == ' ') {
                    param[0] = 0;
                    break;
                }
        }
        srv_oai_err_set(e, 400, param[0] ? param : NULL, "%s", msg[0] ? msg : moe_strerror(st));
    } else {
        srv_oai_err_set(e, st == MOE_ENOMEM ? 503 : 500, NULL, "cannot start the request: %s", msg[0] ? msg : moe_strerror(st));
    }
}

/* Starts a parsed request (taken: *parsed and *echo are zeroed). */
static enum MHD_Result handle_generate(server *s, srv_conn *c, struct MHD_Connection *conn, srv_oai_kind kind,
                                       srv_api api, srv_oai_req *parsed, srv_resp_echo *echo) {
    srv_gen *g = calloc(1, sizeof *g);
    if (!g) {
        srv_oai_req_free(parsed);
        srv_resp_echo_free(echo);
        return respond_errf(s, c, conn, 503, NULL, "out_of_memory", "out of memory");
    }
    g->req = *parsed;
    memset(parsed, 0, sizeof *parsed);
    g->echo = *echo;
    memset(echo, 0, sizeof *echo);
    srv_oai_err e;
    g->s = s;
    g->conn = conn;
    g->t_start_ns = c->t_start_ns;
    g->t_out_ns = moe_now_ns();
    g->api = api;
    g->stop_index = -1;
    make_id(s, api == API_ANTHROPIC ? "msg_" : api == API_RESPONSES ? "resp_" : kind == SRV_OAI_CHAT ? "chatcmpl-" : "cmpl-",
            g->id, sizeof g->id);
    g->ctx.kind = kind;
    g->ctx.id = g->id;
    g->ctx.created = (int64_t)time(NULL);
    g->ctx.model = s->model_name;
    g->ctx.tok = s->info.tok;
    g->ctx.logprobs = g->req.logprobs;
    if (api == API_RESPONSES) {
        make_id(s, "msg_", g->item_id, sizeof g->item_id);
        g->ctx_resp = (srv_resp_ctx){.id = g->id, .item_id = g->item_id, .model = g->ctx.model,
                                     .created_at = g->ctx.created, .echo = &g->echo};
    }
    g->n_subs = g->req.n_prompts;
    g->n_choices = (int32_t)(g->n_subs * (size_t)g->req.n);
    g->subs = calloc(g->n_subs, sizeof *g->subs);
    g->cs = calloc((size_t)g->n_choices, sizeof *g->cs);
    g->choices = calloc((size_t)g->n_choices, sizeof *g->choices);
    if (!g->subs || !g->cs || !g->choices) {
        free(g->subs);
        free(g->cs);
        free(g->choices);
        srv_oai_req_free(&g->req);
        srv_resp_echo_free(&g->echo);
        free(g);
        return respond_errf(s, c, conn, 503, NULL, "out_of_memory", "out of memory");
    }
    /* linked first so gen_free can unlink it on every path */
    g->next = s->gens;
    if (s->gens) s->gens->prev = g;
    s->gens = g;
    s->n_gens++;
    g->refs = 1; /* MHD's */
    c->gen = g;
    conn_request_id(s, c);
    srv_log_prompt(g->id, g->req.prompts[0].text ? g->req.prompts[0].text : "", g->req.prompts[0].text_len);
    /* echo: the prompt text starts each choice */
    for (size_t p = 0; p < g->n_subs; p++) {
        g->subs[p].g = g;
        g->subs[p].base = (int32_t)(p * (size_t)g->req.n);
        if (g->req.echo && kind == SRV_OAI_COMPLETION)
            for (int32_t i = 0; i < g->req.n; i++) {
                int32_t idx = g->subs[p].base + i;
                if (!g->req.stream)
                    srv_oai_choice_append(&g->choices[idx], g->req.prompts[p].text, g->req.prompts[p].text_len);
                g->cs[idx].text_len = g->req.prompts[p].text_len;
            }
    }
    /* Submit every prompt; on a failure cancel those already queued. */
    size_t ok = 0;
    char msg[MOE_ERR_MAX] = "";
    int st = 0;
    for (size_t p = 0; p < g->n_subs; p++) {
        moe_request er;
        srv_oai_engine_request(&g->req, p, &er);
        er.on_event = on_event_cb;
        er.user = &g->subs[p];
        msg[0] = 0;
        if (p == 0) g->refs++; /* the engine's, dropped at the last DONE */
        st = moe_engine_submit(s->eng, &er, &g->subs[p].eng_id, msg, sizeof msg);
        if (st) break;
        g->subs[p].submitted = true;
        ok++;
    }
    if (st) {
        submit_error(st, msg, &e);
        if (!ok) {
            g->refs--; /* no DONE will come */
            c->gen = NULL;
            gen_free(g);
            return respond_err(s, c, conn, &e);
        }
        /* Later prompts failed: the ones queued are cancelled, their DONE
         * ends the request with the error. */
        snprintf(g->err, sizeof g->err, "%s", e.message);
        g->err_http = e.http;
        snprintf(g->err_code, sizeof g->err_code, "%s", e.code[0] ? e.code : "invalid_request");
        for (size_t p = ok; p < g->n_subs; p++) g->subs[p].done = true;
        g->n_subs = ok;
        g->req.stream = false;
        gen_cancel(g);
    }
    if (g->req.stream) {
        /* chat: the first chunk of each choice carries the role; completions with echo: the prompt */
        if (api == API_ANTHROPIC) sse_put_raw(g, srv_anth_sse_start(g->id, g->ctx.model, g->req.prompts[0].n));
        else if (api == API_RESPONSES) sse_put_raw(g, srv_resp_sse_start(&g->ctx_resp, &g->seq));
        for (int32_t i = 0; api == API_OPENAI && i < g->n_choices; i++) {
            size_t p = (size_t)(i / g->req.n);
            if (kind == SRV_OAI_CHAT) sse_put(g, srv_oai_render_chunk(&g->ctx, i, true, "", 0, NULL, 0, MOE_FINISH_NONE));
            else if (g->req.echo)
                sse_put(g, srv_oai_render_chunk(&g->ctx, i, false, g->req.prompts[p].text, g->req.prompts[p].text_len,
                                                NULL, 0, MOE_FINISH_NONE));
        }
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_reader, g,
                                                                   stream_free_cb);
        if (!r) {
            gen_cancel(g);
            return MHD_NO;
        }
        g->refs++; /* the response's */
        MHD_add_response_header(r, "Content-Type", "text/event-stream");
        MHD_add_response_header(r, "Cache-Control", "no-cache");
        MHD_add_response_header(r, "X-Request-Id", c->req_id);
        add_cors(s, conn, r, false);
        c->status = 200;
        enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        return ret;
    }
    MHD_suspend_connection(conn);
    g->suspended = true;
    return MHD_YES;
}

/* The handler is called again after a non-streamed generation resumed. */
static enum MHD_Result answer_generation(server *s, srv_conn *c, struct MHD_Connection *conn) {
    srv_gen *g = c->gen;
    if (!g->finished) { /* spurious: wait on */
        MHD_suspend_connection(conn);
        g->suspended = true;
        return MHD_YES;
    }
    char *body = g->body;
    g->body = NULL;
    if (!body) return MHD_NO;
    if (g->status != 200) {
        cJSON *o = cJSON_Parse(body);
        const cJSON *m = cJSON_GetObjectItem(cJSON_GetObjectItem(o, "error"), "message");
        if (cJSON_IsString(m)) snprintf(c->err, sizeof c->err, "%s", m->valuestring);
        cJSON_Delete(o);
    }
    return respond(s, c, conn, g->status, "application/json", body, strlen(body),
                   g->status == 503 || g->status == 429 ? "1" : NULL);
}

/* ------------------------------------------------------------------ */
/* other endpoints */

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

static enum MHD_Result handle_models(server *s, srv_conn *c, struct MHD_Connection *conn, const char *id) {
    if (id) {
        bool known = !strcmp(id, s->model_name) || (s->model_file_id && !strcmp(id, s->model_file_id));
        for (size_t i = 0; !known && i < s->n_model_ids; i++) known = !strcmp(id, s->model_ids[i]);
        if (!known) return respond_errf(s, c, conn, 404, "model", "model_not_found", "The model does not exist");
        return respond_json(s, c, conn, 200, model_object(s));
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON *d = cJSON_AddArrayToObject(o, "data");
    cJSON_AddItemToArray(d, model_object(s));
    return respond_json(s, c, conn, 200, o);
}

static const char *health_state(server *s, bool *ok) {
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
    if (st.heartbeat_ns && now > st.heartbeat_ns && ns_to_s(now - st.heartbeat_ns) > s->cfg->heartbeat_timeout)
        return "unresponsive";
    if (!s->ready) return "loading";
    *ok = true;
    return "ok";
}

static enum MHD_Result handle_health(server *s, srv_conn *c, struct MHD_Connection *conn) {
    bool ok;
    const char *state = health_state(s, &ok);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "status", state);
    if (!ok && !strcmp(state, "failed")) cJSON_AddStringToObject(o, "error", moe_engine_error(s->eng));
    char *body = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!body) return MHD_NO;
    return respond(s, c, conn, ok ? 200 : 503, "application/json", body, strlen(body), ok ? NULL : "1");
}

static enum MHD_Result handle_metrics(server *s, srv_conn *c, struct MHD_Connection *conn) {
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
    return respond(s, c, conn, 200, "text/plain; version=0.0.4; charset=utf-8", body, len, NULL);
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
static char *tokenize_body(server *s, const char *body, size_t len, srv_oai_err *e) {
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

/* {"tokens": [...]} -> {"content": str}. As tokenize_body. */
static char *detokenize_body(server *s, const char *body, size_t len, srv_oai_err *e) {
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

/* ------------------------------------------------------------------ */
/* routing */

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
    if (w->r == R_TOKENIZE) w->body = tokenize_body(s, body, len, &w->err);
    else if (w->r == R_DETOKENIZE) w->body = detokenize_body(s, body, len, &w->err);
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
    if (!w) return respond_errf(s, c, conn, 503, NULL, "out_of_memory", "out of memory");
    w->s = s;
    w->c = c;
    w->conn = conn;
    w->r = r;
    w->req.data = w;
    w->in = c->body;
    w->in_len = c->len;
    if (uv_queue_work(s->loop, &w->req, work_cb, after_work_cb)) {
        free(w);
        return respond_errf(s, c, conn, 503, NULL, "server_busy", "cannot queue the request");
    }
    c->body = NULL;
    c->len = c->cap = 0;
    c->work = w;
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
    enum MHD_Result ret;
    if (w->r == R_TOKENIZE || w->r == R_DETOKENIZE || (w->r == R_COUNT_TOKENS && !w->rc)) {
        if (w->body) ret = respond(s, c, conn, 200, "application/json", w->body, strlen(w->body), NULL);
        else ret = respond_err(s, c, conn, &w->err);
    } else if (w->rc) {
        ret = respond_err(s, c, conn, &w->err);
    } else {
        srv_api api = w->r == R_MESSAGES ? API_ANTHROPIC : w->r == R_RESPONSES ? API_RESPONSES : API_OPENAI;
        ret = handle_generate(s, c, conn, route_kind(w->r), api, &w->parsed, &w->echo);
    }
    free(w);
    return ret;
}

static enum MHD_Result respond_unauthorized(server *s, srv_conn *c, struct MHD_Connection *conn) {
    srv_oai_err e;
    srv_oai_err_set(&e, 401, NULL, "Incorrect API key provided (Authorization: Bearer KEY or x-api-key: KEY)");
    snprintf(e.code, sizeof e.code, "invalid_api_key");
    return respond_err(s, c, conn, &e);
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
        conn_request_id(s, c);
        MHD_add_response_header(resp, "X-Request-Id", c->req_id);
        add_cors(s, conn, resp, true);
        c->status = 204;
        enum MHD_Result ret = MHD_queue_response(conn, 204, resp);
        MHD_destroy_response(resp);
        return ret;
    }
    if (r == R_NONE) return respond_errf(s, c, conn, 404, NULL, "not_found", "no such endpoint");
    bool post = route_is_post(r);
    bool head = !strcmp(method, "HEAD");
    if (post ? strcmp(method, "POST") : (strcmp(method, "GET") && !head)) {
        srv_oai_err e;
        srv_oai_err_set(&e, 405, NULL, "method %.16s is not allowed here; use %s", method, post ? "POST" : "GET");
        snprintf(e.code, sizeof e.code, "method_not_allowed");
        char *body = path_is_anthropic(c->path) ? srv_anth_err_json(&e) : srv_oai_err_json(&e);
        if (!body) return MHD_NO;
        struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
        MHD_add_response_header(resp, "Allow", post ? "POST, OPTIONS" : "GET, HEAD, OPTIONS");
        MHD_add_response_header(resp, "Content-Type", "application/json");
        conn_request_id(s, c);
        MHD_add_response_header(resp, "X-Request-Id", c->req_id);
        add_cors(s, conn, resp, false);
        c->status = 405;
        enum MHD_Result ret = MHD_queue_response(conn, 405, resp);
        MHD_destroy_response(resp);
        return ret;
    }
    if (r == R_HEALTH) return handle_health(s, c, conn);
    if (r == R_METRICS) return handle_metrics(s, c, conn);
    if (!auth_ok(s, conn)) return respond_unauthorized(s, c, conn);
    if (c->too_large) {
        char msg[96];
        snprintf(msg, sizeof msg, "request body is larger than %lld bytes", (long long)s->cfg->max_body);
        return respond_errf(s, c, conn, 413, NULL, "request_too_large", msg);
    }
    if (r == R_MODELS) return handle_models(s, c, conn, NULL);
    if (r == R_MODEL) return handle_models(s, c, conn, arg);
    if (s->draining)
        return respond_errf(s, c, conn, 503, NULL, "server_shutdown", "the server is shutting down");
    if (!s->ready) {
        bool ok;
        const char *st = health_state(s, &ok);
        char msg[96];
        snprintf(msg, sizeof msg, "the model is not ready (%s)", st);
        return respond_errf(s, c, conn, 503, NULL, "model_not_ready", msg);
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
            c->seen = true;
            c->close = true;
            return respond_errf(s, c, conn, 400, NULL, "bad_request", framing);
        }
        /* A client's own id is echoed and logged, so it must be safe in a
         * header and a log line. */
        const char *rid = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Request-Id");
        if (rid) {
            size_t n = strlen(rid);
            bool ok = n > 0 && n < sizeof c->req_id;
            for (size_t i = 0; ok && i < n; i++) ok = rid[i] > 0x20 && rid[i] < 0x7f;
            if (!ok) {
                c->seen = true;
                return respond_errf(s, c, conn, 400, NULL, "invalid_request_id",
                                    "the X-Request-Id header must be 1 to 128 printable ASCII characters without spaces");
            }
            memcpy(c->req_id, rid, n + 1);
        }
        if (needs_key(url, method) && !auth_ok(s, conn)) {
            c->seen = true;
            return respond_unauthorized(s, c, conn);
        }
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > (unsigned long long)s->cfg->max_body) {
            c->seen = true;
            char msg[96];
            snprintf(msg, sizeof msg, "request body is larger than %lld bytes", (long long)s->cfg->max_body);
            return respond_errf(s, c, conn, 413, NULL, "request_too_large", msg);
        }
        return MHD_YES;
    }
    if (c->work) return finish_work(s, c, conn);
    if (c->gen) return answer_generation(s, c, conn);
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
    if (c->seen) return MHD_YES;
    c->seen = true;
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
        g->mhd_done = true;
        if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && !g->finished && !g->client_gone) {
            g->client_gone = true;
            s->metrics.requests_cancelled++;
            gen_cancel(g);
        }
        lr.model = s->model_name;
        lr.stream = g->req.stream;
        lr.prompt_tokens = g->prompt_tokens;
        if (!g->finished)
            for (size_t i = 0; i < g->n_subs; i++) lr.prompt_tokens += g->req.prompts[i].n;
        lr.completion_tokens = g->finished ? g->completion_tokens : g->tokens_seen;
        if (g->t_first_ns) lr.ttft_ms = (double)(g->t_first_ns - g->t_start_ns) * 1e-6;
        if (g->finished) {
            lr.has_energy = g->ctx.has_energy;
            lr.energy_joules = g->ctx.energy_joules;
            lr.has_cost = g->ctx.has_cost;
            lr.cost_usd = g->ctx.cost_usd;
        }
        lr.finish = g->finished ? finish_log_name(g) : "cancelled";
        /* A stream whose hang-up the tick saw first is finished (cancelled)
         * by now and its last write fails: that is the client leaving, not
         * a write error. */
        if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && toe != MHD_REQUEST_TERMINATED_CLIENT_ABORT && g->finished &&
            !g->client_gone)
            lr.finish = "write_error";
    }
    bool quiet = !strcmp(c->path, "/health") || !strcmp(c->path, "/metrics");
    if (!quiet || srv_log_enabled(SRV_LOG_DEBUG) || status >= 400) srv_log_req(&lr);
    if (g) gen_release(g);
    free(c->body);
    free(c);
}

/* ------------------------------------------------------------------ */
/* lifecycle */

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
            if (!g->finished) g->drain_cancel = true;
        moe_engine_destroy(s->eng, 0);
        s->eng = NULL;
    }
    async_cb(&s->async);
    for (srv_gen *g = s->gens; g; g = g->next) gen_resume(g);
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
        if (!g->finished && !g->client_gone && g->suspended && g->conn && peer_closed(g->conn)) {
            g->client_gone = true;
            s->metrics.requests_cancelled++;
            gen_cancel(g);
        }
    /* A stream that has said nothing for a while (queued behind others,
     * prefilling a long prompt) gets an SSE comment, so proxies and
     * clients with read timeouts do not give up on it. */
    if (s->cfg->sse_keepalive > 0)
        for (srv_gen *g = s->gens; g; g = g->next)
            if (g->req.stream && !g->stream_finished && g->conn &&
                ns_to_s(now - g->t_out_ns) >= s->cfg->sse_keepalive) {
                sbuf_put(&g->out, ": keep-alive\n\n", 14);
                g->t_out_ns = now;
                gen_resume(g);
                if (s->http) srv_http_kick(s->http);
            }
    /* request timeouts */
    if (s->cfg->request_timeout > 0)
        for (srv_gen *g = s->gens; g; g = g->next)
            if (!g->finished && !g->timed_out && ns_to_s(now - g->t_start_ns) > s->cfg->request_timeout) {
                g->timed_out = true;
                s->metrics.requests_cancelled++;
                gen_cancel(g);
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
                if (!g->finished) {
                    g->drain_cancel = true;
                    s->metrics.requests_cancelled++;
                    gen_cancel(g);
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
                  ns_to_s(now - st.heartbeat_ns) <= s->cfg->heartbeat_timeout);
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

    uv_async_init(s->loop, &s->async, async_cb);
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
    while (s->gens) gen_free(s->gens);
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
