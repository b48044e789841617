/* The recording's hot path: one record hash-chained and written with one writev — the C twin of
 * recording._append_py (same bytes, same hash; tests compare them). Every chunk the gateway
 * relays goes through it, twice per round trip, so it is worth a few hundred nanoseconds. */
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
