"""tshark as the oracle for AMQP 0-9-1: on the captures recorded from RabbitMQ and pika
(tests/fixtures/amqp, see make_amqp_fixtures.py) and on the public sample in ../shared/pcaps,
every method frame tshark decodes is a method of Trawl's calls (a request, or the answer that
paired with it), on the same channel, sent by the same side, with the same queue, exchange,
routing key and reply code; every message's body size is the content header's; heartbeats
are counted as tshark sees them. Trawl invents no method tshark does not see.

tshark is read through `-T json --no-duplicate-keys`: one `amqp` layer per frame (a list when
a TCP segment holds several). Where the two legitimately differ, the test says why.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, SHARED_PCAPS, needs_binary
from tests.unit.dissector_builders import dissect_capture
from trawl.dissector.protocols.amqp import METHODS, RESPONSES, SPEC_NAMES
from trawl.v1.calls_pb2 import ApiCall

AMQP = FIXTURES / "amqp"
# (capture, the broker's port: tshark decodes 5672 as AMQP by itself, the recordings need a rule)
CAPTURES = [
    (AMQP / "amqp_publish_consume.pcap", 35672),
    (AMQP / "amqp_confirms_returns.pcap", 35672),
    (AMQP / "amqp_errors.pcap", 35672),
    (SHARED_PCAPS / "amqp" / "deepflow__amqp1.pcap", 5672),
]
RESPONSE_NAMES = frozenset(SPEC_NAMES[name] for name in RESPONSES)
CLASSES = {full: cls for _, _, full, cls in METHODS.values()}
CONTENT = ("basic.publish", "basic.deliver", "basic.return", "basic.get-ok")


@dataclass
class Seen:
    """What one side of a capture holds, as a multiset, so the two views compare whole."""

    methods: Counter[tuple[bool, int, str]]
    arguments: Counter[tuple[str, str, str, str, int]]
    bodies: Counter[tuple[str, int]]
    heartbeats: int


def _layers(value: object) -> list[dict[str, object]]:
    if isinstance(value, list):
        return [layer for item in value for layer in _layers(item)]
    return [value] if isinstance(value, dict) else []


def _find(tree: object, name: str) -> str:
    """The first value of field `name` anywhere in a tshark JSON subtree ("" when absent)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == name and isinstance(value, str):
                return value
            found = _find(value, name)
            if found:
                return found
    elif isinstance(tree, list):
        for item in tree:
            found = _find(item, name)
            if found:
                return found
    return ""


