"""Enricher settings: TRAWL_ENRICHER_* keys and the standard OTEL_EXPORTER_OTLP_* fallbacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from trawl.enricher.config import EnricherSettings, parse_otlp_headers
from trawl.enricher.logic import metric_exporter_for, span_exporter_for
from trawl.errors import ConfigError

OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
)


@pytest.fixture(autouse=True)
def clean_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


def test_defaults_export_nothing() -> None:
    settings = EnricherSettings.load(None, node="n1")
    assert settings.traces_target() is None
    assert settings.protocol == "grpc"
    assert settings.headers == {}
    assert settings.durable == "enricher"
    assert settings.publish_enriched is True
    assert span_exporter_for(settings) is None
    assert metric_exporter_for(settings) is None


def test_standard_environment_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20abc, x-tenant = team-a")
    settings = EnricherSettings.load(None, node="n1")
    assert settings.protocol == "http/protobuf"
    assert settings.headers == {"authorization": "Bearer abc", "x-tenant": "team-a"}
    traces = settings.traces_target()
    assert traces is not None
    assert traces.http_url("traces") == "http://collector:4318/v1/traces"
    metrics = settings.metrics_target()
    assert metrics is not None
    assert metrics.http_url("metrics") == "http://collector:4318/v1/metrics"
    # A signal-specific endpoint is used as is.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://tempo:4318/custom/traces")
    traces = EnricherSettings.load(None, node="n1").traces_target()
    assert traces is not None
    assert traces.http_url("traces") == "http://tempo:4318/custom/traces"


def test_own_keys_win_over_the_standard_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    config = tmp_path / "trawl.yaml"
    config.write_text(
        "node: n1\nenricher:\n  otlp_endpoint: tempo:4317\n  otlp_protocol: grpc\n  otlp_headers: {x-a: b}\n"
    )
    settings = EnricherSettings.load(config)
    target = settings.traces_target()
    assert target is not None
    assert target.endpoint == "tempo:4317"
    assert settings.protocol == "grpc"
    assert settings.headers == {"x-a": "b"}
    assert settings.grpc_insecure("tempo:4317") is True
    assert settings.grpc_insecure("https://tempo:4317") is False
    monkeypatch.setenv("TRAWL_ENRICHER_OTLP_INSECURE", "false")
    assert EnricherSettings.load(config).grpc_insecure("tempo:4317") is False


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "http/json",
            "OTEL_EXPORTER_OTLP_PROTOCOL: expected one of grpc, http/protobuf",
        ),
        ("OTEL_EXPORTER_OTLP_HEADERS", "novalue", "OTEL_EXPORTER_OTLP_HEADERS: expected 'name=value' pairs"),
    ],
)
def test_bad_standard_environment_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        EnricherSettings.load(None, node="n1")


def test_http_protocol_needs_a_url(tmp_path: Path) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text("enricher:\n  otlp_endpoint: collector:4318\n  otlp_protocol: http/protobuf\n")
    with pytest.raises(ConfigError, match="expected an http:// or https:// URL, got 'collector:4318'"):
        EnricherSettings.load(config)


def test_bad_key_names_the_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text("node: n1\nenricher:\n  otlp_protocol: carrier-pigeon\n")
    with pytest.raises(ConfigError) as caught:
        EnricherSettings.load(config)
    assert str(caught.value).startswith(f"{config}:3: otlp_protocol")


def test_header_parsing_skips_empty_items() -> None:
    assert parse_otlp_headers(" a=1,,b=x%3Dy ,", "test") == {"a": "1", "b": "x=y"}
