/* config.h - `moed serve` options from flags, MOED_* variables and a file.
 *
 * Every option has one key (the file key, e.g. "ctx_size"), one flag
 * ("--ctx-size", dashes for underscores) and one environment variable
 * ("MOED_CTX_SIZE"). Precedence: flag > environment > file > default;
 * srv_config_from_args applies them in the reverse order so that each
 * later source overwrites the earlier ones. The file is `key = value`
 * lines; '#' starts a comment; blank lines are ignored; values may be
 * quoted with "..." (to keep a '#' or spaces at the ends).
 *
 * Lists (api_key, cors_origins) are comma-separated; an api_key value
 * that holds no key ("", ",", spaces) is an error, not an open server. Durations are in
 * seconds (fractions allowed). Sizes are plain integers.
 *
 * Defaults live in one place, config.c's option table (engine ones in
 * engine.h's MOE_DEFAULT_*); `moed serve --help` prints them.
 *
 * Threads: not thread-safe; build the config on the main thread, then
 * treat it as read-only.
 */
#ifndef SRV_CONFIG_H
#define SRV_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum srv_log_format { SRV_LOG_TEXT = 0, SRV_LOG_JSON = 1 } srv_log_format;
typedef enum srv_log_level { SRV_LOG_ERROR = 0, SRV_LOG_WARN = 1, SRV_LOG_INFO = 2, SRV_LOG_DEBUG = 3 } srv_log_level;

typedef struct srv_config {
    char *host;               /* listen address */
    int64_t port;             /* 0 = any free port (printed) */
    char *model;              /* GGUF path; required */
    char **served_model_name; /* (n_served_model_name) ids accepted for the model; the first is the one
                                 /v1/models reports; none = the file name without .gguf */
    size_t n_served_model_name;
    char **api_keys;          /* (n_api_keys) accepted Bearer tokens; none = open */
    size_t n_api_keys;
    int64_t threads;          /* CPU engine threads; 0 = all cores */
    int64_t ctx_size;         /* positions per sequence; 0 = model's, capped at MOE_DEFAULT_CTX_CAP */
    int64_t max_seqs;         /* max running sequences; 0 = the engine default (MOE_DEFAULT_*) */
    int64_t kv_cache_mb;      /* KV cache MiB; 0 = the engine default (MOE_DEFAULT_*) */
    int64_t kv_blocks;        /* KV cache blocks (overrides kv_cache_mb); 0 = from kv_cache_mb */
    int64_t step_tokens;      /* token budget per engine step; 0 = the engine default (MOE_DEFAULT_*) */
    int64_t queue_limit;      /* waiting requests before 429; 0 = the engine default (MOE_DEFAULT_*) */
    int64_t max_body;         /* largest request body in bytes (413 above) */
    int64_t max_json_depth;   /* deepest JSON nesting accepted */
    double request_timeout;   /* seconds a request may run before it is cancelled; 0 = none */
    double idle_timeout;      /* seconds a connection may stay idle / not read */
    double header_timeout;    /* seconds to send a whole request head; 0 = none */
    double body_timeout;      /* seconds to send a whole request body after its head; 0 = none */
    int64_t max_connections;  /* open connections before a new one displaces a waiting one */
    int64_t max_connections_per_ip; /* connections one client address may hold; 0 = no cap */
    double drain_timeout;     /* seconds in-flight requests get after SIGTERM */
    double sse_keepalive;     /* seconds of silence before a stream gets a ": keep-alive" comment; 0 = off */
    double heartbeat_timeout; /* /health is 503 when the engine loop is older than this */
    char **cors_origins;      /* (n_cors_origins) allowed Origins; "*" = any; none = no CORS headers */
    size_t n_cors_origins;
    srv_log_format log_format;
    srv_log_level log_level;
    bool log_prompts;         /* also log each request's prompt text (info level) */
    char *device;             /* "auto", "cpu", "cuda" */
    char *chat_template;      /* family override ("chatml", "deepseek3", ...); NULL = from the model */
    bool chat_parse_special;  /* control-token text in chat message content becomes control tokens */
    char *energy_source;      /* "auto", "nvml", "rapl", "estimate", "off"; default "auto" (docs/cost.md) */
    double energy_idle_watts; /* the estimate's power while the engine waits */
    double energy_busy_watts; /* the estimate's power while it runs a step */
    double cost_per_hour;     /* machine price in $/h, charged over the step time; 0 = none */
    double energy_price;      /* electricity in $/kWh; 0 = none */
    char *config_path;        /* the file that was read, or NULL */
} srv_config;

