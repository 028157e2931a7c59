"""The Kafka parser's version tables and body layouts against kafka-python's protocol classes.

kafka-python 3 builds its encoders from Kafka's own JSON message definitions (Kafka 4.1's copy, one
of the two sources Trawl's tables cite). Two checks:

- the tables: every api key both know has the same name, newest version and first flexible
  version (which decides the header versions);
- the layouts: for each of the 17 APIs Trawl reads, every request and response version both
  know is built by kafka-python with every field filled (one element in every array, nullable
  fields set) and encoded; Trawl's walker must consume the body exactly (a field missed or
  invented would leave bytes over or run short) and find the topic, the partition, the error
  code and the group that were put in.
"""

from __future__ import annotations

import importlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from kafka.record.memory_records import MemoryRecordsBuilder

from trawl.dissector.protocols import kafka

TOPIC = "orders"
GROUP = "group-a"
PARTITION = 3
ERROR = 7
TOPIC_ID = uuid.UUID("6f1c0d2e-1a2b-4c3d-8e9f-0a1b2c3d4e5f")
MODULES = ("producer", "consumer", "metadata", "admin", "sasl")


def message_classes() -> dict[tuple[int, str], Any]:
    """(api key, "request" | "response") -> kafka-python's class."""
    found: dict[tuple[int, str], Any] = {}
    for name in MODULES:
        module = importlib.import_module(f"kafka.protocol.{name}")
        for value in vars(module).values():
            json = getattr(value, "json", None)
            if isinstance(value, type) and isinstance(json, dict) and json.get("type") in ("request", "response"):
                found[(json["apiKey"], json["type"])] = value
    return found


CLASSES = message_classes()


def versions_of(text: str) -> tuple[int, int]:
    if text == "none":
        return (1, 0)
    first, dash, last = text.partition("-")
    if first.endswith("+"):
        return int(first[:-1]), 1 << 16
    return int(first), int(last) if dash else int(first)


def present(spec: dict[str, Any], version: int) -> bool:
    first, last = versions_of(spec.get("versions", "0+"))
    tagged = spec.get("taggedVersions")
    return first <= version <= last and tagged is None


def batch_of_two() -> bytes:
    builder = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 16)
    for index in range(2):
        builder.append(timestamp=None, key=b"k", value=b"value %d" % index)
    builder.close()
    return bytes(builder.buffer())


RECORDS = batch_of_two()


@dataclass
class Filled:
    """Which roles the filler put into a message."""

    topics: bool = False
    partitions: bool = False
    error: bool = False
    group: bool = False
    records: bool = False
    roles: set[str] = field(default_factory=set)


def is_topic_struct(struct_type: str) -> bool:
    return "Topic" in struct_type and "Config" not in struct_type and "Forgotten" not in struct_type


