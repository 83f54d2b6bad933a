/* cuda_backend.h - the CUDA backend's C interface (compiled by gcc and nvcc).
 *
 * moe_cuda_backend_init() fills the same op table as the CPU backend
 * (engine/backend.h) with GPU implementations: weights are copied to
 * device memory by bind_weight (cudaMalloc, never managed memory), every
 * op runs on one CUDA stream owned by the backend, and the small host
 * index arrays the ops receive are copied through a pinned staging ring.
 * Errors come back as negative moe_status (MOE_EBACKEND for a CUDA or
 * cuBLAS failure, whose message is logged through moe_log where it happens).
 *
 * Precision (checked by tests/check_cuda_ops.c against the CPU backend):
 * f32 everywhere except the cuBLAS path of F16/BF16 weights for more than
 * `gemv_max_tok` tokens, which rounds the activations to the weight's
 * 16-bit type (f32 accumulation). Quantized weights are dequantized
 * exactly and multiplied in f32 (the CPU rounds activations to int8
 * instead, so the two differ by the CPU's ~0.5 %).
 *
 * Threads: a backend belongs to one thread, as every backend.
 */
#ifndef CUDA_BACKEND_H
#define CUDA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of CUDA devices usable by this process; 0 when there is no
 * driver or no GPU. Any thread. */
int cuda_device_count(void);

/* cudaGetDeviceCount's whole answer, for callers that must tell "no GPU"
 * from "a GPU CUDA cannot use" (cuda_device_count() says 0 to both): sets
 * *n (0 on error), *no_device (1 when CUDA reports no device:
 * cudaErrorNoDevice, or success with none) and *msg (cudaGetErrorString's
 * static text). Returns the CUDA error code, 0 on success (e.g. 35,
 * cudaErrorInsufficientDriver: the driver is older than the runtime).
 * Any thread. */
int cuda_device_probe(int *n, int *no_device, const char **msg);

/* The device's memory bandwidth in GB/s: the best of three timings (CUDA
 * events) of ten device-to-device copies of nbytes, counting each copy as
 * nbytes read plus nbytes written - the rate decode's weight reads can
 * approach. Returns MOE_OK, MOE_EINVAL, MOE_EUNSUPPORTED (no device) or
 * MOE_EBACKEND. Any thread (it selects `device`). */
int cuda_copy_bandwidth(int device, size_t nbytes, double *gbs);

typedef struct moe_cuda_backend_opts {
    int device;       /* CUDA device ordinal */
    int gemv_max_tok; /* matmul: up to this many tokens per weight use the GEMV kernels; <= 0: 8 */
} moe_cuda_backend_opts;

/* Fills *be with a CUDA backend on opts->device (opts may be NULL: device
 * 0, defaults). Returns MOE_OK, MOE_EINVAL (bad device ordinal),
 * MOE_EUNSUPPORTED (no CUDA device) or MOE_EBACKEND. Caller frees with
 * moe_backend_destroy(). */
int moe_cuda_backend_init(moe_backend *be, const moe_cuda_backend_opts *opts);

/* Sampling on the device (backend.h has no sample op). */
typedef struct moe_cuda_sample_params {
    float temperature; /* <= 0: greedy argmax (lowest id on ties) */
    float top_p;       /* in (0, 1]; 1 keeps every token */
    uint64_t seed;     /* with the row index, picks the random draw */
} moe_cuda_sample_params;

/* For each of n_rows rows of logits (device memory of a CUDA backend
 * `be`, n_vocab floats per row), picks a token per params[row] (host
 * array) and writes it to out_host[row]. Top-p keeps the smallest set of
 * the most probable tokens whose probability reaches top_p (at the
 * probability threshold all tokens tied with it are kept). Synchronous.
 * Returns MOE_OK, MOE_EINVAL or MOE_EBACKEND. */
int moe_cuda_sample(const moe_backend *be, const float *logits, int64_t n_rows, int64_t n_vocab,
                    const moe_cuda_sample_params *params, int32_t *out_host);

/* Test hook: the GPU kernels' dequantizer (the same source, compiled for
 * the host) applied to one row of n elements of `type`. Lets the kernels'
 * block decoding be checked against engine/quant.c on machines without a
 * GPU. Returns MOE_OK, MOE_EINVAL (bad n) or MOE_EUNSUPPORTED. Any thread. */
int cuda__dequant_row_host(int type, const void *row, float *out, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
