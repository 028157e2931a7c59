"""An unreachable NATS, as a user meets it: `trawl <service>` and `trawl up` started against a
closed port, a name that does not resolve, a server that never answers and a server that
refuses the credentials. Each prints exactly one line on stderr, after the configured attempts,
with the real reason and the fix, and exits 2; the failed tries are not a warning each."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trawl.bus import connect_failure_reason, display_servers
from trawl.config import NatsSettings
from trawl.embedded import EmbeddedNats, free_port


def trawl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trawl", *args], capture_output=True, text=True, timeout=120)


def the_one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def write_config(tmp_path: Path, server: str, attempts: int = 2, **nats: str) -> Path:
    config = tmp_path / "trawl.yaml"
    extra = "".join(f"  {key}: {value}\n" for key, value in nats.items())
    config.write_text(
        f"nats:\n  servers: ['{server}']\n  connect_attempts: {attempts}\n  connect_timeout_s: 0.5\n{extra}"
    )
    return config


@pytest.mark.parametrize("service", ["dissector", "enricher"])
def test_closed_port_is_one_line_naming_connection_refused(tmp_path: Path, service: str) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    config = write_config(tmp_path, url, attempts=3)
    line = the_one_line(trawl(service, "--config", str(config)))
    assert line == (
        f"trawl {service}: cannot reach NATS at {url}: connection refused (3 attempts over 2 s); "
        f"start nats-server or set nats.servers in {config}"
    )


def test_a_name_that_does_not_resolve_is_named(tmp_path: Path) -> None:
    # .invalid never resolves (RFC 6761).
    config = write_config(tmp_path, "nats://nats.invalid:4222", attempts=1)
    line = the_one_line(trawl("dissector", "--config", str(config)))
    assert line.startswith("trawl dissector: cannot reach NATS at nats://nats.invalid:4222: ")
    assert "DNS name not found (nats.invalid) (1 attempt over " in line
    assert line.endswith(f"start nats-server or set nats.servers in {config}")


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts connections and never says a word (a NATS that hangs)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def test_a_server_that_never_answers_is_a_timeout(tmp_path: Path, silent_listener: int) -> None:
    config = write_config(tmp_path, f"nats://127.0.0.1:{silent_listener}", attempts=2)
    started = time.monotonic()
    line = the_one_line(trawl("recorder", "--config", str(config)))
    assert time.monotonic() - started < 30
    assert ": timeout (no answer within 0.5 s) (2 attempts over " in line


@pytest.fixture
def nats_with_password(tmp_path: Path) -> Iterator[str]:
    """A real nats-server that requires user `trawl`, password `right`."""
    with EmbeddedNats(state_dir=tmp_path / "nats-auth", extra_args=["--user", "trawl", "--pass", "right"]) as server:
        yield server.url


def test_refused_credentials_fail_at_once_and_say_which_keys_to_set(tmp_path: Path, nats_with_password: str) -> None:
    config = write_config(tmp_path, nats_with_password, attempts=5, user="trawl", password="wrong-secret")
    line = the_one_line(trawl("enricher", "--config", str(config)))
    assert f"cannot reach NATS at {nats_with_password}: authorization failed" in line
    assert "(1 attempt over 0 s)" in line  # credentials do not get better by trying again
    assert line.endswith(f"nats.creds_file in {config} to credentials the server accepts")
    assert "wrong-secret" not in line


def test_trawl_up_against_a_closed_nats_url(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    capture = Path(__file__).resolve().parent.parent / "fixtures" / "http1.pcap"
    line = the_one_line(trawl("up", "--nats-url", url, "--pcap", str(capture), "--state-dir", str(tmp_path / "s")))
    assert line.startswith(f"trawl up: cannot reach NATS at {url}: connection refused (")
    assert line.endswith("start nats-server or set --nats-url")


def test_reasons_of_the_socket_errors() -> None:
    settings = NatsSettings(servers=["nats://bus.example.invalid:4222", "nats://10.0.0.1:4222"], connect_timeout_s=2)
    assert connect_failure_reason(ConnectionRefusedError(111, "Connection refused"), settings) == "connection refused"
    not_found = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert connect_failure_reason(not_found, settings) == "DNS name not found (bus.example.invalid)"
    assert connect_failure_reason(TimeoutError(), settings) == "timeout (no answer within 2 s)"
    assert connect_failure_reason(OSError(113, "No route to host"), settings) == "no route to host"


@given(st.lists(st.text(max_size=40), min_size=1, max_size=3), st.text(min_size=1, max_size=12))
def test_a_password_in_a_server_url_is_never_shown(servers: list[str], password: str) -> None:
    secret = "S3cr3t" + password.replace("@", "")
    with_password = [f"nats://user:{secret}@{server.split('@')[-1]}" for server in servers]
    with_password += [f"user:{secret}@{server.split('@')[-1]}" for server in servers]  # no scheme
    shown = display_servers(with_password)
    assert secret not in shown
    assert shown.count("***@") == 2 * len(servers)
