/* check_responses.c - the Responses API translation (server/responses.h):
 * input and instructions must give exactly the prompt the equivalent chat
 * body gives (srv_oai_parse is the reference), refused fields are named,
 * and the object and events have OpenAI's shapes with a gapless
 * sequence_number. Uses the deepseek2 fixture's tokenizer and template. */
#include <check.h>
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "responses.h"
#include "status.h"

static moe_gguf *g;
static moe_tok *tok;
static moe_chat_template ct;
static srv_oai_limits lim;

static void setup(void) {
    char path[512], err[256];
    int st;
    snprintf(path, sizeof path, "%s/tests/fixtures/models/deepseek2.gguf", MOE_SRC_DIR);
    g = moe_gguf_open(path, &st, err, sizeof err);
    ck_assert_msg(g, "%s", err);
    tok = moe_tok_load(g, &st, err, sizeof err);
    ck_assert_msg(tok, "%s", err);
    ck_assert_int_eq(moe_chat_template_from_model(&ct, g, tok, MOE_CHAT_AUTO), 0);
    memset(&lim, 0, sizeof lim);
    lim.model_name = "tiny";
    lim.n_vocab = moe_tok_n_vocab(tok);
    lim.ctx_size = 256;
    lim.max_seqs = 8;
    lim.max_depth = 16;
    lim.tok = tok;
    lim.chat = &ct;
}

static void teardown(void) {
    moe_chat_template_free(&ct);
    moe_tok_free(tok);
    moe_gguf_close(g);
}

START_TEST(test_same_prompt_as_chat) {
    const char *resp = "{\"model\":\"tiny\",\"instructions\":\"be brief\",\"max_output_tokens\":9,\"temperature\":0.25,"
                       "\"store\":false,\"metadata\":{\"k\":\"v\"},\"input\":[{\"role\":\"user\",\"content\":\"hi\"},"
                       "{\"type\":\"reasoning\",\"summary\":[]},"
                       "{\"type\":\"message\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"yo\"}]},"
                       "{\"role\":\"developer\",\"content\":[{\"type\":\"input_text\",\"text\":\"more\"}]}]}";
    const char *chat = "{\"messages\":[{\"role\":\"system\",\"content\":\"be brief\"},{\"role\":\"user\",\"content\":\"hi\"},"
                       "{\"role\":\"assistant\",\"content\":\"yo\"},{\"role\":\"system\",\"content\":\"more\"}]}";
    srv_oai_req a, c;
    srv_resp_echo echo;
    srv_oai_err e;
    ck_assert_msg(srv_resp_parse(resp, strlen(resp), &lim, &a, &echo, &e) == 0, "%s: %s", e.param, e.message);
    ck_assert_int_eq(srv_oai_parse(SRV_OAI_CHAT, chat, strlen(chat), &lim, &c, &e), 0);
    ck_assert_int_eq(a.prompts[0].n, c.prompts[0].n);
    ck_assert_mem_eq(a.prompts[0].ids, c.prompts[0].ids, (size_t)c.prompts[0].n * sizeof(int32_t));
    ck_assert_int_eq(a.max_tokens, 9);
    ck_assert_float_eq(a.sampling.temperature, 0.25f);
    ck_assert_str_eq(echo.instructions, "be brief");
    ck_assert_int_eq(echo.max_output_tokens, 9);
    ck_assert_str_eq(echo.metadata, "{\"k\":\"v\"}");
    srv_oai_req_free(&a);
    srv_oai_req_free(&c);
    srv_resp_echo_free(&echo);
}
END_TEST

static const struct {
    const char *body;
    int http;
    const char *param;
} bad_cases[] = {
    {"{\"input\":\"x\",\"previous_response_id\":\"resp_1\"}", 400, "previous_response_id"},
    {"{\"input\":\"x\",\"store\":true}", 400, "store"},
    {"{\"input\":\"x\",\"background\":true}", 400, "background"},
    {"{\"input\":\"x\",\"text\":{\"format\":{\"type\":\"json_object\"}}}", 400, "text.format"},
    {"{\"input\":\"x\",\"tool_choice\":\"required\"}", 400, "tool_choice"},
    {"{\"input\":[{\"type\":\"function_call\",\"name\":\"f\"}]}", 400, "input[0].type"},
    {"{\"input\":[{\"role\":\"user\",\"content\":[{\"type\":\"input_file\"}]}]}", 400, "input[0].content[0].type"},
    {"{\"input\":[{\"role\":\"user\",\"content\":[{\"type\":\"input_text\"}]}]}", 400, "input[0].content[0].text"},
    {"{\"input\":[{\"role\":\"user\"}]}", 400, "input[0].content"},
    {"{\"input\":7}", 400, "input"},
    {"{}", 400, "input"},
    {"{\"input\":\"x\",\"max_output_tokens\":0}", 400, "max_output_tokens"},
    {"{\"input\":\"x\",\"max_output_tokens\":500}", 400, "max_output_tokens"},
    {"{\"input\":\"x\",\"model\":\"gpt\"}", 404, "model"},
};

