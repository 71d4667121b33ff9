/* Column values to JSON: the fast cases of the converters, byte for byte what orjson writes of their results.
 * Python twin: listener/types.py (the converters; orjson.dumps of what they return).
 */
#include "hotpath.h"

PyObject *json_dumps = NULL; /* orjson.dumps, set by set_encoder() */

int buf_grow(Buf *b, Py_ssize_t extra) {
    Py_ssize_t want = b->len + extra;
    if (want <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap * 2;
    if (cap < want)
        cap = want + 256;
    char *data = PyMem_Realloc(b->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

/* JSON string escaping as orjson does it: \" \\ \b \t \n \f \r, other controls as \u00xx. */
static unsigned char escape_kind[256];

void init_escapes(void) {
    for (int c = 0; c < 0x20; c++)
        escape_kind[c] = 'u';
    escape_kind['"'] = '"';
    escape_kind['\\'] = '\\';
    escape_kind['\b'] = 'b';
    escape_kind['\t'] = 't';
    escape_kind['\n'] = 'n';
    escape_kind['\f'] = 'f';
    escape_kind['\r'] = 'r';
}

/* Nonzero when one of the 8 bytes of w needs escaping: below 0x20, '"' or '\\'. Exact about whether there is
 * one (the borrows of the subtractions can only mark bytes after a real match), so a zero word is clean. */
static inline uint64_t word_needs_escape(uint64_t w) {
    const uint64_t ones = 0x0101010101010101ULL, high = 0x8080808080808080ULL;
    uint64_t quote = w ^ (ones * '"'), backslash = w ^ (ones * '\\');
    return (((w - ones * 0x20) & ~w) | ((quote - ones) & ~quote) | ((backslash - ones) & ~backslash)) & high;
}

#if defined(__SSE2__)
#include <emmintrin.h>
/* Which of the 16 bytes at p need escaping: bit k set for byte k (x86-64 always has SSE2). */
static inline int block_needs_escape(const unsigned char *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m128i control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v); /* v <= 0x1f, unsigned */
    __m128i quote = _mm_cmpeq_epi8(v, _mm_set1_epi8('"'));
    __m128i backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8('\\'));
    return _mm_movemask_epi8(_mm_or_si128(control, _mm_or_si128(quote, backslash)));
}
#endif

/* The escape of one byte at out (\" \\ \b \t \n \f \r, or \u00xx for other controls): its length, 6 at most. */
static inline Py_ssize_t write_escape(char *out, unsigned char c) {
    static const char hex[] = "0123456789abcdef";
    unsigned char kind = escape_kind[c];
    out[0] = '\\';
    if (kind != 'u') {
        out[1] = (char)kind;
        return 2;
    }
    memcpy(out + 1, "u00", 3);
    out[4] = hex[c >> 4];
    out[5] = hex[c & 15];
    return 6;
}

/* s[start..at) as it is, then s[at] escaped. The room checked is for the rest of s as it is too, and the
 * closing quote: what put_escaped reserved at first stays true after every escape. A short run is copied as
 * 16 bytes (those past it are overwritten next), with 16 more bytes of room for that. */
static inline int put_run_and_escape(Buf *b, const unsigned char *s, Py_ssize_t start, Py_ssize_t at,
                                     Py_ssize_t n) {
    if (buf_grow(b, (n - start) + 6 + 16) < 0)
        return -1;
    char *out = b->data + b->len;
#if defined(__SSE2__)
    if (at - start <= 16 && start + 16 <= n)
        _mm_storeu_si128((__m128i *)out, _mm_loadu_si128((const __m128i *)(s + start)));
    else
#endif
        memcpy(out, s + start, (size_t)(at - start));
    out += at - start;
    out += write_escape(out, s[at]);
    b->len = out - b->data;
    return 0;
}

int put_escaped(Buf *b, const unsigned char *s, Py_ssize_t n) {
    /* room for the text as it is and a closing quote; each escape makes room for its own few more bytes
     * (reserving the worst case, 6 bytes a byte, made every 4 KB value grow the buffer to 24 KB) */
    if (buf_grow(b, n + 1) < 0)
        return -1;
    Py_ssize_t start = 0, i = 0; /* s[start..] is not written yet; s[..i) is scanned */
#if defined(__SSE2__)
    /* 16 bytes at a time: the mask of those to escape, each found by its bit (a JSON document as a string,
     * Debezium's json columns: a quote every few bytes) */
    for (;;) {
        unsigned mask = 0;
        while (i + 16 <= n && (mask = (unsigned)block_needs_escape(s + i)) == 0) /* clean text: kilobytes */
            i += 16;
        if (mask == 0)
            break;
        do {
            Py_ssize_t at = i + __builtin_ctz(mask);
            if (put_run_and_escape(b, s, start, at, n) < 0)
                return -1;
            start = at + 1;
            mask &= mask - 1;
        } while (mask);
        i += 16;
    }
#endif
    /* the rest (all of it without SSE2): clean words skipped 8 bytes at a time, the others byte by byte */
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t word;
            memcpy(&word, s + i, 8);
            if (!word_needs_escape(word)) {
                i += 8;
                continue;
            }
        }
        for (Py_ssize_t stop = i + 8 <= n ? i + 8 : n; i < stop; i++) {
            if (escape_kind[s[i]] == 0)
                continue;
            if (put_run_and_escape(b, s, start, i, n) < 0)
                return -1;
            start = i + 1;
        }
    }
    memcpy(b->data + b->len, s + start, (size_t)(n - start));
    b->len += n - start;
    return 0;
}

