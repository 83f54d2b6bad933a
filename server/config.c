/* config.c - options of `moed serve` (see config.h). One table drives the
 * file keys, the flags, the environment names and --help, so the four can
 * never disagree. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h" /* MOE_DEFAULT_*: what 0 means for the engine options */
#include "status.h"

extern char **environ;

typedef enum { OPT_STR, OPT_INT, OPT_DBL, OPT_BOOL, OPT_LIST, OPT_FMT, OPT_LEVEL } opt_type;

typedef struct {
    const char *key;
    char short_flag; /* 0 = none */
    opt_type type;
    size_t off;      /* offsetof in srv_config */
    size_t count_off;/* OPT_LIST: offset of the size_t count */
    double min, max; /* OPT_INT / OPT_DBL range */
    const char *def; /* the default: a value srv_config_init applies, or "(what unset means)" */
    const char *help;
} opt_desc;

#define OFF(f) offsetof(srv_config, f)
#define S_(x) #x
#define S(x) S_(x) /* an engine default (engine.h) into a help string */

static const opt_desc opts[] = {
    {"model", 'm', OPT_STR, OFF(model), 0, 0, 0, "(required)", "GGUF model file to serve"},
    {"host", 0, OPT_STR, OFF(host), 0, 0, 0, "127.0.0.1", "address to listen on (0.0.0.0 = all)"},
    {"port", 'p', OPT_INT, OFF(port), 0, 0, 65535, "8080", "TCP port (0 = any free port)"},
    {"served_model_name", 0, OPT_LIST, OFF(served_model_name), OFF(n_served_model_name), 0, 0, "(file name)", "model ids the API accepts, comma-separated; the first is the one it reports"},
    {"api_key", 0, OPT_LIST, OFF(api_keys), OFF(n_api_keys), 0, 0, "(none)", "accepted Bearer keys, comma-separated (none = open)"},
    {"threads", 't', OPT_INT, OFF(threads), 0, 0, 4096, "0", "CPU engine threads (0 = all cores)"},
    {"ctx_size", 'c', OPT_INT, OFF(ctx_size), 0, 0, 1 << 24, "0", "positions per sequence (0 = model's, capped at " S(MOE_DEFAULT_CTX_CAP) ")"},
    {"max_seqs", 0, OPT_INT, OFF(max_seqs), 0, 0, 4096, "0", "max concurrently running sequences (0 = " S(MOE_DEFAULT_MAX_SEQS) ")"},
    {"kv_cache_mb", 0, OPT_INT, OFF(kv_cache_mb), 0, 0, 1 << 30, "0", "KV cache size in MiB (0 = " S(MOE_DEFAULT_KV_MEM_MB) ")"},
    {"kv_blocks", 0, OPT_INT, OFF(kv_blocks), 0, 0, 1 << 30, "0", "KV cache blocks of " S(MOE_DEFAULT_BLOCK_SIZE) " positions, overrides kv_cache_mb (0 = from kv_cache_mb)"},
    {"step_tokens", 0, OPT_INT, OFF(step_tokens), 0, 0, 1 << 20, "0", "token budget per engine step (0 = " S(MOE_DEFAULT_STEP_TOKENS) ")"},
    {"queue_limit", 0, OPT_INT, OFF(queue_limit), 0, 0, 1 << 24, "0", "waiting requests before 429 (0 = " S(MOE_DEFAULT_QUEUE_LIMIT) ")"},
    {"max_body", 0, OPT_INT, OFF(max_body), 0, 1024, 1LL << 32, "4194304", "largest request body in bytes (413 above)"},
    {"max_json_depth", 0, OPT_INT, OFF(max_json_depth), 0, 4, 1000, "64", "deepest JSON nesting accepted (400 above)"},
    {"request_timeout", 0, OPT_DBL, OFF(request_timeout), 0, 0, 1e7, "600", "seconds a request may run before it is cancelled (0 = none)"},
    {"idle_timeout", 0, OPT_DBL, OFF(idle_timeout), 0, 1, 1e6, "60", "seconds a connection may stay idle or stop reading"},
    {"header_timeout", 0, OPT_DBL, OFF(header_timeout), 0, 0, 1e6, "10", "seconds a client has to send a whole request head (0 = none)"},
    {"body_timeout", 0, OPT_DBL, OFF(body_timeout), 0, 0, 1e6, "60", "seconds a client has to send a whole request body (0 = none)"},
    {"max_connections", 0, OPT_INT, OFF(max_connections), 0, 16, 1 << 20, "1024", "open connections; beyond, the longest-waiting one is closed"},
    {"max_connections_per_ip", 0, OPT_INT, OFF(max_connections_per_ip), 0, 0, 1 << 20, "256", "connections one client address may hold (0 = no cap)"},
    {"sse_keepalive", 0, OPT_DBL, OFF(sse_keepalive), 0, 0, 1e6, "5", "seconds of silence before a stream gets a ': keep-alive' comment (0 = off)"},
    {"drain_timeout", 0, OPT_DBL, OFF(drain_timeout), 0, 0, 1e6, "30", "seconds in-flight requests get to finish after SIGTERM"},
    {"heartbeat_timeout", 0, OPT_DBL, OFF(heartbeat_timeout), 0, 0.01, 1e6, "30", "/health fails when the engine loop is older than this"},
    {"cors_origins", 0, OPT_LIST, OFF(cors_origins), OFF(n_cors_origins), 0, 0, "(none)", "allowed CORS origins, comma-separated (* = any)"},
    {"log_format", 0, OPT_FMT, OFF(log_format), 0, 0, 0, "text", "log line format: text or json"},
    {"log_level", 0, OPT_LEVEL, OFF(log_level), 0, 0, 0, "info", "error, warn, info or debug"},
    {"log_prompts", 0, OPT_BOOL, OFF(log_prompts), 0, 0, 0, "false", "also log each request's prompt text (one line per request)"},
    {"device", 0, OPT_STR, OFF(device), 0, 0, 0, "auto", "engine device: auto, cpu or cuda"},
    {"chat_template", 0, OPT_STR, OFF(chat_template), 0, 0, 0, "(from the model)", "chat format override: chatml, deepseek2, deepseek3, mistral, mistral-v3, llama3"},
    {"chat_parse_special", 0, OPT_BOOL, OFF(chat_parse_special), 0, 0, 0, "false", "control-token text in chat message content becomes control tokens (lets clients forge turns)"},
    {"energy_source", 0, OPT_STR, OFF(energy_source), 0, 0, 0, "auto", "energy per request from: auto, nvml, rapl, estimate or off"},
    {"energy_idle_watts", 0, OPT_DBL, OFF(energy_idle_watts), 0, 0, 1e6, "50", "energy_source estimate: watts while the engine waits"},
    {"energy_busy_watts", 0, OPT_DBL, OFF(energy_busy_watts), 0, 0, 1e6, "150", "energy_source estimate: watts while the engine runs a step"},
    {"cost_per_hour", 0, OPT_DBL, OFF(cost_per_hour), 0, 0, 1e6, "0", "machine price in $/h, charged to requests by their share of step time (0 = none)"},
    {"energy_price", 0, OPT_DBL, OFF(energy_price), 0, 0, 1e6, "0", "electricity price in $/kWh, charged by energy (0 = none)"},
};
#define N_OPTS (sizeof(opts) / sizeof(opts[0]))

