/* sse_events.h - named SSE events from JSON objects, as the Anthropic
 * Messages and OpenAI Responses streams send them:
 *
 *   event: <the object's "type">\n
 *   data: <the object, one line>\n\n
 *
 * Pure functions of their input; any thread.
 */
#ifndef SRV_SSE_EVENTS_H
#define SRV_SSE_EVENTS_H

#include <stddef.h>
#include <stdint.h>

#include <cJSON.h>

/* A new object {"type": type}; NULL when out of memory. Caller owns it. */
cJSON *srv_sse_typed(const char *type);

/* The SSE text of objs[0..n), each named by its "type" string. Takes
 * ownership of every object (NULL ones too: the result is then NULL).
 * When seq is not NULL each object first gets "sequence_number" = *seq,
 * *seq + 1, ..., and *seq moves past them. Returns a malloc'd string
 * (caller frees), or NULL when out of memory. */
char *srv_sse_events(cJSON **objs, size_t n, int64_t *seq);

#endif
