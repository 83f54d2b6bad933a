/* cmd_bench.c - `moed bench`: prefill and decode speed of one model next to
 * the memory read bandwidth measured in the same run.
 *
 *   moed bench -m MODEL [--threads N] [--prompt N] [--gen N] [--batch LIST]
 *              [--device cpu|cuda] [--bw-mib N] [--json]
 *
 * Decode on a CPU is bound by memory reads, so the number that says how
 * good a decode step is, is the bytes it had to read per second compared
 * with what the memory delivers. The bench therefore:
 *  1. measures the read bandwidth with the same thread count (a streaming
 *     sum over a buffer far larger than the last-level cache, best of 5,
 *     measured again between the phases; the best of all is reported);
 *  2. faults every weight page in, so no step pays for page-cache misses;
 *  3. prefills one sequence of --prompt random token ids in one step;
 *  4. decodes --gen steps at batch 1 and at each --batch size B: B
 *     sequences that share the prompt's cached blocks (prefix sharing, as
 *     the scheduler does for n > 1) each feed one random token per step.
 *     The batch sizes take turns, one step each (rotating who goes first),
 *     with one bandwidth pass after each round, so on a shared machine a
 *     busy spell slows all of them alike and their ratios stay comparable.
 *     The forward pass counts what each step read (moe_fwd_last_traffic):
 *     dense weights once, the distinct experts the step selected, and the
 *     KV slots attention read; their sum over the step time is the
 *     effective GB/s, printed with its ratio to the measured bandwidth, and
 *     the aggregate tok/s of batch B is compared with batch 1.
 * With --device cuda (a `make CUDA=1` build on a machine with a GPU) the
 * same steps run on the CUDA backend and the bandwidth is the device's:
 * the best timing of device-to-device copies (read + write), before and
 * after the phases; the host bandwidth passes are skipped. Counting the
 * selected experts downloads each MoE layer's routing, one small
 * synchronisation per layer that a serving step does not pay.
 * It drives the forward pass and KV cache directly (not the engine
 * thread), so scheduling and sampling costs are not in the numbers.
 * Decode inputs are random ids rather than sampled tokens: the speed does
 * not depend on which tokens they are, only on which experts they pick.
 * Energy: the source (engine/energy.h, as `moed serve` picks it) is read
 * right before and after every timed pass, so bandwidth passes between
 * rounds are not in the joules; J/token and $/1M tokens follow from them
 * and the prices (docs/cost.md).
 */
#include <errno.h>
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"
#include "cli.h"
#include "cpu_matmul.h"
#include "config.h"
#include "cpu_membw.h"
#include "energy.h"
#include "forward.h"
#include "gguf.h"
#include "kvcache.h"
#include "metrics.h"
#include "model.h"
#include "rng.h"
#include "threadpool.h"
#ifdef MOE_HAVE_CUDA
#include "cuda_backend.h"
#endif

#define MAX_BATCHES 16
#define BLOCK 16

static void usage(FILE *f) {
    fprintf(f,
            "usage: moed bench -m MODEL [--threads N] [--prompt N] [--gen N] [--batch LIST] [--device cpu|cuda]\n"
            "                  [--bw-mib N] [--json]\n"
            "Measures, in one run: the memory read bandwidth (all threads summing a buffer far larger than the\n"
            "cache; best of 5 passes first, then one pass after every decode round, the best of all kept),\n"
            "prefill tok/s of one prompt, and decode tok/s at batch 1 and at each batch size B (B sequences\n"
            "decoding together, aggregate tok/s; the batch sizes take turns step by step, so a busy machine slows\n"
            "them alike). For decode it prints the bytes a step had to read (dense weights, the distinct experts\n"
            "selected, KV cache) per second and their ratio to the measured bandwidth, each batch's speed-up over\n"
            "batch 1 and the speed-up those bytes allow. Prompt and decode tokens are random ids.\n"
            "MOE_FWD_PROFILE=1 in the environment prints time per forward-pass op at exit (stderr).\n"
            "  -m, --model PATH    GGUF model file\n"
            "  -t, --threads N     CPU threads, for the bandwidth and the model (default: all online CPUs)\n"
            "      --prompt N      prompt tokens prefilled in one step (default 128)\n"
            "      --gen N         timed decode steps per batch size (default 32)\n"
            "      --batch LIST    comma-separated decode batch sizes (default 1,8,32); batch 1 always runs\n"
            "      --device DEV    cpu (default) or cuda (a CUDA build on a GPU host)\n"
            "      --bw-mib N      bandwidth buffer in MiB (default 1024)\n"
            "      --json          one JSON object on stdout instead of text\n"
            "      --energy-source S  auto, nvml, rapl, estimate or off, as for moed serve (default auto)\n"
            "      --energy-busy-watts W, --energy-idle-watts W  the estimate's power (defaults as moed serve)\n"
            "      --cost-per-hour USD, --energy-price USD_PER_KWH  prices for $/1M tokens (default 0)\n");
}

