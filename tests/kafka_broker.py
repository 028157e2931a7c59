"""A stand-in Kafka broker for Trawl's tests: no Kafka broker can be installed on these machines
(Debian ships none, and a JVM broker is too heavy for the test run), so this small asyncio
server plays one. It is NOT Kafka: it is one node (id 0) that holds every topic with one
partition in memory, leads every partition and coordinates every group, with no replication,
no retention, no quotas and no persistence.

What it speaks is the real wire protocol, encoded and decoded by kafka-python's protocol
classes (`kafka.protocol.*`, which kafka-python 3 builds from Kafka's own JSON message
definitions), so the real `kafka-python` client (KafkaProducer, KafkaConsumer, KafkaAdminClient)
talks to it unchanged. Implemented APIs and what they do:

- ApiVersions: the version ranges in `SUPPORTED` (those of a Kafka 3.9 broker, capped where
  this stand-in stops); an unsupported version gets UNSUPPORTED_VERSION in a v0 body, as Kafka does.
- Metadata: this node, and the asked topics (created on first use when the request allows it);
  a topic named in `FORBIDDEN_TOPICS` answers TOPIC_AUTHORIZATION_FAILED.
- Produce (acks 0, 1 and all): record batches appended as sent, their base offsets rewritten to
  the log's (the CRC does not cover them); acks=0 gets no response at all.
- Fetch: the batches at or after the fetch offset, up to the partition's max bytes; with nothing
  to return it waits up to MaxWaitMs (capped) for a produce, as a broker does. No fetch sessions
  (session id 0: every fetch is a full fetch).
- ListOffsets (earliest -2, latest -1), FindCoordinator (v0-3 and v4+ batched keys),
  JoinGroup (MEMBER_ID_REQUIRED first from v4 on, like Kafka; one generation per join round),
  SyncGroup, Heartbeat, LeaveGroup, OffsetCommit, OffsetFetch (v0-7 and v8+ grouped),
  InitProducerId (the idempotent producer asks for one), CreateTopics, DeleteTopics.
- SaslHandshake (v1; mechanism PLAIN) and SaslAuthenticate: PLAIN credentials checked against
  `users`; a wrong password answers SASL_AUTHENTICATION_FAILED.

Requests on one connection are answered one at a time, in order, as Kafka does.

    broker = KafkaStandIn(port=0)          # or a fixed port
    broker.start()                          # in a background thread, with its own event loop
    ... KafkaProducer(bootstrap_servers=broker.address) ...
    broker.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from kafka.protocol.admin import CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse
from kafka.protocol.consumer import (
    FetchRequest,
    FetchResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    JoinGroupRequest,
    JoinGroupResponse,
    LeaveGroupRequest,
    LeaveGroupResponse,
    ListOffsetsRequest,
    ListOffsetsResponse,
    OffsetCommitRequest,
    OffsetCommitResponse,
    OffsetFetchRequest,
    OffsetFetchResponse,
    SyncGroupRequest,
    SyncGroupResponse,
)
from kafka.protocol.metadata import (
    ApiVersionsRequest,
    ApiVersionsResponse,
    FindCoordinatorRequest,
    FindCoordinatorResponse,
    MetadataRequest,
    MetadataResponse,
)
from kafka.protocol.producer import InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse
from kafka.protocol.sasl import (
    SaslAuthenticateRequest,
    SaslAuthenticateResponse,
    SaslHandshakeRequest,
    SaslHandshakeResponse,
)

log = logging.getLogger("kafka_stand_in")
NODE_ID = 0
CLUSTER_ID = "trawl-stand-in"
FORBIDDEN_TOPICS = frozenset({"forbidden"})
MAX_WAIT_MS = 200  # a fetch with nothing to return waits at most this long
# api key -> (request class, response class, newest version served).
SUPPORTED: dict[int, tuple[Any, Any, int]] = {
    0: (ProduceRequest, ProduceResponse, 11),
    1: (FetchRequest, FetchResponse, 12),  # v13+ names topics by id: not implemented here
    2: (ListOffsetsRequest, ListOffsetsResponse, 9),
    3: (MetadataRequest, MetadataResponse, 12),
    8: (OffsetCommitRequest, OffsetCommitResponse, 9),
    9: (OffsetFetchRequest, OffsetFetchResponse, 9),
    10: (FindCoordinatorRequest, FindCoordinatorResponse, 6),
    11: (JoinGroupRequest, JoinGroupResponse, 9),
    12: (HeartbeatRequest, HeartbeatResponse, 4),
    13: (LeaveGroupRequest, LeaveGroupResponse, 5),
    14: (SyncGroupRequest, SyncGroupResponse, 5),
    17: (SaslHandshakeRequest, SaslHandshakeResponse, 1),
    18: (ApiVersionsRequest, ApiVersionsResponse, 4),
    19: (CreateTopicsRequest, CreateTopicsResponse, 7),
    20: (DeleteTopicsRequest, DeleteTopicsResponse, 6),
    22: (InitProducerIdRequest, InitProducerIdResponse, 5),
    36: (SaslAuthenticateRequest, SaslAuthenticateResponse, 2),
}
NONE, UNKNOWN_TOPIC_OR_PARTITION, TOPIC_AUTHORIZATION_FAILED = 0, 3, 29
UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, UNSUPPORTED_VERSION = 33, 34, 35
TOPIC_ALREADY_EXISTS, SASL_AUTHENTICATION_FAILED, MEMBER_ID_REQUIRED = 36, 58, 79
UNKNOWN_MEMBER_ID = 25


@dataclass
class Partition:
    batches: list[bytes] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # base offset of each batch
    end: int = 0  # the log end offset


@dataclass
class Group:
    generation: int = 0
    protocol: str = ""
    members: dict[str, bytes] = field(default_factory=dict)  # member id -> subscription metadata
    assignments: dict[str, bytes] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)


class KafkaStandIn:
    """The stand-in broker (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, users: dict[str, str] | None = None) -> None:
        self.host = host
        self.port = port
        self.users = users  # SASL/PLAIN users; None: no authentication asked
        self.advertise = 0  # a port to advertise instead of this one (0: this one)
        self.topics: dict[str, Partition] = {}
        self.topic_ids: dict[str, uuid.UUID] = {}
        self.groups: dict[str, Group] = {}
        self.requests: list[tuple[int, int]] = []  # (api key, version) of every request served
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._produced: asyncio.Event | None = None
        self._started = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def advertised_port(self) -> int:
        """The port Metadata and FindCoordinator give clients (Kafka's advertised.listeners):
        `advertise` sets another, for a relay in front of the broker."""
        return self.advertise or self.port

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kafka-stand-in", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the stand-in Kafka broker did not start")

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._produced = asyncio.Event()
        self._server = loop.run_until_complete(asyncio.start_server(self._connection, self.host, self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    # -- one connection -------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        authenticated = self.users is None
        try:
            while True:
                size = struct.unpack(">i", await reader.readexactly(4))[0]
                frame = await reader.readexactly(size)
                api_key, version = struct.unpack_from(">hh", frame)
                self.requests.append((api_key, version))
                if not authenticated and api_key not in (17, 18, 36):
                    return  # a broker closes an unauthenticated connection that asks anything else
                reply, authenticated = await self._handle(api_key, version, frame, authenticated)
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:  # a stand-in bug: say it, close the connection as a broker would
            log.exception("kafka_stand_in_failed")
        finally:
            writer.close()

    async def _handle(self, api_key: int, version: int, frame: bytes, authenticated: bool) -> tuple[bytes | None, bool]:
        entry = SUPPORTED.get(api_key)
        if api_key == 18 and (entry is None or version > entry[2]):
            correlation_id = struct.unpack_from(">i", frame, 4)[0]
            response = ApiVersionsResponse[0](error_code=UNSUPPORTED_VERSION, api_keys=self._api_keys(0))
            response.with_header(correlation_id=correlation_id)
            return bytes(response.encode(header=True, framed=True)), authenticated
        if entry is None or version > entry[2]:
            raise ConnectionError(f"unsupported api {api_key} v{version}")
        request_class, response_class, _newest = entry
        request = request_class[version].decode(frame, header=True)
        correlation_id = request.header.correlation_id
        handler = getattr(self, f"_api_{api_key}")
        result = handler(request, response_class[version], version)
        if asyncio.iscoroutine(result):
            result = await result
        if result is None:
            return None, authenticated
        if api_key == 36:
            authenticated = result.error_code == NONE
        result.with_header(correlation_id=correlation_id)
        return bytes(result.encode(header=True, framed=True)), authenticated

    def _api_keys(self, version: int) -> list[Any]:
        item = ApiVersionsResponse[version].ApiVersion
        return [item(api_key=key, min_version=0, max_version=entry[2]) for key, entry in sorted(SUPPORTED.items())]

    def _topic(self, name: str, create: bool = True) -> Partition | None:
        partition = self.topics.get(name)
        if partition is None and create and name not in FORBIDDEN_TOPICS:
            partition = self.topics[name] = Partition()
            self.topic_ids[name] = uuid.uuid5(uuid.NAMESPACE_URL, f"trawl-kafka-topic/{name}")
        return partition

    # -- the APIs -----------------------------------------------------------------------------

    def _api_18(self, request: Any, response: Any, version: int) -> Any:
        return response(error_code=NONE, api_keys=self._api_keys(version), throttle_time_ms=0)

    def _api_17(self, request: Any, response: Any, version: int) -> Any:
        error = NONE if request.mechanism == "PLAIN" else UNSUPPORTED_SASL_MECHANISM
        return response(error_code=error, mechanisms=["PLAIN"])

    def _api_36(self, request: Any, response: Any, version: int) -> Any:
        parts = bytes(request.auth_bytes).split(b"\0")
        users = self.users or {}
        ok = len(parts) == 3 and users.get(parts[1].decode()) == parts[2].decode()
        if ok:
            return response(error_code=NONE, error_message=None, auth_bytes=b"", session_lifetime_ms=0)
        return response(
            error_code=SASL_AUTHENTICATION_FAILED,
            error_message="Authentication failed: Invalid username or password",
            auth_bytes=b"",
            session_lifetime_ms=0,
        )

    def _api_3(self, request: Any, response: Any, version: int) -> Any:
        wanted = None if request.topics is None else [topic.name for topic in request.topics]
        create = version < 4 or request.allow_auto_topic_creation
        names = list(self.topics) if wanted is None else wanted
        topics = []
        for name in names:
            partition = self._topic(name, create)
            if name in FORBIDDEN_TOPICS:
                error = TOPIC_AUTHORIZATION_FAILED
            else:
                error = NONE if partition is not None else UNKNOWN_TOPIC_OR_PARTITION
            partitions = []
            if partition is not None:
                partitions = [
                    response.MetadataResponseTopic.MetadataResponsePartition(
                        error_code=NONE,
                        partition_index=0,
                        leader_id=NODE_ID,
                        leader_epoch=0,
                        replica_nodes=[NODE_ID],
                        isr_nodes=[NODE_ID],
                        offline_replicas=[],
                    )
                ]
            topics.append(
                response.MetadataResponseTopic(
                    error_code=error,
                    name=name,
                    topic_id=self.topic_ids.get(name, uuid.UUID(int=0)),
                    is_internal=False,
                    partitions=partitions,
                )
            )
        broker = response.MetadataResponseBroker(node_id=NODE_ID, host=self.host, port=self.advertised_port, rack=None)
        return response(
            throttle_time_ms=0,
            brokers=[broker],
            cluster_id=CLUSTER_ID,
            controller_id=NODE_ID,
            topics=topics,
        )

    def _api_0(self, request: Any, response: Any, version: int) -> Any:
        results = []
        for topic in request.topic_data:
            partitions = []
            for data in topic.partition_data:
                log = self._topic(topic.name) if data.index == 0 else None
                error = NONE if log is not None else UNKNOWN_TOPIC_OR_PARTITION
                base = -1
                if log is not None and data.records:
                    base = log.end
                    self._append(log, bytes(data.records))
                partitions.append(
                    response.TopicProduceResponse.PartitionProduceResponse(
                        index=data.index, error_code=error, base_offset=base, log_append_time_ms=-1, log_start_offset=0
                    )
                )
            results.append(response.TopicProduceResponse(name=topic.name, partition_responses=partitions))
        if self._produced is not None:
            self._produced.set()
            self._produced = asyncio.Event()
        if request.acks == 0:
            return None
        return response(responses=results, throttle_time_ms=0)

    @staticmethod
    def _append(log: Partition, records: bytes) -> None:
        position = 0
        while position + 61 <= len(records):
            length = struct.unpack_from(">i", records, position + 8)[0]
            batch = bytearray(records[position : position + 12 + length])
            last_delta = struct.unpack_from(">i", batch, 23)[0]
            struct.pack_into(">q", batch, 0, log.end)  # the base offset is not under the CRC
            log.batches.append(bytes(batch))
            log.offsets.append(log.end)
            log.end += last_delta + 1
            position += 12 + length

    async def _api_1(self, request: Any, response: Any, version: int) -> Any:
        def collect() -> tuple[list[Any], int]:
            topics = []
            total = 0
            for topic in request.topics:
                log = self.topics.get(topic.topic)
                partitions = []
                for wanted in topic.partitions:
                    records = b""
                    error = UNKNOWN_TOPIC_OR_PARTITION if log is None or wanted.partition != 0 else NONE
                    if log is not None and not error:
                        chosen = [
                            batch
                            for batch, after in zip(log.batches, [*log.offsets[1:], log.end], strict=True)
                            if after > wanted.fetch_offset
                        ]
                        records = b"".join(chosen)[: max(wanted.partition_max_bytes, 0)]
                        total += len(records)
                    partitions.append(
                        response.FetchableTopicResponse.PartitionData(
                            partition_index=wanted.partition,
                            error_code=error,
                            high_watermark=log.end if log is not None else -1,
                            last_stable_offset=log.end if log is not None else -1,
                            log_start_offset=0,
                            aborted_transactions=None,
                            preferred_read_replica=-1,
                            records=records,
                        )
                    )
                topics.append(response.FetchableTopicResponse(topic=topic.topic, partitions=partitions))
            return topics, total

        topics, total = collect()
        if not total and request.max_wait_ms > 0 and self._produced is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._produced.wait(), min(request.max_wait_ms, MAX_WAIT_MS) / 1000)
            topics, total = collect()
        return response(throttle_time_ms=0, error_code=NONE, session_id=0, responses=topics)

    def _api_2(self, request: Any, response: Any, version: int) -> Any:
        topics = []
        for topic in request.topics:
            log = self.topics.get(topic.name)
            partitions = []
            for wanted in topic.partitions:
                error = NONE if log is not None and wanted.partition_index == 0 else UNKNOWN_TOPIC_OR_PARTITION
                offset = -1 if error else (0 if wanted.timestamp == -2 else log.end if log is not None else -1)
                partitions.append(
                    response.ListOffsetsTopicResponse.ListOffsetsPartitionResponse(
                        partition_index=wanted.partition_index,
                        error_code=error,
                        old_style_offsets=[offset],
                        timestamp=-1,
                        offset=offset,
                        leader_epoch=0,
                    )
                )
            topics.append(response.ListOffsetsTopicResponse(name=topic.name, partitions=partitions))
        return response(throttle_time_ms=0, topics=topics)

    def _api_10(self, request: Any, response: Any, version: int) -> Any:
        if version >= 4:
            coordinators = [
                response.Coordinator(
                    key=key, node_id=NODE_ID, host=self.host, port=self.advertised_port, error_code=NONE
                )
                for key in request.coordinator_keys
            ]
            return response(throttle_time_ms=0, coordinators=coordinators)
        return response(
            throttle_time_ms=0,
            error_code=NONE,
            error_message=None,
            node_id=NODE_ID,
            host=self.host,
            port=self.advertised_port,
        )

    def _api_11(self, request: Any, response: Any, version: int) -> Any:
        group = self.groups.setdefault(request.group_id, Group())
        member_id = request.member_id
        if not member_id and version >= 4:
            return response(
                throttle_time_ms=0,
                error_code=MEMBER_ID_REQUIRED,
                generation_id=-1,
                protocol_name=None if version >= 7 else "",
                leader="",
                member_id=f"member-{uuid.uuid4()}",
                members=[],
            )
        if not member_id:
            member_id = f"member-{uuid.uuid4()}"
        protocol = request.protocols[0]
        group.members = {member_id: bytes(protocol.metadata)}
        group.generation += 1
        group.protocol = protocol.name
        members = [
            response.JoinGroupResponseMember(member_id=member, group_instance_id=None, metadata=metadata)
            for member, metadata in group.members.items()
        ]
        return response(
            throttle_time_ms=0,
            error_code=NONE,
            generation_id=group.generation,
            protocol_type=request.protocol_type,
            protocol_name=group.protocol,
            leader=member_id,
            skip_assignment=False,
            member_id=member_id,
            members=members,
        )

    def _api_14(self, request: Any, response: Any, version: int) -> Any:
        group = self.groups.setdefault(request.group_id, Group())
        for assignment in request.assignments:
            group.assignments[assignment.member_id] = bytes(assignment.assignment)
        error = NONE if request.member_id in group.members else UNKNOWN_MEMBER_ID
        return response(
            throttle_time_ms=0,
            error_code=error,
            protocol_type="consumer",
            protocol_name=group.protocol,
            assignment=group.assignments.get(request.member_id, b""),
        )

    def _api_12(self, request: Any, response: Any, version: int) -> Any:
        group = self.groups.get(request.group_id)
        error = NONE if group is not None and request.member_id in group.members else UNKNOWN_MEMBER_ID
        return response(throttle_time_ms=0, error_code=error)

    def _api_13(self, request: Any, response: Any, version: int) -> Any:
        group = self.groups.get(request.group_id)
        leaving = [request.member_id] if version < 3 else [member.member_id for member in request.members]
        members = []
        for member in leaving:
            known = group is not None and group.members.pop(member, None) is not None
            members.append(
                response.MemberResponse(
                    member_id=member, group_instance_id=None, error_code=NONE if known else UNKNOWN_MEMBER_ID
                )
            )
        return response(throttle_time_ms=0, error_code=NONE, members=members)

    def _api_8(self, request: Any, response: Any, version: int) -> Any:
        group = self.groups.setdefault(request.group_id, Group())
        topics = []
        for topic in request.topics:
            partitions = []
            for partition in topic.partitions:
                group.offsets[(topic.name, partition.partition_index)] = partition.committed_offset
                partitions.append(
                    response.OffsetCommitResponseTopic.OffsetCommitResponsePartition(
                        partition_index=partition.partition_index, error_code=NONE
                    )
                )
            topics.append(response.OffsetCommitResponseTopic(name=topic.name, partitions=partitions))
        return response(throttle_time_ms=0, topics=topics)

    def _api_9(self, request: Any, response: Any, version: int) -> Any:
        def partitions_of(group: Group, name: str, indexes: list[int], kind: Any) -> list[Any]:
            return [
                kind(
                    partition_index=index,
                    committed_offset=group.offsets.get((name, index), -1),
                    committed_leader_epoch=-1,
                    metadata="",
                    error_code=NONE,
                )
                for index in indexes
            ]

        if version >= 8:
            groups = []
            for wanted in request.groups:
                group = self.groups.setdefault(wanted.group_id, Group())
                kind = response.OffsetFetchResponseGroup.OffsetFetchResponseTopics
                topics = [
                    kind(
                        name=topic.name,
                        partitions=partitions_of(
                            group, topic.name, list(topic.partition_indexes), kind.OffsetFetchResponsePartitions
                        ),
                    )
                    for topic in wanted.topics or []
                ]
                groups.append(
                    response.OffsetFetchResponseGroup(group_id=wanted.group_id, topics=topics, error_code=NONE)
                )
            return response(throttle_time_ms=0, groups=groups)
        group = self.groups.setdefault(request.group_id, Group())
        kind = response.OffsetFetchResponseTopic
        topics = [
            kind(
                name=topic.name,
                partitions=partitions_of(
                    group, topic.name, list(topic.partition_indexes), kind.OffsetFetchResponsePartition
                ),
            )
            for topic in request.topics or []
        ]
        return response(throttle_time_ms=0, topics=topics, error_code=NONE)

    def _api_22(self, request: Any, response: Any, version: int) -> Any:
        return response(throttle_time_ms=0, error_code=NONE, producer_id=1000, producer_epoch=0)

    def _api_19(self, request: Any, response: Any, version: int) -> Any:
        results = []
        for topic in request.topics:
            exists = topic.name in self.topics
            error = (
                TOPIC_ALREADY_EXISTS
                if exists
                else TOPIC_AUTHORIZATION_FAILED
                if topic.name in FORBIDDEN_TOPICS
                else NONE
            )
            if not error:
                self._topic(topic.name)
            results.append(
                response.CreatableTopicResult(
                    name=topic.name,
                    topic_id=self.topic_ids.get(topic.name, uuid.UUID(int=0)),
                    error_code=error,
                    error_message=None,
                    num_partitions=1,
                    replication_factor=1,
                    configs=[],
                )
            )
        return response(throttle_time_ms=0, topics=results)

    def _api_20(self, request: Any, response: Any, version: int) -> Any:
        names = [topic.name for topic in request.topics] if version >= 6 else list(request.topic_names)
        results = []
        for name in names:
            error = NONE if self.topics.pop(name, None) is not None else UNKNOWN_TOPIC_OR_PARTITION
            results.append(
                response.DeletableTopicResult(
                    name=name, topic_id=self.topic_ids.pop(name, uuid.UUID(int=0)), error_code=error, error_message=None
                )
            )
        return response(throttle_time_ms=0, responses=results)
