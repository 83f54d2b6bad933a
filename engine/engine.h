/* engine.h - the inference engine as the server sees it: load a model,
 * submit token requests, receive token events, cancel, read statistics.
 *
 * One engine thread owns the model, the backend, the paged KV cache and
 * the scheduler (continuous batching: every step admits waiting requests
 * while KV blocks and the step token budget allow, runs ONE forward pass
 * over all running sequences, samples one token per sequence, publishes
 * events). The server knows nothing about backends.
 *
 * Lifetime of a request:
 *   moe_engine_submit() copies everything it needs from the request
 *   (prompt ids, stop strings, logit bias), so the caller's arrays may be
 *   freed as soon as it returns. From then on the engine calls
 *   req->on_event(req->user, ev) ON THE ENGINE THREAD, in order:
 *     zero or more MOE_EV_TOKEN events per choice (index 0 .. n-1),
 *     one MOE_EV_FINISH per choice (its finish reason and usage),
 *     exactly one MOE_EV_DONE for the whole request, last.
 *   After MOE_EV_DONE the engine never touches `user` again, so the
 *   caller frees its per-request state there (or after it). A request
 *   that fails after submit (e.g. it can never fit the KV cache) gets
 *   MOE_EV_ERROR instead of the remaining FINISH events, then DONE.
 *   The callback must be quick and must not call back into the engine
 *   except moe_engine_cancel(); copy the event out and wake your thread.
 *
 * Text: the engine detokenizes incrementally (never splitting a UTF-8
 * character; invalid bytes become U+FFFD) and matches stop strings on the
 * text across token boundaries. Text that could still be the start of a
 * stop string is held back until it cannot be; a matched stop string and
 * everything after it are never emitted. EOS/EOT tokens end a choice with
 * MOE_FINISH_STOP (unless ignore_eos) and are not rendered.
 *
 * Threads: every function here may be called from any thread, except
 * that moe_engine_destroy() must not race with the others.
 */
#ifndef MOE_ENGINE_H
#define MOE_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chat_template.h"
#include "energy.h"
#include "tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_engine moe_engine;

typedef enum moe_engine_state {
    MOE_ENGINE_LOADING = 0, /* model load in progress on the engine thread */
    MOE_ENGINE_READY = 1,   /* accepting requests */
    MOE_ENGINE_FAILED = 2,  /* load failed or the engine thread hit a fatal error; see moe_engine_error() */
    MOE_ENGINE_DRAINING = 3,/* moe_engine_drain() called: running requests finish, new ones refused */
    MOE_ENGINE_STOPPED = 4  /* the engine thread has exited */
} moe_engine_state;

/* What a 0 in moe_engine_opts means: the one definition of these numbers.
 * `moed serve --help` prints them (server/config.c stringifies them, so
 * they stay plain literals) and tests/py/test_docs.py checks that
 * docs/configuration.md, docs/moed.1 and config/moed.conf quote them. */
#define MOE_DEFAULT_CTX_CAP 8192     /* ctx_size: the model's context_length, at most this */
#define MOE_DEFAULT_MAX_SEQS 32      /* max_seqs */
#define MOE_DEFAULT_KV_MEM_MB 1024   /* kv_mem_mb */
#define MOE_DEFAULT_BLOCK_SIZE 16    /* block_size */
#define MOE_DEFAULT_STEP_TOKENS 512  /* step_tokens */
#define MOE_DEFAULT_QUEUE_LIMIT 256  /* queue_limit */

typedef struct moe_engine_opts {
    const char *model_path; /* GGUF file; required */
    const char *device;     /* "cpu", "cuda" or "auto"/NULL (cuda when a GPU is usable, else cpu) */
    int n_threads;          /* CPU worker threads; <= 0: one per online CPU */
    int64_t ctx_size;       /* max positions per sequence (prompt + output); 0: see MOE_DEFAULT_CTX_CAP */
    int64_t max_seqs;       /* max running sequences (choices) per step; 0: MOE_DEFAULT_MAX_SEQS */
    int64_t kv_blocks;      /* KV cache blocks; 0: as many as kv_mem_mb holds */
    int64_t kv_mem_mb;      /* KV cache size in MiB when kv_blocks is 0; 0: MOE_DEFAULT_KV_MEM_MB */
    int64_t block_size;     /* positions per KV block; 0: MOE_DEFAULT_BLOCK_SIZE */
    int64_t step_tokens;    /* token budget per step (prefill chunking); 0: MOE_DEFAULT_STEP_TOKENS */
    int64_t queue_limit;    /* max waiting requests; submit beyond it fails with MOE_EFULL; 0: MOE_DEFAULT_QUEUE_LIMIT */
    int chat_family;        /* force a moe_chat_family; < 0: recognise from the GGUF */
    /* Energy accounting (energy.h): the source ("auto"/NULL, "nvml",
     * "rapl", "estimate", "off") and the estimate's watts. A named source
     * that cannot be read fails the load. energy_custom, when not NULL,
     * replaces the source (tests feed scripted joules through it): start
     * takes it over, even when it fails, and zeroes *energy_custom. */
    const char *energy_source;
    double energy_idle_watts;
    double energy_busy_watts;
    moe_energy_source *energy_custom;
    /* Optional progress reports during load ("mapping", "binding weights
     * 12/27", "warming up"); called on the engine thread. */
    void (*on_status)(void *user, const char *status);
    void *status_user;
} moe_engine_opts;

