"""Capture speed: tcpdump -w /dev/null versus Trawl's collector publishing to NATS, with the
packet stream TRAWL_PACKETS absent (core NATS only) and present (the durable path).

    sudo .venv/bin/python bench/capture.py [--packets 1000000] [--sizes 64,1500] [--flows 16]
                                           [--rounds 3] [--retention-max-bytes 1073741824]
                                           [--profile DIR]

For each frame size, a pcap of `--flows` TCP flows is written, then replayed with
`tcpreplay --topspeed` from a network namespace into a veth pair whose other end is on the
host, where the capture tool listens. The frames carry a destination MAC that is not the
veth's, so the host stack ignores them (only packet sockets see them). Each round has each
capture alone over the same replay, one after the other (the two collector runs swap order
from round to round):

- tcpdump -w /dev/null (its own "captured" and "dropped by kernel" report), the peer;
- the collector service (`python -m trawl collector`, live on the veth) publishing batches
  to an embedded NATS on core NATS, its figures read from its /metrics, twice:
  "core NATS": the stream TRAWL_PACKETS deleted once the collector has created it, so the
  server takes each batch and drops it (no subscriber), what the collector cost before
  the durable path; "durable": the stream present (fresh, with `--retention-max-bytes`,
  default the production `packet_retention.max_bytes`), so the server keeps every batch
  in memory, as it does in production (a limit that is reached removes the oldest).

CPU is a process's own user+system time (from /proc/<pid>/stat, every thread) between the
start and the end of the replay (for the durable run, once the stream has stopped growing);
the kernel's copy into the ring is not in it, for either capture tool. Readers of the stream
(dissector, recorder) are not running: their cost is not here.

Prints, per size: packets sent, captured, kernel drops, packets the collector dropped (queue
full or publish failed), CPU seconds (and its user+system split), CPU microseconds per
captured packet of the capture tool and of nats-server, for every run; whether the stream
held every batch (its state, from the JetStream API, against the batches the collector
published); then the medians over the rounds, what the durable path added and the
collector/tcpdump ratios. `--profile DIR` also writes a `perf record -g` of the collector and
of nats-server for each collector run (read with `perf report -i FILE`). Needs root and
tcpreplay (apt-get install tcpreplay).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dpkt
import yaml
from nats.js.errors import NotFoundError

from trawl.bus import STREAM_PACKETS, Bus
from trawl.config import NatsSettings, PacketRetention
from trawl.embedded import EmbeddedNats, free_port

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
COLLECTOR_COMMAND = [sys.executable, "-m", "trawl", "collector"]
STRANGER_MAC = b"\x02\x00\x00\x00\x99\x99"  # not the veth's: the host stack drops the frames as "other host"


@dataclass(frozen=True)
class StreamState:
    """TRAWL_PACKETS as the JetStream API reports it."""

    messages: int
    bytes: int
    first_seq: int
    last_seq: int


@dataclass
class Result:
    tool: str
    sent: int
    captured: int
    kernel_drops: int
    cpu_user_s: float
    cpu_sys_s: float
    replay_pps: float
    dropped_packets: int = 0  # the collector's own losses: queue full or publish failed
    published_batches: int = 0
    nats_cpu_s: float | None = None  # nats-server's user+system time over the same window
    stream: StreamState | None = None  # TRAWL_PACKETS at the end of the run (None: absent)

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_sys_s

    @property
    def cpu_us_per_packet(self) -> float:
        return self.per_packet_us(self.cpu_s)

    @property
    def nats_us_per_packet(self) -> float:
        return float("nan") if self.nats_cpu_s is None else self.per_packet_us(self.nats_cpu_s)

    def per_packet_us(self, cpu_s: float) -> float:
        return cpu_s / self.captured * 1e6 if self.captured else float("nan")


def run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout)


def write_traffic(path: Path, frame_size: int, flows: int, packets_per_flow: int) -> int:
    """A pcap of `flows` TCP flows (both directions), frames of exactly `frame_size` bytes."""
    payload_size = max(0, frame_size - 14 - 20 - 20)
    count = 0
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle)
        for index in range(packets_per_flow):
            for flow in range(flows):
                client, server = f"10.213.{flow // 250}.{flow % 250 + 1}", "10.213.255.1"
                forward = index % 2 == 0
                tcp = dpkt.tcp.TCP(
                    sport=40000 + flow if forward else 8080,
                    dport=8080 if forward else 40000 + flow,
                    seq=1000 + index * payload_size,
                    flags=dpkt.tcp.TH_ACK,
                    data=b"x" * payload_size,
                )
                src, dst = (client, server) if forward else (server, client)
                ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=dpkt.ip.IP_PROTO_TCP, data=tcp)
                ip.len = len(bytes(ip))
                frame = dpkt.ethernet.Ethernet(src=b"\x02\x00\x00\x00\x00\x01", dst=STRANGER_MAC, data=ip)
                writer.writepkt(bytes(frame), ts=index * 1e-6)
                count += 1
    return count


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of the process (utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


async def _on_packet_stream(nats_url: str, delete: bool) -> StreamState | None:
    bus = await Bus.connect(NatsSettings(servers=[nats_url]), "trawl-bench")
    try:
        if delete:
            with contextlib.suppress(NotFoundError):
                await bus.js.delete_stream(STREAM_PACKETS)
            return None
        try:
            state = (await bus.js.stream_info(STREAM_PACKETS)).state
        except NotFoundError:
            return None
        return StreamState(state.messages, state.bytes, state.first_seq, state.last_seq)
    finally:
        await bus.close()


def packet_stream_state(nats_url: str) -> StreamState | None:
    """TRAWL_PACKETS's state, or None when there is no such stream."""
    return asyncio.run(_on_packet_stream(nats_url, delete=False))


