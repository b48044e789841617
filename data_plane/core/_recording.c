/* The recording's hot path: one record hash-chained and written with one writev — the C twin of
 * recording._append_py (same bytes, same hash; tests compare them). Every chunk the gateway
 * relays goes through it, twice per round trip, so it is worth a few hundred nanoseconds. The
 * shipper's loops over a spool live here too: a recording's whole records, those of a live session whose
 * links verify, and the C data path's evidence rows by partition, completed with their template's
 * members (each with a Python twin). */
#define _GNU_SOURCE /* memmem */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../_sha256.h"
#include "../_record.h"

/* append(fd, prev_hash, seq, time, direction, kind, payload) -> the record's hash */
static PyObject *
append(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned char link[RECORD_HASH_SIZE];
    Py_buffer payload;
    long fd, direction, kind;
    unsigned long long seq;
    double now;
    ssize_t written;

    (void)module;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "append(fd, prev_hash, seq, time, direction, kind, payload)");
        return NULL;
    }
    fd = PyLong_AsLong(args[0]);
    seq = PyLong_AsUnsignedLongLong(args[2]);
    now = PyFloat_AsDouble(args[3]);
    direction = PyLong_AsLong(args[4]);
    kind = PyLong_AsLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(args[1]) || PyBytes_GET_SIZE(args[1]) != RECORD_HASH_SIZE) {
        PyErr_SetString(PyExc_TypeError, "prev_hash must be 32 bytes");
        return NULL;
    }
    if (direction < 0 || direction > 255 || kind < 0 || kind > 255) {
        PyErr_SetString(PyExc_ValueError, "direction and kind are bytes");
        return NULL;
    }
    if (PyObject_GetBuffer(args[6], &payload, PyBUF_SIMPLE) < 0)
        return NULL;
    if ((uint64_t)payload.len > 0xFFFFFFFFu) {
        PyBuffer_Release(&payload);
        PyErr_SetString(PyExc_OverflowError, "a record's payload is limited to 4 GiB");
        return NULL;
    }
    for (;;) {
        written = record_write((int)fd, (const unsigned char *)PyBytes_AS_STRING(args[1]), (uint64_t)seq, now,
                               (int)direction, (int)kind, (const unsigned char *)payload.buf, (size_t)payload.len,
                               link, 0);
        if (written >= 0 || errno != EINTR || PyErr_CheckSignals() < 0)
            break;
    }
    PyBuffer_Release(&payload);
    if (written < 0) {
        if (!PyErr_Occurred()) {
            if (errno == ENOSPC)
                PyErr_SetString(PyExc_OSError, "short write (the disk is full)");
            else
                PyErr_SetFromErrno(PyExc_OSError);
        }
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)link, RECORD_HASH_SIZE);
}

/* verified_prefix(data, prev_hash) -> (end, last_hash): the longest run of whole records at the start
 * of data whose links verify, starting from prev_hash (the twin of recording._verified_prefix_py) */
