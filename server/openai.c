/* openai.c - OpenAI request validation and response rendering (see openai.h). */
#include "openai.h"

#include <cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"
#include "utf8.h"

static void err_vset(srv_oai_err *e, int http, const char *param, const char *fmt, va_list ap) {
    e->http = http;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    e->code[0] = 0;
    vsnprintf(e->message, sizeof e->message, fmt, ap);
}

void srv_oai_err_set(srv_oai_err *e, int http, const char *param, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    err_vset(e, http, param, fmt, ap);
    va_end(ap);
}

int srv_oai_bad(srv_oai_err *e, const char *param, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    err_vset(e, 400, param, fmt, ap);
    va_end(ap);
    return MOE_EINVAL;
}


static const char *err_type(int http) {
    if (http == 401) return "authentication_error";
    if (http == 429) return "rate_limit_error";
    if (http >= 500) return "server_error";
    return "invalid_request_error";
}

char *srv_oai_err_json(const srv_oai_err *e) {
    cJSON *root = cJSON_CreateObject(), *o = cJSON_AddObjectToObject(root, "error");
    char *msg = moe_utf8_clean(e->message, strlen(e->message));
    char *out = NULL;
    if (!o || !msg) goto done;
    cJSON_AddStringToObject(o, "message", msg);
    cJSON_AddStringToObject(o, "type", err_type(e->http));
    if (e->param[0]) cJSON_AddStringToObject(o, "param", e->param);
    else cJSON_AddNullToObject(o, "param");
    if (e->code[0]) cJSON_AddStringToObject(o, "code", e->code);
    else cJSON_AddNullToObject(o, "code");
    out = cJSON_PrintUnformatted(root);
done:
    free(msg);
    cJSON_Delete(root);
    return out;
}

typedef struct json_frame {
    bool obj, want_key;
    size_t key_off, key_len; /* obj: the key whose value is being read (raw JSON text) */
    int64_t index;           /* array: the element being read */
} json_frame;

/* Offset just past the string that opens at b[start] ('"'), or len. */
static size_t string_end(const char *b, size_t len, size_t start) {
    for (size_t i = start + 1; i < len; i++) {
        if (b[i] == '\\') i++;
        else if (b[i] == '"') return i + 1;
    }
    return len;
}

static void path_add(char *out, size_t outsz, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void path_add(char *out, size_t outsz, const char *fmt, ...) {
    size_t n = strlen(out);
    if (n + 1 >= outsz) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out + n, outsz - n, fmt, ap);
    va_end(ap);
}

/* The path as OpenAI writes it ("messages[0].role") of the JSON string
 * holding byte `at`, written to out; false when `at` is in no string.
 * Only run on bodies whose nesting precheck has bounded by max_depth. */
static bool json_path_at(const char *b, size_t len, size_t at, int max_depth, char *out, size_t outsz) {
    out[0] = 0;
    json_frame *st = calloc((size_t)max_depth + 1, sizeof *st);
    if (!st) return false;
    int depth = 0;
    bool found = false;
    for (size_t i = 0; i < len && i <= at;) {
        char ch = b[i];
        json_frame *top = depth ? &st[depth - 1] : NULL;
        if (ch == '"') {
            size_t end = string_end(b, len, i);
            bool is_key = top && top->obj && top->want_key;
            if (at < end) {
                for (int d = 0; d < depth; d++) {
                    if (!st[d].obj) path_add(out, outsz, "[%lld]", (long long)st[d].index);
                    else if (d < depth - 1 || !is_key)
                        path_add(out, outsz, "%s%.*s", out[0] ? "." : "", (int)st[d].key_len, b + st[d].key_off);
                }
                if (is_key) path_add(out, outsz, "%s%.*s", out[0] ? "." : "", (int)(end - i - 2), b + i + 1);
                found = true;
                break;
            }
            if (is_key) {
                top->key_off = i + 1;
                top->key_len = end - i - 2;
            }
            i = end;
            continue;
        }
        if ((ch == '{' || ch == '[') && depth <= max_depth)
            st[depth++] = (json_frame){.obj = ch == '{', .want_key = ch == '{'};
        else if ((ch == '}' || ch == ']') && depth) depth--;
        else if (ch == ',' && top) {
            if (top->obj) top->want_key = true;
            else top->index++;
        } else if (ch == ':' && top) top->want_key = false;
        i++;
    }
    free(st);
    return found;
}

int srv_oai_precheck(const char *body, size_t len, int max_depth, srv_oai_err *err) {
    if (max_depth <= 0) max_depth = 64;
    const unsigned char *p = (const unsigned char *)body;
    size_t i = 0;
    int depth = 0;
    bool in_str = false;
    while (i < len) {
        unsigned char ch = p[i];
        if (ch >= 0x80) {
            int l = moe_utf8_next(p + i, len - i);
            if (l <= 0) {
                srv_oai_err_set(err, 400, NULL, "request body is not valid UTF-8 (byte offset %zu)", i);
                return MOE_EINVAL;
            }
            i += (size_t)l;
            continue;
        }
        /* cJSON keeps strings NUL-terminated, so a NUL (\u0000 or a raw
         * byte) would silently cut a model name, a role or a prompt short. */
        bool nul = ch == 0 || (in_str && ch == '\\' && i + 5 < len && p[i + 1] == 'u' && !memcmp(p + i + 2, "0000", 4));
        if (nul) {
            char path[sizeof err->param];
            if (json_path_at(body, len, i, max_depth, path, sizeof path))
                srv_oai_err_set(err, 400, path, "%s: strings must not contain NUL characters (\\u0000)", path);
            else srv_oai_err_set(err, 400, NULL, "request body contains a NUL byte (byte offset %zu)", i);
            return MOE_EINVAL;
        }
        if (in_str) {
            if (ch == '\\') i++;
            else if (ch == '"') in_str = false;
        } else if (ch == '"') in_str = true;
        else if (ch == '[' || ch == '{') {
            if (++depth > max_depth) {
                srv_oai_err_set(err, 400, NULL, "JSON nesting deeper than %d levels", max_depth);
                return MOE_EINVAL;
            }
        } else if (ch == ']' || ch == '}') depth--;
        i++;
    }
    return 0;
}

