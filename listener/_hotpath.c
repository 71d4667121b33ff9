/* Stages 3-6 in one pass, compiled: a pgoutput Insert/Update/Delete message -> the event's JSON body.
 *
 * The optional fast path of listener.event.EventBuilder (see listener/hotpath.py for the Python side
 * and the plan it builds per relation). It decodes the tuple(s) of one change message, converts the
 * common column types straight from their text form into JSON, and writes the whole event body,
 * byte for byte what the pure-Python path (pgoutput.decode -> EventBuilder.row -> orjson.dumps)
 * produces. Whatever it does not handle itself -- a binary column, text that is not valid UTF-8, a
 * value a Python converter refuses, a short tuple, a malformed message -- makes it return None,
 * and the caller takes the Python path, which also owns every error message and metric.
 *
 * event(msg, plan, prefix, number, commit_time, want_key) -> (ident: str, body: bytes, key: bytes | None) | None
 *   the event id is prefix + number as 12 hex digits (the transaction's shared part and the change's
 *   bits, see listener.event.event_id_parts); with number None it is prefix as given
 *
 * read_row(values, plan, ident, read_time, want_key) takes a backfilled row (each column's text form as
 * bytes, as an Insert would carry it) and writes the same body with action READ.
 *
 * It also serves the NATS publisher's hot loop (listener/publishers/nats.py), checked against nats-py:
 * nats_frames(batch, prefixes, seq, limit, header_bytes) -> (frames, payload) | None builds the HPUB
 * frames of a batch (Nats-Msg-Id header, reply subject per message), and nats_acks(data, sid) scans
 * JetStream's answers on the reply subscription (acks by sequence, errors with their payload).
 *
 * And the replication reader's: copy_batch(pgconn_ptr, limit, starts, max_bytes) takes up to limit buffered
 * CopyData messages (and about max_bytes of payloads) off libpq at once (PQgetCopyData through the connection pointer psycopg exposes,
 * with the function pointers of the libpq psycopg loaded, given once by set_libpq).
 *
 * plan = (schema_table: bytes, columns: tuple, key_index: tuple[int, ...], transform: None | (hmac, route))
 *   schema_table: '"schema":"...","table":"..."' already JSON-encoded
 *   columns: one (prefix: bytes, code: int, converter, is_identity: bool) per column, where prefix
 *   is '"name":' JSON-encoded and code says how the value is written (the CODE_* values below).
 *   A table's transform (listener/transforms.py) shows here as the codes CODE_DROP (left out of data,
 *   dataOld and key) and CODE_HASH / CODE_REDACT / CODE_NULLED (masks, also applied to the key and the
 *   topic); transform is None for a table without one, else hmac: the HMAC-SHA256 key's prepared states
 *   (hmac_prepare; needed by CODE_HASH, else None) and route.
 *   route: None, or (head: bytes, parts: tuple[bytes | int, ...]) -- the topic template, literal text and
 *   column indices; then event() answers (ident, body, key, topic) and read_row() (body, key, topic),
 *   where topic is the rendered topic name (str) or why there is none (int, listener.transforms.FALLBACK_REASONS).
 *
 * hmac_prepare(key) -> bytes and hmac_hex(prepared, data) -> str: the hash mask on its own (tests).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum {
    CODE_TEXT = 0,       /* JSON string of the text */
    CODE_INT = 1,        /* number, as sent */
    CODE_BOOL = 2,       /* true when the text is "t" */
    CODE_JSON = 3,       /* the document, embedded as sent */
    CODE_TIMESTAMPTZ = 4, /* "...+00" -> "...Z" with a 'T'; anything else: the converter */
    CODE_TIMESTAMP = 5,  /* first space -> 'T' */
    CODE_ARRAY_TEXT = 6, /* one-dimensional, unquoted: list of strings */
    CODE_ARRAY_INT = 7,  /* one-dimensional: list of numbers */
    CODE_PYTHON = 8,     /* call the converter, encode its result with the JSON encoder */
    CODE_DROP = 9,       /* transforms: not published */
    CODE_HASH = 10,      /* transforms: HMAC-SHA256 of the text, lower-case hex */
    CODE_REDACT = 11,    /* transforms: "[redacted]" */
    CODE_NULLED = 12,    /* transforms: null */
};

/* the fallback reasons of a route (listener.transforms.FALLBACK_REASONS, counted from 1) */
enum { ROUTE_NULL = 1, ROUTE_MISSING = 2, ROUTE_EMPTY = 3, ROUTE_TOO_LONG = 4 };
#define MAX_TOPIC_BYTES 249

#define FALLBACK 1 /* not handled here: the caller takes the Python path */

static PyObject *json_dumps = NULL; /* orjson.dumps, set by set_encoder() */

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buf;

