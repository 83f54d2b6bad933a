/* check_config.c - `moed serve` options: defaults, file syntax, the
 * environment, flags, and the precedence flag > env > file > default. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "status.h"

static char tmpfile_path[64];

static const char *write_conf(const char *text) {
    strcpy(tmpfile_path, "/tmp/check_config_XXXXXX");
    int fd = mkstemp(tmpfile_path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return tmpfile_path;
}

START_TEST(test_defaults) {
    srv_config c;
    srv_config_init(&c);
    ck_assert_str_eq(c.host, "127.0.0.1");
    ck_assert_int_eq(c.port, 8080);
    ck_assert_ptr_null(c.model);
    ck_assert_int_eq(c.n_api_keys, 0);
    ck_assert_int_eq(c.log_format, SRV_LOG_TEXT);
    ck_assert_int_eq(c.log_level, SRV_LOG_INFO);
    ck_assert(!c.log_prompts);
    ck_assert(!c.chat_parse_special); /* chat content is plain text unless asked */
    ck_assert_double_eq(c.drain_timeout, 30);
    ck_assert_int_eq(c.max_body, 4 << 20);
    ck_assert_str_eq(c.device, "auto");
    ck_assert_double_eq(c.header_timeout, 10);
    ck_assert_double_eq(c.body_timeout, 60);
    ck_assert_int_eq(c.max_connections, 1024);
    ck_assert_int_eq(c.max_connections_per_ip, 256);
    ck_assert_int_eq(c.max_json_depth, 64);
    ck_assert_double_eq(c.request_timeout, 600);
    ck_assert_double_eq(c.idle_timeout, 60);
    ck_assert_double_eq(c.heartbeat_timeout, 30);
    ck_assert_int_eq(c.threads, 0);
    ck_assert_int_eq(c.max_seqs, 0); /* 0: the engine's MOE_DEFAULT_MAX_SEQS */
    ck_assert_ptr_null(c.served_model_name);
    ck_assert_ptr_null(c.chat_template);
    ck_assert_int_eq(c.n_cors_origins, 0);
    /* an empty value puts a string back to its default (the same table) */
    char err[256];
    ck_assert_int_eq(srv_config_set(&c, "host", "0.0.0.0", err, sizeof err), 0);
    ck_assert_int_eq(srv_config_set(&c, "host", "", err, sizeof err), 0);
    ck_assert_str_eq(c.host, "127.0.0.1");
    ck_assert_int_eq(srv_config_set(&c, "device", "", err, sizeof err), 0);
    ck_assert_str_eq(c.device, "auto");
    ck_assert_int_eq(srv_config_set(&c, "served_model_name", "x", err, sizeof err), 0);
    ck_assert_int_eq(srv_config_set(&c, "served_model_name", "", err, sizeof err), 0);
    ck_assert_ptr_null(c.served_model_name);
    srv_config_free(&c);
}
END_TEST

/* An API key list with no key in it is a mistake (an empty secret, a stray
 * comma), never a request for an open server: refused, naming the option,
 * and the keys already set stay as they were. */
START_TEST(test_api_key_without_keys) {
    static const char *empties[] = {"", ",", " ", " , ,", "\t"};
    srv_config c;
    srv_config_init(&c);
    char err[256];
    ck_assert_int_eq(srv_config_set(&c, "api_key", "k1,k2", err, sizeof err), 0);
    for (size_t i = 0; i < sizeof empties / sizeof empties[0]; i++) {
        err[0] = 0;
        ck_assert_int_eq(srv_config_set(&c, "api_key", empties[i], err, sizeof err), MOE_EINVAL);
        ck_assert_msg(strstr(err, "api_key") && strstr(err, "no key"), "'%s' -> %s", empties[i], err);
        ck_assert_int_eq(c.n_api_keys, 2);
        ck_assert_str_eq(c.api_keys[1], "k2");
    }
    /* through the environment the message names the variable */
    char *env[] = {"MOED_API_KEY=,", NULL};
    ck_assert_int_eq(srv_config_load_env(&c, env, err, sizeof err), MOE_EINVAL);
    ck_assert_msg(strstr(err, "MOED_API_KEY"), "%s", err);
    /* other lists may be empty: no CORS origin just means no CORS headers */
    ck_assert_int_eq(srv_config_set(&c, "cors_origins", ",", err, sizeof err), 0);
    ck_assert_int_eq(c.n_cors_origins, 0);
    /* the connection limits parse and are range-checked */
    ck_assert_int_eq(srv_config_set(&c, "header_timeout", "2.5", err, sizeof err), 0);
    ck_assert_double_eq(c.header_timeout, 2.5);
    ck_assert_int_eq(srv_config_set(&c, "max_connections", "8", err, sizeof err), MOE_ERANGE);
    ck_assert_int_eq(srv_config_set(&c, "max_connections_per_ip", "0", err, sizeof err), 0);
    ck_assert_int_eq(c.max_connections_per_ip, 0);
    srv_config_free(&c);
}
END_TEST

