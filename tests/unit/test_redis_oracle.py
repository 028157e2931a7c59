"""tshark as the oracle for Redis: every command tshark's RESP dissector decodes on the recorded
captures (tests/fixtures/redis, made by make_redis_fixtures.py) and on the public sample
../shared/pcaps/redis/tcpdump__resp_1_benchmark.pcap (Linux cooked capture) is a call of
Trawl's, on the same connection, in the same order, with the same arguments; and every error
reply tshark decodes is a call with that error's prefix as its status.

tshark is read through `-T json --no-duplicate-keys` (each top-level RESP array of a client
packet is one command, its bulk strings the arguments). Where the two legitimately differ, the
test says why next to the exception:
- tshark 4.0's RESP dissector reads only RESP arrays from clients, so inline commands
  (`PING\\r\\n`, what redis-benchmark's PING_INLINE and telnet users send) are "[fragment]" to
  it; Trawl reads them as redis-server does (note `inline`). They are the only calls Trawl has
  beyond tshark's;
- tshark 4.0 knows no RESP3 type (`%` maps, `_` nil, `>` push...): replies on connections that
  said `HELLO 3` are not compared, commands (always RESP2 arrays) are;
- Trawl keeps at most MAX_ARGS arguments of MAX_ARG_BYTES each, and credentials are redacted:
  those are compared as far as Trawl keeps them.
"""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES, SHARED_PCAPS, needs_binary
from tests.unit.dissector_builders import dissect_capture
from trawl.dissector.protocols import redis
from trawl.dissector.redact import REDACTED
from trawl.v1.calls_pb2 import ApiCall

REDIS = FIXTURES / "redis"
# (capture, the server ports tshark is told are RESP)
CAPTURES = [
    (REDIS / "resp2.pcap", (39601,)),
    (REDIS / "resp3.pcap", (39602,)),
    (REDIS / "pubsub.pcap", (39603,)),
    (REDIS / "auth.pcap", (39604, 39605)),
    (REDIS / "blocking.pcap", (39606,)),
    (REDIS / "misc.pcap", (39607,)),
    (REDIS / "benchmark.pcap", (39608,)),
    (SHARED_PCAPS / "redis" / "tcpdump__resp_1_benchmark.pcap", (6379,)),
]


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _bytes(item: dict[str, Any]) -> bytes:
    return bytes.fromhex(str(item.get("resp.bulk_string.value", "")).replace(":", ""))


def tshark_messages(path: Path, ports: tuple[int, ...]) -> dict[tuple[int, int], dict[str, list[Any]]]:
    """(server port, client port) -> {"commands": [[arg, ...], ...], "errors": ["ERR ...", ...]}."""
    decode = [arg for port in ports for arg in ("-d", f"tcp.port=={port},resp")]
    output = subprocess.run(
        ["tshark", "-r", str(path), *decode, "-Y", "resp", "-T", "json", "--no-duplicate-keys"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found: dict[tuple[int, int], dict[str, list[Any]]] = defaultdict(lambda: {"commands": [], "errors": []})
    for packet in json.loads(output):
        layers = packet["_source"]["layers"]
        tcp = layers["tcp"]
        source, destination = int(tcp["tcp.srcport"]), int(tcp["tcp.dstport"])
        to_server = destination in ports
        key = (destination, source) if to_server else (source, destination)
        for resp in _list(layers["resp"]):
            if to_server:
                for array in _list(resp.get("resp.array", [])):
                    found[key]["commands"].append([_bytes(item) for item in _list(array.get("resp.bulk_string", []))])
            else:
                found[key]["errors"] += _list(resp.get("resp.error", []))
    return found


def _same_args(ours: list[str], theirs: list[bytes]) -> bool:
    kept = [arg[: redis.MAX_ARG_BYTES].decode("utf-8", "replace") for arg in theirs[: redis.MAX_ARGS]]
    return len(ours) == len(kept) and all(
        mine in (tshark, REDACTED) or (mine[:1] + REDACTED == mine and tshark[:1] == mine[:1])
        for mine, tshark in zip(ours, kept, strict=True)
    )


def _resp3_connections(calls: list[ApiCall]) -> set[tuple[int, int]]:
    return {(call.dst.port, call.src.port) for call in calls if call.redis.resp_version == 3 or call.method == "HELLO"}


@needs_binary("tshark")
@pytest.mark.parametrize(("path", "ports"), CAPTURES, ids=[path.name for path, _ in CAPTURES])
def test_every_command_and_error_tshark_decodes_is_a_call(path: Path, ports: tuple[int, ...]) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not here (the public samples live in ../shared/pcaps)")
    calls, _engine = dissect_capture(path)
    redis_calls = [call for call in calls if call.protocol == "redis"]
    assert redis_calls, "no Redis call"
    ours: dict[tuple[int, int], list[ApiCall]] = defaultdict(list)
    for call in sorted(redis_calls, key=lambda call: call.request.ts):
        if not call.redis.from_server:
            ours[(call.dst.port, call.src.port)].append(call)
    theirs = tshark_messages(path, ports)
    assert set(theirs) <= set(ours), "a connection tshark decodes gave no call"
    compared = 0
    for key, calls_here in ours.items():
        commands = [call for call in calls_here if "inline" not in call.notes]
        tshark_commands = theirs[key]["commands"] if key in theirs else []
        assert len(commands) == len(tshark_commands), key
        for call, args in zip(commands, tshark_commands, strict=True):
            assert _same_args(list(call.redis.args), args), (key, list(call.redis.args), args)
            assert call.redis.arg_count == len(args)
            compared += 1
        if key in _resp3_connections(calls_here):
            continue  # tshark 4.0 reads no RESP3 type (see the module docstring)
        errors = [
            call.status for call in sorted(calls_here, key=lambda c: c.response.ts) if call.redis.reply_type == "error"
        ]
        tshark_errors = [str(error).split(" ", 1)[0] for error in theirs[key]["errors"]] if key in theirs else []
        assert errors == tshark_errors, key
    assert compared >= sum(len(found["commands"]) for found in theirs.values())


@needs_binary("tshark")
def test_the_only_calls_tshark_does_not_see_are_inline_commands() -> None:
    calls, _engine = dissect_capture(SHARED_PCAPS / "redis" / "tcpdump__resp_1_benchmark.pcap")
    inline = [call for call in calls if "inline" in call.notes]
    # redis-benchmark's PING_INLINE test sends `PING\r\n`: tshark shows it as "[fragment]".
    assert [(call.method, call.request.size) for call in inline] == [("PING", 6)]
    assert len(calls) == 15
