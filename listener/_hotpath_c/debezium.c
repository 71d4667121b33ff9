/* The Debezium format (publisher.format: debezium): debezium_event() writes the change event's envelope
 * {"before", "after", "source", "transaction", "op", "ts_ms", "ts_us", "ts_ns"} (inside {"schema", "payload"}
 * with publisher.debezium.schemas) and its key, byte for byte what the Python stages write.
 * Python twin: listener/formats.py (the dbz_* converters, Debezium.row/key/source/envelope),
 * listener/event.py (EventBuilder._debezium_change), listener/hotpath.py (debezium_plan).
 *
 * debezium_event(msg, plan, prefix, number, commit_micros, xid, lsn, last_commit, now_ns, want_key)
 *   -> (ident: str, body: bytes, key: bytes | None) | None
 *   body: the event, or with a value_head (schemas) what follows it: the event is value_head + body (the
 *   schema head is not copied into each event: a message.HeadedMessage carries it beside the body)
 *   msg: a pgoutput Insert/Update/Delete; the id as event() makes it (prefix + number in hex, or prefix
 *   when number is None); commit_micros: the transaction's commit time (protocol microseconds); xid, lsn
 *   (the change's own) and last_commit (the previous commit's LSN, Debezium's sequence) int or None;
 *   now_ns: time.time_ns() for the envelope's ts_*, or None: the same clock read here (freeze_clock() fixes it
 *   for tests). None (the answer): the Python path takes the message.
 *
 * debezium_event(..., want_key, shape) -> Message | None: the event made as a listener.message.Message (with
 *   schemas a HeadedMessage, the shape's class) for a table without a topic route: see message.c.
 *
 * debezium_read_row(values, plan, read_micros, last_commit, now_ns, want_key) -> (body, key) | None
 *   a backfilled row (each column's text form as bytes, None for NULL) as its READ event (body as above).
 *
 * plan = (source_head, source_db, source_table, columns, key_index, value_head, key_head, source_db_read):
 *   source_head  ',"source":{"version":...,"connector":"postgresql","name":"...","ts_ms":'
 *   source_db    ',"snapshot":"false","db":"...","sequence":"['
 *   source_table ',"schema":"...","table":"...","txId":'
 *   columns      one (prefix '"name":', code, converter, placeholder) per column: code says how the value
 *                is written (CODE_* of hotpath.h the default format shares, or DBZ_* below), converter is the
 *                Python converter (called for what the C code does not write itself), placeholder the JSON
 *                of an unchanged TOASTed value (formats.unavailable)
 *   key_index    the key's columns
 *   value_head   None, or '{"schema":<envelope schema>,"payload":' (publisher.debezium.schemas)
 *   key_head     None, or '{"schema":<key schema>,"payload":' (schemas on Kafka)
 *   source_db_read  source_db of a READ event (',"snapshot":"incremental",...')
 *   hmac         None, or the transform's hash key prepared by hmac_prepare (a column with CODE_HASH)
 *   route        None, or the table's plan in the default format (hotpath.plan) when its transform has a topic
 *                route: then debezium_event() answers (ident, body, key, topic) and debezium_read_row()
 *                (body, key, topic), topic as route_topic() renders it (transforms.c)
 *   A table's transform (listener/transforms.py) shows as the codes CODE_DROP (left out of the rows and the
 *   key) and CODE_HASH / CODE_REDACT / CODE_NULLED (masks).
 */
#include "hotpath.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* Debezium's conversions (keep in step with listener/hotpath.py) */
enum {
    DBZ_NUMERIC = 32,  /* the text; NaN as NAN */
    DBZ_MICRO_TS = 33, /* timestamp(4-6): microseconds since the epoch; infinity as the JDBC driver's constant */
    DBZ_MILLI_TS = 34, /* timestamp(0-3): milliseconds */
    DBZ_DATE = 35,     /* days since 1970-01-01 */
    DBZ_TIME = 36,     /* microseconds since midnight */
    DBZ_BYTEA = 37,    /* \x hex -> base64 */
    DBZ_BIT1 = 38,     /* "1" -> true */
    DBZ_INTERVAL = 39, /* ISO 8601 -> microseconds, a month 30.4375 days */
    DBZ_TIMETZ = 40,   /* the time in UTC with a Z */
};

#define DBZ_PLAN_SIZE 10
/* formats.TIMESTAMP_INFINITY */
#define TS_INFINITY "9223372036825200000"
#define TS_MINUS_INFINITY "-9223372036832400000"
/* 2000-01-01 (the protocol's epoch) in microseconds since 1970-01-01 */
#define PG_EPOCH_US 946684800000000LL

/* decimal digits of v, written backwards from end; returns where they start */
static char *uint64_digits(unsigned long long v, char *end) {
    static const char pairs[] = "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
                                "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
                                "8081828384858687888990919293949596979899";
    while (v >= 100) {
        unsigned i = (unsigned)(v % 100) * 2;
        v /= 100;
        *--end = pairs[i + 1];
        *--end = pairs[i];
    }
    if (v >= 10) {
        *--end = pairs[v * 2 + 1];
        *--end = pairs[v * 2];
    } else {
        *--end = (char)('0' + v);
    }
    return end;
}

static int put_int64(Buf *b, long long v) {
    char text[24];
    unsigned long long magnitude = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    char *start = uint64_digits(magnitude, text + sizeof text);
    if (v < 0)
        *--start = '-';
    return put(b, start, text + sizeof text - start);
}

/* A number's decimal text, kept to write it and the numbers it divides into by powers of ten (ts_ms, ts_us,
 * ts_ns of the same time). */
