"""The AMQP parser against the RabbitMQ installed here, not only the committed recordings: a
private rabbitmq-server node (one per test session, tests/fixtures/amqp/rabbitmq.py) and pika
run the recording script's scenarios while tcpdump captures loopback; tshark and Trawl must
then agree on every method frame, as in test_amqp_oracle.py. A newer broker or client that
changes what goes on the wire shows up here before the fixtures are regenerated.

Needs root (tcpdump), tcpdump, tshark and rabbitmq-server (Makefile APT_PACKAGES)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import FIXTURES
from tests.unit.dissector_builders import dissect_capture
from tests.unit.test_amqp_oracle import _drop_answers, trawl_view, tshark_view

SCRIPT = FIXTURES / "amqp" / "make_amqp_fixtures.py"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tcpdump)"),
    pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump (make test installs it)"),
    pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark (make test installs it)"),
    pytest.mark.skipif(
        not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists(),
        reason="needs rabbitmq-server (make test installs it)",
    ),
]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def recorder() -> ModuleType:
    return _load("make_amqp_fixtures", SCRIPT)


@pytest.fixture(scope="session")
def broker(recorder: ModuleType) -> Iterator[object]:
    """One RabbitMQ node for the session (it takes seconds to start), stopped after."""
    with recorder.rabbitmq_broker(recorder.free_port()) as running:
        yield running


@pytest.mark.parametrize("scenario", ["amqp_confirms_returns", "amqp_errors", "amqp_publish_consume"])
def test_a_live_recording_agrees_with_tshark(
    recorder: ModuleType, broker: object, scenario: str, tmp_path: Path
) -> None:
    port = broker.port  # type: ignore[attr-defined]
    path = tmp_path / f"{scenario}.pcap"
    with recorder.capture(path, f"tcp port {port}"):
        recorder.SCENARIOS[scenario](broker)
    expected = tshark_view(path, port)
    assert expected.methods, "tshark saw no AMQP method"
    calls, engine = dissect_capture(path)
    found = trawl_view(calls)
    assert found.methods == expected.methods
    assert _drop_answers(found.arguments) == _drop_answers(expected.arguments)
    assert found.bodies == expected.bodies
    assert engine.counters.get("amqp_heartbeats", 0) == expected.heartbeats
    assert engine.counters.get("amqp_malformed_frames", 0) == 0
