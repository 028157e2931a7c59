"""Alerter settings. The rules file is loaded and compiled while the settings are validated, so
a bad rule stops `trawl alerter` at start (exit 2, file:line) before anything connects."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from trawl.alerter.rules import Rule, load_rules
from trawl.config import ServiceSettings


class WebhookSettings(BaseModel):
    """How webhook actions are delivered."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(default=5.0, gt=0)
    # Attempts after the first; waits backoff_s, 2*backoff_s, ... (at most backoff_max_s) between them.
    retries: int = Field(default=3, ge=0, le=20)
    backoff_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    # Deliveries in progress at once per action target (a webhook URL, an index, a bucket...), of
    # every action kind: one more is dead-lettered at once and counted (reason "overflow"), so a
    # target that is down never holds rule evaluation or the other targets.
    max_in_flight: int = Field(default=64, gt=0)
    # Signs (X-Trawl-Signature) every webhook whose action names no secret_env of its own.
    hmac_secret: SecretStr | None = None


class WindowRedisSettings(BaseModel):
    """Windowed rules' state in Redis (trawl.alerter.window_store): replicas share each group's
    window and its firing, and a restart forgets none of it. Without it, windows are in-process."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^(redis|rediss|unix)://", description="redis://host:6379/0")
    key_prefix: str = Field(default="trawl:alerter", min_length=1)
    # An alert committed in Redis but not yet stored in NATS (its replica died, NATS refused it)
    # is announced again by any replica after this long.
    claim_s: float = Field(default=15.0, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)


class ActionSettings(BaseModel):
    """How the record, influxdb, elasticsearch and s3 actions are carried out (webhooks: `webhook`)."""

    model_config = ConfigDict(extra="forbid")

    # Each attempt (an HTTP request, an upload); a record action waits its own `timeout` for the recorder.
    timeout_s: float = Field(default=10.0, gt=0)
    # Attempts after the first; waits backoff_s, 2*backoff_s, ... (at most backoff_max_s) between them.
    retries: int = Field(default=3, ge=0, le=20)
    backoff_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)


class AlerterSettings(ServiceSettings):
    service_name: ClassVar[str] = "alerter"
    model_config = SettingsConfigDict(env_prefix="TRAWL_ALERTER_")

    rules_file: Path | None = None
    # Durable pull consumer on TRAWL_ENRICHED; replicas sharing the name share the work.
    consumer: str = Field(default="alerter", pattern=r"^[A-Za-z0-9_-]+$")
    fetch_batch: int = Field(default=256, gt=0, le=10_000)
    # Calls evaluated last, by id (trawl/dedup.py): a redelivery (a NATS restart, an alerter
    # killed before its ack) is not evaluated twice.
    recent_call_ids: int = Field(default=200_000, gt=0)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    actions: ActionSettings = Field(default_factory=ActionSettings)
    redis: WindowRedisSettings | None = None

    _rules: list[Rule] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _compile_rules(self) -> AlerterSettings:
        # ConfigError is not a ValueError: it passes through pydantic untouched, with its file:line.
        self._rules = load_rules(self.rules_file) if self.rules_file is not None else []
        return self

    @property
    def rules(self) -> list[Rule]:
        return self._rules
