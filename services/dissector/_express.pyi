from collections.abc import Callable, Mapping
from typing import Any

Handover = dict[str, Any]
# A call the lane made (its serialized bytes), or a tuple of work for the Python path.
WorkItem = bytes | tuple[Any, ...]

def schemaless_json(data: bytes, max_depth: int = 8, max_fields: int = 512, /) -> tuple[str, int]: ...
def blake2b_hex(data: bytes, digest_size: int, /) -> str: ...
def flow_strings(
    node: str, client_ip: bytes, client_port: int, server_ip: bytes, server_port: int, udp: bool, /
) -> tuple[str, str, bytes]: ...

class Express:
    def __init__(
        self,
        header_kind: Callable[[str], int],
        param_is_secret: Callable[[str], bool],
        key_is_secret: Callable[[bytes], bool],
        flow_strings: Callable[[str, bytes, int, bytes, int], tuple[str, str, bytes]] | None,
        max_body_bytes: int,
        max_header_bytes: int,
        max_flows: int,
        max_retained_bytes: int,
        *,
        dns_flow_strings: Callable[[str, bytes, int, bytes, int], tuple[str, str, bytes]] | None = None,
        dns_type_text: Callable[[int], str] | None = None,
        dns_rcode_text: Callable[[int], str] | None = None,
        edns_option_opaque: Callable[[int], bool] | None = None,
        max_pending_requests: int = 1024,
        max_total_retained_bytes: int = ...,
        http2: bool = True,
        redis_rule: Callable[[str], int] | None = None,
        kafka_api: Callable[[int, int], tuple[str, int, int, bool, str, bytes | None, bytes | None] | None]
        | None = None,
        kafka_claims: Callable[[bytes, str, int, str, int], bool] | None = None,
        kafka_errors: dict[int, str] | None = None,
    ) -> None: ...
    def feed(
        self,
        records: bytes,
        link_type: int,
        nanosecond: bool,
        node: str,
        shard: int,
        python_flows: Mapping[tuple[object, ...], object] | None,
        udp_flows: Mapping[tuple[object, ...], object] | None = None,
        udp_count: int = 0,
        /,
    ) -> tuple[list[WorkItem], int, int, int]: ...
    def demote_oldest(self, udp: bool = False, before_ns: int | None = None, /) -> Handover | None: ...
    def demote_all(self, node: str | None = None, shard: int | None = None) -> list[Handover]: ...
    def demote_stale(
        self,
        now_ns: int,
        idle_ns: int,
        request_timeout_ns: int,
        handshake_timeout_ns: int,
        udp_idle_ns: int = ...,
        /,
    ) -> list[Handover]: ...
    @property
    def active(self) -> int: ...
    @property
    def tcp_active(self) -> int: ...
    @property
    def udp_active(self) -> int: ...
    @property
    def counters(self) -> dict[str, int]: ...
