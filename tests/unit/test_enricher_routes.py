"""The route learner (trawl.enricher.routes): OpenAPI 3 and Swagger 2 documents matched with
literals over parameters, gRPC and GraphQL paths, the learned trie collapsing a position after
N distinct segments, the per-service cap and its overflow counter, bad documents named with
their file and line; and the Enricher setting `http.route` alike on objects and on bytes."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from tests.fixtures.tcpdump_capture import free_port
from tests.unit.test_analyze_encoded import IDENTITY
from tests.unit.test_analyze_encoded import calls as generated_calls
from trawl import _calljson
from trawl.enricher.config import EnricherSettings, OpenApiSource, RouteSettings
from trawl.enricher.identity import IdentityMap
from trawl.enricher.logic import Enricher
from trawl.enricher.routes import OVERFLOW, PARAM, SHARED_SERVICE, RouteLearner, load_openapi
from trawl.errors import ConfigError
from trawl.metrics import Registry
from trawl.render import calls_to_json_lines
from trawl.v1.calls_pb2 import ApiCall, HttpDetail

OPENAPI_3 = """\
openapi: 3.0.3
info: {title: payments, version: "1"}
servers:
  - url: https://payments.example.com/v1
  - url: "{scheme}://payments/{base}"
    variables:
      scheme: {default: http}
      base: {default: api}
paths:
  /users/{id}:
    get: {}
  /users/me:
    get: {}
  /users/{id}/orders/{orderId}:
    get: {}
  /files/{name}.{ext}:
    get: {}
  /health:
    get: {}