def delete_packet_stream(nats_url: str) -> None:
    asyncio.run(_on_packet_stream(nats_url, delete=True))


def settled_packet_stream(nats_url: str, timeout_s: float = 10.0) -> StreamState | None:
    """The stream's state once its last sequence stops moving: nats-server may still be
    storing what the collector sent when the replay ends, and that work is the durable path's."""
    state = packet_stream_state(nats_url)
    deadline = time.monotonic() + timeout_s
    while state is not None and time.monotonic() < deadline:
        time.sleep(0.25)
        later = packet_stream_state(nats_url)
        if later is not None and later.last_seq == state.last_seq:
            return later
        state = later
    return state


class Veth:
    """veth pair: the sender end in a namespace of its own, the capture end on the host."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.netns = f"twbench{tag}"
        self.sender = "eth0"
        self.capture = f"twbc{tag}"
        run("ip", "netns", "add", self.netns)
        run("ip", "link", "add", self.capture, "type", "veth", "peer", "name", self.sender, "netns", self.netns)
        run("ip", "link", "set", self.capture, "up")
        run("ip", "netns", "exec", self.netns, "ip", "link", "set", self.sender, "up")

    def replay(self, pcap: Path, loops: int) -> tuple[int, float]:
        """tcpreplay --topspeed; returns packets sent and the rate it reports."""
        out = run(
            "ip", "netns", "exec", self.netns,
            "tcpreplay", "--topspeed", f"--loop={loops}", "-i", self.sender, str(pcap),
        )  # fmt: skip
        text = out.stdout + out.stderr
        sent = int(re.search(r"Actual: (\d+) packets", text).group(1))  # type: ignore[union-attr]
        rate = float(re.search(r"Rated: [\d.]+ Bps, [\d.]+ Mbps, ([\d.]+) pps", text).group(1))  # type: ignore[union-attr]
        return sent, rate

    def close(self) -> None:
        run("ip", "link", "del", self.capture, check=False)
        run("ip", "netns", "del", self.netns, check=False)


def bench_tcpdump(veth: Veth, pcap: Path, loops: int) -> Result:
    process = subprocess.Popen(
        ["tcpdump", "-i", veth.capture, "-w", "/dev/null", "-B", "65536", "-s", "262144", "-n"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    before = cpu_seconds(process.pid)
    sent, rate = veth.replay(pcap, loops)
    time.sleep(1.0)
    after = cpu_seconds(process.pid)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    captured = int(re.search(r"(\d+) packets captured", err).group(1))  # type: ignore[union-attr]
    dropped = int(re.search(r"(\d+) packets dropped by kernel", err).group(1))  # type: ignore[union-attr]
    return Result("tcpdump", sent, captured, dropped, after[0] - before[0], after[1] - before[1], rate)


def metric(text: str, name: str) -> int:
    return int(sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)))


def profile(directory: Path | None, label: str, pids: dict[str, int]) -> list[subprocess.Popen[bytes]]:
    """`perf record -g` of each process (all its threads) into `directory`, or nothing."""
    if directory is None:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            ["perf", "record", "-g", "-F", "999", "-p", str(pid), "-o", str(directory / f"{label}-{name}.data")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]


def stop_profiles(profiles: list[subprocess.Popen[bytes]]) -> None:
    for process in profiles:
        process.send_signal(signal.SIGINT)
    for process in profiles:
        process.wait(timeout=60)


@dataclass(frozen=True)
class CollectorRun:
    """What one collector run is given: where it captures and publishes, and in which mode."""

    veth: Veth
    pcap: Path
    loops: int
    nats: EmbeddedNats
    workdir: Path
    shards: int
    retention_max_bytes: int
    profile_dir: Path | None = None  # perf profiles of the collector and nats-server over the replay


def bench_collector(run_: CollectorRun, durable: bool, round_number: int = 1) -> Result:
    """One replay captured by the collector; `durable` keeps TRAWL_PACKETS, else it is deleted
    once the collector has created it (the collector ensures it only at start), so the batches
    go through core NATS alone, as before the durable path."""
    nats_url = run_.nats.url
    if run_.nats.process is None:
        raise RuntimeError("the embedded NATS server is not running")
    nats_pid = run_.nats.process.pid
    # A fresh stream for each durable run: its sequence then counts this run's batches from 1.
    delete_packet_stream(nats_url)
    port = free_port()
    config = run_.workdir / "collector.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": "bench",
                "log_level": "warning",
                "http_port": port,
                "nats": {"servers": [nats_url]},
                "packet_retention": {"max_bytes": run_.retention_max_bytes},
                "collector": {
                    "interfaces": [run_.veth.capture],
                    "shards": run_.shards,
                    "ring": {"block_size": 1 << 19, "block_count": 128, "retire_timeout_ms": 50},
                    "batch_max_bytes": 1 << 19,
                },
            }
        )
    )
    process = subprocess.Popen(
        [*COLLECTOR_COMMAND, "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).close()
                break
            except OSError as exc:
                if process.poll() is not None or time.monotonic() > deadline:
                    detail = process.stderr.read() if process.stderr else ""
                    raise RuntimeError(f"the collector did not start: {detail}") from exc
                time.sleep(0.2)
        if packet_stream_state(nats_url) is None:
            raise RuntimeError(f"the collector did not create {STREAM_PACKETS}")
        if not durable:
            delete_packet_stream(nats_url)
        time.sleep(0.5)
        label = f"{run_.pcap.stem}-{'durable' if durable else 'core'}-{round_number}"
        profiles = profile(run_.profile_dir, label, {"collector": process.pid, "nats-server": nats_pid})
        before, nats_before = cpu_seconds(process.pid), cpu_seconds(nats_pid)
        sent, rate = run_.veth.replay(run_.pcap, run_.loops)
        time.sleep(1.0)
        stream = settled_packet_stream(nats_url)
        after, nats_after = cpu_seconds(process.pid), cpu_seconds(nats_pid)
        stop_profiles(profiles)
        text = scrape()
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    if durable:
        delete_packet_stream(nats_url)  # frees its memory before the next run
    elif stream is not None:
        raise RuntimeError(f"{STREAM_PACKETS} came back during the core NATS run")
    return Result(
        "collector durable" if durable else "collector core",
        sent,
        metric(text, "trawl_collector_captured_packets_total"),
        metric(text, "trawl_collector_kernel_drops_total"),
        after[0] - before[0],
        after[1] - before[1],
        rate,
        dropped_packets=metric(text, "trawl_collector_dropped_packets_total"),
        published_batches=metric(text, "trawl_collector_published_batches_total"),
        nats_cpu_s=sum(nats_after) - sum(nats_before),
        stream=stream,
    )


def stream_verdict(result: Result, retention_max_bytes: int) -> str:
    """Did TRAWL_PACKETS hold every batch the collector published in this run?"""
    stream = result.stream
    if stream is None:
        return f"{STREAM_PACKETS} absent during the run (checked at its end)"
    published = result.published_batches
    figures = (
        f"{published} batches published, stream received {stream.last_seq}, holds {stream.messages} "
        f"({stream.bytes / 1e6:.1f} MB, seq {stream.first_seq}-{stream.last_seq})"
    )
    if stream.last_seq != published:
        return f"{figures}: {published - stream.last_seq} batches never reached the stream"
    if stream.messages == published and stream.first_seq == 1:
        return f"{figures}: held every batch"
    removed = stream.first_seq - 1
    # A run is far shorter than max_age (60 s by default): what went, went for max_bytes.
    return (
        f"{figures}: received every batch and keeps the newest; the oldest {removed} went for "
        f"max_bytes={retention_max_bytes}"
    )


def report(size: int, rounds: list[list[Result]], retention_max_bytes: int) -> None:
    """Every run of every round, then the medians over the rounds (the machine is shared, so
    single runs vary; the order of the two collector runs alternates between rounds)."""
    header = (
        "round tool",
        "sent",
        "captured",
        "k.drops",
        "c.drops",
        "CPU s",
        "user+sys",
        "µs/pkt",
        "nats µs/pkt",
        "replay pps",
    )
    row = "  {:<22} {:>9} {:>9} {:>7} {:>7} {:>6} {:>10} {:>7} {:>11} {:>10}"
    lines = [f"\n{size}-byte frames", row.format(*header)]
    for number, results in enumerate(rounds, 1):
        for r in results:
            nats = "-" if r.nats_cpu_s is None else f"{r.nats_us_per_packet:.3f}"
            split = f"{r.cpu_user_s:.2f}+{r.cpu_sys_s:.2f}"
            cells = (
                r.kernel_drops,
                r.dropped_packets,
                f"{r.cpu_s:.2f}",
                split,
                f"{r.cpu_us_per_packet:.3f}",
                nats,
                f"{r.replay_pps:.0f}",
            )
            lines.append(row.format(f"{number} {r.tool}", r.sent, r.captured, *cells))
    for number, results in enumerate(rounds, 1):
        for r in results[1:]:
            lines.append(f"  {number} {r.tool}: {stream_verdict(r, retention_max_bytes)}")

    def median_of(index: int, figure: Callable[[Result], float]) -> float:
        return statistics.median(figure(results[index]) for results in rounds)

    tcpdump_us = median_of(0, lambda r: r.cpu_us_per_packet)
    core_us, durable_us = median_of(1, lambda r: r.cpu_us_per_packet), median_of(2, lambda r: r.cpu_us_per_packet)
    core_nats, durable_nats = median_of(1, lambda r: r.nats_us_per_packet), median_of(2, lambda r: r.nats_us_per_packet)
    lines.append(
        f"  median of {len(rounds)}, µs per packet: tcpdump {tcpdump_us:.3f}; "
        f"collector core {core_us:.3f} + nats-server {core_nats:.3f}; "
        f"collector durable {durable_us:.3f} + nats-server {durable_nats:.3f}"
    )
    ratios = (
        f"; collector / tcpdump: core {core_us / tcpdump_us:.1f}x, durable {durable_us / tcpdump_us:.1f}x"
        if tcpdump_us > 0
        else ""
    )
    lines.append(
        f"  durable - core: collector {durable_us - core_us:+.3f}, nats-server {durable_nats - core_nats:+.3f} µs/pkt"
        + ratios
    )
    lines.append("  (µs/pkt = CPU s per million captured packets; c.drops = packets the collector dropped)")
    print("\n".join(lines))  # noqa: T201 - a benchmark prints its figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packets", type=int, default=1_000_000, help="packets to replay per size (approximately)")
    parser.add_argument("--sizes", default="64,1500", help="frame sizes, comma-separated")
    parser.add_argument("--flows", type=int, default=16)
    parser.add_argument("--shards", type=int, default=1, help="collector shards (fanout sockets)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three runs per size (medians printed)")
    parser.add_argument(
        "--retention-max-bytes",
        type=int,
        default=PacketRetention().max_bytes,
        help="packet_retention.max_bytes of the durable run (default: the production default)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="perf record -g the collector and nats-server over each replay into DIR (to see where the CPU goes; "
        "the sampling costs a little CPU itself, so quote the figures of a run without it)",
    )
    args = parser.parse_args()
    if args.profile is not None and shutil.which("perf") is None:
        print("--profile needs perf (apt-get install linux-perf)", file=sys.stderr)  # noqa: T201
        return 2
    if os.geteuid() != 0 or shutil.which("tcpreplay") is None or shutil.which("tcpdump") is None:
        print("needs root, tcpreplay and tcpdump (apt-get install tcpreplay tcpdump)", file=sys.stderr)  # noqa: T201
        return 2
    with tempfile.TemporaryDirectory(prefix="trawl-bench-") as tmp:
        workdir = Path(tmp)
        veth = Veth()
        try:
            with EmbeddedNats(state_dir=workdir / "nats") as nats:
                for size in (int(s) for s in args.sizes.split(",")):
                    pcap = workdir / f"traffic-{size}.pcap"
                    per_file = write_traffic(pcap, size, args.flows, packets_per_flow=max(2, 20_000 // args.flows))
                    loops = max(1, args.packets // per_file)
                    collector_run = CollectorRun(
                        veth, pcap, loops, nats, workdir, args.shards, args.retention_max_bytes, args.profile
                    )
                    rounds = []
                    for number in range(1, args.rounds + 1):
                        tcpdump = bench_tcpdump(veth, pcap, loops)
                        # Alternate which collector run goes first, so neither always has the
                        # warmer machine (or the other's leftovers).
                        order = (False, True) if number % 2 else (True, False)
                        by_mode = {durable: bench_collector(collector_run, durable, number) for durable in order}
                        rounds.append([tcpdump, by_mode[False], by_mode[True]])
                    report(size, rounds, args.retention_max_bytes)
        finally:
            veth.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
