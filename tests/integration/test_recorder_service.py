"""The recorder service over a real nats-server: batches in, sealed pcap and a Drained message out."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import nats
import pytest

from tests.unit.test_recorder_writer import HTTP1, batches_of, read_pcap
from trawl.bus import Bus, control_subject, packets_subject
from trawl.recorder.config import RecorderSettings
from trawl.recorder.main import main, serve
from trawl.service import ServiceContext
from trawl.v1 import control_pb2


async def start_recorder(nats_url: str, directory: Path) -> tuple[ServiceContext[RecorderSettings], asyncio.Task[None]]:
    settings = RecorderSettings.load(None, node="rec-1", directory=directory, nats={"servers": [nats_url]})
    bus = await Bus.connect(settings.nats, "test-recorder")
    ctx = ServiceContext(name="recorder", settings=settings, bus=bus)
    return ctx, asyncio.create_task(serve(ctx))


async def test_batches_then_end_of_input_give_a_sealed_file_and_drained(
    nats_url: str, tmp_path: Path, shared_pcaps: Path
) -> None:
    source = shared_pcaps / HTTP1
    link_type, snaplen, records = read_pcap(source)
    client = await nats.connect(nats_url)
    ready = await client.subscribe(control_subject("ready", "recorder", "rec-1"))
    drained = await client.subscribe(control_subject("drained", "recorder", "rec-1"))
    ctx, task = await start_recorder(nats_url, tmp_path / "rec")
    try:
        await ready.next_msg(timeout=10)
        batches = batches_of(records, link_type, node="collector-node", snaplen=snaplen)
        batches[-1].end_of_input = True
        # The damaged message goes first: the drained announcement follows end_of_input, and
        # must find it counted (one subscription sees the messages in publication order).
        await client.publish(packets_subject("collector-node", 1), b"\xff not a batch")
        for batch in batches:
            await client.publish(packets_subject("collector-node", 0), batch.SerializeToString())
        message = control_pb2.Drained.FromString((await drained.next_msg(timeout=10)).data)
        assert message.service == "recorder"
        assert message.node == "rec-1"
        assert message.emitted == len(records)
        [name] = message.files
        sealed = Path(name)
        assert sealed.parent == tmp_path / "rec"
        written = sealed.read_bytes()  # noqa: ASYNC240 - a small test file
        assert written[24:] == source.read_bytes()[24:]
        assert struct.unpack_from("<I", written, 20)[0] == link_type
        assert ctx.metrics.counter("trawl_recorder_undecodable_total", "").total() == 1
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await ctx.bus.close()
        await client.close()


async def test_stopping_seals_the_open_file(nats_url: str, tmp_path: Path, shared_pcaps: Path) -> None:
    link_type, snaplen, records = read_pcap(shared_pcaps / HTTP1)
    client = await nats.connect(nats_url)
    ready = await client.subscribe(control_subject("ready", "recorder", "rec-1"))
    directory = tmp_path / "rec"
    ctx, task = await start_recorder(nats_url, directory)
    try:
        await ready.next_msg(timeout=10)
        batches = batches_of(records, link_type, snaplen=snaplen)
        # Sequence 2 never arrives: the recorder counts the gap.
        for batch in [batches[0], *batches[2:4]]:
            await client.publish(packets_subject("node-a", 0), batch.SerializeToString())
        await client.flush()
        for _ in range(100):
            if list(directory.glob("*.pcap.partial")) and ctx.metrics.snapshot()["trawl_recorder_packets_total"] == 21:
                break
            await asyncio.sleep(0.05)
        assert list(directory.glob("*.pcap")) == []
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await ctx.bus.close()
        await client.close()
    assert list(directory.glob("*.partial")) == []
    [sealed] = directory.glob("*.pcap")
    assert sealed.read_bytes()[24:] == b"".join(b.records for b in [batches[0], *batches[2:4]])
    assert ctx.metrics.counter("trawl_recorder_lost_batches_total", "").total() == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("recorder:\n  rotate_bytes: 10\n", "rotate_bytes"),
        ("recorder:\n  format: pcapx\n", "format"),
        ("recorder:\n  s3:\n    object_lock: {mode: GOVERNANCE, days: 7}\n", "s3.bucket: Field required"),
        (
            "recorder:\n  s3: {bucket: evidence, object_lock: {mode: FOREVER, days: 7}}\n",
            "s3.object_lock.mode: Input should be 'GOVERNANCE' or 'COMPLIANCE'",
        ),
    ],
)
def test_bad_config_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    config = tmp_path / "trawl.yaml"
    config.write_text(text)
    assert main(config) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{config}:2: {expected}" in err