static void free_list(char ***list, size_t *n) {
    for (size_t i = 0; i < *n; i++) free((*list)[i]);
    free(*list);
    *list = NULL;
    *n = 0;
}

static int set_opt(srv_config *c, const opt_desc *o, const char *value, char *err, size_t errsz);

/* A "(...)" default describes what unset means; anything else is a value. */
static bool has_default(const opt_desc *o) { return o->def[0] != '('; }

void srv_config_init(srv_config *c) {
    memset(c, 0, sizeof *c);
    /* The table's defaults are the only ones; they parse (check_config
     * tests it), so the status is not looked at. */
    for (size_t i = 0; i < N_OPTS; i++)
        if (has_default(&opts[i])) (void)set_opt(c, &opts[i], opts[i].def, NULL, 0);
}

void srv_config_free(srv_config *c) {
    for (size_t i = 0; i < N_OPTS; i++) {
        char *base = (char *)c;
        if (opts[i].type == OPT_STR) {
            char **p = (char **)(base + opts[i].off);
            free(*p);
            *p = NULL;
        } else if (opts[i].type == OPT_LIST) {
            free_list((char ***)(base + opts[i].off), (size_t *)(base + opts[i].count_off));
        }
    }
    free(c->config_path);
    c->config_path = NULL;
}

const char *srv_log_level_name(srv_log_level l) {
    static const char *names[] = {"error", "warn", "info", "debug"};
    return (unsigned)l < 4 ? names[l] : "?";
}

