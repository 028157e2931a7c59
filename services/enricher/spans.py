"""ApiCall -> a CLIENT span in the caller's service and a SERVER span in the callee's.

Spans are built directly as SDK `ReadableSpan`s, not through a Tracer, because every span
carries its own Resource: the caller's or the callee's service (`service.name`: the identity's
name, see identity.py), namespace and `k8s.*` attributes, while a Tracer is bound to one Resource.

Trace context. When the request carried W3C `traceparent` (ApiCall.trace_id and
ApiCall.parent_span_id = the header's span id, i.e. the span the calling application was in
when it sent the request), the pair joins that trace:

    application span (header span id)
      └── CLIENT span  (id derived from the call id)          resource = caller
            └── SERVER span (id derived from the call id)     resource = callee

The header's span id is the CLIENT span's parent and is never reused as one of our ids, so an
instrumented caller that also reports that span does not collide with ours. Without a header,
the trace id is derived from the call id. Both ways the ids are deterministic, so exporting
the same call twice yields the same spans (backends deduplicate them).

Names and attributes follow the current OpenTelemetry semantic conventions: HTTP (stable),
RPC (`rpc.system.name`, `rpc.method`, `rpc.response.status_code`), database
(`db.system.name=redis`), messaging (Kafka, RabbitMQ), DNS; protocols without conventions
(tcp, icmp, tls) get `"<protocol> <method>"` names and `trawl.*` attributes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

import trawl
from trawl.enricher.paths import NUMERIC as _NUMERIC
from trawl.enricher.paths import template_path
from trawl.v1.calls_pb2 import ApiCall, Endpoint, Outcome

SCOPE = InstrumentationScope("trawl.enricher", trawl.__version__)

# The methods semantic conventions know; anything else is reported as "_OTHER".
KNOWN_HTTP_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)
GRPC_CODES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
# gRPC codes that are a server fault (semconv: the rest are errors for the client only).
GRPC_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
WORKLOAD_KIND_ATTRIBUTES = {
    "Deployment": "k8s.deployment.name",
    "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name",
    "ReplicaSet": "k8s.replicaset.name",
    "Job": "k8s.job.name",
    "CronJob": "k8s.cronjob.name",
    "ReplicationController": "k8s.replicationcontroller.name",
}

_HEX = re.compile(r"[0-9a-fA-F]+")

Attributes = dict[str, AttributeValue]


@dataclass(frozen=True)
class SpanIds:
    trace_id: int
    client_span_id: int
    server_span_id: int
    # The span the CLIENT span hangs under: the traceparent's span id, or None for a root.
    client_parent_id: int | None


def _derived(call_id: str, purpose: str, size: int) -> int:
    value = int.from_bytes(hashlib.blake2b(f"{purpose}|{call_id}".encode(), digest_size=size).digest(), "big")
    return value or 1  # an all-zero id is invalid in OTLP


def _hex_id(text: str, size: int) -> int | None:
    """The id in a W3C header's hex digits; None unless exactly `size` bytes of them, not all zero
    (int(text, 16) alone would also take "0x", "_", signs and spaces)."""
    if len(text) != size * 2 or not _HEX.fullmatch(text):
        return None
    return int(text, 16) or None


def span_ids(call: ApiCall) -> SpanIds:
    """Deterministic ids for the call's two spans; joins the request's trace when it carried one."""
    client_span_id = _derived(call.id, "client", 8)
    server_span_id = _derived(call.id, "server", 8)
    trace_id = _hex_id(call.trace_id, 16)
    parent = _hex_id(call.parent_span_id, 8)
    if trace_id is None:
        return SpanIds(_derived(call.id, "trace", 16), client_span_id, server_span_id, None)
    return SpanIds(trace_id, client_span_id, server_span_id, parent)


def resource_for(endpoint: Endpoint) -> Resource:
    """The Resource of the service at one end of a call; unknown peers are their IP address."""
    return _resource(
        endpoint.name or endpoint.workload or endpoint.ip or "unknown",
        endpoint.namespace,
        endpoint.pod,
        endpoint.workload,
        endpoint.workload_kind,
        endpoint.node,
        endpoint.cluster,
        endpoint.ip,
    )


@lru_cache(maxsize=4096)
def _resource(
    service_name: str, namespace: str, pod: str, workload: str, workload_kind: str, node: str, cluster: str, ip: str
) -> Resource:
    attributes: Attributes = {"service.name": service_name}
    if namespace:
        attributes["service.namespace"] = namespace
        attributes["k8s.namespace.name"] = namespace
    if pod:
        attributes["k8s.pod.name"] = pod
        attributes["service.instance.id"] = f"{namespace}.{pod}" if namespace else pod
    elif ip:
        attributes["service.instance.id"] = ip
    if workload and workload_kind in WORKLOAD_KIND_ATTRIBUTES:
        attributes[WORKLOAD_KIND_ATTRIBUTES[workload_kind]] = workload
    if node:
        attributes["k8s.node.name"] = node
    if cluster:
        attributes["k8s.cluster.name"] = cluster
    return Resource(attributes)


@dataclass
class SpanShape:
    """What the protocol mapping decides: the name, per-side attributes and statuses."""

    name: str
    client: Attributes = field(default_factory=dict)
    server: Attributes = field(default_factory=dict)
    common: Attributes = field(default_factory=dict)
    client_error: str = ""
    server_error: str = ""
    # The calling side's kind: CLIENT, or PRODUCER / CONSUMER for messaging (the issue #10 rule:
    # a produce or publish is the producer's span, a fetch, get or delivery the consumer's).
    client_kind: SpanKind = SpanKind.CLIENT


def span_times(call: ApiCall) -> tuple[int, int]:
    """Start = first request byte; end = last response byte (or response start, or request end)."""
    start = call.request.ts
    candidates = (call.response.end_ts, call.response.ts, call.request.end_ts, start)
    end = next((value for value in candidates if value), start)
    return start, max(start, end)


def call_spans(call: ApiCall) -> tuple[ReadableSpan, ReadableSpan]:
    """The CLIENT and SERVER spans of one enriched call."""
    ids = span_ids(call)
    shape = shape_call(call)
    start, end = span_times(call)
    flags = TraceFlags(TraceFlags.SAMPLED)
    client_context = SpanContext(ids.trace_id, ids.client_span_id, is_remote=False, trace_flags=flags)
    server_context = SpanContext(ids.trace_id, ids.server_span_id, is_remote=False, trace_flags=flags)
    parent = (
        SpanContext(ids.trace_id, ids.client_parent_id, is_remote=True, trace_flags=flags)
        if ids.client_parent_id is not None
        else None
    )
    client = ReadableSpan(
        name=shape.name,
        context=client_context,
        parent=parent,
        resource=resource_for(call.src),
        attributes={**shape.common, **_peer_attributes(call, SpanKind.CLIENT), **shape.client},
        kind=shape.client_kind,
        status=_status(shape.client_error),
        start_time=start,
        end_time=end,
        instrumentation_scope=SCOPE,
    )
    server = ReadableSpan(
        name=shape.name,
        context=server_context,
        parent=client_context,
        resource=resource_for(call.dst),
        attributes={**shape.common, **_peer_attributes(call, SpanKind.SERVER), **shape.server},
        kind=SpanKind.SERVER,
        status=_status(shape.server_error),
        start_time=start,
        end_time=end,
        instrumentation_scope=SCOPE,
    )
    return client, server


def _status(error: str) -> Status:
    return Status(StatusCode.ERROR, error) if error else Status(StatusCode.UNSET)


def network_type(ip: str) -> str | None:
    """`network.type` of an address: ipv4, ipv6, or None when it is not an IP address."""
    try:
        return f"ipv{ipaddress.ip_address(ip).version}"
    except ValueError:
        return None


def _peer_attributes(call: ApiCall, kind: SpanKind) -> Attributes:
    """Who is on the other side, seen from this span's side."""
    attributes: Attributes = {}
    peer = call.dst if kind == SpanKind.CLIENT else call.src
    if peer.ip:
        attributes["network.peer.address"] = peer.ip
    if peer.port:
        attributes["network.peer.port"] = peer.port
    if call.dst.ip:
        attributes["server.address"] = call.dst.ip
    if call.dst.port:
        attributes["server.port"] = call.dst.port
    if kind == SpanKind.SERVER and call.src.ip:
        attributes["client.address"] = call.src.ip
        if call.src.port:
            attributes["client.port"] = call.src.port
    if call.transport:
        attributes["network.transport"] = call.transport
    kind_of_network = network_type(call.dst.ip)
    if kind_of_network:
        attributes["network.type"] = kind_of_network
    return attributes


