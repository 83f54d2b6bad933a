/* energy.c - energy sources and per-step attribution (see energy.h). */
#include "energy.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <powercap-rapl.h>

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#endif

#include "status.h"

static void errf(char *err, size_t errsz, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void errf(char *err, size_t errsz, const char *fmt, ...) {
    if (!err || !errsz) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errsz, fmt, ap);
    va_end(ap);
}

/* ---- estimate ---- */

typedef struct est_ctx {
    double idle_w, busy_w;
    double joules;
    uint64_t last_ns;
} est_ctx;

static int est_read(void *ctx, uint64_t now_ns, bool busy, double *joules) {
    est_ctx *c = ctx;
    if (c->last_ns && now_ns > c->last_ns) c->joules += (busy ? c->busy_w : c->idle_w) * (double)(now_ns - c->last_ns) * 1e-9;
    if (now_ns > c->last_ns) c->last_ns = now_ns;
    *joules = c->joules;
    return MOE_OK;
}

static void est_destroy(void *ctx) { free(ctx); }

void moe_energy_source_estimate(moe_energy_source *out, double idle_watts, double busy_watts) {
    memset(out, 0, sizeof *out);
    est_ctx *c = calloc(1, sizeof *c);
    out->name = "estimate";
    if (!c) return; /* read == NULL: treated as no source */
    c->idle_w = idle_watts > 0 ? idle_watts : 0;
    c->busy_w = busy_watts > 0 ? busy_watts : 0;
    out->read = est_read;
    out->destroy = est_destroy;
    out->ctx = c;
}

/* ---- RAPL through libpowercap ---- */

#define RAPL_MAX_ZONES 64

typedef struct rapl_zone {
    powercap_rapl_pkg *pkg;
    powercap_rapl_zone zone;
    uint64_t last_uj, range_uj;
    double total_j; /* unwrapped */
} rapl_zone;

typedef struct rapl_ctx {
    powercap_rapl_pkg *pkgs; /* (n_pkgs) */
    uint32_t n_pkgs;
    rapl_zone zones[RAPL_MAX_ZONES];
    int n_zones;
} rapl_ctx;

static void rapl_destroy(void *ctx) {
    rapl_ctx *c = ctx;
    if (!c) return;
    for (uint32_t i = 0; i < c->n_pkgs; i++) powercap_rapl_destroy(&c->pkgs[i]);
    free(c->pkgs);
    free(c);
}

static int rapl_read(void *ctx, uint64_t now_ns, bool busy, double *joules) {
    (void)now_ns;
    (void)busy;
    rapl_ctx *c = ctx;
    double sum = 0;
    for (int i = 0; i < c->n_zones; i++) {
        rapl_zone *z = &c->zones[i];
        uint64_t uj;
        if (powercap_rapl_get_energy_uj(z->pkg, z->zone, &uj)) return MOE_EIO;
        /* the counter wraps at max_energy_range_uj (every few minutes to
         * hours depending on the power): a smaller reading is a wrap */
        z->total_j += (double)moe_energy_counter_delta(z->last_uj, uj, z->range_uj) * 1e-6;
        z->last_uj = uj;
        sum += z->total_j;
    }
    *joules = sum;
    return MOE_OK;
}

