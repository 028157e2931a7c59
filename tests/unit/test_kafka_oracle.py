"""tshark as the oracle for Kafka: every request tshark finds (api key, version, correlation id,
client id) is one call of Trawl's and Trawl has no other; every response tshark pairs is the
response of that call; where tshark dissects a message whole, its topic names and error codes
are Trawl's. Captures: the three recordings of tests/fixtures/kafka (the real kafka-python
client and the stand-in broker, decode-as rules below) and the public sample
../shared/pcaps/kafka/nDPI__kafka.pcapng (librdkafka and the Java console producer).

Where the two differ the test says why, next to the exception:

- tshark 4.0's Kafka dissector stops at the versions in TSHARK_NEWEST (it says "Unsupported
  <API> version. Supports v0-N" and reads no further, or misreads the flexible encoding that
  follows); Trawl reads up to the versions of Kafka's own definitions (kafka.APIS), which
  tests/unit/test_kafka_schemas.py checks against kafka-python's encoders. For those messages
  only the header (which tshark reads at any version) is compared.
- JoinGroup and SyncGroup: tshark decodes the protocol metadata and assignment bytes as the
  embedded consumer protocol and runs past their length ("Dissected message does not end at the
  pdu length offset"), so its error codes after them are not read; the stand-in broker decoded
  the same frames with kafka-python and the group formed, so the frames are sound.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES, SHARED_PCAPS, needs_binary
from tests.unit.dissector_builders import settings
from trawl.collector.replay import CaptureFile
from trawl.dissector.engine import Dissector
from trawl.dissector.protocols import kafka
from trawl.v1.calls_pb2 import ApiCall
from trawl.v1.packets_pb2 import PacketBatch

KAFKA = FIXTURES / "kafka"
# (capture, the broker's port for the decode-as rule)
CAPTURES = [
    (KAFKA / "kafka_flexible.pcap", 39601),
    (KAFKA / "kafka_legacy.pcap", 39602),
    (KAFKA / "kafka_sasl.pcap", 39603),
    (SHARED_PCAPS / "kafka" / "nDPI__kafka.pcapng", 9092),
]
# The newest version of each API tshark 4.0.17's Kafka dissector reads (its own "Supports v0-N").
TSHARK_NEWEST = {
    0: 8,
    1: 11,
    2: 5,
    3: 9,
    8: 8,
    9: 7,
    10: 3,
    11: 7,
    12: 4,
    13: 4,
    14: 5,
    17: 1,
    18: 3,
    19: 5,
    20: 4,
    22: 3,
    36: 2,
}
EMBEDDED_CONSUMER_PROTOCOL = {11, 14}  # JoinGroup, SyncGroup: see the module docstring
# librdkafka's ApiVersions v0 requests (nDPI sample) carry 4 zero bytes after the empty v0 body:
# tshark calls the message malformed; Trawl, like a broker, reads the fields it knows and stops.
PADDED = {("nDPI__kafka.pcapng", 18, 0)}


@dataclass
class Pdu:
    """One Kafka message as tshark dissected it."""

    frame: int
    src_port: int
    dst_port: int
    fields: dict[str, str]
    topics: set[str] = field(default_factory=set)
    errors: list[int] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)  # tshark's notes on the message itself

    @property
    def clean(self) -> bool:
        return not self.experts

    @property
    def is_request(self) -> bool:
        return "kafka.request_key" in self.fields


def _walk(node: Any, pdu: Pdu) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, pdu)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "kafka.topic_name" and value != "[ Null ]":
            pdu.topics.add(value)
        elif key == "kafka.error":
            pdu.errors.append(int(value))
        elif key.startswith("API Version "):
            continue  # an ApiVersions response's list, with tshark's notes on what it supports
        elif key in ("_ws.expert.message", "_ws.malformed"):
            pdu.experts.append(value)
        else:
            _walk(value, pdu)


def tshark_pdus(path: Path, port: int) -> list[Pdu]:
    output = subprocess.run(
        [
            "tshark",
            "-r",
            str(path),
            "-d",
            f"tcp.port=={port},kafka",
            "-Y",
            "kafka",
            "-T",
            "json",
            "--no-duplicate-keys",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    pdus = []
    for packet in json.loads(output):
        layers = packet["_source"]["layers"]
        tcp = layers["tcp"]
        messages = layers["kafka"] if isinstance(layers["kafka"], list) else [layers["kafka"]]
        for message in messages:
            top = {key: value for key, value in message.items() if isinstance(value, str)}
            pdu = Pdu(int(layers["frame"]["frame.number"]), int(tcp["tcp.srcport"]), int(tcp["tcp.dstport"]), top)
            _walk(message, pdu)
            pdus.append(pdu)
    return pdus


def trawl_calls(path: Path) -> tuple[list[ApiCall], dict[str, int]]:
    """Through the collector's file reader, as `trawl analyze` reads it (pcap and pcapng)."""
    engine = Dissector(settings(), "n1")
    calls: list[ApiCall] = []
    sequence = 0
    link_type = 1
    for batch in CaptureFile(path).batches(4096, 1 << 20):
        sequence += 1
        link_type = batch.link_type
        calls += engine.feed(batch.message(node="n1", shard=0, sequence=sequence, source="test"))
    end = PacketBatch(node="n1", shard=0, sequence=sequence + 1, link_type=link_type, source="test", end_of_input=True)
    calls += engine.feed(end) + engine.finish()
    return [call for call in calls if call.protocol == "kafka"], engine.counters


