/* Optional compiled accelerator for mproxy's per-packet hot path (CPython only).
 *
 * parse_frame(linktype, frame, ts): the common capture frame -- Linux cooked v2 / Ethernet /
 * cooked v1 / raw IP carrying IPv4 without IP options and TCP, as bytes -- parsed into a
 * TcpSegment in one step, exactly as mproxy.wire.packet.parse_frame_pure does it; every other
 * frame (and every error) is handed to parse_frame_pure itself. The pure-Python code is the
 * reference: tests hold the two side by side, and MPROXY_NO_ACCEL=1 or a failed build leaves it
 * in charge.
 *
 * The TcpSegment is made without running its dataclass __init__ (16 Python-level stores): the
 * object is allocated and its slots are filled through the offsets of the class's slot
 * descriptors, read and checked once by init().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#define NFIELDS 16
static const char *const FIELD_NAMES[NFIELDS] = {
    "ip", "ipver", "src", "dst", "tcp_off", "sport", "dport", "seq", "ack", "flags", "window",
    "hdr_len", "payload_off", "payload_len", "wire_payload_len", "ts",
};

static PyTypeObject *seg_type = NULL;  /* mproxy.wire.packet.TcpSegment */
static PyObject *fallback = NULL;      /* mproxy.wire.packet.parse_frame_pure */
static Py_ssize_t offsets[NFIELDS];

static PyObject *
accel_init(PyObject *self, PyObject *args)
{
    PyObject *cls, *names, *pure;
    if (!PyArg_ParseTuple(args, "O!O!O:init", &PyType_Type, &cls, &PyTuple_Type, &names, &pure))
        return NULL;
    if (PyTuple_GET_SIZE(names) != NFIELDS) {
        PyErr_SetString(PyExc_TypeError, "TcpSegment fields changed: rebuild mproxy._accel");
        return NULL;
    }
    PyTypeObject *tp = (PyTypeObject *)cls;
    for (int i = 0; i < NFIELDS; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        if (!PyUnicode_Check(name) || PyUnicode_CompareWithASCIIString(name, FIELD_NAMES[i]) != 0) {
            PyErr_SetString(PyExc_TypeError, "TcpSegment fields changed: rebuild mproxy._accel");
            return NULL;
        }
        /* the slot's own descriptor, from the class dict (not an inherited or shadowing attribute) */
        PyObject *d = PyDict_GetItemWithError(tp->tp_dict, name);
        if (d == NULL || Py_TYPE(d) != &PyMemberDescr_Type) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError, "TcpSegment.%s is not a slot", FIELD_NAMES[i]);
            return NULL;
        }
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != T_OBJECT_EX || m->offset < (Py_ssize_t)sizeof(PyObject) ||
            m->offset + (Py_ssize_t)sizeof(PyObject *) > tp->tp_basicsize) {
            PyErr_Format(PyExc_TypeError, "TcpSegment.%s is not an object slot", FIELD_NAMES[i]);
            return NULL;
        }
        offsets[i] = m->offset;
    }
    if (!PyCallable_Check(pure)) {
        PyErr_SetString(PyExc_TypeError, "fallback is not callable");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XSETREF(seg_type, tp);
    Py_INCREF(pure);
    Py_XSETREF(fallback, pure);
    Py_RETURN_NONE;
}