START_TEST(test_file) {
    const char *p = write_conf("# comment line\n"
                               "\n"
                               "model = /models/a.gguf   # trailing comment\n"
                               "port=9000\n"
                               "  api-key = k1, k2 ,,k3\n"
                               "served_model_name = \"my # model\"\n"
                               "log_format = json\n"
                               "log_prompts = yes\n"
                               "chat_parse_special = on\n"
                               "drain_timeout = 2.5\n"
                               "cors_origins = *\n");
    srv_config c;
    srv_config_init(&c);
    char err[256] = "";
    ck_assert_int_eq(srv_config_load_file(&c, p, err, sizeof err), 0);
    ck_assert_str_eq(c.model, "/models/a.gguf");
    ck_assert_int_eq(c.port, 9000);
    ck_assert_int_eq(c.n_api_keys, 3);
    ck_assert_str_eq(c.api_keys[0], "k1");
    ck_assert_str_eq(c.api_keys[1], "k2");
    ck_assert_str_eq(c.api_keys[2], "k3");
    ck_assert_uint_eq(c.n_served_model_name, 1);
    ck_assert_str_eq(c.served_model_name[0], "my # model");
    ck_assert_int_eq(c.log_format, SRV_LOG_JSON);
    ck_assert(c.log_prompts);
    ck_assert(c.chat_parse_special);
    ck_assert_double_eq(c.drain_timeout, 2.5);
    ck_assert_int_eq(c.n_cors_origins, 1);
    ck_assert_str_eq(c.cors_origins[0], "*");
    srv_config_free(&c);
    unlink(p);
}
END_TEST

