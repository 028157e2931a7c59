"""ApiCall -> CLIENT/SERVER spans: names, attributes, resources, ids, statuses."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from trawl.enricher.paths import template_path
from trawl.enricher.red import RedMetrics
from trawl.enricher.spans import call_spans, http_method, span_ids
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall, Outcome

T0 = 1_780_000_000_000_000_000


def make_call(**fields: Any) -> ApiCall:
    call = ApiCall(
        id=fields.pop("id", "call-1"),
        protocol=fields.pop("protocol", "http"),
        transport="tcp",
        node="node-a",
        capture="packet",
        method=fields.pop("method", "GET"),
        path=fields.pop("path", "/users/42?verbose=1"),
        status=fields.pop("status", "200"),
        outcome=fields.pop("outcome", Outcome.OUTCOME_OK),
        **fields,
    )
    call.src.ip, call.src.port = "10.244.1.12", 51514
    call.src.name, call.src.namespace, call.src.pod = "checkout", "shop", "checkout-7d9f8b6c5d-x2k4q"
    call.src.workload, call.src.workload_kind, call.src.node = "checkout", "Deployment", "node-a"
    call.src.cluster = "prod"
    call.dst.ip, call.dst.port = "10.244.2.9", 8080
    call.dst.name, call.dst.namespace, call.dst.pod = "users", "shop", "users-0"
    call.dst.workload, call.dst.workload_kind, call.dst.node = "users", "StatefulSet", "node-b"
    call.request.ts, call.request.end_ts = T0, T0 + 1_000
    call.response.ts, call.response.end_ts = T0 + 5_000_000, T0 + 6_000_000
    call.elapsed_ns = 5_000_000
    return call


MESSAGING_KINDS = {SpanKind.PRODUCER, SpanKind.CONSUMER}


def spans_of(call: ApiCall) -> tuple[ReadableSpan, ReadableSpan]:
    client, server = call_spans(call)
    messaging = call.protocol in ("kafka", "amqp", "redis")
    assert client.kind == SpanKind.CLIENT or (messaging and client.kind in MESSAGING_KINDS)
    assert server.kind == SpanKind.SERVER
    return client, server


def test_http_pair_shares_a_trace_and_the_server_is_the_clients_child() -> None:
    call = make_call()
    call.http.version = "1.1"
    call.http.host = "users.shop.svc:8080"
    call.http.user_agent = "curl/8.5.0"
    client, server = spans_of(call)
    assert client.context is not None
    assert server.context is not None
    assert server.parent is not None
    assert client.context.trace_id == server.context.trace_id
    assert server.parent.span_id == client.context.span_id
    assert client.parent is None
    assert client.name == server.name == "GET"
    assert (client.start_time, client.end_time) == (T0, T0 + 6_000_000)
    assert (server.start_time, server.end_time) == (T0, T0 + 6_000_000)

    assert client.resource.attributes["service.name"] == "checkout"
    assert client.resource.attributes["service.namespace"] == "shop"
    assert client.resource.attributes["k8s.deployment.name"] == "checkout"
    assert client.resource.attributes["k8s.pod.name"] == "checkout-7d9f8b6c5d-x2k4q"
    assert client.resource.attributes["k8s.node.name"] == "node-a"
    assert client.resource.attributes["k8s.cluster.name"] == "prod"
    assert server.resource.attributes["service.name"] == "users"
    assert server.resource.attributes["k8s.statefulset.name"] == "users"
    assert "k8s.cluster.name" not in server.resource.attributes

    assert client.attributes is not None
    assert server.attributes is not None
    assert client.attributes["http.request.method"] == "GET"
    assert client.attributes["http.response.status_code"] == 200
    assert client.attributes["url.full"] == "http://users.shop.svc:8080/users/42?verbose=1"
    assert client.attributes["url.template"] == "/users/{id}"
    assert client.attributes["server.address"] == "users.shop.svc"
    assert client.attributes["server.port"] == 8080
    assert client.attributes["network.peer.address"] == "10.244.2.9"
    assert client.attributes["network.peer.port"] == 8080
    assert client.attributes["network.protocol.version"] == "1.1"
    assert client.attributes["user_agent.original"] == "curl/8.5.0"
    assert server.attributes["url.path"] == "/users/42"
    assert server.attributes["url.query"] == "verbose=1"
    assert server.attributes["url.scheme"] == "http"
    assert server.attributes["client.address"] == "10.244.1.12"
    assert server.attributes["network.peer.address"] == "10.244.1.12"
    assert server.attributes["network.peer.port"] == 51514
    assert "http.route" not in server.attributes
    assert server.attributes["trawl.call.id"] == "call-1"
    assert client.status.status_code == server.status.status_code == StatusCode.UNSET


def test_route_names_the_span() -> None:
    call = make_call()
    call.http.route = "/users/{user_id}"
    client, server = spans_of(call)
    assert client.name == server.name == "GET /users/{user_id}"
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/users/{user_id}"


def test_traceparent_joins_the_applications_trace() -> None:
    call = make_call(trace_id="4bf92f3577b34da6a3ce929d0e0e4736", parent_span_id="00f067aa0ba902b7")
    client, server = spans_of(call)
    assert client.context is not None
    assert server.context is not None
    assert client.parent is not None
    assert server.parent is not None
    assert client.context.trace_id == server.context.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    assert client.parent.span_id == 0x00F067AA0BA902B7
    assert server.parent.span_id == client.context.span_id
    assert 0x00F067AA0BA902B7 not in (client.context.span_id, server.context.span_id)


def test_ids_are_deterministic_per_call_and_differ_between_calls() -> None:
    first = span_ids(make_call(id="a"))
    assert first == span_ids(make_call(id="a"))
    second = span_ids(make_call(id="b"))
    assert first.trace_id != second.trace_id
    assert first.client_span_id != first.server_span_id
    # A malformed header is ignored, not half-used.
    assert span_ids(make_call(id="a", trace_id="xyz", parent_span_id="00f067aa0ba902b7")) == first
    assert span_ids(make_call(id="a", trace_id="0" * 32)) == first


@pytest.mark.parametrize(
    ("status", "client_error", "server_error"),
    [("200", False, False), ("404", True, False), ("503", True, True)],
)
def test_http_error_status_per_side(status: str, client_error: bool, server_error: bool) -> None:
    client, server = spans_of(make_call(status=status))
    assert (client.status.status_code == StatusCode.ERROR) is client_error
    assert (server.status.status_code == StatusCode.ERROR) is server_error
    assert client.attributes is not None
    assert server.attributes is not None
    assert ("error.type" in client.attributes) is client_error
    if server_error:
        assert server.attributes["error.type"] == status


def test_no_response_ends_at_the_request_and_is_an_error() -> None:
    call = make_call(status="", outcome=Outcome.OUTCOME_NO_RESPONSE)
    call.ClearField("response")
    client, server = spans_of(call)
    assert client.end_time == T0 + 1_000
    assert client.attributes is not None
    assert client.attributes["error.type"] == "no_response"
    assert "http.response.status_code" not in client.attributes
    assert client.status.status_code == server.status.status_code == StatusCode.ERROR


def test_unknown_peer_resource_is_its_ip() -> None:
    call = make_call()
    call.src.Clear()
    call.src.ip, call.src.port, call.src.name = "192.0.2.7", 40000, "192.0.2.7"
    client, _ = spans_of(call)
    assert dict(client.resource.attributes) == {"service.name": "192.0.2.7", "service.instance.id": "192.0.2.7"}


def test_grpc_mapping() -> None:
    call = make_call(protocol="grpc", method="POST", path="/shop.v1.Users/Get", status="5")
    call.grpc.service, call.grpc.method, call.grpc.status_code = "shop.v1.Users", "Get", 5
    client, server = spans_of(call)
    assert client.name == "shop.v1.Users/Get"
    assert client.attributes is not None
    assert client.attributes["rpc.system.name"] == "grpc"
    assert client.attributes["rpc.method"] == "shop.v1.Users/Get"
    assert client.attributes["rpc.response.status_code"] == "NOT_FOUND"
    assert client.status.status_code == StatusCode.ERROR
    assert server.status.status_code == StatusCode.UNSET  # NOT_FOUND is the caller's problem
    call.grpc.status_code = 13
    client, server = spans_of(call)
    assert server.status.status_code == StatusCode.ERROR


def test_grpc_cancel_and_deadline_fail_the_client_side_only() -> None:
    for outcome, reason in (
        (Outcome.OUTCOME_CANCELLED, "cancelled"),
        (Outcome.OUTCOME_DEADLINE_EXCEEDED, "deadline_exceeded"),
    ):
        call = make_call(protocol="grpc", method="POST", path="/shop.v1.Users/Get", status="", outcome=outcome)
        client, server = spans_of(call)
        assert client.status.status_code == StatusCode.ERROR and client.attributes is not None
        assert client.attributes["error.type"] == reason
        assert server.status.status_code == StatusCode.UNSET


def test_graphql_mapping_names_the_operation_and_fails_on_an_errors_array() -> None:
    call = make_call(protocol="graphql", method="query", path="GetOrder", status="200", outcome=Outcome.OUTCOME_ERROR)
    call.graphql.operation_type, call.graphql.operation_name = "query", "GetOrder"
    call.graphql.http_version, call.graphql.target = "2", "/graphql?op=1"
    call.graphql.errors, call.graphql.first_error = 1, "the broken field always fails"
    client, server = spans_of(call)
    assert client.name == server.name == "query GetOrder"
    assert client.attributes is not None and server.attributes is not None
    assert client.attributes["graphql.operation.type"] == "query"
    assert client.attributes["graphql.operation.name"] == "GetOrder"
    assert client.attributes["network.protocol.version"] == "2"
    assert "http.request.method" not in client.attributes
    assert (server.attributes["url.path"], server.attributes["url.query"]) == ("/graphql", "op=1")
    assert client.status.status_code == server.status.status_code == StatusCode.ERROR
    assert client.status.description == "the broken field always fails"


@pytest.mark.parametrize(
    ("protocol", "method", "status", "kind"),
    [
        ("kafka", "Produce", "NONE", SpanKind.PRODUCER),
        ("kafka", "Fetch", "NONE", SpanKind.CONSUMER),
        ("kafka", "Metadata", "NONE", SpanKind.CLIENT),
        ("amqp", "basic.publish", "ok", SpanKind.PRODUCER),
        ("amqp", "basic.deliver", "ok", SpanKind.CONSUMER),
        ("amqp", "basic.get", "ok", SpanKind.CONSUMER),
        ("amqp", "basic.ack", "ok", SpanKind.CLIENT),
        ("amqp", "queue.declare", "ok", SpanKind.CLIENT),
        ("redis", "GET", "ok", SpanKind.CLIENT),
        ("redis", "PUBLISH", "ok", SpanKind.PRODUCER),
        ("redis", "MESSAGE", "ok", SpanKind.CONSUMER),
    ],
)
def test_messaging_calls_are_producer_and_consumer_spans(
    protocol: str, method: str, status: str, kind: SpanKind
) -> None:
    """Issue #10: a produce or publish is the producer's span, a fetch, get or delivery the
    consumer's; the broker's side stays SERVER, and everything else (Redis included) CLIENT."""
    call = make_call(protocol=protocol, method=method, path="orders", status=status)
    if method == "MESSAGE":
        call.redis.from_server = True  # a pub/sub message the server pushed
    client, server = spans_of(call)
    assert client.kind == kind
    assert server.kind == SpanKind.SERVER
    assert client.status.status_code == StatusCode.UNSET  # NONE and ok are not errors
    failed, _ = spans_of(make_call(protocol="kafka", method="Produce", path="orders", status="NOT_LEADER_OR_FOLLOWER"))
    assert failed.status.status_code == StatusCode.ERROR


def test_redis_kafka_amqp_dns_and_tcp_mappings() -> None:
    redis = make_call(protocol="redis", method="GET", path="session:1", status="ok")
    redis.redis.db = 2
    client, _ = spans_of(redis)
    assert client.name == "GET"
    assert client.attributes is not None
    assert (client.attributes["db.system.name"], client.attributes["db.namespace"]) == ("redis", "2")
    failed, _ = spans_of(make_call(protocol="redis", method="SET", path="k", status="WRONGTYPE"))
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["db.response.status_code"] == "WRONGTYPE"

    kafka = make_call(protocol="kafka", method="Produce", path="orders", status="0")
    kafka.kafka.topics.append("orders")
    kafka.kafka.client_id = "producer-1"
    client, _ = spans_of(kafka)
    assert client.name == "Produce orders"
    assert client.attributes is not None
    assert client.attributes["messaging.system"] == "kafka"
    assert client.attributes["messaging.operation.type"] == "send"
    assert client.attributes["messaging.destination.name"] == "orders"
    assert client.attributes["messaging.client.id"] == "producer-1"
    assert client.status.status_code == StatusCode.UNSET

    amqp = make_call(protocol="amqp", method="basic.publish", path="events/order.created", status="ok")
    amqp.amqp.exchange, amqp.amqp.routing_key = "events", "order.created"
    client, _ = spans_of(amqp)
    assert client.name == "basic.publish events"
    assert client.attributes is not None
    assert client.attributes["messaging.system"] == "rabbitmq"
    assert client.attributes["messaging.rabbitmq.destination.routing_key"] == "order.created"

    dns = make_call(protocol="dns", method="A", path="users.shop.svc.cluster.local", status="NXDOMAIN")
    client, server = spans_of(dns)
    assert client.kind == SpanKind.CLIENT
    assert client.name == "DNS A"
    assert client.attributes is not None
    assert client.attributes["dns.question.name"] == "users.shop.svc.cluster.local"
    assert client.status.status_code == StatusCode.ERROR
    assert server.status.status_code == StatusCode.UNSET

    reset = make_call(protocol="tcp", method="reset", path="", status="1", outcome=Outcome.OUTCOME_ERROR)
    reset.tcp.reset_by = "server"
    client, server = spans_of(reset)
    assert client.name == "tcp reset"
    assert client.attributes is not None
    assert client.attributes["trawl.tcp.reset_by"] == "server"
    assert server.status.status_code == StatusCode.ERROR


def test_template_path_bounds_cardinality() -> None:
    assert template_path("/users/42/orders/7f3e2a10-0c1b-4f7e-9a3b-2c1d0e9f8a7b") == "/users/{id}/orders/{id}"
    assert template_path("/blobs/5f2b9c0e1d3a4b6c?x=1") == "/blobs/{id}"
    assert template_path("/cafe/deadbeef/healthz") == "/cafe/deadbeef/healthz"
    assert template_path("/") == "/"


def test_http_method_normalisation() -> None:
    assert http_method("GET") == ("GET", None)
    assert http_method("get") == ("GET", "get")
    assert http_method("PURGE") == ("_OTHER", "PURGE")
    client, _ = spans_of(make_call(method="PURGE"))
    assert client.name == "HTTP"


_text = st.text(max_size=40) | st.sampled_from(["", "GET", "200", "500", "-1", "99999999999", "[::1]:x", "a:b:c"])
_protocols = st.sampled_from(
    ["http", "http2", "grpc", "graphql", "redis", "kafka", "amqp", "dns", "icmp", "tcp", "tls", ""]
)


@settings(deadline=None)
@given(
    protocol=_protocols,
    method=_text,
    path=_text,
    status=_text,
    host=_text,
    trace_id=_text | st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
    parent=_text | st.from_regex(r"[0-9a-f]{16}", fullmatch=True),
    times=st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=4, max_size=4),
    grpc_code=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    outcome=st.sampled_from(list(Outcome.values())),
)
def test_fuzz_any_call_maps_to_two_spans_and_metrics(
    protocol: str,
    method: str,
    path: str,
    status: str,
    host: str,
    trace_id: str,
    parent: str,
    times: list[int],
    grpc_code: int,
    outcome: int,
) -> None:
    call = make_call(protocol=protocol, method=method, path=path, status=status, outcome=outcome)
    call.trace_id, call.parent_span_id = trace_id, parent
    call.request.ts, call.request.end_ts, call.response.ts, call.response.end_ts = times
    if protocol == "grpc":
        call.grpc.status_code = grpc_code
    elif protocol in ("http", "http2", "graphql"):
        call.http.host = host
    client, server = spans_of(call)
    assert client.context is not None
    assert server.parent is not None
    assert server.parent.span_id == client.context.span_id
    assert client.start_time is not None and client.end_time is not None
    assert client.end_time >= client.start_time
    RedMetrics(None, max_resources=4, registry=Registry()).record(call)
