/* fault.c - SIGBUS from a model file that shrank (see fault.h). */
#include "fault.h"

#include <signal.h>
#include <string.h>
#include <unistd.h>

#include "gguf.h"
#include "log.h"
#include "status.h"

#define STR_(x) #x
#define STR(x) STR_(x)

static void sigbus_cb(int sig, siginfo_t *si, void *uctx) {
    (void)uctx;
    char path[512];
    /* si_code > 0: raised by the kernel for a fault, at si_addr */
    if (si && si->si_code > 0 && moe_gguf_mapping_lookup(si->si_addr, path, sizeof path)) {
        srv_log_kv_signal_safe("the model file shrank while mapped (replaced in place, not renamed?); "
                               "exiting with status " STR(SRV_EXIT_MODEL_CHANGED) " so that it is restarted",
                               "file", path);
        _exit(SRV_EXIT_MODEL_CHANGED);
    }
    /* Not ours: the default action, as if no handler were installed. A
     * fault re-executes the access on return and dies of it; a SIGBUS
     * sent by kill(2) is raised again, pending until we return. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    if (!si || si->si_code <= 0) raise(sig);
}

int srv_fault_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = sigbus_cb;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, NULL) ? MOE_EIO : 0;
}
