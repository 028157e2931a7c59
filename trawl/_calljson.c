/*
 * trawl._calljson: protobuf JSON text of a serialized message, for `trawl analyze --json`.
 *
 * Why C: json_format.MessageToDict + json.dumps cost about 60 us per ApiCall and a planned
 * Python walk of ListFields() still about 20 us, more than dissecting the call. This reads the
 * protobuf wire format of the serialized message once and writes the JSON text directly.
 *
 * What it writes is exactly what trawl.render's Python encoder (and json_format with
 * preserving_proto_field_name=True followed by json.dumps(separators=(",", ":"))) writes:
 * fields in field-number order, defaults omitted (proto3 does not serialize them), int64 kinds
 * as quoted decimals, bytes as padded base64, enums by name (the number when unknown),
 * strings escaped like json's encode_basestring_ascii. The schema (keys, kinds, nested types,
 * enum names) comes from the Python side (trawl/render.py builds it from the descriptors).
 *
 * Anything outside that schema returns None and the caller takes the Python path: an unknown
 * field, fields out of order, a map, invalid UTF-8, a wire type that does not match the kind.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum kind {
    K_STRING = 1,
    K_BYTES = 2,
    K_BOOL = 3,
    K_INT32 = 4,
    K_UINT32 = 5,
    K_INT64 = 6,
    K_UINT64 = 7,
    K_ENUM = 8,
    K_MESSAGE = 9,
};

#define MAX_FIELD_NUMBER 64
#define MAX_DEPTH 16

typedef struct {
    const char *key; /* "\"name\":" */
    Py_ssize_t key_len;
    int kind;
    int repeated;
    int message; /* index of the nested message type (K_MESSAGE) */
    PyObject *enum_names; /* dict int -> str (K_ENUM), borrowed from the schema tuple */
} field_t;

typedef struct {
    field_t fields[MAX_FIELD_NUMBER + 1]; /* by field number; kind 0 = not in the schema */
} message_t;

typedef struct {
    PyObject_HEAD
    PyObject *schema; /* kept alive: keys and enum dicts point into it */
    message_t *messages;
    Py_ssize_t count;
} Encoder;

typedef struct {
    char *data;
    size_t len;
    size_t cap;
} buffer_t;

/* Return codes of the walkers. */
#define OK 0
#define FALLBACK 1
#define FAILED (-1)

static int put(buffer_t *out, const char *text, size_t size) {
    if (out->len + size > out->cap) {
        size_t cap = out->cap ? out->cap : 1024;
        while (cap < out->len + size) cap *= 2;
        char *grown = PyMem_Realloc(out->data, cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return FAILED;
        }
        out->data = grown;
        out->cap = cap;
    }
    memcpy(out->data + out->len, text, size);
    out->len += size;
    return OK;
}

static int put_char(buffer_t *out, char c) { return put(out, &c, 1); }

static int read_varint(const unsigned char **pos, const unsigned char *end, uint64_t *value) {
    uint64_t result = 0;
    int shift = 0;
    while (*pos < end && shift < 64) {
        unsigned char byte = *(*pos)++;
        result |= (uint64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80)) {
            *value = result;
            return OK;
        }
        shift += 7;
    }
    return FALLBACK;
}

static const char HEX[] = "0123456789abcdef";

static int put_unicode_escape(buffer_t *out, uint32_t code) {
    char text[6] = {'\\', 'u', HEX[(code >> 12) & 0xF], HEX[(code >> 8) & 0xF], HEX[(code >> 4) & 0xF], HEX[code & 0xF]};
    return put(out, text, 6);
}

