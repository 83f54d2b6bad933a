/* check_openai.c - OpenAI request validation and response shapes
 * (server/openai.h), against the deepseek2 fixture's tokenizer and chat
 * template. Reference prompts are built independently with the
 * tokenizer and chat renderer. */
#include <check.h>
#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "openai.h"
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
    lim.model_alt = "deepseek2";
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

static int parse(srv_oai_kind kind, const char *body, srv_oai_req *r, srv_oai_err *e) {
    return srv_oai_parse(kind, body, strlen(body), &lim, r, e);
}

START_TEST(test_chat_prompt) {
    srv_oai_req r;
    srv_oai_err e;
    const char *body = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"system\",\"content\":\"be brief\"},"
                       "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"hello\"},"
                       "{\"type\":\"text\",\"text\":\"world\"}]}]}";
    ck_assert_int_eq(parse(SRV_OAI_CHAT, body, &r, &e), 0);
    /* reference: the same conversation rendered and tokenized by hand, parts joined by "\n" */
    moe_chat_msg msgs[2] = {{"system", "be brief", 8, NULL, 0}, {"user", "hello\nworld", 11, NULL, 0}};
    char *text;
    size_t tl, n;
    ck_assert_int_eq(moe_chat_render(&ct, msgs, 2, true, &text, &tl), 0);
    int32_t *ids;
    ck_assert_int_eq(moe_tok_encode(tok, text, tl, true, false, &ids, &n), 0);
    ck_assert_int_eq(r.n_prompts, 1);
    ck_assert_int_eq(r.prompts[0].n, (int64_t)n);
    ck_assert_mem_eq(r.prompts[0].ids, ids, n * sizeof(int32_t));
    ck_assert_str_eq(r.prompts[0].text, text);
    /* defaults: chat may use the rest of the context; OpenAI sampling defaults */
    ck_assert_int_eq(r.max_tokens, 256 - (int64_t)n);
    ck_assert_int_eq(r.n, 1);
    ck_assert(!r.stream && !r.logprobs);
    ck_assert_float_eq(r.sampling.temperature, 1);
    ck_assert_float_eq(r.sampling.top_p, 1);
    ck_assert_float_eq(r.sampling.repetition_penalty, 1);
    ck_assert(!r.sampling.has_seed);
    free(ids);
    free(text);
    srv_oai_req_free(&r);
}
END_TEST

START_TEST(test_chat_fields) {
    srv_oai_req r;
    srv_oai_err e;
    const char *body = "{\"model\":\"deepseek2\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
                       "\"stream\":true,\"stream_options\":{\"include_usage\":true},\"max_tokens\":5,"
                       "\"max_completion_tokens\":7,\"temperature\":0.5,\"top_p\":0.9,\"top_k\":40,\"min_p\":0.05,"
                       "\"seed\":42,\"presence_penalty\":0.5,\"frequency_penalty\":-0.5,\"repetition_penalty\":1.1,"
                       "\"logit_bias\":{\"10\":5,\"20\":-100},\"stop\":[\"a\",\"bc\"],\"n\":3,\"logprobs\":true,"
                       "\"top_logprobs\":4,\"ignore_eos\":true,\"user\":\"u1\",\"tools\":[]}";
    ck_assert_msg(parse(SRV_OAI_CHAT, body, &r, &e) == 0, "%s", e.message);
    ck_assert(r.stream && r.include_usage && r.logprobs && r.ignore_eos);
    ck_assert_int_eq(r.max_tokens, 7); /* max_completion_tokens wins */
    ck_assert_float_eq_tol(r.sampling.temperature, 0.5, 1e-6);
    ck_assert_float_eq_tol(r.sampling.top_p, 0.9, 1e-6);
    ck_assert_int_eq(r.sampling.top_k, 40);
    ck_assert_float_eq_tol(r.sampling.min_p, 0.05, 1e-6);
    ck_assert(r.sampling.has_seed);
    ck_assert_int_eq(r.sampling.seed, 42);
    ck_assert_float_eq_tol(r.sampling.frequency_penalty, -0.5, 1e-6);
    ck_assert_float_eq_tol(r.sampling.repetition_penalty, 1.1, 1e-6);
    ck_assert_int_eq(r.sampling.n_logit_bias, 2);
    ck_assert_int_eq(r.sampling.logit_bias_ids[0], 10);
    ck_assert_float_eq(r.sampling.logit_bias[1], -100);
    ck_assert_int_eq(r.n_stop, 2);
    ck_assert_str_eq(r.stop[1], "bc");
    ck_assert_int_eq(r.n, 3);
    ck_assert_int_eq(r.top_logprobs, 4);
    ck_assert_str_eq(r.user, "u1");
    moe_request er;
    srv_oai_engine_request(&r, 0, &er);
    ck_assert_ptr_eq(er.prompt, r.prompts[0].ids);
    ck_assert_int_eq(er.n, 3);
    ck_assert_int_eq(er.max_tokens, 7);
    ck_assert_int_eq(er.n_stop, 2);
    ck_assert_str_eq(er.stop[0], "a");
    ck_assert_int_eq(er.top_logprobs, 4);
    ck_assert(er.ignore_eos && er.logprobs);
    srv_oai_req_free(&r);
}
END_TEST