static int buf_grow(Buf *b, Py_ssize_t extra) {
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

static inline int put(Buf *b, const char *s, Py_ssize_t n) {
    if (b->len + n > b->cap && buf_grow(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

#define PUTS(b, lit) put((b), (lit), (Py_ssize_t)(sizeof(lit) - 1))

/* JSON string escaping as orjson does it: \" \\ \b \t \n \f \r, other controls as \u00xx. */
static unsigned char escape_kind[256];

static void init_escapes(void) {
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

static int put_escaped(Buf *b, const unsigned char *s, Py_ssize_t n) {
    /* worst case: every byte becomes \u00xx */
    if (buf_grow(b, n * 6 + 2) < 0)
        return -1;
    char *out = b->data + b->len;
    Py_ssize_t start = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char kind = escape_kind[s[i]];
        if (kind == 0)
            continue;
        memcpy(out, s + start, (size_t)(i - start));
        out += i - start;
        start = i + 1;
        *out++ = '\\';
        if (kind == 'u') {
            static const char hex[] = "0123456789abcdef";
            *out++ = 'u';
            *out++ = '0';
            *out++ = '0';
            *out++ = hex[s[i] >> 4];
            *out++ = hex[s[i] & 15];
        } else {
            *out++ = (char)kind;
        }
    }
    memcpy(out, s + start, (size_t)(n - start));
    out += n - start;
    b->len = out - b->data;
    return 0;
}

static int put_string(Buf *b, const unsigned char *s, Py_ssize_t n) {
    if (PUTS(b, "\"") < 0 || put_escaped(b, s, n) < 0 || PUTS(b, "\"") < 0)
        return -1;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * SHA-256 (FIPS 180-4) and HMAC (RFC 2104) for the hash mask. The key's padded blocks are compressed
 * once (hmac_prepare); a value then costs two compressions when it is shorter than 56 bytes.
 */

static const uint32_t SHA256_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static const uint32_t SHA256_IV[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                      0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

/* One 64-byte block into the state: the portable code, or the x86 SHA extensions where the CPU has them. */
static void (*sha256_block)(uint32_t h[8], const unsigned char *p);

static void sha256_block_portable(uint32_t h[8], const unsigned char *p) {
    uint32_t w[64];
    for (int t = 0; t < 16; t++)
        w[t] = ((uint32_t)p[4 * t] << 24) | ((uint32_t)p[4 * t + 1] << 16) | ((uint32_t)p[4 * t + 2] << 8) |
               (uint32_t)p[4 * t + 3];
    for (int t = 16; t < 64; t++) {
        uint32_t s0 = ROTR(w[t - 15], 7) ^ ROTR(w[t - 15], 18) ^ (w[t - 15] >> 3);
        uint32_t s1 = ROTR(w[t - 2], 17) ^ ROTR(w[t - 2], 19) ^ (w[t - 2] >> 10);
        w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int t = 0; t < 64; t++) {
        uint32_t t1 = k + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + SHA256_K[t] + w[t];
        uint32_t t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += k;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>

/* The same block with the SHA-NI instructions: the state kept as {A,B,E,F} and {C,D,G,H}, two rounds per
 * sha256rnds2, the message schedule four words at a time (sha256msg1/msg2). */
__attribute__((target("sha,sse4.1,ssse3"))) static void sha256_block_shani(uint32_t h[8], const unsigned char *p) {
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL); /* big-endian words */
    __m128i abcd = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)h), 0xB1);     /* B A D C */
    __m128i efgh = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)(h + 4)), 0x1B); /* H G F E */
    __m128i abef = _mm_alignr_epi8(abcd, efgh, 8);                                     /* F E B A */
    __m128i cdgh = _mm_blend_epi16(efgh, abcd, 0xF0);                                  /* H G D C */
    __m128i abef_in = abef, cdgh_in = cdgh, w[4];
    for (int g = 0; g < 16; g++) {
        __m128i words;
        if (g < 4) {
            words = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * g)), swap);
        } else {
            __m128i t = _mm_sha256msg1_epu32(w[g & 3], w[(g - 3) & 3]);
            t = _mm_add_epi32(t, _mm_alignr_epi8(w[(g - 1) & 3], w[(g - 2) & 3], 4));
            words = _mm_sha256msg2_epu32(t, w[(g - 1) & 3]);
        }
        w[g & 3] = words;
        __m128i k = _mm_add_epi32(words, _mm_loadu_si128((const __m128i *)&SHA256_K[4 * g]));
        cdgh = _mm_sha256rnds2_epu32(cdgh, abef, k);
        abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(k, 0x0E));
    }
    abef = _mm_add_epi32(abef, abef_in);
    cdgh = _mm_add_epi32(cdgh, cdgh_in);
    __m128i abef_ordered = _mm_shuffle_epi32(abef, 0x1B); /* A B E F */
    __m128i ghcd = _mm_shuffle_epi32(cdgh, 0xB1);         /* G H C D */
    _mm_storeu_si128((__m128i *)h, _mm_blend_epi16(abef_ordered, ghcd, 0xF0));      /* A B C D */
    _mm_storeu_si128((__m128i *)(h + 4), _mm_alignr_epi8(ghcd, abef_ordered, 8)); /* E F G H */
}

static int cpu_has_sha(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_SSE4_1) || !(c & bit_SSSE3))
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (b >> 29) & 1;
}
#else
static int cpu_has_sha(void) { return 0; }
#define sha256_block_shani sha256_block_portable
#endif

/* Finish a hash whose state h has absorbed `done` bytes (a multiple of 64) with the n bytes at s. */
static void sha256_finish(uint32_t h[8], uint64_t done, const unsigned char *s, size_t n, unsigned char out[32]) {
    uint64_t bits = (done + n) * 8;
    while (n >= 64) {
        sha256_block(h, s);
        s += 64;
        n -= 64;
    }
    unsigned char last[128];
    memcpy(last, s, n);
    last[n] = 0x80;
    size_t size = n < 56 ? 64 : 128;
    memset(last + n + 1, 0, size - n - 1);
    for (int i = 0; i < 8; i++)
        last[size - 1 - i] = (unsigned char)(bits >> (8 * i));
    sha256_block(h, last);
    if (size == 128)
        sha256_block(h, last + 64);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(h[i] >> 24);
        out[4 * i + 1] = (unsigned char)(h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(h[i] >> 8);
        out[4 * i + 3] = (unsigned char)h[i];
    }
}

/* The states after the key's inner (0x36) and outer (0x5c) padded blocks: 16 words. */
typedef struct {
    uint32_t inner[8], outer[8];
} Hmac;

static void hmac_prepare_key(Hmac *m, const unsigned char *key, size_t n) {
    unsigned char block[64] = {0}, pad[64];
    if (n > 64) {
        uint32_t h[8];
        memcpy(h, SHA256_IV, sizeof h);
        sha256_finish(h, 0, key, n, block);
    } else {
        memcpy(block, key, n);
    }
    memcpy(m->inner, SHA256_IV, sizeof m->inner);
    memcpy(m->outer, SHA256_IV, sizeof m->outer);
    for (int i = 0; i < 64; i++)
        pad[i] = block[i] ^ 0x36;
    sha256_block(m->inner, pad);
    for (int i = 0; i < 64; i++)
        pad[i] = block[i] ^ 0x5c;
    sha256_block(m->outer, pad);
}

/* HMAC-SHA256 of the n bytes at s as 64 lower-case hex digits. */
static void hmac_hex(const Hmac *m, const unsigned char *s, size_t n, char hex[64]) {
    static const char digits[] = "0123456789abcdef";
    uint32_t h[8];
    unsigned char inner[32], mac[32];
    memcpy(h, m->inner, sizeof h);
    sha256_finish(h, 64, s, n, inner);
    memcpy(h, m->outer, sizeof h);
    sha256_finish(h, 64, inner, 32, mac);
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[mac[i] >> 4];
        hex[2 * i + 1] = digits[mac[i] & 15];
    }
}

/* Strict UTF-8 as Python's decoder checks it: no overlong forms, no surrogates, nothing past U+10FFFF. */
static int valid_utf8(const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n) {
        while (i + 8 <= n) {
            uint64_t word;
            memcpy(&word, s + i, 8);
            if (word & 0x8080808080808080ULL)
                break;
            i += 8;
        }
        if (i >= n)
            break;
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (i + 2 >= n || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80)
                return 0;
            if (c == 0xE0 && s[i + 1] < 0xA0)
                return 0; /* overlong */
            if (c == 0xED && s[i + 1] > 0x9F)
                return 0; /* surrogate */
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (i + 3 >= n || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80 ||
                (s[i + 3] & 0xC0) != 0x80)
                return 0;
            if (c == 0xF0 && s[i + 1] < 0x90)
                return 0; /* overlong */
            if (c == 0xF4 && s[i + 1] > 0x8F)
                return 0; /* past U+10FFFF */
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* One column of a decoded tuple: 't' text (ptr, len) or 'n' null. */
typedef struct {
    const unsigned char *p;
    Py_ssize_t len;
    char kind;
} Col;

#define STACK_COLUMNS 64 /* wider tables take their column arrays from the heap */

/* Decode TupleData at *pos into cols (room for max). Returns the column count, or -1 for anything the
 * fast path leaves alone. */
static Py_ssize_t read_tuple(const unsigned char *s, Py_ssize_t n, Py_ssize_t *pos, Col *cols, Py_ssize_t max) {
    Py_ssize_t p = *pos;
    if (p + 2 > n)
        return -1;
    Py_ssize_t count = (int16_t)((s[p] << 8) | s[p + 1]);
    p += 2;
    if (count < 0 || count > max)
        return -1;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (p >= n)
            return -1;
        unsigned char kind = s[p++];
        if (kind == 'n') {
            cols[i].kind = 'n';
            cols[i].p = NULL;
            cols[i].len = 0;
        } else if (kind == 't') {
            if (p + 4 > n)
                return -1;
            int32_t len = (int32_t)(((uint32_t)s[p] << 24) | ((uint32_t)s[p + 1] << 16) |
                                    ((uint32_t)s[p + 2] << 8) | (uint32_t)s[p + 3]);
            p += 4;
            if (len < 0 || p + len > n)
                return -1;
            if (!valid_utf8(s + p, len))
                return -1;
            cols[i].kind = 't';
            cols[i].p = s + p;
            cols[i].len = len;
            p += len;
        } else if (kind == 'u') {
            cols[i].kind = 'u'; /* unchanged TOAST: left out of the row, never null */
            cols[i].p = NULL;
            cols[i].len = 0;
        } else {
            return -1; /* 'b' binary (never asked for), or unknown */
        }
    }
    *pos = p;
    return count;
}

