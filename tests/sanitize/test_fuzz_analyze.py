"""The mutation fuzz driver itself (tests/sanitize/fuzz_analyze.py), on the ordinary build:
mutants are a function of (seed, index), the mutations do what they say, the contract check
fails what it must, and a short run over the committed captures holds the contract."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sanitize.fuzz_analyze import (
    PCAP_HEADER,
    PCAP_RECORD_HEADER,
    InProcessAnalyzer,
    committed_captures,
    corrupt_record_length,
    judge,
    make_mutant,
    run_worker,
    split_capture,
)

CAPTURES = committed_captures()
CONTENTS = [path.read_bytes() for path in CAPTURES]
WARNING = json.dumps({"event": "parse_error", "level": "warning"})


def test_every_committed_capture_is_cut_into_whole_records() -> None:
    for path, content in zip(CAPTURES, CONTENTS, strict=True):
        capture = split_capture(content)
        assert capture.format in ("pcap", "pcapng"), path
        assert capture.records and capture.tail == b"", path
        assert capture.join() == content


def test_a_mutant_is_a_function_of_seed_and_index() -> None:
    first = [make_mutant(7, index, CAPTURES, CONTENTS) for index in range(40)]
    again = [make_mutant(7, index, CAPTURES, CONTENTS) for index in reversed(range(40))][::-1]
    assert [mutant.data for mutant in first] == [mutant.data for mutant in again]
    assert [mutant.operations for mutant in first] == [mutant.operations for mutant in again]
    other_seed = [make_mutant(8, index, CAPTURES, CONTENTS).data for index in range(40)]
    assert other_seed != [mutant.data for mutant in first]
    # Round robin: the first len(CAPTURES) mutants start from every capture once.
    bases = {make_mutant(7, index, CAPTURES, CONTENTS).base for index in range(len(CAPTURES))}
    assert len(bases) == len(CAPTURES)


def test_a_record_length_is_set_where_the_record_says() -> None:
    original = split_capture((Path(__file__).parent.parent / "fixtures" / "http1.pcap").read_bytes())
    changed = 0
    for seed in range(50):
        capture = split_capture(original.join())
        what = corrupt_record_length(random.Random(seed), capture, [])
        index = int(what.split("record ")[1].split(" ")[0])
        value = int(what.rsplit("= ", 1)[1])
        offset = 8 if what.startswith("incl_len") else 12
        assert struct.unpack_from("<I", capture.records[index], offset)[0] == value
        changed += capture.join() != original.join()
    assert changed > 40  # the odd draw may rewrite a length to the value it had


@settings(deadline=None)
@given(seed=st.integers(0, 2**32), index=st.integers(0, 10_000))
def test_any_mutant_cuts_back_into_what_it_is_made_of(seed: int, index: int) -> None:
    mutant = make_mutant(seed, index, CAPTURES, CONTENTS)
    capture = split_capture(mutant.data)
    assert capture.join() == mutant.data
    assert 1 <= len(mutant.operations) <= 3


@pytest.mark.parametrize(
    ("exit_code", "stdout", "stderr", "escaped", "fault"),
    [
        (1, b"", "", None, "exit code 1"),
        (None, b"", "", "Traceback (most recent call last): ...", "exception escaped"),
        (2, b"", f"{WARNING}\n", None, "without a `trawl analyze: ...` line"),
        (0, b"", "Traceback (most recent call last):\n", None, "not a log event"),
        (0, b"", json.dumps({"event": "parser_failed", "level": "error"}) + "\n", None, "above warning"),
        (0, b'{"id": "a"}\n{"id": \n', "", None, "stdout line 2 is not JSON"),
        (0, b'{"id": "a"}', "", None, "does not end with a newline"),
    ],
)
def test_the_contract_check_fails_what_it_must(
    exit_code: int | None, stdout: bytes, stderr: str, escaped: str | None, fault: str
) -> None:
    problems = judge(exit_code, stdout, stderr, escaped).problems
    assert any(fault in problem for problem in problems), problems


def test_the_contract_check_passes_calls_warnings_and_one_error_line() -> None:
    assert judge(0, b'{"id": "a"}\n', f"{WARNING}\n", None).problems == []
    assert judge(2, b"", f"{WARNING}\ntrawl analyze: x.pcap: truncated capture\n", None).problems == []


def test_the_in_process_run_reports_what_the_cli_does(tmp_path: Path) -> None:
    analyzer = InProcessAnalyzer()
    good = analyzer.run(CAPTURES[0])
    assert (good.exit_code, good.problems) == (0, [])
    truncated = tmp_path / "cut.pcap"
    truncated.write_bytes(CONTENTS[0][: PCAP_HEADER + PCAP_RECORD_HEADER + 3])
    damaged = analyzer.run(truncated, batch_packets=1)
    assert (damaged.exit_code, damaged.problems) == (2, [])


def test_a_short_run_over_the_committed_captures_holds_the_contract(tmp_path: Path) -> None:
    report = run_worker(0, 1, 1, float("inf"), 2 * len(CAPTURES), tmp_path, sanitized=False)
    assert report.mutants == 2 * len(CAPTURES)
    assert report.failures == []
    assert set(report.exit_codes) <= {"0", "2"} and report.exit_codes.get("2", 0) > 0
