"""Bounded mutation fuzz of `trawl analyze --json` over every committed capture.

Each mutant is a committed capture (tests/fixtures/*.pcap, tests/fixtures/hard/*,
tests/fixtures/{http2,redis,amqp,kafka}/*.pcap and ../shared/pcaps/**/*.pcap* when present)
changed by one to three operations: byte flips anywhere, byte flips and boundary values inside
one packet, truncation, a record length (pcap `incl_len`/`orig_len`, pcapng block and captured
lengths) set to a boundary value, and records spliced in from another capture, duplicated,
dropped or swapped. Mutant `i` of seed `s` is a function of `(s, i)` alone, so any one can be
rebuilt (`--seed s --index i`) whatever the budget, job count or order was.

Every run must end with exit code 0, or 2 and one `trawl analyze: ...` line last on stderr;
besides that line stderr may hold warning-level log events (a stream that cannot be parsed is
reported that way) and nothing else: no traceback, no error-level event. stdout must be NDJSON,
one JSON object a line. A crash, a hang or a sanitizer report fails the run too.

Mutants run in-process (`trawl.cli.main`, SystemExit caught), many per worker process, so a
three-minute budget buys thousands of them; a worker that dies (a sanitizer aborts the whole
process, as it must) is reported by the supervisor with the mutant it was running, saved
under the output directory. In the Makefile's `sanitize` stage the workers import the ASan +
UBSan build of the C extensions (tests/sanitize/asan.py) and check that they did; `--plain`
fuzzes the ordinary build. This lives beside the sanitizer build under tests/ rather than in
bench/ because it is a pass/fail check that `make test` runs, not a figure against a peer.

Budget: `--seconds` (default `TRAWL_FUZZ_SECONDS`, else 180) and optionally `--mutants`
(default `TRAWL_FUZZ_MUTANTS`, else unbounded): whichever is reached first.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_OUT = ROOT / "build" / "asan" / "fuzz"
DEFAULT_SECONDS = 180.0
# A worker still running this long after the budget is stuck in one mutant.
HANG_GRACE_S = 120.0
# A worker stops after this many contract failures (a crash stops it at once).
MAX_FAILURES = 10
# Packets per batch, drawn per mutant. ASan sees a read past the end of an allocation, and a
# batch's records are one bytes object: with one packet a batch, a read past any packet's end
# is caught, not only past the batch's last packet. None keeps analyze's own batch size.
BATCH_PACKETS = (1, 1, 4, None)

PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": "<",
    b"\x4d\x3c\xb2\xa1": "<",
    b"\xa1\xb2\xc3\xd4": ">",
    b"\xa1\xb2\x3c\x4d": ">",
}
PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
PCAPNG_EPB = 6
PCAP_HEADER = 24
PCAP_RECORD_HEADER = 16
PCAPNG_EPB_HEADER = 28

# Values that sit on the edges of the length checks in the readers and parsers.
LENGTH_VALUES = (0, 1, 2, 15, 16, 17, 65535, 65536, 262144, 262145, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
BYTE_VALUES = (0x00, 0x01, 0x7F, 0x80, 0xFF)
WORD_VALUES = (0x0000, 0x0001, 0x7FFF, 0x8000, 0xFFFF)


def committed_captures(root: Path = ROOT) -> list[Path]:
    """The captures to mutate, in a fixed order (the mutant numbering depends on it)."""
    found = sorted((root / "tests" / "fixtures").glob("*.pcap"))
    found += sorted(path for path in (root / "tests" / "fixtures" / "hard").iterdir() if path.is_file())
    for protocol in ("http2", "redis", "amqp", "kafka"):  # the protocols recorded into their own folders
        found += sorted((root / "tests" / "fixtures" / protocol).glob("*.pcap"))
    shared = root.parent / "shared" / "pcaps"
    if shared.is_dir():
        found += sorted(path for path in shared.rglob("*.pcap*") if path.is_file())
    return found


@dataclass
class Capture:
    """A capture cut at its record boundaries: `head` (the pcap file header; empty for pcapng,
    whose section header is a block like the others), whole records, then whatever trails."""

    format: str
    order: str
    head: bytes
    records: list[bytes]
    tail: bytes

    def join(self) -> bytes:
        return self.head + b"".join(self.records) + self.tail

    def data_offset(self, record: bytes) -> int:
        """Where the packet bytes start in `record` (after the record or block header)."""
        if self.format == "pcap":
            return PCAP_RECORD_HEADER
        block_type = struct.unpack_from(self.order + "I", record)[0] if len(record) >= 4 else 0
        return PCAPNG_EPB_HEADER if block_type == PCAPNG_EPB else 8


def split_capture(data: bytes) -> Capture:
    """Cut `data` at its records; bytes that do not frame as records end up in `tail`."""
    if data[:4] in PCAP_MAGICS:
        order = PCAP_MAGICS[data[:4]]
        records: list[bytes] = []
        offset = PCAP_HEADER
        while len(data) - offset >= PCAP_RECORD_HEADER:
            incl = struct.unpack_from(order + "I", data, offset + 8)[0]
            end = offset + PCAP_RECORD_HEADER + incl
            if end > len(data):
                break
            records.append(data[offset:end])
            offset = end
        return Capture("pcap", order, data[:PCAP_HEADER], records, data[offset:])
    if data[:4] == PCAPNG_SHB and len(data) >= 12:
        order = "<" if data[8:12] == b"\x4d\x3c\x2b\x1a" else ">"
        blocks: list[bytes] = []
        offset = 0
        while len(data) - offset >= 12:
            length = struct.unpack_from(order + "I", data, offset + 4)[0]
            if length < 12 or offset + length > len(data):
                break
            blocks.append(data[offset : offset + length])
            offset += length
        return Capture("pcapng", order, b"", blocks, data[offset:])
    return Capture("raw", "<", b"", [], data)


Mutation = Callable[[random.Random, Capture, Sequence[bytes]], str]


def _pick_record(rng: random.Random, capture: Capture) -> int | None:
    return rng.randrange(len(capture.records)) if capture.records else None


def _reframe(capture: Capture, data: bytes) -> None:
    """Replace `capture` by `data` cut anew, so later operations still find records where the
    bytes still frame as records (and work on raw bytes where they no longer do)."""
    fresh = split_capture(data)
    capture.format, capture.order, capture.head, capture.records, capture.tail = (
        fresh.format,
        fresh.order,
        fresh.head,
        fresh.records,
        fresh.tail,
    )


def flip_bytes_anywhere(rng: random.Random, capture: Capture, others: Sequence[bytes]) -> str:
    data = bytearray(capture.join())
    if not data:
        return "flip: empty"
    count = rng.choice((1, 2, 4, 8, 16))
    for _ in range(count):
        data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    _reframe(capture, bytes(data))
    return f"flip {count} bytes anywhere"


def flip_packet_bytes(rng: random.Random, capture: Capture, others: Sequence[bytes]) -> str:
    index = _pick_record(rng, capture)
    if index is None:
        return "packet flip: no records"
    record = bytearray(capture.records[index])
    start = min(capture.data_offset(bytes(record)), len(record))
    if start >= len(record):
        return f"packet flip: record {index} has no data"
    count = rng.choice((1, 2, 3, 8))
    for _ in range(count):
        position = rng.randrange(start, len(record))
        if rng.random() < 0.5:
            record[position] ^= 1 << rng.randrange(8)
        else:
            record[position] = rng.choice(BYTE_VALUES)
    capture.records[index] = bytes(record)
    return f"flip {count} bytes in record {index}"


def boundary_word_in_packet(rng: random.Random, capture: Capture, others: Sequence[bytes]) -> str:
    """A 16-bit boundary value over a packet field (IP total length, ports, DNS counts...)."""
    index = _pick_record(rng, capture)
    if index is None:
        return "packet word: no records"
    record = bytearray(capture.records[index])
    start = capture.data_offset(bytes(record))
    if len(record) - start < 2:
        return f"packet word: record {index} too short"
    position = rng.randrange(start, len(record) - 1)
    value = rng.choice(WORD_VALUES)
    record[position : position + 2] = value.to_bytes(2, "big")
    capture.records[index] = bytes(record)
    return f"word 0x{value:04x} at byte {position} of record {index}"


def insert_or_delete_in_packet(rng: random.Random, capture: Capture, others: Sequence[bytes]) -> str:
    """Grow or shrink one packet's bytes and fix the record length to match, so the reader
    accepts it and the mismatch with the IP/TCP/HTTP lengths inside reaches the dissector."""
    index = _pick_record(rng, capture)
    if index is None or capture.format != "pcap":
        return "packet resize: no pcap records"
    record = bytearray(capture.records[index])
    position = rng.randrange(PCAP_RECORD_HEADER, len(record) + 1)
    if rng.random() < 0.5 and position < len(record):
        cut = rng.randrange(1, min(64, len(record) - position) + 1)
        del record[position : position + cut]
        what = f"delete {cut} bytes"
    else:
        chunk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        record[position:position] = chunk
        what = f"insert {len(chunk)} bytes"
    struct.pack_into(capture.order + "I", record, 8, len(record) - PCAP_RECORD_HEADER)
    capture.records[index] = bytes(record)
    return f"{what} at byte {position} of record {index}"


def truncate(rng: random.Random, capture: Capture, others: Sequence[bytes]) -> str:
    data = capture.join()
    cut = rng.randrange(len(data) + 1) if rng.random() < 0.5 else max(0, len(data) - rng.randrange(1, 64))
    _reframe(capture, data[:cut])
    return f"truncate to {cut} of {len(data)} bytes"


def corrupt_record_length(rng: random.Random, capture: Capture, others: Sequence[bytes]) -> str:
    index = _pick_record(rng, capture)
    if index is None:
        return "length: no records"
    record = bytearray(capture.records[index])
    current = len(record) - capture.data_offset(bytes(record))
    value = rng.choice((*LENGTH_VALUES, max(0, current - 1), current + 1, rng.randrange(1 << 32)))
    if capture.format == "pcap":
        where = rng.choice((8, 12))  # incl_len, orig_len
        name = "incl_len" if where == 8 else "orig_len"
    else:
        block_type = struct.unpack_from(capture.order + "I", record)[0]
        choices = [(4, "block length"), (len(record) - 4, "trailing block length")]
        if block_type == PCAPNG_EPB and len(record) >= PCAPNG_EPB_HEADER:
            choices += [(20, "captured length"), (24, "original length")]
        where, name = rng.choice(choices)
    struct.pack_into(capture.order + "I", record, where, value & 0xFFFFFFFF)
    capture.records[index] = bytes(record)
    return f"{name} of record {index} = {value & 0xFFFFFFFF}"


def splice_records(rng: random.Random, capture: Capture, others: Sequence[bytes]) -> str:
    """Records from another capture (another link type, perhaps another format), or this
    capture's own records duplicated, dropped or swapped."""
    records = capture.records
    choice = rng.randrange(4)
    if choice == 0 and others:
        donor = split_capture(rng.choice(others))
        # A pcap record has no place in a pcapng file and back; mixing them is the byte flips' job.
        if donor.records and donor.format == capture.format:
            start = rng.randrange(len(donor.records))
            taken = donor.records[start : start + rng.randrange(1, 8)]
            at = rng.randrange(len(records) + 1)
            records[at:at] = taken
            return f"splice {len(taken)} records of another capture at {at}"
    if not records:
        return "splice: no records"
    first = rng.randrange(len(records))
    if choice == 1:
        records.insert(rng.randrange(len(records) + 1), records[first])
        return f"duplicate record {first}"
    if choice == 2 and len(records) > 1:
        del records[first]
        return f"drop record {first}"
    second = rng.randrange(len(records))
    records[first], records[second] = records[second], records[first]
    return f"swap records {first} and {second}"


