"""GraphQL over HTTP (protocols/graphql.py): the operations of real requests (the eight of the
graphql_http1/graphql_http2 captures, extracted by tshark and by Trawl's own HTTP/1 parser;
Apollo- and gql-shaped bodies encoded by httpx), the errors of real results (graphql-core's
`graphql_sync` run against a small schema), bodies cut by the body limit at every length, the
token budget, the record `apply` builds, and what the project's Redactor does to GraphQL
variables in a JSON body and in a GET query string."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from graphql import build_schema, graphql_sync, parse, print_ast

from tests.conftest import FIXTURES, needs_binary
from tests.unit.dissector_builders import dissect_capture
from trawl.dissector.config import DEFAULT_REDACT_FIELDS, DEFAULT_REDACT_HEADERS
from trawl.dissector.protocols.graphql import (
    MAX_ERROR_CHARS,
    MAX_TOKENS,
    GraphqlRequest,
    GraphqlResponse,
    Operation,
    apply,
    operation_label,
    parse_request,
    parse_response,
)
from trawl.dissector.redact import REDACTED, Redactor
from trawl.v1.calls_pb2 import ApiCall, Outcome

HTTP2_FIXTURES = FIXTURES / "http2"
APQ_HASH = "683644779295749e4e941d6a3fe5a5ce22f2e335c03a4a842d00b0accfd4bc3f"
REDACTOR = Redactor(DEFAULT_REDACT_HEADERS, DEFAULT_REDACT_FIELDS)

# What the eight requests of graphql_http1.pcap and graphql_http2.pcap are (README there), and
# the (errors, first error, results) of their answers.
EXPECTED_REQUESTS = [
    ((Operation("query", "GetOrder", ""),), False),
    ((Operation("query", "", ""),), False),
    ((Operation("mutation", "Login", ""),), False),
    ((Operation("query", "GetOrder", ""), Operation("query", "CountOrders", "")), True),
    ((Operation("query", "OrderStatus", ""),), False),
    ((Operation("query", "Broken", ""),), False),
    ((Operation("query", "ListOrders", APQ_HASH),), False),
    # By hash alone, over POST: no document says the type.
    ((Operation("", "ListOrders", APQ_HASH),), False),
]
EXPECTED_RESPONSES = [
    GraphqlResponse(0, "", 1),
    GraphqlResponse(0, "", 1),
    GraphqlResponse(0, "", 1),
    GraphqlResponse(0, "", 2),
    GraphqlResponse(0, "", 1),
    GraphqlResponse(1, "the broken field always fails", 1),
    GraphqlResponse(0, "", 1),
    GraphqlResponse(0, "", 1),
]


# -- the captures, read by tshark ----------------------------------------------------------------


def _tshark_json(path: Path, decode_as: str, display_filter: str, *fields: str) -> list[dict[str, list[str]]]:
    args = ["tshark", "-r", str(path), "-d", decode_as, "-Y", display_filter, "-T", "json"]
    for name in fields:
        args += ["-e", name]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    return [packet["_source"]["layers"] for packet in json.loads(out)]


def _tshark_bytes(value: str) -> bytes:
    """tshark 4.0 prints http.file_data as text and bytes fields as hex (newer ones print both as hex)."""
    hex_digits = value.replace(":", "")
    if hex_digits and len(hex_digits) % 2 == 0 and all(ch in "0123456789abcdef" for ch in hex_digits):
        return bytes.fromhex(hex_digits)
    return value.encode()


Exchange = tuple[tuple[str, str, str, bytes], tuple[str, int, bytes]]


def http1_exchanges() -> list[Exchange]:
    """(method, target, content type, body) and (content type, status, body) per exchange."""
    packets = _tshark_json(
        HTTP2_FIXTURES / "graphql_http1.pcap",
        "tcp.port==39530,http",
        "http",
        "http.request.method",
        "http.request.uri",
        "http.response.code",
        "http.content_type",
        "http.file_data",
    )
    requests, responses = [], []
    for layers in packets:
        content_type = layers.get("http.content_type", [""])[0]
        body = _tshark_bytes(layers.get("http.file_data", [""])[0])
        if "http.request.method" in layers:
            requests.append((layers["http.request.method"][0], layers["http.request.uri"][0], content_type, body))
        else:
            responses.append((content_type, int(layers["http.response.code"][0]), body))
    return list(zip(requests, responses, strict=True))


def http2_exchanges() -> list[Exchange]:
    """The same, per HTTP/2 stream: headers from the HEADERS frames, each direction's body from
    its END_STREAM DATA frame (where tshark shows the body reassembled)."""
    path, rule, server_port = HTTP2_FIXTURES / "graphql_http2.pcap", "tcp.port==39531,http2", "39531"
    heads: dict[tuple[str, bool], dict[str, str]] = {}
    for layers in _tshark_json(
        path, rule, "http2.type == 1", "http2.streamid", "http2.header.name", "http2.header.value"
    ):
        streams = {stream for stream in layers["http2.streamid"] if stream != "0"}
        assert len(streams) == 1, "one HEADERS frame per packet in this capture"
        headers = dict(zip(layers["http2.header.name"], layers["http2.header.value"], strict=True))
        heads[(streams.pop(), ":status" in headers)] = headers
    bodies: dict[tuple[str, bool], bytes] = {}
    for layers in _tshark_json(
        path, rule, "http2.type == 0 && http2.flags.end_stream == 1 && http2.data.data",
        "tcp.srcport", "http2.streamid", "http2.data.data",
    ):  # fmt: skip
        streams = {stream for stream in layers["http2.streamid"] if stream != "0"}
        assert len(streams) == 1
        bodies[(streams.pop(), layers["tcp.srcport"][0] == server_port)] = _tshark_bytes(layers["http2.data.data"][-1])
    exchanges = []
    for stream in sorted({stream for stream, _ in heads}, key=int):
        request, response = heads[(stream, False)], heads[(stream, True)]
        exchanges.append(
            (
                (
                    request[":method"],
                    request[":path"],
                    request.get("content-type", ""),
                    bodies.get((stream, False), b""),
                ),
                (response.get("content-type", ""), int(response[":status"]), bodies.get((stream, True), b"")),
            )
        )
    return exchanges


@needs_binary("tshark")
@pytest.mark.parametrize("read", [http1_exchanges, http2_exchanges], ids=["http1", "http2"])
def test_the_captured_requests_and_results(read: Any) -> None:
    """The eight requests of both captures, over HTTP/1.1 and over HTTP/2: the same operations
    and the same errors, whichever framing carried them."""
    exchanges = read()
    assert len(exchanges) == 8
    for ((method, target, content_type, body), (response_type, status, response_body)), expected, answer in zip(
        exchanges, EXPECTED_REQUESTS, EXPECTED_RESPONSES, strict=True
    ):
        request = parse_request(method, target, content_type, body, body_complete=True)
        assert request == GraphqlRequest(expected[0], expected[1], ()), (method, target, body)
        assert status == 200
        assert parse_response(response_type, response_body, body_complete=True) == answer


@needs_binary("tshark")
def test_the_captured_login_password_is_redacted_in_the_graphql_call() -> None:
    """The Login mutation's body, as the wire carried it, keeps its password until the Redactor
    runs on the GraphQL call (which has no http detail left to say the body is JSON)."""
    (method, target, content_type, body), _ = http1_exchanges()[2]
    assert b'"password":"hunter2-fixture"' in body
    call = http_call(method, target, content_type, body)
    request = parse_request(method, target, content_type, body, body_complete=True)
    assert request is not None
    apply(call, request, None, "1.1", 200)
    assert call.WhichOneof("detail") == "graphql"
    REDACTOR.apply(call)
    sent = json.loads(call.request.body)
    assert sent["variables"] == {"username": "ada", "password": REDACTED}
    assert sent["query"] == json.loads(body)["query"]  # `$password` in the document is no value


# -- the capture, through Trawl's own HTTP/1 parser ------------------------------------------------


def test_the_http1_capture_through_the_dissector_becomes_graphql_calls() -> None:
    """The HTTP/1 parser offers each finished call to parse_request/parse_response and `apply`
    turns the GraphQL ones into graphql calls (the compiled lane gives such bodies and targets
    to the Python path), redacted afterwards as every call is."""
    calls, _ = dissect_capture(HTTP2_FIXTURES / "graphql_http1.pcap")
    assert len(calls) == 8
    assert [(call.protocol, call.method, call.path, call.status) for call in calls] == [
        ("graphql", "query", "GetOrder", "200"),
        ("graphql", "query", "anonymous", "200"),
        ("graphql", "mutation", "Login", "200"),
        ("graphql", "query", "GetOrder", "200"),
        ("graphql", "query", "OrderStatus", "200"),
        ("graphql", "query", "Broken", "200"),
        ("graphql", "query", "ListOrders", "200"),
        ("graphql", "", "ListOrders", "200"),
    ]
    assert all(call.WhichOneof("detail") == "graphql" for call in calls)
    ok, error = Outcome.OUTCOME_OK, Outcome.OUTCOME_ERROR
    assert [call.outcome for call in calls] == [ok, ok, ok, ok, ok, error, ok, ok]
    batch = calls[3].graphql
    assert (batch.operations, list(batch.batch)) == (2, ["query GetOrder", "query CountOrders"])
    assert (batch.http_version, batch.http_status, batch.target) == ("1.1", 200, "/graphql")
    broken = calls[5].graphql
    assert (broken.errors, broken.first_error, broken.operation_type, broken.operation_name) == (
        1,
        "the broken field always fails",
        "query",
        "Broken",
    )
    get = calls[4].graphql
    assert get.target.startswith("/graphql?query=query+OrderStatus+") and not get.batch
    assert calls[6].graphql.persisted_query_hash == calls[7].graphql.persisted_query_hash == APQ_HASH
    assert calls[2].graphql.operations == 1 and not calls[2].graphql.batch


# -- client-shaped requests ------------------------------------------------------------------------

ORDER_QUERY = """
query OrderWithItems($id: ID!) {
  order(id: $id) { ...OrderFields items { sku quantity } }
}
fragment OrderFields on Order { id status totalCents }
"""


def apq_hash(document: str) -> str:
    """Apollo's persisted-query link hashes the printed document."""
    return hashlib.sha256(print_ast(parse(document)).encode()).hexdigest()