def read_by_tshark(api_key: int, version: int) -> bool:
    newest = TSHARK_NEWEST.get(api_key)
    return newest is not None and version <= newest


@needs_binary("tshark")
@pytest.mark.parametrize(("path", "port"), CAPTURES, ids=lambda value: getattr(value, "name", ""))
def test_every_message_tshark_reads_is_a_call_with_the_same_facts(path: Path, port: int) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not there (the public samples live in ../shared/pcaps)")
    pdus = tshark_pdus(path, port)
    assert pdus, "tshark found no Kafka message: the decode-as rule is wrong"
    calls, counters = trawl_calls(path)
    by_key = {(call.src.port, call.kafka.correlation_id): call for call in calls}
    assert len(by_key) == len(calls)
    requests = [pdu for pdu in pdus if pdu.is_request]
    # Trawl invents no call and misses none.
    assert sorted(by_key) == sorted((pdu.src_port, int(pdu.fields["kafka.correlation_id"])) for pdu in requests)
    request_of = {pdu.frame: pdu for pdu in requests}
    unclean_requests = {(pdu.src_port, int(pdu.fields["kafka.correlation_id"])): not pdu.clean for pdu in requests}
    compared = 0
    for pdu in requests:
        call = by_key[(pdu.src_port, int(pdu.fields["kafka.correlation_id"]))]
        where = f"{path.name} frame {pdu.frame}"
        api_key, version = int(pdu.fields["kafka.api_key"]), int(pdu.fields["kafka.api_version"])
        assert (call.kafka.api_key, call.kafka.api_version, call.method) == (api_key, version, kafka.api_name(api_key))
        assert call.kafka.client_id == pdu.fields.get("kafka.client_id", "").replace("[ Null ]", ""), where
        assert "body-not-decoded" not in call.notes and "unknown-version" not in call.notes, where
        if not pdu.clean:
            # tshark stopped: a version newer than it reads, the embedded consumer protocol, or
            # librdkafka's padding.
            explained = api_key in EMBEDDED_CONSUMER_PROTOCOL or (path.name, api_key, version) in PADDED
            assert not read_by_tshark(api_key, version) or explained, (where, pdu.experts)
            continue
        assert read_by_tshark(api_key, version), where
        if api_key != kafka.FETCH or version < 13:  # Fetch v13+ names topics by id
            assert pdu.topics == set(call.kafka.topics), where
        compared += 1
    unmatched = 0
    for pdu in pdus:
        if pdu.is_request:
            continue
        request = request_of.get(int(pdu.fields.get("kafka.request_frame", "0")))
        if request is None:
            call = by_key.get((pdu.dst_port, int(pdu.fields["kafka.correlation_id"])))
            if call is not None and not unclean_requests.get((pdu.dst_port, call.kafka.correlation_id), True):
                raise AssertionError(f"{path.name} frame {pdu.frame}: tshark did not pair a response")
            if call is None:
                # A response whose request was not captured (the sample starts mid-connection):
                # Trawl counts it and makes no call.
                unmatched += 1
            else:
                # tshark pairs a response only with a request it dissected whole; this one's
                # request was of a version it does not read (asserted above). Trawl paired it.
                assert call.HasField("response") and not read_by_tshark(call.kafka.api_key, call.kafka.api_version)
            continue
        call = by_key[(request.src_port, int(request.fields["kafka.correlation_id"]))]
        where = f"{path.name} frame {pdu.frame}"
        assert call.HasField("response") and call.status == kafka.error_name(call.kafka.error_code), where
        api_key, version = call.kafka.api_key, call.kafka.api_version
        if not pdu.clean:
            assert not read_by_tshark(api_key, version) or api_key in EMBEDDED_CONSUMER_PROTOCOL, (where, pdu.experts)
            continue
        nonzero = {code for code in pdu.errors if code}
        if nonzero:
            assert call.kafka.error_code in nonzero, where
        else:
            assert call.status == "NONE", where
        assert pdu.topics <= set(call.kafka.topics), where
        compared += 1
    assert counters.get("kafka_unmatched_responses", 0) == unmatched
    # The flexible recording is mostly beyond tshark 4.0 (16 of its 91 messages are read whole).
    assert compared >= 10, "tshark read too few messages whole for the comparison to mean much"
