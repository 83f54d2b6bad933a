/* notify.c - sd_notify wrappers (see notify.h). libsystemd does the socket
 * work (abstract sockets, credentials); we only format messages. */
#include "notify.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <systemd/sd-daemon.h>

static bool active;

bool srv_notify_init(uint64_t *watchdog_usec) {
    const char *s = getenv("NOTIFY_SOCKET");
    active = s && *s;
    uint64_t usec = 0;
    /* sd_watchdog_enabled checks WATCHDOG_PID against us; 0 unset = keep env */
    if (active && sd_watchdog_enabled(0, &usec) <= 0) usec = 0;
    if (watchdog_usec) *watchdog_usec = usec;
    return active;
}

void srv_notify_status(const char *fmt, ...) {
    if (!active) return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    sd_notifyf(0, "STATUS=%s", msg);
}

void srv_notify_ready(const char *status) {
    if (!active) return;
    sd_notifyf(0, "READY=1\nSTATUS=%s", status ? status : "serving");
}

void srv_notify_watchdog(void) {
    if (active) sd_notify(0, "WATCHDOG=1");
}

void srv_notify_stopping(void) {
    if (active) sd_notify(0, "STOPPING=1\nSTATUS=draining");
}