cJSON *srv_oai_parse_object(const char *body, size_t len, int max_depth, srv_oai_err *err, int *status) {
    if ((*status = srv_oai_precheck(body, len, max_depth, err))) return NULL;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(body, len, &end, false);
    bool trailing = false;
    for (const char *q = end; root && q && q < body + len; q++)
        if (*q != ' ' && *q != '\n' && *q != '\r' && *q != '\t') trailing = true;
    if (!root || trailing || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        *status = srv_oai_bad(err, NULL, "the request body must be one JSON object");
        return NULL;
    }
    return root;
}

/* --- parsing helpers: each returns 0 or fills err and returns MOE_EINVAL --- */

static bool is_null(const cJSON *v) { return !v || cJSON_IsNull(v); }

/* An integral JSON number in [lo, hi]. */
static int get_int(const cJSON *v, const char *name, int64_t lo, int64_t hi, int64_t *out, srv_oai_err *err) {
    if (!cJSON_IsNumber(v)) return srv_oai_bad(err, name, "'%s' must be an integer", name);
    double d = v->valuedouble;
    if (!isfinite(d) || d != floor(d)) return srv_oai_bad(err, name, "'%s' must be an integer", name);
    if (d < (double)lo || d > (double)hi)
        return srv_oai_bad(err, name, "'%s' must be between %lld and %lld (got %.17g)", name, (long long)lo, (long long)hi, d);
    *out = (int64_t)d;
    return 0;
}

static int get_num(const cJSON *v, const char *name, double lo, double hi, bool lo_open, double *out,
                   srv_oai_err *err) {
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) return srv_oai_bad(err, name, "'%s' must be a number", name);
    double d = v->valuedouble;
    if (d < lo || d > hi || (lo_open && d <= lo))
        return srv_oai_bad(err, name, "'%s' must be %s %g and <= %g (got %g)", name, lo_open ? ">" : ">=", lo, hi, d);
    *out = d;
    return 0;
}

static int get_bool(const cJSON *v, const char *name, bool *out, srv_oai_err *err) {
    if (!cJSON_IsBool(v)) return srv_oai_bad(err, name, "'%s' must be a boolean", name);
    *out = cJSON_IsTrue(v);
    return 0;
}

static int check_token(const cJSON *v, const char *param, int64_t n_vocab, int32_t *out, srv_oai_err *err) {
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble))
        return srv_oai_bad(err, param, "'%s' token ids must be integers", param);
    if (v->valuedouble < 0 || v->valuedouble >= (double)n_vocab)
        return srv_oai_bad(err, param, "'%s': token id %.17g is out of the vocabulary [0, %lld)", param, v->valuedouble,
                   (long long)n_vocab);
    *out = (int32_t)v->valuedouble;
    return 0;
}

/* prompt forms: "text" | ["a","b"] | [1,2,3] | [[1,2],[3]] */
static int is_token_array(const cJSON *a) {
    if (!cJSON_IsArray(a) || !a->child) return 0;
    for (const cJSON *x = a->child; x; x = x->next)
        if (!cJSON_IsNumber(x)) return 0;
    return 1;
}

static int tokens_from_array(const cJSON *a, const char *param, const srv_oai_limits *lim, srv_oai_prompt *p,
                             srv_oai_err *err) {
    int n = cJSON_GetArraySize(a);
    if (n <= 0) return srv_oai_bad(err, param, "'%s' must not be empty", param);
    p->ids = malloc((size_t)n * sizeof(int32_t));
    if (!p->ids) return MOE_ENOMEM;
    p->n = 0;
    for (const cJSON *x = a->child; x; x = x->next) {
        int st = check_token(x, param, lim->n_vocab, &p->ids[p->n], err);
        if (st) return st;
        p->n++;
    }
    if (lim->tok) {
        int st = moe_tok_decode(lim->tok, p->ids, (size_t)p->n, false, &p->text, &p->text_len);
        if (st) return st;
    }
    return 0;
}

/* Tokenizes s[0..len): with parse_special the whole text as server-built
 * text (control-token text becomes control tokens); else per segs[0..n_segs)
 * (a chat prompt: template text parsed, content plain) or, when segs is
 * NULL, all of it as plain text. */
