"""The enricher service over a real nats-server with `routes` configured: the calls it publishes
on TRAWL_ENRICHED and the spans it exports (compiled span path) carry the OpenAPI document's
route, set on the calls' bytes by the splicer."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import pytest
from nats.js.errors import NotFoundError

from tests.integration.test_enricher_otlp import SNAPSHOT, cluster_call
from tests.otlp_receiver import OtlpReceiver
from trawl.bus import STREAM_CALLS, STREAM_ENRICHED, Bus, calls_subject, control_subject
from trawl.config import NatsSettings
from trawl.enricher.config import EnricherSettings
from trawl.enricher.main import serve
from trawl.service import ServiceContext
from trawl.v1.calls_pb2 import ApiCall, CallBatch

ENRICHED_SUBJECT = "trawl.v1.enriched.http.shop.payments"
OPENAPI = "swagger: '2.0'\ninfo: {title: payments, version: '1'}\npaths:\n  /charges/{chargeId}:\n    post: {}\n"


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)


async def test_published_calls_and_spans_carry_the_route(nats_url: str, tmp_path: Path) -> None:
    node = f"rte-{uuid.uuid4().hex[:8]}"
    (tmp_path / "payments.yaml").write_text(OPENAPI)
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
            routes={"openapi": [{"service": "payments", "source": str(tmp_path / "payments.yaml")}]},
        )
        probe = await Bus.connect(NatsSettings(servers=[nats_url]), "probe")
        bus = await Bus.connect(settings.nats, "enricher-under-test")
        ctx = ServiceContext(name="enricher", settings=settings, bus=bus)
        ready = asyncio.Event()

        async def on_ready(_: object) -> None:
            ready.set()

        await probe.nc.subscribe(control_subject("ready", "enricher", node), cb=on_ready)
        service = asyncio.create_task(serve(ctx))
        subject = calls_subject(node, 0)
        try:
            await asyncio.wait_for(ready.wait(), 15)
            calls = [cluster_call(f"{node}-1"), cluster_call(f"{node}-2")]
            calls[1].path = "/refunds/77"  # not in the document: learned
            for call in calls:
                call.http.version = "1.1"  # as the dissector gives every HTTP call its detail
            batch = CallBatch(node=node, shard=0, sequence=1, calls=calls, end_of_input=True)
            await probe.publish_durable(subject, batch.SerializeToString(), f"{node}-b1")

            reader = await probe.pull(STREAM_ENRICHED, f"probe-{node}", ENRICHED_SUBJECT)
            messages = await reader.fetch(10, timeout=10)
            published = {
                call.id: call
                for call in map(ApiCall.FromString, (msg.data for msg in messages))
                if call.id.startswith(node)
            }
            assert published[f"{node}-1"].http.route == "/charges/{chargeId}"
            assert published[f"{node}-2"].http.route == "/refunds/{id}"

            spans = await asyncio.to_thread(receiver.wait_for_spans, 4)
            servers = {span.attributes["trawl.call.id"]: span for span in spans if span.kind == "SERVER"}
            assert servers[f"{node}-1"].attributes["http.route"] == "/charges/{chargeId}"
            assert servers[f"{node}-1"].name == "POST /charges/{chargeId}"
            assert servers[f"{node}-2"].attributes["http.route"] == "/refunds/{id}"
        finally:
            ctx.stopping.set()
            await asyncio.wait_for(service, 15)
            await bus.close()
            await probe.js.purge_stream(STREAM_CALLS, subject=f"trawl.v1.calls.{node}.>")
            await probe.js.purge_stream(STREAM_ENRICHED, subject=ENRICHED_SUBJECT)
            for stream, durable in ((STREAM_CALLS, f"enricher-{node}"), (STREAM_ENRICHED, f"probe-{node}")):
                with contextlib.suppress(NotFoundError):
                    await probe.js.delete_consumer(stream, durable)
            await probe.close()
