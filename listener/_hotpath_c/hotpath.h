/* The compiled fast path (the extension module listener._hotpath): what its parts share.
 * Python twin: listener/hotpath.py (loads the module, builds the plan of each relation).
 *
 * Stages 3-6 in one pass: a pgoutput Insert/Update/Delete message -> the event's JSON body.
 *
 * The optional fast path of listener.event.EventBuilder (see listener/hotpath.py for the Python side
 * and the plan it builds per relation). It decodes the tuple(s) of one change message, converts the
 * common column types straight from their text form into JSON, and writes the whole event body,
 * byte for byte what the pure-Python path (pgoutput.decode -> EventBuilder.row -> orjson.dumps)
 * produces. Whatever it does not handle itself -- a binary column, text that is not valid UTF-8, a
 * value a Python converter refuses, a short tuple, a malformed message -- makes it return None,
 * and the caller takes the Python path, which also owns every error message and metric.
 *
 * The parts, one concern each, each with its Python twin named at its top:
 *   decode.c      pgoutput tuples, strict UTF-8; the replication reader (copy_batch)   pgoutput.py, replication.py
 *   json.c        column values to JSON (the converters' fast cases)                  types.py (+ orjson)
 *   sha256.c      SHA-256 / HMAC-SHA256 of the hash mask                              transforms.py (hmac)
 *   transforms.c  a table's transform: masks in keys and topics, the route           transforms.py
 *   event.c       the default event format: event(), read_row()                       event.py
 *   cloudevents.c CloudEvents around it (the ce argument of event() and read_row())   formats.py (CloudEvents)
 *   debezium.c    the Debezium format: debezium_event(), debezium_read_row()          formats.py (Debezium)
 *   txn.c         a Begin message -> what its transaction's events share: begin()     event.py (begin)
 *   frames.c      NATS wire frames (HPUB) and JetStream acks                          publishers/nats.py
 *   blake2b.c     BLAKE2b, the ids of READ events                                     event.py (read_event_ids)
 *   page.c        a backfill page (libpq PGresult) -> READ events: read_page()        event.py (read_page)
 *   message.c     the events as Message objects, made without calling the class;     message.py (Message),
 *                 change(): a change message of a compiled table to its Message      event.py (change)
 *   module.c      the method table and module init                                    hotpath.py
 *
 * event(msg, plan, prefix, number, commit_time, want_key) -> (ident: str, body: bytes, key: bytes | None) | None
 *   the event id is prefix + number as 12 hex digits (the transaction's shared part and the change's
 *   bits, see listener.event.event_id_parts); with number None it is prefix as given
 *
 * event(..., want_key, ce) with publisher.format cloudevents (ce: see cloudevents.c) -> (ident, body, key, topic,
 *   headers) | None: body in structured mode the whole CloudEvent, headers the binary mode's attribute headers
 *   (a dict, or for a binding that takes lines their header lines as bytes; None in structured mode), topic None without a route; read_row(..., want_key, ce) -> (body, key, topic, headers)
 *
 * event(..., want_key, None, shape) -> Message | None: the event made as a listener.message.Message (see
 *   message.c; for a table without CloudEvents or a topic route), not as a tuple the caller makes one of
 *
 * read_row(values, plan, ident, read_time, want_key) takes a backfilled row (each column's text form as
 * bytes, as an Insert would carry it) and writes the same body with action READ.
 *
 * It also serves the NATS publisher's hot loop (listener/publishers/nats.py), checked against nats-py:
 * nats_frames(batch, prefixes, seq, limit, header_bytes) -> (frames, payload) | None builds the HPUB
 * frames of a batch (Nats-Msg-Id header, reply subject per message), and nats_acks(data, sid) scans
 * JetStream's answers on the reply subscription (acks by sequence, errors with their payload).
 *
 * And the replication reader's: copy_batch(pgconn_ptr, limit, starts, max_bytes) takes up to limit buffered
 * CopyData messages off libpq at once (PQgetCopyData through the connection pointer psycopg exposes,
 * with the function pointers of the libpq psycopg loaded, given once by set_libpq).
 *
 * plan = (schema_table: bytes, columns: tuple, key_index: tuple[int, ...], transform: None | (hmac, route))
 *   schema_table: '"schema":"...","table":"..."' already JSON-encoded
 *   columns: one (prefix: bytes, code: int, converter, is_identity: bool) per column, where prefix
 *   is '"name":' JSON-encoded and code says how the value is written (the CODE_* values below).
 *   A table's transform (listener/transforms.py) shows here as the codes CODE_DROP (left out of data,
 *   dataOld and key) and CODE_HASH / CODE_REDACT / CODE_NULLED (masks, also applied to the key and the
 *   topic); transform is None for a table without one, else hmac: the HMAC-SHA256 key's prepared states
 *   (hmac_prepare; needed by CODE_HASH, else None) and route.
 *   route: None, or (head: bytes, parts: tuple[bytes | int, ...]) -- the topic template, literal text and
 *   column indices; then event() answers (ident, body, key, topic) and read_row() (body, key, topic),
 *   where topic is the rendered topic name (str) or why there is none (int, listener.transforms.FALLBACK_REASONS).
 *
 * hmac_prepare(key) -> bytes and hmac_hex(prepared, data) -> str: the hash mask on its own (tests).
 *
 * And the backfill's: read_page(result_ptr, plan, ids, key_index, read_time, want_key, message) writes the READ
 * events of a whole FETCH result (a PGresult, through the libpq functions given once by set_libpq_results), each
 * row's id hashed from the state blake2b_prepare(key, data) made for its table (see page.c); page_sizes(result_ptr)
 * gives a result's value bytes and largest row, which size the next FETCH before the events are written.
 */
