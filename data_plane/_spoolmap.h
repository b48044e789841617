/* Appending to a spool file through a shared memory mapping: what the C data path writes per read
 * (recording records, evidence rows) becomes a copy into the page cache instead of a write(2), with
 * the same durability: the bytes are in the page cache before the caller relays anything, so a
 * gateway crash loses none of them, and fsync(2) on the file flushes them as it flushes written ones.
 *
 * The file is extended a window at a time with fallocate(2), so that a full disk is an error here
 * and never a SIGBUS on a store into a hole. Until it is released, the file ends in zero bytes
 * nobody wrote yet (readers of a live spool stop at them: a recording record's link must verify,
 * an evidence line holds no NUL); `spoolmap_release` cuts the file back to what was written, and a
 * gateway that died before that leaves the zeros to the shipper, which trims them.
 *
 * A failed write leaves nothing behind for what follows: later appends fail too, and the release
 * cuts the file back to the last whole write, so the Python writer's appends never follow a torn one.
 *
 * The mapping needs a read-write descriptor without O_APPEND (the spool's own are write-only and
 * appending): the file is opened again, through /proc/self/fd, on the first write. */
#ifndef PROCTOR_SPOOLMAP_H
#define PROCTOR_SPOOLMAP_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define SPOOLMAP_FIRST_WINDOW ((size_t)64 << 10)
#define SPOOLMAP_MAX_WINDOW ((size_t)1 << 20)
#define SPOOLMAP_COPY_MAX ((size_t)4 << 10) /* larger writes go through pwritev(2) */
#define SPOOLMAP_POPULATE ((uint64_t)32 << 10)

typedef struct {
    int fd;              /* the spool's descriptor (write-only, appending) */
    int map_fd;          /* read-write, for the mapping and pwritev; -1 before the first write */
    unsigned char *base; /* the current window, or NULL */
    uint64_t base_off;   /* file offset of base (page aligned) */
    size_t base_len;
    uint64_t end;        /* bytes in the file that hold data */
    uint64_t allocated;  /* the file's size: end plus zeros not written yet */
    uint64_t populated;  /* up to here the window's pages were made writable ahead of the copies */
    int busy;            /* a first window was filled: pages are made writable ahead (see spoolmap_copy) */
    uint64_t page;       /* the page size */
    size_t window;       /* the next window's size */
    int started;         /* end was read from the file (the first write) */
    int unmappable;      /* fallocate, mmap or the reopen is not supported here: plain appends */
    int failed;          /* a write failed: nothing more is written */
} spoolmap;

static void
spoolmap_init(spoolmap *m, int fd)
{
    memset(m, 0, sizeof *m);
    m->fd = fd;
    m->map_fd = -1;
    m->window = SPOOLMAP_FIRST_WINDOW;
    m->page = (uint64_t)sysconf(_SC_PAGESIZE);
}

static int
spoolmap_start(spoolmap *m)
{
    char path[64];
    struct stat st;
    if (fstat(m->fd, &st) < 0)
        return -1;
    m->end = m->allocated = (uint64_t)st.st_size;
    m->started = 1;
    snprintf(path, sizeof path, "/proc/self/fd/%d", m->fd);
    m->map_fd = open(path, O_RDWR | O_CLOEXEC);
    if (m->map_fd < 0)
        m->unmappable = 1;
    return 0;
}

/* The file cannot be mapped here: back to plain appends, after cutting off the zeros allocated. */
static void
spoolmap_unmappable(spoolmap *m)
{
    int saved = errno;
    if (m->base != NULL) {
        munmap(m->base, m->base_len);
        m->base = NULL;
    }
    if (m->allocated > m->end && ftruncate(m->fd, (off_t)m->end) == 0)
        m->allocated = m->end;
    m->unmappable = 1;
    errno = saved;
}

/* Allocates the file's blocks up to `to` (beyond the allocated end): 0, or -1 with errno set. */
static int
spoolmap_allocate(spoolmap *m, uint64_t to)
{
    int rc;
    do {
        rc = fallocate(m->map_fd, 0, (off_t)m->allocated, (off_t)(to - m->allocated));
    } while (rc < 0 && errno == EINTR);
    if (rc == 0)
        m->allocated = to;
    return rc;
}

/* Maps a window that holds n more bytes at the end: 0, or -1 with errno set (ENOSPC: the disk is
 * full; other failures set `unmappable`, and the caller appends instead). */
static int
spoolmap_remap(spoolmap *m, size_t n)
{
    uint64_t off = m->end & ~(m->page - 1);
    size_t len = m->window;
    void *p;
    while (len < (m->end - off) + n)
        len *= 2;
    if (m->base != NULL) {
        munmap(m->base, m->base_len);
        m->base = NULL;
        m->busy = 1;
    }
    if (off + len > m->allocated && spoolmap_allocate(m, off + len) < 0) {
        if (errno != ENOSPC && errno != EDQUOT)
            spoolmap_unmappable(m);
        return -1;
    }
    p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, m->map_fd, (off_t)off);
    if (p == MAP_FAILED) {
        spoolmap_unmappable(m);
        return -1;
    }
    m->base = p;
    m->base_off = off;
    m->base_len = len;
    m->populated = m->busy ? off : off + len;
    if (m->window < SPOOLMAP_MAX_WINDOW)
        m->window *= 2;
    return 0;
}

