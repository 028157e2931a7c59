"""Building `ApiCall` records: the fields every protocol fills the same way."""

from __future__ import annotations

import hashlib

from trawl.dissector.protocols.base import FlowInfo
from trawl.v1.calls_pb2 import ApiCall, Outcome


def call_id(flow: FlowInfo, protocol: str, request_ts_ns: int, ordinal: int) -> str:
    """Stable for the same call: the same capture dissected twice gives the same ids, so a
    re-published call is stored once (Nats-Msg-Id)."""
    digest = hashlib.blake2b(
        f"{flow.node}|{flow.key}|{protocol}|{request_ts_ns}|{ordinal}".encode(), digest_size=12
    ).hexdigest()
    return digest


def new_call(flow: FlowInfo, protocol: str, request_ts_ns: int, ordinal: int) -> ApiCall:
    """An ApiCall with id, protocol, transport, node, capture, shard and both endpoints set;
    `ordinal` is the call's position in its flow (0, 1, 2...)."""
    call = ApiCall(
        id=call_id(flow, protocol, request_ts_ns, ordinal),
        protocol=protocol,
        transport=flow.transport,
        node=flow.node,
        capture="packet",
        shard=flow.shard,
    )
    call.src.ip = flow.client_ip
    call.src.port = flow.client_port
    call.dst.ip = flow.server_ip
    call.dst.port = flow.server_port
    call.request.ts = request_ts_ns
    return call


def finish_call(call: ApiCall, response_ts_ns: int | None, error: bool) -> ApiCall:
    """Set elapsed_ns and outcome once the response (or its absence) is known."""
    if response_ts_ns is None:
        call.outcome = Outcome.OUTCOME_NO_RESPONSE
        return call
    call.response.ts = response_ts_ns
    call.elapsed_ns = max(0, response_ts_ns - call.request.ts)
    call.outcome = Outcome.OUTCOME_ERROR if error else Outcome.OUTCOME_OK
    return call
