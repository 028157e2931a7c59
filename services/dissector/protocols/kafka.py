"""Kafka: every request paired with its response by correlation id, sans-IO.

Framing: every Kafka message, either way, is a 4-byte big-endian size and that many bytes. A
request starts with its header (api key, api version, correlation id, client id and, in flexible
versions, tagged fields); a response starts with the correlation id of the request it answers
(and tagged fields in flexible versions). Which header version a message uses follows from the
API and its version (KIP-482): request header v2 and response header v1 from the API's first
flexible version on, request header v1 and response header v0 before it; ControlledShutdown v0
uses request header v0 (no client id) and an ApiVersions response always uses response header v0
(so a client can read it whatever version it asked). Those first flexible versions, the newest
version of each API and the error names are the tables below, transcribed from Kafka's message
definitions (apache/kafka `clients/src/main/resources/common/message/*Request.json`,
`validVersions` and `flexibleVersions`) and `clients/src/main/java/org/apache/kafka/common/
protocol/Errors.java`, at commit 1eb7644349cb07139d6a3c1ad1986979647cac99 (October 2024: api
keys 0-87), and for the versions Kafka 4.1 added since (Produce 12-13, Fetch 18, Metadata 13,
OffsetCommit and OffsetFetch 10, ..., and key 74's new name ListConfigResources) from the copy of
those definitions that kafka-python 3.0.12 ships (`kafka/protocol/schemas/resources/`, 55 of
the APIs). Keys Kafka added after 87 are named `ApiKey<n>`. Kafka headers and the few fields
Trawl reports are small enough to decode directly
(../shared/DESIGN.md); kafka-python's protocol classes, which decode whole messages into Python
objects, are the tests' encoder and oracle (tests/kafka_broker.py, tests/unit/test_kafka.py).

Bodies: for Produce, Fetch, ListOffsets, Metadata, OffsetCommit, OffsetFetch, FindCoordinator,
JoinGroup, SyncGroup, Heartbeat, LeaveGroup, ApiVersions, CreateTopics, DeleteTopics,
InitProducerId, SaslHandshake and SaslAuthenticate, the layout of every version of the request
and the response is written below as a small schema (`_SCHEMAS`: a field's role, its type and the
versions that carry it, as in the JSON definitions), read by one walker that knows the wire types
(int16-prefixed strings and int32-prefixed arrays, or their compact uvarint forms and the tagged
fields that end each structure in flexible versions). It collects the topics (names, or ids in
Fetch v13+, Produce v13+, OffsetCommit/OffsetFetch v10+, which a Metadata response seen on the
connection maps back to names; an id never seen stays as its UUID text), the partition
indexes, the group id, the acks of a Produce, the SASL mechanism, and every error code. Record
batches (magic 2) in Produce requests and Fetch responses are counted from their 61-byte headers:
records, bytes and the compression codec from the attributes; nothing is decompressed. Legacy
message sets (magic 0 and 1) count one record per wrapper message.

A version newer than the table knows, or an API key Trawl has no schema for, is still framed,
paired and named: the body is not read (note `unknown-version`, or no note for an API whose body
Trawl does not describe). A body that does not match its schema (bytes cut by the frame bound, a
broker bug) keeps the header's facts and gets the note `body-not-decoded`. Only framing that
cannot be Kafka (a negative size or one beyond Kafka's own 100 MiB request bound) is a
`ProtocolError`.

Summary triple: `method` = API name, `path` = the topics, comma-joined and bounded (for APIs
without topics, the group id or the coordinator key), `status` = the error name (`NONE` for 0):
the response's top-level error if it has one and it is not 0, else its first non-zero error of a
topic, partition or member. Any error but NONE makes the outcome `error`.

A Produce with acks=0 gets no response: it is reported as soon as it is read, as a one-way
message (`one_way` in the detail and the note `one-way`, outcome ok, no status), never as a
timeout.

Secrets: SaslAuthenticate's auth bytes (SASL/PLAIN's password, SCRAM's proofs) are never read
into a call; after a SaslHandshake v0 the raw SASL tokens that follow (not Kafka requests) are
skipped and counted (`kafka_sasl_tokens`).

Bounds and counts (added to the dissector's counters through `counts`): at most
`ParserLimits.max_pending_requests` requests wait for a response (the oldest becomes a
`no_response` call with the note `pending-limit`, counted `kafka_pending_limit`); a frame larger
than `ParserLimits.max_body_bytes` keeps its first `max_body_bytes` bytes for decoding (the
header, the topics and usually the first batches) and its remaining bytes are skipped unbuffered
(counted `kafka_frames_truncated`, note `truncated`); a frame whose header cannot be read is
skipped (`kafka_malformed_frames`); a response to no pending request is skipped
(`kafka_unmatched_responses`). After a capture gap a direction is resynchronised at the first
chunk that starts with a plausible frame.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

from trawl.dissector.calls import OUTCOME_OK, finish_call, new_call
from trawl.dissector.protocols.base import (
    Direction,
    FlowInfo,
    NotAtBoundary,
    ParserLimits,
    ProtocolError,
    ProtocolSpec,
    StreamParser,
)
from trawl.v1.calls_pb2 import ApiCall

PROTOCOL = "kafka"
KAFKA_PORTS = frozenset({9092})
# Kafka brokers refuse a request larger than socket.request.max.bytes (100 MiB by default); a
# size beyond it, either way, is not Kafka framing.
MAX_FRAME_SIZE = 100 * 1024 * 1024
MAX_PATH = 256  # characters of `path`
MAX_TOPICS = 64  # topic names kept in a call's detail
MAX_PARTITIONS = 256  # partition indexes kept in a call's detail
MAX_TOPIC_IDS = 1024  # topic id -> name pairs a connection remembers (topics named by id)
MAX_CLIENT_ID = 256

# api key -> (name, newest version, first flexible version or None), from the message
# definitions cited in the module docstring (tests/unit/test_kafka_schemas.py compares them with
# kafka-python's copy).
APIS: dict[int, tuple[str, int, int | None]] = {
    0: ("Produce", 13, 9),
    1: ("Fetch", 18, 12),
    2: ("ListOffsets", 11, 6),
    3: ("Metadata", 13, 9),
    4: ("LeaderAndIsr", 7, 4),
    5: ("StopReplica", 4, 2),
    6: ("UpdateMetadata", 8, 6),
    7: ("ControlledShutdown", 3, 3),
    8: ("OffsetCommit", 10, 8),
    9: ("OffsetFetch", 10, 6),
    10: ("FindCoordinator", 6, 3),
    11: ("JoinGroup", 9, 6),
    12: ("Heartbeat", 4, 4),
    13: ("LeaveGroup", 5, 4),
    14: ("SyncGroup", 5, 4),
    15: ("DescribeGroups", 6, 5),
    16: ("ListGroups", 5, 3),
    17: ("SaslHandshake", 1, None),
    18: ("ApiVersions", 4, 3),
    19: ("CreateTopics", 7, 5),
    20: ("DeleteTopics", 6, 4),
    21: ("DeleteRecords", 2, 2),
    22: ("InitProducerId", 6, 2),
    23: ("OffsetForLeaderEpoch", 4, 4),
    24: ("AddPartitionsToTxn", 5, 3),
    25: ("AddOffsetsToTxn", 4, 3),
    26: ("EndTxn", 5, 3),
    27: ("WriteTxnMarkers", 2, 1),
    28: ("TxnOffsetCommit", 5, 3),
    29: ("DescribeAcls", 3, 2),
    30: ("CreateAcls", 3, 2),
    31: ("DeleteAcls", 3, 2),
    32: ("DescribeConfigs", 4, 4),
    33: ("AlterConfigs", 2, 2),
    34: ("AlterReplicaLogDirs", 2, 2),
    35: ("DescribeLogDirs", 5, 2),
    36: ("SaslAuthenticate", 2, 2),
    37: ("CreatePartitions", 3, 2),
    38: ("CreateDelegationToken", 3, 2),
    39: ("RenewDelegationToken", 2, 2),
    40: ("ExpireDelegationToken", 2, 2),
    41: ("DescribeDelegationToken", 3, 2),
    42: ("DeleteGroups", 2, 2),
    43: ("ElectLeaders", 2, 2),
    44: ("IncrementalAlterConfigs", 1, 1),
    45: ("AlterPartitionReassignments", 1, 0),
    46: ("ListPartitionReassignments", 0, 0),
    47: ("OffsetDelete", 0, None),
    48: ("DescribeClientQuotas", 1, 1),
    49: ("AlterClientQuotas", 1, 1),
    50: ("DescribeUserScramCredentials", 0, 0),
    51: ("AlterUserScramCredentials", 0, 0),
    52: ("Vote", 1, 0),
    53: ("BeginQuorumEpoch", 1, 1),
    54: ("EndQuorumEpoch", 1, 1),
    55: ("DescribeQuorum", 2, 0),
    56: ("AlterPartition", 3, 0),
    57: ("UpdateFeatures", 2, 0),
    58: ("Envelope", 0, 0),
    59: ("FetchSnapshot", 1, 0),
    60: ("DescribeCluster", 2, 0),
    61: ("DescribeProducers", 0, 0),
    62: ("BrokerRegistration", 4, 0),
    63: ("BrokerHeartbeat", 1, 0),
    64: ("UnregisterBroker", 0, 0),
    65: ("DescribeTransactions", 0, 0),
    66: ("ListTransactions", 2, 0),
    67: ("AllocateProducerIds", 0, 0),
    68: ("ConsumerGroupHeartbeat", 1, 0),
    69: ("ConsumerGroupDescribe", 0, 0),
    70: ("ControllerRegistration", 0, 0),
    71: ("GetTelemetrySubscriptions", 0, 0),
    72: ("PushTelemetry", 0, 0),
    73: ("AssignReplicasToDirs", 0, 0),
    74: ("ListConfigResources", 1, 0),
    75: ("DescribeTopicPartitions", 0, 0),
    76: ("ShareGroupHeartbeat", 0, 0),
    77: ("ShareGroupDescribe", 0, 0),
    78: ("ShareFetch", 0, 0),
    79: ("ShareAcknowledge", 0, 0),
    80: ("AddRaftVoter", 0, 0),
    81: ("RemoveRaftVoter", 0, 0),
    82: ("UpdateRaftVoter", 0, 0),
    83: ("InitializeShareGroupState", 0, 0),
    84: ("ReadShareGroupState", 0, 0),
    85: ("WriteShareGroupState", 0, 0),
    86: ("DeleteShareGroupState", 0, 0),
    87: ("ReadShareGroupStateSummary", 0, 0),
}
PRODUCE, FETCH, METADATA, CONTROLLED_SHUTDOWN, SASL_HANDSHAKE, API_VERSIONS = 0, 1, 3, 7, 17, 18

# Error code -> name, from Errors.java (cited in the module docstring).
ERRORS: dict[int, str] = {
    -1: "UNKNOWN_SERVER_ERROR",
    0: "NONE",
    1: "OFFSET_OUT_OF_RANGE",
    2: "CORRUPT_MESSAGE",
    3: "UNKNOWN_TOPIC_OR_PARTITION",
    4: "INVALID_FETCH_SIZE",
    5: "LEADER_NOT_AVAILABLE",
    6: "NOT_LEADER_OR_FOLLOWER",
    7: "REQUEST_TIMED_OUT",
    8: "BROKER_NOT_AVAILABLE",
    9: "REPLICA_NOT_AVAILABLE",
    10: "MESSAGE_TOO_LARGE",
    11: "STALE_CONTROLLER_EPOCH",
    12: "OFFSET_METADATA_TOO_LARGE",
    13: "NETWORK_EXCEPTION",
    14: "COORDINATOR_LOAD_IN_PROGRESS",
    15: "COORDINATOR_NOT_AVAILABLE",
    16: "NOT_COORDINATOR",
    17: "INVALID_TOPIC_EXCEPTION",
    18: "RECORD_LIST_TOO_LARGE",
    19: "NOT_ENOUGH_REPLICAS",
    20: "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
    21: "INVALID_REQUIRED_ACKS",
    22: "ILLEGAL_GENERATION",
    23: "INCONSISTENT_GROUP_PROTOCOL",
    24: "INVALID_GROUP_ID",
    25: "UNKNOWN_MEMBER_ID",
    26: "INVALID_SESSION_TIMEOUT",
    27: "REBALANCE_IN_PROGRESS",
    28: "INVALID_COMMIT_OFFSET_SIZE",
    29: "TOPIC_AUTHORIZATION_FAILED",
    30: "GROUP_AUTHORIZATION_FAILED",
    31: "CLUSTER_AUTHORIZATION_FAILED",
    32: "INVALID_TIMESTAMP",
    33: "UNSUPPORTED_SASL_MECHANISM",
    34: "ILLEGAL_SASL_STATE",
    35: "UNSUPPORTED_VERSION",
    36: "TOPIC_ALREADY_EXISTS",
    37: "INVALID_PARTITIONS",
    38: "INVALID_REPLICATION_FACTOR",
    39: "INVALID_REPLICA_ASSIGNMENT",
    40: "INVALID_CONFIG",
    41: "NOT_CONTROLLER",
    42: "INVALID_REQUEST",
    43: "UNSUPPORTED_FOR_MESSAGE_FORMAT",
    44: "POLICY_VIOLATION",
    45: "OUT_OF_ORDER_SEQUENCE_NUMBER",
    46: "DUPLICATE_SEQUENCE_NUMBER",
    47: "INVALID_PRODUCER_EPOCH",
    48: "INVALID_TXN_STATE",
    49: "INVALID_PRODUCER_ID_MAPPING",
    50: "INVALID_TRANSACTION_TIMEOUT",
    51: "CONCURRENT_TRANSACTIONS",
    52: "TRANSACTION_COORDINATOR_FENCED",
    53: "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    54: "SECURITY_DISABLED",
    55: "OPERATION_NOT_ATTEMPTED",
    56: "KAFKA_STORAGE_ERROR",
    57: "LOG_DIR_NOT_FOUND",
    58: "SASL_AUTHENTICATION_FAILED",
    59: "UNKNOWN_PRODUCER_ID",
    60: "REASSIGNMENT_IN_PROGRESS",
    61: "DELEGATION_TOKEN_AUTH_DISABLED",
    62: "DELEGATION_TOKEN_NOT_FOUND",
    63: "DELEGATION_TOKEN_OWNER_MISMATCH",
    64: "DELEGATION_TOKEN_REQUEST_NOT_ALLOWED",
    65: "DELEGATION_TOKEN_AUTHORIZATION_FAILED",
    66: "DELEGATION_TOKEN_EXPIRED",
    67: "INVALID_PRINCIPAL_TYPE",
    68: "NON_EMPTY_GROUP",
    69: "GROUP_ID_NOT_FOUND",
    70: "FETCH_SESSION_ID_NOT_FOUND",
    71: "INVALID_FETCH_SESSION_EPOCH",
    72: "LISTENER_NOT_FOUND",
    73: "TOPIC_DELETION_DISABLED",
    74: "FENCED_LEADER_EPOCH",
    75: "UNKNOWN_LEADER_EPOCH",
    76: "UNSUPPORTED_COMPRESSION_TYPE",
    77: "STALE_BROKER_EPOCH",
    78: "OFFSET_NOT_AVAILABLE",
    79: "MEMBER_ID_REQUIRED",
    80: "PREFERRED_LEADER_NOT_AVAILABLE",
    81: "GROUP_MAX_SIZE_REACHED",
    82: "FENCED_INSTANCE_ID",
    83: "ELIGIBLE_LEADERS_NOT_AVAILABLE",
    84: "ELECTION_NOT_NEEDED",
    85: "NO_REASSIGNMENT_IN_PROGRESS",
    86: "GROUP_SUBSCRIBED_TO_TOPIC",
    87: "INVALID_RECORD",
    88: "UNSTABLE_OFFSET_COMMIT",
    89: "THROTTLING_QUOTA_EXCEEDED",
    90: "PRODUCER_FENCED",
    91: "RESOURCE_NOT_FOUND",
    92: "DUPLICATE_RESOURCE",
    93: "UNACCEPTABLE_CREDENTIAL",
    94: "INCONSISTENT_VOTER_SET",
    95: "INVALID_UPDATE_VERSION",
    96: "FEATURE_UPDATE_FAILED",
    97: "PRINCIPAL_DESERIALIZATION_FAILURE",
    98: "SNAPSHOT_NOT_FOUND",
    99: "POSITION_OUT_OF_RANGE",
    100: "UNKNOWN_TOPIC_ID",
    101: "DUPLICATE_BROKER_REGISTRATION",
    102: "BROKER_ID_NOT_REGISTERED",
    103: "INCONSISTENT_TOPIC_ID",
    104: "INCONSISTENT_CLUSTER_ID",
    105: "TRANSACTIONAL_ID_NOT_FOUND",
    106: "FETCH_SESSION_TOPIC_ID_ERROR",
    107: "INELIGIBLE_REPLICA",
    108: "NEW_LEADER_ELECTED",
    109: "OFFSET_MOVED_TO_TIERED_STORAGE",
    110: "FENCED_MEMBER_EPOCH",
    111: "UNRELEASED_INSTANCE_ID",
    112: "UNSUPPORTED_ASSIGNOR",
    113: "STALE_MEMBER_EPOCH",
    114: "MISMATCHED_ENDPOINT_TYPE",
    115: "UNSUPPORTED_ENDPOINT_TYPE",
    116: "UNKNOWN_CONTROLLER_ID",
    117: "UNKNOWN_SUBSCRIPTION_ID",
    118: "TELEMETRY_TOO_LARGE",
    119: "INVALID_REGISTRATION",
    120: "TRANSACTION_ABORTABLE",
    121: "INVALID_RECORD_STATE",
    122: "SHARE_SESSION_NOT_FOUND",
    123: "INVALID_SHARE_SESSION_EPOCH",
    124: "FENCED_STATE_EPOCH",
    125: "INVALID_VOTER_KEY",
    126: "DUPLICATE_VOTER",
    127: "VOTER_NOT_FOUND",
    128: "INVALID_REGULAR_EXPRESSION",
}
COMPRESSION = ("none", "gzip", "snappy", "lz4", "zstd")


def api_name(api_key: int) -> str:
    entry = APIS.get(api_key)
    return entry[0] if entry is not None else f"ApiKey{api_key}"


def error_name(code: int) -> str:
    return ERRORS.get(code) or f"ERROR_{code}"


def flexible(api_key: int, api_version: int) -> bool:
    """The request (and response) of this API version use flexible encodings and headers."""
    entry = APIS.get(api_key)
    if entry is None:
        return False
    first = entry[2]
    return first is not None and api_version >= first


def request_header_version(api_key: int, api_version: int) -> int:
    if api_key == CONTROLLED_SHUTDOWN and api_version == 0:
        return 0
    return 2 if flexible(api_key, api_version) else 1


def response_header_version(api_key: int, api_version: int) -> int:
    if api_key == API_VERSIONS:
        return 0
    return 1 if flexible(api_key, api_version) else 0


# -- body schemas -----------------------------------------------------------------------------
#
# A field is (kind, first version, last version, children). Kinds name the wire type and, for
# what a call reports, the role: "topic" is a string that names a topic, "error" an int16 error
# code, "[]" an array of structures (children), "[]topic" an array of topic-name strings, and so
# on. Fields that are tagged in the JSON definitions are not listed: the tagged-field section of
# each flexible structure is skipped whole.

_Field = tuple[str, int, int, tuple["_Field", ...]]
_ANY = 999


def _f(kind: str, versions: str, *children: _Field) -> _Field:
    """A field present in `versions`, written as the JSON definitions write them ("0+", "3-7", "5")."""
    first, dash, last = versions.partition("-")
    if first.endswith("+"):
        return (kind, int(first[:-1]), _ANY, children)
    return (kind, int(first), int(last) if dash else int(first), children)


_T = _f  # shorter in the tables below

_PRODUCE_REQUEST = (
    _T("str", "3+"),  # TransactionalId
    _T("acks", "0+"),
    _T("i32", "0+"),  # TimeoutMs
    _T(
        "[]",
        "0+",
        _T("topic", "0-12"),
        _T("topic_id", "13+"),
        _T("[]", "0+", _T("partition", "0+"), _T("records", "0+")),
    ),
)
_PRODUCE_RESPONSE = (
    _T(
        "[]",
        "0+",
        _T("topic", "0-12"),
        _T("topic_id", "13+"),
        _T(
            "[]",
            "0+",
            _T("partition", "0+"),
            _T("error", "0+"),
            _T("i64", "0+"),  # BaseOffset
            _T("i64", "2+"),  # LogAppendTimeMs
            _T("i64", "5+"),  # LogStartOffset
            _T("[]", "8+", _T("i32", "8+"), _T("str", "8+")),  # RecordErrors
            _T("str", "8+"),  # ErrorMessage
        ),
    ),
    _T("i32", "1+"),  # ThrottleTimeMs
)
_FETCH_REQUEST = (
    _T("i32", "0-14"),  # ReplicaId
    _T("i32", "0+"),  # MaxWaitMs
    _T("i32", "0+"),  # MinBytes
    _T("i32", "3+"),  # MaxBytes
    _T("i8", "4+"),  # IsolationLevel
    _T("i32", "7+"),  # SessionId
    _T("i32", "7+"),  # SessionEpoch
    _T(
        "[]",
        "0+",
        _T("topic", "0-12"),
        _T("topic_id", "13+"),
        _T(
            "[]",
            "0+",
            _T("partition", "0+"),
            _T("i32", "9+"),  # CurrentLeaderEpoch
            _T("i64", "0+"),  # FetchOffset
            _T("i32", "12+"),  # LastFetchedEpoch
            _T("i64", "5+"),  # LogStartOffset
            _T("i32", "0+"),  # PartitionMaxBytes
        ),
    ),
    _T("[]", "7+", _T("str", "7-12"), _T("uuid", "13+"), _T("[]i32", "7+")),  # ForgottenTopicsData
    _T("str", "11+"),  # RackId
)
_FETCH_RESPONSE = (
    _T("i32", "1+"),  # ThrottleTimeMs
    _T("error", "7+"),
    _T("i32", "7+"),  # SessionId
    _T(
        "[]",
        "0+",
        _T("topic", "0-12"),
        _T("topic_id", "13+"),
        _T(
            "[]",
            "0+",
            _T("partition", "0+"),
            _T("error", "0+"),
            _T("i64", "0+"),  # HighWatermark
            _T("i64", "4+"),  # LastStableOffset
            _T("i64", "5+"),  # LogStartOffset
            _T("[]", "4+", _T("i64", "4+"), _T("i64", "4+")),  # AbortedTransactions
            _T("i32", "11+"),  # PreferredReadReplica
            _T("records", "0+"),
        ),
    ),
)
_LIST_OFFSETS_REQUEST = (
    _T("i32", "0+"),  # ReplicaId
    _T("i8", "2+"),  # IsolationLevel
    _T(
        "[]",
        "0+",
        _T("topic", "0+"),
        _T(
            "[]",
            "0+",
            _T("partition", "0+"),
            _T("i32", "4+"),  # CurrentLeaderEpoch
            _T("i64", "0+"),  # Timestamp
            _T("i32", "0"),  # MaxNumOffsets
        ),
    ),
    _T("i32", "10+"),  # TimeoutMs
)
_LIST_OFFSETS_RESPONSE = (
    _T("i32", "2+"),  # ThrottleTimeMs
    _T(
        "[]",
        "0+",
        _T("topic", "0+"),
        _T(
            "[]",
            "0+",
            _T("partition", "0+"),
            _T("error", "0+"),
            _T("[]i64", "0"),  # OldStyleOffsets
            _T("i64", "1+"),  # Timestamp
            _T("i64", "1+"),  # Offset
            _T("i32", "4+"),  # LeaderEpoch
        ),
    ),
)
_METADATA_REQUEST = (
    _T("[]", "0+", _T("uuid", "10+"), _T("topic", "0+")),
    _T("bool", "4+"),  # AllowAutoTopicCreation
    _T("bool", "8-10"),  # IncludeClusterAuthorizedOperations
    _T("bool", "8+"),  # IncludeTopicAuthorizedOperations
)
_METADATA_RESPONSE = (
    _T("i32", "3+"),  # ThrottleTimeMs
    _T("[]", "0+", _T("i32", "0+"), _T("str", "0+"), _T("i32", "0+"), _T("str", "1+")),  # Brokers
    _T("str", "2+"),  # ClusterId
    _T("i32", "1+"),  # ControllerId
    _T(
        "[]",
        "0+",
        _T("error", "0+"),
        _T("topic", "0+"),
        _T("named_id", "10+"),  # TopicId: remembered with the name just read
        _T("bool", "1+"),  # IsInternal
        _T(
            "[]",
            "0+",
            _T("error", "0+"),
            _T("partition", "0+"),
            _T("i32", "0+"),  # LeaderId
            _T("i32", "7+"),  # LeaderEpoch
            _T("[]i32", "0+"),  # ReplicaNodes
            _T("[]i32", "0+"),  # IsrNodes
            _T("[]i32", "5+"),  # OfflineReplicas
        ),
        _T("i32", "8+"),  # TopicAuthorizedOperations
    ),
    _T("i32", "8-10"),  # ClusterAuthorizedOperations
    _T("error", "13+"),
)
_OFFSET_COMMIT_REQUEST = (
    _T("group", "0+"),
    _T("i32", "1+"),  # GenerationIdOrMemberEpoch
    _T("str", "1+"),  # MemberId
    _T("str", "7+"),  # GroupInstanceId
    _T("i64", "2-4"),  # RetentionTimeMs
    _T(
        "[]",
        "0+",
        _T("topic", "0-9"),
        _T("topic_id", "10+"),
        _T(
            "[]",
            "0+",
            _T("partition", "0+"),
            _T("i64", "0+"),  # CommittedOffset
            _T("i32", "6+"),  # CommittedLeaderEpoch
            _T("i64", "1"),  # CommitTimestamp
            _T("str", "0+"),  # CommittedMetadata
        ),
    ),
)
_OFFSET_COMMIT_RESPONSE = (
    _T("i32", "3+"),  # ThrottleTimeMs
    _T(
        "[]",
        "0+",
        _T("topic", "0-9"),
        _T("topic_id", "10+"),
        _T("[]", "0+", _T("partition", "0+"), _T("error", "0+")),
    ),
)
_OFFSET_FETCH_REQUEST = (
    _T("group", "0-7"),
    _T("[]", "0-7", _T("topic", "0-7"), _T("[]partition", "0-7")),
    _T(
        "[]",
        "8+",
        _T("group", "8+"),
        _T("str", "9+"),  # MemberId
        _T("i32", "9+"),  # MemberEpoch
        _T("[]", "8+", _T("topic", "8-9"), _T("topic_id", "10+"), _T("[]partition", "8+")),
    ),
    _T("bool", "7+"),  # RequireStable
)
_OFFSET_FETCH_PARTITION = (
    _T("partition", "0+"),
    _T("i64", "0+"),  # CommittedOffset
    _T("i32", "5+"),  # CommittedLeaderEpoch
    _T("str", "0+"),  # Metadata
    _T("error", "0+"),
)
_OFFSET_FETCH_RESPONSE = (
    _T("i32", "3+"),  # ThrottleTimeMs
    _T("[]", "0-7", _T("topic", "0-7"), _T("[]", "0-7", *_OFFSET_FETCH_PARTITION)),
    _T("error", "2-7"),
    _T(
        "[]",
        "8+",
        _T("group", "8+"),
        _T("[]", "8+", _T("topic", "8-9"), _T("topic_id", "10+"), _T("[]", "8+", *_OFFSET_FETCH_PARTITION)),
        _T("error", "8+"),
    ),
)
_FIND_COORDINATOR_REQUEST = (
    _T("key", "0-3"),
    _T("i8", "1+"),  # KeyType
    _T("[]key", "4+"),  # CoordinatorKeys
)
_FIND_COORDINATOR_RESPONSE = (
    _T("i32", "1+"),  # ThrottleTimeMs
    _T("error", "0-3"),
    _T("str", "1-3"),  # ErrorMessage
    _T("i32", "0-3"),  # NodeId
    _T("str", "0-3"),  # Host
    _T("i32", "0-3"),  # Port
    _T(
        "[]",
        "4+",
        _T("key", "4+"),
        _T("i32", "4+"),  # NodeId
        _T("str", "4+"),  # Host
        _T("i32", "4+"),  # Port
        _T("error", "4+"),
        _T("str", "4+"),  # ErrorMessage
    ),
)
_JOIN_GROUP_REQUEST = (
    _T("group", "0+"),
    _T("i32", "0+"),  # SessionTimeoutMs
    _T("i32", "1+"),  # RebalanceTimeoutMs
    _T("str", "0+"),  # MemberId
    _T("str", "5+"),  # GroupInstanceId
    _T("str", "0+"),  # ProtocolType
    _T("[]", "0+", _T("str", "0+"), _T("bytes", "0+")),  # Protocols
    _T("str", "8+"),  # Reason
)
_JOIN_GROUP_RESPONSE = (
    _T("i32", "2+"),  # ThrottleTimeMs
    _T("error", "0+"),
    _T("i32", "0+"),  # GenerationId
    _T("str", "7+"),  # ProtocolType
    _T("str", "0+"),  # ProtocolName
    _T("str", "0+"),  # Leader
    _T("bool", "9+"),  # SkipAssignment
    _T("str", "0+"),  # MemberId
    _T("[]", "0+", _T("str", "0+"), _T("str", "5+"), _T("bytes", "0+")),  # Members
)
_SYNC_GROUP_REQUEST = (
    _T("group", "0+"),
    _T("i32", "0+"),  # GenerationId
    _T("str", "0+"),  # MemberId
    _T("str", "3+"),  # GroupInstanceId
    _T("str", "5+"),  # ProtocolType
    _T("str", "5+"),  # ProtocolName
    _T("[]", "0+", _T("str", "0+"), _T("bytes", "0+")),  # Assignments
)
_SYNC_GROUP_RESPONSE = (
    _T("i32", "1+"),  # ThrottleTimeMs
    _T("error", "0+"),
    _T("str", "5+"),  # ProtocolType
    _T("str", "5+"),  # ProtocolName
    _T("bytes", "0+"),  # Assignment
)
_HEARTBEAT_REQUEST = (
    _T("group", "0+"),
    _T("i32", "0+"),  # GenerationId
    _T("str", "0+"),  # MemberId
    _T("str", "3+"),  # GroupInstanceId
)
_HEARTBEAT_RESPONSE = (_T("i32", "1+"), _T("error", "0+"))
_LEAVE_GROUP_REQUEST = (
    _T("group", "0+"),
    _T("str", "0-2"),  # MemberId
    _T("[]", "3+", _T("str", "3+"), _T("str", "3+"), _T("str", "5+")),  # Members
)
_LEAVE_GROUP_RESPONSE = (
    _T("i32", "1+"),  # ThrottleTimeMs
    _T("error", "0+"),
    _T("[]", "3+", _T("str", "3+"), _T("str", "3+"), _T("error", "3+")),  # Members
)
_API_VERSIONS_REQUEST = (_T("str", "3+"), _T("str", "3+"))  # ClientSoftwareName, ClientSoftwareVersion
_API_VERSIONS_RESPONSE = (
    _T("error", "0+"),
    _T("[]", "0+", _T("i16", "0+"), _T("i16", "0+"), _T("i16", "0+")),  # ApiKeys
    _T("i32", "1+"),  # ThrottleTimeMs
)
_CREATE_TOPICS_REQUEST = (
    _T(
        "[]",
        "0+",
        _T("topic", "0+"),
        _T("i32", "0+"),  # NumPartitions
        _T("i16", "0+"),  # ReplicationFactor
        _T("[]", "0+", _T("partition", "0+"), _T("[]i32", "0+")),  # Assignments
        _T("[]", "0+", _T("str", "0+"), _T("str", "0+")),  # Configs
    ),
    _T("i32", "0+"),  # timeoutMs
    _T("bool", "1+"),  # validateOnly
)
_CREATE_TOPICS_RESPONSE = (
    _T("i32", "2+"),  # ThrottleTimeMs
    _T(
        "[]",
        "0+",
        _T("topic", "0+"),
        _T("uuid", "7+"),  # TopicId
        _T("error", "0+"),
        _T("str", "1+"),  # ErrorMessage
        _T("i32", "5+"),  # NumPartitions
        _T("i16", "5+"),  # ReplicationFactor
        _T(
            "[]",
            "5+",
            _T("str", "5+"),
            _T("str", "5+"),
            _T("bool", "5+"),
            _T("i8", "5+"),
            _T("bool", "5+"),
        ),  # Configs
    ),
)
_DELETE_TOPICS_REQUEST = (
    _T("[]", "6+", _T("topic", "6+"), _T("topic_id", "6+")),
    _T("[]topic", "0-5"),
    _T("i32", "0+"),  # TimeoutMs
)
_DELETE_TOPICS_RESPONSE = (
    _T("i32", "1+"),  # ThrottleTimeMs
    _T("[]", "0+", _T("topic", "0+"), _T("uuid", "6+"), _T("error", "0+"), _T("str", "5+")),
)
_INIT_PRODUCER_ID_REQUEST = (
    _T("str", "0+"),  # TransactionalId
    _T("i32", "0+"),  # TransactionTimeoutMs
    _T("i64", "3+"),  # ProducerId
    _T("i16", "3+"),  # ProducerEpoch
    _T("bool", "6+"),  # Enable2Pc
    _T("bool", "6+"),  # KeepPreparedTxn
)
_INIT_PRODUCER_ID_RESPONSE = (
    _T("i32", "0+"),  # ThrottleTimeMs
    _T("error", "0+"),
    _T("i64", "0+"),  # ProducerId
    _T("i16", "0+"),  # ProducerEpoch
    _T("i64", "6+"),  # OngoingTxnProducerId
    _T("i16", "6+"),  # OngoingTxnProducerEpoch
)
_SASL_HANDSHAKE_REQUEST = (_T("mechanism", "0+"),)
_SASL_HANDSHAKE_RESPONSE = (_T("error", "0+"), _T("[]str", "0+"))
# The auth bytes are skipped unread (credentials: see the module docstring).
_SASL_AUTHENTICATE_REQUEST = (_T("bytes", "0+"),)
_SASL_AUTHENTICATE_RESPONSE = (_T("error", "0+"), _T("str", "0+"), _T("bytes", "0+"), _T("i64", "1+"))

# api key -> (request fields, response fields)
_SCHEMAS: dict[int, tuple[tuple[_Field, ...], tuple[_Field, ...]]] = {
    0: (_PRODUCE_REQUEST, _PRODUCE_RESPONSE),
    1: (_FETCH_REQUEST, _FETCH_RESPONSE),
    2: (_LIST_OFFSETS_REQUEST, _LIST_OFFSETS_RESPONSE),
    3: (_METADATA_REQUEST, _METADATA_RESPONSE),
    8: (_OFFSET_COMMIT_REQUEST, _OFFSET_COMMIT_RESPONSE),
    9: (_OFFSET_FETCH_REQUEST, _OFFSET_FETCH_RESPONSE),
    10: (_FIND_COORDINATOR_REQUEST, _FIND_COORDINATOR_RESPONSE),
    11: (_JOIN_GROUP_REQUEST, _JOIN_GROUP_RESPONSE),
    12: (_HEARTBEAT_REQUEST, _HEARTBEAT_RESPONSE),
    13: (_LEAVE_GROUP_REQUEST, _LEAVE_GROUP_RESPONSE),
    14: (_SYNC_GROUP_REQUEST, _SYNC_GROUP_RESPONSE),
    17: (_SASL_HANDSHAKE_REQUEST, _SASL_HANDSHAKE_RESPONSE),
    18: (_API_VERSIONS_REQUEST, _API_VERSIONS_RESPONSE),
    19: (_CREATE_TOPICS_REQUEST, _CREATE_TOPICS_RESPONSE),
    20: (_DELETE_TOPICS_REQUEST, _DELETE_TOPICS_RESPONSE),
    22: (_INIT_PRODUCER_ID_REQUEST, _INIT_PRODUCER_ID_RESPONSE),
    36: (_SASL_AUTHENTICATE_REQUEST, _SASL_AUTHENTICATE_RESPONSE),
}

# Operations of one version's layout: (op, children); compiled once per (api, version, side).
_OP_I8, _OP_I16, _OP_I32, _OP_I64, _OP_UUID, _OP_STR, _OP_BYTES, _OP_RECORDS = range(8)
_OP_STRUCTS, _OP_INTS, _OP_LONGS, _OP_STRS = range(8, 12)
_OP_TOPIC, _OP_TOPIC_ID, _OP_NAMED_ID, _OP_PARTITION, _OP_ERROR, _OP_GROUP, _OP_KEY = range(12, 19)
_OP_ACKS, _OP_MECHANISM, _OP_PARTITIONS, _OP_TOPICS, _OP_KEYS = range(19, 24)
_KINDS = {
    "i8": _OP_I8,
    "bool": _OP_I8,
    "i16": _OP_I16,
    "i32": _OP_I32,
    "i64": _OP_I64,
    "uuid": _OP_UUID,
    "str": _OP_STR,
    "bytes": _OP_BYTES,
    "records": _OP_RECORDS,
    "[]": _OP_STRUCTS,
    "[]i32": _OP_INTS,
    "[]i64": _OP_LONGS,
    "[]str": _OP_STRS,
    "topic": _OP_TOPIC,
    "topic_id": _OP_TOPIC_ID,
    "named_id": _OP_NAMED_ID,
    "partition": _OP_PARTITION,
    "error": _OP_ERROR,
    "group": _OP_GROUP,
    "key": _OP_KEY,
    "acks": _OP_ACKS,
    "mechanism": _OP_MECHANISM,
    "[]partition": _OP_PARTITIONS,
    "[]topic": _OP_TOPICS,
    "[]key": _OP_KEYS,
}
_Ops = tuple[tuple[int, "_Ops"], ...]
_COMPILED: dict[tuple[int, int, bool], _Ops] = {}


def _compile(fields: tuple[_Field, ...], version: int) -> _Ops:
    return tuple(
        (_KINDS[kind], _compile(children, version))
        for kind, first, last, children in fields
        if first <= version <= last
    )


def _ops(api_key: int, api_version: int, response: bool) -> _Ops | None:
    """The layout of one message, or None when Trawl has no schema for this API or version."""
    key = (api_key, api_version, response)
    ops = _COMPILED.get(key)
    if ops is None:
        schemas = _SCHEMAS.get(api_key)
        if schemas is None or api_version > APIS[api_key][1]:
            return None
        ops = _COMPILED[key] = _compile(schemas[1 if response else 0], api_version)
    return ops


# What the compiled lane (_express_kafka.h) is told of one API version, asked once per pair:
# (name, request header version, response header version, flexible, note, request layout,
# response layout); a layout is `_ops` flattened, three bytes per operation (the op, then how
# many operations its children take, big-endian), None where this module reads no body.
LaneApi = tuple[str, int, int, bool, str, bytes | None, bytes | None]
# SaslHandshake v0 turns the connection to raw SASL tokens (`sasl_tokens`): this parser's to follow.
LANE_REFUSED = frozenset({SASL_HANDSHAKE})


def lane_api(api_key: int, api_version: int) -> LaneApi | None:
    """How the compiled lane reads requests and responses of this API version exactly as
    KafkaParser does, or None when it must leave the connection to KafkaParser (LANE_REFUSED)."""
    if api_key in LANE_REFUSED:
        return None
    entry = APIS.get(api_key)
    note = "unknown-api-key" if entry is None else "unknown-version" if api_version > entry[1] else ""
    request = response = None
    if not note:
        request = _flat(_ops(api_key, api_version, False))
        response = _flat(_ops(api_key, api_version, True))
    return (
        api_name(api_key),
        request_header_version(api_key, api_version),
        response_header_version(api_key, api_version),
        flexible(api_key, api_version),
        note,
        request,
        response,
    )


def _flat(ops: _Ops | None) -> bytes | None:
    if ops is None:
        return None
    out = bytearray()

    def emit(level: _Ops) -> None:
        for op, children in level:
            at = len(out)
            out.extend(bytes(3))
            emit(children)
            out[at] = op
            out[at + 1 : at + 3] = ((len(out) - at) // 3 - 1).to_bytes(2, "big")

    emit(ops)
    return bytes(out)


class _Short(Exception):
    """The body does not match its layout (cut short, or a length beyond the frame)."""


_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_HEADER = struct.Struct(">hhi")
_BATCH = struct.Struct(">qi")  # baseOffset, batchLength
_ATTRIBUTES = struct.Struct(">h")
_NO_ID = bytes(16)  # the zero UUID: a topic id not given (the topic is named instead)


@dataclass(slots=True)
class Facts:
    """What one message's body told: the fields a call reports."""

    topics: list[str] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    error: int = 0
    error_depth: int = 99  # nesting of the error kept: a top-level error outranks a partition's
    group: str = ""
    key: str = ""
    acks: int | None = None
    mechanism: str = ""
    record_count: int = 0
    record_bytes: int = 0
    codecs: set[str] = field(default_factory=set)
    named_ids: list[tuple[str, str]] = field(default_factory=list)  # (topic id, name) from Metadata
    trailing: int = 0  # bytes after the last field the layout knows (a newer minor field, or damage)