typedef struct {
    long long value;
    char text[24];
    const char *start;
    Py_ssize_t len;
} Number;

static void number_text(Number *n, long long v) {
    char *end = n->text + sizeof n->text;
    unsigned long long magnitude = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    char *start = uint64_digits(magnitude, end);
    if (v < 0)
        *--start = '-';
    n->value = v;
    n->start = start;
    n->len = end - start;
}

static long long floor_div(long long a, long long d);

/* n's value // 10**digits (Python's floor division): its text without the last digits where it has more */
static int put_divided(Buf *b, const Number *n, int digits, long long divisor) {
    if (n->value >= divisor)
        return put(b, n->start, n->len - digits);
    return put_int64(b, floor_div(n->value, divisor));
}

/* n's value * 1000 */
static int put_thousand_times(Buf *b, const Number *n) {
    if (n->value == 0)
        return PUTS(b, "0");
    if (put(b, n->start, n->len) < 0)
        return -1;
    return PUTS(b, "000");
}

static long long floor_div(long long a, long long d) {
    long long q = a / d;
    return (a % d != 0 && (a < 0) != (d < 0)) ? q - 1 : q;
}

/* n ASCII digits at s as a number (all digits: 1; else 0). */
static int digits(const unsigned char *s, Py_ssize_t n, long long *out) {
    long long v = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!is_digit(s[i]))
            return 0;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 1;
}

static long long days_from_civil(long long y, long long m, long long d) {
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    long long yoe = y - era * 400;
    long long doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int days_in_month(long long y, long long m) {
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (m == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0))
        return 29;
    return days[m - 1];
}

/* YYYY-MM-DD, a valid date of years 1-9999 (what date.fromisoformat reads the same): 1 with *days since
 * 1970-01-01; 0 for any other text. */
static int parse_date(const unsigned char *s, Py_ssize_t n, long long *days) {
    long long y, m, d;
    if (n != 10 || s[4] != '-' || s[7] != '-' || !digits(s, 4, &y) || !digits(s + 5, 2, &m) || !digits(s + 8, 2, &d))
        return 0;
    if (y < 1 || m < 1 || m > 12 || d < 1 || d > days_in_month(y, m))
        return 0;
    *days = days_from_civil(y, m, d);
    return 1;
}

/* HH:MM:SS(.f{1,6})?: 1 with the parts (fraction scaled to microseconds); 0 for any other text. */
static int parse_clock(const unsigned char *s, Py_ssize_t n, long long *h, long long *m, long long *sec,
                       long long *micros) {
    if (n < 8 || s[2] != ':' || s[5] != ':' || !digits(s, 2, h) || !digits(s + 3, 2, m) || !digits(s + 6, 2, sec))
        return 0;
    *micros = 0;
    if (n == 8)
        return 1;
    Py_ssize_t f = n - 9;
    if (s[8] != '.' || f < 1 || f > 6 || !digits(s + 9, f, micros))
        return 0;
    for (Py_ssize_t i = f; i < 6; i++)
        *micros *= 10;
    return 1;
}

/* timestamp text -> microseconds since the epoch (formats.dbz_micro_timestamp's datetime arithmetic) */
static int parse_timestamp(const unsigned char *s, Py_ssize_t n, long long *micros) {
    long long days, h, m, sec, frac;
    if (n < 19 || s[10] != ' ' || !parse_date(s, 10, &days) || !parse_clock(s + 11, n - 11, &h, &m, &sec, &frac))
        return 0;
    if (h > 23 || m > 59 || sec > 59)
        return 0;
    *micros = ((days * 24 + h) * 60 + m) * 60000000LL + sec * 1000000LL + frac;
    return 1;
}

static int ends_with_bc(const unsigned char *s, Py_ssize_t n) {
    return n >= 3 && memcmp(s + n - 3, " BC", 3) == 0;
}

static int put_timestamp(Buf *b, long code, PyObject *conv, const Col *c) {
    const unsigned char *s = c->p;
    Py_ssize_t n = c->len;
    if (n == 0 || s[0] >= 0x80)
        return put_value(b, CODE_PYTHON, conv, c, NULL); /* str.isdigit() knows more digits than ASCII */
    if (!is_digit(s[0]) || ends_with_bc(s, n)) {
        if (n == 8 && memcmp(s, "infinity", 8) == 0)
            return PUTS(b, TS_INFINITY);
        if (n == 9 && memcmp(s, "-infinity", 9) == 0)
            return PUTS(b, TS_MINUS_INFINITY);
        return put_string(b, s, n);
    }
    long long micros;
    if (!parse_timestamp(s, n, &micros))
        return put_value(b, CODE_PYTHON, conv, c, NULL);
    return put_int64(b, code == DBZ_MILLI_TS ? floor_div(micros, 1000) : micros);
}

static int put_date(Buf *b, PyObject *conv, const Col *c) {
    const unsigned char *s = c->p;
    Py_ssize_t n = c->len;
    if (n == 0 || s[0] >= 0x80)
        return put_value(b, CODE_PYTHON, conv, c, NULL);
    if (!is_digit(s[0]) || ends_with_bc(s, n))
        return put_string(b, s, n);
    long long days;
    if (!parse_date(s, n, &days))
        return put_value(b, CODE_PYTHON, conv, c, NULL);
    return put_int64(b, days);
}

static int put_time(Buf *b, PyObject *conv, const Col *c) {
    long long h, m, sec, frac;
    if (!parse_clock(c->p, c->len, &h, &m, &sec, &frac))
        return put_value(b, CODE_PYTHON, conv, c, NULL);
    return put_int64(b, ((h * 60 + m) * 60 + sec) * 1000000LL + frac);
}