START_TEST(test_completion_prompts) {
    srv_oai_req r;
    srv_oai_err e;
    /* a string: BOS as the model asks, then the text */
    ck_assert_int_eq(parse(SRV_OAI_COMPLETION, "{\"prompt\":\"hello there\",\"echo\":true,\"logprobs\":2}", &r, &e), 0);
    int32_t *ids;
    size_t n;
    ck_assert_int_eq(moe_tok_encode(tok, "hello there", 11, true, moe_tok_add_bos_default(tok), &ids, &n), 0);
    ck_assert_int_eq(r.n_prompts, 1);
    ck_assert_int_eq(r.prompts[0].n, (int64_t)n);
    ck_assert_mem_eq(r.prompts[0].ids, ids, n * 4);
    ck_assert_str_eq(r.prompts[0].text, "hello there");
    ck_assert_int_eq(r.max_tokens, 16); /* OpenAI's completions default */
    ck_assert(r.echo && r.logprobs);
    ck_assert_int_eq(r.top_logprobs, 2);
    free(ids);
    srv_oai_req_free(&r);

    ck_assert_int_eq(parse(SRV_OAI_COMPLETION, "{\"prompt\":[\"a\",\"b c\"]}", &r, &e), 0);
    ck_assert_int_eq(r.n_prompts, 2);
    ck_assert_str_eq(r.prompts[1].text, "b c");
    srv_oai_req_free(&r);

    ck_assert_int_eq(parse(SRV_OAI_COMPLETION, "{\"prompt\":[5,6,7],\"max_tokens\":3}", &r, &e), 0);
    ck_assert_int_eq(r.n_prompts, 1);
    ck_assert_int_eq(r.prompts[0].n, 3);
    ck_assert_int_eq(r.prompts[0].ids[2], 7);
    char *dec;
    size_t dl;
    int32_t ref[3] = {5, 6, 7};
    ck_assert_int_eq(moe_tok_decode(tok, ref, 3, false, &dec, &dl), 0);
    ck_assert_str_eq(r.prompts[0].text, dec);
    free(dec);
    srv_oai_req_free(&r);

    ck_assert_int_eq(parse(SRV_OAI_COMPLETION, "{\"prompt\":[[1,2],[3],[4,5,6]]}", &r, &e), 0);
    ck_assert_int_eq(r.n_prompts, 3);
    ck_assert_int_eq(r.prompts[2].n, 3);
    ck_assert_int_eq(r.prompts[1].ids[0], 3);
    srv_oai_req_free(&r);

    /* a long prompt leaves less than 16 tokens: the default shrinks to fit */
    char body[4096];
    int k = snprintf(body, sizeof body, "{\"prompt\":[");
    for (int i = 0; i < 250; i++) k += snprintf(body + k, sizeof body - (size_t)k, "%s7", i ? "," : "");
    snprintf(body + k, sizeof body - (size_t)k, "]}");
    ck_assert_int_eq(parse(SRV_OAI_COMPLETION, body, &r, &e), 0);
    ck_assert_int_eq(r.max_tokens, 6);
    srv_oai_req_free(&r);
}
END_TEST