#ifndef LISTENER_HOTPATH_H
#define LISTENER_HOTPATH_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* how a column is written (keep in step with listener/hotpath.py) */
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
    CODE_DROP = 9,       /* transforms: not published */
    CODE_HASH = 10,      /* transforms: HMAC-SHA256 of the text, lower-case hex */
    CODE_REDACT = 11,    /* transforms: "[redacted]" */
    CODE_NULLED = 12,    /* transforms: null */
};

/* the fallback reasons of a route (listener.transforms.FALLBACK_REASONS, counted from 1) */
enum { ROUTE_NULL = 1, ROUTE_MISSING = 2, ROUTE_EMPTY = 3, ROUTE_TOO_LONG = 4 };
#define MAX_TOPIC_BYTES 249

#define FALLBACK 1 /* not handled here: the caller takes the Python path */

/* ---- output buffer (json.c) ---- */

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buf;

int buf_grow(Buf *b, Py_ssize_t extra);

static inline int put(Buf *b, const char *s, Py_ssize_t n) {
    if (b->len + n > b->cap && buf_grow(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

#define PUTS(b, lit) put((b), (lit), (Py_ssize_t)(sizeof(lit) - 1))

static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* Whether every byte of s[0..n) is printable ASCII but space (0x21..0x7E): a header value nats-py sends as it is
 * (its strip() and CR/LF replacement leave it unchanged). 8 bytes at a time: does a word hold a byte below 0x21,
 * or one of 0x7F or more? */
static inline int visible_ascii(const unsigned char *s, Py_ssize_t n) {
    const uint64_t ones = 0x0101010101010101ULL, high = 0x8080808080808080ULL;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        if ((((w - ones * 0x21) & ~w) | ((w + ones) | w)) & high)
            return 0;
    }
    for (; i < n; i++)
        if (s[i] < 0x21 || s[i] > 0x7E)
            return 0;
    return 1;
}

/* v as unsigned long long, cheaply when it is an int of at most two digits (60 bits) and not negative: the ids'
 * numbers. PyLong_AsUnsignedLongLong goes through _PyLong_AsByteArray, about 200 instructions; anything else still
 * does (and raises what it raises). */
static inline unsigned long long small_unsigned(PyObject *v) {
    if (PyLong_CheckExact(v) && Py_SIZE(v) >= 0 && Py_SIZE(v) <= 2)
        return PyLong_AsUnsignedLongLongMask(v);
    return PyLong_AsUnsignedLongLong(v);
}

/* ---- decoded tuples (decode.c) ---- */

/* One column of a decoded tuple: 't' text (ptr, len) or 'n' null. */
typedef struct {
    const unsigned char *p;
    Py_ssize_t len;
    char kind;
} Col;

#define STACK_COLUMNS 64 /* wider tables take their column arrays from the heap */

int valid_utf8(const unsigned char *s, Py_ssize_t n);
Py_ssize_t read_tuple(const unsigned char *s, Py_ssize_t n, Py_ssize_t *pos, Col *cols, Py_ssize_t max);

/* A change message as read_change() finds it: its tag ('I', 'U' or 'D'), its tuples (NULL when it has none)
 * with their column counts, and the old tuple's kind ('K' the key, 'O' the whole row, 0 none). */
typedef struct {
    unsigned char tag;
    char old_kind;
    Col *new_cols, *old_cols;
    Py_ssize_t nnew, nold;
} Change;
int read_change(const unsigned char *s, Py_ssize_t n, Py_ssize_t ncolumns, Col *new_space, Col *old_space, Change *c);
int read_values(const char *who, PyObject *values, Col *cols, Py_ssize_t *size);

/* ---- the hash mask (sha256.c) ---- */

/* The states after the key's inner (0x36) and outer (0x5c) padded blocks: 16 words. */
typedef struct {
    uint32_t inner[8], outer[8];
} Hmac;

void sha256_init(void);
void hmac_hex(const Hmac *m, const unsigned char *s, size_t n, char hex[64]);

/* ---- a relation's plan (event.c reads it, transforms.c its transform) ---- */

/* The plan of a relation, checked (see the top of this file). masked: some column has a transform's code. */
typedef struct {
    PyObject *schema_table, *columns, *key_index, *route;
    Py_ssize_t ncolumns;
    int masked;
    Hmac hmac;
} Plan;

static inline long column_code(const Plan *plan, Py_ssize_t i) {
    return PyLong_AsLong(PyTuple_GET_ITEM(PyTuple_GET_ITEM(plan->columns, i), 1));
}

static inline int is_identity(PyObject *columns, Py_ssize_t i) {
    return PyTuple_GET_ITEM(PyTuple_GET_ITEM(columns, i), 3) == Py_True;
}

/* ---- values to JSON (json.c) ---- */

extern PyObject *json_dumps; /* orjson.dumps, set by set_encoder() */

void init_escapes(void);
int put_escaped(Buf *b, const unsigned char *s, Py_ssize_t n);
int put_string(Buf *b, const unsigned char *s, Py_ssize_t n);
int put_ascii_field(Buf *b, PyObject *text);
int put_value(Buf *b, long code, PyObject *conv, const Col *c, const Plan *plan);

/* ---- transforms (transforms.c) ---- */

int read_transform(const char *name, PyObject *transform, Plan *plan);
int published_text(const Plan *plan, Py_ssize_t i, const Col *c, char hex[64], const unsigned char **p,
                   Py_ssize_t *n);
PyObject *route_topic(const Plan *plan, const Col *new_cols, Py_ssize_t nnew, const Col *old_cols, Py_ssize_t nold,
                      char old_kind);

/* ---- CloudEvents (cloudevents.c) ---- */

/* The CloudEvents of one action of a relation: head bytes (structured) or the constant headers (binary). */
typedef struct {
    PyObject *head, *id_name, *time_name;
    int structured, lines, check_id;
} Ce;

int read_ce(const char *name, PyObject *ce, int action, Ce *out);
int ce_open(Buf *b, const Ce *ce, PyObject *ident, PyObject *time);
int ce_close(Buf *b, const Ce *ce);
int ce_headers(const Ce *ce, PyObject *ident, PyObject *time, PyObject **headers);

/* ---- events (event.c): the id of an event and the change message it is built from, also for debezium.c ---- */

PyObject *make_ident(PyObject *prefix, PyObject *number);

/* A change message held while its event is built: its buffer, its id, room for its columns (here up to
 * STACK_COLUMNS, else on the heap) and the change as read_change() found it. */
typedef struct {
    Py_buffer view;
    PyObject *ident;
    Col stack_new[STACK_COLUMNS], stack_old[STACK_COLUMNS];
    Col *heap;
    Change c;
} HeldChange;
/* 1: read; 0: not a change the compiled path reads (the Python path takes it); both hold h until
 * release_change(). -1: an error, nothing held. */
int hold_change(HeldChange *h, PyObject *msg, PyObject *prefix, PyObject *number, Py_ssize_t ncolumns);
void release_change(HeldChange *h);

/* ---- READ ids (blake2b.c) ---- */

typedef struct {
    uint64_t h[8], t[2];
    unsigned char buf[128];
    size_t buflen, outlen;
} Blake2b;

void blake2b_init(Blake2b *s, size_t outlen, const unsigned char *key, size_t keylen);
void blake2b_update(Blake2b *s, const unsigned char *p, size_t n);
void blake2b_final(Blake2b *s, unsigned char *out);
void read_ident(const Blake2b *prepared, const Col *keys, Py_ssize_t nkeys, char out[36]);

/* ---- the default event format (event.c), also for page.c ---- */

int read_plan(const char *name, PyObject *const *args, PyObject *ident, PyObject *time, Plan *plan);
PyObject *build_event(PyObject *ident, int with_ident, PyObject *commit_time, const Plan *plan, const char *action,
                      const Col *new_cols, Py_ssize_t nnew, const Col *old_cols, Py_ssize_t nold, char old_kind,
                      int want_key, Py_ssize_t size_hint, const Ce *ce);

/* ---- events as Message objects (message.c), for event.c, debezium.c and page.c ---- */

/* The most fields of listener.message.Message filled here, and how many of them come from the event (the first
 * ones, in field order: id, subject, body, schema, table, action, key; the others take the shape's defaults). */
#define MESSAGE_FIELDS 16
#define MESSAGE_SET 7
/* Where headers and header_lines are in that order (listener.event._MESSAGE_FIELDS) */
#define MESSAGE_HEADERS 7
#define MESSAGE_HEADER_LINES 10

/* What the events of one table share, read from a shape (cls, subject, schema, table, action, fields, defaults):
 * the class; subject, schema, table and action; and, when fields are the member descriptors of the class's
 * slots in field order and defaults the values of those after the first MESSAGE_SET, where each slot lives
 * (n > 0: the events are made without calling the class). */
typedef struct {
    PyTypeObject *cls;
    PyObject *shared[4];
    Py_ssize_t n;
    Py_ssize_t offsets[MESSAGE_FIELDS];
    PyObject *values[MESSAGE_FIELDS];
} MessageShape;

/* 1: made directly; 0: made by calling the class (fields or defaults do not fit); -1: not a shape (an error). */
int message_shape(PyObject *message, MessageShape *shape);
/* A new event of the shape; action, subject: its own (NULL: the shape's). Left out of the cyclic collector. */
PyObject *shaped_message(MessageShape *shape, PyObject *ident, PyObject *body, PyObject *key, PyObject *action,
                         PyObject *subject);
/* The shape's action for the change tagged tag ('I', 'U' or 'D'): its shared action is the tuple of the three. */
static inline PyObject *shape_action(const MessageShape *shape, char tag) {
    return PyTuple_GET_ITEM(shape->shared[3], tag == 'I' ? 0 : tag == 'U' ? 1 : 2);
}
/* For event() and debezium_event() (event.c): the shape argument, and the event of a change made from it. */
int change_shape(const char *name, PyObject *arg, MessageShape **shape);
PyObject *change_message(MessageShape *shape, char tag, PyObject *built, PyObject *subject);

/* ---- NATS frames (frames.c) ---- */

int frames_init(void);

/* ---- the module's functions (module.c's method table) ---- */

PyObject *hot_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *hot_read_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *hot_debezium_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *hot_debezium_read_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *hot_freeze_clock(PyObject *self, PyObject *ns);
PyObject *hot_begin(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *hot_nats_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *hot_nats_acks(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *hot_set_encoder(PyObject *self, PyObject *dumps);
PyObject *hot_hmac_prepare(PyObject *self, PyObject *key);
PyObject *hot_hmac_hex(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *hot_sha_extensions(PyObject *self, PyObject *unused);
PyObject *hot_set_libpq(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *hot_copy_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *hot_blake2b_prepare(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *hot_set_libpq_results(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *hot_read_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *hot_page_sizes(PyObject *self, PyObject *arg);
PyObject *hot_transaction_fields(PyObject *self, PyObject *fields);
PyObject *hot_change(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

#endif
