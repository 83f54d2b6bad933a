/* check_chat_template.c - rendered prompts must equal, byte for byte, what
 * transformers' apply_chat_template printed for the real templates
 * (tests/fixtures/chat/cases.json, from tests/gen_tokenizer_fixtures.py). */
#include <check.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat_template.h"
#include "gguf.h"
#include "tokenizer.h"

#ifndef MOE_SRC_DIR
#define MOE_SRC_DIR "."
#endif
#define FIX MOE_SRC_DIR "/tests/fixtures/"

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f, "%s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    ck_assert_uint_eq(fread(b, 1, (size_t)n, f), (size_t)n);
    b[n] = 0;
    fclose(f);
    if (len) *len = (size_t)n;
    return b;
}

static moe_chat_family expected_family(const char *tname) {
    if (!strcmp(tname, "deepseek2")) return MOE_CHAT_DEEPSEEK2;
    if (!strcmp(tname, "deepseek3")) return MOE_CHAT_DEEPSEEK3;
    if (!strcmp(tname, "deepseek-r1")) return MOE_CHAT_DEEPSEEK3;
    if (!strcmp(tname, "llama3")) return MOE_CHAT_LLAMA3;
    if (!strcmp(tname, "mixtral")) return MOE_CHAT_MISTRAL;
    return MOE_CHAT_CHATML;
}

START_TEST(test_transformers_cases) {
    char *js = slurp(FIX "chat/cases.json", NULL);
    cJSON *root = cJSON_Parse(js);
    ck_assert_ptr_nonnull(root);
    int n_cases = 0;
    cJSON *c;
    cJSON_ArrayForEach(c, root) {
        const char *tname = cJSON_GetObjectItem(c, "template")->valuestring;
        char path[1024];
        snprintf(path, sizeof path, FIX "chat/%s.jinja", tname);
        size_t tl;
        char *tmpl = slurp(path, &tl);
        moe_chat_template ct;
        ck_assert_int_eq(moe_chat_template_init(&ct, tmpl, tl, MOE_CHAT_AUTO,
                                                cJSON_GetObjectItem(c, "bos")->valuestring,
                                                cJSON_GetObjectItem(c, "eos")->valuestring),
                         0);
        ck_assert_msg(ct.family == expected_family(tname), "%s detected as %s", tname,
                      moe_chat_family_name(ct.family));
        cJSON *msgs = cJSON_GetObjectItem(c, "messages");
        size_t n = (size_t)cJSON_GetArraySize(msgs);
        moe_chat_msg m[16];
        for (size_t i = 0; i < n; i++) {
            cJSON *x = cJSON_GetArrayItem(msgs, (int)i);
            m[i] = (moe_chat_msg){.role = cJSON_GetObjectItem(x, "role")->valuestring,
                                  .content = cJSON_GetObjectItem(x, "content")->valuestring};
            m[i].content_len = strlen(m[i].content);
        }
        bool gen = cJSON_IsTrue(cJSON_GetObjectItem(c, "add_generation_prompt"));
        char *out;
        size_t ol;
        ck_assert_int_eq(moe_chat_render(&ct, m, n, gen, &out, &ol), 0);
        const char *want = cJSON_GetObjectItem(c, "expected")->valuestring;
        ck_assert_msg(strcmp(out, want) == 0 && ol == strlen(want), "%s/%s gen=%d:\n got  [%s]\n want [%s]", tname,
                      cJSON_GetObjectItem(c, "conversation")->valuestring, gen, out, want);
        free(out);
        /* the same content as one-element text-part arrays renders the same */
        moe_chat_part parts[16];
        for (size_t i = 0; i < n; i++) {
            parts[i] = (moe_chat_part){m[i].content, m[i].content_len};
            m[i].parts = &parts[i];
            m[i].n_parts = 1;
            m[i].content = NULL;
        }
        ck_assert_int_eq(moe_chat_render(&ct, m, n, gen, &out, &ol), 0);
        ck_assert_str_eq(out, want);
        free(out);
        moe_chat_template_free(&ct);
        free(tmpl);
        n_cases++;
    }
    ck_assert_int_ge(n_cases, 50);
    cJSON_Delete(root);
    free(js);
}
END_TEST

