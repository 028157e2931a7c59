"""A real OTLP receiver for tests: gRPC (the collector's trace and metrics services, built from
opentelemetry-proto's stubs) and OTLP/HTTP (protobuf bodies on /v1/traces and /v1/metrics),
on free loopback ports. It keeps every export request and flattens spans and metrics with
their resource attributes for assertions.

    with OtlpReceiver() as receiver:
        exporter = OTLPSpanExporter(endpoint=receiver.grpc_endpoint, insecure=True)
        ...
        spans = receiver.wait_for_spans(2)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

AttributeMap = dict[str, Any]


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind is None:
        return None
    return getattr(value, kind)


def attributes(pairs: Any) -> AttributeMap:
    return {pair.key: any_value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


@dataclass
class ReceivedSpan:
    name: str
    kind: str  # "CLIENT", "SERVER", ...
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: AttributeMap
    resource: AttributeMap
    status_code: str  # "UNSET", "OK", "ERROR"
    status_message: str
    scope: str


@dataclass
class ReceivedPoint:
    metric: str
    unit: str
    resource: AttributeMap
    attributes: AttributeMap
    count: int
    total: float
    bounds: list[float] = field(default_factory=list)
    bucket_counts: list[int] = field(default_factory=list)


class OtlpReceiver:
    """gRPC on `grpc_endpoint` (host:port) and HTTP on `http_endpoint` (http://host:port).

    `trace_delay_s` makes every gRPC trace export take that long before it is answered: a slow
    endpoint, for tests of what the exporter does while it waits."""

    def __init__(self, trace_delay_s: float = 0.0) -> None:
        self.trace_delay_s = trace_delay_s
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.http_paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self._changed = threading.Condition()
        self._grpc_server: grpc.Server | None = None
        self._http_server: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self.grpc_endpoint = ""
        self.http_endpoint = ""

    def _store(self, request: Any, headers: dict[str, str]) -> None:
        with self._changed:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.trace_requests.append(request)
            else:
                self.metric_requests.append(request)
            self.headers.append(headers)
            self._changed.notify_all()

    def start(self) -> OtlpReceiver:
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(
                self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
            ) -> trace_service_pb2.ExportTraceServiceResponse:
                if receiver.trace_delay_s:
                    time.sleep(receiver.trace_delay_s)
                receiver._store(request, dict(context.invocation_metadata()))
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):  # type: ignore[misc]
            def Export(
                self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: grpc.ServicerContext
            ) -> metrics_service_pb2.ExportMetricsServiceResponse:
                receiver._store(request, dict(context.invocation_metadata()))
                return metrics_service_pb2.ExportMetricsServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._grpc_server = server
        self.grpc_endpoint = f"127.0.0.1:{port}"

        self._http_server = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(self._store, self.http_paths))
        self._http_thread = threading.Thread(target=self._http_server.serve_forever, name="otlp-http", daemon=True)
        self._http_thread.start()
        self.http_endpoint = f"http://127.0.0.1:{self._http_server.server_address[1]}"
        return self

    def stop(self) -> None:
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=None).wait()
            self._grpc_server = None
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            requests = list(self.trace_requests)
        found: list[ReceivedSpan] = []
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append(
                            ReceivedSpan(
                                name=span.name,
                                kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                start_ns=span.start_time_unix_nano,
                                end_ns=span.end_time_unix_nano,
                                attributes=attributes(span.attributes),
                                resource=resource,
                                status_code=Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
                                status_message=span.status.message,
                                scope=scope_spans.scope.name,
                            )
                        )
        return found

    def points(self) -> list[ReceivedPoint]:
        """Histogram data points of every metrics request (cumulative: the last request holds the totals)."""
        with self._changed:
            requests = list(self.metric_requests)
        found: list[ReceivedPoint] = []
        for request in requests:
            for resource_metrics in request.resource_metrics:
                resource = attributes(resource_metrics.resource.attributes)
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        if metric.WhichOneof("data") != "histogram":
                            continue
                        for point in metric.histogram.data_points:
                            found.append(
                                ReceivedPoint(
                                    metric=metric.name,
                                    unit=metric.unit,
                                    resource=resource,
                                    attributes=attributes(point.attributes),
                                    count=point.count,
                                    total=point.sum,
                                    bounds=list(point.explicit_bounds),
                                    bucket_counts=list(point.bucket_counts),
                                )
                            )
        return found

    def wait_for_spans(self, count: int, timeout_s: float = 10.0) -> list[ReceivedSpan]:
        """At least `count` spans, or AssertionError after `timeout_s`."""
        return self._wait(self.spans, count, timeout_s, "spans")

    def wait_for_points(self, count: int, timeout_s: float = 10.0) -> list[ReceivedPoint]:
        return self._wait(self.points, count, timeout_s, "histogram points")

    def _wait(self, read: Callable[[], list[Any]], count: int, timeout_s: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = read()
                remaining = deadline - time.monotonic()
                if len(found) >= count or remaining <= 0:
                    break
                self._changed.wait(remaining)
        assert len(found) >= count, f"expected {count} {what}, received {len(found)}"
        return found


def _http_handler(store: Callable[[Any, dict[str, str]], None], paths: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            request: Any
            if self.path == "/v1/traces":
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                response: Any = trace_service_pb2.ExportTraceServiceResponse()
            elif self.path == "/v1/metrics":
                request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                response = metrics_service_pb2.ExportMetricsServiceResponse()
            else:
                self.send_error(404)
                return
            paths.append(self.path)
            store(request, {key.lower(): value for key, value in self.headers.items()})
            payload = response.SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the test output is not the place for access logs."""

    return Handler
