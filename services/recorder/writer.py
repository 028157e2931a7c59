"""Rotating classic-pcap files, sealed and immutable once closed, with a checksum manifest.

A `PacketBatch` already carries classic pcap records, so a file is a pcap global header
(the batch's link type, snaplen and timestamp resolution) followed by the batches' `records`
bytes, untouched. One file is open per (node, link type, timestamp resolution): a pcap file
has a single link type, and mixing microsecond and nanosecond records would corrupt times.

A file is written as `<name>.pcap.partial`; sealing it fsyncs it, renames it atomically to
`<name>.pcap`, makes it read-only and appends `<sha256>  <name>.pcap` to `SHA256SUMS` in the
same directory (`sha256sum -c SHA256SUMS` verifies the directory). A reader that lists `*.pcap`
therefore only ever sees complete files. Retention deletes sealed files, oldest first, and
never a partial one; partial files left by a crash are truncated to their last complete
record and sealed by `recover()` at start.

Resuming exactly: after each batch is appended (and before any seal that batch causes), the
writer replaces `CHECKPOINT` in the directory (write, then atomic rename) with the caller's
`mark` (where the batch came from: the service keeps the stream sequence there) and the size of
every open file. A process killed at any point leaves data that is either covered by the last
checkpoint or not: `recover()` cuts each partial file back to the size the checkpoint names
(deleting partial files it does not name), so the batches after the mark are written once,
when the service reads them again from the stream. The page cache survives a killed process;
the files and the checkpoint are fsynced when sealed and every `sync()` (a host crash loses at
most that interval, and the cut keeps files and checkpoint consistent).

File names continue the sequence of the files already in the directory, so a restart never
starts again at `-000001`.

The writer does blocking file IO but no networking: the service feeds it batches and a clock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from trawl.logs import get_logger
from trawl.metrics import Registry
from trawl.pcap import GLOBAL_HEADER, MAGIC_NS, MAGIC_US, RECORD_HEADER, global_header
from trawl.v1 import packets_pb2

log = get_logger(__name__)

SEALED_SUFFIX = ".pcap"
PARTIAL_SUFFIX = ".pcap.partial"
MANIFEST_NAME = "SHA256SUMS"
CHECKPOINT_NAME = "CHECKPOINT"
UPLOADED_NAME = "UPLOADED"
DEFAULT_SNAPLEN = 262144
# What the writer names its files; retention only ever touches files with this shape.
SEALED_NAME = re.compile(r"^[A-Za-z0-9_.-]+-\d{8}T\d{6}Z-\d{6,}\.pcap$")
FILE_SEQUENCE = re.compile(r"-\d{8}T\d{6}Z-(\d{6,})(?:-\d+)?\.pcap(?:\.partial)?$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileKey:
    """Batches with the same key go to the same file."""

    node: str
    link_type: int
    nanosecond: bool


@dataclass
class OpenFile:
    key: FileKey
    partial: Path
    final: Path
    handle: BinaryIO
    snaplen: int
    opened_at: float
    size: int = 0
    packets: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)


def count_records(payload: bytes) -> int:
    """Number of complete records in a batch payload; ValueError when one runs past the end."""
    offset = 0
    count = 0
    end = len(payload)
    unpack = RECORD_HEADER.unpack_from
    while offset < end:
        if offset + RECORD_HEADER.size > end:
            raise ValueError(f"truncated pcap record header at offset {offset}")
        _, _, incl_len, _ = unpack(payload, offset)
        offset += RECORD_HEADER.size + incl_len
        if offset > end:
            raise ValueError(f"pcap record claims {incl_len} bytes past the end of the batch")
        count += 1
    return count


def safe_node_name(node: str) -> str:
    """A node name usable as a file name prefix (no slashes, no leading dot)."""
    return _UNSAFE_NAME.sub("_", node).lstrip(".") or "_"


class PcapWriter:
    """Writes PacketBatch records into rotating, sealed pcap files in one directory."""

    def __init__(
        self,
        directory: Path,
        *,
        rotate_bytes: int,
        rotate_seconds: float,
        max_age_s: float | None = None,
        max_total_bytes: int | None = None,
        metrics: Registry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.max_age_s = max_age_s
        self.max_total_bytes = max_total_bytes
        self.clock = clock
        self.manifest = directory / MANIFEST_NAME
        self.packets_written = 0
        self.sealed: list[Path] = []
        self._open: dict[FileKey, OpenFile] = {}
        # Files shipped to S3 and deleted here count too (UPLOADED lists them).
        names = [p.name for p in directory.glob("*.pcap*")] + uploaded_names(directory)
        self._sequence = max((int(m.group(1)) for name in names if (m := FILE_SEQUENCE.search(name))), default=0)
        # Called with each file sealed (the S3 shipper takes them).
        self.on_sealed: list[Callable[[Path], None]] = []
        self.checkpoint_path = directory / CHECKPOINT_NAME
        self.mark: dict[str, Any] | None = None  # the caller's mark of the last checkpoint (read by recover())
        metrics = metrics or Registry()
        self._packets = metrics.counter("trawl_recorder_packets_total", "Packets written to pcap files")
        self._bytes = metrics.counter("trawl_recorder_bytes_total", "Bytes written to pcap files")
        self._files = metrics.counter("trawl_recorder_files_sealed_total", "Pcap files sealed")
        self._deleted = metrics.counter("trawl_recorder_files_deleted_total", "Sealed files deleted by retention")
        self._bad = metrics.counter("trawl_recorder_bad_batches_total", "Batches not written: malformed records")
        self._errors = metrics.counter("trawl_recorder_write_errors_total", "File system errors while recording")

    @property
    def open_files(self) -> list[Path]:
        return [f.partial for f in self._open.values()]

    def write(self, batch: packets_pb2.PacketBatch, mark: dict[str, Any] | None = None) -> list[Path]:
        """Append the batch's records, then checkpoint `mark` (when given); returns the files
        sealed by rotation meanwhile."""
        try:
            packets = count_records(batch.records)
        except ValueError as exc:
            self._bad.inc(node=batch.node)
            log.warning(
                "recorder_bad_batch", node=batch.node, shard=batch.shard, sequence=batch.sequence, error=str(exc)
            )
            if mark is not None:
                self.checkpoint(mark)
            return []
        if packets == 0:
            if mark is not None:
                self.checkpoint(mark)
            return []
        key = FileKey(batch.node, batch.link_type, batch.nanosecond)
        snaplen = batch.snaplen or DEFAULT_SNAPLEN
        sealed: list[Path] = []
        current = self._open.get(key)
        if current is not None and (
            snaplen > current.snaplen
            or current.size + len(batch.records) > self.rotate_bytes
            or self.clock() - current.opened_at >= self.rotate_seconds
        ):
            sealed.extend(self._seal(current))
            current = None
        try:
            if current is None:
                current = self._start(key, snaplen)
            current.write(batch.records)
        except OSError as exc:
            self._fail(key, exc)
            return sealed
        current.packets += packets
        self.packets_written += packets
        self._packets.inc(packets, link_type=str(key.link_type))
        self._bytes.inc(len(batch.records))
        if mark is not None:
            self.checkpoint(mark)
        if current.size >= self.rotate_bytes:
            sealed.extend(self._seal(current))
        if sealed:
            self.apply_retention()
        return sealed

    def checkpoint(self, mark: dict[str, Any]) -> None:
        """Record that everything up to `mark` is in the open files, at their current sizes."""
        for current in self._open.values():
            current.handle.flush()
        self.mark = mark
        document = {"mark": mark, "files": {f.partial.name: f.size for f in self._open.values()}}
        staging = self.checkpoint_path.with_name(CHECKPOINT_NAME + ".tmp")
        staging.write_text(json.dumps(document, sort_keys=True), encoding="utf-8")
        os.replace(staging, self.checkpoint_path)

    def sync(self) -> None:
        """fsync the open files, then the checkpoint (a host crash loses at most one interval)."""
        for current in self._open.values():
            with contextlib.suppress(OSError):
                current.handle.flush()
                os.fsync(current.handle.fileno())
        if self.checkpoint_path.exists():
            with open(self.checkpoint_path, "rb") as handle:
                os.fsync(handle.fileno())
            self._fsync_directory()

    def _read_checkpoint(self) -> tuple[dict[str, Any] | None, dict[str, int] | None]:
        """(mark, partial file name -> size) of the last checkpoint; (None, None) without one."""
        try:
            document = json.loads(self.checkpoint_path.read_text(encoding="utf-8"))
            return dict(document["mark"]), {str(k): int(v) for k, v in dict(document["files"]).items()}
        except FileNotFoundError:
            return None, None
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            log.warning("recorder_checkpoint_unreadable", file=str(self.checkpoint_path), error=str(exc))
            return None, None

    def rotate_due(self) -> list[Path]:
        """Seal the files that have been open for rotate_seconds or longer."""
        now = self.clock()
        sealed: list[Path] = []
        for current in list(self._open.values()):
            if now - current.opened_at >= self.rotate_seconds:
                sealed.extend(self._seal(current))
        if sealed:
            self.apply_retention()
        return sealed

    def seal_all(self) -> list[Path]:
        """Seal every open file (end of input, shutdown)."""
        sealed: list[Path] = []
        for current in list(self._open.values()):
            sealed.extend(self._seal(current))
        if sealed:
            self.apply_retention()
        return sealed

    def recover(self) -> list[Path]:
        """Seal the partial files a previous run left behind: cut back to the size the last
        checkpoint names (a partial file it does not name holds only batches after it, and is
        deleted), or without a checkpoint after their last complete record. `mark` is then the
        last checkpoint's mark: where the caller resumes."""
        sealed: list[Path] = []
        mine = {f.partial for f in self._open.values()}
        self.mark, sizes = self._read_checkpoint()
        for partial in sorted(self.directory.glob("*" + PARTIAL_SUFFIX)):
            if partial in mine or not partial.is_file():
                continue
            try:
                if sizes is not None and partial.name not in sizes:
                    partial.unlink()
                    log.info("recording_discarded_after_checkpoint", file=str(partial))
                    continue
                path = self._recover_one(partial, sizes.get(partial.name) if sizes is not None else None)
            except OSError as exc:
                self._errors.inc()
                log.error("recorder_recover_failed", file=str(partial), error=str(exc))
                continue
            if path is not None:
                sealed.append(path)
        if sealed:
            self.apply_retention()
        return sealed

    def apply_retention(self) -> list[Path]:
        """Delete sealed files, oldest first, beyond max_age_s or max_total_bytes; returns them."""
        if self.max_age_s is None and self.max_total_bytes is None:
            return []
        deleted, errors = delete_oldest(
            self.directory,
            SEALED_NAME,
            max_age_s=self.max_age_s,
            max_total_bytes=self.max_total_bytes,
            now=self.clock(),
            open_bytes=sum(f.size for f in self._open.values()),
        )
        if errors:
            self._errors.inc(errors)
        if deleted:
            self._deleted.inc(len(deleted))
        return deleted

    def _start(self, key: FileKey, snaplen: int) -> OpenFile:
        self.directory.mkdir(parents=True, exist_ok=True)
        now = self.clock()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        while True:
            self._sequence += 1
            stem = f"{safe_node_name(key.node)}-{stamp}-{self._sequence:06d}"
            final = self.directory / (stem + SEALED_SUFFIX)
            partial = self.directory / (stem + PARTIAL_SUFFIX)
            if final.exists():
                continue
            try:
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            break
        current = OpenFile(key, partial, final, os.fdopen(fd, "wb"), snaplen, now)
        current.write(global_header(key.link_type, snaplen, key.nanosecond))
        self._open[key] = current
        log.info("recording_started", file=str(partial), node=key.node, link_type=key.link_type)
        return current

    def _seal(self, current: OpenFile) -> list[Path]:
        del self._open[current.key]
        try:
            current.handle.flush()
            os.fsync(current.handle.fileno())
            current.handle.close()
            final = self._publish(current.partial, current.final, current.digest.hexdigest())
        except OSError as exc:
            self._errors.inc()
            log.error("recorder_seal_failed", file=str(current.partial), error=str(exc))
            with contextlib.suppress(OSError):
                current.handle.close()
            return []
        self._files.inc()
        log.info("recording_sealed", file=str(final), bytes=current.size, packets=current.packets)
        return [final]

    def _publish(self, partial: Path, final: Path, sha256: str) -> Path:
        """Rename without clobbering, make read-only, record the checksum, persist the directory."""
        if final.exists():
            final = final.with_name(final.name.removesuffix(SEALED_SUFFIX) + f"-{os.getpid()}{SEALED_SUFFIX}")
        final = publish_sealed(partial, final, sha256, self.manifest)
        self.sealed.append(final)
        for callback in self.on_sealed:
            callback(final)
        return final

    def _recover_one(self, partial: Path, checkpointed_size: int | None) -> Path | None:
        with open(partial, "r+b") as handle:
            header = handle.read(GLOBAL_HEADER.size)
            if len(header) < GLOBAL_HEADER.size or GLOBAL_HEADER.unpack(header)[0] not in (MAGIC_US, MAGIC_NS):
                log.warning("recorder_partial_unusable", file=str(partial), reason="no pcap global header")
                return None
            end = os.fstat(handle.fileno()).st_size
            if checkpointed_size is not None:
                end = min(end, checkpointed_size)
            good = GLOBAL_HEADER.size
            while good + RECORD_HEADER.size <= end:
                handle.seek(good)
                _, _, incl_len, _ = RECORD_HEADER.unpack(handle.read(RECORD_HEADER.size))
                if good + RECORD_HEADER.size + incl_len > end:
                    break
                good += RECORD_HEADER.size + incl_len
            handle.truncate(good)
            handle.flush()
            os.fsync(handle.fileno())
            handle.seek(0)
            digest = hashlib.sha256()
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        final = partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX) + SEALED_SUFFIX)
        final = self._publish(partial, final, digest.hexdigest())
        self._files.inc()
        log.warning("recording_recovered", file=str(final), bytes=good, dropped_bytes=end - good)
        return final

    def _fsync_directory(self) -> None:
        _fsync_directory(self.directory)

    def _fail(self, key: FileKey, exc: OSError) -> None:
        """A file that cannot be written is closed and left partial (recover() seals it later)."""
        self._errors.inc()
        current = self._open.pop(key, None)
        log.error("recorder_write_failed", file=str(current.partial) if current else None, error=str(exc))
        if current is not None:
            with contextlib.suppress(OSError):
                current.handle.close()