def tshark_view(path: Path, port: int) -> Seen:
    output = subprocess.run(
        ["tshark", "-r", str(path), "-d", f"tcp.port=={port},amqp", "-T", "json", "--no-duplicate-keys",
         "-J", "tcp amqp", "-Y", "amqp"],
        capture_output=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    seen = Seen(Counter(), Counter(), Counter(), 0)
    pending_content: dict[tuple[str, bool, int], str] = {}
    for packet in json.loads(output):
        layers = packet["_source"]["layers"]
        tcp = layers["tcp"]
        from_server = int(tcp["tcp.srcport"]) == port
        stream = str(tcp["tcp.stream"])
        for frame in _layers(layers.get("amqp", [])):
            kind = str(frame.get("amqp.type", ""))
            channel = int(str(frame.get("amqp.channel", "0")))
            if kind == "8":
                seen.heartbeats += 1
            elif kind == "1":
                index = int(str(frame["amqp.method.class"])) << 16 | int(str(frame["amqp.method.method"]))
                name = METHODS[index][2]
                seen.methods[(from_server, channel, name)] += 1
                arguments = frame.get("amqp.method.arguments", {})
                code = _find(arguments, "amqp.method.arguments.reply_code")
                seen.arguments[
                    (
                        name,
                        _find(arguments, "amqp.method.arguments.queue"),
                        _find(arguments, "amqp.method.arguments.exchange"),
                        _find(arguments, "amqp.method.arguments.routing_key"),
                        int(code or 0),
                    )
                ] += 1
                if name in CONTENT:
                    pending_content[(stream, from_server, channel)] = name
            elif kind == "2":
                name = pending_content.pop((stream, from_server, channel), "orphan")
                seen.bodies[(name, int(_find(frame, "amqp.header.body-size")))] += 1
    return seen


def trawl_view(calls: list[ApiCall]) -> Seen:
    seen = Seen(Counter(), Counter(), Counter(), 0)
    for call in calls:
        if call.protocol != "amqp":
            continue
        detail = call.amqp
        method = call.method
        seen.methods[(detail.from_server, detail.channel, method)] += 1
        answer = detail.response_method
        if answer in RESPONSE_NAMES and answer != method:
            seen.methods[(not detail.from_server, detail.channel, answer)] += 1
        # tshark shows a frame's own arguments; Trawl's detail also names what the connection
        # taught it: the consumer's queue on basic.deliver and basic.cancel (from basic.consume),
        # and on queue.declare of "" the name the broker gave in declare-ok (RabbitMQ's "amq.gen-"
        # names). Compared here: only the fields the method's frame carries, as sent.
        fields = CLASSES[method].__slots__
        queue = detail.queue if "queue" in fields else ""
        if method == "queue.declare" and queue.startswith("amq.gen-"):
            queue = ""
        exchange = detail.exchange if "exchange" in fields else ""
        routing_key = detail.routing_key if "routing_key" in fields else ""
        code = detail.reply_code if "reply_code" in fields else 0
        seen.arguments[(method, queue, exchange, routing_key, code)] += 1
        if method in CONTENT:
            seen.bodies[(method, call.request.body_size)] += 1
        if answer == "basic.get-ok":
            seen.bodies[(answer, call.response.body_size)] += 1
    return seen


def _drop_answers(arguments: Counter[tuple[str, str, str, str, int]]) -> Counter[tuple[str, str, str, str, int]]:
    """Only the requests' and one-way methods' arguments (answers carry their own in Trawl's detail)."""
    return Counter({key: count for key, count in arguments.items() if key[0] not in RESPONSE_NAMES})


@needs_binary("tshark")
@pytest.mark.parametrize(("path", "port"), CAPTURES, ids=lambda value: getattr(value, "name", ""))
def test_every_method_tshark_decodes_is_on_a_call(path: Path, port: int) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not there (the public samples live in ../shared/pcaps)")
    expected = tshark_view(path, port)
    assert expected.methods, "tshark found no AMQP method: the decode-as rule is wrong"
    calls, engine = dissect_capture(path)
    found = trawl_view(calls)
    assert found.methods == expected.methods
    assert _drop_answers(found.arguments) == _drop_answers(expected.arguments)
    assert found.bodies == expected.bodies
    assert engine.counters.get("amqp_heartbeats", 0) == expected.heartbeats
    assert not [call.notes for call in calls if call.protocol == "amqp" and call.notes]


@needs_binary("tshark")
def test_the_recordings_hold_every_scenario_the_script_meant() -> None:
    """What make_amqp_fixtures.py recorded is there (a regenerated file that lost a scenario
    would make the comparison above pass on less)."""
    methods: Counter[str] = Counter()
    for path, port in CAPTURES[:3]:
        for (_, _, name), count in tshark_view(path, port).methods.items():
            methods[name] += count
    for name in (
        "connection.start", "connection.start-ok", "connection.tune", "connection.tune-ok", "connection.open",
        "channel.open", "exchange.declare", "queue.declare", "queue.bind", "queue.unbind", "queue.purge",
        "queue.delete", "exchange.delete", "basic.qos", "basic.consume", "basic.consume-ok", "basic.cancel",
        "basic.publish", "basic.deliver", "basic.return", "basic.get", "basic.get-ok", "basic.get-empty",
        "basic.ack", "basic.nack", "basic.reject", "confirm.select", "tx.select", "tx.commit", "tx.rollback",
        "channel.close", "channel.close-ok", "connection.close", "connection.close-ok",
    ):  # fmt: skip
        assert methods[name], name
    assert tshark_view(CAPTURES[0][0], 35672).heartbeats > 0
