/* log.c - stderr log lines (see log.h). */
#include "log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log_hook.h"
#include "utf8.h"

/* Atomic: a SIGHUP reload changes them on the loop thread while the
 * engine thread logs its load progress. */
static _Atomic int g_fmt = SRV_LOG_TEXT;
static _Atomic int g_level = SRV_LOG_INFO;
static _Atomic bool g_prompts;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

/* Longest line; a value is cut (with "...") so that the line fits. */
#define LINE_MAX_BYTES 8192
/* Longest single field value, so one long value leaves room for the rest. */
#define FIELD_MAX_BYTES 1024
#define PROMPT_MAX_BYTES 4096

/* Engine and CUDA lines (moe_log) become server lines, in its format. */
static void engine_line_cb(void *arg, int level, const char *msg) {
    (void)arg;
    srv_log_level l = level <= MOE_LOG_ERROR ? SRV_LOG_ERROR : level >= MOE_LOG_DEBUG ? SRV_LOG_DEBUG : (srv_log_level)level;
    srv_log(l, "%s", msg);
}

void srv_log_setup(srv_log_format fmt, srv_log_level level, bool log_prompts) {
    atomic_store(&g_fmt, (int)fmt);
    atomic_store(&g_level, (int)level);
    atomic_store(&g_prompts, log_prompts);
    moe_log_set_hook(engine_line_cb, NULL);
}

bool srv_log_enabled(srv_log_level level) { return (int)level <= atomic_load(&g_level); }

static const char HEX[] = "0123456789abcdef";

/* The escaped form of one input unit (a byte or a UTF-8 sequence) into
 * out (>= 8 bytes); returns its length. */
static size_t esc_unit(const unsigned char *s, size_t n, size_t *used, bool json, bool quoting, char *out) {
    uint32_t cp;
    int dk = moe_utf8_decode(s, n, &cp);
    if (dk < 0) { /* ill-formed: the one byte, as text "\xNN" */
        *used = 1;
        size_t o = 0;
        out[o++] = '\\';
        if (json) out[o++] = '\\';
        out[o++] = 'x';
        out[o++] = HEX[s[0] >> 4];
        out[o++] = HEX[s[0] & 15];
        return o;
    }
    size_t k = (size_t)dk;
    *used = k;
    if (cp == '\\') return memcpy(out, "\\\\", 2), 2;
    if (cp == '"' && (json || quoting)) return memcpy(out, "\\\"", 2), 2;
    if (cp == '\n') return memcpy(out, "\\n", 2), 2;
    if (cp == '\r') return memcpy(out, "\\r", 2), 2;
    if (cp == '\t') return memcpy(out, "\\t", 2), 2;
    /* C0, DEL and C1 (a terminal takes U+009B as CSI), and the Unicode
     * line/paragraph separators some viewers break lines at. */
    if (cp < 0x20 || (cp >= 0x7F && cp <= 0x9F) || cp == 0x2028 || cp == 0x2029) {
        if (!json && cp < 0x80) {
            out[0] = '\\', out[1] = 'x', out[2] = HEX[cp >> 4], out[3] = HEX[cp & 15];
            return 4;
        }
        out[0] = '\\', out[1] = 'u';
        for (int i = 0; i < 4; i++) out[2 + i] = HEX[(cp >> (12 - 4 * i)) & 15];
        return 6;
    }
    memcpy(out, s, k);
    return k;
}

size_t srv_log_escape(char *dst, size_t cap, const char *s, size_t len, srv_log_format fmt, bool bare,
                      bool *truncated) {
    const unsigned char *u = (const unsigned char *)(s ? s : "");
    if (!s) len = 0;
    bool json = fmt == SRV_LOG_JSON;
    bool quote = json;
    if (!json && !bare) {
        quote = len == 0;
        for (size_t i = 0; i < len && !quote; i++) quote = u[i] == ' ' || u[i] == '"' || u[i] == '=';
    }
    if (truncated) *truncated = false;
    if (cap < 8) { /* too small for anything useful; still a valid token */
        if (cap) dst[0] = 0;
        if (cap >= 3 && quote) memcpy(dst, "\"\"", 3);
        if (truncated) *truncated = len > 0;
        return cap >= 3 && quote ? 2 : 0;
    }
    /* room kept for "...", the closing quote and the NUL */
    size_t limit = cap - 3 - (quote ? 1 : 0) - 1, o = 0;
    if (quote) dst[o++] = '"';
    char unit[8];
    size_t i = 0;
    while (i < len) {
        size_t used, k = esc_unit(u + i, len - i, &used, json, quote, unit);
        if (o + k > limit) {
            memcpy(dst + o, "...", 3);
            o += 3;
            if (truncated) *truncated = true;
            break;
        }
        memcpy(dst + o, unit, k);
        o += k;
        i += used;
    }
    if (quote) dst[o++] = '"';
    dst[o] = 0;
    return o;
}

