// backend.cu - the CUDA backend's context, memory ops, staging ring and
// scratch, the small elementwise/gather ops, and the op table.
//
// One stream per backend: every op enqueues work on it and returns without
// waiting, except download (the host reads the result) and the few ops
// that hand results back in host memory (moe's ids_out/w_out, sampling).
#include <cuda_fp16.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.cuh"

extern "C" int cuda_device_count(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* clear the sticky "no device" error */
        return 0;
    }
    return n;
}

extern "C" int cuda_device_probe(int *n, int *no_device, const char **msg) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        count = 0;
    }
    *n = count;
    *no_device = e == cudaErrorNoDevice || (e == cudaSuccess && count == 0);
    *msg = cudaGetErrorString(e);
    return (int)e;
}

#ifndef CUDA_EMU
// Times `reps` device-to-device copies of nbytes with events (after one
// untimed copy); each copy reads and writes nbytes.
static int time_copies(void *dst, const void *src, size_t nbytes, int reps, float *ms) {
    cudaEvent_t a = NULL, b = NULL;
    int rc = MOE_EBACKEND;
    cudaError_t e = cudaEventCreate(&a);
    if (e == cudaSuccess) e = cudaEventCreate(&b);
    if (e == cudaSuccess) e = cudaMemcpy(dst, src, nbytes, cudaMemcpyDeviceToDevice);
    if (e == cudaSuccess) e = cudaEventRecord(a, 0);
    for (int i = 0; e == cudaSuccess && i < reps; i++) e = cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToDevice, 0);
    if (e == cudaSuccess) e = cudaEventRecord(b, 0);
    if (e == cudaSuccess) e = cudaEventSynchronize(b);
    if (e == cudaSuccess) e = cudaEventElapsedTime(ms, a, b);
    if (e == cudaSuccess) rc = MOE_OK;
    else cuda__log("device copy timing", cudaGetErrorString(e), __FILE__, __LINE__);
    if (a) cudaEventDestroy(a);
    if (b) cudaEventDestroy(b);
    return rc;
}
#endif

extern "C" int cuda_copy_bandwidth(int device, size_t nbytes, double *gbs) {
    if (!gbs || nbytes < 4096) return MOE_EINVAL;
    *gbs = 0;
#ifdef CUDA_EMU
    (void)device;
    return MOE_EUNSUPPORTED;
#else
    int n = cuda_device_count();
    if (n <= 0) return MOE_EUNSUPPORTED;
    if (device < 0 || device >= n) return MOE_EINVAL;
    CUDA_CHECK(cudaSetDevice(device));
    void *src = NULL, *dst = NULL;
    cudaError_t e = cudaMalloc(&src, nbytes);
    if (e == cudaSuccess) e = cudaMalloc(&dst, nbytes);
    if (e == cudaSuccess) e = cudaMemset(src, 1, nbytes);
    int rc = MOE_EBACKEND;
    if (e != cudaSuccess) {
        cuda__log("device copy buffers", cudaGetErrorString(e), __FILE__, __LINE__);
    } else {
        float best = 0;
        rc = MOE_OK;
        for (int pass = 0; pass < 3 && !rc; pass++) {
            float ms = 0;
            rc = time_copies(dst, src, nbytes, 10, &ms);
            if (!rc && ms > 0) {
                float g = (float)(2.0 * 10.0 * (double)nbytes / (ms * 1e-3) / 1e9);
                best = g > best ? g : best;
            }
        }
        *gbs = best;
    }
    if (src) cudaFree(src);
    if (dst) cudaFree(dst);
    return rc;
#endif
}

void cuda__log(const char *what, const char *msg, const char *file, int line) {
    moe_log(MOE_LOG_ERROR, "cuda: %s failed: %s (%s:%d)", what, msg, file, line);
}

// ---- staging ----

int cuda__stage_begin(cuda_ctx *c, size_t total, cuda_stage *st) {
    struct cuda_stage_seg *s = &c->seg[c->seg_next];
    c->seg_next = (c->seg_next + 1) % CUDA_N_STAGE;
    if (s->pending) {
        // the copy that last read this pinned memory must have run
        CUDA_CHECK(cudaEventSynchronize(s->done));
        s->pending = false;
    }
    if (total > s->cap) {
        size_t cap = s->cap ? s->cap : CUDA_STAGE_MIN;
        while (cap < total) cap *= 2;
        // earlier ops may still read the old device copy
        CUDA_CHECK(cudaStreamSynchronize(c->stream));
        if (s->host) CUDA_CHECK(cudaFreeHost(s->host));
        if (s->dev) CUDA_CHECK(cudaFree(s->dev));
        s->host = NULL;
        s->dev = NULL;
        s->cap = 0;
        CUDA_CHECK(cudaMallocHost((void **)&s->host, cap));
        CUDA_CHECK(cudaMalloc((void **)&s->dev, cap));
        s->cap = cap;
    }
    st->seg = s;
    st->used = 0;
    return MOE_OK;
}

