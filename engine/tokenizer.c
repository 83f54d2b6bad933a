/* tokenizer.c - byte-level BPE and SentencePiece tokenizers from GGUF
 * metadata. See tokenizer.h for the contract.
 *
 * Encode pipeline (mirrors Hugging Face tokenizers, the reference):
 *   1. replace ill-formed UTF-8 by U+FFFD (maximal subparts);
 *   2. split out added tokens (leftmost-longest, like HF's AddedVocabulary);
 *   3. BPE: run the pre-tokenizer Splits in order, each over every piece
 *      left by the previous one (HF Sequence semantics), then merge each
 *      piece by rank with a binary heap (rank, then leftmost position - the
 *      order HF's word merge uses);
 *      SPM: spaces -> U+2581, dummy prefix, merge by score, byte fallback.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer.h"

#include <pcre2.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"
#include "log_hook.h"
#include "utf8.h"

#define MAX_SPLITS 8

typedef struct pre_def {
    const char *names[4];
    const char *re[MAX_SPLITS];
    bool ignore_merges; /* a piece that is a whole vocab entry is kept as is */
} pre_def;

/* The Split regexes of each model's tokenizer.json pre_tokenizer, in
 * order ("Digits individual_digits" is the last deepseek-llm entry). */
static const pre_def PRE_DEFS[] = {
    {{"deepseek-llm", NULL},
     {"[\r\n]",
      "\\s?[A-Za-z\xC2\xB5\xC3\x80-\xC3\x96\xC3\x98-\xC3\xB6\xC3\xB8-\xC6\xBA\xC6\xBC-\xC6\xBF\xC7\x84-\xCA\x93\xCA\x95-\xCA\xAF\xCD\xB0-\xCD\xB3\xCD\xB6\xCD\xB7\xCD\xBB-\xCD\xBD\xCD\xBF\xCE\x86\xCE\x88-\xCE\x8A\xCE\x8C\xCE\x8E-\xCE\xA1\xCE\xA3-\xCF\xB5\xCF\xB7-\xD2\x81\xD2\x8A-\xD4\xAF\xD4\xB1-\xD5\x96\xE1\x82\xA0-\xE1\x83\x85\xE1\x8E\xA0-\xE1\x8F\xB5\xE1\x8F\xB8-\xE1\x8F\xBD\xE1\xB2\x90-\xE1\xB2\xBA\xE1\xB2\xBD-\xE1\xB2\xBF\xE1\xB4\x80-\xE1\xB4\xAB\xE1\xB5\xAB-\xE1\xB5\xB7\xE1\xB5\xB9-\xE1\xB6\x9A\xE1\xB8\x80-\xE1\xBC\x95\xE1\xBC\x98-\xE1\xBC\x9D\xE1\xBC\xA0-\xE1\xBD\x85\xE1\xBD\x88-\xE1\xBD\x8D\xE1\xBD\x90-\xE1\xBD\x97\xE1\xBD\x99\xE1\xBD\x9B\xE1\xBD\x9D\xE1\xBD\x9F-\xE1\xBD\xBD\xE1\xBE\x80-\xE1\xBE\xB4\xE1\xBE\xB6-\xE1\xBE\xBC\xE1\xBE\xBE\xE1\xBF\x82-\xE1\xBF\x84\xE1\xBF\x86-\xE1\xBF\x8C\xE1\xBF\x90-\xE1\xBF\x93\xE1\xBF\x96-\xE1\xBF\x9B\xE1\xBF\xA0-\xE1\xBF\xAC\xE1\xBF\xB2-\xE1\xBF\xB4\xE1\xBF\xB6-\xE1\xBF\xBC\xE2\x84\x82\xE2\x84\x87\xE2\x84\x8A-\xE2\x84\x93\xE2\x84\x95\xE2\x84\x99-\xE2\x84\x9D\xE2\x84\xA4\xE2\x84\xA6\xE2\x84\xA8\xE2\x84\xAA-\xE2\x84\xAD\xE2\x84\xAF-\xE2\x84\xB4\xE2\x84\xB9\xE2\x84\xBC-\xE2\x84\xBF\xE2\x85\x85-\xE2\x85\x89\xE2\x85\x8E\xE2\x86\x83\xE2\x86\x84\xE2\xB0\x80-\xE2\xB1\xBB\xE2\xB1\xBE-\xE2\xB3\xA4\xE2\xB3\xAB-\xE2\xB3\xAE\xE2\xB3\xB2\xE2\xB3\xB3\xEA\x99\x80-\xEA\x99\xAD\xEA\x9A\x80-\xEA\x9A\x9B\xEA\x9C\xA2-\xEA\x9D\xAF\xEA\x9D\xB1-\xEA\x9E\x87\xEA\x9E\x8B-\xEA\x9E\x8E\xEA\xAD\xB0-\xEA\xAE\xBF\xEF\xAC\x80-\xEF\xAC\x86\xEF\xAC\x93-\xEF\xAC\x97\xEF\xBC\xA1-\xEF\xBC\xBA\xEF\xBD\x81-\xEF\xBD\x9A\xF0\x90\x90\x80-\xF0\x90\x91\x8F\xF0\x90\x92\xB0-\xF0\x90\x93\x93\xF0\x90\x93\x98-\xF0\x90\x93\xBB\xF0\x90\xB2\x80-\xF0\x90\xB2\xB2\xF0\x90\xB3\x80-\xF0\x90\xB3\xB2\xF0\x91\xA2\xA0-\xF0\x91\xA3\x9F\xF0\x9E\xA4\x80-\xF0\x9E\xA5\x83]+",
      "\\s?[!-/:-~\xEF\xBC\x81-\xEF\xBC\x8F\xEF\xBC\x9A-\xEF\xBD\x9E\xE2\x80\x98-\xE2\x80\x9F\xE3\x80\x80-\xE3\x80\x82]+",
      "\\s+$",
      "[\xE4\xB8\x80-\xE9\xBE\xA5\xE0\xA0\x80-\xE4\xB8\x80\xEA\xB0\x80-\xED\x9F\xBF]+",
      "\\p{N}", NULL},
     false},
    {{"deepseek-v3", "deepseek3-llm", NULL},
     {"\\p{N}{1,3}",
      "[\xE4\xB8\x80-\xE9\xBE\xA5\xE3\x81\x80-\xE3\x82\x9F\xE3\x82\xA0-\xE3\x83\xBF]+",
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
      NULL},
     false},
    /* DeepSeek-Coder (v1): llama.cpp's list; no HF fixture checks it */
    {{"deepseek-coder", NULL},
     {"[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[\xE4\xB8\x80-\xE9\xBE\xA5\xE0\xA0\x80-\xE4\xB8\x80\xEA\xB0\x80-\xED\x9F\xBF]+",
      "\\p{N}", NULL},
     false},
    {{"qwen2", "deepseek-r1-qwen", NULL},
     {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
      "\\s+(?!\\S)|\\s+",
      NULL},
     false},
    {{"llama-bpe", "llama3", "llama-v3", NULL},
     {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
      "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
      NULL},
     true},
    /* SmolLM, StarCoder, Refact: GPT-2's split after every digit is cut off
     * on its own (llama.cpp's list for these names). */
    {{"smollm", "starcoder", "refact", NULL},
     {"\\p{N}", "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+", NULL},
     false},
    {{"default", "gpt2", "gpt-2", NULL},
     {"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+", NULL},
     false},
};

