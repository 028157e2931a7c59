"""Learned routes shared through a real redis-server (trawl.enricher.routes.RedisRouteStore):
two enricher instances agree on collapsed positions whichever one learned them, a restarted
one starts from what was learned, and Redis going away loses nothing but the sharing (counted)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.conftest import needs_binary
from tests.integration.test_identity_shared import RedisServer, wait_for
from trawl.enricher.config import EnricherSettings, RouteSettings
from trawl.enricher.logic import Enricher, enricher_from_settings
from trawl.metrics import Registry
from trawl.v1.calls_pb2 import ApiCall

pytestmark = [needs_binary("redis-server")]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def enricher(server: RedisServer, metrics: Registry | None = None, interval_s: float = 3600.0) -> Enricher:
    routes = RouteSettings(enabled=True, collapse_after=3, sync_interval_s=interval_s)
    # The identity's Redis setting is the routes' too when they have none of their own.
    settings = EnricherSettings(routes=routes, identity_redis_url=f"redis://127.0.0.1:{server.port}/0")
    return enricher_from_settings(settings, metrics)


def route(instance: Enricher, path: str, service: str = "cart") -> str:
    call = ApiCall(id="c", protocol="http", method="GET", path=path)
    call.dst.ip, call.dst.port, call.dst.namespace, call.dst.service = "10.1.0.5", 80, "shop", service
    call.http.host = "cart"
    (enriched,) = instance.enrich_encoded([call.SerializeToString()])
    return ApiCall.FromString(enriched).http.route


def test_a_restarted_enricher_and_a_second_replica_start_from_the_learned_routes(redis_server: RedisServer) -> None:
    first = enricher(redis_server)
    assert [route(first, f"/carts/{name}/items") for name in ("ann", "ben", "cid")] == [
        "/carts/ann/items",
        "/carts/ben/items",
        "/carts/cid/items",
    ]
    assert route(first, "/carts/dan/items") == "/carts/{param}/items"
    assert route(first, "/health") == "/health"
    first.shutdown()  # writes what it learned

    stored = redis.Redis(port=redis_server.port)
    assert stored.smembers("trawl:routes:v1:collapsed:shop/cart") == {b"/carts"}
    assert b"/carts/{param}/items" in stored.smembers("trawl:routes:v1:routes:shop/cart")

    second = enricher(redis_server)  # a restart, or another replica: one name never seen here
    assert route(second, "/carts/eve/items") == "/carts/{param}/items"
    assert route(second, "/health") == "/health"
    assert second.routes is not None and second.routes.routes("shop/cart") == {"/carts/{param}/items", "/health"}
    second.shutdown()


def test_running_replicas_pick_up_each_others_collapses(redis_server: RedisServer) -> None:
    one, two = enricher(redis_server, interval_s=0.05), enricher(redis_server, interval_s=0.05)
    assert route(two, "/orders/a") == "/orders/a"
    for name in ("a", "b", "c", "d"):
        route(one, f"/orders/{name}")
    assert route(one, "/orders/a") == "/orders/{param}"
    # Each batch hands over what was learned and takes in what the store's thread read since.
    wait_for(lambda: route(two, "/orders/a") == "/orders/{param}", "the other replica's collapse")
    assert route(two, "/orders/zzz") == "/orders/{param}"
    one.shutdown()
    two.shutdown()


def test_redis_away_routes_go_on_locally_and_are_written_when_it_is_back(redis_server: RedisServer) -> None:
    metrics = Registry()
    instance = enricher(redis_server, metrics, interval_s=0.05)
    stored = redis.Redis(port=redis_server.port)
    key = "trawl:routes:v1:routes:shop/cart"
    route(instance, "/before")
    wait_for(lambda: stored.sismember(key, "/before"), "the first write")
    redis_server.stop()  # and started again empty (no persistence): what it held is written again
    assert route(instance, "/while/away") == "/while/away"
    wait_for(lambda: metrics.snapshot()["trawl_enricher_routes_redis_errors_total"] >= 1, "a failed sync")
    redis_server.start()
    route(instance, "/back")
    wait_for(lambda: {b"/before", b"/while/away", b"/back"} <= stored.smembers(key), "the writes")
    instance.shutdown()
