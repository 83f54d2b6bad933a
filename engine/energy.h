/* energy.h - what the machine's energy counter says a step cost, and who
 * in the step it is charged to.
 *
 * Sources (moe_energy_source_open, "auto" tries them in this order):
 *   nvml      the GPU's total-energy counter (nvmlDeviceGetTotalEnergyConsumption,
 *             summed over the GPUs NVML sees), CUDA builds with the CUDA
 *             backend only; libnvidia-ml.so.1 is dlopen'ed, so a CUDA build
 *             runs on a host without the driver and falls through;
 *   rapl      RAPL package + DRAM energy of every CPU package through the
 *             Linux powercap interface (libpowercap); a counter that wraps
 *             is unwrapped with its max_energy_range_uj;
 *   estimate  no counter: busy_watts while the engine works, idle_watts
 *             while it waits; the figures are a model, not a measurement.
 * Counters are whole-device (or whole-package) readings: whatever else
 * runs on the device is in them too.
 *
 * Attribution (moe_energy_meter): the engine reads the source at the end of
 * every step (after sampling, before the step's events go out) and once
 * before and after each idle wait. The energy and wall time since the
 * previous read are charged:
 *   - at a step's end: to the requests in that step, in proportion to the
 *     tokens each computed in it (prompt, recompute after preemption and
 *     decode tokens alike: one forward pass runs every token through the
 *     same weight reads and matmuls, so a token is a token; prefix-cache
 *     hits computed nothing and cost nothing). The interval includes the
 *     intake and event delivery since the previous step: serving work.
 *   - otherwise (idle waits, a failed forward pass): to nobody; it is
 *     counted as idle.
 * So over any run: attributed + idle = everything the source measured,
 * and the per-request shares sum to the attributed total.
 *
 * Threads: a source and a meter belong to one thread (the engine thread);
 * moe_energy_share is pure.
 */
#ifndef MOE_ENERGY_H
#define MOE_ENERGY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A cumulative energy counter. read() returns the joules since an
 * arbitrary origin (monotonic: wrap-around is the source's job); `busy`
 * says whether the interval since the previous read was engine work (only
 * the estimate uses it). read returns 0 or a negative moe_status. */
typedef struct moe_energy_source {
    const char *name; /* "nvml", "rapl", "estimate", or a test's own; static storage */
    int (*read)(void *ctx, uint64_t now_ns, bool busy, double *joules);
    void (*destroy)(void *ctx); /* may be NULL */
    void *ctx;
} moe_energy_source;

typedef struct moe_energy_opts {
    const char *source; /* "auto" (or NULL), "nvml", "rapl", "estimate", "off" */
    double idle_watts;  /* estimate: power while the engine waits; >= 0 */
    double busy_watts;  /* estimate: power while it runs a step; >= 0 */
    bool gpu;           /* the engine runs on the CUDA backend: nvml is tried (first) */
} moe_energy_opts;

/* Checks o->source's spelling without opening anything. 0 or MOE_EINVAL
 * with err naming "energy_source". */
int moe_energy_opts_check(const moe_energy_opts *o, char *err, size_t errsz);

/* Opens the source o names into *out. "auto" falls through nvml (with
 * o->gpu), rapl, estimate and never fails; a named source that cannot be
 * read fails with MOE_EUNSUPPORTED and the reason in err ("energy_source:
 * rapl: ..."). "off" returns MOE_OK with out->read == NULL. Close with
 * moe_energy_source_close. */
int moe_energy_source_open(moe_energy_source *out, const moe_energy_opts *o, char *err, size_t errsz);
void moe_energy_source_close(moe_energy_source *s); /* zeroes *s; NULL or closed is a no-op */

/* The estimate source on its own (tests, `moed bench`). */
void moe_energy_source_estimate(moe_energy_source *out, double idle_watts, double busy_watts);

/* The increase of a counter that wraps to 0 after range - 1 (RAPL's
 * max_energy_range_uj) from `last` to `now`: a smaller reading is taken
 * as one wrap. */
uint64_t moe_energy_counter_delta(uint64_t last, uint64_t now, uint64_t range);

/* Adds to out_j[i] / out_s[i] request i's share of a step's joules and
 * seconds: joules * work[i] / sum(work). Returns the sum of the work (0:
 * nothing was added; the caller counts the step as unattributed). */
double moe_energy_share(const double *work, size_t n, double joules, double seconds, double *out_j, double *out_s);

#define MOE_ENERGY_WINDOW_S 60 /* the window of moe_energy_window */

/* Totals since the meter started. */
typedef struct moe_energy_totals {
    double joules;            /* everything the source measured since the first read */
    double idle_joules;       /* not attributed: idle waits, failed steps */
    double attributed_joules; /* charged to requests */
    double attributed_seconds;/* step wall time charged to requests */
    double idle_seconds;
    uint64_t attributed_tokens;
    /* the last MOE_ENERGY_WINDOW_S seconds (whole seconds) of attributed steps */
    double window_joules, window_seconds;
    uint64_t window_tokens;
} moe_energy_totals;

typedef struct moe_energy_meter moe_energy_meter;

/* A meter over src (it takes ownership: closed by moe_energy_meter_free).
 * Takes the first reading now. NULL on ENOMEM or a failed first read
 * (status in *status; src is then closed). */
moe_energy_meter *moe_energy_meter_new(moe_energy_source *src, int *status);
void moe_energy_meter_free(moe_energy_meter *m); /* NULL is a no-op */
const char *moe_energy_meter_source(const moe_energy_meter *m);

/* Reads the source and returns in *joules / *seconds what passed since the
 * previous read; a counter that reads lower than before (a reset) or fails
 * counts as 0 J. busy: the interval was engine work (see the source). The
 * delta is not booked anywhere yet: pass it to moe_energy_meter_book. */
void moe_energy_meter_read(moe_energy_meter *m, bool busy, double *joules, double *seconds);

/* Books a delta from moe_energy_meter_read: `tokens` > 0 books it as
 * attributed (the caller has shared it out with moe_energy_share), 0 as
 * idle. now_ns places it in the window. */
void moe_energy_meter_book(moe_energy_meter *m, double joules, double seconds, uint64_t tokens, uint64_t now_ns);

/* The totals, with the window as of now_ns. */
void moe_energy_meter_totals(const moe_energy_meter *m, uint64_t now_ns, moe_energy_totals *out);

#ifdef __cplusplus
}
#endif
#endif
