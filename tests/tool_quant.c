/* tool_quant - quantize/dequantize rows through engine/quant.c for pytest.
 *
 *   tool_quant quant TYPE N    < N float32 values   > moe_row_size(TYPE, N) bytes
 *   tool_quant dequant TYPE N  < row bytes          > N float32 values
 *
 * TYPE is a name such as q4_0 or bf16. Exits 0 on success, 1 with a
 * message on stderr when the library refuses the request (status printed),
 * 2 on usage or I/O errors.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"
#include "status.h"

static int read_all(void *buf, size_t n) {
    return fread(buf, 1, n, stdin) == n ? 0 : -1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s quant|dequant TYPE N\n", argv[0]);
        return 2;
    }
    moe_type t;
    if (moe_type_from_name(argv[2], &t) != MOE_OK) {
        fprintf(stderr, "unknown type %s\n", argv[2]);
        return 2;
    }
    long long n = strtoll(argv[3], NULL, 10);
    size_t rs = moe_row_size(t, n);
    if (n <= 0 || rs == 0) {
        fprintf(stderr, "bad n %lld for %s\n", n, argv[2]);
        return 1;
    }
    float *f = malloc((size_t)n * sizeof(float));
    void *q = malloc(rs);
    if (!f || !q)
        return 2;
    int rc;
    if (strcmp(argv[1], "quant") == 0) {
        if (read_all(f, (size_t)n * sizeof(float)))
            return 2;
        rc = moe_quantize_row(t, f, q, n);
        if (rc == MOE_OK)
            fwrite(q, 1, rs, stdout);
    } else if (strcmp(argv[1], "dequant") == 0) {
        if (read_all(q, rs))
            return 2;
        rc = moe_dequantize_row(t, q, f, n);
        if (rc == MOE_OK)
            fwrite(f, sizeof(float), (size_t)n, stdout);
    } else {
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
    }
    free(f);
    free(q);
    if (rc != MOE_OK) {
        fprintf(stderr, "%s\n", moe_status_name(rc));
        return 1;
    }
    return 0;
}
