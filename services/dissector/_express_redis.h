/*
 * The compiled lane's Redis part, included by _express.c (after its HTTP/1 and HTTP/2 parts,
 * whose flows, caches and ApiCall writers it shares).
 *
 * Why: the Python path (protocols/redis.py) dissects about 59,000 pipelined redis-benchmark
 * commands/s here, 0.3x tshark, where issue #10 asks for 100,000 and 10x. This part takes the
 * common case in C by the lane's rule (_express.c's header): protocols/redis.py stays the
 * reference, and a flow is held only while this code is certain to make exactly its calls.
 *
 * RESP is read by libhiredis's reader (Debian's libhiredis-dev, the C library hiredis-py wraps;
 * no RESP parser is written here), with reply-object functions that build no objects: they
 * record what a call needs (the first MAX_ARGS arguments of a command, each cut at
 * MAX_ARG_BYTES; the top-level type; an error's text) and the message's least RESP encoding
 * (a bulk string `$<len>\r\n<bytes>\r\n`, an integer in plain digits...). A message's size is
 * what the reader consumed for it (bytes fed less what its buffer still holds: exact, however
 * the reader compacts); a message whose size differs from its least encoding (a length with a
 * leading zero or a sign, which this older hiredis accepts and hiredis-py's refuses) demotes,
 * so every message taken is one both readers read alike.
 *
 * What is held: a connection whose client's first bytes are a command array (`*<n>\r\n$<d>`,
 * what redis.probe scores 3), RESP2 both ways, every client message an array of bulk strings
 * whose arguments' first MAX_ARG_BYTES are ASCII, every reply a simple string, error, integer,
 * bulk string, nil or array, paired in order (pipelining). Commands are asked of
 * redis.lane_rule once per name (cached): it refuses those with effects on the connection the
 * Python path tracks (SELECT, HELLO, RESET, MULTI/EXEC/DISCARD, pub/sub, CLIENT REPLY,
 * MONITOR, SYNC/PSYNC) or credentials in their arguments (AUTH, MIGRATE, CONFIG SET, ACL
 * SETUSER), and answers where the first key is for the rest. Anything else (inline commands,
 * RESP3, a reply with nothing pending, a key with '?' or '@' that the Redactor would read as a
 * URL, more pending commands than max_pending_requests or REDIS_MAX_PENDING) demotes the flow
 * ("redis" reason, or the shared ones). Calls are sent as their replies come, and a replay in
 * Python after a demotion drops them by id (flow->emitted), as for HTTP/2; the state at a
 * quiescent point (nothing pending, both readers between messages) is RedisState's ordinal, the
 * rest being a fresh connection's.
 */
#include <hiredis/read.h>

#define REDIS_MAX_ARGS 16       /* redis.MAX_ARGS */
#define REDIS_MAX_ARG_BYTES 128 /* redis.MAX_ARG_BYTES */
#define REDIS_MAX_PENDING 1024
#define REDIS_RULE_CONTAINER -2
#define REDIS_RULE_REFUSED -1

/* What the reader's object functions record of the message being read. */
typedef struct {
    int client;
    uint64_t least;      /* the least RESP encoding's size */
    int top;             /* REDIS_REPLY_* of the top level, 0 before it */
    int64_t elements;    /* a top-level array's elements */
    int odd;             /* something the lane does not take (a command element not a bulk string) */
    int truncated;       /* a kept argument was cut, or there were more than REDIS_MAX_ARGS */
    uint32_t arg_off[REDIS_MAX_ARGS], arg_len[REDIS_MAX_ARGS];
    int args;            /* arguments recorded */
    buf_t kept;          /* their first bytes, one after the other; or an error's text */
} redis_message_t;

typedef struct {
    redisReader *reader;
    int64_t fed;         /* bytes fed since the flow began */
    int64_t consumed;    /* bytes consumed by the messages completed so far */
    int started;         /* the current message's first byte has come */
    uint8_t first;       /* that byte (a reply's RESP type) */
    int64_t start_ts;    /* the chunk it came in */
    redis_message_t message;
} redis_side_t;

/* A command waiting for its reply: the call as far as the command makes it. */
typedef struct {
    int64_t ordinal, ts, end_ts, size, depth, arg_count;
    char id[24];
    int truncated;
    buf_t head;   /* ApiCall fields 1-7 */
    buf_t names;  /* fields 10 (method) and 11 (path) */
    buf_t args;   /* RedisDetail.args */
} redis_pending_t;

