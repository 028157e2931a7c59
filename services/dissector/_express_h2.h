/*
 * The compiled lane's HTTP/2 + gRPC part, included by _express.c (after its HTTP/1 part, whose
 * flows, heads, redaction caches, trace context and ApiCall writers it shares).
 *
 * Why: the Python path (protocols/http2.py, grpc.py, protobuf.py, calls.py, redact.py) dissects
 * about 16,000 grpcio unary calls/s on this machine (60 us per call: frames, hpack's decoding,
 * the message reader, the schemaless JSON text, the record, the redaction), and issue #9 asks
 * for 50,000 and 10x tshark. This part does the common case in C, by the lane's one rule
 * (_express.c's header): Python stays the reference and a flow is held only while this code is
 * certain to produce exactly what Python would; anything else demotes it to its last quiescent
 * point (no stream open, both directions at a frame boundary), from which Python's
 * Http2Parser.restore(Http2State) goes on (express.py).
 *
 * What is held: a connection opened by prior knowledge (the client's first payload starts with
 * the whole preface) whose frames are DATA (no padding), HEADERS (END_HEADERS set, no padding,
 * no priority fields: one frame per block), SETTINGS, PING, WINDOW_UPDATE, PRIORITY and
 * extension frames (skipped as Python skips them); every stream a gRPC call with the proto
 * codec (`application/grpc` or `application/grpc+proto`), uncompressed messages each direction,
 * a numeric grpc-status in the trailers or a Trailers-Only response, ended by END_STREAM both
 * ways. Header blocks are decoded by libnghttp2's HPACK inflater (one per direction, its table
 * raised by SETTINGS_HEADER_TABLE_SIZE as http2.py raises hpack's; never lowered); fields are
 * kept in the HTTP/1 part's head_t so that its redaction (header kinds), trace context and
 * header writers serve both. The first message of each direction is written as JSON text by
 * _pbjson.h (protobuf.py's schemaless text) and checked for secret keys exactly as
 * Redactor._json_bytes looks for them (redact.JSON_KEY).
 *
 * What demotes (reasons "http2", "http2_stream", "grpc", and the shared ones): RST_STREAM,
 * GOAWAY, PUSH_PROMISE, CONTINUATION, padding, priority fields, a frame over the receiver's max
 * frame size, a malformed control frame, a frame on a stream not open here, client trailers,
 * 1xx, a second trailers block, a header block HPACK refuses or over the bounds, header bytes
 * outside printable ASCII (or with surrounding whitespace, or upper case names), a repeated
 * header the call reads, content-encoding, grpc-trace-bin, a non-gRPC stream or another codec, a
 * compressed or incomplete message, a first message over max_body_bytes, a grpc-status missing
 * or not a number, a percent-escape in grpc-message, a malformed grpc-timeout, a JSON text over
 * its bound or with a secret-named key, more open streams than H2_MAX_STREAMS or
 * max_pending_requests, more finished calls than H2_MAX_HELD waiting for a quiescent point.
 *
 * Calls finished while other streams are open are held until the connection is quiescent (a
 * demotion before then replays them in Python, so they must not have left): a connection of
 * one call at a time, grpcio's unary calls, lets each call leave with its last packet.
 *
 * The state at a quiescent point, Http2State's fields: the call ordinal, both HPACK dynamic
 * tables (entries copied out of the inflaters, newest first), their current and allowed
 * maximum sizes, both directions' max frame sizes, the SETTINGS each side sent, the client's
 * last stream id. The tables are copied at every quiescent point (at most 4 KiB each unless a
 * peer raised them): cheaper than telling whether a block inserted an entry.
 */
#include <nghttp2/nghttp2.h>

#define H2_PREFACE "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#define H2_PREFACE_LEN 24
#define H2_MAX_STREAMS 64
#define H2_MAX_HELD 256
#define H2_MAX_SETTINGS 32
#define H2_TABLE_CAP 65536 /* http2.TABLE_CAP */
#define H2_DEFAULT_TABLE 4096
#define H2_DEFAULT_MAX_FRAME 16384
#define H2_LARGEST_FRAME 16777215
#define H2_HARD_BLOCK_FACTOR 4 /* http2.HARD_BLOCK_FACTOR */
#define H2_MAX_CONTROL_FRAME 65536 /* http2.MAX_CONTROL_FRAME */
#define H2_STATIC_ENTRIES 61
/* A snapshot is taken at every frame boundary with no stream open, and with streams open once
   this many bytes of packets wait for a replay (copying the open streams costs a few us: a busy
   connection with calls always in flight pays it once per this many bytes). */
#define H2_SNAPSHOT_BYTES 65536
#define GRPC_MAX_MESSAGE_LENGTH 2147483647ULL

enum { H2_DATA, H2_HEADERS, H2_PRIORITY, H2_RST_STREAM, H2_SETTINGS, H2_PUSH_PROMISE, H2_PING, H2_GOAWAY,
       H2_WINDOW_UPDATE, H2_CONTINUATION };
#define H2_END_STREAM 0x01
#define H2_ACK 0x01
#define H2_END_HEADERS 0x04
#define H2_PADDED 0x08
#define H2_PRIORITY_FLAG 0x20
#define H2_SETTINGS_HEADER_TABLE_SIZE 1
#define H2_SETTINGS_MAX_FRAME_SIZE 5

/* One direction's gRPC messages (grpc.MessageStream for the uncompressed case). */
typedef struct {
    uint8_t prefix[5];
    uint32_t prefix_len;
    int in_message, collecting, first_done;
    uint64_t remaining, length;
    int64_t messages, message_bytes;
    buf_t first; /* the first message, once first_done */
} grpc_reader_t;

enum { H2_REQUEST, H2_RESPONSE, H2_TRAILERS };

/* One stream (http2.H2Stream for what the held subset needs). */
typedef struct {
    uint32_t id;
    int64_t ordinal;
    head_t heads[3];
    int response_started, trailers_seen;
    int end_stream[2];
    buf_t bodies[2];
    int64_t data_bytes[2], first_ts[2], last_ts[2], wire[2], frames[2], header_bytes[2];
    grpc_reader_t grpc[2];
} h2_stream_t;

typedef struct {
    uint32_t id, value;
} h2_setting_t;

/* What Http2State needs beyond the TCP snapshot, as of the last quiescent point. */
typedef struct {
    buf_t tables[2]; /* entries newest first: u32 name length, name, u32 value length, value */
    size_t entries[2], max_size[2], allowed[2];
    uint32_t max_frame[2];
    h2_setting_t settings[2][H2_MAX_SETTINGS];
    int settings_count[2];
    uint32_t last_client_id;
    h2_stream_t *streams[H2_MAX_STREAMS]; /* copies of the streams open then, oldest first */
    int stream_count;
} h2_snapshot_t;