static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

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

/* The plan of a relation, checked (see the top of this file). masked: some column has a transform's code. */
typedef struct {
    PyObject *schema_table, *columns, *key_index, *route;
    Py_ssize_t ncolumns;
    int masked;
    Hmac hmac;
} Plan;

static inline long column_code(const Plan *plan, Py_ssize_t i) {
    return PyLong_AsLong(PyTuple_GET_ITEM(PyTuple_GET_ITEM(plan->columns, i), 1));
}

static int put_value(Buf *b, long code, PyObject *conv, const Col *c, const Plan *plan) {
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

static inline int is_identity(PyObject *columns, Py_ssize_t i) {
    return PyTuple_GET_ITEM(PyTuple_GET_ITEM(columns, i), 3) == Py_True;
}

/* One '"name":value' member, after a comma unless it is the first (nothing for a column left out). */
static int put_member(Buf *b, const Plan *plan, Py_ssize_t i, const Col *c, int *first) {
    PyObject *entry = PyTuple_GET_ITEM(plan->columns, i);
    PyObject *prefix = PyTuple_GET_ITEM(entry, 0);
    long code = PyLong_AsLong(PyTuple_GET_ITEM(entry, 1));
    if (code == CODE_DROP)
        return 0;
    if (!*first && PUTS(b, ",") < 0)
        return -1;
    *first = 0;
    if (put(b, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix)) < 0)
        return -1;
    if (c->kind == 'n')
        return PUTS(b, "null");
    return put_value(b, code, PyTuple_GET_ITEM(entry, 2), c, plan);
}

/* The row as a JSON object; identity_only: only the replica-identity columns (an old 'K' tuple).
 * Unchanged TOAST columns are left out; when an old row is given (old_kind 'K' or 'O'), each of them
 * that the old row holds is added at the end, from there (the Python path's dict order). */
static int put_row(Buf *b, const Plan *plan, const Col *cols, Py_ssize_t count, int identity_only,
                   const Col *old, Py_ssize_t nold, char old_kind) {
    PyObject *columns = plan->columns;
    if (count != PyTuple_GET_SIZE(columns))
        return FALLBACK; /* the Python path knows what to do with a short tuple */
    if (PUTS(b, "{") < 0)
        return -1;
    int first = 1, unchanged = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (identity_only && !is_identity(columns, i))
            continue;
        if (cols[i].kind == 'u') {
            unchanged = 1;
            continue;
        }
        int rc = put_member(b, plan, i, &cols[i], &first);
        if (rc != 0)
            return rc;
    }
    if (unchanged && old != NULL) {
        if (nold != count)
            return FALLBACK;
        for (Py_ssize_t i = 0; i < count; i++) {
            if (cols[i].kind != 'u' || old[i].kind == 'u' || (old_kind == 'K' && !is_identity(columns, i)))
                continue;
            int rc = put_member(b, plan, i, &old[i], &first);
            if (rc != 0)
                return rc;
        }
    }
    return PUTS(b, "}");
}

/* The text column i is published as (a masked column's mask): 1 with *p and *n set, 0 when it is null. */
static int published_text(const Plan *plan, Py_ssize_t i, const Col *c, char hex[64], const unsigned char **p,
                          Py_ssize_t *n) {
    if (c->kind != 't')
        return 0;
    *p = c->p;
    *n = c->len;
    if (!plan->masked)
        return 1;
    switch (column_code(plan, i)) {
    case CODE_HASH:
        hmac_hex(&plan->hmac, c->p, (size_t)c->len, hex);
        *p = (const unsigned char *)hex;
        *n = 64;
        return 1;
    case CODE_REDACT:
        *p = (const unsigned char *)"[redacted]";
        *n = 10;
        return 1;
    case CODE_NULLED:
        return 0;
    default:
        return 1;
    }
}

/* The message key: the key columns' text, from ``primary`` or, where NULL there, from ``fallback``.
 * One column: its text as bytes; several: a JSON list of strings and nulls. New reference or None. */
static PyObject *make_key(const Plan *plan, const Col *primary, Py_ssize_t nprimary, const Col *fallback,
                          Py_ssize_t nfallback) {
    PyObject *key_index = plan->key_index;
    Py_ssize_t nkey = PyTuple_GET_SIZE(key_index);
    if (nkey == 0)
        Py_RETURN_NONE;
    Buf b = {NULL, 0, 0};
    PyObject *result = NULL;
    if (nkey > 1 && PUTS(&b, "[") < 0)
        goto done;
    for (Py_ssize_t k = 0; k < nkey; k++) {
        Py_ssize_t i = PyLong_AsSsize_t(PyTuple_GET_ITEM(key_index, k));
        const Col *c = (i >= 0 && i < nprimary && primary[i].kind == 't') ? &primary[i] : NULL;
        if (c == NULL && fallback != NULL && i >= 0 && i < nfallback && fallback[i].kind == 't')
            c = &fallback[i];
        char hex[64];
        const unsigned char *text = NULL;
        Py_ssize_t len = 0;
        if (c != NULL && !published_text(plan, i, c, hex, &text, &len))
            c = NULL;
        if (nkey == 1) {
            if (c == NULL) {
                result = Py_NewRef(Py_None);
            } else {
                result = PyBytes_FromStringAndSize((const char *)text, len);
            }
            goto done;
        }
        if (k > 0 && PUTS(&b, ",") < 0)
            goto done;
        if (c == NULL ? PUTS(&b, "null") < 0 : put_string(&b, text, len) < 0)
            goto done;
    }
    if (PUTS(&b, "]") < 0)
        goto done;
    result = PyBytes_FromStringAndSize(b.data, b.len);
done:
    PyMem_Free(b.data);
    return result;
}

/* The topic of an event from its plan's route: the rendered name (str) or the fallback reason (int).
 * Values come from the new row, else (an unchanged TOAST value, a DELETE) from the old one where it
 * holds them (all of a 'O' row, the identity of a 'K' key). */
