/* check_anthropic.c - the Messages API translation (server/anthropic.h):
 * a Messages body must give exactly the prompt the equivalent chat body
 * gives (srv_oai_parse is the reference), bad fields are named as
 * Anthropic names them, and the rendered bodies and events have
 * Anthropic's shapes. Uses the deepseek2 fixture's tokenizer and template. */
#include <check.h>
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "anthropic.h"
#include "gguf.h"
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
    const char *anth = "{\"model\":\"tiny\",\"max_tokens\":7,\"system\":[{\"type\":\"text\",\"text\":\"be brief\"}],"
                       "\"stop_sequences\":[\"a\",\"bc\"],\"temperature\":0.5,\"top_k\":3,\"metadata\":{\"user_id\":\"u\"},"
                       "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},"
                       "{\"role\":\"assistant\",\"content\":[{\"type\":\"thinking\",\"thinking\":\"hmm\",\"signature\":\"s\"},"
                       "{\"type\":\"text\",\"text\":\"yo\"}]},"
                       "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"more\"}]}]}";
    const char *chat = "{\"messages\":[{\"role\":\"system\",\"content\":\"be brief\"},{\"role\":\"user\",\"content\":\"hi\"},"
                       "{\"role\":\"assistant\",\"content\":\"yo\"},{\"role\":\"user\",\"content\":\"more\"}]}";
    srv_oai_req a, c;
    srv_oai_err e;
    ck_assert_msg(srv_anth_parse(anth, strlen(anth), &lim, false, &a, &e) == 0, "%s: %s", e.param, e.message);
    ck_assert_int_eq(srv_oai_parse(SRV_OAI_CHAT, chat, strlen(chat), &lim, &c, &e), 0);
    ck_assert_int_eq(a.prompts[0].n, c.prompts[0].n);
    ck_assert_mem_eq(a.prompts[0].ids, c.prompts[0].ids, (size_t)c.prompts[0].n * sizeof(int32_t));
    ck_assert_int_eq(a.max_tokens, 7);
    ck_assert_int_eq(a.n, 1);
    ck_assert_int_eq(a.n_stop, 2);
    ck_assert_str_eq(a.stop[1], "bc");
    ck_assert_float_eq(a.sampling.temperature, 0.5f);
    ck_assert_int_eq(a.sampling.top_k, 3);
    srv_oai_req_free(&a);
    srv_oai_req_free(&c);
    /* count_tokens: max_tokens optional */
    const char *count = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    ck_assert_int_eq(srv_anth_parse(count, strlen(count), &lim, true, &a, &e), 0);
    ck_assert_int_gt(a.prompts[0].n, 1);
    srv_oai_req_free(&a);
    ck_assert_int_eq(srv_anth_parse(count, strlen(count), &lim, false, &a, &e), MOE_EINVAL);
    ck_assert_str_eq(e.param, "max_tokens");
    /* a prompt over the 256-token context is still counted, but not run */
    char big[4096];
    int k = snprintf(big, sizeof big, "{\"model\":\"tiny\",\"max_tokens\":1,\"messages\":[{\"role\":\"user\",\"content\":\"");
    for (int i = 0; i < 400; i++) k += snprintf(big + k, sizeof big - (size_t)k, "a ");
    snprintf(big + k, sizeof big - (size_t)k, "\"}]}");
    ck_assert_int_eq(srv_anth_parse(big, strlen(big), &lim, true, &a, &e), 0);
    ck_assert_int_gt(a.prompts[0].n, 256);
    srv_oai_req_free(&a);
    ck_assert_int_eq(srv_anth_parse(big, strlen(big), &lim, false, &a, &e), MOE_EINVAL);
    ck_assert_str_eq(e.param, "messages");
}
END_TEST

static const struct {
    const char *body;
    int http;
    const char *param;
} bad_cases[] = {
    {"{\"max_tokens\":1,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", 400, "model"},
    {"{\"model\":\"other\",\"max_tokens\":1,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", 404, "model"},
    {"{\"model\":\"tiny\",\"max_tokens\":1.5,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", 400, "max_tokens"},
    {"{\"model\":\"tiny\",\"max_tokens\":300,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", 400, "max_tokens"},
    {"{\"model\":\"tiny\",\"max_tokens\":1,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"tool_use\",\"id\":\"t\"}]}]}",
     400, "messages.0.content.0.type"},
    {"{\"model\":\"tiny\",\"max_tokens\":1,\"messages\":[{\"role\":\"user\"}]}", 400, "messages.0.content"},
    {"{\"model\":\"tiny\",\"max_tokens\":1,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tool_choice\":{\"type\":\"auto\"}}",
     400, "tool_choice"},
    {"{\"model\":\"tiny\",\"max_tokens\":1,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stop_sequences\":[1]}",
     400, "stop_sequences.0"},
    {"{\"model\":\"tiny\",\"max_tokens\":1,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"top_k\":-1}", 400, "top_k"},
    {"{\"model\":\"tiny\",\"max_tokens\":1,\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stream\":1}", 400, "stream"},
    {"[1]", 400, ""},
    {"{\"model\":\"tiny\"} x", 400, ""},
};