typedef struct h2conn_s {
    int preface_pending; /* the server spoke first (its SETTINGS): the client's preface is still to come */
    nghttp2_hd_inflater *inflater[2]; /* [0] reads the client's blocks */
    size_t allowed[2];                /* each inflater's allowed table size (hpack's max_allowed_table_size) */
    uint32_t max_frame[2];            /* the largest frame each direction may carry */
    h2_setting_t settings[2][H2_MAX_SETTINGS]; /* what each side sent, first appearance order */
    int settings_count[2];
    uint32_t last_client_id;
    buf_t pending[2];      /* a frame not yet whole, per direction */
    int64_t header_ts[2];  /* when that frame's 9-byte header was whole */
    h2_stream_t *open[H2_MAX_STREAMS];
    int open_count;
    h2_stream_t *spare[H2_MAX_STREAMS]; /* finished streams kept for reuse (their buffers) */
    int spare_count;
    PyObject *prefix; /* the call-id hash input's start, protocol "grpc" */
    buf_t scratch, sub, text[2]; /* text: each direction's first message as JSON */
    h2_snapshot_t snapshot;
} h2conn_t;

static void grpc_reader_free(grpc_reader_t *reader) { buf_free(&reader->first); }

static void h2_stream_free(h2_stream_t *stream) {
    if (stream == NULL) return;
    for (int i = 0; i < 3; i++) head_free(&stream->heads[i]);
    for (int d = 0; d < 2; d++) {
        buf_free(&stream->bodies[d]);
        grpc_reader_free(&stream->grpc[d]);
    }
    PyMem_Free(stream);
}

static void h2conn_free(h2conn_t *h2) {
    if (h2 == NULL) return;
    for (int d = 0; d < 2; d++) {
        if (h2->inflater[d] != NULL) nghttp2_hd_inflate_del(h2->inflater[d]);
        buf_free(&h2->pending[d]);
        buf_free(&h2->snapshot.tables[d]);
    }
    for (int i = 0; i < h2->open_count; i++) h2_stream_free(h2->open[i]);
    for (int i = 0; i < h2->snapshot.stream_count; i++) h2_stream_free(h2->snapshot.streams[i]);
    for (int i = 0; i < h2->spare_count; i++) h2_stream_free(h2->spare[i]);
    Py_XDECREF(h2->prefix);
    buf_free(&h2->scratch);
    buf_free(&h2->sub);
    buf_free(&h2->text[0]);
    buf_free(&h2->text[1]);
    PyMem_Free(h2);
}

/* A flow's first client bytes are the preface: its HTTP/2 state (R_NONE), or a reason. The
   call-id prefix is the flow's with the protocol "grpc" (calls.new_call hashes the protocol). */
static int h2_start(flow_t *flow) {
    h2conn_t *h2 = PyMem_Calloc(1, sizeof(h2conn_t));
    if (h2 == NULL) return R_MEMORY;
    flow->h2 = h2;
    for (int d = 0; d < 2; d++) {
        if (nghttp2_hd_inflate_new(&h2->inflater[d]) != 0) return R_MEMORY;
        h2->allowed[d] = H2_DEFAULT_TABLE;
        h2->max_frame[d] = H2_DEFAULT_MAX_FRAME;
    }
    return protocol_prefix(flow, "grpc", &h2->prefix);
}

/* The server's first bytes on a flow whose client has not spoken: the start of an HTTP/2
   server's connection preface, a SETTINGS frame on stream 0 (grpc-core servers send theirs
   as soon as they accept, racing the client's preface). http2.probe takes it as HTTP/2, and
   the client's preface then confirms it; the lane requires that preface next. */
static int h2_server_preface(const uint8_t *data, size_t len) {
    if (len < 9) return 0;
    uint32_t length = ((uint32_t)data[0] << 16) | ((uint32_t)data[1] << 8) | data[2];
    return data[3] == H2_SETTINGS && data[4] == 0 && be32(data + 5) == 0 && length % 6 == 0 &&
           length <= H2_DEFAULT_MAX_FRAME;
}

static int h2_idle(const h2conn_t *h2) {
    return h2->open_count == 0 && h2->pending[0].len == 0 && h2->pending[1].len == 0;
}

/* -- header blocks ------------------------------------------------------------------------- */

static int h2_special(const uint8_t *name, size_t len) {
    switch (len) {
    case 2:
        return memcmp(name, "b3", 2) == 0 ? HDR_B3 : HDR_OTHER;
    case 4:
        return memcmp(name, "host", 4) == 0 ? HDR_HOST : HDR_OTHER;
    case 5:
        return memcmp(name, ":path", 5) == 0 ? HDR_H2_PATH : HDR_OTHER;
    case 7:
        if (memcmp(name, ":method", 7) == 0) return HDR_H2_METHOD;
        return memcmp(name, ":status", 7) == 0 ? HDR_H2_STATUS : HDR_OTHER;
    case 10:
        if (memcmp(name, "user-agent", 10) == 0) return HDR_USER_AGENT;
        if (memcmp(name, ":authority", 10) == 0) return HDR_H2_AUTHORITY;
        return memcmp(name, "tracestate", 10) == 0 ? HDR_TRACESTATE : HDR_OTHER;
    case 11:
        if (memcmp(name, "grpc-status", 11) == 0) return HDR_GRPC_STATUS;
        if (memcmp(name, "traceparent", 11) == 0) return HDR_TRACEPARENT;
        return memcmp(name, "x-b3-spanid", 11) == 0 ? HDR_B3_SPAN : HDR_OTHER;
    case 12:
        if (memcmp(name, "content-type", 12) == 0) return HDR_CONTENT_TYPE;
        if (memcmp(name, "grpc-timeout", 12) == 0) return HDR_GRPC_TIMEOUT;
        if (memcmp(name, "grpc-message", 12) == 0) return HDR_GRPC_MESSAGE;
        return memcmp(name, "x-b3-traceid", 12) == 0 ? HDR_B3_TRACE : HDR_OTHER;
    case 13:
        return memcmp(name, "grpc-encoding", 13) == 0 ? HDR_GRPC_ENCODING : HDR_OTHER;
    case 14:
        return memcmp(name, "grpc-trace-bin", 14) == 0 ? HDR_GRPC_TRACE_BIN : HDR_OTHER;
    case 16:
        return memcmp(name, "content-encoding", 16) == 0 ? HDR_CONTENT_ENCODING : HDR_OTHER;
    default:
        return HDR_OTHER;
    }
}

static void head_clear(head_t *head) {
    head->raw.len = 0;
    head->count = 0;
    for (int i = 0; i < HDR_SPECIAL_COUNT; i++) head->special[i] = -1;
}

