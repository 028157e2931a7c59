"""The NATS client protocol as far as a publish-only client needs it, sans-IO.

A client that only publishes reads five operations from the server: `INFO {json}`, `PING`,
`PONG`, `+OK` and `-ERR '<message>'` (it never subscribes, so `MSG`/`HMSG` are a protocol
error). `ServerReader.feed` turns received bytes into those operations; the `*_command`
functions build what the client sends. Reference: https://docs.nats.io/reference/reference-protocols/nats-protocol
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

CRLF = b"\r\n"
PING_COMMAND = b"PING\r\n"
PONG_COMMAND = b"PONG\r\n"
# The server's own limit of a control line is 4 KiB; INFO grows with a cluster's connect_urls.
MAX_LINE = 64 * 1024


class NatsProtocolError(Exception):
    """What the server sent is not the NATS protocol a publish-only client expects."""


@dataclass(frozen=True, slots=True)
class Info:
    """The server's INFO: its limits and what it requires of the client."""

    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def max_payload(self) -> int:
        value = self.fields.get("max_payload", 1 << 20)
        return value if isinstance(value, int) and value > 0 else 1 << 20

    @property
    def tls_required(self) -> bool:
        return bool(self.fields.get("tls_required"))

    @property
    def headers(self) -> bool:
        return bool(self.fields.get("headers"))


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Ok:
    pass


@dataclass(frozen=True, slots=True)
class Err:
    """`-ERR`: the server's message without its quotes (most of them close the connection)."""

    message: str


ServerOp = Info | Ping | Pong | Ok | Err


class ServerReader:
    """Bytes from the server in, operations out; raises NatsProtocolError and nothing else."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[ServerOp]:
        self._buffer += data
        ops: list[ServerOp] = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            ops.append(parse_line(bytes(self._buffer[start:end]).rstrip(b"\r")))
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > self.max_line:
            raise NatsProtocolError(f"a line from the server longer than {self.max_line} bytes")
        return ops


def parse_line(line: bytes) -> ServerOp:
    """One server control line (without its line end)."""
    op, _, rest = line.partition(b" ")
    name = op.upper()
    if name == b"PING" and not rest.strip():
        return Ping()
    if name == b"PONG" and not rest.strip():
        return Pong()
    if name == b"+OK" and not rest.strip():
        return Ok()
    if name == b"-ERR":
        return Err(rest.strip().strip(b"'").decode("utf-8", "replace"))
    if name == b"INFO":
        try:
            fields = json.loads(rest)
        except (ValueError, UnicodeDecodeError):
            raise NatsProtocolError("INFO whose body is not JSON") from None
        if not isinstance(fields, dict):
            raise NatsProtocolError("INFO whose body is not a JSON object")
        return Info(fields)
    shown = line[:40].decode("ascii", "replace")
    raise NatsProtocolError(f"unexpected operation from the server: {shown!r}")


def connect_command(
    name: str,
    version: str,
    *,
    user: str | None = None,
    password: str | None = None,
    auth_token: str | None = None,
) -> bytes:
    """CONNECT for a quiet (non-verbose) client that may send headers and never wants its own
    messages back."""
    options: dict[str, Any] = {
        "verbose": False,
        "pedantic": False,
        "tls_required": False,
        "name": name,
        "lang": "python3",
        "version": version,
        "protocol": 1,
        "headers": True,
        "no_responders": False,
        "echo": False,
    }
    if user is not None:
        options["user"] = user
    if password is not None:
        options["pass"] = password
    if auth_token is not None:
        options["auth_token"] = auth_token
    return b"CONNECT " + json.dumps(options, separators=(",", ":")).encode() + CRLF


def pub_line(subject: str, size: int) -> bytes:
    """The control line in front of a payload of `size` bytes (followed by the payload and CRLF)."""
    return f"PUB {subject} {size}\r\n".encode()
