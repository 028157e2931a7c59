/*
 * The compiled lane's Kafka part, included by _express.c (after its HTTP/1, HTTP/2 and Redis
 * parts, whose flows, caches and ApiCall writers it shares).
 *
 * Why: the Python path (protocols/kafka.py) reads about 27,000 calls/s of a produce/fetch
 * capture here, about tshark's speed end to end, where issue #10 asks for 10x. This part takes
 * the common case in C by the lane's rule (_express.c's header): protocols/kafka.py stays the
 * reference, and a flow is held only while this code is certain to make exactly its calls.
 *
 * Nothing about Kafka's messages is written here twice: what each API version looks like comes
 * from kafka.py itself through `kafka_api` (kafka.lane_api, asked once per api key and version):
 * its name, header versions, whether it is flexible, and its request and response layouts, the
 * very `_ops` KafkaParser walks, flattened to three bytes an operation. One walker here reads a
 * body along such a layout as kafka._Walker does (same wire types, same bounds, same order of
 * facts); record batches are counted from their headers as kafka._count_records does.
 *
 * What is held: a connection whose client's first chunk the engine's detection would make Kafka
 * at once (`kafka_claims`, asked once per connection: the registry's probes, so the port hint and
 * content rules are the engine's own), requests and responses framed by their 4-byte sizes within
 * max(max_body_bytes, 64) (a larger frame is truncated by KafkaParser: demoted), every text it
 * reports ASCII, every body its layout reads whole, every response answering a pending request,
 * no correlation id reused while pending, at most max_pending_requests pending. Produce with
 * acks=0 is sent at once, one way; others are sent as their responses come, with others still
 * pending; a replay in Python after a demotion drops them by id (flow->emitted), as for Redis.
 * The state at a quiescent point (nothing pending, both directions between frames) is
 * KafkaState: the ordinal and the topic ids learnt from Metadata responses (copied when they
 * changed since the last snapshot). SaslHandshake is refused by kafka.lane_api (after it the
 * connection may carry raw SASL tokens, KafkaParser's to follow).
 */

#define KAFKA_MAX_FRAME (100 * 1024 * 1024) /* kafka.MAX_FRAME_SIZE */
#define KAFKA_MAX_TOPICS 64                  /* kafka.MAX_TOPICS */
#define KAFKA_MAX_PARTITIONS 256             /* kafka.MAX_PARTITIONS */
#define KAFKA_MAX_TOPIC_IDS 1024             /* kafka.MAX_TOPIC_IDS */
#define KAFKA_MAX_PATH 256                   /* kafka.MAX_PATH */
#define KAFKA_MAX_CLIENT_ID 256              /* kafka.MAX_CLIENT_ID */
#define KAFKA_MAX_PENDING 1024
#define KAFKA_MAX_APIS 4096 /* distinct (api key, version) pairs asked of kafka.lane_api */
#define KAFKA_MAX_OPS 4096
#define KAFKA_MAX_DEPTH 16
#define KAFKA_ERROR_CODES 1024 /* names kept for codes -1..1022; others are written as Python does */

/* kafka._OP_*: the operations of a flattened layout. */
enum {
    KOP_I8, KOP_I16, KOP_I32, KOP_I64, KOP_UUID, KOP_STR, KOP_BYTES, KOP_RECORDS,
    KOP_STRUCTS, KOP_INTS, KOP_LONGS, KOP_STRS,
    KOP_TOPIC, KOP_TOPIC_ID, KOP_NAMED_ID, KOP_PARTITION, KOP_ERROR, KOP_GROUP, KOP_KEY,
    KOP_ACKS, KOP_MECHANISM, KOP_PARTITIONS, KOP_TOPICS, KOP_KEYS, KOP_COUNT
};

typedef struct {
    uint8_t op;
    uint16_t span; /* operations its children take, right after it */
} kop_t;

/* One API version as kafka.lane_api describes it. */
typedef struct kapi_s {
    char name[64];
    size_t name_len;
    int request_header, response_header, compact, refused;
    char note[24];
    int16_t key, version;
    int has_ops[2]; /* a request, response layout: the body is read (an empty layout reads nothing) */
    kop_t *ops[2];
    size_t op_count[2];
} kapi_t;

/* What one message's body told (kafka.Facts); texts live in `text`, by offset. */
typedef struct {
    buf_t text;
    uint32_t topic_off[KAFKA_MAX_TOPICS], topic_len[KAFKA_MAX_TOPICS];
    int topics;
    int32_t partitions[KAFKA_MAX_PARTITIONS];
    int partition_count;
    int error, error_depth;
    uint32_t group_off, group_len, key_off, key_len, mechanism_off, mechanism_len, last_off, last_len;
    int has_mechanism, acks_set, acks;
    uint64_t record_count, record_bytes;
    unsigned codecs; /* bit per codec value 0..7 */
    buf_t named; /* (topic id, name) from Metadata: 16 id bytes, u32 offset, u32 length each */
    int named_count;
} kfacts_t;

typedef struct {
    int32_t correlation;
    size_t api;
    int64_t ordinal, ts, end_ts, size;
    char id[24];
    buf_t head;   /* ApiCall fields 1-7 */
    buf_t client; /* the client id, as kept */
    kfacts_t facts;
} kpending_t;

typedef struct {
    uint8_t id[16];
    char *name;
    size_t len;
} knamed_t;

typedef struct kafkaconn_s {
    buf_t frames[2]; /* a frame being gathered per direction, its size prefix included */
    int64_t frame_ts[2];
    kpending_t **pending; /* in the order the requests came */
    size_t count, cap;
    kpending_t **spare; /* answered entries kept for their buffers */
    size_t spare_count;
    knamed_t *names; /* topic id -> name, oldest first (KafkaParser._topic_names) */
    size_t name_count;
    int names_changed; /* since the last snapshot */
    PyObject *snapshot_names; /* KafkaState.topic_names as of the last snapshot (a tuple) */
    PyObject *prefix;         /* the call-id hash input's start, protocol "kafka" */
    kfacts_t response;
    buf_t out, sub, list;
} kafkaconn_t;

