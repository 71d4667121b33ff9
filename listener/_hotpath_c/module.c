/* The extension module listener._hotpath: its method table and init.
 * Python twin: listener/hotpath.py (load(), the Module protocol).
 */
#include "hotpath.h"

static PyMethodDef methods[] = {
    {"event", (PyCFunction)(void (*)(void))hot_event, METH_FASTCALL,
     "event(msg, plan, prefix, number, commit_time, want_key) -> (ident, body, key[, topic]) | None"},
    {"read_row", (PyCFunction)(void (*)(void))hot_read_row, METH_FASTCALL,
     "read_row(values, plan, ident, read_time, want_key) -> (body, key[, topic]) | None"},
    {"debezium_event", (PyCFunction)(void (*)(void))hot_debezium_event, METH_FASTCALL,
     "debezium_event(msg, plan, prefix, number, commit_micros, xid, lsn, last_commit, now_ns, want_key) -> "
     "(ident, body, key) | None"},
    {"debezium_read_row", (PyCFunction)(void (*)(void))hot_debezium_read_row, METH_FASTCALL,
     "debezium_read_row(values, plan, read_micros, last_commit, now_ns, want_key) -> (body, key) | None"},
    {"freeze_clock", hot_freeze_clock, METH_O,
     "freeze_clock(ns | None): the time debezium_event's now_ns=None stands for (tests); None: the clock"},
    {"change", (PyCFunction)(void (*)(void))hot_change, METH_FASTCALL,
     "change(msg, compiled, txn, debezium) -> the Message of a change message of a compiled table | None"},
    {"transaction_fields", hot_transaction_fields, METH_O,
     "transaction_fields(descriptors): the slots of Transaction change() reads, once"},
    {"begin", (PyCFunction)(void (*)(void))hot_begin, METH_FASTCALL,
     "begin(msg, slot_hash) -> the fields of listener.event.Transaction for a Begin message | None"},
    {"nats_frames", (PyCFunction)(void (*)(void))hot_nats_frames, METH_FASTCALL,
     "nats_frames(batch, prefixes, seq, limit, header_bytes) -> (frames, payload) | None"},
    {"nats_acks", (PyCFunction)(void (*)(void))hot_nats_acks, METH_FASTCALL,
     "nats_acks(data, sid) -> (answers: seq or (seq text, payload), bytes consumed)"},
    {"set_encoder", hot_set_encoder, METH_O, "set_encoder(dumps): the JSON encoder for converted values"},
    {"hmac_prepare", hot_hmac_prepare, METH_O, "hmac_prepare(key) -> the key's prepared HMAC-SHA256 states"},
    {"hmac_hex", (PyCFunction)(void (*)(void))hot_hmac_hex, METH_FASTCALL,
     "hmac_hex(prepared, data, portable=False) -> HMAC-SHA256 of data, lower-case hex"},
    {"sha_extensions", hot_sha_extensions, METH_NOARGS, "sha_extensions() -> whether SHA-256 uses the CPU's"},
    {"set_libpq", (PyCFunction)(void (*)(void))hot_set_libpq, METH_FASTCALL,
     "set_libpq(getcopydata, freemem): addresses of PQgetCopyData and PQfreemem of psycopg's libpq"},
    {"copy_batch", (PyCFunction)(void (*)(void))hot_copy_batch, METH_FASTCALL,
     "copy_batch(pgconn_ptr, limit, starts, max_bytes=0) -> (payloads, wal_end, other, status)"},
    {"blake2b_prepare", (PyCFunction)(void (*)(void))hot_blake2b_prepare, METH_FASTCALL,
     "blake2b_prepare(key, data) -> the state of BLAKE2b-128 keyed with key after data (read_page's ids)"},
    {"set_libpq_results", (PyCFunction)(void (*)(void))hot_set_libpq_results, METH_FASTCALL,
     "set_libpq_results(ntuples, nfields, getvalue, getisnull, getlength): addresses of psycopg's libpq functions"},
    {"read_page", (PyCFunction)(void (*)(void))hot_read_page, METH_FASTCALL,
     "read_page(result_ptr, plan, ids, key_index, read_time, want_key, message) -> (messages, keys, bytes, largest)"},
    {"page_sizes", hot_page_sizes, METH_O, "page_sizes(result_ptr) -> (value bytes, largest row bytes) of a FETCH result"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "listener._hotpath",
    "Compiled fast path: a pgoutput change message -> the event's JSON body (see listener/hotpath.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__hotpath(void) {
    init_escapes();
    sha256_init();
    if (frames_init() < 0)
        return NULL;
    return PyModule_Create(&module);
}
