/* chat_template.c - chat prompt rendering per template family; see
 * chat_template.h. Each renderer mirrors one real Jinja template line by
 * line (quoted in the comments) so a reader can check them side by side. */
#include "chat_template.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log_hook.h"

/* The prompt being built, and which of its bytes are template text
 * (segs: consecutive, adjacent ones of a kind merged) and which are
 * message content. */
typedef struct sbuf {
    char *p;
    size_t n, cap;
    bool oom;
    moe_tok_seg *segs;
    size_t n_segs, cap_segs;
} sbuf;

static void put_raw(sbuf *b, const char *s, size_t n) {
    if (b->oom || n == 0) return;
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 256;
        while (nc < b->n + n + 1) nc *= 2;
        char *q = realloc(b->p, nc);
        if (!q) {
            b->oom = true;
            return;
        }
        b->p = q, b->cap = nc;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void mark(sbuf *b, size_t n, bool special) {
    if (b->oom || n == 0) return;
    if (b->n_segs && b->segs[b->n_segs - 1].special == special) {
        b->segs[b->n_segs - 1].len += n;
        return;
    }
    if (b->n_segs == b->cap_segs) {
        size_t nc = b->cap_segs ? b->cap_segs * 2 : 16;
        moe_tok_seg *q = realloc(b->segs, nc * sizeof *q);
        if (!q) {
            b->oom = true;
            return;
        }
        b->segs = q, b->cap_segs = nc;
    }
    b->segs[b->n_segs++] = (moe_tok_seg){n, special};
}

/* Template text: its control-token text is meant. */
static void put(sbuf *b, const char *s, size_t n) {
    put_raw(b, s, n);
    mark(b, n, true);
}

/* Text from the request (content, role names): always plain text. */
static void put_text(sbuf *b, const char *s, size_t n) {
    put_raw(b, s, n);
    mark(b, n, false);
}

static void puts_(sbuf *b, const char *s) { put(b, s, strlen(s)); }
static void puts_text(sbuf *b, const char *s) { put_text(b, s, strlen(s)); }

static const char *memfind(const char *h, size_t hl, const char *needle) {
    size_t nl = strlen(needle);
    if (!h || nl > hl) return NULL;
    for (size_t i = 0; i + nl <= hl; i++)
        if (memcmp(h + i, needle, nl) == 0) return h + i;
    return NULL;
}

moe_chat_family moe_chat_detect(const char *t, size_t n) {
    if (!t || !n) return MOE_CHAT_AUTO;
    if (memfind(t, n, "<｜User｜>") || memfind(t, n, "<｜Assistant｜>")) return MOE_CHAT_DEEPSEEK3;
    if (memfind(t, n, "<|start_header_id|>")) return MOE_CHAT_LLAMA3;
    if (memfind(t, n, "<|im_start|>")) return MOE_CHAT_CHATML;
    if (memfind(t, n, "[INST]")) return MOE_CHAT_MISTRAL;
    if (memfind(t, n, "'User: '") && memfind(t, n, "Assistant:")) return MOE_CHAT_DEEPSEEK2;
    return MOE_CHAT_AUTO;
}

static const char *const NAMES[] = {"auto", "chatml", "deepseek2", "deepseek3", "mistral", "llama3", "mistral-v3"};

const char *moe_chat_family_name(moe_chat_family f) {
    return (unsigned)f < sizeof NAMES / sizeof *NAMES ? NAMES[f] : "unknown";
}

int moe_chat_family_parse(const char *name) {
    static const struct {
        const char *s;
        moe_chat_family f;
    } alias[] = {{"qwen", MOE_CHAT_CHATML},        {"deepseek-v2", MOE_CHAT_DEEPSEEK2},
                 {"deepseek-v3", MOE_CHAT_DEEPSEEK3}, {"deepseek-r1", MOE_CHAT_DEEPSEEK3},
                 {"mixtral", MOE_CHAT_MISTRAL},    {"llama-3", MOE_CHAT_LLAMA3},
                 {"mistral-v1", MOE_CHAT_MISTRAL}, {"mistral-v2", MOE_CHAT_MISTRAL_V3}};
    if (!name) return -1;
    for (size_t i = 0; i < sizeof NAMES / sizeof *NAMES; i++)
        if (strcmp(name, NAMES[i]) == 0) return (int)i;
    for (size_t i = 0; i < sizeof alias / sizeof *alias; i++)
        if (strcmp(name, alias[i].s) == 0) return (int)alias[i].f;
    return -1;
}

/* Qwen2-style templates print a fixed system turn when the conversation
 * has none: '<|im_start|>system\nYou are a helpful assistant.<|im_end|>'.
 * Take that literal text from the template (newline written either as a
 * real newline or as the Jinja escape \n). */
static char *chatml_default_system(const char *t, size_t n) {
    const char *p = memfind(t, n, "<|im_start|>system");
    while (p) {
        const char *s = p + strlen("<|im_start|>system");
        const char *end = t + n;
        if (s < end && *s == '\n') s++;
        else if (s + 1 < end && s[0] == '\\' && s[1] == 'n') s += 2;
        else s = NULL;
        const char *e = s ? memfind(s, (size_t)(end - s), "<|im_end|>") : NULL;
        if (s && e) {
            bool literal = true;
            for (const char *q = s; q < e; q++)
                if (*q == '\'' || *q == '"' || *q == '{' || *q == '}' || *q == '+') literal = false;
            if (literal && e > s) {
                char *r = malloc((size_t)(e - s) + 1);
                if (!r) return NULL;
                size_t k = 0;
                for (const char *q = s; q < e; q++) {
                    if (q + 1 < e && q[0] == '\\' && q[1] == 'n') r[k++] = '\n', q++;
                    else r[k++] = *q;
                }
                r[k] = 0;
                return r;
            }
        }
        const char *from = p + 1;
        p = memfind(from, (size_t)(t + n - from), "<|im_start|>system");
    }
    return NULL;
}

int moe_chat_template_init(moe_chat_template *ct, const char *tmpl, size_t tmpl_len, moe_chat_family force,
                           const char *bos, const char *eos) {
    memset(ct, 0, sizeof *ct);
    snprintf(ct->bos, sizeof ct->bos, "%s", bos ? bos : "");
    snprintf(ct->eos, sizeof ct->eos, "%s", eos ? eos : "");
    ct->family = force != MOE_CHAT_AUTO ? force : moe_chat_detect(tmpl, tmpl_len);
    if (ct->family == MOE_CHAT_AUTO) {
        moe_log(MOE_LOG_WARN, "chat template %s; using ChatML",
                tmpl && tmpl_len ? "not recognised" : "missing");
        ct->family = MOE_CHAT_CHATML;
    }
    if (ct->family == MOE_CHAT_DEEPSEEK3 && tmpl)
        ct->think_open = memfind(tmpl, tmpl_len, "<｜Assistant｜><think>\\n") ||
                         memfind(tmpl, tmpl_len, "<｜Assistant｜><think>\n");
    /* only a recognised ChatML template can carry a default system turn */
    if (ct->family == MOE_CHAT_CHATML && force == MOE_CHAT_AUTO && tmpl &&
        memfind(tmpl, tmpl_len, "<|im_start|>")) {
        ct->default_system = chatml_default_system(tmpl, tmpl_len);
    }
    return MOE_OK;
}

static void tok_text(const moe_tok *t, int32_t id, char *dst, size_t cap) {
    size_t len = 0;
    const char *s = id >= 0 ? moe_tok_text(t, id, &len) : NULL;
    if (!s || len >= cap) len = 0;
    if (s) memcpy(dst, s, len);
    dst[len] = 0;
}

int moe_chat_template_from_model(moe_chat_template *ct, const moe_gguf *g, const moe_tok *t,
                                 moe_chat_family force) {
    char bos[64], eos[64];
    tok_text(t, moe_tok_bos(t), bos, sizeof bos);
    tok_text(t, moe_tok_eos(t), eos, sizeof eos);
    moe_gguf_str s = {0};
    if (moe_gguf_get_str(g, "tokenizer.chat_template", &s) != MOE_OK) s.ptr = NULL, s.len = 0;
    int st = moe_chat_template_init(ct, s.ptr, (size_t)s.len, force, bos, eos);
    /* Mistral's v2+ tokenizers made [INST] a control token and changed the
     * spacing with it; the template text alone does not tell them apart */
    int32_t inst = moe_tok_find(t, "[INST]", 6);
    if (st == MOE_OK && ct->family == MOE_CHAT_MISTRAL && inst >= 0 &&
        moe_tok_type(t, inst) == MOE_TOKTYPE_CONTROL)
        ct->family = MOE_CHAT_MISTRAL_V3;
    return st;
}

void moe_chat_template_free(moe_chat_template *ct) {
    if (!ct) return;
    free(ct->default_system);
    ct->default_system = NULL;
}

static void put_content(sbuf *b, const moe_chat_msg *m) {
    if (!m->parts) {
        put_text(b, m->content, m->content_len);
        return;
    }
    for (size_t i = 0; i < m->n_parts; i++) {
        if (i) puts_text(b, "\n");
        put_text(b, m->parts[i].text, m->parts[i].len);
    }
}

/* The content as one string (for the families that transform it). */
static char *content_dup(const moe_chat_msg *m, size_t *len) {
    sbuf b = {0};
    put_content(&b, m);
    free(b.segs);
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    if (!b.p) b.p = calloc(1, 1);
    *len = b.n;
    return b.p;
}

static bool is(const moe_chat_msg *m, const char *role) { return strcmp(m->role, role) == 0; }

/* Python str.strip()'s whitespace (what Jinja's |trim uses). */
static size_t ws_len(const unsigned char *p, size_t n) {
    if (n >= 1 && (p[0] == ' ' || (p[0] >= 0x09 && p[0] <= 0x0D) || (p[0] >= 0x1C && p[0] <= 0x1F))) return 1;
    if (n >= 2 && p[0] == 0xC2 && (p[1] == 0x85 || p[1] == 0xA0)) return 2;
    if (n >= 3 && p[0] == 0xE1 && p[1] == 0x9A && p[2] == 0x80) return 3;
    if (n >= 3 && p[0] == 0xE2 && p[1] == 0x80 && ((p[2] >= 0x80 && p[2] <= 0x8A) || p[2] == 0xA8 || p[2] == 0xA9 || p[2] == 0xAF))
        return 3;
    if (n >= 3 && p[0] == 0xE2 && p[1] == 0x81 && p[2] == 0x9F) return 3;
    if (n >= 3 && p[0] == 0xE3 && p[1] == 0x80 && p[2] == 0x80) return 3;
    return 0;
}

static void put_trimmed(sbuf *b, const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t a = 0, e = n, k;
    while (a < e && (k = ws_len(p + a, e - a))) a += k;
    for (;;) { /* trailing: try 1..3-byte whitespace ending at e */
        bool cut = false;
        for (size_t w = 1; w <= 3 && w <= e - a; w++)
            if (ws_len(p + e - w, w) == w) {
                e -= w;
                cut = true;
                break;
            }
        if (!cut) break;
    }
    put_text(b, s + a, e - a);
}

static void render_chatml(const moe_chat_template *ct, sbuf *b, const moe_chat_msg *m, size_t n) {
    /* {% if loop.first and messages[0]['role'] != 'system' %}<default system>{% endif %} */
    if (ct->default_system && n > 0 && !is(&m[0], "system")) {
        puts_(b, "<|im_start|>system\n");
        puts_(b, ct->default_system);
        puts_(b, "<|im_end|>\n");
    }
    /* '<|im_start|>' + role + '\n' + content + '<|im_end|>' + '\n' */
    for (size_t i = 0; i < n; i++) {
        puts_(b, "<|im_start|>");
        puts_text(b, m[i].role);
        puts_(b, "\n");
        put_content(b, &m[i]);
        puts_(b, "<|im_end|>\n");
    }
}

static void render_deepseek2(const moe_chat_template *ct, sbuf *b, const moe_chat_msg *m, size_t n, bool gen) {
    puts_(b, ct->bos);
    for (size_t i = 0; i < n; i++) {
        if (is(&m[i], "user")) { /* 'User: ' + content + '\n\n' */
            puts_(b, "User: ");
            put_content(b, &m[i]);
            puts_(b, "\n\n");
        } else if (is(&m[i], "assistant")) { /* 'Assistant: ' + content + eos_token */
            puts_(b, "Assistant: ");
            put_content(b, &m[i]);
            puts_(b, ct->eos);
        } else if (is(&m[i], "system")) { /* content + '\n\n' */
            put_content(b, &m[i]);
            puts_(b, "\n\n");
        }
    }
    if (gen) puts_(b, "Assistant:");
}

static void render_deepseek3(const moe_chat_template *ct, sbuf *b, const moe_chat_msg *m, size_t n, bool gen) {
    /* all system messages first, joined by '\n\n', after bos_token */
    puts_(b, ct->bos);
    bool first_sp = true;
    for (size_t i = 0; i < n; i++) {
        if (!is(&m[i], "system")) continue;
        if (!first_sp) puts_(b, "\n\n");
        put_content(b, &m[i]);
        first_sp = false;
    }
    bool is_tool = false, output_first = true;
    for (size_t i = 0; i < n; i++) {
        if (is(&m[i], "user")) {
            is_tool = false;
            puts_(b, "<｜User｜>");
            put_content(b, &m[i]);
        } else if (is(&m[i], "assistant")) {
            if (is_tool) {
                puts_(b, "<｜tool▁outputs▁end｜>");
                put_content(b, &m[i]);
                puts_(b, "<｜end▁of▁sentence｜>");
                is_tool = false;
            } else {
                /* {% if '</think>' in content %}{% set content = content.split('</think>')[-1] %} */
                size_t cl;
                char *c = content_dup(&m[i], &cl);
                if (!c) {
                    b->oom = true;
                    return;
                }
                const char *s = c, *hit;
                while ((hit = memfind(s, cl - (size_t)(s - c), "</think>"))) s = hit + strlen("</think>");
                puts_(b, "<｜Assistant｜>");
                put_text(b, s, cl - (size_t)(s - c));
                puts_(b, "<｜end▁of▁sentence｜>");
                free(c);
            }
        } else if (is(&m[i], "tool")) {
            is_tool = true;
            /* the template never resets is_output_first: later tool blocks
             * start without <｜tool▁outputs▁begin｜> there too */
            if (output_first) puts_(b, "<｜tool▁outputs▁begin｜>");
            output_first = false;
            puts_(b, "<｜tool▁output▁begin｜>");
            put_content(b, &m[i]);
            puts_(b, "<｜tool▁output▁end｜>");
        }
    }
    if (is_tool) puts_(b, "<｜tool▁outputs▁end｜>");
    if (gen && !is_tool) puts_(b, ct->think_open ? "<｜Assistant｜><think>\n" : "<｜Assistant｜>");
}

static void render_mistral(const moe_chat_template *ct, sbuf *b, const moe_chat_msg *m, size_t n) {
    /* Mixtral v0.1 raises on system messages; fold them into the first
     * user turn as Mistral's later templates do */
    puts_(b, ct->bos);
    bool sys_pending = false;
    size_t sys_i = 0;
    for (size_t i = 0; i < n; i++) {
        if (is(&m[i], "system")) {
            sys_pending = true;
            sys_i = i;
        } else if (is(&m[i], "user")) {
            puts_(b, "[INST] "); /* '[INST] ' + content + ' [/INST]' */
            if (sys_pending) {
                put_content(b, &m[sys_i]);
                puts_(b, "\n\n");
                sys_pending = false;
            }
            put_content(b, &m[i]);
            puts_(b, " [/INST]");
        } else if (is(&m[i], "assistant")) { /* content + eos_token */
            put_content(b, &m[i]);
            puts_(b, ct->eos);
        }
    }
}

/* mistral-common's v2/v3 instruct format, written so that tokenizing it
 * with parse_special gives mistral-common's ids: every stretch of text
 * between control tokens gets its own dummy prefix, which is where
 * Mistral's encoder puts its spaces. The system prompt goes in front of
 * the last user message. */
static void render_mistral_v3(const moe_chat_template *ct, sbuf *b, const moe_chat_msg *m, size_t n) {
    size_t last_user = n;
    for (size_t i = 0; i < n; i++)
        if (is(&m[i], "user")) last_user = i;
    puts_(b, ct->bos);
    for (size_t i = 0; i < n; i++) {
        if (is(&m[i], "user")) {
            puts_(b, "[INST]");
            if (i == last_user) {
                bool any = false;
                for (size_t j = 0; j < n; j++) {
                    if (!is(&m[j], "system")) continue;
                    if (any) puts_(b, "\n\n");
                    put_content(b, &m[j]);
                    any = true;
                }
                if (any) puts_(b, "\n\n");
            }
            put_content(b, &m[i]);
            puts_(b, "[/INST]");
        } else if (is(&m[i], "assistant")) {
            put_content(b, &m[i]);
            puts_(b, ct->eos);
        }
    }
}

static void render_llama3(const moe_chat_template *ct, sbuf *b, const moe_chat_msg *m, size_t n, bool gen) {
    for (size_t i = 0; i < n; i++) {
        /* (bos_token if first) + '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + content|trim + '<|eot_id|>' */
        if (i == 0) puts_(b, ct->bos);
        puts_(b, "<|start_header_id|>");
        puts_text(b, m[i].role);
        puts_(b, "<|end_header_id|>\n\n");
        size_t cl;
        char *c = content_dup(&m[i], &cl);
        if (!c) {
            b->oom = true;
            return;
        }
        put_trimmed(b, c, cl);
        free(c);
        puts_(b, "<|eot_id|>");
    }
    if (gen) puts_(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

int moe_chat_render_segs(const moe_chat_template *ct, const moe_chat_msg *msgs, size_t n, bool gen, char **out,
                         size_t *out_len, moe_tok_seg **segs, size_t *n_segs) {
    if (!ct || !out || (!msgs && n)) return MOE_EINVAL;
    *out = NULL;
    if (segs) *segs = NULL;
    if (n_segs) *n_segs = 0;
    for (size_t i = 0; i < n; i++) {
        if (!msgs[i].role) return MOE_EINVAL;
        if (!msgs[i].parts && !msgs[i].content && msgs[i].content_len) return MOE_EINVAL;
        for (size_t j = 0; msgs[i].parts && j < msgs[i].n_parts; j++)
            if (!msgs[i].parts[j].text && msgs[i].parts[j].len) return MOE_EINVAL;
    }
    sbuf b = {0};
    switch (ct->family) {
    case MOE_CHAT_DEEPSEEK2: render_deepseek2(ct, &b, msgs, n, gen); break;
    case MOE_CHAT_DEEPSEEK3: render_deepseek3(ct, &b, msgs, n, gen); break;
    case MOE_CHAT_MISTRAL: render_mistral(ct, &b, msgs, n); break;
    case MOE_CHAT_MISTRAL_V3: render_mistral_v3(ct, &b, msgs, n); break;
    case MOE_CHAT_LLAMA3: render_llama3(ct, &b, msgs, n, gen); break;
    default:
        render_chatml(ct, &b, msgs, n);
        if (gen) puts_(&b, "<|im_start|>assistant\n");
        break;
    }
    if (!b.oom && !b.p) b.p = calloc(1, 1);
    if (!b.oom && !b.segs && segs) b.segs = malloc(sizeof *b.segs); /* never NULL on success */
    if (b.oom || !b.p || (segs && !b.segs)) {
        free(b.p);
        free(b.segs);
        return MOE_ENOMEM;
    }
    *out = b.p;
    if (out_len) *out_len = b.n;
    if (segs) *segs = b.segs;
    else free(b.segs);
    if (n_segs) *n_segs = b.n_segs;
    return MOE_OK;
}

int moe_chat_render(const moe_chat_template *ct, const moe_chat_msg *msgs, size_t n, bool gen, char **out,
                    size_t *out_len) {
    return moe_chat_render_segs(ct, msgs, n, gen, out, out_len, NULL, NULL);
}