/* Open-addressing map from a 64-bit pair key to (rank, merged id). */
typedef struct pair_slot {
    uint64_t key; /* (left << 32 | right) + 1; 0 = empty */
    int32_t rank;
    int32_t merged;
} pair_slot;

struct moe_tok {
    moe_tok_kind kind;
    char pre[64];
    int32_t n_vocab;
    char *text_arena; /* all vocab strings, NUL-separated */
    uint64_t *text_off; /* (n_vocab + 1) offsets; string i is [off[i], off[i+1]-1) */
    char *piece_arena;  /* decoded bytes of each token */
    uint64_t *piece_off;
    uint8_t *types;
    float *scores; /* SPM only */
    int32_t *hash;  /* vocab string -> id, size hash_mask + 1, -1 empty */
    uint64_t hash_mask;
    moe_hash_key hkey; /* the process key (hash.h), copied: looked up per token */
    pair_slot *pairs; /* BPE merges */
    uint64_t pairs_mask;
    int32_t byte_tok[256]; /* initial symbol / byte-fallback id of each byte, -1 none */
    int32_t bos, eos, eot, eom, pad, unk;
    bool add_bos, add_eos, add_space_prefix, ignore_merges;
    bool spm_split_ws; /* SPM: no token has U+2581 after another character */
    bool nfc;          /* NFC-normalise text before splitting (Qwen2: HF's normalizer is NFC) */
    uint8_t *eog; /* n_vocab flags */
    /* added tokens, for splitting them out of text */
    int32_t *added; /* ids of CONTROL / USER_DEFINED tokens */
    size_t n_added;
    bool added_first[256];
    size_t added_lens[64]; /* distinct lengths, descending */
    size_t n_added_lens;
    pcre2_code *re[MAX_SPLITS];
    int n_re;
};

const char *moe_tok_text(const moe_tok *t, int32_t id, size_t *len) {
    if (!t || id < 0 || id >= t->n_vocab) return NULL;
    if (len) *len = (size_t)(t->text_off[id + 1] - t->text_off[id] - 1);
    return t->text_arena + t->text_off[id];
}

const char *moe_tok_piece(const moe_tok *t, int32_t id, size_t *len) {
    if (!t || id < 0 || id >= t->n_vocab) return NULL;
    if (len) *len = (size_t)(t->piece_off[id + 1] - t->piece_off[id]);
    return t->piece_arena + t->piece_off[id];
}

int32_t moe_tok_find(const moe_tok *t, const char *s, size_t len) {
    uint64_t h = moe_hash_keyed(s, len, &t->hkey) & t->hash_mask;
    for (;;) {
        int32_t id = t->hash[h];
        if (id < 0) return -1;
        size_t l = 0;
        const char *x = moe_tok_text(t, id, &l);
        if (l == len && memcmp(x, s, len) == 0) return id;
        h = (h + 1) & t->hash_mask;
    }
}

static const pair_slot *pair_find(const moe_tok *t, int32_t a, int32_t b) {
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    uint64_t h = moe_hash_u64_keyed(key, &t->hkey) & t->pairs_mask;
    for (;;) {
        const pair_slot *s = &t->pairs[h];
        if (s->key == 0) return NULL;
        if (s->key == key) return s;
        h = (h + 1) & t->pairs_mask;
    }
}

/* GPT-2's reversible byte <-> printable-codepoint table. */
static uint32_t byte_to_cp(int b) {
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return (uint32_t)b;
    int n = 0;
    for (int x = 0; x < b; x++)
        if (!((x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF))) n++;
    return 256u + (uint32_t)n;
}

void moe_tok_free(moe_tok *t) {
    if (!t) return;
    for (int i = 0; i < t->n_re; i++) pcre2_code_free(t->re[i]);
    free(t->text_arena);
    free(t->text_off);
    free(t->piece_arena);
    free(t->piece_off);
    free(t->types);
    free(t->scores);
    free(t->hash);
    free(t->pairs);
    free(t->eog);
    free(t->added);
    free(t);
}

static int32_t get_id(const moe_gguf *g, const char *key, int32_t n_vocab) {
    int64_t v;
    if (moe_gguf_get_i64(g, key, &v) != MOE_OK || v < 0 || v >= n_vocab) return -1;
    return (int32_t)v;
}

static bool get_flag(const moe_gguf *g, const char *key, bool def) {
    bool b;
    return moe_gguf_get_bool(g, key, &b) == MOE_OK ? b : def;
}

/* Decoded bytes of token i, appended at *o (buffer has room: pieces are
 * never longer than their vocab string). */
static size_t make_piece(const moe_tok *t, int32_t i, const int16_t *cp_to_byte, char *o) {
    size_t len;
    const char *s = moe_tok_text(t, i, &len);
    int type = t->types[i];
    if (type == MOE_TOKTYPE_UNUSED || type == MOE_TOKTYPE_UNKNOWN) return 0;
    if (t->kind == MOE_TOK_SPM) {
        if (type == MOE_TOKTYPE_BYTE && len == 6 && memcmp(s, "<0x", 3) == 0) {
            o[0] = (char)strtol(s + 3, NULL, 16);
            return 1;
        }
        if (type == MOE_TOKTYPE_CONTROL) {
            memcpy(o, s, len);
            return len;
        }
        size_t n = 0;
        for (size_t j = 0; j < len;) {
            if (j + 3 <= len && memcmp(s + j, "\xE2\x96\x81", 3) == 0) {
                o[n++] = ' ';
                j += 3;
            } else {
                o[n++] = s[j++];
            }
        }
        return n;
    }
    /* byte-level: map every code point back to its byte; a string with any
     * code point outside the table (added tokens like <｜User｜>) is kept
     * as written, as HF's ByteLevel decoder does */
    size_t n = 0;
    for (size_t j = 0; j < len;) {
        uint32_t cp;
        int k = moe_utf8_decode((const unsigned char *)s + j, len - j, &cp);
        if (k < 0 || cp >= 324 || cp_to_byte[cp] < 0) {
            memcpy(o, s, len);
            return len;
        }
        o[n++] = (char)cp_to_byte[cp];
        j += (size_t)k;
    }
    return n;
}

static int compile_pre(moe_tok *t, char *err, size_t errsz) {
    const pre_def *def = NULL;
    for (size_t i = 0; i < sizeof PRE_DEFS / sizeof PRE_DEFS[0] && !def; i++)
        for (int j = 0; PRE_DEFS[i].names[j]; j++)
            if (strcmp(PRE_DEFS[i].names[j], t->pre) == 0) def = &PRE_DEFS[i];
    if (!def) {
        moe_log(MOE_LOG_WARN, "tokenizer: unknown tokenizer.ggml.pre '%s', using the GPT-2 pre-tokenizer",
                t->pre);
        def = &PRE_DEFS[sizeof PRE_DEFS / sizeof PRE_DEFS[0] - 1];
    }
    t->ignore_merges = def->ignore_merges;
    /* GGUF does not record HF's normalizer; of the vocabularies we know,
     * Qwen2's is the one that declares NFC. */
    t->nfc = strcmp(t->pre, "qwen2") == 0;
    for (int i = 0; def->re[i]; i++) {
        int ec;
        PCRE2_SIZE eo;
        /* MULTILINE: Oniguruma's (Ruby syntax) $ is end-of-line */
        pcre2_code *re = pcre2_compile((PCRE2_SPTR)def->re[i], PCRE2_ZERO_TERMINATED,
                                       PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &ec, &eo, NULL);
        if (!re) {
            return moe_seterr(err, errsz, MOE_EUNSUPPORTED, "tokenizer: cannot compile pre-tokenizer regex of '%s'", t->pre);
        }
        pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* optional: interpreter otherwise */
        t->re[t->n_re++] = re;
    }
    return MOE_OK;
}

