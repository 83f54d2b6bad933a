/* cmd_generate.c - `moed generate`: one prompt through the forward pass and
 * the paged KV cache on the CPU backend, for debugging and quick checks.
 *
 *   moed generate -m MODEL (--ids 1,2,3 | -p TEXT) [-n N] [--temp T]
 *                 [--seed S] [--threads N]
 *
 * Greedy at --temp 0 (the default), else sampling from softmax(logits / T)
 * with a seeded generator, so runs are reproducible. A text prompt (-p)
 * is tokenized with the model's own tokenizer (BOS as the model asks) and
 * the continuation is printed as text, streamed, stopping early at an
 * end-of-generation token; a prompt of token ids (--ids) prints the
 * generated ids one per line. Timing goes to stderr. The file is checked
 * by the model loader first (hyper-parameters that would divide by zero
 * are refused), and a step whose logits hold NaN/Inf stops the run with
 * exit status 1, naming the position.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "cli.h"
#include "finite.h"
#include "forward.h"
#include "gguf.h"
#include "kvcache.h"
#include "model.h"
#include "rng.h"
#include "tokenizer.h"

static void usage(FILE *f) {
    fprintf(f, "usage: moed generate -m MODEL (-p TEXT | --ids ID,ID,...) [-n N] [--temp T] [--seed S] [--threads N]\n"
               "  -m, --model PATH    GGUF model file\n"
               "      --ids LIST      prompt as comma-separated token ids\n"
               "  -p, --prompt TEXT   prompt text, tokenized with the model's tokenizer\n"
               "  -n, --n-predict N   tokens to generate (default 16)\n"
               "      --temp T        sampling temperature, 0 = greedy (default 0)\n"
               "      --seed S        sampling seed (default 0)\n"
               "  -t, --threads N     CPU threads (default: all)\n");
}

static int32_t sample(const float *logits, int64_t n, float temp, moe_rng *rng) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    if (temp <= 0) return (int32_t)best;
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += exp(((double)logits[i] - logits[best]) / temp);
    double u = moe_rng_uniform(rng) * sum, acc = 0;
    for (int64_t i = 0; i < n; i++) {
        acc += exp(((double)logits[i] - logits[best]) / temp);
        if (u < acc) return (int32_t)i;
    }
    return (int32_t)best;
}

/* False (with a message) when the logits of position pos hold NaN/Inf:
 * sampling would read them as -inf and print a plausible-looking token. */
static bool logits_finite(const float *logits, int64_t n_vocab, int64_t pos) {
    int64_t bad = moe_nonfinite_find(logits, n_vocab);
    if (bad < 0) return true;
    fprintf(stderr, "moed generate: non-finite logits (%s at token id %lld) at position %lld; the weights hold "
                    "NaN/Inf or overflow (moed info --check finds NaN/Inf tensors)\n",
            moe_nonfinite_kind(logits[bad]), (long long)bad, (long long)pos);
    return false;
}

static int parse_ids(const char *s, int32_t **out, int64_t *n) {
    int64_t cap = 16, k = 0;
    int32_t *v = malloc((size_t)cap * sizeof(int32_t));
    if (!v) return -1;
    while (*s) {
        char *end;
        errno = 0;
        long x = strtol(s, &end, 10);
        if (end == s || errno || x < 0 || x > INT32_MAX) {
            free(v);
            return -1;
        }
        if (k == cap) {
            int32_t *nv = realloc(v, (size_t)(cap *= 2) * sizeof(int32_t));
            if (!nv) {
                free(v);
                return -1;
            }
            v = nv;
        }
        v[k++] = (int32_t)x;
        s = end;
        while (*s == ',' || *s == ' ') s++;
    }
    if (!k) {
        free(v);
        return -1;
    }
    *out = v;
    *n = k;
    return 0;
}

