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
 * A scalar written out with its default value (zero, false, "") is left out, as a parser reads it.
 *
 * The encoder takes serialized calls (bytes) as they are, so `trawl analyze --json` prints the
 * dissector's calls without making objects of them; the same goes for the two other parts here:
 * `Splicer` (the enricher's identity fields written into serialized calls) and `route_calls`
 * (the dissector service's grouping of serialized calls per node and shard).
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

/* The value of a field whose tag was just read: a varint's value, or a length-delimited field's
   content (at *content, *value bytes long); fixed 32- and 64-bit fields are stepped over.
   FALLBACK for a group or a field running past `end`. */
static int read_field(const unsigned char **pos, const unsigned char *end, int wire_type, uint64_t *value,
                      const unsigned char **content) {
    switch (wire_type) {
    case 0:
        return read_varint(pos, end, value);
    case 1:
        if (end - *pos < 8) return FALLBACK;
        *pos += 8;
        return OK;
    case 2:
        if (read_varint(pos, end, value) || *value > (uint64_t)(end - *pos)) return FALLBACK;
        *content = *pos;
        *pos += *value;
        return OK;
    case 5:
        if (end - *pos < 4) return FALLBACK;
        *pos += 4;
        return OK;
    default:
        return FALLBACK;
    }
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
    int wrote = 0;         /* a field is written: the next one needs a comma */
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
            previous = number;
            if (!field->repeated && field->kind != K_MESSAGE && (wire_type == 0 || wire_type == 2)) {
                /* An explicit zero, false or empty string is the field's default to a parser (proto3
                   implicit presence), which json_format leaves out: so does this. upb never writes
                   one; serialized calls that did not come through it (the dissector's compiled lane)
                   may. */
                const unsigned char *after = pos;
                uint64_t value;
                if (read_varint(&after, end, &value)) return FALLBACK;
                if (value == 0 && (wire_type == 0 ? is_varint_kind(field->kind)
                                                  : field->kind == K_STRING || field->kind == K_BYTES)) {
                    pos = after;
                    continue;
                }
            }
            if (wrote && put_char(out, ',')) return FAILED;
            wrote = 1;
            if (put(out, field->key, (size_t)field->key_len)) return FAILED;
            if (field->repeated) {
                if (put_char(out, '[')) return FAILED;
                open_array = 1;
            }
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

/* For each item of `messages` (a message, or its serialization as bytes), the serialization as JSON
   text, or fallback(item) (a str) where this encoder answers None; each line ends with "\n".
   Appends to `out`. */
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
        /* A bytes item is a serialized message already (the dissector's and enricher's calls). */
        PyObject *serialized = PyBytes_CheckExact(items[index]) ? Py_NewRef(items[index])
                                                                : PyObject_CallMethodNoArgs(items[index], serialize_name);
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

/* ---------------------------------------------------------------------------------------------
 * Splicer: the enricher's identity fields written into serialized ApiCalls.
 *
 * An Endpoint serialized as ip(1), port(2) followed by the serialized fields 3.. of its identity
 * is the same message upb writes for the enriched Endpoint (fields in number order, defaults
 * left out), so enriching a serialized call is: find src(6) and dst(7), and rewrite each as its
 * old content plus the identity's suffix under a new length. Which suffix is the Python side's
 * answer (trawl.enricher.identity.IdentityMap.describe_address), asked once per address and
 * kept: the owners of an address over time (claim boundaries, the winner of every interval and
 * of "now", per declared port), so the per-call work here is a bisect and a copy.
 *
 * Two more edits of the object path (trawl.enricher.identity.IdentityMap.enrich_calls): a call
 * whose node is `<node>/<pod address>` (captured on a pod's loopback, trawl.collector.loopback)
 * gets node(4) back as `<node>`, and an endpoint of it at 127.0.0.0/8 or ::1 takes the identity
 * of the pod address; a `tls` call between two different pods of one mesh (the entries' mesh,
 * their suffixes unequal) without such an endpoint gets the note(30) "mesh-mtls", written after
 * the notes it has, before the fields numbered above 30, where a serializer puts it.
 *
 * A call this does not cover (an endpoint holding fields other than ip and port, src or dst
 * absent, repeated or out of order, node repeated or after src, a field of the wrong wire
 * type, an address that is not UTF-8, a note to add behind fields numbered above 30) comes back
 * unchanged with its index listed: the caller enriches it as an object.
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    PyObject *suffix; /* bytes: serialized Endpoint fields 3.. (owned) */
    int known_as_source;
    int known_as_destination;
    PyObject *mesh; /* bytes: the mesh of a pod in one, else b"" (owned) */
} entry_t;

typedef struct {
    entry_t fallback; /* any port not listed */
    Py_ssize_t count;
    uint32_t *ports;
    entry_t *entries;
} winners_t;

typedef struct {
    Py_ssize_t count; /* of bounds; segments has count + 1 */
    int64_t *bounds;
    winners_t *segments;
    winners_t now; /* for time 0 ("now": the claims still open) */
} owners_t;

static void winners_clear(winners_t *winners) {
    Py_CLEAR(winners->fallback.suffix);
    Py_CLEAR(winners->fallback.mesh);
    for (Py_ssize_t index = 0; index < winners->count; index++) {
        Py_CLEAR(winners->entries[index].suffix);
        Py_CLEAR(winners->entries[index].mesh);
    }
    PyMem_Free(winners->ports);
    PyMem_Free(winners->entries);
    winners->ports = NULL;
    winners->entries = NULL;
    winners->count = 0;
}

static void owners_free(owners_t *owners) {
    if (owners == NULL) return;
    if (owners->segments != NULL)
        for (Py_ssize_t index = 0; index <= owners->count; index++) winners_clear(&owners->segments[index]);
    winners_clear(&owners->now);
    PyMem_Free(owners->segments);
    PyMem_Free(owners->bounds);
    PyMem_Free(owners);
}

static void owners_capsule_free(PyObject *capsule) { owners_free(PyCapsule_GetPointer(capsule, "trawl.owners")); }

/* (suffix: bytes, known_as_source: bool, known_as_destination: bool, mesh: bytes) */
static int read_entry(PyObject *spec, entry_t *entry) {
    PyObject *suffix, *mesh;
    int source, destination;
    if (!PyTuple_Check(spec) || !PyArg_ParseTuple(spec, "O!ppO!", &PyBytes_Type, &suffix, &source, &destination,
                                                  &PyBytes_Type, &mesh)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "an entry is (bytes, bool, bool, bytes)");
        return FAILED;
    }
    entry->suffix = Py_NewRef(suffix);
    entry->mesh = Py_NewRef(mesh);
    entry->known_as_source = source;
    entry->known_as_destination = destination;
    return OK;
}

/* (entry for any other port, ((port, entry), ...)) */
static int read_winners(PyObject *spec, winners_t *winners) {
    PyObject *fallback, *by_port;
    if (!PyTuple_Check(spec) || !PyArg_ParseTuple(spec, "OO!", &fallback, &PyTuple_Type, &by_port)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "winners are (entry, ((port, entry), ...))");
        return FAILED;
    }
    if (read_entry(fallback, &winners->fallback)) return FAILED;
    Py_ssize_t count = PyTuple_GET_SIZE(by_port);
    if (count == 0) return OK;
    winners->ports = PyMem_Calloc((size_t)count, sizeof(uint32_t));
    winners->entries = PyMem_Calloc((size_t)count, sizeof(entry_t));
    if (winners->ports == NULL || winners->entries == NULL) {
        PyErr_NoMemory();
        return FAILED;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *pair = PyTuple_GET_ITEM(by_port, index);
        unsigned long port;
        PyObject *entry;
        if (!PyTuple_Check(pair) || !PyArg_ParseTuple(pair, "kO", &port, &entry)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a port's winner is (port, entry)");
            return FAILED;
        }
        winners->ports[index] = (uint32_t)port;
        if (read_entry(entry, &winners->entries[index])) return FAILED;
        winners->count = index + 1;
    }
    return OK;
}

