/* Events as listener.message.Message objects, made without calling the class: its slots filled directly, and the
 * object left out of the cyclic collector. Python twin: the class itself (listener/message.py: the dataclass
 * __init__ of Message, HeadedMessage.__init__), which the caller uses when the shape is not given. */
#include "hotpath.h"

#include <structmember.h>

/* Where each member descriptor of fields (a tuple, in field order) keeps its value in instances of its class: how
 * many there are, or 0 when they are not writable object slots, fewer than least or more than MESSAGE_FIELDS. */
static Py_ssize_t slot_offsets(PyObject *fields, Py_ssize_t least, Py_ssize_t offsets[MESSAGE_FIELDS]) {
    if (!PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) < least || PyTuple_GET_SIZE(fields) > MESSAGE_FIELDS)
        return 0;
    Py_ssize_t n = PyTuple_GET_SIZE(fields);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *d = PyTuple_GET_ITEM(fields, i);
        if (!PyObject_TypeCheck(d, &PyMemberDescr_Type))
            return 0;
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != T_OBJECT_EX || (m->flags & READONLY))
            return 0;
        offsets[i] = m->offset;
    }
    return n;
}

int message_shape(PyObject *message, MessageShape *shape) {
    shape->cls = NULL;
    shape->n = 0;
    if (!PyTuple_Check(message) || PyTuple_GET_SIZE(message) != 7) {
        PyErr_SetString(PyExc_TypeError, "a message shape is (cls, subject, schema, table, action, fields, defaults)");
        return -1;
    }
    PyObject *cls = PyTuple_GET_ITEM(message, 0), *fields = PyTuple_GET_ITEM(message, 5),
             *defaults = PyTuple_GET_ITEM(message, 6);
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "a message shape's first item is the class");
        return -1;
    }
    shape->cls = (PyTypeObject *)cls;
    for (int i = 1; i <= 4; i++)
        shape->shared[i - 1] = PyTuple_GET_ITEM(message, i);
    Py_ssize_t n = PyTuple_Check(defaults) ? slot_offsets(fields, MESSAGE_SET + 1, shape->offsets) : 0;
    if (n == 0 || PyTuple_GET_SIZE(defaults) != n - MESSAGE_SET)
        return 0;
    /* the class, or a subclass of it that adds no slots (HeadedMessage): its instances have them at these offsets */
    PyTypeObject *owner = PyDescr_TYPE(PyTuple_GET_ITEM(fields, 0));
    if (!PyType_IsSubtype(shape->cls, owner) || shape->cls->tp_basicsize != owner->tp_basicsize)
        return 0;
    for (Py_ssize_t i = MESSAGE_SET; i < n; i++)
        shape->values[i] = PyTuple_GET_ITEM(defaults, i - MESSAGE_SET);
    shape->n = n;
    return 1;
}

PyObject *shaped_message(MessageShape *shape, PyObject *ident, PyObject *body, PyObject *key, PyObject *action,
                         PyObject *subject) {
    PyObject *schema = shape->shared[1], *table = shape->shared[2], *m;
    if (action == NULL)
        action = shape->shared[3];
    if (subject == NULL)
        subject = shape->shared[0];
    if (shape->n == 0) {
        PyObject *call[7] = {ident, subject, body, schema, table, action, key};
        m = PyObject_Vectorcall((PyObject *)shape->cls, call, 7, NULL);
    } else {
        PyObject **values = shape->values;
        values[0] = ident;
        values[1] = subject;
        values[2] = body;
        values[3] = schema;
        values[4] = table;
        values[5] = action;
        values[6] = key;
        m = shape->cls->tp_alloc(shape->cls, 0);
        for (Py_ssize_t i = 0; m != NULL && i < shape->n; i++)
            *(PyObject **)((char *)m + shape->offsets[i]) = Py_NewRef(values[i]);
    }
    /* A Message holds text, bytes and None: no cycle can pass through it. It lives until the broker acknowledged
     * it (a batch and those in flight: tens of thousands), and the cyclic collector would walk each of them
     * again at every collection of an older generation. */
    if (m != NULL && PyObject_GC_IsTracked(m))
        PyObject_GC_UnTrack(m);
    return m;
}

