/* cli.h - the subcommands of the `moed` binary.
 *
 * Each takes the arguments after the subcommand name (argv[0] is the
 * subcommand itself) and returns the process exit status: 0 on success,
 * 1 on a runtime failure, 2 on a usage error. Main thread only.
 */
#ifndef SRV_CLI_H
#define SRV_CLI_H

#include <stdint.h>

#ifndef MOED_VERSION
#define MOED_VERSION "0.1.0"
#endif

int srv_cmd_serve(int argc, char **argv);      /* server/serve.c */
int srv_cmd_generate(int argc, char **argv);   /* server/cmd_generate.c */
int srv_cmd_bench(int argc, char **argv);      /* server/cmd_bench.c */
int srv_cmd_info(int argc, char **argv);       /* server/cmd_info.c */
int srv_cmd_mkmodel(int argc, char **argv);    /* server/cmd_mkmodel.c */
int srv_cmd_convert(int argc, char **argv);    /* server/cmd_convert.c */
int srv_cmd_tokenize(int argc, char **argv);   /* server/cmd_tokenize.c */
int srv_cmd_detokenize(int argc, char **argv); /* server/cmd_tokenize.c */
int srv_cmd_quantize(int argc, char **argv);   /* server/cmd_quantize.c */
int srv_cmd_perplexity(int argc, char **argv); /* server/cmd_perplexity.c */

/* Helpers for the subcommands (server/cli.c). Any thread. */
double srv_cli_now_s(void);             /* CLOCK_MONOTONIC, in seconds */

#endif