/* Bytes per second: the best of `passes` host passes over buf, or of the
 * device's copy timings (three, whatever `passes` says); a negative
 * moe_status when it cannot measure. */
static double measure_bw(int use_cuda, cpu_pool *pool, const uint64_t *buf, size_t bytes, int passes) {
#ifdef MOE_HAVE_CUDA
    if (use_cuda) {
        double g = 0;
        int st = cuda_copy_bandwidth(0, bytes, &g);
        return st ? st : g * 1e9;
    }
#else
    (void)use_cuda;
#endif
    return cpu_mem_read_bw_buf(pool, buf, bytes, passes);
}

static int parse_long(const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

/* "1,8,32" -> sizes (deduplicated, order kept). */
static int parse_batches(const char *s, long *out, int *n) {
    *n = 0;
    char buf[256];
    if (strlen(s) >= sizeof buf) return -1;
    strcpy(buf, s);
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        long v;
        if (parse_long(t, 1, 4096, &v)) return -1;
        int dup = 0;
        for (int i = 0; i < *n; i++) dup |= out[i] == v;
        if (dup) continue;
        if (*n == MAX_BATCHES) return -1;
        out[(*n)++] = v;
    }
    return *n ? 0 : -1;
}

/* Reads one byte of every page of every tensor, so the timed steps do not
 * fault the mapped file in. */
static void touch_weights(const moe_gguf *g) {
    uint64_t s = 0;
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        const volatile uint8_t *p = t->data;
        for (uint64_t o = 0; o < t->nbytes; o += 4096) s += p[o];
    }
    volatile uint64_t sink = s;
    (void)sink;
}

typedef struct dec_res {
    long batch;
    int64_t steps;
    double seconds;
    double tok_s;
    double dense, expert, kv; /* bytes per step, averaged */
    double experts_per_layer; /* distinct experts per MoE layer per step */
    double gbs, ratio, speedup;
    double bound; /* batch * bytes of a batch-1 step / bytes of this step */
    double best_gbs, best_ratio; /* the fastest step alone: best-of, like the bandwidth */
    double joules;               /* energy of the timed steps (0 without a source) */
    double median_ratio;         /* gbs over the median bandwidth pass between rounds */
} dec_res;

typedef struct bench {
    moe_fwd *fw;
    moe_kv_cache *kv;
    moe_kv_seq prompt; /* the prefilled prompt, shared by every decode sequence */
    int64_t n_prompt, n_vocab, n_moe_layers;
    moe_rng rng;
    float *logits;
    moe_energy_meter *em; /* NULL: energy off */
} bench;

/* Closes the interval before a timed pass (what came before is not the
 * pass's). */
static void energy_mark(bench *bn) {
    double j, s;
    if (bn->em) moe_energy_meter_read(bn->em, false, &j, &s);
}

/* The joules of the pass since energy_mark. */
static double energy_since(bench *bn) {
    double j = 0, s;
    if (bn->em) moe_energy_meter_read(bn->em, true, &j, &s);
    return j;
}

/* One decode batch size: nb sequences continuing the prompt. */
typedef struct dec_set {
    long nb;
    moe_kv_seq *seqs;
    int32_t *ids, *pos, *sq;
    uint8_t *want;
    double dense, expert, kv, reads; /* sums over the timed steps */
    dec_res r;
} dec_set;

static void set_close(bench *bn, dec_set *d) {
    for (long s = 0; d->seqs && s < d->nb; s++) moe_kv_seq_release(bn->kv, &d->seqs[s]);
    free(d->seqs);
    free(d->ids);
    free(d->pos);
    free(d->sq);
    free(d->want);
    d->seqs = NULL;
    d->ids = d->pos = d->sq = NULL;
    d->want = NULL;
}

