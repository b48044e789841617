/* The C data path of the PostgreSQL relay: once a session is authorized and its grant needs nothing
 * but recording and statement evidence (no masking rules; guardrail verdicts the shape cache already
 * holds), both of its connections are handed to a worker thread that relays without the GIL:
 * TLS (the session's own OpenSSL objects, taken over from the event loop's memory BIOs), frame
 * scanning, the hash-chained recording (one record per read, in the page cache before the bytes are
 * relayed, as in recording.py; copied into a mapping of the spool file, _spoolmap.h), statement
 * bookkeeping and evidence rows (pgtrack.h, the twin of tracker.py).
 *
 * Python keeps everything else. The worker asks it, through a completion queue the event loop
 * watches (an eventfd), to judge a statement whose shape it has no verdict for; the answer either
 * lets the statement through, with the verdict its evidence row carries when a rule matched without
 * stopping it (a `log` rule), and caches the shape with that verdict when every statement of the
 * shape gets it; or hands the session back ("eject") with all of its state: unprocessed bytes,
 * unsent bytes, the recording chain, the tracker. Revocation, expiry and drain reach a session here
 * as a terminate command.
 *
 * Threads: Python calls (holding the GIL) only touch the command queue and sessions the worker
 * does not own yet or no longer owns; the worker never touches a Python object. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "../_sha256.h"
#include "../_record.h"
#include "../_spoolmap.h"
#include "pgtrack.h"
#include "pgtrack_py.h"
#include "sqlshape_scan.h"

#define HASH_SIZE 32
#define FROM_CLIENT 0
#define FROM_SERVER 1
#define FROM_GATEWAY 2
#define KIND_WIRE 1
#define READ_CHUNK 262144 /* raw bytes of one read from a TLS socket */
#define PLAIN_CHUNK 262144
#define HIGH_WATER (1u << 20) /* unsent bytes at which the other side stops being read */
#define SHAPES_MAX 20000
#define SHAPE_CAP 8192 /* longer statements are judged by Python each time */

enum { RUN, JUDGING, CLOSING, DONE, EJECTED };
enum { C_ADOPT, C_JUDGED, C_TERMINATE, C_EJECT };
enum { K_JUDGE, K_DONE, K_EJECTED };

/* ---------------------------------------------------------------------------------------------- */
/* buffers */

typedef struct {
    unsigned char *data;
    size_t start, end, cap;
} fbuf;

static size_t
fb_len(const fbuf *b)
{
    return b->end - b->start;
}

static int
fb_reserve(fbuf *b, size_t extra)
{
    size_t used = b->end - b->start, cap;
    unsigned char *data;

    if (b->cap - b->end >= extra)
        return 0;
    if (b->start > 0 && b->cap - used >= extra) {
        memmove(b->data, b->data + b->start, used);
        b->start = 0;
        b->end = used;
        return 0;
    }
    cap = b->cap ? b->cap : 16384;
    while (cap - used < extra)
        cap *= 2;
    if (b->start > 0) {
        memmove(b->data, b->data + b->start, used);
        b->start = 0;
        b->end = used;
    }
    data = realloc(b->data, cap);
    if (data == NULL)
        return -1;
    b->data = data;
    b->cap = cap;
    return 0;
}

static int
fb_append(fbuf *b, const void *p, size_t n)
{
    if (fb_reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->end, p, n);
    b->end += n;
    return 0;
}

/* Consumed: an empty buffer gives its memory back (idle sessions hold none). */
static void
fb_consume(fbuf *b, size_t n)
{
    b->start += n;
    if (b->start >= b->end) {
        free(b->data);
        b->data = NULL;
        b->start = b->end = b->cap = 0;
    }
}

static void
fb_free(fbuf *b)
{
    free(b->data);
    b->data = NULL;
    b->start = b->end = b->cap = 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* shape sets: the statement shapes a rule set lets through, each with the verdict its statements get
 * (none when no rule matches; a `log` rule's), shared by the rule set's sessions */

typedef struct {
    pgt_verdict *verdict; /* NULL: no rule matches */
    uint32_t len;
    char shape[];
} shape_entry;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    shape_entry **slots;
    size_t cap, count;
} ShapeSet;

static uint64_t
fnv1a(const char *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    size_t i;
    for (i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* Whether the shape is in the set; *verdict: a reference to its verdict (NULL: none). Entries stay
 * until the set goes, so only the lookup needs the lock. */
static int
shapes_lookup(ShapeSet *set, const char *p, size_t n, pgt_verdict **verdict)
{
    size_t i;
    int found = 0;

    *verdict = NULL;
    pthread_mutex_lock(&set->lock);
    if (set->cap) {
        for (i = fnv1a(p, n) & (set->cap - 1);; i = (i + 1) & (set->cap - 1)) {
            const shape_entry *slot = set->slots[i];
            if (slot == NULL)
                break;
            if (slot->len == n && memcmp(slot->shape, p, n) == 0) {
                *verdict = pgt_verdict_ref(slot->verdict);
                found = 1;
                break;
            }
        }
    }
    pthread_mutex_unlock(&set->lock);
    return found;
}

static int
shapes_insert_locked(ShapeSet *set, shape_entry *entry)
{
    size_t i;
    for (i = fnv1a(entry->shape, entry->len) & (set->cap - 1);; i = (i + 1) & (set->cap - 1)) {
        shape_entry *slot = set->slots[i];
        if (slot == NULL) {
            set->slots[i] = entry;
            set->count++;
            return 1;
        }
        if (slot->len == entry->len && memcmp(slot->shape, entry->shape, entry->len) == 0)
            return 0;
    }
}

static PyObject *
ShapeSet_add(ShapeSet *set, PyObject *args)
{
    shape_entry *entry;
    const char *shape;
    Py_ssize_t n;
    PyObject *verdict_obj = Py_None;
    pgt_verdict *verdict;
    int inserted = 0;

    if (!PyArg_ParseTuple(args, "y#|O:add", &shape, &n, &verdict_obj))
        return NULL;
    if (n > 0xFFFFFF) {
        PyErr_SetString(PyExc_ValueError, "add: the shape is too long");
        return NULL;
    }
    if (pgtpy_verdict(verdict_obj, &verdict) < 0)
        return NULL;
    entry = malloc(sizeof *entry + (size_t)n);
    if (entry == NULL) {
        pgt_verdict_unref(verdict);
        return PyErr_NoMemory();
    }
    entry->verdict = verdict;
    entry->len = (uint32_t)n;
    memcpy(entry->shape, shape, (size_t)n);
    pthread_mutex_lock(&set->lock);
    if (set->count < SHAPES_MAX) {
        if ((set->count + 1) * 2 > set->cap) {
            size_t cap = set->cap ? set->cap * 2 : 256, i;
            shape_entry **old = set->slots, **slots = calloc(cap, sizeof(shape_entry *));
            if (slots != NULL) {
                size_t old_cap = set->cap;
                set->slots = slots;
                set->cap = cap;
                set->count = 0;
                for (i = 0; i < old_cap; i++)
                    if (old[i] != NULL)
                        shapes_insert_locked(set, old[i]);
                free(old);
            }
        }
        if ((set->count + 1) * 2 <= set->cap)
            inserted = shapes_insert_locked(set, entry);
    }
    pthread_mutex_unlock(&set->lock);
    if (!inserted) {
        pgt_verdict_unref(entry->verdict);
        free(entry);
    }
    return PyBool_FromLong(inserted);
}

static PyObject *
ShapeSet_contains(ShapeSet *set, PyObject *arg)
{
    pgt_verdict *verdict;
    int found;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "contains(shape: bytes)");
        return NULL;
    }
    found = shapes_lookup(set, PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg), &verdict);
    pgt_verdict_unref(verdict);
    return PyBool_FromLong(found);
}

/* verdict(shape) -> the doc of the shape's verdict (tracker.verdict_fields), or None */
static PyObject *
ShapeSet_verdict(ShapeSet *set, PyObject *arg)
{
    pgt_verdict *verdict;
    PyObject *doc;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "verdict(shape: bytes)");
        return NULL;
    }
    shapes_lookup(set, PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg), &verdict);
    doc = pgtpy_verdict_doc(verdict);
    pgt_verdict_unref(verdict);
    return doc;
}

static Py_ssize_t
ShapeSet_len(ShapeSet *set)
{
    return (Py_ssize_t)set->count;
}

static PyObject *
ShapeSet_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    ShapeSet *set;
    (void)args;
    (void)kwds;
    set = (ShapeSet *)type->tp_alloc(type, 0);
    if (set != NULL)
        pthread_mutex_init(&set->lock, NULL);
    return (PyObject *)set;
}