static int rapl_open(moe_energy_source *out, char *err, size_t errsz) {
    uint32_t n = powercap_rapl_get_num_instances();
    if (n == 0) {
        errf(err, errsz, "no RAPL zones under /sys/class/powercap (not an Intel/AMD host with the "
                         "intel_rapl driver, or a VM)");
        return MOE_EUNSUPPORTED;
    }
    rapl_ctx *c = calloc(1, sizeof *c);
    if (!c || !(c->pkgs = calloc(n, sizeof *c->pkgs))) {
        free(c);
        return MOE_ENOMEM;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (powercap_rapl_init(i, &c->pkgs[i], 1)) {
            errf(err, errsz, "cannot open the RAPL zones (permission denied? energy_uj is root-only "
                             "on recent kernels)");
            rapl_destroy(c);
            return MOE_EUNSUPPORTED;
        }
        c->n_pkgs = i + 1;
        static const powercap_rapl_zone want[] = {POWERCAP_RAPL_ZONE_PACKAGE, POWERCAP_RAPL_ZONE_DRAM};
        for (int k = 0; k < 2 && c->n_zones < RAPL_MAX_ZONES; k++) {
            if (!powercap_rapl_is_zone_supported(&c->pkgs[i], want[k])) continue;
            rapl_zone *z = &c->zones[c->n_zones];
            z->pkg = &c->pkgs[i];
            z->zone = want[k];
            if (powercap_rapl_get_max_energy_range_uj(z->pkg, z->zone, &z->range_uj) ||
                powercap_rapl_get_energy_uj(z->pkg, z->zone, &z->last_uj)) {
                if (want[k] == POWERCAP_RAPL_ZONE_DRAM) continue; /* some CPUs list a DRAM zone they do not count */
                errf(err, errsz, "cannot read the RAPL energy counters (permission denied? energy_uj is "
                                 "root-only on recent kernels)");
                rapl_destroy(c);
                return MOE_EUNSUPPORTED;
            }
            c->n_zones++;
        }
    }
    if (!c->n_zones) {
        errf(err, errsz, "no RAPL package or DRAM zone");
        rapl_destroy(c);
        return MOE_EUNSUPPORTED;
    }
    out->name = "rapl";
    out->read = rapl_read;
    out->destroy = rapl_destroy;
    out->ctx = c;
    return MOE_OK;
}

/* ---- NVML (CUDA builds) ---- */

#ifdef MOE_HAVE_CUDA
/* The few NVML entry points used, declared here because the toolkit's
 * nvml.h is not always installed; their ABI has been stable since the
 * _v2 names (CUDA 10). */
typedef int nvml_ret;
typedef struct nvml_dev_st *nvml_dev;
#define NVML_MAX_DEVS 64

typedef struct nvml_ctx {
    void *lib;
    nvml_ret (*shutdown)(void);
    nvml_ret (*energy)(nvml_dev, unsigned long long *);
    nvml_dev devs[NVML_MAX_DEVS];
    unsigned n_devs;
} nvml_ctx;

static void nvml_destroy(void *ctx) {
    nvml_ctx *c = ctx;
    if (!c) return;
    if (c->shutdown) c->shutdown();
    if (c->lib) dlclose(c->lib);
    free(c);
}

static int nvml_read(void *ctx, uint64_t now_ns, bool busy, double *joules) {
    (void)now_ns;
    (void)busy;
    nvml_ctx *c = ctx;
    double sum = 0;
    for (unsigned i = 0; i < c->n_devs; i++) {
        unsigned long long mj; /* since the driver was loaded; 64-bit, does not wrap in practice */
        if (c->energy(c->devs[i], &mj)) return MOE_EIO;
        sum += (double)mj * 1e-3;
    }
    *joules = sum;
    return MOE_OK;
}