static void kfacts_free(kfacts_t *facts) {
    buf_free(&facts->text);
    buf_free(&facts->named);
}

static void kfacts_reset(kfacts_t *facts) {
    facts->text.len = facts->named.len = 0;
    facts->topics = facts->partition_count = facts->named_count = 0;
    facts->error = 0;
    facts->error_depth = 99;
    facts->group_len = facts->key_len = facts->mechanism_len = facts->last_len = 0;
    facts->has_mechanism = facts->acks_set = facts->acks = 0;
    facts->record_count = facts->record_bytes = 0;
    facts->codecs = 0;
}

static void kpending_free(kpending_t *entry) {
    if (entry == NULL) return;
    buf_free(&entry->head);
    buf_free(&entry->client);
    kfacts_free(&entry->facts);
    PyMem_Free(entry);
}

static void kafkaconn_free(kafkaconn_t *kafka) {
    if (kafka == NULL) return;
    for (int d = 0; d < 2; d++) buf_free(&kafka->frames[d]);
    for (size_t i = 0; i < kafka->count; i++) kpending_free(kafka->pending[i]);
    for (size_t i = 0; i < kafka->spare_count; i++) kpending_free(kafka->spare[i]);
    PyMem_Free(kafka->pending);
    PyMem_Free(kafka->spare);
    for (size_t i = 0; i < kafka->name_count; i++) PyMem_Free(kafka->names[i].name);
    PyMem_Free(kafka->names);
    Py_XDECREF(kafka->snapshot_names);
    Py_XDECREF(kafka->prefix);
    kfacts_free(&kafka->response);
    buf_free(&kafka->out);
    buf_free(&kafka->sub);
    buf_free(&kafka->list);
    PyMem_Free(kafka);
}

/* Kafka's integers are signed: _express.c's be32/be16, read as such. */
static inline int32_t sbe32(const uint8_t *p) { return (int32_t)be32(p); }
static inline int16_t sbe16(const uint8_t *p) { return (int16_t)be16(p); }

/* A signed int32 field as protobuf writes it (negative: ten bytes, sign-extended). */
static int pb_int32(buf_t *out, unsigned field, int32_t value) {
    if (value == 0) return 0;
    return pb_varint(out, (uint64_t)field << 3) || pb_varint(out, (uint64_t)(int64_t)value);
}

/* -- API versions (kafka.lane_api, cached) ------------------------------------------------- */

static void kapi_free_all(Express *self) {
    for (size_t i = 0; i < self->kafka_api_count; i++) {
        PyMem_Free(self->kafka_apis[i].ops[0]);
        PyMem_Free(self->kafka_apis[i].ops[1]);
    }
    PyMem_Free(self->kafka_apis);
    self->kafka_apis = NULL;
    self->kafka_api_count = self->kafka_api_cap = 0;
    cache_free(&self->kafka_api_cache);
}

/* A flattened layout: its operations, or -1 when it is not one (a span past its parent). */
static int kafka_layout(PyObject *layout, int *has, kop_t **ops, size_t *count) {
    *ops = NULL;
    *count = 0;
    *has = layout != Py_None;
    if (layout == Py_None) return 0;
    if (!PyBytes_Check(layout) || PyBytes_GET_SIZE(layout) % 3) return -1;
    size_t n = (size_t)PyBytes_GET_SIZE(layout) / 3;
    if (n == 0) return 0;
    if (n > KAFKA_MAX_OPS) return -1;
    const uint8_t *data = (const uint8_t *)PyBytes_AS_STRING(layout);
    kop_t *out = PyMem_Calloc(n, sizeof(kop_t));
    if (out == NULL) return -1;
    for (size_t i = 0; i < n; i++) {
        out[i].op = data[3 * i];
        out[i].span = (uint16_t)((data[3 * i + 1] << 8) | data[3 * i + 2]);
        if (out[i].op >= KOP_COUNT || i + 1 + out[i].span > n) {
            PyMem_Free(out);
            return -1;
        }
    }
    *ops = out;
    *count = n;
    return 0;
}

/* The index of (api_key, version)'s description, or -1 (callback failed, or too many pairs). */
static long kafka_api_get(Express *self, int16_t api_key, int16_t version) {
    uint8_t key[4] = {(uint8_t)(api_key >> 8), (uint8_t)api_key, (uint8_t)(version >> 8), (uint8_t)version};
    uint64_t hash = hash_bytes(key, 4);
    int cached = cache_get(&self->kafka_api_cache, key, 4, hash);
    if (cached >= 0) return cached;
    if (self->kafka_api_count >= KAFKA_MAX_APIS) return -1;
    if (self->kafka_api_count == self->kafka_api_cap) {
        size_t cap = self->kafka_api_cap ? self->kafka_api_cap * 2 : 32;
        kapi_t *apis = PyMem_Realloc(self->kafka_apis, cap * sizeof(kapi_t));
        if (apis == NULL) return -1;
        self->kafka_apis = apis;
        self->kafka_api_cap = cap;
    }
    kapi_t *api = &self->kafka_apis[self->kafka_api_count];
    memset(api, 0, sizeof(*api));
    api->key = api_key;
    api->version = version;
    PyObject *answer = PyObject_CallFunction(self->kafka_api, "ii", (int)api_key, (int)version);
    if (answer == NULL) {
        PyErr_WriteUnraisable(self->kafka_api);
        return -1;
    }
    int ok = 1;
    if (answer == Py_None) {
        api->refused = 1;
    } else {
        const char *name, *note;
        Py_ssize_t name_len, note_len;
        int compact;
        PyObject *layouts[2];
        ok = PyArg_ParseTuple(answer, "s#iips#OO", &name, &name_len, &api->request_header, &api->response_header,
                              &compact, &note, &note_len, &layouts[0], &layouts[1]) &&
             (size_t)name_len < sizeof(api->name) && (size_t)note_len < sizeof(api->note);
        if (ok) {
            memcpy(api->name, name, (size_t)name_len);
            api->name_len = (size_t)name_len;
            memcpy(api->note, note, (size_t)note_len);
            api->compact = compact;
            ok = kafka_layout(layouts[0], &api->has_ops[0], &api->ops[0], &api->op_count[0]) == 0 &&
                 kafka_layout(layouts[1], &api->has_ops[1], &api->ops[1], &api->op_count[1]) == 0;
        }
    }
    Py_DECREF(answer);
    if (!ok) {
        if (PyErr_Occurred()) PyErr_WriteUnraisable(self->kafka_api);
        PyMem_Free(api->ops[0]);
        PyMem_Free(api->ops[1]);
        return -1;
    }
    long index = (long)self->kafka_api_count++;
    cache_put(&self->kafka_api_cache, key, 4, hash, (int)index);
    return index;
}