# Weighted towards changes that keep the framing, so most mutants reach the dissector.
MUTATIONS: tuple[tuple[Mutation, int], ...] = (
    (flip_packet_bytes, 5),
    (boundary_word_in_packet, 3),
    (insert_or_delete_in_packet, 3),
    (splice_records, 3),
    (corrupt_record_length, 2),
    (flip_bytes_anywhere, 1),
    (truncate, 1),
)


@dataclass
class Mutant:
    seed: int
    index: int
    base: str
    operations: list[str]
    batch_packets: int | None
    data: bytes = field(repr=False)

    def described(self) -> dict[str, object]:
        """Everything but the bytes, for JSON."""
        return {key: value for key, value in asdict(self).items() if key != "data"}


def make_mutant(seed: int, index: int, captures: Sequence[Path], contents: Sequence[bytes]) -> Mutant:
    """Mutant `index` of `seed`: the capture is chosen round-robin so every one is mutated."""
    rng = random.Random(f"{seed}:{index}")
    which = index % len(captures)
    capture = split_capture(contents[which])
    others = [content for position, content in enumerate(contents) if position != which]
    functions = [function for function, _ in MUTATIONS]
    weights = [weight for _, weight in MUTATIONS]
    operations = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        operations.append(rng.choices(functions, weights)[0](rng, capture, others))
    batch_packets = rng.choice(BATCH_PACKETS)
    base = str(captures[which].relative_to(ROOT.parent))
    return Mutant(seed, index, base, operations, batch_packets, capture.join())