/* (bounds: tuple[int, ...], segments: tuple[winners, ...] (one more than bounds), now: winners) */
static owners_t *read_owners(PyObject *spec) {
    PyObject *bounds, *segments, *now;
    if (!PyTuple_Check(spec) ||
        !PyArg_ParseTuple(spec, "O!O!O", &PyTuple_Type, &bounds, &PyTuple_Type, &segments, &now)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "describe() must return (bounds, segments, now)");
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(bounds);
    if (PyTuple_GET_SIZE(segments) != count + 1) {
        PyErr_SetString(PyExc_ValueError, "describe(): one segment more than bounds expected");
        return NULL;
    }
    owners_t *owners = PyMem_Calloc(1, sizeof(owners_t));
    if (owners == NULL) return (owners_t *)PyErr_NoMemory();
    owners->count = count;
    owners->bounds = PyMem_Calloc(count ? (size_t)count : 1, sizeof(int64_t));
    owners->segments = PyMem_Calloc((size_t)count + 1, sizeof(winners_t));
    if (owners->bounds == NULL || owners->segments == NULL) {
        PyErr_NoMemory();
        goto failed;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        long long bound = PyLong_AsLongLong(PyTuple_GET_ITEM(bounds, index));
        if (bound == -1 && PyErr_Occurred()) goto failed;
        if (index && bound < owners->bounds[index - 1]) {
            PyErr_SetString(PyExc_ValueError, "describe(): bounds must be sorted");
            goto failed;
        }
        owners->bounds[index] = bound;
    }
    for (Py_ssize_t index = 0; index <= count; index++)
        if (read_winners(PyTuple_GET_ITEM(segments, index), &owners->segments[index])) goto failed;
    if (read_winners(now, &owners->now)) goto failed;
    return owners;
failed:
    owners_free(owners);
    return NULL;
}

