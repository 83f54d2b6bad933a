/* status.h - the one error-code table of moed.
 *
 * Functions return 0 (MOE_OK) or a negative moe_status. The table below is
 * an X-macro so the enum and moe_strerror() can never drift apart (the same
 * trick as libuv's UV_ERRNO_MAP). Only server/ maps these to HTTP codes.
 */
#ifndef MOE_STATUS_H
#define MOE_STATUS_H

#include <stddef.h>

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

/* The one formatter of those detail messages: printf-formats into
 * err[0..errsz) (nothing when err is NULL or errsz is 0; truncated to fit)
 * and returns `status`, so a failure is one statement:
 *     return moe_seterr(err, errsz, MOE_EFORMAT, "key '%s' is missing", k);
 * Any thread (it touches only err). */
#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
int moe_seterr(char *err, size_t errsz, int status, const char *fmt, ...);

/* Propagates a failure: evaluates `expr` (an int status) once and returns
 * it from the enclosing function when it is not MOE_OK. For functions
 * that own nothing yet; code that must free on failure uses
 * `if ((st = f())) goto fail;` instead. */
#define MOE_TRY(expr)              \
    do {                           \
        int moe_try_rc_ = (expr);  \
        if (moe_try_rc_)           \
            return moe_try_rc_;    \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
