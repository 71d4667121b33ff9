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
 * And the replication reader's: copy_batch(pgconn_ptr, limit, starts) takes up to limit buffered
 * CopyData messages off libpq at once (PQgetCopyData through the connection pointer psycopg exposes,
 * with the function pointers of the libpq psycopg loaded, given once by set_libpq).
 *
 * plan = (schema_table: bytes, columns: tuple, key_index: tuple[int, ...])
 *   schema_table: '"schema":"...","table":"..."' already JSON-encoded
 *   columns: one (prefix: bytes, code: int, converter, is_identity: bool) per column, where prefix
 *   is '"name":' JSON-encoded and code says how the value is written (the CODE_* values below).
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
};

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

static int put_value(Buf *b, long code, PyObject *conv, const Col *c) {
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
    default:
        return put_converted(b, conv, c);
    }
}

static inline int is_identity(PyObject *columns, Py_ssize_t i) {
    return PyTuple_GET_ITEM(PyTuple_GET_ITEM(columns, i), 3) == Py_True;
}

/* One '"name":value' member, after a comma unless it is the first. */
static int put_member(Buf *b, PyObject *columns, Py_ssize_t i, const Col *c, int *first) {
    PyObject *entry = PyTuple_GET_ITEM(columns, i);
    PyObject *prefix = PyTuple_GET_ITEM(entry, 0);
    if (!*first && PUTS(b, ",") < 0)
        return -1;
    *first = 0;
    if (put(b, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix)) < 0)
        return -1;
    if (c->kind == 'n')
        return PUTS(b, "null");
    return put_value(b, PyLong_AsLong(PyTuple_GET_ITEM(entry, 1)), PyTuple_GET_ITEM(entry, 2), c);
}

/* The row as a JSON object; identity_only: only the replica-identity columns (an old 'K' tuple).
 * Unchanged TOAST columns are left out; when an old row is given (old_kind 'K' or 'O'), each of them
 * that the old row holds is added at the end, from there (the Python path's dict order). */
static int put_row(Buf *b, PyObject *columns, const Col *cols, Py_ssize_t count, int identity_only,
                   const Col *old, Py_ssize_t nold, char old_kind) {
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
        int rc = put_member(b, columns, i, &cols[i], &first);
        if (rc != 0)
            return rc;
    }
    if (unchanged && old != NULL) {
        if (nold != count)
            return FALLBACK;
        for (Py_ssize_t i = 0; i < count; i++) {
            if (cols[i].kind != 'u' || old[i].kind == 'u' || (old_kind == 'K' && !is_identity(columns, i)))
                continue;
            int rc = put_member(b, columns, i, &old[i], &first);
            if (rc != 0)
                return rc;
        }
    }
    return PUTS(b, "}");
}

/* The message key: the key columns' text, from ``primary`` or, where NULL there, from ``fallback``.
 * One column: its text as bytes; several: a JSON list of strings and nulls. New reference or None. */
static PyObject *make_key(PyObject *key_index, const Col *primary, Py_ssize_t nprimary, const Col *fallback,
                          Py_ssize_t nfallback) {
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
        if (nkey == 1) {
            if (c == NULL) {
                result = Py_NewRef(Py_None);
            } else {
                result = PyBytes_FromStringAndSize((const char *)c->p, c->len);
            }
            goto done;
        }
        if (k > 0 && PUTS(&b, ",") < 0)
            goto done;
        if (c == NULL ? PUTS(&b, "null") < 0 : put_string(&b, c->p, c->len) < 0)
            goto done;
    }
    if (PUTS(&b, "]") < 0)
        goto done;
    result = PyBytes_FromStringAndSize(b.data, b.len);
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

/* The plan of a relation, checked: (schema_table: bytes, columns: tuple of 4-tuples, key_index: tuple). */
typedef struct {
    PyObject *schema_table, *columns, *key_index;
    Py_ssize_t ncolumns;
} Plan;

