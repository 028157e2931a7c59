"""Redaction: headers, query parameters, form and JSON fields, Redis AUTH; configurable lists."""

from __future__ import annotations

import json
from urllib.parse import quote, unquote

from trawl.dissector.config import DEFAULT_REDACT_FIELDS, DEFAULT_REDACT_HEADERS, DissectorSettings
from trawl.dissector.redact import REDACTED, Redactor
from trawl.v1.calls_pb2 import ApiCall

DEFAULT = Redactor(DEFAULT_REDACT_HEADERS, DEFAULT_REDACT_FIELDS)


def http_call(path: str = "/", body: bytes = b"", content_type: str = "", **headers: str) -> ApiCall:
    call = ApiCall(protocol="http", path=path)
    call.http.request_content_type = content_type
    for name, value in headers.items():
        call.request.headers.add(name=name.replace("_", "-"), value=value)
    call.request.body = body
    return call


def header(call: ApiCall, name: str) -> str:
    return {h.name.lower(): h.value for h in call.request.headers}[name.lower()]


def test_secret_headers_are_redacted_case_insensitively() -> None:
    call = DEFAULT.apply(
        http_call(
            Authorization="Bearer t0k3n",
            COOKIE="a=b",
            X_Api_Key="k",
            X_Vault_Token="v",
            Client_Secret_Hash="s",
            Accept="text/html",
        )
    )
    for name in ("Authorization", "COOKIE", "X-Api-Key", "X-Vault-Token", "Client-Secret-Hash"):
        assert header(call, name) == REDACTED
    assert header(call, "Accept") == "text/html"


def test_query_parameters_in_the_path_and_in_url_headers() -> None:
    call = http_call(
        "/cb?code=1&access_token=abc&Password=p%20w&next=/home#frag",
        Referer="https://a.example/login?user=bob&api_key=zzz",
    )
    DEFAULT.apply(call)
    assert call.path == f"/cb?code=1&access_token={REDACTED}&Password={REDACTED}&next=/home#frag"
    assert header(call, "Referer") == f"https://a.example/login?user=bob&api_key={REDACTED}"


def test_json_body_fields_at_any_depth() -> None:
    document = {"user": "bob", "credentials": {"password": "hunter2"}, "items": [{"client_secret": "x", "n": 1}]}
    call = DEFAULT.apply(http_call(body=json.dumps(document).encode(), content_type="application/json"))
    redacted = json.loads(call.request.body)
    assert redacted == {"user": "bob", "credentials": REDACTED, "items": [{"client_secret": REDACTED, "n": 1}]}


def test_truncated_json_is_redacted_by_pattern() -> None:
    body = b'{"user": "bob", "password": "hunter2", "token": "abc", "note": "cut he'
    call = DEFAULT.apply(http_call(body=body, content_type="application/json"))
    assert b"hunter2" not in call.request.body and b"abc" not in call.request.body
    assert b'"user": "bob"' in call.request.body


def test_form_body_fields() -> None:
    call = DEFAULT.apply(
        http_call(body=b"user=bob&password=hunter2&remember=1", content_type="application/x-www-form-urlencoded")
    )
    assert call.request.body == f"user=bob&password={REDACTED}&remember=1".encode()


def test_redis_auth_arguments() -> None:
    call = ApiCall(protocol="redis")
    call.redis.args.extend(["AUTH", "default", "s3cret"])
    DEFAULT.apply(call)
    assert list(call.redis.args) == ["AUTH", REDACTED, REDACTED]


def test_lists_are_configurable() -> None:
    settings = DissectorSettings.load(None, node="n", redact_headers=["x-internal-*"], redact_fields=["ssn"])
    redactor = Redactor(settings.redact_headers, settings.redact_fields)
    call = redactor.apply(http_call("/p?ssn=123&token=t", Authorization="Basic x", X_Internal_Id="42"))
    assert header(call, "X-Internal-Id") == REDACTED
    assert header(call, "Authorization") == "Basic x"  # no longer in the list
    assert call.path == f"/p?ssn={REDACTED}&token=t"