static PyObject *route_topic(const Plan *plan, const Col *new_cols, Py_ssize_t nnew, const Col *old_cols,
                             Py_ssize_t nold, char old_kind) {
    static const char digits[] = "0123456789abcdef";
    PyObject *head = PyTuple_GET_ITEM(plan->route, 0), *parts = PyTuple_GET_ITEM(plan->route, 1);
    Buf b = {NULL, 0, 0};
    PyObject *result = NULL;
    long reason = 0;
    if (put(&b, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head)) < 0)
        goto done;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(parts) && !reason; k++) {
        PyObject *part = PyTuple_GET_ITEM(parts, k);
        if (PyBytes_Check(part)) {
            if (put(&b, PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part)) < 0)
                goto done;
            continue;
        }
        Py_ssize_t i = PyLong_AsSsize_t(part);
        const Col *c = NULL;
        if (i >= 0 && i < plan->ncolumns) {
            if (new_cols != NULL && i < nnew && new_cols[i].kind != 'u')
                c = &new_cols[i];
            else if (old_cols != NULL && i < nold && old_cols[i].kind != 'u' &&
                     (old_kind == 'O' || is_identity(plan->columns, i)))
                c = &old_cols[i];
        }
        char hex[64];
        const unsigned char *text = NULL;
        Py_ssize_t len = 0;
        if (c == NULL) {
            reason = ROUTE_MISSING;
        } else if (!published_text(plan, i, c, hex, &text, &len)) {
            reason = ROUTE_NULL;
        } else if (len == 0) {
            reason = ROUTE_EMPTY;
        } else {
            if (buf_grow(&b, len * 3) < 0)
                goto done;
            char *out = b.data + b.len;
            for (Py_ssize_t j = 0; j < len; j++) {
                unsigned char ch = text[j];
                if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || is_digit(ch) || ch == '-') {
                    *out++ = (char)ch;
                } else {
                    *out++ = '_';
                    *out++ = digits[ch >> 4];
                    *out++ = digits[ch & 15];
                }
            }
            b.len = out - b.data;
        }
    }
    if (!reason && b.len > MAX_TOPIC_BYTES)
        reason = ROUTE_TOO_LONG;
    result = reason ? PyLong_FromLong(reason) : PyUnicode_DecodeUTF8(b.data, b.len, "strict");
done:
    PyMem_Free(b.data);
    return result;
}

static int put_ascii_field(Buf *b, PyObject *text) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(text, &n);
    if (s == NULL)
        return -1;
    return put_escaped(b, (const unsigned char *)s, n);
}

/* The transform part of a plan (hmac, route), checked; every column's code is looked at only here. */
static int read_transform(const char *name, PyObject *transform, Plan *plan) {
    int pair = PyTuple_Check(transform) && PyTuple_GET_SIZE(transform) == 2;
    PyObject *hmac = pair ? PyTuple_GET_ITEM(transform, 0) : NULL;
    PyObject *route = pair ? PyTuple_GET_ITEM(transform, 1) : NULL;
    if (!pair || (hmac != Py_None && (!PyBytes_Check(hmac) || PyBytes_GET_SIZE(hmac) != (Py_ssize_t)sizeof(Hmac))) ||
        (route != Py_None &&
         (!PyTuple_Check(route) || PyTuple_GET_SIZE(route) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(route, 0)) ||
          !PyTuple_Check(PyTuple_GET_ITEM(route, 1))))) {
        PyErr_Format(PyExc_TypeError, "%s: a plan's transform is (prepared hmac | None, route | None)", name);
        return -1;
    }
    plan->masked = 1;
    plan->route = route == Py_None ? NULL : route;
    for (Py_ssize_t i = 0; i < plan->ncolumns; i++) {
        if (column_code(plan, i) == CODE_HASH && hmac == Py_None) {
            PyErr_Format(PyExc_TypeError, "%s: a hashed column needs the prepared hmac key", name);
            return -1;
        }
    }
    if (hmac != Py_None)
        memcpy(&plan->hmac, PyBytes_AS_STRING(hmac), sizeof(Hmac));
    if (plan->route != NULL) {
        PyObject *parts = PyTuple_GET_ITEM(plan->route, 1);
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(parts); k++) {
            PyObject *part = PyTuple_GET_ITEM(parts, k);
            if (!PyBytes_Check(part) && !PyLong_Check(part)) {
                PyErr_Format(PyExc_TypeError, "%s: a route part is bytes or a column index", name);
                return -1;
            }
        }
    }
    return 0;
}

static int read_plan(const char *name, PyObject *const *args, PyObject *ident, PyObject *time, Plan *plan) {
    PyObject *tuple = args[1];
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != 4 || !PyUnicode_Check(ident) || !PyUnicode_Check(time)) {
        PyErr_Format(PyExc_TypeError, "%s: plan must be a 4-tuple, the id (prefix) and time str", name);
        return -1;
    }
    plan->schema_table = PyTuple_GET_ITEM(tuple, 0);
    plan->columns = PyTuple_GET_ITEM(tuple, 1);
    plan->key_index = PyTuple_GET_ITEM(tuple, 2);
    if (!PyBytes_Check(plan->schema_table) || !PyTuple_Check(plan->columns) || !PyTuple_Check(plan->key_index)) {
        PyErr_Format(PyExc_TypeError, "%s: plan is (bytes, tuple, tuple, transform)", name);
        return -1;
    }
    plan->ncolumns = PyTuple_GET_SIZE(plan->columns);
    for (Py_ssize_t i = 0; i < plan->ncolumns; i++) {
        PyObject *entry = PyTuple_GET_ITEM(plan->columns, i);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 4 || !PyBytes_Check(PyTuple_GET_ITEM(entry, 0)) ||
            !PyLong_Check(PyTuple_GET_ITEM(entry, 1))) {
            PyErr_Format(PyExc_TypeError, "%s: a column is (bytes, int, converter, bool)", name);
            return -1;
        }
    }
    plan->masked = 0;
    plan->route = NULL;
    PyObject *transform = PyTuple_GET_ITEM(tuple, 3);
    return transform == Py_None ? 0 : read_transform(name, transform, plan);
}

/* The event body and key of one change whose tuples are decoded: (body, key), or (ident, body, key) when
 * with_ident | None (the Python path takes it) | NULL (an error). */
