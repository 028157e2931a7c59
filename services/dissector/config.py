"""The dissector's settings: memory bounds, timeouts, redaction lists, batching, bus subjects.

Every bound DESIGN.md promises ("memory is bounded and the bounds are configuration") is a key
here; the engine counts each time one is hit.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from trawl.config import ServiceSettings

# Header names (case-insensitive, shell-style patterns allowed) whose values never leave the dissector.
DEFAULT_REDACT_HEADERS = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
    "x-csrf-token",
    "x-xsrf-token",
    "x-amz-security-token",
    "*api-key*",
    "*apikey*",
    "*-token",
    "*secret*",
    "*password*",
]

# Query-parameter, form-field and JSON-key names (case-insensitive, shell-style patterns).
DEFAULT_REDACT_FIELDS = [
    "*token*",
    "*secret*",
    "*password*",
    "*passwd*",
    "pwd",
    "api_key",
    "apikey",
    "api-key",
    "access_key",
    "*private_key*",
    "*credential*",
    "authorization",
    "auth",
    "sig",
    "signature",
    "session",
    "sessionid",
    "client_secret",
]


class DissectorSettings(ServiceSettings):
    """Configuration of the dissector service (env prefix TRAWL_DISSECTOR_, YAML section `dissector:`)."""

    service_name: ClassVar[str] = "dissector"
    model_config = SettingsConfigDict(env_prefix="TRAWL_DISSECTOR_")

    # Which replica takes which collector shard (services/dissector/shards.py):
    # - "lease": the replicas of `queue_group` share the shards through leases in the JetStream
    #   KV bucket `shard_bucket`; each shard has one owner at a time, taken over when the owner
    #   dies (within about two `shard_lease_ttl_s`) and rebalanced when replicas come and go; the
    #   owner of shard k reads `shard_subject` with k filled in from the packet stream, through
    #   the durable consumer "<queue_group>-shard-<k>", from the shard's checkpoint;
    # - "all": this replica reads `subject` (`trawl up`, a single dissector, or one replica per
    #   shard subject) through the consumer "<queue_group>-all-<subject>"; two replicas of one
    #   group on one subject would take the consumer from each other.
    # The default is "lease" whatever else is set: a replica meant to take `subject` says "all"
    # (in "lease" mode `subject` is not read).
    shard_assignment: Literal["lease", "all"] = "lease"
    # How many shard indexes exist: the collector's `shards`.
    shards: int = Field(default=1, ge=1, le=1024)
    shard_lease_ttl_s: float = Field(default=6.0, ge=0.3, le=3600)
    replica_id: str = Field(default_factory=lambda: default_replica_id(), pattern=r"^[A-Za-z0-9_-]+$")
    shard_bucket: str = Field(default="TRAWL_DISSECTOR_SHARDS", pattern=r"^[A-Za-z0-9_-]+$")
    shard_subject: str = Field(default="trawl.v1.packets.*.{shard}", min_length=1)
    # "all": the subject taken. Both modes: the replicas that share the work (the scope of the
    # leases, consumer names and checkpoints).
    subject: str = Field(default="trawl.v1.packets.>", min_length=1)
    queue_group: str = Field(default="dissector", min_length=1)
    # Resuming (services/dissector/resume.py): where each reader's checkpoint is kept, how much
    # stream time before it a new owner replays to rebuild flow state (exchanges in flight at the
    # checkpoint that began earlier than this come out without their start), and the batches
    # asked for per fetch.
    checkpoint_bucket: str = Field(default="TRAWL_DISSECTOR_CHECKPOINTS", pattern=r"^[A-Za-z0-9_-]+$")
    resume_warmup_s: float = Field(default=60.0, ge=0)
    fetch_batch: int = Field(default=64, gt=0, le=4096)
    # Calls are carried in CallBatch messages of up to this many calls, or this old.
    calls_per_batch: int = Field(default=500, gt=0, le=100_000)
    batch_age_ms: int = Field(default=200, gt=0)
    # How often timeouts are checked while no packet arrives.
    expire_interval_s: float = Field(default=1.0, gt=0)

    # Flow table and TCP reassembly bounds.
    max_flows: int = Field(default=100_000, gt=0)
    max_bytes_per_flow: int = Field(default=1 << 20, gt=0)
    max_total_buffered_bytes: int = Field(default=256 << 20, gt=0)
    flow_idle_timeout_s: float = Field(default=300.0, gt=0)
    handshake_timeout_s: float = Field(default=10.0, gt=0)
    # Bytes a flow may show before its protocol is decided (content detection window).
    detection_window_bytes: int = Field(default=4096, ge=16)

    # IP fragment reassembly bounds.
    max_ip_fragments: int = Field(default=10_000, ge=0)
    max_ip_fragment_bytes: int = Field(default=16 << 20, ge=0)
    ip_fragment_timeout_s: float = Field(default=30.0, gt=0)

    # The compiled HTTP/1 lane (services/dissector/_express.c): in-order HTTP/1 flows are
    # dissected in C and handed back to the Python path, replayed, the moment anything is less
    # than simple. Off: every packet takes the Python path (the lane's reference).
    express: bool = True
    # Packets an express flow keeps for a replay (those since its last exchange), per flow.
    express_max_retained_bytes: int = Field(default=1 << 20, gt=0)

    # Parser bounds.
    max_body_bytes: int = Field(default=64 * 1024, ge=0)
    max_header_bytes: int = Field(default=64 * 1024, gt=0)
    max_pending_requests: int = Field(default=1024, gt=0)
    request_timeout_s: float = Field(default=30.0, gt=0)

    # gRPC: descriptor sets (`protoc --descriptor_set_out`, best with --include_imports) whose
    # types decode the messages of the methods they describe, with field names; messages of
    # other methods are decoded without a schema (field numbers). `trawl analyze
    # --proto-descriptors FILE` adds to this list.
    proto_descriptors: list[Path] = Field(default_factory=list)

    # Redaction (case-insensitive; `*` and `?` wildcards allowed). `redact_*` replace the
    # default lists (to drop a default); `redact_*_extra` add to them, so adding one name does
    # not mean restating, or silently losing, the defaults.
    redact_headers: list[str] = Field(default_factory=lambda: list(DEFAULT_REDACT_HEADERS))
    redact_fields: list[str] = Field(default_factory=lambda: list(DEFAULT_REDACT_FIELDS))
    redact_headers_extra: list[str] = Field(default_factory=list)
    redact_fields_extra: list[str] = Field(default_factory=list)

    @property
    def redacted_headers(self) -> list[str]:
        return [*self.redact_headers, *self.redact_headers_extra]

    @property
    def redacted_fields(self) -> list[str]:
        return [*self.redact_fields, *self.redact_fields_extra]

    @field_validator("shard_subject")
    @classmethod
    def _shard_subject_names_the_shard(cls, value: str) -> str:
        if "{shard}" not in value:
            raise ValueError("must contain '{shard}', where the shard index goes")
        return value


def default_replica_id() -> str:
    """hostname-pid, in the characters a KV key allows (a pod name already fits)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{socket.gethostname()}-{os.getpid()}")
