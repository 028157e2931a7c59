"""Dissection speed: Trawl's dissector against tshark on the same large capture.

    python bench/dissect.py [--packets 1000000] [--dns-share 0.1] [--keep FILE] [--profile]

Generates a capture (HTTP/1.1 keep-alive connections, each request / response / ACK, plus a
share of DNS over UDP), then times on the same file, in the same run:

1. the dissection stage alone: `Dissector.feed` over pre-read PacketBatches of 1000 records,
   calls returned as ApiCall objects, with the compiled lane (the default); then
   `Dissector.feed_encoded`, calls returned serialized, what one dissector replica does with the
   bus taken away; then `feed` with the Python path alone (`express: false`);
2. `trawl analyze FILE --json > /dev/null` end to end (file reading, dissection, enrichment,
   JSON output), when the CLI is installed;
3. `tshark -r FILE -Y "http or dns" -T fields ...` as the issue specifies.

It prints packets/s and calls/s of each and the ratios. `--profile` runs the dissection stage
under cProfile and prints the top functions instead.

    python bench/dissect.py --grpc 50000 [--keep FILE] [--profile]

does the same on a capture of real grpcio unary calls on one connection, recorded first
(bench/grpc_capture.py: grpcio server and client on loopback, tcpdump; needs root), against
`tshark -d tcp.port==PORT,http2 -Y grpc -T fields ...`. The Python path only: no compiled
lane takes HTTP/2 yet, so the two dissector rows agree.

    python bench/dissect.py --redis 200000 [--keep FILE]

does the same on a capture of `redis-benchmark -t set,get -P 16` (pipelined SET and GET against
Debian's redis-server, bench/redis_capture.py; needs root), against
`tshark -d tcp.port==PORT,resp -Y resp -T fields ...` (the issue's measure), and beside it
tshark's JSON of the same layers (`-T json -j resp`), the like of `trawl analyze --json`'s
output (both --redis and --kafka).

    python bench/dissect.py --kafka 50000 [--copies 10] [--keep FILE]

does the same on a capture of the real kafka-python client producing (acks=1) and consuming
through a group, against the stand-in broker of tests/kafka_broker.py (bench/kafka_capture.py;
needs root), against `tshark -Y kafka -T fields ...`. The real client makes about 500 calls/s
here, so `--copies N` repeats the recording N times (each copy's clients on their own loopback
address, one copy after the other in time) for a capture long enough that start-up (about
0.25 s of imports for `trawl analyze`, 0.2 s for tshark) does not decide the ratio.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dpkt

from trawl.dissector.config import DissectorSettings
from trawl.dissector.engine import Dissector
from trawl.pcap import LINKTYPE_ETHERNET, RECORD_HEADER
from trawl.v1.packets_pb2 import PacketBatch

ETH_HEADER = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
BATCH_PACKETS = 1000


def say(text: str = "") -> None:
    """A benchmark prints its figures (stdout); tools and services log instead."""
    sys.stdout.write(text + "\n")


def _frame(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes) -> bytes:
    segment = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF, flags=flags, win=502)
    segment.data = payload
    packet = dpkt.ip.IP(src=src, dst=dst, p=6, ttl=64, data=segment)
    packet.len = 20 + len(bytes(segment))
    return ETH_HEADER + bytes(packet)


def _udp_frame(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    datagram = dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(payload), data=payload)
    packet = dpkt.ip.IP(src=src, dst=dst, p=17, ttl=64, data=datagram)
    packet.len = 20 + 8 + len(payload)
    return ETH_HEADER + bytes(packet)


def _dns_pair(ident: int, name: str) -> tuple[bytes, bytes]:
    query = dpkt.dns.DNS(id=ident, qd=[dpkt.dns.DNS.Q(name=name, type=dpkt.dns.DNS_A)])
    answer = dpkt.dns.DNS(
        id=ident,
        op=dpkt.dns.DNS_RA | dpkt.dns.DNS_QR,
        qd=[dpkt.dns.DNS.Q(name=name, type=dpkt.dns.DNS_A)],
        an=[dpkt.dns.DNS.RR(name=name, type=dpkt.dns.DNS_A, ttl=30, ip=bytes([10, 96, ident & 0xFF, 7]))],
    )
    return bytes(query), bytes(answer)


def generate(path: Path, packets: int, requests_per_connection: int = 50, dns_share: float = 0.1) -> None:
    """Write a pcap of about `packets` frames; HTTP exchanges are 3 frames, DNS ones 2."""
    ACK, PSH, SYN, FIN = dpkt.tcp.TH_ACK, dpkt.tcp.TH_PUSH, dpkt.tcp.TH_SYN, dpkt.tcp.TH_FIN
    ts = 1_700_000_000.0
    # One DNS exchange (2 frames) every `dns_every` HTTP exchanges (3 frames) gives that share of frames.
    dns_every = max(1, round(2 * (1 - dns_share) / (3 * dns_share))) if dns_share > 0 else 0
    written = 0
    connection = 0
    body = b'{"items":[1,2,3],"next":null,"total":3}'
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle, linktype=LINKTYPE_ETHERNET)

        def emit(frame: bytes) -> None:
            nonlocal ts, written
            writer.writepkt(frame, ts=ts)
            ts += 0.00002
            written += 1

        while written < packets:
            connection += 1
            client = bytes([10, 1, (connection >> 8) & 0xFF, connection & 0xFF])
            server = bytes([10, 2, 0, 1 + connection % 20])
            cport = 20000 + connection % 40000
            cseq, sseq = 1000, 900000
            emit(_frame(client, server, cport, 8080, cseq, 0, SYN, b""))
            emit(_frame(server, client, 8080, cport, sseq, cseq + 1, SYN | ACK, b""))
            cseq, sseq = cseq + 1, sseq + 1
            emit(_frame(client, server, cport, 8080, cseq, sseq, ACK, b""))
            for index in range(requests_per_connection):
                request = (
                    b"GET /api/v1/orders/%d?page=%d HTTP/1.1\r\nHost: orders.shop.svc:8080\r\n"
                    b"User-Agent: bench/1.0\r\nAccept: application/json\r\n"
                    b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n"
                ) % (connection, index)
                response = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                    b"Date: Tue, 14 Nov 2023 22:13:20 GMT\r\n\r\n%s"
                ) % (len(body), body)
                emit(_frame(client, server, cport, 8080, cseq, sseq, PSH | ACK, request))
                cseq += len(request)
                emit(_frame(server, client, 8080, cport, sseq, cseq, PSH | ACK, response))
                sseq += len(response)
                emit(_frame(client, server, cport, 8080, cseq, sseq, ACK, b""))
                if dns_every and index % dns_every == 0:
                    name = f"svc-{index % 7}.shop.svc.cluster.local"
                    query, answer = _dns_pair((connection * 64 + index) & 0xFFFF, name)
                    emit(_udp_frame(client, b"\x0a\x60\x00\x0a", 30000 + index, 53, query))
                    emit(_udp_frame(b"\x0a\x60\x00\x0a", client, 53, 30000 + index, answer))
            emit(_frame(client, server, cport, 8080, cseq, sseq, FIN | ACK, b""))
            emit(_frame(server, client, 8080, cport, sseq, cseq + 1, FIN | ACK, b""))
            emit(_frame(client, server, cport, 8080, cseq + 1, sseq + 1, ACK, b""))


def read_batches(path: Path) -> tuple[list[PacketBatch], int]:
    batches: list[PacketBatch] = []
    records: list[bytes] = []
    count = 0
    with path.open("rb") as handle:
        reader = dpkt.pcap.Reader(handle)
        for ts, frame in reader:
            ts_ns = round(ts * 1_000_000_000)
            seconds, nanos = divmod(ts_ns, 1_000_000_000)
            records.append(RECORD_HEADER.pack(seconds, nanos, len(frame), len(frame)) + bytes(frame))
            count += 1
            if len(records) == BATCH_PACKETS:
                batches.append(_batch(records, len(batches) + 1))
                records = []
    if records:
        batches.append(_batch(records, len(batches) + 1))
    return batches, count


def repeat_capture(path: Path, copies: int, server_port: int) -> None:
    """Make `path` `copies` times as long: the recording, then copies of it one after the other in
    time, each with its clients moved to another loopback address (127.0.<k>.1), IPv4 and TCP
    checksums made again; so every copy's connections are connections of their own, as many
    clients of one broker would make. What a recording of that many calls would be, without the
    minutes the real client takes to make them."""
    with path.open("rb") as handle:
        reader = dpkt.pcap.Reader(handle)
        link_type = reader.datalink()
        packets = [(ts, bytes(frame)) for ts, frame in reader]
    if copies <= 1 or not packets or link_type != dpkt.pcap.DLT_EN10MB:
        return
    span = packets[-1][0] - packets[0][0] + 1.0
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle, snaplen=262144, linktype=link_type, nano=True)
        for ts, frame in packets:
            writer.writepkt(frame, ts=ts)
        for copy in range(1, copies):
            address = bytes((127, 0, copy % 256, 1 + copy // 256))
            for ts, frame in packets:
                ethernet = dpkt.ethernet.Ethernet(frame)
                ip = ethernet.data
                if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.tcp.TCP):
                    segment = ip.data
                    if segment.dport == server_port:
                        ip.src = address
                    elif segment.sport == server_port:
                        ip.dst = address
                    ip.sum = segment.sum = 0  # dpkt computes both again
                    frame = bytes(ethernet)
                writer.writepkt(frame, ts=ts + copy * span)


def _batch(records: list[bytes], sequence: int) -> PacketBatch:
    return PacketBatch(
        node="bench",
        link_type=LINKTYPE_ETHERNET,
        sequence=sequence,
        nanosecond=True,
        records=b"".join(records),
        packet_count=len(records),
    )


def dissect(batches: list[PacketBatch], express: bool = True, encoded: bool = False) -> tuple[float, dict[str, int]]:
    """The dissection stage over `batches`: calls as ApiCall objects (`feed`), or as the
    serialized calls the dissector service publishes (`feed_encoded`, `encoded`)."""
    dissector = Dissector(DissectorSettings.load(None, node="bench", express=express), "bench")
    feed = dissector.feed_encoded if encoded else dissector.feed
    finish = dissector.finish_encoded if encoded else dissector.finish
    started = time.perf_counter()
    calls = 0
    for packet_batch in batches:
        calls += len(feed(packet_batch))
    calls += len(finish())
    elapsed = time.perf_counter() - started
    counters = dissector.counters
    counters["returned"] = calls
    return elapsed, counters


def run_command(command: list[str], runs: int = 3) -> float | None:
    """The best of `runs` runs (trawl and tshark alike: the first run also warms the file cache).
    Python may write its bytecode caches, as it does for any installed program: with
    PYTHONDONTWRITEBYTECODE set (some sandboxes set it) every start of `trawl analyze` would
    compile Trawl's sources again, about 0.1 s that no deployment pays."""
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    best: float | None = None
    for _ in range(runs):
        started = time.perf_counter()
        result = subprocess.run(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False, env=environment
        )
        if result.returncode != 0:
            say(f"  {' '.join(command[:3])}... failed: {result.stderr.decode(errors='replace')[-300:]}")
            return None
        elapsed = time.perf_counter() - started
        best = elapsed if best is None else min(best, elapsed)
    return best


