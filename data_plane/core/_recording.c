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

#define HEADER_SIZE 22 /* !QdBBI: seq, unix time, direction, kind, payload length */
#define HASH_SIZE 32

static void
put_be64(unsigned char *p, uint64_t v)
{
    int i;
    for (i = 7; i >= 0; i--) {
        p[i] = (unsigned char)v;
        v >>= 8;
    }
}

/* append(fd, prev_hash, seq, time, direction, kind, payload) -> the record's hash */
static PyObject *
append(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned char header[HEADER_SIZE], link[HASH_SIZE];
    struct iovec iov[3];
    Py_buffer payload;
    sha256_t digest;
    long fd, direction, kind;
    unsigned long long seq;
    double now;
    uint64_t time_bits;
    size_t total;
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
    if (!PyBytes_Check(args[1]) || PyBytes_GET_SIZE(args[1]) != HASH_SIZE) {
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

    put_be64(header, (uint64_t)seq);
    memcpy(&time_bits, &now, sizeof time_bits); /* IEEE 754, as struct's 'd' packs it */
    put_be64(header + 8, time_bits);
    header[16] = (unsigned char)direction;
    header[17] = (unsigned char)kind;
    header[18] = (unsigned char)((uint64_t)payload.len >> 24);
    header[19] = (unsigned char)((uint64_t)payload.len >> 16);
    header[20] = (unsigned char)((uint64_t)payload.len >> 8);
    header[21] = (unsigned char)payload.len;

    sha256_init(&digest);
    sha256_update(&digest, (const unsigned char *)PyBytes_AS_STRING(args[1]), HASH_SIZE);
    sha256_update(&digest, header, HEADER_SIZE);
    sha256_update(&digest, (const unsigned char *)payload.buf, (size_t)payload.len);
    sha256_final(&digest, link);

    iov[0].iov_base = header;
    iov[0].iov_len = HEADER_SIZE;
    iov[1].iov_base = payload.buf;
    iov[1].iov_len = (size_t)payload.len;
    iov[2].iov_base = link;
    iov[2].iov_len = HASH_SIZE;
    total = HEADER_SIZE + (size_t)payload.len + HASH_SIZE;
    do {
        written = writev((int)fd, iov, 3);
    } while (written < 0 && errno == EINTR && !PyErr_CheckSignals());
    PyBuffer_Release(&payload);
    if (written < 0) {
        if (!PyErr_Occurred())
            PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    if ((size_t)written != total) { /* a short write on a regular file: the disk is full */
        PyErr_Format(PyExc_OSError, "short write (%zd of %zu bytes)", written, total);
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)link, HASH_SIZE);
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