moe_tok *moe_tok_load(const moe_gguf *g, int *status, char *err, size_t errsz) {
    int st = MOE_EFORMAT;
    moe_tok *t = calloc(1, sizeof *t);
    if (!t) {
        if (status) *status = MOE_ENOMEM;
        return NULL;
    }
    if (err && errsz) err[0] = 0;
    moe_gguf_str s;
    if (moe_gguf_get_str(g, "tokenizer.ggml.model", &s) != MOE_OK) {
        st = moe_seterr(err, errsz, MOE_ENOTFOUND, "tokenizer: %s missing", "tokenizer.ggml.model");
        goto fail;
    }
    if (s.len == 4 && memcmp(s.ptr, "gpt2", 4) == 0) t->kind = MOE_TOK_BPE;
    else if (s.len == 5 && memcmp(s.ptr, "llama", 5) == 0) t->kind = MOE_TOK_SPM;
    else {
        char m[32];
        snprintf(m, sizeof m, "%.*s", (int)(s.len < 31 ? s.len : 31), s.ptr);
        st = moe_seterr(err, errsz, MOE_EUNSUPPORTED, "tokenizer: unsupported tokenizer.ggml.model '%s'", m);
        goto fail;
    }
    strcpy(t->pre, "default");
    if (moe_gguf_get_str(g, "tokenizer.ggml.pre", &s) == MOE_OK && s.len < sizeof t->pre) {
        memcpy(t->pre, s.ptr, s.len);
        t->pre[s.len] = 0;
    }

    const moe_gguf_array *toks = moe_gguf_get_arr(g, "tokenizer.ggml.tokens");
    if (!toks) {
        st = moe_seterr(err, errsz, MOE_ENOTFOUND, "tokenizer: %s missing", "tokenizer.ggml.tokens");
        goto fail;
    }
    if (toks->etype != MOE_GGUF_STRING || toks->n == 0 || toks->n > INT32_MAX / 2) {
        moe_seterr(err, errsz, st, "tokenizer: %s is not a non-empty string array", "tokenizer.ggml.tokens");
        goto fail;
    }
    int32_t n = t->n_vocab = (int32_t)toks->n;
    uint64_t total = 0;
    for (int32_t i = 0; i < n; i++) total += toks->items[i].v.str.len + 1;
    st = MOE_ENOMEM;
    t->text_arena = malloc(total);
    t->text_off = malloc(((size_t)n + 1) * sizeof *t->text_off);
    t->piece_arena = malloc(total);
    t->piece_off = malloc(((size_t)n + 1) * sizeof *t->piece_off);
    t->types = malloc((size_t)n);
    t->eog = calloc((size_t)n, 1);
    uint64_t hsize = 1;
    while (hsize < (uint64_t)n * 2) hsize <<= 1;
    t->hkey = *moe_hash_process_key();
    t->hash = malloc(hsize * sizeof *t->hash);
    t->hash_mask = hsize - 1;
    if (!t->text_arena || !t->text_off || !t->piece_arena || !t->piece_off || !t->types || !t->eog || !t->hash)
        goto fail;
    memset(t->hash, 0xff, hsize * sizeof *t->hash);
    uint64_t off = 0;
    for (int32_t i = 0; i < n; i++) {
        const moe_gguf_str *x = &toks->items[i].v.str;
        t->text_off[i] = off;
        memcpy(t->text_arena + off, x->ptr, x->len);
        t->text_arena[off + x->len] = 0;
        off += x->len + 1;
    }
    t->text_off[n] = off;

    st = MOE_EFORMAT;
    const moe_gguf_array *types = moe_gguf_get_arr(g, "tokenizer.ggml.token_type");
    for (int32_t i = 0; i < n; i++) {
        uint64_t ty = MOE_TOKTYPE_NORMAL;
        if (types && (types->n != (uint64_t)n || moe_gguf_arr_u64(types, (uint64_t)i, &ty) != MOE_OK)) {
            moe_seterr(err, errsz, st, "tokenizer: %s does not match the token count", "tokenizer.ggml.token_type");
            goto fail;
        }
        t->types[i] = (uint8_t)(ty <= 6 ? ty : MOE_TOKTYPE_NORMAL);
    }
    /* later duplicates do not shadow earlier ids, as in HF's vocab map */
    for (int32_t i = 0; i < n; i++) {
        size_t len;
        const char *x = moe_tok_text(t, i, &len);
        uint64_t h = moe_hash_keyed(x, len, &t->hkey) & t->hash_mask;
        bool dup = false;
        while (t->hash[h] >= 0) {
            size_t l2;
            const char *y = moe_tok_text(t, t->hash[h], &l2);
            if (l2 == len && memcmp(x, y, len) == 0) {
                dup = true;
                break;
            }
            h = (h + 1) & t->hash_mask;
        }
        if (!dup) t->hash[h] = i;
    }

    if (t->kind == MOE_TOK_SPM) {
        const moe_gguf_array *sc = moe_gguf_get_arr(g, "tokenizer.ggml.scores");
        t->scores = calloc((size_t)n, sizeof *t->scores);
        if (!t->scores) {
            st = MOE_ENOMEM;
            goto fail;
        }
        if (sc) {
            if (sc->n != (uint64_t)n) {
                moe_seterr(err, errsz, st, "tokenizer: %s does not match the token count", "tokenizer.ggml.scores");
                goto fail;
            }
            for (int32_t i = 0; i < n; i++) {
                double d = 0;
                moe_gguf_arr_f64(sc, (uint64_t)i, &d);
                t->scores[i] = (float)d;
            }
        }
        for (int b = 0; b < 256; b++) {
            char buf[8];
            snprintf(buf, sizeof buf, "<0x%02X>", b);
            t->byte_tok[b] = moe_tok_find(t, buf, 6);
        }
        t->spm_split_ws = true;
        for (int32_t i = 0; i < n && t->spm_split_ws; i++) {
            size_t len;
            const char *x = moe_tok_text(t, i, &len);
            for (size_t j = 1; j + 3 <= len; j++)
                if (memcmp(x + j, "\xE2\x96\x81", 3) == 0 && (j < 3 || memcmp(x + j - 3, "\xE2\x96\x81", 3) != 0)) {
                    t->spm_split_ws = false;
                    break;
                }
        }
    }

    int16_t cp_to_byte[324];
    memset(cp_to_byte, 0xff, sizeof cp_to_byte);
    if (t->kind == MOE_TOK_BPE) {
        for (int b = 0; b < 256; b++) {
            uint32_t cp = byte_to_cp(b);
            char buf[4];
            cp_to_byte[cp] = (int16_t)b;
            t->byte_tok[b] = moe_tok_find(t, buf, (size_t)moe_utf8_encode(cp, buf));
        }
        const moe_gguf_array *mg = moe_gguf_get_arr(g, "tokenizer.ggml.merges");
        uint64_t nm = mg && mg->etype == MOE_GGUF_STRING ? mg->n : 0;
        uint64_t psize = 16;
        while (psize < nm * 2) psize <<= 1;
        t->pairs = calloc(psize, sizeof *t->pairs);
        t->pairs_mask = psize - 1;
        char *cat = malloc(4096);
        if (!t->pairs || !cat) {
            free(cat);
            st = MOE_ENOMEM;
            goto fail;
        }
        for (uint64_t r = 0; r < nm; r++) {
            const moe_gguf_str *m = &mg->items[r].v.str;
            const char *sp = m->len ? memchr(m->ptr + 1, ' ', m->len - 1) : NULL;
            if (!sp || m->len > 4096) continue;
            size_t la = (size_t)(sp - m->ptr), lb = m->len - la - 1;
            int32_t a = moe_tok_find(t, m->ptr, la), b = moe_tok_find(t, sp + 1, lb);
            memcpy(cat, m->ptr, la);
            memcpy(cat + la, sp + 1, lb);
            int32_t ab = moe_tok_find(t, cat, la + lb);
            if (a < 0 || b < 0 || ab < 0) continue; /* HF refuses such files; skipping is harmless */
            uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
            uint64_t h = moe_hash_u64_keyed(key, &t->hkey) & t->pairs_mask;
            while (t->pairs[h].key && t->pairs[h].key != key) h = (h + 1) & t->pairs_mask;
            if (!t->pairs[h].key) t->pairs[h] = (pair_slot){key, (int32_t)r, ab};
        }
        free(cat);
    }

    off = 0;
    for (int32_t i = 0; i < n; i++) {
        t->piece_off[i] = off;
        off += make_piece(t, i, cp_to_byte, t->piece_arena + off);
    }
    t->piece_off[n] = off;

    t->bos = get_id(g, "tokenizer.ggml.bos_token_id", n);
    t->eos = get_id(g, "tokenizer.ggml.eos_token_id", n);
    t->eot = get_id(g, "tokenizer.ggml.eot_token_id", n);
    t->eom = get_id(g, "tokenizer.ggml.eom_token_id", n);
    t->pad = get_id(g, "tokenizer.ggml.padding_token_id", n);
    t->unk = get_id(g, "tokenizer.ggml.unknown_token_id", n);
    t->add_bos = get_flag(g, "tokenizer.ggml.add_bos_token", t->kind == MOE_TOK_SPM);
    t->add_eos = get_flag(g, "tokenizer.ggml.add_eos_token", false);
    t->add_space_prefix = get_flag(g, "tokenizer.ggml.add_space_prefix", t->kind == MOE_TOK_SPM);

    /* end-of-generation: the declared ids plus the control tokens that
     * chat templates close turns with (llama.cpp recognises the same). */
    static const char *const eog_text[] = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>",
                                           "<|eom_id|>", "<end_of_turn>", "<｜end▁of▁sentence｜>",
                                           "<|end_of_text|>", "</s>", NULL};
    int32_t decl[] = {t->eos, t->eot, t->eom};
    for (int i = 0; i < 3; i++)
        if (decl[i] >= 0) t->eog[decl[i]] = 1;
    for (int i = 0; eog_text[i]; i++) {
        int32_t id = moe_tok_find(t, eog_text[i], strlen(eog_text[i]));
        if (id >= 0 && t->types[id] == MOE_TOKTYPE_CONTROL) {
            t->eog[id] = 1;
            if (t->eot < 0 && (!strcmp(eog_text[i], "<|eot_id|>") || !strcmp(eog_text[i], "<|im_end|>")))
                t->eot = id;
        }
    }

    size_t na = 0;
    for (int32_t i = 0; i < n; i++)
        if ((t->types[i] == MOE_TOKTYPE_CONTROL || t->types[i] == MOE_TOKTYPE_USER_DEFINED) &&
            t->text_off[i + 1] - t->text_off[i] > 1)
            na++;
    t->added = malloc((na ? na : 1) * sizeof *t->added);
    if (!t->added) {
        st = MOE_ENOMEM;
        goto fail;
    }
    for (int32_t i = 0; i < n; i++) {
        size_t len;
        const char *x = moe_tok_text(t, i, &len);
        if ((t->types[i] != MOE_TOKTYPE_CONTROL && t->types[i] != MOE_TOKTYPE_USER_DEFINED) || len == 0) continue;
        t->added[t->n_added++] = i;
        t->added_first[(unsigned char)x[0]] = true;
        size_t k = 0;
        while (k < t->n_added_lens && t->added_lens[k] > len) k++;
        if ((k < t->n_added_lens && t->added_lens[k] == len) || t->n_added_lens == 64) continue;
        memmove(t->added_lens + k + 1, t->added_lens + k, (t->n_added_lens - k) * sizeof(size_t));
        t->added_lens[k] = len;
        t->n_added_lens++;
    }

    if (t->kind == MOE_TOK_BPE && (st = compile_pre(t, err, errsz)) != MOE_OK) goto fail;
    /* llama.cpp's default for Llama-3 vocabularies that do not say */
    bool flag;
    if (t->ignore_merges && moe_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &flag) != MOE_OK) t->add_bos = true;
    if (status) *status = MOE_OK;
    return t;