/* Takes the KV blocks for `steps` + 1 steps and computes the prompt's last
 * partial block for each sequence (untimed). */
static int set_open(bench *bn, dec_set *d, long nb, int64_t steps) {
    int rc = MOE_OK;
    int64_t shared = bn->n_prompt / BLOCK, rest = bn->n_prompt % BLOCK, total = bn->n_prompt + steps + 1;
    memset(d, 0, sizeof *d);
    d->nb = nb;
    d->r.batch = nb;
    d->r.steps = steps;
    d->seqs = calloc((size_t)nb, sizeof *d->seqs);
    int64_t cap = nb * (rest > 1 ? rest : 1);
    d->ids = malloc((size_t)cap * sizeof(int32_t));
    d->pos = malloc((size_t)cap * sizeof(int32_t));
    d->sq = malloc((size_t)cap * sizeof(int32_t));
    d->want = calloc((size_t)cap, 1);
    if (!d->seqs || !d->ids || !d->pos || !d->sq || !d->want) return MOE_ENOMEM;
    for (long s = 0; s < nb && !rc; s++) {
        rc = moe_kv_seq_share(bn->kv, &d->seqs[s], &bn->prompt, shared);
        if (!rc) rc = moe_kv_seq_reserve(bn->kv, &d->seqs[s], total);
    }
    if (rc || !rest) return rc;
    /* the prompt's last partial block is each sequence's own: decode
     * would write into it, so it cannot be shared */
    for (long s = 0; s < nb; s++)
        for (int64_t i = 0; i < rest; i++) {
            int64_t k = s * rest + i;
            d->ids[k] = (int32_t)(moe_rng_next(&bn->rng) % (uint64_t)bn->n_vocab);
            d->pos[k] = (int32_t)(shared * BLOCK + i);
            d->sq[k] = (int32_t)s;
        }
    moe_batch b = {.n_tok = nb * rest, .ids = d->ids, .pos = d->pos, .seq = d->sq, .n_seq = nb, .seqs = d->seqs,
                   .want_logits = d->want};
    return moe_fwd_run(bn->fw, bn->kv, &b, bn->logits);
}

/* One decode step of every sequence; step 0 is not timed (scratch growth,
 * cold caches). */
static int set_step(bench *bn, dec_set *d, int64_t step) {
    for (long s = 0; s < d->nb; s++) {
        d->ids[s] = (int32_t)(moe_rng_next(&bn->rng) % (uint64_t)bn->n_vocab);
        d->pos[s] = (int32_t)(bn->n_prompt + step);
        d->sq[s] = (int32_t)s;
    }
    moe_batch b = {.n_tok = d->nb, .ids = d->ids, .pos = d->pos, .seq = d->sq, .n_seq = d->nb, .seqs = d->seqs};
    energy_mark(bn);
    double t0 = srv_cli_now_s();
    int rc = moe_fwd_run(bn->fw, bn->kv, &b, bn->logits);
    double dt = srv_cli_now_s() - t0;
    double j = energy_since(bn);
    if (rc || step == 0) return rc;
    d->r.joules += j;
    moe_fwd_traffic tr;
    moe_fwd_last_traffic(bn->fw, &tr);
    d->r.seconds += dt;
    double g = (double)(tr.dense_bytes + tr.expert_bytes + tr.kv_bytes) / dt / 1e9;
    d->r.best_gbs = g > d->r.best_gbs ? g : d->r.best_gbs;
    d->dense += (double)tr.dense_bytes;
    d->expert += (double)tr.expert_bytes;
    d->kv += (double)tr.kv_bytes;
    d->reads += (double)tr.expert_reads;
    return MOE_OK;
}

static void set_finish(const bench *bn, dec_set *d) {
    dec_res *r = &d->r;
    double n = (double)r->steps;
    r->tok_s = n * (double)d->nb / r->seconds;
    r->dense = d->dense / n;
    r->expert = d->expert / n;
    r->kv = d->kv / n;
    r->experts_per_layer = bn->n_moe_layers ? d->reads / n / (double)bn->n_moe_layers : 0;
    r->gbs = (d->dense + d->expert + d->kv) / r->seconds / 1e9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void json_str(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') printf("\\%c", ch);
        else if (ch < 0x20) printf("\\u%04x", ch);
        else putchar(ch);
    }
    putchar('"');
}