static int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* \x followed by pairs of hex digits -> its bytes in base64 (types.to_bytea) */
static int put_bytea(Buf *b, PyObject *conv, const Col *c) {
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const unsigned char *s = c->p;
    Py_ssize_t n = c->len;
    if (n < 2 || s[0] != '\\' || s[1] != 'x' || (n - 2) % 2 != 0)
        return put_value(b, CODE_PYTHON, conv, c, NULL);
    Py_ssize_t bytes = (n - 2) / 2;
    for (Py_ssize_t i = 2; i < n; i++)
        if (hex_value(s[i]) < 0)
            return put_value(b, CODE_PYTHON, conv, c, NULL);
    if (buf_grow(b, (bytes + 2) / 3 * 4 + 2) < 0)
        return -1;
    char *out = b->data + b->len;
    *out++ = '"';
    const unsigned char *h = s + 2;
    Py_ssize_t i = 0;
    for (; i + 3 <= bytes; i += 3, h += 6) {
        unsigned v = (unsigned)(hex_value(h[0]) << 20 | hex_value(h[1]) << 16 | hex_value(h[2]) << 12 |
                                hex_value(h[3]) << 8 | hex_value(h[4]) << 4 | hex_value(h[5]));
        *out++ = alphabet[v >> 18];
        *out++ = alphabet[(v >> 12) & 63];
        *out++ = alphabet[(v >> 6) & 63];
        *out++ = alphabet[v & 63];
    }
    if (bytes - i == 1) {
        unsigned v = (unsigned)(hex_value(h[0]) << 4 | hex_value(h[1]));
        *out++ = alphabet[v >> 2];
        *out++ = alphabet[(v & 3) << 4];
        *out++ = '=';
        *out++ = '=';
    } else if (bytes - i == 2) {
        unsigned v = (unsigned)(hex_value(h[0]) << 12 | hex_value(h[1]) << 8 | hex_value(h[2]) << 4 | hex_value(h[3]));
        *out++ = alphabet[v >> 10];
        *out++ = alphabet[(v >> 4) & 63];
        *out++ = alphabet[(v & 15) << 2];
        *out++ = '=';
    }
    *out++ = '"';
    b->len = out - b->data;
    return 0;
}

/* -?\d+ at s[*i] (at most 15 digits) followed by the letter want: 1 with *value and *i past the letter;
 * 0: not this part (nothing consumed); -1: not a form this code reads (the converter decides). */
static int interval_part(const unsigned char *s, Py_ssize_t n, Py_ssize_t *i, char want, long long *value) {
    Py_ssize_t j = *i, start;
    int negative = 0;
    if (j < n && s[j] == '-') {
        negative = 1;
        j++;
    }
    start = j;
    while (j < n && is_digit(s[j]))
        j++;
    if (j == start)
        return 0;
    if (j - start > 15)
        return -1;
    if (j >= n || s[j] != want)
        return 0;
    long long v = 0;
    digits(s + start, j - start, &v);
    *value = negative ? -v : v;
    *i = j + 1;
    return 1;
}

/* formats.dbz_interval: the same double arithmetic, in the same order. */
static int put_interval(Buf *b, PyObject *conv, const Col *c) {
    const unsigned char *s = c->p;
    Py_ssize_t n = c->len, i = 1;
    long long y = 0, mo = 0, d = 0, h = 0, mi = 0;
    double sec = 0.0;
    if (n < 2 || s[0] != 'P')
        return put_value(b, CODE_PYTHON, conv, c, NULL);
    long long *date_parts[] = {&y, &mo, &d};
    const char date_letters[] = "YMD";
    for (int k = 0; k < 3; k++)
        if (interval_part(s, n, &i, date_letters[k], date_parts[k]) < 0)
            return put_value(b, CODE_PYTHON, conv, c, NULL);
    if (i < n && s[i] == 'T') {
        i++;
        long long *time_parts[] = {&h, &mi};
        const char time_letters[] = "HM";
        for (int k = 0; k < 2; k++)
            if (interval_part(s, n, &i, time_letters[k], time_parts[k]) < 0)
                return put_value(b, CODE_PYTHON, conv, c, NULL);
        /* -?\d+(\.\d+)?S */
        Py_ssize_t j = i;
        if (j < n && s[j] == '-')
            j++;
        Py_ssize_t whole = j;
        while (j < n && is_digit(s[j]))
            j++;
        if (j > whole) {
            if (j < n && s[j] == '.') {
                Py_ssize_t frac = ++j;
                while (j < n && is_digit(s[j]))
                    j++;
                if (j == frac)
                    return put_value(b, CODE_PYTHON, conv, c, NULL);
            }
            if (j >= n || s[j] != 'S' || j - i > 40)
                return put_value(b, CODE_PYTHON, conv, c, NULL);
            char text[48];
            memcpy(text, s + i, (size_t)(j - i));
            text[j - i] = 0;
            sec = strtod(text, NULL);
            i = j + 1;
        }
    }
    if (i != n)
        return put_value(b, CODE_PYTHON, conv, c, NULL);
    long long months = y * 12 + mo;
    double days = (double)months * 30.4375 + (double)d;
    double seconds = ((days * 24 + (double)h) * 60 + (double)mi) * 60 + sec;
    double micros = seconds * 1e6;
    if (!(micros > -9.2e18 && micros < 9.2e18))
        return put_value(b, CODE_PYTHON, conv, c, NULL);
    return put_int64(b, (long long)micros);
}

/* formats.dbz_timetz: HH:MM:SS(.f+)?[+-]HH(:?MM)?(:?SS)? -> the time in UTC, the fraction without its
 * trailing zeros, and a Z. */
