/* One record of a session recording (data_plane/core/recording.py states the format): header, payload and
 * the SHA-256 link to the previous record, written with one writev (_recording.c, the Python relay's
 * writer) or appended to a mapped spool (_fastrelay.c, the C data path). Include after "_sha256.h". */
#ifndef PROCTOR_RECORD_H
#define PROCTOR_RECORD_H

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#define RECORD_HEADER_SIZE 22 /* !QdBBI: seq, unix time, direction, kind, payload length */
#define RECORD_HASH_SIZE 32

static void
record_put_be64(unsigned char *p, uint64_t v)
{
    int i;
    for (i = 7; i >= 0; i--) {
        p[i] = (unsigned char)v;
        v >>= 8;
    }
}

/* The record's header, and its link: SHA-256 over the previous link, the header and the payload. */
static void
record_prepare(const unsigned char prev[RECORD_HASH_SIZE], uint64_t seq, double now, int direction, int kind,
               const unsigned char *payload, size_t n, unsigned char header[RECORD_HEADER_SIZE],
               unsigned char link[RECORD_HASH_SIZE])
{
    uint64_t time_bits;
    sha256_t digest;
    record_put_be64(header, seq);
    memcpy(&time_bits, &now, sizeof time_bits); /* IEEE 754, as struct's 'd' packs it */
    record_put_be64(header + 8, time_bits);
    header[16] = (unsigned char)direction;
    header[17] = (unsigned char)kind;
    header[18] = (unsigned char)((uint64_t)n >> 24);
    header[19] = (unsigned char)((uint64_t)n >> 16);
    header[20] = (unsigned char)((uint64_t)n >> 8);
    header[21] = (unsigned char)n;
    sha256_init(&digest);
    sha256_update(&digest, prev, RECORD_HASH_SIZE);
    sha256_update(&digest, header, RECORD_HEADER_SIZE);
    sha256_update(&digest, payload, n);
    sha256_final(&digest, link);
}

/* The record as three pieces: header, payload, link. */
static void
record_pieces(struct iovec iov[3], unsigned char *header, const unsigned char *payload, size_t n, unsigned char *link)
{
    iov[0].iov_base = header;
    iov[0].iov_len = RECORD_HEADER_SIZE;
    iov[1].iov_base = (void *)payload;
    iov[1].iov_len = n;
    iov[2].iov_base = link;
    iov[2].iov_len = RECORD_HASH_SIZE;
}

/* Writes the record; `link` receives its hash. Returns the bytes written, or -1 (errno set; a short
 * write on a regular file, the disk being full, is reported with errno = ENOSPC). Retries EINTR only when
 * `retry_eintr` is set (Python's caller checks for signals itself). */
static inline ssize_t
record_write(int fd, const unsigned char prev[RECORD_HASH_SIZE], uint64_t seq, double now, int direction, int kind,
             const unsigned char *payload, size_t n, unsigned char link[RECORD_HASH_SIZE], int retry_eintr)
{
    unsigned char header[RECORD_HEADER_SIZE];
    struct iovec iov[3];
    ssize_t written;
    size_t total = RECORD_HEADER_SIZE + n + RECORD_HASH_SIZE;

    record_prepare(prev, seq, now, direction, kind, payload, n, header, link);
    record_pieces(iov, header, payload, n, link);
    do {
        written = writev(fd, iov, 3);
    } while (written < 0 && errno == EINTR && retry_eintr);
    if (written >= 0 && (size_t)written != total) {
        errno = ENOSPC;
        return -1;
    }
    return written;
}

#endif /* PROCTOR_RECORD_H */
