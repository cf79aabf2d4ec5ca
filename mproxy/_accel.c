/* Optional compiled accelerator for mproxy's per-packet hot paths (CPython only).
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
 *
 * pcap_records(...): classic pcap records sliced out of a buffer into Frames (CaptureReader), the
 * same way.
 *
 * emit_data(...): the emitter's segment loop (mproxy.core.emitter.TcpEmitter.data_runs), whose
 * Python loop is likewise the reference.
 *
 * segment_checksum_state(...): whether a captured segment's TCP and IPv4 header checksums verify,
 * or were left unfilled by checksum offload (mproxy.wire.checksum, the reference).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#define NFIELDS 16
static const char *const FIELD_NAMES[NFIELDS] = {
    "ip", "ipver", "src", "dst", "tcp_off", "sport", "dport", "seq", "ack", "flags", "window",
    "hdr_len", "payload_off", "payload_len", "wire_payload_len", "ts",
};

static int slot_offsets(PyTypeObject *tp, PyObject *names, const char *const *want, int count, Py_ssize_t *offs);

static PyTypeObject *seg_type = NULL;  /* mproxy.wire.packet.TcpSegment */
static PyObject *fallback = NULL;      /* mproxy.wire.packet.parse_frame_pure */
static Py_ssize_t offsets[NFIELDS];

static PyObject *
accel_init(PyObject *self, PyObject *args)
{
    PyObject *cls, *names, *pure;
    if (!PyArg_ParseTuple(args, "O!O!O:init", &PyType_Type, &cls, &PyTuple_Type, &names, &pure))
        return NULL;
    PyTypeObject *tp = (PyTypeObject *)cls;
    Py_ssize_t offs[NFIELDS];  /* the ones in use change only when all are read */
    if (slot_offsets(tp, names, FIELD_NAMES, NFIELDS, offs) < 0)
        return NULL;
    if (!PyCallable_Check(pure)) {
        PyErr_SetString(PyExc_TypeError, "fallback is not callable");
        return NULL;
    }
    memcpy(offsets, offs, sizeof(offs));
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

/* ---------------------------------------------------------------- classic pcap records */
#define NFRAME 6
static const char *const FRAME_NAMES[NFRAME] = {"ts", "linktype", "data", "orig_len", "source", "number"};
static PyTypeObject *frame_type = NULL; /* mproxy.io.pcap.Frame */
static Py_ssize_t frame_offsets[NFRAME];

/* the offsets of cls's object slots named names[i] (exactly those, in that order) */
static int
slot_offsets(PyTypeObject *tp, PyObject *names, const char *const *want, int count, Py_ssize_t *offs)
{
    if (PyTuple_GET_SIZE(names) != count) {
        PyErr_Format(PyExc_TypeError, "%s fields changed: rebuild mproxy._accel", tp->tp_name);
        return -1;
    }
    for (int i = 0; i < count; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        if (!PyUnicode_Check(name) || PyUnicode_CompareWithASCIIString(name, want[i]) != 0) {
            PyErr_Format(PyExc_TypeError, "%s fields changed: rebuild mproxy._accel", tp->tp_name);
            return -1;
        }
        PyObject *d = PyDict_GetItemWithError(tp->tp_dict, name);
        if (d == NULL || Py_TYPE(d) != &PyMemberDescr_Type) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError, "%s.%s is not a slot", tp->tp_name, want[i]);
            return -1;
        }
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != T_OBJECT_EX || m->offset < (Py_ssize_t)sizeof(PyObject) ||
            m->offset + (Py_ssize_t)sizeof(PyObject *) > tp->tp_basicsize) {
            PyErr_Format(PyExc_TypeError, "%s.%s is not an object slot", tp->tp_name, want[i]);
            return -1;
        }
        offs[i] = m->offset;
    }
    return 0;
}

static PyObject *
accel_init_frame(PyObject *self, PyObject *args)
{
    PyObject *cls, *names;
    if (!PyArg_ParseTuple(args, "O!O!:init_frame", &PyType_Type, &cls, &PyTuple_Type, &names))
        return NULL;
    Py_ssize_t offs[NFRAME];
    if (slot_offsets((PyTypeObject *)cls, names, FRAME_NAMES, NFRAME, offs) < 0)
        return NULL;
    memcpy(frame_offsets, offs, sizeof(offs));
    Py_INCREF(cls);
    Py_XSETREF(frame_type, (PyTypeObject *)cls);
    Py_RETURN_NONE;
}