static int put_timetz(Buf *b, PyObject *conv, const Col *c) {
    const unsigned char *s = c->p;
    Py_ssize_t n = c->len, i = 8;
    long long h, m, sec, oh, om = 0, os = 0;
    if (n < 11 || s[2] != ':' || s[5] != ':' || !digits(s, 2, &h) || !digits(s + 3, 2, &m) || !digits(s + 6, 2, &sec))
        return put_value(b, CODE_PYTHON, conv, c, NULL);
    const unsigned char *frac = s + 8;
    Py_ssize_t nfrac = 0;
    if (s[i] == '.') {
        i++;
        while (i < n && is_digit(s[i]))
            i++;
        nfrac = i - 8;
        if (nfrac < 2)
            return put_value(b, CODE_PYTHON, conv, c, NULL);
    }
    if (i + 3 > n || (s[i] != '+' && s[i] != '-') || !digits(s + i + 1, 2, &oh))
        return put_value(b, CODE_PYTHON, conv, c, NULL);
    int plus = s[i] == '+';
    i += 3;
    long long *rest[] = {&om, &os};
    for (int k = 0; k < 2 && i < n; k++) {
        if (s[i] == ':')
            i++;
        if (i + 2 > n || !digits(s + i, 2, rest[k]))
            return put_value(b, CODE_PYTHON, conv, c, NULL);
        i += 2;
    }
    if (i != n)
        return put_value(b, CODE_PYTHON, conv, c, NULL);
    long long offset = (plus ? oh : -oh) * 3600 + (plus ? 1 : -1) * (om * 60 + os);
    long long total = (h * 3600 + m * 60 + sec - offset) % 86400;
    if (total < 0)
        total += 86400;
    while (nfrac > 0 && frac[nfrac - 1] == '0')
        nfrac--;
    if (nfrac == 1)
        nfrac = 0; /* only the '.' was left */
    char text[16];
    int len = snprintf(text, sizeof text, "\"%02lld:%02lld:%02lld", total / 3600, total / 60 % 60, total % 60);
    if (put(b, text, len) < 0 || put(b, (const char *)frac, nfrac) < 0)
        return -1;
    return PUTS(b, "Z\"");
}

static int put_dbz_value(Buf *b, long code, PyObject *conv, const Col *c) {
    const unsigned char *s = c->p;
    Py_ssize_t n = c->len;
    switch (code) {
    case DBZ_NUMERIC:
        if (n == 3 && memcmp(s, "NaN", 3) == 0)
            return PUTS(b, "\"NAN\"");
        return put_string(b, s, n);
    case DBZ_MICRO_TS:
    case DBZ_MILLI_TS:
        return put_timestamp(b, code, conv, c);
    case DBZ_DATE:
        return put_date(b, conv, c);
    case DBZ_TIME:
        return put_time(b, conv, c);
    case DBZ_BYTEA:
        return put_bytea(b, conv, c);
    case DBZ_BIT1:
        if (n == 1 && s[0] == '1')
            return PUTS(b, "true");
        return PUTS(b, "false");
    case DBZ_INTERVAL:
        return put_interval(b, conv, c);
    case DBZ_TIMETZ:
        return put_timetz(b, conv, c);
    case CODE_TEXT:
    case CODE_INT:
    case CODE_BOOL:
    case CODE_TIMESTAMPTZ:
    case CODE_ARRAY_TEXT:
    case CODE_ARRAY_INT:
        return put_value(b, code, conv, c, NULL);
    default:
        return put_value(b, CODE_PYTHON, conv, c, NULL);
    }
}

/* Where each column's value was written (for the key): offset and length in the buffer. */
typedef struct {
    Py_ssize_t at, len;
} Span;

/* Every column, converted; an unchanged TOASTed one as its placeholder (formats.Debezium.row). */
static int put_row(Buf *b, PyObject *columns, const Col *cols, Py_ssize_t count, Span *spans, const Hmac *hmac) {
    if (count != PyTuple_GET_SIZE(columns))
        return FALLBACK; /* a short tuple: the Python path */
    if (PUTS(b, "{") < 0)
        return -1;
    int first = 1;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *entry = PyTuple_GET_ITEM(columns, i);
        PyObject *prefix = PyTuple_GET_ITEM(entry, 0);
        long code = PyLong_AsLong(PyTuple_GET_ITEM(entry, 1));
        if (code == CODE_DROP) /* a transform leaves it out */
            continue;
        if ((!first && PUTS(b, ",") < 0) || put(b, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix)) < 0)
            return -1;
        first = 0;
        Py_ssize_t at = b->len;
        int rc;
        if (cols[i].kind == 'n' || (cols[i].kind == 't' && code == CODE_NULLED)) {
            rc = PUTS(b, "null");
        } else if (cols[i].kind == 'u') {
            PyObject *placeholder = PyTuple_GET_ITEM(entry, 3);
            rc = put(b, PyBytes_AS_STRING(placeholder), PyBytes_GET_SIZE(placeholder));
        } else if (code == CODE_HASH) { /* the masks of listener.transforms: a string whatever the type */
            char hex[64];
            hmac_hex(hmac, cols[i].p, (size_t)cols[i].len, hex);
            rc = PUTS(b, "\"") < 0 || put(b, hex, 64) < 0 || PUTS(b, "\"") < 0 ? -1 : 0;
        } else if (code == CODE_REDACT) {
            rc = PUTS(b, "\"[redacted]\"");
        } else {
            rc = put_dbz_value(b, code, PyTuple_GET_ITEM(entry, 2), &cols[i]);
        }
        if (rc != 0)
            return rc;
        if (spans != NULL) {
            spans[i].at = at;
            spans[i].len = b->len - at;
        }
    }
    return PUTS(b, "}");
}

