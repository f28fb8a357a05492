/* Optional accelerator for selectws.protocol.frames: WebSocket masking (RFC 6455 section 5.3) in C.
 *
 * Built by setup.py as an optional extension: without a compiler the install still succeeds and
 * selectws.protocol.frames keeps its pure-Python functions, which have the same names and meaning:
 *
 *   apply_mask(data, mask) -> bytes        data XOR the repeating 4-byte mask, as a new bytes object
 *   mask_inplace(buf, mask) -> None        the same, in place, on a writable buffer (bytearray, memoryview)
 *   mask_into(dst, offset, src, mask)      dst[offset:offset + len(src)] = src XOR mask, without a copy of src
 *   BytesPayload(length, mask=None)        a payload arriving in pieces, unmasked straight into its bytes object:
 *       .feed(data) -> int, .missing, .take() -> bytes
 *
 * mask[0] always applies to the first byte given; a caller working on the middle of a payload passes the mask
 * rotated by its offset. Any buffer is accepted (bytes, bytearray, memoryview, contiguous or not: a
 * non-contiguous one is read through a contiguous copy made by the buffer protocol's exporter).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* out[i] = in[i] ^ mask[i % 4] for i < n; in and out may be the same pointer (never partly overlapping). */
static void
xor_mask(char *out, const char *in, Py_ssize_t n, const unsigned char mask[4])
{
    Py_ssize_t i = 0;
    uint32_t m32;
    uint64_t m64;
    memcpy(&m32, mask, 4);
    m64 = ((uint64_t)m32 << 32) | m32;
#if defined(__SSE2__)
    {
        __m128i m128 = _mm_set1_epi32((int)m32);
        for (; i + 64 <= n; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(in + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(in + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(in + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(in + i + 48));
            _mm_storeu_si128((__m128i *)(out + i), _mm_xor_si128(a, m128));
            _mm_storeu_si128((__m128i *)(out + i + 16), _mm_xor_si128(b, m128));
            _mm_storeu_si128((__m128i *)(out + i + 32), _mm_xor_si128(c, m128));
            _mm_storeu_si128((__m128i *)(out + i + 48), _mm_xor_si128(d, m128));
        }
        for (; i + 16 <= n; i += 16) {
            __m128i a = _mm_loadu_si128((const __m128i *)(in + i));
            _mm_storeu_si128((__m128i *)(out + i), _mm_xor_si128(a, m128));
        }
    }
#endif
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, in + i, 8);
        w ^= m64;
        memcpy(out + i, &w, 8);
    }
    for (; i < n; i++) {
        out[i] = (char)(in[i] ^ mask[i & 3]);
    }
}

/* The 4-byte mask from any buffer; -1 with an exception set otherwise. */
static int
get_mask(PyObject *obj, unsigned char mask[4])
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    if (view.len != 4) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "mask must be 4 bytes");
        return -1;
    }
    memcpy(mask, view.buf, 4);
    PyBuffer_Release(&view);
    return 0;
}

/* A contiguous read-only view of obj; a strided memoryview is copied into a contiguous bytes object (*tmp). */
static int
get_input(PyObject *obj, Py_buffer *view, PyObject **tmp)
{
    *tmp = NULL;
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) == 0) {
        return 0;
    }
    if (!PyMemoryView_Check(obj)) {
        return -1;
    }
    PyErr_Clear();
    *tmp = PyBytes_FromObject(obj); /* a non-contiguous memoryview: its bytes, in logical order */
    if (*tmp == NULL) {
        return -1;
    }
    if (PyObject_GetBuffer(*tmp, view, PyBUF_SIMPLE) < 0) {
        Py_CLEAR(*tmp);
        return -1;
    }
    return 0;
}

static void
release_input(Py_buffer *view, PyObject *tmp)
{
    PyBuffer_Release(view);
    Py_XDECREF(tmp);
}

PyDoc_STRVAR(apply_mask_doc,
"apply_mask(data, mask, /) -> bytes\n\n"
"``data`` XOR the repeating 4-byte ``mask`` (RFC 6455 section 5.3), as a new bytes object.");

static PyObject *
apply_mask(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned char mask[4];
    Py_buffer in;
    PyObject *tmp, *result;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "apply_mask() takes exactly 2 arguments (data, mask)");
        return NULL;
    }
    if (get_mask(args[1], mask) < 0 || get_input(args[0], &in, &tmp) < 0) {
        return NULL;
    }
    result = PyBytes_FromStringAndSize(NULL, in.len);
    if (result != NULL && in.len > 0) {
        const char *src = in.buf;
        char *dst = PyBytes_AS_STRING(result);
        if (in.len >= 65536) {
            Py_BEGIN_ALLOW_THREADS
            xor_mask(dst, src, in.len, mask);
            Py_END_ALLOW_THREADS
        } else {
            xor_mask(dst, src, in.len, mask);
        }
    }
    release_input(&in, tmp);
    return result;
}