START_TEST(test_bad_inputs) {
    srv_oai_req r;
    srv_resp_echo echo;
    srv_oai_err e;
    const char *b = bad_cases[_i].body;
    int st = srv_resp_parse(b, strlen(b), &lim, &r, &echo, &e);
    ck_assert_msg(st < 0, "accepted: %s", b);
    ck_assert_int_eq(e.http, bad_cases[_i].http);
    ck_assert_msg(!strcmp(e.param, bad_cases[_i].param), "%s: param '%s' (%s)", b, e.param, e.message);
    ck_assert_ptr_null(r.prompts);
    ck_assert_ptr_null(echo.instructions);
    /* the chat parser's name for it never leaks out */
    ck_assert_ptr_null(strstr(e.message, "max_tokens"));
}
END_TEST

static int64_t seq_of(const char *frame) {
    const char *d = strstr(frame, "data: ");
    cJSON *o = cJSON_Parse(d + 6);
    int64_t n = (int64_t)cJSON_GetObjectItem(o, "sequence_number")->valuedouble;
    cJSON_Delete(o);
    return n;
}

START_TEST(test_render_and_events) {
    srv_resp_echo echo = {.max_output_tokens = -1, .temperature = 1, .top_p = 1};
    srv_resp_ctx c = {.id = "resp_1", .item_id = "msg_1", .model = "tiny", .created_at = 5, .echo = &echo};
    char *r = srv_resp_render(&c, "hi", 2, MOE_FINISH_STOP, 3, 1);
    cJSON *o = cJSON_Parse(r);
    ck_assert_str_eq(cJSON_GetObjectItem(o, "status")->valuestring, "completed");
    ck_assert(cJSON_IsNull(cJSON_GetObjectItem(o, "incomplete_details")));
    ck_assert_int_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(o, "usage"), "total_tokens")->valueint, 4);
    cJSON_Delete(o);
    free(r);
    r = srv_resp_render(&c, "hi", 2, MOE_FINISH_LENGTH, 3, 1);
    o = cJSON_Parse(r);
    ck_assert_str_eq(cJSON_GetObjectItem(o, "status")->valuestring, "incomplete");
    ck_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(o, "incomplete_details"), "reason")->valuestring,
                     "max_output_tokens");
    cJSON_Delete(o);
    free(r);
    /* every event numbered in order across the calls, no gap */
    int64_t seq = 0, want = 0;
    char *parts[3] = {srv_resp_sse_start(&c, &seq), srv_resp_sse_delta(&c, &seq, "h", 1),
                      srv_resp_sse_end(&c, &seq, "h", 1, MOE_FINISH_STOP, 3, 1)};
    for (int i = 0; i < 3; i++) {
        for (char *f = parts[i]; (f = strstr(f, "event: ")); f += 7) ck_assert_int_eq(seq_of(f), want++);
    }
    ck_assert_int_eq(seq, want);
    ck_assert_int_eq(want, 9);
    ck_assert_ptr_nonnull(strstr(parts[0], "event: response.created\n"));
    ck_assert_ptr_nonnull(strstr(parts[2], "event: response.completed\n"));
    ck_assert_ptr_null(strstr(parts[2], "response.incomplete"));
    for (int i = 0; i < 3; i++) free(parts[i]);
    srv_oai_err e;
    srv_oai_err_set(&e, 500, NULL, "boom");
    r = srv_resp_sse_error(&seq, &e);
    ck_assert_int_eq(seq_of(r), 9);
    ck_assert_ptr_nonnull(strstr(r, "event: error\n"));
    free(r);
}
END_TEST

static Suite *responses_suite(void) {
    Suite *s = suite_create("responses");
    TCase *tc = tcase_create("parse");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_same_prompt_as_chat);
    tcase_add_loop_test(tc, test_bad_inputs, 0, (int)(sizeof bad_cases / sizeof bad_cases[0]));
    suite_add_tcase(s, tc);
    tc = tcase_create("render");
    tcase_add_test(tc, test_render_and_events);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(responses_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
