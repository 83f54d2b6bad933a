/* cuda_backend.h - the CUDA backend's C interface (compiled by gcc and nvcc). */
#ifndef CUDA_BACKEND_H
#define CUDA_BACKEND_H

#ifdef __cplusplus
extern "C" {
#endif

/* Number of CUDA devices usable by this process; 0 when there is no
 * driver or no GPU. Any thread. */
int cuda_device_count(void);

#ifdef __cplusplus
}
#endif
#endif
