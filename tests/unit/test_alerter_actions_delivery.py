"""What the actions send, worked out from an alert (a recording's scope, an InfluxDB point, bulk
lines), and the bound per target: a target that holds its deliveries does not hold another."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from trawl.alerter.action_elasticsearch import bulk_items
from trawl.alerter.action_influxdb import point, write_url
from trawl.alerter.action_record import record_request, since_ns, workload_pods
from trawl.alerter.action_s3 import object_key
from trawl.alerter.action_types import ElasticsearchAction, InfluxAction, RecordAction
from trawl.alerter.actions import ActionSender, DeliveryFailure, dead_letter_headers
from trawl.alerter.config import ActionSettings, WebhookSettings
from trawl.alerter.delivery import timestamp
from trawl.alerter.rules import WebhookAction
from trawl.metrics import Registry
from trawl.v1 import alerts_pb2, calls_pb2, control_pb2


def alert_with(src: calls_pb2.Endpoint, dst: calls_pb2.Endpoint, **fields: object) -> alerts_pb2.Alert:
    base: dict[str, object] = {
        "id": "0123abcd",
        "rule": "errors",
        "severity": alerts_pb2.SEVERITY_CRITICAL,
        "summary": "HTTP 503 from payments",
        "fired_at": 1_700_000_000_123_456_789,
        "call": calls_pb2.ApiCall(id="c1", src=src, dst=dst, request=calls_pb2.Message(ts=1_699_999_999_000_000_000)),
    }
    base.update(fields)
    return alerts_pb2.Alert(**base)  # type: ignore[arg-type]


CHECKOUT = calls_pb2.Endpoint(
    ip="10.0.0.1", namespace="shop", pod="checkout-7d9f8b6c5d-x2x4z", workload="checkout", workload_kind="Deployment"
)
PAYMENTS = calls_pb2.Endpoint(
    ip="10.0.0.2", namespace="pay", pod="payments-0", workload="payments", workload_kind="StatefulSet"
)
EXTERNAL = calls_pb2.Endpoint(ip="203.0.113.9")


def started(alert: alerts_pb2.Alert, action: RecordAction) -> control_pb2.RecordRequest:
    request = record_request(alert, action)
    assert isinstance(request, control_pb2.RecordRequest), request
    return request


def test_record_scope_flow_is_the_two_addresses() -> None:
    request = started(alert_with(CHECKOUT, PAYMENTS), RecordAction(filter="tcp port 8080", duration_s=90))
    assert list(request.ips) == ["10.0.0.1", "10.0.0.2"]
    assert (list(request.pods), list(request.namespaces), list(request.nodes)) == ([], [], [])
    assert request.filter == "tcp port 8080"
    assert request.duration_s == 90
    assert request.requested_by == "alerter:errors"
    assert request.reason.startswith("alert 0123abcd fired 2023-11-14T22:13:20.123456789Z: HTTP 503 from payments")
    # The same message `trawl record start` sends: it goes through RecordControl's start.
    assert control_pb2.RecordControl(start=request).WhichOneof("action") == "start"


def test_a_recording_begins_lookback_before_the_call_or_before_a_windowed_rules_window() -> None:
    per_call = alert_with(CHECKOUT, PAYMENTS)  # fired_at: the alerter's clock; the call: packet time
    assert since_ns(per_call, RecordAction()) == 1_699_999_999_000_000_000 - 30 * 1_000_000_000
    assert started(per_call, RecordAction(lookback_s=0)).since_ns == 1_699_999_999_000_000_000
    windowed = alert_with(CHECKOUT, PAYMENTS, window_calls=40)  # fired_at: the calls' time it fired at
    assert since_ns(windowed, RecordAction(lookback_s=30, window_s=360)) == 1_700_000_000_123_456_789 - 390 * 10**9


def test_record_scope_pods_names_each_pod_exactly_and_an_end_without_one_by_its_address() -> None:
    request = started(alert_with(CHECKOUT, EXTERNAL), RecordAction(scope="pods"))
    assert list(request.pods) == ["^checkout\\-7d9f8b6c5d\\-x2x4z$"]
    assert list(request.namespaces) == ["shop"]
    assert list(request.ips) == ["203.0.113.9"]


def test_record_scope_workloads_and_namespaces() -> None:
    workloads = started(alert_with(CHECKOUT, PAYMENTS), RecordAction(scope="workloads"))
    assert list(workloads.pods) == [workload_pods("checkout"), workload_pods("payments")]
    assert list(workloads.namespaces) == ["shop", "pay"]
    assert list(workloads.ips) == []
    namespaces = started(alert_with(CHECKOUT, EXTERNAL), RecordAction(scope="namespaces"))
    assert (list(namespaces.namespaces), list(namespaces.ips), list(namespaces.pods)) == (["shop"], ["203.0.113.9"], [])


def test_workload_pod_names() -> None:
    pattern = re.compile(workload_pods("api"))
    for name in ("api-7d9f8b6c5d-x2x4z", "api-6bd5x-2kz9q", "api-0", "api-12", "api-x2x4z"):
        assert pattern.search(name), name
    # Another workload whose name starts with this one's, and names that are not a pod of it.
    for name in ("api-gateway-7d9f8b6c5d-x2x4z", "api-gateway-0", "apix-0", "api", "api-7d9f8b6c5d-x2x4z-1"):
        assert not pattern.search(name), name


def test_an_alert_without_a_call_asks_for_no_recording_of_everything() -> None:
    reason = record_request(alerts_pb2.Alert(id="a", rule="r"), RecordAction())
    assert reason == "the alert has no call with an address, pod or namespace to record"
    # A filter alone does not make a scope either: the rule asked for the alert's ends.
    assert isinstance(record_request(alerts_pb2.Alert(id="a", rule="r"), RecordAction(filter="tcp")), str)


def test_influx_point_escapes_tags_fields_and_measurement() -> None:
    alert = alert_with(
        CHECKOUT,
        PAYMENTS,
        group="checkout -> payments,eu=1",
        summary='he said "503"\\ then\nleft',
        labels={"team": "pay ments", "rule": "shadowed", "path": "C:\\"},
        value=0.25,
        window_calls=120,
    )
    line = point(alert, "trawl alerts,x").decode()
    assert line == (
        "trawl\\ alerts\\,x"
        ",group=checkout\\ ->\\ payments\\,eu\\=1,label_rule=shadowed,path=C:/,rule=errors"
        ",severity=critical,state=firing,team=pay\\ ments"
        ' alert_id="0123abcd",summary="he said \\"503\\"\\\\ then left",value=0.25,window_calls=120i'
        " 1700000000123456789\n"
    )
    resolved = alert_with(CHECKOUT, PAYMENTS, resolved=True, resolved_at=1_700_000_100_000_000_000)
    assert point(resolved, "m").decode().endswith(" 1700000100000000000\n")
    assert ",state=resolved" in point(resolved, "m").decode()
    assert ",group=" not in point(resolved, "m").decode()  # empty: left out (line protocol has no empty tag)


def test_influx_write_urls() -> None:
    assert write_url(InfluxAction(url="http://i:8086/", db="trawl db", retention_policy="week")) == (
        "http://i:8086/write?db=trawl+db&precision=ns&rp=week"
    )
    assert write_url(InfluxAction(url="https://i/influx", bucket="b", org="my org")) == (
        "https://i/influx/api/v2/write?org=my+org&bucket=b&precision=ns"
    )


def test_bulk_lines_for_an_alert_and_its_call() -> None:
    alert = alert_with(CHECKOUT, PAYMENTS)
    alone = bulk_items(alert, ElasticsearchAction(url="http://e"))
    assert len(alone) == 1
    both = bulk_items(alert, ElasticsearchAction(url="http://e", include_call=True, call_index="calls"))
    lines = b"".join(item.lines for item in both).decode().split("\n")
    assert lines[-1] == ""  # NDJSON: every line ends with a newline, the last too
    head, source, call_head, call_source = (json.loads(line) for line in lines[:-1])
    assert head == {"index": {"_index": "trawl-alerts", "_id": "0123abcd"}}
    assert source["@timestamp"] == "2023-11-14T22:13:20.123456789Z"
    assert source["rule"] == "errors"
    assert source["call"]["src"]["pod"] == CHECKOUT.pod
    assert call_head == {"index": {"_index": "calls", "_id": "c1"}}
    assert call_source["@timestamp"] == timestamp(1_699_999_999_000_000_000)
    assert call_source["id"] == "c1"


def test_s3_keys_are_per_rule_and_day() -> None:
    assert object_key(alert_with(CHECKOUT, PAYMENTS), "alerts/") == "alerts/errors/2023/11/14/0123abcd.json"


def test_dead_letter_ids_are_per_alert_and_target() -> None:
    alert = alert_with(CHECKOUT, PAYMENTS)
    hook = dead_letter_headers(DeliveryFailure(alert, WebhookAction("https://h/x/y", "slack"), "HTTP 500", 3), "Id")
    # As before the other actions came, so a redelivered alert's dead letter is still stored once.
    assert hook["Id"] == "0123abcd:dead:https://h:slack"
    assert (hook["Trawl-Webhook"], hook["Trawl-Action"], hook["Trawl-Attempts"]) == ("https://h", "webhook", "3")
    influx = dead_letter_headers(
        DeliveryFailure(alert, InfluxAction("http://i:8086", db="t"), "HTTP 400: unable to parse\r\n'x'\n", 1), "Id"
    )
    assert influx["Trawl-Failure"] == "HTTP 400: unable to parse 'x'"  # a header value is one line
    assert influx["Id"] == "0123abcd:dead:http://i:8086/t"
    assert "Trawl-Webhook" not in influx


class Held:
    """A webhook endpoint that holds every request until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = 0
        self.two_arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.arrived += 1
        if self.arrived == 2:
            self.two_arrived.set()
        await request.read()
        await self.release.wait()
        return web.Response(status=204)


