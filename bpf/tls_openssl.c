// TLS plaintext from OpenSSL (1.1, 3.x) and BoringSSL: uprobes at the entry and uretprobes at
// the return of SSL_read, SSL_write, SSL_read_ex and SSL_write_ex; and from Go's crypto/tls:
// uprobes at the entry and at every RET of (*Conn).Write and (*Conn).Read (go_enter and
// leave_go for the register ABI, go_enter_stack and leave_go_stack for the stack ABI). Compiled by bcc at run time (services/collector/tls_uprobes.py loads it and sets
// the -D values below).
//
// The entry probe keeps the call's buffer (and, for the _ex forms, where the library writes
// the byte count) per thread; the return probe reads the bytes the call moved and sends them
// to user space through one ring buffer, cut into chunks of at most CHUNK_MAX bytes, at most
// SEGMENTS_MAX chunks a call: what lies beyond is reported as `truncated` on the last chunk.
//
// Which connection: OpenSSL keeps the fd inside the SSL object at offsets that differ between
// versions and builds, so it is not read from there. The socket I/O the same thread does while
// it is inside an SSL call names it: the sock_send_length/sock_recv_length tracepoints (where
// the kernel has them: HAVE_SOCK_LENGTH; without them user space looks in /proc) give the
// kernel socket, whose addresses the inet_sock_set_state tracepoint recorded when it
// became ESTABLISHED; the read/write/sendto/recvfrom system call gives the fd (a socket BIO
// reads and writes the socket itself, libcurl's BIO calls send and recv). Both are remembered
// per SSL object for the calls that need no I/O (bytes already decrypted and buffered). The
// addresses travel with the chunk: looked up later in /proc, a short connection's fd would
// already be closed, or be another connection's. Tracepoint layouts come from tracefs at
// compile time, so nothing here depends on the kernel headers' struct layouts.
//
// Nothing is lost silently: a chunk the ring cannot take and a buffer the kernel could not
// read are counted in `lost` (the latter also sent as a gap). The table of calls in flight
// holds CALLS_MAX threads inside an SSL call at once; it is an LRU, so the entry of a thread
// that died inside one ages out.

#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

#ifndef CHUNK_MAX
#define CHUNK_MAX 16384
#endif
#ifndef SEGMENTS_MAX
#define SEGMENTS_MAX 8
#endif
#ifndef RING_PAGES
#define RING_PAGES 2048
#endif
#ifndef CALLS_MAX
#define CALLS_MAX 16384
#endif
// The reader is woken once per WAKEUP_EVERY chunks of a CPU, and otherwise reads the ring on
// its own timer (a wakeup per chunk cost the traced process more than the probes themselves).
#ifndef WAKEUP_EVERY
#define WAKEUP_EVERY 128
#endif

#define KIND_DATA 0
#define KIND_CLOSE 1
#define KIND_EXEC 2

#define DIRECTION_EGRESS 1
#define DIRECTION_INGRESS 2

#define LIBRARY_OPENSSL 0
#define LIBRARY_GO 1

#define FD_UNKNOWN 0xffffffff
#define TCP_ESTABLISHED 1
#define PROTO_TCP 6
#define FAMILY_INET 2

// Indexes of `lost` (per CPU; user space sums them).
#define LOST_RING_CHUNKS 0
#define LOST_RING_BYTES 1
#define LOST_CALLS_TABLE_FULL 2
#define LOST_READ_FAULTS 3
#define LOST_TRUNCATED_BYTES 4
#define LOST_SLOTS 5

// A TCP connection as its local end sees it (ports in host order, addresses as on the wire).
struct tuple {
    u16 family;
    u16 local_port;
    u16 remote_port;
    u8 pad[2];
    u8 local_addr[16];
    u8 remote_addr[16];
};

// 100-byte header, unpacked in user space as tls_uprobes.HEADER.
struct chunk {
    u64 ts_ns;
    u64 ssl;
    u32 pid;
    u32 tid;
    u32 fd;
    u32 len;        // bytes of `data`
    u32 call_len;   // bytes the whole call moved
    u32 truncated;  // bytes of the call after this chunk that are not sent (last chunk only)
    u8 kind;
    u8 direction;
    u8 has_tuple;
    u8 library;     // LIBRARY_*
    struct tuple tuple;
    char comm[TASK_COMM_LEN];
    u8 data[CHUNK_MAX];
};

