"""The compiled path's export (services/enricher/wire_export.py) against real OTLP receivers over
real sockets: a gRPC TraceService built from opentelemetry-proto's stubs and an OTLP/HTTP server
(ThreadingHTTPServer decoding protobuf bodies), each answering as a test scripts it: accept,
partial success, UNAVAILABLE, RESOURCE_EXHAUSTED with RetryInfo, HTTP 503 with Retry-After,
slow answers, or nobody listening at all (down at start, going away, coming back). Whatever
happens, after shutdown every span handed over is exported, dropped or failed, and exported is
what the receiver holds."""

from __future__ import annotations

import gzip
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.any_pb2 import Any as AnyMessage
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from trawl.embedded import free_port
from trawl.enricher.config import EnricherSettings
from trawl.enricher.span_totals import SpanCounters, SpanTotals
from trawl.enricher.wire_export import (
    RETRIES,
    GrpcSender,
    HttpSender,
    WireExportOptions,
    WireSpanExport,
    WireSpanPath,
    _retry_after,
)
from trawl.enricher.wire_spans import EncodedSpans, WireSpanEncoder
from trawl.errors import ConfigError
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall

Request = trace_service_pb2.ExportTraceServiceRequest


@dataclass
class Answer:
    """What the receiver does with one export: `status` (a gRPC code name or an HTTP status) is
    an error answer, `rejected` a partial success; `delay_s` is waited first."""

    status: str | int | None = None
    retry_after_s: float | None = None
    rejected: int = 0
    delay_s: float = 0.0


@dataclass
class Script:
    answers: list[Answer] = field(default_factory=list)  # in order; then `default`
    default: Answer = field(default_factory=Answer)
    accepted: list[Request] = field(default_factory=list)
    attempts: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next(self) -> Answer:
        with self.lock:
            self.attempts += 1
            return self.answers.pop(0) if self.answers else self.default

    def spans(self) -> int:
        with self.lock:
            return sum(
                len(s.spans) for request in self.accepted for rs in request.resource_spans for s in rs.scope_spans
            )


class GrpcReceiver:
    def __init__(self, script: Script, port: int = 0, credentials: grpc.ServerCredentials | None = None) -> None:
        self.script = script
        outer = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Request, context: grpc.ServicerContext) -> Any:
                answer = outer.script.next()
                time.sleep(answer.delay_s)
                with outer.script.lock:
                    outer.script.headers.append(dict(context.invocation_metadata()))
                if isinstance(answer.status, str):
                    code = grpc.StatusCode[answer.status]
                    if answer.retry_after_s is not None:
                        info = error_details_pb2.RetryInfo()
                        info.retry_delay.FromNanoseconds(int(answer.retry_after_s * 1e9))
                        detail = AnyMessage()
                        detail.Pack(info)
                        status = status_pb2.Status(code=code.value[0], message="busy", details=[detail])
                        context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
                    context.abort(code, "scripted")
                response = trace_service_pb2.ExportTraceServiceResponse()
                with outer.script.lock:
                    outer.script.accepted.append(request)
                if answer.rejected:
                    response.partial_success.rejected_spans = answer.rejected
                    response.partial_success.error_message = "some spans refused"
                return response

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        address = f"127.0.0.1:{port}"
        self.port = (
            self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        )
        self.server.start()
        self.endpoint = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None).wait()


class HttpReceiver:
    def __init__(self, script: Script) -> None:
        outer_script = script

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                answer = outer_script.next()
                time.sleep(answer.delay_s)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {key.lower(): value for key, value in self.headers.items()}
                with outer_script.lock:
                    outer_script.headers.append(headers)
                if isinstance(answer.status, int):
                    self.send_response(answer.status)
                    if answer.retry_after_s is not None:
                        self.send_header("Retry-After", str(int(answer.retry_after_s)))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                request = Request.FromString(body)
                response = trace_service_pb2.ExportTraceServiceResponse()
                if answer.rejected:
                    response.partial_success.rejected_spans = answer.rejected
                with outer_script.lock:
                    outer_script.accepted.append(request)
                payload = response.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def encoded(calls: int, per_request: int = 32, offset: int = 0) -> list[EncodedSpans]:
    batch = []
    for index in range(calls):
        call = ApiCall(id=f"call-{offset + index}", protocol="http", transport="tcp", method="GET", path="/x")
        call.src.ip, call.dst.ip, call.dst.port = "10.0.0.1", "10.0.0.2", 80
        call.request.ts = 1_700_000_000_000_000_000 + index
        batch.append(call.SerializeToString())
    return WireSpanEncoder(max_spans=per_request).encode(batch)