/* A UTF-8 string as json.encoder.encode_basestring_ascii writes it. */
static int put_string(buffer_t *out, const unsigned char *text, size_t size) {
    if (put_char(out, '"')) return FAILED;
    size_t index = 0;
    while (index < size) {
        unsigned char c = text[index];
        if (c >= ' ' && c <= '~' && c != '\\' && c != '"') {
            size_t start = index;
            while (index < size && text[index] >= ' ' && text[index] <= '~' && text[index] != '\\' && text[index] != '"')
                index++;
            if (put(out, (const char *)text + start, index - start)) return FAILED;
            continue;
        }
        uint32_t code;
        size_t extra;
        if (c < 0x80) {
            code = c;
            extra = 0;
        } else if ((c & 0xE0) == 0xC0) {
            code = c & 0x1F;
            extra = 1;
        } else if ((c & 0xF0) == 0xE0) {
            code = c & 0x0F;
            extra = 2;
        } else if ((c & 0xF8) == 0xF0) {
            code = c & 0x07;
            extra = 3;
        } else {
            return FALLBACK;
        }
        if (extra && index + extra >= size) return FALLBACK;
        for (size_t k = 1; k <= extra; k++) {
            unsigned char next = text[index + k];
            if ((next & 0xC0) != 0x80) return FALLBACK;
            code = (code << 6) | (next & 0x3F);
        }
        /* Overlong forms, surrogates and values past U+10FFFF are not valid UTF-8. */
        if ((extra == 1 && code < 0x80) || (extra == 2 && code < 0x800) || (extra == 3 && code < 0x10000) ||
            (code >= 0xD800 && code <= 0xDFFF) || code > 0x10FFFF)
            return FALLBACK;
        index += extra + 1;
        int failed;
        switch (code) {
        case '\\': failed = put(out, "\\\\", 2); break;
        case '"': failed = put(out, "\\\"", 2); break;
        case '\b': failed = put(out, "\\b", 2); break;
        case '\f': failed = put(out, "\\f", 2); break;
        case '\n': failed = put(out, "\\n", 2); break;
        case '\r': failed = put(out, "\\r", 2); break;
        case '\t': failed = put(out, "\\t", 2); break;
        default:
            if (code >= 0x10000) {
                uint32_t value = code - 0x10000;
                failed = put_unicode_escape(out, 0xD800 | ((value >> 10) & 0x3FF)) ||
                         put_unicode_escape(out, 0xDC00 | (value & 0x3FF));
            } else {
                failed = put_unicode_escape(out, code);
            }
        }
        if (failed) return FAILED;
    }
    return put_char(out, '"') ? FAILED : OK;
}

static const char BASE64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int put_base64(buffer_t *out, const unsigned char *data, size_t size) {
    if (put_char(out, '"')) return FAILED;
    size_t index = 0;
    char group[4];
    while (index + 3 <= size) {
        uint32_t bits = ((uint32_t)data[index] << 16) | ((uint32_t)data[index + 1] << 8) | data[index + 2];
        group[0] = BASE64[(bits >> 18) & 0x3F];
        group[1] = BASE64[(bits >> 12) & 0x3F];
        group[2] = BASE64[(bits >> 6) & 0x3F];
        group[3] = BASE64[bits & 0x3F];
        if (put(out, group, 4)) return FAILED;
        index += 3;
    }
    if (index < size) {
        uint32_t bits = (uint32_t)data[index] << 16;
        if (index + 1 < size) bits |= (uint32_t)data[index + 1] << 8;
        group[0] = BASE64[(bits >> 18) & 0x3F];
        group[1] = BASE64[(bits >> 12) & 0x3F];
        group[2] = index + 1 < size ? BASE64[(bits >> 6) & 0x3F] : '=';
        group[3] = '=';
        if (put(out, group, 4)) return FAILED;
    }
    return put_char(out, '"') ? FAILED : OK;
}

