/* array.c - growable arrays; see array.h. */
#include "array.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "status.h"

static int resize(void **p, int64_t *cap, int64_t n, size_t elem) {
    size_t bytes;
    /* no object may exceed PTRDIFF_MAX bytes: refused here rather than
     * handed to an allocator that may abort (ASan does) */
    if (n < 0 || __builtin_mul_overflow((size_t)n, elem, &bytes) || bytes > (size_t)PTRDIFF_MAX) return MOE_ENOMEM;
    void *np = realloc(*p, bytes ? bytes : 1);
    if (!np) return MOE_ENOMEM;
    *p = np;
    *cap = n;
    return MOE_OK;
}

int moe_array_grow(void **p, int64_t *cap, int64_t need, int64_t min, size_t elem) {
    if (need <= *cap) return MOE_OK;
    int64_t n = *cap > 0 ? *cap : (min > 0 ? min : 1);
    while (n < need) n = n > INT64_MAX / 2 ? need : n * 2;
    return resize(p, cap, n, elem);
}

int moe_array_fit(void **p, int64_t *cap, int64_t need, size_t elem) {
    return need <= *cap ? MOE_OK : resize(p, cap, need, elem);
}