/* The entry for `port` at `ts` (0: now), as trawl.enricher.identity._Owners.at picks it. */
static const entry_t *owners_pick(const owners_t *owners, uint64_t ts, uint32_t port) {
    const winners_t *winners;
    if (ts == 0) {
        winners = &owners->now;
    } else {
        Py_ssize_t low = 0, high = owners->count; /* bisect_right(bounds, ts) */
        if (ts > (uint64_t)INT64_MAX) {
            low = high;
        } else {
            int64_t moment = (int64_t)ts;
            while (low < high) {
                Py_ssize_t middle = low + (high - low) / 2;
                if (moment < owners->bounds[middle])
                    high = middle;
                else
                    low = middle + 1;
            }
        }
        winners = &owners->segments[low];
    }
    for (Py_ssize_t index = 0; index < winners->count; index++)
        if (winners->ports[index] == port) return &winners->entries[index];
    return &winners->fallback;
}

typedef struct {
    const unsigned char *record; /* the field's tag */
    const unsigned char *content;
    const unsigned char *end; /* of the record */
    const unsigned char *ip;
    size_t ip_len;
    uint32_t port;
} endpoint_ref;

/* An Endpoint holding ip(1) and port(2) at most, in that order, each at most once. */
static int scan_endpoint(endpoint_ref *ref) {
    const unsigned char *pos = ref->content, *end = ref->end;
    uint64_t previous = 0;
    ref->ip = pos;
    ref->ip_len = 0;
    ref->port = 0;
    while (pos < end) {
        uint64_t tag, value;
        if (read_varint(&pos, end, &tag) || read_varint(&pos, end, &value)) return FALLBACK;
        uint64_t number = tag >> 3;
        if (number <= previous) return FALLBACK;
        previous = number;
        if (tag == ((1 << 3) | 2)) {
            if (value > (uint64_t)(end - pos)) return FALLBACK;
            ref->ip = pos;
            ref->ip_len = (size_t)value;
            pos += value;
        } else if (tag == ((2 << 3) | 0)) {
            ref->port = (uint32_t)value; /* a uint32 field keeps the low 32 bits, as parsers do */
        } else {
            return FALLBACK;
        }
    }
    return OK;
}

/* request.ts: field 1 of the Message; the other fields are skipped. */
static int scan_request_ts(const unsigned char *pos, const unsigned char *end, uint64_t *ts) {
    while (pos < end) {
        uint64_t tag, value;
        const unsigned char *content;
        if (read_varint(&pos, end, &tag) || read_field(&pos, end, (int)(tag & 7), &value, &content)) return FALLBACK;
        if ((tag >> 3) == 1 && (tag & 7) != 0) return FALLBACK;
        if (tag == (1 << 3)) *ts = value;
    }
    return OK;
}

/* The parts of a serialized ApiCall the enricher reads and writes. */
typedef struct {
    endpoint_ref endpoints[2];
    uint64_t ts; /* request.ts */
    const unsigned char *protocol;
    size_t protocol_len;
    /* node(4) when it holds a '/' (captured on a pod's loopback): the record, its content, the
       '/' and the record's end; node_record is NULL otherwise. */
    const unsigned char *node_record, *node_content, *node_slash, *node_end;
    const unsigned char *after_notes; /* the first record numbered above 30 (the end when none) */
    const unsigned char *path;        /* path(11) */
    size_t path_len;
    /* The HTTP detail (field 20): its record, content and end; http_record is NULL when none. */
    const unsigned char *http_record, *http_content, *http_end;
    int disordered;                   /* a record numbered up to 30 follows one above 30 */
    int marked;                       /* a "mesh-mtls" note is there already */
} call_ref;

#define NOTE_FIELD 30
static const char MESH_MTLS[] = "mesh-mtls";

