/* Optional compiled content scan for the inspector (CPython, Hyperscan's C library).
 *
 * Why: the Python binding of Hyperscan calls a Python function for every match. A stream that
 * repeats a content a pcre rule needs ("or " over and over) has a match every few bytes, and those
 * calls were 85 % of the inspector's time on it (about 100 Mbit/s per core): an attacker could
 * slow the inspector thirty-fold with a flood. Here the match handler is C: it files each match's
 * end under its expression in a dict of lists, which is what the inspector's pure-Python handler
 * (mproxy.core.inspector._grouper) builds, so the rest of the inspector is unchanged and the
 * Python handler stays the reference (MPROXY_NO_ACCEL=1, or no libhs at build time).
 *
 * Scanner(expressions, flags): one block-mode database of the expressions (ids 0..n-1), and its
 * scratch. scan(data, into, base=0): every match of data, its end plus base (the stream offset of
 * data's first byte) appended to into[id] (a list made on the id's first match), in the order
 * Hyperscan reports them. Not for two threads at once (one
 * scratch), as the binding's database is not either.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <hs.h>

typedef struct {
    PyObject_HEAD
    hs_database_t *db;
    hs_scratch_t *scratch;
    unsigned int n;
    PyObject **lists;     /* per id: its list in the current scan's dict (borrowed), or NULL */
    unsigned int *seen;   /* ids given a list in the current scan, to clear `lists` after it */
    unsigned int nseen;
    PyObject *into;       /* the current scan's dict */
    unsigned long long base;  /* added to each match end */
    int failed;           /* a Python error was raised inside the handler */
} Scanner;

static void
scanner_dealloc(Scanner *self)
{
    if (self->scratch)
        hs_free_scratch(self->scratch);
    if (self->db)
        hs_free_database(self->db);
    PyMem_Free(self->lists);
    PyMem_Free(self->seen);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
scanner_init(Scanner *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"expressions", "flags", NULL};
    PyObject *exprs, *flags;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:Scanner", kwlist, &exprs, &flags))
        return -1;
    if (self->db) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner already initialised");
        return -1;
    }
    /* a tuple (a copy if it was a list): the bytes its items point into stay alive and unchanged while
     * the compile runs without the GIL */
    PyObject *ex = PySequence_Tuple(exprs);
    if (!ex)
        return -1;
    PyObject *fl = PySequence_Fast(flags, "flags must be a sequence of ints");
    if (!fl) {
        Py_DECREF(ex);
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ex);
    int rc = -1;
    const char **cexprs = NULL;
    unsigned int *cflags = NULL, *ids = NULL;
    if (n < 1 || n > 0x7fffffff || PySequence_Fast_GET_SIZE(fl) != n) {
        PyErr_SetString(PyExc_ValueError, "need one or more expressions, and one flags value for each");
        goto done;
    }
    cexprs = PyMem_Calloc(n, sizeof(*cexprs));
    cflags = PyMem_Calloc(n, sizeof(*cflags));
    ids = PyMem_Calloc(n, sizeof(*ids));
    PyMem_Free(self->lists);  /* (an __init__ called again after a failed one) */
    PyMem_Free(self->seen);
    self->lists = PyMem_Calloc(n, sizeof(*self->lists));
    self->seen = PyMem_Calloc(n, sizeof(*self->seen));
    if (!cexprs || !cflags || !ids || !self->lists || !self->seen) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PySequence_Fast_GET_ITEM(ex, i);
        char *s;
        if (!PyBytes_Check(e) || PyBytes_AsStringAndSize(e, &s, NULL) < 0) {  /* (NULL: refuses an embedded NUL) */
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "expressions must be bytes");
            goto done;
        }
        unsigned long f = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(fl, i));
        if (f == (unsigned long)-1 && PyErr_Occurred())
            goto done;
        cexprs[i] = s;
        cflags[i] = (unsigned int)f;
        ids[i] = (unsigned int)i;
    }
    hs_compile_error_t *err = NULL;
    hs_error_t crc, arc = HS_SUCCESS;
    hs_database_t *db = NULL;
    hs_scratch_t *scratch = NULL;
    /* a rules reload compiles in a thread while the event loop goes on: 5,000 contents take ~0.1 s */
    Py_BEGIN_ALLOW_THREADS
    crc = hs_compile_multi(cexprs, cflags, ids, (unsigned int)n, HS_MODE_BLOCK, NULL, &db, &err);
    if (crc == HS_SUCCESS)
        arc = hs_alloc_scratch(db, &scratch);
    Py_END_ALLOW_THREADS
    if (crc != HS_SUCCESS) {
        PyErr_Format(PyExc_ValueError, "Hyperscan refused expression %d: %s", err ? err->expression : -1,
                     err && err->message ? err->message : "?");
        hs_free_compile_error(err);
        goto done;
    }
    if (arc != HS_SUCCESS) {
        hs_free_database(db);
        if (arc == HS_NOMEM)
            PyErr_NoMemory();
        else
            PyErr_Format(PyExc_RuntimeError, "hs_alloc_scratch failed (%d)", (int)arc);
        goto done;
    }
    self->db = db;
    self->scratch = scratch;
    self->n = (unsigned int)n;
    rc = 0;
