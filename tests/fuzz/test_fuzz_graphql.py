"""Property tests of the GraphQL layer (protocols/graphql.py): any bytes, JSON or GraphQL-ish
text, whole or cut anywhere, give a well-formed result or None and never raise; the layout of
the JSON does not change the answer; a huge document costs no more than the token budget."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlencode

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import scaled
from trawl.dissector.protocols.graphql import (
    MAX_ERROR_CHARS,
    MAX_HASH_CHARS,
    MAX_NAME_CHARS,
    MAX_TOKENS,
    GraphqlRequest,
    GraphqlResponse,
    apply,
    parse_request,
    parse_response,
)
from trawl.v1.calls_pb2 import ApiCall, Outcome

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOTES = frozenset(
    {
        "graphql-body-truncated",
        "graphql-json-error",
        "graphql-parse-error",
        "graphql-token-limit",
        "graphql-ambiguous-operation",
        "graphql-operation-not-found",
        "graphql-no-operation",
        "graphql-no-query",
    }
)
TYPES = frozenset({"", "query", "mutation", "subscription"})

methods = st.sampled_from(["POST", "GET", "post", "PUT", ""])
targets = st.sampled_from(["/graphql", "/api", "/", "/graphql?operationName=A", "/x?query=%7Ba%7D", ""])
content_types = st.sampled_from(
    [
        "",
        "application/json",
        "application/json; charset=utf-8",
        "application/graphql",
        "application/graphql+json",
        "application/graphql-response+json",
        "application/x-www-form-urlencoded",
        "text/plain",
        "multipart/form-data; boundary=x",
        "text/html",
    ]
)
graphql_text = st.lists(
    st.sampled_from(
        [
            "query", "mutation", "subscription", "fragment", "on", "A", "B", "f", "{", "}", "(", ")",
            "$v", ":", "=", "@d", "...", "[", "]", "!", ",", "1", "-1.5e3", '"s"', '"""b\\"""',
            '"\\u00e9"', "#c\n", " ", "\n", "\ufeff", "\x00", '"', "\\", "&", "%7B",
        ]
    ),
    max_size=40,
).map("".join)  # fmt: skip
REQUEST_KEYS = ["query", "operationName", "variables", "extensions", "persistedQuery", "sha256Hash", "version"]
RESULT_KEYS = ["data", "errors", "message", "locations", "path", "id", "password"]
keys = st.sampled_from([*REQUEST_KEYS, *RESULT_KEYS]) | st.text(max_size=6)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12) | graphql_text
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=24,
)
# Request-shaped objects: a document, maybe a name, variables, a persisted-query hash.
request_objects = st.fixed_dictionaries(
    {},
    optional={
        "query": graphql_text | st.text(max_size=20) | json_values,
        "operationName": st.sampled_from(["A", "B", "", "Nope"]) | st.none() | json_values,
        "variables": json_values,
        "extensions": st.fixed_dictionaries(
            {"persistedQuery": st.fixed_dictionaries({"version": st.just(1), "sha256Hash": st.text(max_size=80)})}
        )
        | json_values,
    },
)
request_values = request_objects | st.lists(request_objects, min_size=1, max_size=5) | json_values
response_values = (
    st.fixed_dictionaries(
        {},
        optional={
            "data": json_values,
            "errors": st.lists(st.fixed_dictionaries({"message": st.text(max_size=400)}) | json_values, max_size=4)
            | json_values,
        },
    )
    | st.lists(st.fixed_dictionaries({"errors": st.lists(st.fixed_dictionaries({"message": st.text()}))}), max_size=4)
    | json_values
)


def well_formed_request(result: GraphqlRequest | None) -> None:
    if result is None:
        return
    assert result.operations and set(result.notes) <= NOTES
    assert result.batched or len(result.operations) == 1
    for operation in result.operations:
        assert operation.type in TYPES
        assert len(operation.name) <= MAX_NAME_CHARS and len(operation.persisted_hash) <= MAX_HASH_CHARS
    call = ApiCall(protocol="http", method="POST", path="/graphql", status="200", outcome=Outcome.OUTCOME_OK)
    call.http.version = "1.1"
    apply(call, result, None, "1.1", 200)
    first = result.operations[0]
    assert (call.protocol, call.method, call.WhichOneof("detail")) == ("graphql", first.type, "graphql")
    assert call.graphql.operations == len(result.operations) and call.path
    assert ApiCall.FromString(call.SerializeToString()) == call


def well_formed_response(result: GraphqlResponse | None) -> None:
    if result is None:
        return
    assert result.results >= 1 and result.errors >= 0 and len(result.first_error) <= MAX_ERROR_CHARS
    assert not result.first_error or result.errors >= 1


@FUZZ
@given(methods, targets, content_types, st.binary(max_size=512), st.booleans())
def test_any_bytes(method: str, target: str, content_type: str, body: bytes, complete: bool) -> None:
    well_formed_request(parse_request(method, target, content_type, body, complete))
    well_formed_response(parse_response(content_type, body, complete))


@FUZZ
@given(methods, targets, content_types, request_values, st.integers(min_value=0, max_value=1 << 16))
def test_request_json_whole_and_cut(method: str, target: str, content_type: str, value: Any, cut: int) -> None:
    body = json.dumps(value).encode()
    whole = parse_request(method, target, content_type, body, True)
    well_formed_request(whole)
    well_formed_request(parse_request(method, target, content_type, body[: cut % (len(body) + 1)], False))
    # The JSON's layout (spaces, indentation, escaped non-ASCII) does not change the answer.
    spread = json.dumps(value, indent=2, ensure_ascii=False).encode()
    if content_type not in ("application/graphql", "application/x-www-form-urlencoded"):
        assert parse_request(method, target, content_type, spread, True) == whole


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["query", "operationName", "variables", "extensions", "q"]), graphql_text),
    st.sampled_from(["/graphql", "/search"]),
)
def test_get_query_strings(params: dict[str, str], path: str) -> None:
    target = f"{path}?{urlencode(params)}"
    result = parse_request("GET", target, "", b"", True)
    well_formed_request(result)
    if "query" not in params and "extensions" not in params:
        assert result is None or result.operations[0].type == ""


@FUZZ
@given(graphql_text, st.sampled_from(["/graphql", "/api"]), st.integers(min_value=0, max_value=200))
def test_documents_whole_and_cut(document: str, target: str, cut: int) -> None:
    body = document.encode()
    whole = parse_request("POST", target, "application/graphql", body, True)
    well_formed_request(whole)
    assert whole is not None or not body  # the content type says GraphQL
    well_formed_request(parse_request("POST", target, "application/graphql", body[:cut], False))
    for wrapped in ({"query": document}, [{"query": document}, {"query": document, "operationName": "A"}]):
        encoded = json.dumps(wrapped).encode()
        well_formed_request(parse_request("POST", target, "application/json", encoded, True))
        well_formed_request(parse_request("POST", target, "application/json", encoded[: cut + 10], False))


@FUZZ
@given(content_types, response_values, st.integers(min_value=0, max_value=1 << 16))
def test_response_json_whole_and_cut(content_type: str, value: Any, cut: int) -> None:
    body = json.dumps(value).encode()
    whole = parse_response(content_type, body, True)
    well_formed_response(whole)
    part = parse_response(content_type, body[: cut % (len(body) + 1)], False)
    well_formed_response(part)
    if part is not None:
        assert not part.complete
    if whole is not None and part is not None:
        assert part.errors <= whole.errors and part.results <= whole.results


@settings(deadline=None, max_examples=scaled(8), suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["f ", "f(a: 1) ", "...F ", "f { g } ", "#c\nf ", '"s" ']),
    st.integers(min_value=150_000, max_value=300_000),
    st.sampled_from(["application/json", "application/graphql"]),
)
def test_a_huge_document_stops_at_the_token_limit(piece: str, repeat: int, content_type: str) -> None:
    """Hundreds of thousands of tokens (valid or not; a whole parse would take seconds at ~6 us
    a token): the parser stops at MAX_TOKENS (~30 ms) and the first tokens still name the
    operation. Best of three runs, so that a busy machine does not decide."""
    document = "query Huge { " + piece * repeat + "}"
    body = json.dumps({"query": document}).encode() if content_type == "application/json" else document.encode()
    elapsed = []
    for _ in range(3):
        started = time.perf_counter()
        result = parse_request("POST", "/graphql", content_type, body, True)
        elapsed.append(time.perf_counter() - started)
        assert result is not None and result.operations[0].type == "query" and result.operations[0].name == "Huge"
        assert result.notes[-1] in ("graphql-token-limit", "graphql-parse-error")
    assert min(elapsed) < 0.1 + MAX_TOKENS * 50e-6
