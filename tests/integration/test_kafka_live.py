"""The real kafka-python client against the stand-in broker (tests/kafka_broker.py) over real
sockets, through a recording TCP relay: producers with acks 0, 1 and all, and a consumer group that
reads the messages back and commits. Every connection's bytes, in the order they crossed the relay,
go through the Kafka parser; no capture (and no root) is needed. The broker starts once for the
session and stops after."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from kafka import KafkaConsumer, KafkaProducer

from tests.kafka_broker import KafkaStandIn
from trawl.dissector.protocols import kafka
from trawl.dissector.protocols.base import Direction, FlowInfo, ParserLimits
from trawl.v1.calls_pb2 import ApiCall, Outcome

HOST = "127.0.0.1"


@dataclass
class Connection:
    client_port: int
    chunks: list[tuple[Direction, bytes, int]] = field(default_factory=list)


class Relay:
    """Forwards every client connection to the broker and records what crossed, in order."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.connections: list[Connection] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kafka-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self._started.wait(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._accept, HOST, 0))
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()
        server.close()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.close()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        connection = Connection(client_writer.get_extra_info("peername")[1])
        self.connections.append(connection)
        broker_reader, broker_writer = await asyncio.open_connection(HOST, self.broker_port)

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction) -> None:
            try:
                while data := await reader.read(65536):
                    connection.chunks.append((direction, data, time.time_ns()))
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        await asyncio.gather(
            pump(client_reader, broker_writer, Direction.CLIENT_TO_SERVER),
            pump(broker_reader, client_writer, Direction.SERVER_TO_CLIENT),
        )


@pytest.fixture(scope="session")
def broker() -> Iterator[KafkaStandIn]:
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    stand_in = KafkaStandIn(HOST, 0)
    stand_in.start()
    yield stand_in
    stand_in.stop()


def dissect(relay: Relay) -> list[ApiCall]:
    calls: list[ApiCall] = []
    for connection in relay.connections:
        flow = FlowInfo("tcp", HOST, connection.client_port, HOST, relay.broker_port, node="n1")
        parser = kafka.KafkaParser(flow, ParserLimits())
        for direction, data, ts in list(connection.chunks):
            calls += parser.feed(direction, data, ts)
        calls += parser.finish(0)
        assert parser.counts == {}, parser.counts
    return calls


def test_producers_and_a_consumer_group_through_the_parser(broker: KafkaStandIn) -> None:
    relay = Relay(broker.port)
    relay.start()
    broker.advertise = relay.port  # clients reconnect to the node Metadata names: the relay
    try:
        address = f"{HOST}:{relay.port}"
        for acks in (0, 1, "all"):
            producer = KafkaProducer(bootstrap_servers=address, acks=acks, client_id=f"live-{acks}")
            for index in range(3):
                producer.send("live-orders", key=b"k%d" % index, value=b"order %d" % index)
            producer.flush()
            producer.close()
        consumer = KafkaConsumer(
            "live-orders",
            bootstrap_servers=address,
            group_id="live-billing",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            consumer_timeout_ms=1500,
            fetch_max_wait_ms=100,
            client_id="live-consumer",
        )
        values = [message.value for message in consumer]
        consumer.commit()
        consumer.close()
    finally:
        broker.advertise = 0
        relay.stop()
    assert sorted(values) == sorted([b"order %d" % index for index in range(3)] * 3)
    calls = dissect(relay)
    methods = {call.method for call in calls}
    assert methods >= {"ApiVersions", "Metadata", "Produce", "FindCoordinator", "JoinGroup", "SyncGroup", "Fetch"}
    assert methods >= {"OffsetFetch", "OffsetCommit", "LeaveGroup"}
    produces = [call for call in calls if call.method == "Produce"]
    assert {call.kafka.acks for call in produces} == {-1, 0, 1}  # a producer may send more than one batch
    assert all(call.kafka.one_way == (call.kafka.acks == 0) for call in produces)
    assert sum(call.kafka.record_count for call in produces) == 9
    assert sum(call.kafka.record_count for call in calls if call.method == "Fetch") == 9
    assert all(call.path == "live-orders" for call in produces)
    (commit,) = [call for call in calls if call.method == "OffsetCommit"]
    assert (commit.kafka.group_id, commit.status) == ("live-billing", "NONE")
    # Only a fetch the consumer left waiting (a long poll) when it closed may go unanswered.
    assert {call.method for call in calls if call.outcome == Outcome.OUTCOME_NO_RESPONSE} <= {"Fetch"}
    assert not any(note in call.notes for call in calls for note in ("body-not-decoded", "unknown-version"))
    served = {(api_key, version) for api_key, version in broker.requests}
    assert {(call.kafka.api_key, call.kafka.api_version) for call in calls} <= served
