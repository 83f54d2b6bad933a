/* cmd_perplexity.c - `moed perplexity`: how well a model predicts a text,
 * and how far a (quantized) model's predictions are from a reference run.
 *
 * The method is llama.cpp's perplexity tool's, so the numbers compare:
 * the whole text is tokenized once (with BOS when the model adds one), cut
 * into windows of --ctx tokens, each window is evaluated from an empty
 * cache (its first token replaced by BOS when the model adds BOS), and
 * only the second half is scored: the logits at position j (ctx/2 <= j <
 * ctx-1) against the token at j+1, so every scored token sees at least
 * ctx/2 tokens of context. PPL = exp(mean NLL); the +/- is the standard
 * error of the mean NLL carried through exp (llama.cpp's estimate).
 *
 * Several windows go through one forward step as separate sequences of the
 * paged KV cache (--batch tokens per step), using every thread.
 *
 * --save-logits FILE stores, per scored token, the reference run's top-K
 * log-probs and the log of the probability left to the other tokens;
 * --kl-base FILE compares this run against such a file: KL(base || this)
 * over the K+1 outcomes "each top-K token" and "any other token" (a lower
 * bound of the KL over the full vocabulary, exact when the rest of the
 * mass is negligible), its mean and 99th percentile, and how often both
 * runs' most likely token agree.
 */
#include <errno.h>
#include <getopt.h>
#include <fcntl.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "cli.h"
#include "forward.h"
#include "gguf.h"
#include "kvcache.h"
#include "model.h"
#include "status.h"
#include "tokenizer.h"
#ifdef MOE_HAVE_CUDA
#include "cuda_backend.h"
#endif

#define BLOCK 16
#define LOGITS_MAGIC "MOEPPLK1"
#define TOPK_DEFAULT 32
#define TOPK_MAX 1024

static void usage(FILE *f) {
    fprintf(f, "usage: moed perplexity -m MODEL.gguf -f TEXT [--ctx N] [--chunks N] [--batch N] [--threads N]\n"
               "                       [--device cpu|cuda] [--save-logits FILE [--top-k K]] [--kl-base FILE]\n"
               "  --ctx N          window length in tokens (default 512); the second half of each is scored\n"
               "  --chunks N       score only the first N windows (default: all whole windows in TEXT)\n"
               "  --batch N        tokens per forward step; ctx-sized windows are packed into it (default 2048)\n"
               "  --threads N      CPU threads (default: one per online CPU)\n"
               "  --save-logits F  store each scored token's top-K log-probs for later --kl-base runs\n"
               "  --top-k K        how many log-probs --save-logits keeps per token (default 32, max 1024)\n"
               "  --kl-base F      report KL divergence and top-1 agreement against a --save-logits file\n");
}

