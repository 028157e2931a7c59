"""The enricher service over a real nats-server: CallBatches in, enriched calls and OTLP spans out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from tests.integration.test_enricher_otlp import SNAPSHOT, cluster_call
from tests.otlp_receiver import OtlpReceiver
from trawl.bus import STREAM_CALLS, STREAM_ENRICHED, Bus, calls_subject, control_subject
from trawl.config import NatsSettings
from trawl.enricher.config import EnricherSettings
from trawl.enricher.main import serve
from trawl.service import ServiceContext
from trawl.v1.calls_pb2 import ApiCall, CallBatch
from trawl.v1.control_pb2 import Drained

# Where the fixture's checkout -> payments calls are published (only this file's tests use shop/payments).
ENRICHED_SUBJECT = "trawl.v1.enriched.http.shop.payments"
RUN_MAIN = (
    "import sys; from pathlib import Path; from trawl.enricher.main import main; sys.exit(main(Path(sys.argv[1])))"
)


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)


async def test_service_enriches_publishes_and_exports(nats_url: str) -> None:
    node = f"enr-{uuid.uuid4().hex[:8]}"
    with OtlpReceiver() as receiver:
        settings = EnricherSettings.load(
            None,
            node=node,
            nats={"servers": [nats_url]},
            durable=f"enricher-{node}",
            calls_filter_subject=f"trawl.v1.calls.{node}.>",
            identity_snapshot=SNAPSHOT,
            otlp_endpoint=receiver.grpc_endpoint,
            export_schedule_delay_ms=50,
            fetch_timeout_s=0.2,
        )
        probe = await Bus.connect(NatsSettings(servers=[nats_url]), "probe")
        bus = await Bus.connect(settings.nats, "enricher-under-test")
        ctx = ServiceContext(name="enricher", settings=settings, bus=bus)
        ready = asyncio.Event()
        drained: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_ready(_: Msg) -> None:
            ready.set()

        await probe.nc.subscribe(control_subject("ready", "enricher", node), cb=on_ready)
        await probe.nc.subscribe(control_subject("drained", "enricher", node), cb=drained.put)
        service = asyncio.create_task(serve(ctx))
        try:
            await asyncio.wait_for(ready.wait(), 15)
            subject = calls_subject(node, 0)
            first = CallBatch(
                node=node, shard=0, sequence=1, calls=[cluster_call(f"{node}-1"), cluster_call(f"{node}-2")]
            )
            last = CallBatch(node=node, shard=0, sequence=2, calls=[cluster_call(f"{node}-3")], end_of_input=True)
            await probe.publish_durable(subject, b"\xff\xfe this is no CallBatch", f"{node}-garbage")
            # A CallBatch's frame whose call is not an ApiCall (the enricher reads batches as bytes).
            await probe.publish_durable(subject, b"\x22\x03\x0a\x05x", f"{node}-bad-call")
            await probe.publish_durable(subject, first.SerializeToString(), f"{node}-b1")
            await probe.publish_durable(subject, last.SerializeToString(), f"{node}-b2")

            announcement = Drained.FromString((await asyncio.wait_for(drained.get(), 15)).data)
            assert (announcement.service, announcement.node, announcement.emitted) == ("enricher", node, 3)

            reader = await probe.pull(STREAM_ENRICHED, f"probe-{node}", ENRICHED_SUBJECT)
            messages = await reader.fetch(10, timeout=5)
            mine = [msg for msg in messages if ApiCall.FromString(msg.data).id.startswith(node)]
            assert len(mine) == 3
            calls = [ApiCall.FromString(msg.data) for msg in mine]
            assert {call.id for call in calls} == {f"{node}-1", f"{node}-2", f"{node}-3"}
            assert all(msg.headers and msg.headers["Nats-Msg-Id"] == ApiCall.FromString(msg.data).id for msg in mine)
            for call in calls:
                assert (call.src.workload, call.src.namespace, call.src.pod) == (
                    "checkout",
                    "shop",
                    "checkout-7d9f8b6c5d-x2k4q",
                )
                assert (call.dst.workload, call.dst.service, call.dst.name) == ("payments", "payments", "payments")
            assert announcement.last_stream_sequence == max(msg.metadata.sequence.stream for msg in mine)

            spans = await asyncio.to_thread(receiver.wait_for_spans, 6)
            assert sorted(span.kind for span in spans) == ["CLIENT"] * 3 + ["SERVER"] * 3
            by_id = {span.span_id: span for span in spans}
            for span in spans:
                if span.kind == "SERVER":
                    parent = by_id[span.parent_span_id]
                    assert parent.kind == "CLIENT"
                    assert parent.attributes["trawl.call.id"] == span.attributes["trawl.call.id"]
                    assert (parent.resource["service.name"], span.resource["service.name"]) == ("checkout", "payments")

            assert ctx.metrics.counter("trawl_enricher_bad_batches_total", "").total() == 2
            assert ctx.metrics.counter("trawl_enricher_batches_total", "").total() == 2
            consumer = await probe.js.consumer_info(STREAM_CALLS, f"enricher-{node}")
            assert consumer.num_ack_pending == 0
            assert consumer.num_pending == 0
        finally:
            ctx.stopping.set()
            await asyncio.wait_for(service, 15)
            await bus.close()
            # The server is shared by the session: leave no end_of_input batch or enriched call that
            # another test's consumer (deliver-all) would pick up.
            await probe.js.purge_stream(STREAM_CALLS, subject=f"trawl.v1.calls.{node}.>")
            await probe.js.purge_stream(STREAM_ENRICHED, subject=ENRICHED_SUBJECT)
            for stream, durable in ((STREAM_CALLS, f"enricher-{node}"), (STREAM_ENRICHED, f"probe-{node}")):
                with contextlib.suppress(NotFoundError):
                    await probe.js.delete_consumer(stream, durable)
            await probe.close()


def _config(tmp_path: Path, nats_url: str, **enricher: str) -> tuple[Path, str]:
    """A config file for one enricher process with its own node, durable consumer and subjects
    (the NATS server is shared by the whole test session); returns (file, durable name)."""
    node = f"proc-{uuid.uuid4().hex[:8]}"
    enricher = {"durable": f"enricher-{node}", "calls_filter_subject": f"trawl.v1.calls.{node}.>", **enricher}
    lines = [f"node: {node}", "nats:", f"  servers: ['{nats_url}']", "enricher:"]
    lines += [f"  {key}: {value}" for key, value in enricher.items()]
    path = tmp_path / "trawl.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path, enricher["durable"]


async def test_process_starts_and_stops_on_sigterm(nats_url: str, tmp_path: Path) -> None:
    config, durable = _config(tmp_path, nats_url, identity_snapshot=str(SNAPSHOT), log_format="json")
    probe = await Bus.connect(NatsSettings(servers=[nats_url]), "probe")
    ready = asyncio.Event()

    async def on_ready(_: Msg) -> None:
        ready.set()

    await probe.nc.subscribe(control_subject("ready", "enricher") + ".>", cb=on_ready)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUN_MAIN, str(config), stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": "."}
    )
    try:
        await asyncio.wait_for(ready.wait(), 20)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        with contextlib.suppress(NotFoundError):
            await probe.js.delete_consumer(STREAM_CALLS, durable)
        await probe.close()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"kind": "List", "items": [{"kind": "Secret", "metadata": {"name": "s"}}]}', "kind 'Secret' is not one of"),
        ("not json at all", "not JSON"),
    ],
)
def test_bad_snapshot_is_one_line_and_exit_2(nats_url: str, tmp_path: Path, content: str, message: str) -> None:
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text(content)
    config, _ = _config(tmp_path, nats_url, identity_snapshot=str(snapshot))
    result = subprocess.run(
        [sys.executable, "-c", RUN_MAIN, str(config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("trawl enricher:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"trawl enricher: {snapshot}: ")
    assert message in errors[0]
    assert "Traceback" not in result.stderr
