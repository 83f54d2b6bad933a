/* check_log.c - log lines: the one escaping function (srv_log_escape)
 * over hostile strings, against hand-derived expected output, and the
 * line writers built on it (one line per event; JSON lines parse). */
#include <check.h>
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

typedef struct {
    const char *in;
    size_t len; /* 0: strlen(in) */
    const char *text, *json;
} esc_case;

/* Expected values derived by hand from the rules in log.h. */
static const esc_case cases[] = {
    {"plain", 0, "plain", "\"plain\""},
    {"a\nb", 0, "a\\nb", "\"a\\nb\""},
    {"/x\r\n2026-01-01T00:00:00.000Z info  request id=forged", 0,
     "\"/x\\r\\n2026-01-01T00:00:00.000Z info  request id=forged\"",
     "\"/x\\r\\n2026-01-01T00:00:00.000Z info  request id=forged\""},
    {"x\x1b[31mred", 0, "x\\x1b[31mred", "\"x\\u001b[31mred\""},
    {"say \"hi\"", 0, "\"say \\\"hi\\\"\"", "\"say \\\"hi\\\"\""},
    {"back\\slash", 0, "back\\\\slash", "\"back\\\\slash\""},
    {"\xff\xfe", 0, "\\xff\\xfe", "\"\\\\xff\\\\xfe\""},
    {"caf\xc3\xa9", 0, "caf\xc3\xa9", "\"caf\xc3\xa9\""},
    {"\xc0\xaf", 0, "\\xc0\\xaf", "\"\\\\xc0\\\\xaf\""},             /* overlong '/' */
    {"\xed\xa0\x80", 0, "\\xed\\xa0\\x80", "\"\\\\xed\\\\xa0\\\\x80\""}, /* surrogate */
    {"end\xe2\x82", 0, "end\\xe2\\x82", "\"end\\\\xe2\\\\x82\""},     /* cut sequence */
    {"\xf4\x90\x80\x80", 0, "\\xf4\\x90\\x80\\x80", "\"\\\\xf4\\\\x90\\\\x80\\\\x80\""}, /* > U+10FFFF */
    {"\xf0\x9f\x98\x80", 0, "\xf0\x9f\x98\x80", "\"\xf0\x9f\x98\x80\""}, /* U+1F600 is fine */
    {"c1\xc2\x9b", 0, "c1\\u009b", "\"c1\\u009b\""},
    {"", 0, "\"\"", "\"\""},
    {"a=b", 0, "\"a=b\"", "\"a=b\""},
    {"a\0b", 3, "a\\x00b", "\"a\\u0000b\""},
    {"del\x7f", 0, "del\\x7f", "\"del\\u007f\""},
    {"ls\xe2\x80\xa8x", 0, "ls\\u2028x", "\"ls\\u2028x\""},
    {"tab\there", 0, "tab\\there", "\"tab\\there\""},
};

START_TEST(test_escape_cases) {
    const esc_case *c = &cases[_i];
    size_t len = c->len ? c->len : strlen(c->in);
    char out[256];
    bool trunc = true;
    size_t n = srv_log_escape(out, sizeof out, c->in, len, SRV_LOG_TEXT, false, &trunc);
    ck_assert(!trunc);
    ck_assert_uint_eq(n, strlen(out));
    ck_assert_str_eq(out, c->text);
    n = srv_log_escape(out, sizeof out, c->in, len, SRV_LOG_JSON, false, &trunc);
    ck_assert(!trunc);
    ck_assert_uint_eq(n, strlen(out));
    ck_assert_str_eq(out, c->json);
}
END_TEST

START_TEST(test_escape_bare) {
    char out[64];
    srv_log_escape(out, sizeof out, "say \"hi\"\n", 9, SRV_LOG_TEXT, true, NULL);
    ck_assert_str_eq(out, "say \"hi\"\\n");
    srv_log_escape(out, sizeof out, "", 0, SRV_LOG_TEXT, true, NULL);
    ck_assert_str_eq(out, "");
    /* bare means nothing for JSON: always a string literal */
    srv_log_escape(out, sizeof out, "a\"b", 3, SRV_LOG_JSON, true, NULL);
    ck_assert_str_eq(out, "\"a\\\"b\"");
}
END_TEST

/* Independent well-formedness check (RFC 3629 table 3.7 of Unicode). */
static bool valid_utf8(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        unsigned char lo = 0x80, hi = 0xBF;
        size_t k;
        if (c >= 0xC2 && c <= 0xDF) k = 2;
        else if (c == 0xE0) k = 3, lo = 0xA0;
        else if (c == 0xED) k = 3, hi = 0x9F;
        else if (c >= 0xE1 && c <= 0xEF) k = 3;
        else if (c == 0xF0) k = 4, lo = 0x90;
        else if (c == 0xF4) k = 4, hi = 0x8F;
        else if (c >= 0xF1 && c <= 0xF3) k = 4;
        else return false;
        if (i + k > n || s[i + 1] < lo || s[i + 1] > hi) return false;
        for (size_t j = 2; j < k; j++)
            if (s[i + j] < 0x80 || s[i + j] > 0xBF) return false;
        i += k;
    }
    return true;
}