/* Sampling of one request (OpenAI semantics). temperature 0 = greedy
 * (argmax; ties to the lowest id). Order: logit_bias, repetition /
 * presence / frequency penalties over the tokens generated so far (and
 * the prompt for repetition_penalty, as llama.cpp/vLLM), temperature,
 * top_k, top_p, min_p, then a draw from the request's own RNG. */
typedef struct moe_sampling {
    float temperature;        /* 0 .. 2; default 1 */
    float top_p;              /* (0, 1]; default 1 */
    int32_t top_k;            /* <= 0: off */
    float min_p;              /* 0 .. 1; 0: off */
    float presence_penalty;   /* -2 .. 2 */
    float frequency_penalty;  /* -2 .. 2 */
    float repetition_penalty; /* > 0; 1: off */
    bool has_seed;
    uint64_t seed;            /* same seed + same request -> same output; choice i uses seed + i */
    int32_t n_logit_bias;
    const int32_t *logit_bias_ids; /* (n_logit_bias), each < n_vocab; copied by submit */
    const float *logit_bias;       /* (n_logit_bias) added to the logits; copied by submit */
} moe_sampling;

/* Sets OpenAI's defaults (temperature 1, top_p 1, penalties off). */
void moe_sampling_defaults(moe_sampling *s);

typedef struct moe_event moe_event;

typedef struct moe_request {
    const int32_t *prompt; /* (n_prompt) token ids, each < n_vocab; copied */
    int64_t n_prompt;      /* >= 1; n_prompt + max_tokens <= ctx_size */
    int64_t max_tokens;    /* >= 1 */
    int32_t n;             /* choices, 1 .. max_seqs; they share the prompt's KV blocks */
    moe_sampling sampling;
    bool logprobs;         /* report each sampled token's logprob */
    int32_t top_logprobs;  /* 0 .. MOE_MAX_TOP_LOGPROBS alternatives per token */
    bool ignore_eos;
    const char *const *stop; /* (n_stop) NUL-terminated stop strings; copied */
    int32_t n_stop;          /* 0 .. MOE_MAX_STOP */
    void (*on_event)(void *user, const moe_event *ev);
    void *user;
} moe_request;

#define MOE_MAX_TOP_LOGPROBS 20
#define MOE_MAX_STOP 16
#define MOE_MAX_STOP_LEN 1024

typedef enum moe_event_kind {
    MOE_EV_TOKEN = 0,  /* one sampled token of a choice (text may be empty while held back) */
    MOE_EV_FINISH = 1, /* a choice ended */
    MOE_EV_ERROR = 2,  /* the request failed after submit; message in text */
    MOE_EV_DONE = 3    /* the request is over; last event, `user` released */
} moe_event_kind;

typedef enum moe_finish {
    MOE_FINISH_NONE = 0,
    MOE_FINISH_STOP = 1,      /* EOS/EOT or a stop string */
    MOE_FINISH_LENGTH = 2,    /* max_tokens or the context size */
    MOE_FINISH_CANCELLED = 3  /* moe_engine_cancel() or engine drain timeout */
} moe_finish;

typedef struct moe_logprob {
    int32_t id;
    float logprob; /* log softmax of the raw logits (before penalties / temperature) */
} moe_logprob;

struct moe_event {
    moe_event_kind kind;
    uint64_t req_id;
    int32_t index;       /* choice index (TOKEN, FINISH) */
    /* TOKEN: the token and the text it completes (may be empty: held
     * back for a possible stop string or an incomplete UTF-8 character;
     * FINISH may carry the last held-back text). Valid during the call. */
    int32_t token;
    const char *text;
    size_t text_len;
    /* TOKEN with logprobs: the sampled token's logprob and top_logprobs
     * alternatives (best first). */
    float logprob;
    const moe_logprob *top;
    int32_t n_top;
    /* FINISH */
    moe_finish finish;
    int32_t stop_index; /* FINISH: index of the request's stop string that ended the choice; -1 = none (EOS, length) */
    int64_t prompt_tokens;     /* FINISH/DONE: prompt length */
    int64_t completion_tokens; /* FINISH: this choice's tokens; DONE: all choices' */
    /* DONE, when energy accounting is on (has_energy): the request's share
     * of the energy and wall time of the steps it was in (energy.h says
     * how steps are split). */
    bool has_energy;
    double energy_joules;
    double energy_seconds;
    /* Engine-side times (CLOCK_MONOTONIC ns) for TTFT/ITL metrics. */
    uint64_t t_submit_ns;
    uint64_t t_now_ns;
};