/* ---- change(): a change message of a compiled table straight to its Message (Python twin: EventBuilder.change) */

/* The fields of listener.event.Transaction change() reads (and, for ordinal, writes), by the member descriptors
 * transaction_fields() was given once. */
enum { TXN_ORDINAL, TXN_ID_PREFIX, TXN_ID_BASE, TXN_COMMIT_TIME, TXN_COMMIT_MICROS, TXN_XID, TXN_LSN, TXN_FIELDS };
static PyTypeObject *txn_type;
static Py_ssize_t txn_offsets[TXN_FIELDS];
static PyObject *str_last_commit, *str_tombstone, *str_key, *str_headers, *str_header_lines;

PyObject *hot_transaction_fields(PyObject *self, PyObject *fields) {
    (void)self;
    Py_ssize_t offsets[MESSAGE_FIELDS];
    if (!PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) != TXN_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "transaction_fields: the member descriptors of ordinal, id_prefix, id_base, "
                                         "commit_time, commit_micros, xid and lsn");
        return NULL;
    }
    if (slot_offsets(fields, TXN_FIELDS, offsets) != TXN_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "transaction_fields: each field a writable object slot");
        return NULL;
    }
    PyTypeObject *owner = PyDescr_TYPE(PyTuple_GET_ITEM(fields, 0));
    for (Py_ssize_t i = 1; i < TXN_FIELDS; i++)
        if (PyDescr_TYPE(PyTuple_GET_ITEM(fields, i)) != owner) {
            PyErr_SetString(PyExc_TypeError, "transaction_fields: member descriptors of one class's slots");
            return NULL;
        }
    if (str_last_commit == NULL && ((str_last_commit = PyUnicode_InternFromString("last_commit")) == NULL ||
                                    (str_tombstone = PyUnicode_InternFromString("tombstone")) == NULL ||
                                    (str_key = PyUnicode_InternFromString("key")) == NULL ||
                                    (str_headers = PyUnicode_InternFromString("headers")) == NULL ||
                                    (str_header_lines = PyUnicode_InternFromString("header_lines")) == NULL))
        return NULL;
    memcpy(txn_offsets, offsets, sizeof txn_offsets);
    Py_XSETREF(txn_type, (PyTypeObject *)Py_NewRef(owner));
    Py_RETURN_NONE;
}

/* A field of txn (borrowed), NULL when unset. */
static inline PyObject *txn_field(PyObject *txn, int which) {
    return *(PyObject **)((char *)txn + txn_offsets[which]);
}

/* A CloudEvents event's attributes in binary mode on message m of shape: header lines (bytes, for a binding that
 * takes lines) into its header_lines, a dict into its headers (Python twin: EventBuilder.change_rest). */
static int set_headers(MessageShape *shape, PyObject *m, PyObject *headers) {
    int lines = PyBytes_Check(headers);
    Py_ssize_t at = lines ? MESSAGE_HEADER_LINES : MESSAGE_HEADERS;
    if (shape->n <= at)
        return PyObject_SetAttr(m, lines ? str_header_lines : str_headers, headers);
    Py_SETREF(*(PyObject **)((char *)m + shape->offsets[at]), Py_NewRef(headers));
    return 0;
}

/* The subject of a routed table's event whose route gave topic: the topic itself (a str), or for a fallback reason
 * (an int, 1-based) the table's subject, the reason counted. routed is (cells, subject, count): cells the counts
 * per reason (a list of [int] | None), subject the table's, count what counts a reason whose cell does not exist
 * yet and answers the subject (Python twin: EventBuilder._routed). */