/* The templates inside the real tokenizer GGUFs are recognised. */
START_TEST(test_detect_gguf) {
    static const struct {
        const char *name;
        moe_chat_family f;
    } want[] = {{"deepseek2", MOE_CHAT_DEEPSEEK2},
                {"deepseek3", MOE_CHAT_DEEPSEEK3},
                {"qwen2", MOE_CHAT_CHATML},
                {"llama3", MOE_CHAT_LLAMA3},
                {"mistral", MOE_CHAT_MISTRAL}};
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        char path[1024], err[256];
        int st;
        snprintf(path, sizeof path, FIX "tokenizer/%s.gguf", want[i].name);
        moe_gguf *g = moe_gguf_open(path, &st, err, sizeof err);
        ck_assert_msg(g, "%s", err);
        moe_gguf_str s;
        ck_assert_int_eq(moe_gguf_get_str(g, "tokenizer.chat_template", &s), 0);
        ck_assert_int_eq(moe_chat_detect(s.ptr, (size_t)s.len), want[i].f);
        moe_tok *t = moe_tok_load(g, &st, err, sizeof err);
        ck_assert_msg(t, "%s", err);
        moe_chat_template ct;
        ck_assert_int_eq(moe_chat_template_from_model(&ct, g, t, MOE_CHAT_AUTO), 0);
        ck_assert_int_eq(ct.family, want[i].f);
        /* a rendered prompt tokenizes with the template's markers as single control tokens */
        moe_chat_msg m = {.role = "user", .content = "hi", .content_len = 2};
        char *out;
        ck_assert_int_eq(moe_chat_render(&ct, &m, 1, true, &out, NULL), 0);
        int32_t *ids;
        size_t n;
        ck_assert_int_eq(moe_tok_encode(t, out, strlen(out), true, false, &ids, &n), 0);
        ck_assert_uint_le(n, 12);
        if (moe_tok_bos(t) >= 0 && want[i].f != MOE_CHAT_CHATML) ck_assert_int_eq(ids[0], moe_tok_bos(t));
        if (want[i].f == MOE_CHAT_MISTRAL) {
            /* sentencepiece's ids for "<s>" + "[INST] hi [/INST]" (the
             * text after <s> gets its own dummy prefix; tokenizer fixture) */
            static const int32_t mixtral[] = {1, 733, 16289, 28793, 12014, 733, 28748, 16289, 28793};
            ck_assert_str_eq(out, "<s>[INST] hi [/INST]");
            ck_assert_uint_eq(n, sizeof mixtral / sizeof *mixtral);
            ck_assert_mem_eq(ids, mixtral, sizeof mixtral);
        } else {
            char *back;
            ck_assert_int_eq(moe_tok_decode(t, ids, n, true, &back, NULL), 0);
            ck_assert_str_eq(back, out);
            free(back);
        }
        free(ids);
        free(out);
        moe_chat_template_free(&ct);
        moe_tok_free(t);
        moe_gguf_close(g);
    }
    ck_assert_int_eq(moe_chat_detect("{{ messages }}", 14), MOE_CHAT_AUTO);
    ck_assert_int_eq(moe_chat_detect(NULL, 0), MOE_CHAT_AUTO);
}
END_TEST

/* Mistral prompts: rendered by moed, tokenized by moed, must be the ids
 * Mistral's own encoder (mistral-common) produces, for the real v1
 * (Mixtral-8x7B) and v3 (Mixtral-8x22B) tokenizers. */
START_TEST(test_mistral_common_ids) {
    char *js = slurp(FIX "chat/mistral_common.json", NULL);
    cJSON *root = cJSON_Parse(js);
    ck_assert_ptr_nonnull(root);
    int n_cases = 0;
    cJSON *c;
    cJSON_ArrayForEach(c, root) {
        const char *ver = cJSON_GetObjectItem(c, "version")->valuestring;
        char path[1024], err[256];
        int st;
        snprintf(path, sizeof path, FIX "tokenizer/%s.gguf", cJSON_GetObjectItem(c, "gguf")->valuestring);
        moe_gguf *g = moe_gguf_open(path, &st, err, sizeof err);
        ck_assert_msg(g, "%s", err);
        moe_tok *t = moe_tok_load(g, &st, err, sizeof err);
        ck_assert_msg(t, "%s", err);
        moe_chat_template ct;
        /* v1's GGUF carries the Mixtral template; v3's has none, so force
         * the Mistral family and let the vocabulary pick the v3 variant */
        bool v3 = strcmp(ver, "v3") == 0;
        ck_assert_int_eq(moe_chat_template_from_model(&ct, g, t, v3 ? MOE_CHAT_MISTRAL : MOE_CHAT_AUTO), 0);
        ck_assert_int_eq(ct.family, v3 ? MOE_CHAT_MISTRAL_V3 : MOE_CHAT_MISTRAL);
        cJSON *msgs = cJSON_GetObjectItem(c, "messages");
        size_t n = (size_t)cJSON_GetArraySize(msgs);
        moe_chat_msg m[16];
        for (size_t i = 0; i < n; i++) {
            cJSON *x = cJSON_GetArrayItem(msgs, (int)i);
            m[i] = (moe_chat_msg){.role = cJSON_GetObjectItem(x, "role")->valuestring,
                                  .content = cJSON_GetObjectItem(x, "content")->valuestring};
            m[i].content_len = strlen(m[i].content);
        }
        char *out;
        ck_assert_int_eq(moe_chat_render(&ct, m, n, true, &out, NULL), 0);
        int32_t *ids;
        size_t nid;
        ck_assert_int_eq(moe_tok_encode(t, out, strlen(out), true, false, &ids, &nid), 0);
        cJSON *want = cJSON_GetObjectItem(c, "ids");
        bool same = nid == (size_t)cJSON_GetArraySize(want);
        for (size_t i = 0; same && i < nid; i++) same = ids[i] == cJSON_GetArrayItem(want, (int)i)->valueint;
        ck_assert_msg(same, "%s/%s: prompt [%s] gives other ids than mistral-common", ver,
                      cJSON_GetObjectItem(c, "conversation")->valuestring, out);
        free(ids);
        free(out);
        moe_chat_template_free(&ct);
        moe_tok_free(t);
        moe_gguf_close(g);
        n_cases++;
    }
    ck_assert_int_ge(n_cases, 8);
    cJSON_Delete(root);
    free(js);
}
END_TEST

