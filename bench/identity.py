"""Identity from a watched cluster: the history's memory, and the enrichment cost per call.

    .venv/bin/python bench/identity.py [--history-pods 100000] [--live-pods 10000]
                                       [--calls 200000] [--batch 1000] [--rounds 5] [--resident]

1. Memory: `--history-pods` pods go through trawl.enricher.cluster.ClusterHistory as a watch
   delivers them (ADDED, then DELETED), at most `--live-pods` alive at once, their IPs reused
   from a pool (a /18 of pod addresses), over 50 namespaces and 1,000 Deployments (through
   their ReplicaSets), with a Service per Deployment and 20 nodes: every pod's claim is kept
   as history ([from, to)). Printed: the Python heap the history holds (tracemalloc, after a
   collection), the process's resident size before and after, and the same once every
   address's answers are compiled (a lookup on each). `--resident` first builds the same
   history without tracemalloc and prints how much the resident size grew.
2. Enrichment: `--live-pods` pods alive (the same cluster, no history), and `--calls`
   serialized calls between random pod and service addresses at random times inside the
   pods' lives, enriched by the enricher's compiled splicer (Enricher.enrich_encoded) in
   batches of `--batch`: the median over `--rounds` of the nanoseconds per call, first with
   the map still, then with the watch changing the map between batches (10 pod events per
   batch: the splicer is rebuilt only when an address it described changed).

Figures are printed; nothing is asserted. The process runs on one core.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trawl.enricher.cluster import ClusterHistory
from trawl.enricher.config import EnricherSettings
from trawl.enricher.logic import Enricher
from trawl.v1.calls_pb2 import ApiCall


def say(text: str = "") -> None:
    """A benchmark prints its figures (stdout); tools and services log instead."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


SECOND = 1_000_000_000
T0 = 1_780_000_000 * SECOND
NAMESPACES = 50
DEPLOYMENTS = 1000
NODES = 20


def iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / SECOND, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_ip(index: int) -> str:
    return f"10.{64 + index // 65536}.{index // 256 % 256}.{index % 256}"


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    for index in range(NODES):
        yield (
            "Node",
            {
                "kind": "Node",
                "metadata": {"name": f"node-{index}", "creationTimestamp": iso(T0)},
                "status": {"addresses": [{"type": "InternalIP", "address": f"192.168.0.{index + 1}"}]},
            },
        )
    for index in range(DEPLOYMENTS):
        namespace = f"team-{index % NAMESPACES}"
        yield (
            "ReplicaSet",
            {
                "kind": "ReplicaSet",
                "metadata": {
                    "name": f"app-{index}-5c7d8f9b6",
                    "namespace": namespace,
                    "ownerReferences": [{"kind": "Deployment", "name": f"app-{index}", "controller": True}],
                },
            },
        )
        yield (
            "Service",
            {
                "kind": "Service",
                "metadata": {"name": f"app-{index}", "namespace": namespace, "creationTimestamp": iso(T0)},
                "spec": {"clusterIP": f"10.96.{index // 256}.{index % 256}", "selector": {"app": f"app-{index}"}},
            },
        )


