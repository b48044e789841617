/* DataRow rewriting for inline masking: the C twin of rowmask._mask_rows_py.
 *
 * mask_rows(buf, start, stop, actions) walks the complete frames in buf[start:stop]; DataRow
 * ('D') frames get each column rewritten by its action, every other frame is copied as is.
 * An action is a (kind, arg) tuple per column:
 *   0 KEEP     the value as sent
 *   1 CONST    arg: bytes that replace every non-NULL value
 *   2 NULL     every value becomes NULL
 *   3 PARTIAL  arg: int N; UTF-8 text keeps its last min(N, characters / 2) characters, the rest '*'
 *   4 CALL     arg: callable(bytes) -> bytes | None (None: NULL; the very same object: unchanged)
 *   5 HASH     arg: key bytes; "h:" + the first 32 hex digits of HMAC-SHA256(key, value)
 * Returns (new bytes or None when nothing changed, [values rewritten per column]).
 * NULL values are never rewritten. Length fields are recomputed for every rewritten frame. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { KEEP = 0, CONST = 1, MNULL = 2, PARTIAL = 3, CALL = 4, HASH = 5 };

/* ---- SHA-256 (shared with the recording's accelerator) and HMAC (RFC 2104), for the keyed hash -- */

#include "../_sha256.h"

typedef struct {
    sha256_t inner;  /* the states after the key's ipad and opad blocks: computed once per call */
    sha256_t outer;
} hmac_t;

static void
hmac_init(hmac_t *mac, const unsigned char *key, size_t key_size)
{
    unsigned char block[64], pad[64], hashed[32];
    size_t i;
    memset(block, 0, sizeof(block));
    if (key_size > 64) {
        sha256_t s;
        sha256_init(&s);
        sha256_update(&s, key, key_size);
        sha256_final(&s, hashed);
        memcpy(block, hashed, 32);
    } else if (key_size) {
        memcpy(block, key, key_size);
    }
    for (i = 0; i < 64; i++)
        pad[i] = block[i] ^ 0x36;
    sha256_init(&mac->inner);
    sha256_update(&mac->inner, pad, 64);
    for (i = 0; i < 64; i++)
        pad[i] = block[i] ^ 0x5c;
    sha256_init(&mac->outer);
    sha256_update(&mac->outer, pad, 64);
}

static void
hmac_digest(const hmac_t *mac, const unsigned char *data, size_t size, unsigned char digest[32])
{
    sha256_t s = mac->inner;
    unsigned char inner[32];
    sha256_update(&s, data, size);
    sha256_final(&s, inner);
    s = mac->outer;
    sha256_update(&s, inner, 32);
    sha256_final(&s, digest);
}

/* ---- the row walk --------------------------------------------------------------------------- */

typedef struct {
    int kind;
    const char *data;  /* CONST */
    Py_ssize_t size;
    long keep;         /* PARTIAL */
    PyObject *call;    /* CALL (borrowed) */
    hmac_t *mac;       /* HASH */
} action_t;

typedef struct {
    char *data;
    Py_ssize_t size;
    Py_ssize_t capacity;
} out_t;

static int
out_reserve(out_t *out, Py_ssize_t extra)
{
    Py_ssize_t need = out->size + extra;
    char *grown;
    if (need <= out->capacity)
        return 0;
    Py_ssize_t capacity = out->capacity ? out->capacity : 4096;
    while (capacity < need)
        capacity *= 2;
    grown = PyMem_Realloc(out->data, (size_t)capacity);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->data = grown;
    out->capacity = capacity;
    return 0;
}

static int
out_put(out_t *out, const void *data, Py_ssize_t size)
{
    if (out_reserve(out, size) < 0)
        return -1;
    memcpy(out->data + out->size, data, (size_t)size);
    out->size += size;
    return 0;
}

static void
put_int32(char *at, int32_t value)
{
    uint32_t v = (uint32_t)value;
    at[0] = (char)(v >> 24);
    at[1] = (char)(v >> 16);
    at[2] = (char)(v >> 8);
    at[3] = (char)v;
}

static int32_t
get_int32(const unsigned char *at)
{
    return (int32_t)(((uint32_t)at[0] << 24) | ((uint32_t)at[1] << 16) | ((uint32_t)at[2] << 8) | (uint32_t)at[3]);
}

static int
put_value(out_t *out, const char *data, Py_ssize_t size)
{
    char header[4];
    put_int32(header, (int32_t)size);
    if (out_put(out, header, 4) < 0)
        return -1;
    return size ? out_put(out, data, size) : 0;
}

