/* status.h - the one error-code table of moed.
 *
 * Functions return 0 (MOE_OK) or a negative moe_status. The table below is
 * an X-macro so the enum and moe_strerror() can never drift apart (the same
 * trick as libuv's UV_ERRNO_MAP). Only server/ maps these to HTTP codes.
 */
#ifndef MOE_STATUS_H
#define MOE_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_STATUS_MAP(X)                                              \
    X(OK, 0, "success")                                                \
    X(EINVAL, -1, "invalid argument")                                  \
    X(ENOMEM, -2, "out of memory")                                     \
    X(EIO, -3, "I/O error")                                            \
    X(EFORMAT, -4, "malformed file")                                   \
    X(EUNSUPPORTED, -5, "unsupported")                                 \
    X(ENOTFOUND, -6, "not found")                                      \
    X(ERANGE, -7, "value out of range")                                \
    X(ESHAPE, -8, "tensor shape mismatch")                             \
    X(EFULL, -9, "capacity exhausted")                                 \
    X(ECANCELLED, -10, "cancelled")                                    \
    X(EBACKEND, -11, "backend failure")                                \
    X(ESTATE, -12, "invalid state")                                    \
    X(ENONFINITE, -13, "non-finite number (NaN or Inf)")

typedef enum moe_status {
#define MOE__STATUS_ENUM(name, code, msg) MOE_##name = (code),
    MOE_STATUS_MAP(MOE__STATUS_ENUM)
#undef MOE__STATUS_ENUM
} moe_status;

/* Returns a static, human-readable description of `status`; never NULL. */
const char *moe_strerror(int status);

/* Returns the symbolic name ("EINVAL") of `status`; never NULL. */
const char *moe_status_name(int status);

/* Size of the detail-message buffers that fallible loaders fill. */
#define MOE_ERR_MAX 256

#ifdef __cplusplus
}
#endif
#endif