def httpx_request(method: str, **kwargs: Any) -> tuple[str, str, str, bytes]:
    request = httpx.Request(method, "http://127.0.0.1:4000/graphql", **kwargs)
    return request.method, request.url.raw_path.decode(), request.headers.get("content-type", ""), request.content


def test_apollo_client_shapes() -> None:
    """Apollo Client's HttpLink puts operationName, variables and extensions before the query;
    its persisted-query link first sends the hash alone (GET when useGETForHashedQueries), then
    the hash with the document when the server did not know it."""
    digest = apq_hash(ORDER_QUERY)
    printed = print_ast(parse(ORDER_QUERY))
    extensions = {"persistedQuery": {"version": 1, "sha256Hash": digest}}
    full = {"operationName": "OrderWithItems", "variables": {"id": "1"}, "extensions": extensions, "query": printed}
    assert parse_request(*httpx_request("POST", json=full), body_complete=True) == GraphqlRequest(
        (Operation("query", "OrderWithItems", digest),), False, ()
    )
    by_hash = {"operationName": "OrderWithItems", "variables": {"id": "1"}, "extensions": extensions}
    assert parse_request(*httpx_request("POST", json=by_hash), body_complete=True) == GraphqlRequest(
        (Operation("", "OrderWithItems", digest),), False, ()
    )
    params = {
        "operationName": "OrderWithItems",
        "variables": json.dumps({"id": "1"}),
        "extensions": json.dumps(extensions),
    }
    method, target, content_type, body = httpx_request("GET", params=params)
    assert "extensions=%7B%22persistedQuery" in target
    assert parse_request(method, target, content_type, body, body_complete=True) == GraphqlRequest(
        (Operation("query", "OrderWithItems", digest),), False, ()
    )
    # A persisted query with no operationName is shown by its hash.
    anonymous = parse_request(*httpx_request("POST", json={"extensions": extensions}), body_complete=True)
    assert anonymous is not None and operation_label(anonymous.operations[0]) == f"persisted:{digest[:12]}"


