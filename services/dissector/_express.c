/*
 * trawl.dissector._express: the compiled "express lane" of the dissector (HTTP/1, gRPC over HTTP/2
 * in _express_h2.h, DNS over UDP).
 *
 * Why C: the Python path costs about 43 us per HTTP call (decode and TCP per packet, the head
 * parse and the ApiCall build, redaction); issue #3 asks for 100,000 calls/s per core, which
 * the profile says pure Python cannot reach. This lane does the common cases, in-order HTTP/1.x
 * keep-alive exchanges with Content-Length bodies and everyday DNS over UDP, in one pass over a
 * batch's pcap records, and writes each finished call as serialized ApiCall bytes.
 *
 * Correctness rests on one rule: the Python path (engine.py, tcp.py, http1.py, redact.py)
 * stays the single source of truth, and this lane only keeps a flow while it is certain to
 * produce exactly what Python would. The moment a packet is anything else (reordering, a loss,
 * RST/URG, a FIN with a message outstanding, a zero window, chunked or encoded bodies, pipelining, 1xx, upgrades, odd header
 * bytes, a secret in a body, a limit...) the flow is "demoted": Python gets the flow's state as
 * of its last quiescent point (both directions between messages, nothing buffered, no request
 * pending) or none at all (replay from the SYN), plus copies of every packet since, the
 * demoting one included (never applied to that state). services/dissector/express.py rebuilds
 * the Python flow from the state and the engine replays the packets through its ordinary path.
 *
 * DNS over UDP rides the same rule: a flow opened by a plain query from its client (exactly the
 * datagrams engine._udp_new makes a DNS flow of, oriented that way) is held while every datagram
 * is a query from the client or the response to a pending one, each a message dns._parse_common
 * reads (reproduced here with dnspython's rules and text forms); its calls leave once no query is
 * pending, its quiescent point. Anything else gives it back with the count of calls begun, the last
 * questions answered (so that Python counts a duplicate response as it would have) and the
 * datagrams since. A quiet flow idle past the UDP timeout just ends (Python reports nothing).
 *
 * The call id hashes with BLAKE2b (RFC 7693, written here from the RFC) like calls.new_call;
 * the redaction decisions (header kinds, secret query parameter names, secret JSON keys) come
 * from the Python Redactor through callbacks whose answers are cached here.
 *
 * feed() returns (work, packets_consumed, max_ts_ns): `work` lists, in packet order, what the
 * Python path must do: (0, start, end, ts_ns) one frame records[start:end]; (1, handover) a
 * demoted flow; (2, offset) a damaged tail to walk from that record; and (3, call) the
 * serialized ApiCall this lane completed at that point (in line, so that calls come out in the
 * order their last packets arrived, whichever path made them). packets_consumed counts the
 * batch's packets taken into held flows (some may already be back inside this batch's handovers);
 * counters["packets"] is net of every packet handed back. Counters are only listed when non-zero.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* BLAKE2b (RFC 7693), unkeyed                                                                 */
/* ------------------------------------------------------------------------------------------ */

static const uint64_t blake2b_iv[8] = {
    0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL, 0xA54FF53A5F1D36F1ULL,
    0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL, 0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL,
};

static const uint8_t blake2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t rotr64(uint64_t value, unsigned bits) { return (value >> bits) | (value << (64 - bits)); }

static inline uint64_t load64_le(const uint8_t *p) {
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) | ((uint64_t)p[3] << 24) |
           ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) | ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
}

#define B2_G(a, b, c, d, x, y)          \
    do {                                \
        v[a] = v[a] + v[b] + (x);       \
        v[d] = rotr64(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];             \
        v[b] = rotr64(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y);       \
        v[d] = rotr64(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];             \
        v[b] = rotr64(v[b] ^ v[c], 63); \
    } while (0)

static void blake2b_compress(uint64_t h[8], const uint8_t block[128], uint64_t counter_low, uint64_t counter_high,
                             int last) {
    uint64_t v[16], m[16];
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = blake2b_iv[i];
    }
    v[12] ^= counter_low;
    v[13] ^= counter_high;
    if (last) v[14] = ~v[14];
    for (int i = 0; i < 16; i++) m[i] = load64_le(block + 8 * i);
    /* Unrolled, the message schedule is constants and m[] stays in registers: twice as fast here
       than the loop reading blake2b_sigma at run time (a call id is one block per call). */
