/* http.c - MHD inside a libuv loop (see http.h). */
#include "http.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"

/* What a connection is waiting for. Each waiting phase has one fixed
 * timeout, so appending at a list's tail keeps it sorted by deadline and
 * the sweep and the eviction only ever look at list heads. */
typedef enum {
    PH_IDLE,    /* kept alive, waiting for the next request line */
    PH_HEAD,    /* receiving a request head */
    PH_BODY,    /* head handled, receiving the body */
    PH_BUSY,    /* the request is being answered: request_timeout and MHD's idle timeout apply */
    PH_CLOSING, /* shut down by us; MHD has yet to notice */
    PH_N
} phase;

typedef struct track {
    struct track *prev, *next;
    int fd;
    phase ph;
    uint64_t deadline_ms; /* monotonic; 0 = none */
} track;

typedef struct {
    track *head, *tail;
} track_list;

/* Connections MHD may hold beyond max_connections: room for the newcomers
 * that displace waiting connections before MHD has closed those. MHD
 * accepts at most 10 per round, so this is ample. */
#define SRV_HTTP_RESERVE 64u

struct srv_http {
    uv_loop_t *loop;
    struct MHD_Daemon *d;
    uv_poll_t poll;
    uv_timer_t timer;
    int handles_open;
    int port;
    bool running; /* re-entrancy guard: MHD callbacks may call kick */
    MHD_AccessHandlerCallback handler;
    void *handler_cls;
    MHD_RequestCompletedCallback completed;
    void *completed_cls;
    uint64_t timeout_ms[PH_N]; /* per phase; 0 = none */
    unsigned max_connections;
    track_list lists[PH_N];
    unsigned n_live; /* tracked, not closing */
    srv_http_stats stats;
};

static uint64_t now_ms(void) { return uv_hrtime() / 1000000u; }

static void list_remove(srv_http *h, track *t) {
    track_list *l = &h->lists[t->ph];
    if (t->prev) t->prev->next = t->next;
    else l->head = t->next;
    if (t->next) t->next->prev = t->prev;
    else l->tail = t->prev;
    t->prev = t->next = NULL;
}

static void list_append(srv_http *h, track *t, phase ph) {
    track_list *l = &h->lists[ph];
    t->ph = ph;
    t->prev = l->tail;
    t->next = NULL;
    if (l->tail) l->tail->next = t;
    else l->head = t;
    l->tail = t;
}

static void track_move(srv_http *h, track *t, phase ph) {
    if (t->ph == PH_CLOSING) return;
    list_remove(h, t);
    if (ph == PH_CLOSING) h->n_live--;
    uint64_t to = h->timeout_ms[ph];
    t->deadline_ms = to ? now_ms() + to : 0;
    list_append(h, t, ph);
}

/* Ends a connection from our side: MHD sees end-of-file on its next read
 * and closes it as if the client had gone (shutdown wakes its epoll). */
static void track_close(srv_http *h, track *t) {
    if (t->fd >= 0) shutdown(t->fd, SHUT_RDWR);
    track_move(h, t, PH_CLOSING);
}

static track *track_of(struct MHD_Connection *conn) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

/* Closes every connection past its phase's deadline; returns the ms until
 * the next deadline (UINT64_MAX: none). */
static uint64_t sweep(srv_http *h) {
    uint64_t now = now_ms(), next = UINT64_MAX;
    static const phase timed[] = {PH_IDLE, PH_HEAD, PH_BODY};
    for (size_t i = 0; i < sizeof timed / sizeof timed[0]; i++) {
        phase ph = timed[i];
        track *t;
        while ((t = h->lists[ph].head) && t->deadline_ms && t->deadline_ms <= now) {
            if (ph == PH_IDLE) h->stats.idle_timeouts++;
            else if (ph == PH_HEAD) h->stats.header_timeouts++;
            else h->stats.body_timeouts++;
            srv_log(SRV_LOG_DEBUG, "http: closing a connection: %s not complete in time",
                    ph == PH_IDLE ? "next request line" : ph == PH_HEAD ? "request head" : "request body");
            track_close(h, t);
        }
        if (t && t->deadline_ms && t->deadline_ms - now < next) next = t->deadline_ms - now;
    }
    return next;
}

