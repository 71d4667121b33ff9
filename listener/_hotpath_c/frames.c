/* NATS wire frames: the HPUB frames of a batch, and the JetStream acks that come back.
 * Python twin: listener/publishers/nats.py (nats-py's publish and its reply parser).
 */
#include "hotpath.h"
#include <structmember.h>

static PyObject *str_rest, *str_head, *str_id, *str_subject, *str_headers, *str_header_lines, *str_content_type,
    *str_content_type_header;

/* The attributes read off each message: a Message (a class with __slots__) keeps them at fixed offsets, which
 * are looked up once per class and read directly, as its member descriptors do; anything else (another class,
 * an attribute that is not a plain slot, an empty slot) goes through PyObject_GetAttr. The body is read as its
 * two parts, head and rest (the body slot under a second name): a message.HeadedMessage's head, bytes many
 * events share, is not joined to its own bytes (as reading its body would) but written into the frames before
 * them; a plain Message's head is None. */
enum { ATTR_REST, ATTR_HEAD, ATTR_ID, ATTR_SUBJECT, ATTR_HEADERS, ATTR_HEADER_LINES, ATTR_CONTENT_TYPE, ATTRS };
static PyObject *attr_names[ATTRS];
static PyTypeObject *slots_type; /* the class whose offsets are in attr_offsets (a strong reference) */
static Py_ssize_t attr_offsets[ATTRS];

static void learn_slots(PyTypeObject *type) {
    Py_XSETREF(slots_type, (PyTypeObject *)Py_NewRef(type));
    for (int i = 0; i < ATTRS; i++) {
        attr_offsets[i] = -1;
        PyObject *descr = type->tp_getattro == PyObject_GenericGetAttr ? _PyType_Lookup(type, attr_names[i]) : NULL;
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
            PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
            if (member->type == T_OBJECT_EX && !(member->flags & READ_RESTRICTED))
                attr_offsets[i] = member->offset;
        }
    }
}

/* message.<attribute>: a new reference, NULL with an exception set. */
static inline PyObject *attr(PyObject *message, int which) {
    if (Py_IS_TYPE(message, slots_type) && attr_offsets[which] >= 0) {
        PyObject *value = *(PyObject **)((char *)message + attr_offsets[which]);
        if (value != NULL)
            return Py_NewRef(value);
    }
    return PyObject_GetAttr(message, attr_names[which]);
}

/* What a header line may hold as it is: HEADER_NAME in a name (printable ASCII but ':'), HEADER_VALUE in a
 * value (printable ASCII and space). */
enum { HEADER_NAME = 1, HEADER_VALUE = 2 };
static unsigned char header_chars[256];

/* The attribute names read off each message, interned once, and the table above (module init). */
int frames_init(void) {
    str_rest = PyUnicode_InternFromString("rest");
    str_head = PyUnicode_InternFromString("head");
    str_id = PyUnicode_InternFromString("id");
    str_subject = PyUnicode_InternFromString("subject");
    str_headers = PyUnicode_InternFromString("headers");
    str_header_lines = PyUnicode_InternFromString("header_lines");
    str_content_type = PyUnicode_InternFromString("content_type");
    str_content_type_header = PyUnicode_InternFromString("content-type");
    if (str_rest == NULL || str_head == NULL || str_id == NULL || str_subject == NULL || str_headers == NULL || str_header_lines == NULL ||
        str_content_type == NULL || str_content_type_header == NULL)
        return -1;
    for (int c = 0x20; c <= 0x7E; c++)
        header_chars[c] = (unsigned char)(HEADER_VALUE | (c != ' ' && c != ':' ? HEADER_NAME : 0));
    PyObject *names[ATTRS] = {str_rest, str_head, str_id, str_subject, str_headers, str_header_lines,
                              str_content_type};
    memcpy(attr_names, names, sizeof names);
    return 0;
}

/* Whether every byte of s[0..n) has the bit of header_chars. */
static inline int all_header_chars(const unsigned char *s, Py_ssize_t n, unsigned char bit) {
    unsigned char seen = bit;
    for (Py_ssize_t i = 0; i < n; i++)
        seen &= header_chars[s[i]];
    return seen != 0;
}

/* Header lines of interned names and values already found plain (strong references: an address is not reused
 * while cached). CloudEvents' constant attributes are interned (formats.CloudEvents): each event's copy of them
 * is written without looking at every byte again. Direct-mapped by the two addresses. */
