/* cmd_mkmodel.c - `moed mkmodel`. Placeholder until its issue lands. */
#include <stdio.h>

#include "cli.h"

int srv_cmd_mkmodel(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "moed: 'mkmodel' is not implemented yet\n");
    return 1;
}