static int
put_partial(out_t *out, const unsigned char *value, Py_ssize_t size, long keep_last)
{
    Py_ssize_t chars = 0, i, keep, tail_start, stars;
    for (i = 0; i < size; i++)
        if ((value[i] & 0xC0) != 0x80)
            chars++;
    keep = keep_last < chars / 2 ? keep_last : chars / 2;
    /* the byte where the last `keep` characters begin */
    tail_start = size;
    if (keep > 0) {
        Py_ssize_t seen = 0;
        for (i = size - 1; i >= 0; i--) {
            if ((value[i] & 0xC0) != 0x80) {
                seen++;
                if (seen == keep) {
                    tail_start = i;
                    break;
                }
            }
        }
    }
    stars = chars - keep;
    char header[4];
    put_int32(header, (int32_t)(stars + (size - tail_start)));
    if (out_put(out, header, 4) < 0 || out_reserve(out, stars) < 0)
        return -1;
    memset(out->data + out->size, '*', (size_t)stars);
    out->size += stars;
    return out_put(out, value + tail_start, size - tail_start);
}

static PyObject *
mask_rows(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, stop, ncols, pos, i;
    PyObject *actions_obj, *result = NULL, *counts = NULL;
    action_t *actions = NULL;
    long *counted = NULL;
    out_t out = {NULL, 0, 0};
    Py_ssize_t copied_to;  /* bytes of the input already in `out` */
    int changed = 0;
    (void)module;

    if (!PyArg_ParseTuple(args, "y*nnO!:mask_rows", &view, &start, &stop, &PyTuple_Type, &actions_obj))
        return NULL;
    const unsigned char *buf = (const unsigned char *)view.buf;
    if (start < 0 || stop > view.len || start > stop) {
        PyErr_SetString(PyExc_ValueError, "region outside the buffer");
        goto done;
    }
    ncols = PyTuple_GET_SIZE(actions_obj);
    actions = PyMem_Calloc((size_t)(ncols ? ncols : 1), sizeof(action_t));
    counted = PyMem_Calloc((size_t)(ncols ? ncols : 1), sizeof(long));
    if (actions == NULL || counted == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < ncols; i++) {
        PyObject *item = PyTuple_GET_ITEM(actions_obj, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "each action is a (kind, arg) tuple");
            goto done;
        }
        actions[i].kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
        PyObject *arg = PyTuple_GET_ITEM(item, 1);
        if (actions[i].kind == CONST) {
            if (!PyBytes_Check(arg)) {
                PyErr_SetString(PyExc_TypeError, "CONST needs bytes");
                goto done;
            }
            actions[i].data = PyBytes_AS_STRING(arg);
            actions[i].size = PyBytes_GET_SIZE(arg);
        } else if (actions[i].kind == PARTIAL) {
            actions[i].keep = PyLong_AsLong(arg);
        } else if (actions[i].kind == CALL) {
            actions[i].call = arg;
        } else if (actions[i].kind == HASH) {
            if (!PyBytes_Check(arg)) {
                PyErr_SetString(PyExc_TypeError, "HASH needs the key as bytes");
                goto done;
            }
            actions[i].mac = PyMem_Malloc(sizeof(hmac_t));
            if (actions[i].mac == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            hmac_init(actions[i].mac, (const unsigned char *)PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg));
        }
        if (PyErr_Occurred())
            goto done;
    }

    pos = start;
    copied_to = start;
    while (pos < stop) {
        if (stop - pos < 5) {
            PyErr_SetString(PyExc_ValueError, "incomplete frame in region");
            goto done;
        }
        int32_t length = get_int32(buf + pos + 1);
        if (length < 4 || length > stop - pos - 1) {
            PyErr_SetString(PyExc_ValueError, "invalid frame length in region");
            goto done;
        }
        Py_ssize_t frame_end = pos + 1 + length;
        if (buf[pos] != 'D') {
            pos = frame_end;
            continue;
        }
        Py_ssize_t p = pos + 5;
        if (frame_end - p < 2) {
            PyErr_SetString(PyExc_ValueError, "DataRow truncated");
            goto done;
        }
        int count = (int)(int16_t)((buf[p] << 8) | buf[p + 1]);
        if (count != ncols) {
            PyErr_SetString(PyExc_ValueError, "DataRow does not match its RowDescription");
            goto done;
        }
        /* Does this row need a rewrite at all? (only NULLs in masked columns: no) */
        Py_ssize_t scan = p + 2;
        int touches = 0;
        for (i = 0; i < ncols; i++) {
            if (frame_end - scan < 4) {
                PyErr_SetString(PyExc_ValueError, "DataRow truncated");
                goto done;
            }
            int32_t vlen = get_int32(buf + scan);
            scan += 4;
            if (vlen > 0 || vlen == 0) {
                if (vlen > frame_end - scan) {
                    PyErr_SetString(PyExc_ValueError, "DataRow value overruns its frame");
                    goto done;
                }
                if (actions[i].kind != KEEP)
                    touches = 1;
                scan += vlen;
            }
        }
        if (scan != frame_end) {
            PyErr_SetString(PyExc_ValueError, "DataRow length does not match its values");
            goto done;
        }
        if (!touches) {
            pos = frame_end;
            continue;
        }
        /* flush the untouched bytes before this frame, then rebuild the frame */
        if (out_put(&out, buf + copied_to, pos - copied_to) < 0)
            goto done;
        Py_ssize_t frame_start = out.size;
        int row_changed = 0;
        char header[7] = {'D', 0, 0, 0, 0, (char)buf[p], (char)buf[p + 1]};
        if (out_put(&out, header, 7) < 0)
            goto done;
        scan = p + 2;
        for (i = 0; i < ncols; i++) {
            int32_t vlen = get_int32(buf + scan);
            const unsigned char *value = buf + scan + 4;
            Py_ssize_t value_size = vlen > 0 ? vlen : 0;
            scan += 4 + value_size;
            action_t *action = &actions[i];
            if (vlen < 0 || action->kind == KEEP) {
                if (out_put(&out, value - 4, 4 + value_size) < 0)
                    goto done;
                continue;
            }
            if (action->kind != CALL) {
                counted[i]++;
                row_changed = 1;
            }
            if (action->kind == CONST) {
                if (put_value(&out, action->data, action->size) < 0)
                    goto done;
            } else if (action->kind == MNULL) {
                if (put_value(&out, NULL, 0) < 0)
                    goto done;
                put_int32(out.data + out.size - 4, -1);
            } else if (action->kind == PARTIAL) {
                if (put_partial(&out, value, value_size, action->keep) < 0)
                    goto done;
            } else if (action->kind == HASH) {
                static const char hex[] = "0123456789abcdef";
                unsigned char digest[32];
                char text[34] = {'h', ':'};
                int j;
                hmac_digest(action->mac, value, (size_t)value_size, digest);
                for (j = 0; j < 16; j++) {
                    text[2 + 2 * j] = hex[digest[j] >> 4];
                    text[3 + 2 * j] = hex[digest[j] & 15];
                }
                if (put_value(&out, text, 34) < 0)
                    goto done;
            } else {
                PyObject *arg = PyBytes_FromStringAndSize((const char *)value, value_size);
                if (arg == NULL)
                    goto done;
                PyObject *masked = PyObject_CallOneArg(action->call, arg);
                Py_DECREF(arg);
                if (masked == NULL)
                    goto done;
                if (masked == arg) {  /* unchanged (arg is still alive: masked holds it) */
                    Py_DECREF(masked);
                    if (out_put(&out, value - 4, 4 + value_size) < 0)
                        goto done;
                    continue;
                }
                counted[i]++;
                row_changed = 1;
                if (masked == Py_None) {
                    char nul[4];
                    put_int32(nul, -1);
                    if (out_put(&out, nul, 4) < 0) {
                        Py_DECREF(masked);
                        goto done;
                    }
                } else if (PyBytes_Check(masked)) {
                    if (put_value(&out, PyBytes_AS_STRING(masked), PyBytes_GET_SIZE(masked)) < 0) {
                        Py_DECREF(masked);
                        goto done;
                    }
                } else {
                    Py_DECREF(masked);
                    PyErr_SetString(PyExc_TypeError, "a CALL action returns bytes or None");
                    goto done;
                }
                Py_DECREF(masked);
            }
        }
        if (!row_changed) {  /* every callable left its value alone: the frame goes out as it came */
            out.size = frame_start;
            copied_to = pos;
            pos = frame_end;
            continue;
        }
        put_int32(out.data + frame_start + 1, (int32_t)(out.size - frame_start - 1));
        changed = 1;
        copied_to = frame_end;
        pos = frame_end;
    }
    counts = PyList_New(ncols);
    if (counts == NULL)
        goto done;
    for (i = 0; i < ncols; i++) {
        PyObject *n = PyLong_FromLong(counted[i]);
        if (n == NULL)
            goto done;
        PyList_SET_ITEM(counts, i, n);
    }
    if (changed) {
        if (out_put(&out, buf + copied_to, stop - copied_to) < 0)
            goto done;
        PyObject *data = PyBytes_FromStringAndSize(out.data, out.size);
        if (data == NULL)
            goto done;
        result = PyTuple_Pack(2, data, counts);
        Py_DECREF(data);
    } else {
        result = PyTuple_Pack(2, Py_None, counts);
    }
done:
    Py_XDECREF(counts);
    PyMem_Free(out.data);
    if (actions != NULL)
        for (i = 0; i < ncols; i++)
            PyMem_Free(actions[i].mac);
    PyMem_Free(actions);
    PyMem_Free(counted);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
set_sha_path(PyObject *module, PyObject *arg)
{
    (void)module;
    int want_ni = PyObject_IsTrue(arg);
    if (want_ni < 0)
        return NULL;
    return PyBool_FromLong(sha256_choose_block(want_ni));
}

static PyMethodDef methods[] = {
    {"mask_rows", mask_rows, METH_VARARGS, "Rewrite the masked columns of the DataRows in buf[start:stop]."},
    {"_set_sha_path", set_sha_path, METH_O, "Use the SHA extensions when true and available (tests compare both)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rowmask", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__rowmask(void)
{
    sha256_choose_block(1);
    return PyModule_Create(&module);
}
