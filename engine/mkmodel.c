/* mkmodel.c - writes random-weight GGUF models with llama.cpp's names and
 * keys, and a byte-level BPE vocabulary trained on an embedded text. */
#include "mkmodel.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf.h"
#include "hash.h"
#include "qblocks.h"
#include "quant.h"
#include "rng.h"

/* ---- presets ---- */

typedef enum fam { F_DEEPSEEK, F_QWEN, F_LLAMA } fam;

static const struct {
    const char *name, *gguf;
    moe_arch arch;
    bool moe;
    fam family;
} ARCHS[] = {
    {"deepseek2", "deepseek2", MOE_ARCH_DEEPSEEK2, true, F_DEEPSEEK},
    {"qwen2moe", "qwen2moe", MOE_ARCH_QWEN2MOE, true, F_QWEN},
    {"qwen3moe", "qwen3moe", MOE_ARCH_QWEN3MOE, true, F_QWEN},
    {"mixtral", "llama", MOE_ARCH_LLAMA, true, F_LLAMA},
    {"llama", "llama", MOE_ARCH_LLAMA, false, F_LLAMA},
    {"qwen2", "qwen2", MOE_ARCH_QWEN2, false, F_QWEN},
};
#define N_ARCHS (sizeof ARCHS / sizeof *ARCHS)

static int arch_index(const char *name) {
    for (size_t i = 0; name && i < N_ARCHS; i++)
        if (strcmp(name, ARCHS[i].name) == 0) return (int)i;
    return -1;
}

const char *moe_mkmodel_gguf_arch(const char *arch) {
    int i = arch_index(arch);
    return i < 0 ? NULL : ARCHS[i].gguf;
}

int moe_mkmodel_preset(const char *arch, const char *preset, moe_mkmodel_cfg *cfg, char *err, size_t errsz) {
    int ai = arch_index(arch);
    if (ai < 0) {
        return moe_seterr(err, errsz, MOE_EINVAL, "unknown --arch '%s' (deepseek2, qwen2moe, qwen3moe, mixtral, llama, qwen2)",
                          arch ? arch : "");
    }
    memset(cfg, 0, sizeof *cfg);
    snprintf(cfg->arch, sizeof cfg->arch, "%s", arch);
    cfg->type = MOE_TYPE_Q8_0;
    cfg->seed = 1;
    moe_hparams *hp = &cfg->hp;
    hp->arch = ARCHS[ai].arch;
    bool moe = ARCHS[ai].moe;
    hp->rope_freq_base = ARCHS[ai].family == F_QWEN ? 1000000.0 : 10000.0;
    hp->rms_eps = ARCHS[ai].family == F_LLAMA ? 1e-5f : 1e-6f;
    hp->rope_scaling_factor = 1.0;
    hp->expert_weights_scale = 1.0;
    hp->expert_gating_func = MOE_HP_GATING_SOFTMAX;
    hp->n_expert_group = hp->n_group_used = 1;
    if (preset && strcmp(preset, "tiny") == 0) {
        hp->n_embd = 64, hp->n_layer = 2, hp->n_head = 4, hp->n_head_kv = 2;
        hp->n_embd_head_k = hp->n_embd_head_v = hp->n_rot = 16;
        hp->n_ff = 128, hp->n_vocab = 512, hp->n_ctx_train = 512;
        if (moe) hp->n_expert = 8, hp->n_expert_used = 2, hp->n_ff_exp = 32;
        if (hp->arch == MOE_ARCH_LLAMA && moe) hp->n_ff = hp->n_ff_exp = 64;
        if (hp->arch == MOE_ARCH_QWEN2MOE) hp->n_ff_shexp = 64;
        if (hp->arch == MOE_ARCH_QWEN3MOE) hp->n_embd_head_k = hp->n_embd_head_v = hp->n_rot = 32;
        if (hp->arch == MOE_ARCH_DEEPSEEK2) {
            hp->n_layer = 3, hp->n_layer_dense_lead = 1, hp->n_head_kv = hp->n_head;
            hp->n_embd_head_qk_nope = 16, hp->n_rot = 16, hp->n_embd_head_v = 16;
            hp->q_lora_rank = 32, hp->kv_lora_rank = 32, hp->n_expert_shared = 1;
            hp->rope_scaling = MOE_ROPE_SCALING_YARN, hp->rope_scaling_factor = 4, hp->rope_orig_ctx = 128;
            hp->rope_yarn_log_mul = 0.0707;
        }
    } else if (preset && strcmp(preset, "demo") == 0) {
        hp->n_embd = 512, hp->n_layer = 4, hp->n_head = 8, hp->n_head_kv = 4;
        hp->n_embd_head_k = hp->n_embd_head_v = hp->n_rot = 64;
        hp->n_ff = 1536, hp->n_vocab = 4096, hp->n_ctx_train = 4096;
        if (moe) hp->n_expert = 16, hp->n_expert_used = 4, hp->n_ff_exp = 256;
        if (hp->arch == MOE_ARCH_LLAMA && moe) hp->n_ff = hp->n_ff_exp;
        if (hp->arch == MOE_ARCH_QWEN2MOE) hp->n_ff_shexp = 512;
        if (hp->arch == MOE_ARCH_DEEPSEEK2) {
            hp->n_layer_dense_lead = 1, hp->n_head_kv = hp->n_head;
            hp->n_embd_head_qk_nope = 64, hp->n_rot = 32, hp->n_embd_head_v = 64;
            hp->q_lora_rank = 0, hp->kv_lora_rank = 128, hp->n_expert_shared = 2;
            hp->rope_scaling = MOE_ROPE_SCALING_YARN, hp->rope_scaling_factor = 4, hp->rope_orig_ctx = 1024;
            hp->rope_yarn_log_mul = 0.0707;
        }
    } else if (preset && strcmp(preset, "v2-lite") == 0) {
        if (hp->arch != MOE_ARCH_DEEPSEEK2) {
            return moe_seterr(err, errsz, MOE_EINVAL, "preset v2-lite is a deepseek2 model (--arch deepseek2)");
        }
        /* DeepSeek-V2-Lite's config.json as llama.cpp converts it */
        hp->n_embd = 2048, hp->n_layer = 27, hp->n_head = 16, hp->n_head_kv = 16;
        hp->n_embd_head_qk_nope = 128, hp->n_rot = 64, hp->n_embd_head_v = 128;
        hp->n_ff = 10944, hp->n_vocab = 102400, hp->n_ctx_train = 163840;
        hp->n_expert = 64, hp->n_expert_used = 6, hp->n_ff_exp = 1408, hp->n_expert_shared = 2;
        hp->n_layer_dense_lead = 1, hp->q_lora_rank = 0, hp->kv_lora_rank = 512;
        hp->rope_scaling = MOE_ROPE_SCALING_YARN, hp->rope_scaling_factor = 40, hp->rope_orig_ctx = 4096;
        hp->rope_yarn_log_mul = 0.1 * 0.707; /* 0.1 * mscale_all_dim */
    } else {
        return moe_seterr(err, errsz, MOE_EINVAL, "unknown --preset '%s' (tiny, demo, v2-lite)", preset ? preset : "");
    }
    if (hp->arch == MOE_ARCH_DEEPSEEK2) hp->n_embd_head_k = hp->n_embd_head_qk_nope + hp->n_rot;
    if (hp->rope_scaling == MOE_ROPE_SCALING_NONE) hp->rope_orig_ctx = hp->n_ctx_train;
    return MOE_OK;
}