/* One decoded field into `head`: the subset's byte rules, its special index, its kind. */
static int h2_add_field(Express *self, head_t *head, const uint8_t *name, size_t name_len, const uint8_t *value,
                        size_t value_len) {
    if (name_len == 0) return R_HEADER;
    for (size_t i = 0; i < name_len; i++)
        if (name[i] < 0x21 || name[i] > 0x7E || (name[i] >= 'A' && name[i] <= 'Z')) return R_HEADER;
    for (size_t i = 0; i < value_len; i++)
        if ((value[i] < 0x20 || value[i] > 0x7E) && value[i] != '\t') return R_HEADER;
    if (value_len && (value[0] == ' ' || value[0] == '\t' || value[value_len - 1] == ' ' ||
                      value[value_len - 1] == '\t'))
        return R_HEADER;
    if (head->count == MAX_HEADERS) return R_HEADER;
    if (head->count == head->cap) {
        uint32_t cap = head->cap ? head->cap * 2 : 16;
        header_t *headers = PyMem_Realloc(head->headers, cap * sizeof(header_t));
        if (headers == NULL) return R_MEMORY;
        head->headers = headers;
        head->cap = cap;
    }
    size_t at = head->raw.len;
    if (buf_put(&head->raw, name, name_len) || buf_put(&head->raw, value, value_len)) return R_MEMORY;
    int special = h2_special(name, name_len);
    if (special != HDR_OTHER) {
        if (head->special[special] >= 0) return R_HEADER; /* Python joins the values */
        if (special == HDR_CONTENT_ENCODING) return R_ENCODING;
        if (special == HDR_GRPC_TRACE_BIN) return R_GRPC;
        head->special[special] = (int)head->count;
    }
    int kind = header_kind_of(self, name, name_len);
    if (kind < 0) return R_CALLBACK;
    if (kind == 2 && (memchr(value, '?', value_len) || memchr(value, '@', value_len))) return R_URL;
    header_t *header = &head->headers[head->count++];
    header->name_off = (uint32_t)at;
    header->name_len = (uint32_t)name_len;
    header->value_off = (uint32_t)(at + name_len);
    header->value_len = (uint32_t)value_len;
    header->kind = kind;
    return R_NONE;
}

/* A whole header block through the direction's inflater into `head`. hpack bounds the decoded
   list (its max_header_list_size, HARD_BLOCK_FACTOR x max_header_bytes, counting 32 bytes per
   field): past that Python notes the block, so it demotes here, counting the same way. */
static int h2_decode(Express *self, h2conn_t *h2, int dir, const uint8_t *block, size_t len, head_t *head) {
    nghttp2_hd_inflater *inflater = h2->inflater[dir];
    size_t bound = (size_t)H2_HARD_BLOCK_FACTOR * (size_t)self->max_header_bytes, decoded = 0;
    head_clear(head);
    for (;;) {
        nghttp2_nv nv;
        int flags = 0;
        ssize_t used = nghttp2_hd_inflate_hd2(inflater, &nv, &flags, block, len, 1);
        if (used < 0) return used == NGHTTP2_ERR_NOMEM ? R_MEMORY : R_H2;
        block += used;
        len -= (size_t)used;
        if (flags & NGHTTP2_HD_INFLATE_EMIT) {
            decoded += nv.namelen + nv.valuelen + 32;
            if (decoded > bound) return R_LIMIT;
            int reason = h2_add_field(self, head, nv.name, nv.namelen, nv.value, nv.valuelen);
            if (reason) return reason;
        }
        if (flags & NGHTTP2_HD_INFLATE_FINAL) {
            nghttp2_hd_inflate_end_headers(inflater);
            return R_NONE;
        }
        if (!(flags & NGHTTP2_HD_INFLATE_EMIT) && len == 0) return R_H2;
    }
}

static const uint8_t *head_value(const head_t *head, int special, size_t *len) {
    int index = head->special[special];
    if (index < 0) return NULL;
    const header_t *h = &head->headers[index];
    *len = h->value_len;
    return head->raw.data + h->value_off;
}

/* grpc.is_grpc and grpc.codec: the media type before ';', stripped, lower-cased, is
   application/grpc or application/grpc+proto (anything else is the Python path's). */
static int grpc_proto_content_type(const uint8_t *value, size_t len) {
    const uint8_t *semi = memchr(value, ';', len);
    size_t end = semi ? (size_t)(semi - value) : len, start = 0;
    while (start < end && (value[start] == ' ' || value[start] == '\t')) start++;
    while (end > start && (value[end - 1] == ' ' || value[end - 1] == '\t')) end--;
    return equals_lower(value + start, end - start, "application/grpc") ||
           equals_lower(value + start, end - start, "application/grpc+proto");
}

/* -- streams ------------------------------------------------------------------------------ */

static h2_stream_t *h2_find(h2conn_t *h2, uint32_t id) {
    for (int i = 0; i < h2->open_count; i++)
        if (h2->open[i]->id == id) return h2->open[i];
    return NULL;
}

static h2_stream_t *h2_open(h2conn_t *h2, uint32_t id) {
    h2_stream_t *stream = h2->spare_count ? h2->spare[--h2->spare_count] : PyMem_Calloc(1, sizeof(h2_stream_t));
    if (stream == NULL) return NULL;
    stream->id = id;
    stream->response_started = stream->trailers_seen = 0;
    for (int i = 0; i < 3; i++) head_clear(&stream->heads[i]);
    for (int d = 0; d < 2; d++) {
        stream->end_stream[d] = 0;
        stream->bodies[d].len = 0;
        stream->data_bytes[d] = stream->first_ts[d] = stream->last_ts[d] = 0;
        stream->wire[d] = stream->frames[d] = stream->header_bytes[d] = 0;
        grpc_reader_t *reader = &stream->grpc[d];
        reader->prefix_len = 0;
        reader->in_message = reader->collecting = reader->first_done = 0;
        reader->remaining = reader->length = 0;
        reader->messages = reader->message_bytes = 0;
        reader->first.len = 0;
    }
    h2->open[h2->open_count++] = stream;
    return stream;
}

static void h2_close(h2conn_t *h2, h2_stream_t *stream) {
    for (int i = 0; i < h2->open_count; i++) {
        if (h2->open[i] == stream) {
            h2->open[i] = h2->open[--h2->open_count];
            break;
        }
    }
    if (h2->spare_count < H2_MAX_STREAMS) h2->spare[h2->spare_count++] = stream;
    else h2_stream_free(stream);
}

/* One DATA payload into a direction's gRPC reader (grpc.MessageStream.feed): whole messages
   counted, the first kept; what the held subset does not read demotes. */