static inline unsigned long
rd32(const unsigned char *p, int little)
{
    return little ? ((unsigned long)p[3] << 24) | ((unsigned long)p[2] << 16) | ((unsigned long)p[1] << 8) | p[0]
                  : be32(p);
}

/* pcap_records(buf, start, little, div, linktype, source, max_frame) -> (frames, end, claim)
 *
 * The Frames of the classic pcap records lying whole in buf from offset start, as
 * CaptureReader._pcap makes them one by one; end: the offset after the last of them. It stops at
 * a record that is not whole yet (claim 0: read more) or that claims more than max_frame bytes
 * (claim: that length, at offset end; damage). */
static PyObject *
accel_pcap_records(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t start, max_frame;
    int little;
    double div;
    PyObject *linktype, *source;
    if (!PyArg_ParseTuple(args, "y*npdOOn:pcap_records", &buf, &start, &little, &div, &linktype, &source, &max_frame))
        return NULL;
    PyObject *frames = NULL, *zero = NULL;
    if (frame_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "mproxy._accel.init_frame() was not called");
        goto done;
    }
    if (start < 0 || start > buf.len || div <= 0) {
        PyErr_SetString(PyExc_ValueError, "pcap_records: bad start or divisor");
        goto done;
    }
    frames = PyList_New(0);
    zero = PyLong_FromLong(0);
    if (frames == NULL || zero == NULL)
        goto fail;
    const unsigned char *b = (const unsigned char *)buf.buf;
    Py_ssize_t i = start;
    unsigned long claim = 0;
    while (buf.len - i >= 16) {
        unsigned long sec = rd32(b + i, little), frac = rd32(b + i + 4, little);
        unsigned long incl = rd32(b + i + 8, little), orig = rd32(b + i + 12, little);
        if (incl > (unsigned long)max_frame) {
            claim = incl;
            break;
        }
        if (buf.len - i - 16 < (Py_ssize_t)incl)
            break;
        PyObject *vals[NFRAME];
        vals[0] = PyFloat_FromDouble((double)sec + (double)frac / div);
        vals[1] = Py_NewRef(linktype);
        vals[2] = PyBytes_FromStringAndSize((const char *)b + i + 16, (Py_ssize_t)incl);
        vals[3] = PyLong_FromUnsignedLong(orig);
        vals[4] = Py_NewRef(source);
        vals[5] = Py_NewRef(zero);
        PyObject *fr = NULL;
        if (vals[0] && vals[2] && vals[3])
            fr = frame_type->tp_alloc(frame_type, 0);
        if (fr == NULL) {
            for (int k = 0; k < NFRAME; k++)
                Py_XDECREF(vals[k]);
            goto fail;
        }
        for (int k = 0; k < NFRAME; k++)
            *(PyObject **)((char *)fr + frame_offsets[k]) = vals[k];
        int err = PyList_Append(frames, fr);
        Py_DECREF(fr);
        if (err < 0)
            goto fail;
        i += 16 + (Py_ssize_t)incl;
    }
    PyObject *res = Py_BuildValue("(Onk)", frames, i, claim);
    Py_DECREF(frames);
    Py_DECREF(zero);
    PyBuffer_Release(&buf);
    return res;
fail:
    Py_XDECREF(frames);
    frames = NULL;
done:
    Py_XDECREF(zero);
    PyBuffer_Release(&buf);
    return NULL;
}

