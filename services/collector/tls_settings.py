"""Settings of TLS plaintext capture with eBPF uprobes (the `collector.tls:` keys).

Memory: the kernel ring is `ring_pages` pages (4 KiB each); user space holds at most
`queue_max_chunks` chunks (each at most `chunk_bytes`) while NATS is slow or away.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TlsUprobeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # off: never; auto: when BPF loads here (the reason is logged when it does not); on: the
    # collector fails at start, with the reason, when BPF cannot be used.
    mode: Literal["off", "auto", "on"] = "off"
    # Bytes per chunk (a power of two: the eBPF verifier needs the copy bounded) and chunks per
    # SSL_read/SSL_write call; bytes of a call beyond chunk_bytes * chunks_per_call are counted
    # as truncated and the dissector sees them as a gap.
    chunk_bytes: int = Field(default=16384, ge=256, le=16384)
    chunks_per_call: int = Field(default=8, ge=1, le=32)
    # Kernel ring buffer size in pages, a power of two.
    ring_pages: int = Field(default=2048, ge=16, le=65536)
    # Full rescan of /proc/*/maps for TLS libraries not hooked yet (a new exec is looked at at once).
    scan_interval_s: float = Field(default=5.0, gt=0)
    batch_max_chunks: int = Field(default=512, ge=1)
    batch_max_bytes: int = Field(default=1 << 20, ge=64 << 10, le=32 << 20)
    batch_max_age_ms: int = Field(default=50, gt=0)
    queue_max_chunks: int = Field(default=16384, ge=1)

    @field_validator("chunk_bytes", "ring_pages")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two, not {value}")
        return value