static int grpc_feed(Express *self, grpc_reader_t *reader, const uint8_t *data, size_t len) {
    size_t pos = 0;
    while (pos < len) {
        if (!reader->in_message) {
            size_t take = 5 - reader->prefix_len;
            if (take > len - pos) take = len - pos;
            memcpy(reader->prefix + reader->prefix_len, data + pos, take);
            reader->prefix_len += (uint32_t)take;
            pos += take;
            if (reader->prefix_len < 5) return R_NONE;
            reader->prefix_len = 0;
            uint64_t length = be32(reader->prefix + 1);
            if (reader->prefix[0] != 0) return R_GRPC; /* compressed, or a bad prefix */
            if (length > GRPC_MAX_MESSAGE_LENGTH) return R_GRPC;
            reader->in_message = 1;
            reader->length = reader->remaining = length;
            reader->collecting = reader->messages == 0 && !reader->first_done;
            if (reader->collecting && length > (uint64_t)self->max_body_bytes) return R_GRPC; /* truncated */
        } else {
            size_t take = len - pos;
            if ((uint64_t)take > reader->remaining) take = (size_t)reader->remaining;
            if (reader->collecting && buf_put(&reader->first, data + pos, take)) return R_MEMORY;
            pos += take;
            reader->remaining -= take;
        }
        if (reader->in_message && reader->remaining == 0) {
            reader->in_message = 0;
            reader->messages++;
            reader->message_bytes += (int64_t)reader->length;
            if (reader->collecting) {
                reader->collecting = 0;
                reader->first_done = 1;
            }
        }
    }
    return R_NONE;
}

/* -- the call ----------------------------------------------------------------------------- */

/* Message (http2.Http2Parser._fill_message): ts, end_ts, size (frame bytes), the headers then
   the trailers, the body kept, body_truncated, body_size. */
static int put_h2_message(buf_t *out, unsigned field, buf_t *scratch, const h2_stream_t *stream, int dir) {
    scratch->len = 0;
    const buf_t *body = &stream->bodies[dir];
    int64_t body_size = stream->data_bytes[dir];
    if (pb_uint(scratch, 1, (uint64_t)stream->first_ts[dir]) || pb_uint(scratch, 2, (uint64_t)stream->last_ts[dir]) ||
        pb_uint(scratch, 3, (uint64_t)stream->wire[dir]) ||
        put_headers(scratch, &stream->heads[dir == 0 ? H2_REQUEST : H2_RESPONSE]) ||
        (dir == 1 && put_headers(scratch, &stream->heads[H2_TRAILERS])) ||
        pb_bytes(scratch, 5, body->data, body->len) ||
        pb_uint(scratch, 6, (uint64_t)(body_size - (int64_t)body->len)) || pb_uint(scratch, 7, (uint64_t)body_size))
        return -1;
    return pb_message(out, field, scratch);
}

/* grpc.parse_timeout: 1-8 digits and a unit of H M S m u n; -1 when malformed. */
static int64_t grpc_timeout_ns(const uint8_t *value, size_t len) {
    if (len < 2 || len > 9) return -1;
    int64_t number = 0;
    for (size_t i = 0; i + 1 < len; i++) {
        if (value[i] < '0' || value[i] > '9') return -1;
        number = number * 10 + (value[i] - '0');
    }
    switch (value[len - 1]) {
    case 'H':
        return number * 3600000000000LL;
    case 'M':
        return number * 60000000000LL;
    case 'S':
        return number * 1000000000LL;
    case 'm':
        return number * 1000000LL;
    case 'u':
        return number * 1000LL;
    case 'n':
        return number;
    default:
        return -1;
    }
}

/* The first message as JSON text (grpc._message_text, proto codec, no descriptors) into `text`,
   checked as Redactor._grpc would check it. */
static int grpc_message_text(Express *self, const grpc_reader_t *reader, buf_t *text) {
    size_t chars = 0;
    text->len = 0;
    if (pbjson_schemaless(reader->first.data ? reader->first.data : (const uint8_t *)"", reader->first.len, 8, 512,
                          text, &chars))
        return R_MEMORY;
    size_t max_chars = self->max_body_bytes > 64 ? (size_t)self->max_body_bytes : 64;
    if (chars > max_chars) return R_GRPC; /* to_json_text's bounded writer: Python's */
    int hit = json_keys_secret(self, text->data, text->len);
    if (hit < 0) return R_CALLBACK;
    return hit ? R_BODY_SECRET : R_NONE;
}

/* The finished stream (both sides ended) as ApiCall bytes: http2.Http2Parser._complete for an
   ENDED gRPC stream, then grpc.apply, then Redactor.apply (whose changes the field checks above
   made certain are only the header values of kind 1). */