static int scan_call(const unsigned char *pos, const unsigned char *end, call_ref *call) {
    int seen_request = 0, seen_node = 0;
    endpoint_ref *endpoints = call->endpoints;
    call->ts = 0;
    call->protocol = pos;
    call->protocol_len = 0;
    call->node_record = NULL;
    call->after_notes = NULL;
    call->disordered = call->marked = 0;
    call->path = pos;
    call->path_len = 0;
    call->http_record = NULL;
    endpoints[0].record = endpoints[1].record = NULL;
    while (pos < end) {
        const unsigned char *record = pos;
        uint64_t tag, value;
        if (read_varint(&pos, end, &tag)) return FALLBACK;
        uint64_t number = tag >> 3;
        int wire_type = (int)(tag & 7);
        int read_here = number == 2 || number == 4 || number == 6 || number == 7 || number == 8 || number == 11 ||
                        number == 20;
        if (number == 0 || (read_here && wire_type != 2)) return FALLBACK;
        if (number > NOTE_FIELD) {
            if (call->after_notes == NULL) call->after_notes = record;
        } else if (call->after_notes != NULL) {
            call->disordered = 1;
        }
        switch (wire_type) {
        case 0:
            if (read_varint(&pos, end, &value)) return FALLBACK;
            break;
        case 1:
            if (end - pos < 8) return FALLBACK;
            pos += 8;
            break;
        case 5:
            if (end - pos < 4) return FALLBACK;
            pos += 4;
            break;
        case 2: {
            if (read_varint(&pos, end, &value) || value > (uint64_t)(end - pos)) return FALLBACK;
            const unsigned char *content = pos;
            pos += value;
            if (number == 2) {
                call->protocol = content;
                call->protocol_len = (size_t)value;
            } else if (number == 4) {
                /* Once, before the endpoints: the node edit comes first in the spliced call. */
                if (seen_node || endpoints[0].record != NULL || endpoints[1].record != NULL) return FALLBACK;
                seen_node = 1;
                const unsigned char *slash = memchr(content, '/', (size_t)value);
                if (slash != NULL) {
                    call->node_record = record;
                    call->node_content = content;
                    call->node_slash = slash;
                    call->node_end = pos;
                }
            } else if (number == 6 || number == 7) {
                endpoint_ref *ref = &endpoints[number - 6];
                /* Once each, src before dst: what a parser would merge is the object path's. */
                if (ref->record != NULL || (number == 6 && endpoints[1].record != NULL)) return FALLBACK;
                ref->record = record;
                ref->content = content;
                ref->end = pos;
                if (scan_endpoint(ref)) return FALLBACK;
            } else if (number == 11) {
                call->path = content;
                call->path_len = (size_t)value;
            } else if (number == 20) {
                /* Once, after the endpoints: a route is spliced into it after theirs. */
                if (call->http_record != NULL || endpoints[1].record == NULL) return FALLBACK;
                call->http_record = record;
                call->http_content = content;
                call->http_end = pos;
            } else if (number == 8) {
                if (seen_request) return FALLBACK;
                seen_request = 1;
                if (scan_request_ts(content, pos, &call->ts)) return FALLBACK;
            } else if (number == NOTE_FIELD && value == sizeof(MESH_MTLS) - 1 &&
                       memcmp(content, MESH_MTLS, sizeof(MESH_MTLS) - 1) == 0) {
                call->marked = 1;
            }
            break;
        }
        default:
            return FALLBACK;
        }
    }
    if (call->after_notes == NULL) call->after_notes = end;
    return endpoints[0].record != NULL && endpoints[1].record != NULL ? OK : FALLBACK;
}

/* 127.0.0.0/8 and ::1 as text (trawl.collector.loopback.is_loopback). */
static int is_loopback(const unsigned char *ip, size_t size) {
    return (size >= 4 && memcmp(ip, "127.", 4) == 0) || (size == 3 && memcmp(ip, "::1", 3) == 0);
}

/* trawl.enricher.identity.mesh_mtls on two entries: pods of one mesh, not the same pod. */
static int mesh_mtls(const entry_t *source, const entry_t *destination) {
    Py_ssize_t mesh = PyBytes_GET_SIZE(source->mesh);
    if (mesh == 0 || PyBytes_GET_SIZE(destination->mesh) != mesh ||
        memcmp(PyBytes_AS_STRING(source->mesh), PyBytes_AS_STRING(destination->mesh), (size_t)mesh) != 0)
        return 0;
    Py_ssize_t size = PyBytes_GET_SIZE(source->suffix);
    return size != PyBytes_GET_SIZE(destination->suffix) ||
           memcmp(PyBytes_AS_STRING(source->suffix), PyBytes_AS_STRING(destination->suffix), (size_t)size) != 0;
}

static unsigned char *write_varint(unsigned char *at, uint64_t value) {
    while (value >= 0x80) {
        *at++ = (unsigned char)(value | 0x80);
        value >>= 7;
    }
    *at++ = (unsigned char)value;
    return at;
}

/* Whether an HttpDetail holds a (non-empty) route, field 11, already; FALLBACK when it does not parse. */
static int http_has_route(const unsigned char *pos, const unsigned char *end, int *has) {
    *has = 0;
    while (pos < end) {
        uint64_t tag, value;
        const unsigned char *content;
        if (read_varint(&pos, end, &tag) || read_field(&pos, end, (int)(tag & 7), &value, &content)) return FALLBACK;
        if ((tag >> 3) == 11 && (tag & 7) != 2) return FALLBACK;
        /* The last one counts, as a parser keeps it; an empty one is no route. */
        if (tag == ((11 << 3) | 2)) *has = value > 0;
    }
    return OK;
}

/* A route to write at the end of the call's HTTP detail (size 0: none). */
typedef struct {
    const char *data;
    size_t size;
} route_t;

/* Where the spliced call is written; with `at` NULL, only its size is counted. */
typedef struct {
    unsigned char *at;
    size_t size;
} out_t;

static void splice_put(out_t *out, const void *data, size_t size) {
    if (out->at != NULL) {
        memcpy(out->at, data, size);
        out->at += size;
    }
    out->size += size;
}

