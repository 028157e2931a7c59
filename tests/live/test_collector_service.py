"""`trawl collector` in live mode as a process: start-up errors are one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import needs_binary, needs_root

pytestmark = [needs_root(), pytest.mark.root, pytest.mark.timeout(60)]


def run_collector(tmp_path: Path, nats_url: str, prefix: tuple[str, ...] = (), **collector: object) -> tuple[int, str]:
    config = tmp_path / "trawl.yaml"
    config.write_text(yaml.safe_dump({"node": "t", "nats": {"servers": [nats_url]}, "collector": collector}))
    command = [sys.executable, "-m", "trawl", "collector", "--config", str(config)]
    if prefix:
        command = [*prefix, "--", "-c", " ".join(command)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=45, check=False)
    return done.returncode, done.stderr


@needs_binary("capsh")
def test_missing_capabilities_are_named_in_one_line(tmp_path: Path, nats_url: str) -> None:
    code, stderr = run_collector(
        tmp_path, nats_url, ("capsh", "--drop=cap_net_raw,cap_sys_admin"), interfaces=["lo"], pod_loopback=["x"]
    )
    assert code == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("trawl collector: live capture is missing capabilities: CAP_NET_RAW")
    assert "CAP_SYS_ADMIN" in last
    assert "Traceback" not in stderr


def test_a_bad_filter_is_one_line_with_libpcaps_message(tmp_path: Path, nats_url: str) -> None:
    code, stderr = run_collector(tmp_path, nats_url, interfaces=["lo"], filter="tcp port")
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (
        "trawl collector: bad filter 'tcp port': can't parse filter expression: syntax error"
    )


def test_an_unknown_interface_is_one_line(tmp_path: Path, nats_url: str) -> None:
    code, stderr = run_collector(tmp_path, nats_url, interfaces=["nosuchif0"])
    assert code == 2
    assert "no interface named 'nosuchif0'" in stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