static int h2_build_call(Express *self, flow_t *flow, h2_stream_t *stream, PyObject **call, char *id) {
    h2conn_t *h2 = flow->h2;
    const head_t *request = &stream->heads[H2_REQUEST], *response = &stream->heads[H2_RESPONSE],
                 *trailers = &stream->heads[H2_TRAILERS];
    for (int d = 0; d < 2; d++) /* grpc.MessageStream.finish: a message cut short is noted */
        if (stream->grpc[d].in_message || stream->grpc[d].prefix_len) return R_GRPC;
    /* grpc._status: the trailers' grpc-status, or a Trailers-Only response's. */
    const head_t *status_head = trailers;
    size_t status_len = 0, message_len = 0;
    const uint8_t *status_text = head_value(trailers, HDR_GRPC_STATUS, &status_len);
    int trailers_only = 0;
    if (status_text == NULL) {
        status_text = head_value(response, HDR_GRPC_STATUS, &status_len);
        status_head = response;
        trailers_only = 1;
    }
    if (status_text == NULL || status_len == 0 || status_len > 10) return R_GRPC;
    int64_t code = 0;
    for (size_t i = 0; i < status_len; i++) {
        if (status_text[i] < '0' || status_text[i] > '9') return R_GRPC;
        code = code * 10 + (status_text[i] - '0');
    }
    if (code > 2147483647LL) return R_GRPC;
    const uint8_t *message = head_value(status_head, HDR_GRPC_MESSAGE, &message_len);
    if (message != NULL && memchr(message, '%', message_len)) return R_GRPC;
    int64_t timeout = 0;
    size_t timeout_len = 0, path_len = 0, method_len = 0, type_len = 0, encoding_len[2] = {0, 0};
    const uint8_t *timeout_text = head_value(request, HDR_GRPC_TIMEOUT, &timeout_len);
    if (timeout_text != NULL && (timeout = grpc_timeout_ns(timeout_text, timeout_len)) < 0) return R_GRPC;
    const uint8_t *path = head_value(request, HDR_H2_PATH, &path_len);
    if (path != NULL && (memchr(path, '?', path_len) || memchr(path, '@', path_len))) return R_URL;
    const uint8_t *method = head_value(request, HDR_H2_METHOD, &method_len);
    const uint8_t *content_type = head_value(request, HDR_CONTENT_TYPE, &type_len);
    const uint8_t *encodings[2] = {head_value(request, HDR_GRPC_ENCODING, &encoding_len[0]),
                                   head_value(response, HDR_GRPC_ENCODING, &encoding_len[1])};
    /* grpc.split_path: "/service/method", neither empty, no other '/', no whitespace, '?' or '#'. */
    size_t service_off = 0, service_len = 0, name_off = 0, name_len = 0;
    if (path != NULL && path_len > 1 && path[0] == '/' && !memchr(path, ' ', path_len) &&
        !memchr(path, '\t', path_len) && !memchr(path, '#', path_len)) {
        const uint8_t *slash = memchr(path + 1, '/', path_len - 1);
        if (slash != NULL) {
            size_t at = (size_t)(slash - path);
            if (at > 1 && at + 1 < path_len && !memchr(slash + 1, '/', path_len - at - 1)) {
                service_off = 1;
                service_len = at - 1;
                name_off = at + 1;
                name_len = path_len - at - 1;
            }
        }
    }
    for (int d = 0; d < 2; d++) {
        if (!stream->grpc[d].first_done) continue;
        int reason = grpc_message_text(self, &stream->grpc[d], &h2->text[d]);
        if (reason) return reason;
    }

    buf_t out = {0}, *scratch = &h2->scratch, *sub = &h2->sub;
    int reason = R_MEMORY;
    int64_t request_ts = stream->first_ts[0], response_ts = stream->first_ts[1];
    if (put_call_head(&out, sub, flow, h2->prefix, "grpc", "tcp", request_ts, stream->ordinal, id) ||
        put_h2_message(&out, 8, scratch, stream, 0) || put_h2_message(&out, 9, scratch, stream, 1))
        goto done;
    char status[16];
    int status_size = snprintf(status, sizeof(status), "%lld", (long long)code);
    if (pb_bytes(&out, 10, method_len ? (const void *)method : "POST", method_len ? method_len : 4) ||
        pb_bytes(&out, 11, path, path_len) || pb_bytes(&out, 12, status, (size_t)status_size) ||
        pb_uint(&out, 13, response_ts > request_ts ? (uint64_t)(response_ts - request_ts) : 0) ||
        pb_uint(&out, 14, code == 0 ? 1 : code == 1 ? 4 : code == 4 ? 5 : 2))
        goto done;
    trace_context(flow, request);
    if (flow->has_trace) {
        if (pb_bytes(&out, 15, flow->trace_id, 32) || pb_bytes(&out, 16, flow->parent_span_id, 16) ||
            put_header_value(&out, 17, request, flow->trace_state))
            goto done;
    }
    /* GrpcDetail */
    sub->len = 0;
    const grpc_reader_t *req = &stream->grpc[0], *resp = &stream->grpc[1];
    int64_t sent = req->messages, received = resp->messages;
    const char *call_type = sent == 0 && received == 0 ? ""
                            : sent <= 1                ? (received <= 1 ? "unary" : "server_streaming")
                                                       : (received <= 1 ? "client_streaming" : "bidi_streaming");
    if (pb_bytes(sub, 1, path + service_off, service_len) || pb_bytes(sub, 2, path + name_off, name_len) ||
        pb_uint(sub, 3, (uint64_t)code) || pb_bytes(sub, 4, message, message_len) ||
        pb_bytes(sub, 5, content_type, type_len))
        goto done;
    for (int d = 0; d < 2; d++) {
        /* grpc.message_encoding: lower-cased, "" for identity. */
        char lowered[64];
        size_t n = encoding_len[d];
        if (n > sizeof(lowered)) {
            reason = R_GRPC;
            goto done;
        }
        copy_lower(lowered, encodings[d] ? encodings[d] : (const uint8_t *)"", n);
        if (n == 8 && memcmp(lowered, "identity", 8) == 0) n = 0;
        if (pb_bytes(sub, 6 + (unsigned)d, lowered, n)) goto done;
    }
    if (pb_uint(sub, 8, (uint64_t)sent) || pb_uint(sub, 9, (uint64_t)received) ||
        pb_uint(sub, 10, (uint64_t)req->message_bytes) || pb_uint(sub, 11, (uint64_t)resp->message_bytes) ||
        pb_uint(sub, 14, (uint64_t)timeout) || pb_bytes(sub, 15, call_type, strlen(call_type)))
        goto done;
    /* A first message is always written: even an empty one is the text "{}". */
    if ((req->first_done && pb_bytes(sub, 16, h2->text[0].data, h2->text[0].len)) ||
        (resp->first_done && pb_bytes(sub, 17, h2->text[1].data, h2->text[1].len)) ||
        pb_uint(sub, 18, (uint64_t)trailers_only) || pb_message(&out, 21, sub) ||
        pb_uint(&out, 31, (uint64_t)flow->shard))
        goto done;
    /* Http2Stream */
    sub->len = 0;
    if (pb_uint(sub, 1, stream->id) || pb_uint(sub, 7, 1) || pb_uint(sub, 8, 1) ||
        pb_uint(sub, 9, (uint64_t)stream->frames[0]) || pb_uint(sub, 10, (uint64_t)stream->frames[1]) ||
        pb_uint(sub, 11, (uint64_t)stream->header_bytes[0]) || pb_uint(sub, 12, (uint64_t)stream->header_bytes[1]) ||
        pb_uint(sub, 13, (uint64_t)stream->trailers_seen) || pb_message(&out, 32, sub))
        goto done;
    *call = PyBytes_FromStringAndSize((const char *)out.data, (Py_ssize_t)out.len);
    if (*call == NULL) PyErr_Clear();
    else reason = R_NONE;
done:
    buf_free(&out);
    return reason;
}

/* Both sides ended the stream: its call leaves now, its id remembered until the next snapshot. */
static int h2_complete(Express *self, flow_t *flow, h2_stream_t *stream, PyObject *work) {
    h2conn_t *h2 = flow->h2;
    PyObject *call = NULL;
    char id[24];
    int reason = h2_build_call(self, flow, stream, &call, id);
    if (reason) return reason;
    PyObject *item = call; /* a call is its serialized bytes in the work list */
    if (item == NULL || buf_put(&flow->emitted, id, 24) || PyList_Append(work, item)) {
        Py_XDECREF(item);
        PyErr_Clear();
        return R_MEMORY;
    }
    Py_DECREF(item);
    self->calls_grpc++;
    flow->exchanges++;
    h2_close(h2, stream);
    return R_NONE;
}

static int h2_end_stream(Express *self, flow_t *flow, h2_stream_t *stream, int dir, PyObject *work) {
    stream->end_stream[dir] = 1;
    return stream->end_stream[1 - dir] ? h2_complete(self, flow, stream, work) : R_NONE;
}

/* -- frames --------------------------------------------------------------------------------- */