def test_non_secret_calls_are_left_alone() -> None:
    call = http_call("/search?q=shoes", b'{"q": "shoes"}', "application/json", Accept="*/*")
    before = call.SerializeToString()
    DEFAULT.apply(call)
    assert call.SerializeToString() == before


def test_url_user_information_loses_its_password() -> None:
    call = http_call("http://proxyuser:s3cret@example.com/x?q=1", Location="https://svc:p4ss@10.0.0.2:8081/next")
    DEFAULT.apply(call)
    assert call.path == f"http://proxyuser:{REDACTED}@example.com/x?q=1"
    assert header(call, "Location") == f"https://svc:{REDACTED}@10.0.0.2:8081/next"


def test_multipart_fields_are_redacted_files_kept() -> None:
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="username"\r\n\r\nada\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="password"\r\n\r\nhunter2\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="avatar"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n--XyZ--\r\n"
    )
    call = DEFAULT.apply(http_call(body=body, content_type="multipart/form-data; boundary=XyZ"))
    assert b"hunter2" not in call.request.body
    assert b'name="password"\r\n\r\n[REDACTED]\r\n--XyZ' in call.request.body
    assert b"\r\n\r\nada\r\n" in call.request.body and b"\x89PNG" in call.request.body


def test_json_keys_written_with_escapes_are_recognised() -> None:
    body = b'{"user":"ada","pass\\u0077ord":"hunter2"}'
    call = DEFAULT.apply(http_call(body=body, content_type="application/json"))
    assert json.loads(call.request.body) == {"user": "ada", "password": REDACTED}
    cut = DEFAULT.apply(http_call(body=body[:-2], content_type="application/json"))
    assert b"hunter2" not in cut.request.body


def test_extra_names_add_to_the_defaults() -> None:
    settings = DissectorSettings.load(
        None, node="n", redact_headers_extra=["x-internal-*"], redact_fields_extra=["ssn"]
    )
    redactor = Redactor(settings.redacted_headers, settings.redacted_fields)
    call = redactor.apply(http_call("/p?ssn=123&token=t", Authorization="Basic x", X_Internal_Id="42"))
    assert header(call, "X-Internal-Id") == REDACTED
    assert header(call, "Authorization") == REDACTED  # the defaults still hold
    assert call.path == f"/p?ssn={REDACTED}&token={REDACTED}"


def test_http2_path_pseudo_header_query_is_redacted_like_the_path() -> None:
    call = ApiCall(protocol="http2", path="/search?q=cats&access_token=s3cr3t")
    call.request.headers.add(name=":path", value="/search?q=cats&access_token=s3cr3t")
    call.request.headers.add(name="authorization", value="Bearer abc")
    DEFAULT.apply(call)
    assert call.path == f"/search?q=cats&access_token={REDACTED}"
    assert header(call, ":path") == f"/search?q=cats&access_token={REDACTED}"
    assert header(call, "authorization") == REDACTED


def test_grpc_decoded_message_fields_are_redacted_and_their_raw_body_dropped() -> None:
    """With a descriptor set the decoded message has field names: a secret one is redacted, and
    the protobuf bytes holding the same value leave nothing behind."""
    call = ApiCall(protocol="grpc")
    call.grpc.request_message = json.dumps({"user": "ann", "password": "hunter2", "nested": {"api_key": "k"}})
    call.grpc.response_message = json.dumps({"ok": True})
    call.request.body = b"\x00\x00\x00\x00\x0e\n\x03ann\x12\x07hunter2"
    call.response.body = b"\x00\x00\x00\x00\x02\x08\x01"
    DEFAULT.apply(call)
    assert json.loads(call.grpc.request_message) == {
        "user": "ann",
        "password": REDACTED,
        "nested": {"api_key": REDACTED},
    }
    assert call.request.body == b"" and call.request.body_truncated == 19
    assert "body-redacted" in call.notes
    # Nothing secret in the response: its body stays.
    assert json.loads(call.grpc.response_message) == {"ok": True} and call.response.body.endswith(b"\x08\x01")


