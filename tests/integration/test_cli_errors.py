"""Bad input at the command line: one line on stderr naming the file and the problem, exit
code 2, no traceback; what could be read is not lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES

HTTP1 = FIXTURES / "http1.pcap"


def trawl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trawl", *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_truncated_pcap_prints_what_it_could_then_fails(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pcap"
    data = HTTP1.read_bytes()
    truncated.write_bytes(data[: len(data) * 3 // 4])
    result = trawl("analyze", str(truncated), "--json")
    assert_one_line_error(result, str(truncated), "truncated capture", "byte offset")
    calls = [json.loads(line) for line in result.stdout.splitlines()]
    whole = [json.loads(line) for line in trawl("analyze", str(HTTP1), "--json").stdout.splitlines()]
    assert 0 < len(calls) <= len(whole)
    assert {c["path"] for c in calls} <= {c["path"] for c in whole}


@pytest.mark.parametrize("command", ["analyze", "up"])
def test_not_a_capture(tmp_path: Path, command: str) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("these are not packets\n")
    args = [command, str(bogus)] if command == "analyze" else [command, "--pcap", str(bogus)]
    assert_one_line_error(trawl(*args), str(bogus), "not a pcap or pcapng file")


def test_missing_capture(tmp_path: Path) -> None:
    assert_one_line_error(trawl("analyze", str(tmp_path / "absent.pcap")), "absent.pcap", "cannot read capture")


def test_rules_with_cel_syntax_error(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: fine\n"
        "    condition: 'call.protocol == \"http\"'\n"
        "  - name: broken\n"
        "    condition: 'call.status >= '\n"
    )
    line = assert_one_line_error(trawl("up", "--pcap", str(HTTP1), "--rules", str(rules)), f"{rules}:5", "broken")
    assert "CEL" in line
    config = tmp_path / "alerter.yaml"
    config.write_text(f"alerter:\n  rules_file: {rules}\n")
    assert_one_line_error(trawl("alerter", "--config", str(config)), f"{rules}:5", "CEL")


def test_bad_config_value_names_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text("node: n1\ndissector:\n  max_flows: -1\n")
    assert_one_line_error(trawl("analyze", str(HTTP1), "--config", str(config)), f"{config}:3", "max_flows")


def test_bad_identity_snapshot(tmp_path: Path) -> None:
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text("{not json")
    assert_one_line_error(trawl("analyze", str(HTTP1), "--identity", str(snapshot)), str(snapshot))


def test_a_reader_that_stops_early_ends_analyze_quietly(tmp_path: Path) -> None:
    """`trawl analyze FILE | head -1`: the pipe closes long before the output ends (far more
    than a pipe buffer); analyze stops with exit 0 and no traceback."""
    from tests.unit.dissector_builders import Conversation
    from trawl.pcap import LINKTYPE_ETHERNET, global_header, pack_record

    talk = Conversation(server_port=8080).handshake()
    for number in range(3000):
        talk.client_sends(b"GET /items/%d HTTP/1.1\r\nHost: shop\r\n\r\n" % number)
        talk.server_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    capture = tmp_path / "many.pcap"
    records = b"".join(pack_record(ts, frame) for ts, frame in talk.frames)
    capture.write_bytes(global_header(LINKTYPE_ETHERNET, nanosecond=True) + records)
    process = subprocess.Popen(
        [sys.executable, "-m", "trawl", "analyze", str(capture), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    first = json.loads(process.stdout.readline())
    assert first["method"] == "GET"
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr


def test_a_file_that_is_not_a_descriptor_set_is_named_with_the_fix(tmp_path: Path) -> None:
    bogus = tmp_path / "orders.proto"
    bogus.write_text('syntax = "proto3";\nmessage Order { string id = 1; }\n')
    assert_one_line_error(
        trawl("analyze", str(HTTP1), "--proto-descriptors", str(bogus)),
        str(bogus),
        "not a protobuf descriptor set",
        "--descriptor_set_out",
    )
    missing = tmp_path / "missing.desc"
    assert_one_line_error(trawl("analyze", str(HTTP1), "--proto-descriptors", str(missing)), str(missing))