static int h2_headers(Express *self, flow_t *flow, int dir, uint8_t flags, uint32_t id, const uint8_t *payload,
                      uint32_t length, int64_t ts, PyObject *work) {
    h2conn_t *h2 = flow->h2;
    if (id == 0 || !(flags & H2_END_HEADERS) || (flags & (H2_PADDED | H2_PRIORITY_FLAG))) return R_H2;
    if (length > (uint32_t)self->max_header_bytes) return R_LIMIT; /* "headers-too-large" */
    h2_stream_t *stream = h2_find(h2, id);
    int reason;
    head_t *head;
    if (dir == 0) {
        if (stream != NULL) return R_H2_STREAM; /* the request's trailers */
        if (!(id & 1) || id <= h2->last_client_id) return R_H2_STREAM;
        if (h2->open_count >= H2_MAX_STREAMS || h2->open_count >= self->max_pending_requests) return R_LIMIT;
        stream = h2_open(h2, id);
        if (stream == NULL) return R_MEMORY;
        head = &stream->heads[H2_REQUEST];
        reason = h2_decode(self, h2, 0, payload, length, head);
        if (reason) return reason;
        size_t type_len = 0;
        const uint8_t *content_type = head_value(head, HDR_CONTENT_TYPE, &type_len);
        if (head->special[HDR_H2_METHOD] < 0) return R_H2_STREAM; /* not a request: Python's to count */
        if (content_type == NULL || !grpc_proto_content_type(content_type, type_len)) return R_GRPC;
        h2->last_client_id = id;
        stream->ordinal = flow->ordinal++;
    } else {
        if (stream == NULL || stream->end_stream[1]) return R_H2_STREAM;
        if (!stream->response_started) {
            head = &stream->heads[H2_RESPONSE];
            reason = h2_decode(self, h2, 1, payload, length, head);
            if (reason) return reason;
            size_t status_len = 0;
            const uint8_t *status = head_value(head, HDR_H2_STATUS, &status_len);
            if (status != NULL && status_len == 3 && status[0] == '1' && !(flags & H2_END_STREAM)) return R_STATUS;
            stream->response_started = 1;
        } else {
            if (stream->trailers_seen) return R_H2_STREAM;
            reason = h2_decode(self, h2, 1, payload, length, &stream->heads[H2_TRAILERS]);
            if (reason) return reason;
            stream->trailers_seen = 1;
        }
    }
    /* Http2Parser._account */
    stream->frames[dir] += 1;
    stream->wire[dir] += 9 + (int64_t)length;
    stream->header_bytes[dir] += length;
    if (!stream->first_ts[dir]) stream->first_ts[dir] = ts;
    stream->last_ts[dir] = ts;
    if (flags & H2_END_STREAM) return h2_end_stream(self, flow, stream, dir, work);
    return R_NONE;
}

static int h2_data_frame(Express *self, flow_t *flow, int dir, uint8_t flags, uint32_t id, const uint8_t *payload,
                         uint32_t length, int64_t header_ts, int64_t ts, PyObject *work) {
    if (id == 0 || (flags & H2_PADDED)) return R_H2;
    h2_stream_t *stream = h2_find(flow->h2, id);
    if (stream == NULL || stream->end_stream[dir] || (dir == 1 && !stream->response_started)) return R_H2_STREAM;
    /* Http2Parser._data_frame at the frame's header, _frame_done at its last byte. */
    stream->frames[dir] += 1;
    stream->wire[dir] += 9 + (int64_t)length;
    if (!stream->first_ts[dir]) stream->first_ts[dir] = header_ts;
    stream->last_ts[dir] = ts;
    if (length) {
        int failed = 0;
        body_add(self, &stream->bodies[dir], &stream->data_bytes[dir], payload, length, &failed);
        if (failed) return R_MEMORY;
        int reason = grpc_feed(self, &stream->grpc[dir], payload, length);
        if (reason) return reason;
    }
    if (flags & H2_END_STREAM) return h2_end_stream(self, flow, stream, dir, work);
    return R_NONE;
}

/* SETTINGS sent in `dir` describe what the sender receives (http2.Http2Parser._apply_settings):
   the last value of each identifier in the frame counts. */
static int h2_settings(h2conn_t *h2, int dir, uint8_t flags, uint32_t id, const uint8_t *payload, uint32_t length) {
    if (id != 0) return R_H2;
    if (flags & H2_ACK) return length ? R_H2 : R_NONE;
    if (length % 6 || length > H2_MAX_CONTROL_FRAME) return R_H2;
    int64_t max_frame = -1, table = -1;
    for (uint32_t at = 0; at < length; at += 6) {
        uint32_t name = be16(payload + at), value = be32(payload + at + 2);
        int index = 0;
        while (index < h2->settings_count[dir] && h2->settings[dir][index].id != name) index++;
        if (index == h2->settings_count[dir]) {
            if (index == H2_MAX_SETTINGS) return R_H2;
            h2->settings[dir][index].id = name;
            h2->settings_count[dir]++;
        }
        h2->settings[dir][index].value = value;
        if (name == H2_SETTINGS_MAX_FRAME_SIZE) max_frame = value;
        if (name == H2_SETTINGS_HEADER_TABLE_SIZE) table = value;
    }
    int toward_sender = 1 - dir;
    if (max_frame >= H2_DEFAULT_MAX_FRAME && max_frame <= H2_LARGEST_FRAME)
        h2->max_frame[toward_sender] = (uint32_t)max_frame;
    if (table >= 0) {
        size_t allowed = (size_t)(table < H2_TABLE_CAP ? table : H2_TABLE_CAP);
        if (allowed > h2->allowed[toward_sender]) {
            if (nghttp2_hd_inflate_change_table_size(h2->inflater[toward_sender], allowed) != 0) return R_H2;
            h2->allowed[toward_sender] = allowed;
        }
    }
    return R_NONE;
}

static int h2_frame(Express *self, flow_t *flow, int dir, int type, uint8_t flags, uint32_t id,
                    const uint8_t *payload, uint32_t length, int64_t header_ts, int64_t ts, PyObject *work) {
    switch (type) {
    case H2_DATA:
        return h2_data_frame(self, flow, dir, flags, id, payload, length, header_ts, ts, work);
    case H2_HEADERS:
        return h2_headers(self, flow, dir, flags, id, payload, length, ts, work);
    case H2_SETTINGS:
        return h2_settings(flow->h2, dir, flags, id, payload, length);
    case H2_PRIORITY:
        return length == 5 ? R_NONE : R_H2;
    case H2_PING:
        return length == 8 ? R_NONE : R_H2;
    case H2_WINDOW_UPDATE:
        return length == 4 ? R_NONE : R_H2;
    case H2_RST_STREAM:
    case H2_PUSH_PROMISE:
    case H2_GOAWAY:
        return R_H2_STREAM;
    case H2_CONTINUATION:
        return R_H2;
    default:
        return R_NONE; /* an extension frame: skipped, as Python skips it */
    }
}

/* In-order payload of one direction of an HTTP/2 flow (the client's preface already taken):
   whole frames are read where they lie, a frame cut by the segment's end waits in `pending`.
   A frame's header time is that of the packet that completed its 9 bytes (http2._data_start),
   the rest happens at the packet that completed the frame. */
