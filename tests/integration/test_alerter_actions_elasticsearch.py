"""The elasticsearch action against the `_bulk` stand-in (tests/elastic_bulk.py: no Elasticsearch
or OpenSearch server can be installed here), which the official `elasticsearch` client is first
shown to work with: what the stand-in answers is what that client reads from a real cluster.

Checked: an alert and its call indexed with their ids (a second delivery overwrites, adds
nothing), the NDJSON body and headers; a whole request answered 429 retried; an item answered
429 sent again alone; an item refused (400) and a refused login final, counted, dead-lettered.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from tests.action_sender import RecordingSender
from tests.elastic_bulk import ElasticBulk
from trawl.alerter.action_types import ElasticsearchAction
from trawl.alerter.config import ActionSettings
from trawl.v1 import alerts_pb2, calls_pb2

API_KEY = "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw=="


@pytest.fixture
async def elastic() -> AsyncIterator[tuple[ElasticBulk, str]]:
    state = ElasticBulk(api_key=API_KEY)
    runner = web.AppRunner(state.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield state, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_the_official_client_works_with_the_stand_in(elastic: tuple[ElasticBulk, str]) -> None:
    from elasticsearch import AsyncElasticsearch, helpers

    state, url = elastic
    client = AsyncElasticsearch(url, api_key=API_KEY)
    try:
        info = await client.info()
        assert info["version"]["number"] == "8.15.0"
        done, errors = await helpers.async_bulk(
            client,
            [
                {"_index": "calls", "_id": "c1", "_source": {"status": "503"}},
                {"_op_type": "create", "_index": "calls", "_id": "c2", "_source": {"status": "200"}},
            ],
        )
        assert (done, errors) == (2, [])
        got = await client.get(index="calls", id="c1")
        assert got["_source"] == {"status": "503"}
        # An item refused: the client reads the per-item error of the real answer's shape.
        answer = await client.bulk(
            operations=[
                {"create": {"_index": "calls", "_id": "c2"}},
                {"status": "again"},
                {"index": {"_index": "Bad"}},
                {},
            ]
        )
        assert answer["errors"] is True
        conflict, bad_name = (item["create" if "create" in item else "index"] for item in answer["items"])
        assert (conflict["status"], conflict["error"]["type"]) == (409, "version_conflict_engine_exception")
        assert (bad_name["status"], bad_name["error"]["type"]) == (400, "invalid_index_name_exception")
    finally:
        await client.close()
    # What the client sent is NDJSON ending in a newline, as the stand-in requires of everyone.
    headers, body = state.requests[0]
    assert "x-ndjson" in headers["Content-Type"]
    assert body.endswith(b"\n")


class Sender(RecordingSender):
    def __init__(self) -> None:
        super().__init__(ActionSettings(retries=3, backoff_s=0.5, timeout_s=5))


def make_alert() -> alerts_pb2.Alert:
    return alerts_pb2.Alert(
        id="a1",
        rule="errors",
        severity=alerts_pb2.SEVERITY_CRITICAL,
        summary="HTTP 503 from payments",
        fired_at=1_700_000_000_123_456_789,
        group="checkout -> payments",
        labels={"team": "pay"},
        call=calls_pb2.ApiCall(
            id="c-503",
            protocol="http",
            status="503",
            elapsed_ns=7,
            request=calls_pb2.Message(ts=1_699_999_999_000_000_001),
        ),
    )


def action_for(url: str, **fields: Any) -> ElasticsearchAction:
    return ElasticsearchAction(url=url, api_key=API_KEY, **fields)


async def test_an_alert_and_its_call_are_indexed_once_under_their_ids(elastic: tuple[ElasticBulk, str]) -> None:
    state, url = elastic
    sender = Sender()
    action = action_for(url, index="alerts", include_call=True, call_index="calls")
    assert await sender.deliver(make_alert(), action)
    assert await sender.deliver(make_alert(), action)  # again (a redelivered alert): the same documents
    assert sender.dead == []
    assert {index: sorted(docs) for index, docs in state.documents.items()} == {"alerts": ["a1"], "calls": ["c-503"]}
    alert = state.documents["alerts"]["a1"]
    assert alert["@timestamp"] == "2023-11-14T22:13:20.123456789Z"
    assert (alert["rule"], alert["severity"], alert["group"], alert["labels"]) == (
        "errors",
        "SEVERITY_CRITICAL",
        "checkout -> payments",
        {"team": "pay"},
    )
    call = state.documents["calls"]["c-503"]
    assert (call["@timestamp"], call["status"], call["elapsed_ns"]) == ("2023-11-14T22:13:19.000000001Z", "503", "7")
    headers, body = state.requests[0]
    assert headers["Content-Type"] == "application/x-ndjson"
    assert headers["Authorization"] == f"ApiKey {API_KEY}"
    assert [json.loads(line) for line in body.decode().splitlines()][::2] == [
        {"index": {"_index": "alerts", "_id": "a1"}},
        {"index": {"_index": "calls", "_id": "c-503"}},
    ]
    assert sender.count("trawl_alerter_elasticsearch_documents_total", index="alerts") == 2
    assert sender.count("trawl_alerter_actions_delivered_total", rule="errors", action="elasticsearch") == 2


async def test_a_request_answered_429_is_retried(elastic: tuple[ElasticBulk, str]) -> None:
    state, url = elastic
    state.fail_requests = [429, 503]
    sender = Sender()
    assert await sender.deliver(make_alert(), action_for(url))
    assert len(state.requests) == 3
    assert sender.sleeps == [0.5, 1.0]
    assert sorted(state.documents["trawl-alerts"]) == ["a1"]
    assert sender.count("trawl_alerter_action_retries_total", rule="errors", action="elasticsearch") == 2


async def test_an_item_answered_429_is_sent_again_alone(elastic: tuple[ElasticBulk, str]) -> None:
    state, url = elastic
    state.item_faults["calls"] = [429]
    sender = Sender()
    assert await sender.deliver(make_alert(), action_for(url, include_call=True, call_index="calls"))
    first, second = (body for _, body in state.requests)
    assert len(first.splitlines()) == 4
    assert json.loads(second.splitlines()[0]) == {"index": {"_index": "calls", "_id": "c-503"}}
    assert len(second.splitlines()) == 2
    assert sorted(state.documents["calls"]) == ["c-503"]
    assert sender.count("trawl_alerter_elasticsearch_item_errors_total", index="calls", status="429") == 1
    assert sender.dead == []


async def test_an_item_refused_is_final_and_dead_lettered(elastic: tuple[ElasticBulk, str]) -> None:
    state, url = elastic
    state.item_faults["calls"] = [400]
    sender = Sender()
    assert not await sender.deliver(make_alert(), action_for(url, include_call=True, call_index="calls"))
    assert len(state.requests) == 1
    [failure] = sender.dead
    assert failure.reason == (
        "1 bulk item(s) refused: calls/c-503: HTTP 400 mapper_parsing_exception: stand-in told to answer 400"
    )
    assert failure.attempts == 1
    assert sorted(state.documents["trawl-alerts"]) == ["a1"]  # the other item went in
    assert sender.count("trawl_alerter_elasticsearch_item_errors_total", index="calls", status="400") == 1
    assert sender.count("trawl_alerter_actions_failed_total", rule="errors", action="elasticsearch") == 1
    assert sender.count("trawl_alerter_dead_letters_total", rule="errors") == 1


async def test_a_refused_login_is_final(elastic: tuple[ElasticBulk, str]) -> None:
    state, url = elastic
    sender = Sender()
    assert not await sender.deliver(make_alert(), ElasticsearchAction(url=url, api_key="wrong"))
    [failure] = sender.dead
    assert failure.reason == "HTTP 401: security_exception: missing authentication credentials for REST request"
    assert failure.attempts == 1
    assert state.documents == {}
