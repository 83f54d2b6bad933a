/* cmd_info.c - `moed info`. Placeholder until its issue lands. */
#include <stdio.h>

#include "cli.h"

int srv_cmd_info(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "moed: 'info' is not implemented yet\n");
    return 1;
}