/* kafka.ERRORS as a table by code; a code it lacks is written as kafka.error_name writes it. */
static int kafka_error_table(Express *self, PyObject *errors) {
    char *table = PyMem_Calloc(KAFKA_ERROR_CODES, 48);
    if (table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *key, *value;
    Py_ssize_t at = 0;
    while (PyDict_Next(errors, &at, &key, &value)) {
        long code = PyLong_AsLong(key);
        if (code == -1 && PyErr_Occurred()) goto fail;
        Py_ssize_t len;
        const char *text = PyUnicode_AsUTF8AndSize(value, &len);
        if (text == NULL) goto fail;
        if (code < -1 || code >= KAFKA_ERROR_CODES - 1 || len == 0 || len >= 48) {
            PyErr_Format(PyExc_ValueError, "Express: kafka_errors has code %ld named %R, outside what the lane keeps",
                         code, value);
            goto fail;
        }
        memcpy(table + (code + 1) * 48, text, (size_t)len);
    }
    self->kafka_error_names = table;
    return 0;
fail:
    PyMem_Free(table);
    return -1;
}

/* kafka.error_name */
static const char *kafka_error_name(Express *self, int code, char *scratch, size_t size) {
    if (code >= -1 && code < KAFKA_ERROR_CODES - 1 && self->kafka_error_names != NULL &&
        self->kafka_error_names[(code + 1) * 48] != 0)
        return &self->kafka_error_names[(code + 1) * 48];
    snprintf(scratch, size, "ERROR_%d", code);
    return scratch;
}

/* -- the body walker (kafka._Walker) ------------------------------------------------------- */

enum { KW_OK = 0, KW_SHORT = 1, KW_ODD = 2, KW_MEMORY = 3 };

typedef struct {
    const uint8_t *data;
    size_t end;
    int compact;
    kafkaconn_t *conn;
    kfacts_t *facts;
    int status; /* KW_* */
} kwalker_t;

/* kafka._uvarint: at most five bytes (a shift past 28 is short). */
static int k_uvarint(const uint8_t *data, size_t end, size_t *pos, uint64_t *value) {
    uint64_t result = 0;
    unsigned shift = 0;
    for (;;) {
        if (*pos >= end || shift > 28) return -1;
        uint8_t byte = data[(*pos)++];
        result |= (uint64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80)) {
            *value = result;
            return 0;
        }
        shift += 7;
    }
}

/* kafka._skip_tags */
static int k_skip_tags(const uint8_t *data, size_t end, size_t *pos) {
    if (*pos < end && data[*pos] == 0) {
        (*pos)++;
        return 0;
    }
    uint64_t count, tag, size;
    if (k_uvarint(data, end, pos, &count)) return -1;
    for (uint64_t i = 0; i < count; i++) {
        if (k_uvarint(data, end, pos, &tag) || k_uvarint(data, end, pos, &size)) return -1;
        if (size > end - *pos) return -1;
        *pos += size;
    }
    return 0;
}

/* _Walker.length: a string's, bytes' or array's length (-1 for null). */
static int k_length(kwalker_t *w, size_t *pos, int wide, int64_t *size) {
    if (w->compact) {
        if (*pos < w->end && w->data[*pos] < 0x80) {
            *size = (int64_t)w->data[(*pos)++] - 1;
            return 0;
        }
        uint64_t value;
        if (k_uvarint(w->data, w->end, pos, &value)) return -1;
        *size = (int64_t)value - 1;
        return 0;
    }
    if (wide) {
        if (*pos + 4 > w->end) return -1;
        *size = sbe32(w->data + *pos);
        *pos += 4;
        return 0;
    }
    if (*pos + 2 > w->end) return -1;
    *size = sbe16(w->data + *pos);
    *pos += 2;
    return 0;
}

/* _Walker.count */
static int k_count(kwalker_t *w, size_t *pos, size_t item_size, int64_t *count) {
    if (k_length(w, pos, 1, count)) return -1;
    if (*count > 0 && (uint64_t)*count > (w->end - *pos) / item_size) return -1;
    return 0;
}

static int k_ascii(const uint8_t *text, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (text[i] >= 0x80) return 0;
    return 1;
}

static int k_text_add(kwalker_t *w, const uint8_t *text, size_t len, uint32_t *off) {
    *off = (uint32_t)w->facts->text.len;
    if (buf_put(&w->facts->text, text, len)) {
        w->status = KW_MEMORY;
        return -1;
    }
    return 0;
}

/* _Walker._named */
static void k_named(kwalker_t *w, int op, const uint8_t *text, size_t len) {
    kfacts_t *f = w->facts;
    if (!k_ascii(text, len)) {
        w->status = KW_ODD; /* Python decodes with "replace": the lane takes ASCII only */
        return;
    }
    uint32_t off;
    if (op == KOP_TOPIC) {
        if (k_text_add(w, text, len, &off)) return;
        f->last_off = off;
        f->last_len = (uint32_t)len;
        for (int i = 0; i < f->topics; i++)
            if (f->topic_len[i] == len && memcmp(f->text.data + f->topic_off[i], text, len) == 0) return;
        if (f->topics < KAFKA_MAX_TOPICS) {
            f->topic_off[f->topics] = off;
            f->topic_len[f->topics] = (uint32_t)len;
            f->topics++;
        }
    } else if (op == KOP_GROUP || op == KOP_KEY) {
        uint32_t *have = op == KOP_GROUP ? &f->group_len : &f->key_len;
        if (*have || len == 0) return; /* the first non-empty one */
        if (k_text_add(w, text, len, &off)) return;
        if (op == KOP_GROUP) f->group_off = off;
        else f->key_off = off;
        *have = (uint32_t)len;
    } else {
        if (k_text_add(w, text, len, &off)) return;
        f->mechanism_off = off;
        f->mechanism_len = (uint32_t)len;
        f->has_mechanism = 1;
    }
}

