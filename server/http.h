/* http.h - libmicrohttpd driven by a libuv loop (external event loop).
 *
 * MHD runs with MHD_USE_EPOLL and no internal threads; its epoll fd is
 * watched by a uv_poll_t and its timeout by a uv_timer_t, and MHD_run()
 * is called after every event. Handlers may suspend connections
 * (MHD_ALLOW_SUSPEND_RESUME); after MHD_resume_connection() the caller
 * calls srv_http_kick() so MHD sees the change at once.
 *
 * Threads: the loop's thread only.
 */
#ifndef SRV_HTTP_H
#define SRV_HTTP_H

#include <microhttpd.h>
#include <stddef.h>
#include <uv.h>

typedef struct srv_http srv_http;

typedef struct srv_http_opts {
    const char *host;        /* IPv4 or IPv6 literal, or a name (resolved once) */
    int port;                /* 0 = any free port */
    unsigned idle_timeout_s; /* MHD connection timeout */
    size_t conn_memory;      /* per-connection buffer: the header size limit (431 above); 0 = 64 KiB */
    unsigned max_connections;/* 0 = 1024 */
    MHD_AccessHandlerCallback handler;
    void *handler_cls;
    MHD_RequestCompletedCallback completed;
    void *completed_cls;
} srv_http_opts;

/* Binds, listens and starts watching. Returns NULL with a reason in err. */
srv_http *srv_http_start(uv_loop_t *loop, const srv_http_opts *o, char *err, size_t errsz);
/* The bound port (useful with port 0). */
int srv_http_port(const srv_http *h);
/* Runs MHD now and re-arms the timer (after resume, or to flush). */
void srv_http_kick(srv_http *h);
/* Stops accepting: the listen socket is closed; open connections go on. */
void srv_http_quiesce(srv_http *h);
/* Connections currently open. */
unsigned srv_http_connections(const srv_http *h);
/* Stops MHD (every suspended connection must have been resumed) and
 * closes the uv handles; frees h once they are closed. */
void srv_http_stop(srv_http *h);

#endif