@dataclass
class Verdict:
    """What one run of `trawl analyze --json` did, and what was wrong with it (empty: nothing)."""

    exit_code: int | str | None
    problems: list[str]


def judge(exit_code: int | str | None, stdout: bytes, stderr: str, escaped: str | None) -> Verdict:
    """Hold one run to the contract in the module docstring."""
    problems: list[str] = []
    if escaped is not None:
        problems.append(f"exception escaped the CLI:\n{escaped}")
    if exit_code not in (0, 2):
        problems.append(f"exit code {exit_code!r}, expected 0 or 2")
    lines = stderr.splitlines()
    if exit_code == 2:
        if not lines or not lines[-1].startswith("trawl analyze: "):
            problems.append("exit 2 without a `trawl analyze: ...` line last on stderr")
        lines = lines[:-1]
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            problems.append(f"stderr line that is not a log event: {line[:300]!r}")
            continue
        if not isinstance(event, dict) or event.get("level") != "warning" or "exception" in event:
            problems.append(f"stderr event above warning, or with a traceback: {line[:300]}")
    if stdout and not stdout.endswith(b"\n"):
        problems.append("stdout does not end with a newline")
    for number, output_line in enumerate(stdout.splitlines(), 1):
        try:
            call = json.loads(output_line)
        except ValueError as exc:
            problems.append(f"stdout line {number} is not JSON ({exc}): {output_line[:300]!r}")
            break
        if not isinstance(call, dict):
            problems.append(f"stdout line {number} is not a JSON object: {output_line[:300]!r}")
            break
    return Verdict(exit_code, problems)


