"""IP fragment floods against ordinary packets: per-packet cost through the dissector, and tshark
on the same files, in the same run.

    python bench/fragments.py [--flood 100000] [--pieces 20000] [--ordinary 100000] [--keep DIR]

Generates four captures (Ethernet, IPv4):

1. `first-fragments`: first fragments (MF set, offset 0, 40 bytes) of `--flood` distinct
   datagrams that never complete, the flood of issue #8 (about 33 s before the reassembler kept
   its datagrams oldest-first: a table scan per packet once `max_ip_fragments` was reached);
2. `one-datagram`: one datagram's last piece, then `--pieces` 8-byte pieces at distinct offsets
   that never fill it (about 8 s at 20,000 before, every piece re-sorting the datagram's list);
3. `udp-twin`: the same datagrams as (1), unfragmented: what ordinary packets of that size cost;
4. `http-mix`: bench/dissect.py's HTTP/1.1 keep-alive and DNS mix, `--ordinary` packets.

Each is timed through `Dissector.feed` over pre-read PacketBatches of 1000 records (compiled lane
on, as deployed, and for the mix also off: fragments take the Python path either way), best of
`--repeat` runs, and through `tshark -n -r FILE -T fields -e frame.number -e ip.id -e
ip.frag_offset` (tshark reassembles IPv4 fragments by default; its time includes its start-up).
Times are CPU seconds (the process's own, tshark's as a child's), so that other work on a shared
machine does not count. It prints µs per packet, and each flood against its ordinary twins.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import dpkt

from trawl.collector.replay import CaptureFile
from trawl.dissector.config import DissectorSettings
from trawl.dissector.engine import Dissector
from trawl.pcap import LINKTYPE_ETHERNET, global_header, pack_record
from trawl.v1.packets_pb2 import PacketBatch

ETH_HEADER = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
SERVER = bytes((192, 0, 2, 200))
T0 = 1_700_000_000_000_000_000
BATCH_PACKETS = 1000


def say(text: str = "") -> None:
    """A benchmark prints its figures (stdout); tools and services log instead."""
    sys.stdout.write(text + "\n")


def _bench_dissect() -> ModuleType:
    """bench/dissect.py (not a package): its HTTP/DNS capture generator is the ordinary traffic."""
    spec = importlib.util.spec_from_file_location("bench_dissect", Path(__file__).with_name("dissect.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ipv4(src: bytes, ident: int, offset: int, more: bool, payload: bytes) -> bytes:
    """An Ethernet frame of one IPv4 packet (a fragment when `more` or `offset`), checksummed."""
    packet = dpkt.ip.IP(src=src, dst=SERVER, p=17, id=ident, ttl=64, data=payload)
    packet._flags_offset = (offset // 8) | (dpkt.ip.IP_MF if more else 0)
    packet.len = 20 + len(payload)
    return ETH_HEADER + bytes(packet)


def udp(sport: int, payload: bytes) -> bytes:
    return bytes(dpkt.udp.UDP(sport=sport, dport=9, ulen=8 + len(payload) + 960, data=payload))


def write(path: Path, frames: Iterable[bytes]) -> int:
    count = 0
    with path.open("wb") as handle:
        handle.write(global_header(LINKTYPE_ETHERNET, nanosecond=True))
        for count, frame in enumerate(frames, start=1):
            handle.write(pack_record(T0 + count * 1000, frame))
    return count


def first_fragments(count: int) -> Iterable[bytes]:
    for number in range(count):
        src = bytes((10, 1, number >> 16, 0))
        # The first 40 bytes of a 1,000-byte UDP datagram (the UDP length says so).
        yield ipv4(src, number & 0xFFFF, 0, True, udp(40000 + number % 20000, b"f" * 32))


def udp_twins(count: int) -> Iterable[bytes]:
    """The flood's datagrams, whole and unfragmented (40 bytes of IP payload each)."""
    for number in range(count):
        src = bytes((10, 1, number >> 16, 0))
        payload = bytes(dpkt.udp.UDP(sport=40000 + number % 20000, dport=9, ulen=40, data=b"f" * 32))
        yield ipv4(src, number & 0xFFFF, 0, False, payload)


def one_datagram(pieces: int) -> Iterable[bytes]:
    src = bytes((10, 2, 0, 1))
    yield ipv4(src, 4242, 65512, False, b"L" * 16)
    for number in range(pieces):
        # Every other 8-byte slot below 64 KiB: the datagram never fills.
        yield ipv4(src, 4242, 16 * (number % 4000), True, b"p" * 8)