def _trawl_attributes(call: ApiCall) -> Attributes:
    attributes: Attributes = {"trawl.call.id": call.id, "trawl.protocol": call.protocol}
    if call.node:
        attributes["trawl.node"] = call.node
    if call.capture:
        attributes["trawl.capture"] = call.capture
    if call.status:
        attributes["trawl.status"] = call.status
    if call.notes:
        attributes["trawl.notes"] = list(call.notes)
    if call.request.size:
        attributes["trawl.request.size"] = call.request.size
    if call.response.size:
        attributes["trawl.response.size"] = call.response.size
    return attributes


def shape_call(call: ApiCall) -> SpanShape:
    mapper = _MAPPERS.get(call.protocol, _generic)
    shape = mapper(call)
    shape.common = {**_trawl_attributes(call), **shape.common}
    if call.outcome == Outcome.OUTCOME_NO_RESPONSE:
        shape.client["error.type"] = shape.server["error.type"] = "no_response"
        shape.client_error = shape.server_error = "no response"
    elif call.outcome in GAVE_UP:
        # The client gave up (cancel) or ran out of time: a failure of the client's call; the
        # server side is in error only when its own status says so (set by the mapper).
        reason = GAVE_UP[call.outcome]
        shape.client.setdefault("error.type", reason)
        shape.client_error = shape.client_error or reason
    return shape