static void splice_varint(out_t *out, uint64_t value) {
    unsigned char buffer[10];
    splice_put(out, buffer, (size_t)(write_varint(buffer, value) - buffer));
}

static void splice_string(out_t *out, uint64_t number, const void *data, size_t size) {
    splice_varint(out, (number << 3) | 2);
    splice_varint(out, size);
    splice_put(out, data, size);
}

/* The call with its node cut at the '/', each endpoint's content followed by its suffix, and the
   mesh-mtls note when `mark`: edits in the order of the records they replace. */
static void write_spliced(out_t *out, const unsigned char *data, const unsigned char *end, const call_ref *call,
                          PyObject *const suffixes[2], int mark, route_t route) {
    const unsigned char *from = data;
    if (call->node_record != NULL) {
        splice_put(out, from, (size_t)(call->node_record - from));
        size_t kept = (size_t)(call->node_slash - call->node_content);
        if (kept) splice_string(out, 4, call->node_content, kept); /* proto3 leaves "" out */
        from = call->node_end;
    }
    for (int side = 0; side < 2; side++) {
        const endpoint_ref *ref = &call->endpoints[side];
        size_t content = (size_t)(ref->end - ref->content);
        size_t extra = (size_t)PyBytes_GET_SIZE(suffixes[side]);
        splice_put(out, from, (size_t)(ref->record - from));
        splice_varint(out, (uint64_t)(((6 + side) << 3) | 2));
        splice_varint(out, content + extra);
        splice_put(out, ref->content, content);
        splice_put(out, PyBytes_AS_STRING(suffixes[side]), extra);
        from = ref->end;
    }
    if (route.size) { /* http.route(11), the HttpDetail's last field, appended to its content */
        unsigned char buffer[10];
        size_t content = (size_t)(call->http_end - call->http_content);
        size_t route_record = 1 + (size_t)(write_varint(buffer, route.size) - buffer) + route.size;
        splice_put(out, from, (size_t)(call->http_record - from));
        splice_varint(out, (uint64_t)((20 << 3) | 2));
        splice_varint(out, content + route_record);
        splice_put(out, call->http_content, content);
        splice_string(out, 11, route.data, route.size);
        from = call->http_end;
    }
    if (mark) {
        splice_put(out, from, (size_t)(call->after_notes - from));
        splice_string(out, NOTE_FIELD, MESH_MTLS, sizeof(MESH_MTLS) - 1);
        from = call->after_notes;
    }
    splice_put(out, from, (size_t)(end - from));
}

static PyObject *splice(PyObject *call, const call_ref *ref, PyObject *const suffixes[2], int mark, route_t route) {
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(call);
    const unsigned char *end = data + PyBytes_GET_SIZE(call);
    if (PyBytes_GET_SIZE(suffixes[0]) == 0 && PyBytes_GET_SIZE(suffixes[1]) == 0 && ref->node_record == NULL && !mark &&
        route.size == 0)
        return Py_NewRef(call);
    out_t counted = {NULL, 0};
    write_spliced(&counted, data, end, ref, suffixes, mark, route);
    PyObject *result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)counted.size);
    if (result == NULL) return NULL;
    out_t written = {(unsigned char *)PyBytes_AS_STRING(result), 0};
    write_spliced(&written, data, end, ref, suffixes, mark, route);
    return result;
}

typedef struct {
    PyObject_HEAD
    PyObject *describe;
    /* route(dst, path, http) -> str | None: the http.route of an HTTP call without one (dst: the
       enriched Endpoint, http: the HttpDetail, serialized); NULL: no routes. */
    PyObject *route;
    PyObject *cache; /* address (bytes) -> capsule of owners_t */
    Py_ssize_t max_addresses;
    /* The last address looked up on each side: consecutive calls of a connection share them. */
    PyObject *memo_key[2];
    PyObject *memo_capsule[2];
    owners_t *memo_owners[2];
} Splicer;