static void
ShapeSet_dealloc(ShapeSet *set)
{
    size_t i;
    for (i = 0; i < set->cap; i++)
        if (set->slots[i] != NULL) {
            pgt_verdict_unref(set->slots[i]->verdict);
            free(set->slots[i]);
        }
    free(set->slots);
    pthread_mutex_destroy(&set->lock);
    Py_TYPE(set)->tp_free((PyObject *)set);
}

static PyMethodDef ShapeSet_methods[] = {
    {"add", (PyCFunction)ShapeSet_add, METH_VARARGS,
     "add(shape: bytes, verdict=None) -> bool (False when present or full); verdict: tracker.verdict_fields"},
    {"contains", (PyCFunction)ShapeSet_contains, METH_O, "contains(shape: bytes) -> bool"},
    {"verdict", (PyCFunction)ShapeSet_verdict, METH_O, "verdict(shape: bytes) -> the verdict's doc, or None"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods ShapeSet_as_sequence = {.sq_length = (lenfunc)ShapeSet_len};

static PyTypeObject ShapeSetType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "data_plane.postgres._fastrelay.ShapeSet",
    .tp_basicsize = sizeof(ShapeSet),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Statement shapes a rule set lets through, each with the verdict its statements get (none when no "
              "rule matches).",
    .tp_new = ShapeSet_new,
    .tp_dealloc = (destructor)ShapeSet_dealloc,
    .tp_methods = ShapeSet_methods,
    .tp_as_sequence = &ShapeSet_as_sequence,
};

/* ---------------------------------------------------------------------------------------------- */
/* sessions */

struct session;

typedef struct {
    struct session *s;
    int fd;
    int side; /* FROM_CLIENT: the client's connection; FROM_SERVER: the backend's */
    SSL *ssl;
    BIO *rbio, *wbio;
    PyObject *ref; /* keeps the SSL object (and so its BIOs) alive */
    fbuf in;       /* plaintext read and not yet relayed (a partial frame, or what waits for a verdict) */
    fbuf out;      /* bytes for the socket (TLS records when ssl) the kernel did not take yet */
    uint32_t mask; /* epoll interest */
    int eof;
} endpoint;

typedef struct session {
    uint64_t id;
    int state;
    endpoint c, b;
    /* recording */
    int rec_fd;
    spoolmap rec_map;
    unsigned char prev[HASH_SIZE];
    uint64_t seq, rec_bytes;
    double next_sync, fsync_interval;
    /* evidence rows */
    int events_fd;
    spoolmap events_map;
    pgt_tracker *t;
    pgt_buf rows;
    /* guardrails: NULL when the grant has none */
    ShapeSet *shapes;
    int standard_strings;
    int preapproved; /* the next guarded frame was judged by Python already */
    pgt_verdict *preapproved_verdict; /* and the verdict it gets (NULL: none) */
    uint32_t max_len;
    uint64_t bytes_in, bytes_out;
    uint64_t ok_seen, error_seen, skipped_seen; /* tracker counters already added to the engine's */
    char reason[160];
    unsigned char *terminate_payload;
    size_t terminate_len;
    PyObject *context;
    struct worker *w;
    struct session *next; /* the worker's list of live sessions */
    struct session *prev_s;
} session;

typedef struct command {
    int kind;
    uint64_t id;
    session *s; /* C_ADOPT */
    int allow;
    pgt_verdict *verdict; /* C_JUDGED: the verdict of a statement allowed through */
    unsigned char *payload;
    size_t len;
    struct command *next;
} command;

typedef struct completion {
    int kind;
    session *s; /* K_DONE/K_EJECTED: handed back; K_JUDGE: still the worker's */
    uint64_t id;
    int msg_type;
    unsigned char *text;
    size_t text_len;
    unsigned char *shape;
    size_t shape_len;
    struct completion *next;
} completion;

typedef struct worker {
    struct Engine *eng;
    int epfd, wake_fd;
    pthread_t thread;
    int started;
    pthread_mutex_t lock;
    command *commands, *commands_tail;
    session *live; /* this worker's sessions */
    /* sessions handed back (ended, ejected) during this pass over epoll's events: posted once the pass
     * is over, as Python frees a session it was handed while the pass may still look at it */
    completion *handed, *handed_tail;
    unsigned char scratch[READ_CHUNK]; /* TLS records as read */
    unsigned char plain[PLAIN_CHUNK];  /* what a read gave (decrypted), relayed from here when whole */
} Worker;

/* The recordings' periodic fsync, off the relay threads: an fsync takes 1 ms to 20 ms here, and a relay
 * thread blocked that long stalls every session it serves. A worker hands over a duplicate of the
 * file's descriptor, which this thread fsyncs and closes. */
typedef struct {
    pthread_t thread;
    int started, stopping;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int *fds;
    size_t n, cap;
} Syncer;

typedef struct Engine {
    PyObject_HEAD
    Syncer syncer;
    int notify_fd;
    int nworkers, stopping;
    int batch; /* relay threads under SCHED_BATCH (see worker_main) */
    Worker *workers;
    pthread_mutex_t lock; /* the completion queue's */
    completion *completions, *completions_tail;
    uint64_t next_id;
    /* counters (relaxed atomics; read at a metrics scrape) */
    uint64_t statements_ok, statements_error, statements_skipped, sessions_active;
} Engine;

/* The relay's socket calls go around glibc's wrappers: in a process with threads each wrapper is a
 * cancellation point that switches the thread's cancel state around the call (two atomic updates per
 * call, five or so calls per round trip), and no relay thread is ever cancelled. syscall(2) is not a
 * cancellation point; it returns -1 with errno set, as the wrappers do. */
static inline ssize_t
relay_send(int fd, const void *p, size_t n)
{
    return (ssize_t)syscall(SYS_sendto, fd, p, n, MSG_NOSIGNAL, NULL, 0);
}

static inline ssize_t
relay_recv(int fd, void *p, size_t n)
{
    return (ssize_t)syscall(SYS_recvfrom, fd, p, n, 0, NULL, NULL);
}

static inline int
relay_epoll_wait(int epfd, struct epoll_event *events, int max, int timeout)
{
    return (int)syscall(SYS_epoll_wait, epfd, events, max, timeout);
}

static double
now_wall(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double
now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void *
syncer_main(void *arg)
{
    Syncer *y = arg;
    pthread_mutex_lock(&y->lock);
    for (;;) {
        int *fds;
        size_t n, i;
        while (y->n == 0 && !y->stopping)
            pthread_cond_wait(&y->wake, &y->lock);
        if (y->n == 0)
            break; /* stopping, and nothing left */
        fds = y->fds;
        n = y->n;
        y->fds = NULL;
        y->n = y->cap = 0;
        pthread_mutex_unlock(&y->lock);
        for (i = 0; i < n; i++) {
            fsync(fds[i]);
            close(fds[i]);
        }
        free(fds);
        pthread_mutex_lock(&y->lock);
    }
    pthread_mutex_unlock(&y->lock);
    return NULL;
}

static void
syncer_start(Syncer *y)
{
    pthread_mutex_init(&y->lock, NULL);
    pthread_cond_init(&y->wake, NULL);
    /* without it, a relay thread fsyncs itself */
    y->started = pthread_create(&y->thread, NULL, syncer_main, y) == 0;
}

/* Syncs what is queued, then stops (called with the GIL held: released while it waits). */
static void
syncer_stop(Syncer *y)
{
    if (y->started) {
        pthread_mutex_lock(&y->lock);
        y->stopping = 1;
        pthread_cond_signal(&y->wake);
        pthread_mutex_unlock(&y->lock);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(y->thread, NULL);
        Py_END_ALLOW_THREADS
    }
    free(y->fds);
    pthread_mutex_destroy(&y->lock);
    pthread_cond_destroy(&y->wake);
}

/* fsync(fd) on the syncer thread (here, where it cannot be handed over). */
static void
sync_later(Syncer *y, int fd)
{
    int copy = y->started ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1;
    if (copy < 0) {
        fsync(fd);
        return;
    }
    pthread_mutex_lock(&y->lock);
    if (y->n == y->cap) {
        size_t cap = y->cap ? y->cap * 2 : 16;
        int *fds = realloc(y->fds, cap * sizeof *fds);
        if (fds == NULL) {
            pthread_mutex_unlock(&y->lock);
            fsync(copy);
            close(copy);
            return;
        }
        y->fds = fds;
        y->cap = cap;
    }
    y->fds[y->n++] = copy;
    pthread_cond_signal(&y->wake);
    pthread_mutex_unlock(&y->lock);
}

/* One record of the hash-chained recording (recording.py's format and fsync policy). */
static int
record(session *s, int direction, int kind, const unsigned char *payload, size_t n, double now)
{
    unsigned char header[RECORD_HEADER_SIZE], link[HASH_SIZE];
    struct iovec iov[3];
    record_prepare(s->prev, s->seq, now, direction, kind, payload, n, header, link);
    record_pieces(iov, header, payload, n, link);
    if (spoolmap_appendv(&s->rec_map, iov, 3) < 0)
        return -1;
    memcpy(s->prev, link, HASH_SIZE);
    s->seq++;
    s->rec_bytes += RECORD_HEADER_SIZE + n + HASH_SIZE;
    if (now >= s->next_sync) {
        sync_later(&s->w->eng->syncer, s->rec_fd);
        s->next_sync = now + s->fsync_interval;
    }
    return 0;
}

static int
write_rows(session *s)
{
    struct iovec iov = {s->rows.data, s->rows.len};
    int rc = spoolmap_appendv(&s->events_map, &iov, 1);
    s->rows.len = 0;
    return rc;
}

/* The spool files go back to plain appends (Python's), cut to what was written. */
static void
release_spool(session *s)
{
    spoolmap_release(&s->rec_map);
    spoolmap_release(&s->events_map);
}

/* ---------------------------------------------------------------------------------------------- */
/* endpoints */

static void
set_mask(Worker *w, endpoint *e, uint32_t mask)
{
    struct epoll_event ev;
    if (e->mask == mask || e->fd < 0)
        return;
    ev.events = mask;
    ev.data.ptr = e;
    if (e->mask == 0)
        epoll_ctl(w->epfd, EPOLL_CTL_ADD, e->fd, &ev);
    else if (mask == 0)
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, e->fd, &ev);
    else
        epoll_ctl(w->epfd, EPOLL_CTL_MOD, e->fd, &ev);
    e->mask = mask;
}

/* Drops the first n bytes of a memory BIO (what the socket took) through the worker's scratch. */
static int
bio_skip(BIO *bio, unsigned char *scratch, size_t cap, size_t n)
{
    while (n > 0) {
        int got = BIO_read(bio, scratch, (int)(n < cap ? n : cap));
        if (got <= 0)
            return -1;
        n -= (size_t)got;
    }
    return 0;
}

/* The out buffer, then what TLS produced, as much as the socket takes; what it does not take stays
 * where it is (the out buffer, or the BIO) until EPOLLOUT. 0, or -1 when the connection broke.
 * Sockets are written with send(2) and read with recv(2), not write(2)/read(2): those go through the
 * file layer first (position lock, fsnotify), which costs a relay making four calls per round trip;
 * MSG_NOSIGNAL makes a closed peer an EPIPE here, never a SIGPIPE. */
static int
ep_flush(endpoint *e)
{
    for (;;) {
        size_t pending = fb_len(&e->out);
        const unsigned char *from = e->out.data + e->out.start;
        ssize_t n;
        if (pending == 0 && e->ssl != NULL) {
            /* the records straight from the BIO's memory: one write for all of them */
            char *records;
            long held = BIO_get_mem_data(e->wbio, &records);
            if (held <= 0)
                return held < 0 ? -1 : 0;
            from = (const unsigned char *)records;
            pending = (size_t)held;
        }
        if (pending == 0)
            return 0;
        n = relay_send(e->fd, from, pending);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        }
        if (from == e->out.data + e->out.start)
            fb_consume(&e->out, (size_t)n);
        else if (bio_skip(e->wbio, e->s->w->scratch, sizeof e->s->w->scratch, (size_t)n) < 0)
            return -1;
        if ((size_t)n < pending)
            return 0; /* the socket is full: EPOLLOUT resumes */
    }
}

/* Before a hand-back: TLS records the socket has not taken move from the BIO to the out buffer, which
 * Python writes below its TLS transport. */
static int
ep_park(endpoint *e)
{
    char *records;
    long held;
    if (e->ssl == NULL || (held = BIO_get_mem_data(e->wbio, &records)) <= 0)
        return 0;
    if (fb_append(&e->out, records, (size_t)held) < 0)
        return -1;
    return bio_skip(e->wbio, e->s->w->scratch, sizeof e->s->w->scratch, (size_t)held);
}

/* Bytes for the socket not yet written: the out buffer and, with TLS, the records still in the BIO. */
static size_t
unsent(endpoint *e)
{
    return fb_len(&e->out) + (e->ssl != NULL ? BIO_ctrl_pending(e->wbio) : 0);
}

static int
ep_send(endpoint *e, const unsigned char *p, size_t n)
{
    if (n == 0)
        return 0;
    if (e->ssl != NULL) {
        while (n > 0) {
            int chunk = n > (1u << 30) ? (1 << 30) : (int)n;
            int sent = SSL_write(e->ssl, p, chunk);
            if (sent <= 0) {
                ERR_clear_error();
                return -1;
            }
            p += sent;
            n -= (size_t)sent;
        }
        return fb_len(&e->out) ? 0 : ep_flush(e); /* behind unsent bytes, the EPOLLOUT handler flushes */
    }
    if (fb_len(&e->out) == 0) {
        while (n > 0) {
            ssize_t sent = relay_send(e->fd, p, n);
            if (sent < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                return -1;
            }
            p += sent;
            n -= (size_t)sent;
        }
        if (n == 0)
            return 0;
    }
    return fb_append(&e->out, p, n);
}

/* Reads what is there into e->in (decrypted). >0: bytes added; 0: none yet; -1: the peer closed (e->eof
 * set; bytes may have been added before it); -2: the connection or its TLS broke. */

/* ---------------------------------------------------------------------------------------------- */
/* the worker */

static void post(Engine *eng, completion *done);
static void hand_back(Worker *w, completion *c);
static void finish(Worker *w, session *s, const char *reason);

static void
update_interest(Worker *w, session *s)
{
    uint32_t cmask = 0, bmask = 0;
    if (s->state == DONE || s->state == EJECTED)
        return;
    if (s->state == RUN && !s->c.eof && unsent(&s->b) < HIGH_WATER)
        cmask |= EPOLLIN;
    if ((s->state == RUN || s->state == JUDGING) && !s->b.eof && unsent(&s->c) < HIGH_WATER)
        bmask |= EPOLLIN;
    if (unsent(&s->c))
        cmask |= EPOLLOUT;
    if (unsent(&s->b))
        bmask |= EPOLLOUT;
    /* a registered fd with nothing wanted stays registered: EPOLLRDHUP-less, no events */
    set_mask(w, &s->c, cmask ? cmask : EPOLLET);
    set_mask(w, &s->b, bmask ? bmask : EPOLLET);
}

static void
fail(Worker *w, session *s, const char *sqlstate, const char *message)
{
    /* An ErrorResponse, FATAL, to the client: recorded, sent, then the session ends. */
    unsigned char frame[512];
    size_t n = 0, mlen = strlen(message), body;
    if (mlen > 400)
        mlen = 400;
    frame[n++] = 'E';
    n += 4;
    memcpy(frame + n, "SFATAL", 7);
    n += 7;
    memcpy(frame + n, "VFATAL", 7);
    n += 7;
    frame[n++] = 'C';
    memcpy(frame + n, sqlstate, 6);
    n += 6;
    frame[n++] = 'M';
    memcpy(frame + n, message, mlen);
    n += mlen;
    frame[n++] = 0;
    frame[n++] = 0;
    body = n - 1;
    frame[1] = (unsigned char)(body >> 24);
    frame[2] = (unsigned char)(body >> 16);
    frame[3] = (unsigned char)(body >> 8);
    frame[4] = (unsigned char)body;
    record(s, FROM_GATEWAY, KIND_WIRE, frame, n, now_wall());
    ep_send(&s->c, frame, n);
    finish(w, s, message);
}

static int
valid_utf8(const unsigned char *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF) {
            if (i + 1 >= n || (p[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (i + 2 >= n || (p[i + 1] & 0xC0) != 0x80 || (p[i + 2] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xE0 && p[i + 1] < 0xA0) || (c == 0xED && p[i + 1] > 0x9F))
                return 0;
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (i + 3 >= n || (p[i + 1] & 0xC0) != 0x80 || (p[i + 2] & 0xC0) != 0x80 || (p[i + 3] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xF0 && p[i + 1] < 0x90) || (c == 0xF4 && p[i + 1] > 0x8F))
                return 0;
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* The statement text of a Query or Parse body; NULL when unusual (Python then judges it). */
static const unsigned char *
statement_text(int type, const unsigned char *body, size_t len, size_t *text_len)
{
    const unsigned char *nul, *start = body;
    size_t rest = len;
    if (type == 'P') {
        nul = memchr(body, 0, len);
        if (nul == NULL)
            return NULL;
        start = nul + 1;
        rest = len - (size_t)(start - body);
    }
    nul = memchr(start, 0, rest);
    if (nul == NULL || (type == 'Q' && (size_t)(nul - start) != rest - 1))
        return NULL;
    *text_len = (size_t)(nul - start);
    return start;
}

typedef enum { PASS, STOP_JUDGE, STOP_EJECT } verdict_t;

/* Whether a Query or Parse may pass on the cached verdicts (*verdict: a reference to the one it gets,
 * NULL for none); the shape goes to `shape` for a miss. */
static verdict_t
judge(session *s, int type, const unsigned char *body, size_t len, char *shape_buf, size_t shape_cap,
      Py_ssize_t *shape_len, pgt_verdict **verdict)
{
    size_t text_len;
    const unsigned char *text = statement_text(type, body, len, &text_len);
    Shape shape;
    *shape_len = -1;
    *verdict = NULL;
    if (text == NULL || !s->standard_strings || !valid_utf8(text, text_len))
        return STOP_JUDGE;
    if (2 * text_len + 16 > shape_cap)
        return STOP_JUDGE;
    shape.buf = shape_buf;
    shape.cap = (Py_ssize_t)shape_cap;
    shape.len = 0;
    shape.space = 0;
    if (scan(text, (Py_ssize_t)text_len, &shape) <= 0)
        return STOP_JUDGE;
    *shape_len = shape.len;
    return shapes_lookup(s->shapes, shape.buf, (size_t)shape.len, verdict) ? PASS : STOP_JUDGE;
}

static void
ask_judge(Worker *w, session *s)
{
    const unsigned char *frame = s->c.in.data + s->c.in.start;
    size_t len = (size_t)be32(frame + 1) - 4;
    char shape_buf[SHAPE_CAP];
    Py_ssize_t shape_len;
    pgt_verdict *cached;
    completion *c = calloc(1, sizeof *c);

    if (c == NULL) {
        fail(w, s, "53200", "out of memory");
        return;
    }
    (void)judge(s, frame[0], frame + 5, len, shape_buf, sizeof shape_buf, &shape_len, &cached);
    pgt_verdict_unref(cached); /* only the shape is wanted here */
    c->kind = K_JUDGE;
    c->id = s->id;
    c->msg_type = frame[0];
    c->text = malloc(len ? len : 1);
    if (c->text != NULL)
        memcpy(c->text, frame + 5, len);
    c->text_len = len;
    if (shape_len >= 0) {
        c->shape = malloc((size_t)shape_len + 1);
        if (c->shape != NULL)
            memcpy(c->shape, shape_buf, (size_t)shape_len);
        c->shape_len = (size_t)shape_len;
    }
    s->state = JUDGING;
    post(w->eng, c);
}

static void eject(Worker *w, session *s);

static void
count_statements(Worker *w, session *s)
{
    uint64_t ok = pgt_statements_ok(s->t), error = pgt_statements_error(s->t), skipped = pgt_statements_skipped(s->t);
    if (ok != s->ok_seen)
        __atomic_fetch_add(&w->eng->statements_ok, ok - s->ok_seen, __ATOMIC_RELAXED);
    if (error != s->error_seen)
        __atomic_fetch_add(&w->eng->statements_error, error - s->error_seen, __ATOMIC_RELAXED);
    if (skipped != s->skipped_seen)
        __atomic_fetch_add(&w->eng->statements_skipped, skipped - s->skipped_seen, __ATOMIC_RELAXED);
    s->ok_seen = ok;
    s->error_seen = error;
    s->skipped_seen = skipped;
}

/* The whole frames at the start of p[0:n]: 0 and their length in *end, or -1 when a frame declares a length
 * below 4 or above max_len (*end: its offset); the whole read is then refused, as framescan refuses it. */
static int
whole_frames(const unsigned char *p, size_t n, uint32_t max_len, size_t *end)
{
    size_t pos = 0;
    while (n - pos >= 5) {
        uint32_t length = be32(p + pos + 1);
        if (length < 4 || length > max_len) {
            *end = pos;
            return -1;
        }
        if ((size_t)length > n - pos - 1)
            break;
        pos += (size_t)length + 1;
    }
    *end = pos;
    return 0;
}

/* Records what is relayed (before it leaves), then relays it; -1 when that ended the session. */
static int
relay(Worker *w, session *s, int direction, const unsigned char *p, size_t n, double wall)
{
    if (record(s, direction, KIND_WIRE, p, n, wall) < 0) {
        finish(w, s, "the recording cannot be written");
        return -1;
    }
    if (direction == FROM_CLIENT)
        s->bytes_in += n;
    else
        s->bytes_out += n;
    if (ep_send(direction == FROM_CLIENT ? &s->b : &s->c, p, n) < 0) {
        finish(w, s, direction == FROM_CLIENT ? "the target's connection broke" : "the client's connection broke");
        return -1;
    }
    return 0;
}

/* client → server: the complete frames of what the client sent, up to the first one the C path
 * cannot pass on its own. */
static size_t
process_client(Worker *w, session *s, const unsigned char *p, size_t n, int *stopped)
{
    size_t pos = 0, end;
    int copied = 0;
    verdict_t stop = PASS;
    size_t stop_at = 0;
    char shape_buf[SHAPE_CAP];
    Py_ssize_t shape_len = -1;
    double wall = 0, mono = 0;
    pgt_verdict *verdict = NULL; /* the guarded frame's (a reference), for its statement */

    /* framing first, over the whole read: a malformed frame anywhere ends the session unrelayed */
    if (whole_frames(p, n, s->max_len, &end) < 0) {
        uint32_t length = be32(p + end + 1);
        char msg[160];
        if (length < 4 || length > 0x7FFFFFFF) {
            snprintf(msg, sizeof msg, "invalid message framing: invalid frame length %d for message type 0x%02x",
                     (int32_t)length, p[end]);
            fail(w, s, "08P01", msg);
        } else {
            snprintf(msg, sizeof msg, "message of %u bytes exceeds the gateway's limit of %u bytes", length,
                     s->max_len);
            fail(w, s, "54000", msg);
        }
        return 0;
    }
    for (pos = 0; pos < end;) {
        int type = p[pos];
        size_t size = (size_t)be32(p + pos + 1) + 1, blen = size - 5;
        const unsigned char *body = p + pos + 5;
        int rc;
        switch (type) {
        case 'd':
            copied = 1;
            break;
        case 'F':
            stop = STOP_EJECT;
            break;
        case 'Q':
        case 'P':
        case 'B':
            if (pgt_might_hold_secret(body, blen)) {
                stop = STOP_EJECT;
                break;
            }
            if (type != 'B' && s->shapes != NULL) {
                if (s->preapproved) {
                    s->preapproved = 0;
                    verdict = s->preapproved_verdict;
                    s->preapproved_verdict = NULL;
                } else {
                    stop = judge(s, type, body, blen, shape_buf, sizeof shape_buf, &shape_len, &verdict);
                }
                if (stop != PASS)
                    break;
            }
            /* fall through */
        case 'E':
        case 'S':
        case 'C':
        case 'D':
        case 'H':
        case 'X':
            if (wall == 0) {
                wall = now_wall();
                mono = now_mono();
            }
            rc = pgt_client_message(s->t, (unsigned char)type, body, blen, wall, mono, verdict);
            pgt_verdict_unref(verdict);
            verdict = NULL;
            if (rc == PGT_PUNT) {
                stop = STOP_EJECT;
            } else if (rc == PGT_VIOLATION) {
                fail(w, s, "08P01", "protocol violation: malformed client message");
                return 0;
            } else if (rc != PGT_OK) {
                fail(w, s, "53200", "out of memory");
                return 0;
            }
            break;
        default:
            break;
        }
        if (stop != PASS) {
            stop_at = pos;
            break;
        }
        pos += size;
    }
    if (stop != PASS)
        end = stop_at;
    if (copied)
        pgt_client_copy_bytes(s->t, end);
    if (end > 0 && relay(w, s, FROM_CLIENT, p, end, wall ? wall : now_wall()) < 0)
        return 0;
    *stopped = stop;
    return end;
}

/* server → client */
static size_t
process_server(Worker *w, session *s, const unsigned char *p, size_t n)
{
    size_t pos = 0, end, attributed = 0;
    uint64_t rows = 0;
    double mono = 0;

    if (whole_frames(p, n, s->max_len, &end) < 0) {
        char msg[200];
        snprintf(msg, sizeof msg, "the target sent an invalid message: invalid frame length %d for message type "
                 "0x%02x", (int32_t)be32(p + end + 1), p[end]);
        fail(w, s, "08P01", msg);
        return 0;
    }
    for (pos = 0; pos < end;) {
        int type = p[pos];
        size_t size = (size_t)be32(p + pos + 1) + 1, blen = size - 5;
        const unsigned char *body = p + pos + 5;
        switch (type) {
        case 'D':
        case 'd':
            rows++;
            break;
        case 'C':
        case 'E':
        case 'Z':
        case 'I':
        case 's':
        case 't':
            if (rows) {
                pgt_rows(s->t, rows);
                rows = 0;
            }
            pgt_server_bytes(s->t, pos + size - attributed);
            attributed = pos + size;
            if (mono == 0)
                mono = now_mono();
            if (pgt_server_message(s->t, (unsigned char)type, body, blen, mono, &s->rows) != PGT_OK) {
                fail(w, s, "08P01", "the target sent an invalid message");
                return 0;
            }
            break;
        case 'S': /* ParameterStatus: the shape lexer reads standard_conforming_strings = on only */
            if (blen >= 29 && memcmp(body, "standard_conforming_strings", 28) == 0)
                s->standard_strings = blen == 31 && memcmp(body + 28, "on", 3) == 0;
            break;
        default:
            break;
        }
        pos += size;
    }
    if (rows)
        pgt_rows(s->t, rows);
    if (end > attributed)
        pgt_server_bytes(s->t, end - attributed);
    if (s->rows.len && write_rows(s) < 0) {
        finish(w, s, "the evidence cannot be written");
        return 0;
    }
    count_statements(w, s);
    if (end > 0 && relay(w, s, FROM_SERVER, p, end, now_wall()) < 0)
        return 0;
    return end;
}

static void
list_remove(Worker *w, session *s)
{
    if (s->prev_s)
        s->prev_s->next = s->next;
    else if (w->live == s)
        w->live = s->next;
    if (s->next)
        s->next->prev_s = s->prev_s;
    s->next = s->prev_s = NULL;
}

static void
detach(Worker *w, session *s)
{
    set_mask(w, &s->c, 0);
    set_mask(w, &s->b, 0);
    list_remove(w, s);
    __atomic_fetch_sub(&w->eng->sessions_active, 1, __ATOMIC_RELAXED);
}

static void
finish(Worker *w, session *s, const char *reason)
{
    if (s->state == DONE || s->state == EJECTED)
        return;
    if (reason != NULL && s->reason[0] == 0)
        snprintf(s->reason, sizeof s->reason, "%s", reason);
    pgt_abandon(s->t, now_mono(), &s->rows);
    if (s->rows.len)
        write_rows(s);
    count_statements(w, s);
    /* best effort, as the Python relay closes: the backend hears Terminate, the client what is left */
    if (!s->b.eof) {
        static const unsigned char terminate[5] = {'X', 0, 0, 0, 4};
        ep_send(&s->b, terminate, sizeof terminate);
    }
    ep_flush(&s->c);
    release_spool(s);
    s->state = DONE;
    detach(w, s);
    {
        completion *c = calloc(1, sizeof *c);
        if (c == NULL)
            abort(); /* nothing else can tell Python the session ended */
        c->kind = K_DONE;
        c->s = s;
        c->id = s->id;
        hand_back(w, c);
    }
}

/* Hand the session back to Python: what is unprocessed stays in the endpoints' buffers. */
static void
eject(Worker *w, session *s)
{
    completion *c;
    if (s->rows.len)
        write_rows(s);
    count_statements(w, s);
    ep_flush(&s->c);
    ep_flush(&s->b);
    if (ep_park(&s->c) < 0 || ep_park(&s->b) < 0) {
        finish(w, s, "out of memory");
        return;
    }
    release_spool(s);
    s->state = EJECTED;
    detach(w, s);
    c = calloc(1, sizeof *c);
    if (c == NULL)
        abort();
    c->kind = K_EJECTED;
    c->s = s;
    c->id = s->id;
    hand_back(w, c);
}

/* Relays the whole frames of p[0:n] (read from e), keeps the rest in e->in (`buffered`: p is e->in
 * itself), then asks Python to judge or hands the session back when a frame stopped the relay. */
static void
deliver(Worker *w, endpoint *e, const unsigned char *p, size_t n, int buffered)
{
    session *s = e->s;
    int stop = PASS;
    size_t used = 0;

    if (e->side == FROM_CLIENT ? s->state == RUN : (s->state == RUN || s->state == JUDGING))
        used = e->side == FROM_CLIENT ? process_client(w, s, p, n, &stop) : process_server(w, s, p, n);
    if (s->state == DONE || s->state == EJECTED)
        return;
    if (buffered)
        fb_consume(&e->in, used);
    else if (used < n && fb_append(&e->in, p + used, n - used) < 0) {
        fail(w, s, "53200", "out of memory");
        return;
    }
    if (stop == STOP_JUDGE)
        ask_judge(w, s);
    else if (stop == STOP_EJECT)
        eject(w, s);
}

static int
reading(session *s, endpoint *e)
{
    return e->side == FROM_CLIENT ? s->state == RUN : (s->state == RUN || s->state == JUDGING);
}

/* Reads what the socket has (and TLS can decrypt) and relays it. 0, or -1 when the connection or its
 * TLS broke; e->eof is set when the peer closed. */
static int
ep_pump(Worker *w, endpoint *e)
{
    session *s = e->s;

    if (e->ssl == NULL) {
        /* Into the worker's big buffer, behind the partial frame kept from the last read when it is small
         * (a stream of rows nearly always ends a read mid-frame); a large one is read onto in place. */
        ssize_t n;
        size_t kept = fb_len(&e->in);
        int in_place = kept > sizeof w->plain / 4;
        unsigned char *dst = w->plain + kept;
        size_t cap = sizeof w->plain - kept;
        if (in_place) {
            if (fb_reserve(&e->in, PLAIN_CHUNK) < 0)
                return -1;
            dst = e->in.data + e->in.end;
            cap = e->in.cap - e->in.end;
        }
        do {
            n = relay_recv(e->fd, dst, cap);
        } while (n < 0 && errno == EINTR);
        if (n == 0) {
            e->eof = 1;
            return 0;
        }
        if (n < 0)
            return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        if (in_place) {
            e->in.end += (size_t)n;
            deliver(w, e, e->in.data + e->in.start, fb_len(&e->in), 1);
        } else {
            if (kept) {
                memcpy(w->plain, e->in.data + e->in.start, kept);
                fb_free(&e->in);
            }
            deliver(w, e, w->plain, kept + (size_t)n, 0);
        }
        return 0;
    }
    {
        ssize_t n;
        do {
            n = relay_recv(e->fd, w->scratch, sizeof w->scratch);
        } while (n < 0 && errno == EINTR);
        if (n > 0) {
            if (BIO_write(e->rbio, w->scratch, (int)n) != (int)n)
                return -1;
        } else if (n == 0) {
            e->eof = 1;
        } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
            return -1;
        }
    }
    while (reading(s, e)) {
        size_t got = 0;
        int r = 1, err = 0;
        int buffered = fb_len(&e->in) > 0;
        unsigned char *dst;
        size_t cap;
        if (buffered) {
            if (fb_reserve(&e->in, 16384 + 64) < 0)
                return -1;
        }
        /* decrypt as many records as fit, then relay them in one go */
        for (;;) {
            dst = buffered ? e->in.data + e->in.end : w->plain + got;
            cap = buffered ? e->in.cap - e->in.end : sizeof w->plain - got;
            if (cap < 16384 + 64)
                break;
            r = SSL_read(e->ssl, dst, (int)(cap > 0x40000000 ? 0x40000000 : cap));
            if (r <= 0)
                break;
            if (buffered)
                e->in.end += (size_t)r;
            else
                got += (size_t)r;
        }
        if (r <= 0) {
            err = SSL_get_error(e->ssl, r);
            ERR_clear_error();
        }
        if (buffered && fb_len(&e->in))
            deliver(w, e, e->in.data + e->in.start, fb_len(&e->in), 1);
        else if (got)
            deliver(w, e, w->plain, got, 0);
        if (s->state == DONE || s->state == EJECTED)
            return 0;
        if (r > 0)
            continue; /* the scratch was full: more records are waiting */
        if (err == SSL_ERROR_WANT_READ)
            break;
        if (err == SSL_ERROR_ZERO_RETURN) { /* close_notify */
            e->eof = 1;
            break;
        }
        return -1;
    }
    return ep_flush(e); /* TLS may answer on its own (a key update) */
}

/* Reading stops once the other side's unsent bytes pass the high-water mark; a closing side ends the
 * session once what it was sent is flushed. */
static void
on_event(Worker *w, endpoint *e, uint32_t events)
{
    session *s = e->s;
    endpoint *other = e->side == FROM_CLIENT ? &s->b : &s->c;

    if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
        if (ep_flush(e) < 0) {
            finish(w, s, e->side == FROM_CLIENT ? "the client's connection broke" : "the target's connection broke");
            return;
        }
    }
    if ((events & (EPOLLIN | EPOLLERR | EPOLLHUP)) && (e->mask & EPOLLIN)) {
        if (ep_pump(w, e) < 0) {
            if (s->state != DONE && s->state != EJECTED)
                finish(w, s, e->side == FROM_CLIENT ? "the client's connection broke"
                                                     : "the target's connection broke");
            return;
        }
        if (s->state == DONE || s->state == EJECTED)
            return;
        if (e->eof) {
            /* the client left (Terminate was relayed, or it vanished), or the backend closed */
            if (unsent(other) == 0) {
                finish(w, s, NULL);
                return;
            }
            s->state = CLOSING;
        }
    }
    if (s->state == CLOSING && unsent(&s->c) == 0 && unsent(&s->b) == 0) {
        finish(w, s, NULL);
        return;
    }
    update_interest(w, s);
}

/* Completions [first, last] to Python, in order. */
static void
post_chain(Engine *eng, completion *first, completion *last)
{
    uint64_t one = 1;
    pthread_mutex_lock(&eng->lock);
    if (eng->completions_tail)
        eng->completions_tail->next = first;
    else
        eng->completions = first;
    eng->completions_tail = last;
    pthread_mutex_unlock(&eng->lock);
    (void)!write(eng->notify_fd, &one, sizeof one);
}

static void
post(Engine *eng, completion *c)
{
    post_chain(eng, c, c);
}

static void
hand_back(Worker *w, completion *c)
{
    if (w->handed_tail)
        w->handed_tail->next = c;
    else
        w->handed = c;
    w->handed_tail = c;
}

static void
post_handed(Worker *w)
{
    if (w->handed == NULL)
        return;
    post_chain(w->eng, w->handed, w->handed_tail);
    w->handed = w->handed_tail = NULL;
}

static session *
find_live(Worker *w, uint64_t id)
{
    session *s;
    for (s = w->live; s != NULL; s = s->next)
        if (s->id == id)
            return s;
    return NULL;
}

/* After the hand-over or a verdict: TLS may hold records epoll will not announce again. */
static void
resume(Worker *w, session *s)
{
    endpoint *sides[2] = {&s->b, &s->c};
    int i;
    for (i = 0; i < 2; i++) {
        if (s->state == DONE || s->state == EJECTED)
            return;
        if (reading(s, sides[i]) && ep_pump(w, sides[i]) < 0) {
            finish(w, s, i ? "the client's connection broke" : "the target's connection broke");
            return;
        }
    }
    if (s->state == DONE || s->state == EJECTED)
        return;
    if (s->c.eof || s->b.eof) {
        endpoint *other = s->c.eof ? &s->b : &s->c;
        if (unsent(other) == 0) {
            finish(w, s, NULL);
            return;
        }
        s->state = CLOSING;
    }
    update_interest(w, s);
}

static void
run_commands(Worker *w)
{
    command *cmd, *next;
    uint64_t count;
    (void)!read(w->wake_fd, &count, sizeof count);
    pthread_mutex_lock(&w->lock);
    cmd = w->commands;
    w->commands = w->commands_tail = NULL;
    pthread_mutex_unlock(&w->lock);
    for (; cmd != NULL; cmd = next) {
        session *s = cmd->kind == C_ADOPT ? cmd->s : find_live(w, cmd->id);
        next = cmd->next;
        if (s != NULL) {
            switch (cmd->kind) {
            case C_ADOPT:
                s->next = w->live;
                if (w->live)
                    w->live->prev_s = s;
                w->live = s;
                /* bytes read before the hand-over, what TLS holds already, then whatever arrives */
                if (fb_len(&s->b.in))
                    deliver(w, &s->b, s->b.in.data + s->b.in.start, fb_len(&s->b.in), 1);
                if (s->state == RUN && fb_len(&s->c.in))
                    deliver(w, &s->c, s->c.in.data + s->c.in.start, fb_len(&s->c.in), 1);
                resume(w, s);
                break;
            case C_JUDGED:
                if (s->state != JUDGING)
                    break;
                if (cmd->allow) {
                    s->state = RUN;
                    s->preapproved = 1;
                    pgt_verdict_unref(s->preapproved_verdict);
                    s->preapproved_verdict = cmd->verdict;
                    cmd->verdict = NULL;
                    deliver(w, &s->c, s->c.in.data + s->c.in.start, fb_len(&s->c.in), 1);
                    resume(w, s);
                } else {
                    eject(w, s);
                }
                break;
            case C_TERMINATE:
                if (s->state == DONE || s->state == EJECTED)
                    break;
                record(s, FROM_GATEWAY, KIND_WIRE, cmd->payload, cmd->len, now_wall());
                ep_send(&s->c, cmd->payload, cmd->len);
                snprintf(s->reason, sizeof s->reason, "terminated");
                s->c.eof = 1; /* read nothing more from the client */
                if (unsent(&s->c) == 0)
                    finish(w, s, NULL);
                else {
                    s->state = CLOSING;
                    update_interest(w, s);
                }
                break;
            case C_EJECT:
                if (s->state == RUN)
                    eject(w, s);
                break;
            }
        }
        pgt_verdict_unref(cmd->verdict);
        free(cmd->payload);
        free(cmd);
    }
}

static void *
worker_main(void *arg)
{
    Worker *w = arg;
    struct epoll_event events[64];

    if (w->eng->batch) {
        /* SCHED_BATCH (same CPU share as SCHED_OTHER): a relay thread woken by a peer's bytes does not
         * preempt what runs, usually that peer on its way to block for the answer, so a round trip
         * costs fewer context switches when the CPUs are busy; what runs yields within its slice.
         * Where the policy cannot be set the thread relays as it is. */
        struct sched_param param = {0};
        (void)pthread_setschedparam(pthread_self(), SCHED_BATCH, &param);
    }
    for (;;) {
        int n = relay_epoll_wait(w->epfd, events, 64, -1), i;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        for (i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL) {
                if (__atomic_load_n(&w->eng->stopping, __ATOMIC_ACQUIRE))
                    return NULL;
                run_commands(w);
            }
        }
        for (i = 0; i < n; i++) {
            endpoint *e = events[i].data.ptr;
            /* an endpoint of a session that ended earlier in this batch is no longer registered */
            if (e != NULL && e->mask != 0 && e->s->state != DONE && e->s->state != EJECTED)
                on_event(w, e, events[i].events);
        }
        post_handed(w); /* from here on the worker holds no pointer to what it handed back */
    }
    return NULL;
}

static void
push_command(Worker *w, command *cmd)
{
    uint64_t one = 1;
    pthread_mutex_lock(&w->lock);
    if (w->commands_tail)
        w->commands_tail->next = cmd;
    else
        w->commands = cmd;
    w->commands_tail = cmd;
    pthread_mutex_unlock(&w->lock);
    (void)!write(w->wake_fd, &one, sizeof one);
}

/* ---------------------------------------------------------------------------------------------- */
/* Python side */

/* The SSL* of an ssl.SSLObject's _ssl._SSLSocket: CPython's PySSLSocket starts with PyObject_HEAD, the
 * socket weakref, then the SSL pointer (3.8 through 3.13). Checked against what Python reports. */
typedef struct {
    PyObject_HEAD
    PyObject *socket;
    SSL *ssl;
} PySSLSocketHead;

static SSL *
ssl_of(PyObject *sslobj)
{
    PyObject *inner, *version;
    SSL *ssl;
    const char *ours;
    int ok;

    inner = PyObject_GetAttrString(sslobj, "_sslobj");
    if (inner == NULL)
        return NULL;
    if (strcmp(Py_TYPE(inner)->tp_name, "_ssl._SSLSocket") != 0) {
        Py_DECREF(inner);
        PyErr_SetString(PyExc_TypeError, "not an ssl.SSLObject over _ssl._SSLSocket");
        return NULL;
    }
    ssl = ((PySSLSocketHead *)inner)->ssl;
    version = PyObject_CallMethod(inner, "version", NULL);
    Py_DECREF(inner);
    if (version == NULL)
        return NULL;
    ours = ssl != NULL ? SSL_get_version(ssl) : NULL;
    ok = ours != NULL && PyUnicode_Check(version) && strcmp(PyUnicode_AsUTF8(version), ours) == 0;
    Py_DECREF(version);
    if (!ok || SSL_get_rbio(ssl) == NULL || SSL_get_wbio(ssl) == NULL || SSL_get_rbio(ssl) == SSL_get_wbio(ssl) ||
        BIO_method_type(SSL_get_rbio(ssl)) != BIO_TYPE_MEM || BIO_method_type(SSL_get_wbio(ssl)) != BIO_TYPE_MEM ||
        SSL_pending(ssl) != 0) {
        PyErr_SetString(PyExc_ValueError, "the TLS connection cannot be taken over");
        return NULL;
    }
    return ssl;
}

static int
init_endpoint(endpoint *e, session *s, int side, int fd, PyObject *sslobj, PyObject *early)
{
    e->s = s;
    e->side = side;
    e->fd = fd;
    if (sslobj != Py_None) {
        e->ssl = ssl_of(sslobj);
        if (e->ssl == NULL)
            return -1;
        e->rbio = SSL_get_rbio(e->ssl);
        e->wbio = SSL_get_wbio(e->ssl);
        if (BIO_ctrl_pending(e->wbio) != 0) {
            PyErr_SetString(PyExc_ValueError, "the TLS connection has unsent records");
            return -1;
        }
        e->ref = Py_NewRef(sslobj);
    }
    if (PyBytes_GET_SIZE(early) > 0 && fb_append(&e->in, PyBytes_AS_STRING(early), (size_t)PyBytes_GET_SIZE(early)) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void
session_free(session *s)
{
    release_spool(s);
    fb_free(&s->c.in);
    fb_free(&s->c.out);
    fb_free(&s->b.in);
    fb_free(&s->b.out);
    Py_XDECREF(s->c.ref);
    Py_XDECREF(s->b.ref);
    Py_XDECREF((PyObject *)s->shapes);
    Py_XDECREF(s->context);
    if (s->t != NULL)
        pgt_free(s->t);
    pgt_verdict_unref(s->preapproved_verdict);
    pgt_buf_free(&s->rows);
    free(s->terminate_payload);
    free(s);
}

static Worker *
worker_of(Engine *eng, uint64_t id)
{
    return &eng->workers[id % (uint64_t)eng->nworkers];
}

static PyObject *
Engine_adopt(Engine *eng, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"client_fd", "client_ssl", "client_early", "server_fd", "server_ssl", "server_early",
                             "recording_fd", "prev_hash", "seq", "recording_bytes", "next_sync", "fsync_interval",
                             "events_fd", "events_seq", "template_version", "record_parameters", "max_len",
                             "shapes", "standard_strings", "context", "full_rows", NULL};
    int cfd, bfd, rec_fd, events_fd, tv, record_parameters, standard_strings;
    PyObject *cssl, *bssl, *cearly, *bearly, *shapes, *context, *full_rows = Py_None;
    Py_buffer prev;
    unsigned long long seq, rec_bytes, events_seq;
    unsigned int max_len;
    double next_sync, fsync_interval;
    session *s;
    command *cmd;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOSiOSiy*KKddiKipIOpO|O", kwlist, &cfd, &cssl, &cearly, &bfd,
                                     &bssl, &bearly, &rec_fd, &prev, &seq, &rec_bytes, &next_sync,
                                     &fsync_interval, &events_fd, &events_seq, &tv, &record_parameters, &max_len,
                                     &shapes, &standard_strings, &context, &full_rows))
        return NULL;
    if (prev.len != HASH_SIZE || (shapes != Py_None && !PyObject_TypeCheck(shapes, &ShapeSetType))) {
        PyBuffer_Release(&prev);
        PyErr_SetString(PyExc_TypeError, "prev_hash: 32 bytes; shapes: a ShapeSet or None");
        return NULL;
    }
    s = calloc(1, sizeof *s);
    if (s == NULL) {
        PyBuffer_Release(&prev);
        return PyErr_NoMemory();
    }
    memcpy(s->prev, prev.buf, HASH_SIZE);
    PyBuffer_Release(&prev);
    spoolmap_init(&s->rec_map, rec_fd);
    spoolmap_init(&s->events_map, events_fd);
    s->c.fd = s->b.fd = -1;
    if (init_endpoint(&s->c, s, FROM_CLIENT, cfd, cssl, cearly) < 0 ||
        init_endpoint(&s->b, s, FROM_SERVER, bfd, bssl, bearly) < 0) {
        session_free(s);
        return NULL;
    }
    s->t = pgtpy_tracker(record_parameters, (int64_t)events_seq, tv, full_rows);
    if (s->t == NULL) {
        session_free(s);
        return NULL;
    }
    s->rec_fd = rec_fd;
    s->seq = seq;
    s->rec_bytes = rec_bytes;
    s->next_sync = next_sync;
    s->fsync_interval = fsync_interval;
    s->events_fd = events_fd;
    s->max_len = max_len;
    s->standard_strings = standard_strings;
    s->shapes = shapes == Py_None ? NULL : (ShapeSet *)Py_NewRef(shapes);
    s->context = Py_NewRef(context);
    s->state = RUN;
    cmd = calloc(1, sizeof *cmd);
    if (cmd == NULL) {
        session_free(s);
        return PyErr_NoMemory();
    }
    s->id = ++eng->next_id;
    s->w = worker_of(eng, s->id);
    cmd->kind = C_ADOPT;
    cmd->s = s;
    __atomic_fetch_add(&eng->sessions_active, 1, __ATOMIC_RELAXED);
    push_command(s->w, cmd);
    return PyLong_FromUnsignedLongLong(s->id);
}

static PyObject *
Engine_judged(Engine *eng, PyObject *args)
{
    unsigned long long id;
    int allow;
    PyObject *verdict_obj = Py_None;
    pgt_verdict *verdict;
    command *cmd;
    if (!PyArg_ParseTuple(args, "Kp|O", &id, &allow, &verdict_obj) || pgtpy_verdict(verdict_obj, &verdict) < 0)
        return NULL;
    cmd = calloc(1, sizeof *cmd);
    if (cmd == NULL) {
        pgt_verdict_unref(verdict);
        return PyErr_NoMemory();
    }
    cmd->kind = C_JUDGED;
    cmd->id = id;
    cmd->allow = allow;
    cmd->verdict = verdict;
    push_command(worker_of(eng, id), cmd);
    Py_RETURN_NONE;
}

static PyObject *
Engine_terminate(Engine *eng, PyObject *args)
{
    unsigned long long id;
    Py_buffer payload;
    command *cmd;
    if (!PyArg_ParseTuple(args, "Ky*", &id, &payload))
        return NULL;
    cmd = calloc(1, sizeof *cmd);
    if (cmd != NULL)
        cmd->payload = malloc(payload.len ? (size_t)payload.len : 1);
    if (cmd == NULL || cmd->payload == NULL) {
        free(cmd);
        PyBuffer_Release(&payload);
        return PyErr_NoMemory();
    }
    memcpy(cmd->payload, payload.buf, (size_t)payload.len);
    cmd->len = (size_t)payload.len;
    PyBuffer_Release(&payload);
    cmd->kind = C_TERMINATE;
    cmd->id = id;
    push_command(worker_of(eng, id), cmd);
    Py_RETURN_NONE;
}

static PyObject *
Engine_eject(Engine *eng, PyObject *arg)
{
    unsigned long long id = PyLong_AsUnsignedLongLong(arg);
    command *cmd;
    if (PyErr_Occurred())
        return NULL;
    cmd = calloc(1, sizeof *cmd);
    if (cmd == NULL)
        return PyErr_NoMemory();
    cmd->kind = C_EJECT;
    cmd->id = id;
    push_command(worker_of(eng, id), cmd);
    Py_RETURN_NONE;
}

static PyObject *
bytes_of(fbuf *b)
{
    return PyBytes_FromStringAndSize((const char *)b->data + b->start, (Py_ssize_t)fb_len(b));
}

/* What Python needs to carry a session on (ejected) or close it (done). */
static PyObject *
session_state(session *s)
{
    PyObject *state = Py_BuildValue(
        "{s:s,s:y#,s:K,s:K,s:d,s:K,s:K,s:K,s:s,s:N,s:N,s:N,s:N,s:i,s:N}",
        "state", s->state == DONE ? "done" : "ejected", "prev_hash", (const char *)s->prev, (Py_ssize_t)HASH_SIZE,
        "seq", (unsigned long long)s->seq, "recording_bytes", (unsigned long long)s->rec_bytes, "next_sync",
        s->next_sync, "events_seq", (unsigned long long)pgt_last_seq(s->t), "bytes_in",
        (unsigned long long)s->bytes_in, "bytes_out", (unsigned long long)s->bytes_out, "reason", s->reason,
        "client_pending", bytes_of(&s->c.in), "server_pending", bytes_of(&s->b.in), "client_unsent",
        bytes_of(&s->c.out), "server_unsent", bytes_of(&s->b.out), "standard_strings", s->standard_strings,
        "statements", PyLong_FromUnsignedLongLong(pgt_statements_total(s->t)));
    if (state != NULL && s->state == EJECTED) {
        PyObject *tracker = pgtpy_export(s->t);
        if (tracker == NULL || PyDict_SetItemString(state, "tracker", tracker) < 0) {
            Py_XDECREF(tracker);
            Py_DECREF(state);
            return NULL;
        }
        Py_DECREF(tracker);
    }
    return state;
}

/* completions() -> [("judge", id, context, msg_type, body, shape | None) | ("done"|"ejected", id, context, state)] */
static PyObject *
Engine_completions(Engine *eng, PyObject *unused)
{
    completion *c, *next;
    PyObject *list;
    uint64_t count;
    (void)unused;
    (void)!read(eng->notify_fd, &count, sizeof count);
    pthread_mutex_lock(&eng->lock);
    c = eng->completions;
    eng->completions = eng->completions_tail = NULL;
    pthread_mutex_unlock(&eng->lock);
    list = PyList_New(0);
    for (; c != NULL; c = next) {
        PyObject *item = NULL;
        next = c->next;
        if (list != NULL) {
            if (c->kind == K_JUDGE) {
                PyObject *shape = c->shape != NULL ? PyBytes_FromStringAndSize((const char *)c->shape,
                                                                               (Py_ssize_t)c->shape_len)
                                                   : Py_NewRef(Py_None);
                item = shape ? Py_BuildValue("sKOiy#N", "judge", (unsigned long long)c->id, Py_None, c->msg_type,
                                             (const char *)c->text, (Py_ssize_t)c->text_len, shape)
                             : NULL;
            } else {
                PyObject *state = session_state(c->s);
                item = state ? Py_BuildValue("sKON", c->kind == K_DONE ? "done" : "ejected",
                                             (unsigned long long)c->id, c->s->context, state)
                             : NULL;
            }
            if (item == NULL || PyList_Append(list, item) < 0) {
                Py_CLEAR(list);
            }
            Py_XDECREF(item);
        }
        if (c->kind != K_JUDGE)
            session_free(c->s);
        free(c->text);
        free(c->shape);
        free(c);
    }
    return list;
}

static PyObject *
Engine_stats(Engine *eng, PyObject *unused)
{
    (void)unused;
    return Py_BuildValue("{s:K,s:K,s:K,s:K}", "statements_ok",
                         (unsigned long long)__atomic_load_n(&eng->statements_ok, __ATOMIC_RELAXED),
                         "statements_error", (unsigned long long)__atomic_load_n(&eng->statements_error, __ATOMIC_RELAXED),
                         "statements_skipped",
                         (unsigned long long)__atomic_load_n(&eng->statements_skipped, __ATOMIC_RELAXED),
                         "sessions", (unsigned long long)__atomic_load_n(&eng->sessions_active, __ATOMIC_RELAXED));
}

static PyObject *
Engine_fileno(Engine *eng, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(eng->notify_fd);
}

static void
free_session_lists(Worker *w)
{
    while (w->live != NULL) {
        session *s = w->live;
        w->live = s->next;
        session_free(s);
    }
    while (w->commands != NULL) {
        command *c = w->commands;
        w->commands = c->next;
        if (c->kind == C_ADOPT)
            session_free(c->s);
        pgt_verdict_unref(c->verdict);
        free(c->payload);
        free(c);
    }
}

static void
Engine_dealloc(Engine *eng)
{
    int i;
    uint64_t one = 1;
    __atomic_store_n(&eng->stopping, 1, __ATOMIC_RELEASE);
    for (i = 0; i < eng->nworkers; i++) {
        Worker *w = &eng->workers[i];
        if (w->started) {
            (void)!write(w->wake_fd, &one, sizeof one);
            Py_BEGIN_ALLOW_THREADS
            pthread_join(w->thread, NULL);
            Py_END_ALLOW_THREADS
        }
    }
    for (i = 0; i < eng->nworkers; i++) {
        Worker *w = &eng->workers[i];
        free_session_lists(w);
        if (w->epfd >= 0)
            close(w->epfd);
        if (w->wake_fd >= 0)
            close(w->wake_fd);
        pthread_mutex_destroy(&w->lock);
    }
    free(eng->workers);
    syncer_stop(&eng->syncer);
    while (eng->completions != NULL) {
        completion *c = eng->completions;
        eng->completions = c->next;
        if (c->kind != K_JUDGE)
            session_free(c->s);
        free(c->text);
        free(c->shape);
        free(c);
    }
    if (eng->notify_fd >= 0)
        close(eng->notify_fd);
    pthread_mutex_destroy(&eng->lock);
    Py_TYPE(eng)->tp_free((PyObject *)eng);
}

static PyObject *
Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"workers", "batch", NULL};
    Engine *eng;
    int nworkers = 1, batch = 0, i;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|ip", kwlist, &nworkers, &batch))
        return NULL;
    if (nworkers < 1 || nworkers > 64) {
        PyErr_SetString(PyExc_ValueError, "workers: 1 to 64");
        return NULL;
    }
    eng = (Engine *)type->tp_alloc(type, 0);
    if (eng == NULL)
        return NULL;
    pthread_mutex_init(&eng->lock, NULL);
    syncer_start(&eng->syncer);
    eng->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    eng->workers = calloc((size_t)nworkers, sizeof(Worker));
    if (eng->workers == NULL) {
        Py_DECREF(eng);
        return PyErr_NoMemory();
    }
    eng->nworkers = nworkers;
    eng->batch = batch;
    for (i = 0; i < nworkers; i++)
        eng->workers[i].epfd = eng->workers[i].wake_fd = -1;
    for (i = 0; i < nworkers; i++) {
        Worker *w = &eng->workers[i];
        struct epoll_event ev;
        w->eng = eng;
        pthread_mutex_init(&w->lock, NULL);
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        w->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (eng->notify_fd < 0 || w->epfd < 0 || w->wake_fd < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            Py_DECREF(eng);
            return NULL;
        }
        ev.events = EPOLLIN;
        ev.data.ptr = NULL;
        epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->wake_fd, &ev);
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            PyErr_SetString(PyExc_OSError, "cannot start a relay thread");
            Py_DECREF(eng);
            return NULL;
        }
        w->started = 1;
    }
    return (PyObject *)eng;
}