GAVE_UP = {Outcome.OUTCOME_CANCELLED: "cancelled", Outcome.OUTCOME_DEADLINE_EXCEEDED: "deadline_exceeded"}


def _status_int(text: str) -> int | None:
    return int(text) if len(text) < 10 and _NUMERIC.fullmatch(text) else None


def _ascii_upper(text: str) -> str:
    """Protocol tokens (HTTP methods, Redis commands) are ASCII: other text is left as it is
    (str.upper would turn the long s, U+017F, into "S")."""
    return text.upper() if text.isascii() else text


def _ascii_lower(text: str) -> str:
    return text.lower() if text.isascii() else text


def http_method(method: str) -> tuple[str, str | None]:
    """(http.request.method, http.request.method_original or None) per semconv."""
    upper = _ascii_upper(method)
    if upper in KNOWN_HTTP_METHODS and method == upper:
        return upper, None
    if upper in KNOWN_HTTP_METHODS:
        return upper, method
    return "_OTHER", method


def _http(call: ApiCall) -> SpanShape:
    detail = call.http
    method, original = http_method(call.method)
    path, _, query = call.path.partition("?")
    scheme = "https" if call.capture == "tls-uprobe" else "http"
    url_template = detail.route or template_path(path)
    name_method = "HTTP" if method == "_OTHER" else method
    shape = SpanShape(name=f"{name_method} {detail.route}" if detail.route else name_method)
    common: Attributes = {"http.request.method": method}
    if original:
        common["http.request.method_original"] = original
    status = _status_int(call.status)
    if status is not None:
        common["http.response.status_code"] = status
    version = detail.version or ("2" if call.protocol == "http2" else "")
    if version:
        common["network.protocol.name"] = "http"
        common["network.protocol.version"] = version.removeprefix("HTTP/")
    if detail.user_agent:
        common["user_agent.original"] = detail.user_agent
    if call.request.body_size:
        common["http.request.body.size"] = call.request.body_size
    if call.response.body_size:
        common["http.response.body.size"] = call.response.body_size
    host = detail.host or _host_of(call.dst)
    shape.client["url.full"] = f"{scheme}://{host}{call.path or '/'}"
    shape.client["url.template"] = url_template
    host_name, host_port = split_host(host)
    if host_name:
        # The name the client asked for (the Host header) is the server.address semconv wants.
        shape.client["server.address"] = shape.server["server.address"] = host_name
        if host_port:
            shape.client["server.port"] = shape.server["server.port"] = host_port
    shape.server["url.path"] = path or "/"
    shape.server["url.scheme"] = scheme
    if query:
        shape.server["url.query"] = query
    if detail.route:
        shape.server["http.route"] = detail.route
    if status is not None and status >= 400:
        shape.client["error.type"] = str(status)
        shape.client_error = f"HTTP {status}"
        if status >= 500:
            shape.server["error.type"] = str(status)
            shape.server_error = f"HTTP {status}"
    shape.common = common
    return shape


def _host_of(endpoint: Endpoint) -> str:
    host = f"[{endpoint.ip}]" if ":" in endpoint.ip else endpoint.ip
    return f"{host}:{endpoint.port}" if endpoint.port else host


def split_host(host: str) -> tuple[str, int | None]:
    """Host header -> (host name, port); ('', None) when it does not parse."""
    try:
        parts = urlsplit(f"//{host}")
        return parts.hostname or "", parts.port
    except ValueError:
        return "", None