static int tokens_from_text(const char *s, size_t len, bool chat, const moe_tok_seg *segs, size_t n_segs,
                            bool parse_special, const srv_oai_limits *lim, const char *param, srv_oai_prompt *p,
                            srv_oai_err *err) {
    if (!lim->tok) return srv_oai_bad(err, param, "text prompts need a tokenizer");
    size_t n = 0;
    /* Rendered chat text already holds BOS where the template puts it; a
     * completion prompt gets BOS as the model asks. */
    bool bos = chat ? false : moe_tok_add_bos_default(lim->tok);
    moe_tok_seg all = {len, false};
    int st = parse_special ? moe_tok_encode(lim->tok, s, len, true, bos, &p->ids, &n)
                           : moe_tok_encode_segs(lim->tok, s, len, segs ? segs : &all, segs ? n_segs : 1, bos,
                                                 &p->ids, &n);
    if (st) return st;
    p->n = (int64_t)n;
    if (!chat && n == 0) return srv_oai_bad(err, param, "'%s' is empty", param);
    if (!(p->text = malloc(len + 1))) return MOE_ENOMEM;
    memcpy(p->text, s, len);
    p->text[len] = 0;
    p->text_len = len;
    return 0;
}

static int parse_prompts(const cJSON *pr, const srv_oai_limits *lim, srv_oai_req *r, srv_oai_err *err) {
    if (is_null(pr)) return srv_oai_bad(err, "prompt", "'prompt' is required");
    size_t count;
    if (cJSON_IsString(pr) || is_token_array(pr)) count = 1;
    else if (cJSON_IsArray(pr)) {
        count = (size_t)cJSON_GetArraySize(pr);
        if (!count) return srv_oai_bad(err, "prompt", "'prompt' must not be empty");
        if (count > 1024) return srv_oai_bad(err, "prompt", "'prompt' holds more than 1024 prompts");
    } else
        return srv_oai_bad(err, "prompt", "'prompt' must be a string, an array of strings, or an array of token ids");
    r->prompts = calloc(count, sizeof *r->prompts);
    if (!r->prompts) return MOE_ENOMEM;
    r->n_prompts = count;
    if (count == 1 && !cJSON_IsArray(pr)) {
        size_t l = strlen(pr->valuestring);
        return tokens_from_text(pr->valuestring, l, false, NULL, 0, r->parse_special, lim, "prompt", &r->prompts[0],
                                err);
    }
    if (is_token_array(pr)) return tokens_from_array(pr, "prompt", lim, &r->prompts[0], err);
    size_t i = 0;
    for (const cJSON *x = pr->child; x; x = x->next, i++) {
        char param[32];
        snprintf(param, sizeof param, "prompt[%zu]", i);
        int st;
        if (cJSON_IsString(x)) st = tokens_from_text(x->valuestring, strlen(x->valuestring), false, NULL, 0,
                                                     r->parse_special, lim, param, &r->prompts[i], err);
        else if (cJSON_IsArray(x)) st = tokens_from_array(x, param, lim, &r->prompts[i], err);
        else st = srv_oai_bad(err, param, "'%s' must be a string or an array of token ids", param);
        if (st) return st;
    }
    return 0;
}

static int parse_messages(const cJSON *ms, const srv_oai_limits *lim, srv_oai_req *r, srv_oai_err *err) {
    if (is_null(ms)) return srv_oai_bad(err, "messages", "'messages' is required");
    if (!cJSON_IsArray(ms)) return srv_oai_bad(err, "messages", "'messages' must be an array");
    size_t n = (size_t)cJSON_GetArraySize(ms);
    if (!n) return srv_oai_bad(err, "messages", "'messages' must not be empty");
    if (!lim->chat) return srv_oai_bad(err, "messages", "this model has no chat template");
    moe_chat_msg *msgs = calloc(n, sizeof *msgs);
    size_t n_parts_total = 0;
    for (const cJSON *m = ms->child; m; m = m->next) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
        if (cJSON_IsArray(c)) n_parts_total += (size_t)cJSON_GetArraySize(c);
    }
    moe_chat_part *parts = calloc(n_parts_total + 1, sizeof *parts);
    int st = 0;
    if (!msgs || !parts) {
        st = MOE_ENOMEM;
        goto out;
    }
    size_t i = 0, pk = 0;
    for (const cJSON *m = ms->child; m; m = m->next, i++) {
        char param[64];
        if (!cJSON_IsObject(m)) {
            snprintf(param, sizeof param, "messages[%zu]", i);
            st = srv_oai_bad(err, param, "'%s' must be an object", param);
            goto out;
        }
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        snprintf(param, sizeof param, "messages[%zu].role", i);
        if (!cJSON_IsString(role)) {
            st = srv_oai_bad(err, param, "'%s' is required and must be a string", param);
            goto out;
        }
        const char *rs = role->valuestring;
        if (!strcmp(rs, "developer")) rs = "system";
        if (strcmp(rs, "system") && strcmp(rs, "user") && strcmp(rs, "assistant") && strcmp(rs, "tool")) {
            st = srv_oai_bad(err, param, "'%s' must be one of system, user, assistant, tool (got '%.40s')", param, rs);
            goto out;
        }
        msgs[i].role = rs;
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
        snprintf(param, sizeof param, "messages[%zu].content", i);
        if (cJSON_IsString(c)) {
            msgs[i].content = c->valuestring;
            msgs[i].content_len = strlen(c->valuestring);
        } else if (is_null(c) && !strcmp(rs, "assistant")) {
            msgs[i].content = ""; /* an assistant turn that only made tool calls */
        } else if (cJSON_IsArray(c)) {
            msgs[i].parts = &parts[pk];
            size_t j = 0;
            for (const cJSON *p = c->child; p; p = p->next, j++) {
                snprintf(param, sizeof param, "messages[%zu].content[%zu]", i, j);
                const cJSON *type = cJSON_GetObjectItemCaseSensitive(p, "type");
                const cJSON *text = cJSON_GetObjectItemCaseSensitive(p, "text");
                if (!cJSON_IsObject(p) || !cJSON_IsString(type)) {
                    st = srv_oai_bad(err, param, "'%s' must be an object with a 'type'", param);
                    goto out;
                }
                if (strcmp(type->valuestring, "text")) {
                    st = srv_oai_bad(err, param, "'%s': content type '%.40s' is not supported (only 'text')", param,
                             type->valuestring);
                    goto out;
                }
                if (!cJSON_IsString(text)) {
                    st = srv_oai_bad(err, param, "'%s.text' must be a string", param);
                    goto out;
                }
                parts[pk].text = text->valuestring;
                parts[pk].len = strlen(text->valuestring);
                pk++;
            }
            msgs[i].n_parts = j;
            if (!j) msgs[i].parts = NULL, msgs[i].content = "";
        } else {
            st = srv_oai_bad(err, param, "'%s' must be a string or an array of text parts", param);
            goto out;
        }
    }
    char *text = NULL;
    size_t text_len = 0, n_segs = 0;
    moe_tok_seg *segs = NULL;
    if ((st = moe_chat_render_segs(lim->chat, msgs, n, true, &text, &text_len, &segs, &n_segs))) goto out;
    r->prompts = calloc(1, sizeof *r->prompts);
    if (!r->prompts) {
        free(text);
        free(segs);
        st = MOE_ENOMEM;
        goto out;
    }
    r->n_prompts = 1;
    st = tokens_from_text(text, text_len, true, segs, n_segs, r->parse_special, lim, "messages", &r->prompts[0], err);
    free(text);
    free(segs);
