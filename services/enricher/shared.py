"""Identity shared between enricher replicas through Redis: one watches, every one reads.

With `identity_redis_url` set, N enricher replicas agree on identity without N watches on the
API server:

- `LeaseElection`: the replicas contend for a coordination.k8s.io/v1 Lease (`lease_name` in
  `lease_namespace`), the way client-go's leader election does: the holder renews
  `spec.renewTime` every `lease_renew_s`; another replica takes the Lease over once
  `renewTime + leaseDurationSeconds` has passed, by a replace carrying the resourceVersion it
  read (the API server refuses it with 409 when someone else wrote first). A leader that
  cannot renew for a whole lease duration steps down on its own, so two leaders never watch
  for longer than that.
- The leader runs the Kubernetes watch (KubeWatcher into a ClusterHistory seeded with what it
  read from Redis, reconciled with its first lists) and a `RedisPublisher`: every address
  whose claims changed (IdentityMap.changed_since) is written to the hash
  `trawl:identity:<cluster>:claims` (address -> its claims as `claims_to_json` writes them,
  history included) and announced on the channel `trawl:identity:<cluster>:changes` (a JSON
  array of addresses, or `*` after a full rewrite).
- Every other replica runs a `RedisReader`: subscribed to the channel first, then the whole
  hash read into its own IdentityMap, then each announced address read again. Its map is the
  leader's, at most one announcement behind.

Redis going away: the reader keeps its last view and enriches from it, the publisher keeps
the watch's changes in its map; each says so once in the log (`identity_redis_failed`, with
the reason) and in `trawl_enricher_identity_redis_up{role}`. When Redis is back the
publisher rewrites the whole hash (Redis may have restarted empty: a changed server run_id
tells, even when the client's own retries hid the outage) and the reader reads the whole hash
again: both catch up.

Not covered: objects created and deleted while no replica leads (the Lease expiring after a
leader died) are never seen, as with any informer's relist; the new leader's first lists end
what the shared history still held open and is gone.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis

from trawl.enricher.cluster import ClusterHistory
from trawl.enricher.config import EnricherSettings
from trawl.enricher.identity import IdentityMap, claims_from_json, claims_to_json
from trawl.enricher.k8s_watch import KubeWatcher, kube_api_client
from trawl.errors import InputError
from trawl.logs import get_logger
from trawl.metrics import Registry

log = get_logger(__name__)

ANNOUNCE_ALL = b"*"


class SharedKeys:
    def __init__(self, cluster: str) -> None:
        prefix = f"trawl:identity:{cluster or 'default'}"
        self.claims = f"{prefix}:claims"
        self.changes = f"{prefix}:changes"


class _RedisState:
    """Up/down of one Redis role, logged once per change and shown by a gauge."""

    def __init__(self, role: str, metrics: Registry) -> None:
        self.role = role
        self.failing = ""
        self._up = metrics.gauge(
            "trawl_enricher_identity_redis_up", "1 while identity is shared through Redis, by role"
        )
        self._errors = metrics.counter("trawl_enricher_identity_redis_errors_total", "Redis failures, by role")
        self._up.set(0, role=role)

    def ok(self) -> None:
        self._up.set(1, role=self.role)
        if self.failing:
            log.info("identity_redis_recovered", role=self.role, after=self.failing)
        self.failing = ""

    def failed(self, exc: Exception) -> None:
        self._up.set(0, role=self.role)
        self._errors.inc(role=self.role)
        reason = f"{type(exc).__name__}: {exc}"
        if not self.failing:
            log.warning(
                "identity_redis_failed",
                role=self.role,
                error=reason,
                keeping="the last view"
                if self.role == "reader"
                else "the watch's changes, rewritten when Redis is back",
                fix="check that Redis at identity_redis_url is up and reachable",
            )
        self.failing = reason


class _Loop:
    """A daemon thread running one role's loop until stopped: the publisher, the reader and
    the election below are each one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, run: Callable[[], None]) -> None:
        self.stopping.clear()
        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(5)


