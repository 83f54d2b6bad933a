/* sse_events.c - named SSE events from JSON objects (see sse_events.h). */
#include "sse_events.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

cJSON *srv_sse_typed(const char *type) {
    cJSON *o = cJSON_CreateObject();
    if (o && !cJSON_AddStringToObject(o, "type", type)) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

char *srv_sse_events(cJSON **objs, size_t n, int64_t *seq) {
    size_t cap = 1, len = 0;
    char **parts = calloc(n ? n : 1, sizeof *parts);
    const char **names = calloc(n ? n : 1, sizeof *names);
    char *out = NULL;
    bool ok = parts && names;
    for (size_t i = 0; ok && i < n; i++) {
        const cJSON *t = objs[i] ? cJSON_GetObjectItemCaseSensitive(objs[i], "type") : NULL;
        if (!cJSON_IsString(t) || (seq && !cJSON_AddNumberToObject(objs[i], "sequence_number", (double)(*seq + (int64_t)i))) ||
            !(parts[i] = cJSON_PrintUnformatted(objs[i]))) {
            ok = false;
            break;
        }
        names[i] = t->valuestring;
        cap += strlen(parts[i]) + strlen(names[i]) + 16;
    }
    if (ok && (out = malloc(cap))) {
        for (size_t i = 0; i < n; i++) len += (size_t)snprintf(out + len, cap - len, "event: %s\ndata: %s\n\n", names[i], parts[i]);
        if (seq) *seq += (int64_t)n;
    }
    for (size_t i = 0; i < n; i++) {
        if (parts) free(parts[i]);
        cJSON_Delete(objs[i]);
    }
    free(parts);
    free(names);
    return out;
}
