"""Trace context a request carries, copied into the call's trace fields: W3C `traceparent`
(and `tracestate`), B3 single header (`b3`) and B3 multi header (`x-b3-traceid`,
`x-b3-spanid`), in that order of preference. Shared by every HTTP-borne protocol (HTTP/1.x,
HTTP/2, gRPC, GraphQL); gRPC's binary `grpc-trace-bin` is read by the gRPC module."""

from __future__ import annotations

from trawl.v1.calls_pb2 import ApiCall

HEX_DIGITS = "0123456789abcdef"


def trace_context(call: ApiCall, headers: dict[bytes, bytes]) -> None:
    """`headers` keyed by lower-case name (as bytes); sets trace_id, parent_span_id, trace_state."""
    traceparent = headers.get(b"traceparent")
    if traceparent is not None:
        parts = traceparent.decode("latin-1").strip().lower().split("-")
        if len(parts) >= 4 and _hex(parts[1], 32) and _hex(parts[2], 16) and parts[1] != "0" * 32:
            call.trace_id = parts[1]
            call.parent_span_id = parts[2]
            state = headers.get(b"tracestate")
            if state is not None:
                call.trace_state = state.decode("latin-1").strip()
            return
    b3 = headers.get(b"b3")
    if b3 is not None:
        parts = b3.decode("latin-1").strip().lower().split("-")
        if len(parts) >= 2 and _b3_ids(call, parts[0], parts[1]):
            return
    trace = headers.get(b"x-b3-traceid")
    span = headers.get(b"x-b3-spanid")
    if trace is not None and span is not None:
        _b3_ids(call, trace.decode("latin-1").strip().lower(), span.decode("latin-1").strip().lower())


def _hex(text: str, size: int) -> bool:
    """`size` lower-case hex digits (str.strip is a C loop; a regex per id cost more per request)."""
    return len(text) == size and not text.strip(HEX_DIGITS)


def _b3_ids(call: ApiCall, trace: str, span: str) -> bool:
    if len(trace) == 16:
        trace = "0" * 16 + trace
    if _hex(trace, 32) and _hex(span, 16):
        call.trace_id = trace
        call.parent_span_id = span
        return True
    return False