struct call_args {
    u64 entry_ns;
    u64 buf;
    u64 ssl;
    u64 count_ptr;  // size_t * of the _ex forms (0 for SSL_read/SSL_write)
    u64 sk;
    u32 fd;
    u8 direction;
};

BPF_RINGBUF_OUTPUT(chunks, RING_PAGES);
// LRU: a thread that exits inside an SSL call (its uretprobe never fires) leaves an entry
// that ages out instead of filling the table.
BPF_TABLE("lru_hash", u64, struct call_args, calls, CALLS_MAX);
BPF_TABLE("lru_hash", u64, u32, ssl_fds, 65536);
BPF_TABLE("lru_hash", u64, u64, ssl_socks, 65536);
// kernel socket -> its addresses, from the moment it is ESTABLISHED.
BPF_TABLE("lru_hash", u64, struct tuple, sock_tuples, 131072);
// (pid << 32 | fd) of the sockets data was sent for, so their close is reported.
BPF_TABLE("lru_hash", u64, u8, tls_fds, 65536);
BPF_PERCPU_ARRAY(scratch, struct chunk, 1);

// Go's crypto/tls: a call in flight is keyed by its goroutine (Go may move it to another
// thread inside the call, and a thread runs many goroutines in turn).
struct go_key {
    u64 g;
    u32 pid;
    u32 pad;
};
struct go_call {
    u64 entry_ns;
    u64 sk;
    u64 conn;
    u64 buf;
    u64 len;
    u32 fd;
    u8 direction;
};
BPF_TABLE("lru_hash", struct go_key, struct go_call, go_calls, CALLS_MAX);
// Processes that made a hooked Go TLS call: their socket system calls name the kernel socket
// of each fd (the goroutine's thread at the system call is not known at the uprobe).
BPF_TABLE("lru_hash", u32, u8, go_pids, 4096);
// thread -> fd of the read/write/sendto/recvfrom it is inside (Go processes only).
BPF_TABLE("lru_hash", u32, u32, go_sys_fd, 16384);
// (pid << 32 | fd) -> kernel socket, for Go processes.
BPF_TABLE("lru_hash", u64, u64, go_fd_socks, 65536);
BPF_PERCPU_ARRAY(lost, u64, LOST_SLOTS);
BPF_PERCPU_ARRAY(since_wakeup, u32, 1);

static __always_inline void count_lost(int slot, u64 amount) {
    u64 *value = lost.lookup(&slot);
    if (value)
        *value += amount;
}

static __always_inline u64 wakeup_flags(void) {
    int zero = 0;
    u32 *count = since_wakeup.lookup(&zero);
    if (!count)
        return BPF_RB_FORCE_WAKEUP;
    if (++*count >= WAKEUP_EVERY) {
        *count = 0;
        return BPF_RB_FORCE_WAKEUP;
    }
    return BPF_RB_NO_WAKEUP;
}

static __always_inline int enter(struct pt_regs *ctx, u8 direction, int ex) {
    u64 id = bpf_get_current_pid_tgid();
#ifdef SELF_PID
    // The collector's own TLS (to NATS) would feed back into what it publishes.
    if ((id >> 32) == SELF_PID)
        return 0;
#endif
    struct call_args args = {};
    args.ssl = PT_REGS_PARM1(ctx);
    args.buf = PT_REGS_PARM2(ctx);
    args.count_ptr = ex ? PT_REGS_PARM4(ctx) : 0;
    args.fd = FD_UNKNOWN;
    args.direction = direction;
    args.entry_ns = bpf_ktime_get_ns();
    if (calls.update(&id, &args) != 0)
        count_lost(LOST_CALLS_TABLE_FULL, 1);
    return 0;
}

