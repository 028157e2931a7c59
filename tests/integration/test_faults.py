"""Faults injected mid-stream, the way an operator would meet them: a nats-server of the test's
own, the five services started one by one as separate processes (`python -m trawl <service>
--config FILE`, what a container runs), a generated capture of HTTP/1.1 keep-alive calls
replayed in real time by the collector, and one process killed with SIGKILL partway through
and started again.

Checked, per fault: the calls stored on `trawl.v1.enriched.>` (read back from TRAWL_ENRICHED)
equal `trawl analyze` of the same file, exactly once each (ids included); the recordings hold
every packet of the input exactly once (dpkt and tshark agree); the alerts stored equal the
alerts the rule must raise, once each; and when a fault outlasts the packet window, the
resuming service's counters and log line say exactly how many batches and packets are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import dpkt
import pytest
from nats.aio.msg import Msg

from tests.conftest import ROOT, needs_binary
from tests.unit.dissector_builders import ethernet, ip_packet, tcp_segment
from trawl.bus import STREAM_ALERTS, STREAM_ENRICHED, Bus
from trawl.collector.replay import CaptureFile
from trawl.config import NatsSettings
from trawl.embedded import EmbeddedNats
from trawl.v1.alerts_pb2 import Alert
from trawl.v1.calls_pb2 import ApiCall

NODE = "fault-node"
PACKET_GAP_S = 0.0025  # packet time between frames: 2,400 frames last 6 s
BATCH_PACKETS = 16
CALLS = 800
PER_CONNECTION = 20
FRAMES_PER_CONNECTION = 3 + 3 * PER_CONNECTION + 3  # handshake, exchanges, close
ERROR_EVERY = 10  # every tenth response is a 503 (what the alert rule fires on)
RULES = """rules:
  - name: unavailable
    condition: 'call.protocol == "http" && call.status == "503"'
    severity: critical
    summary: '{call.path} answered 503'
