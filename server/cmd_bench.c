/* cmd_bench.c - `moed bench`. Placeholder until its issue lands. */
#include <stdio.h>

#include "cli.h"

int srv_cmd_bench(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "moed: 'bench' is not implemented yet\n");
    return 1;
}
