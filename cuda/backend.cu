// backend.cu - CUDA backend entry points. The ops arrive with the CUDA
// issues; for now this reports whether a usable device is present.
#include <cuda_runtime.h>
#include <stdio.h>

#include "cuda_backend.h"

extern "C" int cuda_device_count(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* clear the sticky "no device" error */
        return 0;
    }
    return n;
}