typedef struct redisconn_s {
    redis_side_t sides[2];
    redis_pending_t *pending; /* a ring of `cap` */
    size_t first, count, cap;
    PyObject *prefix; /* the call-id hash input's start, protocol "redis" */
    buf_t out, sub;
} redisconn_t;

static char redis_object; /* what the object functions return: hiredis only needs non-NULL */

static size_t decimal_digits(uint64_t value) {
    size_t digits = 1;
    while (value >= 10) {
        value /= 10;
        digits++;
    }
    return digits;
}

static redis_message_t *message_of(const redisReadTask *task) { return (redis_message_t *)task->privdata; }

static void *redis_string(const redisReadTask *task, char *text, size_t len) {
    redis_message_t *m = message_of(task);
    if (task->type == REDIS_REPLY_STRING) m->least += 5 + decimal_digits(len) + len;
    else m->least += 3 + len; /* +status or -error */
    if (task->parent == NULL) {
        m->top = task->type;
        if (m->client) m->odd = 1; /* a command is an array */
        if (task->type == REDIS_REPLY_ERROR) {
            m->kept.len = 0;
            if (buf_put(&m->kept, text, len)) m->odd = 1;
        }
        return &redis_object;
    }
    if (!m->client) return &redis_object;
    if (task->type != REDIS_REPLY_STRING || task->parent->parent != NULL) {
        m->odd = 1;
        return &redis_object;
    }
    if (task->idx >= REDIS_MAX_ARGS) {
        m->truncated = 1;
        return &redis_object;
    }
    size_t keep = len > REDIS_MAX_ARG_BYTES ? REDIS_MAX_ARG_BYTES : len;
    if (len > REDIS_MAX_ARG_BYTES) m->truncated = 1;
    m->arg_off[task->idx] = (uint32_t)m->kept.len;
    m->arg_len[task->idx] = (uint32_t)keep;
    if (buf_put(&m->kept, text, keep)) m->odd = 1;
    if (task->idx + 1 > m->args) m->args = task->idx + 1;
    return &redis_object;
}

static void *redis_array(const redisReadTask *task, int elements) {
    redis_message_t *m = message_of(task);
    m->least += 3 + decimal_digits((uint64_t)(elements < 0 ? 0 : elements));
    if (task->parent == NULL) {
        m->top = REDIS_REPLY_ARRAY;
        m->elements = elements;
    } else if (m->client) {
        m->odd = 1;
    }
    return &redis_object;
}

static void *redis_integer(const redisReadTask *task, long long value) {
    redis_message_t *m = message_of(task);
    uint64_t magnitude = value < 0 ? (uint64_t)(-(value + 1)) + 1 : (uint64_t)value;
    m->least += 3 + decimal_digits(magnitude) + (value < 0);
    if (task->parent == NULL) m->top = REDIS_REPLY_INTEGER;
    if (m->client) m->odd = 1;
    return &redis_object;
}

static void *redis_nil(const redisReadTask *task) {
    redis_message_t *m = message_of(task);
    m->least += 5; /* `$-1` or `*-1` */
    if (task->parent == NULL) m->top = REDIS_REPLY_NIL;
    if (m->client) m->odd = 1;
    return &redis_object;
}

static void redis_free_object(void *object) { (void)object; }

static redisReplyObjectFunctions redis_functions = {redis_string, redis_array, redis_integer, redis_nil,
                                                    redis_free_object};

static void redis_message_reset(redis_message_t *m) {
    m->least = 0;
    m->top = 0;
    m->elements = 0;
    m->odd = m->truncated = 0;
    m->args = 0;
    m->kept.len = 0;
}

static void redisconn_free(redisconn_t *redis) {
    if (redis == NULL) return;
    for (int d = 0; d < 2; d++) {
        if (redis->sides[d].reader != NULL) redisReaderFree(redis->sides[d].reader);
        buf_free(&redis->sides[d].message.kept);
    }
    for (size_t i = 0; i < redis->cap; i++) {
        buf_free(&redis->pending[i].head);
        buf_free(&redis->pending[i].names);
        buf_free(&redis->pending[i].args);
    }
    PyMem_Free(redis->pending);
    Py_XDECREF(redis->prefix);
    buf_free(&redis->out);
    buf_free(&redis->sub);
    PyMem_Free(redis);
}

