/* pgtrack.h's tracker as Python sees it, for the two extensions that include the header (the relay's
 * engine, and _pgtrack for the tests): verdicts made of what tracker.verdict_fields returns, and the
 * tracker's whole state (groups in flight included) as tracker.StatementTracker.restore takes it,
 * strings as pgtrack.h keeps them (JSON-escaped, which Python decodes). Include after Python.h and
 * pgtrack.h; call with the GIL held. */
#ifndef PROCTOR_PGTRACK_PY_H
#define PROCTOR_PGTRACK_PY_H

/* None, or the (row, details, doc) bytes of tracker.verdict_fields: *out is NULL or a new verdict.
 * 0, or -1 with an exception set. */
static inline int
pgtpy_verdict(PyObject *obj, pgt_verdict **out)
{
    PyObject *row, *details, *doc;
    *out = NULL;
    if (obj == Py_None)
        return 0;
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 3 || !PyBytes_Check(row = PyTuple_GET_ITEM(obj, 0)) ||
        !PyBytes_Check(details = PyTuple_GET_ITEM(obj, 1)) || !PyBytes_Check(doc = PyTuple_GET_ITEM(obj, 2))) {
        PyErr_SetString(PyExc_TypeError, "verdict: None or (row, details, doc) bytes from tracker.verdict_fields");
        return -1;
    }
    *out = pgt_verdict_new(PyBytes_AS_STRING(row), (size_t)PyBytes_GET_SIZE(row), PyBytes_AS_STRING(details),
                           (size_t)PyBytes_GET_SIZE(details), PyBytes_AS_STRING(doc), (size_t)PyBytes_GET_SIZE(doc));
    if (*out == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* None, or the (session_id, absent) of tracker.full_row_parts (bytes, 5 bytes): *out is
 * NULL or a new pgt_full. 0, or -1 with an exception set. */
static inline int
pgtpy_full(PyObject *obj, pgt_full **out)
{
    PyObject *sid, *absent;
    const char *parts[PGT_OPTIONAL_MEMBERS];
    size_t lens[PGT_OPTIONAL_MEMBERS];
    int i;
    *out = NULL;
    if (obj == Py_None)
        return 0;
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 2 || !PyBytes_Check(sid = PyTuple_GET_ITEM(obj, 0)) ||
        !PyTuple_Check(absent = PyTuple_GET_ITEM(obj, 1)) ||
        PyTuple_GET_SIZE(absent) != PGT_OPTIONAL_MEMBERS)
        goto bad;
    for (i = 0; i < PGT_OPTIONAL_MEMBERS; i++) {
        PyObject *part = PyTuple_GET_ITEM(absent, i);
        if (!PyBytes_Check(part))
            goto bad;
        parts[i] = PyBytes_AS_STRING(part);
        lens[i] = (size_t)PyBytes_GET_SIZE(part);
    }
    *out = pgt_full_new(PyBytes_AS_STRING(sid), (size_t)PyBytes_GET_SIZE(sid), parts, lens);
    if (*out == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
bad:
    PyErr_SetString(PyExc_TypeError, "full rows: None or (session_id, absent) from tracker.full_row_parts");
    return -1;
}

/* pgt_new, writing full rows with `full_rows` (tracker.full_row_parts; None: compact rows); NULL
 * with an exception set. */
static inline pgt_tracker *
pgtpy_tracker(int record_parameters, int64_t first_seq, int template_version, PyObject *full_rows)
{
    pgt_full *full;
    pgt_tracker *t;
    if (pgtpy_full(full_rows, &full) < 0)
        return NULL;
    t = pgt_new(record_parameters, first_seq, template_version);
    if (t == NULL) {
        pgt_full_free(full);
        PyErr_NoMemory();
        return NULL;
    }
    pgt_set_full(t, full);
    return t;
}

/* The verdict's doc (bytes), or None. */
static inline PyObject *
pgtpy_verdict_doc(const pgt_verdict *v)
{
    if (v == NULL)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(v->doc, (Py_ssize_t)v->doc_len);
}

static inline PyObject *
pgtpy__span_bytes(const pgt__group *g, pgt__span sp)
{
    if (sp.off == PGT__NONE)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(g->arena.data + sp.off, (Py_ssize_t)sp.len);
}

/* A prepared statement's parameter type OIDs, as a tuple (new reference), or NULL with an exception set. */
static inline PyObject *
pgtpy_param_types(const pgt_prepared_info *info)
{
    PyObject *types = PyTuple_New((Py_ssize_t)info->nparam_types);
    size_t i;
    if (types == NULL)
        return NULL;
    for (i = 0; i < info->nparam_types; i++) {
        PyObject *oid = PyLong_FromUnsignedLong(info->param_types[i]);
        if (oid == NULL) {
            Py_DECREF(types);
            return NULL;
        }
        PyTuple_SET_ITEM(types, (Py_ssize_t)i, oid);
    }
    return types;
}

static inline int
pgtpy__export_prepared(void *arg, const pgt_prepared_info *info)
{
    PyObject *types = pgtpy_param_types(info), *item;
    if (types == NULL)
        return -1;
    item = Py_BuildValue("(s#s#NN)", info->name, (Py_ssize_t)info->name_len, info->query,
                         (Py_ssize_t)info->query_len, types, pgtpy_verdict_doc(info->verdict));
    if (item == NULL || PyList_Append((PyObject *)arg, item) < 0) {
        Py_XDECREF(item);
        return -1;
    }
    Py_DECREF(item);
    return 0;
}

static inline int
pgtpy__export_portal(void *arg, const pgt_portal_info *info)
{
    PyObject *item = Py_BuildValue("(s#s#y#)", info->name, (Py_ssize_t)info->name_len, info->statement,
                                   (Py_ssize_t)info->statement_len, (const char *)info->bind,
                                   (Py_ssize_t)info->bind_len);
    if (item == NULL || PyList_Append((PyObject *)arg, item) < 0) {
        Py_XDECREF(item);
        return -1;
    }
    Py_DECREF(item);
    return 0;
}

static inline PyObject *
pgtpy__export_group(const pgt__group *g)
{
    PyObject *statements = PyList_New(0), *described = PyList_New(0), *doc;
    size_t i;
    if (statements == NULL || described == NULL)
        goto error;
    for (i = 0; i < g->n; i++) {
        const pgt__stmt *st = &g->stmts[i];
        PyObject *item = Py_BuildValue(
            "{s:N,s:d,s:d,s:N,s:K,s:K,s:N,s:N,s:N,s:N,s:O,s:s,s:N}", "text", pgtpy__span_bytes(g, st->text),
            "started", st->started, "started_mono", st->started_mono, "finished_mono",
            st->finished ? PyFloat_FromDouble(st->finished_mono) : Py_NewRef(Py_None), "rows",
            (unsigned long long)st->rows, "bytes", (unsigned long long)st->bytes, "command_tag",
            pgtpy__span_bytes(g, st->tag), "parameters", pgtpy__span_bytes(g, st->params), "sqlstate",
            pgtpy__span_bytes(g, st->sqlstate), "error", pgtpy__span_bytes(g, st->error), "skipped",
            st->skipped ? Py_True : Py_False, "kind", st->parse_kind ? "parse" : "query", "verdict",
            pgtpy_verdict_doc(st->verdict));
        if (item == NULL || PyList_Append(statements, item) < 0) {
            Py_XDECREF(item);
            goto error;
        }
        Py_DECREF(item);
    }
    for (i = 0; i < g->described_n; i++) {
        pgt__span sp = g->described[g->described_first + i];
        PyObject *name = PyUnicode_DecodeUTF8(g->arena.data + sp.off, (Py_ssize_t)sp.len, "replace");
        if (name == NULL || PyList_Append(described, name) < 0) {
            Py_XDECREF(name);
            goto error;
        }
        Py_DECREF(name);
    }
    doc = Py_BuildValue("{s:O,s:n,s:O,s:N,s:N,s:N,s:N}", "simple", g->simple ? Py_True : Py_False, "cursor",
                        (Py_ssize_t)g->cursor, "failed", g->failed ? Py_True : Py_False, "parse_text",
                        pgtpy__span_bytes(g, g->parse_text), "parse_verdict", pgtpy_verdict_doc(g->parse_verdict),
                        "described", described, "statements", statements);
    return doc;
error:
    Py_XDECREF(statements);
    Py_XDECREF(described);
    return NULL;
}

/* The state StatementTracker.restore carries on from: prepared statements (name, query, param_types,
 * verdict doc), portals (name, statement, Bind body), the groups in flight, the open group, where
 * COPY bytes go, the rows since the last tag. */
static inline PyObject *
pgtpy_export(pgt_tracker *t)
{
    PyObject *prepared = PyList_New(0), *portals = PyList_New(0), *groups = PyList_New(0), *open, *copy;
    size_t k;
    if (prepared == NULL || portals == NULL || groups == NULL)
        goto error;
    /* pgt_export passes one argument to both callbacks: once per list */
    if (pgt_export(t, pgtpy__export_prepared, NULL, prepared) != 0 ||
        pgt_export(t, NULL, pgtpy__export_portal, portals) != 0)
        goto error;
    for (k = 0; k < t->size; k++) {
        PyObject *group = pgtpy__export_group(pgt__group_at(t, t->head_seq + k));
        if (group == NULL || PyList_Append(groups, group) < 0) {
            Py_XDECREF(group);
            goto error;
        }
        Py_DECREF(group);
    }
    open = t->open_state == PGT__IN_FIFO ? PyLong_FromUnsignedLongLong(t->open_seq - t->head_seq)
           : t->open_state == PGT__DETACHED ? PyUnicode_FromString("detached")
                                            : Py_NewRef(Py_None);
    copy = t->copy_state == PGT__IN_FIFO ? Py_BuildValue("(Kn)", (unsigned long long)(t->copy_seq - t->head_seq),
                                                         (Py_ssize_t)t->copy_index)
           : t->copy_state == PGT__DETACHED ? PyUnicode_FromString("detached")
                                            : Py_NewRef(Py_None);
    return Py_BuildValue("{s:N,s:N,s:N,s:N,s:N,s:K}", "prepared", prepared, "portals", portals, "groups", groups,
                         "open", open, "copy", copy, "since_tag", (unsigned long long)t->since_tag);
error:
    Py_XDECREF(prepared);
    Py_XDECREF(portals);
    Py_XDECREF(groups);
    if (!PyErr_Occurred())
        PyErr_NoMemory();
    return NULL;
}

#endif /* PROCTOR_PGTRACK_PY_H */
