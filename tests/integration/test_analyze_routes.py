"""`trawl analyze` with `enricher.routes` in its config: the committed HTTP capture's calls carry
the OpenAPI document's templated `http.route` in the JSON, and in the spans and RED metrics
sent to a real OTLP receiver (both span paths); a bad document stops it with file:line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.otlp_receiver import OtlpReceiver

CAPTURE = FIXTURES / "http1.pcap"  # GET /api/users/42, /api/users/7?token=..., POST /api/orders, ...

OPENAPI = """\
openapi: 3.1.0
info: {title: users, version: "1"}
servers:
  - url: http://127.0.0.2:8080/api
paths:
  /users/{userId}:
    get: {}
  /orders:
    post: {}
"""


def write_config(tmp_path: Path, document: str = OPENAPI, span_path: str = "compiled") -> Path:
    (tmp_path / "openapi.yaml").write_text(document)
    config = tmp_path / "trawl.yaml"
    # The calls of the capture have no identity: the document names their destination by address.
    config.write_text(
        f"enricher:\n  span_path: {span_path}\n  metrics_export_interval_s: 3600\n  routes:\n    openapi:\n"
        f"      - service: 127.0.0.2\n        source: {tmp_path / 'openapi.yaml'}\n"
    )
    return config


def analyze(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trawl", "analyze", *args], capture_output=True, text=True, timeout=120, check=check
    )


def routes_by_path(output: str) -> dict[str, str]:
    calls = [json.loads(line) for line in output.splitlines()]
    return {call["path"]: call.get("http", {}).get("route", "") for call in calls}


EXPECTED = {
    "/api/users/42": "/api/users/{userId}",
    "/api/users/7?token=[REDACTED]": "/api/users/{userId}",
    "/api/orders": "/api/orders",
    # Not in the document: learned (no id to template, few enough to stay literal).
    "/api/missing": "/api/missing",
    "/api/fail": "/api/fail",
    "/api/stream": "/api/stream",
}


def test_analyze_json_carries_the_documents_routes(tmp_path: Path) -> None:
    assert routes_by_path(analyze("--json", "--config", str(write_config(tmp_path)), str(CAPTURE)).stdout) == EXPECTED
    # Without documents, routes are learned (ids templated); with routes off, none is made up.
    learned = routes_by_path(analyze("--json", str(CAPTURE)).stdout)
    assert {route for path, route in learned.items() if path.startswith("/api/users/")} == {"/api/users/{id}"}
    off = tmp_path / "off.yaml"
    off.write_text("enricher:\n  routes:\n    enabled: false\n")
    assert set(routes_by_path(analyze("--json", "--config", str(off), str(CAPTURE)).stdout).values()) == {""}


@pytest.mark.parametrize("span_path", ["compiled", "sdk"])
def test_spans_and_metrics_carry_the_route(tmp_path: Path, span_path: str) -> None:
    config = write_config(tmp_path, span_path=span_path)
    with OtlpReceiver() as receiver:
        analyze("--config", str(config), "--otlp-endpoint", receiver.grpc_endpoint, str(CAPTURE))
        spans = receiver.wait_for_spans(2 * len(EXPECTED))
        points = receiver.points()
    servers = {span.attributes["url.path"]: span for span in spans if span.kind == "SERVER"}
    assert servers["/api/users/42"].attributes["http.route"] == "/api/users/{userId}"
    assert servers["/api/users/42"].name == "GET /api/users/{userId}"
    assert servers["/api/users/7"].attributes["http.route"] == "/api/users/{userId}"
    assert servers["/api/missing"].attributes["http.route"] == "/api/missing"
    durations = [point for point in points if point.metric == "http.server.request.duration"]
    assert {point.attributes.get("http.route") for point in durations} == set(EXPECTED.values()) - {""}
    # The route bounds the server series' url.template too (not a template of each path).
    templates = {point.attributes.get("url.template") for point in durations}
    assert "/api/users/{userId}" in templates and "/api/users/{id}" not in templates


def test_a_bad_document_stops_analyze_naming_its_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, document="openapi: 3.0.0\npaths:\n  users/{id}: {}\n")
    result = analyze("--json", "--config", str(config), str(CAPTURE), check=False)
    assert result.returncode == 2
    assert f"{tmp_path / 'openapi.yaml'}:3: path 'users/{{id}}' must start with '/'" in result.stderr