def test_graphql_target_query_is_redacted() -> None:
    call = ApiCall(protocol="graphql", path="GetUser")
    call.graphql.target = '/graphql?query={me{id}}&variables={"token":"x"}&api_key=abc'
    DEFAULT.apply(call)
    assert call.graphql.target.endswith(f"&api_key={REDACTED}")
    assert call.path == "GetUser"


def test_json_in_a_query_parameter_has_its_secret_keys_redacted() -> None:
    """GraphQL over GET carries its variables as a JSON query parameter (raw or encoded)."""
    for target in (
        '/graphql?query={me{id}}&variables={"input":{"password":"p","name":"n"}}',
        "/graphql?query=%7Bme%7Bid%7D%7D&variables=%7B%22input%22%3A%7B%22password%22%3A%22p%22%2C%22name%22%3A%22n%22%7D%7D",
    ):
        call = DEFAULT.apply(http_call(path=target))
        query = call.path.partition("?")[2]
        params = dict(pair.split("=", 1) for pair in query.split("&"))
        assert json.loads(unquote(params["variables"])) == {"input": {"password": REDACTED, "name": "n"}}
        assert unquote(params["query"]) == "{me{id}}"
    untouched = "/graphql?query={me{id}}&variables={}"
    assert DEFAULT.apply(http_call(path=untouched)).path == untouched


def graphql_call(body: bytes = b"", target: str = "/graphql", response: bytes = b"") -> ApiCall:
    call = ApiCall(protocol="graphql", path="Op")
    call.graphql.target = target
    call.request.body = body
    call.response.body = response
    return call


def test_graphql_inline_secret_arguments_are_redacted_wherever_the_document_travels() -> None:
    document = 'mutation { login(user: "ann", password: "s1", input: {apiKey: """k2"""}) { token } }'
    expected = f'mutation {{ login(user: "ann", password: "{REDACTED}", input: {{apiKey: "{REDACTED}"}}) {{ token }} }}'
    # As a JSON request, a batch, an application/graphql body and a shorthand query.
    call = DEFAULT.apply(graphql_call(json.dumps({"query": document, "variables": {"pin": 1}}).encode()))
    assert json.loads(call.request.body) == {"query": expected, "variables": {"pin": 1}}
    call = DEFAULT.apply(graphql_call(json.dumps([{"query": document}, {"query": "{ a }"}]).encode()))
    assert json.loads(call.request.body) == [{"query": expected}, {"query": "{ a }"}]
    assert DEFAULT.apply(graphql_call(document.encode())).request.body == expected.encode()
    shorthand = DEFAULT.apply(graphql_call(b'{ me(token: "t3") { id } }')).request.body
    assert shorthand == f'{{ me(token: "{REDACTED}") {{ id }} }}'.encode()
    # Cut by the body limit: the escaped document still loses its secret.
    cut = json.dumps({"query": document})[:-20].encode()
    assert b"s1" not in DEFAULT.apply(graphql_call(cut)).request.body
    # Over GET: the query parameter.
    target = "/graphql?query=" + quote(document, safe="")
    redacted = DEFAULT.apply(graphql_call(target=target)).graphql.target
    assert unquote(redacted.partition("=")[2]) == expected


def test_graphql_form_body_and_errors_quoting_a_secret_variable_are_redacted() -> None:
    form = b"query=mutation+L%28%24password%3A+String%21%29+%7B+login%28password%3A+%24password%29+%7D&password=x"
    assert DEFAULT.apply(graphql_call(form)).request.body.endswith(f"&password={REDACTED}".encode())
    response = json.dumps(
        {"errors": [{"message": "Variable '$password' got invalid value 'hunter2'; Int cannot represent it"}]}
    ).encode()
    call = graphql_call(response=response)
    call.graphql.first_error = "Variable '$password' got invalid value 'hunter2'; Int cannot represent it"
    DEFAULT.apply(call)
    assert json.loads(call.response.body) == {"errors": [{"message": REDACTED}]}
    assert call.graphql.first_error == REDACTED
    harmless = json.dumps({"errors": [{"message": "Variable '$id' of required type 'ID!' was not provided."}]})
    assert DEFAULT.apply(graphql_call(response=harmless.encode())).response.body == harmless.encode()
