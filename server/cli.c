/* cli.c - small helpers shared by the subcommands (cli.h). */
#include "cli.h"

#include <time.h>

double srv_cli_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