def _uvarint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """An unsigned varint at data[pos:end] and the offset after it; _Short if cut or too long."""
    value = shift = 0
    while True:
        if pos >= end or shift > 28:
            raise _Short
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _skip_tags(data: bytes, pos: int, end: int) -> int:
    """The offset after a tagged-field section (KIP-482) starting at pos."""
    if pos < end and data[pos] == 0:  # no tagged field: nearly always
        return pos + 1
    count, pos = _uvarint(data, pos, end)
    for _ in range(count):
        _tag, pos = _uvarint(data, pos, end)
        size, pos = _uvarint(data, pos, end)
        pos += size
        if pos > end:
            raise _Short
    return pos


class _Walker:
    """Reads one body along its layout into a Facts; `_Short` when the bytes do not fit."""

    __slots__ = ("compact", "data", "end", "facts", "last_topic", "topic_names")

    def __init__(self, data: bytes, compact: bool, topic_names: dict[str, str]) -> None:
        self.data = data
        self.end = len(data)
        self.compact = compact
        self.facts = Facts()
        self.topic_names = topic_names
        self.last_topic = ""

    def uvarint(self, pos: int) -> tuple[int, int]:
        return _uvarint(self.data, pos, self.end)

    def length(self, pos: int, wide: bool) -> tuple[int, int]:
        """A string's, bytes' or array's length (-1 for null), in this encoding."""
        if self.compact:
            if pos < self.end and self.data[pos] < 0x80:  # the one-byte length of most fields
                return self.data[pos] - 1, pos + 1
            value, pos = _uvarint(self.data, pos, self.end)
            return value - 1, pos
        if wide:
            if pos + 4 > self.end:
                raise _Short
            return _I32.unpack_from(self.data, pos)[0], pos + 4
        if pos + 2 > self.end:
            raise _Short
        return _I16.unpack_from(self.data, pos)[0], pos + 2

    def string(self, pos: int) -> tuple[str | None, int]:
        size, pos = self.length(pos, False)
        if size < 0:
            return None, pos
        stop = pos + size
        if stop > self.end:
            raise _Short
        return self.data[pos:stop].decode("utf-8", "replace"), stop

    def skip_tags(self, pos: int) -> int:
        return _skip_tags(self.data, pos, self.end)

    def count(self, pos: int, item_size: int) -> tuple[int, int]:
        count, pos = self.length(pos, True)
        if count > (self.end - pos) // item_size:
            raise _Short  # more items than the bytes could hold
        return count, pos

    def walk(self, ops: _Ops, pos: int, depth: int) -> int:
        data = self.data
        facts = self.facts
        for op, children in ops:
            if op in (_OP_I32, _OP_PARTITION):
                if pos + 4 > self.end:
                    raise _Short
                if op == _OP_PARTITION and len(facts.partitions) < MAX_PARTITIONS:
                    index = _I32.unpack_from(data, pos)[0]
                    if index not in facts.partitions:
                        facts.partitions.append(index)
                pos += 4
            elif op == _OP_STRUCTS:
                count, pos = self.count(pos, 1)
                for _ in range(count):
                    pos = self.walk(children, pos, depth + 1)
                    if self.compact:
                        pos = self.skip_tags(pos)
            elif op in (_OP_TOPIC, _OP_GROUP, _OP_KEY, _OP_MECHANISM):
                text, pos = self.string(pos)
                if text is not None:
                    self._named(op, text)
            elif op in (_OP_STR, _OP_BYTES, _OP_RECORDS):
                size, pos = self.length(pos, op != _OP_STR)
                if size > 0:
                    if pos + size > self.end:
                        raise _Short
                    if op == _OP_RECORDS:
                        _count_records(data, pos, pos + size, facts)
                    pos += size
            elif op == _OP_ERROR:
                if pos + 2 > self.end:
                    raise _Short
                code = _I16.unpack_from(data, pos)[0]
                if code and depth < facts.error_depth:
                    facts.error, facts.error_depth = code, depth
                pos += 2
            elif op in (_OP_I16, _OP_ACKS):
                if pos + 2 > self.end:
                    raise _Short
                if op == _OP_ACKS:
                    facts.acks = _I16.unpack_from(data, pos)[0]
                pos += 2
            elif op == _OP_I64:
                pos += 8
            elif op == _OP_I8:
                pos += 1
            elif op in (_OP_UUID, _OP_TOPIC_ID, _OP_NAMED_ID):
                if pos + 16 > self.end:
                    raise _Short
                if op != _OP_UUID and data[pos : pos + 16] != _NO_ID:
                    text = str(uuid.UUID(bytes=data[pos : pos + 16]))
                    if op == _OP_NAMED_ID:
                        if self.last_topic and len(facts.named_ids) < MAX_TOPIC_IDS:
                            facts.named_ids.append((text, self.last_topic))
                    else:
                        self._named(_OP_TOPIC, self.topic_names.get(text, text))
                pos += 16
            elif op in (_OP_INTS, _OP_PARTITIONS):
                count, pos = self.count(pos, 4)
                if op == _OP_PARTITIONS:
                    for index in range(count):
                        partition = _I32.unpack_from(data, pos + 4 * index)[0]
                        if len(facts.partitions) < MAX_PARTITIONS and partition not in facts.partitions:
                            facts.partitions.append(partition)
                pos += 4 * max(count, 0)
            elif op == _OP_LONGS:
                count, pos = self.count(pos, 8)
                pos += 8 * max(count, 0)
            elif op in (_OP_STRS, _OP_TOPICS, _OP_KEYS):
                count, pos = self.count(pos, 1)
                for _ in range(count):
                    text, pos = self.string(pos)
                    if text is not None and op != _OP_STRS:
                        self._named(_OP_TOPIC if op == _OP_TOPICS else _OP_KEY, text)
            if pos > self.end:
                raise _Short
        return pos

    def _named(self, op: int, text: str) -> None:
        facts = self.facts
        if op == _OP_TOPIC:
            self.last_topic = text
            if text not in facts.topics and len(facts.topics) < MAX_TOPICS:
                facts.topics.append(text)
        elif op == _OP_GROUP:
            facts.group = facts.group or text
        elif op == _OP_KEY:
            facts.key = facts.key or text
        else:
            facts.mechanism = text