class InProcessAnalyzer:
    """Runs `trawl analyze FILE --json` in this process, capturing what it writes. One stderr
    buffer serves every run: logging's handler keeps the stream it was first given."""

    def __init__(self) -> None:
        self.stderr = io.StringIO()

    def run(self, path: Path, batch_packets: int | None = None) -> Verdict:
        from trawl import analyze
        from trawl.cli import main as trawl_main

        default_batch_packets = analyze.BATCH_MAX_PACKETS
        if batch_packets is not None:
            # Read at call time by analyze(); only the batching changes, not what is computed.
            analyze.BATCH_MAX_PACKETS = batch_packets

        self.stderr.seek(0)
        self.stderr.truncate()
        stdout_bytes = io.BytesIO()
        stdout = io.TextIOWrapper(stdout_bytes, encoding="utf-8", write_through=True)
        escaped: str | None = None
        exit_code: int | str | None
        saved = sys.stdout, sys.stderr
        # analyze configures logging to the stderr it finds: put the caller's back afterwards,
        # or every later log event of this process would go into this buffer.
        saved_structlog, saved_handlers = structlog.get_config(), list(logging.getLogger().handlers)
        sys.stdout, sys.stderr = stdout, self.stderr
        try:
            exit_code = trawl_main(["analyze", str(path), "--json"])
        except SystemExit as exc:
            exit_code = exc.code
        except Exception:  # whatever escapes is the finding
            exit_code = None
            escaped = traceback.format_exc()
        finally:
            stdout.flush()
            sys.stdout, sys.stderr = saved
            structlog.configure(**saved_structlog)
            logging.getLogger().handlers[:] = saved_handlers
            analyze.BATCH_MAX_PACKETS = default_batch_packets
            # analyze freezes the heap into the permanent generation on every run: give it back.
            gc.unfreeze()
        return judge(exit_code, stdout_bytes.getvalue(), self.stderr.getvalue(), escaped)