static PyObject *build_event(PyObject *ident, int with_ident, PyObject *commit_time, const Plan *plan,
                             const char *action, const Col *new_cols, Py_ssize_t nnew, const Col *old_cols,
                             Py_ssize_t nold, char old_kind, int want_key, Py_ssize_t size_hint) {
    PyObject *result = NULL;
    Buf b = {NULL, 0, 0};
    int rc;
    b.cap = size_hint * 2 + 256;
    b.data = PyMem_Malloc((size_t)b.cap);
    if (b.data == NULL)
        return PyErr_NoMemory();
    if (PUTS(&b, "{\"id\":\"") < 0 || put_ascii_field(&b, ident) < 0 || PUTS(&b, "\",") < 0 ||
        put(&b, PyBytes_AS_STRING(plan->schema_table), PyBytes_GET_SIZE(plan->schema_table)) < 0 ||
        PUTS(&b, ",\"action\":\"") < 0 || put(&b, action, (Py_ssize_t)strlen(action)) < 0 ||
        PUTS(&b, "\",\"data\":") < 0)
        goto done;
    if (new_cols != NULL) {
        rc = put_row(&b, plan, new_cols, nnew, 0, old_cols, nold, old_kind);
    } else {
        rc = PUTS(&b, "{}");
    }
    if (rc != 0)
        goto check;
    if ((rc = PUTS(&b, ",\"dataOld\":")) != 0)
        goto check;
    if (old_cols != NULL) {
        rc = put_row(&b, plan, old_cols, nold, old_kind == 'K', NULL, 0, 0);
    } else {
        rc = PUTS(&b, "{}");
    }
    if (rc != 0)
        goto check;
    if (PUTS(&b, ",\"commitTime\":\"") < 0 || put_ascii_field(&b, commit_time) < 0 || PUTS(&b, "\"}") < 0)
        goto done;

    PyObject *key;
    if (!want_key) {
        key = Py_NewRef(Py_None);
    } else if (new_cols == NULL) {
        key = make_key(plan, old_cols, nold, NULL, 0);
    } else {
        key = make_key(plan, new_cols, nnew, old_cols, nold);
    }
    if (key == NULL)
        goto done;
    PyObject *body = PyBytes_FromStringAndSize(b.data, b.len);
    if (body == NULL) {
        Py_DECREF(key);
        goto done;
    }
    if (plan->route == NULL) {
        result = with_ident ? PyTuple_Pack(3, ident, body, key) : PyTuple_Pack(2, body, key);
    } else {
        PyObject *topic = route_topic(plan, new_cols, nnew, old_cols, nold, old_kind);
        if (topic != NULL) {
            result = with_ident ? PyTuple_Pack(4, ident, body, key, topic) : PyTuple_Pack(3, body, key, topic);
            Py_DECREF(topic);
        }
    }
    Py_DECREF(body);
    Py_DECREF(key);
    goto done;

check:
    if (rc < 0)
        goto done;
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(b.data);
    return result;
}

/* prefix (a str) + number as 12 lower-case hex digits (an event id), or prefix itself when number is None. */
static PyObject *make_ident(PyObject *prefix, PyObject *number) {
    if (number == Py_None)
        return Py_NewRef(prefix);
    unsigned long long n = PyLong_AsUnsignedLongLong(number);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (!PyUnicode_IS_ASCII(prefix) || n >> 48) {
        PyErr_SetString(PyExc_ValueError, "event: the id prefix must be ASCII and the number below 2**48");
        return NULL;
    }
    Py_ssize_t len = PyUnicode_GET_LENGTH(prefix);
    PyObject *ident = PyUnicode_New(len + 12, 127);
    if (ident == NULL)
        return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(ident);
    memcpy(out, PyUnicode_1BYTE_DATA(prefix), (size_t)len);
    for (int i = 11; i >= 0; i--, n >>= 4)
        out[len + i] = (Py_UCS1)"0123456789abcdef"[n & 0xF];
    return ident;
}

static PyObject *hot_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "event(msg, plan, prefix, number, commit_time, want_key)");
        return NULL;
    }
    Plan plan;
    if (read_plan("event", args, args[2], args[4], &plan) < 0)
        return NULL;
    Py_ssize_t ncolumns = plan.ncolumns;
    int want_key = PyObject_IsTrue(args[5]);
    if (want_key < 0)
        return NULL;
    PyObject *ident = make_ident(args[2], args[3]);
    if (ident == NULL)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        Py_DECREF(ident);
        return NULL;
    }
    const unsigned char *s = view.buf;
    Py_ssize_t n = view.len;
    PyObject *result = NULL;
    Col stack_new[STACK_COLUMNS], stack_old[STACK_COLUMNS];
    Col *heap = NULL, *new_cols = NULL, *old_cols = NULL, *spare_new = stack_new, *spare_old = stack_old;
    Py_ssize_t nnew = 0, nold = 0;
    char old_kind = 0;
    const char *action;

    if (ncolumns > STACK_COLUMNS) {
        heap = PyMem_Malloc(sizeof(Col) * (size_t)ncolumns * 2);
        if (heap == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        spare_new = heap;
        spare_old = heap + ncolumns;
    }
    if (n < 6)
        goto fallback;
    Py_ssize_t pos = 6;
    unsigned char tag = s[0], marker = s[5];
    if (tag == 'I') {
        action = "INSERT";
        if (marker != 'N')
            goto fallback;
    } else if (tag == 'U') {
        action = "UPDATE";
        if (marker == 'K' || marker == 'O') {
            old_kind = (char)marker;
            old_cols = spare_old;
            nold = read_tuple(s, n, &pos, old_cols, ncolumns);
            if (nold < 0 || pos >= n)
                goto fallback;
            marker = s[pos++];
        }
        if (marker != 'N')
            goto fallback;
    } else if (tag == 'D') {
        action = "DELETE";
        if (marker != 'K' && marker != 'O')
            goto fallback;
        old_kind = (char)marker;
        old_cols = spare_old;
        nold = read_tuple(s, n, &pos, old_cols, ncolumns);
        if (nold < 0)
            goto fallback;
    } else {
        goto fallback;
    }
    if (tag != 'D') {
        new_cols = spare_new;
        nnew = read_tuple(s, n, &pos, new_cols, ncolumns);
        if (nnew < 0)
            goto fallback;
    }
    result = build_event(ident, 1, args[4], &plan, action, new_cols, nnew, old_cols, nold, old_kind, want_key, n);
    goto done;
fallback:
    result = Py_NewRef(Py_None);
done:
    Py_DECREF(ident);
    PyMem_Free(heap);
    PyBuffer_Release(&view);
    return result;
}

/* read_row(values, plan, ident, read_time, want_key) -> (body, key) | None
 *
 * A backfilled row: ``values`` holds each column's text form as bytes (None for NULL), in the plan's
 * column order, as pgoutput would send them in an Insert. The body is the INSERT's but for the action,
 * READ, so its data is byte for byte what the row's INSERT event carries. */
static PyObject *hot_read_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "read_row(values, plan, ident, read_time, want_key)");
        return NULL;
    }
    Plan plan;
    if (read_plan("read_row", args, args[2], args[3], &plan) < 0)
        return NULL;
    int want_key = PyObject_IsTrue(args[4]);
    if (want_key < 0)
        return NULL;
    PyObject *values = args[0];
    if (!PyList_Check(values)) {
        PyErr_SetString(PyExc_TypeError, "read_row: values must be a list");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(values);
    if (count > plan.ncolumns)
        return Py_NewRef(Py_None);
    Col stack[STACK_COLUMNS];
    Col *cols = stack;
    if (count > STACK_COLUMNS) {
        cols = PyMem_Malloc(sizeof(Col) * (size_t)count);
        if (cols == NULL)
            return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    Py_ssize_t size = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(values, i);
        if (item == Py_None) {
            cols[i].kind = 'n';
            cols[i].p = NULL;
            cols[i].len = 0;
        } else if (PyBytes_Check(item)) {
            const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(item);
            Py_ssize_t len = PyBytes_GET_SIZE(item);
            if (!valid_utf8(p, len)) {
                result = Py_NewRef(Py_None);
                goto done;
            }
            cols[i].kind = 't';
            cols[i].p = p;
            cols[i].len = len;
            size += len + 8;
        } else {
            PyErr_SetString(PyExc_TypeError, "read_row: a value is bytes or None");
            goto done;
        }
    }
    result = build_event(args[2], 0, args[3], &plan, "READ", cols, count, NULL, 0, 0, want_key, size);
done:
    if (cols != stack)
        PyMem_Free(cols);
    return result;
}

