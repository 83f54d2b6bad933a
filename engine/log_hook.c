/* log_hook.c - the engine's log hook (see log_hook.h). */
#include "log_hook.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>

static void stderr_cb(void *arg, int level, const char *msg) {
    (void)arg;
    (void)level;
    fprintf(stderr, "moed: %s\n", msg);
}

/* One pointer pair swapped at start-up; atomics keep a late swap from
 * being a data race, while a line logged during the swap may still reach
 * the old hook, which is harmless. */
static _Atomic(moe_log_fn) g_fn = stderr_cb;
static _Atomic(void *) g_arg = NULL;

void moe_log_set_hook(moe_log_fn fn, void *arg) {
    atomic_store(&g_arg, arg);
    atomic_store(&g_fn, fn ? fn : stderr_cb);
}

void moe_log(int level, const char *fmt, ...) {
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    atomic_load(&g_fn)(atomic_load(&g_arg), level, msg);
}
