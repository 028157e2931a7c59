"""The compiled span path (trawl._otlpspans through services/enricher/wire_spans.py) against the
reference, the OpenTelemetry SDK path (spans.py `call_spans`, then the SDK's OTLP encoder): the
same calls must give the same spans, both decoded with opentelemetry-proto (ids, names, kinds,
times, flags, parents, attributes, status, resources and scope), on every committed capture as
`trawl analyze` dissects it (with and without identity) and on generated calls of every
protocol, odd text included. Attribute order inside a span is not compared (OTLP gives it no
meaning); everything else of each Span message is."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import FIXTURES
from trawl import _otlpspans, analyze
from trawl.collector.replay import CaptureFile
from trawl.dissector.config import DissectorSettings
from trawl.dissector.engine import Dissector
from trawl.enricher.config import RouteSettings
from trawl.enricher.identity import IdentityMap
from trawl.enricher.routes import RouteLearner
from trawl.enricher.spans import WORKLOAD_KIND_ATTRIBUTES, call_spans
from trawl.enricher.wire_spans import WireSpanEncoder
from trawl.errors import InputError
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall
from trawl.v1.packets_pb2 import PacketBatch

CAPTURES = sorted(FIXTURES.rglob("*.pcap"))
# The identity that names the pods of http1.pcap, sample.pcap and secrets.pcap (the cluster
# snapshot of identity_snapshot.json names none of the captures' addresses).
IDENTITY = FIXTURES / "http1_identity.json"


def _attributes(values: Sequence[KeyValue]) -> dict[str, Any]:
    attributes = {kv.key: json_format.MessageToDict(kv.value, preserving_proto_field_name=True) for kv in values}
    assert len(attributes) == len(values), "an attribute key appears twice"
    return attributes


def canonical_spans(request: ExportTraceServiceRequest) -> list[str]:
    """Each span with its resource and scope, as sorted JSON text (a multiset of spans)."""
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = json_format.MessageToDict(scope_spans.scope, preserving_proto_field_name=True)
            for span in scope_spans.spans:
                bare = Span()
                bare.CopyFrom(span)
                del bare.attributes[:]
                fields = json_format.MessageToDict(bare, preserving_proto_field_name=True)
                fields["status_present"] = span.HasField("status")
                record = {
                    "resource": resource,
                    "resource_schema": resource_spans.schema_url,
                    "scope": scope,
                    "scope_schema": scope_spans.schema_url,
                    "span": fields,
                    "attributes": _attributes(span.attributes),
                }
                spans.append(json.dumps(record, sort_keys=True))
    return sorted(spans)


def reference(calls: Sequence[ApiCall]) -> ExportTraceServiceRequest:
    spans = [span for call in calls if call.request.ts for span in call_spans(call)]
    return encode_spans(spans)


def compiled(calls: Sequence[bytes]) -> ExportTraceServiceRequest:
    """Every request of the compiled encoder merged into one (they are concatenable)."""
    encoded = WireSpanEncoder(max_spans=64).encode(calls)
    merged = ExportTraceServiceRequest()
    for part in encoded:
        assert not part.unreadable
        one = ExportTraceServiceRequest.FromString(part.request)
        assert sum(len(scope.spans) for rs in one.resource_spans for scope in rs.scope_spans) == part.spans
        resources = [rs.resource.SerializeToString(deterministic=True) for rs in one.resource_spans]
        assert len(resources) == len(set(resources)), "spans of one Resource are not grouped"
        merged.MergeFrom(one)
    return merged


def assert_same_spans(calls: Sequence[ApiCall]) -> int:
    expected = canonical_spans(reference(calls))
    got = canonical_spans(compiled([call.SerializeToString() for call in calls]))
    if expected != got:
        missing = Counter(expected) - Counter(got)
        extra = Counter(got) - Counter(expected)
        first_missing = next(iter(missing), "")
        first_extra = next(iter(extra), "")
        pytest.fail(f"{len(missing)} spans differ\nreference: {first_missing}\ncompiled:  {first_extra}")
    return len(expected)


def dissected(path: Path, identity: Path | None) -> list[ApiCall]:
    """The calls `trawl analyze` finds in a capture (its batches, Dissector.feed), enriched: their
    identities, and the routes of the default route learner."""
    identities = IdentityMap.from_snapshot(identity) if identity else IdentityMap.empty()
    dissector = Dissector(DissectorSettings.load(None, node="node-a"), "node-a")
    calls: list[ApiCall] = []
    sequence = link_type = 0
    try:
        for read in CaptureFile(path).batches(analyze.BATCH_MAX_PACKETS, analyze.BATCH_MAX_BYTES):
            sequence += 1
            link_type = read.link_type
            calls += dissector.feed(read.message(node="node-a", shard=0, sequence=sequence, source="t"))
    except InputError:
        pass  # the damaged captures: the calls before the damage
    calls += dissector.feed(PacketBatch(node="node-a", sequence=sequence + 1, link_type=link_type, end_of_input=True))
    calls += dissector.finish()
    identities.enrich_calls(calls)
    routes = RouteLearner.from_settings(RouteSettings(), Registry())
    assert routes is not None
    routes.apply(calls)
    return calls


@pytest.mark.parametrize("identity", [None, IDENTITY], ids=["no-identity", "identity"])
@pytest.mark.parametrize("capture", CAPTURES, ids=[str(path.relative_to(FIXTURES)) for path in CAPTURES])
def test_every_committed_capture_gives_the_reference_spans(capture: Path, identity: Path | None) -> None:
    calls = dissected(capture, identity)
    assert_same_spans(calls)


def test_the_captures_cover_every_protocol_mapping() -> None:
    """The parametrized test above is only as good as what the captures hold."""
    protocols = {call.protocol for path in CAPTURES for call in dissected(path, None)}
    assert {"http", "http2", "grpc", "graphql", "redis", "kafka", "amqp", "dns", "tls", "icmp", "tcp"} <= protocols


@given(st.binary(max_size=300), st.sampled_from([8, 16, 32, 64]))
def test_blake2b_is_hashlibs(data: bytes, size: int) -> None:
    assert _otlpspans.blake2b(data, size) == hashlib.blake2b(data, digest_size=size).digest()


# -- generated calls ---------------------------------------------------------------------------

# Each generated call is a whole ApiCall with both endpoints and a detail: slow to draw under
# the sanitizers (make sanitize), so neither the deadline nor the slow-generation check applies.
CALLS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ODD_TEXT = st.text(max_size=12)
HEX32 = st.text(alphabet="0123456789abcdefABCDEF", min_size=32, max_size=32)
HEX16 = st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)
UINT64 = st.one_of(st.just(0), st.integers(0, 10_000), st.integers(0, 2**64 - 1))
IPS = st.one_of(
    st.sampled_from(["", "10.244.1.12", "10.244.2.9", "::1", "2001:db8::7", "fe80::1%eth0", "010.1.1.1", "host"]),
    st.ip_addresses().map(str),
    ODD_TEXT,
)


def _pick(*values: str) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(values), ODD_TEXT)


@st.composite
def endpoints(draw: st.DrawFn, endpoint: Any) -> None:
    endpoint.ip = draw(IPS)
    endpoint.port = draw(st.one_of(st.just(0), st.integers(1, 65535), st.integers(0, 2**32 - 1)))
    for name in ("name", "namespace", "pod", "workload", "node", "cluster", "service"):
        setattr(endpoint, name, draw(st.one_of(st.just(""), _pick("users", "shop", "users-0"))))
    endpoint.workload_kind = draw(st.one_of(st.sampled_from(sorted(WORKLOAD_KIND_ATTRIBUTES)), ODD_TEXT))


@st.composite
def calls(draw: st.DrawFn) -> ApiCall:
    call = ApiCall(
        id=draw(_pick("call-1", "call-2", "")),
        protocol=draw(
            _pick("http", "http2", "graphql", "grpc", "redis", "kafka", "amqp", "dns", "tcp", "tls", "icmp", "")
        ),
        transport=draw(_pick("tcp", "udp", "")),
        node=draw(_pick("node-a", "")),
        capture=draw(_pick("packet", "tls-uprobe", "")),
        method=draw(
            _pick(
                "GET",
                "get",
                "Post",
                "BREW",
                "",
                "PUBLISH",
                "publish",
                "SPUBLISH",
                "Produce",
                "Fetch",
                "basic.publish",
                "basic.deliver",
                "basic.get",
                "basic.ack",
                "query",
                "Mutation",
                "A",
                "\u017fet",
            )
        ),
        path=draw(
            _pick(
                "/users/42?verbose=1",
                "/a/550E8400-e29b-41d4-a716-446655440000/b",
                "/x/deadbeef12345/y",
                "/1/2/",
                "?q",
                "",
                "/pkg.Svc/Get",
                "//pkg.Svc/Get",
                "topic-a",
                "topic-a,topic-b",
                ",t,",
                "GetUser",
                " op ",
                "/١٢",
            )
        ),
        status=draw(
            _pick(
                "",
                "200",
                "404",
                "503",
                "0404",
                "123456789",
                "1234567890",
                "ok",
                "nil",
                "NONE",
                "0",
                "NXDOMAIN",
                "NOERROR",
                "SERVFAIL",
                "NODATA",
                "ERR wrong type",
                "14",
                "2",
                "99",
            )
        ),
        outcome=draw(st.integers(0, 6)),
        trace_id=draw(st.one_of(st.just(""), HEX32, st.just("0" * 32), st.just("0x" + "1" * 30), ODD_TEXT)),
        parent_span_id=draw(st.one_of(st.just(""), HEX16, st.just("0" * 16), ODD_TEXT)),
    )
    draw(endpoints(call.src))
    draw(endpoints(call.dst))
    for message in (call.request, call.response):
        message.ts = draw(st.one_of(st.just(0), st.integers(1, 2**64 - 1)))
        message.end_ts = draw(st.one_of(st.just(0), st.integers(1, 2**64 - 1)))
        message.size = draw(UINT64)
        message.body_size = draw(UINT64)
    if draw(st.booleans()):
        call.request.ts = draw(st.integers(1, 2**63))
    call.notes.extend(draw(st.lists(_pick("gap", "truncated"), max_size=3)))
    detail = draw(
        st.sampled_from(["", "http", "grpc", "dns", "kafka", "amqp", "redis", "icmp", "tcp", "tls", "graphql"])
    )
    if detail == "http":
        call.http.version = draw(_pick("", "1.1", "HTTP/1.0", "2"))
        call.http.host = draw(
            _pick(
                "",
                "users:8080",
                "Users.Shop.svc:80",
                "[::1]:8080",
                "host:99999",
                "host:",
                "host:0",
                "user@host:1",
                "a b",
                "h:8x",
                "[::1",
                "ÄÖ.example:81",
                "\nhost",
                "host:007",
            )
        )
        call.http.user_agent = draw(_pick("", "curl/8.5.0"))
        call.http.route = draw(_pick("", "/users/{id}"))
    elif detail == "grpc":
        call.grpc.status_code = draw(st.integers(-(2**31), 2**31 - 1) | st.integers(0, 20))
        call.grpc.status_message = draw(_pick("", "boom"))
    elif detail == "dns":
        for data in draw(st.lists(_pick("", "10.0.0.1"), max_size=3)):
            call.dns.answers.add(data=data, name="x")
        call.dns.rcode = "x"
    elif detail == "kafka":
        call.kafka.client_id = draw(_pick("", "producer-1"))
        call.kafka.topics.extend(draw(st.lists(_pick("orders", ""), max_size=3)))
        call.kafka.partitions.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3)))
        call.kafka.group_id = draw(_pick("", "group-1"))
        call.kafka.record_count = draw(UINT64)
    elif detail == "amqp":
        call.amqp.exchange = draw(_pick("", "orders"))
        call.amqp.queue = draw(_pick("", "q1"))
        call.amqp.routing_key = draw(_pick("", "rk"))
        properties = draw(st.dictionaries(_pick("message-id", "correlation-id", "x"), _pick("", "id-1"), max_size=3))
        call.amqp.properties.update(properties)
    elif detail == "redis":
        call.redis.db = draw(st.integers(-(2**31), 2**31 - 1) | st.integers(0, 15))
        call.redis.from_server = draw(st.booleans())
        call.redis.args.append("x")
    elif detail == "icmp":
        call.icmp.type = 8
    elif detail == "tcp":
        call.tcp.reset_by = draw(_pick("", "client"))
    elif detail == "tls":
        call.tls.sni = draw(_pick("", "example.com"))
        call.tls.version = draw(_pick("", "1.3"))
        call.tls.cipher = draw(_pick("", "TLS_AES_128_GCM_SHA256"))
    elif detail == "graphql":
        call.graphql.http_version = draw(_pick("", "1.1"))
        call.graphql.target = draw(_pick("", "/graphql?x=1", "/graphql", "?only"))
        call.graphql.persisted_query_hash = draw(_pick("", "abc"))
        call.graphql.operations = draw(st.integers(0, 3))
        call.graphql.errors = draw(st.integers(0, 2))
        call.graphql.first_error = draw(_pick("", "bad"))
    return call


@CALLS
@given(st.lists(calls(), min_size=1, max_size=6))
def test_generated_calls_give_the_reference_spans(generated: list[ApiCall]) -> None:
    assert_same_spans(generated)


@CALLS
@given(calls(), st.integers(1, 64))
def test_a_damaged_call_gives_no_span_and_is_named_the_others_go_on(call: ApiCall, cut: int) -> None:
    good = ApiCall(id="ok", protocol="http", method="GET")
    good.request.ts = 1
    data = call.SerializeToString()
    damaged = data[: max(0, len(data) - cut)] + b"\x0a\xff"  # a length that runs past the end
    encoded = WireSpanEncoder().encode([good.SerializeToString(), damaged, good.SerializeToString()])
    assert [part.unreadable for part in encoded] == [(1,)]
    assert encoded[0].spans == 4
    assert canonical_spans(ExportTraceServiceRequest.FromString(encoded[0].request)) == canonical_spans(
        reference([good, good])
    )


def test_requests_hold_at_most_max_spans() -> None:
    many = []
    for index in range(25):
        call = ApiCall(id=f"c{index}", protocol="dns", method="A")
        call.request.ts = 1 + index
        many.append(call.SerializeToString())
    encoded = WireSpanEncoder(max_spans=10).encode(many)
    assert [part.spans for part in encoded] == [10, 10, 10, 10, 10]
    assert sum(len(canonical_spans(ExportTraceServiceRequest.FromString(part.request))) for part in encoded) == 50


@CALLS
@given(calls(), st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_bytes_are_read_as_protobuf_reads_them(call: ApiCall, changes: list[tuple[int, int]]) -> None:
    """Bytes changed here and there: when protobuf (upb) still reads a call, the compiled path
    gives that call's reference spans (merged repeated sub-messages, unknown fields, wire types
    that do not match a field's all read alike); when it does not, the compiled path gives no
    span for it or reads it without crashing (it checks only the fields it reads)."""
    data = bytearray(call.SerializeToString())
    for position, value in changes:
        if data:
            data[position % len(data)] = value
    mutated = bytes(data)
    try:
        parsed: ApiCall | None = ApiCall.FromString(mutated)
    except DecodeError:
        parsed = None
    parts = WireSpanEncoder().encode([mutated])
    if parsed is None:
        assert all(part.unreadable in ((), (0,)) for part in parts)
        return
    assert [part.unreadable for part in parts] == [()]
    expected = canonical_spans(reference([parsed]))
    got = canonical_spans(ExportTraceServiceRequest.FromString(parts[0].request))
    assert got == expected


def test_a_varints_bits_past_64_are_dropped_as_protobuf_drops_them() -> None:
    """The 10th byte of a varint may carry more than the 64th bit: protobuf reads the call (the
    deep profile's mutation found the encoder refusing it)."""
    call = ApiCall(id="call-1", protocol="kafka", method="Produce")
    call.request.ts = 5
    call.kafka.partitions.append(-1)  # ten bytes, the last 0x01
    data = bytearray(call.SerializeToString())
    assert data[-1] == 0x01
    data[-1] = 0x7F
    parsed = ApiCall.FromString(bytes(data))
    parts = WireSpanEncoder().encode([bytes(data)])
    assert parts[0].unreadable == ()
    assert canonical_spans(ExportTraceServiceRequest.FromString(parts[0].request)) == canonical_spans(
        reference([parsed])
    )


def _semconv_attribute_names() -> frozenset[str]:
    """Every attribute name of the opentelemetry-semantic-conventions package's registry (its
    stable and incubating `*_attributes` modules)."""
    import importlib

    import opentelemetry.semconv

    root = Path(opentelemetry.semconv.__file__).parent
    names = set()
    for module_path in root.rglob("*_attributes.py"):
        module = importlib.import_module(
            "opentelemetry.semconv." + ".".join(module_path.relative_to(root).with_suffix("").parts)
        )
        names.update(value for key, value in vars(module).items() if key.isupper() and isinstance(value, str))
    return frozenset(names)


SEMCONV_NAMES = _semconv_attribute_names()


def _attribute_names(request: ExportTraceServiceRequest) -> set[str]:
    names = set()
    for resource_spans in request.resource_spans:
        names.update(kv.key for kv in resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                names.update(kv.key for kv in span.attributes)
    return names


def test_attribute_names_are_the_semantic_conventions_or_trawls_own() -> None:
    """Span and resource attributes of every committed capture (with identity, so k8s.* resource
    attributes appear): each name is in the semantic-conventions registry, or is Trawl's own
    (trawl.*)."""
    assert len(SEMCONV_NAMES) > 500, "the registry was not found"
    names: set[str] = set()
    for capture in CAPTURES:
        names |= _attribute_names(compiled([call.SerializeToString() for call in dissected(capture, IDENTITY)]))
    assert {"http.request.method", "rpc.method", "messaging.system", "k8s.pod.name"} <= names
    assert sorted(name for name in names if name not in SEMCONV_NAMES and not name.startswith("trawl.")) == []


@CALLS
@given(st.lists(calls(), min_size=1, max_size=4))
def test_generated_calls_use_registry_names_too(generated: list[ApiCall]) -> None:
    names = _attribute_names(compiled([call.SerializeToString() for call in generated]))
    assert sorted(name for name in names if name not in SEMCONV_NAMES and not name.startswith("trawl.")) == []
