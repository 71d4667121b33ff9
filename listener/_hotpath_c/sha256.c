/* SHA-256 (FIPS 180-4) and HMAC (RFC 2104) for the hash mask of a table's transform.
 * Python twin: listener/transforms.py (hmac.new(key, text, sha256).hexdigest() of the hash mask).
 */
#include "hotpath.h"

/* The key's padded blocks are compressed once (hmac_prepare); a value then costs two compressions when it is
 * shorter than 56 bytes. */

static const uint32_t SHA256_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static const uint32_t SHA256_IV[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                      0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

/* One 64-byte block into the state: the portable code, or the x86 SHA extensions where the CPU has them. */
static void (*sha256_block)(uint32_t h[8], const unsigned char *p);

static void sha256_block_portable(uint32_t h[8], const unsigned char *p) {
    uint32_t w[64];
    for (int t = 0; t < 16; t++)
        w[t] = ((uint32_t)p[4 * t] << 24) | ((uint32_t)p[4 * t + 1] << 16) | ((uint32_t)p[4 * t + 2] << 8) |
               (uint32_t)p[4 * t + 3];
    for (int t = 16; t < 64; t++) {
        uint32_t s0 = ROTR(w[t - 15], 7) ^ ROTR(w[t - 15], 18) ^ (w[t - 15] >> 3);
        uint32_t s1 = ROTR(w[t - 2], 17) ^ ROTR(w[t - 2], 19) ^ (w[t - 2] >> 10);
        w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int t = 0; t < 64; t++) {
        uint32_t t1 = k + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + SHA256_K[t] + w[t];
        uint32_t t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += k;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>

/* The same block with the SHA-NI instructions: the state kept as {A,B,E,F} and {C,D,G,H}, two rounds per
 * sha256rnds2, the message schedule four words at a time (sha256msg1/msg2). */
__attribute__((target("sha,sse4.1,ssse3"))) static void sha256_block_shani(uint32_t h[8], const unsigned char *p) {
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL); /* big-endian words */
    __m128i abcd = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)h), 0xB1);     /* B A D C */
    __m128i efgh = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)(h + 4)), 0x1B); /* H G F E */
    __m128i abef = _mm_alignr_epi8(abcd, efgh, 8);                                     /* F E B A */
    __m128i cdgh = _mm_blend_epi16(efgh, abcd, 0xF0);                                  /* H G D C */
    __m128i abef_in = abef, cdgh_in = cdgh, w[4];
    for (int g = 0; g < 16; g++) {
        __m128i words;
        if (g < 4) {
            words = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * g)), swap);
        } else {
            __m128i t = _mm_sha256msg1_epu32(w[g & 3], w[(g - 3) & 3]);
            t = _mm_add_epi32(t, _mm_alignr_epi8(w[(g - 1) & 3], w[(g - 2) & 3], 4));
            words = _mm_sha256msg2_epu32(t, w[(g - 1) & 3]);
        }
        w[g & 3] = words;
        __m128i k = _mm_add_epi32(words, _mm_loadu_si128((const __m128i *)&SHA256_K[4 * g]));
        cdgh = _mm_sha256rnds2_epu32(cdgh, abef, k);
        abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(k, 0x0E));
    }
    abef = _mm_add_epi32(abef, abef_in);
    cdgh = _mm_add_epi32(cdgh, cdgh_in);
    __m128i abef_ordered = _mm_shuffle_epi32(abef, 0x1B); /* A B E F */
    __m128i ghcd = _mm_shuffle_epi32(cdgh, 0xB1);         /* G H C D */
    _mm_storeu_si128((__m128i *)h, _mm_blend_epi16(abef_ordered, ghcd, 0xF0));      /* A B C D */
    _mm_storeu_si128((__m128i *)(h + 4), _mm_alignr_epi8(ghcd, abef_ordered, 8)); /* E F G H */
}

static int cpu_has_sha(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_SSE4_1) || !(c & bit_SSSE3))
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (b >> 29) & 1;
}
#else
static int cpu_has_sha(void) { return 0; }
#define sha256_block_shani sha256_block_portable
#endif