int srv_cmd_bench(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},  {"threads", required_argument, 0, 't'},
        {"prompt", required_argument, 0, 'p'}, {"gen", required_argument, 0, 'g'},
        {"batch", required_argument, 0, 'b'},  {"device", required_argument, 0, 'd'},
        {"bw-mib", required_argument, 0, 'w'}, {"json", no_argument, 0, 'j'},
        {"help", no_argument, 0, 'h'},         {"energy-source", required_argument, 0, 'E'},
        {"energy-busy-watts", required_argument, 0, 'B'}, {"energy-idle-watts", required_argument, 0, 'I'},
        {"cost-per-hour", required_argument, 0, 'C'}, {"energy-price", required_argument, 0, 'P'},
        {0, 0, 0, 0},
    };
    /* the energy and price settings share `moed serve`'s keys, parsing and defaults */
    srv_config cfg;
    srv_config_init(&cfg);
    char cerr[256];
    const char *model = NULL, *device = "cpu";
    long threads = 0, n_prompt = 128, n_gen = 32, bw_mib = 1024;
    long batches[MAX_BATCHES + 1] = {1, 8, 32};
    int n_batches = 3, json = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "m:t:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 't':
            if (parse_long(optarg, 0, 1024, &threads)) goto bad;
            break;
        case 'p':
            if (parse_long(optarg, 1, 1000000, &n_prompt)) goto bad;
            break;
        case 'g':
            if (parse_long(optarg, 1, 1000000, &n_gen)) goto bad;
            break;
        case 'b':
            if (parse_batches(optarg, batches, &n_batches)) goto bad;
            break;
        case 'd': device = optarg; break;
        case 'w':
            if (parse_long(optarg, 1, 1 << 20, &bw_mib)) goto bad;
            break;
        case 'j': json = 1; break;
        case 'E': case 'B': case 'I': case 'C': case 'P': {
            const char *key = c == 'E' ? "energy_source" : c == 'B' ? "energy_busy_watts" : c == 'I' ? "energy_idle_watts"
                              : c == 'C' ? "cost_per_hour" : "energy_price";
            if (srv_config_set(&cfg, key, optarg, cerr, sizeof cerr)) {
                fprintf(stderr, "moed bench: %s\n", cerr);
                goto bad;
            }
            break;
        }
        case 'h': usage(stdout); srv_config_free(&cfg); return 0;
        default: goto bad;
        }
    }
    if (!model || optind != argc) goto bad;
    int use_cuda = !strcmp(device, "cuda");
    if (!use_cuda && strcmp(device, "cpu")) goto bad;
    if (use_cuda) {
#ifdef MOE_HAVE_CUDA
        int n_dev = 0, no_device = 1;
        const char *why = "";
        int cerr = cuda_device_probe(&n_dev, &no_device, &why);
        if (n_dev <= 0) {
            if (no_device) fprintf(stderr, "moed bench: --device cuda: no CUDA device found\n");
            else fprintf(stderr, "moed bench: --device cuda: CUDA cannot use the GPU: %s (CUDA error %d)\n", why, cerr);
            return 1;
        }
#else
        fprintf(stderr, "moed bench: --device cuda: this moed was built without CUDA (build with make CUDA=1)\n");
        return 1;
#endif
    }
    /* batch 1 first: every other batch is compared with it */
    {
        int k = 0;
        long tmp[MAX_BATCHES + 1];
        tmp[k++] = 1;
        for (int i = 0; i < n_batches; i++)
            if (batches[i] != 1) tmp[k++] = batches[i];
        memcpy(batches, tmp, sizeof tmp);
        n_batches = k;
    }

    int rc = 1, st = 0;
    char err[MOE_ERR_MAX] = "";
    moe_backend be = {0};
    bench bn = {0};
    dec_res res[MAX_BATCHES + 1];
    dec_set sets[MAX_BATCHES + 1];
    memset(sets, 0, sizeof sets);
    double *round_bw = NULL;
    int n_round_bw = 0;
    moe_model *m = NULL; /* the loader validates the hyper-parameters the forward pass reads */
    const moe_gguf *g = NULL;

    /* Bandwidth first, with the model not yet mapped, and again after each
     * phase: on a shared machine one measurement can land in a busy moment,
     * and the best of all is what the memory can deliver. */
    cpu_pool *pool = cpu_pool_create((int)threads, &st);
    if (!pool) {
        fprintf(stderr, "moed bench: threads: %s\n", moe_strerror(st));
        return 1;
    }
    int n_threads = cpu_pool_size(pool);
    size_t bw_bytes = (size_t)bw_mib << 20;
    uint64_t *bw_buf = NULL; /* host passes only */
    if (!use_cuda) {
        bw_buf = malloc(bw_bytes);
        if (!bw_buf) {
            fprintf(stderr, "moed bench: no memory for the %ld MiB bandwidth buffer\n", bw_mib);
            cpu_pool_destroy(pool);
            return 1;
        }
        for (size_t i = 0; i < bw_bytes / 8; i++) bw_buf[i] = i * 2654435761u + 1;
    }
    int bw_passes = use_cuda ? 3 : 5;
    double bw = measure_bw(use_cuda, pool, bw_buf, bw_bytes, bw_passes), bw_first = bw;
    if (bw <= 0) {
        fprintf(stderr, "moed bench: measuring the bandwidth: %s\n", moe_strerror((int)bw));
        free(bw_buf);
        cpu_pool_destroy(pool);
        return 1;
    }