def fill(owner: Any, specs: list[dict[str, Any]], version: int, struct_type: str, filled: Filled) -> dict[str, Any]:
    """Keyword arguments for one structure of a kafka-python message, every present field set."""
    values: dict[str, Any] = {}
    for spec in specs:
        if not present(spec, version):
            continue
        name, kind = spec["name"], spec["type"]
        attribute = "".join("_" + char.lower() if char.isupper() else char for char in name).lstrip("_")
        attribute = attribute.replace("i_d", "id")
        topical = is_topic_struct(struct_type)
        if kind.startswith("[]") and kind[2:] not in ("int32", "int64", "string", "int16", "uuid"):
            element = getattr(owner, kind[2:])
            nested = fill(element, spec.get("fields", []), version, kind[2:], filled)
            values[attribute] = [element(**nested)]
        elif kind == "[]int32":
            partition = name == "PartitionIndexes" or (name == "Partitions" and "Forgotten" not in struct_type)
            filled.partitions |= partition
            values[attribute] = [PARTITION if partition else 1]
        elif kind == "[]int64":
            values[attribute] = [5]
        elif kind == "[]string":
            if name == "TopicNames":
                filled.topics = True
                values[attribute] = [TOPIC]
            elif name == "CoordinatorKeys":
                filled.group = True
                values[attribute] = [GROUP]
            else:
                values[attribute] = ["x"]
        elif kind == "string":
            if name in ("Name", "Topic") and topical:
                filled.topics = True
                values[attribute] = TOPIC
            elif name in ("GroupId", "Key"):
                filled.group = True
                values[attribute] = GROUP
            else:
                values[attribute] = "x"
        elif kind == "int16":
            if name == "ErrorCode":
                filled.error = True
                values[attribute] = ERROR
            elif name == "Acks":
                values[attribute] = -1
            else:
                values[attribute] = 1
        elif kind == "int32":
            partition = name in ("PartitionIndex", "Partition") or (name == "Index" and "Partition" in struct_type)
            filled.partitions |= partition
            values[attribute] = PARTITION if partition else 1
        elif kind in ("int8", "int64", "uint16"):
            values[attribute] = 1
        elif kind == "bool":
            values[attribute] = True
        elif kind == "uuid":
            values[attribute] = TOPIC_ID
            filled.topics |= name == "TopicId" and topical
        elif kind == "bytes":
            values[attribute] = b"\x00user\x00secret" if name == "AuthBytes" else b"\x01\x02"
        elif kind == "records":
            filled.records = True
            values[attribute] = RECORDS
        elif kind == "float64":
            values[attribute] = 1.0
        elif kind == "bitfield":
            continue  # kafka-python's int32 of authorized operations: its default is written
        else:
            struct = getattr(owner, kind)
            values[attribute] = struct(**fill(struct, spec.get("fields", []), version, kind, filled))
    return values


def cases() -> list[tuple[int, int, str]]:
    found = []
    for api_key in sorted(kafka._SCHEMAS):
        newest = kafka.APIS[api_key][1]
        for side in ("request", "response"):
            cls = CLASSES.get((api_key, side))
            if cls is None:
                continue
            for version in range(0, min(newest, cls.max_version) + 1):
                found.append((api_key, version, side))
    return found


def test_the_cases_cover_every_api_trawl_reads() -> None:
    covered = {(api_key, side) for api_key, _version, side in cases()}
    assert covered == {(api_key, side) for api_key in kafka._SCHEMAS for side in ("request", "response")}
    assert len(cases()) > 250


def test_names_and_first_flexible_versions_match_kafka_python() -> None:
    compared = 0
    for (api_key, side), cls in CLASSES.items():
        if side != "request" or api_key not in kafka.APIS:
            continue
        name, newest, first_flexible = kafka.APIS[api_key]
        assert cls.json["name"] == name + "Request"
        assert newest == versions_of(cls.json["validVersions"])[1], name
        first, last = versions_of(cls.json["flexibleVersions"])
        assert first_flexible == (first if first <= last else None), name
        compared += 1
    assert compared >= 40


@pytest.mark.parametrize(("api_key", "version", "side"), cases(), ids=lambda value: str(value))
def test_the_walker_reads_every_field_kafka_python_writes(api_key: int, version: int, side: str) -> None:
    cls = CLASSES[(api_key, side)][version]
    filled = Filled()
    message = cls(**fill(cls, cls.json["fields"], version, "", filled))
    body = bytes(message.encode(version=version))
    facts = kafka.decode_body(api_key, version, side == "response", body, {str(TOPIC_ID): TOPIC})
    assert facts is not None
    assert facts.trailing == 0, "the walker stopped before the end of the body"
    assert facts.topics == ([TOPIC] if filled.topics else [])
    assert facts.partitions == ([PARTITION] if filled.partitions else [])
    assert facts.error == (ERROR if filled.error else 0)
    assert facts.group == (GROUP if filled.group and api_key != 10 else "")
    assert facts.key == (GROUP if filled.group and api_key == 10 else "")
    if filled.records:
        assert (facts.record_count, facts.codecs) == (2, {"none"})
        assert facts.record_bytes == len(RECORDS)
    if api_key == kafka.PRODUCE and side == "request":
        assert facts.acks == -1
    assert b"secret" not in repr(facts).encode()
