"""Sealed files shipped to S3, verified, and (optionally) deleted here afterwards.

Every file the recorder seals (continuous files and recordings) is queued; a task of the
recorder's event loop uploads the queue one file at a time in a worker thread (boto3 blocks), so
capture never waits on S3. Per file:

1. the local side: the file is hashed again and must still match its SHA256SUMS line (a sealed
   file that changed is never shipped, and is reported);
2. PUT with `ChecksumAlgorithm=SHA256` and the checksum itself, so S3 refuses a body that
   arrived different, with the Object Lock retention of `recorder.s3.object_lock` (mode and
   retain-until date), then the file's SHA256SUMS line as `<key>.sha256` beside it (so
   `sha256sum -c` works on what is downloaded);
3. the remote side: HEAD with checksum mode on must give back the same SHA-256 and retention
   (and with `verify_download`, the object is read back and hashed); steps 2 and 3 are
   trawl.s3.put_verified, shared with the alerter's evidence uploads;
4. only then the file is listed in UPLOADED (`<sha256>  <name>  s3://bucket/key  <version>`)
   and, with `delete_local_after_upload`, deleted here and dropped from SHA256SUMS.

A failed upload (S3 away, refused, a mismatch) is counted
(`trawl_recorder_s3_upload_failures_total` by reason), logged, and tried again after a backoff
doubling from `retry_initial_s` to `retry_max_s`; the file stays here meanwhile. At start every
sealed file listed in SHA256SUMS but not in UPLOADED is queued again, so a recorder restarted
(or killed) before an upload went through ships it then. A file gone before it could be shipped
(retention deleted it) is counted as `trawl_recorder_s3_not_uploaded_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.recorder.config import S3Settings
from trawl.recorder.writer import MANIFEST_NAME, UPLOADED_NAME, drop_from_manifest, uploaded_names
from trawl.s3 import UploadError, put_verified, retain_until, s3_client

log = get_logger(__name__)

_CHUNK = 1 << 20


@dataclass
class Shipped:
    """A verified upload."""

    sha256: str
    key: str
    version: str


@dataclass
class _Pending:
    path: Path
    attempts: int = 0
    next_at: float = 0.0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_sha256(path: Path) -> str | None:
    """The checksum SHA256SUMS beside the file records for it (the last line naming it)."""
    try:
        lines = (path.parent / MANIFEST_NAME).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    found = None
    for line in lines:
        checksum, _, name = line.partition("  ")
        if name == path.name:
            found = checksum
    return found


class Shipper:
    """The upload queue of one recorder: `add` sealed files, `run` ships them."""

    def __init__(
        self,
        settings: S3Settings,
        node: str,
        root: Path,
        metrics: Registry,
        client_factory: Callable[[S3Settings], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.node = node
        self.root = root
        self._client_factory = client_factory or s3_client
        self._client: Any = None
        self._queue: dict[Path, _Pending] = {}
        self._wake = asyncio.Event()
        self._uploaded = metrics.counter("trawl_recorder_s3_uploaded_total", "Sealed files uploaded to S3 and verified")
        self._uploaded_bytes = metrics.counter("trawl_recorder_s3_uploaded_bytes_total", "Bytes uploaded to S3")
        self._failures = metrics.counter(
            "trawl_recorder_s3_upload_failures_total", "Upload attempts that failed or did not verify (tried again)"
        )
        self._not_uploaded = metrics.counter(
            "trawl_recorder_s3_not_uploaded_total",
            "Sealed files never uploaded: deleted first, or changed since sealed",
        )
        self._deleted = metrics.counter(
            "trawl_recorder_s3_deleted_local_total", "Local files deleted after a verified upload"
        )
        self._pending = metrics.gauge("trawl_recorder_s3_pending", "Sealed files waiting for their upload")

    def key_for(self, path: Path) -> str:
        relative = path.relative_to(self.root).as_posix()
        return f"{self.settings.prefix}{self.node}/{relative}"

    def add(self, path: Path) -> None:
        """Queue a sealed file (from the event loop's thread)."""
        if path not in self._queue:
            self._queue[path] = _Pending(path)
            self._pending.set(len(self._queue))
            self._wake.set()

    def scan(self, directories: list[Path]) -> list[Path]:
        """Queue the sealed files of these directories not uploaded yet (after a restart)."""
        found = []
        for directory in directories:
            try:
                lines = (directory / MANIFEST_NAME).read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                continue
            done = set(uploaded_names(directory))
            for line in lines:
                name = line.partition("  ")[2]
                path = directory / name
                if name and name not in done and path.is_file():
                    found.append(path)
                    self.add(path)
        if found:
            log.info("s3_upload_resumed", files=len(found))
        return found

    @property
    def pending(self) -> list[Path]:
        return list(self._queue)

    async def run(self, stopping: asyncio.Event) -> None:
        """Ship the queue until `stopping` is set, and then the files not tried yet (those
        sealed at the stop); what is left stays queued for the next start."""
        while True:
            now = time.monotonic()
            due = [p for p in self._queue.values() if p.next_at <= now]
            if stopping.is_set():
                due = [p for p in due if p.attempts == 0]
                if not due:
                    return
            if not due:
                self._wake.clear()
                wait = min((p.next_at for p in self._queue.values()), default=now + 3600.0) - now
                with contextlib.suppress(TimeoutError):
                    stop = asyncio.ensure_future(stopping.wait())
                    wake = asyncio.ensure_future(self._wake.wait())
                    try:
                        await asyncio.wait({stop, wake}, timeout=max(0.01, wait), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        stop.cancel()
                        wake.cancel()
                continue
            pending = due[0]
            try:
                shipped = await asyncio.to_thread(self.ship, pending.path)
            except FileNotFoundError:
                self._forget(pending.path)
                self._not_uploaded.inc(reason="deleted")
                log.error("s3_upload_file_gone", file=str(pending.path))
                continue
            except UploadError as exc:
                if exc.reason == "local_checksum":
                    self._forget(pending.path)
                    self._not_uploaded.inc(reason="local_checksum")
                    log.error("s3_upload_refused", file=str(pending.path), error=str(exc))
                    continue
                self._retry(pending, exc.reason, str(exc))
                continue
            except Exception as exc:  # boto3/botocore errors, connection refused, timeouts
                self._retry(pending, type(exc).__name__, str(exc))
                continue
            self._done(pending.path, shipped)

    def _retry(self, pending: _Pending, reason: str, error: str) -> None:
        pending.attempts += 1
        delay = min(self.settings.retry_max_s, self.settings.retry_initial_s * 2 ** (pending.attempts - 1))
        delay *= random.uniform(0.8, 1.2)
        pending.next_at = time.monotonic() + delay
        self._failures.inc(reason=reason)
        log.warning(
            "s3_upload_failed",
            file=str(pending.path),
            attempt=pending.attempts,
            retry_in_s=round(delay, 2),
            error=error,
        )

    def _forget(self, path: Path) -> None:
        self._queue.pop(path, None)
        self._pending.set(len(self._queue))

    def _done(self, path: Path, shipped: Shipped) -> None:
        """Record the upload (and delete the local copy): in the event loop's thread, where the
        writer appends to SHA256SUMS, so the manifest is never rewritten under it."""
        self._forget(path)
        size = 0
        with contextlib.suppress(OSError):
            size = path.stat().st_size
        self._uploaded.inc()
        self._uploaded_bytes.inc(size)
        uploaded = path.parent / UPLOADED_NAME
        line = f"{shipped.sha256}  {path.name}  s3://{self.settings.bucket}/{shipped.key}  {shipped.version or '-'}\n"
        with open(uploaded, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        log.info("s3_uploaded", file=str(path), key=shipped.key, version=shipped.version, bytes=size)
        if self.settings.delete_local_after_upload:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            drop_from_manifest(path.parent / MANIFEST_NAME, {path.name})
            self._deleted.inc()

    def client(self) -> Any:
        if self._client is None:
            self._client = self._client_factory(self.settings)
        return self._client

    def ship(self, path: Path) -> Shipped:
        """Upload one sealed file and its checksum line, verified on both sides (worker thread)."""
        expected = manifest_sha256(path)
        if expected is None:
            raise UploadError("local_checksum", f"{path.name} is not in {MANIFEST_NAME}")
        actual = file_sha256(path)
        if actual != expected:
            raise UploadError("local_checksum", f"{path.name} has SHA-256 {actual}, sealed as {expected}")
        key = self.key_for(path)
        lock = self.settings.object_lock
        until = retain_until(lock.days) if lock else None
        client = self.client()
        with open(path, "rb") as body:
            version = put_verified(
                client,
                self.settings.bucket,
                key,
                body,
                actual,
                lock.mode if lock else None,
                until,
                content_type="application/x-pcapng" if path.suffix == ".pcapng" else "application/vnd.tcpdump.pcap",
            )
        if self.settings.verify_download:
            remote = hashlib.sha256()
            response = client.get_object(
                Bucket=self.settings.bucket, Key=key, **({"VersionId": version} if version else {})
            )
            for chunk in response["Body"].iter_chunks(_CHUNK):
                remote.update(chunk)
            if remote.hexdigest() != actual:
                raise UploadError("remote_checksum", f"{key} read back with SHA-256 {remote.hexdigest()}")
        line = f"{actual}  {path.name}\n".encode()
        put_verified(
            client,
            self.settings.bucket,
            key + ".sha256",
            line,
            hashlib.sha256(line).hexdigest(),
            lock.mode if lock else None,
            until,
            content_type="text/plain",
        )
        return Shipped(actual, key, version)
