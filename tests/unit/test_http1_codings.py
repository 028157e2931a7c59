"""Bodies in br and zstd are decoded for display, and every decoder is bounded: a small
compressed body (a decompression bomb) never inflates past the configured body limit."""

from __future__ import annotations

import gzip
import zlib

import brotli
import pytest
import zstandard

from trawl.dissector.protocols.http1 import DECODERS

BOMB = b"\0" * 20_000_000
COMPRESSORS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


@pytest.mark.parametrize("coding", sorted(COMPRESSORS))
def test_decodes_a_body(coding: str) -> None:
    body = b'{"order": 1001, "items": ["book", "pen"]}'
    assert DECODERS[coding](COMPRESSORS[coding](body), 1 << 16) == body


@pytest.mark.parametrize("coding", sorted(COMPRESSORS))
def test_a_decompression_bomb_stays_within_the_limit(coding: str) -> None:
    compressed = COMPRESSORS[coding](BOMB)
    assert len(compressed) < 100_000
    assert DECODERS[coding](compressed, 4096) == b"\0" * 4096