int srv_cmd_generate(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},   {"ids", required_argument, 0, 'i'},
        {"prompt", required_argument, 0, 'p'},  {"n-predict", required_argument, 0, 'n'},
        {"temp", required_argument, 0, 'T'},    {"seed", required_argument, 0, 's'},
        {"threads", required_argument, 0, 't'}, {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *model = NULL, *ids_arg = NULL, *prompt = NULL;
    long n_predict = 16, threads = 0;
    double temp = 0;
    unsigned long long seed = 0;
    optind = 1;
    int c;
    char *end;
    while ((c = getopt_long(argc, argv, "m:p:n:t:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 'i': ids_arg = optarg; break;
        case 'p': prompt = optarg; break;
        case 'n':
            n_predict = strtol(optarg, &end, 10);
            if (*end || n_predict < 0 || n_predict > 1000000) goto bad;
            break;
        case 'T':
            temp = strtod(optarg, &end);
            if (*end || !(temp >= 0) || temp > 100) goto bad;
            break;
        case 's':
            seed = strtoull(optarg, &end, 10);
            if (*end) goto bad;
            break;
        case 't':
            threads = strtol(optarg, &end, 10);
            if (*end || threads < 0 || threads > 1024) goto bad;
            break;
        case 'h': usage(stdout); return 0;
        default: goto bad;
        }
    }
    if (!model || optind != argc || !ids_arg == !prompt) goto bad;
    int32_t *prompt_ids = NULL;
    int64_t n_prompt = 0;
    if (ids_arg && parse_ids(ids_arg, &prompt_ids, &n_prompt)) {
        fprintf(stderr, "moed generate: --ids wants comma-separated non-negative integers\n");
        return 2;
    }

    int rc = 1, st = 0;
    char err[MOE_ERR_MAX] = "";
    moe_backend be = {0};
    moe_fwd *fw = NULL;
    moe_kv_cache *kv = NULL;
    moe_kv_seq seq = {0};
    float *logits = NULL;
    moe_tok *tok = NULL;
    moe_tok_stream *ts = NULL;
    moe_model *m = moe_model_load(model, &st, err, sizeof err);
    if (!m) {
        fprintf(stderr, "moed generate: %s: %s (%s)\n", model, err, moe_strerror(st));
        goto out;
    }
    const moe_gguf *g = moe_model_gguf(m);
    if (prompt) {
        tok = moe_tok_load(g, &st, err, sizeof err);
        if (!tok) {
            fprintf(stderr, "moed generate: %s: tokenizer: %s (%s)\n", model, err, moe_strerror(st));
            goto out;
        }
        size_t n = 0;
        if ((st = moe_tok_encode(tok, prompt, strlen(prompt), false, moe_tok_add_bos_default(tok), &prompt_ids, &n)) ||
            !(ts = moe_tok_stream_new(tok, false))) {
            fprintf(stderr, "moed generate: tokenizing the prompt: %s\n", moe_strerror(st ? st : MOE_ENOMEM));
            goto out;
        }
        n_prompt = (int64_t)n;
        if (!n_prompt) {
            fprintf(stderr, "moed generate: the prompt has no tokens\n");
            goto out;
        }
    }
    if ((st = moe_backend_create("cpu", (int)threads, &be, NULL, err, sizeof err))) {
        fprintf(stderr, "moed generate: %s\n", err);
        goto out;
    }
    fw = moe_fwd_create(m, &be, &st, err, sizeof err);
    if (!fw) {
        fprintf(stderr, "moed generate: %s: %s (%s)\n", model, err, moe_strerror(st));
        goto out;
    }
    int64_t n_vocab = moe_fwd_n_vocab(fw), total = n_prompt + n_predict, bs = 16;
    for (int64_t i = 0; i < n_prompt; i++)
        if (prompt_ids[i] >= n_vocab) {
            fprintf(stderr, "moed generate: token id %d is outside the vocabulary (%lld)\n", prompt_ids[i],
                    (long long)n_vocab);
            goto out;
        }
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, bs, (total + bs - 1) / bs, &ko);
    kv = moe_kv_create(&be, &ko, &st);
    logits = malloc((size_t)n_vocab * sizeof(float));
    int32_t *pos = malloc((size_t)n_prompt * sizeof(int32_t)), *sq = calloc((size_t)n_prompt, sizeof(int32_t));
    uint8_t *want = calloc((size_t)n_prompt, 1);
    if (!kv || !logits || !pos || !sq || !want || moe_kv_seq_reserve(kv, &seq, total)) {
        fprintf(stderr, "moed generate: out of memory for the KV cache\n");
        free(pos);
        free(sq);
        free(want);
        goto out;
    }
    for (int64_t i = 0; i < n_prompt; i++) pos[i] = (int32_t)i;
    want[n_prompt - 1] = 1;
    double t0 = srv_cli_now_s();
    moe_batch b = {.n_tok = n_prompt, .ids = prompt_ids, .pos = pos, .seq = sq, .n_seq = 1, .seqs = &seq,
                   .want_logits = want};
    st = moe_fwd_run(fw, kv, &b, logits);
    free(pos);
    free(sq);
    free(want);
    if (st) {
        fprintf(stderr, "moed generate: prompt: %s\n", moe_strerror(st));
        goto out;
    }
    if (!logits_finite(logits, n_vocab, n_prompt - 1)) goto out;
    double t1 = srv_cli_now_s();
    moe_rng rng;
    moe_rng_seed(&rng, seed);
    long n_gen = 0;
    for (int64_t i = 0; i < n_predict; i++) {
        int32_t id = sample(logits, n_vocab, (float)temp, &rng);
        n_gen++;
        if (ts) {
            const char *delta;
            size_t dlen;
            if (moe_tok_is_eog(tok, id)) break;
            if (!moe_tok_stream_feed(ts, id, &delta, &dlen)) fwrite(delta, 1, dlen, stdout);
        } else {
            printf("%d\n", id);
        }
        fflush(stdout);
        if (i + 1 == n_predict) break;
        int32_t p = (int32_t)(n_prompt + i), s0 = 0;
        moe_batch d = {.n_tok = 1, .ids = &id, .pos = &p, .seq = &s0, .n_seq = 1, .seqs = &seq};
        if ((st = moe_fwd_run(fw, kv, &d, logits))) {
            fprintf(stderr, "moed generate: decode: %s\n", moe_strerror(st));
            goto out;
        }
        if (!logits_finite(logits, n_vocab, p)) goto out;
    }
    double t2 = srv_cli_now_s();
    if (ts) {
        const char *delta;
        size_t dlen;
        if (!moe_tok_stream_flush(ts, &delta, &dlen)) fwrite(delta, 1, dlen, stdout);
        putchar('\n');
        fflush(stdout); /* before the stats on stderr */
    }
    fprintf(stderr, "moed generate: prompt %lld tokens in %.3f s (%.1f tok/s), %ld generated in %.3f s (%.1f tok/s)\n",
            (long long)n_prompt, t1 - t0, (double)n_prompt / (t1 - t0), n_gen, t2 - t1,
            n_gen > 1 ? (double)(n_gen - 1) / (t2 - t1) : 0.0);
    rc = 0;
out:
    moe_kv_seq_release(kv, &seq);
    moe_kv_destroy(kv);
    moe_fwd_free(fw);
    moe_backend_destroy(&be);
    moe_tok_stream_free(ts);
    moe_tok_free(tok);
    moe_model_free(m);
    free(logits);
    free(prompt_ids);
    return rc;
bad:
    usage(stderr);
    return 2;
}