static const opt_desc *find_opt(const char *key, size_t len) {
    for (size_t i = 0; i < N_OPTS; i++)
        if (strlen(opts[i].key) == len && !strncmp(opts[i].key, key, len)) return &opts[i];
    return NULL;
}

static char *trim(char *s) {
    while (isspace((unsigned char)*s)) s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1])) s[--n] = 0;
    return s;
}

static int parse_bool(const char *v, bool *out) {
    static const char *yes[] = {"1", "true", "yes", "on"}, *no[] = {"0", "false", "no", "off"};
    for (int i = 0; i < 4; i++) {
        if (!strcasecmp(v, yes[i])) return *out = true, 0;
        if (!strcasecmp(v, no[i])) return *out = false, 0;
    }
    return -1;
}

static int set_opt(srv_config *c, const opt_desc *o, const char *value, char *err, size_t errsz) {
    char *base = (char *)c;
    switch (o->type) {
    case OPT_STR: {
        char *dup = strdup(value);
        if (!dup) return MOE_ENOMEM;
        char **p = (char **)(base + o->off);
        free(*p);
        /* An empty value resets a string to its default (served_model_name = ). */
        if (!*dup) {
            free(dup);
            dup = has_default(o) ? strdup(o->def) : NULL;
            if (has_default(o) && !dup) return MOE_ENOMEM;
        }
        *p = dup;
        return 0;
    }
    case OPT_INT: {
        char *end;
        errno = 0;
        long long x = strtoll(value, &end, 10);
        while (isspace((unsigned char)*end)) end++;
        if (end == value || *end || errno) {
            return moe_seterr(err, errsz, MOE_EINVAL, "%s: '%s' is not an integer", o->key, value);
        }
        if ((double)x < o->min || (double)x > o->max) {
            return moe_seterr(err, errsz, MOE_ERANGE, "%s: %lld is out of range [%.0f, %.0f]", o->key, x, o->min, o->max);
        }
        *(int64_t *)(base + o->off) = x;
        return 0;
    }
    case OPT_DBL: {
        char *end;
        errno = 0;
        double x = strtod(value, &end);
        while (isspace((unsigned char)*end)) end++;
        if (end == value || *end || errno || !isfinite(x)) {
            return moe_seterr(err, errsz, MOE_EINVAL, "%s: '%s' is not a number", o->key, value);
        }
        if (x < o->min || x > o->max) {
            return moe_seterr(err, errsz, MOE_ERANGE, "%s: %g is out of range [%g, %g]", o->key, x, o->min, o->max);
        }
        *(double *)(base + o->off) = x;
        return 0;
    }
    case OPT_BOOL: {
        bool b;
        if (parse_bool(value, &b)) {
            return moe_seterr(err, errsz, MOE_EINVAL, "%s: '%s' is not a boolean (true/false)", o->key, value);
        }
        *(bool *)(base + o->off) = b;
        return 0;
    }
    case OPT_LIST: {
        char ***list = (char ***)(base + o->off);
        size_t *n = (size_t *)(base + o->count_off);
        char *copy = strdup(value);
        if (!copy) return MOE_ENOMEM;
        size_t cap = 1;
        for (const char *p = value; *p; p++) cap += *p == ',';
        char **v = calloc(cap, sizeof *v);
        if (!v) {
            free(copy);
            return MOE_ENOMEM;
        }
        size_t k = 0;
        char *save = NULL;
        for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            char *t = trim(tok);
            if (!*t) continue;
            if (!(v[k] = strdup(t))) {
                free(copy);
                free_list(&v, &k);
                return MOE_ENOMEM;
            }
            k++;
        }
        free(copy);
        if (!k) {
            free(v);
            v = NULL;
            /* A key list that was meant to be set but holds no key (an
             * empty secret, a stray comma) must not start an open server. */
            if (o->off == OFF(api_keys)) {
                return moe_seterr(err, errsz, MOE_EINVAL, "%s: '%.40s' holds no key; leave %s unset to run without authentication", o->key,
                                  value, o->key);
            }
        }
        free_list(list, n);
        *list = v;
        *n = k;
        return 0;
    }
    case OPT_FMT:
        if (!strcasecmp(value, "text")) c->log_format = SRV_LOG_TEXT;
        else if (!strcasecmp(value, "json")) c->log_format = SRV_LOG_JSON;
        else {
            return moe_seterr(err, errsz, MOE_EINVAL, "%s: '%s' is not text or json", o->key, value);
        }
        return 0;
    case OPT_LEVEL:
        for (int l = 0; l < 4; l++)
            if (!strcasecmp(value, srv_log_level_name((srv_log_level)l))) {
                c->log_level = (srv_log_level)l;
                return 0;
            }
        if (!strcasecmp(value, "warning")) {
            c->log_level = SRV_LOG_WARN;
            return 0;
        }
        return moe_seterr(err, errsz, MOE_EINVAL, "%s: '%s' is not error, warn, info or debug", o->key, value);
    }
    return MOE_EINVAL;
}

