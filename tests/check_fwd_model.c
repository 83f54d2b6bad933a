/* check_fwd_model.c - the forward pass as a consumer of model.c, and its
 * no-allocation contract.
 *
 * Rope scaling is interpreted once, in model.c: a file with a factor and
 * no type is linear scaling there (as llama.cpp reads it), and the forward
 * pass must compute exactly what it computes for the explicit type; a
 * named linear factor of 0 is refused at load, an untyped 0 means none. Then: a steady-state decode step calls no
 * allocator. This binary interposes malloc/calloc/realloc/aligned
 * allocation (through dlsym(RTLD_NEXT), so it also composes with ASan's
 * allocator) and counts calls from every thread while a window is open.
 */
#include <check.h>
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "forward.h"
#include "gguf.h"
#include "kvcache.h"
#include "model.h"

#define FIXDIR MOE_SRC_DIR "/tests/fixtures/models/"

/* ---- the counting interposer ---- */

static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static void (*real_free)(void *);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);
static atomic_long n_allocs;
static atomic_int counting;
/* dlsym may itself allocate: those few calls are served from here */
static _Alignas(16) char boot[4096];
static size_t boot_used;
static __thread int resolving;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void resolve(void) {
    resolving = 1;
    real_malloc = (void *(*)(size_t))dlsym(RTLD_NEXT, "malloc");
    real_calloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "calloc");
    real_realloc = (void *(*)(void *, size_t))dlsym(RTLD_NEXT, "realloc");
    real_free = (void (*)(void *))dlsym(RTLD_NEXT, "free");
    real_posix_memalign = (int (*)(void **, size_t, size_t))dlsym(RTLD_NEXT, "posix_memalign");
    real_aligned_alloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "aligned_alloc");
    resolving = 0;
}

static void *boot_alloc(size_t n) {
    n = (n + 15) & ~(size_t)15;
    if (boot_used + n > sizeof boot) return NULL;
    void *p = boot + boot_used;
    boot_used += n;
    return p;
}

static bool ready(void) {
    if (resolving) return false;
    pthread_once(&once, resolve);
    return true;
}

static void tick(void) {
    if (atomic_load_explicit(&counting, memory_order_relaxed)) atomic_fetch_add(&n_allocs, 1);
}

void *malloc(size_t n) {
    if (!ready()) return boot_alloc(n);
    tick();
    return real_malloc(n);
}

void *calloc(size_t a, size_t b) {
    if (!ready()) return boot_alloc(a * b); /* static storage is zeroed */
    tick();
    return real_calloc(a, b);
}

void *realloc(void *p, size_t n) {
    if (!ready()) return NULL;
    tick();
    return real_realloc(p, n);
}

void free(void *p) {
    if ((char *)p >= boot && (char *)p < boot + sizeof boot) return;
    if (!ready()) return;
    real_free(p);
}

int posix_memalign(void **out, size_t al, size_t n) {
    if (!ready()) return -1;
    tick();
    return real_posix_memalign(out, al, n);
}

void *aligned_alloc(size_t al, size_t n) {
    if (!ready()) return NULL;
    tick();
    return real_aligned_alloc(al, n);
}

/* ---- helpers ---- */

/* Copies `src` to `dst`, replacing llama.rope.scaling.type (NULL: none)
 * and llama.rope.scaling.factor (< 0: none). */
static void copy_rope(const char *src, const char *dst, const char *type, double factor) {
    int st;
    char err[256];
    moe_gguf *g = moe_gguf_open(src, &st, err, sizeof err);
    ck_assert_msg(g != NULL, "%s", err);
    moe_gguf_writer *w = moe_gguf_writer_new();
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++) {
        const moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        if (!strncmp(kv->key, "llama.rope.scaling.", 19)) continue;
        ck_assert_int_eq(moe_gguf_writer_set_value(w, kv->key, &kv->value), MOE_OK);
    }
    if (type) ck_assert_int_eq(moe_gguf_writer_set_str(w, "llama.rope.scaling.type", type), MOE_OK);
    if (factor >= 0) ck_assert_int_eq(moe_gguf_writer_set_f32(w, "llama.rope.scaling.factor", (float)factor), MOE_OK);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        ck_assert_int_eq(moe_gguf_writer_add_tensor(w, t->name, (moe_type)t->type, t->n_dims, t->ne), MOE_OK);
    }
    ck_assert_int_eq(moe_gguf_writer_begin(w, dst), MOE_OK);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        ck_assert_int_eq(moe_gguf_writer_write_tensor(w, t->data, (size_t)t->nbytes), MOE_OK);
    }
    ck_assert_int_eq(moe_gguf_writer_finish(w), MOE_OK);
    moe_gguf_writer_free(w);
    moe_gguf_close(g);
}