typedef struct {
    srv_oai_kind kind;
    const char *body;
    int http;
    const char *param; /* "" = null */
} bad_case;

#define MSG "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]"
#define C SRV_OAI_CHAT
#define P SRV_OAI_COMPLETION

static const bad_case bad_cases[] = {
    {C, "", 400, ""},
    {C, "{", 400, ""},
    {C, "{\"messages\": [", 400, ""},
    {C, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]} x", 400, ""},
    {C, "[1,2]", 400, ""},
    {C, "null", 400, ""},
    {C, "{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}", 400, ""},
    {C, "{\"messages\":[{\"role\":\"user\",\"content\":\"\xc3\"}]}", 400, ""},
    {C, "{\"a\":[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]," MSG "}", 400, ""},
    {C, "{\"parse_special\":\"yes\"," MSG "}", 400, "parse_special"},
    {P, "{\"parse_special\":1,\"prompt\":\"hi\"}", 400, "parse_special"},
    {C, "{}", 400, "messages"},
    {C, "{\"messages\":null}", 400, "messages"},
    {C, "{\"messages\":[]}", 400, "messages"},
    {C, "{\"messages\":\"hi\"}", 400, "messages"},
    {C, "{\"messages\":[{}]}", 400, "messages[0].role"},
    {C, "{\"messages\":[1]}", 400, "messages[0]"},
    {C, "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}", 400, "messages[0].role"},
    {C, "{\"messages\":[{\"role\":\"user\"}]}", 400, "messages[0].content"},
    {C, "{\"messages\":[{\"role\":\"user\",\"content\":5}]}", 400, "messages[0].content"},
    {C, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}", 400, "messages[0].content[0]"},
    {C, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":3}]}]}", 400, "messages[0].content[0]"},
    {C, "{\"model\":5," MSG "}", 400, "model"},
    {C, "{\"model\":\"gpt-4\"," MSG "}", 404, "model"},
    {C, "{\"stream\":\"yes\"," MSG "}", 400, "stream"},
    {C, "{\"stream_options\":{\"include_usage\":1}," MSG "}", 400, "stream_options.include_usage"},
    {C, "{\"n\":0," MSG "}", 400, "n"},
    {C, "{\"n\":-1," MSG "}", 400, "n"},
    {C, "{\"n\":1e9," MSG "}", 400, "n"},
    {C, "{\"n\":1.5," MSG "}", 400, "n"},
    {C, "{\"max_tokens\":0," MSG "}", 400, "max_tokens"},
    {C, "{\"max_tokens\":-1," MSG "}", 400, "max_tokens"},
    {C, "{\"max_tokens\":2147483648," MSG "}", 400, "max_tokens"},
    {C, "{\"max_tokens\":\"10\"," MSG "}", 400, "max_tokens"},
    {C, "{\"max_tokens\":250," MSG "}", 400, "max_tokens"},
    {C, "{\"max_completion_tokens\":0," MSG "}", 400, "max_completion_tokens"},
    {C, "{\"temperature\":-0.1," MSG "}", 400, "temperature"},
    {C, "{\"temperature\":2.5," MSG "}", 400, "temperature"},
    {C, "{\"temperature\":\"hot\"," MSG "}", 400, "temperature"},
    {C, "{\"top_p\":1.5," MSG "}", 400, "top_p"},
    {C, "{\"top_p\":-1," MSG "}", 400, "top_p"},
    {C, "{\"top_k\":-2," MSG "}", 400, "top_k"},
    {C, "{\"top_k\":1000000," MSG "}", 400, "top_k"},
    {C, "{\"min_p\":2," MSG "}", 400, "min_p"},
    {C, "{\"presence_penalty\":3," MSG "}", 400, "presence_penalty"},
    {C, "{\"frequency_penalty\":-3," MSG "}", 400, "frequency_penalty"},
    {C, "{\"repetition_penalty\":0," MSG "}", 400, "repetition_penalty"},
    {C, "{\"seed\":\"x\"," MSG "}", 400, "seed"},
    {C, "{\"seed\":1.5," MSG "}", 400, "seed"},
    {C, "{\"logit_bias\":[1]," MSG "}", 400, "logit_bias"},
    {C, "{\"logit_bias\":{\"-1\":1}," MSG "}", 400, "logit_bias"},
    {C, "{\"logit_bias\":{\"999999\":1}," MSG "}", 400, "logit_bias"},
    {C, "{\"logit_bias\":{\"abc\":1}," MSG "}", 400, "logit_bias"},
    {C, "{\"logit_bias\":{\"5\":500}," MSG "}", 400, "logit_bias"},
    {C, "{\"logit_bias\":{\"5\":\"x\"}," MSG "}", 400, "logit_bias"},
    {C, "{\"stop\":5," MSG "}", 400, "stop"},
    {C, "{\"stop\":[1]," MSG "}", 400, "stop"},
    {C, "{\"stop\":[\"\"]," MSG "}", 400, "stop"},
    {C, "{\"logprobs\":1," MSG "}", 400, "logprobs"},
    {C, "{\"top_logprobs\":3," MSG "}", 400, "top_logprobs"},
    {C, "{\"logprobs\":true,\"top_logprobs\":21," MSG "}", 400, "top_logprobs"},
    {C, "{\"ignore_eos\":\"no\"," MSG "}", 400, "ignore_eos"},
    {C, "{\"user\":1," MSG "}", 400, "user"},
    {C, "{\"tools\":[{\"type\":\"function\"}]," MSG "}", 400, "tools"},
    /* NUL would cut the C string cJSON hands out: "gpt\0x" would read as "gpt" */
    {C, "{\"model\":\"m\\u0000x\"," MSG "}", 400, "model"},
    {C, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"user\\u0000\",\"content\":\"x\"}]}", 400, "messages[1].role"},
    {C, "{\"messages\":[{\"role\":\"user\",\"name\":\"a\\u0000\",\"content\":\"hi\"}]}", 400, "messages[0].name"},
    {C, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\\u0000b\"}]}]}", 400, "messages[0].content[0].text"},
    {C, "{\"stop\":[\"a\",\"b\",\"\\u0000\"]," MSG "}", 400, "stop[2]"},
    {C, "{\"user\":\"u\\u0000\"," MSG "}", 400, "user"},
    {C, "{\"mo\\u0000del\":\"x\"," MSG "}", 400, "mo\\u0000del"},
    {C, "{\"logit_bias\":{\"5\\u0000\":1}," MSG "}", 400, "logit_bias.5\\u0000"},
    {P, "{\"prompt\":[\"ok\",\"x\\u0000\"]}", 400, "prompt[1]"},
    {P, "{}", 400, "prompt"},
    {P, "{\"prompt\":5}", 400, "prompt"},
    {P, "{\"prompt\":[]}", 400, "prompt"},
    {P, "{\"prompt\":[-1]}", 400, "prompt"},
    {P, "{\"prompt\":[1,2,999999]}", 400, "prompt"},
    {P, "{\"prompt\":[1.5]}", 400, "prompt"},
    {P, "{\"prompt\":[[1],[-1]]}", 400, "prompt[1]"},
    {P, "{\"prompt\":[\"a\",5]}", 400, "prompt[1]"},
    {P, "{\"prompt\":[[]]}", 400, "prompt[0]"},
    {P, "{\"prompt\":\"x\",\"logprobs\":true}", 400, "logprobs"},
    {P, "{\"prompt\":\"x\",\"logprobs\":21}", 400, "logprobs"},
    {P, "{\"prompt\":\"x\",\"echo\":1}", 400, "echo"},
    {P, "{\"prompt\":\"x\",\"best_of\":3}", 400, "best_of"},
};