out:
    free(msgs);
    free(parts);
    return st;
}

static int parse_stop(const cJSON *v, srv_oai_req *r, srv_oai_err *err) {
    if (is_null(v)) return 0;
    int n;
    if (cJSON_IsString(v)) n = 1;
    else if (cJSON_IsArray(v)) n = cJSON_GetArraySize(v);
    else return srv_oai_bad(err, "stop", "'stop' must be a string or an array of strings");
    if (n > MOE_MAX_STOP) return srv_oai_bad(err, "stop", "'stop' holds %d strings; at most %d are allowed", n, MOE_MAX_STOP);
    r->stop = calloc((size_t)n + 1, sizeof *r->stop);
    if (!r->stop) return MOE_ENOMEM;
    const cJSON *x = cJSON_IsString(v) ? v : v->child;
    for (int i = 0; i < n; i++, x = x->next) {
        if (!cJSON_IsString(x)) return srv_oai_bad(err, "stop", "'stop' entries must be strings");
        size_t l = strlen(x->valuestring);
        if (!l) return srv_oai_bad(err, "stop", "'stop' strings must not be empty");
        if (l > MOE_MAX_STOP_LEN) return srv_oai_bad(err, "stop", "'stop' strings are limited to %d bytes", MOE_MAX_STOP_LEN);
        if (!(r->stop[i] = strdup(x->valuestring))) return MOE_ENOMEM;
        r->n_stop++;
    }
    return 0;
}

static int parse_logit_bias(const cJSON *v, const srv_oai_limits *lim, srv_oai_req *r, srv_oai_err *err) {
    if (is_null(v)) return 0;
    if (!cJSON_IsObject(v)) return srv_oai_bad(err, "logit_bias", "'logit_bias' must be an object of \"token id\": bias");
    int n = cJSON_GetArraySize(v);
    if (n > 1024) return srv_oai_bad(err, "logit_bias", "'logit_bias' holds more than 1024 entries");
    r->bias_ids = malloc(((size_t)n + 1) * sizeof(int32_t));
    r->bias = malloc(((size_t)n + 1) * sizeof(float));
    if (!r->bias_ids || !r->bias) return MOE_ENOMEM;
    int k = 0;
    for (const cJSON *x = v->child; x; x = x->next) {
        const char *key = x->string;
        char *end;
        long long id = strtoll(key, &end, 10);
        if (!*key || *end || id < 0 || id >= lim->n_vocab)
            return srv_oai_bad(err, "logit_bias", "'logit_bias' key '%.40s' is not a token id in [0, %lld)", key,
                       (long long)lim->n_vocab);
        if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble) || x->valuedouble < -100 || x->valuedouble > 100)
            return srv_oai_bad(err, "logit_bias", "'logit_bias' values must be numbers in [-100, 100]");
        r->bias_ids[k] = (int32_t)id;
        r->bias[k] = (float)x->valuedouble;
        k++;
    }
    r->sampling.n_logit_bias = k;
    r->sampling.logit_bias_ids = r->bias_ids;
    r->sampling.logit_bias = r->bias;
    return 0;
}