"""


def write_capture(path: Path, calls: int = CALLS, per_connection: int = PER_CONNECTION) -> None:
    """Keep-alive connections of `per_connection` exchanges, one after the other; each exchange is
    a request, its response and an ACK (3 frames), so exchanges straddle batch boundaries."""
    ts = 1_700_000_000.0
    with path.open("wb") as handle:
        writer = dpkt.pcap.Writer(handle, linktype=1)

        def emit(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: str, data: bytes = b"") -> None:
            nonlocal ts
            frame = ethernet(ip_packet(src, dst, 6, tcp_segment(src, dst, sport, dport, seq, ack, flags, data)))
            writer.writepkt(frame, ts=ts)
            ts += PACKET_GAP_S

        for connection in range(calls // per_connection):
            client, server, port = f"10.1.0.{1 + connection % 200}", "10.2.0.1", 30000 + connection
            cseq, sseq = 1000, 500000
            emit(client, server, port, 8080, cseq, 0, "S")
            emit(server, client, 8080, port, sseq, cseq + 1, "SA")
            cseq, sseq = cseq + 1, sseq + 1
            emit(client, server, port, 8080, cseq, sseq, "A")
            for index in range(per_connection):
                number = connection * per_connection + index
                status = b"503 Service Unavailable" if number % ERROR_EVERY == 0 else b"200 OK"
                request = b"GET /orders/%d HTTP/1.1\r\nHost: orders\r\n\r\n" % number
                response = b"HTTP/1.1 %s\r\nContent-Length: 2\r\n\r\nok" % status
                emit(client, server, port, 8080, cseq, sseq, "PA", request)
                cseq += len(request)
                emit(server, client, 8080, port, sseq, cseq, "PA", response)
                sseq += len(response)
                emit(client, server, port, 8080, cseq, sseq, "A")
            emit(client, server, port, 8080, cseq, sseq, "FA")
            emit(server, client, 8080, port, sseq, cseq + 1, "FA")
            emit(client, server, port, 8080, cseq + 1, sseq + 1, "A")


def analyze_ids(capture: Path) -> list[str]:
    """The call ids `trawl analyze` gives for the file, stamped with the suite's node."""
    out = subprocess.run(
        [sys.executable, "-m", "trawl", "analyze", str(capture), "--json", "--node", NODE],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    return [json.loads(line)["id"] for line in out.splitlines()]


class Suite:
    """The five services as processes sharing one config file, each started and killed at will."""

    def __init__(self, directory: Path, nats_url: str, capture: Path, **sections: dict[str, Any]) -> None:
        self.directory = directory
        self.nats_url = nats_url
        self.capture = capture
        self.recordings = directory / "recordings"
        rules = directory / "rules.yaml"
        rules.write_text(RULES)
        document: dict[str, Any] = {
            "node": NODE,
            "log_format": "json",
            "nats": {"servers": [nats_url], "connect_attempts": 10},
            "collector": {"pcap": str(capture), "replay_speed": 1.0, "batch_max_packets": BATCH_PACKETS},
            "dissector": {"shards": 1, "shard_lease_ttl_s": 1.5, "calls_per_batch": 50, "batch_age_ms": 100},
            "enricher": {},
            "recorder": {"directory": str(self.recordings), "rotate_seconds": 2.0},
            "alerter": {"rules_file": str(rules)},
        }
        for name, section in sections.items():
            document.setdefault(name, {}).update(section)
        self.config = directory / "trawl.yaml"
        self.config.write_text(json.dumps(document))  # JSON is YAML
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.lives: Counter[str] = Counter()

    def log_path(self, service: str, life: int) -> Path:
        return self.directory / f"{service}-{life}.log"

    def start(self, service: str, **env: str) -> None:
        self.lives[service] += 1
        log = self.log_path(service, self.lives[service]).open("wb")
        self.processes[service] = subprocess.Popen(
            [sys.executable, "-m", "trawl", service, "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **env},
        )  # fmt: skip

    def kill(self, service: str) -> None:
        process = self.processes.pop(service)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def events(self, service: str, event: str) -> list[dict[str, Any]]:
        """The structured log events of that name from every life of the service."""
        found = []
        for life in range(1, self.lives[service] + 1):
            for line in self.log_path(service, life).read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == event:
                        found.append(record)
        return found

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Probe:
    """The test's own NATS client: who is ready, who drained, what the streams hold."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.ready: Counter[str] = Counter()
        self.drained: Counter[str] = Counter()

    @classmethod
    async def connect(cls, url: str) -> Probe:
        probe = cls(await Bus.connect(NatsSettings(servers=[url]), "fault-probe"))

        async def on_ready(msg: Msg) -> None:
            probe.ready[msg.subject.split(".")[4]] += 1

        async def on_drained(msg: Msg) -> None:
            probe.drained[msg.subject.split(".")[4]] += 1

        await probe.bus.nc.subscribe("trawl.v1.control.ready.>", cb=on_ready)
        await probe.bus.nc.subscribe("trawl.v1.control.drained.>", cb=on_drained)
        await probe.bus.nc.flush()
        return probe

    async def until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def stream_count(self, stream: str) -> int:
        try:
            return int((await self.bus.js.stream_info(stream)).state.messages)
        except Exception:  # not created yet, or the server is restarting
            return 0

    async def until_count(self, stream: str, at_least: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while await self.stream_count(stream) < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"{stream} did not reach {at_least} messages")
            await asyncio.sleep(0.05)

    async def settled(self, stream: str, quiet_s: float = 2.0, timeout_s: float = 60.0) -> int:
        """The stream's message count once it stopped growing for `quiet_s`."""
        deadline = time.monotonic() + timeout_s
        count, since = await self.stream_count(stream), time.monotonic()
        while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            now = await self.stream_count(stream)
            if now != count:
                count, since = now, time.monotonic()
        return count

    async def read_all(self, stream: str) -> list[bytes]:
        """Every message the stream stores, in order (an ephemeral ordered consumer)."""
        total = await self.stream_count(stream)
        subscription = await self.bus.js.subscribe(f"trawl.v1.{stream.split('_')[1].lower()}.>", ordered_consumer=True)
        payloads: list[bytes] = []
        try:
            while len(payloads) < total:
                payloads.append((await subscription.next_msg(timeout=10)).data)
        finally:
            await subscription.unsubscribe()
        return payloads


@pytest.fixture
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("capture") / "calls.pcap"
    write_capture(path)
    return path


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    with EmbeddedNats(state_dir=tmp_path / "nats") as nats:
        yield nats


@contextlib.asynccontextmanager
async def running(suite: Suite, services: list[str]) -> AsyncIterator[Probe]:
    """The services started in order (each ready before the next), the collector last; all
    stopped at the end, whatever happened."""
    probe = await Probe.connect(suite.nats_url)
    try:
        for service in services:
            suite.start(service)
            await probe.until(lambda s=service: probe.ready[s] >= suite.lives[s], 30, f"{service} ready")  # type: ignore[misc]
        suite.start("collector")
        yield probe
    finally:
        suite.stop_all()
        await probe.bus.close()


async def enriched_ids(probe: Probe, expected: int) -> list[str]:
    await probe.until(lambda: probe.drained["enricher"] >= 1, 90, "the enricher to drain")
    await probe.settled(STREAM_ENRICHED)
    return [ApiCall.FromString(data).id for data in await probe.read_all(STREAM_ENRICHED)][: expected + 1000]


def assert_exactly_once(got: list[str], expected: list[str]) -> None:
    duplicates = [key for key, count in Counter(got).items() if count > 1]
    assert not duplicates, f"{len(duplicates)} calls stored more than once"
    missing = set(expected) - set(got)
    extra = set(got) - set(expected)
    assert not missing, f"{len(missing)} of {len(expected)} calls missing"
    assert not extra, f"{len(extra)} calls that trawl analyze does not give"
    assert len(got) == len(expected)


async def test_dissector_sigkill_mid_replay_loses_and_splits_nothing(
    server: EmbeddedNats, tmp_path: Path, capture: Path
) -> None:
    """The lease holder is killed with SIGKILL a third of the way in; a new replica takes the shard
    when the lease expires, replays the window before the checkpoint to rebuild the flows, and
    publishes the rest: every call once, whole (no `no_response` plus response-only pair)."""
    expected = analyze_ids(capture)
    suite = Suite(tmp_path, server.url, capture)
    async with running(suite, ["enricher", "dissector"]) as probe:
        await probe.until_count(STREAM_ENRICHED, len(expected) // 3, 60)
        suite.kill("dissector")
        suite.start("dissector", TRAWL_DISSECTOR_REPLICA_ID=f"second-{uuid.uuid4().hex[:6]}")
        got = await enriched_ids(probe, len(expected))
        assert_exactly_once(got, expected)
        assert not suite.events("dissector", "packet_batches_lost")
        resumed = suite.events("dissector", "packets_resumed")
        assert len(resumed) == 2 and resumed[1]["checkpoint"] > 0


async def test_dissector_outage_beyond_the_window_is_counted_exactly(
    server: EmbeddedNats, tmp_path: Path, capture: Path
) -> None:
    """The window is 1 s and the dissector stays dead for 4 s: the batches that aged out unread
    are counted in batches and in packets, exactly (the file's own batches say how many packets
    each held), and nothing else is lost or doubled."""
    expected = analyze_ids(capture)
    # Half speed (12 s): the end of the input comes well after the replacement started reading.
    suite = Suite(tmp_path, server.url, capture, packet_retention={"max_age_s": 1.0}, collector={"replay_speed": 0.5})
    async with running(suite, ["enricher", "dissector"]) as probe:
        await probe.until_count(STREAM_ENRICHED, len(expected) // 6, 60)
        suite.kill("dissector")
        await asyncio.sleep(4.0)
        suite.start("dissector", TRAWL_DISSECTOR_REPLICA_ID=f"late-{uuid.uuid4().hex[:6]}")
        got = await enriched_ids(probe, len(expected))
        lost = suite.events("dissector", "packet_batches_lost")
        assert len(lost) == 1, lost
        first_lost = lost[0]["after_sequence"] + 1
        batches = list(CaptureFile(capture).batches(BATCH_PACKETS, 1 << 20))
        packets_in_lost = sum(
            b.packet_count for b in batches[first_lost - 1 : first_lost - 1 + lost[0]["lost_batches"]]
        )
        assert lost[0]["lost_batches"] >= 0.5 * 4 / (BATCH_PACKETS * PACKET_GAP_S) / 2  # most of 4 s of batches
        assert lost[0]["lost_packets"] == packets_in_lost
        assert not [key for key, count in Counter(got).items() if count > 1]
        # The connection in progress when packets come again is seen from the middle: its later
        # calls count from 0 again (another id than analyze's), at most a connection's worth;
        # every other call is analyze's, except those whose frames were in the lost batches.
        missing, extra = set(expected) - set(got), set(got) - set(expected)
        assert len(extra) <= PER_CONNECTION
        in_lost_packets = lost[0]["lost_packets"] * PER_CONNECTION / FRAMES_PER_CONNECTION
        assert abs(len(missing) - len(extra) - in_lost_packets) <= 4, (len(missing), len(extra), in_lost_packets)


async def test_enricher_sigkill_mid_replay_stores_every_call_once(
    server: EmbeddedNats, tmp_path: Path, capture: Path
) -> None:
    expected = analyze_ids(capture)
    suite = Suite(tmp_path, server.url, capture)
    async with running(suite, ["enricher", "dissector"]) as probe:
        await probe.until_count(STREAM_ENRICHED, len(expected) // 3, 60)
        suite.kill("enricher")
        suite.start("enricher")
        assert_exactly_once(await enriched_ids(probe, len(expected)), expected)


async def test_alerter_sigkill_mid_replay_stores_every_alert_once(
    server: EmbeddedNats, tmp_path: Path, capture: Path
) -> None:
    """One alert per 503 (no cooldown, one group per call path): after a SIGKILL and a restart,
    TRAWL_ALERTS holds each exactly once, and the second life evaluates no call twice."""
    suite = Suite(tmp_path, server.url, capture)
    async with running(suite, ["alerter", "enricher", "dissector"]) as probe:
        await probe.until_count(STREAM_ALERTS, CALLS // ERROR_EVERY // 3, 60)
        suite.kill("alerter")
        suite.start("alerter")
        await probe.until(lambda: probe.drained["alerter"] >= 1, 90, "the alerter to drain")
        await probe.settled(STREAM_ALERTS)
        alerts = [Alert.FromString(data) for data in await probe.read_all(STREAM_ALERTS)]
        assert len(alerts) == CALLS // ERROR_EVERY
        assert len({alert.id for alert in alerts}) == len(alerts)
        assert {alert.summary for alert in alerts} == {
            f"/orders/{n} answered 503" for n in range(0, CALLS, ERROR_EVERY)
        }


def tshark_count(path: Path) -> int:
    numbers = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.number"], capture_output=True, text=True, check=True
    ).stdout.split()
    return len(numbers)


def manifest_verifies(directory: Path) -> bool:
    return subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=directory, capture_output=True).returncode == 0


def _packets(path: Path) -> list[tuple[float, bytes]]:
    with path.open("rb") as handle:
        return [(round(ts, 6), bytes(data)) for ts, data in dpkt.pcap.Reader(handle)]


@needs_binary("tshark")
async def test_recorder_sigkill_mid_replay_records_every_packet_once(
    server: EmbeddedNats, tmp_path: Path, capture: Path
) -> None:
    """The recorder is killed with SIGKILL mid-replay and started again: its partial file is cut
    back to the last checkpoint and sealed, the batches after it are read again from the stream,
    and the sealed files, in name order, hold the input's packets exactly (dpkt), as many as
    tshark counts; the file sequence goes on after the files already there."""
    suite = Suite(tmp_path, server.url, capture)
    async with running(suite, ["recorder"]) as probe:
        await asyncio.sleep(3.0)  # half-way through the 6 s replay
        suite.kill("recorder")
        suite.start("recorder")
        await probe.until(lambda: probe.drained["recorder"] >= 1, 90, "the recorder to drain")
        files = sorted(suite.recordings.glob("*.pcap"))
        assert len(files) >= 2
        sequences = [int(path.stem.split("-")[-1]) for path in files]
        assert len(set(sequences)) == len(sequences)
        recorded = [packet for path in files for packet in _packets(path)]
        assert recorded == _packets(capture)
        counted = sum(tshark_count(path) for path in files)
        assert counted == len(recorded)
        assert not suite.events("recorder", "packet_batches_lost")
        assert manifest_verifies(suite.recordings)


async def test_nats_sigkill_and_restart_mid_replay_loses_nothing_uncounted(tmp_path: Path, capture: Path) -> None:
    """nats-server itself is killed with SIGKILL mid-replay and started again on the same port and
    store (file-backed streams and KV survive it; the in-memory packet window does not). Every
    service reconnects; the calls stored equal analyze's, once each, except what the dissector
    counts as lost (in batches and packets), and the recordings miss exactly what the recorder
    counts."""
    expected = analyze_ids(capture)
    server = EmbeddedNats(state_dir=tmp_path / "nats").start()
    suite = Suite(tmp_path, server.url, capture)
    try:
        async with running(suite, ["recorder", "alerter", "enricher", "dissector"]) as probe:
            await probe.until_count(STREAM_ENRICHED, len(expected) // 3, 60)
            assert server.process is not None
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(10)
            await asyncio.sleep(1.0)
            server.start()
            got = await enriched_ids(probe, len(expected))
            assert not [key for key, count in Counter(got).items() if count > 1]
            lost = suite.events("dissector", "packet_batches_lost")
            if not lost:  # the readers had read the window when the server died: nothing to lose
                assert_exactly_once(got, expected)
            lost_packets = sum(event["lost_packets"] for event in lost)
            missing, extra = set(expected) - set(got), set(got) - set(expected)
            in_lost_packets = lost_packets * PER_CONNECTION / FRAMES_PER_CONNECTION
            assert abs(len(missing) - len(extra) - in_lost_packets) <= 4 * len(lost), (len(missing), lost)
            await probe.until(lambda: probe.drained["recorder"] >= 1, 90, "the recorder to drain")
            recorded = [packet for path in sorted(suite.recordings.glob("*.pcap")) for packet in _packets(path)]
            recorder_lost = sum(event["lost_packets"] for event in suite.events("recorder", "packet_batches_lost"))
            assert len(set(recorded)) == len(recorded)
            assert len(recorded) + recorder_lost == len(_packets(capture))
    finally:
        server.stop()
