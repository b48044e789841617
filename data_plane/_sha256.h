/* SHA-256 (FIPS 180-4) for the gateway's C accelerators: the portable compression, and the same
 * in a few dozen instructions with the x86-64 SHA extensions (chosen by CPUID when a module is
 * initialised: call sha256_choose_block(1)). Static functions: each extension that includes this
 * header gets its own copy. */
#ifndef PROCTOR_SHA256_H
#define PROCTOR_SHA256_H

#include <stdint.h>
#include <string.h>

typedef struct {
    uint32_t h[8];
    uint64_t length;  /* bytes hashed so far */
    unsigned char block[64];
    size_t used;
} sha256_t;

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void
sha256_compress(uint32_t h[8], const unsigned char *block)
{
    uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = ((uint32_t)block[4 * i] << 24) | ((uint32_t)block[4 * i + 1] << 16) |
               ((uint32_t)block[4 * i + 2] << 8) | (uint32_t)block[4 * i + 3];
    for (i = 16; i < 64; i++) {
        uint32_t s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; k = h[7];
    for (i = 0; i < 64; i++) {
        t1 = k + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

/* x86-64 with the SHA extensions: the same compression in a few dozen instructions (chosen at
 * import, by CPUID; everything else uses the portable one above). */
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_SHA_NI_PATH 1

__attribute__((target("sha,sse4.1,ssse3")))
static void
sha256_compress_ni(uint32_t h[8], const unsigned char *block, size_t blocks)
{
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i w[4], message, state0, state1, tmp, abef, cdgh;
    int g;

    tmp = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[0]), 0xB1);  /* CDAB */
    state1 = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[4]), 0x1B);  /* EFGH */
    state0 = _mm_alignr_epi8(tmp, state1, 8);  /* ABEF */
    state1 = _mm_blend_epi16(state1, tmp, 0xF0);  /* CDGH */
    for (; blocks > 0; blocks--, block += 64) {  /* the state stays in registers from block to block */
        abef = state0;
        cdgh = state1;
        for (g = 0; g < 16; g++) {
            __m128i current;
            if (g < 4) {
                current = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(block + 16 * g)), swap);
            } else {
                /* W[t] = s1(W[t-2]) + W[t-7] + s0(W[t-15]) + W[t-16], four at a time */
                __m128i oldest = w[g & 3], older = w[(g + 1) & 3], previous2 = w[(g + 2) & 3],
                        previous = w[(g + 3) & 3];
                current = _mm_sha256msg1_epu32(oldest, older);
                current = _mm_add_epi32(current, _mm_alignr_epi8(previous, previous2, 4));
                current = _mm_sha256msg2_epu32(current, previous);
            }
            w[g & 3] = current;
            message = _mm_add_epi32(current, _mm_loadu_si128((const __m128i *)&K256[4 * g]));
            state1 = _mm_sha256rnds2_epu32(state1, state0, message);
            message = _mm_shuffle_epi32(message, 0x0E);
            state0 = _mm_sha256rnds2_epu32(state0, state1, message);
        }
        state0 = _mm_add_epi32(state0, abef);
        state1 = _mm_add_epi32(state1, cdgh);
    }
    tmp = _mm_shuffle_epi32(state0, 0x1B);  /* FEBA */
    state1 = _mm_shuffle_epi32(state1, 0xB1);  /* DCHG */
    state0 = _mm_blend_epi16(tmp, state1, 0xF0);  /* DCBA */
    state1 = _mm_alignr_epi8(state1, tmp, 8);  /* HGFE */
    _mm_storeu_si128((__m128i *)&h[0], state0);
    _mm_storeu_si128((__m128i *)&h[4], state1);
}

static int
cpu_has_sha_ni(void)
{
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 19)) || !(c & (1u << 9)))  /* SSE4.1, SSSE3 */
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (b >> 29) & 1;  /* SHA */
}
#endif

static void
sha256_compress_blocks(uint32_t h[8], const unsigned char *block, size_t blocks)
{
    for (; blocks > 0; blocks--, block += 64)
        sha256_compress(h, block);
}

/* Compress `blocks` whole 64-byte blocks: the portable way, or SHA-NI (see sha256_choose_block). */
static void (*sha256_blocks)(uint32_t h[8], const unsigned char *block, size_t blocks) = sha256_compress_blocks;

static void
sha256_init(sha256_t *s)
{
    static const uint32_t initial[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                        0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, initial, sizeof(initial));
    s->length = 0;
    s->used = 0;
}

static void
sha256_update(sha256_t *s, const unsigned char *data, size_t size)
{
    s->length += size;
    if (s->used > 0) {  /* complete the pending block first */
        size_t take = 64 - s->used < size ? 64 - s->used : size;
        memcpy(s->block + s->used, data, take);
        s->used += take;
        data += take;
        size -= take;
        if (s->used < 64)
            return;
        sha256_blocks(s->h, s->block, 1);
        s->used = 0;
    }
    if (size >= 64) {  /* whole blocks straight from the input */
        sha256_blocks(s->h, data, size / 64);
        data += size - size % 64;
        size %= 64;
    }
    memcpy(s->block, data, size);
    s->used = size;
}

static void
sha256_final(sha256_t *s, unsigned char digest[32])
{
    uint64_t bits = s->length * 8;
    int i;
    s->block[s->used++] = 0x80;
    if (s->used > 56) {
        memset(s->block + s->used, 0, 64 - s->used);
        sha256_blocks(s->h, s->block, 1);
        s->used = 0;
    }
    memset(s->block + s->used, 0, 56 - s->used);
    for (i = 0; i < 8; i++)
        s->block[56 + i] = (unsigned char)(bits >> (56 - 8 * i));
    sha256_blocks(s->h, s->block, 1);
    for (i = 0; i < 8; i++) {
        digest[4 * i] = (unsigned char)(s->h[i] >> 24);
        digest[4 * i + 1] = (unsigned char)(s->h[i] >> 16);
        digest[4 * i + 2] = (unsigned char)(s->h[i] >> 8);
        digest[4 * i + 3] = (unsigned char)s->h[i];
    }
}

/* Use the SHA extensions when `want_ni` and the CPU has them; returns whether they are in use. */
static int
sha256_choose_block(int want_ni)
{
    sha256_blocks = sha256_compress_blocks;
#ifdef HAVE_SHA_NI_PATH
    if (want_ni && cpu_has_sha_ni())
        sha256_blocks = sha256_compress_ni;
#endif
    return sha256_blocks != sha256_compress_blocks;
}

#endif /* PROCTOR_SHA256_H */