"""

SWAGGER_2 = {
    "swagger": "2.0",
    "info": {"title": "stock", "version": "1"},
    "basePath": "/stock/v2/",
    "paths": {"/items/{sku}": {"get": {}}, "/items/{sku}/levels": {"get": {}}, "/items/search": {"get": {}}},
}


def source(tmp_path: Path, name: str, text: str, service: str = "payments") -> OpenApiSource:
    path = tmp_path / name
    path.write_text(text)
    return OpenApiSource(service=service, source=str(path))


def http_call(path: str, service: str = "payments", content_type: str = "", host: str = "") -> ApiCall:
    call = ApiCall(id="c1", protocol="http", method="GET", path=path)
    call.src.ip, call.src.port = "10.0.0.1", 40000
    call.dst.ip, call.dst.port = "10.0.0.9", 8080
    call.dst.namespace, call.dst.service = "shop", service
    call.http.request_content_type = content_type
    call.http.host = host
    call.request.ts = 1
    return call


def counter(metrics: Registry, name: str) -> str:
    return "\n".join(line for line in metrics.render().splitlines() if line.startswith(name))


# -- OpenAPI documents ---------------------------------------------------------------------


def test_openapi_3_templates_with_server_prefixes_literal_before_parameter(tmp_path: Path) -> None:
    document = load_openapi(source(tmp_path, "openapi.yaml", OPENAPI_3))
    assert document.prefixes == ["/api", "/v1"]
    assert document.route("/v1/users/42") == "/v1/users/{id}"
    assert document.route("/v1/users/me") == "/v1/users/me"  # the literal wins
    # "me" is a literal of /users, but only {id} goes on with /orders: the match backtracks.
    assert document.route("/v1/users/me/orders/7") == "/v1/users/{id}/orders/{orderId}"
    assert document.route("/v1/files/report.pdf") == "/v1/files/{name}.{ext}"
    assert document.route("/api/users/42") == "/api/users/{id}"  # the server variable's default
    assert document.route("/v1/users/42/") == "/v1/users/{id}"
    assert document.route("/users/42") == ""  # no server prefix
    assert document.route("/v1/users") == ""
    assert document.route("/v1/users//orders/1") == ""  # an empty segment is no parameter value


def test_swagger_2_json_with_base_path(tmp_path: Path) -> None:
    document = load_openapi(source(tmp_path, "swagger.json", json.dumps(SWAGGER_2, indent=1)))
    assert document.route("/stock/v2/items/A-1") == "/stock/v2/items/{sku}"
    assert document.route("/stock/v2/items/search") == "/stock/v2/items/search"
    assert document.route("/stock/v2/items/A-1/levels") == "/stock/v2/items/{sku}/levels"
    assert document.route("/stock/v1/items/A-1") == ""


def test_document_served_over_http_is_read(tmp_path: Path) -> None:
    (tmp_path / "openapi.yaml").write_text(OPENAPI_3)
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/openapi.yaml"
        document = load_openapi(OpenApiSource(service="payments", source=url))
    finally:
        server.shutdown()
        server.server_close()
    assert document.route("/v1/users/1") == "/v1/users/{id}"


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("openapi: 3.0.0\npaths:\n  /a: {get: {}\n", 4, "not a YAML or JSON"),
        ("openapi: 3.0.0\ninfo: {}\npaths: []\n", 3, "'paths' must be a mapping"),
        ("openapi: 3.0.0\npaths:\n  /a: {}\n  b/{id}: {}\n", 4, "must start with '/'"),
        ("openapi: 3.0.0\npaths:\n  /a/{id: {}\n", 3, "unbalanced braces"),
        ("openapi: 2.0.0\npaths:\n  /a: {}\n", 1, "only OpenAPI 3.x"),
        ("info: {}\npaths:\n  /a: {}\n", 1, "neither an 'openapi: 3.x'"),
        ("swagger: '2.0'\nbasePath: v2\npaths:\n  /a: {}\n", 2, "basePath"),
        ("openapi: 3.0.0\nservers: {url: /x}\npaths:\n  /a: {}\n", 2, "'servers' must be a list"),
    ],
)
def test_bad_document_names_its_file_and_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    spec = source(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_openapi(spec)
    assert caught.value.path == spec.source
    assert caught.value.line == line
    assert words in str(caught.value)


def test_missing_file_and_unreachable_url_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the OpenAPI document.*fix the path") as caught:
        load_openapi(OpenApiSource(service="s", source=str(tmp_path / "nowhere.yaml")))
    assert caught.value.path == str(tmp_path / "nowhere.yaml")
    url = f"http://127.0.0.1:{free_port()}/openapi.yaml"  # nothing listens there
    with pytest.raises(ConfigError, match=r"cannot fetch the OpenAPI document.*reachable") as caught:
        load_openapi(OpenApiSource(service="s", source=url), timeout_s=2.0)
    assert caught.value.path == url


def test_config_block_loads_from_the_enricher_section(tmp_path: Path) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text(
        "enricher:\n  routes:\n    collapse_after: 4\n    openapi:\n"
        "      - {service: payments, namespace: shop, source: openapi.yaml}\n"
    )
    loaded = EnricherSettings.load(config)
    assert loaded.routes.active and loaded.routes.collapse_after == 4
    assert loaded.routes.openapi[0] == OpenApiSource(service="payments", namespace="shop", source="openapi.yaml")
    config.write_text("enricher:\n  routes:\n    collapse_afer: 4\n")
    with pytest.raises(ConfigError) as caught:
        EnricherSettings.load(config)
    assert caught.value.line == 3 and "collapse_afer" in str(caught.value)
    assert EnricherSettings().routes.active  # on by default: it bounds the spans' and metrics' series
    config.write_text("enricher:\n  routes:\n    enabled: false\n")
    assert not EnricherSettings.load(config).routes.active
    config.write_text("enricher:\n  routes:\n    enabled: true\n    redis_url: localhost:6379\n")
    with pytest.raises(ConfigError, match="redis://") as caught:
        EnricherSettings.load(config)
    assert caught.value.line == 4


# -- the learner ---------------------------------------------------------------------------


def test_documents_first_for_their_service_then_grpc_graphql_and_the_heuristic(tmp_path: Path) -> None:
    learner = RouteLearner([load_openapi(source(tmp_path, "openapi.yaml", OPENAPI_3))])
    assert learner.route_of(http_call("/v1/users/42?x=1")) == "/v1/users/{id}"
    # Another service: the document does not describe it; the heuristic templates the id.
    assert learner.route_of(http_call("/v1/users/42", service="billing")) == "/v1/users/{id}"
    assert learner.route_of(http_call("/v1/users/me/x", service="billing")) == "/v1/users/me/x"
    # The Host header names the service too.
    assert learner.route_of(http_call("/v1/health", service="", host="payments:80")) == "/v1/health"
    # A path the document does not know is learned.
    assert learner.route_of(http_call("/v1/orders/ab12cd34ef56ab12")) == "/v1/orders/{id}"
    grpc = http_call("/shop.Cart/AddItem", content_type="application/grpc+proto")
    assert learner.route_of(grpc) == "/shop.Cart/AddItem"
    assert learner.route_of(http_call("/gql/graphql?op=Q")) == "/gql/graphql"
    assert learner.route_of(http_call("/q", content_type="application/graphql")) == "/q"
    assert learner.route_of(http_call("payments:443")) == ""  # CONNECT: no path
    assert learner.route_of(http_call("http://payments/v1/users/3")) == "/v1/users/{id}"


def test_namespace_restricts_a_document(tmp_path: Path) -> None:
    spec = source(tmp_path, "openapi.yaml", OPENAPI_3).model_copy(update={"namespace": "prod"})
    learner = RouteLearner([load_openapi(spec)])
    assert learner.route_of(http_call("/v1/users/me/orders/9")) == "/v1/users/me/orders/{id}"  # shop: learned


def test_a_position_collapses_after_n_distinct_segments() -> None:
    metrics = Registry()
    learner = RouteLearner(collapse_after=3, metrics=metrics)
    names = ["alice", "bob", "carol"]
    assert [learner.learn("s", f"/users/{name}/cart") for name in names] == [f"/users/{n}/cart" for n in names]
    assert learner.learn("s", "/users/dave/cart") == f"/users/{PARAM}/cart"
    # Collapsed for good: the names seen before take the parameter too, and so does the next.
    assert learner.learn("s", "/users/alice/cart") == f"/users/{PARAM}/cart"
    assert learner.learn("s", "/users/erin/cart") == f"/users/{PARAM}/cart"
    assert learner.learn("s", "/users") == "/users"
    assert learner.routes("s") == {f"/users/{PARAM}/cart", "/users"}
    assert 'trawl_enricher_routes_collapsed_total{service="s"} 1' in counter(metrics, "trawl_enricher_routes_col")
    # Another service learns apart.
    assert learner.learn("t", "/users/dave/cart") == "/users/dave/cart"


def test_collapse_merges_what_was_below() -> None:
    learner = RouteLearner(collapse_after=2)
    learner.learn("s", "/a/x/1")  # 1 is {id}
    learner.learn("s", "/b/y")
    learner.learn("s", "/b/z")
    # The third first segment collapses the position; below it x, y and z are then three
    # children of one node: collapsed in turn.
    assert learner.learn("s", "/c/x/2") == f"/{PARAM}/{PARAM}/{{id}}"
    assert learner.routes("s") == {f"/{PARAM}/{PARAM}/{{id}}", f"/{PARAM}/{PARAM}"}


def test_cap_on_routes_per_service_overflows_and_counts() -> None:
    metrics = Registry()
    learner = RouteLearner(collapse_after=100, max_routes_per_service=3, metrics=metrics)
    assert [learner.learn("s", f"/p{n}") for n in range(3)] == ["/p0", "/p1", "/p2"]
    assert learner.learn("s", "/p3") == OVERFLOW
    assert learner.learn("s", "/p4/deeper") == OVERFLOW
    assert learner.learn("s", "/p1") == "/p1"  # known routes go on
    assert 'trawl_enricher_routes_overflow_total{service="s"} 2' in counter(metrics, "trawl_enricher_routes_over")

    # Through the caches of route_of and of the splicer's route_encoded, every call is counted.
    calls = [http_call("/q/1"), http_call("/q/2"), http_call("/q/3"), http_call("/q/4"), http_call("/q/4")]
    learner = RouteLearner(collapse_after=100, max_routes_per_service=3, metrics=metrics)
    assert [learner.route_of(call) for call in calls[:4]] == ["/q/{id}", "/q/{id}", "/q/{id}", "/q/{id}"]
    for index, call in enumerate(calls):
        call.path = f"/p{min(index, 3)}"
    assert [learner.route_of(call) for call in calls] == ["/p0", "/p1", OVERFLOW, OVERFLOW, OVERFLOW]
    dst, http = calls[0].dst.SerializeToString(), calls[0].http.SerializeToString()
    assert [learner.route_encoded(dst, path, http) for path in (b"/p3", b"/p3?x=1", b"/p0")] == [
        OVERFLOW,
        OVERFLOW,
        "/p0",
    ]
    assert 'trawl_enricher_routes_overflow_total{service="shop/payments"} 5' in counter(
        metrics, "trawl_enricher_routes_over"
    )


def test_grpc_methods_are_kept_whole_under_the_cap() -> None:
    metrics = Registry()
    learner = RouteLearner(collapse_after=2, max_routes_per_service=3, metrics=metrics)
    methods = [f"/shop.Cart/M{n}" for n in range(4)]
    routes = [learner.route_of(http_call(method, content_type="application/grpc")) for method in methods]
    assert routes == [*methods[:3], OVERFLOW]  # never collapsed, but capped
    assert learner.route_of(http_call(methods[0], content_type="application/grpc")) == methods[0]
    assert 'trawl_enricher_routes_overflow_total{service="shop/payments"} 1' in counter(
        metrics, "trawl_enricher_routes_over"
    )


def test_services_past_the_cap_share_one_trie() -> None:
    metrics = Registry()
    learner = RouteLearner(max_services=2, metrics=metrics)
    for name in ("a", "b", "c", "d"):
        learner.learn(name, f"/{name}")
    assert set(learner.services()) == {"a", "b", SHARED_SERVICE}
    assert learner.routes(SHARED_SERVICE) == {"/c", "/d"}
    assert "trawl_enricher_routes_services_overflow_total 2" in counter(metrics, "trawl_enricher_routes_serv")


def test_memory_is_bounded_on_endless_new_paths_and_services() -> None:
    import random

    chooser = random.Random(7)
    learner = RouteLearner(collapse_after=8, max_routes_per_service=20, max_services=5, max_segments=6)
    for n in range(20_000):
        depth = chooser.randint(1, 9)
        path = "/" + "/".join(f"s{chooser.randint(0, 10**6)}" for _ in range(depth))
        learner.route_of(http_call(path, service=f"svc{n % 50}"))
    assert len(learner.services()) <= 5 + 1  # and the shared one
    for name, state in learner.services().items():
        assert len(learner.routes(name)) == state.routes <= 20
        assert state.nodes <= learner.max_nodes


def test_long_paths_are_cut_at_max_segments() -> None:
    learner = RouteLearner(max_segments=3)
    assert learner.learn("s", "/a/b/c/d/e") == "/a/b/c/{rest}"
    assert learner.learn("s", "/a/b/c/f") == "/a/b/c/{rest}"


SEGMENTS = st.sampled_from(["a", "b", "c", "d", "e", "f", "42", "x9", "ff00ff00ff00ff", ""])
PATHS = st.lists(SEGMENTS, min_size=0, max_size=5).map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(st.tuples(st.sampled_from(["s1", "s2", "s3"]), PATHS), max_size=200),
    collapse_after=st.integers(1, 6),
    cap=st.integers(1, 12),
)
def test_routes_stay_under_the_cap_and_settle(requests: list[tuple[str, str]], collapse_after: int, cap: int) -> None:
    learner = RouteLearner(collapse_after=collapse_after, max_routes_per_service=cap, max_services=2)
    first = [learner.learn(service, path) for service, path in requests]
    for service in learner.services():
        assert len(learner.routes(service)) <= cap
    assert all(route.startswith("/") for route in first)
    # Learning only ever collapses positions and adds routes, both bounded: passes over the same
    # paths settle, and then every path keeps its route.
    previous, settled = first, False
    for _ in range(50):
        again = [learner.learn(service, path) for service, path in requests]
        for service in learner.services():
            assert len(learner.routes(service)) <= cap
        if again == previous:
            settled = True
            break
        for before, after in zip(previous, again, strict=True):
            # A route only gets coarser: a literal segment may become {param}, never the reverse.
            if OVERFLOW not in (before, after):
                assert all(b == a or a == PARAM for b, a in zip(before.split("/"), after.split("/"), strict=True))
        previous = again
    assert settled
    # A route has its path's segments: the path's own or {param}/{id} in their place.
    for (_, path), route in zip(requests, previous, strict=True):
        if route != OVERFLOW:
            assert len(route.split("/")) == len(path.split("/"))


@settings(max_examples=scaled(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(st.tuples(st.sampled_from(["s1", "s2"]), PATHS), max_size=120),
    collapse_after=st.integers(1, 5),
    cap=st.integers(1, 12),
)
def test_what_redis_keeps_gives_another_learner_the_same_routes(
    requests: list[tuple[str, str]], collapse_after: int, cap: int
) -> None:
    one = RouteLearner(collapse_after=collapse_after, max_routes_per_service=cap)
    for _ in range(50):  # until settled (see above)
        if [one.learn(service, path) for service, path in requests] == [
            one.learn(service, path) for service, path in requests
        ]:
            break
    other = RouteLearner(collapse_after=collapse_after, max_routes_per_service=cap)
    for service in one.services():
        routes, collapsed = one.learned(service)
        other.merge_remote(service, collapsed, routes)
        assert other.learned(service) == (routes, collapsed)
    for service, path in requests:
        route = one.learn(service, path)
        if route != OVERFLOW:
            assert other.learn(service, path) == route


def test_an_empty_first_segment_is_not_the_root() -> None:
    one = RouteLearner(collapse_after=2)
    assert [one.learn("s", path) for path in ("//a", "//b", "//c")] == ["//a", "//b", f"//{PARAM}"]
    routes, collapsed = one.learned("s")
    assert (routes, collapsed) == ({f"//{PARAM}"}, {"/"})  # the position after "/", not the root's ("")
    other = RouteLearner(collapse_after=2)
    other.merge_remote("s", collapsed, routes)
    assert other.learn("s", "//zz") == f"//{PARAM}"
    assert other.learn("s", "/x") == "/x"  # the root was not collapsed


# -- the Enricher sets it, on objects and on bytes -----------------------------------------


def test_enricher_sets_the_route_alike_on_objects_and_on_bytes(tmp_path: Path) -> None:
    spec = source(tmp_path, "openapi.yaml", OPENAPI_3)
    routes = RouteSettings(openapi=[spec], collapse_after=2)
    calls = [http_call(path) for path in ("/v1/users/1", "/x/a", "/x/b", "/x/c", "/x/a")]
    calls.append(ApiCall(id="dns", protocol="dns", path="example.com"))
    grpc = ApiCall(id="g", protocol="grpc", path="/a.B/C")
    grpc.grpc.service = "a.B"
    calls.append(grpc)
    already = http_call("/v1/users/2")
    already.http.route = "/given"
    calls.append(already)

    def enricher() -> Enricher:
        metrics = Registry()
        return Enricher(EnricherSettings(), IdentityMap.empty(), routes=RouteLearner.from_settings(routes, metrics))

    objects = [ApiCall.FromString(call.SerializeToString()) for call in calls]
    enricher().enrich_calls(objects)
    assert [call.http.route for call in objects[:5]] == ["/v1/users/{id}", "/x/a", "/x/b", "/x/{param}", "/x/{param}"]
    assert objects[5].WhichOneof("detail") is None and objects[6].grpc.service == "a.B"  # untouched
    assert objects[7].http.route == "/given"
    encoded = enricher().enrich_encoded([call.SerializeToString() for call in calls])
    assert encoded == [call.SerializeToString() for call in objects]


@st.composite
def http_calls(draw: st.DrawFn) -> ApiCall:
    """test_analyze_encoded's generated calls, most with an HTTP detail, a path and sometimes a route."""
    call = draw(generated_calls())
    call.path = draw(st.sampled_from(["", "/", "/a/1", "/a/b", "/a/c?q=1", "/x/ff00ff00ff00ff", "*", "/\u00e9/2"]))
    if draw(st.integers(0, 4)):
        call.http.host = draw(st.sampled_from(["", "payments", "svc:80"]))
        call.http.request_content_type = draw(st.sampled_from(["", "application/json", "application/grpc"]))
        if draw(st.integers(0, 4)) == 0:
            call.http.route = "/given"
    return call


