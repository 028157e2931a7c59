"""The packet window (stream TRAWL_PACKETS) against a real nats-server: a window larger than the
server's JetStream memory stops every service that makes it at start with one line naming the
key to change (exit 2), instead of running with no window; a reader of the window stops at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trawl.bus import Bus
from trawl.config import NatsSettings, PacketRetention
from trawl.embedded import EmbeddedNats
from trawl.packet_stream import STOP_TIMEOUT_S, PacketReader


@pytest.fixture
def small_nats(tmp_path: Path) -> Iterator[str]:
    """A nats-server with 1 MB of JetStream memory."""
    config = tmp_path / "nats.conf"
    config.write_text("jetstream {\n  max_memory_store: 1MB\n}\n")
    with EmbeddedNats(state_dir=tmp_path / "nats", extra_args=["-c", str(config)]) as server:
        yield server.url


@pytest.mark.parametrize("service", ["dissector", "recorder"])
def test_a_window_larger_than_the_servers_memory_is_one_line_and_exit_2(
    small_nats: str, tmp_path: Path, service: str
) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text(
        f"nats:\n  servers: ['{small_nats}']\npacket_retention:\n  max_bytes: 1073741824\n"
        f"recorder:\n  directory: {tmp_path / 'recordings'}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "trawl", service, "--config", str(config)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"trawl {service}:")]
    assert len(errors) == 1, result.stderr
    assert "NATS refused the packet stream TRAWL_PACKETS" in errors[0]
    assert "lower packet_retention.max_bytes (1073741824) below the server's JetStream max_memory_store" in errors[0]
    assert "Traceback" not in result.stderr


def test_a_window_that_fits_starts(small_nats: str, tmp_path: Path) -> None:
    """The same server takes a window within its memory: the service gets ready (and is stopped)."""
    config = tmp_path / "trawl.yaml"
    config.write_text(f"nats:\n  servers: ['{small_nats}']\npacket_retention:\n  max_bytes: 524288\n")
    log = tmp_path / "dissector.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "trawl", "dissector", "--config", str(config)], stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while "service_ready" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0, log.read_text()
    assert "NATS refused" not in log.read_text()


async def test_a_reader_stops_at_once_even_with_its_connection_closed(nats_url: str) -> None:
    """nats-py turns the cancel of a fetch into ConnectionClosedError once the connection is
    closed; the reader's loop must still end (a dissector stuck here never exits on SIGTERM)."""
    bus = await Bus.connect(NatsSettings(servers=[nats_url]), "reader-test")
    retention = PacketRetention(max_bytes=1 << 20)
    await bus.ensure_packet_stream(retention)
    handled: list[int] = []

    async def handle(data: bytes, stream_seq: int, stored_ns: int) -> None:
        handled.append(stream_seq)

    reader = PacketReader(
        bus.js, "reader-test", "trawl.v1.packets.reader-test.>", handle, lambda: bus.ensure_packet_stream(retention)
    )
    await reader.start()
    await bus.nc.publish("trawl.v1.packets.reader-test.0", b"one")
    deadline = time.monotonic() + 10
    while not handled:
        assert time.monotonic() < deadline, "the reader read nothing"
        await asyncio.sleep(0.05)
    await bus.nc.close()
    started = time.monotonic()
    await reader.stop()
    assert time.monotonic() - started < STOP_TIMEOUT_S
    assert handled == [1]