/* ---------------------------------------------------------------------------------------------
 * NATS wire frames: the HPUB frames of a batch, and the JetStream acks that come back.
 */

static PyObject *str_body, *str_id, *str_subject, *str_headers, *str_content_type;

/* An id nats-py would send unchanged in a header: printable ASCII, no spaces (so strip() and the
 * CR/LF replacement of the Python path leave it as it is). */
static int plain_header_value(const char *s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7E)
            return 0;
    return 1;
}

/* A header line "name: value\r\n" as the Python path writes it, when both are plain: a name of printable
 * ASCII without ':', a value of printable ASCII or spaces, not starting or ending with a space. 0: not plain. */
static int put_header(Buf *b, PyObject *name, PyObject *value) {
    Py_ssize_t name_len, value_len;
    if (!PyUnicode_Check(name) || !PyUnicode_Check(value) || !PyUnicode_IS_ASCII(name) || !PyUnicode_IS_ASCII(value))
        return 0;
    const char *name_text = PyUnicode_AsUTF8AndSize(name, &name_len);
    const char *value_text = PyUnicode_AsUTF8AndSize(value, &value_len);
    if (name_text == NULL || value_text == NULL || name_len == 0 || !plain_header_value(name_text, name_len) ||
        memchr(name_text, ':', name_len) != NULL)
        return 0;
    for (Py_ssize_t i = 0; i < value_len; i++)
        if ((unsigned char)value_text[i] < 0x20 || (unsigned char)value_text[i] > 0x7E)
            return 0;
    if (value_len && (value_text[0] == ' ' || value_text[value_len - 1] == ' '))
        return 0;
    if (put(b, name_text, name_len) < 0 || PUTS(b, ": ") < 0 || put(b, value_text, value_len) < 0 ||
        PUTS(b, "\r\n") < 0)
        return -1;
    return 1;
}

/* The header lines of message.headers and message.content_type into b (emptied first).
 * 1: written, 0: something needs the Python path, -1: error. */
static int extra_headers(Buf *b, PyObject *message) {
    b->len = 0;
    PyObject *headers = PyObject_GetAttr(message, str_headers);
    if (headers == NULL)
        return -1;
    int rc = 1;
    if (headers == Py_None) {
        /* none */
    } else if (!PyDict_Check(headers)) {
        rc = 0;
    } else {
        Py_ssize_t pos = 0;
        PyObject *name, *value;
        while (rc == 1 && PyDict_Next(headers, &pos, &name, &value))
            rc = put_header(b, name, value);
    }
    Py_DECREF(headers);
    if (rc != 1)
        return rc;
    PyObject *content_type = PyObject_GetAttr(message, str_content_type);
    if (content_type == NULL)
        return -1;
    if (PyUnicode_Check(content_type) && PyUnicode_GET_LENGTH(content_type) > 0) {
        PyObject *name = PyUnicode_FromString("content-type");
        rc = name == NULL ? -1 : put_header(b, name, content_type);
        Py_XDECREF(name);
    } else if (!PyUnicode_Check(content_type)) {
        rc = 0;
    }
    Py_DECREF(content_type);
    return rc;
}

/* nats_frames(batch, prefixes, seq, limit, header_bytes) -> (frames: bytes, payload: int) | None
 *
 * One "HPUB <subject> <inbox>.<seq> <hdr> <total>\r\nNATS/1.0\r\nNats-Msg-Id: <id>\r\n<extra>\r\n<body>\r\n"
 * per message, seq counting up from seq + 1; extra: the lines of message.headers and message.content_type.
 * prefixes maps a subject to "HPUB <subject> <inbox>.". None when a message needs the Python path's checks
 * (unknown subject, too large, an id or header with odd characters). */
static PyObject *hot_nats_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5 || !PyList_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "nats_frames(batch: list, prefixes: dict, seq, limit, header_bytes)");
        return NULL;
    }
    long long seq = PyLong_AsLongLong(args[2]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[3]);
    Py_ssize_t header_bytes = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *batch = args[0], *prefixes = args[1];
    Py_ssize_t count = PyList_GET_SIZE(batch);
    Buf b = {NULL, 0, 0};
    Buf extra = {NULL, 0, 0};
    long long payload = 0;
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *message = PyList_GET_ITEM(batch, i);
        PyObject *body = PyObject_GetAttr(message, str_body);
        PyObject *ident = body ? PyObject_GetAttr(message, str_id) : NULL;
        PyObject *subject = ident ? PyObject_GetAttr(message, str_subject) : NULL;
        int rc = -1;
        if (subject == NULL)
            goto next;
        rc = FALLBACK;
        if (!PyBytes_Check(body) || !PyUnicode_Check(ident) || !PyUnicode_Check(subject))
            goto next;
        PyObject *prefix = PyDict_GetItemWithError(prefixes, subject); /* borrowed */
        if (prefix == NULL) {
            rc = PyErr_Occurred() ? -1 : FALLBACK;
            goto next;
        }
        Py_ssize_t id_len, prefix_len;
        const char *id_text = PyUnicode_AsUTF8AndSize(ident, &id_len);
        const char *prefix_text = PyUnicode_Check(prefix) ? PyUnicode_AsUTF8AndSize(prefix, &prefix_len) : NULL;
        if (id_text == NULL || prefix_text == NULL) {
            rc = PyErr_Occurred() ? -1 : FALLBACK;
            goto next;
        }
        Py_ssize_t body_len = PyBytes_GET_SIZE(body);
        int extra_rc = extra_headers(&extra, message);
        if (extra_rc <= 0) {
            rc = extra_rc < 0 ? -1 : FALLBACK;
            goto next;
        }
        if (id_len == 0 || !plain_header_value(id_text, id_len) || body_len + id_len + extra.len > limit)
            goto next;
        Py_ssize_t header = header_bytes + id_len + extra.len;
        char numbers[96];
        seq++;
        int written = snprintf(numbers, sizeof numbers, "%lld %zd %zd\r\nNATS/1.0\r\nNats-Msg-Id: ", seq, header,
                               header + body_len);
        if (put(&b, prefix_text, prefix_len) < 0 || put(&b, numbers, written) < 0 || put(&b, id_text, id_len) < 0 ||
            PUTS(&b, "\r\n") < 0 || (extra.len && put(&b, extra.data, extra.len) < 0) || PUTS(&b, "\r\n") < 0 ||
            put(&b, PyBytes_AS_STRING(body), body_len) < 0 || PUTS(&b, "\r\n") < 0) {
            rc = -1;
            goto next;
        }
        payload += body_len;
        rc = 0;
    next:
        Py_XDECREF(body);
        Py_XDECREF(ident);
        Py_XDECREF(subject);
        if (rc < 0)
            goto done;
        if (rc == FALLBACK) {
            result = Py_NewRef(Py_None);
            goto done;
        }
    }
    {
        PyObject *frames = PyBytes_FromStringAndSize(b.data ? b.data : "", b.len);
        if (frames != NULL) {
            result = Py_BuildValue("(NL)", frames, payload);
        }
    }
