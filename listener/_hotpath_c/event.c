/* The default event format: event() and read_row() write the body {id, schema, table, action, data, dataOld,
 * commitTime}, the message key and (with a route) the topic.
 * Python twin: listener/event.py (EventBuilder.row, the key), listener/hotpath.py (the plan).
 */
#include "hotpath.h"

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

int read_plan(const char *name, PyObject *const *args, PyObject *ident, PyObject *time, Plan *plan) {
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
 * with_ident | None (the Python path takes it) | NULL (an error). With ce (publisher.format cloudevents, else
 * NULL) the body is wrapped as ce says and the tuple always ends with the topic (None without a route) and
 * the binary mode's headers (None in structured mode). */
PyObject *build_event(PyObject *ident, int with_ident, PyObject *commit_time, const Plan *plan,
                             const char *action, const Col *new_cols, Py_ssize_t nnew, const Col *old_cols,
                             Py_ssize_t nold, char old_kind, int want_key, Py_ssize_t size_hint, const Ce *ce) {
    PyObject *result = NULL;
    Buf b = {NULL, 0, 0};
    int rc;
    b.cap = size_hint * 2 + 256 + (ce != NULL && ce->structured ? PyBytes_GET_SIZE(ce->head) + 128 : 0);
    b.data = PyMem_Malloc((size_t)b.cap);
    if (b.data == NULL)
        return PyErr_NoMemory();
    if (ce != NULL && ce_open(&b, ce, ident, commit_time) < 0)
        goto done;
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
    if (PUTS(&b, ",\"commitTime\":\"") < 0 || put_ascii_field(&b, commit_time) < 0 || PUTS(&b, "\"}") < 0 ||
        (ce != NULL && ce_close(&b, ce) < 0))
        goto done;
    PyObject *headers = NULL;
    if (ce != NULL && (rc = ce_headers(ce, ident, commit_time, &headers)) != 0)
        goto check;

    PyObject *key;
    if (!want_key) {
        key = Py_NewRef(Py_None);
    } else if (new_cols == NULL) {
        key = make_key(plan, old_cols, nold, NULL, 0);
    } else {
        key = make_key(plan, new_cols, nnew, old_cols, nold);
    }
    if (key == NULL) {
        Py_XDECREF(headers);
        goto done;
    }
    PyObject *body = PyBytes_FromStringAndSize(b.data, b.len);
    if (body == NULL) {
        Py_DECREF(key);
        Py_XDECREF(headers);
        goto done;
    }
    if (ce != NULL) {
        PyObject *topic = plan->route == NULL ? Py_NewRef(Py_None)
                                              : route_topic(plan, new_cols, nnew, old_cols, nold, old_kind);
        if (topic != NULL) {
            result = with_ident ? PyTuple_Pack(5, ident, body, key, topic, headers)
                                : PyTuple_Pack(4, body, key, topic, headers);
            Py_DECREF(topic);
        }
        Py_DECREF(headers);
    } else if (plan->route == NULL) {
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
PyObject *make_ident(PyObject *prefix, PyObject *number) {
    if (number == Py_None)
        return Py_NewRef(prefix);
    unsigned long long n = small_unsigned(number);
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

int hold_change(HeldChange *h, PyObject *msg, PyObject *prefix, PyObject *number, Py_ssize_t ncolumns) {
    h->heap = NULL;
    h->ident = make_ident(prefix, number);
    if (h->ident == NULL)
        return -1;
    if (PyObject_GetBuffer(msg, &h->view, PyBUF_SIMPLE) < 0) {
        Py_CLEAR(h->ident);
        return -1;
    }
    Col *spare_new = h->stack_new, *spare_old = h->stack_old;
    if (ncolumns > STACK_COLUMNS) {
        h->heap = PyMem_Malloc(sizeof(Col) * (size_t)ncolumns * 2);
        if (h->heap == NULL) {
            PyErr_NoMemory();
            release_change(h);
            return -1;
        }
        spare_new = h->heap;
        spare_old = h->heap + ncolumns;
    }
    return read_change(h->view.buf, h->view.len, ncolumns, spare_new, spare_old, &h->c) < 0 ? 0 : 1;
}

void release_change(HeldChange *h) {
    Py_CLEAR(h->ident);
    PyMem_Free(h->heap);
    h->heap = NULL;
    PyBuffer_Release(&h->view);
}

/* The shape given to event() or debezium_event() (None: none), its action a tuple of the three changes' (INSERT,
 * UPDATE, DELETE), read into *shape: 1, or 0 for None, -1 an error. The last shape read is kept (with a reference
 * to its tuple, whose items it borrows): the events of one table come one after the other. */
int change_shape(const char *name, PyObject *arg, MessageShape **shape) {
    static PyObject *last;
    static MessageShape read;
    if (arg == Py_None)
        return 0;
    if (arg != last) {
        Py_CLEAR(last);
        if (message_shape(arg, &read) < 0)
            return -1;
        PyObject *actions = read.shared[3];
        if (!PyTuple_Check(actions) || PyTuple_GET_SIZE(actions) != 3) {
            PyErr_Format(PyExc_TypeError, "%s: the shape's action is the tuple of INSERT, UPDATE and DELETE", name);
            return -1;
        }
        last = Py_NewRef(arg);
    }
    *shape = &read;
    return 1;
}

/* (ident, body, key) as the event of the shape for the change tagged tag ('I', 'U' or 'D') sent to subject (NULL:
 * the shape's); built released. */
PyObject *change_message(MessageShape *shape, char tag, PyObject *built, PyObject *subject) {
    if (built == NULL || built == Py_None)
        return built;
    PyObject *m = shaped_message(shape, PyTuple_GET_ITEM(built, 0), PyTuple_GET_ITEM(built, 1),
                                 PyTuple_GET_ITEM(built, 2), shape_action(shape, tag), subject);
    Py_DECREF(built);
    return m;
}

PyObject *hot_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs < 6 || nargs > 8) {
        PyErr_SetString(PyExc_TypeError, "event(msg, plan, prefix, number, commit_time, want_key[, ce[, shape]])");
        return NULL;
    }
    Plan plan;
    if (read_plan("event", args, args[2], args[4], &plan) < 0)
        return NULL;
    int want_key = PyObject_IsTrue(args[5]);
    if (want_key < 0)
        return NULL;
    PyObject *ce_arg = nargs >= 7 && args[6] != Py_None ? args[6] : NULL;
    MessageShape *shape = NULL;
    int shaped = nargs == 8 ? change_shape("event", args[7], &shape) : 0;
    if (shaped < 0)
        return NULL;
    if (shaped && (ce_arg != NULL || plan.route != NULL)) {
        PyErr_SetString(PyExc_ValueError, "event: a shape is for events without CloudEvents or a topic route");
        return NULL;
    }
    HeldChange h;
    int held = hold_change(&h, args[0], args[2], args[3], plan.ncolumns);
    if (held < 0)
        return NULL;
    PyObject *result = NULL;
    if (held == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    const Change *c = &h.c;
    const char *action = c->tag == 'I' ? "INSERT" : c->tag == 'U' ? "UPDATE" : "DELETE";
    Ce ce;
    if (ce_arg != NULL && read_ce("event", ce_arg, c->tag == 'I' ? 0 : c->tag == 'U' ? 1 : 2, &ce) < 0)
        goto done;
    result = build_event(h.ident, 1, args[4], &plan, action, c->new_cols, c->nnew, c->old_cols, c->nold, c->old_kind,
                         want_key, h.view.len, ce_arg != NULL ? &ce : NULL);
    if (shaped)
        result = change_message(shape, c->tag, result, NULL);
done:
    release_change(&h);
    return result;
}

/* read_row(values, plan, ident, read_time, want_key[, ce]) -> (body, key) | (body, key, topic, headers) | None
 *
 * A backfilled row: ``values`` holds each column's text form as bytes (None for NULL), in the plan's
 * column order, as pgoutput would send them in an Insert. The body is the INSERT's but for the action,
 * READ, so its data is byte for byte what the row's INSERT event carries. */
PyObject *hot_read_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5 && nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "read_row(values, plan, ident, read_time, want_key[, ce])");
        return NULL;
    }
    Ce ce;
    const Ce *wrap = NULL;
    if (nargs == 6 && args[5] != Py_None) {
        if (read_ce("read_row", args[5], 3, &ce) < 0)
            return NULL;
        wrap = &ce;
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
    int valid = read_values("read_row", values, cols, &size);
    if (valid <= 0) {
        result = valid < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    result = build_event(args[2], 0, args[3], &plan, "READ", cols, count, NULL, 0, 0, want_key, size, wrap);
done:
    if (cols != stack)
        PyMem_Free(cols);
    return result;
}
