/* A CPython face on pgtrack.h, for tests only: the relay's engine uses the header directly. A
 * Tracker mirrors the C API one method per function, evidence rows come back as bytes; the
 * module functions expose the pieces (UTF-8 replacement, JSON strings, number formatting, the
 * secret hint, rows_from_tag, one parameter's rendering) for property tests against Python. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "pgtrack.h"
#include "pgtrack_py.h"

typedef struct {
    PyObject_HEAD
    pgt_tracker *tracker;
} TrackerObject;

static PyObject *
no_memory(pgt_buf *buf)
{
    pgt_buf_free(buf);
    return PyErr_NoMemory();
}

/* (rc, rows as bytes) */
static PyObject *
result(int rc, pgt_buf *events)
{
    PyObject *out = Py_BuildValue("(iy#)", rc, events->data ? events->data : "", (Py_ssize_t)events->len);
    pgt_buf_free(events);
    return out;
}

static PyObject *
bytes_of(pgt_buf *buf)
{
    PyObject *out = PyBytes_FromStringAndSize(buf->data ? buf->data : "", (Py_ssize_t)buf->len);
    pgt_buf_free(buf);
    return out;
}

static int
Tracker_init(TrackerObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"record_parameters", "first_seq", "template_version", "full_rows", NULL};
    int record_parameters = 1, template_version = 1;
    long long first_seq = 0;
    PyObject *full_rows = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|pLiO:Tracker", keywords, &record_parameters, &first_seq,
                                     &template_version, &full_rows))
        return -1;
    pgt_free(self->tracker);
    self->tracker = pgtpy_tracker(record_parameters, first_seq, template_version, full_rows);
    return self->tracker == NULL ? -1 : 0;
}

static void
Tracker_dealloc(TrackerObject *self)
{
    pgt_free(self->tracker);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Tracker_client_message(TrackerObject *self, PyObject *args)
{
    int type, rc;
    Py_buffer body;
    double now_wall, now_mono;
    PyObject *verdict_obj = Py_None;
    pgt_verdict *verdict;
    if (!PyArg_ParseTuple(args, "iy*dd|O:client_message", &type, &body, &now_wall, &now_mono, &verdict_obj))
        return NULL;
    if (pgtpy_verdict(verdict_obj, &verdict) < 0) {
        PyBuffer_Release(&body);
        return NULL;
    }
    rc = pgt_client_message(self->tracker, (unsigned char)type, (const unsigned char *)body.buf, (size_t)body.len,
                            now_wall, now_mono, verdict);
    pgt_verdict_unref(verdict); /* the tracker holds its own references */
    PyBuffer_Release(&body);
    if (rc == PGT_NOMEM)
        return PyErr_NoMemory();
    return PyLong_FromLong(rc);
}

static PyObject *
Tracker_client_copy_bytes(TrackerObject *self, PyObject *args)
{
    unsigned long long count;
    if (!PyArg_ParseTuple(args, "K:client_copy_bytes", &count))
        return NULL;
    pgt_client_copy_bytes(self->tracker, count);
    Py_RETURN_NONE;
}

static PyObject *
Tracker_rows(TrackerObject *self, PyObject *args)
{
    unsigned long long count;
    if (!PyArg_ParseTuple(args, "K:rows", &count))
        return NULL;
    pgt_rows(self->tracker, count);
    Py_RETURN_NONE;
}

static PyObject *
Tracker_server_bytes(TrackerObject *self, PyObject *args)
{
    unsigned long long count;
    if (!PyArg_ParseTuple(args, "K:server_bytes", &count))
        return NULL;
    pgt_server_bytes(self->tracker, count);
    Py_RETURN_NONE;
}

static PyObject *
Tracker_server_message(TrackerObject *self, PyObject *args)
{
    int type, rc;
    Py_buffer body;
    double now_mono;
    pgt_buf events = {NULL, 0, 0};
    if (!PyArg_ParseTuple(args, "iy*d:server_message", &type, &body, &now_mono))
        return NULL;
    rc = pgt_server_message(self->tracker, (unsigned char)type, (const unsigned char *)body.buf, (size_t)body.len,
                            now_mono, &events);
    PyBuffer_Release(&body);
    if (rc == PGT_NOMEM)
        return no_memory(&events);
    return result(rc, &events);
}

/* server_frames(chunk, frames, end, trailing, now_mono): frames as scan_frames' events. */
static PyObject *
Tracker_server_frames(TrackerObject *self, PyObject *args)
{
    Py_buffer chunk;
    PyObject *frames_obj, *seq;
    unsigned long long end, trailing;
    double now_mono;
    pgt_frame *frames;
    pgt_buf events = {NULL, 0, 0};
    Py_ssize_t n, i;
    int rc;
    if (!PyArg_ParseTuple(args, "y*OKKd:server_frames", &chunk, &frames_obj, &end, &trailing, &now_mono))
        return NULL;
    seq = PySequence_Fast(frames_obj, "frames must be a sequence");
    if (seq == NULL) {
        PyBuffer_Release(&chunk);
        return NULL;
    }
    n = PySequence_Fast_GET_SIZE(seq);
    frames = (pgt_frame *)PyMem_Malloc((size_t)(n ? n : 1) * sizeof *frames);
    if (frames == NULL) {
        Py_DECREF(seq);
        PyBuffer_Release(&chunk);
        return PyErr_NoMemory();
    }
    for (i = 0; i < n; i++) {
        unsigned int type, offset, size, skipped;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "IIII", &type, &offset, &size, &skipped)) {
            PyMem_Free(frames);
            Py_DECREF(seq);
            PyBuffer_Release(&chunk);
            return NULL;
        }
        frames[i].type = type;
        frames[i].offset = offset;
        frames[i].size = size;
        frames[i].skipped = skipped;
    }
    if (end > (unsigned long long)chunk.len) {
        PyErr_SetString(PyExc_ValueError, "end is beyond the chunk");
        rc = -100;
    } else {
        rc = pgt_server_frames(self->tracker, (const unsigned char *)chunk.buf, frames, (size_t)n, end, trailing,
                               now_mono, &events);
    }
    PyMem_Free(frames);
    Py_DECREF(seq);
    PyBuffer_Release(&chunk);
    if (rc == -100)
        return NULL;
    if (rc == PGT_NOMEM)
        return no_memory(&events);
    return result(rc, &events);
}

