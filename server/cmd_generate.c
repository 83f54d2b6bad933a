/* cmd_generate.c - `moed generate`. Placeholder until its issue lands. */
#include <stdio.h>

#include "cli.h"

int srv_cmd_generate(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "moed: 'generate' is not implemented yet\n");
    return 1;
}
