/* A table's transform in the compiled path: its plan part, the masks of keys and topic values, the route.
 * Python twin: listener/transforms.py (RelationTransform.apply, the route's render).
 */
#include "hotpath.h"

/* The text column i is published as (a masked column's mask): 1 with *p and *n set, 0 when it is null. */
int published_text(const Plan *plan, Py_ssize_t i, const Col *c, char hex[64], const unsigned char **p,
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

/* The topic of an event from its plan's route: the rendered name (str) or the fallback reason (int).
 * Values come from the new row, else (an unchanged TOAST value, a DELETE) from the old one where it
 * holds them (all of a 'O' row, the identity of a 'K' key). */
PyObject *route_topic(const Plan *plan, const Col *new_cols, Py_ssize_t nnew, const Col *old_cols,
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

/* The transform part of a plan (hmac, route), checked; every column's code is looked at only here. */
int read_transform(const char *name, PyObject *transform, Plan *plan) {
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
