/* gguf.h - GGUF model files: a memory-mapped, hostile-input-safe reader
 * and a streaming writer.
 *
 * Reader: moe_gguf_open() maps the file read-only, validates the whole
 * header (every count, length, offset, alignment and tensor extent, with
 * overflow-checked arithmetic) and builds an index. Nothing is read out of
 * bounds, whatever the file says. Strings and tensor data point into the
 * mapping and live until moe_gguf_close(). Versions 2 and 3 are read.
 *
 * Writer: declare metadata and tensor infos, then moe_gguf_writer_begin()
 * writes the header, then each tensor's bytes are streamed in declaration
 * order with moe_gguf_writer_write_tensor(); no tensor needs to be held in
 * memory all at once, so multi-GB models are written in bounded memory.
 * Files are written as version 3, little-endian.
 *
 * Thread-safety: a reader is immutable after open and may be shared by
 * threads; a writer belongs to one thread.
 */
#ifndef MOE_GGUF_H
#define MOE_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qblocks.h"
#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_GGUF_MAGIC 0x46554747u /* "GGUF" little-endian */
#define MOE_GGUF_DEFAULT_ALIGNMENT 32
#define MOE_GGUF_MAX_DIMS 4

/* Metadata value types, with their numbers in the file. */
typedef enum moe_gguf_vtype {
    MOE_GGUF_UINT8 = 0,
    MOE_GGUF_INT8 = 1,
    MOE_GGUF_UINT16 = 2,
    MOE_GGUF_INT16 = 3,
    MOE_GGUF_UINT32 = 4,
    MOE_GGUF_INT32 = 5,
    MOE_GGUF_FLOAT32 = 6,
    MOE_GGUF_BOOL = 7,
    MOE_GGUF_STRING = 8,
    MOE_GGUF_ARRAY = 9,
    MOE_GGUF_UINT64 = 10,
    MOE_GGUF_INT64 = 11,
    MOE_GGUF_FLOAT64 = 12,
    MOE_GGUF_VTYPE_COUNT
} moe_gguf_vtype;

/* A string inside the mapping: NOT NUL-terminated, may contain NULs. */
typedef struct moe_gguf_str {
    const char *ptr;
    uint64_t len;
} moe_gguf_str;

typedef struct moe_gguf_value moe_gguf_value;

/* An array value. Fixed-size element types are left in place: `data`
 * points at n packed little-endian elements inside the mapping (possibly
 * unaligned: read them with memcpy or the moe_gguf_arr_* helpers).
 * STRING and ARRAY elements are decoded into `items` (n entries). */
typedef struct moe_gguf_array {
    moe_gguf_vtype etype;
    uint64_t n;
    const void *data;      /* fixed-size etypes only, else NULL */
    moe_gguf_value *items; /* STRING / ARRAY etypes only, else NULL */
} moe_gguf_array;

struct moe_gguf_value {
    moe_gguf_vtype type;
    union {
        uint64_t u64; /* UINT8/16/32/64, widened */
        int64_t i64;  /* INT8/16/32/64, widened */
        double f64;   /* FLOAT32/64, widened */
        bool b;
        moe_gguf_str str;
        moe_gguf_array arr;
    } v;
};

typedef struct moe_gguf_kv {
    const char *key; /* NUL-terminated copy owned by the reader */
    moe_gguf_value value;
} moe_gguf_kv;

typedef struct moe_gguf_tensor {
    const char *name; /* NUL-terminated copy owned by the reader */
    moe_type type;
    uint32_t n_dims;
    int64_t ne[MOE_GGUF_MAX_DIMS]; /* ne[0] is the contiguous dimension; unused dims are 1 */
    uint64_t offset;               /* relative to the start of the data section */
    uint64_t nbytes;
    const void *data; /* inside the mapping, aligned to the file's alignment */
} moe_gguf_tensor;

typedef struct moe_gguf moe_gguf;

