"""`trawl analyze --json` keeps calls serialized from the dissector to the NDJSON (enrichment
spliced into the bytes by trawl._calljson.Splicer): what it prints must be byte for byte what
the object path prints (Dissector.feed, IdentityMap.enrich call by call, json_format), on every
committed capture, with and without identity snapshots, and on a bench-like capture whose
snapshot moves addresses between pods during the capture. The splicer, the dissector's
router and the hand-framed CallBatch are also checked against protobuf on generated input."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import structlog
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FIXTURES, ROOT, scaled
from trawl import _calljson, analyze
from trawl.collector.replay import CaptureFile
from trawl.dissector.config import DissectorSettings
from trawl.dissector.engine import Dissector
from trawl.dissector.main import frame_call_batch
from trawl.enricher.config import RouteSettings
from trawl.enricher.identity import IdentityMap
from trawl.enricher.logic import Enricher, build_enricher
from trawl.enricher.routes import RouteLearner
from trawl.errors import InputError
from trawl.metrics import Registry
from trawl.render import call_to_json, calls_to_json_lines
from trawl.v1.calls_pb2 import ApiCall, CallBatch
from trawl.v1.packets_pb2 import PacketBatch

CAPTURES = sorted([*FIXTURES.glob("*.pcap"), *(FIXTURES / "hard").glob("*.pcap")])
SNAPSHOT = FIXTURES / "identity_snapshot.json"
IDENTITIES = [None, FIXTURES / "http1_identity.json", SNAPSHOT]
CAPTURE_START_S = 1_700_000_000  # bench/dissect.py's first packet: 2023-11-14T22:13:20Z


def reference_lines(path: Path, identity: Path | None) -> bytes:
    """The object path, with json_format: the batches `analyze` reads, `Dissector.feed`, each
    call enriched on its own by `IdentityMap.enrich` and given its route by the default
    `RouteLearner` (objects), MessageToDict + json.dumps."""
    identities = IdentityMap.from_snapshot(identity) if identity else IdentityMap.empty()
    routes = RouteLearner.from_settings(RouteSettings(), Registry())
    assert routes is not None  # routes are learned by default
    dissector = Dissector(DissectorSettings.load(None, node="ref"), "ref")
    calls: list[ApiCall] = []
    sequence = 0
    link_type = 0
    try:
        for read in CaptureFile(path).batches(analyze.BATCH_MAX_PACKETS, analyze.BATCH_MAX_BYTES):
            sequence += 1
            link_type = read.link_type
            calls += dissector.feed(read.message(node="ref", shard=0, sequence=sequence, source="ref"))
    except InputError:
        pass
    calls += dissector.feed(PacketBatch(node="ref", sequence=sequence + 1, link_type=link_type, end_of_input=True))
    calls += dissector.finish()
    lines = []
    for call in calls:
        identities.enrich(call)
        routes.apply([call])
        lines.append(
            json.dumps(json_format.MessageToDict(call, preserving_proto_field_name=True), separators=(",", ":"))
        )
    return "".join(line + "\n" for line in lines).encode("ascii")


@pytest.fixture
def run_analyze(capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setattr(gc, "freeze", lambda: None)  # analyze freezes its start-up objects: not the suite's
    # Logs (parse errors of the damaged captures) go aside, not to the captured stdout; analyze
    # would route them to the captured stderr, which is closed once the test ends.
    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=io.StringIO()))
    monkeypatch.setattr(analyze, "configure_logging", lambda *args, **kwargs: None)
    taken: list[bool] = []
    original = analyze._Output.__init__

    def spy(self: analyze._Output, as_json: bool, enricher: Enricher) -> None:
        original(self, as_json, enricher)
        taken.append(self.encoded)

    monkeypatch.setattr(analyze._Output, "__init__", spy)

    def run(path: Path, identity: Path | None) -> bytes:
        capsysbinary.readouterr()
        with contextlib.suppress(InputError):
            analyze.analyze(path, identity=identity, as_json=True, node="ref")
        assert taken.pop() is True, "analyze --json did not keep the calls serialized"
        return capsysbinary.readouterr().out

    yield run
    structlog.configure(**saved)


@pytest.mark.parametrize("identity", IDENTITIES, ids=["no-identity", "http1-identity", "snapshot"])
def test_analyze_json_is_the_object_path_on_every_capture(run_analyze: Any, identity: Path | None) -> None:
    for path in CAPTURES:
        printed = run_analyze(path, identity)
        assert printed == reference_lines(path, identity), path.name
    assert b'"workload":"' in run_analyze(FIXTURES / "http1.pcap", FIXTURES / "http1_identity.json")


def _bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_dissect", ROOT / "bench" / "dissect.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _moment(offset_s: float) -> str:
    whole, fraction = divmod(round(offset_s * 1_000_000), 1_000_000)
    from datetime import UTC, datetime

    return datetime.fromtimestamp(CAPTURE_START_S + whole, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{fraction:06d}Z"


def _pod(name: str, ip: str, created_s: float, deleted_s: float | None = None, ports: tuple[int, ...] = ()) -> Any:
    metadata: dict[str, Any] = {"name": name, "namespace": "shop", "creationTimestamp": _moment(created_s)}
    if deleted_s is not None:
        metadata["deletionTimestamp"] = _moment(deleted_s)
    metadata["ownerReferences"] = [{"kind": "StatefulSet", "name": name.rsplit("-", 1)[0], "controller": True}]
    container = {"name": "app", "ports": [{"containerPort": port} for port in ports]}
    return {"kind": "Pod", "metadata": metadata, "spec": {"nodeName": "node-a", "containers": [container]},
            "status": {"podIP": ip}}  # fmt: skip


def test_analyze_json_is_the_object_path_on_a_bench_capture(run_analyze: Any, tmp_path: Path) -> None:
    """Servers 10.2.0.1-20 change pods during the capture (the bench writes 20 µs a packet), the
    callers are pods without ports that appear part way: every call's identity depends on its time."""
    capture = tmp_path / "bench.pcap"
    _bench_module().generate(capture, 30_000, requests_per_connection=10, dns_share=0.1)
    items = []
    for index in range(1, 21):
        server = f"10.2.0.{index}"
        handover = 0.05 * index  # inside the 0.6 s capture
        items.append(_pod(f"orders-{index}", server, -3600, handover, ports=(8080,)))
        items.append(_pod(f"orders-next-{index}", server, handover, ports=(8080,) if index % 2 else (9090,)))
    for index in range(1, 40):
        items.append(_pod(f"client-{index}", f"10.1.0.{index}", 0.01 * index))
    items.append({"kind": "Service", "metadata": {"name": "dns", "namespace": "kube-system", "creationTimestamp":
                  _moment(-7200)}, "spec": {"clusterIP": "10.96.0.10"}})  # fmt: skip
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text(json.dumps({"kind": "List", "apiVersion": "v1", "items": items}))
    for identity in (None, snapshot):
        printed = run_analyze(capture, identity)
        assert printed == reference_lines(capture, identity)
    lines = printed.splitlines()
    assert len(lines) > 5000
    assert sum(b'"pod":"orders-next-' in line for line in lines) > 100
    assert sum(b'"pod":"orders-' in line and b'"pod":"orders-next-' not in line for line in lines) > 100