def test_gql_shape_and_batches_of_mixed_types() -> None:
    """gql sends {"query": print_ast(document), "variables", "operationName"}; a batch (Apollo's
    BatchHttpLink) is an array of such, whose operations can be of any type."""
    mutation = "mutation PlaceOrder($sku: String!) { placeOrder(sku: $sku) { id } }"
    subscription = "subscription OnStatus { orderStatus { id status } }"
    batch = [
        {"query": print_ast(parse(mutation)), "variables": {"sku": "A-1"}, "operationName": "PlaceOrder"},
        {"query": print_ast(parse(ORDER_QUERY)), "variables": {"id": "1"}, "operationName": "OrderWithItems"},
        {"query": "{ orders { id } }"},
        {"query": subscription},
    ]
    assert parse_request(*httpx_request("POST", json=batch), body_complete=True) == GraphqlRequest(
        (
            Operation("mutation", "PlaceOrder", ""),
            Operation("query", "OrderWithItems", ""),
            Operation("query", "", ""),
            Operation("subscription", "OnStatus", ""),
        ),
        True,
        (),
    )
    call = http_call("POST", "/graphql", "application/json", b"")
    request = parse_request(*httpx_request("POST", json=batch), body_complete=True)
    assert request is not None
    apply(call, request, None, "2", 200)
    assert (call.method, call.path) == ("mutation", "PlaceOrder")
    assert list(call.graphql.batch) == [
        "mutation PlaceOrder",
        "query OrderWithItems",
        "query anonymous",
        "subscription OnStatus",
    ]