/* Opens and validates `path`. Returns the reader, or NULL with *status set
 * (MOE_EIO, MOE_EFORMAT, MOE_ENOMEM, MOE_EUNSUPPORTED) and a message in
 * `err` (may be NULL; errsz bytes, always NUL-terminated) that names what
 * is wrong and its byte offset. A path that is not a regular file is
 * refused at once with MOE_EIO ("not a regular file (FIFO)"), never
 * waited on. Caller frees with moe_gguf_close(). */
moe_gguf *moe_gguf_open(const char *path, int *status, char *err, size_t errsz);

/* Whether addr lies inside the mapping of a file opened by moe_gguf_open()
 * and not yet closed; if so, copies that file's path (as given to open)
 * into path (pathsz bytes, NUL-terminated; may be NULL). A file that
 * shrinks while mapped turns reads past its new end into SIGBUS: this
 * lets a SIGBUS handler tell that case from any other. Async-signal-safe,
 * lock-free; any thread. */
bool moe_gguf_mapping_lookup(const void *addr, char *path, size_t pathsz);

/* Same as moe_gguf_open() over a caller-owned buffer, which must outlive
 * the reader (used by tests and the fuzzer; nothing is copied). */
moe_gguf *moe_gguf_open_memory(const void *buf, size_t size, int *status, char *err, size_t errsz);

/* Unmaps and frees everything; NULL is a no-op. */
void moe_gguf_close(moe_gguf *g);

uint32_t moe_gguf_version(const moe_gguf *g);
uint64_t moe_gguf_alignment(const moe_gguf *g);
uint64_t moe_gguf_file_size(const moe_gguf *g);
uint64_t moe_gguf_data_offset(const moe_gguf *g); /* start of the tensor data section */

uint64_t moe_gguf_n_kv(const moe_gguf *g);
const moe_gguf_kv *moe_gguf_kv_at(const moe_gguf *g, uint64_t i);
/* Returns the entry for `key`, or NULL. */
const moe_gguf_kv *moe_gguf_find_kv(const moe_gguf *g, const char *key);

uint64_t moe_gguf_n_tensors(const moe_gguf *g);
const moe_gguf_tensor *moe_gguf_tensor_at(const moe_gguf *g, uint64_t i);
/* Returns the tensor called `name`, or NULL. */
const moe_gguf_tensor *moe_gguf_find_tensor(const moe_gguf *g, const char *name);

/* Typed getters. Each returns MOE_OK and sets *out; MOE_ENOTFOUND when the
 * key is absent; MOE_EINVAL when its type cannot be converted (any integer
 * type to u64/i64/u32 when in range; FLOAT32/64 and integers of magnitude
 * <= 2^53 to double; get_f32 rounds a double to the nearest float and
 * refuses only finite values beyond the float range). */
int moe_gguf_get_u64(const moe_gguf *g, const char *key, uint64_t *out);
int moe_gguf_get_i64(const moe_gguf *g, const char *key, int64_t *out);
int moe_gguf_get_u32(const moe_gguf *g, const char *key, uint32_t *out);
int moe_gguf_get_f64(const moe_gguf *g, const char *key, double *out);
int moe_gguf_get_f32(const moe_gguf *g, const char *key, float *out);
int moe_gguf_get_bool(const moe_gguf *g, const char *key, bool *out);
int moe_gguf_get_str(const moe_gguf *g, const char *key, moe_gguf_str *out);
/* Returns the array value of `key` (any etype), or NULL. */
const moe_gguf_array *moe_gguf_get_arr(const moe_gguf *g, const char *key);

/* Element i of a fixed-size numeric array, widened. Caller checks i < n
 * and the etype class (MOE_EINVAL otherwise). */
int moe_gguf_arr_u64(const moe_gguf_array *a, uint64_t i, uint64_t *out);
int moe_gguf_arr_i64(const moe_gguf_array *a, uint64_t i, int64_t *out);
int moe_gguf_arr_f64(const moe_gguf_array *a, uint64_t i, double *out);

/* Byte size of one element of a fixed-size metadata type; 0 for STRING,
 * ARRAY and unknown ids. */
size_t moe_gguf_vtype_size(int vtype);
const char *moe_gguf_vtype_name(int vtype);

/* --- writer --- */

typedef struct moe_gguf_writer moe_gguf_writer;