static int read_plan(const char *name, PyObject *const *args, PyObject *ident, PyObject *time, Plan *plan) {
    PyObject *tuple = args[1];
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != 3 || !PyUnicode_Check(ident) || !PyUnicode_Check(time)) {
        PyErr_Format(PyExc_TypeError, "%s: plan must be a 3-tuple, the id (prefix) and time str", name);
        return -1;
    }
    plan->schema_table = PyTuple_GET_ITEM(tuple, 0);
    plan->columns = PyTuple_GET_ITEM(tuple, 1);
    plan->key_index = PyTuple_GET_ITEM(tuple, 2);
    if (!PyBytes_Check(plan->schema_table) || !PyTuple_Check(plan->columns) || !PyTuple_Check(plan->key_index)) {
        PyErr_Format(PyExc_TypeError, "%s: plan is (bytes, tuple, tuple)", name);
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
    return 0;
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
        rc = put_row(&b, plan->columns, new_cols, nnew, 0, old_cols, nold, old_kind);
    } else {
        rc = PUTS(&b, "{}");
    }
    if (rc != 0)
        goto check;
    if ((rc = PUTS(&b, ",\"dataOld\":")) != 0)
        goto check;
    if (old_cols != NULL) {
        rc = put_row(&b, plan->columns, old_cols, nold, old_kind == 'K', NULL, 0, 0);
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
        key = make_key(plan->key_index, old_cols, nold, NULL, 0);
    } else {
        key = make_key(plan->key_index, new_cols, nnew, old_cols, nold);
    }
    if (key == NULL)
        goto done;
    PyObject *body = PyBytes_FromStringAndSize(b.data, b.len);
    if (body == NULL) {
        Py_DECREF(key);
        goto done;
    }
    result = with_ident ? PyTuple_Pack(3, ident, body, key) : PyTuple_Pack(2, body, key);
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

/* copy_batch(pgconn_ptr, limit, starts) -> (payloads: list[bytes], wal_end: int, other: bytes | None, status)
 *
 * Up to limit XLogData ('w') messages already buffered by libpq: their payloads (the pgoutput message,
 * after the 25-byte header), the last non-zero WAL end they carried, and, when starts is a list, each
 * one's start LSN appended to it. It stops early at any other message (a keepalive), returned whole as
 * other, and when libpq has nothing more buffered. status: 1 more may be buffered, 0 nothing buffered
 * (wait for the socket), -1 the stream ended, -2 libpq reported an error. */
static PyObject *hot_copy_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "copy_batch(pgconn_ptr, limit, starts: list | None)");
        return NULL;
    }
    if (pq_getcopydata == NULL || pq_freemem == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "copy_batch: set_libpq() was not called");
        return NULL;
    }
    void *conn = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred())
        return NULL;
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
    while (PyList_GET_SIZE(payloads) < limit) {
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
     "event(msg, plan, prefix, number, commit_time, want_key) -> (ident, body, key) | None"},
    {"read_row", (PyCFunction)(void (*)(void))hot_read_row, METH_FASTCALL,
     "read_row(values, plan, ident, read_time, want_key) -> (body, key) | None"},
    {"nats_frames", (PyCFunction)(void (*)(void))hot_nats_frames, METH_FASTCALL,
     "nats_frames(batch, prefixes, seq, limit, header_bytes) -> (frames, payload) | None"},
    {"nats_acks", (PyCFunction)(void (*)(void))hot_nats_acks, METH_FASTCALL,
     "nats_acks(data, sid) -> (answers: seq or (seq text, payload), bytes consumed)"},
    {"set_encoder", hot_set_encoder, METH_O, "set_encoder(dumps): the JSON encoder for converted values"},
    {"set_libpq", (PyCFunction)(void (*)(void))hot_set_libpq, METH_FASTCALL,
     "set_libpq(getcopydata, freemem): addresses of PQgetCopyData and PQfreemem of psycopg's libpq"},
    {"copy_batch", (PyCFunction)(void (*)(void))hot_copy_batch, METH_FASTCALL,
     "copy_batch(pgconn_ptr, limit, starts) -> (payloads, wal_end, other, status)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "listener._hotpath",
    "Compiled fast path: a pgoutput change message -> the event's JSON body (see listener/hotpath.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__hotpath(void) {
    init_escapes();
    str_body = PyUnicode_InternFromString("body");
    str_id = PyUnicode_InternFromString("id");
    str_subject = PyUnicode_InternFromString("subject");
    str_headers = PyUnicode_InternFromString("headers");
    str_content_type = PyUnicode_InternFromString("content_type");
    if (str_body == NULL || str_id == NULL || str_subject == NULL || str_headers == NULL || str_content_type == NULL)
        return NULL;
    return PyModule_Create(&module);
}