#define REMEASURE()                                                                                                  \
    do {                                                                                                             \
        double b_ = measure_bw(use_cuda, pool, bw_buf, bw_bytes, 3);                                                 \
        bw_passes += 3;                                                                                              \
        bw = b_ > bw ? b_ : bw;                                                                                      \
    } while (0)

    m = moe_model_load(model, &st, err, sizeof err);
    g = moe_model_gguf(m);
    if (!m) {
        fprintf(stderr, "moed bench: %s: %s (%s)\n", model, err, moe_strerror(st));
        goto out;
    }
    if ((st = moe_backend_create(device, n_threads, &be, NULL, err, sizeof err))) {
        fprintf(stderr, "moed bench: %s\n", err);
        goto out;
    }
    bn.fw = moe_fwd_create(m, &be, &st, err, sizeof err);
    if (!bn.fw) {
        fprintf(stderr, "moed bench: %s: %s (%s)\n", model, err, moe_strerror(st));
        goto out;
    }
    moe_fwd_set_count_traffic(bn.fw, true);
    bn.n_prompt = n_prompt;
    bn.n_vocab = moe_fwd_n_vocab(bn.fw);
    moe_rng_seed(&bn.rng, 0x5eed);
    long max_b = 1, sum_b = 0;
    for (int i = 0; i < n_batches; i++) {
        max_b = batches[i] > max_b ? batches[i] : max_b;
        sum_b += batches[i];
    }
    /* the prompt's blocks once, plus each decode sequence's own blocks (all
     * batch sizes are alive at once) */
    int64_t own = (n_prompt % BLOCK + n_gen + 1 + BLOCK - 1) / BLOCK + 1;
    moe_kv_opts ko;
    moe_fwd_kv_opts(bn.fw, BLOCK, (n_prompt + BLOCK - 1) / BLOCK + sum_b * own + 1, &ko);
    round_bw = malloc((size_t)n_gen * sizeof(double));
    bn.kv = moe_kv_create(&be, &ko, &st);
    int64_t max_rows = max_b * (n_prompt % BLOCK > 1 ? n_prompt % BLOCK : 1);
    bn.logits = malloc((size_t)max_rows * (size_t)bn.n_vocab * sizeof(float));
    int32_t *ids = malloc((size_t)n_prompt * sizeof(int32_t)), *pos = malloc((size_t)n_prompt * sizeof(int32_t));
    int32_t *sq = calloc((size_t)n_prompt, sizeof(int32_t));
    uint8_t *want = calloc((size_t)n_prompt, 1);
    if (!bn.kv || !bn.logits || !round_bw || !ids || !pos || !sq || !want || moe_kv_seq_reserve(bn.kv, &bn.prompt, n_prompt)) {
        fprintf(stderr, "moed bench: out of memory for the KV cache or the batch\n");
        free(ids);
        free(pos);
        free(sq);
        free(want);
        goto out;
    }
    {
        /* MoE layers: those whose routing a one-token step reports */
        int64_t K = moe_fwd_n_expert_used(bn.fw);
        moe_kv_seq tmp = {0};
        int32_t id = 1, p0 = 0, s0 = 0;
        touch_weights(g);
        if (!moe_kv_seq_reserve(bn.kv, &tmp, 1)) {
            moe_batch b = {.n_tok = 1, .ids = &id, .pos = &p0, .seq = &s0, .n_seq = 1, .seqs = &tmp};
            moe_fwd_traffic tr;
            if (!moe_fwd_run(bn.fw, bn.kv, &b, bn.logits) && !moe_fwd_last_traffic(bn.fw, &tr) && K > 0)
                bn.n_moe_layers = tr.expert_reads / K;
            moe_kv_seq_release(bn.kv, &tmp);
        }
    }
    for (int64_t i = 0; i < n_prompt; i++) {
        ids[i] = (int32_t)(moe_rng_next(&bn.rng) % (uint64_t)bn.n_vocab);
        pos[i] = (int32_t)i;
    }
    want[n_prompt - 1] = 1;
    moe_batch pb = {.n_tok = n_prompt, .ids = ids, .pos = pos, .seq = sq, .n_seq = 1, .seqs = &bn.prompt,
                    .want_logits = want};
    {
        moe_energy_opts eo = {.source = cfg.energy_source, .idle_watts = cfg.energy_idle_watts,
                              .busy_watts = cfg.energy_busy_watts, .gpu = use_cuda};
        moe_energy_source src;
        if ((st = moe_energy_source_open(&src, &eo, err, sizeof err))) {
            fprintf(stderr, "moed bench: %s\n", err);
            goto out;
        }
        if (src.read && !(bn.em = moe_energy_meter_new(&src, &st))) {
            fprintf(stderr, "moed bench: energy source: %s\n", moe_strerror(st));
            goto out;
        }
    }
    energy_mark(&bn);
    double t0 = srv_cli_now_s();
    st = moe_fwd_run(bn.fw, bn.kv, &pb, bn.logits);
    double t_prefill = srv_cli_now_s() - t0;
    double j_prefill = energy_since(&bn);
    free(ids);
    free(pos);
    free(sq);
    free(want);
    if (st) {
        fprintf(stderr, "moed bench: prefill: %s\n", moe_strerror(st));
        goto out;
    }
    REMEASURE();
    /* The batch sizes take turns, one step each, with one bandwidth pass
     * after every round: a busy spell on a shared machine then slows all of
     * them alike instead of whichever phase it fell in. */
    for (int i = 0; i < n_batches; i++)
        if ((st = set_open(&bn, &sets[i], batches[i], n_gen))) {
            fprintf(stderr, "moed bench: decode at batch %ld: %s\n", batches[i], moe_strerror(st));
            goto out;
        }
    for (int64_t step = 0; step <= n_gen; step++) {
        /* rotating who goes first after the bandwidth pass, so no batch size
         * always meets the workers just woken */
        for (int k = 0, i = (int)(step % n_batches); k < n_batches; k++, i = (i + 1) % n_batches)
            if ((st = set_step(&bn, &sets[i], step))) {
                fprintf(stderr, "moed bench: decode at batch %ld: %s\n", batches[i], moe_strerror(st));
                goto out;
            }
        if (step > 0 && !use_cuda) {
            double b_ = cpu_mem_read_bw_buf(pool, bw_buf, bw_bytes, 1);
            if (b_ > 0) round_bw[n_round_bw++] = b_;
            bw_passes++;
            bw = b_ > bw ? b_ : bw;
        }
    }
    for (int i = 0; i < n_batches; i++) {
        set_finish(&bn, &sets[i]);
        res[i] = sets[i].r;
    }
    double bw_median = 0;
    if (n_round_bw) {
        qsort(round_bw, (size_t)n_round_bw, sizeof(double), cmp_double);
        bw_median = round_bw[n_round_bw / 2];
    }
    REMEASURE();
    for (int i = 0; i < n_batches; i++) {
        dec_res *r = &res[i];
        r->ratio = r->gbs * 1e9 / bw;
        r->best_ratio = r->best_gbs * 1e9 / bw;
        r->median_ratio = bw_median > 0 ? r->gbs * 1e9 / bw_median : 0;
        r->speedup = r->tok_s / res[0].tok_s;
        /* the speed-up if both steps read their bytes at the same rate */
        r->bound = (double)r->batch * (res[0].dense + res[0].expert + res[0].kv) / (r->dense + r->expert + r->kv);
    }

    moe_gguf_str arch = {0};
    moe_gguf_get_str(g, "general.architecture", &arch);
    char archs[64];
    snprintf(archs, sizeof archs, "%.*s", (int)(arch.len < 63 ? arch.len : 63), arch.ptr ? arch.ptr : "");
    double wmb = (double)moe_fwd_weight_bytes(bn.fw) / 1e6;
    /* J per token and $ per 1M tokens of the prefill (index 0) and each decode batch (1..) */
    double jpt[MAX_BATCHES + 2], dpm[MAX_BATCHES + 2];
    const char *esrc = moe_energy_meter_source(bn.em);
    jpt[0] = j_prefill / (double)n_prompt;
    dpm[0] = srv_cost_usd(j_prefill, t_prefill, cfg.cost_per_hour, cfg.energy_price) / (double)n_prompt * 1e6;
    for (int i = 0; i < n_batches; i++) {
        double toks = (double)res[i].steps * (double)res[i].batch;
        jpt[i + 1] = res[i].joules / toks;
        dpm[i + 1] = srv_cost_usd(res[i].joules, res[i].seconds, cfg.cost_per_hour, cfg.energy_price) / toks * 1e6;
    }
    if (json) {
        printf("{\"model\": ");
        json_str(model);
        printf(", \"arch\": ");
        json_str(archs);
        printf(", \"device\": \"%s\", \"isa\": \"%s\", \"threads\": %d, \"n_layer\": %lld, \"moe_layers\": %lld, "
               "\"weight_bytes\": %lld,\n",
               use_cuda ? "cuda" : "cpu", use_cuda ? "cuda" : cpu_isa_name(cpu_isa_get()), n_threads, (long long)moe_fwd_n_layer(bn.fw), (long long)bn.n_moe_layers,
               (long long)moe_fwd_weight_bytes(bn.fw));
        printf(" \"bandwidth\": {\"gbs\": %.3f, \"first_gbs\": %.3f, \"between_steps_median_gbs\": %.3f, \"mib\": %ld, "
               "\"passes\": %d},\n",
               bw / 1e9, bw_first / 1e9, bw_median / 1e9, bw_mib, bw_passes);
        printf(" \"prefill\": {\"tokens\": %ld, \"seconds\": %.9f, \"tok_s\": %.3f},\n", n_prompt, t_prefill,
               (double)n_prompt / t_prefill);
        printf(" \"decode\": [");
        for (int i = 0; i < n_batches; i++) {
            const dec_res *r = &res[i];
            printf("%s\n  {\"batch\": %ld, \"steps\": %lld, \"seconds\": %.9f, \"tok_s\": %.3f, \"ms_per_step\": %.3f, "
                   "\"bytes_per_step\": %.0f, \"dense_bytes_per_step\": %.0f, \"expert_bytes_per_step\": %.0f, "
                   "\"kv_bytes_per_step\": %.0f, \"experts_per_moe_layer\": %.3f, \"gbs\": %.3f, "
                   "\"bandwidth_ratio\": %.4f, \"between_steps_median_ratio\": %.4f, \"best_step_gbs\": %.3f, "
                   "\"best_step_bandwidth_ratio\": %.4f, "
                   "\"speedup\": %.3f, \"bytes_bound_speedup\": %.3f}",
                   i ? "," : "", r->batch, (long long)r->steps, r->seconds, r->tok_s,
                   1e3 * r->seconds / (double)r->steps, r->dense + r->expert + r->kv, r->dense, r->expert, r->kv,
                   r->experts_per_layer, r->gbs, r->ratio, r->median_ratio, r->best_gbs, r->best_ratio, r->speedup, r->bound);
        }
        printf("\n ],\n \"energy\": ");
        if (!esrc) printf("null}\n");
        else {
            printf("{\"source\": \"%s\", \"cost_per_hour\": %.17g, \"energy_price\": %.17g,\n"
                   "  \"prefill\": {\"joules\": %.9g, \"joules_per_token\": %.9g, \"usd_per_1m_tokens\": %.9g},\n"
                   "  \"decode\": [",
                   esrc, cfg.cost_per_hour, cfg.energy_price, j_prefill, jpt[0], dpm[0]);
            for (int i = 0; i < n_batches; i++)
                printf("%s{\"batch\": %ld, \"joules\": %.9g, \"joules_per_token\": %.9g, \"usd_per_1m_tokens\": %.9g}",
                       i ? ", " : "", res[i].batch, res[i].joules, jpt[i + 1], dpm[i + 1]);
            printf("]}}\n");
        }
    } else {
        printf("model: %s (%s, %lld layers, %lld MoE, %.1f MB of weights)\n", model, archs,
               (long long)moe_fwd_n_layer(bn.fw), (long long)bn.n_moe_layers, wmb);
        if (use_cuda) {
            printf("device: cuda (device 0)\n");
            printf("device memory bandwidth: %.2f GB/s (device-to-device copies of %ld MiB, read + write, best of %d "
                   "timings before and after the phases; first %.2f GB/s)\n",
                   bw / 1e9, bw_mib, bw_passes, bw_first / 1e9);
        } else {
            printf("cpu: %d threads, %s kernels\n", n_threads, cpu_isa_name(cpu_isa_get()));
            printf("memory read bandwidth: %.2f GB/s (%d threads, %ld MiB buffer, best of %d passes before, between "
                   "and after the phases; first %.2f GB/s, median of the passes between decode rounds %.2f GB/s)\n",
                   bw / 1e9, n_threads, bw_mib, bw_passes, bw_first / 1e9, bw_median / 1e9);
        }
        printf("prefill: %ld tokens in %.3f s = %.1f tok/s\n", n_prompt, t_prefill, (double)n_prompt / t_prefill);
        printf("decode (%ld steps after the prompt, the batch sizes taking turns; bytes read per step = dense weights + "
               "distinct experts + KV):\n",
               n_gen);
        printf("  batch     tok/s   ms/step  MB/step (dense+experts+kv)    experts/layer     GB/s  of bw  speed-up"
               "  (bytes bound)\n");
        for (int i = 0; i < n_batches; i++) {
            const dec_res *r = &res[i];
            printf("  %5ld %9.2f %9.2f %8.1f (%.0f+%.0f+%.1f) %13.1f %11.2f %5.1f%% %8.2fx  (%.2fx)\n", r->batch,
                   r->tok_s, 1e3 * r->seconds / (double)r->steps, (r->dense + r->expert + r->kv) / 1e6,
                   r->dense / 1e6, r->expert / 1e6, r->kv / 1e6, r->experts_per_layer, r->gbs, 100.0 * r->ratio,
                   r->speedup, r->bound);
        }
        printf("(bytes bound: the speed-up over batch 1 if both steps read their bytes at the same GB/s)\n");
        printf("fastest step (best-of, like the bandwidth):");
        for (int i = 0; i < n_batches; i++)
            printf("%s batch %ld %.2f GB/s = %.1f%%", i ? "," : "", res[i].batch, res[i].best_gbs,
                   100.0 * res[i].best_ratio);
        printf("\n");
        if (!use_cuda) {
            printf("against the median bandwidth pass between rounds (same busy spells):");
            for (int i = 0; i < n_batches; i++)
                printf("%s batch %ld %.1f%%", i ? "," : "", res[i].batch, 100.0 * res[i].median_ratio);
            printf("\n");
        }
        if (esrc) {
            printf("energy (%s%s; $/1M tokens at $%g/h and $%g/kWh): prefill %.4g J/token, $%.4g/1M tokens;",
                   esrc, strcmp(esrc, "estimate") ? "" : ", a model, not a measurement", cfg.cost_per_hour,
                   cfg.energy_price, jpt[0], dpm[0]);
            for (int i = 0; i < n_batches; i++)
                printf("%s decode batch %ld %.4g J/token, $%.4g/1M tokens", i ? "," : "", res[i].batch, jpt[i + 1],
                       dpm[i + 1]);
            printf("\n");
        }
    }
    rc = 0;
out:
    for (int i = 0; i < n_batches; i++) set_close(&bn, &sets[i]);
    free(round_bw);
    moe_kv_seq_release(bn.kv, &bn.prompt);
    moe_kv_destroy(bn.kv);
    moe_fwd_free(bn.fw);
    moe_backend_destroy(&be);
    moe_model_free(m);
    free(bn.logits);
    free(bw_buf);
    cpu_pool_destroy(pool);
    moe_energy_meter_free(bn.em);
    srv_config_free(&cfg);
    return rc;
bad:
    usage(stderr);
    srv_config_free(&cfg);
    return 2;
}
