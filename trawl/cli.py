"""The `trawl` command: `analyze`, `up`, and one subcommand per service."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from trawl import __version__
from trawl.config import SERVICES
from trawl.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trawl", description="Kubernetes API traffic analyzer")
    parser.add_argument("--version", action="version", version=f"trawl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = commands.add_parser("analyze", help="dissect a capture file offline and print its API calls")
    analyze.add_argument("file", type=Path, help="a pcap or pcapng file")
    analyze.add_argument("--identity", type=Path, help="`kubectl get pods,services,nodes -A -o json` snapshot")
    analyze.add_argument("--json", action="store_true", help="one ApiCall per line (protobuf JSON, proto field names)")
    analyze.add_argument("--otlp-endpoint", help="also export spans to this OTLP endpoint")
    analyze.add_argument("--config", type=Path, help="YAML config (dissector/enricher sections apply)")
    analyze.add_argument("--node", help="node name to stamp on the calls (default: this host)")
    analyze.add_argument(
        "--proto-descriptors",
        type=Path,
        action="append",
        metavar="FILE",
        help="protoc --descriptor_set_out file: decode the gRPC messages of its methods by name (repeatable)",
    )

    up = commands.add_parser("up", help="run the whole suite on this machine with an embedded NATS server")
    source = up.add_mutually_exclusive_group()
    source.add_argument("--pcap", type=Path, help="replay this capture file and exit when it is processed")
    source.add_argument("--interface", action="append", help="capture live on this interface (repeatable)")
    up.add_argument("--identity", type=Path, help="identity snapshot for the enricher")
    up.add_argument(
        "--kubeconfig",
        type=Path,
        help="watch this cluster for identities (default: the KUBECONFIG variable, when set)",
    )
    up.add_argument("--rules", type=Path, help="alert rules YAML file")
    up.add_argument("--record-dir", type=Path, help="record packets to PCAP files in this directory")
    up.add_argument("--nats-url", help="use this NATS server instead of starting an embedded one")
    up.add_argument("--otlp-endpoint", help="export spans and metrics to this OTLP endpoint")
    up.add_argument("--json", action="store_true", help="print enriched calls as NDJSON instead of a table")
    up.add_argument("--config", type=Path, help="YAML config shared by the services")
    up.add_argument("--state-dir", type=Path, help="where NATS state and service logs go (default: a temp dir)")
    up.add_argument(
        "--tls",
        action="store_true",
        help="with --interface: also read TLS plaintext through eBPF uprobes (root; see trawl tls status)",
    )

    identity = commands.add_parser("identity", help="Kubernetes identity snapshots")
    identity_commands = identity.add_subparsers(dest="identity_command", required=True, metavar="ACTION")
    dump = identity_commands.add_parser(
        "dump", help="write a snapshot (every IP claim, with its history) from a live cluster, for --identity"
    )
    dump.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: KUBECONFIG, ~/.kube/config)")
    dump.add_argument("--output", "-o", type=Path, help="write here (default: standard output)")
    dump.add_argument("--cluster", default="", help="cluster name to write into the identities")
    dump.add_argument(
        "--watch-s", type=float, default=0.0, help="watch this many seconds more before writing (churn as history)"
    )
    dump.add_argument("--timeout-s", type=float, default=60.0, help="give up listing after this long")

    tls = commands.add_parser("tls", help="TLS plaintext capture with eBPF uprobes")
    tls_commands = tls.add_subparsers(dest="tls_command", required=True, metavar="ACTION")
    tls_status = tls_commands.add_parser(
        "status", help="per process: hooked or not, which library, and why not (asks the collectors)"
    )
    tls_status.add_argument("--config", type=Path, help="YAML config whose nats section says where NATS is")
    tls_status.add_argument("--nats-url", help="NATS server to ask (default: the config's, else nats://127.0.0.1:4222)")
    tls_status.add_argument("--timeout-s", type=float, default=2.0, help="wait this long for the collectors' answers")
    tls_status.add_argument("--json", action="store_true", help="the collectors' reports as JSON")
    tls_status.add_argument(
        "--local", action="store_true", help="ask no collector: can BPF load here, which processes map a TLS library"
    )

    record = commands.add_parser("record", help="recordings on demand: start, list, stop, get (asks the recorder)")
    record_commands = record.add_subparsers(dest="record_command", required=True, metavar="ACTION")
    record_start = record_commands.add_parser(
        "start", help="record a scope for a duration, starting with the recorder's look-back"
    )
    record_start.add_argument(
        "--pods", action="append", default=[], metavar="REGEX", help="pod name regex (repeatable)"
    )
    record_start.add_argument("--namespace", action="append", default=[], help="namespace (repeatable)")
    record_start.add_argument("--node", action="append", default=[], help="only packets of this node (repeatable)")
    record_start.add_argument("--ip", action="append", default=[], help="an address to record (repeatable)")
    record_start.add_argument("--filter", default="", metavar="BPF", help="tcpdump filter expression")
    record_start.add_argument("--duration", default="10m", help="how long: 90s, 10m, 1h (default 10m)")
    record_start.add_argument("--format", choices=["pcap", "pcapng"], help="default: the recorder's")
    record_start.add_argument("--reason", default="", help="said in the recording (PCAPNG comment)")
    record_commands.add_parser("list", help="the recordings the recorder holds, running and ended")
    for action in ("stop", "get"):
        sub_action = record_commands.add_parser(action, help=f"{action} one recording")
        sub_action.add_argument("id", help="the recording's id (from start or list)")
    for sub_action in record_commands.choices.values():
        sub_action.add_argument("--config", type=Path, help="YAML config whose nats section says where NATS is")
        sub_action.add_argument("--nats-url", help="NATS server (default: the config's, else nats://127.0.0.1:4222)")
        sub_action.add_argument("--timeout-s", type=float, default=5.0, help="wait this long for the answer")
        sub_action.add_argument(
            "--recorders",
            type=int,
            default=0,
            metavar="N",
            help="stop waiting once N recorders answered (default: once none has for half a second)",
        )
        sub_action.add_argument("--json", action="store_true", help="the recordings as JSON, one per line")

    for service in SERVICES:
        sub = commands.add_parser(service, help=f"run the {service} service (what its container runs)")
        sub.add_argument("--config", type=Path, help="YAML config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "analyze":
            from trawl.analyze import analyze

            return analyze(
                args.file,
                identity=args.identity,
                as_json=args.json,
                otlp_endpoint=args.otlp_endpoint,
                config_file=args.config,
                node=args.node,
                proto_descriptors=args.proto_descriptors or [],
            )
        if args.command == "up":
            from trawl.up import UpOptions, up

            return up(
                UpOptions(
                    pcap=args.pcap,
                    interfaces=args.interface or [],
                    identity=args.identity,
                    kubeconfig=args.kubeconfig,
                    rules=args.rules,
                    record_dir=args.record_dir,
                    nats_url=args.nats_url,
                    otlp_endpoint=args.otlp_endpoint,
                    as_json=args.json,
                    config_file=args.config,
                    state_dir=args.state_dir,
                    tls=args.tls,
                )
            )
        if args.command == "identity":
            return _identity_dump(args)
        if args.command == "tls":
            return _tls_status(args)
        if args.command == "record":
            return _record(args)
        module = importlib.import_module(f"trawl.{args.command}.main")
        code: int = module.main(args.config)
        return code
    except UserError as exc:
        print(f"trawl {args.command}: {exc}", file=sys.stderr)  # noqa: T201 - the one line a user reads
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`trawl analyze FILE | head`): what it wanted it has. Point stdout
        # at /dev/null so the interpreter's final flush does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _identity_dump(args: argparse.Namespace) -> int:
    import json

    from trawl.enricher.k8s_watch import dump_identity
    from trawl.logs import configure_logging

    configure_logging("warning", "auto")
    document = dump_identity(args.kubeconfig, args.cluster, args.watch_s, args.timeout_s)
    text = json.dumps(document, indent=1) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


def _tls_status(args: argparse.Namespace) -> int:
    from trawl.collector.config import CollectorSettings
    from trawl.collector.tls_status import status
    from trawl.config import NatsSettings
    from trawl.logs import configure_logging

    configure_logging("warning", "auto")
    nats = None
    if not args.local:
        nats = NatsSettings(servers=[args.nats_url]) if args.nats_url else CollectorSettings.load(args.config).nats
    text, code = status(nats, args.timeout_s, args.json, args.local)
    sys.stdout.write(text)
    return code


def _record(args: argparse.Namespace) -> int:
    import asyncio

    from trawl.alerter.rules import parse_duration
    from trawl.config import NatsSettings
    from trawl.logs import configure_logging
    from trawl.recorder.config import RecorderSettings
    from trawl.recorder.control import ask, render
    from trawl.v1 import control_pb2

    configure_logging("warning", "auto")
    control = control_pb2.RecordControl()
    if args.record_command == "start":
        seconds = parse_duration(args.duration)
        if seconds is None or seconds < 1:
            raise UserError(f"--duration {args.duration!r}: give a duration of a second or more, e.g. 90s, 10m, 1h")
        control.start.CopyFrom(
            control_pb2.RecordRequest(
                requested_by="cli",
                reason=args.reason,
                nodes=args.node,
                namespaces=args.namespace,
                pods=args.pods,
                ips=args.ip,
                filter=args.filter,
                duration_s=round(seconds),
                format=args.format or "",
            )
        )
    elif args.record_command == "list":
        control.list = True
    elif args.record_command == "stop":
        control.stop = args.id
    else:
        control.get = args.id
    nats = NatsSettings(servers=[args.nats_url]) if args.nats_url else RecorderSettings.load(args.config).nats
    reply = asyncio.run(ask(nats, control, args.timeout_s, expect=args.recorders))
    if reply.error:
        raise UserError(reply.error)
    sys.stdout.write(render(reply, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
