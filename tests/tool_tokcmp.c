/* tool_tokcmp.c - line-oriented tokenizer driver for differential fuzzing
 * against Hugging Face tokenizers / sentencepiece (tests/fuzz_tokenizers.py).
 *
 *   tool_tokcmp MODEL.gguf enc   stdin: one hex-encoded text per line
 *                                out:   ids(parse_special=1) TAB decode(those ids, special) as hex
 *                                       TAB ids(parse_special=0)
 *   tool_tokcmp MODEL.gguf dec   stdin: one line of space-separated ids
 *                                out:   decode(special) hex TAB stream-ok TAB decode(plain) hex TAB
 *                                       stream-ok
 * stream-ok is 1 when feeding the ids one by one to a moe_tok_stream gave
 * deltas that are each whole UTF-8 and concatenate to the one-shot decode. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "tokenizer.h"

static void put_hex(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) printf("%02x", (unsigned char)s[i]);
}

static int stream_ok(const moe_tok *t, const int32_t *ids, size_t n, bool special, const char *want, size_t wl) {
    moe_tok_stream *s = moe_tok_stream_new(t, special);
    if (!s) return 0;
    size_t al = 0;
    int ok = 1;
    for (size_t i = 0; i <= n && ok; i++) {
        const char *d;
        size_t dl;
        int st = i < n ? moe_tok_stream_feed(s, ids[i], &d, &dl) : moe_tok_stream_flush(s, &d, &dl);
        if (st != MOE_OK || al + dl > wl || memcmp(want + al, d, dl) != 0) ok = 0;
        for (size_t j = 0; ok && j < dl;) {
            int k = moe_utf8_next((const unsigned char *)d + j, dl - j);
            if (k <= 0) ok = 0;
            else j += (size_t)k;
        }
        al += dl;
    }
    moe_tok_stream_free(s);
    return ok && al == wl;
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[2], "enc") != 0 && strcmp(argv[2], "dec") != 0)) {
        fprintf(stderr, "usage: tool_tokcmp MODEL.gguf enc|dec < lines\n");
        return 2;
    }
    bool enc = strcmp(argv[2], "enc") == 0;
    int st;
    char err[256];
    moe_gguf *g = moe_gguf_open(argv[1], &st, err, sizeof err);
    if (!g) {
        fprintf(stderr, "%s: %s\n", argv[1], err);
        return 1;
    }
    moe_tok *t = moe_tok_load(g, &st, err, sizeof err);
    if (!t) {
        fprintf(stderr, "%s: %s\n", argv[1], err);
        moe_gguf_close(g);
        return 1;
    }
    size_t cap = 1 << 16;
    char *line = malloc(cap), *buf = malloc(cap);
    int32_t *ids = malloc(cap * sizeof *ids);
    int rc = line && buf && ids ? 0 : 1;
    size_t ll = 0;
    int c = 0;
    while (rc == 0 && c != EOF) {
        /* read one line of any length */
        ll = 0;
        while ((c = getchar()) != EOF && c != '\n') {
            if (ll + 1 >= cap) {
                cap *= 2;
                char *a = realloc(line, cap), *b = realloc(buf, cap);
                int32_t *d = realloc(ids, cap * sizeof *ids);
                if (a) line = a;
                if (b) buf = b;
                if (d) ids = d;
                if (!a || !b || !d) {
                    rc = 1;
                    break;
                }
            }
            line[ll++] = (char)c;
        }
        if (rc || (c == EOF && ll == 0)) break;
        line[ll] = 0;
        if (enc) {
            size_t n = 0;
            for (size_t i = 0; i + 1 < ll; i += 2) {
                char h[3] = {line[i], line[i + 1], 0};
                buf[n++] = (char)strtol(h, NULL, 16);
            }
            for (int sp = 1; sp >= 0 && rc == 0; sp--) {
                int32_t *out;
                size_t k;
                if (moe_tok_encode(t, buf, n, sp, false, &out, &k) != MOE_OK) {
                    rc = 1;
                    break;
                }
                for (size_t i = 0; i < k; i++) printf("%s%d", i ? " " : "", out[i]);
                putchar(sp ? '\t' : '\n');
                if (sp) {
                    char *d;
                    size_t dl;
                    if (moe_tok_decode(t, out, k, true, &d, &dl) != MOE_OK) rc = 1;
                    else put_hex(d, dl), free(d);
                    putchar('\t');
                }
                free(out);
            }
        } else {
            size_t n = 0;
            char *p = line, *e;
            for (;;) {
                long v = strtol(p, &e, 10);
                if (e == p) break;
                ids[n++] = (int32_t)v;
                p = e;
            }
            for (int sp = 1; sp >= 0; sp--) {
                char *d;
                size_t dl;
                if (moe_tok_decode(t, ids, n, sp, &d, &dl) != MOE_OK) {
                    rc = 1;
                    break;
                }
                put_hex(d, dl);
                printf("\t%d%c", stream_ok(t, ids, n, sp, d, dl), sp ? '\t' : '\n');
                free(d);
            }
        }
        fflush(stdout);
    }
    free(line);
    free(buf);
    free(ids);
    moe_tok_free(t);
    moe_gguf_close(g);
    return rc;
}