static PyObject *routed_subject(PyObject *routed, PyObject *topic) {
    if (PyUnicode_Check(topic))
        return Py_NewRef(topic);
    if (!PyTuple_Check(routed) || PyTuple_GET_SIZE(routed) != 3 || !PyList_Check(PyTuple_GET_ITEM(routed, 0)) ||
        !PyLong_CheckExact(topic)) {
        PyErr_SetString(PyExc_TypeError, "change: a route is (cells: list, subject: str, count), its topic str | int");
        return NULL;
    }
    PyObject *cells = PyTuple_GET_ITEM(routed, 0);
    Py_ssize_t reason = PyLong_AsSsize_t(topic);
    if (reason == -1 && PyErr_Occurred())
        return NULL;
    PyObject *cell = reason >= 1 && reason <= PyList_GET_SIZE(cells) ? PyList_GET_ITEM(cells, reason - 1) : NULL;
    if (cell == NULL || !PyList_CheckExact(cell) || PyList_GET_SIZE(cell) != 1)
        return PyObject_CallOneArg(PyTuple_GET_ITEM(routed, 2), topic);
    PyObject *one = PyLong_FromLong(1);
    PyObject *count = one == NULL ? NULL : PyNumber_Add(PyList_GET_ITEM(cell, 0), one);
    Py_XDECREF(one);
    if (count == NULL || PyList_SetItem(cell, 0, count) < 0)
        return NULL;
    return Py_NewRef(PyTuple_GET_ITEM(routed, 1));
}

/* change(msg, compiled, txn, debezium) -> Message | None
 *
 * msg: a pgoutput Insert, Update or Delete; compiled: the tables whose change events are made here, by relation
 * oid: (debezium: bool, plan (event()'s, or debezium_event()'s when debezium), shape, actions (a bit each for
 * INSERT 1, UPDATE 2, DELETE 4: those published), tombstones, want_key, routed, ce); routed: None, or for a table
 * with a topic route (cells, subject, count) (routed_subject); ce: None, or the table's compiled CloudEvents
 * (publisher.format cloudevents: the shape's defaults carry the content type, set_headers the attributes);
 * txn: the Transaction (its ordinal counted up when the event is made); debezium: what has last_commit
 * (publisher.format debezium), else None.
 * None: the caller's Python path takes the message (another table, an action not published, a transaction
 * without an id prefix, or whatever event() and debezium_event() leave to it). */
