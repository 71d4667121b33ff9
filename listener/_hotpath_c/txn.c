/* Transactions: a pgoutput Begin message -> what every event of the transaction shares (its id's prefix,
 * its commitTime text), in one call instead of a decode, two formatted strings and a datetime per
 * transaction (most OLTP transactions carry one row: this is paid once per event there).
 * Python twin: listener/event.py (EventBuilder.begin_message / begin, event_id_parts, commit_time_text).
 */
#include "hotpath.h"

static inline uint64_t be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static inline void put_hex(char *out, uint64_t v, int digits) {
    static const char hex[] = "0123456789abcdef";
    for (int i = digits - 1; i >= 0; i--, v >>= 4)
        out[i] = hex[v & 15];
}

static inline void put_dec(char *out, long long v, int digits) {
    for (int i = digits - 1; i >= 0; i--, v /= 10)
        out[i] = (char)('0' + v % 10);
}

/* Microseconds since 2000-01-01 UTC as commit_time_text writes them: 2026-01-02T03:04:05.123456Z (27
 * characters). 0 for a year outside 1000..9999 (the Python path writes those). */
static int commit_time(int64_t micros, char out[27]) {
    int64_t secs = micros / 1000000, us = micros % 1000000;
    if (us < 0) {
        us += 1000000;
        secs -= 1;
    }
    int64_t days = secs / 86400, sod = secs % 86400;
    if (sod < 0) {
        sod += 86400;
        days -= 1;
    }
    /* days since 1970-01-01 -> civil date (H. Hinnant's days_from_civil, inverted) */
    int64_t z = days + 10957 + 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int64_t day = doy - (153 * mp + 2) / 5 + 1;
    int64_t month = mp < 10 ? mp + 3 : mp - 9;
    int64_t year = yoe + era * 400 + (month <= 2);
    if (year < 1000 || year > 9999)
        return 0;
    put_dec(out, year, 4);
    out[4] = '-';
    put_dec(out + 5, month, 2);
    out[7] = '-';
    put_dec(out + 8, day, 2);
    out[10] = 'T';
    put_dec(out + 11, sod / 3600, 2);
    out[13] = ':';
    put_dec(out + 14, sod / 60 % 60, 2);
    out[16] = ':';
    put_dec(out + 17, sod % 60, 2);
    out[19] = '.';
    put_dec(out + 20, us, 6);
    out[26] = 'Z';
    return 1;
}

/* begin(msg, slot_hash) -> (final_lsn, commit_time: str, 0, id_prefix: str, id_base: int, xid, commit_micros)
 *   | None: the fields of listener.event.Transaction for a Begin message ('B', final LSN, commit time, xid),
 *   in their order; None for anything else (the Python path decodes it, and says what is wrong). */
PyObject *hot_begin(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "begin(msg: bytes, slot_hash: int)");
        return NULL;
    }
    unsigned long slot_hash = PyLong_AsUnsignedLong(args[1]);
    if (slot_hash == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    if (PyBytes_GET_SIZE(args[0]) != 21 || s[0] != 'B' || slot_hash > 0xFFFFFFFFUL)
        Py_RETURN_NONE;
    uint64_t lsn = be64(s + 1);
    int64_t micros = (int64_t)be64(s + 9);
    uint32_t xid = ((uint32_t)s[17] << 24) | ((uint32_t)s[18] << 16) | ((uint32_t)s[19] << 8) | (uint32_t)s[20];
    char text[27];
    if (!commit_time(micros, text))
        Py_RETURN_NONE;
    /* event_id_parts: f"{slot_hash:08x}-{lsn_hi:04x}-{0x8000 | lsn_mid:04x}-{0x8000 | lsn_lo:04x}-" */
    char prefix[24];
    put_hex(prefix, slot_hash, 8);
    prefix[8] = '-';
    put_hex(prefix + 9, lsn >> 48, 4);
    prefix[13] = '-';
    put_hex(prefix + 14, 0x8000 | ((lsn >> 36) & 0xFFF), 4);
    prefix[18] = '-';
    put_hex(prefix + 19, 0x8000 | ((lsn >> 22) & 0x3FFF), 4);
    prefix[23] = '-';
    return Py_BuildValue("(Ks#is#KkL)", (unsigned long long)lsn, text, (Py_ssize_t)27, 0, prefix, (Py_ssize_t)24,
                         (unsigned long long)(lsn & 0x3FFFFF) << 26, (unsigned long)xid, (long long)micros);
}
