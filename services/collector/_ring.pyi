import mmap

FRAME_SOCKADDR_OFFSET: int
SLL2_HEADER_LEN: int

def drain(
    ring: mmap.mmap, block_size: int, block_count: int, start: int, max_blocks: int, cooked: bool, /
) -> tuple[bytes, int, int, int]: ...