// Sends the `moved` bytes at `buf` of one call as chunks. `conn` names the TLS connection
// object (the SSL *, or Go's *tls.Conn); fd and sk are what is known of its socket.
// A write is stamped at its entry, a read at its return: a writer's return can come after
// the peer has read those bytes and answered (another goroutine or thread reading the answer),
// and user space orders the chunks by these times.
static __always_inline int emit(u64 id, u64 conn, u64 buf, u64 moved, u32 fd, u64 sk, u8 direction, u8 library,
                                u64 entry_ns) {
    if (moved == 0)
        return 0;
    if (moved > 0xffffffff)
        moved = 0xffffffff;
    u32 pid = id >> 32;
    if (fd != FD_UNKNOWN) {
        u64 key = ((u64)pid << 32) | fd;
        u8 one = 1;
        tls_fds.update(&key, &one);
    }

    int zero = 0;
    struct chunk *c = scratch.lookup(&zero);
    if (!c)
        return 0;
    c->ts_ns = direction == DIRECTION_EGRESS && entry_ns ? entry_ns : bpf_ktime_get_ns();
    c->ssl = conn;
    c->pid = pid;
    c->tid = (u32)id;
    c->fd = fd;
    c->call_len = (u32)moved;
    c->kind = KIND_DATA;
    c->direction = direction;
    c->has_tuple = 0;
    c->library = library;
    struct tuple *tuple = sk ? sock_tuples.lookup(&sk) : 0;
    if (tuple) {
        c->tuple = *tuple;
        c->has_tuple = 1;
    }
    bpf_get_current_comm(&c->comm, sizeof(c->comm));
    u32 total = (u32)moved;
    u32 sent_limit = (u32)CHUNK_MAX * SEGMENTS_MAX;
    u32 beyond = total > sent_limit ? total - sent_limit : 0;
    #pragma unroll
    for (int i = 0; i < SEGMENTS_MAX; i++) {
        // 64-bit, so that the bound checked is the register the helper gets (no zero extension
        // in between).
        u64 offset = (u64)i * CHUNK_MAX;
        if (offset >= total)
            break;
        u64 len = total - offset;
        if (len > CHUNK_MAX)
            len = CHUNK_MAX;
        // clang folds the bound above into the subtraction; the empty asm makes it check the
        // register the helper gets, which the verifier needs to see bounded.
        asm volatile("" : "+r"(len));
        if (len > CHUNK_MAX)
            break;
        c->len = (u32)len;
        c->truncated = (i == SEGMENTS_MAX - 1) ? beyond : 0;
        if (bpf_probe_read_user(c->data, len, (void *)(buf + offset)) != 0) {
            // A page of the buffer is not resident (a uprobe cannot fault it in): the rest of
            // the call goes as a gap of its size, so the dissector resynchronises there.
            count_lost(LOST_READ_FAULTS, 1);
            c->len = 0;
            c->truncated = total - (u32)offset;
            if (chunks.ringbuf_output(c, offsetof(struct chunk, data), wakeup_flags()) != 0)
                count_lost(LOST_RING_CHUNKS, 1);
            return 0;
        }
        u64 size = offsetof(struct chunk, data) + len;
        if (size > sizeof(struct chunk))
            size = sizeof(struct chunk);
        if (chunks.ringbuf_output(c, size, wakeup_flags()) != 0) {
            count_lost(LOST_RING_CHUNKS, 1);
            count_lost(LOST_RING_BYTES, len);
        }
    }
    if (beyond)
        count_lost(LOST_TRUNCATED_BYTES, beyond);
    return 0;
}


static __always_inline int leave(struct pt_regs *ctx, int ex) {
    u64 id = bpf_get_current_pid_tgid();
    struct call_args *args = calls.lookup(&id);
    if (!args)
        return 0;
    struct call_args call = *args;
    calls.delete(&id);
    // All four return an int: the upper half of the register is not part of it (an SSL_read
    // returning -1, a non-blocking socket with nothing to read, would read as 4294967295).
    int ret = (int)PT_REGS_RC(ctx);
    u64 moved = 0;
    if (ex) {
        if (ret != 1 || !call.count_ptr)
            return 0;
        if (bpf_probe_read_user(&moved, sizeof(moved), (void *)call.count_ptr) != 0) {
            count_lost(LOST_READ_FAULTS, 1);
            return 0;
        }
    } else {
        if (ret <= 0)
            return 0;
        moved = ret;
    }
    u32 fd = call.fd;
    if (fd != FD_UNKNOWN) {
        ssl_fds.update(&call.ssl, &fd);
    } else {
        u32 *known = ssl_fds.lookup(&call.ssl);
        if (known)
            fd = *known;
    }
    u64 sk = call.sk;
    if (sk) {
        ssl_socks.update(&call.ssl, &sk);
    } else {
        u64 *known_sk = ssl_socks.lookup(&call.ssl);
        if (known_sk)
            sk = *known_sk;
    }
    return emit(id, call.ssl, call.buf, moved, fd, sk, call.direction, LIBRARY_OPENSSL, call.entry_ns);
}

