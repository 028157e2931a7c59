"""Settings of live capture (the `collector:` keys other than file replay).

Memory: every shard has one ring per capture point (the host device group, plus one per
pod-loopback namespace), each `ring.block_size * ring.block_count` bytes.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trawl.collector.afpacket import RingGeometry
from trawl.collector.pods import DEFAULT_POD_INTERFACE_PATTERNS


class RingSettings(BaseModel):
    """TPACKET_V3 ring of each packet socket."""

    model_config = ConfigDict(extra="forbid")

    # Bytes per block, a multiple of the page size; one block becomes at most one batch's records,
    # so it must not exceed batch_max_bytes (nor the NATS max_payload, 1 MiB by default).
    block_size: int = Field(default=256 * 1024, ge=4096, le=16 << 20)
    block_count: int = Field(default=64, ge=2, le=4096)
    # Upper bound of one captured frame (snaplen plus headers), a multiple of 16.
    frame_size: int = Field(default=2048, ge=128)
    # A block that is not full is handed over this long after its first packet.
    retire_timeout_ms: int = Field(default=50, ge=1, le=10_000)

    def geometry(self) -> RingGeometry:
        return RingGeometry(self.block_size, self.block_count, self.frame_size, self.retire_timeout_ms)


class ScopeSettings(BaseModel):
    """Which pods' traffic to capture (see trawl.collector.scope); changeable at run time."""

    model_config = ConfigDict(extra="forbid")

    namespaces: list[str] = Field(default_factory=list)
    exclude_namespaces: list[str] = Field(default_factory=list)
    pod_regexes: list[str] = Field(default_factory=list)
    # `kubectl get pods -A -o json` output giving the pods' IPs; required when the scope names pods.
    identity_snapshot: Path | None = None


class LiveCaptureSettings(BaseModel):
    """The keys of live capture; CollectorSettings has them all (it derives from this class)."""

    model_config = ConfigDict(extra="forbid")

    # Interface names, "any" (every interface, SLL2 records) or "pods" (the host side of every pod);
    # may be empty when only pod loopbacks are captured.
    interfaces: list[str] = Field(default_factory=list)
    shards: int = Field(default=1, ge=1, le=64)
    snaplen: int = Field(default=262144, ge=64, le=262144)
    ring: RingSettings = Field(default_factory=RingSettings)
    filter: str = ""
    scope: ScopeSettings = Field(default_factory=ScopeSettings)
    pod_interface_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_POD_INTERFACE_PATTERNS))
    # Network namespaces ("ip netns" names or /proc/<pid>/ns/net paths) whose loopback to capture.
    pod_loopback: list[str] = Field(default_factory=list)
    # Publish each of them under the node `<node>/<pod address>` (trawl.collector.loopback): the
    # enricher names their calls' loopback ends as the pod, and the dissector keeps each pod's
    # loopback flows apart. Their calls go out on the node's own subject (bus.calls_subject), so
    # a per-node filter (`trawl.v1.calls.<node>.>`) takes them too. Off: named by address only.
    pod_loopback_as_pod: bool = True
    batch_max_packets: int = Field(default=4096, gt=0)
    batch_max_bytes: int = Field(default=1 << 20, ge=4096)
    batch_max_age_ms: int = Field(default=100, gt=0)
    # Batches held per shard while NATS is slow or away; more are dropped and counted.
    queue_max_batches: int = Field(default=256, ge=1)
    stats_interval_s: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _block_fits_batch(self) -> LiveCaptureSettings:
        if self.ring.block_size > self.batch_max_bytes:
            raise ValueError(
                f"ring.block_size ({self.ring.block_size}) must not exceed batch_max_bytes ({self.batch_max_bytes})"
            )
        return self