static int Splicer_init(Splicer *self, PyObject *args, PyObject *kwargs) {
    PyObject *describe, *route = Py_None;
    Py_ssize_t max_addresses = 65536;
    static char *keywords[] = {"describe", "max_addresses", "route", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|nO", keywords, &describe, &max_addresses, &route)) return -1;
    if (!PyCallable_Check(describe) || max_addresses < 1 || (route != Py_None && !PyCallable_Check(route))) {
        PyErr_SetString(PyExc_TypeError,
                        "Splicer(describe: callable, max_addresses: int >= 1, route: callable | None = None)");
        return -1;
    }
    Py_XSETREF(self->route, route == Py_None ? NULL : Py_NewRef(route));
    PyObject *cache = PyDict_New();
    if (cache == NULL) return -1;
    Py_XSETREF(self->describe, Py_NewRef(describe));
    Py_XSETREF(self->cache, cache);
    self->max_addresses = max_addresses;
    for (int side = 0; side < 2; side++) {
        Py_CLEAR(self->memo_key[side]);
        Py_CLEAR(self->memo_capsule[side]);
        self->memo_owners[side] = NULL;
    }
    return 0;
}

static void Splicer_dealloc(Splicer *self) {
    Py_XDECREF(self->describe);
    Py_XDECREF(self->route);
    Py_XDECREF(self->cache);
    for (int side = 0; side < 2; side++) {
        Py_XDECREF(self->memo_key[side]);
        Py_XDECREF(self->memo_capsule[side]);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The owners of `ip` (asked of describe() on first sight); FALLBACK when the address is not UTF-8. */
static int splicer_owners(Splicer *self, int side, const unsigned char *ip, size_t ip_len, owners_t **found) {
    PyObject *memo = self->memo_key[side];
    if (memo != NULL && (size_t)PyBytes_GET_SIZE(memo) == ip_len && memcmp(PyBytes_AS_STRING(memo), ip, ip_len) == 0) {
        *found = self->memo_owners[side];
        return OK;
    }
    PyObject *key = PyBytes_FromStringAndSize((const char *)ip, (Py_ssize_t)ip_len);
    if (key == NULL) return FAILED;
    PyObject *capsule = PyDict_GetItemWithError(self->cache, key); /* borrowed */
    if (capsule != NULL) {
        Py_INCREF(capsule);
    } else {
        if (PyErr_Occurred()) goto failed;
        PyObject *text = PyUnicode_DecodeUTF8((const char *)ip, (Py_ssize_t)ip_len, "strict");
        if (text == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) goto failed;
            PyErr_Clear();
            Py_DECREF(key);
            return FALLBACK;
        }
        PyObject *description = PyObject_CallOneArg(self->describe, text);
        Py_DECREF(text);
        if (description == NULL) goto failed;
        owners_t *owners = read_owners(description);
        Py_DECREF(description);
        if (owners == NULL) goto failed;
        capsule = PyCapsule_New(owners, "trawl.owners", owners_capsule_free);
        if (capsule == NULL) {
            owners_free(owners);
            goto failed;
        }
        /* Bounded: addresses seen once (clients from everywhere) must not pile up. */
        if (PyDict_GET_SIZE(self->cache) >= self->max_addresses) PyDict_Clear(self->cache);
        if (PyDict_SetItem(self->cache, key, capsule) < 0) {
            Py_DECREF(capsule);
            goto failed;
        }
    }
    Py_XSETREF(self->memo_key[side], key);
    Py_XSETREF(self->memo_capsule[side], capsule);
    self->memo_owners[side] = PyCapsule_GetPointer(capsule, "trawl.owners");
    *found = self->memo_owners[side];
    return OK;
failed:
    Py_DECREF(key);
    return FAILED;
}

static int count_protocol(PyObject *protocols, const unsigned char *name, size_t size, Py_ssize_t count) {
    if (count == 0) return OK;
    PyObject *key = PyBytes_FromStringAndSize((const char *)name, (Py_ssize_t)size);
    if (key == NULL) return FAILED;
    PyObject *previous = PyDict_GetItemWithError(protocols, key);
    if (previous == NULL && PyErr_Occurred()) {
        Py_DECREF(key);
        return FAILED;
    }
    PyObject *total = PyLong_FromSsize_t(count + (previous != NULL ? PyLong_AsSsize_t(previous) : 0));
    int status = total == NULL ? -1 : PyDict_SetItem(protocols, key, total);
    Py_XDECREF(total);
    Py_DECREF(key);
    return status < 0 ? FAILED : OK;
}

/* The route of an HTTP call without one, asked of route(dst, path, http); `route` stays empty
   when there is none (or when the call holds one already). FALLBACK when the detail does not
   parse or lies where a splice cannot reach it (before the destination, after the notes). */
static int splicer_route(Splicer *self, const call_ref *ref, const entry_t *destination, PyObject **answer,
                         route_t *route) {
    int has;
    if (ref->http_end > ref->after_notes || http_has_route(ref->http_content, ref->http_end, &has)) return FALLBACK;
    if (has) return OK;
    const endpoint_ref *dst = &ref->endpoints[1];
    size_t content = (size_t)(dst->end - dst->content);
    Py_ssize_t extra = PyBytes_GET_SIZE(destination->suffix);
    PyObject *endpoint = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)content + extra);
    if (endpoint == NULL) return FAILED;
    memcpy(PyBytes_AS_STRING(endpoint), dst->content, content);
    memcpy(PyBytes_AS_STRING(endpoint) + content, PyBytes_AS_STRING(destination->suffix), (size_t)extra);
    PyObject *path = PyBytes_FromStringAndSize((const char *)ref->path, (Py_ssize_t)ref->path_len);
    PyObject *http = PyBytes_FromStringAndSize((const char *)ref->http_content,
                                               (Py_ssize_t)(ref->http_end - ref->http_content));
    PyObject *result = NULL;
    if (path != NULL && http != NULL) {
        PyObject *args[3] = {endpoint, path, http};
        result = PyObject_Vectorcall(self->route, args, 3, NULL);
    }
    Py_DECREF(endpoint);
    Py_XDECREF(path);
    Py_XDECREF(http);
    if (result == NULL) return FAILED;
    if (result == Py_None) {
        Py_DECREF(result);
        return OK;
    }
    Py_ssize_t size;
    const char *text = PyUnicode_Check(result) ? PyUnicode_AsUTF8AndSize(result, &size) : NULL;
    if (text == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "Splicer: route() must return str or None");
        Py_DECREF(result);
        return FAILED;
    }
    *answer = result;
    route->data = text;
    route->size = (size_t)size;
    return OK;
}

