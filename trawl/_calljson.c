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
#define ENUM_CACHE 16

typedef struct {
    const char *key; /* "\"name\":" */
    Py_ssize_t key_len;
    int kind;
    int repeated;
    int message; /* index of the nested message type (K_MESSAGE) */
    PyObject *enum_names; /* dict int -> str (K_ENUM), borrowed from the schema tuple */
    const char *enum_text[ENUM_CACHE]; /* the dict's JSON text for numbers 0..ENUM_CACHE-1 (NULL: not named) */
    Py_ssize_t enum_text_len[ENUM_CACHE];
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
    PyObject *bytes; /* when set, `data` is this bytes object's storage (the result, grown in place) */
    PyObject *array; /* when set, `data` is this bytearray's storage (the caller's, reused, grown in place) */
} buffer_t;

/* Return codes of the walkers. */
#define OK 0
#define FALLBACK 1
#define FAILED (-1)

static int grow(buffer_t *out, size_t size) {
    size_t cap = out->cap ? out->cap : 4096;
    while (cap < out->len + size) cap *= 2;
    if (out->bytes != NULL) {
        if (_PyBytes_Resize(&out->bytes, (Py_ssize_t)cap) < 0) return FAILED; /* frees and clears it on failure */
        out->data = PyBytes_AS_STRING(out->bytes);
        out->cap = cap;
        return OK;
    }
    if (out->array != NULL) {
        if (PyByteArray_Resize(out->array, (Py_ssize_t)cap) < 0) return FAILED; /* BufferError while exported */
        out->data = PyByteArray_AS_STRING(out->array);
        out->cap = cap;
        return OK;
    }
    char *grown = PyMem_Realloc(out->data, cap);
    if (grown == NULL) {
        PyErr_NoMemory();
        return FAILED;
    }
    out->data = grown;
    out->cap = cap;
    return OK;
}

static inline int put(buffer_t *out, const char *text, size_t size) {
    if (out->len + size > out->cap && grow(out, size)) return FAILED;
    memcpy(out->data + out->len, text, size);
    out->len += size;
    return OK;
}

static const char DIGIT_PAIRS[] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

/* Decimal digits of `value` (with a leading '-' when negative), optionally in quotes. */
static int put_decimal(buffer_t *out, uint64_t magnitude, int negative, int quoted) {
    char text[24];
    char *at = text + sizeof text;
    if (quoted) *--at = '"';
    while (magnitude >= 100) { /* two digits a division: timestamps have 19 */
        const char *pair = DIGIT_PAIRS + 2 * (magnitude % 100);
        magnitude /= 100;
        *--at = pair[1];
        *--at = pair[0];
    }
    if (magnitude >= 10) {
        *--at = DIGIT_PAIRS[2 * magnitude + 1];
        *--at = DIGIT_PAIRS[2 * magnitude];
    } else {
        *--at = (char)('0' + magnitude);
    }
    if (negative) *--at = '-';
    if (quoted) *--at = '"';
    return put(out, at, (size_t)(text + sizeof text - at));
}

static inline int put_char(buffer_t *out, char c) {
    if (out->len + 1 > out->cap && grow(out, 1)) return FAILED;
    out->data[out->len++] = c;
    return OK;
}

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

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* Whether all 8 bytes are printable ASCII other than '"' and '\\' (they go out as they are).
   Word-at-a-time tests; a false "no" only sends the bytes through the one-by-one path. */
static inline int plain_word(const unsigned char *at) {
    uint64_t word;
    memcpy(&word, at, 8);
    uint64_t control = (word - ONES * 0x20) & ~word;  /* a byte below 0x20 */
    uint64_t high = word | (word + ONES);             /* a byte of 0x7F or more */
    uint64_t quote = word ^ (ONES * '"');
    uint64_t backslash = word ^ (ONES * '\\');
    uint64_t special = ((quote - ONES) & ~quote) | ((backslash - ONES) & ~backslash);
    return ((control | high | special) & HIGHS) == 0;
}

static inline int plain_byte(unsigned char c) { return c >= ' ' && c <= '~' && c != '\\' && c != '"'; }