done:
    PyMem_Free(cexprs);
    PyMem_Free(cflags);
    PyMem_Free(ids);
    Py_DECREF(ex);
    Py_DECREF(fl);
    return rc;
}

static int
on_match(unsigned int id, unsigned long long from, unsigned long long to, unsigned int flags, void *ctx)
{
    (void)from;
    (void)flags;
    Scanner *self = (Scanner *)ctx;
    PyObject *lst = self->lists[id];
    PyObject *end = PyLong_FromUnsignedLongLong(self->base + to);
    if (!end)
        goto fail;
    if (lst) {
        int r = PyList_Append(lst, end);
        Py_DECREF(end);
        if (r < 0)
            goto fail;
        return 0;
    }
    PyObject *key = PyLong_FromUnsignedLong(id);
    if (!key) {
        Py_DECREF(end);
        goto fail;
    }
    lst = PyDict_GetItemWithError(self->into, key);  /* borrowed: a list the caller left there */
    if (lst) {
        Py_DECREF(key);
        if (!PyList_Check(lst)) {
            Py_DECREF(end);
            PyErr_SetString(PyExc_TypeError, "scan: into[id] must be a list");
            goto fail;
        }
        int r = PyList_Append(lst, end);
        Py_DECREF(end);
        if (r < 0)
            goto fail;
    } else {
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            Py_DECREF(end);
            goto fail;
        }
        lst = PyList_New(1);
        if (!lst) {
            Py_DECREF(key);
            Py_DECREF(end);
            goto fail;
        }
        PyList_SET_ITEM(lst, 0, end);  /* steals */
        int r = PyDict_SetItem(self->into, key, lst);
        Py_DECREF(key);
        Py_DECREF(lst);  /* the dict holds it */
        if (r < 0)
            goto fail;
    }
    self->lists[id] = lst;
    self->seen[self->nseen++] = id;
    return 0;
fail:
    self->failed = 1;
    return 1;  /* stop the scan */
}

static PyObject *
scanner_scan(Scanner *self, PyObject *args)
{
    Py_buffer view;
    PyObject *into;
    unsigned long long base = 0;
    if (!PyArg_ParseTuple(args, "y*O!|K:scan", &view, &PyDict_Type, &into, &base))
        return NULL;
    if (!self->db) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_RuntimeError, "Scanner not initialised");
        return NULL;
    }
    if ((unsigned long long)view.len > 0xffffffffULL) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "scan: data longer than 4 GiB");
        return NULL;
    }
    if (self->into) {  /* a handler re-entered (cannot happen: it runs no Python code) */
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_RuntimeError, "scan: already scanning");
        return NULL;
    }
    self->into = into;
    self->base = base;
    self->failed = 0;
    self->nseen = 0;
    hs_error_t rc = hs_scan(self->db, view.buf, (unsigned int)view.len, 0, self->scratch, on_match, self);
    for (unsigned int i = 0; i < self->nseen; i++)
        self->lists[self->seen[i]] = NULL;
    self->nseen = 0;
    self->into = NULL;
    PyBuffer_Release(&view);
    if (self->failed)
        return NULL;
    if (rc != HS_SUCCESS) {
        PyErr_Format(PyExc_RuntimeError, "hs_scan failed (%d)", (int)rc);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef scanner_methods[] = {
    {"scan", (PyCFunction)scanner_scan, METH_VARARGS,
     "scan(data, into, base=0): every match of data, its end + base appended to into[expression id] (a list, "
     "made if absent)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mproxy._hsscan.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Scanner(expressions, flags): a Hyperscan block-mode database whose matches are filed in C",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)scanner_init,
    .tp_dealloc = (destructor)scanner_dealloc,
    .tp_methods = scanner_methods,
};

static struct PyModuleDef hsscan_module = {
    PyModuleDef_HEAD_INIT, "mproxy._hsscan", "Optional compiled content scan (see mproxy/_hsscan.c).", -1, NULL,
};

PyMODINIT_FUNC
PyInit__hsscan(void)
{
    if (PyType_Ready(&ScannerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&hsscan_module);
    if (!m)
        return NULL;
    Py_INCREF(&ScannerType);
    if (PyModule_AddObject(m, "Scanner", (PyObject *)&ScannerType) < 0) {
        Py_DECREF(&ScannerType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "FLAG_CASELESS", HS_FLAG_CASELESS) < 0
        || PyModule_AddIntConstant(m, "FLAG_SINGLEMATCH", HS_FLAG_SINGLEMATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