static PyObject *
verified_prefix(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data;
    unsigned char prev[RECORD_HASH_SIZE], link[RECORD_HASH_SIZE];
    size_t pos = 0;
    (void)module;
    if (nargs != 2 || !PyBytes_Check(args[1]) || PyBytes_GET_SIZE(args[1]) != RECORD_HASH_SIZE) {
        PyErr_SetString(PyExc_TypeError, "verified_prefix(data, prev_hash: 32 bytes)");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    memcpy(prev, PyBytes_AS_STRING(args[1]), RECORD_HASH_SIZE);
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        const unsigned char *p = (const unsigned char *)data.buf + pos;
        size_t left = (size_t)data.len - pos, n;
        sha256_t digest;
        if (left < RECORD_HEADER_SIZE + RECORD_HASH_SIZE)
            break;
        n = ((size_t)p[18] << 24) | ((size_t)p[19] << 16) | ((size_t)p[20] << 8) | p[21];
        if (n > left - RECORD_HEADER_SIZE - RECORD_HASH_SIZE)
            break;
        sha256_init(&digest);
        sha256_update(&digest, prev, RECORD_HASH_SIZE);
        sha256_update(&digest, p, RECORD_HEADER_SIZE + n);
        sha256_final(&digest, link);
        if (memcmp(link, p + RECORD_HEADER_SIZE + n, RECORD_HASH_SIZE) != 0)
            break;
        memcpy(prev, link, RECORD_HASH_SIZE);
        pos += RECORD_HEADER_SIZE + n + RECORD_HASH_SIZE;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return Py_BuildValue("(ny#)", (Py_ssize_t)pos, (const char *)prev, (Py_ssize_t)RECORD_HASH_SIZE);
}

/* complete_prefix(data) -> end: the longest run of whole records at the start of data, ended by a header
 * whose time is zero, where a mapped spool's unwritten zeros begin (the twin of
 * recording._complete_prefix_py). The shipper cuts every closed recording with it, record by record. */
static PyObject *
complete_prefix(PyObject *module, PyObject *arg)
{
    Py_buffer data;
    size_t pos = 0;
    (void)module;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        const unsigned char *p = (const unsigned char *)data.buf + pos;
        size_t left = (size_t)data.len - pos, n;
        uint64_t time_bits = 0;
        int i;
        if (left < RECORD_HEADER_SIZE)
            break;
        for (i = 8; i < 16; i++)
            time_bits = (time_bits << 8) | p[i];
        if ((time_bits & ~((uint64_t)1 << 63)) == 0) /* +0.0 or -0.0: no record was written here */
            break;
        n = ((size_t)p[18] << 24) | ((size_t)p[19] << 16) | ((size_t)p[20] << 8) | p[21];
        if (left - RECORD_HEADER_SIZE < RECORD_HASH_SIZE || n > left - RECORD_HEADER_SIZE - RECORD_HASH_SIZE)
            break;
        pos += RECORD_HEADER_SIZE + n + RECORD_HASH_SIZE;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromSsize_t((Py_ssize_t)pos);
}

/* ---------------------------------------------------------------------------------------------- */
/* The shipper's other loop: runs of the full evidence rows the C data path writes (pgtrack.h), taken
 * by partition without parsing them, as contract.full_row_key reads one. */

#define RUNS_MAX 8
#define DAY_MS 86400000LL

typedef struct {
    long long day, first;
    const char *region;
    size_t region_len, count;
    size_t start, end; /* while its lines lie next to each other in the input: where they are */
    int scattered;     /* …and once they do not, they are copied: */
    char *data;
    size_t len, cap;
} run_t;

/* The time of a line that opens with `{"time":<digits>,` and ends in `}`: the index of that comma, 0 for
 * any other line (a full row's and a C row's opening, contract.full_row_key and c_row_key). */
static size_t
row_time(const char *p, size_t n, long long *time_ms)
{
    size_t i = 8;
    long long t = 0;
    if (n < 10 || memcmp(p, "{\"time\":", 8) != 0 || p[n - 1] != '}')
        return 0;
    while (i < n && p[i] >= '0' && p[i] <= '9' && i < 26)
        t = t * 10 + (p[i++] - '0');
    if (i == 8 || i >= n || p[i] != ',')
        return 0;
    *time_ms = t;
    return i;
}

/* A full row's line: `{"time":<digits>,` … `,"gateway_region":"<no quote, no backslash>"` … `}`.
 * `back` is where the key was from the end of the last line: a session's rows end in the same
 * template columns, so it is tried before a search. Either finds the key's only place: its quotes
 * would be escaped inside a string, and a row holds no nested object. */
static int
full_row(const char *p, size_t n, long long *time_ms, const char **region, size_t *region_len, size_t *back)
{
    static const char key[] = ",\"gateway_region\":\"";
    size_t klen = sizeof key - 1, i;
    long long t = 0;
    const char *at, *end;
    if ((i = row_time(p, n, &t)) == 0)
        return 0;
    if (*back > 0 && *back <= n - i && memcmp(p + n - *back, key, klen) == 0) {
        at = p + n - *back;
    } else {
        at = memmem(p + i, n - i, key, klen);
        if (at == NULL)
            return 0;
        *back = (size_t)(p + n - at);
    }
    at += klen;
    end = memchr(at, '"', (size_t)(p + n - at));
    if (end == NULL || memchr(at, '\\', (size_t)(end - at)) != NULL)
        return 0;
    *time_ms = t;
    *region = at;
    *region_len = (size_t)(end - at);
    return 1;
}

/* Appends the line `p[0..n)`, with `splice` (`splice_len` bytes) and a closing brace after it when
 * `splice` is not NULL, and a newline. */
static int
run_append(run_t *r, const char *p, size_t n, const char *splice, size_t splice_len)
{
    size_t need = n + (splice ? splice_len + 1 : 0) + 1;
    if (r->len + need > r->cap) {
        size_t cap = r->cap ? r->cap : 1 << 16;
        char *data;
        while (cap < r->len + need)
            cap *= 2;
        data = realloc(r->data, cap);
        if (data == NULL)
            return -1;
        r->data = data;
        r->cap = cap;
    }
    memcpy(r->data + r->len, p, n);
    r->len += n;
    if (splice != NULL) {
        memcpy(r->data + r->len, splice, splice_len);
        r->len += splice_len;
        r->data[r->len++] = '}';
    }
    r->data[r->len++] = '\n';
    return 0;
}

/* A template's members, as the shipper passed them (rests: {version: bytes}), and its region. */
typedef struct {
    long long version;
    const char *rest, *region;
    size_t rest_len, region_len;
} tail_t;

/* The C data path's statement row (contract.c_row_key): `{"time":<digits>,` … `,"tv":<digits>}`.
 * *cut: where `,"tv":` starts; *version: its digits. */
static int
c_row(const char *p, size_t n, long long *time_ms, long long *version, size_t *cut)
{
    size_t i, digits, at;
    long long t = 0, v = 0;
    if (n < 16 || (i = row_time(p, n, &t)) == 0)
        return 0;
    digits = n - 1; /* the version's first digit */
    while (digits > i && p[digits - 1] >= '0' && p[digits - 1] <= '9')
        digits--;
    if (digits == n - 1 || n - 1 - digits > 18 || digits < i + 6 || memcmp(p + digits - 6, ",\"tv\":", 6) != 0)
        return 0;
    for (at = digits; at < n - 1; at++)
        v = v * 10 + (p[at] - '0');
    *time_ms = t;
    *version = v;
    *cut = digits - 6;
    return 1;
}

#define TAILS_MAX 8

/* The members of template `version` from `rests`, and the region among them (`,"gateway_region":"…"`),
 * remembered in `tails`: NULL when `rests` has none for it, or they name no plain region. */
static const tail_t *
tail_of(PyObject *rests, tail_t *tails, size_t *ntails, long long version)
{
    static const char key[] = ",\"gateway_region\":\"";
    size_t i, klen = sizeof key - 1;
    PyObject *number, *rest;
    const char *at, *end, *p;
    Py_ssize_t n;
    for (i = 0; i < *ntails; i++)
        if (tails[i].version == version)
            return tails[i].rest ? &tails[i] : NULL;
    if (rests == NULL || *ntails == TAILS_MAX || (number = PyLong_FromLongLong(version)) == NULL) {
        PyErr_Clear();
        return NULL;
    }
    rest = PyDict_GetItemWithError(rests, number); /* borrowed; the dict keeps it for the call */
    Py_DECREF(number);
    tails[*ntails].version = version;
    tails[*ntails].rest = NULL;
    if (rest == NULL || !PyBytes_Check(rest)) {
        PyErr_Clear();
        (*ntails)++;
        return NULL;
    }
    p = PyBytes_AS_STRING(rest);
    n = PyBytes_GET_SIZE(rest);
    at = memmem(p, (size_t)n, key, klen);
    end = at ? memchr(at + klen, '"', (size_t)(p + n - at - klen)) : NULL;
    if (end == NULL || memchr(at + klen, '\\', (size_t)(end - at - klen)) != NULL) {
        (*ntails)++;
        return NULL;
    }
    tails[*ntails].rest = p;
    tails[*ntails].rest_len = (size_t)n;
    tails[*ntails].region = at + klen;
    tails[*ntails].region_len = (size_t)(end - at - klen);
    return &tails[(*ntails)++];
}

/* One pass over the lines: full rows, and C rows with their template's members, into runs, other
 * lines into `others`. With `copy` 0 a run only notes where its lines are, and is marked scattered
 * when they do not follow one another or hold C rows (which are completed, so copied); with `copy` 1
 * its lines are copied into its own buffer. -1 on failure (an exception is set). */
static int
scan_lines(const char *buf, size_t size, PyObject *rests, run_t *runs, size_t *nruns, PyObject *others, int copy)
{
    size_t pos = 0, i, back = 0, ntails = 0;
    tail_t tails[TAILS_MAX];
    while (pos < size) {
        const char *p = buf + pos, *nl = memchr(p, '\n', size - pos);
        size_t n = nl ? (size_t)(nl - p) : size - pos, region_len, cut = n;
        const char *region = NULL;
        const tail_t *tail = NULL;
        long long t, version;
        run_t *r = NULL;
        if (rests != NULL && c_row(p, n, &t, &version, &cut) && (tail = tail_of(rests, tails, &ntails, version))) {
            region = tail->region;
            region_len = tail->region_len;
        } else if (full_row(p, n, &t, &region, &region_len, &back)) {
            cut = n; /* c_row may have set it for a row whose template is not given */
        }
        if (region != NULL) {
            long long day = t / DAY_MS;
            for (i = 0; i < *nruns; i++)
                if (runs[i].day == day && runs[i].region_len == region_len &&
                    memcmp(runs[i].region, region, region_len) == 0) {
                    r = &runs[i];
                    break;
                }
            if (r == NULL && *nruns < RUNS_MAX) {
                r = &runs[(*nruns)++];
                r->day = day;
                r->first = t;
                r->region = region;
                r->region_len = region_len;
                r->start = r->end = pos;
            }
        }
        if (r != NULL) {
            if (copy) {
                if (run_append(r, p, cut, tail ? tail->rest : NULL, tail ? tail->rest_len : 0) < 0) {
                    PyErr_NoMemory();
                    return -1;
                }
            } else if (r->end == pos && nl != NULL && tail == NULL) {
                r->end = pos + n + 1;
            } else {
                r->scattered = 1; /* or its last line has no newline to take along, or it is completed */
            }
            r->count++;
            if (t < r->first)
                r->first = t;
        } else {
            PyObject *line = PyBytes_FromStringAndSize(p, (Py_ssize_t)n);
            if (line == NULL || PyList_Append(others, line) < 0) {
                Py_XDECREF(line);
                return -1;
            }
            Py_DECREF(line);
        }
        pos += n + 1;
    }
    return 0;
}

/* full_row_runs(lines: bytes, rests: {version: bytes} | None = None) -> ([(first time ms, region, lines,
 * count)], [other line, …]): the full rows of whole lines, and the C rows whose template version
 * `rests` has members for (completed with them), grouped by day and region (each run's lines end in
 * a newline), and every other line, in order. A run of full rows that lie together in the input is a
 * slice of it, or the input itself, rather than a copy line by line. */
static PyObject *
full_row_runs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data;
    run_t runs[RUNS_MAX];
    size_t nruns = 0, i;
    int copy;
    PyObject *others = NULL, *out = NULL, *list = NULL, *rests = NULL;
    (void)module;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "full_row_runs(lines, rests=None)");
        return NULL;
    }
    if (nargs == 2 && args[1] != Py_None) {
        if (!PyDict_Check(args[1])) {
            PyErr_SetString(PyExc_TypeError, "full_row_runs: rests must be a dict {template version: bytes}");
            return NULL;
        }
        rests = PyDict_GET_SIZE(args[1]) ? args[1] : NULL;
    }
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    memset(runs, 0, sizeof runs);
    for (copy = rests != NULL; copy < 2; copy++) { /* C rows are always copied: skip the first pass */
        Py_XDECREF(others);
        others = PyList_New(0);
        if (others == NULL || scan_lines(data.buf, (size_t)data.len, rests, runs, &nruns, others, copy) < 0)
            goto done;
        for (i = 0; i < nruns && !runs[i].scattered; i++)
            ;
        if (i == nruns)
            break;
        memset(runs, 0, sizeof runs);
        nruns = 0;
    }
    list = PyList_New((Py_ssize_t)nruns);
    if (list == NULL)
        goto done;
    for (i = 0; i < nruns; i++) {
        run_t *r = &runs[i];
        PyObject *lines, *item;
        if (copy)
            lines = PyBytes_FromStringAndSize(r->data, (Py_ssize_t)r->len);
        else if (r->start == 0 && r->end == (size_t)data.len && PyBytes_CheckExact(args[0]))
            lines = Py_NewRef(args[0]);
        else
            lines = PyBytes_FromStringAndSize((const char *)data.buf + r->start, (Py_ssize_t)(r->end - r->start));
        if (lines == NULL)
            goto done;
        item = Py_BuildValue("(Ly#Nn)", r->first, r->region, (Py_ssize_t)r->region_len, lines, (Py_ssize_t)r->count);
        if (item == NULL)
            goto done;
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    out = PyTuple_Pack(2, list, others);
done:
    for (i = 0; i < nruns; i++)
        free(runs[i].data);
    Py_XDECREF(list);
    Py_XDECREF(others);
    PyBuffer_Release(&data);
    return out;
}