/* `*<1-9><0-9>{0,6}\r\n$<0-9>` at the start: redis._COMMAND_ARRAY, what redis.probe scores 3. */
static int redis_command_start(const uint8_t *data, size_t len) {
    if (len < 6 || data[0] != '*' || data[1] < '1' || data[1] > '9') return 0;
    size_t i = 2;
    while (i < len && i < 9 && data[i] >= '0' && data[i] <= '9') i++;
    return i + 3 < len && data[i] == '\r' && data[i + 1] == '\n' && data[i + 2] == '$' && data[i + 3] >= '0' &&
           data[i + 3] <= '9';
}

static int redis_start(flow_t *flow) {
    redisconn_t *redis = PyMem_Calloc(1, sizeof(redisconn_t));
    if (redis == NULL) return R_MEMORY;
    flow->redis = redis;
    for (int d = 0; d < 2; d++) {
        redis_side_t *side = &redis->sides[d];
        side->message.client = d == 0;
        side->reader = redisReaderCreateWithFunctions(&redis_functions);
        if (side->reader == NULL) return R_MEMORY;
        side->reader->privdata = &side->message;
    }
    return protocol_prefix(flow, "redis", &redis->prefix);
}

static int redis_side_idle(const redis_side_t *side) {
    return !side->started && side->reader->len == side->reader->pos && side->reader->ridx == -1;
}

static int redis_idle(const redisconn_t *redis) {
    return redis->count == 0 && redis_side_idle(&redis->sides[0]) && redis_side_idle(&redis->sides[1]);
}

/* redis.lane_rule(method), cached: REDIS_RULE_CONTAINER, REDIS_RULE_REFUSED, or the index of
   the first key (0: none); -3 when the callback failed. */
static int redis_rule(Express *self, const char *method, size_t len) {
    uint64_t hash = hash_bytes((const uint8_t *)method, len);
    int cached = cache_get(&self->redis_rules, (const uint8_t *)method, len, hash);
    if (cached >= 0) return cached - 3;
    PyObject *text = PyUnicode_DecodeASCII(method, (Py_ssize_t)len, NULL);
    PyObject *answer = text ? PyObject_CallOneArg(self->redis_rule, text) : NULL;
    Py_XDECREF(text);
    long rule = answer ? PyLong_AsLong(answer) : -4;
    Py_XDECREF(answer);
    if (rule < -2 || rule > 1000) {
        if (PyErr_Occurred()) PyErr_WriteUnraisable(self->redis_rule);
        return -3;
    }
    cache_put(&self->redis_rules, (const uint8_t *)method, len, hash, (int)rule + 3);
    return (int)rule;
}

/* Upper-case ASCII `text` into `out` after `at`; 0 when a byte is not printable ASCII. */
static int upper_ascii(char *out, size_t at, const uint8_t *text, size_t len) {
    for (size_t i = 0; i < len; i++) {
        uint8_t c = text[i];
        if (c < 0x20 || c > 0x7E) return 0;
        out[at + i] = (char)(c >= 'a' && c <= 'z' ? c - 32 : c);
    }
    return 1;
}

static int ascii_text(const uint8_t *text, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (text[i] >= 0x80) return 0;
    return 1;
}