static int nvml_open(moe_energy_source *out, char *err, size_t errsz) {
    nvml_ctx *c = calloc(1, sizeof *c);
    if (!c) return MOE_ENOMEM;
    c->lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!c->lib) {
        errf(err, errsz, "cannot load libnvidia-ml.so.1 (no NVIDIA driver)");
        free(c);
        return MOE_EUNSUPPORTED;
    }
    nvml_ret (*init)(void) = (nvml_ret(*)(void))dlsym(c->lib, "nvmlInit_v2");
    nvml_ret (*count)(unsigned *) = (nvml_ret(*)(unsigned *))dlsym(c->lib, "nvmlDeviceGetCount_v2");
    nvml_ret (*by_index)(unsigned, nvml_dev *) = (nvml_ret(*)(unsigned, nvml_dev *))dlsym(c->lib, "nvmlDeviceGetHandleByIndex_v2");
    nvml_ret (*by_pci)(const char *, nvml_dev *) =
        (nvml_ret(*)(const char *, nvml_dev *))dlsym(c->lib, "nvmlDeviceGetHandleByPciBusId_v2");
    c->energy = (nvml_ret(*)(nvml_dev, unsigned long long *))dlsym(c->lib, "nvmlDeviceGetTotalEnergyConsumption");
    nvml_ret (*shutdown)(void) = (nvml_ret(*)(void))dlsym(c->lib, "nvmlShutdown");
    if (!init || !count || !by_index || !c->energy || !shutdown) {
        errf(err, errsz, "libnvidia-ml.so.1 lacks the NVML functions needed");
        nvml_destroy(c);
        return MOE_EUNSUPPORTED;
    }
    if (init()) {
        errf(err, errsz, "nvmlInit failed");
        nvml_destroy(c);
        return MOE_EUNSUPPORTED;
    }
    c->shutdown = shutdown;
    /* the GPU the CUDA backend runs on (its PCI bus id); all GPUs NVML
     * sees when that cannot be told */
    char bus[32];
    int dev = 0;
    if (by_pci && cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetPCIBusId(bus, (int)sizeof bus, dev) == cudaSuccess &&
        !by_pci(bus, &c->devs[0]))
        c->n_devs = 1;
    if (!c->n_devs) {
        unsigned n = 0;
        if (count(&n)) n = 0;
        for (unsigned i = 0; i < n && c->n_devs < NVML_MAX_DEVS; i++)
            if (!by_index(i, &c->devs[c->n_devs])) c->n_devs++;
    }
    unsigned long long mj;
    if (!c->n_devs || c->energy(c->devs[0], &mj)) {
        errf(err, errsz, "no GPU with a total-energy counter (Volta or newer)");
        nvml_destroy(c);
        return MOE_EUNSUPPORTED;
    }
    out->name = "nvml";
    out->read = nvml_read;
    out->destroy = nvml_destroy;
    out->ctx = c;
    return MOE_OK;
}
#endif

/* ---- opening ---- */

int moe_energy_opts_check(const moe_energy_opts *o, char *err, size_t errsz) {
    const char *s = o && o->source ? o->source : "auto";
    if (strcmp(s, "auto") && strcmp(s, "nvml") && strcmp(s, "rapl") && strcmp(s, "estimate") && strcmp(s, "off")) {
        errf(err, errsz, "energy_source: '%s' is not auto, nvml, rapl, estimate or off", s);
        return MOE_EINVAL;
    }
    if (o && (!(o->idle_watts >= 0) || !(o->busy_watts >= 0) || !isfinite(o->idle_watts) || !isfinite(o->busy_watts))) {
        errf(err, errsz, "energy_idle_watts / energy_busy_watts: must be finite and >= 0");
        return MOE_EINVAL;
    }
    return MOE_OK;
}

int moe_energy_source_open(moe_energy_source *out, const moe_energy_opts *o, char *err, size_t errsz) {
    memset(out, 0, sizeof *out);
    if (err && errsz) err[0] = 0;
    int rc = moe_energy_opts_check(o, err, errsz);
    if (rc) return rc;
    const char *s = o->source ? o->source : "auto";
    if (!strcmp(s, "off")) return MOE_OK;
    bool any = !strcmp(s, "auto");
    char why[256] = "";
    if (!strcmp(s, "nvml") || (any && o->gpu)) {
#ifdef MOE_HAVE_CUDA
        rc = nvml_open(out, why, sizeof why);
#else
        snprintf(why, sizeof why, "this moed was built without CUDA");
        rc = MOE_EUNSUPPORTED;
#endif
        if (!rc) return MOE_OK;
        if (!any) {
            errf(err, errsz, "energy_source: nvml: %s", why);
            return rc;
        }
    }
    if (!strcmp(s, "rapl") || any) {
        rc = rapl_open(out, why, sizeof why);
        if (!rc) return MOE_OK;
        if (!any) {
            errf(err, errsz, "energy_source: rapl: %s", why);
            return rc;
        }
    }
    moe_energy_source_estimate(out, o->idle_watts, o->busy_watts);
    return out->read ? MOE_OK : MOE_ENOMEM;
}

void moe_energy_source_close(moe_energy_source *s) {
    if (!s) return;
    if (s->destroy) s->destroy(s->ctx);
    memset(s, 0, sizeof *s);
}

