"""A capture replayed by the real collector into a real nats-server, read by the real recorder
(both as `python -m trawl <service>` processes); `trawl record start --filter udp` afterwards
records the look-back: every UDP packet of the capture's last 30 s, and none before. The expected
packets come from tcpdump reading the capture with the same filter; the recording is read back
with dpkt and tshark."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import dpkt
import nats

from tests.conftest import ROOT, needs_binary
from tests.integration.test_recorder_recordings import json_line, run_cli
from tests.unit.test_recorder_recordings import read_back, tshark_fields
from trawl.bus import control_subject

CAPTURE = "sll/PcapPlusPlus__sll.pcap"  # 518 packets over 51 s, Linux cooked (SLL)
NODE = "replay-node"


def expected_udp(capture: Path, work: Path, lookback_s: int) -> list[tuple[int, bytes]]:
    """(µs, frame) of the capture's UDP packets no older than lookback_s before its last packet."""
    with open(capture, "rb") as handle:
        last = max(round(ts * 1e6) for ts, _ in dpkt.pcap.Reader(handle))
    filtered = work / "expected.pcap"
    subprocess.run(["tcpdump", "-r", str(capture), "-w", str(filtered), "udp"], check=True, capture_output=True)
    return [(ts, frame) for ts, frame in read_back(filtered) if ts >= last - lookback_s * 1_000_000]


@needs_binary("tshark")
@needs_binary("tcpdump")
async def test_record_after_a_replay_holds_the_last_30_s_in_scope(
    nats_url: str, tmp_path: Path, shared_pcaps: Path
) -> None:
    capture = shared_pcaps / CAPTURE
    config = tmp_path / "trawl.yaml"
    config.write_text(
        json.dumps(
            {
                "node": NODE,
                "nats": {"servers": [nats_url]},
                "collector": {"pcap": str(capture), "replay_speed": 0},
                "recorder": {"directory": str(tmp_path / "rec"), "lookback_s": 30},
            }
        )
    )
    client = await nats.connect(nats_url)
    ready = await client.subscribe(control_subject("ready", "recorder", NODE))
    drained = await client.subscribe(control_subject("drained", "recorder", NODE))
    processes: list[asyncio.subprocess.Process] = []
    try:
        for service in ("recorder", "collector"):
            with (tmp_path / f"{service}.log").open("wb") as log:
                processes.append(
                    await asyncio.create_subprocess_exec(
                        *(sys.executable, "-m", "trawl", service, "--config", str(config)),
                        stdout=log,
                        stderr=asyncio.subprocess.STDOUT,
                        cwd=ROOT,
                    )
                )
            if service == "recorder":
                await ready.next_msg(timeout=30)
        await drained.next_msg(timeout=60)  # the whole capture is read (and in the look-back)
        code, out, err = await run_cli(
            "record", "start", "--nats-url", nats_url, "--filter", "udp", "--duration", "1m", "--json"
        )
        assert (code, err) == (0, "")
        started = json_line(out)
        code, out, _ = await run_cli("record", "stop", str(started["id"]), "--nats-url", nats_url, "--json")
        assert code == 0
        stopped = json_line(out)
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            await asyncio.wait_for(process.wait(), 30)
        await client.close()
    expected = expected_udp(capture, tmp_path, 30)
    # The window cuts the capture: UDP packets before its last 30 s exist and are left out.
    assert 0 < len(expected) < 28
    assert stopped["lookback_packets"] == stopped["packets"] == str(len(expected))
    files = stopped["files"]
    assert isinstance(files, list)
    [path] = [Path(name) for name in files]
    assert path.suffix == ".pcapng"
    assert read_back(path) == expected
    rows = tshark_fields(path, "frame.protocols")
    assert len(rows) == len(expected)
    assert all(":udp" in row[0] for row in rows)