def read(path: Path) -> tuple[list[PacketBatch], int]:
    messages = []
    packets = 0
    for sequence, records in enumerate(CaptureFile(path).batches(BATCH_PACKETS, 1 << 30), start=1):
        messages.append(records.message(node="bench", shard=0, sequence=sequence, source="bench"))
        packets += records.packet_count
    return messages, packets


def dissect(batches: list[PacketBatch], repeat: int, express: bool = True) -> tuple[float, dict[str, int]]:
    """Best CPU time of `repeat` runs through a fresh Dissector each, and the last run's counters."""
    best = float("inf")
    counters: dict[str, int] = {}
    for _ in range(repeat):
        dissector = Dissector(DissectorSettings.load(None, node="bench", express=express), "bench")
        started = time.process_time()
        for packet_batch in batches:
            dissector.feed(packet_batch)
        dissector.finish()
        best = min(best, time.process_time() - started)
        counters = dissector.counters
    return best, counters


def tshark(path: Path) -> float | None:
    if shutil.which("tshark") is None:
        return None
    command = ["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "frame.number", "-e", "ip.id"]
    command += ["-e", "ip.frag_offset"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if result.returncode != 0:
        say(f"  tshark failed on {path.name}: {result.stderr.decode(errors='replace')[-300:]}")
        return None
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, default=100_000, help="distinct datagrams in the first-fragment flood")
    parser.add_argument("--pieces", type=int, default=20_000, help="pieces fed to the one datagram")
    parser.add_argument("--ordinary", type=int, default=100_000, help="packets of the HTTP/DNS mix")
    parser.add_argument("--repeat", type=int, default=3, help="dissector runs per capture (the best counts)")
    parser.add_argument("--keep", type=Path, help="write the captures to this directory (and keep them)")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="trawl-bench-fragments-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        paths = {
            "first-fragments": workdir / "first-fragments.pcap",
            "one-datagram": workdir / "one-datagram.pcap",
            "udp-twin": workdir / "udp-twin.pcap",
            "http-mix": workdir / "http-mix.pcap",
        }
        write(paths["first-fragments"], first_fragments(args.flood))
        write(paths["one-datagram"], one_datagram(args.pieces))
        write(paths["udp-twin"], udp_twins(args.flood))
        _bench_dissect().generate(paths["http-mix"], args.ordinary)
        say(f"captures in {workdir}, made in {time.perf_counter() - started:.1f} s")
        figures: dict[str, tuple[int, float, float | None]] = {}
        for name, path in paths.items():
            batches, packets = read(path)
            seconds, counters = dissect(batches, args.repeat)
            figures[name] = (packets, seconds, tshark(path))
            fragment_counts = {key: value for key, value in counters.items() if key.startswith("ip_")}
            say(f"{name}: {packets} packets; {fragment_counts or 'no fragments'}")
            if name == "http-mix":
                # Fragments take the Python path whatever the lane does: the mix through it alone is their peer too.
                python_seconds, _ = dissect(batches, args.repeat, express=False)
                figures["http-mix, Python path"] = (packets, python_seconds, figures[name][2])
        say()
        columns = ("packets", "trawl s", "us/packet", "tshark s", "us/packet", "vs tshark")
        say(f"{'capture (CPU seconds)':22} " + " ".join(f"{column:>10}" for column in columns))
        for name, (packets, seconds, tshark_seconds) in figures.items():
            ours = f"{packets:10} {seconds:10.3f} {seconds / packets * 1e6:10.2f}"
            if tshark_seconds:
                theirs = (
                    f"{tshark_seconds:10.3f} {tshark_seconds / packets * 1e6:10.2f} {tshark_seconds / seconds:9.1f}x"
                )
            else:
                theirs = f"{'-':>10} {'-':>10} {'-':>10}"
            say(f"{name:22} {ours} {theirs}")
        say()
        twin = figures["udp-twin"][1] / figures["udp-twin"][0]
        mix = figures["http-mix"][1] / figures["http-mix"][0]
        python_mix = figures["http-mix, Python path"][1] / figures["http-mix, Python path"][0]
        for flood in ("first-fragments", "one-datagram"):
            per_packet = figures[flood][1] / figures[flood][0]
            say(
                f"{flood}: {per_packet / twin:.2f}x the per-packet cost of its unfragmented twin, "
                f"{per_packet / python_mix:.2f}x the HTTP/DNS mix's on the Python path "
                f"({per_packet / mix:.2f}x the mix's with the compiled lane)"
            )
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