START_TEST(test_file_errors) {
    struct {
        const char *text;
        int status;
        const char *needle;
    } cases[] = {
        {"port = 80x\n", MOE_EINVAL, ":1: port"},
        {"\n\nport = 70000\n", MOE_ERANGE, ":3: port"},
        {"bogus = 1\n", MOE_ENOTFOUND, "bogus"},
        {"just words\n", MOE_EINVAL, "key = value"},
        {"log_format = xml\n", MOE_EINVAL, "log_format"},
        {"log_level = loud\n", MOE_EINVAL, "log_level"},
        {"log_prompts = maybe\n", MOE_EINVAL, "log_prompts"},
        {"drain_timeout = -1\n", MOE_ERANGE, "drain_timeout"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *p = write_conf(cases[i].text);
        srv_config c;
        srv_config_init(&c);
        char err[256] = "";
        ck_assert_int_eq(srv_config_load_file(&c, p, err, sizeof err), cases[i].status);
        ck_assert_msg(strstr(err, cases[i].needle), "case %zu: '%s'", i, err);
        srv_config_free(&c);
        unlink(p);
    }
    srv_config c;
    srv_config_init(&c);
    char err[256];
    ck_assert_int_eq(srv_config_load_file(&c, "/nonexistent/moed.conf", err, sizeof err), MOE_EIO);
    srv_config_free(&c);
}
END_TEST

START_TEST(test_env) {
    char *env[] = {"MOED_PORT=7000", "MOED_LOG_LEVEL=debug", "MOED_UNKNOWN_THING=1", "PATH=/bin",
                   "MOED_API_KEY=secret", "MOED_CHAT_PARSE_SPECIAL=true", NULL};
    srv_config c;
    srv_config_init(&c);
    char err[256];
    ck_assert_int_eq(srv_config_load_env(&c, env, err, sizeof err), 0);
    ck_assert_int_eq(c.port, 7000);
    ck_assert(c.chat_parse_special);
    ck_assert_int_eq(c.log_level, SRV_LOG_DEBUG);
    ck_assert_int_eq(c.n_api_keys, 1);
    ck_assert_str_eq(c.api_keys[0], "secret");
    char *bad_bool[] = {"MOED_CHAT_PARSE_SPECIAL=maybe", NULL};
    ck_assert_int_eq(srv_config_load_env(&c, bad_bool, err, sizeof err), MOE_EINVAL);
    ck_assert_msg(strstr(err, "MOED_CHAT_PARSE_SPECIAL"), "%s", err);
    ck_assert(c.chat_parse_special); /* unchanged */
    char *bad[] = {"MOED_THREADS=many", NULL};
    ck_assert_int_eq(srv_config_load_env(&c, bad, err, sizeof err), MOE_EINVAL);
    ck_assert_msg(strstr(err, "MOED_THREADS"), "%s", err);
    srv_config_free(&c);
}
END_TEST

/* One key set in all four places: the flag wins; without the flag the
 * environment; without both the file; without all three the default. */
START_TEST(test_precedence) {
    const char *p = write_conf("port = 1111\nthreads = 3\nhost = 10.0.0.1\nmodel = file.gguf\n");
    char path[64];
    strcpy(path, p);
    char envc[128];
    snprintf(envc, sizeof envc, "MOED_CONFIG=%s", path);
    char *env[] = {envc, "MOED_PORT=2222", "MOED_THREADS=4", NULL};
    char err[256] = "";

    srv_config c;
    srv_config_init(&c);
    char *argv1[] = {"serve", "--port", "3333", NULL};
    ck_assert_int_eq(srv_config_from_args(&c, 3, argv1, env, err, sizeof err), 0);
    ck_assert_int_eq(c.port, 3333);           /* flag */
    ck_assert_int_eq(c.threads, 4);           /* env over file */
    ck_assert_str_eq(c.host, "10.0.0.1");     /* file over default */
    ck_assert_int_eq(c.ctx_size, 0);          /* default */
    ck_assert_str_eq(c.model, "file.gguf");
    ck_assert_str_eq(c.config_path, path);
    srv_config_free(&c);

    /* --config on the command line beats MOED_CONFIG; a positional is the model;
     * --key=value and short flags work. */
    const char *p2 = write_conf("port = 5555\nctx_size = 512\n");
    char path2[64];
    strcpy(path2, p2);
    srv_config_init(&c);
    char *argv2[] = {"serve", "--config", path2, "pos.gguf", "-t", "7", "--log-format=json", "--log-prompts",
                     "--chat-parse-special", NULL};
    ck_assert_int_eq(srv_config_from_args(&c, 9, argv2, env, err, sizeof err), 0);
    ck_assert(c.chat_parse_special);
    ck_assert_int_eq(c.port, 2222); /* env over the file */
    ck_assert_int_eq(c.ctx_size, 512);
    ck_assert_int_eq(c.threads, 7);
    ck_assert_str_eq(c.model, "pos.gguf");
    ck_assert_int_eq(c.log_format, SRV_LOG_JSON);
    ck_assert(c.log_prompts);
    srv_config_free(&c);

    /* after "--" a dash-led name is the model, not an option */
    srv_config_init(&c);
    char *argv4[] = {"serve", "-p", "9", "--", "-odd.gguf", NULL};
    ck_assert_int_eq(srv_config_from_args(&c, 5, argv4, env, err, sizeof err), 0);
    ck_assert_str_eq(c.model, "-odd.gguf");
    ck_assert_int_eq(c.port, 9);
    srv_config_free(&c);

    /* -m beats the positional, which beats the file. */
    srv_config_init(&c);
    char *argv3[] = {"serve", "pos.gguf", "-m", "flag.gguf", NULL};
    ck_assert_int_eq(srv_config_from_args(&c, 4, argv3, env, err, sizeof err), 0);
    ck_assert_str_eq(c.model, "flag.gguf");
    srv_config_free(&c);
    unlink(path);
    unlink(path2);
}
END_TEST

START_TEST(test_args_errors) {
    char *env[] = {NULL};
    char err[256];
    srv_config c;
    struct {
        int argc;
        char *argv[4];
        int rc;
        const char *needle;
    } cases[] = {
        {2, {"serve", "--nope"}, MOE_EINVAL, "--nope"},
        {2, {"serve", "--port"}, MOE_EINVAL, "needs a value"},
        {3, {"serve", "--port", "-5"}, MOE_ERANGE, "port"},
        {3, {"serve", "a.gguf", "b.gguf"}, MOE_EINVAL, "b.gguf"},
        {3, {"serve", "--config", "/nonexistent"}, MOE_EIO, "/nonexistent"},
        {3, {"serve", "--bogus", "--help"}, MOE_EINVAL, "--bogus"},
        {3, {"serve", "--port", "x", "--help"}, 1, ""},
    };
    cases[6].argc = 4;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        srv_config_init(&c);
        err[0] = 0;
        ck_assert_int_eq(srv_config_from_args(&c, cases[i].argc, cases[i].argv, env, err, sizeof err), cases[i].rc);
        ck_assert_msg(strstr(err, cases[i].needle), "case %zu: '%s'", i, err);
        srv_config_free(&c);
    }
}
END_TEST