@dataclass
class WorkerReport:
    worker: int
    mutants: int = 0
    exit_codes: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, object]] = field(default_factory=list)
    extension_files: dict[str, str] = field(default_factory=dict)


def _write_current(out: Path, worker: int, mutant: Mutant) -> Path:
    """The mutant about to run, on disk: it is the input, and what is left if the process dies."""
    path = out / f"worker-{worker}.pcap"
    path.write_bytes(mutant.data)
    (out / f"worker-{worker}.json").write_text(json.dumps(mutant.described()))
    return path


def worker_indices(worker: int, jobs: int, limit: int | None) -> Iterator[int]:
    index = worker
    while limit is None or index < limit:
        yield index
        index += jobs


def run_worker(
    worker: int, jobs: int, seed: int, deadline: float, limit: int | None, out: Path, sanitized: bool
) -> WorkerReport:
    report = WorkerReport(worker)
    if sanitized:
        from tests.sanitize.asan import install, verify

        install()
        report.extension_files = verify()
    captures = committed_captures()
    contents = [path.read_bytes() for path in captures]
    analyzer = InProcessAnalyzer()
    for index in worker_indices(worker, jobs, limit):
        if time.monotonic() >= deadline:
            break
        mutant = make_mutant(seed, index, captures, contents)
        path = _write_current(out, worker, mutant)
        verdict = analyzer.run(path, mutant.batch_packets)
        report.mutants += 1
        key = str(verdict.exit_code)
        report.exit_codes[key] = report.exit_codes.get(key, 0) + 1
        if verdict.problems:
            saved = out / f"failure-{seed}-{index}.pcap"
            shutil.copyfile(path, saved)
            report.failures.append({**mutant.described(), "saved": str(saved), "problems": verdict.problems})
            if len(report.failures) >= MAX_FAILURES:
                break
    return report


def supervise(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    captures = committed_captures()
    if not captures:
        sys.stderr.write("fuzz_analyze: no committed captures found\n")
        return 1
    if not args.plain and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        sys.stderr.write("fuzz_analyze: the sanitized run needs LD_PRELOAD=$(gcc -print-file-name=libasan.so)\n")
        return 1
    started = time.monotonic()
    workers = []
    for worker in range(args.jobs):
        command = [sys.executable, "-m", "tests.sanitize.fuzz_analyze", "--worker", str(worker)]
        command += ["--jobs", str(args.jobs), "--seed", str(args.seed), "--seconds", str(args.seconds)]
        command += ["--out", str(out)]
        if args.mutants is not None:
            command += ["--mutants", str(args.mutants)]
        if args.plain:
            command.append("--plain")
        # stderr is inherited: a sanitizer report goes straight to the log.
        workers.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True))
    total = 0
    codes: dict[str, int] = {}
    failed = False
    for worker, process in enumerate(workers):
        remaining = args.seconds + HANG_GRACE_S - (time.monotonic() - started)
        try:
            output, _ = process.communicate(timeout=max(remaining, 1.0))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            failed = True
            _report_dead_worker(out, worker, f"still running {HANG_GRACE_S:.0f} s after the budget: a hang")
            continue
        if process.returncode != 0 or not output.strip():
            failed = True
            status = process.returncode
            _report_dead_worker(out, worker, f"died with exit status {status} (a crash or a sanitizer report)")
            continue
        report = json.loads(output.strip().splitlines()[-1])
        total += report["mutants"]
        for code, count in report["exit_codes"].items():
            codes[code] = codes.get(code, 0) + count
        for name, location in report["extension_files"].items():
            sys.stdout.write(f"worker {worker}: {name} from {location}\n")
        for failure in report["failures"]:
            failed = True
            sys.stdout.write(
                f"FAIL seed {failure['seed']} mutant {failure['index']} ({describe(failure)}), "
                f"saved as {failure['saved']}:\n"
            )
            for problem in failure["problems"]:
                sys.stdout.write(f"  {problem}\n")
    elapsed = time.monotonic() - started
    summary = ", ".join(f"exit {code}: {count}" for code, count in sorted(codes.items()))
    sys.stdout.write(
        f"fuzz_analyze: seed {args.seed}, {total} mutants of {len(captures)} captures in {elapsed:.0f} s "
        f"with {args.jobs} workers ({total / max(elapsed, 1e-9):.0f}/s; {summary})"
        f"{'' if args.plain else ', C extensions built with ASan + UBSan'}\n"
    )
    return 1 if failed else 0


