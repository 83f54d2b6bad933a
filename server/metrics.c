/* metrics.c - Prometheus text format (see metrics.h). */
#include "metrics.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void hist_init(srv_hist *h, const double *b, int n) {
    memset(h, 0, sizeof *h);
    h->n_bounds = n;
    memcpy(h->bounds, b, (size_t)n * sizeof *b);
}

void srv_metrics_init(srv_metrics *m) {
    memset(m, 0, sizeof *m);
    static const double ttft[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
    static const double itl[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5};
    static const double e2e[] = {0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600};
    hist_init(&m->ttft, ttft, (int)(sizeof ttft / sizeof *ttft));
    hist_init(&m->itl, itl, (int)(sizeof itl / sizeof *itl));
    hist_init(&m->e2e, e2e, (int)(sizeof e2e / sizeof *e2e));
}

void srv_hist_observe(srv_hist *h, double v) {
    int i = 0;
    while (i < h->n_bounds && v > h->bounds[i]) i++;
    h->counts[i]++;
    h->sum += v;
    h->count++;
}

double srv_cost_usd(double joules, double seconds, double cost_per_hour, double energy_price) {
    return seconds * cost_per_hour / 3600.0 + joules / 3.6e6 * energy_price;
}

void srv_metrics_count_status(srv_metrics *m, int status) {
    if (status >= 0 && status < 600) m->http_requests[status]++;
}

typedef struct {
    char *buf;
    size_t len, cap;
    int oom;
} sbuf;

static void put(sbuf *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(sbuf *s, const char *fmt, ...) {
    if (s->oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(s->buf + s->len, s->cap - s->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            s->oom = 1;
            return;
        }
        if ((size_t)n < s->cap - s->len) {
            s->len += (size_t)n;
            return;
        }
        size_t cap = s->cap * 2 + (size_t)n;
        char *b = realloc(s->buf, cap);
        if (!b) {
            s->oom = 1;
            return;
        }
        s->buf = b;
        s->cap = cap;
    }
}

static void put_hist(sbuf *s, const char *name, const char *help, const srv_hist *h, const char *model) {
    put(s, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < h->n_bounds; i++) {
        cum += h->counts[i];
        put(s, "%s_bucket{model=\"%s\",le=\"%g\"} %llu\n", name, model, h->bounds[i], (unsigned long long)cum);
    }
    cum += h->counts[h->n_bounds];
    put(s, "%s_bucket{model=\"%s\",le=\"+Inf\"} %llu\n", name, model, (unsigned long long)cum);
    put(s, "%s_sum{model=\"%s\"} %.9g\n%s_count{model=\"%s\"} %llu\n", name, model, h->sum, name, model,
        (unsigned long long)h->count);
}

static void put_gauge(sbuf *s, const char *name, const char *type, const char *help, const char *model, double v) {
    put(s, "# HELP %s %s\n# TYPE %s %s\n%s{model=\"%s\"} %.17g\n", name, help, name, type, name, model, v);
}

char *srv_metrics_render(const srv_metrics *m, const moe_engine_stats *st, const char *model, size_t *len) {
    sbuf s = {malloc(8192), 0, 8192, 0};
    if (!s.buf) return NULL;
    /* Label values are the served model name: keep them printable and unquoted. */
    char lbl[128];
    size_t k = 0;
    for (const char *p = model ? model : ""; *p && k < sizeof lbl - 1; p++)
        lbl[k++] = (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20) ? '_' : *p;
    lbl[k] = 0;
    put_gauge(&s, "moed_engine_ready", "gauge", "1 when the engine accepts requests", lbl,
              st->state == MOE_ENGINE_READY);
    put_gauge(&s, "moed_requests_running", "gauge", "requests with at least one running sequence", lbl,
              (double)st->requests_running);
    put_gauge(&s, "moed_requests_waiting", "gauge", "requests queued for admission", lbl, (double)st->requests_waiting);
    put_gauge(&s, "moed_sequences_running", "gauge", "running sequences (choices)", lbl, (double)st->seqs_running);
    put_gauge(&s, "moed_kv_blocks_used", "gauge", "KV cache blocks in use", lbl, (double)st->kv_blocks_used);
    put_gauge(&s, "moed_kv_blocks_total", "gauge", "KV cache blocks", lbl, (double)st->kv_blocks_total);
    put_gauge(&s, "moed_kv_cache_usage_ratio", "gauge", "fraction of KV blocks in use", lbl,
              st->kv_blocks_total ? (double)st->kv_blocks_used / (double)st->kv_blocks_total : 0);
    put_gauge(&s, "moed_prompt_tokens_total", "counter", "prompt tokens processed (prefill, incl. recompute)", lbl,
              (double)st->prompt_tokens_total);
    put_gauge(&s, "moed_generation_tokens_total", "counter", "tokens generated", lbl,
              (double)st->generation_tokens_total);
    put_gauge(&s, "moed_requests_finished_total", "counter", "engine requests finished", lbl,
              (double)st->requests_finished_total);
    put_gauge(&s, "moed_preemptions_total", "counter", "sequences preempted for KV memory", lbl,
              (double)st->preemptions_total);
    put_gauge(&s, "moed_engine_steps_total", "counter", "engine steps (batched forward passes)", lbl,
              (double)st->steps_total);
    put_gauge(&s, "moed_requests_cancelled_total", "counter", "requests cancelled (client gone, timeout, drain)", lbl,
              (double)m->requests_cancelled);
    if (st->energy_source) {
        const moe_energy_totals *en = &st->energy;
        /* the source is a label value from a fixed set (energy.h) */
        put(&s, "# HELP moed_energy_joules_total energy the source measured since the engine started "
                "(source estimate: a model from energy_idle_watts/energy_busy_watts, not a measurement)\n"
                "# TYPE moed_energy_joules_total counter\nmoed_energy_joules_total{model=\"%s\",source=\"%s\"} %.17g\n",
            lbl, st->energy_source, en->joules);
        put_gauge(&s, "moed_energy_attributed_joules_total", "counter",
                  "energy charged to requests (the sum of their usage.energy_joules)", lbl, en->attributed_joules);
        put_gauge(&s, "moed_energy_idle_joules_total", "counter",
                  "energy not charged to any request: idle waits and failed steps", lbl, en->idle_joules);
        put_gauge(&s, "moed_energy_attributed_seconds_total", "counter",
                  "engine step wall time charged to requests (what cost_per_hour is charged over)", lbl,
                  en->attributed_seconds);
        put_gauge(&s, "moed_energy_idle_seconds_total", "counter", "engine time not charged to any request", lbl,
                  en->idle_seconds);
        put_gauge(&s, "moed_cost_usd_total", "counter",
                  "cost charged to requests at cost_per_hour and energy_price (the sum of their usage.cost_usd)", lbl,
                  srv_cost_usd(en->attributed_joules, en->attributed_seconds, m->cost_per_hour, m->energy_price));
        double wt = (double)en->window_tokens;
        put_gauge(&s, "moed_energy_joules_per_token", "gauge",
                  "attributed joules per computed token (prompt + generated) over the last 60 s of steps; 0 when none",
                  lbl, wt > 0 ? en->window_joules / wt : 0);
        put_gauge(&s, "moed_cost_usd_per_1m_tokens", "gauge",
                  "cost per million computed tokens (prompt + generated) over the last 60 s of steps; 0 when none",
                  lbl,
                  wt > 0 ? srv_cost_usd(en->window_joules, en->window_seconds, m->cost_per_hour, m->energy_price) /
                               wt * 1e6
                         : 0);
    }
    /* engine batch-size histogram: counts per bucket -> cumulative */
    static const char *le[9] = {"1", "2", "4", "8", "16", "32", "64", "128", "+Inf"};
    put(&s, "# HELP moed_batch_size sequences per engine step\n# TYPE moed_batch_size histogram\n");
    uint64_t cum = 0;
    for (int i = 0; i < 9; i++) {
        cum += st->batch_hist[i];
        put(&s, "moed_batch_size_bucket{model=\"%s\",le=\"%s\"} %llu\n", lbl, le[i], (unsigned long long)cum);
    }
    put(&s, "moed_batch_size_sum{model=\"%s\"} %llu\nmoed_batch_size_count{model=\"%s\"} %llu\n", lbl,
        (unsigned long long)st->batch_seqs_total, lbl, (unsigned long long)cum);
    put_hist(&s, "moed_time_to_first_token_seconds", "time from request arrival to its first token", &m->ttft, lbl);
    put_hist(&s, "moed_inter_token_latency_seconds", "time between consecutive tokens of a choice", &m->itl, lbl);
    put_hist(&s, "moed_request_duration_seconds", "time from request arrival to the end of its response", &m->e2e,
             lbl);
    put(&s, "# HELP moed_http_requests_total HTTP requests answered, by status code\n"
            "# TYPE moed_http_requests_total counter\n");
    for (int c = 100; c < 600; c++)
        if (m->http_requests[c]) put(&s, "moed_http_requests_total{code=\"%d\"} %llu\n", c, (unsigned long long)m->http_requests[c]);
    put(&s, "# HELP moed_http_connections HTTP connections open\n# TYPE moed_http_connections gauge\n"
            "moed_http_connections %llu\n", (unsigned long long)m->http_connections);
    put(&s, "# HELP moed_http_closed_total connections the server closed: request head or body not complete in time, "
            "a kept-alive connection idle too long, or displaced at max_connections\n"
            "# TYPE moed_http_closed_total counter\n"
            "moed_http_closed_total{reason=\"header_timeout\"} %llu\n"
            "moed_http_closed_total{reason=\"body_timeout\"} %llu\n"
            "moed_http_closed_total{reason=\"idle_timeout\"} %llu\n"
            "moed_http_closed_total{reason=\"evicted\"} %llu\n",
        (unsigned long long)m->http_closed_header_timeout, (unsigned long long)m->http_closed_body_timeout,
        (unsigned long long)m->http_closed_idle_timeout, (unsigned long long)m->http_closed_evicted);
    if (s.oom) {
        free(s.buf);
        return NULL;
    }
    if (len) *len = s.len;
    return s.buf;
}