enum { N_TOK = 8 };
static const int32_t IDS[N_TOK] = {316, 72, 105, 32, 261, 109, 280, 101};

/* Logits of IDS as one prompt (positions 0..7), (N_TOK, n_vocab), caller
 * frees; the model's hyper-parameters to *hp. */
static float *prompt_logits(const char *path, moe_hparams *hp, int64_t *n_vocab) {
    char err[256] = "";
    int st = 0;
    moe_model *m = moe_model_load(path, &st, err, sizeof err);
    ck_assert_msg(m != NULL, "%s: %s", path, err);
    *hp = *moe_model_hparams(m);
    moe_backend be;
    ck_assert_int_eq(moe_cpu_backend_init(&be, &(moe_cpu_backend_opts){.n_threads = 1}), MOE_OK);
    moe_fwd *fw = moe_fwd_create(m, &be, &st, err, sizeof err);
    ck_assert_msg(fw != NULL, "%s", err);
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, 4, 4, &ko);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    moe_kv_seq s = {0};
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s, N_TOK), MOE_OK);
    *n_vocab = moe_fwd_n_vocab(fw);
    float *out = malloc((size_t)(N_TOK * *n_vocab) * sizeof(float));
    int32_t pos[N_TOK], sq[N_TOK] = {0};
    for (int i = 0; i < N_TOK; i++) pos[i] = i;
    moe_batch b = {.n_tok = N_TOK, .ids = IDS, .pos = pos, .seq = sq, .n_seq = 1, .seqs = &s};
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, out), MOE_OK);
    moe_kv_seq_release(kv, &s);
    moe_kv_destroy(kv);
    moe_fwd_free(fw);
    moe_backend_destroy(&be);
    moe_model_free(m);
    return out;
}

static double max_abs_diff(const float *a, const float *b, size_t n) {
    double d = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]);
        if (!(e <= d)) d = e; /* NaN counts as a difference */
    }
    return d;
}

static bool all_finite(const float *a, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(a[i])) return false;
    return true;
}

/* A factor without a type is linear (model.c, as llama.cpp): the forward
 * pass must then compute exactly what it computes for "linear" x4, which
 * differs from the unscaled model at every position after 0. */
START_TEST(rope_factor_without_type_is_linear) {
    char bare[64], lin[64], none[64];
    snprintf(bare, sizeof bare, "/tmp/check_fwd_model_bare_%d.gguf", (int)getpid());
    snprintf(lin, sizeof lin, "/tmp/check_fwd_model_lin_%d.gguf", (int)getpid());
    snprintf(none, sizeof none, "/tmp/check_fwd_model_none_%d.gguf", (int)getpid());
    copy_rope(FIXDIR "llama.gguf", bare, NULL, 4.0);
    copy_rope(FIXDIR "llama.gguf", lin, "linear", 4.0);
    copy_rope(FIXDIR "llama.gguf", none, NULL, -1);
    moe_hparams hb, hl, hn;
    int64_t V;
    float *lb = prompt_logits(bare, &hb, &V), *ll = prompt_logits(lin, &hl, &V), *ln = prompt_logits(none, &hn, &V);
    unlink(bare);
    unlink(lin);
    unlink(none);
    ck_assert_int_eq(hb.rope_scaling, MOE_ROPE_SCALING_LINEAR);
    ck_assert_double_eq(hb.rope_scaling_factor, 4.0);
    ck_assert_int_eq(hn.rope_scaling, MOE_ROPE_SCALING_NONE);
    size_t n = (size_t)(N_TOK * V);
    ck_assert_msg(memcmp(lb, ll, n * sizeof(float)) == 0, "factor-only and explicit linear differ by %.3e",
                  max_abs_diff(lb, ll, n));
    /* position 0 is not rotated: its row is the same; all later rows move */
    ck_assert_double_eq(max_abs_diff(lb, ln, (size_t)V), 0);
    for (int t = 1; t < N_TOK; t++)
        ck_assert_msg(max_abs_diff(lb + t * V, ln + t * V, (size_t)V) > 1e-4, "row %d unchanged by scaling", t);
    free(lb);
    free(ll);
    free(ln);
}
END_TEST

