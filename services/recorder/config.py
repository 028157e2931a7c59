"""Recorder settings: where sealed pcap files go, when they rotate and how long they are kept;
the look-back held in memory for recordings on demand, and the recordings a schedule starts."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import SettingsConfigDict

from trawl.config import ServiceSettings


class RetentionSettings(BaseModel):
    """Sealed files are deleted, oldest first, once older than max_age_s or beyond max_total_bytes."""

    model_config = ConfigDict(extra="forbid")

    max_age_s: float | None = Field(default=None, gt=0)
    max_total_bytes: int | None = Field(default=None, gt=0)


class ObjectLockSettings(BaseModel):
    """S3 Object Lock retention set on every object uploaded (the bucket must have Object Lock
    enabled): GOVERNANCE (users with s3:BypassGovernanceRetention may still delete) or
    COMPLIANCE (nobody can, until the days have passed)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["GOVERNANCE", "COMPLIANCE"]
    days: int = Field(gt=0)


class S3Settings(BaseModel):
    """Sealed files shipped to S3 (credentials from the standard AWS environment variables or
    profile, as boto3 finds them)."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(min_length=3, max_length=63)
    # An S3-compatible endpoint (MinIO, Ceph...); none: AWS's own for the region.
    endpoint_url: str | None = None
    # Objects are <prefix><node>/<file> and <prefix><node>/on-demand/<file>, each with a
    # <key>.sha256 object holding its SHA256SUMS line.
    prefix: str = ""
    region: str | None = None
    object_lock: ObjectLockSettings | None = None
    # Delete the local file (and its SHA256SUMS line) once the upload is verified.
    delete_local_after_upload: bool = False
    # Besides the stored checksum (HEAD), read the object back and hash it.
    verify_download: bool = False
    # A failed upload is tried again after retry_initial_s, doubling up to retry_max_s.
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=300.0, gt=0)


class ScheduleSettings(BaseModel):
    """A recording started at each time a cron expression names, of a scope, for duration_s."""

    model_config = ConfigDict(extra="forbid")

    # Five fields (minute hour day month weekday), or six with seconds last, as croniter reads them.
    cron: str
    duration_s: float = Field(gt=0)
    namespaces: list[str] = Field(default_factory=list)
    pods: list[str] = Field(default_factory=list)
    nodes: list[str] = Field(default_factory=list)
    ips: list[str] = Field(default_factory=list)
    filter: str = ""
    reason: str = ""

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        if not croniter.is_valid(value):
            raise ValueError(
                f"{value!r} is not a cron expression: give five fields (minute hour day month weekday), "
                "e.g. '0 * * * *' for every hour, or six with seconds last"
            )
        return value


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
    # Every batch into the rotating files above (the default); false: only recordings on
    # demand and on schedule are written.
    continuous: bool = True
    # Recordings on demand (trawl.v1.control.record) and on schedule go to <directory>/on-demand.
    recordings_format: Literal["pcap", "pcapng"] = "pcapng"
    # The packets of the last lookback_s (in the packets' own time) per node, at most
    # lookback_bytes per node, are held in memory and start every recording; 0 holds none.
    lookback_s: float = Field(default=30.0, ge=0)
    lookback_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    max_recordings: int = Field(default=16, ge=1)
    # A `kubectl get pods -A -o json` snapshot (the file the enricher reads offline): how a
    # recording scoped by namespace or pod regex finds the pods' addresses. Read at each request.
    identity: Path | None = None
    # Answer trawl.v1.control.record (queue group "recorder": one recorder takes each request).
    control: bool = True
    schedules: list[ScheduleSettings] = Field(default_factory=list)
    # Ship sealed files to S3 (see upload.py); none: they stay local only.
    s3: S3Settings | None = None
