"""A thin layer over nats-py: connection options, the subject contract, JetStream streams.

Subjects (DESIGN.md, "the bus contract"):

- ``trawl.v1.packets.<node>.<shard>``   PacketBatch, published on core NATS (no ack) and kept by
  the in-memory JetStream stream ``TRAWL_PACKETS`` for a bounded window, per-shard sequence
- ``trawl.v1.tls.<node>``               TlsChunkBatch, core NATS
- ``trawl.v1.calls.<node>.<shard>``     CallBatch, JetStream ``TRAWL_CALLS``
- ``trawl.v1.enriched.<protocol>.<dst_namespace>.<dst_workload>``  ApiCall, JetStream ``TRAWL_ENRICHED``
- ``trawl.v1.alerts.<rule>``            Alert, JetStream ``TRAWL_ALERTS``
- ``trawl.v1.control.>``                control messages, core NATS
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import AuthorizationError as NatsAuthorizationError
from nats.errors import ConnectionClosedError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, PubAck, StorageType, StreamConfig
from nats.js.errors import APIError, BadRequestError, ServiceUnavailableError
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

from trawl.config import NatsSettings, PacketRetention, StreamLimits
from trawl.errors import ConfigError
from trawl.logs import get_logger

log = get_logger(__name__)

PREFIX = "trawl.v1"
STREAM_PACKETS = "TRAWL_PACKETS"
STREAM_CALLS = "TRAWL_CALLS"
STREAM_ENRICHED = "TRAWL_ENRICHED"
STREAM_ALERTS = "TRAWL_ALERTS"
# Each service's latest counters (trawl.service publishes them), kept per subject so an enricher
# that starts after a short-lived service (a file's collector) still gets its last figures.
STREAM_COUNTERS = "TRAWL_COUNTERS"
COUNTERS_SUBJECTS = f"{PREFIX}.control.metrics.>"
COUNTERS_MAX_AGE_S = 3600.0
STREAM_SUBJECTS = {
    STREAM_PACKETS: [f"{PREFIX}.packets.>"],
    STREAM_CALLS: [f"{PREFIX}.calls.>"],
    STREAM_ENRICHED: [f"{PREFIX}.enriched.>"],
    STREAM_ALERTS: [f"{PREFIX}.alerts.>"],
}
MSG_ID_HEADER = "Nats-Msg-Id"

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-:]")


def token(value: str) -> str:
    """One subject token: no dots, wildcards or spaces; empty becomes '_'."""
    return _UNSAFE.sub("_", value) or "_"


_NOT_IN_CONSUMER = re.compile(r"[^A-Za-z0-9_-]")


def consumer_token(value: str) -> str:
    """A piece of a JetStream consumer name (letters, digits, '-' and '_'); empty becomes '_'."""
    return _NOT_IN_CONSUMER.sub("_", value) or "_"


def packets_subject(node: str, shard: int | str) -> str:
    return f"{PREFIX}.packets.{token(node)}.{shard}"


def tls_subject(node: str) -> str:
    return f"{PREFIX}.tls.{token(node)}"


def calls_subject(node: str, shard: int | str) -> str:
    # A pod's loopback is captured as the node `<node>/<pod address>` (collector.pod_loopback_as_pod):
    # its calls are the node's, on the node's subject, for consumers that filter by node.
    return f"{PREFIX}.calls.{token(node.partition('/')[0])}.{shard}"


def enriched_subject(protocol: str, namespace: str, workload: str) -> str:
    return f"{PREFIX}.enriched.{token(protocol)}.{token(namespace)}.{token(workload)}"


def alerts_subject(rule: str) -> str:
    return f"{PREFIX}.alerts.{token(rule)}"


def control_subject(*parts: str) -> str:
    return ".".join([f"{PREFIX}.control", *(token(p) for p in parts)])


def _websocket_transport(servers: list[str]) -> None:
    """Give nats-py the aiohttp its transport module was imported without (trawl/__init__.py),
    when a server is a WebSocket URL."""
    import nats.aio.transport as transport

    if getattr(transport, "aiohttp", None) is None and any(
        server.lower().startswith(("ws://", "wss://")) for server in servers
    ):
        import aiohttp
        import multidict

        transport.aiohttp = aiohttp  # type: ignore[attr-defined]
        transport.multidict = multidict  # type: ignore[attr-defined]


def connect_options(settings: NatsSettings, name: str) -> dict[str, object]:
    """nats.connect() keyword arguments for the standard options."""
    _websocket_transport(settings.servers)
    opts: dict[str, object] = {
        "servers": settings.servers,
        "name": name,
        "connect_timeout": settings.connect_timeout_s,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": RECONNECT_TIME_WAIT_S,
        "allow_reconnect": True,
        "drain_timeout": 10,
    }
    if settings.user:
        opts["user"] = settings.user
    if settings.password:
        opts["password"] = settings.password.get_secret_value()
    if settings.token:
        opts["token"] = settings.token.get_secret_value()
    if settings.creds_file:
        if not settings.creds_file.is_file():
            raise ConfigError(f"nats.creds_file {settings.creds_file} does not exist; set it to a .creds file")
        opts["user_credentials"] = str(settings.creds_file)
    if settings.tls_ca or settings.tls_cert:
        context = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
        if settings.tls_cert:
            context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None)
        opts["tls"] = context
    return opts


# Seconds between two tries of one server, for a first connection and for reconnections.
RECONNECT_TIME_WAIT_S = 1


def display_servers(servers: list[str]) -> str:
    """The server URLs for a message, with any userinfo (which may hold a password) masked.

    Textual on purpose: a password holding '#', '?' or '/' makes urllib split the URL elsewhere."""
    shown = []
    for server in servers:
        scheme, sep, rest = server.partition("://")
        if not sep:
            scheme, rest = "", server
        if "@" in rest:
            rest = "***@" + rest.rpartition("@")[2]
        shown.append(f"{scheme}{sep}{rest}")
    return ", ".join(shown)


def _host_names(servers: list[str]) -> list[str]:
    """The servers' host names that are names, not IP literals (those are what DNS resolves)."""
    names: list[str] = []
    for server in servers:
        try:
            host = urlsplit(server if "://" in server else f"nats://{server}").hostname or ""
        except ValueError:
            continue  # not a URL: nats-py cannot have looked it up either
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host and host not in names:
                names.append(host)
    return names


