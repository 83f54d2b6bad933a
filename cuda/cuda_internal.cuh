// cuda_internal.cuh - what the cuda/*.cu files share: the backend context,
// error checking, host->device staging of the small per-call index arrays,
// grow-only device scratch, and the op entry points each file defines.
//
// Not a public header (engine code sees cuda_backend.h only). Every
// function here belongs to the engine thread that owns the backend.
#ifndef CUDA_INTERNAL_CUH
#define CUDA_INTERNAL_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "backend.h"
#include "cuda_backend.h"
#include "log_hook.h"
#include "qblocks.h"

// Number of staging segments in the ring. Each op that needs index arrays
// on the device packs them into one segment and sends it with one async
// copy; a segment is reused only after the copy it last carried has run
// (its event), so the host never overwrites pinned memory the DMA engine
// has not read yet. 8 segments let the host run ~8 ops ahead of the GPU.
#define CUDA_N_STAGE 8
#define CUDA_STAGE_MIN (256u << 10) // initial bytes per segment

// Device scratch, one grow-only buffer per role. Ops on one stream run in
// order, so a role's buffer can be reused by the next op without a sync;
// two roles never alias inside one op.
enum cuda_scratch_role {
    SCR_MM_X = 0,  // activations converted to f16/bf16 for cuBLAS
    SCR_MOE_G,     // (n_ent, n_ff) gate outputs, routing order
    SCR_MOE_U,     // (n_ent, n_ff) up outputs
    SCR_MOE_D,     // (n_ent, n_embd) down outputs
    SCR_MOE_IDX,   // routing: ids, weights, offsets, rows, ent_of
    SCR_MLA_QLAT,  // (n_tok, H, kv_lora) absorbed queries
    SCR_MLA_OLAT,  // (n_tok, H, kv_lora) latent attention outputs
    SCR_SAMPLE,    // sampler results
    SCR_COUNT
};

struct cuda_stage_seg {
    char *host; // pinned
    char *dev;
    size_t cap;
    cudaEvent_t done; // recorded after the copy that last used this segment
    bool pending;     // `done` was recorded and not yet waited for
};

typedef struct cuda_ctx {
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    int n_sm;
    struct cuda_stage_seg seg[CUDA_N_STAGE];
    int seg_next;
    void *scr[SCR_COUNT];
    size_t scr_cap[SCR_COUNT];
    int gemv_max_tok; // matmul: token counts up to this take the GEMV kernels
} cuda_ctx;

// ---- launches ----

// Every kernel launch and dynamic shared-memory declaration goes through
// these, so that tests/gpu/emu can run the same kernels on the CPU (a slow
// emulation of blocks, warps and barriers with threads) where no GPU is.
#ifndef CUDA_EMU
#define CUDA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define CUDA_DYN_SMEM(type, name) extern __shared__ type name[]
#endif

// ---- errors ----

// Logs a failed CUDA call (statement, file, line, CUDA's message) through moe_log (log_hook.h).
void cuda__log(const char *what, const char *msg, const char *file, int line);