void *cuda__stage_put(cuda_stage *st, const void *src, size_t n) {
    char *d = st->seg->dev + st->used;
    if (n && src) memcpy(st->seg->host + st->used, src, n); // NULL: the caller fills it in place
    st->used += cuda__stage_size(n);
    return d;
}

int cuda__stage_end(cuda_ctx *c, cuda_stage *st) {
    if (!st->used) return MOE_OK;
    CUDA_CHECK(cudaMemcpyAsync(st->seg->dev, st->seg->host, st->used, cudaMemcpyHostToDevice, c->stream));
    CUDA_CHECK(cudaEventRecord(st->seg->done, c->stream));
    st->seg->pending = true;
    return MOE_OK;
}

// ---- scratch ----

void *cuda__scratch(cuda_ctx *c, int r, size_t nbytes) {
    if (nbytes <= c->scr_cap[r]) return c->scr[r];
    size_t cap = c->scr_cap[r] ? c->scr_cap[r] : (1u << 20);
    while (cap < nbytes) cap *= 2;
    cudaError_t e = cudaStreamSynchronize(c->stream); // queued ops may still use the old buffer
    if (e == cudaSuccess && c->scr[r]) e = cudaFree(c->scr[r]);
    c->scr[r] = NULL;
    c->scr_cap[r] = 0;
    if (e == cudaSuccess) e = cudaMalloc(&c->scr[r], cap);
    if (e != cudaSuccess) {
        cuda__log("scratch cudaMalloc", cudaGetErrorString(e), __FILE__, __LINE__);
        c->scr[r] = NULL;
        return NULL;
    }
    c->scr_cap[r] = cap;
    return c->scr[r];
}

// ---- memory ops ----

static void cuda_destroy(void *vctx) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if (!c) return;
    cudaSetDevice(c->device);
    if (c->stream) cudaStreamSynchronize(c->stream);
    for (int i = 0; i < CUDA_N_STAGE; i++) {
        if (c->seg[i].host) cudaFreeHost(c->seg[i].host);
        if (c->seg[i].dev) cudaFree(c->seg[i].dev);
        if (c->seg[i].done) cudaEventDestroy(c->seg[i].done);
    }
    for (int i = 0; i < SCR_COUNT; i++)
        if (c->scr[i]) cudaFree(c->scr[i]);
    if (c->blas) cublasDestroy(c->blas);
    if (c->stream) cudaStreamDestroy(c->stream);
    free(c);
}

static void *cuda_alloc(void *vctx, size_t nbytes) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, nbytes ? nbytes : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); // out of memory is not sticky; clear it
        cuda__log("cudaMalloc", cudaGetErrorString(e), __FILE__, __LINE__);
        return NULL;
    }
    // zero-filled as backend.h promises; ordered before any later op on the stream
    e = cudaMemsetAsync(p, 0, nbytes, c->stream);
    if (e != cudaSuccess) {
        cuda__log("cudaMemsetAsync", cudaGetErrorString(e), __FILE__, __LINE__);
        cudaFree(p);
        return NULL;
    }
    return p;
}

static void cuda_free(void *vctx, void *buf) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if (!buf) return;
    cudaStreamSynchronize(c->stream); // queued ops may still read it
    cudaFree(buf);
}

static int cuda_upload(void *vctx, void *dst, const void *src_host, size_t nbytes) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if ((!dst || !src_host) && nbytes) return MOE_EINVAL;
    if (!nbytes) return MOE_OK;
    // synchronous: the caller may reuse src at once even when it is pinned
    // memory (an async copy from pinned memory would read it later)
    CUDA_CHECK(cudaMemcpyAsync(dst, src_host, nbytes, cudaMemcpyHostToDevice, c->stream));
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    return MOE_OK;
}