/* ---- byte-level BPE vocabulary ---- */

/* Training text: enough English prose and code that the common words and
 * identifiers of chat demos become single tokens. */
static const char TRAIN_TEXT[] =
    "The quick brown fox jumps over the lazy dog. A language model reads text as tokens and predicts the next "
    "token. This is a small model with random weights, made for tests and for the demo of the server. It does "
    "not know anything, but it runs the same code as a real model of the same architecture.\n"
    "Hello! How are you today? I am fine, thank you. What is your name? My name is Moed, and I am a server "
    "for mixture of experts models. Can you help me with this question? Yes, of course I can help you.\n"
    "The history of the world is the history of people, their ideas and the things they made. In the "
    "beginning there were small groups of people who lived by hunting and gathering. Later they learned to "
    "grow plants and to keep animals, and the first cities were built near the great rivers. Writing was "
    "invented to keep records of trade, and soon it was used for laws, stories and letters. The people of "
    "the ancient world looked at the stars and the moon, and they asked how the world was made and why "
    "things happen the way they do. These questions are still asked today by scientists and by children.\n"
    "Water is made of hydrogen and oxygen. The sun is a star, and the earth moves around the sun once a "
    "year. Light from the sun takes about eight minutes to reach the earth. There are many stars in the "
    "sky, and many of them have planets of their own.\n"
    "User: Write a function that returns the sum of a list of numbers.\n"
    "Assistant: Here is a simple function in Python that returns the sum of the numbers in a list:\n"
    "def sum_list(numbers):\n    total = 0\n    for number in numbers:\n        total += number\n"
    "    return total\n\nprint(sum_list([1, 2, 3, 4, 5]))\n"
    "import os\nimport sys\n\ndef main(args):\n    if len(args) < 2:\n        print(\"usage: main FILE\")\n"
    "        return 1\n    with open(args[1]) as f:\n        for line in f:\n            print(line.strip())\n"
    "    return 0\n\nif __name__ == \"__main__\":\n    sys.exit(main(sys.argv))\n"
    "#include <stdio.h>\n#include <stdlib.h>\n\nint main(int argc, char **argv) {\n    if (argc < 2) {\n"
    "        fprintf(stderr, \"usage: %s FILE\\n\", argv[0]);\n        return 1;\n    }\n"
    "    for (int i = 0; i < argc; i++) {\n        printf(\"%d: %s\\n\", i, argv[i]);\n    }\n"
    "    return 0;\n}\n\nstatic int add(int a, int b) {\n    return a + b;\n}\n"
    "const x = 42;\nlet name = \"world\";\nfunction hello(name) {\n    return \"Hello, \" + name + \"!\";\n}\n"
    "console.log(hello(name));\n"
    "The server speaks the OpenAI API, so any client that can talk to OpenAI can talk to this server. "
    "Send a request with a list of messages, and the server returns the answer of the model. The answer "
    "can be streamed, one token at a time, so that the user sees the text as it is written.\n"
    "In the morning the weather was cold and the sky was grey, but in the afternoon the sun came out and "
    "it was a warm and beautiful day. We went for a walk in the park and we saw many people with their "
    "dogs and their children. Then we went home and we had dinner with our friends.\n"
    "Question: What is the capital of France? Answer: The capital of France is Paris.\n"
    "Question: What is two plus two? Answer: Two plus two is four.\n"
    "Question: Who wrote this code? Answer: The code was written by a team of engineers.\n"
    "Thank you for your help. You are welcome. Good night, and see you tomorrow.\n";

/* GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to
 * U+0100 + n in byte order, so every token string is printable UTF-8. */
static void byte_map(char out[256][4]) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        unsigned cp = keep ? (unsigned)b : 256u + (unsigned)n++;
        if (cp < 0x80) {
            out[b][0] = (char)cp, out[b][1] = 0;
        } else {
            out[b][0] = (char)(0xC0 | (cp >> 6)), out[b][1] = (char)(0x80 | (cp & 0x3F)), out[b][2] = 0;
        }
    }
}

typedef struct word {
    int32_t *sym;
    int n;
    int count;
} word;

typedef struct vocab {
    char **tok;      /* (n_vocab) token strings (mapped) */
    int32_t *type;   /* (n_vocab) */
    char **merges;   /* (n_merges) "a b" */
    int64_t n_vocab, n_merges;
    int32_t bos, eos, pad, eot;
} vocab;

static void vocab_free(vocab *v) {
    for (int64_t i = 0; v->tok && i < v->n_vocab; i++) free(v->tok[i]);
    for (int64_t i = 0; v->merges && i < v->n_merges; i++) free(v->merges[i]);
    free(v->tok);
    free(v->type);
    free(v->merges);
    memset(v, 0, sizeof *v);
}

static int cls(unsigned char c) {
    if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') return 1;
    if (c >= '0' && c <= '9') return 2;
    if (c == ' ' || c == '\n' || c == '\t' || c == '\r') return 3;
    return 4;
}