/* Returns a new, empty writer (alignment 32) or NULL on ENOMEM. */
moe_gguf_writer *moe_gguf_writer_new(void);
/* Frees the writer, closing its file if still open; NULL is a no-op. */
void moe_gguf_writer_free(moe_gguf_writer *w);

/* Metadata setters copy their arguments. Setting an existing key replaces
 * its value. Return MOE_OK, MOE_EINVAL (bad type/arguments, or a value the
 * reader would refuse: nesting deeper than the reader's limit, counts or
 * lengths out of range), MOE_ENOMEM, or MOE_ESTATE once
 * moe_gguf_writer_begin() has been called (every setter and add_tensor).
 * Setting "general.alignment" (u32, a power of two) changes the alignment
 * used for tensor data. */
int moe_gguf_writer_set_u8(moe_gguf_writer *w, const char *key, uint8_t v);
int moe_gguf_writer_set_i8(moe_gguf_writer *w, const char *key, int8_t v);
int moe_gguf_writer_set_u16(moe_gguf_writer *w, const char *key, uint16_t v);
int moe_gguf_writer_set_i16(moe_gguf_writer *w, const char *key, int16_t v);
int moe_gguf_writer_set_u32(moe_gguf_writer *w, const char *key, uint32_t v);
int moe_gguf_writer_set_i32(moe_gguf_writer *w, const char *key, int32_t v);
int moe_gguf_writer_set_u64(moe_gguf_writer *w, const char *key, uint64_t v);
int moe_gguf_writer_set_i64(moe_gguf_writer *w, const char *key, int64_t v);
int moe_gguf_writer_set_f32(moe_gguf_writer *w, const char *key, float v);
int moe_gguf_writer_set_f64(moe_gguf_writer *w, const char *key, double v);
int moe_gguf_writer_set_bool(moe_gguf_writer *w, const char *key, bool v);
int moe_gguf_writer_set_str(moe_gguf_writer *w, const char *key, const char *s);
/* A string with explicit length (may contain NULs). */
int moe_gguf_writer_set_strn(moe_gguf_writer *w, const char *key, const char *s, uint64_t len);
/* An array of n fixed-size elements of `etype`, packed little-endian in `data`. */
int moe_gguf_writer_set_arr(moe_gguf_writer *w, const char *key, moe_gguf_vtype etype, const void *data,
                            uint64_t n);
/* An array of n NUL-terminated strings. */
int moe_gguf_writer_set_arr_str(moe_gguf_writer *w, const char *key, const char *const *strs, uint64_t n);
/* Any value, including nested arrays (deep copy). */
int moe_gguf_writer_set_value(moe_gguf_writer *w, const char *key, const moe_gguf_value *v);

/* Declares a tensor (name copied); dimensions ne[0..n_dims-1], ne[0]
 * contiguous. Its data is laid out in declaration order. Returns MOE_OK,
 * MOE_EINVAL (duplicate name, bad type, ne[0] not a multiple of the block
 * size, n_dims outside 1..4) or MOE_ENOMEM. */
int moe_gguf_writer_add_tensor(moe_gguf_writer *w, const char *name, moe_type type, uint32_t n_dims,
                               const int64_t *ne);

/* Creates `path` and writes header, metadata and tensor infos. After this
 * no metadata or tensor may be added. Returns MOE_OK or MOE_EIO. */
int moe_gguf_writer_begin(moe_gguf_writer *w, const char *path);
/* Appends `n` bytes of the current tensor's data (call repeatedly to
 * stream a tensor in chunks). The writer moves to the next tensor, adding
 * alignment padding, once the current one is complete. Returns MOE_OK,
 * MOE_EINVAL (more bytes than the tensor holds) or MOE_EIO. */
int moe_gguf_writer_write_tensor(moe_gguf_writer *w, const void *data, size_t n);
/* Checks every tensor was written in full, flushes and closes the file.
 * Returns MOE_OK, MOE_ESTATE (tensors missing) or MOE_EIO. */
int moe_gguf_writer_finish(moe_gguf_writer *w);

#ifdef __cplusplus
}
#endif
#endif
