"""Config: YAML + env + overrides, validated at start, errors naming file and line."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from trawl.config import ServiceSettings
from trawl.errors import ConfigError


class ExampleSettings(ServiceSettings):
    service_name: ClassVar[str] = "dissector"
    model_config = SettingsConfigDict(env_prefix="TRAWL_EXAMPLE_")
    max_flows: int = Field(default=10, gt=0)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trawl.yaml"
    path.write_text(text)
    return path


def test_common_keys_and_service_section_merge(tmp_path: Path) -> None:
    path = write(tmp_path, "node: n1\nnats:\n  servers: [nats://a:4222]\ndissector:\n  max_flows: 5\n  node: n2\n")
    settings = ExampleSettings.load(path)
    assert settings.node == "n2"
    assert settings.max_flows == 5
    assert settings.nats.servers == ["nats://a:4222"]


def test_env_beats_file_and_overrides_beat_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "dissector:\n  max_flows: 5\n")
    monkeypatch.setenv("TRAWL_EXAMPLE_MAX_FLOWS", "7")
    monkeypatch.setenv("TRAWL_EXAMPLE_NATS__SERVERS", '["nats://env:4222"]')
    assert ExampleSettings.load(path).max_flows == 7
    assert ExampleSettings.load(path).nats.servers == ["nats://env:4222"]
    assert ExampleSettings.load(path, max_flows=9).max_flows == 9


def test_bad_value_names_file_line_and_reason(tmp_path: Path) -> None:
    path = write(tmp_path, "node: n1\ndissector:\n  log_level: info\n  max_flows: -3\n")
    with pytest.raises(ConfigError) as caught:
        ExampleSettings.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:4: max_flows:")
    assert "greater than 0" in message


def test_unknown_key_lists_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "dissector:\n  max_flow: 3\n")
    with pytest.raises(ConfigError, match=r"trawl.yaml:2: max_flow: unknown key; known keys: .*max_flows"):
        ExampleSettings.load(path)


def test_nested_bad_value_points_at_nested_line(tmp_path: Path) -> None:
    path = write(tmp_path, "nats:\n  servers: []\n")
    with pytest.raises(ConfigError, match=r"trawl.yaml:2: nats.servers:"):
        ExampleSettings.load(path)


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAWL_EXAMPLE_MAX_FLOWS", "many")
    with pytest.raises(ConfigError, match=r"^TRAWL_EXAMPLE_MAX_FLOWS: .*'many'"):
        ExampleSettings.load()


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "node: n1\ndissector:\n  max_flows: [1,\n")
    with pytest.raises(ConfigError, match=r"trawl.yaml:\d+: not valid YAML"):
        ExampleSettings.load(path)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        ExampleSettings.load(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        ExampleSettings.load(write(tmp_path, "- a\n- b\n"))