# protocol -> (tshark's dissector, its display filter and fields)
RECORDED_TSHARK = {
    "redis": (
        "resp",
        ["-Y", "resp", "-T", "fields", "-e", "resp.bulk_string.value", "-e", "resp.string", "-e", "resp.error",
         "-e", "resp.integer"],
    ),
    "kafka": (
        "kafka",
        ["-Y", "kafka", "-T", "fields", "-e", "kafka.api_key", "-e", "kafka.correlation_id", "-e", "kafka.topic_name",
         "-e", "kafka.error"],
    ),
}  # fmt: skip


def recorded_bench(protocol: str, count: int, keep: Path | None, copies: int = 1) -> int:
    """--redis, --kafka: a capture of real client traffic recorded first (`copies` > 1: made
    that many times as long by `repeat_capture`); the dissection stage (compiled lane, then the
    Python path alone), `trawl analyze` and tshark on it."""
    if protocol == "redis":
        from redis_capture import record
    else:
        from kafka_capture import record

    workdir = Path(tempfile.mkdtemp(prefix="trawl-bench-"))
    path = keep or workdir / f"{protocol}.pcap"
    try:
        started = time.perf_counter()
        port = record(path, count)
        repeat_capture(path, copies, port)
        batches, packets = read_batches(path)
        made = time.perf_counter() - started
        say(f"capture: {path} ({packets} packets, {path.stat().st_size >> 20} MiB), made in {made:.1f} s")
        elapsed, counters = dissect(batches)
        calls = counters.get(f"calls_{protocol}", 0)
        # A connection the lane gave back before the end (a packet tcpdump dropped on a busy machine,
        # say) is Python's from there: the figures below are then not the lane's.
        given_back = {
            name.removeprefix("express_demotions_"): value
            for name, value in counters.items()
            if name.startswith("express_demotions_") and name != "express_demotions_finish" and value
        }
        say(f"connections the lane gave back before the end of input: {given_back or 'none'}")
        rows = [("dissector stage (Dissector.feed)", elapsed)]
        rows.append(("  calls as bytes (feed_encoded)", dissect(batches, encoded=True)[0]))
        python_elapsed, python_counters = dissect(batches, express=False)
        python_calls = python_counters.get(f"calls_{protocol}", 0)
        if python_calls != calls:
            say(f"  the Python path found {python_calls} calls, the compiled lane {calls}")
        rows.append(("  the same, Python path only", python_elapsed))
        trawl = shutil.which("trawl") or str(Path(sys.executable).parent / "trawl")
        if Path(trawl).exists():
            analyze = run_command(["sh", "-c", f"{trawl} analyze {path} --json > /dev/null"])
            if analyze is not None:
                rows.append(("trawl analyze --json > /dev/null", analyze))
        tshark_time = None
        if shutil.which("tshark"):
            dissector, arguments = RECORDED_TSHARK[protocol]
            tshark_time = run_command(["tshark", "-r", str(path), "-d", f"tcp.port=={port},{dissector}", *arguments])
            if tshark_time is not None:
                rows.append((f"tshark -Y {dissector} -T fields", tshark_time))
        # The like of `analyze --json`: tshark's own JSON of the protocol's layers, a document a
        # packet. Shown beside the measure (fields), not instead of it.
        tshark_json = None
        if tshark_time is not None:
            dissector = RECORDED_TSHARK[protocol][0]
            tshark_json = run_command(
                ["tshark", "-r", str(path), "-d", f"tcp.port=={port},{dissector}", "-Y", dissector, "-T", "json",
                 "-j", dissector],
                runs=1,
            )  # fmt: skip
            if tshark_json is not None:
                rows.append((f"tshark -Y {dissector} -T json -j {dissector}", tshark_json))
        say(f"calls: {calls} {protocol}")
        say(f"{'':36} {'seconds':>8} {'packets/s':>11} {'calls/s':>11} {'vs tshark':>9} {'vs -T json':>10}")
        for name, seconds in rows:
            ratio = f"{tshark_time / seconds:8.1f}x" if tshark_time else "        -"
            json_ratio = f"{tshark_json / seconds:9.1f}x" if tshark_json else "         -"
            say(f"{name:36} {seconds:8.2f} {packets / seconds:11,.0f} {calls / seconds:11,.0f} {ratio} {json_ratio}")
        return 0
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # A million packets: `trawl analyze` starts in about 0.25 s (imports), tshark in about 0.2 s;
    # at 200,000 packets that start-up alone would be most of a 10x-tshark budget.
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--dns-share", type=float, default=0.1, help="share of the frames that are DNS")
    parser.add_argument("--keep", type=Path, help="write the generated capture here (and keep it)")
    parser.add_argument("--profile", action="store_true", help="profile the dissection stage instead")
    parser.add_argument(
        "--grpc",
        type=int,
        metavar="CALLS",
        help="instead: record this many real grpcio unary calls on one connection (needs root) and time those",
    )
    parser.add_argument(
        "--kafka",
        type=int,
        metavar="CALLS",
        help="instead: record about this many kafka-python produce and fetch calls (needs root) and time those",
    )
    parser.add_argument(
        "--copies",
        type=int,
        default=1,
        help="with --kafka or --redis: repeat the recording this many times (clients on other addresses)",
    )
    parser.add_argument(
        "--redis",
        type=int,
        metavar="COMMANDS",
        help="instead: record this many redis-benchmark commands (pipelined SET/GET; needs root) and time those",
    )
    args = parser.parse_args()
    if args.redis:
        return recorded_bench("redis", args.redis, args.keep, args.copies)
    if args.kafka:
        return recorded_bench("kafka", args.kafka, args.keep, args.copies)
    workdir = Path(tempfile.mkdtemp(prefix="trawl-bench-"))
    path = args.keep or workdir / "bench.pcap"
    try:
        started = time.perf_counter()
        grpc_port = None
        if args.grpc:
            from grpc_capture import record

            grpc_port = record(path, args.grpc)
        else:
            generate(path, args.packets, dns_share=args.dns_share)
        batches, packets = read_batches(path)
        say(
            f"capture: {path} ({packets} packets, {path.stat().st_size >> 20} MiB), made in "
            f"{time.perf_counter() - started:.1f} s"
        )
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            dissect(batches)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
            return 0
        elapsed, counters = dissect(batches)
        calls = counters["returned"]
        http_calls = counters.get("calls_grpc" if grpc_port else "calls_http", 0)
        rows = [("dissector stage (Dissector.feed)", elapsed)]
        rows.append(("  calls as bytes (feed_encoded)", dissect(batches, encoded=True)[0]))
        python_elapsed, python_counters = dissect(batches, express=False)
        if python_counters["returned"] != calls:
            say(f"  the Python path found {python_counters['returned']} calls, the compiled lane {calls}")
        rows.append(("  the same, Python path only", python_elapsed))
        if grpc_port:
            say(f"calls: {calls} ({http_calls} grpc)")
        else:
            say(f"calls: {calls} ({http_calls} http, {counters.get('calls_dns', 0)} dns)")
        trawl = shutil.which("trawl") or str(Path(sys.executable).parent / "trawl")
        if Path(trawl).exists():
            analyze = run_command(["sh", "-c", f"{trawl} analyze {path} --json > /dev/null"])
            if analyze is not None:
                rows.append(("trawl analyze --json > /dev/null", analyze))
        tshark_time = None
        if shutil.which("tshark") and grpc_port:
            # tshark does not take the port for HTTP/2 by itself: the decode-as rule of the fixtures' README.
            tshark_time = run_command(
                [
                    "tshark", "-r", str(path), "-d", f"tcp.port=={grpc_port},http2", "-Y", "grpc", "-T", "fields",
                    "-e", "http2.streamid", "-e", "http2.headers.path", "-e", "http2.headers.status",
                    "-e", "http2.header.value",
                ]
            )  # fmt: skip
            if tshark_time is not None:
                rows.append(("tshark -Y grpc -T fields", tshark_time))
        elif shutil.which("tshark"):
            tshark_time = run_command(
                [
                    "tshark", "-r", str(path), "-Y", "http or dns", "-T", "fields",
                    "-e", "http.request.method", "-e", "http.request.uri", "-e", "http.response.code",
                    "-e", "dns.qry.name",
                ]
            )  # fmt: skip
            if tshark_time is not None:
                rows.append(("tshark -Y 'http or dns' -T fields", tshark_time))
        kind = "grpc" if grpc_port else "http"
        say(f"{'':36} {'seconds':>8} {'packets/s':>11} {'calls/s':>10} {kind + ' calls/s':>13} {'vs tshark':>9}")
        for name, seconds in rows:
            ratio = f"{tshark_time / seconds:8.1f}x" if tshark_time else "        -"
            say(
                f"{name:36} {seconds:8.2f} {packets / seconds:11,.0f} {calls / seconds:10,.0f} "
                f"{http_calls / seconds:13,.0f} {ratio}"
            )
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