#define HEADER_CACHE 64
static struct {
    PyObject *name, *value;
} header_cache[HEADER_CACHE];

static inline size_t header_slot(PyObject *name, PyObject *value) {
    uintptr_t h = ((uintptr_t)name >> 4) * 31u + ((uintptr_t)value >> 4);
    return (size_t)((h ^ (h >> 6)) % HEADER_CACHE);
}

/* A header line "name: value\r\n" as the Python path writes it, when both are plain: a name of printable
 * ASCII without ':', a value of printable ASCII or spaces, not starting or ending with a space. 0: not plain. */
static int put_header(Buf *b, PyObject *name, PyObject *value) {
    if (!PyUnicode_Check(name) || !PyUnicode_Check(value) || !PyUnicode_IS_COMPACT_ASCII(name) ||
        !PyUnicode_IS_COMPACT_ASCII(value))
        return 0;
    const unsigned char *name_text = PyUnicode_1BYTE_DATA(name), *value_text = PyUnicode_1BYTE_DATA(value);
    Py_ssize_t name_len = PyUnicode_GET_LENGTH(name), value_len = PyUnicode_GET_LENGTH(value);
    size_t slot = header_slot(name, value);
    if (header_cache[slot].name != name || header_cache[slot].value != value) {
        if (name_len == 0 || !all_header_chars(name_text, name_len, HEADER_NAME) ||
            !all_header_chars(value_text, value_len, HEADER_VALUE) ||
            (value_len && (value_text[0] == ' ' || value_text[value_len - 1] == ' ')))
            return 0;
        if (PyUnicode_CHECK_INTERNED(name) && PyUnicode_CHECK_INTERNED(value) && PyUnicode_CheckExact(name) &&
            PyUnicode_CheckExact(value)) {
            PyObject *old_name = header_cache[slot].name, *old_value = header_cache[slot].value;
            header_cache[slot].name = Py_NewRef(name);
            header_cache[slot].value = Py_NewRef(value);
            Py_XDECREF(old_name);
            Py_XDECREF(old_value);
        }
    }
    Py_ssize_t size = name_len + value_len + 4;
    if (b->len + size > b->cap && buf_grow(b, size) < 0)
        return -1;
    char *out = b->data + b->len;
    memcpy(out, name_text, (size_t)name_len);
    out[name_len] = ':';
    out[name_len + 1] = ' ';
    memcpy(out + name_len + 2, value_text, (size_t)value_len);
    out[size - 2] = '\r';
    out[size - 1] = '\n';
    b->len += size;
    return 1;
}

/* The header lines of message.headers, message.header_lines (as they are: the compiled path wrote them) and
 * message.content_type into b (emptied first).
 * 1: written, 0: something needs the Python path, -1: error. */
static int extra_headers(Buf *b, PyObject *message) {
    b->len = 0;
    PyObject *headers = attr(message, ATTR_HEADERS);
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
    PyObject *lines = attr(message, ATTR_HEADER_LINES);
    if (lines == NULL)
        return -1;
    if (!PyBytes_Check(lines))
        rc = 0;
    else if (PyBytes_GET_SIZE(lines) && put(b, PyBytes_AS_STRING(lines), PyBytes_GET_SIZE(lines)) < 0)
        rc = -1;
    Py_DECREF(lines);
    if (rc != 1)
        return rc;
    PyObject *content_type = attr(message, ATTR_CONTENT_TYPE);
    if (content_type == NULL)
        return -1;
    if (PyUnicode_Check(content_type) && PyUnicode_GET_LENGTH(content_type) > 0) {
        rc = put_header(b, str_content_type_header, content_type);
    } else if (!PyUnicode_Check(content_type)) {
        rc = 0;
    }
    Py_DECREF(content_type);
    return rc;
}

/* The decimal digits of n >= 0 at out (20 at most); their count. What snprintf("%lld") writes, at a tenth of
 * its cost (three numbers a message: snprintf was ~7% of the reference workload's instructions). */
