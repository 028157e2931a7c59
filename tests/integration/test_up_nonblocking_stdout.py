"""`trawl up --json` writing to a non-blocking pipe whose reader pauses: every call's line
comes out whole. The pipe's O_NONBLOCK flag belongs to the pipe, so a parent that set it (as
Go and Node programs do on theirs) hands it to trawl up; print() to it then failed with
BlockingIOError once the pipe was full, and lines were lost, or cut and run into the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "redis" / "benchmark.pcap"


def test_a_paused_reader_of_a_non_blocking_pipe_gets_every_line_whole(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    stderr = tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "trawl", "up", "--pcap", str(FIXTURE), "--json"]
    with stderr.open("w") as errors:
        process = subprocess.Popen(
            [*command, "--state-dir", str(tmp_path / "state")],
            stdout=write_end,
            stderr=errors,
        )
    os.close(write_end)
    try:
        # Paused well past the time the whole output takes, far more than a pipe holds.
        time.sleep(8)
        with os.fdopen(read_end, "rb") as pipe:
            output = pipe.read()
        assert process.wait(timeout=120) == 0, stderr.read_text()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert len(output) > 4 * 65536  # more than the pipe holds, so the writer had to wait
    lines = output.decode().splitlines()
    calls = [json.loads(line) for line in lines]  # each line whole JSON
    done = next(json.loads(line) for line in stderr.read_text().splitlines() if '"up_done"' in line)
    assert len(calls) == done["calls_shown"] == done["emitted"]["enricher"] > 0
    assert len({call["id"] for call in calls}) == len(calls)