START_TEST(test_other_servers_flags) {
    char *env[] = {NULL};
    char err[256];
    srv_config c;
    srv_config_init(&c);
    char *argv[] = {"serve", "-np", "3", "--max-model-len=2048", "--alias", "a,b , c", NULL};
    ck_assert_int_eq(srv_config_from_args(&c, 6, argv, env, err, sizeof err), 0);
    ck_assert_int_eq(c.max_seqs, 3);
    ck_assert_int_eq(c.ctx_size, 2048);
    ck_assert_uint_eq(c.n_served_model_name, 3);
    ck_assert_str_eq(c.served_model_name[0], "a");
    ck_assert_str_eq(c.served_model_name[2], "c");
    srv_config_free(&c);
    srv_config_init(&c);
    char *argv2[] = {"serve", "--parallel", "5", "--max-num-seqs", "7", NULL};
    ck_assert_int_eq(srv_config_from_args(&c, 5, argv2, env, err, sizeof err), 0);
    ck_assert_int_eq(c.max_seqs, 7); /* the later flag wins, as for any repeated option */
    srv_config_free(&c);
    srv_config_init(&c);
    char *argv3[] = {"serve", "--port", "x", "--version", NULL};
    ck_assert_int_eq(srv_config_from_args(&c, 4, argv3, env, err, sizeof err), 2);
    srv_config_free(&c);
}
END_TEST

START_TEST(test_did_you_mean) {
    char *env[] = {NULL};
    char err[256];
    srv_config c;
    struct {
        char *flag;
        const char *hint;
    } cases[] = {
        {"--ctx-sise", "(did you mean --ctx-size?)"},
        {"--max_seq", "(did you mean --max-seqs?)"},
        {"-ctx-size", "(did you mean --ctx-size?)"},
        {"--cnofig", "(did you mean --config?)"},
        {"--zzzzzzzzzz", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        srv_config_init(&c);
        char *argv[] = {"serve", cases[i].flag, "1", NULL};
        ck_assert_int_eq(srv_config_from_args(&c, 3, argv, env, err, sizeof err), MOE_EINVAL);
        if (cases[i].hint) ck_assert_msg(strstr(err, cases[i].hint), "%s: '%s'", cases[i].flag, err);
        else ck_assert_msg(!strstr(err, "did you mean"), "%s: '%s'", cases[i].flag, err);
        srv_config_free(&c);
    }
    char *envp[] = {"MOED_CTX_SIZ=5", "MOED_PORT=1", "MOED_CONFIG=x", "PATH=/bin", "MOED_QQQQQQQQQQQQ=1", NULL};
    char out[256];
    ck_assert_uint_eq(srv_config_env_unknown(envp, out, sizeof out), 2);
    ck_assert_str_eq(out, "MOED_CTX_SIZ (did you mean MOED_CTX_SIZE?); MOED_QQQQQQQQQQQQ");
}
END_TEST

START_TEST(test_usage_lists_every_key) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    srv_config_usage(f);
    fclose(f);
    /* every key of the example config file appears in --help */
    char path[512];
    snprintf(path, sizeof path, "%s/config/moed.conf", MOE_SRC_DIR);
    FILE *conf = fopen(path, "r");
    ck_assert_ptr_nonnull(conf);
    char line[512];
    int keys = 0;
    srv_config c;
    srv_config_init(&c);
    while (fgets(line, sizeof line, conf)) {
        char key[64];
        /* documented keys appear as "#key = value" or "key = value" */
        if (sscanf(line, "#%63[a-z_] =", key) == 1 || sscanf(line, "%63[a-z_] =", key) == 1) {
            char needle[80];
            snprintf(needle, sizeof needle, "[key %s,", key);
            ck_assert_msg(strstr(buf, needle), "%s missing from --help", key);
            char err[256];
            ck_assert_int_ne(srv_config_set(&c, key, "", err, sizeof err), MOE_ENOTFOUND);
            keys++;
        }
    }
    fclose(conf);
    srv_config_free(&c);
    ck_assert_int_ge(keys, 24);
    free(buf);
}
END_TEST

