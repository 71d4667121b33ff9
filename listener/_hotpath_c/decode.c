/* pgoutput decoding: a change message's TupleData, strict UTF-8; and the replication reader (copy_batch).
 * Python twin: listener/pgoutput.py (decode, TupleData), listener/replication.py (psycopg's per-message read).
 */
#include "hotpath.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Strict UTF-8 as Python's decoder checks it: no overlong forms, no surrogates, nothing past U+10FFFF. */
int valid_utf8(const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n) {
#if defined(__SSE2__)
        while (i + 16 <= n && !_mm_movemask_epi8(_mm_loadu_si128((const __m128i *)(s + i))))
            i += 16; /* ASCII, 16 bytes at a time */
#endif
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

/* Decode TupleData at *pos into cols (room for max). Returns the column count, or -1 for anything the
 * fast path leaves alone. */
Py_ssize_t read_tuple(const unsigned char *s, Py_ssize_t n, Py_ssize_t *pos, Col *cols, Py_ssize_t max) {
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

/* An Insert, Update or Delete message s[0..n) of a table of ncolumns columns, its tuples read into
 * new_space and old_space (ncolumns each): 0, or -1 when it is not a change message this path reads (the
 * caller hands it to the Python path, which raises what is wrong). */
int read_change(const unsigned char *s, Py_ssize_t n, Py_ssize_t ncolumns, Col *new_space, Col *old_space, Change *c) {
    c->new_cols = c->old_cols = NULL;
    c->nnew = c->nold = 0;
    c->old_kind = 0;
    if (n < 6)
        return -1;
    Py_ssize_t pos = 6;
    unsigned char tag = s[0], marker = s[5];
    c->tag = tag;
    if (tag == 'U' && (marker == 'K' || marker == 'O')) {
        c->old_kind = (char)marker;
        c->old_cols = old_space;
        c->nold = read_tuple(s, n, &pos, old_space, ncolumns);
        if (c->nold < 0 || pos >= n)
            return -1;
        marker = s[pos++];
    }
    if (tag == 'I' || tag == 'U') {
        if (marker != 'N')
            return -1;
        c->new_cols = new_space;
        c->nnew = read_tuple(s, n, &pos, new_space, ncolumns);
        return c->nnew < 0 ? -1 : 0;
    }
    if (tag != 'D' || (marker != 'K' && marker != 'O'))
        return -1;
    c->old_kind = (char)marker;
    c->old_cols = old_space;
    c->nold = read_tuple(s, n, &pos, old_space, ncolumns);
    return c->nold < 0 ? -1 : 0;
}

/* A backfilled row's values (a list of each column's text form as bytes, None for NULL, as an Insert would
 * carry them) as columns; *size grows by about the JSON they make. 1, 0 when a value is no valid UTF-8 (the
 * Python path takes the row), -1 on an error (a value neither bytes nor None; who names the caller). */
int read_values(const char *who, PyObject *values, Col *cols, Py_ssize_t *size) {
    Py_ssize_t count = PyList_GET_SIZE(values);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(values, i);
        if (item == Py_None) {
            cols[i].kind = 'n';
            cols[i].p = NULL;
            cols[i].len = 0;
        } else if (PyBytes_Check(item)) {
            const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(item);
            Py_ssize_t len = PyBytes_GET_SIZE(item);
            if (!valid_utf8(p, len))
                return 0;
            cols[i].kind = 't';
            cols[i].p = p;
            cols[i].len = len;
            *size += len + 8;
        } else {
            PyErr_Format(PyExc_TypeError, "%s: a value is bytes or None", who);
            return -1;
        }
    }
    return 1;
}

/* ---------------------------------------------------------------------------------------------
 * The replication stream: many CopyData messages per call (twin: psycopg's per-message read in
 * listener/replication.py).
 */

typedef int (*getcopydata_fn)(void *conn, char **buffer, int async);
typedef void (*freemem_fn)(void *ptr);
static getcopydata_fn pq_getcopydata = NULL;
static freemem_fn pq_freemem = NULL;

PyObject *hot_set_libpq(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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
PyObject *hot_copy_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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