def export(sender: Any, registry: Registry, **overrides: Any) -> WireSpanExport:
    options: dict[str, Any] = {
        "max_queue_spans": 4096,
        "max_batch_spans": 64,
        "schedule_delay_s": 0.05,
        "export_timeout_s": 5.0,
        "shutdown_timeout_s": 5.0,
        "initial_backoff_s": 0.05,
        "max_backoff_s": 0.2,
    }
    options.update(overrides)
    return WireSpanExport(sender, SpanCounters.of(registry), registry, **options)


def settled(processor: WireSpanExport) -> SpanTotals:
    processor.shutdown()
    totals = processor.totals()
    assert totals.unaccounted == 0, totals
    return totals


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def grpc_receiver(script: Script) -> Iterator[GrpcReceiver]:
    receiver = GrpcReceiver(script)
    yield receiver
    receiver.stop()


@pytest.fixture
def http_receiver(script: Script) -> Iterator[HttpReceiver]:
    receiver = HttpReceiver(script)
    yield receiver
    receiver.stop()


def test_grpc_batches_by_size_with_headers_and_gzip(grpc_receiver: GrpcReceiver, script: Script) -> None:
    registry = Registry()
    options = WireExportOptions(grpc_receiver.endpoint, headers={"X-Tenant": "a"}, compression="gzip")
    processor = export(GrpcSender(options), registry)
    parts = encoded(500)
    processor.hand_over(parts)
    totals = settled(processor)
    assert totals == SpanTotals(handed=1000, exported=1000)
    assert script.spans() == 1000
    assert all(len(request.resource_spans) >= 1 for request in script.accepted)
    # Batches of at most 64 spans: requests of 32 spans joined two at a time.
    sizes = [sum(len(s.spans) for rs in r.resource_spans for s in rs.scope_spans) for r in script.accepted]
    assert max(sizes) == 64 and sum(sizes) == 1000
    assert all(headers.get("x-tenant") == "a" for headers in script.headers)
    ids = {s.span_id for r in script.accepted for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans}
    assert len(ids) == 1000


def test_http_protobuf_with_gzip_and_headers(http_receiver: HttpReceiver, script: Script) -> None:
    registry = Registry()
    options = WireExportOptions(
        http_receiver.url, protocol="http/protobuf", headers={"authorization": "t"}, compression="gzip"
    )
    processor = export(HttpSender(options), registry)
    processor.hand_over(encoded(100))
    assert settled(processor) == SpanTotals(handed=200, exported=200)
    assert script.spans() == 200
    assert {h.get("content-encoding") for h in script.headers} == {"gzip"}
    assert {h.get("authorization") for h in script.headers} == {"t"}


def test_batching_by_delay_sends_a_partial_batch(grpc_receiver: GrpcReceiver, script: Script) -> None:
    """Fewer spans than a batch still leave once the delay passed, without a flush or shutdown."""
    processor = export(GrpcSender(WireExportOptions(grpc_receiver.endpoint)), Registry(), max_batch_spans=512)
    processor.hand_over(encoded(3))
    deadline = time.monotonic() + 10
    while script.spans() < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert script.spans() == 6
    assert settled(processor).exported == 6


def test_unavailable_is_retried_with_backoff(grpc_receiver: GrpcReceiver, script: Script) -> None:
    script.answers = [Answer(status="UNAVAILABLE"), Answer(status="UNAVAILABLE")]
    registry = Registry()
    processor = export(GrpcSender(WireExportOptions(grpc_receiver.endpoint)), registry, max_batch_spans=512)
    processor.hand_over(encoded(10))
    assert settled(processor) == SpanTotals(handed=20, exported=20)
    assert registry.counter(*RETRIES).get() == 2
    assert script.attempts == 3


def test_resource_exhausted_waits_what_retry_info_asks(grpc_receiver: GrpcReceiver, script: Script) -> None:
    """Our own backoff (20 s) would not fit the export's 5 s: only RetryInfo's 0.2 s makes the
    retry happen, so the spans arrive only if RetryInfo was read."""
    script.answers = [Answer(status="RESOURCE_EXHAUSTED", retry_after_s=0.2)]
    registry = Registry()
    processor = export(
        GrpcSender(WireExportOptions(grpc_receiver.endpoint)), registry, initial_backoff_s=20.0, max_backoff_s=20.0
    )
    processor.hand_over(encoded(10))
    assert settled(processor) == SpanTotals(handed=20, exported=20)
    assert registry.counter(*RETRIES).get() == 1