int put_string(Buf *b, const unsigned char *s, Py_ssize_t n) {
    if (PUTS(b, "\"") < 0 || put_escaped(b, s, n) < 0 || PUTS(b, "\"") < 0)
        return -1;
    return 0;
}

/* The integer text PostgreSQL sends, which int() would read back unchanged: -?(0|[1-9][0-9]*), not -0. */
static int plain_int(const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    if (n > 0 && s[0] == '-')
        i = 1;
    if (i >= n || n - i > 19)
        return 0;
    if (s[i] == '0' && (n - i > 1 || i == 1))
        return 0;
    for (; i < n; i++)
        if (!is_digit(s[i]))
            return 0;
    return 1;
}

/* The converter's result, JSON-encoded by orjson: for types written only by Python code. */
static int put_converted(Buf *b, PyObject *conv, const Col *c) {
    if (conv == Py_None || json_dumps == NULL)
        return FALLBACK;
    PyObject *text = PyUnicode_DecodeUTF8((const char *)c->p, c->len, "strict");
    if (text == NULL) {
        PyErr_Clear();
        return FALLBACK;
    }
    PyObject *value = PyObject_CallOneArg(conv, text);
    Py_DECREF(text);
    if (value == NULL) {
        PyErr_Clear(); /* the Python path reports it (metric + warning) */
        return FALLBACK;
    }
    PyObject *encoded = PyObject_CallOneArg(json_dumps, value);
    Py_DECREF(value);
    if (encoded == NULL) {
        PyErr_Clear();
        return FALLBACK;
    }
    int rc = put(b, PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded));
    Py_DECREF(encoded);
    return rc;
}