def _count_records(data: bytes, pos: int, end: int, facts: Facts) -> None:
    """Count the records of the batches in data[pos:end] from their headers (see the module
    docstring); a batch cut by the end (a Fetch response may end with part of one) is not counted."""
    facts.record_bytes += end - pos
    while pos + 17 <= end:
        _offset, length = _BATCH.unpack_from(data, pos)
        stop = pos + 12 + length
        if length < 0 or stop > end:
            return
        magic = data[pos + 16]
        if magic == 2:
            if length < 49:
                return
            attributes = _ATTRIBUTES.unpack_from(data, pos + 21)[0]
            if not attributes & 0x20:  # a control batch (transaction marker) holds no user records
                facts.record_count += max(_I32.unpack_from(data, pos + 57)[0], 0)
                facts.codecs.add(_codec(attributes & 0x07))
        elif magic in (0, 1) and length >= 6:
            facts.record_count += 1
            facts.codecs.add(_codec(data[pos + 17] & 0x07))
        else:
            return
        pos = stop


def _codec(value: int) -> str:
    return COMPRESSION[value] if value < len(COMPRESSION) else f"codec-{value}"


def decode_body(
    api_key: int, api_version: int, response: bool, body: bytes, topic_names: dict[str, str] | None = None
) -> Facts | None:
    """The facts of one request or response body (after its header), None when Trawl has no
    layout for this API version; raises _Short when the body does not match its layout."""
    ops = _ops(api_key, api_version, response)
    if ops is None:
        return None
    compact = flexible(api_key, api_version)
    walker = _Walker(body, compact, topic_names or {})
    pos = walker.walk(ops, 0, 0)
    if compact:
        pos = walker.skip_tags(pos)
    walker.facts.trailing = len(body) - pos
    return walker.facts


