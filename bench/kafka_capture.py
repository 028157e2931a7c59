"""A capture of real Kafka client traffic, for bench/dissect.py --kafka.

No Kafka broker can be installed here: the broker is the stand-in of tests/kafka_broker.py (it
speaks the real wire protocol through kafka-python's protocol classes) on port 9092 of the
loopback, and the client is the real kafka-python: a producer (acks=1, flexible Produce v9+)
flushing every PRODUCE_EVERY messages, so each flush is one Produce request, then a consumer
group reading them back with fetches bounded to about FETCH_RECORDS records each, with its
group's JoinGroup/SyncGroup/Heartbeat/OffsetCommit around them; recorded by tcpdump on loopback
(tests/fixtures/tcpdump_capture.py; needs root and tcpdump). About half the calls are Produce,
half Fetch.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

from kafka import KafkaConsumer, KafkaProducer  # noqa: E402
from kafka_broker import KafkaStandIn  # noqa: E402
from tcpdump_capture import capture  # noqa: E402

PORT = 9092
PRODUCE_EVERY = 2
FETCH_RECORDS = 2
VALUE = b'{"order": %d, "total": 12.50, "currency": "EUR", "items": 3}'


def record(path: Path, calls: int) -> int:
    """Write about `calls` Kafka calls to `path`; returns the broker's port."""
    if shutil.which("tcpdump") is None:
        raise SystemExit("tcpdump is not installed (apt-get install tcpdump)")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    messages = max(PRODUCE_EVERY, calls // 2 * PRODUCE_EVERY)
    broker = KafkaStandIn(port=PORT)
    broker.start()
    try:
        with capture(path, f"tcp port {PORT}", buffer_kib=256 * 1024):
            producer = KafkaProducer(bootstrap_servers=broker.address, acks=1, linger_ms=0, client_id="bench-producer")
            for index in range(messages):
                producer.send("orders", key=b"order-%d" % index, value=VALUE % index)
                if index % PRODUCE_EVERY == PRODUCE_EVERY - 1:
                    producer.flush()
            producer.flush()
            producer.close()
            record_size = len(VALUE % messages) + 24
            consumer = KafkaConsumer(
                "orders",
                bootstrap_servers=broker.address,
                group_id="bench",
                client_id="bench-consumer",
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                max_partition_fetch_bytes=FETCH_RECORDS * record_size + 61,
                fetch_max_wait_ms=100,
                consumer_timeout_ms=3000,
            )
            read = 0
            for _message in consumer:
                read += 1
                if read == messages:
                    break
            consumer.commit()
            consumer.close()
            if read != messages:
                raise SystemExit(f"the consumer read {read} messages of {messages}")
    finally:
        broker.stop()
    return PORT
