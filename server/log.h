/* log.h - the server's log lines on stderr: text or JSON, by level.
 *
 * One line per event; a request's line carries its id, model, token
 * counts, TTFT, total time and HTTP status. Prompt text is logged only
 * when the configuration asks for it (srv_log_prompt, info level).
 *
 * Threads: any (each line is written with one fwrite, under a lock).
 */
#ifndef SRV_LOG_H
#define SRV_LOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"

/* Sets the format, the threshold and whether prompts may be logged, and
 * routes the engine's and CUDA code's lines (moe_log) through srv_log. */
void srv_log_setup(srv_log_format fmt, srv_log_level level, bool log_prompts);
bool srv_log_enabled(srv_log_level level);

/* A free-form message. JSON: {"ts","level","msg"}. */
void srv_log(srv_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

typedef struct srv_log_request {
    const char *id;       /* "chatcmpl-..." or "-" */
    const char *method;
    const char *path;
    const char *model;    /* NULL when the request never got that far */
    int status;           /* HTTP status */
    int64_t prompt_tokens;
    int64_t completion_tokens;
    double ttft_ms;       /* < 0: none (no token, or not a generation) */
    double total_ms;
    bool stream;
    const char *finish;   /* "stop", "length", "cancelled", "error" or NULL */
    const char *error;    /* error message for 4xx/5xx, or NULL */
} srv_log_request;

/* The one line per request (info level; 5xx at warn). */
void srv_log_req(const srv_log_request *r);

/* The prompt text of a request (JSON-escaped), at info level, only with log_prompts. */
void srv_log_prompt(const char *id, const char *text, size_t len);

#endif
