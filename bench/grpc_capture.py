"""A capture of real grpcio unary calls on one connection, for bench/dissect.py --grpc.

A grpcio server (generic handler, `trawl.fixtures.Orders/GetOrder` of
tests/fixtures/http2/orders.proto, the messages compiled at run time into a temporary
directory) and a grpcio client on one insecure channel, so one TCP connection and one HPACK
context, recorded by tcpdump on loopback (tests/fixtures/tcpdump_capture.py; needs root).
The client keeps `window` calls in flight (futures), as a busy service's channel does, so
streams interleave and DATA frames share TCP segments as they do in production.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from collections import deque
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))

from tcpdump_capture import capture, free_port  # noqa: E402

SERVICE = "trawl.fixtures.Orders"


def orders_module() -> Any:
    """orders_pb2 compiled into a temporary directory (nothing is written into the tree)."""
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="trawl-bench-orders-"))
    args = ["protoc", f"-I{FIXTURES / 'http2'}", f"--python_out={out}", str(FIXTURES / "http2" / "orders.proto")]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on orders.proto")
    sys.path.insert(0, str(out))
    return importlib.import_module("orders_pb2")


def record(path: Path, calls: int, window: int = 16) -> int:
    """Write `calls` unary calls to `path`; returns the server port (for tshark's decode-as)."""
    pb = orders_module()
    port = free_port()

    def get_order(request: Any, context: grpc.ServicerContext) -> Any:
        return pb.OrderReply(order_id=request.order_id, status="ok", total_cents=1999)

    handler = grpc.unary_unary_rpc_method_handler(
        get_order, pb.OrderRequest.FromString, pb.OrderReply.SerializeToString
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"GetOrder": handler})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        with capture(path, f"tcp port {port}", buffer_kib=256 * 1024):
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            grpc.channel_ready_future(channel).result(timeout=5)
            method = channel.unary_unary(
                f"/{SERVICE}/GetOrder", pb.OrderRequest.SerializeToString, pb.OrderReply.FromString
            )
            in_flight: deque[Any] = deque()
            for index in range(calls):
                in_flight.append(method.future(pb.OrderRequest(order_id=f"order-{index}", quantity=1)))
                if len(in_flight) >= window:
                    in_flight.popleft().result(timeout=10)
            while in_flight:
                in_flight.popleft().result(timeout=10)
            channel.close()
    finally:
        server.stop(grace=None).wait()
    return port
