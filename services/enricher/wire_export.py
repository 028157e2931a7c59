"""Export of the compiled span path's requests (wire_spans.py): OTLP/gRPC or OTLP/HTTP protobuf
of bytes already encoded, with what the SDK's exporters and batch processor give.

`WireSpanExport` queues through batching.CountingBatcher, as otlp.CountingBatchSpanProcessor
does (the batcher owns the queue, its bound, the batching thread, the drop counting and the
flush; a sender only sends), so both paths count alike in the same counters (span_totals.py):
every span handed over ends exported, dropped (`queue_full`, `shutdown`) or failed. What it
queues are encoded requests, not spans: a
batch is the requests of up to `max_batch_spans` spans joined (protobuf concatenation of
ExportTraceServiceRequests appends their resource_spans), sent when it is full or every
`schedule_delay_s`. The queue is bounded in spans; a request that does not fit is dropped
whole and counted.

Sending (`GrpcSender`, `HttpSender`): gzip when asked; retries with exponential backoff and
jitter (`initial_backoff_s` doubling up to `max_backoff_s`, times 0.8-1.2) within
`export_timeout_s` per batch, on the retryable gRPC codes (CANCELLED, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED, ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS) and HTTP 429/502/503/504 or
a connection that failed, waiting what the server asked for when it did (gRPC `RetryInfo` in
the status details, HTTP `Retry-After` in seconds or as a date); each retry is counted
(`trawl_enricher_span_export_retries_total`). A partial success's `rejected_spans` are counted
as failed, the rest of the batch as exported. Shutdown stops a backoff at once.

`WireExportOptions.from_settings` reads the EnricherSettings' endpoint, protocol and headers,
and the `OTEL_EXPORTER_OTLP_[TRACES_]*` variables the settings do not cover: TIMEOUT
(milliseconds), COMPRESSION (gzip, none), CERTIFICATE, CLIENT_KEY, CLIENT_CERTIFICATE,
INSECURE, HEADERS and PROTOCOL of the traces signal (a signal's variable wins over the general one).
"""

from __future__ import annotations

import email.utils
import gzip
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from trawl.enricher.batching import CountingBatcher, Sent
from trawl.enricher.config import EnricherSettings, OtlpProtocol, parse_otlp_headers
from trawl.enricher.span_totals import SpanCounters, SpanTotals
from trawl.enricher.wire_spans import EncodedSpans
from trawl.errors import ConfigError
from trawl.logs import get_logger
from trawl.metrics import Registry

log = get_logger(__name__)

TRACE_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RETRYABLE_HTTP_STATUSES = frozenset({429, 502, 503, 504})
RETRIES = ("trawl_enricher_span_export_retries_total", "Span export attempts retried (backend unavailable or busy)")


