/* serve_internal.h - what serve.c, gen.c and endpoints.c share: the
 * server, a generation (srv_gen) and a request (srv_conn), and the srv__
 * functions each file calls in the others. Private to those files; the
 * module's public interface is srv_cmd_serve in cli.h.
 *
 * Everything here runs on the loop thread unless it says otherwise.
 */
#ifndef MOED_SERVE_INTERNAL_H
#define MOED_SERVE_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cJSON.h>

#include "engine.h"
#include "http.h"
#include "metrics.h"
#include "openai.h"
#include "responses.h"
#include "config.h"

typedef struct server server;
typedef struct srv_gen srv_gen;

/* Where a generation is. It is created once its request is parsed and
 * submitted, so its life is short: the engine holds it until the DONE of
 * every prompt, and then its answer is built (or its stream closed). */
typedef enum srv_gen_state {
    SRV_GEN_RUNNING = 0, /* submitted; events arriving (queued, prefilling or decoding) */
    SRV_GEN_FINISHED,    /* every sub is DONE: body ready, or [DONE]/the end events in out */
} srv_gen_state;

/* Why a running generation was cancelled: bits, not a state, because the
 * reasons are independent (a timed-out request's client may leave too) and
 * each cancels (and counts in requests_cancelled) the first time it is
 * seen. The answer names the strongest: drain, then timeout, then the
 * client. */
typedef enum srv_gen_cancel {
    SRV_GEN_CLIENT_GONE = 1u << 0, /* hang-up seen by the tick or MHD */
    SRV_GEN_TIMED_OUT = 1u << 1,   /* ran past request_timeout */
    SRV_GEN_DRAINED = 1u << 2,     /* cut short by the drain timeout or shutdown */
} srv_gen_cancel;

/* Where one HTTP request is; the handler is called again in each. */
typedef enum srv_conn_state {
    SRV_CONN_READING = 0, /* head accepted; body bytes arriving */
    SRV_CONN_PARSING,     /* a srv_work job holds the body; the connection is suspended */
    SRV_CONN_GENERATING,  /* c->gen runs; a non-streamed answer waits for it suspended */
    SRV_CONN_ANSWERED,    /* a response is queued (or the request failed); later calls are ignored */
} srv_conn_state;

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
    srv_gen_state state;
    unsigned cancel;         /* srv_gen_cancel bits: why it was cut short */
    bool suspended;          /* MHD holds the connection until gen_resume */
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
    srv_conn_state state;
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

static inline double srv__ns_to_s(uint64_t ns) { return (double)ns * 1e-9; }

/* serve.c */

/* A fresh id "<prefix><24 hex>" in buf (n bytes); returns buf. */
const char *srv__make_id(server *s, const char *prefix, char *buf, size_t n);

/* endpoints.c: responses */

/* Errors on these paths come in Anthropic's shape. */
bool srv__path_is_anthropic(const char *path);
/* Fills c->req_id when still empty: the generation's id or a fresh one. */
void srv__conn_request_id(server *s, srv_conn *c);
/* The CORS headers for the request's Origin, if it is allowed. */
void srv__add_cors(server *s, struct MHD_Connection *conn, struct MHD_Response *r, bool preflight);
/* Queues body (malloc'd, taken; NULL for none) with status, the request id
 * and CORS headers; records the status in c. */
enum MHD_Result srv__respond(server *s, srv_conn *c, struct MHD_Connection *conn, int status, const char *ctype,
                             char *body, size_t len, const char *retry_after);
/* o as the JSON body (taken). */
enum MHD_Result srv__respond_json(server *s, srv_conn *c, struct MHD_Connection *conn, int status, cJSON *o);
/* An error body in the path's API shape; records the message in c->err. */
enum MHD_Result srv__respond_err(server *s, srv_conn *c, struct MHD_Connection *conn, const srv_oai_err *e);
enum MHD_Result srv__respond_errf(server *s, srv_conn *c, struct MHD_Connection *conn, int http, const char *param,
                                  const char *code, const char *msg);

/* endpoints.c: the endpoints other than generation */

/* GET /v1/models, or /v1/models/{id} when id is not NULL. */
enum MHD_Result srv__handle_models(server *s, srv_conn *c, struct MHD_Connection *conn, const char *id);
/* The /health state name; *ok when the server takes requests. */
const char *srv__health_state(server *s, bool *ok);
enum MHD_Result srv__handle_health(server *s, srv_conn *c, struct MHD_Connection *conn);
enum MHD_Result srv__handle_metrics(server *s, srv_conn *c, struct MHD_Connection *conn);
/* /tokenize and /detokenize bodies: the answer (malloc'd), or NULL with e
 * filled. Any thread: they read only the body and immutable engine info. */
char *srv__tokenize_body(server *s, const char *body, size_t len, srv_oai_err *e);
char *srv__detokenize_body(server *s, const char *body, size_t len, srv_oai_err *e);

/* gen.c */

/* Appends n bytes to b; false when out of memory (the bytes are lost). */
bool srv__sbuf_put(sbuf *b, const char *s, size_t n);
/* Starts a parsed request (taken: *parsed and *echo are zeroed): submits
 * it and queues the stream, or suspends the connection until the body is
 * ready. Errors are answered here. */
enum MHD_Result srv__gen_start(server *s, srv_conn *c, struct MHD_Connection *conn, srv_oai_kind kind, srv_api api,
                               srv_oai_req *parsed, srv_resp_echo *echo);
/* The handler's call after a non-streamed generation resumed the connection. */
enum MHD_Result srv__gen_answer(server *s, srv_conn *c, struct MHD_Connection *conn);
/* Cancels the subs still in the engine; their DONE events finish g. */
void srv__gen_cancel(srv_gen *g);
/* Resumes g's connection if it is suspended (new bytes or the answer). */
void srv__gen_resume(srv_gen *g);
/* Drops one of g's references (MHD's, the engine's, the stream's). */
void srv__gen_release(srv_gen *g);
/* Unlinks and frees g whatever its references (shutdown and failed starts). */
void srv__gen_free(srv_gen *g);
/* The finish name for the request log line, or NULL. */
const char *srv__gen_finish_name(srv_gen *g);
/* The async handle's callback: processes the engine's queued events. */
void srv__events_cb(uv_async_t *a);

#endif