@dataclass(frozen=True, slots=True)
class RequestHeader:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    size: int  # header bytes, where the body starts


def read_request_header(frame: bytes) -> RequestHeader:
    """A request header; ProtocolError when the frame cannot hold one."""
    if len(frame) < 8:
        raise ProtocolError(f"Kafka request of {len(frame)} bytes is shorter than its header")
    api_key, api_version, correlation_id = _HEADER.unpack_from(frame)
    if api_key < 0 or api_version < 0:
        raise ProtocolError(f"Kafka request with api key {api_key}, version {api_version}")
    version = request_header_version(api_key, api_version)
    if version == 0:
        return RequestHeader(api_key, api_version, correlation_id, None, 8)
    if len(frame) < 10:
        raise ProtocolError("Kafka request header cut before its client id")
    size = _I16.unpack_from(frame, 8)[0]
    pos = 10
    client_id = None
    if size >= 0:
        if pos + size > len(frame):
            raise ProtocolError("Kafka client id runs past the request")
        client_id = frame[pos : pos + min(size, MAX_CLIENT_ID)].decode("utf-8", "replace")
        pos += size
    if version == 2:
        try:
            pos = _skip_tags(frame, pos, len(frame))
        except _Short:
            raise ProtocolError("Kafka request header's tagged fields run past the request") from None
    return RequestHeader(api_key, api_version, correlation_id, client_id, pos)