static bool model_ok(const char *m, const srv_oai_limits *lim) {
    if (lim->model_name && !strcmp(m, lim->model_name)) return true;
    if (lim->model_alt && !strcmp(m, lim->model_alt)) return true;
    for (size_t i = 0; i < lim->n_model_aliases; i++)
        if (!strcmp(m, lim->model_aliases[i])) return true;
    return !lim->model_name && !lim->model_alt;
}

static int parse_fields(srv_oai_kind kind, const cJSON *root, const srv_oai_limits *lim, srv_oai_req *r,
                        srv_oai_err *err) {
    int st;
    const cJSON *v;
#define FIELD(name) (v = cJSON_GetObjectItemCaseSensitive(root, name), !is_null(v))
    if (FIELD("model")) {
        if (!cJSON_IsString(v)) return srv_oai_bad(err, "model", "'model' must be a string");
        if (!(r->model = strdup(v->valuestring))) return MOE_ENOMEM;
    }
    if (FIELD("stream") && (st = get_bool(v, "stream", &r->stream, err))) return st;
    if (FIELD("stream_options")) {
        if (!cJSON_IsObject(v)) return srv_oai_bad(err, "stream_options", "'stream_options' must be an object");
        const cJSON *iu = cJSON_GetObjectItemCaseSensitive(v, "include_usage");
        if (!is_null(iu) && (st = get_bool(iu, "stream_options.include_usage", &r->include_usage, err))) return st;
    }
    int64_t x;
    r->max_tokens = -1;
    if (FIELD("max_tokens")) {
        if ((st = get_int(v, "max_tokens", 1, INT64_MAX / 2, &x, err))) return st;
        r->max_tokens = x;
    }
    if (kind == SRV_OAI_CHAT && FIELD("max_completion_tokens")) {
        if ((st = get_int(v, "max_completion_tokens", 1, INT64_MAX / 2, &x, err))) return st;
        r->max_tokens = x;
    }
    double d;
    if (FIELD("temperature")) {
        if ((st = get_num(v, "temperature", 0, 2, false, &d, err))) return st;
        r->sampling.temperature = (float)d;
    }
    if (FIELD("top_p")) {
        if ((st = get_num(v, "top_p", 0, 1, false, &d, err))) return st;
        /* OpenAI accepts top_p 0: only the most likely token survives. */
        if (d == 0) r->sampling.temperature = 0, d = 1;
        r->sampling.top_p = (float)d;
    }
    if (FIELD("top_k")) {
        if ((st = get_int(v, "top_k", -1, lim->n_vocab, &x, err))) return st;
        r->sampling.top_k = (int32_t)(x < 0 ? 0 : x);
    }
    if (FIELD("min_p")) {
        if ((st = get_num(v, "min_p", 0, 1, false, &d, err))) return st;
        r->sampling.min_p = (float)d;
    }
    if (FIELD("presence_penalty")) {
        if ((st = get_num(v, "presence_penalty", -2, 2, false, &d, err))) return st;
        r->sampling.presence_penalty = (float)d;
    }
    if (FIELD("frequency_penalty")) {
        if ((st = get_num(v, "frequency_penalty", -2, 2, false, &d, err))) return st;
        r->sampling.frequency_penalty = (float)d;
    }
    if (FIELD("repetition_penalty")) {
        if ((st = get_num(v, "repetition_penalty", 0, 10, true, &d, err))) return st;
        r->sampling.repetition_penalty = (float)d;
    }
    if (FIELD("seed")) {
        if ((st = get_int(v, "seed", -(1LL << 53), 1LL << 53, &x, err))) return st;
        r->sampling.has_seed = true;
        r->sampling.seed = (uint64_t)x;
    }
    if ((st = parse_logit_bias(cJSON_GetObjectItemCaseSensitive(root, "logit_bias"), lim, r, err))) return st;
    if ((st = parse_stop(cJSON_GetObjectItemCaseSensitive(root, "stop"), r, err))) return st;
    r->n = 1;
    if (FIELD("n")) {
        if ((st = get_int(v, "n", 1, lim->max_seqs > 0 ? lim->max_seqs : 1, &x, err))) return st;
        r->n = (int32_t)x;
    }
    if (FIELD("best_of")) {
        if ((st = get_int(v, "best_of", 1, INT32_MAX, &x, err))) return st;
        if (x != r->n) return srv_oai_bad(err, "best_of", "'best_of' other than n is not supported");
    }
    if (kind == SRV_OAI_CHAT) {
        if (FIELD("logprobs") && (st = get_bool(v, "logprobs", &r->logprobs, err))) return st;
        if (FIELD("top_logprobs")) {
            if ((st = get_int(v, "top_logprobs", 0, MOE_MAX_TOP_LOGPROBS, &x, err))) return st;
            if (!r->logprobs && x > 0) return srv_oai_bad(err, "top_logprobs", "'top_logprobs' requires 'logprobs': true");
            r->top_logprobs = (int32_t)x;
        }
    } else {
        if (FIELD("logprobs")) {
            if ((st = get_int(v, "logprobs", 0, MOE_MAX_TOP_LOGPROBS, &x, err))) return st;
            r->logprobs = true;
            r->top_logprobs = (int32_t)x;
        }
        if (FIELD("echo") && (st = get_bool(v, "echo", &r->echo, err))) return st;
        if (FIELD("suffix")) return srv_oai_bad(err, "suffix", "'suffix' is not supported");
    }
    if (FIELD("ignore_eos") && (st = get_bool(v, "ignore_eos", &r->ignore_eos, err))) return st;
    /* Chat content is plain text unless the server or the request opts in
     * (turn forging); a raw completion prompt is the caller's own template,
     * parsed as llama.cpp and Hugging Face do, unless the request says not. */
    r->parse_special = kind == SRV_OAI_CHAT ? lim->chat_parse_special : true;
    if (FIELD("parse_special") && (st = get_bool(v, "parse_special", &r->parse_special, err))) return st;
    if (FIELD("user")) {
        if (!cJSON_IsString(v)) return srv_oai_bad(err, "user", "'user' must be a string");
        if (!(r->user = strdup(v->valuestring))) return MOE_ENOMEM;
    }
    if (FIELD("tools") || FIELD("tool_choice") || FIELD("functions")) {
        /* Accepted and ignored only when empty / "none": the model cannot call tools yet. */
        if (!(cJSON_IsArray(v) && !v->child) && !(cJSON_IsString(v) && !strcmp(v->valuestring, "none")))
            return srv_oai_bad(err, v->string, "'%s' (tool calling) is not supported", v->string);
    }
    if (FIELD("response_format")) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(v, "type");
        if (!cJSON_IsString(t) || strcmp(t->valuestring, "text"))
            return srv_oai_bad(err, "response_format", "only 'response_format': {\"type\": \"text\"} is supported");
    }