def _graphql(call: ApiCall) -> SpanShape:
    shape = _http(call)
    operation_type = _ascii_lower(call.method)
    shape.name = f"{operation_type} {call.path}".strip() if call.path else (operation_type or "graphql")
    shape.common.pop("http.request.method", None)
    shape.common.pop("http.request.method_original", None)
    if operation_type:
        shape.common["graphql.operation.type"] = operation_type
    if call.path:
        shape.common["graphql.operation.name"] = call.path
    shape.client.pop("url.full", None)
    shape.client.pop("url.template", None)
    shape.server.pop("url.path", None)
    if call.HasField("graphql"):
        detail = call.graphql
        if detail.http_version:
            shape.common["network.protocol.name"] = "http"
            shape.common["network.protocol.version"] = detail.http_version
        target, _, query = detail.target.partition("?")
        if target:
            shape.server["url.path"] = target
        if query:
            shape.server["url.query"] = query
        if detail.persisted_query_hash:
            shape.common["trawl.graphql.persisted_query_hash"] = detail.persisted_query_hash
        if detail.operations > 1:
            shape.common["trawl.graphql.operations"] = detail.operations
        if detail.errors and not shape.client_error:
            # The errors array of a 200 answer: the operation failed, as the call's outcome says.
            shape.client["error.type"] = shape.server["error.type"] = "graphql_error"
            shape.client_error = shape.server_error = detail.first_error or "GraphQL error"
    return shape


def grpc_code_name(call: ApiCall) -> str:
    status = call.grpc.status_code if call.HasField("grpc") else _status_int(call.status)
    if status is None:
        return ""
    return GRPC_CODES[status] if 0 <= status < len(GRPC_CODES) else str(status)


def _grpc(call: ApiCall) -> SpanShape:
    method = call.path.lstrip("/")
    shape = SpanShape(name=method or "grpc", common={"rpc.system.name": "grpc"})
    if method:
        shape.common["rpc.method"] = method
    code = grpc_code_name(call)
    if code or call.status:
        shape.common["rpc.response.status_code"] = code or call.status
    if call.HasField("grpc") and call.grpc.status_message:
        shape.common["trawl.grpc.status_message"] = call.grpc.status_message
    if code and code != "OK":
        shape.client["error.type"] = code
        shape.client_error = code
        if code in GRPC_SERVER_ERRORS:
            shape.server["error.type"] = code
            shape.server_error = code
    return shape


def _failed(call: ApiCall, shape: SpanShape, error_type: str) -> SpanShape:
    """Both sides are in error when the call's outcome says so (no finer per-side rule exists)."""
    if call.outcome == Outcome.OUTCOME_ERROR:
        shape.client["error.type"] = shape.server["error.type"] = error_type or "error"
        shape.client_error = shape.server_error = error_type or "error"
    return shape


def _redis(call: ApiCall) -> SpanShape:
    command = _ascii_upper(call.method)
    detail = call.redis if call.HasField("redis") else None
    if detail is not None and detail.from_server:
        # A pub/sub message the server pushed (MESSAGE, PMESSAGE, SMESSAGE, INVALIDATE): a
        # delivery to the subscriber, not a database operation.
        shape = _messaging(call, "redis", call.path)
        shape.common["messaging.operation.type"] = "process"
        shape.client_kind = SpanKind.CONSUMER
        return shape
    if command in ("PUBLISH", "SPUBLISH"):
        shape = _messaging(call, "redis", call.path)
        shape.common["messaging.operation.type"] = "send"
        shape.client_kind = SpanKind.PRODUCER
        return _failed(call, shape, call.status if call.status not in ("", "ok", "nil") else "")
    shape = SpanShape(name=command or "redis", common={"db.system.name": "redis"})
    if command:
        shape.common["db.operation.name"] = command
    if detail is not None:
        shape.common["db.namespace"] = str(detail.db)
    # A command sent under CLIENT REPLY OFF/SKIP has no reply, so no status: not a failure.
    failed = call.outcome == Outcome.OUTCOME_ERROR or call.status not in ("", "ok", "nil")
    if failed and call.status:
        shape.common["db.response.status_code"] = call.status
    if failed:
        call_error = call.status or "error"
        shape.client["error.type"] = shape.server["error.type"] = call_error
        shape.client_error = shape.server_error = call_error
    return shape


# messaging.operation.type per the current semantic conventions ("process" for a delivery the
# broker pushes, "receive" for one the consumer asks for).
_MESSAGING_OPERATION_TYPES = {
    "Produce": "send",
    "Fetch": "receive",
    "basic.publish": "send",
    "basic.get": "receive",
    "basic.deliver": "process",
    "basic.consume": "receive",
    "basic.ack": "settle",
    "basic.nack": "settle",
    "basic.reject": "settle",
}
_MESSAGING_KINDS = {"send": SpanKind.PRODUCER, "receive": SpanKind.CONSUMER, "process": SpanKind.CONSUMER}