def plausible_request(data: bytes) -> bool:
    """The first bytes of a framed request: a sane size, a known api key, a version no more
    than a few past the newest known, a non-negative correlation id, a client id that fits."""
    if len(data) < 12:
        return False
    size = _I32.unpack_from(data)[0]
    if size < 8 or size > MAX_FRAME_SIZE:
        return False
    api_key, api_version, correlation_id = _HEADER.unpack_from(data, 4)
    entry = APIS.get(api_key)
    if entry is None or not 0 <= api_version <= entry[1] + 8 or correlation_id < 0:
        return False
    if request_header_version(api_key, api_version) == 0:
        return True
    if len(data) < 14:
        return True
    client_id: int = _I16.unpack_from(data, 12)[0]
    return bool(-1 <= client_id <= size - 10)


@dataclass(frozen=True, slots=True)
class KafkaState:
    """A Kafka connection between exchanges: no request waiting for its response, both
    directions at a frame boundary, nothing being skipped or resynchronised.

    What a compiled lane must supply:
    - `ordinal`: how many calls the connection has begun (each call id hashes its ordinal);
    - `topic_names`: (topic id, name) pairs learnt from Metadata responses, oldest first (at most
      MAX_TOPIC_IDS), which name the topics of messages that carry ids (Fetch v13+...);
    - `sasl_tokens`: a SaslHandshake v0 succeeded and raw SASL tokens, not requests, follow.
    """

    ordinal: int
    topic_names: tuple[tuple[str, str], ...] = ()
    sasl_tokens: bool = False