/* {"name": value, ...} of the key's columns, their values as the row has them (formats.Debezium.key). */
static PyObject *make_key(PyObject *plan, const Buf *body, const Span *spans) {
    PyObject *columns = PyTuple_GET_ITEM(plan, 3), *key_index = PyTuple_GET_ITEM(plan, 4);
    PyObject *head = PyTuple_GET_ITEM(plan, 6);
    Buf b = {NULL, 0, 0};
    PyObject *result = NULL;
    if (head != Py_None && put(&b, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head)) < 0)
        goto done;
    if (PUTS(&b, "{") < 0)
        goto done;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(key_index); k++) {
        Py_ssize_t i = PyLong_AsSsize_t(PyTuple_GET_ITEM(key_index, k));
        PyObject *prefix = PyTuple_GET_ITEM(PyTuple_GET_ITEM(columns, i), 0);
        if ((k > 0 && PUTS(&b, ",") < 0) || put(&b, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix)) < 0 ||
            put(&b, body->data + spans[i].at, spans[i].len) < 0)
            goto done;
    }
    if (PUTS(&b, "}") < 0 || (head != Py_None && PUTS(&b, "}") < 0))
        goto done;
    result = PyBytes_FromStringAndSize(b.data, b.len);
done:
    PyMem_Free(b.data);
    return result;
}

/* The plans check_plan() accepted last (strong references): a plan is a tuple of immutable parts, so one
 * checked stays valid; the events of a table come with the same plan object each time. */
#define CHECKED_PLANS 8
static PyObject *checked_plans[CHECKED_PLANS];
static int checked_next = 0;

static int check_plan_parts(PyObject *plan);

static int check_plan(PyObject *plan) {
    for (int k = 0; k < CHECKED_PLANS; k++)
        if (checked_plans[k] == plan)
            return 0;
    if (check_plan_parts(plan) < 0)
        return -1;
    Py_XSETREF(checked_plans[checked_next], Py_NewRef(plan));
    checked_next = (checked_next + 1) % CHECKED_PLANS;
    return 0;
}

static int check_plan_parts(PyObject *plan) {
    if (!PyTuple_Check(plan) || PyTuple_GET_SIZE(plan) != DBZ_PLAN_SIZE)
        goto bad;
    for (int k = 0; k < 8; k += k == 2 ? 5 : 1) /* 0-2 and 7 */
        if (!PyBytes_Check(PyTuple_GET_ITEM(plan, k)))
            goto bad;
    PyObject *columns = PyTuple_GET_ITEM(plan, 3), *key_index = PyTuple_GET_ITEM(plan, 4);
    if (!PyTuple_Check(columns) || !PyTuple_Check(key_index))
        goto bad;
    for (int k = 5; k < 7; k++) {
        PyObject *head = PyTuple_GET_ITEM(plan, k);
        if (head != Py_None && !PyBytes_Check(head))
            goto bad;
    }
    Py_ssize_t ncolumns = PyTuple_GET_SIZE(columns);
    for (Py_ssize_t i = 0; i < ncolumns; i++) {
        PyObject *entry = PyTuple_GET_ITEM(columns, i);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 4 || !PyBytes_Check(PyTuple_GET_ITEM(entry, 0)) ||
            !PyLong_Check(PyTuple_GET_ITEM(entry, 1)) || !PyBytes_Check(PyTuple_GET_ITEM(entry, 3)))
            goto bad;
    }
    PyObject *hmac = PyTuple_GET_ITEM(plan, 8);
    if (hmac != Py_None && (!PyBytes_Check(hmac) || PyBytes_GET_SIZE(hmac) != (Py_ssize_t)sizeof(Hmac)))
        goto bad;
    for (Py_ssize_t i = 0; i < ncolumns; i++)
        if (hmac == Py_None && PyLong_AsLong(PyTuple_GET_ITEM(PyTuple_GET_ITEM(columns, i), 1)) == CODE_HASH)
            goto bad;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(key_index); k++) {
        PyObject *at = PyTuple_GET_ITEM(key_index, k);
        Py_ssize_t i = PyLong_Check(at) ? PyLong_AsSsize_t(at) : -1;
        if (i < 0 || i >= ncolumns) {
            PyErr_Clear();
            goto bad;
        }
    }
    return 0;
bad:
    PyErr_SetString(PyExc_TypeError, "debezium_event: plan is (bytes, bytes, bytes, columns: tuple of "
                                     "(bytes, int, converter, bytes), key_index, bytes | None, bytes | None, bytes, hmac | None, "
                                     "route plan | None)");
    return -1;
}

/* PyLong_AsUnsignedLongLong / PyLong_AsLongLong, without their detour through a byte array for numbers of
 * more than one digit (CPython 3.11) where a long is 64 bits: the same values and the same errors. */
#if LONG_MAX == LLONG_MAX
static unsigned long long as_u64(PyObject *v) {
    return PyLong_AsUnsignedLong(v);
}
static long long as_i64(PyObject *v) {
    return PyLong_AsLong(v);
}
#else
#define as_u64 PyLong_AsUnsignedLongLong
#define as_i64 PyLong_AsLongLong
#endif

/* An int or None argument: 1 with *value, 0 for None, -1 when it is neither a non-negative 64-bit int
 * (a ValueError/TypeError is set). */
static int optional_u64(PyObject *arg, unsigned long long *value) {
    if (arg == Py_None)
        return 0;
    if (!PyLong_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "debezium_event: xid, lsn and last_commit are int or None");
        return -1;
    }
    *value = as_u64(arg);
    if (*value == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    return 1;
}

