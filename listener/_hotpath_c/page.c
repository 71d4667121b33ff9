/* A page of a backfill: every row of a chunk's FETCH result (a libpq PGresult, text format) -> READ events,
 * without a Python value per column: read_page() walks the result through libpq and writes each row's body
 * (read_row's), key and id (read_event_ids') and makes its Message.
 * Python twin: listener.event.EventBuilder.read_page (the rows as psycopg's get_value gives them).
 */
#include "hotpath.h"

typedef int (*count_fn)(const void *result);
typedef char *(*getvalue_fn)(const void *result, int row, int column);
typedef int (*cell_fn)(const void *result, int row, int column);
static count_fn pq_ntuples = NULL, pq_nfields = NULL;
static getvalue_fn pq_getvalue = NULL;
static cell_fn pq_getisnull = NULL, pq_getlength = NULL;

/* set_libpq_results(PQntuples, PQnfields, PQgetvalue, PQgetisnull, PQgetlength): their addresses in the
 * libpq psycopg runs on. */
PyObject *hot_set_libpq_results(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "set_libpq_results(ntuples, nfields, getvalue, getisnull, getlength)");
        return NULL;
    }
    void *f[5];
    for (int i = 0; i < 5; i++) {
        f[i] = PyLong_AsVoidPtr(args[i]);
        if (f[i] == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "set_libpq_results: a NULL address");
            return NULL;
        }
    }
    pq_ntuples = (count_fn)f[0];
    pq_nfields = (count_fn)f[1];
    pq_getvalue = (getvalue_fn)f[2];
    pq_getisnull = (cell_fn)f[3];
    pq_getlength = (cell_fn)f[4];
    Py_RETURN_NONE;
}

/* page_sizes(result_ptr) -> (value_bytes, largest_row): the bytes of every non-NULL value of a FETCH result
 * (text format) and those of its largest row, without a Python object per value. */
PyObject *hot_page_sizes(PyObject *self, PyObject *arg) {
    (void)self;
    if (pq_ntuples == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "page_sizes: set_libpq_results() was not called");
        return NULL;
    }
    const void *res = PyLong_AsVoidPtr(arg);
    if (res == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "page_sizes: no result");
        return NULL;
    }
    int nrows = pq_ntuples(res), ncolumns = pq_nfields(res);
    long long total = 0, largest = 0;
    for (int r = 0; r < nrows; r++) {
        long long row = 0;
        for (int c = 0; c < ncolumns; c++)
            row += pq_getlength(res, r, c); /* 0 for NULL */
        total += row;
        if (row > largest)
            largest = row;
    }
    return Py_BuildValue("(LL)", total, largest);
}

/* read_page(result_ptr, plan, ids, key_index, read_time, want_key, message)
 *     -> (messages: list[Message | None], keys: list[tuple[str | None, ...] | None], value_bytes, largest_row)
 *
 * result_ptr: the PGresult of a FETCH (text format), its columns in the plan's order; plan: read_row's (no
 * route); ids: blake2b_prepare's state for the table; key_index: the key columns' positions in the result;
 * message: (Message, subject, schema, table, action, fields, defaults), the class, what every event of the page
 * shares, and for making each without calling the class (None: call it): the member descriptors of its ten
 * fields in order (id, subject, body, schema, table, action, key, headers, content_type, tombstone) and the
 * defaults of the last three.
 * A row the compiled path does not write (a value not valid UTF-8, a value a converter refuses) is None in
 * both lists: the caller takes it through the Python path. value_bytes: the bytes of every non-NULL value,
 * largest_row: those of the largest row. */