static int cuda_download(void *vctx, void *dst_host, const void *src, size_t nbytes) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if ((!dst_host || !src) && nbytes) return MOE_EINVAL;
    if (!nbytes) return MOE_OK;
    CUDA_CHECK(cudaMemcpyAsync(dst_host, src, nbytes, cudaMemcpyDeviceToHost, c->stream));
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    return MOE_OK;
}

static int cuda_bind_weight(void *vctx, const void *host, size_t nbytes, const void **out) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if (!out || (!host && nbytes)) return MOE_EINVAL;
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, nbytes ? nbytes : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        cuda__log("cudaMalloc (weight)", cudaGetErrorString(e), __FILE__, __LINE__);
        return MOE_ENOMEM;
    }
    // from the mapped file: synchronous, so the pages need not stay mapped
    // after the call, and a bad copy is reported here
    e = cudaMemcpyAsync(p, host, nbytes, cudaMemcpyHostToDevice, c->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess) {
        cuda__log("weight upload", cudaGetErrorString(e), __FILE__, __LINE__);
        cudaFree(p);
        return MOE_EBACKEND;
    }
    *out = p;
    return MOE_OK;
}

static void cuda_unbind_weight(void *vctx, const void *bound) { cuda_free(vctx, (void *)bound); }

// ---- elementwise and gather ops ----

__global__ void k_add(float *__restrict__ y, const float *__restrict__ x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

__global__ void k_mul(float *__restrict__ y, const float *__restrict__ x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] *= x[i];
}

// out may alias gate: each element is read before it is written, by one thread
__global__ void k_swiglu(const float *gate, const float *__restrict__ up, float *out, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

__global__ void k_sigmoid_scale(float *__restrict__ y, const float *__restrict__ g, int64_t n_rows, int64_t n) {
    int64_t total = n_rows * n;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        float s = 1.0f / (1.0f + expf(-g[i / n]));
        y[i] *= s;
    }
}

// one block row per output row, threads over columns
__global__ void k_get_rows(const float *__restrict__ x, int64_t x_stride, int64_t n_col,
                           const int32_t *__restrict__ rows, int64_t n, float *__restrict__ out) {
    for (int64_t r = blockIdx.y; r < n; r += gridDim.y) {
        const float *src = x + (int64_t)rows[r] * x_stride;
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_col; i += (int64_t)gridDim.x * blockDim.x)
            out[r * n_col + i] = src[i];
    }
}

#define EW_THREADS 256

extern "C" int cuda__add(void *vctx, float *y, const float *x, int64_t n) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if (n < 0 || (n && (!y || !x))) return MOE_EINVAL;
    if (!n) return MOE_OK;
    CUDA_LAUNCH(k_add, cuda__grid(n, EW_THREADS), EW_THREADS, 0, c->stream, y, x, n);
    CUDA_LAUNCH_CHECK();
    return MOE_OK;
}

extern "C" int cuda__mul(void *vctx, float *y, const float *x, int64_t n) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if (n < 0 || (n && (!y || !x))) return MOE_EINVAL;
    if (!n) return MOE_OK;
    CUDA_LAUNCH(k_mul, cuda__grid(n, EW_THREADS), EW_THREADS, 0, c->stream, y, x, n);
    CUDA_LAUNCH_CHECK();
    return MOE_OK;
}

extern "C" int cuda__swiglu(void *vctx, const float *gate, const float *up, float *out, int64_t n) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if (n < 0 || (n && (!gate || !up || !out))) return MOE_EINVAL;
    if (!n) return MOE_OK;
    CUDA_LAUNCH(k_swiglu, cuda__grid(n, EW_THREADS), EW_THREADS, 0, c->stream, gate, up, out, n);
    CUDA_LAUNCH_CHECK();
    return MOE_OK;
}

extern "C" int cuda__sigmoid_scale(void *vctx, float *y, const float *g, int64_t n_rows, int64_t n) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if (n_rows < 0 || n < 0 || (n_rows && n && (!y || !g))) return MOE_EINVAL;
    if (!n_rows || !n) return MOE_OK;
    CUDA_LAUNCH(k_sigmoid_scale, cuda__grid(n_rows * n, EW_THREADS), EW_THREADS, 0, c->stream, y, g, n_rows, n);
    CUDA_LAUNCH_CHECK();
    return MOE_OK;
}