fail:
    if (status) *status = st;
    if (err && errsz && !err[0]) moe_seterr(err, errsz, st, "tokenizer: %s", moe_strerror(st));
    moe_tok_free(t);
    return NULL;
}

moe_tok_kind moe_tok_get_kind(const moe_tok *t) { return t->kind; }
const char *moe_tok_pre_name(const moe_tok *t) { return t->pre; }
int32_t moe_tok_n_vocab(const moe_tok *t) { return t->n_vocab; }
int32_t moe_tok_bos(const moe_tok *t) { return t->bos; }
int32_t moe_tok_eos(const moe_tok *t) { return t->eos; }
int32_t moe_tok_eot(const moe_tok *t) { return t->eot; }
int32_t moe_tok_pad(const moe_tok *t) { return t->pad; }
bool moe_tok_add_bos_default(const moe_tok *t) { return t->add_bos; }
bool moe_tok_add_eos_default(const moe_tok *t) { return t->add_eos; }
bool moe_tok_is_eog(const moe_tok *t, int32_t id) { return id >= 0 && id < t->n_vocab && t->eog[id]; }
int moe_tok_type(const moe_tok *t, int32_t id) { return id >= 0 && id < t->n_vocab ? t->types[id] : 0; }

/* ---- encode ---- */

typedef struct enc {
    const moe_tok *t;
    int32_t *ids;
    size_t n, cap;
    /* scratch for one piece's merge */
    int32_t *sym_id, *sym_prev, *sym_next;
    size_t sym_cap;
    struct heap_ent {
        int64_t prio; /* BPE: rank; SPM: -score scaled; ties by pos */
        int32_t left, right, lid, rid;
    } *heap;
    size_t heap_n, heap_cap;
    /* pre-tokenizer spans */
    size_t (*spans)[2], n_spans, cap_spans;
    size_t (*spans2)[2], n_spans2, cap_spans2;
    pcre2_match_data *md;
    char *buf;
    size_t buf_cap;
} enc;

/* Appends id; a negative id (a byte the vocabulary cannot spell and no
 * <unk>) is dropped rather than handed to the model. */