class RedisPublisher:
    """The leader's side: changed addresses written to Redis and announced (see the module docstring)."""

    def __init__(
        self, client: redis.Redis, identity: IdentityMap, keys: SharedKeys, metrics: Registry, interval_s: float = 0.2
    ) -> None:
        self.client = client
        self.identity = identity
        self.keys = keys
        self.interval_s = interval_s
        self.state = _RedisState("publisher", metrics)
        self._published: int | None = None  # the map's generation in Redis; None: rewrite it all
        self._run_id = ""  # the Redis server's run_id at the last publication: a restart loses the hash
        self._loop = _Loop("identity-publisher")
        self._stopping = self._loop.stopping

    def publish_once(self) -> int:
        """Write what changed since the last publication; returns how many addresses were written."""
        generation = self.identity.generation
        changed = None if self._published is None else self.identity.changed_since(self._published)
        if changed is not None and not changed:
            return 0
        # A Redis that restarted (its client reconnected and retried without an error reaching
        # here) has lost the hash: write it all.
        run_id = str(self.client.info("server").get("run_id", ""))
        if run_id != self._run_id:
            changed = None
        pipe = self.client.pipeline(transaction=True)
        if changed is None:
            addresses = {claim.ip for claim in self.identity.claims()}
            pipe.delete(self.keys.claims)
            mapping = {ip: claims_to_json(self.identity.claims_of(ip)) for ip in addresses}
            if mapping:
                pipe.hset(self.keys.claims, mapping=mapping)  # type: ignore[arg-type]
            pipe.publish(self.keys.changes, ANNOUNCE_ALL)
        else:
            addresses = changed
            for ip in sorted(changed):
                claims = self.identity.claims_of(ip)
                if claims:
                    pipe.hset(self.keys.claims, ip, claims_to_json(claims))
                else:
                    pipe.hdel(self.keys.claims, ip)
            pipe.publish(self.keys.changes, json.dumps(sorted(changed)))
        pipe.execute()
        self._published = generation
        self._run_id = run_id
        return len(addresses)

    def start(self) -> RedisPublisher:
        self._loop.start(self._run)
        return self

    def stop(self) -> None:
        self._loop.stop()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.publish_once()
                self.state.ok()
            except redis.RedisError as exc:
                self._published = None  # Redis may come back empty: write it all then
                self.state.failed(exc)
            self._stopping.wait(self.interval_s)


class RedisReader:
    """A follower's side: the leader's history read into the local map (see the module docstring)."""

    def __init__(
        self, client: redis.Redis, identity: IdentityMap, keys: SharedKeys, metrics: Registry, cluster: str = ""
    ) -> None:
        self.client = client
        self.identity = identity
        self.keys = keys
        self.cluster = cluster
        self.state = _RedisState("reader", metrics)
        self._bad = metrics.counter("trawl_enricher_identity_redis_bad_entries_total", "Redis entries not read")
        self.loads = 0  # whole-hash reads
        self._loop = _Loop("identity-reader")
        self._stopping = self._loop.stopping

    def load_all(self) -> None:
        entries: dict[bytes, bytes] = self.client.hgetall(self.keys.claims)  # type: ignore[assignment]
        known = set()
        for key, data in entries.items():
            ip = key.decode("utf-8", "replace")
            known.add(ip)
            self._load(ip, data)
        for ip in {claim.ip for claim in self.identity.claims()} - known:
            self.identity.set_claims(ip, [])
        self.loads += 1

    def load(self, ip: str) -> None:
        data: bytes | None = self.client.hget(self.keys.claims, ip)  # type: ignore[assignment]
        if data is None:
            self.identity.set_claims(ip, [])
        else:
            self._load(ip, data)

    def _load(self, ip: str, data: bytes) -> None:
        try:
            claims = claims_from_json(data, f"redis {self.keys.claims} {ip}", self.cluster)
        except InputError as exc:
            self._bad.inc()
            log.warning("identity_redis_entry_unreadable", address=ip, error=str(exc))
            return
        self.identity.set_claims(ip, claims)

    def start(self) -> RedisReader:
        self._loop.start(self._run)
        return self

    def stop(self) -> None:
        self._loop.stop()

    def _run(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.keys.changes)  # before the read: no announcement falls in between
                self.load_all()
                self.state.ok()
                backoff = 0.2
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message["data"]
                    if data == ANNOUNCE_ALL:
                        self.load_all()
                        continue
                    for ip in json.loads(data):
                        self.load(str(ip))
            except (redis.RedisError, ValueError, TypeError) as exc:
                self.state.failed(exc)
                self._stopping.wait(backoff)
                backoff = min(5.0, backoff * 2)
            finally:
                pubsub.close()