/* A whole command (redis.RedisParser._command for a command the lane takes). */
static int redis_command(Express *self, flow_t *flow, redis_side_t *side, int64_t size, int64_t ts) {
    redisconn_t *redis = flow->redis;
    redis_message_t *m = &side->message;
    if (m->odd || m->top != REDIS_REPLY_ARRAY || m->elements < 1 || m->args < 1) return R_REDIS;
    const uint8_t *kept = m->kept.data;
    char method[2 * REDIS_MAX_ARG_BYTES + 2];
    size_t name_len = m->arg_len[0], method_len = name_len;
    if (!upper_ascii(method, 0, kept + m->arg_off[0], name_len)) return R_REDIS;
    int rule = redis_rule(self, method, name_len);
    if (rule == REDIS_RULE_CONTAINER) {
        method[name_len] = ' ';
        method_len = name_len + 1;
        if (m->elements > 1) {
            if (!upper_ascii(method, name_len + 1, kept + m->arg_off[1], m->arg_len[1])) return R_REDIS;
            method_len += m->arg_len[1];
        }
        rule = redis_rule(self, method, method_len);
        if (m->elements == 1) method_len = name_len; /* no subcommand: the method is the name */
    }
    if (rule == -3) return R_CALLBACK;
    if (rule < 0) return R_REDIS;
    const uint8_t *path = NULL;
    size_t path_len = 0;
    if (rule > 0 && rule < m->elements) {
        if (rule >= REDIS_MAX_ARGS) return R_REDIS;
        path = kept + m->arg_off[rule];
        path_len = m->arg_len[rule];
        if (memchr(path, '?', path_len) || memchr(path, '@', path_len)) return R_URL;
    }
    if (!ascii_text(kept, m->kept.len)) return R_REDIS;
    if (redis->count >= REDIS_MAX_PENDING || (Py_ssize_t)redis->count >= self->max_pending_requests) return R_LIMIT;
    if (redis->count == redis->cap) {
        size_t cap = redis->cap ? redis->cap * 2 : 32;
        redis_pending_t *ring = PyMem_Calloc(cap, sizeof(redis_pending_t));
        if (ring == NULL) return R_MEMORY;
        for (size_t i = 0; i < redis->count; i++) ring[i] = redis->pending[(redis->first + i) % redis->cap];
        for (size_t i = redis->count; i < redis->cap; i++) ring[i] = redis->pending[(redis->first + i) % redis->cap];
        PyMem_Free(redis->pending);
        redis->pending = ring;
        redis->first = 0;
        redis->cap = cap;
    }
    redis_pending_t *entry = &redis->pending[(redis->first + redis->count) % redis->cap];
    entry->ordinal = flow->ordinal;
    entry->ts = side->start_ts;
    entry->end_ts = ts;
    entry->size = size;
    entry->depth = (int64_t)redis->count;
    entry->arg_count = m->elements;
    entry->truncated = m->truncated || m->elements > REDIS_MAX_ARGS;
    entry->head.len = entry->names.len = entry->args.len = 0;
    redis->sub.len = 0;
    if (put_call_head(&entry->head, &redis->sub, flow, redis->prefix, "redis", "tcp", entry->ts, entry->ordinal,
                      entry->id) ||
        pb_bytes(&entry->names, 10, method, method_len) || pb_bytes(&entry->names, 11, path, path_len))
        return R_MEMORY;
    for (int i = 0; i < m->args; i++) {
        /* A repeated string: every element written, the empty one too. */
        if (pb_varint(&entry->args, (1 << 3) | 2) || pb_varint(&entry->args, m->arg_len[i]) ||
            buf_put(&entry->args, kept + m->arg_off[i], m->arg_len[i]))
            return R_MEMORY;
    }
    flow->ordinal++;
    redis->count++;
    return R_NONE;
}