# -- the splicer on generated calls ------------------------------------------------------------

IDENTITY = IdentityMap.from_snapshot(SNAPSHOT)
ADDRESSES = [*sorted(IDENTITY._claims), "192.0.2.1", "", "2001:db8::1"]
MOMENTS = sorted(
    {moment + delta for ip in ADDRESSES for moment in IDENTITY.describe_address(ip)[0] for delta in (-1, 0, 1)}
)
PORTS = [0, 53, 3000, 6379, 8080, 8443, 9100, 9153, 40000]


@st.composite
def endpoints(draw: st.DrawFn) -> dict[str, Any]:
    fields: dict[str, Any] = {"ip": draw(st.sampled_from(ADDRESSES)), "port": draw(st.sampled_from(PORTS))}
    if draw(st.integers(0, 9)) == 0:  # already named: the object path's business
        fields[draw(st.sampled_from(["name", "namespace", "mesh", "cluster"]))] = draw(st.text(max_size=4))
    return fields


@st.composite
def calls(draw: st.DrawFn) -> ApiCall:
    call = ApiCall(
        id=draw(st.text(max_size=6)),
        protocol=draw(st.sampled_from(["http", "dns", "", "grpc", "caf\u00e9"])),
        node=draw(st.sampled_from(["", "n1", "n2"])),
        method=draw(st.text(max_size=4)),
        shard=draw(st.integers(0, 2**32 - 1)),
    )
    for side in ("src", "dst"):
        fields = draw(st.one_of(st.none(), endpoints()))
        if fields is not None:
            getattr(call, side).SetInParent()
            for name, value in fields.items():
                setattr(getattr(call, side), name, value)
    if draw(st.booleans()):
        call.request.ts = draw(st.one_of(st.sampled_from(MOMENTS), st.integers(0, 2**64 - 1)))
        call.request.size = draw(st.integers(0, 2**20))
        call.request.headers.add(name="host", value=draw(st.text(max_size=8)))
    if draw(st.booleans()):
        call.http.version = "1.1"
    call.notes.extend(draw(st.lists(st.text(max_size=3), max_size=2)))
    return call


