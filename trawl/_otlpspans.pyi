from collections.abc import Callable, Sequence

class SpanEncoder:
    def __init__(
        self,
        scope_name: str,
        scope_version: str,
        split_host: Callable[[str], tuple[str, int | None]],
        network_type: Callable[[str], str | None],
    ) -> None: ...
    def encode(self, calls: Sequence[bytes], /) -> tuple[bytes, int, list[int]]: ...

def blake2b(data: bytes, digest_size: int, /) -> bytes: ...
