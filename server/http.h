/* http.h - libmicrohttpd driven by a libuv loop (external event loop).
 *
 * MHD runs with MHD_USE_EPOLL and no internal threads; its epoll fd is
 * watched by a uv_poll_t and its timeout by a uv_timer_t, and MHD_run()
 * is called after every event. Handlers may suspend connections
 * (MHD_ALLOW_SUSPEND_RESUME); after MHD_resume_connection() the caller
 * calls srv_http_kick() so MHD sees the change at once.
 *
 * MHD's own timeout is an idle timeout: every byte restarts it, so a client
 * trickling one byte at a time would hold a connection forever. This layer
 * therefore tracks each connection's phase and gives each phase an
 * absolute deadline (head, body, and the wait of a kept-alive connection
 * for its next request line); a connection past its deadline is shut down.
 * At max_connections a new connection displaces the one that has waited
 * longest on its client, so a health probe always gets in.
 *
 * Threads: the loop's thread only.
 */
#ifndef SRV_HTTP_H
#define SRV_HTTP_H

#include <microhttpd.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct srv_http srv_http;

typedef struct srv_http_opts {
    const char *host;        /* IPv4 or IPv6 literal, or a name (resolved once) */
    int port;                /* 0 = any free port */
    unsigned idle_timeout_s; /* MHD connection timeout; also how long a kept-alive
                                connection may wait for its next request line */
    double header_timeout_s; /* a request head must be complete this long after the
                                connection (or its request line) began; 0 = none */
    double body_timeout_s;   /* a request body must be complete this long after its head; 0 = none */
    size_t conn_memory;      /* per-connection buffer: the header size limit (431 above); 0 = 64 KiB */
    unsigned max_connections;/* open connections before a new one displaces a waiting one; 0 = 1024 */
    unsigned max_per_ip;     /* connections one client address may hold; 0 = no cap */
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

/* Connections the server closed because the client was too slow or the
 * server was full (cumulative). */
typedef struct srv_http_stats {
    uint64_t header_timeouts; /* head not complete within header_timeout */
    uint64_t body_timeouts;   /* body not complete within body_timeout */
    uint64_t idle_timeouts;   /* kept-alive connection sent no request line within idle_timeout */
    uint64_t evicted;         /* displaced by a new connection at max_connections */
} srv_http_stats;
void srv_http_get_stats(const srv_http *h, srv_http_stats *out);

/* RFC 9112 framing the request head must not have: HTTP/1.1 without
 * exactly one Host (section 3.2), Content-Length together with
 * Transfer-Encoding or a Transfer-Encoding other than one "chunked", more
 * than one Content-Length (section 6.3). version is the handler's. Returns
 * NULL when the head is fine, else a static message for a 400 after which
 * the connection must be closed (its body length cannot be trusted). */
const char *srv_http_head_error(struct MHD_Connection *conn, const char *version);
/* Stops MHD (every suspended connection must have been resumed) and
 * closes the uv handles; frees h once they are closed. */
void srv_http_stop(srv_http *h);

#endif
