/* safetensors.h - a memory-mapped, hostile-input-safe reader of
 * Hugging Face .safetensors files.
 *
 * The format: an 8-byte little-endian header length N, N bytes of JSON
 * ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
 * optional "__metadata__": {string: string}}), then the byte buffer that
 * the offsets index. moe_st_open() validates the whole header before
 * anything is handed out: N against a size limit and the file, the JSON,
 * every dtype, shape (integral, non-negative, overflow-checked element
 * and byte counts), that end - begin is exactly the shape's byte count,
 * that every extent lies inside the file, that no two extents overlap and
 * that no name repeats. Nothing is read out of bounds, whatever the file
 * says.
 *
 * Thread-safety: a reader is immutable after open and may be shared.
 */
#ifndef MOE_SAFETENSORS_H
#define MOE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Headers beyond this are refused (the reference implementation's limit):
 * the JSON is parsed into memory, so a hostile length must not size it. */
#define MOE_ST_MAX_HEADER ((uint64_t)100 << 20)
#define MOE_ST_MAX_DIMS 8
#define MOE_ST_MAX_NAME 512

typedef enum moe_st_dtype {
    MOE_ST_BOOL,
    MOE_ST_U8,
    MOE_ST_I8,
    MOE_ST_F8_E4M3,
    MOE_ST_F8_E5M2,
    MOE_ST_I16,
    MOE_ST_U16,
    MOE_ST_F16,
    MOE_ST_BF16,
    MOE_ST_I32,
    MOE_ST_U32,
    MOE_ST_F32,
    MOE_ST_I64,
    MOE_ST_U64,
    MOE_ST_F64,
    MOE_ST_DTYPE_COUNT
} moe_st_dtype;

typedef struct moe_st_tensor {
    const char *name;              /* NUL-terminated copy owned by the reader */
    moe_st_dtype dtype;
    uint32_t n_dims;               /* 0 for a scalar */
    int64_t shape[MOE_ST_MAX_DIMS]; /* row-major: shape[n_dims-1] is contiguous */
    uint64_t n_elem;
    uint64_t offset;               /* from the start of the byte buffer */
    uint64_t nbytes;
    const void *data;              /* inside the mapping; may be unaligned */
} moe_st_tensor;

typedef struct moe_st moe_st;

/* Opens and validates `path`. Returns the reader, or NULL with *status
 * set (MOE_EIO, MOE_EFORMAT, MOE_ENOMEM) and a message in err (may be
 * NULL) naming what is wrong: the tensor, the field, the value. A path
 * that is not a regular file is refused with MOE_EIO, never waited on.
 * Caller frees with moe_st_close(). */
moe_st *moe_st_open(const char *path, int *status, char *err, size_t errsz);

/* Same over a caller-owned buffer that must outlive the reader (tests and
 * the fuzzer; nothing is copied). */
moe_st *moe_st_open_memory(const void *buf, size_t size, int *status, char *err, size_t errsz);

/* Unmaps and frees everything; NULL is a no-op. */
void moe_st_close(moe_st *s);

uint64_t moe_st_n_tensors(const moe_st *s);
/* Tensors in the order of their data offsets. */
const moe_st_tensor *moe_st_tensor_at(const moe_st *s, uint64_t i);
/* Returns the tensor called `name`, or NULL. */
const moe_st_tensor *moe_st_find(const moe_st *s, const char *name);
/* Value of "__metadata__" entry `key` (NUL-terminated, owned by the
 * reader), or NULL when absent. */
const char *moe_st_metadata(const moe_st *s, const char *key);

/* Tells the kernel that tensor t's pages (a file opened with
 * moe_st_open(), t one of its tensors) will not be read again soon, so a
 * converter streaming through a file larger than RAM keeps its resident
 * set to what it is working on. The data stays readable (it is paged in
 * again from the file). No-op for other readers or tensors. */
void moe_st_drop_pages(const moe_st *s, const moe_st_tensor *t);

/* "F32", "BF16", ...; "?" for an unknown id. */
const char *moe_st_dtype_name(int dtype);
/* Bytes per element; 0 for an unknown id. */
size_t moe_st_dtype_size(int dtype);

#ifdef __cplusplus
}
#endif
#endif
