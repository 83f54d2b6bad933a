/* utf8.c - UTF-8 validation, decoding and U+FFFD substitution; see utf8.h. */
#include "utf8.h"

#include <stdlib.h>
#include <string.h>

int moe_utf8_next(const unsigned char *p, size_t n) {
    unsigned c = p[0];
    if (c < 0x80) return 1;
    int need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c == 0xE0) need = 2, lo = 0xA0;
    else if (c >= 0xE1 && c <= 0xEC) need = 2;
    else if (c == 0xED) need = 2, hi = 0x9F;
    else if (c >= 0xEE && c <= 0xEF) need = 2;
    else if (c == 0xF0) need = 3, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3) need = 3;
    else if (c == 0xF4) need = 3, hi = 0x8F;
    else return -1;
    for (int i = 1; i <= need; i++) {
        if ((size_t)i >= n) return 0;
        unsigned d = p[i];
        if (d < lo || d > hi) return -i;
        lo = 0x80, hi = 0xBF;
    }
    return need + 1;
}

int moe_utf8_decode(const unsigned char *p, size_t n, uint32_t *cp) {
    int k = moe_utf8_next(p, n);
    if (k <= 0) return -1;
    uint32_t c = p[0];
    if (k == 1) *cp = c;
    else if (k == 2) *cp = ((c & 31) << 6) | (p[1] & 63);
    else if (k == 3) *cp = ((c & 15) << 12) | ((uint32_t)(p[1] & 63) << 6) | (p[2] & 63);
    else *cp = ((c & 7) << 18) | ((uint32_t)(p[1] & 63) << 12) | ((uint32_t)(p[2] & 63) << 6) | (p[3] & 63);
    return k;
}

int moe_utf8_encode(uint32_t cp, char *o) {
    if (cp < 0x80) return o[0] = (char)cp, 1;
    if (cp < 0x800) return o[0] = (char)(0xC0 | (cp >> 6)), o[1] = (char)(0x80 | (cp & 63)), 2;
    if (cp < 0x10000)
        return o[0] = (char)(0xE0 | (cp >> 12)), o[1] = (char)(0x80 | ((cp >> 6) & 63)),
               o[2] = (char)(0x80 | (cp & 63)), 3;
    o[0] = (char)(0xF0 | (cp >> 18)), o[1] = (char)(0x80 | ((cp >> 12) & 63));
    o[2] = (char)(0x80 | ((cp >> 6) & 63)), o[3] = (char)(0x80 | (cp & 63));
    return 4;
}

size_t moe_utf8_sanitize(const unsigned char *src, size_t n, bool final, bool per_byte, char *dst, size_t *dlen) {
    size_t i = 0, o = *dlen;
    while (i < n) {
        int k = moe_utf8_next(src + i, n - i);
        if (k > 0) {
            memcpy(dst + o, src + i, (size_t)k);
            o += (size_t)k, i += (size_t)k;
        } else if (k == 0 && !final) {
            break;
        } else {
            size_t bad = k == 0 ? n - i : (size_t)-k;
            for (size_t r = per_byte ? bad : 1; r > 0; r--, o += 3) memcpy(dst + o, "\xEF\xBF\xBD", 3);
            i += bad;
        }
    }
    *dlen = o;
    return i;
}

char *moe_utf8_clean(const char *s, size_t n) {
    char *out = malloc(n * 3 + 1); /* every bad byte may become 3 bytes */
    if (!out) return NULL;
    size_t k = 0;
    moe_utf8_sanitize((const unsigned char *)s, n, true, false, out, &k);
    out[k] = 0;
    return out;
}