static PyObject *
set_sha_path(PyObject *module, PyObject *arg)
{
    int want_ni = PyObject_IsTrue(arg);
    (void)module;
    if (want_ni < 0)
        return NULL;
    return PyBool_FromLong(sha256_choose_block(want_ni));
}

static PyMethodDef methods[] = {
    {"append", (PyCFunction)(void (*)(void))append, METH_FASTCALL,
     "append(fd, prev_hash, seq, time, direction, kind, payload) -> hash: write one record"},
    {"verified_prefix", (PyCFunction)(void (*)(void))verified_prefix, METH_FASTCALL,
     "verified_prefix(data, prev_hash) -> (end, last_hash): the whole records at the start whose links verify"},
    {"complete_prefix", complete_prefix, METH_O,
     "complete_prefix(data) -> end: the whole records at the start, up to a header with a zero time"},
    {"full_row_runs", (PyCFunction)(void (*)(void))full_row_runs, METH_FASTCALL,
     "full_row_runs(lines, rests=None) -> ([(first time, region, lines, count)], [other line]): full evidence "
     "rows, and C rows completed with their template's members, by partition"},
    {"_set_sha_path", set_sha_path, METH_O, "Use the SHA extensions when true and available (tests compare both)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "data_plane.core._recording",
    "C accelerator for data_plane.core.recording; import that module instead.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__recording(void)
{
    sha256_choose_block(1);
    return PyModule_Create(&module);
}
