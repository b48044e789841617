/* Frame walker for the PostgreSQL typed message stream: the C twin of framescan._scan_frames_py.
 * It only reads headers; the gateway forwards the original bytes untouched. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Set once by framescan.py so that `except FrameTooLarge` catches what C raises. */
static PyObject *frame_error = NULL;
static PyObject *frame_too_large = NULL;

static PyObject *
set_errors(PyObject *module, PyObject *args)
{
    PyObject *error, *too_large;
    (void)module;
    if (!PyArg_ParseTuple(args, "OO:_set_errors", &error, &too_large))
        return NULL;
    if (!PyExceptionClass_Check(error) || !PyExceptionClass_Check(too_large)) {
        PyErr_SetString(PyExc_TypeError, "_set_errors expects two exception classes");
        return NULL;
    }
    Py_INCREF(error);
    Py_INCREF(too_large);
    Py_XSETREF(frame_error, error);
    Py_XSETREF(frame_too_large, too_large);
    Py_RETURN_NONE;
}

static void
raise_frame_error(int msg_type, int64_t length, Py_ssize_t offset)
{
    PyErr_Format(frame_error ? frame_error : PyExc_ValueError,
                 "invalid frame length %lld for message type 0x%02x at offset %zd",
                 (long long)length, msg_type, offset);
}

static void
raise_frame_too_large(int msg_type, int64_t length)
{
    PyObject *exc;
    if (frame_too_large == NULL) {
        PyErr_Format(PyExc_ValueError, "frame of type 0x%02x declares %lld bytes", msg_type, (long long)length);
        return;
    }
    exc = PyObject_CallFunction(frame_too_large, "iL", msg_type, (long long)length);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
}

static PyObject *
make_event(int msg_type, Py_ssize_t offset, int64_t size, Py_ssize_t skipped_before)
{
    PyObject *items[4];
    PyObject *event;
    int i;

    items[0] = PyLong_FromLong(msg_type);
    items[1] = PyLong_FromSsize_t(offset);
    items[2] = PyLong_FromLongLong((long long)size);
    items[3] = PyLong_FromSsize_t(skipped_before);
    event = PyTuple_New(4);
    if (event == NULL || !items[0] || !items[1] || !items[2] || !items[3]) {
        for (i = 0; i < 4; i++)
            Py_XDECREF(items[i]);
        Py_XDECREF(event);
        return NULL;
    }
    for (i = 0; i < 4; i++)
        PyTuple_SET_ITEM(event, i, items[i]); /* steals the reference */
    return event;
}

static PyObject *
scan_frames(PyObject *module, PyObject *args)
{
    PyObject *buf_obj, *skip_obj;
    Py_ssize_t start, max_len;
    Py_buffer buf, skip;
    PyObject *events = NULL, *result = NULL;
    unsigned char skipped_type[256];
    const unsigned char *data;
    Py_ssize_t n, pos, skipped = 0, i;

    (void)module;
    if (!PyArg_ParseTuple(args, "OnOn:scan_frames", &buf_obj, &start, &skip_obj, &max_len))
        return NULL;
    if (PyObject_GetBuffer(buf_obj, &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(skip_obj, &skip, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }

    memset(skipped_type, 0, sizeof skipped_type);
    for (i = 0; i < skip.len; i++)
        skipped_type[((const unsigned char *)skip.buf)[i]] = 1;

    data = (const unsigned char *)buf.buf;
    n = buf.len;
    if (start < 0 || start > n) {
        PyErr_Format(PyExc_ValueError, "start %zd is outside the buffer of %zd bytes", start, n);
        goto done;
    }
    events = PyList_New(0);
    if (events == NULL)
        goto done;

    pos = start;
    while (n - pos >= 5) {
        const unsigned char *p = data + pos;
        int msg_type = p[0];
        uint32_t raw = ((uint32_t)p[1] << 24) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 8) | (uint32_t)p[4];
        /* The wire length is a signed int32: map the top half to negatives without relying on casts. */
        int64_t length = raw >= 0x80000000u ? (int64_t)raw - INT64_C(0x100000000) : (int64_t)raw;

        if (length < 4) {
            raise_frame_error(msg_type, length, pos);
            goto done;
        }
        if (length > (int64_t)max_len) {
            raise_frame_too_large(msg_type, length);
            goto done;
        }
        if (length > (int64_t)(n - pos - 1))
            break; /* body incomplete: leave the partial frame for the next read */

        if (skipped_type[msg_type]) {
            skipped++;
        } else {
            PyObject *event = make_event(msg_type, pos, length + 1, skipped);
            if (event == NULL)
                goto done;
            if (PyList_Append(events, event) < 0) {
                Py_DECREF(event);
                goto done;
            }
            Py_DECREF(event);
            skipped = 0;
        }
        pos += (Py_ssize_t)length + 1;
    }
    result = Py_BuildValue("(nOn)", pos, events, skipped);

done:
    Py_XDECREF(events);
    PyBuffer_Release(&skip);
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef framescan_methods[] = {
    {"scan_frames", scan_frames, METH_VARARGS,
     "scan_frames(buf, start, skip, max_len) -> (end, events, trailing_skipped)"},
    {"_set_errors", set_errors, METH_VARARGS, "_set_errors(FrameError, FrameTooLarge)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef framescan_module = {
    PyModuleDef_HEAD_INIT, "data_plane.postgres._framescan",
    "C accelerator for data_plane.postgres.framescan; import that module instead.", -1, framescan_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__framescan(void)
{
    return PyModule_Create(&framescan_module);
}