PyObject *hot_read_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "read_page(result_ptr, plan, ids, key_index, read_time, want_key, message)");
        return NULL;
    }
    if (pq_ntuples == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "read_page: set_libpq_results() was not called");
        return NULL;
    }
    const void *res = PyLong_AsVoidPtr(args[0]);
    if (res == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "read_page: no result");
        return NULL;
    }
    Plan plan;
    if (read_plan("read_page", args, args[4], args[4], &plan) < 0)
        return NULL;
    if (plan.route != NULL) {
        PyErr_SetString(PyExc_ValueError, "read_page: a plan with a topic route (the caller routes per row)");
        return NULL;
    }
    PyObject *ids = args[2], *key_index = args[3], *read_time = args[4], *message = args[6];
    if (!PyBytes_Check(ids) || PyBytes_GET_SIZE(ids) != (Py_ssize_t)sizeof(Blake2b) || !PyTuple_Check(key_index) ||
        !PyTuple_Check(message) || PyTuple_GET_SIZE(message) != 7) {
        PyErr_SetString(PyExc_TypeError, "read_page: ids from blake2b_prepare, key_index a tuple, message a 7-tuple");
        return NULL;
    }
    int want_key = PyObject_IsTrue(args[5]);
    if (want_key < 0)
        return NULL;
    MessageShape shape;
    if (message_shape(message, &shape) < 0)
        return NULL;
    Blake2b prepared;
    memcpy(&prepared, PyBytes_AS_STRING(ids), sizeof(prepared));
    Py_ssize_t ncolumns = pq_nfields(res), nrows = pq_ntuples(res), nkeys = PyTuple_GET_SIZE(key_index);
    if (ncolumns != plan.ncolumns) {
        PyErr_Format(PyExc_ValueError, "read_page: the result has %zd columns, the plan %zd", ncolumns, plan.ncolumns);
        return NULL;
    }
    Py_ssize_t key_at[STACK_COLUMNS];
    if (nkeys > STACK_COLUMNS) {
        PyErr_SetString(PyExc_ValueError, "read_page: too many key columns");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < nkeys; k++) {
        key_at[k] = PyLong_AsSsize_t(PyTuple_GET_ITEM(key_index, k));
        if (key_at[k] < 0 || key_at[k] >= ncolumns) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "read_page: a key column out of range");
            return NULL;
        }
    }
    Col stack[STACK_COLUMNS], key_cols[STACK_COLUMNS];
    Col *cols = stack;
    if (ncolumns > STACK_COLUMNS) {
        cols = PyMem_Malloc(sizeof(Col) * (size_t)ncolumns);
        if (cols == NULL)
            return PyErr_NoMemory();
    }
    PyObject *messages = PyList_New(nrows), *keys = PyList_New(nrows), *result = NULL;
    long long total = 0, largest = 0;
    if (messages == NULL || keys == NULL)
        goto done;
    for (Py_ssize_t r = 0; r < nrows; r++) {
        Py_ssize_t size = 0, row_bytes = 0;
        int valid = 1;
        for (Py_ssize_t i = 0; i < ncolumns; i++) {
            if (pq_getisnull(res, (int)r, (int)i)) {
                cols[i].kind = 'n';
                cols[i].p = NULL;
                cols[i].len = 0;
                continue;
            }
            cols[i].kind = 't';
            cols[i].p = (const unsigned char *)pq_getvalue(res, (int)r, (int)i);
            cols[i].len = pq_getlength(res, (int)r, (int)i);
            row_bytes += cols[i].len;
            size += cols[i].len + 8;
            if (valid && !valid_utf8(cols[i].p, cols[i].len))
                valid = 0;
        }
        total += row_bytes;
        if (row_bytes > largest)
            largest = row_bytes;
        PyObject *event = NULL, *key = NULL;
        if (valid) {
            for (Py_ssize_t k = 0; k < nkeys; k++)
                key_cols[k] = cols[key_at[k]];
            char text[36];
            read_ident(&prepared, key_cols, nkeys, text);
            PyObject *ident = PyUnicode_New(36, 127);
            if (ident == NULL)
                goto done;
            memcpy(PyUnicode_1BYTE_DATA(ident), text, 36);
            PyObject *built = build_event(ident, 0, read_time, &plan, "READ", cols, ncolumns, NULL, 0, 0, want_key,
                                          size, NULL);
            if (built == NULL) {
                Py_DECREF(ident);
                goto done;
            }
            if (built != Py_None) {
                event = shaped_message(&shape, ident, PyTuple_GET_ITEM(built, 0), PyTuple_GET_ITEM(built, 1), NULL,
                                       NULL);
                key = event == NULL ? NULL : PyTuple_New(nkeys);
                for (Py_ssize_t k = 0; key != NULL && k < nkeys; k++) {
                    PyObject *part = key_cols[k].kind == 'n'
                                         ? Py_NewRef(Py_None)
                                         : PyUnicode_DecodeUTF8((const char *)key_cols[k].p, key_cols[k].len, NULL);
                    if (part == NULL)
                        Py_CLEAR(key);
                    else
                        PyTuple_SET_ITEM(key, k, part);
                }
                if (key == NULL) {
                    Py_XDECREF(event);
                    Py_DECREF(built);
                    Py_DECREF(ident);
                    goto done;
                }
            }
            Py_DECREF(built);
            Py_DECREF(ident);
        }
        PyList_SET_ITEM(messages, r, event != NULL ? event : Py_NewRef(Py_None));
        PyList_SET_ITEM(keys, r, key != NULL ? key : Py_NewRef(Py_None));
    }
    result = Py_BuildValue("(OOLL)", messages, keys, total, largest);
done:
    Py_XDECREF(messages);
    Py_XDECREF(keys);
    if (cols != stack)
        PyMem_Free(cols);
    return result;
}