static size_t count_id(const srv_oai_req *r, int32_t id) {
    size_t k = 0;
    for (int64_t i = 0; i < r->prompts[0].n; i++) k += r->prompts[0].ids[i] == id;
    return k;
}

/* Chat content is plain text unless the server (chat_parse_special) or
 * the request (parse_special) opts in; completion prompts are parsed
 * unless the request says not. The fixture has no template: the ChatML
 * fallback writes neither BOS nor EOS, so any in a chat prompt is forged. */
START_TEST(test_parse_special) {
    int32_t bos = moe_tok_bos(tok), eos = moe_tok_eos(tok);
    size_t bl, el;
    const char *bt = moe_tok_text(tok, bos, &bl), *et = moe_tok_text(tok, eos, &el);
    ck_assert_int_eq(moe_tok_type(tok, eos), MOE_TOKTYPE_CONTROL);
    char content[256], body[512];
    snprintf(content, sizeof content, "a%.*sb%.*s", (int)el, et, (int)bl, bt);
    static const struct {
        srv_oai_kind kind;
        bool server; /* lim.chat_parse_special */
        const char *field;
        size_t n_eos, n_bos;
    } cases[] = {
        {SRV_OAI_CHAT, false, "", 0, 0},
        {SRV_OAI_CHAT, false, "\"parse_special\":false,", 0, 0},
        {SRV_OAI_CHAT, false, "\"parse_special\":true,", 1, 1},
        {SRV_OAI_CHAT, true, "", 1, 1},
        {SRV_OAI_CHAT, true, "\"parse_special\":false,", 0, 0},
        {SRV_OAI_COMPLETION, false, "", 1, 2},
        {SRV_OAI_COMPLETION, true, "\"parse_special\":false,", 0, 1},
    };
    ck_assert(moe_tok_add_bos_default(tok)); /* completions get BOS too */
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        if (cases[i].kind == SRV_OAI_CHAT)
            snprintf(body, sizeof body, "{%s\"messages\":[{\"role\":\"user\",\"content\":\"%s\"}]}", cases[i].field,
                     content);
        else
            snprintf(body, sizeof body, "{%s\"prompt\":\"%s\"}", cases[i].field, content);
        lim.chat_parse_special = cases[i].server;
        srv_oai_req r;
        srv_oai_err e;
        ck_assert_msg(parse(cases[i].kind, body, &r, &e) == 0, "%s", e.message);
        ck_assert_msg(count_id(&r, eos) == cases[i].n_eos && count_id(&r, bos) == cases[i].n_bos,
                      "case %zu: %zu EOS, %zu BOS", i, count_id(&r, eos), count_id(&r, bos));
        /* either way the prompt spells the text it came from */
        char *back;
        ck_assert_int_eq(moe_tok_decode(tok, r.prompts[0].ids, (size_t)r.prompts[0].n, true, &back, NULL), 0);
        char want[512];
        snprintf(want, sizeof want, "%.*s%s", (int)bl, bt, content); /* completions: BOS + prompt */
        ck_assert_str_eq(back, cases[i].kind == SRV_OAI_CHAT ? r.prompts[0].text : want);
        free(back);
        srv_oai_req_free(&r);
    }
}
END_TEST

