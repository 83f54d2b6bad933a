/* cmd_tokenize.c - `moed tokenize` / `moed detokenize`: the model's
 * tokenizer from the command line, for debugging prompts and fixtures. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "gguf.h"
#include "tokenizer.h"

static void usage_tok(FILE *f) {
    fprintf(f,
            "usage: moed tokenize -m MODEL [--ids] [--special] [--bos] TEXT\n"
            "  Prints one line per token (id, then the vocabulary string and the decoded\n"
            "  piece, quoted), or with --ids only the ids on one line.\n"
            "  --special  match control tokens written in TEXT (<|im_start|>...), as the\n"
            "             chat-template path does; user text never gets them otherwise\n"
            "  --bos      prepend BOS (when the model has one)\n"
            "  -f FILE    read the text from FILE ('-' for stdin) instead of TEXT\n");
}

static void usage_detok(FILE *f) {
    fprintf(f,
            "usage: moed detokenize -m MODEL [--special] ID...\n"
            "  Prints the text of the ids; --special also renders control tokens.\n");
}

/* Quoted, with control bytes and quotes escaped, so pieces stay visible. */
static void put_quoted(const char *s, size_t n) {
    putchar('\'');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\n') fputs("\\n", stdout);
        else if (c == '\t') fputs("\\t", stdout);
        else if (c == '\r') fputs("\\r", stdout);
        else if (c == '\\' || c == '\'') printf("\\%c", c);
        else if (c < 0x20 || c == 0x7f) printf("\\x%02x", c);
        else putchar(c);
    }
    putchar('\'');
}

static moe_tok *open_tok(const char *path, moe_gguf **g) {
    char err[MOE_ERR_MAX];
    int st;
    *g = moe_gguf_open(path, &st, err, sizeof err);
    if (!*g) {
        fprintf(stderr, "moed: %s: %s\n", path, err);
        return NULL;
    }
    moe_tok *t = moe_tok_load(*g, &st, err, sizeof err);
    if (!t) {
        fprintf(stderr, "moed: %s: %s\n", path, err);
        moe_gguf_close(*g);
        *g = NULL;
    }
    return t;
}

static char *read_all(const char *path, size_t *len) {
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    while (b) {
        size_t r = fread(b + n, 1, cap - n, f);
        n += r;
        if (r == 0) break;
        if (n == cap) {
            char *nb = realloc(b, cap *= 2);
            if (!nb) free(b);
            b = nb;
        }
    }
    if (f != stdin) fclose(f);
    *len = n;
    return b;
}

enum { OPT_IDS = 256, OPT_SPECIAL, OPT_BOS, OPT_HELP };

int srv_cmd_tokenize(int argc, char **argv) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'}, {"file", required_argument, 0, 'f'},
                                         {"ids", no_argument, 0, OPT_IDS},      {"special", no_argument, 0, OPT_SPECIAL},
                                         {"bos", no_argument, 0, OPT_BOS},      {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *model = NULL, *file = NULL;
    bool ids_only = false, special = false, bos = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:f:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 'f': file = optarg; break;
        case OPT_IDS: ids_only = true; break;
        case OPT_SPECIAL: special = true; break;
        case OPT_BOS: bos = true; break;
        case 'h': usage_tok(stdout); return 0;
        default: usage_tok(stderr); return 2;
        }
    }
    if (!model || (file ? optind != argc : optind != argc - 1)) {
        usage_tok(stderr);
        return 2;
    }
    size_t len;
    char *text;
    if (file) {
        text = read_all(file, &len);
        if (!text) {
            fprintf(stderr, "moed: %s: %s\n", file, strerror(errno));
            return 1;
        }
    } else {
        text = strdup(argv[optind]);
        len = text ? strlen(text) : 0;
    }
    moe_gguf *g;
    moe_tok *t = open_tok(model, &g);
    if (!t || !text) {
        free(text);
        return 1;
    }
    int32_t *ids;
    size_t n;
    int st = moe_tok_encode(t, text, len, special, bos, &ids, &n);
    if (st != MOE_OK) {
        fprintf(stderr, "moed: tokenize: %s\n", moe_strerror(st));
    } else if (ids_only) {
        for (size_t i = 0; i < n; i++) printf("%s%d", i ? " " : "", ids[i]);
        putchar('\n');
    } else {
        for (size_t i = 0; i < n; i++) {
            size_t tl, pl;
            const char *tx = moe_tok_text(t, ids[i], &tl);
            const char *pc = moe_tok_piece(t, ids[i], &pl);
            printf("%6d ", ids[i]);
            put_quoted(tx, tl);
            putchar(' ');
            put_quoted(pc, pl);
            putchar('\n');
        }
    }
    free(ids);
    free(text);
    moe_tok_free(t);
    moe_gguf_close(g);
    return st == MOE_OK ? 0 : 1;
}

int srv_cmd_detokenize(int argc, char **argv) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"special", no_argument, 0, OPT_SPECIAL},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *model = NULL;
    bool special = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case OPT_SPECIAL: special = true; break;
        case 'h': usage_detok(stdout); return 0;
        default: usage_detok(stderr); return 2;
        }
    }
    if (!model || optind >= argc) {
        usage_detok(stderr);
        return 2;
    }
    size_t n = (size_t)(argc - optind);
    int32_t *ids = malloc(n * sizeof *ids);
    if (!ids) return 1;
    for (size_t i = 0; i < n; i++) {
        char *end;
        errno = 0;
        long v = strtol(argv[optind + (int)i], &end, 10);
        if (errno || *end || end == argv[optind + (int)i] || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "moed: detokenize: '%s' is not a token id\n", argv[optind + (int)i]);
            free(ids);
            return 2;
        }
        ids[i] = (int32_t)v;
    }
    moe_gguf *g;
    moe_tok *t = open_tok(model, &g);
    if (!t) {
        free(ids);
        return 1;
    }
    char *out;
    size_t ol;
    int st = moe_tok_decode(t, ids, n, special, &out, &ol);
    if (st == MOE_EINVAL) {
        fprintf(stderr, "moed: detokenize: id out of range (vocabulary has %d tokens)\n", moe_tok_n_vocab(t));
    } else if (st != MOE_OK) {
        fprintf(stderr, "moed: detokenize: %s\n", moe_strerror(st));
    } else {
        fwrite(out, 1, ol, stdout);
        putchar('\n');
        free(out);
    }
    free(ids);
    moe_tok_free(t);
    moe_gguf_close(g);
    return st == MOE_OK ? 0 : (st == MOE_EINVAL ? 2 : 1);
}