static int put_scalar(buffer_t *out, const field_t *field, uint64_t value) {
    char text[32];
    int size;
    switch (field->kind) {
    case K_BOOL:
        return value ? put(out, "true", 4) : put(out, "false", 5);
    case K_INT32:
        size = snprintf(text, sizeof text, "%d", (int32_t)(uint32_t)value);
        break;
    case K_UINT32:
        size = snprintf(text, sizeof text, "%u", (uint32_t)value);
        break;
    case K_INT64:
        size = snprintf(text, sizeof text, "\"%lld\"", (long long)(int64_t)value);
        break;
    case K_UINT64:
        size = snprintf(text, sizeof text, "\"%llu\"", (unsigned long long)value);
        break;
    case K_ENUM: {
        int32_t number = (int32_t)(uint32_t)value;
        PyObject *key = PyLong_FromLong(number);
        if (key == NULL) return FAILED;
        PyObject *name = PyDict_GetItemWithError(field->enum_names, key);
        Py_DECREF(key);
        if (name == NULL) {
            if (PyErr_Occurred()) return FAILED;
            size = snprintf(text, sizeof text, "%d", number);
            break;
        }
        Py_ssize_t length;
        const char *utf8 = PyUnicode_AsUTF8AndSize(name, &length);
        if (utf8 == NULL) return FAILED;
        return put(out, utf8, (size_t)length); /* already JSON text ("NAME") */
    }
    default:
        return FALLBACK;
    }
    return put(out, text, (size_t)size);
}

static int is_varint_kind(int kind) { return kind >= K_BOOL && kind <= K_ENUM; }

static int put_message(Encoder *self, buffer_t *out, Py_ssize_t type, const unsigned char *pos,
                       const unsigned char *end, int depth);

/* One value of `field` whose wire record starts at *pos (after the tag). */
static int put_value(Encoder *self, buffer_t *out, const field_t *field, int wire_type, const unsigned char **pos,
                     const unsigned char *end, int depth) {
    uint64_t value;
    if (wire_type == 0) {
        if (!is_varint_kind(field->kind) || read_varint(pos, end, &value)) return FALLBACK;
        return put_scalar(out, field, value);
    }
    if (wire_type != 2) return FALLBACK;
    if (read_varint(pos, end, &value) || value > (uint64_t)(end - *pos)) return FALLBACK;
    const unsigned char *start = *pos;
    *pos += value;
    switch (field->kind) {
    case K_STRING: return put_string(out, start, (size_t)value);
    case K_BYTES: return put_base64(out, start, (size_t)value);
    case K_MESSAGE: return put_message(self, out, field->message, start, start + value, depth + 1);
    default: break;
    }
    if (!field->repeated || !is_varint_kind(field->kind)) return FALLBACK;
    /* Packed repeated varints: the caller opened the array; values separated by commas. */
    const unsigned char *packed = start;
    int first = 1;
    while (packed < *pos) {
        uint64_t item;
        if (read_varint(&packed, *pos, &item)) return FALLBACK;
        if (!first && put_char(out, ',')) return FAILED;
        first = 0;
        int status = put_scalar(out, field, item);
        if (status) return status;
    }
    return first ? FALLBACK : OK; /* an empty packed record is not what upb writes */
}

static int put_message(Encoder *self, buffer_t *out, Py_ssize_t type, const unsigned char *pos,
                       const unsigned char *end, int depth) {
    if (depth > MAX_DEPTH || type < 0 || type >= self->count) return FALLBACK;
    const message_t *message = &self->messages[type];
    if (put_char(out, '{')) return FAILED;
    uint64_t previous = 0; /* field number of the previous record */
    int open_array = 0;
    while (pos < end) {
        uint64_t tag;
        if (read_varint(&pos, end, &tag)) return FALLBACK;
        uint64_t number = tag >> 3;
        int wire_type = (int)(tag & 7);
        if (number == 0 || number > MAX_FIELD_NUMBER) return FALLBACK;
        const field_t *field = &message->fields[number];
        if (field->kind == 0) return FALLBACK;
        if (number < previous) return FALLBACK;
        if (number == previous) {
            if (!field->repeated) return FALLBACK;
            if (put_char(out, ',')) return FAILED;
        } else {
            if (open_array && put_char(out, ']')) return FAILED;
            open_array = 0;
            if (previous && put_char(out, ',')) return FAILED;
            if (put(out, field->key, (size_t)field->key_len)) return FAILED;
            if (field->repeated) {
                if (put_char(out, '[')) return FAILED;
                open_array = 1;
            }
            previous = number;
        }
        int status = put_value(self, out, field, wire_type, &pos, end, depth);
        if (status) return status;
    }
    if (open_array && put_char(out, ']')) return FAILED;
    return put_char(out, '}') ? FAILED : OK;
}