def raise_if_cancelled() -> None:
    """Raise CancelledError when the running task was asked to stop. nats-py turns a
    cancellation inside some of its awaits (fetch, flush, publish on a closing connection)
    into ConnectionClosedError or a timeout, which a loop that retries bus errors would then
    swallow for ever; the task itself still knows (`Task.cancelling`, Python 3.11)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def connect_failure_reason(exc: BaseException, settings: NatsSettings) -> str:
    """What a failed connection try means, in the user's words (nats-py reports the socket's
    and the server's errors as they are: ConnectionRefusedError, socket.gaierror, ...)."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({getattr(exc, 'verify_message', None) or exc.reason or exc})"
    if isinstance(exc, socket.gaierror):
        names = ", ".join(_host_names(settings.servers)) or "the server's name"
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return f"DNS name not found ({names})"
        return f"DNS lookup of {names} failed ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | NatsTimeoutError):
        return f"timeout (no answer within {settings.connect_timeout_s:g} s)"
    if isinstance(exc, OSError):
        return (exc.strerror or str(exc) or type(exc).__name__).lower()
    text = str(exc).removeprefix("nats: ").strip("'\" ")
    if isinstance(exc, NatsAuthorizationError) or "authorization" in text.lower():
        return "authorization failed (the server refused the credentials)"
    return text or type(exc).__name__


def _is_final(reason: str) -> bool:
    return reason.startswith(("authorization", "TLS"))