#undef FIELD
    /* The prompt last: the most expensive check runs on valid fields only. */
    if (kind == SRV_OAI_CHAT) st = parse_messages(cJSON_GetObjectItemCaseSensitive(root, "messages"), lim, r, err);
    else st = parse_prompts(cJSON_GetObjectItemCaseSensitive(root, "prompt"), lim, r, err);
    if (st) return st;
    int64_t longest = 0;
    for (size_t i = 0; i < r->n_prompts; i++)
        if (r->prompts[i].n > longest) longest = r->prompts[i].n;
    const char *pp = kind == SRV_OAI_CHAT ? "messages" : "prompt";
    if (longest < 1) return srv_oai_bad(err, pp, "'%s' gives an empty prompt", pp);
    if (longest >= lim->ctx_size)
        return srv_oai_bad(err, pp, "the prompt is %lld tokens; the context size is %lld (room for at least one more token needed)",
                   (long long)longest, (long long)lim->ctx_size);
    int64_t room = lim->ctx_size - longest;
    if (r->max_tokens < 0) r->max_tokens = kind == SRV_OAI_COMPLETION ? (room < 16 ? room : 16) : room;
    else if (r->max_tokens > room)
        return srv_oai_bad(err, kind == SRV_OAI_CHAT && cJSON_GetObjectItemCaseSensitive(root, "max_completion_tokens")
                            ? "max_completion_tokens"
                            : "max_tokens",
                   "prompt (%lld tokens) + max_tokens (%lld) exceeds the context size %lld", (long long)longest,
                   (long long)r->max_tokens, (long long)lim->ctx_size);
    return 0;
}

int srv_oai_parse(srv_oai_kind kind, const char *body, size_t len, const srv_oai_limits *lim, srv_oai_req *out,
                  srv_oai_err *err) {
    memset(out, 0, sizeof *out);
    out->kind = kind;
    out->sampling.temperature = 1;
    out->sampling.top_p = 1;
    out->sampling.repetition_penalty = 1;
    int st = srv_oai_precheck(body, len, lim->max_depth, err);
    if (st) return st;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(body, len, &end, false);
    if (!root) {
        size_t off = end && end >= body ? (size_t)(end - body) : 0;
        srv_oai_err_set(err, 400, NULL, "request body is not valid JSON (error near byte %zu)", off);
        return MOE_EINVAL;
    }
    /* Trailing bytes other than whitespace mean a broken body. */
    for (const char *p = end; p < body + len; p++)
        if (*p != ' ' && *p != '\n' && *p != '\r' && *p != '\t') {
            cJSON_Delete(root);
            srv_oai_err_set(err, 400, NULL, "request body has data after the JSON value (byte %zu)", (size_t)(p - body));
            return MOE_EINVAL;
        }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        srv_oai_err_set(err, 400, NULL, "request body must be a JSON object");
        return MOE_EINVAL;
    }
    st = parse_fields(kind, root, lim, out, err);
    if (!st && out->model && !model_ok(out->model, lim)) {
        srv_oai_err_set(err, 404, "model", "The model '%.200s' does not exist (this server serves '%s')", out->model,
                        lim->model_name ? lim->model_name : "");
        snprintf(err->code, sizeof err->code, "model_not_found");
        st = MOE_ENOTFOUND;
    }
    if (st == MOE_ENOMEM) srv_oai_err_set(err, 500, NULL, "out of memory");
    else if (st && st != MOE_EINVAL && st != MOE_ENOTFOUND && err->http != 400)
        srv_oai_err_set(err, 400, NULL, "invalid request: %s", moe_strerror(st));
    cJSON_Delete(root);
    if (st) {
        srv_oai_req_free(out);
        out->kind = kind;
    }
    return st;
}