static int push_id(enc *e, int32_t id) {
    if (id < 0) return MOE_OK;
    if (e->n == e->cap) {
        size_t nc = e->cap ? e->cap * 2 : 64;
        int32_t *p = realloc(e->ids, nc * sizeof *p);
        if (!p) return MOE_ENOMEM;
        e->ids = p, e->cap = nc;
    }
    e->ids[e->n++] = id;
    return MOE_OK;
}

static bool heap_less(const struct heap_ent *a, const struct heap_ent *b) {
    return a->prio < b->prio || (a->prio == b->prio && a->left < b->left);
}

static int heap_push(enc *e, struct heap_ent x) {
    if (e->heap_n == e->heap_cap) {
        size_t nc = e->heap_cap ? e->heap_cap * 2 : 256;
        void *p = realloc(e->heap, nc * sizeof *e->heap);
        if (!p) return MOE_ENOMEM;
        e->heap = p, e->heap_cap = nc;
    }
    size_t i = e->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&x, &e->heap[p])) break;
        e->heap[i] = e->heap[p];
        i = p;
    }
    e->heap[i] = x;
    return MOE_OK;
}

static struct heap_ent heap_pop(enc *e) {
    struct heap_ent top = e->heap[0], x = e->heap[--e->heap_n];
    size_t i = 0, n = e->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_less(&e->heap[c + 1], &e->heap[c])) c++;
        if (!heap_less(&e->heap[c], &x)) break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n) e->heap[i] = x;
    return top;
}

static int sym_reserve(enc *e, size_t n) {
    if (n <= e->sym_cap) return MOE_OK;
    size_t nc = n < 256 ? 256 : n * 2;
    int32_t *a = realloc(e->sym_id, nc * sizeof *a);
    if (a) e->sym_id = a;
    int32_t *b = realloc(e->sym_prev, nc * sizeof *b);
    if (b) e->sym_prev = b;
    int32_t *c = realloc(e->sym_next, nc * sizeof *c);
    if (c) e->sym_next = c;
    if (!a || !b || !c) return MOE_ENOMEM;
    e->sym_cap = nc;
    return MOE_OK;
}

/* BPE-merges one pre-token of raw bytes p[0..n). */
static int bpe_piece(enc *e, const unsigned char *p, size_t n) {
    const moe_tok *t = e->t;
    if (t->ignore_merges && n <= 256) {
        char buf[1024];
        size_t l = 0;
        for (size_t i = 0; i < n; i++) l += (size_t)moe_utf8_encode(byte_to_cp(p[i]), buf + l);
        int32_t id = moe_tok_find(t, buf, l);
        if (id >= 0) return push_id(e, id);
    }
    if (n == 1) return push_id(e, t->byte_tok[p[0]] >= 0 ? t->byte_tok[p[0]] : t->unk);
    if (sym_reserve(e, n) != MOE_OK) return MOE_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        e->sym_id[i] = t->byte_tok[p[i]];
        e->sym_prev[i] = (int32_t)i - 1;
        e->sym_next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    e->heap_n = 0;
    for (size_t i = 0; i + 1 < n; i++) {
        const pair_slot *ps = pair_find(t, e->sym_id[i], e->sym_id[i + 1]);
        if (ps && heap_push(e, (struct heap_ent){ps->rank, (int32_t)i, (int32_t)i + 1, e->sym_id[i],
                                                 e->sym_id[i + 1]}) != MOE_OK)
            return MOE_ENOMEM;
    }
    while (e->heap_n) {
        struct heap_ent h = heap_pop(e);
        int32_t l = h.left, r = h.right;
        /* stale entries: a side was merged away or changed since the push */
        if (e->sym_id[l] != h.lid || e->sym_id[r] != h.rid || e->sym_next[l] != r) continue;
        const pair_slot *ps = pair_find(t, h.lid, h.rid);
        e->sym_id[l] = ps->merged;
        e->sym_id[r] = -2;
        int32_t nx = e->sym_next[r];
        e->sym_next[l] = nx;
        if (nx >= 0) e->sym_prev[nx] = l;
        int32_t pv = e->sym_prev[l];
        if (pv >= 0 && (ps = pair_find(t, e->sym_id[pv], e->sym_id[l])) &&
            heap_push(e, (struct heap_ent){ps->rank, pv, l, e->sym_id[pv], e->sym_id[l]}) != MOE_OK)
            return MOE_ENOMEM;
        if (nx >= 0 && (ps = pair_find(t, e->sym_id[l], e->sym_id[nx])) &&
            heap_push(e, (struct heap_ent){ps->rank, l, nx, e->sym_id[l], e->sym_id[nx]}) != MOE_OK)
            return MOE_ENOMEM;
    }
    for (int32_t i = 0; i >= 0; i = e->sym_next[i])
        if (push_id(e, e->sym_id[i] >= 0 ? e->sym_id[i] : t->unk) != MOE_OK) return MOE_ENOMEM;
    return MOE_OK;
}

static int span_push(size_t (**sp)[2], size_t *n, size_t *cap, size_t a, size_t b) {
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 64;
        void *p = realloc(*sp, nc * sizeof **sp);
        if (!p) return MOE_ENOMEM;
        *sp = p, *cap = nc;
    }
    (*sp)[*n][0] = a;
    (*sp)[*n][1] = b;
    (*n)++;
    return MOE_OK;
}

/* Byte-level BPE of a text fragment without added tokens. */
static int bpe_fragment(enc *e, const char *s, size_t len) {
    const moe_tok *t = e->t;
    e->n_spans = 0;
    if (span_push(&e->spans, &e->n_spans, &e->cap_spans, 0, len) != MOE_OK) return MOE_ENOMEM;
    for (int r = 0; r < t->n_re; r++) {
        e->n_spans2 = 0;
        for (size_t k = 0; k < e->n_spans; k++) {
            size_t a = e->spans[k][0], b = e->spans[k][1], pos = 0, plen = b - a;
            const char *sub = s + a;
            while (pos < plen) {
                int rc = pcre2_match(t->re[r], (PCRE2_SPTR)sub, plen, pos, PCRE2_NO_UTF_CHECK, e->md, NULL);
                if (rc < 0) break;
                PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
                size_t ms = ov[0], me = ov[1];
                if (me == ms) { /* empty match: step one character */
                    int cl = moe_utf8_next((const unsigned char *)sub + ms, plen - ms);
                    if (ms >= plen) break;
                    pos = ms + (size_t)(cl > 0 ? cl : 1);
                    continue;
                }
                if (ms > pos && span_push(&e->spans2, &e->n_spans2, &e->cap_spans2, a + pos, a + ms) != MOE_OK)
                    return MOE_ENOMEM;
                if (span_push(&e->spans2, &e->n_spans2, &e->cap_spans2, a + ms, a + me) != MOE_OK)
                    return MOE_ENOMEM;
                pos = me;
            }
            if (pos < plen && span_push(&e->spans2, &e->n_spans2, &e->cap_spans2, a + pos, b) != MOE_OK)
                return MOE_ENOMEM;
        }
        size_t(*tmp)[2] = e->spans;
        e->spans = e->spans2, e->spans2 = tmp;
        size_t tc = e->cap_spans;
        e->cap_spans = e->cap_spans2, e->cap_spans2 = tc;
        e->n_spans = e->n_spans2;
    }
    for (size_t k = 0; k < e->n_spans; k++) {
        int st = bpe_piece(e, (const unsigned char *)s + e->spans[k][0], e->spans[k][1] - e->spans[k][0]);
        if (st != MOE_OK) return st;
    }
    return MOE_OK;
}

