/* array.h - the growable-array step shared by the engine's lists.
 *
 * Two growth rules, because there are two kinds of array:
 *   - lists appended to one element at a time (bound tensors, a sequence's
 *     KV blocks) grow by doubling, so n appends cost O(n) copies;
 *   - scratch sized by the largest step so far grows to exactly what that
 *     step needs, never more (a decode step must not allocate, and doubling
 *     would hold up to twice the largest step's memory for nothing).
 * Sizes are int64_t like every count of the engine; the byte size is
 * overflow-checked. Any thread (the array is the caller's).
 */
#ifndef MOE_ARRAY_H
#define MOE_ARRAY_H

#include <stddef.h>
#include <stdint.h>

/* Makes *p (elements of `elem` bytes, room for *cap) hold at least `need`:
 * doubles *cap, starting from `min`, until it does. Returns MOE_OK, or
 * MOE_ENOMEM with *p and *cap unchanged. */
int moe_array_grow(void **p, int64_t *cap, int64_t need, int64_t min, size_t elem);

/* The same, but grows to exactly `need` (scratch). */
int moe_array_fit(void **p, int64_t *cap, int64_t need, size_t elem);

#endif