static bool has_control(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] == 0x7f || (s[i] == 0xC2 && i + 1 < n && s[i + 1] >= 0x80 && s[i + 1] <= 0x9F))
            return true;
    return false;
}

/* Random byte strings (biased to the dangerous bytes), every size of
 * output buffer: JSON output always parses, text and JSON output are
 * always one line of well-formed UTF-8 without control characters. */
START_TEST(test_escape_fuzz) {
    static const unsigned char pool[] = {'\n', '\r', 0x1b, '"', '\\', ' ', '=', 0, 0x7f, 0x80, 0xbf, 0xc0,
                                         0xc2, 0x9b, 0xe2, 0x80, 0xa8, 0xed, 0xa0, 0xf0, 0x9f, 0xf4, 0xff, 'a'};
    unsigned seed = 12345;
    char in[64], out[400];
    for (int iter = 0; iter < 20000; iter++) {
        size_t len = (size_t)(rand_r(&seed) % 40);
        for (size_t i = 0; i < len; i++)
            in[i] = (char)(rand_r(&seed) % 4 ? pool[rand_r(&seed) % sizeof pool] : (unsigned char)rand_r(&seed));
        size_t cap = 8 + (size_t)(rand_r(&seed) % 300);
        for (int f = 0; f < 2; f++) {
            bool trunc;
            size_t n = srv_log_escape(out, cap, in, len, f ? SRV_LOG_JSON : SRV_LOG_TEXT, false, &trunc);
            ck_assert_uint_lt(n, cap);
            ck_assert_uint_eq(n, strlen(out));
            ck_assert_msg(valid_utf8((unsigned char *)out, n), "ill-formed output at iter %d", iter);
            ck_assert_msg(!has_control((unsigned char *)out, n), "control char in output at iter %d", iter);
            if (f) {
                cJSON *j = cJSON_Parse(out);
                ck_assert_msg(j && cJSON_IsString(j), "not a JSON string: %s", out);
                cJSON_Delete(j);
            } else if (!trunc && len && out[0] != '"') {
                /* unquoted text: no space, quote or '=' to forge a field with */
                ck_assert(!strpbrk(out, " \"="));
            }
            if (trunc) ck_assert(strstr(out, "...") != NULL);
        }
    }
}
END_TEST

START_TEST(test_escape_truncates_whole_escapes) {
    char in[100], out[16];
    memset(in, '\n', sizeof in); /* every byte becomes the two characters \n */
    bool trunc;
    size_t n = srv_log_escape(out, sizeof out, in, sizeof in, SRV_LOG_JSON, false, &trunc);
    ck_assert(trunc);
    /* cap 16: '"' + 5 x "\n" (10) + "..." + '"' = 15 characters */
    ck_assert_str_eq(out, "\"\\n\\n\\n\\n\\n...\"");
    ck_assert_uint_eq(n, 15);
    n = srv_log_escape(out, sizeof out, in, sizeof in, SRV_LOG_TEXT, false, &trunc);
    ck_assert(trunc);
    ck_assert_str_eq(out, "\\n\\n\\n\\n\\n\\n...");
}
END_TEST

/* Runs fn with stderr sent to a file; returns what it wrote (malloc'd). */
static char *capture(void (*fn)(void)) {
    char path[] = "/tmp/check_log_XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    unlink(path);
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    dup2(fd, STDERR_FILENO);
    fn();
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    off_t size = lseek(fd, 0, SEEK_END);
    char *buf = calloc(1, (size_t)size + 1);
    ck_assert_int_eq(pread(fd, buf, (size_t)size, 0), size);
    close(fd);
    return buf;
}

static const char HOSTILE_PATH[] = "/v1/\n2026-01-01T00:00:00.000Z info  forged\x1b[2J\xff \"q\"";
static const char HOSTILE_ERR[] = "model: The model 'x\r\ny\x1b\\' does not exist";

static void write_lines(void) {
    srv_log_request r = {.id = "cmpl-1\n", .method = "POST", .path = HOSTILE_PATH, .model = "m\x1b",
                         .status = 404, .ttft_ms = -1, .total_ms = 1.25, .finish = NULL, .error = HOSTILE_ERR};
    srv_log_req(&r);
    srv_log(SRV_LOG_INFO, "http: %s", HOSTILE_PATH);
    srv_log_prompt("cmpl-1", "line1\nline2\xc0", 12);
    srv_log_kv(SRV_LOG_WARN, "note", "file", "a b\n");
    srv_log_kv_signal_safe("fatal", "file", "/m/\"x\"\n.gguf");
}

