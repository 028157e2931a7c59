"""Alert evaluation speed: the alerter's rules over enriched calls, with and without guards.

    python bench/alerts.py [--calls 20000] [--rules FILE]

The calls are those of every committed capture (tests/fixtures: HTTP/1, HTTP/2 and gRPC, DNS,
TLS, TCP errors, Kafka, Redis, AMQP), dissected once and repeated (each copy its own ids) to
`--calls`. The rules are TEN_RULES below (or a rules file): ten per-call rules of the kind a team
writes, each about one protocol or outcome. Each row is `Alerter.evaluate` over every call, in
the same run:

1. every rule's condition run by cel-python on every call, after the call is turned into its
   CEL map (`guards=False, compiled=False`: what the alerter did before, the reference);
2. guards on (trawl.alerter.guards): a rule the call's protocol or outcome rules out is skipped,
   and the CEL map is only made when some rule may match; cel-python runs the rest;
3. guards and compiled rules (trawl.alerter.compiled, the default): conditions and group_by
   run as Python functions of the ApiCall, cel-python only for what they leave to it.

It prints calls/s and µs per call, checks that all raised the same alerts, and says how much of
the first row was the CEL map alone. Issue #14's target is 50,000 calls/s on one core.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trawl.alerter.logic import Alerter, call_to_cel
from trawl.alerter.rules import load_rules, parse_rules
from trawl.collector.replay import CaptureFile
from trawl.dissector.config import DissectorSettings
from trawl.dissector.engine import Dissector
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TEN_RULES = """rules:
  - name: http-server-errors
    condition: 'call.protocol == "http" && int(call.status) >= 500'
    group_by: 'call.dst.workload'
    cooldown: 60s
  - name: http-slow
    condition: 'call.protocol == "http" && call.elapsed_ns > 500000000'
  - name: grpc-failures
    condition: 'call.protocol == "grpc" && call.status != "0" && call.status != ""'
  - name: dns-failures
    condition: 'call.protocol == "dns" && call.outcome == "OUTCOME_ERROR"'
  - name: tcp-resets
    condition: 'call.protocol == "tcp" && call.method in ["reset", "refused"]'
    group_by: 'call.dst.ip'
    cooldown: 60s
  - name: tls-failures
    condition: 'call.protocol == "tls" && call.outcome == "OUTCOME_ERROR"'
  - name: kafka-errors
    condition: 'call.protocol == "kafka" && call.status != "NONE" && call.status != ""'
  - name: redis-errors
    condition: 'call.protocol == "redis" && call.outcome == "OUTCOME_ERROR"'
  - name: amqp-refusals
    condition: 'call.protocol == "amqp" && call.outcome == "OUTCOME_ERROR"'
  - name: unanswered
    condition: 'call.outcome == "OUTCOME_NO_RESPONSE" && call.elapsed_ns == 0'
    group_by: 'call.protocol'
    cooldown: 10s
"""


def fixture_calls() -> list[ApiCall]:
    captures = sorted(
        path
        for pattern in ("*.pcap", "http2/*.pcap", "kafka/*.pcap", "redis/*.pcap", "amqp/*.pcap", "hard/*.pcap")
        for path in FIXTURES.glob(pattern)
    )
    calls: list[ApiCall] = []
    for path in captures:
        dissector = Dissector(DissectorSettings.load(None, node="bench"), "bench")
        for sequence, batch in enumerate(CaptureFile(path).batches(1000), start=1):
            calls += dissector.feed(batch.message(node="bench", shard=0, sequence=sequence, source=str(path)))
        calls += dissector.finish()
    return calls


def repeated(calls: list[ApiCall], count: int) -> list[ApiCall]:
    out: list[ApiCall] = []
    copy = 0
    while len(out) < count:
        for call in calls[: count - len(out)]:
            made = ApiCall()
            made.CopyFrom(call)
            made.id = f"{call.id}-{copy}"
            made.request.ts += copy * 1_000_000_000
            out.append(made)
        copy += 1
    return out


def say(text: str = "") -> None:
    """A benchmark prints its figures (stdout); tools and services log instead."""
    sys.stdout.write(text + "\n")


def timed(alerter: Alerter, calls: list[ApiCall]) -> tuple[float, list[str]]:
    started = time.process_time()
    raised: list[str] = []
    for call in calls:
        raised += [alert.id for alert in alerter.evaluate(call)]
    return time.process_time() - started, raised


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rules", type=Path, help="a rules file instead of the ten rules above")
    args = parser.parse_args()
    rules = load_rules(args.rules) if args.rules else parse_rules(TEN_RULES, "bench/alerts.py", {})
    base = fixture_calls()
    calls = repeated(base, args.calls)
    protocols: dict[str, int] = {}
    for call in base:
        protocols[call.protocol] = protocols.get(call.protocol, 0) + 1
    say(f"{len(calls)} calls ({len(base)} from the fixtures: {protocols}), {len(rules)} rules")
    rows = []
    reference_s, reference = timed(Alerter(rules, Registry(), clock=lambda: 0.0, guards=False, compiled=False), calls)
    rows.append(("cel-python, every rule (reference)", reference_s))
    guarded_s, guarded = timed(Alerter(rules, Registry(), clock=lambda: 0.0, compiled=False), calls)
    rows.append(("guards, then cel-python", guarded_s))
    compiled_s, compiled = timed(Alerter(rules, Registry(), clock=lambda: 0.0), calls)
    rows.append(("guards and compiled rules (default)", compiled_s))
    started = time.process_time()
    for call in calls:
        call_to_cel(call)
    map_s = time.process_time() - started
    say(f"{'':40} {'CPU s':>7} {'calls/s':>10} {'us/call':>8}")
    for name, seconds in rows:
        say(f"{name:40} {seconds:7.2f} {len(calls) / seconds:10,.0f} {seconds / len(calls) * 1e6:8.1f}")
    say(f"the CEL map alone: {map_s / len(calls) * 1e6:.1f} us/call ({map_s / reference_s:.0%} of the reference)")
    same = reference == guarded == compiled
    say(f"alerts: {len(reference)} reference, {len(guarded)} guards, {len(compiled)} compiled; the same: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