/* str(uuid.UUID(bytes=id)) */
static void uuid_text(const uint8_t *id, char *out) {
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) out[o++] = '-';
        out[o++] = hex[id[i] >> 4];
        out[o++] = hex[id[i] & 15];
    }
}

/* kafka._count_records */
static void k_records(kfacts_t *f, const uint8_t *data, size_t pos, size_t end) {
    f->record_bytes += end - pos;
    while (pos + 17 <= end) {
        int32_t length = sbe32(data + pos + 8);
        if (length < 0 || (uint64_t)length > end - pos - 12) return;
        size_t stop = pos + 12 + (size_t)length;
        uint8_t magic = data[pos + 16];
        if (magic == 2) {
            if (length < 49) return;
            int16_t attributes = sbe16(data + pos + 21);
            if (!(attributes & 0x20)) {
                int32_t records = sbe32(data + pos + 57);
                f->record_count += records > 0 ? (uint64_t)records : 0;
                f->codecs |= 1u << (attributes & 0x07);
            }
        } else if ((magic == 0 || magic == 1) && length >= 6) {
            f->record_count += 1;
            f->codecs |= 1u << (data[pos + 17] & 0x07);
        } else {
            return;
        }
        pos = stop;
    }
}

static int k_string(kwalker_t *w, size_t *pos, const uint8_t **text, int64_t *len) {
    if (k_length(w, pos, 0, len)) return -1;
    if (*len < 0) return 0;
    if ((uint64_t)*len > w->end - *pos) return -1;
    *text = w->data + *pos;
    *pos += (size_t)*len;
    return 0;
}

/* _Walker.walk over ops[0..count): 0 and the offset after, or -1 (w->status says why). */
static int k_walk(kwalker_t *w, const kop_t *ops, size_t count, size_t *at, int depth) {
    kfacts_t *f = w->facts;
    const uint8_t *data = w->data;
    size_t pos = *at;
    if (depth > KAFKA_MAX_DEPTH) {
        w->status = KW_ODD;
        return -1;
    }
    for (size_t i = 0; i < count; i += 1 + ops[i].span) {
        int op = ops[i].op;
        int64_t size, items;
        const uint8_t *text = NULL;
        switch (op) {
        case KOP_I32:
        case KOP_PARTITION:
            if (pos + 4 > w->end) goto short_;
            if (op == KOP_PARTITION && f->partition_count < KAFKA_MAX_PARTITIONS) {
                int32_t index = sbe32(data + pos);
                int seen = 0;
                for (int j = 0; j < f->partition_count && !seen; j++) seen = f->partitions[j] == index;
                if (!seen) f->partitions[f->partition_count++] = index;
            }
            pos += 4;
            break;
        case KOP_STRUCTS:
            if (k_count(w, &pos, 1, &items)) goto short_;
            for (int64_t j = 0; j < items; j++) {
                if (k_walk(w, ops + i + 1, ops[i].span, &pos, depth + 1)) return -1;
                if (w->compact && k_skip_tags(data, w->end, &pos)) goto short_;
            }
            break;
        case KOP_TOPIC:
        case KOP_GROUP:
        case KOP_KEY:
        case KOP_MECHANISM:
            if (k_string(w, &pos, &text, &size)) goto short_;
            if (size >= 0) {
                k_named(w, op, text, (size_t)size);
                if (w->status) return -1;
            }
            break;
        case KOP_STR:
        case KOP_BYTES:
        case KOP_RECORDS:
            if (k_length(w, &pos, op != KOP_STR, &size)) goto short_;
            if (size > 0) {
                if ((uint64_t)size > w->end - pos) goto short_;
                if (op == KOP_RECORDS) k_records(f, data, pos, pos + (size_t)size);
                pos += (size_t)size;
            }
            break;
        case KOP_ERROR: {
            if (pos + 2 > w->end) goto short_;
            int code = sbe16(data + pos);
            if (code && depth < f->error_depth) {
                f->error = code;
                f->error_depth = depth;
            }
            pos += 2;
            break;
        }
        case KOP_I16:
        case KOP_ACKS:
            if (pos + 2 > w->end) goto short_;
            if (op == KOP_ACKS) {
                f->acks = sbe16(data + pos);
                f->acks_set = 1;
            }
            pos += 2;
            break;
        case KOP_I64:
            pos += 8;
            break;
        case KOP_I8:
            pos += 1;
            break;
        case KOP_UUID:
        case KOP_TOPIC_ID:
        case KOP_NAMED_ID: {
            if (pos + 16 > w->end) goto short_;
            static const uint8_t zero[16] = {0};
            const uint8_t *id = data + pos;
            if (op != KOP_UUID && memcmp(id, zero, 16) != 0) {
                if (op == KOP_NAMED_ID) {
                    if (f->last_len && f->named_count < KAFKA_MAX_TOPIC_IDS) {
                        if (buf_put(&f->named, id, 16) || buf_put(&f->named, &f->last_off, 4) ||
                            buf_put(&f->named, &f->last_len, 4)) {
                            w->status = KW_MEMORY;
                            return -1;
                        }
                        f->named_count++;
                    }
                } else {
                    kafkaconn_t *k = w->conn;
                    const knamed_t *known = NULL;
                    for (size_t j = 0; j < k->name_count && known == NULL; j++)
                        if (memcmp(k->names[j].id, id, 16) == 0) known = &k->names[j];
                    if (known != NULL) {
                        k_named(w, KOP_TOPIC, (const uint8_t *)known->name, known->len);
                    } else {
                        char textual[36];
                        uuid_text(id, textual);
                        k_named(w, KOP_TOPIC, (const uint8_t *)textual, 36);
                    }
                    if (w->status) return -1;
                }
            }
            pos += 16;
            break;
        }
        case KOP_INTS:
        case KOP_PARTITIONS:
            if (k_count(w, &pos, 4, &items)) goto short_;
            if (op == KOP_PARTITIONS)
                for (int64_t j = 0; j < items; j++) {
                    int32_t partition = sbe32(data + pos + 4 * (size_t)j);
                    if (f->partition_count >= KAFKA_MAX_PARTITIONS) continue;
                    int seen = 0;
                    for (int p = 0; p < f->partition_count && !seen; p++) seen = f->partitions[p] == partition;
                    if (!seen) f->partitions[f->partition_count++] = partition;
                }
            if (items > 0) pos += 4 * (size_t)items;
            break;
        case KOP_LONGS:
            if (k_count(w, &pos, 8, &items)) goto short_;
            if (items > 0) pos += 8 * (size_t)items;
            break;
        case KOP_STRS:
        case KOP_TOPICS:
        case KOP_KEYS:
            if (k_count(w, &pos, 1, &items)) goto short_;
            for (int64_t j = 0; j < items; j++) {
                if (k_string(w, &pos, &text, &size)) goto short_;
                if (size >= 0 && op != KOP_STRS) {
                    k_named(w, op == KOP_TOPICS ? KOP_TOPIC : KOP_KEY, text, (size_t)size);
                    if (w->status) return -1;
                }
            }
            break;
        default:
            w->status = KW_ODD;
            return -1;
        }
        if (pos > w->end) goto short_;
    }
    *at = pos;
    return 0;
short_:
    w->status = KW_SHORT;
    return -1;
}

