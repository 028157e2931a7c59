/*
 * The schemaless protobuf -> JSON text writer of the compiled lane (included by _express.c after
 * buf_t and its helpers). Contract:
 *
 *   static int pbjson_schemaless(const uint8_t *data, size_t len, int max_depth, int max_fields,
 *                                buf_t *out, size_t *chars);
 *
 * Appends to `out` exactly the UTF-8 text that protobuf.py's `_schemaless_text(data, max_depth,
 * max_fields)` returns, sets *chars to that text's length in code points (Python's len), and
 * returns 0; -1 when memory ran out (out is then left in any state).
 *
 * How it mirrors the Python (protobuf.py stays the reference; tests/unit/test_pbjson.py holds the
 * two to the same text on arbitrary and generated input):
 *
 * - `_fields` is one loop over an explicit stack of frames (one per message or group being read),
 *   so nesting costs heap, not C stack, whatever max_depth says: a frame pushes a child where the
 *   Python recurses (a group, or a length-delimited value tried as a message) and resumes when the
 *   child ends, the way the Python's call returns or raises _Stop ("the group never ended").
 * - Each field is written where it is read, straight into `out`: `,"n":value`, after the '{' its
 *   message opened. When no field number repeats (almost always) that is the object's text as
 *   `_object` makes it; when one does, the message's values are regrouped into a scratch buffer
 *   (keys in order of first appearance, a repeated field as a list) and copied back. A value that
 *   turns out not to be what was tried (a string that is not printable UTF-8, a nested attempt
 *   that does not parse to its end, a group that never ends) is cut off `out` again.
 * - The field budget is one counter shared by every frame, decremented where `_fields` does, so
 *   failed nesting attempts spend it too.
 * - Strings: strict UTF-8 (no surrogates, no overlong forms, nothing above U+10FFFF) whose every
 *   character is printable by CPython's own tables (Py_UNICODE_ISPRINTABLE, str.isprintable's
 *   test) or is tab/LF/CR, escaped as json.encoder.encode_basestring does.
 */

#define PBJ_MAX_FIELD_NUMBER ((1ULL << 29) - 1)
#define PBJ_INLINE_FRAMES 16
#define PBJ_INLINE_ENTRIES 64
#define PBJ_NAIVE_GROUPING 64 /* up to this many fields in a message, group them by a quadratic scan */

enum { PBJ_CHILD_GROUP = 1, PBJ_CHILD_NESTED = 2 };

/* One field value written at a message's level: its number and where its text is in `out`. */
typedef struct {
    uint32_t number;
    size_t value_at, value_len;
} pbj_entry_t;

/* A message (or group) being read. The pend_* members describe the field that pushed the frame
   above this one, for when that child ends. */
typedef struct {
    size_t offset, end;   /* reading position, end of the message's bytes */
    size_t field_start;   /* where the field being read began (`start` in _fields) */
    size_t base;          /* where this object's '{' is in out */
    size_t entry_base;    /* this level's first entry */
    uint64_t seen;        /* field numbers < 64 written at this level */
    uint32_t group;       /* the group's field number; 0 for a message */
    int depth;
    int regroup;          /* a number repeated, or one >= 64 was written (checked at the end) */
    int pend_kind;        /* PBJ_CHILD_GROUP or PBJ_CHILD_NESTED */
    uint32_t pend_number;
    size_t pend_key_at;   /* the pending field's key (with its comma) in out */
    size_t pend_value_at; /* the pending field's value in out */
    size_t pend_raw_start, pend_raw_end; /* a nested attempt's bytes in data */
} pbj_frame_t;

typedef struct {
    pbj_frame_t *frames;
    size_t n_frames, cap_frames;
    pbj_entry_t *entries;
    size_t n_entries, cap_entries;
    buf_t scratch;
    pbj_frame_t inline_frames[PBJ_INLINE_FRAMES];
    pbj_entry_t inline_entries[PBJ_INLINE_ENTRIES];
} pbj_ctx_t;

