/* backend.c - the backend factory and the op-table check (see backend.h). */
#include "backend.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "log_hook.h"
#include "quant.h"
#ifdef MOE_HAVE_CUDA
#include "cuda_backend.h"
#endif

/* The list and the struct agree: a member added to one only fails here. */
#define X(op) +1
_Static_assert(sizeof(struct moe_backend_ops) == sizeof(const char *) + (0 MOE_BACKEND_OPS(X)) * sizeof(void (*)(void)),
               "MOE_BACKEND_OPS must list every function member of moe_backend_ops");
#undef X

int moe_backend_check(const moe_backend *be, char *err, size_t errsz) {
    if (!be || !be->ops) {
        return moe_seterr(err, errsz, MOE_EINVAL, "no backend");
    }
    const struct moe_backend_ops *o = be->ops;
    const struct {
        const char *name;
        bool set;
    } ops[] = {
#define X(op) {#op, o->op != NULL},
        MOE_BACKEND_OPS(X)
#undef X
    };
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
        if (!ops[i].set) {
            return moe_seterr(err, errsz, MOE_EINVAL, "backend '%s' has no '%s' op", o->name ? o->name : "?", ops[i].name);
        }
    return MOE_OK;
}

static int checked(moe_backend *be, const char *what, int rc, char *err, size_t errsz) {
    if (rc) {
        return moe_seterr(err, errsz, rc, "%s backend: %s", what, moe_strerror(rc));
    }
    if ((rc = moe_backend_check(be, err, errsz))) moe_backend_destroy(be);
    return rc;
}

int moe_backend_create(const char *device, int n_threads, moe_backend *be, const char **name, char *err,
                       size_t errsz) {
    const char *d = device ? device : "auto";
    if (!be) return MOE_EINVAL;
    be->ops = NULL;
    be->ctx = NULL;
    if (strcmp(d, "cpu") && strcmp(d, "cuda") && strcmp(d, "auto")) {
        return moe_seterr(err, errsz, MOE_EINVAL, "device '%s' is not cpu, cuda or auto", d);
    }
#ifdef MOE_HAVE_CUDA
    /* "auto" takes the GPU when one is usable; "cuda" insists on it. A GPU
     * that CUDA cannot use (e.g. error 35, a driver older than the
     * runtime) is named with CUDA's own message, never as "no device";
     * "auto" says so only where a GPU is visible (a CPU host with a CUDA
     * build and no driver gets the same error 35). */
    int n_dev = 0, no_device = 1;
    const char *why = "";
    int cerr = cuda_device_probe(&n_dev, &no_device, &why);
    if (!strcmp(d, "auto") && n_dev <= 0 && !no_device && access("/dev/nvidia0", F_OK) == 0)
        moe_log(MOE_LOG_WARN, "device auto: CUDA cannot use this machine's GPU (%s, CUDA error %d); using the CPU", why,
                cerr);
    if (!strcmp(d, "cuda") || (!strcmp(d, "auto") && n_dev > 0)) {
        if (n_dev <= 0) {
            if (no_device) return moe_seterr(err, errsz, MOE_EUNSUPPORTED, "CUDA backend: no CUDA device found");
            return moe_seterr(err, errsz, MOE_EUNSUPPORTED, "CUDA backend: CUDA cannot use the GPU: %s (CUDA error %d)",
                              why, cerr);
        }
        if (name) *name = "cuda";
        return checked(be, "CUDA", moe_cuda_backend_init(be, NULL), err, errsz);
    }
#else
    if (!strcmp(d, "cuda")) {
        return moe_seterr(err, errsz, MOE_EUNSUPPORTED, "CUDA backend not available in this build (built without CUDA; build with make CUDA=1)");
    }
#endif
    if (name) *name = "cpu";
    return checked(be, "CPU", moe_cpu_backend_init(be, &(moe_cpu_backend_opts){.n_threads = n_threads}), err, errsz);
}
