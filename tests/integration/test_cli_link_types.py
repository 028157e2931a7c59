"""Link types at the command line (issue #8, item 4): a raw-IP capture whose header says 12 or
14 gives the calls of its Ethernet twin; a link type Trawl cannot decode is one line naming the
file and the link type, exit 2, for `trawl analyze`, `trawl up --pcap` and the collector's
replay (`trawl collector` with a `pcap:` source, against a real nats-server)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_cli_errors import assert_one_line_error, trawl
from tests.unit.test_link_types import conversation, wrapped, write_pcap
from trawl.pcap import LINKTYPE_ETHERNET

UNKNOWN = 147  # LINKTYPE_USER0: private use, nothing Trawl could decode


@pytest.mark.parametrize("link_type", [12, 14])
def test_analyze_reads_historical_raw_ip_values(tmp_path: Path, link_type: int) -> None:
    frames = conversation(4)
    ethernet = write_pcap(tmp_path / "ethernet.pcap", LINKTYPE_ETHERNET, frames)
    raw = write_pcap(tmp_path / f"raw-{link_type}.pcap", link_type, wrapped(frames, link_type))
    expected = trawl("analyze", str(ethernet), "--json")
    result = trawl("analyze", str(raw), "--json")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    calls = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(call["method"], call["path"], call["status"]) for call in calls] == [
        ("GET", "/items/1", "200"),
        ("POST", "/items", "503"),
    ]
    assert result.stdout == expected.stdout


def test_analyze_refuses_a_link_type_it_cannot_decode(tmp_path: Path) -> None:
    capture = write_pcap(tmp_path / "user0.pcap", UNKNOWN, wrapped(conversation(4), 12))
    result = trawl("analyze", str(capture), "--json")
    line = assert_one_line_error(result, str(capture), "link type 147 (USER0)", "not one Trawl decodes")
    assert line.startswith("trawl analyze: ")
    assert result.stdout == ""


def test_up_refuses_it_before_starting_anything(tmp_path: Path) -> None:
    capture = write_pcap(tmp_path / "user0.pcap", UNKNOWN, wrapped(conversation(4), 12))
    assert_one_line_error(
        trawl("up", "--pcap", str(capture), "--state-dir", str(tmp_path / "state")), str(capture), "147 (USER0)"
    )
    assert not (tmp_path / "state").exists()  # no NATS, no service was started


def test_collector_replay_refuses_it_at_start(nats_url: str, tmp_path: Path) -> None:
    capture = write_pcap(tmp_path / "user0.pcap", UNKNOWN, wrapped(conversation(4), 12))
    config = tmp_path / "trawl.yaml"
    config.write_text(f"node: test-node\nnats:\n  servers: ['{nats_url}']\ncollector:\n  pcap: {capture}\n")
    result = subprocess.run(
        [sys.executable, "-m", "trawl", "collector", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = assert_one_line_error(result, str(capture), "link type 147 (USER0)")
    assert line.startswith("trawl collector: ")