/* A UTF-8 string as json.encoder.encode_basestring_ascii writes it. */
static int put_string(buffer_t *out, const unsigned char *text, size_t size) {
    if (put_char(out, '"')) return FAILED;
    size_t index = 0;
    while (index < size) {
        unsigned char c = text[index];
        if (plain_byte(c)) {
            size_t start = index;
            while (index + 8 <= size && plain_word(text + index)) index += 8;
            while (index < size && plain_byte(text[index])) index++;
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
    switch (field->kind) {
    case K_BOOL:
        return value ? put(out, "true", 4) : put(out, "false", 5);
    case K_INT32: {
        int32_t number = (int32_t)(uint32_t)value;
        return put_decimal(out, number < 0 ? (uint64_t)(-(int64_t)number) : (uint64_t)number, number < 0, 0);
    }
    case K_UINT32:
        return put_decimal(out, (uint32_t)value, 0, 0);
    case K_INT64: {
        int64_t number = (int64_t)value;
        return put_decimal(out, number < 0 ? (uint64_t)0 - value : value, number < 0, 1);
    }
    case K_UINT64:
        return put_decimal(out, value, 0, 1);
    case K_ENUM: {
        int32_t number = (int32_t)(uint32_t)value;
        if (number >= 0 && number < ENUM_CACHE) {
            if (field->enum_text[number] != NULL)
                return put(out, field->enum_text[number], (size_t)field->enum_text_len[number]);
            return put_decimal(out, (uint64_t)number, 0, 0);
        }
        PyObject *key = PyLong_FromLong(number);
        if (key == NULL) return FAILED;
        PyObject *name = PyDict_GetItemWithError(field->enum_names, key);
        Py_DECREF(key);
        if (name == NULL) {
            if (PyErr_Occurred()) return FAILED;
            return put_decimal(out, number < 0 ? (uint64_t)(-(int64_t)number) : (uint64_t)number, number < 0, 0);
        }
        Py_ssize_t length;
        const char *utf8 = PyUnicode_AsUTF8AndSize(name, &length);
        if (utf8 == NULL) return FAILED;
        return put(out, utf8, (size_t)length); /* already JSON text ("NAME") */
    }
    default:
        return FALLBACK;
    }
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
            if (kind == K_ENUM) {
                for (long number = 0; number < ENUM_CACHE; number++) {
                    PyObject *value = PyLong_FromLong(number);
                    if (value == NULL) goto bad;
                    PyObject *name = PyDict_GetItemWithError(names, value);
                    Py_DECREF(value);
                    if (name == NULL) {
                        if (PyErr_Occurred()) goto bad;
                        continue;
                    }
                    if (!PyUnicode_Check(name)) goto bad;
                    field->enum_text[number] = PyUnicode_AsUTF8AndSize(name, &field->enum_text_len[number]);
                    if (field->enum_text[number] == NULL) goto bad;
                }
            }
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
    buffer_t out = {NULL, 0, 0, NULL, NULL};
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

/* For each message of `messages`, its SerializeToString() as JSON text, or fallback(message) (a
   str) where this encoder answers None; each line ends with "\n". Appends to `out`. */
static int put_lines(Encoder *self, buffer_t *out, PyObject *messages, PyObject *fallback) {
    static PyObject *serialize_name = NULL;
    if (serialize_name == NULL && (serialize_name = PyUnicode_InternFromString("SerializeToString")) == NULL)
        return FAILED;
    PyObject *sequence = PySequence_Fast(messages, "encode_lines: messages must be a sequence");
    if (sequence == NULL) return FAILED;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    PyObject **items = PySequence_Fast_ITEMS(sequence);
    if (out->len + (size_t)count * 1536 > out->cap && grow(out, (size_t)count * 1536)) goto failed;
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *serialized = PyObject_CallMethodNoArgs(items[index], serialize_name);
        if (serialized == NULL) goto failed;
        if (!PyBytes_Check(serialized)) {
            Py_DECREF(serialized);
            PyErr_SetString(PyExc_TypeError, "SerializeToString() did not return bytes");
            goto failed;
        }
        size_t line_start = out->len;
        const unsigned char *wire = (const unsigned char *)PyBytes_AS_STRING(serialized);
        int status = self->count == 0 ? FALLBACK : put_message(self, out, 0, wire, wire + PyBytes_GET_SIZE(serialized), 0);
        Py_DECREF(serialized);
        if (status == FAILED) goto failed;
        if (status == FALLBACK) {
            out->len = line_start;
            PyObject *text = PyObject_CallOneArg(fallback, items[index]);
            if (text == NULL) goto failed;
            Py_ssize_t length;
            const char *utf8 = PyUnicode_Check(text) ? PyUnicode_AsUTF8AndSize(text, &length) : NULL;
            if (utf8 == NULL) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "the fallback must return str");
                Py_DECREF(text);
                goto failed;
            }
            status = put(out, utf8, (size_t)length);
            Py_DECREF(text);
            if (status) goto failed;
        }
        if (put_char(out, '\n')) goto failed;
    }
    Py_DECREF(sequence);
    return OK;
failed:
    Py_DECREF(sequence);
    return FAILED;
}

/* encode_lines(messages, fallback, /) -> bytes: the lines, written straight into the bytes returned. */
static PyObject *Encoder_encode_lines(Encoder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode_lines(messages, fallback, /)");
        return NULL;
    }
    buffer_t out = {NULL, 0, 0, PyBytes_FromStringAndSize(NULL, 4096), NULL};
    if (out.bytes == NULL) return NULL;
    out.data = PyBytes_AS_STRING(out.bytes);
    out.cap = 4096;
    if (put_lines(self, &out, args[0], args[1])) {
        Py_XDECREF(out.bytes);
        return NULL;
    }
    if (_PyBytes_Resize(&out.bytes, (Py_ssize_t)out.len) < 0) return NULL;
    return out.bytes;
}

/* encode_lines_into(messages, fallback, buffer, /) -> int: the lines written at the start of the
   bytearray `buffer` (grown when too small, never shrunk), returning their length. A buffer kept
   across batches saves allocating, and the kernel zeroing, fresh pages for every batch. */
static PyObject *Encoder_encode_lines_into(Encoder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyByteArray_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "encode_lines_into(messages, fallback, buffer: bytearray, /)");
        return NULL;
    }
    buffer_t out = {PyByteArray_AS_STRING(args[2]), 0, (size_t)PyByteArray_GET_SIZE(args[2]), NULL, args[2]};
    if (put_lines(self, &out, args[0], args[1])) return NULL;
    return PyLong_FromSize_t(out.len);
}

static PyMethodDef Encoder_methods[] = {
    {"encode_lines", (PyCFunction)(void (*)(void))Encoder_encode_lines, METH_FASTCALL,
     "encode_lines(messages, fallback, /) -> bytes: one JSON line per message; fallback(message) -> str "
     "where the schema does not cover it."},
    {"encode_lines_into", (PyCFunction)(void (*)(void))Encoder_encode_lines_into, METH_FASTCALL,
     "encode_lines_into(messages, fallback, buffer, /) -> int: encode_lines written at the start of the "
     "bytearray buffer (grown as needed); returns their length."},
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