int enter_read(struct pt_regs *ctx) { return enter(ctx, DIRECTION_INGRESS, 0); }
int enter_write(struct pt_regs *ctx) { return enter(ctx, DIRECTION_EGRESS, 0); }
int enter_read_ex(struct pt_regs *ctx) { return enter(ctx, DIRECTION_INGRESS, 1); }
int enter_write_ex(struct pt_regs *ctx) { return enter(ctx, DIRECTION_EGRESS, 1); }
int leave_plain(struct pt_regs *ctx) { return leave(ctx, 0); }
int leave_ex(struct pt_regs *ctx) { return leave(ctx, 1); }

// Go (amd64). The register ABI (Go 1.17 and later): func (c *Conn) Write(b []byte) (int,
// error) and Read alike take c in RAX, b's pointer and length in RBX and RCX, return n in RAX,
// and the running goroutine (g) is in R14 throughout: a call in flight is keyed by its g. The
// stack ABI (Go before 1.17, and 1.17 built with GOEXPERIMENT=noregabi): at the entry SP points
// at the return address, with c, b's pointer, length and capacity above it (SP+8 to SP+32);
// at each RET the epilogue has given SP its entry value back and the results follow the
// arguments (n at SP+40, err at SP+48). See go_enter_stack for how those calls are paired.
// Either way the entry can fire twice for one call (the prologue grows the stack and starts the
// function again): the second entry overwrites the first with the same arguments.
static __always_inline int go_start(struct go_call *call, u32 pid, u64 conn, u64 buf, u64 len, u8 direction) {
    call->conn = conn;
    call->buf = buf;
    call->len = len;
    call->direction = direction;
    call->fd = FD_UNKNOWN;
    call->entry_ns = bpf_ktime_get_ns();
    // c.conn is a net.Conn (itab, data); for a TCP connection data is a *net.TCPConn, whose
    // first word is its *netFD, which starts with a poll.FD: a 16-byte fdMutex, then Sysfd.
    // Stable from Go 1.9 on; anything else gives an fd no TCP socket answers to (counted).
    u64 data = 0, netfd = 0;
    s64 sysfd = -1;
    if (bpf_probe_read_user(&data, sizeof(data), (void *)(conn + 8)) == 0 && data &&
        bpf_probe_read_user(&netfd, sizeof(netfd), (void *)data) == 0 && netfd &&
        bpf_probe_read_user(&sysfd, sizeof(sysfd), (void *)(netfd + 16)) == 0 && sysfd >= 0 &&
        sysfd < 0x7fffffff)
        call->fd = (u32)sysfd;
    // The socket as known now: another goroutine may close the fd before this call returns
    // (Go's HTTP/2 server writes from one goroutine and reads, then closes, from another).
    if (call->fd != FD_UNKNOWN) {
        u64 fd_key = ((u64)pid << 32) | call->fd;
        u64 *known = go_fd_socks.lookup(&fd_key);
        if (known)
            call->sk = *known;
    }
    u8 one = 1;
    go_pids.update(&pid, &one);
    return 0;
}

// The end of a call: n as the function returned it.
static __always_inline int go_finish(u64 id, struct go_call *call, s64 ret) {
    if (ret <= 0)
        return 0;
    u64 moved = (u64)ret;
    if (moved > call->len)
        moved = call->len;
    u64 sk = call->sk;
    // The first call of a connection does its handshake inside: the socket is named then.
    if (!sk && call->fd != FD_UNKNOWN) {
        u64 fd_key = (id & 0xffffffff00000000ULL) | call->fd;
        u64 *known = go_fd_socks.lookup(&fd_key);
        if (known)
            sk = *known;
    }
    return emit(id, call->conn, call->buf, moved, call->fd, sk, call->direction, LIBRARY_GO, call->entry_ns);
}

