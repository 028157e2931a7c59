"""Recorder settings: where sealed pcap files go, when they rotate and how long they are kept."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from trawl.config import ServiceSettings


class RetentionSettings(BaseModel):
    """Sealed files are deleted, oldest first, once older than max_age_s or beyond max_total_bytes."""

    model_config = ConfigDict(extra="forbid")

    max_age_s: float | None = Field(default=None, gt=0)
    max_total_bytes: int | None = Field(default=None, gt=0)


class RecorderSettings(ServiceSettings):
    service_name: ClassVar[str] = "recorder"
    model_config = SettingsConfigDict(env_prefix="TRAWL_RECORDER_")

    directory: Path = Path("recordings")
    format: Literal["pcap"] = "pcap"
    # A file is sealed and a new one started once it holds this many bytes, or is this old.
    rotate_bytes: int = Field(default=256 * 1024 * 1024, ge=4096)
    rotate_seconds: float = Field(default=3600.0, gt=0)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    # Every recorder records everything published here, through a durable consumer of its own
    # of the stream TRAWL_PACKETS (default "recorder-<node>"; two recorders need two names).
    subject: str = Field(default="trawl.v1.packets.>", min_length=1)
    consumer: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")
