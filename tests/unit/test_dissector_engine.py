"""The engine on real captures: protocols found by content, stable ids, batching does not matter,
configuration from YAML and environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.unit.dissector_builders import batch, dissect, dissect_capture, read_capture, settings, summary
from trawl.dissector.config import DissectorSettings
from trawl.dissector.engine import Dissector
from trawl.errors import ConfigError
from trawl.v1.calls_pb2 import Outcome


def test_sll_capture_gives_dns_and_http(shared_pcaps: Path) -> None:
    calls, engine = dissect_capture(shared_pcaps / "sll" / "PcapPlusPlus__sll.pcap")
    assert summary(calls) == [("GET", "/", "301"), ("GET", "/home/0,7340,L-8,00.html", "200")]
    http = [call for call in calls if call.protocol == "http"]
    assert http[1].http.chunked_response and http[1].response.body_size > 100_000
    assert ("A", "daisy.ubuntu.com", "NOERROR") in summary(calls, "dns")
    assert engine.counters["non_ip"] == 7


def test_capture_starting_with_a_keepalive(shared_pcaps: Path) -> None:
    # The first frame is a 1-byte keep-alive of a connection already open: the request behind it
    # is found by resynchronising on the request line.
    calls, _ = dissect_capture(shared_pcaps / "http1" / "scapy__http_chunk.pcap")
    (call,) = [call for call in calls if call.protocol == "http"]
    assert call.path.startswith("/httpgallery/chunked/chunkedimage.aspx") and call.status == "200"
    assert call.response.body[:3] == b"\xff\xd8\xff"  # the JPEG, de-chunked
    assert "gap" not in call.notes


def test_lossy_capture_reports_retransmissions(shared_pcaps: Path) -> None:
    calls, _ = dissect_capture(shared_pcaps / "tcp" / "arkime__wireshark-retrans.pcap")
    assert summary(calls) == [("POST", "/exhmedmx", "200")] * 4
    (report,) = [call for call in calls if call.protocol == "tcp" and call.method == "retransmission"]
    # tshark flags 47 frames, 12 of them repeated pure ACKs; Trawl counts repeated data segments
    # and SYN / SYN-ACKs (36 + 5), not ACKs that carry nothing.
    assert report.status == str(report.tcp.retransmissions) and report.tcp.retransmissions == 41


def test_batching_does_not_change_the_calls_and_ids_are_stable() -> None:
    link_type, frames = read_capture(FIXTURES / "http1.pcap")
    whole, _ = dissect_capture(FIXTURES / "http1.pcap")
    one_by_one = dissect(frames, link_type)
    assert [call.SerializeToString(deterministic=True) for call in one_by_one] == [
        call.SerializeToString(deterministic=True) for call in whole
    ]
    assert len({call.id for call in whole}) == len(whole) == 6
    error = next(call for call in whole if call.status == "500")
    assert error.outcome == Outcome.OUTCOME_ERROR


def test_unknown_tcp_is_tracked_for_diagnostics_only() -> None:
    from tests.unit.dissector_builders import Conversation

    conversation = Conversation(server_port=7777).handshake().client_sends(b"\x00\x01binary protocol\xff" * 40)
    conversation.raw(False, conversation.server_next, conversation.client_next, "RA")
    engine = Dissector(settings(), "n1")
    calls = engine.feed(batch(conversation.frames)) + engine.finish()
    assert [(call.protocol, call.method) for call in calls] == [("tcp", "reset")]
    assert engine.counters["tcp_flows_unknown"] == 1


def test_settings_from_yaml_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text("node: n7\ndissector:\n  max_flows: 50\n  redact_fields: [ssn]\n")
    monkeypatch.setenv("TRAWL_DISSECTOR_CALLS_PER_BATCH", "9")
    loaded = DissectorSettings.load(config)
    assert (loaded.node, loaded.max_flows, loaded.redact_fields, loaded.calls_per_batch) == ("n7", 50, ["ssn"], 9)
    assert loaded.subject == "trawl.v1.packets.>" and loaded.queue_group == "dissector"
    config.write_text("dissector:\n  max_flows: 0\n")
    monkeypatch.delenv("TRAWL_DISSECTOR_CALLS_PER_BATCH")
    with pytest.raises(ConfigError, match="max_flows"):
        DissectorSettings.load(config)