@dataclass(slots=True)
class _Pending:
    call: ApiCall
    api_key: int
    api_version: int


@dataclass(slots=True)
class _Direction:
    """Framing state of one direction."""

    buffer: bytearray = field(default_factory=bytearray)
    frame_ts: int = 0
    skip: int = 0  # bytes of an oversized frame still to skip
    lost: bool = False  # resynchronising after a gap


class KafkaParser:
    """One Kafka connection (both directions); see the module docstring for the rules."""

    def __init__(self, flow: FlowInfo, limits: ParserLimits) -> None:
        self.flow = flow
        self.limits = limits
        self.counts: dict[str, int] = {}  # what it counted without making calls (engine._parser_counts)
        self._pending: dict[int, _Pending] = {}
        self._ordinal = 0
        self._topic_names: dict[str, str] = {}
        self._sasl_tokens = False
        self._gap_seen = False
        self._sides = (_Direction(), _Direction())
        # The frame bound: a frame's first bytes are always enough for its header.
        self._keep = max(limits.max_body_bytes, 64)

    # -- state at an exchange boundary (base.Snapshotting) ---------------------------------------

    def snapshot(self) -> KafkaState:
        """The connection's state between exchanges; NotAtBoundary in the middle of one."""
        if self._pending:
            raise NotAtBoundary("Kafka: a request is pending")
        if any(side.buffer or side.skip or side.lost for side in self._sides):
            raise NotAtBoundary("Kafka: a frame is being read")
        return KafkaState(self._ordinal, tuple(self._topic_names.items()), self._sasl_tokens)

    def restore(self, state: KafkaState) -> None:
        """Continue from `state` at a frame boundary of both directions."""
        self._pending.clear()
        self._sides = (_Direction(), _Direction())
        self._ordinal = state.ordinal
        self._topic_names = dict(state.topic_names)
        self._sasl_tokens = state.sasl_tokens

    # -- bytes in ---------------------------------------------------------------------------------

    def feed(self, direction: Direction, data: bytes, ts_ns: int) -> list[ApiCall]:
        side = self._sides[direction]
        if side.lost:
            if not self._resumes(direction, data):
                return []
            side.lost = False
        calls: list[ApiCall] = []
        position = 0
        size = len(data)
        buffer = side.buffer
        while position < size:
            if side.skip:
                take = min(side.skip, size - position)
                side.skip -= take
                position += take
                continue
            if not buffer:
                side.frame_ts = ts_ns
                # A whole frame in this chunk is taken without copying it through the buffer.
                if position + 4 <= size:
                    length = _I32.unpack_from(data, position)[0]
                    self._check_size(length)
                    stop = position + 4 + length
                    if stop <= size and length <= self._keep:
                        self._frame(direction, data[position + 4 : stop], length, ts_ns, ts_ns, calls)
                        position = stop
                        continue
            if len(buffer) < 4:
                take = min(4 - len(buffer), size - position)
                buffer += data[position : position + take]
                position += take
                if len(buffer) < 4:
                    break
                self._check_size(_I32.unpack_from(buffer)[0])
            length = _I32.unpack_from(buffer)[0]
            kept = min(length, self._keep)
            take = min(kept + 4 - len(buffer), size - position)
            buffer += data[position : position + take]
            position += take
            if len(buffer) == kept + 4:
                frame = bytes(buffer[4:])
                buffer.clear()
                if kept < length:
                    side.skip = length - kept
                    self._count("kafka_frames_truncated")
                self._frame(direction, frame, length, side.frame_ts, ts_ns, calls)
        return calls

    def _check_size(self, length: int) -> None:
        if length < 0 or length > MAX_FRAME_SIZE:
            raise ProtocolError(f"Kafka frame size {length} is outside 0..{MAX_FRAME_SIZE}")

    def _resumes(self, direction: Direction, data: bytes) -> bool:
        """After a gap: does this chunk start with a frame?"""
        if direction is Direction.CLIENT_TO_SERVER:
            return plausible_request(data)
        if len(data) < 8:
            return False
        length, correlation_id = struct.unpack_from(">ii", data)
        return bool(4 <= length <= MAX_FRAME_SIZE and correlation_id in self._pending)

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def _frame(
        self, direction: Direction, frame: bytes, length: int, ts_ns: int, end_ts_ns: int, calls: list[ApiCall]
    ) -> None:
        """One frame, begun in the chunk of `ts_ns` and ended in the chunk of `end_ts_ns` (the
        message's `ts` and `end_ts`)."""
        truncated = len(frame) < length
        if direction is Direction.CLIENT_TO_SERVER:
            self._request(frame, length, truncated, ts_ns, end_ts_ns, calls)
        else:
            self._response(frame, length, truncated, ts_ns, end_ts_ns, calls)

    # -- requests ---------------------------------------------------------------------------------

    def _request(
        self, frame: bytes, length: int, truncated: bool, ts_ns: int, end_ts_ns: int, calls: list[ApiCall]
    ) -> None:
        if self._sasl_tokens:
            if not plausible_request(_I32.pack(length) + frame[:10]):
                self._count("kafka_sasl_tokens")  # a raw SASL token after SaslHandshake v0: never read
                return
            self._sasl_tokens = False
        try:
            header = read_request_header(frame)
        except ProtocolError:
            self._count("kafka_malformed_frames")
            return
        call = new_call(self.flow, PROTOCOL, ts_ns, self._ordinal)
        self._ordinal += 1
        call.method = api_name(header.api_key)
        call.request.size = length + 4
        call.request.end_ts = end_ts_ns
        detail = call.kafka
        detail.api_key = header.api_key
        detail.api_version = header.api_version
        detail.correlation_id = header.correlation_id
        if header.client_id:
            detail.client_id = header.client_id
        if truncated:
            call.notes.append("truncated")
        facts = self._decode(call, header.api_key, header.api_version, False, frame[header.size :])
        if facts is not None:
            _describe(call, facts)
            if facts.acks is not None:
                detail.acks = facts.acks
        if header.api_key == PRODUCE and facts is not None and facts.acks == 0:
            call.notes.append("one-way")  # acks=0: the broker sends nothing back
            detail.one_way = True
            call.outcome = OUTCOME_OK
            calls.append(call)
            return
        previous = self._pending.pop(header.correlation_id, None)
        if previous is not None:
            previous.call.notes.append("correlation-id-reused")
            calls.append(self._unanswered(previous))
        if len(self._pending) >= self.limits.max_pending_requests:
            oldest = self._pending.pop(next(iter(self._pending)))
            oldest.call.notes.append("pending-limit")
            self._count("kafka_pending_limit")
            calls.append(self._unanswered(oldest))
        self._pending[header.correlation_id] = _Pending(call, header.api_key, header.api_version)

    def _decode(self, call: ApiCall, api_key: int, api_version: int, response: bool, body: bytes) -> Facts | None:
        entry = APIS.get(api_key)
        if entry is None:
            if "unknown-api-key" not in call.notes:
                call.notes.append("unknown-api-key")
            return None
        if api_version > entry[1]:
            if "unknown-version" not in call.notes:
                call.notes.append("unknown-version")
            return None
        try:
            return decode_body(api_key, api_version, response, body, self._topic_names)
        except _Short:
            if "body-not-decoded" not in call.notes:
                call.notes.append("body-not-decoded")
            return None

    # -- responses --------------------------------------------------------------------------------

    def _response(
        self, frame: bytes, length: int, truncated: bool, ts_ns: int, end_ts_ns: int, calls: list[ApiCall]
    ) -> None:
        if self._sasl_tokens and (len(frame) < 4 or _I32.unpack_from(frame)[0] not in self._pending):
            self._count("kafka_sasl_tokens")
            return
        if len(frame) < 4:
            self._count("kafka_malformed_frames")
            return
        correlation_id = _I32.unpack_from(frame)[0]
        pending = self._pending.pop(correlation_id, None)
        if pending is None:
            self._count("kafka_unmatched_responses")
            return
        call = pending.call
        call.response.size = length + 4
        call.response.end_ts = end_ts_ns
        if truncated and "truncated" not in call.notes:
            call.notes.append("truncated")
        start = 4
        if response_header_version(pending.api_key, pending.api_version) == 1:
            try:
                start = _skip_tags(frame, 4, len(frame))
            except _Short:
                call.notes.append("body-not-decoded")
                calls.append(finish_call(call, ts_ns, error=False))
                return
        facts = self._decode(call, pending.api_key, pending.api_version, True, frame[start:])
        error = False
        if facts is not None:
            detail = call.kafka
            for topic in facts.topics:
                if topic not in detail.topics and len(detail.topics) < MAX_TOPICS:
                    detail.topics.append(topic)
            for partition in facts.partitions:
                if partition not in detail.partitions and len(detail.partitions) < MAX_PARTITIONS:
                    detail.partitions.append(partition)
            if not call.path:
                call.path = _path(facts)
            _records(call, facts)
            for topic_id, name in facts.named_ids:
                self._remember(topic_id, name)
            name = error_name(facts.error)
            call.status = name
            detail.error_code = facts.error
            detail.error_name = name
            error = facts.error != 0
            if pending.api_key == SASL_HANDSHAKE and pending.api_version == 0 and not facts.error:
                self._sasl_tokens = True
        calls.append(finish_call(call, ts_ns, error=error))

    def _remember(self, topic_id: str, name: str) -> None:
        self._topic_names.pop(topic_id, None)
        self._topic_names[topic_id] = name
        if len(self._topic_names) > MAX_TOPIC_IDS:
            del self._topic_names[next(iter(self._topic_names))]

    # -- the end ----------------------------------------------------------------------------------

    def gap(self, direction: Direction, size: int, ts_ns: int) -> list[ApiCall]:
        side = self._sides[direction]
        if side.skip >= size:
            side.skip -= size  # the gap fell inside an oversized frame's skipped part
            return []
        side.buffer.clear()
        side.skip = 0
        side.lost = True
        self._gap_seen = True
        return []

    def expire(self, now_ns: int) -> list[ApiCall]:
        expired: list[ApiCall] = []
        deadline = now_ns - self.limits.request_timeout_ns
        while self._pending:
            key = next(iter(self._pending))
            pending = self._pending[key]
            if pending.call.request.ts > deadline:
                break
            del self._pending[key]
            expired.append(self._unanswered(pending))
        return expired

    def finish(self, ts_ns: int) -> list[ApiCall]:
        unanswered = [self._unanswered(pending) for pending in self._pending.values()]
        self._pending.clear()
        return unanswered

    def _unanswered(self, pending: _Pending) -> ApiCall:
        if self._gap_seen and "capture-gap" not in pending.call.notes:
            pending.call.notes.append("capture-gap")
        return finish_call(pending.call, None, error=False)


