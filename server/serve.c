/* serve.c - `moed serve`. Placeholder until its issue lands. */
#include <stdio.h>

#include "cli.h"

int srv_cmd_serve(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "moed: 'serve' is not implemented yet\n");
    return 1;
}