static Py_ssize_t put_decimal(char *out, long long n) {
    char digits[20];
    int count = 0;
    unsigned long long v = (unsigned long long)n;
    do {
        digits[count++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (int i = 0; i < count; i++)
        out[i] = digits[count - 1 - i];
    return count;
}

/* Room for need more bytes in out, the bytes object b writes into (b->data is its buffer): grown (doubled, at
 * least) by resizing the object itself, so that the frames are written once, into the bytes returned. Without
 * out (the frames cut into parts), b is a buffer of its own. */
static int frames_reserve(PyObject **out, Buf *b, Py_ssize_t need) {
    if (b->len + need <= b->cap)
        return 0;
    if (*out == NULL)
        return buf_grow(b, need);
    Py_ssize_t cap = b->cap * 2;
    if (cap < b->len + need)
        cap = b->len + need;
    if (_PyBytes_Resize(out, cap) < 0)
        return -1;
    b->data = PyBytes_AS_STRING(*out);
    b->cap = cap;
    return 0;
}

/* The frames' size before writing them: the bodies, and this much for each message's HPUB line and header (its
 * subject, inbox, three numbers and id; more is made room for when a message needs it). */
#define FRAME_LINE_ESTIMATE 192

/* A head at least this long (Debezium's schema block, 3 KB and more) is not copied into the frames: they are cut
 * before it and it is handed to the socket as it is, the same object for every event of the table. Copying it
 * cost more than the rest of the frame -- a memory copy of the head and the pages it filled, faulted in fresh
 * while earlier batches waited for the socket, then the kernel's copy from that cold memory (perf on the
 * reference workload: 0.9 us of 7 us an event); one head in the processor's cache is copied from there. */
#define SHARED_HEAD_MIN 1024

/* Seal the frames written so far into b as a part of parts, a bytes object of their exact size, and empty b
 * for the next part. (A part written straight into a bytes object sized by an estimate was resized down once
 * for every event: glibc split each block and freed the rest, costlier than copying the part out.) */
static int frames_cut(PyObject *parts, Buf *b) {
    if (b->len == 0)
        return 0;
    PyObject *part = PyBytes_FromStringAndSize(b->data, b->len);
    if (part == NULL)
        return -1;
    int rc = PyList_Append(parts, part);
    Py_DECREF(part);
    b->len = 0;
    return rc;
}

/* nats_frames(batch, prefixes, seq, limit, header_bytes) -> (frames: bytes | list[bytes], payload: int) | None
 *
 * One "HPUB <subject> <inbox>.<seq> <hdr> <total>\r\nNATS/1.0\r\nNats-Msg-Id: <id>\r\n<extra>\r\n<body>\r\n"
 * per message, seq counting up from seq + 1; extra: the lines of message.headers, message.header_lines and
 * message.content_type; body: message.head then message.rest (message.body, never joined here).
 * prefixes maps a subject to "HPUB <subject> <inbox>.". frames: one bytes, or, when a message's head has
 * SHARED_HEAD_MIN bytes or more, the parts to write one after the other, each such head one of them (the
 * very object). None when a message needs the Python path's checks (unknown subject, too large, an id or
 * header with odd characters). */
PyObject *hot_nats_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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
    if (seq < 0)
        Py_RETURN_NONE; /* never from the publisher (it counts from 0): the Python path writes what it is */
    PyObject *batch = args[0], *prefixes = args[1];
    Py_ssize_t count = PyList_GET_SIZE(batch);
    Buf b = {NULL, 0, 0};
    Buf extra = {NULL, 0, 0};
    long long payload = 0;
    PyObject *result = NULL, *out = NULL;
    /* The frames are written straight into the bytes object returned, sized up front: a batch of large rows
     * (4 MiB) was built in a buffer doubled a dozen times, then copied into the bytes -- three copies of every
     * body, and twice memory over glibc's mmap threshold that the kernel faults in page by page. */
    Py_ssize_t estimate = 0;
    int shared_heads = 0;
    PyObject *parts = NULL; /* the parts written, when a head is shared (then b holds the next one, out is unused) */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *message = PyList_GET_ITEM(batch, i);
        if (!Py_IS_TYPE(message, slots_type))
            learn_slots(Py_TYPE(message));
        for (int which = ATTR_REST; which <= ATTR_HEAD; which++) {
            PyObject *part = attr(message, which);
            if (part == NULL)
                goto done;
            Py_ssize_t size = PyBytes_Check(part) ? PyBytes_GET_SIZE(part) : 0;
            Py_DECREF(part);
            if (which == ATTR_HEAD && size >= SHARED_HEAD_MIN)
                shared_heads = 1;
            else
                estimate += size;
        }
        estimate += FRAME_LINE_ESTIMATE;
    }
    if (shared_heads) { /* cut into a part per message, each written into b (a buffer of its own) first */
        parts = PyList_New(0);
        if (parts == NULL || buf_grow(&b, 4 * FRAME_LINE_ESTIMATE) < 0)
            goto done;
    } else {
        out = PyBytes_FromStringAndSize(NULL, estimate > 0 ? estimate : 1);
        if (out == NULL)
            goto done;
        b.data = PyBytes_AS_STRING(out);
        b.cap = estimate > 0 ? estimate : 1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *message = PyList_GET_ITEM(batch, i);
        if (!Py_IS_TYPE(message, slots_type))
            learn_slots(Py_TYPE(message));
        PyObject *shared = attr(message, ATTR_HEAD);
        PyObject *body = shared ? attr(message, ATTR_REST) : NULL;
        PyObject *ident = body ? attr(message, ATTR_ID) : NULL;
        PyObject *subject = ident ? attr(message, ATTR_SUBJECT) : NULL;
        int rc = -1;
        if (subject == NULL)
            goto next;
        rc = FALLBACK;
        if ((shared != Py_None && !PyBytes_Check(shared)) || !PyBytes_Check(body) || !PyUnicode_Check(ident) ||
            !PyUnicode_Check(subject))
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
        Py_ssize_t head_len = shared == Py_None ? 0 : PyBytes_GET_SIZE(shared);
        Py_ssize_t body_len = head_len + PyBytes_GET_SIZE(body);
        int extra_rc = extra_headers(&extra, message);
        if (extra_rc <= 0) {
            rc = extra_rc < 0 ? -1 : FALLBACK;
            goto next;
        }
        if (id_len == 0 || !visible_ascii((const unsigned char *)id_text, id_len) || body_len + id_len + extra.len > limit)
            goto next;
        Py_ssize_t header = header_bytes + id_len + extra.len;
        char numbers[96];
        seq++;
        Py_ssize_t written = put_decimal(numbers, seq);
        numbers[written++] = ' ';
        written += put_decimal(numbers + written, header);
        numbers[written++] = ' ';
        written += put_decimal(numbers + written, header + body_len);
        static const char head[] = "\r\nNATS/1.0\r\nNats-Msg-Id: ";
        memcpy(numbers + written, head, sizeof head - 1);
        written += (Py_ssize_t)sizeof head - 1;
        int cut = head_len >= SHARED_HEAD_MIN; /* the head is a part of its own, not copied */
        Py_ssize_t frame_len = prefix_len + written + id_len + 2 + extra.len + 2 + (cut ? 0 : body_len + 2);
        if (frames_reserve(&out, &b, frame_len) < 0) {
            rc = -1;
            goto next;
        }
        /* the room is there: the parts written one after the other */
        char *at = b.data + b.len;
        memcpy(at, prefix_text, (size_t)prefix_len);
        at += prefix_len;
        memcpy(at, numbers, (size_t)written);
        at += written;
        memcpy(at, id_text, (size_t)id_len);
        at += id_len;
        *at++ = '\r';
        *at++ = '\n';
        if (extra.len) {
            memcpy(at, extra.data, (size_t)extra.len);
            at += extra.len;
        }
        *at++ = '\r';
        *at++ = '\n';
        if (cut) {
            b.len = at - b.data;
            if (frames_cut(parts, &b) < 0 || PyList_Append(parts, shared) < 0 ||
                frames_reserve(&out, &b, body_len - head_len + 2) < 0) {
                rc = -1;
                goto next;
            }
            at = b.data;
        } else if (head_len) {
            memcpy(at, PyBytes_AS_STRING(shared), (size_t)head_len);
            at += head_len;
        }
        memcpy(at, PyBytes_AS_STRING(body), (size_t)(body_len - head_len));
        at += body_len - head_len;
        *at++ = '\r';
        *at++ = '\n';
        b.len = at - b.data;
        payload += body_len;
        rc = 0;
    next:
        Py_XDECREF(shared);
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
    if (parts != NULL) {
        if (frames_cut(parts, &b) == 0)
            result = Py_BuildValue("(OL)", parts, payload);
    } else if (_PyBytes_Resize(&out, b.len) == 0) { /* the unused estimate back; out is NULL when this failed */
        result = Py_BuildValue("(OL)", out, payload);
    }
done:
    Py_XDECREF(parts);
    Py_XDECREF(out);
    if (shared_heads) /* b was a buffer of its own */
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
PyObject *hot_nats_acks(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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
