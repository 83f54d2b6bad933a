/* main.c - `moed`: dispatch to a subcommand; `moed` alone serves. */
#include <stdio.h>
#include <string.h>

#include "cli.h"

typedef struct {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help;
} command;

static const command commands[] = {
    {"serve", srv_cmd_serve, "serve the OpenAI and Anthropic HTTP APIs (the default)"},
    {"generate", srv_cmd_generate, "complete one prompt and print it"},
    {"info", srv_cmd_info, "show a model file's metadata and tensors"},
    {"mkmodel", srv_cmd_mkmodel, "write a random-weight model of a real architecture"},
    {"convert", srv_cmd_convert, "convert a Hugging Face checkpoint directory to GGUF"},
    {"tokenize", srv_cmd_tokenize, "print the token ids of a text"},
    {"detokenize", srv_cmd_detokenize, "print the text of token ids"},
    {"bench", srv_cmd_bench, "measure prefill/decode speed against memory bandwidth"},
    {"quantize", srv_cmd_quantize, "write a copy of a model with quantized weights"},
    {"perplexity", srv_cmd_perplexity, "measure perplexity (and KL vs a reference run) on a text"},
};

static void usage(FILE *f) {
    fprintf(f, "usage: moed [COMMAND] [OPTIONS]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        fprintf(f, "  %-11s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\n`moed COMMAND --help` describes a command's options.\n");
}

int main(int argc, char **argv) {
    if (argc < 2 || argv[1][0] == '-') {
        if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
            usage(stdout);
            return 0;
        }
        if (argc >= 2 && !strcmp(argv[1], "--version")) {
            printf("moed %s\n", MOED_VERSION);
            return 0;
        }
        /* `moed --port 8080 ...` means `moed serve --port 8080 ...`. */
        argv[0] = "serve";
        return srv_cmd_serve(argc, argv);
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (!strcmp(argv[1], commands[i].name)) {
            /* getopt_long names argv[0] in its messages: "moed info: unrecognized option" */
            static char name[32];
            snprintf(name, sizeof name, "moed %s", commands[i].name);
            argv[1] = name;
            return commands[i].fn(argc - 1, argv + 1);
        }
    if (!strcmp(argv[1], "help")) {
        /* `moed help serve` is `moed serve --help` */
        for (size_t i = 0; argc >= 3 && i < sizeof(commands) / sizeof(commands[0]); i++)
            if (!strcmp(argv[2], commands[i].name)) {
                char *args[] = {argv[2], "--help", NULL};
                return commands[i].fn(2, args);
            }
        if (argc >= 3) {
            fprintf(stderr, "moed: unknown command '%s'\n", argv[2]);
            usage(stderr);
            return 2;
        }
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "moed: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