/* The score-ordered merge of x[from..to), one stretch of the escaped text. */
static int spm_chunk(enc *e, const char *x, size_t from, size_t to) {
    const moe_tok *t = e->t;
    /* symbols are characters; sym_prev/next link them, start/len in spans */
    size_t nsym = 0;
    if (sym_reserve(e, to - from + 1) != MOE_OK) return MOE_ENOMEM;
    e->n_spans = 0;
    for (size_t i = from; i < to;) {
        int k = moe_utf8_next((const unsigned char *)x + i, to - i);
        size_t cl = k > 0 ? (size_t)k : 1;
        if (span_push(&e->spans, &e->n_spans, &e->cap_spans, i, cl) != MOE_OK) return MOE_ENOMEM;
        i += cl;
        nsym++;
    }
    for (size_t i = 0; i < nsym; i++) {
        e->sym_prev[i] = (int32_t)i - 1;
        e->sym_next[i] = i + 1 < nsym ? (int32_t)i + 1 : -1;
        e->sym_id[i] = 0;
    }
    e->heap_n = 0;
#define SPM_TRY(l, r)                                                                                  \
    do {                                                                                               \
        int32_t id_ = moe_tok_find(t, x + e->spans[l][0], e->spans[l][1] + e->spans[r][1]);            \
        if (id_ >= 0 && heap_push(e, (struct heap_ent){-(int64_t)(t->scores[id_] * 1048576.0f), (l), (r), \
                                                       (int32_t)e->spans[l][1], (int32_t)e->spans[r][1]}) != MOE_OK) \
            return MOE_ENOMEM;                                                                         \
    } while (0)
    for (size_t i = 0; i + 1 < nsym; i++) SPM_TRY((int32_t)i, (int32_t)i + 1);
    while (e->heap_n) {
        struct heap_ent h = heap_pop(e);
        int32_t l = h.left, r = h.right;
        if (e->sym_id[l] < 0 || e->sym_id[r] < 0 || e->sym_next[l] != r || (int32_t)e->spans[l][1] != h.lid ||
            (int32_t)e->spans[r][1] != h.rid)
            continue;
        e->spans[l][1] += e->spans[r][1];
        e->sym_id[r] = -1;
        int32_t nx = e->sym_next[r];
        e->sym_next[l] = nx;
        if (nx >= 0) e->sym_prev[nx] = l;
        if (e->sym_prev[l] >= 0) SPM_TRY(e->sym_prev[l], l);
        if (nx >= 0) SPM_TRY(l, nx);
    }
#undef SPM_TRY
    for (int32_t i = nsym ? 0 : -1; i >= 0; i = e->sym_next[i]) {
        int32_t id = moe_tok_find(t, x + e->spans[i][0], e->spans[i][1]);
        if (id >= 0) {
            if (push_id(e, id) != MOE_OK) return MOE_ENOMEM;
            continue;
        }
        for (size_t j = 0; j < e->spans[i][1]; j++) {
            int32_t b = t->byte_tok[(unsigned char)x[e->spans[i][0] + j]];
            if (push_id(e, b >= 0 ? b : t->unk) != MOE_OK) return MOE_ENOMEM;
        }
    }
    return MOE_OK;
}


/* SentencePiece of a text fragment: llama.cpp's / sentencepiece's BPE by
 * score over characters, then byte fallback for characters not in the
 * vocabulary. Every fragment gets the dummy prefix, also one that follows
 * an added token: Mistral's own tokenizer (mistral-common) encodes each
 * message apart, and llama.cpp and HF's legacy Llama tokenizers prefix
 * each text segment between special tokens the same way. */
static int spm_fragment(enc *e, const char *s, size_t len) {
    const moe_tok *t = e->t;
    size_t need = len * 3 + 4;
    if (need > e->buf_cap) {
        char *b = realloc(e->buf, need);
        if (!b) return MOE_ENOMEM;
        e->buf = b, e->buf_cap = need;
    }
    size_t m = 0;
    if (t->add_space_prefix) memcpy(e->buf, "\xE2\x96\x81", 3), m = 3;
    for (size_t i = 0; i < len; i++) {
        if (s[i] == ' ') memcpy(e->buf + m, "\xE2\x96\x81", 3), m += 3;
        else e->buf[m++] = s[i];
    }
    const char *x = e->buf;
    if (!t->spm_split_ws) return spm_chunk(e, x, 0, m);
    /* No vocabulary string has U+2581 after another character, so no
     * merge can join a stretch to a following "▁word": merging each
     * stretch apart gives the same ids, with small heaps. */
    size_t from = 0;
    for (size_t i = 3; i + 3 <= m; i++) {
        if (memcmp(x + i, "\xE2\x96\x81", 3) != 0 || memcmp(x + i - 3, "\xE2\x96\x81", 3) == 0) continue;
        int st = spm_chunk(e, x, from, i);
        if (st != MOE_OK) return st;
        from = i;
    }
    return spm_chunk(e, x, from, m);
}

static int encode_fragment(enc *e, const char *s, size_t len) {
    if (len == 0) return MOE_OK;
    return e->t->kind == MOE_TOK_BPE ? bpe_fragment(e, s, len) : spm_fragment(e, s, len);
}

/* Which added tokens a stretch of text may contain. */
typedef enum added_mode {
    ADDED_ALL,  /* CONTROL and USER_DEFINED: text the server built (parse_special) */
    ADDED_USER, /* USER_DEFINED only: Hugging Face's encode_special_tokens */
    ADDED_TEXT, /* USER_DEFINED that do not look like turn markers: message content */
} added_mode;

/* What llama.cpp's converter (does_token_look_special) promotes to CONTROL:
 * older GGUFs, and Hugging Face itself, leave DeepSeek-V3's <｜User｜>,
 * <｜Assistant｜> and tool markers non-special, yet they delimit turns. */
static bool looks_marker(const char *s, size_t n) {
    static const char fw_open[] = "<\xEF\xBD\x9C", fw_close[] = "\xEF\xBD\x9C>"; /* <｜ ｜> */
    if (n >= 4 && memcmp(s, "<|", 2) == 0 && memcmp(s + n - 2, "|>", 2) == 0) return true;
    return n >= 8 && memcmp(s, fw_open, 4) == 0 && memcmp(s + n - 4, fw_close, 4) == 0;
}

/* Longest added token starting at s[0..len) that may be matched. */
static int32_t match_added(const moe_tok *t, const char *s, size_t len, added_mode mode, size_t *mlen) {
    for (size_t k = 0; k < t->n_added_lens; k++) {
        size_t l = t->added_lens[k];
        if (l > len) continue;
        int32_t id = moe_tok_find(t, s, l);
        if (id < 0) continue;
        int ty = t->types[id];
        bool ok = ty == MOE_TOKTYPE_CONTROL ? mode == ADDED_ALL
                  : ty == MOE_TOKTYPE_USER_DEFINED ? mode != ADDED_TEXT || !looks_marker(s, l)
                                                   : false;
        if (ok) {
            *mlen = l;
            return id;
        }
    }
    return -1;
}

