/* CloudEvents 1.0 around the default event (publisher.format cloudevents), in the same call as the event:
 * structured mode writes the envelope around the body, binary mode answers the attributes' headers.
 * Python twin: listener/formats.py (CloudEvents: its head per table and action, __call__).
 *
 * ce = (heads, id_name, time_name, check_id), built once per relation by CloudEvents.compiled():
 *   heads: per action (INSERT, UPDATE, DELETE, READ) what CloudEvents._head gives -- structured mode: the
 *   envelope's JSON up to the id, as bytes; binary mode: the constant attributes' headers, a dict, followed by
 *   the id's and the time's (empty: the copy of each event replaces them, no insertion, no resize).
 *   id_name, time_name: binary mode: the id's and the time's header names (None in structured mode).
 *   check_id: the binding percent-encodes header values: an id that would need it goes to the Python path.
 * A binding that takes header lines (NATS, formats.Binding.lines): heads are the constant attributes' lines as
 * bytes, id_name and time_name what comes before the id and the time ("ce-id: ", "\r\nce-time: "); the answer is
 * then those lines as bytes, the id's and the time's last (an id or time that is not plain: the Python path).
 */
#include "hotpath.h"

int read_ce(const char *name, PyObject *ce, int action, Ce *out) {
    if (!PyTuple_Check(ce) || PyTuple_GET_SIZE(ce) != 4 || !PyTuple_Check(PyTuple_GET_ITEM(ce, 0)) ||
        PyTuple_GET_SIZE(PyTuple_GET_ITEM(ce, 0)) != 4) {
        PyErr_Format(PyExc_TypeError, "%s: ce must be (heads: 4-tuple, id_name, time_name, check_id)", name);
        return -1;
    }
    out->head = PyTuple_GET_ITEM(PyTuple_GET_ITEM(ce, 0), action);
    out->id_name = PyTuple_GET_ITEM(ce, 1);
    out->time_name = PyTuple_GET_ITEM(ce, 2);
    out->check_id = PyTuple_GET_ITEM(ce, 3) == Py_True;
    out->structured = out->id_name == Py_None;
    out->lines = !out->structured && PyBytes_Check(out->head);
    if (out->structured ? !PyBytes_Check(out->head)
                        : (!out->lines && !PyDict_CheckExact(out->head)) || !PyUnicode_IS_ASCII(out->id_name) ||
                              !PyUnicode_IS_ASCII(out->time_name)) {
        PyErr_Format(PyExc_TypeError, "%s: ce heads are bytes (structured) or dicts with the header names", name);
        return -1;
    }
    return 0;
}

/* text's UTF-8 as it is (the Python twin encodes it, no JSON escaping). */
static int put_raw(Buf *b, PyObject *text) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(text, &n);
    return s == NULL ? -1 : put(b, s, n);
}

int ce_open(Buf *b, const Ce *ce, PyObject *ident, PyObject *time) {
    if (!ce->structured)
        return 0;
    if (put(b, PyBytes_AS_STRING(ce->head), PyBytes_GET_SIZE(ce->head)) < 0 || PUTS(b, ",\"id\":\"") < 0 ||
        put_raw(b, ident) < 0 || PUTS(b, "\",\"time\":\"") < 0 || put_raw(b, time) < 0 ||
        PUTS(b, "\",\"data\":") < 0)
        return -1;
    return 0;
}

int ce_close(Buf *b, const Ce *ce) { return ce->structured ? PUTS(b, "}") : 0; }

/* What formats.header_value leaves as it is under a percent-encoding binding: printable ASCII but space, '"', '%'. */
static unsigned char plain_chars[256];

static int plain_attribute(PyObject *text) {
    if (!PyUnicode_IS_ASCII(text))
        return 0;
    if (!plain_chars['!'])
        for (int c = 0x21; c <= 0x7E; c++)
            plain_chars[c] = c != '"' && c != '%';
    const Py_UCS1 *s = PyUnicode_1BYTE_DATA(text);
    unsigned char plain = 1;
    for (Py_ssize_t i = 0, n = PyUnicode_GET_LENGTH(text); i < n; i++)
        plain &= plain_chars[s[i]];
    return plain;
}

int ce_headers(const Ce *ce, PyObject *ident, PyObject *time, PyObject **headers) {
    if (ce->structured) {
        *headers = Py_NewRef(Py_None);
        return 0;
    }
    if (ce->check_id && !plain_attribute(ident))
        return FALLBACK;
    if (ce->lines) {
        Py_ssize_t time_len = PyUnicode_GET_LENGTH(time);
        if (!PyUnicode_IS_ASCII(time) || !PyUnicode_IS_ASCII(ident) || time_len == 0)
            return FALLBACK;
        const Py_UCS1 *t = PyUnicode_1BYTE_DATA(time);
        if (!visible_ascii(t, time_len))
            return FALLBACK; /* the Python path writes what nats-py would of it */
        Py_ssize_t head_len = PyBytes_GET_SIZE(ce->head), id_len = PyUnicode_GET_LENGTH(ident);
        Py_ssize_t id_name_len = PyUnicode_GET_LENGTH(ce->id_name), time_name_len = PyUnicode_GET_LENGTH(ce->time_name);
        PyObject *lines = PyBytes_FromStringAndSize(NULL, head_len + id_name_len + id_len + time_name_len + time_len + 2);
        if (lines == NULL)
            return -1;
        char *out = PyBytes_AS_STRING(lines);
        memcpy(out, PyBytes_AS_STRING(ce->head), (size_t)head_len);
        out += head_len;
        memcpy(out, PyUnicode_1BYTE_DATA(ce->id_name), (size_t)id_name_len);
        out += id_name_len;
        memcpy(out, PyUnicode_1BYTE_DATA(ident), (size_t)id_len);
        out += id_len;
        memcpy(out, PyUnicode_1BYTE_DATA(ce->time_name), (size_t)time_name_len);
        out += time_name_len;
        memcpy(out, t, (size_t)time_len);
        out[time_len] = '\r';
        out[time_len + 1] = '\n';
        *headers = lines;
        return 0;
    }
    PyObject *d = PyDict_Copy(ce->head);
    if (d == NULL || PyDict_SetItem(d, ce->id_name, ident) < 0 || PyDict_SetItem(d, ce->time_name, time) < 0) {
        Py_XDECREF(d);
        return -1;
    }
    *headers = d;
    return 0;
}
