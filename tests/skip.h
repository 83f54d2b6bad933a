/* skip.h - what a Check suite did not test, said out loud and counted.
 *
 * Check has no "skipped" result: a test that returns early passes. So a
 * suite that leaves something untested (no GPU, a CPU without an ISA)
 * calls test_skip(), which prints "SKIP: <suite>: <reason>" on stdout and,
 * when MOE_SKIP_LOG names a file, appends "<suite>: <reason>" to it.
 * `make check` and `make pytest` end with the total of that file.
 *
 * One write() of one line on an O_APPEND descriptor: Check's forked test
 * processes may call it at the same time as the parent.
 */
#ifndef MOE_TEST_SKIP_H
#define MOE_TEST_SKIP_H

#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((format(printf, 2, 3))) static inline void test_skip(const char *suite, const char *fmt, ...) {
    char reason[400], line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof reason, fmt, ap);
    va_end(ap);
    int n = snprintf(line, sizeof line, "%s: %s\n", suite, reason);
    if (n < 0) return;
    if ((size_t)n >= sizeof line) n = (int)sizeof line - 1, line[n - 1] = '\n';
    printf("SKIP: %s", line);
    fflush(stdout);
    const char *path = getenv("MOE_SKIP_LOG");
    if (!path || !*path) return;
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
        fprintf(stderr, "%s: MOE_SKIP_LOG %s cannot be opened; this skip is not counted\n", suite, path);
        return;
    }
    if (write(fd, line, (size_t)n) != n) fprintf(stderr, "%s: short write to MOE_SKIP_LOG %s\n", suite, path);
    close(fd);
}

#endif
