"""Reading packet batches so that a dissector that restarts, or takes a shard over, resumes
exactly where its predecessor stopped.

The collectors publish packet batches on core NATS; the in-memory stream TRAWL_PACKETS keeps
them for a bounded window (`packet_retention`, `trawl.bus.Bus.ensure_packet_stream`). A
dissector reads a shard (or, in "all" mode, its whole subject) through a durable pull consumer
and commits a `Checkpoint` every `batch_age_ms`: first the calls derived so far are published
and acknowledged by TRAWL_CALLS, then the checkpoint (the stream sequence of the last batch fed,
and per collector node its batch sequence and packet count) is written to the KV bucket
`TRAWL_DISSECTOR_CHECKPOINTS`, then the consumer is acked up to that batch.

So every call derived from a batch at or below a checkpoint has been published. The next owner
of the shard (a restarted process, or another replica after a handover or a crash) re-creates
the consumer to start `warmup_s` of stream time before the checkpoint: it feeds the batches up to
the checkpoint only to rebuild the flows' state and throws their calls away (its predecessor
published them), and publishes the calls of every batch after it. A call in flight at the
checkpoint therefore comes out once, whole (its request is in the warm-up), never as a
`no_response` request plus a response-only record. Calls its predecessor published after its
last checkpoint are derived again with the same ids (`calls.call_id`) and dropped by the streams'
duplicate windows and by the consumers' `trawl.dedup.RecentIds`.

What aged out of the window before it was read is counted from the batches' sequences and
`packets_before` (`trawl.packet_stream.LossCounter`), in a metric and in the resuming service's log line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from trawl.logs import get_logger

log = get_logger(__name__)

CHECKPOINT_BUCKET = "TRAWL_DISSECTOR_CHECKPOINTS"


@dataclass
class Checkpoint:
    """Where a reader stopped: every call derived from batches up to `stream_seq` is published.

    `sequences[node]` is the batch sequence of the last batch of that collector node fed, and
    `packets[node]` the packets that node's sequence carried up to and including it (its
    `packets_before + packet_count`), so the next reader counts exactly what it missed.
    """

    stream_seq: int = 0
    stored_ns: int = 0  # when the stream stored that batch (the warm-up is measured from it)
    stream: str = ""  # the incarnation of the stream `stream_seq` counts in (`PacketReader.stream_id`)
    sequences: dict[str, int] = field(default_factory=dict)
    packets: dict[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(vars(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, value: bytes) -> Checkpoint | None:
        """None for a value that is not a checkpoint (it is then ignored, and said)."""
        try:
            document = json.loads(value)
            return cls(
                stream_seq=int(document["stream_seq"]),
                stored_ns=int(document["stored_ns"]),
                sequences={str(k): int(v) for k, v in dict(document["sequences"]).items()},
                packets={str(k): int(v) for k, v in dict(document["packets"]).items()},
                stream=str(document.get("stream", "")),
            )
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return None


class CheckpointStore:
    """Checkpoints in a KV bucket with no TTL (a shard nobody owns for a while keeps its place)."""

    def __init__(self, js: JetStreamContext, bucket: str = CHECKPOINT_BUCKET) -> None:
        self.js = js
        self.bucket = bucket
        self.kv: KeyValue | None = None

    async def open(self) -> None:
        try:
            self.kv = await self.js.create_key_value(bucket=self.bucket, history=1)
        except BadRequestError:
            self.kv = await self.js.key_value(self.bucket)

    async def load(self, key: str) -> Checkpoint | None:
        kv = self._kv()
        try:
            entry = await kv.get(key)
        except NotFoundError:  # the KV's KeyNotFoundError (and a deleted key) are NotFoundErrors
            return None
        checkpoint = Checkpoint.decode(entry.value or b"")
        if checkpoint is None:
            log.warning("checkpoint_unreadable", bucket=self.bucket, key=key)
        return checkpoint

    async def save(self, key: str, checkpoint: Checkpoint) -> None:
        await self._kv().put(key, checkpoint.encode())

    def _kv(self) -> KeyValue:
        if self.kv is None:
            raise RuntimeError("CheckpointStore.open() was not awaited")
        return self.kv


def warmup_start(checkpoint: Checkpoint | None, warmup_s: float) -> datetime | None:
    """Where a new owner starts reading: `warmup_s` of stream time before the checkpoint; None
    (the start of the window) without one."""
    if checkpoint is None or not checkpoint.stored_ns:
        return None
    return datetime.fromtimestamp(checkpoint.stored_ns / 1e9, UTC) - timedelta(seconds=warmup_s)