static int h2_data(Express *self, flow_t *flow, int dir, const uint8_t *data, size_t len, int64_t ts,
                   PyObject *work) {
    h2conn_t *h2 = flow->h2;
    if (dir == 0 && h2->preface_pending) {
        if (len < H2_PREFACE_LEN || memcmp(data, H2_PREFACE, H2_PREFACE_LEN) != 0) return R_NOT_HTTP;
        h2->preface_pending = 0;
        flow->client_spoke = 1;
        data += H2_PREFACE_LEN;
        len -= H2_PREFACE_LEN;
    }
    buf_t *pending = &h2->pending[dir];
    size_t carried = pending->len;
    const uint8_t *p = data;
    size_t avail = len;
    if (carried) {
        if (buf_put(pending, data, len)) return R_MEMORY;
        p = pending->data;
        avail = pending->len;
    }
    size_t pos = 0;
    while (avail - pos >= 9) {
        uint32_t length = ((uint32_t)p[pos] << 16) | ((uint32_t)p[pos + 1] << 8) | p[pos + 2];
        int type = p[pos + 3];
        uint8_t flags = p[pos + 4];
        uint32_t id = be32(p + pos + 5) & 0x7FFFFFFFU;
        if (length > h2->max_frame[dir]) return R_H2;
        if (avail - pos - 9 < length) break;
        int64_t header_ts = (pos < carried && carried - pos >= 9) ? h2->header_ts[dir] : ts;
        int reason = h2_frame(self, flow, dir, type, flags, id, p + pos + 9, length, header_ts, ts, work);
        if (reason) return reason;
        pos += 9 + (size_t)length;
    }
    size_t left = avail - pos;
    if (!(pos < carried && carried - pos >= 9)) h2->header_ts[dir] = ts;
    if (carried) {
        if (left) memmove(pending->data, pending->data + pos, left);
        pending->len = left;
    } else if (left && buf_put(pending, data + pos, left)) {
        return R_MEMORY;
    }
    if (pending->len > (size_t)self->max_retained_bytes) return R_LIMIT;
    return R_NONE;
}

/* -- the state at a quiescent point ---------------------------------------------------------- */

/* Is the flow at a point to take a snapshot at (quiescent() for HTTP/2)? */
static int h2_snapshot_due(const flow_t *flow) {
    const h2conn_t *h2 = flow->h2;
    if (h2->preface_pending || h2->pending[0].len || h2->pending[1].len) return 0;
    return h2->open_count == 0 || flow->retained_bytes >= H2_SNAPSHOT_BYTES;
}

static int head_copy(head_t *to, const head_t *from) {
    head_clear(to);
    if (from->count > to->cap) {
        header_t *headers = PyMem_Realloc(to->headers, from->count * sizeof(header_t));
        if (headers == NULL) return -1;
        to->headers = headers;
        to->cap = from->count;
    }
    if (from->count) memcpy(to->headers, from->headers, from->count * sizeof(header_t));
    to->count = from->count;
    memcpy(to->special, from->special, sizeof(to->special));
    return buf_put(&to->raw, from->raw.data, from->raw.len);
}

static int stream_copy(h2_stream_t *to, const h2_stream_t *from) {
    to->id = from->id;
    to->ordinal = from->ordinal;
    to->response_started = from->response_started;
    to->trailers_seen = from->trailers_seen;
    for (int i = 0; i < 3; i++)
        if (head_copy(&to->heads[i], &from->heads[i])) return -1;
    for (int d = 0; d < 2; d++) {
        to->end_stream[d] = from->end_stream[d];
        to->data_bytes[d] = from->data_bytes[d];
        to->first_ts[d] = from->first_ts[d];
        to->last_ts[d] = from->last_ts[d];
        to->wire[d] = from->wire[d];
        to->frames[d] = from->frames[d];
        to->header_bytes[d] = from->header_bytes[d];
        to->bodies[d].len = 0;
        if (buf_put(&to->bodies[d], from->bodies[d].data, from->bodies[d].len)) return -1;
        grpc_reader_t *reader = &to->grpc[d];
        buf_t first = reader->first;
        *reader = from->grpc[d];
        reader->first = first;
        reader->first.len = 0;
        if (buf_put(&reader->first, from->grpc[d].first.data, from->grpc[d].first.len)) return -1;
    }
    return 0;
}

/* The state at this point into h2->snapshot (take_snapshot); -1 when memory ran out, the last
   snapshot then left whole (everything is written aside first and swapped in at the end). */
static int h2_snapshot(h2conn_t *h2) {
    h2_snapshot_t *snap = &h2->snapshot;
    buf_t tables[2] = {{0}, {0}};
    size_t entries[2] = {0, 0};
    for (int d = 0; d < 2; d++) {
        nghttp2_hd_inflater *inflater = h2->inflater[d];
        size_t total = nghttp2_hd_inflate_get_num_table_entries(inflater);
        entries[d] = total > H2_STATIC_ENTRIES ? total - H2_STATIC_ENTRIES : 0;
        /* Written into fresh buffers, swapped in only whole. */
        if (buf_reserve(&tables[d], snap->tables[d].cap ? snap->tables[d].cap : 256)) goto fail;
        for (size_t index = H2_STATIC_ENTRIES + 1; index <= total; index++) {
            const nghttp2_nv *nv = nghttp2_hd_inflate_get_table_entry(inflater, index);
            if (nv == NULL) goto fail;
            uint32_t sizes[2] = {(uint32_t)nv->namelen, (uint32_t)nv->valuelen};
            if (buf_put(&tables[d], &sizes[0], 4) || buf_put(&tables[d], nv->name, nv->namelen) ||
                buf_put(&tables[d], &sizes[1], 4) || buf_put(&tables[d], nv->value, nv->valuelen))
                goto fail;
        }
    }
    /* The open streams, oldest first (the order Python's dict of streams keeps). */
    h2_stream_t *copies[H2_MAX_STREAMS];
    int copied = 0;
    for (; copied < h2->open_count; copied++) {
        copies[copied] = PyMem_Calloc(1, sizeof(h2_stream_t));
        if (copies[copied] == NULL || stream_copy(copies[copied], h2->open[copied])) {
            h2_stream_free(copies[copied]);
            for (int i = 0; i < copied; i++) h2_stream_free(copies[i]);
            goto fail;
        }
    }
    for (int i = 0; i < snap->stream_count; i++) h2_stream_free(snap->streams[i]);
    memcpy(snap->streams, copies, (size_t)copied * sizeof(h2_stream_t *));
    snap->stream_count = copied;
    for (int d = 0; d < 2; d++) {
        buf_free(&snap->tables[d]);
        snap->tables[d] = tables[d];
        snap->entries[d] = entries[d];
        snap->max_size[d] = nghttp2_hd_inflate_get_max_dynamic_table_size(h2->inflater[d]);
        snap->allowed[d] = h2->allowed[d];
        snap->max_frame[d] = h2->max_frame[d];
        snap->settings_count[d] = h2->settings_count[d];
        memcpy(snap->settings[d], h2->settings[d], sizeof(h2->settings[d]));
    }
    snap->last_client_id = h2->last_client_id;
    return 0;
fail:
    buf_free(&tables[0]);
    buf_free(&tables[1]);
    return -1;
}