static int parse_pos(const char *opt, const char *s, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 1 || v > (1L << 30)) {
        fprintf(stderr, "moed perplexity: %s wants a positive integer, got '%s'\n", opt, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* Header of a --save-logits file; then the n_tok evaluated token ids
 * (int32, windows back to back, BOS substitution already applied), then
 * per scored token, in order: top_k (int32 id, float logprob) pairs, best
 * first, and one float: log of the probability of every other token. */
typedef struct {
    char magic[8];
    uint32_t top_k, ctx, n_vocab, n_chunks;
    double ppl; /* the reference run's PPL */
} logits_hdr;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* log of the total probability of the tokens not marked, summed from the
 * log-probs themselves (1 - top mass would cancel catastrophically);
 * -inf when every token is marked. */
static double log_rest(const double *lp, const uint8_t *mark, int64_t n_vocab) {
    double mx = -INFINITY, sum = 0;
    for (int64_t v = 0; v < n_vocab; v++)
        if (!mark[v] && lp[v] > mx) mx = lp[v];
    if (!isfinite(mx)) return -INFINITY;
    for (int64_t v = 0; v < n_vocab; v++)
        if (!mark[v]) sum += exp(lp[v] - mx);
    return mx + log(sum);
}

int srv_cmd_perplexity(int argc, char **argv) {
    const char *model = NULL, *text_path = NULL, *save = NULL, *kl_base = NULL, *device = "cpu";
    long ctx = 512, chunks = 0, batch = 2048, threads = 0, top_k = TOPK_DEFAULT;
    enum { OPT_SAVE = 256, OPT_KL, OPT_DEVICE, OPT_CHUNKS, OPT_TOPK };
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},    {"file", required_argument, 0, 'f'},
                                         {"ctx", required_argument, 0, 'c'},      {"batch", required_argument, 0, 'b'},
                                         {"threads", required_argument, 0, 't'},  {"chunks", required_argument, 0, OPT_CHUNKS},
                                         {"top-k", required_argument, 0, OPT_TOPK}, {"save-logits", required_argument, 0, OPT_SAVE},
                                         {"kl-base", required_argument, 0, OPT_KL}, {"device", required_argument, 0, OPT_DEVICE},
                                         {"help", no_argument, 0, 'h'},           {0, 0, 0, 0}};
    int c, li = -1;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:f:c:b:t:h", opts, &li)) != -1) {
        char o[32]; /* the flag as typed, for messages */
        if (li >= 0) snprintf(o, sizeof o, "--%s", opts[li].name);
        else snprintf(o, sizeof o, "-%c", c);
        li = -1;
        switch (c) {
        case 'm': model = optarg; break;
        case 'f': text_path = optarg; break;
        case OPT_SAVE: save = optarg; break;
        case OPT_KL: kl_base = optarg; break;
        case OPT_DEVICE: device = optarg; break;
        case 'c': if (parse_pos(o, optarg, &ctx)) return 2; break;
        case 'b': if (parse_pos(o, optarg, &batch)) return 2; break;
        case 't': if (parse_pos(o, optarg, &threads)) return 2; break;
        case OPT_CHUNKS: if (parse_pos(o, optarg, &chunks)) return 2; break;
        case OPT_TOPK: if (parse_pos(o, optarg, &top_k)) return 2; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "moed perplexity: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (!model || !text_path) {
        fprintf(stderr, "moed perplexity: -m MODEL and -f TEXT are required\n");
        usage(stderr);
        return 2;
    }
    if (ctx < 4) {
        fprintf(stderr, "moed perplexity: --ctx must be at least 4, got %ld\n", ctx);
        return 2;
    }
    if (top_k > TOPK_MAX) {
        fprintf(stderr, "moed perplexity: --top-k must be at most %d, got %ld\n", TOPK_MAX, top_k);
        return 2;
    }
    if (strcmp(device, "cpu") && strcmp(device, "cuda")) {
        fprintf(stderr, "moed perplexity: --device must be cpu or cuda, got '%s'\n", device);
        return 2;
    }
#ifndef MOE_HAVE_CUDA
    if (!strcmp(device, "cuda")) {
        fprintf(stderr, "moed perplexity: --device cuda: this moed was built without CUDA\n");
        return 2;
    }
#endif
    if (save && kl_base && !strcmp(save, kl_base)) {
        fprintf(stderr, "moed perplexity: --save-logits and --kl-base name the same file\n");
        return 2;
    }

    int rc = 1, st = 0;
    char err[MOE_ERR_MAX] = "";
    char *text = NULL;
    int32_t *toks = NULL, *ids = NULL, *pos = NULL, *sq = NULL;
    uint8_t *want = NULL;
    float *logits = NULL;
    double *kls = NULL;
    moe_kv_seq *seqs = NULL;
    moe_model *m = NULL;
    moe_tok *tok = NULL;
    moe_backend be = {0};
    moe_fwd *fw = NULL;
    moe_kv_cache *kv = NULL;
    FILE *fsave = NULL, *fbase = NULL;
    char *save_tmp = NULL;
    int64_t n_seq_max = 0;
    float *btop = NULL;
    uint8_t *mark = NULL; /* (n_vocab) scratch: tokens already counted */

    /* the text */
    {
        FILE *f = fopen(text_path, "rb");
        if (!f) {
            fprintf(stderr, "moed perplexity: -f %s: %s\n", text_path, strerror(errno));
            return 1;
        }
        size_t cap = 1 << 16, n = 0;
        text = malloc(cap);
        for (size_t r; text && (r = fread(text + n, 1, cap - n, f)) > 0;) {
            n += r;
            if (n == cap) {
                char *t2 = realloc(text, cap *= 2);
                if (!t2) {
                    free(text);
                    text = NULL;
                }
                text = t2;
            }
        }
        bool bad = ferror(f);
        fclose(f);
        if (!text || bad) {
            fprintf(stderr, "moed perplexity: -f %s: %s\n", text_path, bad ? "read error" : "out of memory");
            free(text);
            return 1;
        }
        text[n] = 0;
        m = moe_model_load(model, &st, err, sizeof err);
        if (!m) {
            fprintf(stderr, "moed perplexity: %s: %s (%s)\n", model, err, moe_strerror(st));
            goto out;
        }
        tok = moe_tok_load(moe_model_gguf(m), &st, err, sizeof err);
        if (!tok) {
            fprintf(stderr, "moed perplexity: %s: tokenizer: %s (%s)\n", model, err, moe_strerror(st));
            goto out;
        }
        size_t nt = 0;
        bool add_bos = moe_tok_add_bos_default(tok) && moe_tok_bos(tok) >= 0;
        if ((st = moe_tok_encode(tok, text, n, false, add_bos, &toks, &nt))) {
            fprintf(stderr, "moed perplexity: tokenizing %s: %s\n", text_path, moe_strerror(st));
            goto out;
        }
        int64_t n_win = (int64_t)nt / ctx;
        if (n_win < 1) {
            fprintf(stderr, "moed perplexity: %s has %zu tokens, fewer than one --ctx window of %ld\n", text_path, nt,
                    ctx);
            rc = 2;
            goto out;
        }
        if (chunks > 0 && chunks < n_win) n_win = chunks;
        chunks = n_win;
        /* the windows as evaluated: BOS first when the model adds it */
        for (int64_t w = 0; w < n_win; w++)
            if (add_bos) toks[w * ctx] = moe_tok_bos(tok);
        fprintf(stderr, "moed perplexity: %zu tokens, %ld windows of %ld, %ld scored per window\n", nt, chunks, ctx,
                ctx - ctx / 2 - 1);
    }

    const long first = ctx / 2, n_score = ctx - first - 1;
    logits_hdr bh = {0};
    if (kl_base) {
        fbase = fopen(kl_base, "rb");
        if (!fbase || fread(&bh, sizeof bh, 1, fbase) != 1 || memcmp(bh.magic, LOGITS_MAGIC, 8) ||
            bh.top_k < 1 || bh.top_k > TOPK_MAX) {
            fprintf(stderr, "moed perplexity: --kl-base %s: %s\n", kl_base,
                    !fbase ? strerror(errno) : "not a file written by --save-logits");
            rc = 2;
            goto out;
        }
        if ((long)bh.ctx != ctx) {
            fprintf(stderr, "moed perplexity: --kl-base %s was made with --ctx %u, this run has --ctx %ld\n", kl_base,
                    bh.ctx, ctx);
            rc = 2;
            goto out;
        }
        if ((long)bh.n_chunks < chunks) chunks = bh.n_chunks;
        size_t nb = (size_t)bh.n_chunks * (size_t)ctx;
        int32_t *bt = malloc(nb * sizeof(int32_t));
        bool same = bt && fread(bt, sizeof(int32_t), nb, fbase) == nb &&
                    !memcmp(bt, toks, (size_t)chunks * (size_t)ctx * sizeof(int32_t));
        free(bt);
        if (!same) {
            fprintf(stderr, "moed perplexity: --kl-base %s was made over other tokens (another text or tokenizer)\n",
                    kl_base);
            rc = 2;
            goto out;
        }
        btop = malloc((size_t)bh.top_k * 8 + 4);
        kls = malloc((size_t)chunks * (size_t)n_score * sizeof(double));
        if (!btop || !kls) {
            fprintf(stderr, "moed perplexity: out of memory\n");
            goto out;
        }
    }

    /* the forward pass */
    if ((st = moe_backend_create(device, (int)threads, &be, NULL, err, sizeof err))) {
        fprintf(stderr, "moed perplexity: %s\n", err);
        goto out;
    }
    fw = moe_fwd_create(m, &be, &st, err, sizeof err);
    if (!fw) {
        fprintf(stderr, "moed perplexity: %s: %s (%s)\n", model, err, moe_strerror(st));
        goto out;
    }
    const int64_t n_vocab = moe_fwd_n_vocab(fw);
    if (kl_base && (int64_t)bh.n_vocab != n_vocab) {
        fprintf(stderr, "moed perplexity: --kl-base %s has a vocabulary of %u, this model %lld\n", kl_base, bh.n_vocab,
                (long long)n_vocab);
        rc = 2;
        goto out;
    }
    if (top_k > n_vocab) top_k = n_vocab;
    n_seq_max = batch / ctx;
    if (n_seq_max < 1) n_seq_max = 1;
    if (n_seq_max > chunks) n_seq_max = chunks;
    {
        int64_t blocks_per = (ctx + BLOCK - 1) / BLOCK;
        moe_kv_opts ko;
        moe_fwd_kv_opts(fw, BLOCK, blocks_per * n_seq_max, &ko);
        kv = moe_kv_create(&be, &ko, &st);
    }
    size_t n_tok_max = (size_t)n_seq_max * (size_t)ctx;
    logits = malloc((size_t)n_seq_max * (size_t)n_score * (size_t)n_vocab * sizeof(float));
    ids = malloc(n_tok_max * sizeof(int32_t));
    pos = malloc(n_tok_max * sizeof(int32_t));
    sq = malloc(n_tok_max * sizeof(int32_t));
    want = calloc(n_tok_max, 1);
    seqs = calloc((size_t)n_seq_max, sizeof *seqs);
    if (!kv || !logits || !ids || !pos || !sq || !want || !seqs) {
        fprintf(stderr, "moed perplexity: out of memory for %lld windows of %ld (lower --batch)\n",
                (long long)n_seq_max, ctx);
        goto out;
    }
    if (save) {
        save_tmp = malloc(strlen(save) + 32);
        if (!save_tmp) goto out;
        sprintf(save_tmp, "%s.tmp%ld", save, (long)getpid());
        fsave = fopen(save_tmp, "wb");
        logits_hdr h = {.top_k = (uint32_t)top_k, .ctx = (uint32_t)ctx, .n_vocab = (uint32_t)n_vocab,
                        .n_chunks = (uint32_t)chunks};
        memcpy(h.magic, LOGITS_MAGIC, 8);
        if (!fsave || fwrite(&h, sizeof h, 1, fsave) != 1 ||
            fwrite(toks, sizeof(int32_t), (size_t)chunks * (size_t)ctx, fsave) != (size_t)chunks * (size_t)ctx) {
            fprintf(stderr, "moed perplexity: --save-logits %s: %s\n", save, strerror(errno));
            goto out;
        }
    }

    double nll = 0, nll2 = 0, t0 = srv_cli_now_s();
    int64_t count = 0, n_kl = 0, n_top1 = 0;
    int32_t *topi = malloc((size_t)top_k * sizeof(int32_t));
    double *lp = malloc((size_t)n_vocab * sizeof(double));
    mark = calloc((size_t)n_vocab, 1);
    if (!topi || !lp || !mark) {
        free(topi);
        free(lp);
        fprintf(stderr, "moed perplexity: out of memory\n");
        goto out;
    }
    for (long c0 = 0; c0 < chunks; c0 += n_seq_max) {
        int64_t ns = chunks - c0 < n_seq_max ? chunks - c0 : n_seq_max;
        int64_t n = 0;
        for (int64_t s = 0; s < ns; s++) {
            if ((st = moe_kv_seq_reserve(kv, &seqs[s], ctx))) break;
            for (long j = 0; j < ctx; j++, n++) {
                ids[n] = toks[(c0 + s) * ctx + j];
                pos[n] = (int32_t)j;
                sq[n] = (int32_t)s;
                want[n] = j >= first && j < ctx - 1;
            }
        }
        moe_batch b = {.n_tok = n, .ids = ids, .pos = pos, .seq = sq, .n_seq = ns, .seqs = seqs, .want_logits = want};
        if (!st) st = moe_fwd_run(fw, kv, &b, logits);
        for (int64_t s = 0; s < ns; s++) moe_kv_seq_release(kv, &seqs[s]);
        if (st) {
            fprintf(stderr, "moed perplexity: forward step: %s\n", moe_strerror(st));
            free(topi);
            free(lp);
            goto out;
        }
        for (int64_t s = 0; s < ns; s++) {
            for (long j = 0; j < n_score; j++) {
                const float *row = logits + ((size_t)s * (size_t)n_score + (size_t)j) * (size_t)n_vocab;
                int32_t target = toks[(c0 + s) * ctx + first + j + 1];
                double mx = row[0];
                int32_t arg = 0;
                for (int64_t v = 1; v < n_vocab; v++)
                    if (row[v] > mx) mx = row[v], arg = (int32_t)v;
                double sum = 0;
                for (int64_t v = 0; v < n_vocab; v++) sum += exp((double)row[v] - mx);
                double lse = mx + log(sum);
                double l = lse - (double)row[target];
                if (!isfinite(l)) {
                    fprintf(stderr, "moed perplexity: window %ld, position %ld: non-finite logits\n", c0 + (long)s + 1,
                            first + j);
                    free(topi);
                    free(lp);
                    goto out;
                }
                nll += l;
                nll2 += l * l;
                count++;
                if (!fsave && !fbase) continue;
                for (int64_t v = 0; v < n_vocab; v++) lp[v] = (double)row[v] - lse;
                if (fsave) {
                    /* top-K by partial selection: K passes are fine for K = 32 */
                    int k = (int)top_k;
                    for (int i = 0; i < k; i++) topi[i] = -1;
                    for (int64_t v = 0; v < n_vocab; v++) {
                        if (topi[k - 1] >= 0 && lp[v] <= lp[topi[k - 1]]) continue;
                        int i = k - 1;
                        while (i > 0 && (topi[i - 1] < 0 || lp[v] > lp[topi[i - 1]])) {
                            topi[i] = topi[i - 1];
                            i--;
                        }
                        topi[i] = (int32_t)v;
                    }
                    for (int i = 0; i < k; i++) {
                        float f = (float)lp[topi[i]];
                        mark[topi[i]] = 1;
                        if (fwrite(&topi[i], 4, 1, fsave) != 1 || fwrite(&f, 4, 1, fsave) != 1) st = MOE_EIO;
                    }
                    float rest = (float)log_rest(lp, mark, n_vocab);
                    for (int i = 0; i < k; i++) mark[topi[i]] = 0;
                    if (fwrite(&rest, 4, 1, fsave) != 1) st = MOE_EIO;
                    if (st) {
                        fprintf(stderr, "moed perplexity: --save-logits %s: %s\n", save, strerror(errno));
                        free(topi);
                        free(lp);
                        goto out;
                    }
                }
                if (fbase) {
                    size_t rec = (size_t)bh.top_k * 8 + 4;
                    if (fread(btop, rec, 1, fbase) != 1) {
                        fprintf(stderr, "moed perplexity: --kl-base %s is truncated\n", kl_base);
                        free(topi);
                        free(lp);
                        rc = 2;
                        goto out;
                    }
                    /* KL(P || Q) over the base's top-K tokens plus "the rest";
                     * Q's log-probs are rounded to float as P's were stored, so
                     * a run against its own file gives exactly 0. */
                    double kl = 0;
                    int32_t b_arg = -1;
                    for (uint32_t i = 0; i < bh.top_k; i++) {
                        int32_t id;
                        float lpb;
                        memcpy(&id, (char *)btop + i * 8, 4);
                        memcpy(&lpb, (char *)btop + i * 8 + 4, 4);
                        if (id < 0 || id >= n_vocab || mark[id]) continue;
                        mark[id] = 1;
                        if (i == 0) b_arg = id;
                        double lq = (double)(float)lp[id];
                        if (isfinite(lpb)) kl += exp((double)lpb) * ((double)lpb - lq);
                    }
                    float rest;
                    memcpy(&rest, (char *)btop + bh.top_k * 8, 4);
                    double lq_rest = (double)(float)log_rest(lp, mark, n_vocab);
                    if (isfinite(rest)) kl += exp((double)rest) * ((double)rest - lq_rest);
                    for (uint32_t i = 0; i < bh.top_k; i++) {
                        int32_t id;
                        memcpy(&id, (char *)btop + i * 8, 4);
                        if (id >= 0 && id < n_vocab) mark[id] = 0;
                    }
                    kls[n_kl++] = kl;
                    n_top1 += b_arg == arg;
                }
            }
            printf("[%ld]%.4f,", c0 + (long)s + 1, exp(nll / (double)count));
        }
        fflush(stdout);
    }
    free(topi);
    free(lp);
    printf("\n");
    double mean = nll / (double)count, var = nll2 / (double)count - mean * mean;
    double ppl = exp(mean), se = var > 0 && count > 1 ? sqrt(var / (double)(count - 1)) * ppl : 0;
    printf("PPL = %.4f +/- %.5f\n", ppl, se);
    fprintf(stderr, "moed perplexity: %lld tokens scored in %.1f s (%ld windows, %lld per step)\n", (long long)count,
            srv_cli_now_s() - t0, chunks, (long long)n_seq_max);
    if (fbase && n_kl > 0) {
        double s = 0;
        for (int64_t i = 0; i < n_kl; i++) s += kls[i];
        qsort(kls, (size_t)n_kl, sizeof(double), cmp_double);
        int64_t i99 = (int64_t)ceil(0.99 * (double)n_kl) - 1;
        if (i99 < 0) i99 = 0;
        printf("base PPL = %.4f, this PPL = %.4f, delta = %+.3f %%\n", bh.ppl, ppl, 100.0 * (ppl / bh.ppl - 1.0));
        printf("KL divergence: mean = %.6f, p99 = %.6f, max = %.6f (over %lld tokens)\n", s / (double)n_kl, kls[i99],
               kls[n_kl - 1], (long long)n_kl);
        printf("top-1 agreement: %.3f %%\n", 100.0 * (double)n_top1 / (double)n_kl);
    }
    if (fsave) {
        logits_hdr h = {.top_k = (uint32_t)top_k, .ctx = (uint32_t)ctx, .n_vocab = (uint32_t)n_vocab,
                        .n_chunks = (uint32_t)chunks, .ppl = ppl};
        memcpy(h.magic, LOGITS_MAGIC, 8);
        bool ok = fseek(fsave, 0, SEEK_SET) == 0 && fwrite(&h, sizeof h, 1, fsave) == 1;
        ok = fclose(fsave) == 0 && ok;
        fsave = NULL;
        if (!ok || rename(save_tmp, save)) {
            fprintf(stderr, "moed perplexity: --save-logits %s: %s\n", save, strerror(errno));
            goto out;
        }
        free(save_tmp);
        save_tmp = NULL;
    }
    rc = 0;
out:
    if (fsave) fclose(fsave);
    if (save_tmp) unlink(save_tmp);
    free(save_tmp);
    if (fbase) fclose(fbase);
    free(btop);
    free(mark);
    free(kls);
    for (int64_t s = 0; seqs && kv && s < n_seq_max; s++) moe_kv_seq_release(kv, &seqs[s]);
    free(seqs);
    moe_kv_destroy(kv);
    moe_fwd_free(fw);
    if (be.ops) moe_backend_destroy(&be);
    moe_tok_free(tok);
    moe_model_free(m);
    free(logits);
    free(ids);
    free(pos);
    free(sq);
    free(want);
    free(toks);
    free(text);
    return rc;
}