def _enricher(identity: IdentityMap) -> Enricher:
    return Enricher(build_enricher(None).settings, identity)


def _counts(enricher: Enricher) -> dict[str, dict[Any, float]]:
    names = ("trawl_enricher_calls_total", "trawl_enricher_unknown_peers_total", "trawl_enricher_call_failures_total")
    return {name: dict(enricher.metrics.counter(name, "").values) for name in names}


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(calls(), max_size=12), with_snapshot=st.booleans())
def test_enrich_encoded_is_enrich_calls_serialized(batch: list[ApiCall], with_snapshot: bool) -> None:
    identity = IDENTITY if with_snapshot else IdentityMap.empty()
    spliced, objects = _enricher(identity), _enricher(identity)
    encoded = [call.SerializeToString() for call in batch]
    objects.enrich_calls(batch)
    enriched = spliced.enrich_encoded(encoded)
    assert enriched == [call.SerializeToString() for call in batch]
    assert _counts(spliced) == _counts(objects)
    assert calls_to_json_lines(enriched) == calls_to_json_lines(batch)


def test_the_splicer_keeps_its_answers_per_address_and_is_bounded() -> None:
    asked: list[str] = []

    def describe(ip: str) -> Any:
        asked.append(ip)
        return IDENTITY.describe_address(ip)

    splicer = _calljson.Splicer(describe, max_addresses=2)
    call = ApiCall(protocol="http")
    call.src.ip, call.dst.ip, call.dst.port, call.request.ts = "10.244.1.30", "10.96.12.34", 80, MOMENTS[-1]
    first = splicer.enrich([call.SerializeToString()] * 3)
    assert asked == ["10.244.1.30", "10.96.12.34"]  # once per address, not per call
    assert first[1:] == (0, 0, {b"http": 3}, [])
    call.src.ip = "192.0.2.1"
    splicer.enrich([call.SerializeToString()])
    call.src.ip = "10.244.1.30"
    again = splicer.enrich([call.SerializeToString()])
    assert asked[2:] == ["192.0.2.1", "10.244.1.30"]  # the cache was full: emptied, asked again
    assert again[0] == first[0][:1]


def test_calls_the_splicer_does_not_cover_are_enriched_as_objects() -> None:
    named, lone, plain = ApiCall(protocol="http"), ApiCall(protocol="dns"), ApiCall(protocol="http")
    named.src.ip, named.src.name, named.dst.ip = "10.244.1.12", "kept?", "10.96.12.34"
    lone.dst.ip = "10.96.0.10"
    plain.src.ip, plain.dst.ip = "10.244.1.12", "10.96.12.34"
    splicer = _calljson.Splicer(IDENTITY.describe_address)
    _, _, _, protocols, odd = splicer.enrich([call.SerializeToString() for call in (named, lone, plain)])
    assert odd == [0, 1] and protocols == {b"http": 1}
    spliced, objects = _enricher(IDENTITY), _enricher(IDENTITY)
    batch = [named, lone, plain]
    enriched = spliced.enrich_encoded([call.SerializeToString() for call in batch])
    objects.enrich_calls(batch)
    assert enriched == [call.SerializeToString() for call in batch]
    assert _counts(spliced) == _counts(objects)


def test_a_failing_describe_falls_back_to_objects_for_the_batch() -> None:
    class Broken(IdentityMap):
        def describe_address(self, ip: str) -> Any:
            raise RuntimeError("boom")

    broken = Broken()
    call = ApiCall(protocol="http")
    call.src.ip, call.dst.ip = "10.0.0.1", "10.0.0.2"
    enricher = _enricher(broken)
    assert enricher.enrich_encoded([call.SerializeToString()]) == [enricher.enrich(call).SerializeToString()]