START_TEST(test_bad_inputs) {
    const bad_case *bc = &bad_cases[_i];
    srv_oai_req r;
    srv_oai_err e;
    memset(&e, 0, sizeof e);
    int st = parse(bc->kind, bc->body, &r, &e);
    ck_assert_msg(st < 0, "case %d accepted: %s", _i, bc->body);
    ck_assert_msg(e.http == bc->http, "case %d: http %d != %d (%s)", _i, e.http, bc->http, e.message);
    ck_assert_msg(!strcmp(e.param, bc->param), "case %d: param '%s' != '%s' (%s)", _i, e.param, bc->param, e.message);
    ck_assert(e.message[0]);
    /* nothing is left allocated in r */
    ck_assert_ptr_null(r.prompts);
    ck_assert_ptr_null(r.stop);
    /* the error body is OpenAI-shaped */
    char *j = srv_oai_err_json(&e);
    cJSON *o = cJSON_Parse(j);
    ck_assert_ptr_nonnull(o);
    cJSON *eo = cJSON_GetObjectItem(o, "error");
    ck_assert(cJSON_IsString(cJSON_GetObjectItem(eo, "message")));
    ck_assert_str_eq(cJSON_GetObjectItem(eo, "type")->valuestring,
                     bc->http == 400 || bc->http == 404 ? "invalid_request_error" : "?");
    cJSON *param = cJSON_GetObjectItem(eo, "param");
    if (bc->param[0]) ck_assert_str_eq(param->valuestring, bc->param);
    else ck_assert(cJSON_IsNull(param));
    ck_assert_ptr_nonnull(cJSON_GetObjectItem(eo, "code"));
    cJSON_Delete(o);
    free(j);
}
END_TEST