static PyObject *
Tracker_abandon(TrackerObject *self, PyObject *args)
{
    double now_mono;
    pgt_buf events = {NULL, 0, 0};
    if (!PyArg_ParseTuple(args, "d:abandon", &now_mono))
        return NULL;
    pgt_abandon(self->tracker, now_mono, &events);
    return bytes_of(&events);
}

static PyObject *
Tracker_in_flight(TrackerObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(pgt_in_flight(self->tracker));
}

static PyObject *
Tracker_counters(TrackerObject *self, PyObject *Py_UNUSED(ignored))
{
    pgt_counters c;
    pgt_get_counters(self->tracker, &c);
    if (c.statements != pgt_statements_total(self->tracker) || c.errors != pgt_statements_error(self->tracker) ||
        c.skipped != pgt_statements_skipped(self->tracker) || c.ok != pgt_statements_ok(self->tracker) ||
        c.seq != pgt_last_seq(self->tracker)) {
        PyErr_SetString(PyExc_AssertionError, "pgt_get_counters and the single accessors disagree");
        return NULL;
    }
    return Py_BuildValue("(KKKKL)", (unsigned long long)c.statements, (unsigned long long)c.errors,
                         (unsigned long long)c.skipped, (unsigned long long)c.ok, (long long)c.seq);
}

static PyObject *
Tracker_since_tag(TrackerObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLongLong(pgt_since_tag(self->tracker));
}

static PyObject *
Tracker_set_template_version(TrackerObject *self, PyObject *args)
{
    int version;
    if (!PyArg_ParseTuple(args, "i:set_template_version", &version))
        return NULL;
    pgt_set_template_version(self->tracker, version);
    Py_RETURN_NONE;
}

static PyObject *
Tracker_counts(TrackerObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(nn)", (Py_ssize_t)pgt_prepared_count(self->tracker),
                         (Py_ssize_t)pgt_portal_count(self->tracker));
}

static int
export_prepared(void *arg, const pgt_prepared_info *info)
{
    PyObject *prepared = ((PyObject **)arg)[0], *name, *types = pgtpy_param_types(info), *value;
    int rc;
    if (types == NULL)
        return -10;
    value = Py_BuildValue("(s#NN)", info->query, (Py_ssize_t)info->query_len, types,
                          pgtpy_verdict_doc(info->verdict));
    name = PyUnicode_FromStringAndSize(info->name, (Py_ssize_t)info->name_len);
    rc = value != NULL && name != NULL ? PyDict_SetItem(prepared, name, value) : -1;
    Py_XDECREF(value);
    Py_XDECREF(name);
    return rc < 0 ? -10 : 0;
}

static int
export_portal(void *arg, const pgt_portal_info *info)
{
    PyObject *portals = ((PyObject **)arg)[1], *name, *value;
    int rc;
    value = Py_BuildValue("(s#y#)", info->statement, (Py_ssize_t)info->statement_len,
                          info->bind ? (const char *)info->bind : "", (Py_ssize_t)info->bind_len);
    name = PyUnicode_FromStringAndSize(info->name, (Py_ssize_t)info->name_len);
    rc = value != NULL && name != NULL ? PyDict_SetItem(portals, name, value) : -1;
    Py_XDECREF(value);
    Py_XDECREF(name);
    return rc < 0 ? -10 : 0;
}