/* SIGHUP: the live options come from the file again, flags still win,
 * other changes are only reported, and a bad file changes nothing. */
START_TEST(test_reload) {
    const char *p = write_conf("api_key = old\nport = 9000\nlog_level = warn\n");
    char path[64];
    strcpy(path, p);
    char *argv[] = {"serve", "--config", path, "--log-format", "json", "-m", "m.gguf", NULL};
    char *envp[] = {"MOED_CORS_ORIGINS=https://a.example", NULL};
    char err[256], changed[256], ignored[256];
    srv_config c;
    srv_config_init(&c);
    ck_assert_int_eq(srv_config_from_args(&c, 7, argv, envp, err, sizeof err), 0);
    ck_assert_str_eq(c.api_keys[0], "old");

    /* unchanged: nothing to report */
    ck_assert_int_eq(srv_config_reload(&c, 7, argv, envp, changed, sizeof changed, ignored, sizeof ignored, err,
                                       sizeof err), 0);
    ck_assert_str_eq(changed, "");
    ck_assert_str_eq(ignored, "");

    FILE *f = fopen(path, "w");
    fputs("api_key = new1, new2\nport = 9001\nlog_level = debug\nlog_format = text\n"
          "cors_origins = https://file.example\nlog_prompts = on\n", f);
    fclose(f);
    ck_assert_int_eq(srv_config_reload(&c, 7, argv, envp, changed, sizeof changed, ignored, sizeof ignored, err,
                                       sizeof err), 0);
    /* table order; log_format stays json (the flag), cors stays the env's */
    ck_assert_str_eq(changed, "api_key, log_level, log_prompts");
    ck_assert_str_eq(ignored, "port");
    ck_assert_int_eq(c.n_api_keys, 2);
    ck_assert_str_eq(c.api_keys[0], "new1");
    ck_assert_str_eq(c.api_keys[1], "new2");
    ck_assert_int_eq(c.log_level, SRV_LOG_DEBUG);
    ck_assert_int_eq(c.log_format, SRV_LOG_JSON);
    ck_assert(c.log_prompts);
    ck_assert_int_eq(c.n_cors_origins, 1);
    ck_assert_str_eq(c.cors_origins[0], "https://a.example");
    ck_assert_int_eq(c.port, 9000); /* needs a restart */

    f = fopen(path, "w");
    fputs("api_key = newer\nlog_level = loud\n", f);
    fclose(f);
    ck_assert_int_eq(srv_config_reload(&c, 7, argv, envp, changed, sizeof changed, ignored, sizeof ignored, err,
                                       sizeof err), MOE_EINVAL);
    ck_assert_msg(strstr(err, ":2:") && strstr(err, "log_level"), "%s", err);
    ck_assert_str_eq(c.api_keys[0], "new1");
    ck_assert_int_eq(c.log_level, SRV_LOG_DEBUG);

    unlink(path);
    ck_assert_int_eq(srv_config_reload(&c, 7, argv, envp, changed, sizeof changed, ignored, sizeof ignored, err,
                                       sizeof err), MOE_EIO);
    ck_assert_str_eq(c.api_keys[0], "new1");
    srv_config_free(&c);
}
END_TEST

static Suite *config_suite(void) {
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("defaults");
    tcase_add_test(tc, test_defaults);
    tcase_add_test(tc, test_api_key_without_keys);
    suite_add_tcase(s, tc);
    tc = tcase_create("file");
    tcase_add_test(tc, test_file);
    tcase_add_test(tc, test_file_errors);
    suite_add_tcase(s, tc);
    tc = tcase_create("env");
    tcase_add_test(tc, test_env);
    suite_add_tcase(s, tc);
    tc = tcase_create("precedence");
    tcase_add_test(tc, test_precedence);
    tcase_add_test(tc, test_args_errors);
    suite_add_tcase(s, tc);
    tc = tcase_create("aliases");
    tcase_add_test(tc, test_other_servers_flags);
    tcase_add_test(tc, test_did_you_mean);
    suite_add_tcase(s, tc);
    tc = tcase_create("reload");
    tcase_add_test(tc, test_reload);
    suite_add_tcase(s, tc);
    tc = tcase_create("usage");
    tcase_add_test(tc, test_usage_lists_every_key);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(config_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
