"""`trawl up --pcap` end to end: calls per second, with and without OTLP export, and every span
accounted for; `trawl analyze` on the same file in the same run as the peer.

    python bench/up.py [FILE] [--calls 100000] [--runs 1] [--only export|plain]

FILE defaults to a capture of about `--calls` HTTP/1.1 calls (plus DNS, one exchange in ten
frames) made with bench/dissect.py's generator. Each line: wall time of the whole command from
start to exit (starting the embedded NATS server and the services included), the calls it
printed (--json) per second of that, and, with export, the spans and metric points a real
OTLP/gRPC receiver (opentelemetry-proto, in its own process: bench/metrics.py's) took, against
the spans expected (a CLIENT+SERVER pair per call) and the enricher's own accounting line.
The target of issue 12: 20,000 calls/s with export on this 2-core machine, every span delivered.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dissect import generate  # noqa: E402
from bench.metrics import Receiver  # noqa: E402

TRAWL = [sys.executable, "-m", "trawl"]


def say(text: str = "") -> None:
    """A benchmark prints its figures (stdout); tools and services log instead."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def timed(command: list[str], env: dict[str, str]) -> tuple[float, int, str, int]:
    """Wall seconds, lines printed, stderr and exit code of `command`."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as output:
        done = subprocess.run(command, stdout=output, stderr=subprocess.PIPE, text=True, env=env, check=False)
        elapsed = time.perf_counter() - started
        output.seek(0)
        printed = sum(1 for _ in output)
    return elapsed, printed, done.stderr, done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("capture", nargs="?", type=Path)
    parser.add_argument("--calls", type=int, default=100_000, help="HTTP calls of the generated capture")
    parser.add_argument("--runs", type=int, default=1, help="runs of each configuration (the best is kept)")
    parser.add_argument("--only", choices=["export", "plain"], help="run only this trawl up configuration")
    args = parser.parse_args()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "TRAWL_"))}
    with tempfile.TemporaryDirectory() as scratch:
        capture = args.capture
        if capture is None:
            capture = Path(scratch) / "http.pcap"
            # 3 frames an HTTP exchange, 2 a DNS one (one DNS exchange in ten frames): about `calls` HTTP calls.
            generate(capture, packets=int(args.calls * 3 / 0.9))
        elapsed, calls, stderr, code = timed([*TRAWL, "analyze", str(capture), "--json"], env)
        say(f"{capture.name}: {calls} calls; on this machine now (2 cores, shared: +-30%):")
        say(f"  {'trawl analyze --json (peer)':<36} {elapsed:6.2f} s {calls / elapsed:>9,.0f} calls/s  (exit {code})")
        expected_spans = 2 * calls
        failures = 0
        for name, export in (("trawl up --pcap --json", False), ("  + --otlp-endpoint (gRPC)", True)):
            if args.only and args.only != ("export" if export else "plain"):
                continue
            best: tuple[float, int, dict[str, int], str, int] | None = None
            for _ in range(args.runs):
                receiver = Receiver()
                command = [*TRAWL, "up", "--pcap", str(capture), "--json"]
                if export:
                    command += ["--otlp-endpoint", receiver.endpoint]
                elapsed, printed, stderr, code = timed(command, env)
                state = receiver.stop()
                if best is None or elapsed < best[0]:
                    best = (elapsed, printed, state, stderr, code)
            assert best is not None
            elapsed, printed, state, stderr, code = best
            say(f"  {name:<36} {elapsed:6.2f} s {printed / elapsed:>9,.0f} calls/s  (exit {code}, {printed} printed)")
            if printed != calls or code != 0:
                failures += 1
                say(f"    !! {printed} calls printed of {calls}; exit {code}: {stderr.strip()[-400:]}")
            if export:
                accounting = [line for line in stderr.splitlines() if re.match(r"(spans|metrics):", line)]
                verdict = "every span delivered" if state["spans"] == expected_spans else "SPANS MISSING"
                say(f"    receiver: {state['spans']} spans of {expected_spans} expected ({verdict}),")
                say(f"    {state['points']} metric points in {state['requests']} requests")
                for line in accounting:
                    say(f"    | {line.strip()[:160]}")
                if state["spans"] != expected_spans:
                    failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