def test_other_transports_of_a_document() -> None:
    """application/graphql+json, a form body, application/graphql with operationName in the
    target, and a JSON body sent as text/plain (clients avoiding a CORS preflight)."""
    body = json.dumps({"query": ORDER_QUERY, "operationName": "OrderWithItems"}).encode()
    expected = GraphqlRequest((Operation("query", "OrderWithItems", ""),), False, ())
    assert parse_request("POST", "/api", "application/graphql+json; charset=utf-8", body, True) == expected
    assert parse_request("POST", "/api", "text/plain;charset=UTF-8", body, True) == expected
    assert parse_request("POST", "/api", "", body, True) == expected
    form = httpx_request("POST", data={"query": ORDER_QUERY, "operationName": "OrderWithItems"})
    assert form[2] == "application/x-www-form-urlencoded"
    assert parse_request(*form, body_complete=True) == expected
    two = "query A { a } mutation B { b }"
    assert parse_request("POST", "/graphql?operationName=B", "application/graphql", two.encode(), True) == (
        GraphqlRequest((Operation("mutation", "B", ""),), False, ())
    )


def test_not_graphql() -> None:
    """`query` is a common key and parameter: a search text, an Elasticsearch query object, a
    JSON API body, other methods, an empty body are not GraphQL."""
    for method, target, content_type, body in [
        ("POST", "/search", "application/json", b'{"query": "red shoes", "page": 2}'),
        ("POST", "/_search", "application/json", b'{"query": {"match": {"title": "graphql"}}}'),
        ("GET", "/search?query=red+shoes&page=2", "", b""),
        ("GET", "/graphql", "", b""),
        ("POST", "/orders", "application/json", b'{"sku": "A-1", "quantity": 2}'),
        ("POST", "/orders", "application/json", b'[{"query": "{ a }"}, 3]'),
        ("POST", "/orders", "application/json", b"[]"),
        ("POST", "/graphql", "application/json", b""),
        ("PUT", "/graphql", "application/json", b'{"query": "{ a }"}'),
        ("POST", "/upload", "multipart/form-data; boundary=x", b'--x\r\n{"query": "{ a }"}'),
        ("POST", "/page", "text/html", b"<html>query { a }</html>"),
    ]:
        assert parse_request(method, target, content_type, body, True) is None, (method, target, body)
    # The same search text under a GraphQL endpoint, or with operationName beside it, is a
    # GraphQL request the server will refuse.
    refused = GraphqlRequest((Operation("", "", ""),), False, ("graphql-parse-error",))
    assert parse_request("POST", "/graphql", "application/json", b'{"query": "red shoes"}', True) == refused
    assert parse_request("POST", "/api", "application/json", b'{"query": "red shoes", "variables": {}}', True) == (
        refused
    )


def test_which_operation_runs() -> None:
    two = "query A { a } mutation B { b }"

    def request(body: dict[str, Any]) -> GraphqlRequest | None:
        return parse_request("POST", "/graphql", "application/json", json.dumps(body).encode(), True)

    assert request({"query": two, "operationName": "B"}) == GraphqlRequest((Operation("mutation", "B", ""),), False, ())
    assert request({"query": two}) == GraphqlRequest(
        (Operation("query", "A", ""),), False, ("graphql-ambiguous-operation",)
    )
    assert request({"query": two, "operationName": "C"}) == GraphqlRequest(
        (Operation("", "C", ""),), False, ("graphql-operation-not-found",)
    )
    assert request({"query": "fragment F on Order { id }"}) == GraphqlRequest(
        (Operation("", "", ""),), False, ("graphql-no-operation",)
    )
    # Variable defaults and directive arguments with object values do not confuse the scan of a
    # document the parser refused (here: a missing closing brace).
    broken = 'query Q($f: Filter = {status: "open"}) @cache(opts: {ttl: 1}) { orders(filter: $f) { id }'
    assert request({"query": broken}) == GraphqlRequest((Operation("query", "Q", ""),), False, ("graphql-parse-error",))
    assert request({"query": "# leading comment\n" + broken, "operationName": "Q"}) == GraphqlRequest(
        (Operation("query", "Q", ""),), False, ("graphql-parse-error",)
    )
    assert request({"query": "{ broken ", "operationName": "Nope"}) == GraphqlRequest(
        (Operation("", "Nope", ""),), False, ("graphql-parse-error",)
    )
    assert request({"operationName": "Login", "variables": {"a": 1}}) == GraphqlRequest(
        (Operation("", "Login", ""),), False, ("graphql-no-query",)
    )


# -- cut bodies ------------------------------------------------------------------------------------


