"""`trawl up`: the whole suite on one machine.

Starts an embedded NATS server (unless --nats-url), writes one YAML config for the five
services, starts each as its own OS process (`python -m trawl <service> --config FILE`),
waits until each announces itself ready, then starts the collector and shows the enriched
calls as they come (a table, or NDJSON with --json). With --pcap it stops once every stage
has announced that it drained the file; SIGINT/SIGTERM stop everything. Children run in
their own sessions so a terminal's Ctrl-C reaches only this process, which then stops them in
pipeline order and kills what does not stop in time: no process is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import yaml
from nats.aio.msg import Msg

from trawl.bus import Bus
from trawl.collector.replay import CaptureFile
from trawl.config import NatsSettings, YamlDocument
from trawl.embedded import EmbeddedNats
from trawl.enricher.span_totals import EXPORT_TOTALS_EVENT, TOTALS_EVENT, ExportTotals, SpanTotals
from trawl.errors import ConfigError, UserError
from trawl.logs import configure_logging, get_logger
from trawl.procs import die_with_parent
from trawl.render import JsonLinesWriter, TableWriter, call_to_json
from trawl.v1.alerts_pb2 import Alert, Severity
from trawl.v1.calls_pb2 import ApiCall
from trawl.v1.control_pb2 import Drained

log = get_logger(__name__)

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


@dataclass
class UpOptions:
    pcap: Path | None = None
    interfaces: list[str] = field(default_factory=list)
    identity: Path | None = None
    # Watch this cluster for identities; None: the KUBECONFIG variable's, when it is set.
    kubeconfig: Path | None = None
    rules: Path | None = None
    record_dir: Path | None = None
    nats_url: str | None = None
    otlp_endpoint: str | None = None
    as_json: bool = False
    config_file: Path | None = None
    state_dir: Path | None = None
    # TLS plaintext through eBPF uprobes (collector.tls.mode on).
    tls: bool = False


def suite_config(options: UpOptions, nats_url: str) -> dict[str, Any]:
    """The one YAML document every service reads: the user's --config, with the flags on top."""
    base = YamlDocument.read(options.config_file).data if options.config_file else {}
    config: dict[str, Any] = {key: (dict(value) if isinstance(value, dict) else value) for key, value in base.items()}

    def section(name: str) -> dict[str, Any]:
        value = config.setdefault(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"'{name}' must be a mapping", path=options.config_file)
        return value

    nats = config.setdefault("nats", {})
    nats["servers"] = [nats_url]
    nats.setdefault("connect_attempts", 10)
    # One dissector process takes every shard (leases are for replicas spread over a cluster).
    section("dissector").setdefault("shard_assignment", "all")
    if options.pcap is not None:
        section("collector")["pcap"] = str(options.pcap.resolve())
        # A file is read faster than a backend may take its spans: wait for room, never drop.
        section("enricher").setdefault("export_wait_for_room", True)
    if options.interfaces:
        section("collector")["interfaces"] = options.interfaces
    if options.tls:
        if options.pcap is not None:
            raise UserError("--tls reads live processes: use it with --interface, not --pcap")
        tls = section("collector").setdefault("tls", {})
        if not isinstance(tls, dict):
            raise ConfigError("'collector.tls' must be a mapping", path=options.config_file)
        # "on": a machine where BPF cannot load stops the suite at start with the reason.
        tls["mode"] = "on"
    if options.identity is not None:
        section("enricher")["identity_snapshot"] = str(options.identity.resolve())
    if options.kubeconfig is not None:
        section("enricher")["kube_watch"] = True
        section("enricher")["kubeconfig"] = str(options.kubeconfig.resolve())
    elif os.environ.get("KUBECONFIG"):  # like kubectl: the enricher inherits the variable
        section("enricher")["kube_watch"] = True
    if options.otlp_endpoint is not None:
        section("enricher")["otlp_endpoint"] = options.otlp_endpoint
    if options.rules is not None:
        section("alerter")["rules_file"] = str(options.rules.resolve())
    if options.record_dir is not None:
        section("recorder")["directory"] = str(options.record_dir.resolve())
    return config