/* Python's _varint: at most 10 bytes (the check is `shift > 63` before each byte), the value
   masked to 64 bits. 0 when the bytes end first or the varint is too long. */
static inline int pbj_varint(const uint8_t *data, size_t *pos, size_t end, uint64_t *value) {
    uint64_t result = 0;
    unsigned shift = 0;
    size_t p = *pos;
    for (;;) {
        if (p >= end || shift > 63) return 0;
        uint8_t byte = data[p++];
        result |= (uint64_t)(byte & 0x7F) << shift;
        if (byte < 0x80) {
            *value = result;
            *pos = p;
            return 1;
        }
        shift += 7;
    }
}

static int pbj_grow(void **array, size_t *cap, size_t size, void *inline_storage) {
    size_t cap_new = *cap * 2;
    void *grown;
    if (cap_new > ((size_t)-1) / size) return -1;
    if (*array == inline_storage) {
        grown = PyMem_Malloc(cap_new * size);
        if (grown != NULL) memcpy(grown, *array, *cap * size);
    } else {
        grown = PyMem_Realloc(*array, cap_new * size);
    }
    if (grown == NULL) return -1;
    *array = grown;
    *cap = cap_new;
    return 0;
}

static int pbj_put_uint(buf_t *out, uint64_t value) {
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    if (buf_reserve(out, (size_t)n)) return -1;
    uint8_t *p = out->data + out->len;
    while (n) *p++ = (uint8_t)digits[--n];
    out->len = (size_t)(p - out->data);
    return 0;
}

/* '"n":' */
static int pbj_put_key(buf_t *out, uint32_t number) {
    if (buf_reserve(out, 14)) return -1;
    out->data[out->len++] = '"';
    if (pbj_put_uint(out, number)) return -1;
    out->data[out->len++] = '"';
    out->data[out->len++] = ':';
    return 0;
}

static int pbj_put_base64(buf_t *out, const uint8_t *data, size_t len) {
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    if (buf_reserve(out, (len + 2) / 3 * 4)) return -1;
    uint8_t *p = out->data + out->len;
    size_t i = 0;
    for (; i + 3 <= len; i += 3) {
        uint32_t triple = ((uint32_t)data[i] << 16) | ((uint32_t)data[i + 1] << 8) | data[i + 2];
        *p++ = (uint8_t)alphabet[(triple >> 18) & 63];
        *p++ = (uint8_t)alphabet[(triple >> 12) & 63];
        *p++ = (uint8_t)alphabet[(triple >> 6) & 63];
        *p++ = (uint8_t)alphabet[triple & 63];
    }
    if (len - i == 1) {
        uint32_t triple = (uint32_t)data[i] << 16;
        *p++ = (uint8_t)alphabet[(triple >> 18) & 63];
        *p++ = (uint8_t)alphabet[(triple >> 12) & 63];
        *p++ = '=';
        *p++ = '=';
    } else if (len - i == 2) {
        uint32_t triple = ((uint32_t)data[i] << 16) | ((uint32_t)data[i + 1] << 8);
        *p++ = (uint8_t)alphabet[(triple >> 18) & 63];
        *p++ = (uint8_t)alphabet[(triple >> 12) & 63];
        *p++ = (uint8_t)alphabet[(triple >> 6) & 63];
        *p++ = '=';
    }
    out->len = (size_t)(p - out->data);
    return 0;
}

/* {"@bytes":"<base64>"} */
static int pbj_put_bytes_object(buf_t *out, const uint8_t *data, size_t len) {
    static const char head[] = "{\"@bytes\":\"";
    return buf_put(out, head, sizeof head - 1) || pbj_put_base64(out, data, len) || buf_put(out, "\"}", 2);
}

/* The bytes as encode_basestring's text when they are strict UTF-8 whose characters are all
   printable (str.isprintable) or tab, LF, CR: 1 written, 0 not text (nothing written), -1. */