void srv_oai_req_free(srv_oai_req *r) {
    free(r->model);
    free(r->bias_ids);
    free(r->bias);
    for (int32_t i = 0; i < r->n_stop; i++) free(r->stop[i]);
    free(r->stop);
    free(r->user);
    for (size_t i = 0; i < r->n_prompts; i++) {
        free(r->prompts[i].ids);
        free(r->prompts[i].text);
    }
    free(r->prompts);
    memset(r, 0, sizeof *r);
}

void srv_oai_engine_request(const srv_oai_req *r, size_t i, moe_request *out) {
    memset(out, 0, sizeof *out);
    out->prompt = r->prompts[i].ids;
    out->n_prompt = r->prompts[i].n;
    out->max_tokens = r->max_tokens;
    out->n = r->n;
    out->sampling = r->sampling;
    out->logprobs = r->logprobs;
    out->top_logprobs = r->top_logprobs;
    out->ignore_eos = r->ignore_eos;
    out->stop = (const char *const *)r->stop;
    out->n_stop = r->n_stop;
}

/* --- output --- */

int srv_oai_choice_append(srv_oai_choice *c, const char *text, size_t len) {
    if (c->len + len + 1 > c->cap) {
        size_t cap = c->cap ? c->cap : 256;
        while (cap < c->len + len + 1) cap *= 2;
        char *t = realloc(c->text, cap);
        if (!t) return MOE_ENOMEM;
        c->text = t;
        c->cap = cap;
    }
    memcpy(c->text + c->len, text, len);
    c->len += len;
    c->text[c->len] = 0;
    return 0;
}

int srv_oai_choice_add_lp(srv_oai_choice *c, const srv_oai_lp *lp) {
    if (c->n_lps == c->cap_lps) {
        size_t cap = c->cap_lps ? c->cap_lps * 2 : 16;
        srv_oai_lp *t = realloc(c->lps, cap * sizeof *t);
        if (!t) return MOE_ENOMEM;
        c->lps = t;
        c->cap_lps = cap;
    }
    c->lps[c->n_lps++] = *lp;
    return 0;
}

void srv_oai_choice_free(srv_oai_choice *c) {
    free(c->text);
    free(c->lps);
    memset(c, 0, sizeof *c);
}

const char *srv_oai_finish_name(moe_finish f) {
    if (f == MOE_FINISH_STOP) return "stop";
    if (f == MOE_FINISH_LENGTH) return "length";
    return NULL;
}

static void add_finish(cJSON *o, moe_finish f) {
    const char *s = srv_oai_finish_name(f);
    if (s) cJSON_AddStringToObject(o, "finish_reason", s);
    else cJSON_AddNullToObject(o, "finish_reason");
}

static void add_text(cJSON *o, const char *key, const char *text, size_t len) {
    char *t = moe_utf8_clean(text ? text : "", text ? len : 0);
    cJSON_AddStringToObject(o, key, t ? t : "");
    free(t);
}

/* A token's text (may be part of a UTF-8 character) and its bytes. */
static void token_fields(cJSON *o, const moe_tok *tok, int32_t id) {
    size_t len = 0;
    const char *p = tok ? moe_tok_piece(tok, id, &len) : NULL;
    add_text(o, "token", p ? p : "", p ? len : 0);
}

static cJSON *token_bytes(const moe_tok *tok, int32_t id) {
    size_t len = 0;
    const char *p = tok ? moe_tok_piece(tok, id, &len) : NULL;
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; p && i < len; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber((unsigned char)p[i]));
    return a;
}

static char *token_text(const moe_tok *tok, int32_t id) {
    size_t len = 0;
    const char *p = tok ? moe_tok_piece(tok, id, &len) : NULL;
    return moe_utf8_clean(p ? p : "", p ? len : 0);
}

/* chat: {"content": [{"token","logprob","bytes","top_logprobs":[...]}], "refusal": null} */
static cJSON *chat_logprobs(const srv_oai_ctx *c, const srv_oai_lp *lps, size_t n) {
    cJSON *o = cJSON_CreateObject(), *content = cJSON_AddArrayToObject(o, "content");
    for (size_t i = 0; i < n; i++) {
        cJSON *e = cJSON_CreateObject();
        token_fields(e, c->tok, lps[i].id);
        cJSON_AddNumberToObject(e, "logprob", lps[i].logprob);
        cJSON_AddItemToObject(e, "bytes", token_bytes(c->tok, lps[i].id));
        cJSON *top = cJSON_AddArrayToObject(e, "top_logprobs");
        for (int32_t k = 0; k < lps[i].n_top; k++) {
            cJSON *t = cJSON_CreateObject();
            token_fields(t, c->tok, lps[i].top[k].id);
            cJSON_AddNumberToObject(t, "logprob", lps[i].top[k].logprob);
            cJSON_AddItemToObject(t, "bytes", token_bytes(c->tok, lps[i].top[k].id));
            cJSON_AddItemToArray(top, t);
        }
        cJSON_AddItemToArray(content, e);
    }
    cJSON_AddNullToObject(o, "refusal");
    return o;
}