def test_without_retry_info_a_long_backoff_gives_the_batch_up(grpc_receiver: GrpcReceiver, script: Script) -> None:
    script.answers = [Answer(status="RESOURCE_EXHAUSTED")]
    processor = export(
        GrpcSender(WireExportOptions(grpc_receiver.endpoint)), Registry(), initial_backoff_s=20.0, max_backoff_s=20.0
    )
    processor.hand_over(encoded(10))
    assert settled(processor) == SpanTotals(handed=20, failed=20)
    assert script.attempts == 1


def test_a_non_retryable_code_fails_at_once(grpc_receiver: GrpcReceiver, script: Script) -> None:
    script.default = Answer(status="INVALID_ARGUMENT")
    registry = Registry()
    processor = export(GrpcSender(WireExportOptions(grpc_receiver.endpoint)), registry, max_batch_spans=512)
    processor.hand_over(encoded(10))
    assert settled(processor) == SpanTotals(handed=20, failed=20)
    assert script.attempts == 1
    assert registry.counter(*RETRIES).get() == 0


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_partial_success_counts_the_rejected_spans_as_failed(
    grpc_receiver: GrpcReceiver, http_receiver: HttpReceiver, script: Script, protocol: str
) -> None:
    script.answers = [Answer(rejected=3)]
    sender: Any = (
        GrpcSender(WireExportOptions(grpc_receiver.endpoint))
        if protocol == "grpc"
        else HttpSender(WireExportOptions(http_receiver.url, protocol="http/protobuf"))
    )
    processor = export(sender, Registry(), max_batch_spans=512)
    processor.hand_over(encoded(10))
    assert settled(processor) == SpanTotals(handed=20, exported=17, failed=3)


def test_http_503_honours_retry_after_and_429_backs_off(http_receiver: HttpReceiver, script: Script) -> None:
    script.answers = [Answer(status=503, retry_after_s=1), Answer(status=429), Answer(status=502)]
    registry = Registry()
    options = WireExportOptions(http_receiver.url, protocol="http/protobuf")
    # The backoff of our own (0.05 s doubling) for 429 and 502; Retry-After's 1 s for the 503.
    processor = export(HttpSender(options), registry, max_batch_spans=512)
    processor.hand_over(encoded(10))
    assert settled(processor) == SpanTotals(handed=20, exported=20)
    assert registry.counter(*RETRIES).get() == 3


def test_http_400_is_not_retried(http_receiver: HttpReceiver, script: Script) -> None:
    script.default = Answer(status=400)
    processor = export(HttpSender(WireExportOptions(http_receiver.url, protocol="http/protobuf")), Registry())
    processor.hand_over(encoded(10))
    assert settled(processor) == SpanTotals(handed=20, failed=20)
    assert script.attempts == 1


def test_retry_after_forms() -> None:
    assert _retry_after("3") == 3.0
    assert _retry_after("") is None
    assert _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: at once
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 100))
    delay = _retry_after(later)
    assert delay is not None and 90 < delay <= 100


def test_backend_down_at_start_then_coming_back_and_going_away() -> None:
    """Nobody listens at first: the first batch's retries run out and it is counted failed;
    a receiver appears on that port and the next batches arrive; it goes away again and the
    last batch fails. Nothing blocks the hand-over meanwhile and everything adds up."""
    port = free_port()
    registry = Registry()
    processor = export(
        GrpcSender(WireExportOptions(f"127.0.0.1:{port}")), registry, export_timeout_s=1.0, max_batch_spans=512
    )
    processor.hand_over(encoded(10, offset=0))
    assert processor.force_flush(10) is False
    assert processor.totals().failed == 20
    script = Script()
    receiver = GrpcReceiver(script, port=port)
    try:
        processor.export_timeout_s = 10.0
        processor.hand_over(encoded(10, offset=100))
        assert processor.force_flush(15) is True
        assert script.spans() == 20
    finally:
        receiver.stop()
    processor.export_timeout_s = 1.0
    processor.hand_over(encoded(10, offset=200))
    totals = settled(processor)
    assert totals == SpanTotals(handed=60, exported=20, failed=40)
    assert registry.counter(*RETRIES).get() > 0