/* At the limit, the connection that has waited longest on its client
 * makes room: an idle kept-alive one first, then the slowest head, then
 * the slowest body. Requests being answered are never displaced. */
static void evict_one(srv_http *h, track *newcomer) {
    static const phase order[] = {PH_IDLE, PH_HEAD, PH_BODY};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        for (track *t = h->lists[order[i]].head; t; t = t->next)
            if (t != newcomer) {
                h->stats.evicted++;
                srv_log(SRV_LOG_DEBUG, "http: %u connections open; closing the longest-waiting one", h->n_live);
                track_close(h, t);
                return;
            }
}

static void notify_cb(void *cls, struct MHD_Connection *conn, void **socket_context,
                      enum MHD_ConnectionNotificationCode toe) {
    srv_http *h = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        track *t = calloc(1, sizeof *t);
        *socket_context = t;
        if (!t) return; /* untracked: only MHD's idle timeout applies */
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        t->fd = ci ? ci->connect_fd : -1;
        t->ph = PH_HEAD;
        uint64_t to = h->timeout_ms[PH_HEAD];
        t->deadline_ms = to ? now_ms() + to : 0;
        list_append(h, t, PH_HEAD);
        h->n_live++;
        if (h->n_live > h->max_connections) evict_one(h, t);
    } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED) {
        track *t = *socket_context;
        if (!t) return;
        if (t->ph != PH_CLOSING) h->n_live--;
        list_remove(h, t);
        free(t);
        *socket_context = NULL;
    }
}

/* The request line of a request on a kept-alive connection: its head's
 * deadline starts now. (A new connection's started at accept.) */
static void *uri_cb(void *cls, const char *uri, struct MHD_Connection *conn) {
    (void)uri;
    srv_http *h = cls;
    track *t = track_of(conn);
    if (t && t->ph == PH_IDLE) track_move(h, t, PH_HEAD);
    return NULL; /* the handler's *con_cls starts NULL */
}

/* MHD calls the handler once when the head is complete, then once per
 * body chunk, then once more with no data when the body is complete. */
static enum MHD_Result handler_cb(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_size,
                                  void **con_cls) {
    srv_http *h = cls;
    track *t = track_of(conn);
    if (t) {
        if (t->ph == PH_HEAD || t->ph == PH_IDLE) track_move(h, t, PH_BODY);
        else if (t->ph == PH_BODY && !*upload_size) track_move(h, t, PH_BUSY);
    }
    return h->handler(h->handler_cls, conn, url, method, version, upload_data, upload_size, con_cls);
}

static void completed_cb(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    srv_http *h = cls;
    track *t = track_of(conn);
    if (t && toe == MHD_REQUEST_TERMINATED_COMPLETED_OK) track_move(h, t, PH_IDLE);
    if (h->completed) h->completed(h->completed_cls, conn, con_cls, toe);
}

void srv_http_get_stats(const srv_http *h, srv_http_stats *out) { *out = h->stats; }

typedef struct {
    unsigned host, cl, te;
    const char *te_value;
} head_count;

static enum MHD_Result count_cb(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    (void)kind;
    head_count *c = cls;
    if (!strcasecmp(key, "Host")) c->host++;
    else if (!strcasecmp(key, "Content-Length")) c->cl++;
    else if (!strcasecmp(key, "Transfer-Encoding")) {
        c->te++;
        c->te_value = value;
    }
    return MHD_YES;
}