def _micro_time(moment: float) -> str:
    """A Lease's MicroTime (RFC 3339 with microseconds, UTC)."""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: object) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class LeaseElection:
    """Leader election through a coordination.k8s.io/v1 Lease (see the module docstring)."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        holder: str,
        on_change: Callable[[bool], None],
        *,
        duration_s: float = 15.0,
        renew_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from kubernetes import client

        self.api: Any = client.CoordinationV1Api(api_client)  # raw JSON answers (_preload_content=False)
        self.namespace = namespace
        self.name = name
        self.holder = holder
        self.on_change = on_change
        self.duration_s = duration_s
        self.renew_s = renew_s
        self.clock = clock
        self.is_leader = False
        self._renewed = 0.0
        self._loop = _Loop("identity-election")
        self._stopping = self._loop.stopping

    def step(self) -> bool:
        """One try to take or keep the Lease; returns whether this replica holds it."""
        from kubernetes.client.exceptions import ApiException

        now = self.clock()
        try:
            response = self.api.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
            lease = json.loads(response.data)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": self.name, "namespace": self.namespace}, "spec": self._spec(now, 0, now)}
            try:
                self.api.create_namespaced_lease(self.namespace, body)
            except ApiException as conflict:
                if conflict.status == 409:  # another replica created it first
                    return False
                raise
            self._renewed = now
            return True
        spec = lease.get("spec") or {}
        current = spec.get("holderIdentity") or ""
        renewed = _parse_time(spec.get("renewTime"))
        duration = float(spec.get("leaseDurationSeconds") or self.duration_s)
        if current and current != self.holder and renewed is not None and now < renewed + duration:
            return False  # held, and fresh
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if current == self.holder else 1)
        acquired = spec.get("acquireTime") if current == self.holder else _micro_time(now)
        lease["spec"] = self._spec(now, transitions, _parse_time(acquired) or now)
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as conflict:
            if conflict.status == 409:  # someone wrote since our read: theirs
                return False
            raise
        self._renewed = now
        return True

    def _spec(self, now: float, transitions: int, acquired: float) -> dict[str, object]:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": max(1, round(self.duration_s)),
            "acquireTime": _micro_time(acquired),
            "renewTime": _micro_time(now),
            "leaseTransitions": transitions,
        }

    def start(self) -> LeaseElection:
        self._loop.start(self._run)
        return self

    def stop(self, release: bool = True) -> None:
        """Stop contending; `release`: a leader empties the Lease so another takes over at once."""
        self._loop.stop()
        if release and self.is_leader:
            try:
                response = self.api.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
                lease = json.loads(response.data)
                if (lease.get("spec") or {}).get("holderIdentity") == self.holder:
                    lease["spec"]["holderIdentity"] = ""
                    self.api.replace_namespaced_lease(self.name, self.namespace, lease)
            except Exception as exc:  # the API server away: the Lease expires by itself
                log.info("identity_lease_not_released", error=repr(exc))
        self._set(False)

    def _set(self, leading: bool) -> None:
        if leading != self.is_leader:
            self.is_leader = leading
            log.info("identity_leadership", leader=leading, holder=self.holder, lease=f"{self.namespace}/{self.name}")
            self.on_change(leading)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                leading = self.step()
            except Exception as exc:  # the API server away: keep the lead only while the Lease is ours
                log.info("identity_lease_unreachable", error=repr(exc))
                leading = self.is_leader and self.clock() < self._renewed + self.duration_s
            if self._stopping.is_set():
                return
            self._set(leading)
            self._stopping.wait(self.renew_s)


def default_holder() -> str:
    """This replica's name in the Lease: the pod's name (its host name) and the process id."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}-{os.getpid()}"