def test_a_slow_backend_fills_the_bounded_queue_and_drops_are_counted(script: Script) -> None:
    script.default = Answer(delay_s=0.5)
    receiver = GrpcReceiver(script)
    try:
        processor = export(
            GrpcSender(WireExportOptions(receiver.endpoint)), Registry(), max_queue_spans=256, max_batch_spans=64
        )
        started = time.monotonic()
        for index in range(50):
            processor.hand_over(encoded(32, offset=index * 32))
        handing_s = time.monotonic() - started
        # The queue never holds more than its bound, whatever was handed.
        assert processor.batcher.queued_spans() <= 256
        totals = settled(processor)
    finally:
        receiver.stop()
    assert totals.handed == 3200
    assert totals.dropped_queue_full > 0
    assert totals.exported == script.spans()
    assert totals.exported + totals.dropped + totals.failed == 3200
    # Handing over is queueing only: 50 hand-overs did not wait for 0.5 s answers.
    assert handing_s < 0.5 * 50


def test_shutdown_ends_a_backoff_and_counts_what_is_left(grpc_receiver: GrpcReceiver, script: Script) -> None:
    script.default = Answer(status="UNAVAILABLE")
    processor = export(
        GrpcSender(WireExportOptions(grpc_receiver.endpoint)),
        Registry(),
        export_timeout_s=60.0,
        shutdown_timeout_s=0.3,
        initial_backoff_s=30.0,
        max_backoff_s=30.0,
    )
    processor.hand_over(encoded(100))
    time.sleep(0.2)  # the worker is in its first backoff (30 s)
    started = time.monotonic()
    totals = settled(processor)
    assert time.monotonic() - started < 10  # not the 30 s backoff
    assert totals.handed == 200 and totals.exported == 0
    assert totals.failed + totals.dropped == 200