@settings(max_examples=scaled(500), deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_the_splicer_takes_any_bytes(data: list[bytes]) -> None:
    enriched, unknown_sources, unknown_destinations, protocols, odd = _calljson.Splicer(
        IDENTITY.describe_address
    ).enrich(data)
    assert len(enriched) == len(data) and all(type(item) is bytes for item in enriched)
    assert all(enriched[index] is data[index] for index in odd)
    assert sum(protocols.values()) == len(data) - len(odd)
    assert 0 <= unknown_sources <= len(data) and 0 <= unknown_destinations <= len(data)


def _mutations(encoded: bytes) -> st.SearchStrategy[bytes]:
    flips = st.lists(st.tuples(st.integers(0, max(len(encoded) - 1, 0)), st.integers(0, 255)), max_size=3)
    return st.tuples(flips, st.integers(0, len(encoded))).map(
        lambda change: bytes(dict(change[0]).get(index, value) for index, value in enumerate(encoded))[: change[1]]
    )


@settings(max_examples=scaled(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_damaged_calls_are_spliced_as_a_parser_reads_them_or_left_alone(data: st.DataObject) -> None:
    encoded = data.draw(calls()).SerializeToString()
    damaged = data.draw(_mutations(encoded))
    enriched, _, _, _, odd = _calljson.Splicer(IDENTITY.describe_address).enrich([damaged])
    if odd:
        assert enriched == [damaged]
        return
    try:
        expected = ApiCall.FromString(damaged)
    except DecodeError:
        return  # not an ApiCall: nothing to compare with (the object path would fail on it)
    IDENTITY.enrich(expected)
    assert ApiCall.FromString(enriched[0]) == expected


# -- the dissector's router and CallBatch framing ----------------------------------------------


def _fixture_calls() -> Iterator[bytes]:
    for path in CAPTURES:
        dissector = Dissector(DissectorSettings.load(None, node="n1"), "n1")
        sequence = 0
        try:
            for read in CaptureFile(path).batches(64, 1 << 20):
                sequence += 1
                message = read.message(node=f"n{sequence % 2}", shard=sequence % 3, sequence=1, source="t")
                yield from dissector.feed_encoded(message)
        except InputError:
            pass
        yield from dissector.finish_encoded()


def _route_by_parsing(encoded: list[bytes]) -> list[tuple[str, int, list[bytes]]]:
    runs: list[tuple[str, int, list[bytes]]] = []
    for item in encoded:
        call = ApiCall.FromString(item)
        if runs and runs[-1][:2] == (call.node, call.shard):
            runs[-1][2].append(item)
        else:
            runs.append((call.node, call.shard, [item]))
    return runs


def test_route_calls_groups_runs_of_node_and_shard_as_a_parser_reads_them() -> None:
    encoded = list(_fixture_calls())
    assert len({(call.node, call.shard) for call in map(ApiCall.FromString, encoded)}) > 1
    assert _calljson.route_calls(encoded) == _route_by_parsing(encoded)
    assert _calljson.route_calls([]) == []


@settings(max_examples=scaled(200), deadline=None)
@given(st.lists(calls(), max_size=10))
def test_route_calls_on_generated_calls(batch: list[ApiCall]) -> None:
    encoded = [call.SerializeToString() for call in batch]
    assert _calljson.route_calls(encoded) == _route_by_parsing(encoded)


@settings(max_examples=scaled(500), deadline=None)
@given(st.lists(st.binary(max_size=48), max_size=6))
def test_route_calls_takes_any_bytes(data: list[bytes]) -> None:
    try:
        runs = _calljson.route_calls(data)
    except ValueError:
        return
    assert [item for _, _, members in runs for item in members] == data


@settings(max_examples=scaled(200), deadline=None)
@given(
    node=st.text(max_size=8),
    shard=st.integers(0, 2**32 - 1),
    sequence=st.integers(0, 2**64 - 1),
    batch=st.lists(calls(), max_size=5),
    end_of_input=st.booleans(),
    lost=st.integers(0, 2**64 - 1),
)
def test_frame_call_batch_is_what_protobuf_serializes(
    node: str, shard: int, sequence: int, batch: list[ApiCall], end_of_input: bool, lost: int
) -> None:
    expected = CallBatch(
        node=node, shard=shard, sequence=sequence, calls=batch, end_of_input=end_of_input, lost_packet_batches=lost
    )
    framed = frame_call_batch(node, shard, sequence, [call.SerializeToString() for call in batch], end_of_input, lost)
    assert framed == expected.SerializeToString()


# -- JSON from serialized calls ----------------------------------------------------------------


def test_json_of_serialized_calls_leaves_explicit_defaults_out_as_a_parser_does() -> None:
    """upb never writes a zero, false or empty scalar; a hand-made serialization may: a parser
    reads it as the default, which json_format leaves out, and so does the compiled encoder."""
    endpoint = b"\x0a\x00\x10\x00"  # ip "" and port 0, written out
    wire = (
        b"\x0a\x01a" + b"\x1a\x00" + b"\x32" + bytes([len(endpoint)]) + endpoint + b"\x68\x00\x70\x00" + b"\xf8\x01\x00"
    )
    reference = json.dumps(
        json_format.MessageToDict(ApiCall.FromString(wire), preserving_proto_field_name=True), separators=(",", ":")
    )
    assert reference == '{"id":"a","src":{}}'
    assert call_to_json(wire) == reference
    assert calls_to_json_lines([wire, ApiCall(id="b")]) == (reference + '\n{"id":"b"}\n').encode()