PyDoc_STRVAR(mask_inplace_doc,
"mask_inplace(buf, mask, /) -> None\n\n"
"XOR the writable buffer ``buf`` (bytearray, writable memoryview) with the repeating 4-byte ``mask``, in place.");

static PyObject *
mask_inplace(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned char mask[4];
    Py_buffer buf;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "mask_inplace() takes exactly 2 arguments (buf, mask)");
        return NULL;
    }
    if (get_mask(args[1], mask) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_WRITABLE) < 0) {
        return NULL; /* read-only, or a non-contiguous view: the caller must pass a contiguous writable buffer */
    }
    if (buf.len >= 65536) {
        Py_BEGIN_ALLOW_THREADS
        xor_mask(buf.buf, buf.buf, buf.len, mask);
        Py_END_ALLOW_THREADS
    } else {
        xor_mask(buf.buf, buf.buf, buf.len, mask);
    }
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(mask_into_doc,
"mask_into(dst, offset, src, mask, /) -> None\n\n"
"``dst[offset:offset + len(src)] = src`` XOR the repeating 4-byte ``mask`` (mask[0] applies to src[0]):\n"
"unmasks a piece of a payload straight into its place in a reassembly buffer. ``dst`` must be writable and\n"
"long enough; ``src`` must not overlap ``dst``.");

static PyObject *
mask_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned char mask[4];
    Py_buffer dst, src;
    PyObject *tmp;
    Py_ssize_t offset;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "mask_into() takes exactly 4 arguments (dst, offset, src, mask)");
        return NULL;
    }
    offset = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (get_mask(args[3], mask) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &dst, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    if (get_input(args[2], &src, &tmp) < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    if (offset < 0 || offset > dst.len || src.len > dst.len - offset) {
        PyErr_Format(PyExc_ValueError, "mask_into: %zd bytes at offset %zd do not fit a buffer of %zd",
                     src.len, offset, dst.len);
        release_input(&src, tmp);
        PyBuffer_Release(&dst);
        return NULL;
    }
    if (src.len >= 65536) {
        Py_BEGIN_ALLOW_THREADS
        xor_mask((char *)dst.buf + offset, src.buf, src.len, mask);
        Py_END_ALLOW_THREADS
    } else {
        xor_mask((char *)dst.buf + offset, src.buf, src.len, mask);
    }
    release_input(&src, tmp);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------- BytesPayload */

/* A payload arriving in pieces (a large frame over several reads), unmasked straight into the bytes object the
 * message will carry: no zero-filled buffer first and no copy at the end. The bytes object is private to the
 * BytesPayload until take() hands it out, and is never written to after that. */
typedef struct {
    PyObject_HEAD
    PyObject *bytes; /* under construction; NULL once taken */
    Py_ssize_t length;
    Py_ssize_t filled;
    unsigned char mask[4];
    int masked;
} BytesPayload;

static int
payload_init(BytesPayload *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"length", "mask", NULL};
    Py_ssize_t length;
    PyObject *mask = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n|O:BytesPayload", kwlist, &length, &mask)) {
        return -1;
    }
    if (length < 0) {
        PyErr_SetString(PyExc_ValueError, "BytesPayload: negative length");
        return -1;
    }
    self->masked = mask != Py_None;
    if (self->masked && get_mask(mask, self->mask) < 0) {
        return -1;
    }
    Py_CLEAR(self->bytes);
    self->bytes = PyBytes_FromStringAndSize(NULL, length); /* uninitialised: every byte is written by feed() */
    if (self->bytes == NULL) {
        return -1;
    }
    self->length = length;
    self->filled = 0;
    return 0;
}

