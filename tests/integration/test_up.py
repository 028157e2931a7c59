"""`trawl up --pcap` as a user runs it: a subprocess that starts the embedded nats-server
and the five services as separate OS processes, with a real OTLP gRPC receiver and a real
webhook server listening. Checked: the NDJSON calls against tshark's view of the same
file (pairs and wire timestamps), the spans and their parent/child link, the recorder's file
against the input packet for packet, the alert's webhook, and that no process is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import dpkt
import pytest

from tests.conftest import FIXTURES, needs_binary
from tests.otlp_receiver import OtlpReceiver
from tests.webhook_server import WebhookServer

HTTP1 = FIXTURES / "http1.pcap"
IDENTITY = FIXTURES / "http1_identity.json"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture
def webhook() -> Iterator[WebhookServer]:
    hook = WebhookServer()
    yield hook
    hook.close()


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def tshark_pairs(path: Path) -> list[tuple[str, str, str, int, int]]:
    """(method, uri, status, request frame ns, response frame ns) per HTTP exchange, from tshark."""
    out = subprocess.run(
        ["tshark", "-r", str(path), "-Y", "http.response", "-T", "fields", "-E", "separator=|",
         "-e", "http.request_in", "-e", "http.response.code", "-e", "frame.time_epoch"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    requests = subprocess.run(
        ["tshark", "-r", str(path), "-Y", "http.request", "-T", "fields", "-E", "separator=|",
         "-e", "frame.number", "-e", "http.request.method", "-e", "http.request.uri", "-e", "frame.time_epoch"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    by_frame = {}
    for line in requests.splitlines():
        number, method, uri, epoch = line.split("|")
        by_frame[number] = (method, uri, int(Decimal(epoch) * 10**9))
    pairs = []
    for line in out.splitlines():
        request_in, code, epoch = line.split("|")
        method, uri, request_ns = by_frame[request_in]
        pairs.append((method, uri, code, request_ns, int(Decimal(epoch) * 10**9)))
    return pairs


def processes_mentioning(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@needs_binary("tshark")
def test_up_pcap_runs_the_whole_suite(tmp_path: Path, otlp: OtlpReceiver, webhook: WebhookServer) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: server-errors\n"
        "    condition: 'call.protocol == \"http\" && int(call.status) >= 500'\n"
        "    severity: critical\n"
        "    summary: 'HTTP {call.status} from {call.dst.workload}'\n"
        f"    actions:\n      - webhook: {{url: '{webhook.url}/hook', format: json}}\n"
    )
    state = tmp_path / "state"
    records = tmp_path / "recordings"
    result = subprocess.run(
        [sys.executable, "-m", "trawl", "up", "--pcap", str(HTTP1), "--identity", str(IDENTITY),
         "--rules", str(rules), "--record-dir", str(records), "--json", "--state-dir", str(state),
         "--otlp-endpoint", f"http://{otlp.grpc_endpoint}"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert processes_mentioning(str(state)) == [], "trawl up left processes behind"

    # NDJSON: one enriched call per HTTP exchange, as tshark pairs them, with wire timings.
    # tshark dates a message by its last segment (where its reassembly completes): end_ts.
    calls = [json.loads(line) for line in result.stdout.splitlines()]
    # Where Trawl and tshark differ by design: Trawl redacts secrets before anything leaves the dissector.
    expected = [(m, uri.replace("token=abc", "token=[REDACTED]"), *rest) for m, uri, *rest in tshark_pairs(HTTP1)]
    assert len(expected) == 6
    for secret in ("s3cr3t-t0k3n", "hunter2", "token=abc"):
        assert secret not in result.stdout
    got = sorted(
        (c["method"], c["path"], c["status"], int(c["request"]["end_ts"]), int(c["response"]["end_ts"])) for c in calls
    )
    assert got == sorted(expected)
    stream = next(c for c in calls if c["path"] == "/api/stream")
    assert int(stream["response"]["ts"]) < int(stream["response"]["end_ts"])  # 5 chunks, over ~50 ms
    for call in calls:
        assert int(call["elapsed_ns"]) == int(call["response"]["ts"]) - int(call["request"]["ts"]) > 0
        assert call["src"]["workload"] == "checkout" and call["src"]["namespace"] == "shop"
        assert call["dst"]["workload"] == "payments" and call["dst"]["workload_kind"] == "StatefulSet"
        assert call["outcome"] == ("OUTCOME_ERROR" if call["status"] == "500" else "OUTCOME_OK")

    # Spans: a CLIENT span in the caller's service and a SERVER span in the callee's, parent/child.
    spans = otlp.wait_for_spans(2 * len(calls), timeout_s=20)
    clients = {s.span_id: s for s in spans if s.kind == "CLIENT"}
    servers = [s for s in spans if s.kind == "SERVER"]
    assert len(clients) == len(servers) == len(calls)
    for server in servers:
        client = clients[server.parent_span_id]
        assert client.trace_id == server.trace_id
        assert server.resource["service.name"] == "payments"
        assert client.resource["service.name"] == "checkout"
        assert server.resource["service.namespace"] == "billing"
        assert server.attributes["http.request.method"] in {"GET", "POST"}
        assert server.attributes["http.response.status_code"] in {200, 201, 404, 500}
    # The POST carried a traceparent: both spans join that trace, under the caller's span.
    post = next(s for s in servers if s.attributes["http.request.method"] == "POST")
    assert post.trace_id == TRACE_ID
    assert clients[post.parent_span_id].parent_span_id == CALLER_SPAN_ID
    assert {s.trace_id for s in spans if s.trace_id != TRACE_ID} and len({s.trace_id for s in spans}) == len(calls)

    # Recorder: the sealed file holds the input's packets, bytes and timestamps.
    sealed = sorted(records.glob("*.pcap"))
    assert len(sealed) == 1
    with HTTP1.open("rb") as original, sealed[0].open("rb") as recorded:
        assert [(ts, bytes(b)) for ts, b in dpkt.pcap.Reader(recorded)] == [
            (ts, bytes(b)) for ts, b in dpkt.pcap.Reader(original)
        ]
    fields = ["-T", "fields", "-e", "frame.time_epoch", "-e", "frame.len"]
    assert (
        subprocess.run(["tshark", "-r", str(sealed[0]), *fields], capture_output=True, text=True, check=True).stdout
        == subprocess.run(["tshark", "-r", str(HTTP1), *fields], capture_output=True, text=True, check=True).stdout
    )

    # Alert: the 500 made the rule fire once, and its webhook got the alert JSON.
    assert [path for path, _, _ in webhook.requests] == ["/hook"]
    [alert] = webhook.json_bodies()
    assert alert["rule"] == "server-errors"
    assert alert["summary"] == "HTTP 500 from payments"
    assert alert["call"]["path"] == "/api/fail"  # type: ignore[index]


def test_up_table_view_and_exit(tmp_path: Path) -> None:
    """Without --json the calls come as a table on stdout; the run ends by itself."""
    state = tmp_path / "state"
    result = subprocess.run(
        [sys.executable, "-m", "trawl", "up", "--pcap", str(HTTP1), "--identity", str(IDENTITY),
         "--state-dir", str(state)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["TIME", "PROTO", "SOURCE", "DESTINATION"]
    rows = [line for line in lines[1:] if " http " in line]
    assert len(rows) == 6
    assert any("checkout.shop" in row and "payments.billing" in row and "/api/fail" in row for row in rows)
    assert processes_mentioning(str(state)) == []


def test_children_do_not_outlive_a_killed_trawl_up(tmp_path: Path) -> None:
    """Even SIGKILL (no chance to clean up) leaves no service or nats-server behind: the
    kernel tells each child when its parent dies."""
    config = tmp_path / "trawl.yaml"
    config.write_text("collector:\n  replay_speed: 0.001\n")  # keeps the replay running
    state = tmp_path / "state"
    process = subprocess.Popen(
        [sys.executable, "-m", "trawl", "up", "--pcap", str(HTTP1), "--config", str(config),
         "--state-dir", str(state)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        collector_log = state / "logs" / "collector.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            collector_log.exists() and "service_ready" in collector_log.read_text()
        ):
            time.sleep(0.2)
        assert len(processes_mentioning(str(state))) >= 4  # nats-server, dissector, enricher, collector
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and processes_mentioning(str(state)):
        time.sleep(0.2)
    assert processes_mentioning(str(state)) == []
