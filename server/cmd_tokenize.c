/* cmd_tokenize.c - `moed tokenize` / `moed detokenize`. Placeholder until its issue lands. */
#include <stdio.h>

#include "cli.h"

int srv_cmd_tokenize(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "moed: 'tokenize' is not implemented yet\n");
    return 1;
}

int srv_cmd_detokenize(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "moed: 'detokenize' is not implemented yet\n");
    return 1;
}