/* A whole reply: the oldest pending command's call (redis.RedisParser._reply and _answer). */
static int redis_reply(Express *self, flow_t *flow, redis_side_t *side, int64_t size, int64_t ts, uint8_t first,
                       PyObject *work) {
    redisconn_t *redis = flow->redis;
    redis_message_t *m = &side->message;
    if (m->odd || m->top == 0) return R_REDIS;
    if (redis->count == 0) return R_REDIS; /* Python counts an unpaired reply */
    redis_pending_t *entry = &redis->pending[redis->first];
    const char *status = "ok", *type = "simple";
    size_t status_len = 2;
    int error = 0;
    switch (first) {
    case '+':
        type = "simple";
        break;
    case '-':
        type = "error";
        break;
    case ':':
        type = "integer";
        break;
    case '$':
        type = "bulk";
        break;
    case '*':
        type = "array";
        break;
    default:
        return R_REDIS;
    }
    if (m->top == REDIS_REPLY_NIL) {
        status = type = "nil";
        status_len = 3;
    } else if (m->top == REDIS_REPLY_ERROR) {
        /* redis._error_prefix: the first word of the text, ERR when there is none. */
        const uint8_t *text = m->kept.data;
        size_t len = m->kept.len;
        if (!ascii_text(text, len)) return R_REDIS;
        const uint8_t *space = len ? memchr(text, ' ', len) : NULL;
        status_len = space ? (size_t)(space - text) : len;
        status = status_len ? (const char *)text : "ERR";
        if (!status_len) status_len = 3;
        error = 1;
    }
    int64_t reply_ts = side->start_ts;
    buf_t *out = &redis->out, *sub = &redis->sub;
    out->len = 0;
    if (buf_put(out, entry->head.data, entry->head.len)) return R_MEMORY;
    sub->len = 0;
    if (pb_uint(sub, 1, (uint64_t)entry->ts) || pb_uint(sub, 2, (uint64_t)entry->end_ts) ||
        pb_uint(sub, 3, (uint64_t)entry->size) || pb_message(out, 8, sub))
        return R_MEMORY;
    sub->len = 0;
    if (pb_uint(sub, 1, (uint64_t)reply_ts) || pb_uint(sub, 2, (uint64_t)ts) || pb_uint(sub, 3, (uint64_t)size) ||
        pb_message(out, 9, sub) || buf_put(out, entry->names.data, entry->names.len) ||
        pb_bytes(out, 12, status, status_len) ||
        pb_uint(out, 13, reply_ts > entry->ts ? (uint64_t)(reply_ts - entry->ts) : 0) || pb_uint(out, 14, error ? 2 : 1))
        return R_MEMORY;
    sub->len = 0;
    if (buf_put(sub, entry->args.data, entry->args.len) || pb_uint(sub, 3, 2) || pb_bytes(sub, 4, type, strlen(type)) ||
        pb_uint(sub, 5, (uint64_t)entry->arg_count) || pb_uint(sub, 6, (uint64_t)entry->depth) ||
        pb_message(out, 25, sub) || (entry->truncated && pb_bytes(out, 30, "args-truncated", 14)) ||
        pb_uint(out, 31, (uint64_t)flow->shard))
        return R_MEMORY;
    PyObject *call = PyBytes_FromStringAndSize((const char *)out->data, (Py_ssize_t)out->len);
    PyObject *item = call; /* a call is its serialized bytes in the work list */
    if (item == NULL || buf_put(&flow->emitted, entry->id, 24) || PyList_Append(work, item)) {
        Py_XDECREF(item);
        PyErr_Clear();
        return R_MEMORY;
    }
    Py_DECREF(item);
    redis->first = (redis->first + 1) % redis->cap;
    redis->count--;
    self->calls_redis++;
    flow->exchanges++;
    return R_NONE;
}

/* In-order payload of one direction of a Redis flow. */
static int redis_data(Express *self, flow_t *flow, int dir, const uint8_t *data, size_t len, int64_t ts,
                      PyObject *work) {
    redis_side_t *side = &flow->redis->sides[dir];
    redisReader *reader = side->reader;
    if (redisReaderFeed(reader, (const char *)data, len) != REDIS_OK) return R_MEMORY;
    side->fed += (int64_t)len;
    for (;;) {
        size_t left = reader->len - reader->pos;
        if (!side->started) {
            if (left == 0) break;
            /* A message's first byte: a command array from the client (an inline command is
               Python's), a RESP2 type byte from the server (hiredis refuses the others). */
            uint8_t first = (uint8_t)reader->buf[reader->pos];
            if (dir == 0 ? first != '*' : memchr("+-:$*", first, 5) == NULL) return R_REDIS;
            side->started = 1;
            side->first = first;
            side->start_ts = ts;
            redis_message_reset(&side->message);
        }
        void *reply = NULL;
        if (redisReaderGetReply(reader, &reply) != REDIS_OK) return R_REDIS;
        if (reply == NULL) break; /* the message goes on in a later segment */
        int64_t consumed = side->fed - (int64_t)(reader->len - reader->pos);
        int64_t size = consumed - side->consumed;
        side->consumed = consumed;
        side->started = 0;
        if ((uint64_t)size != side->message.least) return R_REDIS; /* not its least encoding */
        int reason = dir == 0 ? redis_command(self, flow, side, size, ts)
                              : redis_reply(self, flow, side, size, ts, side->first, work);
        if (reason) return reason;
    }
    if (reader->len - reader->pos > (size_t)self->max_retained_bytes) return R_LIMIT;
    return R_NONE;
}