static PyObject *fields_tuple(const head_t *head) {
    PyObject *fields = PyTuple_New(head->count);
    if (fields == NULL) return NULL;
    for (uint32_t i = 0; i < head->count; i++) {
        const header_t *h = &head->headers[i];
        PyObject *field = Py_BuildValue("(y#y#)", (const char *)head->raw.data + h->name_off, (Py_ssize_t)h->name_len,
                                        (const char *)head->raw.data + h->value_off, (Py_ssize_t)h->value_len);
        if (field == NULL) {
            Py_DECREF(fields);
            return NULL;
        }
        PyTuple_SET_ITEM(fields, i, field);
    }
    return fields;
}

static PyObject *optional_bytes(int present, const buf_t *buf) {
    if (!present) return Py_NewRef(Py_None);
    return PyBytes_FromStringAndSize(buf->data ? (const char *)buf->data : "", (Py_ssize_t)buf->len);
}

/* grpc.MessageState's fields, or None where Python has no reader yet (the response's is made
   at its first DATA payload). */
static PyObject *message_state(const h2_stream_t *stream, int d) {
    const grpc_reader_t *reader = &stream->grpc[d];
    if (d == 1 && stream->data_bytes[1] == 0) return Py_NewRef(Py_None);
    PyObject *first = optional_bytes(reader->first_done, &reader->first);
    PyObject *collected = first ? optional_bytes(reader->collecting, &reader->first) : NULL;
    if (collected == NULL) {
        Py_XDECREF(first);
        return NULL;
    }
    return Py_BuildValue("(LLNy#KKN)", (long long)reader->messages, (long long)reader->message_bytes, first,
                         (const char *)reader->prefix, (Py_ssize_t)reader->prefix_len,
                         (unsigned long long)(reader->in_message ? reader->length : 0),
                         (unsigned long long)reader->remaining, collected);
}

/* http2.Http2StreamState's fields of an open stream. */
static PyObject *stream_state(const h2_stream_t *stream) {
    PyObject *heads[3] = {NULL, NULL, NULL}, *messages[2] = {NULL, NULL};
    for (int i = 0; i < 3; i++)
        if ((heads[i] = fields_tuple(&stream->heads[i])) == NULL) goto fail;
    for (int d = 0; d < 2; d++)
        if ((messages[d] = message_state(stream, d)) == NULL) goto fail;
    const buf_t *bodies = stream->bodies;
    return Py_BuildValue(
        "{sksLsNsNsNsOsOs(OO)s(y#y#)s(LL)s(LL)s(LL)s(LL)s(LL)s(LL)sOs(NN)}", "stream_id", (unsigned long)stream->id,
        "ordinal", (long long)stream->ordinal, "request_headers", heads[0], "response_headers", heads[1],
        "trailer_headers", heads[2], "response_started", stream->response_started ? Py_True : Py_False,
        "trailers_seen", stream->trailers_seen ? Py_True : Py_False, "end_stream",
        stream->end_stream[0] ? Py_True : Py_False, stream->end_stream[1] ? Py_True : Py_False, "bodies",
        bodies[0].data ? (const char *)bodies[0].data : "", (Py_ssize_t)bodies[0].len,
        bodies[1].data ? (const char *)bodies[1].data : "", (Py_ssize_t)bodies[1].len, "data_bytes",
        (long long)stream->data_bytes[0], (long long)stream->data_bytes[1], "first_ts", (long long)stream->first_ts[0],
        (long long)stream->first_ts[1], "last_ts", (long long)stream->last_ts[0], (long long)stream->last_ts[1],
        "wire", (long long)stream->wire[0], (long long)stream->wire[1], "frames", (long long)stream->frames[0],
        (long long)stream->frames[1], "header_bytes", (long long)stream->header_bytes[0],
        (long long)stream->header_bytes[1], "is_grpc", Py_True, "messages", messages[0], messages[1]);
fail:
    for (int i = 0; i < 3; i++) Py_XDECREF(heads[i]);
    for (int d = 0; d < 2; d++) Py_XDECREF(messages[d]);
    return NULL;
}

/* The snapshot as the fields of http2.Http2State (express.py builds it), "ordinal" aside. */
static PyObject *h2_state(const h2conn_t *h2) {
    const h2_snapshot_t *snap = &h2->snapshot;
    PyObject *tables[2] = {NULL, NULL}, *settings[2] = {NULL, NULL}, *streams = NULL, *result = NULL;
    streams = PyTuple_New(snap->stream_count);
    if (streams == NULL) goto done;
    for (int i = 0; i < snap->stream_count; i++) {
        PyObject *stream = stream_state(snap->streams[i]);
        if (stream == NULL) goto done;
        PyTuple_SET_ITEM(streams, i, stream);
    }
    for (int d = 0; d < 2; d++) {
        tables[d] = PyTuple_New((Py_ssize_t)snap->entries[d]);
        settings[d] = PyTuple_New(snap->settings_count[d]);
        if (tables[d] == NULL || settings[d] == NULL) goto done;
        const uint8_t *at = snap->tables[d].data;
        for (size_t i = 0; i < snap->entries[d]; i++) {
            uint32_t name_len, value_len;
            memcpy(&name_len, at, 4);
            const uint8_t *name = at + 4;
            memcpy(&value_len, name + name_len, 4);
            const uint8_t *value = name + name_len + 4;
            at = value + value_len;
            PyObject *entry = Py_BuildValue("(y#y#)", (const char *)name, (Py_ssize_t)name_len, (const char *)value,
                                            (Py_ssize_t)value_len);
            if (entry == NULL) goto done;
            PyTuple_SET_ITEM(tables[d], (Py_ssize_t)i, entry);
        }
        for (int i = 0; i < snap->settings_count[d]; i++) {
            PyObject *pair = Py_BuildValue("(kk)", (unsigned long)snap->settings[d][i].id,
                                           (unsigned long)snap->settings[d][i].value);
            if (pair == NULL) goto done;
            PyTuple_SET_ITEM(settings[d], i, pair);
        }
    }
    result = Py_BuildValue("{s(OO)s(nn)s(nn)s(kk)s(OO)sksO}", "tables", tables[0], tables[1], "table_sizes",
                           (Py_ssize_t)snap->max_size[0], (Py_ssize_t)snap->max_size[1], "allowed_table_sizes",
                           (Py_ssize_t)snap->allowed[0], (Py_ssize_t)snap->allowed[1], "max_frame_sizes",
                           (unsigned long)snap->max_frame[0], (unsigned long)snap->max_frame[1], "settings",
                           settings[0], settings[1], "last_client_id", (unsigned long)snap->last_client_id,
                           "streams", streams);
done:
    Py_XDECREF(streams);
    for (int d = 0; d < 2; d++) {
        Py_XDECREF(tables[d]);
        Py_XDECREF(settings[d]);
    }
    return result;
}
