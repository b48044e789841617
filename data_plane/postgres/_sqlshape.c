/* Literal-stripped statement shape: the C twin of sqlshape._statement_shape_py, whose docstring states
 * the rules. It scans the UTF-8 bytes; every byte >= 0x80 is a letter, as in PostgreSQL's scan.l, so
 * it reads a non-ASCII character exactly where the Python scan reads it. Any form the scan does not
 * handle yields None, never a guess. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "sqlshape_scan.h"

static PyObject *
statement_shape(PyObject *module, PyObject *text)
{
    char stack_buf[1024];
    const char *utf8;
    Py_ssize_t n;
    Shape shape;
    PyObject *result;
    int found;

    (void)module;
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "statement_shape() expects str, not %.100s", Py_TYPE(text)->tp_name);
        return NULL;
    }
    utf8 = PyUnicode_AsUTF8AndSize(text, &n);
    if (utf8 == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return NULL;
        PyErr_Clear(); /* a lone surrogate: not text PostgreSQL could have received */
        Py_RETURN_NONE;
    }
    if (memchr(utf8, 0, (size_t)n) != NULL)
        Py_RETURN_NONE;

    if (n > (PY_SSIZE_T_MAX - 16) / 2) {
        PyErr_NoMemory();
        return NULL;
    }
    shape.cap = 2 * n + 16;
    shape.len = 0;
    shape.space = 0;
    if (shape.cap <= (Py_ssize_t)sizeof stack_buf) {
        shape.buf = stack_buf;
    } else {
        shape.buf = PyMem_Malloc((size_t)shape.cap);
        if (shape.buf == NULL)
            return PyErr_NoMemory();
    }

    found = scan((const unsigned char *)utf8, n, &shape);
    if (found <= 0) {
        result = Py_NewRef(Py_None);
    } else if (PyUnicode_IS_ASCII(text)) {
        result = PyUnicode_New(shape.len, 127);
        if (result != NULL)
            memcpy(PyUnicode_1BYTE_DATA(result), shape.buf, (size_t)shape.len);
    } else {
        /* Tokens are copied whole, so the shape is valid UTF-8; if it were not, the slow path decides. */
        result = PyUnicode_DecodeUTF8(shape.buf, shape.len, "strict");
        if (result == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            result = Py_NewRef(Py_None);
        }
    }
    if (shape.buf != stack_buf)
        PyMem_Free(shape.buf);
    return result;
}

static PyMethodDef sqlshape_methods[] = {
    {"statement_shape", statement_shape, METH_O, "statement_shape(text) -> str | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef sqlshape_module = {
    PyModuleDef_HEAD_INIT, "data_plane.postgres._sqlshape",
    "C accelerator for data_plane.postgres.sqlshape; import that module instead.", -1, sqlshape_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__sqlshape(void)
{
    init_byte_kinds();
    return PyModule_Create(&sqlshape_module);
}