def default_namespace() -> str:
    """The pod's own namespace (POD_NAMESPACE, else the service account's), else `default`."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as namespace:
            return namespace.read().strip() or "default"
    except OSError:
        return "default"


class SharedIdentity:
    """What the enricher runs with `identity_redis_url`: read the shared history, and when it
    wins the Lease (and `kube_watch` is on) watch the cluster and publish instead."""

    def __init__(self, settings: EnricherSettings, identity: IdentityMap, metrics: Registry) -> None:
        assert settings.identity_redis_url is not None
        self.settings = settings
        self.identity = identity
        self.metrics = metrics
        self.client = redis.Redis.from_url(
            settings.identity_redis_url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=10
        )
        self.keys = SharedKeys(settings.cluster)
        self.reader: RedisReader | None = None
        self.publisher: RedisPublisher | None = None
        self.watcher: KubeWatcher | None = None
        self.election: LeaseElection | None = None
        self._lock = threading.Lock()
        self._api_client = kube_api_client(settings.kubeconfig) if settings.kube_watch else None

    def start(self) -> SharedIdentity:
        self._follow()
        if self._api_client is not None:
            self.election = LeaseElection(
                self._api_client,
                self.settings.lease_namespace or default_namespace(),
                self.settings.lease_name,
                self.settings.lease_holder or default_holder(),
                self._leadership,
                duration_s=self.settings.lease_duration_s,
                renew_s=self.settings.lease_renew_s,
            ).start()
        return self

    def stop(self, release: bool = True) -> None:
        if self.election is not None:
            self.election.stop(release)
        with self._lock:
            self._stop_leading()
            if self.reader is not None:
                self.reader.stop()
                self.reader = None

    def status_line(self) -> str:
        role = "leader" if self.election is not None and self.election.is_leader else "reader"
        parts = [f"identity shared through Redis as {role}"]
        for state in (self.reader.state if self.reader else None, self.publisher.state if self.publisher else None):
            if state is not None and state.failing:
                parts.append(f"Redis {state.role} failing ({state.failing}), enriching from the last view")
        if self.watcher is not None:
            parts.append(self.watcher.status_line())
        return "; ".join(parts)

    def _leadership(self, leading: bool) -> None:
        with self._lock:
            if leading:
                if self.reader is not None:
                    self.reader.stop()
                    self.reader = None
                history = ClusterHistory(
                    self.identity, self.settings.cluster, max_closed_claims=self.settings.max_history_claims
                )
                self.watcher = KubeWatcher(
                    history,
                    self._api_client,
                    self.metrics,
                    watch_timeout_s=self.settings.kube_watch_timeout_s,
                    request_timeout_s=self.settings.kube_request_timeout_s,
                    backoff_max_s=self.settings.kube_backoff_max_s,
                ).start()
                self.publisher = RedisPublisher(self.client, self.identity, self.keys, self.metrics).start()
            else:
                self._stop_leading()
                self._follow_locked()

    def _stop_leading(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.publisher is not None:
            self.publisher.stop()
            self.publisher = None

    def _follow(self) -> None:
        with self._lock:
            self._follow_locked()

    def _follow_locked(self) -> None:
        if self.reader is None:
            self.reader = RedisReader(
                self.client, self.identity, self.keys, self.metrics, self.settings.cluster
            ).start()
