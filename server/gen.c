/* gen.c - generations: from a parsed request's submit to the engine,
 * through its events, to the SSE stream or the final body.
 *
 * The engine delivers events on its own thread into one mutex-protected
 * list plus a uv_async_t wake-up; the loop drains the list, renders SSE
 * chunks (or accumulates the non-streamed body) and resumes the suspended
 * connection.
 *
 * A generation (srv_gen) is shared by the engine (until the DONE event of
 * every prompt), MHD (until the request-completed callback) and, for
 * streams, the response object (until MHD frees it): a refcount on the
 * loop thread frees it after the last of the three.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "anthropic.h"
#include "log.h"
#include "serve_internal.h"

bool srv__sbuf_put(sbuf *b, const char *s, size_t n) {
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
    srv__sbuf_put(&g->out, text, strlen(text));
    g->t_out_ns = moe_now_ns();
    free(text);
}

/* "data: <json>\n\n"; takes json. */
static void sse_put(srv_gen *g, char *json) {
    if (!json) return;
    g->t_out_ns = moe_now_ns();
    srv__sbuf_put(&g->out, "data: ", 6);
    srv__sbuf_put(&g->out, json, strlen(json));
    srv__sbuf_put(&g->out, "\n\n", 2);
    free(json);
}

void srv__gen_free(srv_gen *g) {
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

void srv__gen_release(srv_gen *g) {
    if (--g->refs == 0) srv__gen_free(g);
}

void srv__gen_resume(srv_gen *g) {
    if (g->suspended && g->conn) {
        g->suspended = false;
        MHD_resume_connection(g->conn);
    }
}

void srv__gen_cancel(srv_gen *g) {
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

const char *srv__gen_finish_name(srv_gen *g) {
    if (g->err[0]) return "error";
    if (g->cancel & SRV_GEN_DRAINED) return "drain";
    if (g->cancel & SRV_GEN_TIMED_OUT) return "timeout";
    if (g->cancel & SRV_GEN_CLIENT_GONE) return "cancelled";
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
    g->state = SRV_GEN_FINISHED;
    g->ctx.has_energy = g->has_energy;
    g->ctx.energy_joules = g->energy_joules;
    g->ctx.has_cost = g->has_energy && cost_on(s);
    g->ctx.cost_usd = srv_cost_usd(g->energy_joules, g->energy_seconds, s->cfg->cost_per_hour, s->cfg->energy_price);
    srv_hist_observe(&s->metrics.e2e, srv__ns_to_s(moe_now_ns() - g->t_start_ns));
    if (g->err[0]) gen_error_body(g, g->err_http ? g->err_http : 500, g->err_code[0] ? g->err_code : "engine_error", g->err);
    else if (g->cancel & SRV_GEN_DRAINED) gen_error_body(g, 503, "server_shutdown", "the server is shutting down; the request was cut short");
    else if (g->cancel & SRV_GEN_TIMED_OUT) gen_error_body(g, 504, "request_timeout", "the request ran past the server's request_timeout");
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
    if (g->req.stream && g->api == API_OPENAI) srv__sbuf_put(&g->out, "data: [DONE]\n\n", 14);
    srv__gen_resume(g);
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
            srv_hist_observe(&s->metrics.ttft, srv__ns_to_s(n->t_now_ns - g->t_start_ns));
        }
        if (cs->t_last_ns) srv_hist_observe(&s->metrics.itl, srv__ns_to_s(n->t_now_ns - cs->t_last_ns));
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
            srv__gen_release(g); /* the engine's reference */
            return;
        }
        break;
    }
    if (g->req.stream) srv__gen_resume(g);
}

void srv__events_cb(uv_async_t *a) {
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
    if (g->state == SRV_GEN_FINISHED) return MHD_CONTENT_READER_END_OF_STREAM;
    if (!g->conn) return MHD_CONTENT_READER_END_WITH_ERROR;
    MHD_suspend_connection(g->conn);
    g->suspended = true;
    return 0;
}

static void stream_free_cb(void *cls) { srv__gen_release(cls); }

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
enum MHD_Result srv__gen_start(server *s, srv_conn *c, struct MHD_Connection *conn, srv_oai_kind kind,
                               srv_api api, srv_oai_req *parsed, srv_resp_echo *echo) {
    srv_gen *g = calloc(1, sizeof *g);
    if (!g) {
        srv_oai_req_free(parsed);
        srv_resp_echo_free(echo);
        return srv__respond_errf(s, c, conn, 503, NULL, "out_of_memory", "out of memory");
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
    srv__make_id(s, api == API_ANTHROPIC ? "msg_" : api == API_RESPONSES ? "resp_" : kind == SRV_OAI_CHAT ? "chatcmpl-" : "cmpl-",
            g->id, sizeof g->id);
    g->ctx.kind = kind;
    g->ctx.id = g->id;
    g->ctx.created = (int64_t)time(NULL);
    g->ctx.model = s->model_name;
    g->ctx.tok = s->info.tok;
    g->ctx.logprobs = g->req.logprobs;
    if (api == API_RESPONSES) {
        srv__make_id(s, "msg_", g->item_id, sizeof g->item_id);
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
        return srv__respond_errf(s, c, conn, 503, NULL, "out_of_memory", "out of memory");
    }
    /* linked first so srv__gen_free can unlink it on every path */
    g->next = s->gens;
    if (s->gens) s->gens->prev = g;
    s->gens = g;
    s->n_gens++;
    g->refs = 1; /* MHD's */
    c->gen = g;
    c->state = SRV_CONN_GENERATING;
    srv__conn_request_id(s, c);
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
            c->state = SRV_CONN_ANSWERED;
            srv__gen_free(g);
            return srv__respond_err(s, c, conn, &e);
        }
        /* Later prompts failed: the ones queued are cancelled, their DONE
         * ends the request with the error. */
        snprintf(g->err, sizeof g->err, "%s", e.message);
        g->err_http = e.http;
        snprintf(g->err_code, sizeof g->err_code, "%s", e.code[0] ? e.code : "invalid_request");
        for (size_t p = ok; p < g->n_subs; p++) g->subs[p].done = true;
        g->n_subs = ok;
        g->req.stream = false;
        srv__gen_cancel(g);
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
            srv__gen_cancel(g);
            return MHD_NO;
        }
        g->refs++; /* the response's */
        MHD_add_response_header(r, "Content-Type", "text/event-stream");
        MHD_add_response_header(r, "Cache-Control", "no-cache");
        MHD_add_response_header(r, "X-Request-Id", c->req_id);
        srv__add_cors(s, conn, r, false);
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
enum MHD_Result srv__gen_answer(server *s, srv_conn *c, struct MHD_Connection *conn) {
    srv_gen *g = c->gen;
    if (g->state == SRV_GEN_RUNNING) { /* spurious: wait on */
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
    return srv__respond(s, c, conn, g->status, "application/json", body, strlen(body),
                   g->status == 503 || g->status == 429 ? "1" : NULL);
}
