"""Windowed rules' cost: the alerter's windows in process and shared through Redis, same calls.

    python -m bench.alerter_windows [--calls 60000] [--groups 10] [--batch 256]

Two windowed rules (an error ratio over 30 s, a p99 over 1 m) grouped by destination workload,
`--calls` HTTP calls at 1,000 a second of the calls' time spread over `--groups` workloads, fed
to trawl.alerter.logic.Alerter in batches of `--batch` as the service feeds them (evaluate each
call, then flush), once with in-process windows and once with trawl.alerter.window_store's
Redis windows against a redis-server started here (Debian's, no persistence). Prints the calls
per second and the alerter's CPU per call of each; both must raise the same alerts.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import redis

from trawl.alerter.logic import Alerter
from trawl.alerter.rules import parse_rules
from trawl.alerter.window_store import SharedWindows
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall, Outcome

RULES = """rules:
  - name: errors
    condition: 'call.protocol == "http"'
    group_by: 'call.dst.workload'
    window: 30s
    aggregate: 'error_ratio > 0.1'
    min_calls: 20
  - name: slow
    condition: 'call.protocol == "http"'
    group_by: 'call.dst.workload'
    window: 1m
    aggregate: 'p99(elapsed) > 45ms'
"""
T0 = 1_800_000_000 * 1_000_000_000


def say(text: str = "") -> None:
    """A benchmark prints its figures (stdout); tools and services log instead."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def calls_for(count: int, groups: int) -> list[ApiCall]:
    calls = []
    for index in range(count):
        error = (index // 10_000) % 3 == 1 and index % 2 == 0  # 10 s bursts of errors, then quiet
        call = ApiCall(
            id=f"c{index}",
            protocol="http",
            status="503" if error else "200",
            elapsed_ns=1_000_000 * (1 + index % 50),
            outcome=Outcome.OUTCOME_ERROR if error else Outcome.OUTCOME_OK,
        )
        call.request.ts = T0 + index * 1_000_000
        call.dst.workload = f"w{index % groups}"
        calls.append(call)
    return calls


def run(alerter: Alerter, calls: list[ApiCall], batch: int) -> tuple[float, float, list[str]]:
    raised: list[str] = []
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(calls), batch):
        for sequence, call in enumerate(calls[start : start + batch], start=start + 1):
            raised += [alert.id for alert in alerter.evaluate(call, sequence)]
        flushed = alerter.flush()
        alerter.announced(flushed)
        raised += [alert.id for alert in flushed]
    return time.perf_counter() - wall, time.process_time() - cpu, raised


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=60_000)
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    calls = calls_for(args.calls, args.groups)
    rules = parse_rules(RULES, "bench/alerter_windows.py", {})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", folder],
            stdout=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            say(f"{len(calls)} calls over {args.groups} groups, two windowed rules, batches of {args.batch}")
            results = {}
            for name in ("in-process windows", "Redis windows"):
                store = SharedWindows(client, f"bench:{uuid.uuid4().hex}") if name.startswith("Redis") else None
                wall, cpu, raised = run(Alerter(rules, Registry(), window_store=store), calls, args.batch)
                results[name] = raised
                say(
                    f"  {name:<20} {len(calls) / wall:>9,.0f} calls/s  {cpu * 1e6 / len(calls):6.1f} us CPU a call"
                    f"  ({len(raised)} alerts)"
                )
            same = results["in-process windows"] == results["Redis windows"]
            say(f"  the same alerts: {same}")
            client.close()
        finally:
            server.terminate()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
