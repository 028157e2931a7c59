"""Capture speed: tcpdump -w /dev/null versus Trawl's collector publishing to NATS.

    sudo .venv/bin/python bench/capture.py [--packets 1000000] [--sizes 64,1500] [--flows 16]

For each frame size, a pcap of `--flows` TCP flows is written, then replayed with
`tcpreplay --topspeed` from a network namespace into a veth pair whose other end is on the
host, where the capture tool listens. The frames carry a destination MAC that is not the
veth's, so the host stack ignores them (only packet sockets see them). Each tool runs alone
over the same replay, one after the other:

- tcpdump -w /dev/null (its own "captured" and "dropped by kernel" report);
- the collector service (`python -m trawl collector`, live on the veth) publishing batches
  to an embedded NATS, its figures read from its /metrics.

CPU is the capture process's own user+system time (from /proc/<pid>/stat) between the start
and the end of the replay; the kernel's copy into the ring is not in it, for either tool.
Prints, per size: packets sent, captured, kernel drops, CPU seconds (and its user+system
split), CPU seconds per million packets captured, and the collector/tcpdump ratio. Needs
root and tcpreplay (apt-get install tcpreplay).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import dpkt
import yaml

from trawl.embedded import EmbeddedNats, free_port

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
COLLECTOR_COMMAND = [sys.executable, "-m", "trawl", "collector"]
STRANGER_MAC = b"\x02\x00\x00\x00\x99\x99"  # not the veth's: the host stack drops the frames as "other host"


@dataclass
class Result:
    tool: str
    sent: int
    captured: int
    kernel_drops: int
    cpu_user_s: float
    cpu_sys_s: float
    replay_pps: float

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_sys_s

    @property
    def cpu_us_per_packet(self) -> float:
        return self.cpu_s / self.captured * 1e6 if self.captured else float("nan")


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


def bench_collector(veth: Veth, pcap: Path, loops: int, nats_url: str, workdir: Path, shards: int) -> Result:
    port = free_port()
    config = workdir / "collector.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": "bench",
                "log_level": "warning",
                "http_port": port,
                "nats": {"servers": [nats_url]},
                "collector": {
                    "interfaces": [veth.capture],
                    "shards": shards,
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
    time.sleep(0.5)
    before = cpu_seconds(process.pid)
    sent, rate = veth.replay(pcap, loops)
    time.sleep(1.0)
    after = cpu_seconds(process.pid)
    text = scrape()
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)
    return Result(
        "trawl collector",
        sent,
        metric(text, "trawl_collector_captured_packets_total"),
        metric(text, "trawl_collector_kernel_drops_total"),
        after[0] - before[0],
        after[1] - before[1],
        rate,
    )


def report(size: int, results: list[Result]) -> None:
    header = ("tool", "sent", "captured", "k.drops", "CPU s", "user+sys", "CPU s/Mpkt", "replay pps")
    lines = [f"\n{size}-byte frames", "  {:<16} {:>10} {:>10} {:>8} {:>7} {:>11} {:>10} {:>11}".format(*header)]
    for r in results:
        split = f"{r.cpu_user_s:.2f}+{r.cpu_sys_s:.2f}"
        lines.append(
            f"  {r.tool:<16} {r.sent:>10} {r.captured:>10} {r.kernel_drops:>8} {r.cpu_s:>7.2f} {split:>11} "
            f"{r.cpu_us_per_packet:>10.3f} {r.replay_pps:>11.0f}"
        )
    tcpdump, trawl = results
    if tcpdump.cpu_us_per_packet > 0:
        ratio = trawl.cpu_us_per_packet / tcpdump.cpu_us_per_packet
        lines.append(f"  collector / tcpdump CPU per packet: {ratio:.1f}x (CPU s/Mpkt = microseconds per packet)")
    print("\n".join(lines))  # noqa: T201 - a benchmark prints its figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packets", type=int, default=1_000_000, help="packets to replay per size (approximately)")
    parser.add_argument("--sizes", default="64,1500", help="frame sizes, comma-separated")
    parser.add_argument("--flows", type=int, default=16)
    parser.add_argument("--shards", type=int, default=1, help="collector shards (fanout sockets)")
    args = parser.parse_args()
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
                    results = [
                        bench_tcpdump(veth, pcap, loops),
                        bench_collector(veth, pcap, loops, nats.url, workdir, args.shards),
                    ]
                    report(size, results)
        finally:
            veth.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