/* Splits the text GPT-2 style (an optional leading space, then a run of
 * letters, digits or punctuation; whitespace runs alone) and collects the
 * distinct words with their counts. */
static int collect_words(word **out, int *n_out) {
    int cap = 1024, n = 0;
    word *w = calloc((size_t)cap, sizeof *w);
    if (!w) return MOE_ENOMEM;
    const unsigned char *p = (const unsigned char *)TRAIN_TEXT;
    size_t len = sizeof TRAIN_TEXT - 1, i = 0;
    while (i < len) {
        size_t s = i;
        if (p[i] == ' ' && i + 1 < len && cls(p[i + 1]) != 3) i++;
        int c = cls(p[i]);
        while (i < len && cls(p[i]) == c && i - s < 32) i++;
        int wl = (int)(i - s);
        int k;
        for (k = 0; k < n; k++) {
            if (w[k].n != wl) continue;
            int j = 0;
            while (j < wl && w[k].sym[j] == p[s + (size_t)j]) j++;
            if (j == wl) break;
        }
        if (k < n) {
            w[k].count++;
            continue;
        }
        if (n == cap) {
            word *nw = realloc(w, (size_t)cap * 2 * sizeof *w);
            if (!nw) goto oom;
            w = nw, cap *= 2;
        }
        w[n].sym = malloc((size_t)wl * sizeof(int32_t));
        if (!w[n].sym) goto oom;
        for (int j = 0; j < wl; j++) w[n].sym[j] = p[s + (size_t)j];
        w[n].n = wl, w[n].count = 1;
        n++;
    }
    *out = w, *n_out = n;
    return MOE_OK;
oom:
    for (int k = 0; k < n; k++) free(w[k].sym);
    free(w);
    return MOE_ENOMEM;
}

static char *cat2(const char *a, const char *sep, const char *b) {
    size_t la = strlen(a), ls = strlen(sep), lb = strlen(b);
    char *s = malloc(la + ls + lb + 1);
    if (s) memcpy(s, a, la), memcpy(s + la, sep, ls), memcpy(s + la + ls, b, lb + 1);
    return s;
}

/* Learns up to max_merges merges, greedy by count, ties to the smallest
 * pair of ids so the result is fixed. Pairs seen once are merged too
 * (after all the frequent ones), so with room every word of the text
 * ends up a single token. */
static int train_bpe(vocab *v, int64_t max_merges, char bm[256][4]) {
    word *w = NULL;
    int nw = 0;
    int rc = collect_words(&w, &nw);
    if (rc) return rc;
    for (int b = 0; b < 256; b++)
        if (!(v->tok[b] = strdup(bm[b]))) rc = MOE_ENOMEM;
    const size_t HS = 1 << 15;
    uint64_t *hk = malloc(HS * sizeof *hk);
    int64_t *hc = malloc(HS * sizeof *hc);
    v->merges = calloc((size_t)(max_merges > 0 ? max_merges : 1), sizeof(char *));
    if (!hk || !hc || !v->merges) rc = MOE_ENOMEM;
    int64_t next = 256;
    while (!rc && v->n_merges < max_merges) {
        memset(hk, 0xff, HS * sizeof *hk);
        uint64_t best = UINT64_MAX;
        int64_t bestc = 0;
        for (int k = 0; k < nw; k++)
            for (int j = 0; j + 1 < w[k].n; j++) {
                uint64_t key = (uint64_t)(uint32_t)w[k].sym[j] << 32 | (uint32_t)w[k].sym[j + 1];
                size_t h = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 49) & (HS - 1);
                while (hk[h] != UINT64_MAX && hk[h] != key) h = (h + 1) & (HS - 1);
                if (hk[h] == UINT64_MAX) hk[h] = key, hc[h] = 0;
                hc[h] += w[k].count;
                if (hc[h] > bestc || (hc[h] == bestc && key < best)) best = key, bestc = hc[h];
            }
        if (best == UINT64_MAX) break;
        int32_t a = (int32_t)(best >> 32), b = (int32_t)(best & 0xffffffffu);
        char *t = cat2(v->tok[a], "", v->tok[b]);
        char *m = cat2(v->tok[a], " ", v->tok[b]);
        if (!t || !m) {
            free(t), free(m);
            rc = MOE_ENOMEM;
            break;
        }
        v->tok[next] = t;
        v->merges[v->n_merges++] = m;
        for (int k = 0; k < nw; k++) {
            int o = 0;
            for (int j = 0; j < w[k].n; j++) {
                if (j + 1 < w[k].n && w[k].sym[j] == a && w[k].sym[j + 1] == b) w[k].sym[o++] = (int32_t)next, j++;
                else w[k].sym[o++] = w[k].sym[j];
            }
            w[k].n = o;
        }
        next++;
    }
    for (int k = 0; k < nw; k++) free(w[k].sym);
    free(w);
    free(hk);
    free(hc);
    return rc;
}