@pytest.fixture
async def held() -> AsyncIterator[tuple[Held, str]]:
    state = Held()
    app = web.Application()
    app.router.add_post("/held", state.handle)

    async def free(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app.router.add_post("/free", free)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield state, f"http://127.0.0.1:{runner.addresses[0][1]}"
    state.release.set()
    await runner.cleanup()


async def test_a_target_over_its_bound_is_dead_lettered_at_once_and_others_go_on(held: tuple[Held, str]) -> None:
    state, base = held
    dead: list[DeliveryFailure] = []

    async def dead_letter(failure: DeliveryFailure) -> None:
        dead.append(failure)

    metrics = Registry()
    slow = WebhookAction(f"{base}/held", "json")
    fast = WebhookAction(f"{base.replace('127.0.0.1', 'localhost')}/free", "json")
    alert = alert_with(CHECKOUT, PAYMENTS)
    async with aiohttp.ClientSession() as session:
        sender = ActionSender(
            lambda: session, WebhookSettings(max_in_flight=2, retries=0), ActionSettings(), dead_letter, metrics
        )
        # Two groups' alerts (one group's would go one after the other, as the next test shows).
        holding = [
            asyncio.create_task(sender.deliver(alert_with(CHECKOUT, PAYMENTS, group=group), slow))
            for group in ("a", "b")
        ]
        await asyncio.wait_for(state.two_arrived.wait(), 10)
        # The third to the held target is refused without waiting; another target is delivered.
        assert not await sender.deliver(alert, slow)
        assert await sender.deliver(alert, fast)
        [failure] = dead
        assert failure.reason.startswith("overflow: 2 deliveries to http://127.0.0.1:")
        assert failure.attempts == 0
        assert metrics.counter("trawl_alerter_actions_overflow_total", "").get(rule="errors", action="webhook") == 1
        assert metrics.counter("trawl_alerter_dead_letters_total", "").get(rule="errors") == 1
        assert metrics.gauge("trawl_alerter_actions_in_flight", "").get() == 2
        state.release.set()
        assert await asyncio.gather(*holding) == [True, True]
        # Once they finished, the target takes deliveries again.
        assert await sender.deliver(alert, slow)
    delivered = metrics.counter("trawl_alerter_actions_delivered_total", "")
    assert delivered.get(rule="errors", action="webhook") == 4
    assert metrics.gauge("trawl_alerter_actions_in_flight", "").get() == 0


async def test_one_groups_alerts_reach_a_target_in_order(held: tuple[Held, str]) -> None:
    """A windowed rule's resolve made while its firing is still being delivered (held by the target,
    retried, or waiting for its recording's id) is sent after it, never before; another group is
    not held up, nor are a per-call rule's alerts (events of their own)."""
    state, _ = held
    received: list[str] = []
    first_arrived = asyncio.Event()

    async def dead_letter(failure: DeliveryFailure) -> None:
        raise AssertionError(failure)

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        received.append(f"{body.get('group')}:{'resolved' if body.get('resolved') else 'firing'}")
        first_arrived.set()
        if len(received) == 1:
            await state.release.wait()  # the first firing is held
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/ordered", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    action = WebhookAction(f"http://127.0.0.1:{runner.addresses[0][1]}/ordered", "json")
    try:
        async with aiohttp.ClientSession() as session:
            sender = ActionSender(
                lambda: session, WebhookSettings(retries=0), ActionSettings(), dead_letter, Registry()
            )
            firing = asyncio.create_task(
                sender.deliver(alert_with(CHECKOUT, PAYMENTS, group="a", window_calls=5), action)
            )
            await asyncio.wait_for(first_arrived.wait(), 10)
            resolve = asyncio.create_task(
                sender.deliver(
                    alert_with(CHECKOUT, PAYMENTS, id="0123abce", group="a", window_calls=5, resolved=True), action
                )
            )
            other = asyncio.create_task(
                sender.deliver(alert_with(CHECKOUT, PAYMENTS, group="b", window_calls=5), action)
            )
            assert await asyncio.wait_for(other, 10)  # another group goes by the held one
            per_call = alert_with(CHECKOUT, PAYMENTS, id="0123abcf", group="a")
            assert await asyncio.wait_for(sender.deliver(per_call, action), 10)  # not held: no window
            await asyncio.sleep(0.2)
            assert received == ["a:firing", "b:firing", "a:firing"]  # the resolve waits for its firing
            state.release.set()
            assert await asyncio.wait_for(asyncio.gather(firing, resolve), 10) == [True, True]
            assert received == ["a:firing", "b:firing", "a:firing", "a:resolved"]
    finally:
        await runner.cleanup()