@dataclass(frozen=True)
class WireExportOptions:
    """Where and how the traces go (OTLP exporter conventions)."""

    endpoint: str
    protocol: OtlpProtocol = "grpc"
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    compression: str = "none"  # "gzip" or "none"
    certificate: Path | None = None  # CA bundle the server's certificate is checked against
    client_key: Path | None = None
    client_certificate: Path | None = None
    insecure: bool = True  # gRPC: plaintext (True) or TLS

    @classmethod
    def from_settings(cls, settings: EnricherSettings, environ: Mapping[str, str]) -> WireExportOptions | None:
        """None when no traces endpoint is configured; ConfigError for a bad variable."""
        target = settings.traces_target()
        if target is None:
            return None

        def env(name: str) -> str:
            """OTEL_EXPORTER_OTLP_TRACES_<name>, else OTEL_EXPORTER_OTLP_<name>."""
            return (
                environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or environ.get(f"OTEL_EXPORTER_OTLP_{name}") or ""
            ).strip()

        protocol: OtlpProtocol = settings.protocol
        signal_protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        # The settings' protocol is the configured one, or the general variable's (their validator
        # fills it in): the traces variable wins over the general variable, not over a configured value.
        from_general = (
            "http/protobuf" if environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip() == "http/protobuf" else "grpc"
        )
        if signal_protocol and protocol == from_general:
            if signal_protocol not in ("grpc", "http/protobuf"):
                raise ConfigError(
                    f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: expected grpc or http/protobuf, got {signal_protocol!r}"
                )
            protocol = "http/protobuf" if signal_protocol == "http/protobuf" else "grpc"
        headers = settings.headers
        signal_headers = environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "")
        if signal_headers.strip():
            headers.update(parse_otlp_headers(signal_headers, "OTEL_EXPORTER_OTLP_TRACES_HEADERS"))
        timeout_s = settings.otlp_timeout_s
        if "otlp_timeout_s" not in settings.model_fields_set and env("TIMEOUT"):
            try:
                timeout_s = float(env("TIMEOUT")) / 1000
            except ValueError:
                timeout_s = 0
            if timeout_s <= 0:
                raise ConfigError(f"OTEL_EXPORTER_OTLP_TIMEOUT: expected milliseconds > 0, got {env('TIMEOUT')!r}")
        compression = env("COMPRESSION").lower() or "none"
        if compression not in ("gzip", "none"):
            raise ConfigError(f"OTEL_EXPORTER_OTLP_COMPRESSION: expected gzip or none, got {compression!r}")
        files = {}
        for name in ("CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE"):
            value = env(name)
            if value and not Path(value).is_file():
                raise ConfigError(f"OTEL_EXPORTER_OTLP_{name}: {value} is not a readable file")
            files[name] = Path(value) if value else None
        if (files["CLIENT_KEY"] is None) != (files["CLIENT_CERTIFICATE"] is None):
            raise ConfigError("OTEL_EXPORTER_OTLP_CLIENT_KEY and _CLIENT_CERTIFICATE go together (mutual TLS)")
        endpoint = target.http_url("traces") if protocol == "http/protobuf" else target.endpoint
        insecure = settings.grpc_insecure(target.endpoint)
        if settings.otlp_insecure is None and env("INSECURE"):
            insecure = env("INSECURE").lower() == "true"
        if files["CERTIFICATE"] is not None and settings.otlp_insecure is None and not env("INSECURE"):
            insecure = False  # a CA bundle given for gRPC means TLS
        return cls(
            endpoint=endpoint,
            protocol=protocol,
            headers=headers,
            timeout_s=timeout_s,
            compression=compression,
            certificate=files["CERTIFICATE"],
            client_key=files["CLIENT_KEY"],
            client_certificate=files["CLIENT_CERTIFICATE"],
            insecure=insecure,
        )


@dataclass(frozen=True)
class Attempt:
    """One send's result: accepted (with how many spans a partial success rejected), or not,
    and then whether it may be retried and after how long the server asked for (None: ours)."""

    accepted: bool
    rejected: int = 0
    message: str = ""
    retryable: bool = False
    retry_after_s: float | None = None


class Sender(Protocol):
    def send(self, body: bytes, timeout_s: float) -> Attempt: ...

    def close(self) -> None: ...


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


class GrpcSender:
    """TraceService/Export with the request's bytes as they are (no message object)."""

    def __init__(self, options: WireExportOptions) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        self._grpc = grpc
        parts = urlsplit(options.endpoint)
        target = parts.netloc if parts.scheme in ("http", "https") and parts.netloc else options.endpoint
        compression = grpc.Compression.Gzip if options.compression == "gzip" else grpc.Compression.NoCompression
        # gRPC's reconnect backoff grows to 120 s by default: a backend that comes back would be
        # found only that late, while the batches' retries run out. 5 s at most.
        channel_options = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 5000)]
        if options.insecure:
            self._channel = grpc.insecure_channel(target, options=channel_options, compression=compression)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(options.certificate),
                private_key=_read(options.client_key),
                certificate_chain=_read(options.client_certificate),
            )
            self._channel = grpc.secure_channel(target, credentials, options=channel_options, compression=compression)
        self._export = self._channel.unary_unary(
            TRACE_EXPORT_METHOD, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString
        )
        self._metadata = tuple((key.lower(), value) for key, value in options.headers.items())
        self._retryable = {
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.OUT_OF_RANGE,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DATA_LOSS,
        }

    def send(self, body: bytes, timeout_s: float) -> Attempt:
        try:
            response = self._export(body, timeout=timeout_s, metadata=self._metadata)
        except self._grpc.RpcError as error:
            code = error.code()
            return Attempt(
                False,
                message=f"{code.name}: {error.details()}",
                retryable=code in self._retryable,
                retry_after_s=_retry_info(error),
            )
        except ValueError as error:  # a closed channel (shutdown)
            return Attempt(False, message=repr(error))
        partial = response.partial_success
        return Attempt(True, rejected=partial.rejected_spans, message=partial.error_message)

    def close(self) -> None:
        self._channel.close()


