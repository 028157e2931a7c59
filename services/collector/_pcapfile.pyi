MAX_RECORD: int

def walk(
    buffer: bytes | bytearray | memoryview, start: int, max_packets: int, max_bytes: int, /
) -> tuple[int, int, int]: ...