START_TEST(test_bad_inputs) {
    srv_oai_req r;
    srv_oai_err e;
    const char *b = bad_cases[_i].body;
    int st = srv_anth_parse(b, strlen(b), &lim, false, &r, &e);
    ck_assert_msg(st < 0, "accepted: %s", b);
    ck_assert_int_eq(e.http, bad_cases[_i].http);
    ck_assert_msg(!strcmp(e.param, bad_cases[_i].param), "%s: param '%s' (%s)", b, e.param, e.message);
    ck_assert_ptr_null(r.prompts);
    /* the Anthropic body: the field leads the message */
    char *j = srv_anth_err_json(&e);
    cJSON *o = cJSON_Parse(j);
    ck_assert_str_eq(cJSON_GetObjectItem(o, "type")->valuestring, "error");
    const cJSON *err = cJSON_GetObjectItem(o, "error");
    ck_assert_str_eq(cJSON_GetObjectItem(err, "type")->valuestring,
                     e.http == 404 ? "not_found_error" : "invalid_request_error");
    if (e.param[0]) ck_assert(!strncmp(cJSON_GetObjectItem(err, "message")->valuestring, e.param, strlen(e.param)));
    cJSON_Delete(o);
    free(j);
}
END_TEST

START_TEST(test_render) {
    ck_assert_str_eq(srv_anth_stop_reason(MOE_FINISH_STOP, -1), "end_turn");
    ck_assert_str_eq(srv_anth_stop_reason(MOE_FINISH_STOP, 2), "stop_sequence");
    ck_assert_str_eq(srv_anth_stop_reason(MOE_FINISH_LENGTH, -1), "max_tokens");
    ck_assert_ptr_null(srv_anth_stop_reason(MOE_FINISH_CANCELLED, -1));
    char *m = srv_anth_render_message("msg_1", "tiny", "ab\xff", 3, MOE_FINISH_STOP, "zz", 5, 2);
    cJSON *o = cJSON_Parse(m);
    ck_assert_str_eq(cJSON_GetObjectItem(o, "stop_reason")->valuestring, "stop_sequence");
    ck_assert_str_eq(cJSON_GetObjectItem(o, "stop_sequence")->valuestring, "zz");
    const cJSON *c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(o, "content"), 0);
    ck_assert_str_eq(cJSON_GetObjectItem(c0, "text")->valuestring, "ab\xEF\xBF\xBD"); /* bad byte -> U+FFFD */
    ck_assert_int_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(o, "usage"), "input_tokens")->valueint, 5);
    cJSON_Delete(o);
    free(m);
    m = srv_anth_render_message("msg_1", "tiny", "", 0, MOE_FINISH_STOP, NULL, 5, 2);
    o = cJSON_Parse(m);
    ck_assert_str_eq(cJSON_GetObjectItem(o, "stop_reason")->valuestring, "end_turn");
    ck_assert(cJSON_IsNull(cJSON_GetObjectItem(o, "stop_sequence")));
    cJSON_Delete(o);
    free(m);
    char *s = srv_anth_sse_start("msg_1", "tiny", 9);
    ck_assert_ptr_nonnull(strstr(s, "event: message_start\ndata: {\"type\":\"message_start\""));
    ck_assert_ptr_nonnull(strstr(s, "\n\nevent: content_block_start\ndata: "));
    ck_assert_ptr_nonnull(strstr(s, "\n\nevent: ping\ndata: {\"type\":\"ping\"}\n\n"));
    free(s);
    s = srv_anth_sse_delta("x\"y", 3);
    ck_assert_str_eq(s, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,"
                        "\"delta\":{\"type\":\"text_delta\",\"text\":\"x\\\"y\"}}\n\n");
    free(s);
    s = srv_anth_sse_end(MOE_FINISH_LENGTH, NULL, 4);
    ck_assert_str_eq(s, "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n"
                        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\","
                        "\"stop_sequence\":null},\"usage\":{\"output_tokens\":4}}\n\n"
                        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    free(s);
}
END_TEST

static Suite *anthropic_suite(void) {
    Suite *s = suite_create("anthropic");
    TCase *tc = tcase_create("parse");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_same_prompt_as_chat);
    tcase_add_loop_test(tc, test_bad_inputs, 0, (int)(sizeof bad_cases / sizeof bad_cases[0]));
    suite_add_tcase(s, tc);
    tc = tcase_create("render");
    tcase_add_test(tc, test_render);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(anthropic_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