static const char *const SPECIAL_DEEPSEEK[] = {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", NULL};
static const char *const SPECIAL_QWEN[] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>", NULL};
static const char *const SPECIAL_LLAMA[] = {"<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                            "<|end_header_id|>", "<|eot_id|>", NULL};

static const char *const *family_specials(fam f) {
    return f == F_DEEPSEEK ? SPECIAL_DEEPSEEK : f == F_QWEN ? SPECIAL_QWEN : SPECIAL_LLAMA;
}

static int n_specials(fam f) {
    int n = 0;
    for (const char *const *s = family_specials(f); *s; s++) n++;
    return n;
}

/* Inserts s into an open-addressed set of (cap, a power of two) slots;
 * false when it was there already. */
static bool set_add(const char **set, size_t cap, const char *s) {
    size_t h = (size_t)moe_hash_bytes(s, strlen(s)) & (cap - 1);
    for (; set[h]; h = (h + 1) & (cap - 1))
        if (!strcmp(set[h], s)) return false;
    set[h] = s;
    return true;
}

/* Ids from `from` to n_vocab - 1. A corpus this small learns a few
 * hundred merges, so most of a 4k..100k vocabulary is left over. Those
 * ids become NORMAL tokens whose text is two learned tokens joined, a
 * space-led one first ("Ġthe" + "ory"): no merge produces them, so
 * encoding is unchanged, but a random model that samples one prints a
 * visible word instead of nothing - the demo reads like text and the
 * streaming benchmarks see a delta per token, as with a real model.
 * When the pairs run out the rest are "[PADn]" UNUSED tokens. */
static int fill_words(vocab *v, int64_t from, int64_t n_vocab) {
    int64_t first = 256, last = 256 + v->n_merges;
    size_t cap = 1;
    while (cap < 2 * (size_t)n_vocab) cap <<= 1;
    const char **set = calloc(cap, sizeof *set);
    if (!set) return MOE_ENOMEM;
    for (int64_t i = 0; i < from; i++) set_add(set, cap, v->tok[i]);
    int64_t id = from;
    static const char lead[] = "\xc4\xa0"; /* "Ġ", the byte-level space */
    for (int64_t b = first; b < last && id < n_vocab; b++) {
        if (!strncmp(v->tok[b], lead, 2)) continue;
        for (int64_t a = first; a < last && id < n_vocab; a++) {
            if (strncmp(v->tok[a], lead, 2) || strlen(v->tok[a]) < 4) continue;
            char *t = cat2(v->tok[a], "", v->tok[b]);
            if (!t) {
                free(set);
                return MOE_ENOMEM;
            }
            if (!set_add(set, cap, t)) {
                free(t);
                continue;
            }
            v->tok[id] = t;
            v->type[id++] = 1; /* NORMAL */
        }
    }
    free(set);
    for (; id < n_vocab; id++) {
        char buf[32];
        snprintf(buf, sizeof buf, "[PAD%lld]", (long long)id);
        if (!(v->tok[id] = strdup(buf))) return MOE_ENOMEM;
        v->type[id] = 5; /* UNUSED */
    }
    return MOE_OK;
}

/* Layout: 256 byte tokens, the learned merges, the family's specials
 * (CONTROL), then the filler words of fill_words() up to n_vocab - the
 * same order as the real vocabularies, whose specials follow the BPE
 * tokens. */
static int build_vocab(vocab *v, fam f, int64_t n_vocab) {
    memset(v, 0, sizeof *v);
    int ns = n_specials(f);
    v->n_vocab = n_vocab;
    v->tok = calloc((size_t)n_vocab, sizeof(char *));
    v->type = calloc((size_t)n_vocab, sizeof(int32_t));
    if (!v->tok || !v->type) return MOE_ENOMEM;
    char bm[256][4];
    byte_map(bm);
    int rc = train_bpe(v, n_vocab - 256 - ns, bm);
    if (rc) return rc;
    int64_t id = 256 + v->n_merges;
    for (int64_t i = 0; i < id; i++) v->type[i] = 1; /* NORMAL */
    int64_t first_special = id;
    for (const char *const *s = family_specials(f); *s; s++, id++) {
        if (!(v->tok[id] = strdup(*s))) return MOE_ENOMEM;
        v->type[id] = 3; /* CONTROL */
    }
    if ((rc = fill_words(v, id, n_vocab))) return rc;
    int32_t s0 = (int32_t)first_special;
    v->eot = -1;
    switch (f) {
    case F_DEEPSEEK: v->bos = s0, v->eos = s0 + 1, v->pad = s0 + 1; break;
    case F_QWEN: v->bos = s0, v->eos = s0 + 2, v->pad = s0; break;
    case F_LLAMA: v->bos = s0, v->eos = s0 + 4, v->pad = -1, v->eot = s0 + 4; break;
    }
    return MOE_OK;
}

/* Our own short templates in each family's format (chat_template.c
 * recognises them by the same markers as the real ones). */
static const char TMPL_DEEPSEEK[] =
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";
static const char TMPL_CHATML[] =
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
static const char TMPL_LLAMA3[] =
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/* ---- tensors ---- */

enum init { I_ONE, I_RAND };

typedef struct tdesc {
    char name[64];
    uint32_t nd;
    int64_t ne[3];
    int type;
    enum init init;
    float amp; /* uniform in [-amp, amp] */
} tdesc;

typedef struct tlist {
    tdesc *t;
    size_t n, cap;
    int mtype; /* requested matrix type */
    int64_t n_layer;
} tlist;

/* kinds for add(): how the tensor is initialised and typed */
enum kind { K_NORM, K_BIAS, K_ROUTER, K_MAT, K_OUTPROJ, K_EMBD };

static int add(tlist *l, enum kind k, const char *name, int64_t e0, int64_t e1, int64_t e2) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        tdesc *nt = realloc(l->t, cap * sizeof *nt);
        if (!nt) return MOE_ENOMEM;
        l->t = nt, l->cap = cap;
    }
    tdesc *t = &l->t[l->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ne[0] = e0, t->ne[1] = e1, t->ne[2] = e2;
    t->nd = e2 > 1 ? 3 : (k == K_NORM || k == K_BIAS) ? 1 : 2;
    t->init = k == K_NORM ? I_ONE : I_RAND;
    bool f32 = k == K_NORM || k == K_BIAS || k == K_ROUTER;
    t->type = f32 ? MOE_TYPE_F32 : l->mtype;
    if (e0 % moe_type_get(t->type)->blck) t->type = MOE_TYPE_F16;
    double fan = (double)e0;
    switch (k) {
    case K_NORM: t->amp = 1; break;
    case K_BIAS: t->amp = 0.02f; break;
    case K_EMBD: t->amp = (float)sqrt(3.0); break;
    case K_ROUTER:
    case K_MAT: t->amp = (float)sqrt(3.0 / fan); break;
    case K_OUTPROJ: t->amp = (float)(sqrt(3.0 / fan) / sqrt(2.0 * (double)l->n_layer)); break;
    }
    return MOE_OK;
}

static int build_tensors(const moe_mkmodel_cfg *c, tlist *l) {
    const moe_hparams *hp = &c->hp;
    const int64_t E = hp->n_embd, H = hp->n_head, Hkv = hp->n_head_kv, dk = hp->n_embd_head_k,
                  dv = hp->n_embd_head_v, X = hp->n_expert;
    char n[64];
#define A(kind, s, e0, e1, e2)                                                                                     \
    do {                                                                                                           \
        snprintf(n, sizeof n, "blk.%lld.%s", (long long)il, s);                                                   \
        MOE_TRY(add(l, kind, n, e0, e1, e2));                                                                      \
    } while (0)
    int rc = add(l, K_EMBD, "token_embd.weight", E, hp->n_vocab, 1);
    if (rc) return rc;
    for (int64_t il = 0; il < hp->n_layer; il++) {
        A(K_NORM, "attn_norm.weight", E, 1, 1);
        if (hp->arch == MOE_ARCH_DEEPSEEK2) {
            int64_t r = hp->kv_lora_rank, nope = hp->n_embd_head_qk_nope;
            if (hp->q_lora_rank > 0) {
                A(K_MAT, "attn_q_a.weight", E, hp->q_lora_rank, 1);
                A(K_NORM, "attn_q_a_norm.weight", hp->q_lora_rank, 1, 1);
                A(K_MAT, "attn_q_b.weight", hp->q_lora_rank, H * dk, 1);
            } else {
                A(K_MAT, "attn_q.weight", E, H * dk, 1);
            }
            A(K_MAT, "attn_kv_a_mqa.weight", E, r + hp->n_rot, 1);
            A(K_NORM, "attn_kv_a_norm.weight", r, 1, 1);
            A(K_MAT, "attn_kv_b.weight", r, H * (nope + dv), 1);
        } else {
            A(K_MAT, "attn_q.weight", E, H * dk, 1);
            A(K_MAT, "attn_k.weight", E, Hkv * dk, 1);
            A(K_MAT, "attn_v.weight", E, Hkv * dv, 1);
            if (hp->arch == MOE_ARCH_QWEN2 || hp->arch == MOE_ARCH_QWEN2MOE) {
                A(K_BIAS, "attn_q.bias", H * dk, 1, 1);
                A(K_BIAS, "attn_k.bias", Hkv * dk, 1, 1);
                A(K_BIAS, "attn_v.bias", Hkv * dv, 1, 1);
            }
            if (hp->arch == MOE_ARCH_QWEN3MOE) {
                A(K_NORM, "attn_q_norm.weight", dk, 1, 1);
                A(K_NORM, "attn_k_norm.weight", dk, 1, 1);
            }
        }
        A(K_OUTPROJ, "attn_output.weight", H * dv, E, 1);
        A(K_NORM, "ffn_norm.weight", E, 1, 1);
        if (!hp->is_moe || il < hp->n_layer_dense_lead) {
            A(K_MAT, "ffn_gate.weight", E, hp->n_ff, 1);
            A(K_MAT, "ffn_up.weight", E, hp->n_ff, 1);
            A(K_OUTPROJ, "ffn_down.weight", hp->n_ff, E, 1);
            continue;
        }
        A(K_ROUTER, "ffn_gate_inp.weight", E, X, 1);
        /* DeepSeek-V3's selection bias comes with sigmoid gating */
        if (hp->arch == MOE_ARCH_DEEPSEEK2 && hp->expert_gating_func == MOE_HP_GATING_SIGMOID)
            A(K_BIAS, "exp_probs_b.bias", X, 1, 1);
        A(K_MAT, "ffn_gate_exps.weight", E, hp->n_ff_exp, X);
        A(K_MAT, "ffn_up_exps.weight", E, hp->n_ff_exp, X);
        A(K_OUTPROJ, "ffn_down_exps.weight", hp->n_ff_exp, E, X);
        if (hp->n_ff_shexp > 0) {
            A(K_MAT, "ffn_gate_shexp.weight", E, hp->n_ff_shexp, 1);
            A(K_MAT, "ffn_up_shexp.weight", E, hp->n_ff_shexp, 1);
            A(K_OUTPROJ, "ffn_down_shexp.weight", hp->n_ff_shexp, E, 1);
            if (hp->arch == MOE_ARCH_QWEN2MOE) A(K_BIAS, "ffn_gate_inp_shexp.weight", E, 1, 1);
        }
    }
#undef A
    if ((rc = add(l, K_NORM, "output_norm.weight", E, 1, 1))) return rc;
    return add(l, K_MAT, "output.weight", E, hp->n_vocab, 1);
}

/* Rows [r0, r1) of tensor t, generated and encoded into qbuf (row r at
 * (r - base) * rs). Each row has its own stream seeded from (tensor seed,
 * row), so the bytes do not depend on how rows are split over threads. */
typedef struct gen_job {
    const tdesc *t;
    uint64_t tseed;
    int64_t base, r0, r1;
    float *fbuf; /* (r1 - r0, ne[0]) scratch of this job */
    char *qbuf;
    int rc;
} gen_job;

static void *gen_rows(void *arg) {
    gen_job *j = arg;
    const tdesc *t = j->t;
    int64_t n0 = t->ne[0];
    size_t rs = moe_row_size(t->type, n0);
    const float scale = t->amp * (2.0f / 16777216.0f);
    for (int64_t row = j->r0; row < j->r1 && !j->rc; row++) {
        float *f = j->fbuf + (row - j->r0) * n0;
        if (t->init == I_ONE) {
            for (int64_t i = 0; i < n0; i++) f[i] = 1.0f;
        } else {
            moe_rng rng;
            moe_rng_seed(&rng, j->tseed ^ ((uint64_t)row * 0xD1B54A32D192ED03ull));
            for (int64_t i = 0; i < n0; i++) {
                uint64_t r = moe_rng_next(&rng);
                f[i] = (float)(int32_t)((r >> 40) - (1u << 23)) * scale; /* uniform in [-amp, amp) */
            }
        }
        j->rc = moe_quantize_row(t->type, f, j->qbuf + (size_t)(row - j->base) * rs, n0);
    }
    return NULL;
}

#define MAX_GEN_THREADS 64

static int write_tensor(moe_gguf_writer *w, const tdesc *t, uint64_t seed, float *fbuf, char *qbuf,
                        int64_t chunk_elems, int n_threads) {
    uint64_t s = seed ^ moe_hash_fixed(t->name, strlen(t->name)); /* the same weights in every run */
    uint64_t tseed = moe_splitmix64(&s);
    int64_t n0 = t->ne[0], rows = t->ne[1] * t->ne[2];
    int64_t per = chunk_elems / n0 > 0 ? chunk_elems / n0 : 1;
    size_t rs = moe_row_size(t->type, n0);
    for (int64_t r0 = 0; r0 < rows; r0 += per) {
        int64_t nr = rows - r0 < per ? rows - r0 : per;
        int nt = n_threads;
        if ((int64_t)nt > nr) nt = (int)nr;
        if (nr * n0 < ((int64_t)1 << 16)) nt = 1; /* not worth a thread */
        gen_job jobs[MAX_GEN_THREADS];
        pthread_t tid[MAX_GEN_THREADS];
        bool started[MAX_GEN_THREADS] = {false};
        for (int k = 0; k < nt; k++) {
            int64_t a = r0 + nr * k / nt, b = r0 + nr * (k + 1) / nt;
            jobs[k] = (gen_job){t, tseed, r0, a, b, fbuf + (a - r0) * n0, qbuf, 0};
            if (k > 0) started[k] = pthread_create(&tid[k], NULL, gen_rows, &jobs[k]) == 0;
            if (k > 0 && !started[k]) gen_rows(&jobs[k]); /* no thread: do it here */
        }
        gen_rows(&jobs[0]);
        int rc = MOE_OK;
        for (int k = 0; k < nt; k++) {
            if (started[k]) pthread_join(tid[k], NULL);
            if (jobs[k].rc && !rc) rc = jobs[k].rc;
        }
        if (!rc) rc = moe_gguf_writer_write_tensor(w, qbuf, (size_t)nr * rs);
        if (rc) return rc;
    }
    return MOE_OK;
}

static int file_type_of(int t) {
    switch (t) { /* llama_ftype */
    case MOE_TYPE_F32: return 0;
    case MOE_TYPE_F16: return 1;
    case MOE_TYPE_Q4_0: return 2;
    case MOE_TYPE_Q8_0: return 7;
    case MOE_TYPE_BF16: return 32;
    default: return 0;
    }
}

static int validate(moe_mkmodel_cfg *c, char *err, size_t errsz) {
    moe_hparams *hp = &c->hp;
    int ai = arch_index(c->arch);
    if (ai < 0) {
        return moe_seterr(err, errsz, MOE_EINVAL, "unknown arch '%s'", c->arch);
    }
    hp->arch = ARCHS[ai].arch;
    if (c->type != MOE_TYPE_F32 && c->type != MOE_TYPE_F16 && c->type != MOE_TYPE_BF16 &&
        c->type != MOE_TYPE_Q8_0 && c->type != MOE_TYPE_Q4_0) {
        return moe_seterr(err, errsz, MOE_EINVAL, "--type %s: use F32, F16, BF16, Q8_0 or Q4_0", moe_type_name(c->type));
    }
    const int64_t M = (int64_t)1 << 20;
#define RANGE(v, lo, hi, what)                                                                                     \
    if ((v) < (lo) || (v) > (hi))                                                                                  \
    return moe_seterr(err, errsz, MOE_EINVAL, "%s = %lld is out of range [%lld, %lld]", what, (long long)(v),      \
                      (long long)(lo), (long long)(hi))
    RANGE(hp->n_layer, 1, 1024, "layers");
    RANGE(hp->n_embd, 1, M, "embd");
    RANGE(hp->n_head, 1, 4096, "heads");
    RANGE(hp->n_head_kv, 1, hp->n_head, "heads-kv");
    if (hp->n_head % hp->n_head_kv) {
        return moe_seterr(err, errsz, MOE_EINVAL, "heads %lld is not a multiple of heads-kv %lld", (long long)hp->n_head,
                          (long long)hp->n_head_kv);
    }
    RANGE(hp->n_ctx_train, 1, (int64_t)1 << 30, "ctx");
    int ns = n_specials(ARCHS[ai].family);
    RANGE(hp->n_vocab, 256 + ns, 1 << 24, "vocab");
    RANGE(hp->n_ff, 1, M, "ff");
    if (hp->arch == MOE_ARCH_DEEPSEEK2) {
        RANGE(hp->n_embd_head_qk_nope, 1, 4096, "qk-nope");
        RANGE(hp->n_rot, 2, 4096, "qk-rope");
        RANGE(hp->kv_lora_rank, 1, M, "kv-lora");
        RANGE(hp->q_lora_rank, 0, M, "q-lora");
        hp->n_embd_head_k = hp->n_embd_head_qk_nope + hp->n_rot;
    } else {
        RANGE(hp->n_embd_head_k, 2, 4096, "head dim");
        if (hp->arch != MOE_ARCH_QWEN3MOE) hp->n_embd_head_v = hp->n_embd_head_k;
        hp->n_rot = hp->n_embd_head_k;
    }
    RANGE(hp->n_embd_head_v, 1, 4096, "v head dim");
    if (hp->n_rot & 1) {
        return moe_seterr(err, errsz, MOE_EINVAL, "rope dimension %lld is odd", (long long)hp->n_rot);
    }
    hp->is_moe = ARCHS[ai].moe;
    if (hp->is_moe) {
        RANGE(hp->n_expert, 1, 4096, "experts");
        RANGE(hp->n_expert_used, 1, hp->n_expert, "experts-used");
        RANGE(hp->n_ff_exp, 1, M, "ff-exp");
        /* Mixtral's expert width is its feed_forward_length: --ff-exp wins */
        if (hp->arch == MOE_ARCH_LLAMA) hp->n_ff = hp->n_ff_exp;
        if (hp->arch == MOE_ARCH_DEEPSEEK2) {
            RANGE(hp->n_expert_shared, 0, 64, "shared");
            RANGE(hp->n_layer_dense_lead, 0, hp->n_layer, "dense-lead");
            RANGE(hp->expert_gating_func, 1, 2, "gating");
            RANGE(hp->n_expert_group, 1, hp->n_expert, "groups");
            RANGE(hp->n_group_used, 1, hp->n_expert_group, "groups-used");
            if (hp->n_expert % hp->n_expert_group) {
                return moe_seterr(err, errsz, MOE_EINVAL, "experts %lld is not a multiple of groups %lld", (long long)hp->n_expert,
                                  (long long)hp->n_expert_group);
            }
            if (!(hp->expert_weights_scale > 0 && hp->expert_weights_scale < 1e3)) {
                return moe_seterr(err, errsz, MOE_EINVAL, "routed-scale %g is out of range", hp->expert_weights_scale);
            }
            hp->n_ff_shexp = hp->n_ff_exp * hp->n_expert_shared;
        } else if (hp->arch == MOE_ARCH_QWEN2MOE) {
            RANGE(hp->n_ff_shexp, 1, M, "ff-shexp");
        } else {
            hp->n_ff_shexp = 0;
        }
        if (hp->arch != MOE_ARCH_DEEPSEEK2) {
            /* the loader's fixed routing for these families */
            hp->n_layer_dense_lead = 0, hp->n_expert_shared = 0, hp->expert_gating_func = MOE_HP_GATING_SOFTMAX;
            hp->n_expert_group = hp->n_group_used = 1, hp->expert_weights_scale = 1.0;
        }
    } else {
        hp->n_expert = hp->n_expert_used = hp->n_ff_exp = hp->n_ff_shexp = 0;
        hp->n_expert_shared = hp->n_layer_dense_lead = 0;
    }
    if (hp->arch != MOE_ARCH_DEEPSEEK2) hp->q_lora_rank = hp->kv_lora_rank = hp->n_embd_head_qk_nope = 0;
    hp->has_q_lora = hp->q_lora_rank > 0;
    hp->has_qkv_bias = hp->arch == MOE_ARCH_QWEN2 || hp->arch == MOE_ARCH_QWEN2MOE;
    hp->has_qk_norm = hp->arch == MOE_ARCH_QWEN3MOE;
    hp->tied_output = false;
    hp->mla_split_kv_b = false;
    if (hp->rope_scaling == MOE_ROPE_SCALING_NONE) hp->rope_scaling_factor = 1.0, hp->rope_orig_ctx = hp->n_ctx_train;
    switch (hp->arch) { /* what the loader derives for these families */
    case MOE_ARCH_LLAMA:
    case MOE_ARCH_QWEN3MOE: hp->expert_weights_norm = hp->is_moe; break;
    case MOE_ARCH_QWEN2MOE: hp->expert_weights_norm = false; break;
    default: break;
    }
    if (!hp->is_moe) {
        hp->expert_weights_norm = false, hp->expert_weights_scale = 0, hp->expert_gating_func = 0;
        hp->n_expert_group = hp->n_group_used = 0;
    }
#undef RANGE
    return MOE_OK;
}

#define KEY(suffix) (snprintf(key, sizeof key, "%s.%s", ga, suffix), key)

static int write_meta(moe_gguf_writer *w, const moe_mkmodel_cfg *c, const vocab *v) {
    const moe_hparams *hp = &c->hp;
    const char *ga = moe_mkmodel_gguf_arch(c->arch);
    fam f = ARCHS[arch_index(c->arch)].family;
    char key[128], name[96];
    int rc = 0;
    snprintf(name, sizeof name, "moed random %s", c->arch);
    rc |= moe_gguf_writer_set_str(w, "general.architecture", ga);
    rc |= moe_gguf_writer_set_str(w, "general.name", name);
    rc |= moe_gguf_writer_set_u32(w, "general.file_type", (uint32_t)file_type_of(c->type));
    rc |= moe_gguf_writer_set_u32(w, "general.quantization_version", 2);
    rc |= moe_gguf_writer_set_u32(w, KEY("block_count"), (uint32_t)hp->n_layer);
    rc |= moe_gguf_writer_set_u32(w, KEY("context_length"), (uint32_t)hp->n_ctx_train);
    rc |= moe_gguf_writer_set_u32(w, KEY("embedding_length"), (uint32_t)hp->n_embd);
    rc |= moe_gguf_writer_set_u32(w, KEY("feed_forward_length"), (uint32_t)hp->n_ff);
    rc |= moe_gguf_writer_set_u32(w, KEY("attention.head_count"), (uint32_t)hp->n_head);
    rc |= moe_gguf_writer_set_u32(w, KEY("attention.head_count_kv"), (uint32_t)hp->n_head_kv);
    rc |= moe_gguf_writer_set_f32(w, KEY("attention.layer_norm_rms_epsilon"), hp->rms_eps);
    rc |= moe_gguf_writer_set_f32(w, KEY("rope.freq_base"), (float)hp->rope_freq_base);
    rc |= moe_gguf_writer_set_u32(w, KEY("rope.dimension_count"), (uint32_t)hp->n_rot);
    rc |= moe_gguf_writer_set_u32(w, KEY("vocab_size"), (uint32_t)hp->n_vocab);
    if (hp->arch == MOE_ARCH_DEEPSEEK2 || hp->arch == MOE_ARCH_QWEN3MOE ||
        hp->n_embd_head_k != hp->n_embd / hp->n_head) {
        rc |= moe_gguf_writer_set_u32(w, KEY("attention.key_length"), (uint32_t)hp->n_embd_head_k);
        rc |= moe_gguf_writer_set_u32(w, KEY("attention.value_length"), (uint32_t)hp->n_embd_head_v);
    }
    if (hp->rope_scaling != MOE_ROPE_SCALING_NONE) {
        rc |= moe_gguf_writer_set_str(w, KEY("rope.scaling.type"),
                                      hp->rope_scaling == MOE_ROPE_SCALING_YARN ? "yarn" : "linear");
        rc |= moe_gguf_writer_set_f32(w, KEY("rope.scaling.factor"), (float)hp->rope_scaling_factor);
        rc |= moe_gguf_writer_set_u32(w, KEY("rope.scaling.original_context_length"), (uint32_t)hp->rope_orig_ctx);
        if (hp->rope_scaling == MOE_ROPE_SCALING_YARN)
            rc |= moe_gguf_writer_set_f32(w, KEY("rope.scaling.yarn_log_multiplier"), (float)hp->rope_yarn_log_mul);
    }
    if (hp->is_moe) {
        rc |= moe_gguf_writer_set_u32(w, KEY("expert_count"), (uint32_t)hp->n_expert);
        rc |= moe_gguf_writer_set_u32(w, KEY("expert_used_count"), (uint32_t)hp->n_expert_used);
        if (hp->arch != MOE_ARCH_LLAMA)
            rc |= moe_gguf_writer_set_u32(w, KEY("expert_feed_forward_length"), (uint32_t)hp->n_ff_exp);
        if (hp->arch == MOE_ARCH_QWEN2MOE)
            rc |= moe_gguf_writer_set_u32(w, KEY("expert_shared_feed_forward_length"), (uint32_t)hp->n_ff_shexp);
    }
    if (hp->arch == MOE_ARCH_DEEPSEEK2) {
        rc |= moe_gguf_writer_set_u32(w, KEY("leading_dense_block_count"), (uint32_t)hp->n_layer_dense_lead);
        if (hp->q_lora_rank > 0) rc |= moe_gguf_writer_set_u32(w, KEY("attention.q_lora_rank"), (uint32_t)hp->q_lora_rank);
        rc |= moe_gguf_writer_set_u32(w, KEY("attention.kv_lora_rank"), (uint32_t)hp->kv_lora_rank);
        rc |= moe_gguf_writer_set_u32(w, KEY("expert_shared_count"), (uint32_t)hp->n_expert_shared);
        rc |= moe_gguf_writer_set_f32(w, KEY("expert_weights_scale"), (float)hp->expert_weights_scale);
        rc |= moe_gguf_writer_set_bool(w, KEY("expert_weights_norm"), hp->expert_weights_norm);
        rc |= moe_gguf_writer_set_u32(w, KEY("expert_gating_func"), (uint32_t)hp->expert_gating_func);
        if (hp->n_expert_group > 1) {
            rc |= moe_gguf_writer_set_u32(w, KEY("expert_group_count"), (uint32_t)hp->n_expert_group);
            rc |= moe_gguf_writer_set_u32(w, KEY("expert_group_used_count"), (uint32_t)hp->n_group_used);
        }
    }
    /* tokenizer */
    rc |= moe_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2");
    rc |= moe_gguf_writer_set_str(w, "tokenizer.ggml.pre",
                                  f == F_DEEPSEEK ? "deepseek-llm" : f == F_QWEN ? "qwen2" : "llama-bpe");
    if (rc) return MOE_ENOMEM;
    if ((rc = moe_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)v->tok,
                                          (uint64_t)v->n_vocab)))
        return rc;
    if ((rc = moe_gguf_writer_set_arr(w, "tokenizer.ggml.token_type", MOE_GGUF_INT32, v->type, (uint64_t)v->n_vocab)))
        return rc;
    if ((rc = moe_gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", (const char *const *)v->merges,
                                          (uint64_t)v->n_merges)))
        return rc;
    rc |= moe_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)v->bos);
    rc |= moe_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)v->eos);
    if (v->pad >= 0) rc |= moe_gguf_writer_set_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)v->pad);
    if (v->eot >= 0) rc |= moe_gguf_writer_set_u32(w, "tokenizer.ggml.eot_token_id", (uint32_t)v->eot);
    rc |= moe_gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", f != F_QWEN);
    rc |= moe_gguf_writer_set_bool(w, "tokenizer.ggml.add_eos_token", false);
    rc |= moe_gguf_writer_set_str(w, "tokenizer.chat_template",
                                  f == F_DEEPSEEK ? TMPL_DEEPSEEK : f == F_QWEN ? TMPL_CHATML : TMPL_LLAMA3);
    return rc ? MOE_ENOMEM : MOE_OK;
}
#undef KEY