#pragma GCC unroll 12
    for (int round = 0; round < 12; round++) {
        const uint8_t *s = blake2b_sigma[round];
        B2_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        B2_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        B2_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        B2_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        B2_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        B2_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        B2_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        B2_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* The digest of `parts` (concatenated) as lower-case hex into `hex` (2 * digest_size chars). */
static void blake2b_hex_parts(const uint8_t *const *parts, const size_t *lengths, int count, int digest_size,
                              char *hex) {
    uint64_t h[8];
    uint8_t block[128];
    size_t filled = 0;
    uint64_t total_low = 0, total_high = 0;
    for (int i = 0; i < 8; i++) h[i] = blake2b_iv[i];
    h[0] ^= 0x01010000ULL ^ (uint64_t)digest_size;
    for (int part = 0; part < count; part++) {
        const uint8_t *data = parts[part];
        size_t length = lengths[part];
        while (length > 0) {
            if (filled == 128) {
                /* A full block is compressed only once more input follows: the last one is final. */
                total_low += 128;
                if (total_low < 128) total_high++;
                blake2b_compress(h, block, total_low, total_high, 0);
                filled = 0;
            }
            size_t take = 128 - filled;
            if (take > length) take = length;
            memcpy(block + filled, data, take);
            filled += take;
            data += take;
            length -= take;
        }
    }
    total_low += filled;
    if (total_low < filled) total_high++;
    memset(block + filled, 0, 128 - filled);
    blake2b_compress(h, block, total_low, total_high, 1);
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < digest_size; i++) {
        uint8_t byte = (uint8_t)(h[i / 8] >> (8 * (i % 8)));
        hex[2 * i] = digits[byte >> 4];
        hex[2 * i + 1] = digits[byte & 15];
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Growable byte buffers                                                                       */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    uint8_t *data;
    size_t len;
    size_t cap;
} buf_t;

static int buf_reserve(buf_t *buf, size_t extra) {
    if (buf->len + extra <= buf->cap) return 0;
    size_t cap = buf->cap ? buf->cap : 256;
    while (cap < buf->len + extra) cap *= 2;
    uint8_t *data = PyMem_Realloc(buf->data, cap);
    if (data == NULL) return -1;
    buf->data = data;
    buf->cap = cap;
    return 0;
}

static int buf_put(buf_t *buf, const void *data, size_t len) {
    if (len == 0) return 0;
    if (buf_reserve(buf, len)) return -1;
    memcpy(buf->data + buf->len, data, len);
    buf->len += len;
    return 0;
}

static void buf_free(buf_t *buf) {
    PyMem_Free(buf->data);
    buf->data = NULL;
    buf->len = buf->cap = 0;
}

/* Drop the bytes, and the memory too when a large message left a large buffer behind. */
static void buf_reset(buf_t *buf) {
    buf->len = 0;
    if (buf->cap > 65536) buf_free(buf);
}

/* ------------------------------------------------------------------------------------------ */
/* Protobuf wire format                                                                        */
/* ------------------------------------------------------------------------------------------ */

static size_t varint_size(uint64_t value) {
    size_t size = 1;
    while (value >= 0x80) {
        value >>= 7;
        size++;
    }
    return size;
}

static int pb_varint(buf_t *out, uint64_t value) {
    if (buf_reserve(out, 10)) return -1;
    uint8_t *p = out->data + out->len;
    while (value >= 0x80) {
        *p++ = (uint8_t)(value | 0x80);
        value >>= 7;
    }
    *p++ = (uint8_t)value;
    out->len = (size_t)(p - out->data);
    return 0;
}

/* A varint field; proto3 leaves zero out. */
static int pb_uint(buf_t *out, unsigned field, uint64_t value) {
    if (value == 0) return 0;
    return pb_varint(out, (uint64_t)field << 3) || pb_varint(out, value);
}

/* A length-delimited field; proto3 leaves empty strings and bytes out. */
static int pb_bytes(buf_t *out, unsigned field, const void *data, size_t len) {
    if (len == 0) return 0;
    return pb_varint(out, ((uint64_t)field << 3) | 2) || pb_varint(out, len) || buf_put(out, data, len);
}

/* A sub-message field, always written (its presence is part of the record). */
static int pb_message(buf_t *out, unsigned field, const buf_t *message) {
    return pb_varint(out, ((uint64_t)field << 3) | 2) || pb_varint(out, message->len) ||
           buf_put(out, message->data, message->len);
}

/* ------------------------------------------------------------------------------------------ */
/* Callback answer caches: raw name -> small int, bounded like the Redactor's own (4096)       */
/* ------------------------------------------------------------------------------------------ */

#define CACHE_SLOTS 8192
#define CACHE_LIMIT 4096

typedef struct {
    uint8_t *key; /* NULL: empty slot */
    size_t len;
    uint64_t hash;
    int value;
} cache_slot_t;

typedef struct {
    cache_slot_t *slots; /* CACHE_SLOTS, allocated on first insert */
    size_t count;
} cache_t;

static uint64_t hash_bytes(const uint8_t *data, size_t len) {
    uint64_t hash = 0xCBF29CE484222325ULL;
    for (size_t i = 0; i < len; i++) {
        hash ^= data[i];
        hash *= 0x100000001B3ULL;
    }
    return hash;
}

/* The cached answer, or -1. */
static int cache_get(const cache_t *cache, const uint8_t *key, size_t len, uint64_t hash) {
    if (cache->slots == NULL) return -1;
    size_t index = (size_t)hash & (CACHE_SLOTS - 1);
    for (;;) {
        const cache_slot_t *slot = &cache->slots[index];
        if (slot->key == NULL) return -1;
        if (slot->hash == hash && slot->len == len && memcmp(slot->key, key, len) == 0) return slot->value;
        index = (index + 1) & (CACHE_SLOTS - 1);
    }
}

static void cache_put(cache_t *cache, const uint8_t *key, size_t len, uint64_t hash, int value) {
    if (cache->count >= CACHE_LIMIT) return;
    if (cache->slots == NULL) {
        cache->slots = PyMem_Calloc(CACHE_SLOTS, sizeof(cache_slot_t));
        if (cache->slots == NULL) return; /* uncached: the callback answers again next time */
    }
    uint8_t *copy = PyMem_Malloc(len ? len : 1);
    if (copy == NULL) return;
    memcpy(copy, key, len);
    size_t index = (size_t)hash & (CACHE_SLOTS - 1);
    while (cache->slots[index].key != NULL) index = (index + 1) & (CACHE_SLOTS - 1);
    cache->slots[index].key = copy;
    cache->slots[index].len = len;
    cache->slots[index].hash = hash;
    cache->slots[index].value = value;
    cache->count++;
}

static void cache_free(cache_t *cache) {
    if (cache->slots != NULL) {
        for (size_t i = 0; i < CACHE_SLOTS; i++) PyMem_Free(cache->slots[i].key);
        PyMem_Free(cache->slots);
    }
    cache->slots = NULL;
    cache->count = 0;
}

#include "_pbjson.h"

/* ------------------------------------------------------------------------------------------ */
/* Demotion reasons (counter names: express_demotions_<name>)                                  */
/* ------------------------------------------------------------------------------------------ */

enum reason {
    R_NONE = 0,
    R_RST,
    R_FIN,
    R_SYN,
    R_URG,
    R_FLAGS,      /* no ACK on an established flow */
    R_HANDSHAKE,  /* anything but the one SYN-ACK before the handshake completed */
    R_REORDER,    /* payload before or after the next expected byte */
    R_KEEPALIVE,  /* one old byte at next-1 */
    R_ACK,        /* the peer acknowledged bytes never seen */
    R_WINDOW,     /* zero window */
    R_PACKET,     /* a packet of the flow this lane cannot decode (options, fragments, other links) */
    R_NOT_HTTP,   /* first payload not a complete request line, or server talking first */
    R_HEADER,     /* a head outside the accepted subset (bytes, folding, whitespace, duplicates...) */
    R_CHUNKED,    /* Transfer-Encoding */
    R_ENCODING,   /* Content-Encoding */
    R_UPGRADE,    /* Upgrade, CONNECT */
    R_EXPECT,     /* Expect (100-continue) */
    R_STATUS,     /* 1xx */
    R_CLOSE,      /* response framed by the connection's close */
    R_PIPELINING, /* client bytes while a request is pending */
    R_EARLY,      /* server bytes with no complete request to answer */
    R_CRLF,       /* stray CRLF before a message */
    R_URL,        /* '@' in the target, or a URL-valued header with a query or user information */
    R_FORM,       /* form or multipart body (redacted by the Python path) */
    R_BODY_SECRET,/* a JSON body with escapes or a secret-named key */
    R_LIMIT,      /* head or retained bytes past the limit */
    R_CALLBACK,   /* a redaction callback failed */
    R_MEMORY,     /* an allocation failed */
    R_STALE,      /* demote_stale: a timeout is the Python path's to report */
    R_FINISH,     /* demote_all */
    R_ROOM,       /* demote_oldest: the flow table is full */
    R_DNS,        /* a DNS message outside what dns._parse_common reads (or a '?'/'@' in its name) */
    R_DNS_SIDE,   /* a query from the server's side, a response from the client's */
    R_RETRANSMIT, /* a query equal to a pending one */
    R_UNPAIRED,   /* a response without its pending query */
    R_GRAPHQL,    /* a body graphql.parse_request might take: the Python path makes the call graphql */
    R_H2,         /* an HTTP/2 frame outside the held subset (_express_h2.h) */
    R_H2_STREAM,  /* an HTTP/2 stream event the Python path handles (reset, GOAWAY, push, unknown stream) */
    R_GRPC,       /* a stream that is not a gRPC call the lane reads whole (codec, compression, status...) */
    R_REDIS,      /* a Redis message or command outside the held subset (_express_redis.h) */
    R_KAFKA,      /* a Kafka frame outside the held subset (_express_kafka.h) */
    R_COUNT
};

static const char *const reason_names[R_COUNT] = {
    "",       "rst",      "fin",     "syn",       "urg",    "flags",      "handshake", "reorder",
    "keepalive", "ack_unseen", "window", "packet",   "not_http", "header",  "chunked",   "encoding",
    "upgrade", "expect",  "status",  "close",     "pipelining", "early",  "crlf",      "url",
    "form",   "body_secret", "limit", "callback",  "memory", "stale",      "finish", "room",
    "dns",    "dns_side", "retransmit", "unpaired", "graphql", "http2", "http2_stream", "grpc", "redis", "kafka",
};

/* ------------------------------------------------------------------------------------------ */
/* Flows                                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* Both directions of a flow hash to one key: the lower (ip, port) endpoint first. */
typedef struct {
    uint32_t node;
    uint16_t port_a, port_b;
    uint32_t family;
    uint32_t proto; /* 6 TCP, 17 UDP */
    uint8_t ip_a[16], ip_b[16];
} flow_key_t;

typedef struct {
    int64_t next, base, acked, last_start;
    int acked_set;
    int finished; /* its FIN seen, in order (Python: HalfStream.finished; next is then fin_at + 1) */
    PyObject *last_data; /* bytes: the last in-order segment delivered (Python's HalfStream.last_data) */
} half_t;

/* Everything Python needs to rebuild the flow at a quiescent point. */
typedef struct {
    int64_t first_ts, last_ts, syn_ts;
    half_t halves[2];
    int64_t ordinal;
    int64_t offsets[2];
} snapshot_t;

enum { HDR_OTHER = 0, HDR_HOST, HDR_USER_AGENT, HDR_CONTENT_TYPE, HDR_CONTENT_LENGTH, HDR_TRACEPARENT,
       HDR_TRACESTATE, HDR_B3, HDR_B3_TRACE, HDR_B3_SPAN, HDR_TRANSFER_ENCODING, HDR_CONTENT_ENCODING,
       HDR_UPGRADE, HDR_EXPECT,
       /* HTTP/2 and gRPC (_express_h2.h) */
       HDR_H2_METHOD, HDR_H2_PATH, HDR_H2_AUTHORITY, HDR_H2_STATUS, HDR_GRPC_ENCODING, HDR_GRPC_TIMEOUT,
       HDR_GRPC_STATUS, HDR_GRPC_MESSAGE, HDR_GRPC_TRACE_BIN, HDR_SPECIAL_COUNT };

typedef struct {
    uint32_t name_off, name_len, value_off, value_len;
    int kind; /* header_kind: 0 keep, 1 redact, 2 URL-valued */
} header_t;

/* One message head: the raw bytes (partial until the blank line) and what was found in them. */
typedef struct {
    buf_t raw;
    int64_t ts; /* of the packet holding the head's first byte */
    header_t *headers;
    uint32_t count, cap;
    int special[HDR_SPECIAL_COUNT]; /* index of the header with that name, or -1 */
    uint32_t method_len, target_off, target_len; /* request */
    int status;                                  /* response */
    uint32_t reason_off, reason_len;
    int64_t content_length; /* -1 when absent */
} head_t;

/* A DNS query waiting for its response (DnsTransactions._pending). */
typedef struct {
    uint16_t id, qtype, qclass;
    int64_t ts, ordinal;
    size_t size;
    buf_t name; /* the question as asked (presentation form, case kept) */
} dns_pending_t;

/* CLOSING: a FIN from one side, taken at a quiescent point; CLOSED: both FINs, the flow
   lingers like tcp.py's closed flows (CLOSED_LINGER_NS) so late packets do not open a new one. */
enum stage { STAGE_SYN_SENT, STAGE_ESTABLISHED, STAGE_CLOSING, STAGE_CLOSED };

/* tcp.CLOSED_LINGER_NS: a closed flow is forgotten once this long without a packet. */
#define CLOSED_LINGER_NS 2000000000LL
enum phase { PHASE_IDLE, PHASE_REQUEST_HEAD, PHASE_REQUEST_BODY, PHASE_WAIT_RESPONSE, PHASE_RESPONSE_HEAD,
             PHASE_RESPONSE_BODY };

typedef struct flow_s {
    flow_key_t key;
    struct flow_s *chain;       /* hash bucket chain */
    struct flow_s *prev, *next; /* every flow, oldest adoption first */
    int client_is_a;            /* the client is key.ip_a/port_a */
    PyObject *node;             /* str */
    Py_ssize_t shard;
    int link_type;
    PyObject *client_text, *server_text, *prefix; /* from flow_strings */
    PyObject *client_ip, *server_ip;              /* raw address bytes */
    uint16_t client_port, server_port;
    int stage;
    int64_t first_ts, last_ts, syn_ts;
    half_t halves[2];
    int64_t ordinal;
    int64_t offsets[2];
    int exchanges;  /* completed exchanges: the first quiescent point comes after the first */
    int has_snapshot;
    snapshot_t snapshot;
    /* Packets since the snapshot (or the SYN), for a replay. */
    PyObject **retained;
    int64_t *retained_ts;
    size_t retained_count, retained_cap, retained_bytes;
    size_t *retained_total; /* the lane's sum over every flow (Express.retained_total) */
    /* HTTP */
    int phase;
    int client_spoke;
    head_t request, response;
    buf_t request_body, response_body;
    int64_t request_body_size, response_body_size, remaining;
    int64_t request_end_ts, response_end_ts;
    int64_t call_ordinal;
    buf_t path; /* the target, query redacted */
    int head_request;
    char trace_id[32], parent_span_id[16];
    int has_trace, trace_state; /* trace_state: index of the tracestate header to copy, or -1 */
    /* DNS over UDP (udp set): the queries pending in asking order, and the calls answered since
       the last quiescent point, held until no query is pending (a demotion before that replays
       them, so they must not have left). */
    int udp;
    dns_pending_t *pending;
    size_t pending_count, pending_cap;
    PyObject **held;
    size_t held_count, held_cap;
    /* The questions of the held calls (pairing order), and the last DNS_ANSWERED questions
       answered as of the last quiescent point, oldest first (DnsTransactions._answered, handed
       over so that the Python path tells a duplicate response from an unpaired one). */
    dns_pending_t *answering;
    size_t answering_count, answering_cap;
    dns_pending_t *answered;
    size_t answered_count, answered_cap;
    /* HTTP/2 (prior knowledge): set once the client's preface came (_express_h2.h). */
    struct h2conn_s *h2;
    /* Redis (_express_redis.h): set once the client's first command came. */
    struct redisconn_s *redis;
    /* Kafka (_express_kafka.h): set once the client's first request came. */
    struct kafkaconn_s *kafka;
    /* HTTP/2 and Redis send each call as it finishes, with others outstanding: the ids of those
       sent since the snapshot (24 hex digits each), which a replay in Python makes again and the
       engine drops (engine._take_back). */
    buf_t emitted;
} flow_t;

/* One DNS message as dns._parse_common reads it: the question, and for a response the answer
   rrsets as dnspython merges them. Texts live in `text` (offsets, as it may grow). */
#define DNS_MAX_LABELS 128
#define DNS_MAX_ANSWERS 64 /* dns.MAX_ANSWERS: more answer records than this go to Python */
#define DNS_MAX_ANSWER_DATA 512
#define DNS_MAX_PENDING 16
#define DNS_MAX_HELD 64
#define DNS_ANSWERED 16 /* dns.ANSWERED_REMEMBERED */

typedef struct {
    uint32_t off, len;
} span_t;

typedef struct {
    span_t labels[DNS_MAX_LABELS];
    int count, hops;
} dns_name_t;

typedef struct {
    span_t text, raw;
} dns_data_t;

typedef struct {
    span_t owner, key; /* the first record's owner; its lower-cased form */
    uint16_t rdtype;
    uint32_t ttl;
    int datas[DNS_MAX_ANSWERS];
    int data_count;
} dns_rrset_t;

typedef struct {
    uint16_t id, flags, qtype, qclass;
    uint16_t counts[4];
    int is_response, rcode, url_chars, question_hops;
    span_t qname;
    buf_t text;
    dns_data_t datas[DNS_MAX_ANSWERS];
    int data_count;
    dns_rrset_t rrsets[DNS_MAX_ANSWERS];
    int rrset_count;
} dns_msg_t;

typedef struct {
    flow_key_t key;
    uint64_t generation;
} routed_slot_t;

typedef struct {
    PyObject_HEAD
    PyObject *header_kind, *param_is_secret, *key_is_secret, *flow_strings;
    Py_ssize_t max_body_bytes, max_header_bytes, max_flows, max_retained_bytes, max_total_retained_bytes;
    size_t retained_total; /* bytes retained by every flow: bounded like the Python path's buffers */
    flow_t **buckets;
    size_t bucket_count, active;
    flow_t *first, *last;
    PyObject **nodes; /* node names seen (str), index = flow_key_t.node */
    size_t node_count, node_cap;
    routed_slot_t *routed; /* keys handed to Python in the current batch */
    size_t routed_cap, routed_count;
    uint64_t generation;
    cache_t kinds, params, keys;
    int busy;
    long long packets, tcp_flows, tcp_flows_http, adopted, demotions, calls_http, closed_forgotten;
    long long udp_flows, udp_flows_dns, dns_adopted, calls_dns, udp_ended;
    int http2; /* hold HTTP/2 flows (off when gRPC descriptor sets are configured: Python decodes with them) */
    long long tcp_flows_http2, calls_grpc;
    PyObject *redis_rule; /* redis.lane_rule; NULL: Redis flows are Python's */
    cache_t redis_rules;
    long long tcp_flows_redis, calls_redis;
    /* Kafka: kafka.lane_api and the engine's detection (express.first_chunk_claims); NULL: Python's. */
    PyObject *kafka_api, *kafka_claims;
    struct kapi_s *kafka_apis;
    size_t kafka_api_count, kafka_api_cap;
    cache_t kafka_api_cache;
    char *kafka_error_names; /* 48 bytes per code -1..1022, from kafka.ERRORS; "" where it has none */
    long long tcp_flows_kafka, calls_kafka;
    long long demotions_by[R_COUNT];
    PyObject *empty_bytes;
    size_t tcp_active, udp_active;
    /* DNS over UDP: off when dns_flow_strings is None. */
    PyObject *dns_flow_strings, *dns_type_text, *dns_rcode_text, *edns_option_opaque;
    Py_ssize_t max_pending_requests;
    PyObject **type_texts;  /* 65536 slots, by qtype/rdtype: str, from dns_type_text */
    PyObject **rcode_texts; /* 4096 slots, by extended rcode */
    uint8_t option_known[8192], option_opaque[8192]; /* bit per EDNS option code */
    dns_msg_t dns;
} Express;

#define MAX_NODES 4096
#define MAX_HEADERS 256
/* http1.MAX_LINE: a partial head whose start line has no CRLF in this many bytes is an error there. */
#define MAX_LINE 8192

static uint64_t key_hash(const flow_key_t *key) {
    return hash_bytes((const uint8_t *)key, sizeof(*key));
}

static flow_t *flow_find(Express *self, const flow_key_t *key) {
    if (self->buckets == NULL) return NULL;
    flow_t *flow = self->buckets[key_hash(key) & (self->bucket_count - 1)];
    while (flow != NULL && memcmp(&flow->key, key, sizeof(*key)) != 0) flow = flow->chain;
    return flow;
}

static int table_grow(Express *self) {
    size_t count = self->bucket_count ? self->bucket_count * 2 : 1024;
    flow_t **buckets = PyMem_Calloc(count, sizeof(flow_t *));
    if (buckets == NULL) return -1;
    for (flow_t *flow = self->first; flow != NULL; flow = flow->next) {
        size_t index = key_hash(&flow->key) & (count - 1);
        flow->chain = buckets[index];
        buckets[index] = flow;
    }
    PyMem_Free(self->buckets);
    self->buckets = buckets;
    self->bucket_count = count;
    return 0;
}

static int flow_insert(Express *self, flow_t *flow) {
    if ((self->active + 1 > self->bucket_count) && table_grow(self)) return -1;
    size_t index = key_hash(&flow->key) & (self->bucket_count - 1);
    flow->chain = self->buckets[index];
    self->buckets[index] = flow;
    flow->prev = self->last;
    flow->next = NULL;
    if (self->last) self->last->next = flow;
    else self->first = flow;
    self->last = flow;
    self->active++;
    if (flow->udp) self->udp_active++;
    else self->tcp_active++;
    return 0;
}

static void flow_unlink(Express *self, flow_t *flow) {
    flow_t **link = &self->buckets[key_hash(&flow->key) & (self->bucket_count - 1)];
    while (*link != flow) link = &(*link)->chain;
    *link = flow->chain;
    if (flow->prev) flow->prev->next = flow->next;
    else self->first = flow->next;
    if (flow->next) flow->next->prev = flow->prev;
    else self->last = flow->prev;
    self->active--;
    if (flow->udp) self->udp_active--;
    else self->tcp_active--;
}

static void head_free(head_t *head) {
    buf_free(&head->raw);
    PyMem_Free(head->headers);
    head->headers = NULL;
    head->count = head->cap = 0;
}

static void retained_clear(flow_t *flow) {
    for (size_t i = 0; i < flow->retained_count; i++) Py_DECREF(flow->retained[i]);
    if (flow->retained_total != NULL) *flow->retained_total -= flow->retained_bytes;
    flow->retained_count = 0;
    flow->retained_bytes = 0;
    if (flow->retained_cap > 64) {
        PyMem_Free(flow->retained);
        PyMem_Free(flow->retained_ts);
        flow->retained = NULL;
        flow->retained_ts = NULL;
        flow->retained_cap = 0;
    }
}

struct h2conn_s;
static void h2conn_free(struct h2conn_s *h2);
struct redisconn_s;
static void redisconn_free(struct redisconn_s *redis);
struct kafkaconn_s;
static void kafkaconn_free(struct kafkaconn_s *kafka);

static void flow_free(flow_t *flow) {
    h2conn_free(flow->h2);
    redisconn_free(flow->redis);
    kafkaconn_free(flow->kafka);
    buf_free(&flow->emitted);
    retained_clear(flow);
    PyMem_Free(flow->retained);
    PyMem_Free(flow->retained_ts);
    for (int d = 0; d < 2; d++) {
        Py_XDECREF(flow->halves[d].last_data);
        Py_XDECREF(flow->snapshot.halves[d].last_data);
    }
    Py_XDECREF(flow->node);
    Py_XDECREF(flow->client_text);
    Py_XDECREF(flow->server_text);
    Py_XDECREF(flow->prefix);
    Py_XDECREF(flow->client_ip);
    Py_XDECREF(flow->server_ip);
    head_free(&flow->request);
    head_free(&flow->response);
    buf_free(&flow->request_body);
    buf_free(&flow->response_body);
    buf_free(&flow->path);
    for (size_t i = 0; i < flow->pending_count; i++) buf_free(&flow->pending[i].name);
    PyMem_Free(flow->pending);
    for (size_t i = 0; i < flow->held_count; i++) Py_DECREF(flow->held[i]);
    PyMem_Free(flow->held);
    for (size_t i = 0; i < flow->answering_count; i++) buf_free(&flow->answering[i].name);
    PyMem_Free(flow->answering);
    for (size_t i = 0; i < flow->answered_count; i++) buf_free(&flow->answered[i].name);
    PyMem_Free(flow->answered);
    PyMem_Free(flow);
}

/* -- the per-batch set of keys routed to Python ------------------------------------------- */

static int routed_contains(const Express *self, const flow_key_t *key) {
    if (self->routed == NULL) return 0;
    size_t index = key_hash(key) & (self->routed_cap - 1);
    for (;;) {
        const routed_slot_t *slot = &self->routed[index];
        if (slot->generation != self->generation) return 0;
        if (memcmp(&slot->key, key, sizeof(*key)) == 0) return 1;
        index = (index + 1) & (self->routed_cap - 1);
    }
}

static int routed_add(Express *self, const flow_key_t *key) {
    if (routed_contains(self, key)) return 0;
    if (self->routed == NULL || (self->routed_count + 1) * 2 > self->routed_cap) {
        size_t cap = self->routed_cap ? self->routed_cap * 2 : 1024;
        routed_slot_t *slots = PyMem_Calloc(cap, sizeof(routed_slot_t));
        if (slots == NULL) return -1;
        for (size_t i = 0; i < self->routed_cap; i++) {
            if (self->routed[i].generation != self->generation) continue;
            size_t index = key_hash(&self->routed[i].key) & (cap - 1);
            while (slots[index].generation == self->generation) index = (index + 1) & (cap - 1);
            slots[index] = self->routed[i];
        }
        PyMem_Free(self->routed);
        self->routed = slots;
        self->routed_cap = cap;
    }
    size_t index = key_hash(key) & (self->routed_cap - 1);
    while (self->routed[index].generation == self->generation) index = (index + 1) & (self->routed_cap - 1);
    self->routed[index].key = *key;
    self->routed[index].generation = self->generation;
    self->routed_count++;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Decoding a frame                                                                            */
/* ------------------------------------------------------------------------------------------ */

enum decoded { DEC_OTHER, DEC_TCP, DEC_UDP, DEC_KEY, DEC_FRAGMENT };

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10
#define TH_URG 0x20

typedef struct {
    int family; /* 4 or 6 */
    int proto;  /* 6 TCP, 17 UDP */
    const uint8_t *src, *dst;
    uint16_t sport, dport;
    uint32_t seq, ack;
    uint8_t flags;
    uint16_t window;
    const uint8_t *payload;
    size_t payload_len;
} segment_t;

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static int is_vlan(unsigned ethertype) {
    return ethertype == 0x8100 || ethertype == 0x88A8 || ethertype == 0x9100 || ethertype == 0x9200;
}

/* The TCP header at `tcp` (`len` bytes of IP payload): DEC_TCP when whole and sane, else DEC_KEY
   when at least the ports are there (Python may still make or touch a flow of them). */
static int decode_tcp(const uint8_t *tcp, size_t len, int whole, segment_t *out) {
    if (len < 4) return DEC_OTHER;
    out->sport = be16(tcp);
    out->dport = be16(tcp + 2);
    if (!whole || len < 20) return DEC_KEY;
    size_t header = (size_t)(tcp[12] >> 4) * 4;
    if (header < 20 || header > len) return DEC_KEY;
    out->seq = be32(tcp + 4);
    out->ack = be32(tcp + 8);
    out->flags = tcp[13];
    out->window = be16(tcp + 14);
    out->payload = tcp + header;
    out->payload_len = len - header;
    return DEC_TCP;
}

/* The UDP header at `udp`: DEC_UDP when whole with a sane length (the datagram is then
   payload[0:payload_len], as engine._udp cuts it), else DEC_KEY when the ports are there. */
static int decode_udp(const uint8_t *udp, size_t len, int whole, segment_t *out) {
    if (len < 4) return DEC_OTHER;
    out->sport = be16(udp);
    out->dport = be16(udp + 2);
    if (!whole || len < 8) return DEC_KEY;
    size_t length = be16(udp + 4);
    if (length < 8 || length > len) return DEC_KEY;
    out->seq = out->ack = 0;
    out->flags = 0;
    out->window = 0;
    out->payload = udp + 8;
    out->payload_len = length - 8;
    return DEC_UDP;
}

static int decode_transport(unsigned proto, const uint8_t *data, size_t len, int whole, segment_t *out) {
    out->proto = (int)proto;
    return proto == 6 ? decode_tcp(data, len, whole, out) : decode_udp(data, len, whole, out);
}

/* IPv4 at `ip` (`len` captured bytes). */
static int decode_ipv4(const uint8_t *ip, size_t len, int takeable, segment_t *out) {
    if (len < 20 || ip[0] >> 4 != 4) return DEC_OTHER;
    size_t header = (size_t)(ip[0] & 15) * 4;
    size_t total = be16(ip + 2);
    unsigned proto = ip[9];
    if (header < 20 || total < header || len < header || (proto != 6 && proto != 17)) return DEC_OTHER;
    out->family = 4;
    out->src = ip + 12;
    out->dst = ip + 16;
    unsigned fragment = be16(ip + 6) & 0x3FFF;
    size_t end = total <= len ? total : len; /* Python keeps what was captured */
    if (fragment) {
        if (fragment & 0x1FFF) return DEC_FRAGMENT; /* a later piece: no ports in it */
        int found = decode_transport(proto, ip + header, end - header, 0, out);
        return found == DEC_OTHER ? DEC_FRAGMENT : DEC_KEY;
    }
    int sane = takeable && header == 20 && total >= (proto == 6 ? 40 : 28) && total <= len;
    return decode_transport(proto, ip + header, end - header, sane, out);
}

/* IPv6 at `ip`: TCP right after the fixed header is takeable; extension headers are walked as
   layers.py does, only to find the ports. */
static int decode_ipv6(const uint8_t *ip, size_t len, int takeable, segment_t *out) {
    if (len < 40 || ip[0] >> 4 != 6) return DEC_OTHER;
    size_t payload_len = be16(ip + 4);
    unsigned next = ip[6];
    out->family = 6;
    out->src = ip + 8;
    out->dst = ip + 24;
    size_t end = 40 + payload_len;
    int sane = takeable && payload_len >= (next == 6 ? 20 : 8) && end <= len;
    if (end > len || payload_len == 0) end = len;
    const uint8_t *body = ip + 40;
    size_t size = end - 40, position = 0;
    if (next == 6 || next == 17) return decode_transport(next, body, size, sane, out);
    for (int hop = 0; hop < 16; hop++) {
        if (next == 0 || next == 43 || next == 60 || next == 135 || next == 139 || next == 140 || next == 253 ||
            next == 254) {
            if (size < position + 8) return DEC_OTHER;
            size_t length = ((size_t)body[position + 1] + 1) * 8;
            next = body[position];
            position += length;
        } else if (next == 51) {
            if (size < position + 8) return DEC_OTHER;
            size_t length = ((size_t)body[position + 1] + 2) * 4;
            next = body[position];
            position += length;
        } else if (next == 44) {
            if (size < position + 8) return DEC_OTHER;
            unsigned inner = body[position];
            unsigned frag = be16(body + position + 2);
            if (frag & 0xFFF9) {
                if (inner != 6 && inner != 17) return DEC_OTHER;
                if (frag & 0xFFF8) return DEC_FRAGMENT;
                int found = decode_transport(inner, body + position + 8, size - position - 8, 0, out);
                return found == DEC_OTHER ? DEC_FRAGMENT : DEC_KEY;
            }
            next = inner;
            position += 8;
        } else {
            if ((next != 6 && next != 17) || position > size) return DEC_OTHER;
            return decode_transport(next, body + position, size - position, 0, out) == DEC_OTHER ? DEC_OTHER : DEC_KEY;
        }
    }
    return DEC_OTHER;
}

/* DEC_TCP: a segment this lane may take (Ethernet, plain IPv4 or IPv6, sane lengths); DEC_KEY:
   a TCP segment it does not take, with its ports; DEC_FRAGMENT: a TCP fragment without them. */
static int decode_frame(int link_type, const uint8_t *frame, size_t len, segment_t *out) {
    size_t offset;
    unsigned ethertype;
    /* Past the link header every link type is decoded as layers.PacketDecoder does: the lane
       takes frames of them all (SLL2 is what an `any` capture gives). */
    const int takeable = 1;
    switch (link_type) {
    case 1: /* Ethernet */
        if (len < 14) return DEC_OTHER;
        ethertype = be16(frame + 12);
        offset = 14;
        while (is_vlan(ethertype)) {
            if (len < offset + 4) return DEC_OTHER;
            ethertype = be16(frame + offset + 2);
            offset += 4;
        }
        break;
    case 113: /* Linux SLL */
        if (len < 16) return DEC_OTHER;
        ethertype = be16(frame + 14);
        offset = 16;
        break;
    case 276: /* Linux SLL2 */
        if (len < 20) return DEC_OTHER;
        ethertype = be16(frame);
        offset = 20;
        break;
    case 101:
    case 228:
    case 229: /* raw IP */
        if (len < 1) return DEC_OTHER;
        ethertype = frame[0] >> 4 == 4 ? 0x0800 : frame[0] >> 4 == 6 ? 0x86DD : 0;
        offset = 0;
        break;
    case 0:
    case 108: { /* BSD loopback, either byte order */
        if (len < 4) return DEC_OTHER;
        uint32_t le = (uint32_t)frame[0] | ((uint32_t)frame[1] << 8) | ((uint32_t)frame[2] << 16) |
                      ((uint32_t)frame[3] << 24);
        uint32_t be = be32(frame);
        if (le == 2 || be == 2) ethertype = 0x0800;
        else if (le == 10 || le == 24 || le == 28 || le == 30 || be == 10 || be == 24 || be == 28 || be == 30)
            ethertype = 0x86DD;
        else ethertype = 0;
        offset = 4;
        break;
    }
    default:
        return DEC_OTHER;
    }
    if (ethertype == 0x0800) return decode_ipv4(frame + offset, len - offset, takeable, out);
    if (ethertype == 0x86DD) return decode_ipv6(frame + offset, len - offset, takeable, out);
    return DEC_OTHER;
}

/* The flow key of a segment; *src_is_a tells which side the sender is. */
static void make_key(uint32_t node, const segment_t *segment, flow_key_t *key, int *src_is_a) {
    memset(key, 0, sizeof(*key));
    size_t size = segment->family == 4 ? 4 : 16;
    int order = memcmp(segment->src, segment->dst, size);
    int src_first = order < 0 || (order == 0 && segment->sport <= segment->dport);
    key->node = node;
    key->family = (uint32_t)segment->family;
    key->proto = (uint32_t)segment->proto;
    if (src_first) {
        memcpy(key->ip_a, segment->src, size);
        memcpy(key->ip_b, segment->dst, size);
        key->port_a = segment->sport;
        key->port_b = segment->dport;
    } else {
        memcpy(key->ip_a, segment->dst, size);
        memcpy(key->ip_b, segment->src, size);
        key->port_a = segment->dport;
        key->port_b = segment->sport;
    }
    *src_is_a = src_first;
}

/* Python's HalfStream.unwrap: the 32-bit number nearest to `reference`. */
static inline int64_t unwrap(int64_t reference, uint32_t seq) {
    uint64_t low = (uint64_t)reference & 0xFFFFFFFFULL;
    int64_t delta = (int64_t)((((uint64_t)seq - low + 0x80000000ULL) & 0xFFFFFFFFULL)) - 0x80000000LL;
    return reference + delta;
}

/* ------------------------------------------------------------------------------------------ */
/* HTTP/1 heads: the subset taken here, everything else demotes                               */
/* ------------------------------------------------------------------------------------------ */

/* http1.METHODS; CONNECT is refused by the caller (its 2xx turns the flow into a tunnel). */
static const char *const methods[] = {
    "GET",      "HEAD",   "POST",       "PUT",       "DELETE",      "CONNECT", "OPTIONS",  "TRACE",
    "PATCH",    "PROPFIND", "PROPPATCH", "MKCOL",    "COPY",        "MOVE",    "LOCK",     "UNLOCK",
    "SEARCH",   "REPORT", "PURGE",      "LINK",      "UNLINK",      "MKCALENDAR", "SUBSCRIBE", "UNSUBSCRIBE",
    "NOTIFY",   "M-SEARCH", "ACL",      "BIND",      "REBIND",      "UNBIND",  NULL,
};

static int is_method(const uint8_t *data, size_t len) {
    for (int i = 0; methods[i] != NULL; i++) {
        if (strlen(methods[i]) == len && memcmp(methods[i], data, len) == 0) return 1;
    }
    return 0;
}

/* RFC 9110 token characters. */
static int is_token(uint8_t c) {
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return 1;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static uint8_t lower(uint8_t c) { return (c >= 'A' && c <= 'Z') ? (uint8_t)(c + 32) : c; }

static int equals_lower(const uint8_t *data, size_t len, const char *name) {
    if (strlen(name) != len) return 0;
    for (size_t i = 0; i < len; i++)
        if (lower(data[i]) != (uint8_t)name[i]) return 0;
    return 1;
}

static int special_header(const uint8_t *name, size_t len) {
    switch (len) {
    case 2:
        return equals_lower(name, len, "b3") ? HDR_B3 : HDR_OTHER;
    case 4:
        return equals_lower(name, len, "host") ? HDR_HOST : HDR_OTHER;
    case 6:
        return equals_lower(name, len, "expect") ? HDR_EXPECT : HDR_OTHER;
    case 7:
        return equals_lower(name, len, "upgrade") ? HDR_UPGRADE : HDR_OTHER;
    case 10:
        if (equals_lower(name, len, "user-agent")) return HDR_USER_AGENT;
        return equals_lower(name, len, "tracestate") ? HDR_TRACESTATE : HDR_OTHER;
    case 11:
        if (equals_lower(name, len, "traceparent")) return HDR_TRACEPARENT;
        return equals_lower(name, len, "x-b3-spanid") ? HDR_B3_SPAN : HDR_OTHER;
    case 12:
        if (equals_lower(name, len, "content-type")) return HDR_CONTENT_TYPE;
        return equals_lower(name, len, "x-b3-traceid") ? HDR_B3_TRACE : HDR_OTHER;
    case 14:
        return equals_lower(name, len, "content-length") ? HDR_CONTENT_LENGTH : HDR_OTHER;
    case 16:
        return equals_lower(name, len, "content-encoding") ? HDR_CONTENT_ENCODING : HDR_OTHER;
    case 17:
        return equals_lower(name, len, "transfer-encoding") ? HDR_TRANSFER_ENCODING : HDR_OTHER;
    default:
        return HDR_OTHER;
    }
}

static const uint8_t *find_crlf(const uint8_t *data, size_t len) {
    const uint8_t *end = data + len;
    for (const uint8_t *p = data; p + 1 < end; p++) {
        p = memchr(p, '\r', (size_t)(end - p - 1));
        if (p == NULL) return NULL;
        if (p[1] == '\n') return p;
    }
    return NULL;
}

/* `METHOD SP target SP HTTP/1.x` (the line without its CRLF). */
static int parse_request_line(const uint8_t *line, size_t len, head_t *head) {
    size_t method = 0;
    while (method < len && line[method] != ' ') method++;
    if (method == len || !is_method(line, method)) return R_NOT_HTTP;
    size_t target = method + 1, end = target;
    while (end < len && line[end] != ' ') {
        if (line[end] < 0x21 || line[end] > 0x7E) return R_NOT_HTTP;
        end++;
    }
    if (end == target || len - end != 9 || memcmp(line + end, " HTTP/1.", 8) != 0) return R_NOT_HTTP;
    /* llhttp refuses most other starts; the absolute form (a proxy's) is left to Python. */
    if (line[target] != '/' && !(end == target + 1 && line[target] == '*')) return R_NOT_HTTP;
    if (len > MAX_LINE - 2) return R_LIMIT;
    if (line[len - 1] != '0' && line[len - 1] != '1') return R_NOT_HTTP;
    if (head != NULL) {
        head->method_len = (uint32_t)method;
        head->target_off = (uint32_t)target;
        head->target_len = (uint32_t)(end - target);
    }
    return R_NONE;
}

/* `HTTP/1.x SP DDD [SP reason]`; the reason is everything after that SP, as llhttp reports it. */
static int parse_status_line(const uint8_t *line, size_t len, head_t *head) {
    if (len > MAX_LINE - 2) return R_LIMIT;
    if (len < 12 || memcmp(line, "HTTP/1.", 7) != 0 || (line[7] != '0' && line[7] != '1') || line[8] != ' ')
        return R_HEADER;
    if (line[9] < '1' || line[9] > '9' || line[10] < '0' || line[10] > '9' || line[11] < '0' || line[11] > '9')
        return R_HEADER;
    head->status = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
    head->reason_off = head->reason_len = 0;
    if (len > 12) {
        if (line[12] != ' ') return R_HEADER;
        for (size_t i = 13; i < len; i++)
            if ((line[i] < 0x20 || line[i] > 0x7E) && line[i] != '\t') return R_HEADER;
        head->reason_off = 13;
        head->reason_len = (uint32_t)(len - 13);
    }
    return R_NONE;
}

/* header_kind(name), cached; -1 when the callback failed (reported as unraisable). */
static int header_kind_of(Express *self, const uint8_t *name, size_t len) {
    uint64_t hash = hash_bytes(name, len);
    int kind = cache_get(&self->kinds, name, len, hash);
    if (kind >= 0) return kind;
    PyObject *text = PyUnicode_DecodeASCII((const char *)name, (Py_ssize_t)len, NULL);
    PyObject *answer = text ? PyObject_CallOneArg(self->header_kind, text) : NULL;
    Py_XDECREF(text);
    long value = answer ? PyLong_AsLong(answer) : -1;
    Py_XDECREF(answer);
    if (value == -1 && PyErr_Occurred()) {
        PyErr_WriteUnraisable(self->header_kind);
        return -1;
    }
    kind = value == 1 ? 1 : value == 2 ? 2 : 0;
    cache_put(&self->kinds, name, len, hash, kind);
    return kind;
}

/* A yes/no callback on a name (str when `as_text`, else bytes), cached; -1 when it failed. */
static int secret_of(PyObject *callback, cache_t *cache, const uint8_t *name, size_t len,
                     int as_text) {
    uint64_t hash = hash_bytes(name, len);
    int hit = cache_get(cache, name, len, hash);
    if (hit >= 0) return hit;
    PyObject *argument = as_text ? PyUnicode_DecodeASCII((const char *)name, (Py_ssize_t)len, NULL)
                                 : PyBytes_FromStringAndSize((const char *)name, (Py_ssize_t)len);
    PyObject *answer = argument ? PyObject_CallOneArg(callback, argument) : NULL;
    Py_XDECREF(argument);
    hit = answer ? PyObject_IsTrue(answer) : -1;
    Py_XDECREF(answer);
    if (hit < 0) {
        PyErr_WriteUnraisable(callback);
        return -1;
    }
    cache_put(cache, name, len, hash, hit);
    return hit;
}

/* The header lines of a complete head (raw ends with the blank line); `line_end` is where the
   start line's CRLF is. Fills the spans, the special headers, the kinds and Content-Length. */
static int parse_headers(Express *self, head_t *head, size_t line_end, int request) {
    const uint8_t *raw = head->raw.data;
    size_t size = head->raw.len - 2; /* the blank line's CRLF */
    size_t pos = line_end + 2;
    head->count = 0;
    for (int i = 0; i < HDR_SPECIAL_COUNT; i++) head->special[i] = -1;
    head->content_length = -1;
    while (pos < size) {
        const uint8_t *crlf = find_crlf(raw + pos, size - pos + 2);
        size_t end = (size_t)(crlf - raw); /* found: the head ends with CRLFCRLF */
        size_t name_end = pos;
        while (name_end < end && is_token(raw[name_end])) name_end++;
        if (name_end == pos || name_end == end || raw[name_end] != ':') return R_HEADER;
        size_t value = name_end + 1;
        while (value < end && (raw[value] == ' ' || raw[value] == '\t')) value++;
        for (size_t i = value; i < end; i++)
            if ((raw[i] < 0x20 || raw[i] > 0x7E) && raw[i] != '\t') return R_HEADER;
        if (end > value && (raw[end - 1] == ' ' || raw[end - 1] == '\t')) return R_HEADER;
        if (head->count == MAX_HEADERS) return R_HEADER;
        if (head->count == head->cap) {
            uint32_t cap = head->cap ? head->cap * 2 : 16;
            header_t *headers = PyMem_Realloc(head->headers, cap * sizeof(header_t));
            if (headers == NULL) return R_MEMORY;
            head->headers = headers;
            head->cap = cap;
        }
        header_t *header = &head->headers[head->count];
        header->name_off = (uint32_t)pos;
        header->name_len = (uint32_t)(name_end - pos);
        header->value_off = (uint32_t)value;
        header->value_len = (uint32_t)(end - value);
        const uint8_t *text = raw + value;
        size_t text_len = end - value;
        int special = special_header(raw + pos, name_end - pos);
        if (special != HDR_OTHER) {
            if (head->special[special] >= 0) return R_HEADER; /* Python would join the values */
            head->special[special] = (int)head->count;
            switch (special) {
            case HDR_TRANSFER_ENCODING:
                return R_CHUNKED;
            case HDR_CONTENT_ENCODING:
                return R_ENCODING;
            case HDR_UPGRADE:
                if (request) return R_UPGRADE;
                break;
            case HDR_EXPECT:
                if (request) return R_EXPECT;
                break;
            case HDR_CONTENT_LENGTH: {
                if (text_len < 1 || text_len > 18) return R_HEADER;
                int64_t length = 0;
                for (size_t i = 0; i < text_len; i++) {
                    if (text[i] < '0' || text[i] > '9') return R_HEADER;
                    length = length * 10 + (text[i] - '0');
                }
                head->content_length = length;
                break;
            }
            default:
                break;
            }
        }
        int kind = header_kind_of(self, raw + pos, name_end - pos);
        if (kind < 0) return R_CALLBACK;
        if (kind == 2 && (memchr(text, '?', text_len) || memchr(text, '@', text_len))) return R_URL;
        header->kind = kind;
        head->count++;
        pos = end + 2;
    }
    return R_NONE;
}

/* -- trace context, as http1._trace_context ---------------------------------------------- */

static int lower_hex(const uint8_t *text, size_t len, size_t size) {
    if (len != size) return 0;
    for (size_t i = 0; i < len; i++) {
        uint8_t c = lower(text[i]);
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return 0;
    }
    return 1;
}

/* Split on '-' (at most `max` parts kept); returns the number of parts. */
static int dash_parts(const uint8_t *text, size_t len, const uint8_t **parts, size_t *lengths, int max) {
    int count = 0;
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || text[i] == '-') {
            if (count < max) {
                parts[count] = text + start;
                lengths[count] = i - start;
            }
            count++;
            start = i + 1;
        }
    }
    return count;
}

static void copy_lower(char *out, const uint8_t *text, size_t len) {
    for (size_t i = 0; i < len; i++) out[i] = (char)lower(text[i]);
}

static int b3_ids(flow_t *flow, const uint8_t *trace, size_t trace_len, const uint8_t *span, size_t span_len) {
    if (trace_len == 16) {
        if (!lower_hex(trace, 16, 16) || !lower_hex(span, span_len, 16)) return 0;
        memset(flow->trace_id, '0', 16);
        copy_lower(flow->trace_id + 16, trace, 16);
    } else {
        if (!lower_hex(trace, trace_len, 32) || !lower_hex(span, span_len, 16)) return 0;
        copy_lower(flow->trace_id, trace, 32);
    }
    copy_lower(flow->parent_span_id, span, 16);
    flow->has_trace = 1;
    return 1;
}

static void trace_context(flow_t *flow, const head_t *head) {
    const uint8_t *raw = head->raw.data;
    const uint8_t *parts[4];
    size_t lengths[4];
    flow->has_trace = 0;
    flow->trace_state = -1;
    if (head->special[HDR_TRACEPARENT] < 0 && head->special[HDR_B3] < 0 && head->special[HDR_B3_TRACE] < 0) return;
    /* Values have no surrounding whitespace here: Python's strip() changes nothing. */
    if (head->special[HDR_TRACEPARENT] >= 0) {
        const header_t *h = &head->headers[head->special[HDR_TRACEPARENT]];
        int count = dash_parts(raw + h->value_off, h->value_len, parts, lengths, 4);
        if (count >= 4 && lower_hex(parts[1], lengths[1], 32) && lower_hex(parts[2], lengths[2], 16) &&
            memcmp(parts[1], "00000000000000000000000000000000", 32) != 0) {
            copy_lower(flow->trace_id, parts[1], 32);
            copy_lower(flow->parent_span_id, parts[2], 16);
            flow->has_trace = 1;
            flow->trace_state = head->special[HDR_TRACESTATE];
            return;
        }
    }
    if (head->special[HDR_B3] >= 0) {
        const header_t *h = &head->headers[head->special[HDR_B3]];
        int count = dash_parts(raw + h->value_off, h->value_len, parts, lengths, 4);
        if (count >= 2 && b3_ids(flow, parts[0], lengths[0], parts[1], lengths[1])) return;
    }
    if (head->special[HDR_B3_TRACE] >= 0 && head->special[HDR_B3_SPAN] >= 0) {
        const header_t *t = &head->headers[head->special[HDR_B3_TRACE]];
        const header_t *s = &head->headers[head->special[HDR_B3_SPAN]];
        b3_ids(flow, raw + t->value_off, t->value_len, raw + s->value_off, s->value_len);
    }
}

/* -- the target's query, as Redactor.query ------------------------------------------------ */

/* A value Redactor._pairs parses as JSON (redact.JSON_PARAM_STARTS): '{', '[', or their %-escapes. */
static int json_param(const uint8_t *value, size_t len) {
    if (len >= 1 && (value[0] == '{' || value[0] == '[')) return 1;
    return len >= 3 && value[0] == '%' &&
           ((value[1] == '7' && (value[2] == 'B' || value[2] == 'b')) || (value[1] == '5' && (value[2] == 'B' || value[2] == 'b')));
}

/* `query=` holding a GraphQL document ('{' raw or %-escaped), which Redactor._pairs reads for
   secret arguments; a %-escaped name might unquote to "query", so it is not decided here either. */
static int graphql_query_param(const uint8_t *name, size_t name_len, const uint8_t *value, size_t len) {
    if (!equals_lower(name, name_len, "query") && !memchr(name, '%', name_len)) return 0;
    if (memchr(value, '{', len)) return 1;
    for (size_t i = 0; i + 2 < len; i++)
        if (value[i] == '%' && value[i + 1] == '7' && (value[i + 2] == 'B' || value[i + 2] == 'b')) return 1;
    return 0;
}

static int redact_path(Express *self, flow_t *flow, const uint8_t *target, size_t len) {
    buf_t *out = &flow->path;
    out->len = 0;
    const uint8_t *mark = memchr(target, '?', len);
    if (mark == NULL) return buf_put(out, target, len) ? R_MEMORY : R_NONE;
    size_t base = (size_t)(mark - target);
    const uint8_t *query = mark + 1;
    size_t query_len = len - base - 1;
    const uint8_t *hash = memchr(query, '#', query_len);
    size_t pairs_len = hash ? (size_t)(hash - query) : query_len;
    if (buf_put(out, target, base + 1)) return R_MEMORY;
    size_t start = 0;
    for (;;) {
        const uint8_t *amp = memchr(query + start, '&', pairs_len - start);
        size_t end = amp ? (size_t)(amp - query) : pairs_len;
        const uint8_t *pair = query + start;
        size_t pair_len = end - start;
        const uint8_t *eq = memchr(pair, '=', pair_len);
        size_t name_len = eq ? (size_t)(eq - pair) : pair_len;
        int hit = secret_of(self->param_is_secret, &self->params, pair, name_len, 1);
        if (hit < 0) return R_CALLBACK;
        if (start > 0 && buf_put(out, "&", 1)) return R_MEMORY;
        if (eq && hit) {
            if (buf_put(out, pair, name_len + 1) || buf_put(out, "[REDACTED]", 10)) return R_MEMORY;
        } else if (eq && (json_param(eq + 1, pair_len - name_len - 1) ||
                          graphql_query_param(pair, name_len, eq + 1, pair_len - name_len - 1))) {
            return R_URL; /* a JSON document as a value (GraphQL's GET variables): Redactor._pairs reads its keys */
        } else if (buf_put(out, pair, pair_len)) {
            return R_MEMORY;
        }
        if (amp == NULL) break;
        start = end + 1;
    }
    if (hash && buf_put(out, hash, query_len - pairs_len)) return R_MEMORY;
    return R_NONE;
}

/* -- bodies: what Redactor._body would change demotes ------------------------------------- */

static int contains_lower(const uint8_t *text, size_t len, const char *needle) {
    size_t size = strlen(needle);
    for (size_t i = 0; i + size <= len; i++) {
        size_t j = 0;
        while (j < size && lower(text[i + j]) == (uint8_t)needle[j]) j++;
        if (j == size) return 1;
    }
    return 0;
}

static int is_space(uint8_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

/* redact.JSON_KEY.findall over `text` (`"((?:[^"\\]|\\.){1,256})"\s*:`), each raw key asked of
   Redactor.key_is_secret: 1 when one is secret, 0 when none is, -1 when the callback failed. A
   key's group is forced (an unescaped quote ends it, a backslash takes the next byte unless it
   is a newline), so a match is: 1..256 units, the quote, whitespace, a colon. */
static int json_keys_secret(Express *self, const uint8_t *text, size_t len) {
    size_t i = 0;
    while (i < len) {
        const uint8_t *quote = memchr(text + i, '"', len - i);
        if (quote == NULL) return 0;
        size_t start = (size_t)(quote - text) + 1, j = start, units = 0;
        int matched = 0;
        while (j < len && units <= 256) {
            if (text[j] == '"') break;
            if (text[j] == '\\') {
                if (j + 1 >= len || text[j + 1] == '\n') break;
                j += 2;
            } else {
                j += 1;
            }
            units++;
        }
        if (j < len && text[j] == '"' && units >= 1 && units <= 256) {
            size_t k = j + 1;
            while (k < len && is_space(text[k])) k++; /* regex \s on bytes */
            if (k < len && text[k] == ':') {
                int hit = secret_of(self->key_is_secret, &self->keys, text + start, j - start, 0);
                if (hit) return hit;
                matched = 1;
                i = k + 1;
            }
        }
        if (!matched) i = start;
    }
    return 0;
}

static int check_body(Express *self, const head_t *head, const buf_t *body) {
    if (body->len == 0) return R_NONE;
    const uint8_t *type = NULL;
    size_t type_len = 0;
    if (head->special[HDR_CONTENT_TYPE] >= 0) {
        const header_t *h = &head->headers[head->special[HDR_CONTENT_TYPE]];
        type = head->raw.data + h->value_off;
        type_len = h->value_len;
    }
    if (contains_lower(type, type_len, "x-www-form-urlencoded") || contains_lower(type, type_len, "multipart/form-data"))
        return R_FORM;
    if (contains_lower(type, type_len, "graphql")) return R_GRAPHQL;
    const uint8_t *data = body->data;
    size_t len = body->len, first = 0;
    while (first < len && is_space(data[first])) first++;
    if (!contains_lower(type, type_len, "json") && !(first < len && (data[first] == '{' || data[first] == '[')))
        return R_NONE;
    /* A superset of the JSON bodies graphql.parse_request takes: a "query" member or an
       automatic persisted query's extension. */
    if (memmem(data, len, "\"query\"", 7) || memmem(data, len, "persistedQuery", 14)) return R_GRAPHQL;
    if (memchr(data, '\\', len)) return R_BODY_SECRET;
    int hit = json_keys_secret(self, data, len);
    if (hit < 0) return R_CALLBACK;
    return hit ? R_BODY_SECRET : R_NONE;
}

/* ------------------------------------------------------------------------------------------ */
/* The ApiCall                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static int put_str_object(buf_t *out, unsigned field, PyObject *text) {
    Py_ssize_t len;
    const char *data = PyUnicode_AsUTF8AndSize(text, &len);
    if (data == NULL) return -1;
    return pb_bytes(out, field, data, (size_t)len);
}

static int put_header_value(buf_t *out, unsigned field, const head_t *head, int index) {
    if (index < 0) return 0;
    const header_t *h = &head->headers[index];
    return pb_bytes(out, field, head->raw.data + h->value_off, h->value_len);
}

/* Message.headers (field 4) of a head, values of kind 1 redacted as Redactor.apply does. */
static int put_headers(buf_t *out, const head_t *head) {
    for (uint32_t i = 0; i < head->count; i++) {
        const header_t *h = &head->headers[i];
        const uint8_t *value = head->raw.data + h->value_off;
        size_t value_len = h->value_len;
        if (h->kind == 1) {
            value = (const uint8_t *)"[REDACTED]";
            value_len = 10;
        }
        size_t size = 1 + varint_size(h->name_len) + h->name_len;
        if (value_len) size += 1 + varint_size(value_len) + value_len;
        if (pb_varint(out, (4 << 3) | 2) || pb_varint(out, size) ||
            pb_bytes(out, 1, head->raw.data + h->name_off, h->name_len) || pb_bytes(out, 2, value, value_len))
            return -1;
    }
    return 0;
}

/* Message: ts, end_ts, size, headers (values redacted), body, body_truncated, body_size. */
static int put_message(buf_t *out, unsigned field, buf_t *scratch, const head_t *head, int64_t ts, int64_t end_ts,
                       const buf_t *body, int64_t body_size) {
    scratch->len = 0;
    if (pb_uint(scratch, 1, (uint64_t)ts) || pb_uint(scratch, 2, (uint64_t)end_ts) ||
        pb_uint(scratch, 3, (uint64_t)(head->raw.len + (size_t)body_size)) || put_headers(scratch, head))
        return -1;
    if (pb_bytes(scratch, 5, body->data, body->len) ||
        pb_uint(scratch, 6, (uint64_t)(body_size - (int64_t)body->len)) || pb_uint(scratch, 7, (uint64_t)body_size))
        return -1;
    return pb_message(out, field, scratch);
}

/* `value` in decimal at `text` (at most 20 characters, no terminator); returns the length. */
static int put_decimal_text(char *text, int64_t value) {
    char digits[20];
    int count = 0, length = 0;
    uint64_t magnitude = value < 0 ? (uint64_t)0 - (uint64_t)value : (uint64_t)value;
    do {
        digits[count++] = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude);
    if (value < 0) text[length++] = '-';
    while (count) text[length++] = digits[--count];
    return length;
}

/* What calls.new_call sets on every call: id = blake2b(prefix + b"%d|%d" % (request_ts,
   ordinal), digest_size=12), protocol, transport, node, capture, src and dst. */
static int put_call_head(buf_t *out, buf_t *sub, const flow_t *flow, PyObject *prefix, const char *protocol,
                         const char *transport, int64_t request_ts, int64_t ordinal, char *id_out) {
    char tail[48], id[24];
    /* b"%d|%d" % (request_ts, ordinal), written by hand: snprintf cost as much as the hash here. */
    int tail_len = put_decimal_text(tail, request_ts);
    tail[tail_len++] = '|';
    tail_len += put_decimal_text(tail + tail_len, ordinal);
    const uint8_t *parts[2] = {(const uint8_t *)PyBytes_AS_STRING(prefix), (const uint8_t *)tail};
    size_t lengths[2] = {(size_t)PyBytes_GET_SIZE(prefix), (size_t)tail_len};
    blake2b_hex_parts(parts, lengths, 2, 12, id);
    if (id_out != NULL) memcpy(id_out, id, 24);
    if (pb_bytes(out, 1, id, 24) || pb_bytes(out, 2, protocol, strlen(protocol)) ||
        pb_bytes(out, 3, transport, strlen(transport)) || put_str_object(out, 4, flow->node) ||
        pb_bytes(out, 5, "packet", 6))
        return -1;
    PyObject *texts[2] = {flow->client_text, flow->server_text};
    uint16_t ports[2] = {flow->client_port, flow->server_port};
    for (int side = 0; side < 2; side++) {
        sub->len = 0;
        if (put_str_object(sub, 1, texts[side]) || pb_uint(sub, 2, ports[side]) || pb_message(out, 6 + side, sub))
            return -1;
    }
    return 0;
}

/* The finished exchange as serialized ApiCall bytes (calls.new_call + Http1Parser + finish_call). */
static PyObject *build_call(flow_t *flow) {
    buf_t out = {0}, scratch = {0}, sub = {0};
    PyObject *result = NULL;
    const head_t *request = &flow->request, *response = &flow->response;
    int64_t request_ts = flow->request.ts, response_ts = flow->response.ts;

    if (put_call_head(&out, &sub, flow, flow->prefix, "http", "tcp", request_ts, flow->call_ordinal, NULL)) goto done;
    /* finish_call: a request at time 0 takes the response's time (after elapsed is computed). */
    if (put_message(&out, 8, &scratch, request, request_ts ? request_ts : response_ts, flow->request_end_ts,
                    &flow->request_body, flow->request_body_size) ||
        put_message(&out, 9, &scratch, response, response_ts, flow->response_end_ts, &flow->response_body,
                    flow->response_body_size))
        goto done;
    char status[4];
    snprintf(status, sizeof(status), "%03d", response->status);
    if (pb_bytes(&out, 10, request->raw.data, request->method_len) || pb_bytes(&out, 11, flow->path.data, flow->path.len) ||
        pb_bytes(&out, 12, status, 3) ||
        pb_uint(&out, 13, response_ts > request_ts ? (uint64_t)(response_ts - request_ts) : 0) ||
        pb_uint(&out, 14, response->status >= 500 ? 2 : 1))
        goto done;
    if (flow->has_trace) {
        if (pb_bytes(&out, 15, flow->trace_id, 32) || pb_bytes(&out, 16, flow->parent_span_id, 16) ||
            put_header_value(&out, 17, request, flow->trace_state))
            goto done;
    }
    sub.len = 0;
    const uint8_t *line = request->raw.data;
    size_t line_len = (size_t)request->target_off + request->target_len + 9;
    if (pb_bytes(&sub, 1, line[line_len - 1] == '1' ? "1.1" : "1.0", 3) ||
        put_header_value(&sub, 2, request, request->special[HDR_HOST]) ||
        put_header_value(&sub, 3, request, request->special[HDR_CONTENT_TYPE]) ||
        put_header_value(&sub, 4, response, response->special[HDR_CONTENT_TYPE]) ||
        pb_bytes(&sub, 5, response->raw.data + response->reason_off, response->reason_len) ||
        put_header_value(&sub, 6, request, request->special[HDR_USER_AGENT]) || pb_message(&out, 20, &sub) ||
        pb_uint(&out, 31, (uint64_t)flow->shard))
        goto done;
    result = PyBytes_FromStringAndSize((const char *)out.data, (Py_ssize_t)out.len);
done:
    buf_free(&out);
    buf_free(&scratch);
    buf_free(&sub);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* HTTP per flow                                                                               */
/* ------------------------------------------------------------------------------------------ */

static void body_add(Express *self, buf_t *body, int64_t *size, const uint8_t *data, size_t len, int *failed) {
    *size += (int64_t)len;
    size_t room = (size_t)self->max_body_bytes > body->len ? (size_t)self->max_body_bytes - body->len : 0;
    if (room > len) room = len;
    if (room && buf_put(body, data, room)) *failed = 1;
}

/* Append head bytes; returns the bytes of `data` the head took (all of them when the blank line
   is not there yet), or (size_t)-1 with *reason set. */
static size_t head_add(Express *self, head_t *head, const uint8_t *data, size_t len, int *complete, int *reason) {
    size_t before = head->raw.len;
    size_t from = before >= 3 ? before - 3 : 0;
    *complete = 0;
    if (buf_put(&head->raw, data, len)) {
        *reason = R_MEMORY;
        return (size_t)-1;
    }
    const uint8_t *raw = head->raw.data;
    size_t size = head->raw.len;
    for (size_t i = from; i + 4 <= size; i++) {
        const uint8_t *p = memchr(raw + i, '\r', size - 3 - i);
        if (p == NULL) break;
        i = (size_t)(p - raw);
        if (p[1] == '\n' && p[2] == '\r' && p[3] == '\n') {
            size_t head_len = i + 4;
            if (head_len > (size_t)self->max_header_bytes) {
                *reason = R_LIMIT;
                return (size_t)-1;
            }
            head->raw.len = head_len;
            *complete = 1;
            return head_len - before;
        }
    }
    if (size > (size_t)self->max_header_bytes || (size > MAX_LINE && find_crlf(raw, MAX_LINE) == NULL)) {
        *reason = R_LIMIT;
        return (size_t)-1;
    }
    return len;
}

static int request_head_done(Express *self, flow_t *flow) {
    head_t *head = &flow->request;
    const uint8_t *crlf = find_crlf(head->raw.data, head->raw.len);
    size_t line_end = (size_t)(crlf - head->raw.data);
    int reason = parse_request_line(head->raw.data, line_end, head);
    if (reason) return reason;
    if (head->method_len == 7 && memcmp(head->raw.data, "CONNECT", 7) == 0) return R_UPGRADE;
    const uint8_t *target = head->raw.data + head->target_off;
    if (memchr(target, '@', head->target_len)) return R_URL;
    reason = parse_headers(self, head, line_end, 1);
    if (reason) return reason;
    reason = redact_path(self, flow, target, head->target_len);
    if (reason) return reason;
    trace_context(flow, head);
    flow->head_request = head->method_len == 4 && memcmp(head->raw.data, "HEAD", 4) == 0;
    flow->call_ordinal = flow->ordinal++;
    flow->request_body.len = 0;
    flow->request_body_size = 0;
    flow->remaining = head->content_length > 0 ? head->content_length : 0;
    return R_NONE;
}

static int response_head_done(Express *self, flow_t *flow) {
    head_t *head = &flow->response;
    const uint8_t *crlf = find_crlf(head->raw.data, head->raw.len);
    size_t line_end = (size_t)(crlf - head->raw.data);
    int reason = parse_status_line(head->raw.data, line_end, head);
    if (reason) return reason;
    if (head->status < 200) return R_STATUS;
    reason = parse_headers(self, head, line_end, 0);
    if (reason) return reason;
    flow->response_body.len = 0;
    flow->response_body_size = 0;
    if (flow->head_request || head->status == 204 || head->status == 304) flow->remaining = 0;
    else if (head->content_length < 0) return R_CLOSE;
    else flow->remaining = head->content_length;
    return R_NONE;
}

/* The exchange is complete: its call (a (3, call) work item), unless a body needs the Python redactor. */
static int exchange_done(Express *self, flow_t *flow, PyObject *calls) {
    int reason = check_body(self, &flow->response, &flow->response_body);
    if (reason) return reason;
    PyObject *call = build_call(flow);
    if (call == NULL || PyList_Append(calls, call)) {
        Py_XDECREF(call);
        PyErr_Clear();
        return R_MEMORY;
    }
    Py_DECREF(call);
    flow->exchanges++;
    self->calls_http++;
    flow->phase = PHASE_IDLE;
    buf_reset(&flow->request.raw);
    buf_reset(&flow->response.raw);
    buf_reset(&flow->request_body);
    buf_reset(&flow->response_body);
    return R_NONE;
}

/* One message of an exchange (the request, or the response) as one direction's bytes come:
   its head up to the blank line, then its Content-Length body. Returns a reason to give the
   flow back, or R_NONE with *done set once the body's last byte is in; `leftover` is the
   reason when bytes follow that last byte in the same packet (pipelining, a stray response). */
static int message_data(Express *self, flow_t *flow, head_t *head, buf_t *body, int64_t *body_size, int head_phase,
                        int (*head_done)(Express *, flow_t *), int leftover, const uint8_t *data, size_t len,
                        int64_t ts, int *done) {
    size_t pos = 0;
    int reason = R_NONE, complete, failed = 0;
    *done = 0;
    if (flow->phase == head_phase - 1) { /* between messages: this packet starts one */
        if (data[0] == '\r' || data[0] == '\n') return R_CRLF;
        head->raw.len = 0;
        head->ts = ts;
        flow->phase = head_phase;
    }
    if (flow->phase == head_phase) {
        pos = head_add(self, head, data, len, &complete, &reason);
        if (reason) return reason;
        if (!complete) return R_NONE;
        reason = head_done(self, flow);
        if (reason) return reason;
        flow->phase = head_phase + 1; /* its body */
    }
    if (flow->phase != head_phase + 1) return leftover;
    size_t take = len - pos;
    if ((int64_t)take > flow->remaining) take = (size_t)flow->remaining;
    body_add(self, body, body_size, data + pos, take, &failed);
    if (failed) return R_MEMORY;
    pos += take;
    flow->remaining -= (int64_t)take;
    if (flow->remaining > 0) return R_NONE;
    if (pos < len) return leftover;
    *done = 1;
    return R_NONE;
}

/* The call-id hash input's start for `protocol` on a flow: flow->prefix ("<node>|<key>|http|",
   what calls.new_call hashes) with its protocol replaced; R_NOT_HTTP when it is not an HTTP one. */
static int protocol_prefix(const flow_t *flow, const char *protocol, PyObject **out) {
    const char *prefix = PyBytes_AS_STRING(flow->prefix);
    Py_ssize_t size = PyBytes_GET_SIZE(flow->prefix);
    size_t name = strlen(protocol);
    if (size < 5 || memcmp(prefix + size - 5, "http|", 5) != 0) return R_NOT_HTTP;
    PyObject *made = PyBytes_FromStringAndSize(NULL, size - 4 + (Py_ssize_t)name);
    if (made == NULL) {
        PyErr_Clear();
        return R_MEMORY;
    }
    char *text = PyBytes_AS_STRING(made);
    memcpy(text, prefix, (size_t)size - 5);
    memcpy(text + size - 5, protocol, name);
    text[size - 5 + (Py_ssize_t)name] = '|';
    *out = made;
    return R_NONE;
}

#include "_express_h2.h"
#include "_express_redis.h"
#include "_express_kafka.h"

/* In-order payload of one direction. A call completes only with the last byte of a packet
   (anything after it would be pipelining or a stray response), so a demotion never follows an
   emitted call within the same packet. */
static int http_data(Express *self, flow_t *flow, int from_client, const uint8_t *data, size_t len, int64_t ts,
                     PyObject *calls) {
    int reason, done;
    if (flow->h2 != NULL) return h2_data(self, flow, from_client ? 0 : 1, data, len, ts, calls);
    if (flow->redis != NULL) return redis_data(self, flow, from_client ? 0 : 1, data, len, ts, calls);
    if (flow->kafka != NULL) return kafka_data(self, flow, from_client ? 0 : 1, data, len, ts, calls);
    if (from_client) {
        if (!flow->client_spoke && self->kafka_api != NULL && len >= 12 && data[0] < 0x80 &&
            kafka_claims(self, flow, data, len)) {
            reason = kafka_start(flow);
            if (reason) return reason;
            flow->client_spoke = 1;
            return kafka_data(self, flow, 0, data, len, ts, calls);
        }
        if (!flow->client_spoke && self->redis_rule != NULL && redis_command_start(data, len)) {
            reason = redis_start(flow);
            if (reason) return reason;
            flow->client_spoke = 1;
            return redis_data(self, flow, 0, data, len, ts, calls);
        }
        if (!flow->client_spoke && self->http2 && len >= 3 &&
            memcmp(data, H2_PREFACE, len < H2_PREFACE_LEN ? len : H2_PREFACE_LEN) == 0) {
            /* http2.probe: the whole preface is certain; a part of it waits there for more. */
            if (len < H2_PREFACE_LEN) return R_NOT_HTTP;
            reason = h2_start(flow);
            if (reason) return reason;
            flow->client_spoke = 1;
            return h2_data(self, flow, 0, data + H2_PREFACE_LEN, len - H2_PREFACE_LEN, ts, calls);
        }
        if (!flow->client_spoke) {
            /* Python decides the protocol on the first chunk when it holds a whole request line. */
            const uint8_t *crlf = find_crlf(data, len);
            if (crlf == NULL || parse_request_line(data, (size_t)(crlf - data), NULL)) return R_NOT_HTTP;
            flow->client_spoke = 1;
        }
        if (flow->phase > PHASE_REQUEST_BODY) return R_PIPELINING;
        reason = message_data(self, flow, &flow->request, &flow->request_body, &flow->request_body_size,
                              PHASE_REQUEST_HEAD, request_head_done, R_PIPELINING, data, len, ts, &done);
        if (reason || !done) return reason;
        reason = check_body(self, &flow->request, &flow->request_body);
        if (reason) return reason;
        flow->request_end_ts = ts;
        flow->phase = PHASE_WAIT_RESPONSE;
        return R_NONE;
    }
    if (!flow->client_spoke && self->http2 && h2_server_preface(data, len)) {
        reason = h2_start(flow);
        if (reason) return reason;
        flow->h2->preface_pending = 1;
        return h2_data(self, flow, 1, data, len, ts, calls);
    }
    if (flow->phase < PHASE_WAIT_RESPONSE) return R_EARLY;
    reason = message_data(self, flow, &flow->response, &flow->response_body, &flow->response_body_size,
                          PHASE_RESPONSE_HEAD, response_head_done, R_EARLY, data, len, ts, &done);
    if (reason || !done) return reason;
    flow->response_end_ts = ts;
    return exchange_done(self, flow, calls);
}

/* ------------------------------------------------------------------------------------------ */
/* DNS over UDP: the messages protocols/dns.py reads itself (_parse_common), nothing else      */
/* ------------------------------------------------------------------------------------------ */

/* dns._wire_name: pointers strictly backwards, each target before the previous one and the
   name part after a jump ending before the part it came from, at most 16 hops, 255 bytes.
   0 with the labels and the offset after the name, -1 where Python raises _Uncommon. */
static int dns_wire_name(const uint8_t *wire, size_t position, size_t end, dns_name_t *name, size_t *after) {
    size_t start = position, biggest = position, furthest = position;
    int total = 1;
    name->count = name->hops = 0;
    for (;;) {
        if (position >= end) return -1;
        unsigned count = wire[position++];
        if (count == 0) break;
        if (count < 64) {
            size_t stop = position + count;
            if (stop > end) return -1;
            total += (int)count + 1;
            if (total > 255 || name->count == DNS_MAX_LABELS) return -1; /* Python raises at the end */
            name->labels[name->count].off = (uint32_t)position;
            name->labels[name->count].len = count;
            name->count++;
            position = stop;
        } else if (count >= 192) {
            if (position >= end) return -1;
            size_t target = ((size_t)(count & 0x3F) << 8) | wire[position];
            position++;
            name->hops++;
            if (target >= biggest || name->hops > 16 || start > end) return -1;
            biggest = target;
            end = start;
            if (position > furthest) furthest = position;
            position = start = target;
        } else {
            return -1;
        }
    }
    if (position > furthest) furthest = position;
    *after = furthest;
    return 0;
}

/* dns._owner_text / _target_text (`final_dot`): master-file form, dnspython's escapes. */
static int dns_name_text(buf_t *out, const uint8_t *wire, const dns_name_t *name, int final_dot) {
    if (name->count == 0) return buf_put(out, ".", 1);
    for (int i = 0; i < name->count; i++) {
        if (i && buf_put(out, ".", 1)) return -1;
        const uint8_t *label = wire + name->labels[i].off;
        for (uint32_t j = 0; j < name->labels[i].len; j++) {
            uint8_t c = label[j];
            char escaped[5];
            if (c >= 0x21 && c <= 0x7E) {
                if (strchr(".\"\\()@$;", c) != NULL) {
                    escaped[0] = '\\';
                    escaped[1] = (char)c;
                    if (buf_put(out, escaped, 2)) return -1;
                } else if (buf_put(out, &c, 1)) {
                    return -1;
                }
            } else {
                snprintf(escaped, sizeof(escaped), "\\%03u", (unsigned)c);
                if (buf_put(out, escaped, 4)) return -1;
            }
        }
    }
    return final_dot ? buf_put(out, ".", 1) : 0;
}

/* dns.ipv6.inet_ntoa, step by step (the longest run of zero groups, embedded IPv4 forms). */
static int dns_ipv6_text(buf_t *out, const uint8_t *address) {
    unsigned groups[8];
    for (int i = 0; i < 8; i++) groups[i] = be16(address + 2 * i);
    int best_start = 0, best_len = 0, start = -1, last_was_zero = 0;
    for (int i = 0; i < 8; i++) {
        if (groups[i] != 0) {
            if (last_was_zero) {
                if (i - start > best_len) {
                    best_start = start;
                    best_len = i - start;
                }
                last_was_zero = 0;
            }
        } else if (!last_was_zero) {
            start = i;
            last_was_zero = 1;
        }
    }
    if (last_was_zero && 8 - start > best_len) {
        best_start = start;
        best_len = 8 - start;
    }
    char text[64];
    int len = 0;
    if (best_len > 1 && best_start == 0 && (best_len == 6 || (best_len == 5 && groups[5] == 0xFFFF))) {
        len = snprintf(text, sizeof(text), "%s%u.%u.%u.%u", best_len == 6 ? "::" : "::ffff:", address[12],
                       address[13], address[14], address[15]);
    } else if (best_len > 1) {
        for (int i = 0; i < best_start; i++) len += snprintf(text + len, sizeof(text) - (size_t)len, i ? ":%x" : "%x", groups[i]);
        len += snprintf(text + len, sizeof(text) - (size_t)len, "::");
        for (int i = best_start + best_len; i < 8; i++)
            len += snprintf(text + len, sizeof(text) - (size_t)len, i > best_start + best_len ? ":%x" : "%x", groups[i]);
    } else {
        for (int i = 0; i < 8; i++) len += snprintf(text + len, sizeof(text) - (size_t)len, i ? ":%x" : "%x", groups[i]);
    }
    return buf_put(out, text, (size_t)len);
}

/* dns._check_options: every EDNS option one dnspython keeps as opaque bytes (asked once per code). */
static int dns_check_options(Express *self, const uint8_t *wire, size_t position, size_t end) {
    while (position < end) {
        if (position + 4 > end) return -1;
        unsigned code = be16(wire + position);
        position += 4 + (size_t)be16(wire + position + 2);
        if (position > end) return -1;
        uint8_t bit = (uint8_t)(1u << (code & 7));
        if (!(self->option_known[code >> 3] & bit)) {
            PyObject *answer = PyObject_CallFunction(self->edns_option_opaque, "I", code);
            int opaque = answer ? PyObject_IsTrue(answer) : -1;
            Py_XDECREF(answer);
            if (opaque < 0) {
                PyErr_WriteUnraisable(self->edns_option_opaque);
                return -1;
            }
            self->option_known[code >> 3] |= bit;
            if (opaque) self->option_opaque[code >> 3] |= bit;
        }
        if (!(self->option_opaque[code >> 3] & bit)) return -1;
    }
    return 0;
}

/* A text from a callback (dns_type_text / dns_rcode_text), cached per value; NULL if it failed. */
static PyObject *dns_cached_text(PyObject ***slots, size_t size, PyObject *callback, unsigned value) {
    if (*slots == NULL) {
        *slots = PyMem_Calloc(size, sizeof(PyObject *));
        if (*slots == NULL) return NULL;
    }
    PyObject *text = (*slots)[value];
    if (text != NULL) return text;
    text = PyObject_CallFunction(callback, "I", value);
    if (text == NULL || !PyUnicode_Check(text) || PyUnicode_AsUTF8(text) == NULL) {
        if (text != NULL && !PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "DNS text callbacks must return str");
        PyErr_WriteUnraisable(callback);
        Py_XDECREF(text);
        return NULL;
    }
    (*slots)[value] = text;
    return text;
}

static int span_equal_lower(const buf_t *text, span_t a, span_t b) {
    return a.len == b.len && memcmp(text->data + a.off, text->data + b.off, a.len) == 0;
}

/* dns.parse_message's fast path (_parse_common), exactly: 0 read, -1 anything Python would hand
   to dnspython (or that this lane does not take), -2 out of memory. */
static int dns_parse(Express *self, const uint8_t *wire, size_t size, dns_msg_t *m) {
    if (size < 12) return -1;
    m->id = be16(wire);
    m->flags = be16(wire + 2);
    for (int i = 0; i < 4; i++) m->counts[i] = be16(wire + 4 + 2 * i);
    if (m->counts[0] != 1 || (m->flags & 0x7800)) return -1;
    m->is_response = (m->flags & 0x8000) != 0;
    /* More answers than a call keeps would add a note: Python's. */
    if (m->counts[1] > DNS_MAX_ANSWERS) return -1;
    m->text.len = 0;
    m->data_count = m->rrset_count = 0;
    dns_name_t name;
    size_t position;
    if (dns_wire_name(wire, 12, size, &name, &position) || position + 4 > size) return -1;
    m->qtype = be16(wire + position);
    m->qclass = be16(wire + position + 2);
    /* The top bit is mDNS's unicast-response flag on port 5353: the Python path notes it. */
    if (m->qclass & 0x8000) return -1;
    position += 4;
    m->question_hops = name.hops;
    if (dns_name_text(&m->text, wire, &name, 0)) return -2;
    m->qname.off = 0;
    m->qname.len = (uint32_t)m->text.len;
    m->url_chars = memchr(m->text.data, '?', m->text.len) != NULL || memchr(m->text.data, '@', m->text.len) != NULL;
    uint32_t ednsflags = 0;
    int opt_seen = 0;
    for (int section = 1; section <= 3; section++) {
        for (unsigned record = 0; record < m->counts[section]; record++) {
            dns_name_t owner, target, second;
            size_t after;
            if (dns_wire_name(wire, position, size, &owner, &position) || position + 10 > size) return -1;
            unsigned rdtype = be16(wire + position), rdclass = be16(wire + position + 2);
            uint32_t ttl = be32(wire + position + 4);
            size_t rdlen = be16(wire + position + 8);
            position += 10;
            size_t rdata_end = position + rdlen;
            if (rdata_end > size) return -1;
            if (rdtype == 41) {
                if (section != 3 || opt_seen || owner.count) return -1;
                opt_seen = 1;
                if (dns_check_options(self, wire, position, rdata_end)) return -1;
                ednsflags = ttl;
                position = rdata_end;
                continue;
            }
            if (rdclass != 1) return -1;
            int collect = section == 1 && m->is_response;
            size_t text_start = m->text.len;
            char numbers[96];
            int failed = 0;
            switch (rdtype) {
            case 1:
                if (rdlen != 4) return -1;
                if (collect) {
                    int len = snprintf(numbers, sizeof(numbers), "%u.%u.%u.%u", wire[position], wire[position + 1],
                                       wire[position + 2], wire[position + 3]);
                    failed = buf_put(&m->text, numbers, (size_t)len);
                }
                break;
            case 28:
                if (rdlen != 16) return -1;
                if (collect) failed = dns_ipv6_text(&m->text, wire + position);
                break;
            case 2:
            case 5:
            case 12:
                if (dns_wire_name(wire, position, rdata_end, &target, &after) || after != rdata_end) return -1;
                if (collect) failed = dns_name_text(&m->text, wire, &target, 1);
                break;
            case 15:
                if (rdlen < 3) return -1;
                if (dns_wire_name(wire, position + 2, rdata_end, &target, &after) || after != rdata_end) return -1;
                if (collect) {
                    int len = snprintf(numbers, sizeof(numbers), "%u ", (unsigned)be16(wire + position));
                    failed = buf_put(&m->text, numbers, (size_t)len) || dns_name_text(&m->text, wire, &target, 1);
                }
                break;
            case 33:
                if (rdlen < 7) return -1;
                if (dns_wire_name(wire, position + 6, rdata_end, &target, &after) || after != rdata_end) return -1;
                if (collect) {
                    int len = snprintf(numbers, sizeof(numbers), "%u %u %u ", (unsigned)be16(wire + position),
                                       (unsigned)be16(wire + position + 2), (unsigned)be16(wire + position + 4));
                    failed = buf_put(&m->text, numbers, (size_t)len) || dns_name_text(&m->text, wire, &target, 1);
                }
                break;
            case 6:
                if (dns_wire_name(wire, position, rdata_end, &target, &after) ||
                    dns_wire_name(wire, after, rdata_end, &second, &after) || after + 20 != rdata_end)
                    return -1;
                if (collect) {
                    int len = snprintf(numbers, sizeof(numbers), " %u %u %u %u %u", be32(wire + after),
                                       be32(wire + after + 4), be32(wire + after + 8), be32(wire + after + 12),
                                       be32(wire + after + 16));
                    failed = dns_name_text(&m->text, wire, &target, 1) || buf_put(&m->text, " ", 1) ||
                             dns_name_text(&m->text, wire, &second, 1) || buf_put(&m->text, numbers, (size_t)len);
                }
                break;
            default:
                return -1;
            }
            if (failed) return -2;
            size_t raw_off = position;
            position = rdata_end;
            if (!collect) continue;
            if (ttl > 0x7FFFFFFF) ttl = 0;
            dns_data_t *data = &m->datas[m->data_count];
            data->text.off = (uint32_t)text_start;
            data->text.len = (uint32_t)(m->text.len - text_start);
            if (data->text.len > DNS_MAX_ANSWER_DATA) data->text.len = DNS_MAX_ANSWER_DATA; /* ASCII: chars = bytes */
            data->raw.off = (uint32_t)raw_off;
            data->raw.len = (uint32_t)rdlen;
            span_t owner_text, key;
            owner_text.off = (uint32_t)m->text.len;
            if (dns_name_text(&m->text, wire, &owner, 0)) return -2;
            owner_text.len = (uint32_t)(m->text.len - owner_text.off);
            if (buf_reserve(&m->text, owner_text.len)) return -2;
            key.off = (uint32_t)m->text.len;
            key.len = owner_text.len;
            for (uint32_t i = 0; i < owner_text.len; i++) m->text.data[key.off + i] = lower(m->text.data[owner_text.off + i]);
            m->text.len += key.len;
            int index = m->data_count++;
            dns_rrset_t *rrset = NULL;
            for (int i = 0; i < m->rrset_count; i++) {
                if (m->rrsets[i].rdtype == rdtype && span_equal_lower(&m->text, m->rrsets[i].key, key)) {
                    rrset = &m->rrsets[i];
                    break;
                }
            }
            if (rrset == NULL) {
                rrset = &m->rrsets[m->rrset_count++];
                rrset->owner = owner_text;
                rrset->key = key;
                rrset->rdtype = (uint16_t)rdtype;
                rrset->ttl = ttl;
                rrset->datas[0] = index;
                rrset->data_count = 1;
                continue;
            }
            if (ttl < rrset->ttl) rrset->ttl = ttl;
            if (rdtype == 5 || rdtype == 6) {
                rrset->datas[0] = index; /* a singleton type keeps the last record */
                rrset->data_count = 1;
            } else if (rdtype != 1 && rdtype != 28) {
                return -1; /* equality of names inside rdata: dnspython's rules */
            } else {
                int seen = 0;
                for (int i = 0; i < rrset->data_count && !seen; i++) {
                    const dns_data_t *other = &m->datas[rrset->datas[i]];
                    seen = other->raw.len == rdlen && memcmp(wire + other->raw.off, wire + raw_off, rdlen) == 0;
                }
                if (!seen) rrset->datas[rrset->data_count++] = index;
            }
        }
    }
    m->rcode = (int)((m->flags & 0xF) | ((ednsflags >> 20) & 0xFF0));
    return 0;
}

/* dns.plausible_message for a query _parse_common read, whose question has no compression
   pointer (so _read_name reads it as _wire_name did). */
static int dns_plausible_query(const uint8_t *wire, size_t size, const dns_msg_t *m) {
    if (m->question_hops || (m->flags & 0x0040) || (m->flags & 0xF)) return 0;
    for (int i = 0; i < 4; i++)
        if (m->counts[i] > 256) return 0;
    /* the question: header, name (no pointer), type, class */
    size_t position = 12;
    while (wire[position] != 0) position += 1 + (size_t)wire[position];
    position += 3;
    if (position + 2 > size) return 0;
    unsigned qclass = be16(wire + position) & 0x7FFF;
    return qclass == 1 || qclass == 3 || qclass == 4 || qclass == 254 || qclass == 255;
}

static int dns_same_question(const dns_pending_t *pending, const dns_msg_t *m) {
    if (pending->id != m->id || pending->qtype != m->qtype || pending->qclass != m->qclass ||
        pending->name.len != m->qname.len)
        return 0;
    const uint8_t *a = pending->name.data, *b = m->text.data + m->qname.off;
    for (size_t i = 0; i < pending->name.len; i++)
        if (lower(a[i]) != lower(b[i])) return 0;
    return 1;
}

static int put_text(buf_t *out, unsigned field, PyObject *text) {
    Py_ssize_t len;
    const char *data = PyUnicode_AsUTF8AndSize(text, &len);
    return data == NULL ? -1 : pb_bytes(out, field, data, (size_t)len);
}

/* The answered query as serialized ApiCall bytes: DnsTransactions._query/_response, _describe,
   calls.new_call and finish_call. */
static PyObject *build_dns_call(Express *self, flow_t *flow, const dns_pending_t *query, const dns_msg_t *m,
                                int64_t ts, size_t size) {
    PyObject *type_text = dns_cached_text(&self->type_texts, 65536, self->dns_type_text, query->qtype);
    PyObject *rcode_text = type_text ? dns_cached_text(&self->rcode_texts, 4096, self->dns_rcode_text, (unsigned)m->rcode) : NULL;
    if (rcode_text == NULL) return NULL;
    buf_t out = {0}, sub = {0}, answer = {0};
    PyObject *result = NULL;
    if (put_call_head(&out, &sub, flow, flow->prefix, "dns", "udp", query->ts, query->ordinal, NULL)) goto done;
    sub.len = 0;
    if (pb_uint(&sub, 1, (uint64_t)query->ts) || pb_uint(&sub, 2, (uint64_t)query->ts) ||
        pb_uint(&sub, 3, query->size) || pb_message(&out, 8, &sub))
        goto done;
    sub.len = 0;
    if (pb_uint(&sub, 1, (uint64_t)ts) || pb_uint(&sub, 2, (uint64_t)ts) || pb_uint(&sub, 3, size) ||
        pb_message(&out, 9, &sub))
        goto done;
    Py_ssize_t rcode_len;
    const char *rcode = PyUnicode_AsUTF8AndSize(rcode_text, &rcode_len);
    int ok = (rcode_len == 7 && memcmp(rcode, "NOERROR", 7) == 0) || (rcode_len == 8 && memcmp(rcode, "NXDOMAIN", 8) == 0);
    if (put_text(&out, 10, type_text) || pb_bytes(&out, 11, query->name.data, query->name.len) ||
        pb_bytes(&out, 12, rcode, (size_t)rcode_len) || pb_uint(&out, 13, ts > query->ts ? (uint64_t)(ts - query->ts) : 0) ||
        pb_uint(&out, 14, ok ? 1 : 2))
        goto done;
    sub.len = 0;
    if (pb_uint(&sub, 1, query->id) || pb_bytes(&sub, 2, rcode, (size_t)rcode_len) ||
        pb_uint(&sub, 3, (m->flags & 0x0200) ? 1 : 0))
        goto done;
    for (int r = 0; r < m->rrset_count; r++) {
        const dns_rrset_t *rrset = &m->rrsets[r];
        PyObject *rr_type = dns_cached_text(&self->type_texts, 65536, self->dns_type_text, rrset->rdtype);
        if (rr_type == NULL) goto done;
        for (int d = 0; d < rrset->data_count; d++) {
            const dns_data_t *data = &m->datas[rrset->datas[d]];
            answer.len = 0;
            if (pb_bytes(&answer, 1, m->text.data + rrset->owner.off, rrset->owner.len) || put_text(&answer, 2, rr_type) ||
                pb_uint(&answer, 3, rrset->ttl) || pb_bytes(&answer, 4, m->text.data + data->text.off, data->text.len) ||
                pb_message(&sub, 4, &answer))
                goto done;
        }
    }
    if (pb_message(&out, 22, &sub) || pb_uint(&out, 31, (uint64_t)flow->shard)) goto done;
    result = PyBytes_FromStringAndSize((const char *)out.data, (Py_ssize_t)out.len);
done:
    buf_free(&out);
    buf_free(&sub);
    buf_free(&answer);
    return result;
}

/* Add the query to the flow's pending ones (DnsTransactions._query without a retransmission). */
static int dns_add_pending(flow_t *flow, const dns_msg_t *m, int64_t ts, size_t size) {
    if (flow->pending_count == flow->pending_cap) {
        size_t cap = flow->pending_cap ? flow->pending_cap * 2 : 2;
        dns_pending_t *pending = PyMem_Realloc(flow->pending, cap * sizeof(dns_pending_t));
        if (pending == NULL) return -1;
        flow->pending = pending;
        flow->pending_cap = cap;
    }
    dns_pending_t *query = &flow->pending[flow->pending_count];
    memset(query, 0, sizeof(*query));
    if (buf_put(&query->name, m->text.data + m->qname.off, m->qname.len)) return -1;
    query->id = m->id;
    query->qtype = m->qtype;
    query->qclass = m->qclass;
    query->ts = ts;
    query->size = size;
    query->ordinal = flow->ordinal++;
    flow->pending_count++;
    return 0;
}

/* The held calls left: their questions join the answered ones as DnsTransactions._response
   records them (a question answered again moves to the end; the oldest past DNS_ANSWERED go). */
static void dns_remember_answered(flow_t *flow) {
    size_t room = flow->answered_count + flow->answering_count;
    if (room > DNS_ANSWERED + 1) room = DNS_ANSWERED + 1;
    if (room > flow->answered_cap) {
        dns_pending_t *answered = PyMem_Realloc(flow->answered, room * sizeof(dns_pending_t));
        if (answered == NULL) {
            /* Out of memory: these questions are forgotten, so a duplicate of their answers
               would come out of the Python path as a call without its query. */
            for (size_t a = 0; a < flow->answering_count; a++) buf_free(&flow->answering[a].name);
            flow->answering_count = 0;
            return;
        }
        flow->answered = answered;
        flow->answered_cap = room;
    }
    for (size_t a = 0; a < flow->answering_count; a++) {
        dns_pending_t *entry = &flow->answering[a];
        for (size_t i = 0; i < flow->answered_count; i++) {
            dns_pending_t *old = &flow->answered[i];
            if (old->id == entry->id && old->qtype == entry->qtype && old->qclass == entry->qclass &&
                old->name.len == entry->name.len) {
                size_t k = 0;
                while (k < old->name.len && lower(old->name.data[k]) == lower(entry->name.data[k])) k++;
                if (k == old->name.len) {
                    buf_free(&old->name);
                    memmove(old, old + 1, (flow->answered_count - i - 1) * sizeof(dns_pending_t));
                    flow->answered_count--;
                    break;
                }
            }
        }
        flow->answered[flow->answered_count++] = *entry;
        if (flow->answered_count > DNS_ANSWERED) {
            buf_free(&flow->answered[0].name);
            memmove(flow->answered, flow->answered + 1, (flow->answered_count - 1) * sizeof(dns_pending_t));
            flow->answered_count--;
        }
    }
    flow->answering_count = 0;
}

/* One datagram of a held DNS flow: R_NONE when taken, else the demotion reason. Calls leave
   (as (3, call) work items) only when no query is pending any more: that is the quiescent point. */
static int flow_datagram(Express *self, flow_t *flow, int from_client, const segment_t *segment, int64_t ts,
                         PyObject *work) {
    dns_msg_t *m = &self->dns;
    flow->last_ts = ts;
    int parsed = dns_parse(self, segment->payload, segment->payload_len, m);
    if (parsed) return parsed == -2 ? R_MEMORY : R_DNS;
    if (!m->is_response) {
        if (!from_client) return R_DNS_SIDE;
        if (m->url_chars) return R_DNS;
        for (size_t i = 0; i < flow->pending_count; i++)
            if (dns_same_question(&flow->pending[i], m)) return R_RETRANSMIT;
        if (flow->pending_count >= DNS_MAX_PENDING || (Py_ssize_t)flow->pending_count >= self->max_pending_requests)
            return R_LIMIT;
        return dns_add_pending(flow, m, ts, segment->payload_len) ? R_MEMORY : R_NONE;
    }
    if (from_client) return R_DNS_SIDE;
    size_t index = 0;
    while (index < flow->pending_count && !dns_same_question(&flow->pending[index], m)) index++;
    if (index == flow->pending_count) return R_UNPAIRED;
    if (flow->held_count == DNS_MAX_HELD) return R_LIMIT;
    if (flow->held_count == flow->held_cap) {
        size_t cap = flow->held_cap ? flow->held_cap * 2 : 2;
        PyObject **held = PyMem_Realloc(flow->held, cap * sizeof(PyObject *));
        if (held == NULL) return R_MEMORY;
        flow->held = held;
        flow->held_cap = cap;
    }
    PyObject *call = build_dns_call(self, flow, &flow->pending[index], m, ts, segment->payload_len);
    if (call == NULL) {
        PyErr_Clear();
        return R_CALLBACK;
    }
    flow->held[flow->held_count++] = call;
    if (flow->answering_count == flow->answering_cap) {
        size_t cap = flow->answering_cap ? flow->answering_cap * 2 : 2;
        dns_pending_t *answering = PyMem_Realloc(flow->answering, cap * sizeof(dns_pending_t));
        if (answering == NULL) return R_MEMORY;
        flow->answering = answering;
        flow->answering_cap = cap;
    }
    flow->pending[index].ts = ts; /* now the time of its answer */
    flow->answering[flow->answering_count++] = flow->pending[index]; /* the name moves with it */
    memmove(&flow->pending[index], &flow->pending[index + 1], (flow->pending_count - index - 1) * sizeof(dns_pending_t));
    flow->pending_count--;
    if (flow->pending_count) return R_NONE;
    for (size_t i = 0; i < flow->held_count; i++) {
        if (PyList_Append(work, flow->held[i])) {
            /* Work items already appended stay; this flow's state is still consistent: give
               up on the rest (counted as a memory failure by the caller's demotion). */
            PyErr_Clear();
            for (size_t j = 0; j < i; j++) Py_CLEAR(flow->held[j]);
            memmove(flow->held, flow->held + i, (flow->held_count - i) * sizeof(PyObject *));
            flow->held_count -= i;
            self->calls_dns += (long long)i;
            return R_MEMORY;
        }
    }
    for (size_t i = 0; i < flow->held_count; i++) Py_CLEAR(flow->held[i]);
    self->calls_dns += (long long)flow->held_count;
    flow->held_count = 0;
    dns_remember_answered(flow);
    flow->exchanges++;
    return R_NONE;
}

/* ------------------------------------------------------------------------------------------ */
/* TCP per flow                                                                                */
/* ------------------------------------------------------------------------------------------ */

static int set_last_data(half_t *half, const uint8_t *data, size_t len) {
    PyObject *copy = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len);
    if (copy == NULL) {
        PyErr_Clear();
        return -1;
    }
    Py_XSETREF(half->last_data, copy);
    return 0;
}

/* One segment of a held flow: R_NONE when taken (state advanced), else the demotion reason. */
/* A FIN (with its ACK already applied): taken only at a quiescent point (no HTTP message in
   either direction: Http1Parser.finish then reports nothing), without payload, in order, once
   per side. tcp.TcpTable: the half is finished and its next is fin_at + 1; with both halves
   finished the flow ends (stream_end: nothing to report for a quiescent HTTP/1 flow, no
   retransmission or zero window here) and lingers closed. */
static int fin_segment(flow_t *flow, half_t *own, half_t *peer, const segment_t *segment, size_t len) {
    if (len || own->finished || flow->exchanges == 0 || flow->phase != PHASE_IDLE) return R_FIN;
    if (flow->h2 != NULL && !h2_idle(flow->h2)) return R_FIN;
    if (flow->redis != NULL && !redis_idle(flow->redis)) return R_FIN;
    if (flow->kafka != NULL && !kafka_idle(flow->kafka)) return R_FIN;
    if (flow->stage != STAGE_ESTABLISHED && flow->stage != STAGE_CLOSING) return R_FIN;
    if (unwrap(own->next, segment->seq) != own->next) return R_FIN;
    own->finished = 1;
    own->next += 1;
    flow->stage = peer->finished ? STAGE_CLOSED : STAGE_CLOSING;
    return R_NONE;
}

static int flow_segment(Express *self, flow_t *flow, int from_client, const segment_t *segment, int64_t ts,
                        PyObject *calls) {
    uint8_t flags = segment->flags;
    flow->last_ts = ts;
    if (flow->stage == STAGE_SYN_SENT) {
        half_t *client = &flow->halves[0], *server = &flow->halves[1];
        if (from_client || (flags & (TH_SYN | TH_ACK | TH_RST | TH_FIN | TH_URG)) != (TH_SYN | TH_ACK) ||
            segment->payload_len || segment->ack != (uint32_t)((uint64_t)client->next & 0xFFFFFFFFULL))
            return flags & TH_RST ? R_RST : R_HANDSHAKE;
        server->next = server->base = (int64_t)segment->seq + 1;
        client->acked = client->next;
        client->acked_set = 1;
        flow->stage = STAGE_ESTABLISHED;
        return R_NONE;
    }
    if (flow->stage == STAGE_CLOSED) {
        /* tcp.TcpTable.segment on a closed flow: a new SYN reuses the 4-tuple (Python's to do:
           the flow goes back, replayed, and the SYN after it); anything else only keeps the
           flow lingering (a late ACK, a repeated FIN, a RST). */
        if ((flags & (TH_SYN | TH_ACK)) == TH_SYN) return R_SYN;
        return R_NONE;
    }
    if (flags & TH_RST) return R_RST;
    if (flags & TH_SYN) return R_SYN;
    if (flags & TH_URG) return R_URG;
    if (!(flags & TH_ACK)) return R_FLAGS;
    half_t *own = &flow->halves[from_client ? 0 : 1], *peer = &flow->halves[from_client ? 1 : 0];
    int64_t acked = unwrap(peer->next, segment->ack);
    if (acked > peer->next) return R_ACK;
    if (segment->window == 0) return R_WINDOW;
    if (!peer->acked_set || acked > peer->acked) {
        peer->acked = acked;
        peer->acked_set = 1;
    }
    size_t len = segment->payload_len;
    if (flags & TH_FIN) return fin_segment(flow, own, peer, segment, len);
    if (flow->stage == STAGE_CLOSING && len) return R_FIN; /* data after a FIN: Python's to judge */
    if (len == 0) return R_NONE;
    int64_t start = unwrap(own->next, segment->seq);
    if (start != own->next) return (len == 1 && start + 1 == own->next) ? R_KEEPALIVE : R_REORDER;
    own->next = start + (int64_t)len;
    own->last_start = start;
    if (set_last_data(own, segment->payload, len)) return R_MEMORY;
    flow->offsets[from_client ? 0 : 1] += (int64_t)len;
    return http_data(self, flow, from_client, segment->payload, len, ts, calls);
}

static int take_snapshot(Express *self, flow_t *flow) {
    snapshot_t *snap = &flow->snapshot;
    /* The HTTP/2 part first: when it fails, the previous snapshot stands whole. */
    if (flow->h2 != NULL && h2_snapshot(flow->h2)) return -1;
    if (flow->kafka != NULL && kafka_snapshot(flow->kafka)) return -1;
    if (!flow->has_snapshot) {
        /* Python counts the flow when it makes it; a flow given back before this point is
           replayed from its first packet, and counted there. */
        flow->has_snapshot = 1;
        if (flow->udp) {
            self->udp_flows++;
            self->udp_flows_dns++;
        } else {
            self->tcp_flows++;
            if (flow->h2 != NULL) self->tcp_flows_http2++;
            else if (flow->redis != NULL) self->tcp_flows_redis++;
            else if (flow->kafka != NULL) self->tcp_flows_kafka++;
            else self->tcp_flows_http++;
        }
    }
    snap->first_ts = flow->first_ts;
    snap->last_ts = flow->last_ts;
    snap->syn_ts = flow->syn_ts;
    for (int d = 0; d < 2; d++) {
        PyObject *previous = snap->halves[d].last_data;
        snap->halves[d] = flow->halves[d];
        Py_XINCREF(snap->halves[d].last_data);
        Py_XDECREF(previous);
    }
    snap->ordinal = flow->ordinal;
    snap->offsets[0] = flow->offsets[0];
    snap->offsets[1] = flow->offsets[1];
    flow->emitted.len = 0; /* a replay starts here: the calls sent before it are not made again */
    return 0;
}

static int retain(flow_t *flow, const uint8_t *frame, size_t len, int64_t ts) {
    if (flow->retained_count == flow->retained_cap) {
        size_t cap = flow->retained_cap ? flow->retained_cap * 2 : 8;
        PyObject **frames = PyMem_Realloc(flow->retained, cap * sizeof(PyObject *));
        if (frames == NULL) return -1;
        flow->retained = frames;
        int64_t *stamps = PyMem_Realloc(flow->retained_ts, cap * sizeof(int64_t));
        if (stamps == NULL) return -1;
        flow->retained_ts = stamps;
        flow->retained_cap = cap;
    }
    PyObject *copy = PyBytes_FromStringAndSize((const char *)frame, (Py_ssize_t)len);
    if (copy == NULL) {
        PyErr_Clear();
        return -1;
    }
    flow->retained[flow->retained_count] = copy;
    flow->retained_ts[flow->retained_count] = ts;
    flow->retained_count++;
    flow->retained_bytes += len;
    if (flow->retained_total != NULL) *flow->retained_total += len;
    return 0;
}

static PyObject *half_tuple(const half_t *half) {
    PyObject *acked = half->acked_set ? PyLong_FromLongLong(half->acked) : Py_NewRef(Py_None);
    if (acked == NULL) return NULL;
    return Py_BuildValue("(LLNLO)", (long long)half->next, (long long)half->base, acked, (long long)half->last_start,
                         half->last_data);
}

/* The ids of the calls sent since the snapshot (or the SYN), for engine._take_back to drop. */
static PyObject *flow_emitted(const flow_t *flow) {
    Py_ssize_t count = (Py_ssize_t)(flow->emitted.len / 24);
    PyObject *ids = PyTuple_New(count);
    if (ids == NULL) return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *id = PyUnicode_DecodeASCII((const char *)flow->emitted.data + 24 * i, 24, NULL);
        if (id == NULL) {
            Py_DECREF(ids);
            return NULL;
        }
        PyTuple_SET_ITEM(ids, i, id);
    }
    return ids;
}

/* Give the flow back: the handover dict (see express.py), the flow freed. `frame` (if any) is
   the packet that caused it, not applied to the snapshot. */
static PyObject *demote(Express *self, flow_t *flow, int reason, const uint8_t *frame, size_t frame_len, int64_t ts) {
    PyObject *records = NULL, *state = NULL, *result = NULL;
    size_t count = flow->retained_count + (frame != NULL);
    records = PyList_New((Py_ssize_t)count);
    if (records == NULL) goto done;
    for (size_t i = 0; i < flow->retained_count; i++) {
        PyObject *item = Py_BuildValue("(OL)", flow->retained[i], (long long)flow->retained_ts[i]);
        if (item == NULL) goto done;
        PyList_SET_ITEM(records, (Py_ssize_t)i, item);
    }
    if (frame != NULL) {
        PyObject *item = Py_BuildValue("(y#L)", (const char *)frame, (Py_ssize_t)frame_len, (long long)ts);
        if (item == NULL) goto done;
        PyList_SET_ITEM(records, (Py_ssize_t)flow->retained_count, item);
    }
    if (flow->has_snapshot && flow->udp) {
        /* The answered questions change only at quiescent points: they are the snapshot's. */
        PyObject *answered = PyTuple_New((Py_ssize_t)flow->answered_count);
        if (answered == NULL) goto done;
        for (size_t i = 0; i < flow->answered_count; i++) {
            const dns_pending_t *entry = &flow->answered[i];
            PyObject *item = Py_BuildValue("(is#iiL)", (int)entry->id, entry->name.data ? (const char *)entry->name.data : "",
                                           (Py_ssize_t)entry->name.len, (int)entry->qtype, (int)entry->qclass,
                                           (long long)entry->ts);
            if (item == NULL) {
                Py_DECREF(answered);
                goto done;
            }
            PyTuple_SET_ITEM(answered, (Py_ssize_t)i, item);
        }
        state = Py_BuildValue("{sLsLsN}", "last_ts_ns", (long long)flow->snapshot.last_ts, "ordinal",
                              (long long)flow->snapshot.ordinal, "answered", answered);
    } else if (flow->has_snapshot) {
        const snapshot_t *snap = &flow->snapshot;
        PyObject *client = half_tuple(&snap->halves[0]);
        PyObject *server = client ? half_tuple(&snap->halves[1]) : NULL;
        if (server == NULL) {
            Py_XDECREF(client);
            goto done;
        }
        state = Py_BuildValue("{sLsLsLs(NN)sLs(LL)}", "first_ts_ns", (long long)snap->first_ts, "last_ts_ns",
                              (long long)snap->last_ts, "syn_ts_ns", (long long)snap->syn_ts, "halves", client, server,
                              "ordinal", (long long)snap->ordinal, "offsets", (long long)snap->offsets[0],
                              (long long)snap->offsets[1]);
        if (state != NULL && flow->redis != NULL) {
            /* A Redis flow: RedisState is its ordinal (above) and a fresh connection's rest. */
            PyObject *redis = PyDict_New();
            if (redis == NULL || PyDict_SetItemString(state, "redis", redis)) Py_CLEAR(state);
            Py_XDECREF(redis);
        }
        if (state != NULL && flow->kafka != NULL) {
            /* A Kafka flow: KafkaState's fields besides the ordinal (express.py). */
            PyObject *kafka = kafka_state(flow->kafka);
            if (kafka == NULL || PyDict_SetItemString(state, "kafka", kafka)) Py_CLEAR(state);
            Py_XDECREF(kafka);
        }
        if (state != NULL && flow->h2 != NULL) {
            /* An HTTP/2 flow: the fields of http2.Http2State besides the ordinal (express.py). */
            PyObject *h2 = h2_state(flow->h2);
            if (h2 == NULL || PyDict_SetItemString(state, "http2", h2)) Py_CLEAR(state);
            Py_XDECREF(h2);
        }
    } else {
        state = Py_NewRef(Py_None);
    }
    if (state == NULL) goto done;
    result = Py_BuildValue("{sOsnsis(Oi)s(Oi)sOsOss}", "node", flow->node, "shard", flow->shard, "link_type",
                           flow->link_type, "client", flow->client_ip, (int)flow->client_port, "server",
                           flow->server_ip, (int)flow->server_port, "state", state, "records", records,
                           "transport", flow->udp ? "udp" : "tcp");
    if (result != NULL && (flow->h2 != NULL || flow->redis != NULL || flow->kafka != NULL)) {
        /* The calls this lane sent that the replay makes again: the engine drops them. */
        PyObject *emitted = flow_emitted(flow);
        if (emitted == NULL || PyDict_SetItemString(result, "emitted", emitted)) Py_CLEAR(result);
        Py_XDECREF(emitted);
    }
done:
    Py_XDECREF(records);
    Py_XDECREF(state);
    if (result == NULL) return NULL;
    self->packets -= (long long)count;
    self->demotions++;
    self->demotions_by[reason]++;
    flow_unlink(self, flow);
    flow_free(flow);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* The Express object                                                                          */
/* ------------------------------------------------------------------------------------------ */

static int quiescent(const flow_t *flow) {
    if (flow->udp) return flow->pending_count == 0 && flow->held_count == 0;
    if (flow->h2 != NULL) return flow->stage == STAGE_ESTABLISHED && h2_snapshot_due(flow);
    if (flow->redis != NULL) return flow->stage == STAGE_ESTABLISHED && flow->exchanges > 0 && redis_idle(flow->redis);
    if (flow->kafka != NULL) return flow->stage == STAGE_ESTABLISHED && flow->exchanges > 0 && kafka_idle(flow->kafka);
    return flow->stage == STAGE_ESTABLISHED && flow->phase == PHASE_IDLE && flow->exchanges > 0;
}

/* The index of `node` among the names seen, or -1 when too many were. */
static long node_index(Express *self, PyObject *node) {
    for (size_t i = 0; i < self->node_count; i++) {
        if (self->nodes[i] == node) return (long)i;
    }
    for (size_t i = 0; i < self->node_count; i++) {
        int equal = PyUnicode_Compare(self->nodes[i], node);
        if (equal == -1 && PyErr_Occurred()) return -2;
        if (equal == 0) return (long)i;
    }
    if (self->node_count == MAX_NODES) return -1;
    if (self->node_count == self->node_cap) {
        size_t cap = self->node_cap ? self->node_cap * 2 : 8;
        PyObject **nodes = PyMem_Realloc(self->nodes, cap * sizeof(PyObject *));
        if (nodes == NULL) {
            PyErr_NoMemory();
            return -2;
        }
        self->nodes = nodes;
        self->node_cap = cap;
    }
    self->nodes[self->node_count] = Py_NewRef(node);
    return (long)self->node_count++;
}

/* Is this 5-tuple (either way) a flow of the Python path? -1 on error. */
static int python_has(PyObject *python_flows, PyObject *node, PyObject *src, uint16_t sport, PyObject *dst,
                      uint16_t dport) {
    if (python_flows == Py_None) return 0;
    for (int way = 0; way < 2; way++) {
        PyObject *key = way == 0 ? Py_BuildValue("(OOiOi)", node, src, (int)sport, dst, (int)dport)
                                 : Py_BuildValue("(OOiOi)", node, dst, (int)dport, src, (int)sport);
        if (key == NULL) return -1;
        int found = PySequence_Contains(python_flows, key);
        Py_DECREF(key);
        if (found) return found;
    }
    return 0;
}

/* Adopt the flow a client SYN opens, or (udp) the DNS flow a client's query opens: the
   datagram Python's _udp_new would make a DNS flow of with its sender as the client (the only
   UDP probe, a plausible query: both orientations score alike and the first one wins), whose
   query _parse_common reads. 1 adopted, 0 not (the packet goes to Python), -1 error. */
/* The texts of a new flow as the Python path writes them (express.flow_strings): both addresses
   as layers.ip_text prints them (socket.inet_ntop is this same libc inet_ntop), and the start of
   the call-id hash input, "node|transport:client:port-server:port|protocol|". Used when the
   Express was built without flow_strings callbacks: a Python call per new flow cost about 3 us,
   a DNS exchange's whole budget. tests/unit/test_express_c.py compares the two. */
static PyObject *native_flow_strings(PyObject *node, const uint8_t *client, int client_port, const uint8_t *server,
                                     int server_port, size_t size, int udp) {
    char client_text[INET6_ADDRSTRLEN], server_text[INET6_ADDRSTRLEN];
    int family = size == 4 ? AF_INET : AF_INET6;
    if (inet_ntop(family, client, client_text, sizeof(client_text)) == NULL ||
        inet_ntop(family, server, server_text, sizeof(server_text)) == NULL) {
        PyErr_SetString(PyExc_ValueError, "inet_ntop failed");
        return NULL;
    }
    const char *node_text = PyUnicode_AsUTF8(node);
    if (node_text == NULL) return NULL;
    PyObject *prefix = PyBytes_FromFormat("%s|%s:%s:%d-%s:%d|%s|", node_text, udp ? "udp" : "tcp", client_text,
                                          client_port, server_text, server_port, udp ? "dns" : "http");
    if (prefix == NULL) return NULL;
    return Py_BuildValue("(ssN)", client_text, server_text, prefix);
}

static PyObject *module_flow_strings(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *node;
    Py_buffer client, server;
    int client_port, server_port, udp;
    if (!PyArg_ParseTuple(args, "Uy*iy*ip:flow_strings", &node, &client, &client_port, &server, &server_port, &udp))
        return NULL;
    PyObject *result = NULL;
    if ((client.len == 4 || client.len == 16) && client.len == server.len)
        result = native_flow_strings(node, client.buf, client_port, server.buf, server_port, (size_t)client.len, udp);
    else
        PyErr_SetString(PyExc_ValueError, "addresses of 4 or 16 bytes, both the same size");
    PyBuffer_Release(&client);
    PyBuffer_Release(&server);
    return result;
}

static int adopt(Express *self, const flow_key_t *key, int src_is_a, PyObject *node, Py_ssize_t shard, int link_type,
                 const segment_t *segment, const uint8_t *frame, size_t frame_len, int64_t ts, PyObject *python_flows,
                 Py_ssize_t python_count, int udp) {
    /* max_flows bounds both paths' flows of a transport together (python_count: Python's). */
    size_t held = udp ? self->udp_active : self->tcp_active;
    if ((Py_ssize_t)held + python_count >= self->max_flows || (Py_ssize_t)frame_len > self->max_retained_bytes ||
        self->retained_total + frame_len > (size_t)self->max_total_retained_bytes)
        return 0;
    size_t size = segment->family == 4 ? 4 : 16;
    if (segment->sport == segment->dport && memcmp(segment->src, segment->dst, size) == 0) return 0;
    if (routed_contains(self, key)) return 0;
    if (udp) {
        if (segment->sport == 137 || segment->dport == 137) return 0; /* dns.NOT_DNS_PORTS */
        dns_msg_t *m = &self->dns;
        int parsed = dns_parse(self, segment->payload, segment->payload_len, m);
        if (parsed == -2) {
            PyErr_NoMemory();
            return -1;
        }
        if (parsed || m->is_response || m->url_chars || !dns_plausible_query(segment->payload, segment->payload_len, m))
            return 0;
    }
    PyObject *client_ip = PyBytes_FromStringAndSize((const char *)segment->src, (Py_ssize_t)size);
    PyObject *server_ip = client_ip ? PyBytes_FromStringAndSize((const char *)segment->dst, (Py_ssize_t)size) : NULL;
    if (server_ip == NULL) {
        Py_XDECREF(client_ip);
        return -1;
    }
    int found = python_has(python_flows, node, client_ip, segment->sport, server_ip, segment->dport);
    if (found) {
        Py_DECREF(client_ip);
        Py_DECREF(server_ip);
        return found < 0 ? -1 : 0;
    }
    PyObject *callback = udp ? self->dns_flow_strings : self->flow_strings;
    PyObject *strings = callback == NULL
                            ? native_flow_strings(node, segment->src, (int)segment->sport, segment->dst,
                                                  (int)segment->dport, size, udp)
                            : PyObject_CallFunction(callback, "OOiOi", node, client_ip, (int)segment->sport, server_ip,
                                                    (int)segment->dport);
    if (strings == NULL || !PyTuple_Check(strings) || PyTuple_GET_SIZE(strings) != 3 ||
        !PyUnicode_Check(PyTuple_GET_ITEM(strings, 0)) || !PyUnicode_Check(PyTuple_GET_ITEM(strings, 1)) ||
        !PyBytes_Check(PyTuple_GET_ITEM(strings, 2)) || PyUnicode_AsUTF8(node) == NULL ||
        PyUnicode_AsUTF8(PyTuple_GET_ITEM(strings, 0)) == NULL || PyUnicode_AsUTF8(PyTuple_GET_ITEM(strings, 1)) == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "flow_strings must return (str, str, bytes)");
        PyErr_WriteUnraisable(callback);
        Py_XDECREF(strings);
        Py_DECREF(client_ip);
        Py_DECREF(server_ip);
        return 0;
    }
    flow_t *flow = PyMem_Calloc(1, sizeof(flow_t));
    if (flow != NULL) flow->retained_total = &self->retained_total;
    if (flow == NULL) {
        Py_DECREF(strings);
        Py_DECREF(client_ip);
        Py_DECREF(server_ip);
        PyErr_NoMemory();
        return -1;
    }
    flow->key = *key;
    flow->client_is_a = src_is_a;
    flow->node = Py_NewRef(node);
    flow->shard = shard;
    flow->link_type = link_type;
    flow->client_text = Py_NewRef(PyTuple_GET_ITEM(strings, 0));
    flow->server_text = Py_NewRef(PyTuple_GET_ITEM(strings, 1));
    flow->prefix = Py_NewRef(PyTuple_GET_ITEM(strings, 2));
    Py_DECREF(strings);
    flow->client_ip = client_ip;
    flow->server_ip = server_ip;
    flow->client_port = segment->sport;
    flow->server_port = segment->dport;
    flow->stage = STAGE_SYN_SENT;
    flow->first_ts = flow->last_ts = flow->syn_ts = ts;
    flow->halves[0].next = flow->halves[0].base = (int64_t)segment->seq + 1;
    for (int d = 0; d < 2; d++) {
        flow->halves[d].last_data = Py_NewRef(self->empty_bytes);
        head_t *head = d == 0 ? &flow->request : &flow->response;
        for (int i = 0; i < HDR_SPECIAL_COUNT; i++) head->special[i] = -1;
    }
    flow->trace_state = -1;
    flow->udp = udp;
    if (udp) {
        flow->stage = STAGE_ESTABLISHED;
        if (dns_add_pending(flow, &self->dns, ts, segment->payload_len)) {
            flow_free(flow);
            PyErr_NoMemory();
            return -1;
        }
    }
    if (retain(flow, frame, frame_len, ts) || flow_insert(self, flow)) {
        flow_free(flow);
        PyErr_NoMemory();
        return -1;
    }
    if (udp) self->dns_adopted++;
    else self->adopted++;
    self->packets++;
    return 1;
}

/* Callbacks run inside feed: none may feed or demote again meanwhile. */
static int usable(Express *self) {
    if (self->header_kind == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Express is not initialised");
        return 0;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Express is not re-entrant");
        return 0;
    }
    return 1;
}

static int add_work(PyObject *work, PyObject *item) {
    if (item == NULL) return -1;
    int failed = PyList_Append(work, item);
    Py_DECREF(item);
    return failed;
}

static PyObject *Express_feed(Express *self, PyObject *args) {
    Py_buffer view;
    int link_type, nanosecond;
    PyObject *node, *python_flows, *udp_flows = Py_None;
    Py_ssize_t shard, udp_count = 0;
    if (!PyArg_ParseTuple(args, "y*ipUnO|On:feed", &view, &link_type, &nanosecond, &node, &shard, &python_flows,
                          &udp_flows, &udp_count))
        return NULL;
    int take_udp = udp_flows != Py_None && self->dns_type_text != NULL;
    if (!usable(self)) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *work = PyList_New(0), *result = NULL;
    long node_id = node_index(self, node);
    Py_ssize_t python_count = python_flows == Py_None ? 0 : PyObject_Length(python_flows);
    if (work == NULL || node_id == -2 || python_count < 0) goto done;
    python_count /= 2;
    self->busy = 1;
    self->generation++; /* empties the routed set */
    self->routed_count = 0;
    const uint8_t *records = view.buf;
    size_t end = (size_t)view.len, offset = 0;
    int64_t scale = nanosecond ? 1 : 1000, newest = 0;
    long long consumed = 0;
    int no_adopt = 0;
    while (offset < end) {
        if (end - offset < 16) {
            if (add_work(work, Py_BuildValue("(in)", 2, (Py_ssize_t)offset))) goto fail;
            break;
        }
        const uint8_t *header = records + offset;
        uint32_t seconds = (uint32_t)header[0] | ((uint32_t)header[1] << 8) | ((uint32_t)header[2] << 16) |
                           ((uint32_t)header[3] << 24);
        uint32_t frac = (uint32_t)header[4] | ((uint32_t)header[5] << 8) | ((uint32_t)header[6] << 16) |
                        ((uint32_t)header[7] << 24);
        uint32_t incl = (uint32_t)header[8] | ((uint32_t)header[9] << 8) | ((uint32_t)header[10] << 16) |
                        ((uint32_t)header[11] << 24);
        if (end - offset - 16 < incl) {
            if (add_work(work, Py_BuildValue("(in)", 2, (Py_ssize_t)offset))) goto fail;
            break;
        }
        int64_t ts = (int64_t)seconds * 1000000000LL + (int64_t)frac * scale;
        if (ts > newest) newest = ts;
        size_t start = offset + 16;
        offset = start + incl;
        const uint8_t *frame = records + start;
        segment_t segment;
        int decoded = decode_frame(link_type, frame, incl, &segment);
        if (decoded == DEC_FRAGMENT) no_adopt = 1;
        if ((decoded == DEC_TCP || decoded == DEC_UDP || decoded == DEC_KEY) && node_id >= 0 &&
            (segment.proto == 6 || take_udp)) {
            flow_key_t key;
            int src_is_a;
            make_key((uint32_t)node_id, &segment, &key, &src_is_a);
            flow_t *flow = flow_find(self, &key);
            if (flow != NULL && (decoded == DEC_TCP || decoded == DEC_UDP) && link_type == flow->link_type) {
                consumed++;
                self->packets++;
                int reason, from_client = src_is_a == flow->client_is_a;
                /* Calls this packet completes leave only if the whole packet is taken: a Python
                   parser reads a segment whole or not at all (a RESP or framing error later in it
                   loses the replies before it too), so a packet that demotes is replayed in
                   Python and makes its calls there, as Python makes them. */
                Py_ssize_t work_mark = PyList_GET_SIZE(work);
                size_t emitted_mark = flow->emitted.len;
                long long grpc_mark = self->calls_grpc, redis_mark = self->calls_redis, kafka_mark = self->calls_kafka;
                long long http_mark = self->calls_http, dns_mark = self->calls_dns;
                if (flow->retained_bytes + incl > (size_t)self->max_retained_bytes ||
                    self->retained_total + incl > (size_t)self->max_total_retained_bytes)
                    reason = R_LIMIT;
                else if (flow->udp) reason = flow_datagram(self, flow, from_client, &segment, ts, work);
                else reason = flow_segment(self, flow, from_client, &segment, ts, work);
                if (reason == R_NONE) {
                    if (quiescent(flow) && take_snapshot(self, flow) == 0) {
                        retained_clear(flow);
                        continue;
                    }
                    if (retain(flow, frame, incl, ts) == 0) continue;
                    reason = R_MEMORY;
                }
                if (PyList_GET_SIZE(work) > work_mark) {
                    if (PyList_SetSlice(work, work_mark, PyList_GET_SIZE(work), NULL)) goto fail;
                    flow->emitted.len = emitted_mark;
                    self->calls_grpc = grpc_mark;
                    self->calls_redis = redis_mark;
                    self->calls_kafka = kafka_mark;
                    self->calls_http = http_mark;
                    self->calls_dns = dns_mark;
                }
                if (add_work(work, Py_BuildValue("(iN)", 1, demote(self, flow, reason, frame, incl, ts))) ||
                    routed_add(self, &key))
                    goto fail;
                continue;
            }
            if (flow != NULL) {
                /* A packet of the flow this lane cannot take: the flow goes back first, then the packet. */
                if (add_work(work, Py_BuildValue("(iN)", 1, demote(self, flow, R_PACKET, NULL, 0, 0)))) goto fail;
            } else if (decoded == DEC_UDP && !no_adopt) {
                int adopted = adopt(self, &key, src_is_a, node, shard, link_type, &segment, frame, incl, ts, udp_flows,
                                    udp_count, 1);
                if (adopted < 0) goto fail;
                if (adopted) {
                    consumed++;
                    continue;
                }
            } else if (decoded == DEC_TCP && !no_adopt &&
                       (segment.flags & (TH_SYN | TH_ACK | TH_RST | TH_FIN)) == TH_SYN && segment.payload_len == 0) {
                int adopted = adopt(self, &key, src_is_a, node, shard, link_type, &segment, frame, incl, ts, python_flows,
                                    python_count, 0);
                if (adopted < 0) goto fail;
                if (adopted) {
                    consumed++;
                    continue;
                }
            }
            if (routed_add(self, &key)) goto fail;
        }
        if (add_work(work, Py_BuildValue("(innL)", 0, (Py_ssize_t)start, (Py_ssize_t)offset, (long long)ts)))
            goto fail;
    }
    /* Calls are bytes in the list, the other work tuples: with none of those (the common case),
       the caller takes the whole list as calls at once instead of looking at each item. */
    Py_ssize_t others = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(work); i++) others += !PyBytes_CheckExact(PyList_GET_ITEM(work, i));
    result = Py_BuildValue("(OLLn)", work, consumed, (long long)newest, others);
    goto done;
fail:
    if (!PyErr_Occurred()) PyErr_NoMemory();
done:
    self->busy = 0;
    Py_XDECREF(work);
    PyBuffer_Release(&view);
    return result;
}