done:
    PyMem_Free(b.data);
    PyMem_Free(extra.data);
    return result;
}

/* Append the run of plain acks first..stop - 1 as (first, stop), if there is one. */
static int flush_run(PyObject *answers, long long first, long long stop) {
    if (stop <= first)
        return 0;
    PyObject *run = Py_BuildValue("(LL)", first, stop);
    if (run == NULL || PyList_Append(answers, run) < 0) {
        Py_XDECREF(run);
        return -1;
    }
    Py_DECREF(run);
    return 0;
}

/* nats_acks(data, sid) -> (answers: list[tuple[int, int] | tuple[bytes, bytes]], consumed: int)
 *
 * The run of complete "MSG <inbox>.<seq> <sid> <size>\r\n<payload>\r\n" frames of subscription sid at
 * the start of data, in order. Plain acks (a numeric seq, no "error" in the first 20 bytes) of consecutive
 * seqs come as one (first seq, last seq + 1); any other answer is (last subject token, payload) for the
 * Python code to judge. consumed: the bytes taken; the first frame that is not ours or not complete stays
 * for the client's parser. */
static PyObject *hot_nats_acks(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "nats_acks(data: bytes, sid: bytes)");
        return NULL;
    }
    const char *s = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    const char *sid = PyBytes_AS_STRING(args[1]);
    Py_ssize_t sid_len = PyBytes_GET_SIZE(args[1]);
    PyObject *answers = PyList_New(0);
    if (answers == NULL)
        return NULL;
    Py_ssize_t at = 0;
    long long run_first = 0, run_stop = 0; /* plain acks run_first..run_stop - 1, not appended yet */
    while (n - at >= 4 && memcmp(s + at, "MSG ", 4) == 0) {
        const char *line = s + at + 4;
        const char *line_end = NULL;
        for (const char *c = line; c + 1 < s + n; c++) {
            if (c[0] == '\r' && c[1] == '\n') {
                line_end = c;
                break;
            }
        }
        if (line_end == NULL)
            break;
        /* exactly three fields: subject, sid, size */
        const char *sp1 = memchr(line, ' ', (size_t)(line_end - line));
        if (sp1 == NULL)
            break;
        const char *sp2 = memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1));
        if (sp2 == NULL || memchr(sp2 + 1, ' ', (size_t)(line_end - sp2 - 1)) != NULL)
            break;
        if (sp2 - sp1 - 1 != sid_len || memcmp(sp1 + 1, sid, (size_t)sid_len) != 0)
            break;
        Py_ssize_t size = 0;
        const char *c = sp2 + 1;
        if (c == line_end || line_end - c > 12)
            break;
        for (; c < line_end; c++) {
            if (!is_digit((unsigned char)*c))
                break;
            size = size * 10 + (*c - '0');
        }
        if (c != line_end)
            break;
        Py_ssize_t start = (line_end - s) + 2, stop = start + size;
        if (stop + 2 > n)
            break;
        const char *token = sp1;
        while (token > line && token[-1] != '.')
            token--;
        Py_ssize_t token_len = sp1 - token;
        long long seq = 0;
        int numeric = token_len > 0 && token_len <= 18;
        for (Py_ssize_t k = 0; numeric && k < token_len; k++) {
            if (!is_digit((unsigned char)token[k]))
                numeric = 0;
            else
                seq = seq * 10 + (token[k] - '0');
        }
        Py_ssize_t head = size < 20 ? size : 20;
        int has_error = 0;
        for (Py_ssize_t k = 0; k + 7 <= head; k++) {
            if (memcmp(s + start + k, "\"error\"", 7) == 0) {
                has_error = 1;
                break;
            }
        }
        if (numeric && !has_error) {
            if (run_stop > run_first && seq == run_stop) {
                run_stop++;
            } else {
                if (flush_run(answers, run_first, run_stop) < 0)
                    goto error;
                run_first = seq;
                run_stop = seq + 1;
            }
        } else {
            if (flush_run(answers, run_first, run_stop) < 0)
                goto error;
            run_first = run_stop = 0;
            PyObject *pair = Py_BuildValue("(y#y#)", token, token_len, s + start, size);
            if (pair == NULL || PyList_Append(answers, pair) < 0) {
                Py_XDECREF(pair);
                goto error;
            }
            Py_DECREF(pair);
        }
        at = stop + 2;
    }
    if (flush_run(answers, run_first, run_stop) < 0)
        goto error;
    return Py_BuildValue("(Nn)", answers, at);
error:
    Py_DECREF(answers);
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * The replication stream: many CopyData messages per call.
 */

typedef int (*getcopydata_fn)(void *conn, char **buffer, int async);
typedef void (*freemem_fn)(void *ptr);
static getcopydata_fn pq_getcopydata = NULL;
static freemem_fn pq_freemem = NULL;

static PyObject *hot_set_libpq(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_libpq(PQgetCopyData address, PQfreemem address)");
        return NULL;
    }
    void *getcopydata = PyLong_AsVoidPtr(args[0]);
    void *freemem = PyLong_AsVoidPtr(args[1]);
    if (PyErr_Occurred())
        return NULL;
    pq_getcopydata = (getcopydata_fn)getcopydata;
    pq_freemem = (freemem_fn)freemem;
    Py_RETURN_NONE;
}