const char *srv_http_head_error(struct MHD_Connection *conn, const char *version) {
    head_count c = {0};
    MHD_get_connection_values(conn, MHD_HEADER_KIND, count_cb, &c);
    bool http11 = version && !strncmp(version, "HTTP/1.", 7) && strcmp(version, "HTTP/1.0");
    if (http11 && c.host == 0) return "HTTP/1.1 requests need a Host header";
    if (c.host > 1) return "more than one Host header";
    if (c.te && c.cl) return "Content-Length and Transfer-Encoding must not both be sent";
    if (c.te > 1 || (c.te && (!c.te_value || strcasecmp(c.te_value, "chunked"))))
        return "the only Transfer-Encoding accepted is a single \"chunked\"";
    if (c.cl > 1) return "more than one Content-Length header";
    return NULL;
}

/* Every connection holds a descriptor, so the soft limit (often 1024)
 * would cap connections below max_connections: raise it to the hard one.
 * Returns the limit in force. */
static unsigned long long raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl)) return 0;
    unsigned long long was = (unsigned long long)rl.rlim_cur;
    if (rl.rlim_cur != rl.rlim_max) {
        struct rlimit want = {.rlim_cur = rl.rlim_max, .rlim_max = rl.rlim_max};
        if (!setrlimit(RLIMIT_NOFILE, &want)) rl.rlim_cur = rl.rlim_max;
    }
    unsigned long long now = (unsigned long long)rl.rlim_cur;
    if (now != was) srv_log(SRV_LOG_INFO, "open files limit raised from %llu to %llu", was, now);
    else srv_log(SRV_LOG_INFO, "open files limit: %llu", now);
    return now;
}

static void mhd_log_cb(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = 0;
    srv_log(SRV_LOG_DEBUG, "http: %s", msg);
}

static void timer_cb(uv_timer_t *t);

void srv_http_kick(srv_http *h) {
    if (!h->d || h->running) return;
    h->running = true;
    MHD_run(h->d);
    h->running = false;
    uint64_t next = sweep(h);
    MHD_UNSIGNED_LONG_LONG ms;
    /* MHD_NO: no timeout pending; still re-check now and then so idle
     * connection timeouts are noticed. */
    if (MHD_get_timeout(h->d, &ms) != MHD_YES || ms > 1000) ms = 1000;
    if (next < ms) ms = next;
    uv_timer_start(&h->timer, timer_cb, ms, 0);
}

static void timer_cb(uv_timer_t *t) { srv_http_kick(t->data); }

static void poll_cb(uv_poll_t *p, int status, int events) {
    (void)status;
    (void)events;
    srv_http_kick(p->data);
}

static int resolve(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len) {
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        *len = sizeof *in4;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        *len = sizeof *in6;
        return 0;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    if (getaddrinfo(host, NULL, &hints, &res) || !res) return -1;
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    if (ss->ss_family == AF_INET) in4->sin_port = htons((uint16_t)port);
    else in6->sin6_port = htons((uint16_t)port);
    freeaddrinfo(res);
    return 0;
}