def _path(facts: Facts) -> str:
    text = ",".join(facts.topics) or facts.group or facts.key
    return text if len(text) <= MAX_PATH else text[: MAX_PATH - 3] + "..."


def _describe(call: ApiCall, facts: Facts) -> None:
    """A request's facts on its call."""
    detail = call.kafka
    detail.topics.extend(facts.topics)
    detail.partitions.extend(facts.partitions)
    call.path = _path(facts)
    if facts.group:
        detail.group_id = facts.group
    if facts.mechanism:
        detail.sasl_mechanism = facts.mechanism
    _records(call, facts)


def _records(call: ApiCall, facts: Facts) -> None:
    if not facts.record_bytes:
        return
    detail = call.kafka
    detail.record_count += facts.record_count
    detail.record_bytes += facts.record_bytes
    if facts.codecs:
        detail.compression = ",".join(sorted(facts.codecs))


def framed_responses(data: bytes) -> bool:
    """`data` is whole Kafka frames end to end (the last may be cut short), each at least a
    correlation id long and with a non-negative one: what a broker's side of a connection
    captured mid-way looks like."""
    position = 0
    whole = 0
    while position + 8 <= len(data):
        length, correlation_id = struct.unpack_from(">ii", data, position)
        if length < 4 or length > MAX_FRAME_SIZE or correlation_id < 0:
            return False
        position += 4 + length
        whole += position <= len(data)
    return whole > 0 and (position >= len(data) or position + 8 > len(data))