/* {a,b,NULL}: one dimension, nothing quoted or escaped (the Python converter's own fast case). */
static int put_simple_array(Buf *b, const Col *c, int numbers) {
    const unsigned char *s = c->p;
    Py_ssize_t n = c->len;
    if (n < 2 || s[0] != '{' || s[n - 1] != '}')
        return FALLBACK;
    for (Py_ssize_t i = 1; i < n - 1; i++) {
        unsigned char ch = s[i];
        if (ch == '"' || ch == '\\' || ch == '{' || ch == '}')
            return FALLBACK;
    }
    Py_ssize_t mark = b->len;
    if (PUTS(b, "[") < 0)
        return -1;
    if (n > 2) {
        Py_ssize_t start = 1;
        for (Py_ssize_t i = 1; i <= n - 1; i++) {
            if (i < n - 1 && s[i] != ',')
                continue;
            const unsigned char *part = s + start;
            Py_ssize_t len = i - start;
            if (start > 1 && PUTS(b, ",") < 0)
                return -1;
            if (len == 4 && memcmp(part, "NULL", 4) == 0) {
                if (PUTS(b, "null") < 0)
                    return -1;
            } else if (numbers) {
                if (!plain_int(part, len)) {
                    b->len = mark;
                    return FALLBACK;
                }
                if (put(b, (const char *)part, len) < 0)
                    return -1;
            } else if (put_string(b, part, len) < 0) {
                return -1;
            }
            start = i + 1;
        }
    }
    return PUTS(b, "]");
}

/* A timestamp's text as a JSON string, its first space (between date and time) made a 'T'. */
static int put_iso_string(Buf *b, const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t mark = b->len;
    if (put_string(b, s, n) < 0)
        return -1;
    char *space = memchr(b->data + mark + 1, ' ', (size_t)(b->len - mark - 2));
    if (space != NULL)
        *space = 'T';
    return 0;
}

int put_value(Buf *b, long code, PyObject *conv, const Col *c, const Plan *plan) {
    const unsigned char *s = c->p;
    Py_ssize_t n = c->len;
    switch (code) {
    case CODE_TEXT:
        return put_string(b, s, n);
    case CODE_INT:
        if (plain_int(s, n))
            return put(b, (const char *)s, n);
        return put_converted(b, conv, c);
    case CODE_BOOL:
        if (n == 1 && s[0] == 't')
            return PUTS(b, "true");
        return PUTS(b, "false");
    case CODE_JSON:
        return put(b, (const char *)s, n);
    case CODE_TIMESTAMPTZ:
        if (n > 3 && is_digit(s[0]) && memcmp(s + n - 3, "+00", 3) == 0) {
            if (put_iso_string(b, s, n - 3) < 0)
                return -1;
            b->len -= 1; /* reopen the string for the zone */
            return PUTS(b, "Z\"");
        }
        return put_converted(b, conv, c);
    case CODE_TIMESTAMP:
        if (n > 0 && s[0] < 0x80 && !is_digit(s[0]))
            return put_string(b, s, n); /* infinity, -infinity: as sent */
        if (n > 0 && is_digit(s[0])) {
            if (n >= 3 && memcmp(s + n - 3, " BC", 3) == 0)
                return put_string(b, s, n);
            return put_iso_string(b, s, n);
        }
        return put_converted(b, conv, c);
    case CODE_ARRAY_TEXT:
    case CODE_ARRAY_INT: {
        int rc = put_simple_array(b, c, code == CODE_ARRAY_INT);
        if (rc == FALLBACK)
            return put_converted(b, conv, c);
        return rc;
    }
    case CODE_HASH: {
        char hex[64];
        hmac_hex(&plan->hmac, s, (size_t)n, hex);
        if (PUTS(b, "\"") < 0 || put(b, hex, 64) < 0)
            return -1;
        return PUTS(b, "\"");
    }
    case CODE_REDACT:
        return PUTS(b, "\"[redacted]\"");
    case CODE_NULLED:
        return PUTS(b, "null");
    default:
        return put_converted(b, conv, c);
    }
}

int put_ascii_field(Buf *b, PyObject *text) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(text, &n);
    if (s == NULL)
        return -1;
    return put_escaped(b, (const unsigned char *)s, n);
}

PyObject *hot_set_encoder(PyObject *self, PyObject *dumps) {
    (void)self;
    if (!PyCallable_Check(dumps)) {
        PyErr_SetString(PyExc_TypeError, "set_encoder: a callable returning bytes");
        return NULL;
    }
    Py_XSETREF(json_dumps, Py_NewRef(dumps));
    Py_RETURN_NONE;
}