/* NFC of valid UTF-8 s[0..len) via ICU (which works in UTF-16). Returns
 * MOE_OK with *out = NULL when s is already NFC (the common case, found by
 * ICU's quick check), a malloc'd normalised copy otherwise, or MOE_ENOMEM. */
static int nfc_normalize(const char *s, size_t len, char **out, size_t *out_len) {
    *out = NULL;
    size_t k = 0;
    while (k < len && (unsigned char)s[k] < 0x80) k++;
    if (k == len || len > INT32_MAX / 4) return MOE_OK; /* ASCII is NFC; absurd sizes left alone */
    UErrorCode ec = U_ZERO_ERROR;
    const UNormalizer2 *nfc = unorm2_getNFCInstance(&ec);
    if (U_FAILURE(ec)) return MOE_OK; /* no ICU data: tokenize unnormalised rather than fail */
    int32_t n16 = 0;
    UChar *u = malloc(((size_t)len + 1) * sizeof *u); /* UTF-16 units <= UTF-8 bytes */
    if (!u) return MOE_ENOMEM;
    u_strFromUTF8(u, (int32_t)len + 1, &n16, s, (int32_t)len, &ec);
    if (U_FAILURE(ec) || unorm2_isNormalized(nfc, u, n16, &ec) || U_FAILURE(ec)) {
        free(u);
        return MOE_OK;
    }
    /* composition never lengthens; decomposition inside NFC is bounded by 3x */
    int32_t cap = n16 * 3 + 16;
    UChar *v = malloc((size_t)cap * sizeof *v);
    char *o = NULL;
    int st = MOE_ENOMEM;
    if (!v) goto done;
    int32_t nv = unorm2_normalize(nfc, u, n16, v, cap, &ec);
    if (U_FAILURE(ec)) {
        st = MOE_OK;
        goto done;
    }
    int32_t n8 = 0;
    o = malloc((size_t)nv * 3 + 1);
    if (!o) goto done;
    u_strToUTF8(o, nv * 3 + 1, &n8, v, nv, &ec);
    if (U_FAILURE(ec)) {
        free(o);
        o = NULL;
        st = MOE_OK;
        goto done;
    }
    *out = o;
    *out_len = (size_t)n8;
    st = MOE_OK;
done:
    free(u);
    free(v);
    return st;
}

/* Replaces ill-formed UTF-8 by U+FFFD and applies the vocabulary's
 * normaliser. *out = NULL when s[0..len) is already clean (the usual case,
 * used in place), else a malloc'd copy. MOE_OK or MOE_ENOMEM. */
static int clean_text(const moe_tok *t, const char *s, size_t len, char **out, size_t *out_len) {
    *out = NULL;
    char *clean = NULL;
    size_t i = 0;
    while (i < len) {
        int k = moe_utf8_next((const unsigned char *)s + i, len - i);
        if (k <= 0) break;
        i += (size_t)k;
    }
    if (i < len) {
        if (!(clean = malloc(len * 3 + 1))) return MOE_ENOMEM;
        size_t cl = 0;
        moe_utf8_sanitize((const unsigned char *)s, len, true, false, clean, &cl);
        s = clean, len = cl;
    }
    if (t->nfc) {
        char *norm;
        size_t nl;
        if (nfc_normalize(s, len, &norm, &nl) != MOE_OK) {
            free(clean);
            return MOE_ENOMEM;
        }
        if (norm) {
            free(clean);
            clean = norm;
            len = nl;
        }
    }
    *out = clean;
    *out_len = len;
    return MOE_OK;
}

/* One stretch of the text after cleaning, and the added tokens it may hold. */
typedef struct span_mode {
    size_t len;
    added_mode mode;
} span_mode;

/* Cleans every stretch apart so that their ends stay known. That equals
 * cleaning the whole string: template text is valid UTF-8, so no
 * ill-formed subpart crosses a seam, and NFC could only compose across
 * one if a stretch began with a combining mark - then the control token
 * before the seam stays whole here, where whole-string NFC would have
 * broken it. *text_out is text itself when nothing changed, else a
 * malloc'd copy left in *owned. */
static int clean_spans(const moe_tok *t, const char *text, span_mode *sp, size_t n_sp, const char **text_out,
                       size_t *len_out, char **owned) {
    char *buf = NULL;
    size_t off = 0, blen = 0, bcap = 0;
    *owned = NULL;
    for (size_t k = 0; k < n_sp; k++) {
        char *c;
        size_t cl = sp[k].len;
        if (clean_text(t, text + off, sp[k].len, &c, &cl) != MOE_OK) goto oom;
        const char *src = c ? c : text + off;
        bool ok = true;
        if (c && !buf) { /* first change: copy what came before */
            bcap = off + cl + 64;
            if ((ok = (buf = malloc(bcap)) != NULL)) memcpy(buf, text, off), blen = off;
        }
        if (ok && buf && blen + cl > bcap) {
            size_t nc = (blen + cl) * 2;
            char *q = realloc(buf, nc);
            if ((ok = q != NULL)) buf = q, bcap = nc;
        }
        if (ok && buf) memcpy(buf + blen, src, cl), blen += cl;
        free(c);
        if (!ok) goto oom;
        off += sp[k].len;
        sp[k].len = cl;
    }
    *text_out = buf ? buf : text;
    *len_out = buf ? blen : off;
    *owned = buf;
    return MOE_OK;
oom:
    free(buf);
    return MOE_ENOMEM;
}

/* The tokenizer proper over consecutive stretches. Added tokens are split
 * out where a stretch's mode allows and only when they lie wholly inside
 * it; the text between two matched added tokens is encoded as one run
 * even across stretch ends, so merges and pre-tokenizer splits there are
 * those of the whole string. */
static int encode_spans(const moe_tok *t, const char *text, span_mode *sp, size_t n_sp, bool add_bos,
                        int32_t **ids, size_t *n) {
    *ids = NULL;
    *n = 0;
    enc e = {.t = t};
    int st = MOE_ENOMEM;
    char *owned = NULL;
    const char *s;
    size_t len;
    if ((st = clean_spans(t, text, sp, n_sp, &s, &len, &owned)) != MOE_OK) return st;
    st = MOE_ENOMEM;
    if (t->kind == MOE_TOK_BPE && !(e.md = pcre2_match_data_create(1, NULL))) goto out;
    if (add_bos && t->bos >= 0 && push_id(&e, t->bos) != MOE_OK) goto out;
    size_t start = 0, k = 0, seg_end = n_sp ? sp[0].len : 0;
    for (size_t i = 0; i < len;) {
        while (i >= seg_end && k + 1 < n_sp) seg_end += sp[++k].len;
        size_t ml;
        int32_t id;
        if (t->added_first[(unsigned char)s[i]] &&
            (id = match_added(t, s + i, seg_end - i, sp[k].mode, &ml)) >= 0) {
            if ((st = encode_fragment(&e, s + start, i - start)) != MOE_OK) goto out;
            if (push_id(&e, id) != MOE_OK) {
                st = MOE_ENOMEM;
                goto out;
            }
            i += ml;
            start = i;
            continue;
        }
        i++;
    }
    if (start < len) {
        if ((st = encode_fragment(&e, s + start, len - start)) != MOE_OK) goto out;
    }
    /* never NULL on success, so callers may memcmp/free without a check */
    if (!e.ids && !(e.ids = malloc(sizeof *e.ids))) {
        st = MOE_ENOMEM;
        goto out;
    }
    st = MOE_OK;
    *ids = e.ids;
    *n = e.n;
    e.ids = NULL;
out:
    free(owned);
    free(e.ids);
    free(e.sym_id);
    free(e.sym_prev);
    free(e.sym_next);
    free(e.heap);
    free(e.spans);
    free(e.spans2);
    free(e.buf);
    if (e.md) pcre2_match_data_free(e.md);
    return st;
}