static int pbj_put_text(buf_t *out, const uint8_t *s, size_t len) {
    /* The longest escape a character that passes can take is 2 bytes (\t \n \r \" \\); the
       6-byte \u00XX ones are for controls, which never pass. */
    if (len > (((size_t)-1) - 2) / 2 || buf_reserve(out, 2 * len + 2)) return -1;
    uint8_t *start = out->data + out->len;
    uint8_t *p = start;
    *p++ = '"';
    size_t i = 0;
    while (i < len) {
        uint8_t c = s[i];
        if (c < 0x80) {
            if (c >= 0x20 && c < 0x7F) {
                if (c == '"' || c == '\\') *p++ = '\\';
                *p++ = c;
            } else if (c == '\t') {
                *p++ = '\\';
                *p++ = 't';
            } else if (c == '\n') {
                *p++ = '\\';
                *p++ = 'n';
            } else if (c == '\r') {
                *p++ = '\\';
                *p++ = 'r';
            } else {
                return 0; /* another control or DEL: not printable */
            }
            i++;
            continue;
        }
        uint32_t cp;
        size_t n;
        if (c >= 0xC2 && c <= 0xDF) {
            if (len - i < 2 || (s[i + 1] & 0xC0) != 0x80) return 0;
            cp = ((uint32_t)(c & 0x1F) << 6) | (s[i + 1] & 0x3F);
            n = 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (len - i < 3) return 0;
            uint8_t c1 = s[i + 1];
            uint8_t low = c == 0xE0 ? 0xA0 : 0x80, high = c == 0xED ? 0x9F : 0xBF; /* overlong, surrogates */
            if (c1 < low || c1 > high || (s[i + 2] & 0xC0) != 0x80) return 0;
            cp = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(c1 & 0x3F) << 6) | (s[i + 2] & 0x3F);
            n = 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (len - i < 4) return 0;
            uint8_t c1 = s[i + 1];
            uint8_t low = c == 0xF0 ? 0x90 : 0x80, high = c == 0xF4 ? 0x8F : 0xBF; /* overlong, > U+10FFFF */
            if (c1 < low || c1 > high || (s[i + 2] & 0xC0) != 0x80 || (s[i + 3] & 0xC0) != 0x80) return 0;
            cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(c1 & 0x3F) << 12) | ((uint32_t)(s[i + 2] & 0x3F) << 6) |
                 (s[i + 3] & 0x3F);
            n = 4;
        } else {
            return 0;
        }
        if (!Py_UNICODE_ISPRINTABLE((Py_UCS4)cp)) return 0;
        memcpy(p, s + i, n);
        p += n;
        i += n;
    }
    *p++ = '"';
    out->len = (size_t)(p - out->data);
    return 1;
}