/* The frequencies model.c hands the forward pass, against the formula:
 * base^(-2i/n_rot) / 4 for linear x4. */
START_TEST(rope_inv_freq_linear) {
    char lin[64], err[256] = "";
    int st;
    snprintf(lin, sizeof lin, "/tmp/check_fwd_model_if_%d.gguf", (int)getpid());
    copy_rope(FIXDIR "llama.gguf", lin, "linear", 4.0);
    moe_model *m = moe_model_load(lin, &st, err, sizeof err);
    unlink(lin);
    ck_assert_msg(m != NULL, "%s", err);
    const moe_hparams *hp = moe_model_hparams(m);
    float f[256];
    ck_assert_int_le(hp->n_rot / 2, 256);
    ck_assert_int_eq(moe_model_rope_inv_freq(m, f), MOE_OK);
    for (int64_t i = 0; i < hp->n_rot / 2; i++) {
        double want = pow(hp->rope_freq_base, -2.0 * (double)i / (double)hp->n_rot) / 4.0;
        ck_assert_double_eq_tol(f[i], want, 1e-6 * want);
    }
    moe_model_free(m);
}
END_TEST

START_TEST(rope_linear_factor_zero_refused) {
    /* Named linear scaling with factor 0 would divide by zero: refused at
     * load naming the key. A factor of 0 with no type still means "none"
     * (llama.cpp's reading) and gives the unscaled logits exactly. */
    char zero[64], zero_untyped[64], none[64];
    snprintf(zero, sizeof zero, "/tmp/check_fwd_model_zero_%d.gguf", (int)getpid());
    snprintf(zero_untyped, sizeof zero_untyped, "/tmp/check_fwd_model_zerou_%d.gguf", (int)getpid());
    snprintf(none, sizeof none, "/tmp/check_fwd_model_none0_%d.gguf", (int)getpid());
    copy_rope(FIXDIR "llama.gguf", zero, "linear", 0.0);
    copy_rope(FIXDIR "llama.gguf", zero_untyped, NULL, 0.0);
    copy_rope(FIXDIR "llama.gguf", none, NULL, -1);
    char err[256] = "";
    int st = 0;
    moe_model *m = moe_model_load(zero, &st, err, sizeof err);
    ck_assert_ptr_null(m);
    ck_assert_int_eq(st, MOE_EFORMAT);
    ck_assert_msg(strstr(err, "rope.scaling.factor") != NULL, "error does not name the key: %s", err);
    moe_hparams hz, hn;
    int64_t V;
    float *lz = prompt_logits(zero_untyped, &hz, &V), *ln = prompt_logits(none, &hn, &V);
    unlink(zero);
    unlink(zero_untyped);
    unlink(none);
    ck_assert_double_eq(hz.rope_scaling_factor, 1.0);
    size_t n = (size_t)(N_TOK * V);
    ck_assert(all_finite(lz, n));
    ck_assert_msg(memcmp(lz, ln, n * sizeof(float)) == 0, "differs from unscaled by %.3e", max_abs_diff(lz, ln, n));
    free(lz);
    free(ln);
}
END_TEST

/* Steady-state decode calls no allocator: after a prompt and two decode
 * steps have grown every scratch buffer, further single-token steps (with
 * and without logits) and a 2-sequence decode step of the same size as
 * one seen before allocate nothing, in the pass or the backend. */
static const char *ALLOC_FIX[] = {"llama.gguf", "qwen2moe.gguf", "deepseek3-mla.gguf", "deepseek2.gguf"};