/* ---------------------------------------------------------------- the emitter */
static inline void
put16(unsigned char *p, unsigned v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static inline void
put32(unsigned char *p, unsigned long v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* the ones' complement checksum of x (a sum mod 0xFFFF), as the emitter's -x % 0xFFFF */
static inline unsigned
fold(unsigned long long x)
{
    return (unsigned)((0xFFFF - x % 0xFFFF) % 0xFFFF);
}

/* emit_data(sbuf, rbuf, stoff, rtoff, v4, sipc, ripc, sconst, rconst, mss, sid, rid, seq, ack,
 *           payload, ts, out) -> (sid, rid, seq)
 *
 * The segment loop of TcpEmitter.data_runs for one payload: each segment of at most mss bytes
 * (PSH on the last) from the sender's header template sbuf, then the receiver's pure ACK from
 * rbuf, appended to out as (ts, frame); the same bytes as the Python loop (which stays the
 * reference: MPROXY_NO_ACCEL=1). The templates are copied, not written: every frame sets all of
 * their variable fields either way. */
static PyObject *
accel_emit_data(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 17) {
        PyErr_SetString(PyExc_TypeError, "emit_data() takes 17 arguments");
        return NULL;
    }
    PyObject *sbuf = args[0], *rbuf = args[1], *ts = args[15], *out = args[16];
    if (!PyByteArray_Check(sbuf) || !PyByteArray_Check(rbuf) || !PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "emit_data(bytearray, bytearray, ..., list)");
        return NULL;
    }
    long stoff = PyLong_AsLong(args[2]), rtoff = PyLong_AsLong(args[3]);
    int v4 = PyObject_IsTrue(args[4]);
    unsigned long long sipc = PyLong_AsUnsignedLongLong(args[5]), ripc = PyLong_AsUnsignedLongLong(args[6]);
    unsigned long long sconst = PyLong_AsUnsignedLongLong(args[7]), rconst = PyLong_AsUnsignedLongLong(args[8]);
    long mss = PyLong_AsLong(args[9]), sid = PyLong_AsLong(args[10]), rid = PyLong_AsLong(args[11]);
    unsigned long long seq = PyLong_AsUnsignedLongLong(args[12]), ack = PyLong_AsUnsignedLongLong(args[13]);
    if (PyErr_Occurred())
        return NULL;
    Py_ssize_t slen = PyByteArray_GET_SIZE(sbuf), rlen = PyByteArray_GET_SIZE(rbuf);
    if (v4 < 0 || mss < 1 || sid < 0 || sid > 0xFFFF || rid < 0 || rid > 0xFFFF || seq > 0xFFFFFFFFULL ||
        ack > 0xFFFFFFFFULL || stoff < 26 || rtoff < 26 || stoff + 16 > slen || rtoff + 16 > rlen ||
        sipc > 0xFFFFFFFFULL || ripc > 0xFFFFFFFFULL || sconst > 0xFFFFFFFFULL || rconst > 0xFFFFFFFFULL) {
        PyErr_SetString(PyExc_ValueError, "emit_data: template or state out of range");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[14], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *pay = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len;
    for (Py_ssize_t off = 0; off < n; off += mss) {
        Py_ssize_t k = n - off < mss ? n - off : mss;
        unsigned flags = off >= n - mss ? 0x18 : 0x10; /* ACK|PSH on the last segment */
        unsigned long tcp_len = 20 + (unsigned long)k;
        PyObject *fr = PyBytes_FromStringAndSize(NULL, slen + k);
        if (fr == NULL)
            goto fail;
        unsigned char *f = (unsigned char *)PyBytes_AS_STRING(fr);
        memcpy(f, PyByteArray_AS_STRING(sbuf), slen);
        memcpy(f + slen, pay + off, k);
        if (v4) {
            put16(f + 16, (unsigned)(tcp_len + 20));
            put16(f + 18, (unsigned)sid);
            put16(f + 20, 0x4000);
            f[22] = 64;
            f[23] = 6;
            put16(f + 24, fold(sipc + tcp_len + 20 + (unsigned long long)sid));
            sid = (sid + 1) & 0xFFFF;
        } else {
            put16(f + 18, (unsigned)tcp_len);
        }
        unsigned long long sum = 0; /* the payload's 16-bit big-endian words, an odd last byte padded */
        const unsigned char *p = pay + off;
        Py_ssize_t i = 0;
        for (; i + 1 < k; i += 2)
            sum += ((unsigned)p[i] << 8) | p[i + 1];
        if (i < k)
            sum += (unsigned)p[i] << 8;
        unsigned long long x = sconst + tcp_len + seq + ack + 0x5000 + flags + sum % 0xFFFF;
        unsigned char *t = f + stoff;
        put32(t, (unsigned long)seq);
        put32(t + 4, (unsigned long)ack);
        t[8] = 0x50;
        t[9] = (unsigned char)flags;
        put16(t + 10, 0xFFFF);
        put16(t + 12, fold(x));
        PyObject *item = PyTuple_Pack(2, ts, fr);
        Py_DECREF(fr);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
        seq = (seq + (unsigned long long)k) & 0xFFFFFFFFULL;

        PyObject *ar = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(rbuf), rlen);
        if (ar == NULL)
            goto fail;
        unsigned char *a = (unsigned char *)PyBytes_AS_STRING(ar);
        if (v4) {
            put16(a + 16, 40);
            put16(a + 18, (unsigned)rid);
            put16(a + 20, 0x4000);
            a[22] = 64;
            a[23] = 6;
            put16(a + 24, fold(ripc + 40 + (unsigned long long)rid));
            rid = (rid + 1) & 0xFFFF;
        } else {
            put16(a + 18, 20);
        }
        x = rconst + 20 + ack + seq + 0x5000 + 0x10;
        t = a + rtoff;
        put32(t, (unsigned long)ack);
        put32(t + 4, (unsigned long)seq);
        t[8] = 0x50;
        t[9] = 0x10;
        put16(t + 10, 0xFFFF);
        put16(t + 12, fold(x));
        item = PyTuple_Pack(2, ts, ar);
        Py_DECREF(ar);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(llK)", sid, rid, seq);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

/* ---------------------------------------------------------------- checksums of captured segments */
static unsigned long long
sum16(const unsigned char *p, Py_ssize_t n)
{
    unsigned long long s = 0;
    Py_ssize_t i = 0;
    for (; i + 1 < n; i += 2)
        s += ((unsigned)p[i] << 8) | p[i + 1];
    if (i < n)
        s += (unsigned)p[i] << 8;
    return s;
}

/* segment_checksum_state(ip, tcp_off, end, ipver, quick=False) -> 0 good, 1 unfilled, 2 bad:
 * mproxy.wire.checksum.segment_checksum_state_pure, the reference. A sum of 16-bit words is
 * taken modulo 0xFFFF (2**16 == 1 mod 0xFFFF), as the pure code's big-integer sum is. */
static PyObject *
accel_segment_checksum_state(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "segment_checksum_state() takes 4 or 5 arguments");
        return NULL;
    }
    Py_ssize_t tcp_off = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]);
    long ipver = PyLong_AsLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    int quick = nargs == 5 ? PyObject_IsTrue(args[4]) : 0;
    if (quick < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)view.buf;
    long state = 2;
    if (tcp_off < 0 || end > view.len || tcp_off + 18 > end || (ipver == 4 ? tcp_off < 20 : tcp_off < 40)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "segment_checksum_state(): offsets outside the packet");
        return NULL;
    }
    unsigned long long pseudo;
    if (ipver == 4) {
        if (sum16(p, tcp_off) % 0xFFFF != 0)
            goto done;  /* the IPv4 header's checksum fails */
        pseudo = sum16(p + 12, 8);
    } else {
        pseudo = sum16(p + 8, 32);
    }
    pseudo += 6 + (unsigned long long)(end - tcp_off);
    {
        unsigned field = ((unsigned)p[tcp_off + 16] << 8) | p[tcp_off + 17];
        unsigned partial = (unsigned)(pseudo % 0xFFFF);  /* ones_sum's value: 0xFFFF for a non-zero 0 */
        if (partial == 0 && pseudo)
            partial = 0xFFFF;
        int unfilled = field == partial || field == partial % 0xFFFF;
        if (quick && unfilled)
            state = 1;
        else if ((sum16(p + tcp_off, end - tcp_off) + pseudo) % 0xFFFF == 0)
            state = 0;
        else if (unfilled)
            state = 1;
    }
done:
    PyBuffer_Release(&view);
    return PyLong_FromLong(state);
}

static PyMethodDef accel_methods[] = {
    {"init", accel_init, METH_VARARGS, "init(TcpSegment, field names, parse_frame_pure)"},
    {"parse_frame", (PyCFunction)(void (*)(void))accel_parse_frame, METH_FASTCALL,
     "parse_frame(linktype, frame, ts=0.0): mproxy.wire.packet.parse_frame, the common case compiled"},
    {"init_frame", accel_init_frame, METH_VARARGS, "init_frame(Frame, field names)"},
    {"pcap_records", accel_pcap_records, METH_VARARGS,
     "pcap_records(buf, start, little, div, linktype, source, max_frame) -> (frames, end, claim)"},
    {"segment_checksum_state", (PyCFunction)(void (*)(void))accel_segment_checksum_state, METH_FASTCALL,
     "segment_checksum_state(ip, tcp_off, end, ipver, quick=False) -> 0 good, 1 unfilled, 2 bad"},
    {"emit_data", (PyCFunction)(void (*)(void))accel_emit_data, METH_FASTCALL,
     "the segment loop of mproxy.core.emitter.TcpEmitter.data_runs for one payload"},
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