def test_a_request_cut_at_every_length() -> None:
    """A body cut by the body limit anywhere: nothing raises; what comes out is flagged; it is
    GraphQL from the first key on (under /graphql), and the operation is right as soon as its name
    has arrived whole (in the query string, which is read as far as it goes, or operationName)."""
    apollo = {"operationName": "PlaceOrder", "variables": {"sku": "A" * 300}, "query": "mutation PlaceOrder { p }"}
    gql = {"query": ORDER_QUERY, "operationName": "OrderWithItems", "variables": {"id": "1"}}
    for fields, name, kind in [(gql, "OrderWithItems", "query"), (apollo, "PlaceOrder", "mutation")]:
        body = json.dumps(fields).encode()
        first_key_at = body.index(b":") + 1
        named_at = body.index(f"{kind} {name}".encode()) + len(f"{kind} {name}") + 1
        for cut in range(len(body)):
            request = parse_request("POST", "/graphql", "application/json", body[:cut], body_complete=False)
            if cut < first_key_at:
                assert request is None
                continue
            assert request is not None, cut
            assert request.notes[0] == "graphql-body-truncated" and not request.batched
            (operation,) = request.operations
            if cut >= named_at:
                assert (operation.type, operation.name) == (kind, name), cut
            elif name in operation.name:
                assert operation.name == name and operation.type in ("", kind)  # operationName, whole
            else:
                assert operation.name == "" and operation.type in ("", kind)
        # Elsewhere than /graphql a key alone does not say GraphQL; a document's start does.
        assert parse_request("POST", "/api", "application/json", body[:first_key_at], False) is None
        assert parse_request("POST", "/api", "application/json", body[:named_at], False) is not None


def test_a_batch_cut_keeps_its_whole_entries() -> None:
    entries = [{"query": f"query Q{index} {{ orders {{ id }} }}", "operationName": f"Q{index}"} for index in range(5)]
    body = json.dumps(entries).encode()
    cut = body.index(b'"Q3"') - 3  # inside the fourth entry's document
    request = parse_request("POST", "/graphql", "application/json", body[:cut], body_complete=False)
    assert request is not None and request.batched and request.notes == ("graphql-body-truncated",)
    assert [(operation.type, operation.name) for operation in request.operations] == [
        ("query", "Q0"),
        ("query", "Q1"),
        ("query", "Q2"),
        ("query", "Q3"),  # its query string is cut, but `query Q3` had arrived
    ]
    # An entry cut before it says what it is is left out; the whole ones still make the batch.
    cut_early = b'[{"query": "query A { a }"}, {"variables": {"id": "4'
    assert parse_request("POST", "/api", "application/json", cut_early, body_complete=False) == GraphqlRequest(
        (Operation("query", "A", ""),), True, ("graphql-body-truncated",)
    )
    # The prefix the brief names: enough to say GraphQL under a GraphQL endpoint.
    assert parse_request("POST", "/graphql", "application/json", b'{"query":', False) == GraphqlRequest(
        (Operation("", "", ""),), False, ("graphql-body-truncated",)
    )
    # A name the cut may have shortened is not taken for the name.
    assert parse_request("POST", "/graphql", "application/graphql", b"mutation Pl", False) == GraphqlRequest(
        (Operation("mutation", "", ""),), False, ("graphql-body-truncated",)
    )
    assert parse_request("POST", "/graphql", "application/graphql", b"mutation Place(", False) == GraphqlRequest(
        (Operation("mutation", "Place", ""),), False, ("graphql-body-truncated",)
    )


def test_a_result_cut_at_every_length() -> None:
    body = json.dumps(
        {"errors": [{"message": "first failure"}, {"message": "second failure"}], "data": {"a": None}}
    ).encode()
    message_end = body.index(b"first failure") + len("first failure") + 2
    for cut in range(len(body)):
        result = parse_response("application/json", body[:cut], body_complete=False)
        if result is None:
            continue
        assert not result.complete and result.results == 1 and result.errors <= 2
        if cut >= message_end:
            assert result.first_error == "first failure" and result.errors >= 1
    assert parse_response("application/json", body[: body.index(b"second") + 3], False) == GraphqlResponse(
        2, "first failure", 1, complete=False
    )
    batch = json.dumps([{"data": {"a": 1}}, {"errors": [{"message": "no"}]}, {"data": {"b": 2}}]).encode()
    assert parse_response("application/json", batch[:-8], False) == GraphqlResponse(1, "no", 3, complete=False)
    assert parse_response("application/json", batch[:-20], False) == GraphqlResponse(1, "no", 2, complete=False)


# -- results of a real executor -------------------------------------------------------------------

SCHEMA = build_schema(
    """
    type Order { id: ID! status: String! }
    type Query { order(id: ID!): Order  broken: String  orders: [Order!]! }
    type Mutation { login(username: String!, password: String!): String }
    """
)


class Root:
    def order(self, info: Any, id: str) -> dict[str, str]:
        return {"id": id, "status": "open"}

    def broken(self, info: Any) -> str:
        raise ValueError("the broken field always fails")

    def orders(self, info: Any) -> list[dict[str, str]]:
        return [{"id": "1", "status": "open"}]

    def login(self, info: Any, username: str, password: str) -> str:
        raise PermissionError(f"no such user {username}")