extern "C" int cuda__get_rows(void *vctx, const float *x, int64_t x_stride, int64_t n_col, const int32_t *rows,
                              int64_t n, float *out) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if (!x || !rows || !out || n < 0 || n_col < 0) return MOE_EINVAL;
    if (!n || !n_col) return MOE_OK;
    for (int64_t i = 0; i < n; i++)
        if (rows[i] < 0) return MOE_EINVAL;
    cuda_stage st;
    MOE_TRY(cuda__stage_begin(c, cuda__stage_size((size_t)n * 4), &st));
    const int32_t *d_rows = (const int32_t *)cuda__stage_put(&st, rows, (size_t)n * 4);
    MOE_TRY(cuda__stage_end(c, &st));
    dim3 grid(cuda__grid(n_col, EW_THREADS), (unsigned)(n < 65535 ? n : 65535));
    CUDA_LAUNCH(k_get_rows, grid, EW_THREADS, 0, c->stream, x, x_stride, n_col, d_rows, n, out);
    CUDA_LAUNCH_CHECK();
    return MOE_OK;
}

extern "C" int cuda__embed(void *vctx, const moe_weight *w, const int32_t *ids, int64_t n, float *out) {
    cuda_ctx *c = (cuda_ctx *)vctx;
    if (!w || !ids || !out || n < 0) return MOE_EINVAL;
    if (!moe_row_size(w->type, w->n_in)) return MOE_EUNSUPPORTED;
    for (int64_t t = 0; t < n; t++)
        if (ids[t] < 0 || ids[t] >= w->n_out) return MOE_EINVAL;
    if (!n) return MOE_OK;
    cuda_stage st;
    MOE_TRY(cuda__stage_begin(c, cuda__stage_size((size_t)n * 4), &st));
    const int32_t *d_ids = (const int32_t *)cuda__stage_put(&st, ids, (size_t)n * 4);
    MOE_TRY(cuda__stage_end(c, &st));
    return cuda__dequant_rows(c, w, d_ids, n, out);
}

// ---- the table ----

// designated (C++20): a table by name cannot pair add with mul's slot
static const struct moe_backend_ops cuda_ops = {
    .name = "cuda",
    .destroy = cuda_destroy,
    .supports_type = cuda__supports_type,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .bind_weight = cuda_bind_weight,
    .unbind_weight = cuda_unbind_weight,
    .embed = cuda__embed,
    .get_rows = cuda__get_rows,
    .rms_norm = cuda__rms_norm,
    .matmul = cuda__matmul,
    .add = cuda__add,
    .mul = cuda__mul,
    .swiglu = cuda__swiglu,
    .sigmoid_scale = cuda__sigmoid_scale,
    .rope = cuda__rope,
    .kv_store = cuda__kv_store,
    .attention = cuda__attention,
    .mla_attention = cuda__mla_attention,
    .moe = cuda__moe,
};

static int init_ctx(cuda_ctx *c, const moe_cuda_backend_opts *opts) {
    CUDA_CHECK(cudaSetDevice(c->device));
    CUDA_CHECK(cudaDeviceGetAttribute(&c->n_sm, cudaDevAttrMultiProcessorCount, c->device));
    CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&c->blas));
    CUBLAS_CHECK(cublasSetStream(c->blas, c->stream));
    // f32 products stay f32: no TF32 unless asked for
    CUBLAS_CHECK(cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH));
    for (int i = 0; i < CUDA_N_STAGE; i++) CUDA_CHECK(cudaEventCreateWithFlags(&c->seg[i].done, cudaEventDisableTiming));
    c->gemv_max_tok = opts && opts->gemv_max_tok > 0 ? opts->gemv_max_tok : 8;
    if (c->gemv_max_tok > 8) c->gemv_max_tok = 8; // the GEMV kernels keep 8 accumulators
    return MOE_OK;
}

extern "C" int moe_cuda_backend_init(moe_backend *be, const moe_cuda_backend_opts *opts) {
    if (!be) return MOE_EINVAL;
    be->ops = NULL;
    be->ctx = NULL;
    int n = cuda_device_count();
    if (n <= 0) return MOE_EUNSUPPORTED;
    int dev = opts ? opts->device : 0;
    if (dev < 0 || dev >= n) return MOE_EINVAL;
    cuda_ctx *c = (cuda_ctx *)calloc(1, sizeof(*c));
    if (!c) return MOE_ENOMEM;
    c->device = dev;
    int rc = init_ctx(c, opts);
    if (rc) {
        cuda_destroy(c);
        return rc;
    }
    be->ops = &cuda_ops;
    be->ctx = c;
    return MOE_OK;
}
