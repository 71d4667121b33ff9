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

/* The last topics rendered, by a hash of their bytes: a table routed by a column's value sends its events to few
 * topics, and each event that reuses its topic's str skips decoding one (and the publishers' dict lookups by
 * topic find its hash cached). Only ever a cache: a topic not found here is decoded as before. */
#define TOPIC_SETS 64
#define TOPIC_WAYS 4
static PyObject *topic_cache[TOPIC_SETS][TOPIC_WAYS];
static unsigned char topic_next[TOPIC_SETS]; /* the way a miss replaces next, in turn */

static PyObject *topic_str(const char *s, Py_ssize_t n) {
    uint32_t h = 2166136261u; /* FNV-1a, then mixed: its low bits alone put many names in one set */
    for (Py_ssize_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    h = (h ^ (h >> 16)) * 0x45d9f3bu;
    h ^= h >> 16;
    PyObject **set = topic_cache[h % TOPIC_SETS];
    for (int w = 0; w < TOPIC_WAYS && set[w] != NULL; w++) {
        Py_ssize_t size;
        const char *cached = PyUnicode_AsUTF8AndSize(set[w], &size);
        if (cached == NULL)
            PyErr_Clear();
        else if (size == n && memcmp(cached, s, (size_t)n) == 0)
            return Py_NewRef(set[w]);
    }
    PyObject *topic = PyUnicode_DecodeUTF8(s, n, "strict");
    if (topic != NULL) {
        unsigned char *next = &topic_next[h % TOPIC_SETS];
        Py_XSETREF(set[*next], Py_NewRef(topic));
        *next = (unsigned char)((*next + 1) % TOPIC_WAYS);
    }
    return topic;
}

/* The topic of an event from its plan's route: the rendered name (str) or the fallback reason (int).
 * Values come from the new row, else (an unchanged TOAST value, a DELETE) from the old one where it
 * holds them (all of a 'O' row, the identity of a 'K' key). */
PyObject *route_topic(const Plan *plan, const Col *new_cols, Py_ssize_t nnew, const Col *old_cols,
                             Py_ssize_t nold, char old_kind) {
    static const char digits[] = "0123456789abcdef";
    PyObject *head = PyTuple_GET_ITEM(plan->route, 0), *parts = PyTuple_GET_ITEM(plan->route, 1);
    char out[MAX_TOPIC_BYTES];
    Py_ssize_t len = PyBytes_GET_SIZE(head);
    long reason = 0;
    int too_long = len > MAX_TOPIC_BYTES; /* the name is written while it fits; the other reasons come first */
    if (!too_long)
        memcpy(out, PyBytes_AS_STRING(head), (size_t)len);
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(parts) && !reason; k++) {
        PyObject *part = PyTuple_GET_ITEM(parts, k);
        if (PyBytes_Check(part)) {
            Py_ssize_t n = PyBytes_GET_SIZE(part);
            too_long = too_long || n > MAX_TOPIC_BYTES - len;
            if (!too_long)
                memcpy(out + len, PyBytes_AS_STRING(part), (size_t)n);
            len += too_long ? 0 : n;
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
        Py_ssize_t n = 0;
        if (c == NULL) {
            reason = ROUTE_MISSING;
        } else if (!published_text(plan, i, c, hex, &text, &n)) {
            reason = ROUTE_NULL;
        } else if (n == 0) {
            reason = ROUTE_EMPTY;
        } else {
            for (Py_ssize_t j = 0; j < n && !too_long; j++) {
                unsigned char ch = text[j];
                if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || is_digit(ch) || ch == '-') {
                    too_long = len + 1 > MAX_TOPIC_BYTES;
                    if (!too_long)
                        out[len++] = (char)ch;
                } else {
                    too_long = len + 3 > MAX_TOPIC_BYTES;
                    if (!too_long) {
                        out[len++] = '_';
                        out[len++] = digits[ch >> 4];
                        out[len++] = digits[ch & 15];
                    }
                }
            }
        }
    }
    if (!reason && too_long)
        reason = ROUTE_TOO_LONG;
    return reason ? PyLong_FromLong(reason) : topic_str(out, len);
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
        if (hmac == Py_None && column_code(plan, i) == CODE_HASH) {
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