def describe(mutant: dict[str, object]) -> str:
    """One line naming a mutant: its capture, its operations and its batching."""
    operations = mutant["operations"]
    assert isinstance(operations, list)
    batching = "analyze's batches" if mutant["batch_packets"] is None else f"{mutant['batch_packets']} packets a batch"
    return f"{mutant['base']}; {'; '.join(str(operation) for operation in operations)}; {batching}"


def _report_dead_worker(out: Path, worker: int, what: str) -> None:
    current = out / f"worker-{worker}.json"
    if not current.exists():
        sys.stdout.write(f"FAIL worker {worker} {what}, before its first mutant\n")
        return
    mutant = json.loads(current.read_text())
    saved = out / f"crash-{mutant['seed']}-{mutant['index']}.pcap"
    shutil.copyfile(out / f"worker-{worker}.pcap", saved)
    sys.stdout.write(
        f"FAIL worker {worker} {what} on seed {mutant['seed']} mutant {mutant['index']} "
        f"({describe(mutant)}), saved as {saved}; rebuild it with "
        f"`python -m tests.sanitize.fuzz_analyze --seed {mutant['seed']} --index {mutant['index']}`\n"
    )


def reproduce(args: argparse.Namespace) -> int:
    """Rebuild one mutant, save it, and run it here (a sanitizer report, if any, ends this process)."""
    if not args.plain:
        from tests.sanitize.asan import install, verify

        install()
        verify()
    captures = committed_captures()
    mutant = make_mutant(args.seed, args.index, captures, [path.read_bytes() for path in captures])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"mutant-{args.seed}-{args.index}.pcap"
    path.write_bytes(mutant.data)
    sys.stdout.write(f"{path}: {describe(mutant.described())}\n")
    verdict = InProcessAnalyzer().run(path, mutant.batch_packets)
    sys.stdout.write(f"exit code {verdict.exit_code}\n")
    for problem in verdict.problems:
        sys.stdout.write(f"  {problem}\n")
    return 1 if verdict.problems else 0


def _environment_number(name: str, default: float | None) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else default


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sanitize.fuzz_analyze", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=int(os.environ.get("TRAWL_FUZZ_SEED", "1")))
    seconds = _environment_number("TRAWL_FUZZ_SECONDS", DEFAULT_SECONDS)
    parser.add_argument("--seconds", type=float, default=seconds, help="time budget (TRAWL_FUZZ_SECONDS)")
    mutants = _environment_number("TRAWL_FUZZ_MUTANTS", None)
    mutants_default = None if mutants is None else int(mutants)
    parser.add_argument("--mutants", type=int, default=mutants_default, help="mutant budget (TRAWL_FUZZ_MUTANTS)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where mutants in flight and failures are saved")
    parser.add_argument("--plain", action="store_true", help="fuzz the ordinary build, without the sanitizers")
    parser.add_argument("--index", type=int, help="rebuild and run this one mutant of --seed")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.index is not None:
        return reproduce(args)
    if args.worker is None:
        return supervise(args)
    deadline = time.monotonic() + args.seconds
    report = run_worker(args.worker, args.jobs, args.seed, deadline, args.mutants, args.out, not args.plain)
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.write(json.dumps(asdict(report)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