def _messaging(call: ApiCall, system: str, destination: str) -> SpanShape:
    operation = call.method
    name = f"{operation} {destination}" if destination else operation or system
    shape = SpanShape(name=name, common={"messaging.system": system})
    if operation:
        shape.common["messaging.operation.name"] = operation
    if operation in _MESSAGING_OPERATION_TYPES:
        operation_type = _MESSAGING_OPERATION_TYPES[operation]
        shape.common["messaging.operation.type"] = operation_type
        shape.client_kind = _MESSAGING_KINDS.get(operation_type, SpanKind.CLIENT)
    if destination:
        shape.common["messaging.destination.name"] = destination
    return shape


def _kafka(call: ApiCall) -> SpanShape:
    topics = list(call.kafka.topics) if call.HasField("kafka") else [t for t in call.path.split(",") if t]
    shape = _messaging(call, "kafka", topics[0] if len(topics) == 1 else "")
    if call.HasField("kafka") and call.kafka.client_id:
        shape.common["messaging.client.id"] = call.kafka.client_id
    if call.HasField("kafka") and len(call.kafka.partitions) == 1:
        shape.common["messaging.destination.partition.id"] = str(call.kafka.partitions[0])
    if call.HasField("kafka") and call.kafka.group_id:
        shape.common["messaging.consumer.group.name"] = call.kafka.group_id
    if call.HasField("kafka") and call.kafka.record_count:
        shape.common["messaging.batch.message_count"] = call.kafka.record_count
    # The status is the error code's name (NONE for none); "0" in records from before it was.
    error = call.status if call.status not in ("", "0", "NONE") else ""
    if error:
        shape.client["error.type"] = shape.server["error.type"] = error
        shape.client_error = shape.server_error = f"kafka error {error}"
    return _failed(call, shape, error)


def _amqp(call: ApiCall) -> SpanShape:
    detail = call.amqp
    destination = (detail.exchange or detail.queue) if call.HasField("amqp") else call.path
    shape = _messaging(call, "rabbitmq", destination)
    if call.HasField("amqp") and detail.routing_key:
        shape.common["messaging.rabbitmq.destination.routing_key"] = detail.routing_key
    if call.HasField("amqp"):
        properties = detail.properties
        if "message-id" in properties:
            shape.common["messaging.message.id"] = properties["message-id"]
        if "correlation-id" in properties:
            shape.common["messaging.message.conversation_id"] = properties["correlation-id"]
    body_size = call.request.body_size or call.response.body_size
    if body_size:
        shape.common["messaging.message.body.size"] = body_size
    error = call.status if call.status not in ("", "ok", "200") else ""
    return _failed(call, shape, error)


def _dns(call: ApiCall) -> SpanShape:
    query_type = call.method or "query"
    shape = SpanShape(name=f"DNS {query_type}", common={"trawl.dns.question.type": query_type})
    if call.path:
        shape.common["dns.question.name"] = call.path
    if call.HasField("dns") and call.dns.answers:
        shape.common["dns.answers"] = [answer.data for answer in call.dns.answers]
    rcode = call.status
    if rcode and rcode != "NOERROR":
        shape.client["error.type"] = rcode
        shape.client_error = rcode
        # Only SERVFAIL-like answers are the server's fault; NXDOMAIN is a correct answer.
        if rcode not in ("NXDOMAIN", "NODATA"):
            shape.server["error.type"] = rcode
            shape.server_error = rcode
    return shape


def _generic(call: ApiCall) -> SpanShape:
    name = f"{call.protocol} {call.method}".strip() or "call"
    shape = SpanShape(name=name)
    if call.method:
        shape.common["trawl.method"] = call.method
    if call.path:
        shape.common["trawl.path"] = call.path
    if call.HasField("tls"):
        if call.tls.sni:
            shape.common["tls.client.server_name"] = call.tls.sni
        if call.tls.version:
            shape.common["tls.protocol.version"] = call.tls.version
        if call.tls.cipher:
            shape.common["tls.cipher"] = call.tls.cipher
    if call.HasField("tcp") and call.tcp.reset_by:
        shape.common["trawl.tcp.reset_by"] = call.tcp.reset_by
    return _failed(call, shape, call.method)


_MAPPERS: dict[str, Callable[[ApiCall], SpanShape]] = {
    "http": _http,
    "http2": _http,
    "graphql": _graphql,
    "grpc": _grpc,
    "redis": _redis,
    "kafka": _kafka,
    "amqp": _amqp,
    "dns": _dns,
}