#define CUDA_CHECK(stmt)                                                       \
    do {                                                                       \
        cudaError_t e_ = (stmt);                                               \
        if (e_ != cudaSuccess) {                                               \
            cuda__log(#stmt, cudaGetErrorString(e_), __FILE__, __LINE__);      \
            return MOE_EBACKEND;                                               \
        }                                                                      \
    } while (0)

// After every kernel launch: a bad configuration shows up here, not later.
#define CUDA_LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

#define CUBLAS_CHECK(stmt)                                                     \
    do {                                                                       \
        cublasStatus_t s_ = (stmt);                                            \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                     \
            cuda__log(#stmt, cublasGetStatusString(s_), __FILE__, __LINE__);   \
            return MOE_EBACKEND;                                               \
        }                                                                      \
    } while (0)

// ---- staging (host index arrays -> device) ----

typedef struct cuda_stage {
    struct cuda_stage_seg *seg;
    size_t used;
} cuda_stage;

// Bytes a staged array of n bytes takes (16-byte aligned slots).
static inline size_t cuda__stage_size(size_t n) { return (n + 15) & ~(size_t)15; }

// Takes the next segment, with room for `total` bytes (sum of
// cuda__stage_size of what will be put). Waits for its previous copy.
int cuda__stage_begin(cuda_ctx *c, size_t total, cuda_stage *st);
// Copies n bytes into the segment (src NULL: reserves them for the caller to
// fill at st->seg->host + the returned offset); returns their device address.
void *cuda__stage_put(cuda_stage *st, const void *src, size_t n);
// Enqueues the copy of everything put on the stream and records the event.
int cuda__stage_end(cuda_ctx *c, cuda_stage *st);

// ---- scratch ----

// Device buffer of role `r` with at least nbytes; NULL on failure (logged).
void *cuda__scratch(cuda_ctx *c, int r, size_t nbytes);

// ---- helpers ----

static inline unsigned cuda__blocks(int64_t n, int per) { return (unsigned)((n + per - 1) / per); }

// Grid-stride loops cover at most this many blocks per launch.
#define CUDA_MAX_BLOCKS 65535u
static inline unsigned cuda__grid(int64_t n, int per) {
    int64_t b = (n + per - 1) / per;
    return b > (int64_t)CUDA_MAX_BLOCKS ? CUDA_MAX_BLOCKS : (unsigned)(b < 1 ? 1 : b);
}

static inline size_t cuda__mat_stride(const moe_weight *w) {
    return w->mat_stride ? w->mat_stride : (size_t)w->n_out * moe_row_size(w->type, w->n_in);
}

// ---- grouped matmul (matmul.cu), shared by matmul, moe and mla ----

// y[out_row(k)][o] = sum_i x[in_row(k)][i] * W_e[o][i] (+ bias[o]) for every
// entry k of group e, k in [off[e], off[e+1]) (off: device, n_group + 1
// entries; NULL means one group of n_rows entries), o < n_out. in_row(k) =
// x_rows ? x_rows[k] : k (device), likewise out_row with y_rows. Rows are
// x_stride / y_stride floats apart. W_e = w + e * mat_stride. max_rows is an
// upper bound on any group's entry count (sizes the grid; groups never
// need a host sync).
typedef struct cuda_gmm {
    int type;
    const void *w;
    size_t mat_stride;
    int64_t n_in, n_out;
    int64_t n_group;
    const int32_t *off; // device (n_group + 1) int32 or NULL
    int64_t n_rows;     // entries in total (used when off is NULL)
    int64_t max_rows;   // per group, upper bound
    const float *x;
    int64_t x_stride;
    const int32_t *x_rows; // device or NULL
    float *y;
    int64_t y_stride;
    const int32_t *y_rows; // device or NULL
    const float *bias;     // device (n_out) or NULL
} cuda_gmm;

// True when the grouped kernels handle weights of `type`.
bool cuda__gmm_supported(int type);
// Runs the grouped product on c's stream. MOE_EUNSUPPORTED for a type the
// kernels lack, MOE_EBACKEND on a CUDA error.
int cuda__gmm(cuda_ctx *c, const cuda_gmm *g);

// Dequantizes rows ids[i] (device) of w (n_mat 1) to out (n, n_in) f32.
int cuda__dequant_rows(cuda_ctx *c, const moe_weight *w, const int32_t *ids_dev, int64_t n, float *out);

// ---- the ops, one family per file, vtable signatures of backend.h ----

extern "C" {
// matmul.cu: the weight types the kernels decode
int cuda__supports_type(void *ctx, int type);
// backend.cu (elementwise and gather ops live next to the memory ops)
int cuda__embed(void *ctx, const moe_weight *w, const int32_t *ids, int64_t n, float *out);
int cuda__get_rows(void *ctx, const float *x, int64_t x_stride, int64_t n_col, const int32_t *rows, int64_t n,
                   float *out);
int cuda__add(void *ctx, float *y, const float *x, int64_t n);
int cuda__mul(void *ctx, float *y, const float *x, int64_t n);
int cuda__swiglu(void *ctx, const float *gate, const float *up, float *out, int64_t n);
int cuda__sigmoid_scale(void *ctx, float *y, const float *g, int64_t n_rows, int64_t n);
// norm_rope.cu
int cuda__rms_norm(void *ctx, const float *x, int64_t x_stride, float *y, int64_t y_stride, int64_t n_rows,
                   int64_t n, const float *w, float eps);
int cuda__rope(void *ctx, float *x, int64_t n_tok, int64_t tok_stride, int64_t n_head, int64_t head_stride,
               const int32_t *pos, const moe_rope_params *p);
// matmul.cu
int cuda__matmul(void *ctx, const moe_weight *w, const float *x, int64_t n_tok, const float *bias, float *y);
// attention.cu
int cuda__kv_store(void *ctx, const moe_kv_view *kv, float *k_cache, float *v_cache, int64_t k_width,
                   int64_t v_width, const float *k, const float *v);
int cuda__attention(void *ctx, const moe_kv_view *kv, const float *q, const float *k_cache, const float *v_cache,
                    int64_t n_head, int64_t n_kv_head, int64_t head_dim, float scale, float *out);
int cuda__mla_attention(void *ctx, const moe_kv_view *kv, const float *q, const float *cache, int64_t kv_lora,
                        int64_t n_rot, int64_t nope, const moe_weight *k_b, const moe_weight *v_b, float scale,
                        float *out);
// moe.cu
int cuda__moe(void *ctx, const float *h, int64_t n_tok, const float *router_logits, const moe_route_params *rp,
              const moe_weight *gate, const moe_weight *up, const moe_weight *down, float *out, int32_t *ids_out,
              float *w_out);
}

#endif
