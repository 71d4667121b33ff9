/* Events as listener.message.Message objects, made without calling the class: its slots filled directly, and the
 * object left out of the cyclic collector. Python twin: the class itself (listener/message.py: the dataclass
 * __init__ of Message, HeadedMessage.__init__), which the caller uses when the shape is not given. */
#include "hotpath.h"

#include <structmember.h>

/* Where each field of the Message class lives in its instances, from the member descriptors of its slots
 * (fields: a tuple of them, in field order): how many there are, or 0 when they are not plain object slots
 * or more than MESSAGE_FIELDS. */
static Py_ssize_t message_offsets(PyObject *fields, Py_ssize_t offsets[MESSAGE_FIELDS]) {
    if (!PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) <= MESSAGE_SET || PyTuple_GET_SIZE(fields) > MESSAGE_FIELDS)
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
    Py_ssize_t n = PyTuple_Check(defaults) ? message_offsets(fields, shape->offsets) : 0;
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

PyObject *shaped_message(MessageShape *shape, PyObject *ident, PyObject *body, PyObject *key, PyObject *action) {
    PyObject *subject = shape->shared[0], *schema = shape->shared[1], *table = shape->shared[2], *m;
    if (action == NULL)
        action = shape->shared[3];
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