/* Only a real NUL is refused: an escaped backslash followed by "u0000" is
 * six ordinary characters, and a raw 0 byte is caught like the escape. */
START_TEST(test_nul_strings) {
    srv_oai_req r;
    srv_oai_err e;
    const char *ok = "{\"messages\":[{\"role\":\"user\",\"content\":\"a\\\\u0000b\"}]}";
    ck_assert_int_eq(parse(C, ok, &r, &e), 0);
    srv_oai_req_free(&r);
    static const char raw[] = "{\"model\":\"ab\0c\"," MSG "}";
    ck_assert_int_eq(srv_oai_parse(C, raw, sizeof raw - 1, &lim, &r, &e), MOE_EINVAL);
    ck_assert_int_eq(e.http, 400);
    ck_assert_str_eq(e.param, "model");
    /* the precheck alone (what /tokenize uses) names the field too */
    const char *tk = "{\"content\":\"x\",\"extra\":[1,{\"k\":[\"a\",\"\\u0000\"]}]}";
    ck_assert_int_eq(srv_oai_precheck(tk, strlen(tk), 16, &e), MOE_EINVAL);
    ck_assert_str_eq(e.param, "extra[1].k[1]");
    ck_assert(strstr(e.message, "NUL"));
}
END_TEST

START_TEST(test_many_stops_and_deep) {
    /* 10k stop strings */
    size_t cap = 10000 * 6 + 200;
    char *body = malloc(cap);
    size_t k = (size_t)snprintf(body, cap, "{" MSG ",\"stop\":[");
    for (int i = 0; i < 10000; i++) k += (size_t)snprintf(body + k, cap - k, "%s\"s%d\"", i ? "," : "", i % 100);
    snprintf(body + k, cap - k, "]}");
    srv_oai_req r;
    srv_oai_err e;
    ck_assert_int_lt(parse(C, body, &r, &e), 0);
    ck_assert_str_eq(e.param, "stop");
    free(body);
    /* 100k-deep nesting is refused before cJSON recurses */
    size_t n = 100000;
    body = malloc(2 * n + 1);
    memset(body, '[', n);
    memset(body + n, ']', n);
    body[2 * n] = 0;
    ck_assert_int_lt(parse(C, body, &r, &e), 0);
    ck_assert_int_eq(e.http, 400);
    ck_assert(strstr(e.message, "nesting"));
    free(body);
    /* a string holding brackets is not nesting */
    ck_assert_int_eq(parse(C, "{\"messages\":[{\"role\":\"user\",\"content\":\"[[[[[[[[[[[[[[[[[[[[[[[[\\\"[[[\"}]}", &r, &e),
                     0);
    srv_oai_req_free(&r);
}
END_TEST

START_TEST(test_utf8_clean) {
    char *s = moe_utf8_clean("a\xffz\xe2\x82", 5);
    ck_assert_str_eq(s, "a\xEF\xBF\xBDz\xEF\xBF\xBD");
    free(s);
    s = moe_utf8_clean("h\xc3\xa9", 3);
    ck_assert_str_eq(s, "h\xc3\xa9");
    free(s);
}
END_TEST

static cJSON *get(cJSON *o, const char *path) {
    char buf[128];
    snprintf(buf, sizeof buf, "%s", path);
    char *save = NULL;
    for (char *t = strtok_r(buf, ".", &save); t && o; t = strtok_r(NULL, ".", &save)) {
        if (*t >= '0' && *t <= '9') o = cJSON_GetArrayItem(o, atoi(t));
        else o = cJSON_GetObjectItemCaseSensitive(o, t);
    }
    return o;
}