def execute(query: str, **variables: Any) -> bytes:
    result = graphql_sync(SCHEMA, query, root_value=Root(), variable_values=variables or None)
    return json.dumps(result.formatted).encode()


def test_results_of_graphql_core() -> None:
    ok = execute('{ order(id: "1") { id status } }')
    assert parse_response("application/json", ok, True) == GraphqlResponse(0, "", 1)
    field_error = execute('{ order(id: "1") { id } broken }')
    assert parse_response("application/graphql-response+json; charset=utf-8", field_error, True) == (
        GraphqlResponse(1, "the broken field always fails", 1)
    )
    # Validation errors: nothing executed (data null), several errors.
    invalid = execute("{ nope missing }")
    assert json.loads(invalid)["data"] is None
    result = parse_response("application/json", invalid, True)
    assert result is not None and result.errors == 2 and "nope" in result.first_error
    mutation = execute("mutation L($u: String!, $p: String!) { login(username: $u, password: $p) }", u="ada", p="pw")
    assert parse_response("application/json", mutation, True) == GraphqlResponse(1, "no such user ada", 1)
    batch = b"[" + ok + b"," + field_error + b"," + invalid + b"]"
    assert parse_response("application/json", batch, True) == GraphqlResponse(3, "the broken field always fails", 3)
    long_message = json.dumps({"errors": [{"message": "x" * 5000}]}).encode()
    result = parse_response("", long_message, True)
    assert result is not None and len(result.first_error) == MAX_ERROR_CHARS


def test_what_is_not_a_result() -> None:
    for content_type, body, complete in [
        ("text/html", b"<html>502 Bad Gateway</html>", True),
        ("application/json", b'{"message": "Internal Server Error"}', True),
        ("application/json", b"[]", True),
        ("application/json", b'[{"data": {}}, 3]', True),
        ("application/json", b'{"data": {"a": 1}', True),
        ("multipart/mixed; boundary=-", b'{"data": {}}', True),
        ("application/json", b"", False),
        ("application/json", b'{"message": "Internal', False),
    ]:
        assert parse_response(content_type, body, complete) is None, body


# -- bounded work --------------------------------------------------------------------------------


def test_a_huge_document_stops_at_the_token_limit() -> None:
    """A document of 120,000 tokens costs the parser MAX_TOKENS of them; its operation is still
    named from its first tokens."""
    fields = " ".join(f"f{index}" for index in range(120_000))
    body = json.dumps({"query": f"query Huge {{ {fields} }}"}).encode()
    elapsed = []
    for _ in range(3):  # best of three: a busy machine does not decide
        started = time.perf_counter()
        request = parse_request("POST", "/graphql", "application/json", body, True)
        elapsed.append(time.perf_counter() - started)
        assert request == GraphqlRequest((Operation("query", "Huge", ""),), False, ("graphql-token-limit",))
    assert min(elapsed) < 0.35  # MAX_TOKENS tokens at ~6 us, against ~0.7 s for the whole document
    # A limit the caller chooses.
    small = json.dumps({"query": "query Small { a b c d e f }"}).encode()
    assert parse_request("POST", "/graphql", "application/json", small, True, max_tokens=4) == GraphqlRequest(
        (Operation("query", "Small", ""),), False, ("graphql-token-limit",)
    )
    assert parse_request("POST", "/graphql", "application/json", small, True, max_tokens=20) == GraphqlRequest(
        (Operation("query", "Small", ""),), False, ()
    )


def test_a_batch_shares_the_token_budget() -> None:
    """Each document of a batch gets what the earlier ones left: three documents of ~2,000 tokens
    each under the default 5,000: the third is read by its first tokens only."""
    document = "query Q{n} {{ " + " ".join(f"f{index}" for index in range(2000)) + " }}"
    batch = [{"query": document.format(n=n)} for n in range(3)]
    request = parse_request("POST", "/graphql", "application/json", json.dumps(batch).encode(), True)
    assert request is not None and MAX_TOKENS == 5000
    assert [operation.name for operation in request.operations] == ["Q0", "Q1", "Q2"]
    assert request.notes == ("graphql-token-limit",)


def test_deep_json_and_deep_documents_are_refused_not_raised() -> None:
    deep_json = b'{"query": "{ a }", "variables": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    request = parse_request("POST", "/graphql", "application/json", deep_json, True)
    # json.loads gives up (RecursionError); the members before the deep one still say GraphQL.
    assert request == GraphqlRequest((Operation("query", "", ""),), False, ("graphql-json-error",))
    deep_document = "{" + "a {" * 5000 + "b" + "}" * 5001
    request = parse_request("POST", "/graphql", "application/graphql", deep_document.encode(), True)
    assert request == GraphqlRequest((Operation("query", "", ""),), False, ("graphql-parse-error",))
    assert parse_response("application/json", b"[" * 100_000, True) is None
    assert parse_response("application/json", b'{"errors": ' + b"[" * 100_000, False) == GraphqlResponse(
        0, "", 1, complete=False
    )