/* ---- attribution ---- */

uint64_t moe_energy_counter_delta(uint64_t last, uint64_t now, uint64_t range) {
    if (now >= last) return now - last;
    /* wrapped: up to the range, then from 0 (a range below last is a
     * broken reading: count only what is certain) */
    return (range > last ? range - last : 0) + now;
}

double moe_energy_share(const double *work, size_t n, double joules, double seconds, double *out_j, double *out_s) {
    double w = 0;
    for (size_t i = 0; i < n; i++)
        if (work[i] > 0) w += work[i];
    if (!(w > 0)) return 0;
    for (size_t i = 0; i < n; i++) {
        if (!(work[i] > 0)) continue;
        double f = work[i] / w;
        if (out_j) out_j[i] += joules * f;
        if (out_s) out_s[i] += seconds * f;
    }
    return w;
}

typedef struct win_bucket {
    uint64_t sec; /* CLOCK_MONOTONIC second it covers */
    double joules, seconds;
    uint64_t tokens;
} win_bucket;

struct moe_energy_meter {
    moe_energy_source src;
    double last_j;
    uint64_t last_ns;
    moe_energy_totals t;
    win_bucket win[MOE_ENERGY_WINDOW_S];
};

moe_energy_meter *moe_energy_meter_new(moe_energy_source *src, int *status) {
    moe_energy_meter *m = calloc(1, sizeof *m);
    if (!m) {
        moe_energy_source_close(src);
        if (status) *status = MOE_ENOMEM;
        return NULL;
    }
    m->src = *src;
    memset(src, 0, sizeof *src);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    m->last_ns = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    int rc = m->src.read ? m->src.read(m->src.ctx, m->last_ns, false, &m->last_j) : MOE_EINVAL;
    if (rc) {
        moe_energy_meter_free(m);
        if (status) *status = rc;
        return NULL;
    }
    if (status) *status = MOE_OK;
    return m;
}

void moe_energy_meter_free(moe_energy_meter *m) {
    if (!m) return;
    moe_energy_source_close(&m->src);
    free(m);
}

const char *moe_energy_meter_source(const moe_energy_meter *m) { return m ? m->src.name : NULL; }

void moe_energy_meter_read(moe_energy_meter *m, bool busy, double *joules, double *seconds) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    double j = m->last_j;
    if (m->src.read(m->src.ctx, now, busy, &j) || !(j >= m->last_j)) j = m->last_j;
    *joules = j - m->last_j;
    *seconds = now > m->last_ns ? (double)(now - m->last_ns) * 1e-9 : 0;
    m->last_j = j;
    m->last_ns = now;
}

void moe_energy_meter_book(moe_energy_meter *m, double joules, double seconds, uint64_t tokens, uint64_t now_ns) {
    m->t.joules += joules;
    if (!tokens) {
        m->t.idle_joules += joules;
        m->t.idle_seconds += seconds;
        return;
    }
    m->t.attributed_joules += joules;
    m->t.attributed_seconds += seconds;
    m->t.attributed_tokens += tokens;
    uint64_t sec = now_ns / 1000000000ull;
    win_bucket *b = &m->win[sec % MOE_ENERGY_WINDOW_S];
    if (b->sec != sec) *b = (win_bucket){.sec = sec};
    b->joules += joules;
    b->seconds += seconds;
    b->tokens += tokens;
}

void moe_energy_meter_totals(const moe_energy_meter *m, uint64_t now_ns, moe_energy_totals *out) {
    memset(out, 0, sizeof *out);
    if (!m) return;
    *out = m->t;
    out->window_joules = out->window_seconds = 0;
    out->window_tokens = 0;
    uint64_t sec = now_ns / 1000000000ull;
    for (int i = 0; i < MOE_ENERGY_WINDOW_S; i++) {
        const win_bucket *b = &m->win[i];
        if (!b->tokens || b->sec + MOE_ENERGY_WINDOW_S <= sec || b->sec > sec) continue;
        out->window_joules += b->joules;
        out->window_seconds += b->seconds;
        out->window_tokens += b->tokens;
    }
}
