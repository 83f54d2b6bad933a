/* log.h - the server's log lines on stderr: text or JSON, by level.
 *
 * One line per event; a request's line carries its id, model, token
 * counts, TTFT, total time and HTTP status. Prompt text is logged only
 * when the configuration asks for it (srv_log_prompt, info level).
 *
 * Every string that goes into a line - a field value or a free-form
 * message, trusted or sent by a client - passes through srv_log_escape,
 * so no input can end a line early, forge a field, put terminal escape
 * sequences into the log or make a JSON line unparseable.
 *
 * Threads: any (each line is written with one fwrite, under a lock);
 * srv_log_setup may run while other threads log.
 */
#ifndef SRV_LOG_H
#define SRV_LOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"

/* Sets the format, the threshold and whether prompts may be logged. Can
 * be called again at any time (SIGHUP reload); lines already being
 * written keep the format they started with. Routes the engine's and CUDA
 * code's lines (moe_log) through srv_log. */
void srv_log_setup(srv_log_format fmt, srv_log_level level, bool log_prompts);
bool srv_log_enabled(srv_log_level level);

/* Escapes s[0..len) into dst (capacity cap >= 8, always NUL-terminated)
 * and returns the length written.
 *
 * fmt SRV_LOG_JSON: a complete JSON string literal, quotes included:
 * '"' and '\' backslash-escaped, control characters (C0, DEL, and the
 * C1 range U+0080..U+009F) as \u00XX, and each byte that is not part of
 * well-formed UTF-8 as the six characters \\xNN (so the decoded value
 * reads \xNN, as in text). Any input yields valid JSON.
 *
 * fmt SRV_LOG_TEXT: the value as it follows "key=": '\' as \\, newline,
 * CR and tab as \n \r \t, other control characters as \xNN (C1 as
 * \u00XX), ill-formed UTF-8 bytes as \xNN; the result is wrapped in
 * "..." (with '"' as \") when it is empty or holds a space, '"' or '=',
 * unless bare is set (bare: free-form messages, never quoted; '"' then
 * stays as it is).
 *
 * Output that does not fit ends with "..." (inside the quotes, never in
 * the middle of an escape) and *truncated is set (may be NULL).
 * Async-signal-safe (no allocation, no locale, no stdio). */
size_t srv_log_escape(char *dst, size_t cap, const char *s, size_t len, srv_log_format fmt, bool bare,
                      bool *truncated);

/* A free-form message. JSON: {"ts","level","msg"}. The formatted text is
 * escaped as a whole (bare text), so %s arguments from clients are safe. */
void srv_log(srv_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A message with one string field: text "<msg> key=value", JSON
 * {"ts","level","msg","key"}. For messages about one named thing (a
 * file, a key list) that must stay machine-readable. */
void srv_log_kv(srv_log_level level, const char *msg, const char *key, const char *value);

/* For fatal signal handlers only: srv_log_kv at error level, built without
 * locks, allocation or stdio and written with write(2) to stderr.
 * Async-signal-safe; ignores the level threshold. */
void srv_log_kv_signal_safe(const char *msg, const char *key, const char *value);

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
    bool has_energy;      /* energy_joules is set (energy accounting on, the generation finished) */
    double energy_joules;
    bool has_cost;        /* cost_usd is set (a price is configured) */
    double cost_usd;
} srv_log_request;

/* The one line per request (info level; 5xx at warn). */
void srv_log_req(const srv_log_request *r);

/* The prompt text of a request, at info level, only with log_prompts. */
void srv_log_prompt(const char *id, const char *text, size_t len);

#endif