START_TEST(test_render_chat) {
    srv_oai_ctx c = {.kind = SRV_OAI_CHAT, .id = "chatcmpl-1", .created = 1700000000, .model = "tiny", .tok = tok, .logprobs = true};
    srv_oai_choice ch[2];
    memset(ch, 0, sizeof ch);
    ck_assert_int_eq(srv_oai_choice_append(&ch[0], "Hel", 3), 0);
    ck_assert_int_eq(srv_oai_choice_append(&ch[0], "lo", 2), 0);
    srv_oai_lp lp = {.id = 70, .logprob = -0.25f, .n_top = 2, .top = {{70, -0.25f}, {71, -2.0f}}};
    ck_assert_int_eq(srv_oai_choice_add_lp(&ch[0], &lp), 0);
    ch[0].finish = MOE_FINISH_STOP;
    ch[1].finish = MOE_FINISH_LENGTH;
    char *s = srv_oai_render_response(&c, ch, 2, 10, 5);
    cJSON *o = cJSON_Parse(s);
    ck_assert_ptr_nonnull(o);
    ck_assert_str_eq(get(o, "object")->valuestring, "chat.completion");
    ck_assert_str_eq(get(o, "id")->valuestring, "chatcmpl-1");
    ck_assert_int_eq(get(o, "created")->valuedouble, 1700000000);
    ck_assert_str_eq(get(o, "choices.0.message.role")->valuestring, "assistant");
    ck_assert_str_eq(get(o, "choices.0.message.content")->valuestring, "Hello");
    ck_assert_str_eq(get(o, "choices.0.finish_reason")->valuestring, "stop");
    ck_assert_str_eq(get(o, "choices.1.finish_reason")->valuestring, "length");
    ck_assert_str_eq(get(o, "choices.1.message.content")->valuestring, "");
    ck_assert_int_eq(get(o, "choices.1.index")->valueint, 1);
    size_t pl;
    const char *piece = moe_tok_piece(tok, 70, &pl);
    char *clean = moe_utf8_clean(piece, pl);
    ck_assert_str_eq(get(o, "choices.0.logprobs.content.0.token")->valuestring, clean);
    ck_assert_int_eq(cJSON_GetArraySize(get(o, "choices.0.logprobs.content.0.bytes")), (int)pl);
    ck_assert_double_eq_tol(get(o, "choices.0.logprobs.content.0.logprob")->valuedouble, -0.25, 1e-6);
    ck_assert_double_eq_tol(get(o, "choices.0.logprobs.content.0.top_logprobs.1.logprob")->valuedouble, -2.0, 1e-6);
    ck_assert_int_eq(get(o, "usage.prompt_tokens")->valueint, 10);
    ck_assert_int_eq(get(o, "usage.completion_tokens")->valueint, 5);
    ck_assert_int_eq(get(o, "usage.total_tokens")->valueint, 15);
    free(clean);
    cJSON_Delete(o);
    free(s);

    /* first chunk: role + empty content; later chunks: content only; finish chunk */
    s = srv_oai_render_chunk(&c, 1, true, "", 0, NULL, 0, MOE_FINISH_NONE);
    o = cJSON_Parse(s);
    ck_assert_str_eq(get(o, "object")->valuestring, "chat.completion.chunk");
    ck_assert_str_eq(get(o, "choices.0.delta.role")->valuestring, "assistant");
    ck_assert_str_eq(get(o, "choices.0.delta.content")->valuestring, "");
    ck_assert_int_eq(get(o, "choices.0.index")->valueint, 1);
    ck_assert(cJSON_IsNull(get(o, "choices.0.finish_reason")));
    cJSON_Delete(o);
    free(s);
    s = srv_oai_render_chunk(&c, 0, false, "x\xff", 2, &lp, 1, MOE_FINISH_LENGTH);
    o = cJSON_Parse(s);
    ck_assert_ptr_null(get(o, "choices.0.delta.role"));
    ck_assert_str_eq(get(o, "choices.0.delta.content")->valuestring, "x\xEF\xBF\xBD");
    ck_assert_str_eq(get(o, "choices.0.finish_reason")->valuestring, "length");
    ck_assert_double_eq_tol(get(o, "choices.0.logprobs.content.0.logprob")->valuedouble, -0.25, 1e-6);
    cJSON_Delete(o);
    free(s);
    s = srv_oai_render_usage_chunk(&c, 3, 4);
    o = cJSON_Parse(s);
    ck_assert_int_eq(cJSON_GetArraySize(get(o, "choices")), 0);
    ck_assert_int_eq(get(o, "usage.total_tokens")->valueint, 7);
    /* the energy / cost extensions only when set */
    ck_assert_ptr_null(get(o, "usage.energy_joules"));
    ck_assert_ptr_null(get(o, "usage.cost_usd"));
    cJSON_Delete(o);
    free(s);
    c.has_energy = true;
    c.energy_joules = 1.5;
    s = srv_oai_render_usage_chunk(&c, 3, 4);
    o = cJSON_Parse(s);
    ck_assert_double_eq(get(o, "usage.energy_joules")->valuedouble, 1.5);
    ck_assert_ptr_null(get(o, "usage.cost_usd"));
    cJSON_Delete(o);
    free(s);
    c.has_cost = true;
    c.cost_usd = 2.5e-7;
    s = srv_oai_render_response(&c, ch, 2, 3, 4);
    o = cJSON_Parse(s);
    ck_assert_double_eq(get(o, "usage.energy_joules")->valuedouble, 1.5);
    ck_assert_double_eq(get(o, "usage.cost_usd")->valuedouble, 2.5e-7);
    cJSON_Delete(o);
    free(s);
    srv_oai_choice_free(&ch[0]);
    srv_oai_choice_free(&ch[1]);
}
END_TEST