# -- the record -----------------------------------------------------------------------------------


def http_call(method: str, target: str, content_type: str, body: bytes, status: str = "200") -> ApiCall:
    """An HTTP call as the HTTP parser leaves it: request target in `path`, http detail set."""
    call = ApiCall(protocol="http", method=method, path=target, status=status, outcome=Outcome.OUTCOME_OK)
    call.http.version = "1.1"
    call.http.request_content_type = content_type
    call.http.response_content_type = "application/json"
    call.request.body = body
    return call


def test_apply_outcomes() -> None:
    request = GraphqlRequest((Operation("query", "GetOrder", ""),), False, ("graphql-body-truncated",))
    ok = http_call("POST", "/graphql", "application/json", b"")
    apply(ok, request, GraphqlResponse(0, "", 1), "2", 200)
    assert (ok.outcome, ok.status, ok.graphql.http_version, ok.graphql.http_status) == (
        Outcome.OUTCOME_OK,
        "200",
        "2",
        200,
    )
    assert list(ok.notes) == ["graphql-body-truncated"] and not ok.HasField("http")
    errors_under_200 = http_call("POST", "/graphql", "application/json", b"")
    apply(errors_under_200, request, GraphqlResponse(2, "boom", 1, complete=False), "1.1", 200)
    assert errors_under_200.outcome == Outcome.OUTCOME_ERROR
    assert (errors_under_200.graphql.errors, errors_under_200.graphql.first_error) == (2, "boom")
    assert list(errors_under_200.notes) == ["graphql-body-truncated", "graphql-response-truncated"]
    server_error = http_call("POST", "/graphql", "application/json", b"", status="503")
    server_error.outcome = Outcome.OUTCOME_ERROR
    apply(server_error, request, None, "1.1", 503)
    assert (server_error.outcome, server_error.status) == (Outcome.OUTCOME_ERROR, "503")
    bad_request = http_call("POST", "/graphql", "application/json", b"", status="400")
    apply(bad_request, request, None, "1.1", 400)
    assert bad_request.outcome == Outcome.OUTCOME_OK  # as HTTP: 4xx is ok with its status
    lone = http_call("POST", "/graphql", "application/json", b"", status="")
    lone.outcome = Outcome.OUTCOME_NO_RESPONSE
    apply(lone, request, None, "1.1", 0)
    assert (lone.outcome, lone.graphql.http_status) == (Outcome.OUTCOME_NO_RESPONSE, 0)
    cancelled = http_call("POST", "/graphql", "application/json", b"", status="")
    cancelled.outcome = Outcome.OUTCOME_CANCELLED
    apply(cancelled, request, GraphqlResponse(1, "x", 1), "2", 0)
    assert cancelled.outcome == Outcome.OUTCOME_CANCELLED


def test_apply_labels_and_bounds() -> None:
    digest = "ab" * 32
    persisted = GraphqlRequest((Operation("", "", digest),), False, ())
    call = http_call("POST", "/graphql", "application/json", b"")
    apply(call, persisted, None, "1.1", 200)
    assert (call.method, call.path, call.graphql.persisted_query_hash) == ("", "persisted:abababababab", digest)
    anonymous = GraphqlRequest((Operation("query", "", ""),), False, ())
    call = http_call("POST", "/graphql", "application/json", b"")
    apply(call, anonymous, None, "1.1", 200)
    assert (call.method, call.path, call.graphql.operation_name) == ("query", "anonymous", "")
    many = GraphqlRequest(tuple(Operation("query", f"Q{index}", "") for index in range(100)), True, ())
    call = http_call("POST", "/graphql", "application/json", b"")
    apply(call, many, None, "1.1", 200)
    assert call.graphql.operations == 100 and len(call.graphql.batch) == 64
    assert "graphql-batch-labels-cut" in call.notes
    huge_name = json.dumps({"query": "{ a }", "operationName": "N" * 10_000}).encode()
    request = parse_request("POST", "/graphql", "application/json", huge_name, True)
    assert request is not None and len(request.operations[0].name) == 256


# -- redaction of variables --------------------------------------------------------------------