def _retry_info(error: object) -> float | None:
    """The delay of a google.rpc.RetryInfo in the status details (grpc-status-details-bin)."""
    from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

    trailers = getattr(error, "trailing_metadata", lambda: None)() or ()
    for key, value in trailers:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # a damaged detail: no delay asked for
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return max(0.0, float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9))
    return None


class HttpSender:
    """POST of the protobuf body to the traces URL (one kept-alive connection)."""

    def __init__(self, options: WireExportOptions) -> None:
        import requests

        self._requests = requests
        self._session = requests.Session()
        self._url = options.endpoint
        self._gzip = options.compression == "gzip"
        self._headers = {**options.headers, "Content-Type": "application/x-protobuf"}
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._verify: bool | str = str(options.certificate) if options.certificate else True
        self._cert = (
            (str(options.client_certificate), str(options.client_key))
            if options.client_certificate and options.client_key
            else None
        )

    def send(self, body: bytes, timeout_s: float) -> Attempt:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        # Level 1: the batch leaves in a few ms instead of tens (level 9 gains little on spans).
        data = gzip.compress(body, compresslevel=1) if self._gzip else body
        try:
            response = self._session.post(
                self._url, data=data, headers=self._headers, timeout=timeout_s, verify=self._verify, cert=self._cert
            )
        except self._requests.RequestException as error:
            # No answer (refused, reset, timed out): the backend may come back.
            return Attempt(False, message=repr(error), retryable=True)
        if response.status_code == 200:
            rejected, message = 0, ""
            try:
                partial = ExportTraceServiceResponse.FromString(response.content).partial_success
                rejected, message = partial.rejected_spans, partial.error_message
            except Exception:  # a 200 whose body is not a response: accepted all the same
                log.debug("span_export_response_unreadable", bytes=len(response.content))
            return Attempt(True, rejected=rejected, message=message)
        return Attempt(
            False,
            message=f"HTTP {response.status_code}",
            retryable=response.status_code in RETRYABLE_HTTP_STATUSES,
            retry_after_s=_retry_after(response.headers.get("Retry-After", "")),
        )

    def close(self) -> None:
        self._session.close()


def _retry_after(value: str) -> float | None:
    """Retry-After: delay-seconds or an HTTP-date; None when absent or unreadable."""
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def sender_for(options: WireExportOptions) -> Sender:
    return HttpSender(options) if options.protocol == "http/protobuf" else GrpcSender(options)