def publish_sealed(partial: Path, final: Path, sha256: str, manifest: Path) -> Path:
    """Rename a written (and fsynced) file to its final name, make it read-only, append its
    checksum to `manifest` and persist the directory: a reader sees it whole or not at all."""
    os.rename(partial, final)
    os.chmod(final, 0o444)
    with open(manifest, "a", encoding="utf-8") as handle:
        handle.write(f"{sha256}  {final.name}\n")
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_directory(final.parent)
    return final


def delete_oldest(
    directory: Path,
    sealed_name: re.Pattern[str],
    *,
    max_age_s: float | None,
    max_total_bytes: int | None,
    now: float,
    open_bytes: int = 0,
) -> tuple[list[Path], int]:
    """Delete the sealed files of `directory` whose names match, oldest first, older than
    max_age_s or while all of them (and `open_bytes` being written) exceed max_total_bytes, and
    drop them from its SHA256SUMS; (deleted files, files that could not be deleted)."""
    candidates: list[tuple[float, str, Path, int]] = []
    for path in directory.iterdir():
        if not sealed_name.match(path.name):
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        candidates.append((stat.st_mtime, path.name, path, stat.st_size))
    candidates.sort()
    total = sum(size for *_, size in candidates) + open_bytes
    deleted: list[Path] = []
    errors = 0
    for mtime, _, path, size in candidates:
        too_old = max_age_s is not None and now - mtime > max_age_s
        too_big = max_total_bytes is not None and total > max_total_bytes
        if not (too_old or too_big):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors += 1
            log.error("recorder_retention_failed", file=str(path), error=str(exc))
            continue
        total -= size
        deleted.append(path)
        log.info("recording_deleted", file=str(path), bytes=size, reason="age" if too_old else "size")
    if deleted:
        drop_from_manifest(directory / MANIFEST_NAME, {p.name for p in deleted})
    return deleted, errors


def uploaded_names(directory: Path) -> list[str]:
    """The files of `directory` its UPLOADED list names (shipped to S3; see upload.py)."""
    try:
        lines = (directory / UPLOADED_NAME).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [fields[1] for line in lines if len(fields := line.split("  ")) >= 2]


def drop_from_manifest(manifest: Path, names: set[str]) -> None:
    """Rewrite a SHA256SUMS without the lines of these files (call from the thread that seals)."""
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = [line for line in lines if line.rstrip("\n").partition("  ")[2] not in names]
    staging = manifest.with_name(MANIFEST_NAME + ".tmp")
    with open(staging, "w", encoding="utf-8") as handle:
        handle.writelines(kept)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, manifest)
    _fsync_directory(manifest.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