/* kafka.decode_body into `facts` (reset first): KW_OK, or why not. */
static int kafka_decode(kafkaconn_t *kafka, const kapi_t *api, int response, const uint8_t *body, size_t len,
                        kfacts_t *facts) {
    kfacts_reset(facts);
    kwalker_t walker = {body, len, api->compact, kafka, facts, KW_OK};
    size_t pos = 0;
    if (k_walk(&walker, api->ops[response], api->op_count[response], &pos, 0)) return walker.status;
    if (api->compact && k_skip_tags(body, len, &pos)) return KW_SHORT;
    return KW_OK;
}

/* -- the connection ------------------------------------------------------------------------ */

static int kafka_start(flow_t *flow) {
    kafkaconn_t *kafka = PyMem_Calloc(1, sizeof(kafkaconn_t));
    if (kafka == NULL) return R_MEMORY;
    flow->kafka = kafka;
    kfacts_reset(&kafka->response);
    return protocol_prefix(flow, "kafka", &kafka->prefix);
}

static int kafka_idle(const kafkaconn_t *kafka) {
    return kafka->count == 0 && kafka->frames[0].len == 0 && kafka->frames[1].len == 0;
}

/* The flow's first client chunk: would the engine's detection make it Kafka at once? */
static int kafka_claims(Express *self, flow_t *flow, const uint8_t *data, size_t len) {
    if (self->kafka_claims == NULL || len < 12) return 0;
    PyObject *answer = PyObject_CallFunction(self->kafka_claims, "y#OiOi", (const char *)data, (Py_ssize_t)len,
                                             flow->client_text, (int)flow->client_port, flow->server_text,
                                             (int)flow->server_port);
    if (answer == NULL) {
        PyErr_WriteUnraisable(self->kafka_claims);
        return 0;
    }
    int yes = PyObject_IsTrue(answer);
    Py_DECREF(answer);
    if (yes < 0) PyErr_Clear();
    return yes > 0;
}

/* KafkaParser._remember */
static int kafka_remember(kafkaconn_t *kafka, const uint8_t *id, const uint8_t *name, size_t len) {
    for (size_t i = 0; i < kafka->name_count; i++) {
        if (memcmp(kafka->names[i].id, id, 16) == 0) {
            PyMem_Free(kafka->names[i].name);
            memmove(&kafka->names[i], &kafka->names[i + 1], (kafka->name_count - i - 1) * sizeof(knamed_t));
            kafka->name_count--;
            break;
        }
    }
    if (kafka->names == NULL) {
        kafka->names = PyMem_Calloc(KAFKA_MAX_TOPIC_IDS + 1, sizeof(knamed_t));
        if (kafka->names == NULL) return -1;
    }
    char *copy = PyMem_Malloc(len ? len : 1);
    if (copy == NULL) return -1;
    memcpy(copy, name, len);
    knamed_t *entry = &kafka->names[kafka->name_count++];
    memcpy(entry->id, id, 16);
    entry->name = copy;
    entry->len = len;
    if (kafka->name_count > KAFKA_MAX_TOPIC_IDS) {
        PyMem_Free(kafka->names[0].name);
        memmove(&kafka->names[0], &kafka->names[1], (kafka->name_count - 1) * sizeof(knamed_t));
        kafka->name_count--;
    }
    kafka->names_changed = 1;
    return 0;
}

/* KafkaState.topic_names as of now, kept for a later demotion (take_snapshot). */
static int kafka_snapshot(kafkaconn_t *kafka) {
    if (!kafka->names_changed && kafka->snapshot_names != NULL) return 0;
    PyObject *names = PyTuple_New((Py_ssize_t)kafka->name_count);
    if (names == NULL) goto fail;
    for (size_t i = 0; i < kafka->name_count; i++) {
        char textual[36];
        uuid_text(kafka->names[i].id, textual);
        PyObject *pair = Py_BuildValue("(s#s#)", textual, (Py_ssize_t)36, kafka->names[i].name,
                                       (Py_ssize_t)kafka->names[i].len);
        if (pair == NULL) {
            Py_DECREF(names);
            goto fail;
        }
        PyTuple_SET_ITEM(names, (Py_ssize_t)i, pair);
    }
    Py_XSETREF(kafka->snapshot_names, names);
    kafka->names_changed = 0;
    return 0;
fail:
    PyErr_Clear();
    return -1;
}