static void
payload_dealloc(BytesPayload *self)
{
    Py_XDECREF(self->bytes);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(payload_feed_doc,
"feed(data, /) -> int\n\n"
"Unmask (or copy, without a mask) the start of ``data`` into the payload, as much as it still misses; returns\n"
"how many bytes of ``data`` that was.");

static PyObject *
payload_feed(BytesPayload *self, PyObject *data)
{
    Py_buffer in;
    PyObject *tmp;
    Py_ssize_t n;
    char *dst;
    if (self->bytes == NULL) {
        PyErr_SetString(PyExc_ValueError, "BytesPayload: already taken");
        return NULL;
    }
    if (get_input(data, &in, &tmp) < 0) {
        return NULL;
    }
    n = self->length - self->filled;
    if (in.len < n) {
        n = in.len;
    }
    dst = PyBytes_AS_STRING(self->bytes) + self->filled;
    if (self->masked) {
        unsigned char rotated[4];
        int k;
        for (k = 0; k < 4; k++) {
            rotated[k] = self->mask[(self->filled + k) & 3]; /* the mask's phase at this offset */
        }
        /* The GIL stays held: take() from another thread must never see the bytes object half written. */
        xor_mask(dst, in.buf, n, rotated);
    } else if (n > 0) {
        memcpy(dst, in.buf, (size_t)n);
    }
    self->filled += n;
    release_input(&in, tmp);
    return PyLong_FromSsize_t(n);
}

PyDoc_STRVAR(payload_take_doc,
"take() -> bytes\n\n"
"The complete payload (ValueError while bytes are missing). The BytesPayload is empty afterwards.");

static PyObject *
payload_take(BytesPayload *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *result;
    if (self->bytes == NULL) {
        PyErr_SetString(PyExc_ValueError, "BytesPayload: already taken");
        return NULL;
    }
    if (self->filled < self->length) {
        PyErr_Format(PyExc_ValueError, "BytesPayload: %zd of %zd bytes still missing",
                     self->length - self->filled, self->length);
        return NULL;
    }
    result = self->bytes;
    self->bytes = NULL;
    return result;
}

static PyObject *
payload_get_missing(BytesPayload *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->length - self->filled);
}

static PyMethodDef payload_methods[] = {
    {"feed", (PyCFunction)payload_feed, METH_O, payload_feed_doc},
    {"take", (PyCFunction)payload_take, METH_NOARGS, payload_take_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef payload_getset[] = {
    {"missing", (getter)payload_get_missing, NULL, "bytes still to come", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BytesPayloadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "selectws.protocol._speedups.BytesPayload",
    .tp_basicsize = sizeof(BytesPayload),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = PyDoc_STR("BytesPayload(length, mask=None): a payload unmasked piece by piece into its bytes."),
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)payload_init,
    .tp_dealloc = (destructor)payload_dealloc,
    .tp_methods = payload_methods,
    .tp_getset = payload_getset,
};

/* ------------------------------------------------------------------------------------------------ scanning */

/* The slot offset of Message.data (a __slots__ member), learnt by set_message_type(): scan_messages() makes its
 * Message objects with the type's allocator and stores the payload in that slot, as Message(payload) would,
 * without calling the Python __init__ per message. */
static PyTypeObject *message_type = NULL;
static Py_ssize_t message_data_offset = -1;

PyDoc_STRVAR(set_message_type_doc,
"set_message_type(cls, /) -> None\n\n"
"The class scan_messages() makes its events of: a class whose only state is a ``data`` slot (``__slots__ =\n"
"('data',)``) and whose __init__ just stores its argument there.");

static PyObject *
set_message_type(PyObject *module, PyObject *cls)
{
    PyObject *descr;
    PyMemberDef *member;
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "a class is required");
        return NULL;
    }
    descr = PyDict_GetItemString(((PyTypeObject *)cls)->tp_dict, "data"); /* borrowed */
    if (descr == NULL || Py_TYPE(descr) != &PyMemberDescr_Type) {
        PyErr_SetString(PyExc_TypeError, "the class needs a 'data' slot");
        return NULL;
    }
    member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != T_OBJECT_EX) {
        PyErr_SetString(PyExc_TypeError, "'data' is not an object slot");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XSETREF(message_type, (PyTypeObject *)cls);
    message_data_offset = member->offset;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(scan_messages_doc,
"scan_messages(data, max_frame, max_message, budget, events, size=-1, /) -> int\n\n"
"The fast path of a server's receive_data(): from the start of ``data`` (its first ``size`` bytes when ``size`` is\n"
"0 or more: a reusable receive buffer and the count a read put in it), every complete, masked, unfragmented,\n"
"uncompressed text or binary frame (first byte 0x81 or 0x82) of at most ``max_frame`` and ``max_message`` payload\n"
"bytes, at most ``budget`` of them, is unmasked and appended to ``events`` as a message (text decoded from UTF-8).\n"
"It stops before anything else (a control frame, a fragment, an extension bit, an unmasked frame, a 64-bit length,\n"
"a frame over a limit or not complete yet, text that is not UTF-8) and returns how many bytes of ``data`` it left:\n"
"the caller's general parser takes those, and judges (or refuses) what stopped the scan; they end at ``size``.");

/* A size limit from a Python int; one past any buffer (an overflow) means no limit. */
static int
get_limit(PyObject *obj, Py_ssize_t *limit)
{
    *limit = PyLong_AsSsize_t(obj);
    if (*limit == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            return -1;
        }
        PyErr_Clear();
        *limit = PY_SSIZE_T_MAX;
    }
    return 0;
}

