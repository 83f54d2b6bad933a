/* cuda_gate.h - whether the CUDA Check suites run, skip or fail.
 *
 * "No GPU here" is a skip; "a GPU is here but CUDA cannot use it" (a
 * driver too old for the runtime, error 35, or any other error) is a
 * failure that names the CUDA error - it must not read as "no device".
 * A GPU is visible when CUDA_VISIBLE_DEVICES is set non-empty, or
 * /dev/nvidia0 exists, or `nvidia-smi -L` lists one. cudaErrorNoDevice
 * is a skip even then (CUDA_VISIBLE_DEVICES=-1 hides GPUs on purpose);
 * the skip says what was visible.
 *
 * The decision (cuda_gate_decide, cuda_gate_visible) is pure, so
 * check_cuda_ops tests it on machines without a GPU; cuda_gate_probe
 * gathers its inputs.
 */
#ifndef MOE_TEST_CUDA_GATE_H
#define MOE_TEST_CUDA_GATE_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

typedef enum { CUDA_GATE_RUN, CUDA_GATE_SKIP, CUDA_GATE_FAIL } cuda_gate_verdict;

/* Whether a GPU is visible by means other than CUDA: cvd is
 * CUDA_VISIBLE_DEVICES (NULL when unset), dev_node whether /dev/nvidia0
 * exists, smi_gpus the GPUs `nvidia-smi -L` listed. */
static inline int cuda_gate_visible(const char *cvd, int dev_node, int smi_gpus) {
    return (cvd && *cvd) || dev_node || smi_gpus > 0;
}

/* cuda_err/n_dev/no_device: cuda_device_probe()'s answer; visible: as above. */
static inline cuda_gate_verdict cuda_gate_decide(int cuda_err, int n_dev, int no_device, int visible) {
    if (cuda_err == 0 && n_dev > 0) return CUDA_GATE_RUN;
    if (no_device) return CUDA_GATE_SKIP;
    return visible ? CUDA_GATE_FAIL : CUDA_GATE_SKIP;
}

#ifdef MOE_HAVE_CUDA
#include "cuda_backend.h"

typedef struct cuda_gate {
    cuda_gate_verdict verdict;
    char why[512]; /* the CUDA answer and what was visible, for the SKIP/FAIL line */
} cuda_gate;

/* Asks CUDA in a child process (the parent must not initialise CUDA
 * before Check forks its tests: they would inherit a context they cannot
 * use) and looks for a visible GPU. */
static inline cuda_gate cuda_gate_probe(void) {
    cuda_gate g = {CUDA_GATE_SKIP, ""};
    int fd[2], err = -1, n = 0, nodev = 0;
    char msg[256] = "the probe process gave no answer";
    if (pipe(fd) == 0) {
        pid_t pid = fork();
        if (pid == 0) {
            const char *m;
            int e = cuda_device_probe(&n, &nodev, &m);
            dprintf(fd[1], "%d %d %d %.200s", e, n, nodev, m);
            _exit(0);
        }
        close(fd[1]);
        char buf[300] = "";
        ssize_t got = 0, r;
        while (got < (ssize_t)sizeof buf - 1 && (r = read(fd[0], buf + got, sizeof buf - 1 - (size_t)got)) > 0)
            got += r;
        close(fd[0]);
        if (pid > 0) waitpid(pid, NULL, 0);
        int off = 0;
        if (sscanf(buf, "%d %d %d %n", &err, &n, &nodev, &off) == 3) snprintf(msg, sizeof msg, "%s", buf + off);
    }
    const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
    int node = access("/dev/nvidia0", F_OK) == 0, smi = 0;
    FILE *p = popen("timeout 20 nvidia-smi -L 2>/dev/null", "r");
    if (p) {
        char line[256];
        while (fgets(line, sizeof line, p))
            smi += strncmp(line, "GPU ", 4) == 0;
        pclose(p);
    }
    int visible = cuda_gate_visible(cvd, node, smi);
    /* a probe that gave no answer (err -1) is an error like any other */
    g.verdict = cuda_gate_decide(err, n, err == -1 ? 0 : nodev, visible);
    snprintf(g.why, sizeof g.why,
             "cudaGetDeviceCount: %s (error %d, %d devices); visible: CUDA_VISIBLE_DEVICES=%s%s%s, "
             "/dev/nvidia0 %s, nvidia-smi lists %d",
             msg, err, n, cvd ? "'" : "", cvd ? cvd : "unset", cvd ? "'" : "", node ? "exists" : "absent", smi);
    return g;
}
#endif
#endif
