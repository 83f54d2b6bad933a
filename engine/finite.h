/* finite.h - finding NaN and Inf: in a row of floats (the logits of a
 * step) and in a stored tensor of any type moed decodes (`moed info
 * --check`). A weight file with one NaN makes every logit that depends on
 * it NaN; these say where, so the engine can fail the sequences affected
 * and the CLI can name the tensor. Any thread; no state.
 */
#ifndef MOE_FINITE_H
#define MOE_FINITE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Index of the first NaN, +Inf or -Inf in x[0..n), or -1 when every
 * element is finite. */
int64_t moe_nonfinite_find(const float *x, int64_t n);

/* "NaN", "+Inf" or "-Inf" for a non-finite v ("finite" otherwise); static. */
const char *moe_nonfinite_kind(float v);

/* Decodes the n_elem elements of a tensor of `type` at `data` block by
 * block (f16/bf16 conversion, every block scale of the quantized types:
 * a NaN or Inf scale decodes to NaN/Inf) and finds the first non-finite
 * element: *first = its element index and *value = its decoded value, or
 * *first = -1. Integer types (I8..I64) hold no NaN and are clean.
 * Returns MOE_OK, MOE_EINVAL (n_elem not a multiple of the block size,
 * NULL pointers), MOE_EUNSUPPORTED (a type moed cannot decode) or
 * MOE_ENOMEM. */
int moe_nonfinite_scan_tensor(int type, const void *data, int64_t n_elem, int64_t *first, float *value);

#ifdef __cplusplus
}
#endif
#endif
