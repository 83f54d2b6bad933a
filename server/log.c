/* log.c - stderr log lines (see log.h). */
#include "log.h"

#include <cJSON.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log_hook.h"
#include "openai.h"

static srv_log_format g_fmt = SRV_LOG_TEXT;
static srv_log_level g_level = SRV_LOG_INFO;
static bool g_prompts;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

/* Engine and CUDA lines (moe_log) become server lines, in its format. */
static void engine_line_cb(void *arg, int level, const char *msg) {
    (void)arg;
    srv_log_level l = level <= MOE_LOG_ERROR ? SRV_LOG_ERROR : level >= MOE_LOG_DEBUG ? SRV_LOG_DEBUG : (srv_log_level)level;
    srv_log(l, "%s", msg);
}

void srv_log_setup(srv_log_format fmt, srv_log_level level, bool log_prompts) {
    g_fmt = fmt;
    g_level = level;
    g_prompts = log_prompts;
    moe_log_set_hook(engine_line_cb, NULL);
}

bool srv_log_enabled(srv_log_level level) { return level <= g_level; }

static void timestamp(char *buf, size_t n) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    size_t k = strftime(buf, n, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + k, n - k, ".%03ldZ", ts.tv_nsec / 1000000);
}

static void emit(const char *line) {
    pthread_mutex_lock(&g_lock);
    fputs(line, stderr);
    fflush(stderr);
    pthread_mutex_unlock(&g_lock);
}

/* JSON line from an object (consumed). */
static void emit_json(cJSON *o) {
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!s) return;
    size_t n = strlen(s);
    char *line = malloc(n + 2);
    if (line) {
        memcpy(line, s, n);
        line[n] = '\n';
        line[n + 1] = 0;
        emit(line);
        free(line);
    }
    free(s);
}

static cJSON *json_head(srv_log_level level) {
    char ts[40];
    timestamp(ts, sizeof ts);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "ts", ts);
    cJSON_AddStringToObject(o, "level", srv_log_level_name(level));
    return o;
}

void srv_log(srv_log_level level, const char *fmt, ...) {
    if (!srv_log_enabled(level)) return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (g_fmt == SRV_LOG_JSON) {
        cJSON *o = json_head(level);
        char *clean = srv_oai_utf8_clean(msg, strlen(msg));
        cJSON_AddStringToObject(o, "msg", clean ? clean : "");
        free(clean);
        emit_json(o);
        return;
    }
    char ts[40], line[2200];
    timestamp(ts, sizeof ts);
    snprintf(line, sizeof line, "%s %-5s %s\n", ts, srv_log_level_name(level), msg);
    emit(line);
}

void srv_log_req(const srv_log_request *r) {
    srv_log_level level = r->status >= 500 ? SRV_LOG_WARN : SRV_LOG_INFO;
    if (!srv_log_enabled(level)) return;
    if (g_fmt == SRV_LOG_JSON) {
        cJSON *o = json_head(level);
        cJSON_AddStringToObject(o, "msg", "request");
        cJSON_AddStringToObject(o, "id", r->id ? r->id : "-");
        cJSON_AddStringToObject(o, "method", r->method ? r->method : "-");
        cJSON_AddStringToObject(o, "path", r->path ? r->path : "-");
        cJSON_AddNumberToObject(o, "status", r->status);
        if (r->model) {
            cJSON_AddStringToObject(o, "model", r->model);
            cJSON_AddBoolToObject(o, "stream", r->stream);
            cJSON_AddNumberToObject(o, "prompt_tokens", (double)r->prompt_tokens);
            cJSON_AddNumberToObject(o, "completion_tokens", (double)r->completion_tokens);
            if (r->ttft_ms >= 0) cJSON_AddNumberToObject(o, "ttft_ms", (double)(int64_t)(r->ttft_ms * 10) / 10);
        }
        cJSON_AddNumberToObject(o, "total_ms", (double)(int64_t)(r->total_ms * 10) / 10);
        if (r->finish) cJSON_AddStringToObject(o, "finish", r->finish);
        if (r->error) {
            char *clean = srv_oai_utf8_clean(r->error, strlen(r->error));
            cJSON_AddStringToObject(o, "error", clean ? clean : "");
            free(clean);
        }
        emit_json(o);
        return;
    }
    char ts[40], line[1024];
    timestamp(ts, sizeof ts);
    int k = snprintf(line, sizeof line, "%s %-5s request id=%s %s %s status=%d", ts, srv_log_level_name(level),
                     r->id ? r->id : "-", r->method ? r->method : "-", r->path ? r->path : "-", r->status);
    if (r->model && k < (int)sizeof line)
        k += snprintf(line + k, sizeof line - (size_t)k, " model=%s stream=%d prompt_tokens=%lld completion_tokens=%lld",
                      r->model, r->stream, (long long)r->prompt_tokens, (long long)r->completion_tokens);
    if (r->model && r->ttft_ms >= 0 && k < (int)sizeof line)
        k += snprintf(line + k, sizeof line - (size_t)k, " ttft_ms=%.1f", r->ttft_ms);
    if (k < (int)sizeof line) k += snprintf(line + k, sizeof line - (size_t)k, " total_ms=%.1f", r->total_ms);
    if (r->finish && k < (int)sizeof line) k += snprintf(line + k, sizeof line - (size_t)k, " finish=%s", r->finish);
    if (r->error && k < (int)sizeof line) k += snprintf(line + k, sizeof line - (size_t)k, " error=\"%.300s\"", r->error);
    if (k >= (int)sizeof line - 1) k = (int)sizeof line - 2;
    line[k] = '\n';
    line[k + 1] = 0;
    emit(line);
}

void srv_log_prompt(const char *id, const char *text, size_t len) {
    if (!g_prompts || !srv_log_enabled(SRV_LOG_INFO)) return;
    char *clean = srv_oai_utf8_clean(text, len);
    if (!clean) return;
    if (g_fmt == SRV_LOG_JSON) {
        cJSON *o = json_head(SRV_LOG_INFO);
        cJSON_AddStringToObject(o, "msg", "prompt");
        cJSON_AddStringToObject(o, "id", id);
        cJSON_AddStringToObject(o, "prompt", clean);
        emit_json(o);
    } else {
        /* quoted with escapes, so a prompt cannot forge log lines */
        cJSON *s = cJSON_CreateString(clean);
        char *q = cJSON_PrintUnformatted(s);
        cJSON_Delete(s);
        srv_log(SRV_LOG_INFO, "prompt id=%s text=%.1900s", id, q ? q : "");
        free(q);
    }
    free(clean);
}