/* export() -> ({name: (query, param_types, verdict doc | None)}, {name: (statement, bind_body)}) */
static PyObject *
Tracker_export(TrackerObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *dicts[2];
    int rc;
    dicts[0] = PyDict_New();
    dicts[1] = PyDict_New();
    if (dicts[0] == NULL || dicts[1] == NULL) {
        Py_XDECREF(dicts[0]);
        Py_XDECREF(dicts[1]);
        return NULL;
    }
    rc = pgt_export(self->tracker, export_prepared, export_portal, dicts);
    if (rc != 0) {
        Py_DECREF(dicts[0]);
        Py_DECREF(dicts[1]);
        return rc == PGT_NOMEM ? PyErr_NoMemory() : NULL;
    }
    return Py_BuildValue("(NN)", dicts[0], dicts[1]);
}

/* export_state() -> what the relay's engine hands Python with a session (groups in flight included) */
static PyObject *
Tracker_export_state(TrackerObject *self, PyObject *Py_UNUSED(ignored))
{
    return pgtpy_export(self->tracker);
}

static PyMethodDef Tracker_methods[] = {
    {"client_message", (PyCFunction)Tracker_client_message, METH_VARARGS,
     "client_message(type, body, now_wall, now_mono, verdict=None) -> rc; verdict: tracker.verdict_fields"},
    {"client_copy_bytes", (PyCFunction)Tracker_client_copy_bytes, METH_VARARGS, "client_copy_bytes(count)"},
    {"rows", (PyCFunction)Tracker_rows, METH_VARARGS, "rows(count)"},
    {"server_bytes", (PyCFunction)Tracker_server_bytes, METH_VARARGS, "server_bytes(count)"},
    {"server_message", (PyCFunction)Tracker_server_message, METH_VARARGS,
     "server_message(type, body, now_mono) -> (rc, rows)"},
    {"server_frames", (PyCFunction)Tracker_server_frames, METH_VARARGS,
     "server_frames(chunk, frames, end, trailing, now_mono) -> (rc, rows)"},
    {"abandon", (PyCFunction)Tracker_abandon, METH_VARARGS, "abandon(now_mono) -> rows"},
    {"in_flight", (PyCFunction)Tracker_in_flight, METH_NOARGS, "in_flight() -> int"},
    {"counters", (PyCFunction)Tracker_counters, METH_NOARGS, "counters() -> (statements, errors, skipped, ok, seq)"},
    {"since_tag", (PyCFunction)Tracker_since_tag, METH_NOARGS, "since_tag() -> int"},
    {"set_template_version", (PyCFunction)Tracker_set_template_version, METH_VARARGS, "set_template_version(v)"},
    {"counts", (PyCFunction)Tracker_counts, METH_NOARGS, "counts() -> (prepared, portals)"},
    {"export", (PyCFunction)Tracker_export, METH_NOARGS, "export() -> (prepared, portals)"},
    {"export_state", (PyCFunction)Tracker_export_state, METH_NOARGS,
     "export_state() -> the state StatementTracker.restore takes"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TrackerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "data_plane.postgres._pgtrack.Tracker",
    .tp_basicsize = sizeof(TrackerObject),
    .tp_dealloc = (destructor)Tracker_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Tracker(record_parameters=True, first_seq=0, template_version=1): pgtrack.h's tracker",
    .tp_methods = Tracker_methods,
    .tp_init = (initproc)Tracker_init,
    .tp_new = PyType_GenericNew,
};

/* ---- the pieces ------------------------------------------------------------------------------ */

static PyObject *
might_hold_secret(PyObject *module, PyObject *args)
{
    Py_buffer data;
    int hint;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*:might_hold_secret", &data))
        return NULL;
    hint = pgt_might_hold_secret((const unsigned char *)data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyBool_FromLong(hint);
}

static PyObject *
json_text(PyObject *module, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t max_chars = 0;
    pgt_buf out = {NULL, 0, 0};
    int rc;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*|n:json_text", &data, &max_chars))
        return NULL;
    rc = pgt__json_text(&out, (const unsigned char *)data.buf, (size_t)data.len, (size_t)max_chars);
    PyBuffer_Release(&data);
    if (rc)
        return no_memory(&out);
    return bytes_of(&out);
}

static PyObject *
utf8_replace(PyObject *module, PyObject *args)
{
    Py_buffer data;
    pgt_buf out = {NULL, 0, 0};
    int rc;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*:utf8_replace", &data))
        return NULL;
    rc = pgt__utf8_replace(&out, (const unsigned char *)data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    if (rc)
        return no_memory(&out);
    return bytes_of(&out);
}

static PyObject *
rows_from_tag(PyObject *module, PyObject *args)
{
    Py_buffer data;
    uint64_t rows = 0;
    int found;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*:rows_from_tag", &data))
        return NULL;
    found = pgt__rows_from_tag((const unsigned char *)data.buf, (size_t)data.len, &rows);
    PyBuffer_Release(&data);
    if (!found)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(rows);
}

static PyObject *
format_duration(PyObject *module, PyObject *args)
{
    double finished, started;
    char out[64];
    size_t n;
    (void)module;
    if (!PyArg_ParseTuple(args, "dd:format_duration", &finished, &started))
        return NULL;
    n = pgt__format_duration(out, finished, started);
    return PyBytes_FromStringAndSize(out, (Py_ssize_t)n);
}

static PyObject *
format_ms(PyObject *module, PyObject *args)
{
    double x;
    char out[64];
    size_t n;
    (void)module;
    if (!PyArg_ParseTuple(args, "d:format_ms", &x))
        return NULL;
    n = pgt__format_ms(out, x);
    return PyBytes_FromStringAndSize(out, (Py_ssize_t)n);
}

/* format_double(x, orjson) -> bytes: repr(x) (orjson false) or orjson.dumps(x). */
static PyObject *
format_double(PyObject *module, PyObject *args)
{
    double x;
    int orjson;
    char out[64];
    size_t n;
    (void)module;
    if (!PyArg_ParseTuple(args, "dp:format_double", &x, &orjson))
        return NULL;
    n = pgt__format_double(out, x, orjson);
    return PyBytes_FromStringAndSize(out, (Py_ssize_t)n);
}

/* parameter(value, fmt, type_oid) -> the JSON item (b"null" for None), or None where the C port
 * punts. */
static PyObject *
parameter(PyObject *module, PyObject *args)
{
    PyObject *value;
    int fmt;
    unsigned int oid;
    Py_buffer data;
    pgt_buf out = {NULL, 0, 0};
    int rc;
    (void)module;
    if (!PyArg_ParseTuple(args, "OiI:parameter", &value, &fmt, &oid))
        return NULL;
    if (value == Py_None)
        return PyBytes_FromString("null");
    if (PyObject_GetBuffer(value, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (fmt != 0 && pgt__int_type(oid) && data.len > 8) {
        PyBuffer_Release(&data);
        Py_RETURN_NONE;
    }
    rc = pgt__render_param(&out, (const unsigned char *)data.buf, (size_t)data.len, fmt, oid);
    PyBuffer_Release(&data);
    if (rc)
        return no_memory(&out);
    return bytes_of(&out);
}

static PyMethodDef module_methods[] = {
    {"might_hold_secret", might_hold_secret, METH_VARARGS, "might_hold_secret(data) -> bool"},
    {"json_text", json_text, METH_VARARGS, "json_text(data, max_chars=0) -> bytes"},
    {"utf8_replace", utf8_replace, METH_VARARGS, "utf8_replace(data) -> bytes"},
    {"rows_from_tag", rows_from_tag, METH_VARARGS, "rows_from_tag(tag) -> int | None"},
    {"format_duration", format_duration, METH_VARARGS, "format_duration(finished, started) -> bytes"},
    {"format_ms", format_ms, METH_VARARGS, "format_ms(x) -> bytes: orjson.dumps(round(x, 3))"},
    {"format_double", format_double, METH_VARARGS, "format_double(x, orjson) -> bytes"},
    {"parameter", parameter, METH_VARARGS, "parameter(value, fmt, type_oid) -> bytes | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef pgtrack_module = {
    PyModuleDef_HEAD_INIT, "data_plane.postgres._pgtrack",
    "pgtrack.h for tests: the C statement tracker behind the relay's engine.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__pgtrack(void)
{
    PyObject *module;
    sha256_choose_block(1); /* full rows' event ids */
    if (PyType_Ready(&TrackerType) < 0)
        return NULL;
    module = PyModule_Create(&pgtrack_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&TrackerType);
    if (PyModule_AddObject(module, "Tracker", (PyObject *)&TrackerType) < 0 ||
        PyModule_AddIntConstant(module, "OK", PGT_OK) < 0 ||
        PyModule_AddIntConstant(module, "VIOLATION", PGT_VIOLATION) < 0 ||
        PyModule_AddIntConstant(module, "PUNT", PGT_PUNT) < 0 ||
        PyModule_AddIntConstant(module, "NOMEM", PGT_NOMEM) < 0 ||
        PyModule_AddIntConstant(module, "MAX_PARAMETER_CHARS", PGT_MAX_PARAMETER_CHARS) < 0) {
        Py_DECREF(&TrackerType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