def routed_enricher(collapse_after: int = 2) -> Enricher:
    learner = RouteLearner.from_settings(RouteSettings(enabled=True, collapse_after=collapse_after), Registry())
    return Enricher(EnricherSettings(), IDENTITY, routes=learner)


@settings(max_examples=scaled(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(http_calls(), max_size=12))
def test_the_splicer_sets_routes_as_the_object_path_does(batch: list[ApiCall]) -> None:
    spliced, objects = routed_enricher(), routed_enricher()
    encoded = [call.SerializeToString() for call in batch]
    objects.enrich_calls(batch)
    enriched = spliced.enrich_encoded(encoded)
    assert enriched == [call.SerializeToString() for call in batch]
    assert calls_to_json_lines(enriched) == calls_to_json_lines(batch)


def _path_route(dst: bytes, path: bytes, http: bytes) -> str | None:
    return f"/r{len(path)}" if path else None


@settings(max_examples=scaled(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_damaged_calls_get_their_route_as_a_parser_reads_them_or_are_left_alone(data: st.DataObject) -> None:
    encoded = data.draw(http_calls()).SerializeToString()
    flips = st.lists(st.tuples(st.integers(0, max(len(encoded) - 1, 0)), st.integers(0, 255)), max_size=3)
    change = data.draw(st.tuples(flips, st.integers(0, len(encoded))))
    damaged = bytes(dict(change[0]).get(index, value) for index, value in enumerate(encoded))[: change[1]]
    enriched, _, _, _, odd = _calljson.Splicer(IDENTITY.describe_address, route=_path_route).enrich([damaged])
    if odd:
        assert enriched == [damaged]
        return
    try:
        expected = ApiCall.FromString(damaged)
    except DecodeError:
        return  # not an ApiCall: nothing to compare with
    IDENTITY.enrich(expected)
    if expected.WhichOneof("detail") == "http" and not expected.http.route:
        route = _path_route(b"", expected.path.encode(), b"")
        if route:
            expected.http.route = route
    assert ApiCall.FromString(enriched[0]) == expected


@settings(max_examples=scaled(300), deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_the_route_splicer_takes_any_bytes(data: list[bytes]) -> None:
    enriched, _, _, protocols, odd = _calljson.Splicer(IDENTITY.describe_address, route=_path_route).enrich(data)
    assert len(enriched) == len(data) and all(type(item) is bytes for item in enriched)
    assert sum(protocols.values()) == len(data) - len(odd)


def test_an_explicit_empty_route_is_no_route_and_the_last_one_counts() -> None:
    call = ApiCall(id="c", protocol="http", path="/v1/users/1")
    call.src.ip, call.dst.ip, call.dst.port = "10.0.0.1", "10.0.0.9", 80
    detail = HttpDetail(version="1.1").SerializeToString()
    splicer = _calljson.Splicer(IDENTITY.describe_address, route=_path_route)
    for tail, expected in ((b"\x5a\x00", "/r11"), (b"\x5a\x01x", "x"), (b"\x5a\x01x\x5a\x00", "/r11")):
        content = detail + tail
        encoded = call.SerializeToString() + b"\xa2\x01" + bytes([len(content)]) + content
        (enriched,), _, _, _, odd = splicer.enrich([encoded])
        assert odd == []
        assert ApiCall.FromString(enriched).http.route == expected


def test_a_failing_route_falls_back_to_objects_and_a_bad_answer_is_refused() -> None:
    call = ApiCall(id="c", protocol="http", path="/v1/users/1")
    call.src.ip, call.dst.ip, call.dst.port, call.http.version = "10.0.0.1", "10.0.0.9", 80, "1.1"
    assert _calljson.Splicer(IDENTITY.describe_address, route=_path_route).enrich([call.SerializeToString()])[4] == []

    def broken(dst: bytes, path: bytes, http: bytes) -> str | None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _calljson.Splicer(IDENTITY.describe_address, route=broken).enrich([call.SerializeToString()])
    with pytest.raises(TypeError, match="route\\(\\) must return str or None"):
        _calljson.Splicer(IDENTITY.describe_address, route=lambda *_: b"/x").enrich([call.SerializeToString()])
    with pytest.raises(TypeError):
        _calljson.Splicer(IDENTITY.describe_address, route=1)  # type: ignore[arg-type]
    # The enricher goes on with the object path for that batch: routed there.
    enricher = routed_enricher()
    assert enricher.routes is not None
    enricher.routes.route_encoded = broken  # type: ignore[method-assign]
    (enriched,) = enricher.enrich_encoded([call.SerializeToString()])
    assert ApiCall.FromString(enriched).http.route == "/v1/users/{id}"


# -- OpenAPI matching against a plain reference --------------------------------------------

TEMPLATE_SEGMENTS = st.sampled_from(["a", "b", "{x}", "{y}", "{n}.json", "v{n}", "a.json"])
TEMPLATES = st.lists(TEMPLATE_SEGMENTS, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))
REQUEST_SEGMENTS = st.sampled_from(["a", "b", "c", "a.json", "b.json", "v1", "v", ""])


def _rank(segment: str) -> int:
    """OpenAPI's order: a literal segment before a templated one, a partly literal one in between."""
    if "{" not in segment:
        return 0
    return 2 if segment.startswith("{") and segment.endswith("}") and segment.count("{") == 1 else 1


def _reference(templates: list[str], path: str) -> str:
    """Every template as one regular expression; of those matching, the most concrete position
    by position (the first given among equals). One trailing slash is forgiven when nothing
    matches with it."""
    found = _most_concrete(templates, path)
    if not found and len(path) > 1 and path.endswith("/"):
        found = _most_concrete(templates, path[:-1])
    return found


def _most_concrete(templates: list[str], path: str) -> str:
    import re

    matching = []
    for order, template in enumerate(templates):
        parts = [re.escape(part) for part in re.split(r"\{[^{}/]*\}", template)]
        if re.fullmatch("[^/]+?".join(parts), path):
            matching.append(([_rank(segment) for segment in template.split("/")], order, template))
    return min(matching)[2] if matching else ""


@settings(max_examples=scaled(300), deadline=None)
@given(
    templates=st.lists(TEMPLATES, min_size=1, max_size=8, unique=True),
    path=st.lists(REQUEST_SEGMENTS, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts)),
)
def test_openapi_matching_is_the_most_concrete_template(
    tmp_path_factory: pytest.TempPathFactory, templates: list[str], path: str
) -> None:
    document = {"openapi": "3.0.0", "paths": {template: {"get": {}} for template in templates}}
    folder = tmp_path_factory.mktemp("openapi")
    loaded = load_openapi(source(folder, "doc.json", json.dumps(document)))
    assert loaded.route(path) == _reference(templates, path)