/* A UDP flow with nothing pending and nothing to replay: Python would end it with no call and
   no count (engine._udp_end + _udp_remove), so it simply ends here. */
static int udp_idle_end(Express *self, flow_t *flow) {
    if (!flow->udp || !flow->has_snapshot || flow->pending_count || flow->held_count || flow->retained_count)
        return 0;
    self->udp_ended++;
    flow_unlink(self, flow);
    flow_free(flow);
    return 1;
}

static PyObject *Express_demote_stale(Express *self, PyObject *args) {
    long long now, idle, request_timeout, handshake_timeout, udp_idle = -1;
    if (!PyArg_ParseTuple(args, "LLLL|L:demote_stale", &now, &idle, &request_timeout, &handshake_timeout, &udp_idle))
        return NULL;
    if (!usable(self)) return NULL;
    if (udp_idle < 0) udp_idle = idle;
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    flow_t *flow = self->first;
    while (flow != NULL) {
        flow_t *next = flow->next;
        if (flow->udp) {
            /* engine._expire: a UDP flow idle that long ends; a query pending that long is unanswered. */
            int stale = now - flow->last_ts >= udp_idle;
            if (stale && udp_idle_end(self, flow)) {
                flow = next;
                continue;
            }
            for (size_t i = 0; i < flow->pending_count && !stale; i++)
                stale = now - flow->pending[i].ts >= request_timeout;
            if (stale && add_work(out, demote(self, flow, R_STALE, NULL, 0, 0))) {
                Py_DECREF(out);
                return NULL;
            }
            flow = next;
            continue;
        }
        if (flow->stage == STAGE_CLOSED) {
            /* tcp.TcpTable.expire: a closed flow lingering that long is forgotten, silently. */
            if (now - flow->last_ts >= CLOSED_LINGER_NS) {
                self->closed_forgotten++;
                flow_unlink(self, flow);
                flow_free(flow);
            }
            flow = next;
            continue;
        }
        int waiting = flow->phase != PHASE_IDLE && flow->phase != PHASE_REQUEST_HEAD;
        if (flow->redis != NULL && flow->redis->count) /* RedisParser.expire's to judge */
            waiting = now - flow->redis->pending[flow->redis->first].ts >= request_timeout;
        if (flow->kafka != NULL && flow->kafka->count) /* KafkaParser.expire's to judge */
            waiting = now - flow->kafka->pending[0]->ts >= request_timeout;
        if (flow->h2 != NULL) /* Http2Parser.expire: a stream open that long is the Python path's to time out */
            for (int i = 0; i < flow->h2->open_count && !waiting; i++)
                waiting = now - flow->h2->open[i]->first_ts[0] >= request_timeout;
        if (now - flow->last_ts >= idle || (flow->stage == STAGE_SYN_SENT && now - flow->syn_ts >= handshake_timeout) ||
            (waiting && (flow->h2 != NULL || flow->redis != NULL || flow->kafka != NULL ||
                         now - flow->request.ts >= request_timeout))) {
            if (add_work(out, demote(self, flow, R_STALE, NULL, 0, 0))) {
                Py_DECREF(out);
                return NULL;
            }
        }
        flow = next;
    }
    return out;
}

