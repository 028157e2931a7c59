from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.message import Message

FieldSpec = tuple[int, str, int, int, int, dict[int, str] | None]
SpliceEntry = tuple[bytes, bool, bool, bytes]
SpliceWinners = tuple[SpliceEntry, tuple[tuple[int, SpliceEntry], ...]]
AddressPlan = tuple[tuple[int, ...], tuple[SpliceWinners, ...], SpliceWinners]

class Encoder:
    def __init__(self, schema: tuple[tuple[FieldSpec, ...], ...]) -> None: ...
    def encode(self, serialized: bytes, /) -> str | None: ...
    def encode_lines(self, messages: Sequence[Message | bytes], fallback: Callable[[Any], str], /) -> bytes: ...
    def encode_lines_into(
        self, messages: Sequence[Message | bytes], fallback: Callable[[Any], str], buffer: bytearray, /
    ) -> int: ...

class Splicer:
    def __init__(
        self,
        describe: Callable[[str], AddressPlan],
        max_addresses: int = 65536,
        route: Callable[[bytes, bytes, bytes], str | None] | None = None,
    ) -> None: ...
    def enrich(self, calls: Sequence[bytes], /) -> tuple[list[bytes], int, int, dict[bytes, int], list[int]]: ...

def route_calls(calls: Sequence[bytes], /) -> list[tuple[str, int, list[bytes]]]: ...