def connect_failure_message(
    settings: NatsSettings,
    failures: list[BaseException],
    elapsed_s: float,
    *,
    servers_option: str = "nats.servers",
    config_file: Path | None = None,
) -> str:
    """`cannot reach NATS at URL: REASON (N attempts over T s); FIX` for the failed tries."""
    reasons: list[str] = []
    for failure in failures:
        reason = connect_failure_reason(failure, settings)
        if reason not in reasons:
            reasons.append(reason)
    where = f" in {config_file}" if config_file is not None else ""
    if all(reason.startswith("authorization") for reason in reasons):
        fix = f"set nats.user and nats.password, nats.token or nats.creds_file{where} to credentials the server accepts"
    elif all(reason.startswith("TLS") for reason in reasons):
        fix = f"set nats.tls_ca (and nats.tls_cert, nats.tls_key){where} to match the server's certificates"
    else:
        fix = f"start nats-server or set {servers_option}{where}"
    tries = len(failures)
    return (
        f"cannot reach NATS at {display_servers(settings.servers)}: {'; '.join(reasons)} "
        f"({tries} attempt{'s' if tries != 1 else ''} over {elapsed_s:.0f} s); {fix}"
    )


# Messages of a batch subscription: (subject, payload) pairs, headers left out.
BatchHandler = Callable[[list[tuple[bytes, bytes]]], None]
# Messages of a reply batch subscription (a pull consumer's inbox): (reply subject, status code
# of a status message such as b"404", else b"", payload).
ReplyBatchHandler = Callable[[list[tuple[bytes, bytes, bytes]]], None]


class _BatchingParser(Parser):
    """nats-py's parser, handing the messages of some subscriptions (`batch_handlers`, by sid)
    over in lists, one call per read from the socket.

    Why: for each message nats-py matches a regex, parses its headers, builds a Msg and wakes
    the subscription's task (some 10-20 us); the enricher's publish acks and the enriched calls
    `trawl up` shows come at 10^5 a second. Here a message of such a subscription costs a find,
    a split and a slice. Everything else (other subscriptions' messages, PING, INFO, -ERR...)
    goes nats-py's way, in order; a batch subscription also has a nats-py callback, so a message
    that still goes that way (in a read that began mid-message) reaches the handler all the same.
    """

    def __init__(self, nc: NatsClient) -> None:
        super().__init__(nc)
        self.batch_handlers: dict[int, BatchHandler] = {}
        self.reply_handlers: dict[int, ReplyBatchHandler] = {}

    async def parse(self, data: bytes = b"") -> None:
        if not (self.batch_handlers or self.reply_handlers) or self.state != AWAITING_CONTROL_LINE:
            await super().parse(data)
            return
        buf = self.buf
        buf.extend(data)
        handlers = self.batch_handlers
        repliers = self.reply_handlers
        taken: dict[int, list[Any]] = {}
        pos = 0
        size = len(buf)
        while pos < size:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            first = buf[pos]
            if first == 0x4D or first == 0x48:  # MSG, HMSG
                args = bytes(buf[pos:end]).split()
                headers = args[0] == b"HMSG"
                if not headers and args[0] != b"MSG":
                    break  # not a message: nats-py's parser says what it is
                total = int(args[-1])
                header_size = int(args[-2]) if headers else 0
                start = end + 2
                if size < start + total + 2:
                    break  # the rest of it comes with the next read
                sid = int(args[2])
                if sid in handlers:
                    taken.setdefault(sid, []).append((args[1], bytes(buf[start + header_size : start + total])))
                elif sid in repliers:
                    # "NATS/1.0 404 No Messages\r\n...": a status message's code follows the version.
                    status = bytes(buf[start + 9 : start + 12]) if headers and buf[start + 8] == 0x20 else b""
                    reply = args[3] if len(args) == (6 if headers else 5) else b""
                    taken.setdefault(sid, []).append((reply, status, bytes(buf[start + header_size : start + total])))
                else:
                    self._deliver(taken)
                    reply = args[3] if len(args) == (6 if headers else 5) else b""
                    header_block = bytes(buf[start : start + header_size]) if headers else None
                    payload = bytes(buf[start + header_size : start + total])
                    await self.nc._process_msg(sid, args[1], reply, payload, header_block)
                pos = start + total + 2
                continue
            # PING, PONG, INFO, +OK, -ERR: one line, as nats-py parses it.
            self._deliver(taken)
            line = bytearray(buf[pos : end + 2])
            pos = end + 2
            self.buf = line
            try:
                await super().parse()
            finally:
                self.buf = buf
        del buf[:pos]
        self._deliver(taken)
        if (
            self.state == AWAITING_CONTROL_LINE
            and buf
            and buf.find(b"\r\n") >= 0
            and not buf.startswith((b"MSG", b"HMSG"))
        ):
            await super().parse()  # a line this loop stopped at: nats-py's parser reports it

    def _deliver(self, taken: dict[int, list[Any]]) -> None:
        for sid, messages in taken.items():
            handler: Callable[[list[Any]], None] | None = self.batch_handlers.get(sid) or self.reply_handlers.get(sid)
            if handler is None:
                continue
            try:
                handler(messages)
            except Exception as exc:  # a handler's bug must not stop the connection's reading
                log.warning("batch_handler_failed", messages=len(messages), error=repr(exc))
        taken.clear()