/* The TCP (or UDP) flow least recently active goes back: the Python table needs room and holds
   none (TCP), or the lane's oldest UDP flow is older than `before_ns` (Python's oldest). */
static PyObject *Express_demote_oldest(Express *self, PyObject *args) {
    int udp = 0;
    PyObject *before = Py_None;
    if (!PyArg_ParseTuple(args, "|pO:demote_oldest", &udp, &before)) return NULL;
    if (!usable(self)) return NULL;
    long long before_ns = 0;
    if (before != Py_None) {
        before_ns = PyLong_AsLongLong(before);
        if (before_ns == -1 && PyErr_Occurred()) return NULL;
    }
    flow_t *oldest = NULL;
    for (flow_t *flow = self->first; flow != NULL; flow = flow->next)
        if (flow->udp == udp && (oldest == NULL || flow->last_ts < oldest->last_ts)) oldest = flow;
    if (oldest == NULL || (before != Py_None && oldest->last_ts >= before_ns)) Py_RETURN_NONE;
    return demote(self, oldest, R_ROOM, NULL, 0, 0);
}

static PyObject *Express_demote_all(Express *self, PyObject *args, PyObject *kwargs) {
    PyObject *node = Py_None, *shard = Py_None;
    static char *keywords[] = {"node", "shard", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OO:demote_all", keywords, &node, &shard)) return NULL;
    if (!usable(self)) return NULL;
    Py_ssize_t shard_value = 0;
    if (shard != Py_None) {
        shard_value = PyLong_AsSsize_t(shard);
        if (shard_value == -1 && PyErr_Occurred()) return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    flow_t *flow = self->first;
    while (flow != NULL) {
        flow_t *next = flow->next;
        int match = shard == Py_None || flow->shard == shard_value;
        if (match && node != Py_None) {
            match = PyObject_RichCompareBool(flow->node, node, Py_EQ);
            if (match < 0) goto fail;
        }
        /* A UDP flow with nothing pending would only be ended, with nothing to report. */
        if (match && !udp_idle_end(self, flow) && add_work(out, demote(self, flow, R_FINISH, NULL, 0, 0))) goto fail;
        flow = next;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static int set_count(PyObject *dict, const char *name, long long value) {
    if (value == 0) return 0; /* the engine adds these to its own: no key it would not have */
    PyObject *number = PyLong_FromLongLong(value);
    if (number == NULL) return -1;
    int failed = PyDict_SetItemString(dict, name, number);
    Py_DECREF(number);
    return failed;
}

static PyObject *Express_get_counters(Express *self, void *closure) {
    (void)closure;
    PyObject *dict = PyDict_New();
    if (dict == NULL) return NULL;
    if (set_count(dict, "packets", self->packets) || set_count(dict, "tcp_flows", self->tcp_flows) ||
        set_count(dict, "tcp_flows_http", self->tcp_flows_http) || set_count(dict, "udp_flows", self->udp_flows) ||
        set_count(dict, "udp_flows_dns", self->udp_flows_dns) ||
        set_count(dict, "tcp_flows_http2", self->tcp_flows_http2) || set_count(dict, "calls_grpc", self->calls_grpc) ||
        set_count(dict, "tcp_flows_redis", self->tcp_flows_redis) || set_count(dict, "calls_redis", self->calls_redis) ||
        set_count(dict, "tcp_flows_kafka", self->tcp_flows_kafka) || set_count(dict, "calls_kafka", self->calls_kafka) ||
        set_count(dict, "calls",
                  self->calls_http + self->calls_dns + self->calls_grpc + self->calls_redis + self->calls_kafka) ||
        set_count(dict, "calls_http", self->calls_http) ||
        set_count(dict, "calls_dns", self->calls_dns) || set_count(dict, "express_flows_adopted", self->adopted) ||
        set_count(dict, "express_closed_flows_forgotten", self->closed_forgotten) ||
        set_count(dict, "express_dns_flows_adopted", self->dns_adopted) ||
        set_count(dict, "express_udp_flows_ended", self->udp_ended) ||
        set_count(dict, "express_demotions", self->demotions))
        goto fail;
    for (int reason = 1; reason < R_COUNT; reason++) {
        char name[64];
        snprintf(name, sizeof(name), "express_demotions_%s", reason_names[reason]);
        if (set_count(dict, name, self->demotions_by[reason])) goto fail;
    }
    return dict;
fail:
    Py_DECREF(dict);
    return NULL;
}

static PyObject *Express_get_active(Express *self, void *closure) {
    (void)closure;
    return PyLong_FromSize_t(self->active);
}

static PyObject *Express_get_tcp_active(Express *self, void *closure) {
    (void)closure;
    return PyLong_FromSize_t(self->tcp_active);
}

static PyObject *Express_get_udp_active(Express *self, void *closure) {
    (void)closure;
    return PyLong_FromSize_t(self->udp_active);
}

static void free_texts(PyObject ***slots, size_t size) {
    if (*slots == NULL) return;
    for (size_t i = 0; i < size; i++) Py_XDECREF((*slots)[i]);
    PyMem_Free(*slots);
    *slots = NULL;
}

static int Express_init(Express *self, PyObject *args, PyObject *kwargs) {
    PyObject *header_kind, *param_is_secret, *key_is_secret, *flow_strings;
    PyObject *dns_flow_strings = Py_None, *dns_type_text = Py_None, *dns_rcode_text = Py_None,
             *edns_option_opaque = Py_None;
    Py_ssize_t max_body_bytes, max_header_bytes, max_flows, max_retained_bytes, max_pending_requests = 1024;
    Py_ssize_t max_total_retained_bytes = (Py_ssize_t)256 << 20;
    static char *keywords[] = {"header_kind",         "param_is_secret",  "key_is_secret",   "flow_strings",
                               "max_body_bytes",      "max_header_bytes", "max_flows",       "max_retained_bytes",
                               "dns_flow_strings",    "dns_type_text",    "dns_rcode_text",  "edns_option_opaque",
                               "max_pending_requests", "max_total_retained_bytes", "http2", "redis_rule",
                               "kafka_api",           "kafka_claims",     "kafka_errors",    NULL};
    int http2 = 1;
    PyObject *redis_rule = Py_None, *kafka_api = Py_None, *kafka_claims_ = Py_None, *kafka_errors = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOnnnn|$OOOOnnpOOOO:Express", keywords, &header_kind,
                                     &param_is_secret, &key_is_secret, &flow_strings, &max_body_bytes,
                                     &max_header_bytes, &max_flows, &max_retained_bytes, &dns_flow_strings,
                                     &dns_type_text, &dns_rcode_text, &edns_option_opaque, &max_pending_requests,
                                     &max_total_retained_bytes, &http2, &redis_rule, &kafka_api, &kafka_claims_,
                                     &kafka_errors))
        return -1;
    if (max_total_retained_bytes <= 0) {
        PyErr_SetString(PyExc_ValueError, "max_total_retained_bytes must be positive");
        return -1;
    }
    /* DNS is on with its text callbacks; flow strings callbacks may be None: made here, natively. */
    int dns = dns_type_text != Py_None;
    if (dns && ((dns_flow_strings != Py_None && !PyCallable_Check(dns_flow_strings)) ||
                !PyCallable_Check(dns_type_text) || !PyCallable_Check(dns_rcode_text) ||
                !PyCallable_Check(edns_option_opaque))) {
        PyErr_SetString(PyExc_TypeError, "Express: dns_type_text, dns_rcode_text and edns_option_opaque must be "
                                         "callable (or dns_type_text None), dns_flow_strings callable or None");
        return -1;
    }
    if (max_pending_requests <= 0) {
        PyErr_SetString(PyExc_ValueError, "Express: max_pending_requests must be positive");
        return -1;
    }
    if (!PyCallable_Check(header_kind) || !PyCallable_Check(param_is_secret) || !PyCallable_Check(key_is_secret) ||
        (flow_strings != Py_None && !PyCallable_Check(flow_strings))) {
        PyErr_SetString(PyExc_TypeError, "Express: the redaction callbacks must be callable, flow_strings callable "
                                         "or None");
        return -1;
    }
    if (max_body_bytes < 0 || max_header_bytes <= 0 || max_flows < 0 || max_retained_bytes <= 0) {
        PyErr_SetString(PyExc_ValueError, "Express: limits must be positive (max_body_bytes and max_flows >= 0)");
        return -1;
    }
    if (self->active || self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Express: already in use");
        return -1;
    }
    Py_XSETREF(self->header_kind, Py_NewRef(header_kind));
    Py_XSETREF(self->param_is_secret, Py_NewRef(param_is_secret));
    Py_XSETREF(self->key_is_secret, Py_NewRef(key_is_secret));
    Py_CLEAR(self->flow_strings);
    if (flow_strings != Py_None) self->flow_strings = Py_NewRef(flow_strings);
    Py_CLEAR(self->dns_flow_strings);
    Py_CLEAR(self->dns_type_text);
    Py_CLEAR(self->dns_rcode_text);
    Py_CLEAR(self->edns_option_opaque);
    if (dns) {
        if (dns_flow_strings != Py_None) self->dns_flow_strings = Py_NewRef(dns_flow_strings);
        self->dns_type_text = Py_NewRef(dns_type_text);
        self->dns_rcode_text = Py_NewRef(dns_rcode_text);
        self->edns_option_opaque = Py_NewRef(edns_option_opaque);
    }
    self->max_pending_requests = max_pending_requests;
    self->http2 = http2;
    if (redis_rule != Py_None && !PyCallable_Check(redis_rule)) {
        PyErr_SetString(PyExc_TypeError, "Express: redis_rule must be callable or None");
        return -1;
    }
    Py_CLEAR(self->redis_rule);
    if (redis_rule != Py_None) self->redis_rule = Py_NewRef(redis_rule);
    cache_free(&self->redis_rules);
    if ((kafka_api != Py_None || kafka_claims_ != Py_None || kafka_errors != Py_None) &&
        (!PyCallable_Check(kafka_api) || !PyCallable_Check(kafka_claims_) || !PyDict_Check(kafka_errors))) {
        PyErr_SetString(PyExc_TypeError, "Express: kafka_api and kafka_claims must be callable and kafka_errors a "
                                         "dict (or all three None)");
        return -1;
    }
    Py_CLEAR(self->kafka_api);
    Py_CLEAR(self->kafka_claims);
    kapi_free_all(self);
    PyMem_Free(self->kafka_error_names);
    self->kafka_error_names = NULL;
    if (kafka_api != Py_None) {
        if (kafka_error_table(self, kafka_errors)) return -1;
        self->kafka_api = Py_NewRef(kafka_api);
        self->kafka_claims = Py_NewRef(kafka_claims_);
    }
    free_texts(&self->type_texts, 65536);
    free_texts(&self->rcode_texts, 4096);
    memset(self->option_known, 0, sizeof(self->option_known));
    memset(self->option_opaque, 0, sizeof(self->option_opaque));
    if (self->empty_bytes == NULL) {
        self->empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
        if (self->empty_bytes == NULL) return -1;
    }
    self->max_body_bytes = max_body_bytes;
    self->max_header_bytes = max_header_bytes;
    self->max_flows = max_flows;
    self->max_retained_bytes = max_retained_bytes;
    self->max_total_retained_bytes = max_total_retained_bytes;
    cache_free(&self->kinds);
    cache_free(&self->params);
    cache_free(&self->keys);
    return 0;
}

static int Express_traverse(Express *self, visitproc visit, void *arg) {
    Py_VISIT(self->dns_flow_strings);
    Py_VISIT(self->dns_type_text);
    Py_VISIT(self->dns_rcode_text);
    Py_VISIT(self->edns_option_opaque);
    Py_VISIT(self->header_kind);
    Py_VISIT(self->param_is_secret);
    Py_VISIT(self->key_is_secret);
    Py_VISIT(self->flow_strings);
    Py_VISIT(self->redis_rule);
    Py_VISIT(self->kafka_api);
    Py_VISIT(self->kafka_claims);
    return 0;
}

static int Express_clear(Express *self) {
    Py_CLEAR(self->dns_flow_strings);
    Py_CLEAR(self->dns_type_text);
    Py_CLEAR(self->dns_rcode_text);
    Py_CLEAR(self->edns_option_opaque);
    Py_CLEAR(self->header_kind);
    Py_CLEAR(self->param_is_secret);
    Py_CLEAR(self->key_is_secret);
    Py_CLEAR(self->flow_strings);
    Py_CLEAR(self->redis_rule);
    Py_CLEAR(self->kafka_api);
    Py_CLEAR(self->kafka_claims);
    return 0;
}

static void Express_dealloc(Express *self) {
    PyObject_GC_UnTrack(self);
    Express_clear(self);
    flow_t *flow = self->first;
    while (flow != NULL) {
        flow_t *next = flow->next;
        flow_free(flow);
        flow = next;
    }
    PyMem_Free(self->buckets);
    for (size_t i = 0; i < self->node_count; i++) Py_DECREF(self->nodes[i]);
    PyMem_Free(self->nodes);
    PyMem_Free(self->routed);
    cache_free(&self->kinds);
    cache_free(&self->params);
    cache_free(&self->keys);
    cache_free(&self->redis_rules);
    kapi_free_all(self);
    PyMem_Free(self->kafka_error_names);
    Py_XDECREF(self->empty_bytes);
    free_texts(&self->type_texts, 65536);
    free_texts(&self->rcode_texts, 4096);
    buf_free(&self->dns.text);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Express_methods[] = {
    {"feed", (PyCFunction)Express_feed, METH_VARARGS,
     "feed(records, link_type, nanosecond, node, shard, python_flows, udp_flows=None, udp_count=0) -> "
     "(work, packets_consumed, max_ts_ns)"},
    {"demote_oldest", (PyCFunction)Express_demote_oldest, METH_VARARGS,
     "demote_oldest(udp=False, before_ns=None) -> the least recently active TCP (UDP) flow's handover, or None "
     "when none is held (or none is older than before_ns)"},
    {"demote_all", (PyCFunction)(void (*)(void))Express_demote_all, METH_VARARGS | METH_KEYWORDS,
     "demote_all(node=None, shard=None) -> list of handovers (every flow, or those of that node/shard)"},
    {"demote_stale", (PyCFunction)Express_demote_stale, METH_VARARGS,
     "demote_stale(now_ns, idle_ns, request_timeout_ns, handshake_timeout_ns, udp_idle_ns=idle_ns) -> list of handovers"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Express_getset[] = {
    {"active", (getter)Express_get_active, NULL, "flows held (TCP and UDP)", NULL},
    {"tcp_active", (getter)Express_get_tcp_active, NULL, "TCP flows held", NULL},
    {"udp_active", (getter)Express_get_udp_active, NULL, "UDP (DNS) flows held", NULL},
    {"counters", (getter)Express_get_counters, NULL, "cumulative counters (non-zero ones)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ExpressType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "trawl.dissector._express.Express",
    .tp_basicsize = sizeof(Express),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The compiled HTTP/1 and DNS lane: takes simple flows, gives them back (demotes) on anything else.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Express_init,
    .tp_dealloc = (destructor)Express_dealloc,
    .tp_traverse = (traverseproc)Express_traverse,
    .tp_clear = (inquiry)Express_clear,
    .tp_methods = Express_methods,
    .tp_getset = Express_getset,
};

static PyObject *module_blake2b_hex(PyObject *module, PyObject *args) {
    (void)module;
    Py_buffer view;
    int digest_size;
    if (!PyArg_ParseTuple(args, "y*i:blake2b_hex", &view, &digest_size)) return NULL;
    if (digest_size < 1 || digest_size > 64) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "digest_size must be 1..64");
        return NULL;
    }
    char hex[128];
    const uint8_t *parts[1] = {view.buf};
    size_t lengths[1] = {(size_t)view.len};
    blake2b_hex_parts(parts, lengths, 1, digest_size, hex);
    PyBuffer_Release(&view);
    return PyUnicode_FromStringAndSize(hex, 2 * digest_size);
}

static PyObject *module_schemaless_json(PyObject *module, PyObject *args) {
    (void)module;
    Py_buffer view;
    int max_depth = 8, max_fields = 512;
    if (!PyArg_ParseTuple(args, "y*|ii:schemaless_json", &view, &max_depth, &max_fields)) return NULL;
    buf_t out = {0};
    size_t chars = 0;
    int failed = pbjson_schemaless(view.buf, (size_t)view.len, max_depth, max_fields, &out, &chars);
    PyBuffer_Release(&view);
    PyObject *result = NULL;
    if (failed) PyErr_NoMemory();
    else result = Py_BuildValue("(s#n)", out.data ? (const char *)out.data : "", (Py_ssize_t)out.len, (Py_ssize_t)chars);
    buf_free(&out);
    return result;
}

static PyMethodDef module_methods[] = {
    {"flow_strings", module_flow_strings, METH_VARARGS,
     "flow_strings(node, client_ip, client_port, server_ip, server_port, udp) -> (client_text, server_text, "
     "call_id_prefix), as the lane makes them when built without flow_strings callbacks"},
    {"blake2b_hex", module_blake2b_hex, METH_VARARGS,
     "blake2b_hex(data, digest_size) -> hashlib.blake2b(data, digest_size=n).hexdigest()"},
    {"schemaless_json", module_schemaless_json, METH_VARARGS,
     "schemaless_json(data, max_depth=8, max_fields=512) -> (text, code points): the lane's "
     "protobuf._schemaless_text"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef express_module = {
    PyModuleDef_HEAD_INIT, "trawl.dissector._express",
    "The compiled HTTP/1 and DNS-over-UDP express lane of the dissector (see services/dissector/_express.c).", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__express(void) {
    if (PyType_Ready(&ExpressType) < 0) return NULL;
    PyObject *module = PyModule_Create(&express_module);
    if (module == NULL) return NULL;
    if (PyModule_AddObjectRef(module, "Express", (PyObject *)&ExpressType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
