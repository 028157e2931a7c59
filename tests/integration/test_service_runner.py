"""Every service as its container runs it (`trawl <service> --config FILE`): /healthz,
/readyz and /metrics served, ready announced on the bus, a clean exit 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT
from trawl.bus import Bus
from trawl.config import NatsSettings
from trawl.embedded import free_port


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("service", ["dissector", "enricher", "recorder", "alerter"])
async def test_service_serves_health_and_stops_on_sigterm(service: str, nats_url: str, tmp_path: Path) -> None:
    port = free_port()
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: all\n    condition: 'true'\n")
    config = tmp_path / "trawl.yaml"
    config.write_text(
        f"node: test-node\nhttp_port: {port}\nnats:\n  servers: ['{nats_url}']\n"
        f"recorder:\n  directory: {tmp_path / 'rec'}\nalerter:\n  rules_file: {rules}\n"
    )
    bus = await Bus.connect(NatsSettings(servers=[nats_url]), name="test")
    announced = asyncio.Event()

    async def on_ready(_: object) -> None:
        announced.set()

    await bus.subscribe(f"trawl.v1.control.ready.{service}.test-node", on_ready)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trawl", service, "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.wait_for(announced.wait(), 30)
        for _ in range(100):  # the HTTP endpoint may answer a moment after the announcement
            if get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                break
            await asyncio.sleep(0.1)
        assert get(f"http://127.0.0.1:{port}/readyz") == (200, "ready\n")
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        status, metrics = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert "# TYPE trawl_" in metrics
        process.send_signal(signal.SIGTERM)
        _, stderr_bytes = await asyncio.wait_for(process.communicate(), 20)
        stderr = stderr_bytes.decode()
        assert process.returncode == 0, stderr[-2000:]
        assert '"event": "service_stopped"' in stderr
        assert "Traceback" not in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await bus.close()


async def test_paced_replay_stops_on_sigterm(nats_url: str, tmp_path: Path) -> None:
    """A collector replaying at the capture's own pace (here 1000 times slower) is waiting
    between packets most of the time; SIGTERM must end that wait, not outlast it."""
    config = tmp_path / "trawl.yaml"
    config.write_text(
        f"node: test-node\nnats:\n  servers: ['{nats_url}']\n"
        f"collector:\n  pcap: {ROOT / 'tests' / 'fixtures' / 'http1.pcap'}\n  replay_speed: 0.001\n"
    )
    bus = await Bus.connect(NatsSettings(servers=[nats_url]), name="test")
    announced = asyncio.Event()

    async def on_ready(_: object) -> None:
        announced.set()

    await bus.subscribe("trawl.v1.control.ready.collector.test-node", on_ready)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trawl", "collector", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.wait_for(announced.wait(), 30)
        await asyncio.sleep(1.0)  # into the replay's waits
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)
        assert process.returncode == 0, stderr.decode()[-2000:]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await bus.close()