def test_options_from_the_otel_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    for key in [key for key in os.environ if key.startswith("OTEL_")]:
        monkeypatch.delenv(key)
    environ = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://collector:4318/custom/traces",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-tenant=a%20b",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca),
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    options = WireExportOptions.from_settings(EnricherSettings(), os.environ)
    assert options is not None
    assert options.endpoint == "https://collector:4318/custom/traces"  # a signal's endpoint is used as is
    assert options.protocol == "http/protobuf"
    assert options.headers == {"x-tenant": "a b"}
    assert options.timeout_s == 2.5
    assert options.compression == "gzip"
    assert options.certificate == ca
    assert options.insecure is False


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli", "gzip or none"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon", "milliseconds"),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem", "not a readable file"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift", "grpc or http/protobuf"),
    ],
)
def test_bad_variables_are_named(name: str, value: str, message: str) -> None:
    settings = EnricherSettings(otlp_endpoint="127.0.0.1:4317")
    with pytest.raises(ConfigError, match=message):
        WireExportOptions.from_settings(settings, {name: value})


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def test_grpc_over_mutual_tls_with_the_certificate_variables(tmp_path: Path, script: Script) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate made with openssl; the
    receiver requires the client's: spans arrive only when CERTIFICATE, CLIENT_KEY and
    CLIENT_CERTIFICATE are all used."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "ca.key"),
             "-out", str(tmp_path / "ca.pem"), "-days", "1", "-subj", "/CN=trawl-test-ca")  # fmt: skip
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / f"{name}.key"),
                 "-out", str(tmp_path / f"{name}.csr"), "-subj", f"/CN={name}")  # fmt: skip
        extensions = tmp_path / f"{name}.ext"
        extensions.write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", str(tmp_path / f"{name}.csr"), "-CA", str(tmp_path / "ca.pem"),
                 "-CAkey", str(tmp_path / "ca.key"), "-CAcreateserial", "-out", str(tmp_path / f"{name}.pem"),
                 "-days", "1", "-extfile", str(extensions))  # fmt: skip
    credentials = grpc.ssl_server_credentials(
        [((tmp_path / "server.key").read_bytes(), (tmp_path / "server.pem").read_bytes())],
        root_certificates=(tmp_path / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    receiver = GrpcReceiver(script, credentials=credentials)
    try:
        environ = {
            "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path / "ca.pem"),
            "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(tmp_path / "client.key"),
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(tmp_path / "client.pem"),
        }
        options = WireExportOptions.from_settings(EnricherSettings(otlp_endpoint=receiver.endpoint), environ)
        assert options is not None and options.insecure is False
        processor = export(GrpcSender(options), Registry())
        processor.hand_over(encoded(5))
        assert settled(processor) == SpanTotals(handed=10, exported=10)
        assert script.spans() == 10
        # Without the client certificate the server refuses the handshake: the batch fails.
        no_client = WireExportOptions(receiver.endpoint, certificate=tmp_path / "ca.pem", insecure=False)
        refused = export(GrpcSender(no_client), Registry(), export_timeout_s=1.0)
        refused.hand_over(encoded(5))
        assert settled(refused) == SpanTotals(handed=10, failed=10)
    finally:
        receiver.stop()


def test_a_file_reader_waits_for_a_slow_backend_instead_of_dropping(script: Script) -> None:
    """wait_for_room (trawl analyze): the same slow backend and small queue as above lose nothing."""
    script.default = Answer(delay_s=0.05)
    receiver = GrpcReceiver(script)
    try:
        processor = export(
            GrpcSender(WireExportOptions(receiver.endpoint)),
            Registry(),
            max_queue_spans=256,
            max_batch_spans=64,
            wait_for_room=True,
        )
        for index in range(30):
            processor.hand_over(encoded(32, offset=index * 32))
        totals = settled(processor)
    finally:
        receiver.stop()
    assert totals == SpanTotals(handed=1920, exported=1920)
    assert script.spans() == 1920


def test_a_file_reader_does_not_wait_for_a_backend_that_fails() -> None:
    """Nobody listening: the first batch fails after its retries, then the waiting hand-overs
    drop (counted) instead of waiting one export timeout each."""
    processor = export(
        GrpcSender(WireExportOptions(f"127.0.0.1:{free_port()}")),
        Registry(),
        max_queue_spans=64,
        max_batch_spans=64,
        export_timeout_s=1.0,
        wait_for_room=True,
    )
    started = time.monotonic()
    for index in range(40):
        processor.hand_over(encoded(32, offset=index * 32))
    handing_s = time.monotonic() - started
    totals = settled(processor)
    assert totals.handed == 2560 and totals.exported == 0
    assert totals.dropped_queue_full > 0 and totals.failed > 0
    assert handing_s < 40 * 1.0  # not one export timeout per hand-over


def test_the_path_counts_unreadable_calls_and_sends_the_others(grpc_receiver: GrpcReceiver, script: Script) -> None:
    """WireSpanPath: a call that does not parse is a call failure at the export stage; requests
    never exceed the queue (a queue smaller than the batch setting)."""
    settings = EnricherSettings(
        otlp_endpoint=grpc_receiver.endpoint, export_max_batch_size=512, export_max_queue_size=40
    )
    registry = Registry()
    path = WireSpanPath.from_settings(settings, registry, {}, wait_for_room=True)
    assert path is not None
    calls = []
    for index in range(60):
        call = ApiCall(id=f"c{index}", protocol="dns", method="A")
        call.request.ts = 1 + index
        calls.append(call.SerializeToString())
    calls.insert(7, b"\x0a\xff")
    path.hand_over_calls(calls[:30])
    assert path.flush(10)
    path.hand_over_calls(calls[30:])
    path.shutdown()
    failures = registry.counter("trawl_enricher_call_failures_total", "")
    assert failures.get(stage="export") == 1
    assert SpanCounters.of(registry).totals() == SpanTotals(handed=120, exported=120)
    assert script.spans() == 120
    sizes = [sum(len(s.spans) for rs in r.resource_spans for s in rs.scope_spans) for r in script.accepted]
    assert max(sizes) <= 40


def test_an_encoder_that_raises_costs_the_batch_counted_not_the_stream(grpc_receiver: GrpcReceiver) -> None:
    """The compiled encoder refusing a batch (here: it is not a sequence of bytes) is counted as
    call failures at the export stage; the next batch goes out."""
    registry = Registry()
    path = WireSpanPath.from_settings(EnricherSettings(otlp_endpoint=grpc_receiver.endpoint), registry, {})
    assert path is not None
    path.hand_over_calls(["not bytes"])  # type: ignore[list-item]
    call = ApiCall(id="c", protocol="dns", method="A")
    call.request.ts = 1
    path.hand_over_calls([call.SerializeToString()])
    path.shutdown()
    assert registry.counter("trawl_enricher_call_failures_total", "").get(stage="export") == 1
    assert SpanCounters.of(registry).totals() == SpanTotals(handed=2, exported=2)