/* enrich(calls) -> (calls, unknown_sources, unknown_destinations, {protocol: count}, [index, ...]) */
static PyObject *Splicer_enrich(Splicer *self, PyObject *calls) {
    PyObject *sequence = PySequence_Fast(calls, "enrich: calls must be a sequence of bytes");
    if (sequence == NULL) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    PyObject **items = PySequence_Fast_ITEMS(sequence);
    PyObject *enriched = PyList_New(count);
    PyObject *protocols = PyDict_New();
    PyObject *odd = PyList_New(0);
    Py_ssize_t unknown_sources = 0, unknown_destinations = 0;
    const unsigned char *run_protocol = NULL;
    size_t run_size = 0;
    Py_ssize_t run_count = 0;
    if (enriched == NULL || protocols == NULL || odd == NULL) goto failed;
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *call = items[index];
        if (!PyBytes_CheckExact(call)) {
            PyErr_SetString(PyExc_TypeError, "enrich: calls must be a sequence of bytes");
            goto failed;
        }
        const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(call);
        call_ref ref;
        owners_t *owners[2];
        int tied[2] = {0, 0};
        int status = scan_call(data, data + PyBytes_GET_SIZE(call), &ref);
        for (int side = 0; side < 2 && status == OK; side++) {
            const endpoint_ref *endpoint = &ref.endpoints[side];
            const unsigned char *address = endpoint->ip;
            size_t address_len = endpoint->ip_len;
            if (ref.node_record != NULL && ref.node_end - ref.node_slash > 1 && is_loopback(address, address_len)) {
                tied[side] = 1; /* the pod whose loopback it is */
                address = ref.node_slash + 1;
                address_len = (size_t)(ref.node_end - address);
            }
            status = splicer_owners(self, side, address, address_len, &owners[side]);
        }
        const entry_t *source = NULL, *destination = NULL;
        int mark = 0;
        if (status == OK) {
            source = owners_pick(owners[0], ref.ts, ref.endpoints[0].port);
            destination = owners_pick(owners[1], ref.ts, ref.endpoints[1].port);
            mark = !tied[0] && !tied[1] && !ref.marked && ref.protocol_len == 3 && memcmp(ref.protocol, "tls", 3) == 0 &&
                   mesh_mtls(source, destination);
            if (mark && ref.disordered) status = FALLBACK;
        }
        if (status == FAILED) goto failed;
        if (status == FALLBACK) {
            PyObject *position = PyLong_FromSsize_t(index);
            int appended = position == NULL ? -1 : PyList_Append(odd, position);
            Py_XDECREF(position);
            if (appended < 0) goto failed;
            PyList_SET_ITEM(enriched, index, Py_NewRef(call));
            continue;
        }
        PyObject *suffixes[2] = {source->suffix, destination->suffix};
        PyObject *answer = NULL; /* holds the route's text while it is written */
        route_t route = {NULL, 0};
        if (self->route != NULL && ref.http_record != NULL) {
            status = splicer_route(self, &ref, destination, &answer, &route);
            if (status == FAILED) goto failed;
            if (status == FALLBACK) {
                PyObject *position = PyLong_FromSsize_t(index);
                int appended = position == NULL ? -1 : PyList_Append(odd, position);
                Py_XDECREF(position);
                if (appended < 0) goto failed;
                PyList_SET_ITEM(enriched, index, Py_NewRef(call));
                continue;
            }
        }
        PyObject *result = splice(call, &ref, suffixes, mark, route);
        Py_XDECREF(answer);
        if (result == NULL) goto failed;
        PyList_SET_ITEM(enriched, index, result);
        unknown_sources += !source->known_as_source;
        unknown_destinations += !destination->known_as_destination;
        if (run_count && (ref.protocol_len != run_size || memcmp(ref.protocol, run_protocol, run_size) != 0)) {
            if (count_protocol(protocols, run_protocol, run_size, run_count)) goto failed;
            run_count = 0;
        }
        run_protocol = ref.protocol;
        run_size = ref.protocol_len;
        run_count++;
    }
    if (count_protocol(protocols, run_protocol, run_size, run_count)) goto failed;
    Py_DECREF(sequence);
    return Py_BuildValue("(NnnNN)", enriched, unknown_sources, unknown_destinations, protocols, odd);
failed:
    Py_DECREF(sequence);
    Py_XDECREF(enriched); /* a list with NULL slots is freed safely */
    Py_XDECREF(protocols);
    Py_XDECREF(odd);
    return NULL;
}