/* The handover's "kafka" entry: KafkaState's fields besides the ordinal. */
static PyObject *kafka_state(const kafkaconn_t *kafka) {
    PyObject *names = kafka->snapshot_names != NULL ? Py_NewRef(kafka->snapshot_names) : PyTuple_New(0);
    if (names == NULL) return NULL;
    return Py_BuildValue("{sN}", "topic_names", names);
}

/* kafka._path of `facts`, into `out` */
static int kafka_path(const kfacts_t *f, buf_t *out) {
    out->len = 0;
    if (f->topics) {
        for (int i = 0; i < f->topics; i++)
            if ((i && buf_put(out, ",", 1)) || buf_put(out, f->text.data + f->topic_off[i], f->topic_len[i])) return -1;
    } else if (f->group_len) {
        if (buf_put(out, f->text.data + f->group_off, f->group_len)) return -1;
    } else if (f->key_len) {
        if (buf_put(out, f->text.data + f->key_off, f->key_len)) return -1;
    }
    if (out->len > KAFKA_MAX_PATH) { /* ASCII: characters are bytes */
        out->len = KAFKA_MAX_PATH - 3;
        if (buf_put(out, "...", 3)) return -1;
    }
    return 0;
}

/* ",".join(sorted(codecs)) as kafka._records writes them */
static int kafka_codecs(unsigned codecs, buf_t *out) {
    /* The codec names in sorted order: codec-5, codec-6, codec-7, gzip, lz4, none, snappy, zstd. */
    static const int order[8] = {5, 6, 7, 1, 3, 0, 2, 4};
    static const char *const names[8] = {"none", "gzip", "snappy", "lz4", "zstd", "codec-5", "codec-6", "codec-7"};
    out->len = 0;
    for (int i = 0; i < 8; i++) {
        if (!(codecs & (1u << order[i]))) continue;
        if ((out->len && buf_put(out, ",", 1)) || buf_put(out, names[order[i]], strlen(names[order[i]]))) return -1;
    }
    return 0;
}

static int topic_listed(const kfacts_t *f, int upto, const uint8_t *text, size_t len) {
    for (int i = 0; i < upto; i++)
        if (f->topic_len[i] == len && memcmp(f->text.data + f->topic_off[i], text, len) == 0) return 1;
    return 0;
}

/* The call of `entry` (KafkaParser._request, _response and finish_call): one way when
   `response` is NULL and `one_way`; else answered by `response` (NULL: its body not read). */
static int kafka_call(Express *self, flow_t *flow, kpending_t *entry, const kfacts_t *response, int answered,
                      int64_t response_ts, int64_t response_end_ts, int64_t response_size, PyObject *work) {
    kafkaconn_t *kafka = flow->kafka;
    const kapi_t *api = &self->kafka_apis[entry->api];
    const kfacts_t *request = &entry->facts;
    int decoded = api->has_ops[0]; /* the request's facts are on the call */
    int one_way = !answered;
    buf_t *out = &kafka->out, *sub = &kafka->sub, *list = &kafka->list;
    out->len = 0;
    if (buf_put(out, entry->head.data, entry->head.len)) return R_MEMORY;
    sub->len = 0;
    if (pb_uint(sub, 1, (uint64_t)entry->ts) || pb_uint(sub, 2, (uint64_t)entry->end_ts) ||
        pb_uint(sub, 3, (uint64_t)entry->size) || pb_message(out, 8, sub))
        return R_MEMORY;
    if (answered) {
        sub->len = 0;
        if (pb_uint(sub, 1, (uint64_t)response_ts) || pb_uint(sub, 2, (uint64_t)response_end_ts) ||
            pb_uint(sub, 3, (uint64_t)response_size) || pb_message(out, 9, sub))
            return R_MEMORY;
    }
    if (pb_bytes(out, 10, api->name, api->name_len)) return R_MEMORY;
    /* path: the request's, else (empty) the response's */
    if (decoded && kafka_path(request, list)) return R_MEMORY;
    if (!decoded) list->len = 0;
    if (list->len == 0 && response != NULL && kafka_path(response, list)) return R_MEMORY;
    if (pb_bytes(out, 11, list->data, list->len)) return R_MEMORY;
    char scratch[32];
    const char *status = response != NULL ? kafka_error_name(self, response->error, scratch, sizeof(scratch)) : NULL;
    if (status != NULL && pb_bytes(out, 12, status, strlen(status))) return R_MEMORY;
    if (answered && pb_uint(out, 13, response_ts > entry->ts ? (uint64_t)(response_ts - entry->ts) : 0))
        return R_MEMORY;
    if (pb_uint(out, 14, (response != NULL && response->error) ? 2 : 1)) return R_MEMORY;
    /* KafkaDetail */
    sub->len = 0;
    if (pb_uint(sub, 1, (uint64_t)api->key) || pb_uint(sub, 2, (uint64_t)api->version) ||
        pb_int32(sub, 3, entry->correlation) ||
        pb_bytes(sub, 4, entry->client.data, entry->client.len))
        return R_MEMORY;
    int topics = decoded ? request->topics : 0;
    for (int i = 0; i < topics; i++)
        if (pb_varint(sub, (5 << 3) | 2) || pb_varint(sub, request->topic_len[i]) ||
            buf_put(sub, request->text.data + request->topic_off[i], request->topic_len[i]))
            return R_MEMORY;
    if (response != NULL) {
        for (int i = 0; i < response->topics && topics < KAFKA_MAX_TOPICS; i++) {
            const uint8_t *text = response->text.data + response->topic_off[i];
            size_t len = response->topic_len[i];
            if (decoded && topic_listed(request, request->topics, text, len)) continue;
            if (pb_varint(sub, (5 << 3) | 2) || pb_varint(sub, len) || buf_put(sub, text, len)) return R_MEMORY;
            topics++;
        }
    }
    list->len = 0;
    int partitions = decoded ? request->partition_count : 0;
    for (int i = 0; i < partitions; i++)
        if (pb_varint(list, (uint64_t)(int64_t)request->partitions[i])) return R_MEMORY;
    if (response != NULL) {
        for (int i = 0; i < response->partition_count && partitions < KAFKA_MAX_PARTITIONS; i++) {
            int32_t partition = response->partitions[i];
            int seen = 0;
            for (int j = 0; decoded && j < request->partition_count && !seen; j++)
                seen = request->partitions[j] == partition;
            if (seen) continue;
            if (pb_varint(list, (uint64_t)(int64_t)partition)) return R_MEMORY;
            partitions++;
        }
    }
    if (pb_bytes(sub, 6, list->data, list->len)) return R_MEMORY;
    if (response != NULL && (pb_int32(sub, 7, response->error) || pb_bytes(sub, 8, status, strlen(status))))
        return R_MEMORY;
    uint64_t record_count = 0, record_bytes = 0;
    unsigned codecs = 0;
    if (decoded && request->record_bytes) {
        record_count += request->record_count;
        record_bytes += request->record_bytes;
        if (request->codecs) codecs = request->codecs;
    }
    if (response != NULL && response->record_bytes) {
        record_count += response->record_count;
        record_bytes += response->record_bytes;
        if (response->codecs) codecs = response->codecs;
    }
    if (pb_uint(sub, 9, record_count) || pb_uint(sub, 10, record_bytes) || kafka_codecs(codecs, list) ||
        pb_bytes(sub, 11, list->data, list->len))
        return R_MEMORY;
    if (decoded && request->acks_set && pb_int32(sub, 12, request->acks)) return R_MEMORY;
    if (decoded && request->group_len &&
        pb_bytes(sub, 13, request->text.data + request->group_off, request->group_len))
        return R_MEMORY;
    if (decoded && request->mechanism_len &&
        pb_bytes(sub, 14, request->text.data + request->mechanism_off, request->mechanism_len))
        return R_MEMORY;
    if (one_way && pb_uint(sub, 15, 1)) return R_MEMORY;
    if (pb_message(out, 23, sub)) return R_MEMORY;
    if (api->note[0] && pb_bytes(out, 30, api->note, strlen(api->note))) return R_MEMORY;
    if (one_way && pb_bytes(out, 30, "one-way", 7)) return R_MEMORY;
    if (pb_uint(out, 31, (uint64_t)flow->shard)) return R_MEMORY;
    PyObject *call = PyBytes_FromStringAndSize((const char *)out->data, (Py_ssize_t)out->len);
    PyObject *item = call; /* a call is its serialized bytes in the work list */
    if (item == NULL || buf_put(&flow->emitted, entry->id, 24) || PyList_Append(work, item)) {
        Py_XDECREF(item);
        PyErr_Clear();
        return R_MEMORY;
    }
    Py_DECREF(item);
    self->calls_kafka++;
    flow->exchanges++;
    return R_NONE;
}

