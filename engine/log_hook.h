/* log_hook.h - the one way engine/ and cuda/ code reports something that is
 * not an error return: a warning about a model file, a device failure's
 * details, a profile table.
 *
 * Lines go to a hook; by default that writes "moed: <msg>" to stderr. The
 * server sets its own (server/log.c) so they come out in its format, JSON
 * included. Levels are numbered as the server's (error 0 .. debug 3).
 *
 * Threads: any. moe_log_set_hook is meant for start-up, before other
 * threads log; the hook itself must be thread-safe.
 */
#ifndef MOE_LOG_HOOK_H
#define MOE_LOG_HOOK_H

#ifdef __cplusplus
extern "C" {
#endif

enum { MOE_LOG_ERROR = 0, MOE_LOG_WARN = 1, MOE_LOG_INFO = 2, MOE_LOG_DEBUG = 3 };

/* Receives one formatted line (no trailing newline). */
typedef void (*moe_log_fn)(void *arg, int level, const char *msg);

/* Formats and hands one line to the hook. Messages longer than 2 KiB are
 * cut. */
void moe_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Replaces the hook; fn NULL restores the stderr default. */
void moe_log_set_hook(moe_log_fn fn, void *arg);

#ifdef __cplusplus
}
#endif
#endif