class WireSpanExport:
    """Encoded requests queued and batched by batching.CountingBatcher (bounded in spans; a
    request that does not fit is dropped and its spans counted as `queue_full`), a batch being
    the requests of up to `max_batch_spans` spans joined, sent with retries (`_send`) within
    `export_timeout_s`. `shutdown` sends what is queued within `shutdown_timeout_s`, then
    closes the sender (ending a send or a backoff in progress) and counts what is left."""

    def __init__(
        self,
        sender: Sender,
        counters: SpanCounters,
        registry: Registry,
        *,
        max_queue_spans: int,
        max_batch_spans: int,
        schedule_delay_s: float,
        export_timeout_s: float,
        shutdown_timeout_s: float,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 32.0,
        jitter: Callable[[], float] = random.random,
        wait_for_room: bool = False,
    ) -> None:
        if export_timeout_s <= 0:
            raise ValueError("the export timeout must be positive")
        self.sender = sender
        self.counters = counters
        self.retries = registry.counter(*RETRIES)
        self.retries.inc(0)
        self.export_timeout_s = export_timeout_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self._jitter = jitter
        self.batcher: CountingBatcher[EncodedSpans] = CountingBatcher(
            self._send_batch,
            sender.close,
            counters,
            weight=_spans_of,
            max_queue_spans=max_queue_spans,
            max_batch_spans=max_batch_spans,
            schedule_delay_s=schedule_delay_s,
            shutdown_timeout_s=shutdown_timeout_s,
            wait_for_room=wait_for_room,
            wait_timeout_s=export_timeout_s,
            thread_name="trawl-wire-span-export",
        )

    def hand_over(self, parts: Sequence[EncodedSpans]) -> None:
        """Queue encoded requests (one lock for all). Never blocks on the network, unless
        `wait_for_room`: then a request that does not fit waits for room while batches are
        being accepted (at most one export timeout); when the backend fails it is dropped."""
        self.batcher.hand_over(parts)

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Send every queued span now, in the caller's thread; False when time ran out with
        spans still queued, or a batch failed."""
        return self.batcher.force_flush(timeout_s)

    def shutdown(self) -> None:
        self.batcher.shutdown()

    def totals(self) -> SpanTotals:
        return self.batcher.totals()

    def _send_batch(self, parts: list[EncodedSpans], count: int) -> Sent:
        # ExportTraceServiceRequests concatenated are one request (their resource_spans append).
        body = parts[0].request if len(parts) == 1 else b"".join(part.request for part in parts)
        attempt = self._send(body)
        if not attempt.accepted:
            return Sent(0, count, attempt.message)
        rejected = min(count, attempt.rejected)
        return Sent(count - rejected, rejected, attempt.message)

    def _send(self, body: bytes) -> Attempt:
        deadline = time.monotonic() + self.export_timeout_s
        cut = self.batcher.cut
        retry = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Attempt(False, message="export timeout")
            attempt = self.sender.send(body, remaining)
            if attempt.accepted or not attempt.retryable or cut.is_set():
                return attempt
            backoff = min(self.max_backoff_s, self.initial_backoff_s * 2**retry) * (0.8 + 0.4 * self._jitter())
            delay = attempt.retry_after_s if attempt.retry_after_s is not None else backoff
            if time.monotonic() + delay >= deadline:
                return attempt  # the next try would start after the batch's time is up
            self.retries.inc()
            if cut.wait(delay):
                return attempt
            retry += 1


def _spans_of(part: EncodedSpans) -> int:
    return part.spans


def wire_span_export(
    options: WireExportOptions, settings: EnricherSettings, metrics: Registry, *, wait_for_room: bool = False
) -> WireSpanExport:
    """The compiled path's export for the enricher's settings (queue, batch and delay as the SDK path's)."""
    return WireSpanExport(
        sender_for(options),
        SpanCounters.of(metrics),
        metrics,
        max_queue_spans=settings.export_max_queue_size,
        max_batch_spans=settings.export_max_batch_size,
        schedule_delay_s=settings.export_schedule_delay_ms / 1000,
        export_timeout_s=options.timeout_s,
        shutdown_timeout_s=min(options.timeout_s, 5.0),
        wait_for_room=wait_for_room,
    )


class WireSpanPath:
    """The whole compiled span path behind one object: enriched calls as bytes are encoded
    (wire_spans.WireSpanEncoder, requests of at most a batch) and handed to `WireSpanExport`.
    A call that does not parse gives no span and is counted in the enricher's
    `trawl_enricher_call_failures_total{stage="export"}`, as the SDK path counts a call whose
    spans could not be built."""

    def __init__(
        self, options: WireExportOptions, settings: EnricherSettings, metrics: Registry, *, wait_for_room: bool = False
    ) -> None:
        from trawl.enricher.wire_spans import WireSpanEncoder

        # A request never holds more than a batch, nor more than the queue can take.
        self.encoder = WireSpanEncoder(
            max_spans=max(2, min(settings.export_max_batch_size, settings.export_max_queue_size))
        )
        self.export = wire_span_export(options, settings, metrics, wait_for_room=wait_for_room)
        self._failures = metrics.counter(
            "trawl_enricher_call_failures_total", "Calls that could not be enriched or turned into spans, by stage"
        )

    @classmethod
    def from_settings(
        cls, settings: EnricherSettings, metrics: Registry, environ: Mapping[str, str], *, wait_for_room: bool = False
    ) -> WireSpanPath | None:
        """None when no traces endpoint is configured or the encoder is not compiled."""
        from trawl.enricher.wire_spans import available

        options = WireExportOptions.from_settings(settings, environ)
        if options is None or not available():
            return None
        return cls(options, settings, metrics, wait_for_room=wait_for_room)

    def hand_over_calls(self, calls: Sequence[bytes]) -> None:
        """Encode and queue the spans of enriched calls; returns without waiting for the network."""
        if not calls:
            return
        try:
            parts = self.encoder.encode(calls)
        except Exception as exc:  # a bug on the compiled side must not stop the stream: counted
            self._failures.inc(len(calls), stage="export")
            log.warning("span_encode_raised", calls=len(calls), error=repr(exc))
            return
        unreadable = sum(len(part.unreadable) for part in parts)
        if unreadable:
            self._failures.inc(unreadable, stage="export")
            log.warning("span_encode_failed", calls=unreadable)
        self.export.hand_over(parts)

    def flush(self, timeout_s: float) -> bool:
        return self.export.force_flush(timeout_s)

    def shutdown(self) -> None:
        """After it, every span handed over is counted exported, dropped or failed."""
        self.export.shutdown()
