"""`trawl up --interface lo` as a person runs it in a terminal (root): real HTTP requests on
loopback are shown as calls, the collector does not capture its own publishing to the
embedded NATS on the same interface, and Ctrl-C (SIGINT to the whole foreground process
group, nats-server included) stops everything cleanly, leaving no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.conftest import needs_root
from tests.integration.test_up import processes_mentioning


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


@needs_root()
def test_up_on_loopback_then_ctrl_c(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state = tmp_path / "state"
    process = subprocess.Popen(
        [sys.executable, "-m", "trawl", "up", "--interface", "lo", "--json", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, like a terminal's foreground job
    )
    try:
        collector_log = state / "logs" / "collector.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if collector_log.exists() and "service_ready" in collector_log.read_text():
                break
            time.sleep(0.2)
        assert "service_ready" in collector_log.read_text(), collector_log.read_text()[-2000:]
        for index in range(3):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello/{index}", timeout=5) as response:
                assert response.read() == b"hello\n"
        time.sleep(2.0)  # a batch is cut within batch_max_age_ms, then dissected and enriched
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        server.shutdown()
        server.server_close()
    assert "Traceback" not in stderr
    paths = sorted(line.split('"path":"')[1].split('"')[0] for line in stdout.splitlines() if f":{port}" in line)
    assert paths == ["/hello/0", "/hello/1", "/hello/2"], stdout
    logs = {path.name: path.read_text() for path in (state / "logs").iterdir()}
    stopped = [line for line in logs["collector.log"].splitlines() if "capture_stopped" in line]
    assert stopped and '"kernel_drops": 0' in stopped[0] and '"dropped_batches": 0' in stopped[0]
    for name, text in logs.items():
        assert '"level": "warning"' not in text and '"level": "error"' not in text, f"{name}: {text[-1500:]}"
    assert processes_mentioning(str(state)) == []
