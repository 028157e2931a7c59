"""The one bounded, counted batching queue of span export, for both span paths: the SDK path's
ReadableSpans (otlp.CountingBatchSpanProcessor) and the compiled path's encoded requests
(wire_export.WireSpanExport).

It has the OpenTelemetry SDK BatchSpanProcessor's shape (the queue, its bound, the batching
thread, the drop counting and the flush belong here; a `send` callable only sends) and counts
every span it is handed in exactly one of `trawl_enricher_spans_exported_total`,
`..._dropped_total{reason="queue_full"|"shutdown"}` and `..._failed_total` (span_totals.py).
Items weigh their span count (a ReadableSpan 1, an encoded request its spans); the queue and
the batches are bounded in spans.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

from trawl.enricher.span_totals import SpanCounters, SpanTotals
from trawl.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

# A worker that does not come back from a send this long after the sender was closed is left
# behind; its batch is then counted as dropped at shutdown.
WORKER_GRACE_S = 2.0


@dataclass(frozen=True)
class Sent:
    """What became of one batch: spans the backend took, spans it refused or that were lost
    (exported + failed = the batch's spans), and the reason when not all went."""

    exported: int
    failed: int
    message: str = ""


class CountingBatcher(Generic[T]):
    """Items queue up to `max_queue_spans` (one that does not fit is dropped and counted as
    `queue_full`: the queue keeps what it holds); a thread sends batches of up to
    `max_batch_spans` when one is full or every `schedule_delay_s`. `shutdown` sends what is
    queued within `shutdown_timeout_s`, then calls `close` (which must end a send in progress)
    and counts what is left as `shutdown`.

    `wait_for_room` (a file's reader): a hand-over that does not fit waits for room, at most
    `wait_timeout_s`, while batches are being accepted; once one fails it drops as usual."""

    def __init__(
        self,
        send: Callable[[list[T], int], Sent],
        close: Callable[[], None],
        counters: SpanCounters,
        *,
        weight: Callable[[T], int] | None,
        max_queue_spans: int,
        max_batch_spans: int,
        schedule_delay_s: float,
        shutdown_timeout_s: float,
        wait_for_room: bool = False,
        wait_timeout_s: float = 10.0,
        thread_name: str = "trawl-span-export",
    ) -> None:
        if min(max_queue_spans, max_batch_spans) <= 0 or min(schedule_delay_s, shutdown_timeout_s) <= 0:
            raise ValueError("queue size, batch size, schedule delay and shutdown timeout must be positive")
        self._send = send
        self._close = close
        self.counters = counters
        self._weight = weight  # None: every item is one span
        self.max_queue_spans = max_queue_spans
        self.max_batch_spans = min(max_batch_spans, max_queue_spans)
        self.schedule_delay_s = schedule_delay_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.wait_for_room = wait_for_room
        self.wait_timeout_s = wait_timeout_s
        # `_lock` guards the queue, the flags and every counter update, so the counters add up
        # whenever it is free; `_export_lock` lets one batch go at a time (the worker's or a
        # flush's), so batches leave in the order they were queued.
        self._lock = threading.Lock()
        self._export_lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # a batch left the queue, or a send failed
        self._queue: deque[T] = deque()
        self._queued_spans = 0
        self._in_flight = 0
        self._healthy = True  # the last batch was accepted whole
        self._stopping = False  # no more items accepted
        self._finished = False  # accounting closed: a late send result is no longer counted
        # Shutdown's time is up: no further batch, and a sender's backoff waiting on it ends.
        self.cut = threading.Event()
        self._wake = threading.Event()
        self._consecutive_failures = 0
        self._worker = threading.Thread(target=self._work, name=thread_name, daemon=True)
        self._worker.start()

    def _spans(self, item: T) -> int:
        return 1 if self._weight is None else self._weight(item)

    def hand_over(self, items: Sequence[T]) -> None:
        """Queue items (one lock and one update of each counter for all of them); returns
        without waiting for the network (unless `wait_for_room`)."""
        total = len(items) if self._weight is None else sum(map(self._weight, items))
        if not total:
            return
        with self._lock:
            self.counters.handed.inc(total)
            if self._stopping:
                self.counters.dropped.inc(total, reason="shutdown")
                return
            if self._weight is None and not self.wait_for_room:
                # One span each: the room decides in one step (the newest are the ones dropped).
                room = max(0, self.max_queue_spans - self._queued_spans)
                if room < len(items):
                    self.counters.dropped.inc(len(items) - room, reason="queue_full")
                    items = items[:room]
                self._queue.extend(items)
                self._queued_spans += len(items)
            else:
                for item in items:
                    self._queue_one(item)
            ready = self._queued_spans >= self.max_batch_spans
        if ready:
            self._wake.set()

    def _queue_one(self, item: T) -> None:
        """With the lock held."""
        spans = self._spans(item)
        if not spans:
            return
        if self._queued_spans + spans > self.max_queue_spans and self.wait_for_room:
            self._wake.set()
            self._room.wait_for(partial(self._may_queue, spans), timeout=self.wait_timeout_s)
            if self._stopped():
                self.counters.dropped.inc(spans, reason="shutdown")
                return
        if self._queued_spans + spans > self.max_queue_spans:
            self.counters.dropped.inc(spans, reason="queue_full")
            return
        self._queue.append(item)
        self._queued_spans += spans

    def _may_queue(self, spans: int) -> bool:
        """What a waiting hand-over waits for (with the lock): room, a shutdown, or a failure."""
        return self._queued_spans + spans <= self.max_queue_spans or self._stopping or not self._healthy

    def _stopped(self) -> bool:
        return self._stopping

    def queued_spans(self) -> int:
        with self._lock:
            return self._queued_spans

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Send every queued item now, in the caller's thread; False when the deadline passed
        with items still queued, or a batch was not accepted whole."""
        deadline = time.monotonic() + timeout_s
        all_sent = True
        while time.monotonic() < deadline:
            sent = self._export_one_batch()
            if sent is None:
                return all_sent
            all_sent = all_sent and sent
        with self._lock:
            return all_sent and not self._queue

    def shutdown(self) -> None:
        """Send what is queued (within `shutdown_timeout_s`), close the sender, and close the
        accounting: afterwards every span handed over is counted exactly once."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._room.notify_all()
        self._wake.set()
        self._worker.join(self.shutdown_timeout_s)
        self.cut.set()
        # Ends a send still in progress (a gRPC channel closed) so the worker can return; what
        # it was sending then counts as failed.
        try:
            self._close()
        except Exception as exc:
            log.warning("span_exporter_shutdown_failed", error=repr(exc))
        self._worker.join(WORKER_GRACE_S)
        with self._lock:
            self._finished = True
            left = self._queued_spans + self._in_flight
            self._queue.clear()
            self._queued_spans = self._in_flight = 0
            if left:
                self.counters.dropped.inc(left, reason="shutdown")
        if left:
            log.warning("spans_dropped_at_shutdown", spans=left, timeout_s=self.shutdown_timeout_s)

    def totals(self) -> SpanTotals:
        with self._lock:
            return self.counters.totals()

    def _work(self) -> None:
        while True:
            self._wake.wait(self.schedule_delay_s)
            self._wake.clear()
            # A full batch goes at once; a partial one when the delay passed (or at shutdown).
            while self._export_one_batch() is not None:
                with self._lock:
                    if self._stopping:
                        continue  # at shutdown: everything queued, until shutdown gives up
                    if self._queued_spans < self.max_batch_spans:
                        break
            with self._lock:
                if self._stopping and (not self._queue or self.cut.is_set()):
                    return

    def _export_one_batch(self) -> bool | None:
        """Send the oldest batch; None when nothing is queued, else whether it was accepted whole."""
        with self._export_lock:
            with self._lock:
                if not self._queue or self.cut.is_set():
                    return None
                batch = [self._queue.popleft()]
                count = self._spans(batch[0])
                while self._queue and count + self._spans(self._queue[0]) <= self.max_batch_spans:
                    item = self._queue.popleft()
                    batch.append(item)
                    count += self._spans(item)
                self._queued_spans -= count
                self._in_flight = count
                self._room.notify_all()
            try:
                sent = self._send(batch, count)
            except Exception as exc:  # a sender bug must not stop the thread: the batch failed
                log.warning("span_export_raised", spans=count, error=repr(exc))
                sent = Sent(0, count, repr(exc))
            exported = max(0, min(count, sent.exported))
            failed = count - exported
            with self._lock:
                if self._finished:
                    return False  # shutdown counted this batch as dropped already
                self._in_flight = 0
                self._healthy = exported > 0 or not failed
                self._room.notify_all()
                if exported:
                    self.counters.exported.inc(exported)
                if failed:
                    self.counters.failed.inc(failed)
            self._note(count, failed, sent.message)
            return not failed

    def _note(self, count: int, failed: int, message: str) -> None:
        """One warning when sends start failing and one when they recover, not one per batch
        (the counters carry the numbers); a partial refusal is logged each time."""
        if failed < count:
            if failed:
                log.warning("span_export_partially_rejected", spans=count, rejected=failed, message=message)
            if self._consecutive_failures:
                log.info("span_export_recovered", failed_batches=self._consecutive_failures)
            self._consecutive_failures = 0
            return
        if not self._consecutive_failures:
            log.warning("span_export_failing", spans=count, error=message)
        self._consecutive_failures += 1