static inline unsigned
be16(const unsigned char *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

static inline unsigned long
be32(const unsigned char *p)
{
    return ((unsigned long)p[0] << 24) | ((unsigned long)p[1] << 16) | ((unsigned long)p[2] << 8) | p[3];
}

static PyObject *
call_fallback(PyObject *const *args, Py_ssize_t nargs)
{
    return PyObject_Vectorcall(fallback, args, nargs, NULL);
}

static PyObject *
accel_parse_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "parse_frame(linktype, frame, ts=0.0)");
        return NULL;
    }
    if (seg_type == NULL || fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "mproxy._accel.init() was not called");
        return NULL;
    }
    PyObject *frame = args[1];
    if (!PyLong_CheckExact(args[0]) || !PyBytes_CheckExact(frame) || (nargs == 3 && !PyFloat_CheckExact(args[2])))
        return call_fallback(args, nargs);
    int overflow = 0;
    long lt = PyLong_AsLongAndOverflow(args[0], &overflow);
    Py_ssize_t off, et;  /* IP offset, ethertype offset (-1: none) */
    switch (overflow ? -1 : lt) {
    case 276: off = 20; et = 0; break;   /* LINUX_SLL2 */
    case 1: off = 14; et = 12; break;    /* ETHERNET (a VLAN tag is not 0x0800: fallback) */
    case 113: off = 16; et = 14; break;  /* LINUX_SLL */
    case 101: case 12: case 14: case 228: case 229: off = 0; et = -1; break;  /* raw IP */
    default: return call_fallback(args, nargs);
    }
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(frame);
    Py_ssize_t n = PyBytes_GET_SIZE(frame) - off;
    if (n < 40 || b[off] != 0x45 || (et >= 0 && (b[et] != 0x08 || b[et + 1] != 0x00)))
        return call_fallback(args, nargs);
    const unsigned char *ip = b + off;
    Py_ssize_t total = be16(ip + 2), hdr_len = (ip[32] >> 4) * 4, poff = 20 + hdr_len;
    if (ip[9] != 6 || (be16(ip + 6) & 0x3FFF) || total < 20 || hdr_len < 20 || n < poff)
        return call_fallback(args, nargs);  /* not TCP, a fragment, or an error: the reference says which */
    Py_ssize_t end = total >= poff ? total : n;  /* an IP length shorter than the headers: trust the capture */
    if (n > end)
        n = end;  /* link-layer padding is not payload */

    PyObject *vals[NFIELDS] = {NULL};
    PyObject *mv = PyMemoryView_FromObject(frame);
    if (mv == NULL)
        return NULL;
    vals[0] = PySequence_GetSlice(mv, off, off + n);
    Py_DECREF(mv);
    vals[1] = PyLong_FromLong(4);
    vals[2] = PyBytes_FromStringAndSize((const char *)ip + 12, 4);
    vals[3] = PyBytes_FromStringAndSize((const char *)ip + 16, 4);
    vals[4] = PyLong_FromLong(20);
    vals[5] = PyLong_FromLong(be16(ip + 20));
    vals[6] = PyLong_FromLong(be16(ip + 22));
    vals[7] = PyLong_FromUnsignedLong(be32(ip + 24));
    vals[8] = PyLong_FromUnsignedLong(be32(ip + 28));
    vals[9] = PyLong_FromLong(ip[33]);
    vals[10] = PyLong_FromLong(be16(ip + 34));
    vals[11] = PyLong_FromSsize_t(hdr_len);
    vals[12] = PyLong_FromSsize_t(poff);
    vals[13] = PyLong_FromSsize_t(n - poff);
    vals[14] = PyLong_FromSsize_t(end - poff);
    vals[15] = nargs == 3 ? Py_NewRef(args[2]) : PyFloat_FromDouble(0.0);
    PyObject *seg = NULL;
    for (int i = 0; i < NFIELDS; i++)
        if (vals[i] == NULL)
            goto fail;
    seg = seg_type->tp_alloc(seg_type, 0);
    if (seg == NULL)
        goto fail;
    for (int i = 0; i < NFIELDS; i++)
        *(PyObject **)((char *)seg + offsets[i]) = vals[i];  /* steals: the slots were NULL */
    return seg;
fail:
    for (int i = 0; i < NFIELDS; i++)
        Py_XDECREF(vals[i]);
    return NULL;
}

static PyMethodDef accel_methods[] = {
    {"init", accel_init, METH_VARARGS, "init(TcpSegment, field names, parse_frame_pure)"},
    {"parse_frame", (PyCFunction)(void (*)(void))accel_parse_frame, METH_FASTCALL,
     "parse_frame(linktype, frame, ts=0.0): mproxy.wire.packet.parse_frame, the common case compiled"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT, "mproxy._accel", "Optional compiled hot path (see mproxy/_accel.c).", -1, accel_methods,
};

PyMODINIT_FUNC
PyInit__accel(void)
{
    return PyModule_Create(&accel_module);
}