/* a 64-bit unsigned number's text, or null */
typedef struct {
    char text[24];
    const char *start;
    Py_ssize_t len;
} Optional;

static void optional_text(Optional *o, int present, unsigned long long v) {
    if (!present) {
        o->start = "null";
        o->len = 4;
        return;
    }
    o->start = uint64_digits(v, o->text + sizeof o->text);
    o->len = o->text + sizeof o->text - o->start;
}

static int put_optional(Buf *b, const Optional *o) {
    return put(b, o->start, o->len);
}

/* sequence: the JSON text ["<last commit>","<lsn>"] as a JSON string */
static int put_sequence_part(Buf *b, const Optional *o) {
    if (o->start[0] == 'n')
        return PUTS(b, "null");
    if (PUTS(b, "\\\"") < 0 || put(b, o->start, o->len) < 0)
        return -1;
    return PUTS(b, "\\\"");
}

/* The event's buffer, kept from one event to the next (one allocation less per event). */
#define SCRATCH_KEPT (1 << 20)
static char *scratch = NULL;
static Py_ssize_t scratch_cap = 0;
static int scratch_busy = 0;

/* the commit time of the last transaction seen, as text (every change of a transaction shares it) */
static Number commit_number = {0, {0}, NULL, 0};

/* What a change's source block and times say beyond its table (the arguments of the call, checked). */
typedef struct {
    long long commit_us, now_ns;
    int has_xid, has_lsn, has_last;
    unsigned long long xid, lsn, last;
    PyObject *db; /* the plan's part from "snapshot" to the sequence (a change's or a READ's) */
    Hmac hmac;    /* a transform's hash key, prepared (hmac_prepare), when a column is hashed */
} Source;

/* A transform's topic route: the default format's plan of the table (hotpath.plan), whose route and
 * columns route_topic() reads (transforms.c). 1 with *route read, 0 no route, -1 an error. */
static int read_route(const char *name, PyObject *plan, Plan *route) {
    PyObject *shaped = PyTuple_GET_ITEM(plan, 9);
    if (shaped == Py_None)
        return 0;
    if (!PyTuple_Check(shaped) || PyTuple_GET_SIZE(shaped) != 4 || !PyTuple_Check(PyTuple_GET_ITEM(shaped, 1)) ||
        PyTuple_GET_SIZE(PyTuple_GET_ITEM(shaped, 1)) != PyTuple_GET_SIZE(PyTuple_GET_ITEM(plan, 3))) {
        PyErr_Format(PyExc_TypeError, "%s: the route's plan is the table's hotpath.plan", name);
        return -1;
    }
    route->schema_table = PyTuple_GET_ITEM(shaped, 0);
    route->columns = PyTuple_GET_ITEM(shaped, 1);
    route->key_index = PyTuple_GET_ITEM(shaped, 2);
    route->ncolumns = PyTuple_GET_SIZE(route->columns);
    for (Py_ssize_t i = 0; i < route->ncolumns; i++) {
        PyObject *entry = PyTuple_GET_ITEM(route->columns, i);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 4 || !PyLong_Check(PyTuple_GET_ITEM(entry, 1))) {
            PyErr_Format(PyExc_TypeError, "%s: a route plan's column is (bytes, int, converter, bool)", name);
            return -1;
        }
    }
    route->masked = 0;
    route->route = NULL;
    if (PyTuple_GET_ITEM(shaped, 3) == Py_None || read_transform(name, PyTuple_GET_ITEM(shaped, 3), route) < 0 ||
        route->route == NULL) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_TypeError, "%s: the route's plan has no route", name);
        return -1;
    }
    return 1;
}

static void source_hmac(Source *src, PyObject *plan) {
    PyObject *hmac = PyTuple_GET_ITEM(plan, 8);
    if (hmac != Py_None)
        memcpy(&src->hmac, PyBytes_AS_STRING(hmac), sizeof(Hmac));
}

/* freeze_clock(ns): the time a now_ns of None stands for (tests: as they fix time.time_ns); None: the clock */
static long long frozen_ns = -1;

PyObject *hot_freeze_clock(PyObject *self, PyObject *ns) {
    (void)self;
    long long value = ns == Py_None ? -1 : PyLong_AsLongLong(ns);
    if (value == -1 && PyErr_Occurred())
        return NULL;
    if (ns != Py_None && value < 0) {
        PyErr_SetString(PyExc_ValueError, "freeze_clock: a time in nanoseconds since the epoch, or None");
        return NULL;
    }
    frozen_ns = value;
    Py_RETURN_NONE;
}

/* time.time_ns(): the real-time clock in nanoseconds since the epoch (-1: it failed) */
static long long clock_now_ns(void) {
    if (frozen_ns >= 0)
        return frozen_ns;
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return -1;
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* commit_micros, xid, lsn, last_commit, now_ns (None: now) as Python gives them: 1 read, 0 the Python path's to write
 * (a number out of range), -1 an error. */
static int read_source(Source *src, PyObject *commit_micros, PyObject *xid, PyObject *lsn, PyObject *last,
                       PyObject *now_ns) {
    long long micros = as_i64(commit_micros);
    src->now_ns = now_ns == Py_None ? clock_now_ns() : as_i64(now_ns);
    if ((micros == -1 || src->now_ns == -1) && PyErr_Occurred())
        return -1;
    src->has_xid = optional_u64(xid, &src->xid);
    src->has_lsn = optional_u64(lsn, &src->lsn);
    src->has_last = optional_u64(last, &src->last);
    if (src->has_xid < 0 || src->has_lsn < 0 || src->has_last < 0) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) { /* negative or past 64 bits: the Python path */
            PyErr_Clear();
            return 0;
        }
        return -1;
    }
    /* commit_us * 1000 (ts_ns) must stay a 64-bit number */
    if (micros > 9000000000000000LL - PG_EPOCH_US || micros < -9000000000000000LL - PG_EPOCH_US || src->now_ns < 0)
        return 0;
    src->commit_us = micros + PG_EPOCH_US;
    return 1;
}