/* Encoder(schema): schema is a tuple of message types; each a tuple of fields
   (number, key, kind, repeated, message_index, enum_names or None). */
static int Encoder_init(Encoder *self, PyObject *args, PyObject *kwargs) {
    PyObject *schema;
    static char *keywords[] = {"schema", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!", keywords, &PyTuple_Type, &schema)) return -1;
    Py_ssize_t count = PyTuple_GET_SIZE(schema);
    message_t *messages = PyMem_Calloc(count ? (size_t)count : 1, sizeof(message_t));
    if (messages == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *fields = PyTuple_GET_ITEM(schema, index);
        if (!PyTuple_Check(fields)) goto bad;
        for (Py_ssize_t item = 0; item < PyTuple_GET_SIZE(fields); item++) {
            PyObject *spec = PyTuple_GET_ITEM(fields, item);
            long number, kind, repeated, nested;
            PyObject *key, *names;
            if (!PyTuple_Check(spec) ||
                !PyArg_ParseTuple(spec, "lUlllO", &number, &key, &kind, &repeated, &nested, &names))
                goto bad;
            if (number < 1 || number > MAX_FIELD_NUMBER || kind < K_STRING || kind > K_MESSAGE) goto bad;
            if (kind == K_ENUM && !PyDict_Check(names)) goto bad;
            if (kind == K_MESSAGE && (nested < 0 || nested >= count)) goto bad;
            Py_ssize_t key_len;
            const char *key_text = PyUnicode_AsUTF8AndSize(key, &key_len);
            if (key_text == NULL) goto bad;
            field_t *field = &messages[index].fields[number];
            field->key = key_text;
            field->key_len = key_len;
            field->kind = (int)kind;
            field->repeated = repeated != 0;
            field->message = (int)nested;
            field->enum_names = kind == K_ENUM ? names : NULL;
        }
    }
    Py_XSETREF(self->schema, Py_NewRef(schema));
    PyMem_Free(self->messages);
    self->messages = messages;
    self->count = count;
    return 0;
bad:
    PyMem_Free(messages);
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "invalid schema");
    return -1;
}

static void Encoder_dealloc(Encoder *self) {
    Py_XDECREF(self->schema);
    PyMem_Free(self->messages);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Encoder_encode(Encoder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "encode(serialized: bytes, /)");
        return NULL;
    }
    if (self->count == 0) Py_RETURN_NONE;
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    buffer_t out = {NULL, 0, 0};
    int status = put_message(self, &out, 0, data, data + size, 0);
    PyObject *result;
    if (status == OK) {
        result = PyUnicode_DecodeASCII(out.data ? out.data : "", (Py_ssize_t)out.len, "strict");
    } else if (status == FALLBACK) {
        result = Py_NewRef(Py_None);
    } else {
        result = NULL;
    }
    PyMem_Free(out.data);
    return result;
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))Encoder_encode, METH_FASTCALL,
     "encode(serialized, /): JSON text of a serialized message of the schema's first type, or None."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "trawl._calljson.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Encoder(schema): protobuf JSON text from serialized messages.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "trawl._calljson",
    .m_doc = "Protobuf JSON text of serialized ApiCalls (see trawl/render.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__calljson(void) {
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) return NULL;
    if (PyModule_AddObjectRef(mod, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