static __always_inline int go_enter(struct pt_regs *ctx, u8 direction) {
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32;
#ifdef SELF_PID
    if (pid == SELF_PID)
        return 0;
#endif
    struct go_key key = {};
    key.g = ctx->r14;
    key.pid = pid;
    struct go_call call = {};
    go_start(&call, pid, ctx->ax, ctx->bx, ctx->cx, direction);
    if (go_calls.update(&key, &call) != 0)
        count_lost(LOST_CALLS_TABLE_FULL, 1);
    return 0;
}

int enter_go_write(struct pt_regs *ctx) { return go_enter(ctx, DIRECTION_EGRESS); }
int enter_go_read(struct pt_regs *ctx) { return go_enter(ctx, DIRECTION_INGRESS); }

// At each RET of the function (no uretprobe: Go moves goroutine stacks, and a uretprobe's
// rewritten return address would move with them).
int leave_go(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    struct go_key key = {};
    key.g = ctx->r14;
    key.pid = id >> 32;
    struct go_call *found = go_calls.lookup(&key);
    if (!found)
        return 0;
    struct go_call call = *found;
    go_calls.delete(&key);
    return go_finish(id, &call, (s64)ctx->ax);
}

// The stack ABI's calls in flight, keyed by what the call's own argument frame holds at the
// entry and still holds at each RET: the *Conn and the buffer's address (assigned to once, in
// a corner of Write: see leave_go_stack), the results going after them. Not by g: R14 is not g in that ABI, and g lives
// in thread-local storage whose address (the thread's FS base) a uprobe cannot read without
// kernel struct layouts. Not by SP: Go copies a goroutine's stack elsewhere when it grows or
// shrinks, which can happen while the call waits for the network, so SP at the RET can differ
// from SP at the entry; the argument frame moves with the stack, and SP at the RET points at
// it wherever it is. Two calls in flight with one key would be two goroutines reading into (or
// writing from) one buffer on one connection at once.
struct go_stack_key {
    u64 conn;
    u64 buf;
    u32 pid;
    u32 pad;
};
BPF_TABLE("lru_hash", struct go_stack_key, struct go_call, go_stack_calls, CALLS_MAX);

static __always_inline int go_enter_stack(struct pt_regs *ctx, u8 direction) {
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32;
#ifdef SELF_PID
    if (pid == SELF_PID)
        return 0;
#endif
    u64 args[3] = {};  // c, b's pointer, b's length
    if (bpf_probe_read_user(args, sizeof(args), (void *)(ctx->sp + 8)) != 0) {
        count_lost(LOST_READ_FAULTS, 1);
        return 0;
    }
    struct go_stack_key key = {};
    key.conn = args[0];
    key.buf = args[1];
    key.pid = pid;
    struct go_call call = {};
    go_start(&call, pid, args[0], args[1], args[2], direction);
    if (go_stack_calls.update(&key, &call) != 0)
        count_lost(LOST_CALLS_TABLE_FULL, 1);
    return 0;
}

int enter_go_write_stack(struct pt_regs *ctx) { return go_enter_stack(ctx, DIRECTION_EGRESS); }
int enter_go_read_stack(struct pt_regs *ctx) { return go_enter_stack(ctx, DIRECTION_INGRESS); }

int leave_go_stack(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u64 frame[5] = {};  // c, b's pointer, length, capacity, then n
    if (bpf_probe_read_user(frame, sizeof(frame), (void *)(ctx->sp + 8)) != 0)
        return 0;  // no entry can be named: if one waits, it ages out of the LRU
    struct go_stack_key key = {};
    key.conn = frame[0];
    key.buf = frame[1];
    key.pid = id >> 32;
    struct go_call *found = go_stack_calls.lookup(&key);
    if (!found) {
        // The one assignment to b in either function: Write over TLS 1.0 with a CBC cipher
        // sends b's first byte alone (m, b = 1, b[1:]) and returns n + m.
        key.buf -= 1;
        found = go_stack_calls.lookup(&key);
        if (!found)
            return 0;
    }
    struct go_call call = *found;
    go_stack_calls.delete(&key);
    return go_finish(id, &call, (s64)frame[4]);
}