static inline unsigned long long be64(const unsigned char *p) {
    unsigned long long v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

/* copy_batch(pgconn_ptr, limit, starts, max_bytes=0) -> (payloads: list[bytes], wal_end: int, other: bytes | None,
 *                                                     status)
 *
 * Up to limit XLogData ('w') messages already buffered by libpq: their payloads (the pgoutput message,
 * after the 25-byte header), the last non-zero WAL end they carried, and, when starts is a list, each
 * one's start LSN appended to it. It stops early at any other message (a keepalive), returned whole as
 * other, when libpq has nothing more buffered, and (max_bytes > 0) once the payloads taken hold max_bytes
 * or more (libpq's buffer, once grown for a huge row, holds many large ones). status: 1 more may be
 * buffered, 0 nothing buffered (wait for the socket), -1 the stream ended, -2 libpq reported an error. */
static PyObject *hot_copy_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3 && nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "copy_batch(pgconn_ptr, limit, starts: list | None, max_bytes=0)");
        return NULL;
    }
    if (pq_getcopydata == NULL || pq_freemem == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "copy_batch: set_libpq() was not called");
        return NULL;
    }
    void *conn = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    Py_ssize_t max_bytes = nargs == 4 ? PyLong_AsSsize_t(args[3]) : 0;
    if (PyErr_Occurred())
        return NULL;
    Py_ssize_t taken = 0;
    if (conn == NULL) {
        PyErr_SetString(PyExc_ValueError, "copy_batch: no connection");
        return NULL;
    }
    PyObject *starts = args[2] == Py_None ? NULL : args[2];
    if (starts != NULL && !PyList_Check(starts)) {
        PyErr_SetString(PyExc_TypeError, "copy_batch: starts must be a list or None");
        return NULL;
    }
    PyObject *payloads = PyList_New(0);
    if (payloads == NULL)
        return NULL;
    unsigned long long wal_end = 0;
    PyObject *other = NULL;
    int status = 1;
    while (PyList_GET_SIZE(payloads) < limit && (max_bytes <= 0 || taken < max_bytes)) {
        char *buffer = NULL;
        int size = pq_getcopydata(conn, &buffer, 1);
        if (size <= 0) {
            if (buffer != NULL)
                pq_freemem(buffer);
            status = size == 0 ? 0 : (size == -1 ? -1 : -2);
            break;
        }
        const unsigned char *data = (const unsigned char *)buffer;
        if (data[0] != 'w' || size < 25) {
            other = PyBytes_FromStringAndSize(buffer, size);
            pq_freemem(buffer);
            if (other == NULL)
                goto error;
            break;
        }
        unsigned long long end = be64(data + 9);
        if (end)
            wal_end = end;
        int failed = 0;
        if (size > 25) {
            taken += size - 25;
            PyObject *payload = PyBytes_FromStringAndSize(buffer + 25, size - 25);
            failed = payload == NULL || PyList_Append(payloads, payload) < 0;
            Py_XDECREF(payload);
            if (!failed && starts != NULL) {
                PyObject *start = PyLong_FromUnsignedLongLong(be64(data + 1));
                failed = start == NULL || PyList_Append(starts, start) < 0;
                Py_XDECREF(start);
            }
        }
        pq_freemem(buffer);
        if (failed)
            goto error;
    }
    if (other == NULL)
        other = Py_NewRef(Py_None);
    return Py_BuildValue("(NKNi)", payloads, wal_end, other, status);
error:
    Py_DECREF(payloads);
    return NULL;
}

/* hmac_prepare(key: bytes) -> bytes: the key's prepared states for plans (and hmac_hex). */
static PyObject *hot_hmac_prepare(PyObject *self, PyObject *key) {
    (void)self;
    if (!PyBytes_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "hmac_prepare(key: bytes)");
        return NULL;
    }
    Hmac m;
    hmac_prepare_key(&m, (const unsigned char *)PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key));
    return PyBytes_FromStringAndSize((const char *)&m, sizeof m);
}

/* hmac_hex(prepared: bytes, data: bytes, portable: bool = False) -> str: HMAC-SHA256 of data, lower-case
 * hex; portable: with the portable block code even where the CPU's SHA extensions are used (tests). */
static PyObject *hot_hmac_hex(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs < 2 || nargs > 3 || !PyBytes_Check(args[0]) || PyBytes_GET_SIZE(args[0]) != (Py_ssize_t)sizeof(Hmac) ||
        !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "hmac_hex(prepared: bytes from hmac_prepare, data: bytes, portable=False)");
        return NULL;
    }
    int portable = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
    if (portable < 0)
        return NULL;
    Hmac m;
    char hex[64];
    memcpy(&m, PyBytes_AS_STRING(args[0]), sizeof m);
    void (*chosen)(uint32_t *, const unsigned char *) = sha256_block;
    if (portable)
        sha256_block = sha256_block_portable;
    hmac_hex(&m, (const unsigned char *)PyBytes_AS_STRING(args[1]), (size_t)PyBytes_GET_SIZE(args[1]), hex);
    sha256_block = chosen;
    return PyUnicode_DecodeASCII(hex, 64, "strict");
}

static PyObject *hot_sha_extensions(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyBool_FromLong(sha256_block != sha256_block_portable);
}

static PyObject *hot_set_encoder(PyObject *self, PyObject *dumps) {
    (void)self;
    if (!PyCallable_Check(dumps)) {
        PyErr_SetString(PyExc_TypeError, "set_encoder: a callable returning bytes");
        return NULL;
    }
    Py_XSETREF(json_dumps, Py_NewRef(dumps));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"event", (PyCFunction)(void (*)(void))hot_event, METH_FASTCALL,
     "event(msg, plan, prefix, number, commit_time, want_key) -> (ident, body, key[, topic]) | None"},
    {"read_row", (PyCFunction)(void (*)(void))hot_read_row, METH_FASTCALL,
     "read_row(values, plan, ident, read_time, want_key) -> (body, key[, topic]) | None"},
    {"nats_frames", (PyCFunction)(void (*)(void))hot_nats_frames, METH_FASTCALL,
     "nats_frames(batch, prefixes, seq, limit, header_bytes) -> (frames, payload) | None"},
    {"nats_acks", (PyCFunction)(void (*)(void))hot_nats_acks, METH_FASTCALL,
     "nats_acks(data, sid) -> (answers: seq or (seq text, payload), bytes consumed)"},
    {"set_encoder", hot_set_encoder, METH_O, "set_encoder(dumps): the JSON encoder for converted values"},
    {"hmac_prepare", hot_hmac_prepare, METH_O, "hmac_prepare(key) -> the key's prepared HMAC-SHA256 states"},
    {"hmac_hex", (PyCFunction)(void (*)(void))hot_hmac_hex, METH_FASTCALL,
     "hmac_hex(prepared, data, portable=False) -> HMAC-SHA256 of data, lower-case hex"},
    {"sha_extensions", hot_sha_extensions, METH_NOARGS, "sha_extensions() -> whether SHA-256 uses the CPU's"},
    {"set_libpq", (PyCFunction)(void (*)(void))hot_set_libpq, METH_FASTCALL,
     "set_libpq(getcopydata, freemem): addresses of PQgetCopyData and PQfreemem of psycopg's libpq"},
    {"copy_batch", (PyCFunction)(void (*)(void))hot_copy_batch, METH_FASTCALL,
     "copy_batch(pgconn_ptr, limit, starts, max_bytes=0) -> (payloads, wal_end, other, status)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "listener._hotpath",
    "Compiled fast path: a pgoutput change message -> the event's JSON body (see listener/hotpath.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__hotpath(void) {
    init_escapes();
    sha256_block = cpu_has_sha() ? sha256_block_shani : sha256_block_portable;
    str_body = PyUnicode_InternFromString("body");
    str_id = PyUnicode_InternFromString("id");
    str_subject = PyUnicode_InternFromString("subject");
    str_headers = PyUnicode_InternFromString("headers");
    str_content_type = PyUnicode_InternFromString("content_type");
    if (str_body == NULL || str_id == NULL || str_subject == NULL || str_headers == NULL || str_content_type == NULL)
        return NULL;
    return PyModule_Create(&module);
}