def pod(index: int, ip: str, created_ns: int) -> dict[str, Any]:
    deployment = index % DEPLOYMENTS
    namespace = f"team-{deployment % NAMESPACES}"
    return {
        "kind": "Pod",
        "metadata": {
            "name": f"app-{deployment}-5c7d8f9b6-{index:06x}",
            "namespace": namespace,
            "uid": f"uid-{index}",
            "creationTimestamp": iso(created_ns),
            "labels": {"app": f"app-{deployment}", "pod-template-hash": "5c7d8f9b6"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": f"app-{deployment}-5c7d8f9b6", "controller": True}],
        },
        "spec": {
            "nodeName": f"node-{index % NODES}",
            "containers": [{"name": "app", "image": "example/app:1", "ports": [{"containerPort": 8080}]}],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def build_history(pods: int, live: int, pool: int) -> tuple[ClusterHistory, Clock]:
    """`pods` pods through the history, `live` alive at once, IPs from a pool of `pool`."""
    clock = Clock()
    history = ClusterHistory(cluster="bench", clock=clock, max_closed_claims=max(pods, 1))
    for kind, obj in seed_objects():
        history.apply(kind, "ADDED", obj)
    history.mark_synced()
    free = list(range(pool))
    random.Random(1).shuffle(free)
    alive: list[tuple[int, int]] = []  # (pod index, ip index), oldest first
    for index in range(pods):
        clock.now += SECOND
        if len(alive) >= live:
            gone, ip_index = alive.pop(0)
            history.apply("Pod", "DELETED", pod(gone, pod_ip(ip_index), T0))
            free.append(ip_index)
        ip_index = free.pop(0)
        history.apply("Pod", "ADDED", pod(index, pod_ip(ip_index), clock.now))
        alive.append((index, ip_index))
    return history, clock


def resident(pods: int, live: int) -> None:
    """The same history without tracemalloc: what the process's resident size grows by."""
    gc.collect()
    before = rss_mib()
    history, _ = build_history(pods, live, pool=16384)
    gc.collect()
    after = rss_mib()
    say(
        f"  untraced: resident {before:.0f} MiB before, {after:.0f} MiB with the history "
        f"({after - before:.0f} MiB for {history.counts()['closed_claims']:,} ended and "
        f"{history.counts()['open_claims']:,} open claims)"
    )


def memory(pods: int, live: int) -> None:
    gc.collect()
    before_rss = rss_mib()
    tracemalloc.start()
    started = time.perf_counter()
    history, _ = build_history(pods, live, pool=16384)
    took = time.perf_counter() - started
    gc.collect()
    heap = tracemalloc.get_traced_memory()[0] / 2**20
    after_rss = rss_mib()
    identity = history.identity
    for claim_ip in {claim.ip for claim in identity.claims()}:
        identity.lookup(claim_ip, T0 + SECOND)
    gc.collect()
    compiled_heap = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    counts = history.counts()
    say(
        f"history: {pods:,} pods through the watch ({live:,} alive at once, 16,384 addresses), {took:.1f} s "
        f"({took / pods * 1e6:.0f} us per pod's ADDED+DELETED, traced)"
    )
    say(
        f"  claims: {counts['open_claims']:,} open, {counts['closed_claims']:,} ended; {identity.addresses:,} addresses"
    )
    say(f"  Python heap held: {heap:.0f} MiB; with every address compiled: {compiled_heap:.0f} MiB")
    say(f"  resident: {before_rss:.0f} MiB before, {after_rss:.0f} MiB after (tracemalloc's own bookkeeping included)")
    say(f"  per pod of history: {heap * 2**20 / pods:.0f} bytes (target: 100,000 pods < 300 MB)")


def make_calls(history: ClusterHistory, count: int, start_ns: int, end_ns: int) -> list[bytes]:
    rng = random.Random(2)
    pods = [claim.ip for claim in history.identity.claims() if claim.identity.kind == "pod"]
    services = [claim.ip for claim in history.identity.claims() if claim.identity.kind == "service"]
    calls = []
    for index in range(count):
        call = ApiCall(
            id=f"{index:024x}", protocol="http", transport="tcp", method="GET", path="/api/items", status="200"
        )
        call.src.ip, call.src.port = rng.choice(pods), 40000 + index % 20000
        call.dst.ip, call.dst.port = (rng.choice(services) if index % 3 == 0 else rng.choice(pods)), 8080
        call.request.ts = rng.randrange(start_ns, end_ns)
        call.response.ts = call.request.ts + 1_000_000
        calls.append(call.SerializeToString())
    return calls


def enrichment(live: int, calls_count: int, batch: int, rounds: int) -> None:
    history, clock = build_history(live, live, pool=16384)
    settings = EnricherSettings()
    calls = make_calls(history, calls_count, T0 + live * SECOND, clock.now + 1)
    batches = [calls[index : index + batch] for index in range(0, len(calls), batch)]

    def run(churn: bool) -> float:
        enricher = Enricher(settings, history.identity)
        enricher.enrich_encoded(batches[0])  # the splicer made, as it is once running
        next_pod = live * 10
        started = time.perf_counter_ns()
        spent_on_events = 0
        for chunk in batches:
            if churn:
                event_started = time.perf_counter_ns()
                for _ in range(10):
                    clock.now += SECOND
                    next_pod += 1
                    history.apply("Pod", "ADDED", pod(next_pod, pod_ip(20000 + next_pod % 40000), clock.now))
                spent_on_events += time.perf_counter_ns() - event_started
            enricher.enrich_encoded(chunk)
        return (time.perf_counter_ns() - started - spent_on_events) / len(calls)

    still = [run(churn=False) for _ in range(rounds)]
    churning = [run(churn=True) for _ in range(rounds)]
    objects = [ApiCall.FromString(data) for data in calls[: batch * 20]]
    enricher = Enricher(settings, history.identity)
    started = time.perf_counter_ns()
    for index in range(0, len(objects), batch):
        enricher.enrich_calls(objects[index : index + batch])
    per_object = (time.perf_counter_ns() - started) / len(objects)
    say(
        f"enrichment: {live:,} pods watched, {calls_count:,} calls in batches of {batch} "
        f"(pod and service addresses, times inside the pods' lives)"
    )
    say(
        f"  splicer, map still:     {statistics.median(still):.0f} ns per call (median of {rounds}; "
        f"min {min(still):.0f}, max {max(still):.0f})"
    )
    say(
        f"  splicer, 10 pod events per batch: {statistics.median(churning):.0f} ns per call "
        f"(the events' own cost left out)"
    )
    say(f"  objects (enrich_calls): {per_object:.0f} ns per call, for reference")
    say("  target: <= 2,000 ns per call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history-pods", type=int, default=100_000)
    parser.add_argument("--live-pods", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resident", action="store_true", help="also build the history untraced, for its RSS")
    args = parser.parse_args()
    if args.resident:
        resident(args.history_pods, args.live_pods)
    memory(args.history_pods, args.live_pods)
    enrichment(args.live_pods, args.calls, args.batch, args.rounds)


if __name__ == "__main__":
    main()