@dataclass
class DurableOutcome:
    """What became of the messages of one `DurablePublisher.publish`: stored (or found already
    stored: the same Nats-Msg-Id), refused by the stream, too large to send, or unanswered."""

    stored: int = 0
    refused: int = 0
    too_large: int = 0
    unanswered: int = 0
    last_sequence: int = 0
    error: str = ""

    @property
    def complete(self) -> bool:
        """Every message sent was stored (too large ones were not sent: the caller counts them)."""
        return not self.refused and not self.unanswered


class _Pending:
    __slots__ = ("done", "expected", "outcome")

    def __init__(self, expected: int, done: asyncio.Future[None]) -> None:
        self.expected = expected
        self.outcome = DurableOutcome()
        self.done = done


def _ack_sequence(payload: bytes) -> int:
    """The stream sequence of a JetStream publish ack (`{"stream":"S","seq":N...}`), -1 when the
    payload is an error or not an ack (a no-responders status has an empty payload)."""
    if b'"error"' in payload:
        return -1
    at = payload.find(b'"seq":')
    if at < 0:
        return -1
    start = at + 6
    end = start
    while end < len(payload) and payload[end] in b"0123456789 ":
        end += 1
    try:
        return int(payload[start:end])
    except ValueError:
        return -1


class DurablePublisher:
    """JetStream publishes of many messages at once, each one acknowledged by the stream.

    One `publish` writes every message (HPUB with its Nats-Msg-Id and a reply subject shared by
    the call) into nats-py's outgoing buffer in one piece, and waits for the stream's acks,
    which a batch subscription (`_BatchingParser`) counts without a Msg object each. JetStream
    answers every message it is asked to store, an error included, so what is not stored is
    known: refused (the stream's error), or unanswered within the timeout (a server gone away).
    A message larger than the server's max_payload is not sent (the server would close the
    connection): counted `too_large`. Atomic batches (one ack per batch) were measured and set
    aside: their commit waits some 30 ms on a file stream here, 15k messages/s at most.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._prefix = b""
        self._serial = 0
        self._pending: dict[int, _Pending] = {}

    async def start(self) -> DurablePublisher:
        self._prefix = self.bus.nc.new_inbox().encode()
        await self.bus.subscribe_batches(self._prefix.decode() + ".*", self._on_acks)
        return self

    def _on_acks(self, messages: list[tuple[bytes, bytes]]) -> None:
        pending = self._pending
        for subject, payload in messages:
            serial = subject.rpartition(b".")[2]
            entry = pending.get(int(serial)) if serial.isdigit() else None
            if entry is None:
                continue  # the publish gave up on it (timed out)
            outcome = entry.outcome
            sequence = _ack_sequence(payload)
            if sequence < 0:
                outcome.refused += 1
                if not outcome.error:
                    outcome.error = payload[:200].decode("utf-8", "replace") or "no stream answered"
            else:
                outcome.stored += 1
                if sequence > outcome.last_sequence:
                    outcome.last_sequence = sequence
            if outcome.stored + outcome.refused >= entry.expected and not entry.done.done():
                entry.done.set_result(None)

    async def publish(self, messages: list[tuple[str, bytes, str]], timeout_s: float = 10.0) -> DurableOutcome:
        """Publish (subject, payload, msg_id) each; return once every one is answered, or at the
        timeout (those not answered then are `unanswered`)."""
        if not self._prefix:
            await self.start()
        self._serial += 1
        serial = self._serial
        reply = self._prefix + b".%d" % serial
        limit = self.bus.nc.max_payload
        parts: list[bytes] = []
        too_large = 0
        for subject, payload, msg_id in messages:
            header = b"NATS/1.0\r\n" + MSG_ID_HEADER.encode() + b": " + msg_id.encode() + b"\r\n\r\n"
            size = len(header) + len(payload)
            if size > limit or "\n" in msg_id or "\r" in msg_id:
                too_large += 1
                continue
            parts.append(b"HPUB %s %s %d %d\r\n" % (subject.encode(), reply, len(header), size))
            parts += (header, payload, b"\r\n")
        expected = len(messages) - too_large
        entry = _Pending(expected, asyncio.get_running_loop().create_future())
        entry.outcome.too_large = too_large
        if not expected:
            return entry.outcome
        self._pending[serial] = entry
        try:
            await self.bus.publish_raw(b"".join(parts))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(entry.done), timeout_s)
        finally:
            del self._pending[serial]
        outcome = entry.outcome
        outcome.unanswered = expected - outcome.stored - outcome.refused
        return outcome


@dataclass
class Bus:
    """A connected client plus its JetStream context."""

    nc: NatsClient
    js: JetStreamContext
    _subscriptions: list[Subscription] = field(default_factory=list)
    _pulls: list[JetStreamContext.PullSubscription] = field(default_factory=list)

    @classmethod
    async def connect(
        cls,
        settings: NatsSettings,
        name: str,
        *,
        servers_option: str = "nats.servers",
        config_file: Path | None = None,
    ) -> Bus:
        """Connect; ConfigError after `connect_attempts` failed tries of each server, with one
        line naming the real reason (refused, DNS, timeout, TLS, authorization) and the fix.

        nats-py retries a first connection for ever when reconnects are unlimited (which we
        want once connected) and reports each failed try to the error callback: the callback
        counts them (at debug level: a terminal gets the one line, not a warning per try) and
        the connection is abandoned when they reach the budget. `servers_option` and
        `config_file` name where the user sets the servers, for the fix in the message.
        """
        opts = connect_options(settings, name)
        nc = NatsClient()
        # Set before connecting: nats-py keeps its parser across reconnections (it resets it).
        nc._ps = _BatchingParser(nc)
        attempts = settings.connect_attempts
        budget = None if attempts == -1 else max(1, attempts) * len(settings.servers)
        failures: list[BaseException] = []
        gave_up = asyncio.Event()
        connecting = True

        async def on_error(exc: Exception) -> None:
            if not connecting:
                log.warning("nats_error", error=str(exc) or type(exc).__name__)
                return
            failures.append(exc)
            reason = connect_failure_reason(exc, settings)
            log.debug("nats_connect_attempt_failed", attempt=len(failures), reason=reason)
            if budget is None and len(failures) == 1:
                # Unlimited attempts: say once that it is waiting, or a terminal shows nothing at all.
                log.warning("nats_unreachable_retrying", servers=display_servers(settings.servers), reason=reason)
            # Credentials or certificates the server rejects do not get better by trying again.
            if (budget is not None and len(failures) >= budget) or _is_final(reason):
                gave_up.set()

        async def on_disconnected() -> None:
            if not (connecting or nc.is_closed or nc.is_draining):
                log.warning("nats_disconnected")

        async def on_reconnected() -> None:
            log.info("nats_reconnected", server=str(nc.connected_url.netloc) if nc.connected_url else "")

        loop = asyncio.get_running_loop()
        started = loop.time()
        connect = asyncio.ensure_future(
            nc.connect(
                **opts,  # type: ignore[arg-type]
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            )
        )
        giving_up = asyncio.ensure_future(gave_up.wait())
        # A guard in case a try hangs past its own timeouts (TCP connect, TLS, INFO): each is
        # bounded by connect_timeout_s, and tries of one server are reconnect_time_wait apart.
        guard = None if budget is None else budget * (3 * settings.connect_timeout_s + RECONNECT_TIME_WAIT_S + 1)
        try:
            await asyncio.wait({connect, giving_up}, timeout=guard, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the caller was cancelled: the connection must not go on without it
            connect.cancel()
            raise
        finally:
            giving_up.cancel()
        if connect.done() and not connect.cancelled() and connect.exception() is None:
            connecting = False
            return cls(nc=nc, js=nc.jetstream())
        elapsed = loop.time() - started
        if connect.done() and not connect.cancelled() and (error := connect.exception()) is not None:
            failures.append(error)
        # The server closes the socket after refusing credentials: the reset that follows is the
        # same try, not another reason.
        final = next((i for i, f in enumerate(failures) if _is_final(connect_failure_reason(f, settings))), None)
        if final is not None:
            del failures[final + 1 :]
        connect.cancel()
        with contextlib.suppress(BaseException):
            await connect
        await nc.close()
        if not failures:
            failures.append(TimeoutError())
        raise ConfigError(
            connect_failure_message(settings, failures, elapsed, servers_option=servers_option, config_file=config_file)
        ) from None

    async def ensure_stream(self, name: str, limits: StreamLimits) -> None:
        """Create the stream, or update its limits; idempotent across replicas and restarts."""
        config = StreamConfig(
            name=name,
            subjects=STREAM_SUBJECTS[name],
            max_age=limits.max_age_s,
            max_bytes=limits.max_bytes,
            num_replicas=limits.replicas,
            duplicate_window=min(120.0, limits.max_age_s),
        )
        try:
            await self.js.add_stream(config)
        except BadRequestError:
            await self.js.update_stream(config)

    async def ensure_packet_stream(self, retention: PacketRetention) -> None:
        """The window of packet batches kept in memory (TRAWL_PACKETS): the collectors publish on
        core NATS with no ack (their hot path is unchanged) and the server keeps each batch for
        `retention`, so readers resume after a restart or a shard handover. Every service that
        reads or writes packets ensures it, so it exists whichever starts first (and again
        after a restart of a NATS server, which loses in-memory streams)."""
        config = StreamConfig(
            name=STREAM_PACKETS,
            subjects=STREAM_SUBJECTS[STREAM_PACKETS],
            storage=StorageType.MEMORY if retention.storage == "memory" else StorageType.FILE,
            max_age=retention.max_age_s,
            max_bytes=retention.max_bytes,
            num_replicas=retention.replicas,
        )
        try:
            try:
                await self.js.add_stream(config)
            except BadRequestError:
                await self.js.update_stream(config)
        except APIError as exc:
            if isinstance(exc, ServiceUnavailableError):
                raise  # JetStream is starting (or off): a caller may try again
            raise ConfigError(
                f"NATS refused the packet stream {STREAM_PACKETS} ({exc.description or exc}): lower "
                f"packet_retention.max_bytes ({retention.max_bytes}) below the server's JetStream "
                f"max_{retention.storage}_store, or free the subjects {STREAM_SUBJECTS[STREAM_PACKETS][0]} "
                "from another stream"
            ) from None

    async def ensure_counters_stream(self) -> None:
        """TRAWL_COUNTERS: the last counters snapshot of each service and node (memory, one
        message per subject, an hour at most: a service gone for longer is no longer exported)."""
        config = StreamConfig(
            name=STREAM_COUNTERS,
            subjects=[COUNTERS_SUBJECTS],
            storage=StorageType.MEMORY,
            max_msgs_per_subject=1,
            max_age=COUNTERS_MAX_AGE_S,
        )
        try:
            await self.js.add_stream(config)
        except BadRequestError:
            await self.js.update_stream(config)

    async def pull(
        self, stream: str, durable: str, filter_subject: str | None = None, deliver_new: bool = False
    ) -> JetStreamContext.PullSubscription:
        """A durable pull consumer (created idempotently): the way services take JetStream work."""
        config = ConsumerConfig(
            durable_name=durable,
            ack_wait=30,
            max_ack_pending=10_000,
            deliver_policy=DeliverPolicy.NEW if deliver_new else DeliverPolicy.ALL,
            filter_subject=filter_subject,
        )
        pull = await self.js.pull_subscribe(
            filter_subject or STREAM_SUBJECTS[stream][0], durable=durable, stream=stream, config=config
        )
        self._pulls.append(pull)
        return pull

    async def subscribe(
        self,
        subject: str,
        handler: Callable[[Msg], Awaitable[None]],
        queue: str = "",
        pending_bytes: int = 256 * 1024 * 1024,
    ) -> Subscription:
        sub = await self.nc.subscribe(
            subject, queue=queue, cb=handler, pending_bytes_limit=pending_bytes, pending_msgs_limit=1_000_000
        )
        self._subscriptions.append(sub)
        return sub

    async def subscribe_batches(self, subject: str, handler: BatchHandler) -> Subscription:
        """A subscription whose messages reach `handler` as lists of (subject, payload), one
        call per read from the socket (see `_BatchingParser`); the handler runs on the
        connection's reading, so it must be quick and must not await."""

        async def one(msg: Msg) -> None:
            handler([(msg.subject.encode(), msg.data)])

        sub = await self.subscribe(subject, one)
        parser = self.nc._ps
        if isinstance(parser, _BatchingParser):
            parser.batch_handlers[sub._id] = handler
        return sub

    async def subscribe_reply_batches(self, subject: str, handler: ReplyBatchHandler) -> Subscription:
        """As `subscribe_batches`, with each message's reply subject and status code (what a pull
        consumer's deliveries need: the reply acks the message, a status ends the request)."""

        async def one(msg: Msg) -> None:
            status = (msg.headers or {}).get("Status", "")
            handler([(msg.reply.encode(), status.encode(), msg.data)])

        sub = await self.subscribe(subject, one)
        parser = self.nc._ps
        if isinstance(parser, _BatchingParser):
            parser.reply_handlers[sub._id] = handler
        return sub

    async def publish_raw(self, commands: bytes) -> None:
        """Client protocol commands built by the caller (HPUB...), into nats-py's outgoing
        buffer in one piece and flushed as nats-py's own publish does."""
        nc = self.nc
        if nc.is_closed:
            raise ConnectionClosedError
        await nc._send_command(commands)
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()

    async def publish(self, subject: str, payload: bytes, msg_id: str | None = None) -> None:
        """Core NATS publish (Nats-Msg-Id is set when given so a JetStream capture dedups)."""
        headers = {MSG_ID_HEADER: msg_id} if msg_id else None
        await self.nc.publish(subject, payload, headers=headers)

    async def publish_durable(self, subject: str, payload: bytes, msg_id: str) -> int:
        """JetStream publish with a synchronous ack; returns the stream sequence."""
        ack = await self.js.publish(subject, payload, headers={MSG_ID_HEADER: msg_id})
        return int(ack.seq)

    async def publish_durable_async(self, subject: str, payload: bytes, msg_id: str) -> asyncio.Future[PubAck]:
        """JetStream publish whose ack is awaited later (see `flush_durable`)."""
        return await self.js.publish_async(subject, payload, headers={MSG_ID_HEADER: msg_id})

    async def flush_durable(self) -> None:
        """Wait until every async JetStream publish has its ack."""
        if self.js.publish_async_pending():
            await self.js.publish_async_completed()

    async def close(self) -> None:
        """Drain: finish in-flight handlers, flush what was published, then close."""
        if self.nc.is_closed:
            return
        try:
            # A pull subscription has no in-flight handler to finish, and nats-py's drain would
            # wait its whole drain timeout on one: close those first.
            for pull in self._pulls:
                with contextlib.suppress(Exception):
                    await pull.unsubscribe()
            await self.flush_durable()
            await self.nc.drain()
        except Exception as exc:
            log.warning("nats_drain_failed", error=str(exc))
            # The server may be gone already: closing is then only local bookkeeping.
            with contextlib.suppress(Exception):
                await self.nc.close()