static PyObject *
scan_messages(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    PyObject *tmp, *events;
    Py_ssize_t limit, limit2, budget, pos = 0, end, count = 0;
    const unsigned char *buf;
    if (nargs != 5 && nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "scan_messages() takes 5 or 6 arguments");
        return NULL;
    }
    if (message_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "set_message_type() was not called");
        return NULL;
    }
    if (get_limit(args[1], &limit) < 0 || get_limit(args[2], &limit2) < 0) {
        return NULL;
    }
    if (limit2 < limit) {
        limit = limit2;
    }
    budget = PyLong_AsSsize_t(args[3]);
    if (budget == -1 && PyErr_Occurred()) {
        return NULL;
    }
    events = args[4];
    if (!PyList_Check(events)) {
        PyErr_SetString(PyExc_TypeError, "events must be a list");
        return NULL;
    }
    if (get_input(args[0], &view, &tmp) < 0) {
        return NULL;
    }
    buf = (const unsigned char *)view.buf;
    end = view.len;
    if (nargs == 6) {
        Py_ssize_t size = PyLong_AsSsize_t(args[5]);
        if (size == -1 && PyErr_Occurred()) {
            release_input(&view, tmp);
            return NULL;
        }
        if (size >= 0 && size < end) {
            end = size;
        }
    }
    while (end - pos >= 6 && count < budget) {
        unsigned char b0 = buf[pos], b1 = buf[pos + 1];
        Py_ssize_t length = b1 & 0x7F, start;
        PyObject *payload, *message;
        char *out;
        if ((b0 != 0x82 && b0 != 0x81) || !(b1 & 0x80)) {
            break;
        }
        if (length == 126) {
            if (end - pos < 8) {
                break;
            }
            length = ((Py_ssize_t)buf[pos + 2] << 8) | buf[pos + 3];
            start = pos + 8;
        }
        else if (length == 127) {
            break;
        }
        else {
            start = pos + 6;
        }
        if (length > limit || end - start < length) {
            break;
        }
        payload = PyBytes_FromStringAndSize(NULL, length);
        if (payload == NULL) {
            goto error;
        }
        out = PyBytes_AS_STRING(payload);
        xor_mask(out, (const char *)buf + start, length, buf + start - 4);
        if (b0 == 0x81) {
            PyObject *text = PyUnicode_DecodeUTF8(out, length, NULL);
            Py_DECREF(payload);
            if (text == NULL) {
                if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                    PyErr_Clear(); /* the general parser refuses it, with its close code */
                    break;
                }
                goto error;
            }
            payload = text;
        }
        message = message_type->tp_alloc(message_type, 0);
        if (message == NULL) {
            Py_DECREF(payload);
            goto error;
        }
        *(PyObject **)((char *)message + message_data_offset) = payload; /* the reference moves to the slot */
        if (PyList_Append(events, message) < 0) {
            Py_DECREF(message);
            goto error;
        }
        Py_DECREF(message);
        pos = start + length;
        count++;
    }
    release_input(&view, tmp);
    return PyLong_FromSsize_t(end - pos);
error:
    release_input(&view, tmp);
    return NULL;
}

/* ------------------------------------------------------------------------------------------------ module */

static PyMethodDef speedups_methods[] = {
    {"apply_mask", (PyCFunction)(void (*)(void))apply_mask, METH_FASTCALL, apply_mask_doc},
    {"mask_inplace", (PyCFunction)(void (*)(void))mask_inplace, METH_FASTCALL, mask_inplace_doc},
    {"mask_into", (PyCFunction)(void (*)(void))mask_into, METH_FASTCALL, mask_into_doc},
    {"scan_messages", (PyCFunction)(void (*)(void))scan_messages, METH_FASTCALL, scan_messages_doc},
    {"set_message_type", (PyCFunction)set_message_type, METH_O, set_message_type_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    "selectws.protocol._speedups",
    "WebSocket masking in C (optional; selectws.protocol.frames falls back to pure Python without it).",
    -1,
    speedups_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *module;
    if (PyType_Ready(&BytesPayloadType) < 0) {
        return NULL;
    }
    module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&BytesPayloadType);
    if (PyModule_AddObject(module, "BytesPayload", (PyObject *)&BytesPayloadType) < 0) {
        Py_DECREF(&BytesPayloadType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
