/* http.c - MHD inside a libuv loop (see http.h). */
#include "http.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

struct srv_http {
    uv_loop_t *loop;
    struct MHD_Daemon *d;
    uv_poll_t poll;
    uv_timer_t timer;
    int handles_open;
    int port;
    bool running; /* re-entrancy guard: MHD callbacks may call kick */
};

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
    MHD_UNSIGNED_LONG_LONG ms;
    /* MHD_NO: no timeout pending; still re-check now and then so idle
     * connection timeouts are noticed. */
    if (MHD_get_timeout(h->d, &ms) != MHD_YES || ms > 1000) ms = 1000;
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
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    if (ss.ss_family == AF_INET6) flags |= MHD_USE_IPv6;
    h->d = MHD_start_daemon(flags, (uint16_t)o->port, NULL, NULL, o->handler, o->handler_cls,
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                            MHD_OPTION_NOTIFY_COMPLETED, o->completed, o->completed_cls,
                            MHD_OPTION_CONNECTION_TIMEOUT, o->idle_timeout_s ? o->idle_timeout_s : 60u,
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, o->conn_memory ? o->conn_memory : (size_t)65536,
                            MHD_OPTION_CONNECTION_LIMIT, o->max_connections ? o->max_connections : 1024u,
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
