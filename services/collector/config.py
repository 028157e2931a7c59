"""Collector settings (env TRAWL_COLLECTOR_*, YAML section `collector:`).

A collector either replays a file (`pcap`) or captures live (`interfaces` and/or
`pod_loopback`, with the keys of `LiveCaptureSettings`: ring, shards, filter, scope, ...).
`tls` turns on TLS plaintext capture with eBPF uprobes (`TlsUprobeSettings`), beside live
capture or alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from trawl.collector.capture_settings import LiveCaptureSettings
from trawl.collector.tls_settings import TlsUprobeSettings
from trawl.config import ServiceSettings


class CollectorSettings(ServiceSettings, LiveCaptureSettings):
    service_name: ClassVar[str] = "collector"
    model_config = SettingsConfigDict(env_prefix="TRAWL_COLLECTOR_")

    # Replay this capture file (pcap or pcapng) instead of capturing live; exits when done.
    pcap: Path | None = None
    # Replay pace: 0 = as fast as the bus takes it, 1.0 = the capture's own timing, 2.0 = twice as fast.
    replay_speed: float = Field(default=0.0, ge=0)
    batch_max_packets: int = Field(default=4096, gt=0)
    batch_max_bytes: int = Field(default=1 << 20, ge=1024, le=32 << 20)
    batch_max_age_ms: int = Field(default=100, gt=0)
    # TLS plaintext through eBPF uprobes (off by default: it needs root, bcc and kernel headers).
    tls: TlsUprobeSettings = Field(default_factory=TlsUprobeSettings)

    @model_validator(mode="after")
    def _one_source(self) -> CollectorSettings:
        if self.pcap is not None and (self.interfaces or self.pod_loopback):
            raise ValueError("set either pcap (replay a file) or interfaces/pod_loopback (capture live), not both")
        return self