// The fd of a system call made inside an SSL call of the same thread.
static __always_inline void note_fd(u32 fd) {
    u64 id = bpf_get_current_pid_tgid();
    struct call_args *args = calls.lookup(&id);
    if (args)
        args->fd = fd;
    u32 pid = id >> 32;
    if (go_pids.lookup(&pid)) {
        u32 tid = (u32)id;
        go_sys_fd.update(&tid, &fd);
    }
}

#ifdef HAVE_SOCK_LENGTH
// The kernel socket of socket I/O done inside an SSL call of the same thread.
static __always_inline void note_sock(u64 sk) {
    u64 id = bpf_get_current_pid_tgid();
    struct call_args *args = calls.lookup(&id);
    if (args)
        args->sk = sk;
    u32 tid = (u32)id;
    u32 *fd = go_sys_fd.lookup(&tid);
    if (fd) {
        u64 fd_key = (id & 0xffffffff00000000ULL) | *fd;
        go_fd_socks.update(&fd_key, &sk);
        go_sys_fd.delete(&tid);
    }
}

TRACEPOINT_PROBE(sock, sock_send_length) { note_sock((u64)args->sk); return 0; }
TRACEPOINT_PROBE(sock, sock_recv_length) { note_sock((u64)args->sk); return 0; }
#endif

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != PROTO_TCP || args->newstate != TCP_ESTABLISHED)
        return 0;
    struct tuple tuple = {};
    tuple.family = args->family;
    tuple.local_port = args->sport;
    tuple.remote_port = args->dport;
    if (args->family == FAMILY_INET) {
        __builtin_memcpy(tuple.local_addr, args->saddr, 4);
        __builtin_memcpy(tuple.remote_addr, args->daddr, 4);
    } else {
        __builtin_memcpy(tuple.local_addr, args->saddr_v6, 16);
        __builtin_memcpy(tuple.remote_addr, args->daddr_v6, 16);
    }
    u64 sk = (u64)args->skaddr;
    sock_tuples.update(&sk, &tuple);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) { note_fd(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { note_fd(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { note_fd(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { note_fd(args->fd); return 0; }

static __always_inline void send_small(u8 kind, u32 fd) {
    int zero = 0;
    struct chunk *c = scratch.lookup(&zero);
    if (!c)
        return;
    u64 id = bpf_get_current_pid_tgid();
    c->ts_ns = bpf_ktime_get_ns();
    c->ssl = 0;
    c->pid = id >> 32;
    c->tid = (u32)id;
    c->fd = fd;
    c->len = 0;
    c->call_len = 0;
    c->truncated = 0;
    c->kind = kind;
    c->direction = 0;
    c->has_tuple = 0;
    c->library = 0;
    bpf_get_current_comm(&c->comm, sizeof(c->comm));
    if (chunks.ringbuf_output(c, offsetof(struct chunk, data), wakeup_flags()) != 0)
        count_lost(LOST_RING_CHUNKS, 1);
}

// A socket data was sent for is closed: user space forgets its 4-tuple (the fd number will be
// reused for another socket).
TRACEPOINT_PROBE(syscalls, sys_enter_close) {
    u64 key = (bpf_get_current_pid_tgid() & 0xffffffff00000000ULL) | (u32)args->fd;
    if (!tls_fds.lookup(&key))
        return 0;
    tls_fds.delete(&key);
    go_fd_socks.delete(&key);
    send_small(KIND_CLOSE, (u32)args->fd);
    return 0;
}

// A new program: user space looks at its mappings soon after (the dynamic linker maps libssl
// after exec), to hook a TLS library it has not seen yet.
TRACEPOINT_PROBE(sched, sched_process_exec) {
    send_small(KIND_EXEC, FD_UNKNOWN);
    return 0;
}
