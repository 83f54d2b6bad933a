/* finite.c - NaN/Inf search in float rows and stored tensors (finite.h). */
#include "finite.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "qblocks.h"
#include "quant.h"
#include "status.h"

/* Elements decoded per chunk: a multiple of every block size (32, 256),
 * small enough to stay in cache. */
#define SCAN_CHUNK 16384

int64_t moe_nonfinite_find(const float *x, int64_t n) {
    if (!x) return -1;
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return i;
    return -1;
}

const char *moe_nonfinite_kind(float v) {
    if (isnan(v)) return "NaN";
    if (isinf(v)) return v > 0 ? "+Inf" : "-Inf";
    return "finite";
}

int moe_nonfinite_scan_tensor(int type, const void *data, int64_t n_elem, int64_t *first, float *value) {
    if (!first || !value || n_elem < 0 || (n_elem && !data)) return MOE_EINVAL;
    *first = -1;
    *value = 0;
    const moe_type_traits *tt = moe_type_get(type);
    if (!tt || !tt->size) return MOE_EUNSUPPORTED;
    if (type == MOE_TYPE_I8 || type == MOE_TYPE_I16 || type == MOE_TYPE_I32 || type == MOE_TYPE_I64) return MOE_OK;
    if (n_elem % tt->blck) return MOE_EINVAL;
    if (type == MOE_TYPE_F64) {
        for (int64_t i = 0; i < n_elem; i++) {
            double d;
            memcpy(&d, (const char *)data + (size_t)i * sizeof d, sizeof d);
            if (!isfinite(d)) {
                *first = i;
                *value = (float)d;
                return MOE_OK;
            }
        }
        return MOE_OK;
    }
    float *buf = malloc(SCAN_CHUNK * sizeof(float));
    if (!buf) return MOE_ENOMEM;
    int rc = MOE_OK;
    for (int64_t off = 0; off < n_elem && *first < 0; off += SCAN_CHUNK) {
        int64_t n = n_elem - off < SCAN_CHUNK ? n_elem - off : SCAN_CHUNK;
        const char *src = (const char *)data + (size_t)(off / tt->blck) * tt->size;
        /* F32 too goes through the copy: a file's alignment may leave it unaligned */
        if ((rc = moe_dequantize_row(type, src, buf, n))) break;
        int64_t i = moe_nonfinite_find(buf, n);
        if (i >= 0) *first = off + i, *value = buf[i];
    }
    free(buf);
    return rc;
}