static int pbj_compare_keys(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Close the object of frame f (its '{' at f->base, its entries from f->entry_base): as written
   when no number repeats, else regrouped like _object. With close, the final '}' too. */
static int pbj_finish_object(pbj_ctx_t *ctx, const pbj_frame_t *f, buf_t *out, int close) {
    size_t k = ctx->n_entries - f->entry_base;
    if (f->regroup && k > 1) {
        const pbj_entry_t *entries = ctx->entries + f->entry_base;
        /* next[i]: the next entry with entries[i]'s number (-1: none); later[i]: not the first. */
        int32_t next_inline[PBJ_NAIVE_GROUPING];
        uint8_t later_inline[PBJ_NAIVE_GROUPING];
        int32_t *next = next_inline;
        uint8_t *later = later_inline;
        uint64_t *keys = NULL;
        int repeats = 0;
        if (k <= PBJ_NAIVE_GROUPING) {
            for (size_t i = 0; i < k; i++) {
                next[i] = -1;
                later[i] = 0;
                for (size_t j = i; j-- > 0;) {
                    if (entries[j].number == entries[i].number) {
                        next[j] = (int32_t)i;
                        later[i] = 1;
                        repeats = 1;
                        break;
                    }
                }
            }
        } else {
            if (k > INT32_MAX) return -1;
            void *block = PyMem_Malloc(k * (sizeof(uint64_t) + sizeof(int32_t) + 1));
            if (block == NULL) return -1;
            keys = block;
            next = (int32_t *)(keys + k);
            later = (uint8_t *)(next + k);
            for (size_t i = 0; i < k; i++) {
                keys[i] = ((uint64_t)entries[i].number << 32) | i;
                next[i] = -1;
                later[i] = 0;
            }
            qsort(keys, k, sizeof(uint64_t), pbj_compare_keys);
            for (size_t i = 1; i < k; i++) {
                if (keys[i] >> 32 == keys[i - 1] >> 32) {
                    next[keys[i - 1] & 0xFFFFFFFFu] = (int32_t)(keys[i] & 0xFFFFFFFFu);
                    later[keys[i] & 0xFFFFFFFFu] = 1;
                    repeats = 1;
                }
            }
        }
        if (repeats) {
            buf_t *scratch = &ctx->scratch;
            int failed = 0;
            scratch->len = 0;
            failed = buf_put(scratch, "{", 1);
            for (size_t i = 0; i < k && !failed; i++) {
                if (later[i]) continue;
                if (i && buf_put(scratch, ",", 1)) failed = 1;
                if (!failed && pbj_put_key(scratch, entries[i].number)) failed = 1;
                if (failed) break;
                if (next[i] < 0) {
                    failed = buf_put(scratch, out->data + entries[i].value_at, entries[i].value_len);
                    continue;
                }
                failed = buf_put(scratch, "[", 1);
                for (int32_t j = (int32_t)i; j >= 0 && !failed; j = next[j]) {
                    if ((size_t)j != i && buf_put(scratch, ",", 1)) failed = 1;
                    if (!failed) failed = buf_put(scratch, out->data + entries[j].value_at, entries[j].value_len);
                }
                if (!failed) failed = buf_put(scratch, "]", 1);
            }
            PyMem_Free(keys);
            if (failed) return -1;
            out->len = f->base;
            if (buf_put(out, scratch->data, scratch->len)) return -1;
        } else {
            PyMem_Free(keys);
        }
    }
    return close ? buf_put(out, "}", 1) : 0;
}

/* Start a field's text at frame f: the comma when the level has values, then '"n":'. */
static int pbj_start_field(pbj_ctx_t *ctx, pbj_frame_t *f, buf_t *out, uint32_t number, size_t *key_at,
                           size_t *value_at) {
    *key_at = out->len;
    if (ctx->n_entries > f->entry_base && buf_put(out, ",", 1)) return -1;
    if (pbj_put_key(out, number)) return -1;
    *value_at = out->len;
    return 0;
}

/* Record the value that ends at out->len, begun at value_at, as one of frame index fi's fields. */
static int pbj_add_entry(pbj_ctx_t *ctx, size_t fi, const buf_t *out, uint32_t number, size_t value_at) {
    if (ctx->n_entries == ctx->cap_entries &&
        pbj_grow((void **)&ctx->entries, &ctx->cap_entries, sizeof(pbj_entry_t), ctx->inline_entries))
        return -1;
    pbj_frame_t *f = &ctx->frames[fi];
    if (number < 64) {
        uint64_t bit = 1ULL << number;
        if (f->seen & bit) f->regroup = 1;
        f->seen |= bit;
    } else {
        f->regroup = 1;
    }
    pbj_entry_t *entry = &ctx->entries[ctx->n_entries++];
    entry->number = number;
    entry->value_at = value_at;
    entry->value_len = out->len - value_at;
    return 0;
}

/* Push a frame reading data[offset:end] at `depth` (its '{' written now); 0 or -1. */
static int pbj_push(pbj_ctx_t *ctx, buf_t *out, size_t offset, size_t end, int depth, uint32_t group) {
    if (ctx->n_frames == ctx->cap_frames &&
        pbj_grow((void **)&ctx->frames, &ctx->cap_frames, sizeof(pbj_frame_t), ctx->inline_frames))
        return -1;
    pbj_frame_t *f = &ctx->frames[ctx->n_frames++];
    memset(f, 0, sizeof *f);
    f->offset = offset;
    f->end = end;
    f->field_start = offset;
    f->base = out->len;
    f->entry_base = ctx->n_entries;
    f->group = group;
    f->depth = depth;
    return buf_put(out, "{", 1);
}

static int pbj_run(pbj_ctx_t *ctx, const uint8_t *data, size_t len, int max_depth, int64_t budget, buf_t *out) {
    if (pbj_push(ctx, out, 0, len, 1, 0)) return -1;
    for (;;) {
        size_t fi = ctx->n_frames - 1;
        pbj_frame_t *f = &ctx->frames[fi];
        int raised = 0;    /* the frame ended by raising _Stop (a group that never ended) */
        size_t stopped_at; /* else where it stopped reading */
        if (f->offset >= f->end) {
            raised = f->group != 0;
            stopped_at = f->offset;
            goto frame_done;
        }
        {
            size_t start = f->offset, p = start, key_at, value_at;
            uint64_t key, value;
            f->field_start = start;
            stopped_at = start;
            if (budget <= 0) goto frame_done;
            budget--;
            if (!pbj_varint(data, &p, f->end, &key)) goto frame_done;
            uint64_t number64 = key >> 3;
            if (number64 == 0 || number64 > PBJ_MAX_FIELD_NUMBER) goto frame_done;
            uint32_t number = (uint32_t)number64;
            switch (key & 7) {
            case 0:
                if (!pbj_varint(data, &p, f->end, &value)) goto frame_done;
                break;
            case 1:
                if (f->end - p < 8) goto frame_done;
                value = 0;
                for (int i = 7; i >= 0; i--) value = (value << 8) | data[p + (size_t)i];
                p += 8;
                break;
            case 5:
                if (f->end - p < 4) goto frame_done;
                value = (uint64_t)data[p] | ((uint64_t)data[p + 1] << 8) | ((uint64_t)data[p + 2] << 16) |
                        ((uint64_t)data[p + 3] << 24);
                p += 4;
                break;
            case 2: {
                uint64_t size;
                if (!pbj_varint(data, &p, f->end, &size)) goto frame_done;
                if (size > (uint64_t)(f->end - p)) goto frame_done;
                if (pbj_start_field(ctx, f, out, number, &key_at, &value_at)) return -1;
                size_t stop = p + (size_t)size;
                if (size == 0) {
                    if (buf_put(out, "\"\"", 2)) return -1;
                } else {
                    int text = pbj_put_text(out, data + p, (size_t)size);
                    if (text < 0) return -1;
                    if (!text) {
                        if (f->depth < max_depth) {
                            f->pend_kind = PBJ_CHILD_NESTED;
                            f->pend_number = number;
                            f->pend_key_at = key_at;
                            f->pend_value_at = value_at;
                            f->pend_raw_start = p;
                            f->pend_raw_end = stop;
                            if (pbj_push(ctx, out, p, stop, f->depth + 1, 0)) return -1;
                            continue;
                        }
                        if (pbj_put_bytes_object(out, data + p, (size_t)size)) return -1;
                    }
                }
                if (pbj_add_entry(ctx, fi, out, number, value_at)) return -1;
                ctx->frames[fi].offset = stop;
                continue;
            }
            case 3:
                if (f->depth >= max_depth) goto frame_done;
                if (pbj_start_field(ctx, f, out, number, &key_at, &value_at)) return -1;
                f->pend_kind = PBJ_CHILD_GROUP;
                f->pend_number = number;
                f->pend_key_at = key_at;
                f->pend_value_at = value_at;
                if (pbj_push(ctx, out, p, f->end, f->depth + 1, number)) return -1;
                continue;
            case 4:
                if (f->group != number) goto frame_done;
                stopped_at = p;
                goto frame_done;
            default:
                goto frame_done;
            }
            /* A number: varint, fixed64 or fixed32. */
            if (pbj_start_field(ctx, f, out, number, &key_at, &value_at) || pbj_put_uint(out, value) ||
                pbj_add_entry(ctx, fi, out, number, value_at))
                return -1;
            ctx->frames[fi].offset = p;
            continue;
        }
    frame_done:
        /* Frame fi ended: raised, or returned stopped_at. Its caller (the frame below) resumes. */
        for (;;) {
            f = &ctx->frames[fi];
            if (fi == 0) {
                /* The top level (a message: it never raises). */
                int whole = stopped_at >= len;
                if (pbj_finish_object(ctx, f, out, whole)) return -1;
                if (!whole) {
                    static const char marker[] = "\"@undecoded\":\"";
                    if ((ctx->n_entries > 0 && buf_put(out, ",", 1)) || buf_put(out, marker, sizeof marker - 1) ||
                        pbj_put_base64(out, data + stopped_at, len - stopped_at) || buf_put(out, "\"}", 2))
                        return -1;
                }
                return 0;
            }
            pbj_frame_t *parent = &ctx->frames[fi - 1];
            if (parent->pend_kind == PBJ_CHILD_GROUP) {
                if (raised) {
                    /* _Stop out of the group's _fields: the caller's field is not valid, and the
                       caller returns where that field began. */
                    out->len = parent->pend_key_at;
                    ctx->n_entries = f->entry_base;
                    ctx->n_frames--;
                    fi--;
                    raised = 0;
                    stopped_at = parent->field_start;
                    continue;
                }
                if (pbj_finish_object(ctx, f, out, 1)) return -1;
                ctx->n_entries = f->entry_base;
                ctx->n_frames--;
                if (pbj_add_entry(ctx, fi - 1, out, parent->pend_number, parent->pend_value_at)) return -1;
                ctx->frames[fi - 1].offset = stopped_at;
                break;
            }
            /* A nested attempt (_nested_or_bytes): a message when it parsed to its end with at
               least one field, else the bytes. */
            size_t stop = raised ? parent->pend_raw_start : stopped_at;
            if (stop == parent->pend_raw_end && ctx->n_entries > f->entry_base) {
                if (pbj_finish_object(ctx, f, out, 1)) return -1;
            } else {
                out->len = parent->pend_value_at;
                if (pbj_put_bytes_object(out, data + parent->pend_raw_start, parent->pend_raw_end - parent->pend_raw_start))
                    return -1;
            }
            ctx->n_entries = f->entry_base;
            ctx->n_frames--;
            if (pbj_add_entry(ctx, fi - 1, out, parent->pend_number, parent->pend_value_at)) return -1;
            ctx->frames[fi - 1].offset = ctx->frames[fi - 1].pend_raw_end;
            break;
        }
    }
}

static int pbjson_schemaless(const uint8_t *data, size_t len, int max_depth, int max_fields, buf_t *out,
                             size_t *chars) {
    pbj_ctx_t ctx;
    ctx.frames = ctx.inline_frames;
    ctx.n_frames = 0;
    ctx.cap_frames = PBJ_INLINE_FRAMES;
    ctx.entries = ctx.inline_entries;
    ctx.n_entries = 0;
    ctx.cap_entries = PBJ_INLINE_ENTRIES;
    ctx.scratch = (buf_t){0};
    size_t begin = out->len;
    int failed = pbj_run(&ctx, data, len, max_depth < 1 ? 1 : max_depth, max_fields < 0 ? 0 : max_fields, out);
    if (ctx.frames != ctx.inline_frames) PyMem_Free(ctx.frames);
    if (ctx.entries != ctx.inline_entries) PyMem_Free(ctx.entries);
    buf_free(&ctx.scratch);
    if (failed) return -1;
    size_t count = 0;
    for (size_t i = begin; i < out->len; i++) count += (out->data[i] & 0xC0) != 0x80;
    *chars = count;
    return 0;
}