static void kafka_release(kafkaconn_t *kafka, size_t index) {
    kpending_t *entry = kafka->pending[index];
    memmove(&kafka->pending[index], &kafka->pending[index + 1], (kafka->count - index - 1) * sizeof(kpending_t *));
    kafka->count--;
    if (kafka->spare_count < 8) kafka->spare[kafka->spare_count++] = entry;
    else kpending_free(entry);
}

static kpending_t *kafka_entry(kafkaconn_t *kafka) {
    if (kafka->spare == NULL) {
        kafka->spare = PyMem_Calloc(8, sizeof(kpending_t *));
        if (kafka->spare == NULL) return NULL;
    }
    kpending_t *entry = kafka->spare_count ? kafka->spare[--kafka->spare_count] : PyMem_Calloc(1, sizeof(kpending_t));
    if (entry == NULL) return NULL;
    entry->head.len = entry->client.len = 0;
    kfacts_reset(&entry->facts);
    return entry;
}

/* A whole request frame (KafkaParser._request for what the lane takes). */
static int kafka_request(Express *self, flow_t *flow, const uint8_t *frame, size_t len, int64_t ts, int64_t end_ts,
                         PyObject *work) {
    kafkaconn_t *kafka = flow->kafka;
    if (len < 8) return R_KAFKA;
    int16_t api_key = sbe16(frame), version = sbe16(frame + 2);
    int32_t correlation = sbe32(frame + 4);
    if (api_key < 0 || version < 0) return R_KAFKA;
    long index = kafka_api_get(self, api_key, version);
    if (index < 0) return R_CALLBACK;
    const kapi_t *api = &self->kafka_apis[index];
    if (api->refused) return R_KAFKA;
    size_t pos = 8;
    const uint8_t *client = NULL;
    size_t client_len = 0;
    if (api->request_header >= 1) {
        if (len < 10) return R_KAFKA;
        int16_t size = sbe16(frame + 8);
        pos = 10;
        if (size >= 0) {
            if (pos + (size_t)size > len) return R_KAFKA;
            client = frame + pos;
            client_len = (size_t)size < KAFKA_MAX_CLIENT_ID ? (size_t)size : KAFKA_MAX_CLIENT_ID;
            if (!k_ascii(client, client_len)) return R_KAFKA;
            pos += (size_t)size;
        }
        if (api->request_header == 2 && k_skip_tags(frame, len, &pos)) return R_KAFKA;
    }
    kpending_t *entry = kafka_entry(kafka);
    if (entry == NULL) return R_MEMORY;
    int reason = R_NONE;
    if (api->has_ops[0]) {
        int decoded = kafka_decode(kafka, api, 0, frame + pos, len - pos, &entry->facts);
        if (decoded) reason = decoded == KW_MEMORY ? R_MEMORY : R_KAFKA;
    }
    int one_way = reason == R_NONE && api_key == 0 && api->has_ops[0] && entry->facts.acks_set &&
                  entry->facts.acks == 0;
    if (reason == R_NONE && !one_way) {
        for (size_t i = 0; i < kafka->count && reason == R_NONE; i++)
            if (kafka->pending[i]->correlation == correlation) reason = R_KAFKA; /* correlation-id-reused */
        if (reason == R_NONE &&
            (kafka->count >= KAFKA_MAX_PENDING || (Py_ssize_t)kafka->count >= self->max_pending_requests))
            reason = R_LIMIT;
    }
    if (reason == R_NONE && buf_put(&entry->client, client, client_len)) reason = R_MEMORY;
    if (reason == R_NONE) {
        entry->correlation = correlation;
        entry->api = (size_t)index;
        entry->ordinal = flow->ordinal;
        entry->ts = ts;
        entry->end_ts = end_ts;
        entry->size = (int64_t)len + 4;
        if (put_call_head(&entry->head, &kafka->sub, flow, kafka->prefix, "kafka", "tcp", ts, entry->ordinal,
                          entry->id))
            reason = R_MEMORY;
    }
    if (reason == R_NONE) {
        flow->ordinal++;
        if (one_way) {
            reason = kafka_call(self, flow, entry, NULL, 0, 0, 0, 0, work);
        } else {
            if (kafka->count == kafka->cap) {
                size_t cap = kafka->cap ? kafka->cap * 2 : 8;
                kpending_t **ring = PyMem_Realloc(kafka->pending, cap * sizeof(kpending_t *));
                if (ring == NULL) {
                    kpending_free(entry);
                    return R_MEMORY;
                }
                kafka->pending = ring;
                kafka->cap = cap;
            }
            kafka->pending[kafka->count++] = entry;
            return R_NONE;
        }
    }
    if (kafka->spare_count < 8) kafka->spare[kafka->spare_count++] = entry;
    else kpending_free(entry);
    return reason;
}

