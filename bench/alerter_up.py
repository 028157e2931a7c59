"""What ten alert rules cost `trawl up`: the same capture with and without the rules, alternated.

    python bench/alerter_up.py [--calls 101775] [--runs 3] [--pcap FILE] [--rules FILE]

Generates (bench/dissect.py's generator) a capture of `--calls` HTTP calls on keep-alive
connections, unless `--pcap` names one, and runs `trawl up --pcap FILE --json` on it without
rules (no alerter is started then) and with bench/alerts.py's ten per-protocol rules, `--runs`
times each, alternating so that both see the same machine. Prints each run's wall time, the CPU
time of the whole suite (trawl up and every service it ran: children's rusage, which the other
load on the machine does not inflate as it does the wall time), the lines printed, and the
median ratios with / without.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/alerter_up.py` as the other benches run

from bench.alerts import TEN_RULES  # noqa: E402
from bench.dissect import generate  # noqa: E402


def say(text: str = "") -> None:
    """A benchmark prints its figures (stdout); tools and services log instead."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_up(capture: Path, rules: Path | None) -> tuple[float, float, int]:
    """(wall s, CPU s of trawl up and its services, lines printed)."""
    command = [sys.executable, "-m", "trawl", "up", "--pcap", str(capture), "--json"]
    if rules is not None:
        command += ["--rules", str(rules)]
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    cpu = children_cpu_s()
    started = time.perf_counter()
    with tempfile.TemporaryFile() as output:
        done = subprocess.run(command, stdout=output, stderr=subprocess.PIPE, env=env, check=False)
        output.seek(0)
        printed = sum(1 for _ in output)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"trawl up exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    return wall, children_cpu_s() - cpu, printed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=101_775)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pcap", type=Path, help="this capture instead of a generated one")
    parser.add_argument("--rules", type=Path, help="a rules file instead of bench/alerts.py's ten rules")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        capture = args.pcap
        if capture is None:
            capture = Path(scratch) / "calls.pcap"
            calls = args.calls
            generate(capture, packets=3 * calls + 6 * (calls // 100 + 1), requests_per_connection=100, dns_share=0)
        rules = args.rules
        if rules is None:
            rules = Path(scratch) / "rules.yaml"
            rules.write_text(TEN_RULES)
        say(f"trawl up --pcap {capture.name} --json, without rules and with {rules.name}, {args.runs} runs each")
        results: dict[str, list[tuple[float, float, int]]] = {"without": [], "with": []}
        for _ in range(args.runs):
            for name, with_rules in (("without", None), ("with", rules)):
                wall, cpu, printed = run_up(capture, with_rules)
                results[name].append((wall, cpu, printed))
                say(f"  {name:<8} rules  {wall:6.2f} s wall  {cpu:6.2f} s CPU  {printed} calls printed")
        wall_ratio = statistics.median(r[0] for r in results["with"]) / statistics.median(
            r[0] for r in results["without"]
        )
        cpu_ratio = statistics.median(r[1] for r in results["with"]) / statistics.median(
            r[1] for r in results["without"]
        )
        say(f"  with / without (medians): wall {wall_ratio:.2f}x, CPU {cpu_ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