class Suite:
    """The child processes and what they announced."""

    def __init__(self, config_path: Path, log_dir: Path, services: list[str]) -> None:
        self.config_path = config_path
        self.log_dir = log_dir
        self.services = services
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ready: set[str] = set()
        self.drained: dict[str, Drained] = {}
        self.changed = asyncio.Event()

    def start(self, service: str) -> None:
        log_file = (self.log_dir / f"{service}.log").open("wb")
        self.processes[service] = subprocess.Popen(
            [sys.executable, "-m", "trawl", service, "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log_file.close()

    def log_tail(self, service: str, lines: int = 5) -> str:
        path = self.log_dir / f"{service}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def failed(self) -> tuple[str, int] | None:
        """A child that exited with an error (the collector exiting 0 after a file is normal)."""
        for service, process in self.processes.items():
            code = process.poll()
            if code not in (None, 0):
                return service, code
        return None

    async def wait_for(self, predicate: Any, what: str, timeout_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while not predicate():
            if (failure := self.failed()) is not None:
                service, code = failure
                raise UserError(f"the {service} service exited with {code}: {self.log_tail(service, 1)}")
            if deadline is not None and loop.time() > deadline:
                raise UserError(f"timed out after {timeout_s:.0f}s waiting for {what}; logs in {self.log_dir}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.2)

    def stop(self) -> None:
        """SIGTERM in pipeline order (sources first, so later stages can drain), then kill stragglers."""
        order = ["collector", "dissector", "enricher", "alerter", "recorder"]
        for service in order:
            process = self.processes.get(service)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for service in order:
            process = self.processes.get(service)
            if process is None:
                continue
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("service_killed", service=service)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


class DrainedRelay:
    """The enricher's drained announcement, told again to an alerter that became ready after it.

    The collector starts with the alerter, so on a small file the enricher may have drained
    before the alerter subscribed to its announcement (core NATS: gone by then), and the alerter
    would wait for it forever. The alerter announces `ready` on the connection it subscribed on,
    after subscribing; NATS keeps one connection's order, so an announcement trawl up got before
    that ready is one the alerter may have missed, and one published after reaches it. Told twice,
    it takes the highest stream sequence it was told: no harm."""

    def __init__(self) -> None:
        self._announced: dict[str, tuple[str, bytes]] = {}

    def drained(self, service: str, subject: str, payload: bytes) -> None:
        self._announced[service] = (subject, payload)

    def ready(self, service: str) -> tuple[str, bytes] | None:
        """(subject, payload) to publish again now that `service` is ready, or None."""
        if service == "alerter":
            return self._announced.get("enricher")
        return None


class _WaitingWriter(io.RawIOBase):
    """A file descriptor written in full, waiting while it is full. A parent may hand trawl up a
    non-blocking pipe (the flag belongs to the pipe, shared by every process holding it): print()
    to it fails with BlockingIOError once its reader pauses, and the lines of those calls were
    lost, or cut and run into the next."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += os.write(self.fd, view[done:])
            except BlockingIOError:
                select.select([], [self.fd], [])
        return done


def _blocking_stdout() -> None:
    """sys.stdout that never loses part of a line to a non-blocking pipe."""
    try:
        fd = sys.stdout.fileno()
        if os.get_blocking(fd):
            return
    except (AttributeError, OSError, ValueError):
        return  # not a file descriptor (a test's capture): nothing to do
    sys.stdout.flush()
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(_WaitingWriter(fd)),
        encoding=sys.stdout.encoding,
        errors=sys.stdout.errors,
        line_buffering=True,
    )


async def _run(options: UpOptions, nats_url: str, state_dir: Path) -> int:
    config_path = state_dir / "trawl.yaml"
    config_path.write_text(yaml.safe_dump(suite_config(options, nats_url), sort_keys=False))
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    services = ["dissector", "enricher", "alerter", "recorder"]
    if options.rules is None:
        services.remove("alerter")
    if options.record_dir is None:
        services.remove("recorder")
    suite = Suite(config_path, log_dir, services)
    bus = await Bus.connect(NatsSettings(servers=[nats_url]), name="trawl-up", servers_option="--nats-url")
    _blocking_stdout()
    table = None if options.as_json else TableWriter(sys.stdout)
    shown = 0

    relay = DrainedRelay()

    async def on_ready(msg: Msg) -> None:
        service = msg.subject.split(".")[4]
        suite.ready.add(service)
        suite.changed.set()
        if (again := relay.ready(service)) is not None:
            await bus.publish(*again)

    async def on_drained(msg: Msg) -> None:
        drained = Drained.FromString(msg.data)
        suite.drained[drained.service] = drained
        relay.drained(drained.service, msg.subject, msg.data)
        suite.changed.set()

    binary: BinaryIO | None = getattr(sys.stdout, "buffer", None)
    lines = JsonLinesWriter(binary) if table is None and binary is not None else None

    def on_calls(messages: list[tuple[bytes, bytes]]) -> None:
        """The enriched calls of one read from the bus (Bus.subscribe_batches): NDJSON straight
        from the serialized calls in one write (no object; the compiled encoder reads the bytes)."""
        nonlocal shown
        shown += len(messages)
        if lines is not None and binary is not None:
            lines.write([payload for _, payload in messages])
            binary.flush()
        elif table is None:
            sys.stdout.write("".join(call_to_json(payload) + "\n" for _, payload in messages))
            sys.stdout.flush()
        else:
            for _, payload in messages:
                table.write(ApiCall.FromString(payload))

    async def on_alert(msg: Msg) -> None:
        alert = Alert.FromString(msg.data)
        dead = msg.subject.startswith("trawl.v1.alerts._dead.")
        severity = Severity.Name(alert.severity).removeprefix("SEVERITY_").lower()
        if table is None:
            log.warning(
                "alert_undelivered" if dead else "alert", rule=alert.rule, severity=severity, summary=alert.summary
            )
        else:
            marker = "UNDELIVERED ALERT" if dead else "ALERT"
            sys.stdout.write(f"!! {marker} [{severity}] {alert.rule}: {alert.summary}\n")
            sys.stdout.flush()

    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    await bus.subscribe("trawl.v1.control.ready.>", on_ready)
    await bus.subscribe("trawl.v1.control.drained.>", on_drained)
    await bus.subscribe_batches("trawl.v1.enriched.>", on_calls)
    await bus.subscribe("trawl.v1.alerts.>", on_alert)
    await bus.nc.flush()
    # A file's packets may go before the dissector, the enricher and the alerter are ready: the
    # collector makes sure TRAWL_PACKETS exists before it publishes, and each reads its stream
    # from its first message (the dissector's packets, the enricher's calls, the alerter's
    # enriched calls: a durable consumer that delivers all). Starting all at once saves the
    # collector's start-up (about half a second) after the others'. The recorder is waited for:
    # what it reads first is what came after it started.
    early_collector = options.pcap is not None and "recorder" not in services
    try:
        for service in services:
            suite.start(service)
        if early_collector:
            suite.start("collector")
        await _until(
            suite.wait_for(lambda: suite.ready >= set(services), "the services to start", READY_TIMEOUT_S),
            stop_requested,
        )
        if not early_collector:
            suite.start("collector")
        if options.pcap is None:
            await _until(suite.wait_for(lambda: False, "a signal", None), stop_requested)
        else:
            await _until(
                suite.wait_for(lambda: set(services) <= set(suite.drained), "the file to be processed", None),
                stop_requested,
            )
            log.info(
                "up_done",
                calls_shown=shown,
                emitted={name: drained.emitted for name, drained in suite.drained.items()},
                recordings=[f for drained in suite.drained.values() for f in drained.files],
            )
    finally:
        await bus.close()
        suite.stop()
        if "enricher" in suite.processes:
            _print_span_totals(suite, options)
    return 130 if stop_requested.is_set() else 0


def _print_span_totals(suite: Suite, options: UpOptions) -> None:
    """The enricher's span totals, then its metric points and export retries, read back from the
    last events it logged when it stopped (it runs as its own process; its log is the one
    channel still there once it has exited)."""
    path = suite.log_dir / "enricher.log"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    totals: SpanTotals | None = None
    exports: ExportTotals | None = None
    for line in reversed(lines):
        if totals is not None and exports is not None:
            break
        if TOTALS_EVENT not in line and EXPORT_TOTALS_EVENT not in line:
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if not isinstance(record, dict):
                continue
            if totals is None and record.get("event") == TOTALS_EVENT:
                totals = SpanTotals.from_log_fields(record)
            elif exports is None and record.get("event") == EXPORT_TOTALS_EVENT:
                exports = ExportTotals.from_log_fields(record)
    # The span line last: what scripts read (the metrics line comes just before it).
    if exports is not None:
        print(exports.line(), file=sys.stderr)  # noqa: T201 - the summary line a user reads
    if totals is not None:
        print(totals.line(), file=sys.stderr)  # noqa: T201 - the summary line a user reads
    elif options.otlp_endpoint is not None:
        print(  # noqa: T201 - the summary line a user reads
            f"spans: no totals: the enricher did not report them when it stopped (log: {path})", file=sys.stderr
        )


async def _until(work: Any, stop: asyncio.Event) -> None:
    """Run `work` unless a stop is requested first."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, stopper):
        if pending not in done:
            pending.cancel()
    if task in done:
        task.result()


def up(options: UpOptions) -> int:
    configure_logging("info", "auto")
    # Inputs that would make a service fail at start fail here, before anything starts.
    if options.pcap is not None:
        CaptureFile(options.pcap)
    # Imported only when used: the rules' CEL parser and the identity map cost start-up time.
    if options.rules is not None:
        from trawl.alerter.rules import load_rules

        load_rules(options.rules)
    if options.identity is not None:
        from trawl.enricher.identity import IdentityMap

        IdentityMap.from_snapshot(options.identity)
    if options.kubeconfig is not None or os.environ.get("KUBECONFIG"):
        from trawl.enricher.k8s_watch import kube_api_client

        kube_api_client(options.kubeconfig)  # a kubeconfig that cannot be used fails here, named
    state_dir = options.state_dir or Path(tempfile.mkdtemp(prefix="trawl-up-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        if options.nats_url:
            return asyncio.run(_run(options, options.nats_url, state_dir))
        with EmbeddedNats(state_dir=state_dir / "nats") as server:
            return asyncio.run(_run(options, server.url, state_dir))
    finally:
        if options.state_dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)
