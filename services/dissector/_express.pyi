from collections.abc import Callable, Mapping
from typing import Any

Handover = dict[str, Any]
WorkItem = tuple[Any, ...]

def blake2b_hex(data: bytes, digest_size: int, /) -> str: ...

class Express:
    def __init__(
        self,
        header_kind: Callable[[str], int],
        param_is_secret: Callable[[str], bool],
        key_is_secret: Callable[[bytes], bool],
        flow_strings: Callable[[str, bytes, int, bytes, int], tuple[str, str, bytes]],
        max_body_bytes: int,
        max_header_bytes: int,
        max_flows: int,
        max_retained_bytes: int,
    ) -> None: ...
    def feed(
        self,
        records: bytes,
        link_type: int,
        nanosecond: bool,
        node: str,
        shard: int,
        python_flows: Mapping[tuple[object, ...], object] | None,
        /,
    ) -> tuple[list[WorkItem], int, int]: ...
    def demote_oldest(self) -> Handover | None: ...
    def demote_all(self, node: str | None = None, shard: int | None = None) -> list[Handover]: ...
    def demote_stale(
        self, now_ns: int, idle_ns: int, request_timeout_ns: int, handshake_timeout_ns: int, /
    ) -> list[Handover]: ...
    @property
    def active(self) -> int: ...
    @property
    def counters(self) -> dict[str, int]: ...
