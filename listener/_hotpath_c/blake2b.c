/* BLAKE2b (RFC 7693) for the ids of READ events: a state prepared once per backfilled table (the optional
 * key, then the slot, backfill and table), copied and finished per row with the row's key.
 * Python twin: hashlib.blake2b as listener.event.read_event_ids uses it.
 */
#include "hotpath.h"

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t rotr64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64(const unsigned char *p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v; /* one load where the words are little-endian already */
    memcpy(&v, p, sizeof v);
    return v;
#else
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
#endif
}

#define MIX(a, b, c, d, x, y)                                                                                         \
    do {                                                                                                               \
        v[a] = v[a] + v[b] + (x);                                                                                      \
        v[d] = rotr64(v[d] ^ v[a], 32);                                                                                \
        v[c] = v[c] + v[d];                                                                                            \
        v[b] = rotr64(v[b] ^ v[c], 24);                                                                                \
        v[a] = v[a] + v[b] + (y);                                                                                      \
        v[d] = rotr64(v[d] ^ v[a], 16);                                                                                \
        v[c] = v[c] + v[d];                                                                                            \
        v[b] = rotr64(v[b] ^ v[c], 63);                                                                                \
    } while (0)

static void compress(Blake2b *s, const unsigned char block[128], int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++)
        m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = s->h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= s->t[0];
    v[13] ^= s->t[1];
    if (last)
        v[14] = ~v[14];
    /* unrolled, the message schedule's indices are constants and m[] and v[] stay in registers: a row's id took
     * ~300 ns at -O2 with the loop, 8% of a backfill's CPU */
#pragma GCC unroll 12
    for (int r = 0; r < 12; r++) {
        const uint8_t *g = SIGMA[r];
        MIX(0, 4, 8, 12, m[g[0]], m[g[1]]);
        MIX(1, 5, 9, 13, m[g[2]], m[g[3]]);
        MIX(2, 6, 10, 14, m[g[4]], m[g[5]]);
        MIX(3, 7, 11, 15, m[g[6]], m[g[7]]);
        MIX(0, 5, 10, 15, m[g[8]], m[g[9]]);
        MIX(1, 6, 11, 12, m[g[10]], m[g[11]]);
        MIX(2, 7, 8, 13, m[g[12]], m[g[13]]);
        MIX(3, 4, 9, 14, m[g[14]], m[g[15]]);
    }
    for (int i = 0; i < 8; i++)
        s->h[i] ^= v[i] ^ v[i + 8];
}

static void counter_add(Blake2b *s, uint64_t n) {
    s->t[0] += n;
    if (s->t[0] < n)
        s->t[1]++;
}

void blake2b_init(Blake2b *s, size_t outlen, const unsigned char *key, size_t keylen) {
    memset(s, 0, sizeof(*s));
    for (int i = 0; i < 8; i++)
        s->h[i] = IV[i];
    s->h[0] ^= 0x01010000ULL ^ ((uint64_t)keylen << 8) ^ (uint64_t)outlen;
    s->outlen = outlen;
    if (keylen > 0) {
        memcpy(s->buf, key, keylen); /* the key, zero-padded, is the first block */
        s->buflen = 128;
    }
}

void blake2b_update(Blake2b *s, const unsigned char *p, size_t n) {
    while (n > 0) {
        if (s->buflen == 128) { /* a full block is compressed only once more data follows it */
            counter_add(s, 128);
            compress(s, s->buf, 0);
            s->buflen = 0;
        }
        size_t take = 128 - s->buflen;
        if (take > n)
            take = n;
        memcpy(s->buf + s->buflen, p, take);
        s->buflen += take;
        p += take;
        n -= take;
    }
}

void blake2b_final(Blake2b *s, unsigned char *out) {
    counter_add(s, s->buflen);
    memset(s->buf + s->buflen, 0, 128 - s->buflen);
    compress(s, s->buf, 1);
    for (size_t i = 0; i < s->outlen; i++)
        out[i] = (unsigned char)(s->h[i / 8] >> (8 * (i % 8)));
}

/* blake2b_prepare(key, data) -> the state of BLAKE2b-128 keyed with key (b"": none, at most 64 bytes)
 * after data, as bytes: what read_page() starts each row's id from. */
PyObject *hot_blake2b_prepare(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1]) || PyBytes_GET_SIZE(args[0]) > 64) {
        PyErr_SetString(PyExc_TypeError, "blake2b_prepare(key: bytes of at most 64, data: bytes)");
        return NULL;
    }
    Blake2b s;
    blake2b_init(&s, 16, (const unsigned char *)PyBytes_AS_STRING(args[0]), (size_t)PyBytes_GET_SIZE(args[0]));
    blake2b_update(&s, (const unsigned char *)PyBytes_AS_STRING(args[1]), (size_t)PyBytes_GET_SIZE(args[1]));
    return PyBytes_FromStringAndSize((const char *)&s, sizeof(s));
}

/* The READ id of a row: the prepared state, then "\0" + each key column's text ("\0\1" for NULL), as a
 * UUID version 8 (listener.event.hashed_uuid) written to out (36 characters). */
void read_ident(const Blake2b *prepared, const Col *keys, Py_ssize_t nkeys, char out[36]) {
    static const char HEX[] = "0123456789abcdef";
    Blake2b s = *prepared;
    for (Py_ssize_t k = 0; k < nkeys; k++) {
        if (keys[k].kind == 'n') {
            blake2b_update(&s, (const unsigned char *)"\0\1", 2);
        } else {
            blake2b_update(&s, (const unsigned char *)"\0", 1);
            blake2b_update(&s, keys[k].p, (size_t)keys[k].len);
        }
    }
    unsigned char digest[16];
    blake2b_final(&s, digest);
    char hex[32];
    for (int i = 0; i < 16; i++) {
        hex[2 * i] = HEX[digest[i] >> 4];
        hex[2 * i + 1] = HEX[digest[i] & 15];
    }
    /* 8-4-4-4-12; version 8 in place of digit 12, the variant's top bits 10 in digit 16 */
    memcpy(out, hex, 8);
    out[8] = '-';
    memcpy(out + 9, hex + 8, 4);
    out[13] = '-';
    out[14] = '8';
    memcpy(out + 15, hex + 13, 3);
    out[18] = '-';
    int d = hex[16] <= '9' ? hex[16] - '0' : hex[16] - 'a' + 10;
    out[19] = "89ab"[d & 3];
    memcpy(out + 20, hex + 17, 3);
    out[23] = '-';
    memcpy(out + 24, hex + 20, 12);
}