int srv_config_set(srv_config *c, const char *key, const char *value, char *err, size_t errsz) {
    const opt_desc *o = find_opt(key, strlen(key));
    if (!o) {
        return moe_seterr(err, errsz, MOE_ENOTFOUND, "unknown option '%s'", key);
    }
    return set_opt(c, o, value, err, errsz);
}

int srv_config_load_file(srv_config *c, const char *path, char *err, size_t errsz) {
    FILE *f = fopen(path, "r");
    if (!f) {
        return moe_seterr(err, errsz, MOE_EIO, "%s: %s", path, strerror(errno));
    }
    char line[8192], sub[MOE_ERR_MAX];
    int lineno = 0, rc = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        if (!strchr(line, '\n') && !feof(f)) {
            rc = moe_seterr(err, errsz, MOE_EINVAL, "%s:%d: line too long", path, lineno);
            break;
        }
        /* A '#' starts a comment unless it is inside a quoted value. */
        bool q = false;
        for (char *p = line; *p; p++) {
            if (*p == '"') q = !q;
            else if (*p == '#' && !q) {
                *p = 0;
                break;
            }
        }
        char *s = trim(line);
        if (!*s) continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            rc = moe_seterr(err, errsz, MOE_EINVAL, "%s:%d: expected 'key = value'", path, lineno);
            break;
        }
        *eq = 0;
        char *key = trim(s), *val = trim(eq + 1);
        size_t vl = strlen(val);
        if (vl >= 2 && val[0] == '"' && val[vl - 1] == '"') {
            val[vl - 1] = 0;
            val++;
        }
        for (char *p = key; *p; p++)
            if (*p == '-') *p = '_';
        int st = srv_config_set(c, key, val, sub, sizeof sub);
        if (st) {
            rc = moe_seterr(err, errsz, st, "%s:%d: %s", path, lineno, sub);
            break;
        }
    }
    if (!rc && ferror(f)) {
        rc = moe_seterr(err, errsz, MOE_EIO, "%s: read error", path);
    }
    fclose(f);
    if (!rc) {
        free(c->config_path);
        c->config_path = strdup(path);
    }
    return rc;
}

/* "MOED_CTX_SIZE" -> the option ctx_size, or NULL. */
static const opt_desc *env_opt(const char *name, size_t len) {
    if (len <= 5 || strncmp(name, "MOED_", 5)) return NULL;
    char key[64];
    if (len - 5 >= sizeof key) return NULL;
    for (size_t i = 5; i < len; i++) key[i - 5] = (char)tolower((unsigned char)name[i]);
    return find_opt(key, len - 5);
}

int srv_config_load_env(srv_config *c, char *const *envp, char *err, size_t errsz) {
    if (!envp) envp = environ;
    char sub[MOE_ERR_MAX];
    for (char *const *e = envp; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq) continue;
        const opt_desc *o = env_opt(*e, (size_t)(eq - *e));
        if (!o) continue;
        int st = set_opt(c, o, eq + 1, sub, sizeof sub);
        if (st) {
            return moe_seterr(err, errsz, st, "environment %.*s: %s", (int)(eq - *e), *e, sub);
        }
    }
    return 0;
}

static const char *env_get(char *const *envp, const char *name) {
    if (!envp) envp = environ;
    size_t n = strlen(name);
    for (char *const *e = envp; e && *e; e++)
        if (!strncmp(*e, name, n) && (*e)[n] == '=') return *e + n + 1;
    return NULL;
}