/* Copies the pieces into the mapping, the first piece last, after a release fence: 1 done, 0 not
 * mapped here (the caller writes instead), -1 failed (errno set). */
static int
spoolmap_copy(spoolmap *m, const struct iovec *iov, int count, size_t total)
{
    unsigned char *p;
    size_t at;
    int i;
    if (m->base == NULL || m->end + total > m->base_off + m->base_len) {
        if (spoolmap_remap(m, total) < 0)
            return m->unmappable ? 0 : -1;
    }
    p = m->base + (m->end - m->base_off);
#ifdef MADV_POPULATE_WRITE
    if (m->end + total > m->populated) {
        /* The first store into each page of a window faults (the page is allocated and made writable);
         * one call makes the next pages writable for less. Only in a busy session's windows: an idle
         * one's would hold pages it may never fill. */
        uint64_t to = (m->end + total + SPOOLMAP_POPULATE - 1) & ~(SPOOLMAP_POPULATE - 1);
        uint64_t from = m->populated > (m->end & ~(m->page - 1)) ? m->populated : (m->end & ~(m->page - 1));
        if (to > m->base_off + m->base_len)
            to = m->base_off + m->base_len;
        if (madvise(m->base + (from - m->base_off), (size_t)(to - from), MADV_POPULATE_WRITE) == 0)
            m->populated = to;
        else
            m->populated = m->base_off + m->base_len; /* not here (older kernels): the page faults will do */
    }
#endif
    at = iov[0].iov_len;
    for (i = 1; i < count; i++) {
        memcpy(p + at, iov[i].iov_base, iov[i].iov_len);
        at += iov[i].iov_len;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(p, iov[0].iov_base, iov[0].iov_len);
    m->end += total;
    return 1;
}

/* Before a large write past the allocated end: allocates the file ahead of it, to the end of a window as
 * a mapping would (and doubling the windows the same way). A write into allocated blocks costs the
 * kernel about half the CPU of one that extends the file and reserves its blocks page by page (ext4's
 * delayed allocation): a 1M-row result is over 100 MB of such writes. 0, or -1 with errno set when the
 * disk has no room for this write (a window it has no room for is not an error); where fallocate(2) is
 * not supported the write goes ahead without it. */
static int
spoolmap_preallocate(spoolmap *m, size_t n)
{
    uint64_t to = (m->end + n + m->window - 1) & ~((uint64_t)m->window - 1);
    while (spoolmap_allocate(m, to) < 0) {
        if (errno != ENOSPC && errno != EDQUOT && errno != EFBIG)
            return 0;
        if (to == m->end + n)
            return -1;
        to = m->end + n; /* no room for the window: only for this write */
    }
    if (m->window < SPOOLMAP_MAX_WINDOW)
        m->window *= 2;
    return 0;
}

/* Appends the pieces, as one write. Up to SPOOLMAP_COPY_MAX bytes are copied into the mapping, the
 * first piece last (a recording record's header: a reader that sees it sees the rest); larger
 * writes, and files that cannot be mapped, go through pwritev(2) / writev(2). Returns 0, or -1 with
 * errno set (ENOSPC: the disk is full), after which every append fails. */
static int
spoolmap_appendv(spoolmap *m, const struct iovec *iov, int count)
{
    size_t total = 0;
    ssize_t written;
    int i;
    if (m->failed) {
        errno = EIO;
        return -1;
    }
    if (!m->started && spoolmap_start(m) < 0)
        goto failed;
    for (i = 0; i < count; i++)
        total += iov[i].iov_len;
    if (total <= SPOOLMAP_COPY_MAX && !m->unmappable) {
        int copied = spoolmap_copy(m, iov, count, total);
        if (copied > 0)
            return 0;
        if (copied < 0)
            goto failed;
    }
    if (!m->unmappable && m->end + total > m->allocated && spoolmap_preallocate(m, total) < 0)
        goto failed;
    do {
        written = m->unmappable ? writev(m->fd, iov, count) : pwritev(m->map_fd, iov, count, (off_t)m->end);
    } while (written < 0 && errno == EINTR);
    if (written < 0)
        goto failed;
    if ((size_t)written != total) {
        errno = ENOSPC; /* a short write to a regular file: the disk is full */
        goto failed;
    }
    m->end += total;
    if (m->allocated < m->end)
        m->allocated = m->end;
    return 0;
failed:
    m->failed = 1;
    return -1;
}

/* Unmaps, and cuts the file back to the bytes that hold data (the zeros not written, a torn write),
 * so that appends through the spool's own descriptor follow on. Safe to call again. */
static void
spoolmap_release(spoolmap *m)
{
    if (m->base != NULL) {
        munmap(m->base, m->base_len);
        m->base = NULL;
    }
    if (m->started && (m->allocated > m->end || m->failed)) {
        int rc;
        do {
            rc = ftruncate(m->fd, (off_t)m->end);
        } while (rc < 0 && errno == EINTR);
        m->allocated = m->end;
    }
    if (m->map_fd >= 0) {
        close(m->map_fd);
        m->map_fd = -1;
    }
    m->base_len = 0;
}

#endif /* PROCTOR_SPOOLMAP_H */
