// emu.cc - the CPU side of tests/gpu/emu: kernel launches as threads with
// barriers, the runtime calls on host memory, and cublasGemmEx as a plain
// loop. See cuda_emu.h.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include <vector>

#include "cuda_emu.h"
#include "cublas_v2.h"
#include "cuda_runtime.h"
#include "quant.h"

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

static pthread_barrier_t block_bar, warp_bar[32];
static uint64_t shfl_buf[32][32];
static std::vector<char> dyn_smem;

void __syncthreads(void) { pthread_barrier_wait(&block_bar); }
void __syncwarp(unsigned) { pthread_barrier_wait(&warp_bar[threadIdx.x / 32]); }

uint64_t emu_shfl_xor(uint64_t v, int o) {
    unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
    shfl_buf[w][l] = v;
    pthread_barrier_wait(&warp_bar[w]);
    uint64_t r = shfl_buf[w][l ^ (unsigned)o];
    pthread_barrier_wait(&warp_bar[w]); // nobody overwrites before all have read
    return r;
}

void *emu_dyn_smem(void) { return dyn_smem.data(); }

struct worker {
    unsigned tid;
    const std::function<void()> *body;
};

static void *run_thread(void *arg) {
    worker *wk = (worker *)arg;
    threadIdx = dim3(wk->tid, 0, 0);
    for (unsigned z = 0; z < gridDim.z; z++)
        for (unsigned y = 0; y < gridDim.y; y++)
            for (unsigned x = 0; x < gridDim.x; x++) {
                blockIdx = dim3(x, y, z);
                (*wk->body)();
                pthread_barrier_wait(&block_bar); // the block is done before shared memory is reused
            }
    return NULL;
}

void emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()> &body) {
    unsigned n = block.x;
    if (block.y != 1 || block.z != 1 || n == 0 || n > 1024 || n % 32) {
        fprintf(stderr, "emu: unsupported block %u x %u x %u\n", block.x, block.y, block.z);
        abort();
    }
    blockDim = block;
    gridDim = grid;
    dyn_smem.assign(smem + 16, (char)0xFF); // unwritten shared memory reads as NaN / -1
    pthread_barrier_init(&block_bar, NULL, n);
    for (unsigned w = 0; w < n / 32; w++) pthread_barrier_init(&warp_bar[w], NULL, 32);
    std::vector<pthread_t> th(n);
    std::vector<worker> wk(n);
    for (unsigned i = 0; i < n; i++) {
        wk[i] = worker{i, &body};
        if (pthread_create(&th[i], NULL, run_thread, &wk[i])) {
            fprintf(stderr, "emu: pthread_create failed\n");
            abort();
        }
    }
    for (unsigned i = 0; i < n; i++) pthread_join(th[i], NULL);
    pthread_barrier_destroy(&block_bar);
    for (unsigned w = 0; w < n / 32; w++) pthread_barrier_destroy(&warp_bar[w]);
}

// ---- runtime ----

cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char *cudaGetErrorString(cudaError_t e) { return e ? "emulated error" : "no error"; }
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr, int) {
    *v = 132;
    return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned) {
    *s = (cudaStream_t)1;
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned) {
    *e = (cudaEvent_t)1;
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaMalloc(void **p, size_t n) {
    *p = aligned_alloc(256, (n + 255) & ~(size_t)255);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void *p) {
    free(p);
    return cudaSuccess;
}
cudaError_t cudaMallocHost(void **p, size_t n) { return cudaMalloc(p, n); }
cudaError_t cudaFreeHost(void *p) { return cudaFree(p); }
cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, enum cudaMemcpyKind, cudaStream_t) {
    memmove(d, s, n);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t) {
    memset(p, v, n);
    return cudaSuccess;
}

// ---- cuBLAS ----

cublasStatus_t cublasCreate(cublasHandle_t *h) {
    *h = (cublasHandle_t)1;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
const char *cublasGetStatusString(cublasStatus_t s) { return s ? "emulated cublas error" : "success"; }

static float elem(const void *p, cudaDataType_t t, size_t i) {
    switch (t) {
    case CUDA_R_32F: return ((const float *)p)[i];
    case CUDA_R_16F: return moe_f16_to_f32(((const uint16_t *)p)[i]);
    case CUDA_R_16BF: return moe_bf16_to_f32(((const uint16_t *)p)[i]);
    }
    return NAN;
}

// column-major C (m x n) = alpha op(A) op(B) + beta C, f32 accumulation
cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType_t at, int lda, const void *B,
                            cudaDataType_t bt, int ldb, const void *beta, void *C, cudaDataType_t ct, int ldc,
                            cublasComputeType_t, cublasGemmAlgo_t) {
    if (ct != CUDA_R_32F) return 7;
    float al = *(const float *)alpha, be = *(const float *)beta;
    float *c = (float *)C;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float s = 0;
            for (int l = 0; l < k; l++) {
                float a = ta == CUBLAS_OP_N ? elem(A, at, (size_t)i + (size_t)l * lda) : elem(A, at, (size_t)l + (size_t)i * lda);
                float b = tb == CUBLAS_OP_N ? elem(B, bt, (size_t)l + (size_t)j * ldb) : elem(B, bt, (size_t)j + (size_t)l * ldb);
                s += a * b;
            }
            float *o = c + (size_t)i + (size_t)j * ldc;
            *o = al * s + (be != 0 ? be * *o : 0.0f);
        }
    return CUBLAS_STATUS_SUCCESS;
}