START_TEST(test_render_completion) {
    srv_oai_ctx c = {.kind = SRV_OAI_COMPLETION, .id = "cmpl-1", .created = 1, .model = "tiny", .tok = tok, .logprobs = true};
    srv_oai_choice ch;
    memset(&ch, 0, sizeof ch);
    srv_oai_choice_append(&ch, "ab", 2);
    srv_oai_lp a = {.id = 70, .logprob = -1, .n_top = 1, .top = {{70, -1}}, .text_offset = 0};
    srv_oai_lp b = {.id = 71, .logprob = -2, .n_top = 0, .text_offset = 1};
    srv_oai_choice_add_lp(&ch, &a);
    srv_oai_choice_add_lp(&ch, &b);
    ch.finish = MOE_FINISH_LENGTH;
    char *s = srv_oai_render_response(&c, &ch, 1, 2, 2);
    cJSON *o = cJSON_Parse(s);
    ck_assert_str_eq(get(o, "object")->valuestring, "text_completion");
    ck_assert_str_eq(get(o, "choices.0.text")->valuestring, "ab");
    ck_assert_int_eq(cJSON_GetArraySize(get(o, "choices.0.logprobs.tokens")), 2);
    ck_assert_double_eq(get(o, "choices.0.logprobs.token_logprobs.1")->valuedouble, -2);
    ck_assert_int_eq(get(o, "choices.0.logprobs.text_offset.1")->valueint, 1);
    ck_assert_int_eq(cJSON_GetArraySize(get(o, "choices.0.logprobs.top_logprobs.0")), 1);
    ck_assert_str_eq(get(o, "choices.0.finish_reason")->valuestring, "length");
    cJSON_Delete(o);
    free(s);
    c.logprobs = false;
    s = srv_oai_render_chunk(&c, 2, false, "z", 1, NULL, 0, MOE_FINISH_NONE);
    o = cJSON_Parse(s);
    ck_assert_str_eq(get(o, "object")->valuestring, "text_completion");
    ck_assert_str_eq(get(o, "choices.0.text")->valuestring, "z");
    ck_assert(cJSON_IsNull(get(o, "choices.0.logprobs")));
    cJSON_Delete(o);
    free(s);
    srv_oai_choice_free(&ch);
}
END_TEST

static Suite *openai_suite(void) {
    Suite *s = suite_create("openai");
    TCase *tc = tcase_create("parse");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_chat_prompt);
    tcase_add_test(tc, test_chat_fields);
    tcase_add_test(tc, test_completion_prompts);
    tcase_add_test(tc, test_parse_special);
    suite_add_tcase(s, tc);
    tc = tcase_create("validate");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_loop_test(tc, test_bad_inputs, 0, (int)(sizeof bad_cases / sizeof bad_cases[0]));
    tcase_add_test(tc, test_many_stops_and_deep);
    tcase_add_test(tc, test_nul_strings);
    suite_add_tcase(s, tc);
    tc = tcase_create("render");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_utf8_clean);
    tcase_add_test(tc, test_render_chat);
    tcase_add_test(tc, test_render_completion);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(openai_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