def probe(client_first: bytes, server_first: bytes, flow: FlowInfo) -> int:
    """3 for a plausible request on the Kafka port or answered by a response with its
    correlation id, 2 for a plausible request elsewhere; with no request seen (a capture that
    began mid-connection), 3 for whole response frames from the Kafka port, 1 for the port
    alone; 0 otherwise."""
    port = flow.server_port in KAFKA_PORTS
    if not client_first:
        if port and framed_responses(server_first):
            return 3
        return 1 if port else 0
    if not plausible_request(client_first):
        return 0
    if port or (len(server_first) >= 8 and server_first[4:8] == client_first[8:12]):
        return 3
    return 2


def new_stream(flow: FlowInfo, limits: ParserLimits) -> StreamParser:
    return KafkaParser(flow, limits)


SPEC = ProtocolSpec(
    name=PROTOCOL, transport="tcp", probe=probe, new_stream=new_stream, ports=KAFKA_PORTS, probe_bytes=14
)

__all__ = [
    "APIS",
    "ERRORS",
    "SPEC",
    "Facts",
    "KafkaParser",
    "KafkaState",
    "LaneApi",
    "RequestHeader",
    "api_name",
    "decode_body",
    "error_name",
    "flexible",
    "framed_responses",
    "lane_api",
    "plausible_request",
    "probe",
    "read_request_header",
    "request_header_version",
    "response_header_version",
]