/* "2026-01-02T03:04:05.678Z" (24 chars + NUL) from the real-time clock,
 * by hand: gmtime_r and strftime are not async-signal-safe. */
static void timestamp(char out[32]) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t secs = (int64_t)ts.tv_sec, days = secs / 86400, rem = secs % 86400;
    if (rem < 0) rem += 86400, days--;
    /* civil date from days since 1970-01-01 (Howard Hinnant's algorithm) */
    int64_t z = days + 719468, era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097, yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t y = yoe + era * 400, doy = doe - (365 * yoe + yoe / 4 - yoe / 100), mp = (5 * doy + 2) / 153;
    int64_t d = doy - (153 * mp + 2) / 5 + 1, m = mp < 10 ? mp + 3 : mp - 9;
    if (m <= 2) y++;
    int64_t parts[] = {y, m, d, rem / 3600, rem / 60 % 60, rem % 60, ts.tv_nsec / 1000000};
    static const int width[] = {4, 2, 2, 2, 2, 2, 3};
    static const char sep[] = "--T::.Z";
    size_t o = 0;
    for (int p = 0; p < 7; p++) {
        int64_t v = parts[p];
        for (int w = width[p] - 1; w >= 0; w--) {
            out[o + (size_t)w] = (char)('0' + v % 10);
            v /= 10;
        }
        o += (size_t)width[p];
        out[o++] = sep[p];
    }
    out[o] = 0;
}

/* One line being built, in the format chosen at line_begin. */
typedef struct line {
    char buf[LINE_MAX_BYTES];
    size_t n;
    bool json;
} line;

static void put(line *l, const char *s, size_t n) {
    if (n > sizeof l->buf - 3 - l->n) n = sizeof l->buf - 3 - l->n; /* room for "}\n" and NUL */
    memcpy(l->buf + l->n, s, n);
    l->n += n;
}

static void put_s(line *l, const char *s) { put(l, s, strlen(s)); }

/* An escaped value of at most max output bytes (and what is left). */
static void put_val(line *l, const char *v, size_t len, size_t max, bool bare) {
    size_t room = sizeof l->buf - 3 - l->n;
    if (max > room) max = room;
    l->n += srv_log_escape(l->buf + l->n, max, v, len, l->json ? SRV_LOG_JSON : SRV_LOG_TEXT, bare, NULL);
}

/* key=value (text) or ,"key":"value" (JSON). */
static void field_n(line *l, const char *key, const char *v, size_t len, size_t max) {
    if (l->json) {
        put_s(l, ",");
        put_val(l, key, strlen(key), 64, false);
        put_s(l, ":");
    } else {
        put_s(l, " ");
        put_s(l, key);
        put_s(l, "=");
    }
    put_val(l, v, len, max, false);
}

static void field(line *l, const char *key, const char *v) {
    if (!v) v = "-";
    field_n(l, key, v, strlen(v), FIELD_MAX_BYTES);
}

