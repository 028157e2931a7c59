/*
 * Record boundaries in a buffer read from a little-endian classic pcap file.
 *
 * Why C: the body of such a file already is a sequence of PacketBatch records (16-byte
 * little-endian header + bytes), so replay only has to find where a batch ends. A Python
 * loop with struct.unpack_from costs about 0.4 us a record, more than the budget of the whole
 * file-reading stage; this walks the headers at a few nanoseconds a record.
 *
 * walk(buffer, start, max_packets, max_bytes) -> (count, end, last)
 *   Walks whole records from `start` and stops before the record that would make the batch
 *   reach max_packets records, after the record that makes it reach max_bytes (the batching
 *   rule of trawl.collector.batching.ShardBatcher), before a record claiming more than
 *   MAX_RECORD bytes, and before a record that does not fit whole in the buffer.
 *   count: whole records walked; end: offset after the last of them; last: offset of the
 *   last one (start when count is 0). The caller reads why it stopped from what is at `end`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define RECORD_HEADER_LEN 16
#define MAX_RECORD (256u * 1024u * 1024u)

static uint32_t le32(const unsigned char *at) {
    return (uint32_t)at[0] | ((uint32_t)at[1] << 8) | ((uint32_t)at[2] << 16) | ((uint32_t)at[3] << 24);
}

static PyObject *walk(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "walk(buffer, start, max_packets, max_bytes, /)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    Py_ssize_t max_packets = PyLong_AsSsize_t(args[2]);
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    if (start < 0 || start > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "start is outside the buffer");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)view.buf;
    size_t size = (size_t)view.len;
    size_t end = (size_t)start;
    size_t last = (size_t)start;
    Py_ssize_t count = 0;
    while (count < max_packets && (Py_ssize_t)(end - (size_t)start) < max_bytes) {
        if (size - end < RECORD_HEADER_LEN) break;
        uint32_t incl = le32(data + end + 8);
        if (incl > MAX_RECORD || size - end - RECORD_HEADER_LEN < incl) break;
        last = end;
        end += RECORD_HEADER_LEN + incl;
        count++;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("nnn", count, (Py_ssize_t)end, (Py_ssize_t)last);
}

static PyMethodDef methods[] = {
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL,
     "walk(buffer, start, max_packets, max_bytes, /) -> (count, end, last): whole pcap records of one batch."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "trawl.collector._pcapfile",
    .m_doc = "Record boundaries of little-endian classic pcap files (see services/collector/replay.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__pcapfile(void) {
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) return NULL;
    if (PyModule_AddIntConstant(mod, "MAX_RECORD", MAX_RECORD) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