srv_http *srv_http_start(uv_loop_t *loop, const srv_http_opts *o, char *err, size_t errsz) {
    struct sockaddr_storage ss;
    socklen_t sl;
    if (resolve(o->host, o->port, &ss, &sl)) {
        snprintf(err, errsz, "cannot resolve host '%s'", o->host);
        return NULL;
    }
    srv_http *h = calloc(1, sizeof *h);
    if (!h) {
        snprintf(err, errsz, "out of memory");
        return NULL;
    }
    h->loop = loop;
    h->handler = o->handler;
    h->handler_cls = o->handler_cls;
    h->completed = o->completed;
    h->completed_cls = o->completed_cls;
    unsigned idle_s = o->idle_timeout_s ? o->idle_timeout_s : 60u;
    h->timeout_ms[PH_IDLE] = (uint64_t)idle_s * 1000u;
    h->timeout_ms[PH_HEAD] = o->header_timeout_s > 0 ? (uint64_t)(o->header_timeout_s * 1000.0 + 0.5) : 0;
    h->timeout_ms[PH_BODY] = o->body_timeout_s > 0 ? (uint64_t)(o->body_timeout_s * 1000.0 + 0.5) : 0;
    h->max_connections = o->max_connections ? o->max_connections : 1024u;
    unsigned long long nofile = raise_nofile();
    /* Beyond the connections: the listener, epoll, the model file, logs,
     * the engine's and libuv's threads' descriptors. */
    unsigned long long need = (unsigned long long)h->max_connections + SRV_HTTP_RESERVE + 64u;
    if (nofile && nofile < need) {
        unsigned long long fit = nofile > SRV_HTTP_RESERVE + 64u + 16u ? nofile - SRV_HTTP_RESERVE - 64u : 16u;
        srv_log(SRV_LOG_WARN, "open files limit %llu is too low for max_connections %u; holding at most %llu",
                nofile, h->max_connections, fit);
        h->max_connections = (unsigned)fit;
    }
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    if (ss.ss_family == AF_INET6) flags |= MHD_USE_IPv6;
    h->d = MHD_start_daemon(flags, (uint16_t)o->port, NULL, NULL, handler_cb, h,
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                            MHD_OPTION_NOTIFY_COMPLETED, completed_cb, h,
                            MHD_OPTION_NOTIFY_CONNECTION, notify_cb, h,
                            MHD_OPTION_URI_LOG_CALLBACK, uri_cb, h,
                            MHD_OPTION_CONNECTION_TIMEOUT, idle_s,
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, o->conn_memory ? o->conn_memory : (size_t)65536,
                            MHD_OPTION_CONNECTION_LIMIT, h->max_connections + SRV_HTTP_RESERVE,
                            MHD_OPTION_PER_IP_CONNECTION_LIMIT, o->max_per_ip,
                            MHD_OPTION_LISTEN_BACKLOG_SIZE, 512u,
                            MHD_OPTION_EXTERNAL_LOGGER, mhd_log_cb, NULL, MHD_OPTION_END);
    if (!h->d) {
        snprintf(err, errsz, "cannot listen on %s:%d (address in use or not permitted)", o->host, o->port);
        free(h);
        return NULL;
    }
    const union MHD_DaemonInfo *pi = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    h->port = pi ? pi->port : o->port;
    const union MHD_DaemonInfo *ei = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_EPOLL_FD);
    if (!ei || uv_poll_init(loop, &h->poll, ei->epoll_fd)) {
        snprintf(err, errsz, "cannot watch the HTTP epoll fd");
        MHD_stop_daemon(h->d);
        free(h);
        return NULL;
    }
    h->poll.data = h;
    uv_timer_init(loop, &h->timer);
    h->timer.data = h;
    h->handles_open = 2;
    uv_poll_start(&h->poll, UV_READABLE, poll_cb);
    srv_http_kick(h);
    return h;
}

int srv_http_port(const srv_http *h) { return h->port; }

void srv_http_quiesce(srv_http *h) {
    if (!h->d) return;
    MHD_socket fd = MHD_quiesce_daemon(h->d);
    if (fd != MHD_INVALID_SOCKET) close(fd);
}

unsigned srv_http_connections(const srv_http *h) {
    if (!h->d) return 0;
    const union MHD_DaemonInfo *i = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);
    return i ? i->num_connections : 0;
}

static void close_cb(uv_handle_t *hd) {
    srv_http *h = hd->data;
    if (--h->handles_open == 0) free(h);
}

void srv_http_stop(srv_http *h) {
    if (!h) return;
    uv_poll_stop(&h->poll);
    uv_timer_stop(&h->timer);
    if (h->d) MHD_stop_daemon(h->d);
    h->d = NULL;
    uv_close((uv_handle_t *)&h->poll, close_cb);
    uv_close((uv_handle_t *)&h->timer, close_cb);
}