PyObject *hot_change(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyBytes_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "change(msg: bytes, compiled: dict, txn, debezium)");
        return NULL;
    }
    PyObject *msg = args[0], *txn = args[2];
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(msg);
    if (txn_type == NULL || Py_TYPE(txn) != txn_type || PyBytes_GET_SIZE(msg) < 5)
        Py_RETURN_NONE;
    int bit = p[0] == 'I' ? 1 : p[0] == 'U' ? 2 : p[0] == 'D' ? 4 : 0;
    PyObject *oid = PyLong_FromUnsignedLong((unsigned long)p[1] << 24 | (unsigned long)p[2] << 16 |
                                            (unsigned long)p[3] << 8 | p[4]);
    if (oid == NULL)
        return NULL;
    PyObject *entry = PyDict_GetItemWithError(args[1], oid);
    Py_DECREF(oid);
    if (entry == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 8) {
        PyErr_SetString(PyExc_TypeError, "change: a compiled table is (debezium, plan, shape, actions, tombstones, "
                                         "want_key, routed, ce)");
        return NULL;
    }
    long actions = PyLong_AsLong(PyTuple_GET_ITEM(entry, 3));
    if (actions == -1 && PyErr_Occurred())
        return NULL;
    PyObject *prefix = txn_field(txn, TXN_ID_PREFIX), *ordinal_obj = txn_field(txn, TXN_ORDINAL),
             *base_obj = txn_field(txn, TXN_ID_BASE);
    if (!(actions & bit) || prefix == NULL || !PyUnicode_Check(prefix) || PyUnicode_GET_LENGTH(prefix) == 0 ||
        ordinal_obj == NULL || !PyLong_CheckExact(ordinal_obj) || base_obj == NULL || !PyLong_CheckExact(base_obj))
        Py_RETURN_NONE;
    long long ordinal = PyLong_AsLongLong(ordinal_obj);
    unsigned long long base = small_unsigned(base_obj);
    if (PyErr_Occurred())
        return NULL;
    ordinal += 1;
    PyObject *number = PyLong_FromUnsignedLongLong(base | ((unsigned long long)ordinal & 0x3FFFFFF));
    if (number == NULL)
        return NULL;
    PyObject *made;
    int debezium = PyObject_IsTrue(PyTuple_GET_ITEM(entry, 0));
    PyObject *plan = PyTuple_GET_ITEM(entry, 1), *shape = PyTuple_GET_ITEM(entry, 2),
             *want_key = PyTuple_GET_ITEM(entry, 5), *routed = PyTuple_GET_ITEM(entry, 6),
             *ce = PyTuple_GET_ITEM(entry, 7);
    /* a table with a topic route or CloudEvents: the event comes as (ident, body, key, topic[, headers]) and is made
     * here */
    PyObject *given = routed == Py_None && ce == Py_None ? shape : Py_None;
    if (debezium > 0 && ce != Py_None) {
        Py_DECREF(number);
        PyErr_SetString(PyExc_TypeError, "change: a Debezium table has no CloudEvents");
        return NULL;
    }
    if (debezium > 0) {
        PyObject *micros = txn_field(txn, TXN_COMMIT_MICROS), *xid = txn_field(txn, TXN_XID),
                 *lsn = txn_field(txn, TXN_LSN);
        PyObject *last = args[3] == Py_None ? Py_NewRef(Py_None) : PyObject_GetAttr(args[3], str_last_commit);
        if (last == NULL || micros == NULL || xid == NULL || lsn == NULL) {
            Py_XDECREF(last);
            Py_DECREF(number);
            return last == NULL ? NULL : Py_NewRef(Py_None);
        }
        PyObject *call[11] = {msg, plan, prefix, number, micros, xid, lsn, last, Py_None, want_key, given};
        made = hot_debezium_event(self, call, given == Py_None ? 10 : 11);
        Py_DECREF(last);
    } else if (debezium == 0) {
        PyObject *time = txn_field(txn, TXN_COMMIT_TIME);
        if (time == NULL) {
            Py_DECREF(number);
            Py_RETURN_NONE;
        }
        PyObject *call[8] = {msg, plan, prefix, number, time, want_key, ce, given};
        made = hot_event(self, call, 8);
    } else {
        made = NULL;
    }
    Py_DECREF(number);
    if (made == NULL || made == Py_None)
        return made;
    if (given == Py_None) { /* the topic the route gave (or the table's subject), the CloudEvents headers */
        MessageShape *read;
        Py_ssize_t size = PyTuple_Check(made) ? PyTuple_GET_SIZE(made) : 0;
        PyObject *subject = NULL, *headers = NULL;
        if (size == 4 + (ce != Py_None)) {
            subject = routed == Py_None ? Py_NewRef(Py_None) : routed_subject(routed, PyTuple_GET_ITEM(made, 3));
            headers = ce == Py_None ? Py_NewRef(Py_None) : Py_NewRef(PyTuple_GET_ITEM(made, 4));
        }
        if (subject == NULL || change_shape("change", shape, &read) < 0) {
            if (subject == NULL && !PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "change: a routed or CloudEvents table's event is (ident, body, key, "
                                                 "topic[, headers])");
            Py_XDECREF(subject);
            Py_XDECREF(headers);
            Py_DECREF(made);
            return NULL;
        }
        made = change_message(read, (char)p[0], made, subject == Py_None ? NULL : subject);
        Py_DECREF(subject);
        if (made != NULL && headers != Py_None && set_headers(read, made, headers) < 0)
            Py_CLEAR(made);
        Py_DECREF(headers);
        if (made == NULL)
            return NULL;
    }
    PyObject *counted = PyLong_FromLongLong(ordinal);
    if (counted == NULL) {
        Py_DECREF(made);
        return NULL;
    }
    PyObject **slot = (PyObject **)((char *)txn + txn_offsets[TXN_ORDINAL]);
    Py_SETREF(*slot, counted);
    if (bit == 4 && PyObject_IsTrue(PyTuple_GET_ITEM(entry, 4)) > 0) { /* a tombstone follows a DELETE with a key */
        PyObject *key = PyObject_GetAttr(made, str_key);
        int set = key == NULL ? -1 : PyObject_SetAttr(made, str_tombstone, key != Py_None ? Py_True : Py_False);
        Py_XDECREF(key);
        if (set < 0) {
            Py_DECREF(made);
            return NULL;
        }
    }
    return made;
}