/* Fills c with the defaults. srv_config_free releases it. */
void srv_config_init(srv_config *c);
void srv_config_free(srv_config *c);

/* Sets one option by file key ("ctx_size"); value is parsed and checked.
 * Returns 0, MOE_ENOTFOUND (unknown key), MOE_EINVAL or MOE_ERANGE, with
 * a message naming the key in err. */
int srv_config_set(srv_config *c, const char *key, const char *value, char *err, size_t errsz);

/* Reads a `key = value` file. Errors name the file and line: MOE_EIO when
 * it cannot be read, else as srv_config_set. */
int srv_config_load_file(srv_config *c, const char *path, char *err, size_t errsz);

/* Applies MOED_<KEY> variables found in envp (NULL-terminated "K=V"
 * strings; NULL means the process environment). MOED_CONFIG is not an
 * option here (srv_config_from_args reads it). Unknown MOED_* variables
 * are ignored. Errors as srv_config_set, naming the variable. */
int srv_config_load_env(srv_config *c, char *const *envp, char *err, size_t errsz);

/* Lists the MOED_* variables of envp (NULL = the process environment)
 * that name no option, each with the closest option's variable when one
 * is near ("MOED_CTX_SIZ (did you mean MOED_CTX_SIZE?)"), separated by
 * "; " into out. Returns how many there are. MOED_CONFIG is an option. */
size_t srv_config_env_unknown(char *const *envp, char *out, size_t outsz);

/* The whole precedence chain for `moed serve ARGS`: defaults, then the
 * file named by --config or MOED_CONFIG, then the environment, then the
 * flags. argv[0] is the subcommand name and is skipped. A lone positional
 * argument is the model path. Other servers' flags of the same meaning are
 * accepted: -np, --parallel and --max-num-seqs (max_seqs), --alias
 * (served_model_name), --max-model-len (ctx_size). Returns 0, 1 when
 * --help was given, 2 for --version (nothing else is checked), or a
 * negative status with a message in err (usage errors are MOE_EINVAL; an
 * unknown flag's message suggests the nearest one). c must have been
 * initialised. */
int srv_config_from_args(srv_config *c, int argc, char **argv, char *const *envp, char *err, size_t errsz);

/* The options a running server takes over on SIGHUP (srv_config_reload):
 * api_key, cors_origins, log_format, log_level, log_prompts. */
bool srv_config_is_live(const char *key);

/* SIGHUP: builds a fresh configuration exactly as at startup (defaults,
 * the file named by --config or MOED_CONFIG, MOED_* variables of envp,
 * flags; see srv_config_from_args) and moves the live options (above)
 * from it into c. On success returns 0 and lists, comma-separated, the
 * live options whose value changed in `changed` and the other options
 * whose value changed (kept as they are until a restart) in `ignored`
 * ("" for none; both may be NULL). A file or value that does not parse
 * returns its negative status with the message in err and leaves c as
 * it was. Only the thread that reads c's live options may call it. */
int srv_config_reload(srv_config *c, int argc, char **argv, char *const *envp, char *changed, size_t changedsz,
                      char *ignored, size_t ignoredsz, char *err, size_t errsz);

/* Prints the flag list (key, flag, variable, default, meaning). */
void srv_config_usage(FILE *f);

const char *srv_log_level_name(srv_log_level l);

#endif