START_TEST(decode_allocates_nothing) {
    char path[512], err[256] = "";
    int st = 0;
    snprintf(path, sizeof path, FIXDIR "%s", ALLOC_FIX[_i]);
    moe_model *m = moe_model_load(path, &st, err, sizeof err);
    ck_assert_msg(m != NULL, "%s", err);
    moe_backend be;
    ck_assert_int_eq(moe_cpu_backend_init(&be, &(moe_cpu_backend_opts){.n_threads = 2}), MOE_OK);
    moe_fwd *fw = moe_fwd_create(m, &be, &st, err, sizeof err);
    ck_assert_msg(fw != NULL, "%s", err);
    moe_kv_opts ko;
    moe_fwd_kv_opts(fw, 4, 16, &ko);
    moe_kv_cache *kv = moe_kv_create(&be, &ko, &st);
    moe_kv_seq s[2] = {{0}};
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s[0], 24), MOE_OK);
    ck_assert_int_eq(moe_kv_seq_reserve(kv, &s[1], 24), MOE_OK);
    int64_t V = moe_fwd_n_vocab(fw);
    float *out = malloc((size_t)(N_TOK * V) * sizeof(float));
    int32_t pos[N_TOK], sq[N_TOK] = {0};
    for (int i = 0; i < N_TOK; i++) pos[i] = i;
    moe_batch b = {.n_tok = N_TOK, .ids = IDS, .pos = pos, .seq = sq, .n_seq = 2, .seqs = s};
    ck_assert_int_eq(moe_fwd_run(fw, kv, &b, out), MOE_OK);
    /* warm-up decode steps: one token, then one per sequence */
    int32_t id2[2] = {5, 7}, p2[2] = {N_TOK, 0}, s2[2] = {0, 1};
    moe_batch d1 = {.n_tok = 1, .ids = id2, .pos = p2, .seq = s2, .n_seq = 2, .seqs = s};
    moe_batch d2 = {.n_tok = 2, .ids = id2, .pos = p2, .seq = s2, .n_seq = 2, .seqs = s};
    ck_assert_int_eq(moe_fwd_run(fw, kv, &d1, out), MOE_OK);
    ck_assert_int_eq(moe_fwd_run(fw, kv, &d2, out), MOE_OK);
    uint8_t no_logits = 0;
    int rc[8] = {0};
    atomic_store(&n_allocs, 0);
    atomic_store(&counting, 1);
    for (int i = 0; i < 6; i++) {
        p2[0] = N_TOK + 1 + i;
        p2[1] = 1 + i;
        d1.want_logits = i == 3 ? &no_logits : NULL;
        rc[i] = moe_fwd_run(fw, kv, i & 1 ? &d2 : &d1, out);
    }
    atomic_store(&counting, 0);
    long n = atomic_load(&n_allocs);
    for (int i = 0; i < 6; i++) ck_assert_int_eq(rc[i], MOE_OK);
    ck_assert_msg(n == 0, "%s: %ld allocator calls in 6 steady-state decode steps", ALLOC_FIX[_i], n);
    free(out);
    moe_kv_seq_release(kv, &s[0]);
    moe_kv_seq_release(kv, &s[1]);
    moe_kv_destroy(kv);
    moe_fwd_free(fw);
    moe_backend_destroy(&be);
    moe_model_free(m);
}
END_TEST

/* The interposer itself counts (so a zero above means something). */
START_TEST(interposer_counts) {
    atomic_store(&n_allocs, 0);
    atomic_store(&counting, 1);
    void *volatile p = malloc(64);
    p = realloc(p, 128);
    void *volatile q = calloc(4, 4);
    atomic_store(&counting, 0);
    free(p);
    free(q);
    ck_assert_int_eq(atomic_load(&n_allocs), 3);
}
END_TEST

int main(void) {
    Suite *s = suite_create("fwd_model");
    TCase *tr = tcase_create("rope_scaling");
    tcase_set_timeout(tr, 60);
    tcase_add_test(tr, rope_factor_without_type_is_linear);
    tcase_add_test(tr, rope_inv_freq_linear);
    tcase_add_test(tr, rope_linear_factor_zero_refused);
    suite_add_tcase(s, tr);
    TCase *ta = tcase_create("no_alloc");
    tcase_set_timeout(ta, 60);
    tcase_add_test(ta, interposer_counts);
    tcase_add_loop_test(ta, decode_allocates_nothing, 0, (int)(sizeof ALLOC_FIX / sizeof ALLOC_FIX[0]));
    suite_add_tcase(s, ta);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf ? EXIT_FAILURE : EXIT_SUCCESS;
}