/* completions: {"tokens","token_logprobs","top_logprobs":[{tok: lp}],"text_offset"} */
static cJSON *completion_logprobs(const srv_oai_ctx *c, const srv_oai_lp *lps, size_t n) {
    cJSON *o = cJSON_CreateObject();
    cJSON *toks = cJSON_AddArrayToObject(o, "tokens"), *lp = cJSON_AddArrayToObject(o, "token_logprobs");
    cJSON *top = cJSON_AddArrayToObject(o, "top_logprobs"), *off = cJSON_AddArrayToObject(o, "text_offset");
    for (size_t i = 0; i < n; i++) {
        char *t = token_text(c->tok, lps[i].id);
        cJSON_AddItemToArray(toks, cJSON_CreateString(t ? t : ""));
        free(t);
        cJSON_AddItemToArray(lp, cJSON_CreateNumber(lps[i].logprob));
        cJSON *m = cJSON_CreateObject();
        for (int32_t k = 0; k < lps[i].n_top; k++) {
            char *tt = token_text(c->tok, lps[i].top[k].id);
            /* Two ids may print alike; the first (the more likely) keeps the key. */
            if (tt && !cJSON_GetObjectItemCaseSensitive(m, tt))
                cJSON_AddNumberToObject(m, tt, lps[i].top[k].logprob);
            free(tt);
        }
        cJSON_AddItemToArray(top, m);
        cJSON_AddItemToArray(off, cJSON_CreateNumber((double)lps[i].text_offset));
    }
    return o;
}

static cJSON *base_object(const srv_oai_ctx *c, bool chunk) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", c->id);
    cJSON_AddStringToObject(o, "object",
                            c->kind == SRV_OAI_CHAT ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                                    : "text_completion");
    cJSON_AddNumberToObject(o, "created", (double)c->created);
    cJSON_AddStringToObject(o, "model", c->model);
    cJSON_AddStringToObject(o, "system_fingerprint", "moed");
    return o;
}

static cJSON *usage_object(const srv_oai_ctx *c, int64_t prompt, int64_t completion) {
    cJSON *u = cJSON_CreateObject();
    cJSON_AddNumberToObject(u, "prompt_tokens", (double)prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", (double)completion);
    cJSON_AddNumberToObject(u, "total_tokens", (double)(prompt + completion));
    if (c->has_energy) cJSON_AddNumberToObject(u, "energy_joules", c->energy_joules);
    if (c->has_cost) cJSON_AddNumberToObject(u, "cost_usd", c->cost_usd);
    return u;
}

static char *finish_print(cJSON *o) {
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

char *srv_oai_render_response(const srv_oai_ctx *c, const srv_oai_choice *choices, size_t n, int64_t prompt_tokens,
                              int64_t completion_tokens) {
    cJSON *o = base_object(c, false), *arr = cJSON_AddArrayToObject(o, "choices");
    for (size_t i = 0; i < n; i++) {
        cJSON *ch = cJSON_CreateObject();
        cJSON_AddNumberToObject(ch, "index", (double)i);
        if (c->kind == SRV_OAI_CHAT) {
            cJSON *m = cJSON_AddObjectToObject(ch, "message");
            cJSON_AddStringToObject(m, "role", "assistant");
            add_text(m, "content", choices[i].text, choices[i].len);
            cJSON_AddNullToObject(m, "refusal");
            if (c->logprobs) cJSON_AddItemToObject(ch, "logprobs", chat_logprobs(c, choices[i].lps, choices[i].n_lps));
            else cJSON_AddNullToObject(ch, "logprobs");
        } else {
            add_text(ch, "text", choices[i].text, choices[i].len);
            if (c->logprobs)
                cJSON_AddItemToObject(ch, "logprobs", completion_logprobs(c, choices[i].lps, choices[i].n_lps));
            else cJSON_AddNullToObject(ch, "logprobs");
        }
        add_finish(ch, choices[i].finish);
        cJSON_AddItemToArray(arr, ch);
    }
    cJSON_AddItemToObject(o, "usage", usage_object(c, prompt_tokens, completion_tokens));
    return finish_print(o);
}

char *srv_oai_render_chunk(const srv_oai_ctx *c, int32_t index, bool role, const char *text, size_t len,
                           const srv_oai_lp *lps, size_t n_lps, moe_finish finish) {
    cJSON *o = base_object(c, true), *arr = cJSON_AddArrayToObject(o, "choices");
    cJSON *ch = cJSON_CreateObject();
    cJSON_AddNumberToObject(ch, "index", index);
    if (c->kind == SRV_OAI_CHAT) {
        cJSON *d = cJSON_AddObjectToObject(ch, "delta");
        if (role) cJSON_AddStringToObject(d, "role", "assistant");
        if (role || len) add_text(d, "content", text, len);
        if (c->logprobs && n_lps) cJSON_AddItemToObject(ch, "logprobs", chat_logprobs(c, lps, n_lps));
        else cJSON_AddNullToObject(ch, "logprobs");
    } else {
        add_text(ch, "text", text, len);
        if (c->logprobs && n_lps) cJSON_AddItemToObject(ch, "logprobs", completion_logprobs(c, lps, n_lps));
        else cJSON_AddNullToObject(ch, "logprobs");
    }
    add_finish(ch, finish);
    cJSON_AddItemToArray(arr, ch);
    return finish_print(o);
}

char *srv_oai_render_usage_chunk(const srv_oai_ctx *c, int64_t prompt_tokens, int64_t completion_tokens) {
    cJSON *o = base_object(c, true);
    cJSON_AddArrayToObject(o, "choices");
    cJSON_AddItemToObject(o, "usage", usage_object(c, prompt_tokens, completion_tokens));
    return finish_print(o);
}