START_TEST(test_fallback_and_force) {
    moe_chat_template ct;
    ck_assert_int_eq(moe_chat_template_init(&ct, "{{ weird }}", 11, MOE_CHAT_AUTO, "<s>", "</s>"), 0);
    ck_assert_int_eq(ct.family, MOE_CHAT_CHATML);
    ck_assert_ptr_null(ct.default_system);
    moe_chat_msg m[] = {{.role = "system", .content = "S", .content_len = 1},
                        {.role = "user", .content = "U", .content_len = 1}};
    char *out;
    ck_assert_int_eq(moe_chat_render(&ct, m, 2, true, &out, NULL), 0);
    ck_assert_str_eq(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n");
    free(out);
    moe_chat_template_free(&ct);
    /* forced family wins over the template text */
    ck_assert_int_eq(moe_chat_template_init(&ct, "<|im_start|>", 12, MOE_CHAT_MISTRAL, "<s>", "</s>"), 0);
    ck_assert_int_eq(moe_chat_render(&ct, m, 2, true, &out, NULL), 0);
    ck_assert_str_eq(out, "<s>[INST] S\n\nU [/INST]"); /* system folded into the first user turn */
    free(out);
    moe_chat_template_free(&ct);
    /* multi-part content joins with newlines */
    ck_assert_int_eq(moe_chat_template_init(&ct, NULL, 0, MOE_CHAT_DEEPSEEK3, "<B>", "<E>"), 0);
    moe_chat_part parts[] = {{"a", 1}, {"b", 1}};
    moe_chat_msg mm[] = {{.role = "user", .parts = parts, .n_parts = 2},
                         {.role = "assistant", .content = "<think>x</think>y", .content_len = 17},
                         {.role = "tool", .content = "T1", .content_len = 2},
                         {.role = "tool", .content = "T2", .content_len = 2}};
    ck_assert_int_eq(moe_chat_render(&ct, mm, 4, true, &out, NULL), 0);
    ck_assert_str_eq(out, "<B><｜User｜>a\nb<｜Assistant｜>y<｜end▁of▁sentence｜><｜tool▁outputs▁begin｜>"
                          "<｜tool▁output▁begin｜>T1<｜tool▁output▁end｜><｜tool▁output▁begin｜>T2"
                          "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>");
    free(out);
    moe_chat_msg bad = {.role = NULL};
    ck_assert_int_eq(moe_chat_render(&ct, &bad, 1, false, &out, NULL), MOE_EINVAL);
    moe_chat_template_free(&ct);
    ck_assert_int_eq(moe_chat_family_parse("deepseek-v3"), MOE_CHAT_DEEPSEEK3);
    ck_assert_int_eq(moe_chat_family_parse("llama3"), MOE_CHAT_LLAMA3);
    ck_assert_int_eq(moe_chat_family_parse("nope"), -1);
    ck_assert_int_eq(moe_chat_family_parse("mistral-v3"), MOE_CHAT_MISTRAL_V3);
    ck_assert_str_eq(moe_chat_family_name(MOE_CHAT_MISTRAL_V3), "mistral-v3");
}
END_TEST

int main(void) {
    Suite *s = suite_create("chat_template");
    TCase *tc = tcase_create("transformers");
    tcase_add_test(tc, test_transformers_cases);
    tcase_add_test(tc, test_mistral_common_ids);
    suite_add_tcase(s, tc);
    tc = tcase_create("detect");
    tcase_add_test(tc, test_detect_gguf);
    tcase_add_test(tc, test_fallback_and_force);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_FORK);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? 1 : 0;
}