static PyMethodDef Engine_methods[] = {
    {"adopt", (PyCFunction)(void (*)(void))Engine_adopt, METH_VARARGS | METH_KEYWORDS,
     "adopt(...) -> id: the worker relays the session from now on"},
    {"judged", (PyCFunction)Engine_judged, METH_VARARGS,
     "judged(id, allow, verdict=None): the answer to a judge completion; verdict (tracker.verdict_fields): what "
     "the evidence of a statement allowed through says of it"},
    {"terminate", (PyCFunction)Engine_terminate, METH_VARARGS,
     "terminate(id, payload): send the client a final message and end the session"},
    {"eject", (PyCFunction)Engine_eject, METH_O, "eject(id): hand the session back to Python"},
    {"completions", (PyCFunction)Engine_completions, METH_NOARGS, "completions() -> list"},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "stats() -> dict of counters"},
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "the eventfd that becomes readable with completions"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "data_plane.postgres._fastrelay.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(workers=1, batch=False): the relay threads of the C data path (batch: under SCHED_BATCH).",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

static PyObject *
openssl_version_num(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyLong_FromUnsignedLong(OpenSSL_version_num());
}

static PyMethodDef module_methods[] = {
    {"openssl_version_num", openssl_version_num, METH_NOARGS, "the OpenSSL this module runs against"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastrelay_module = {
    PyModuleDef_HEAD_INIT, "data_plane.postgres._fastrelay",
    "The C data path of the PostgreSQL relay; see data_plane.postgres.fastpath.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastrelay(void)
{
    PyObject *module;
    init_byte_kinds();
    sha256_choose_block(1);
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&ShapeSetType) < 0)
        return NULL;
    module = PyModule_Create(&fastrelay_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObjectRef(module, "ShapeSet", (PyObject *)&ShapeSetType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