/* Edit distance of a[0..la) and b[0..lb), both at most 63 bytes. */
static size_t edit_distance(const char *a, size_t la, const char *b, size_t lb) {
    size_t row[64];
    if (la > 63 || lb > 63) return 64;
    for (size_t j = 0; j <= lb; j++) row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (tolower((unsigned char)a[i - 1]) != tolower((unsigned char)b[j - 1]));
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

/* The option key nearest to name[0..len) (underscores), or NULL when none
 * is close enough to be a typo: a third of the name's length, at least 2. */
static const char *nearest_key(const char *name, size_t len) {
    const char *best = NULL;
    size_t best_d = len / 3 > 2 ? len / 3 : 2;
    best_d++;
    for (size_t k = 0; k < N_OPTS; k++) {
        size_t d = edit_distance(name, len, opts[k].key, strlen(opts[k].key));
        if (d < best_d) best_d = d, best = opts[k].key;
    }
    if (edit_distance(name, len, "config", 6) < best_d) best = "config";
    return best;
}

size_t srv_config_env_unknown(char *const *envp, char *out, size_t outsz) {
    if (!envp) envp = environ;
    if (out && outsz) out[0] = 0;
    size_t n = 0;
    for (char *const *e = envp; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        size_t len = eq ? (size_t)(eq - *e) : strlen(*e);
        if (len <= 5 || strncmp(*e, "MOED_", 5) || env_opt(*e, len) || (len == 11 && !strncmp(*e, "MOED_CONFIG", 11)))
            continue;
        char key[64];
        size_t kl = len - 5 < sizeof key - 1 ? len - 5 : sizeof key - 1;
        for (size_t i = 0; i < kl; i++) key[i] = (char)tolower((unsigned char)(*e)[5 + i]);
        key[kl] = 0;
        const char *near = nearest_key(key, kl);
        char up[64] = "";
        for (size_t k = 0; near && near[k] && k < sizeof up - 1; k++) up[k] = (char)toupper((unsigned char)near[k]), up[k + 1] = 0;
        if (out && outsz) {
            size_t used = strlen(out);
            if (near)
                snprintf(out + used, outsz - used, "%s%.*s (did you mean MOED_%s?)", n ? "; " : "", (int)len, *e, up);
            else snprintf(out + used, outsz - used, "%s%.*s", n ? "; " : "", (int)len, *e);
        }
        n++;
    }
    return n;
}

/* Other servers' flags that mean exactly what one of ours does; long
 * options of the getopt table like the keys themselves. */
static const struct {
    const char *name; /* as after "--" */
    const char *key;
} flag_aliases[] = {
    {"parallel", "max_seqs"},       /* llama-server --parallel (and -np, see next_opt) */
    {"max-num-seqs", "max_seqs"},   /* vLLM */
    {"max_num_seqs", "max_seqs"},
    {"alias", "served_model_name"}, /* llama-server */
    {"max-model-len", "ctx_size"},  /* vLLM */
    {"max_model_len", "ctx_size"},
};
#define N_ALIASES (sizeof flag_aliases / sizeof flag_aliases[0])

/* The option an error names in argv[idx]: the long name without dashes and
 * value ("--ctx-sise=9" -> "ctx_sise"), or a single-dash word ("-ctx-size",
 * a likely slip) without its dash; NULL for a lone short flag. */
static const char *slip_name(const char *arg, char *buf, size_t bufsz) {
    const char *body = arg[0] == '-' && arg[1] == '-' ? arg + 2 : arg[0] == '-' && arg[1] && arg[2] ? arg + 1 : NULL;
    if (!body) return NULL;
    size_t n = 0;
    for (; body[n] && body[n] != '=' && n + 1 < bufsz; n++) buf[n] = body[n] == '-' ? '_' : body[n];
    buf[n] = 0;
    return n ? buf : NULL;
}

static int unknown_flag(const char *arg, char *err, size_t errsz) {
    char name[64];
    const char *nm = slip_name(arg, name, sizeof name);
    const char *near = nm ? nearest_key(nm, strlen(nm)) : NULL;
    if (!near) return moe_seterr(err, errsz, MOE_EINVAL, "unknown option '%s'", arg);
    char flag[64] = "";
    for (size_t k = 0; near[k] && k < sizeof flag - 1; k++) flag[k] = near[k] == '_' ? '-' : near[k], flag[k + 1] = 0;
    return moe_seterr(err, errsz, MOE_EINVAL, "unknown option '%s' (did you mean --%s?)", arg, flag);
}

/* getopt_long over the table, as every subcommand parses its flags. The
 * long names are the keys with dashes, and with underscores too (both have
 * always worked); val = OPT_BASE + the table index. */
enum { OPT_BASE = 256, OPT_CONFIG = OPT_BASE + 1000, OPT_VERSION = OPT_BASE + 1001, OPT_POSITIONAL = 1 };

typedef struct {
    struct option lo[2 * N_OPTS + N_ALIASES + 4];
    char names[N_OPTS][48];
    char shorts[2 + 2 * N_OPTS + 2];
} getopt_table;

static void getopt_table_build(getopt_table *t) {
    size_t n = 0, k = 0;
    t->shorts[k++] = '-'; /* positionals come back in order (as OPT_POSITIONAL); argv is not permuted */
    t->shorts[k++] = ':'; /* a missing value comes back as ':', not as a message on stderr */
    for (size_t i = 0; i < N_OPTS; i++) {
        int has = opts[i].type == OPT_BOOL ? optional_argument : required_argument; /* --log-prompts alone: true */
        size_t j = 0;
        for (; opts[i].key[j] && j + 1 < sizeof t->names[i]; j++)
            t->names[i][j] = opts[i].key[j] == '_' ? '-' : opts[i].key[j];
        t->names[i][j] = 0;
        t->lo[n++] = (struct option){t->names[i], has, NULL, OPT_BASE + (int)i};
        if (strchr(opts[i].key, '_')) t->lo[n++] = (struct option){opts[i].key, has, NULL, OPT_BASE + (int)i};
        if (opts[i].short_flag) {
            t->shorts[k++] = opts[i].short_flag;
            if (has == required_argument) t->shorts[k++] = ':';
        }
    }
    t->shorts[k++] = 'h';
    t->shorts[k] = 0;
    t->lo[n++] = (struct option){"config", required_argument, NULL, OPT_CONFIG};
    t->lo[n++] = (struct option){"help", no_argument, NULL, 'h'};
    t->lo[n++] = (struct option){"version", no_argument, NULL, OPT_VERSION};
    for (size_t i = 0; i < N_ALIASES; i++) {
        const opt_desc *o = find_opt(flag_aliases[i].key, strlen(flag_aliases[i].key));
        t->lo[n++] = (struct option){flag_aliases[i].name, required_argument, NULL, OPT_BASE + (int)(o - opts)};
    }
    t->lo[n] = (struct option){0, 0, 0, 0};
}

/* The next option of argv: its table entry in *o (NULL for --config and
 * positionals) and value in *val. Returns 0 at the end, 'h', OPT_VERSION,
 * OPT_CONFIG, OPT_POSITIONAL, OPT_BASE (an option), or MOE_EINVAL with a
 * message ("did you mean" for a near miss). */
static int next_opt(const getopt_table *t, int argc, char **argv, const opt_desc **o, const char **val, char *err,
                    size_t errsz) {
    *o = NULL;
    *val = NULL;
    /* glibc's optind names the element being parsed (it moves on only when
     * one is done), so argv[cur] is what an error is about. */
    int cur = optind ? optind : 1;
    if (cur < argc && !strcmp(argv[cur], "-np")) { /* llama-server's one-dash, two-letter flag */
        if (cur + 1 >= argc) return moe_seterr(err, errsz, MOE_EINVAL, "option '-np' needs a value");
        *o = find_opt("max_seqs", 8);
        *val = argv[cur + 1];
        optind = cur + 2;
        return OPT_BASE;
    }
    if (cur < argc && argv[cur][0] == '-' && argv[cur][1] && argv[cur][1] != '-' && argv[cur][2]) {
        /* "-ctx-size 9": a long option with one dash, which getopt would
         * read as -c with the value "tx-size"; refused with the hint when
         * the word is (nearly) one of our keys ("-p8080" is not) */
        char name[64];
        const char *nm = slip_name(argv[cur], name, sizeof name);
        if (nm && strlen(nm) > 2 && nearest_key(nm, strlen(nm))) return unknown_flag(argv[cur], err, errsz);
    }
    int li = -1;
    int c = getopt_long(argc, argv, t->shorts, t->lo, &li);
    const char *a = cur < argc ? argv[cur] : "?";
    if (li >= 0 && a[0] == '-' && a[1] == '-') {
        /* getopt_long takes any unambiguous prefix ("--max-seq"); ours are
         * exact, so that a new option never changes what an old prefix meant */
        size_t n = strcspn(a + 2, "=");
        if (strlen(t->lo[li].name) != n || strncmp(a + 2, t->lo[li].name, n)) return unknown_flag(a, err, errsz);
    }
    switch (c) {
    case -1: return 0;
    case 'h': return 'h';
    case OPT_VERSION: return OPT_VERSION;
    case OPT_POSITIONAL: *val = optarg; return OPT_POSITIONAL;
    case OPT_CONFIG: *val = optarg; return OPT_CONFIG;
    case ':': return moe_seterr(err, errsz, MOE_EINVAL, "option '%s' needs a value", a);
    case '?': return unknown_flag(a, err, errsz);
    }
    if (c < OPT_BASE) { /* a short flag */
        for (size_t k = 0; k < N_OPTS; k++)
            if (opts[k].short_flag == c) *o = &opts[k];
    } else {
        *o = &opts[c - OPT_BASE];
    }
    if (!*o) return unknown_flag(a, err, errsz);
    *val = optarg ? optarg : "true"; /* only a bool may have none */
    return OPT_BASE;
}

/* Runs getopt from the start (optind = 0 also resets glibc's state
 * between the two passes and a later SIGHUP reload) without messages. */
static void getopt_restart(void) {
    optind = 0;
    opterr = 0;
}

int srv_config_from_args(srv_config *c, int argc, char **argv, char *const *envp, char *err, size_t errsz) {
    const char *config = env_get(envp, "MOED_CONFIG");
    const char *positional = NULL;
    getopt_table t;
    getopt_table_build(&t);
    const opt_desc *o;
    const char *v;
    int r;
    /* Pass 1: --help, --config and syntax; nothing is applied yet. */
    getopt_restart();
    while ((r = next_opt(&t, argc, argv, &o, &v, err, errsz)) > 0) {
        if (r == 'h') return 1;
        if (r == OPT_VERSION) return 2;
        if (r == OPT_CONFIG) config = v;
        if (r == OPT_POSITIONAL) {
            if (positional) return moe_seterr(err, errsz, MOE_EINVAL, "unexpected argument '%s'", v);
            positional = v;
        }
    }
    if (r < 0) return r;
    for (; optind < argc; optind++) { /* after "--": positionals only */
        if (positional) return moe_seterr(err, errsz, MOE_EINVAL, "unexpected argument '%s'", argv[optind]);
        positional = argv[optind];
    }
    int st;
    if (config && *config && (st = srv_config_load_file(c, config, err, errsz))) return st;
    if ((st = srv_config_load_env(c, envp, err, errsz))) return st;
    if (positional && (st = srv_config_set(c, "model", positional, err, errsz))) return st;
    /* Pass 2: the flags, over file, environment and positional. */
    char sub[MOE_ERR_MAX];
    getopt_restart();
    while ((r = next_opt(&t, argc, argv, &o, &v, err, errsz)) > 0)
        if (r == OPT_BASE && (st = set_opt(c, o, v, sub, sizeof sub)))
            return moe_seterr(err, errsz, st, "%s", sub);
    return r;
}

static const char *const live_keys[] = {"api_key", "cors_origins", "log_format", "log_level", "log_prompts"};

bool srv_config_is_live(const char *key) {
    for (size_t i = 0; i < sizeof live_keys / sizeof live_keys[0]; i++)
        if (!strcmp(key, live_keys[i])) return true;
    return false;
}

static bool same_str(const char *a, const char *b) { return a == b || (a && b && !strcmp(a, b)); }

static bool opt_equal(const srv_config *a, const srv_config *b, const opt_desc *o) {
    const char *pa = (const char *)a + o->off, *pb = (const char *)b + o->off;
    switch (o->type) {
    case OPT_STR: return same_str(*(char *const *)pa, *(char *const *)pb);
    case OPT_INT: return *(const int64_t *)pa == *(const int64_t *)pb;
    case OPT_DBL: return *(const double *)pa == *(const double *)pb;
    case OPT_BOOL: return *(const bool *)pa == *(const bool *)pb;
    case OPT_FMT: return a->log_format == b->log_format;
    case OPT_LEVEL: return a->log_level == b->log_level;
    case OPT_LIST: {
        size_t na = *(const size_t *)((const char *)a + o->count_off), nb = *(const size_t *)((const char *)b + o->count_off);
        if (na != nb) return false;
        for (size_t i = 0; i < na; i++)
            if (!same_str((*(char **const *)pa)[i], (*(char **const *)pb)[i])) return false;
        return true;
    }
    }
    return false;
}

/* Exchanges one option's value between a and b (so freeing b frees the old one). */
static void opt_swap(srv_config *a, srv_config *b, const opt_desc *o) {
    char *pa = (char *)a + o->off, *pb = (char *)b + o->off;
    size_t n = o->type == OPT_STR || o->type == OPT_LIST ? sizeof(char *)
               : o->type == OPT_INT                       ? sizeof(int64_t)
               : o->type == OPT_DBL                       ? sizeof(double)
               : o->type == OPT_BOOL                      ? sizeof(bool)
               : o->type == OPT_FMT                       ? sizeof(srv_log_format)
                                                          : sizeof(srv_log_level);
    char tmp[sizeof(double) > sizeof(char *) ? sizeof(double) : sizeof(char *)];
    memcpy(tmp, pa, n);
    memcpy(pa, pb, n);
    memcpy(pb, tmp, n);
    if (o->type == OPT_LIST) {
        size_t *ca = (size_t *)((char *)a + o->count_off), *cb = (size_t *)((char *)b + o->count_off), t = *ca;
        *ca = *cb;
        *cb = t;
    }
}

/* Appends ", key" (or "key") to a list buffer, if there is room. */
static void list_add(char *buf, size_t sz, const char *key) {
    if (!buf || !sz) return;
    size_t n = strlen(buf);
    snprintf(buf + n, sz - n, "%s%s", n ? ", " : "", key);
}

int srv_config_reload(srv_config *c, int argc, char **argv, char *const *envp, char *changed, size_t changedsz,
                      char *ignored, size_t ignoredsz, char *err, size_t errsz) {
    if (changed && changedsz) changed[0] = 0;
    if (ignored && ignoredsz) ignored[0] = 0;
    srv_config fresh;
    srv_config_init(&fresh);
    int st = srv_config_from_args(&fresh, argc, argv, envp, err, errsz);
    if (st) {
        srv_config_free(&fresh);
        return st < 0 ? st : MOE_EINVAL; /* 1 (--help) cannot come from a running server's argv */
    }
    for (size_t i = 0; i < N_OPTS; i++) {
        const opt_desc *o = &opts[i];
        if (opt_equal(c, &fresh, o)) continue;
        if (srv_config_is_live(o->key)) {
            opt_swap(c, &fresh, o);
            list_add(changed, changedsz, o->key);
        } else {
            list_add(ignored, ignoredsz, o->key);
        }
    }
    srv_config_free(&fresh);
    return 0;
}

void srv_config_usage(FILE *f) {
    fprintf(f, "usage: moed serve [-m] MODEL.gguf [OPTIONS]\n\n"
               "Serves the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/responses,\n"
               "/v1/models), Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens),\n"
               "/health, /metrics, /tokenize and /detokenize.\n\n"
               "Every option is also a MOED_<KEY> environment variable and a `key = value` line\n"
               "of the config file; precedence: flag > environment > file > default.\n\n"
               "      --config FILE (MOED_CONFIG)  read options from FILE\n");
    for (size_t i = 0; i < N_OPTS; i++) {
        char flag[64], env[64];
        size_t k;
        for (k = 0; opts[i].key[k] && k < 40; k++) {
            flag[k] = opts[i].key[k] == '_' ? '-' : opts[i].key[k];
            env[k] = (char)toupper((unsigned char)opts[i].key[k]);
        }
        flag[k] = env[k] = 0;
        const char *arg = opts[i].type == OPT_BOOL   ? ""
                          : opts[i].type == OPT_INT  ? " N"
                          : opts[i].type == OPT_DBL  ? " SEC"
                          : opts[i].type == OPT_LIST ? " A,B"
                          : !strcmp(opts[i].key, "model") ? " PATH"
                                                     : " VALUE";
        char lhs[96];
        if (opts[i].short_flag) snprintf(lhs, sizeof lhs, "  -%c, --%s%s", opts[i].short_flag, flag, arg);
        else snprintf(lhs, sizeof lhs, "      --%s%s", flag, arg);
        const char *d = opts[i].def;
        if (!strcmp(d, "(required)")) fprintf(f, "%-34s %s %s\n", lhs, opts[i].help, d);
        else if (has_default(&opts[i])) fprintf(f, "%-34s %s (default: %s)\n", lhs, opts[i].help, d);
        else fprintf(f, "%-34s %s (default: %.*s)\n", lhs, opts[i].help, (int)strlen(d) - 2, d + 1);
        fprintf(f, "%-34s [key %s, env MOED_%s]\n", "", opts[i].key, env);
    }
    fprintf(f, "  -h, --help                       this help\n"
               "      --version                    print the version and exit\n\n"
               "Flags of other servers with the same meaning: -np, --parallel, --max-num-seqs\n"
               "(= --max-seqs); --alias (= --served-model-name); --max-model-len (= --ctx-size).\n");
}
