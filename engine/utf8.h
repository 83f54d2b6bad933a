/* utf8.h - the one UTF-8 reader and sanitizer of moed.
 *
 * Validity is Unicode's (RFC 3629): no overlong forms, no surrogates,
 * nothing above U+10FFFF. Ill-formed input becomes U+FFFD one per
 * maximal subpart (Unicode 3.9, "U+FFFD substitution of maximal
 * subparts", what Python's bytes.decode('utf-8', 'replace') does), or one
 * per byte where a byte-fallback decoder prints that.
 *
 * Users: the tokenizer (input cleaning, streaming detokenization), the
 * chat code, server/openai.c (error messages, token texts) and the log
 * escaper. Any thread; nothing here keeps state.
 */
#ifndef MOE_UTF8_H
#define MOE_UTF8_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The length of the well-formed character at p[0..n) (1..4); 0 when p
 * holds a proper prefix of one that ends at n; or -k when the first k
 * bytes are a maximal ill-formed subpart. n > 0. */
int moe_utf8_next(const unsigned char *p, size_t n);

/* The code point of the well-formed character at p[0..n) in *cp and its
 * length (1..4), or -1 (ill-formed or cut off; *cp untouched). n > 0. */
int moe_utf8_decode(const unsigned char *p, size_t n, uint32_t *cp);

/* Writes cp (<= U+10FFFF) to o (4 bytes of room); returns its length. */
int moe_utf8_encode(uint32_t cp, char *o);

/* Appends src[0..n) to dst at *dlen with ill-formed subparts (and, when
 * `final`, a dangling prefix) replaced by U+FFFD - one per maximal
 * subpart, or one per byte when per_byte (sentencepiece's and HF's
 * byte-fallback decoders); advances *dlen. Returns the bytes consumed
 * from src: less than n only when !final and src ends inside a
 * character. dst must have 3 * n bytes of room past *dlen. */
size_t moe_utf8_sanitize(const unsigned char *src, size_t n, bool final, bool per_byte, char *dst, size_t *dlen);

/* A malloc'd, NUL-terminated copy of s[0..n) sanitized as above (final,
 * one U+FFFD per subpart); NULL when out of memory. Caller frees. */
char *moe_utf8_clean(const char *s, size_t n);

#ifdef __cplusplus
}
#endif
#endif