def test_variables_in_a_json_body_are_redacted() -> None:
    """GraphQL variables travel in the JSON body, which the call keeps: the Redactor with the
    default field list finds `password` (and `*token*`) there, in a single request, in a batch,
    and in a body the body limit cut (by pattern then)."""
    login = "mutation Login($username: String!, $password: String!) { login(username: $username, password: $password) }"
    single = httpx_request("POST", json={"query": login, "variables": {"username": "ada", "password": "pw-1"}})
    batch = httpx_request(
        "POST",
        json=[
            {"query": "{ orders { id } }"},
            {"query": login, "variables": {"username": "bob", "password": "pw-2", "input": {"apiToken": "t"}}},
        ],
    )
    for method, target, content_type, body in (single, batch):
        call = http_call(method, target, content_type, body)
        request = parse_request(method, target, content_type, body, True)
        assert request is not None
        apply(call, request, None, "1.1", 200)
        REDACTOR.apply(call)
        text = call.request.body
        assert b"pw-1" not in text and b"pw-2" not in text and b'"t"' not in text
        assert text.count(REDACTED.encode()) == (1 if body is single[3] else 2)
        assert b'"username":"ada"' in text or b'"username":"bob"' in text
    method, target, content_type, body = single
    cut = body[: body.index(b"pw-1") + 6]
    call = http_call(method, target, content_type, cut)
    request = parse_request(method, target, content_type, cut, False)
    assert request is not None and request.operations[0] == Operation("mutation", "Login", "")
    apply(call, request, None, "1.1", 200)
    REDACTOR.apply(call)
    assert b"pw-1" not in call.request.body and REDACTED.encode() in call.request.body


def test_variables_in_a_get_query_string_are_redacted() -> None:
    """GET carries the variables as a JSON query parameter: after `apply` the target lives in
    GraphqlDetail.target, where the Redactor redacts the JSON parameter's secret keys."""
    method, target, content_type, body = httpx_request(
        "GET",
        params={
            "query": "query Me($password: String) { me(password: $password) { id } }",
            "variables": json.dumps({"password": "pw-get", "name": "ada"}),
        },
    )
    assert "pw-get" in target
    call = http_call(method, target, content_type, body)
    request = parse_request(method, target, content_type, body, True)
    assert request == GraphqlRequest((Operation("query", "Me", ""),), False, ())
    apply(call, request, None, "1.1", 200)
    assert call.path == "Me" and call.graphql.target == target
    REDACTOR.apply(call)
    redacted = call.graphql.target
    assert "pw-get" not in redacted
    variables = dict(pair.split("=", 1) for pair in redacted.partition("?")[2].split("&"))["variables"]
    assert json.loads(unquote(variables)) == {"password": REDACTED, "name": "ada"}


# Redaction of what is particular to GraphQL (redact.Redactor._graphql): arguments written in
# the document, a form body once the call has no HTTP detail, errors that quote a variable.


def test_inline_secret_arguments_in_a_document_are_redacted() -> None:
    document = 'mutation { login(username: "ada", password: "inline-secret") { token } }'
    for content_type, body in (
        ("application/json", json.dumps({"query": document}).encode()),
        ("application/graphql", document.encode()),
    ):
        call = http_call("POST", "/graphql", content_type, body)
        request = parse_request("POST", "/graphql", content_type, body, True)
        assert request is not None
        apply(call, request, None, "1.1", 200)
        REDACTOR.apply(call)
        assert b"inline-secret" not in call.request.body


def test_variables_of_a_form_body_are_redacted_in_the_graphql_call() -> None:
    method, target, content_type, body = httpx_request(
        "POST",
        data={
            "query": "mutation L($password: String!) { login(password: $password) }",
            "variables": json.dumps({"password": "form-secret"}),
        },
    )
    as_http = http_call(method, target, content_type, body)
    REDACTOR.apply(as_http)
    assert b"form-secret" not in as_http.request.body
    call = http_call(method, target, content_type, body)
    request = parse_request(method, target, content_type, body, True)
    assert request == GraphqlRequest((Operation("mutation", "L", ""),), False, ())
    apply(call, request, None, "1.1", 200)
    REDACTOR.apply(call)
    assert b"form-secret" not in call.request.body


def test_an_error_quoting_a_secret_variable_is_redacted() -> None:
    login = "mutation L($password: Int!) { login(password: $password) }"
    body = json.dumps({"query": login, "variables": {"password": "echoed-secret"}}).encode()
    answer = graphql_sync(SCHEMA_INT, login, variable_values={"password": "echoed-secret"})
    response_body = json.dumps(answer.formatted).encode()
    call = http_call("POST", "/graphql", "application/json", body)
    call.response.body = response_body
    request = parse_request("POST", "/graphql", "application/json", body, True)
    response = parse_response("application/json", response_body, True)
    assert request is not None and response is not None and "echoed-secret" in response.first_error
    apply(call, request, response, "1.1", 200)
    REDACTOR.apply(call)
    assert b"echoed-secret" not in call.request.body  # the variable itself is redacted
    assert "echoed-secret" not in call.graphql.first_error and b"echoed-secret" not in call.response.body


SCHEMA_INT = build_schema("type Query { a: Int } type Mutation { login(password: Int!): String }")
