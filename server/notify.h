/* notify.h - systemd service notifications (sd_notify) for Type=notify.
 *
 * All calls are no-ops when the process was not started by systemd (no
 * NOTIFY_SOCKET in the environment), so they are always safe to call.
 * Any thread; errors are ignored (a lost notification must never stop
 * the server), except that srv_notify_init reports whether it is active.
 */
#ifndef SRV_NOTIFY_H
#define SRV_NOTIFY_H

#include <stdbool.h>
#include <stdint.h>

/* Reads NOTIFY_SOCKET / WATCHDOG_USEC once. Returns true when notifications
 * go somewhere. *watchdog_usec (may be NULL) gets the watchdog interval
 * systemd asked for, 0 when none: send srv_notify_watchdog() at least
 * every half of it. */
bool srv_notify_init(uint64_t *watchdog_usec);
/* STATUS=<text> (shown by systemctl status), e.g. during model load. */
void srv_notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* READY=1 with a final STATUS: the model is loaded and the server listens. */
void srv_notify_ready(const char *status);
/* WATCHDOG=1: the engine's heartbeat is fresh. */
void srv_notify_watchdog(void);
/* STOPPING=1: draining after SIGTERM. */
void srv_notify_stopping(void);

#endif