int moe_tok_encode(const moe_tok *t, const char *text, size_t len, bool parse_special, bool add_bos,
                   int32_t **ids, size_t *n) {
    if (!t || !ids || !n || (!text && len)) return MOE_EINVAL;
    span_mode one = {len, parse_special ? ADDED_ALL : ADDED_USER};
    return encode_spans(t, text ? text : "", &one, 1, add_bos, ids, n);
}

int moe_tok_encode_segs(const moe_tok *t, const char *text, size_t len, const moe_tok_seg *segs, size_t n_segs,
                        bool add_bos, int32_t **ids, size_t *n) {
    if (!t || !ids || !n || (!text && len) || (!segs && n_segs)) return MOE_EINVAL;
    *ids = NULL;
    *n = 0;
    size_t sum = 0;
    for (size_t k = 0; k < n_segs; k++) {
        if (segs[k].len > len - sum) return MOE_EINVAL;
        sum += segs[k].len;
    }
    if (sum != len) return MOE_EINVAL;
    span_mode stack[16], *sp = n_segs <= 16 ? stack : malloc(n_segs * sizeof *sp);
    if (!sp) return MOE_ENOMEM;
    for (size_t k = 0; k < n_segs; k++) sp[k] = (span_mode){segs[k].len, segs[k].special ? ADDED_ALL : ADDED_TEXT};
    int st = encode_spans(t, text ? text : "", sp, n_segs, add_bos, ids, n);
    if (sp != stack) free(sp);
    return st;
}

/* ---- decode ---- */

struct moe_tok_stream {
    const moe_tok *t;
    bool render_special;
    bool started; /* something emitted (SPM drops one leading space before) */
    unsigned char pend[8];
    size_t n_pend;
    char *out;
    size_t out_cap;
};

/* SentencePiece's decoder drops the dummy-prefix space of the first piece
 * it prints, unless that space came from a byte token (<0x20>). */
static bool spm_strips(const moe_tok *t, int32_t id, const char *piece) {
    return t->kind == MOE_TOK_SPM && t->add_space_prefix && piece[0] == ' ' && t->types[id] != MOE_TOKTYPE_BYTE;
}

moe_tok_stream *moe_tok_stream_new(const moe_tok *t, bool render_special) {
    moe_tok_stream *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->t = t;
    s->render_special = render_special;
    return s;
}

void moe_tok_stream_free(moe_tok_stream *s) {
    if (!s) return;
    free(s->out);
    free(s);
}

static int stream_add(moe_tok_stream *s, const char *p, size_t n, size_t *olen, bool final) {
    size_t need = *olen + (n + s->n_pend) * 3 + 4;
    if (need > s->out_cap) {
        size_t nc = need < 256 ? 256 : need * 2;
        char *o = realloc(s->out, nc);
        if (!o) return MOE_ENOMEM;
        s->out = o, s->out_cap = nc;
    }
    /* pending bytes of an unfinished character go first */
    unsigned char tmp[64];
    const unsigned char *src = (const unsigned char *)p;
    unsigned char *heap = NULL;
    size_t sn = n;
    if (s->n_pend) {
        sn = s->n_pend + n;
        unsigned char *b = sn <= sizeof tmp ? tmp : (heap = malloc(sn));
        if (!b) return MOE_ENOMEM;
        memcpy(b, s->pend, s->n_pend);
        if (n) memcpy(b + s->n_pend, p, n);
        src = b;
    }
    if (sn == 0) return MOE_OK;
    size_t used = moe_utf8_sanitize(src, sn, final, s->t->kind == MOE_TOK_SPM, s->out, olen);
    s->n_pend = sn - used;
    memcpy(s->pend, src + used, s->n_pend);
    free(heap);
    return MOE_OK;
}

int moe_tok_stream_feed(moe_tok_stream *s, int32_t id, const char **delta, size_t *delta_len) {
    const moe_tok *t = s->t;
    if (id < 0 || id >= t->n_vocab) return MOE_EINVAL;
    size_t olen = 0;
    *delta = "";
    *delta_len = 0;
    size_t pl;
    const char *p = moe_tok_piece(t, id, &pl);
    if (t->types[id] == MOE_TOKTYPE_CONTROL && !s->render_special) {
        /* sentencepiece decodes the bytes on either side of an unprinted
         * control piece apart: an unfinished character ends here */
        if (t->kind == MOE_TOK_SPM) {
            int st = stream_add(s, NULL, 0, &olen, true);
            if (st != MOE_OK) return st;
            if (olen) *delta = s->out;
            *delta_len = olen;
            return MOE_OK;
        }
        pl = 0;
    }
    if (pl && !s->started) {
        s->started = true;
        if (spm_strips(t, id, p)) p++, pl--;
    }
    int st = stream_add(s, p, pl, &olen, false);
    if (st != MOE_OK) return st;
    if (olen) *delta = s->out;
    *delta_len = olen;
    return MOE_OK;
}

int moe_tok_stream_flush(moe_tok_stream *s, const char **delta, size_t *delta_len) {
    size_t olen = 0;
    *delta = "";
    *delta_len = 0;
    int st = stream_add(s, NULL, 0, &olen, true);
    if (st != MOE_OK) return st;
    if (olen) *delta = s->out;
    *delta_len = olen;
    s->n_pend = 0;
    s->started = false;
    return MOE_OK;
}

int moe_tok_decode(const moe_tok *t, const int32_t *ids, size_t n, bool render_special, char **out,
                   size_t *out_len) {
    if (!t || !out || (!ids && n)) return MOE_EINVAL;
    *out = NULL;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        size_t pl;
        if (!moe_tok_piece(t, ids[i], &pl)) return MOE_EINVAL;
        total += pl;
    }
    char *raw = malloc(total + 1), *res = malloc(total * 3 + 1);
    if (!raw || !res) {
        free(raw);
        free(res);
        return MOE_ENOMEM;
    }
    size_t m = 0, seg = 0, ol = 0;
    bool started = false, spm = t->kind == MOE_TOK_SPM;
    for (size_t i = 0; i < n; i++) {
        size_t pl;
        const char *p = moe_tok_piece(t, ids[i], &pl);
        if (t->types[ids[i]] == MOE_TOKTYPE_CONTROL && !render_special) {
            if (spm) { /* as in the stream: bytes do not join across it */
                moe_utf8_sanitize((const unsigned char *)raw + seg, m - seg, true, spm, res, &ol);
                seg = m;
            }
            continue;
        }
        if (pl && !started) {
            started = true;
            if (spm_strips(t, ids[i], p)) p++, pl--;
        }
        memcpy(raw + m, p, pl);
        m += pl;
    }
    moe_utf8_sanitize((const unsigned char *)raw + seg, m - seg, true, spm, res, &ol);
    res[ol] = 0;
    free(raw);
    *out = res;
    if (out_len) *out_len = ol;
    return MOE_OK;
}
