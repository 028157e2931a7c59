"""The enricher service (its own process, as deployed) watching the stand-in kube-apiserver
(tests/kube_apiserver.py) with `kube_watch`: an API server that denies a resource leaves it
enriching from what it knows, says so once in its log with the fix, in /readyz and in
trawl_enricher_kube_watch_up, and catches up once the permission is back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from nats.js.errors import NotFoundError

from tests.fixtures.tcpdump_capture import free_port
from tests.integration.test_enricher_service import RUN_MAIN
from tests.kube_apiserver import KubeApiServer, pod
from trawl.bus import STREAM_CALLS, Bus, control_subject
from trawl.config import NatsSettings


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def eventually(url: str, fragment: str, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        _, body = await asyncio.to_thread(get, url)
        if fragment in body:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} never said {fragment!r}; last:\n{body}")
        await asyncio.sleep(0.1)


async def test_denied_pods_are_reported_and_caught_up(nats_url: str, tmp_path: Path) -> None:
    node = f"kube-{os.getpid()}"
    durable = f"enricher-{node}"
    port = free_port()
    with KubeApiServer([pod("api-0", "10.9.0.1", owner=("StatefulSet", "api"))]) as api:
        api.deny("pods")
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        config = tmp_path / "trawl.yaml"
        config.write_text(
            f"node: {node}\nhttp_port: {port}\nlog_format: json\nnats:\n  servers: ['{nats_url}']\n"
            f"enricher:\n  durable: {durable}\n  calls_filter_subject: trawl.v1.calls.{node}.>\n"
            f"  kube_watch: true\n  kubeconfig: {kubeconfig}\n  kube_sync_wait_s: 1\n  kube_backoff_max_s: 0.5\n"
        )
        probe = await Bus.connect(NatsSettings(servers=[nats_url]), "probe")
        ready = asyncio.Event()

        async def on_ready(_: object) -> None:
            ready.set()

        await probe.nc.subscribe(control_subject("ready", "enricher") + f".{node}", cb=on_ready)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RUN_MAIN, str(config), stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": "."}
        )
        try:
            await asyncio.wait_for(ready.wait(), 30)  # ready without pods: it enriches what it knows
            base = f"http://127.0.0.1:{port}"
            status, body = await asyncio.to_thread(get, f"{base}/readyz")
            assert status == 200 and "pods: forbidden" in body and "grant get, list and watch on pods" in body
            metrics = await eventually(f"{base}/metrics", 'trawl_enricher_kube_watch_up{resource="services"} 1')
            assert 'trawl_enricher_kube_watch_up{resource="pods"} 0' in metrics
            assert 'trawl_enricher_kube_watch_errors_total{reason="forbidden",resource="pods"}' in metrics
            api.deny("pods", False)
            await eventually(f"{base}/readyz", ": current")
            await eventually(f"{base}/metrics", 'trawl_enricher_kube_watch_up{resource="pods"} 1')
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 20) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            with contextlib.suppress(NotFoundError):
                await probe.js.delete_consumer(STREAM_CALLS, durable)
            await probe.close()
        assert process.stderr is not None
        events = [
            json.loads(line) for line in (await process.stderr.read()).decode().splitlines() if line.startswith("{")
        ]
        failures = [event for event in events if event.get("event") == "kube_watch_failed"]
        assert [(event["resource"], event["reason"]) for event in failures] == [("pods", "forbidden")]  # once
        assert "ClusterRole" in failures[0]["fix"]
        assert any(event.get("event") == "kube_watch_recovered" for event in events)