/* Starts the engine thread, which loads the model (state LOADING, then
 * READY or FAILED). Returns NULL only for bad options or no memory, with
 * *status and a reason in err. Stop and free with moe_engine_destroy(). */
moe_engine *moe_engine_start(const moe_engine_opts *opts, int *status, char *err, size_t errsz);

moe_engine_state moe_engine_get_state(const moe_engine *e);
/* The load / fatal error message ("" when none). Valid until destroy. */
const char *moe_engine_error(const moe_engine *e);
/* Blocks until the state is not LOADING or timeout_ms passes (< 0: forever). */
moe_engine_state moe_engine_wait_ready(moe_engine *e, int64_t timeout_ms);

/* Static facts, valid once READY (zeroed before). */
typedef struct moe_engine_info {
    const char *model_id;   /* file name without directories and ".gguf" */
    const char *arch;       /* general.architecture */
    const char *device;     /* "cpu" or "cuda" */
    int64_t n_vocab;
    int64_t ctx_size;       /* per-sequence limit in effect */
    int64_t max_seqs;
    int64_t kv_blocks;
    int64_t block_size;
    int64_t n_params;       /* total parameters */
    const moe_tok *tok;     /* thread-safe for encode/decode */
    const moe_chat_template *chat;
    const char *energy_source; /* "nvml", "rapl", "estimate" (a model, not a measurement), or NULL: off */
} moe_engine_info;
int moe_engine_get_info(const moe_engine *e, moe_engine_info *out); /* MOE_ESTATE unless READY/DRAINING */

/* Queues a request. Returns MOE_OK and its id in *id, or:
 * MOE_ESTATE (not READY), MOE_EFULL (queue_limit waiting requests),
 * MOE_EINVAL / MOE_ERANGE (a field out of range; the message in err names
 * it, e.g. "max_tokens: prompt (900) + max_tokens (200) exceeds the
 * context size 1024"), MOE_ENOMEM. Nothing is queued on error and no
 * event is delivered. */
int moe_engine_submit(moe_engine *e, const moe_request *req, uint64_t *id, char *err, size_t errsz);

/* Asks for a request to end: its remaining choices finish with
 * MOE_FINISH_CANCELLED within one step, their KV blocks are freed, then
 * DONE is delivered. Unknown or finished ids are ignored. */
void moe_engine_cancel(moe_engine *e, uint64_t id);

/* Stops admitting new requests (submit -> MOE_ESTATE); running and
 * waiting requests carry on. */
void moe_engine_drain(moe_engine *e);

typedef struct moe_engine_stats {
    moe_engine_state state;
    int64_t requests_running; /* requests with at least one admitted choice */
    int64_t requests_waiting;
    int64_t seqs_running;
    int64_t kv_blocks_used;
    int64_t kv_blocks_total;
    uint64_t prompt_tokens_total;     /* prompt tokens processed (prefill, incl. recompute) */
    uint64_t generation_tokens_total; /* tokens sampled */
    uint64_t requests_finished_total;
    uint64_t preemptions_total;
    uint64_t steps_total;
    int64_t last_batch_seqs;          /* sequences in the latest step */
    int64_t last_batch_tokens;        /* tokens in the latest step */
    /* Histogram of sequences per step: counts of steps with batch size
     * <= 1, 2, 4, 8, 16, 32, 64, 128, +Inf (cumulative is the caller's job). */
    uint64_t batch_hist[9];
    uint64_t batch_seqs_total; /* sum of the sequences of every step (the histogram's _sum) */
    uint64_t heartbeat_ns; /* CLOCK_MONOTONIC of the engine loop's latest iteration (idle loops tick too) */
    /* Energy since READY (energy.h); all zero when energy_source is NULL. */
    const char *energy_source;
    moe_energy_totals energy;
} moe_engine_stats;
void moe_engine_get_stats(const moe_engine *e, moe_engine_stats *out);

/* Drains, cancels whatever is still running after drain_ms (< 0: wait
 * forever), delivers every outstanding DONE, joins the thread and frees
 * everything. NULL is a no-op. */
void moe_engine_destroy(moe_engine *e, int64_t drain_ms);

/* CLOCK_MONOTONIC in ns (the clock of moe_event's times). */
uint64_t moe_now_ns(void);

#ifdef __cplusplus
}
#endif
#endif
