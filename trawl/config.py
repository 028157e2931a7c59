"""Typed, validated configuration shared by every service.

Each service has one settings class derived from `ServiceSettings`. Values come from, in
order of precedence: explicit overrides (CLI flags), environment variables
`TRAWL_<SERVICE>_<KEY>` (nested keys joined by `__`, e.g. `TRAWL_DISSECTOR_NATS__SERVERS`),
then an optional YAML file. One YAML file can configure the whole suite: top-level keys
are common to every service (`node`, `log_level`, `nats`, ...) and a section named after a
service (`dissector:`, `enricher:`, ...) holds that service's keys and overrides the common
ones.

Validation happens at start; an invalid value raises `ConfigError` naming the file and line
(or the environment variable) that holds it, and what is expected.
"""

from __future__ import annotations

import os
import socket
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from trawl.errors import ConfigError
from trawl.logs import LogFormat

if TYPE_CHECKING:
    import yaml

SERVICES = ("collector", "dissector", "enricher", "recorder", "alerter")


class NatsSettings(BaseModel):
    """How to reach NATS: the standard nats-py connection options."""

    model_config = ConfigDict(extra="forbid")

    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"], min_length=1)
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    creds_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Try the first connection this many times (1 s apart) before giving up with one line; -1 = forever.
    connect_attempts: int = Field(default=3, ge=-1)


class StreamLimits(BaseModel):
    """Retention of the JetStream streams a service creates."""

    model_config = ConfigDict(extra="forbid")

    max_age_s: float = Field(default=3600.0, gt=0)
    max_bytes: int = Field(default=1 << 30, gt=0)
    replicas: int = Field(default=1, ge=1, le=5)


class PacketRetention(BaseModel):
    """The bounded window of packet batches NATS keeps (JetStream stream TRAWL_PACKETS, in memory),
    so a dissector or recorder that restarts or takes a shard over resumes without loss; what
    ages out of it before it is read is counted by the reader, in batches and packets."""

    model_config = ConfigDict(extra="forbid")

    max_age_s: float = Field(default=60.0, gt=0)
    max_bytes: int = Field(default=1 << 30, gt=0)
    replicas: int = Field(default=1, ge=1, le=5)
    # "memory": the window is lost with a NATS server that restarts (what it held unread is
    # counted as lost); "file": it survives the restart, at the cost of the server's disk writes.
    storage: Literal["memory", "file"] = "memory"


class ServiceSettings(BaseSettings):
    """Keys every service has."""

    service_name: ClassVar[str] = ""

    model_config = SettingsConfigDict(extra="forbid", env_nested_delimiter="__", validate_default=True)

    node: str = Field(default_factory=socket.gethostname, min_length=1)
    log_level: str = Field(default="info", pattern=r"(?i)^(debug|info|warning|error|critical)$")
    log_format: LogFormat = "auto"
    nats: NatsSettings = Field(default_factory=NatsSettings)
    streams: StreamLimits = Field(default_factory=StreamLimits)
    packet_retention: PacketRetention = Field(default_factory=PacketRetention)
    # Port of the /metrics, /healthz and /readyz endpoint; 0 picks a free port, None disables it.
    http_port: int | None = Field(default=None, ge=0, le=65535)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Overrides > environment > YAML file: the YAML data arrives through a private init key.
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @classmethod
    def load(cls, config_file: Path | str | None = None, **overrides: Any) -> Self:
        """Read, merge and validate; raise ConfigError naming the file/line or env var at fault."""
        document = YamlDocument.read(Path(config_file)) if config_file else YamlDocument.empty()
        section = document.section_for(cls.service_name)
        token = _yaml_section.set(section)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            raise _explain(exc, cls, document) from None
        finally:
            _yaml_section.reset(token)


# The YAML section `load` is validating; pydantic-settings builds sources per class, not per call.
_yaml_section: ContextVar[dict[str, Any]] = ContextVar("_yaml_section", default={})  # noqa: B039


class _YamlSource(PydanticBaseSettingsSource):
    """The lowest-precedence source: the YAML section handed over by `load`."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _yaml_section.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_section.get())


class YamlDocument:
    """A parsed YAML config file plus the line of every key, for error messages."""

    def __init__(self, path: Path | None, data: dict[str, Any], lines: dict[tuple[str, ...], int]) -> None:
        self.path = path
        self.data = data
        self.lines = lines

    @classmethod
    def empty(cls) -> YamlDocument:
        return cls(None, {}, {})

    @classmethod
    def read(cls, path: Path) -> YamlDocument:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file: {exc.strerror}", path=path) from None
        import yaml  # only with a config file: `trawl analyze FILE` starts without it

        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"not valid YAML: {problem}", path=path, line=mark.line + 1 if mark else None) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("the config file must hold a mapping of keys to values", path=path, line=1)
        lines: dict[tuple[str, ...], int] = {}
        if node is not None:
            _collect_lines(node, (), lines)
        return cls(path, data, lines)

    def section_for(self, service: str) -> dict[str, Any]:
        """Common keys, overridden by the service's own section; other services' sections dropped."""
        merged = {k: v for k, v in self.data.items() if k not in SERVICES}
        own = self.data.get(service)
        if isinstance(own, dict):
            merged.update(own)
        elif own is not None:
            raise ConfigError(
                f"'{service}' must be a mapping of that service's keys",
                path=self.path,
                line=self.lines.get((service,)),
            )
        return merged

    def line_of(self, service: str, loc: tuple[str, ...]) -> int | None:
        for candidate in ((service, *loc), loc):
            for cut in range(len(candidate), 0, -1):
                if candidate[:cut] in self.lines:
                    return self.lines[candidate[:cut]]
        return None


def _collect_lines(node: yaml.Node, prefix: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            out[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = (*prefix, str(index))
            out[key] = item.start_mark.line + 1
            _collect_lines(item, key, out)


def _env_name(settings_cls: type[ServiceSettings], loc: tuple[str, ...]) -> str:
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    return (prefix + "__".join(loc)).upper()


def _explain(exc: ValidationError, settings_cls: type[ServiceSettings], document: YamlDocument) -> ConfigError:
    """Turn pydantic's error into one line naming where the value came from and what is wrong."""
    first = exc.errors()[0]
    loc = tuple(str(part) for part in first["loc"])
    key = ".".join(loc) or "(top level)"
    reason = first["msg"]
    if first["type"] == "extra_forbidden":
        known = ", ".join(sorted(settings_cls.model_fields))
        reason = f"unknown key; known keys: {known}"
    env_var = _env_name(settings_cls, loc)
    if loc and env_var in os.environ:
        return ConfigError(f"{env_var}: {reason} (got {os.environ[env_var]!r})")
    line = document.line_of(settings_cls.service_name, loc)
    value = first.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) and first["type"] != "missing" else ""
    if document.path is None:
        return ConfigError(f"{key}: {reason}{shown}")
    return ConfigError(f"{key}: {reason}{shown}", path=document.path, line=line)


S = TypeVar("S", bound=ServiceSettings)