static PyMethodDef Splicer_methods[] = {
    {"enrich", (PyCFunction)Splicer_enrich, METH_O,
     "enrich(calls, /) -> (calls, unknown_sources, unknown_destinations, {protocol: count}, [odd index, ...]): "
     "each serialized call with its endpoints' identity spliced in; odd calls come back unchanged."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SplicerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "trawl._calljson.Splicer",
    .tp_basicsize = sizeof(Splicer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Splicer(describe, max_addresses=65536, route=None): endpoint identity (and, with route, "
              "the http.route of HTTP calls) written into serialized ApiCalls.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Splicer_init,
    .tp_dealloc = (destructor)Splicer_dealloc,
    .tp_methods = Splicer_methods,
};

/* ---------------------------------------------------------------------------------------------
 * route_calls: the dissector service groups serialized calls per (node, shard) for its
 * CallBatches without parsing them.
 * ------------------------------------------------------------------------------------------- */

/* node(4) and shard(31) of a serialized ApiCall; FALLBACK when it is not a well-formed message. */
static int scan_route(const unsigned char *pos, const unsigned char *end, const unsigned char **node,
                      size_t *node_size, uint32_t *shard) {
    *node = pos;
    *node_size = 0;
    *shard = 0;
    while (pos < end) {
        uint64_t tag, value;
        const unsigned char *content;
        if (read_varint(&pos, end, &tag) || (tag >> 3) == 0 ||
            read_field(&pos, end, (int)(tag & 7), &value, &content))
            return FALLBACK;
        if (tag == (31 << 3)) {
            *shard = (uint32_t)value;
        } else if (tag == ((4 << 3) | 2)) {
            *node = content;
            *node_size = (size_t)value;
        }
    }
    return OK;
}

/* route_calls(calls, /) -> [(node, shard, [call, ...]), ...]: runs of consecutive calls of one
   (node, shard), in order. ValueError when a call is not a well-formed ApiCall. */
static PyObject *route_calls(PyObject *module, PyObject *calls) {
    (void)module;
    PyObject *sequence = PySequence_Fast(calls, "route_calls: calls must be a sequence of bytes");
    if (sequence == NULL) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    PyObject **items = PySequence_Fast_ITEMS(sequence);
    PyObject *runs = PyList_New(0);
    PyObject *run = NULL; /* the current run's list, borrowed from `runs` */
    const unsigned char *run_node = NULL;
    size_t run_node_size = 0;
    uint32_t run_shard = 0;
    if (runs == NULL) goto failed;
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *call = items[index];
        if (!PyBytes_CheckExact(call)) {
            PyErr_SetString(PyExc_TypeError, "route_calls: calls must be a sequence of bytes");
            goto failed;
        }
        const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(call);
        const unsigned char *node;
        size_t node_size;
        uint32_t shard;
        if (scan_route(data, data + PyBytes_GET_SIZE(call), &node, &node_size, &shard)) {
            PyErr_Format(PyExc_ValueError, "route_calls: calls[%zd] is not a serialized ApiCall", index);
            goto failed;
        }
        if (run == NULL || shard != run_shard || node_size != run_node_size || memcmp(node, run_node, node_size)) {
            PyObject *name = PyUnicode_DecodeUTF8((const char *)node, (Py_ssize_t)node_size, "strict");
            if (name == NULL) {
                PyErr_Clear();
                PyErr_Format(PyExc_ValueError, "route_calls: calls[%zd] has a node that is not UTF-8", index);
                goto failed;
            }
            PyObject *members = PyList_New(0);
            PyObject *entry = members == NULL ? NULL : Py_BuildValue("(NkN)", name, (unsigned long)shard, members);
            if (entry == NULL) {
                if (members == NULL) Py_DECREF(name);
                goto failed;
            }
            int appended = PyList_Append(runs, entry);
            Py_DECREF(entry);
            if (appended < 0) goto failed;
            run = members;
            run_node = node;
            run_node_size = node_size;
            run_shard = shard;
        }
        if (PyList_Append(run, call) < 0) goto failed;
    }
    Py_DECREF(sequence);
    return runs;
failed:
    Py_DECREF(sequence);
    Py_XDECREF(runs);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"route_calls", (PyCFunction)route_calls, METH_O,
     "route_calls(calls, /) -> [(node, shard, [call, ...]), ...]: runs of serialized ApiCalls of one "
     "(node, shard), in order."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "trawl._calljson",
    .m_doc = "Serialized ApiCalls without Python objects: JSON text (see trawl/render.py), endpoint "
             "identity splicing (trawl/enricher/logic.py) and routing (trawl/dissector/main.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__calljson(void) {
    if (PyType_Ready(&EncoderType) < 0 || PyType_Ready(&SplicerType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) return NULL;
    if (PyModule_AddObjectRef(mod, "Encoder", (PyObject *)&EncoderType) < 0 ||
        PyModule_AddObjectRef(mod, "Splicer", (PyObject *)&SplicerType) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