/* A number or boolean, already formatted by us (never client text). */
static void field_raw(line *l, const char *key, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void field_raw(line *l, const char *key, const char *fmt, ...) {
    char v[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(v, sizeof v, fmt, ap);
    va_end(ap);
    if (l->json) {
        put_s(l, ",\"");
        put_s(l, key);
        put_s(l, "\":");
    } else {
        put_s(l, " ");
        put_s(l, key);
        put_s(l, "=");
    }
    put_s(l, v);
}

/* text: "<ts> <level> <msg>"; JSON: {"ts":..,"level":..,"msg":.. */
static void line_begin(line *l, bool json, srv_log_level level, const char *msg, size_t msg_len) {
    char ts[32];
    timestamp(ts);
    l->n = 0;
    l->json = json;
    const char *lv = srv_log_level_name(level);
    if (json) {
        put_s(l, "{\"ts\":\"");
        put_s(l, ts);
        put_s(l, "\",\"level\":\"");
        put_s(l, lv);
        put_s(l, "\",\"msg\":");
        put_val(l, msg, msg_len, LINE_MAX_BYTES / 2, true);
    } else {
        put_s(l, ts);
        put_s(l, " ");
        put_s(l, lv);
        for (size_t k = strlen(lv); k < 5; k++) put_s(l, " ");
        put_s(l, " ");
        put_val(l, msg, msg_len, LINE_MAX_BYTES / 2, true);
    }
}

static void line_finish(line *l) {
    if (l->json) l->buf[l->n++] = '}';
    l->buf[l->n++] = '\n';
    l->buf[l->n] = 0;
}

static void line_emit(line *l) {
    line_finish(l);
    pthread_mutex_lock(&g_lock);
    fwrite(l->buf, 1, l->n, stderr);
    fflush(stderr);
    pthread_mutex_unlock(&g_lock);
}

static bool is_json(void) { return atomic_load(&g_fmt) == SRV_LOG_JSON; }

void srv_log(srv_log_level level, const char *fmt, ...) {
    if (!srv_log_enabled(level)) return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    line l;
    line_begin(&l, is_json(), level, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
    line_emit(&l);
}

void srv_log_kv(srv_log_level level, const char *msg, const char *key, const char *value) {
    if (!srv_log_enabled(level)) return;
    line l;
    line_begin(&l, is_json(), level, msg, strlen(msg));
    field(&l, key, value);
    line_emit(&l);
}

void srv_log_kv_signal_safe(const char *msg, const char *key, const char *value) {
    /* static: a signal handler may run on a small stack; the caller exits
     * right after, so there is no second user */
    static line l;
    line_begin(&l, is_json(), SRV_LOG_ERROR, msg, strlen(msg));
    field(&l, key, value);
    line_finish(&l);
    for (size_t off = 0; off < l.n;) {
        ssize_t w = write(STDERR_FILENO, l.buf + off, l.n - off);
        if (w <= 0) break;
        off += (size_t)w;
    }
}

void srv_log_req(const srv_log_request *r) {
    srv_log_level level = r->status >= 500 ? SRV_LOG_WARN : SRV_LOG_INFO;
    if (!srv_log_enabled(level)) return;
    line l;
    bool json = is_json();
    line_begin(&l, json, level, "request", 7);
    field(&l, "id", r->id);
    if (json) {
        field(&l, "method", r->method);
        field(&l, "path", r->path);
    } else { /* "request id=... POST /v1/chat/completions status=200" */
        const char *m = r->method ? r->method : "-", *p = r->path ? r->path : "-";
        put_s(&l, " ");
        put_val(&l, m, strlen(m), 64, false);
        put_s(&l, " ");
        put_val(&l, p, strlen(p), FIELD_MAX_BYTES, false);
    }
    field_raw(&l, "status", "%d", r->status);
    if (r->model) {
        field(&l, "model", r->model);
        field_raw(&l, "stream", "%s", json ? (r->stream ? "true" : "false") : (r->stream ? "1" : "0"));
        field_raw(&l, "prompt_tokens", "%lld", (long long)r->prompt_tokens);
        field_raw(&l, "completion_tokens", "%lld", (long long)r->completion_tokens);
        if (r->ttft_ms >= 0) field_raw(&l, "ttft_ms", "%.1f", r->ttft_ms);
        if (r->has_energy) field_raw(&l, "energy_j", "%.6g", r->energy_joules);
        if (r->has_cost) field_raw(&l, "cost_usd", "%.6g", r->cost_usd);
    }
    field_raw(&l, "total_ms", "%.1f", r->total_ms);
    if (r->finish) field(&l, "finish", r->finish);
    if (r->error) field(&l, "error", r->error);
    line_emit(&l);
}

void srv_log_prompt(const char *id, const char *text, size_t len) {
    if (!atomic_load(&g_prompts) || !srv_log_enabled(SRV_LOG_INFO)) return;
    line l;
    bool json = is_json();
    line_begin(&l, json, SRV_LOG_INFO, "prompt", 6);
    field(&l, "id", id);
    field_n(&l, json ? "prompt" : "text", text ? text : "", text ? len : 0, PROMPT_MAX_BYTES);
    line_emit(&l);
}