int moe_mkmodel_write(const moe_mkmodel_cfg *cfg_in, const char *path, char *err, size_t errsz) {
    if (!cfg_in || !path) return MOE_EINVAL;
    if (err && errsz) err[0] = 0;
    moe_mkmodel_cfg cfg = *cfg_in;
    int rc = validate(&cfg, err, errsz);
    if (rc) return rc;
    vocab v;
    tlist tl = {.mtype = cfg.type, .n_layer = cfg.hp.n_layer};
    moe_gguf_writer *w = NULL;
    const int64_t CHUNK = (int64_t)1 << 22; /* floats per generated chunk (16 MB) */
    float *fbuf = NULL;
    char *qbuf = NULL;
    rc = build_vocab(&v, ARCHS[arch_index(cfg.arch)].family, cfg.hp.n_vocab);
    if (!rc) rc = build_tensors(&cfg, &tl);
    if (!rc && !(w = moe_gguf_writer_new())) rc = MOE_ENOMEM;
    if (!rc) rc = write_meta(w, &cfg, &v);
    vocab_free(&v); /* the writer holds its own copies */
    int64_t maxrow = 0;
    for (size_t i = 0; !rc && i < tl.n; i++) {
        rc = moe_gguf_writer_add_tensor(w, tl.t[i].name, (moe_type)tl.t[i].type, tl.t[i].nd, tl.t[i].ne);
        if (tl.t[i].ne[0] > maxrow) maxrow = tl.t[i].ne[0];
    }
    int64_t cap = maxrow > CHUNK ? maxrow : CHUNK;
    if (!rc) {
        fbuf = malloc((size_t)cap * sizeof(float));
        qbuf = malloc((size_t)cap * sizeof(float)); /* any type's row is at most 4 bytes an element */
        if (!fbuf || !qbuf) rc = MOE_ENOMEM;
    }
    if (!rc && (rc = moe_gguf_writer_begin(w, path)) != MOE_OK) moe_seterr(err, errsz, rc, "cannot create '%s'", path);
    int nt = cfg.n_threads > 0 ? cfg.n_threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    nt = nt < 1 ? 1 : nt > MAX_GEN_THREADS ? MAX_GEN_THREADS : nt;
    for (size_t i = 0; !rc && i < tl.n; i++) rc = write_tensor(w, &tl.t[i], cfg.seed, fbuf, qbuf, CHUNK, nt);
    if (!rc) rc = moe_gguf_writer_finish(w);
    if (rc && err && errsz && !err[0]) moe_seterr(err, errsz, rc, "writing '%s': %s", path, moe_strerror(rc));
    moe_gguf_writer_free(w);
    free(fbuf);
    free(qbuf);
    free(tl.t);
    return rc;
}