/* A whole response frame (KafkaParser._response for what the lane takes). */
static int kafka_response(Express *self, flow_t *flow, const uint8_t *frame, size_t len, int64_t ts, int64_t end_ts,
                          PyObject *work) {
    kafkaconn_t *kafka = flow->kafka;
    if (len < 4) return R_KAFKA;
    int32_t correlation = sbe32(frame);
    size_t index = kafka->count;
    for (size_t i = 0; i < kafka->count && index == kafka->count; i++)
        if (kafka->pending[i]->correlation == correlation) index = i;
    if (index == kafka->count) return R_KAFKA; /* kafka_unmatched_responses: Python's to count */
    kpending_t *entry = kafka->pending[index];
    const kapi_t *api = &self->kafka_apis[entry->api];
    size_t start = 4;
    if (api->response_header == 1 && k_skip_tags(frame, len, &start)) return R_KAFKA;
    const kfacts_t *facts = NULL;
    if (api->has_ops[1]) {
        int decoded = kafka_decode(kafka, api, 1, frame + start, len - start, &kafka->response);
        if (decoded) return decoded == KW_MEMORY ? R_MEMORY : R_KAFKA;
        facts = &kafka->response;
    }
    int reason = kafka_call(self, flow, entry, facts, 1, ts, end_ts, (int64_t)len + 4, work);
    if (reason) return reason;
    if (facts != NULL) {
        const uint8_t *named = facts->named.data;
        for (int i = 0; i < facts->named_count; i++, named += 24) {
            uint32_t off, name_len;
            memcpy(&off, named + 16, 4);
            memcpy(&name_len, named + 20, 4);
            if (kafka_remember(kafka, named, facts->text.data + off, name_len)) return R_MEMORY;
        }
    }
    kafka_release(kafka, index);
    return R_NONE;
}

static int kafka_frame(Express *self, flow_t *flow, int dir, const uint8_t *frame, size_t len, int64_t ts,
                       int64_t end_ts, PyObject *work) {
    return dir == 0 ? kafka_request(self, flow, frame, len, ts, end_ts, work)
                    : kafka_response(self, flow, frame, len, ts, end_ts, work);
}

/* In-order payload of one direction of a Kafka flow (KafkaParser.feed). */
static int kafka_data(Express *self, flow_t *flow, int dir, const uint8_t *data, size_t len, int64_t ts,
                      PyObject *work) {
    kafkaconn_t *kafka = flow->kafka;
    buf_t *buffer = &kafka->frames[dir];
    size_t keep = self->max_body_bytes > 64 ? (size_t)self->max_body_bytes : 64;
    size_t pos = 0;
    while (pos < len) {
        if (buffer->len == 0) {
            kafka->frame_ts[dir] = ts;
            if (pos + 4 <= len) {
                int32_t length = sbe32(data + pos);
                if (length < 0 || length > KAFKA_MAX_FRAME) return R_KAFKA; /* a ProtocolError in Python */
                if ((size_t)length > keep) return R_LIMIT;                    /* truncated in Python */
                if ((size_t)length <= len - pos - 4) {
                    int reason = kafka_frame(self, flow, dir, data + pos + 4, (size_t)length, ts, ts, work);
                    if (reason) return reason;
                    pos += 4 + (size_t)length;
                    continue;
                }
            }
        }
        if (buffer->len < 4) {
            size_t take = 4 - buffer->len < len - pos ? 4 - buffer->len : len - pos;
            if (buf_put(buffer, data + pos, take)) return R_MEMORY;
            pos += take;
            if (buffer->len < 4) break;
            int32_t length = sbe32(buffer->data);
            if (length < 0 || length > KAFKA_MAX_FRAME) return R_KAFKA;
            if ((size_t)length > keep) return R_LIMIT;
        }
        size_t length = (size_t)sbe32(buffer->data);
        size_t take = length + 4 - buffer->len < len - pos ? length + 4 - buffer->len : len - pos;
        if (buf_put(buffer, data + pos, take)) return R_MEMORY;
        pos += take;
        if (buffer->len == length + 4) {
            buffer->len = 0; /* the bytes stay in place until the next frame begins */
            int reason = kafka_frame(self, flow, dir, buffer->data + 4, length, kafka->frame_ts[dir], ts, work);
            if (reason) return reason;
        }
    }
    return R_NONE;
}