/* The body and key of one change whose rows are decoded (before/after NULL: null): (body, key) | None (the
 * Python path takes it) | NULL (an error). spans: room for every column. */
static PyObject *build(PyObject *plan, const Source *src, char op, const Col *before, Py_ssize_t nbefore,
                       const Col *after, Py_ssize_t nafter, Span *spans, Py_ssize_t size_hint, int want_key) {
    PyObject *columns = PyTuple_GET_ITEM(plan, 3);
    PyObject *value_head = PyTuple_GET_ITEM(plan, 5);
    PyObject *result = NULL;
    Buf b = {NULL, 0, 0};
    int using_scratch = 0, rc;
    /* the schema (value_head, the same for every event of the table) is not written here: the body is what
     * follows it, the payload written here and the envelope's closing brace */
    Py_ssize_t want = size_hint * 2 + 1024;
    if (!scratch_busy) { /* the last event's buffer (a converter called from here could come back: then not) */
        scratch_busy = using_scratch = 1;
        b.data = scratch;
        b.cap = scratch_cap;
        if (buf_grow(&b, want) < 0)
            goto done;
    } else {
        b.cap = want;
        b.data = PyMem_Malloc((size_t)b.cap);
        if (b.data == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    if (PUTS(&b, "{\"before\":") < 0)
        goto done;
    rc = before == NULL ? PUTS(&b, "null")
                        : put_row(&b, columns, before, nbefore, after == NULL ? spans : NULL, &src->hmac);
    if (rc != 0)
        goto check;
    if (PUTS(&b, ",\"after\":") < 0)
        goto done;
    rc = after == NULL ? PUTS(&b, "null") : put_row(&b, columns, after, nafter, spans, &src->hmac);
    if (rc != 0)
        goto check;
    PyObject *head = PyTuple_GET_ITEM(plan, 0), *table = PyTuple_GET_ITEM(plan, 2);
    if (commit_number.start == NULL || commit_number.value != src->commit_us)
        number_text(&commit_number, src->commit_us);
    Number now;
    number_text(&now, src->now_ns);
    Optional xid_text, lsn_text, last_text;
    optional_text(&xid_text, src->has_xid, src->xid);
    optional_text(&lsn_text, src->has_lsn, src->lsn);
    optional_text(&last_text, src->has_last, src->last);
    if (put(&b, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head)) < 0 || put_divided(&b, &commit_number, 3, 1000) < 0 ||
        put(&b, PyBytes_AS_STRING(src->db), PyBytes_GET_SIZE(src->db)) < 0 || put_sequence_part(&b, &last_text) < 0 ||
        PUTS(&b, ",") < 0 || put_sequence_part(&b, &lsn_text) < 0 || PUTS(&b, "]\",\"ts_us\":") < 0 ||
        put(&b, commit_number.start, commit_number.len) < 0 || PUTS(&b, ",\"ts_ns\":") < 0 ||
        put_thousand_times(&b, &commit_number) < 0 || put(&b, PyBytes_AS_STRING(table), PyBytes_GET_SIZE(table)) < 0 ||
        put_optional(&b, &xid_text) < 0 || PUTS(&b, ",\"lsn\":") < 0 || put_optional(&b, &lsn_text) < 0 ||
        PUTS(&b, ",\"xmin\":null,\"origin\":null,\"origin_lsn\":null},\"transaction\":null,\"op\":\"") < 0 ||
        put(&b, &op, 1) < 0 || PUTS(&b, "\",\"ts_ms\":") < 0 || put_divided(&b, &now, 6, 1000000) < 0 ||
        PUTS(&b, ",\"ts_us\":") < 0 || put_divided(&b, &now, 3, 1000) < 0 || PUTS(&b, ",\"ts_ns\":") < 0 ||
        put(&b, now.start, now.len) < 0 || PUTS(&b, "}") < 0)
        goto done;
    PyObject *key = want_key && PyTuple_GET_SIZE(PyTuple_GET_ITEM(plan, 4)) ? make_key(plan, &b, spans)
                                                                            : Py_NewRef(Py_None);
    if (key == NULL)
        goto done;
    /* {"schema":...,"payload": (value_head, not copied) + the payload + } */
    if (value_head != Py_None && PUTS(&b, "}") < 0) {
        Py_DECREF(key);
        goto done;
    }
    PyObject *body = PyBytes_FromStringAndSize(b.data, b.len);
    if (body != NULL) {
        result = PyTuple_Pack(2, body, key);
        Py_DECREF(body);
    }
    Py_DECREF(key);
    goto done;
check:
    if (rc > 0)
        result = Py_NewRef(Py_None);
done:
    if (using_scratch) { /* kept for the next event unless a very wide row made it big */
        if (b.cap > SCRATCH_KEPT) {
            PyMem_Free(b.data);
            b.data = NULL;
            b.cap = 0;
        }
        scratch = b.data;
        scratch_cap = b.cap;
        scratch_busy = 0;
    } else {
        PyMem_Free(b.data);
    }
    return result;
}

PyObject *hot_debezium_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 10 && nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "debezium_event(msg, plan, prefix, number, commit_micros, xid, lsn, "
                                         "last_commit, now_ns, want_key[, shape])");
        return NULL;
    }
    PyObject *plan = args[1];
    if (check_plan(plan) < 0)
        return NULL;
    if (!PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "debezium_event: the id (prefix) is a str");
        return NULL;
    }
    Source src;
    src.db = PyTuple_GET_ITEM(plan, 1);
    source_hmac(&src, plan);
    Plan route;
    int routed = read_route("debezium_event", plan, &route);
    if (routed < 0)
        return NULL;
    MessageShape *shape = NULL;
    int shaped = nargs == 11 ? change_shape("debezium_event", args[10], &shape) : 0;
    if (shaped < 0)
        return NULL;
    if (shaped && routed) {
        PyErr_SetString(PyExc_ValueError, "debezium_event: a shape is for events without a topic route");
        return NULL;
    }
    int read = read_source(&src, args[4], args[5], args[6], args[7], args[8]);
    if (read <= 0)
        return read < 0 ? NULL : Py_NewRef(Py_None);
    int want_key = PyObject_IsTrue(args[9]);
    if (want_key < 0)
        return NULL;
    Py_ssize_t ncolumns = PyTuple_GET_SIZE(PyTuple_GET_ITEM(plan, 3));
    HeldChange h;
    int held = hold_change(&h, args[0], args[2], args[3], ncolumns);
    if (held < 0)
        return NULL;
    PyObject *result = NULL, *built = NULL;
    Span stack_spans[STACK_COLUMNS];
    Span *spans = stack_spans;
    if (held == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (ncolumns > STACK_COLUMNS) {
        spans = PyMem_Malloc(sizeof(Span) * (size_t)ncolumns);
        if (spans == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    const Change *c = &h.c;
    char op = c->tag == 'I' ? 'c' : c->tag == 'U' ? 'u' : 'd';
    /* an UPDATE's before: the old row only when it is complete (REPLICA IDENTITY FULL) */
    const Col *before = c->tag == 'D' || c->old_kind == 'O' ? c->old_cols : NULL;
    built = build(plan, &src, op, before, c->nold, c->new_cols, c->nnew, spans, h.view.len, want_key);
    if (built == NULL || built == Py_None) {
        result = built;
        goto done;
    }
    if (routed) {
        PyObject *topic = route_topic(&route, c->new_cols, c->nnew, c->old_cols, c->nold, c->old_kind);
        if (topic != NULL) {
            result = PyTuple_Pack(4, h.ident, PyTuple_GET_ITEM(built, 0), PyTuple_GET_ITEM(built, 1), topic);
            Py_DECREF(topic);
        }
    } else if (shaped) {
        result = shaped_message(shape, h.ident, PyTuple_GET_ITEM(built, 0), PyTuple_GET_ITEM(built, 1),
                                shape_action(shape, c->tag), NULL);
    } else {
        result = PyTuple_Pack(3, h.ident, PyTuple_GET_ITEM(built, 0), PyTuple_GET_ITEM(built, 1));
    }
    Py_DECREF(built);
done:
    if (spans != stack_spans)
        PyMem_Free(spans);
    release_change(&h);
    return result;
}

/* debezium_read_row(values, plan, read_micros, last_commit, now_ns, want_key) -> (body, key) | None
 *
 * A backfilled row as a READ event (op "r", snapshot "incremental", no txId or lsn): values holds each
 * column's text form as bytes (None for NULL) in the plan's column order; read_micros: when it was read
 * (protocol microseconds). */
PyObject *hot_debezium_read_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "debezium_read_row(values, plan, read_micros, last_commit, now_ns, want_key)");
        return NULL;
    }
    PyObject *values = args[0], *plan = args[1];
    if (check_plan(plan) < 0)
        return NULL;
    if (!PyList_Check(values)) {
        PyErr_SetString(PyExc_TypeError, "debezium_read_row: values must be a list");
        return NULL;
    }
    Source src;
    src.db = PyTuple_GET_ITEM(plan, 7);
    source_hmac(&src, plan);
    Plan route;
    int routed = read_route("debezium_read_row", plan, &route);
    if (routed < 0)
        return NULL;
    int read = read_source(&src, args[2], Py_None, Py_None, args[3], args[4]);
    if (read <= 0)
        return read < 0 ? NULL : Py_NewRef(Py_None);
    int want_key = PyObject_IsTrue(args[5]);
    if (want_key < 0)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(values);
    if (count != PyTuple_GET_SIZE(PyTuple_GET_ITEM(plan, 3)))
        return Py_NewRef(Py_None);
    Col stack[STACK_COLUMNS];
    Span stack_spans[STACK_COLUMNS];
    Col *cols = stack;
    Span *spans = stack_spans;
    void *heap = NULL;
    if (count > STACK_COLUMNS) {
        heap = PyMem_Malloc((sizeof(Col) + sizeof(Span)) * (size_t)count);
        if (heap == NULL)
            return PyErr_NoMemory();
        cols = heap;
        spans = (Span *)(cols + count);
    }
    PyObject *result = NULL;
    Py_ssize_t size = 0;
    int valid = read_values("debezium_read_row", values, cols, &size);
    if (valid <= 0) {
        result = valid < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    result = build(plan, &src, 'r', NULL, 0, cols, count, spans, size, want_key);
    if (routed && result != NULL && result != Py_None) {
        PyObject *topic = route_topic(&route, cols, count, NULL, 0, 0);
        PyObject *built = result;
        result = topic == NULL ? NULL : PyTuple_Pack(3, PyTuple_GET_ITEM(built, 0), PyTuple_GET_ITEM(built, 1), topic);
        Py_XDECREF(topic);
        Py_DECREF(built);
    }
done:
    PyMem_Free(heap);
    return result;
}