/* Finish a hash whose state h has absorbed `done` bytes (a multiple of 64) with the n bytes at s. */
static void sha256_finish(uint32_t h[8], uint64_t done, const unsigned char *s, size_t n, unsigned char out[32]) {
    uint64_t bits = (done + n) * 8;
    while (n >= 64) {
        sha256_block(h, s);
        s += 64;
        n -= 64;
    }
    unsigned char last[128];
    memcpy(last, s, n);
    last[n] = 0x80;
    size_t size = n < 56 ? 64 : 128;
    memset(last + n + 1, 0, size - n - 1);
    for (int i = 0; i < 8; i++)
        last[size - 1 - i] = (unsigned char)(bits >> (8 * i));
    sha256_block(h, last);
    if (size == 128)
        sha256_block(h, last + 64);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(h[i] >> 24);
        out[4 * i + 1] = (unsigned char)(h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(h[i] >> 8);
        out[4 * i + 3] = (unsigned char)h[i];
    }
}

static void hmac_prepare_key(Hmac *m, const unsigned char *key, size_t n) {
    unsigned char block[64] = {0}, pad[64];
    if (n > 64) {
        uint32_t h[8];
        memcpy(h, SHA256_IV, sizeof h);
        sha256_finish(h, 0, key, n, block);
    } else {
        memcpy(block, key, n);
    }
    memcpy(m->inner, SHA256_IV, sizeof m->inner);
    memcpy(m->outer, SHA256_IV, sizeof m->outer);
    for (int i = 0; i < 64; i++)
        pad[i] = block[i] ^ 0x36;
    sha256_block(m->inner, pad);
    for (int i = 0; i < 64; i++)
        pad[i] = block[i] ^ 0x5c;
    sha256_block(m->outer, pad);
}

/* HMAC-SHA256 of the n bytes at s as 64 lower-case hex digits. */
void hmac_hex(const Hmac *m, const unsigned char *s, size_t n, char hex[64]) {
    static const char digits[] = "0123456789abcdef";
    uint32_t h[8];
    unsigned char inner[32], mac[32];
    memcpy(h, m->inner, sizeof h);
    sha256_finish(h, 64, s, n, inner);
    memcpy(h, m->outer, sizeof h);
    sha256_finish(h, 64, inner, 32, mac);
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[mac[i] >> 4];
        hex[2 * i + 1] = digits[mac[i] & 15];
    }
}

/* The block code this CPU runs: its SHA extensions where it has them (module init). */
void sha256_init(void) { sha256_block = cpu_has_sha() ? sha256_block_shani : sha256_block_portable; }

/* hmac_prepare(key: bytes) -> bytes: the key's prepared states for plans (and hmac_hex). */
PyObject *hot_hmac_prepare(PyObject *self, PyObject *key) {
    (void)self;
    if (!PyBytes_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "hmac_prepare(key: bytes)");
        return NULL;
    }
    Hmac m;
    hmac_prepare_key(&m, (const unsigned char *)PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key));
    return PyBytes_FromStringAndSize((const char *)&m, sizeof m);
}

/* hmac_hex(prepared: bytes, data: bytes, portable: bool = False) -> str: HMAC-SHA256 of data, lower-case
 * hex; portable: with the portable block code even where the CPU's SHA extensions are used (tests). */
PyObject *hot_hmac_hex(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs < 2 || nargs > 3 || !PyBytes_Check(args[0]) || PyBytes_GET_SIZE(args[0]) != (Py_ssize_t)sizeof(Hmac) ||
        !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "hmac_hex(prepared: bytes from hmac_prepare, data: bytes, portable=False)");
        return NULL;
    }
    int portable = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
    if (portable < 0)
        return NULL;
    Hmac m;
    char hex[64];
    memcpy(&m, PyBytes_AS_STRING(args[0]), sizeof m);
    void (*chosen)(uint32_t *, const unsigned char *) = sha256_block;
    if (portable)
        sha256_block = sha256_block_portable;
    hmac_hex(&m, (const unsigned char *)PyBytes_AS_STRING(args[1]), (size_t)PyBytes_GET_SIZE(args[1]), hex);
    sha256_block = chosen;
    return PyUnicode_DecodeASCII(hex, 64, "strict");
}

PyObject *hot_sha_extensions(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyBool_FromLong(sha256_block != sha256_block_portable);
}