static size_t count_lines(const char *s) {
    size_t n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

START_TEST(test_text_lines) {
    srv_log_setup(SRV_LOG_TEXT, SRV_LOG_DEBUG, true);
    char *out = capture(write_lines);
    ck_assert_uint_eq(count_lines(out), 5);
    ck_assert(valid_utf8((unsigned char *)out, strlen(out)));
    for (const char *p = out; *p; p++) ck_assert(*p == '\n' || (unsigned char)*p >= 0x20);
    ck_assert_msg(strstr(out, " request id=cmpl-1\\n POST "
                              "\"/v1/\\n2026-01-01T00:00:00.000Z info  forged\\x1b[2J\\xff \\\"q\\\"\" status=404 "
                              "model=m\\x1b stream=0") != NULL, "%s", out);
    ck_assert_msg(strstr(out, " error=\"model: The model 'x\\r\\ny\\x1b\\\\' does not exist\"\n"), "%s", out);
    ck_assert_msg(strstr(out, " info  http: /v1/\\n2026-01-01T00:00:00.000Z info  forged\\x1b[2J\\xff \"q\"\n"), "%s",
                  out);
    ck_assert_msg(strstr(out, " info  prompt id=cmpl-1 text=line1\\nline2\\xc0\n"), "%s", out);
    ck_assert_msg(strstr(out, " warn  note file=\"a b\\n\"\n"), "%s", out);
    ck_assert_msg(strstr(out, " error fatal file=\"/m/\\\"x\\\"\\n.gguf\"\n"), "%s", out);
    free(out);
}
END_TEST

START_TEST(test_json_lines) {
    srv_log_setup(SRV_LOG_JSON, SRV_LOG_DEBUG, true);
    char *out = capture(write_lines);
    ck_assert_uint_eq(count_lines(out), 5);
    ck_assert(valid_utf8((unsigned char *)out, strlen(out)));
    const char *want_msg[] = {"request", "http: /v1/\n2026-01-01T00:00:00.000Z info  forged\x1b[2J\\xff \"q\"",
                              "prompt", "note", "fatal"};
    int k = 0;
    for (char *save = NULL, *ln = strtok_r(out, "\n", &save); ln; ln = strtok_r(NULL, "\n", &save), k++) {
        cJSON *o = cJSON_Parse(ln);
        ck_assert_msg(o != NULL, "line %d is not JSON: %s", k, ln);
        ck_assert_str_eq(cJSON_GetObjectItem(o, "msg")->valuestring, want_msg[k]);
        ck_assert_uint_eq(strlen(cJSON_GetObjectItem(o, "ts")->valuestring), 24);
        if (k == 0) {
            ck_assert_str_eq(cJSON_GetObjectItem(o, "id")->valuestring, "cmpl-1\n");
            ck_assert_str_eq(cJSON_GetObjectItem(o, "path")->valuestring,
                             "/v1/\n2026-01-01T00:00:00.000Z info  forged\x1b[2J\\xff \"q\"");
            ck_assert_str_eq(cJSON_GetObjectItem(o, "model")->valuestring, "m\x1b");
            ck_assert_str_eq(cJSON_GetObjectItem(o, "error")->valuestring, HOSTILE_ERR);
            ck_assert_int_eq(cJSON_GetObjectItem(o, "status")->valueint, 404);
            ck_assert(cJSON_IsFalse(cJSON_GetObjectItem(o, "stream")));
            ck_assert_double_eq_tol(cJSON_GetObjectItem(o, "total_ms")->valuedouble, 1.2, 0.11);
            ck_assert_ptr_null(cJSON_GetObjectItem(o, "ttft_ms"));
        }
        if (k == 2) ck_assert_str_eq(cJSON_GetObjectItem(o, "prompt")->valuestring, "line1\nline2\\xc0");
        if (k == 4) ck_assert_str_eq(cJSON_GetObjectItem(o, "file")->valuestring, "/m/\"x\"\n.gguf");
        cJSON_Delete(o);
    }
    ck_assert_int_eq(k, 5);
    free(out);
}
END_TEST

static void write_levels(void) {
    srv_log(SRV_LOG_DEBUG, "debug-line");
    srv_log(SRV_LOG_INFO, "info-line");
    srv_log(SRV_LOG_WARN, "warn-line");
    srv_log_prompt("x", "p", 1);
}

START_TEST(test_level_threshold) {
    srv_log_setup(SRV_LOG_TEXT, SRV_LOG_WARN, true);
    char *out = capture(write_levels);
    ck_assert_uint_eq(count_lines(out), 1);
    ck_assert(strstr(out, "warn-line"));
    free(out);
    srv_log_setup(SRV_LOG_TEXT, SRV_LOG_DEBUG, false);
    out = capture(write_levels);
    ck_assert_uint_eq(count_lines(out), 3); /* no prompt line without log_prompts */
    free(out);
}
END_TEST

static Suite *log_suite(void) {
    Suite *s = suite_create("log");
    TCase *tc = tcase_create("escape");
    tcase_add_loop_test(tc, test_escape_cases, 0, (int)(sizeof cases / sizeof cases[0]));
    tcase_add_test(tc, test_escape_bare);
    tcase_add_test(tc, test_escape_fuzz);
    tcase_add_test(tc, test_escape_truncates_whole_escapes);
    suite_add_tcase(s, tc);
    tc = tcase_create("lines");
    tcase_add_test(tc, test_text_lines);
    tcase_add_test(tc, test_json_lines);
    tcase_add_test(tc, test_level_threshold);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(log_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
