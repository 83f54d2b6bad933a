/* metrics.h - Prometheus text exposition of the server and engine state.
 *
 * The server keeps latency histograms (time to first token, inter-token
 * latency, request duration) and per-status request counters here; the
 * engine's counters and batch-size histogram come from moe_engine_stats
 * at render time.
 *
 * Threads: one owner thread (the server's loop) updates and renders.
 */
#ifndef SRV_METRICS_H
#define SRV_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"

#define SRV_HIST_MAX 24

typedef struct srv_hist {
    int n_bounds;
    double bounds[SRV_HIST_MAX];       /* upper bounds, ascending; +Inf implied */
    uint64_t counts[SRV_HIST_MAX + 1]; /* per bucket, not cumulative */
    double sum;
    uint64_t count;
} srv_hist;

typedef struct srv_metrics {
    srv_hist ttft;     /* seconds from request arrival to first token */
    srv_hist itl;      /* seconds between tokens of a choice */
    srv_hist e2e;      /* seconds from arrival to the end of the response */
    uint64_t http_requests[600]; /* by status code */
    uint64_t requests_cancelled; /* client went away / timeout / drain */
    /* connections, copied from the HTTP layer before each render */
    uint64_t http_connections;   /* open now */
    uint64_t http_closed_header_timeout, http_closed_body_timeout, http_closed_idle_timeout, http_closed_evicted;
    /* prices (config cost_per_hour, energy_price) for the cost series */
    double cost_per_hour, energy_price;
} srv_metrics;

void srv_metrics_init(srv_metrics *m);
void srv_hist_observe(srv_hist *h, double v);
void srv_metrics_count_status(srv_metrics *m, int status);

/* What `seconds` of machine time and `joules` of energy cost at
 * cost_per_hour $/h and energy_price $/kWh. Linear, so the costs of the
 * requests sum to the cost of their sums (docs/cost.md). */
double srv_cost_usd(double joules, double seconds, double cost_per_hour, double energy_price);

/* Renders everything as Prometheus text format 0.0.4. model labels the
 * engine series. Returns a malloc'd string (length in *len), NULL on ENOMEM. */
char *srv_metrics_render(const srv_metrics *m, const moe_engine_stats *st, const char *model, size_t *len);

#endif
